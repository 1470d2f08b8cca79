//! Swapping restored directories into place so that a crash never leaves a mix.
//!
//! Before the first rename, a journal listing every (live, staged, old) triple is written and
//! synced. Each live directory is renamed to its `old` name, then the staged one to the live
//! name. Once all are swapped the journal is marked committed, then the old directories are
//! removed. At the next start, [`recover`] rolls back a journal still swapping (the previous data
//! is what the boot finds) and finishes the clean-up of a committed one.

use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::volumes::sync_dir;

const JOURNAL: &str = ".regobox-restore.json";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum State {
    Swapping,
    Committed,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Swap {
    live: PathBuf,
    staged: PathBuf,
    old: PathBuf,
    had_live: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Journal {
    id: String,
    state: State,
    swaps: Vec<Swap>,
    /// The journal's file name in its root.
    #[serde(default = "restore_name")]
    name: String,
    /// The replaced directories stay (an upgrade keeps the old cluster) instead of being
    /// removed once the swap is committed.
    #[serde(default)]
    keep_old: bool,
    /// The staged directories stay where they were when an interrupted swap is rolled back,
    /// instead of being removed: they are what is kept (a rollback's old cluster, the copy an
    /// upgrade puts back), not something made for the swap.
    #[serde(default)]
    keep_staged: bool,
}

/// What a swap keeps besides the live directories: see [`swap_named`].
#[derive(Debug, Clone, Copy, Default)]
pub struct Keep {
    /// The replaced directories, once the swap is committed.
    pub old: bool,
    /// The staged directories, when an interrupted swap is rolled back.
    pub staged: bool,
}

fn restore_name() -> String {
    JOURNAL.to_string()
}

fn journal_path(root: &Path) -> PathBuf {
    root.join(JOURNAL)
}

fn write_journal(root: &Path, journal: &Journal) -> io::Result<()> {
    let path = root.join(&journal.name);
    let tmp = root.join(format!("{}.tmp", journal.name));
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&serde_json::to_vec_pretty(journal).map_err(io::Error::other)?)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, &path)?;
    sync_dir(root)
}

fn sync_parent(p: &Path) -> io::Result<()> {
    sync_dir(p.parent().unwrap_or(Path::new("/")))
}

/// Swap every `(live, staged)` pair, journaled in `root`. `fault` is called between steps (fault
/// injection for tests).
pub fn swap(
    root: &Path,
    id: &str,
    pairs: &[(PathBuf, PathBuf)],
    fault: &dyn Fn(&str),
) -> io::Result<()> {
    swap_named(root, JOURNAL, id, pairs, Keep::default(), fault).map(|_| ())
}

/// [`swap`] with a journal of another name, keeping what `keep` says. Returns where each
/// replaced directory went.
pub fn swap_named(
    root: &Path,
    name: &str,
    id: &str,
    pairs: &[(PathBuf, PathBuf)],
    keep: Keep,
    fault: &dyn Fn(&str),
) -> io::Result<Vec<PathBuf>> {
    let swaps: Vec<Swap> = pairs
        .iter()
        .enumerate()
        .map(|(i, (live, staged))| {
            let name = live
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            Swap {
                old: live.with_file_name(aside(&name, id, i)),
                had_live: present(live),
                live: live.clone(),
                staged: staged.clone(),
            }
        })
        .collect();
    let mut journal = Journal {
        id: id.into(),
        state: State::Swapping,
        swaps,
        name: name.into(),
        keep_old: keep.old,
        keep_staged: keep.staged,
    };
    let prefix = if name == JOURNAL {
        "restore"
    } else {
        "upgrade"
    };
    write_journal(root, &journal)?;
    let moved = journal.swaps.iter().enumerate().try_for_each(|(i, s)| {
        if s.had_live {
            rename(&s.live, &s.old)?;
            sync_parent(&s.live)?;
        }
        fault(&format!("{prefix}:swap-{i}"));
        rename(&s.staged, &s.live)?;
        sync_parent(&s.live)
    });
    if let Err(e) = moved {
        // A rename that failed (a directory that is a mount point: EBUSY) while the staged
        // directories are still there to take back what was swapped in: roll back now, as the
        // next start would (it could not once the caller removed the staging area).
        return match recover_named(root, name) {
            Ok(_) => Err(io::Error::new(
                e.kind(),
                format!("{e}; nothing was swapped (the previous data is in place)"),
            )),
            Err(r) => Err(io::Error::new(
                e.kind(),
                format!(
                    "{e}; putting the previous data back failed too ({r}): {} stays, and every start tries again",
                    root.join(name).display()
                ),
            )),
        };
    }
    fault(&format!("{prefix}:swapped"));
    journal.state = State::Committed;
    write_journal(root, &journal)?;
    fault(&format!("{prefix}:committed"));
    finish(root, &journal);
    Ok(journal.swaps.iter().map(|s| s.old.clone()).collect())
}

/// The name a replaced directory `name` is moved aside to: `.<name>.old-<id>`, or, where that
/// would pass a name's 255 bytes (an archive's directory of a 250-byte name failed its swap after
/// all the work), `name` cut short with the pair's `index`, which keeps it apart from another
/// cut the same.
fn aside(name: &str, id: &str, index: usize) -> String {
    const NAME_MAX: usize = 255;
    let full = format!(".{name}.old-{id}");
    if full.len() <= NAME_MAX {
        return full;
    }
    let tail = format!("~{index}.old-{id}");
    let mut keep = NAME_MAX.saturating_sub(1 + tail.len()).min(name.len());
    while !name.is_char_boundary(keep) {
        keep -= 1;
    }
    format!(".{}{tail}", &name[..keep])
}

/// Whether anything is at `path` (a link too, even one to nothing).
fn present(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok()
}

/// `std::fs::rename`, its error naming both paths.
fn rename(from: &Path, to: &Path) -> io::Result<()> {
    std::fs::rename(from, to).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("renaming {} to {}: {e}", from.display(), to.display()),
        )
    })
}

fn finish(root: &Path, journal: &Journal) {
    for s in &journal.swaps {
        let Ok(old) = std::fs::symlink_metadata(&s.old) else {
            continue;
        };
        if !journal.keep_old {
            // What was replaced may be a file (`--force` where the archive has a directory).
            let removed = if old.is_dir() {
                std::fs::remove_dir_all(&s.old)
            } else {
                std::fs::remove_file(&s.old)
            };
            if let Err(e) = removed {
                tracing::warn!(path = %s.old.display(), error = %e, "cannot remove the previous data");
            }
        }
    }
    let _ = std::fs::remove_file(root.join(&journal.name));
    let _ = sync_dir(root);
}

/// Whether a journal is in `root` (a restore running, or interrupted).
pub fn exists(root: &Path) -> bool {
    present(&journal_path(root))
}

/// Complete or undo a restore that was interrupted; what was done, if anything.
pub fn recover(root: &Path) -> io::Result<Option<&'static str>> {
    recover_named(root, JOURNAL)
}

/// [`recover`] for a journal of another name.
pub fn recover_named(root: &Path, name: &str) -> io::Result<Option<&'static str>> {
    let text = match std::fs::read(root.join(name)) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let journal: Journal = match serde_json::from_slice(&text) {
        Ok(j) => j,
        Err(e) => {
            // Only written by rename of a synced file: unreadable means damaged; keep it for a person.
            return Err(io::Error::other(format!(
                "{} is unreadable ({e}); a swap was interrupted: check the volume by hand",
                root.join(name).display()
            )));
        }
    };
    // An upgrade's journal lives beside the data directory and names only what is there: one
    // naming anything else was not written by regobox, and is not acted on.
    if name != JOURNAL {
        let inside = |p: &Path| {
            p.parent() == Some(root)
                && p.components()
                    .all(|c| !matches!(c, std::path::Component::ParentDir))
        };
        // ... and always replaces a directory that was there (a journal saying otherwise would
        // make the live one read as swapped in, and roll it away).
        if let Some(s) = journal
            .swaps
            .iter()
            .find(|s| !(inside(&s.live) && inside(&s.staged) && inside(&s.old) && s.had_live))
        {
            return Err(io::Error::other(format!(
                "{} names {} (or {}, {}), not beside it: not written by regobox; check it by hand",
                root.join(name).display(),
                s.live.display(),
                s.staged.display(),
                s.old.display()
            )));
        }
    }
    match journal.state {
        State::Committed => {
            finish(root, &journal);
            Ok(Some("finished the clean-up of a completed swap"))
        }
        State::Swapping => {
            for s in journal.swaps.iter().rev() {
                let swapped = if s.had_live {
                    present(&s.old)
                } else {
                    present(&s.live) && !present(&s.staged)
                };
                if !swapped {
                    continue;
                }
                if present(&s.live) {
                    rename(&s.live, &s.staged)?;
                }
                if s.had_live {
                    rename(&s.old, &s.live)?;
                }
                sync_parent(&s.live)?;
            }
            for s in &journal.swaps {
                if !journal.keep_staged && present(&s.staged) {
                    let _ = std::fs::remove_dir_all(&s.staged);
                }
            }
            let _ = std::fs::remove_file(root.join(name));
            sync_dir(root)?;
            Ok(Some(
                "rolled back an interrupted swap: the previous data is in place",
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree(root: &Path) -> (PathBuf, PathBuf, PathBuf, PathBuf) {
        let a = root.join("a");
        let b = root.join("b");
        std::fs::create_dir_all(&a).unwrap();
        std::fs::write(a.join("v"), "old-a").unwrap();
        let sa = root.join(".stage/a");
        let sb = root.join(".stage/b");
        std::fs::create_dir_all(&sa).unwrap();
        std::fs::create_dir_all(&sb).unwrap();
        std::fs::write(sa.join("v"), "new-a").unwrap();
        std::fs::write(sb.join("v"), "new-b").unwrap();
        (a, b, sa, sb)
    }

    #[test]
    fn a_complete_swap_replaces_everything() {
        let d = tempfile::tempdir().unwrap();
        let (a, b, sa, sb) = tree(d.path());
        swap(d.path(), "1", &[(a.clone(), sa), (b.clone(), sb)], &|_| {}).unwrap();
        assert_eq!(std::fs::read_to_string(a.join("v")).unwrap(), "new-a");
        assert_eq!(std::fs::read_to_string(b.join("v")).unwrap(), "new-b");
        assert!(!journal_path(d.path()).exists());
        assert!(!d.path().join(".a.old-1").exists());
    }

    /// A rename that fails in the middle (found by an attacker: a live directory that is a
    /// mount point cannot be renamed, EBUSY) is rolled back at once, while the staged
    /// directories are there: the caller may then remove its staging area.
    #[test]
    fn a_swap_that_fails_half_way_is_rolled_back_at_once() {
        let d = tempfile::tempdir().unwrap();
        let (a, b, sa, sb) = tree(d.path());
        std::fs::create_dir_all(&b).unwrap();
        std::fs::write(b.join("v"), "old-b").unwrap();
        // The second pair's staged directory is missing: its rename fails after the first
        // pair was swapped.
        std::fs::remove_dir_all(&sb).unwrap();
        let e = swap(d.path(), "1", &[(a.clone(), sa), (b.clone(), sb)], &|_| {}).unwrap_err();
        assert!(e.to_string().contains("nothing was swapped"), "{e}");
        assert!(e.to_string().contains("renaming"), "{e}");
        assert_eq!(std::fs::read_to_string(a.join("v")).unwrap(), "old-a");
        assert_eq!(std::fs::read_to_string(b.join("v")).unwrap(), "old-b");
        assert!(!journal_path(d.path()).exists());
        std::fs::remove_dir_all(d.path().join(".stage")).unwrap();
        assert_eq!(recover(d.path()).unwrap(), None);
    }

    #[test]
    fn an_interrupted_swap_is_rolled_back_at_every_point() {
        for point in ["restore:swap-0", "restore:swap-1", "restore:swapped"] {
            let d = tempfile::tempdir().unwrap();
            let (a, b, sa, sb) = tree(d.path());
            // Simulate a crash at `point` by stopping there.
            let r = std::panic::catch_unwind(|| {
                swap(
                    d.path(),
                    "1",
                    &[(a.clone(), sa.clone()), (b.clone(), sb.clone())],
                    &|p| {
                        if p == point {
                            panic!("crash");
                        }
                    },
                )
            });
            assert!(r.is_err());
            assert!(
                recover(d.path()).unwrap().unwrap().contains("rolled back"),
                "{point}"
            );
            assert_eq!(
                std::fs::read_to_string(a.join("v")).unwrap(),
                "old-a",
                "{point}"
            );
            assert!(!b.exists(), "{point}: b did not exist before");
            assert!(!journal_path(d.path()).exists());
        }
    }

    #[test]
    fn a_committed_swap_is_finished() {
        let d = tempfile::tempdir().unwrap();
        let (a, b, sa, sb) = tree(d.path());
        let r = std::panic::catch_unwind(|| {
            swap(
                d.path(),
                "1",
                &[(a.clone(), sa.clone()), (b.clone(), sb.clone())],
                &|p| {
                    if p == "restore:committed" {
                        panic!("crash");
                    }
                },
            )
        });
        assert!(r.is_err());
        assert!(recover(d.path()).unwrap().unwrap().contains("completed"));
        assert_eq!(std::fs::read_to_string(a.join("v")).unwrap(), "new-a");
        assert!(!d.path().join(".a.old-1").exists());
        assert_eq!(recover(d.path()).unwrap(), None);
    }

    #[test]
    fn an_aside_name_fits_in_a_name_whatever_the_name() {
        assert_eq!(aside("files", "20261206T1-7", 1), ".files.old-20261206T1-7");
        let long = "é".repeat(125);
        let (a, b) = (
            aside(&long, "20261206T111816-12345", 1),
            aside(&long, "20261206T111816-12345", 2),
        );
        assert!(a.len() <= 255 && b.len() <= 255, "{} {}", a.len(), b.len());
        assert_ne!(a, b, "two names cut the same stay apart");
        assert!(a.ends_with("~1.old-20261206T111816-12345"), "{a}");
    }
}

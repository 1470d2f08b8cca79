//! Bind sources held still while the engine mounts them.
//!
//! The engine resolves a bind source on the host when it mounts it, at every start (and when it
//! copies into a stopped container), following symbolic links. A check that the path holds no
//! link, made before the start is forwarded, leaves a window: the application swaps a
//! directory on the path for a link to `/` after the check and before the mount. So, while
//! regobox forwards a request that makes the engine mount a container's binds, every directory
//! from the bind root down to the source is **frozen**: opened without following links (a link
//! anywhere refuses the request), owned by root with the sticky bit set and the owner's
//! permissions given to everyone. In a sticky directory only an entry's owner (or root) may
//! rename or remove it, and every entry on the path is now root's: the application, which is
//! not root, can still create and remove its own files there, but can no longer move any
//! component of the path. After the freeze the path is walked again and must lead to the same
//! inodes; after the engine answers, owners and modes are put back as they were. What is
//! changed is written to a journal first, so that a regobox killed in between puts them back at
//! its next start. Missing components are created as root's directories, as the engine would.
//!
//! When regobox is not root (a local run as a user), the application runs as the same user and
//! nothing can be taken out of its reach: the path is checked, not frozen (warned at start).
//!
//! What the freeze cannot stop is a process with `CAP_FOWNER`: a job running as root in a
//! container that binds a directory on the path, writable. Such a start is refused
//! ([`covering`]), naming the job.

use std::fs::File;
use std::io::Write as _;
use std::os::fd::AsFd;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::fcntl::{OFlag, openat};
use nix::sys::stat::Mode;
use serde::{Deserialize, Serialize};

use super::policy::Denied;

/// One path component as it was before the freeze.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Record {
    path: PathBuf,
    dev: u64,
    ino: u64,
    uid: u32,
    gid: u32,
    mode: u32,
}

/// The frozen components of a request's bind sources; thawed when dropped.
pub struct Freeze {
    frozen: Vec<(File, Record)>,
    journal: PathBuf,
}

fn refuse(source: &Path, why: String) -> Denied {
    Denied::new(
        "HostConfig.Binds",
        format!(
            "refused by regobox's Docker policy: bind source {} {why}",
            source.display()
        ),
    )
}

/// Open `name` in `dir` without following a link: a directory, or (for the last component) a
/// regular file.
fn open_at(dir: &File, name: &Path, last: bool) -> nix::Result<File> {
    let mut flags = OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_NONBLOCK;
    if !last {
        flags |= OFlag::O_DIRECTORY;
    }
    openat(dir.as_fd(), name, flags, Mode::empty()).map(File::from)
}

/// The root of `source` among `roots` (the longest that contains it).
fn root_of<'a>(source: &Path, roots: &'a [PathBuf]) -> Option<&'a PathBuf> {
    roots
        .iter()
        .filter(|r| source.starts_with(r))
        .max_by_key(|r| r.components().count())
}

/// Open every component from the root down to `source`, refusing links and anything but
/// directories (and a regular file at the end); missing ones are created as root's directories.
fn walk(source: &Path, root: &Path) -> Result<Vec<(PathBuf, File)>, Denied> {
    let io = |what: &Path, e: &dyn std::fmt::Display| {
        refuse(
            source,
            format!("cannot be checked: {}: {e}", what.display()),
        )
    };
    let root_file = File::open(root).map_err(|e| io(root, &e))?;
    if !root_file.metadata().map_err(|e| io(root, &e))?.is_dir() {
        return Err(refuse(
            source,
            format!("has a root {} that is not a directory", root.display()),
        ));
    }
    let parts: Vec<PathBuf> = source
        .strip_prefix(root)
        .unwrap_or(Path::new(""))
        .components()
        .map(|c| PathBuf::from(c.as_os_str()))
        .collect();
    let mut out = vec![(root.to_path_buf(), root_file)];
    let mut path = root.to_path_buf();
    for (i, part) in parts.iter().enumerate() {
        path.push(part);
        let last = i + 1 == parts.len();
        let parent = &out
            .last()
            .map(|(_, f)| f)
            .ok_or_else(|| io(&path, &"no parent"))?;
        let opened = match open_at(parent, part, last) {
            Err(nix::errno::Errno::ENOENT) => {
                // The engine would create it, as root: so does regobox, before the freeze.
                nix::sys::stat::mkdirat(
                    parent.as_fd(),
                    part.as_path(),
                    Mode::from_bits_truncate(0o755),
                )
                .or_else(|e| {
                    if e == nix::errno::Errno::EEXIST {
                        Ok(())
                    } else {
                        Err(e)
                    }
                })
                .map_err(|e| io(&path, &e))?;
                open_at(parent, part, last)
            }
            other => other,
        };
        let file = match opened {
            Ok(f) => f,
            Err(nix::errno::Errno::ELOOP) | Err(nix::errno::Errno::ENOTDIR) => {
                return Err(refuse(
                    source,
                    format!("goes through the symbolic link {}", path.display()),
                ));
            }
            Err(e) => return Err(io(&path, &e)),
        };
        let meta = file.metadata().map_err(|e| io(&path, &e))?;
        if !(meta.is_dir() || (last && meta.is_file())) {
            return Err(refuse(
                source,
                format!(
                    "has {} that is neither a directory nor a regular file",
                    path.display()
                ),
            ));
        }
        out.push((path.clone(), file));
    }
    Ok(out)
}

impl Freeze {
    /// Freeze the components of `sources` (paths as regobox sees them) under their roots;
    /// `journal` records what is changed until it is put back.
    pub fn new(sources: &[PathBuf], roots: &[PathBuf], journal: &Path) -> Result<Freeze, Denied> {
        let mut freeze = Freeze {
            frozen: Vec::new(),
            journal: journal.to_path_buf(),
        };
        for source in sources {
            let Some(root) = root_of(source, roots) else {
                return Err(refuse(source, "is outside the allowed roots".into()));
            };
            let components = walk(source, root)?;
            if !nix::unistd::geteuid().is_root() {
                // Not root (a local run as a user): the application is the same user, nothing
                // can be taken out of its reach; checked only (the bridge warned at start).
                continue;
            }
            for (path, file) in components {
                let meta = file
                    .metadata()
                    .map_err(|e| refuse(source, format!("cannot be checked: {e}")))?;
                if freeze
                    .frozen
                    .iter()
                    .any(|(_, r)| r.dev == meta.dev() && r.ino == meta.ino())
                {
                    continue;
                }
                let record = Record {
                    path,
                    dev: meta.dev(),
                    ino: meta.ino(),
                    uid: meta.uid(),
                    gid: meta.gid(),
                    mode: meta.mode() & 0o7777,
                };
                freeze.write_journal(Some(&record)).map_err(|e| {
                    refuse(
                        source,
                        format!("cannot be frozen (journal {}: {e})", journal.display()),
                    )
                })?;
                // Sticky, root's, and the owner's permissions for everyone: others' files stay
                // usable, no component of the path can be moved by anyone but root.
                let owner = (record.mode >> 6) & 0o7;
                let mode = 0o1000 | (record.mode & 0o2700) | (owner << 3) | owner;
                let frozen = std::os::unix::fs::fchown(&file, Some(0), None)
                    .and_then(|_| file.set_permissions(std::fs::Permissions::from_mode(mode)));
                freeze.frozen.push((file, record));
                if let Err(e) = frozen {
                    return Err(refuse(source, format!("cannot be frozen: {e}")));
                }
            }
            // The path, walked again now that nothing on it can move, leads to the same inodes.
            let again = walk(source, root)?;
            for (path, file) in again {
                let meta = file
                    .metadata()
                    .map_err(|e| refuse(source, format!("cannot be checked: {e}")))?;
                let same = freeze
                    .frozen
                    .iter()
                    .any(|(_, r)| r.path == path && r.dev == meta.dev() && r.ino == meta.ino());
                if !same {
                    return Err(refuse(
                        source,
                        format!("changed while it was checked ({})", path.display()),
                    ));
                }
            }
        }
        Ok(freeze)
    }

    /// The journal holds the records of what is frozen now (plus `adding`).
    fn write_journal(&self, adding: Option<&Record>) -> std::io::Result<()> {
        let records: Vec<&Record> = self.frozen.iter().map(|(_, r)| r).chain(adding).collect();
        write_records(&self.journal, &records)
    }
}

fn write_records(journal: &Path, records: &[&Record]) -> std::io::Result<()> {
    if records.is_empty() {
        return match std::fs::remove_file(journal) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        };
    }
    let mut tmp = journal.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut f = File::create(&tmp)?;
    f.write_all(&serde_json::to_vec(records).unwrap_or_default())?;
    f.sync_all()?;
    std::fs::rename(&tmp, journal)
}

impl Drop for Freeze {
    fn drop(&mut self) {
        for (file, r) in self.frozen.iter().rev() {
            if let Err(e) = put_back(file, r) {
                tracing::warn!(path = %r.path.display(), error = %e, "cannot put back the owner and mode of a bind source's directory");
            }
        }
        if let Err(e) = write_records(&self.journal, &[]) {
            tracing::warn!(journal = %self.journal.display(), error = %e, "cannot clear the bind freeze journal");
        }
    }
}

/// `file`'s owner and mode as `r` recorded them.
fn put_back(file: &File, r: &Record) -> std::io::Result<()> {
    std::os::unix::fs::fchown(file, Some(r.uid), Some(r.gid))?;
    file.set_permissions(std::fs::Permissions::from_mode(r.mode))
}

/// Put back what a regobox killed during a freeze left frozen (at the bridge's start): each
/// recorded path, if it is still the same inode, gets its owner and mode back.
pub fn thaw_leftovers(journal: &Path) {
    let Ok(bytes) = std::fs::read(journal) else {
        return;
    };
    let records: Vec<Record> = serde_json::from_slice(&bytes).unwrap_or_default();
    for r in &records {
        let file = File::open(&r.path);
        let same = file
            .as_ref()
            .ok()
            .and_then(|f| f.metadata().ok())
            .is_some_and(|m| m.dev() == r.dev && m.ino() == r.ino);
        match file {
            Ok(f) if same => match put_back(&f, r) {
                Ok(()) => {
                    tracing::info!(path = %r.path.display(), uid = r.uid, gid = r.gid, mode = format!("{:o}", r.mode), "put back the owner and mode of a bind source's directory left frozen by a stopped regobox")
                }
                Err(e) => {
                    tracing::warn!(path = %r.path.display(), error = %e, "cannot put back a frozen directory's owner and mode")
                }
            },
            _ => {
                tracing::warn!(path = %r.path.display(), "a directory left frozen is gone or replaced: not touched")
            }
        }
    }
    let _ = std::fs::remove_file(journal);
}

/// The first of `jobs` (name, writable bind sources as regobox sees them) that could move a
/// component of `sources`: a writable bind of a directory on their path or above it.
pub fn covering<'a>(
    sources: &[PathBuf],
    roots: &[PathBuf],
    jobs: &'a [(String, Vec<PathBuf>)],
) -> Option<(&'a str, &'a Path, PathBuf)> {
    for source in sources {
        let Some(root) = root_of(source, roots) else {
            continue;
        };
        // A job can rename entries anywhere under a bind it writes: a problem when the source's
        // parent (and so every directory above it, up to the root) lies under one.
        let Some(parent) = source.parent().filter(|p| p.starts_with(root)) else {
            continue;
        };
        for (name, binds) in jobs {
            if let Some(bind) = binds.iter().find(|b| parent.starts_with(b)) {
                return Some((name, bind, source.clone()));
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frozen_while_held_put_back_after() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("files");
        std::fs::create_dir_all(root.join("jobs/42")).unwrap();
        std::fs::set_permissions(root.join("jobs"), std::fs::Permissions::from_mode(0o750))
            .unwrap();
        let journal = dir.path().join("frozen.json");
        let source = root.join("jobs/42/out");
        let roots = vec![root.clone()];
        {
            let _f = Freeze::new(std::slice::from_ref(&source), &roots, &journal).unwrap();
            let m = std::fs::metadata(root.join("jobs")).unwrap();
            assert_eq!(m.mode() & 0o7777, 0o1777, "sticky, owner bits for all");
            assert_eq!(m.uid(), 0);
            assert!(
                source.is_dir(),
                "a missing component is made, as the engine would"
            );
            assert!(journal.exists());
        }
        assert_eq!(
            std::fs::metadata(root.join("jobs")).unwrap().mode() & 0o7777,
            0o750
        );
        assert!(!journal.exists());

        std::os::unix::fs::symlink("/", root.join("jobs/escape")).unwrap();
        let d = Freeze::new(&[root.join("jobs/escape/etc")], &roots, &journal)
            .err()
            .unwrap();
        assert!(d.message.contains("symbolic link"), "{}", d.message);
        assert_eq!(
            std::fs::metadata(root.join("jobs")).unwrap().mode() & 0o7777,
            0o750,
            "a refusal puts back what it froze"
        );

        let jobs = vec![("other".to_string(), vec![root.join("jobs")])];
        assert!(covering(std::slice::from_ref(&source), &roots, &jobs).is_some());
        let jobs = vec![("other".to_string(), vec![root.join("jobs/42/out")])];
        assert!(
            covering(&[source], &roots, &jobs).is_none(),
            "its own source's contents are its own"
        );
    }
}

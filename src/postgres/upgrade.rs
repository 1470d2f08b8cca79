//! Upgrading a cluster in place to the server binaries' major with `pg_upgrade`, keeping the
//! old cluster until the user confirms (`regobox upgrade --finish`), a delay passes
//! (`postgres.upgrade_keep_old`), or the user takes it back (`--rollback`).
//!
//! 1. Preflight, changing nothing: binaries of the old major (`postgres.old_bin_dirs`, the
//!    image's `PG_UPGRADE_FROM`), the old cluster readable and recoverable, its superuser,
//!    encoding, locale and data-checksum setting, free space for a copy, then
//!    `pg_upgrade --check` against a new cluster made for it (removed again if refused).
//! 2. A copy of the old cluster as it is (cloned where the file system can): what is kept and
//!    what a rollback puts back, byte for byte. Then `pg_upgrade --clone` or the default copy
//!    into `.regobox-upgrade-<name>` beside the data directory (pg_upgrade starts and stops the
//!    old server, which writes to it: that is why the copy is kept, not the original).
//! 3. The old `postgresql.conf` (and `.auto.conf`, `pg_hba.conf`, `pg_ident.conf`) carried over,
//!    if the new server accepts it (`postgres -C`), else the new defaults and a warning.
//! 4. The [`State`] file beside the data directory, the untouched copy moved to
//!    `.<name>.pg<old major>-<time>`, then the swap, journaled as a restore's
//!    ([`crate::backup::journal`]): the new cluster takes the data directory's name, and the
//!    cluster pg_upgrade read is removed once committed. A kill at any point leaves one whole
//!    cluster at the data directory: the next start rolls back a swap that did not commit, and
//!    removes the copy of an upgrade that did not get that far.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::PostgresError;
use super::binaries::{Binaries, Major};
use super::cluster::{self, Record};
use crate::backup::journal::Keep;
use crate::config::{Config, UpgradeMethod};
use crate::process::fault;
use crate::users::Account;

/// The swap's journal, in the data directory's parent.
pub const JOURNAL: &str = ".regobox-upgrade-journal.json";
/// What the last upgrade did, in the data directory's parent.
pub const STATE: &str = ".regobox-upgrade.json";

/// The last upgrade of the cluster at a data directory.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct State {
    pub from: String,
    pub to: String,
    /// Where the old cluster is kept.
    pub old_dir: PathBuf,
    /// `clone` or `copy`.
    pub method: String,
    /// Seconds since the epoch.
    pub at: u64,
    pub status: Status,
    /// A server ran on the new cluster: a rollback loses what it wrote.
    pub new_started: bool,
    /// `link`: the archive of the old cluster taken before, what a rollback is once the new
    /// server has run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup: Option<PathBuf>,
}

/// What the command that asks for an upgrade (`regobox upgrade`) brings to it.
#[derive(Debug, Clone, Default)]
pub struct Request {
    /// The archive of the old cluster taken before a linked upgrade.
    pub backup: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Status {
    /// The new cluster is in place; the old one kept at `old_dir`.
    Done,
    /// The old cluster was put back: `run` does not upgrade it again on its own.
    RolledBack,
}

fn parent(data_dir: &Path) -> PathBuf {
    data_dir
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("/"))
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> PostgresError + '_ {
    move |source| PostgresError::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl State {
    /// The state beside `data_dir`. Its `old_dir` is one regobox names (beside the data
    /// directory, `.<name>.pg<major>-<time>`): a file naming anything else is refused, never
    /// acted on (`--finish` and recovery remove that directory).
    pub fn read(data_dir: &Path) -> Result<Option<State>, PostgresError> {
        let path = parent(data_dir).join(STATE);
        let invalid = |why: String| PostgresError::Io {
            path: path.clone(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, why),
        };
        let state: State = match std::fs::read(&path) {
            Ok(t) => serde_json::from_slice(&t).map_err(|e| invalid(e.to_string()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(PostgresError::Io { path, source: e }),
        };
        // `.<name>.pg<from>-<time>` (the copy kept), or `.<name>.old-pg<from>-<time>` (a linked
        // upgrade's old cluster, where its swap set it aside).
        let prefixes = [
            format!(".{}.pg{}-", name_of(data_dir), state.from),
            format!(".{}.old-pg{}-", name_of(data_dir), state.from),
        ];
        let file_name = state.old_dir.file_name().and_then(|n| n.to_str());
        let ours = state.old_dir.parent() == Some(parent(data_dir).as_path())
            && prefixes.iter().any(|prefix| {
                file_name
                    .and_then(|n| n.strip_prefix(prefix.as_str()))
                    .is_some_and(|t| !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()))
            })
            && Major::parse(&state.from).is_some_and(|m| m.to_string() == state.from);
        if !ours {
            return Err(invalid(format!(
                "it names {} as the old cluster, which is not a name regobox gives: check it by hand",
                state.old_dir.display()
            )));
        }
        Ok(Some(state))
    }

    fn write(&self, data_dir: &Path) -> Result<(), PostgresError> {
        let dir = parent(data_dir);
        let path = dir.join(STATE);
        let tmp = dir.join(format!("{STATE}.tmp"));
        let text = serde_json::to_vec_pretty(self).map_err(|e| PostgresError::Io {
            path: path.clone(),
            source: std::io::Error::other(e),
        })?;
        {
            use std::io::Write;
            let mut f = std::fs::File::create(&tmp).map_err(io(&tmp))?;
            f.write_all(&text).map_err(io(&tmp))?;
            f.sync_all().map_err(io(&tmp))?;
        }
        std::fs::rename(&tmp, &path).map_err(io(&path))?;
        crate::volumes::sync_dir(&dir).map_err(io(&dir))
    }

    fn remove(data_dir: &Path) -> Result<(), PostgresError> {
        let path = parent(data_dir).join(STATE);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(PostgresError::Io { path, source: e }),
        }
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Held by a command while it opens the data directory (and upgrades it): the data
/// directory's own lock is inside the directory an upgrade renames, so this one, beside it, is
/// what keeps another command from using a cluster mid-swap, and recovery from undoing a swap
/// that is running.
pub struct Guard {
    _lock: nix::fcntl::Flock<std::fs::File>,
}

/// Take the guard of `data_dir` (none while its parent does not exist: no upgrade can be
/// running there), waiting up to `wait` for another command opening (or upgrading) it.
pub async fn guard(data_dir: &Path, wait: Duration) -> Result<Option<Guard>, PostgresError> {
    if !parent(data_dir).is_dir() {
        return Ok(None);
    }
    let deadline = std::time::Instant::now() + wait;
    let mut said = false;
    loop {
        if let Some(l) = lock(data_dir)? {
            return Ok(Some(Guard { _lock: l }));
        }
        if std::time::Instant::now() >= deadline {
            return Err(PostgresError::Busy {
                data_dir: data_dir.to_path_buf(),
            });
        }
        if !said {
            tracing::info!(data_dir = %data_dir.display(), "another regobox is opening (or upgrading) the cluster: waiting for it");
            said = true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A `flock` on the data directory's parent directory itself: nothing is created on the
/// volume, and every container sharing it sees the lock.
fn lock(data_dir: &Path) -> Result<Option<nix::fcntl::Flock<std::fs::File>>, PostgresError> {
    let path = parent(data_dir);
    let file = std::fs::File::open(&path).map_err(io(&path))?;
    match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
        Ok(l) => Ok(Some(l)),
        Err((_, nix::Error::EWOULDBLOCK)) => Ok(None),
        Err((_, e)) => Err(PostgresError::Io {
            path,
            source: e.into(),
        }),
    }
}

/// Undo a swap that a kill interrupted (the old cluster is back), or finish one that
/// committed. Called before the data directory is looked at, by every command that uses it;
/// an upgrade running in another process is left alone.
pub fn recover(data_dir: &Path) -> Result<(), PostgresError> {
    if !parent(data_dir).is_dir() {
        return Ok(());
    }
    match lock(data_dir)? {
        Some(_lock) => recover_guarded(data_dir),
        None => Ok(()),
    }
}

/// [`recover`], the [`Guard`] held.
pub fn recover_guarded(data_dir: &Path) -> Result<(), PostgresError> {
    let dir = parent(data_dir);
    // Temporary files of a state or journal write that did not complete (ENOSPC, a kill):
    // never read, only replaced.
    for tmp in [format!("{JOURNAL}.tmp"), format!("{STATE}.tmp")] {
        let _ = std::fs::remove_file(dir.join(tmp));
    }
    let anything = [
        dir.join(JOURNAL),
        dir.join(STATE),
        staged_dir(data_dir),
        work_dir(data_dir),
        pristine_dir(data_dir),
        copying_dir(data_dir),
    ]
    .iter()
    .any(|p| std::fs::symlink_metadata(p).is_ok())
        || !finishing_dirs(data_dir).is_empty()
        || control_set_aside(data_dir);
    if !anything {
        return Ok(());
    }
    // pg_upgrade's servers (on the old cluster and the new one) outlive a regobox killed
    // mid-upgrade: stopped before anything is moved under them. A server that a running
    // regobox owns is left alone (it holds the data directory's lock).
    if staged_dir(data_dir).exists() || work_dir(data_dir).exists() {
        cluster::kill_server_in(&staged_dir(data_dir));
        if !cluster::is_locked(data_dir) {
            cluster::kill_server_in(data_dir);
        }
    }
    match crate::backup::journal::recover_named(&dir, JOURNAL) {
        Ok(Some(what)) => {
            tracing::warn!(data_dir = %data_dir.display(), "PostgreSQL upgrade: {what}");
        }
        Ok(None) => {}
        Err(e) => {
            return Err(PostgresError::Io {
                path: dir,
                source: e,
            });
        }
    }
    // An upgrade that did not reach its swap ran the old cluster's server (which writes):
    // its untouched copy goes back in place, so that the cluster is byte for byte as it was.
    let put_back = |copy: &Path| -> Result<(), PostgresError> {
        tracing::warn!(data_dir = %data_dir.display(), copy = %copy.display(), "an upgrade was interrupted before its swap: putting back the copy of the old cluster taken before it was touched");
        crate::backup::journal::swap_named(
            &dir,
            JOURNAL,
            &format!("putback-{}", now()),
            &[(data_dir.to_path_buf(), copy.to_path_buf())],
            Keep {
                old: false,
                staged: true,
            },
            &fault,
        )
        .map(|_| ())
        .map_err(io(data_dir))
    };
    let live_major = match cluster::inspect(data_dir)? {
        cluster::DataDirState::Cluster(m) => Some(m),
        _ => None,
    };
    // The copy is complete under either name (it gets the first only once made).
    let state = State::read(data_dir)?;
    let from = state.as_ref().and_then(|st| Major::parse(&st.from));
    let interrupted = match &state {
        Some(st) if st.status == Status::Done => !st.new_started && live_major == from,
        // No upgrade under way had written its state yet, or a rollback did not complete (its
        // state is written before its swap), or the last one was rolled back.
        _ => live_major.is_some(),
    };
    let mut suspect = Vec::new();
    // The untouched copy exists only until the upgrade renames it to what it keeps: wherever it
    // is, putting it back is right.
    if interrupted || pristine_dir(data_dir).exists() {
        // The untouched copy of the live cluster (the same system), or the cluster the upgrade
        // kept (of the major it upgraded from). Anything else under those names is not put in
        // place of the live cluster, nor removed: it is named for a person to check.
        let live_system = live_major.and_then(|m| whole_cluster(data_dir, m).ok());
        let candidates = [
            live_major.map(|m| (pristine_dir(data_dir), m, live_system)),
            // Kept by a copy-mode upgrade that did not reach its swap, or by an upgrade whose
            // rollback did not complete (the live cluster is the new one).
            state
                .as_ref()
                .zip(from)
                .filter(|_| interrupted)
                .filter(|(st, f)| st.status == Status::Done || live_major != Some(*f))
                .map(|(st, f)| {
                    let same = (live_major == Some(f)).then_some(live_system).flatten();
                    (st.old_dir.clone(), f, same)
                }),
        ];
        for (copy, major, system) in candidates.into_iter().flatten() {
            if std::fs::symlink_metadata(&copy).is_err() {
                continue;
            }
            match whole_cluster(&copy, major) {
                Ok(id) if system.is_none_or(|s| s == id) => {
                    put_back(&copy)?;
                    break;
                }
                Ok(_) => suspect.push((copy, "a cluster of another system".to_string())),
                Err(why) => suspect.push((copy, why)),
            }
        }
        if interrupted && state.as_ref().is_some_and(|st| st.status == Status::Done) {
            State::remove(data_dir)?;
        }
    }
    for (copy, why) in &suspect {
        tracing::warn!(data_dir = %data_dir.display(), path = %copy.display(), why, "not put back in place of the cluster, nor removed: it is not the copy an upgrade made of it; check it by hand");
    }
    restore_control(data_dir)?;
    // What an interrupted upgrade left: the new cluster, pg_upgrade's work directory, a copy
    // not completed.
    let mut leftovers = vec![
        staged_dir(data_dir),
        work_dir(data_dir),
        pristine_dir(data_dir),
        copying_dir(data_dir),
    ];
    leftovers.extend(finishing_dirs(data_dir));
    for leftover in leftovers {
        if suspect.iter().any(|(p, _)| *p == leftover) {
            continue;
        }
        if leftover.exists() {
            tracing::warn!(path = %leftover.display(), "removing what an interrupted upgrade left");
            std::fs::remove_dir_all(&leftover).map_err(io(&leftover))?;
        }
    }
    Ok(())
}

/// pg_upgrade `--link` renames the old cluster's `global/pg_control` to `pg_control.old`, so
/// that no server starts it while the new cluster shares its files. Where the old cluster is
/// back in `data_dir` before the new one ever ran (a linked upgrade that failed or was
/// interrupted before its swap, or a rollback), it is whole: its control file is put back.
fn control_set_aside(data_dir: &Path) -> bool {
    let global = data_dir.join("global");
    global.join("pg_control.old").is_file()
        && std::fs::symlink_metadata(global.join("pg_control")).is_err()
}

fn restore_control(data_dir: &Path) -> Result<(), PostgresError> {
    let global = data_dir.join("global");
    let (control, renamed) = (global.join("pg_control"), global.join("pg_control.old"));
    if control_set_aside(data_dir) {
        tracing::warn!(data_dir = %data_dir.display(), "putting back the control file a linked upgrade set aside: the new cluster never ran, the old one is whole");
        std::fs::rename(&renamed, &control).map_err(io(&control))?;
        crate::volumes::sync_dir(&global).map_err(io(&global))?;
    }
    Ok(())
}

fn name_of(data_dir: &Path) -> String {
    data_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "pgdata".into())
}

/// Where `--finish` moves the kept old cluster to remove it.
fn finishing_dir(data_dir: &Path, at: u64) -> PathBuf {
    parent(data_dir).join(format!(
        ".regobox-upgrade-finishing-{}-{at}",
        name_of(data_dir)
    ))
}

/// What `--finish` left to remove (a kill interrupted it), by the names it gives.
fn finishing_dirs(data_dir: &Path) -> Vec<PathBuf> {
    let prefix = format!(".regobox-upgrade-finishing-{}-", name_of(data_dir));
    std::fs::read_dir(parent(data_dir))
        .map(|rd| {
            rd.flatten()
                .filter(|e| {
                    e.file_name().to_str().is_some_and(|n| {
                        n.strip_prefix(&prefix)
                            .is_some_and(|t| !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()))
                    })
                })
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default()
}

fn staged_dir(data_dir: &Path) -> PathBuf {
    parent(data_dir).join(format!(".regobox-upgrade-{}", name_of(data_dir)))
}

/// The copy of the old cluster taken before anything touched it: what is kept, and what a
/// rollback puts back, byte for byte (pg_upgrade starts the old server, which writes).
fn pristine_dir(data_dir: &Path) -> PathBuf {
    parent(data_dir).join(format!(".regobox-upgrade-old-{}", name_of(data_dir)))
}

/// Where that copy is made; renamed to [`pristine_dir`] once complete.
fn copying_dir(data_dir: &Path) -> PathBuf {
    parent(data_dir).join(format!(".regobox-upgrade-copying-{}", name_of(data_dir)))
}

fn work_dir(data_dir: &Path) -> PathBuf {
    parent(data_dir).join(format!(".regobox-upgrade-work-{}", name_of(data_dir)))
}

/// What the new cluster must share with the old one for pg_upgrade.
#[derive(Debug)]
struct Facts {
    superuser: String,
    encoding: String,
    collate: String,
    ctype: String,
    checksums: bool,
}

async fn facts(old: &Binaries, data_dir: &Path, account: &Account) -> Result<Facts, PostgresError> {
    let text = cluster::single_user_value(
        old,
        data_dir,
        account,
        "template1",
        "SELECT a.rolname || chr(10) || pg_catalog.pg_encoding_to_char(d.encoding) || chr(10) || d.datcollate || chr(10) || d.datctype \
         FROM pg_catalog.pg_authid a, pg_catalog.pg_database d WHERE a.oid = 10 AND d.datname = 'template0'",
    )
    .await?;
    let mut parts = text.split('\n');
    let mut next = || parts.next().unwrap_or_default().to_string();
    let (superuser, encoding, collate, ctype) = (next(), next(), next(), next());
    let control = controldata(old, data_dir).await?;
    let checksums = control
        .lines()
        .find_map(|l| l.strip_prefix("Data page checksum version:"))
        .is_some_and(|v| v.trim() != "0");
    Ok(Facts {
        superuser,
        encoding,
        collate,
        ctype,
        checksums,
    })
}

async fn controldata(binaries: &Binaries, dir: &Path) -> Result<String, PostgresError> {
    let mut command = std::process::Command::new(binaries.path("pg_controldata"));
    command.arg(dir).env("LC_ALL", "C");
    let out = crate::process::output(&mut command)
        .await
        .map_err(io(&binaries.path("pg_controldata")))?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The bytes under `dir`.
fn size_of(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(p) = stack.pop() {
        let Ok(meta) = std::fs::symlink_metadata(&p) else {
            continue;
        };
        total += meta.blocks() * 512;
        if meta.is_dir() {
            if let Ok(entries) = std::fs::read_dir(&p) {
                stack.extend(entries.flatten().map(|e| e.path()));
            }
        }
    }
    total
}

fn free_bytes(dir: &Path) -> Result<u64, PostgresError> {
    let stat = nix::sys::statvfs::statvfs(dir).map_err(|e| PostgresError::Io {
        path: dir.to_path_buf(),
        source: e.into(),
    })?;
    Ok(stat.blocks_available() as u64 * stat.fragment_size() as u64)
}

/// Whether the file system of `dir` clones files (reflinks: btrfs, XFS, ...): tried on two
/// scratch files.
fn can_clone(dir: &Path) -> bool {
    use std::os::fd::AsRawFd;
    let src = dir.join(".regobox-clone-test-src");
    let dst = dir.join(".regobox-clone-test-dst");
    let result = (|| -> std::io::Result<bool> {
        std::fs::write(&src, [0u8; 4096])?;
        let from = std::fs::File::open(&src)?;
        let to = std::fs::File::create(&dst)?;
        // FICLONE = _IOW(0x94, 9, int)
        const FICLONE: libc::c_ulong = 0x4004_9409;
        // SAFETY: both descriptors are open for the duration of the call; FICLONE reads the
        // source descriptor number passed by value and changes nothing else.
        let rc = unsafe { libc::ioctl(to.as_raw_fd(), FICLONE as _, from.as_raw_fd()) };
        Ok(rc == 0)
    })();
    let _ = std::fs::remove_file(&src);
    let _ = std::fs::remove_file(&dst);
    result.unwrap_or(false)
}

/// Copy `from` to `to` (absent) with everything: owners, modes, times; cloned where the file
/// system can.
async fn copy_tree(from: &Path, to: &Path) -> Result<(), PostgresError> {
    let mut cp = std::process::Command::new("cp");
    cp.args(["-a", "--reflink=auto"]).arg(from).arg(to);
    let out = crate::process::output(&mut cp).await.map_err(io(to))?;
    if !out.status.success() {
        return Err(PostgresError::Io {
            path: to.to_path_buf(),
            source: std::io::Error::other(String::from_utf8_lossy(&out.stderr).trim().to_string()),
        });
    }
    Ok(())
}

/// Why an upgrade is refused, before anything changed.
fn refused_rollback(data_dir: &Path, reason: String) -> PostgresError {
    PostgresError::RollbackRefused {
        data_dir: data_dir.to_path_buf(),
        reason,
    }
}

/// Whether `dir` is a whole cluster of `major` (its version file says so, its control file is
/// there, under its own name or the one a linked upgrade gives it), and the identifier of the
/// system it belongs to (the first 8 bytes of the control file).
fn whole_cluster(dir: &Path, major: Major) -> Result<u64, String> {
    let meta = std::fs::symlink_metadata(dir).map_err(|e| format!("{e}"))?;
    if !meta.is_dir() {
        return Err("not a directory".into());
    }
    let version =
        std::fs::read_to_string(dir.join("PG_VERSION")).map_err(|e| format!("PG_VERSION: {e}"))?;
    if Major::parse(version.trim()) != Some(major) {
        return Err(format!("PG_VERSION says {}", version.trim()));
    }
    let global = dir.join("global");
    let control = [global.join("pg_control"), global.join("pg_control.old")]
        .into_iter()
        .find_map(|p| std::fs::read(p).ok())
        .ok_or("no control file")?;
    let id: [u8; 8] = control
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .ok_or("a control file too short")?;
    if !global.join("pg_filenode.map").is_file() || !dir.join("base").is_dir() {
        return Err("global/pg_filenode.map or base/ is missing".into());
    }
    Ok(u64::from_ne_bytes(id))
}

fn refused(data_dir: &Path, reason: String) -> PostgresError {
    PostgresError::UpgradeRefused {
        data_dir: data_dir.to_path_buf(),
        reason,
    }
}

/// What can be checked of an upgrade from `from` to `new` without changing anything (before
/// the data directory is locked or handed over): the old major's binaries, the new ones'
/// pg_upgrade, a cluster a server can start on, nothing of it outside the data directory.
/// Returns the old binaries.
pub async fn preflight(
    config: &Config,
    from: Major,
    new: &Binaries,
) -> Result<Binaries, PostgresError> {
    let pg = &config.postgres;
    let data_dir = &pg.data_dir;
    let old = Binaries::of_major(&pg.old_bin_dirs, from).await.ok_or_else(|| {
        refused(
            data_dir,
            format!(
                "no PostgreSQL {from} server binaries to upgrade from (looked in postgres.old_bin_dirs and /usr/lib/postgresql/{from}/bin): build the image with PG_UPGRADE_FROM={from}, or set postgres.old_bin_dirs to a directory holding them"
            ),
        )
    })?;
    for program in ["pg_upgrade", "pg_controldata"] {
        if !new.path(program).is_file() {
            return Err(refused(
                data_dir,
                format!("no {program} in {}", new.dir.display()),
            ));
        }
    }
    cluster::check_adoptable(&old, data_dir).await?;
    // What lives outside the data directory would be shared by the kept copy and the live
    // cluster: the copy would no longer be what a rollback can trust.
    let wal = data_dir.join(if from.0 >= 10 { "pg_wal" } else { "pg_xlog" });
    if std::fs::symlink_metadata(&wal).is_ok_and(|m| m.file_type().is_symlink()) {
        return Err(refused(
            data_dir,
            format!(
                "{} is a symbolic link (WAL outside the data directory): regobox upgrades only self-contained clusters; upgrade by backup and restore",
                wal.display()
            ),
        ));
    }
    let tablespaces = std::fs::read_dir(data_dir.join("pg_tblspc"))
        .map(|d| d.count())
        .unwrap_or(0);
    if tablespaces > 0 {
        return Err(refused(
            data_dir,
            format!(
                "it has {tablespaces} tablespace(s) outside the data directory: regobox upgrades only self-contained clusters; upgrade by backup and restore"
            ),
        ));
    }
    Ok(old)
}

/// Upgrade the cluster at `postgres.data_dir` (of major `from`, [`preflight`] passed, regobox
/// holding its [`Guard`] and its lock, no server on it) to `new`'s major. On an error before the swap, the old cluster is as it was
/// and what was made for the upgrade is removed.
pub async fn upgrade(
    config: &Config,
    account: &Account,
    from: Major,
    old: &Binaries,
    new: &Binaries,
    request: Option<&Request>,
) -> Result<State, PostgresError> {
    let pg = &config.postgres;
    let data_dir = &pg.data_dir;
    let backup = request.and_then(|r| r.backup.clone());
    if pg.upgrade_method == UpgradeMethod::Link && backup.is_none() {
        return Err(refused(
            data_dir,
            "postgres.upgrade_method = \"link\" needs a backup archive of the cluster first: run `regobox upgrade`, which takes it".into(),
        ));
    }
    // The cluster an earlier upgrade kept is of a major older still: this one replaces it,
    // finished as `--finish` does (out of a rollback's reach, its state removed, then removed),
    // so that no state names a half-removed cluster, nor hides this upgrade's copy from the
    // recovery of an interruption.
    if let Some(earlier) = State::read(data_dir)? {
        if earlier.status == Status::Done {
            tracing::warn!(old = %earlier.old_dir.display(), from = %earlier.from, "removing the cluster an earlier upgrade kept");
            finish(data_dir)?;
        }
    }
    let staged = staged_dir(data_dir);
    let work = work_dir(data_dir);
    let made = Made {
        staged: staged.clone(),
        work: work.clone(),
        pristine: pristine_dir(data_dir),
        copying: copying_dir(data_dir),
    };
    let result = prepare_and_run(config, account, from, old, new, &made).await;
    let method = match result {
        Ok(m) => m,
        Err(e) => {
            // Reading the old cluster (its server started) wrote to it: the copy taken before
            // goes back in its place, so that a refused upgrade leaves it byte for byte.
            if made.pristine.is_dir() {
                crate::backup::journal::swap_named(
                    &parent(data_dir),
                    JOURNAL,
                    &format!("pg{from}-refused-{}", now()),
                    &[(data_dir.clone(), made.pristine.clone())],
                    Keep {
                        old: false,
                        staged: true,
                    },
                    &fault,
                )
                .map_err(io(data_dir))?;
            }
            // The control file first: once what the upgrade made is gone, nothing would tell
            // the next start that a linked upgrade had set it aside.
            restore_control(data_dir)?;
            made.remove();
            return Err(e);
        }
    };
    fault("upgrade:upgraded");
    let linked = method == "link";

    // What is kept is the copy taken before anything touched the old cluster. The state is
    // written first: a kill before the swap commits leaves it naming an old cluster that the
    // live one still is, which the next start recognises ([`recover`]) and undoes.
    let id = now();
    let state_dir = parent(data_dir);
    // A linked upgrade keeps the old cluster itself (its files shared with the new one, its
    // control file renamed by pg_upgrade so no server starts it) where its swap sets it aside.
    let old_name = if linked {
        format!(".{}.old-pg{from}-{id}", name_of(data_dir))
    } else {
        format!(".{}.pg{from}-{id}", name_of(data_dir))
    };
    let state = State {
        from: from.to_string(),
        to: new.major.to_string(),
        old_dir: state_dir.join(old_name),
        method: method.into(),
        at: id,
        status: Status::Done,
        new_started: false,
        backup,
    };
    state.write(data_dir)?;
    fault("upgrade:state");
    if !linked {
        std::fs::rename(&made.pristine, &state.old_dir).map_err(io(&state.old_dir))?;
        crate::volumes::sync_dir(&state_dir).map_err(io(&state_dir))?;
    }
    fault("upgrade:kept");
    // The swap: the new cluster in, the one pg_upgrade read removed once committed. A kill
    // before the commit leaves a journal the next start rolls back.
    crate::backup::journal::swap_named(
        &state_dir,
        JOURNAL,
        &format!("pg{from}-{id}"),
        &[(data_dir.clone(), staged.clone())],
        Keep {
            old: linked,
            staged: false,
        },
        &fault,
    )
    .map_err(io(data_dir))?;
    made.remove();
    tracing::warn!(
        data_dir = %data_dir.display(),
        from = %from,
        to = %new.major,
        old = %state.old_dir.display(),
        keep = %humantime::format_duration(pg.upgrade_keep_old),
        "PostgreSQL upgraded; the old cluster is kept: `regobox upgrade --finish` removes it, `regobox upgrade --rollback` puts it back"
    );
    Ok(state)
}

/// What an upgrade makes besides the new cluster's place: removed when it fails.
struct Made {
    staged: PathBuf,
    work: PathBuf,
    pristine: PathBuf,
    copying: PathBuf,
}

impl Made {
    fn remove(&self) {
        for p in [&self.staged, &self.work, &self.pristine, &self.copying] {
            if p.exists() {
                if let Err(e) = std::fs::remove_dir_all(p) {
                    tracing::warn!(path = %p.display(), error = %e, "cannot remove");
                }
            }
        }
    }
}

async fn prepare_and_run(
    config: &Config,
    account: &Account,
    from: Major,
    old: &Binaries,
    new: &Binaries,
    made: &Made,
) -> Result<&'static str, PostgresError> {
    let pg = &config.postgres;
    let data_dir = &pg.data_dir;
    let beside = parent(data_dir);
    let clones = can_clone(&beside);
    let method = match (pg.upgrade_method, clones) {
        (UpgradeMethod::Clone, false) => {
            return Err(refused(
                data_dir,
                format!(
                    "postgres.upgrade_method = \"clone\" and the file system of {} cannot clone files",
                    beside.display()
                ),
            ));
        }
        (UpgradeMethod::Link, _) => "link",
        (UpgradeMethod::Clone | UpgradeMethod::Auto, true) => "clone",
        _ => "copy",
    };
    // Space: a copy keeps the old cluster as it was (what a rollback puts back), and the new
    // cluster is another; cloned files take none until written, linked ones none at all.
    let size = size_of(data_dir);
    let need = if method == "copy" {
        2 * size + (64 << 20)
    } else {
        64 << 20
    };
    let free = free_bytes(&beside)?;
    if free < need {
        return Err(refused(
            data_dir,
            format!(
                "the upgrade needs {} MiB free beside the cluster ({} MiB: a copy of it kept for a rollback, and the new cluster; the file system cannot clone files) and {} MiB are: free space, or upgrade by backup and restore",
                need >> 20,
                size >> 20,
                free >> 20
            ),
        ));
    }
    if method != "link" {
        copy_tree(data_dir, &made.copying).await?;
        std::fs::rename(&made.copying, &made.pristine).map_err(io(&made.pristine))?;
        crate::volumes::sync_dir(&beside).map_err(io(&beside))?;
    }
    fault("upgrade:copied");
    let facts = facts(old, data_dir, account).await?;
    if Record::read(data_dir)?.is_none() {
        tracing::info!(
            data_dir = %data_dir.display(),
            superuser = %facts.superuser,
            "adopting a cluster regobox has no record of, by upgrading it: managed as its superuser, by the OS account over the Unix socket (no password); password authentication accepts md5 passwords as well as SCRAM"
        );
    }
    tracing::info!(
        from = %from,
        to = %new.major,
        superuser = %facts.superuser,
        encoding = %facts.encoding,
        collate = %facts.collate,
        checksums = facts.checksums,
        "upgrading the PostgreSQL cluster with pg_upgrade: preflight"
    );
    missing_extensions(old, new, data_dir, account).await?;
    for dir in [&made.staged, &made.work] {
        if dir.exists() {
            std::fs::remove_dir_all(dir).map_err(io(dir))?;
        }
        crate::volumes::ensure_dir(dir, 0o700, "postgres.data_dir")?;
        cluster::chown(dir, account)?;
    }
    // The new cluster, as the old one: superuser, encoding, locale, checksums.
    let mut initdb = std::process::Command::new(new.path("initdb"));
    initdb
        .arg("-D")
        .arg(&made.staged)
        .args(["-U", &facts.superuser])
        .args(["-E", &facts.encoding])
        .arg(format!("--lc-collate={}", facts.collate))
        .arg(format!("--lc-ctype={}", facts.ctype))
        .args(["--auth=peer", "--no-instructions"])
        .current_dir(&made.work);
    if facts.checksums {
        initdb.arg("--data-checksums");
    } else if new.major >= Major(18, 0) {
        // initdb enables them by default from 18 on; pg_upgrade needs the old cluster's setting.
        initdb.arg("--no-data-checksums");
    }
    account.apply(&mut initdb);
    crate::process::die_with_parent(&mut initdb);
    let out = crate::process::output(&mut initdb)
        .await
        .map_err(io(&new.path("initdb")))?;
    if !out.status.success() {
        return Err(refused(
            data_dir,
            format!(
                "initdb of the new cluster failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        ));
    }
    // pg_upgrade connects to both servers over a socket in the work directory, as the
    // superuser, authenticated by its OS account.
    let auth = super::write_hba(&made.work, account, "md5", "", &facts.superuser)?;
    let server_opts = format!(
        "-c hba_file={} -c ident_file={}",
        auth.hba.display(),
        auth.ident.display()
    );
    let pg_upgrade = |extra: &[&str]| {
        let mut c = std::process::Command::new(new.path("pg_upgrade"));
        c.arg("-b")
            .arg(&old.dir)
            .arg("-B")
            .arg(&new.dir)
            .arg("-d")
            .arg(data_dir)
            .arg("-D")
            .arg(&made.staged)
            .args(["-U", &facts.superuser])
            .arg("-s")
            .arg(&made.work)
            .args(["-o", &server_opts, "-O", &server_opts])
            .args(extra)
            .env("LC_ALL", "C")
            .current_dir(&made.work);
        account.apply(&mut c);
        // Killed with regobox (its servers, started through pg_ctl, are not its children: the
        // next start's recovery kills one left on either cluster).
        crate::process::die_with_parent(&mut c);
        c
    };
    let run = |mut c: std::process::Command| async move {
        crate::process::output(&mut c)
            .await
            .map_err(|e| PostgresError::Io {
                path: new.path("pg_upgrade"),
                source: e,
            })
    };
    let flag: &[&str] = match method {
        "clone" => &["--clone"],
        "link" => &["--link"],
        _ => &[],
    };
    let check: Vec<&str> = [&["--check"][..], flag].concat();
    let out = run(pg_upgrade(&check)).await?;
    if !out.status.success() {
        return Err(refused(
            data_dir,
            format!(
                "pg_upgrade --check refused it:\n{}",
                with_named_files(
                    &tail(&String::from_utf8_lossy(&out.stdout), 25),
                    &[&made.work, &made.staged]
                )
            ),
        ));
    }
    let reason = match method {
        "clone" => {
            "the file system can clone files: no extra space, nothing of the old cluster written"
        }
        "link" => {
            "postgres.upgrade_method = link: the new cluster hard-links the old one's files; once the new server has run, a rollback is a restore of the archive taken before"
        }
        _ => {
            "the file system cannot clone files (or postgres.upgrade_method = copy): the old cluster's files are copied"
        }
    };
    tracing::info!(method, reason, "pg_upgrade --check passed; upgrading");
    fault("upgrade:checked");
    let out = run(pg_upgrade(flag)).await?;
    if !out.status.success() {
        return Err(PostgresError::UpgradeFailed {
            data_dir: data_dir.clone(),
            reason: with_named_files(
                &tail(&String::from_utf8_lossy(&out.stdout), 25),
                &[&made.work, &made.staged],
            ),
        });
    }
    carry_config(data_dir, &made.staged, new, account).await?;
    let mut record = Record::read(data_dir)?.unwrap_or(Record {
        superuser: facts.superuser.clone(),
        adopted: true,
        statistics_pending: false,
    });
    record.statistics_pending = true;
    record.write(&made.staged, account)?;
    Ok(method)
}

/// Refuse an upgrade that would leave an extension of the old cluster without its files in the
/// new installation (pg_upgrade checks C libraries only, not SQL-only extensions).
async fn missing_extensions(
    old: &Binaries,
    new: &Binaries,
    data_dir: &Path,
    account: &Account,
) -> Result<(), PostgresError> {
    let mut pg_config = std::process::Command::new(new.path("pg_config"));
    pg_config.arg("--sharedir");
    let share = match crate::process::output(&mut pg_config).await {
        Ok(out) if out.status.success() => {
            PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
        }
        _ => {
            return Err(refused(
                data_dir,
                format!(
                    "cannot tell which extensions the new installation has: no working pg_config in {}",
                    new.dir.display()
                ),
            ));
        }
    };
    let databases = cluster::single_user_value(
        old,
        data_dir,
        account,
        "template1",
        "SELECT string_agg(datname, chr(10)) FROM pg_catalog.pg_database WHERE datallowconn",
    )
    .await?;
    let mut missing = Vec::new();
    for db in databases.lines().filter(|d| !d.is_empty()) {
        let extensions = cluster::single_user_value(
            old,
            data_dir,
            account,
            db,
            "SELECT string_agg(extname, chr(10)) FROM pg_catalog.pg_extension",
        )
        .await?;
        for ext in extensions.lines().filter(|e| !e.is_empty()) {
            if !share
                .join("extension")
                .join(format!("{ext}.control"))
                .is_file()
            {
                missing.push(format!("{ext} (database {db})"));
            }
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    Err(refused(
        data_dir,
        format!(
            "extensions of the old cluster are not installed for PostgreSQL {} ({}): {}. Install them in the image (e.g. the postgresql-{}-<extension> package) or drop them first",
            new.major,
            share.join("extension").display(),
            missing.join(", "),
            new.major
        ),
    ))
}

/// Carry the old cluster's configuration files into the new one, if the new server reads them.
async fn carry_config(
    old_dir: &Path,
    new_dir: &Path,
    new: &Binaries,
    account: &Account,
) -> Result<(), PostgresError> {
    const FILES: &[&str] = &[
        "postgresql.conf",
        "postgresql.auto.conf",
        "pg_hba.conf",
        "pg_ident.conf",
    ];
    let mut saved = Vec::new();
    for name in FILES {
        let from = old_dir.join(name);
        let to = new_dir.join(name);
        if !from.is_file() {
            continue;
        }
        let fresh = std::fs::read(&to).ok();
        saved.push((to.clone(), fresh));
        std::fs::copy(&from, &to).map_err(io(&to))?;
        cluster::chown(&to, account)?;
    }
    let mut check = std::process::Command::new(new.path("postgres"));
    check
        .arg("-D")
        .arg(new_dir)
        .args(["-C", "max_connections"])
        .current_dir(new_dir);
    account.apply(&mut check);
    let out = crate::process::output(&mut check)
        .await
        .map_err(io(&new.path("postgres")))?;
    if !out.status.success() {
        for (path, fresh) in saved {
            match fresh {
                Some(bytes) => std::fs::write(&path, bytes).map_err(io(&path))?,
                None => std::fs::remove_file(&path).map_err(io(&path))?,
            }
        }
        tracing::warn!(
            error = %String::from_utf8_lossy(&out.stderr).trim(),
            "the old cluster's postgresql.conf does not suit the new major: the new cluster starts with the defaults (the old files stay in the old cluster)"
        );
    }
    Ok(())
}

/// pg_upgrade's report names files of its work directory or of the new cluster (the list of
/// what it refused, its logs), which are removed with the refused upgrade: their content (the first lines of each) is
/// put in the message instead.
fn with_named_files(report: &str, work: &[&Path]) -> String {
    let mut out = report.to_string();
    let mut seen = Vec::new();
    for word in report.split_whitespace() {
        let path = Path::new(word.trim_matches(|c| c == '"' || c == '\''));
        if !work.iter().any(|w| path.starts_with(w)) || seen.contains(&path) {
            continue;
        }
        seen.push(path);
        if let Ok(text) = std::fs::read_to_string(path) {
            let lines: Vec<&str> = text.lines().collect();
            let shown = lines.len().min(20);
            out.push_str(&format!(
                "\n{} (removed with the refused upgrade){}:\n{}",
                path.file_name().unwrap_or_default().to_string_lossy(),
                if shown < lines.len() {
                    format!(", first {shown} of {} lines", lines.len())
                } else {
                    String::new()
                },
                lines[..shown].join("\n")
            ));
        }
    }
    out
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Mark that a server is about to run on the new cluster (a rollback then loses its writes).
pub fn mark_started(data_dir: &Path) -> Result<(), PostgresError> {
    if let Some(mut state) = State::read(data_dir)? {
        if state.status == Status::Done && !state.new_started {
            state.new_started = true;
            state.write(data_dir)?;
        }
    }
    Ok(())
}

/// The planner statistics of an upgraded cluster (pg_upgrade does not carry them): `vacuumdb
/// --all --analyze-in-stages` against its running server, as its superuser over the Unix
/// socket, minimal statistics for every database first, then better ones, each step logged.
/// Once it succeeds the cluster's record says so; a run that is interrupted (the server
/// stopped) is done again by the next server.
pub struct Statistics {
    pub vacuumdb: PathBuf,
    pub data_dir: PathBuf,
    pub socket_dir: PathBuf,
    pub port: u16,
    pub record: Record,
    pub account: Account,
}

impl Statistics {
    pub async fn run(mut self) -> Result<(), PostgresError> {
        use tokio::io::AsyncBufReadExt;
        tracing::info!(
            "gathering the planner's statistics after the upgrade (vacuumdb --analyze-in-stages); the application can work meanwhile, with slower queries until it ends"
        );
        let started = std::time::Instant::now();
        let mut command = std::process::Command::new(&self.vacuumdb);
        command
            .args(["--all", "--analyze-in-stages", "-h"])
            .arg(&self.socket_dir)
            .args(["-p", &self.port.to_string(), "-U", &self.record.superuser])
            .env_remove("PGPASSWORD")
            .env_remove("PGSERVICE")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .current_dir(&self.socket_dir);
        self.account.apply(&mut command);
        let mut child = crate::process::spawn(&mut command).map_err(io(&self.vacuumdb))?;
        let pipe = |p: Option<std::os::fd::OwnedFd>| {
            p.and_then(|p| crate::process::async_pipe(p).ok())
                .map(|r| tokio::io::BufReader::new(r).lines())
        };
        let mut out = pipe(child.stdout.take().map(Into::into));
        let mut err = pipe(child.stderr.take().map(Into::into));
        let mut errors = Vec::new();
        while out.is_some() || err.is_some() {
            tokio::select! {
                line = async { out.as_mut().unwrap().next_line().await }, if out.is_some() => {
                    match line {
                        Ok(Some(l)) => tracing::info!(progress = %l.trim_start_matches("vacuumdb: "), "gathering the planner's statistics"),
                        _ => out = None,
                    }
                }
                line = async { err.as_mut().unwrap().next_line().await }, if err.is_some() => {
                    match line {
                        Ok(Some(l)) => errors.push(l),
                        _ => err = None,
                    }
                }
            }
        }
        let status = child.wait().await;
        if !status.success() {
            return Err(PostgresError::Io {
                path: self.vacuumdb.clone(),
                source: std::io::Error::other(format!(
                    "vacuumdb --analyze-in-stages failed ({status}): {}",
                    errors.join("; ")
                )),
            });
        }
        self.record.statistics_pending = false;
        self.record.write(&self.data_dir, &self.account)?;
        tracing::info!(
            seconds = started.elapsed().as_secs_f64(),
            "the planner's statistics gathered after the upgrade"
        );
        Ok(())
    }
}

/// Remove the old cluster once `keep` has passed since the upgrade.
pub fn expire(data_dir: &Path, keep: Duration) -> Result<(), PostgresError> {
    if let Some(state) = State::read(data_dir)? {
        if state.status == Status::Done && now().saturating_sub(state.at) >= keep.as_secs() {
            tracing::info!(old = %state.old_dir.display(), "the upgrade's old cluster has been kept for postgres.upgrade_keep_old: removing it");
            finish(data_dir)?;
        }
    }
    Ok(())
}

/// `regobox upgrade --finish`: remove the old cluster.
pub fn finish(data_dir: &Path) -> Result<String, PostgresError> {
    let Some(state) = State::read(data_dir)? else {
        return Ok("no upgrade to finish".into());
    };
    if state.status != Status::Done {
        return Ok("the last upgrade was rolled back: nothing to finish".into());
    }
    // Out of the state's reach first: a kill while it is being removed leaves a directory
    // named for removal (which the next start finishes removing), never a half-removed
    // cluster that a rollback would put back.
    let removing = finishing_dir(data_dir, state.at);
    if state.old_dir.exists() {
        std::fs::rename(&state.old_dir, &removing).map_err(io(&state.old_dir))?;
        let dir = parent(data_dir);
        crate::volumes::sync_dir(&dir).map_err(io(&dir))?;
    }
    State::remove(data_dir)?;
    fault("upgrade:finishing");
    if removing.exists() {
        std::fs::remove_dir_all(&removing).map_err(io(&removing))?;
    }
    Ok(format!(
        "removed the PostgreSQL {} cluster kept at {}",
        state.from,
        state.old_dir.display()
    ))
}

/// `regobox upgrade --rollback`: put the old cluster back (regobox holds the data directory's
/// lock, no server runs). After the new server ran, only with `force`: its writes are lost.
pub fn rollback(data_dir: &Path, force: bool) -> Result<String, PostgresError> {
    let Some(mut state) = State::read(data_dir)? else {
        return Err(refused_rollback(
            data_dir,
            "there is no upgrade to roll back".into(),
        ));
    };
    if state.status != Status::Done || !state.old_dir.is_dir() {
        return Err(refused_rollback(
            data_dir,
            format!(
                "the old cluster is not kept (at {}): nothing to roll back to",
                state.old_dir.display()
            ),
        ));
    }
    if state.new_started && state.method == "link" {
        return Err(refused_rollback(
            data_dir,
            format!(
                "the upgrade linked the old cluster's files into the new one, and a server has run on the new one since: the old cluster cannot be put back. Restore the archive taken before the upgrade ({}) with an image of PostgreSQL {} (`regobox restore`)",
                state
                    .backup
                    .as_ref()
                    .map(|b| b.display().to_string())
                    .unwrap_or_else(|| "none was recorded".into()),
                state.from
            ),
        ));
    }
    if state.new_started && !force {
        return Err(refused_rollback(
            data_dir,
            format!(
                "a server has run on the upgraded cluster since the upgrade ({}): everything written to it since would be lost. Take a backup first (`regobox backup`) and run `regobox upgrade --rollback --force` to roll back anyway",
                chrono::DateTime::from_timestamp(state.at as i64, 0)
                    .map(|d| d.to_rfc3339())
                    .unwrap_or_default()
            ),
        ));
    }
    // What is put back must be the cluster the upgrade kept, whole: anything else (a directory
    // an interrupted `--finish` half removed, one put there by hand) is refused, and the live
    // cluster stays.
    let from = Major::parse(&state.from).unwrap_or(Major(0, 0));
    if let Err(why) = whole_cluster(&state.old_dir, from) {
        return Err(refused_rollback(
            data_dir,
            format!(
                "{} is not the PostgreSQL {} cluster the upgrade kept ({why}): check it by hand",
                state.old_dir.display(),
                state.from
            ),
        ));
    }
    // Recorded first: a kill during the swap leaves a state that says rolled back, which the
    // next start completes (the kept cluster put back) rather than forgets.
    state.status = Status::RolledBack;
    state.write(data_dir)?;
    let id = format!("pg{}-rollback-{}", state.to, now());
    crate::backup::journal::swap_named(
        &parent(data_dir),
        JOURNAL,
        &id,
        &[(data_dir.to_path_buf(), state.old_dir.clone())],
        Keep {
            old: false,
            staged: true,
        },
        &fault,
    )
    .map_err(io(data_dir))?;
    restore_control(data_dir)?;
    Ok(format!(
        "the PostgreSQL {} cluster is back in {}; the upgraded one is removed{}. `regobox run` does not upgrade it again on its own: `regobox upgrade` does",
        state.from,
        data_dir.display(),
        if state.new_started {
            " with what was written to it"
        } else {
            ""
        }
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain(e: &PostgresError) -> String {
        format!(
            "{:#}",
            anyhow::anyhow!(e.to_string()).context(format!("{:?}", e))
        )
    }

    fn state_naming(dir: &Path, old_dir: PathBuf) -> PathBuf {
        let data_dir = dir.join("pgdata");
        let state = State {
            from: "13".into(),
            to: "15".into(),
            old_dir,
            method: "copy".into(),
            at: 1,
            status: Status::Done,
            new_started: true,
            backup: None,
        };
        std::fs::write(dir.join(STATE), serde_json::to_vec(&state).unwrap()).unwrap();
        data_dir
    }

    #[test]
    fn a_state_naming_a_directory_regobox_does_not_name_is_not_acted_on() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::create_dir(&victim).unwrap();
        for planted in [
            victim.clone(),
            PathBuf::from("/etc"),
            dir.path().join(".pgdata.pg13-1/../victim"),
            dir.path().join(".pgdata.pg13-"),
            dir.path().join(".pgdata.pg11-5"),
            dir.path().join(".pgdata.old-pg13-"),
            dir.path().join(".pgdata.old-pg11-5"),
            dir.path().join(".pgdata.old-pg13-1/../victim"),
        ] {
            let data_dir = state_naming(dir.path(), planted.clone());
            let err = chain(&finish(&data_dir).unwrap_err());
            assert!(
                err.contains("not a name regobox gives"),
                "{planted:?}: {err}"
            );
            assert!(rollback(&data_dir, true).is_err());
            assert!(recover(&data_dir).is_err());
            assert!(victim.is_dir(), "{planted:?}");
        }
        for named in [".pgdata.pg13-17", ".pgdata.old-pg13-17"] {
            let data_dir = state_naming(dir.path(), dir.path().join(named));
            assert!(State::read(&data_dir).unwrap().is_some(), "{named}");
        }
    }

    #[test]
    fn a_journal_naming_paths_elsewhere_is_not_acted_on() {
        let dir = tempfile::tempdir().unwrap();
        let elsewhere = tempfile::tempdir().unwrap();
        let victim = elsewhere.path().join("victim");
        std::fs::create_dir(&victim).unwrap();
        std::fs::write(
            dir.path().join(JOURNAL),
            serde_json::json!({
                "id": "1",
                "state": "swapping",
                "name": JOURNAL,
                "keep_old": false,
                "swaps": [{
                    "live": dir.path().join("pgdata"),
                    "staged": victim,
                    "old": dir.path().join(".pgdata.old-1"),
                    "had_live": false
                }]
            })
            .to_string(),
        )
        .unwrap();
        let data_dir = dir.path().join("pgdata");
        std::fs::create_dir(&data_dir).unwrap();
        let err = chain(&recover(&data_dir).unwrap_err());
        assert!(err.contains("not beside it"), "{err}");
        assert!(victim.is_dir());
    }

    /// The attacker's journal: every path beside the data directory, but saying the live
    /// directory was not there, which would make the live cluster read as swapped in and be
    /// rolled away and removed.
    #[test]
    fn a_journal_that_would_roll_the_live_cluster_away_is_not_acted_on() {
        let dir = tempfile::tempdir().unwrap();
        let data_dir = dir.path().join("pgdata");
        std::fs::create_dir(&data_dir).unwrap();
        std::fs::write(data_dir.join("PG_VERSION"), "15\n").unwrap();
        std::fs::write(
            dir.path().join(JOURNAL),
            serde_json::json!({
                "id": "1",
                "state": "swapping",
                "name": JOURNAL,
                "keep_old": false,
                "swaps": [{
                    "live": data_dir,
                    "staged": dir.path().join(".regobox-upgrade-pgdata"),
                    "old": dir.path().join(".pgdata.old-1"),
                    "had_live": false
                }]
            })
            .to_string(),
        )
        .unwrap();
        let err = chain(&recover(&data_dir).unwrap_err());
        assert!(err.contains("not written by regobox"), "{err}");
        assert!(data_dir.join("PG_VERSION").is_file());
    }

    /// A linked upgrade that failed after pg_upgrade set the old cluster's control file aside,
    /// and was killed once what it made was removed: nothing else says so, and the next start
    /// still puts the control file back.
    #[test]
    fn a_control_file_set_aside_alone_is_put_back() {
        let dir = tempfile::tempdir().unwrap();
        let data_dir = dir.path().join("pgdata");
        std::fs::create_dir_all(data_dir.join("global")).unwrap();
        std::fs::write(data_dir.join("PG_VERSION"), "13\n").unwrap();
        std::fs::write(data_dir.join("global/pg_control.old"), b"control").unwrap();
        recover(&data_dir).unwrap();
        assert_eq!(
            std::fs::read(data_dir.join("global/pg_control")).unwrap(),
            b"control"
        );
        assert!(!data_dir.join("global/pg_control.old").exists());
    }

    /// Only a whole cluster of the expected major is put anywhere: a half-removed one (an
    /// interrupted `--finish`) or an empty directory is not.
    #[test]
    fn whole_clusters_only() {
        let dir = tempfile::tempdir().unwrap();
        let c = dir.path().join("c");
        assert!(whole_cluster(&c, Major(13, 0)).is_err());
        std::fs::create_dir_all(c.join("global")).unwrap();
        std::fs::create_dir_all(c.join("base")).unwrap();
        std::fs::write(c.join("PG_VERSION"), "13\n").unwrap();
        assert!(whole_cluster(&c, Major(13, 0)).is_err(), "no control file");
        std::fs::write(c.join("global/pg_control.old"), 7u64.to_ne_bytes()).unwrap();
        assert!(whole_cluster(&c, Major(13, 0)).is_err(), "no filenode map");
        std::fs::write(c.join("global/pg_filenode.map"), b"x").unwrap();
        assert_eq!(whole_cluster(&c, Major(13, 0)), Ok(7));
        assert!(whole_cluster(&c, Major(15, 0)).is_err(), "another major");
    }
}

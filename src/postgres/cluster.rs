//! The data directory: what it holds, who may use it, and creating a cluster in it.
//!
//! - [`inspect`] classifies the directory without changing anything: missing or empty (a lone
//!   `lost+found` counts as empty), a cluster of some major, an initialisation that was
//!   interrupted, or foreign content that regobox must not touch.
//! - [`DataDirLock`] is an exclusive `flock` on a file in the data directory, held for as long as
//!   a server regobox started runs on it. It works across containers sharing the volume (same
//!   kernel), which the server's own `postmaster.pid` check does not, and it tells `regobox psql`
//!   whether `regobox run` is up.
//! - [`clear_stale_pid`] removes a `postmaster.pid` left by a crash, only after proving the PID
//!   it records is not a live postgres on this data directory.
//! - [`initdb`] creates a cluster in a subdirectory as the unprivileged user, then moves it into
//!   place with `PG_VERSION` last, so an interrupted initialisation is recognisable.
//! - [`Record`] is what regobox keeps about a cluster in its data directory: the bootstrap
//!   superuser it manages the cluster as, and whether the cluster was adopted (made by someone
//!   else: docker-library's entrypoint, `pg_createcluster`, a plain `initdb`). A cluster without
//!   one has its superuser read once with [`bootstrap_superuser`].

use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};

use super::PostgresError;
use super::binaries::{Binaries, Major};
use crate::users::Account;
use crate::volumes::sync_dir;

/// The lock file regobox keeps in the data directory.
pub const LOCK_FILE: &str = ".regobox.lock";
/// What regobox keeps about a cluster, in its data directory ([`Record`]).
pub const RECORD_FILE: &str = ".regobox-cluster.json";
/// Where `initdb` writes before the cluster is moved into place.
pub const INITDB_DIR: &str = ".regobox-initdb";
/// Entries that do not make a directory non-empty.
const IGNORED: &[&str] = &["lost+found", LOCK_FILE];

/// What a data directory holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DataDirState {
    /// Does not exist.
    Missing,
    /// Exists and holds nothing that matters.
    Empty,
    /// A cluster created by this major.
    Cluster(Major),
    /// regobox's own initialisation was interrupted before completing.
    InterruptedInit,
    /// Something else: the first few entries, for the error message.
    Foreign(Vec<String>),
}

/// Classify `dir` without modifying it.
pub fn inspect(dir: &Path) -> Result<DataDirState, PostgresError> {
    let io_err = |source| PostgresError::Io {
        path: dir.to_path_buf(),
        source,
    };
    let meta = match std::fs::metadata(dir) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(DataDirState::Missing),
        Err(e) => return Err(io_err(e)),
    };
    if !meta.is_dir() {
        return Err(PostgresError::NotADirectory {
            path: dir.to_path_buf(),
        });
    }
    let version_file = dir.join("PG_VERSION");
    if version_file.is_file() {
        let text = std::fs::read_to_string(&version_file).map_err(io_err)?;
        return match Major::parse(&text) {
            Some(m) => Ok(DataDirState::Cluster(m)),
            None => Ok(DataDirState::Foreign(vec![format!(
                "PG_VERSION containing {:?}",
                text.trim()
            )])),
        };
    }
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map_err(io_err)?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !IGNORED.contains(&n.as_str()))
        .collect();
    names.sort();
    if names.is_empty() {
        Ok(DataDirState::Empty)
    } else if names.iter().any(|n| n == INITDB_DIR) {
        Ok(DataDirState::InterruptedInit)
    } else {
        names.truncate(5);
        Ok(DataDirState::Foreign(names))
    }
}

/// An exclusive lock on a data directory, released when dropped (or when the process dies).
#[derive(Debug)]
pub struct DataDirLock {
    lock: Flock<File>,
    path: PathBuf,
}

impl DataDirLock {
    /// Take the lock, or `None` if another process holds it. The file belongs to `account`, so
    /// that the server can read every file of its data directory (`pg_basebackup` does). The
    /// lock is on the file at the path once taken (a holder may remove it, [`DataDirLock::remove`],
    /// so a lock taken on a file unlinked meanwhile is let go and taken again).
    pub fn try_acquire(
        dir: &Path,
        account: &Account,
        runtime_dir: &Path,
    ) -> Result<Option<DataDirLock>, PostgresError> {
        let path = dir.join(LOCK_FILE);
        let io_err = |source| PostgresError::Io {
            path: path.clone(),
            source,
        };
        for _ in 0..100 {
            let file = open_lock_file(&path).map_err(io_err)?;
            // Trying the lock changes nothing: a refused command leaves the directory as it was.
            // Once held, the file says who holds it (for the next command's error message).
            let mut lock = match lock_opened(file, &path).map_err(io_err)? {
                Taken::Held(lock) => lock,
                Taken::Busy => return Ok(None),
                Taken::Replaced => continue,
            };
            let holder = format!(
                "regobox pid {} on host {}, runtime directory {}\n",
                std::process::id(),
                nix::unistd::gethostname()
                    .map(|h| h.to_string_lossy().into_owned())
                    .unwrap_or_else(|_| "?".into()),
                runtime_dir.display()
            );
            lock.set_len(0).map_err(io_err)?;
            lock.write_all(holder.as_bytes()).map_err(io_err)?;
            // The file held, never what its name may lead to by then.
            if crate::users::is_root() {
                nix::unistd::fchown(&*lock, Some(account.uid), Some(account.gid))
                    .map_err(|e| io_err(e.into()))?;
            }
            return Ok(Some(DataDirLock { lock, path }));
        }
        Err(io_err(io::Error::other(
            "the lock file was replaced 100 times while it was being taken",
        )))
    }

    /// Remove the lock file, then let go: whoever takes the lock next makes a new one (used
    /// where the data directory is removed too: a restore that made it and failed).
    pub fn remove(self) {
        let _ = std::fs::remove_file(&self.path);
        drop(self.lock);
    }
}

fn open_lock_file(path: &Path) -> io::Result<File> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
}

/// What locking an opened lock file gave.
#[derive(Debug)]
enum Taken {
    Held(Flock<File>),
    /// Another process holds it.
    Busy,
    /// Locked, but no longer the file at `path` (its holder removed it between the open and
    /// the lock): let go, to be opened again.
    Replaced,
}

fn lock_opened(file: File, path: &Path) -> io::Result<Taken> {
    let lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(lock) => lock,
        Err((_, nix::Error::EWOULDBLOCK)) => return Ok(Taken::Busy),
        Err((_, e)) => return Err(e.into()),
    };
    let held = lock.metadata()?;
    let at_path = match std::fs::symlink_metadata(path) {
        Ok(m) => Some(m),
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => return Err(e),
    };
    if at_path.is_some_and(|m| (m.dev(), m.ino()) == (held.dev(), held.ino())) {
        Ok(Taken::Held(lock))
    } else {
        Ok(Taken::Replaced)
    }
}

/// Who holds the lock of `dir`, as its holder wrote it (`None` if unknown).
pub fn holder(dir: &Path) -> Option<String> {
    std::fs::read_to_string(dir.join(LOCK_FILE))
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

/// Whether a process holds the lock of `dir` (checked without writing anything).
pub fn is_locked(dir: &Path) -> bool {
    // Never a link, nor a FIFO's open that would wait for a writer: the lock is a file.
    let Ok(file) = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(dir.join(LOCK_FILE))
    else {
        return false;
    };
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(_) => false,
        Err((_, e)) => e == nix::Error::EWOULDBLOCK,
    }
}

/// Remove a `postmaster.pid` left by a crash. Refuses if the recorded PID is, or may be, a live
/// postgres serving this data directory.
pub fn clear_stale_pid(dir: &Path) -> Result<(), PostgresError> {
    let path = dir.join("postmaster.pid");
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => return Err(PostgresError::Io { path, source }),
    };
    let pid: Option<i32> = text.lines().next().and_then(|l| l.trim().parse().ok());
    if let Some(pid) = pid.filter(|p| *p > 0) {
        match live_postgres_on(pid, dir) {
            Liveness::NotPostgres(why) => {
                tracing::info!(pid, "removing stale postmaster.pid: pid {pid} {why}");
            }
            Liveness::Serving | Liveness::Unknown => {
                return Err(PostgresError::AlreadyRunning {
                    pid,
                    data_dir: dir.to_path_buf(),
                });
            }
        }
    } else {
        tracing::info!("removing unreadable postmaster.pid");
    }
    std::fs::remove_file(&path).map_err(|source| PostgresError::Io { path, source })
}

/// Kill a postgres serving `dir` (its `postmaster.pid` names a live postgres working there),
/// and wait for it to end: a server pg_upgrade or a restore started on a directory regobox is
/// about to remove, orphaned when regobox was killed. Its backends end with it.
pub fn kill_server_in(dir: &Path) {
    let Ok(text) = std::fs::read_to_string(dir.join("postmaster.pid")) else {
        return;
    };
    let Some(pid) = text
        .lines()
        .next()
        .and_then(|l| l.trim().parse::<i32>().ok())
    else {
        return;
    };
    // A single-user backend (initdb's, regobox's own readings) writes its pid negated.
    let pid = pid.abs();
    if pid <= 1 || !matches!(live_postgres_on(pid, dir), Liveness::Serving) {
        return;
    }
    tracing::warn!(pid, dir = %dir.display(), "killing a PostgreSQL server an interrupted upgrade or restore left running");
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    );
    let proc_dir = PathBuf::from(format!("/proc/{pid}"));
    for _ in 0..100 {
        if !proc_dir.exists() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

enum Liveness {
    NotPostgres(&'static str),
    Serving,
    Unknown,
}

/// Whether `pid` is a postgres whose working directory is `data_dir` (postgres chdirs there).
fn live_postgres_on(pid: i32, data_dir: &Path) -> Liveness {
    let proc_dir = PathBuf::from(format!("/proc/{pid}"));
    if !proc_dir.exists() {
        return Liveness::NotPostgres("is not running");
    }
    let want = data_dir
        .canonicalize()
        .unwrap_or_else(|_| data_dir.to_path_buf());
    match std::fs::read_link(proc_dir.join("cwd")) {
        Ok(cwd) if cwd == want => Liveness::Serving,
        Ok(_) => Liveness::NotPostgres("is a process that does not serve this data directory"),
        Err(_) => {
            // Not allowed to look (another user's process): only its name can be read.
            let comm = std::fs::read_to_string(proc_dir.join("comm")).unwrap_or_default();
            if comm.trim().starts_with("postgres") || comm.trim().starts_with("postmaster") {
                Liveness::Unknown
            } else {
                Liveness::NotPostgres("is not a postgres process")
            }
        }
    }
}

/// Remove what an interrupted initialisation left, keeping `lost+found` and the lock file.
pub fn clear_interrupted_init(dir: &Path) -> Result<(), PostgresError> {
    tracing::warn!(data_dir = %dir.display(), "a previous initialisation was interrupted; starting it again");
    for entry in std::fs::read_dir(dir).map_err(|source| PostgresError::Io {
        path: dir.to_path_buf(),
        source,
    })? {
        let entry = entry.map_err(|source| PostgresError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        let name = entry.file_name();
        if IGNORED.iter().any(|i| name == *i) {
            continue;
        }
        let path = entry.path();
        let res = if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
        res.map_err(|source| PostgresError::Io { path, source })?;
    }
    Ok(())
}

/// What `initdb` needs.
pub struct InitSpec<'a> {
    pub binaries: &'a Binaries,
    pub data_dir: &'a Path,
    pub account: &'a Account,
    pub superuser: &'a str,
    pub superuser_password: &'a str,
    pub locale: &'a str,
}

/// Create a cluster in `data_dir` (which exists, is owned by the account and holds nothing that
/// matters): UTF-8, data checksums, password authentication, as the unprivileged account.
pub async fn initdb(spec: &InitSpec<'_>) -> Result<(), PostgresError> {
    let dir = spec.data_dir;
    let work = dir.join(INITDB_DIR);
    let pwfile = dir.join(".regobox-initdb-password");
    let io_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| PostgresError::Io { path, source }
    };
    // The password file goes however this ends, a stop signal included (initdb is then killed,
    // and what it left is `INITDB_DIR`, which the next initdb replaces).
    struct Remove<'a>(&'a Path);
    impl Drop for Remove<'_> {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(self.0);
        }
    }
    let removed = Remove(&pwfile);
    {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&pwfile)
            .map_err(io_err(&pwfile))?;
        f.write_all(spec.superuser_password.as_bytes())
            .map_err(io_err(&pwfile))?;
    }
    chown(&pwfile, spec.account)?;
    let auth = spec.binaries.major.password_auth();
    let mut command = std::process::Command::new(spec.binaries.dir.join("initdb"));
    command
        .arg("--pgdata")
        .arg(&work)
        .args(["--username", spec.superuser, "--auth", auth])
        .arg("--pwfile")
        .arg(&pwfile)
        .args([
            "--encoding",
            "UTF8",
            "--locale",
            spec.locale,
            "--data-checksums",
        ])
        .env("LC_ALL", spec.locale)
        .current_dir(dir);
    spec.account.apply(&mut command);
    tracing::info!(data_dir = %dir.display(), version = %spec.binaries.version, auth, "initialising a new PostgreSQL cluster");
    let output = crate::process::output(&mut command).await;
    drop(removed);
    let output = output.map_err(io_err(&spec.binaries.path("initdb")))?;
    if !output.status.success() {
        let _ = std::fs::remove_dir_all(&work);
        return Err(PostgresError::Initdb {
            data_dir: dir.to_path_buf(),
            detail: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        });
    }
    // regobox made it: recorded, moved up with the rest.
    Record {
        superuser: spec.superuser.to_string(),
        adopted: false,
        statistics_pending: false,
    }
    .write(&work, spec.account)?;
    // Move the cluster up, PG_VERSION last: until it lands the directory reads as interrupted.
    let mut entries: Vec<_> = std::fs::read_dir(&work)
        .map_err(io_err(&work))?
        .flatten()
        .map(|e| e.file_name())
        .collect();
    entries.sort_by_key(|n| n == "PG_VERSION");
    for name in entries {
        let from = work.join(&name);
        std::fs::rename(&from, dir.join(&name)).map_err(io_err(&from))?;
    }
    sync_dir(dir).map_err(io_err(dir))?;
    std::fs::remove_dir(&work).map_err(io_err(&work))?;
    sync_dir(dir).map_err(io_err(dir))?;
    Ok(())
}

/// What regobox keeps about a cluster.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Record {
    /// The bootstrap superuser (the role with OID 10), which regobox manages the cluster as,
    /// over the Unix socket, by its OS account (`peer`): no password needed.
    pub superuser: String,
    /// Made by someone else. Its roles may have md5 passwords, which password authentication
    /// must keep accepting (as the `md5` method does, and SCRAM for SCRAM passwords).
    pub adopted: bool,
    /// Upgraded by pg_upgrade, which leaves the planner without statistics: the first server to
    /// run on it gathers them ([`super::Embedded::statistics_job`]).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub statistics_pending: bool,
}

impl Record {
    /// The record in `dir`, if there is one.
    pub fn read(dir: &Path) -> Result<Option<Record>, PostgresError> {
        let path = dir.join(RECORD_FILE);
        let text = match std::fs::read(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(PostgresError::Io { path, source }),
        };
        serde_json::from_slice(&text)
            .map(Some)
            .map_err(|e| PostgresError::Io {
                path,
                source: io::Error::new(io::ErrorKind::InvalidData, e),
            })
    }

    /// Write the record into `dir` (0600, the account's), replacing any at once, durably.
    pub fn write(&self, dir: &Path, account: &Account) -> Result<(), PostgresError> {
        let text = serde_json::to_vec(self).map_err(|e| PostgresError::Io {
            path: dir.join(RECORD_FILE),
            source: io::Error::other(e),
        })?;
        write_private(dir, RECORD_FILE, &text, account, true).map(|_| ())
    }
}

/// Write `name` in `dir` (0600, owned by `account`), replacing it at once (a temporary file
/// renamed over it); with `durable`, synced (the file, then the directory) before returning.
pub fn write_private(
    dir: &Path,
    name: &str,
    bytes: &[u8],
    account: &Account,
    durable: bool,
) -> Result<PathBuf, PostgresError> {
    let path = dir.join(name);
    let io_err = |source| PostgresError::Io {
        path: path.clone(),
        source,
    };
    let tmp = dir.join(format!(".{name}.tmp"));
    let _ = std::fs::remove_file(&tmp);
    {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io_err)?;
        f.write_all(bytes).map_err(io_err)?;
        if durable {
            f.sync_all().map_err(io_err)?;
        }
    }
    chown(&tmp, account)?;
    std::fs::rename(&tmp, &path).map_err(io_err)?;
    if durable {
        sync_dir(dir).map_err(io_err)?;
    }
    Ok(path)
}

/// The name of the bootstrap superuser (OID 10) of the cluster in `dir`, read in single-user
/// mode as the account: no password and no client authentication involved.
pub async fn bootstrap_superuser(
    binaries: &Binaries,
    dir: &Path,
    account: &Account,
) -> Result<String, PostgresError> {
    single_user_value(
        binaries,
        dir,
        account,
        "template1",
        "SELECT rolname FROM pg_catalog.pg_authid WHERE oid = 10",
    )
    .await
}

/// The one text value `query` returns, run in single-user mode on the cluster in `dir` as the
/// account. No server may be running on it (the caller holds the lock and has cleared any stale
/// `postmaster.pid`); the backend ends with a shutdown checkpoint, and a cluster that was not
/// shut down cleanly is recovered first, as any start would.
pub async fn single_user_value(
    binaries: &Binaries,
    dir: &Path,
    account: &Account,
    database: &str,
    query: &str,
) -> Result<String, PostgresError> {
    const MARK: &str = "regobox-value:";
    // Hex, behind a mark: the backend's output format cannot garble or forge it.
    let query = format!("SELECT '{MARK}' || encode(convert_to(({query}), 'UTF8'), 'hex')\n");
    let io_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| PostgresError::Io { path, source }
    };
    // The query is the server's standard input: a file the child inherits open.
    let mut input = tempfile_in_memory(query.as_bytes()).map_err(io_err(dir))?;
    use std::io::Seek;
    input.rewind().map_err(io_err(dir))?;
    let mut command = std::process::Command::new(binaries.path("postgres"));
    command
        .arg("--single")
        .arg("-D")
        .arg(dir)
        .args(["-c", "listen_addresses=", "-c", "archive_mode=off"])
        .arg(database)
        .current_dir(dir);
    account.apply(&mut command);
    let out = crate::process::output_fed(&mut command, input.into())
        .await
        .map_err(io_err(&binaries.path("postgres")))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let value = text
        .split(MARK)
        .nth(1)
        .and_then(|rest| {
            let hex: String = rest.chars().take_while(char::is_ascii_hexdigit).collect();
            let bytes: Option<Vec<u8>> = (0..hex.len() / 2)
                .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok())
                .collect();
            String::from_utf8(bytes?).ok()
        })
        .filter(|n| !n.is_empty());
    match value {
        Some(v) if out.status.success() => Ok(v),
        _ => Err(PostgresError::Unadoptable {
            data_dir: dir.to_path_buf(),
            reason: format!(
                "reading it in single-user mode failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        }),
    }
}

/// Refuse, touching nothing, a cluster regobox has no record of that no server could start on:
/// a control file that does not read (or fails its checksum), or a missing WAL segment of its
/// last checkpoint. Read-only (`pg_controldata`), before the directory is locked or handed over.
pub async fn check_adoptable(binaries: &Binaries, dir: &Path) -> Result<(), PostgresError> {
    let refuse = |reason: String| PostgresError::Unadoptable {
        data_dir: dir.to_path_buf(),
        reason,
    };
    let mut command = std::process::Command::new(binaries.path("pg_controldata"));
    command.arg(dir).env("LC_ALL", "C");
    let out = crate::process::output(&mut command)
        .await
        .map_err(|e| refuse(format!("cannot run pg_controldata: {e}")))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let errors = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        return Err(refuse(format!(
            "pg_controldata cannot read its control file: {}",
            errors.trim()
        )));
    }
    if format!("{text}{errors}")
        .to_ascii_lowercase()
        .contains("crc checksum does not match")
    {
        return Err(refuse(
            "its control file (global/pg_control) is corrupt: its checksum does not match".into(),
        ));
    }
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim_start_matches(':').trim().to_string())
    };
    if let Some(segment) = field("Latest checkpoint's REDO WAL file") {
        let wal = if binaries.major.0 >= 10 {
            "pg_wal"
        } else {
            "pg_xlog"
        };
        let path = dir.join(wal).join(&segment);
        if segment.is_empty() || !path.is_file() {
            return Err(refuse(format!(
                "the WAL segment its last checkpoint starts from ({wal}/{segment}) is missing: no server can start on it. Restore the segment, or the cluster from a backup"
            )));
        }
    }
    Ok(())
}

/// An unnamed file holding `bytes`.
fn tempfile_in_memory(bytes: &[u8]) -> io::Result<File> {
    let fd =
        nix::sys::memfd::memfd_create(c"regobox-query", nix::sys::memfd::MFdFlags::MFD_CLOEXEC)
            .map_err(io::Error::from)?;
    let mut file = File::from(fd);
    file.write_all(bytes)?;
    Ok(file)
}

/// Make `path` owned by `account` (a no-op unless regobox runs as root).
pub fn chown(path: &Path, account: &Account) -> Result<(), PostgresError> {
    if !crate::users::is_root() {
        return Ok(());
    }
    nix::unistd::chown(path, Some(account.uid), Some(account.gid)).map_err(|e| PostgresError::Io {
        path: path.to_path_buf(),
        source: e.into(),
    })
}

/// Make sure the data directory belongs to `account` with mode 0700 (PostgreSQL requires it).
/// A cluster owned by another uid (e.g. created by another image) is handed over recursively.
pub fn ensure_ownership(dir: &Path, account: &Account) -> Result<(), PostgresError> {
    use std::os::unix::fs::MetadataExt;
    let io_err = |source| PostgresError::Io {
        path: dir.to_path_buf(),
        source,
    };
    let meta = std::fs::metadata(dir).map_err(io_err)?;
    if crate::users::is_root()
        && (meta.uid() != account.uid.as_raw() || meta.gid() != account.gid.as_raw())
    {
        tracing::warn!(
            data_dir = %dir.display(),
            from_uid = meta.uid(),
            to = %account.name,
            "data directory is owned by another user; handing it over to the PostgreSQL account"
        );
        let changed = chown_recursive(dir, account)?;
        tracing::warn!(data_dir = %dir.display(), entries = changed, to = %account.name, "data directory handed over");
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode != 0o700 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io_err)?;
        tracing::warn!(data_dir = %dir.display(), from = format!("{mode:o}"), to = "700", "repaired the data directory's mode (PostgreSQL requires 0700)");
    }
    Ok(())
}

/// Hand `path` and everything under it to `account`; how many entries.
fn chown_recursive(path: &Path, account: &Account) -> Result<u64, PostgresError> {
    let mut count = 1;
    nix::unistd::fchownat(
        nix::fcntl::AT_FDCWD,
        path,
        Some(account.uid),
        Some(account.gid),
        nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
    )
    .map_err(|e| PostgresError::Io {
        path: path.to_path_buf(),
        source: e.into(),
    })?;
    let meta = std::fs::symlink_metadata(path).map_err(|source| PostgresError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    if meta.is_dir() {
        for entry in std::fs::read_dir(path).map_err(|source| PostgresError::Io {
            path: path.to_path_buf(),
            source,
        })? {
            let entry = entry.map_err(|source| PostgresError::Io {
                path: path.to_path_buf(),
                source,
            })?;
            count += chown_recursive(&entry.path(), account)?;
        }
    }
    Ok(count)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classification() {
        let root = tempfile::tempdir().unwrap();
        let d = root.path().join("pgdata");
        assert_eq!(inspect(&d).unwrap(), DataDirState::Missing);
        std::fs::create_dir(&d).unwrap();
        assert_eq!(inspect(&d).unwrap(), DataDirState::Empty);
        std::fs::create_dir(d.join("lost+found")).unwrap();
        std::fs::write(d.join(LOCK_FILE), "1").unwrap();
        assert_eq!(inspect(&d).unwrap(), DataDirState::Empty);
        std::fs::create_dir(d.join(INITDB_DIR)).unwrap();
        std::fs::create_dir(d.join("base")).unwrap();
        assert_eq!(inspect(&d).unwrap(), DataDirState::InterruptedInit);
        clear_interrupted_init(&d).unwrap();
        assert_eq!(inspect(&d).unwrap(), DataDirState::Empty);
        assert!(d.join("lost+found").is_dir(), "lost+found is kept");
        std::fs::write(d.join("notes.txt"), "x").unwrap();
        assert_eq!(
            inspect(&d).unwrap(),
            DataDirState::Foreign(vec!["notes.txt".into()])
        );
        std::fs::write(d.join("PG_VERSION"), "9.6\n").unwrap();
        assert_eq!(inspect(&d).unwrap(), DataDirState::Cluster(Major(9, 6)));
        let f = root.path().join("file");
        std::fs::write(&f, "").unwrap();
        assert!(matches!(
            inspect(&f),
            Err(PostgresError::NotADirectory { .. })
        ));
    }

    /// A holder may remove the lock file ([`DataDirLock::remove`]): another that opened it
    /// before and locks it after must not hold the unlinked file while a third holds the new
    /// one. And a link put in the file's place (the data directory is the server account's)
    /// is never followed, nor what it names given away.
    #[test]
    fn a_removed_lock_file_is_never_held_twice_and_a_link_is_not_followed() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let d = tempfile::tempdir().unwrap();
        let me = Account::current().unwrap();
        let holders = AtomicUsize::new(0);
        let taken = AtomicUsize::new(0);
        std::thread::scope(|s| {
            for t in 0..4 {
                let (holders, taken, d, me) = (&holders, &taken, &d, &me);
                s.spawn(move || {
                    for i in 0..3000 {
                        if let Some(lock) =
                            DataDirLock::try_acquire(d.path(), me, d.path()).unwrap()
                        {
                            assert_eq!(holders.fetch_add(1, Ordering::SeqCst), 0, "two holders");
                            taken.fetch_add(1, Ordering::SeqCst);
                            std::thread::yield_now();
                            holders.fetch_sub(1, Ordering::SeqCst);
                            if (i + t) % 2 == 0 {
                                lock.remove();
                            } else {
                                drop(lock);
                            }
                        }
                    }
                });
            }
        });
        assert!(taken.into_inner() > 0);
        // The interleaving the threads may not hit: B opens the file, A (its holder) removes
        // it and lets go, C takes a new one; B's lock of the old file is then no lock.
        let path = d.path().join(LOCK_FILE);
        let a = DataDirLock::try_acquire(d.path(), &me, d.path())
            .unwrap()
            .unwrap();
        let b = open_lock_file(&path).unwrap();
        a.remove();
        let c = DataDirLock::try_acquire(d.path(), &me, d.path())
            .unwrap()
            .unwrap();
        assert!(matches!(lock_opened(b, &path).unwrap(), Taken::Replaced));
        let b = open_lock_file(&path).unwrap();
        assert!(matches!(lock_opened(b, &path).unwrap(), Taken::Busy));
        c.remove();
        assert!(!path.exists());
        let target = d.path().join("elsewhere");
        std::fs::write(&target, "mine").unwrap();
        std::os::unix::fs::symlink(&target, d.path().join(LOCK_FILE)).unwrap();
        assert!(DataDirLock::try_acquire(d.path(), &me, d.path()).is_err());
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "mine");
    }

    #[test]
    fn the_lock_is_exclusive_and_released_on_drop() {
        let d = tempfile::tempdir().unwrap();
        let me = Account::current().unwrap();
        let a = DataDirLock::try_acquire(d.path(), &me, d.path()).unwrap();
        assert!(a.is_some());
        assert!(
            DataDirLock::try_acquire(d.path(), &me, d.path())
                .unwrap()
                .is_none()
        );
        drop(a);
        assert!(
            DataDirLock::try_acquire(d.path(), &me, d.path())
                .unwrap()
                .is_some()
        );
    }

    #[test]
    fn a_pid_file_of_a_dead_or_foreign_process_is_removed() {
        let d = tempfile::tempdir().unwrap();
        let pid_file = d.path().join("postmaster.pid");
        // This test process is alive, but it is not a postgres serving the directory.
        std::fs::write(
            &pid_file,
            format!("{}\n{}\n", std::process::id(), d.path().display()),
        )
        .unwrap();
        clear_stale_pid(d.path()).unwrap();
        assert!(!pid_file.exists());
        // A process whose working directory is the data directory is taken as a live server.
        let child = std::process::Command::new("sleep")
            .arg("30")
            .current_dir(d.path())
            .spawn()
            .unwrap();
        std::fs::write(&pid_file, format!("{}\n", child.id())).unwrap();
        let err = clear_stale_pid(d.path()).unwrap_err();
        assert!(matches!(err, PostgresError::AlreadyRunning { .. }), "{err}");
        assert!(pid_file.exists(), "never removed while it may be live");
        let mut child = child;
        let _ = child.kill();
        let _ = child.wait();
        clear_stale_pid(d.path()).unwrap();
        assert!(!pid_file.exists());
    }
}

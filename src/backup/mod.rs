//! Backup and restore of the database and the file volumes as one verifiable archive.
//!
//! [`create`] dumps the database with `pg_dump` (custom format, uncompressed: the archive's zstd
//! compresses everything once), then writes the archive ([`archive`]) to a temporary name in the
//! backups directory, syncs it and renames it into place (or streams it to stdout).
//! [`verify`] reads an archive once and checks every member against its manifest.
//! [`restore`] verifies first, refuses what these binaries cannot restore or existing data
//! without `force`, unpacks into a staging directory, restores the dump into a new cluster beside
//! the live one, and swaps the new directories in under a [`journal`]: until the swap is
//! committed, the previous data is what the next boot finds.
//! A running regobox does it in two steps: [`begin`] and [`build`] while everything runs (a
//! refused archive, or a dump that fails to load or never ends, stops nothing), then, everything
//! stopped, [`swap_in`].

pub mod archive;
pub mod dump;
pub mod journal;
pub mod toc;

use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStringExt as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, bail};
use indicatif::{ProgressBar, ProgressStyle};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::logs::Sink;
use crate::postgres::binaries::{Binaries, Major};
use crate::postgres::cluster::{self, DataDirLock, DataDirState};
use crate::postgres::{
    self, APP_PASSWORD_SECRET, Endpoint, PostgresError, SUPERUSER_PASSWORD_SECRET, Server, Tls,
    bootstrap, libpq_env,
};
use crate::secrets::SecretStore;
use crate::volumes::{Layout, sync_dir};
use archive::{Manifest, PostgresInfo};

/// The prefix of staging directories (removed when left by an interrupted restore).
const STAGING: &str = ".restore-";
/// Held (flock) for the whole of a restore: nothing else touches its journal and staging.
/// Its holder removes it before letting go: a restore, refused or done, leaves nothing.
const RESTORE_LOCK: &str = ".regobox-restore.lock";

/// The restore lock of a volume, held.
struct RestoreLock {
    path: PathBuf,
    _lock: nix::fcntl::Flock<File>,
}

impl Drop for RestoreLock {
    fn drop(&mut self) {
        // Removed while still held (the lock goes with the file, after this): whoever opened
        // the file before finds, once it has the lock, that the path names another file or
        // none, and starts again.
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Take the restore lock of the volume, or `None` if a restore holds it.
fn restore_lock(root: &Path) -> anyhow::Result<Option<RestoreLock>> {
    use std::os::unix::fs::MetadataExt as _;
    let path = root.join(RESTORE_LOCK);
    // A holder removes the file as it ends: a file locked after that is no longer the lock.
    for _ in 0..100 {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        let lock = match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock)
        {
            Ok(lock) => lock,
            Err((_, nix::Error::EWOULDBLOCK)) => return Ok(None),
            Err((_, e)) => {
                return Err(io::Error::from(e))
                    .with_context(|| format!("locking {}", path.display()));
            }
        };
        let held = lock
            .metadata()
            .with_context(|| format!("reading {}", path.display()))?;
        let named = std::fs::symlink_metadata(&path).ok();
        if named.is_some_and(|n| n.dev() == held.dev() && n.ino() == held.ino()) {
            return Ok(Some(RestoreLock { path, _lock: lock }));
        }
    }
    bail!(
        "{} keeps being replaced while it is locked; is another restore starting and ending in a loop?",
        path.display()
    )
}

/// A refusal that leaves everything as it was.
#[derive(Debug, thiserror::Error)]
pub enum RestoreRefused {
    #[error(
        "the archive holds a PostgreSQL {archive} database; these binaries are PostgreSQL {binaries}, which cannot restore a dump of a newer major. Use an image with PostgreSQL {archive} or newer"
    )]
    NewerMajor { archive: String, binaries: Major },
    #[error(
        "the dump holds what the application role {role} cannot create (a restore loads it with that role's rights only, never the superuser's): {objects}"
    )]
    DumpNeedsMore { role: String, objects: String },
    #[error(
        "{} changed while it was restored (its manifest is not the one checked before anything was stopped); nothing was replaced",
        .archive.display()
    )]
    ArchiveChanged { archive: PathBuf },
    #[error("the archive's dump is refused: {why}")]
    DumpUnreadable { why: String },
    #[error(
        "code in the dump changed what a dump does not hold, while it loaded: {what}; refusing it"
    )]
    DumpChangedSettings { what: String },
    #[error(
        "postgres.user ({role}) is the superuser (postgres.superuser): a restore loads the dump with the application role's rights only, so that role must not be the superuser. Configure another postgres.user"
    )]
    AppIsSuperuser { role: String },
    #[error(
        "the volume already holds data ({what}); restoring would replace it. Run again with --force to replace it (the previous data is kept until the restore has succeeded)"
    )]
    ExistingData { what: String },
    #[error(
        "{} is a mount point, in {}, which a restore replaces whole (and removes, with what is mounted there, once it succeeds): unmount it, or mount it elsewhere, then restore",
        .mount.display(),
        .dir.display()
    )]
    MountInside { dir: PathBuf, mount: PathBuf },
}

/// A restore stopped by a stop request (SIGTERM, SIGINT), or withdrawn by its client, while it
/// rebuilt the database or extracted the files, before anything was swapped in.
#[derive(Debug, thiserror::Error)]
#[error("restore cancelled before the restored data was swapped in; the previous data is in place")]
pub struct RestoreCancelled;

/// Another restore holds the volume (exit 75: try again once it is done).
#[derive(Debug, thiserror::Error)]
#[error("another restore is in progress on {}", .root.display())]
pub struct RestoreInProgress {
    pub root: PathBuf,
}

pub use crate::process::fault;

/// A backup that ran out of space says so, with the directory and what is free there now
/// (its work directory and partial archive are already removed).
fn out_of_space(e: anyhow::Error, dir: &Path) -> anyhow::Error {
    let too_large = e.chain().any(|c| {
        c.downcast_ref::<io::Error>()
            .is_some_and(|io| io.raw_os_error() == Some(libc::EFBIG))
    });
    if too_large {
        return anyhow::anyhow!(
            "the archive in {} would pass the largest file this process may write (a file size limit: `ulimit -f`): {e:#}",
            dir.display()
        );
    }
    let full = e.chain().any(|c| {
        c.downcast_ref::<io::Error>()
            .is_some_and(|io| io.raw_os_error() == Some(libc::ENOSPC))
            || c.to_string().contains("No space left on device")
    });
    if !full {
        return e;
    }
    let free = crate::volumes::free_space(dir)
        .map(|(f, _)| archive::bytes(f))
        .unwrap_or_else(|_| "?".into());
    anyhow::anyhow!(
        "not enough space: the backup ran out of space in {} ({free} free once its partial files were removed): {e:#}",
        dir.display()
    )
}

/// Where `regobox backup` writes.
#[derive(Debug, Clone)]
pub enum Output {
    /// A new file in the backups directory (retention applies).
    Default,
    Path(PathBuf),
    Stdout,
}

#[derive(Debug, Clone)]
pub struct CreateOptions {
    pub output: Output,
    pub secrets: bool,
    pub config: bool,
}

fn progress_bar(total: Option<u64>, what: &str) -> ProgressBar {
    if !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        return ProgressBar::hidden();
    }
    let pb = match total {
        Some(t) => ProgressBar::new(t),
        None => ProgressBar::new_spinner(),
    };
    let template = if total.is_some() {
        "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}"
    } else {
        "{spinner} {msg} {bytes} {bytes_per_sec}"
    };
    if let Ok(style) = ProgressStyle::with_template(template) {
        pb.set_style(style.progress_chars("=> "));
    }
    pb.set_message(what.to_string());
    pb.enable_steady_tick(Duration::from_millis(200));
    pb
}

/// `file` read through a progress bar (hidden when stderr is not a terminal) labelled `what`.
fn progress_reader(file: File, what: &str) -> (io::BufReader<Progress<File>>, ProgressBar) {
    let total = file.metadata().map(|m| m.len()).ok();
    let pb = progress_bar(total, what);
    let reader = io::BufReader::with_capacity(
        1 << 20,
        Progress {
            inner: file,
            pb: pb.clone(),
        },
    );
    (reader, pb)
}

/// A reader that advances a progress bar.
struct Progress<R> {
    inner: R,
    pb: ProgressBar,
}

impl<R: Read> Read for Progress<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.pb.inc(n as u64);
        Ok(n)
    }
}

/// The archive rules of this volume: the top-level directories that are regobox's own (`db`,
/// `backups`, and wherever `postgres.data_dir`, `backup.dir` and the runtime directory are on
/// it) are never backed up nor restored.
pub fn rules(config: &Config, layout: &Layout) -> archive::Rules {
    archive::Rules {
        own: own_dirs(config, layout),
        max_path: archive::max_path_under(&layout.root),
        unit: crate::volumes::allocation_unit(&layout.root),
        ..Default::default()
    }
}

/// The top-level directories of the volume that are regobox's own (see [`rules`]); what a
/// backup leaves out, without the probe of the volume that the rules' unit takes.
fn own_dirs(config: &Config, layout: &Layout) -> std::collections::BTreeSet<String> {
    let mut own: std::collections::BTreeSet<String> =
        ["db", "backups"].into_iter().map(String::from).collect();
    for dir in [
        &config.postgres.data_dir,
        &layout.backups,
        &config.runtime_dir,
    ] {
        if let Ok(rel) = dir.strip_prefix(&layout.root) {
            if let Some(std::path::Component::Normal(top)) = rel.components().next() {
                own.insert(top.to_string_lossy().into_owned());
            }
        }
    }
    own
}

/// The bytes an unprivileged writer may still write on the file system holding `path`, and
/// that file system's identity and size.
fn space(path: &Path) -> anyhow::Result<Space> {
    use std::os::unix::fs::MetadataExt;
    let (free, size) = crate::volumes::free_space(path)
        .with_context(|| format!("reading the free space of {}", path.display()))?;
    let inodes = crate::volumes::free_inodes(path)
        .with_context(|| format!("reading the free inodes of {}", path.display()))?;
    let dev = std::fs::metadata(path)
        .with_context(|| format!("reading {}", path.display()))?
        .dev();
    Ok(Space {
        free,
        size,
        inodes,
        dev,
    })
}

struct Space {
    free: u64,
    size: u64,
    /// Files that may still be created; `None`: no fixed number.
    inodes: Option<u64>,
    dev: u64,
}

/// The files a rebuilt cluster makes: initdb's (about 1 000) and the dump's tables, indexes
/// and their forks. An estimate, like [`cluster_estimate`].
const CLUSTER_FILES: u64 = 1500;

/// What unpacking creates: one file system entry per member written (`files`: the volume and
/// configuration members too).
fn unpack_files(manifest: &Manifest, files: bool) -> u64 {
    manifest.contents.unpacked(files).entries
}

/// `needs` new files must fit in the free inodes of `space` (on `path`).
fn need_inodes(needs: u64, space: &Space, path: &Path) -> Result<(), archive::ArchiveError> {
    match space.inodes {
        Some(free) if needs > free => Err(archive::ArchiveError::NoInodes {
            needs,
            free,
            path: path.to_path_buf(),
        }),
        _ => Ok(()),
    }
}

/// What rebuilding the archive's database takes beyond the dump: a new cluster (initdb's files,
/// then the tables and their indexes, which the dump holds as definitions only). An estimate.
fn cluster_estimate(manifest: &Manifest, unit: u64) -> u64 {
    let dump = manifest.contents.database_size;
    // Where the file system allocates more than 4 KiB at a time (ext4's bigalloc), each of the
    // cluster's files takes a whole unit: a rebuilt cluster of 1 500 files took 96 MiB on 64 KiB
    // units, against 64 MiB charged.
    let per_file = CLUSTER_FILES.saturating_mul(unit.saturating_sub(4096));
    dump.saturating_mul(2)
        .saturating_add(64 << 20)
        .saturating_add(per_file)
}

/// What unpacking takes: every member written, by [`archive::footprint`] (`files`: the volume
/// and configuration members too).
fn unpack_need(manifest: &Manifest, files: bool) -> u64 {
    manifest.contents.unpacked(files).bytes
}

/// The volume directories a backup holds: `backup.include`, or everything under the root but
/// the database, the backups and regobox's own bookkeeping.
fn included_dirs(config: &Config, layout: &Layout, secrets: bool) -> Vec<PathBuf> {
    let root = &layout.root;
    let own = own_dirs(config, layout);
    let names: Vec<String> = if config.backup.include.is_empty() {
        let mut names: Vec<String> = std::fs::read_dir(root)
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    } else {
        config.backup.include.clone()
    };
    let mut dirs: Vec<PathBuf> = names
        .into_iter()
        .map(|n| root.join(n))
        .filter(|p| {
            let name = p
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let holds_db = config.postgres.data_dir.starts_with(p);
            let is_backups = layout.backups.starts_with(p);
            let kept = !(holds_db
                || is_backups
                || own.contains(&name)
                || name.starts_with('.')
                || name == "lost+found"
                || (!secrets && *p == layout.secrets));
            // A directory itself, never a link to one (an archive's top-level directories
            // are directories, which a restore swaps in).
            let meta = std::fs::symlink_metadata(p);
            if kept && meta.as_ref().is_ok_and(|m| m.file_type().is_symlink()) {
                tracing::warn!(path = %p.display(), "left out of the backup: a top-level directory of the volume is a link, which a restore does not take");
            }
            kept && meta.is_ok_and(|m| m.is_dir())
        })
        .collect();
    if dirs.len() > archive::MAX_VOLUMES {
        tracing::warn!(
            kept = archive::MAX_VOLUMES,
            first_left_out = %dirs[archive::MAX_VOLUMES].display(),
            "left out of the backup: the volume has more top-level directories than an archive holds"
        );
        dirs.truncate(archive::MAX_VOLUMES);
    }
    dirs
}

/// Take a backup through `endpoint` (the running server, a temporary one, or the external one).
/// The path written, unless streamed to stdout.
pub async fn create(
    config: &Config,
    layout: &Layout,
    config_dirs: &[PathBuf],
    endpoint: &Endpoint,
    opts: &CreateOptions,
) -> anyhow::Result<Option<PathBuf>> {
    let started = std::time::Instant::now();
    crate::volumes::ensure_dir(&layout.backups, 0o700, "backup.dir")?;
    private_dir(&layout.backups)?;
    clean_dead_work(&layout.backups);
    let id = format!(
        "{}-{}",
        chrono::Utc::now().format("%Y%m%dT%H%M%S%3fZ"),
        std::process::id()
    );
    let work = Work::create(
        &layout.backups,
        &id,
        partial_path(layout, opts, &id).as_deref(),
    )?;
    let result = create_in(config, layout, config_dirs, endpoint, opts, &work.dir, &id).await;
    drop(work);
    let written = result.map_err(|e| out_of_space(e, &layout.backups))?;
    tracing::info!(
        path = %written.as_ref().map(|p| p.display().to_string()).unwrap_or_else(|| "stdout".into()),
        elapsed_ms = started.elapsed().as_millis() as u64,
        "backup complete"
    );
    if matches!(opts.output, Output::Default) && config.backup.keep > 0 {
        prune(&layout.backups, config.backup.keep as usize)?;
    }
    Ok(written)
}

async fn create_in(
    config: &Config,
    layout: &Layout,
    config_dirs: &[PathBuf],
    endpoint: &Endpoint,
    opts: &CreateOptions,
    work: &Path,
    id: &str,
) -> anyhow::Result<Option<PathBuf>> {
    // The database: a consistent snapshot, as the superuser when regobox runs the server.
    let dump_as = match &endpoint.superuser {
        Some(su) => {
            let mut c = su.clone();
            c.dbname(&config.postgres.database);
            c
        }
        None => endpoint.app.clone(),
    };
    let client = endpoint
        .connect(&dump_as)
        .await
        .context("connecting to the database to back it up")?;
    let server_version: String = client
        .query_one("SHOW server_version", &[])
        .await
        .context("reading the server version")?
        .get(0);
    drop(client);
    let major = Major::parse(&server_version)
        .map(|m| m.to_string())
        .unwrap_or_default();
    let dump = work.join(archive::DATABASE);
    tracing::info!(database = %config.postgres.database, "dumping the database");
    let pg_dump = endpoint.client_program("pg_dump").await;
    let mut cmd = std::process::Command::new(&pg_dump);
    cmd.args(["--format=custom", "--compress=0", "--no-password", "--file"])
        .arg(&dump)
        .env_clear()
        .envs(libpq_env(&dump_as, &endpoint.tls))
        // Times in UTC, whatever the database's own `TimeZone` (the application's to set: a
        // record's time written at an offset of 15 hours read back past the year 9999).
        .env("PGTZ", "UTC");
    if let Some(path) = std::env::var_os("PATH") {
        cmd.env("PATH", path);
    }
    let out = crate::process::output(&mut cmd)
        .await
        .with_context(|| format!("running {}", pg_dump.display()))?;
    if !out.status.success() {
        bail!(
            "pg_dump failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    // The record of the init scripts, read from the dump as a restore reads it: the
    // application role may write rows (it records the scripts it runs), and an archive whose
    // record a restore refuses is one no restore takes. Said now, not found at the restore.
    let read = dump.clone();
    tokio::task::spawn_blocking(move || {
        let file = File::open(&read).with_context(|| format!("opening {}", read.display()))?;
        dump::init_scripts_of(io::BufReader::new(file)).map_err(|e| {
            anyhow::anyhow!(
                "regobox.init_scripts is not what a restore reads ({e}): no restore would take this archive, so none is written. The application role records the init scripts it runs; rows of its own there (which no script of initdb.d names) can be deleted by the superuser"
            )
        })
    })
    .await
    .context("the dump task")??;

    let manifest = Manifest {
        format: archive::FORMAT,
        regobox_version: env!("CARGO_PKG_VERSION").into(),
        created_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        postgres: Some(PostgresInfo {
            major,
            server_version,
            database: config.postgres.database.clone(),
            user: config.postgres.user.clone(),
        }),
        secrets_included: opts.secrets,
        config_included: opts.config,
        contents: Default::default(),
    };
    let header_json = serde_json::to_vec_pretty(&archive::Header {
        format: archive::FORMAT,
        postgres: manifest.postgres.clone(),
    })?;
    let dirs = included_dirs(config, layout, opts.secrets);
    let level = config.backup.level;
    let threads = std::thread::available_parallelism()
        .map(|n| n.get() as u32)
        .unwrap_or(1);
    let config_dirs = if opts.config {
        config_dirs.to_vec()
    } else {
        Vec::new()
    };
    let root = layout.root.clone();
    // This host's state (the superuser's password, what regobox owns on the Docker engine, its
    // journal of frozen directories) is never restored (a restore keeps the live volume's), so
    // never archived either: every copy of an archive would otherwise hold a credential of the
    // live superuser.
    let secrets_dir = layout.secrets.clone();
    let final_path = final_path(layout, opts, id);
    let tmp_path = final_path.as_deref().map(tmp_name);
    let tmp_for_task = tmp_path.clone();
    let dump_for_task = dump.clone();
    let task = tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        let pb = progress_bar(None, "backup");
        let add_all = |w: &mut archive::Writer<Box<dyn Write>>| -> io::Result<()> {
            w.add_bytes(archive::HEADER, &header_json, 0o644)?;
            let meta = std::fs::metadata(&dump_for_task)?;
            w.add_file(archive::DATABASE, &dump_for_task, &meta)?;
            pb.set_position(w.content_bytes);
            // (A restore's staging directories are hidden names at the top of the volume,
            // never walked: a `.restore-*` name inside the application's data is its own.)
            let skip = |p: &Path| {
                p.parent() == Some(secrets_dir.as_path())
                    && p.file_name()
                        .is_some_and(|n| crate::secrets::of_this_host(&n.to_string_lossy()))
            };
            for dir in &dirs {
                let rel = dir.strip_prefix(&root).unwrap_or(dir);
                tracing::info!(dir = %dir.display(), "archiving");
                w.add_tree(&format!("volumes/{}", rel.display()), dir, &skip, &|n| {
                    pb.set_position(n)
                })?;
            }
            for (i, dir) in config_dirs.iter().enumerate() {
                let name = dir
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_else(|| "config".into());
                // `<i>-<name>` is one component of at most 255 bytes (the name is for a reader
                // only: a restore never writes the configuration back).
                let mut top = format!("{i}-{name}");
                while top.len() > 255 {
                    top.pop();
                }
                w.add_tree(&format!("config/{top}"), dir, &|_| false, &|_| {})?;
            }
            Ok(())
        };
        let sink: Box<dyn Write> = match &tmp_for_task {
            Some(p) => Box::new(io::BufWriter::with_capacity(
                1 << 20,
                std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    // An archive holds the passwords and the TLS key.
                    .mode(0o600)
                    .open(p)
                    .with_context(|| format!("creating {}", p.display()))?,
            )),
            None => Box::new(io::BufWriter::with_capacity(1 << 20, io::stdout())),
        };
        let mut writer = archive::Writer::new(sink, level, threads)?;
        writer.keep_names_within(archive::max_path_under(&root));
        add_all(&mut writer)?;
        let (mut out, manifest) = writer.finish(manifest)?;
        out.flush()?;
        drop(out);
        if let Some(p) = &tmp_for_task {
            File::open(p)?.sync_all()?;
        }
        pb.finish_and_clear();
        tracing::info!(members = manifest.contents.members, "archive written");
        Ok(())
    });
    let written = task.await.context("the archive task")?;
    if let Err(e) = written {
        if let Some(t) = &tmp_path {
            let _ = std::fs::remove_file(t);
        }
        return Err(e);
    }
    match (final_path, tmp_path) {
        (Some(final_path), Some(tmp)) => {
            if final_path.exists() {
                let _ = std::fs::remove_file(&tmp);
                bail!(
                    "{} already exists; nothing was overwritten",
                    final_path.display()
                );
            }
            std::fs::rename(&tmp, &final_path)?;
            sync_dir(final_path.parent().unwrap_or(Path::new("/")))?;
            Ok(Some(final_path))
        }
        _ => Ok(None),
    }
}

/// Where an archive goes (none: stdout).
fn final_path(layout: &Layout, opts: &CreateOptions, id: &str) -> Option<PathBuf> {
    match &opts.output {
        Output::Stdout => None,
        Output::Path(p) => Some(p.clone()),
        Output::Default => Some(layout.backups.join(format!("regobox-{id}.tar.zst"))),
    }
}

/// The file an archive is written to before it is renamed into place.
fn partial_path(layout: &Layout, opts: &CreateOptions, id: &str) -> Option<PathBuf> {
    final_path(layout, opts, id).as_deref().map(tmp_name)
}

/// A backup's work directory (`.work-<id>` in the backups directory: the uncompressed dump),
/// locked (`flock` on `.lock` inside it) for as long as the backup runs. Dropped, it removes
/// itself and the partial archive: a failed or cancelled backup leaves nothing. A backup killed
/// outright leaves both, with the lock released: [`clean_dead_work`] removes them.
struct Work {
    dir: PathBuf,
    partial: Option<PathBuf>,
    _lock: nix::fcntl::Flock<File>,
}

impl Work {
    fn create(backups: &Path, id: &str, partial: Option<&Path>) -> anyhow::Result<Work> {
        // Made and locked under another name, then renamed: a `.work-*` directory is always
        // locked by its backup until that backup ends.
        let making = backups.join(format!(".making-{id}"));
        crate::volumes::ensure_dir(&making, 0o700, "backup.dir")?;
        let file = File::create(making.join(".lock"))
            .with_context(|| format!("creating {}", making.join(".lock").display()))?;
        let lock = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock)
            .map_err(|(_, e)| anyhow::anyhow!("locking {}: {e}", making.display()))?;
        if let Some(p) = partial {
            std::fs::write(making.join("partial"), p.as_os_str().as_encoded_bytes())?;
        }
        let dir = backups.join(format!(".work-{id}"));
        std::fs::rename(&making, &dir)
            .with_context(|| format!("renaming {} to {}", making.display(), dir.display()))?;
        Ok(Work {
            dir,
            partial: partial.map(Path::to_path_buf),
            _lock: lock,
        })
    }
}

impl Drop for Work {
    fn drop(&mut self) {
        if let Some(p) = &self.partial {
            let _ = std::fs::remove_file(p);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Remove what backups killed outright left in `backups`: each `.work-*` directory whose lock
/// no process holds, with the partial archive it names (and `.making-*` ones, whose backup died
/// before it started). A running backup's directory is locked, and never touched.
pub fn clean_dead_work(backups: &Path) {
    let Ok(entries) = std::fs::read_dir(backups) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !(name.starts_with(".work-") || name.starts_with(".making-")) {
            continue;
        }
        let dir = entry.path();
        if !entry.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let held = match File::open(dir.join(".lock")) {
            Ok(f) => nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockSharedNonblock).is_err(),
            // No lock file: a `.making-*` whose backup died before locking it, or an older
            // regobox's leftover.
            Err(_) => false,
        };
        if held {
            continue;
        }
        let bytes = dir_size(&dir);
        if let Ok(p) = std::fs::read(dir.join("partial")) {
            let partial = PathBuf::from(std::ffi::OsString::from_vec(p));
            let is_partial = partial
                .file_name()
                .is_some_and(|n| n.to_string_lossy().ends_with(".partial"));
            if is_partial {
                if let Ok(m) = std::fs::symlink_metadata(&partial) {
                    if m.is_file() && std::fs::remove_file(&partial).is_ok() {
                        tracing::warn!(path = %partial.display(), bytes = m.len(), "removed the partial archive of a backup that was killed");
                    }
                }
            }
        }
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => {
                tracing::warn!(path = %dir.display(), bytes, "removed the work directory of a backup that was killed")
            }
            Err(e) => {
                tracing::warn!(path = %dir.display(), error = %e, "cannot remove the work directory of a backup that was killed")
            }
        }
    }
}

fn dir_size(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| match e.file_type() {
                    Ok(t) if t.is_dir() => dir_size(&e.path()),
                    _ => e.metadata().map(|m| m.len()).unwrap_or(0),
                })
                .sum()
        })
        .unwrap_or(0)
}

/// The backups directory is the owner's alone (archives hold passwords and keys): a wider mode
/// is narrowed, and the repair logged.
fn private_dir(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .permissions()
        .mode()
        & 0o7777;
    if mode != 0o700 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("chmod 0700 {}", dir.display()))?;
        tracing::warn!(dir = %dir.display(), from = format!("{mode:o}"), to = "700", "repaired the backups directory's mode: archives hold the passwords and the TLS key");
    }
    Ok(())
}

fn tmp_name(p: &Path) -> PathBuf {
    let name = p
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    p.with_file_name(format!(".{name}.partial"))
}

/// The archives of `dir`, oldest first (their names sort by creation time).
pub fn archives(dir: &Path) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.path())
                .filter(|p| {
                    p.file_name().is_some_and(|n| {
                        let n = n.to_string_lossy();
                        n.starts_with("regobox-") && n.ends_with(".tar.zst")
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    found.sort();
    found
}

/// Keep the newest `keep` archives of `dir`.
pub fn prune(dir: &Path, keep: usize) -> anyhow::Result<()> {
    let all = archives(dir);
    if all.len() > keep {
        for old in &all[..all.len() - keep] {
            tracing::info!(path = %old.display(), "removing an old backup (backup.keep)");
            std::fs::remove_file(old).with_context(|| format!("removing {}", old.display()))?;
        }
    }
    Ok(())
}

/// Verify the archive at `path` (one full read) by every rule a restore applies; its manifest.
pub async fn verify(path: &Path, rules: &archive::Rules) -> anyhow::Result<Manifest> {
    let path = path.to_path_buf();
    let rules = rules.clone();
    // Dropped (a restore cancelled while it verifies): the read stops where it is, rather than
    // reading on, for hours for a crafted archive, after no one waits for it.
    struct StopOnDrop(std::sync::Arc<std::sync::atomic::AtomicBool>);
    impl Drop for StopOnDrop {
        fn drop(&mut self) {
            self.0.store(true, std::sync::atomic::Ordering::Relaxed);
        }
    }
    let stop = StopOnDrop(Default::default());
    let flag = stop.0.clone();
    let result = tokio::task::spawn_blocking(move || -> anyhow::Result<Manifest> {
        let file = open_archive(&path)?;
        let (reader, pb) = progress_reader(file, "verify");
        let manifest = archive::verify_until(reader, &rules, flag)
            .with_context(|| format!("{} does not verify", path.display()))?;
        pb.finish_and_clear();
        Ok(manifest)
    })
    .await
    .context("the verification task")?;
    drop(stop);
    result
}

/// An extraction running on a blocking thread: the members written so far arrive on `done`.
struct Extraction {
    done: tokio::sync::mpsc::UnboundedReceiver<String>,
    cancel: std::sync::Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<anyhow::Result<Manifest>>,
}

impl Extraction {
    /// Start unpacking the archive at `path` into `dest` (a staging directory), verifying it
    /// by `rules`; `files`: the volume members too (else the header and the dump only), within
    /// `budget`.
    fn start(
        path: &Path,
        rules: &archive::Rules,
        dest: &Path,
        files: bool,
        budget: archive::Budget,
    ) -> anyhow::Result<Extraction> {
        let file = open_archive(path)?;
        let (tx, done) = tokio::sync::mpsc::unbounded_channel();
        let cancel = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (path, dest, stop) = (path.to_path_buf(), dest.to_path_buf(), cancel.clone());
        let rules = rules.clone();
        let task = tokio::task::spawn_blocking(move || -> anyhow::Result<Manifest> {
            let (reader, pb) = progress_reader(file, "restore");
            let mut notify = |member: &str| {
                let _ = tx.send(member.to_string());
                !stop.load(std::sync::atomic::Ordering::SeqCst)
            };
            let dest = archive::Dest {
                dir: &dest,
                files,
                budget,
                // Stopped within a member too (a large file): the next read fails.
                stop: Some(stop.clone()),
            };
            let manifest =
                archive::unpack_verified(reader, &rules, dest, &mut notify).map_err(|e| {
                    match e {
                        // Not the archive's fault: it is not said not to verify.
                        archive::ArchiveError::Write(_) => anyhow::Error::from(e),
                        e => anyhow::Error::from(e)
                            .context(format!("{} does not verify", path.display())),
                    }
                })?;
            pb.finish_and_clear();
            Ok(manifest)
        });
        Ok(Extraction { done, cancel, task })
    }

    /// Wait until `member` is written; false if the extraction ended without it.
    async fn wait_for(&mut self, member: &str) -> bool {
        while let Some(m) = self.done.recv().await {
            if m == member {
                return true;
            }
        }
        false
    }

    /// The verified manifest, once everything is written.
    async fn finish(self) -> anyhow::Result<Manifest> {
        self.task.await.context("the extraction task")?
    }

    /// [`Extraction::finish`], or [`RestoreCancelled`] once it has stopped early if `stop` is
    /// cancelled first.
    async fn finish_unless(mut self, stop: &CancellationToken) -> anyhow::Result<Manifest> {
        tokio::select! {
            r = &mut self.task => r.context("the extraction task")?,
            _ = stop.cancelled() => {
                self.abort().await;
                Err(RestoreCancelled.into())
            }
        }
    }

    /// Stop early and wait for the thread to end.
    async fn abort(self) {
        self.cancel.store(true, std::sync::atomic::Ordering::SeqCst);
        let _ = self.task.await;
    }
}

/// Flush the filesystem holding `dir` (one `syncfs`).
fn sync_filesystem(dir: &Path) -> anyhow::Result<()> {
    use std::os::fd::AsRawFd;
    let f = File::open(dir).with_context(|| format!("opening {}", dir.display()))?;
    // SAFETY: syncfs takes a valid open file descriptor, which `f` keeps open.
    if unsafe { libc::syncfs(f.as_raw_fd()) } != 0 {
        return Err(io::Error::last_os_error())
            .with_context(|| format!("syncing {}", dir.display()));
    }
    Ok(())
}

/// The superuser's password a restored cluster gets: never the archive's (an archive would
/// otherwise choose who is superuser), but the live volume's, or a new one if it has none.
fn restored_superuser_password(current: &SecretStore) -> anyhow::Result<String> {
    Ok(match current.get(SUPERUSER_PASSWORD_SECRET)? {
        Some(p) => p,
        None => crate::secrets::generate(),
    })
}

/// The passwords a restored cluster gets: the superuser's given (see
/// [`restored_superuser_password`]); the application's the configured one, else the archive's
/// secret if it holds one (read as regobox reads its secrets: a regular, non-empty file, or an
/// error), else the volume's (generated if missing), which is then written into the archive's
/// secrets, if it has any, so that what is swapped in matches the cluster.
fn restored_passwords(
    config: &Config,
    staged: &Path,
    current: &SecretStore,
    superuser: &str,
) -> anyhow::Result<(String, String)> {
    let archived_dir = staged.join("volumes").join(archive::SECRETS);
    let archived = SecretStore::new(&archived_dir);
    let su = superuser.to_string();
    let app = if !config.postgres.password.is_empty() {
        config.postgres.password.clone()
    } else {
        match archived.get(APP_PASSWORD_SECRET)? {
            Some(p) => p,
            None => {
                let live = current.get_or_generate(APP_PASSWORD_SECRET)?;
                if archived_dir.is_dir() {
                    archived.put(APP_PASSWORD_SECRET, &live)?;
                }
                live
            }
        }
    };
    Ok((su, app))
}

/// What regobox keeps of `pg_restore`'s errors (the first: it stops at the first with
/// `--exit-on-error`; a crafted dump's statement, printed with its error, can be any size).
const PG_RESTORE_ERRORS_KEPT: usize = 64 << 10;

/// The most entries a restore loads with parallel jobs. PostgreSQL 15's `pg_restore` schedules
/// the ready entries of a parallel load in time quadratic in their number: an attacker's 1 MB
/// archive of 300 000 trivial entries, half depending on the other half, held a restore (the
/// services stopped) for minutes; loaded serially, 17 s. A dump of more entries than this (a
/// schema of thousands of tables) is loaded by one job.
const PARALLEL_LOAD_MAX_ENTRIES: usize = 20_000;

/// How many jobs load a dump of `entries` listed entries on `cores` cores: at least two (one
/// job's data loads while another's index builds), one past [`PARALLEL_LOAD_MAX_ENTRIES`].
fn load_jobs(entries: usize, cores: usize) -> usize {
    if entries > PARALLEL_LOAD_MAX_ENTRIES {
        1
    } else {
        cores.max(2)
    }
}

/// `pg_restore`'s errors as kept, for a message.
fn pg_restore_errors(stderr: &[u8]) -> String {
    let kept = &stderr[..stderr.len().min(PG_RESTORE_ERRORS_KEPT)];
    // What it prints of a failed statement is the dump's: its control characters escaped,
    // its line breaks too (an attacker's, twenty-ninth session: a definition's escape sequences
    // cleared the operator's terminal and wrote a line of their own).
    let mut text = toc::printable(String::from_utf8_lossy(kept).trim().to_string());
    if stderr.len() > PG_RESTORE_ERRORS_KEPT {
        text.push_str(" [...]");
    }
    text
}

/// The most memory (`RLIMIT_DATA`) a `pg_restore` reading a dump for a restore's check may take:
/// it holds the whole table of contents, every entry's definition with it, whatever regobox
/// reads of it (a second attacker's, twenty-eighth session: a 185 KB archive of four 500 MB
/// definitions made it take 2.45 GB, refused by regobox only once read). A million entries take
/// it about 534 MB.
const PG_RESTORE_READ_MEMORY: u64 = 2 << 30;

/// Run `pg_restore` with `args` (reading a dump, never connecting), fed `input` when there is
/// one (a dump member as it is decompressed: `pg_restore` stops reading where it has what it
/// needs), its output taken by `read` as it streams and its errors kept (at most
/// [`PG_RESTORE_ERRORS_KEPT`]); killed when `read`'s result says it gave up (`gave_up`: a
/// reader that stops reading would leave it blocked on a full pipe). `keep` is a descriptor the
/// child keeps open across its exec (a list it reads as `/proc/self/fd/N`). Its exit status
/// and errors come back with `read`'s result. Blocking: from a blocking task.
fn pg_restore_piped<T: Send>(
    program: &Path,
    args: &[&OsStr],
    input: Option<&mut dyn Read>,
    keep: Option<std::os::fd::RawFd>,
    runtime: &tokio::runtime::Handle,
    read: impl FnOnce(std::process::ChildStdout) -> T + Send,
    gave_up: impl Fn(&T) -> bool,
) -> anyhow::Result<(T, std::process::ExitStatus, Vec<u8>)> {
    use std::os::unix::process::CommandExt;
    use std::process::Stdio;
    let mut command = std::process::Command::new(program);
    command.args(args);
    // SAFETY: between fork and exec, only setrlimit and fcntl (async-signal-safe), the latter on
    // a descriptor this process owns.
    unsafe {
        command.pre_exec(move || {
            nix::sys::resource::setrlimit(
                nix::sys::resource::Resource::RLIMIT_DATA,
                PG_RESTORE_READ_MEMORY,
                PG_RESTORE_READ_MEMORY,
            )
            .map_err(io::Error::from)?;
            if let Some(fd) = keep {
                nix::fcntl::fcntl(
                    std::os::fd::BorrowedFd::borrow_raw(fd),
                    nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
                )
                .map_err(io::Error::from)?;
            }
            Ok(())
        });
    }
    // Through the reaper (the one waiter of every child).
    let mut child = crate::process::spawn(
        command
            .env_clear()
            .stdin(if input.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
    )
    .with_context(|| format!("running {}", program.display()))?;
    let stdout = child.stdout.take().context("pg_restore's output")?;
    let mut stderr = child.stderr.take().context("pg_restore's errors")?;
    let stdin = child.stdin.take();
    let (read, errors, fed) = std::thread::scope(|scope| {
        // Dropped once read: a pg_restore still writing ends.
        let read = scope.spawn(move || read(stdout));
        let errors = scope.spawn(move || {
            let mut kept = Vec::new();
            let _ = (&mut stderr)
                .take(PG_RESTORE_ERRORS_KEPT as u64 + 1)
                .read_to_end(&mut kept);
            let _ = io::copy(&mut stderr, &mut io::sink());
            kept
        });
        let mut fed = Ok(());
        if let (Some(input), Some(mut stdin)) = (input, stdin) {
            match io::copy(input, &mut stdin) {
                Err(e) if e.kind() != io::ErrorKind::BrokenPipe => fed = Err(e),
                _ => {}
            }
        }
        (read.join(), errors.join(), fed)
    });
    let read = read.map_err(|_| anyhow::anyhow!("reading pg_restore's output failed"))?;
    if fed.is_err() || gave_up(&read) {
        child.signal(nix::sys::signal::Signal::SIGKILL);
    }
    let status = runtime.block_on(child.wait());
    fed.context("reading the archive's dump")?;
    Ok((read, status, errors.unwrap_or_default()))
}

/// A `pg_restore` reading a dump for a restore's check that failed: a refusal where it ran out
/// of the memory it may take ([`PG_RESTORE_READ_MEMORY`]).
fn pg_restore_failed(status: std::process::ExitStatus, errors: &[u8]) -> anyhow::Error {
    let text = pg_restore_errors(errors);
    if text.contains("could not find entry for ID") {
        return RestoreRefused::DumpUnreadable {
            why: format!(
                "its table of contents lists an entry it does not hold ({})",
                dump::shortened(&text)
            ),
        }
        .into();
    }
    if text.contains("out of memory") {
        return RestoreRefused::DumpUnreadable {
            why: format!(
                "it needs more than {} GiB to be read ({})",
                PG_RESTORE_READ_MEMORY >> 30,
                dump::shortened(&text)
            ),
        }
        .into();
    }
    anyhow::anyhow!("pg_restore cannot read the dump ({status}): {text}")
}

/// Open the archive at `path` for reading, refusing what is not a regular file: opened without
/// waiting (a FIFO put at an archive's path between two reads left a thread blocked in `open`
/// for good), then judged by what was opened.
fn open_archive(path: &Path) -> anyhow::Result<File> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    if !file
        .metadata()
        .with_context(|| format!("reading {}", path.display()))?
        .is_file()
    {
        bail!("{} is not a file", path.display());
    }
    // Reads of a regular file never wait anyway; the flag goes so that nothing downstream
    // meets EAGAIN.
    nix::fcntl::fcntl(
        &file,
        nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::empty()),
    )
    .with_context(|| format!("opening {}", path.display()))?;
    Ok(file)
}

/// The dump member of the archive at `path`, as it is decompressed.
fn with_dump_member<T>(
    path: &Path,
    f: impl FnOnce(&mut dyn Read) -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    let file = open_archive(path)?;
    let mut tar = tar::Archive::new(zstd::stream::read::Decoder::new(file)?);
    for entry in tar.entries()? {
        let mut entry = entry?;
        if archive::normalise(&entry.path_bytes())? == archive::DATABASE {
            return f(&mut entry);
        }
    }
    bail!("the archive has no database dump")
}

/// The SQL `pg_restore` prints for the load's list of the dump at `from` (`--schema-only`, the
/// data left unread), judged as it streams ([`dump::judge_sql_header`]): before anything
/// changes, what runs at the start of each of the load's connections beside the list (the
/// dump's `SEARCHPATH` entry, judged by regobox too), and that `pg_restore` finds every entry the
/// list names (the second wall behind regobox's own reading of the table of contents).
async fn judge_load_sql(
    binaries: &Binaries,
    from: DumpAt,
    load: &dump::Load,
) -> anyhow::Result<()> {
    definitions(
        binaries,
        from,
        std::sync::Arc::new(load.list.clone()),
        |out| dump::judge_sql_header(io::BufReader::new(out)),
        |judged| judged.is_err(),
    )
    .await?
    .and_then(|whole| {
        whole
            .then_some(())
            .ok_or_else(|| "ends in its header".to_string())
    })
    .map_err(|why| {
        RestoreRefused::DumpUnreadable {
            why: format!("the SQL pg_restore makes of it {why}"),
        }
        .into()
    })
}

/// What `read` takes of the definitions of the entries `list` names (lines of a `--use-list`: ids)
/// in the dump at `from`: `pg_restore --file=- --use-list --schema-only` (the
/// definitions alone, whatever data an entry claims; reading an archive's member, it stops
/// after the table of contents), the list given in a memory file; `gave_up` as
/// [`pg_restore_piped`] takes it. A `pg_restore` that fails, unless `read` gave up, is an error.
async fn definitions<T: Send + 'static>(
    binaries: &Binaries,
    from: DumpAt,
    list: std::sync::Arc<String>,
    read: impl FnOnce(std::process::ChildStdout) -> T + Send + 'static,
    gave_up: impl Fn(&T) -> bool + Send + 'static,
) -> anyhow::Result<T> {
    use std::os::fd::AsRawFd;
    let program = binaries.path("pg_restore");
    let runtime = tokio::runtime::Handle::current();
    let (read, status, errors, gave) = tokio::task::spawn_blocking(move || {
        let memfd = nix::sys::memfd::memfd_create(
            c"regobox-restore-list",
            nix::sys::memfd::MFdFlags::MFD_CLOEXEC,
        )
        .context("making the list of the entries to read")?;
        let mut file = File::from(memfd);
        io::Write::write_all(&mut file, list.as_bytes())
            .context("writing the list of the entries to read")?;
        let at = format!("--use-list=/proc/self/fd/{}", file.as_raw_fd());
        let mut args = vec![
            OsStr::new("--file=-"),
            OsStr::new(&at),
            OsStr::new("--schema-only"),
        ];
        let run = |args: &[&OsStr], input: Option<&mut dyn Read>| {
            pg_restore_piped(
                &program,
                args,
                input,
                Some(file.as_raw_fd()),
                &runtime,
                read,
                &gave_up,
            )
        };
        let (read, status, errors) = match &from {
            DumpAt::File(dump) => {
                args.push(dump.as_os_str());
                run(&args, None)
            }
            DumpAt::ArchiveMember(path) => {
                with_dump_member(path, |member| run(&args, Some(member)))
            }
        }?;
        let gave = gave_up(&read);
        anyhow::Ok((read, status, errors, gave))
    })
    .await
    .context("the dump task")??;
    if !gave && !status.success() {
        return Err(pg_restore_failed(status, &errors));
    }
    Ok(read)
}

/// Where a dump is read from.
enum DumpAt {
    /// An extracted dump.
    File(PathBuf),
    /// The dump member of an archive, as it is decompressed (`pg_restore` stops reading where
    /// it has what it needs: after the table of contents, for the table or an entry's
    /// definition).
    ArchiveMember(PathBuf),
}

/// What the application role loads of a dump whose objects `owner` owned (see
/// [`dump::judge_reader`]: its header and table of contents read by regobox, as `pg_restore`
/// reads them), the dump read from `toc`; refused as a restore says it (`role`: the
/// application role).
async fn judged_toc(
    binaries: &Binaries,
    toc: DumpAt,
    owner: &str,
    extensions: &[String],
    role: &str,
) -> anyhow::Result<dump::Load> {
    let (owner, extensions) = (owner.to_string(), extensions.to_vec());
    let major = binaries.major;
    let judged = tokio::task::spawn_blocking(move || {
        let judge = dump::Judge {
            owner: &owner,
            extensions: &extensions,
            max_format: dump::max_format(major.0),
        };
        match toc {
            DumpAt::File(dump) => {
                let file =
                    File::open(&dump).with_context(|| format!("opening {}", dump.display()))?;
                Ok(dump::judge_reader(io::BufReader::new(file), &judge))
            }
            DumpAt::ArchiveMember(path) => with_dump_member(&path, |member| {
                Ok(dump::judge_reader(io::BufReader::new(member), &judge))
            }),
        }
    })
    .await
    .context("the dump task")??;
    judged.map_err(|refused| toc_refused(refused, role))
}

/// A dump's table of contents refused, as a restore says it (`role`: the application role).
fn toc_refused(refused: dump::TocError, role: &str) -> anyhow::Error {
    match refused {
        dump::TocError::Refused(refusals) => RestoreRefused::DumpNeedsMore {
            role: role.to_string(),
            objects: refusals.to_string(),
        }
        .into(),
        unreadable => RestoreRefused::DumpUnreadable {
            why: unreadable.to_string(),
        }
        .into(),
    }
}

/// A cluster being rebuilt from a dump, on a private server (Unix socket only).
///
/// It is not live until it is swapped in, after a clean stop and a sync of its filesystem, so it
/// is built without per-write flushing, as a bulk load should be. Its roles get temporary
/// passwords until [`Build::finish`] sets the final ones (known once the archive's secrets are
/// extracted).
struct Build {
    server: Server,
    superuser: tokio_postgres::Config,
    data_dir: PathBuf,
    socket_dir: PathBuf,
}

impl Build {
    async fn start(
        config: &Config,
        binaries: &Binaries,
        account: &crate::users::Account,
        data_dir: &Path,
        socket_dir: &Path,
    ) -> anyhow::Result<Build> {
        let pg = &config.postgres;
        let temporary: String = {
            use rand::Rng;
            rand::rng()
                .sample_iter(&rand::distr::Alphanumeric)
                .take(32)
                .map(char::from)
                .collect()
        };
        crate::volumes::ensure_dir(data_dir, 0o700, "postgres.data_dir")?;
        cluster::chown(data_dir, account)?;
        cluster::initdb(&cluster::InitSpec {
            binaries,
            data_dir,
            account,
            superuser: &pg.superuser,
            superuser_password: &temporary,
            locale: &pg.locale,
        })
        .await?;
        crate::volumes::ensure_dir(socket_dir, 0o700, "runtime_dir")?;
        cluster::chown(socket_dir, account)?;
        let auth = postgres::write_hba(
            socket_dir,
            account,
            binaries.major.password_auth(),
            "",
            &pg.superuser,
        )?;
        let params: Vec<(String, String)> = [
            ("listen_addresses", String::new()),
            ("port", pg.port.to_string()),
            ("unix_socket_directories", socket_dir.display().to_string()),
            ("hba_file", auth.hba.display().to_string()),
            ("ident_file", auth.ident.display().to_string()),
            ("fsync", "off".into()),
            ("full_page_writes", "off".into()),
            ("synchronous_commit", "off".into()),
            ("wal_level", "minimal".into()),
            ("max_wal_senders", "0".into()),
            ("max_wal_size", "4GB".into()),
            ("checkpoint_timeout", "1h".into()),
            ("maintenance_work_mem", "256MB".into()),
            ("autovacuum", "off".into()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let mut server = Server::spawn(
            binaries,
            data_dir,
            account,
            &params,
            crate::postgres::server::Output {
                label: "restore-postgres",
                sink: Sink::Stderr,
                file: None,
                observer: None,
            },
        )
        .map_err(|source| PostgresError::Io {
            path: binaries.path("postgres"),
            source,
        })?;
        let mut su = tokio_postgres::Config::new();
        su.host_path(socket_dir)
            .port(pg.port)
            .user(&pg.superuser)
            .password(&temporary)
            .dbname("postgres");
        postgres::pin_superuser_session(&mut su);
        let endpoint = Endpoint {
            superuser: Some(su.clone()),
            app: su.clone(),
            tls: Tls::disabled(),
            url: None,
            binaries: Some(binaries.clone()),
        };
        let ready = async {
            postgres::wait_ready(Some(&mut server), &endpoint, pg.start_timeout).await?;
            let client = postgres::connect(&su, &Tls::disabled())
                .await
                .context("connecting to the restore server")?;
            bootstrap::role_and_database(
                &client,
                binaries.major,
                &pg.user,
                bootstrap::RolePassword::Set(&temporary),
                &pg.database,
            )
            .await?;
            anyhow::Ok(())
        }
        .await;
        let build = Build {
            server,
            superuser: su,
            data_dir: data_dir.to_path_buf(),
            socket_dir: socket_dir.to_path_buf(),
        };
        match ready {
            Ok(()) => Ok(build),
            Err(e) => {
                build.discard(config).await;
                Err(e)
            }
        }
    }

    /// Restore `dump` into the application database as the application role (see [`dump`]);
    /// `owner` is the role that owned it in the archive.
    async fn load(
        &self,
        config: &Config,
        binaries: &Binaries,
        dump: &Path,
        owner: Option<&str>,
        scripts: &[PathBuf],
    ) -> anyhow::Result<()> {
        let pg = &config.postgres;
        let owner = owner.unwrap_or(&pg.user);
        // What the dump holds, judged before anything of it runs.
        let load = judged_toc(
            binaries,
            DumpAt::File(dump.to_path_buf()),
            owner,
            &pg.extensions,
            &pg.user,
        )
        .await?;
        let mut su_db = self.superuser.clone();
        su_db.dbname(&pg.database);
        let su = postgres::connect(&su_db, &Tls::disabled()).await?;
        if owner != pg.user {
            tracing::warn!(archive_role = owner, role = %pg.user, "the archive's objects belonged to another role; they are restored as the application role's (that role is created NOLOGIN for the grants that name it)");
            let exists = su
                .query_opt("SELECT 1 FROM pg_roles WHERE rolname = $1", &[&owner])
                .await?
                .is_some();
            if !exists {
                su.batch_execute(&format!(
                    "CREATE ROLE {} NOLOGIN",
                    bootstrap::quote_ident(owner)
                ))
                .await?;
            }
        }
        // regobox's bookkeeping before anything of the dump runs: code in the dump (a CHECK, a
        // default) running as the application role made the schema `regobox` its own while
        // the data loaded, and every start after the restore refused the volume. No grant to
        // the role until the dump has loaded (the init scripts below, or the next start, grant
        // it): code in the dump inserted rows
        // into `regobox.init_scripts` while it loaded, enough that no later backup restored,
        // or naming a script the operator would add, which then never ran (an attacker's,
        // thirty-third session).
        bootstrap::bookkeeping(&su, None).await?;
        tracing::info!(role = %pg.user, "restoring the database as the application role");
        let mut app = su_db.clone();
        app.user(&pg.user).options("");
        // The application's schemas first, made by regobox under the names their definitions
        // give (none of the dump's SQL for them runs: see `dump::schema_made`), owned by the
        // application role; then regobox's part as the superuser (the configured extensions,
        // each in the schema the dump puts it in; its bookkeeping); then everything else.
        judge_load_sql(binaries, DumpAt::File(dump.to_path_buf()), &load).await?;
        for schema in &load.schemas {
            su.batch_execute(&format!(
                "CREATE SCHEMA {} AUTHORIZATION {}",
                bootstrap::quote_ident(schema),
                bootstrap::quote_ident(&pg.user)
            ))
            .await
            .with_context(|| format!("making the dump's schema {}", dump::shortened(schema)))?;
        }
        for name in &pg.extensions {
            let schema = load
                .extensions
                .iter()
                .find(|(n, _)| n == name)
                .map_or("public", |(_, schema)| schema.as_str());
            bootstrap::extension(&su, name, schema).await?;
        }
        if load.init_scripts_rows {
            self.restore_init_scripts(&load, &su).await?;
        }
        drop(su);
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        let jobs = load_jobs(load.list.bytes().filter(|b| *b == b'\n').count(), cores);
        let out = self
            .pg_restore_as(binaries, dump, &app, "restore", &load.list, jobs)
            .await?;
        if !out.status.success() {
            let text = pg_restore_errors(&out.stderr);
            let full = [
                "No space left on device",
                "could not extend file",
                "Check free disk space",
            ];
            if full.iter().any(|f| text.contains(f)) {
                bail!(
                    "not enough space while rebuilding the database in {} (the dump grows beyond what was checked: indexes, materialized views); nothing was changed: {}",
                    self.data_dir.display(),
                    text.trim()
                );
            }
            bail!(
                "pg_restore (as the application role {}) failed ({}): {}",
                pg.user,
                out.status,
                text.trim()
            );
        }
        // The init scripts the record does not name, run now as the next start would (the
        // role's grant on the record is the start's too); one that fails fails the restore.
        // Before the check below: the dump's code a script sets off (a trigger on a table it
        // writes) runs as the role too, and changed the database's privileges past a check
        // made before it (a fourth attacker's, the same session).
        if !scripts.is_empty() {
            let su = postgres::connect(&su_db, &Tls::disabled()).await?;
            bootstrap::bookkeeping(&su, Some(&pg.user)).await?;
            drop(su);
            let mut app_client = postgres::connect(&app, &Tls::disabled()).await?;
            bootstrap::run_init_scripts(&mut app_client, scripts)
                .await
                .context("running the configuration's init scripts in the restored database")?;
        }
        self.check_settings(&su_db, &pg.extensions).await
    }

    /// A dump changes nothing outside its objects: no setting of a database or role (a
    /// `search_path` would steer later sessions), no connection limit, template flag,
    /// privilege or comment on the database (its owner may revoke `CONNECT` from itself: a
    /// restore that succeeded left an application that could not connect). Whatever code in
    /// the dump did so while it loaded, the restore is refused.
    async fn check_settings(
        &self,
        su_db: &tokio_postgres::Config,
        extensions: &[String],
    ) -> anyhow::Result<()> {
        let su = postgres::connect(su_db, &Tls::disabled()).await?;
        let mut changed: Vec<String> = su
            .query(
                "SELECT coalesce(d.datname, 'every database') || ' / ' || coalesce(r.rolname, 'every role') || ': ' || array_to_string(s.setconfig, ', ')
                 FROM pg_catalog.pg_db_role_setting s
                 LEFT JOIN pg_catalog.pg_database d ON d.oid = s.setdatabase
                 LEFT JOIN pg_catalog.pg_roles r ON r.oid = s.setrole",
                &[],
            )
            .await?
            .iter()
            .map(|r| format!("settings of {}", r.get::<_, String>(0)))
            .collect();
        let row = su
            .query_one(
                "SELECT datconnlimit, datallowconn, datistemplate, datacl::text, pg_catalog.shobj_description(oid, 'pg_database') FROM pg_catalog.pg_database WHERE datname = pg_catalog.current_database()",
                &[],
            )
            .await?;
        let (limit, allow, template): (i32, bool, bool) = (row.get(0), row.get(1), row.get(2));
        if (limit, allow, template) != (-1, true, false) {
            changed.push(format!(
                "the database's connection limit {limit}, allow connections {allow}, template {template}"
            ));
        }
        // As `CREATE DATABASE` made it: the default privileges (none written).
        if let Some(acl) = row.get::<_, Option<String>>(3) {
            changed.push(format!("the database's privileges {acl}"));
        }
        // The dump's own comment on the database is not loaded; one its code made is refused
        // as well (an attacker's, thirty-second session: a shared catalog's row).
        if let Some(comment) = row.get::<_, Option<String>>(4) {
            changed.push(format!(
                "the database's comment {:?}",
                dump::shortened(&comment)
            ));
        }
        // The configured extensions, made before the load, are there after it: the owner of a
        // schema drops what is in it, a superuser's extension too (an attacker's, thirty-third
        // session: `DROP SCHEMA public CASCADE` in the dump's code, and every start after the
        // restore failed on `CREATE EXTENSION ... WITH SCHEMA public`).
        let present: Vec<String> = su
            .query("SELECT extname::text FROM pg_catalog.pg_extension", &[])
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        for name in extensions {
            if !present.contains(name) {
                changed.push(format!(
                    "the extension {name} (postgres.extensions) was dropped"
                ));
            }
        }
        if changed.is_empty() {
            Ok(())
        } else {
            Err(RestoreRefused::DumpChangedSettings {
                what: changed.join("; "),
            }
            .into())
        }
    }

    /// `pg_restore` of the entries of `list` (named `name`) as `app`, with `jobs` workers.
    async fn pg_restore_as(
        &self,
        binaries: &Binaries,
        dump: &Path,
        app: &tokio_postgres::Config,
        name: &str,
        list: &str,
        jobs: usize,
    ) -> anyhow::Result<crate::process::Output> {
        let path = self.socket_dir.join(format!("{name}.list"));
        std::fs::write(&path, list).with_context(|| format!("writing {}", path.display()))?;
        let mut cmd = std::process::Command::new(binaries.path("pg_restore"));
        cmd.args(["--exit-on-error", "--no-password", "--no-owner"])
            .arg(format!("--jobs={jobs}"))
            .arg("--use-list")
            .arg(&path)
            .arg("--dbname")
            .arg(app.get_dbname().unwrap_or_default())
            .arg(dump)
            .env_clear()
            .envs(libpq_env(app, &Tls::disabled()));
        crate::process::output_limited(&mut cmd, PG_RESTORE_ERRORS_KEPT)
            .await
            .context("running pg_restore")
    }

    /// Copy the dump's rows of `regobox.init_scripts` into regobox's own table, as the judge
    /// read them (never run).
    async fn restore_init_scripts(
        &self,
        load: &dump::Load,
        su: &tokio_postgres::Client,
    ) -> anyhow::Result<()> {
        // The rows as the dump was judged to hold them (`dump::init_script_rows`).
        for row in &load.init_scripts {
            su.execute(
                "INSERT INTO regobox.init_scripts (name, sha256, applied_at) VALUES ($1, $2, $3::text::timestamptz)",
                &[&row.name, &row.sha256, &row.applied_at],
            )
            .await
            .context("restoring regobox.init_scripts")?;
        }
        Ok(())
    }

    /// Set the final passwords, stop cleanly and flush everything to disk.
    async fn finish(
        mut self,
        config: &Config,
        binaries: &Binaries,
        passwords: &(String, String),
    ) -> anyhow::Result<()> {
        let pg = &config.postgres;
        let set = async {
            let client = postgres::connect(&self.superuser, &Tls::disabled()).await?;
            let enc = if binaries.major.0 >= 10 {
                "scram-sha-256"
            } else {
                "md5"
            };
            client
                .batch_execute(&format!("SET password_encryption = '{enc}'"))
                .await?;
            for (role, password) in [(&pg.superuser, &passwords.0), (&pg.user, &passwords.1)] {
                client
                    .batch_execute(&format!(
                        "ALTER ROLE {} WITH LOGIN PASSWORD {}",
                        bootstrap::quote_ident(role),
                        bootstrap::quote_literal(&bootstrap::password_verifier(
                            binaries.major,
                            role,
                            password
                        ))
                    ))
                    .await?;
            }
            anyhow::Ok(())
        }
        .await;
        let stopped = self
            .server
            .stop(pg.stop_timeout, std::future::pending())
            .await;
        let _ = std::fs::remove_dir_all(&self.socket_dir);
        set.context("setting the restored roles' passwords")?;
        let status = stopped.context("stopping the restore server")?;
        if !status.success() {
            bail!("the restore server did not stop cleanly ({status})");
        }
        sync_filesystem(&self.data_dir)
    }

    /// Stop the server and remove the cluster.
    async fn discard(mut self, config: &Config) {
        let _ = self
            .server
            .stop(config.postgres.stop_timeout, std::future::pending())
            .await;
        let _ = std::fs::remove_dir_all(&self.socket_dir);
        let _ = std::fs::remove_dir_all(&self.data_dir);
    }
}

#[derive(Debug, Clone)]
pub struct RestoreOptions {
    pub archive: PathBuf,
    pub force: bool,
    /// The configuration's init scripts (`bootstrap::init_scripts`): those the archive's
    /// record does not name run in the rebuilt database before it is swapped in, as the next
    /// start would run them, so that one failing fails the restore, the previous data in place
    /// (an attacker's, thirty-third session: an archive whose record left out a script whose
    /// table its data held restored "complete", and every start after it failed running it).
    pub scripts: Vec<PathBuf>,
}

/// Where a rebuild reads and writes.
struct Places<'a> {
    archive: &'a Path,
    staging: &'a Path,
    new_cluster: &'a Path,
    socket_dir: &'a Path,
}

/// Unpack and verify the archive into `staging` while rebuilding its database in `new_cluster`:
/// the cluster starts at once, the dump loads as soon as it is extracted (it comes first), the
/// files keep extracting meanwhile (`files`: else only the dump is written). Returns the
/// manifest once everything has verified; on any error both are left to the caller to discard.
async fn rebuild(
    config: &Config,
    layout: &Layout,
    plan: &Plan,
    places: Places<'_>,
    files: bool,
    superuser: &str,
    stop: &CancellationToken,
) -> anyhow::Result<Manifest> {
    let Places {
        archive: archive_path,
        staging,
        new_cluster,
        socket_dir,
    } = places;
    let binaries = &plan.binaries;
    let mut extraction = Extraction::start(
        archive_path,
        &plan.rules,
        staging,
        files,
        plan.budget.clone(),
    )?;
    // The header comes first: refuse a newer major before extracting anything else.
    if !extraction.wait_for(archive::HEADER).await {
        return Err(extraction
            .finish()
            .await
            .err()
            .unwrap_or_else(|| archive::ArchiveError::BadHeader.into()));
    }
    let header: archive::Header = match std::fs::read(staging.join(archive::HEADER))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
    {
        Some(h) => h,
        None => {
            extraction.abort().await;
            return Err(archive::ArchiveError::BadHeader.into());
        }
    };
    if let Err(e) = check_major(header.postgres.as_ref(), binaries) {
        extraction.abort().await;
        return Err(e.into());
    }
    let build = match Build::start(config, binaries, &plan.account, new_cluster, socket_dir).await {
        Ok(b) => b,
        Err(e) => {
            extraction.abort().await;
            return Err(e);
        }
    };
    fault("restore:staging");
    // The load runs the dump's code, which may never end, and the files may be many: a stop
    // request cancels both (the server's stop ends the dump's sessions and pg_restore with them).
    let loaded = {
        let load = async {
            if !extraction.wait_for(archive::DATABASE).await {
                bail!("the archive has no database dump");
            }
            let owner = header.postgres.as_ref().map(|p| p.user.as_str());
            build
                .load(
                    config,
                    binaries,
                    &staging.join(archive::DATABASE),
                    owner,
                    &plan.scripts,
                )
                .await
        };
        // Nothing of the load is wanted any more once `stop` is cancelled: its server stops
        // writing at once, inside the branch's own future, since `select!` lets go of the load
        // (its processes killed and waited for, a while on a busy machine) before it runs a
        // branch's body: a load that filled the disk went on filling it for two seconds.
        let halted = async {
            stop.cancelled().await;
            build.server.halt();
        };
        tokio::select! {
            r = load => Some(r),
            () = halted => None,
        }
    };
    let Some(loaded) = loaded else {
        extraction.abort().await;
        build.discard(config).await;
        return Err(RestoreCancelled.into());
    };
    let manifest = match (loaded, extraction.finish_unless(stop).await) {
        (Ok(()), Ok(m)) => m,
        (_, Err(e)) | (Err(e), Ok(_)) => {
            build.discard(config).await;
            return Err(e);
        }
    };
    fault("restore:extracted");
    let current = SecretStore::new(&layout.secrets);
    // A throwaway cluster (`--restore-test`, `files` false: no secrets extracted) gets throwaway
    // passwords: a check never reads, nor writes, the live volume's.
    let passwords = if files {
        restored_passwords(config, staging, &current, superuser)
    } else {
        Ok((superuser.to_string(), crate::secrets::generate()))
    };
    let passwords = match passwords {
        Ok(p) => p,
        Err(e) => {
            build.discard(config).await;
            return Err(e);
        }
    };
    build.finish(config, binaries, &passwords).await?;
    sync_filesystem(staging)?;
    Ok(manifest)
}

/// A dump of a newer major than these binaries cannot be restored.
fn check_major(info: Option<&PostgresInfo>, binaries: &Binaries) -> Result<(), RestoreRefused> {
    if let Some(info) = info {
        if let Some(m) = Major::parse(&info.major) {
            if m > binaries.major {
                return Err(RestoreRefused::NewerMajor {
                    archive: info.major.clone(),
                    binaries: binaries.major,
                });
            }
        }
    }
    Ok(())
}

/// Whether these PostgreSQL binaries can restore the archive of `manifest` (when regobox runs
/// the server: an external one is the user's).
pub async fn restorable_here(
    config: &Config,
    path: &Path,
    manifest: &Manifest,
) -> anyhow::Result<()> {
    if config.postgres.mode == crate::config::PostgresMode::Embedded {
        let binaries = Binaries::find(&config.postgres.bin_dir, None).await?;
        check_major(manifest.postgres.as_ref(), &binaries)?;
        judge_dump(config, path, manifest, &binaries).await?;
    }
    Ok(())
}

/// Why PostgreSQL would refuse to create a role named `name` (`CREATE ROLE`), if it would
/// (a name longer than 63 bytes it shortens, so the role made would not be the one named).
fn unmakeable_role(name: &str) -> Option<&'static str> {
    if name.is_empty() || name.len() > 63 {
        Some("is not a role name (1 to 63 bytes)")
    } else if name.contains('\0') {
        Some("holds a NUL byte")
    } else if name == "public" || name == "none" {
        Some("is a name PostgreSQL reserves")
    } else if name.starts_with("pg_") {
        Some("is in PostgreSQL's own names (pg_)")
    } else {
        None
    }
}

/// The dump, judged as the load will judge it (its table of contents and its data read by
/// regobox from the member as it is decompressed, then the dry run of the load's SQL header).
async fn judge_dump(
    config: &Config,
    path: &Path,
    manifest: &Manifest,
    binaries: &Binaries,
) -> anyhow::Result<()> {
    let pg = &config.postgres;
    let owner = manifest
        .postgres
        .as_ref()
        .map(|p| p.user.clone())
        .unwrap_or_else(|| pg.user.clone());
    // A role the load makes (NOLOGIN) when it is not the application's: one PostgreSQL
    // refuses to make failed the load (an attacker's, thirty-third session: verify said OK).
    if owner != pg.user {
        if let Some(why) = unmakeable_role(&owner) {
            return Err(RestoreRefused::DumpUnreadable {
                why: format!("its role {} (manifest.json) {why}", dump::shortened(&owner)),
            }
            .into());
        }
    }
    let load = judged_toc(
        binaries,
        DumpAt::ArchiveMember(path.to_path_buf()),
        &owner,
        &pg.extensions,
        &pg.user,
    )
    .await?;
    // What the load reads of the dump itself (its schemas, the configured extensions'
    // schemas), read now.
    judge_load_sql(binaries, DumpAt::ArchiveMember(path.to_path_buf()), &load).await?;
    Ok(())
}

/// Everything a restore checks before it changes anything, and what it found.
pub struct Plan {
    binaries: Binaries,
    account: crate::users::Account,
    state: DataDirState,
    rules: archive::Rules,
    /// The archive's manifest, verified by the restore's rules.
    pub manifest: Manifest,
    /// What the extraction may write into the staging directory.
    budget: archive::Budget,
    /// What the file systems of the live data keep free while the restore is built.
    reserve: u64,
    /// The configuration's init scripts, run in the rebuilt database (see
    /// [`RestoreOptions::scripts`]).
    scripts: Vec<PathBuf>,
}

/// What the data directory holds, refusing what a restore must not replace: foreign content,
/// and, without `--force`, a cluster or files. Judged when a restore is planned, and again once
/// it holds the volume: a command that made data meanwhile (`init`, `run` while the archive was
/// read) is never replaced without `--force`.
/// `tops`: the top-level volume directories the archive holds (`volumes/<dir>`), each of which
/// the restore swaps in whole: one holding anything is data too (a custom directory, the
/// secrets but this host's state, which a restore keeps). Unknown before the archive is read:
/// judged again then.
fn data_to_replace(
    config: &Config,
    layout: &Layout,
    opts: &RestoreOptions,
    tops: &[String],
) -> anyhow::Result<DataDirState> {
    let pg = &config.postgres;
    let state = cluster::inspect(&pg.data_dir)?;
    if let DataDirState::Foreign(entries) = &state {
        return Err(PostgresError::Foreign {
            data_dir: pg.data_dir.clone(),
            entries: entries.clone(),
        }
        .into());
    }
    let files_hold_data = holds_data(&layout.files);
    if !opts.force {
        let what = match (&state, files_hold_data) {
            (DataDirState::Cluster(m), true) => Some(format!(
                "a PostgreSQL {m} cluster in {} and files in {}",
                pg.data_dir.display(),
                layout.files.display()
            )),
            (DataDirState::Cluster(m), false) => Some(format!(
                "a PostgreSQL {m} cluster in {}",
                pg.data_dir.display()
            )),
            (_, true) => Some(format!("files in {}", layout.files.display())),
            _ => None,
        };
        let others: Vec<String> = tops
            .iter()
            .filter_map(|t| t.strip_prefix("volumes/"))
            .map(|name| layout.root.join(name))
            .filter(|dir| *dir != layout.files && holds_data(dir))
            .map(|dir| dir.display().to_string())
            .collect();
        let what = match (what, others.is_empty()) {
            (what, true) => what,
            (None, false) => Some(format!("what is in {}", others.join(", "))),
            (Some(what), false) => Some(format!("{what}, and what is in {}", others.join(", "))),
        };
        if let Some(what) = what {
            return Err(RestoreRefused::ExistingData { what }.into());
        }
    }
    Ok(state)
}

/// A restore swaps each top-level directory the archive holds whole, and removes the one it
/// replaced: a file system mounted there or inside (a host directory bound into the volume)
/// would be moved aside with it, and what it holds deleted with the previous data (`--force`
/// deleted a mount's files; a mount at the top failed the swap only after all the work).
/// Refused before anything is stopped or written.
fn no_mount_inside(layout: &Layout, tops: &[String]) -> anyhow::Result<()> {
    let mounts = crate::volumes::mount_points();
    // The mount table's paths are resolved: so is the root (a volume reached through a link had
    // a mount inside `files` moved aside and deleted).
    let root = std::fs::canonicalize(&layout.root).unwrap_or_else(|_| layout.root.clone());
    for dir in tops
        .iter()
        .filter_map(|t| t.strip_prefix("volumes/"))
        .map(|name| root.join(name))
    {
        if let Some(mount) = mounts.iter().find(|m| m.starts_with(&dir)) {
            return Err(RestoreRefused::MountInside {
                dir,
                mount: mount.clone(),
            }
            .into());
        }
    }
    Ok(())
}

/// Whether the volume directory `dir` holds anything a restore would replace: any entry but,
/// in the secrets, this host's state (which a restore keeps); or is itself anything but a
/// directory (a file or a link where the archive has a directory: it was moved aside and
/// removed without `--force`).
fn holds_data(dir: &Path) -> bool {
    match std::fs::symlink_metadata(dir) {
        Err(_) => return false,
        Ok(m) if !m.is_dir() => return true,
        Ok(_) => {}
    }
    let secrets = dir.file_name() == Some(std::ffi::OsStr::new(archive::SECRETS));
    std::fs::read_dir(dir).is_ok_and(|mut entries| {
        entries.any(|e| {
            e.is_ok_and(|e| {
                !(secrets && crate::secrets::of_this_host(&e.file_name().to_string_lossy()))
            })
        })
    })
}

/// Check everything a restore of `opts.archive` can check without changing anything: the
/// archive (one full read by every rule of a restore), the binaries, the data directory,
/// existing data without `--force`, the major, and the free space. A restore that would be refused is refused here, before any service
/// stops.
/// `reserve`: what the file systems of the live data must keep free besides the restore's needs
/// (`volumes.min_free` while a server runs on them; see [`begin`]).
pub async fn plan(
    config: &Config,
    layout: &Layout,
    opts: &RestoreOptions,
    reserve: u64,
) -> anyhow::Result<Plan> {
    if !opts.archive.is_file() {
        bail!("{} is not a file", opts.archive.display());
    }
    let pg = &config.postgres;
    let binaries = Binaries::find(&pg.bin_dir, None).await?;
    let home = pg.data_dir.parent().unwrap_or(&pg.data_dir).to_path_buf();
    let account = crate::users::service_account(&pg.os_user, &home, "postgres.os_user").await?;
    let state = data_to_replace(config, layout, opts, &[])?;
    if pg.user == pg.superuser {
        return Err(RestoreRefused::AppIsSuperuser {
            role: pg.user.clone(),
        }
        .into());
    }
    let rules = rules(config, layout);
    let manifest = verify(&opts.archive, &rules).await?;
    data_to_replace(config, layout, opts, &manifest.contents.volumes)?;
    no_mount_inside(layout, &manifest.contents.volumes)?;
    check_major(manifest.postgres.as_ref(), &binaries)?;
    // What the dump holds, judged as the load will judge it (its table of contents only).
    judge_dump(config, &opts.archive, &manifest, &binaries).await?;
    // The staging directory is on the volume, the new cluster beside the data directory.
    let staged = unpack_need(&manifest, true);
    let cluster_dir = pg.data_dir.parent().unwrap_or(&pg.data_dir);
    let cluster = cluster_estimate(
        &manifest,
        crate::volumes::allocation_unit(cluster_dir).max(rules.unit),
    );
    let on_root = space(&layout.root)?;
    let cluster_space = match space(cluster_dir) {
        Ok(s) => s,
        Err(_) => space(&layout.root)?,
    };
    let staged_files = unpack_files(&manifest, true);
    let budget = if cluster_space.dev == on_root.dev {
        need(
            staged.saturating_add(cluster).saturating_add(reserve),
            on_root.free,
            &layout.root,
        )?;
        need_inodes(staged_files + CLUSTER_FILES, &on_root, &layout.root)?;
        on_root.free - cluster - reserve
    } else {
        need(staged.saturating_add(reserve), on_root.free, &layout.root)?;
        need(
            cluster.saturating_add(reserve),
            cluster_space.free,
            cluster_dir,
        )?;
        need_inodes(staged_files, &on_root, &layout.root)?;
        need_inodes(CLUSTER_FILES, &cluster_space, cluster_dir)?;
        on_root.free - reserve
    };
    Ok(Plan {
        binaries,
        account,
        state,
        rules,
        manifest,
        budget: archive::Budget {
            bytes: budget,
            path: layout.root.clone(),
        },
        reserve,
        scripts: opts.scripts.clone(),
    })
}

/// `needs` bytes must fit in `free` on `path`.
fn need(needs: u64, free: u64, path: &Path) -> Result<(), archive::ArchiveError> {
    if needs > free {
        return Err(archive::ArchiveError::NoSpace {
            needs,
            free,
            path: path.to_path_buf(),
        });
    }
    Ok(())
}

/// A restore begun: the volume's restore lock held (no other restore touches its journal and
/// staging) and everything checked that can be without changing anything ([`plan`]).
pub struct Planned {
    _restoring: RestoreLock,
    plan: Plan,
    started: std::time::Instant,
}

/// Take the volume's restore lock (an interrupted restore's leftovers are then cleared) and
/// plan the restore. Changes nothing but the lock's file, removed again if this fails; a stop
/// request ends it where it is. `live`: a server runs on the live data while the restore is
/// built (a running regobox's): its file systems must keep `volumes.min_free` besides what the
/// restore needs, and [`build`] stops if they fall below it.
pub async fn begin(
    config: &Config,
    layout: &Layout,
    opts: &RestoreOptions,
    live: bool,
    stop: &CancellationToken,
) -> anyhow::Result<Planned> {
    let reserve = if live { config.volumes.min_free } else { 0 };
    let started = std::time::Instant::now();
    let Some(restoring) = restore_lock(&layout.root)? else {
        return Err(RestoreInProgress {
            root: layout.root.clone(),
        }
        .into());
    };
    recover_held(config)?;
    let plan = tokio::select! {
        p = plan(config, layout, opts, reserve) => p?,
        _ = stop.cancelled() => return Err(RestoreCancelled.into()),
    };
    Ok(Planned {
        _restoring: restoring,
        plan,
        started,
    })
}

/// What a restore builds beside the live data: the staging directory (the archive's files),
/// the new cluster, its server's socket directory. Removed when this is dropped, except what a
/// journaled swap still needs (the staging directory, until the swap is committed or rolled
/// back): a restore that fails or is cancelled leaves nothing.
struct Workspace {
    root: PathBuf,
    staging: PathBuf,
    new_cluster: PathBuf,
    socket_dir: PathBuf,
}

impl Drop for Workspace {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.socket_dir);
        // Once swapped in, the new cluster is no longer at this path: this removes one that
        // was not.
        let _ = std::fs::remove_dir_all(&self.new_cluster);
        if !journal::exists(&self.root) {
            let _ = std::fs::remove_dir_all(&self.staging);
        }
    }
}

/// A restore's new data, built and checked beside the live data (the dump loaded into a new
/// cluster that was then stopped cleanly, every file extracted and verified), not yet swapped
/// in. Dropped without [`swap_in`], it is removed and the restore lock let go.
pub struct Built {
    // Dropped in this order: what was built, then the lock.
    work: Workspace,
    planned: Planned,
    id: String,
    manifest: Manifest,
    superuser: String,
}

impl Built {
    /// The restore this was built for.
    pub fn planned(&self) -> &Planned {
        &self.planned
    }
}

impl std::fmt::Debug for Built {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Built")
            .field("id", &self.id)
            .field("staging", &self.work.staging)
            .field("new_cluster", &self.work.new_cluster)
            .finish_non_exhaustive()
    }
}

/// Build the restored data of a [`begin`]-ning restore beside the live data, changing nothing
/// of it: no server need be stopped for this (a running regobox's services run meanwhile), and
/// a dump whose load fails, or never ends, costs no downtime. A stop request cancels it
/// ([`RestoreCancelled`]); on any error what it built is removed.
pub async fn build(
    config: &Config,
    layout: &Layout,
    opts: &RestoreOptions,
    planned: Planned,
    stop: &CancellationToken,
) -> anyhow::Result<Built> {
    let pg = &config.postgres;
    let id = format!(
        "{}-{}",
        chrono::Utc::now().format("%Y%m%dT%H%M%S"),
        std::process::id()
    );
    let work = Workspace {
        root: layout.root.clone(),
        staging: layout.root.join(format!("{STAGING}{id}")),
        new_cluster: pg
            .data_dir
            .with_file_name(format!("{STAGING}{}-{id}", data_name(config))),
        socket_dir: config.runtime_dir.join(format!("restore-{id}")),
    };
    let superuser = restored_superuser_password(&SecretStore::new(&layout.secrets))?;
    crate::volumes::ensure_dir(&work.staging, 0o700, "volumes.root")?;
    tracing::info!(archive = %opts.archive.display(), staging = %work.staging.display(), "verifying, extracting and rebuilding the database beside the live data");
    let halt = stop.child_token();
    let manifest = {
        let rebuilt = rebuild(
            config,
            layout,
            &planned.plan,
            Places {
                archive: &opts.archive,
                staging: &work.staging,
                new_cluster: &work.new_cluster,
                socket_dir: &work.socket_dir,
            },
            true,
            &superuser,
            &halt,
        );
        tokio::pin!(rebuilt);
        let dirs = [Some(layout.root.as_path()), pg.data_dir.parent()];
        let watched = keep_room(dirs.into_iter().flatten(), planned.plan.reserve);
        tokio::select! {
            r = &mut rebuilt => r?,
            low = watched => {
                // Cancelled, it removes what it made; then the reason is the room, not a stop.
                halt.cancel();
                let _ = rebuilt.await;
                return Err(low.into());
            }
        }
    };
    let _ = std::fs::remove_dir_all(&work.socket_dir);
    // What was extracted is what was checked: the archive is read again for the extraction,
    // and a file replaced or rewritten meanwhile (it may sit where others write) would swap
    // in what no check saw (a mount inside a directory the check did not know of).
    if manifest.contents.manifest_sha256 != planned.plan.manifest.contents.manifest_sha256 {
        return Err(RestoreRefused::ArchiveChanged {
            archive: opts.archive.clone(),
        }
        .into());
    }
    fault("restore:cluster-ready");
    Ok(Built {
        work,
        planned,
        id,
        manifest,
        superuser,
    })
}

/// A restore built beside the live data was stopped: a file system of the live data fell below
/// what the running server keeps free.
#[derive(Debug, thiserror::Error)]
#[error(
    "the restore was stopped while its data was built beside the live data: {} had {} free, below volumes.min_free ({}), which the running server keeps; nothing was stopped for it (free some space, or restore with regobox stopped)",
    .path.display(),
    archive::bytes(*.free),
    archive::bytes(*.reserve)
)]
pub struct LiveDataRoom {
    pub path: PathBuf,
    pub free: u64,
    pub reserve: u64,
}

/// How often [`keep_room`] looks.
const ROOM_EVERY: Duration = Duration::from_millis(50);

/// Ends, with what it found, once one of `dirs`' file systems has less than `reserve` free;
/// never with no reserve.
async fn keep_room<'a>(dirs: impl Iterator<Item = &'a Path>, reserve: u64) -> LiveDataRoom {
    let dirs: Vec<PathBuf> = dirs.map(Path::to_path_buf).collect();
    if reserve == 0 {
        return std::future::pending().await;
    }
    loop {
        tokio::time::sleep(ROOM_EVERY).await;
        for dir in &dirs {
            if let Ok((free, _)) = crate::volumes::free_space(dir)
                && free < reserve
            {
                return LiveDataRoom {
                    path: dir.clone(),
                    free,
                    reserve,
                };
            }
        }
    }
}

/// The live data directory, held for a restore: made (empty) if there was none; a restore
/// that then fails lets it go with [`HeldData::let_go`], which removes what it made.
pub struct HeldData {
    lock: DataDirLock,
    /// The data directory and the parents made for it, deepest first.
    made: Vec<PathBuf>,
}

impl HeldData {
    /// Take the live data directory's lock: `None` if a server (or another command) holds it.
    /// Once held, what it holds is judged again, since another command may have made data
    /// while the archive was read.
    pub fn take(
        config: &Config,
        layout: &Layout,
        opts: &RestoreOptions,
        planned: &Planned,
    ) -> anyhow::Result<HeldData> {
        let pg = &config.postgres;
        let plan = &planned.plan;
        let made: Vec<PathBuf> = if plan.state == DataDirState::Missing {
            pg.data_dir
                .ancestors()
                .take_while(|p| !p.as_os_str().is_empty() && std::fs::symlink_metadata(p).is_err())
                .map(Path::to_path_buf)
                .collect()
        } else {
            Vec::new()
        };
        if plan.state == DataDirState::Missing {
            crate::volumes::ensure_dir(&pg.data_dir, 0o700, "postgres.data_dir")?;
            cluster::chown(&pg.data_dir, &plan.account)?;
        }
        let Some(lock) =
            DataDirLock::try_acquire(&pg.data_dir, &plan.account, &config.runtime_dir)?
        else {
            return Err(PostgresError::Busy {
                data_dir: pg.data_dir.clone(),
            }
            .into());
        };
        let held = HeldData { lock, made };
        if let Err(e) = data_to_replace(config, layout, opts, &plan.manifest.contents.volumes) {
            held.let_go();
            return Err(e);
        }
        Ok(held)
    }

    /// Let go of the data directory's lock after a restore that changed nothing there; where
    /// the restore made that directory, the lock file goes too, then each directory made if
    /// still empty: a fresh volume is left as it was.
    fn let_go(self) {
        if self.made.is_empty() {
            drop(self.lock);
            return;
        }
        self.lock.remove();
        for dir in &self.made {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

/// Restore an archive into this volume, offline; see the module documentation. The caller
/// makes sure no server runs on it: the live data directory is held for the whole restore.
/// (A running regobox [`begin`]s and [`build`]s while everything runs, and stops everything
/// only for [`swap_in`].)
pub async fn restore(
    config: &Config,
    layout: &Layout,
    opts: &RestoreOptions,
    stop: &CancellationToken,
) -> anyhow::Result<()> {
    let planned = begin(config, layout, opts, false, stop).await?;
    let held = HeldData::take(config, layout, opts, &planned)?;
    let built = match build(config, layout, opts, planned, stop).await {
        Ok(b) => b,
        Err(e) => {
            held.let_go();
            return Err(e);
        }
    };
    swap_in(config, layout, opts, built, held, stop).await
}

/// Swap a [`Built`] restore in for the live data, whose directory `held` holds (no server runs
/// on it). A stop request that came before this began cancels it; once begun it ends (it is
/// renames, under a [`journal`]: until the swap is committed, the previous data is what the
/// next boot finds).
pub async fn swap_in(
    config: &Config,
    layout: &Layout,
    opts: &RestoreOptions,
    built: Built,
    held: HeldData,
    stop: &CancellationToken,
) -> anyhow::Result<()> {
    let result = if stop.is_cancelled() {
        Err(RestoreCancelled.into())
    } else {
        swap_built(config, layout, opts, &built)
    };
    let started = built.planned.started;
    if result.is_err() && !journal::exists(&layout.root) {
        // Nothing was swapped (the journal rolls back a partial swap at the next start): what
        // was built goes first, then the data directory's lock and what was made for it.
        drop(built);
        held.let_go();
    } else {
        drop(held);
        drop(built);
    }
    result?;
    tracing::info!(archive = %opts.archive.display(), elapsed_ms = started.elapsed().as_millis() as u64, "restore complete");
    Ok(())
}

/// What [`swap_in`] does once it may: the staged secrets and logs made this host's and
/// regobox's, every directory judged again, then the journaled renames.
fn swap_built(
    config: &Config,
    layout: &Layout,
    opts: &RestoreOptions,
    built: &Built,
) -> anyhow::Result<()> {
    let pg = &config.postgres;
    let (staging, manifest, plan) = (&built.work.staging, &built.manifest, &built.planned.plan);
    let live_secrets = SecretStore::new(&layout.secrets);
    let staged_secrets = staging.join("volumes").join(archive::SECRETS);
    keep_this_hosts_state(&staged_secrets, &layout.secrets)?;
    own_secrets(&staged_secrets)?;
    if staged_secrets.is_dir() {
        // The archive's secrets are swapped in with the live superuser's, not the archive's.
        SecretStore::new(&staged_secrets)
            .put(SUPERUSER_PASSWORD_SECRET, &built.superuser)
            .context("keeping the superuser's password in the restored secrets")?;
    }
    own_logs(&staging.join("volumes").join(archive::LOGS))?;
    // Swap: the cluster, then every top-level volume directory of the archive (each judged
    // again by the rules, and a directory, not a link, in the staging area).
    let mut pairs = vec![(pg.data_dir.clone(), built.work.new_cluster.clone())];
    for path in &manifest.contents.volumes {
        let Ok(archive::Place::Volume {
            top,
            top_level: true,
        }) = archive::place(path, &plan.rules)
        else {
            continue;
        };
        let staged = staging.join("volumes").join(&top);
        if !std::fs::symlink_metadata(&staged).is_ok_and(|s| s.is_dir()) {
            bail!(
                "{} is not a directory in the staging area",
                staged.display()
            );
        }
        pairs.push((layout.root.join(&top), staged));
    }
    // And once more just before the swap: the files directory is no lock's (a file written
    // there by hand while the database was rebuilt was replaced without `--force`).
    data_to_replace(config, layout, opts, &manifest.contents.volumes)?;
    no_mount_inside(layout, &manifest.contents.volumes)?;
    tracing::info!(directories = pairs.len(), "swapping the restored data in");
    journal::swap(&layout.root, &built.id, &pairs, &fault)?;
    if !staged_secrets.is_dir() && live_secrets.get(SUPERUSER_PASSWORD_SECRET)?.is_none() {
        // An archive without secrets, a volume without the superuser's: the new one.
        live_secrets
            .put(SUPERUSER_PASSWORD_SECRET, &built.superuser)
            .context("recording the superuser's new password")?;
    }
    Ok(())
}

/// The archive's secrets are swapped in with this host's state as the live volume holds it
/// ([`crate::secrets::OF_THIS_HOST`]), never the archive's: what an archive holds of it (and of
/// its temporary files) is removed from the staged secrets, each logged, and the live volume's
/// files are copied in their place.
fn keep_this_hosts_state(staged: &Path, live: &Path) -> anyhow::Result<()> {
    if !staged.is_dir() {
        return Ok(());
    }
    for entry in
        std::fs::read_dir(staged).with_context(|| format!("reading {}", staged.display()))?
    {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if crate::secrets::of_this_host(&name) {
            std::fs::remove_file(entry.path())
                .with_context(|| format!("removing {}", entry.path().display()))?;
            tracing::warn!(secret = %name, "the archive holds this host's state, which a restore never takes from an archive: the live volume's is kept");
        }
    }
    for name in crate::secrets::OF_THIS_HOST {
        let from = live.join(name);
        if std::fs::symlink_metadata(&from).is_ok_and(|m| m.is_file()) {
            let to = staged.join(name);
            std::fs::copy(&from, &to)
                .with_context(|| format!("keeping {} in the restored secrets", from.display()))?;
        }
    }
    Ok(())
}

/// The restored secrets are regobox's, whatever owner and modes the archive gave them: the
/// directory 0700, each file 0600, both owned by regobox's user. Each change is logged.
fn own_secrets(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
    if !dir.is_dir() {
        return Ok(());
    }
    let (uid, gid) = (nix::unistd::geteuid(), nix::unistd::getegid());
    let mut paths = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).with_context(|| format!("reading {}", d.display()))? {
            let entry = entry?;
            if entry.file_type()?.is_dir() {
                stack.push(entry.path());
            } else {
                paths.push(entry.path());
            }
        }
        paths.push(d);
    }
    for path in paths {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        let meta = f.metadata()?;
        let want = if meta.is_dir() { 0o700 } else { 0o600 };
        if !meta.is_dir() && !meta.is_file() {
            bail!("{} is not a file", path.display());
        }
        let mode = meta.permissions().mode() & 0o7777;
        if (meta.uid(), meta.gid()) != (uid.as_raw(), gid.as_raw()) && crate::users::is_root() {
            std::os::unix::fs::fchown(&f, Some(uid.as_raw()), Some(gid.as_raw()))?;
            tracing::warn!(path = %path.display(), uid = meta.uid(), gid = meta.gid(), "the archive gave a secret another owner; given to regobox");
        }
        if mode != want {
            f.set_permissions(std::fs::Permissions::from_mode(want))?;
            tracing::warn!(path = %path.display(), from = format!("{mode:o}"), to = format!("{want:o}"), "the archive gave a secret a looser mode; narrowed");
        }
    }
    Ok(())
}

/// The restored logs directory is regobox's, whatever the archive says: owned by regobox's
/// user and writable by it alone, so that no one else can plant a link (or anything) where
/// regobox, as root, writes the logs. Each change is logged.
fn own_logs(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
    let f = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_DIRECTORY)
        .open(dir)
    {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("opening {}", dir.display())),
    };
    let meta = f.metadata()?;
    let (uid, gid) = (nix::unistd::geteuid(), nix::unistd::getegid());
    if (meta.uid(), meta.gid()) != (uid.as_raw(), gid.as_raw()) && crate::users::is_root() {
        std::os::unix::fs::fchown(&f, Some(uid.as_raw()), Some(gid.as_raw()))
            .with_context(|| format!("giving {} to regobox", dir.display()))?;
        tracing::warn!(path = %dir.display(), uid = meta.uid(), gid = meta.gid(), "the archive gave the logs directory another owner; given to regobox");
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o022 != 0 {
        f.set_permissions(std::fs::Permissions::from_mode(mode & !0o022))
            .with_context(|| format!("narrowing the mode of {}", dir.display()))?;
        tracing::warn!(path = %dir.display(), from = format!("{mode:o}"), to = format!("{:o}", mode & !0o022), "the archive let others write the logs directory; narrowed");
    }
    // The log files too (regobox appends to them as root, and the Docker audit trail is one):
    // regobox's, written by no one else, whatever the archive says. Each is opened from the
    // directory without following a link (the archive holds none there; nothing is trusted).
    let names =
        crate::volumes::names_in(&f).with_context(|| format!("listing {}", dir.display()))?;
    let mut given = 0;
    for name in names {
        let path = dir.join(&name);
        let file = match nix::fcntl::openat(
            &f,
            name.as_os_str(),
            nix::fcntl::OFlag::O_RDONLY
                | nix::fcntl::OFlag::O_NOFOLLOW
                | nix::fcntl::OFlag::O_NONBLOCK
                | nix::fcntl::OFlag::O_NOCTTY
                | nix::fcntl::OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        ) {
            Ok(fd) => File::from(fd),
            Err(e) => {
                return Err(io::Error::from(e))
                    .with_context(|| format!("opening {}", path.display()));
            }
        };
        let m = file.metadata()?;
        if !m.is_file() {
            bail!(
                "{} is not a regular file; the logs directory holds log files only",
                path.display()
            );
        }
        let mode = m.permissions().mode() & 0o7777;
        let foreign = (m.uid(), m.gid()) != (uid.as_raw(), gid.as_raw());
        if foreign && crate::users::is_root() {
            std::os::unix::fs::fchown(&file, Some(uid.as_raw()), Some(gid.as_raw()))
                .with_context(|| format!("giving {} to regobox", path.display()))?;
        }
        if mode & 0o7022 != 0 {
            file.set_permissions(std::fs::Permissions::from_mode(mode & 0o755))
                .with_context(|| format!("narrowing the mode of {}", path.display()))?;
        }
        if foreign || mode & 0o7022 != 0 {
            given += 1;
        }
    }
    if given > 0 {
        tracing::warn!(path = %dir.display(), files = given, "the archive gave log files another owner or let others write them; given to regobox, narrowed");
    }
    Ok(())
}

/// `backup verify --restore-test`: rebuild the archive's database in a throwaway cluster under
/// `work_dir` (never the live volume) and check that it starts and holds the database. Only the
/// dump and the cluster are written; on the volume's own file system they must leave a tenth
/// of it free.
pub async fn restore_test(
    config: &Config,
    layout: &Layout,
    path: &Path,
    work_dir: &Path,
    scripts: &[PathBuf],
    stop: &CancellationToken,
) -> anyhow::Result<()> {
    let pg = &config.postgres;
    let binaries = Binaries::find(&pg.bin_dir, None).await?;
    let home = pg.data_dir.parent().unwrap_or(&pg.data_dir).to_path_buf();
    let account = crate::users::service_account(&pg.os_user, &home, "postgres.os_user").await?;
    let work_dir = std::fs::canonicalize(work_dir)
        .with_context(|| format!("the restore test's directory {}", work_dir.display()))?;
    let root = std::fs::canonicalize(&layout.root).unwrap_or_else(|_| layout.root.clone());
    if work_dir.starts_with(&root) {
        bail!(
            "the restore test's directory {} is on the live volume {}; give another with --work-dir",
            work_dir.display(),
            root.display()
        );
    }
    let rules = rules(config, layout);
    let manifest = tokio::select! {
        m = verify(path, &rules) => m?,
        _ = stop.cancelled() => return Err(RestoreCancelled.into()),
    };
    check_major(manifest.postgres.as_ref(), &binaries)?;
    let cluster = cluster_estimate(&manifest, crate::volumes::allocation_unit(&work_dir));
    let needs = unpack_need(&manifest, false) + cluster;
    let here = space(&work_dir)?;
    let volume = space(&layout.root)?;
    let free = if here.dev == volume.dev {
        here.free.saturating_sub(here.size / 10)
    } else {
        here.free
    };
    need(needs, free, &work_dir)?;
    need_inodes(
        unpack_files(&manifest, false) + CLUSTER_FILES,
        &here,
        &work_dir,
    )?;
    let id = format!(
        "{}-{}",
        chrono::Utc::now().format("%Y%m%dT%H%M%S"),
        std::process::id()
    );
    let work = work_dir.join(format!("regobox-restore-test-{id}"));
    let socket_dir = config.runtime_dir.join(format!("restore-test-{id}"));
    crate::volumes::ensure_dir(&work, 0o755, "--work-dir")?;
    let staging = work.join("archive");
    let result = async {
        crate::volumes::ensure_dir(&staging, 0o700, "--work-dir")?;
        let plan = Plan {
            binaries,
            account,
            state: DataDirState::Missing,
            rules,
            manifest,
            budget: archive::Budget {
                bytes: free - cluster,
                path: work_dir.clone(),
            },
            reserve: 0,
            scripts: scripts.to_vec(),
        };
        rebuild(
            config,
            layout,
            &plan,
            Places {
                archive: path,
                staging: &staging,
                new_cluster: &work.join("pgdata"),
                socket_dir: &socket_dir,
            },
            false,
            &crate::secrets::generate(),
            stop,
        )
        .await
    }
    .await;
    let _ = std::fs::remove_dir_all(&socket_dir);
    let _ = std::fs::remove_dir_all(&work);
    result.map(|_| ())
}

/// Finish or undo an interrupted restore, and remove what an interrupted one left behind.
/// Does nothing while a restore holds the volume (it is not interrupted, it is running).
pub fn recover(config: &Config) -> anyhow::Result<()> {
    let root = &config.volumes.root;
    if !root.is_dir() || !interrupted(config) {
        return Ok(());
    }
    let Some(_lock) = restore_lock(root)? else {
        return Ok(());
    };
    recover_held(config)
}

/// Whether a restore left anything behind (a journal, a staging directory, its lock file): read
/// only.
fn interrupted(config: &Config) -> bool {
    let root = &config.volumes.root;
    journal::exists(root)
        // A restore killed outright leaves its lock file (the lock itself goes with the process).
        || std::fs::symlink_metadata(root.join(RESTORE_LOCK)).is_ok()
        || [Some(root.as_path()), config.postgres.data_dir.parent()]
            .into_iter()
            .flatten()
            .any(|dir| {
                std::fs::read_dir(dir).is_ok_and(|rd| {
                    rd.flatten()
                        .any(|e| e.file_name().to_string_lossy().starts_with(STAGING))
                })
            })
}

/// [`recover`], the restore lock being held by the caller.
fn recover_held(config: &Config) -> anyhow::Result<()> {
    let root = &config.volumes.root;
    if !root.is_dir() {
        return Ok(());
    }
    if let Some(what) = journal::recover(root)? {
        tracing::warn!("{what}");
    }
    let mut leftovers = Vec::new();
    for dir in [Some(root.as_path()), config.postgres.data_dir.parent()]
        .into_iter()
        .flatten()
    {
        if let Ok(rd) = std::fs::read_dir(dir) {
            leftovers.extend(
                rd.flatten()
                    .filter(|e| e.file_name().to_string_lossy().starts_with(STAGING))
                    .map(|e| e.path()),
            );
        }
    }
    for p in leftovers {
        // A restore killed (kill -9) while its new cluster's server ran leaves that server
        // running: stopped before its directory is removed.
        cluster::kill_server_in(&p);
        // The staging directory is `<STAGING><id>`, the cluster `<STAGING><data name>-<id>`;
        // the server's socket directory `restore-<id>`.
        let cluster_prefix = format!("{}-", data_name(config));
        if let Some(id) = p
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix(STAGING))
            .map(|n| n.strip_prefix(&cluster_prefix).unwrap_or(n))
        {
            let _ = std::fs::remove_dir_all(config.runtime_dir.join(format!("restore-{id}")));
        }
        tracing::warn!(path = %p.display(), "removing what an interrupted restore left");
        let _ = std::fs::remove_dir_all(&p);
    }
    Ok(())
}

/// The name of the data directory (`pgdata`), which a restore's new cluster is named after.
fn data_name(config: &Config) -> String {
    config
        .postgres
        .data_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "pgdata".into())
}

/// One line of `regobox backup list`.
#[derive(Debug)]
pub struct Listed {
    pub path: PathBuf,
    pub size: u64,
    pub manifest: Result<Manifest, String>,
}

/// Every archive of the backups directory, verified.
pub async fn list(config: &Config, layout: &Layout) -> Vec<Listed> {
    let rules = rules(config, layout);
    let mut out = Vec::new();
    for path in archives(&layout.backups) {
        let size = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        let manifest = verify(&path, &rules).await.map_err(|e| format!("{:#}", e));
        out.push(Listed {
            path,
            size,
            manifest,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_roles_a_load_cannot_make_are_named() {
        for name in ["app", "regovar", "Émile", &"a".repeat(63)] {
            assert_eq!(unmakeable_role(name), None, "{name}");
        }
        for name in [
            "",
            "public",
            "none",
            "pg_app",
            "pg_",
            &"a".repeat(64),
            "a\0b",
        ] {
            assert!(unmakeable_role(name).is_some(), "{name:?}");
        }
    }

    /// A dump of many entries is loaded by one job (PostgreSQL 15's parallel scheduling is
    /// quadratic in the ready entries: an attacker's archive held a restore for minutes); the
    /// errors `pg_restore` prints of a dump's statement are said on one line, escaped.
    #[test]
    fn a_load_of_many_entries_is_serial_and_its_errors_are_printable() {
        assert_eq!(load_jobs(10, 1), 2);
        assert_eq!(load_jobs(PARALLEL_LOAD_MAX_ENTRIES, 8), 8);
        assert_eq!(load_jobs(PARALLEL_LOAD_MAX_ENTRIES + 1, 8), 1);
        let said = pg_restore_errors(
            b"pg_restore: error: could not execute query: ERROR:  division by zero\nCommand was: SELECT 1/0; -- \x1b]0;PWNED\x07\x1b[2J\nregobox: restore complete\n",
        );
        assert!(!said.chars().any(char::is_control), "{said:?}");
        assert!(
            said.contains("division by zero\\nCommand was: SELECT 1/0; -- \\u{1b}]0;PWNED\\u{7}\\u{1b}[2J\\nregobox: restore complete"),
            "{said}"
        );
    }

    #[test]
    fn the_restore_lock_leaves_nothing_and_is_never_held_twice() {
        let root = tempfile::tempdir().unwrap();
        let held = restore_lock(root.path()).unwrap().expect("free");
        assert!(restore_lock(root.path()).unwrap().is_none(), "held once");
        drop(held);
        assert_eq!(std::fs::read_dir(root.path()).unwrap().count(), 0);
        // Threads taking and letting go of it as fast as they can: a holder removes the file
        // between another's open and its lock, and that other must not hold the old file
        // while a third holds the new one.
        let holders = std::sync::atomic::AtomicUsize::new(0);
        let taken = std::sync::atomic::AtomicUsize::new(0);
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..3000 {
                        if let Some(lock) = restore_lock(root.path()).unwrap() {
                            let before = holders.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                            assert_eq!(before, 0, "two holders of the restore lock at once");
                            taken.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                            std::thread::yield_now();
                            holders.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
                            drop(lock);
                        }
                    }
                });
            }
        });
        assert!(taken.into_inner() > 0);
        assert_eq!(std::fs::read_dir(root.path()).unwrap().count(), 0);
    }

    #[test]
    fn recovery_leaves_a_running_restore_alone() {
        let root = tempfile::tempdir().unwrap();
        let mut config = Config::default();
        config.volumes.root = root.path().to_path_buf();
        config.postgres.data_dir = root.path().join("db/pgdata");
        let live = root.path().join("files");
        let staged = root.path().join(".restore-1/volumes/files");
        std::fs::create_dir_all(&live).unwrap();
        std::fs::create_dir_all(&staged).unwrap();
        // A restore in progress: it holds the lock and is between its two renames.
        let held = restore_lock(root.path()).unwrap().expect("free");
        let interrupted = std::panic::catch_unwind(|| {
            journal::swap(root.path(), "1", &[(live.clone(), staged.clone())], &|p| {
                if p == "restore:swap-0" {
                    panic!("pause here");
                }
            })
        });
        assert!(interrupted.is_err());
        recover(&config).unwrap();
        assert!(
            root.path().join(".regobox-restore.json").exists(),
            "the journal is left alone"
        );
        assert!(staged.exists(), "the staging area is left alone");
        // Once the restore is gone, the same recovery rolls it back.
        drop(held);
        recover(&config).unwrap();
        assert!(!root.path().join(".regobox-restore.json").exists());
        assert!(live.exists() && !root.path().join(".restore-1").exists());
    }
}

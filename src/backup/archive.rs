//! The archive format: one tar stream compressed with zstd (content checksum on).
//!
//! Members, in order: `database.dump` (a `pg_dump` custom-format dump), `volumes/<dir>/...`
//! (files, directories, symlinks and hard links with their modes, owners and times), `config/<n>-<dir>/...`
//! (the configuration files), and last `manifest.json`, which lists every other member with its
//! kind, size, mode and, for files, SHA-256. Verification is one streaming pass: every member is
//! hashed and compared with the manifest; a member missing, extra, duplicated or different, a
//! manifest that is absent or not last, a corrupt or truncated stream are all refused.
//!
//! Everything in it can be read with standard tools: `zstd -d < x.tar.zst | tar -x`, then
//! `pg_restore` on `database.dump`.

use std::collections::BTreeMap;
use std::fs::Metadata;
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The version of this format; readers refuse others.
pub const FORMAT: u32 = 1;
pub const MANIFEST: &str = "manifest.json";
pub const DATABASE: &str = "database.dump";
/// The first member: what a restore needs before the rest arrives (the PostgreSQL facts).
pub const HEADER: &str = "regobox.json";

/// The content of [`HEADER`]; it must agree with the manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    pub format: u32,
    pub postgres: Option<PostgresInfo>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    File,
    Dir,
    Symlink,
    /// Another name of a file member before it, in the same top-level directory (`target`: that
    /// member's path): a hard link, archived and restored as one, so that a file of many names
    /// takes its size once in the archive and once on the restored volume.
    Hardlink,
}

/// One member of the archive, as the manifest records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub path: String,
    pub kind: Kind,
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    pub mode: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
}

/// What the database part holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PostgresInfo {
    /// The server's major version (`15`, `9.6`).
    pub major: String,
    pub server_version: String,
    pub database: String,
    /// The role owning the database.
    pub user: String,
}

/// `manifest.json` but for its list of members, which the writer adds (see [`Listing`]) and the
/// reader compares with the archive's members one by one as it reads them, never holding the
/// list (a crafted archive's list, or its members, could otherwise take gigabytes): what they add
/// up to is in [`Manifest::contents`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    pub regobox_version: String,
    /// RFC 3339, UTC.
    pub created_at: String,
    pub postgres: Option<PostgresInfo>,
    pub secrets_included: bool,
    pub config_included: bool,
    /// What the members add up to (not a field of `manifest.json`).
    #[serde(skip)]
    pub contents: Contents,
}

/// `manifest.json` as written: the manifest and every member.
#[derive(Serialize)]
struct Listing<'a> {
    #[serde(flatten)]
    manifest: &'a Manifest,
    members: &'a [Member],
}

/// What an archive's members add up to: what a restore needs to know of them before it writes
/// anything (space, inodes, the directories it swaps).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Contents {
    /// Members listed (the manifest itself is not one).
    pub members: u64,
    /// The size of `database.dump`.
    pub database_size: u64,
    /// The members outside the volume and configuration trees (the header, the dump).
    pub core: Usage,
    /// The members of the volume and configuration trees.
    pub trees: Usage,
    /// The top-level volume directories (`volumes/<dir>`), in the archive's order.
    pub volumes: Vec<String>,
    /// The SHA-256 of `manifest.json` as read: two reads of archives that give the same had the
    /// same members (each member is checked against its listing), whatever happened to the file
    /// between them (a restore reads it more than once).
    pub manifest_sha256: [u8; 32],
}

/// What a set of members takes once written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Bytes, by [`footprint`].
    pub bytes: u64,
    /// File system entries.
    pub entries: u64,
}

impl Contents {
    /// `footprint`: what the member takes once written ([`footprint`], or for a file read, the
    /// blocks [`Sparse`] stores).
    fn add(&mut self, path: &str, kind: &Kind, size: u64, footprint: u64) {
        self.members += 1;
        if path == DATABASE {
            self.database_size = size;
        }
        let tree = path.starts_with("volumes/") || path.starts_with("config/");
        let usage = if tree {
            &mut self.trees
        } else {
            &mut self.core
        };
        usage.bytes = usage.bytes.saturating_add(footprint);
        if *kind != Kind::Hardlink {
            usage.entries += 1;
        }
        if *kind == Kind::Dir && path.matches('/').count() == 1 && path.starts_with("volumes/") {
            self.volumes.push(path.into());
        }
    }

    /// What unpacking writes: every member (`files`: those of the trees too).
    pub fn unpacked(&self, files: bool) -> Usage {
        if files {
            Usage {
                bytes: self.core.bytes.saturating_add(self.trees.bytes),
                entries: self.core.entries + self.trees.entries,
            }
        } else {
            self.core
        }
    }
}

/// Why an archive is refused.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error("the archive is corrupt or truncated: {0}")]
    Corrupt(String),
    /// Writing what the archive holds failed here (no space left, an I/O error): not the
    /// archive's fault.
    #[error("{0} (this system's fault, not the archive's)")]
    Write(String),
    #[error("the archive has no manifest.json (or it is not the last member)")]
    NoManifest,
    #[error("manifest.json is not valid: {0}")]
    BadManifest(String),
    #[error("archive format {0} is not supported by this regobox (it reads format {FORMAT})")]
    Unsupported(u32),
    /// (The manifest is checked member by member against those read, each taken out once
    /// matched: a member listed twice is missing the second time.)
    #[error("member {0} is listed in the manifest but missing from the archive (or listed twice)")]
    Missing(String),
    #[error("member {0} is in the archive but not in the manifest")]
    Unlisted(String),
    #[error("member {path} does not match the manifest: {what}")]
    Mismatch { path: String, what: String },
    #[error("member path {0:?} is not allowed (absolute, or going up with ..)")]
    UnsafePath(String),
    #[error("member {} is refused: {why}", .path.escape_debug())]
    Refused { path: String, why: String },
    #[error("not enough space: needs {}, {} free on {}", bytes_against(*.needs, *.free), bytes_against(*.free, *.needs), .path.display())]
    NoSpace {
        needs: u64,
        free: u64,
        path: std::path::PathBuf,
    },
    #[error("not enough inodes: needs {needs} files, {free} free on {}", .path.display())]
    NoInodes {
        needs: u64,
        free: u64,
        path: std::path::PathBuf,
    },
    #[error("regobox.json is missing or disagrees with the manifest")]
    BadHeader,
    #[error("extraction stopped")]
    Cancelled,
}

/// [`bytes`] of `n`, exact where it would read as `other` does ("needs 64.0 MiB, 64.0 MiB
/// free").
pub fn bytes_against(n: u64, other: u64) -> String {
    if n != other && bytes(n) == bytes(other) {
        format!("{n} bytes")
    } else {
        bytes(n)
    }
}

/// `n` bytes for a person: `1.5 GiB`.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["bytes", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} bytes")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

fn corrupt(e: impl std::error::Error) -> ArchiveError {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    ArchiveError::Corrupt(text)
}

/// Writes an archive member by member; [`Writer::finish`] appends the manifest.
pub struct Writer<W: Write> {
    tar: tar::Builder<zstd::stream::write::Encoder<'static, W>>,
    members: Vec<Member>,
    /// The files of the tree being added that have other names (by device and inode), and the
    /// path they were archived under first.
    linked: std::collections::HashMap<(u64, u64), String>,
    /// Whether the tree being added may hold hard links (not the secrets, nor the logs, which
    /// hold files only).
    links_here: bool,
    /// The largest manifest written: what a reader reads ([`MAX_MANIFEST`] but in tests).
    max_manifest: u64,
    /// The bytes of `members` in the manifest's compact form.
    listed: u64,
    /// The longest name kept (see [`Writer::keep_names_within`]).
    max_path: usize,
    /// Bytes of member content written so far (for progress).
    pub content_bytes: u64,
}

impl<W: Write> Writer<W> {
    /// A writer compressing at `level` with `threads` worker threads.
    pub fn new(out: W, level: i32, threads: u32) -> io::Result<Self> {
        let mut enc = zstd::stream::write::Encoder::new(out, level)?;
        enc.include_checksum(true)?;
        if threads > 1 {
            enc.multithread(threads)?;
        }
        let mut tar = tar::Builder::new(enc);
        tar.mode(tar::HeaderMode::Complete);
        tar.follow_symlinks(false);
        Ok(Writer {
            tar,
            members: Vec::new(),
            linked: Default::default(),
            links_here: true,
            max_manifest: MAX_MANIFEST,
            listed: 0,
            max_path: MAX_NAME,
            content_bytes: 0,
        })
    }

    /// Add the file at `fs_path` as `path`. A file that shrinks while it is read is padded with
    /// zeros, one that grows is cut at its size when it was listed; the manifest records what
    /// was written.
    pub fn add_file(&mut self, path: &str, fs_path: &Path, meta: &Metadata) -> io::Result<()> {
        let file = std::fs::File::open(fs_path)?;
        self.add_open_file(path, file, fs_path, meta)
    }

    /// [`Writer::add_file`] of a file already open (`fs_path` names it in messages).
    fn add_open_file(
        &mut self,
        path: &str,
        file: std::fs::File,
        fs_path: &Path,
        meta: &Metadata,
    ) -> io::Result<()> {
        let mut header = header_for(meta, tar::EntryType::Regular);
        header.set_size(meta.len());
        let mut reader = Hashing::new(ExactSize::new(file, meta.len()));
        self.tar.append_data(&mut header, path, &mut reader)?;
        if reader.inner.padded > 0 {
            tracing::warn!(file = %fs_path.display(), "file shrank while it was archived; padded with zeros");
        }
        self.content_bytes += meta.len();
        self.push(Member {
            path: path.into(),
            kind: Kind::File,
            size: meta.len(),
            sha256: Some(reader.hex()),
            mode: kept_mode(meta),
            target: None,
        });
        Ok(())
    }

    /// Add `bytes` as a regular file (mode `mode`, owned by root).
    pub fn add_bytes(&mut self, path: &str, bytes: &[u8], mode: u32) -> io::Result<()> {
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(tar::EntryType::Regular);
        header.set_size(bytes.len() as u64);
        header.set_mode(mode);
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(chrono::Utc::now().timestamp().max(0) as u64);
        self.tar.append_data(&mut header, path, bytes)?;
        self.push(Member {
            path: path.into(),
            kind: Kind::File,
            size: bytes.len() as u64,
            sha256: Some(format!("{:x}", Sha256::digest(bytes))),
            mode,
            target: None,
        });
        Ok(())
    }

    pub fn add_dir(&mut self, path: &str, meta: &Metadata) -> io::Result<()> {
        let mut header = header_for(meta, tar::EntryType::Directory);
        header.set_size(0);
        self.tar.append_data(&mut header, path, io::empty())?;
        self.push(Member {
            path: path.into(),
            kind: Kind::Dir,
            size: 0,
            sha256: None,
            mode: kept_mode(meta),
            target: None,
        });
        Ok(())
    }

    pub fn add_symlink(&mut self, path: &str, target: &Path, meta: &Metadata) -> io::Result<()> {
        use std::os::unix::ffi::OsStrExt as _;
        self.append_link(
            tar::EntryType::Symlink,
            path,
            target.as_os_str().as_bytes(),
            meta,
        )?;
        self.push(Member {
            path: path.into(),
            kind: Kind::Symlink,
            size: 0,
            sha256: None,
            mode: kept_mode(meta),
            target: Some(target.to_string_lossy().into_owned()),
        });
        Ok(())
    }

    /// Leave out of the trees a name longer than `max` (what a restore of this volume can
    /// write, [`max_path_under`]), with a warning, rather than archive it for every restore to
    /// fail on.
    pub fn keep_names_within(&mut self, max: usize) {
        self.max_path = max.min(MAX_NAME);
    }

    /// Record `member` for the manifest.
    fn push(&mut self, member: Member) {
        self.listed += serde_json::to_vec(&member).map_or(0, |j| j.len() as u64) + 1;
        self.members.push(member);
    }

    /// Whether the manifest has room for one more member named `path`, whatever it turns out to
    /// be (its link target at most [`MAX_NAME`] bytes, each written as an escape at worst), with
    /// room left for the manifest's other fields.
    fn room_for(&self, path: &str) -> bool {
        let name = serde_json::to_vec(path).map_or(u64::MAX, |j| j.len() as u64);
        let most = name.saturating_add(256 + 6 * MAX_NAME as u64);
        self.listed.saturating_add(most) <= self.max_manifest.saturating_sub(64 << 10)
    }

    /// Add `path` as another name of the file member `first` (a hard link).
    fn add_hardlink(&mut self, path: &str, first: &str, meta: &Metadata) -> io::Result<()> {
        self.append_link(tar::EntryType::Link, path, first.as_bytes(), meta)?;
        self.push(Member {
            path: path.into(),
            kind: Kind::Hardlink,
            size: 0,
            sha256: None,
            mode: kept_mode(meta),
            target: Some(first.into()),
        });
        Ok(())
    }

    /// A link member (`kind`) of `path` to `raw`.
    fn append_link(
        &mut self,
        kind: tar::EntryType,
        path: &str,
        raw: &[u8],
        meta: &Metadata,
    ) -> io::Result<()> {
        let mut header = header_for(meta, kind);
        header.set_size(0);
        // The target as it is, byte for byte: the tar crate's `append_link` respells one that
        // fits the header (`c/./d` as `c/d`, `a//b` as `a/b`), and the archive then differed
        // from its manifest, which no restore takes. A longer one goes in a GNU long link
        // record, as it is.
        let field = header.as_old().linkname.len();
        if raw.len() > field {
            // (`append_link` would respell it too, and find it short enough once respelled.)
            let mut long = tar::Header::new_gnu();
            long.as_gnu_mut().expect("a GNU header").name[..13].copy_from_slice(b"././@LongLink");
            long.set_entry_type(tar::EntryType::GNULongLink);
            long.set_mode(0o644);
            long.set_size(raw.len() as u64 + 1);
            long.set_cksum();
            self.tar.append(&long, raw.chain(&[0u8][..]))?;
        }
        header.set_link_name_literal(&raw[..raw.len().min(field)])?;
        self.tar.append_data(&mut header, path, io::empty())
    }

    /// Add `root` and everything under it as `prefix/...`, in a stable order, never following
    /// symlinks; `skip` says which paths to leave out.
    ///
    /// The application owns these directories and may change them while the backup (root)
    /// walks them: swap a directory or a file for a link, exchange two entries, hold a lease,
    /// nest directories thousands deep. So the walk holds each directory open and opens what is
    /// in it relative to that, never following a link ([`Writer::add_entry_at`]): what is
    /// archived is what was there, or the link as a link, never the link's target. It keeps
    /// its own stack (not the thread's: a deep tree overflowed it, and PID 1 with it). An entry
    /// the format cannot hold (a name or link target that is not UTF-8 or longer than 4 096
    /// bytes) or that changed under the walk is left out with a warning naming it, so that the
    /// backup goes on and its archive restores.
    pub fn add_tree(
        &mut self,
        prefix: &str,
        root: &Path,
        skip: &dyn Fn(&Path) -> bool,
        progress: &dyn Fn(u64),
    ) -> io::Result<()> {
        // Hard links within this tree only: a restore swaps each top-level directory on its own;
        // and never in the secrets or the logs, which a restore takes as files only (a secret
        // left with two names by a write cut short is archived as two files).
        self.linked.clear();
        self.links_here =
            prefix != format!("volumes/{SECRETS}") && prefix != format!("volumes/{LOGS}");
        let top = match self.add_entry_at(prefix, nix::fcntl::AT_FDCWD, root.as_os_str(), root)? {
            Added::Dir(dir) => Level::open(
                dir,
                root.as_os_str(),
                prefix.to_string(),
                root.to_path_buf(),
            )?,
            Added::Done => return Ok(()),
            Added::LeftOut(why) => {
                return Err(io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("{}: {why}", root.display()),
                ));
            }
        };
        let mut stack = vec![top];
        while let Some(level) = stack.last_mut() {
            let Some(name) = level.names.next() else {
                stack.pop();
                // Back up to a directory closed on the way down: opened again, or, moved away
                // meanwhile, the rest of it left out.
                while !stack.is_empty() {
                    match reopen(&mut stack) {
                        Ok(()) => break,
                        Err(i) => {
                            tracing::warn!(path = %stack[i].fs_path.display(), "moved or replaced by the application while the backup ran: what was not yet archived of it is left out");
                            stack.truncate(i);
                        }
                    }
                }
                continue;
            };
            let fs_path = level.fs_path.join(&name);
            if skip(&fs_path) {
                continue;
            }
            let Some(utf8) = name.to_str() else {
                tracing::warn!(path = %fs_path.display(), "left out of the backup: its name is not UTF-8 (rename it to keep it in backups)");
                continue;
            };
            let path = format!("{}/{utf8}", level.path);
            if path.len() > self.max_path {
                tracing::warn!(path = %fs_path.display(), "left out of the backup: its name in the archive is longer than {} bytes, which a restore of this volume cannot write under its staging directory (move it higher to keep it in backups)", self.max_path);
                continue;
            }
            if !self.room_for(&path) {
                tracing::warn!(path = %fs_path.display(), members = self.members.len(), "left out of the backup, with everything after it in {}: the archive's manifest is full (it lists at most {} of members, what a restore reads); leave directories out with backup.include", root.display(), bytes(self.max_manifest));
                return Ok(());
            }
            use std::os::fd::AsFd as _;
            let Some(here) = level.dir.as_ref() else {
                // (The deepest level is always open: `reopen` on the way back up.)
                return Err(io::Error::other(format!(
                    "{}: the walk lost its directory",
                    level.fs_path.display()
                )));
            };
            let added = self.add_entry_at(&path, here.as_fd(), &name, &fs_path)?;
            match added {
                Added::Dir(dir) => {
                    stack.push(Level::open(dir, &name, path, fs_path)?);
                    // The [`HELD`] deepest stay open, and the top one.
                    if stack.len() > HELD + 1 {
                        let closing = stack.len() - HELD - 1;
                        if closing > 0 {
                            stack[closing].dir = None;
                        }
                    }
                }
                Added::LeftOut(why) => {
                    tracing::warn!(path = %fs_path.display(), "left out of the backup: {why}");
                }
                Added::Done => {}
            }
            progress(self.content_bytes);
        }
        Ok(())
    }

    /// Add the entry `name` of the directory `dir` (`fs_path` names it) as `path`: a file with
    /// its content, a link, or a directory member, whose directory is returned to be walked.
    fn add_entry_at(
        &mut self,
        path: &str,
        dir: std::os::fd::BorrowedFd<'_>,
        name: &std::ffi::OsStr,
        fs_path: &Path,
    ) -> io::Result<Added> {
        use nix::errno::Errno;
        use nix::fcntl::{OFlag, openat};
        use nix::sys::stat::Mode;
        let failed = |e: Errno| {
            io::Error::new(
                io::Error::from(e).kind(),
                format!("{}: {e}", fs_path.display()),
            )
        };
        let open = |flags: OFlag| {
            openat(
                dir,
                name,
                flags | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
                Mode::empty(),
            )
            .map(std::fs::File::from)
        };
        // Errors that say the entry changed between two looks (removed, exchanged for another
        // kind, a link put in its place), or that the application holds it (a lease): its own
        // doing, on its own files; the entry is left out, the backup goes on.
        let changed = |e: Errno| {
            matches!(
                e,
                Errno::ENOENT
                    | Errno::ELOOP
                    | Errno::ENOTDIR
                    | Errno::EISDIR
                    | Errno::ENXIO
                    | Errno::ENODEV
                    | Errno::EOPNOTSUPP
                    | Errno::EAGAIN
                    | Errno::EINVAL
            )
        };
        let left_out = |e: Errno| {
            Added::LeftOut(format!(
                "removed, replaced or held by the application while the backup ran ({e})"
            ))
        };
        // What the entry is, without opening it for reading (a device, a FIFO are never opened).
        let look = match open(OFlag::O_PATH) {
            Ok(f) => f,
            Err(Errno::ENOENT) => return Ok(left_out(Errno::ENOENT)),
            Err(e) => return Err(failed(e)),
        };
        let meta = look.metadata()?;
        let ft = meta.file_type();
        if meta.mode() & 0o6000 != 0 && !ft.is_symlink() {
            tracing::warn!(path = %fs_path.display(), mode = format!("{:o}", meta.mode() & 0o7777), "archived without its setuid/setgid bits (a restore refuses them)");
        }
        if ft.is_symlink() {
            // The link the descriptor holds (an empty name: that one, not the one there now).
            let target = match nix::fcntl::readlinkat(&look, "") {
                Ok(t) => t,
                Err(e) if changed(e) => return Ok(left_out(e)),
                Err(e) => return Err(failed(e)),
            };
            let Some(target) = target.to_str().filter(|t| t.len() < MAX_NAME) else {
                return Ok(Added::LeftOut(format!(
                    "its link target is not UTF-8 text of fewer than {MAX_NAME} bytes, which no restore takes"
                )));
            };
            if let Some(why) = refused_by_restore(path, &Kind::Symlink, None, 0) {
                return Ok(Added::LeftOut(why));
            }
            self.add_symlink(path, Path::new(target), &meta)?;
            return Ok(Added::Done);
        }
        if !ft.is_file() && !ft.is_dir() {
            return Ok(Added::LeftOut(
                "not a file, directory or symlink".to_string(),
            ));
        }
        // Opened for reading: the entry just looked at, or it changed.
        let flags = if ft.is_dir() {
            OFlag::O_RDONLY | OFlag::O_DIRECTORY
        } else {
            OFlag::O_RDONLY | OFlag::O_NONBLOCK | OFlag::O_NOCTTY
        };
        let opened = match open(flags) {
            Ok(f) => f,
            Err(e) if changed(e) => return Ok(left_out(e)),
            Err(e) => return Err(failed(e)),
        };
        let now = opened.metadata()?;
        if now.dev() != meta.dev() || now.ino() != meta.ino() || now.file_type() != ft {
            return Ok(Added::LeftOut(
                "replaced by the application while the backup ran".to_string(),
            ));
        }
        let kind = if ft.is_file() { Kind::File } else { Kind::Dir };
        if let Some(why) = refused_by_restore(path, &kind, Some(&opened), now.len()) {
            return Ok(Added::LeftOut(why));
        }
        if ft.is_file() {
            // A file of several names: its content once, under the first name archived, and
            // every other name a link to that one.
            let key = (now.dev(), now.ino());
            if now.nlink() > 1 && self.links_here {
                if let Some(first) = self.linked.get(&key).cloned() {
                    self.add_hardlink(path, &first, &now)?;
                    return Ok(Added::Done);
                }
            }
            self.add_open_file(path, opened, fs_path, &now)?;
            if now.nlink() > 1 && self.links_here {
                self.linked.insert(key, path.to_string());
            }
            Ok(Added::Done)
        } else {
            self.add_dir(path, &now)?;
            Ok(Added::Dir(opened))
        }
    }

    /// Append the manifest (`base` with the member list filled in) and finish the stream.
    ///
    /// The manifest is indented for a reader, or, past what a restore reads
    /// ([`MAX_MANIFEST`]), not; an archive whose manifest would not fit even so is refused here,
    /// never written to be refused by every restore (millions of names: hard links cost no
    /// space).
    pub fn finish(mut self, mut base: Manifest) -> io::Result<(W, Manifest)> {
        let listing = Listing {
            manifest: &base,
            members: &self.members,
        };
        let mut json = serde_json::to_vec_pretty(&listing).map_err(io::Error::other)?;
        if json.len() as u64 > self.max_manifest {
            json = serde_json::to_vec(&listing).map_err(io::Error::other)?;
        }
        if json.len() as u64 > self.max_manifest {
            return Err(io::Error::other(format!(
                "the archive would list {} members in a manifest of {}, more than the {} a restore reads: no archive is written (leave directories out with backup.include)",
                self.members.len(),
                bytes(json.len() as u64),
                bytes(self.max_manifest)
            )));
        }
        base.contents = Contents::default();
        for m in &self.members {
            base.contents
                .add(&m.path, &m.kind, m.size, footprint(&m.kind, m.size));
        }
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(tar::EntryType::Regular);
        header.set_size(json.len() as u64);
        header.set_mode(0o644);
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(chrono::Utc::now().timestamp().max(0) as u64);
        self.tar.append_data(&mut header, MANIFEST, &json[..])?;
        let enc = self.tar.into_inner()?;
        let out = enc.finish()?;
        Ok((out, base))
    }
}

/// What [`Writer::add_entry_at`] did with an entry.
enum Added {
    /// Archived (a file, a link).
    Done,
    /// Archived as a directory member; its directory, open, to walk.
    Dir(std::fs::File),
    /// Left out, and why.
    LeftOut(String),
}

/// The directories of the walk held open at once, the top one's aside: a deeper one's
/// ancestors beyond these are closed, and opened again on the way back up ([`reopen`]). (Every
/// level held open, a tree 2 000 deep took as many descriptors of PID 1's, and its services
/// could not start.)
const HELD: usize = 32;

/// A directory of the walk, with the names it held when listed, in order; open while among the
/// [`HELD`] deepest (or the top one), else known by its name in its parent and its identity.
struct Level {
    dir: Option<std::fs::File>,
    /// Its name in the directory above (the top one's: its path).
    name: std::ffi::OsString,
    dev: u64,
    ino: u64,
    path: String,
    fs_path: std::path::PathBuf,
    names: std::vec::IntoIter<std::ffi::OsString>,
}

impl Level {
    fn open(
        dir: std::fs::File,
        name: &std::ffi::OsStr,
        path: String,
        fs_path: std::path::PathBuf,
    ) -> io::Result<Level> {
        let meta = dir.metadata()?;
        let names = crate::volumes::names_in(&dir)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", fs_path.display())))?;
        Ok(Level {
            dir: Some(dir),
            name: name.to_os_string(),
            dev: meta.dev(),
            ino: meta.ino(),
            path,
            fs_path,
            names: names.into_iter(),
        })
    }
}

/// Open again the deepest level of `stack` (and the [`HELD`] above it), from the nearest
/// ancestor still open, a name at a time without following a link, each checked to be the
/// directory listed. `Err(i)`: level `i` is not where it was (the application moved or
/// replaced it), nor is anything under it.
fn reopen(stack: &mut [Level]) -> Result<(), usize> {
    use nix::fcntl::{OFlag, openat};
    let last = stack.len() - 1;
    let Some(from) = (0..=last).rev().find(|&i| stack[i].dir.is_some()) else {
        return Err(0);
    };
    if from == last {
        return Ok(());
    }
    let keep_from = last.saturating_sub(HELD);
    let mut here = stack[from]
        .dir
        .as_ref()
        .and_then(|d| d.try_clone().ok())
        .ok_or(from)?;
    for (i, level) in stack.iter_mut().enumerate().skip(from + 1) {
        let opened = openat(
            &here,
            level.name.as_os_str(),
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        )
        .map(std::fs::File::from)
        .map_err(|_| i)?;
        let m = opened.metadata().map_err(|_| i)?;
        if (m.dev(), m.ino()) != (level.dev, level.ino) {
            return Err(i);
        }
        if i >= keep_from {
            level.dir = Some(opened.try_clone().map_err(|_| i)?);
        }
        here = opened;
    }
    Ok(())
}

/// The mode an archive records: without the setuid and setgid bits, which a restore refuses.
fn kept_mode(meta: &Metadata) -> u32 {
    meta.mode() & 0o1777
}

fn header_for(meta: &Metadata, kind: tar::EntryType) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(kept_mode(meta));
    h.set_uid(meta.uid() as u64);
    h.set_gid(meta.gid() as u64);
    h.set_mtime(meta.mtime().max(0) as u64);
    h
}

/// A reader giving exactly `size` bytes: cut if the source is longer, zero-padded if shorter.
struct ExactSize<R> {
    inner: R,
    remaining: u64,
    eof: bool,
    padded: u64,
}

impl<R: Read> ExactSize<R> {
    fn new(inner: R, size: u64) -> Self {
        ExactSize {
            inner,
            remaining: size,
            eof: false,
            padded: 0,
        }
    }
}

impl<R: Read> Read for ExactSize<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.remaining == 0 {
            return Ok(0);
        }
        let want = buf
            .len()
            .min(self.remaining.min(usize::MAX as u64) as usize);
        let n = if self.eof {
            0
        } else {
            self.inner.read(&mut buf[..want])?
        };
        let n = if n == 0 {
            self.eof = true;
            buf[..want].fill(0);
            self.padded += want as u64;
            want
        } else {
            n
        };
        self.remaining -= n as u64;
        Ok(n)
    }
}

/// A reader that hashes what passes through it.
struct Hashing<R> {
    inner: R,
    hasher: Sha256,
}

impl<R> Hashing<R> {
    fn new(inner: R) -> Self {
        Hashing {
            inner,
            hasher: Sha256::new(),
        }
    }

    fn hex(&self) -> String {
        format!("{:x}", self.hasher.clone().finalize())
    }
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

/// The volume directory of regobox's secrets: regular files (and regobox's `tls` directory of
/// them), nothing else; given to regobox (directories 0700, files 0600) whatever the archive
/// says, by the restore.
pub const SECRETS: &str = "secrets";
/// The secrets' one subdirectory (the proxy's certificates and keys).
const SECRETS_TLS: &str = "tls";
/// The volume directory regobox writes the services' logs into, as root: no link in it (the
/// logs are opened without following one too, see [`crate::logs::LogFile`]).
pub const LOGS: &str = "logs";

/// The largest `regobox.json` and `manifest.json` read into memory.
const MAX_HEADER: u64 = 1 << 20;
pub const MAX_MANIFEST: u64 = 256 << 20;
/// The fewest bytes of `manifest.json` a member's listing takes besides its name and link target:
/// `{"path":"","kind":"dir","size":0,"mode":0},` is 43. A reader holds each member's name until
/// the manifest comes, last; an archive with more members than a manifest of at most
/// [`Rules::max_manifest`] can list cannot verify, and is refused at the member that shows it,
/// so that what a reader holds is bounded by that size (a 0.5 MB archive of 200 000 long
/// names otherwise took a gigabyte to be refused).
const MIN_LISTING: u64 = 40;
/// The largest secret (a password, an application's secret) read into memory to be checked:
/// it goes into an environment, whose strings Linux bounds at 128 KiB.
const MAX_SECRET: u64 = 64 << 10;
/// The largest file of the secrets' `tls` directory (certificates, keys, the ACME account: a few
/// KiB each), which the proxy reads whole at start.
const MAX_TLS_FILE: u64 = 1 << 20;
/// The longest member name (Linux's `PATH_MAX`), and one more than the longest link target.
const MAX_NAME: usize = 4096;
/// The most top-level directories of the volume an archive holds (`files`, `secrets`, `logs`,
/// what `backup.include` names: a few): each is kept by name until the restore swaps it in.
pub const MAX_VOLUMES: usize = 4096;
/// The longest component of a member name (Linux's `NAME_MAX`).
const MAX_COMPONENT: usize = 255;
/// What a member costs on disk at least (one block): directories, links and small files.
const BLOCK: u64 = 4096;

/// What a member occupies once written: its size rounded up to whole blocks, one block at least;
/// a hard link, nothing but its name in its directory.
pub fn footprint(kind: &Kind, size: u64) -> u64 {
    footprint_in(kind, size, BLOCK)
}

/// [`footprint`] on a file system that allocates `unit` bytes at a time.
fn footprint_in(kind: &Kind, size: u64, unit: u64) -> u64 {
    match kind {
        Kind::File => size.div_ceil(unit).max(1).saturating_mul(unit),
        Kind::Dir | Kind::Symlink => unit,
        // Its directory entry, at most (8 bytes and a name of at most 255, rounded).
        Kind::Hardlink => 264,
    }
}

/// Where a file member's content goes: a block (of the file system's allocation unit,
/// [`Rules::unit`], from the file's start) of zeros is left a hole, which the file system stores
/// nothing for, the others are written (so a sparse file the backup read in full, holes as
/// zeros, is restored sparse, and an archive is charged for what it makes a restore store, in
/// whole units, not for its files' lengths). `file` is `None` to count only (the verifying
/// read).
struct Sparse<'a> {
    file: Option<&'a std::fs::File>,
    /// Bytes not yet judged, from offset `at`.
    pending: Vec<u8>,
    at: u64,
    /// Bytes of the blocks written (whole blocks).
    stored: u64,
    /// What may be stored; past it, `over` says what would have been.
    room: u64,
    over: Option<u64>,
    /// A write to `file` failed.
    failed: bool,
    /// The end of the last bytes written.
    written_to: u64,
    /// What the file system allocates at a time ([`Rules::unit`]): the blocks judged.
    unit: u64,
}

const SPARSE_CHUNK: usize = 1 << 20;

impl<'a> Sparse<'a> {
    fn new(file: Option<&'a std::fs::File>, room: u64, unit: u64) -> Self {
        Sparse {
            unit: unit.max(1),
            file,
            pending: Vec::new(),
            at: 0,
            stored: 0,
            room,
            over: None,
            failed: false,
            written_to: 0,
        }
    }

    fn is_zero(block: &[u8]) -> bool {
        block
            .chunks(64)
            .all(|c| c.iter().fold(0u8, |acc, &b| acc | b) == 0)
    }

    /// Judge the whole blocks pending (and with `last`, the partial one at the end): runs of
    /// blocks not all zeros are written at their offset.
    fn drain(&mut self, last: bool) -> io::Result<()> {
        let b = self.unit as usize;
        let end = if last {
            self.pending.len()
        } else {
            self.pending.len() / b * b
        };
        let mut i = 0;
        while i < end {
            let next = (i + b).min(end);
            if Self::is_zero(&self.pending[i..next]) {
                i = next;
                continue;
            }
            let start = i;
            i = next;
            while i < end {
                let next = (i + b).min(end);
                if Self::is_zero(&self.pending[i..next]) {
                    break;
                }
                i = next;
            }
            let charge = ((i - start) as u64).div_ceil(self.unit) * self.unit;
            if self.stored.saturating_add(charge) > self.room {
                self.over = Some(self.stored.saturating_add(charge));
                return Err(io::Error::other("not enough space"));
            }
            self.stored += charge;
            if let Some(f) = self.file {
                use std::os::unix::fs::FileExt;
                f.write_all_at(&self.pending[start..i], self.at + start as u64)
                    .inspect_err(|_| self.failed = true)?;
            }
            self.written_to = self.at + i as u64;
        }
        self.pending.drain(..end);
        self.at += end as u64;
        Ok(())
    }

    /// The file's length set (a hole at its end is part of it); its size and the bytes stored.
    fn finish(&mut self) -> io::Result<(u64, u64)> {
        self.drain(true)?;
        if let Some(f) = self.file.filter(|_| self.written_to < self.at) {
            f.set_len(self.at).inspect_err(|_| self.failed = true)?;
        }
        Ok((self.at, self.stored))
    }
}

impl Write for Sparse<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = buf.len().min(SPARSE_CHUNK);
        self.pending.extend_from_slice(&buf[..n]);
        if self.pending.len() >= SPARSE_CHUNK.max(self.unit as usize) {
            self.drain(false)?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The top-level directory of the archive that `path` is in (`volumes/<dir>`, `config/<dir>`).
fn tree_of(path: &str) -> Option<&str> {
    let mut slashes = path.match_indices('/').map(|(i, _)| i);
    let first = slashes.next()?;
    let tree = &path[..slashes.next().unwrap_or(path.len())];
    matches!(&path[..first], "volumes" | "config").then_some(tree)
}

/// The archive format's rules for the restore that reads it: which top-level directories of
/// the volume are regobox's own (never restored), and how much may be written.
#[derive(Debug, Clone)]
pub struct Rules {
    /// Names under `volumes/` that are regobox's own (the database, the backups, ...). Names
    /// starting with `.` (the journal, staging, locks) and `lost+found` are always refused.
    pub own: std::collections::BTreeSet<String>,
    /// The largest `manifest.json` read: what a reader holds of an archive is bounded by it (see
    /// [`MIN_LISTING`]). [`MAX_MANIFEST`] but in tests.
    pub max_manifest: u64,
    /// The longest member name a restore here writes: what fits in a path (`PATH_MAX`) under
    /// its staging directory ([`max_path_under`]); [`MAX_NAME`] by default.
    pub max_path: usize,
    /// What the file system written to takes at least for a file that holds anything
    /// ([`crate::volumes::allocation_unit`]): members are charged in whole units, and a unit of
    /// zeros is a hole. [`BLOCK`] by default.
    pub unit: u64,
}

/// The longest member name that, under the staging directory a restore into `root` makes
/// (`<root>/.restore-<date>T<time>-<pid>/`), still fits in a path of `PATH_MAX` bytes: what a
/// backup of that volume keeps, and what a restore there takes.
pub fn max_path_under(root: &Path) -> usize {
    // `/.restore-` 10, the date and time 15, `-` and a pid of at most 7 digits, `/`, the NUL.
    let staging = root.as_os_str().len() + 10 + 15 + 1 + 7 + 1;
    MAX_NAME.saturating_sub(staging + 1)
}

impl Default for Rules {
    fn default() -> Self {
        Rules {
            own: Default::default(),
            max_manifest: MAX_MANIFEST,
            max_path: MAX_NAME,
            unit: BLOCK,
        }
    }
}

/// Where an unpack writes, and within what budget.
pub struct Dest<'a> {
    /// An empty staging directory.
    pub dir: &'a Path,
    /// Write the `volumes/` and `config/` members too (else only the header and the dump).
    pub files: bool,
    /// At most this many bytes (by [`footprint`]) may be written.
    pub budget: Budget,
    /// Set to stop the unpack where it is, within a member too: the next read of the
    /// decompressed stream fails (a few KiB of archive may stand for gigabytes of it).
    pub stop: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
}

/// The decompressed stream, failing once `stop` is set.
struct Stopping<R> {
    inner: R,
    stop: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
}

impl<R: Read> Read for Stopping<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self
            .stop
            .as_ref()
            .is_some_and(|s| s.load(std::sync::atomic::Ordering::Relaxed))
        {
            return Err(io::Error::other("the unpack was stopped"));
        }
        self.inner.read(buf)
    }
}

/// What may be written, and the place whose free space it is (for the message).
#[derive(Debug, Clone)]
pub struct Budget {
    pub bytes: u64,
    pub path: std::path::PathBuf,
}

/// Where a member belongs in the archive format.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Place {
    Header,
    Database,
    Manifest,
    /// `volumes/<top>/...`: a directory of the volume; `top_level` for `volumes/<top>` itself.
    Volume {
        top: String,
        top_level: bool,
    },
    /// `config/<n>-<name>/...`: a configuration directory (kept for reference, never swapped).
    Config {
        top_level: bool,
    },
}

impl Place {
    fn in_tree(&self) -> bool {
        matches!(self, Place::Volume { .. } | Place::Config { .. })
    }

    /// `volumes/<top>` or `config/<top>` itself.
    fn top_level(&self) -> bool {
        matches!(
            self,
            Place::Volume {
                top_level: true,
                ..
            } | Place::Config { top_level: true }
        )
    }
}

fn refused(path: &str, why: impl Into<String>) -> ArchiveError {
    ArchiveError::Refused {
        path: path.into(),
        why: why.into(),
    }
}

/// A member's name in its one spelling: relative, `/`-separated, without `.`, empty or trailing
/// components; `..`, absolute names, NUL and names that are not UTF-8 are refused.
pub fn normalise(raw: &[u8]) -> Result<String, ArchiveError> {
    let text = std::str::from_utf8(raw)
        .map_err(|_| refused(&String::from_utf8_lossy(raw), "its name is not UTF-8"))?;
    if text.len() > MAX_NAME {
        return Err(ArchiveError::Corrupt(format!(
            "a member name of {} bytes; a name is at most {MAX_NAME} bytes",
            text.len()
        )));
    }
    if text.contains('\0') {
        return Err(refused(text, "its name holds a NUL byte"));
    }
    if text.starts_with('/') {
        return Err(ArchiveError::UnsafePath(text.into()));
    }
    let parts: Vec<&str> = text
        .split('/')
        .filter(|p| !p.is_empty() && *p != ".")
        .collect();
    if parts.is_empty() || parts.contains(&"..") {
        return Err(ArchiveError::UnsafePath(text.into()));
    }
    if parts.iter().any(|p| p.len() > MAX_COMPONENT) {
        return Err(refused(
            text,
            format!(
                "a component of its name is longer than {MAX_COMPONENT} bytes, which no file system holds"
            ),
        ));
    }
    Ok(parts.join("/"))
}

/// Where `path` (normalised) belongs; members the format does not define are refused, and so
/// are regobox's own directories.
pub fn place(path: &str, rules: &Rules) -> Result<Place, ArchiveError> {
    match path {
        HEADER => return Ok(Place::Header),
        DATABASE => return Ok(Place::Database),
        MANIFEST => return Ok(Place::Manifest),
        _ => {}
    }
    let mut parts = path.splitn(3, '/');
    let (area, top, rest) = (parts.next(), parts.next(), parts.next());
    let top_level = rest.is_none();
    match (area, top) {
        (Some("volumes"), Some(top)) => {
            if top.starts_with('.') || top == "lost+found" {
                Err(refused(
                    path,
                    format!("`{top}` is not a data directory (regobox's bookkeeping)"),
                ))
            } else if rules.own.contains(top) {
                Err(refused(
                    path,
                    format!(
                        "`{top}` is regobox's own directory (the database, the backups), which a restore never writes"
                    ),
                ))
            } else {
                Ok(Place::Volume {
                    top: top.into(),
                    top_level,
                })
            }
        }
        (Some("config"), Some(_)) => Ok(Place::Config { top_level }),
        _ => Err(refused(
            path,
            "the archive format has no such member (regobox.json, database.dump, volumes/<dir>/..., config/<dir>/..., manifest.json)",
        )),
    }
}

/// What may be under the directories regobox itself writes into as root, where a link could
/// steer its writes (or its reads of the secrets) elsewhere: `secrets/` holds regular files,
/// and the directory `tls` of regular files; `logs/` holds regular files (no link, and no
/// directory, where a link could be put).
fn written_by_regobox(path: &str, top: &str, kind: &Kind) -> Result<(), ArchiveError> {
    let inner: Vec<&str> = path.split('/').skip(2).collect();
    match top {
        SECRETS => {
            let ok = matches!(
                (kind, inner.as_slice()),
                (Kind::Dir, [] | [SECRETS_TLS]) | (Kind::File, [SECRETS_TLS, _])
            );
            let ok = ok
                || matches!((kind, inner.as_slice()), (Kind::File, [name]) if *name != SECRETS_TLS);
            if !ok {
                return Err(refused(
                    path,
                    format!(
                        "the secrets directory holds regular files only (and its `{SECRETS_TLS}` directory of them), never a link or another directory"
                    ),
                ));
            }
        }
        LOGS if !matches!(
            (kind, inner.as_slice()),
            (Kind::Dir, []) | (Kind::File, [_])
        ) =>
        {
            return Err(refused(
                path,
                "regobox writes the logs directory as root; it holds log files only, never a link or a directory",
            ));
        }
        _ => {}
    }
    Ok(())
}

const NO_VALUE: &str = "a secret holds its value as text (UTF-8, not empty, no control character), as regobox reads it and puts it in an environment; this one has none";

/// Whether a secret's content is a value regobox can read: UTF-8 text, not empty, no control
/// character (but the line end, which regobox trims).
fn holds_a_value(content: &[u8]) -> bool {
    std::str::from_utf8(content).is_ok_and(|v| {
        let v = v.trim_end_matches(['\n', '\r']);
        !v.is_empty() && !v.chars().any(char::is_control)
    })
}

/// Why a restore would refuse this entry of the directories regobox writes as root (a link or a
/// directory where it takes files only, a secret too large or without a value), if it would:
/// the backup leaves such an entry out, with a warning naming it, so that its archive restores
/// (a stray file in the secrets made every backup one that no restore took). `file` is the
/// entry opened, for a file.
fn refused_by_restore(
    path: &str,
    kind: &Kind,
    file: Option<&std::fs::File>,
    size: u64,
) -> Option<String> {
    let mut parts = path.split('/');
    let top = match (parts.next(), parts.next()) {
        (Some("volumes"), Some(top)) => top,
        _ => return None,
    };
    if let Err(ArchiveError::Refused { why, .. }) = written_by_regobox(path, top, kind) {
        return Some(why);
    }
    if *kind != Kind::File {
        return None;
    }
    if path.starts_with(&format!("volumes/{SECRETS}/{SECRETS_TLS}/")) && size > MAX_TLS_FILE {
        return Some(format!(
            "a file of the secrets' {SECRETS_TLS} directory is at most {}",
            bytes(MAX_TLS_FILE)
        ));
    }
    if secret_value(path) {
        if size > MAX_SECRET {
            return Some(format!("a secret is at most {}", bytes(MAX_SECRET)));
        }
        let mut content = vec![0u8; size as usize];
        let read = file.map(|f| std::os::unix::fs::FileExt::read_exact_at(f, &mut content, 0));
        if !matches!(read, Some(Ok(()))) || !holds_a_value(&content) {
            return Some(NO_VALUE.into());
        }
    }
    None
}

/// Whether `path` is a file at the top of the secrets directory whose value regobox reads (a
/// password, an application's secret), rather than this host's state, which a restore drops
/// ([`crate::secrets::OF_THIS_HOST`]): such a file must hold a value, checked before anything
/// is stopped or written.
fn secret_value(path: &str) -> bool {
    match path.split('/').collect::<Vec<_>>().as_slice() {
        ["volumes", SECRETS, name] => !crate::secrets::of_this_host(name),
        _ => false,
    }
}

/// The kind and mode of a member; what the format does not hold is refused.
fn kind_of(path: &str, header: &tar::Header) -> Result<(Kind, u32), ArchiveError> {
    let mode = header.mode().map_err(corrupt)? & 0o7777;
    let kind = match header.entry_type() {
        tar::EntryType::Regular | tar::EntryType::Continuous => Kind::File,
        tar::EntryType::Directory => Kind::Dir,
        tar::EntryType::Symlink => Kind::Symlink,
        tar::EntryType::Link => Kind::Hardlink,
        other => {
            // The kinds tar names, by name; any other by its type byte (`V`, a volume label,
            // was "a __Nonexhaustive(86) member").
            let what = match other {
                tar::EntryType::Char
                | tar::EntryType::Block
                | tar::EntryType::Fifo
                | tar::EntryType::GNUSparse => format!("a {other:?} member"),
                _ => format!("a member of type {:?}", char::from(other.as_byte())),
            };
            return Err(refused(
                path,
                format!(
                    "it is {what}; an archive holds files, directories, symbolic links and hard links only"
                ),
            ));
        }
    };
    if mode & 0o6000 != 0 {
        return Err(refused(
            path,
            format!("its mode {mode:o} has the setuid or setgid bit"),
        ));
    }
    Ok((kind, mode))
}

/// Read the whole archive, check it against its manifest, and return the manifest: every rule
/// of a restore applies (see [`unpack_verified`]), so what verifies restores.
pub fn verify(input: impl Read, rules: &Rules) -> Result<Manifest, ArchiveError> {
    read(input, rules, None, None, &mut |_| true)
}

/// [`verify`], ended early (an error) once `stop` is set, within a member too.
pub fn verify_until(
    input: impl Read,
    rules: &Rules,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> Result<Manifest, ArchiveError> {
    read(input, rules, None, Some(stop), &mut |_| true)
}

/// The header must say what the manifest says.
fn check_header(header: Option<&Header>, manifest: &Manifest) -> Result<(), ArchiveError> {
    match header {
        Some(h) if h.format == manifest.format && h.postgres == manifest.postgres => Ok(()),
        _ => Err(ArchiveError::BadHeader),
    }
}

/// The members read from the archive, by name, until the manifest lists them.
type SeenMap = BTreeMap<Box<str>, Seen>;

/// A member as read from the archive, until the manifest's listing of it comes: 32 bytes
/// besides its name (its content's SHA-256 and link target are held as a digest of them).
#[derive(Debug, PartialEq, Eq)]
struct Seen {
    size: u64,
    mode: u32,
    kind: Kind,
    /// [`rest_digest`] of the member's content SHA-256 and link target.
    rest: [u8; 16],
}

impl Seen {
    fn new(kind: Kind, mode: u32, size: u64, sha256: Option<&str>, target: Option<&str>) -> Self {
        Seen {
            size,
            mode,
            kind,
            rest: rest_digest(sha256, target),
        }
    }
}

/// A digest of what a member's listing says beyond its kind, size and mode: its content's
/// SHA-256 (hex) and its link target, each absent or present (SHA-256, cut to 128 bits).
fn rest_digest(sha256: Option<&str>, target: Option<&str>) -> [u8; 16] {
    let mut h = Sha256::new();
    for part in [sha256, target] {
        match part {
            None => h.update([0u8]),
            Some(p) => {
                h.update([1u8]);
                h.update((p.len() as u64).to_le_bytes());
                h.update(p.as_bytes());
            }
        }
    }
    let mut out = [0u8; 16];
    out.copy_from_slice(&h.finalize()[..16]);
    out
}

/// `listed`, one member of the manifest, must be one seen in the archive, and the same; it is
/// taken out of `seen`.
fn check_listed(seen: &mut SeenMap, listed: Member) -> Result<(), ArchiveError> {
    if normalise(listed.path.as_bytes())? != listed.path {
        return Err(ArchiveError::BadManifest(format!(
            "{:?} is not a member name in its one spelling",
            listed.path
        )));
    }
    let Some(actual) = seen.remove(listed.path.as_str()) else {
        return Err(ArchiveError::Missing(listed.path));
    };
    let what = if actual.kind != listed.kind {
        format!(
            "kind {:?} in the archive, {:?} in the manifest",
            actual.kind, listed.kind
        )
    } else if actual.size != listed.size {
        format!(
            "{} bytes in the archive, {} in the manifest",
            actual.size, listed.size
        )
    } else if actual.rest != rest_digest(listed.sha256.as_deref(), listed.target.as_deref()) {
        match actual.kind {
            Kind::Symlink => "its symlink target differs from the manifest's",
            Kind::Hardlink => "the file it is another name of differs from the manifest's",
            _ => "its SHA-256 differs from the manifest's",
        }
        .to_string()
    } else if actual.mode != listed.mode {
        format!(
            "mode {:o} in the archive, {:o} in the manifest",
            actual.mode, listed.mode
        )
    } else {
        return Ok(());
    };
    Err(ArchiveError::Mismatch {
        path: listed.path,
        what,
    })
}

/// `manifest.json`, read as it streams: each member it lists is checked against those seen
/// ([`check_listed`]) and dropped, so that the list is never held. The first refusal is kept in
/// `refusal` (serde's error then only stops the parse).
struct ManifestSeed<'a> {
    seen: &'a mut SeenMap,
    refusal: &'a mut Option<ArchiveError>,
}

#[derive(Deserialize)]
#[serde(field_identifier, rename_all = "snake_case")]
enum ManifestField {
    Format,
    RegoboxVersion,
    CreatedAt,
    Postgres,
    SecretsIncluded,
    ConfigIncluded,
    Members,
    #[serde(other)]
    Other,
}

impl<'de> serde::de::DeserializeSeed<'de> for ManifestSeed<'_> {
    type Value = Manifest;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Manifest, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> serde::de::Visitor<'de> for ManifestSeed<'_> {
    type Value = Manifest;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("regobox's manifest (an object)")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Manifest, A::Error> {
        use serde::de::Error as _;
        fn once<T, E: serde::de::Error>(slot: &Option<T>, name: &'static str) -> Result<(), E> {
            match slot {
                Some(_) => Err(E::duplicate_field(name)),
                None => Ok(()),
            }
        }
        let (mut format, mut version, mut created) = (None, None, None);
        let (mut postgres, mut secrets, mut config, mut members) = (None, None, None, None);
        while let Some(field) = map.next_key::<ManifestField>()? {
            match field {
                ManifestField::Format => {
                    once(&format, "format")?;
                    let f: u32 = map.next_value()?;
                    if f != FORMAT {
                        *self.refusal = Some(ArchiveError::Unsupported(f));
                        return Err(A::Error::custom("unsupported format"));
                    }
                    format = Some(f);
                }
                ManifestField::RegoboxVersion => {
                    once(&version, "regobox_version")?;
                    version = Some(map.next_value::<String>()?);
                }
                ManifestField::CreatedAt => {
                    once(&created, "created_at")?;
                    created = Some(map.next_value::<String>()?);
                }
                ManifestField::Postgres => {
                    once(&postgres, "postgres")?;
                    postgres = Some(map.next_value::<Option<PostgresInfo>>()?);
                }
                ManifestField::SecretsIncluded => {
                    once(&secrets, "secrets_included")?;
                    secrets = Some(map.next_value::<bool>()?);
                }
                ManifestField::ConfigIncluded => {
                    once(&config, "config_included")?;
                    config = Some(map.next_value::<bool>()?);
                }
                ManifestField::Members => {
                    once(&members, "members")?;
                    map.next_value_seed(MembersSeed {
                        seen: &mut *self.seen,
                        refusal: &mut *self.refusal,
                    })?;
                    members = Some(());
                }
                ManifestField::Other => {
                    map.next_value::<serde::de::IgnoredAny>()?;
                }
            }
        }
        members.ok_or_else(|| A::Error::missing_field("members"))?;
        Ok(Manifest {
            format: format.ok_or_else(|| A::Error::missing_field("format"))?,
            regobox_version: version.ok_or_else(|| A::Error::missing_field("regobox_version"))?,
            created_at: created.ok_or_else(|| A::Error::missing_field("created_at"))?,
            postgres: postgres.ok_or_else(|| A::Error::missing_field("postgres"))?,
            secrets_included: secrets.ok_or_else(|| A::Error::missing_field("secrets_included"))?,
            config_included: config.ok_or_else(|| A::Error::missing_field("config_included"))?,
            contents: Contents::default(),
        })
    }
}

/// The manifest's `members`, each checked as it is parsed (see [`ManifestSeed`]).
struct MembersSeed<'a> {
    seen: &'a mut SeenMap,
    refusal: &'a mut Option<ArchiveError>,
}

impl<'de> serde::de::DeserializeSeed<'de> for MembersSeed<'_> {
    type Value = ();

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> serde::de::Visitor<'de> for MembersSeed<'_> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("the list of members")
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while let Some(listed) = seq.next_element::<Member>()? {
            if let Err(e) = check_listed(self.seen, listed) {
                *self.refusal = Some(e);
                return Err(serde::de::Error::custom("refused"));
            }
        }
        Ok(())
    }
}

/// Read `manifest.json` from `input`, checking every member it lists against `seen`; then every
/// member seen must have been listed.
fn read_manifest(input: impl Read, mut seen: SeenMap) -> Result<Manifest, ArchiveError> {
    let mut refusal = None;
    let mut strings = ShortStrings {
        inner: input,
        in_string: false,
        escaped: false,
        length: 0,
        too_long: false,
        sha256: Sha256::new(),
    };
    let mut de = serde_json::Deserializer::from_reader(io::BufReader::new(&mut strings));
    let parsed = serde::de::DeserializeSeed::deserialize(
        ManifestSeed {
            seen: &mut seen,
            refusal: &mut refusal,
        },
        &mut de,
    )
    .and_then(|m| de.end().map(|()| m));
    drop(de);
    let manifest = match (parsed, refusal) {
        (_, Some(refused)) => return Err(refused),
        (Err(_), None) if strings.too_long => {
            return Err(ArchiveError::BadManifest(format!(
                "it holds a string of more than {} (a name is at most {MAX_NAME} bytes)",
                bytes(MAX_JSON_STRING as u64)
            )));
        }
        (Err(e), None) if e.is_io() => return Err(ArchiveError::Corrupt(e.to_string())),
        (Err(e), None) => return Err(ArchiveError::BadManifest(e.to_string())),
        (Ok(m), None) => m,
    };
    if let Some(extra) = seen.into_keys().next() {
        return Err(ArchiveError::Unlisted(extra.into()));
    }
    // The rest of the member (the reader stops at the JSON's end), hashed too.
    io::copy(&mut strings, &mut io::sink()).map_err(|e| ArchiveError::Corrupt(e.to_string()))?;
    let mut manifest = manifest;
    manifest.contents.manifest_sha256 = strings.sha256.finalize().into();
    Ok(manifest)
}

/// The longest string of `manifest.json`: a name or link target, escaped at worst (`\u0001`
/// for each byte), and room to spare. A JSON reader holds a string whole, twice over, before it
/// can refuse it (a 10 KB archive's manifest of one 255 MiB version string took 0.67 GB).
const MAX_JSON_STRING: usize = 6 * MAX_NAME + 1024;

/// `manifest.json` as it streams, cut off (an error) at a string longer than
/// [`MAX_JSON_STRING`]: the strings of JSON (between quotes, an escaped quote or backslash
/// inside) are followed byte by byte, whatever else the text is.
struct ShortStrings<R> {
    inner: R,
    in_string: bool,
    escaped: bool,
    length: usize,
    too_long: bool,
    /// What was read, hashed ([`Contents::manifest_sha256`]).
    sha256: Sha256,
}

impl<R: Read> Read for ShortStrings<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.sha256.update(&buf[..n]);
        for b in &buf[..n] {
            if !self.in_string {
                if *b == b'"' {
                    self.in_string = true;
                    self.length = 0;
                }
                continue;
            }
            if self.escaped {
                self.escaped = false;
            } else if *b == b'\\' {
                self.escaped = true;
            } else if *b == b'"' {
                self.in_string = false;
                continue;
            }
            self.length += 1;
            if self.length > MAX_JSON_STRING {
                self.too_long = true;
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "a string of manifest.json is too long",
                ));
            }
        }
        Ok(n)
    }
}

/// Unpack the archive into `dest` while verifying it: every member is hashed as it is written,
/// and the whole is checked against the manifest at the end.
///
/// Each member is judged before anything is written for it: its name in its one spelling
/// ([`normalise`]), its place in the format ([`place`]: never regobox's own directories), its
/// kind (files, directories and symbolic links; no setuid or setgid bit), its directory (a
/// directory member written before it: a member is never written through a link, nor implied),
/// its uniqueness, and the budget (the sizes the tar headers declare, by [`footprint`]). The
/// first member is `regobox.json`. On an error `dest` holds a partial content the caller
/// discards; nothing outside it is touched. Modes, times and, as root, owners are kept.
/// `on_member` is called after each member is read; returning false stops.
pub fn unpack_verified(
    input: impl Read,
    rules: &Rules,
    dest: Dest<'_>,
    on_member: &mut dyn FnMut(&str) -> bool,
) -> Result<Manifest, ArchiveError> {
    let stop = dest.stop.clone();
    read(input, rules, Some(dest), stop, on_member)
}

/// A directory written by the unpack, whose mode, owner and time are set once everything
/// inside it is written.
struct WrittenDir {
    path: std::path::PathBuf,
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: u64,
}

/// Read the whole archive, hashing every member (and writing it under `dest` if given), then
/// check what was read against the manifest and the header.
fn read(
    input: impl Read,
    rules: &Rules,
    dest: Option<Dest<'_>>,
    stop: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
    on_member: &mut dyn FnMut(&str) -> bool,
) -> Result<Manifest, ArchiveError> {
    use std::os::unix::fs::PermissionsExt;
    let as_root = crate::users::is_root();
    let decoder = Stopping {
        inner: zstd::stream::read::Decoder::new(input).map_err(corrupt)?,
        stop,
    };
    let mut archive = tar::Archive::new(decoder);
    // Every member read, until the manifest lists it; bounded (see `MIN_LISTING`).
    let mut seen = SeenMap::new();
    let mut listable: u64 = 0;
    let mut contents = Contents::default();
    let mut manifest: Option<Result<Manifest, ArchiveError>> = None;
    let mut header_seen: Option<Header> = None;
    let mut dirs: Vec<WrittenDir> = Vec::new();
    let mut written: u64 = 0;
    let io_err = |path: &Path| {
        let path = path.to_path_buf();
        move |e: io::Error| ArchiveError::Write(format!("writing {}: {e}", path.display()))
    };
    {
        // Raw: the tar crate would read a long name or a PAX header whole into memory, whatever
        // size it declares (a 33 KB archive declared a 1 GiB name); they are read here, bounded.
        let entries = archive.entries().map_err(corrupt)?.raw(true);
        let mut long_name: Option<Vec<u8>> = None;
        let mut long_link: Option<Vec<u8>> = None;
        for entry in entries {
            let mut entry = entry.map_err(corrupt)?;
            let kind = entry.header().entry_type();
            if kind.is_gnu_longname() || kind.is_gnu_longlink() {
                let pending = if kind.is_gnu_longname() {
                    &mut long_name
                } else {
                    &mut long_link
                };
                if pending.is_some() || entry.size() > MAX_NAME as u64 + 1 {
                    return Err(ArchiveError::Corrupt(format!(
                        "a long name header of {} bytes (or two for one member); a name is at most {MAX_NAME} bytes",
                        entry.size()
                    )));
                }
                let mut name = Vec::new();
                entry.read_to_end(&mut name).map_err(corrupt)?;
                if name.last() == Some(&0) {
                    name.pop();
                }
                *pending = Some(name);
                continue;
            }
            if kind.is_pax_global_extensions() || kind.is_pax_local_extensions() {
                return Err(ArchiveError::Corrupt(
                    "a PAX extended header; regobox's archives use GNU long names only".into(),
                ));
            }
            let name = match long_name.take() {
                Some(n) => n,
                None => entry.path_bytes().into_owned(),
            };
            let link_name = match long_link.take() {
                Some(l) => Some(l),
                None => entry.link_name_bytes().map(|l| l.into_owned()),
            };
            let path = normalise(&name)?;
            if path.len() > rules.max_path {
                return Err(refused(
                    &path,
                    format!(
                        "its name is {} bytes; under the staging directory of a restore here, a name is at most {} bytes (a path at most {MAX_NAME})",
                        path.len(),
                        rules.max_path
                    ),
                ));
            }
            if manifest.is_some() {
                return Err(ArchiveError::Corrupt(format!(
                    "member {path} comes after the manifest"
                )));
            }
            let place = place(&path, rules)?;
            if seen.is_empty() && place != Place::Header {
                return Err(ArchiveError::Corrupt(format!(
                    "the first member is {path}, not {HEADER}"
                )));
            }
            if seen.contains_key(path.as_str()) {
                return Err(ArchiveError::Corrupt(format!(
                    "member {path} appears twice"
                )));
            }
            let (kind, mode) = kind_of(&path, entry.header())?;
            // GNU tar reads a member whose name ends in `/` as a directory, whatever its type,
            // and a file's content then as more members, which this reader never verified (an
            // attacker's, thirty-second session: a link out, extracted by `zstd -dc | tar -x`).
            if kind != Kind::Dir && (name.ends_with(b"/") || name.ends_with(b"/.")) {
                return Err(refused(
                    &path,
                    "its name ends as a directory's (GNU tar would read it as one), but it is not a directory",
                ));
            }
            let size = entry.size();
            if kind != Kind::File && size != 0 {
                // Bytes no reader of the manifest's would see (GNU tar skips them).
                return Err(refused(
                    &path,
                    format!(
                        "a directory or link member has no content; this one carries {}",
                        bytes(size)
                    ),
                ));
            }
            match (&place, &kind) {
                (Place::Header | Place::Database | Place::Manifest, Kind::File) => {}
                (Place::Header | Place::Database | Place::Manifest, _) => {
                    return Err(refused(&path, "it must be a file"));
                }
                (p, k) if p.top_level() && *k != Kind::Dir => {
                    return Err(refused(
                        &path,
                        "a top-level directory of the archive must be a directory, not a link or a file",
                    ));
                }
                _ => {}
            }
            if let Place::Volume { top, top_level } = &place {
                written_by_regobox(&path, top, &kind)?;
                if *top_level && contents.volumes.len() >= MAX_VOLUMES {
                    return Err(refused(
                        &path,
                        format!(
                            "an archive holds at most {MAX_VOLUMES} top-level volume directories"
                        ),
                    ));
                }
            }
            if place.in_tree() && !place.top_level() {
                let parent = path.rsplit_once('/').map(|(p, _)| p).unwrap_or("");
                if seen.get(parent).map(|m| &m.kind) != Some(&Kind::Dir) {
                    return Err(refused(
                        &path,
                        format!("its directory {parent} is not a directory member before it"),
                    ));
                }
            }
            let secret = kind == Kind::File && secret_value(&path);
            let tls_file = kind == Kind::File
                && path.starts_with(&format!("volumes/{SECRETS}/{SECRETS_TLS}/"));
            let limit = match place {
                Place::Header => Some(MAX_HEADER),
                Place::Manifest => Some(rules.max_manifest),
                _ if secret => Some(MAX_SECRET),
                _ if tls_file => Some(MAX_TLS_FILE),
                _ => None,
            };
            if let Some(limit) = limit.filter(|l| size > *l) {
                return Err(refused(
                    &path,
                    format!(
                        "it declares {}, more than {} allowed",
                        bytes(size),
                        bytes(limit)
                    ),
                ));
            }
            if place == Place::Manifest {
                // Judged once the stream is read to its end (a corrupt tail is said first).
                manifest = Some(read_manifest(&mut entry, std::mem::take(&mut seen)));
                continue;
            }
            let target_len = match kind {
                Kind::Symlink | Kind::Hardlink => link_name.as_ref().map_or(0, |l| l.len()),
                _ => 0,
            };
            listable = listable.saturating_add(MIN_LISTING + (path.len() + target_len) as u64);
            if listable > rules.max_manifest {
                return Err(refused(
                    &path,
                    format!(
                        "the archive has more members than a manifest of at most {} can list: it cannot verify",
                        bytes(rules.max_manifest)
                    ),
                ));
            }
            let to = dest.as_ref().filter(|d| d.files || !place.in_tree());
            if let Some(d) = to {
                // A file's blocks are charged as they are written (those of zeros are holes).
                let charge = match kind {
                    Kind::File => rules.unit,
                    _ => footprint_in(&kind, size, rules.unit),
                };
                written = written.saturating_add(charge);
                if written > d.budget.bytes {
                    return Err(ArchiveError::NoSpace {
                        needs: written,
                        free: d.budget.bytes,
                        path: d.budget.path.clone(),
                    });
                }
                no_symlink_on_the_way(d.dir, &path)?;
                if place.in_tree() {
                    let area = d.dir.join(path.split('/').next().unwrap_or_default());
                    if !area.exists() {
                        std::fs::create_dir(&area).map_err(io_err(&area))?;
                    }
                }
            }
            let target = to.map(|d| d.dir.join(&path));
            let header = entry.header();
            // An owner is a 32-bit id: a larger one (base-256 fields hold 64 bits) was cut to
            // another id (2^32 + 5 restored as 5: an attacker's, thirty-second session).
            let id = |value: u64, what: &str| {
                u32::try_from(value)
                    .map_err(|_| refused(&path, format!("its {what} {value} is not a 32-bit id")))
            };
            let (uid, gid) = (
                id(header.uid().map_err(corrupt)?, "owner")?,
                id(header.gid().map_err(corrupt)?, "group")?,
            );
            let mtime = header.mtime().map_err(corrupt)?;
            let mut file_footprint = 0;
            let member = match kind {
                Kind::File => {
                    let mut hasher = Hashing::new(&mut entry);
                    let mut keep = Vec::new();
                    let (size, stored) = match &target {
                        Some(t) => {
                            let file = std::fs::OpenOptions::new()
                                .write(true)
                                .create_new(true)
                                .open(t)
                                .map_err(io_err(t))?;
                            let room =
                                to.map_or(u64::MAX, |d| d.budget.bytes.saturating_sub(written));
                            let mut out = Sparse::new(Some(&file), room, rules.unit);
                            let copied = io::copy(&mut hasher, &mut out);
                            let (size, stored) = match copied.and_then(|_| out.finish()) {
                                Ok(done) => done,
                                Err(e) => {
                                    return Err(match (out.over, out.failed) {
                                        (Some(needs), _) => ArchiveError::NoSpace {
                                            needs: written.saturating_add(needs),
                                            free: to.map_or(u64::MAX, |d| d.budget.bytes),
                                            path: to.map_or_else(
                                                || t.clone(),
                                                |d| d.budget.path.clone(),
                                            ),
                                        },
                                        (None, true) => io_err(t)(e),
                                        (None, false) => corrupt(e),
                                    });
                                }
                            };
                            written = written.saturating_add(stored.saturating_sub(rules.unit));
                            file.set_permissions(std::fs::Permissions::from_mode(mode))
                                .map_err(io_err(t))?;
                            let _ = file.set_modified(
                                std::time::UNIX_EPOCH + std::time::Duration::from_secs(mtime),
                            );
                            if as_root {
                                std::os::unix::fs::fchown(&file, Some(uid), Some(gid))
                                    .map_err(io_err(t))?;
                            }
                            if place == Place::Header || secret {
                                keep = std::fs::read(t).map_err(io_err(t))?;
                            }
                            (size, stored)
                        }
                        None if place == Place::Header || secret => {
                            hasher.read_to_end(&mut keep).map_err(corrupt)?;
                            let mut out = Sparse::new(None, u64::MAX, rules.unit);
                            out.write_all(&keep).map_err(corrupt)?;
                            out.finish().map_err(corrupt)?
                        }
                        None => {
                            let mut out = Sparse::new(None, u64::MAX, rules.unit);
                            io::copy(&mut hasher, &mut out).map_err(corrupt)?;
                            out.finish().map_err(corrupt)?
                        }
                    };
                    file_footprint = stored.max(rules.unit);
                    if place == Place::Header {
                        header_seen = serde_json::from_slice(&keep).ok();
                    }
                    if secret && !holds_a_value(&keep) {
                        return Err(refused(&path, NO_VALUE));
                    }
                    Seen::new(Kind::File, mode, size, Some(&hasher.hex()), None)
                }
                Kind::Dir => {
                    if let Some(t) = &target {
                        std::fs::DirBuilder::new()
                            .mode(0o700)
                            .create(t)
                            .map_err(io_err(t))?;
                        dirs.push(WrittenDir {
                            path: t.clone(),
                            mode,
                            uid,
                            gid,
                            mtime,
                        });
                    }
                    Seen::new(Kind::Dir, mode, 0, None, None)
                }
                Kind::Symlink => {
                    let link = link_name.ok_or_else(|| {
                        ArchiveError::Corrupt(format!("symlink {path} has no target"))
                    })?;
                    let link = String::from_utf8(link)
                        .map_err(|_| refused(&path, "its link target is not UTF-8"))?;
                    if link.is_empty() || link.contains('\0') || link.len() >= MAX_NAME {
                        return Err(refused(
                            &path,
                            format!(
                                "its link target is empty, holds NUL, or is {MAX_NAME} bytes or more"
                            ),
                        ));
                    }
                    if let Some(t) = &target {
                        std::os::unix::fs::symlink(&link, t).map_err(io_err(t))?;
                        if as_root {
                            std::os::unix::fs::lchown(t, Some(uid), Some(gid))
                                .map_err(io_err(t))?;
                        }
                    }
                    Seen::new(Kind::Symlink, mode, 0, None, Some(&link))
                }
                Kind::Hardlink => {
                    // Another name of a file member before it, in the same top-level directory
                    // (each is swapped in on its own), spelled as that member is.
                    let first = link_name
                        .and_then(|l| String::from_utf8(l).ok())
                        .filter(|l| {
                            normalise(l.as_bytes()).is_ok_and(|n| n == *l)
                                && tree_of(l).is_some()
                                && tree_of(l) == tree_of(&path)
                                && seen.get(l.as_str()).map(|m| &m.kind) == Some(&Kind::File)
                        })
                        .ok_or_else(|| {
                            refused(
                                &path,
                                "a hard link names a file member before it, in the same top-level directory, in its one spelling; this one does not",
                            )
                        })?;
                    if let (Some(d), Some(t)) = (to, &target) {
                        // (`first` is a file member written here, under directory members only.)
                        let from = d.dir.join(&first);
                        match std::fs::hard_link(&from, t) {
                            Ok(()) => {}
                            // The file system here holds fewer names of a file than the one the
                            // backup read (ext4: 65 000): a copy, within the budget.
                            Err(e) if e.raw_os_error() == Some(libc::EMLINK) => {
                                let size = seen.get(first.as_str()).map_or(0, |m| m.size);
                                written = written.saturating_add(footprint_in(
                                    &Kind::File,
                                    size,
                                    rules.unit,
                                ));
                                if written > d.budget.bytes {
                                    return Err(ArchiveError::NoSpace {
                                        needs: written,
                                        free: d.budget.bytes,
                                        path: d.budget.path.clone(),
                                    });
                                }
                                copy_as_is(&from, t).map_err(io_err(t))?;
                            }
                            Err(e) => return Err(io_err(t)(e)),
                        }
                    }
                    Seen::new(Kind::Hardlink, mode, 0, None, Some(&first))
                }
            };
            let taken = match member.kind {
                Kind::File => file_footprint,
                _ => footprint_in(&member.kind, member.size, rules.unit),
            };
            contents.add(&path, &member.kind, member.size, taken);
            seen.insert(path.as_str().into(), member);
            if !on_member(&path) {
                return Err(ArchiveError::Cancelled);
            }
        }
    }
    // Read the stream to its end: a truncated or corrupt tail (and the zstd checksum) shows here.
    // After the end of the archive, zeros only: members hidden there (after a zero block) are
    // read by `tar -i`, never by this reader.
    let mut rest = archive.into_inner();
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = rest.read(&mut buf).map_err(corrupt)?;
        if n == 0 {
            break;
        }
        if buf[..n].iter().any(|b| *b != 0) {
            return Err(ArchiveError::Corrupt(
                "data after the end of the archive (members no reader of this one sees)".into(),
            ));
        }
    }
    let mut manifest = manifest.ok_or(ArchiveError::NoManifest)??;
    check_header(header_seen.as_ref(), &manifest)?;
    manifest.contents = Contents {
        manifest_sha256: manifest.contents.manifest_sha256,
        ..contents
    };
    for d in dirs.into_iter().rev() {
        set_dir_meta(&d, as_root).map_err(io_err(&d.path))?;
    }
    Ok(manifest)
}

/// A copy of the file `from` (written by the unpack) at `to`, with its mode, owner and time.
fn copy_as_is(from: &Path, to: &Path) -> io::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let src = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(from)?;
    let meta = src.metadata()?;
    let mut dst = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(to)?;
    io::copy(&mut &src, &mut dst)?;
    dst.set_permissions(std::fs::Permissions::from_mode(meta.mode() & 0o7777))?;
    if crate::users::is_root() {
        std::os::unix::fs::fchown(&dst, Some(meta.uid()), Some(meta.gid()))?;
    }
    dst.set_modified(meta.modified()?)?;
    Ok(())
}

/// Give a written directory its mode, owner and time, through a descriptor opened without
/// following a link.
fn set_dir_meta(d: &WrittenDir, as_root: bool) -> io::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let dir = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
        .open(&d.path)?;
    if as_root {
        std::os::unix::fs::fchown(&dir, Some(d.uid), Some(d.gid))?;
    }
    dir.set_permissions(std::fs::Permissions::from_mode(d.mode))?;
    let _ = dir.set_modified(std::time::UNIX_EPOCH + std::time::Duration::from_secs(d.mtime));
    Ok(())
}

/// The directory `dest/path` goes into is a directory, not a symlink (an archive could
/// otherwise write outside `dest` through one of its own symlinks). One look, at that directory:
/// every directory above it was looked at when the unpack made it (a member's directory is a
/// directory member written before it, into a staging directory only root enters, and a name is
/// never written twice), where a look at each level made a tree thousands deep take minutes to
/// restore from a 29 KB archive.
fn no_symlink_on_the_way(dest: &Path, path: &str) -> Result<(), ArchiveError> {
    let Some((parent, _)) = path.rsplit_once('/') else {
        return Ok(());
    };
    let at = dest.join(parent);
    match std::fs::symlink_metadata(&at) {
        Ok(m) if m.file_type().is_symlink() || !m.is_dir() => Err(ArchiveError::UnsafePath(
            format!("{path} (through {}, not a directory)", at.display()),
        )),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn into(dir: &Path) -> Dest<'_> {
        Dest {
            dir,
            files: true,
            budget: Budget {
                bytes: u64::MAX,
                path: dir.to_path_buf(),
            },
            stop: None,
        }
    }

    fn base() -> Manifest {
        Manifest {
            format: FORMAT,
            regobox_version: "test".into(),
            created_at: "2026-11-21T00:00:00Z".into(),
            postgres: None,
            secrets_included: true,
            config_included: true,
            contents: Contents::default(),
        }
    }

    /// The member names `manifest.json` lists, in its order.
    fn listed(archive: &[u8]) -> Vec<String> {
        let mut tar = tar::Archive::new(zstd::stream::read::Decoder::new(archive).unwrap());
        for entry in tar.entries().unwrap() {
            let mut entry = entry.unwrap();
            if entry.path().unwrap() == Path::new(MANIFEST) {
                let v: serde_json::Value = serde_json::from_reader(&mut entry).unwrap();
                return v["members"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|m| m["path"].as_str().unwrap().to_string())
                    .collect();
            }
        }
        panic!("no manifest");
    }

    /// A writer whose archive starts with the header of [`base`].
    fn writer() -> Writer<Vec<u8>> {
        let mut w = Writer::new(Vec::new(), 3, 1).unwrap();
        let h = Header {
            format: FORMAT,
            postgres: None,
        };
        w.add_bytes(HEADER, &serde_json::to_vec(&h).unwrap(), 0o644)
            .unwrap();
        w
    }

    fn sample() -> (tempfile::TempDir, Vec<u8>) {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("files");
        std::fs::create_dir_all(root.join("empty")).unwrap();
        std::fs::write(root.join("a.txt"), b"hello").unwrap();
        std::fs::write(root.join("big.bin"), vec![42u8; 300_000]).unwrap();
        std::os::unix::fs::symlink("a.txt", root.join("link")).unwrap();
        let mut w = writer();
        w.add_tree("volumes/files", &root, &|_| false, &|_| {})
            .unwrap();
        let (bytes, _) = w.finish(base()).unwrap();
        (dir, bytes)
    }

    /// Blocks of zeros become holes, whatever the reads' sizes; partial blocks at the end and
    /// between are written; what is stored is counted in whole blocks and held to the room.
    #[test]
    fn zeros_are_holes_and_the_rest_is_written_and_charged() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let b = BLOCK as usize;
        let mut content = vec![0u8; 40 * b + 100];
        content[..3].copy_from_slice(b"abc"); // block 0
        content[10 * b - 1] = 7; // block 9, last byte
        content[10 * b] = 8; // block 10, first byte: one run of two blocks
        content[20 * b + 5] = 9; // block 20
        content[40 * b + 99] = 1; // the partial block at the end
        for read in [1, 7, 4096, 5000, 1 << 20, 3 << 20] {
            let path = dir.path().join(format!("f{read}"));
            let file = std::fs::File::create(&path).unwrap();
            let mut out = Sparse::new(Some(&file), u64::MAX, BLOCK);
            for chunk in content.chunks(read) {
                out.write_all(chunk).unwrap();
            }
            let (size, stored) = out.finish().unwrap();
            assert_eq!(size, content.len() as u64);
            assert_eq!(stored, 5 * BLOCK, "reads of {read}");
            assert_eq!(std::fs::read(&path).unwrap(), content);
            drop(file);
            let blocks = std::fs::metadata(&path).unwrap().blocks() * 512;
            assert!(blocks <= 8 * BLOCK, "{blocks} bytes stored");
        }
        // A file that ends in a hole keeps its length; one of zeros only stores nothing.
        for content in [vec![0u8; 3 * b + 1], [&b"x"[..], &[0u8; 9000][..]].concat()] {
            let path = dir.path().join("tail");
            let _ = std::fs::remove_file(&path);
            let file = std::fs::File::create(&path).unwrap();
            let mut out = Sparse::new(Some(&file), u64::MAX, BLOCK);
            out.write_all(&content).unwrap();
            out.finish().unwrap();
            assert_eq!(std::fs::read(&path).unwrap(), content);
        }
        // The room: four blocks of data in three blocks' room.
        let path = dir.path().join("full");
        let file = std::fs::File::create(&path).unwrap();
        let mut out = Sparse::new(Some(&file), 3 * BLOCK, BLOCK);
        let data = vec![1u8; 4 * b];
        assert!(out.write_all(&data).and_then(|_| out.finish()).is_err());
        assert_eq!(out.over, Some(4 * BLOCK));
        assert!(!out.failed);
        // Counting alone (the verifying read) gives the same.
        let mut count = Sparse::new(None, u64::MAX, BLOCK);
        count.write_all(&content).unwrap();
        assert_eq!(count.finish().unwrap(), (content.len() as u64, 5 * BLOCK));
        // Where the file system allocates 64 KiB at a time (ext4's bigalloc), a byte in each
        // of 16 units costs 16 units: judged, and charged, by units.
        let mut strided = vec![0u8; 16 << 16];
        for unit in 0..16 {
            strided[(unit << 16) + 4096 * (unit % 16)] = 1;
        }
        let mut count = Sparse::new(None, u64::MAX, 1 << 16);
        for chunk in strided.chunks(5000) {
            count.write_all(chunk).unwrap();
        }
        assert_eq!(count.finish().unwrap(), (16 << 16, 16 << 16));
        let mut count = Sparse::new(None, u64::MAX, 2 << 20);
        count.write_all(&strided).unwrap();
        assert_eq!(count.finish().unwrap(), (16 << 16, 2 << 20));
    }

    #[test]
    fn a_written_archive_verifies_and_unpacks_identically() {
        let (dir, bytes) = sample();
        let m = verify(&bytes[..], &Rules::default()).unwrap();
        let paths = listed(&bytes);
        let paths: Vec<&str> = paths.iter().map(String::as_str).collect();
        assert_eq!(m.contents.members, paths.len() as u64);
        assert_eq!(
            paths,
            vec![
                "regobox.json",
                "volumes/files",
                "volumes/files/a.txt",
                "volumes/files/big.bin",
                "volumes/files/empty",
                "volumes/files/link"
            ]
        );
        let out = dir.path().join("out");
        std::fs::create_dir(&out).unwrap();
        assert_eq!(
            unpack_verified(&bytes[..], &Rules::default(), into(&out), &mut |_| true).unwrap(),
            m
        );
        assert_eq!(
            std::fs::read(out.join("volumes/files/a.txt")).unwrap(),
            b"hello"
        );
        assert_eq!(
            std::fs::read_link(out.join("volumes/files/link")).unwrap(),
            Path::new("a.txt")
        );
        assert!(out.join("volumes/files/empty").is_dir());
    }

    #[test]
    fn long_names_and_link_targets_round_trip_and_a_declared_bomb_is_never_read() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("files");
        let deep = root.join("d".repeat(120)).join("e".repeat(120));
        std::fs::create_dir_all(&deep).unwrap();
        std::fs::write(deep.join("f".repeat(200)), b"long").unwrap();
        std::os::unix::fs::symlink("t".repeat(300), root.join("l".repeat(150))).unwrap();
        let mut w = writer();
        w.add_tree("volumes/files", &root, &|_| false, &|_| {})
            .unwrap();
        let (bytes, _) = w.finish(base()).unwrap();
        let out = dir.path().join("out");
        std::fs::create_dir(&out).unwrap();
        unpack_verified(&bytes[..], &Rules::default(), into(&out), &mut |_| true).unwrap();
        let name = out
            .join("volumes/files")
            .join("d".repeat(120))
            .join("e".repeat(120))
            .join("f".repeat(200));
        assert_eq!(std::fs::read(name).unwrap(), b"long");
        assert_eq!(
            std::fs::read_link(out.join("volumes/files").join("l".repeat(150))).unwrap(),
            Path::new(&"t".repeat(300))
        );

        // A GNU long name (or a PAX header) declaring a megabyte: refused on what it declares,
        // never read into memory (the tar crate reads it whole, whatever it declares).
        for (kind, size) in [(b'L', 1 << 20), (b'K', 1 << 20), (b'x', 100)] {
            let mut tar = Vec::new();
            let mut h = tar::Header::new_gnu();
            h.as_gnu_mut().unwrap().name[..13].copy_from_slice(b"././@LongLink");
            h.set_size(size);
            h.set_entry_type(tar::EntryType::new(kind));
            h.set_cksum();
            tar.extend_from_slice(h.as_bytes());
            tar.extend(std::iter::repeat_n(b'a', size as usize));
            tar.resize(tar.len().next_multiple_of(512) + 1024, 0);
            let z = zstd::encode_all(&tar[..], 1).unwrap();
            let e = verify(&z[..], &Rules::default()).unwrap_err().to_string();
            let want = if kind == b'x' {
                "a PAX extended header"
            } else {
                "a long name header of 1048576 bytes"
            };
            assert!(e.contains(want), "{}: {e}", kind as char);
        }
    }

    /// Attack (seventh session): the application removes a file between the backup's listing
    /// of its directory and the file's turn; every backup failed (`No such file or
    /// directory`). It is left out, and the archive verifies.
    #[test]
    fn a_file_removed_while_the_backup_runs_is_left_out() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("files");
        std::fs::create_dir_all(root.join("c_dir")).unwrap();
        std::fs::write(root.join("a_big"), b"a").unwrap();
        std::fs::write(root.join("b_tmp"), b"b").unwrap();
        std::fs::write(root.join("c_dir/x"), b"x").unwrap();
        let mut w = writer();
        let (b_tmp, c_dir) = (root.join("b_tmp"), root.join("c_dir"));
        // Asked about `a_big` (after the listing): the application removes the other two then.
        let skip = |p: &Path| {
            if p.ends_with("a_big") {
                std::fs::remove_file(&b_tmp).unwrap();
                std::fs::remove_dir_all(&c_dir).unwrap();
            }
            false
        };
        w.add_tree("volumes/files", &root, &skip, &|_| {}).unwrap();
        let (bytes, _) = w.finish(base()).unwrap();
        let m = verify(&bytes[..], &Rules::default()).unwrap();
        let paths = listed(&bytes);
        let paths: Vec<&str> = paths.iter().map(String::as_str).collect();
        assert_eq!(m.contents.members, paths.len() as u64);
        assert_eq!(
            paths,
            vec!["regobox.json", "volumes/files", "volumes/files/a_big"]
        );
    }

    /// Attack (eighth session): the backup runs as root and walked the application's
    /// directories by path; the application swaps a directory (or a file) already listed for a
    /// link to a place it cannot read, and the backup archived that place's files under the
    /// application's names. The walk holds each directory open instead: what is archived is
    /// what was there.
    #[test]
    fn a_directory_or_file_swapped_for_a_link_during_the_backup_archives_nothing_of_its_target() {
        let dir = tempfile::tempdir().unwrap();
        let outside = dir.path().join("outside");
        std::fs::create_dir_all(outside.join("sub")).unwrap();
        std::fs::write(outside.join("sub/shadow"), b"root:secret").unwrap();
        std::fs::write(outside.join("key"), b"root:secret").unwrap();
        let root = dir.path().join("files");
        std::fs::create_dir_all(root.join("c_dir/sub")).unwrap();
        std::fs::write(root.join("c_dir/sub/mine"), b"mine").unwrap();
        std::fs::write(root.join("d_file"), b"mine").unwrap();
        let mut w = writer();
        // Asked about `c_dir/sub` (its parent already open and listed): the application moves
        // `c_dir` away and puts a link to `outside` in its place, and the same for `d_file`.
        let skip = |p: &Path| {
            if p.ends_with("c_dir/sub") {
                std::fs::rename(root.join("c_dir"), root.join("c_old")).unwrap();
                std::os::unix::fs::symlink(&outside, root.join("c_dir")).unwrap();
                std::fs::rename(root.join("d_file"), root.join("d_old")).unwrap();
                std::os::unix::fs::symlink(outside.join("key"), root.join("d_file")).unwrap();
            }
            false
        };
        w.add_tree("volumes/files", &root, &skip, &|_| {}).unwrap();
        let (bytes, _) = w.finish(base()).unwrap();
        let m = verify(&bytes[..], &Rules::default()).unwrap();
        let paths = listed(&bytes);
        let paths: Vec<&str> = paths.iter().map(String::as_str).collect();
        assert_eq!(m.contents.members, paths.len() as u64);
        assert_eq!(
            paths,
            vec![
                "regobox.json",
                "volumes/files",
                "volumes/files/c_dir",
                "volumes/files/c_dir/sub",
                "volumes/files/c_dir/sub/mine",
                "volumes/files/d_file",
            ]
        );
        let out = dir.path().join("out");
        std::fs::create_dir(&out).unwrap();
        unpack_verified(&bytes[..], &Rules::default(), into(&out), &mut |_| true).unwrap();
        assert_eq!(
            std::fs::read(out.join("volumes/files/c_dir/sub/mine")).unwrap(),
            b"mine"
        );
        // `d_file` was listed before the swap and opened after it: the link, as a link.
        assert_eq!(
            std::fs::read_link(out.join("volumes/files/d_file")).unwrap(),
            outside.join("key")
        );
    }

    /// Attacks (eighth session), each by the application on its own files while root backs
    /// them up: a tree 3 000 directories deep overflowed the walk's stack (300 levels aborted
    /// PID 1 at a scheduled backup); a path over 4 096 bytes or a link to a target that is not
    /// UTF-8 made an archive that no restore takes (the backup said nothing); a write lease
    /// made every backup fail. Now each such entry is left out with a warning, the rest is
    /// archived, and the archive verifies. Then (the re-attack): every level held open, a tree
    /// 2 000 deep took as many of PID 1's descriptors (its services could not start, at 1 024);
    /// the walk now holds a few dozen, and a directory moved while it was closed is left out.
    #[test]
    fn a_tree_too_deep_names_too_long_and_a_leased_file_leave_a_backup_that_restores() {
        use std::os::unix::ffi::OsStrExt as _;
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("files");
        std::fs::create_dir_all(&root).unwrap();
        std::fs::write(root.join("a_first"), b"kept").unwrap();
        // 3 000 levels, made relative to each level (no path is ever that long).
        let mut fd = nix::fcntl::open(
            &root,
            nix::fcntl::OFlag::O_DIRECTORY,
            nix::sys::stat::Mode::empty(),
        )
        .unwrap();
        for _ in 0..3000 {
            nix::sys::stat::mkdirat(&fd, "d", nix::sys::stat::Mode::from_bits_truncate(0o755))
                .unwrap();
            fd = nix::fcntl::openat(
                &fd,
                "d",
                nix::fcntl::OFlag::O_DIRECTORY,
                nix::sys::stat::Mode::empty(),
            )
            .unwrap();
        }
        drop(fd);
        std::os::unix::fs::symlink(
            std::ffi::OsStr::from_bytes(b"\xff\xfe"),
            root.join("bad_link"),
        )
        .unwrap();
        std::fs::write(root.join("leased"), b"held").unwrap();
        std::fs::write(root.join("z_last"), b"kept").unwrap();
        // The lease, held by another process (a write lease: any other open is refused while
        // it is held, and a non-blocking one at once).
        let mut holder = std::process::Command::new("python3")
            .arg("-c")
            .arg("import fcntl, os, signal, sys, time\nsignal.signal(signal.SIGIO, signal.SIG_IGN)\nfd = os.open(sys.argv[1], os.O_RDONLY)\nfcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_WRLCK)\nprint('held', flush=True)\ntime.sleep(60)")
            .arg(root.join("leased"))
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(holder.stdout.as_mut().unwrap()),
            &mut line,
        )
        .unwrap();
        assert_eq!(line.trim(), "held");
        let mut w = writer();
        // Half-way down, the application moves a directory near the top elsewhere: on the way
        // back up, the walk finds it gone from where it was, and leaves the rest of it out.
        let moved = std::cell::Cell::new(false);
        let skip = |p: &Path| {
            if !moved.get() && p.strip_prefix(&root).map(|r| r.components().count()) == Ok(100) {
                std::fs::rename(root.join("d/d/d/d/d"), root.join("moved")).unwrap();
                moved.set(true);
            }
            false
        };
        // The descriptors the walk holds, at most.
        let descriptors = || std::fs::read_dir("/proc/self/fd").unwrap().count();
        let before = descriptors();
        let most = std::cell::Cell::new(0);
        let walked = w.add_tree("volumes/files", &root, &skip, &|_| {
            most.set(most.get().max(descriptors()))
        });
        let _ = holder.kill();
        let _ = holder.wait();
        assert!(moved.get());
        assert!(
            most.get() < before + 64,
            "the walk held {} descriptors ({before} before)",
            most.get()
        );
        walked.unwrap();
        let (bytes, _) = w.finish(base()).unwrap();
        let m = verify(&bytes[..], &Rules::default()).unwrap();
        let paths = listed(&bytes);
        let paths: Vec<&str> = paths.iter().map(String::as_str).collect();
        assert_eq!(m.contents.members, paths.len() as u64);
        assert!(
            paths.contains(&"volumes/files/a_first") && paths.contains(&"volumes/files/z_last"),
            "{:?}",
            &paths[..4]
        );
        assert!(
            !paths
                .iter()
                .any(|p| p.ends_with("leased") || p.ends_with("bad_link"))
        );
        let deepest = paths.iter().map(|p| p.len()).max().unwrap();
        assert!(deepest <= MAX_NAME && deepest > MAX_NAME - 2, "{deepest}");
    }

    /// Attack (eighth session's re-attack): a link the application made to `c/./d` was
    /// archived as `c/d` by the tar crate while the manifest said `c/./d`: the backup said
    /// nothing, and the archive never verified. Targets are archived as they are.
    #[test]
    fn link_targets_are_archived_byte_for_byte() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("files");
        std::fs::create_dir_all(&root).unwrap();
        let targets = [
            "c/./d",
            "a//b",
            "x/.",
            "./y",
            "z/",
            "../up",
            &"l/./".repeat(40),
        ];
        for (i, t) in targets.iter().enumerate() {
            std::os::unix::fs::symlink(t, root.join(format!("link{i}"))).unwrap();
        }
        let mut w = writer();
        w.add_tree("volumes/files", &root, &|_| false, &|_| {})
            .unwrap();
        let (bytes, _) = w.finish(base()).unwrap();
        verify(&bytes[..], &Rules::default()).unwrap();
        let out = dir.path().join("out");
        std::fs::create_dir(&out).unwrap();
        unpack_verified(&bytes[..], &Rules::default(), into(&out), &mut |_| true).unwrap();
        for (i, t) in targets.iter().enumerate() {
            assert_eq!(
                std::fs::read_link(out.join(format!("volumes/files/link{i}"))).unwrap(),
                Path::new(t)
            );
        }
    }

    #[test]
    fn damage_of_every_kind_is_refused() {
        let (_dir, bytes) = sample();
        // A flipped byte anywhere in the compressed stream.
        for at in [20, bytes.len() / 2, bytes.len() - 10] {
            let mut b = bytes.clone();
            b[at] ^= 0x40;
            assert!(
                verify(&b[..], &Rules::default()).is_err(),
                "flip at {at} accepted"
            );
        }
        // Truncated.
        for len in [bytes.len() - 1, bytes.len() / 2, 10] {
            assert!(
                verify(&bytes[..len], &Rules::default()).is_err(),
                "truncation to {len} accepted"
            );
        }
    }

    #[test]
    fn a_manifest_that_lies_or_lacks_a_member_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("f");
        std::fs::write(&f, b"content").unwrap();
        let meta = std::fs::metadata(&f).unwrap();
        let dmeta = std::fs::metadata(dir.path()).unwrap();
        let writer = || {
            let mut w = writer();
            w.add_dir("volumes/d", &dmeta).unwrap();
            w
        };
        // A lie: the manifest says other content.
        let mut w = writer();
        w.add_file("volumes/d/f", &f, &meta).unwrap();
        w.members[2].sha256 = Some("00".repeat(32));
        let (bytes, _) = w.finish(base()).unwrap();
        assert!(matches!(
            verify(&bytes[..], &Rules::default()),
            Err(ArchiveError::Mismatch { .. })
        ));
        // A member listed but missing.
        let mut w = writer();
        w.add_file("volumes/d/f", &f, &meta).unwrap();
        let mut ghost = w.members[2].clone();
        ghost.path = "volumes/d/ghost".into();
        w.members.push(ghost);
        let (bytes, _) = w.finish(base()).unwrap();
        assert!(
            matches!(verify(&bytes[..], &Rules::default()), Err(ArchiveError::Missing(p)) if p == "volumes/d/ghost")
        );
        // A member not listed.
        let mut w = writer();
        w.add_file("volumes/d/f", &f, &meta).unwrap();
        w.members.truncate(2);
        let (bytes, _) = w.finish(base()).unwrap();
        assert!(matches!(
            verify(&bytes[..], &Rules::default()),
            Err(ArchiveError::Unlisted(_))
        ));
        // A header that disagrees with the manifest.
        let mut w = writer();
        w.add_file("volumes/d/f", &f, &meta).unwrap();
        let mut lying = base();
        lying.postgres = Some(PostgresInfo {
            major: "99".into(),
            server_version: "99.0".into(),
            database: "x".into(),
            user: "x".into(),
        });
        let (bytes, _) = w.finish(lying).unwrap();
        assert!(matches!(
            verify(&bytes[..], &Rules::default()),
            Err(ArchiveError::BadHeader)
        ));
    }

    /// A file of many names (hard links) is archived once and restored as one file of as many
    /// names: 200 names of a 300 KB file of random bytes took 60 MB of archive and 60 MB of the
    /// restored volume, and a file of 65 000 names filled the disk of any backup.
    #[test]
    fn a_file_of_many_names_is_archived_and_restored_once() {
        use std::os::unix::fs::MetadataExt as _;
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("files");
        std::fs::create_dir_all(root.join("sub")).unwrap();
        let content: Vec<u8> = (0..300_000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        std::fs::write(root.join("a"), &content).unwrap();
        for i in 0..200 {
            std::fs::hard_link(root.join("a"), root.join("sub").join(format!("n{i}"))).unwrap();
        }
        let mut w = writer();
        w.add_tree("volumes/files", &root, &|_| false, &|_| {})
            .unwrap();
        let (bytes, _) = w.finish(base()).unwrap();
        assert!(bytes.len() < 2 * content.len(), "{} bytes", bytes.len());
        let m = verify(&bytes[..], &Rules::default()).unwrap();
        assert_eq!(m.contents.members, 204);
        assert!(m.contents.trees.bytes < 2 * content.len() as u64);
        assert_eq!(m.contents.trees.entries, 3, "two directories, one file");
        let out = dir.path().join("out");
        std::fs::create_dir(&out).unwrap();
        unpack_verified(&bytes[..], &Rules::default(), into(&out), &mut |_| true).unwrap();
        let first = std::fs::metadata(out.join("volumes/files/a")).unwrap();
        assert_eq!(first.nlink(), 201);
        for i in [0, 199] {
            let other = out.join(format!("volumes/files/sub/n{i}"));
            assert_eq!(std::fs::metadata(&other).unwrap().ino(), first.ino());
        }
        assert_eq!(
            std::fs::read(out.join("volumes/files/sub/n7")).unwrap(),
            content
        );
    }

    /// A file of more names than the file system of the restore holds (ext4: 65 000) is
    /// restored as a copy past them, within the budget (the restore failed, "too many links",
    /// where verify said OK); and the secrets and the logs, which a restore takes as files only,
    /// are archived name by name (a secret left with two names by a write cut short made every
    /// backup unrestorable).
    #[test]
    fn names_past_what_the_file_system_holds_are_copies_and_the_secrets_are_files() {
        use std::os::unix::fs::MetadataExt as _;
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("f");
        std::fs::write(&f, b"content").unwrap();
        let meta = std::fs::metadata(&f).unwrap();
        let dmeta = std::fs::metadata(dir.path()).unwrap();
        let mut w = writer();
        w.add_dir("volumes/d", &dmeta).unwrap();
        w.add_file("volumes/d/f", &f, &meta).unwrap();
        for i in 0..65_010 {
            w.add_hardlink(&format!("volumes/d/{i}"), "volumes/d/f", &meta)
                .unwrap();
        }
        let (bytes, _) = w.finish(base()).unwrap();
        let out = dir.path().join("out");
        std::fs::create_dir(&out).unwrap();
        unpack_verified(&bytes[..], &Rules::default(), into(&out), &mut |_| true).unwrap();
        let first = std::fs::metadata(out.join("volumes/d/f")).unwrap();
        let last = std::fs::metadata(out.join("volumes/d/65009")).unwrap();
        assert!(first.nlink() > 1000);
        if first.nlink() < 65_011 {
            assert_ne!(
                last.ino(),
                first.ino(),
                "a copy past the file system's limit"
            );
        }
        assert_eq!(
            std::fs::read(out.join("volumes/d/65009")).unwrap(),
            b"content"
        );

        let secrets = dir.path().join("secrets");
        std::fs::create_dir(&secrets).unwrap();
        std::fs::write(secrets.join("postgres-password"), b"pw").unwrap();
        std::fs::hard_link(
            secrets.join("postgres-password"),
            secrets.join(".postgres-password.tmp-1"),
        )
        .unwrap();
        let mut w = writer();
        w.add_tree("volumes/secrets", &secrets, &|_| false, &|_| {})
            .unwrap();
        let (bytes, _) = w.finish(base()).unwrap();
        verify(&bytes[..], &Rules::default()).unwrap();
        assert_eq!(listed(&bytes).len(), 4);
    }

    /// What a restore refuses under the directories regobox writes as root (a secret without a
    /// value or too large, a link or a directory where files only are taken) is left out by the
    /// backup, the rest archived: its archive verifies. An empty file put in the secrets made
    /// every backup one that no restore took, while the backup exited 0.
    #[test]
    fn what_a_restore_refuses_in_regoboxs_own_directories_is_left_out_of_the_backup() {
        let dir = tempfile::tempdir().unwrap();
        let secrets = dir.path().join("secrets");
        std::fs::create_dir_all(secrets.join("tls")).unwrap();
        std::fs::create_dir_all(secrets.join("stray/deeper")).unwrap();
        std::fs::create_dir_all(secrets.join("tls/sub")).unwrap();
        std::fs::write(secrets.join("good"), b"pw\n").unwrap();
        std::fs::write(secrets.join("empty"), b"").unwrap();
        std::fs::write(secrets.join("newline-only"), b"\n").unwrap();
        std::fs::write(secrets.join("control"), b"a\x1bb").unwrap();
        std::fs::write(secrets.join("binary"), [0xff, 0xfe]).unwrap();
        std::fs::write(secrets.join("huge"), vec![b'a'; (MAX_SECRET + 1) as usize]).unwrap();
        std::fs::write(secrets.join("stray/deeper/x"), b"x").unwrap();
        std::fs::write(secrets.join("tls/cert.pem"), b"-----BEGIN").unwrap();
        std::fs::write(secrets.join("tls/empty.pem"), b"").unwrap();
        std::os::unix::fs::symlink("/etc/passwd", secrets.join("link")).unwrap();
        let logs = dir.path().join("logs");
        std::fs::create_dir_all(logs.join("sub")).unwrap();
        std::fs::write(logs.join("app.log"), b"line\n").unwrap();
        std::fs::write(logs.join("sub/x.log"), b"line\n").unwrap();
        std::os::unix::fs::symlink("/etc/passwd", logs.join("link.log")).unwrap();
        let mut w = writer();
        w.add_tree("volumes/secrets", &secrets, &|_| false, &|_| {})
            .unwrap();
        w.add_tree("volumes/logs", &logs, &|_| false, &|_| {})
            .unwrap();
        let (bytes, _) = w.finish(base()).unwrap();
        verify(&bytes[..], &Rules::default()).unwrap();
        let mut names = listed(&bytes);
        names.sort();
        assert_eq!(
            names,
            [
                "regobox.json",
                "volumes/logs",
                "volumes/logs/app.log",
                "volumes/secrets",
                "volumes/secrets/good",
                "volumes/secrets/tls",
                "volumes/secrets/tls/cert.pem",
                "volumes/secrets/tls/empty.pem",
            ]
        );
    }

    /// A hard link names a file member before it, in the same top-level directory, in its one
    /// spelling: a link to a directory, a link, a later or absent member, another tree, the
    /// secrets or the logs would make the restore link what it should not.
    #[test]
    fn a_hard_link_that_names_anything_but_a_file_before_it_in_its_tree_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("f");
        std::fs::write(&f, b"content").unwrap();
        let meta = std::fs::metadata(&f).unwrap();
        let dmeta = std::fs::metadata(dir.path()).unwrap();
        let base_writer = || {
            let mut w = writer();
            w.add_dir("volumes/d", &dmeta).unwrap();
            w.add_file("volumes/d/f", &f, &meta).unwrap();
            w.add_dir("volumes/d/sub", &dmeta).unwrap();
            w.add_symlink("volumes/d/l", Path::new("f"), &meta).unwrap();
            w.add_dir("volumes/e", &dmeta).unwrap();
            w.add_dir("volumes/secrets", &dmeta).unwrap();
            w.add_file("volumes/secrets/s", &f, &meta).unwrap();
            w.add_dir("volumes/logs", &dmeta).unwrap();
            w.add_file("volumes/logs/x.log", &f, &meta).unwrap();
            w
        };
        let good = {
            let mut w = base_writer();
            w.add_hardlink("volumes/d/sub/g", "volumes/d/f", &meta)
                .unwrap();
            w.finish(base()).unwrap().0
        };
        verify(&good[..], &Rules::default()).unwrap();
        for (name, first) in [
            ("volumes/d/g", "volumes/d/sub"),
            ("volumes/d/g", "volumes/d/l"),
            ("volumes/d/g", "volumes/d/later"),
            ("volumes/d/g", "volumes/d/absent"),
            ("volumes/d/g", "volumes/d/./f"),
            ("volumes/d/g", "volumes/d//f"),
            ("volumes/d/g", "/volumes/d/f"),
            ("volumes/d/g", "../d/f"),
            ("volumes/d/g", "regobox.json"),
            ("volumes/e/g", "volumes/d/f"),
            ("volumes/d/g", "volumes/secrets/s"),
            ("volumes/secrets/g", "volumes/secrets/s"),
            ("volumes/logs/g", "volumes/logs/x.log"),
            ("volumes/d/g", "volumes/logs/x.log"),
            ("database.dump", "volumes/d/f"),
            ("volumes/g", "volumes/d/f"),
        ] {
            let mut w = base_writer();
            w.add_hardlink(name, first, &meta).unwrap();
            w.add_file("volumes/d/later", &f, &meta).unwrap();
            let (bytes, _) = w.finish(base()).unwrap();
            let r = verify(&bytes[..], &Rules::default());
            assert!(
                matches!(
                    r,
                    Err(ArchiveError::Refused { .. } | ArchiveError::UnsafePath(_))
                ),
                "{name} -> {first}: {r:?}"
            );
            let out = dir
                .path()
                .join(format!("out-{}", name.len() + first.len() * 100));
            std::fs::create_dir_all(&out).unwrap();
            assert!(
                unpack_verified(&bytes[..], &Rules::default(), into(&out), &mut |_| true).is_err()
            );
        }
    }

    /// A backup never writes an archive no restore reads: a manifest past the limit is written
    /// without its indentation, a tree whose names would not fit even so is left out from the
    /// first that does not (a backup of the database and the rest, rather than none), and a
    /// manifest too large all the same fails the backup (it wrote one and exited 0, and every
    /// verify and restore of it failed).
    #[test]
    fn a_manifest_too_large_for_a_reader_is_never_written() {
        let dir = tempfile::tempdir().unwrap();
        let dmeta = std::fs::metadata(dir.path()).unwrap();
        let archive = |n: usize, limit: u64| {
            let mut w = writer();
            w.max_manifest = limit;
            w.add_dir("volumes/d", &dmeta).unwrap();
            for i in 0..n {
                w.add_dir(&format!("volumes/d/{i:040}"), &dmeta).unwrap();
            }
            w.finish(base()).map(|(bytes, _)| bytes)
        };
        let limit = 8 << 10;
        let rules = Rules {
            max_manifest: limit,
            ..Rules::default()
        };
        // 60 members: about 6 KiB of compact JSON, 9 KiB indented.
        let fits = archive(60, limit).unwrap();
        assert!(listed(&fits).len() == 62);
        let raw = zstd::stream::decode_all(&fits[..]).unwrap();
        let at = raw.windows(11).position(|w| w == b"{\"format\":1").unwrap();
        assert!(!raw[at..at + 200].contains(&b'\n'), "the compact form");
        let small = zstd::stream::decode_all(&archive(20, limit).unwrap()[..]).unwrap();
        assert!(
            small.windows(15).any(|w| w == b"{\n  \"format\": 1"),
            "a small one still indented"
        );
        verify(&fits[..], &rules).unwrap();
        let e = archive(200, limit).unwrap_err();
        assert!(
            e.to_string().contains("the archive would list 202 members"),
            "{e}"
        );
        // A tree of 12 000 names (about 1.8 MB of manifest) against a limit of 1 MiB: the
        // names past what fits are left out, and the archive verifies.
        let root = dir.path().join("many");
        std::fs::create_dir(&root).unwrap();
        for i in 0..12_000 {
            std::fs::write(root.join(format!("{i:040}")), b"").unwrap();
        }
        let mut w = writer();
        w.max_manifest = 1 << 20;
        w.add_tree("volumes/many", &root, &|_| false, &|_| {})
            .unwrap();
        let (bytes, _) = w.finish(base()).unwrap();
        let kept = listed(&bytes).len();
        assert!((4000..12_000).contains(&kept), "{kept} members kept");
        let rules = Rules {
            max_manifest: 1 << 20,
            ..Rules::default()
        };
        verify(&bytes[..], &rules).unwrap();
    }

    /// An owner or group is a 32-bit id: a larger one (a base-256 field) is refused, naming
    /// the member, not cut to another id (2^32 + 5 was restored owned by 5).
    #[test]
    fn an_owner_past_32_bits_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let dmeta = std::fs::metadata(dir.path()).unwrap();
        for (uid, gid, what) in [
            ((1u64 << 32) | 5, 0, "owner"),
            (0, (1u64 << 32) | 5, "group"),
        ] {
            let mut w = writer();
            w.add_dir("volumes/d", &dmeta).unwrap();
            let mut h = header_for(&dmeta, tar::EntryType::Directory);
            h.set_size(0);
            h.set_uid(uid);
            h.set_gid(gid);
            assert_eq!((h.uid().unwrap(), h.gid().unwrap()), (uid, gid));
            w.tar.append_data(&mut h, "volumes/d/x", &[][..]).unwrap();
            w.push(Member {
                path: "volumes/d/x".into(),
                kind: Kind::Dir,
                size: 0,
                sha256: None,
                mode: kept_mode(&dmeta),
                target: None,
            });
            let (bytes, _) = w.finish(base()).unwrap();
            let r = verify(&bytes[..], &Rules::default());
            assert!(
                matches!(&r, Err(ArchiveError::Refused { path, why }) if path == "volumes/d/x" && why.contains(&format!("its {what} 4294967301 is not a 32-bit id"))),
                "{r:?}"
            );
        }
    }

    /// A member whose name ends as a directory's (`x/`, `x/.`) is a directory or refused: GNU
    /// tar reads it as a directory whatever its type, and a file's content then as more members
    /// (an attacker's: a symbolic link out, which `zstd -dc | tar -x` made and no manifest
    /// listed). A NUL in a name, and a type tar does not name, are refused in those words.
    #[test]
    fn a_name_read_otherwise_by_gnu_tar_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let dmeta = std::fs::metadata(dir.path()).unwrap();
        let fmeta = {
            let f = dir.path().join("f");
            std::fs::write(&f, b"hello").unwrap();
            std::fs::metadata(&f).unwrap()
        };
        let member = |raw: &str, kind: tar::EntryType| {
            let mut w = writer();
            w.add_dir("volumes/d", &dmeta).unwrap();
            let mut h = header_for(&fmeta, kind);
            h.set_size(5);
            // The name's bytes as given (tar's own setter cleans a path).
            let name = &mut h.as_old_mut().name;
            name.fill(0);
            name[..raw.len()].copy_from_slice(raw.as_bytes());
            h.set_cksum();
            w.tar.append(&h, &b"hello"[..]).unwrap();
            w.push(Member {
                path: "volumes/d/sl".into(),
                kind: Kind::File,
                size: 5,
                sha256: Some(format!("{:x}", Sha256::digest(b"hello"))),
                mode: kept_mode(&fmeta),
                target: None,
            });
            let (bytes, _) = w.finish(base()).unwrap();
            verify(&bytes[..], &Rules::default())
        };
        member("volumes/d/sl", tar::EntryType::Regular).unwrap();
        for raw in ["volumes/d/sl/", "volumes/d/sl/."] {
            let r = member(raw, tar::EntryType::Regular);
            assert!(
                matches!(&r, Err(ArchiveError::Refused { path, why }) if path == "volumes/d/sl" && why.contains("ends as a directory's")),
                "{raw}: {r:?}"
            );
        }
        let r = member("volumes/d/sl", tar::EntryType::new(b'V'));
        assert!(
            r.as_ref()
                .is_err_and(|e| e.to_string().contains("it is a member of type 'V';")),
            "{r:?}"
        );
        assert!(
            normalise(b"volumes/d/a\0b")
                .is_err_and(|e| e.to_string().contains("its name holds a NUL byte")),
        );
    }

    /// What the manifest does not list is never in the archive: bytes carried by a directory
    /// or link member (which this reader skipped and GNU tar skips), and members after the end
    /// of the archive (`tar -i` reads them: a second `database.dump`).
    #[test]
    fn bytes_no_reader_of_the_manifest_sees_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let dmeta = std::fs::metadata(dir.path()).unwrap();
        for kind in [tar::EntryType::Directory, tar::EntryType::Symlink] {
            let mut w = writer();
            w.add_dir("volumes/d", &dmeta).unwrap();
            let mut h = header_for(&dmeta, kind);
            h.set_size(100);
            if kind == tar::EntryType::Symlink {
                h.set_link_name("t").unwrap();
            }
            w.tar
                .append_data(&mut h, "volumes/d/x", &[7u8; 100][..])
                .unwrap();
            w.push(Member {
                path: "volumes/d/x".into(),
                kind: if kind == tar::EntryType::Directory {
                    Kind::Dir
                } else {
                    Kind::Symlink
                },
                size: 0,
                sha256: None,
                mode: kept_mode(&dmeta),
                target: (kind == tar::EntryType::Symlink).then(|| "t".to_string()),
            });
            let (bytes, _) = w.finish(base()).unwrap();
            let r = verify(&bytes[..], &Rules::default());
            assert!(
                matches!(&r, Err(ArchiveError::Refused { why, .. }) if why.contains("carries 100 bytes")),
                "{kind:?}: {r:?}"
            );
        }
        let (_dir, good) = sample();
        let mut raw = zstd::stream::decode_all(&good[..]).unwrap();
        let mut hidden = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_size(4);
        h.set_mode(0o644);
        hidden.append_data(&mut h, DATABASE, &b"evil"[..]).unwrap();
        raw.extend(hidden.into_inner().unwrap());
        let crafted = zstd::stream::encode_all(&raw[..], 3).unwrap();
        let r = verify(&crafted[..], &Rules::default());
        assert!(
            matches!(&r, Err(ArchiveError::Corrupt(w)) if w.contains("after the end of the archive")),
            "{r:?}"
        );
    }

    /// What a restore cannot write is neither archived nor verified: a name that under the
    /// restore's staging directory would pass `PATH_MAX` (the application's deep tree made
    /// every backup verify and every restore fail), a component over `NAME_MAX`, a link target
    /// of `PATH_MAX` bytes.
    #[test]
    fn a_name_a_restore_cannot_write_is_left_out_by_the_backup_and_refused_by_verify() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("files");
        let deep = root.join("d".repeat(60)).join("e".repeat(60));
        std::fs::create_dir_all(&deep).unwrap();
        std::fs::write(deep.join("f"), b"x").unwrap();
        std::fs::write(root.join("shallow"), b"y").unwrap();
        let mut w = writer();
        w.keep_names_within(120);
        w.add_tree("volumes/files", &root, &|_| false, &|_| {})
            .unwrap();
        let (bytes, _) = w.finish(base()).unwrap();
        let names = listed(&bytes);
        assert!(names.iter().all(|n| n.len() <= 120), "{names:?}");
        assert!(names.contains(&"volumes/files/shallow".to_string()));
        let rules = Rules {
            max_path: 120,
            ..Rules::default()
        };
        verify(&bytes[..], &rules).unwrap();
        // Without the bound, the same tree is refused by a restore whose staging leaves 120.
        let mut w = writer();
        w.add_tree("volumes/files", &root, &|_| false, &|_| {})
            .unwrap();
        let (bytes, _) = w.finish(base()).unwrap();
        let r = verify(&bytes[..], &rules);
        assert!(
            matches!(&r, Err(ArchiveError::Refused { why, .. }) if why.contains("at most 120 bytes")),
            "{r:?}"
        );
        assert!(max_path_under(Path::new("/volumes")) < MAX_NAME - 40);
        // A component of 256 bytes; a link target of 4 096.
        let dmeta = std::fs::metadata(dir.path()).unwrap();
        let mut w = writer();
        w.add_dir("volumes/d", &dmeta).unwrap();
        w.add_dir(&format!("volumes/d/{}", "c".repeat(256)), &dmeta)
            .unwrap();
        let (bytes, _) = w.finish(base()).unwrap();
        let r = verify(&bytes[..], &Rules::default());
        assert!(
            matches!(&r, Err(ArchiveError::Refused { why, .. }) if why.contains("longer than 255 bytes")),
            "{r:?}"
        );
        let mut w = writer();
        w.add_dir("volumes/d", &dmeta).unwrap();
        w.add_symlink("volumes/d/l", Path::new(&"t".repeat(4096)), &dmeta)
            .unwrap();
        let (bytes, _) = w.finish(base()).unwrap();
        let r = verify(&bytes[..], &Rules::default());
        assert!(
            matches!(&r, Err(ArchiveError::Refused { why, .. }) if why.contains("4096 bytes or more")),
            "{r:?}"
        );
    }

    /// `w`'s archive closed with `json` as its manifest.
    fn with_manifest(mut w: Writer<Vec<u8>>, json: &[u8]) -> Vec<u8> {
        let mut header = tar::Header::new_gnu();
        header.set_size(json.len() as u64);
        header.set_mode(0o644);
        w.tar.append_data(&mut header, MANIFEST, json).unwrap();
        w.tar.into_inner().unwrap().finish().unwrap()
    }

    /// The manifest is read as it streams, never held: what the derived reading refused, this
    /// one refuses too (a duplicate or missing field, another format, trailing bytes), and what
    /// it ignored (a field it does not know) it ignores.
    #[test]
    fn the_manifest_read_as_it_streams_holds_to_the_format() {
        let dir = tempfile::tempdir().unwrap();
        let dmeta = std::fs::metadata(dir.path()).unwrap();
        let mut w = writer();
        w.add_dir("volumes/d", &dmeta).unwrap();
        let members = serde_json::to_value(&w.members).unwrap();
        let mut good = serde_json::to_value(base()).unwrap();
        good["members"] = members.clone();
        let archive = |json: String| {
            let mut w = writer();
            w.add_dir("volumes/d", &dmeta).unwrap();
            with_manifest(w, json.as_bytes())
        };
        let m = verify(&archive(good.to_string())[..], &Rules::default()).unwrap();
        assert_eq!(m.contents.members, 2);
        assert_eq!(m.contents.volumes, vec!["volumes/d".to_string()]);
        let mut unknown = good.clone();
        unknown["comment"] = serde_json::json!({"any": [1, 2]});
        verify(&archive(unknown.to_string())[..], &Rules::default()).unwrap();
        let text = good.to_string();
        let m_json = members.to_string();
        for (case, json) in [
            (
                "members twice",
                text.replacen('{', &format!("{{\"members\":{m_json},"), 1),
            ),
            (
                "no members",
                text.replace(&format!(",\"members\":{m_json}"), ""),
            ),
            ("no format", text.replace("\"format\":1,", "")),
            ("trailing", format!("{text} {{}}")),
            ("not an object", format!("[{text}]")),
        ] {
            assert_ne!(json, text, "{case}");
            let r = verify(&archive(json)[..], &Rules::default());
            assert!(
                matches!(r, Err(ArchiveError::BadManifest(_))),
                "{case}: {r:?}"
            );
        }
        let r = verify(
            &archive(text.replace("\"format\":1", "\"format\":2"))[..],
            &Rules::default(),
        );
        assert!(matches!(r, Err(ArchiveError::Unsupported(2))), "{r:?}");
        // A string longer than any name (a version of 255 MiB held twice took 0.67 GB),
        // escaped quotes and backslashes inside counted as part of it.
        let mut long = good.clone();
        long["regobox_version"] = serde_json::json!(format!("\\\"{}", "v".repeat(40_000)));
        let r = verify(&archive(long.to_string())[..], &Rules::default());
        assert!(
            matches!(&r, Err(ArchiveError::BadManifest(w)) if w.contains("a string of more than")),
            "{r:?}"
        );
        let mut fine = good.clone();
        fine["regobox_version"] = serde_json::json!(format!("\\\"{}", "v".repeat(20_000)));
        verify(&archive(fine.to_string())[..], &Rules::default()).unwrap();
        // More top-level volume directories than a volume holds.
        let mut w = writer();
        for i in 0..=MAX_VOLUMES {
            w.add_dir(&format!("volumes/v{i}"), &dmeta).unwrap();
        }
        let (bytes, _) = w.finish(base()).unwrap();
        let r = verify(&bytes[..], &Rules::default());
        assert!(
            matches!(&r, Err(ArchiveError::Refused { why, .. }) if why.contains("at most 4096 top-level")),
            "{r:?}"
        );
    }

    /// A reader holds the name of every member until the manifest, last, lists it. An archive of
    /// more members than a manifest of at most `max_manifest` can list is refused at the member
    /// that shows it, not read to its end (a 0.5 MB archive of 200 000 names of 4 000 bytes took
    /// a gigabyte to refuse); one whose manifest fits is read whole.
    #[test]
    fn an_archive_of_more_members_than_its_manifest_can_list_is_refused_as_soon_as_it_shows() {
        let dir = tempfile::tempdir().unwrap();
        let dmeta = std::fs::metadata(dir.path()).unwrap();
        let name = |i: usize| format!("volumes/d/{}{i:06}", "n".repeat(240));
        let rules = Rules {
            max_manifest: 64 << 10,
            ..Rules::default()
        };
        let archive = |n: usize| {
            let mut w = writer();
            w.add_dir("volumes/d", &dmeta).unwrap();
            for i in 0..n {
                w.add_dir(&name(i), &dmeta).unwrap();
            }
            w.finish(base()).unwrap().0
        };
        // 150 names of 256 bytes: a manifest of about 52 KiB, within the limit.
        let fits = archive(150);
        let m = verify(&fits[..], &rules).unwrap();
        assert_eq!(m.contents.members, 152);
        // 5 000: refused at the member past what 64 KiB can list (about 220 of these).
        let many = archive(5000);
        let out = dir.path().join("out");
        std::fs::create_dir(&out).unwrap();
        let mut read = 0;
        let r = unpack_verified(&many[..], &rules, into(&out), &mut |_| {
            read += 1;
            true
        });
        match r {
            Err(ArchiveError::Refused { path, why }) => {
                assert!(
                    why.contains("more members than a manifest of at most 64.0 KiB"),
                    "{why}"
                );
                assert_eq!(path, name(read - 2), "the member after the last one read");
            }
            other => panic!("{other:?}"),
        }
        assert!((200..240).contains(&read), "{read} members read");
        assert!(matches!(
            verify(&many[..], &rules),
            Err(ArchiveError::Refused { .. })
        ));
        // The default limit reads it whole (and refuses nothing).
        verify(&many[..], &Rules::default()).unwrap();
    }

    #[test]
    fn unpacking_never_writes_through_a_symlink_of_the_archive() {
        let dir = tempfile::tempdir().unwrap();
        let outside = dir.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::os::unix::fs::symlink(&outside, dir.path().join("link")).unwrap();
        let f = dir.path().join("f");
        std::fs::write(&f, b"x").unwrap();
        let lmeta = std::fs::symlink_metadata(dir.path().join("link")).unwrap();
        let dmeta = std::fs::metadata(dir.path()).unwrap();
        let fmeta = std::fs::metadata(&f).unwrap();
        // A top-level directory as a link, a member under a link of the archive, a directory
        // member spelled differently over a link (whose mode would be set through it).
        type Case<'a> = &'a dyn Fn(&mut Writer<Vec<u8>>);
        let cases: [Case; 3] = [
            &|w| {
                w.add_symlink("volumes/files", &outside, &lmeta).unwrap();
            },
            &|w| {
                w.add_dir("volumes/files", &dmeta).unwrap();
                w.add_symlink("volumes/files/link", &outside, &lmeta)
                    .unwrap();
                w.add_file("volumes/files/link/evil", &f, &fmeta).unwrap();
            },
            &|w| {
                w.add_dir("volumes/files", &dmeta).unwrap();
                w.add_symlink("volumes/files/link", &outside, &lmeta)
                    .unwrap();
                w.add_dir("volumes/files/./link/", &dmeta).unwrap();
            },
        ];
        for (i, case) in cases.iter().enumerate() {
            let mut w = writer();
            case(&mut w);
            let (bytes, _) = w.finish(base()).unwrap();
            let dest = dir.path().join(format!("dest{i}"));
            std::fs::create_dir(&dest).unwrap();
            let unpacked =
                unpack_verified(&bytes[..], &Rules::default(), into(&dest), &mut |_| true);
            assert!(
                matches!(
                    unpacked,
                    Err(ArchiveError::Refused { .. } | ArchiveError::Corrupt(_))
                ),
                "case {i}: {unpacked:?}"
            );
            assert!(verify(&bytes[..], &Rules::default()).is_err(), "case {i}");
            assert!(
                std::fs::read_dir(&outside).unwrap().next().is_none(),
                "case {i}"
            );
        }
    }

    /// A stop ends an unpack within a member, whatever the compression: a few KiB of archive
    /// stand for 64 MiB of zeros here, which the decompressor takes in one read of the archive.
    /// The stop was checked on the archive's reads, and such a member went on to its end (35 s
    /// for 2 GiB, from a 69 KB archive).
    #[test]
    fn a_stop_ends_an_unpack_within_a_member_however_small_its_archive() {
        use std::sync::atomic::{AtomicBool, Ordering};
        let dir = tempfile::tempdir().unwrap();
        let (a, z) = (dir.path().join("a"), dir.path().join("z"));
        std::fs::write(&a, b"a").unwrap();
        std::fs::File::create(&z)
            .unwrap()
            .set_len(64 << 20)
            .unwrap();
        let dmeta = std::fs::metadata(dir.path()).unwrap();
        let mut w = writer();
        w.add_dir("volumes/files", &dmeta).unwrap();
        w.add_file("volumes/files/a", &a, &std::fs::metadata(&a).unwrap())
            .unwrap();
        w.add_file("volumes/files/z", &z, &std::fs::metadata(&z).unwrap())
            .unwrap();
        let (bytes, _) = w.finish(base()).unwrap();
        assert!(bytes.len() < 64 << 10, "{} bytes", bytes.len());
        let dest = dir.path().join("dest");
        std::fs::create_dir(&dest).unwrap();
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let mut d = into(&dest);
        d.stop = Some(stop.clone());
        let r = unpack_verified(&bytes[..], &Rules::default(), d, &mut |m| {
            if m == "volumes/files/a" {
                stop.store(true, Ordering::SeqCst);
            }
            true
        });
        assert!(r.is_err());
        let written = std::fs::metadata(dest.join("volumes/files/z")).map_or(0, |m| m.len());
        assert!(written < 64 << 20, "the member was written whole");
    }

    #[test]
    fn extraction_stops_at_the_budget() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("big");
        // (Not zeros: those would be holes, which cost nothing.)
        std::fs::write(&f, vec![1u8; 1 << 20]).unwrap();
        let dmeta = std::fs::metadata(dir.path()).unwrap();
        let mut w = writer();
        w.add_dir("volumes/files", &dmeta).unwrap();
        for i in 0..4 {
            w.add_file(
                &format!("volumes/files/{i}"),
                &f,
                &std::fs::metadata(&f).unwrap(),
            )
            .unwrap();
        }
        let (bytes, _) = w.finish(base()).unwrap();
        let dest = dir.path().join("dest");
        std::fs::create_dir(&dest).unwrap();
        let mut d = into(&dest);
        d.budget.bytes = 2 << 20;
        let r = unpack_verified(&bytes[..], &Rules::default(), d, &mut |_| true);
        let Err(ArchiveError::NoSpace { needs, free, .. }) = r else {
            panic!("{r:?}")
        };
        assert_eq!(free, 2 << 20);
        assert!(needs > free && needs < (3 << 20) + 3 * 4096, "{needs}");
        assert!(
            !dest.join("volumes/files/2").exists(),
            "stopped before writing past it"
        );
        assert!(r.unwrap_err().to_string().starts_with(&format!(
            "not enough space: needs {}, 2097152 bytes free",
            bytes_against(needs, free)
        )));
    }

    #[test]
    fn names_have_one_spelling() {
        for (raw, want) in [
            ("volumes/files/x", "volumes/files/x"),
            ("./volumes//files/./x/", "volumes/files/x"),
            ("volumes/files/", "volumes/files"),
        ] {
            assert_eq!(normalise(raw.as_bytes()).unwrap(), want, "{raw}");
        }
        for raw in [
            "../etc/passwd",
            "/etc/passwd",
            "volumes/../../x",
            "",
            "./",
            "a/\0b",
        ] {
            let raw = raw.replace("\\0", "\0");
            assert!(normalise(raw.as_bytes()).is_err(), "{raw:?}");
        }
        assert!(normalise(b"volumes/files/\xff").is_err());
    }

    #[test]
    fn only_the_formats_places_and_never_regobox_own() {
        let rules = Rules {
            own: ["db", "backups", "pg"]
                .into_iter()
                .map(String::from)
                .collect(),
            ..Rules::default()
        };
        for ok in [
            "regobox.json",
            "database.dump",
            "manifest.json",
            "volumes/files",
            "volumes/files/db",
            "volumes/secrets/x",
            "config/0-conf/a",
        ] {
            assert!(place(ok, &rules).is_ok(), "{ok}");
        }
        for bad in [
            "volumes/db",
            "volumes/db/pgdata/PG_VERSION",
            "volumes/backups",
            "volumes/pg",
            "volumes/.regobox-restore.json",
            "volumes/.restore-1",
            "volumes/lost+found",
            "volumes",
            "config",
            "etc/passwd",
            "database.dump2",
        ] {
            assert!(
                matches!(place(bad, &rules), Err(ArchiveError::Refused { .. })),
                "{bad}"
            );
        }
    }
}

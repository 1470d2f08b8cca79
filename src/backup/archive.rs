//! The archive format: one tar stream compressed with zstd (content checksum on).
//!
//! Members, in order: `database.dump` (a `pg_dump` custom-format dump), `volumes/<dir>/...`
//! (files, directories and symlinks with their modes, owners and times), `config/<n>-<dir>/...`
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
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path};

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

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    pub regobox_version: String,
    /// RFC 3339, UTC.
    pub created_at: String,
    pub postgres: Option<PostgresInfo>,
    pub secrets_included: bool,
    pub config_included: bool,
    pub members: Vec<Member>,
}

/// Why an archive is refused.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error("the archive is corrupt or truncated: {0}")]
    Corrupt(String),
    #[error("the archive has no manifest.json (or it is not the last member)")]
    NoManifest,
    #[error("manifest.json is not valid: {0}")]
    BadManifest(String),
    #[error("archive format {0} is not supported by this regobox (it reads format {FORMAT})")]
    Unsupported(u32),
    #[error("member {0} is listed in the manifest but missing from the archive")]
    Missing(String),
    #[error("member {0} is in the archive but not in the manifest")]
    Unlisted(String),
    #[error("member {path} does not match the manifest: {what}")]
    Mismatch { path: String, what: String },
    #[error("member path {0:?} is not allowed (absolute, or going up with ..)")]
    UnsafePath(String),
    #[error("regobox.json is missing or disagrees with the manifest")]
    BadHeader,
    #[error("extraction stopped")]
    Cancelled,
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
            content_bytes: 0,
        })
    }

    /// Add the file at `fs_path` as `path`. A file that shrinks while it is read is padded with
    /// zeros, one that grows is cut at its size when it was listed; the manifest records what
    /// was written.
    pub fn add_file(&mut self, path: &str, fs_path: &Path, meta: &Metadata) -> io::Result<()> {
        let mut header = header_for(meta, tar::EntryType::Regular);
        header.set_size(meta.len());
        let file = std::fs::File::open(fs_path)?;
        let mut reader = Hashing::new(ExactSize::new(file, meta.len()));
        self.tar.append_data(&mut header, path, &mut reader)?;
        if reader.inner.padded > 0 {
            tracing::warn!(file = %fs_path.display(), "file shrank while it was archived; padded with zeros");
        }
        self.content_bytes += meta.len();
        self.members.push(Member {
            path: path.into(),
            kind: Kind::File,
            size: meta.len(),
            sha256: Some(reader.hex()),
            mode: meta.mode() & 0o7777,
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
        self.members.push(Member {
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
        self.members.push(Member {
            path: path.into(),
            kind: Kind::Dir,
            size: 0,
            sha256: None,
            mode: meta.mode() & 0o7777,
            target: None,
        });
        Ok(())
    }

    pub fn add_symlink(&mut self, path: &str, target: &Path, meta: &Metadata) -> io::Result<()> {
        let mut header = header_for(meta, tar::EntryType::Symlink);
        header.set_size(0);
        self.tar.append_link(&mut header, path, target)?;
        self.members.push(Member {
            path: path.into(),
            kind: Kind::Symlink,
            size: 0,
            sha256: None,
            mode: meta.mode() & 0o7777,
            target: Some(target.to_string_lossy().into_owned()),
        });
        Ok(())
    }

    /// Add `root` and everything under it as `prefix/...`, in a stable order, never following
    /// symlinks; `skip` says which paths to leave out.
    pub fn add_tree(
        &mut self,
        prefix: &str,
        root: &Path,
        skip: &dyn Fn(&Path) -> bool,
        progress: &dyn Fn(u64),
    ) -> io::Result<()> {
        let meta = std::fs::symlink_metadata(root)?;
        self.add_entry(prefix, root, &meta)?;
        if !meta.is_dir() {
            return Ok(());
        }
        let mut names: Vec<std::ffi::OsString> = std::fs::read_dir(root)?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<io::Result<_>>()?;
        names.sort();
        for name in names {
            let path = root.join(&name);
            if skip(&path) {
                continue;
            }
            let child = format!("{prefix}/{}", name.to_string_lossy());
            self.add_tree(&child, &path, skip, progress)?;
            progress(self.content_bytes);
        }
        Ok(())
    }

    fn add_entry(&mut self, path: &str, fs_path: &Path, meta: &Metadata) -> io::Result<()> {
        let ft = meta.file_type();
        if ft.is_symlink() {
            let target = std::fs::read_link(fs_path)?;
            self.add_symlink(path, &target, meta)
        } else if ft.is_dir() {
            self.add_dir(path, meta)
        } else if ft.is_file() {
            self.add_file(path, fs_path, meta)
        } else {
            tracing::warn!(path = %fs_path.display(), "not a file, directory or symlink; left out of the backup");
            Ok(())
        }
    }

    /// Append the manifest (`base` with the member list filled in) and finish the stream.
    pub fn finish(mut self, mut base: Manifest) -> io::Result<(W, Manifest)> {
        base.members = std::mem::take(&mut self.members);
        let json = serde_json::to_vec_pretty(&base).map_err(io::Error::other)?;
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

fn header_for(meta: &Metadata, kind: tar::EntryType) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(meta.mode() & 0o7777);
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

/// A member path is relative and never goes up.
fn check_path(path: &str) -> Result<(), ArchiveError> {
    let p = Path::new(path);
    let ok = !path.is_empty()
        && p.components()
            .all(|c| matches!(c, Component::Normal(_) | Component::CurDir));
    if ok {
        Ok(())
    } else {
        Err(ArchiveError::UnsafePath(path.into()))
    }
}

/// Read the whole archive, check it against its manifest, and return the manifest.
pub fn verify(input: impl Read) -> Result<Manifest, ArchiveError> {
    read(input, None, &mut |_| true)
}

/// The header must say what the manifest says.
fn check_header(header: Option<&Header>, manifest: &Manifest) -> Result<(), ArchiveError> {
    match header {
        Some(h) if h.format == manifest.format && h.postgres == manifest.postgres => Ok(()),
        _ => Err(ArchiveError::BadHeader),
    }
}

/// Every member seen must be the manifest's, and every member of the manifest seen.
fn compare(manifest: &Manifest, mut seen: BTreeMap<String, Member>) -> Result<(), ArchiveError> {
    for listed in &manifest.members {
        check_path(&listed.path)?;
        match seen.remove(&listed.path) {
            None => return Err(ArchiveError::Missing(listed.path.clone())),
            Some(actual) if actual != *listed => {
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
                } else if actual.sha256 != listed.sha256 {
                    "its SHA-256 differs from the manifest's".to_string()
                } else if actual.mode != listed.mode {
                    format!(
                        "mode {:o} in the archive, {:o} in the manifest",
                        actual.mode, listed.mode
                    )
                } else {
                    "its symlink target differs from the manifest's".to_string()
                };
                return Err(ArchiveError::Mismatch {
                    path: listed.path.clone(),
                    what,
                });
            }
            Some(_) => {}
        }
    }
    if let Some(extra) = seen.into_keys().next() {
        return Err(ArchiveError::Unlisted(extra));
    }
    Ok(())
}

/// Unpack the archive into `dest` (an empty staging directory) while verifying it: every member
/// is hashed as it is written, and the whole is checked against the manifest at the end. On an
/// error `dest` holds a partial content the caller discards; nothing outside it is touched (a
/// member whose path goes through a symlink is refused). Modes, times and, as root, owners are
/// kept. `on_member` is called after each member is written; returning false stops.
pub fn unpack_verified(
    input: impl Read,
    dest: &Path,
    on_member: &mut dyn FnMut(&str) -> bool,
) -> Result<Manifest, ArchiveError> {
    read(input, Some(dest), on_member)
}

/// Read the whole archive, hashing every member (and writing it under `dest` if given), then
/// check what was read against the manifest and the header.
fn read(
    input: impl Read,
    dest: Option<&Path>,
    on_member: &mut dyn FnMut(&str) -> bool,
) -> Result<Manifest, ArchiveError> {
    use std::os::unix::fs::PermissionsExt;
    let as_root = crate::users::is_root();
    let decoder = zstd::stream::read::Decoder::new(input).map_err(corrupt)?;
    let mut archive = tar::Archive::new(decoder);
    let mut seen: BTreeMap<String, Member> = BTreeMap::new();
    let mut manifest: Option<Manifest> = None;
    let mut header_seen: Option<Header> = None;
    // Directories get their mode, owner and time once everything inside them is written.
    let mut dirs: Vec<(std::path::PathBuf, u32, u64, u64, u64)> = Vec::new();
    let io_err = |path: &Path| {
        let path = path.to_path_buf();
        move |e: io::Error| ArchiveError::Corrupt(format!("writing {}: {e}", path.display()))
    };
    {
        let entries = archive.entries().map_err(corrupt)?;
        for entry in entries {
            let mut entry = entry.map_err(corrupt)?;
            let path = entry
                .path()
                .map_err(corrupt)?
                .to_string_lossy()
                .trim_end_matches('/')
                .to_string();
            check_path(&path)?;
            if manifest.is_some() {
                return Err(ArchiveError::Corrupt(format!(
                    "member {path} comes after the manifest"
                )));
            }
            if path == MANIFEST {
                let mut text = Vec::new();
                entry.read_to_end(&mut text).map_err(corrupt)?;
                let m: Manifest = serde_json::from_slice(&text)
                    .map_err(|e| ArchiveError::BadManifest(e.to_string()))?;
                if m.format != FORMAT {
                    return Err(ArchiveError::Unsupported(m.format));
                }
                manifest = Some(m);
                continue;
            }
            let target = dest.map(|d| d.join(&path));
            if let Some(d) = dest {
                no_symlink_on_the_way(d, &path)?;
            }
            let header = entry.header();
            let mode = header.mode().map_err(corrupt)? & 0o7777;
            let (uid, gid) = (
                header.uid().map_err(corrupt)? as u32,
                header.gid().map_err(corrupt)? as u32,
            );
            let mtime = header.mtime().map_err(corrupt)?;
            if let Some(parent) = target.as_ref().and_then(|t| t.parent()) {
                std::fs::create_dir_all(parent).map_err(io_err(parent))?;
            }
            let member = match header.entry_type() {
                tar::EntryType::Regular | tar::EntryType::Continuous => {
                    let mut hasher = Hashing::new(&mut entry);
                    let mut keep = Vec::new();
                    let size = match &target {
                        Some(t) => {
                            let file = std::fs::OpenOptions::new()
                                .write(true)
                                .create_new(true)
                                .open(t)
                                .map_err(io_err(t))?;
                            let mut out = io::BufWriter::with_capacity(1 << 20, file);
                            let size = io::copy(&mut hasher, &mut out).map_err(corrupt)?;
                            let file = out.into_inner().map_err(|e| io_err(t)(e.into_error()))?;
                            file.set_permissions(std::fs::Permissions::from_mode(mode))
                                .map_err(io_err(t))?;
                            let _ = file.set_modified(
                                std::time::UNIX_EPOCH + std::time::Duration::from_secs(mtime),
                            );
                            if as_root {
                                std::os::unix::fs::fchown(&file, Some(uid), Some(gid))
                                    .map_err(io_err(t))?;
                            }
                            size
                        }
                        None if path == HEADER => {
                            hasher.read_to_end(&mut keep).map_err(corrupt)? as u64
                        }
                        None => io::copy(&mut hasher, &mut io::sink()).map_err(corrupt)?,
                    };
                    let sha256 = hasher.hex();
                    if path == HEADER {
                        if let Some(t) = &target {
                            keep = std::fs::read(t).map_err(io_err(t))?;
                        }
                        header_seen = serde_json::from_slice(&keep).ok();
                    }
                    Member {
                        path: path.clone(),
                        kind: Kind::File,
                        size,
                        sha256: Some(sha256),
                        mode,
                        target: None,
                    }
                }
                tar::EntryType::Directory => {
                    if let Some(t) = &target {
                        std::fs::create_dir_all(t).map_err(io_err(t))?;
                        dirs.push((t.clone(), mode, uid as u64, gid as u64, mtime));
                    }
                    Member {
                        path: path.clone(),
                        kind: Kind::Dir,
                        size: 0,
                        sha256: None,
                        mode,
                        target: None,
                    }
                }
                tar::EntryType::Symlink => {
                    let link = entry
                        .link_name()
                        .map_err(corrupt)?
                        .ok_or_else(|| {
                            ArchiveError::Corrupt(format!("symlink {path} has no target"))
                        })?
                        .into_owned();
                    if let Some(t) = &target {
                        std::os::unix::fs::symlink(&link, t).map_err(io_err(t))?;
                        if as_root {
                            std::os::unix::fs::lchown(t, Some(uid), Some(gid))
                                .map_err(io_err(t))?;
                        }
                    }
                    Member {
                        path: path.clone(),
                        kind: Kind::Symlink,
                        size: 0,
                        sha256: None,
                        mode,
                        target: Some(link.to_string_lossy().into_owned()),
                    }
                }
                other => {
                    return Err(ArchiveError::Corrupt(format!(
                        "member {path} has an unexpected type {other:?}"
                    )));
                }
            };
            if seen.insert(path.clone(), member).is_some() {
                return Err(ArchiveError::Corrupt(format!(
                    "member {path} appears twice"
                )));
            }
            if !on_member(&path) {
                return Err(ArchiveError::Cancelled);
            }
        }
    }
    // Read the stream to its end: a truncated or corrupt tail (and the zstd checksum) shows here.
    let mut rest = archive.into_inner();
    io::copy(&mut rest, &mut io::sink()).map_err(corrupt)?;
    let manifest = manifest.ok_or(ArchiveError::NoManifest)?;
    compare(&manifest, seen)?;
    check_header(header_seen.as_ref(), &manifest)?;
    for (dir, mode, uid, gid, mtime) in dirs.into_iter().rev() {
        if as_root {
            std::os::unix::fs::chown(&dir, Some(uid as u32), Some(gid as u32))
                .map_err(io_err(&dir))?;
        }
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(mode))
            .map_err(io_err(&dir))?;
        if let Ok(d) = std::fs::File::open(&dir) {
            let _ = d.set_modified(std::time::UNIX_EPOCH + std::time::Duration::from_secs(mtime));
        }
    }
    Ok(manifest)
}

/// No existing component between `dest` and `dest/path` may be a symlink (an archive could
/// otherwise write outside `dest` through one of its own symlinks).
fn no_symlink_on_the_way(dest: &Path, path: &str) -> Result<(), ArchiveError> {
    let mut at = dest.to_path_buf();
    let components: Vec<_> = Path::new(path).components().collect();
    for c in &components[..components.len().saturating_sub(1)] {
        at.push(c);
        match std::fs::symlink_metadata(&at) {
            Ok(m) if m.file_type().is_symlink() => {
                return Err(ArchiveError::UnsafePath(format!(
                    "{path} (through the symlink {})",
                    at.display()
                )));
            }
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> Manifest {
        Manifest {
            format: FORMAT,
            regobox_version: "test".into(),
            created_at: "2026-11-21T00:00:00Z".into(),
            postgres: None,
            secrets_included: true,
            config_included: true,
            members: vec![],
        }
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

    #[test]
    fn a_written_archive_verifies_and_unpacks_identically() {
        let (dir, bytes) = sample();
        let m = verify(&bytes[..]).unwrap();
        let paths: Vec<&str> = m.members.iter().map(|m| m.path.as_str()).collect();
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
        assert_eq!(unpack_verified(&bytes[..], &out, &mut |_| true).unwrap(), m);
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
    fn damage_of_every_kind_is_refused() {
        let (_dir, bytes) = sample();
        // A flipped byte anywhere in the compressed stream.
        for at in [20, bytes.len() / 2, bytes.len() - 10] {
            let mut b = bytes.clone();
            b[at] ^= 0x40;
            assert!(verify(&b[..]).is_err(), "flip at {at} accepted");
        }
        // Truncated.
        for len in [bytes.len() - 1, bytes.len() / 2, 10] {
            assert!(
                verify(&bytes[..len]).is_err(),
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
        // A lie: the manifest says other content.
        let mut w = writer();
        w.add_file("volumes/f", &f, &meta).unwrap();
        w.members[1].sha256 = Some("00".repeat(32));
        let (bytes, _) = w.finish(base()).unwrap();
        assert!(matches!(
            verify(&bytes[..]),
            Err(ArchiveError::Mismatch { .. })
        ));
        // A member listed but missing.
        let mut w = writer();
        w.add_file("volumes/f", &f, &meta).unwrap();
        let mut ghost = w.members[1].clone();
        ghost.path = "volumes/ghost".into();
        w.members.push(ghost);
        let (bytes, _) = w.finish(base()).unwrap();
        assert!(
            matches!(verify(&bytes[..]), Err(ArchiveError::Missing(p)) if p == "volumes/ghost")
        );
        // A member not listed.
        let mut w = writer();
        w.add_file("volumes/f", &f, &meta).unwrap();
        w.members.truncate(1);
        let (bytes, _) = w.finish(base()).unwrap();
        assert!(matches!(verify(&bytes[..]), Err(ArchiveError::Unlisted(_))));
        // A header that disagrees with the manifest.
        let mut w = writer();
        w.add_file("volumes/f", &f, &meta).unwrap();
        let mut lying = base();
        lying.postgres = Some(PostgresInfo {
            major: "99".into(),
            server_version: "99.0".into(),
            database: "x".into(),
            user: "x".into(),
        });
        let (bytes, _) = w.finish(lying).unwrap();
        assert!(matches!(verify(&bytes[..]), Err(ArchiveError::BadHeader)));
    }

    #[test]
    fn unpacking_never_writes_through_a_symlink_of_the_archive() {
        let dir = tempfile::tempdir().unwrap();
        let outside = dir.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::os::unix::fs::symlink(&outside, dir.path().join("link")).unwrap();
        let f = dir.path().join("f");
        std::fs::write(&f, b"x").unwrap();
        let mut w = writer();
        let lmeta = std::fs::symlink_metadata(dir.path().join("link")).unwrap();
        w.add_symlink("volumes/link", &outside, &lmeta).unwrap();
        w.add_file("volumes/link/evil", &f, &std::fs::metadata(&f).unwrap())
            .unwrap();
        let (bytes, _) = w.finish(base()).unwrap();
        let dest = dir.path().join("dest");
        std::fs::create_dir(&dest).unwrap();
        assert!(matches!(
            unpack_verified(&bytes[..], &dest, &mut |_| true),
            Err(ArchiveError::UnsafePath(_))
        ));
        assert!(!outside.join("evil").exists());
    }

    #[test]
    fn unsafe_paths_are_refused() {
        assert!(check_path("volumes/files/x").is_ok());
        assert!(check_path("../etc/passwd").is_err());
        assert!(check_path("/etc/passwd").is_err());
        assert!(check_path("volumes/../../x").is_err());
    }
}

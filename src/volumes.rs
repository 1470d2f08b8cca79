//! The layout of the data volume and the creation of its directories.
//!
//! Everything persistent lives under `volumes.root` (default `/volumes`), which the user mounts
//! from the host:
//!
//! | path        | what                                             | owner, mode          |
//! |-------------|--------------------------------------------------|----------------------|
//! | `db/pgdata` | the PostgreSQL cluster (`postgres.data_dir`)     | PostgreSQL OS user, 0700 |
//! | `secrets/`  | values generated once on first boot              | root, 0700 (files 0600) |
//! | `logs/`     | service logs                                     | root, 0755           |
//! | `files/`    | the application's files                          | root, 0755           |
//! | `backups/`  | backup archives                                  | root, 0700           |
//!
//! A path that exists but is not a directory is an error that names it; nothing is replaced.

use std::io;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::config::Config;

/// A volume path that is not what it should be.
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error("{path} exists but is not a directory; regobox needs a directory there (key `{key}`)")]
    NotADirectory { path: PathBuf, key: &'static str },
    #[error("cannot create or open {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// The directories of the data volume.
#[derive(Debug, Clone)]
pub struct Layout {
    pub root: PathBuf,
    pub secrets: PathBuf,
    pub logs: PathBuf,
    pub files: PathBuf,
    pub backups: PathBuf,
}

impl Layout {
    pub fn new(config: &Config) -> Self {
        let root = config.volumes.root.clone();
        Layout {
            secrets: root.join("secrets"),
            logs: root.join("logs"),
            files: root.join("files"),
            backups: config.backup.dir.clone(),
            root,
        }
    }

    /// The directories [`Layout::prepare`] would create (with the root's missing parents), the
    /// deepest first: what a command that fails on a fresh volume removes again
    /// ([`Layout::unprepare`]).
    pub fn missing(&self) -> Vec<PathBuf> {
        let mut missing: Vec<PathBuf> = Vec::new();
        for dir in [
            &self.root,
            &self.secrets,
            &self.logs,
            &self.files,
            &self.backups,
        ] {
            for p in dir.ancestors() {
                if p.as_os_str().is_empty() || std::fs::symlink_metadata(p).is_ok() {
                    break;
                }
                if !missing.iter().any(|m| m == p) {
                    missing.push(p.to_path_buf());
                }
            }
        }
        missing.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
        missing
    }

    /// Remove `created` (from [`Layout::missing`], before [`Layout::prepare`]) where each is
    /// still an empty directory: never anything that holds something.
    pub fn unprepare(created: &[PathBuf]) {
        for dir in created {
            let _ = std::fs::remove_dir(dir);
        }
    }

    /// Create the directories that are missing (never changing the mode of existing ones, but
    /// the secrets directory, which is always made 0700).
    pub fn prepare(&self) -> Result<(), VolumeError> {
        ensure_dir(&self.root, 0o755, "volumes.root")?;
        ensure_dir(&self.secrets, 0o700, "volumes.root")?;
        let mode = std::fs::metadata(&self.secrets)
            .map(|m| m.permissions().mode() & 0o7777)
            .map_err(|source| VolumeError::Io {
                path: self.secrets.clone(),
                source,
            })?;
        if mode != 0o700 {
            set_mode(&self.secrets, 0o700)?;
            tracing::warn!(dir = %self.secrets.display(), from = format!("{mode:o}"), to = "700", "repaired the secrets directory's mode");
        }
        ensure_dir(&self.logs, 0o755, "volumes.root")?;
        ensure_dir(&self.files, 0o755, "volumes.root")?;
        ensure_dir(&self.backups, 0o700, "volumes.root")?;
        Ok(())
    }
}

/// Create `path` (and missing parents, 0755) with `mode` if it does not exist.
pub fn ensure_dir(path: &Path, mode: u32, key: &'static str) -> Result<(), VolumeError> {
    match std::fs::metadata(path) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err(VolumeError::NotADirectory {
            path: path.to_path_buf(),
            key,
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            if let Some(parent) = path.parent() {
                if !parent.as_os_str().is_empty() && !parent.exists() {
                    ensure_dir(parent, 0o755, key)?;
                }
            }
            match std::fs::DirBuilder::new().mode(mode).create(path) {
                Ok(()) => set_mode(path, mode),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists && path.is_dir() => Ok(()),
                Err(source) => Err(VolumeError::Io {
                    path: path.to_path_buf(),
                    source,
                }),
            }
        }
        Err(source) => Err(VolumeError::Io {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Set the permission bits of `path` (the umask does not apply).
pub fn set_mode(path: &Path, mode: u32) -> Result<(), VolumeError> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(|source| {
        VolumeError::Io {
            path: path.to_path_buf(),
            source,
        }
    })
}

/// fsync a directory, so that a rename or link inside it survives a crash.
pub fn sync_dir(path: &Path) -> io::Result<()> {
    std::fs::File::open(path)?.sync_all()
}

/// The space of the file system holding `path`: what an unprivileged writer may still write,
/// and its size, in bytes.
/// The files an unprivileged writer may still create on the file system holding `path`
/// (statvfs `f_favail`), if it has a fixed number of them.
pub fn free_inodes(path: &Path) -> io::Result<Option<u64>> {
    let st = nix::sys::statvfs::statvfs(path).map_err(io::Error::from)?;
    // A file system without a fixed number of inodes (btrfs...) says it has none.
    Ok((st.files() != 0).then(|| st.files_available() as u64))
}

/// The mount points of this process's mount namespace (`/proc/self/mountinfo`, field 5, its
/// octal escapes read back); empty if it cannot be read.
pub fn mount_points() -> Vec<PathBuf> {
    std::fs::read("/proc/self/mountinfo")
        .map(|text| mount_points_in(&text))
        .unwrap_or_default()
}

fn mount_points_in(text: &[u8]) -> Vec<PathBuf> {
    use std::os::unix::ffi::OsStringExt as _;
    text.split(|&b| b == b'\n')
        .filter_map(|line| line.split(|&b| b == b' ').nth(4))
        .map(|field| {
            let mut out = Vec::with_capacity(field.len());
            let mut i = 0;
            while i < field.len() {
                let octal = field
                    .get(i + 1..i + 4)
                    .filter(|d| field[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)));
                match octal {
                    Some(d) => {
                        out.push((d[0] - b'0') * 64 + (d[1] - b'0') * 8 + (d[2] - b'0'));
                        i += 4;
                    }
                    None => {
                        out.push(field[i]);
                        i += 1;
                    }
                }
            }
            PathBuf::from(std::ffi::OsString::from_vec(out))
        })
        .collect()
}

/// What the file system holding `dir` takes at least for a file that holds anything, measured
/// (a file unnamed, `O_TMPFILE`, gone when closed, of one byte at 64 KiB: past what ext4's
/// `inline_data` keeps in the inode, where a byte at the start made the unit 512 bytes): 4 KiB
/// on most, a cluster on ext4 with bigalloc (64 KiB and more), a huge page on a tmpfs with
/// `huge=always` (2 MiB). `statvfs` says none of these. At least 4 KiB; 4 KiB where it cannot
/// be measured.
pub fn allocation_unit(dir: &Path) -> u64 {
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    const MIN: u64 = 4096;
    let probe = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .mode(0o600)
        .custom_flags(libc::O_TMPFILE)
        .open(dir)
        .and_then(|f| {
            std::os::unix::fs::FileExt::write_all_at(&f, b"x", 64 << 10)?;
            f.metadata()
        });
    match probe {
        Ok(m) => (m.blocks() * 512).clamp(MIN, 64 << 20),
        Err(_) => MIN,
    }
}

pub fn free_space(path: &Path) -> io::Result<(u64, u64)> {
    let st = nix::sys::statvfs::statvfs(path).map_err(io::Error::from)?;
    let block = st.fragment_size() as u64;
    Ok((
        (st.blocks_available() as u64).saturating_mul(block),
        (st.blocks() as u64).saturating_mul(block),
    ))
}

/// The names in the open directory `dir` (`.` and `..` aside), sorted: read from the
/// descriptor, so they are that directory's whatever its path names meanwhile.
pub fn names_in(dir: &std::fs::File) -> io::Result<Vec<std::ffi::OsString>> {
    use std::os::unix::ffi::OsStringExt as _;
    let listing = nix::dir::Dir::from_fd(dir.try_clone()?.into())?;
    let mut names = Vec::new();
    for entry in listing {
        let n = entry?.file_name().to_bytes().to_vec();
        if n != b"." && n != b".." {
            names.push(std::ffi::OsString::from_vec(n));
        }
    }
    names.sort();
    Ok(names)
}

/// The directory `dir` (an absolute path), opened without following a symbolic link anywhere
/// on the way: each component is opened from the one before with `O_NOFOLLOW`, so a link (a
/// magic one in `/proc` included) or a file in the path is an error naming it. With `create`,
/// missing components are made (0755, as `create_dir_all` would). For paths a less trusted
/// user may own a part of, where regobox acts as root: what it then does relative to the
/// directory opened stays in that directory, whatever is renamed meanwhile.
pub fn open_dir_without_links(dir: &Path, create: bool) -> io::Result<std::os::fd::OwnedFd> {
    use nix::errno::Errno;
    use nix::fcntl::{OFlag, openat};
    use nix::sys::stat::Mode;
    use std::path::Component;
    let flags = OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_RDONLY;
    if !dir.is_absolute() {
        return Err(io::Error::other(format!(
            "{} is not an absolute path",
            dir.display()
        )));
    }
    let mut fd = nix::fcntl::open("/", flags, Mode::empty())?;
    let mut so_far = PathBuf::from("/");
    for c in dir.components() {
        let name = match c {
            Component::RootDir | Component::CurDir => continue,
            Component::Normal(n) => n,
            Component::ParentDir | Component::Prefix(_) => {
                return Err(io::Error::other(format!(
                    "{} goes up with ..: write the path without it",
                    dir.display()
                )));
            }
        };
        so_far.push(name);
        let mut next = openat(&fd, name, flags, Mode::empty());
        if create && matches!(next, Err(Errno::ENOENT)) {
            match nix::sys::stat::mkdirat(&fd, name, Mode::from_bits_truncate(0o755)) {
                Ok(()) | Err(Errno::EEXIST) => {}
                Err(e) => {
                    return Err(io::Error::other(format!(
                        "creating {}: {e}",
                        so_far.display()
                    )));
                }
            }
            next = openat(&fd, name, flags, Mode::empty());
        }
        fd = next.map_err(|e| match e {
            Errno::ELOOP | Errno::ENOTDIR => io::Error::other(format!(
                "{} is a symbolic link or not a directory; regobox follows none on this path",
                so_far.display()
            )),
            e => io::Error::other(format!("opening {}: {e}", so_far.display())),
        })?;
    }
    Ok(fd)
}

#[cfg(test)]
mod mount_tests {
    use super::*;

    #[test]
    fn mount_points_are_read_with_their_escapes() {
        let text = b"36 35 98:0 /mnt1 /mnt/with\\040space rw - ext3 /dev/root rw\n\
                     37 35 98:0 / /srv/a\\134b rw - tmpfs tmpfs rw\n";
        assert_eq!(
            mount_points_in(text),
            [PathBuf::from("/mnt/with space"), PathBuf::from("/srv/a\\b")]
        );
    }
}

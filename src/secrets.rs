//! Values generated once on first boot and kept on the volume.
//!
//! A secret is a file `<volumes.root>/secrets/<name>`, mode 0600, in a 0700 directory. It is
//! written to a temporary file, synced, then hard-linked into place, so a crash never leaves a
//! half-written secret and two processes racing to create it agree on one value. Secrets are
//! never logged or printed.

use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rand::Rng;
use rand::distr::Alphanumeric;

use crate::volumes::sync_dir;

/// The bootstrap superuser's password.
pub const SUPERUSER_PASSWORD: &str = "postgres-superuser-password";
/// The id that marks this installation's objects on the Docker engine (its label).
pub const DOCKER_INSTANCE: &str = "docker-instance";
/// The ids of the images the application built, pulled or imported on this host's engine.
pub const DOCKER_IMAGES: &str = "docker-owned-images.json";
/// The record of [`DOCKER_IMAGES`] as versions of regobox before it kept the built images too
/// wrote it (pulled and imported ones only: a built one was the instance's by its label). Read
/// once, at the first start that keeps the new record, and removed.
pub const DOCKER_IMAGES_BEFORE: &str = "docker-images.json";
/// The tags the application made on this host's engine (pulled, imported, built), each with
/// the id of the image it made it on.
pub const DOCKER_TAGS: &str = "docker-owned-tags.json";
/// The ids of the containers the application created on this host's engine.
pub const DOCKER_CONTAINERS: &str = "docker-containers.json";
/// The journal of the bind sources' directories frozen while the engine mounts them (their
/// owners and modes to put back, as root, at the next start if regobox was killed).
pub const DOCKER_BINDS_FROZEN: &str = "docker-binds-frozen.json";

/// What the secrets directory holds about this host and regobox's authority on it, rather than
/// about the installation: the PostgreSQL superuser, what regobox owns on the host's Docker
/// engine, and a journal regobox acts on as root. Never archived, and never taken from an
/// archive: a restore keeps the live volume's (an archive, which may be crafted, would otherwise
/// choose who is superuser, which of the host's containers and images the application owns, and
/// which directories root gives away at the next start).
pub const OF_THIS_HOST: [&str; 7] = [
    SUPERUSER_PASSWORD,
    DOCKER_INSTANCE,
    DOCKER_IMAGES,
    DOCKER_IMAGES_BEFORE,
    DOCKER_TAGS,
    DOCKER_CONTAINERS,
    DOCKER_BINDS_FROZEN,
];

/// Whether the secrets directory's entry `name` is one of [`OF_THIS_HOST`] or a temporary file
/// of one (`<name>.tmp`, as the Docker bridge writes them, or `.<name>.tmp-<pid>`, as
/// [`SecretStore`] does).
pub fn of_this_host(name: &str) -> bool {
    let base = name
        .strip_suffix(".tmp")
        .or_else(|| {
            name.strip_prefix('.')
                .and_then(|n| n.rsplit_once(".tmp-"))
                .map(|(n, _)| n)
        })
        .unwrap_or(name);
    OF_THIS_HOST.contains(&base)
}

/// Length of generated secrets (alphanumeric: about 190 bits).
const GENERATED_LEN: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("secret file {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "secret file {path} is empty; it was generated on first boot and its value is needed (restore it from a backup)"
    )]
    Empty { path: PathBuf },
    #[error(
        "secret file {path} is not a regular file (a symbolic link, a directory, ...); regobox reads secrets only from files of its own: replace it with the file"
    )]
    NotAFile { path: PathBuf },
}

/// The directory of generated secrets.
#[derive(Debug, Clone)]
pub struct SecretStore {
    dir: PathBuf,
}

impl SecretStore {
    /// A store in `dir`, which must exist (see [`crate::volumes::Layout::prepare`]).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        SecretStore { dir: dir.into() }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// A new value for the secret `name`, written beside it: [`Staged::commit`] puts it in
    /// place (once the cluster has it), dropping it leaves the old one (`regobox password
    /// --reset`).
    pub fn stage(&self, name: &str) -> Result<Staged, SecretError> {
        let (value, tmp) = self.write_new(name)?;
        Ok(Staged {
            value,
            tmp: Some(tmp),
            path: self.path(name),
        })
    }

    /// A new random value for `name`, written and synced beside it (mode 0600): the value and
    /// the temporary file, which the caller puts in place or removes.
    fn write_new(&self, name: &str) -> Result<(String, PathBuf), SecretError> {
        let value = generate();
        let tmp = self.write_tmp(name, &value)?;
        Ok((value, tmp))
    }

    /// `value` written and synced beside the secret `name` (mode 0600); the temporary file.
    fn write_tmp(&self, name: &str, value: &str) -> Result<PathBuf, SecretError> {
        let tmp = self.dir.join(format!(".{name}.tmp-{}", std::process::id()));
        let io_err = |source| SecretError::Io {
            path: tmp.clone(),
            source,
        };
        let _ = std::fs::remove_file(&tmp);
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io_err)?;
        file.write_all(value.as_bytes()).map_err(io_err)?;
        file.sync_all().map_err(io_err)?;
        Ok(tmp)
    }

    /// Set the secret `name` to `value` (a value regobox chose: a restore keeping the live
    /// superuser's password), replacing whatever file is there, atomically.
    pub fn put(&self, name: &str, value: &str) -> Result<(), SecretError> {
        let tmp = self.write_tmp(name, value)?;
        Staged {
            value: value.to_string(),
            tmp: Some(tmp),
            path: self.path(name),
        }
        .commit()
    }

    /// The secret `name`, if it exists (never generated).
    pub fn get(&self, name: &str) -> Result<Option<String>, SecretError> {
        self.read(&self.path(name))
    }

    /// The secret `name`, generated and stored if it does not exist yet.
    pub fn get_or_generate(&self, name: &str) -> Result<String, SecretError> {
        let path = self.path(name);
        if let Some(value) = self.read(&path)? {
            return Ok(value);
        }
        let (value, tmp) = self.write_new(name)?;
        let io_err = |source| SecretError::Io {
            path: path.clone(),
            source,
        };
        let linked = std::fs::hard_link(&tmp, &path);
        let _ = std::fs::remove_file(&tmp);
        match linked {
            Ok(()) => {
                sync_dir(&self.dir).map_err(io_err)?;
                Ok(value)
            }
            // Somebody else created it first: theirs is the value.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                self.read(&path)?.ok_or(SecretError::Empty { path })
            }
            Err(e) => Err(io_err(e)),
        }
    }

    /// The secret at `path` if it exists; its mode is tightened to 0600 if it was looser.
    fn read(&self, path: &Path) -> Result<Option<String>, SecretError> {
        let io_err = |source| SecretError::Io {
            path: path.to_path_buf(),
            source,
        };
        // Opened without following a link, and judged on what was opened.
        let mut file = match std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(path)
        {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
                return Err(SecretError::NotAFile {
                    path: path.to_path_buf(),
                });
            }
            Err(e) => return Err(io_err(e)),
        };
        let meta = file.metadata().map_err(io_err)?;
        if !meta.is_file() {
            return Err(SecretError::NotAFile {
                path: path.to_path_buf(),
            });
        }
        let mut text = String::new();
        io::Read::read_to_string(&mut file, &mut text).map_err(io_err)?;
        let mode = meta.permissions().mode() & 0o777;
        if mode != 0o600 {
            tracing::warn!(path = %path.display(), mode = format!("{mode:o}"), "secret file had loose permissions; set to 0600");
            file.set_permissions(std::fs::Permissions::from_mode(0o600))
                .map_err(io_err)?;
        }
        let value = text.trim_end_matches(['\n', '\r']).to_string();
        if value.is_empty() {
            return Err(SecretError::Empty {
                path: path.to_path_buf(),
            });
        }
        Ok(Some(value))
    }
}

/// A new random value for a secret (alphanumeric, [`GENERATED_LEN`] characters).
pub fn generate() -> String {
    rand::rng()
        .sample_iter(&Alphanumeric)
        .take(GENERATED_LEN)
        .map(char::from)
        .collect()
}

/// A secret's new value, not yet in place.
pub struct Staged {
    pub value: String,
    tmp: Option<PathBuf>,
    path: PathBuf,
}

impl Staged {
    /// Put the new value in place of the old.
    pub fn commit(mut self) -> Result<(), SecretError> {
        let io_err = |source| SecretError::Io {
            path: self.path.clone(),
            source,
        };
        if let Some(tmp) = self.tmp.take() {
            std::fs::rename(&tmp, &self.path).map_err(io_err)?;
            if let Some(dir) = self.path.parent() {
                sync_dir(dir).map_err(io_err)?;
            }
        }
        Ok(())
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        if let Some(tmp) = self.tmp.take() {
            let _ = std::fs::remove_file(tmp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hosts_state_and_its_temporary_files_are_told_apart_from_the_installations() {
        for name in [
            "postgres-superuser-password",
            ".postgres-superuser-password.tmp-41",
            "docker-instance",
            ".docker-instance.tmp-7",
            "docker-images.json",
            "docker-images.json.tmp",
            "docker-owned-images.json",
            "docker-owned-images.json.tmp",
            "docker-owned-tags.json",
            "docker-containers.json",
            "docker-binds-frozen.json",
            "docker-binds-frozen.json.tmp",
        ] {
            assert!(of_this_host(name), "{name}");
        }
        for name in [
            "postgres-password",
            ".postgres-password.tmp-41",
            "app-web",
            "docker-instance2",
            "tls",
            "xdocker-images.json",
        ] {
            assert!(!of_this_host(name), "{name}");
        }
    }

    #[test]
    fn generated_once_then_stable_and_private() {
        let dir = tempfile::tempdir().unwrap();
        let store = SecretStore::new(dir.path());
        let a = store.get_or_generate("pw").unwrap();
        let b = store.get_or_generate("pw").unwrap();
        assert_eq!(a, b);
        assert_eq!(a.len(), GENERATED_LEN);
        let mode = std::fs::metadata(store.path("pw"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_ne!(a, store.get_or_generate("other").unwrap());
        // No temporary file is left behind.
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
    }

    #[test]
    fn a_secret_that_is_a_link_is_refused_and_its_target_untouched() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let outside = dir.path().join("outside");
        std::fs::write(&outside, "chosen").unwrap();
        std::fs::set_permissions(&outside, std::fs::Permissions::from_mode(0o644)).unwrap();
        let secrets = dir.path().join("secrets");
        std::fs::create_dir(&secrets).unwrap();
        std::os::unix::fs::symlink(&outside, secrets.join("pw")).unwrap();
        let err = SecretStore::new(&secrets)
            .get_or_generate("pw")
            .unwrap_err();
        assert!(matches!(err, SecretError::NotAFile { .. }), "{err}");
        let mode = std::fs::metadata(&outside).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o644, "no chmod through the link");
    }

    #[test]
    fn an_empty_secret_is_an_error_not_a_new_value() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("pw"), "").unwrap();
        let err = SecretStore::new(dir.path())
            .get_or_generate("pw")
            .unwrap_err();
        assert!(matches!(err, SecretError::Empty { .. }));
        assert_eq!(std::fs::read(dir.path().join("pw")).unwrap(), b"");
    }
}

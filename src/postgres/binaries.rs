//! Finding the PostgreSQL server binaries and their version.
//!
//! Order: `postgres.bin_dir` if set; else the system's installations (`pg_config --bindir`,
//! `/usr/lib/postgresql/<major>/bin`, `postgres` on `PATH`), then postgresql_embedded's own
//! installation directory (`$HOME/.theseus/postgresql/<version>/bin`). Among what is found, the
//! highest major is the server's: an older major's binaries are there for `pg_upgrade` only
//! ([`Binaries::of_major`], which also looks in `postgres.old_bin_dirs`).

use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::PostgresError;

/// A PostgreSQL major version: `9.6` is `(9, 6)`, `15` is `(15, 0)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Major(pub u32, pub u32);

impl Major {
    /// Parse a major as written in `PG_VERSION` (`9.6`, `15`) or a full version (`15.18`,
    /// `9.6.24`, `18beta1`).
    pub fn parse(text: &str) -> Option<Major> {
        let text = text.trim();
        let mut nums = text
            .split(|c: char| !c.is_ascii_digit())
            .filter(|s| !s.is_empty());
        let first: u32 = nums.next()?.parse().ok()?;
        if first >= 10 {
            Some(Major(first, 0))
        } else {
            let second: u32 = nums.next()?.parse().ok()?;
            Some(Major(first, second))
        }
    }

    /// The password authentication method for this major: SCRAM from 10 on, md5 before.
    pub fn password_auth(self) -> &'static str {
        if self.0 >= 10 { "scram-sha-256" } else { "md5" }
    }
}

impl fmt::Display for Major {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0 >= 10 {
            write!(f, "{}", self.0)
        } else {
            write!(f, "{}.{}", self.0, self.1)
        }
    }
}

/// A directory of PostgreSQL binaries and the server's version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Binaries {
    pub dir: PathBuf,
    /// The full version, e.g. `15.18`.
    pub version: String,
    pub major: Major,
}

impl Binaries {
    /// The binaries in `dir`, if it holds a working `postgres` and `initdb`.
    pub async fn probe(dir: &Path) -> Result<Binaries, String> {
        for prog in ["postgres", "initdb"] {
            if !dir.join(prog).is_file() {
                return Err(format!("no `{prog}` in {}", dir.display()));
            }
        }
        let out = crate::process::output(Command::new(dir.join("postgres")).arg("--version"))
            .await
            .map_err(|e| format!("cannot run {}/postgres: {e}", dir.display()))?;
        let text = String::from_utf8_lossy(&out.stdout);
        // "postgres (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)"
        let version = text
            .split_once(')')
            .map(|(_, rest)| rest.split_whitespace().next().unwrap_or(""))
            .unwrap_or("")
            .to_string();
        let major = Major::parse(&version).ok_or_else(|| {
            format!(
                "cannot read the version of {}/postgres from {text:?}",
                dir.display()
            )
        })?;
        Ok(Binaries {
            dir: dir.to_path_buf(),
            version,
            major,
        })
    }

    pub fn path(&self, program: &str) -> PathBuf {
        self.dir.join(program)
    }

    /// The binaries of `major` (an older cluster's, for pg_upgrade): in `extra`
    /// (`postgres.old_bin_dirs`), then wherever [`Binaries::find`] looks.
    pub async fn of_major(extra: &[PathBuf], major: Major) -> Option<Binaries> {
        let mut dirs = extra.to_vec();
        dirs.extend(candidate_dirs().await);
        for dir in &dirs {
            if let Ok(b) = Binaries::probe(dir).await {
                if b.major == major {
                    return Some(b);
                }
            }
        }
        None
    }

    /// Find the binaries to use. `configured` is `postgres.bin_dir` (empty: auto-detect);
    /// `prefer` a major to take if found (else the highest).
    pub async fn find(configured: &Path, prefer: Option<Major>) -> Result<Binaries, PostgresError> {
        if !configured.as_os_str().is_empty() {
            return Binaries::probe(configured)
                .await
                .map_err(|reason| PostgresError::BadBinDir {
                    dir: configured.to_path_buf(),
                    reason,
                });
        }
        let candidates = candidate_dirs().await;
        // The same directory is often found twice (pg_config and /usr/lib/postgresql/N):
        // probe each real directory once.
        let mut seen: Vec<PathBuf> = Vec::new();
        let mut found: Vec<Binaries> = Vec::new();
        for dir in &candidates {
            let real = dir.canonicalize().unwrap_or_else(|_| dir.clone());
            if seen.contains(&real) {
                continue;
            }
            seen.push(real);
            if let Ok(b) = Binaries::probe(dir).await {
                found.push(b);
            }
        }
        if let Some(m) = prefer {
            if let Some(b) = found.iter().find(|b| b.major == m) {
                return Ok(b.clone());
            }
        }
        // Highest major; among equals, the first found (the order above).
        let best = found.iter().map(|b| b.major).max();
        found
            .into_iter()
            .find(|b| Some(b.major) == best)
            .ok_or(PostgresError::NoBinaries { looked: candidates })
    }
}

/// Every directory that may hold server binaries, in order of preference.
async fn candidate_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Ok(out) = crate::process::output(Command::new("pg_config").arg("--bindir")).await {
        if out.status.success() {
            let dir = String::from_utf8_lossy(&out.stdout).trim().to_string();
            if !dir.is_empty() {
                dirs.push(PathBuf::from(dir));
            }
        }
    }
    dirs.extend(versioned_subdirs(Path::new("/usr/lib/postgresql"), "bin"));
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let exe = dir.join("postgres");
            if exe.is_file() {
                let real = exe.canonicalize().unwrap_or(exe);
                if let Some(parent) = real.parent() {
                    dirs.push(parent.to_path_buf());
                }
            }
        }
    }
    if let Some(home) = std::env::var_os("HOME") {
        // postgresql_embedded installs into ~/.theseus/postgresql/<version>/bin.
        dirs.extend(versioned_subdirs(
            &PathBuf::from(home).join(".theseus").join("postgresql"),
            "bin",
        ));
    }
    dirs
}

/// `<root>/<version>/<leaf>` for every version-named subdirectory, highest version first.
fn versioned_subdirs(root: &Path, leaf: &str) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(root) else {
        return Vec::new();
    };
    let mut found: Vec<(Vec<u32>, PathBuf)> = entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let key: Vec<u32> = name
                .split('.')
                .map(|p| p.parse().ok())
                .collect::<Option<_>>()?;
            Some((key, e.path().join(leaf)))
        })
        .collect();
    found.sort_by(|a, b| b.0.cmp(&a.0));
    found.into_iter().map(|(_, p)| p).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn majors() {
        assert_eq!(Major::parse("9.6"), Some(Major(9, 6)));
        assert_eq!(Major::parse("9.6.24"), Some(Major(9, 6)));
        assert_eq!(Major::parse("15"), Some(Major(15, 0)));
        assert_eq!(Major::parse("15.18\n"), Some(Major(15, 0)));
        assert_eq!(Major::parse("18beta1"), Some(Major(18, 0)));
        assert_eq!(Major::parse("x"), None);
        assert_eq!(Major(9, 6).to_string(), "9.6");
        assert_eq!(Major(15, 0).to_string(), "15");
        assert!(Major(9, 6) < Major(10, 0));
        assert_eq!(Major(9, 6).password_auth(), "md5");
        assert_eq!(Major(15, 0).password_auth(), "scram-sha-256");
    }

    #[tokio::test]
    async fn a_configured_directory_without_binaries_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let err = Binaries::find(dir.path(), None).await.unwrap_err();
        let text = err.to_string();
        assert!(text.contains(&dir.path().display().to_string()), "{text}");
        assert!(text.contains("postgres.bin_dir"), "{text}");
    }
}

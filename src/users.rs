//! The unprivileged OS accounts children run as, and dropping privileges in a child.
//!
//! When regobox runs as root, children such as the PostgreSQL server run as a configured account:
//! its supplementary groups, gid and uid are all set in the child before `exec`, in that order.
//! When regobox does not run as root, children simply run as regobox's own user.

use std::ffi::CString;
use std::io;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};

use nix::unistd::{Gid, Uid, User};

#[derive(Debug, thiserror::Error)]
pub enum UserError {
    #[error("cannot look up OS user `{name}`")]
    Lookup {
        name: String,
        #[source]
        source: nix::Error,
    },
    #[error(
        "OS user `{name}` does not exist and could not be created with useradd: {detail} (create it in the image, or set `{key}` to an existing user)"
    )]
    Create {
        name: String,
        key: &'static str,
        detail: String,
    },
}

/// An OS account a child runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    pub name: String,
    pub uid: Uid,
    pub gid: Gid,
    /// Supplementary groups (including the primary group).
    pub groups: Vec<Gid>,
    pub home: PathBuf,
}

impl Account {
    fn from_user(user: User) -> Self {
        let groups = CString::new(user.name.clone())
            .ok()
            .and_then(|c| nix::unistd::getgrouplist(&c, user.gid).ok())
            .unwrap_or_else(|| vec![user.gid]);
        Account {
            name: user.name,
            uid: user.uid,
            gid: user.gid,
            groups,
            home: user.dir,
        }
    }

    /// The account regobox itself runs as.
    pub fn current() -> Option<Self> {
        User::from_uid(Uid::current())
            .ok()
            .flatten()
            .map(Self::from_user)
    }

    /// Make `command` run as this account: supplementary groups, gid, then uid, set in the child
    /// before exec; `HOME`, `USER` and `LOGNAME` set to match.
    pub fn apply(&self, command: &mut std::process::Command) {
        command
            .env("HOME", &self.home)
            .env("USER", &self.name)
            .env("LOGNAME", &self.name);
        if !is_root() {
            return;
        }
        let (uid, gid, groups) = (self.uid, self.gid, self.groups.clone());
        // SAFETY: the closure runs in the child between fork and exec; it only makes the
        // setgroups/setgid/setuid system calls on values computed before the fork.
        unsafe {
            command.pre_exec(move || {
                nix::unistd::setgroups(&groups).map_err(io::Error::from)?;
                nix::unistd::setgid(gid).map_err(io::Error::from)?;
                nix::unistd::setuid(uid).map_err(io::Error::from)?;
                Ok(())
            });
        }
    }
}

/// Whether regobox runs as root (and so must drop privileges for its children).
pub fn is_root() -> bool {
    Uid::effective().is_root()
}

/// The account named `name`, if it exists.
pub fn lookup(name: &str) -> Result<Option<Account>, UserError> {
    User::from_name(name)
        .map(|u| u.map(Account::from_user))
        .map_err(|source| UserError::Lookup {
            name: name.into(),
            source,
        })
}

/// The account children run as: when root, the configured `name` (created as a system user
/// with `useradd` if missing); otherwise regobox's own account.
pub async fn service_account(
    name: &str,
    home: &Path,
    key: &'static str,
) -> Result<Account, UserError> {
    if !is_root() {
        return Account::current().ok_or_else(|| UserError::Lookup {
            name: format!("uid {}", Uid::current()),
            source: nix::Error::ENOENT,
        });
    }
    if let Some(account) = lookup(name)? {
        return Ok(account);
    }
    tracing::info!(user = name, "creating system user");
    let output = crate::process::output(
        std::process::Command::new("useradd")
            .args(["--system", "--user-group", "--no-create-home", "--shell"])
            .arg("/usr/sbin/nologin")
            .arg("--home-dir")
            .arg(home)
            .arg(name),
    )
    .await;
    let detail = match output {
        Ok(o) if o.status.success() => None,
        Ok(o) => Some(String::from_utf8_lossy(&o.stderr).trim().to_string()),
        Err(e) => Some(e.to_string()),
    };
    if let Some(detail) = detail {
        return Err(UserError::Create {
            name: name.into(),
            key,
            detail,
        });
    }
    lookup(name)?.ok_or_else(|| UserError::Create {
        name: name.into(),
        key,
        detail: "useradd succeeded but the user cannot be found".into(),
    })
}

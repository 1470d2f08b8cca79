//! The application environment every service, cron job and command gets, and the templates
//! rendered from it.
//!
//! Built from regobox's own environment, then `app.env`, the generated secrets (`app.secrets`,
//! kept 0600 in `<volumes.root>/secrets/app-<NAME>`), the database (`DATABASE_URL` and the libpq
//! `PG*` variables of the application role) and the volume paths (`REGOBOX_VOLUMES_ROOT`,
//! `REGOBOX_FILES_DIR`, `REGOBOX_LOGS_DIR`, `REGOBOX_BACKUPS_DIR`).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use anyhow::Context as _;

use crate::config::{Config, PostgresMode};
use crate::postgres::{Endpoint, libpq_env};
use crate::secrets::SecretStore;
use crate::users::Account;
use crate::volumes::Layout;

/// Variables of the application environment.
pub type Env = BTreeMap<String, String>;

/// The environment shared by everything the app runs.
pub fn build(
    config: &Config,
    layout: &Layout,
    secrets: &SecretStore,
    database: Option<&Endpoint>,
) -> anyhow::Result<Env> {
    let mut env: Env = std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
        .collect();
    // The application talks to the engine through regobox's socket, never the engine's own.
    env.remove("DOCKER_HOST");
    env.remove("DOCKER_TLS_VERIFY");
    env.remove("DOCKER_CERT_PATH");
    if let Some(host) = crate::docker::application_host(config) {
        env.insert("DOCKER_HOST".into(), host);
    }
    for (k, v) in &config.app.env {
        env.insert(k.clone(), v.clone());
    }
    for name in &config.app.secrets {
        let value = secrets
            .get_or_generate(&format!("app-{name}"))
            .with_context(|| format!("generating secret {name} (app.secrets)"))?;
        env.insert(name.clone(), value);
    }
    if let Some(endpoint) = database {
        let tcp = tcp_config(config, endpoint);
        env.insert("DATABASE_URL".into(), database_url(config, endpoint, &tcp));
        for (k, v) in libpq_env(&tcp, &endpoint.tls) {
            env.insert(k, v);
        }
    }
    for (k, v) in [
        ("REGOBOX_VOLUMES_ROOT", &layout.root),
        ("REGOBOX_FILES_DIR", &layout.files),
        ("REGOBOX_LOGS_DIR", &layout.logs),
        ("REGOBOX_BACKUPS_DIR", &layout.backups),
    ] {
        env.insert(k.into(), v.display().to_string());
    }
    Ok(env)
}

/// How the application reaches the database over TCP: the external URL, or the embedded
/// server on its first listen address (loopback when it listens everywhere).
fn tcp_config(config: &Config, endpoint: &Endpoint) -> tokio_postgres::Config {
    let pg = &config.postgres;
    if pg.mode == PostgresMode::External {
        return endpoint.app.clone();
    }
    let first = pg.listen.split(',').map(str::trim).next().unwrap_or("");
    let host = match first {
        "" | "*" | "0.0.0.0" | "::" => "127.0.0.1",
        other => other,
    };
    let mut c = tokio_postgres::Config::new();
    c.host(host)
        .port(pg.port)
        .user(&pg.user)
        .dbname(&pg.database);
    if let Some(p) = endpoint.app.get_password() {
        c.password(p);
    }
    c
}

fn database_url(config: &Config, endpoint: &Endpoint, tcp: &tokio_postgres::Config) -> String {
    // The external server: regobox's own writing of postgres.url, TLS settings explicit.
    if let Some(url) = &endpoint.url {
        return url.clone();
    }
    let host = match tcp.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) if h.contains(':') => format!("[{h}]"),
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        _ => "127.0.0.1".into(),
    };
    let password = tcp
        .get_password()
        .map(|p| String::from_utf8_lossy(p).into_owned())
        .unwrap_or_default();
    format!(
        "postgresql://{}:{}@{}:{}/{}",
        encode(&config.postgres.user),
        encode(&password),
        host,
        config.postgres.port,
        encode(&config.postgres.database)
    )
}

/// Percent-encode everything but RFC 3986 unreserved characters.
fn encode(text: &str) -> String {
    let mut out = String::new();
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Render every `[[app.templates]]` into its destination (atomically), owned by `owner`.
/// Templates see `env` (the application environment) and `config` (the whole configuration).
pub fn render_templates(config: &Config, env: &Env, owner: Option<&Account>) -> anyhow::Result<()> {
    for (i, t) in config.app.templates.iter().enumerate() {
        let key = format!("app.templates[{i}]");
        let source = read_template(&t.source)
            .with_context(|| format!("{key}: reading template {}", t.source.display()))?;
        let mut jinja = minijinja::Environment::new();
        jinja.set_undefined_behavior(minijinja::UndefinedBehavior::Strict);
        jinja
            .add_template("t", &source)
            .with_context(|| format!("{key}: template {} does not parse", t.source.display()))?;
        let ctx = minijinja::context! { env => env, config => config };
        let text = jinja
            .get_template("t")
            .and_then(|tpl| tpl.render(ctx))
            .with_context(|| format!("{key}: rendering {}", t.source.display()))?;
        let mode = u32::from_str_radix(t.mode.trim_start_matches("0o"), 8).unwrap_or(0o640);
        write_atomically(&t.destination, text.as_bytes(), mode, owner)
            .with_context(|| format!("{key}: writing {}", t.destination.display()))?;
        tracing::info!(destination = %t.destination.display(), "template rendered");
    }
    Ok(())
}

/// The largest template read.
const MAX_TEMPLATE: u64 = 1 << 20;

/// The directory of `path` opened without following a link on the way, and `path`'s name.
fn parent_without_links(
    path: &Path,
    create: bool,
) -> std::io::Result<(std::os::fd::OwnedFd, std::ffi::OsString)> {
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return Err(std::io::Error::other("it names no file"));
    };
    Ok((
        crate::volumes::open_dir_without_links(dir, create)?,
        name.to_os_string(),
    ))
}

/// A template's text, read as root from a file the application may own, or under a directory
/// it owns: no symbolic link is followed anywhere on the path (a link to a secret, or to a
/// directory of root's, would be rendered into a file the application reads); it must be a
/// regular file (a FIFO would hold the start for ever), of at most [`MAX_TEMPLATE`].
fn read_template(path: &Path) -> std::io::Result<String> {
    use nix::fcntl::{OFlag, openat};
    use std::io::Read;
    let (dir, name) = parent_without_links(path, false)?;
    let fd = openat(
        &dir,
        name.as_os_str(),
        OFlag::O_RDONLY
            | OFlag::O_NOFOLLOW
            | OFlag::O_NONBLOCK
            | OFlag::O_NOCTTY
            | OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    .map_err(|e| {
        if e == nix::errno::Errno::ELOOP {
            std::io::Error::other("it is a symbolic link; a template is read from a file")
        } else {
            e.into()
        }
    })?;
    let file = std::fs::File::from(fd);
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(std::io::Error::other("it is not a regular file"));
    }
    if meta.len() > MAX_TEMPLATE {
        return Err(std::io::Error::other(format!(
            "it is {} bytes; a template is at most {MAX_TEMPLATE}",
            meta.len()
        )));
    }
    let mut text = String::new();
    file.take(MAX_TEMPLATE).read_to_string(&mut text)?;
    Ok(text)
}

/// Write `bytes` to `path` atomically, as root into a directory the application may own: the
/// directory is opened without following a link on the way (created if missing), and the
/// temporary file is made, given its mode and owner, and renamed into place relative to it, so
/// that nothing the application renames or links meanwhile leads the write elsewhere.
fn write_atomically(
    path: &Path,
    bytes: &[u8],
    mode: u32,
    owner: Option<&Account>,
) -> std::io::Result<()> {
    use nix::fcntl::{OFlag, openat, renameat};
    use std::os::unix::fs::PermissionsExt;
    let (dir, name) = parent_without_links(path, true)?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(&name);
    tmp_name.push(format!(
        ".tmp-{}-{}",
        std::process::id(),
        crate::secrets::generate()
    ));
    let fd = openat(
        &dir,
        tmp_name.as_os_str(),
        OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::from_bits_truncate(mode),
    )?;
    let mut f = std::fs::File::from(fd);
    let written = (|| {
        f.write_all(bytes)?;
        // Mode and owner set on the file opened, never by its name.
        f.set_permissions(std::fs::Permissions::from_mode(mode))?;
        if let Some(acct) = owner.filter(|_| crate::users::is_root()) {
            std::os::unix::fs::fchown(&f, Some(acct.uid.as_raw()), Some(acct.gid.as_raw()))?;
        }
        f.sync_all()?;
        renameat(&dir, tmp_name.as_os_str(), &dir, name.as_os_str()).map_err(std::io::Error::from)
    })();
    if written.is_err() {
        let _ = nix::unistd::unlinkat(
            &dir,
            tmp_name.as_os_str(),
            nix::unistd::UnlinkatFlags::NoRemoveDir,
        );
    }
    written
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_encoding() {
        assert_eq!(encode("a b/c@d:é"), "a%20b%2Fc%40d%3A%C3%A9");
        assert_eq!(encode("Abc-1._~"), "Abc-1._~");
    }
}

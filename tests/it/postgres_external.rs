//! `postgres.mode = "external"`: no embedded server; regobox uses the URL it is given, here a
//! plain PostgreSQL server this test starts itself.

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::*;

/// A PostgreSQL server started directly with initdb and postgres (its admin trusted on the Unix
/// socket, passwords required over TCP),
/// with an `app` role (password `extpw`) owning database `extdb`.
struct PlainServer {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

fn bindir() -> PathBuf {
    let out = Command::new("pg_config").arg("--bindir").output().unwrap();
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

fn as_pg_user(cmd: &mut Command) -> &mut Command {
    if is_root() {
        let user = nix::unistd::User::from_name("postgres").unwrap().unwrap();
        cmd.uid(user.uid.as_raw()).gid(user.gid.as_raw());
    }
    cmd
}

/// TLS for a [`PlainServer`]: its certificate, and the only rules of its `pg_hba.conf`.
struct ServerTls {
    cert: PathBuf,
    key: PathBuf,
    /// The CA client certificates must chain to.
    client_ca: PathBuf,
    hba: &'static str,
}

impl PlainServer {
    fn start() -> PlainServer {
        PlainServer::start_with(None)
    }

    fn start_with(tls: Option<ServerTls>) -> PlainServer {
        let dir = tempdir();
        if is_root() {
            let user = nix::unistd::User::from_name("postgres").unwrap().unwrap();
            nix::unistd::chown(dir.path(), Some(user.uid), Some(user.gid)).unwrap();
        }
        let data = dir.path().join("data");
        let status = as_pg_user(
            Command::new(bindir().join("initdb"))
                .arg("-D")
                .arg(&data)
                .args([
                    "-U",
                    "admin",
                    "--auth-local=trust",
                    "--auth-host=scram-sha-256",
                ])
                .args(["-E", "UTF8", "--no-sync"])
                .stdout(Stdio::null()),
        )
        .status()
        .unwrap();
        assert!(status.success());
        let mut settings = vec!["listen_addresses=127.0.0.1".to_string()];
        if let Some(tls) = &tls {
            // The server reads its key only when it is the account's and private.
            for (from, to) in [
                (&tls.cert, "server.crt"),
                (&tls.key, "server.key"),
                (&tls.client_ca, "root.crt"),
            ] {
                let path = data.join(to);
                std::fs::copy(from, &path).unwrap();
                std::fs::set_permissions(
                    &path,
                    std::os::unix::fs::PermissionsExt::from_mode(0o600),
                )
                .unwrap();
                if is_root() {
                    let user = nix::unistd::User::from_name("postgres").unwrap().unwrap();
                    nix::unistd::chown(&path, Some(user.uid), Some(user.gid)).unwrap();
                }
            }
            let hba = data.join("pg_hba.conf");
            std::fs::write(&hba, format!("local all admin trust\n{}\n", tls.hba)).unwrap();
            settings.extend(
                ["ssl=on", "ssl_ca_file=root.crt"]
                    .iter()
                    .map(|s| s.to_string()),
            );
        }
        let port = free_port();
        let child = as_pg_user(
            Command::new(bindir().join("postgres"))
                .arg("-D")
                .arg(&data)
                .args(["-p", &port.to_string(), "-k"])
                .arg(dir.path())
                .args(settings.iter().flat_map(|s| ["-c", s.as_str()]))
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        )
        .spawn()
        .unwrap();
        let server_dir = dir.path().to_path_buf();
        let server = PlainServer {
            child,
            port,
            _dir: dir,
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let deadline = Instant::now() + Duration::from_secs(30);
            let mut cfg = tokio_postgres::Config::new();
            cfg.host_path(server_dir)
                .port(port)
                .user("admin")
                .dbname("postgres");
            loop {
                if let Ok((client, conn)) = cfg.connect(tokio_postgres::NoTls).await {
                    tokio::spawn(conn);
                    for sql in [
                        "CREATE ROLE app LOGIN PASSWORD 'extpw'",
                        "CREATE DATABASE extdb OWNER app",
                        "CREATE ROLE certuser LOGIN",
                        "GRANT ALL ON DATABASE extdb TO certuser",
                    ] {
                        client.batch_execute(sql).await.unwrap();
                    }
                    break;
                }
                assert!(Instant::now() < deadline, "the plain server did not start");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        server
    }

    fn url(&self, password: &str) -> String {
        format!("postgresql://app:{password}@127.0.0.1:{}/extdb", self.port)
    }

    /// The URL of `app` with its password through `host`, with `query` (TLS parameters).
    fn url_via(&self, host: &str, query: &str) -> String {
        format!("postgresql://app:extpw@{host}:{}/extdb?{query}", self.port)
    }
}

impl Drop for PlainServer {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGINT,
        );
        let _ = self.child.wait();
    }
}

#[test]
fn external_mode_uses_the_given_server_and_creates_no_cluster() {
    let server = PlainServer::start();
    let mut inst = Instance::new();
    inst.env = vec![
        ("REGOBOX_POSTGRES__MODE".into(), "external".into()),
        ("REGOBOX_POSTGRES__URL".into(), server.url("extpw")),
    ];
    inst.config_file(
        "initdb.d/10_schema.sql",
        "CREATE TABLE ext_seed(id int); INSERT INTO ext_seed VALUES (1);",
    );
    inst.ok(&["init"]);
    inst.ok(&["init"]);
    assert_eq!(
        inst.sql("SELECT count(*) FROM ext_seed"),
        "1",
        "scripts ran once"
    );
    assert_eq!(
        inst.sql("SELECT current_user || '@' || current_database()"),
        "app@extdb"
    );

    let run = inst.start();
    assert!(
        run.log_text().contains("using the external PostgreSQL"),
        "{}",
        run.log_text()
    );
    assert_eq!(inst.sql("SELECT count(*) FROM ext_seed"), "1");
    run.stop();
    assert!(
        !inst.root.join("db").exists(),
        "no cluster in external mode"
    );

    // The URL's password is never printed.
    let out = inst.ok(&["config"]);
    assert!(!stdout(&out).contains("extpw"), "{}", stdout(&out));
    assert!(stdout(&out).contains("app:<redacted>@127.0.0.1"));

    // A wrong password is reported at once, not waited out.
    inst.env[1].1 = server.url("wrong");
    let started = Instant::now();
    let out = inst.output(&["init"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("password authentication failed"),
        "{}",
        stderr(&out)
    );
    assert!(started.elapsed() < Duration::from_secs(60));
}

#[test]
fn external_mode_requires_a_url() {
    let mut inst = Instance::new();
    inst.env = vec![("REGOBOX_POSTGRES__MODE".into(), "external".into())];
    let out = inst.output(&["run"]);
    assert_eq!(out.status.code(), Some(78));
    assert!(
        stderr(&out).contains("environment variable REGOBOX_POSTGRES__MODE: key `postgres.url`")
            || stderr(&out).contains("key `postgres.url`: must be set"),
        "{}",
        stderr(&out)
    );
}

/// The server's TLS answer, as the application's libpq sees it through `regobox psql`.
const SSL_IN_USE: &str = "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()";

/// regobox fails at once, with `says` in its message, on what waiting cannot cure: it would
/// wait out `postgres.start_timeout` (here 10 minutes) otherwise.
fn refused_at_once(inst: &Instance, says: &str) {
    let started = Instant::now();
    let out = inst.output(&["init"]);
    let took = started.elapsed();
    assert!(!out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains(says),
        "wanted {says:?}:\n{}",
        stderr(&out)
    );
    assert!(took < Duration::from_secs(60), "{took:?}: {}", stderr(&out));
}

#[test]
fn external_servers_that_require_tls() {
    let dir = tempdir();
    let certs = dir.path();
    let ca = issue(certs, "ca", None, &[]);
    issue(certs, "server", Some(&ca), &["localhost"]);
    issue(certs, "certuser", Some(&ca), &[]);
    issue(certs, "other-ca", None, &[]);
    std::fs::set_permissions(
        certs.join("certuser-key.pem"),
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    let server = PlainServer::start_with(Some(ServerTls {
        cert: certs.join("server.pem"),
        key: certs.join("server-key.pem"),
        client_ca: certs.join("ca.pem"),
        // TLS only: a plain connection finds no rule.
        hba: "hostssl all certuser 127.0.0.1/32 cert\nhostssl all all 127.0.0.1/32 scram-sha-256",
    }));
    let ca_pem = certs.join("ca.pem").display().to_string();
    let other_pem = certs.join("other-ca.pem").display().to_string();
    let mut inst = Instance::new();
    let with_url = |inst: &mut Instance, url: String| {
        inst.env = vec![
            ("REGOBOX_POSTGRES__MODE".into(), "external".into()),
            ("REGOBOX_POSTGRES__START_TIMEOUT".into(), "10m".into()),
            ("REGOBOX_POSTGRES__URL".into(), url),
        ];
    };

    // verify-full against the right CA and the name in the certificate: regobox's own
    // connections (init's readiness and bootstrap) and psql's both use TLS.
    with_url(
        &mut inst,
        server.url_via(
            "localhost",
            &format!("sslmode=verify-full&sslrootcert={ca_pem}"),
        ),
    );
    inst.ok(&["init"]);
    assert_eq!(inst.sql(SSL_IN_USE), "t");
    // The application's own libpq, with DATABASE_URL alone, verifies the same way.
    let out = inst.ok(&[
        "exec",
        "sh",
        "-c",
        &format!(
            "env -u PGSSLMODE -u PGSSLROOTCERT {} \"$DATABASE_URL\" -XtAc '{SSL_IN_USE}'",
            psql_binary().display()
        ),
    ]);
    assert_eq!(stdout(&out).trim(), "t");
    // pg_dump too, with the same settings.
    inst.ok(&["backup"]);
    assert_eq!(archives_in(&inst.root.join("backups")).len(), 1);
    // The application gets the same settings, for libpq and in its URL.
    let out = inst.ok(&[
        "exec",
        "sh",
        "-c",
        "echo \"$PGSSLMODE|$PGSSLROOTCERT|$DATABASE_URL\"",
    ]);
    assert_eq!(
        stdout(&out).trim(),
        format!(
            "verify-full|{ca_pem}|{}",
            server.url_via(
                "localhost",
                &format!(
                    "sslmode=verify-full&sslrootcert={}",
                    ca_pem.replace('/', "%2F")
                )
            )
        )
    );

    // A certificate from another CA, and a host name the certificate does not hold, are
    // refused at once, saying so.
    with_url(
        &mut inst,
        server.url_via(
            "localhost",
            &format!("sslmode=verify-full&sslrootcert={other_pem}"),
        ),
    );
    refused_at_once(&inst, "not issued by a CA in sslrootcert");
    with_url(
        &mut inst,
        server.url_via(
            "127.0.0.1",
            &format!("sslmode=verify-full&sslrootcert={ca_pem}"),
        ),
    );
    refused_at_once(&inst, "does not name `127.0.0.1`");
    // verify-ca checks the issuer only; require checks nothing; a URL without sslmode is
    // libpq's prefer, which takes TLS when offered.
    for query in [
        format!("sslmode=verify-ca&sslrootcert={ca_pem}"),
        "sslmode=require".to_string(),
        String::new(),
    ] {
        with_url(&mut inst, server.url_via("127.0.0.1", &query));
        inst.ok(&["init"]);
        assert_eq!(inst.sql(SSL_IN_USE), "t", "{query}");
    }
    // require with a root certificate checks the issuer, as libpq does.
    with_url(
        &mut inst,
        server.url_via(
            "127.0.0.1",
            &format!("sslmode=require&sslrootcert={other_pem}"),
        ),
    );
    refused_at_once(&inst, "not issued by a CA in sslrootcert");
    // A plain connection finds no rule: the server's refusal, at once.
    with_url(&mut inst, server.url_via("127.0.0.1", "sslmode=disable"));
    refused_at_once(&inst, "no encryption");
    // A root certificate file that is not there is named.
    with_url(
        &mut inst,
        server.url_via(
            "localhost",
            "sslmode=verify-full&sslrootcert=/nonexistent/ca.pem",
        ),
    );
    refused_at_once(&inst, "sslrootcert /nonexistent/ca.pem: cannot read it");

    // A client certificate, with no password at all.
    with_url(
        &mut inst,
        format!(
            "postgresql://certuser@localhost:{}/extdb?sslmode=verify-full&sslrootcert={ca_pem}&sslcert={}&sslkey={}",
            server.port,
            certs.join("certuser.pem").display(),
            certs.join("certuser-key.pem").display()
        ),
    );
    inst.ok(&["init"]);
    assert_eq!(
        inst.sql("SELECT current_user || ' ' || ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"),
        "certuser true"
    );

    // A server without TLS, asked for it: refused at once (not retried for the start timeout).
    let plain = PlainServer::start();
    with_url(&mut inst, plain.url_via("127.0.0.1", "sslmode=require"));
    refused_at_once(&inst, "server does not support TLS");
}

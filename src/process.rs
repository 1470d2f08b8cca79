//! Every child process regobox starts, and the one reaper.
//!
//! regobox is PID 1 (or a child subreaper under `docker run --init`), so orphaned grandchildren
//! are re-parented to it and must be reaped. Exactly one task calls `waitpid(-1)`: on every
//! SIGCHLD it collects every exited child and hands the status of a child started through
//! [`spawn`] to that child's owner; any other pid is an orphan, reaped and counted. Nothing else
//! in regobox may wait for a process (no `tokio::process`, no `Command::output`), or it would
//! race the reaper for statuses.
//!
//! [`spawn`] registers the child under the same lock the reaper takes, so a child that exits at
//! once is never mistaken for an orphan.

use std::collections::HashMap;
use std::io;
use std::os::unix::process::ExitStatusExt;
use std::process::{ChildStderr, ChildStdin, ChildStdout, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;
use tokio::io::AsyncReadExt;
use tokio::sync::oneshot;

struct Registry {
    waiters: HashMap<i32, oneshot::Sender<ExitStatus>>,
}

static REGISTRY: Mutex<Option<Registry>> = Mutex::new(None);
static ORPHANS: AtomicU64 = AtomicU64::new(0);
static INSTALLED: OnceLock<()> = OnceLock::new();

/// Start the reaper (once per process; later calls do nothing). Must be called from within the
/// tokio runtime, before any child is spawned. When regobox is not PID 1, it becomes a child
/// subreaper so that orphans of its children still come to it.
pub fn install() -> io::Result<()> {
    if INSTALLED.get().is_some() {
        return Ok(());
    }
    if std::process::id() != 1 {
        // SAFETY: prctl with PR_SET_CHILD_SUBREAPER takes plain integer arguments.
        let rc = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
        if rc != 0 {
            tracing::warn!(error = %io::Error::last_os_error(), "cannot become a child subreaper; orphans of children will not be reaped by regobox");
        }
    }
    let mut sigchld = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::child())?;
    *lock() = Some(Registry {
        waiters: HashMap::new(),
    });
    let _ = INSTALLED.set(());
    tokio::spawn(async move {
        loop {
            reap_all();
            if sigchld.recv().await.is_none() {
                return;
            }
        }
    });
    Ok(())
}

fn lock() -> std::sync::MutexGuard<'static, Option<Registry>> {
    REGISTRY.lock().unwrap_or_else(|e| e.into_inner())
}

/// Collect every exited child.
fn reap_all() {
    let mut guard = lock();
    loop {
        let mut raw: libc::c_int = 0;
        // SAFETY: waitpid writes the status into `raw`, a valid c_int.
        let pid = unsafe { libc::waitpid(-1, &mut raw, libc::WNOHANG) };
        if pid == 0 {
            return; // children remain, none has exited
        }
        if pid < 0 {
            if io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return; // ECHILD: no children at all
        }
        let status = ExitStatus::from_raw(raw);
        match guard.as_mut().and_then(|r| r.waiters.remove(&pid)) {
            Some(tx) => {
                let _ = tx.send(status);
            }
            None => {
                ORPHANS.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(pid, %status, "reaped an orphaned process");
            }
        }
    }
}

/// Send `signal` to `pid`, a child started through [`spawn`], unless it has been reaped:
/// checked and sent under the reaper's lock, so that the pid is still the child's (a reaped
/// child's pid may name another process by now).
pub fn signal_child(pid: i32, signal: Signal) {
    let guard = lock();
    if guard.as_ref().is_some_and(|r| r.waiters.contains_key(&pid)) {
        let _ = kill(Pid::from_raw(pid), signal);
    }
}

/// How many orphaned processes the reaper has collected.
pub fn orphans_reaped() -> u64 {
    ORPHANS.load(Ordering::Relaxed)
}

/// What a server's processes are known by, to find what is left of them once it has exited:
/// where they work and as whom, and when the server started.
#[derive(Debug, Clone)]
pub struct Workers {
    /// Their working directory.
    pub dir: std::path::PathBuf,
    /// The account they run as.
    pub uid: u32,
    /// When the server started (`/proc/PID/stat`'s start time, in clock ticks since boot):
    /// nothing of it started before.
    pub since: u64,
}

/// The processes re-parented to regobox (orphans: none it started through [`spawn`], not
/// zombies) that are what is left of a server with these `workers`: started since it did, and
/// working in its directory or, when the server runs as an account of its own (not regobox's),
/// running as that account: regobox as root cannot read where another account's process works
/// without `CAP_SYS_PTRACE`, which Docker's default capabilities leave out, and a program the
/// server ran may have changed directory (`COPY ... FROM PROGRAM`). Read from `/proc`; a
/// process that exits meanwhile is skipped.
pub fn left_of(workers: &Workers) -> Vec<i32> {
    let Ok(dir) = workers.dir.canonicalize() else {
        return Vec::new();
    };
    // Held while `/proc` is read: a child spawned meanwhile is not taken for an orphan.
    let guard = lock();
    let started = |pid: &i32| guard.as_ref().is_some_and(|r| r.waiters.contains_key(pid));
    let me = std::process::id() as i32;
    let own_account = workers.uid != nix::unistd::getuid().as_raw();
    direct_children_where(|stat| stat.parent == me && !stat.zombie)
        .into_iter()
        .filter(|stat| !started(&stat.pid) && stat.started >= workers.since)
        .filter(|stat| {
            (own_account && uid_of(stat.pid) == Some(workers.uid))
                || std::fs::read_link(format!("/proc/{}/cwd", stat.pid)).is_ok_and(|cwd| cwd == dir)
        })
        .map(|stat| stat.pid)
        .collect()
}

/// The pids whose parent is regobox, read from `/proc`.
pub fn direct_children() -> Vec<i32> {
    let me = std::process::id() as i32;
    direct_children_where(|stat| stat.parent == me)
        .into_iter()
        .map(|stat| stat.pid)
        .collect()
}

/// What `/proc/PID/stat` says of a process.
#[derive(Debug)]
pub struct Stat {
    pub pid: i32,
    pub parent: i32,
    pub zombie: bool,
    /// Its start time, in clock ticks since boot.
    pub started: u64,
}

/// `/proc/PID/stat` of `pid`, unless it has gone.
pub fn stat_of(pid: i32) -> Option<Stat> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in brackets and may hold anything: read after the last ')'. From
    // there: state (3), ppid (4), ..., starttime (22).
    let rest: Vec<&str> = stat[stat.rfind(')')? + 1..].split_whitespace().collect();
    Some(Stat {
        pid,
        zombie: matches!(*rest.first()?, "Z" | "X"),
        parent: rest.get(1)?.parse().ok()?,
        started: rest.get(19)?.parse().ok()?,
    })
}

fn direct_children_where(keep: impl Fn(&Stat) -> bool) -> Vec<Stat> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(stat_of)
        .filter(|stat| keep(stat))
        .collect()
}

/// The real user id of `pid` (`/proc/PID/status`, readable by anyone).
pub fn uid_of(pid: i32) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// A child started through [`spawn`]; only the reaper waits for it.
#[derive(Debug)]
pub struct Child {
    pid: i32,
    status: Option<ExitStatus>,
    rx: Option<oneshot::Receiver<ExitStatus>>,
    pub stdin: Option<ChildStdin>,
    pub stdout: Option<ChildStdout>,
    pub stderr: Option<ChildStderr>,
}

/// The open files limit children get (soft, hard): the one regobox started with, where it
/// raised its own (the proxy, [`children_open_files`]). Programs that use `select` fail past
/// descriptor 1023, and some close every descriptor up to the soft limit at each start.
static CHILD_OPEN_FILES: std::sync::OnceLock<(u64, u64)> = std::sync::OnceLock::new();

/// Children get `(soft, hard)` as their open files limit, whatever regobox's own.
pub fn children_open_files(soft: u64, hard: u64) {
    let _ = CHILD_OPEN_FILES.set((soft, hard));
}

/// Start `command` and register it with the reaper.
static LAUNCHED: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();

/// Record when regobox was launched (the first thing `main` does).
pub fn mark_launch() {
    LAUNCHED.get_or_init(std::time::Instant::now);
}

/// The time since regobox was launched.
pub fn since_launch() -> std::time::Duration {
    LAUNCHED.get_or_init(std::time::Instant::now).elapsed()
}

pub fn spawn(command: &mut std::process::Command) -> io::Result<Child> {
    let mut guard = lock();
    let Some(registry) = guard.as_mut() else {
        return Err(io::Error::other(
            "the reaper is not running (process::install was not called)",
        ));
    };
    if let Some(&(soft, hard)) = CHILD_OPEN_FILES.get() {
        use std::os::unix::process::CommandExt;
        let limit = libc::rlimit {
            rlim_cur: soft,
            rlim_max: hard,
        };
        // SAFETY: setrlimit is async-signal-safe, and the closure touches nothing but its own
        // copy of `limit` between fork and exec.
        unsafe {
            command.pre_exec(move || {
                if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    let mut child = command.spawn()?;
    let pid = child.id() as i32;
    let (tx, rx) = oneshot::channel();
    registry.waiters.insert(pid, tx);
    drop(guard);
    Ok(Child {
        pid,
        status: None,
        rx: Some(rx),
        stdin: child.stdin.take(),
        stdout: child.stdout.take(),
        stderr: child.stderr.take(),
    })
}

impl Child {
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// The exit status (cancel-safe: once known, it is kept).
    pub async fn wait(&mut self) -> ExitStatus {
        if let Some(s) = self.status {
            return s;
        }
        let status = match self.rx.as_mut() {
            Some(rx) => rx.await.unwrap_or_else(|_| ExitStatus::from_raw(0xff << 8)),
            None => ExitStatus::from_raw(0xff << 8),
        };
        self.rx = None;
        self.status = Some(status);
        status
    }

    /// The exit status if the child has exited.
    pub fn try_status(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            if let Some(rx) = self.rx.as_mut() {
                if let Ok(s) = rx.try_recv() {
                    self.status = Some(s);
                    self.rx = None;
                }
            }
        }
        self.status
    }

    /// Send `signal` to the child (if it has not been reaped yet).
    pub fn signal(&mut self, signal: Signal) {
        if self.try_status().is_none() {
            let _ = kill(Pid::from_raw(self.pid), signal);
        }
    }

    /// Send `signal` to the child's process group (it must lead one: `process_group(0)`).
    pub fn signal_group(&mut self, signal: Signal) {
        let _ = killpg(Pid::from_raw(self.pid), signal);
    }
}

/// Past a file size limit (`ulimit -f`), a write fails with EFBIG instead of SIGXFSZ killing
/// regobox where it is (a restore's extraction died with its temporary server running and its
/// staging left). Caught by a handler that does nothing, rather than ignored: an exec resets a
/// caught signal, so the programs regobox starts keep the default.
pub fn file_size_limit_is_an_error() {
    extern "C" fn nothing(_: libc::c_int) {}
    let action = nix::sys::signal::SigAction::new(
        nix::sys::signal::SigHandler::Handler(nothing),
        nix::sys::signal::SaFlags::SA_RESTART,
        nix::sys::signal::SigSet::empty(),
    );
    // SAFETY: the handler does nothing, which is async-signal-safe.
    let _ = unsafe { nix::sys::signal::sigaction(nix::sys::signal::Signal::SIGXFSZ, &action) };
}

/// Have `command`'s process killed (SIGKILL) when the thread that starts it ends, as it does
/// when regobox is killed: for the programs of a step that must not go on without regobox
/// (an upgrade's initdb and pg_upgrade). Call it after anything that changes the child's
/// credentials (which clears the setting).
pub fn die_with_parent(command: &mut std::process::Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: runs in the child between fork and exec; it only makes the prctl system call.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// What a finished command printed, and how it ended.
#[derive(Debug)]
pub struct Output {
    pub status: ExitStatus,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

/// Run `command` to completion, capturing its output (stdin is null).
pub async fn output(command: &mut std::process::Command) -> io::Result<Output> {
    output_fed(command, Stdio::null()).await
}

/// Run `command` to completion with `stdin`, capturing its output.
///
/// The command leads a process group of its own. If the future is dropped before the command
/// has ended (a stop signal, a timeout), the whole group is killed (SIGKILL): no initdb, probe or
/// dump goes on writing after regobox has given up on it, or after it has exited.
pub async fn output_fed(command: &mut std::process::Command, stdin: Stdio) -> io::Result<Output> {
    output_kept(command, stdin, None).await
}

/// [`output`], keeping at most `limit + 1` bytes of each stream (what is past them is read and
/// dropped; more than `limit` kept says the stream was longer): for a command whose output
/// untrusted input makes (`pg_restore` printing a crafted dump's statement in an error).
pub async fn output_limited(
    command: &mut std::process::Command,
    limit: usize,
) -> io::Result<Output> {
    output_kept(command, Stdio::null(), Some(limit)).await
}

async fn output_kept(
    command: &mut std::process::Command,
    stdin: Stdio,
    limit: Option<usize>,
) -> io::Result<Output> {
    use std::os::unix::process::CommandExt;
    command
        .stdin(stdin)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let mut child = KillOnDrop(spawn(command)?);
    let out = child.0.stdout.take().map(|p| read_kept(p, limit));
    let err = child.0.stderr.take().map(|p| read_kept(p, limit));
    // Both at once: a child blocked writing one stream (a pipe holds 64 KiB) while the other is
    // read to its end never ends (a dump whose failing statement pg_restore printed whole in its
    // error hung a restore for good).
    let (stdout, stderr) = tokio::join!(
        async {
            match out {
                Some(f) => f.await,
                None => Ok(Vec::new()),
            }
        },
        async {
            match err {
                Some(f) => f.await,
                None => Ok(Vec::new()),
            }
        }
    );
    let (stdout, stderr) = (stdout?, stderr?);
    let status = child.0.wait().await;
    Ok(Output {
        status,
        stdout,
        stderr,
    })
}

/// A child leading its process group, which is killed with it unless the child was seen to end.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if self.0.try_status().is_none() {
            self.0.signal_group(Signal::SIGKILL);
            // A SIGKILL is sent, not yet acted on: the group is waited for (briefly: a killed
            // process ends at once, but a busy machine may not run it for a while), so that what
            // comes next (regobox's exit, the next `init` on the same directory) does not find
            // it still writing. Zombies count as members until reaped: reaped here too (the
            // reaper task may not run meanwhile on a busy runtime, and the child's own children,
            // re-parented to regobox, stayed zombies for the whole wait).
            let group = Pid::from_raw(self.0.pid());
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
            while killpg(group, None).is_ok() && std::time::Instant::now() < deadline {
                reap_all();
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        }
    }
}

/// A pipe read to its end; kept whole, or its first `limit + 1` bytes.
async fn read_kept(
    pipe: impl Into<std::os::fd::OwnedFd>,
    limit: Option<usize>,
) -> io::Result<Vec<u8>> {
    let mut reader = async_pipe(pipe)?;
    let mut buf = Vec::new();
    match limit {
        None => {
            reader.read_to_end(&mut buf).await?;
        }
        Some(limit) => {
            (&mut reader)
                .take(limit as u64 + 1)
                .read_to_end(&mut buf)
                .await?;
            tokio::io::copy(&mut reader, &mut tokio::io::sink()).await?;
        }
    }
    Ok(buf)
}

/// A child's pipe as an async reader.
pub fn async_pipe(
    pipe: impl Into<std::os::fd::OwnedFd>,
) -> io::Result<tokio::net::unix::pipe::Receiver> {
    tokio::net::unix::pipe::Receiver::from_owned_fd(pipe.into())
}

/// The exit code a status stands for: its code, or 128 + the signal that killed it.
pub fn exit_code(status: ExitStatus) -> u8 {
    match (status.code(), status.signal()) {
        (Some(code), _) => code.clamp(0, 255) as u8,
        (None, Some(sig)) => (128 + sig).clamp(0, 255) as u8,
        _ => 1,
    }
}

/// Call `point` a fault-injection point: with `REGOBOX_FAULT_INJECT=<point>`, regobox kills
/// itself there with SIGKILL. Used by the tests to prove a kill at that step loses nothing.
pub fn fault(point: &str) {
    if std::env::var("REGOBOX_FAULT_INJECT").is_ok_and(|v| v == point) {
        tracing::warn!(point, "fault injection: SIGKILL");
        let _ = nix::sys::signal::kill(nix::unistd::Pid::this(), nix::sys::signal::Signal::SIGKILL);
        std::thread::sleep(std::time::Duration::from_secs(60));
    }
}

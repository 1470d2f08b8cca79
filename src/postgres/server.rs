//! The `postgres` server process: started in the foreground as a child of regobox, in its own
//! process group, as the unprivileged account, with fsync on; its output forwarded line by line.
//!
//! Stopping sends SIGINT (fast shutdown: active transactions are rolled back, a checkpoint is
//! written) and waits for the grace period; past it, or on a second request, SIGQUIT
//! (immediate shutdown, recovered by WAL replay at the next start), and finally SIGKILL.

use std::future::Future;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

use crate::process::{self, Child};

use super::binaries::Binaries;
use crate::logs::{Forwarders, Observer, SharedLogFile, Sink};
use crate::users::Account;

/// How long an immediate shutdown (SIGQUIT) may take before SIGKILL.
const QUIT_GRACE: Duration = Duration::from_secs(5);

/// How long what is left of a server that exited may take to go, once killed, before the
/// wait for it gives up (a process in uninterruptible sleep dies when it wakes).
const LEFTOVERS_GRACE: Duration = Duration::from_secs(30);

/// A running `postgres`.
#[derive(Debug)]
pub struct Server {
    child: Child,
    pid: i32,
    /// Its output; drained after it exits so no last line is lost.
    logs: Forwarders,
    /// What its processes are known by (see [`Server::sweep`]).
    workers: process::Workers,
    /// What was left of it has been killed (once, when its exit was seen).
    swept: bool,
    /// Sent an immediate shutdown by [`Server::halt`].
    halted: std::sync::atomic::AtomicBool,
}

impl NoSpace {
    /// It ended the process that met it (a PANIC ends the server; a FATAL during crash recovery
    /// does too).
    pub fn is_fatal(&self) -> bool {
        self.severity == "PANIC" || self.severity == "FATAL"
    }
}

/// Where a server's output goes: each line prefixed with `label`, to `sink` and, if given, to a
/// log file, and shown to `observer`.
pub struct Output {
    /// `postgres` for the live server; another for a server beside it (a restore's), so that
    /// its lines are not taken for the live server's.
    pub label: &'static str,
    pub sink: Sink,
    pub file: Option<SharedLogFile>,
    pub observer: Option<Observer>,
}

impl Server {
    /// Start `postgres -D data_dir -c k=v ...` as `account`.
    pub fn spawn(
        binaries: &Binaries,
        data_dir: &Path,
        account: &Account,
        params: &[(String, String)],
        output: Output,
    ) -> std::io::Result<Server> {
        let mut command = std::process::Command::new(binaries.dir.join("postgres"));
        command.arg("-D").arg(data_dir);
        for (k, v) in params {
            command.arg("-c").arg(format!("{k}={v}"));
        }
        command.env_clear();
        for var in ["PATH", "TZ", "LANG", "LC_ALL"] {
            if let Some(v) = std::env::var_os(var) {
                command.env(var, v);
            }
        }
        command
            .current_dir(data_dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own process group: a terminal's Ctrl-C reaches regobox, which decides.
            .process_group(0);
        account.apply(&mut command);
        let mut child = process::spawn(&mut command)?;
        let pid = child.pid();
        // (Read once it runs: `spawn` returns after the exec, its account set.)
        let workers = process::Workers {
            dir: data_dir.to_path_buf(),
            uid: process::uid_of(pid).unwrap_or(account.uid.as_raw()),
            since: process::stat_of(pid).map_or(0, |s| s.started),
        };
        let logs = Forwarders::start(
            &mut child,
            output.label,
            output.sink,
            output.file,
            output.observer,
        )?;
        Ok(Server {
            child,
            pid,
            logs,
            workers,
            swept: false,
            halted: std::sync::atomic::AtomicBool::new(false),
        })
    }

    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Wait for the server to exit by itself (cancel-safe), then for what was left of it to go
    /// (see [`Server::sweep`]), then for its last lines of output.
    pub async fn wait(&mut self) -> std::io::Result<ExitStatus> {
        let status = self.child.wait().await;
        self.sweep();
        self.leftovers_gone().await;
        self.logs.drain().await;
        Ok(status)
    }

    /// Whether the server has exited (and been reaped).
    pub fn has_exited(&mut self) -> bool {
        let exited = self.child.try_status().is_some();
        if exited {
            self.sweep();
        }
        exited
    }

    /// Once the postmaster has exited: SIGKILL whatever is left of it, so that nothing of it
    /// still works in the data directory and a new server does not find the old shared memory
    /// in use. Its processes (backends, checkpointer...) lead process groups of their own (each
    /// calls `setsid`), so its group is not enough: they are found as the orphans re-parented
    /// to regobox, started since the server, that work in its data directory or run as its
    /// account (see [`process::left_of`]). A postmaster killed outright (the kernel's
    /// OOM killer) left them working until they noticed, and one in a query that never waits
    /// (a loop) held the shared memory: the server started again refused to, and each refusal
    /// was counted as a crash until regobox gave up. Done once, as soon as the exit is seen
    /// (the group id cannot be reused while a member lives); [`Server::wait`] then waits until
    /// they have gone.
    fn sweep(&mut self) {
        if !self.swept {
            self.swept = true;
            let _ = killpg(Pid::from_raw(self.pid), Signal::SIGKILL);
            let left = process::left_of(&self.workers);
            if !left.is_empty() {
                tracing::warn!(
                    pids = ?left,
                    "killing what is left of the PostgreSQL server that exited, still working in its data directory ({} processes)",
                    left.len()
                );
                for pid in left {
                    let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
                }
            }
        }
    }

    /// Until no process of the server that exited works in its data directory (killed as they
    /// show: a process left may have started others), for [`LEFTOVERS_GRACE`] at most.
    async fn leftovers_gone(&self) {
        let deadline = tokio::time::Instant::now() + LEFTOVERS_GRACE;
        loop {
            let left = process::left_of(&self.workers);
            if left.is_empty() {
                return;
            }
            if tokio::time::Instant::now() >= deadline {
                tracing::error!(
                    pids = ?left,
                    "processes of the PostgreSQL server that exited are still there {LEFTOVERS_GRACE:?} after being killed"
                );
                return;
            }
            for pid in left {
                let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stop the server: SIGINT, then after `grace` (or as soon as `force` completes) SIGQUIT,
    /// then SIGKILL to the whole process group.
    pub async fn stop(
        &mut self,
        grace: Duration,
        force: impl Future<Output = ()>,
    ) -> std::io::Result<ExitStatus> {
        if let Some(status) = self.child.try_status() {
            self.sweep();
            self.leftovers_gone().await;
            return Ok(status);
        }
        if self.halted.load(std::sync::atomic::Ordering::Relaxed) {
            tracing::info!(
                pid = self.pid,
                "waiting for PostgreSQL's immediate shutdown"
            );
            if let Ok(status) = tokio::time::timeout(QUIT_GRACE, self.wait()).await {
                return status;
            }
            tracing::warn!("PostgreSQL ignored SIGQUIT; killing its process group");
            let _ = killpg(Pid::from_raw(self.pid), Signal::SIGKILL);
            return self.wait().await;
        }
        tracing::info!(pid = self.pid, "stopping PostgreSQL (fast shutdown)");
        self.signal(Signal::SIGINT);
        tokio::pin!(force);
        tokio::select! {
            status = self.wait() => return status,
            _ = tokio::time::sleep(grace) => {
                tracing::warn!(grace = ?grace, "PostgreSQL did not stop within its grace period; immediate shutdown");
            }
            _ = &mut force => {
                tracing::warn!("second stop request; immediate shutdown of PostgreSQL");
            }
        }
        self.signal(Signal::SIGQUIT);
        if let Ok(status) = tokio::time::timeout(QUIT_GRACE, self.wait()).await {
            return status;
        }
        tracing::warn!("PostgreSQL ignored SIGQUIT; killing its process group");
        let _ = killpg(Pid::from_raw(self.pid), Signal::SIGKILL);
        self.wait().await
    }

    fn signal(&mut self, signal: Signal) {
        self.child.signal(signal);
    }

    /// An immediate shutdown, not waited for: every backend exits at once, writing nothing
    /// more. For a server whose data is thrown away (a restore's, cancelled); callable while
    /// the server is in use.
    pub fn halt(&self) {
        self.halted
            .store(true, std::sync::atomic::Ordering::Relaxed);
        crate::process::signal_child(self.pid, Signal::SIGQUIT);
    }
}

impl Drop for Server {
    /// A server still running when its handle goes away (an error path, a cancelled start) is
    /// asked for a fast shutdown rather than left behind in its own process group.
    fn drop(&mut self) {
        if self.child.try_status().is_none() {
            self.signal(Signal::SIGINT);
        }
    }
}

/// A line of PostgreSQL's output saying that a write failed for lack of space (ENOSPC).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NoSpace {
    /// The severity PostgreSQL gave it (`PANIC`, `FATAL`, `ERROR`...): the first one on the line,
    /// which is the server's own (a statement it logs comes after it).
    pub severity: String,
    /// The file it names, as PostgreSQL gives it (relative to the data directory).
    pub file: Option<String>,
    /// The message from its severity on (`PANIC:  could not write to file ...`).
    pub message: String,
}

/// Read `line` (one line of the server's output) for a write that failed for lack of space.
pub fn no_space(line: &str) -> Option<NoSpace> {
    if !line.contains("No space left on device") {
        return None;
    }
    let (at, severity) = ["PANIC:", "FATAL:", "ERROR:", "WARNING:", "LOG:"]
        .iter()
        .filter_map(|severity| Some((line.find(severity)?, severity.trim_end_matches(':'))))
        .min()?;
    let message = &line[at..];
    let file = message
        .split('"')
        .nth(1)
        .filter(|_| message.matches('"').count() >= 2)
        .map(str::to_string);
    Some(NoSpace {
        severity: severity.to_string(),
        file,
        message: message.split_whitespace().collect::<Vec<_>>().join(" "),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_that_failed_for_lack_of_space_are_recognised_with_their_file() {
        let panic = no_space(
            "2026-12-02 09:46:49.731 UTC [10268] PANIC:  could not write to file \"pg_wal/xlogtemp.10268\": No space left on device",
        )
        .unwrap();
        assert_eq!(panic.file.as_deref(), Some("pg_wal/xlogtemp.10268"));
        assert_eq!(
            panic.message,
            "PANIC: could not write to file \"pg_wal/xlogtemp.10268\": No space left on device"
        );
        let extend =
            no_space("ERROR:  could not extend file \"base/16384/16385\": No space left on device")
                .unwrap();
        assert_eq!(extend.file.as_deref(), Some("base/16384/16385"));
        assert_eq!(panic.severity, "PANIC");
        assert!(panic.is_fatal());
        assert!(!extend.is_fatal());
        let bare = no_space("FATAL: No space left on device").unwrap();
        assert_eq!(bare.file, None);
        // A statement the server logs is not the server's own error.
        let quoted = no_space(
            "LOG:  statement: SELECT 'PANIC:  could not write to file \"x\": No space left on device'",
        )
        .unwrap();
        assert_eq!(quoted.severity, "LOG");
        assert!(!quoted.is_fatal());
        assert_eq!(no_space("No space left on device, said someone"), None);
        assert_eq!(no_space("LOG:  checkpoint complete"), None);
        assert_eq!(no_space("HINT:  Check free disk space."), None);
    }
}

//! One supervised service, from waiting for its dependencies to its final state.
//!
//! The task waits until every dependency is ready, starts the process (as its OS user, in its
//! own process group, with the application environment), establishes readiness (a probe for a
//! longrun; a zero exit for a oneshot), and on exit asks the restart [`Tracker`] what to do. On a
//! stop request it first waits for every service that depends on it to be stopped, then sends
//! its stop signal to the process group, and SIGKILL past `stop_timeout` (or at once on a forced
//! stop).

use std::process::{ExitStatus, Stdio};
use std::sync::Arc;

use nix::sys::signal::Signal;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::environment::Env;
use super::restart::{Decision, Tracker};
use super::status::{ServiceStatus, State, now_epoch};
use crate::config::{ServiceConfig, ServiceKind, parse_signal};
use crate::logs::{Forwarders, SharedLogFile, Sink};
use crate::process::{self, Child};
use crate::users::Account;

/// Everything a service task needs.
pub struct ServiceCtx {
    pub name: String,
    pub spec: ServiceConfig,
    pub env: Arc<Env>,
    /// The account to run as; `None`: regobox's own.
    pub account: Option<Account>,
    pub status: watch::Sender<ServiceStatus>,
    /// (name, state) of each dependency.
    pub deps: Vec<(String, watch::Receiver<ServiceStatus>)>,
    /// States of the services that depend on this one.
    pub dependents: Vec<watch::Receiver<ServiceStatus>>,
    pub shutdown: CancellationToken,
    pub force: CancellationToken,
    pub log_file: Option<SharedLogFile>,
}

/// How a service task ended.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// Stopped by a stop request.
    Stopped,
    /// A oneshot that succeeded.
    Done,
    /// Ended and not restarted (by its policy).
    Exited(ExitStatus),
    /// Out of restart budget, or impossible to start.
    Fatal(Option<ExitStatus>, String),
}

impl ServiceCtx {
    fn set(&self, f: impl FnOnce(&mut ServiceStatus)) {
        self.status.send_modify(f);
    }

    /// The command for `argv` with this service's environment, directory and user.
    pub fn command(&self, argv: &[String]) -> std::process::Command {
        command_for(
            argv,
            &self.env,
            &self.spec,
            &self.name,
            self.account.as_ref(),
        )
    }

    /// Resolves when the service must stop: after a stop request, once every dependent has
    /// stopped (at once on a forced stop).
    async fn stop_requested(&self) {
        self.shutdown.cancelled().await;
        let dependents = async {
            for rx in &self.dependents {
                let mut rx = rx.clone();
                let _ = rx.wait_for(|s| s.state.is_final()).await;
            }
        };
        tokio::select! {
            _ = dependents => {}
            _ = self.force.cancelled() => {}
        }
    }
}

/// How long a failed service's exit waits for news that a dependency went down (see `run`).
const DEPENDENCY_NEWS: std::time::Duration = std::time::Duration::from_secs(1);

/// Wait until every dependency is ready; false if a stop is requested meanwhile.
async fn wait_for_dependencies(ctx: &ServiceCtx) -> bool {
    let mut waited = false;
    for (dep, rx) in &ctx.deps {
        if rx.borrow().state.is_ready() {
            continue;
        }
        waited = true;
        ctx.set(|s| s.detail = Some(format!("waiting for {dep}")));
        let mut rx = rx.clone();
        tokio::select! {
            _ = rx.wait_for(|s| s.state.is_ready()) => {}
            _ = ctx.shutdown.cancelled() => return false,
        }
    }
    if waited {
        ctx.set(|s| s.detail = None);
    }
    true
}

/// A spawn error that trying again cannot cure: the program (or the working directory) is not
/// there, not executable by the service's user, or not a program.
fn cannot_execute(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::NotFound | std::io::ErrorKind::PermissionDenied
    ) || e.raw_os_error() == Some(nix::libc::ENOEXEC)
}

impl ServiceCtx {
    /// Why the command cannot be executed, for a person: the program, the user, where it was
    /// looked for.
    fn not_executable(&self, e: &std::io::Error) -> String {
        let program = &self.spec.command[0];
        let user = self
            .account
            .as_ref()
            .map(|a| a.name.clone())
            .or_else(|| Account::current().map(|a| a.name))
            .unwrap_or_else(|| "?".into());
        let cmd = self.command(&self.spec.command);
        let path = cmd
            .get_envs()
            .find(|(k, _)| *k == "PATH")
            .and_then(|(_, v)| v)
            .map(|v| v.to_string_lossy().into_owned())
            .unwrap_or_default();
        let looked = if program.contains('/') {
            String::new()
        } else {
            format!(", looked for in PATH={path}")
        };
        let workdir = if self.spec.workdir.as_os_str().is_empty() {
            String::new()
        } else {
            format!(", in workdir {}", self.spec.workdir.display())
        };
        format!("cannot execute {program:?} as user `{user}`{looked}{workdir}: {e}")
    }
}

/// The command for `argv` run with `env` plus the service's own, as `account`.
pub fn command_for(
    argv: &[String],
    env: &Env,
    spec: &ServiceConfig,
    name: &str,
    account: Option<&Account>,
) -> std::process::Command {
    let mut cmd = std::process::Command::new(&argv[0]);
    cmd.args(&argv[1..])
        .env_clear()
        .envs(env)
        .envs(&spec.env)
        .env("REGOBOX_SERVICE", name);
    if !spec.workdir.as_os_str().is_empty() {
        cmd.current_dir(&spec.workdir);
    }
    if let Some(acct) = account {
        acct.apply(&mut cmd);
    }
    cmd
}

/// Run the service until its final state.
pub async fn run(ctx: ServiceCtx) -> Outcome {
    let mut tracker = Tracker::new(&ctx.spec);
    loop {
        // Dependencies first (again after a restart: PostgreSQL may be starting again).
        if !wait_for_dependencies(&ctx).await {
            ctx.set(|s| {
                s.state = State::Stopped;
                s.detail = None;
            });
            return Outcome::Stopped;
        }
        let started = Instant::now();
        let (status, why) = match start(&ctx) {
            Ok((child, logs)) => match supervise(&ctx, child, logs).await {
                Lived::Stopped => {
                    ctx.set(|s| {
                        s.state = State::Stopped;
                        s.pid = None;
                    });
                    return Outcome::Stopped;
                }
                Lived::Exited(status, why) => (Some(status), why),
            },
            Err(e) if cannot_execute(&e) => {
                let msg = format!(
                    "FATAL: {}; a command that cannot be executed is not retried (install it in the image, or correct services.{}.command)",
                    ctx.not_executable(&e),
                    ctx.name
                );
                tracing::error!(service = %ctx.name, "{msg}");
                ctx.set(|s| {
                    s.state = State::Fatal;
                    s.last_exit = Some("not started".into());
                    s.detail = Some(msg.clone());
                });
                return Outcome::Fatal(None, msg);
            }
            Err(e) => {
                let why = format!("cannot start {:?}: {e}", ctx.spec.command[0]);
                tracing::error!(service = %ctx.name, "{why}");
                (None, Some(why))
            }
        };
        let success = status.is_some_and(|s| s.success()) && why.is_none();
        let exit_text = status.map(describe).unwrap_or_else(|| "not started".into());
        ctx.set(|s| {
            s.pid = None;
            s.last_exit = Some(exit_text.clone());
            s.detail = why.clone();
        });
        if ctx.spec.kind == ServiceKind::Oneshot && success {
            tracing::info!(service = %ctx.name, "oneshot completed");
            ctx.set(|s| s.state = State::Done);
            return Outcome::Done;
        }
        // A failure while something it depends on is down (PostgreSQL restarting) is not the
        // service's own: not counted against its restart limit. A service that loses PostgreSQL
        // often exits before PostgreSQL's keeper has seen it die (a busy machine widens that):
        // a failure waits a moment for such news before it counts.
        let down = || {
            ctx.deps
                .iter()
                .find(|(_, rx)| !rx.borrow().state.is_ready())
                .map(|(dep, _)| dep.clone())
        };
        let mut dependency_down = down();
        if dependency_down.is_none() && !success && !ctx.deps.is_empty() {
            let news = ctx.deps.iter().map(|(_, rx)| {
                let mut rx = rx.clone();
                Box::pin(async move {
                    let _ = rx.wait_for(|s| !s.state.is_ready()).await;
                })
            });
            let _ =
                tokio::time::timeout(DEPENDENCY_NEWS, futures_util::future::select_all(news)).await;
            dependency_down = down();
        }
        let decision = match &dependency_down {
            Some(_) if !success => {
                tracker.on_excused_exit(success, started.elapsed(), Instant::now())
            }
            _ => tracker.on_exit(success, started.elapsed(), Instant::now()),
        };
        match decision {
            Decision::Restart(delay) => {
                match &dependency_down {
                    Some(dep) => {
                        tracing::warn!(service = %ctx.name, exit = %exit_text, restart_in = ?delay, "service exited while {dep} is not ready; restarting once it is (not counted against restart_limit)")
                    }
                    None => {
                        tracing::warn!(service = %ctx.name, exit = %exit_text, restart_in = ?delay, "service exited; restarting")
                    }
                }
                ctx.set(|s| {
                    s.state = State::Backoff;
                    s.restarts = tracker.restarts;
                });
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = ctx.shutdown.cancelled() => {
                        ctx.set(|s| s.state = State::Stopped);
                        return Outcome::Stopped;
                    }
                }
            }
            Decision::Done => {
                tracing::info!(service = %ctx.name, exit = %exit_text, "service exited; not restarted (restart policy)");
                ctx.set(|s| s.state = State::Exited);
                return match status {
                    Some(st) => Outcome::Exited(st),
                    None => Outcome::Fatal(None, why.unwrap_or_default()),
                };
            }
            Decision::GiveUp => {
                let msg = format!(
                    "FATAL: {} failures within {:?} (restart_limit {}); giving up",
                    ctx.spec.restart_limit + 1,
                    ctx.spec.restart_window,
                    ctx.spec.restart_limit
                );
                tracing::error!(service = %ctx.name, exit = %exit_text, "{msg}");
                ctx.set(|s| {
                    s.state = State::Fatal;
                    s.detail = Some(msg.clone());
                });
                return Outcome::Fatal(status, msg);
            }
        }
    }
}

enum Lived {
    Stopped,
    /// The status, and why the run counts as failed even if it exited with 0.
    Exited(ExitStatus, Option<String>),
}

fn start(ctx: &ServiceCtx) -> std::io::Result<(Child, Forwarders)> {
    let mut cmd = ctx.command(&ctx.spec.command);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    let mut child = process::spawn(&mut cmd)?;
    let logs = Forwarders::start(
        &mut child,
        &ctx.name,
        Sink::Stdout,
        ctx.log_file.clone(),
        None,
    )?;
    let pid = child.pid();
    tracing::info!(service = %ctx.name, pid, "service started");
    ctx.set(|s| {
        s.state = State::Starting;
        s.pid = Some(pid);
        s.started_at = Some(now_epoch());
    });
    Ok((child, logs))
}

async fn supervise(ctx: &ServiceCtx, mut child: Child, mut logs: Forwarders) -> Lived {
    let mut not_ready: Option<String> = None;
    if ctx.spec.kind == ServiceKind::Longrun {
        tokio::select! {
            r = wait_ready(ctx) => match r {
                Ok(()) => {
                    tracing::info!(service = %ctx.name, "service ready");
                    ctx.set(|s| s.state = State::Ready);
                }
                Err(why) => {
                    tracing::error!(service = %ctx.name, "{why}");
                    not_ready = Some(why);
                    stop_child(ctx, &mut child).await;
                }
            },
            status = child.wait() => {
                logs.drain().await;
                return Lived::Exited(status, None);
            }
            _ = ctx.stop_requested() => {
                stop_child(ctx, &mut child).await;
                logs.drain().await;
                return Lived::Stopped;
            }
        }
    }
    if let Some(why) = not_ready {
        let status = child.wait().await;
        logs.drain().await;
        return Lived::Exited(status, Some(why));
    }
    tokio::select! {
        status = child.wait() => {
            logs.drain().await;
            Lived::Exited(status, None)
        }
        _ = ctx.stop_requested() => {
            stop_child(ctx, &mut child).await;
            logs.drain().await;
            Lived::Stopped
        }
    }
}

async fn wait_ready(ctx: &ServiceCtx) -> Result<(), String> {
    let Some(ready) = &ctx.spec.ready else {
        return Ok(());
    };
    let deadline = Instant::now() + ready.timeout;
    loop {
        let last = match super::ready::probe(ready, || ctx.command(&ready.command)).await {
            Ok(()) => return Ok(()),
            Err(e) => e,
        };
        if Instant::now() >= deadline {
            return Err(format!(
                "not ready within {:?} (ready.timeout): {last}",
                ready.timeout
            ));
        }
        tokio::time::sleep(ready.interval).await;
    }
}

/// The stop signal to the process group, then SIGKILL past the timeout or on a forced stop.
async fn stop_child(ctx: &ServiceCtx, child: &mut Child) {
    if child.try_status().is_some() {
        return;
    }
    let signal = parse_signal(&ctx.spec.stop_signal).unwrap_or(Signal::SIGTERM);
    tracing::info!(service = %ctx.name, pid = child.pid(), %signal, "stopping service");
    ctx.set(|s| s.state = State::Stopping);
    child.signal_group(signal);
    tokio::select! {
        status = child.wait() => {
            tracing::info!(service = %ctx.name, exit = %describe(status), "service stopped");
            return;
        }
        _ = tokio::time::sleep(ctx.spec.stop_timeout) => {
            tracing::warn!(service = %ctx.name, timeout = ?ctx.spec.stop_timeout, "service did not stop in time; SIGKILL");
        }
        _ = ctx.force.cancelled() => {
            tracing::warn!(service = %ctx.name, "forced stop; SIGKILL");
        }
    }
    child.signal_group(Signal::SIGKILL);
    child.wait().await;
}

/// `exit N` or `signal N (NAME)`.
pub fn describe(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exit {c}"),
        (None, Some(sig)) => match Signal::try_from(sig) {
            Ok(s) => format!("signal {sig} ({s})"),
            Err(_) => format!("signal {sig}"),
        },
        _ => status.to_string(),
    }
}

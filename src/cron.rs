//! The in-process cron scheduler (no cron daemon).
//!
//! Each `[cron.<name>]` job has a 5-field schedule (a 6th, leading seconds field is accepted),
//! read in its time zone (UTC by default). At each due time the job's command runs with the
//! application environment; a run still going when the next is due is skipped and logged; every
//! run is logged with its duration and status, a non-zero exit being a failure. On stop, running
//! jobs get SIGTERM, then SIGKILL on a forced stop.

use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use croner::Cron;
use nix::sys::signal::Signal;
use tokio_util::sync::CancellationToken;

use crate::config::{CronConfig, ServiceConfig};
use crate::logs::{Forwarders, Sink};
use crate::process;
use crate::supervisor::environment::Env;
use crate::supervisor::service::{command_for, describe};
use crate::users::Account;

/// The next due time strictly after `after`, for `cron` read in `tz`.
pub fn next_run(cron: &Cron, tz: Tz, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
    cron.find_next_occurrence(&after.with_timezone(&tz), false)
        .ok()
        .map(|d| d.with_timezone(&Utc))
}

/// One job, ready to schedule.
pub struct Job {
    pub name: String,
    pub config: CronConfig,
    pub account: Option<Account>,
}

/// Run every job until `shutdown`; running jobs are stopped before this returns.
pub async fn run(
    jobs: Vec<Job>,
    env: Arc<Env>,
    shutdown: CancellationToken,
    force: CancellationToken,
) {
    let mut tasks = tokio::task::JoinSet::new();
    for job in jobs {
        tasks.spawn(job_loop(job, env.clone(), shutdown.clone(), force.clone()));
    }
    while tasks.join_next().await.is_some() {}
}

async fn job_loop(job: Job, env: Arc<Env>, shutdown: CancellationToken, force: CancellationToken) {
    let (cron, tz) = match (
        job.config.schedule.parse::<Cron>(),
        parse_tz(&job.config.timezone),
    ) {
        (Ok(c), Some(tz)) => (c, tz),
        _ => {
            tracing::error!(job = %job.name, "invalid schedule or time zone; job disabled");
            return;
        }
    };
    let job = Arc::new(job);
    let mut running: Option<tokio::task::JoinHandle<()>> = None;
    loop {
        let now = Utc::now();
        let Some(next) = next_run(&cron, tz, now) else {
            tracing::warn!(job = %job.name, "schedule has no future run");
            break;
        };
        let wait = (next - now).to_std().unwrap_or(Duration::ZERO);
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.cancelled() => break,
        }
        if running.as_ref().is_some_and(|h| !h.is_finished()) {
            tracing::warn!(job = %job.name, due = %next, "previous run still going; this run is skipped");
            continue;
        }
        running = Some(tokio::spawn(run_once(
            job.clone(),
            env.clone(),
            shutdown.clone(),
            force.clone(),
        )));
    }
    if let Some(h) = running {
        let _ = h.await;
    }
}

fn parse_tz(name: &str) -> Option<Tz> {
    if name.is_empty() {
        Some(Tz::UTC)
    } else {
        name.parse().ok()
    }
}

/// One run of a job, logged with its duration and status.
async fn run_once(
    job: Arc<Job>,
    env: Arc<Env>,
    shutdown: CancellationToken,
    force: CancellationToken,
) {
    let spec = ServiceConfig {
        env: job.config.env.clone(),
        workdir: job.config.workdir.clone(),
        ..Default::default()
    };
    let label = format!("cron:{}", job.name);
    let mut cmd = command_for(
        &job.config.command,
        &env,
        &spec,
        &label,
        job.account.as_ref(),
    );
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    let started = tokio::time::Instant::now();
    let mut child = match process::spawn(&mut cmd) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(job = %job.name, error = %e, "cron job failed to start");
            return;
        }
    };
    tracing::info!(job = %job.name, pid = child.pid(), "cron job started");
    let mut logs = match Forwarders::start(&mut child, &label, Sink::Stdout, None, None) {
        Ok(f) => f,
        Err(e) => {
            tracing::warn!(job = %job.name, error = %e, "cannot forward the job's output");
            Forwarders::default()
        }
    };
    let status = tokio::select! {
        s = child.wait() => s,
        _ = tokio::time::sleep(job.config.timeout) => {
            tracing::warn!(job = %job.name, timeout = ?job.config.timeout, "cron job timed out; stopping it");
            stop(&mut child, &force).await
        }
        _ = shutdown.cancelled() => stop(&mut child, &force).await,
    };
    logs.drain().await;
    let duration_ms = started.elapsed().as_millis() as u64;
    if status.success() {
        tracing::info!(job = %job.name, duration_ms, status = %describe(status), "cron job succeeded");
    } else {
        tracing::error!(job = %job.name, duration_ms, status = %describe(status), "cron job failed");
    }
}

async fn stop(child: &mut process::Child, force: &CancellationToken) -> std::process::ExitStatus {
    child.signal_group(Signal::SIGTERM);
    tokio::select! {
        s = child.wait() => return s,
        _ = tokio::time::sleep(Duration::from_secs(10)) => {}
        _ = force.cancelled() => {}
    }
    child.signal_group(Signal::SIGKILL);
    child.wait().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn at(y: i32, mo: u32, d: u32, h: u32, mi: u32, s: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(y, mo, d, h, mi, s).unwrap()
    }

    #[test]
    fn five_field_schedules() {
        let every_5 = "*/5 * * * *".parse::<Cron>().unwrap();
        assert_eq!(
            next_run(&every_5, Tz::UTC, at(2026, 11, 21, 10, 2, 30)),
            Some(at(2026, 11, 21, 10, 5, 0))
        );
        // Strictly after: a due time is not repeated.
        assert_eq!(
            next_run(&every_5, Tz::UTC, at(2026, 11, 21, 10, 5, 0)),
            Some(at(2026, 11, 21, 10, 10, 0))
        );
        let nightly = "30 2 * * *".parse::<Cron>().unwrap();
        assert_eq!(
            next_run(&nightly, Tz::UTC, at(2026, 11, 21, 10, 0, 0)),
            Some(at(2026, 11, 22, 2, 30, 0))
        );
    }

    #[test]
    fn schedules_are_read_in_their_time_zone() {
        let nightly = "30 2 * * *".parse::<Cron>().unwrap();
        let paris: Tz = "Europe/Paris".parse().unwrap();
        // Winter: Paris is UTC+1, so 02:30 in Paris is 01:30 UTC.
        assert_eq!(
            next_run(&nightly, paris, at(2026, 11, 21, 10, 0, 0)),
            Some(at(2026, 11, 22, 1, 30, 0))
        );
        // Summer: UTC+2.
        assert_eq!(
            next_run(&nightly, paris, at(2026, 7, 1, 10, 0, 0)),
            Some(at(2026, 7, 2, 0, 30, 0))
        );
    }

    #[test]
    fn a_leading_seconds_field_is_accepted() {
        let every_2s = "*/2 * * * * *".parse::<Cron>().unwrap();
        assert_eq!(
            next_run(&every_2s, Tz::UTC, at(2026, 11, 21, 10, 0, 1)),
            Some(at(2026, 11, 21, 10, 0, 2))
        );
    }
}

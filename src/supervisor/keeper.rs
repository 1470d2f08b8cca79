//! Keeping regobox's own PostgreSQL server up.
//!
//! A server that exits on its own is started again in place: PostgreSQL's crash recovery
//! replays its WAL, so nothing committed is lost, and the services keep running (their
//! connections fail until it is back, as with any database restart). The typical cause is a
//! full disk: a PANIC while writing WAL, then a crash recovery that cannot write either. Like a
//! service, the server backs off (1 s doubling to 30 s) and, after more than [`LIMIT`] crashes
//! within [`WINDOW`], regobox gives up and stops everything. A stop for lack of space (the
//! server's own PANIC or FATAL said ENOSPC, and the file system of that file is below
//! `volumes.min_free`) does not count against that limit: the keeper waits until that file
//! system has `volumes.min_free` free again, says so, then starts the server.
//!
//! The server's output is read for writes that failed for lack of space (ENOSPC): regobox logs
//! each with the file's path and the free space (at most one line per [`LOG_EVERY`], with a
//! count of the ones left out), and the board says what PostgreSQL is down for.

use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use super::restart::{Decision, Tracker};
use super::status::{ServiceStatus, State, now_epoch};
use crate::backup::archive::bytes;
use crate::config::RestartMode;
use crate::logs::{Observer, SharedLogFile, Sink};
use crate::postgres::server::{NoSpace, no_space};
use crate::postgres::{Embedded, Endpoint, PostgresError, Server};

/// More than this many crashes (not for lack of space) within [`WINDOW`]: give up.
pub const LIMIT: u32 = 5;
pub const WINDOW: Duration = Duration::from_secs(600);
const BACKOFF_INITIAL: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// At most one log line about failed writes per this interval.
const LOG_EVERY: Duration = Duration::from_secs(10);
/// How often the free space is measured while waiting for room.
const ROOM_POLL: Duration = Duration::from_secs(2);

/// Writes of the server that failed for lack of space, as its output reports them.
pub struct SpaceWatch {
    data_dir: PathBuf,
    inner: Mutex<Reports>,
}

#[derive(Default)]
struct Reports {
    logged_at: Option<Instant>,
    left_out: u32,
    last: Option<(Instant, NoSpace)>,
}

impl SpaceWatch {
    pub fn new(data_dir: &Path) -> Arc<SpaceWatch> {
        Arc::new(SpaceWatch {
            data_dir: data_dir.to_path_buf(),
            inner: Mutex::new(Reports::default()),
        })
    }

    /// What the server's log forwarders call with each line.
    pub fn observer(self: &Arc<Self>) -> Observer {
        let me = self.clone();
        Arc::new(move |line: &str| me.observe(line))
    }

    fn observe(&self, line: &str) {
        let Some(report) = no_space(line) else {
            return;
        };
        let now = Instant::now();
        let left_out = {
            let mut reports = self.inner.lock().unwrap_or_else(|e| e.into_inner());
            reports.last = Some((now, report.clone()));
            if reports
                .logged_at
                .is_some_and(|at| now.duration_since(at) < LOG_EVERY)
            {
                reports.left_out += 1;
                return;
            }
            reports.logged_at = Some(now);
            std::mem::take(&mut reports.left_out)
        };
        tracing::warn!(
            similar_lines_left_out = left_out,
            "PostgreSQL {}; {}; writes fail until there is room",
            self.describe(&report),
            self.free_text(&self.dir_of(&report))
        );
    }

    /// The latest failed write reported at or after `since`.
    pub fn since(&self, since: Instant) -> Option<NoSpace> {
        let reports = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        reports
            .last
            .as_ref()
            .filter(|(at, _)| *at >= since)
            .map(|(_, r)| r.clone())
    }

    /// A failed write for a person: the file and ENOSPC.
    pub fn describe(&self, report: &NoSpace) -> String {
        format!(
            "could not write {}: no space left on device (ENOSPC; PostgreSQL said: {})",
            self.file_of(report).display(),
            report.message
        )
    }

    fn file_of(&self, report: &NoSpace) -> PathBuf {
        report
            .file
            .as_ref()
            .map_or_else(|| self.data_dir.clone(), |f| self.data_dir.join(f))
    }

    /// The directory whose file system the failed write was on (`pg_wal` may be a link to
    /// another one): the file's directory where it exists, else the data directory.
    pub fn dir_of(&self, report: &NoSpace) -> PathBuf {
        self.file_of(report)
            .parent()
            .filter(|d| d.is_dir())
            .map_or_else(|| self.data_dir.clone(), Path::to_path_buf)
    }

    /// Free bytes on the file system of the failed write.
    pub fn free_at(&self, report: &NoSpace) -> Option<u64> {
        free(&self.dir_of(report))
    }

    fn free_text(&self, dir: &Path) -> String {
        match free(dir) {
            Some(free) => format!("{} free on {}", bytes(free), dir.display()),
            None => format!("free space on {} unknown", dir.display()),
        }
    }
}

fn free(dir: &Path) -> Option<u64> {
    crate::volumes::free_space(dir).ok().map(|(free, _)| free)
}

/// How a server's run ended.
enum Ended {
    Exited(ExitStatus),
    /// It could not even be spawned.
    NotStarted(String),
}

impl Ended {
    fn status(&self) -> ExitStatus {
        match self {
            Ended::Exited(status) => *status,
            Ended::NotStarted(_) => failed(),
        }
    }
}

/// What keeping the server up needs.
pub struct Keeper<'a> {
    pub embedded: &'a Embedded,
    pub endpoint: &'a Endpoint,
    pub listen: &'a str,
    pub status: &'a watch::Sender<ServiceStatus>,
    pub log: Option<SharedLogFile>,
    pub space: Arc<SpaceWatch>,
    pub min_free: u64,
    pub start_timeout: Duration,
    pub stop_timeout: Duration,
}

impl Keeper<'_> {
    /// Keep `server` up (replacing it on each restart); return the status of its last exit once
    /// the restart budget is spent. Cancel-safe: `server` is always the latest server started.
    pub async fn keep(&self, server: &mut Server) -> ExitStatus {
        let mut tracker = Tracker::policy(
            RestartMode::Always,
            BACKOFF_INITIAL,
            BACKOFF_MAX,
            LIMIT,
            WINDOW,
        );
        let mut started = Instant::now();
        let mut ended: Option<Ended> = None;
        loop {
            let ended_now = match ended.take() {
                Some(e) => e,
                None => Ended::Exited(server.wait().await.unwrap_or_else(|_| failed())),
            };
            let now = Instant::now();
            // Lack of space is the cause when the server's own PANIC or FATAL said so and the
            // file system of that file is below volumes.min_free now: such a stop is not
            // counted against the limit, room is waited for. Anything else is a crash.
            let space = self
                .space
                .since(started)
                .filter(NoSpace::is_fatal)
                .filter(|report| {
                    self.space
                        .free_at(report)
                        .is_some_and(|free| free < self.min_free)
                });
            let ran_for = now.duration_since(started);
            let decision = match &space {
                Some(_) => tracker.on_excused_exit(false, ran_for, now),
                None => tracker.on_exit(false, ran_for, now),
            };
            let (last_exit, what) = match &ended_now {
                Ended::Exited(status) => (
                    super::service::describe(*status),
                    format!("exited unexpectedly ({status})"),
                ),
                Ended::NotStarted(e) => (
                    "not started".to_string(),
                    format!("could not be started: {e}"),
                ),
            };
            let delay = match decision {
                Decision::Restart(delay) => delay,
                Decision::GiveUp | Decision::Done => {
                    let msg = format!(
                        "PostgreSQL {what}, more than {LIMIT} times within {} minutes; giving up",
                        WINDOW.as_secs() / 60
                    );
                    tracing::error!("{msg}");
                    self.status.send_modify(|s| {
                        s.state = State::Fatal;
                        s.pid = None;
                        s.started_at = None;
                        s.last_exit = Some(last_exit.clone());
                        s.detail = Some(msg.clone());
                    });
                    return ended_now.status();
                }
            };
            let why = match &space {
                Some(report) => format!("down for lack of space: {}", self.space.describe(report)),
                None => format!("{what}; starting it again"),
            };
            self.status.send_modify(|s| {
                s.state = State::Backoff;
                s.pid = None;
                s.started_at = None;
                s.restarts = tracker.restarts;
                s.last_exit = Some(last_exit.clone());
                s.detail = Some(why.clone());
            });
            if let Some(report) = &space {
                let dir = self.space.dir_of(report);
                tracing::error!(
                    "PostgreSQL stopped for lack of space: {}; {}. It starts again (crash recovery, nothing committed is lost) once {} has volumes.min_free ({}) free",
                    self.space.describe(report),
                    self.space.free_text(&dir),
                    dir.display(),
                    bytes(self.min_free)
                );
                self.wait_for_room(&dir).await;
                tracing::info!(
                    "{}: starting PostgreSQL again (crash recovery)",
                    self.space.free_text(&dir)
                );
            } else {
                tracing::error!(
                    delay = ?delay,
                    restart = tracker.restarts,
                    "PostgreSQL {what}; starting it again (crash recovery: nothing committed is lost)"
                );
            }
            tokio::time::sleep(delay).await;

            self.status.send_modify(|s| {
                s.state = State::Starting;
                s.detail = None;
            });
            match self.embedded.start(
                self.listen,
                Sink::Stdout,
                self.log.clone(),
                Some(self.space.observer()),
            ) {
                Ok(new) => *server = new,
                Err(e) => {
                    started = Instant::now();
                    ended = Some(Ended::NotStarted(e.to_string()));
                    continue;
                }
            }
            started = Instant::now();
            self.status.send_modify(|s| s.pid = Some(server.pid()));
            ended = self.until_ready(server).await.map(Ended::Exited);
            if ended.is_none() {
                self.status.send_modify(|s| {
                    s.state = State::Ready;
                    s.started_at = Some(now_epoch());
                    s.detail = None;
                });
                tracing::info!(pid = server.pid(), "PostgreSQL is up again");
            }
        }
    }

    /// Wait for the restarted server to accept connections, however long its crash recovery
    /// takes; its exit status if it exits (or cannot be reached at all, then it is stopped).
    async fn until_ready(&self, server: &mut Server) -> Option<ExitStatus> {
        loop {
            match crate::postgres::wait_ready(Some(server), self.endpoint, self.start_timeout).await
            {
                Ok(()) => return None,
                Err(PostgresError::ExitedDuringStart { status }) => return Some(status),
                Err(PostgresError::StartTimeout { timeout, last }) => {
                    tracing::warn!(
                        timeout = ?timeout,
                        last_error = %last,
                        "PostgreSQL does not accept connections yet (crash recovery can take a while); still waiting"
                    );
                }
                Err(e) => {
                    tracing::error!("PostgreSQL cannot be reached after its restart: {e}");
                    return Some(
                        server
                            .stop(self.stop_timeout, std::future::pending())
                            .await
                            .unwrap_or_else(|_| failed()),
                    );
                }
            }
        }
    }

    async fn wait_for_room(&self, dir: &Path) {
        loop {
            if free(dir).is_none_or(|free| free >= self.min_free) {
                return;
            }
            tokio::time::sleep(ROOM_POLL).await;
        }
    }
}

fn failed() -> ExitStatus {
    std::os::unix::process::ExitStatusExt::from_raw(1 << 8)
}

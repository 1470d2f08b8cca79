//! The restart policy: whether and when a service that exited starts again.
//!
//! Pure logic over injected instants, so it is tested with paused time. A failure is an exit
//! that was not a success; failures are counted in a sliding window, and one more than
//! `restart_limit` within `restart_window` exhausts the budget (the service is FATAL). Delays
//! double from `backoff_initial` up to `backoff_max`, and start over after a run that lasted at
//! least `backoff_max` (that run was healthy).

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

use crate::config::{RestartMode, ServiceConfig};

/// What to do after an exit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Start again after this delay.
    Restart(Duration),
    /// Do not start again: the policy says so.
    Done,
    /// Too many failures within the window: the service is FATAL.
    GiveUp,
}

#[derive(Debug, Clone)]
pub struct Tracker {
    mode: RestartMode,
    initial: Duration,
    max: Duration,
    limit: u32,
    window: Duration,
    failures: VecDeque<Instant>,
    consecutive: u32,
    /// Restarts decided so far.
    pub restarts: u32,
}

impl Tracker {
    pub fn new(svc: &ServiceConfig) -> Self {
        Tracker::policy(
            svc.restart_mode(),
            svc.backoff_initial,
            svc.backoff_max,
            svc.restart_limit,
            svc.restart_window,
        )
    }

    /// A policy given by its parts: delays from `initial` doubling to `max`; more than `limit`
    /// failures within `window` give up.
    pub fn policy(
        mode: RestartMode,
        initial: Duration,
        max: Duration,
        limit: u32,
        window: Duration,
    ) -> Self {
        Tracker {
            mode,
            initial,
            max,
            limit,
            window,
            failures: VecDeque::new(),
            consecutive: 0,
            restarts: 0,
        }
    }

    /// The decision for an exit at `now` after a run of `ran_for`.
    pub fn on_exit(&mut self, success: bool, ran_for: Duration, now: Instant) -> Decision {
        self.decide(success, true, ran_for, now)
    }

    /// The decision for a failure that is not the process's own (what it depends on is down,
    /// the disk is full): restarted as the policy says, with back-off, but not counted against
    /// the limit.
    pub fn on_excused_exit(&mut self, success: bool, ran_for: Duration, now: Instant) -> Decision {
        self.decide(success, false, ran_for, now)
    }

    fn decide(
        &mut self,
        success: bool,
        counted: bool,
        ran_for: Duration,
        now: Instant,
    ) -> Decision {
        if !success && counted {
            self.failures.push_back(now);
        }
        while let Some(first) = self.failures.front() {
            if now.duration_since(*first) > self.window {
                self.failures.pop_front();
            } else {
                break;
            }
        }
        let again = match self.mode {
            RestartMode::Always => true,
            RestartMode::OnFailure => !success,
            RestartMode::Never => false,
        };
        if !again {
            return Decision::Done;
        }
        if self.failures.len() as u32 > self.limit {
            return Decision::GiveUp;
        }
        if ran_for >= self.max {
            self.consecutive = 0;
        }
        let factor = 1u32
            .checked_shl(self.consecutive.min(31))
            .unwrap_or(u32::MAX);
        let delay = self.initial.saturating_mul(factor).min(self.max);
        self.consecutive = self.consecutive.saturating_add(1);
        self.restarts += 1;
        Decision::Restart(delay)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(mode: RestartMode) -> ServiceConfig {
        ServiceConfig {
            command: vec!["x".into()],
            restart: Some(mode),
            backoff_initial: Duration::from_secs(1),
            backoff_max: Duration::from_secs(30),
            restart_limit: 5,
            restart_window: Duration::from_secs(60),
            ..Default::default()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_crash_loop_backs_off_exponentially_then_gives_up() {
        let mut t = Tracker::new(&svc(RestartMode::Always));
        let mut delays = Vec::new();
        loop {
            match t.on_exit(false, Duration::from_millis(10), Instant::now()) {
                Decision::Restart(d) => {
                    delays.push(d.as_secs());
                    tokio::time::advance(d).await;
                }
                Decision::GiveUp => break,
                Decision::Done => panic!("always restarts"),
            }
        }
        assert_eq!(
            delays,
            vec![1, 2, 4, 8, 16],
            "doubling, then the 6th failure in 60s is fatal"
        );
        assert_eq!(t.restarts, 5);
    }

    #[tokio::test(start_paused = true)]
    async fn the_delay_is_capped_and_failures_age_out_of_the_window() {
        let mut s = svc(RestartMode::OnFailure);
        s.restart_limit = 3;
        s.backoff_max = Duration::from_secs(5);
        let mut t = Tracker::new(&s);
        let mut delays = Vec::new();
        for _ in 0..10 {
            match t.on_exit(false, Duration::from_millis(10), Instant::now()) {
                Decision::Restart(d) => delays.push(d.as_secs()),
                other => panic!("{other:?}"),
            }
            // Failures 30 s apart: never more than 3 in a 60 s window.
            tokio::time::advance(Duration::from_secs(30)).await;
        }
        assert_eq!(delays, vec![1, 2, 4, 5, 5, 5, 5, 5, 5, 5]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_healthy_run_resets_the_backoff() {
        let mut t = Tracker::new(&svc(RestartMode::Always));
        assert_eq!(
            t.on_exit(false, Duration::ZERO, Instant::now()),
            Decision::Restart(Duration::from_secs(1))
        );
        assert_eq!(
            t.on_exit(false, Duration::ZERO, Instant::now()),
            Decision::Restart(Duration::from_secs(2))
        );
        tokio::time::advance(Duration::from_secs(120)).await;
        assert_eq!(
            t.on_exit(false, Duration::from_secs(120), Instant::now()),
            Decision::Restart(Duration::from_secs(1))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn excused_failures_back_off_but_never_exhaust_the_budget() {
        let mut t = Tracker::new(&svc(RestartMode::OnFailure));
        let mut delays = Vec::new();
        for _ in 0..20 {
            match t.on_excused_exit(false, Duration::ZERO, Instant::now()) {
                Decision::Restart(d) => delays.push(d.as_secs()),
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(&delays[..6], &[1, 2, 4, 8, 16, 30]);
        // Counted failures still give up past the limit.
        for _ in 0..5 {
            assert!(matches!(
                t.on_exit(false, Duration::ZERO, Instant::now()),
                Decision::Restart(_)
            ));
        }
        assert_eq!(
            t.on_exit(false, Duration::ZERO, Instant::now()),
            Decision::GiveUp
        );
    }

    #[tokio::test(start_paused = true)]
    async fn modes() {
        let now = Instant::now();
        assert_eq!(
            Tracker::new(&svc(RestartMode::Never)).on_exit(false, Duration::ZERO, now),
            Decision::Done
        );
        assert_eq!(
            Tracker::new(&svc(RestartMode::OnFailure)).on_exit(true, Duration::ZERO, now),
            Decision::Done
        );
        assert!(matches!(
            Tracker::new(&svc(RestartMode::OnFailure)).on_exit(false, Duration::ZERO, now),
            Decision::Restart(_)
        ));
        assert!(matches!(
            Tracker::new(&svc(RestartMode::Always)).on_exit(true, Duration::ZERO, now),
            Decision::Restart(_)
        ));
    }
}

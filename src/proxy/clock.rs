//! The time as a connection's task sees it: read once per poll of the task, not at every use.
//!
//! A request read, forwarded and answered in one poll of its connection's task used to read the
//! clock 13 to 17 times (its start, deadlines, the activity marks of each read and write, the
//! access log's duration and timestamp); a read of the clock is a few tens of nanoseconds, more
//! in a virtual machine. During a [`turn`], [`now`] and [`wall`] read the clock once each, at
//! their first use, and return that reading after; outside one they read it every time. What
//! is measured with it (deadlines of seconds, durations logged to the microsecond) is off by at
//! most the length of one poll.

use std::cell::Cell;
use std::time::{Instant, SystemTime};

#[derive(Clone, Copy)]
struct Cached {
    active: bool,
    mono: Option<Instant>,
    wall: Option<SystemTime>,
}

const OUTSIDE: Cached = Cached {
    active: false,
    mono: None,
    wall: None,
};

thread_local! {
    static CACHED: Cell<Cached> = const { Cell::new(OUTSIDE) };
}

/// A poll of a connection's task: the clock is read at most once (each kind) until dropped.
pub struct Turn {
    outer: Cached,
}

/// Begin a turn (see [`Turn`]).
pub fn turn() -> Turn {
    let outer = CACHED.with(|c| {
        c.replace(Cached {
            active: true,
            mono: None,
            wall: None,
        })
    });
    Turn { outer }
}

impl Drop for Turn {
    fn drop(&mut self) {
        CACHED.with(|c| c.set(self.outer));
    }
}

/// What `read` reads, as the turn (if one is on) first read it into `field`.
fn cached<T: Copy>(field: fn(&mut Cached) -> &mut Option<T>, read: fn() -> T) -> T {
    CACHED.with(|c| {
        let mut cached = c.get();
        if !cached.active {
            return read();
        }
        if let Some(t) = *field(&mut cached) {
            return t;
        }
        let t = read();
        *field(&mut cached) = Some(t);
        c.set(cached);
        t
    })
}

/// The monotonic time: the turn's, if one is on.
pub fn now() -> Instant {
    cached(|c| &mut c.mono, Instant::now)
}

/// The wall-clock time: the turn's, if one is on.
pub fn wall() -> SystemTime {
    cached(|c| &mut c.wall, SystemTime::now)
}

/// `now()` as tokio's timers take it (outside a turn, tokio's clock, which a test may pause).
pub fn tokio_now() -> tokio::time::Instant {
    if CACHED.with(|c| c.get().active) {
        tokio::time::Instant::from_std(now())
    } else {
        tokio::time::Instant::now()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_turn_reads_the_clock_once_and_outside_one_every_time() {
        let before = now();
        std::thread::sleep(Duration::from_millis(2));
        assert!(
            now() > before,
            "outside a turn, the clock is read at each call"
        );
        {
            let _turn = turn();
            let first = now();
            let first_wall = wall();
            std::thread::sleep(Duration::from_millis(2));
            assert_eq!(now(), first, "in a turn, one reading");
            assert_eq!(wall(), first_wall);
            {
                let _inner = turn();
                std::thread::sleep(Duration::from_millis(2));
                assert!(now() > first, "a turn begun inside another reads afresh");
            }
            assert_eq!(
                now(),
                first,
                "and the outer turn's reading is back after it"
            );
        }
        let after = now();
        std::thread::sleep(Duration::from_millis(2));
        assert!(
            now() > after,
            "the turn over, the clock is read at each call again"
        );
    }
}

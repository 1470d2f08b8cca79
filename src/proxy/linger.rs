//! What the kernel still holds for a client once its connection is over.
//!
//! A response that ends its connection (`Connection: close`, HTTP/1.0, a client that closed its
//! side) is done for hyper once the kernel has it all, and so is a connection closed as idle
//! whose client still has the last response's end to take: the kernel sends it at the client's
//! pace after the socket is closed. Closed as usual, the socket went out of every bound's sight,
//! probing the client's closed window for minutes (2.5 MB for about 340 s seen with a client
//! that read nothing, as nginx leaves it), and a client could leave as many such sockets as it
//! makes connections; reset at once (what idle closes did), a slow reader lost the end of its
//! download. So a connection that ends with bytes in its socket's send queue (over a piece,
//! or any if closed as idle: see `Activity::closing`) keeps its socket: a duplicate of its
//! descriptor (the rest of the connection, TLS and HTTP state, is gone), its write side shut
//! (the client gets the end after the bytes), looked at every [`TICK`], closed as usual once
//! the queue has emptied, and reset (`SO_LINGER` 0) if the client has not taken a
//! piece ([`forward::PIECE`](super::forward::PIECE)) of it, or the rest if less, within
//! `proxy.send_timeout`: the rule a response is sent under, counted from the last piece the
//! client took (an idle connection's queue was followed before its close, see
//! `Activity::still_taking`). The connection counts as open meanwhile. Connections cut for
//! missing a deadline are reset at once, not kept.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::forward::PIECE;

/// How often a kept socket's queue is looked at.
pub const TICK: Duration = Duration::from_millis(500);

/// The socket `fd` (the connection's own, open) kept past its close if its send queue holds
/// more than `more_than` bytes: a duplicate of its descriptor.
pub fn hold(fd: RawFd, more_than: u64) -> Option<OwnedFd> {
    if crate::outq::queued(fd)? <= more_than {
        return None;
    }
    // SAFETY: F_DUPFD_CLOEXEC takes an int; `fd` is the caller's own open socket.
    let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
    // SAFETY: a new descriptor, owned by no one else.
    (dup >= 0).then(|| unsafe { OwnedFd::from_raw_fd(dup) })
}

/// Keep `socket` until its client has taken what its send queue holds (closed as usual), or
/// has not taken a piece of it within `limit` (reset), or regobox stops (closed as usual: the
/// kernel keeps the rest). `from`: what the queue held when the client last took a piece of
/// it, and when, if known; else the queue now.
pub async fn linger(
    socket: OwnedFd,
    from: Option<(u64, Instant)>,
    limit: Duration,
    stop: &CancellationToken,
) {
    // SAFETY: shutdown takes two ints; `socket` is open, owned here.
    unsafe { libc::shutdown(socket.as_raw_fd(), libc::SHUT_WR) };
    let queued = || crate::outq::queued(socket.as_raw_fd()).unwrap_or(0);
    let (mark, since) = from.unwrap_or_else(|| (queued(), Instant::now()));
    let mut taking = Taking::new(mark, since);
    loop {
        tokio::select! {
            _ = tokio::time::sleep(TICK) => {}
            _ = stop.cancelled() => return,
        }
        match taking.look(queued(), Instant::now(), limit) {
            Look::Taken => return,
            Look::Taking => {}
            Look::Stuck => {
                reset_on_close(socket.as_raw_fd());
                return;
            }
        }
    }
}

/// Make the close of the socket `fd` (the caller's own, open) a reset: what its send queue
/// holds is dropped, and the kernel keeps nothing of it (nginx's `reset_timedout_connection`).
pub fn reset_on_close(fd: RawFd) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: SO_LINGER reads one `linger`; `fd` is the caller's own open socket.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

/// A kept socket's queue, as its client takes it: what it held when the client last took a
/// piece of it (or when kept), and when.
#[derive(Debug)]
struct Taking {
    mark: u64,
    since: Instant,
}

#[derive(Debug, PartialEq, Eq)]
enum Look {
    /// The queue is empty: the client has it all.
    Taken,
    /// The client took a piece within the limit, or the limit has not passed.
    Taking,
    /// No piece taken within the limit.
    Stuck,
}

impl Taking {
    fn new(queued: u64, now: Instant) -> Taking {
        Taking {
            mark: queued,
            since: now,
        }
    }

    /// The queue holds `queued` bytes at `now` (nothing is written to a kept socket: the
    /// queue's shrinking is the client's taking).
    fn look(&mut self, queued: u64, now: Instant, limit: Duration) -> Look {
        if queued == 0 {
            return Look::Taken;
        }
        if self.mark.saturating_sub(queued) >= PIECE as u64 {
            *self = Taking::new(queued, now);
            return Look::Taking;
        }
        if now.saturating_duration_since(self.since) >= limit {
            Look::Stuck
        } else {
            Look::Taking
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMIT: Duration = Duration::from_secs(60);

    fn at(start: Instant, secs: u64) -> Instant {
        start + Duration::from_secs(secs)
    }

    #[test]
    fn a_queue_taken_a_piece_per_limit_is_kept_until_it_is_empty() {
        let start = Instant::now();
        let piece = PIECE as u64;
        let mut t = Taking::new(10 * piece, start);
        assert_eq!(t.look(10 * piece, at(start, 59), LIMIT), Look::Taking);
        // A piece taken at 59 s: the next is due by 119 s.
        assert_eq!(t.look(9 * piece, at(start, 59), LIMIT), Look::Taking);
        assert_eq!(t.look(9 * piece - 1, at(start, 118), LIMIT), Look::Taking);
        assert_eq!(t.look(8 * piece, at(start, 118), LIMIT), Look::Taking);
        assert_eq!(t.look(0, at(start, 119), LIMIT), Look::Taken);
    }

    #[test]
    fn a_queue_taken_less_than_a_piece_per_limit_is_stuck() {
        let start = Instant::now();
        let piece = PIECE as u64;
        let mut t = Taking::new(10 * piece, start);
        // Bytes taken, but less than a piece since the queue was kept.
        assert_eq!(t.look(10 * piece - 100, at(start, 30), LIMIT), Look::Taking);
        assert_eq!(t.look(9 * piece + 1, at(start, 59), LIMIT), Look::Taking);
        assert_eq!(t.look(9 * piece + 1, at(start, 60), LIMIT), Look::Stuck);
        // Nothing taken at all.
        let mut t = Taking::new(piece + 1, start);
        assert_eq!(t.look(piece + 1, at(start, 60), LIMIT), Look::Stuck);
        // Less than a piece left: all of it is due within the limit.
        let mut t = Taking::new(100, start);
        assert_eq!(t.look(99, at(start, 59), LIMIT), Look::Taking);
        assert_eq!(t.look(1, at(start, 60), LIMIT), Look::Stuck);
        assert_eq!(
            Taking::new(100, start).look(0, at(start, 60), LIMIT),
            Look::Taken
        );
    }
}

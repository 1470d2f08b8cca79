//! An upgraded connection (a WebSocket) spliced to the application's, and what bounds it.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::sync::CancellationToken;

use super::{Activity, Tracked, forward, sentry};

/// What bounds an upgraded connection.
pub(crate) struct TunnelBounds {
    /// `proxy.websocket_idle_timeout`: nothing moved either way.
    pub idle: Duration,
    /// `proxy.send_timeout`: the client taking a piece of what the kernel holds for it.
    pub send: Duration,
    /// The client connection's own (its socket).
    pub connection: Arc<Activity>,
}

/// Splice an upgraded connection to the application's until either side closes it, nothing
/// moves either way for `idle` (`proxy.websocket_idle_timeout`), the client takes less than a
/// piece of what the kernel holds for it in `send_timeout` (see [`Pace`]), or the proxy is
/// forced to stop.
pub(crate) async fn tunnel<A, B>(
    client: A,
    server: B,
    bounds: TunnelBounds,
    force: CancellationToken,
) where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let TunnelBounds {
        idle,
        send,
        connection,
    } = bounds;
    let activity = Activity::new();
    let mut client = Tracked {
        inner: client,
        activity: activity.clone(),
    };
    let mut server = Tracked {
        inner: server,
        activity: activity.clone(),
    };
    let copy = tokio::io::copy_bidirectional(&mut client, &mut server);
    tokio::pin!(copy);
    let mut sentry = sentry::Sentry::new(None, &force, Duration::from_millis(500).min(idle));
    let mut pace = Pace::new(send);
    let started = super::clock::tokio_now();
    loop {
        tokio::select! {
            biased;
            _ = &mut copy => return,
            e = sentry.next() => {
                if e == sentry::Event::Force {
                    return;
                }
                if activity.idle_for() >= idle {
                    tracing::debug!(target: "regobox::proxy", timeout = ?idle, "an upgraded connection idle for proxy.websocket_idle_timeout closed");
                    return;
                }
                let fd = connection.fd.load(Ordering::Relaxed);
                let (Some(queued), Some(acked)) = (crate::outq::queued(fd), super::bytes_acked(fd)) else {
                    continue;
                };
                let now = super::clock::tokio_now().saturating_duration_since(started);
                if pace.late(now, queued, acked) {
                    if let Some(left_out) = forward::CLIENT_ERRORS.should_log() {
                        tracing::info!(target: "regobox::proxy", timeout = ?send, similar_left_out = left_out, "a client did not take what an upgraded connection sent it (proxy.send_timeout); closed");
                    }
                    // What the kernel holds for it goes with the connection (reset).
                    connection.reset_if_untaken();
                    return;
                }
            }
        }
    }
}

/// What the client of an upgraded connection must take of what the kernel holds for it: a
/// piece ([`forward::PIECE`], as a response waiting for its client), or all the kernel held if
/// less, per `send_timeout` while any is held. (A piece alone was too much for an application
/// sending less than that per `send_timeout`: a client on a slow link reading each of 20 bytes
/// every 50 ms at once, whose queue always held the last ones in flight, was reset; a second
/// attacker's, the same session.) (An attacker's, thirty-third session: bounded by its idle
/// limit alone, which a byte either way resets, a tunnel whose client read nothing of what the
/// application pushed, and sent a byte now and then, held the application's connection and
/// 4 MB of the kernel's memory for ever.)
struct Pace {
    limit: Duration,
    /// The bytes the client had acknowledged when it last took its due (or when the kernel
    /// last began to hold something for it), what the kernel held for it then, and when.
    mark: Option<(u64, u64, Duration)>,
}

impl Pace {
    fn new(limit: Duration) -> Pace {
        Pace { limit, mark: None }
    }

    /// At `now`, the socket's send queue holding `queued` bytes and the client having
    /// acknowledged `acked` in all: whether it is past its limit.
    fn late(&mut self, now: Duration, queued: u64, acked: u64) -> bool {
        if queued == 0 {
            self.mark = None;
            return false;
        }
        match self.mark {
            Some((at, held, since))
                if acked.saturating_sub(at) < held.min(forward::PIECE as u64) =>
            {
                now.saturating_sub(since) >= self.limit
            }
            _ => {
                self.mark = Some((acked, queued, now));
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_takes_a_piece_per_limit_while_the_kernel_holds_bytes_for_it() {
        let s = Duration::from_secs;
        let piece = forward::PIECE as u64;
        let mut p = Pace::new(s(60));
        // Nothing held: nothing owed, however long.
        assert!(!p.late(s(0), 0, 0));
        assert!(!p.late(s(100), 0, 0));
        // Held from 100 s: a piece by 160 s.
        assert!(!p.late(s(101), 100_000, 0));
        assert!(!p.late(s(150), 100_000, piece - 1));
        assert!(p.late(s(161), 100_000, piece - 1));
        // A piece taken counts from then.
        let mut p = Pace::new(s(60));
        assert!(!p.late(s(0), 100_000, 0));
        assert!(!p.late(s(59), 100_000, piece));
        assert!(!p.late(s(118), 100_000, piece + 1));
        assert!(p.late(s(119), 100_000, piece + 1));
        // Less than a piece held: taking all of it is the client's due.
        let mut p = Pace::new(s(60));
        assert!(!p.late(s(0), 80, 0));
        assert!(!p.late(s(50), 60, 80));
        assert!(!p.late(s(100), 60, 139));
        assert!(p.late(s(110), 60, 139));
        // What emptied the queue paid all: the next wait counts from its start.
        let mut p = Pace::new(s(60));
        assert!(!p.late(s(0), 10, 0));
        assert!(!p.late(s(50), 0, 10));
        assert!(!p.late(s(100), 10, 10));
        assert!(!p.late(s(159), 10, 10));
        assert!(p.late(s(160), 10, 10));
    }
}

//! What a connection's task waits on beside its connection: the proxy's stop (graceful, then
//! forced) and the connection's watchdog, a tick every so often (its deadlines, see
//! `Activity::overdue`).
//!
//! The task is polled at every read and write of its connection, and a `select!` over these
//! polled them all every time: a poll of tokio's cancellation future takes the waiters' lock and
//! updates its waker, and a timer's registers the waker anew, about 1 200 instructions of every
//! HTTP/1.1 request. Here each is polled once to register the task's waker, and again only when
//! it may be ready: its token cancelled (`is_cancelled`, a read under the token's own lock,
//! about 30 instructions) or its timer elapsed (an atomic load), or the task's waker changed.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use tokio::time::Sleep;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use super::clock;

/// What happened.
#[derive(Debug, PartialEq, Eq)]
pub enum Event {
    /// The proxy stops: finish what is in flight (once).
    Shutdown,
    /// The proxy stops now.
    Force,
    /// The watchdog's tick.
    Tick,
}

struct Token {
    token: CancellationToken,
    wait: Pin<Box<WaitForCancellationFutureOwned>>,
}

impl Token {
    fn new(token: &CancellationToken) -> Token {
        Token {
            token: token.clone(),
            wait: Box::pin(token.clone().cancelled_owned()),
        }
    }
}

pub struct Sentry {
    /// `None` once it was reported (or when not watched).
    shutdown: Option<Token>,
    force: Token,
    tick: Pin<Box<Sleep>>,
    period: Duration,
    /// The waker the three are registered with.
    waker: Option<Waker>,
}

impl Sentry {
    /// Ticks every `period`, the first a period from now. (tokio's `interval` ticks at once, and
    /// a timer due before the worker's next wake-up makes tokio wake the worker's driver through
    /// its event descriptor: a system call, and a turn of the worker for nothing, for every new
    /// connection.)
    pub fn new(
        shutdown: Option<&CancellationToken>,
        force: &CancellationToken,
        period: Duration,
    ) -> Sentry {
        Sentry {
            shutdown: shutdown.map(Token::new),
            force: Token::new(force),
            tick: Box::pin(tokio::time::sleep_until(clock::tokio_now() + period)),
            period,
            waker: None,
        }
    }

    pub fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Event> {
        let fresh = !self.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker()));
        if fresh {
            self.waker = Some(cx.waker().clone());
        }
        if let Some(s) = &mut self.shutdown {
            if (fresh || s.token.is_cancelled()) && s.wait.as_mut().poll(cx).is_ready() {
                self.shutdown = None;
                return Poll::Ready(Event::Shutdown);
            }
        }
        if (fresh || self.force.token.is_cancelled())
            && self.force.wait.as_mut().poll(cx).is_ready()
        {
            return Poll::Ready(Event::Force);
        }
        if (fresh || self.tick.is_elapsed()) && self.tick.as_mut().poll(cx).is_ready() {
            // The next a period from now (missed ticks are not made up), registered at once: a
            // timer that fired holds no waker until polled.
            let next = clock::tokio_now() + self.period;
            self.tick.as_mut().reset(next);
            let _ = self.tick.as_mut().poll(cx);
            return Poll::Ready(Event::Tick);
        }
        Poll::Pending
    }

    pub async fn next(&mut self) -> Event {
        std::future::poll_fn(|cx| self.poll_next(cx)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::cork::tests::Count;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test(start_paused = true)]
    async fn each_event_wakes_the_task_registered_once() {
        let (shutdown, force) = (CancellationToken::new(), CancellationToken::new());
        let mut watch = Sentry::new(Some(&shutdown), &force, Duration::from_millis(500));
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let waker = Waker::from(count.clone());
        let mut cx = Context::from_waker(&waker);
        let woken = || count.0.load(Ordering::SeqCst);
        // Registered at the first poll; polled again with nothing ready, nothing happens.
        for _ in 0..3 {
            assert!(watch.poll_next(&mut cx).is_pending());
        }
        // The tick wakes the task, is reported once, and the next is registered.
        tokio::time::sleep(Duration::from_millis(501)).await;
        assert_eq!(woken(), 1, "the tick wakes the task");
        assert_eq!(watch.poll_next(&mut cx), Poll::Ready(Event::Tick));
        assert!(watch.poll_next(&mut cx).is_pending());
        tokio::time::sleep(Duration::from_millis(501)).await;
        assert_eq!(woken(), 2, "and the next tick too");
        assert_eq!(watch.poll_next(&mut cx), Poll::Ready(Event::Tick));
        // The stop: the graceful one once, then the forced one.
        shutdown.cancel();
        assert_eq!(woken(), 3, "the stop wakes the task");
        assert_eq!(watch.poll_next(&mut cx), Poll::Ready(Event::Shutdown));
        assert!(watch.poll_next(&mut cx).is_pending(), "reported once");
        force.cancel();
        assert_eq!(woken(), 4);
        assert_eq!(watch.poll_next(&mut cx), Poll::Ready(Event::Force));
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_waker_is_registered_and_woken() {
        let (shutdown, force) = (CancellationToken::new(), CancellationToken::new());
        let mut watch = Sentry::new(Some(&shutdown), &force, Duration::from_millis(500));
        let first = Arc::new(Count(AtomicUsize::new(0)));
        let second = Arc::new(Count(AtomicUsize::new(0)));
        let w1 = Waker::from(first.clone());
        let w2 = Waker::from(second.clone());
        assert!(watch.poll_next(&mut Context::from_waker(&w1)).is_pending());
        assert!(watch.poll_next(&mut Context::from_waker(&w2)).is_pending());
        force.cancel();
        assert_eq!(second.0.load(Ordering::SeqCst), 1, "the waker last given");
        tokio::time::sleep(Duration::from_millis(501)).await;
        assert_eq!(second.0.load(Ordering::SeqCst), 2);
    }
}

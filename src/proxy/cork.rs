//! What a TLS handshake writes last, held for the connection's next write.
//!
//! A TLS 1.3 server sends its session tickets once it has read the client's Finished, and
//! tokio-rustls ends the handshake with a flush: the tickets went out alone, a write and a
//! segment of their own for every new connection, and a wake-up of the client for nothing it
//! waits for, just before the response. Under the TLS session, a [`Corked`] stream gathers what
//! the handshake writes and sends it when the handshake waits for the client (so a flight the
//! client needs always goes before regobox waits for the answer to it). Once a TLS 1.3
//! handshake is over, what is left (the tickets) waits for the connection's next write (the
//! response, HTTP/2's settings) and leaves with it, in one write; or for the connection's end.
//! After a TLS 1.2 handshake, whose last flight the client waits for, it is sent at once.
//!
//! An HTTP/1.1 connection's writes are then deferred ([`Corked::defer`]): gathered, and sent at
//! a flush once the worker's queue has had one more pass (the flush wakes the task and waits
//! for its next turn). The responses of the connections whose answers came in the same batch
//! of events then leave one after the other at the end of that batch, and the client, woken
//! by the first, finds the others there (on one core each, measured: 3 to 5 % more requests/s
//! from h2load, the client's core, which bounds that load, spending less per request). A large
//! write with nothing gathered before it goes straight through ([`BULK`]). HTTP/2 connections
//! do the same above TLS (see `coalesce`).
//!
//! A connection's last answer (`framing::Signals::closes`) leaves with its end: hyper flushes the
//! answer, then shuts the connection down (TLS's `close_notify`, then TCP's FIN) in the same
//! poll. The flush of that turn leaves the answer gathered, and the shutdown sends answer and
//! `close_notify` in one write that TCP sends with the FIN ([`Last`]): one segment where there
//! were three (the answer, the alert, the FIN), and one system call where there were three. A
//! flush of that turn not followed by the shutdown (the hint wrong) sends at the next turn, as
//! any deferred write does.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::framing::Signals;

/// Bytes gathered beyond which the handshake's writes go out first (a handshake's flight is a
/// few KiB; the bound keeps memory bounded whatever happens).
const LIMIT: usize = 64 * 1024;
/// A deferring stream's write of at least this much (a full TLS record), with nothing gathered
/// before it, goes straight through: a large response gains nothing from waiting for the end
/// of the batch, and would pay a copy and a turn of its task for every flush.
const BULK: usize = 16 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// The handshake is under way: writes are gathered, sent when it waits for the client.
    Gather,
    /// The handshake is over: what is held leaves with the next write (or the close).
    Hold,
    /// Nothing held: writes go straight through.
    Through,
    /// Writes gathered (after what is held); a flush waits for one pass of the worker's queue,
    /// then sends them.
    Defer,
}

/// A stream whose last write before its shutdown can travel with the shutdown.
pub trait Last: AsyncWrite + Unpin {
    /// Write from `buf`, the last bytes before the write side is shut down (TCP: held for the FIN
    /// that follows, which then leaves in the same segment). By default, a plain write.
    fn poll_write_last(&mut self, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(self).poll_write(cx, buf)
    }
}

pub struct Corked<S: Last> {
    inner: S,
    mode: Mode,
    held: Vec<u8>,
    /// Deferring: the connection wrote since what is held last went out (a flush with only the
    /// handshake's tickets held keeps them for the first response).
    written: bool,
    /// Deferring: a flush waited for a pass of the queue already.
    yielded: bool,
    /// Deferring: the connection's signals, which say when an answer is its last, and count the
    /// task's turns.
    signals: Option<Arc<Signals>>,
    /// Deferring: the turn whose flush left the connection's last answer gathered for the
    /// shutdown (see the module's documentation).
    kept: Option<u64>,
}

impl<S: Last> Corked<S> {
    /// `inner`, its writes gathered until [`Corked::hold`] or [`Corked::poll_release`].
    pub fn new(inner: S) -> Self {
        Corked {
            inner,
            mode: Mode::Gather,
            held: Vec::new(),
            written: false,
            yielded: false,
            signals: None,
            kept: None,
        }
    }

    /// The stream under it.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// From now on, writes are gathered until a flush, which sends them at the task's next
    /// turn (see the module's documentation); what is held leaves with them. `signals`: the
    /// connection's, for its last answer to leave with its end.
    pub fn defer(&mut self, signals: Option<Arc<Signals>>) {
        self.mode = Mode::Defer;
        self.signals = signals;
    }

    /// The handshake is over and the client waits for nothing it wrote last (TLS 1.3's
    /// tickets): that waits for the next write. (Else it must be sent now, with
    /// [`Corked::poll_release`].)
    pub fn hold(&mut self) {
        self.mode = if self.held.is_empty() {
            Mode::Through
        } else {
            Mode::Hold
        };
    }
}

impl<S: Last> Drop for Corked<S> {
    /// A connection regobox closes before its first write (idle, or a request head too slow)
    /// still gets the tickets, if its socket takes them at once: the client can resume its
    /// next connection. (And what a deferring connection wrote without a flush goes the same
    /// way; hyper flushes before it ends a connection.)
    fn drop(&mut self) {
        if self.mode == Mode::Hold || self.mode == Mode::Defer {
            let _ = self.poll_drain(&mut Context::from_waker(std::task::Waker::noop()), false);
        }
    }
}

impl<S: Last> Corked<S> {
    /// Send what is held; then writes go straight through.
    pub fn poll_release(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_drain(cx, false))?;
        self.mode = Mode::Through;
        Poll::Ready(Ok(()))
    }

    /// [`Corked::poll_release`] as a future.
    pub async fn release(&mut self) -> io::Result<()> {
        std::future::poll_fn(|cx| self.poll_release(cx)).await
    }

    /// Write out what is held (the mode stays); `last`: the last bytes before the shutdown (see
    /// [`Last`]).
    fn poll_drain(&mut self, cx: &mut Context<'_>, last: bool) -> Poll<io::Result<()>> {
        while !self.held.is_empty() {
            let written = match last {
                true => self.inner.poll_write_last(cx, &self.held),
                false => Pin::new(&mut self.inner).poll_write(cx, &self.held),
            };
            match ready!(written)? {
                0 => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                n => {
                    self.held.drain(..n);
                }
            }
        }
        self.held = Vec::new();
        self.written = false;
        self.yielded = false;
        self.kept = None;
        Poll::Ready(Ok(()))
    }

    /// Write what is held followed by `bufs`, in one write where the socket takes it; the
    /// bytes of `bufs` written, once what is held has gone.
    fn poll_write_after_held(
        &mut self,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        while !self.held.is_empty() {
            let mut all = Vec::with_capacity(bufs.len() + 1);
            all.push(IoSlice::new(&self.held));
            all.extend(bufs.iter().map(|b| IoSlice::new(b)));
            let n = ready!(Pin::new(&mut self.inner).poll_write_vectored(cx, &all))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            if n < self.held.len() {
                self.held.drain(..n);
                continue;
            }
            let past = n - self.held.len();
            self.held = Vec::new();
            self.mode = Mode::Through;
            if past > 0 {
                return Poll::Ready(Ok(past));
            }
        }
        self.mode = Mode::Through;
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    /// Gather `bufs` (the handshake's writes, or a deferring connection's).
    fn gather(&mut self, cx: &mut Context<'_>, bufs: &[IoSlice<'_>]) -> Poll<io::Result<usize>> {
        if self.held.len() >= LIMIT {
            ready!(self.poll_drain(cx, false))?;
        }
        let mut n = 0;
        for b in bufs {
            self.held.extend_from_slice(b);
            n += b.len();
        }
        self.written |= self.mode == Mode::Defer && n > 0;
        Poll::Ready(Ok(n))
    }
}

impl<S: AsyncRead + Last> AsyncRead for Corked<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        // About to wait for the client: it gets what the handshake wrote first.
        if r.is_pending() && this.mode == Mode::Gather && !this.held.is_empty() {
            if let Poll::Ready(Err(e)) = this.poll_drain(cx, false) {
                return Poll::Ready(Err(e));
            }
        }
        r
    }
}

impl<S: Last> AsyncWrite for Corked<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        match this.mode {
            Mode::Through => Pin::new(&mut this.inner).poll_write_vectored(cx, bufs),
            Mode::Defer
                if this.held.is_empty() && bufs.iter().map(|b| b.len()).sum::<usize>() >= BULK =>
            {
                Pin::new(&mut this.inner).poll_write_vectored(cx, bufs)
            }
            Mode::Gather | Mode::Defer => this.gather(cx, bufs),
            Mode::Hold => this.poll_write_after_held(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    /// What is gathered or held stays (a flush ends tokio-rustls' handshake: that is the flush
    /// this stream is for), but for a deferring stream's writes, which leave at the task's
    /// next turn.
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.mode == Mode::Defer && this.written {
            if !this.yielded {
                this.yielded = true;
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            // The connection's last answer: gathered until the shutdown of this turn (see the
            // module's documentation); woken, so that a flush of a later turn sends it if no
            // shutdown came.
            if let Some(signals) = this.signals.as_ref().filter(|s| s.closes()) {
                let turn = signals.turn();
                if this.kept.is_none() {
                    this.kept = Some(turn);
                    cx.waker().wake_by_ref();
                }
                if this.kept == Some(turn) {
                    return Pin::new(&mut this.inner).poll_flush(cx);
                }
            }
            ready!(this.poll_drain(cx, false))?;
        }
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_drain(cx, true))?;
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::{Wake, Waker};

    use tokio::io::DuplexStream;

    use super::*;

    /// A waker that counts its wake-ups (the other modules' tests' too).
    pub(crate) struct Count(pub(crate) AtomicUsize);

    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// What the far end has received so far, without waiting.
    fn received(far: &mut DuplexStream) -> Vec<u8> {
        let mut all = Vec::new();
        let mut buf = [0u8; 1024];
        let mut cx = Context::from_waker(Waker::noop());
        loop {
            let mut rb = ReadBuf::new(&mut buf);
            match Pin::new(&mut *far).poll_read(&mut cx, &mut rb) {
                Poll::Ready(Ok(())) if !rb.filled().is_empty() => {
                    all.extend_from_slice(rb.filled())
                }
                _ => return all,
            }
        }
    }

    /// A deferring stream over a pipe that takes `room` bytes, and the pipe's far end.
    fn deferring(room: usize) -> (Corked<DuplexStream>, DuplexStream) {
        let (near, far) = tokio::io::duplex(room);
        let mut c = Corked::new(near);
        c.defer(None);
        (c, far)
    }

    impl Last for DuplexStream {}

    /// A flush that is done (not waiting, not failed).
    fn flushed(c: &mut Corked<DuplexStream>, cx: &mut Context<'_>) -> bool {
        matches!(Pin::new(c).poll_flush(cx), Poll::Ready(Ok(())))
    }

    fn write(c: &mut Corked<DuplexStream>, cx: &mut Context<'_>, bytes: &[u8]) {
        match Pin::new(c).poll_write(cx, bytes) {
            Poll::Ready(Ok(n)) => assert_eq!(n, bytes.len()),
            other => panic!("a write: {other:?}"),
        }
    }

    #[test]
    fn a_deferred_flush_sends_at_the_tasks_next_turn() {
        let (mut c, mut far) = deferring(64 * 1024);
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let waker = Waker::from(count.clone());
        let mut cx = Context::from_waker(&waker);
        write(&mut c, &mut cx, b"HTTP/1.1 200 OK\r\n");
        write(&mut c, &mut cx, b"\r\n");
        // The first flush waits for the next turn, the task woken for it; nothing left yet.
        assert!(Pin::new(&mut c).poll_flush(&mut cx).is_pending());
        assert_eq!(
            count.0.load(Ordering::Relaxed),
            1,
            "the task was woken for its next turn"
        );
        assert!(received(&mut far).is_empty());
        // At the next turn, both writes leave.
        assert!(flushed(&mut c, &mut cx));
        assert_eq!(received(&mut far), b"HTTP/1.1 200 OK\r\n\r\n");
        // A flush with nothing new is done at once.
        assert!(flushed(&mut c, &mut cx));
        assert_eq!(count.0.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn what_the_handshake_left_waits_for_the_first_write_when_deferring() {
        let (near, mut far) = tokio::io::duplex(64 * 1024);
        let mut c = Corked::new(near);
        let mut cx = Context::from_waker(Waker::noop());
        // The handshake's last write (TLS 1.3's tickets), then HTTP/1.1.
        write(&mut c, &mut cx, b"tickets;");
        c.hold();
        c.defer(None);
        // hyper flushes before it reads the first request: the tickets stay.
        assert!(flushed(&mut c, &mut cx));
        assert!(received(&mut far).is_empty(), "the tickets went alone");
        write(&mut c, &mut cx, b"response");
        assert!(Pin::new(&mut c).poll_flush(&mut cx).is_pending());
        assert!(flushed(&mut c, &mut cx));
        assert_eq!(received(&mut far), b"tickets;response");
    }

    #[test]
    fn a_large_write_with_nothing_gathered_goes_straight_through() {
        let (mut c, mut far) = deferring(256 * 1024);
        let mut cx = Context::from_waker(Waker::noop());
        let big = vec![7u8; BULK];
        write(&mut c, &mut cx, &big);
        assert_eq!(received(&mut far).len(), BULK, "a record's worth waited");
        // Small writes are gathered again, and a large one after them waits with them (order).
        write(&mut c, &mut cx, b"small;");
        write(&mut c, &mut cx, &big);
        assert!(received(&mut far).is_empty());
        assert!(Pin::new(&mut c).poll_flush(&mut cx).is_pending());
        assert!(flushed(&mut c, &mut cx));
        let got = received(&mut far);
        assert_eq!(got.len(), 6 + BULK);
        assert!(got.starts_with(b"small;"));
    }

    #[test]
    fn a_deferring_connections_end_sends_what_it_wrote_first() {
        let (mut c, mut far) = deferring(64 * 1024);
        let mut cx = Context::from_waker(Waker::noop());
        write(&mut c, &mut cx, b"last;");
        assert!(matches!(
            Pin::new(&mut c).poll_shutdown(&mut cx),
            Poll::Ready(Ok(()))
        ));
        assert_eq!(received(&mut far), b"last;");
        // And a connection dropped with writes not flushed sends them if the socket takes them.
        let (mut c, mut far) = deferring(64 * 1024);
        write(&mut c, &mut cx, b"unflushed");
        drop(c);
        assert_eq!(received(&mut far), b"unflushed");
    }

    /// A deferring stream whose connection's signals say the answer is its last.
    fn closing(room: usize, tunnel: bool) -> (Corked<DuplexStream>, DuplexStream, Arc<Signals>) {
        let (near, far) = tokio::io::duplex(room);
        let signals = Arc::new(Signals::default());
        signals.closing();
        if tunnel {
            signals.tunnel();
        }
        let mut c = Corked::new(near);
        c.defer(Some(signals.clone()));
        (c, far, signals)
    }

    #[test]
    fn a_last_answer_leaves_with_the_connections_end() {
        let (mut c, mut far, signals) = closing(64 * 1024, false);
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let waker = Waker::from(count.clone());
        let mut cx = Context::from_waker(&waker);
        signals.next_turn();
        write(&mut c, &mut cx, b"response;");
        assert!(Pin::new(&mut c).poll_flush(&mut cx).is_pending());
        // The next turn: its flushes are done, the answer kept for the shutdown of this turn.
        signals.next_turn();
        assert!(flushed(&mut c, &mut cx));
        assert!(flushed(&mut c, &mut cx));
        assert!(
            received(&mut far).is_empty(),
            "the answer left before the end"
        );
        write(&mut c, &mut cx, b"close_notify");
        assert!(matches!(
            Pin::new(&mut c).poll_shutdown(&mut cx),
            Poll::Ready(Ok(()))
        ));
        assert_eq!(received(&mut far), b"response;close_notify");
    }

    /// The hint wrong (no shutdown after the flush): the answer leaves at the next turn, which
    /// the flush asked for.
    #[test]
    fn a_last_answer_not_followed_by_the_end_leaves_at_the_next_turn() {
        let (mut c, mut far, signals) = closing(64 * 1024, false);
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let waker = Waker::from(count.clone());
        let mut cx = Context::from_waker(&waker);
        write(&mut c, &mut cx, b"response");
        assert!(Pin::new(&mut c).poll_flush(&mut cx).is_pending());
        signals.next_turn();
        assert!(flushed(&mut c, &mut cx));
        assert!(received(&mut far).is_empty());
        assert_eq!(
            count.0.load(Ordering::Relaxed),
            2,
            "the kept answer's flush woke the task for its next turn"
        );
        signals.next_turn();
        assert!(flushed(&mut c, &mut cx));
        assert_eq!(received(&mut far), b"response");
        // The next answer goes the same way.
        write(&mut c, &mut cx, b"another");
        assert!(Pin::new(&mut c).poll_flush(&mut cx).is_pending());
        signals.next_turn();
        assert!(flushed(&mut c, &mut cx));
        signals.next_turn();
        assert!(flushed(&mut c, &mut cx));
        assert_eq!(received(&mut far), b"another");
    }

    /// Upgraded (101 sent), the connection is a tunnel whose flushes are not hyper's turns:
    /// they send, as any deferred write.
    #[test]
    fn a_tunnel_flushes_as_any_connection() {
        let (mut c, mut far, _signals) = closing(64 * 1024, true);
        let mut cx = Context::from_waker(Waker::noop());
        write(&mut c, &mut cx, b"frame");
        assert!(Pin::new(&mut c).poll_flush(&mut cx).is_pending());
        assert!(flushed(&mut c, &mut cx));
        assert_eq!(received(&mut far), b"frame");
    }
}

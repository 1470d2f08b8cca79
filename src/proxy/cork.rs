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

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Bytes gathered beyond which the handshake's writes go out first (a handshake's flight is a
/// few KiB; the bound keeps memory bounded whatever happens).
const LIMIT: usize = 64 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// The handshake is under way: writes are gathered, sent when it waits for the client.
    Gather,
    /// The handshake is over: what is held leaves with the next write (or the close).
    Hold,
    /// Nothing held: writes go straight through.
    Through,
}

pub struct Corked<S: AsyncWrite + Unpin> {
    inner: S,
    mode: Mode,
    held: Vec<u8>,
}

impl<S: AsyncWrite + Unpin> Corked<S> {
    /// `inner`, its writes gathered until [`Corked::hold`] or [`Corked::poll_release`].
    pub fn new(inner: S) -> Self {
        Corked {
            inner,
            mode: Mode::Gather,
            held: Vec::new(),
        }
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

impl<S: AsyncWrite + Unpin> Drop for Corked<S> {
    /// A connection regobox closes before its first write (idle, or a request head too slow)
    /// still gets the tickets, if its socket takes them at once: the client can resume its
    /// next connection.
    fn drop(&mut self) {
        if self.mode == Mode::Hold {
            let _ = self.poll_drain(&mut Context::from_waker(std::task::Waker::noop()));
        }
    }
}

impl<S: AsyncWrite + Unpin> Corked<S> {
    /// Send what is held; then writes go straight through.
    pub fn poll_release(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_drain(cx))?;
        self.mode = Mode::Through;
        Poll::Ready(Ok(()))
    }

    /// [`Corked::poll_release`] as a future.
    pub async fn release(&mut self) -> io::Result<()> {
        std::future::poll_fn(|cx| self.poll_release(cx)).await
    }

    /// Write out what is held (the mode stays).
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.held.is_empty() {
            match ready!(Pin::new(&mut self.inner).poll_write(cx, &self.held))? {
                0 => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                n => {
                    self.held.drain(..n);
                }
            }
        }
        self.held = Vec::new();
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

    /// Gather `bufs` (the handshake's writes).
    fn gather(&mut self, cx: &mut Context<'_>, bufs: &[IoSlice<'_>]) -> Poll<io::Result<usize>> {
        if self.held.len() >= LIMIT {
            ready!(self.poll_drain(cx))?;
        }
        let mut n = 0;
        for b in bufs {
            self.held.extend_from_slice(b);
            n += b.len();
        }
        Poll::Ready(Ok(n))
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for Corked<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        // About to wait for the client: it gets what the handshake wrote first.
        if r.is_pending() && this.mode == Mode::Gather && !this.held.is_empty() {
            if let Poll::Ready(Err(e)) = this.poll_drain(cx) {
                return Poll::Ready(Err(e));
            }
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Corked<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        match this.mode {
            Mode::Through => Pin::new(&mut this.inner).poll_write(cx, buf),
            Mode::Gather => this.gather(cx, &[IoSlice::new(buf)]),
            Mode::Hold => this.poll_write_after_held(cx, &[IoSlice::new(buf)]),
        }
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        match this.mode {
            Mode::Through => Pin::new(&mut this.inner).poll_write_vectored(cx, bufs),
            Mode::Gather => this.gather(cx, bufs),
            Mode::Hold => this.poll_write_after_held(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    /// What is gathered or held stays (a flush ends tokio-rustls' handshake: that is the flush
    /// this stream is for).
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_release(cx))?;
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

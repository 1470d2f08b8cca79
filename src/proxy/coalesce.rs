//! Writes of an HTTP/2 connection gathered per turn of its task.
//!
//! The `h2` crate writes a DATA frame of 256 bytes or more as soon as it has queued it (it
//! chains the payload instead of copying it, and must write it before the next frame), so each
//! response of a multiplexed connection would cost its own TLS record and system call. Here
//! the connection's writes go to a buffer, and the future driving the connection writes the
//! buffer out once hyper has done all it could in that turn: the responses of the streams that
//! finished together leave in one record, as nginx's do.
//!
//! Memory stays bounded: past [`LIMIT`] buffered bytes, a write first drains the buffer to the
//! socket and waits for it like an ordinary write.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Buffered bytes beyond which writes wait for the socket.
pub const LIMIT: usize = 256 * 1024;

struct State<S> {
    io: S,
    out: Vec<u8>,
    /// A failed write, reported to hyper at its next write.
    failed: Option<io::Error>,
}

impl<S: AsyncWrite + Unpin> State<S> {
    /// Write the buffer out and flush; `Pending` when the socket is full (the task is woken
    /// when it is writable).
    fn drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.out.is_empty() {
            match ready!(Pin::new(&mut self.io).poll_write(cx, &self.out)) {
                Ok(0) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Ok(n) => {
                    self.out.drain(..n);
                }
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
        Pin::new(&mut self.io).poll_flush(cx)
    }
}

/// The I/O handed to hyper: reads go through, writes are buffered.
pub struct Io<S>(Arc<Mutex<State<S>>>);

/// Drives a connection future over an [`Io`], writing its buffer out after each turn.
pub struct Driver<F: Future, S> {
    conn: Pin<Box<F>>,
    state: Arc<Mutex<State<S>>>,
    /// The connection's end, held until its last bytes are out.
    finished: Option<F::Output>,
}

/// Wrap `io` for a connection built by `build`.
pub fn wrap<S, F: Future>(io: S, build: impl FnOnce(Io<S>) -> F) -> Driver<F, S> {
    let state = Arc::new(Mutex::new(State {
        io,
        out: Vec::with_capacity(16 * 1024),
        failed: None,
    }));
    Driver {
        conn: Box::pin(build(Io(state.clone()))),
        state,
        finished: None,
    }
}

fn lock<S>(state: &Mutex<State<S>>) -> MutexGuard<'_, State<S>> {
    state.lock().unwrap_or_else(|p| p.into_inner())
}

impl<F: Future, S> Driver<F, S> {
    /// The connection itself (e.g. for a graceful shutdown).
    pub fn conn(&mut self) -> Pin<&mut F> {
        self.conn.as_mut()
    }
}

impl<F: Future, S: AsyncWrite + Unpin> Future for Driver<F, S>
where
    F::Output: Unpin,
{
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = &mut *self;
        if this.finished.is_none() {
            if let Poll::Ready(r) = this.conn.as_mut().poll(cx) {
                this.finished = Some(r);
            }
        }
        let mut state = lock(&this.state);
        let drained = match state.drain(cx) {
            Poll::Ready(Ok(())) => true,
            Poll::Pending => false,
            Poll::Ready(Err(e)) => {
                // The connection learns of it at its next write; make sure there is a next
                // turn. Once it has ended, there is nobody left to tell.
                state.out.clear();
                if this.finished.is_none() {
                    state.failed = Some(e);
                    cx.waker().wake_by_ref();
                }
                true
            }
        };
        drop(state);
        match this.finished.take() {
            Some(r) if drained => Poll::Ready(r),
            other => {
                this.finished = other;
                Poll::Pending
            }
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Io<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut lock(&self.0).io).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> Io<S> {
    /// Room for more, or the error of an earlier write.
    fn ready(state: &mut State<S>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if let Some(e) = state.failed.take() {
            return Poll::Ready(Err(e));
        }
        if state.out.len() >= LIMIT {
            ready!(state.drain(cx))?;
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Io<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let mut state = lock(&self.0);
        ready!(Self::ready(&mut state, cx))?;
        state.out.extend_from_slice(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let mut state = lock(&self.0);
        ready!(Self::ready(&mut state, cx))?;
        let mut n = 0;
        for b in bufs {
            state.out.extend_from_slice(b);
            n += b.len();
        }
        Poll::Ready(Ok(n))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    /// Done by the driver after the turn; an earlier write's error is reported here too.
    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match lock(&self.0).failed.take() {
            Some(e) => Poll::Ready(Err(e)),
            None => Poll::Ready(Ok(())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut state = lock(&self.0);
        ready!(state.drain(cx))?;
        Pin::new(&mut state.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::future::poll_fn;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// A "connection" that writes `chunks` then ends, through an [`Io`].
    async fn writer(mut io: Io<tokio::io::DuplexStream>, chunks: Vec<Vec<u8>>) -> io::Result<()> {
        for c in chunks {
            io.write_all(&c).await?;
            io.flush().await?;
        }
        // As hyper does at the end of a connection.
        io.shutdown().await
    }

    #[tokio::test]
    async fn everything_written_arrives_in_order() {
        let (near, mut far) = tokio::io::duplex(1 << 20);
        let chunks: Vec<Vec<u8>> = (0..10u8).map(|i| vec![i; 1000]).collect();
        let expected: Vec<u8> = chunks.concat();
        wrap(near, |io| writer(io, chunks)).await.unwrap();
        let mut got = vec![0; expected.len()];
        far.read_exact(&mut got).await.unwrap();
        assert_eq!(got, expected);
    }

    #[tokio::test]
    async fn a_peer_that_does_not_read_holds_the_writer_at_the_limit() {
        // The peer's pipe takes 64 KiB; the writer wants to send 4 MiB.
        let (near, mut far) = tokio::io::duplex(64 * 1024);
        let chunks: Vec<Vec<u8>> = (0..256).map(|_| vec![7; 16 * 1024]).collect();
        let mut driver = wrap(near, |io| writer(io, chunks));
        for _ in 0..50 {
            let r = poll_fn(|cx| Poll::Ready(Pin::new(&mut driver).poll(cx))).await;
            assert!(r.is_pending(), "the writer cannot have finished");
            tokio::task::yield_now().await;
        }
        let buffered = lock(&driver.state).out.len();
        assert!(buffered <= LIMIT + 16 * 1024, "{buffered} bytes buffered");
        // Reading lets it finish, every byte in order.
        let reader = tokio::spawn(async move {
            let mut all = Vec::new();
            far.read_to_end(&mut all).await.unwrap();
            all
        });
        driver.await.unwrap();
        let all = reader.await.unwrap();
        assert_eq!(all.len(), 256 * 16 * 1024);
        assert!(all.iter().all(|b| *b == 7));
    }

    #[tokio::test]
    async fn a_failed_write_is_reported_to_the_connection() {
        let (near, far) = tokio::io::duplex(1024);
        drop(far);
        let chunks: Vec<Vec<u8>> = (0..4).map(|_| vec![1; 4096]).collect();
        let e = wrap(near, |io| writer(io, chunks)).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::BrokenPipe, "{e}");
    }
}

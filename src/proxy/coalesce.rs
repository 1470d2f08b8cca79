//! Writes of an HTTP/2 connection gathered per turn of its task, and its streams run in that
//! task.
//!
//! The `h2` crate writes a DATA frame of 256 bytes or more as soon as it has queued it (it
//! chains the payload instead of copying it, and must write it before the next frame), so each
//! response of a multiplexed connection would cost its own TLS record and system call. Here
//! the connection's writes go to a buffer, and the future driving the connection writes the
//! buffer out once hyper has done all it could in that turn and the worker's queue has had one
//! more pass (the tasks woken already run first, this connection's own turn again among them):
//! the responses of the streams whose answers came together leave in one record and one write,
//! as nginx's do, and the client is woken once for them.
//!
//! Memory stays bounded: past [`LIMIT`] buffered bytes, a write first drains the buffer to the
//! socket and waits for it like an ordinary write.
//!
//! hyper hands each stream's future (the request forwarded, its response sent; after an
//! upgrade, one direction's copy) to an executor: [`Streams`], the executor given to hyper
//! here, keeps them for the [`Driver`], which polls those that were woken, before and after the
//! connection, in each turn. A stream costs no task of its own (with tokio's executor: a spawn,
//! a task cell, its scheduling and wake-ups), and a connection's streams end with it: they are
//! dropped with the connection's task when it is cut (the proxy forced to stop, a deadline), and
//! the task of a connection that ends on its own waits for its streams to end (the proxy's
//! graceful stop, which waits for connection tasks, waits for them too). A stream that panics
//! takes its connection's task (and the connection's other streams) down with it.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, ready};

use futures_util::stream::{FuturesUnordered, StreamExt as _};

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

/// A stream's future, as hyper hands it over (a request and its response; or, after an
/// upgrade, the copy of one direction).
type Stream = Pin<Box<dyn Future<Output = ()> + Send>>;

/// The executor handed to hyper: keeps each stream's future for the [`Driver`] (see the
/// module's documentation). hyper calls it while the connection is polled, from the driver's
/// poll; a future handed over at another time would wait for the driver's next turn.
#[derive(Clone, Default)]
pub struct Streams(Arc<Mutex<Vec<Stream>>>);

impl<T: Future<Output = ()> + Send + 'static> hyper::rt::Executor<T> for Streams {
    fn execute(&self, stream: T) {
        lock(&self.0).push(Box::pin(stream));
    }
}

/// Drives a connection future over an [`Io`], and its streams, writing its buffer out after
/// each turn.
pub struct Driver<F: Future, S> {
    conn: Pin<Box<F>>,
    state: Arc<Mutex<State<S>>>,
    /// The connection's end, held until its last bytes are out and its streams have ended.
    finished: Option<F::Output>,
    /// Streams handed over by hyper and not yet polled.
    new: Streams,
    running: FuturesUnordered<Stream>,
    /// The buffer waited for a pass of the queue already (see `poll`).
    yielded: bool,
}

/// Wrap `io` for a connection built by `build`, whose streams are handed to `streams`.
pub fn wrap<S, F: Future>(io: S, streams: Streams, build: impl FnOnce(Io<S>) -> F) -> Driver<F, S> {
    let state = Arc::new(Mutex::new(State {
        io,
        out: Vec::with_capacity(16 * 1024),
        failed: None,
    }));
    Driver {
        conn: Box::pin(build(Io(state.clone()))),
        state,
        finished: None,
        new: streams,
        running: FuturesUnordered::new(),
        yielded: false,
    }
}

fn lock<T>(state: &Mutex<T>) -> MutexGuard<'_, T> {
    state.lock().unwrap_or_else(|p| p.into_inner())
}

impl<F: Future, S> Driver<F, S> {
    /// The connection itself (e.g. for a graceful shutdown).
    pub fn conn(&mut self) -> Pin<&mut F> {
        self.conn.as_mut()
    }

    /// Poll the streams that were woken (and those not polled yet) until none is ready. A stream
    /// can hand over another (hyper's copy of an upgraded stream's one direction): polled too.
    fn poll_streams(&mut self, cx: &mut Context<'_>) {
        loop {
            self.running.extend(lock(&self.new.0).drain(..));
            // FuturesUnordered yields (waking the task) after polling each of its futures once.
            while let Poll::Ready(Some(())) = self.running.poll_next_unpin(cx) {}
            if lock(&self.new.0).is_empty() {
                return;
            }
        }
    }
}

impl<F: Future, S: AsyncWrite + Unpin> Future for Driver<F, S>
where
    F::Output: Unpin,
{
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = &mut *self;
        // The streams first: the responses they send now are written by the connection below.
        this.poll_streams(cx);
        if this.finished.is_none() {
            if let Poll::Ready(r) = this.conn.as_mut().poll(cx) {
                this.finished = Some(r);
            }
            // Streams the connection took in this turn start now (their requests leave).
            this.poll_streams(cx);
        }
        let mut state = lock(&this.state);
        // What this turn wrote waits for one pass of the worker's queue: the tasks already
        // woken run first (this connection's other streams whose answers came in the same
        // batch of events among them), and their responses leave in the same write.
        if !state.out.is_empty() && !this.yielded {
            this.yielded = true;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        this.yielded = false;
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
            Some(r) if drained && this.running.is_empty() => Poll::Ready(r),
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
        wrap(near, Streams::default(), |io| writer(io, chunks))
            .await
            .unwrap();
        let mut got = vec![0; expected.len()];
        far.read_exact(&mut got).await.unwrap();
        assert_eq!(got, expected);
    }

    #[tokio::test]
    async fn a_peer_that_does_not_read_holds_the_writer_at_the_limit() {
        // The peer's pipe takes 64 KiB; the writer wants to send 4 MiB.
        let (near, mut far) = tokio::io::duplex(64 * 1024);
        let chunks: Vec<Vec<u8>> = (0..256).map(|_| vec![7; 16 * 1024]).collect();
        let mut driver = wrap(near, Streams::default(), |io| writer(io, chunks));
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
        let e = wrap(near, Streams::default(), |io| writer(io, chunks))
            .await
            .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::BrokenPipe, "{e}");
    }

    /// What a turn wrote leaves at the task's next turn, once the worker's queue has had a pass.
    #[tokio::test]
    async fn a_turns_writes_leave_at_the_next_turn() {
        let (near, mut far) = tokio::io::duplex(64 * 1024);
        let mut driver = wrap(near, Streams::default(), |mut io| async move {
            io.write_all(b"frames").await?;
            io.flush().await?;
            std::future::pending::<io::Result<()>>().await
        });
        let r = poll_fn(|cx| Poll::Ready(Pin::new(&mut driver).poll(cx))).await;
        assert!(r.is_pending());
        let mut buf = [0u8; 64];
        let read = poll_fn(|cx| {
            let mut rb = ReadBuf::new(&mut buf);
            Poll::Ready(
                Pin::new(&mut far)
                    .poll_read(cx, &mut rb)
                    .map_ok(|()| rb.filled().len()),
            )
        })
        .await;
        assert!(read.is_pending(), "written in the same turn: {read:?}");
        let r = poll_fn(|cx| Poll::Ready(Pin::new(&mut driver).poll(cx))).await;
        assert!(r.is_pending());
        let n = far.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"frames");
    }

    /// The streams hyper hands to [`Streams`] run in the driver's task, and a connection that
    /// ends waits for its streams to end.
    #[tokio::test]
    async fn streams_run_in_the_drivers_task_and_the_connection_waits_for_them() {
        let (near, _far) = tokio::io::duplex(64 * 1024);
        let streams = Streams::default();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let ran = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (spawner, counter) = (streams.clone(), ran.clone());
        let mut driver = wrap(near, streams, move |_io| async move {
            let c = counter.clone();
            hyper::rt::Executor::execute(&spawner, async move {
                c.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let _ = rx.await;
                c.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            });
            // The connection ends at once; its stream has not.
            Ok::<(), io::Error>(())
        });
        for _ in 0..3 {
            let r = poll_fn(|cx| Poll::Ready(Pin::new(&mut driver).poll(cx))).await;
            assert!(r.is_pending(), "the connection ended before its stream");
            tokio::task::yield_now().await;
        }
        assert_eq!(
            ran.load(std::sync::atomic::Ordering::SeqCst),
            1,
            "the stream was polled"
        );
        tx.send(()).unwrap();
        driver.await.unwrap();
        assert_eq!(ran.load(std::sync::atomic::Ordering::SeqCst), 2);
    }
}

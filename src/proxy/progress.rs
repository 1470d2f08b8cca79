//! Deadlines on progress: a body that yields nothing for its timeout ends with an error, and a
//! shared mark records when any body last moved (so that a wait for the application's answer
//! does not count the time a request body is still being sent).

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Frame, SizeHint};
use tokio::time::{Instant, Sleep};

use super::BoxError;

/// When something last moved, in milliseconds since `base`, and whether a body is still on
/// its way.
#[derive(Debug, Clone)]
pub struct Mark {
    base: Instant,
    last: Arc<AtomicU64>,
    open: Arc<std::sync::atomic::AtomicBool>,
}

impl Default for Mark {
    fn default() -> Self {
        Mark::new()
    }
}

impl Mark {
    pub fn new() -> Mark {
        Mark {
            base: Instant::now(),
            last: Arc::new(AtomicU64::new(0)),
            open: Arc::new(std::sync::atomic::AtomicBool::new(false)),
        }
    }

    /// A body that touches this mark is still being sent (its own deadline governs it).
    pub fn is_open(&self) -> bool {
        self.open.load(Ordering::Relaxed)
    }

    pub fn touch(&self) {
        let ms = self.base.elapsed().as_millis() as u64;
        self.last.store(ms, Ordering::Relaxed);
    }

    /// When something last moved.
    pub fn last(&self) -> Instant {
        self.base + Duration::from_millis(self.last.load(Ordering::Relaxed))
    }
}

/// The error a stalled body ends with.
#[derive(Debug, thiserror::Error)]
#[error("no progress for {timeout:?} ({what})")]
pub struct Stalled {
    pub timeout: Duration,
    pub what: &'static str,
}

/// `inner`, failing with [`Stalled`] when it yields nothing for `timeout`; each frame touches
/// `mark`.
pub struct Deadline<B> {
    inner: B,
    timeout: Duration,
    sleep: Pin<Box<Sleep>>,
    mark: Option<Mark>,
    what: &'static str,
    stalled: Arc<std::sync::atomic::AtomicBool>,
}

impl<B: hyper::body::Body> Deadline<B> {
    pub fn new(inner: B, timeout: Duration, mark: Option<Mark>, what: &'static str) -> Self {
        if let Some(mark) = &mark {
            mark.open.store(!inner.is_end_stream(), Ordering::Relaxed);
        }
        Deadline {
            inner,
            timeout,
            sleep: Box::pin(tokio::time::sleep(timeout)),
            mark,
            what,
            stalled: Arc::new(std::sync::atomic::AtomicBool::new(false)),
        }
    }

    /// Set once the body has stalled.
    pub fn stalled(&self) -> Arc<std::sync::atomic::AtomicBool> {
        self.stalled.clone()
    }
}

impl<B> hyper::body::Body for Deadline<B>
where
    B: hyper::body::Body<Data = Bytes, Error = BoxError> + Unpin,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                let deadline = Instant::now() + this.timeout;
                this.sleep.as_mut().reset(deadline);
                if let Some(mark) = &this.mark {
                    mark.touch();
                    if frame.is_none() || this.inner.is_end_stream() {
                        mark.open.store(false, Ordering::Relaxed);
                    }
                }
                Poll::Ready(frame)
            }
            Poll::Pending => match this.sleep.as_mut().poll(cx) {
                Poll::Ready(()) => {
                    this.stalled.store(true, Ordering::Relaxed);
                    Poll::Ready(Some(Err(Box::new(Stalled {
                        timeout: this.timeout,
                        what: this.what,
                    }))))
                }
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test(start_paused = true)]
    async fn a_body_that_keeps_moving_is_never_cut_and_one_that_stalls_is() {
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, BoxError>>(1);
        let stream = http_body_util::StreamBody::new(tokio_stream_wrapper(rx));
        let mark = Mark::new();
        let mut body = Deadline::new(stream, Duration::from_secs(5), Some(mark.clone()), "test");
        // Ten frames, 4 s apart: 40 s in all, never 5 s without one.
        let sender = tokio::spawn(async move {
            for _ in 0..10 {
                tokio::time::sleep(Duration::from_secs(4)).await;
                tx.send(Ok(Frame::data(Bytes::from_static(b"x"))))
                    .await
                    .unwrap();
            }
            // Then nothing.
            tokio::time::sleep(Duration::from_secs(3600)).await;
            drop(tx);
        });
        for _ in 0..10 {
            let frame = body.frame().await.unwrap().unwrap();
            assert_eq!(frame.into_data().unwrap(), Bytes::from_static(b"x"));
        }
        let err = body.frame().await.unwrap().unwrap_err();
        assert!(err.is::<Stalled>(), "{err}");
        assert!(mark.last() > Instant::now() - Duration::from_secs(6));
        sender.abort();
    }

    fn tokio_stream_wrapper(
        mut rx: tokio::sync::mpsc::Receiver<Result<Frame<Bytes>, BoxError>>,
    ) -> impl futures_util::Stream<Item = Result<Frame<Bytes>, BoxError>> {
        futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
    }
}

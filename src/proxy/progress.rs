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
    state: Arc<MarkState>,
}

#[derive(Debug, Default)]
struct MarkState {
    last: AtomicU64,
    open: std::sync::atomic::AtomicBool,
    /// Told when the body ends (see [`Mark::ended`]).
    ended: tokio::sync::Notify,
}

impl Default for Mark {
    fn default() -> Self {
        Mark::new()
    }
}

impl Mark {
    pub fn new() -> Mark {
        Mark {
            base: super::clock::tokio_now(),
            state: Arc::default(),
        }
    }

    /// A body that touches this mark is still being sent (its own deadline governs it).
    pub fn is_open(&self) -> bool {
        self.state.open.load(Ordering::Relaxed)
    }

    pub fn touch(&self) {
        let ms = super::clock::tokio_now()
            .saturating_duration_since(self.base)
            .as_millis() as u64;
        self.state.last.store(ms, Ordering::Relaxed);
    }

    /// Done when the body that touches this mark has ended (at once if it has already).
    pub async fn ended(&self) {
        if self.is_open() {
            self.state.ended.notified().await;
        }
    }

    /// When something last moved.
    pub fn last(&self) -> Instant {
        self.base + Duration::from_millis(self.state.last.load(Ordering::Relaxed))
    }
}

/// The error a stalled body ends with.
#[derive(Debug, thiserror::Error)]
#[error("no progress for {timeout:?} ({what})")]
pub struct Stalled {
    pub timeout: Duration,
    pub what: &'static str,
}

/// A floor on a body's average rate: past `grace`, each second must have brought `per_second`
/// bytes on average (Apache's `mod_reqtimeout` MinRate): a body trickled a byte at a time just
/// within the progress deadline does not hold its connection to the application for ever.
#[derive(Debug, Clone, Copy)]
struct Rate {
    since: Instant,
    grace: Duration,
    per_second: u64,
}

/// `inner`, failing with [`Stalled`] when it yields nothing for `timeout` (or, with
/// [`Deadline::with_min_rate`], when it falls below its average rate); each frame touches
/// `mark`.
pub struct Deadline<B> {
    inner: B,
    timeout: Duration,
    /// Made the first time the body has nothing ready: most bodies never wait (a response
    /// already read whole), and a timer costs an allocation.
    sleep: Option<Pin<Box<Sleep>>>,
    /// The last progress (the timer is re-armed from it only when it fires or is polled while
    /// pending: not on every frame).
    last: Instant,
    rate: Option<Rate>,
    received: u64,
    mark: Option<Mark>,
    what: &'static str,
    /// Set once the body has stalled (see [`Deadline::reporting_to`]).
    stalled: Option<Arc<std::sync::atomic::AtomicBool>>,
}

impl<B: hyper::body::Body> Deadline<B> {
    pub fn new(inner: B, timeout: Duration, mark: Option<Mark>, what: &'static str) -> Self {
        if let Some(mark) = &mark {
            mark.state
                .open
                .store(!inner.is_end_stream(), Ordering::Relaxed);
        }
        Deadline {
            inner,
            timeout,
            sleep: None,
            last: super::clock::tokio_now(),
            rate: None,
            received: 0,
            mark,
            what,
            stalled: None,
        }
    }

    /// Past `grace`, the body must average `per_second` bytes a second (0: no floor).
    pub fn with_min_rate(mut self, grace: Duration, per_second: u64) -> Self {
        if per_second > 0 {
            self.rate = Some(Rate {
                since: super::clock::tokio_now(),
                grace,
                per_second,
            });
        }
        self
    }

    /// Sets `flag` once the body has stalled.
    pub fn reporting_to(mut self, flag: Arc<std::sync::atomic::AtomicBool>) -> Self {
        self.stalled = Some(flag);
        self
    }

    /// When the body fails if nothing more comes.
    fn due(&self) -> Instant {
        let progress = self.last + self.timeout;
        match self.rate {
            Some(r) => {
                let earned =
                    Duration::from_millis(self.received.saturating_mul(1000) / r.per_second);
                progress.min(r.since + r.grace + earned)
            }
            None => progress,
        }
    }
}

impl<B> hyper::body::Body for Deadline<B>
where
    B: hyper::body::Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
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
                this.last = super::clock::tokio_now();
                if let Some(Ok(data)) = frame.as_ref().map(|f| f.as_ref().map(Frame::data_ref)) {
                    this.received += data.map_or(0, |d| d.len() as u64);
                }
                if let Some(mark) = &this.mark {
                    mark.touch();
                    if (frame.is_none() || this.inner.is_end_stream())
                        && mark.state.open.swap(false, Ordering::Relaxed)
                    {
                        mark.state.ended.notify_one();
                    }
                }
                Poll::Ready(frame.map(|f| f.map_err(Into::into)))
            }
            Poll::Pending => {
                let due = this.due();
                let sleep = this
                    .sleep
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(due)));
                if sleep.deadline() != due {
                    sleep.as_mut().reset(due);
                }
                match sleep.as_mut().poll(cx) {
                    Poll::Ready(()) => {
                        if let Some(stalled) = &this.stalled {
                            stalled.store(true, Ordering::Relaxed);
                        }
                        Poll::Ready(Some(Err(Box::new(Stalled {
                            timeout: this.timeout,
                            what: this.what,
                        }))))
                    }
                    Poll::Pending => Poll::Pending,
                }
            }
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

    #[tokio::test(start_paused = true)]
    async fn a_trickle_below_the_minimum_rate_is_cut_after_the_grace() {
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, BoxError>>(1);
        let stream = http_body_util::StreamBody::new(tokio_stream_wrapper(rx));
        // A byte every 2 s (within the 5 s progress deadline), at least 100 B/s past 10 s.
        let mut body = Deadline::new(stream, Duration::from_secs(5), None, "test")
            .with_min_rate(Duration::from_secs(10), 100);
        let started = Instant::now();
        let sender = tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(2)).await;
                if tx
                    .send(Ok(Frame::data(Bytes::from_static(b"x"))))
                    .await
                    .is_err()
                {
                    return;
                }
            }
        });
        let err = loop {
            match body.frame().await.unwrap() {
                Ok(_) => continue,
                Err(e) => break e,
            }
        };
        assert!(err.is::<Stalled>(), "{err}");
        let took = started.elapsed();
        assert!(
            took >= Duration::from_secs(10) && took < Duration::from_secs(11),
            "{took:?}"
        );
        sender.abort();
        // A fast body is never cut by the floor.
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, BoxError>>(1);
        let stream = http_body_util::StreamBody::new(tokio_stream_wrapper(rx));
        let mut body = Deadline::new(stream, Duration::from_secs(5), None, "test")
            .with_min_rate(Duration::from_secs(10), 100);
        tokio::spawn(async move {
            for _ in 0..30 {
                tokio::time::sleep(Duration::from_secs(1)).await;
                tx.send(Ok(Frame::data(Bytes::from(vec![0u8; 200]))))
                    .await
                    .unwrap();
            }
        });
        for _ in 0..30 {
            body.frame().await.unwrap().unwrap();
        }
        assert!(body.frame().await.is_none());
    }

    fn tokio_stream_wrapper(
        mut rx: tokio::sync::mpsc::Receiver<Result<Frame<Bytes>, BoxError>>,
    ) -> impl futures_util::Stream<Item = Result<Frame<Bytes>, BoxError>> {
        futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
    }
}

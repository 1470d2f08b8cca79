//! The body of a request of the application's, as the proxy reads it.
//!
//! hyper closes a connection whose request body was left unread when the answer is sent, under a
//! client that may still be writing the body: the client then reports a broken pipe, not the
//! answer (seen with the docker CLI, refused a `network connect` before its body was read). So
//! what no one read of a body when it is dropped (a refusal decided before the body, an engine
//! that answered before taking all of it) is read to its end in the background and thrown away:
//! the client gets the answer as the reason, and its connection goes on. Bounded: up to `limit`
//! bytes of the body in all, and `idle` between two pieces, after which the rest is let go and
//! hyper closes the connection. A client that asked to be told before it sends the body
//! (`Expect: 100-continue`) is not asked for it.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, Incoming, SizeHint};

/// How much of a body left unread is read and thrown away.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Drain {
    /// Bytes of the body in all, read before or after.
    pub limit: u64,
    /// Between two pieces.
    pub idle: Duration,
}

/// A request body that, dropped before its end, has the rest read and thrown away (see the
/// module).
pub(crate) struct RequestBody {
    inner: Option<Incoming>,
    read: u64,
    ended: bool,
    drain: Option<Drain>,
}

impl RequestBody {
    /// `drain` is `None` for a body that must not be asked for (`Expect: 100-continue`).
    pub(crate) fn new(inner: Incoming, drain: Option<Drain>) -> Self {
        RequestBody {
            inner: Some(inner),
            read: 0,
            ended: false,
            drain,
        }
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let Some(inner) = self.inner.as_mut() else {
            return Poll::Ready(None);
        };
        let polled = Pin::new(inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    self.read += data.len() as u64;
                }
            }
            Poll::Ready(None) => self.ended = true,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.ended || self.inner.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), Body::size_hint)
    }
}

impl Drop for RequestBody {
    fn drop(&mut self) {
        if self.is_end_stream() {
            return;
        }
        let (Some(mut body), Some(drain)) = (self.inner.take(), self.drain) else {
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let mut read = self.read;
        runtime.spawn(async move {
            while read <= drain.limit {
                match tokio::time::timeout(drain.idle, body.frame()).await {
                    Ok(Some(Ok(frame))) => {
                        if let Some(data) = frame.data_ref() {
                            read += data.len() as u64;
                        }
                    }
                    _ => break,
                }
            }
        });
    }
}

//! Request bodies left unread: read to their end in the background and thrown away.
//!
//! hyper closes a connection whose request body was left unread when the answer is sent, under a
//! client that may still be writing the body: the client then reports a broken pipe, or a reset
//! stream over HTTP/2, not the answer (seen with the docker CLI refused a `network connect`
//! before its body was read, with curl posting to a redirect or a 503). So what no one read of a
//! body when it is dropped (an answer made before the body was needed, an application or engine
//! that answered before taking all of it) is read and thrown away by a task of its own: the
//! client gets the answer as the reason, and its connection goes on, as nginx discards a body it
//! does not need. Bounded by [`Drain`], after which the rest is let go and hyper closes the
//! connection (HTTP/1.1) or resets the stream (HTTP/2). Not drained: a body whose client asked to
//! be told before sending it (`Expect: 100-continue`) and was not asked (hyper asks, with a `100
//! Continue`, when the body is first read), one that failed, and one whose `cut` flag is set
//! (see [`RequestBody::unless`]).

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::header::{EXPECT, HeaderMap};

/// How much of a body left unread is read and thrown away.
#[derive(Clone, Copy, Debug)]
pub struct Drain {
    /// Bytes of the body in all, read before it was dropped or after.
    pub limit: u64,
    /// The longest the draining goes on, from the drop (nginx's `lingering_time`).
    pub within: Duration,
}

/// A request body that, dropped before its end, has the rest read and thrown away (see the
/// module).
pub struct RequestBody {
    inner: Option<Incoming>,
    read: u64,
    /// Polled to its end, or failed: nothing to drain.
    done: bool,
    /// The client waits to be asked for the body (`Expect: 100-continue`), and has not been.
    unasked: bool,
    drain: Option<Drain>,
    cut: Option<Arc<AtomicBool>>,
}

impl RequestBody {
    /// A request's body; `drain` is `None` for one whose rest must not be read (a request after
    /// which nothing of the connection is read), `unasked` says its client waits to be asked for
    /// it (see [`waits_to_be_asked`]).
    pub fn new(inner: Incoming, drain: Option<Drain>, unasked: bool) -> Self {
        RequestBody {
            inner: Some(inner),
            read: 0,
            done: false,
            unasked,
            drain,
            cut: None,
        }
    }

    /// Not drained when dropped: its client stopped sending it.
    pub fn abandon(&mut self) {
        self.drain = None;
    }

    /// Not drained if `cut` is set when the body is dropped: it was cut for coming too slowly,
    /// and its client gets no more time.
    pub fn unless(&mut self, cut: Arc<AtomicBool>) {
        self.cut = Some(cut);
    }
}

/// Whether the client of a request with `headers` waits to be asked for its body (`Expect:
/// 100-continue`): in any of its `Expect` fields, whichever hyper reads (the last: an
/// attacker's, with `Expect: x` before, had its next request read as this body).
pub fn waits_to_be_asked(headers: &HeaderMap) -> bool {
    headers
        .get_all(EXPECT)
        .iter()
        .any(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"))
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        self.unasked = false;
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
            Poll::Ready(_) => self.done = true,
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.done || self.inner.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), Body::size_hint)
    }
}

impl Drop for RequestBody {
    fn drop(&mut self) {
        let Some(drain) = self.drain else {
            return;
        };
        if self.done || self.unasked || self.cut.as_ref().is_some_and(|c| c.load(Ordering::Relaxed))
        {
            return;
        }
        let Some(body) = self.inner.take().filter(|b| !b.is_end_stream()) else {
            return;
        };
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(discard(body, self.read, drain));
        }
    }
}

/// Read `body` (`read` bytes of it read already) and drop what comes, within `drain`.
async fn discard(mut body: Incoming, mut read: u64, drain: Drain) {
    let until = tokio::time::Instant::now() + drain.within;
    while read <= drain.limit {
        match tokio::time::timeout_at(until, body.frame()).await {
            Ok(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    read += data.len() as u64;
                }
            }
            _ => break,
        }
    }
}

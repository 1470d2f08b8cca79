//! The connections to the application: HTTP/1.1 with keep-alive, one pool per worker thread,
//! spoken by a client of regobox's own.
//!
//! A connection has no task of its own: whoever uses it drives it. The request's task writes the
//! request and reads the response on the connection's socket, within one task, as nginx's event
//! loop does within one handler; an idle connection costs a socket and nothing else (no task, no
//! buffer).
//!
//! What the application answers is read as untrusted input, into regobox's own model of a
//! response: a status from 100 to 599 (interim ones skipped, 101 only to an upgrade that was
//! asked for), fields that are valid names and values, and one framing: no body (HEAD, 204,
//! 304), one `Content-Length` (repeated only with the same value), `Transfer-Encoding: chunked`
//! alone, or (HTTP/1.0 style) until the connection closes. Both `Content-Length` and
//! `Transfer-Encoding`, a coding other than `chunked`, an obsolete line folding, a head over
//! [`MAX_RESPONSE_HEAD`] or a malformed chunk are refused: the response is an error (502 when
//! nothing of it went to the client yet), and its connection is closed. Trailers are read and
//! dropped, as nginx's `proxy_pass` drops them.
//!
//! A connection goes back to its worker's pool when the response it carried has been read to
//! the end, the request was written whole, the application did not say `Connection: close` (or
//! answer HTTP/1.0), and nothing came after the response: bytes nobody asked for (an answer the
//! application sent twice, say) close the connection rather than wait for the next request to
//! take them for its own. The pool keeps up to `proxy.upstream_keepalive` idle connections, and as
//! many again opened at a peak for [`SURPLUS_GRACE`] after their last use; beyond, after
//! [`IDLE_TIMEOUT`] unused, or once the application closed them or wrote on them while idle (seen
//! when taken, and at the worker's tick), they are closed. A request that finds
//! its pooled connection closed by the application (which may close idle connections at any
//! time) is sent again, once and on a new connection, when nothing of it can have been acted
//! upon: its head was not written whole, or it has no body, an idempotent method and no byte of
//! an answer came. A connection whose answer came before its request was written whole is not
//! used again (the application may take the rest for another request). Upgrades (101) keep
//! their connection: it becomes the tunnel.

use std::borrow::Cow;
use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use hyper::body::{Body as _, Frame, SizeHint};
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Method, Request, Response, StatusCode, Version};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use super::{Body, BoxError};

/// The largest response head taken from the application (status line and fields), in bytes;
/// also the largest trailer section of a chunked response.
pub const MAX_RESPONSE_HEAD: usize = 64 * 1024;
/// Fields in a response head: bounded by the size above rather than by a count of its own.
const MAX_RESPONSE_FIELDS: usize = MAX_RESPONSE_HEAD / 16;
/// Fields parsed without a heap array; a head with more is parsed again with room for
/// [`MAX_RESPONSE_FIELDS`].
const FIELDS_ON_STACK: usize = 64;
/// Interim (1xx) responses taken before the final one.
const MAX_INTERIM: usize = 16;
/// The longest chunk-size line (the size and its extensions), in bytes.
const MAX_CHUNK_LINE: usize = 4096;
/// What a read of the application's socket asks for at first; doubled while reads fill it, up
/// to [`READ_MAX`].
const READ_MIN: usize = 8 * 1024;
const READ_MAX: usize = 256 * 1024;

/// Response bodies cut for what the application sent: logged at most once per interval.
static BAD_BODIES: super::forward::RateLimit = super::forward::RateLimit::new();

/// An idle connection unused for this long is closed (nginx's upstream `keepalive_timeout`).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// The idle connections beyond `proxy.upstream_keepalive` (as many again at most) are closed once
/// unused this long (the least recently used first), not as soon as they come back: a load whose
/// requests in flight go up and down across the number would otherwise close a connection and
/// open another at every swing (a connection to the application made and closed every 50
/// requests of 320 in flight: about 5 % of regobox's CPU a request; haproxy's `pool-purge-delay`
/// is the same idea). Bounded per worker, as the pool is: each worker's pool with a surplus as
/// large as the caps on requests (`proxy.upstream_max`) would let bursts taking turns between
/// workers hold that many connections per worker (an attacker's finding).
pub const SURPLUS_GRACE: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("connecting to {addr}: {source}")]
    Connect { addr: String, source: io::Error },
    #[error("connecting to {addr}: no answer within {timeout:?} (proxy.upstream_connect_timeout)")]
    ConnectTimeout { addr: String, timeout: Duration },
    #[error("HTTP/1.1 with {addr}: {source}")]
    Io { addr: String, source: io::Error },
    #[error("HTTP/1.1 with {addr}: {what}")]
    Protocol {
        addr: String,
        what: Cow<'static, str>,
    },
    #[error("HTTP/1.1 with {addr}: the connection closed {when}")]
    Closed { addr: String, when: &'static str },
    #[error("the request's body: {0}")]
    RequestBody(BoxError),
    #[error("the request cannot be written: {0}")]
    Request(&'static str),
}

/// One worker's connections to the application.
pub struct Pool {
    host: String,
    port: u16,
    connect_timeout: Duration,
    keepalive: usize,
    /// Most recently used last.
    idle: Mutex<Vec<Idle>>,
}

struct Idle {
    conn: Conn,
    since: Instant,
}

/// One connection to the application.
struct Conn {
    io: TcpStream,
    /// What was read and not yet taken: a response's head, its body's next bytes. Empty, with no
    /// allocation, while the connection is idle.
    buf: BytesMut,
    /// How much the next read asks for.
    want: usize,
    /// The request still being written (its body may go on after the response's head came).
    out: Option<Box<Outgoing>>,
    /// The request could not be written whole: the connection carries no other.
    spoiled: bool,
}

/// How a request's body is framed on the connection.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Framing {
    Empty,
    Length(u64),
    Chunked,
}

/// The part of a request not yet written: its head, then bytes of its body ready to go, and the
/// body they come from.
struct Outgoing {
    head: Vec<u8>,
    /// How much of the head is written.
    head_written: usize,
    ready: VecDeque<Bytes>,
    body: Option<Body>,
    framing: Framing,
    /// Body bytes taken so far (checked against a `Content-Length`).
    taken: u64,
}

impl Outgoing {
    fn done(&self) -> bool {
        self.head_written == self.head.len() && self.ready.is_empty() && self.body.is_none()
    }

    /// Nothing of the request can have reached the application whole: its head is not all
    /// written (and so nothing of its body was taken either).
    fn unsent(&self) -> bool {
        self.head_written < self.head.len()
    }
}

/// What the request asks of its answer.
struct Ask {
    upgrade: bool,
    is_head: bool,
    idempotent: bool,
}

/// What an exchange has read so far.
#[derive(Default)]
struct Seen {
    /// A byte of an answer (the application has acted upon the request).
    answered: bool,
    interim: usize,
    /// How much of the buffer was searched for the head's end.
    scanned: usize,
}

/// What a failed exchange leaves: the error, and whether the request can be sent again on
/// another connection (nothing of it can have been acted upon).
struct Failure {
    error: Error,
    again: bool,
}

/// The final response's head, read.
struct Head {
    status: StatusCode,
    headers: HeaderMap,
    body: Decoder,
    /// The application lets the connection carry another request after this one.
    keep_alive: bool,
}

/// How the response's body is read.
#[derive(Debug, PartialEq, Eq)]
enum Decoder {
    /// Read to its end (or none at all).
    Done,
    Length(u64),
    Chunked(Chunk),
    /// Until the application closes the connection.
    Close,
}

#[derive(Debug, PartialEq, Eq)]
enum Chunk {
    /// At a chunk-size line.
    Size,
    Data(u64),
    /// At the CRLF after a chunk's data.
    DataEnd,
    /// In the trailer section, `n` bytes of it read.
    Trailers(usize),
}

impl Conn {
    fn new(io: TcpStream) -> Conn {
        Conn {
            io,
            buf: BytesMut::new(),
            want: READ_MIN,
            out: None,
            spoiled: false,
        }
    }

    /// The request could not be written whole: never pooled.
    fn spoil(&mut self) {
        self.out = None;
        self.spoiled = true;
    }

    /// Still open with nothing to read: the application has neither closed the connection nor
    /// written on it since its last answer, as the kernel says now (a peek that does not wait:
    /// one system call). What tokio knows of the socket is what the worker's I/O driver last
    /// read from epoll, which a busy worker turns only every so many tasks: a close or bytes
    /// since then would go unseen, and a request go out on a closed connection, or bytes
    /// written while idle be taken for its answer. For taking a connection.
    fn quiet_now(&self) -> bool {
        let mut probe = [std::mem::MaybeUninit::<u8>::uninit(); 1];
        matches!(socket2::SockRef::from(&self.io).peek(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
    }

    /// [`Conn::quiet_now`] as tokio last knew it: no system call unless the socket became
    /// readable since the last read that drained it. For the sweep of idle connections, where
    /// what a later turn of the driver shows is seen at the next sweep (or at the take).
    fn quiet(&self) -> bool {
        let mut probe = [0u8; 1];
        matches!(self.io.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
    }

    /// Read more into `buf`: the number of bytes (0: the application closed the connection).
    /// Through `AsyncRead`, which takes a read that did not fill the room for the socket's
    /// being drained (epoll is edge-triggered): the sweep's [`Conn::quiet`] then costs no system
    /// call unless something came since (`try_read_buf` would leave the socket marked readable).
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.buf.capacity() - self.buf.len() < self.want / 2 {
            self.buf.reserve(self.want);
        }
        let room = self.buf.capacity() - self.buf.len();
        let n = ready!(tokio_util::io::poll_read_buf(
            Pin::new(&mut self.io),
            cx,
            &mut self.buf
        ))?;
        if n == room && self.want < READ_MAX {
            self.want *= 2;
        }
        Poll::Ready(Ok(n))
    }

    /// Write what can be written of the request now, taking its body's frames as they come.
    /// Ready once it is all written (or there is none).
    fn poll_push(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), PushError>> {
        let Some(out) = self.out.as_mut() else {
            return Poll::Ready(Ok(()));
        };
        while !out.done() {
            if out.head_written < out.head.len() || !out.ready.is_empty() {
                let mut slices = [IoSlice::new(&[]); 8];
                let mut n = 0;
                if out.head_written < out.head.len() {
                    slices[0] = IoSlice::new(&out.head[out.head_written..]);
                    n = 1;
                }
                for b in out.ready.iter().take(slices.len() - n) {
                    slices[n] = IoSlice::new(b);
                    n += 1;
                }
                let tried = if n == 1 {
                    self.io.try_write(&slices[0])
                } else {
                    self.io.try_write_vectored(&slices[..n])
                };
                let mut written = match tried {
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        match self.io.poll_write_ready(cx) {
                            Poll::Ready(Ok(())) => continue,
                            Poll::Ready(Err(e)) => return Poll::Ready(Err(PushError::Io(e))),
                            Poll::Pending => return Poll::Pending,
                        }
                    }
                    Err(e) => return Poll::Ready(Err(PushError::Io(e))),
                };
                let of_head = written.min(out.head.len() - out.head_written);
                out.head_written += of_head;
                written -= of_head;
                while written > 0 {
                    let first = out.ready.front_mut().expect("written bytes were queued");
                    if first.len() <= written {
                        written -= first.len();
                        out.ready.pop_front();
                    } else {
                        first.advance(written);
                        written = 0;
                    }
                }
                continue;
            }
            let Some(body) = out.body.as_mut() else {
                break;
            };
            match Pin::new(body).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Err(e))) => {
                    out.body = None;
                    return Poll::Ready(Err(PushError::Body(e)));
                }
                Poll::Ready(Some(Ok(frame))) => {
                    // Trailers of the client's are not passed on (nor were they by hyper's
                    // client without the application asking for them).
                    let Ok(data) = frame.into_data() else {
                        continue;
                    };
                    if data.is_empty() {
                        continue;
                    }
                    out.taken += data.len() as u64;
                    match out.framing {
                        Framing::Length(n) if out.taken > n => {
                            out.body = None;
                            return Poll::Ready(Err(PushError::Body(
                                "more bytes than its Content-Length".into(),
                            )));
                        }
                        Framing::Chunked => {
                            out.ready
                                .push_back(Bytes::from(format!("{:x}\r\n", data.len())));
                            out.ready.push_back(data);
                            out.ready.push_back(Bytes::from_static(b"\r\n"));
                        }
                        _ => out.ready.push_back(data),
                    }
                }
                Poll::Ready(None) => {
                    out.body = None;
                    match out.framing {
                        Framing::Length(n) if out.taken != n => {
                            return Poll::Ready(Err(PushError::Body(
                                "fewer bytes than its Content-Length".into(),
                            )));
                        }
                        Framing::Chunked => {
                            out.ready.push_back(Bytes::from_static(b"0\r\n\r\n"));
                        }
                        _ => {}
                    }
                }
            }
        }
        Poll::Ready(Ok(()))
    }

    /// The request is written whole (or there was none).
    fn written(&self) -> bool {
        !self.spoiled && self.out.as_ref().is_none_or(|o| o.done())
    }
}

enum PushError {
    Io(io::Error),
    Body(BoxError),
}

impl Pool {
    /// `upstream` is `http://host[:port]` (checked by the configuration).
    pub fn new(upstream: &hyper::Uri, connect_timeout: Duration, keepalive: usize) -> Arc<Pool> {
        let host = upstream.host().unwrap_or("127.0.0.1");
        // An IPv6 literal comes bracketed.
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        Arc::new(Pool {
            host,
            port: upstream.port_u16().unwrap_or(80),
            connect_timeout,
            keepalive,
            idle: Mutex::new(Vec::new()),
        })
    }

    fn addr(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    fn protocol(&self, what: impl Into<Cow<'static, str>>) -> Error {
        Error::Protocol {
            addr: self.addr(),
            what: what.into(),
        }
    }

    /// Send `req` on a pooled connection, or a new one, and read its response's head. The
    /// request's target is its URI's path and query; its fields go as they are but for the
    /// framing, which is the client's own: `Content-Length` when the request has one or its
    /// body's size is known, else `Transfer-Encoding: chunked` (a `Transfer-Encoding` field of
    /// the request's is not written). The fields regobox `added` follow the request's own.
    pub async fn send(
        self: &Arc<Self>,
        req: Request<Body>,
        added: &[u8],
    ) -> Result<Response<Pooled>, Error> {
        let (parts, body) = req.into_parts();
        let (mut head, framing) = request_head(&parts, added, &body).map_err(Error::Request)?;
        let ask = Ask {
            upgrade: parts.headers.contains_key(header::UPGRADE),
            is_head: parts.method == Method::HEAD,
            // Sent again after the application closed the connection without answering: only
            // what may be (RFC 9110 9.2.2), and only without a body (which cannot be read twice).
            idempotent: framing == Framing::Empty
                && matches!(
                    parts.method,
                    Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE
                ),
        };
        let mut body = (framing != Framing::Empty).then_some(body);
        // Sent again at most once, and then on a new connection: an application that closes
        // every connection a request comes on gets it twice, not once per pooled connection.
        let mut again = false;
        loop {
            let (mut conn, reused) = match self.take().filter(|_| !again) {
                Some(c) => (c, true),
                // Boxed: rare next to reuse, and it would make every request's future larger.
                None => (Box::pin(self.connect()).await?, false),
            };
            conn.out = Some(Box::new(Outgoing {
                head,
                head_written: 0,
                ready: VecDeque::new(),
                body: body.take(),
                framing,
                taken: 0,
            }));
            let mut seen = Seen::default();
            let result =
                std::future::poll_fn(|cx| self.poll_head(&mut conn, cx, &ask, &mut seen)).await;
            match result {
                Ok(head) => return Ok(self.response(conn, head)),
                // Nothing of it can have been acted upon: on another connection. (A body is
                // only taken from once its head is written whole.)
                Err(Failure { again: true, .. }) if reused => {
                    let Some(out) = conn.out.take() else {
                        return Err(Error::Request("a request to send again was lost"));
                    };
                    head = out.head;
                    body = out.body;
                    again = true;
                }
                Err(failure) => return Err(failure.error),
            }
        }
    }

    /// Write the request, read the final response's head (interim ones are skipped).
    fn poll_head(
        &self,
        conn: &mut Conn,
        cx: &mut Context<'_>,
        ask: &Ask,
        seen: &mut Seen,
    ) -> Poll<Result<Head, Failure>> {
        loop {
            seen.answered |= !conn.buf.is_empty();
            let answered = seen.answered;
            if let Poll::Ready(Err(e)) = conn.poll_push(cx) {
                let unsent = conn.out.as_ref().is_some_and(|o| o.unsent());
                match e {
                    PushError::Body(e) => {
                        return Poll::Ready(Err(Failure {
                            error: Error::RequestBody(e),
                            again: false,
                        }));
                    }
                    // A write that fails because the application closed the connection may
                    // have an answer before it (a 413, say), read already or still in the
                    // socket: it is read, and if none comes, the close is the failure.
                    PushError::Io(_) if !unsent => conn.spoil(),
                    PushError::Io(source) => {
                        return Poll::Ready(Err(Failure {
                            error: Error::Io {
                                addr: self.addr(),
                                source,
                            },
                            again: unsent && !answered,
                        }));
                    }
                }
            }
            // Parsed once a blank line has come (where httparse ends a head: `\n\n` or
            // `\n\r\n`), found by a scan that resumes where it stopped: a head dribbled a
            // byte at a time costs no more than one sent at once.
            let from = seen.scanned.saturating_sub(2);
            let blank = has_blank_line(&conn.buf[from..]);
            seen.scanned = conn.buf.len();
            if !blank && conn.buf.len() >= MAX_RESPONSE_HEAD {
                return Poll::Ready(Err(Failure {
                    error: self.protocol(format!("a response head over {MAX_RESPONSE_HEAD} bytes")),
                    again: false,
                }));
            }
            if blank {
                let parsed = parse_head(&mut conn.buf, ask.is_head);
                if matches!(parsed, Ok(Some(_))) {
                    seen.scanned = 0;
                }
                match parsed {
                    Err(what) => {
                        return Poll::Ready(Err(Failure {
                            error: self.protocol(what),
                            again: false,
                        }));
                    }
                    Ok(Some(head)) if head.status == StatusCode::SWITCHING_PROTOCOLS => {
                        // To an upgrade asked for, once the request is written whole; or a 101
                        // nobody asked for, which the caller refuses. Either way the connection
                        // carries nothing else.
                        if ask.upgrade && !conn.written() {
                            return Poll::Ready(Err(Failure {
                                error: self.protocol("101 before the request was written whole"),
                                again: false,
                            }));
                        }
                        return Poll::Ready(Ok(head));
                    }
                    Ok(Some(head)) if head.status.is_informational() => {
                        seen.interim += 1;
                        if seen.interim > MAX_INTERIM {
                            return Poll::Ready(Err(Failure {
                                error: self.protocol(format!(
                                    "more than {MAX_INTERIM} interim (1xx) responses"
                                )),
                                again: false,
                            }));
                        }
                        continue;
                    }
                    Ok(Some(head)) => {
                        // A chunked body's first chunk-size line, when it came with the head,
                        // is read now: a malformed one is then a 502 rather than a response
                        // cut before its first byte.
                        if head.body == Decoder::Chunked(Chunk::Size)
                            && let Err(what) = chunk_line(&conn.buf, &mut 0)
                        {
                            return Poll::Ready(Err(Failure {
                                error: self.protocol(what),
                                again: false,
                            }));
                        }
                        return Poll::Ready(Ok(head));
                    }
                    Ok(None) => {}
                }
            }
            let unsent = conn.out.as_ref().is_some_and(|o| o.unsent());
            // Closed (or reset) before a byte of an answer: the application may have closed
            // the connection as the request went out.
            let closed_early = !answered && (unsent || ask.idempotent);
            match ready!(conn.poll_fill(cx)) {
                Ok(0) => {
                    return Poll::Ready(Err(Failure {
                        error: Error::Closed {
                            addr: self.addr(),
                            when: if !conn.buf.is_empty() {
                                "in the middle of a response's head"
                            } else if answered {
                                "after an interim (1xx) answer"
                            } else {
                                "before an answer"
                            },
                        },
                        again: closed_early,
                    }));
                }
                Ok(_) => {}
                Err(source) => {
                    let reset = source.kind() == io::ErrorKind::ConnectionReset;
                    return Poll::Ready(Err(Failure {
                        error: Error::Io {
                            addr: self.addr(),
                            source,
                        },
                        again: closed_early && (reset || unsent),
                    }));
                }
            }
        }
    }

    fn response(self: &Arc<Self>, mut conn: Conn, mut head: Head) -> Response<Pooled> {
        if conn.written() {
            conn.out = None;
        } else {
            // Answered before the request was written whole: the application may not have
            // read the rest as this request's body (it may take it for another request, and
            // answer that too): the connection is not used again.
            head.keep_alive = false;
        }
        let mut response = Response::new(());
        *response.status_mut() = head.status;
        *response.version_mut() = Version::HTTP_11;
        *response.headers_mut() = head.headers;
        let (parts, ()) = response.into_parts();
        let body = if parts.status == StatusCode::SWITCHING_PROTOCOLS {
            let leftover = conn.buf.split().freeze();
            Pooled {
                conn: None,
                decoder: Decoder::Done,
                scanned: 0,
                keep_alive: false,
                pool: self.clone(),
                upgraded: Some(Upgraded {
                    io: conn.io,
                    leftover,
                }),
            }
        } else {
            let mut body = Pooled {
                conn: Some(conn),
                decoder: head.body,
                scanned: 0,
                keep_alive: head.keep_alive,
                pool: self.clone(),
                upgraded: None,
            };
            if body.decoder == Decoder::Done {
                body.give_back();
            }
            body
        };
        Response::from_parts(parts, body)
    }

    fn take(&self) -> Option<Conn> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        while let Some(i) = idle.pop() {
            if super::clock::now().saturating_duration_since(i.since) < IDLE_TIMEOUT
                && i.conn.quiet_now()
            {
                return Some(i.conn);
            }
        }
        None
    }

    /// Keep `conn` for another request if it can carry one; else it is dropped, which closes it.
    fn put(&self, mut conn: Conn) {
        if !conn.written() || !conn.buf.is_empty() {
            // The request is not written whole (the application answered before reading it
            // all), or bytes came after the response that nobody asked for: closed.
            return;
        }
        // An idle connection holds no buffer.
        conn.buf = BytesMut::new();
        conn.out = None;
        // Kept beyond `keepalive` too, as many again at most: the sweep closes that surplus once
        // it has been unused for a while (see `SURPLUS_GRACE`).
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() < 2 * self.keepalive {
            idle.push(Idle {
                conn,
                since: super::clock::now(),
            });
        }
    }

    /// Close the connections idle for too long, closed by the application, or written on by it
    /// while idle; and those beyond `keepalive` unused for [`SURPLUS_GRACE`], the least recently
    /// used first.
    pub fn sweep(&self) {
        let now = Instant::now();
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        idle.retain(|i| now.saturating_duration_since(i.since) < IDLE_TIMEOUT && i.conn.quiet());
        // Most recently used last: the surplus is at the front, oldest first.
        let surplus = idle.len().saturating_sub(self.keepalive);
        let unused = idle
            .iter()
            .take(surplus)
            .take_while(|i| now.saturating_duration_since(i.since) >= SURPLUS_GRACE)
            .count();
        idle.drain(..unused);
    }

    async fn connect(&self) -> Result<Conn, Error> {
        let connecting = TcpStream::connect((self.host.as_str(), self.port));
        let stream = match tokio::time::timeout(self.connect_timeout, connecting).await {
            Ok(Ok(s)) => s,
            Ok(Err(source)) => {
                return Err(Error::Connect {
                    addr: self.addr(),
                    source,
                });
            }
            Err(_) => {
                return Err(Error::ConnectTimeout {
                    addr: self.addr(),
                    timeout: self.connect_timeout,
                });
            }
        };
        let _ = stream.set_nodelay(true);
        let keepalive = socket2::TcpKeepalive::new().with_time(Duration::from_secs(60));
        let _ = socket2::SockRef::from(&stream).set_tcp_keepalive(&keepalive);
        Ok(Conn::new(stream))
    }
}

/// Fields regobox adds to a request it forwards (the forwarding fields, the `Host` it names),
/// written after the request's own as they were pushed: no map is grown or hashed for them.
pub struct Added {
    text: Vec<u8>,
}

impl Added {
    pub fn with_capacity(bytes: usize) -> Added {
        Added {
            text: Vec::with_capacity(bytes),
        }
    }

    /// The field `name`, its value the concatenation of `value`. Left out (`false`) if a part
    /// holds a byte no field value may (a control character other than tab, as `HeaderValue`
    /// refuses): a line break could not make a field of its own.
    pub fn push(&mut self, name: &HeaderName, value: &[&[u8]]) -> bool {
        let name = name.as_str().as_bytes();
        let length: usize = value.iter().map(|part| part.len()).sum();
        self.text.reserve(name.len() + length + 4);
        let start = self.text.len();
        self.text.extend_from_slice(name);
        self.text.extend_from_slice(b": ");
        for part in value {
            self.text.extend_from_slice(part);
        }
        if !field_value(&self.text[start + name.len() + 2..]) {
            self.text.truncate(start);
            return false;
        }
        self.text.extend_from_slice(b"\r\n");
        true
    }

    /// The fields as written: each line `name: value` and its CRLF.
    pub fn as_bytes(&self) -> &[u8] {
        &self.text
    }

    /// [`Added::as_bytes`], kept: shared by the requests that add the same (see
    /// `forward::ConnCtx::added`).
    pub fn into_bytes(self) -> Bytes {
        Bytes::from(self.text)
    }
}

/// Whether `value` may be a field's value: no control character but tab (as `HeaderValue`).
/// Eight bytes at a time: a byte under 0x20 or equal to 0x7f in a word is found by the bit
/// tricks of "Bit Twiddling Hacks" (`hasless`, `haszero`); a word with a tab, or one they flag,
/// is looked at byte by byte.
fn field_value(value: &[u8]) -> bool {
    const ONES: u64 = u64::from_ne_bytes([0x01; 8]);
    const HIGHS: u64 = u64::from_ne_bytes([0x80; 8]);
    let byte = |b: u8| b == b'\t' || (b >= 0x20 && b != 0x7f);
    let mut words = value.chunks_exact(8);
    for word in &mut words {
        let mut w = [0u8; 8];
        w.copy_from_slice(word);
        let x = u64::from_ne_bytes(w);
        let under_0x20 = x.wrapping_sub(ONES * 0x20) & !x & HIGHS;
        let del = x ^ (ONES * 0x7f);
        let is_del = del.wrapping_sub(ONES) & !del & HIGHS;
        if (under_0x20 | is_del) != 0 && !word.iter().all(|&b| byte(b)) {
            return false;
        }
    }
    words.remainder().iter().all(|&b| byte(b))
}

/// The request's head as it goes out, and its body's framing. `Err`: what makes it unsendable.
fn request_head(
    parts: &hyper::http::request::Parts,
    added: &[u8],
    body: &Body,
) -> Result<(Vec<u8>, Framing), &'static str> {
    let length = content_length(
        parts
            .headers
            .get_all(header::CONTENT_LENGTH)
            .iter()
            .map(|v| v.as_bytes()),
    )?;
    let (framing, add) = match length {
        Some(0) => (Framing::Empty, None),
        Some(n) => (Framing::Length(n), None),
        None if body.is_end_stream() => {
            // A method that gives a body a meaning says it has none (RFC 9110 8.6).
            let says = matches!(parts.method, Method::POST | Method::PUT | Method::PATCH);
            (Framing::Empty, says.then_some("content-length: 0\r\n"))
        }
        None => match body.size_hint().exact() {
            Some(0) => (Framing::Empty, None),
            Some(n) => (Framing::Length(n), None),
            None => (Framing::Chunked, Some("transfer-encoding: chunked\r\n")),
        },
    };
    let target = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let target = if target.is_empty() { "/" } else { target };
    let mut head = Vec::with_capacity(256 + parts.headers.len() * 48 + added.len());
    head.extend_from_slice(parts.method.as_str().as_bytes());
    head.push(b' ');
    head.extend_from_slice(target.as_bytes());
    head.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in &parts.headers {
        // The framing is written below, once, in its canonical form.
        if name == header::TRANSFER_ENCODING || name == header::CONTENT_LENGTH {
            continue;
        }
        head.extend_from_slice(name.as_str().as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(value.as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    head.extend_from_slice(added);
    if let Some(n) = length.or(match framing {
        Framing::Length(n) => Some(n),
        _ => None,
    }) {
        head.extend_from_slice(b"content-length: ");
        head.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    if let Some(add) = add {
        head.extend_from_slice(add.as_bytes());
    }
    head.extend_from_slice(b"\r\n");
    Ok((head, framing))
}

/// The hop-by-hop fields of RFC 9110 7.6.1 (with the non-standard ones still seen): a match on
/// the name's text (a switch on its length, then a comparison), made for every field.
pub(super) fn is_hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "proxy-authorization"
            | "proxy-authenticate"
    )
}

/// Whether `buf` holds an empty line, where httparse ends a head (`\n\n` or `\n\r\n`): one
/// pass from line end to line end (memchr), which stops at the first; a response's body in the
/// same read is not looked at.
fn has_blank_line(buf: &[u8]) -> bool {
    memchr::memchr_iter(b'\n', buf)
        .any(|i| matches!(&buf[i + 1..], [b'\n', ..] | [b'\r', b'\n', ..]))
}

/// The length that `Content-Length` fields say (`values`, each possibly a list): the same
/// number of digits everywhere (`5, 5` as two fields or one), read as hyper's server and
/// regobox's framing follower read a request's; `Ok(None)` without any, `Err` if they differ or
/// one is not a number.
fn content_length<'a>(values: impl Iterator<Item = &'a [u8]>) -> Result<Option<u64>, &'static str> {
    let mut length = None;
    for value in values {
        for v in value.split(|&b| b == b',') {
            let n = super::framing::digits(v.trim_ascii()).ok_or("a malformed Content-Length")?;
            if length.is_some_and(|l| l != n) {
                return Err("two different Content-Length values");
            }
            length = Some(n);
        }
    }
    Ok(length)
}

/// Take a response head off the front of `buf` if it is there whole: `Ok(None)` if more is
/// needed. Interim responses come back as they are (the caller skips them).
fn parse_head(buf: &mut BytesMut, is_head: bool) -> Result<Option<Head>, Cow<'static, str>> {
    let read = {
        let mut fields = [httparse::EMPTY_HEADER; FIELDS_ON_STACK];
        let mut response = httparse::Response::new(&mut fields);
        match response.parse(buf) {
            Err(httparse::Error::TooManyHeaders) => {
                // Room for as many fields as there are lines, up to the bound.
                let lines = buf.iter().filter(|&&b| b == b'\n').count();
                let mut fields = vec![httparse::EMPTY_HEADER; lines.min(MAX_RESPONSE_FIELDS)];
                let mut response = httparse::Response::new(&mut fields);
                let r = response.parse(buf);
                read_head(buf, r, response, is_head)?
            }
            r => read_head(buf, r, response, is_head)?,
        }
    };
    let Some(Read {
        len,
        mut head,
        fields,
        canonical_length,
    }) = read
    else {
        return Ok(None);
    };
    let bytes = buf.split_to(len).freeze();
    head.headers.reserve(fields.len());
    for (name, start, end) in fields {
        let value = HeaderValue::from_maybe_shared(bytes.slice(start..end))
            .map_err(|_| format!("the value of the field {name}"))?;
        head.headers.append(name, value);
    }
    if let Some(n) = canonical_length {
        head.headers
            .insert(header::CONTENT_LENGTH, HeaderValue::from(n));
    }
    Ok(Some(head))
}

/// What httparse read of a buffer, in regobox's terms.
struct Read {
    /// The head's length.
    len: usize,
    /// The head, its fields not yet in it.
    head: Head,
    /// Each field's name and where its value is in the head.
    fields: Vec<(HeaderName, usize, usize)>,
    /// The length to write as the one `Content-Length` field, where it came in another form.
    canonical_length: Option<u64>,
}

fn read_head(
    buf: &[u8],
    parsed: httparse::Result<usize>,
    response: httparse::Response<'_, '_>,
    is_head: bool,
) -> Result<Option<Read>, Cow<'static, str>> {
    let len = match parsed {
        Ok(httparse::Status::Complete(len)) if len <= MAX_RESPONSE_HEAD => len,
        Ok(httparse::Status::Partial) if buf.len() < MAX_RESPONSE_HEAD => return Ok(None),
        Ok(_) => return Err(format!("a response head over {MAX_RESPONSE_HEAD} bytes").into()),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(format!("a response head with over {MAX_RESPONSE_FIELDS} fields").into());
        }
        Err(e) => return Err(format!("a malformed response head ({e})").into()),
    };
    let code = response.code.unwrap_or(0);
    let status = StatusCode::from_u16(code)
        .ok()
        .filter(|_| (100..600).contains(&code))
        .ok_or_else(|| format!("the status code {code}, outside 100-599"))?;
    let http10 = response.version == Some(0);
    let base = buf.as_ptr() as usize;
    // Each field as its name and where its value is in the head (taken below without a copy).
    let mut fields = Vec::with_capacity(response.headers.len());
    // What `Connection` names (RFC 9110 7.6.1), besides `close`: hop-by-hop too.
    let mut options: Vec<&[u8]> = Vec::new();
    let (mut length, mut chunked, mut close) = (None, false, http10);
    // Whether the length must be written anew as one field of digits (RFC 9110 8.6): it came
    // as a list, in several fields, or with leading zeros.
    let (mut te, mut lengths, mut odd_length) = (0, 0, false);
    for f in response.headers.iter() {
        let name = HeaderName::from_bytes(f.name.as_bytes())
            .map_err(|_| format!("the field name {:?}", f.name))?;
        if name == header::CONTENT_LENGTH {
            let n = content_length(std::iter::once(f.value))?.unwrap_or(0);
            if length.is_some_and(|l| l != n) {
                return Err("two different Content-Length values".into());
            }
            length = Some(n);
            lengths += 1;
            odd_length |= f.value != itoa::Buffer::new().format(n).as_bytes();
        } else if name == header::TRANSFER_ENCODING {
            te += 1;
            chunked = f.value.trim_ascii().eq_ignore_ascii_case(b"chunked");
        } else if name == header::CONNECTION {
            for option in f.value.split(|&b| b == b',') {
                let option = option.trim_ascii();
                if option.eq_ignore_ascii_case(b"close") {
                    close = true;
                } else if !option.is_empty() && !option.eq_ignore_ascii_case(b"keep-alive") {
                    // (`Keep-Alive` is hop-by-hop anyway: most applications' one option
                    // costs no list.)
                    options.push(option);
                }
            }
        }
        // The hop-by-hop fields are this connection's, not the client's: not in the model,
        // but for a 101, whose `Upgrade` and `Connection` the tunnel's client must get.
        if is_hop_by_hop(&name) && status != StatusCode::SWITCHING_PROTOCOLS {
            continue;
        }
        // (An empty value's slice may point anywhere.)
        let start = if f.value.is_empty() {
            0
        } else {
            f.value.as_ptr() as usize - base
        };
        fields.push((name, start, start + f.value.len()));
    }
    if !options.is_empty() && status != StatusCode::SWITCHING_PROTOCOLS {
        fields.retain(|(name, _, _)| {
            !options
                .iter()
                .any(|o| o.eq_ignore_ascii_case(name.as_str().as_bytes()))
        });
    }
    let bodiless = is_head
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    let body = match (te, length) {
        (0, None) if bodiless => Decoder::Done,
        (0, None) => {
            close = true;
            Decoder::Close
        }
        (0, Some(n)) if bodiless || n == 0 => Decoder::Done,
        (0, Some(n)) => Decoder::Length(n),
        (_, Some(_)) => return Err("both Content-Length and Transfer-Encoding".into()),
        (1, None) if chunked && !http10 => {
            if bodiless {
                Decoder::Done
            } else {
                Decoder::Chunked(Chunk::Size)
            }
        }
        _ => return Err("a Transfer-Encoding other than one chunked".into()),
    };
    let head = Head {
        status,
        headers: HeaderMap::new(),
        body,
        keep_alive: !close,
    };
    Ok(Some(Read {
        len,
        head,
        fields,
        canonical_length: length.filter(|_| lengths > 1 || odd_length),
    }))
}

/// A response body from the application; reading it drives its connection, which goes back to
/// the pool once the body has been read to the end.
pub struct Pooled {
    /// `None` for an upgrade, once given back, or after an error.
    conn: Option<Conn>,
    decoder: Decoder,
    /// How much of the buffer was searched for the end of a chunk-size or trailer line.
    scanned: usize,
    keep_alive: bool,
    pool: Arc<Pool>,
    /// The connection, for a 101 to an upgrade.
    upgraded: Option<Upgraded>,
}

impl Pooled {
    /// The connection of a 101 answering an upgrade, to become the tunnel's.
    pub fn take_upgraded(&mut self) -> Option<Upgraded> {
        self.upgraded.take()
    }

    fn give_back(&mut self) {
        if let Some(conn) = self.conn.take()
            && self.keep_alive
        {
            self.pool.put(conn);
        }
    }

    fn fail(&mut self, error: Error) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        if matches!(error, Error::Protocol { .. })
            && let Some(left_out) = BAD_BODIES.should_log()
        {
            tracing::warn!(target: "regobox::proxy", error = %error, similar_left_out = left_out, "the application's response body is not valid HTTP; the response is cut");
        }
        self.conn = None;
        self.decoder = Decoder::Done;
        Poll::Ready(Some(Err(error)))
    }

    /// The next frame of the body from what `conn` has read, or `None` if more must be read.
    fn decode(&mut self) -> Result<Option<Bytes>, Cow<'static, str>> {
        let Some(conn) = self.conn.as_mut() else {
            return Ok(None);
        };
        let buf = &mut conn.buf;
        loop {
            match &mut self.decoder {
                Decoder::Done => return Ok(None),
                Decoder::Close => {
                    return Ok((!buf.is_empty()).then(|| buf.split().freeze()));
                }
                Decoder::Length(left) => {
                    if buf.is_empty() {
                        return Ok(None);
                    }
                    let n = (*left).min(buf.len() as u64) as usize;
                    *left -= n as u64;
                    if *left == 0 {
                        self.decoder = Decoder::Done;
                    }
                    return Ok(Some(buf.split_to(n).freeze()));
                }
                Decoder::Chunked(Chunk::Size) => {
                    let Some((end, size)) = chunk_line(buf, &mut self.scanned)? else {
                        return Ok(None);
                    };
                    buf.advance(end + 2);
                    self.decoder = Decoder::Chunked(if size == 0 {
                        Chunk::Trailers(0)
                    } else {
                        Chunk::Data(size)
                    });
                }
                Decoder::Chunked(Chunk::Data(left)) => {
                    if buf.is_empty() {
                        return Ok(None);
                    }
                    let n = (*left).min(buf.len() as u64) as usize;
                    *left -= n as u64;
                    if *left == 0 {
                        self.decoder = Decoder::Chunked(Chunk::DataEnd);
                    }
                    return Ok(Some(buf.split_to(n).freeze()));
                }
                Decoder::Chunked(Chunk::DataEnd) => {
                    if buf.len() < 2 {
                        return Ok(None);
                    }
                    if &buf[..2] != b"\r\n" {
                        return Err("a chunk not followed by CRLF".into());
                    }
                    buf.advance(2);
                    self.decoder = Decoder::Chunked(Chunk::Size);
                }
                Decoder::Chunked(Chunk::Trailers(read)) => {
                    let Some(end) = line_end(buf, &mut self.scanned)? else {
                        if *read + buf.len() > MAX_RESPONSE_HEAD {
                            return Err("trailers over the response head's limit".into());
                        }
                        return Ok(None);
                    };
                    *read += end + 2;
                    if *read > MAX_RESPONSE_HEAD {
                        return Err("trailers over the response head's limit".into());
                    }
                    let line = &buf[..end];
                    if line.iter().any(|&b| b != b'\t' && (b < 0x20 || b == 0x7f)) {
                        return Err("a control character in a trailer".into());
                    }
                    let last = end == 0;
                    buf.advance(end + 2);
                    if last {
                        self.decoder = Decoder::Done;
                        return Ok(None);
                    }
                }
            }
        }
    }
}

/// Where the line at the front of `buf` ends (its CRLF), searched from where the last search
/// stopped (`scanned`, reset once a line is found): a line dribbled a byte at a time is not
/// searched again from its start at each byte.
/// A line feed without its carriage return is refused (`Err`), not waited past.
fn line_end(buf: &[u8], scanned: &mut usize) -> Result<Option<usize>, Cow<'static, str>> {
    match memchr::memchr(b'\n', &buf[*scanned..]) {
        Some(i) => {
            let lf = *scanned + i;
            *scanned = 0;
            if lf == 0 || buf[lf - 1] != b'\r' {
                return Err("a bare LF in a chunked body".into());
            }
            Ok(Some(lf - 1))
        }
        None => {
            *scanned = buf.len();
            Ok(None)
        }
    }
}

/// The chunk-size line at the front of `buf`, if it is there whole: where it ends (its CRLF)
/// and the size it says.
fn chunk_line(buf: &[u8], scanned: &mut usize) -> Result<Option<(usize, u64)>, Cow<'static, str>> {
    let end = match line_end(buf, scanned)? {
        Some(end) if end <= MAX_CHUNK_LINE => end,
        None if buf.len() <= MAX_CHUNK_LINE + 1 => return Ok(None),
        _ => return Err("a chunk-size line too long".into()),
    };
    Ok(Some((end, chunk_size(&buf[..end])?)))
}

/// A chunk-size line's size (RFC 9112 7.1): hexadecimal digits, then nothing or extensions
/// (`;` after optional white space), with no control character.
fn chunk_size(line: &[u8]) -> Result<u64, Cow<'static, str>> {
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 || digits > 16 {
        return Err("a malformed chunk size".into());
    }
    let rest = &line[digits..];
    let rest_ok = rest.is_empty()
        || (rest.trim_ascii_start().first() == Some(&b';')
            && rest.iter().all(|&b| b == b'\t' || (b >= 0x20 && b != 0x7f)));
    if !rest_ok {
        return Err("a malformed chunk size".into());
    }
    let size = u64::from_str_radix(std::str::from_utf8(&line[..digits]).unwrap_or("x"), 16)
        .map_err(|_| "a malformed chunk size")?;
    if size > 1 << 60 {
        return Err("a chunk size too large".into());
    }
    Ok(size)
}

impl hyper::body::Body for Pooled {
    type Data = Bytes;
    type Error = Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        let this = &mut *self;
        loop {
            if this.decoder == Decoder::Done {
                this.give_back();
                return Poll::Ready(None);
            }
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            // The rest of the request, if the answer came before it was all written: the
            // connection is not kept if it fails (it is not written whole).
            if !conn.written()
                && let Poll::Ready(Err(_)) = conn.poll_push(cx)
            {
                conn.spoil();
            }
            match this.decode() {
                Err(what) => {
                    let e = this.pool.protocol(what);
                    return this.fail(e);
                }
                Ok(Some(data)) => {
                    if this.decoder == Decoder::Done {
                        this.give_back();
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Ok(None) if this.decoder == Decoder::Done => continue,
                Ok(None) => {}
            }
            let conn = this
                .conn
                .as_mut()
                .expect("a body being read has its connection");
            match ready!(conn.poll_fill(cx)) {
                Ok(0) if this.decoder == Decoder::Close => this.decoder = Decoder::Done,
                Ok(0) => {
                    let e = Error::Closed {
                        addr: this.pool.addr(),
                        when: "in the middle of a response's body",
                    };
                    return this.fail(e);
                }
                Ok(_) => {}
                Err(source) => {
                    let e = Error::Io {
                        addr: this.pool.addr(),
                        source,
                    };
                    return this.fail(e);
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.decoder == Decoder::Done
    }

    fn size_hint(&self) -> SizeHint {
        match self.decoder {
            Decoder::Done => SizeHint::with_exact(0),
            Decoder::Length(n) => SizeHint::with_exact(n),
            _ => SizeHint::default(),
        }
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        // Read to the end (or empty from the start: HEAD, 204, 304): reusable. Otherwise the
        // connection still holds the rest of the body and closes as it is dropped.
        if self.decoder == Decoder::Done {
            self.give_back();
        }
    }
}

/// The application's side of an upgraded connection: its socket, with what came after the 101's
/// head read first.
pub struct Upgraded {
    io: TcpStream,
    leftover: Bytes,
}

impl AsyncRead for Upgraded {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.leftover.is_empty() {
            let n = self.leftover.len().min(buf.remaining());
            buf.put_slice(&self.leftover[..n]);
            self.leftover.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Upgraded {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use http_body_util::BodyExt;
    use hyper::body::Incoming;
    use hyper::service::service_fn;
    use hyper_util::rt::TokioIo;
    use tokio::net::TcpListener;

    use super::*;

    /// A listener on loopback and its address as the pool's upstream.
    async fn listen() -> (TcpListener, hyper::Uri) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let uri = format!("http://{}", listener.local_addr().unwrap())
            .parse()
            .unwrap();
        (listener, uri)
    }

    /// Every connection `listener` accepts served by `each` on a task of its own; how many it
    /// has accepted.
    fn accept_all<F, Fut>(listener: TcpListener, each: F) -> Arc<AtomicUsize>
    where
        F: Fn(TcpStream) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(each(stream));
            }
        });
        accepted
    }

    /// A real HTTP/1.1 server on loopback counting its connections; `close` answers with
    /// `Connection: close`.
    async fn server(close: bool) -> (hyper::Uri, Arc<AtomicUsize>) {
        let (listener, uri) = listen().await;
        let accepted = accept_all(listener, move |stream| async move {
            let service = service_fn(move |req: Request<Incoming>| async move {
                let size = if req.uri().path() == "/big" {
                    8 << 20
                } else {
                    100_000
                };
                let mut r = Response::new(http_body_util::Full::new(Bytes::from(format!(
                    "{} {}",
                    req.uri(),
                    "x".repeat(size)
                ))));
                if close {
                    r.headers_mut()
                        .insert("connection", "close".parse().unwrap());
                }
                Ok::<_, std::convert::Infallible>(r)
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
        (uri, accepted)
    }

    /// The body of `path` through `pool`, read to the end.
    async fn fetch(pool: &Arc<Pool>, path: &str) -> Bytes {
        let r = pool.send(get(path), NO_FIELDS).await.unwrap();
        r.into_body().collect().await.unwrap().to_bytes()
    }

    /// No fields added to the requests of these tests.
    static NO_FIELDS: &[u8] = b"";

    /// A POST of `body` (its size known) to `path`.
    fn post(path: &str, body: &'static [u8]) -> Request<Body> {
        Request::post(path)
            .header("host", "app")
            .body(
                http_body_util::Full::new(Bytes::from_static(body))
                    .map_err(|e| match e {})
                    .boxed(),
            )
            .unwrap()
    }

    fn get(path: &str) -> Request<Body> {
        Request::get(path)
            .header("host", "app")
            .body(super::super::empty())
            .unwrap()
    }

    #[tokio::test]
    async fn connections_are_reused_once_a_body_is_read() {
        let (uri, accepted) = server(false).await;
        let pool = Pool::new(&uri, Duration::from_secs(2), 4);
        for i in 0..20 {
            let body = fetch(&pool, &format!("/{i}")).await;
            assert!(body.starts_with(format!("/{i} ").as_bytes()));
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);

        // A body abandoned half-way: its connection is not pooled.
        let r = pool.send(get("/big"), NO_FIELDS).await.unwrap();
        let mut body = r.into_body();
        let first = body.frame().await.unwrap().unwrap();
        assert!(first.data_ref().is_some_and(|d| d.len() < 8 << 20));
        drop(body);
        assert!(fetch(&pool, "/after").await.starts_with(b"/after "));
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_connection_closed_by_the_application_is_not_used_again() {
        let (uri, accepted) = server(true).await;
        let pool = Pool::new(&uri, Duration::from_secs(2), 4);
        for i in 0..20 {
            let body = fetch(&pool, &format!("/{i}")).await;
            assert!(body.starts_with(format!("/{i} ").as_bytes()));
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 20);
    }

    #[tokio::test]
    async fn a_pooled_connection_closed_while_idle_is_replaced() {
        // An application that answers one request per connection with keep-alive, then closes
        // the connection while it sits in the pool.
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (listener, uri) = listen().await;
        let accepted = accept_all(listener, |mut stream| async move {
            let mut head = Vec::new();
            let mut buf = [0u8; 1024];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = stream.read(&mut buf).await.unwrap();
                assert!(n > 0, "the proxy closed before sending a request");
                head.extend_from_slice(&buf[..n]);
            }
            stream
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
        });
        let pool = Pool::new(&uri, Duration::from_secs(2), 4);
        for i in 0..3 {
            assert_eq!(fetch(&pool, &format!("/{i}")).await, "ok");
            assert_eq!(pool.idle.lock().unwrap().len(), 1);
            // Closed by the application meanwhile; nothing has driven it since.
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 3);
        // The sweep notices a closed idle connection without a request.
        pool.sweep();
        assert_eq!(pool.idle.lock().unwrap().len(), 0);
    }

    #[tokio::test]
    async fn idle_connections_beyond_the_keepalive_are_closed_once_unused_for_a_while() {
        let (uri, accepted) = server(false).await;
        let pool = Pool::new(&uri, Duration::from_secs(2), 2);
        let idle = || pool.idle.lock().unwrap().len();
        let burst = |n: usize, path: &'static str| {
            let pool = &pool;
            async move {
                let responses = futures_util::future::join_all(
                    (0..n).map(|i| pool.send(get(&format!("{path}{i}")), NO_FIELDS)),
                )
                .await;
                for r in responses {
                    r.unwrap().into_body().collect().await.unwrap();
                }
            }
        };
        // Four at once: four connections, all kept for now, the sweep included.
        burst(4, "/").await;
        assert_eq!(accepted.load(Ordering::SeqCst), 4);
        assert_eq!(idle(), 4);
        pool.sweep();
        assert_eq!(idle(), 4, "the surplus waits for its grace");
        // Four at once again: the same four connections (a load that swings across the number
        // opens none).
        burst(4, "/again/").await;
        assert_eq!(accepted.load(Ordering::SeqCst), 4);
        // Eight at once: four more connections, and of the eight, as many again as the number
        // kept, no more (a surplus as large as the peak, in each worker's pool, would let bursts
        // taking turns between workers hold that many per worker: an attacker's finding).
        burst(8, "/peak/").await;
        assert_eq!(accepted.load(Ordering::SeqCst), 8);
        assert_eq!(idle(), 4, "twice the number kept at most");
        tokio::time::sleep(SURPLUS_GRACE + Duration::from_millis(100)).await;
        // One used just before the sweep: recent, so among the two kept.
        fetch(&pool, "/recent").await;
        pool.sweep();
        assert_eq!(idle(), 2, "the surplus, unused for its grace, closed");
        let newest = pool.idle.lock().unwrap().last().map(|i| i.since.elapsed());
        assert!(
            newest.is_some_and(|e| e < SURPLUS_GRACE),
            "the least recently used go first"
        );
        pool.sweep();
        assert_eq!(idle(), 2, "never fewer than the number kept");
        for _ in 0..3 {
            fetch(&pool, "/last").await;
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 8);
    }

    /// An application that answers each request with the next of `answers`, written as it is;
    /// once they run out, it closes the connection (`then_read`: after reading one more request,
    /// not answered). What it read, request by request (head and body), is sent on the returned
    /// channel.
    async fn raw(
        answers: Vec<Vec<u8>>,
        then_read: bool,
    ) -> (
        hyper::Uri,
        Arc<AtomicUsize>,
        tokio::sync::mpsc::UnboundedReceiver<Vec<u8>>,
    ) {
        use tokio::io::AsyncWriteExt;
        let (listener, uri) = listen().await;
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let answers = Arc::new(answers);
        let accepted = accept_all(listener, move |mut stream| {
            let (answers, tx) = (answers.clone(), tx.clone());
            async move {
                stream.set_nodelay(true).unwrap();
                let mut buf = Vec::new();
                for answer in answers.iter() {
                    let Some(request) = read_request(&mut stream, &mut buf).await else {
                        return;
                    };
                    let _ = tx.send(request);
                    if stream.write_all(answer).await.is_err() {
                        return;
                    }
                }
                if then_read && let Some(request) = read_request(&mut stream, &mut buf).await {
                    let _ = tx.send(request);
                }
            }
        });
        (uri, accepted, rx)
    }

    /// One request off `stream` (what is in `buf` first): its head and its body, framed by a
    /// `content-length` or `transfer-encoding: chunked` field as the client writes them.
    async fn read_request(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Option<Vec<u8>> {
        if !read_until(stream, buf, |b| request_end(b).is_some()).await {
            return None;
        }
        let end = request_end(buf)?;
        Some(buf.drain(..end).collect())
    }

    /// Where the first request in `buf` ends, if it is there whole.
    fn request_end(buf: &[u8]) -> Option<usize> {
        let i = buf.windows(4).position(|w| w == b"\r\n\r\n")?;
        let head = String::from_utf8_lossy(&buf[..i]);
        let body = i + 4;
        if head.contains("transfer-encoding: chunked") {
            let last = buf[body..].windows(5).position(|w| w == b"0\r\n\r\n")?;
            return Some(body + last + 5);
        }
        let length = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length: "))
            .map_or(0, |n| n.parse::<usize>().unwrap());
        Some(body + length).filter(|&end| end <= buf.len())
    }

    /// Read from `stream` into `buf` until `enough` says so (true) or the stream ends (false).
    async fn read_until(
        stream: &mut TcpStream,
        buf: &mut Vec<u8>,
        enough: impl Fn(&[u8]) -> bool,
    ) -> bool {
        use tokio::io::AsyncReadExt;
        let mut chunk = [0u8; 4096];
        while !enough(buf) {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        true
    }

    /// The body of a response, read to its end, or the error that ended it.
    async fn read_all(r: Response<Pooled>) -> Result<Bytes, String> {
        match r.into_body().collect().await {
            Ok(b) => Ok(b.to_bytes()),
            Err(e) => Err(e.to_string()),
        }
    }

    #[tokio::test]
    async fn answers_that_could_be_read_two_ways_are_refused_and_their_connection_closed() {
        let refused: &[(&str, &str)] = &[
            (
                "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
                "both Content-Length and Transfer-Encoding",
            ),
            (
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
                "other than one chunked",
            ),
            (
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
                "other than one chunked",
            ),
            (
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: identity\r\n\r\nhello",
                "other than one chunked",
            ),
            (
                "HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
                "other than one chunked",
            ),
            (
                "HTTP/1.1 200 OK\r\nContent-Length: 5, 6\r\n\r\nhello!",
                "two different Content-Length",
            ),
            (
                "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
                "two different Content-Length",
            ),
            (
                "HTTP/1.1 200 OK\r\nContent-Length: +5\r\n\r\nhello",
                "malformed Content-Length",
            ),
            (
                "HTTP/1.1 200 OK\r\nContent-Length: 0x5\r\n\r\nhello",
                "malformed Content-Length",
            ),
            (
                "HTTP/1.1 200 OK\r\nContent-Length: 5 5\r\n\r\nhello",
                "malformed Content-Length",
            ),
            (
                "HTTP/1.1 200 OK\r\nContent-Length: 99999999999999999999\r\n\r\nhello",
                "malformed Content-Length",
            ),
            (
                "HTTP/1.1 200 OK\r\nContent-Length: \r\n\r\nhello",
                "malformed Content-Length",
            ),
            (
                "HTTP/1.1 200 OK\r\nX-A: a\r\n folded\r\nContent-Length: 5\r\n\r\nhello",
                "malformed response head",
            ),
            (
                "HTTP/1.1 200 OK\r\nContent-Length : 5\r\n\r\nhello",
                "malformed response head",
            ),
            (
                "HTTP/1.1 200 OK\r\nX-A: a\x00b\r\nContent-Length: 5\r\n\r\nhello",
                "malformed response head",
            ),
            (
                "HTTP/1.1 600 Odd\r\nContent-Length: 0\r\n\r\n",
                "status code 600",
            ),
            (
                "HTTP/1.1 099 Odd\r\nContent-Length: 0\r\n\r\n",
                "status code 99",
            ),
            (
                "HTTP/2 200 OK\r\nContent-Length: 0\r\n\r\n",
                "malformed response head",
            ),
            ("ICY 200 OK\r\n\r\n", "malformed response head"),
            // A malformed first chunk-size line that came with the head: 502, not a cut body.
            (
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhi\r\n0\r\n\r\n",
                "malformed chunk size",
            ),
            (
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\nhi\n0\n\n",
                "bare LF",
            ),
        ];
        for (answer, why) in refused {
            let (uri, _, _) = raw(vec![answer.as_bytes().to_vec()], false).await;
            let pool = Pool::new(&uri, Duration::from_secs(2), 4);
            match pool.send(get("/"), NO_FIELDS).await {
                Err(Error::Protocol { what, .. }) => {
                    assert!(what.contains(why), "{answer:?}: {what}")
                }
                Err(e) => panic!("{answer:?}: {e}"),
                Ok(r) => panic!(
                    "{answer:?}: taken as {} {:?}",
                    r.status(),
                    read_all(r).await
                ),
            }
            assert_eq!(pool.idle.lock().unwrap().len(), 0, "{answer:?}");
        }

        // Over the size a head may have, and more interim answers than are taken.
        let huge = format!(
            "HTTP/1.1 200 OK\r\nX-Big: {}\r\n",
            "a".repeat(MAX_RESPONSE_HEAD)
        );
        let interims = "HTTP/1.1 100 Continue\r\n\r\n".repeat(MAX_INTERIM + 1)
            + "HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n";
        for (answer, why) in [(huge, "over 65536 bytes"), (interims, "interim")] {
            let (uri, _, _) = raw(vec![answer.into_bytes()], false).await;
            let pool = Pool::new(&uri, Duration::from_secs(2), 4);
            match pool.send(get("/"), NO_FIELDS).await {
                Err(Error::Protocol { what, .. }) => assert!(what.contains(why), "{what}"),
                other => panic!("{why}: {:?}", other.map(|r| r.status())),
            }
        }

        // The same length twice, a few interim answers, a head of many fields: taken.
        let mut fields = String::new();
        for i in 0..300 {
            fields.push_str(&format!("X-Field-{i}: {i}\r\n"));
        }
        let taken = [
            "HTTP/1.1 200 OK\r\nContent-Length: 5, 5\r\nContent-Length: 5\r\n\r\nhello".to_string(),
            "HTTP/1.1 200 OK\r\nContent-Length: 005\r\n\r\nhello".to_string(),
            "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello".to_string(),
            format!("HTTP/1.1 200 OK\r\n{fields}Content-Length: 5\r\n\r\nhello"),
        ];
        for answer in taken {
            let (uri, _, _) = raw(vec![answer.clone().into_bytes()], false).await;
            let pool = Pool::new(&uri, Duration::from_secs(2), 4);
            let r = pool.send(get("/"), NO_FIELDS).await.unwrap();
            assert_eq!(r.status(), StatusCode::OK);
            // The length goes on as one field of digits, whatever form it came in.
            let lengths: Vec<_> = r.headers().get_all("content-length").iter().collect();
            assert_eq!(lengths, ["5"], "{answer:?}");
            assert_eq!(read_all(r).await.unwrap(), "hello", "{answer:?}");
        }
    }

    #[tokio::test]
    async fn a_responses_hop_by_hop_fields_are_not_in_it_but_for_a_101() {
        // The fields of this hop, and those `Connection` names (in any case, in two fields,
        // with empty options), stay here; the end-to-end fields go on, and so does the length.
        let answer = b"HTTP/1.1 200 OK\r\nConnection: keep-alive, X-Secret\r\nX-Secret: 1\r\nKeep-Alive: timeout=5\r\nTE: trailers\r\nTrailer: X-T\r\nUpgrade: h2c\r\nProxy-Connection: keep-alive\r\nX-Kept: 1\r\nconnection: ,x-OTHER ,\r\nX-Other: 2\r\nContent-Length: 2\r\n\r\nok".to_vec();
        let (uri, _, _) = raw(vec![answer.clone(), answer], false).await;
        let pool = Pool::new(&uri, Duration::from_secs(2), 4);
        let r = pool.send(get("/"), NO_FIELDS).await.unwrap();
        let names: Vec<&str> = r.headers().keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["x-kept", "content-length"]);
        assert_eq!(read_all(r).await.unwrap(), "ok");
        // `keep-alive` is an option, not `close`: the connection is used again.
        let r = pool.send(get("/"), NO_FIELDS).await.unwrap();
        assert_eq!(read_all(r).await.unwrap(), "ok");

        // A 101 keeps them: the tunnel's client must get `Upgrade` and `Connection`.
        let answer = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n".to_vec();
        let (uri, _, _) = raw(vec![answer], true).await;
        let pool = Pool::new(&uri, Duration::from_secs(2), 4);
        let mut req = get("/ws");
        req.headers_mut()
            .insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        let r = pool.send(req, NO_FIELDS).await.unwrap();
        assert_eq!(r.status(), StatusCode::SWITCHING_PROTOCOLS);
        assert_eq!(r.headers()[header::UPGRADE], "websocket");
        assert_eq!(r.headers()[header::CONNECTION], "Upgrade");
    }

    #[test]
    fn a_field_value_is_what_header_value_takes() {
        // Every byte, at every place of a word and of the remainder, among bytes that pass.
        for len in [1, 7, 8, 9, 16, 17, 23] {
            for at in 0..len {
                for b in 0..=255u8 {
                    let mut value = vec![b'a'; len];
                    value[at] = b;
                    assert_eq!(
                        field_value(&value),
                        HeaderValue::from_bytes(&value).is_ok(),
                        "{b:#x} at {at} of {len}"
                    );
                }
            }
        }
        assert!(field_value(b""));
        assert!(field_value(b"\t\t\t\t\t\t\t\tx\x80\xff~ "));
    }

    #[test]
    fn added_fields_follow_the_requests_own_and_carry_no_line_break() {
        let mut added = Added::with_capacity(0);
        let name = HeaderName::from_static("x-forwarded-for");
        assert!(added.push(&name, &[b"10.0.0.1", b", ", b"127.0.0.1"]));
        // A value that would end its line, or hold a control character, is left out whole.
        for bad in [
            &b"1\r\nx-evil: 1"[..],
            b"1\nx-evil: 1",
            b"a\x00b",
            b"a\x7fb",
            b"\r",
        ] {
            assert!(!added.push(&name, &[b"ok", bad]), "{bad:?}");
        }
        assert!(added.push(&header::FORWARDED, &[b"for=\"[::1]\"\t;proto=https"]));
        let (parts, body) = get("/p").into_parts();
        let (head, _) = request_head(&parts, added.as_bytes(), &body).unwrap();
        assert_eq!(
            String::from_utf8(head).unwrap(),
            "GET /p HTTP/1.1\r\nhost: app\r\nx-forwarded-for: 10.0.0.1, 127.0.0.1\r\nforwarded: for=\"[::1]\"\t;proto=https\r\n\r\n"
        );
    }

    #[test]
    fn a_head_ends_at_its_first_empty_line() {
        for (buf, blank) in [
            (&b"HTTP/1.1 200 OK\r\nA: b\r\n\r\n"[..], true),
            (b"HTTP/1.1 200 OK\nA: b\n\n", true),
            (b"HTTP/1.1 200 OK\r\nA: b\n\r\nbody\n", true),
            (b"HTTP/1.1 200 OK\r\nA: b\r\n\r", false),
            (b"HTTP/1.1 200 OK\r\nA: b\r\n", false),
            (b"HTTP/1.1 200 OK\r\nA: \rb\r\n", false),
            (b"\n", false),
            (b"", false),
            (b"\n\n", true),
        ] {
            assert_eq!(
                has_blank_line(buf),
                blank,
                "{:?}",
                String::from_utf8_lossy(buf)
            );
        }
    }

    /// An application served by OS threads, not by a task of the test's runtime: what it does
    /// happens while the test's thread is blocked, so the runtime's I/O driver sees it only once
    /// the test awaits something that parks (as a busy worker between two turns of its driver).
    /// Each connection: read a request (head and `content-length` body), answer `ok`; on the
    /// first connection, after its first answer and once the test says so (`go`), `then`:
    /// `None` closes it, `Some(bytes)` writes them unasked; then it says it is done.
    fn threaded_app(
        then: Option<&'static [u8]>,
    ) -> (
        hyper::Uri,
        std::sync::mpsc::Sender<()>,
        std::sync::mpsc::Receiver<()>,
    ) {
        use std::io::{Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let uri = format!("http://{}", listener.local_addr().unwrap())
            .parse()
            .unwrap();
        let (go, went) = std::sync::mpsc::channel::<()>();
        let (did, done) = std::sync::mpsc::channel::<()>();
        std::thread::spawn(move || {
            let mut first = Some((went, did));
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { return };
                let mut first = first.take();
                std::thread::spawn(move || {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    loop {
                        let end = loop {
                            if let Some(end) = request_end(&buf) {
                                break end;
                            }
                            match stream.read(&mut chunk) {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                            }
                        };
                        buf.drain(..end);
                        let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                        if stream.write_all(answer).is_err() {
                            return;
                        }
                        if let Some((went, did)) = first.take() {
                            let _ = went.recv();
                            match then {
                                None => {
                                    // Closed (its FIN in the other end's queue on return).
                                    let _ = stream.shutdown(std::net::Shutdown::Both);
                                    drop(stream);
                                    let _ = did.send(());
                                    return;
                                }
                                Some(bytes) => {
                                    let _ = stream.write_all(bytes);
                                    let _ = did.send(());
                                }
                            }
                        }
                    }
                });
            }
        });
        (uri, go, done)
    }

    /// Wait, without letting the runtime's driver turn, until the kernel holds something to read
    /// (bytes, or the end) on `pool`'s one idle connection: what the application did has landed.
    fn landed(pool: &Pool) {
        let idle = pool.idle.lock().unwrap();
        let socket = socket2::SockRef::from(&idle[0].conn.io);
        let mut probe = [std::mem::MaybeUninit::<u8>::uninit(); 1];
        for _ in 0..500 {
            match socket.peek(&mut probe) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                _ => return,
            }
        }
        panic!("nothing came on the idle connection");
    }

    /// A pool to a [`threaded_app`] doing `then`, with one connection made idle by a first
    /// request, after the application has done `then` on it and it has landed, while this
    /// worker did not park.
    async fn idle_after(then: Option<&'static [u8]>) -> Arc<Pool> {
        let (uri, go, done) = threaded_app(then);
        let pool = Pool::new(&uri, Duration::from_secs(2), 4);
        assert_eq!(fetch(&pool, "/first").await, "ok");
        assert_eq!(pool.idle.lock().unwrap().len(), 1);
        go.send(()).unwrap();
        done.recv().unwrap();
        landed(&pool);
        pool
    }

    #[tokio::test]
    async fn a_connection_the_application_closed_while_idle_is_not_taken_for_a_post() {
        // The application closes the idle connection.
        let pool = idle_after(None).await;
        // The close is seen when the connection is taken, and the POST goes on a new one (it is
        // not sent again once written: on the closed one it would fail).
        let r = pool
            .send(post("/upload", b"hello"), NO_FIELDS)
            .await
            .unwrap();
        assert_eq!(read_all(r).await.unwrap(), "ok");
    }

    #[tokio::test]
    async fn bytes_written_on_an_idle_connection_are_not_the_next_answer() {
        // The application writes a whole answer on the idle connection, unasked.
        let pool = idle_after(Some(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nstray")).await;
        assert_eq!(fetch(&pool, "/second").await, "ok");
    }

    #[tokio::test]
    async fn bodies_end_where_their_framing_says_and_nothing_after_them_is_taken() {
        // Chunks with extensions and trailers, then a second answer on the same connection.
        let chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: Chunked\r\n\r\n5;a=b\r\nhello\r\n6 ; c\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n".to_vec();
        let second = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nbye".to_vec();
        let (uri, accepted, _) = raw(vec![chunked, second], false).await;
        let pool = Pool::new(&uri, Duration::from_secs(2), 4);
        assert_eq!(fetch(&pool, "/1").await, "hello world");
        assert_eq!(fetch(&pool, "/2").await, "bye");
        assert_eq!(accepted.load(Ordering::SeqCst), 1);

        // Malformed chunks: a 502 when the first chunk-size line came with the head, else the body
        // ends with an error; the connection is closed either way.
        for bad in [
            "5\r\nhelloX\r\n0\r\n\r\n",
            "5\nhello\r\n0\r\n\r\n",
            "2\nhi\n0\n\n",
            "5\r\nhello\r\n0\r\nX-T: t\n\r\n",
            "5\n;x\r\nhello\r\n0\r\n\r\n",
            "fffffffffffffffff\r\nhello\r\n0\r\n\r\n",
            "-5\r\nhello\r\n0\r\n\r\n",
            "\r\nhello\r\n0\r\n\r\n",
            "5 x\r\nhello\r\n0\r\n\r\n",
            "0\r\nX-T: a\x01b\r\n\r\n",
            // A chunk-size line over 4 KiB arriving whole, with its CRLF.
            &format!("5;{}\r\nhello\r\n0\r\n\r\n", "e".repeat(8000)),
        ] {
            let answer = format!("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n{bad}");
            let (uri, _, _) = raw(vec![answer.into_bytes()], false).await;
            let pool = Pool::new(&uri, Duration::from_secs(2), 4);
            let e = match pool.send(get("/"), NO_FIELDS).await {
                Ok(r) => read_all(r).await.expect_err(bad),
                Err(e @ Error::Protocol { .. }) => e.to_string(),
                Err(e) => panic!("{bad:?}: {e}"),
            };
            assert!(
                e.contains("chunk") || e.contains("trailer") || e.contains("bare LF"),
                "{bad:?}: {e}"
            );
            assert_eq!(pool.idle.lock().unwrap().len(), 0, "{bad:?}");
        }

        // Cut short: an error, not a shorter body.
        for short in [
            "HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
        ] {
            let (uri, _, _) = raw(vec![short.as_bytes().to_vec()], false).await;
            let pool = Pool::new(&uri, Duration::from_secs(2), 4);
            let r = pool.send(get("/"), NO_FIELDS).await.unwrap();
            let e = read_all(r).await.expect_err(short);
            assert!(
                e.contains("closed in the middle of a response's body"),
                "{e}"
            );
        }

        // Without a length: until the application closes; the connection is not kept.
        let (uri, accepted, _) = raw(
            vec![b"HTTP/1.1 200 OK\r\n\r\nuntil the end".to_vec()],
            false,
        )
        .await;
        let pool = Pool::new(&uri, Duration::from_secs(2), 4);
        assert_eq!(fetch(&pool, "/").await, "until the end");
        assert_eq!(pool.idle.lock().unwrap().len(), 0);
        assert_eq!(accepted.load(Ordering::SeqCst), 1);

        // Bytes after the answer (a second answer nobody asked for, a body to a 204 or a HEAD):
        // the connection is closed, not given to the next request.
        for (request, answer) in [
            (
                get("/"),
                "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nSTRAY!",
            ),
            (
                get("/"),
                "HTTP/1.1 204 No Content\r\nContent-Length: 6\r\n\r\nSTRAY!",
            ),
            (
                Request::head("/")
                    .header("host", "app")
                    .body(super::super::empty())
                    .unwrap(),
                "HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nSTRAY!",
            ),
        ] {
            let (uri, accepted, _) = raw(vec![answer.as_bytes().to_vec(); 2], false).await;
            let pool = Pool::new(&uri, Duration::from_secs(2), 4);
            let r = pool.send(request, NO_FIELDS).await.unwrap();
            let body = read_all(r).await.unwrap();
            assert!(body == "ok" || body.is_empty(), "{answer:?}");
            assert_eq!(pool.idle.lock().unwrap().len(), 0, "{answer:?}");
            fetch(&pool, "/next").await;
            assert_eq!(accepted.load(Ordering::SeqCst), 2, "{answer:?}");
        }
    }

    #[tokio::test]
    async fn the_request_goes_out_with_the_clients_own_framing() {
        let ok = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n".to_vec();
        let (uri, _, mut seen) = raw(vec![ok; 5], false).await;
        let pool = Pool::new(&uri, Duration::from_secs(2), 4);
        // A body of unknown size goes chunked; a Transfer-Encoding field of the request's is
        // not written (the framing is the client's).
        let (tx, body) = futures_channel_body();
        tx.send(Ok(Frame::data(Bytes::from_static(b"hello"))))
            .unwrap();
        drop(tx);
        let req = Request::post("/up")
            .header("host", "app")
            .header("transfer-encoding", "gzip")
            .body(body)
            .unwrap();
        read_all(pool.send(req, NO_FIELDS).await.unwrap())
            .await
            .unwrap();
        let head = String::from_utf8(seen.recv().await.unwrap()).unwrap();
        assert!(
            head.starts_with("POST /up HTTP/1.1\r\nhost: app\r\n"),
            "{head}"
        );
        assert!(head.contains("transfer-encoding: chunked\r\n"), "{head}");
        assert!(!head.contains("gzip"), "{head}");
        // A body of known size: its length; an empty POST says so.
        let req = post("/known", b"abc");
        read_all(pool.send(req, NO_FIELDS).await.unwrap())
            .await
            .unwrap();
        let head = String::from_utf8(seen.recv().await.unwrap()).unwrap();
        assert!(head.contains("content-length: 3\r\n"), "{head}");
        let req = Request::post("/empty")
            .header("host", "app")
            .body(super::super::empty())
            .unwrap();
        read_all(pool.send(req, NO_FIELDS).await.unwrap())
            .await
            .unwrap();
        let head = String::from_utf8(seen.recv().await.unwrap()).unwrap();
        assert!(head.contains("content-length: 0\r\n"), "{head}");
        // A length written as a list (hyper's server takes `5, 5`): one field of digits.
        let mut req = post("/list", b"hello");
        req.headers_mut()
            .insert("content-length", HeaderValue::from_static("5, 5"));
        read_all(pool.send(req, NO_FIELDS).await.unwrap())
            .await
            .unwrap();
        let head = String::from_utf8(seen.recv().await.unwrap()).unwrap();
        assert!(
            head.contains("\r\ncontent-length: 5\r\n\r\nhello"),
            "{head}"
        );
        assert_eq!(head.matches("content-length").count(), 1, "{head}");
        // A GET says nothing of a body.
        fetch(&pool, "/get").await;
        let head = String::from_utf8(seen.recv().await.unwrap()).unwrap();
        assert!(
            !head.contains("content-length") && !head.contains("transfer-encoding"),
            "{head}"
        );
    }

    /// A body fed through a channel (its size unknown).
    fn futures_channel_body() -> (
        tokio::sync::mpsc::UnboundedSender<Result<Frame<Bytes>, BoxError>>,
        Body,
    ) {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let stream =
            futures_util::stream::unfold(
                rx,
                |mut rx| async move { rx.recv().await.map(|f| (f, rx)) },
            );
        (tx, http_body_util::StreamBody::new(stream).boxed())
    }

    #[tokio::test]
    async fn only_what_cannot_have_been_acted_upon_is_sent_again() {
        // The application answers the first request of each connection and closes the
        // connection on reading the second, without answering it.
        let ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok".to_vec();
        let (uri, accepted, _) = raw(vec![ok.clone()], true).await;
        let pool = Pool::new(&uri, Duration::from_secs(2), 4);
        assert_eq!(fetch(&pool, "/first").await, "ok");
        // A GET whose pooled connection closes under it: sent again on a new connection.
        assert_eq!(fetch(&pool, "/again").await, "ok");
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
        // A POST may have been acted upon: not sent again, an error.
        let req = post("/once", b"abc");
        let e = pool
            .send(req, NO_FIELDS)
            .await
            .err()
            .expect("a POST sent twice");
        assert!(matches!(e, Error::Closed { .. } | Error::Io { .. }), "{e}");
        assert_eq!(accepted.load(Ordering::SeqCst), 2);

        // With four connections in the pool, each closed by the application as a request comes:
        // a GET goes out twice at most, the second time on a new connection.
        let (uri, accepted, mut seen) = raw(vec![ok.clone()], true).await;
        let pool = Pool::new(&uri, Duration::from_secs(2), 4);
        let four = futures_util::future::join_all(
            (0..4).map(|i| pool.send(get(&format!("/{i}")), NO_FIELDS)),
        )
        .await;
        for r in four {
            read_all(r.unwrap()).await.unwrap();
        }
        assert_eq!(pool.idle.lock().unwrap().len(), 4);
        assert_eq!(accepted.load(Ordering::SeqCst), 4);
        assert_eq!(fetch(&pool, "/once-or-twice").await, "ok");
        assert_eq!(accepted.load(Ordering::SeqCst), 5);
        let mut sent = 0;
        while let Ok(request) = seen.try_recv() {
            sent += usize::from(request.starts_with(b"GET /once-or-twice "));
        }
        assert_eq!(sent, 2);

        // A GET answered with an interim response, then closed: it was acted upon.
        let interim = b"HTTP/1.1 100 Continue\r\n\r\n".to_vec();
        let (uri, accepted, _) = raw(vec![ok.clone(), interim], false).await;
        let pool = Pool::new(&uri, Duration::from_secs(2), 4);
        assert_eq!(fetch(&pool, "/first").await, "ok");
        let e = pool
            .send(get("/"), NO_FIELDS)
            .await
            .err()
            .expect("a 100 and no answer");
        assert!(
            e.to_string().contains("after an interim (1xx) answer"),
            "{e}"
        );
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    /// An application that answers before reading the request's body may take that body for
    /// another request (and answer it too): its connection is not used again, even when the
    /// body has been written whole by the time the answer's body ends.
    #[tokio::test]
    async fn an_answer_that_came_before_the_request_was_written_whole_is_the_connections_last() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (listener, uri) = listen().await;
        let accepted = accept_all(listener, |mut stream| async move {
            let mut buf = Vec::new();
            let head_end = |b: &[u8]| b.windows(4).position(|w| w == b"\r\n\r\n");
            if !read_until(&mut stream, &mut buf, |b| head_end(b).is_some()).await {
                return;
            }
            let _ = stream
                .write_all(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 5\r\n\r\n")
                .await;
            // The body (5 bytes), then the rest of the answer.
            let body_end = head_end(&buf).unwrap() + 4 + 5;
            if !read_until(&mut stream, &mut buf, |b| b.len() >= body_end).await {
                return;
            }
            let _ = stream.write_all(b"nope!").await;
            let _ = stream.read(&mut [0u8; 64]).await;
        });
        let pool = Pool::new(&uri, Duration::from_secs(2), 4);
        let (tx, body) = futures_channel_body();
        let req = Request::post("/")
            .header("host", "app")
            .header("content-length", "5")
            .body(body)
            .unwrap();
        let r = pool.send(req, NO_FIELDS).await.unwrap();
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
        tx.send(Ok(Frame::data(Bytes::from_static(b"hello"))))
            .unwrap();
        drop(tx);
        assert_eq!(read_all(r).await.unwrap(), "nope!");
        assert_eq!(pool.idle.lock().unwrap().len(), 0);
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn an_upgrade_hands_over_the_connection_with_what_came_after_the_101() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let answer = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\nearly".to_vec();
        let (uri, _, _) = raw(vec![answer], false).await;
        let pool = Pool::new(&uri, Duration::from_secs(2), 4);
        let req = Request::get("/ws")
            .header("host", "app")
            .header("connection", "upgrade")
            .header("upgrade", "websocket")
            .body(super::super::empty())
            .unwrap();
        let mut r = pool.send(req, NO_FIELDS).await.unwrap();
        assert_eq!(r.status(), StatusCode::SWITCHING_PROTOCOLS);
        let mut io = r
            .body_mut()
            .take_upgraded()
            .expect("the upgraded connection");
        let mut got = [0u8; 5];
        io.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"early");
        let _ = io.write_all(b"x").await;
        assert_eq!(pool.idle.lock().unwrap().len(), 0);
    }

    #[tokio::test]
    async fn an_application_that_is_not_listening_is_named() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let pool = Pool::new(
            &format!("http://{addr}").parse().unwrap(),
            Duration::from_secs(2),
            4,
        );
        let e = pool
            .send(get("/"), NO_FIELDS)
            .await
            .err()
            .unwrap()
            .to_string();
        assert!(e.starts_with(&format!("connecting to {addr}: ")), "{e}");
    }

    /// A response nobody asked for (here after answering `/stray`, while the next request is
    /// already on its way): the first request after it cannot tell it from its own answer, but
    /// the answer that comes after it, with no request left, ends the connection (hyper's check
    /// of what a connection reads while idle), so that no later request gets another's answer.
    /// (An application that delays its segments, Nagle's algorithm against the proxy's delayed
    /// acknowledgements, can hold each answer back until the next request is written: then it
    /// is that request's answer, and the lag goes on. Seen by an attacker's test with Python's
    /// `http.server`-style sockets; see the README's "The application's responses".)
    #[tokio::test]
    async fn a_response_nobody_asked_for_ends_the_connection() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (listener, uri) = listen().await;
        let accepted = accept_all(listener, |mut stream| async move {
            // Each answer leaves at once (see above).
            stream.set_nodelay(true).unwrap();
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            loop {
                let end = loop {
                    if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        break i + 4;
                    }
                    match stream.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                };
                let head: Vec<u8> = buf.drain(..end).collect();
                let target = String::from_utf8_lossy(&head)
                    .split(' ')
                    .nth(1)
                    .unwrap_or("")
                    .to_string();
                let body = format!("answer to {target}");
                let answer = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                );
                if stream.write_all(answer.as_bytes()).await.is_err() {
                    return;
                }
                if target == "/stray" {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    let stray = b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nSTRAY!";
                    if stream.write_all(stray).await.is_err() {
                        return;
                    }
                }
            }
        });
        let pool = Pool::new(&uri, Duration::from_secs(2), 1);
        assert_eq!(&fetch(&pool, "/stray").await[..], b"answer to /stray");
        // Sent before the stray answer comes: it gets it.
        assert_eq!(&fetch(&pool, "/first").await[..], b"STRAY!");
        for i in 0..5 {
            tokio::time::sleep(Duration::from_millis(10)).await;
            let path = format!("/next{i}");
            let body = fetch(&pool, &path).await;
            assert_eq!(body, format!("answer to {path}").as_bytes(), "{i}");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }
}

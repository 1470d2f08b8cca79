//! Follows the framing of every HTTP/1.1 request read on a connection, byte for byte, beside
//! hyper: where each head ends, how long its body is, where each chunk begins and ends.
//!
//! hyper handles a request with both `Content-Length` and `Transfer-Encoding` the way RFC 9112
//! allows (chunked wins, the connection closes after it) but does not let the service see that
//! both were there. A request smuggling attempt is exactly that ambiguity, so the proxy refuses it
//! with a 400 instead: this reader sees the bytes hyper reads, finds each request head (skipping
//! bodies by their framing) and raises a flag the request handler checks. It also tells the
//! connection's watchdog when a head begins and ends (the header deadline).
//!
//! The follower is total: it never stops following while the connection is HTTP/1.1. Where it
//! cannot follow (a chunk line it cannot read, a head it cannot parse or over the size limit), it
//! ends the connection: a body it cannot frame makes the read fail at once, so hyper never acts
//! on those bytes; a head hyper will refuse too (the same parser reads it) is handed over for
//! hyper's 400 or 431, and hyper reads nothing more after it (what the client sends next is
//! discarded until the connection closes after the answer). A request that asks for an
//! upgrade (or CONNECT) is the last one followed: what comes after it is either the tunnel (once
//! the handler has answered 101, see [`Signals::tunnel`]) or never read, as the handler closes
//! the connection after any other answer to it.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The longest chunk extension followed (hyper refuses long before, at 16 KiB per body).
const MAX_CHUNK_EXTENSION: usize = 64 * 1024;

/// Past this many chunks in a body, they must carry [`MIN_CHUNK_AVERAGE`] bytes each on
/// average: a body in one-byte chunks costs hyper a frame each (4 µs), a hundred times what its
/// bytes cost in large chunks (the h2 crate has the same rule for small DATA frames).
const SMALL_CHUNKS_ALLOWED: u64 = 1024;
const MIN_CHUNK_AVERAGE: u64 = 32;

#[derive(Debug)]
enum State {
    /// A request head is arriving (none yet if the buffer is empty).
    Head(Vec<u8>),
    /// A body of known length: bytes left.
    Body(u64),
    /// A chunk-size line: the size so far and whether it has a digit.
    Size {
        size: u64,
        digits: bool,
    },
    /// Spaces after the size.
    SizeSpace(u64),
    /// A chunk extension: its length so far.
    Extension(u64, usize),
    /// The LF ending a chunk-size line.
    SizeLf(u64),
    /// Chunk data: bytes left.
    Data(u64),
    DataCr,
    DataLf,
    /// Trailer lines after the last chunk: the bytes of the current line, and of all of them.
    Trailers {
        line: usize,
        total: usize,
    },
    TrailerLf {
        empty: bool,
        total: usize,
    },
    /// After a request that asks for an upgrade (or CONNECT): what follows is the tunnel's once
    /// the handler has answered 101; otherwise the connection closes after the answer, and
    /// nothing here is read as a request.
    Upgrading,
    /// Upgraded (101 sent): the bytes are the tunnel's, not requests.
    Tunnel,
    /// A head hyper will refuse as well has been handed over; nothing more is read.
    Closing,
    /// Could not follow: the connection ends.
    Lost,
}

/// What the follower and the request handler tell each other.
#[derive(Debug, Default)]
pub struct Signals {
    /// The number of the first request head with both framings (1 for the connection's first
    /// head), 0 while none had: the requests before it, pipelined in the same read, are served.
    ambiguous: AtomicU64,
    /// Request heads read whole, counted by the follower.
    heads: AtomicU64,
    /// Requests the handler took, counted by it (hyper hands them over in order, each after
    /// the follower has read its head).
    handled: AtomicU64,
    /// The handler answered 101: the connection is a tunnel from here.
    tunnel: AtomicBool,
    /// The follower waits for the next request, none of it read yet, after one that keeps the
    /// connection open (the connection may be parked, see `serve_h1`).
    between: AtomicBool,
    /// The connection's last request is read (the client's choice, as hyper reads it), or the
    /// handler's answer closes the connection.
    closing: AtomicBool,
    /// The connection's task's polls of hyper's connection, counted (see `cork`).
    turns: AtomicU64,
}

impl Signals {
    /// The handler takes the connection's next HTTP/1.1 request: whether its head, or one
    /// before it, had both framings. (Only the connection's task calls it, as only its task
    /// follows: a load and a store each.)
    pub fn next_is_ambiguous(&self) -> bool {
        let n = self.handled.load(Ordering::Relaxed) + 1;
        self.handled.store(n, Ordering::Relaxed);
        let first = self.ambiguous.load(Ordering::Relaxed);
        first != 0 && n >= first
    }

    /// The handler answers 101 to the upgrade request: stop following.
    pub fn tunnel(&self) {
        self.tunnel.store(true, Ordering::Relaxed);
    }

    /// The handler's answer closes the connection (the follower says so of the client's last
    /// request itself).
    pub fn closing(&self) {
        self.closing.store(true, Ordering::Relaxed);
    }

    /// The answer in progress, or one after it, is the connection's last (see `closing`). (Not
    /// once the handler has answered 101: what follows is the tunnel's.)
    pub fn closes(&self) -> bool {
        self.closing.load(Ordering::Relaxed) && !self.tunnel.load(Ordering::Relaxed)
    }

    /// The connection's task polls hyper's connection again. (Only that task counts: a load
    /// and a store, no locked instruction.)
    pub fn next_turn(&self) {
        let t = self.turns.load(Ordering::Relaxed);
        self.turns.store(t.wrapping_add(1), Ordering::Relaxed);
    }

    /// How many times the connection's task has polled hyper's connection.
    pub fn turn(&self) -> u64 {
        self.turns.load(Ordering::Relaxed)
    }

    /// Between two requests of a connection that stays open: nothing of the next one read yet.
    pub fn between_requests(&self) -> bool {
        self.between.load(Ordering::Relaxed) && !self.closing.load(Ordering::Relaxed)
    }
}

pub struct Framing<S> {
    inner: S,
    state: State,
    /// Bytes followed already, read again (what hyper had read and not used when its
    /// connection was parked).
    replay: bytes::Bytes,
    /// After the current request's body: the connection is to be upgraded.
    upgrading: bool,
    /// After the current request's body: the connection closes (HTTP/1.0 without keep-alive,
    /// `Connection: close`).
    last: bool,
    /// The current body's chunks, and the bytes they carry.
    chunks: u64,
    chunked_bytes: u64,
    /// The follower cut a body hyper would read on (its chunks too small): hyper's next read
    /// fails, once it has what came before the cut (see [`Framing::poll_read`]).
    cut: bool,
    limit: usize,
    signals: Arc<Signals>,
    /// Told when a request head begins and ends (for the header deadline).
    activity: Option<Arc<super::Activity>>,
}

impl<S> Framing<S> {
    pub fn new(
        inner: S,
        limit: usize,
        signals: Arc<Signals>,
        activity: Option<Arc<super::Activity>>,
    ) -> Self {
        Framing {
            inner,
            state: State::Head(Vec::new()),
            replay: bytes::Bytes::new(),
            upgrading: false,
            last: false,
            chunks: 0,
            chunked_bytes: 0,
            cut: false,
            limit,
            signals,
            activity,
        }
    }

    fn head_ends(&self) {
        if let Some(a) = &self.activity {
            a.head_ends();
        }
    }

    /// The state after a request's body.
    fn next_request(&mut self) -> State {
        if self.upgrading {
            State::Upgrading
        } else if self.last {
            State::Closing
        } else {
            self.signals.between.store(true, Ordering::Relaxed);
            State::Head(Vec::new())
        }
    }

    /// The stream underneath.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// Read `bytes` (followed already) before the stream's next ones.
    pub fn replay(&mut self, bytes: bytes::Bytes) {
        self.replay = bytes;
    }

    /// Follow `data`, the next bytes read. When the follower stops following (it closes the
    /// connection), how many of these bytes hyper may still read: up to the end of a head hyper
    /// refuses as well, or to the byte of a body that could not be followed, which makes
    /// hyper's reading of that body fail too (400).
    fn feed(&mut self, data: &[u8]) -> Option<usize> {
        let total = data.len();
        self.follow(data).map(|left| total - left)
    }

    /// [`Framing::feed`]; what is left of `data` where it stopped following.
    fn follow(&mut self, mut data: &[u8]) -> Option<usize> {
        while !data.is_empty() {
            match &mut self.state {
                State::Tunnel => return None,
                State::Closing => return Some(data.len()),
                State::Lost => {
                    self.state = State::Closing;
                    return Some(data.len());
                }
                State::Upgrading => {
                    if self.signals.tunnel.load(Ordering::Relaxed) {
                        self.state = State::Tunnel;
                    }
                    return None;
                }
                State::Head(buf) => {
                    // Skip the empty lines allowed before a request line (httparse does too).
                    if buf.is_empty() {
                        let skip = data
                            .iter()
                            .take_while(|b| **b == b'\r' || **b == b'\n')
                            .count();
                        data = &data[skip..];
                        if data.is_empty() {
                            return None;
                        }
                        self.signals.between.store(false, Ordering::Relaxed);
                        if let Some(a) = &self.activity {
                            a.head_behind_begins();
                        }
                    }
                    let before = buf.len();
                    let taken = data.len().min(self.limit + 1 - before.min(self.limit));
                    buf.extend_from_slice(&data[..taken]);
                    // The head ends where hyper's parser says it does (a bare LF ends a line
                    // there too); worth asking only when a line has ended.
                    let mut headers = [httparse::EMPTY_HEADER; 128];
                    let mut req = httparse::Request::new(&mut headers);
                    let status = if data[..taken].contains(&b'\n') {
                        req.parse(buf)
                    } else {
                        Ok(httparse::Status::Partial)
                    };
                    match status {
                        Ok(httparse::Status::Complete(end)) => {
                            // Read from the one parse that found the head's end.
                            let heads = self.signals.heads.load(Ordering::Relaxed) + 1;
                            self.signals.heads.store(heads, Ordering::Relaxed);
                            let (next, upgrade, last) = after_head(&self.signals, &req);
                            *buf = Vec::new();
                            self.upgrading = upgrade;
                            self.last = last;
                            if last {
                                // (Its answer may leave with the connection's end: `cork`.)
                                self.signals.closing();
                            }
                            (self.chunks, self.chunked_bytes) = (0, 0);
                            self.head_ends();
                            self.state = match next {
                                Next::Body(0) => self.next_request(),
                                Next::Body(n) => State::Body(n),
                                Next::Chunked => State::Size {
                                    size: 0,
                                    digits: false,
                                },
                                Next::Refused => State::Lost,
                            };
                            // The rest of this read after the head, from `data`.
                            data = &data[end - before..];
                        }
                        Ok(httparse::Status::Partial) if buf.len() <= self.limit => {
                            data = &data[taken..];
                        }
                        // Too large or not a head: hyper refuses it (431 or 400) and closes. It
                        // gets what was followed of it and nothing after (an attacker's finding:
                        // a head one read brought whole, past the limit, was hyper's to serve
                        // with every request after it in the read, none of them followed).
                        _ => {
                            self.head_ends();
                            self.state = State::Closing;
                            return Some(data.len() - taken);
                        }
                    }
                }
                State::Body(n) => {
                    let k = (*n).min(data.len() as u64) as usize;
                    *n -= k as u64;
                    data = &data[k..];
                    if *n == 0 {
                        self.state = self.next_request();
                    }
                }
                State::Data(n) => {
                    let k = (*n).min(data.len() as u64) as usize;
                    *n -= k as u64;
                    data = &data[k..];
                    if *n == 0 {
                        self.state = State::DataCr;
                    }
                }
                _ => {
                    let b = data[0];
                    data = &data[1..];
                    self.state = chunk_byte(
                        std::mem::replace(&mut self.state, State::Lost),
                        b,
                        self.limit,
                    );
                    match self.state {
                        State::Head(_) => self.state = self.next_request(),
                        State::Data(n) => {
                            self.chunks += 1;
                            self.chunked_bytes = self.chunked_bytes.saturating_add(n);
                            if self.chunks > SMALL_CHUNKS_ALLOWED
                                && self.chunked_bytes < self.chunks * MIN_CHUNK_AVERAGE
                            {
                                // Framing hyper reads on: the read fails instead (an
                                // attacker's finding: hyper waited 60 s for the rest, which
                                // was thrown away, before its 408).
                                self.cut = true;
                                self.state = State::Lost;
                            }
                        }
                        _ => {}
                    }
                }
            }
        }
        match self.state {
            State::Lost => {
                self.state = State::Closing;
                Some(0)
            }
            _ => None,
        }
    }
}

/// The state after byte `b` of chunked framing (RFC 9112 7.1, as strictly as hyper reads it:
/// hex digits only, CRLF only); [`State::Lost`] where it cannot be followed.
fn chunk_byte(state: State, b: u8, limit: usize) -> State {
    match (state, b) {
        (State::Size { size, .. }, b) if b.is_ascii_hexdigit() => {
            if size >> 60 != 0 {
                return State::Lost;
            }
            let digit = (b as char).to_digit(16).unwrap_or(0) as u64;
            State::Size {
                size: size << 4 | digit,
                digits: true,
            }
        }
        (State::Size { digits: false, .. }, _) => State::Lost,
        (State::Size { size, .. } | State::SizeSpace(size), b' ' | b'\t') => State::SizeSpace(size),
        (State::Size { size, .. } | State::SizeSpace(size), b';') => State::Extension(size, 0),
        (State::Size { size, .. } | State::SizeSpace(size), b'\r') => State::SizeLf(size),
        (State::Extension(size, _), b'\r') => State::SizeLf(size),
        (State::Extension(_, _), b'\n') => State::Lost,
        (State::Extension(size, len), _) if len < MAX_CHUNK_EXTENSION => {
            State::Extension(size, len + 1)
        }
        (State::SizeLf(0), b'\n') => State::Trailers { line: 0, total: 0 },
        (State::SizeLf(size), b'\n') => State::Data(size),
        (State::DataCr, b'\r') => State::DataLf,
        (State::DataLf, b'\n') => State::Size {
            size: 0,
            digits: false,
        },
        (State::Trailers { line, total }, b'\r') => State::TrailerLf {
            empty: line == 0,
            total: total + 1,
        },
        // Any other byte, a bare LF included, is part of a trailer line for hyper too (it ends a
        // line at CRLF only): the two readings stay in step.
        (State::Trailers { line, total }, _) if total < limit => State::Trailers {
            line: line + 1,
            total: total + 1,
        },
        (State::TrailerLf { empty: true, .. }, b'\n') => State::Head(Vec::new()),
        (
            State::TrailerLf {
                empty: false,
                total,
            },
            b'\n',
        ) => State::Trailers { line: 0, total },
        _ => State::Lost,
    }
}

/// What follows a request head.
enum Next {
    Body(u64),
    Chunked,
    /// A head hyper refuses (400): nothing after it is read.
    Refused,
}

/// The options of a `Connection` field's `value` as hyper reads them to decide whether a
/// request is the connection's last: none unless the value is text (visible ASCII and tabs,
/// `HeaderValue::to_str`). (An attacker's finding: `Connection: close, \x80` was the last
/// request here and not for hyper, which kept the connection open while everything the client
/// sent after it was thrown away, unanswered, until the idle deadline.)
fn connection_options(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    let text = is_text(value);
    value
        .split(|b| *b == b',')
        .filter(move |_| text)
        .map(<[u8]>::trim_ascii)
}

/// A field's value hyper reads as text (`HeaderValue::to_str`): visible ASCII and tabs.
fn is_text(value: &[u8]) -> bool {
    value.iter().all(|&b| (32..127).contains(&b) || b == b'\t')
}

/// What follows a request head, whether the request asks for an upgrade, and whether it is the
/// connection's last (as hyper decides: HTTP/1.1 unless `Connection: close`, HTTP/1.0 only with
/// `Connection: keep-alive`); raises the flag on both framings.
fn after_head(signals: &Signals, req: &httparse::Request<'_, '_>) -> (Next, bool, bool) {
    let (mut length, mut te, mut chunked, mut upgrade) = (None, false, false, false);
    let (mut close, mut keep_alive) = (false, false);
    let (mut content_length, mut malformed_length) = (false, false);
    for h in req.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            // Every value (`5, 5` in one field or in several) must be the same number, digits
            // only, as hyper reads them. Whatever they say, a `Content-Length` beside a
            // `Transfer-Encoding` is both framings (below; an attacker's finding: hyper skips a
            // length after `Transfer-Encoding` unread, and one that did not read as a number
            // here was refused before the two were seen together, with no 400).
            for value in h.value.split(|b| *b == b',') {
                match digits(value.trim_ascii()) {
                    Some(n) if length.is_none_or(|l| l == n) => length = Some(n),
                    _ => malformed_length = true,
                }
            }
            content_length = true;
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            te = true;
            // The last coding, as hyper reads it: none in a value that is not text.
            chunked = is_text(h.value)
                && h.value
                    .rsplit(|b| *b == b',')
                    .next()
                    .is_some_and(|last| last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
        } else if h.name.eq_ignore_ascii_case("upgrade") {
            upgrade = true;
        } else if h.name.eq_ignore_ascii_case("connection") {
            for token in connection_options(h.value) {
                close |= token.eq_ignore_ascii_case(b"close");
                keep_alive |= token.eq_ignore_ascii_case(b"keep-alive");
            }
        }
    }
    let upgrade = upgrade || req.method == Some("CONNECT");
    let last = close || (req.version != Some(1) && !keep_alive);
    if te && content_length {
        if signals.ambiguous.load(Ordering::Relaxed) == 0 {
            let head = signals.heads.load(Ordering::Relaxed);
            signals.ambiguous.store(head, Ordering::Relaxed);
        }
        return (Next::Refused, upgrade, true);
    }
    if malformed_length {
        return (Next::Refused, false, true);
    }
    let next = if chunked {
        Next::Chunked
    } else if te {
        // A request body must end with chunked (RFC 9112 6.3): hyper answers 400.
        Next::Refused
    } else {
        Next::Body(length.unwrap_or(0))
    };
    (next, upgrade, last)
}

/// A decimal number of ASCII digits only (no sign, no spaces), as hyper reads `Content-Length`.
pub(super) fn digits(value: &[u8]) -> Option<u64> {
    // As hyper's `from_digits`: any number of leading zeros, no sign, `None` past `u64` (an
    // attacker's finding: 20 zeros were a length for hyper and not here).
    if value.is_empty() {
        return None;
    }
    value.iter().try_fold(0u64, |n, &b| {
        if !b.is_ascii_digit() {
            return None;
        }
        n.checked_mul(10)?.checked_add(u64::from(b - b'0'))
    })
}

impl<S: AsyncRead + Unpin> AsyncRead for Framing<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        if std::mem::take(&mut this.cut) {
            return Poll::Ready(Err(cut()));
        }
        if !this.replay.is_empty() {
            let n = this.replay.len().min(buf.remaining());
            buf.put_slice(&this.replay.split_to(n));
            return Poll::Ready(Ok(()));
        }
        match this.state {
            State::Tunnel => return Pin::new(&mut this.inner).poll_read(cx, buf),
            // Nothing more for hyper (an end of input would make it drop the answer it owes):
            // it answers what it has and closes; meanwhile the client's bytes are discarded.
            State::Closing | State::Lost => return this.discard(cx),
            _ => {}
        }
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(())))
            && let Some(keep) = this.feed(&buf.filled()[before..])
        {
            // hyper never sees what comes after.
            buf.set_filled(before + keep);
            if keep == 0 && std::mem::take(&mut this.cut) {
                return Poll::Ready(Err(cut()));
            }
        }
        r
    }
}

/// The error hyper's read of a body cut for its tiny chunks gets (a 400, see `forward`).
fn cut() -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::InvalidData,
        "a chunked body in pieces too small",
    )
}

impl<S: AsyncRead + Unpin> Framing<S> {
    /// Read and drop what the client sends until it has nothing more now (`Pending`) or closes.
    fn discard(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let mut scratch = [0u8; 4096];
        loop {
            let mut sink = ReadBuf::new(&mut scratch);
            match Pin::new(&mut self.inner).poll_read(cx, &mut sink) {
                Poll::Ready(Ok(())) if sink.filled().is_empty() => return Poll::Ready(Ok(())),
                Poll::Ready(Ok(())) => continue,
                other => return other,
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Framing<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
        hay.windows(needle.len()).position(|w| w == needle)
    }

    fn follow(chunks: &[&[u8]]) -> (Framing<()>, Arc<Signals>) {
        let signals = Arc::new(Signals::default());
        let mut f = Framing::new((), 8192, signals.clone(), None);
        for c in chunks {
            f.feed(c);
        }
        (f, signals)
    }

    fn scan(chunks: &[&[u8]]) -> bool {
        follow(chunks).1.ambiguous.load(Ordering::Relaxed) != 0
    }

    fn state(chunks: &[&[u8]]) -> String {
        let s = format!("{:?}", follow(chunks).0.state);
        s.split(['(', ' ', '{']).next().unwrap_or("").to_string()
    }

    #[test]
    fn the_requests_before_a_head_with_both_framings_are_served() {
        let one = b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\n".as_slice();
        let both = b"POST /2 HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n".as_slice();
        // Two served requests, then one with both framings, in one read: the third and any
        // after it are refused, not the first two.
        let (_, signals) = follow(&[&[one, one, both, one].concat()]);
        assert!(!signals.next_is_ambiguous());
        assert!(!signals.next_is_ambiguous());
        assert!(signals.next_is_ambiguous());
        assert!(signals.next_is_ambiguous());
        // The first head of a connection.
        let (_, signals) = follow(&[both]);
        assert!(signals.next_is_ambiguous());
        // None.
        let (_, signals) = follow(&[&[one, one].concat()]);
        assert!(!signals.next_is_ambiguous());
        assert!(!signals.next_is_ambiguous());
    }

    #[test]
    fn both_framings_are_spotted_wherever_the_head_is() {
        assert!(scan(&[
            b"POST / HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
        ]));
        // Split anywhere, after a body of each kind (with an extension and a trailer).
        let stream: &[u8] = b"POST /a HTTP/1.1\r\nContent-Length: 7\r\n\r\nabc\r\n\r\nPOST /b HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3;x=y\r\nx\r\n\r\n0\r\nT: 1\r\n\r\nGET /c HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 0\r\n\r\n";
        for cut in 1..stream.len() {
            assert!(scan(&[&stream[..cut], &stream[cut..]]), "cut at {cut}");
        }
        // Bodies that look like heads do not count.
        let innocent: &[u8] = b"POST /a HTTP/1.1\r\nContent-Length: 62\r\n\r\nGET / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\nGET /next HTTP/1.1\r\nHost: x\r\n\r\n";
        for cut in 1..innocent.len() {
            assert!(!scan(&[&innocent[..cut], &innocent[cut..]]), "cut at {cut}");
        }
    }

    #[test]
    fn heads_end_where_httparse_says_even_with_bare_line_feeds() {
        let stream: &[u8] = b"POST /a HTTP/1.1\nContent-Length: 3\n\nabcPOST /b HTTP/1.1\nContent-Length: 1\nTransfer-Encoding: chunked\n\n";
        for cut in 1..stream.len() {
            assert!(scan(&[&stream[..cut], &stream[cut..]]), "cut at {cut}");
        }
    }

    /// A bare LF in a trailer line is part of the line for hyper (it ends lines at CRLF only,
    /// then wants a CRLF alone): followed the same way, the next head is where hyper sees it.
    #[test]
    fn trailer_lines_end_where_hyper_ends_them() {
        for trailers in [
            &b"X: y\n\r\n\r\n"[..],
            b"\n\r\n\r\n",
            b"A: 1\r\nB\n: 2\r\n\r\n",
        ] {
            let mut stream =
                b"POST /a HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n".to_vec();
            stream.extend_from_slice(trailers);
            stream.extend_from_slice(
                b"GET /b HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
            );
            for cut in 1..stream.len() {
                assert!(scan(&[&stream[..cut], &stream[cut..]]), "cut at {cut}");
            }
        }
    }

    #[test]
    fn the_follower_never_lets_go() {
        // A head with Upgrade is the last one followed until the handler says 101.
        let upgrade: &[u8] =
            b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n";
        assert_eq!(state(&[upgrade, b"GET / HTTP/1.1\r\n\r\n"]), "Upgrading");
        let (mut f, signals) = follow(&[upgrade]);
        signals.tunnel();
        f.feed(b"\x81\x05hello");
        assert_eq!(format!("{:?}", f.state), "Tunnel");
        // A chunk-size line of any length is followed (its extension), split anywhere.
        let long = format!(
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3;{}\r\nabc\r\n0\r\n\r\nGET /b HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
            "e".repeat(5000)
        );
        let long = long.as_bytes();
        for cut in (1..long.len()).step_by(97) {
            assert!(scan(&[&long[..cut], &long[cut..]]), "cut at {cut}");
        }
        // What cannot be followed ends the connection: hyper gets the bytes up to the one that
        // could not be followed (it fails on it too), nothing after.
        let signals = Arc::new(Signals::default());
        let mut f = Framing::new((), 8192, signals, None);
        let bad: &[u8] = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\nabc\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\n\r\n";
        let head_end = find(bad, b"\r\n\r\n").unwrap() + 4;
        // `3` then the bare LF.
        assert_eq!(f.feed(bad), Some(head_end + 2));
        assert_eq!(f.feed(b"GET / HTTP/1.1\r\n\r\n"), Some(0));
        for bad in [
            &b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\nabc\r\n"[..],
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n+3\r\nabc\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcX\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nfffffffffffffffff\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n\r\n",
            // A CR not followed by LF in the trailers, as hyper reads them (a bare LF is not:
            // see `trailer_lines_end_where_hyper_ends_them`).
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nT: 1\rX",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\rX",
        ] {
            assert_eq!(state(&[bad]), "Closing", "{}", String::from_utf8_lossy(bad));
        }
        // Heads hyper refuses as well: handed over, then nothing more is read.
        for refused in [
            &b"POST / HTTP/1.1\r\nContent-Length: +5\r\n\r\n"[..],
            b"POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: \x80, chunked\r\n\r\n",
            b"GET / HTTP/1.1\r\nBad Header: x\r\n\r\n",
        ] {
            assert_eq!(
                state(&[refused]),
                "Closing",
                "{}",
                String::from_utf8_lossy(refused)
            );
        }
        let huge = format!("GET / HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(9000));
        assert_eq!(state(&[huge.as_bytes()]), "Closing");
        // A request that closes the connection is its last.
        assert_eq!(
            state(&[b"GET / HTTP/1.1\r\nConnection: close\r\n\r\nGET /b HTTP/1.1\r\n\r\n"]),
            "Closing"
        );
        assert_eq!(
            state(&[b"GET / HTTP/1.0\r\n\r\nGET /b HTTP/1.1\r\n\r\n"]),
            "Closing"
        );
        let (_, signals) = follow(&[b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n"]);
        assert!(signals.between_requests());
        // Options as hyper reads them: none in a value that is not text (an attacker's finding:
        // `close` there ended the following while hyper kept the connection open).
        let (_, signals) = follow(&[b"GET / HTTP/1.1\r\nConnection: close, \x80\r\n\r\n"]);
        assert!(signals.between_requests());
        assert_eq!(
            state(&[
                b"GET / HTTP/1.0\r\nConnection: keep-alive, \x80\r\n\r\nGET /b HTTP/1.1\r\n\r\n"
            ]),
            "Closing"
        );
        assert_eq!(
            connection_options(b" Close ,keep-alive").collect::<Vec<_>>(),
            [&b"Close"[..], b"keep-alive"]
        );
        assert_eq!(connection_options(b"close,\xa0").count(), 0);
        assert_eq!(connection_options(b"close,\x7f").count(), 0);
        assert_eq!(connection_options(b"close,\tx").count(), 2);
        // Many tiny chunks: cut; the same number of larger ones: followed.
        let mut tiny = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
        let mut fine = tiny.clone();
        for _ in 0..2000 {
            tiny.extend_from_slice(b"1\r\na\r\n");
            fine.extend_from_slice(b"40\r\n");
            fine.extend_from_slice(&[b'a'; 64]);
            fine.extend_from_slice(b"\r\n");
        }
        assert_eq!(state(&[&tiny]), "Closing");
        assert_eq!(state(&[&fine]), "Size");
        // Equal lengths are one length.
        assert_eq!(
            state(&[b"POST / HTTP/1.1\r\nContent-Length: 5, 5\r\n\r\nabc"]),
            "Body"
        );
    }

    /// A second attacker's findings (thirty-first session): where the follower read the same
    /// bytes otherwise than hyper.
    #[test]
    fn the_follower_reads_what_hyper_reads() {
        // Lengths as hyper's `from_digits` reads them.
        assert_eq!(digits(b"00000000000000000005"), Some(5));
        assert_eq!(digits(b"18446744073709551615"), Some(u64::MAX));
        assert_eq!(digits(b"18446744073709551616"), None);
        for bad in [&b""[..], b"+5", b"-5", b"5 ", b"0x5", b"\xd9\xa5"] {
            assert_eq!(digits(bad), None, "{bad:?}");
        }
        let (_, signals) =
            follow(&[b"POST / HTTP/1.1\r\nContent-Length: 00000000000000000005\r\n\r\nhello"]);
        assert!(signals.between_requests());
        // A length beside Transfer-Encoding is both framings, whatever it says, wherever it is.
        for both in [
            &b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: x\r\n\r\n"[..],
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: +1\r\nTransfer-Encoding: chunked\r\n\r\n",
        ] {
            assert!(scan(&[both]), "{}", String::from_utf8_lossy(both));
        }
        // A head past the limit: hyper gets what was followed of it (the limit and a byte, which
        // hyper refuses: 431), nothing of what came after it in the same read.
        let mut big = b"GET /big HTTP/1.1\r\nX-Pad:".to_vec();
        big.extend_from_slice(&[b' '; 9000]);
        big.extend_from_slice(b"v\r\n\r\nGET /next HTTP/1.1\r\n\r\n");
        let mut f = Framing::new((), 8192, Arc::new(Signals::default()), None);
        assert_eq!(f.feed(&big), Some(8193));
        assert_eq!(f.feed(b"GET /more HTTP/1.1\r\n\r\n"), Some(0));
        // And one split over reads: what the read that passed the limit brought, up to it.
        let mut f = Framing::new((), 8192, Arc::new(Signals::default()), None);
        assert_eq!(f.feed(&big[..8000]), None);
        assert_eq!(f.feed(&big[8000..]), Some(193));
    }

    /// A body cut for its tiny chunks, which hyper would read on: the read fails at once.
    #[test]
    fn a_body_cut_for_tiny_chunks_fails_the_read() {
        let mut tiny = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
        for _ in 0..1100 {
            tiny.extend_from_slice(b"1\r\na\r\n");
        }
        let mut f = Framing::new(&tiny[..], 8192, Arc::new(Signals::default()), None);
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let mut scratch = vec![0u8; 64 * 1024];
        // What came before the cut (the head among it), then the error.
        let mut rb = ReadBuf::new(&mut scratch);
        assert!(matches!(
            Pin::new(&mut f).poll_read(&mut cx, &mut rb),
            Poll::Ready(Ok(()))
        ));
        let before_cut = rb.filled().len();
        assert!(
            before_cut > 44 && before_cut < tiny.len() - 6,
            "{before_cut}"
        );
        let mut rb = ReadBuf::new(&mut scratch);
        match Pin::new(&mut f).poll_read(&mut cx, &mut rb) {
            Poll::Ready(Err(e)) => assert_eq!(e.kind(), std::io::ErrorKind::InvalidData),
            other => panic!("{other:?}"),
        }
        // Then nothing more for hyper.
        let mut rb = ReadBuf::new(&mut scratch);
        assert!(matches!(
            Pin::new(&mut f).poll_read(&mut cx, &mut rb),
            Poll::Ready(Ok(()))
        ));
        assert!(rb.filled().is_empty());
        // Chunks of a fair size are followed through.
        let mut fine = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
        for _ in 0..1100 {
            fine.extend_from_slice(b"40\r\n");
            fine.extend_from_slice(&[b'a'; 64]);
            fine.extend_from_slice(b"\r\n");
        }
        let mut f = Framing::new(&fine[..], 8192, Arc::new(Signals::default()), None);
        let mut rb = ReadBuf::new(&mut scratch);
        assert!(matches!(
            Pin::new(&mut f).poll_read(&mut cx, &mut rb),
            Poll::Ready(Ok(()))
        ));
        assert!(!rb.filled().is_empty());
    }
}

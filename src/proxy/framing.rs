//! Follows the framing of the HTTP/1.1 requests read on a connection, to spot a request head that
//! carries both `Content-Length` and `Transfer-Encoding`.
//!
//! hyper handles such a request the way RFC 9112 allows (chunked wins, the connection closes
//! after it) but does not let the service see that both were there. A request smuggling attempt
//! is exactly that ambiguity, so the proxy refuses it with a 400 instead: this reader sees the
//! bytes hyper reads, finds each request head (skipping bodies by their framing) and raises a
//! flag the request handler checks.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

enum State {
    Head(Vec<u8>),
    Body(u64),
    ChunkSize(Vec<u8>),
    ChunkData(u64),
    ChunkEnd(u8),
    Trailers(Vec<u8>),
    /// A tunnel (upgrade, CONNECT), an unparsable or oversized head, or the flag raised: hyper
    /// decides from here.
    Done,
}

/// Set when a request head had both framings.
#[derive(Debug, Default)]
pub struct Ambiguous(AtomicBool);

impl Ambiguous {
    pub fn seen(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

pub struct Framing<S> {
    inner: S,
    state: State,
    limit: usize,
    flag: Arc<Ambiguous>,
    /// Told when a request head begins and ends (for the header deadline).
    activity: Option<Arc<super::Activity>>,
}

impl<S> Framing<S> {
    pub fn new(
        inner: S,
        limit: usize,
        flag: Arc<Ambiguous>,
        activity: Option<Arc<super::Activity>>,
    ) -> Self {
        Framing {
            inner,
            state: State::Head(Vec::new()),
            limit,
            flag,
            activity,
        }
    }

    fn head_ends(&self) {
        if let Some(a) = &self.activity {
            a.head_ends();
        }
    }

    fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            match &mut self.state {
                State::Done => return,
                State::Head(buf) => {
                    // Skip the empty lines allowed before a request line.
                    if buf.is_empty() {
                        let skip = data
                            .iter()
                            .take_while(|b| **b == b'\r' || **b == b'\n')
                            .count();
                        data = &data[skip..];
                        if data.is_empty() {
                            return;
                        }
                        if let Some(a) = &self.activity {
                            a.head_begins();
                        }
                    }
                    let before = buf.len();
                    let room = (self.limit + 4).saturating_sub(before).max(1);
                    let taken = data.len().min(room);
                    buf.extend_from_slice(&data[..taken]);
                    match find(&buf[before.saturating_sub(3)..], b"\r\n\r\n") {
                        None => {
                            if buf.len() > self.limit {
                                self.state = State::Done;
                                self.head_ends();
                                return;
                            }
                            data = &data[taken..];
                        }
                        Some(at) => {
                            let end = before.saturating_sub(3) + at + 4;
                            let next = after_head(&self.flag, &buf[..end]);
                            data = &data[end - before..];
                            self.state = next;
                            self.head_ends();
                        }
                    }
                }
                State::Body(n) => {
                    let k = (*n).min(data.len() as u64) as usize;
                    *n -= k as u64;
                    data = &data[k..];
                    if *n == 0 {
                        self.state = State::Head(Vec::new());
                    }
                }
                State::ChunkSize(line) => match data.iter().position(|b| *b == b'\n') {
                    Some(i) => {
                        line.extend_from_slice(&data[..i]);
                        data = &data[i + 1..];
                        let text = String::from_utf8_lossy(line);
                        let hex = text.split(';').next().unwrap_or("").trim();
                        self.state = match u64::from_str_radix(hex, 16) {
                            Ok(0) => State::Trailers(Vec::new()),
                            Ok(n) => State::ChunkData(n),
                            Err(_) => State::Done,
                        };
                    }
                    None => {
                        line.extend_from_slice(data);
                        if line.len() > 1024 {
                            self.state = State::Done;
                        }
                        return;
                    }
                },
                State::ChunkData(n) => {
                    let k = (*n).min(data.len() as u64) as usize;
                    *n -= k as u64;
                    data = &data[k..];
                    if *n == 0 {
                        self.state = State::ChunkEnd(2);
                    }
                }
                State::ChunkEnd(left) => {
                    let k = (*left as usize).min(data.len());
                    *left -= k as u8;
                    data = &data[k..];
                    if *left == 0 {
                        self.state = State::ChunkSize(Vec::new());
                    }
                }
                State::Trailers(line) => match data.iter().position(|b| *b == b'\n') {
                    Some(i) => {
                        line.extend_from_slice(&data[..i]);
                        data = &data[i + 1..];
                        let empty = line.iter().all(|b| *b == b'\r');
                        self.state = if empty {
                            State::Head(Vec::new())
                        } else {
                            State::Trailers(Vec::new())
                        };
                    }
                    None => {
                        line.extend_from_slice(data);
                        if line.len() > self.limit {
                            self.state = State::Done;
                        }
                        return;
                    }
                },
            }
        }
    }
}

/// What follows a request head; raises the flag on both framings.
fn after_head(flag: &Ambiguous, head: &[u8]) -> State {
    let mut headers = [httparse::EMPTY_HEADER; 128];
    let mut req = httparse::Request::new(&mut headers);
    if !matches!(req.parse(head), Ok(httparse::Status::Complete(_))) {
        return State::Done;
    }
    let (mut cl, mut te, mut chunked, mut upgrade) = (None, false, false, false);
    for h in req.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            cl = std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok());
            if cl.is_none() {
                return State::Done;
            }
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            te = true;
            chunked = String::from_utf8_lossy(h.value)
                .rsplit(',')
                .next()
                .is_some_and(|last| last.trim().eq_ignore_ascii_case("chunked"));
        } else if h.name.eq_ignore_ascii_case("upgrade") {
            upgrade = true;
        }
    }
    if te && cl.is_some() {
        flag.0.store(true, Ordering::Relaxed);
        return State::Done;
    }
    if upgrade || req.method == Some("CONNECT") {
        return State::Done;
    }
    if chunked {
        State::ChunkSize(Vec::new())
    } else if te {
        State::Done
    } else {
        match cl {
            Some(n) if n > 0 => State::Body(n),
            _ => State::Head(Vec::new()),
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

impl<S: AsyncRead + Unpin> AsyncRead for Framing<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && !matches!(self.state, State::Done) {
            let new = buf.filled()[before..].to_vec();
            self.feed(&new);
        }
        r
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

    fn scan(chunks: &[&[u8]]) -> bool {
        let flag = Arc::new(Ambiguous::default());
        let mut f = Framing::new((), 8192, flag.clone(), None);
        for c in chunks {
            f.feed(c);
        }
        flag.seen()
    }

    #[test]
    fn both_framings_are_spotted_wherever_the_head_is() {
        assert!(scan(&[
            b"POST / HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
        ]));
        // Split anywhere, after a body of each kind.
        let stream: &[u8] = b"POST /a HTTP/1.1\r\nContent-Length: 7\r\n\r\nabc\r\n\r\nPOST /b HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nx\r\n\r\n0\r\n\r\nGET /c HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 0\r\n\r\n";
        for cut in 1..stream.len() {
            assert!(scan(&[&stream[..cut], &stream[cut..]]), "cut at {cut}");
        }
        // Bodies that look like heads do not count.
        let innocent: &[u8] = b"POST /a HTTP/1.1\r\nContent-Length: 62\r\n\r\nGET / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\nGET /next HTTP/1.1\r\nHost: x\r\n\r\n";
        for cut in 1..innocent.len() {
            assert!(!scan(&[&innocent[..cut], &innocent[cut..]]), "cut at {cut}");
        }
    }
}

//! Follows the HTTP/2 frames a client sends, to close a connection that makes regobox work
//! without asking for anything: floods of SETTINGS, PING, PRIORITY, WINDOW_UPDATE, RST_STREAM,
//! empty DATA, CONTINUATION or unknown frames, each answered or processed by the `h2` crate
//! however many come (7.8 M SETTINGS in 10 s were seen answered).
//!
//! Every such frame costs a token; a connection starts with [`ALLOWANCE`] and earns more by
//! doing what a client is for: [`PER_REQUEST`] per request (a HEADERS frame), one per KiB of
//! request or response body, and [`PER_SECOND`] per second open. A connection that spends
//! more than it has is sent GOAWAY with ENHANCE_YOUR_CALM (as nginx does on its own flood
//! check) and closed: the `h2` crate never sees the frames of the read that overdrew it.
//!
//! It also tells the connection's watchdog when a head is arriving: the preface and first
//! frame, then each header block split over CONTINUATION frames (slowloris over HTTP/2).
//!
//! The GOAWAY is written here, below the `h2` crate, so this reader also follows the frames
//! written to the client, to write it between two of them; if a frame is half written (the
//! socket was full), the connection is closed without it. Following them also tells the
//! watchdog which response bodies are under way on the wire, and how much DATA went out.
//!
//! And it keeps each stream's send window as the wire shows it (the client's SETTINGS and
//! WINDOW_UPDATEs, the DATA written): a response held back by its stream's window, or by the
//! connection's, is the client's choice, not its socket's pace, and must move a piece within
//! `proxy.send_timeout` whatever the connection's other streams do (see [`Held::review`] and
//! `Activity::send_stalled`).

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll, ready};
use std::time::Instant;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::Activity;

/// Tokens a connection starts with.
pub const ALLOWANCE: u64 = 10_000;
/// Tokens earned per request.
pub const PER_REQUEST: u64 = 8;
/// Tokens earned per second open.
pub const PER_SECOND: u64 = 10;

/// The client connection preface (RFC 9113 3.4).
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const ENHANCE_YOUR_CALM: u32 = 0xb;

/// Where a stream of frames is: in a frame header (bytes of it so far) or in a payload; and the
/// payload of a frame whose payload is read ([`Cursor::keeps`]), so far.
#[derive(Debug, Default)]
struct Cursor {
    head: [u8; 9],
    filled: usize,
    payload_left: usize,
    /// Payloads of SETTINGS and WINDOW_UPDATE are kept (the client's side).
    keeps: bool,
    kept: Option<(Header, Vec<u8>)>,
}

/// The largest payload kept (the `h2` crate refuses larger frames: its maximum frame size is
/// the protocol's default).
const KEPT_MAX: usize = 16_384;

/// What a [`Cursor`] saw: a frame's header, then, for a kept frame, its payload.
enum Seen<'a> {
    Header(&'a Header),
    Payload(&'a Header, &'a [u8]),
}

/// A frame header.
#[derive(Debug, Clone, Copy)]
struct Header {
    len: usize,
    kind: u8,
    flags: u8,
    stream: u32,
}

impl Cursor {
    /// A cursor that keeps the payloads of SETTINGS (not acknowledgements) and WINDOW_UPDATE.
    fn keeping() -> Cursor {
        Cursor {
            keeps: true,
            ..Cursor::default()
        }
    }

    /// Follow `data`; `on` is called with each complete frame header, then with each kept
    /// frame's payload once it is whole.
    fn feed(&mut self, mut data: &[u8], mut on: impl FnMut(Seen<'_>)) {
        while !data.is_empty() {
            if self.payload_left > 0 {
                let k = self.payload_left.min(data.len());
                self.payload_left -= k;
                if let Some((header, payload)) = &mut self.kept {
                    payload.extend_from_slice(&data[..k]);
                    if self.payload_left == 0 {
                        on(Seen::Payload(header, payload));
                        self.kept = None;
                    }
                }
                data = &data[k..];
                continue;
            }
            let k = (9 - self.filled).min(data.len());
            self.head[self.filled..self.filled + k].copy_from_slice(&data[..k]);
            self.filled += k;
            data = &data[k..];
            if self.filled == 9 {
                let h = &self.head;
                let header = Header {
                    len: (h[0] as usize) << 16 | (h[1] as usize) << 8 | h[2] as usize,
                    kind: h[3],
                    flags: h[4],
                    stream: u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff,
                };
                self.filled = 0;
                self.payload_left = header.len;
                on(Seen::Header(&header));
                let kept = match header.kind {
                    0x4 => header.flags & 0x1 == 0 && header.len % 6 == 0,
                    0x8 => header.len == 4,
                    _ => false,
                };
                if self.keeps && kept && header.len <= KEPT_MAX {
                    if header.len == 0 {
                        on(Seen::Payload(&header, &[]));
                    } else {
                        self.kept = Some((header, Vec::with_capacity(header.len)));
                    }
                }
            }
        }
    }

    /// Between two frames.
    fn at_boundary(&self) -> bool {
        self.filled == 0 && self.payload_left == 0
    }
}

/// What a connection has spent and earned.
#[derive(Debug)]
struct Budget {
    spent: u64,
    requests: u64,
    body_read: u64,
    opened: Instant,
    /// The highest stream the client opened (for GOAWAY).
    last_stream: u32,
}

impl Budget {
    fn charge(&mut self, h: &Header) {
        match h.kind {
            // DATA: a body, unless it is empty and does not end the stream.
            0x0 => {
                self.body_read += h.len as u64;
                if h.len == 0 && h.flags & 0x1 == 0 {
                    self.spent += 1;
                }
            }
            // HEADERS: a request (or its trailers).
            0x1 => {
                self.requests += 1;
                if h.stream % 2 == 1 {
                    self.last_stream = self.last_stream.max(h.stream);
                }
            }
            _ => self.spent += 1,
        }
    }

    /// Whether the connection has spent more than it earned, `sent` bytes of responses included.
    fn overdrawn(&self, sent: u64) -> bool {
        let earned = ALLOWANCE + self.requests * PER_REQUEST + (self.body_read + sent) / 1024;
        // The clock only when the rest does not cover it.
        self.spent > earned && self.spent > earned + self.opened.elapsed().as_secs() * PER_SECOND
    }
}

/// A stream as the wire shows it, from its request's HEADERS to its response's end.
#[derive(Debug)]
struct Stream {
    id: u32,
    /// What the client lets regobox send on it: the initial window, its WINDOW_UPDATEs, less
    /// the DATA written (RFC 9113 6.9).
    window: i64,
    /// DATA bytes written on it.
    written: u64,
    /// Its response's head is written (HEADERS without END_STREAM).
    answered: bool,
    /// DATA written without END_STREAM: its body is under way (see `Activity::open_streams`).
    under_way: bool,
    held: Held,
}

/// Since when a send window has held a response back, and the DATA written on it then (see
/// [`Held::review`]).
#[derive(Debug, Clone, Copy, Default)]
struct Held(Option<(u64, u64)>);

impl Held {
    /// A window of `window` bytes, with `written` DATA bytes written on it so far, looked at
    /// `now` (ms on the connection's clock), for a response that waits on it (`waits`: its
    /// head is written).
    ///
    /// A response is held from the first look that finds its window at zero or below, and a
    /// piece of DATA ([`PIECE`]) written on it since makes that a new start. A window of a
    /// piece or more ends it: what comes next goes at the socket's pace, which the send queue
    /// watches. Between the two (a window of a few bytes at a time) the start stands: a client
    /// that lets a response out a byte at a time, or a few KB a minute, holds it still.
    fn review(&mut self, window: i64, written: u64, waits: bool, now: impl FnOnce() -> u64) {
        self.0 = match self.0 {
            _ if !waits || window >= PIECE as i64 => None,
            None if window <= 0 => Some((now(), written)),
            Some((_, at)) if written.saturating_sub(at) >= PIECE as u64 => {
                (window <= 0).then(|| (now(), written))
            }
            held => held,
        };
    }
}

/// A piece of a response (see `forward::PIECE`).
const PIECE: usize = super::forward::PIECE;

/// The client's initial stream window until its SETTINGS say otherwise.
const DEFAULT_WINDOW: i64 = 65_535;

/// The send windows: each stream's, the connection's, and the initial size the client set.
#[derive(Debug)]
struct Windows {
    streams: Vec<Stream>,
    initial: i64,
    connection: i64,
    connection_held: Held,
    /// DATA bytes written on the connection.
    written: u64,
    /// The highest stream a request opened: a stream above it is a new one.
    last_opened: u32,
}

impl Windows {
    fn new() -> Windows {
        Windows {
            streams: Vec::new(),
            initial: DEFAULT_WINDOW,
            connection: DEFAULT_WINDOW,
            connection_held: Held::default(),
            written: 0,
            last_opened: 0,
        }
    }

    fn at(&mut self, id: u32) -> Option<&mut Stream> {
        self.streams.iter_mut().find(|s| s.id == id)
    }

    /// A request's HEADERS read on `id`: a new stream if above every one before (trailers, and a
    /// stream already ended, are not).
    fn opened(&mut self, id: u32) {
        if id % 2 == 1 && id > self.last_opened {
            self.last_opened = id;
            self.streams.push(Stream {
                id,
                window: self.initial,
                written: 0,
                answered: false,
                under_way: false,
                held: Held::default(),
            });
        }
    }

    /// The stream `id`'s response ended (END_STREAM written, RST_STREAM either way); whether it
    /// was under way.
    fn ended(&mut self, id: u32) -> bool {
        match self.streams.iter().position(|s| s.id == id) {
            Some(i) => self.streams.swap_remove(i).under_way,
            None => false,
        }
    }

    /// The client's SETTINGS: a new initial window changes every stream's by the difference
    /// (RFC 9113 6.9.2).
    fn settings(&mut self, payload: &[u8]) {
        for entry in payload.chunks_exact(6) {
            if u16::from_be_bytes([entry[0], entry[1]]) == 0x4 {
                let size = i64::from(u32::from_be_bytes([entry[2], entry[3], entry[4], entry[5]]));
                let delta = size - self.initial;
                self.initial = size;
                for s in &mut self.streams {
                    s.window += delta;
                }
            }
        }
    }

    /// The client's WINDOW_UPDATE on `id` (0: the connection's).
    fn update(&mut self, id: u32, payload: &[u8]) {
        let Ok(increment) = <[u8; 4]>::try_from(payload) else {
            return;
        };
        let increment = i64::from(u32::from_be_bytes(increment) & 0x7fff_ffff);
        if id == 0 {
            self.connection += increment;
        } else if let Some(s) = self.at(id) {
            s.window += increment;
        }
    }

    /// DATA of `len` bytes written on `id`.
    fn data(&mut self, id: u32, len: u64) {
        self.connection -= len as i64;
        self.written += len;
        if let Some(s) = self.at(id) {
            s.window -= len as i64;
            s.written += len;
        }
    }

    /// Since when (ms) the longest-held response has been held by a window, looking at each
    /// again (see [`Held::review`]); [`super::NEVER`] if none is.
    fn held_since(&mut self, now: &mut impl FnMut() -> u64) -> u64 {
        let mut answered = false;
        let mut since = super::NEVER;
        for s in &mut self.streams {
            answered |= s.answered;
            s.held.review(s.window, s.written, s.answered, &mut *now);
            if let Some((t, _)) = s.held.0 {
                since = since.min(t);
            }
        }
        self.connection_held
            .review(self.connection, self.written, answered, &mut *now);
        if let Some((t, _)) = self.connection_held.0 {
            since = since.min(t);
        }
        since
    }
}

enum Phase {
    /// The client's preface: bytes of it still to come.
    Preface(usize),
    Frames,
    /// Overdrawn: the GOAWAY (and how much of it is written) before the connection closes.
    Calming([u8; 17], usize),
    Closed,
}

/// An HTTP/2 connection's stream (TLS, decrypted), its frames followed both ways.
pub struct Frames<S> {
    inner: S,
    phase: Phase,
    read: Cursor,
    written: Cursor,
    budget: Budget,
    windows: Windows,
    activity: Arc<Activity>,
}

impl<S> Frames<S> {
    pub fn new(inner: S, activity: Arc<Activity>) -> Self {
        // The preface and the first frame are the connection's first head: they must arrive
        // within the header deadline, as an HTTP/1.1 request's head must.
        activity.head_begins();
        Frames {
            inner,
            phase: Phase::Preface(PREFACE.len()),
            read: Cursor::keeping(),
            written: Cursor::default(),
            budget: Budget {
                spent: 0,
                requests: 0,
                body_read: 0,
                opened: super::clock::now(),
                last_stream: 0,
            },
            windows: Windows::new(),
            activity,
        }
    }

    /// Follow `data`, written to the client: the response bodies under way and ended on the
    /// wire, the DATA written, the windows it took.
    fn follow_written(&mut self, data: &[u8]) {
        let windows = &mut self.windows;
        let mut bytes = 0u64;
        let mut control = 0u64;
        let mut ended = 0;
        self.written.feed(data, |seen| {
            let Seen::Header(h) = seen else {
                return;
            };
            let ends = h.flags & 0x1 != 0;
            match h.kind {
                0x0 => {
                    bytes += h.len as u64;
                    windows.data(h.stream, h.len as u64);
                    if !ends && let Some(s) = windows.at(h.stream) {
                        s.under_way = true;
                    }
                }
                _ => control += 9 + h.len as u64,
            }
            let closed = match h.kind {
                0x0 | 0x1 if ends => windows.ended(h.stream),
                0x3 => windows.ended(h.stream),
                0x1 => {
                    if let Some(s) = windows.at(h.stream) {
                        s.answered = true;
                    }
                    false
                }
                _ => false,
            };
            ended += usize::from(closed);
        });
        self.settle();
        for _ in 0..ended {
            self.activity.stream_ended();
        }
        if bytes > 0 {
            self.activity
                .data_written
                .fetch_add(bytes, Ordering::Relaxed);
        }
        if control > 0 {
            self.activity
                .control_written
                .fetch_add(control, Ordering::Relaxed);
        }
    }

    /// Tell the watchdog what the windows and the streams under way are now.
    fn settle(&mut self) {
        let activity = &self.activity;
        let under_way = self.windows.streams.iter().filter(|s| s.under_way).count();
        activity.open_streams.store(under_way, Ordering::Relaxed);
        let mut now = None;
        let since = self
            .windows
            .held_since(&mut || *now.get_or_insert_with(|| activity.now_ms()));
        activity.window_held_ms.store(since, Ordering::Relaxed);
    }

    /// Follow `data`, read from the client; false once the connection is overdrawn.
    fn follow(&mut self, mut data: &[u8]) -> bool {
        if let Phase::Preface(left) = &mut self.phase {
            let k = (*left).min(data.len());
            *left -= k;
            data = &data[k..];
            if *left > 0 {
                return true;
            }
            self.phase = Phase::Frames;
        }
        let budget = &mut self.budget;
        let activity = &self.activity;
        let windows = &mut self.windows;
        let mut overdrawn = false;
        let mut ended = 0;
        let sent = activity.sent.load(Ordering::Relaxed);
        self.read.feed(data, |seen| {
            let h = match seen {
                Seen::Header(h) => h,
                Seen::Payload(h, payload) => {
                    match h.kind {
                        0x4 => windows.settings(payload),
                        _ => windows.update(h.stream, payload),
                    }
                    return;
                }
            };
            match h.kind {
                0x1 => windows.opened(h.stream),
                0x3 => ended += usize::from(windows.ended(h.stream)),
                _ => {}
            }
            // A header block is a head too: from a HEADERS frame without END_HEADERS to the
            // CONTINUATION with it (nothing may come between them); the preface's deadline
            // ends with the first frame.
            match (h.kind, h.flags & 0x4 != 0) {
                (0x1, false) => activity.head_begins(),
                (0x9, false) => {}
                _ => activity.head_ends(),
            }
            budget.charge(h);
            overdrawn = overdrawn || budget.overdrawn(sent);
        });
        self.settle();
        for _ in 0..ended {
            self.activity.stream_ended();
        }
        !overdrawn
    }

    fn calm(&mut self) {
        let mut goaway = [0u8; 17];
        goaway[..9].copy_from_slice(&[0, 0, 8, 0x7, 0, 0, 0, 0, 0]);
        goaway[9..13].copy_from_slice(&self.budget.last_stream.to_be_bytes());
        goaway[13..].copy_from_slice(&ENHANCE_YOUR_CALM.to_be_bytes());
        if let Some(left_out) = super::forward::CLIENT_ERRORS.should_log() {
            tracing::info!(target: "regobox::proxy", frames = self.budget.spent, requests = self.budget.requests, similar_left_out = left_out, "an HTTP/2 client sent control frames far beyond its requests (a flood); GOAWAY ENHANCE_YOUR_CALM, connection closed");
        }
        self.phase = if self.written.at_boundary() {
            Phase::Calming(goaway, 0)
        } else {
            Phase::Closed
        };
    }
}

impl<S: AsyncWrite + Unpin> Frames<S> {
    /// Write the GOAWAY out, then the connection is closed.
    fn poll_goaway(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        while let Phase::Calming(goaway, done) = &mut self.phase {
            if *done == goaway.len() {
                let _ = ready!(Pin::new(&mut self.inner).poll_flush(cx));
                self.phase = Phase::Closed;
                break;
            }
            match ready!(Pin::new(&mut self.inner).poll_write(cx, &goaway[*done..])) {
                Ok(n) if n > 0 => *done += n,
                _ => self.phase = Phase::Closed,
            }
        }
        Poll::Ready(())
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for Frames<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        if matches!(this.phase, Phase::Calming(..)) {
            ready!(this.poll_goaway(cx));
        }
        if matches!(this.phase, Phase::Closed) {
            // The end of the connection, as far as the `h2` crate is concerned.
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
        if !this.follow(&buf.filled()[before..]) {
            buf.set_filled(before);
            this.calm();
            ready!(this.poll_goaway(cx));
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Frames<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = &mut *self;
        match this.phase {
            Phase::Calming(..) => {
                ready!(this.poll_goaway(cx));
                return Poll::Ready(Err(std::io::ErrorKind::BrokenPipe.into()));
            }
            Phase::Closed => return Poll::Ready(Err(std::io::ErrorKind::BrokenPipe.into())),
            _ => {}
        }
        let n = ready!(Pin::new(&mut this.inner).poll_write(cx, buf))?;
        this.follow_written(&buf[..n]);
        Poll::Ready(Ok(n))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        if matches!(this.phase, Phase::Calming(..)) {
            ready!(this.poll_goaway(cx));
        }
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = payload.len();
        let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    fn frames() -> Frames<()> {
        let mut f = Frames::new((), Activity::new());
        assert!(f.follow(PREFACE));
        f
    }

    /// The client's requests on `streams` (HEADERS with END_STREAM).
    fn requests(f: &mut Frames<()>, streams: &[u32]) {
        for s in streams {
            assert!(f.follow(&frame(0x1, 0x5, *s, &[0x82; 4])));
        }
    }

    fn held(f: &Frames<()>) -> Option<u64> {
        let t = f.activity.window_held_ms.load(Ordering::Relaxed);
        (t != super::super::NEVER).then_some(t)
    }

    #[test]
    fn response_bodies_under_way_are_followed_across_writes_and_resets() {
        let mut f = frames();
        requests(&mut f, &[1, 3, 5, 7]);
        let open = |f: &Frames<()>| f.activity.open_streams.load(Ordering::Relaxed);
        // A final head, then DATA, split anywhere.
        let mut out = frame(0x1, 0x4, 1, b"head");
        out.extend(frame(0x0, 0, 1, &[7u8; 10]));
        for piece in out.chunks(5) {
            f.follow_written(piece);
        }
        assert_eq!(open(&f), 1);
        assert_eq!(f.activity.data_written.load(Ordering::Relaxed), 10);
        // An interim head (100 Continue) begins nothing; a body in one frame with END_STREAM
        // ends as it begins; trailers end a body.
        f.follow_written(&frame(0x1, 0x4, 3, b"100"));
        f.follow_written(&frame(0x0, 0x1, 3, &[7u8; 5]));
        f.follow_written(&frame(0x0, 0, 5, &[7u8; 1]));
        assert_eq!(open(&f), 2);
        f.follow_written(&frame(0x1, 0x5, 5, b"trailers"));
        assert_eq!(open(&f), 1);
        // The client cancels stream 1; and regobox resets stream 7.
        assert!(f.follow(&frame(0x3, 0, 1, &8u32.to_be_bytes())));
        assert_eq!(open(&f), 0);
        f.follow_written(&frame(0x0, 0, 7, &[7u8; 3]));
        f.follow_written(&frame(0x3, 0, 7, &8u32.to_be_bytes()));
        assert_eq!(open(&f), 0);
        assert_eq!(f.activity.data_written.load(Ordering::Relaxed), 19);
        // DATA h2 writes on a stream the client has just reset (before it read the reset) and
        // trailers on a stream that has ended open nothing again.
        f.follow_written(&frame(0x0, 0, 1, &[7u8; 3]));
        assert!(f.follow(&frame(0x1, 0x5, 3, b"trailers")));
        f.follow_written(&frame(0x0, 0, 3, &[7u8; 3]));
        assert_eq!(open(&f), 0);
        assert!(f.windows.streams.is_empty());
    }

    #[test]
    fn a_response_held_by_its_window_is_held_until_a_piece_moves_or_the_window_opens() {
        let mut f = frames();
        // The client's initial window: 1 000 bytes (SETTINGS split across reads).
        let settings = frame(0x4, 0, 0, &[0, 4, 0, 0, 0x03, 0xe8]);
        assert!(f.follow(&settings[..7]));
        assert!(f.follow(&settings[7..]));
        requests(&mut f, &[1, 3]);
        assert_eq!(held(&f), None);
        // Stream 1 answered and its window used up: held; stream 3 answered, window left.
        f.follow_written(&frame(0x1, 0x4, 1, b"head"));
        f.follow_written(&frame(0x1, 0x4, 3, b"head"));
        assert_eq!(held(&f), None);
        f.follow_written(&frame(0x0, 0, 1, &[7u8; 1000]));
        let first = held(&f).expect("a response at a zero window is held");
        // A byte of window at a time does not change when it began.
        for _ in 0..5 {
            assert!(f.follow(&frame(0x8, 0, 1, &1u32.to_be_bytes())));
            f.follow_written(&frame(0x0, 0, 1, &[7u8; 1]));
            assert_eq!(held(&f), Some(first));
        }
        // The window opened by a piece or more: no longer held.
        assert!(f.follow(&frame(0x8, 0, 1, &(PIECE as u32).to_be_bytes())));
        assert_eq!(held(&f), None);
        // Used up again, then a piece let out a few KB at a time: a new start.
        f.follow_written(&frame(0x0, 0, 1, &vec![7u8; PIECE]));
        let again = held(&f).expect("held again");
        assert_eq!(
            f.windows.at(1).unwrap().held.0.unwrap().1,
            1005 + PIECE as u64
        );
        for _ in 0..4 {
            assert!(f.follow(&frame(0x8, 0, 1, &4096u32.to_be_bytes())));
            f.follow_written(&frame(0x0, 0, 1, &[7u8; 4096]));
        }
        assert!(held(&f).is_some_and(|t| t >= again));
        assert_eq!(
            f.windows.at(1).unwrap().held.0.unwrap().1,
            1005 + 2 * PIECE as u64,
            "a piece moved: a new start"
        );
        // A new initial window larger by a piece opens every stream's window with it.
        let grown = (1000 + PIECE as u32).to_be_bytes();
        assert!(f.follow(&frame(
            0x4,
            0,
            0,
            &[0, 4, grown[0], grown[1], grown[2], grown[3]]
        )));
        assert_eq!(f.windows.at(1).unwrap().window, PIECE as i64);
        assert_eq!(held(&f), None);
        // Its end: nothing held.
        f.follow_written(&frame(0x0, 0, 1, &vec![7u8; PIECE]));
        assert!(held(&f).is_some());
        f.follow_written(&frame(0x0, 0x1, 1, &[]));
        assert_eq!(held(&f), None);
        // A SETTINGS acknowledgement changes nothing; a window below zero (a smaller initial
        // window) holds.
        assert!(f.follow(&frame(0x4, 0x1, 0, &[])));
        assert!(f.follow(&frame(0x4, 0, 0, &[0, 4, 0, 0, 0, 0])));
        assert_eq!(f.windows.at(3).unwrap().window, 0);
        assert!(held(&f).is_some());
        assert!(f.follow(&frame(0x3, 0, 3, &8u32.to_be_bytes())));
        assert_eq!(held(&f), None);
    }

    #[test]
    fn a_connection_window_used_up_holds_the_responses_waiting_on_it() {
        let mut f = frames();
        assert!(f.follow(&frame(0x4, 0, 0, &[0, 4, 0, 0x10, 0, 0])));
        requests(&mut f, &[1]);
        f.follow_written(&frame(0x1, 0x4, 1, b"head"));
        // 65 535 bytes: the connection's window, not the stream's (1 MiB).
        for _ in 0..3 {
            f.follow_written(&frame(0x0, 0, 1, &vec![7u8; 16384]));
        }
        assert_eq!(held(&f), None);
        f.follow_written(&frame(0x0, 0, 1, &vec![7u8; 16383]));
        assert!(held(&f).is_some());
        assert!(f.follow(&frame(0x8, 0, 0, &100u32.to_be_bytes())));
        assert!(held(&f).is_some());
        assert!(f.follow(&frame(0x8, 0, 0, &(PIECE as u32).to_be_bytes())));
        assert_eq!(held(&f), None);
    }

    #[test]
    fn control_frame_floods_overdraw_and_requests_do_not() {
        for (kind, flags, payload) in [
            (0x4u8, 0u8, &[0u8, 3, 0, 0, 0, 100][..]),
            (0x6, 0, &[0u8; 8][..]),
            (0x2, 0, &[0u8, 0, 0, 0, 16][..]),
            (0x8, 0, &[0u8, 0, 0, 1][..]),
            (0x0, 0, &[][..]),
            (0x42, 0, &[0u8; 100][..]),
        ] {
            let mut f = frames();
            let one = frame(
                kind,
                flags,
                if kind == 0x4 || kind == 0x6 { 0 } else { 1 },
                payload,
            );
            // Split anywhere: the frames are followed across reads.
            let flood: Vec<u8> = one
                .iter()
                .copied()
                .cycle()
                .take(one.len() * 10_500)
                .collect();
            let (a, b) = flood.split_at(flood.len() / 3 + 1);
            assert!(!(f.follow(a) && f.follow(b)), "kind {kind:#x}");
        }
        // Many requests, each with its WINDOW_UPDATE and RST_STREAM, and a large upload in
        // 16 KiB DATA frames with a WINDOW_UPDATE each: never overdrawn.
        let mut f = frames();
        for stream in (1..40_000u32).step_by(2) {
            let mut req = frame(0x1, 0x5, stream, &[0x82; 20]);
            req.extend(frame(0x8, 0, stream, &[0, 0, 1, 0]));
            req.extend(frame(0x3, 0, stream, &[0, 0, 0, 8]));
            assert!(f.follow(&req));
        }
        assert_eq!(f.budget.last_stream, 39_999);
        let mut f = frames();
        for _ in 0..20_000 {
            let mut data = frame(0x0, 0, 1, &[0u8; 16384]);
            data.extend(frame(0x8, 0, 0, &[0, 0, 0x40, 0]));
            assert!(f.follow(&data));
        }
    }
}

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
//! watchdog which response bodies are under way on the wire, and how much DATA went out: the
//! end of a body that h2 keeps for a client's window is watched by `proxy.send_timeout` too
//! (see `Activity::send_stalled`).

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

/// Where a stream of frames is: in a frame header (bytes of it so far) or in a payload.
#[derive(Debug, Default)]
struct Cursor {
    head: [u8; 9],
    filled: usize,
    payload_left: usize,
}

/// A frame header.
struct Header {
    len: usize,
    kind: u8,
    flags: u8,
    stream: u32,
}

impl Cursor {
    /// Follow `data`; `on_header` is called with each complete frame header.
    fn feed(&mut self, mut data: &[u8], mut on_header: impl FnMut(&Header)) {
        while !data.is_empty() {
            if self.payload_left > 0 {
                let k = self.payload_left.min(data.len());
                self.payload_left -= k;
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
                on_header(&header);
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

/// Note in `open` that a stream's response body is under way on the wire (DATA without
/// END_STREAM: not HEADERS, which may be an interim 100 Continue) or ended (END_STREAM,
/// RST_STREAM either way).
/// Whether it ended a stream that was open.
fn response(open: &mut Vec<u32>, stream: u32, begins: bool) -> bool {
    let at = open.iter().position(|s| *s == stream);
    match (begins, at) {
        (true, None) => open.push(stream),
        (false, Some(i)) => {
            open.swap_remove(i);
            return true;
        }
        _ => {}
    }
    false
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
    /// The streams whose response body is under way on the wire and not ended (see
    /// `Activity::open_streams`).
    open: Vec<u32>,
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
            read: Cursor::default(),
            written: Cursor::default(),
            budget: Budget {
                spent: 0,
                requests: 0,
                body_read: 0,
                opened: super::clock::now(),
                last_stream: 0,
            },
            open: Vec::new(),
            activity,
        }
    }

    /// Follow `data`, written to the client: the response bodies under way and ended on the
    /// wire, the DATA written.
    fn follow_written(&mut self, data: &[u8]) {
        let open = &mut self.open;
        let mut bytes = 0u64;
        let mut control = 0u64;
        let mut ended = 0;
        self.written.feed(data, |h| {
            let ends = h.flags & 0x1 != 0;
            if h.kind != 0x0 {
                control += 9 + h.len as u64;
            }
            let closed = match h.kind {
                0x0 => {
                    bytes += h.len as u64;
                    response(open, h.stream, !ends)
                }
                0x1 if ends => response(open, h.stream, false),
                0x3 => response(open, h.stream, false),
                _ => false,
            };
            ended += usize::from(closed);
        });
        self.activity
            .open_streams
            .store(self.open.len(), Ordering::Relaxed);
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
        let open = &mut self.open;
        let mut overdrawn = false;
        let sent = activity.sent.load(Ordering::Relaxed);
        self.read.feed(data, |h| {
            if h.kind == 0x3 && response(open, h.stream, false) {
                activity.open_streams.store(open.len(), Ordering::Relaxed);
                activity.stream_ended();
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

    #[test]
    fn response_bodies_under_way_are_followed_across_writes_and_resets() {
        let mut f = frames();
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

//! The access log: one line per request, on regobox's log output (stderr), in its format (text
//! or JSON). Lines are gathered per proxy worker thread and written in batches (at 32 KiB, every
//! 250 ms, and when the worker stops), so that a busy proxy does not pay a system call per
//! request.

use std::cell::RefCell;
use std::fmt::Write as _;
use std::io::Write as _;
use std::time::{Duration, UNIX_EPOCH};

use crate::logs::Format;

const FLUSH_AT: usize = 32 * 1024;

thread_local! {
    static BUFFER: RefCell<String> = RefCell::new(String::with_capacity(FLUSH_AT + 1024));
    /// The timestamp down to the second, rendered once per second: (unix second, text).
    static SECOND: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
}

/// One request, as logged (`-` for what could not be read of it: see `forward::ConnCtx::refused`).
pub struct Line<'a> {
    pub peer: &'a str,
    pub method: &'a str,
    pub path: &'a str,
    pub version: Option<hyper::Version>,
    pub status: u16,
    pub bytes: u64,
    pub duration: Duration,
    pub upstream: Option<Duration>,
}

/// Milliseconds with two decimals, as text, without going through a float.
fn push_millis(out: &mut String, d: Duration) {
    let micros = d.as_micros() as u64;
    push_int(out, micros / 1000, 0);
    out.push('.');
    push_int(out, micros % 1000 / 10, 2);
}

/// `text` with what is not visible ASCII (a space too: it separates the line's fields), `"` and
/// `\` written as `\xHH` (each byte), as nginx writes its access log: a path over HTTP/2 may
/// hold any UTF-8, line separators (U+2028, U+0085) and reordering marks (U+202E) included,
/// which some readers of a text log take for a line's end or turn around.
fn push_escaped(out: &mut String, text: &str) {
    let plain = |b: u8| (0x21..0x7f).contains(&b) && b != b'"' && b != b'\\';
    if text.bytes().all(plain) {
        out.push_str(text);
        return;
    }
    for b in text.bytes() {
        if plain(b) {
            out.push(b as char);
        } else {
            let _ = write!(out, "\\x{b:02X}");
        }
    }
}

/// `n` in decimal, zero-padded to `width`. (The access log is written for every request: this
/// is cheaper than the formatting machinery.)
fn push_int(out: &mut String, n: u64, width: usize) {
    let mut buffer = itoa::Buffer::new();
    let digits = buffer.format(n);
    for _ in digits.len()..width {
        out.push('0');
    }
    out.push_str(digits);
}

fn millis(d: Duration) -> f64 {
    (d.as_micros() / 10) as f64 / 100.0
}

fn version(v: Option<hyper::Version>) -> &'static str {
    match v {
        None => "-",
        Some(hyper::Version::HTTP_09) => "HTTP/0.9",
        Some(hyper::Version::HTTP_10) => "HTTP/1.0",
        Some(hyper::Version::HTTP_11) => "HTTP/1.1",
        Some(hyper::Version::HTTP_2) => "HTTP/2.0",
        Some(hyper::Version::HTTP_3) => "HTTP/3.0",
        Some(_) => "HTTP/?",
    }
}

/// `2026-11-22T03:28:34.123456Z` (RFC 3339, microseconds, UTC), as regobox's other lines.
fn timestamp(out: &mut String) {
    let now = super::clock::wall()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    SECOND.with(|cached| {
        let mut cached = cached.borrow_mut();
        if cached.0 != now.as_secs() {
            let at = chrono::DateTime::<chrono::Utc>::from(
                UNIX_EPOCH + Duration::from_secs(now.as_secs()),
            );
            *cached = (now.as_secs(), at.format("%Y-%m-%dT%H:%M:%S").to_string());
        }
        out.push_str(&cached.1);
    });
    out.push('.');
    push_int(out, now.subsec_micros().into(), 6);
    out.push('Z');
}

pub fn record(line: &Line<'_>) {
    BUFFER.with(|b| {
        let mut b = b.borrow_mut();
        match crate::logs::format() {
            Format::Text => {
                let b = &mut *b;
                timestamp(b);
                b.push_str("  INFO access peer=");
                b.push_str(line.peer);
                b.push_str(" method=");
                b.push_str(line.method);
                b.push_str(" path=");
                push_escaped(b, line.path);
                b.push_str(" version=");
                b.push_str(version(line.version));
                b.push_str(" status=");
                push_int(b, line.status.into(), 0);
                b.push_str(" bytes=");
                push_int(b, line.bytes, 0);
                b.push_str(" duration_ms=\"");
                push_millis(b, line.duration);
                b.push_str("\" upstream_ms=\"");
                match line.upstream {
                    Some(u) => push_millis(b, u),
                    None => b.push('-'),
                }
                b.push_str("\"\n");
            }
            Format::Json => {
                let mut now = String::new();
                timestamp(&mut now);
                let v = serde_json::json!({
                    "timestamp": now,
                    "level": "INFO",
                    "fields": {
                        "message": "access",
                        "peer": line.peer,
                        "method": line.method,
                        "path": line.path,
                        "version": version(line.version),
                        "status": line.status,
                        "bytes": line.bytes,
                        "duration_ms": millis(line.duration),
                        "upstream_ms": line.upstream.map(millis),
                    },
                    "target": "regobox::proxy::access",
                });
                let _ = writeln!(b, "{v}");
            }
        }
        if b.len() >= FLUSH_AT {
            write_out(&mut b);
        }
    });
}

/// Write what this thread has gathered.
pub fn flush() {
    BUFFER.with(|b| write_out(&mut b.borrow_mut()));
}

fn write_out(buffer: &mut String) {
    if !buffer.is_empty() {
        let _ = std::io::stderr().lock().write_all(buffer.as_bytes());
        buffer.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_path_is_logged_on_one_line_as_it_reads() {
        let escaped = |t: &str| {
            let mut s = String::new();
            push_escaped(&mut s, t);
            s
        };
        assert_eq!(escaped("/job/a?b=c&d=%20"), "/job/a?b=c&d=%20");
        assert_eq!(
            escaped("/a\u{2028}b\u{85}c\u{202e}d"),
            "/a\\xE2\\x80\\xA8b\\xC2\\x85c\\xE2\\x80\\xAEd"
        );
        assert_eq!(
            escaped("/\" status=200 \\"),
            "/\\x22\\x20status=200\\x20\\x5C"
        );
        assert_eq!(escaped("/\u{7f}\t"), "/\\x7F\\x09");
    }

    #[test]
    fn millis_and_timestamps() {
        let text = |d| {
            let mut s = String::new();
            push_millis(&mut s, d);
            s
        };
        assert_eq!(text(Duration::from_micros(12_345)), "12.34");
        assert_eq!(text(Duration::from_micros(7)), "0.00");
        assert_eq!(text(Duration::from_micros(2_000_050)), "2000.05");
        let mut padded = String::new();
        push_int(&mut padded, 42, 6);
        assert_eq!(padded, "000042");
        assert_eq!(millis(Duration::from_micros(12_345)), 12.34);
        let mut a = String::new();
        timestamp(&mut a);
        let parsed = chrono::DateTime::parse_from_rfc3339(&a).unwrap();
        let age = chrono::Utc::now().signed_duration_since(parsed);
        assert!(
            age >= chrono::TimeDelta::zero() && age < chrono::TimeDelta::seconds(5),
            "{a}"
        );
        assert_eq!(a.len(), "2026-11-22T03:28:34.123456Z".len(), "{a}");
    }
}

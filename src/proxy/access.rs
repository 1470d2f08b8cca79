//! The access log: one line per request, on regobox's log output (stderr), in its format (text
//! or JSON). Lines are gathered per proxy worker thread and written in batches (at 32 KiB, every
//! 250 ms, and when the worker stops), so that a busy proxy does not pay a system call per
//! request.

use std::cell::RefCell;
use std::fmt::Write as _;
use std::io::Write as _;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::logs::Format;

const FLUSH_AT: usize = 32 * 1024;

thread_local! {
    static BUFFER: RefCell<String> = RefCell::new(String::with_capacity(FLUSH_AT + 1024));
    /// The timestamp down to the second, rendered once per second: (unix second, text).
    static SECOND: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
}

/// One request, as logged.
pub struct Line<'a> {
    pub peer: &'a str,
    pub method: &'a str,
    pub path: &'a str,
    pub version: hyper::Version,
    pub status: u16,
    pub bytes: u64,
    pub duration: Duration,
    pub upstream: Option<Duration>,
}

/// Milliseconds with two decimals, as text, without going through a float.
struct Millis(Duration);

impl std::fmt::Display for Millis {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let micros = self.0.as_micros();
        write!(f, "{}.{:02}", micros / 1000, micros % 1000 / 10)
    }
}

fn millis(d: Duration) -> f64 {
    (d.as_micros() / 10) as f64 / 100.0
}

/// `2026-11-22T03:28:34.123456Z` (RFC 3339, microseconds, UTC), as regobox's other lines.
fn timestamp(out: &mut String) {
    let now = SystemTime::now()
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
    let _ = write!(out, ".{:06}Z", now.subsec_micros());
}

pub fn record(line: &Line<'_>) {
    BUFFER.with(|b| {
        let mut b = b.borrow_mut();
        match crate::logs::format() {
            Format::Text => {
                timestamp(&mut b);
                let _ = write!(
                    b,
                    "  INFO access peer={} method={} path={} version={:?} status={} bytes={} duration_ms=\"{}\" upstream_ms=\"",
                    line.peer,
                    line.method,
                    line.path,
                    line.version,
                    line.status,
                    line.bytes,
                    Millis(line.duration),
                );
                let _ = match line.upstream {
                    Some(u) => writeln!(b, "{}\"", Millis(u)),
                    None => writeln!(b, "-\""),
                };
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
                        "version": format!("{:?}", line.version),
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
    fn millis_and_timestamps() {
        assert_eq!(Millis(Duration::from_micros(12_345)).to_string(), "12.34");
        assert_eq!(Millis(Duration::from_micros(7)).to_string(), "0.00");
        assert_eq!(Millis(Duration::from_secs(2)).to_string(), "2000.00");
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

//! The access log: one line per request, on regobox's log output (stderr), in its format (text
//! or JSON). Lines are gathered per proxy worker thread and written in batches (at 32 KiB, every
//! 250 ms, and when the worker stops), so that a busy proxy does not pay a system call per
//! request.

use std::cell::RefCell;
use std::fmt::Write as _;
use std::io::Write as _;
use std::net::IpAddr;

use crate::logs::Format;

const FLUSH_AT: usize = 32 * 1024;

thread_local! {
    static BUFFER: RefCell<String> = RefCell::new(String::with_capacity(FLUSH_AT + 1024));
}

/// One request, as logged.
pub struct Line<'a> {
    pub peer: IpAddr,
    pub method: &'a str,
    pub path: &'a str,
    pub version: hyper::Version,
    pub status: u16,
    pub bytes: u64,
    pub duration_ms: f64,
    pub upstream_ms: Option<f64>,
}

pub fn record(line: &Line<'_>) {
    BUFFER.with(|b| {
        let mut b = b.borrow_mut();
        let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
        let upstream = line
            .upstream_ms
            .map(|u| format!("{u:.2}"))
            .unwrap_or_else(|| "-".into());
        match crate::logs::format() {
            Format::Text => {
                let _ = writeln!(
                    b,
                    "{now}  INFO access peer={} method={} path={} version={:?} status={} bytes={} duration_ms=\"{:.2}\" upstream_ms=\"{upstream}\"",
                    line.peer,
                    line.method,
                    line.path,
                    line.version,
                    line.status,
                    line.bytes,
                    line.duration_ms,
                );
            }
            Format::Json => {
                let v = serde_json::json!({
                    "timestamp": now,
                    "level": "INFO",
                    "fields": {
                        "message": "access",
                        "peer": line.peer.to_string(),
                        "method": line.method,
                        "path": line.path,
                        "version": format!("{:?}", line.version),
                        "status": line.status,
                        "bytes": line.bytes,
                        "duration_ms": (line.duration_ms * 100.0).round() / 100.0,
                        "upstream_ms": line.upstream_ms.map(|u| (u * 100.0).round() / 100.0),
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

//! Forwarding a child's output to regobox's own output, line by line.
//!
//! Each line a child writes is printed on regobox's stdout prefixed with the child's name. Lines
//! are read with a bounded buffer: a line longer than [`MAX_LINE`] is cut into several, and
//! invalid UTF-8 is replaced, so a misbehaving child cannot exhaust memory or break the output.

use std::io::Write;

use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};

/// The longest line forwarded as one; longer ones are split.
pub const MAX_LINE: usize = 64 * 1024;

/// Where forwarded lines go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sink {
    Stdout,
    /// For children whose output must not mix with a command's own (a temporary server while
    /// `regobox psql` writes query results on stdout).
    Stderr,
}

/// Forward every line of `reader` as `<name> | <line>` until end of file.
pub async fn forward(name: String, reader: impl AsyncRead + Unpin, sink: Sink) {
    let mut reader = BufReader::with_capacity(MAX_LINE, reader);
    let mut line: Vec<u8> = Vec::with_capacity(1024);
    loop {
        let (consumed, done_line) = match reader.fill_buf().await {
            Ok([]) => {
                if !line.is_empty() {
                    emit(&name, &line, sink);
                }
                return;
            }
            Ok(buf) => match buf.iter().position(|b| *b == b'\n') {
                Some(i) => {
                    line.extend_from_slice(&buf[..i]);
                    (i + 1, true)
                }
                None => {
                    let take = buf.len().min(MAX_LINE - line.len());
                    line.extend_from_slice(&buf[..take]);
                    (take, line.len() >= MAX_LINE)
                }
            },
            Err(_) => return,
        };
        reader.consume(consumed);
        if done_line {
            emit(&name, &line, sink);
            line.clear();
        }
    }
}

fn emit(name: &str, line: &[u8], sink: Sink) {
    let text = String::from_utf8_lossy(line);
    let text = text.trim_end_matches('\r');
    let _ = match sink {
        Sink::Stdout => writeln!(std::io::stdout().lock(), "{name} | {text}"),
        Sink::Stderr => writeln!(std::io::stderr().lock(), "{name} | {text}"),
    };
}

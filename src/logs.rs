//! Forwarding a child's output to regobox's own output, line by line, and to rotated files.
//!
//! Each line a child writes is printed on regobox's stdout prefixed with the child's name
//! (`web | ...`), or as one JSON object per line with `--log-format json`, and appended to
//! `<volumes.root>/logs/<name>.log`, which is rotated by size. Lines are read with a bounded
//! buffer: a line longer than [`MAX_LINE`] is cut into several, and invalid UTF-8 is replaced, so a
//! misbehaving child can neither exhaust memory nor break the output.

use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};

/// The longest line forwarded as one; longer ones are split.
pub const MAX_LINE: usize = 64 * 1024;

/// How regobox writes log lines (its own on stderr, its children's on stdout).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Text,
    Json,
}

static FORMAT: OnceLock<Format> = OnceLock::new();

/// Choose the format of forwarded lines (once, at start).
pub fn set_format(format: Format) {
    let _ = FORMAT.set(format);
}

pub(crate) fn format() -> Format {
    FORMAT.get().copied().unwrap_or(Format::Text)
}

/// Where forwarded lines go on the console.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sink {
    Stdout,
    /// For children whose output must not mix with a command's own (a temporary server while
    /// `regobox psql` writes query results on stdout).
    Stderr,
}

/// A log file rotated by size: `name.log`, then `name.log.1` ... `name.log.<keep>`.
#[derive(Debug)]
pub struct LogFile {
    path: PathBuf,
    max_bytes: u64,
    keep: u32,
    file: Option<File>,
    size: u64,
}

/// A log file shared by the forwarders of one child's stdout and stderr.
pub type SharedLogFile = Arc<Mutex<LogFile>>;

/// Shown each line a child writes, after it is forwarded (regobox reads PostgreSQL's output for
/// the writes that fail for lack of space).
pub type Observer = Arc<dyn Fn(&str) + Send + Sync>;

impl LogFile {
    /// Open (append) `<dir>/<name>.log`, never through a link (see [`open_append`]).
    pub fn open(dir: &Path, name: &str, max_bytes: u64, keep: u32) -> io::Result<SharedLogFile> {
        let path = dir.join(format!("{name}.log"));
        let file = open_append(&path)?;
        let size = file.metadata()?.len();
        Ok(Arc::new(Mutex::new(LogFile {
            path,
            max_bytes,
            keep,
            file: Some(file),
            size,
        })))
    }

    pub fn write_line(&mut self, line: &str) {
        let needed = line.len() as u64 + 1;
        if self.size > 0 && self.size + needed > self.max_bytes {
            self.rotate();
        }
        if let Some(f) = self.file.as_mut() {
            if f.write_all(line.as_bytes())
                .and_then(|_| f.write_all(b"\n"))
                .is_ok()
            {
                self.size += needed;
            }
        }
    }

    fn rotate(&mut self) {
        self.file = None;
        let numbered = |n: u32| PathBuf::from(format!("{}.{n}", self.path.display()));
        if self.keep == 0 {
            let _ = std::fs::remove_file(&self.path);
        } else {
            let _ = std::fs::remove_file(numbered(self.keep));
            for n in (1..self.keep).rev() {
                let _ = std::fs::rename(numbered(n), numbered(n + 1));
            }
            let _ = std::fs::rename(&self.path, numbered(1));
        }
        self.file = match open_append(&self.path) {
            Ok(f) => Some(f),
            Err(e) => {
                tracing::warn!(error = %e, "cannot reopen a log file after rotating it; its lines go to the console only");
                None
            }
        };
        self.size = 0;
    }
}

/// Open `path` to append to it, created if missing, without following a symbolic link at it
/// (regobox is root; whoever can write the logs directory could otherwise point a log at any
/// file), and only if it is a regular file. The error names the path.
fn open_append(path: &Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    let named =
        |e: io::Error| io::Error::new(e.kind(), format!("log file {}: {e}", path.display()));
    // O_NONBLOCK: a FIFO planted there fails at once instead of blocking until read.
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| {
            if e.raw_os_error() == Some(libc::ELOOP) {
                io::Error::other(format!(
                    "log file {} is a symbolic link; regobox never writes a log through a link (remove it)",
                    path.display()
                ))
            } else {
                named(e)
            }
        })?;
    if !file.metadata().map_err(named)?.is_file() {
        return Err(io::Error::other(format!(
            "log file {} is not a regular file; regobox writes logs only into files (remove it)",
            path.display()
        )));
    }
    Ok(file)
}

/// Where one stream of one child goes.
#[derive(Clone)]
pub struct Target {
    pub name: String,
    /// `stdout` or `stderr`.
    pub stream: &'static str,
    pub sink: Sink,
    pub file: Option<SharedLogFile>,
    pub observer: Option<Observer>,
}

/// How long to wait for the last lines of an exited child (a process it left behind could keep
/// its pipes open).
pub const DRAIN: std::time::Duration = std::time::Duration::from_secs(2);

/// The tasks forwarding one child's stdout and stderr.
#[derive(Debug, Default)]
pub struct Forwarders(Vec<tokio::task::JoinHandle<()>>);

impl Forwarders {
    /// Forward the piped stdout and stderr of `child` as `name`.
    pub fn start(
        child: &mut crate::process::Child,
        name: &str,
        sink: Sink,
        file: Option<SharedLogFile>,
        observer: Option<Observer>,
    ) -> io::Result<Forwarders> {
        let mut tasks = Vec::new();
        for (stream, pipe) in [
            (
                "stdout",
                child.stdout.take().map(std::os::fd::OwnedFd::from),
            ),
            (
                "stderr",
                child.stderr.take().map(std::os::fd::OwnedFd::from),
            ),
        ] {
            if let Some(pipe) = pipe {
                let target = Target {
                    name: name.to_string(),
                    stream,
                    sink,
                    file: file.clone(),
                    observer: observer.clone(),
                };
                let reader = crate::process::async_pipe(pipe)?;
                tasks.push(tokio::spawn(forward(target, reader)));
            }
        }
        Ok(Forwarders(tasks))
    }

    /// Wait, at most [`DRAIN`], for every line of an exited child to be forwarded.
    pub async fn drain(&mut self) {
        let tasks = std::mem::take(&mut self.0);
        let _ = tokio::time::timeout(DRAIN, async {
            for t in tasks {
                let _ = t.await;
            }
        })
        .await;
    }
}

/// Forward every line of `reader` until end of file.
pub async fn forward(target: Target, reader: impl AsyncRead + Unpin) {
    let mut reader = BufReader::with_capacity(MAX_LINE, reader);
    let mut line: Vec<u8> = Vec::with_capacity(1024);
    loop {
        let (consumed, done_line) = match reader.fill_buf().await {
            Ok([]) => {
                if !line.is_empty() {
                    emit(&target, &line);
                }
                return;
            }
            Ok(buf) => match buf.iter().position(|b| *b == b'\n') {
                Some(i) if line.len() + i <= MAX_LINE => {
                    line.extend_from_slice(&buf[..i]);
                    (i + 1, true)
                }
                _ => {
                    let take = buf.len().min(MAX_LINE - line.len());
                    line.extend_from_slice(&buf[..take]);
                    (take, line.len() >= MAX_LINE)
                }
            },
            Err(_) => return,
        };
        reader.consume(consumed);
        if done_line {
            emit(&target, &line);
            line.clear();
        }
    }
}

/// A line of a child's output as regobox writes it in text: control characters (but the tab)
/// and the characters that reorder text (bidirectional controls) escaped, so that a line cannot
/// move the cursor, rewrite what is before it on a terminal (a carriage return over its
/// `name | ` prefix) and so pass for regobox's own.
fn printable(text: &str) -> std::borrow::Cow<'_, str> {
    let hidden = |c: char| {
        (c.is_control() && c != '\t')
            || matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
    };
    if !text.chars().any(hidden) {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        if hidden(c) {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    std::borrow::Cow::Owned(out)
}

fn emit(target: &Target, line: &[u8]) {
    let raw = String::from_utf8_lossy(line);
    let raw = raw.trim_end_matches('\r');
    let text = printable(raw);
    let now = chrono::Utc::now();
    let console = match format() {
        Format::Text => format!("{} | {text}", target.name),
        Format::Json => serde_json::json!({
            "time": now.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            "service": target.name,
            "stream": target.stream,
            "message": raw,
        })
        .to_string(),
    };
    let _ = match target.sink {
        Sink::Stdout => writeln!(io::stdout().lock(), "{console}"),
        Sink::Stderr => writeln!(io::stderr().lock(), "{console}"),
    };
    if let Some(file) = &target.file {
        let stamped = format!(
            "{} {} | {text}",
            now.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            target.stream
        );
        file.lock()
            .unwrap_or_else(|e| e.into_inner())
            .write_line(&stamped);
    }
    if let Some(observe) = &target.observer {
        observe(raw);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A service's stdout, written to `file` (and to stderr).
    fn to_file(file: SharedLogFile) -> Target {
        Target {
            name: "svc".into(),
            stream: "stdout",
            sink: Sink::Stderr,
            file: Some(file),
            observer: None,
        }
    }

    #[tokio::test]
    async fn long_lines_are_split_and_invalid_utf8_replaced_in_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = LogFile::open(dir.path(), "svc", 10 * MAX_LINE as u64, 2).unwrap();
        let mut input = vec![b'a'; MAX_LINE * 2 + 10];
        input.extend_from_slice(b"\nok \xff\xfe end\nno newline at end");
        let target = to_file(file);
        forward(target, &input[..]).await;
        let text = std::fs::read_to_string(dir.path().join("svc.log")).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 5, "3 pieces of the long line, then 2 lines");
        assert!(lines[0].ends_with(&"a".repeat(MAX_LINE)));
        assert!(lines[2].ends_with(" | aaaaaaaaaa"));
        assert!(lines[3].ends_with("ok \u{fffd}\u{fffd} end"));
        assert!(lines[4].ends_with("no newline at end"));
    }

    /// A service's line cannot pass for regobox's own: a carriage return back over its
    /// `name | ` prefix, terminal escapes (erase the line, move the cursor) and bidirectional
    /// controls are written escaped, in the file as on the console.
    #[tokio::test]
    async fn control_characters_of_a_service_line_are_escaped() {
        let dir = tempfile::tempdir().unwrap();
        let file = LogFile::open(dir.path(), "svc", 1 << 20, 2).unwrap();
        let input = "tab\tkept\n\r\x1b[2K2026-12-04T00:00:00Z INFO regobox: restore complete\nx\u{202e}gnp.exe\r\n";
        let target = to_file(file);
        forward(target, input.as_bytes()).await;
        let text = std::fs::read_to_string(dir.path().join("svc.log")).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text:?}");
        assert!(lines[0].ends_with(" | tab\tkept"), "{text:?}");
        assert!(
            lines[1]
                .ends_with(" | \\r\\u{1b}[2K2026-12-04T00:00:00Z INFO regobox: restore complete"),
            "{text:?}"
        );
        assert!(lines[2].ends_with(" | x\\u{202e}gnp.exe"), "{text:?}");
        assert!(!text.contains(['\r', '\x1b', '\u{202e}']));
        assert_eq!(printable("plain \u{e9}t\u{e9}"), "plain \u{e9}t\u{e9}");
    }

    #[test]
    fn files_rotate_by_size_and_keep_at_most_n() {
        let dir = tempfile::tempdir().unwrap();
        let file = LogFile::open(dir.path(), "svc", 1000, 2).unwrap();
        for i in 0..100 {
            file.lock().unwrap().write_line(&format!("{i:040}"));
        }
        let mut names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, vec!["svc.log", "svc.log.1", "svc.log.2"]);
        for n in &names {
            assert!(std::fs::metadata(dir.path().join(n)).unwrap().len() <= 1000);
        }
        let last = std::fs::read_to_string(dir.path().join("svc.log")).unwrap();
        assert!(last.ends_with(&format!("{:040}\n", 99)));
    }

    /// Attack: a link planted at a log's path (by an archive, or by whoever can write the logs
    /// directory) must not make regobox, as root, append to (or create) the file it points to.
    #[test]
    fn a_link_at_a_log_path_is_never_followed() {
        let dir = tempfile::tempdir().unwrap();
        let outside = dir.path().join("outside");
        std::fs::write(&outside, "untouched\n").unwrap();
        let logs = dir.path().join("logs");
        std::fs::create_dir(&logs).unwrap();
        std::os::unix::fs::symlink(&outside, logs.join("svc.log")).unwrap();
        std::os::unix::fs::symlink(dir.path().join("created"), logs.join("new.log")).unwrap();
        let e = LogFile::open(&logs, "svc", 1000, 2).unwrap_err();
        assert!(
            e.to_string()
                .contains(&logs.join("svc.log").display().to_string()),
            "{e}"
        );
        assert!(e.to_string().contains("symbolic link"), "{e}");
        assert!(LogFile::open(&logs, "new", 1000, 2).is_err());
        assert!(!dir.path().join("created").exists());

        assert_eq!(std::fs::read_to_string(&outside).unwrap(), "untouched\n");
    }
}

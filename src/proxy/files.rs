//! Static directories (`[[proxy.static]]`), served as nginx served the application's statics:
//! content types, `ETag`/`Last-Modified` with conditional requests, single byte ranges.

use std::path::{Component, Path, PathBuf};
use std::time::SystemTime;

use bytes::Bytes;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio_util::io::ReaderStream;

use super::{Body, empty, full};

/// `relative` (or its `index.html` when it is a directory) opened beneath `dir` for reading,
/// `dir` itself opened without following a link (see [`crate::volumes::open_dir_without_links`]):
/// `openat2` with `RESOLVE_BENEATH` and `RESOLVE_NO_MAGICLINKS` (links inside `dir` that stay
/// inside are followed); on a kernel without `openat2` (before 5.6), a plain open judged on
/// the path the kernel gives the open file (`/proc/self/fd`), which must be inside `dir`. The
/// file and the path it was asked by.
fn open_beneath(dir: &Path, relative: &Path) -> std::io::Result<(std::fs::File, PathBuf)> {
    use nix::fcntl::{OFlag, OpenHow, ResolveFlag, openat2};
    use std::os::unix::fs::OpenOptionsExt;
    let flags = OFlag::O_RDONLY | OFlag::O_NONBLOCK | OFlag::O_NOCTTY | OFlag::O_CLOEXEC;
    // `dir` was resolved at start and holds no link: one there now was put by whoever owns a
    // directory above it (a link into another mount namespace would show paths inside `dir`).
    let root = crate::volumes::open_dir_without_links(dir, false)?;
    let open = |rel: &Path| -> std::io::Result<std::fs::File> {
        let rel = if rel.as_os_str().is_empty() {
            Path::new(".")
        } else {
            rel
        };
        let how = OpenHow::new()
            .flags(flags)
            .resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_MAGICLINKS);
        match openat2(&root, rel, how) {
            Ok(fd) => Ok(std::fs::File::from(fd)),
            Err(nix::errno::Errno::ENOSYS) => {
                use std::os::fd::AsRawFd;
                let file = std::fs::OpenOptions::new()
                    .read(true)
                    .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
                    .open(dir.join(rel))?;
                let opened = std::fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd()))?;
                if !opened.starts_with(dir) {
                    return Err(std::io::ErrorKind::NotFound.into());
                }
                Ok(file)
            }
            Err(e) => Err(e.into()),
        }
    };
    let file = open(relative)?;
    if file.metadata()?.is_dir() {
        let index = relative.join("index.html");
        return Ok((open(&index)?, dir.join(index)));
    }
    Ok((file, dir.join(relative)))
}

/// Serve `rest` (the path after the prefix, still percent-encoded) from `dir`.
pub async fn serve<B>(req: &Request<B>, dir: &Path, rest: &str) -> Response<Body> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = plain(StatusCode::METHOD_NOT_ALLOWED, "GET or HEAD only\n");
        r.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    let Some(relative) = safe_relative(rest) else {
        return plain(StatusCode::NOT_FOUND, "not found\n");
    };
    // Opened beneath `dir` (no `..` out of it, no absolute link, no magic link of `/proc`: a
    // link into another mount namespace of the application's would show a path inside `dir`),
    // without waiting on a FIFO (refused below, as anything but a file) and without taking a
    // terminal for regobox's own (a link to a pty: its hang-up would stop regobox when it leads
    // a session); then judged on what was opened.
    let opened = {
        let dir = dir.to_path_buf();
        let relative = relative.clone();
        tokio::task::spawn_blocking(move || open_beneath(&dir, &relative)).await
    };
    let Ok(Ok((file, path))) = opened else {
        return plain(StatusCode::NOT_FOUND, "not found\n");
    };
    let mut file = tokio::fs::File::from_std(file);
    let Ok(meta) = file.metadata().await else {
        return plain(StatusCode::NOT_FOUND, "not found\n");
    };
    if !meta.is_file() {
        return plain(StatusCode::NOT_FOUND, "not found\n");
    }
    let len = meta.len();
    let modified = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
    let secs = modified
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let etag = format!("\"{secs:x}-{len:x}\"");
    let last_modified = httpdate::fmt_http_date(modified);
    let mime = mime_guess::from_path(&path).first_or_octet_stream();

    let headers = req.headers();
    let not_modified = match headers.get(header::IF_NONE_MATCH) {
        Some(v) => v.to_str().unwrap_or("").split(',').any(|t| {
            t.trim() == etag || t.trim() == "*" || t.trim().trim_start_matches("W/") == etag
        }),
        None => headers
            .get(header::IF_MODIFIED_SINCE)
            .and_then(|v| httpdate::parse_http_date(v.to_str().ok()?).ok())
            .and_then(|since| since.duration_since(SystemTime::UNIX_EPOCH).ok())
            .is_some_and(|since| secs <= since.as_secs()),
    };
    let mut builder = Response::builder()
        .header(header::ETAG, &etag)
        .header(header::LAST_MODIFIED, &last_modified)
        .header(header::ACCEPT_RANGES, "bytes");
    if not_modified {
        return builder
            .status(StatusCode::NOT_MODIFIED)
            .body(empty())
            .unwrap_or_default();
    }
    builder = builder.header(header::CONTENT_TYPE, mime.as_ref());

    // A single range, unless If-Range names another version.
    let if_range_ok = headers.get(header::IF_RANGE).is_none_or(|v| {
        v.to_str()
            .map(|s| s == etag || s == last_modified)
            .unwrap_or(false)
    });
    let range = headers
        .get(header::RANGE)
        .filter(|_| if_range_ok)
        .and_then(|v| v.to_str().ok())
        .map(|v| parse_range(v, len));
    let (status, start, count) = match range {
        None => (StatusCode::OK, 0, len),
        Some(Some((start, end))) => {
            builder = builder.header(header::CONTENT_RANGE, format!("bytes {start}-{end}/{len}"));
            (StatusCode::PARTIAL_CONTENT, start, end - start + 1)
        }
        Some(None) => {
            return builder
                .status(StatusCode::RANGE_NOT_SATISFIABLE)
                .header(header::CONTENT_RANGE, format!("bytes */{len}"))
                .body(empty())
                .unwrap_or_default();
        }
    };
    builder = builder.status(status).header(header::CONTENT_LENGTH, count);
    if req.method() == Method::HEAD {
        return builder.body(empty()).unwrap_or_default();
    }
    if start > 0 && file.seek(std::io::SeekFrom::Start(start)).await.is_err() {
        return plain(StatusCode::INTERNAL_SERVER_ERROR, "read error\n");
    }
    let stream = ReaderStream::with_capacity(file.take(count), 64 * 1024);
    let body = StreamBody::new(futures_util::StreamExt::map(stream, |r| {
        r.map(Frame::data)
            .map_err(|e| Box::new(e) as super::BoxError)
    }));
    builder.body(body.boxed()).unwrap_or_default()
}

fn plain(status: StatusCode, text: &'static str) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .body(full(Bytes::from_static(text.as_bytes())))
        .unwrap_or_default()
}

/// The percent-decoded relative path, if it stays inside (no `..`, no NUL, no backslash).
fn safe_relative(rest: &str) -> Option<PathBuf> {
    let decoded = crate::docker::policy::percent_decode(rest.split('?').next().unwrap_or(""))?;
    if decoded.contains('\0') || decoded.contains('\\') {
        return None;
    }
    let path = PathBuf::from(decoded.trim_start_matches('/'));
    path.components()
        .all(|c| matches!(c, Component::Normal(_)))
        .then_some(path)
}

/// `bytes=a-b`, `bytes=a-`, `bytes=-n` against `len`: Some((first, last)) or None when
/// unsatisfiable. Several ranges are answered with the first.
fn parse_range(value: &str, len: u64) -> Option<(u64, u64)> {
    let spec = value.trim().strip_prefix("bytes=")?;
    let first = spec.split(',').next()?.trim();
    let (a, b) = first.split_once('-')?;
    let (start, end) = if a.is_empty() {
        let n: u64 = b.parse().ok()?;
        if n == 0 {
            return None;
        }
        (len.saturating_sub(n), len.checked_sub(1)?)
    } else {
        let start: u64 = a.parse().ok()?;
        let end = if b.is_empty() {
            len.checked_sub(1)?
        } else {
            b.parse::<u64>().ok()?.min(len.checked_sub(1)?)
        };
        (start, end)
    };
    (start <= end && start < len).then_some((start, end))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        assert_eq!(parse_range("bytes=0-9", 100), Some((0, 9)));
        assert_eq!(parse_range("bytes=90-", 100), Some((90, 99)));
        assert_eq!(parse_range("bytes=-10", 100), Some((90, 99)));
        assert_eq!(parse_range("bytes=50-500", 100), Some((50, 99)));
        assert_eq!(parse_range("bytes=100-", 100), None);
        assert_eq!(parse_range("bytes=5-2", 100), None);
        assert_eq!(parse_range("bytes=0-0,5-6", 100), Some((0, 0)));
    }

    #[test]
    fn paths_stay_inside() {
        assert_eq!(safe_relative("app.js"), Some(PathBuf::from("app.js")));
        assert_eq!(
            safe_relative("css/a%20b.css"),
            Some(PathBuf::from("css/a b.css"))
        );
        assert_eq!(safe_relative("../etc/passwd"), None);
        assert_eq!(safe_relative("a/%2e%2e/%2e%2e/x"), None);
        assert_eq!(safe_relative("a%00b"), None);
    }
}

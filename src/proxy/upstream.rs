//! The connections to the application: HTTP/1.1 with keep-alive, one pool per worker thread.
//!
//! A connection has no task of its own: whoever uses it drives it. The request's task does while
//! the request goes out and its response comes back, the worker's tick while it waits in the
//! pool. So a request's bytes go from the client's connection to the application's and back
//! within one task, without waking another one on the way (as nginx's event loop does within one
//! handler), and an idle connection costs no task.
//!
//! A connection goes back to its worker's pool when the response body it carried has been read
//! to the end (a response abandoned half-way leaves its connection unusable: it is closed), up to
//! `proxy.upstream_keepalive` idle connections; beyond, and after [`IDLE_TIMEOUT`] unused, they
//! are closed, as are those the application closed (seen at the next tick). A request that finds
//! its pooled connection closed by the application (which may close idle connections at any
//! time) before a byte of it was sent is retried on another one. Upgrades (101) keep their
//! connection: it becomes the tunnel, on a task of its own.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker, ready};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::body::{Body as _, Frame, Incoming, SizeHint};
use hyper::client::conn::http1;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::Body;

/// The largest response head taken from the application (status line and fields), in bytes.
pub const MAX_RESPONSE_HEAD: usize = 64 * 1024;
/// Fields in a response head: bounded by the size above rather than by a count of its own.
const MAX_RESPONSE_FIELDS: usize = MAX_RESPONSE_HEAD / 16;

/// An idle connection unused for this long is closed (nginx's upstream `keepalive_timeout`).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("connecting to {addr}: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("connecting to {addr}: no answer within {timeout:?} (proxy.upstream_connect_timeout)")]
    ConnectTimeout { addr: String, timeout: Duration },
    #[error("HTTP/1.1 with {addr}: {source}")]
    Http { addr: String, source: hyper::Error },
}

/// One worker's connections to the application.
pub struct Pool {
    host: String,
    port: u16,
    connect_timeout: Duration,
    keepalive: usize,
    /// Most recently used last.
    idle: Mutex<Vec<Idle>>,
}

struct Idle {
    conn: Conn,
    since: Instant,
}

/// hyper's side of one connection (reading, writing, noticing its end), as a future that
/// resolves when the connection is over: closed, failed, or handed to an upgrade.
type Driver = Pin<Box<dyn Future<Output = hyper::Result<()>> + Send + Sync>>;

/// A context whose waker does nothing, to poll what only [`Conn::drive`] can make ready: the
/// connection's readiness for a request, its response, its body. `drive` is polled with the
/// task's own context (the sockets wake the task), and whatever it makes ready is polled right
/// after it; registering the task's waker there as well would only make the task wake itself
/// and run once more for nothing.
fn unwoken() -> Context<'static> {
    Context::from_waker(Waker::noop())
}

/// One connection to the application.
struct Conn {
    sender: http1::SendRequest<Body>,
    /// `None` once the connection is over.
    driver: Option<Driver>,
    /// What the connection wakes: the task driving it, except for the wakes that task causes
    /// itself (see [`Relay`]).
    relay: Arc<Relay>,
    waker: Waker,
}

/// The waker a connection is driven with. It passes wakes on to the task using the connection,
/// except while that task is itself handing the connection a request or taking the response
/// body's data: the channels in between then wake the connection's side (a request waiting, room
/// in the body), which is the task's own and which the task drives next anyway (right after
/// sending; at its next read of the body, which is when more data is wanted). Passed on, those
/// wakes would only make the task run a second time for nothing, twice per request.
#[derive(Default)]
struct Relay {
    task: Mutex<Option<Waker>>,
    muted: AtomicBool,
}

impl std::task::Wake for Relay {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        if !self.muted.load(Ordering::Relaxed)
            && let Some(w) = &*self.task.lock().unwrap_or_else(|p| p.into_inner())
        {
            w.wake_by_ref();
        }
    }
}

impl Relay {
    /// Run `f` (the task's own use of the connection's channels) with the wakes it causes muted.
    fn muted<T>(&self, f: impl FnOnce() -> T) -> T {
        self.muted.store(true, Ordering::Relaxed);
        let r = f();
        self.muted.store(false, Ordering::Relaxed);
        r
    }
}

impl Conn {
    /// Let the connection do what it can now (write, read into the response body, notice the
    /// application closed it); false once it is over.
    fn drive(&mut self, cx: &mut Context<'_>) -> bool {
        let Some(driver) = &mut self.driver else {
            return false;
        };
        {
            let mut task = self.relay.task.lock().unwrap_or_else(|p| p.into_inner());
            if !task.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                *task = Some(cx.waker().clone());
            }
        }
        if let Poll::Ready(r) = driver.as_mut().poll(&mut Context::from_waker(&self.waker)) {
            if let Err(e) = r {
                tracing::debug!(target: "regobox::proxy", error = %e, "connection to the application ended");
            }
            self.driver = None;
        }
        self.driver.is_some()
    }

    /// Drive the connection once without a task to wake (it is in the pool): the next user's
    /// task registers itself when it drives it.
    fn drive_idle(&mut self) -> bool {
        self.drive(&mut unwoken())
    }

    fn new(sender: http1::SendRequest<Body>, driver: Driver) -> Conn {
        let relay = Arc::new(Relay::default());
        Conn {
            sender,
            driver: Some(driver),
            waker: Waker::from(relay.clone()),
            relay,
        }
    }

    /// Ready for a new request (true), or over (false).
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<bool> {
        if !self.drive(cx) {
            return Poll::Ready(false);
        }
        match self.sender.poll_ready(&mut unwoken()) {
            Poll::Ready(r) => Poll::Ready(r.is_ok()),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl Pool {
    /// `upstream` is `http://host[:port]` (checked by the configuration).
    pub fn new(upstream: &hyper::Uri, connect_timeout: Duration, keepalive: usize) -> Arc<Pool> {
        let host = upstream.host().unwrap_or("127.0.0.1");
        // An IPv6 literal comes bracketed.
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        Arc::new(Pool {
            host,
            port: upstream.port_u16().unwrap_or(80),
            connect_timeout,
            keepalive,
            idle: Mutex::new(Vec::new()),
        })
    }

    fn addr(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// Send `req` on a pooled connection, or a new one.
    pub async fn send(self: &Arc<Self>, mut req: Request<Body>) -> Result<Response<Pooled>, Error> {
        loop {
            let (mut conn, reused) = match self.take() {
                Some(c) => (c, true),
                // Boxed: rare next to reuse, and it would make every request's future larger.
                None => (Box::pin(self.connect()).await?, false),
            };
            // A pooled connection that has not said it is ready may be closing (a new one takes
            // its first request at once). One closed by the application since it said so
            // gives the request back unsent when driven: it is retried below.
            if reused
                && !conn.sender.is_ready()
                && !std::future::poll_fn(|cx| conn.poll_ready(cx)).await
            {
                continue;
            }
            let response = conn.relay.muted(|| conn.sender.try_send_request(req));
            tokio::pin!(response);
            let result = std::future::poll_fn(|cx| {
                // The request goes out, the response head comes in (or the connection ends,
                // which answers the request with an error).
                conn.drive(cx);
                response.as_mut().poll(&mut unwoken())
            })
            .await;
            match result {
                Ok(response) => {
                    let (parts, body) = response.into_parts();
                    let conn = if parts.status == StatusCode::SWITCHING_PROTOCOLS {
                        // The connection is the tunnel's now: it hands its socket over to the
                        // upgrade on a task of its own, and is never pooled.
                        if let Some(driver) = conn.driver.take() {
                            tokio::spawn(async move {
                                if let Err(e) = driver.await {
                                    tracing::debug!(target: "regobox::proxy", error = %e, "upgraded connection to the application");
                                }
                            });
                        }
                        None
                    } else {
                        Some(conn)
                    };
                    let pooled = Pooled {
                        body,
                        conn,
                        pool: self.clone(),
                    };
                    return Ok(Response::from_parts(parts, pooled));
                }
                Err(mut e) => match e.take_message() {
                    // Never sent: the pooled connection had been closed. Another one.
                    Some(r) if reused => req = r,
                    _ => {
                        return Err(Error::Http {
                            addr: self.addr(),
                            source: e.into_error(),
                        });
                    }
                },
            }
        }
    }

    fn take(&self) -> Option<Conn> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        while let Some(i) = idle.pop() {
            if i.conn.driver.is_some() && i.since.elapsed() < IDLE_TIMEOUT {
                return Some(i.conn);
            }
        }
        None
    }

    /// Keep `conn` for another request if it is ready for one: a connection still sending the
    /// last request's body (the application answered before reading it all) or closing is
    /// dropped, which closes it.
    fn put(&self, mut conn: Conn) {
        // Usually ready already: the response's last read let it say so.
        if !conn.sender.is_ready() {
            conn.drive_idle();
        }
        if conn.driver.is_none() || !conn.sender.is_ready() {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() < self.keepalive {
            idle.push(Idle {
                conn,
                since: Instant::now(),
            });
        }
    }

    /// Close the connections idle for too long or closed by the application.
    pub fn sweep(&self) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        idle.retain_mut(|i| i.conn.drive_idle() && i.since.elapsed() < IDLE_TIMEOUT);
    }

    async fn connect(&self) -> Result<Conn, Error> {
        let connecting = TcpStream::connect((self.host.as_str(), self.port));
        let stream = match tokio::time::timeout(self.connect_timeout, connecting).await {
            Ok(Ok(s)) => s,
            Ok(Err(source)) => {
                return Err(Error::Connect {
                    addr: self.addr(),
                    source,
                });
            }
            Err(_) => {
                return Err(Error::ConnectTimeout {
                    addr: self.addr(),
                    timeout: self.connect_timeout,
                });
            }
        };
        let _ = stream.set_nodelay(true);
        let keepalive = socket2::TcpKeepalive::new().with_time(Duration::from_secs(60));
        let _ = socket2::SockRef::from(&stream).set_tcp_keepalive(&keepalive);
        // A response head is limited by its size, as nginx limits it (its buffer), not by
        // hyper's default of 100 fields: applications send many cookies and CSP fields.
        let (sender, conn) = http1::Builder::new()
            .max_headers(MAX_RESPONSE_FIELDS)
            .max_header_size(MAX_RESPONSE_HEAD)
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|source| Error::Http {
                addr: self.addr(),
                source,
            })?;
        Ok(Conn::new(sender, Box::pin(conn.with_upgrades())))
    }
}

/// A response body from the application; reading it drives its connection, which goes back to
/// the pool once the body has been read to the end.
pub struct Pooled {
    body: Incoming,
    /// `None` for an upgrade, or once given back.
    conn: Option<Conn>,
    pool: Arc<Pool>,
}

impl Pooled {
    fn give_back(&mut self) {
        if let Some(conn) = self.conn.take() {
            self.pool.put(conn);
        }
    }
}

impl hyper::body::Body for Pooled {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        // The connection first: what it reads now is in the body at once.
        let this = &mut *self;
        let frame = match &mut this.conn {
            Some(conn) => {
                conn.drive(cx);
                ready!(
                    conn.relay
                        .muted(|| Pin::new(&mut this.body).poll_frame(&mut unwoken()))
                )
            }
            None => ready!(Pin::new(&mut this.body).poll_frame(cx)),
        };
        match &frame {
            None => self.give_back(),
            Some(Ok(_)) if self.body.is_end_stream() => self.give_back(),
            Some(Err(_)) => self.conn = None,
            Some(Ok(_)) => {}
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        // Read to the end (or empty from the start: HEAD, 204, 304): reusable. Otherwise the
        // connection still holds the rest of the body and closes as it is dropped.
        if self.body.is_end_stream() {
            self.give_back();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use http_body_util::BodyExt;
    use hyper::service::service_fn;
    use tokio::net::TcpListener;

    use super::*;

    /// A listener on loopback and its address as the pool's upstream.
    async fn listen() -> (TcpListener, hyper::Uri) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let uri = format!("http://{}", listener.local_addr().unwrap())
            .parse()
            .unwrap();
        (listener, uri)
    }

    /// Every connection `listener` accepts served by `each` on a task of its own; how many it
    /// has accepted.
    fn accept_all<F, Fut>(listener: TcpListener, each: F) -> Arc<AtomicUsize>
    where
        F: Fn(TcpStream) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(each(stream));
            }
        });
        accepted
    }

    /// A real HTTP/1.1 server on loopback counting its connections; `close` answers with
    /// `Connection: close`.
    async fn server(close: bool) -> (hyper::Uri, Arc<AtomicUsize>) {
        let (listener, uri) = listen().await;
        let accepted = accept_all(listener, move |stream| async move {
            let service = service_fn(move |req: Request<Incoming>| async move {
                let size = if req.uri().path() == "/big" {
                    8 << 20
                } else {
                    100_000
                };
                let mut r = Response::new(http_body_util::Full::new(Bytes::from(format!(
                    "{} {}",
                    req.uri(),
                    "x".repeat(size)
                ))));
                if close {
                    r.headers_mut()
                        .insert("connection", "close".parse().unwrap());
                }
                Ok::<_, std::convert::Infallible>(r)
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
        (uri, accepted)
    }

    /// The body of `path` through `pool`, read to the end.
    async fn fetch(pool: &Arc<Pool>, path: &str) -> Bytes {
        let r = pool.send(get(path)).await.unwrap();
        r.into_body().collect().await.unwrap().to_bytes()
    }

    fn get(path: &str) -> Request<Body> {
        Request::get(path)
            .header("host", "app")
            .body(super::super::empty())
            .unwrap()
    }

    #[tokio::test]
    async fn connections_are_reused_once_a_body_is_read() {
        let (uri, accepted) = server(false).await;
        let pool = Pool::new(&uri, Duration::from_secs(2), 4);
        for i in 0..20 {
            let body = fetch(&pool, &format!("/{i}")).await;
            assert!(body.starts_with(format!("/{i} ").as_bytes()));
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);

        // A body abandoned half-way: its connection is not pooled.
        let r = pool.send(get("/big")).await.unwrap();
        let mut body = r.into_body();
        let first = body.frame().await.unwrap().unwrap();
        assert!(first.data_ref().is_some_and(|d| d.len() < 8 << 20));
        drop(body);
        assert!(fetch(&pool, "/after").await.starts_with(b"/after "));
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_connection_closed_by_the_application_is_not_used_again() {
        let (uri, accepted) = server(true).await;
        let pool = Pool::new(&uri, Duration::from_secs(2), 4);
        for i in 0..20 {
            let body = fetch(&pool, &format!("/{i}")).await;
            assert!(body.starts_with(format!("/{i} ").as_bytes()));
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 20);
    }

    #[tokio::test]
    async fn a_pooled_connection_closed_while_idle_is_replaced() {
        // An application that answers one request per connection with keep-alive, then closes
        // the connection while it sits in the pool.
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (listener, uri) = listen().await;
        let accepted = accept_all(listener, |mut stream| async move {
            let mut head = Vec::new();
            let mut buf = [0u8; 1024];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = stream.read(&mut buf).await.unwrap();
                assert!(n > 0, "the proxy closed before sending a request");
                head.extend_from_slice(&buf[..n]);
            }
            stream
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
        });
        let pool = Pool::new(&uri, Duration::from_secs(2), 4);
        for i in 0..3 {
            assert_eq!(fetch(&pool, &format!("/{i}")).await, "ok");
            assert_eq!(pool.idle.lock().unwrap().len(), 1);
            // Closed by the application meanwhile; nothing has driven it since.
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 3);
        // The sweep notices a closed idle connection without a request.
        pool.sweep();
        assert_eq!(pool.idle.lock().unwrap().len(), 0);
    }

    #[tokio::test]
    async fn idle_connections_beyond_the_keepalive_are_closed() {
        let (uri, accepted) = server(false).await;
        let pool = Pool::new(&uri, Duration::from_secs(2), 2);
        // Five at once: five connections, two kept.
        let responses =
            futures_util::future::join_all((0..5).map(|i| pool.send(get(&format!("/{i}"))))).await;
        for r in responses {
            r.unwrap().into_body().collect().await.unwrap();
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 5);
        assert_eq!(pool.idle.lock().unwrap().len(), 2);
        for _ in 0..3 {
            fetch(&pool, "/again").await;
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 5);
    }

    #[tokio::test]
    async fn an_application_that_is_not_listening_is_named() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let pool = Pool::new(
            &format!("http://{addr}").parse().unwrap(),
            Duration::from_secs(2),
            4,
        );
        let e = pool.send(get("/")).await.err().unwrap().to_string();
        assert!(e.starts_with(&format!("connecting to {addr}: ")), "{e}");
    }

    /// A response nobody asked for (here after answering `/stray`, while the next request is
    /// already on its way): the first request after it cannot tell it from its own answer, but
    /// the answer that comes after it, with no request left, ends the connection (hyper's check
    /// of what a connection reads while idle), so that no later request gets another's answer.
    /// (An application that delays its segments, Nagle's algorithm against the proxy's delayed
    /// acknowledgements, can hold each answer back until the next request is written: then it
    /// is that request's answer, and the lag goes on. Seen by an attacker's test with Python's
    /// `http.server`-style sockets; see the README's "The application's responses".)
    #[tokio::test]
    async fn a_response_nobody_asked_for_ends_the_connection() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (listener, uri) = listen().await;
        let accepted = accept_all(listener, |mut stream| async move {
            // Each answer leaves at once (see above).
            stream.set_nodelay(true).unwrap();
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            loop {
                let end = loop {
                    if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        break i + 4;
                    }
                    match stream.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                };
                let head: Vec<u8> = buf.drain(..end).collect();
                let target = String::from_utf8_lossy(&head)
                    .split(' ')
                    .nth(1)
                    .unwrap_or("")
                    .to_string();
                let body = format!("answer to {target}");
                let answer = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                );
                if stream.write_all(answer.as_bytes()).await.is_err() {
                    return;
                }
                if target == "/stray" {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    let stray = b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nSTRAY!";
                    if stream.write_all(stray).await.is_err() {
                        return;
                    }
                }
            }
        });
        let pool = Pool::new(&uri, Duration::from_secs(2), 1);
        assert_eq!(&fetch(&pool, "/stray").await[..], b"answer to /stray");
        // Sent before the stray answer comes: it gets it.
        assert_eq!(&fetch(&pool, "/first").await[..], b"STRAY!");
        for i in 0..5 {
            tokio::time::sleep(Duration::from_millis(10)).await;
            let path = format!("/next{i}");
            let body = fetch(&pool, &path).await;
            assert_eq!(body, format!("answer to {path}").as_bytes(), "{i}");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }
}

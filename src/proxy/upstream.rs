//! The connections to the application: HTTP/1.1 with keep-alive, one pool per worker thread.
//!
//! A connection goes back to its worker's pool when the response body it carried has been read
//! to the end (a response abandoned half-way leaves its connection unusable: it is closed), up to
//! `proxy.upstream_keepalive` idle connections; beyond, and after [`IDLE_TIMEOUT`] unused, they
//! are closed. A request that finds its pooled connection closed by the application (which may
//! close idle connections at any time) before a byte of it was sent is retried on another one.
//! Upgrades (101) keep their connection: it becomes the tunnel.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::body::{Body as _, Frame, Incoming, SizeHint};
use hyper::client::conn::http1;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::Body;

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
    sender: http1::SendRequest<Body>,
    since: Instant,
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
            let (mut sender, reused) = match self.take() {
                Some(s) => (s, true),
                // Boxed: rare next to reuse, and it would make every request's future larger.
                None => (Box::pin(self.connect()).await?, false),
            };
            match sender.try_send_request(req).await {
                Ok(response) => {
                    // An upgraded connection is the tunnel's now; never pooled.
                    let keep = response.status() != StatusCode::SWITCHING_PROTOCOLS;
                    let (parts, body) = response.into_parts();
                    let pooled = Pooled {
                        body,
                        sender: keep.then_some(sender),
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

    fn take(&self) -> Option<http1::SendRequest<Body>> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        while let Some(i) = idle.pop() {
            if !i.sender.is_closed() && i.since.elapsed() < IDLE_TIMEOUT {
                return Some(i.sender);
            }
        }
        None
    }

    fn put(&self, sender: http1::SendRequest<Body>) {
        if sender.is_closed() {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() < self.keepalive {
            idle.push(Idle {
                sender,
                since: Instant::now(),
            });
        }
    }

    /// Close the connections idle for too long or closed by the application.
    pub fn sweep(&self) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        idle.retain(|i| !i.sender.is_closed() && i.since.elapsed() < IDLE_TIMEOUT);
    }

    async fn connect(&self) -> Result<http1::SendRequest<Body>, Error> {
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
        let (sender, conn) = http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|source| Error::Http {
                addr: self.addr(),
                source,
            })?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(target: "regobox::proxy", error = %e, "connection to the application ended");
            }
        });
        Ok(sender)
    }
}

/// A response body from the application; its connection goes back to the pool once the body has
/// been read to the end.
pub struct Pooled {
    body: Incoming,
    sender: Option<http1::SendRequest<Body>>,
    pool: Arc<Pool>,
}

impl Pooled {
    fn give_back(&mut self) {
        if let Some(sender) = self.sender.take() {
            self.pool.put(sender);
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
        let frame = ready!(Pin::new(&mut self.body).poll_frame(cx));
        match &frame {
            None => self.give_back(),
            Some(Ok(_)) if self.body.is_end_stream() => self.give_back(),
            Some(Err(_)) => self.sender = None,
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
        // connection still holds the rest of the body and closes with its last handle.
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

    /// A real HTTP/1.1 server on loopback counting its connections; `close` answers with
    /// `Connection: close`.
    async fn server(close: bool) -> (hyper::Uri, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let uri: hyper::Uri = format!("http://{}", listener.local_addr().unwrap())
            .parse()
            .unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let service =
                        service_fn(move |req: Request<Incoming>| async move {
                            let size = if req.uri().path() == "/big" {
                                8 << 20
                            } else {
                                100_000
                            };
                            let mut r = Response::new(http_body_util::Full::new(Bytes::from(
                                format!("{} {}", req.uri(), "x".repeat(size)),
                            )));
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
            }
        });
        (uri, accepted)
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
            let r = pool.send(get(&format!("/{i}"))).await.unwrap();
            let body = r.into_body().collect().await.unwrap().to_bytes();
            assert!(body.starts_with(format!("/{i} ").as_bytes()));
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);

        // A body abandoned half-way: its connection is not pooled.
        let r = pool.send(get("/big")).await.unwrap();
        let mut body = r.into_body();
        let first = body.frame().await.unwrap().unwrap();
        assert!(first.data_ref().is_some_and(|d| d.len() < 8 << 20));
        drop(body);
        let r = pool.send(get("/after")).await.unwrap();
        let body = r.into_body().collect().await.unwrap().to_bytes();
        assert!(body.starts_with(b"/after "));
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_connection_closed_by_the_application_is_not_used_again() {
        let (uri, accepted) = server(true).await;
        let pool = Pool::new(&uri, Duration::from_secs(2), 4);
        for i in 0..20 {
            let r = pool.send(get(&format!("/{i}"))).await.unwrap();
            let body = r.into_body().collect().await.unwrap().to_bytes();
            assert!(body.starts_with(format!("/{i} ").as_bytes()));
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 20);
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
            let r = pool.send(get("/again")).await.unwrap();
            r.into_body().collect().await.unwrap();
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
}

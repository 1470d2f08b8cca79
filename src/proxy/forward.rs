//! One request through the proxy.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Frame, Incoming, SizeHint};
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::http::uri::PathAndQuery;
use hyper::{Method, Request, Response, StatusCode, Uri, Version};
use hyper_util::rt::TokioIo;

use super::framing::Signals;
use super::upstream::{Added, is_hop_by_hop};
use super::{
    Activity, Body, BoxError, Handover, InFlight, Lease, Shared, acme, clock, files, full, progress,
};
use crate::unread::{self, Drain, RequestBody};

/// What a connection's requests share.
pub struct ConnCtx {
    shared: Arc<Shared>,
    peer: SocketAddr,
    /// The peer's address as text (IPv4-mapped shown as IPv4), made once per connection.
    peer_text: HeaderValue,
    https: bool,
    activity: Arc<Activity>,
    /// Between this connection's request handler and its framing follower (HTTP/1.1).
    signals: Arc<Signals>,
    /// The fields regobox added to this connection's last request that brought no forwarding
    /// fields of its own (see [`ConnCtx::added`]).
    added: std::sync::Mutex<Option<AddedFor>>,
}

/// What regobox adds to a request (the forwarding fields, and Host where it names it), as
/// written, and what made it: for a request without forwarding fields of its own, that is the
/// connection's peer and scheme, which do not change, and the host named.
struct AddedFor {
    host_kept: bool,
    named: Box<str>,
    text: Bytes,
}

impl ConnCtx {
    pub fn new(
        shared: Arc<Shared>,
        peer: SocketAddr,
        https: bool,
        activity: Arc<Activity>,
        signals: Arc<Signals>,
    ) -> Self {
        let peer_text = HeaderValue::from_str(&canonical(peer.ip()).to_string())
            .unwrap_or_else(|_| HeaderValue::from_static("-"));
        ConnCtx {
            shared,
            peer,
            peer_text,
            https,
            activity,
            signals,
            added: std::sync::Mutex::new(None),
        }
    }

    pub fn service(
        self: Arc<Self>,
    ) -> impl hyper::service::Service<
        Request<Incoming>,
        Response = Response<Body>,
        Error = Infallible,
        Future = impl Future<Output = Result<Response<Body>, Infallible>> + Send,
    > + Clone {
        // One pointer to clone per request, not each of the context's own.
        hyper::service::service_fn(move |req| {
            let ctx = self.clone();
            // Made now rather than at the future's first poll: a request whose connection is
            // cut before that (its client closed it right after sending it) is logged too.
            let unanswered = ctx.unanswered(&req);
            // Boxed: hyper moves the future several times on its way into a task (one per
            // HTTP/2 stream); a pointer is cheaper to move than the request's whole state.
            Box::pin(async move { Ok::<_, Infallible>(ctx.handle(req, unanswered).await) })
        })
    }

    /// The access line of `req`, logged as 499 (as nginx does) if the request ends before its
    /// response is made: the client closed its connection or stream, or its connection was
    /// cut (a forced stop).
    fn unanswered(&self, req: &Request<Incoming>) -> Unanswered {
        let started = clock::now();
        Unanswered {
            line: self.shared.config.access_log.then(|| {
                Box::new(AccessLine {
                    method: req.method().clone(),
                    path: Target::of(req),
                    status: CLIENT_LEFT,
                    version: req.version(),
                    peer: self.peer_text.clone(),
                    started,
                    upstream: None,
                })
            }),
            sent: None,
        }
    }

    /// hyper's HTTP/1.1 connection ended with `e`: if that is a request head hyper could not
    /// read, which it answered itself before closing (see [`hyper_answer`]), that answer's
    /// access line, `-` for the method, path and version (nothing of the head reached the
    /// handler). The time is the head's, from its first byte (the connection's first head:
    /// from the connection).
    pub fn refused(&self, e: &hyper::Error) {
        if let Some(status) = hyper_answer(e) {
            self.unread(status);
        }
    }

    /// The access line of a request whose head was not read whole (see [`ConnCtx::refused`];
    /// `header_timeout`: 408, as nginx logs it, nothing answered).
    pub fn unread(&self, status: u16) {
        if !self.shared.config.access_log {
            return;
        }
        super::access::record(&super::access::Line {
            peer: self.peer_text.to_str().unwrap_or("-"),
            method: "-",
            path: "-",
            version: None,
            status,
            bytes: 0,
            duration: self.activity.head_took(),
            upstream: None,
        });
    }

    async fn handle(
        &self,
        mut req: Request<Incoming>,
        mut unanswered: Unanswered,
    ) -> Response<Body> {
        super::count_request();
        let guard = self.activity.begin();
        let method = req.method().clone();
        let path = path_of(&req);
        let version = req.version();
        let cfg = &self.shared.config;
        // What is matched (plain paths, static directories) and forwarded: the path without its
        // dot segments, as nginx does (`/job/../admin` is `/admin`); the access log keeps what
        // the client sent.
        let origin = origin_form(&path);
        let target = without_dot_segments(origin.as_ref().unwrap_or(&path));
        let mut upstream_time = None;
        // The connection to the application this request holds, if it is forwarded.
        let mut lease: Option<Lease> = None;
        // The fields looked at below, found in one pass.
        let fields = Fields::of(req.headers());
        // The last request of an HTTP/1.1 connection unless it becomes a tunnel (see
        // `framing`): nothing after it is read as a request.
        let asks_upgrade =
            version != Version::HTTP_2 && (fields.upgrade || method == Method::CONNECT);

        let response = 'done: {
            // Both framings at once: ambiguous (request smuggling); refused, connection closed.
            if (version != Version::HTTP_2 && self.signals.next_is_ambiguous())
                || (fields.transfer_encoding && fields.content_length)
            {
                break 'done closing(page(
                    StatusCode::BAD_REQUEST,
                    "Bad request",
                    "The request has both Content-Length and Transfer-Encoding.",
                ));
            }
            if let Some(r) = refused(&req, &fields) {
                break 'done r;
            }
            if origin.is_none() {
                break 'done closing(page(
                    StatusCode::BAD_REQUEST,
                    "Bad request",
                    "The request's target is not a path.",
                ));
            }
            // `*` is the target of `OPTIONS *` alone (RFC 9112 3.2.4), which asks about the
            // server, not a resource: answered here, on either port.
            if path.as_str() == "*" {
                break 'done if method == Method::OPTIONS {
                    Response::builder()
                        .status(StatusCode::NO_CONTENT)
                        .header(header::ALLOW, ALLOWED_METHODS)
                        .body(super::empty())
                        .unwrap_or_default()
                } else {
                    closing(page(
                        StatusCode::BAD_REQUEST,
                        "Bad request",
                        "The target * is for OPTIONS only.",
                    ))
                };
            }
            // hyper bounds its read buffer, not exactly the head: count it.
            let head: usize = path.as_str().len()
                + req.uri().authority().map_or(0, |a| a.as_str().len())
                + fields.bytes;
            if head > cfg.max_header_bytes {
                break 'done closing(page(
                    StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                    "Request header fields too large",
                    &format!(
                        "The request's head is {head} bytes; this server takes at most {}.",
                        cfg.max_header_bytes
                    ),
                ));
            }
            // From here, what an answer leaves unread of the body is read and thrown away, so
            // that a client still sending it gets the answer (see `crate::unread`): a redirect,
            // a 503, the application's early 413. Not above: those answers close the
            // connection, its framing not trusted. Nor after an upgrade asked for (nothing more
            // of the connection is read). At most proxy.client_body_timeout more, the time a
            // body has to move.
            // (Read once: a look at an HTTP/2 stream's state takes a lock.)
            let ended = hyper::body::Body::is_end_stream(req.body());
            let drain = (!asks_upgrade && !ended).then_some(Drain {
                limit: u64::MAX,
                within: cfg.client_body_timeout,
            });
            let unasked = drain.is_some() && unread::waits_to_be_asked(req.headers());
            // The host alone, as regobox names it (made where it is needed: most requests
            // are forwarded with the host they name).
            let host_named = |uri: &Uri| {
                request_host(uri, fields.host.as_ref()).unwrap_or_else(|| cfg.hostnames[0].clone())
            };
            let uri_path = target.path();
            // The answers regobox makes itself, the body not needed.
            let own = 'own: {
                if !self.https {
                    if let Some(token) = uri_path.strip_prefix(acme::CHALLENGE_PREFIX) {
                        if let Some(answer) = self.shared.challenges.answer(token) {
                            break 'own Some(
                                Response::builder()
                                    .header(header::CONTENT_TYPE, "application/octet-stream")
                                    .body(full(answer))
                                    .unwrap_or_default(),
                            );
                        }
                    }
                    let plain = cfg
                        .plain_http_paths
                        .iter()
                        .any(|p| plain_path_matches(uri_path, p));
                    if cfg.redirect_http && cfg.https_port != 0 && !plain {
                        let host;
                        let public_host = if cfg.public_host.is_empty() {
                            host = host_named(req.uri());
                            &host
                        } else {
                            &cfg.public_host
                        };
                        let public_port = if cfg.public_https_port == 0 {
                            cfg.https_port
                        } else {
                            cfg.public_https_port
                        };
                        break 'own Some(redirect(
                            &method,
                            public_host,
                            public_port,
                            target.as_str(),
                        ));
                    }
                }
                for s in &cfg.statics {
                    if let Some(rest) = uri_path.strip_prefix(s.prefix.as_str()) {
                        let rest = rest.to_string();
                        // Boxed: most requests are not for static files, and their futures
                        // would all be the larger for it.
                        break 'own Some(Box::pin(files::serve(&req, &s.dir, &rest)).await);
                    }
                }
                if let Some(why) = self.unavailable() {
                    let mut r = page(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "Service unavailable",
                        &format!("{why}. Please retry in a few seconds."),
                    );
                    r.headers_mut()
                        .insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
                    break 'own Some(r);
                }

                if let Some(facts) = &self.shared.landing {
                    break 'own Some(
                        if matches!(method, Method::GET | Method::HEAD) && uri_path == "/" {
                            super::landing::page(&self.shared.board, facts)
                        } else {
                            page(
                                StatusCode::NOT_FOUND,
                                "Not found",
                                "No application is configured.",
                            )
                        },
                    );
                }

                // Forward, if the caps on connections to the application allow.
                match self
                    .activity
                    .lease(&self.shared.caps, super::address_key(self.peer.ip()))
                {
                    Ok(l) => lease = Some(l),
                    Err(cap) => {
                        let (key, limit, lines) = match cap {
                            super::AtCap::Connection => (
                                "proxy.upstream_max_per_connection",
                                cfg.upstream_max_per_connection,
                                &UPSTREAM_CAPS[0],
                            ),
                            super::AtCap::Address => (
                                "proxy.upstream_max_per_address",
                                cfg.upstream_max_per_address,
                                &UPSTREAM_CAPS[1],
                            ),
                            super::AtCap::Overall => {
                                ("proxy.upstream_max", cfg.upstream_max, &UPSTREAM_CAPS[2])
                            }
                        };
                        if let Some(left_out) = lines.should_log() {
                            tracing::warn!(target: "regobox::proxy", peer = %self.peer_text.to_str().unwrap_or(""), limit, similar_left_out = left_out, "requests hold as many connections to the application as {key} allows; answered 503");
                        }
                        let mut r = page(
                            StatusCode::SERVICE_UNAVAILABLE,
                            "Service unavailable",
                            "Too many requests are in progress. Please retry in a few seconds.",
                        );
                        r.headers_mut()
                            .insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
                        break 'own Some(r);
                    }
                }
                None
            };
            if let Some(answer) = own {
                drop(RequestBody::new(req.into_body(), drain, unasked));
                break 'done answer;
            }
            let upgrade =
                (fields.upgrade && version == Version::HTTP_11 && wants_upgrade(req.headers()))
                    .then(|| hyper::upgrade::on(&mut req));
            let (mut parts, body) = req.into_parts();
            let upgrade_proto = upgrade
                .as_ref()
                .and_then(|_| parts.headers.get(header::UPGRADE).cloned());
            if fields.hop_by_hop {
                strip_hop_by_hop(&mut parts.headers);
            }
            if fields.underscore {
                drop_underscored(&mut parts.headers);
            }
            if fields.cookies > 1 && version == Version::HTTP_2 {
                join_cookies(&mut parts.headers);
            }
            if let (Some(_), Some(proto)) = (&upgrade, upgrade_proto) {
                parts
                    .headers
                    .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
                parts.headers.insert(header::UPGRADE, proto);
            }
            // The Host field for the application: what the client asked for (host and port):
            // the target's authority (checked: see `bad_target`), else the Host field as it
            // came, else (none, an empty one, or one a `Connection` option took away) the host
            // alone. The forwarding fields name the same. A Host field regobox names is written
            // with them (see `upstream::Added`), any other removed.
            let host_kept = parts.uri.authority().is_none()
                && fields.host.as_ref().is_some_and(|h| !h.is_empty())
                && (!fields.hop_by_hop || parts.headers.contains_key(header::HOST));
            let kept = host_kept
                .then(|| parts.headers.get(header::HOST).cloned())
                .flatten();
            let host;
            let named = match (
                kept.as_ref().and_then(|v| v.to_str().ok()),
                parts.uri.authority(),
            ) {
                (Some(v), _) => v,
                (_, Some(a)) => a.as_str(),
                _ => {
                    host = host_named(&parts.uri);
                    &host
                }
            };
            if !host_kept && fields.host.is_some() {
                parts.headers.remove(header::HOST);
            }
            let added = self.added(&mut parts.headers, host_kept, named, fields.forwarding);
            // Origin form (`/path?query`); the Host header says the rest. An empty target (see
            // `origin_form`) would go out as nothing at all: `/`.
            parts.uri = Uri::from(target.clone());
            if parts.uri.path().is_empty() {
                parts.uri = Uri::from_static("/");
            }
            parts.version = Version::HTTP_11;
            // Set when the client's body fails: the failure is then the client's, not the
            // application's: [`MALFORMED`] (bad chunked framing...) or [`GONE`] (the client
            // closed its connection before the body's end).
            // (Made only for a request with a body.)
            let mut client_body_failed = None;
            // When the request's body last moved: the wait for the answer counts from there.
            let mut moved = None;
            let mut client_body_stalled = None;
            // A body that has ended already (none came, or HTTP/2's HEADERS ended the stream)
            // goes as none; any other is forwarded, whatever the method (an HTTP/2 GET or
            // DELETE with DATA frames and no content-length included).
            let body = if ended {
                super::empty()
            } else {
                let failed = Arc::new(std::sync::atomic::AtomicU8::new(0));
                // A body cut for coming too slowly (408) is not drained: no more time.
                let stalled = Arc::new(std::sync::atomic::AtomicBool::new(false));
                let mut body = RequestBody::new(body, drain, unasked);
                body.unless(stalled.clone());
                client_body_failed = Some(failed.clone());
                let mark = progress::Mark::new();
                moved = Some(mark.clone());
                let incoming = body
                    .map_err(move |e| {
                        use std::io::ErrorKind::*;
                        let gone = e.is_incomplete_message()
                            || std::error::Error::source(&e)
                                .and_then(|s| s.downcast_ref::<std::io::Error>())
                                .is_some_and(|io| {
                                    matches!(
                                        io.kind(),
                                        UnexpectedEof
                                            | ConnectionReset
                                            | ConnectionAborted
                                            | BrokenPipe
                                    )
                                });
                        let why = if gone { GONE } else { MALFORMED };
                        failed.store(why, std::sync::atomic::Ordering::Relaxed);
                        Box::new(e) as BoxError
                    })
                    .boxed();
                let body = progress::Deadline::new(
                    Gather::new(incoming),
                    cfg.client_body_timeout,
                    Some(mark),
                    "request body",
                )
                .with_min_rate(cfg.client_body_timeout, cfg.client_body_min_rate)
                .reporting_to(stalled.clone());
                client_body_stalled = Some(stalled);
                body.boxed()
            };
            let sent = clock::now();
            unanswered.sent = Some(sent);
            let send = self
                .shared
                .pool
                .send(Request::from_parts(parts, body), &added);
            tokio::pin!(send);
            let mut waited = false;
            let result = loop {
                // While the request body is still on its way, its own deadline comes first (a
                // client that stops sending gets 408); past both, the application that neither
                // reads nor answers gets 504. No progress is measured from the last move.
                let deadline = match &moved {
                    Some(m) if m.is_open() => {
                        m.last() + cfg.upstream_read_timeout + cfg.client_body_timeout
                    }
                    Some(m) => m.last() + cfg.upstream_read_timeout,
                    None => tokio::time::Instant::from_std(sent) + cfg.upstream_read_timeout,
                };
                // (Not before the first wait: the deadline is ahead then.)
                if waited && deadline <= clock::tokio_now() {
                    break None;
                }
                waited = true;
                // The body's end starts the application's time: the deadline is computed anew.
                let body_open = moved.as_ref().is_some_and(|m| m.is_open());
                let body_ends = async {
                    if let Some(m) = &moved {
                        m.ended().await;
                    }
                };
                tokio::select! {
                    r = &mut send => break Some(r),
                    _ = tokio::time::sleep_until(deadline) => {}
                    _ = body_ends, if body_open => {}
                }
            };
            upstream_time = Some(clock::now().saturating_duration_since(sent));
            let body_failed_as = |why| {
                client_body_failed
                    .as_ref()
                    .is_some_and(|f| f.load(std::sync::atomic::Ordering::Relaxed) == why)
            };
            let Some(result) = result else {
                if let Some(left_out) = UPSTREAM_TIMEOUTS.should_log() {
                    tracing::warn!(target: "regobox::proxy", timeout = ?cfg.upstream_read_timeout, upstream = %cfg.upstream, similar_left_out = left_out, "the application did not answer in time (proxy.upstream_read_timeout); answered 504");
                }
                break 'done page(
                    StatusCode::GATEWAY_TIMEOUT,
                    "Gateway timeout",
                    "The application did not answer in time.",
                );
            };
            let mut response = match result {
                Ok(r) => r,
                // What the client does not take for a response (a status code above 599,
                // ambiguous framing...: see `upstream`).
                Err(super::upstream::Error::Protocol { what, .. }) => {
                    break 'done self.not_http(&what);
                }
                // A request regobox cannot write as one HTTP/1.1 request (its length unreadable:
                // what hyper and the framing follower let through is read the same way, so this
                // should not happen): the client's, 400.
                Err(e @ super::upstream::Error::Request(_)) => {
                    if let Some(left_out) = CLIENT_ERRORS.should_log() {
                        tracing::info!(target: "regobox::proxy", peer = %self.peer_text.to_str().unwrap_or(""), error = %e, similar_left_out = left_out, "a request could not be forwarded; answered 400");
                    }
                    break 'done closing(page(
                        StatusCode::BAD_REQUEST,
                        "Bad request",
                        "The request cannot be forwarded.",
                    ));
                }
                Err(_)
                    if client_body_stalled
                        .as_ref()
                        .is_some_and(|s| s.load(std::sync::atomic::Ordering::Relaxed)) =>
                {
                    if let Some(left_out) = CLIENT_ERRORS.should_log() {
                        tracing::info!(target: "regobox::proxy", peer = %self.peer_text.to_str().unwrap_or(""), timeout = ?cfg.client_body_timeout, min_rate = cfg.client_body_min_rate, similar_left_out = left_out, "a request's body stopped arriving (proxy.client_body_timeout) or came slower than proxy.client_body_min_rate; answered 408");
                    }
                    break 'done closing(page(
                        StatusCode::REQUEST_TIMEOUT,
                        "Request timeout",
                        "The request's body stopped arriving.",
                    ));
                }
                Err(e) if body_failed_as(GONE) => {
                    // Nobody to answer: the access line says 400, nothing else is logged.
                    tracing::debug!(target: "regobox::proxy", peer = %self.peer_text.to_str().unwrap_or(""), error = %error_chain(&e), "the client closed its connection during its request's body");
                    break 'done closing(page(
                        StatusCode::BAD_REQUEST,
                        "Bad request",
                        "The request's body was cut short.",
                    ));
                }
                Err(e) if body_failed_as(MALFORMED) => {
                    // The client's fault: 400, the connection closed, and at most a line per
                    // interval however often a client does it.
                    if let Some(left_out) = CLIENT_ERRORS.should_log() {
                        tracing::info!(target: "regobox::proxy", peer = %self.peer_text.to_str().unwrap_or(""), error = %error_chain(&e), similar_left_out = left_out, "a request's body was malformed; answered 400");
                    }
                    break 'done closing(page(
                        StatusCode::BAD_REQUEST,
                        "Bad request",
                        "The request's body is malformed.",
                    ));
                }
                Err(e) => {
                    // A line per interval: an application down, or out of descriptors, fails
                    // every request, and one client's loop made thousands of lines a second.
                    if let Some(left_out) = UPSTREAM_FAILURES.should_log() {
                        tracing::warn!(target: "regobox::proxy", error = %error_chain(&e), upstream = %self.shared.config.upstream, similar_left_out = left_out, "upstream request failed");
                    }
                    break 'done page(
                        StatusCode::BAD_GATEWAY,
                        "Bad gateway",
                        "The application is not answering. It may be restarting; please retry shortly.",
                    );
                }
            };
            if response.status() == StatusCode::SWITCHING_PROTOCOLS {
                // A 101 nobody asked for is not the client's: HTTP/2 has no 101, and an
                // HTTP/1.1 client (or a proxy before regobox) would take its connection for
                // upgraded.
                let Some(client) = upgrade else {
                    break 'done self.not_http("101 to a request that asked for no upgrade");
                };
                // To the upgrade that was asked for, the one forwarded: a WebSocket.
                let to_websocket = response
                    .headers()
                    .get(header::UPGRADE)
                    .is_some_and(|v| v.as_bytes().trim_ascii().eq_ignore_ascii_case(b"websocket"));
                if !to_websocket {
                    break 'done self
                        .not_http("101 to a protocol other than the WebSocket asked for");
                }
                let Some(server) = response.body_mut().take_upgraded() else {
                    break 'done self.not_http("101 without its connection");
                };
                let force = self.shared.force.clone();
                let bounds = super::tunnel::TunnelBounds {
                    idle: cfg.websocket_idle_timeout,
                    send: cfg.send_timeout,
                    connection: self.activity.clone(),
                };
                let lease = lease.take();
                self.shared.tracker.spawn(async move {
                    let Ok(client) = client.await else {
                        return;
                    };
                    super::tunnel::tunnel(TokioIo::new(client), server, bounds, force).await;
                    drop(lease);
                });
                let (parts, body) = response.into_parts();
                break 'done Response::from_parts(
                    parts,
                    body.map_err(|e| Box::new(e) as BoxError).boxed(),
                );
            }
            // (Its hop-by-hop fields were left out when its head was read: see `upstream`.)
            let (parts, body) = response.into_parts();
            // The application's body must keep moving too; a stalled one is cut.
            let body =
                progress::Deadline::new(body, cfg.upstream_read_timeout, None, "response body");
            Response::from_parts(parts, body.boxed())
        };

        let response = match asks_upgrade {
            true if response.status() == StatusCode::SWITCHING_PROTOCOLS => {
                self.signals.tunnel();
                response
            }
            true => closing(response),
            false => response,
        };
        if response.headers().get(header::CONNECTION) == Some(&HeaderValue::from_static("close")) {
            self.signals.closing();
        }
        let status = response.status();
        let (mut parts, mut body) = response.into_parts();
        if self.https && !cfg.hsts_max_age.is_zero() {
            let value = format!(
                "max-age={}{}",
                cfg.hsts_max_age.as_secs(),
                if cfg.hsts_include_subdomains {
                    "; includeSubDomains"
                } else {
                    ""
                }
            );
            if let Ok(v) = HeaderValue::from_str(&value) {
                parts.headers.insert(header::STRICT_TRANSPORT_SECURITY, v);
            }
        }
        // The client's protocol, not the application's: an application answering HTTP/1.0 must
        // not make regobox answer HTTP/1.0 to an HTTP/1.1 client (HTTP/2 ignores this).
        parts.version = Version::HTTP_11;
        // A response to HEAD has no content, whoever made it (regobox's own pages carry one,
        // which HTTP/2 forbids: a DATA frame after HEAD is a stream error for the client). Its
        // length is still announced.
        if method == Method::HEAD {
            if let Some(len) = hyper::body::Body::size_hint(&body)
                .exact()
                .filter(|n| *n > 0)
            {
                parts
                    .headers
                    .entry(header::CONTENT_LENGTH)
                    .or_insert_with(|| HeaderValue::from(len));
            }
            body = super::empty();
        }
        // Sent from here: whether the client takes it is watched (see `Activity::sending`).
        let ended = hyper::body::Body::is_end_stream(&body);
        let handover = self.activity.sending(!ended);
        let logged = Logged {
            inner: body,
            rest: None,
            ended,
            http2: version == Version::HTTP_2,
            bytes: 0,
            handover,
            activity: self.activity.clone(),
            _lease: lease,
            line: unanswered.line.take().map(|mut line| {
                line.status = status.as_u16();
                line.upstream = upstream_time;
                line
            }),
            _guard: guard,
        };
        Response::from_parts(parts, logged.boxed())
    }

    /// 502 for an answer of the application's that is not HTTP (`what` it answered), logged.
    fn not_http(&self, what: &str) -> Response<Body> {
        if let Some(left_out) = NOT_HTTP.should_log() {
            tracing::warn!(target: "regobox::proxy", upstream = %self.shared.config.upstream, similar_left_out = left_out, "the application answered {what}; answered 502");
        }
        page(
            StatusCode::BAD_GATEWAY,
            "Bad gateway",
            "The application's answer was not valid HTTP.",
        )
    }

    /// Why the application cannot be reached through the proxy now, if it cannot.
    fn unavailable(&self) -> Option<String> {
        let board = &self.shared.board;
        if let Some(why) = board.maintenance.borrow().clone() {
            return Some(format!("Maintenance in progress ({why})"));
        }
        (!board.ready()).then(|| "The service is starting".to_string())
    }

    /// The connection is parked (idle): what it kept for its next request goes.
    pub fn parked(&self) {
        *self.added.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// The fields regobox adds to a request: Host naming `named` unless the request's own is
    /// kept, and the forwarding fields (see [`ConnCtx::forwarding_fields`]). A request that
    /// brings no forwarding fields (`present` false) gets the same text as the connection's last
    /// such request naming the same host: made once, not for every request.
    fn added(&self, headers: &mut HeaderMap, host_kept: bool, named: &str, present: bool) -> Bytes {
        let last = || self.added.lock().unwrap_or_else(|e| e.into_inner());
        if !present {
            if let Some(a) = &*last() {
                if a.host_kept == host_kept && *a.named == *named {
                    return a.text.clone();
                }
            }
        }
        let mut added = Added::with_capacity(160 + 2 * named.len());
        if !host_kept {
            added.push(&header::HOST, &[named.as_bytes()]);
        }
        self.forwarding_fields(headers, &mut added, named, present);
        let text = added.into_bytes();
        if !present {
            *last() = Some(AddedFor {
                host_kept,
                named: named.into(),
                text: text.clone(),
            });
        }
        text
    }

    /// X-Real-IP, X-Forwarded-For/-Proto/-Host and Forwarded, said by regobox (in `added`);
    /// what earlier proxies said is removed from `headers`, and kept and extended only when the
    /// peer is a trusted proxy. `present`: the request has one of the [`is_forwarding`] fields.
    fn forwarding_fields(
        &self,
        headers: &mut HeaderMap,
        added: &mut Added,
        host: &str,
        present: bool,
    ) {
        let peer = canonical(self.peer.ip());
        let proto = if self.https { "https" } else { "http" };
        let trusted = self.trusts(peer);
        // What earlier proxies said, removed from the request either way.
        let mut take = |name: &HeaderName| -> Option<String> {
            let header::Entry::Occupied(e) = headers.entry(name) else {
                return None;
            };
            // Dropping the drain removes the values: an untrusted peer's are not even read.
            let values = e.remove_entry_mult().1;
            if !trusted {
                return None;
            }
            let kept: Vec<String> = values
                .filter_map(|v| v.to_str().ok().map(str::trim).map(str::to_string))
                .filter(|v| !v.is_empty())
                .collect();
            (!kept.is_empty()).then(|| kept.join(", "))
        };
        let (prev_for, prev_proto, prev_host, prev_fwd) = if present {
            // What a trusted proxy says is kept where it reads as what the field means; else
            // regobox's own word stands alone.
            let found = (
                take(&X_FORWARDED_FOR),
                take(&X_FORWARDED_PROTO).filter(|v| scheme_list(v)),
                take(&X_FORWARDED_HOST).filter(|v| host_list(v)),
                take(&header::FORWARDED).filter(|v| forwarded_list(v)),
            );
            take(&X_REAL_IP);
            // The others of the family: a trusted proxy's go on as it wrote them; a client's
            // do not reach the application.
            if !trusted {
                let others: Vec<HeaderName> = headers
                    .keys()
                    .filter(|n| is_forwarding(n))
                    .cloned()
                    .collect();
                for name in others {
                    headers.remove(name);
                }
            }
            found
        } else {
            (None, None, None, None)
        };

        let peer_text = self.peer_text.as_bytes();
        // X-Real-IP names the client: the peer, or behind trusted proxies the client they say
        // they forward for (see `client_of`), as X-Forwarded-For's chain does.
        match prev_for.as_deref().and_then(|chain| self.client_of(chain)) {
            Some(client) => added.push(&X_REAL_IP, &[client.to_string().as_bytes()]),
            None => added.push(&X_REAL_IP, &[peer_text]),
        };
        match &prev_for {
            Some(p) => added.push(&X_FORWARDED_FOR, &[p.as_bytes(), b", ", peer_text]),
            None => added.push(&X_FORWARDED_FOR, &[peer_text]),
        };
        added.push(
            &X_FORWARDED_PROTO,
            &[prev_proto.as_deref().unwrap_or(proto).as_bytes()],
        );
        added.push(
            &X_FORWARDED_HOST,
            &[prev_host.as_deref().unwrap_or(host).as_bytes()],
        );
        // for=1.2.3.4 or for="[::1]" (RFC 7239), after what earlier proxies said.
        let (open, close): (&[u8], &[u8]) = match peer {
            IpAddr::V6(_) => (b"\"[", b"]\""),
            IpAddr::V4(_) => (b"", b""),
        };
        let (prev, comma): (&[u8], &[u8]) = match &prev_fwd {
            Some(p) => (p.as_bytes(), b", "),
            None => (b"", b""),
        };
        added.push(
            &header::FORWARDED,
            &[
                prev,
                comma,
                b"for=",
                open,
                peer_text,
                close,
                b";proto=",
                proto.as_bytes(),
                b";host=\"",
                host.as_bytes(),
                b"\"",
            ],
        );
    }

    /// Whether `ip` is one of `proxy.trusted_proxies`.
    fn trusts(&self, ip: IpAddr) -> bool {
        self.shared.trusted.iter().any(|c| c.contains(ip))
    }

    /// The client a chain of trusted proxies forwards for (their X-Forwarded-For), read from the
    /// right as nginx's `real_ip_recursive` does: the first address that is not a trusted
    /// proxy's. Where an entry cannot be read (`unknown`, garbage), what is left of it is the
    /// client's own text: the search stops there, at the last trusted address (`None` if the
    /// last entry itself cannot be read: the peer is named then). All trusted: the first.
    fn client_of(&self, chain: &str) -> Option<IpAddr> {
        let mut last_trusted = None;
        for entry in chain.rsplit(',') {
            let Some(ip) = forwarded_address(entry.trim()) else {
                return last_trusted;
            };
            if !self.trusts(ip) {
                return Some(ip);
            }
            last_trusted = Some(ip);
        }
        last_trusted
    }
}

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
static X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");
/// The fields by which proxies say whom they forward for, over which scheme, host, port or
/// path (see `ConnCtx::forwarding_fields`): `Forwarded`, `X-Real-IP` and every `X-Forwarded-*`,
/// and those some frameworks read in their place (`Front-End-Https`, the client-address fields,
/// the original-host fields). Only a trusted proxy's reach the application. A match on the
/// name's text, made for every field of every request.
fn is_forwarding(name: &HeaderName) -> bool {
    let name = name.as_str();
    name.starts_with("x-forwarded-")
        || matches!(
            name,
            "forwarded"
                | "x-forwarded"
                | "forwarded-for"
                | "x-real-ip"
                | "front-end-https"
                | "x-arr-ssl"
                | "x-scheme"
                | "x-url-scheme"
                | "x-client-ip"
                | "client-ip"
                | "true-client-ip"
                | "x-cluster-client-ip"
                | "cf-connecting-ip"
                | "fastly-client-ip"
                | "proxy-client-ip"
                | "wl-proxy-client-ip"
                | "x-envoy-external-address"
                | "x-original-host"
                | "x-host"
                | "x-original-url"
                | "x-original-uri"
                | "x-rewrite-url"
                | "x-script-name"
        )
}

/// Whether `value` is a comma-separated list of elements that each pass `element` (trimmed),
/// one at least; empty elements are allowed, as RFC 9110 5.6.1 says a recipient must.
fn list_of(value: &str, element: impl Fn(&str) -> bool) -> bool {
    let mut any = false;
    for e in value.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        if !element(e) {
            return false;
        }
        any = true;
    }
    any
}

/// Whether `value` reads as an `X-Forwarded-Proto` field: a list of `http` and `https`.
fn scheme_list(value: &str) -> bool {
    list_of(value, |p| {
        p.eq_ignore_ascii_case("http") || p.eq_ignore_ascii_case("https")
    })
}

/// Whether `value` reads as an `X-Forwarded-Host` field: a list of hosts, each with an optional
/// port (as a `Host` field is checked: [`valid_host`]).
fn host_list(value: &str) -> bool {
    list_of(value, |h| valid_host(h.as_bytes()))
}

/// Whether `value` reads as a `Forwarded` field (RFC 7239 4): a list of elements, each pairs
/// `token=value` separated by `;`, a value a token or a quoted string (its quotes balanced).
fn forwarded_list(value: &str) -> bool {
    let tchar = |c: u8| c.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&c);
    let b = value.as_bytes();
    let mut i = 0;
    let token = |i: &mut usize| {
        let start = *i;
        while *i < b.len() && tchar(b[*i]) {
            *i += 1;
        }
        *i > start
    };
    let spaces = |i: &mut usize| {
        while *i < b.len() && matches!(b[*i], b' ' | b'\t') {
            *i += 1;
        }
    };
    // Pair after pair; `;` between two of an element (no space around it), `,` between
    // elements (spaces around it); empty ones are allowed, as the grammar's list and its
    // `[ pair ]` allow them.
    let mut element_starts = true;
    loop {
        if element_starts {
            spaces(&mut i);
        }
        element_starts = false;
        match b.get(i) {
            None => return true,
            Some(b';') => {
                i += 1;
                continue;
            }
            Some(b',') => {
                i += 1;
                element_starts = true;
                continue;
            }
            Some(_) => {}
        }
        if !token(&mut i) || b.get(i) != Some(&b'=') {
            return false;
        }
        i += 1;
        if b.get(i) == Some(&b'"') {
            i += 1;
            loop {
                match b.get(i) {
                    None => return false,
                    Some(b'"') => break,
                    Some(b'\\') => i += 2,
                    Some(_) => i += 1,
                }
            }
            i += 1;
        } else if !token(&mut i) {
            return false;
        }
        // Spaces only before a `,` or the end.
        let mut j = i;
        spaces(&mut j);
        if matches!(b.get(j), None | Some(b',')) {
            i = j;
        }
        if !matches!(b.get(i), None | Some(b';' | b',')) {
            return false;
        }
    }
}

/// An address as proxies write them in X-Forwarded-For: `1.2.3.4`, `2001:db8::1`, with a port
/// (`1.2.3.4:5678`, `[2001:db8::1]:5678`) as some do; IPv4-mapped IPv6 as IPv4.
fn forwarded_address(entry: &str) -> Option<IpAddr> {
    let ip = entry
        .parse::<IpAddr>()
        .ok()
        .or_else(|| entry.parse::<std::net::SocketAddr>().ok().map(|a| a.ip()))?;
    Some(canonical(ip))
}

fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        source = inner.source();
    }
    s
}

/// What a request's head holds of the fields the proxy looks at, found in one pass over them
/// (no hashing: most requests have none of those that need a closer look).
#[derive(Debug, Default)]
struct Fields {
    /// The first `Host` field, and how many there are.
    host: Option<HeaderValue>,
    hosts: usize,
    transfer_encoding: bool,
    content_length: bool,
    upgrade: bool,
    /// One of [`is_hop_by_hop`] (`Connection` among them).
    hop_by_hop: bool,
    /// One of [`is_forwarding`].
    forwarding: bool,
    /// A name with an underscore (see [`drop_underscored`]).
    underscore: bool,
    /// `Cookie` fields (HTTP/2 sends one per cookie: see [`join_cookies`]).
    cookies: usize,
    /// A value that begins or ends with a space or a tab (see [`refused`]).
    padded: bool,
    /// The fields' size as hyper read them (name, `: `, value, CRLF).
    bytes: usize,
}

impl Fields {
    fn of(headers: &HeaderMap) -> Fields {
        let mut f = Fields::default();
        for (name, value) in headers {
            f.bytes += name.as_str().len() + value.len() + 4;
            f.underscore |= name.as_str().as_bytes().contains(&b'_');
            let v = value.as_bytes();
            f.padded |=
                matches!(v.first(), Some(b' ' | b'\t')) || matches!(v.last(), Some(b' ' | b'\t'));
            if name == header::HOST {
                f.hosts += 1;
                if f.host.is_none() {
                    f.host = Some(value.clone());
                }
            } else if name == header::CONTENT_LENGTH {
                f.content_length = true;
            } else if name == header::COOKIE {
                f.cookies += 1;
            } else if is_hop_by_hop(name) {
                f.hop_by_hop = true;
                f.transfer_encoding |= name == header::TRANSFER_ENCODING;
                f.upgrade |= name == header::UPGRADE;
            } else if is_forwarding(name) {
                f.forwarding = true;
            }
        }
        f
    }
}

/// At most one log line per interval about what clients do wrong, with the count left out:
/// a client must not be able to flood regobox's log.
pub(crate) struct RateLimit {
    last: std::sync::Mutex<Option<Instant>>,
    left_out: std::sync::atomic::AtomicU64,
}

pub(crate) static CLIENT_ERRORS: RateLimit = RateLimit::new();

/// How a request's body failed (see `ConnCtx::handle`).
const MALFORMED: u8 = 1;
const GONE: u8 = 2;

/// One per cap (`proxy.upstream_max_per_connection`, `_per_address`, `proxy.upstream_max`).
static UPSTREAM_CAPS: [RateLimit; 3] = [RateLimit::new(), RateLimit::new(), RateLimit::new()];

static UPSTREAM_TIMEOUTS: RateLimit = RateLimit::new();

static UPSTREAM_FAILURES: RateLimit = RateLimit::new();

static NOT_HTTP: RateLimit = RateLimit::new();

impl RateLimit {
    const EVERY: Duration = Duration::from_secs(10);

    pub(crate) const fn new() -> RateLimit {
        RateLimit {
            last: std::sync::Mutex::new(None),
            left_out: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// `Some(lines left out since the last)` if a line may be logged now.
    pub(crate) fn should_log(&self) -> Option<u64> {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        if last.is_some_and(|t| now.duration_since(t) < Self::EVERY) {
            self.left_out
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return None;
        }
        *last = Some(now);
        Some(self.left_out.swap(0, std::sync::atomic::Ordering::Relaxed))
    }
}

/// Whether `path` (already without dot segments) may be served over plain HTTP under `prefix`:
/// it starts with the prefix at a segment boundary, and is made of RFC 3986's path characters
/// but `;` only (letters, digits, `-._~!$&'()*+,=:@/`): no percent-encoding (an encoded dot,
/// slash or backslash, a NUL, an overlong UTF-8 form, a double encoding, which an application
/// that decodes may read as another path), no `;` parameter, no backslash, nothing else. Anything
/// else is redirected to https, where every path is served.
fn plain_path_matches(path: &str, prefix: &str) -> bool {
    let Some(rest) = path.strip_prefix(prefix) else {
        return false;
    };
    let boundary = prefix.ends_with('/') || rest.is_empty() || rest.starts_with('/');
    let plain = path
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"-._~!$&'()*+,=:@/".contains(&b));
    boundary && plain
}

/// The target as forwarded: a path from `/`, or `*`. An empty path (an absolute URI without
/// one, or a target that was only a fragment, which hyper drops) is `/`, as RFC 9112 3.2.2 has
/// it: `?q` is `/?q` here, and an empty target (whose text says `/`, but which a `Uri` made of
/// it writes as nothing) is made `/` where the request goes out. A path that starts otherwise
/// is refused (`None`).
fn origin_form(path: &PathAndQuery) -> Option<PathAndQuery> {
    let text = path.as_str();
    if text.starts_with('/') || text == "*" {
        Some(path.clone())
    } else if text.is_empty() || text.starts_with('?') {
        PathAndQuery::try_from(format!("/{text}")).ok()
    } else {
        None
    }
}

/// `path` with its dot segments removed (RFC 3986 5.2.4), the query kept; percent-encoding is
/// left as it came. The same `path` when it has none.
fn without_dot_segments(path: &PathAndQuery) -> PathAndQuery {
    let p = path.path();
    // A dot segment follows a slash (a `PathAndQuery` starts with one, or is `*`): most paths
    // have no "/." at all.
    if !p.contains("/.") || !p.split('/').any(|seg| seg == "." || seg == "..") {
        return path.clone();
    }
    let mut out: Vec<&str> = Vec::new();
    let segments: Vec<&str> = p.split('/').skip(1).collect();
    let last = segments.len().saturating_sub(1);
    for (i, seg) in segments.iter().enumerate() {
        match *seg {
            "." => {
                if i == last {
                    out.push("");
                }
            }
            ".." => {
                out.pop();
                if i == last {
                    out.push("");
                }
            }
            other => out.push(other),
        }
    }
    let mut text = format!("/{}", out.join("/"));
    if let Some(q) = path.query() {
        text.push('?');
        text.push_str(q);
    }
    PathAndQuery::try_from(text).unwrap_or_else(|_| path.clone())
}

/// The methods forwarded: RFC 9110's (but CONNECT and TRACE), PATCH, and WebDAV's.
const METHODS: [&str; 17] = [
    "GET",
    "HEAD",
    "POST",
    "PUT",
    "DELETE",
    "OPTIONS",
    "PATCH",
    "PROPFIND",
    "PROPPATCH",
    "MKCOL",
    "COPY",
    "MOVE",
    "LOCK",
    "UNLOCK",
    "REPORT",
    "SEARCH",
    "MKCALENDAR",
];
const ALLOWED_METHODS: &str = "GET, HEAD, POST, PUT, DELETE, OPTIONS, PATCH";

/// A request no application behind this proxy gets, answered here: a method not forwarded,
/// CONNECT (this is not a forward proxy), a transfer coding other than chunked (hyper only
/// undoes chunked, so the application would get the coded bytes as the body: RFC 9112 6.1 says
/// 501), a target that is not a path, a missing, repeated or invalid `Host` (RFC 9112 3.2 says
/// 400), and a field value with a space or a tab at an end. The connection closes after the
/// answer.
fn refused<B>(req: &Request<B>, fields: &Fields) -> Option<Response<Body>> {
    let (status, title, text) = if !METHODS.contains(&req.method().as_str()) {
        (
            StatusCode::NOT_IMPLEMENTED,
            "Not implemented",
            format!(
                "The method \"{}\" is not one this server forwards.",
                escape(&req.method().as_str().chars().take(40).collect::<String>())
            ),
        )
    } else if req.method() == Method::CONNECT {
        (
            StatusCode::NOT_IMPLEMENTED,
            "Not implemented",
            "This server does not take CONNECT requests.".to_string(),
        )
    } else if let Some(coding) = fields
        .transfer_encoding
        .then(|| unsupported_coding(req.headers()))
        .flatten()
    {
        (
            StatusCode::NOT_IMPLEMENTED,
            "Not implemented",
            format!(
                "The transfer coding \"{}\" is not supported (only chunked is).",
                escape(&coding.chars().take(40).collect::<String>())
            ),
        )
    } else if fields.transfer_encoding && repeated_chunked(req.headers()) {
        (
            StatusCode::BAD_REQUEST,
            "Bad request",
            "The request is chunked more than once.".to_string(),
        )
    } else if let Some(why) = bad_target(req.uri()).or_else(|| bad_host(req, fields)) {
        (StatusCode::BAD_REQUEST, "Bad request", why.to_string())
    } else if fields.padded {
        // HTTP/2 carries a value as it is (RFC 9113 8.2.1 calls one with a space or a tab at an
        // end malformed); over HTTP/1.1 the application's parser drops those as optional
        // whitespace and would read another value than the one judged here. (HTTP/1.1's own
        // parser drops them before regobox sees the value.)
        (
            StatusCode::BAD_REQUEST,
            "Bad request",
            "A field's value begins or ends with a space or a tab.".to_string(),
        )
    } else {
        return None;
    };
    Some(closing(page(status, title, &text)))
}

/// The first transfer coding of the request other than chunked.
fn unsupported_coding(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::TRANSFER_ENCODING)
        .iter()
        .find_map(|v| {
            String::from_utf8_lossy(v.as_bytes())
                .split(',')
                .map(str::trim)
                .find(|c| !c.is_empty() && !c.eq_ignore_ascii_case("chunked"))
                .map(str::to_string)
        })
}

/// `Transfer-Encoding: chunked, chunked` (or chunked in two fields): RFC 9112 6.1 forbids
/// applying chunked more than once.
fn repeated_chunked(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::TRANSFER_ENCODING)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .filter(|c| {
            String::from_utf8_lossy(c)
                .trim()
                .eq_ignore_ascii_case("chunked")
        })
        .count()
        > 1
}

/// What is wrong with the request's target when it names a host (HTTP/1.1's absolute form,
/// HTTP/2's `:authority`), if anything: that host is the one forwarded, so it is held to what a
/// `Host` field is held to (no user information, a port that is a port), and only `http` and
/// `https` targets are taken; a host alone (the authority form) is CONNECT's, refused.
fn bad_target(uri: &Uri) -> Option<&'static str> {
    let authority = uri.authority()?;
    match uri.scheme_str() {
        None => Some("The target is a host alone, which only CONNECT takes."),
        Some(s) if !s.eq_ignore_ascii_case("http") && !s.eq_ignore_ascii_case("https") => {
            Some("The target's scheme is not http or https.")
        }
        _ if !valid_host(authority.as_str().as_bytes()) => {
            Some("The target's host is not a host name with an optional port.")
        }
        _ => None,
    }
}

/// What is wrong with the request's `Host` header, if anything.
fn bad_host<B>(req: &Request<B>, fields: &Fields) -> Option<&'static str> {
    match &fields.host {
        Some(_) if fields.hosts > 1 => Some("The request has more than one Host header."),
        None if req.version() == Version::HTTP_11 && req.uri().authority().is_none() => {
            Some("An HTTP/1.1 request must have a Host header.")
        }
        Some(v) if !v.is_empty() && !valid_host(v.as_bytes()) => {
            Some("The Host header is not a host name with an optional port.")
        }
        _ => None,
    }
}

/// `host[:port]`: a registered name or an IPv4 address, or an IPv6 address in brackets. One pass
/// over the bytes: it is asked of every request (its Host field or its target's authority).
fn valid_host(value: &[u8]) -> bool {
    let (host_ok, port) = match value.strip_prefix(b"[") {
        Some(rest) => {
            let Some(end) = rest.iter().position(|&c| c == b']') else {
                return false;
            };
            let v6 = std::str::from_utf8(&rest[..end])
                .is_ok_and(|v6| v6.parse::<std::net::Ipv6Addr>().is_ok());
            (v6, &rest[end + 1..])
        }
        None => {
            let end = value.iter().position(|&c| c == b':').unwrap_or(value.len());
            let host = &value[..end];
            let ok = !host.is_empty()
                && host.len() <= 253
                && host
                    .iter()
                    .all(|&c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'-' | b'_'));
            (ok, &value[end..])
        }
    };
    let port_ok = match port.split_first() {
        None => true,
        Some((b':', digits)) => {
            (1..=5).contains(&digits.len())
                && digits.iter().all(u8::is_ascii_digit)
                && digits
                    .iter()
                    .fold(0u32, |n, d| n * 10 + u32::from(d - b'0'))
                    <= u32::from(u16::MAX)
        }
        Some(_) => false,
    };
    host_ok && port_ok
}

/// The host the client asked for, without a port: `:authority` (HTTP/2, or an absolute-form
/// target) or the `Host` field (`host`).
fn request_host(uri: &Uri, host: Option<&HeaderValue>) -> Option<String> {
    let raw = match uri.authority() {
        Some(a) => a.host(),
        None => {
            let h = host?.to_str().ok()?.trim();
            if h.starts_with('[') {
                // `[v6]` with its bracket.
                &h[..h.find(']').map_or(h.len(), |i| i + 1)]
            } else {
                h.split(':').next()?
            }
        }
    };
    let ok = !raw.is_empty()
        && raw.len() <= 253
        && raw.bytes().all(|c| {
            c.is_ascii_alphanumeric() || matches!(c, b'.' | b'-' | b'[' | b']' | b':' | b'_')
        });
    ok.then(|| raw.to_ascii_lowercase())
}

fn redirect(method: &Method, host: &str, https_port: u16, path: &str) -> Response<Body> {
    let port = if https_port == 443 {
        String::new()
    } else {
        format!(":{https_port}")
    };
    let location = format!("https://{host}{port}{path}");
    // 301 for reads; 308 keeps the method and body of the others.
    let status = if matches!(*method, Method::GET | Method::HEAD) {
        StatusCode::MOVED_PERMANENTLY
    } else {
        StatusCode::PERMANENT_REDIRECT
    };
    Response::builder()
        .status(status)
        .header(header::LOCATION, location)
        .header(header::CONTENT_LENGTH, 0)
        .body(super::empty())
        .unwrap_or_default()
}

/// A WebSocket upgrade, the one upgrade forwarded: `Upgrade: websocket` alone (RFC 6455), with
/// `upgrade` among the `Connection` options. Any other (`h2c` above all: the client would then
/// speak HTTP/2 to the application past every check made here) is not asked of the application.
fn wants_upgrade(headers: &HeaderMap) -> bool {
    let mut protocols = headers.get_all(header::UPGRADE).iter();
    let websocket = match (protocols.next(), protocols.next()) {
        (Some(p), None) => p.as_bytes().trim_ascii().eq_ignore_ascii_case(b"websocket"),
        _ => false,
    };
    websocket
        && headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}

/// RFC 9110 7.6.1: the hop-by-hop fields and those `Connection` names.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Passes over the fields, no hashing: the options `Connection` names, then the fields present
    // that go (hop-by-hop, or named by an option); then a removal (a hash) per field that goes.
    // Most messages carry none (HTTP/2 forbids them) or just `Connection: keep-alive`.
    // Read as bytes: a value with a byte that is not text elsewhere (`x-secret, \xa0`) still
    // names its options (read as text, it named none, and `X-Secret` went on).
    let options: Vec<&[u8]> = headers
        .iter()
        .filter(|(name, _)| *name == header::CONNECTION)
        .flat_map(|(_, value)| value.as_bytes().split(|&b| b == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|option| !option.is_empty())
        .collect();
    // Each name once (`keys` yields a name with several values once).
    let doomed: Vec<HeaderName> = headers
        .keys()
        .filter(|name| {
            is_hop_by_hop(name)
                || options
                    .iter()
                    .any(|option| option.eq_ignore_ascii_case(name.as_str().as_bytes()))
        })
        .cloned()
        .collect();
    for name in doomed {
        headers.remove(name);
    }
}

/// Fields with an underscore in their name are not forwarded, as nginx does by default: CGI and
/// WSGI servers read `X_Forwarded_For` as `X-Forwarded-For` (both are `HTTP_X_FORWARDED_FOR`),
/// which would put the client's words beside (and before) the forwarding fields regobox sets.
fn drop_underscored(headers: &mut HeaderMap) {
    let doomed: Vec<HeaderName> = headers
        .keys()
        .filter(|name| name.as_str().contains('_'))
        .cloned()
        .collect();
    for name in doomed {
        headers.remove(name);
    }
}

/// HTTP/2 may split `Cookie` into a field per cookie; for HTTP/1.1 they are one field, joined
/// with `; ` (RFC 9113 8.2.3): an application reading one `Cookie` line would lose the others.
fn join_cookies(headers: &mut HeaderMap) {
    let mut joined = Vec::new();
    for value in headers.get_all(header::COOKIE) {
        if !joined.is_empty() {
            joined.extend_from_slice(b"; ");
        }
        joined.extend_from_slice(value.as_bytes());
    }
    if let Ok(v) = HeaderValue::from_maybe_shared(Bytes::from(joined)) {
        headers.insert(header::COOKIE, v);
    }
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// `response` with the connection closed after it (the client's framing cannot be trusted).
fn closing(mut response: Response<Body>) -> Response<Body> {
    response
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

/// A small HTML page.
pub fn page(status: StatusCode, title: &str, text: &str) -> Response<Body> {
    let html = format!(
        "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>{code} {title}</title>\
         <style>body{{font-family:system-ui,sans-serif;max-width:40em;margin:4em auto;color:#333}}</style></head>\
         <body><h1>{code} {title}</h1><p>{text}</p><hr><small>regobox</small></body></html>\n",
        code = status.as_u16(),
    );
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "text/html; charset=utf-8")
        .header(header::CACHE_CONTROL, "no-store")
        .body(full(Bytes::from(html)))
        .unwrap_or_default()
}

struct AccessLine {
    method: Method,
    path: Target,
    status: u16,
    version: Version,
    peer: HeaderValue,
    started: Instant,
    upstream: Option<Duration>,
}

/// A response body that counts its bytes, logs the request when it is done and keeps the
/// request in flight until then.
struct Logged {
    inner: Body,
    /// What is left of a frame longer than [`PIECE`].
    rest: Option<Bytes>,
    /// Sent to the end (see `is_end_stream`).
    ended: bool,
    /// The client speaks HTTP/2: the last piece carries the end of the stream.
    http2: bool,
    bytes: u64,
    /// Whether the client takes what it is handed.
    handover: Arc<Handover>,
    activity: Arc<Activity>,
    /// The connection to the application the body comes from, held until it is sent.
    _lease: Option<Lease>,
    line: Option<Box<AccessLine>>,
    _guard: InFlight,
}

impl hyper::body::Body for Logged {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        // The body wakes the handover, which notes when a piece became ready and passes the
        // wake on (see `Handover`).
        self.handover.asked(cx.waker());
        let r = match self.rest.take() {
            Some(rest) => Poll::Ready(Some(Ok(Frame::data(rest)))),
            None => {
                let waker = std::task::Waker::from(self.handover.clone());
                Pin::new(&mut self.inner).poll_frame(&mut Context::from_waker(&waker))
            }
        };
        let r = match r {
            Poll::Ready(Some(Ok(frame))) => {
                let frame = match frame.into_data() {
                    // A piece at most PIECE long: the client's side must come back for the next
                    // within proxy.send_timeout, whatever the size of what the application sent
                    // at once (hundreds of KiB: a slow but steady reader would not make it).
                    Ok(mut data) => {
                        if data.len() > PIECE {
                            self.rest = Some(data.split_off(PIECE));
                        }
                        self.bytes += data.len() as u64;
                        self.activity
                            .sent
                            .fetch_add(data.len() as u64, std::sync::atomic::Ordering::Relaxed);
                        if self.http2 && self.rest.is_none() && self.inner.is_end_stream() {
                            self.ended = true;
                        }
                        Frame::data(data)
                    }
                    Err(frame) => frame,
                };
                self.handover.waits();
                Poll::Ready(Some(Ok(frame)))
            }
            r => r,
        };
        if let Poll::Ready(None) = &r {
            self.ended = true;
        }
        r
    }

    /// Over HTTP/1.1, only once the reader came back for the end (or if there was nothing to
    /// send): that last poll says the client took the last piece (see `Handover`). Over HTTP/2,
    /// as soon as the last piece is handed over, so that it carries the end of the stream rather
    /// than an empty DATA frame after it (1 900 instructions a request, measured). Either way
    /// hyper lets the body go once the stream has room for a byte of that piece, the rest of it
    /// kept by h2 (at most one piece: see `serve_h2`).
    fn is_end_stream(&self) -> bool {
        self.ended
    }

    fn size_hint(&self) -> SizeHint {
        let mut hint = self.inner.size_hint();
        let rest = self.rest.as_ref().map_or(0, |r| r.len() as u64);
        // The upper bound first: a lower bound above it panics.
        if let Some(upper) = hint.upper() {
            hint.set_upper(upper + rest);
        }
        hint.set_lower(hint.lower() + rest);
        hint
    }
}

/// The largest piece of a response handed to the client's side at once (see `Logged`).
pub(super) const PIECE: usize = 16 * 1024;

/// A request body with the frames that are ready together passed on as one (up to
/// [`GATHERED`] bytes): a client sending a body in one-byte chunks then costs one write to the
/// application per read from the client, not one per chunk.
struct Gather<B> {
    inner: B,
    /// What ended a gathering (trailers, an error, the end), passed on next.
    held: Option<Option<Result<Frame<Bytes>, BoxError>>>,
}

const GATHERED: usize = 64 * 1024;

impl<B> Gather<B> {
    fn new(inner: B) -> Self {
        Gather { inner, held: None }
    }
}

impl<B> hyper::body::Body for Gather<B>
where
    B: hyper::body::Body<Data = Bytes, Error = BoxError> + Unpin,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if let Some(held) = this.held.take() {
            return Poll::Ready(held);
        }
        let mut first: Option<Bytes> = None;
        let mut more: Option<bytes::BytesMut> = None;
        loop {
            let len = more
                .as_ref()
                .map_or(first.as_ref().map_or(0, Bytes::len), |m| m.len());
            if len >= GATHERED {
                break;
            }
            match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => match (&mut first, &mut more) {
                        (None, _) => first = Some(data),
                        (Some(f), None) => {
                            let mut m = bytes::BytesMut::with_capacity(f.len() + data.len());
                            m.extend_from_slice(f);
                            m.extend_from_slice(&data);
                            more = Some(m);
                        }
                        (Some(_), Some(m)) => m.extend_from_slice(&data),
                    },
                    Err(frame) if first.is_none() => return Poll::Ready(Some(Ok(frame))),
                    Err(frame) => {
                        this.held = Some(Some(Ok(frame)));
                        break;
                    }
                },
                other if first.is_none() => return other,
                Poll::Pending => break,
                Poll::Ready(end) => {
                    this.held = Some(end);
                    break;
                }
            }
        }
        let data = match more {
            Some(m) => m.freeze(),
            None => first.unwrap_or_default(),
        };
        Poll::Ready(Some(Ok(Frame::data(data))))
    }

    fn is_end_stream(&self) -> bool {
        self.held.is_none() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The request's path and query (`/` when its target has none).
fn path_of<B>(req: &Request<B>) -> PathAndQuery {
    req.uri()
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"))
}

/// The request's target as the access log shows it: its path and query, or the host alone of a
/// target in authority form (CONNECT's, refused: the log says what was asked).
enum Target {
    Path(PathAndQuery),
    Host(hyper::http::uri::Authority),
}

impl Target {
    fn of<B>(req: &Request<B>) -> Target {
        match (req.uri().path_and_query(), req.uri().authority()) {
            (None, Some(a)) => Target::Host(a.clone()),
            _ => Target::Path(path_of(req)),
        }
    }

    fn as_str(&self) -> &str {
        match self {
            Target::Path(p) => p.as_str(),
            Target::Host(a) => a.as_str(),
        }
    }
}

impl AccessLine {
    /// Written to the access log, `bytes` of the response sent.
    fn record(&self, bytes: u64) {
        super::access::record(&super::access::Line {
            peer: self.peer.to_str().unwrap_or("-"),
            method: self.method.as_str(),
            path: self.path.as_str(),
            version: Some(self.version),
            status: self.status,
            bytes,
            duration: clock::now().saturating_duration_since(self.started),
            upstream: self.upstream,
        });
    }
}

impl Drop for Logged {
    fn drop(&mut self) {
        if let Some(line) = &self.line {
            line.record(self.bytes);
        }
    }
}

/// What hyper's HTTP/1.1 server answered before ending its connection with `e`, if anything:
/// a request head it could not read (hyper 1's `Server::on_error`, called for a head parsed
/// while no response is being written, which a server's connection always is: it reads the
/// next head only once the last response is sent). The error is returned once that answer is
/// flushed and the connection shut down; a failed write or shutdown returns its own error
/// instead. Which parse error it was, beyond a head too large, hyper says only in its message.
fn hyper_answer(e: &hyper::Error) -> Option<u16> {
    if !e.is_parse() || e.is_parse_version_h2() {
        return None;
    }
    let message = e.to_string();
    if e.is_parse_too_large() {
        Some(if message.contains("URI too long") {
            StatusCode::URI_TOO_LONG.as_u16()
        } else {
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE.as_u16()
        })
    } else if message.starts_with("internal error") {
        None
    } else {
        Some(StatusCode::BAD_REQUEST.as_u16())
    }
}

/// The status logged for a request that ended before its response was made (nginx's).
const CLIENT_LEFT: u16 = 499;

/// A request's access line until its response is made (then the response's [`Logged`] has
/// it): logged with [`CLIENT_LEFT`] if the request ends first, the application's time counted
/// from when the request was `sent` to it.
struct Unanswered {
    line: Option<Box<AccessLine>>,
    sent: Option<Instant>,
}

impl Drop for Unanswered {
    fn drop(&mut self) {
        if let Some(mut line) = self.line.take() {
            line.upstream = self
                .sent
                .map(|sent| clock::now().saturating_duration_since(sent));
            line.record(0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_logged_target_is_what_was_asked() {
        let target = |method: Method, uri: &str| {
            let req = Request::builder().method(method).uri(uri).body(()).unwrap();
            Target::of(&req).as_str().to_string()
        };
        assert_eq!(target(Method::CONNECT, "localhost:22"), "localhost:22");
        assert_eq!(target(Method::GET, "/a?b"), "/a?b");
        assert_eq!(target(Method::GET, "http://localhost/a"), "/a");
        assert_eq!(target(Method::GET, "http://localhost"), "/");
        assert_eq!(target(Method::OPTIONS, "*"), "*");
    }

    #[tokio::test]
    async fn frames_ready_together_go_on_as_one() {
        let mut frames: Vec<Result<Frame<Bytes>, BoxError>> = (0..100_000)
            .map(|_| Ok(Frame::data(Bytes::from_static(b"a"))))
            .collect();
        frames.push(Ok(Frame::trailers(HeaderMap::new())));
        let stream = futures_util::stream::iter(frames);
        let mut body = Gather::new(http_body_util::StreamBody::new(stream));
        let mut sizes = Vec::new();
        let mut trailers = false;
        while let Some(frame) = body.frame().await {
            match frame.unwrap().into_data() {
                Ok(d) => sizes.push(d.len()),
                Err(f) => trailers = f.is_trailers(),
            }
        }
        assert!(trailers);
        assert_eq!(sizes.iter().sum::<usize>(), 100_000);
        assert_eq!(sizes[0], GATHERED, "{sizes:?}");
        assert_eq!(sizes.len(), 2, "{sizes:?}");
    }

    #[test]
    fn hop_by_hop_fields_go() {
        let mut h = HeaderMap::new();
        h.insert(
            "connection",
            HeaderValue::from_static("keep-alive, X-Secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("te", HeaderValue::from_static("trailers"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        h.append("connection", HeaderValue::from_static(" ,X-Other ,"));
        h.append("x-other", HeaderValue::from_static("1"));
        h.append("x-other", HeaderValue::from_static("2"));
        strip_hop_by_hop(&mut h);
        let names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, vec!["x-kept"]);
        // An option that is not text names nothing; the field itself still goes, and the
        // value's other options are still read (an attacker's finding: a byte that is not text
        // anywhere in the value made it name nothing).
        let mut h = HeaderMap::new();
        h.insert("connection", HeaderValue::from_bytes(b"x-a\xff").unwrap());
        h.insert("x-a", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        let names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, vec!["x-a"]);
        let mut h = HeaderMap::new();
        h.insert(
            "connection",
            HeaderValue::from_bytes(b"X-Secret, \xa0").unwrap(),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        let names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, vec!["x-kept"]);
    }

    #[test]
    fn a_trusted_proxys_forwarded_field_is_kept_only_if_it_reads_as_one() {
        for good in [
            "for=192.0.2.60;proto=http;by=203.0.113.43",
            "for=\"[2001:db8:cafe::17]:4711\"",
            "for=192.0.2.43, for=198.51.100.17",
            "for=a;;proto=https, ,for=b",
            "for=\"_hidden\\\"x\";proto=https",
            " for=a , for=b ,",
            "",
        ] {
            assert!(forwarded_list(good), "{good:?}");
        }
        for bad in [
            "for=\"6.6.6.6",
            "for=\"6.6.6.6\\\"",
            "for",
            "=x",
            "for=",
            "for=a b",
            "for=a\"b\"",
            "for=\"a\"b",
            "for=a;proto",
            "evil.example/x\";for=6.6.6.6",
            // No space around `;` (a second attacker's finding: a reader that does not trim
            // sees the name ` proto`).
            "for=6.6.6.6 ; proto=https",
            "for=6.6.6.6; proto=https",
            "for=6.6.6.6;proto=https ;",
        ] {
            assert!(!forwarded_list(bad), "{bad:?}");
        }
        let proto = scheme_list;
        assert!(proto("https") && proto("HTTPS, http"));
        // Empty elements are allowed (RFC 9110 5.6.1), not an empty list.
        assert!(proto("https,") && proto(" , https"));
        assert!(!proto("https;x") && !proto("") && !proto(" , ") && !proto("ftp"));
        let host = host_list;
        assert!(host("a.example") && host("a.example:8443, b.example"));
        assert!(!host("evil.example/x") && !host("a b") && !host(""));
    }

    #[test]
    fn the_forwarding_family_is_known_by_name() {
        for name in [
            "x-forwarded-for",
            "x-forwarded-port",
            "x-forwarded-prefix",
            "x-forwarded-ssl",
            "front-end-https",
            "true-client-ip",
            "x-original-host",
            "forwarded",
            "x-real-ip",
            "x-original-url",
            "cf-connecting-ip",
            "x-forwarded",
        ] {
            assert!(is_forwarding(&HeaderName::from_static(name)), "{name}");
        }
        for name in ["x-forward", "forwarded-by", "x-request-id", "host"] {
            assert!(!is_forwarding(&HeaderName::from_static(name)), "{name}");
        }
    }

    #[test]
    fn requests_refused_here() {
        let status =
            |req: Request<()>| refused(&req, &Fields::of(req.headers())).map(|r| r.status());
        let get = || Request::get("/x").version(Version::HTTP_11);
        assert_eq!(status(get().header("host", "a").body(()).unwrap()), None);
        assert_eq!(status(get().header("host", "").body(()).unwrap()), None);
        // HTTP/1.0 needs no Host; an absolute-form target carries its own.
        let old = get().version(Version::HTTP_10).body(()).unwrap();
        assert_eq!(status(old), None);
        let absolute = Request::get("http://a/x").body(()).unwrap();
        assert_eq!(status(absolute), None);
        let bad = StatusCode::BAD_REQUEST;
        assert_eq!(status(get().body(()).unwrap()), Some(bad));
        let two = get()
            .header("host", "a")
            .header("host", "b")
            .body(())
            .unwrap();
        assert_eq!(status(two), Some(bad));
        assert_eq!(
            status(get().header("host", "a b").body(()).unwrap()),
            Some(bad)
        );
        let connect = Request::connect("a:22").body(()).unwrap();
        assert_eq!(status(connect), Some(StatusCode::NOT_IMPLEMENTED));
        let te = |v: &'static str| get().header("host", "a").header("transfer-encoding", v);
        assert_eq!(status(te("chunked").body(()).unwrap()), None);
        assert_eq!(status(te("Chunked").body(()).unwrap()), None);
        let gzip = te("gzip, chunked").body(()).unwrap();
        assert_eq!(status(gzip), Some(StatusCode::NOT_IMPLEMENTED));
        let padded = |v: &'static str| get().header("host", "a").header("x", v).body(()).unwrap();
        for v in [" a", "a ", "\ta", "a\t", " "] {
            assert_eq!(status(padded(v)), Some(bad), "{v:?}");
        }
        for v in ["a b", "a\tb", ""] {
            assert_eq!(status(padded(v)), None, "{v:?}");
        }
        let req = te("<x>, chunked").body(()).unwrap();
        let r = refused(&req, &Fields::of(req.headers())).unwrap();
        assert_eq!(r.headers()["connection"], "close");
    }

    #[test]
    fn only_an_unambiguous_path_under_a_prefix_is_plain() {
        assert!(plain_path_matches("/job/1/notify", "/job/"));
        assert!(plain_path_matches("/ws-plain", "/ws-plain"));
        assert!(plain_path_matches("/ws-plain/x", "/ws-plain"));
        assert!(!plain_path_matches("/ws-plainXYZ", "/ws-plain"));
        for doubtful in [
            "/job/%2e%2e/admin",
            "/job/.%2E/admin",
            "/job/..%2fadmin",
            "/job/..;/admin",
            "/job/..\\admin",
            "/job/%5c../admin",
            // An attacker's (twenty-sixth session): read as another path by an application that
            // decodes leniently, or twice.
            "/job/1/%3B/x",
            "/job/1/..%00/admin",
            "/job/%c0%af../admin",
            "/job/%c0%ae%c0%ae/admin",
            "/job/%252e%252e/admin",
            "/job/%u002e%u002e/admin",
            "/job/caf\u{e9}",
        ] {
            assert!(!plain_path_matches(doubtful, "/job/"), "{doubtful}");
        }
    }

    #[test]
    fn dot_segments_are_removed_and_the_rest_kept() {
        let n = |p: &str| without_dot_segments(&PathAndQuery::try_from(p).unwrap()).to_string();
        assert_eq!(n("/job/../admin"), "/admin");
        assert_eq!(n("/job/./1?x=../y"), "/job/1?x=../y");
        assert_eq!(n("/../../etc/passwd"), "/etc/passwd");
        assert_eq!(n("/a/b/.."), "/a/");
        assert_eq!(n("/a/."), "/a/");
        assert_eq!(n("/a/%2e%2e/b"), "/a/%2e%2e/b");
        assert_eq!(n("/plain/path"), "/plain/path");
        assert_eq!(n("/a.b/.c/..d"), "/a.b/.c/..d");
    }

    #[test]
    fn hosts_and_redirects() {
        let req = Request::get("/x")
            .header("host", "Example.org:8443")
            .body(())
            .unwrap();
        let host = |req: &Request<()>| request_host(req.uri(), req.headers().get(header::HOST));
        assert_eq!(host(&req).as_deref(), Some("example.org"));
        let bad = Request::get("/").header("host", "a b").body(()).unwrap();
        assert_eq!(host(&bad), None);
        let v6 = Request::get("/")
            .header("host", "[::1]:80")
            .body(())
            .unwrap();
        assert_eq!(host(&v6).as_deref(), Some("[::1]"));
        let absolute = Request::get("http://Example.org:81/")
            .header("host", "b")
            .body(())
            .unwrap();
        assert_eq!(host(&absolute).as_deref(), Some("example.org"));
        let r = redirect(&Method::GET, "example.org", 443, "/a?b=1");
        let ok = [
            "example.org",
            "Example.org:8443",
            "10.0.0.1:80",
            "[::1]:443",
            "[::1]",
            "a_b",
            "a:65535",
            "a:0",
        ];
        for host in ok {
            assert!(valid_host(host.as_bytes()), "{host}");
        }
        let bad = [
            "a b", "", ":80", "a:", "a:x", "a:65536", "a:+1", "u@a", "[::1", "[zz]", "[::1]x",
            "a:1:2", "a:99999", "a:000080", "[::1]:", "[::1]:x", "a]:80", "é.org",
        ];
        for host in bad {
            assert!(!valid_host(host.as_bytes()), "{host}");
        }
        assert_eq!(r.status(), StatusCode::MOVED_PERMANENTLY);
        assert_eq!(r.headers()["location"], "https://example.org/a?b=1");
        let r = redirect(&Method::POST, "example.org", 8443, "/p");
        assert_eq!(r.status(), StatusCode::PERMANENT_REDIRECT);
        assert_eq!(r.headers()["location"], "https://example.org:8443/p");
    }
}

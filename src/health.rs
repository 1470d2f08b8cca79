//! The supervision port (Grocker's 8081): `/healthz` (alive), `/readyz` (every essential
//! service ready: 200, else 503), `/status` (JSON) and `/metrics` (Prometheus text format), and
//! the client side used by `regobox status`, `regobox health` and HTTP readiness probes.

use std::convert::Infallible;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::supervisor::status::{Board, Snapshot};

/// Bind the supervision port; the error names the keys to change.
pub async fn bind(listen: &str, port: u16) -> anyhow::Result<TcpListener> {
    let addr: SocketAddr = format!("{}:{port}", bracket(listen)).parse()?;
    TcpListener::bind(addr).await.map_err(|e| {
        anyhow::anyhow!(
            "cannot listen on {addr} for the supervision port: {e} (set supervision.listen / supervision.port, or supervision.port = 0 to disable it)"
        )
    })
}

fn bracket(host: &str) -> String {
    if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_string()
    }
}

/// Every reason why `snap` is not ready, for a person: maintenance, low space, and each
/// essential service that is not ready, with what it is doing.
fn not_ready(snap: &Snapshot) -> String {
    if let Some(why) = &snap.maintenance {
        return format!("maintenance: {why}");
    }
    let mut reasons = Vec::new();
    if let Some(v) = snap.volume.as_ref().filter(|v| v.low) {
        reasons.push(format!("low space: {}", v.why()));
    }
    for s in snap
        .services
        .iter()
        .filter(|s| s.essential && !s.status.state.is_ready())
    {
        let state = format!("{:?}", s.status.state).to_lowercase();
        reasons.push(match &s.status.detail {
            Some(detail) => format!("{} ({state}: {detail})", s.name),
            None => format!("{} ({state})", s.name),
        });
    }
    format!("not ready: {}", reasons.join("; "))
}

/// Serve until `shutdown`.
pub async fn serve(listener: TcpListener, board: Arc<Board>, shutdown: CancellationToken) {
    loop {
        let (stream, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(_) => continue,
            },
            _ = shutdown.cancelled() => return,
        };
        let board = board.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let board = board.clone();
                async move { Ok::<_, Infallible>(route(&req, &board)) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn route<B>(req: &Request<B>, board: &Board) -> Response<Full<Bytes>> {
    let text = |status: StatusCode, body: String, ctype: &str| {
        Response::builder()
            .status(status)
            .header(hyper::header::CONTENT_TYPE, ctype)
            .body(Full::new(Bytes::from(body)))
            .unwrap_or_default()
    };
    if req.method() != hyper::Method::GET && req.method() != hyper::Method::HEAD {
        return text(
            StatusCode::METHOD_NOT_ALLOWED,
            "GET only\n".into(),
            "text/plain",
        );
    }
    match req.uri().path() {
        "/healthz" => text(StatusCode::OK, "ok\n".into(), "text/plain"),
        "/readyz" => {
            let snap = board.snapshot();
            if snap.ready {
                text(StatusCode::OK, "ready\n".into(), "text/plain")
            } else {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("{}\n", not_ready(&snap)),
                    "text/plain",
                )
            }
        }
        "/status" => text(
            StatusCode::OK,
            serde_json::to_string_pretty(&board.snapshot()).unwrap_or_default() + "\n",
            "application/json",
        ),
        "/metrics" => text(
            StatusCode::OK,
            metrics(&board.snapshot()),
            "text/plain; version=0.0.4",
        ),
        _ => text(StatusCode::NOT_FOUND, "not found\n".into(), "text/plain"),
    }
}

/// The Prometheus exposition of a snapshot.
pub fn metrics(snap: &Snapshot) -> String {
    let mut out = String::new();
    let mut family = |name: &str, kind: &str, help: &str| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    };
    family(
        "regobox_ready",
        "gauge",
        "1 when every essential service is ready",
    );
    family(
        "regobox_uptime_seconds",
        "gauge",
        "Seconds since regobox started",
    );
    family(
        "regobox_orphans_reaped_total",
        "counter",
        "Orphaned processes reaped",
    );
    family(
        "regobox_service_up",
        "gauge",
        "1 when the service's process is running",
    );
    family(
        "regobox_service_ready",
        "gauge",
        "1 when the service is ready (or completed, for a oneshot)",
    );
    family(
        "regobox_service_restarts_total",
        "counter",
        "Restarts of the service",
    );
    family(
        "regobox_service_uptime_seconds",
        "gauge",
        "Seconds since the service's process started",
    );
    family(
        "regobox_docker_up",
        "gauge",
        "1 when the Docker bridge serves its socket",
    );
    let _ = writeln!(out, "regobox_ready {}", u8::from(snap.ready));
    if let Some(t) = snap
        .components
        .get("proxy")
        .and_then(|p| p.pointer("/certificate/not_after_unix"))
        .and_then(|t| t.as_i64())
    {
        let _ = writeln!(
            out,
            "# HELP regobox_tls_certificate_not_after_seconds Expiry of the proxy's certificate (Unix time)\n# TYPE regobox_tls_certificate_not_after_seconds gauge\nregobox_tls_certificate_not_after_seconds {t}"
        );
    }
    if let Some(docker) = snap.components.get("docker") {
        let up = docker.get("state").and_then(|s| s.as_str()) == Some("up");
        let _ = writeln!(out, "regobox_docker_up {}", u8::from(up));
    }
    let _ = writeln!(out, "regobox_uptime_seconds {:.3}", snap.uptime_seconds);
    let _ = writeln!(out, "regobox_orphans_reaped_total {}", snap.orphans_reaped);
    if let Some(v) = &snap.volume {
        let _ = writeln!(
            out,
            "# HELP regobox_volume_free_bytes Bytes still writable on the data volume\n# TYPE regobox_volume_free_bytes gauge\nregobox_volume_free_bytes {}",
            v.free_bytes
        );
        let _ = writeln!(
            out,
            "# HELP regobox_volume_size_bytes Size of the data volume\n# TYPE regobox_volume_size_bytes gauge\nregobox_volume_size_bytes {}",
            v.size_bytes
        );
        let _ = writeln!(
            out,
            "# HELP regobox_volume_min_free_bytes volumes.min_free\n# TYPE regobox_volume_min_free_bytes gauge\nregobox_volume_min_free_bytes {}",
            v.min_free_bytes
        );
    }
    let now = crate::supervisor::status::now_epoch();
    for s in &snap.services {
        let l = format!(
            "service=\"{}\"",
            s.name.replace('\\', "\\\\").replace('"', "\\\"")
        );
        let up = s.status.pid.is_some();
        let _ = writeln!(out, "regobox_service_up{{{l}}} {}", u8::from(up));
        let _ = writeln!(
            out,
            "regobox_service_ready{{{l}}} {}",
            u8::from(s.status.state.is_ready())
        );
        let _ = writeln!(
            out,
            "regobox_service_restarts_total{{{l}}} {}",
            s.status.restarts
        );
        let uptime = match (up, s.status.started_at) {
            (true, Some(t)) => (now - t).max(0.0),
            _ => 0.0,
        };
        let _ = writeln!(out, "regobox_service_uptime_seconds{{{l}}} {uptime:.3}");
    }
    out
}

/// `GET url` (plain HTTP/1.1): the status code and body.
pub async fn get(url: &str) -> Result<(u16, Vec<u8>), String> {
    let uri: hyper::Uri = url.parse().map_err(|e| format!("bad URL {url}: {e}"))?;
    let host = uri
        .host()
        .ok_or("no host in URL")?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let port = uri.port_u16().unwrap_or(80);
    let stream = tokio::net::TcpStream::connect((host.as_str(), port))
        .await
        .map_err(|e| format!("{host}:{port}: {e}"))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let authority = uri.authority().map(|a| a.to_string()).unwrap_or(host);
    let path = uri
        .path_and_query()
        .map(|p| p.to_string())
        .unwrap_or_else(|| "/".into());
    let req = Request::get(path)
        .header(hyper::header::HOST, authority)
        .header(hyper::header::USER_AGENT, "regobox")
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    // The first MAX_BODY bytes only: the application answers readiness probes, and a body of
    // gigabytes would otherwise be held in regobox's memory.
    let mut body = Vec::new();
    let mut incoming = resp.into_body();
    while body.len() < MAX_BODY {
        match incoming.frame().await {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    let room = MAX_BODY - body.len();
                    body.extend_from_slice(&data[..data.len().min(room)]);
                }
            }
            Some(Err(e)) => return Err(e.to_string()),
            None => break,
        }
    }
    Ok((status, body))
}

/// The most of a body [`get`] keeps.
const MAX_BODY: usize = 1 << 20;

/// The URL of the local supervision port for `path`.
pub fn local_url(listen: &str, port: u16, path: &str) -> String {
    let host = match listen {
        "0.0.0.0" | "" => "127.0.0.1".to_string(),
        "::" => "[::1]".to_string(),
        other => bracket(other),
    };
    format!("http://{host}:{port}{path}")
}

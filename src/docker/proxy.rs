//! The socket regobox gives the application: an HTTP/1.1 server on a Unix socket that applies
//! [`super::policy`] to every request and forwards what it allows to the engine.
//!
//! The transport: what reaches the engine is regobox's rendering of the request, never the
//! client's bytes: the path rebuilt from the route with every reference (container, network,
//! image) resolved once to the full id whose ownership was judged, the query from the parsed
//! parameters (a list's filters too), headers of regobox's alone (`engine_headers`: the engine
//! reads a form body's fields as parameters), and bodies the policy reads (container create,
//! network create, connect, disconnect; read up to `docker.max_inspected_body`) serialised from
//! the typed model. A build context and a copy into a container are spooled to a file (up to
//! `docker.max_build_context`) before anything is judged: the Dockerfile is read, and no client
//! trickling its body holds the lock that keeps bind paths still. An import's tar streams
//! through, as do responses (logs with follow, wait, pulls; events are read and written again,
//! one by one: see [`Proxy::own_events`]), and HTTP upgrades (attach)
//! are spliced. A body left unread by a refusal is read and dropped ([`crate::unread`]), so that
//! the client gets the reason, not a broken pipe. Ownership is the instance label: a container,
//! network or image of someone else answers 404 as if it did not exist, and lists leave it out.
//! A label is inherited (a container made from an image carries the image's, and so does an
//! image built on it or committed from such a container), so a container is the instance's only
//! if the socket created it too, as recorded in `secrets/docker-containers.json`, and an image
//! only if the socket built, pulled or imported it, as recorded in
//! `secrets/docker-owned-images.json` (a pulled or imported one carries no label at all; a
//! build's are read from its output: see [`BuildOutput`]); each is forgotten once the engine
//! removes it (see [`Recorded`]).

use std::collections::{BTreeMap, BTreeSet};
use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bollard::models::ContainerInspectResponse;
use bytes::Bytes;
use futures_util::StreamExt;
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::header::{
    CONNECTION, CONTENT_LENGTH, CONTENT_TYPE, HOST, HeaderMap, HeaderValue, TRANSFER_ENCODING,
    UPGRADE,
};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use serde_json::{Value, json};
use tokio::net::UnixListener;
use tokio_util::sync::CancellationToken;

use super::binds::{self, Freeze};
use super::engine::Connector;
use super::model::{
    self, ContainerCreate, NetworkConnect, NetworkCreate, NetworkDisconnect, Undecodable,
};
use super::policy::container::{self, CreatePolicy};
use super::policy::query::{self, Query};
use super::policy::{self, Denied, Endpoint, INSTANCE_LABEL, build, image, network};
use crate::logs::SharedLogFile;
use crate::unread::{Drain, RequestBody};

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Body = BoxBody<Bytes, BoxError>;

/// Any body as the proxy's.
fn boxed<B>(body: B) -> Body
where
    B: hyper::body::Body<Data = Bytes> + Send + Sync + 'static,
    B::Error: Into<BoxError>,
{
    body.map_err(Into::into).boxed()
}

/// Why a request is not forwarded.
#[derive(Debug)]
enum Refusal {
    Denied(Denied),
    NotFound(String),
    BadRequest(String),
    /// A body past the bound (its key) given.
    TooLarge(&'static str, String),
    /// A body that stopped coming for docker.idle_timeout.
    Stalled(String),
    Engine(String),
    /// Regobox is stopping: nothing more is made or started.
    Stopping,
}

impl Refusal {
    fn status(&self) -> StatusCode {
        match self {
            Refusal::Denied(_) => StatusCode::FORBIDDEN,
            Refusal::NotFound(_) => StatusCode::NOT_FOUND,
            Refusal::BadRequest(_) => StatusCode::BAD_REQUEST,
            Refusal::TooLarge(..) => StatusCode::PAYLOAD_TOO_LARGE,
            Refusal::Stalled(_) => StatusCode::REQUEST_TIMEOUT,
            Refusal::Engine(_) => StatusCode::BAD_GATEWAY,
            Refusal::Stopping => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    fn rule(&self) -> &str {
        match self {
            Refusal::Denied(d) => &d.rule,
            Refusal::NotFound(_) => "ownership",
            Refusal::BadRequest(_) => "request",
            Refusal::TooLarge(key, _) => key,
            Refusal::Stalled(_) => "docker.idle_timeout",
            Refusal::Engine(_) => "engine",
            Refusal::Stopping => "stopping",
        }
    }

    fn message(&self) -> &str {
        match self {
            Refusal::Denied(d) => &d.message,
            Refusal::NotFound(m)
            | Refusal::BadRequest(m)
            | Refusal::TooLarge(_, m)
            | Refusal::Stalled(m)
            | Refusal::Engine(m) => m,
            Refusal::Stopping => "regobox is stopping: try again once it is back",
        }
    }
}

impl From<Undecodable> for Refusal {
    fn from(u: Undecodable) -> Self {
        Refusal::Denied(Denied::new(
            u.field,
            format!("refused by regobox's Docker policy: {}", u.message),
        ))
    }
}

impl From<Denied> for Refusal {
    fn from(d: Denied) -> Self {
        Refusal::Denied(d)
    }
}

/// Ids of engine objects regobox made for the application, kept in a file of the volume's
/// `secrets/` (a JSON list): what a label cannot say. An image pulled or imported carries no
/// label of regobox's; and a label is inherited: every container made from an image, and
/// every image built on one or committed from such a container, carries the image's labels, so
/// a container the host's administrator made from one of the application's images was the
/// application's to inspect, start, copy into and remove (and regobox's own to stop and remove
/// at a start: an attacker's, twenty-third session), and so was an image it built on one. Ids
/// are never reused by the engine for containers (random), and an image's id is its content.
pub struct Recorded {
    path: PathBuf,
    /// What is recorded, for messages ("images", "containers").
    what: &'static str,
    ids: Mutex<BTreeSet<String>>,
    /// The last ids forgotten (see [`Recorded::forget`]), this process's, oldest first.
    forgotten: Mutex<std::collections::VecDeque<String>>,
}

/// How many forgotten ids a record keeps in memory: the engine replays at most its last 1 000
/// events (`docker events --since`).
const FORGOTTEN: usize = 4096;

impl Recorded {
    /// The record at `path`; an empty one if there is none yet (see [`Recorded::is_new`]).
    pub fn load(path: PathBuf, what: &'static str) -> anyhow::Result<Recorded> {
        let ids = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                anyhow::anyhow!(
                    "{} is not a JSON list of {what} ids ({e}); move it away to start afresh",
                    path.display()
                )
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeSet::new(),
            Err(e) => return Err(anyhow::anyhow!("reading {}: {e}", path.display())),
        };
        Ok(Recorded {
            path,
            what,
            ids: Mutex::new(ids),
            forgotten: Default::default(),
        })
    }

    /// Whether the record has never been written (a fresh volume, or one a version of regobox
    /// before this record ran on).
    pub fn is_new(&self) -> bool {
        !self.path.exists()
    }

    pub fn contains(&self, id: &str) -> bool {
        self.ids.lock().map(|s| s.contains(id)).unwrap_or(false)
    }

    /// `id` is gone from the engine: out of the record, kept in memory for a while so that the
    /// engine's past events of it (`docker events --since`) are still the application's.
    pub fn forget(&self, id: &str) {
        if !self.contains(id) {
            return;
        }
        // Kept before it leaves the record: a reader between the two saw neither (an
        // attacker's, twenty-third session: the events stream dropped some of the application's
        // own `destroy` events).
        if let Ok(mut f) = self.forgotten.lock() {
            if f.len() == FORGOTTEN {
                f.pop_front();
            }
            f.push_back(id.to_string());
        }
        self.update(|s| s.remove(id));
    }

    /// What is recorded now.
    fn snapshot(&self) -> BTreeSet<String> {
        self.ids.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Whether a recorded id begins with `prefix` (an engine's message names ids by 12
    /// characters).
    fn has_prefix(&self, prefix: &str) -> bool {
        self.ids
            .lock()
            .is_ok_and(|s| s.iter().any(|id| id.starts_with(prefix)))
    }

    /// Recorded now, or forgotten lately by this process.
    fn contains_or_forgot(&self, id: &str) -> bool {
        self.contains(id)
            || self
                .forgotten
                .lock()
                .is_ok_and(|f| f.iter().any(|x| x == id))
    }

    /// Change the record with `f`, and write it if `f` says it changed.
    pub fn update(&self, f: impl FnOnce(&mut BTreeSet<String>) -> bool) {
        let Ok(mut ids) = self.ids.lock() else { return };
        if !f(&mut ids) {
            return;
        }
        // Whole or not at all, and on the disk before the client hears of what it records: a
        // record lost or cut short would leave the application's jobs unowned.
        let tmp = self.path.with_extension("json.tmp");
        let text = serde_json::to_vec_pretty(&*ids).unwrap_or_default();
        let written = (|| {
            let mut file = std::fs::File::create(&tmp)?;
            std::io::Write::write_all(&mut file, &text)?;
            file.sync_all()?;
            std::fs::rename(&tmp, &self.path)?;
            match self.path.parent() {
                Some(dir) => crate::volumes::sync_dir(dir),
                None => Ok(()),
            }
        })();
        if let Err(e) = written {
            tracing::warn!(path = %self.path.display(), error = %e, "cannot record the application's {}", self.what);
        }
    }

    /// Only the ids `present` says are there are kept (those found gone at a start).
    pub fn keep_only(&self, present: impl Fn(&str) -> bool) {
        self.update(|s| {
            let before = s.len();
            s.retain(|id| present(id));
            s.len() != before
        });
    }
}

/// Everything a request needs.
pub struct Proxy {
    pub connector: Connector,
    pub docker: bollard::Docker,
    pub instance: String,
    pub policy: CreatePolicy,
    /// The images built, pulled or imported through this socket (see [`Recorded`]).
    pub images: Arc<Recorded>,
    /// The tags the socket made, each as `<tag> <image id>` (see [`owned_tag`]): a tag the host
    /// puts on one of the instance's images is the host's.
    pub tags: Arc<Recorded>,
    /// The containers created through this socket (see [`Recorded`]).
    pub containers: Arc<Recorded>,
    /// The creates and starts forwarded to the engine, until answered (and a create recorded):
    /// a stop waits for them, and refuses more once `stopping`.
    pub creates: tokio_util::task::TaskTracker,
    pub stopping: CancellationToken,
    pub audit: Option<SharedLogFile>,
    pub max_body: usize,
    /// Largest build context, spooled to an unnamed file in `spool_dir` before it is forwarded.
    pub max_build_context: u64,
    pub spool_dir: PathBuf,
    /// A turn to spool a body (`docker.max_spooled` at once), held until the body is forwarded.
    pub spools: Arc<tokio::sync::Semaphore>,
    pub max_connections: usize,
    pub idle_timeout: Duration,
    /// Where [`binds::Freeze`] records what it changed, and the lock that lets one request at a
    /// time make the engine mount binds.
    pub freeze_journal: PathBuf,
    pub freezing: tokio::sync::Mutex<()>,
    /// Held (read) by each build until its output ends, taken (write) by an image remove: the
    /// names a build's Dockerfile reads, judged the instance's before the build, stay so while
    /// the engine reads them again. (An attacker's, twelfth session: its own tag named like
    /// another image's id prefix, removed mid-build, made `FROM` that other image; a tag naming
    /// a registry, removed, made the engine pull from it.)
    pub builds: Arc<tokio::sync::RwLock<()>>,
    /// The pulls and imports forwarded and not recorded yet (see [`Making`]): an event of an
    /// image not recorded waits for them (an import's event comes before its end is read).
    pub making: Arc<std::sync::atomic::AtomicUsize>,
    /// The ids of the networks seen to be the instance's (labelled) by this process: a network's
    /// last event (`destroy`) comes when it can be inspected no more.
    pub networks: Mutex<std::collections::HashSet<String>>,
    /// `docker.limits.networks` (0: no ceiling).
    pub max_networks: usize,
    /// Held by a network create from its count of the instance's networks to its check that
    /// the name is the new network's alone.
    pub network_creates: tokio::sync::Mutex<()>,
}

/// The actions of a job's events passed on: what the socket's calls and a job's own life make
/// (`health_status: healthy` is read by its first word).
const CONTAINER_EVENTS: &[&str] = &[
    "create",
    "start",
    "restart",
    "stop",
    "kill",
    "die",
    "oom",
    "pause",
    "unpause",
    "destroy",
    "attach",
    "detach",
    "resize",
    "top",
    "archive-path",
    "extract-to-dir",
    "health_status",
];

/// A pull or import in progress, from its forwarding until the image it made is recorded.
pub struct Making(Arc<std::sync::atomic::AtomicUsize>);

impl Making {
    fn new(count: &Arc<std::sync::atomic::AtomicUsize>) -> Self {
        count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Making(count.clone())
    }
}

impl Drop for Making {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// How long after the instance's network create another create of its name may still end (see
/// `Endpoint::NetworkCreate`).
const NAME_SETTLES: Duration = Duration::from_secs(1);

/// Serve `listener` until `shutdown` (open streams, such as a followed log, go on until the
/// process ends). At most `docker.max_connections` connections at once, hijacked ones (attach)
/// included: at the cap nothing more is accepted, and the application's connects wait in the
/// socket's backlog, which holds none of regobox's descriptors. A connection with no request in
/// progress is closed after `docker.idle_timeout` (hyper's header read timeout: it runs from
/// the end of one exchange until the next request's head is whole).
pub async fn serve(listener: UnixListener, proxy: Arc<Proxy>, shutdown: CancellationToken) {
    let connections = Arc::new(tokio::sync::Semaphore::new(proxy.max_connections));
    // The requests being handled (see below).
    let handlers = Arc::new(tokio::sync::Semaphore::new(proxy.max_connections));
    let mut warned: Option<Instant> = None;
    loop {
        let permit = match connections.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                if warned.is_none_or(|t| t.elapsed() >= Duration::from_secs(60)) {
                    tracing::warn!(
                        max = proxy.max_connections,
                        "the application holds docker.max_connections connections to the Docker socket: new ones wait until one closes"
                    );
                    warned = Some(Instant::now());
                }
                tokio::select! {
                    p = connections.clone().acquire_owned() => match p {
                        Ok(p) => p,
                        Err(_) => return,
                    },
                    _ = shutdown.cancelled() => return,
                }
            }
        };
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "Docker proxy: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => return,
        };
        let proxy = proxy.clone();
        let idle = proxy.idle_timeout;
        let stopping = shutdown.clone();
        let handlers = handlers.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                // Each request to its end in a task of its own, whatever its client does: the
                // engine goes on with a request whose client has left (a start mounts its
                // binds, a network is made), so what the handler holds until the engine's
                // answer must be held until then. Run inside the connection, a client that
                // closed its socket 5 ms after a start dropped the handler, and with it the
                // freeze of the bind sources while the engine mounted them: a link swapped in
                // was mounted (a host path in the job, read-write if asked), and a network's
                // ceiling, its name's check and the audit line went the same way (an
                // attacker's, thirty-third session).
                // A handler whose client left holds one of `docker.max_connections` turns until
                // it ends, as its connection did: leaving does not free a place for more. What
                // only the client wants (a build's context rendered before anything reaches the
                // engine) is told that it left (see [`ClientGone`]).
                let (proxy, handlers) = (proxy.clone(), handlers.clone());
                let gone = CancellationToken::new();
                let mut req = req;
                req.extensions_mut().insert(ClientGone(gone.clone()));
                async move {
                    let left = gone.drop_guard();
                    let Ok(turn) = handlers.acquire_owned().await else {
                        return Ok(json_response(
                            StatusCode::SERVICE_UNAVAILABLE,
                            &json!({ "message": "regobox is stopping: try again once it is back" }),
                        ));
                    };
                    let task = tokio::spawn(async move {
                        let _turn = turn;
                        proxy.handle(req).await
                    });
                    let response = task.await.unwrap_or_else(|e| {
                        tracing::error!(error = %e, "Docker proxy: a request's handler failed");
                        json_response(
                            StatusCode::INTERNAL_SERVER_ERROR,
                            &json!({ "message": "regobox's Docker proxy failed on this request" }),
                        )
                    });
                    left.disarm();
                    Ok::<_, Infallible>(response)
                }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(idle)
                .serve_connection(TokioIo::new(Counted::new(stream, permit, idle)), service)
                .with_upgrades();
            let mut conn = std::pin::pin!(conn);
            // At a stop, a connection takes no more requests (the one in progress ends): a
            // connection opened before it created and started jobs after `docker.stop_jobs`
            // had listed them (an attacker's, twenty-third session).
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = stopping.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
        });
    }
}

/// A connection of the application's, counted against `docker.max_connections` for as long as
/// it is open: through hyper, then, upgraded, through the splice that holds it. A write that
/// waits for `docker.idle_timeout` with nothing taken fails, and the connection with it: a
/// client that asks for a stream and never reads it held the connection, and the engine's
/// stream (a build held at its step's output, a followed log), for as long as it liked (the last
/// note's, twentieth session). "Nothing taken" is the socket's unread bytes ([`crate::outq`])
/// not shrinking: a waiting write is woken only once the client has read most of the socket's
/// buffer, which a slow but steady reader (a log piped to a slow script) may take longer than
/// that to do (a reviewer's, twenty-first session).
struct Counted {
    stream: tokio::net::UnixStream,
    _permit: tokio::sync::OwnedSemaphorePermit,
    within: Duration,
    /// Since the write that waits began to wait, or the client last took some of the socket's
    /// bytes, and how many the socket held then.
    waiting: Option<(Pin<Box<tokio::time::Sleep>>, u64)>,
}

impl Counted {
    fn new(
        stream: tokio::net::UnixStream,
        permit: tokio::sync::OwnedSemaphorePermit,
        within: Duration,
    ) -> Self {
        Counted {
            stream,
            _permit: permit,
            within,
            waiting: None,
        }
    }

    /// `polled`, a write's, or an error once it has waited for `within`.
    fn bounded<T>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<std::io::Result<T>>,
    ) -> Poll<std::io::Result<T>> {
        if polled.is_ready() {
            self.waiting = None;
            return polled;
        }
        let within = self.within;
        let fd = std::os::fd::AsRawFd::as_raw_fd(&self.stream);
        let unread = || crate::outq::queued(fd).unwrap_or(0);
        loop {
            let (sleep, before) = self
                .waiting
                .get_or_insert_with(|| (Box::pin(tokio::time::sleep(within)), unread()));
            if sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            // The client took some: its deadline counts from now.
            let now_unread = unread();
            if now_unread < *before {
                self.waiting = Some((Box::pin(tokio::time::sleep(within)), now_unread));
                continue;
            }
            break;
        }
        tracing::warn!(timeout = ?within, "the application did not read what the Docker socket answered for docker.idle_timeout: connection closed");
        Poll::Ready(Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "the application did not read its answer within docker.idle_timeout",
        )))
    }
}

impl tokio::io::AsyncRead for Counted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Counted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.stream).poll_write(cx, buf);
        self.bounded(cx, polled)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.stream).poll_write_vectored(cx, bufs);
        self.bounded(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// The request a stream's end belongs to, for the audit line of what is refused there (see
/// [`Proxy::tag_at_end`]).
struct Asked {
    path: String,
    endpoint: Endpoint,
    started: Instant,
}

impl Asked {
    /// `req`, for `endpoint`, from now.
    fn now<B>(req: &Request<B>, endpoint: Endpoint) -> Self {
        Asked {
            path: req.uri().path().to_string(),
            endpoint,
            started: Instant::now(),
        }
    }
}

/// What one request did, for the audit line.
struct Done {
    response: Response<Body>,
    object: Option<String>,
}

impl Proxy {
    async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Response<Body> {
        let started = Instant::now();
        // What is left unread of the body when the request is done with is read and dropped
        // (see [`crate::unread`]).
        let drain = Drain {
            limit: self.max_build_context,
            within: self.idle_timeout,
        };
        let (parts, body) = req.into_parts();
        let unasked = crate::unread::waits_to_be_asked(&parts.headers);
        let body = RequestBody::new(body, Some(drain), unasked);
        let req = Request::from_parts(parts, body);
        let method = req.method().clone();
        let path = req.uri().path().to_string();
        let mutating = method != Method::GET && method != Method::HEAD;
        let routed = policy::endpoint(method.as_str(), &path);
        let endpoint = routed.as_ref().ok().map(|(e, _)| *e);
        let result = match routed {
            Ok(_) if self.stopping.is_cancelled() => Err(Refusal::Stopping),
            Ok((ep, captures)) => self.dispatch(ep, captures, req).await,
            Err(d) => Err(Refusal::Denied(d)),
        };
        match result {
            Ok(done) => {
                if mutating {
                    self.audit(
                        &method,
                        &path,
                        endpoint,
                        "allow",
                        None,
                        done.object.as_deref(),
                        done.response.status(),
                        started,
                    );
                }
                done.response
            }
            Err(refusal) => {
                let status = refusal.status();
                // Reading a missing object is ordinary; refusals and mutations are audited.
                if mutating || matches!(refusal, Refusal::Denied(_)) {
                    self.audit(
                        &method,
                        &path,
                        endpoint,
                        "deny",
                        Some(refusal.rule()),
                        None,
                        status,
                        started,
                    );
                }
                json_response(status, &json!({ "message": refusal.message() }))
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn audit(
        &self,
        method: &Method,
        path: &str,
        endpoint: Option<Endpoint>,
        decision: &str,
        rule: Option<&str>,
        object: Option<&str>,
        status: StatusCode,
        started: Instant,
    ) {
        let line = json!({
            "time": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            "method": method.as_str(),
            "path": path,
            "endpoint": endpoint.map(|e| format!("{e:?}")),
            "decision": decision,
            "rule": rule,
            "object": object,
            "status": status.as_u16(),
            "duration_ms": started.elapsed().as_secs_f64() * 1000.0,
        });
        tracing::info!(target: "regobox::docker::audit", method = %method, path, decision, rule, object, status = status.as_u16(), "docker audit");
        if let Some(file) = &self.audit {
            if let Ok(mut f) = file.lock() {
                f.write_line(&line.to_string());
            }
        }
    }

    /// Judge one request and forward regobox's own rendering of it: the path rebuilt from the
    /// route (references resolved to full ids), the query from the parsed parameters, the body
    /// from the typed model.
    async fn dispatch(
        self: &Arc<Self>,
        ep: Endpoint,
        captures: Vec<String>,
        req: Request<RequestBody>,
    ) -> Result<Done, Refusal> {
        let raw_query = req.uri().query().unwrap_or("").to_string();
        // Forwarded at the version the model is of, whatever the client's prefix (none, or the
        // same: policy::endpoint refused the others).
        let version = format!("/v{}", policy::API_VERSION);
        let normalized = policy::normalize(req.uri().path())?;
        let target = |path: &str, q: &Query| {
            let q = q.encode();
            if q.is_empty() {
                format!("{version}{path}")
            } else {
                format!("{version}{path}?{q}")
            }
        };
        let plain = |response| Done {
            response,
            object: None,
        };
        let method = req.method().as_str().to_string();
        match ep {
            Endpoint::Ping | Endpoint::Version => {
                let q = query::parse(&raw_query, &normalized, query::NONE)?;
                let req = retarget(self.no_body(req).await?, &target(&normalized, &q))?;
                Ok(plain(self.forward(req, Payload::Empty, None).await?))
            }
            Endpoint::Info => {
                let q = query::parse(&raw_query, &normalized, query::NONE)?;
                let req = retarget(self.no_body(req).await?, &target(&normalized, &q))?;
                let response = self.forward(req, Payload::Empty, None).await?;
                if response.status() != StatusCode::OK {
                    return Ok(plain(response));
                }
                let (parts, info): (_, Value) =
                    engine_value(response, "engine's information").await?;
                Ok(plain(rebuild(parts, &policy::engine_info(info))))
            }
            Endpoint::Events | Endpoint::ContainerList | Endpoint::NetworkList => {
                let (allowed, filters) = match ep {
                    Endpoint::Events => (query::EVENTS, query::EVENT_FILTERS),
                    Endpoint::ContainerList => (query::CONTAINER_LIST, query::CONTAINER_FILTERS),
                    _ => (query::NETWORK_LIST, query::NETWORK_FILTERS),
                };
                let q = query::parse(&raw_query, &normalized, allowed)?;
                let named: &[(&str, Named)] = match ep {
                    Endpoint::ContainerList => &[
                        ("before", Named::Container),
                        ("since", Named::Container),
                        ("ancestor", Named::Image),
                    ],
                    _ => &[],
                };
                // The engine's label filter would leave out the events that carry no labels
                // (an image's delete, an import, a network's): each event is judged by regobox
                // instead ([`Proxy::own_event`]).
                let labelled = ep != Endpoint::Events;
                let q = self.list_filters(q, filters, named, labelled).await?;
                let req = retarget(self.no_body(req).await?, &target(&normalized, &q))?;
                let response = self.forward(req, Payload::Empty, None).await?;
                if ep == Endpoint::Events && response.status().is_success() {
                    let (mut parts, body) = response.into_parts();
                    parts.headers.remove(CONTENT_LENGTH);
                    let body = self.clone().own_events(body);
                    return Ok(plain(Response::from_parts(parts, body)));
                }
                if ep != Endpoint::ContainerList || !response.status().is_success() {
                    return Ok(plain(response));
                }
                // The label filter leaves in the containers made on the host from the
                // instance's images (a label is inherited): only those the socket created stay.
                let (parts, list): (_, Vec<Value>) =
                    engine_value(response, "container list").await?;
                let mut kept = Vec::with_capacity(list.len());
                for mut c in list {
                    if self
                        .containers
                        .contains(c.get("Id").and_then(Value::as_str).unwrap_or(""))
                    {
                        self.own_networks_of(&mut c).await;
                        kept.push(c);
                    }
                }
                Ok(plain(rebuild(parts, &Value::Array(kept))))
            }
            Endpoint::Build => {
                self.build(req, &raw_query, &target("/build", &Query::default()))
                    .await
            }
            Endpoint::ImageCreate => {
                let asked = Asked::now(&req, ep);
                let q = query::parse(&raw_query, "an image create", query::IMAGE_CREATE)?;
                let (reference, q) = self.check_image_create(q).await?;
                // A pull's credentials in regobox's rendering; an import's tar streams through.
                let auth = registry_auth(req.headers().get(REGISTRY_AUTH))?;
                let failed: Arc<Mutex<Option<Refusal>>> = Arc::default();
                let (mut req, payload) = if q.get("fromSrc") == Some("-") {
                    let within = self.idle_timeout;
                    let paced = |body| Paced::new(body, within, "the image's tar", failed.clone());
                    (req.map(|body| boxed(paced(body))), Payload::Tar(None))
                } else {
                    (self.no_body(req).await?, Payload::Empty)
                };
                if let (Some(auth), Payload::Empty) = (auth, payload) {
                    req.extensions_mut().insert(RenderedAuth(auth));
                }
                // An import is made untagged and tagged by regobox at its end (see
                // [`Proxy::tag_at_end`]); a pull is tagged by the engine.
                let import = matches!(payload, Payload::Tar(_));
                let mut forwarded = q;
                if import {
                    forwarded.remove("repo");
                    forwarded.remove("tag");
                }
                let req = retarget(req, &target("/images/create", &forwarded))?;
                let object = (!reference.is_empty()).then(|| reference.clone());
                // Forwarded, then tagged and recorded, by a task of its own, which the client's
                // leaving does not stop: an import is the engine's once its body is sent, and a
                // pull once asked for, whether or not the client waits for the answer. Cut with
                // the request, an image made meanwhile would be no one's: untagged (an import)
                // or another's to the policy (a pull's tag, unrecorded), invisible to the
                // application or refused to it, never removed (an import whose client left as
                // its body ended: the last note's, twentieth session).
                // The images there before a pull: one the pull finds already there (the same
                // content) is someone else's, whatever names it carries (an attacker's,
                // twenty-fifth session: the host held it by a digest alone, which no tag shows;
                // recorded, the application deleted it).
                let before: Option<std::collections::HashSet<String>> = if import {
                    None
                } else {
                    let list = self.all_images().await.map_err(|e| {
                        Refusal::Engine(format!("listing the images before a pull: {e}"))
                    })?;
                    Some(list.into_iter().map(|i| i.id).collect())
                };
                let proxy = self.clone();
                let making = Making::new(&self.making);
                let task = tokio::spawn(async move {
                    // The body's own failure, if that is what cut the request to the engine.
                    let response = match proxy.forward(req, payload, None).await {
                        Err(Refusal::Engine(e)) => {
                            let why = failed.lock().ok().and_then(|mut f| f.take());
                            return Err(why.unwrap_or(Refusal::Engine(e)));
                        }
                        other => other?,
                    };
                    if !response.status().is_success() {
                        return Ok(response);
                    }
                    // Tag and record the image once the pull or import stream has ended.
                    let recorder = proxy.clone();
                    Ok(response.map(move |body| {
                        OnEnd::new(body, move |tail: &[u8]| {
                            let imported = if import { imported_id(tail) } else { None };
                            let proxy = recorder;
                            Box::pin(async move {
                                let _making = making;
                                let mut said = Vec::new();
                                let name = match imported {
                                    Some(id) => {
                                        if !reference.is_empty() {
                                            said = proxy
                                                .tag_at_end(
                                                    &id,
                                                    std::slice::from_ref(&reference),
                                                    "query.tag",
                                                    false,
                                                    &asked,
                                                )
                                                .await;
                                        }
                                        id
                                    }
                                    None if import || reference.is_empty() => return None,
                                    None => reference.clone(),
                                };
                                proxy.record_image(&name, &reference, before.as_ref()).await;
                                (!said.is_empty()).then(|| Bytes::from(said))
                            }) as Recording
                        })
                        .finishing()
                        .boxed()
                    }))
                });
                let response = task.await.map_err(|e| {
                    Refusal::Engine(format!("an image create's task failed: {e}"))
                })??;
                Ok(Done { response, object })
            }
            Endpoint::ImageList => {
                let mut q = query::parse(&raw_query, "the image list", query::IMAGE_LIST)?;
                // docker-py's (`quiet`), which the engine does not read.
                q.remove("only_ids");
                let named = [("before", Named::Image), ("since", Named::Image)];
                let q = self
                    .list_filters(q, query::IMAGE_FILTERS, &named, false)
                    .await?;
                // With a `reference` filter the engine lists an image for the tags that match,
                // and only those: one listed for a host's tags alone is left out (else a
                // pattern would tell the application the names the host gave its images).
                let by_reference = query::filters(q.get("filters"), query::IMAGE_FILTERS)?
                    .contains_key("reference");
                let req = retarget(self.no_body(req).await?, &target("/images/json", &q))?;
                let response = self.forward(req, Payload::Empty, None).await?;
                if !response.status().is_success() {
                    return Ok(plain(response));
                }
                let kept = only(response, "image list", |mut img| {
                    let id = img.get("Id").and_then(Value::as_str).unwrap_or("");
                    if !self.images.contains(id) {
                        return None;
                    }
                    let tagged = self.own_repo_tags(&mut img, &["<none>:<none>"]);
                    (tagged || !by_reference).then_some(img)
                })
                .await?;
                Ok(plain(kept))
            }
            Endpoint::ImageInspect => {
                let name = &captures[0];
                let q = query::parse(&raw_query, "an image inspect", query::NONE)?;
                let id = self.owned_image(name).await?;
                let req = retarget(
                    self.no_body(req).await?,
                    &target(&format!("/images/{id}/json"), &q),
                )?;
                let response = self.forward(req, Payload::Empty, None).await?;
                if !response.status().is_success() {
                    return Ok(Done {
                        response,
                        object: Some(name.clone()),
                    });
                }
                let (parts, mut img): (_, Value) = engine_value(response, "image inspect").await?;
                let _ = self.own_repo_tags(&mut img, &[]);
                Ok(Done {
                    response: rebuild(parts, &img),
                    object: Some(name.clone()),
                })
            }
            Endpoint::ImageRemove => {
                let name = &captures[0];
                let q = query::parse(&raw_query, "an image remove", query::IMAGE_REMOVE)?;
                // Read before the lock: a client trickling a body holds no build back.
                let req = self.no_body(req).await?;
                // After the builds in progress: no name one reads changes under it.
                let _no_build = self.builds.write().await;
                let img = self.owned_image_inspect(name).await?;
                let id = img.id.clone().unwrap_or_default();
                // By the tag asked for, written in full (a forced remove by id would drop every
                // tag of the image); else by the full id judged. Never by a name the engine could
                // read as something else once the tag is gone (an attacker's, twelfth session:
                // a tag `816ac826f8e2:latest` of its own, removed, then `816ac826f8e2` asked for
                // by an id prefix another image's).
                let tags = img.repo_tags.as_deref().unwrap_or_default();
                let by_tag = removal_target(name, tags);
                // A tag the host put on the image is the host's: not removed by its name (found
                // by it, the image is missing: [`Proxy::owned_image_inspect`]), nor with the
                // image by its id.
                if by_tag.is_none()
                    && tags
                        .iter()
                        .any(|t| t != "<none>:<none>" && !self.tags.contains(&owned_tag(t, &id)))
                {
                    return Err(Denied::new(
                        "image.tags",
                        format!("refused by regobox's Docker policy: the image {name} also has a tag this instance did not make: remove it by its own tags"),
                    )
                    .into());
                }
                drop(req);
                // By the tag asked for, or, asked by the id, by each of the image's tags (all
                // the instance's), one at a time: a forced remove by id drops every tag the
                // image has when the engine removes it, a host's tag put on it since it was
                // judged included (the next attacker's, twenty-fourth session; by its tags, the
                // last one removed leaves the image to the host's). An image without a tag goes
                // by its id.
                let targets: Vec<(String, Option<String>)> = match &by_tag {
                    Some(full) => vec![(full.clone(), Some(name.clone()))],
                    None => {
                        let named: Vec<(String, Option<String>)> = tags
                            .iter()
                            .filter(|t| *t != "<none>:<none>")
                            .filter_map(|t| removal_target(t, tags).map(|f| (f, Some(t.clone()))))
                            .collect();
                        if named.len() > 1 && !q.flag("force") {
                            // The engine's answer to a remove by id of an image of several tags.
                            let short = id.trim_start_matches("sha256:").get(..12).unwrap_or("");
                            return Ok(Done {
                                response: json_response(
                                    StatusCode::CONFLICT,
                                    &json!({"message": format!("conflict: unable to delete {short} (must be forced) - image is referenced in multiple repositories")}),
                                ),
                                object: Some(name.clone()),
                            });
                        }
                        if named.is_empty() {
                            vec![(id.clone(), None)]
                        } else {
                            named
                        }
                    }
                };
                let mut said = Vec::new();
                let repositories = self.own_repositories(&id);
                let remove = |by: &str, q: &Query| {
                    Request::builder()
                        .method(Method::DELETE)
                        .uri(target(&format!("/images/{by}"), q))
                        .body(boxed(http_body_util::Empty::new()))
                        .map_err(|e| Refusal::Engine(format!("building an image remove: {e}")))
                };
                // Unforced first: a forced remove ignores the image's other tags once it has
                // begun, a host's made meanwhile included; the engine's conflict (a stopped job
                // of the image's) is what the client's force is for.
                let mut unforced = q.clone();
                unforced.remove("force");
                for (by, tag) in targets {
                    let mut response = self
                        .forward(remove(&by, &unforced)?, Payload::Empty, None)
                        .await?;
                    if response.status() == StatusCode::CONFLICT && q.flag("force") {
                        // Not from under a container the host made from it (an attacker's,
                        // twenty-fifth session: the host's container lost its image).
                        if self.used_by_others("ancestor", &id).await? {
                            let short = id.trim_start_matches("sha256:").get(..12).unwrap_or("");
                            return Ok(Done {
                                response: json_response(
                                    StatusCode::CONFLICT,
                                    &json!({"message": format!("conflict: unable to delete {short} (cannot be forced) - image is being used by a container this instance did not make")}),
                                ),
                                object: Some(name.clone()),
                            });
                        }
                        response = self.forward(remove(&by, &q)?, Payload::Empty, None).await?;
                    }
                    if !response.status().is_success() {
                        return Ok(Done {
                            response: self.others_unnamed(response, &id).await?,
                            object: Some(name.clone()),
                        });
                    }
                    if let Some(tag) = tag {
                        let owned = owned_tag(&tag, &id);
                        self.tags.update(|s| s.remove(&owned));
                    }
                    let bytes = response
                        .into_body()
                        .collect()
                        .await
                        .map_err(|e| Refusal::Engine(format!("reading an image remove: {e}")))?
                        .to_bytes();
                    // What the engine untagged names the image's references, the host's too
                    // (a digest of its repository): only the instance's are said.
                    if let Ok(Value::Array(items)) = serde_json::from_slice(&bytes) {
                        said.extend(items.into_iter().filter(|item| {
                            item.get("Untagged")
                                .and_then(Value::as_str)
                                .is_none_or(|r| repositories.contains(&repository(r)))
                        }));
                    }
                }
                let gone = matches!(
                    self.docker.inspect_image(&id).await,
                    Err(bollard::errors::Error::DockerResponseServerError {
                        status_code: 404,
                        ..
                    })
                );
                if gone {
                    self.images.update(|s| s.remove(&id));
                }
                Ok(Done {
                    response: json_response(StatusCode::OK, &Value::Array(said)),
                    object: Some(name.clone()),
                })
            }
            Endpoint::Invisible => Err(Refusal::NotFound(format!(
                "No such object: {}",
                captures[0]
            ))),
            Endpoint::NoSuchContainer => Err(Refusal::NotFound(format!(
                "No such container: {}",
                captures[0]
            ))),
            Endpoint::NoSuchNetwork => Err(Refusal::NotFound(format!(
                "network {} not found",
                captures[0]
            ))),
            Endpoint::ContainerCreate => {
                let q = query::parse(&raw_query, "a container create", query::CONTAINER_CREATE)?;
                let name = q.get("name").unwrap_or("").to_string();
                if !name.is_empty() && !policy::valid_new_name(&name) {
                    return Err(Denied::new(
                        "query.name",
                        format!("refused by regobox's Docker policy: {name:?} is not a container name (letters, digits, _ . -; not one that looks like an id)"),
                    )
                    .into());
                }
                let (parts, body) = req.into_parts();
                let bytes = self.read_body(body, "container create").await?;
                let model: ContainerCreate = model::decode(&bytes, "container create")?;
                let plan = container::check_create(&model, &self.policy)?;
                // Checked (and missing components made) now, under the lock every freeze takes;
                // frozen again at each start.
                {
                    let _lock = self.freezing.lock().await;
                    drop(Freeze::new(
                        &plan.bind_sources,
                        &self.policy.bind_roots,
                        &self.freeze_journal,
                    )?);
                }
                let requested_image = plan.image.clone();
                let image = self.owned_image_inspect(&plan.image).await?;
                let image_id = image.id.clone().unwrap_or_default();
                // The image's VOLUMEs would be anonymous volumes outside the allowed roots.
                let volumes = image.config.as_ref().and_then(|c| c.volumes.as_ref());
                if let Some(volume) = plan.uncovered(volumes.into_iter().flat_map(|v| v.keys())) {
                    return Err(Denied::new(
                        "Image",
                        format!("refused by regobox's Docker policy: the image {requested_image} declares VOLUME {volume}, which would be an anonymous volume: bind a directory under the allowed roots, or a tmpfs, there"),
                    )
                    .into());
                }
                // The health check the engine runs is the image's where the body leaves a part
                // out (an attacker's, twelfth session: `HEALTHCHECK --interval=1ms` imported or
                // built, then a create that gave none): judged as merged.
                let theirs = image.config.as_ref().and_then(|c| c.healthcheck.as_ref());
                container::check_merged_healthcheck(
                    plan.body.healthcheck.as_ref(),
                    theirs.and_then(|h| h.test.as_deref()),
                    theirs.and_then(|h| h.interval),
                )
                .map_err(|d| {
                    Denied::new(
                        &d.rule,
                        format!(
                            "{} (the image {requested_image}'s health check, merged)",
                            d.message
                        ),
                    )
                })?;
                let mut networks = BTreeMap::new();
                for network in &plan.networks {
                    // A 404 here would make the docker CLI try to pull the image: refuse instead.
                    match self.owned_network(network).await {
                        Ok(id) => {
                            networks.insert(network.clone(), id);
                        }
                        Err(Refusal::NotFound(_)) => {
                            return Err(Denied::new(
                                "HostConfig.NetworkMode",
                                format!("refused by regobox's Docker policy: HostConfig.NetworkMode network {network:?} is not one of this instance's networks"),
                            )
                            .into());
                        }
                        Err(other) => return Err(other),
                    }
                }
                let body = plan.resolved(&image_id, &networks);
                let request = with_json(parts, &body, &target("/containers/create", &q))?;
                // Forwarded, read and recorded by a task of its own, which the client's leaving
                // does not stop: cut with the request, a container the engine made meanwhile
                // would be no one's (labelled, unrecorded), never collected.
                let proxy = self.clone();
                let created = self.creates.spawn(async move {
                    // Tracked first, judged then: a stop that began is seen (see `Bridge::stop`).
                    if proxy.stopping.is_cancelled() {
                        return Err(Refusal::Stopping);
                    }
                    let response = proxy.forward(request, Payload::Json, None).await?;
                    let (parts, body) = response.into_parts();
                    let bytes = body
                        .collect()
                        .await
                        .map_err(|e| Refusal::Engine(format!("reading the create response: {e}")))?
                        .to_bytes();
                    if parts.status == StatusCode::CREATED {
                        let id = serde_json::from_slice::<Value>(&bytes)
                            .ok()
                            .and_then(|v| v.get("Id").and_then(Value::as_str).map(str::to_string));
                        // Before the client hears of it: the container is the instance's
                        // because the socket created it, not for its label (see [`Recorded`]).
                        if let Some(id) = id.filter(|id| id.len() == 64) {
                            proxy.containers.update(|s| s.insert(id));
                        }
                    }
                    Ok::<_, Refusal>((parts, bytes))
                });
                let (parts, bytes) = created.await.map_err(|e| {
                    Refusal::Engine(format!("a container create's task failed: {e}"))
                })??;
                let status = parts.status;
                // The engine's words may name objects that are not this instance's (a taken
                // name's container): regobox says what went wrong in its own.
                let response = match status.as_u16() {
                    404 => json_response(
                        status,
                        &json!({"message": format!("No such image: {requested_image}")}),
                    ),
                    409 => json_response(
                        status,
                        &json!({"message": format!("Conflict. The container name \"/{name}\" is already in use by a container that is not this instance's or is being removed: choose another name")}),
                    ),
                    _ => Response::from_parts(parts, boxed(Full::new(bytes.clone()))),
                };
                let id = serde_json::from_slice::<Value>(&bytes)
                    .ok()
                    .and_then(|v| v.get("Id").and_then(Value::as_str).map(str::to_string));
                Ok(Done {
                    response,
                    object: id.or(Some(requested_image)),
                })
            }
            Endpoint::ContainerOp => {
                let reference = &captures[0];
                let op = operation(&normalized, "/containers/");
                let mut req = req;
                let upgrade = req
                    .headers()
                    .contains_key(UPGRADE)
                    .then(|| hyper::upgrade::on(&mut req));
                // The body is read whole before anything is judged, and so before the lock that
                // holds bind paths still is taken: a client trickling its body holds its own
                // connection, never the lock every start and copy waits for. Only a copy into
                // the container has one (a tar, spooled up to docker.max_build_context); below
                // API 1.24 a start's body would replace the container's HostConfig, for one.
                let (req, payload) = if method == "PUT" {
                    let (parts, body) = req.into_parts();
                    let (spool, turn) = self.spool(body, "the archive").await?;
                    let (body, len) = spooled_body(spool, turn, "the archive").await?;
                    (Request::from_parts(parts, body), Payload::Tar(Some(len)))
                } else {
                    (self.no_body(req).await?, Payload::Empty)
                };
                let judged = async {
                    let q = query::parse(
                        &raw_query,
                        &format!(
                            "{method} /containers/{{id}}/{}",
                            op.as_deref().unwrap_or("")
                        ),
                        query::container_op(&method, op.as_deref()),
                    )?;
                    query::check_container_op(&q)?;
                    let (id, inspected) = self.owned_container(reference).await?;
                    // A restart is forwarded as a stop, then a start: the stop waits up to the
                    // client's `t` for the job to end, and nothing that every start and create
                    // waits for is held meanwhile (the engine's restart mounts the binds after
                    // that wait, with their paths held still the whole time).
                    let (q, op) = if op.as_deref() == Some("restart") {
                        let stop = Request::builder()
                            .method(Method::POST)
                            .uri(target(&format!("/containers/{id}/stop"), &q))
                            .body(boxed(http_body_util::Empty::new()))
                            .map_err(|e| Refusal::Engine(format!("building a stop: {e}")))?;
                        let stopped = self.forward(stop, Payload::Empty, None).await?;
                        // 304: it was not running.
                        if !(stopped.status().is_success()
                            || stopped.status() == StatusCode::NOT_MODIFIED)
                        {
                            return Ok(Err(stopped));
                        }
                        (Query::default(), Some("start".to_string()))
                    } else {
                        (q, op.clone())
                    };
                    // The engine mounts the binds on these: hold their paths still until it
                    // answers.
                    let mounts = matches!(op.as_deref(), Some("start") | Some("archive"));
                    let frozen = if mounts {
                        Some(self.freeze_binds(&id, &inspected).await?)
                    } else {
                        None
                    };
                    if op.as_deref() == Some("archive") {
                        // Judged with the turn held: no start of this job can come between.
                        self.copy_allowed(&id).await?;
                    }
                    Ok::<_, Refusal>(Ok((q, op, id, frozen)))
                }
                .await;
                // (Err: the engine's answer to the stop of a restart, which ends it.)
                let (q, op, id, _frozen) = match judged? {
                    Ok(j) => j,
                    Err(response) => {
                        return Ok(Done {
                            response,
                            object: None,
                        });
                    }
                };
                let path = match &op {
                    Some(op) => format!("/containers/{id}/{op}"),
                    None => format!("/containers/{id}"),
                };
                let req = retarget(req, &target(&path, &q))?;
                let response = if matches!(op.as_deref(), Some("start") | Some("unpause")) {
                    // A job started is one `docker.stop_jobs` must see: tracked as a create is.
                    let proxy = self.clone();
                    self.creates
                        .track_future(async move {
                            if proxy.stopping.is_cancelled() {
                                return Err(Refusal::Stopping);
                            }
                            proxy.forward(req, payload, upgrade).await
                        })
                        .await?
                } else {
                    self.forward(req, payload, upgrade).await?
                };
                if method == "DELETE" && op.is_none() && response.status().is_success() {
                    self.containers.forget(&id);
                }
                if method == "GET"
                    && op.as_deref() == Some("json")
                    && response.status().is_success()
                {
                    let (parts, mut c): (_, Value) =
                        engine_value(response, "container inspect").await?;
                    self.own_networks_of(&mut c).await;
                    return Ok(Done {
                        response: rebuild(parts, &c),
                        object: Some(id),
                    });
                }
                Ok(Done {
                    response,
                    object: Some(id),
                })
            }
            Endpoint::NetworkCreate => {
                let q = query::parse(&raw_query, "a network create", query::NONE)?;
                let (parts, body) = req.into_parts();
                let bytes = self.read_body(body, "network create").await?;
                let model: NetworkCreate = model::decode(&bytes, "network create")?;
                let checked = network::check_network_create(&model, &self.instance)?;
                let name = checked.name.clone().unwrap_or_default();
                // One create at a time: the engine's own check that a name is free
                // (`CheckDuplicate`) is a lookup and then a create, with nothing between, so
                // creates sent together all passed it (an attacker's, thirty-third session).
                let _one = self.network_creates.lock().await;
                let own = self.networks_named(None).await?;
                if self.max_networks > 0 && own.len() >= self.max_networks {
                    return Err(Denied::new(
                        "docker.limits.networks",
                        format!(
                            "refused by regobox's Docker policy: this instance has {} networks, the ceiling docker.limits.networks (each takes a subnet from the engine's address pools, shared with the host)",
                            own.len()
                        ),
                    )
                    .into());
                }
                let response = self
                    .forward(
                        with_json(parts, &checked, &target("/networks/create", &q))?,
                        Payload::Json,
                        None,
                    )
                    .await?;
                if response.status() != StatusCode::CREATED {
                    return Ok(Done {
                        response,
                        object: checked.name,
                    });
                }
                let (parts, created): (_, Value) = engine_value(response, "network create").await?;
                let Some(id) = created["Id"].as_str().filter(|id| !id.is_empty()) else {
                    return Err(Refusal::Engine(format!(
                        "the engine gave the network {name} it made no id"
                    )));
                };
                let id = id.to_string();
                // The host's create of the same name, at the same time, passed the engine's
                // check too: both networks are made, and each name ambiguous to the engine.
                // The application's gives way (the host's is the host's to keep). The engine
                // lists a network once its create has ended, and a create that looked the name
                // up during the instance's (about 60 ms: the window is the application's to
                // choose) ends after it: looked for at once, and again a second later.
                let mut others = Vec::new();
                for wait in [Duration::ZERO, NAME_SETTLES] {
                    tokio::time::sleep(wait).await;
                    others = self
                        .networks_named(Some(&name))
                        .await?
                        .into_iter()
                        .filter(|other| *other != id)
                        .collect();
                    if !others.is_empty() {
                        break;
                    }
                }
                if !others.is_empty() {
                    if let Err(e) = self.docker.remove_network(&id).await {
                        tracing::warn!(target: "regobox::docker", network = %id, error = %e, "removing a network created beside another of its name");
                    }
                    return Ok(Done {
                        response: json_response(
                            StatusCode::CONFLICT,
                            &json!({"message": format!("network with name {name} already exists")}),
                        ),
                        object: checked.name,
                    });
                }
                if let Ok(mut seen) = self.networks.lock() {
                    seen.insert(id);
                }
                Ok(Done {
                    response: rebuild(parts, &created),
                    object: checked.name,
                })
            }
            Endpoint::NetworkOp => {
                let reference = &captures[0];
                let id = self.owned_network(reference).await?;
                let op = operation(&normalized, "/networks/");
                let allowed: &[(&str, query::Kind)] = match (method.as_str(), op.as_deref()) {
                    ("GET", None) => {
                        &[("verbose", query::Kind::Bool), ("scope", query::Kind::Text)]
                    }
                    _ => query::NONE,
                };
                let q = query::parse(&raw_query, "a network operation", allowed)?;
                let path = match &op {
                    Some(op) => format!("/networks/{id}/{op}"),
                    None => format!("/networks/{id}"),
                };
                let request = match op.as_deref() {
                    Some("connect") => {
                        let (parts, body) = req.into_parts();
                        let bytes = self.read_body(body, "network connect").await?;
                        let m: NetworkConnect = model::decode(&bytes, "network connect")?;
                        let (container, _) = self
                            .owned_container(m.container.as_deref().unwrap_or(""))
                            .await?;
                        let body = NetworkConnect {
                            container: Some(container),
                            endpoint_config: m
                                .endpoint_config
                                .as_ref()
                                .map(container::check_endpoint_config)
                                .transpose()?,
                        };
                        with_json(parts, &body, &target(&path, &q))?
                    }
                    Some("disconnect") => {
                        let (parts, body) = req.into_parts();
                        let bytes = self.read_body(body, "network disconnect").await?;
                        let m: NetworkDisconnect = model::decode(&bytes, "network disconnect")?;
                        let (container, _) = self
                            .owned_container(m.container.as_deref().unwrap_or(""))
                            .await?;
                        let body = NetworkDisconnect {
                            container: Some(container),
                            force: m.force,
                        };
                        with_json(parts, &body, &target(&path, &q))?
                    }
                    _ => {
                        let req = self.no_body(req).await?;
                        // Not from under a container the host connected to it: stopped, it
                        // would not start again (the engine refuses only for running ones).
                        if method == "DELETE" && self.network_used_by_others(&id).await? {
                            return Ok(Done {
                                response: json_response(
                                    StatusCode::FORBIDDEN,
                                    &json!({"message": format!("error while removing network: network {reference} has a container this instance did not make connected to it")}),
                                ),
                                object: Some(id),
                            });
                        }
                        retarget(req, &target(&path, &q))?
                    }
                };
                let payload = match op.as_deref() {
                    Some("connect") | Some("disconnect") => Payload::Json,
                    _ => Payload::Empty,
                };
                let response = self.forward(request, payload, None).await?;
                if method != "GET" || !response.status().is_success() {
                    return Ok(Done {
                        response,
                        object: Some(id),
                    });
                }
                // An inspection: the containers the host connected to the network are the
                // host's (their ids, names and addresses: an attacker's, twenty-fifth session).
                let (parts, mut network): (_, Value) =
                    engine_value(response, "network inspect").await?;
                if let Some(Value::Object(attached)) = network.get_mut("Containers") {
                    attached.retain(|c, _| self.containers.contains(c));
                }
                Ok(Done {
                    response: rebuild(parts, &network),
                    object: Some(id),
                })
            }
        }
    }

    /// A pull or an import of the body (`fromSrc=-`), judged by [`image::check_image_create`];
    /// neither may move a tag that exists and is not this instance's. Returns the reference made.
    async fn check_image_create(&self, q: Query) -> Result<(String, Query), Refusal> {
        let plan = image::check_image_create(&q, &self.policy.registries)?;
        if !plan.reference.is_empty() {
            self.tag_is_free_or_ours(&plan.reference, "query.tag")
                .await?;
        }
        Ok((plan.reference, q))
    }

    /// A reference the application makes (a pull, an import, a build's tag) may name a new tag
    /// or one of this instance's images, never move another's.
    async fn tag_is_free_or_ours(&self, reference: &str, rule: &str) -> Result<(), Refusal> {
        match self.docker.inspect_image(reference).await {
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) => Ok(()),
            Ok(img) if self.tag_is_ours(reference, &img) => Ok(()),
            Ok(_) => Err(Denied::new(
                rule,
                format!("refused by regobox's Docker policy: the tag {reference:?} exists and is not this instance's: it would be moved"),
            )
            .into()),
            // Not a reference the engine reads (`Regobox:e2e`, a space): the client's error.
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 400,
                message,
            }) => Err(Denied::new(
                rule,
                format!("refused by regobox's Docker policy: {reference:?} is not an image reference: {message}"),
            )
            .into()),
            Err(e) => Err(Refusal::Engine(format!("inspecting image {reference}: {e}"))),
        }
    }

    /// The image `name` a pull or an import made, recorded as the instance's if `reference`
    /// alone names it. An image of the same content may be on the host already under others'
    /// tags (ids are content hashes): recording its id would hand those tags to the
    /// application. (An untagged import: `reference` empty, and the image must have no tag.)
    async fn record_image(
        &self,
        name: &str,
        reference: &str,
        before: Option<&std::collections::HashSet<String>>,
    ) {
        let Ok(img) = self.docker.inspect_image(name).await else {
            return;
        };
        let id = img.id.as_deref().unwrap_or("");
        if before.is_some_and(|b| b.contains(id)) && !self.images.contains(id) {
            tracing::warn!(reference = %reference, image = %id, "a pull found its image already on the host, not the application's: not recorded as the application's");
            return;
        }
        let tags = img.repo_tags.as_deref().unwrap_or_default();
        if !tags.iter().all(|t| image::same_reference(t, reference)) {
            tracing::warn!(reference = %reference, tags = ?tags, "a pulled or imported image is also tagged by others on the host: not recorded as the application's");
            return;
        }
        if let Some(id) = img.id {
            // Only a tag the image has: an import's refused at its end is not made (an
            // attacker's, twenty-fifth session: recorded all the same, it made the host's tag
            // the application's once the host moved it there).
            let digests = img.repo_digests.as_deref().unwrap_or_default();
            let named = tags
                .iter()
                .chain(digests)
                .any(|t| image::same_reference(t, reference));
            if !reference.is_empty() && named {
                self.record_tag(reference, &id);
            }
            self.images.update(|s| s.insert(id));
        }
    }

    /// Tag the image `id` an import or a build made with `references`, at the end of its
    /// stream, each judged again there ([`Proxy::tag_is_free_or_ours`], `rule`). The engine
    /// applies a stream's tags when it ends, after a wait the application controls (an import
    /// trickled piece by piece, a build's long step): a tag another made meanwhile would be
    /// moved (an attacker's finding, nineteenth session: a host's tag made during a trickled
    /// import ended on the application's image). So the engine is asked for no tag, and the
    /// race is back to an instant, as for an image remove. Returns the stream's last lines, in
    /// the engine's form: a tag refused as an error (the docker CLI fails on it), and, for a
    /// build (`say_tagged`), each tag made as the engine says it.
    async fn tag_at_end(
        &self,
        id: &str,
        references: &[String],
        rule: &str,
        say_tagged: bool,
        asked: &Asked,
    ) -> Vec<u8> {
        let mut said = Vec::new();
        for reference in references {
            let (repo, tag) = image::split_tag(reference);
            // Already this image's, and the instance's: nothing to make (and no moment between
            // a check and a tag).
            if let Ok(img) = self.docker.inspect_image(reference).await
                && img.id.as_deref() == Some(id)
                && self.tag_is_ours(reference, &img)
            {
                if say_tagged {
                    said.extend(stream_line(
                        &json!({ "stream": format!("Successfully tagged {reference}\n") }),
                    ));
                }
                continue;
            }
            let tagged = match self.tag_is_free_or_ours(reference, rule).await {
                Err(refusal) => {
                    self.audit_at_end(asked, &refusal, id);
                    Err(refusal.message().to_string())
                }
                Ok(()) => {
                    // Recorded before it is made: a tag made and not recorded would be the
                    // host's to the policy, the application's own tag out of its reach.
                    let owned = owned_tag(reference, id);
                    let moved = self.record_tag(reference, id);
                    let made = self
                        .docker
                        .tag_image(
                            id,
                            Some(bollard::query_parameters::TagImageOptions {
                                repo: Some(repo.to_string()),
                                tag: Some(tag.to_string()),
                            }),
                        )
                        .await
                        .map_err(|e| format!("tagging {reference}: {e}"));
                    if made.is_err() {
                        // Not moved: the tag is where it was, the instance's there still.
                        self.tags.update(|s| {
                            s.remove(&owned);
                            s.extend(moved);
                            true
                        });
                    }
                    made
                }
            };
            match tagged {
                Ok(()) if say_tagged => said.extend(stream_line(
                    &json!({ "stream": format!("Successfully tagged {reference}\n") }),
                )),
                Ok(()) => {}
                Err(message) => {
                    tracing::warn!(reference = %reference, image = %id, error = %message, "a tag was not made at the end of an import or build");
                    said.extend(stream_error(&message));
                }
            }
        }
        said
    }

    /// A refusal at the end of a stream (`asked`'s), about the image `id`: audited like any
    /// other (the request's own line, written when the stream began, said allow).
    fn audit_at_end(&self, asked: &Asked, refusal: &Refusal, id: &str) {
        self.audit(
            &Method::POST,
            &asked.path,
            Some(asked.endpoint),
            "deny",
            Some(refusal.rule()),
            Some(id),
            refusal.status(),
            asked.started,
        );
    }

    /// `POST /build`: the context is spooled to a file (up to `docker.max_build_context`), then
    /// the query judged, the Dockerfile read, the images it starts from and the tags it makes
    /// checked, then the file is forwarded.
    async fn build(
        self: &Arc<Self>,
        req: Request<RequestBody>,
        raw_query: &str,
        path: &str,
    ) -> Result<Done, Refusal> {
        let asked = Asked::now(&req, Endpoint::Build);
        // The context is read whole before anything is judged (the Dockerfile is in it).
        let (parts, body) = req.into_parts();
        let (spool, turn) = self.spool(body, "the build context").await?;
        // Before the Dockerfile's images are judged, until the build's output ends.
        let building = self.builds.clone().read_owned().await;
        let q = query::parse(raw_query, "a build", query::BUILD)?;
        let q = build::check_build_query(q, &self.policy.limits, &self.instance)?;
        for tag in q.all("t") {
            self.tag_is_free_or_ours(tag, "query.t").await?;
        }
        let dockerfile = q.get("dockerfile").unwrap_or("").to_string();
        let dir = self.spool_dir.clone();
        let max = self.max_build_context;
        // The render runs on a blocking thread, which the request's end does not stop: it is
        // told to (a client that goes away leaves no render behind), and it holds the spooling
        // turn until it has ended.
        let cancel = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let _stop = CancelOnDrop(cancel.clone());
        let args = build::build_args(&q);
        let instance = self.instance.clone();
        let render = tokio::task::spawn_blocking(move || {
            render_context(spool, &dockerfile, &dir, max, &cancel, |text| {
                let read = build::read_dockerfile(text, &args, &instance)?;
                Ok((read.rendered, read.images))
            })
            .map(|(c, rendered, bases)| (c, rendered, bases, turn))
        });
        // A client that leaves before the engine is asked anything leaves no render behind.
        let gone = parts.extensions.get::<ClientGone>().cloned();
        let (context, rendered, bases, turn) = tokio::select! {
            r = render => r.map_err(|e| Refusal::Engine(format!("reading the build context: {e}")))??,
            _ = async {
                match &gone {
                    Some(g) => g.0.cancelled().await,
                    None => std::future::pending().await,
                }
            } => return Err(Refusal::BadRequest("the client left before its build context was read".into())),
        };
        for base in bases {
            let img = match self.owned_image_inspect(&base).await {
                Ok(img) => img,
                Err(Refusal::NotFound(_)) => {
                    return Err(Denied::new(
                        "Dockerfile",
                        format!("refused by regobox's Docker policy: the Dockerfile reads the image {base:?}, which is not this instance's (pull it through the socket first)"),
                    )
                    .into());
                }
                Err(other) => return Err(other),
            };
            if img
                .config
                .as_ref()
                .and_then(|c| c.on_build.as_ref())
                .is_some_and(|o| !o.is_empty())
            {
                return Err(Denied::new(
                    "Dockerfile",
                    format!("refused by regobox's Docker policy: the image {base:?} has ONBUILD triggers, which would run in this build unread"),
                )
                .into());
            }
        }
        let (body, len) = spooled_body(context, turn, "the build context").await?;
        let request = Request::from_parts(parts, body);
        // The engine is asked for no tag: regobox makes them at the end (see
        // [`Proxy::tag_at_end`]).
        // Each tag once, however spelt (the engine makes it once; asked for again and again,
        // one tag held the moment between its check and its tag open: an attacker's,
        // twenty-fourth session).
        let mut names = BTreeSet::new();
        let tags: Vec<String> = q
            .all("t")
            .filter(|t| names.insert(image::familiar(t)))
            .map(str::to_string)
            .collect();
        let mut forwarded = q;
        forwarded.remove("t");
        forwarded.set("dockerfile", rendered);
        // Asked of the engine with its steps' output, which says which images it made (see
        // [`BuildOutput`]); a quiet build's client gets what the engine would have written.
        let quiet = forwarded.flag("q");
        forwarded.remove("q");
        // The engine's cache is the instance's own images (see [`Proxy::cache_sources`]).
        if !forwarded.flag("nocache") {
            match self.cache_sources().await? {
                Some(sources) => forwarded.set(
                    "cachefrom",
                    serde_json::to_string(&sources).unwrap_or_default(),
                ),
                None => forwarded.set("nocache", "1".into()),
            }
        }
        let q_path = format!("{path}?{}", forwarded.encode());
        let request = retarget(request, &q_path)?;
        // The engine's clock, to the second, as the images it makes will say (the same kernel's).
        let began = chrono::Utc::now().timestamp();
        let response = self.forward(request, Payload::Tar(Some(len)), None).await?;
        let object = tags.first().cloned();
        if !response.status().is_success() {
            return Ok(Done { response, object });
        }
        let proxy = self.clone();
        let recorder = self.clone();
        let seen: Arc<Mutex<BuildSeen>> = Arc::default();
        let response = response.map(move |body| {
            let output = BuildOutput {
                inner: Some(body),
                line: Vec::new(),
                quiet,
                held: Default::default(),
                held_len: 0,
                seen: seen.clone(),
                recorder: Some((recorder, began)),
            };
            OnEnd::new(boxed(output), move |_tail: &[u8]| {
                let seen = seen.lock().map(|mut s| s.take()).unwrap_or_default();
                Box::pin(async move {
                    // Held until the tags are made.
                    let _building = building;
                    proxy.record_built(&seen, began).await;
                    let Some(id) = seen.built() else {
                        // No image at the end (a failed build): its tags are not made, and the
                        // client is told so (after the engine's own error).
                        return (!tags.is_empty()).then(|| {
                            Bytes::from(stream_error(&format!(
                                "the build made no image: not tagged {}",
                                tags.join(", ")
                            )))
                        });
                    };
                    // The engine's own report; its image is the instance's (recorded) or no
                    // tag is made.
                    let mut said = Vec::new();
                    if !proxy.images.contains(&id) {
                        let refusal = Refusal::NotFound(format!(
                            "the build's image {id} is not this instance's (it is another's on the host, tagged by it): not tagged"
                        ));
                        proxy.audit_at_end(&asked, &refusal, &id);
                        said.extend(stream_error(refusal.message()));
                    } else {
                        // A quiet build's output is its image's id alone (scripts read it).
                        if quiet {
                            said.extend(stream_line(&json!({ "stream": format!("{id}\n") })));
                        }
                        said.extend(
                            proxy
                                .tag_at_end(&id, &tags, "query.t", !quiet, &asked)
                                .await,
                        );
                    }
                    (!said.is_empty()).then(|| Bytes::from(said))
                }) as Recording
            })
            .finishing_within(BUILD_END_GRACE)
            .boxed()
        });
        Ok(Done { response, object })
    }

    /// The images a build's output said it made, recorded as the instance's: each stage's image
    /// (the engine's `aux` lines, which no step's output can forge) if it carries the instance's
    /// label and is recorded already, or has no tag and was made since the build `began` or is
    /// an ancestor of a recorded image (the engine's cache gives back no other: see
    /// [`Proxy::cache_sources`]); and each step's (` ---> <id>`, kept by a build that failed or
    /// whose client left, which its steps' output can write too) if it carries the label and no
    /// tag and was made since the build began. A line a step wrote naming an image made by
    /// someone else meanwhile would need its id, which nothing shows the application.
    async fn record_built(&self, seen: &BuildSeen, began: i64) {
        let all = match self.all_images().await {
            Ok(list) => list,
            Err(e) => {
                tracing::warn!(error = %e, "cannot list the images a build made: not recorded as the application's");
                return;
            }
        };
        let labelled = |i: &bollard::models::ImageSummary| {
            i.labels.get(INSTANCE_LABEL) == Some(&self.instance)
        };
        let untagged =
            |i: &bollard::models::ImageSummary| i.repo_tags.iter().all(|t| t == "<none>:<none>");
        let ancestors = ancestors_of_recorded(&all, &self.images);
        let mut made = Vec::new();
        for id in &seen.stages {
            if let Some(i) = all.iter().find(|i| i.id == *id)
                && labelled(i)
                && (self.images.contains(id)
                    || (untagged(i) && (i.created >= began || ancestors.contains(id.as_str()))))
            {
                made.push(i.id.clone());
            }
        }
        for short in &seen.steps {
            let mut matching = all.iter().filter(|i| {
                i.id.strip_prefix("sha256:")
                    .is_some_and(|h| h.starts_with(short.as_str()))
            });
            if let (Some(i), None) = (matching.next(), matching.next())
                && labelled(i)
                && untagged(i)
                && i.created >= began
                && self.made_by_a_step(&i.id, seen).await
            {
                made.push(i.id.clone());
            }
        }
        self.images.update(|s| {
            let before = s.len();
            s.extend(made);
            s.len() != before
        });
    }

    /// A build stopped before its end (its client left): the engine stops it, but a step whose
    /// command had ended is still committed, after the stream is gone (an attacker's,
    /// twenty-fourth session: a step that wrote 1.5 GB left an image no one owned). The step's
    /// container (` ---> Running in <id>`, the last ones the output named) is waited for until
    /// the engine removes it (at most [`LEFT_BUILD_WAIT`]), then the image the engine committed
    /// from it (its `Container`) is recorded, labelled, untagged and made since the build
    /// `began`. A step can write such a line too: the container must be one the engine made
    /// for a build since then, labelled as the instance's and not created through the socket
    /// (the next attacker's: a line naming the application's own container, and the parent
    /// that container ran, recorded an image the host built on that parent meanwhile).
    async fn record_left_build(&self, seen: &BuildSeen, began: i64) {
        let containers = |all: Vec<bollard::models::ContainerSummary>| -> Vec<String> {
            all.into_iter()
                .filter(|c| {
                    c.labels.as_ref().and_then(|l| l.get(INSTANCE_LABEL)) == Some(&self.instance)
                        && c.created.is_some_and(|t| t >= began)
                })
                .filter_map(|c| c.id)
                .filter(|id| {
                    !self.containers.contains_or_forgot(id)
                        && seen.containers.iter().any(|s| id.starts_with(s.as_str()))
                })
                .collect()
        };
        let list = || async {
            let opts = bollard::query_parameters::ListContainersOptions {
                all: true,
                ..Default::default()
            };
            self.docker
                .list_containers(Some(opts))
                .await
                .map(containers)
        };
        let Ok(steps) = list().await else { return };
        if steps.is_empty() {
            return;
        }
        // A few at once: each asks the engine for its containers every second.
        static WAITING: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(8);
        let Ok(_turn) = WAITING.try_acquire() else {
            tracing::warn!(
                "too many builds left in the middle are waiting for their last step: this one's image, if made, is no one's"
            );
            return;
        };
        let until = Instant::now() + LEFT_BUILD_WAIT;
        loop {
            match list().await {
                Ok(left) if !left.iter().any(|c| steps.contains(c)) => break,
                Ok(_) if Instant::now() < until => tokio::time::sleep(Duration::from_secs(1)).await,
                _ => {
                    tracing::warn!(
                        "a build's step was still being committed when regobox stopped waiting for it: its image, if made, is no one's"
                    );
                    return;
                }
            }
        }
        let Ok(all) = self.all_images().await else {
            return;
        };
        let mut made = Vec::new();
        for i in all.into_iter().filter(|i| {
            i.labels.get(INSTANCE_LABEL) == Some(&self.instance)
                && i.repo_tags.iter().all(|t| t == "<none>:<none>")
                && i.created >= began
                && !self.images.contains(&i.id)
        }) {
            // The container an image was committed from is in the engine's own inspection
            // (API 1.41), not in the client library's model of it.
            let from = self
                .engine_json(&format!("/images/{}/json", i.id))
                .await
                .ok()
                .and_then(|v| {
                    v.get("Container")
                        .and_then(Value::as_str)
                        .map(str::to_string)
                });
            if from.is_some_and(|c| steps.contains(&c)) {
                made.push(i.id);
            }
        }
        self.images.update(|s| {
            let before = s.len();
            s.extend(made);
            s.len() != before
        });
    }

    /// Whether a container the socket did not create is of the image `id` (or of one built on
    /// it: `filter` "ancestor"), or connected to the network `id` ("network").
    async fn used_by_others(&self, filter: &str, id: &str) -> Result<bool, Refusal> {
        let opts = bollard::query_parameters::ListContainersOptions {
            all: true,
            filters: Some(std::collections::HashMap::from([(
                filter.to_string(),
                vec![id.to_string()],
            )])),
            ..Default::default()
        };
        let list =
            self.docker.list_containers(Some(opts)).await.map_err(|e| {
                Refusal::Engine(format!("listing the containers ({filter} {id}): {e}"))
            })?;
        Ok(list
            .iter()
            .any(|c| !self.containers.contains(c.id.as_deref().unwrap_or(""))))
    }

    /// Whether a container the socket did not create is connected to the network `id`: found by
    /// the network's id, and by its name (a container not started yet has no endpoint, and the
    /// engine's filter finds it by the name only: the next attacker's).
    async fn network_used_by_others(&self, id: &str) -> Result<bool, Refusal> {
        let name = self
            .docker
            .inspect_network(id, None::<bollard::query_parameters::InspectNetworkOptions>)
            .await
            .map_err(|e| Refusal::Engine(format!("inspecting network {id}: {e}")))?
            .name
            .unwrap_or_default();
        if self.used_by_others("network", id).await? {
            return Ok(true);
        }
        Ok(!name.is_empty() && self.used_by_others("network", &name).await?)
    }

    /// The engine's conflict (an image remove's) without the ids of what is not the instance's:
    /// it names the container that uses the image, the host's too.
    async fn others_unnamed(
        &self,
        response: Response<Body>,
        image: &str,
    ) -> Result<Response<Body>, Refusal> {
        if response.status() != StatusCode::CONFLICT {
            return Ok(response);
        }
        let (parts, body) = response.into_parts();
        let bytes = body
            .collect()
            .await
            .map_err(|e| Refusal::Engine(format!("reading an image remove: {e}")))?
            .to_bytes();
        let message = serde_json::from_slice::<Value>(&bytes)
            .ok()
            .and_then(|v| v.get("message").and_then(Value::as_str).map(str::to_string))
            .unwrap_or_default();
        let image = image.trim_start_matches("sha256:");
        let words: Vec<String> = message
            .split(' ')
            .map(|word| {
                let core = word.trim_matches(|c: char| !c.is_ascii_alphanumeric());
                let an_id = (core.len() == 12 || core.len() == 64)
                    && core.bytes().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'));
                if an_id && !image.starts_with(core) && !self.containers.has_prefix(core) {
                    word.replace(core, "(not this instance's)")
                } else {
                    word.to_string()
                }
            })
            .collect();
        Ok(rebuild(parts, &json!({ "message": words.join(" ") })))
    }

    /// Whether the image `id` is one a build's step makes: committed from a container this
    /// build's output named as a step's (` ---> Running in <id>`) that the socket did not
    /// create, or made by a copy (`COPY`, `ADD`: the engine names no container for those). A
    /// step can print a step's lines, and the host can commit one of the application's
    /// containers (labelled, its image untagged, made during the build): an attacker's,
    /// twenty-fifth session, had the host's commit's id from its event, printed it, and the
    /// image was recorded as the application's.
    async fn made_by_a_step(&self, id: &str, seen: &BuildSeen) -> bool {
        // In the engine's own inspection (API 1.41), not in the client library's model of it.
        let Ok(inspected) = self.engine_json(&format!("/images/{id}/json")).await else {
            return false;
        };
        let from = inspected
            .get("Container")
            .and_then(Value::as_str)
            .unwrap_or("");
        if from.is_empty() {
            let step = inspected
                .pointer("/ContainerConfig/Cmd/2")
                .and_then(Value::as_str)
                .unwrap_or("");
            return step.starts_with("#(nop) COPY ") || step.starts_with("#(nop) ADD ");
        }
        from.len() == 64
            && seen.containers.iter().any(|s| from.starts_with(s.as_str()))
            && !self.containers.contains_or_forgot(from)
    }

    /// The engine's JSON answer to `GET path` (at the model's API version).
    async fn engine_json(&self, path: &str) -> Result<Value, Refusal> {
        let req = Request::builder()
            .method(Method::GET)
            .uri(format!("/v{}{path}", policy::API_VERSION))
            .body(boxed(http_body_util::Empty::new()))
            .map_err(|e| Refusal::Engine(format!("building GET {path}: {e}")))?;
        let response = self.forward(req, Payload::Empty, None).await?;
        if !response.status().is_success() {
            return Err(Refusal::Engine(format!(
                "GET {path}: {}",
                response.status()
            )));
        }
        let bytes = response
            .into_body()
            .collect()
            .await
            .map_err(|e| Refusal::Engine(format!("reading GET {path}: {e}")))?
            .to_bytes();
        serde_json::from_slice(&bytes)
            .map_err(|e| Refusal::Engine(format!("GET {path} is not JSON: {e}")))
    }

    /// Every image of the engine's, intermediate ones included.
    async fn all_images(
        &self,
    ) -> Result<Vec<bollard::models::ImageSummary>, bollard::errors::Error> {
        let opts = bollard::query_parameters::ListImagesOptions {
            all: true,
            ..Default::default()
        };
        self.docker.list_images(Some(opts)).await
    }

    /// The images a build may be given from the engine's cache (its `cachefrom`): the
    /// instance's recorded images, of which the engine then takes a step's image only if it is
    /// one of them or an ancestor of one. Left to itself, the classic builder takes any child of
    /// the step's parent whose configuration matches: an image the host made from one of the
    /// instance's (a `docker commit` of a container run from it, a step of a build on it) was
    /// given to the application's build, which read it and was recorded as its own (an
    /// attacker's, twenty-fourth session), and so was another tenant's step from the same base.
    /// Only those no other recorded image descends from are named (the others are their
    /// ancestors), the newest [`MAX_CACHE_SOURCES`]. None: nothing to take from (the build is
    /// asked for no cache).
    async fn cache_sources(&self) -> Result<Option<Vec<String>>, Refusal> {
        let all = self
            .all_images()
            .await
            .map_err(|e| Refusal::Engine(format!("listing the images a build may reuse: {e}")))?;
        let recorded: Vec<&bollard::models::ImageSummary> =
            all.iter().filter(|i| self.images.contains(&i.id)).collect();
        let parents: BTreeSet<&str> = recorded.iter().map(|i| i.parent_id.as_str()).collect();
        let mut leaves: Vec<&bollard::models::ImageSummary> = recorded
            .into_iter()
            .filter(|i| !parents.contains(i.id.as_str()))
            .collect();
        if leaves.is_empty() {
            return Ok(None);
        }
        leaves.sort_by_key(|i| std::cmp::Reverse(i.created));
        leaves.truncate(MAX_CACHE_SOURCES);
        Ok(Some(leaves.into_iter().map(|i| i.id.clone()).collect()))
    }

    /// The request body (`what`) in an unnamed file of the spool directory, bounded, and the
    /// turn it was spooled in (`docker.max_spooled` at once), to hold until it is forwarded.
    async fn spool(
        &self,
        body: RequestBody,
        what: &str,
    ) -> Result<(std::fs::File, tokio::sync::OwnedSemaphorePermit), Refusal> {
        use tokio::io::AsyncWriteExt;
        let err = |e: &dyn std::fmt::Display| Refusal::Engine(format!("spooling {what}: {e}"));
        let turn = self
            .spools
            .clone()
            .acquire_owned()
            .await
            .map_err(|e| err(&e))?;
        let file = tempfile_in(&self.spool_dir).map_err(|e| err(&e))?;
        let mut writer = tokio::fs::File::from_std(file.try_clone().map_err(|e| err(&e))?);
        let mut body = body;
        let mut total: u64 = 0;
        while let Some(frame) = self.next_frame(&mut body, what).await? {
            if let Some(data) = frame.data_ref() {
                total += data.len() as u64;
                if total > self.max_build_context {
                    return Err(Refusal::TooLarge(
                        "docker.max_build_context",
                        format!(
                            "{what} is larger than docker.max_build_context ({} bytes)",
                            self.max_build_context
                        ),
                    ));
                }
                writer.write_all(data).await.map_err(|e| err(&e))?;
            }
        }
        writer.flush().await.map_err(|e| err(&e))?;
        Ok((file, turn))
    }

    /// Before the engine mounts a container's binds (start, restart, a copy into it): their
    /// sources, as regobox sees them, still under the roots, no running job able to move a
    /// component of their paths, and every component frozen ([`binds`]) until the returned guard
    /// is dropped, after the engine's answer.
    async fn freeze_binds(
        &self,
        id: &str,
        inspected: &ContainerInspectResponse,
    ) -> Result<(tokio::sync::MutexGuard<'_, ()>, Option<Freeze>), Refusal> {
        let sources = bind_sources(inspected.host_config.as_ref(), &self.policy.host_paths);
        for inside in &sources {
            if !self.policy.bind_roots.iter().any(|r| inside.starts_with(r)) {
                return Err(Denied::new(
                    "HostConfig.Binds",
                    format!("refused by regobox's Docker policy: bind source {} is outside the allowed roots", inside.display()),
                )
                .into());
            }
        }
        let lock = self.freezing.lock().await;
        if sources.is_empty() {
            return Ok((lock, None));
        }
        let mut filters = std::collections::HashMap::new();
        filters.insert(
            "label".to_string(),
            vec![format!("{INSTANCE_LABEL}={}", self.instance)],
        );
        filters.insert(
            "status".to_string(),
            vec![
                "running".to_string(),
                "paused".to_string(),
                "restarting".to_string(),
            ],
        );
        let running = self
            .docker
            .list_containers(Some(bollard::query_parameters::ListContainersOptions {
                filters: Some(filters),
                ..Default::default()
            }))
            .await
            .map_err(|e| Refusal::Engine(format!("listing this instance's running jobs: {e}")))?;
        let jobs: Vec<(String, Vec<PathBuf>)> = running
            .iter()
            .filter(|c| c.id.as_deref() != Some(id))
            .map(|c| {
                let name = c
                    .names
                    .as_ref()
                    .and_then(|n| n.first())
                    .cloned()
                    .unwrap_or_else(|| c.id.clone().unwrap_or_default());
                let writable = c
                    .mounts
                    .iter()
                    .flatten()
                    .filter(|m| {
                        m.typ == Some(bollard::models::MountPointTypeEnum::BIND)
                            && m.rw == Some(true)
                    })
                    .filter_map(|m| m.source.as_deref())
                    .map(|s| container::from_host(Path::new(s), &self.policy.host_paths))
                    .collect();
                (name, writable)
            })
            .collect();
        if let Some((job, bind, source)) = binds::covering(&sources, &self.policy.bind_roots, &jobs)
        {
            return Err(Denied::new(
                "HostConfig.Binds",
                format!(
                    "refused by regobox's Docker policy: the running job {job} can write {}, which holds the path of the bind source {}: it could swap a directory of that path while the engine mounts it (stop it first, or bind it read-only)",
                    bind.display(),
                    source.display()
                ),
            )
            .into());
        }
        let freeze = Freeze::new(&sources, &self.policy.bind_roots, &self.freeze_journal)?;
        Ok((lock, Some(freeze)))
    }

    /// A list's `filters` in regobox's rendering ([`query::filters`]): those that name an
    /// object (`named`) resolved to this instance's, by full id (someone else's answers as
    /// missing, as the engine would a missing one: no oracle for others' names), and, with
    /// `labelled`, the instance's label filter added (the engine then lists only its objects).
    async fn list_filters(
        &self,
        mut q: Query,
        allowed: &[&str],
        named: &[(&str, Named)],
        labelled: bool,
    ) -> Result<Query, Refusal> {
        let mut filters = query::filters(q.get("filters"), allowed)?;
        for (key, kind) in named {
            for value in filters.get_mut(*key).into_iter().flatten() {
                *value = match kind {
                    Named::Container => self.owned_container(value).await?.0,
                    Named::Image => self.owned_image(value).await?,
                };
            }
        }
        if labelled {
            with_instance_label(&mut filters, &self.instance);
        }
        if filters.is_empty() {
            q.remove("filters");
        } else {
            q.set(
                "filters",
                serde_json::to_string(&filters).unwrap_or_default(),
            );
        }
        Ok(q)
    }

    /// `req` for an endpoint that takes no body: refused if it has one, forwarded with none.
    async fn no_body(&self, req: Request<RequestBody>) -> Result<Request<Body>, Refusal> {
        let (parts, body) = req.into_parts();
        let what = format!("{} {}", parts.method, parts.uri.path());
        let bytes = self.read_body(body, &what).await?;
        if !bytes.is_empty() {
            return Err(Denied::new(
                "body",
                format!("refused by regobox's Docker policy: {what} takes no body"),
            )
            .into());
        }
        Ok(Request::from_parts(
            parts,
            boxed(http_body_util::Empty::<Bytes>::new()),
        ))
    }

    /// The body (`what`) whole, up to `docker.max_inspected_body`.
    async fn read_body(&self, mut body: RequestBody, what: &str) -> Result<Bytes, Refusal> {
        let what = format!("the {what} body");
        let mut whole = bytes::BytesMut::new();
        while let Some(frame) = self.next_frame(&mut body, &what).await? {
            if let Some(data) = frame.data_ref() {
                if whole.len() + data.len() > self.max_body {
                    return Err(Refusal::TooLarge(
                        "docker.max_inspected_body",
                        format!(
                            "{what} is larger than docker.max_inspected_body ({} bytes)",
                            self.max_body
                        ),
                    ));
                }
                whole.extend_from_slice(data);
            }
        }
        Ok(whole.freeze())
    }

    /// The next piece of a request's body (`what`), which must come within
    /// `docker.idle_timeout`: a client that stops sending holds nothing it waits with (a spool
    /// turn, the lock builds take) for longer, and its body is not drained.
    async fn next_frame(
        &self,
        body: &mut RequestBody,
        what: &str,
    ) -> Result<Option<Frame<Bytes>>, Refusal> {
        match tokio::time::timeout(self.idle_timeout, body.frame()).await {
            Ok(Some(Ok(frame))) => Ok(Some(frame)),
            Ok(None) => Ok(None),
            Ok(Some(Err(e))) => Err(Refusal::BadRequest(format!("reading {what}: {e}"))),
            Err(_) => {
                body.abandon();
                Err(stalled(what, self.idle_timeout))
            }
        }
    }

    /// The engine's events (one JSON object a line), each read and written again by regobox,
    /// without those of a container the instance did not create: the label filter leaves in a
    /// container made on the host from one of the instance's images (a label is inherited), whose
    /// every event (its name, labels, the commands run in it) the application saw (an
    /// attacker's, twenty-third session). A network's event naming such a container is left out
    /// too. An event of a container not recorded yet waits for the creates in flight (its own
    /// create's event comes before the engine's answer is read).
    fn own_events(self: Arc<Self>, body: Body) -> Body {
        /// The longest event regobox reads (the engine's are a few KiB).
        const MAX_EVENT: usize = 1 << 20;
        struct Follow {
            body: Body,
            line: Vec<u8>,
            ready: std::collections::VecDeque<Bytes>,
            ended: bool,
        }
        let state = Follow {
            body,
            line: Vec::new(),
            ready: Default::default(),
            ended: false,
        };
        let stream = futures_util::stream::unfold(state, move |mut st| {
            let proxy = self.clone();
            async move {
                loop {
                    if let Some(b) = st.ready.pop_front() {
                        return Some((Ok::<_, BoxError>(Frame::data(b)), st));
                    }
                    if st.ended {
                        return None;
                    }
                    let chunk = match st.body.frame().await {
                        Some(Ok(frame)) => match frame.into_data() {
                            Ok(data) => data,
                            Err(_) => continue,
                        },
                        Some(Err(e)) => {
                            st.ended = true;
                            return Some((Err(e), st));
                        }
                        None => {
                            st.ended = true;
                            continue;
                        }
                    };
                    let mut rest = &chunk[..];
                    while let Some(end) = rest.iter().position(|&c| c == b'\n') {
                        st.line.extend_from_slice(&rest[..end]);
                        rest = &rest[end + 1..];
                        let line = std::mem::take(&mut st.line);
                        if let Some(kept) = proxy.own_event(&line).await {
                            st.ready.push_back(kept);
                        }
                    }
                    st.line.extend_from_slice(rest);
                    if st.line.len() > MAX_EVENT {
                        st.ended = true;
                        let e: BoxError = format!("an engine event over {MAX_EVENT} bytes").into();
                        return Some((Err(e), st));
                    }
                }
            }
        });
        boxed(http_body_util::StreamBody::new(stream))
    }

    /// One event of the engine's, as regobox writes it again, if the application may see it:
    /// a container's if the socket created it; a network's if the network is the instance's
    /// (and the container it names, if any, the socket's); an image's if the image is recorded
    /// (or was lately), a tag's only if the instance made it. No other kind of event (daemon,
    /// volume, plugin, a pull's, named by the reference the host asked for).
    async fn own_event(&self, line: &[u8]) -> Option<Bytes> {
        let event: Value = serde_json::from_slice(line.trim_ascii()).ok()?;
        let actor = event.get("Actor");
        let id = actor.and_then(|a| a.get("ID")).and_then(Value::as_str)?;
        let attribute = |name: &str| {
            actor
                .and_then(|a| a.get("Attributes"))
                .and_then(|a| a.get(name))
                .and_then(Value::as_str)
        };
        let action = event.get("Action").and_then(Value::as_str).unwrap_or("");
        let kept = match event.get("Type").and_then(Value::as_str)? {
            // Its labels are among its attributes: the host's others go without a wait. Only
            // what happens to a job through the socket or by its own life: the host's exec,
            // commit, rename, export and update of it are the host's (their attributes carry
            // its commands, its images' names and ids: an attacker's, twenty-fifth session).
            "container" => {
                CONTAINER_EVENTS.contains(&action.split(':').next().unwrap_or(""))
                    && attribute(INSTANCE_LABEL) == Some(self.instance.as_str())
                    && self.created_here(id).await
            }
            "network" => {
                self.network_seen_ours(id).await
                    && match attribute("container") {
                        Some(c) => self.created_here(c).await,
                        None => true,
                    }
            }
            // A save, load or push of one is the host's.
            "image" => {
                matches!(action, "import" | "tag" | "untag" | "delete")
                    && self.image_recorded(id).await
                    && (action != "tag"
                        || attribute("name").is_some_and(|t| self.tags.contains(&owned_tag(t, id))))
            }
            _ => false,
        };
        if !kept {
            return None;
        }
        let mut text = event.to_string();
        text.push('\n');
        Some(Bytes::from(text))
    }

    /// A job's networks (inspected or listed) without those the host connected it to: their
    /// names, ids and addresses are the host's (an attacker's, twenty-fifth session). Kept: the
    /// engine's own (`bridge`, `host`, `none`, which a job is on unless told otherwise) and the
    /// instance's.
    async fn own_networks_of(&self, c: &mut Value) {
        let Some(Value::Object(networks)) = c.pointer_mut("/NetworkSettings/Networks") else {
            return;
        };
        let mut theirs = Vec::new();
        for (name, endpoint) in networks.iter() {
            if matches!(name.as_str(), "bridge" | "host" | "none") {
                continue;
            }
            // Before a start the engine gives no id: judged by the name.
            let id = endpoint
                .get("NetworkID")
                .and_then(Value::as_str)
                .filter(|id| !id.is_empty());
            let ours = match id {
                Some(id) => self.network_seen_ours(id).await,
                None => self.owned_network(name).await.is_ok(),
            };
            if !ours {
                theirs.push(name.clone());
            }
        }
        for name in theirs {
            networks.remove(&name);
        }
    }

    /// Whether the network `id` is the instance's: labelled, or seen so by this process before
    /// it was removed.
    async fn network_seen_ours(&self, id: &str) -> bool {
        if self.networks.lock().is_ok_and(|n| n.contains(id)) {
            return true;
        }
        // On a task of its own: the events body is shared between threads, and bollard's
        // futures are not.
        let docker = self.docker.clone();
        let asked = id.to_string();
        let inspected = tokio::spawn(async move {
            docker
                .inspect_network(
                    &asked,
                    None::<bollard::query_parameters::InspectNetworkOptions>,
                )
                .await
        })
        .await;
        let ours = matches!(&inspected, Ok(Ok(n))
            if n.id.as_deref() == Some(id) && self.labelled(n.labels.as_ref()));
        if ours && let Ok(mut seen) = self.networks.lock() {
            seen.insert(id.to_string());
        }
        ours
    }

    /// Whether the image `id` is recorded (or was lately), waiting (5 s at most) for the pulls
    /// and imports in flight if it is not yet.
    async fn image_recorded(&self, id: &str) -> bool {
        let since = Instant::now();
        loop {
            if self.images.contains_or_forgot(id) {
                return true;
            }
            if self.making.load(std::sync::atomic::Ordering::SeqCst) == 0
                || since.elapsed() >= Duration::from_secs(5)
            {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Whether the container `id` was created through this socket, waiting (5 s at most) for
    /// the creates in flight if it is not recorded yet.
    async fn created_here(&self, id: &str) -> bool {
        let since = Instant::now();
        loop {
            if self.containers.contains_or_forgot(id) {
                return true;
            }
            if self.creates.is_empty() || since.elapsed() >= Duration::from_secs(5) {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Whether `labels` mark an object as this instance's.
    fn labelled(&self, labels: Option<&std::collections::HashMap<String, String>>) -> bool {
        labels
            .and_then(|l| l.get(INSTANCE_LABEL))
            .is_some_and(|v| *v == self.instance)
    }

    /// An inspection's result if the object is this instance's; someone else's answers as
    /// missing.
    fn owned<T>(
        &self,
        inspected: Result<T, bollard::errors::Error>,
        ours: impl FnOnce(&T) -> bool,
        missing: String,
        what: &str,
    ) -> Result<T, Refusal> {
        match inspected {
            Ok(x) if ours(&x) => Ok(x),
            Ok(_)
            | Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) => Err(Refusal::NotFound(missing)),
            // A name the engine cannot read (`Regobox:e2e`): the client's error, not regobox's.
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 400,
                message,
            }) => Err(Refusal::BadRequest(format!("{what}: {message}"))),
            Err(e) => Err(Refusal::Engine(format!("inspecting {what}: {e}"))),
        }
    }

    /// The image's full id if it is this instance's (labelled, or pulled/imported through here).
    async fn owned_image(&self, name: &str) -> Result<String, Refusal> {
        let img = self.owned_image_inspect(name).await?;
        img.id
            .filter(|id| !id.is_empty())
            .ok_or_else(|| Refusal::Engine(format!("the engine gave image {name} no id")))
    }

    /// The image's inspection if it is this instance's.
    async fn owned_image_inspect(
        &self,
        name: &str,
    ) -> Result<bollard::models::ImageInspect, Refusal> {
        let img = self.owned(
            self.docker.inspect_image(name).await,
            |img| self.image_is_ours(img),
            format!("No such image: {name}"),
            &format!("image {name}"),
        )?;
        // Found by a tag the host put on it: the host's name, missing to the application (no
        // oracle for the names the host gives the instance's images).
        let tags = img.repo_tags.as_deref().unwrap_or_default();
        if removal_target(name, tags).is_some() && !self.tag_is_ours(name, &img) {
            return Err(Refusal::NotFound(format!("No such image: {name}")));
        }
        // By a digest: of a repository the instance pulled or tagged it in (the host's push
        // of it names another).
        let id = img.id.as_deref().unwrap_or("");
        if name.contains('@')
            && !self.tags.contains(&owned_tag(name, id))
            && !self.own_repositories(id).contains(&repository(name))
        {
            return Err(Refusal::NotFound(format!("No such image: {name}")));
        }
        if img.id.as_deref().is_none_or(str::is_empty) {
            return Err(Refusal::Engine(format!(
                "the engine gave image {name} no id"
            )));
        }
        Ok(img)
    }

    /// Record that the socket makes (or made) the tag `reference` on the image `id`. A tag names
    /// one image: its entries for others (where it was before the application moved it) go,
    /// and are returned, to be put back if the tag is not made. Left, such an entry made the tag
    /// the instance's again once the host moved it back there (an attacker's, twenty-fourth
    /// session).
    fn record_tag(&self, reference: &str, id: &str) -> Vec<String> {
        let owned = owned_tag(reference, id);
        let same_tag = format!("{} ", image::familiar(reference));
        let mut moved = Vec::new();
        self.tags.update(|s| {
            moved = s
                .iter()
                .filter(|t| t.starts_with(&same_tag) && **t != owned)
                .cloned()
                .collect();
            for t in &moved {
                s.remove(t);
            }
            s.insert(owned.clone()) || !moved.is_empty()
        });
        moved
    }

    /// An image's `RepoTags` (listed or inspected) without the tags the host put on it: they are
    /// the host's, and their names its own business. `untagged` is what the engine writes for
    /// an image with none. Whether a tag of the instance's is left.
    fn own_repo_tags(&self, img: &mut Value, untagged: &[&str]) -> bool {
        let id = img
            .get("Id")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let Some(Value::Array(tags)) = img.get_mut("RepoTags") else {
            return false;
        };
        let before = tags.len();
        tags.retain(|t| {
            t.as_str()
                .is_some_and(|t| untagged.contains(&t) || self.tags.contains(&owned_tag(t, &id)))
        });
        let own = tags
            .iter()
            .any(|t| t.as_str().is_some_and(|t| !untagged.contains(&t)));
        if tags.is_empty() && before > 0 {
            tags.extend(untagged.iter().map(|t| Value::from(*t)));
        }
        // A digest names the repository the host pushed the image to too (its registry's and
        // repository's names: an attacker's, twenty-fifth session).
        let repositories = self.own_repositories(&id);
        if let Some(Value::Array(digests)) = img.get_mut("RepoDigests") {
            digests.retain(|d| {
                d.as_str().is_some_and(|d| {
                    d == "<none>@<none>"
                        || self.tags.contains(&owned_tag(d, &id))
                        || repositories.contains(&repository(d))
                })
            });
        }
        own
    }

    /// The repositories of the tags the instance made on the image `id`.
    fn own_repositories(&self, id: &str) -> BTreeSet<String> {
        let suffix = format!(" {id}");
        self.tags
            .snapshot()
            .iter()
            .filter_map(|t| t.strip_suffix(&suffix))
            .map(repository)
            .collect()
    }

    /// Whether the tag `reference` names `img` because the socket made it so: the image is the
    /// instance's and the tag was made on it through the socket. A tag the host's administrator
    /// puts on one of the instance's images is the host's: the application moved it to an
    /// image of its own (a build or import tagged the same) and removed it (an attacker's,
    /// twenty-fourth session).
    fn tag_is_ours(&self, reference: &str, img: &bollard::models::ImageInspect) -> bool {
        let id = img.id.as_deref().unwrap_or("");
        self.image_is_ours(img) && self.tags.contains(&owned_tag(reference, id))
    }

    /// Built, pulled or imported through here: recorded (see [`Recorded`]). Not its label, which
    /// every image built on one of the instance's, and every image committed from a container
    /// made from one, inherits (an attacker's, twenty-third session: the host's `docker commit`
    /// of a container it ran from the application's image was the application's to run and
    /// remove).
    fn image_is_ours(&self, img: &bollard::models::ImageInspect) -> bool {
        self.images.contains(img.id.as_deref().unwrap_or(""))
    }

    /// The container's full id and inspection if it is this instance's.
    /// A copy into or out of a job (`/containers/{id}/archive`) makes the engine mount the
    /// job's binds (and its `/etc/hostname`, `hosts`, `resolv.conf`) itself, on paths inside the
    /// job's root that it resolves once and then mounts by name, following links. Nested
    /// destinations (a bind under another, `/etc` a bind or a link in the image to one) run
    /// those paths through a directory the application owns on the host, and a running job can
    /// change its own root meanwhile: a swap there mounted the application's files over any
    /// host path. So a copy is allowed only for a job that is not running and has no bind or
    /// volume (its root, the network files and tmpfs: nothing the application can move); files
    /// go in and out of a job with binds through the binds' directories. Asked of the engine
    /// again with the turn held, so that no start comes between the look and the copy.
    async fn copy_allowed(&self, id: &str) -> Result<(), Refusal> {
        let c = self
            .docker
            .inspect_container(
                id,
                None::<bollard::query_parameters::InspectContainerOptions>,
            )
            .await
            .map_err(|e| Refusal::Engine(format!("inspecting container {id}: {e}")))?;
        let running = c.state.as_ref().is_some_and(|s| {
            s.running == Some(true) || s.paused == Some(true) || s.restarting == Some(true)
        });
        if running {
            return Err(Denied::new(
                "archive",
                "refused by regobox's Docker policy: a copy into or out of a running job (the engine mounts its binds again for a copy, on paths the job can change): copy before it starts or after it stops",
            )
            .into());
        }
        let bound = c
            .mounts
            .iter()
            .flatten()
            .find(|m| m.typ != Some(bollard::models::MountPointTypeEnum::TMPFS));
        if let Some(m) = bound {
            return Err(Denied::new(
                "archive",
                format!(
                    "refused by regobox's Docker policy: a copy into or out of a job with a bind ({}): the engine mounts the binds again for a copy, following links on paths the application can change; exchange files through the bind's directory instead",
                    m.destination.as_deref().unwrap_or("?")
                ),
            )
            .into());
        }
        Ok(())
    }

    async fn owned_container(
        &self,
        reference: &str,
    ) -> Result<(String, ContainerInspectResponse), Refusal> {
        if reference.is_empty() {
            return Err(Refusal::NotFound("No such container: ".into()));
        }
        let inspected = self
            .docker
            .inspect_container(
                reference,
                None::<bollard::query_parameters::InspectContainerOptions>,
            )
            .await;
        // Labelled and created through this socket: a container made on the host from one of
        // the instance's images carries its label too.
        let c = self.owned(
            inspected,
            |c| {
                self.labelled(c.config.as_ref().and_then(|c| c.labels.as_ref()))
                    && self.containers.contains(c.id.as_deref().unwrap_or(""))
            },
            format!("No such container: {reference}"),
            &format!("container {reference}"),
        )?;
        let id = c.id.clone().filter(|id| id.len() == 64).ok_or_else(|| {
            Refusal::Engine(format!("the engine gave container {reference} no full id"))
        })?;
        Ok((id, c))
    }

    /// The ids of the engine's networks named `name` exactly, whoever's they are; with no name,
    /// of the instance's networks (by label).
    async fn networks_named(&self, name: Option<&str>) -> Result<Vec<String>, Refusal> {
        let filter = match name {
            // The engine's name filter matches a part of a name: the list is narrowed here.
            Some(name) => ("name".to_string(), vec![name.to_string()]),
            None => (
                "label".to_string(),
                vec![format!("{INSTANCE_LABEL}={}", self.instance)],
            ),
        };
        let opts = bollard::query_parameters::ListNetworksOptions {
            filters: Some(std::collections::HashMap::from([filter])),
        };
        let list = self
            .docker
            .list_networks(Some(opts))
            .await
            .map_err(|e| Refusal::Engine(format!("listing the networks: {e}")))?;
        Ok(list
            .into_iter()
            .filter(|n| name.is_none_or(|name| n.name.as_deref() == Some(name)))
            .filter_map(|n| n.id)
            .collect())
    }

    /// The network's full id if it is this instance's.
    async fn owned_network(&self, reference: &str) -> Result<String, Refusal> {
        let inspected = self
            .docker
            .inspect_network(
                reference,
                None::<bollard::query_parameters::InspectNetworkOptions>,
            )
            .await;
        let n = self.owned(
            inspected,
            |n| self.labelled(n.labels.as_ref()),
            format!("network {reference} not found"),
            &format!("network {reference}"),
        )?;
        let id = n
            .id
            .filter(|id| !id.is_empty())
            .ok_or_else(|| Refusal::Engine(format!("the engine gave network {reference} no id")))?;
        if let Ok(mut seen) = self.networks.lock() {
            seen.insert(id.clone());
        }
        Ok(id)
    }

    /// Send `req` to the engine on a new connection, with regobox's headers only (see
    /// [`engine_headers`]); splice an upgrade if both sides agree.
    async fn forward(
        &self,
        mut req: Request<Body>,
        payload: Payload,
        upgrade: Option<hyper::upgrade::OnUpgrade>,
    ) -> Result<Response<Body>, Refusal> {
        let unreachable = |e: &dyn std::fmt::Display| {
            Refusal::Engine(format!("the Docker engine cannot be reached: {e}"))
        };
        let io = self
            .connector
            .connect()
            .await
            .map_err(|e| unreachable(&e))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
            .await
            .map_err(|e| unreachable(&e))?;
        tokio::spawn(async move {
            let _ = conn.with_upgrades().await;
        });
        let auth = req.extensions().get::<RenderedAuth>().map(|a| a.0.clone());
        *req.headers_mut() = engine_headers(payload, upgrade.is_some(), auth);
        let mut response = sender
            .send_request(req)
            .await
            .map_err(|e| unreachable(&e))?;
        if response.status() != StatusCode::SWITCHING_PROTOCOLS {
            end_to_end(response.headers_mut());
        } else {
            if let Some(client) = upgrade {
                let engine = hyper::upgrade::on(&mut response);
                tokio::spawn(async move {
                    if let (Ok(client), Ok(engine)) = tokio::join!(client, engine) {
                        let mut client = TokioIo::new(client);
                        let mut engine = TokioIo::new(engine);
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut engine).await;
                    }
                });
            }
        }
        Ok(response.map(boxed))
    }
}

/// A body streamed to the engine as it comes (an import's tar, `what`): while it waits for the
/// client, each piece must come within `within` (`docker.idle_timeout`; time the engine takes
/// to read what it was given does not count), or the body fails there, which cuts the request
/// to the engine (nothing imported) and is not drained. Why the body failed (it stalled, or its
/// client broke it off) is put in `failed`, to be the answer (not the engine's fault).
struct Paced {
    body: RequestBody,
    within: Duration,
    what: &'static str,
    deadline: Pin<Box<tokio::time::Sleep>>,
    /// A piece is waited for (the deadline set when the wait began).
    waiting: bool,
    failed: Arc<Mutex<Option<Refusal>>>,
}

impl Paced {
    fn new(
        body: RequestBody,
        within: Duration,
        what: &'static str,
        failed: Arc<Mutex<Option<Refusal>>>,
    ) -> Self {
        Paced {
            body,
            within,
            what,
            deadline: Box::pin(tokio::time::sleep(within)),
            waiting: false,
            failed,
        }
    }

    fn fail(&mut self, why: Refusal) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let message = why.message().to_string();
        if let Ok(mut failed) = self.failed.lock() {
            *failed = Some(why);
        }
        Poll::Ready(Some(Err(message.into())))
    }
}

impl hyper::body::Body for Paced {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.body).poll_frame(cx) {
            Poll::Ready(Some(Err(e))) => {
                let why = Refusal::BadRequest(format!("reading {}: {e}", this.what));
                this.fail(why)
            }
            Poll::Ready(polled) => {
                this.waiting = false;
                Poll::Ready(polled.map(|r| r.map_err(Into::into)))
            }
            Poll::Pending => {
                if !this.waiting {
                    this.waiting = true;
                    let until = tokio::time::Instant::now() + this.within;
                    this.deadline.as_mut().reset(until);
                }
                if this.deadline.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                this.body.abandon();
                let why = stalled(this.what, this.within);
                this.fail(why)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

/// A spooled body (`what`), from its start, and its length; its spooling turn ends when the body
/// is dropped (forwarded whole, or abandoned).
async fn spooled_body(
    spool: std::fs::File,
    turn: tokio::sync::OwnedSemaphorePermit,
    what: &str,
) -> Result<(Body, u64), Refusal> {
    use tokio::io::AsyncSeekExt;
    let len = spool.metadata().map(|m| m.len()).unwrap_or(0);
    let mut file = tokio::fs::File::from_std(spool);
    file.seek(std::io::SeekFrom::Start(0))
        .await
        .map_err(|e| Refusal::Engine(format!("spooling {what}: {e}")))?;
    let stream = tokio_util::io::ReaderStream::new(file).map(move |r| {
        let _turn = &turn;
        r.map(Frame::data)
    });
    Ok((boxed(http_body_util::StreamBody::new(stream)), len))
}

/// The engine's answer without the fields about its own connection to regobox (RFC 9110
/// 7.6.1): the engine says `Connection: close` when it answers before taking a body whole (an
/// import it cannot read), and the application's connection, whose body regobox reads on (see
/// [`crate::unread`]), would be closed for it. (A 101 keeps them: they say what the connection
/// becomes.)
fn end_to_end(headers: &mut HeaderMap) {
    let named: Vec<String> = headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|name| name.trim().to_ascii_lowercase())
        .filter(|name| !name.is_empty())
        .collect();
    for name in named {
        headers.remove(name.as_str());
    }
    for name in [CONNECTION, UPGRADE, hyper::header::TE] {
        headers.remove(name);
    }
    for name in ["keep-alive", "proxy-connection"] {
        headers.remove(name);
    }
}

/// What a forwarded request's body is: the engine is told so by regobox, not by the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Payload {
    /// None.
    Empty,
    /// regobox's serialisation of the typed model.
    Json,
    /// A tar archive: an import or a copy into a container (streamed through), or a build
    /// context (spooled; its length known).
    Tar(Option<u64>),
}

/// The credentials header of a pull (base64url JSON, as the engine reads it).
const REGISTRY_AUTH: &str = "x-registry-auth";

/// A pull's credentials as regobox rendered them ([`registry_auth`]), carried to
/// [`Proxy::forward`] beside the request (never read from the client's headers there).
#[derive(Clone)]
struct RenderedAuth(HeaderValue);

/// The headers a request to the engine carries: regobox's alone, never the client's. The engine
/// reads more of a request than its path and query: a body sent as a form
/// (`application/x-www-form-urlencoded`) has its fields read as parameters, overriding those
/// of the query regobox judged (an import's `fromSrc=-` made a URL, or another registry), and
/// an `Upgrade` field asks for a hijacked connection. So: `Host`, the type of the body regobox
/// forwards (its length when regobox knows it; hyper frames the rest by the body), the upgrade
/// regobox agreed to, and a pull's credentials in regobox's rendering (see
/// [`registry_auth`]).
fn engine_headers(payload: Payload, upgrade: bool, auth: Option<HeaderValue>) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(HOST, HeaderValue::from_static("docker"));
    match payload {
        Payload::Empty => {}
        Payload::Json => {
            headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        }
        Payload::Tar(length) => {
            headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/x-tar"));
            if let Some(n) = length {
                headers.insert(CONTENT_LENGTH, HeaderValue::from(n));
            }
        }
    }
    if upgrade {
        headers.insert(CONNECTION, HeaderValue::from_static("Upgrade"));
        headers.insert(UPGRADE, HeaderValue::from_static("tcp"));
    }
    if let Some(auth) = auth {
        headers.insert(REGISTRY_AUTH, auth);
    }
    headers
}

/// Registry credentials, as the engine's `registry.AuthConfig` holds them (its JSON names).
#[derive(Debug, Default, serde::Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct RegistryAuth {
    #[serde(skip_serializing_if = "Option::is_none")]
    username: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    password: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    auth: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    email: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    serveraddress: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    identitytoken: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    registrytoken: Option<String>,
}

/// A pull's `X-Registry-Auth`, decoded (base64url of a JSON object of the fields above, each
/// once, in the engine's spelling) and rendered again by regobox; `None` without one. What is
/// not that is refused, rather than forwarded for the engine to read its own way.
fn registry_auth(value: Option<&HeaderValue>) -> Result<Option<HeaderValue>, Refusal> {
    use base64::Engine as _;
    use base64::engine::general_purpose::{URL_SAFE, URL_SAFE_NO_PAD};
    let Some(value) = value else {
        return Ok(None);
    };
    let bad = |why: &str| {
        Refusal::BadRequest(format!(
            "the X-Registry-Auth header is not registry credentials (base64url of a JSON object of username, password, auth, email, serveraddress, identitytoken, registrytoken): {why}"
        ))
    };
    let text = value.as_bytes().trim_ascii();
    let json = URL_SAFE
        .decode(text)
        .or_else(|_| URL_SAFE_NO_PAD.decode(text))
        .map_err(|e| bad(&e.to_string()))?;
    let decoded: RegistryAuth =
        model::decode(&json, "X-Registry-Auth").map_err(|u| bad(&u.message))?;
    let rendered = serde_json::to_vec(&decoded).map_err(|e| bad(&e.to_string()))?;
    HeaderValue::from_str(&URL_SAFE.encode(rendered))
        .map(Some)
        .map_err(|e| bad(&e.to_string()))
}

/// An unnamed file in `dir` (opened, then unlinked).
fn tempfile_in(dir: &Path) -> std::io::Result<std::fs::File> {
    std::fs::create_dir_all(dir)?;
    for _ in 0..16 {
        let path = dir.join(format!(".build-{:016x}", rand::random::<u64>()));
        match std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
        {
            Ok(f) => {
                std::fs::remove_file(&path)?;
                return Ok(f);
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
    Err(std::io::Error::other("no free name for a spool file"))
}

/// The largest Dockerfile read (and so the largest built).
const MAX_DOCKERFILE: u64 = 1 << 20;

/// The longest name of a build context's entry (Linux's `PATH_MAX`).
const MAX_CONTEXT_NAME: usize = 4096;

/// The bytes of all the names of a build context and of the directories they imply, together
/// (a context of 200 000 files averages 300 bytes each).
const MAX_CONTEXT_NAMES: usize = 64 << 20;

/// The largest GNU long name or link name, or PAX header, of a build context (Go's tar reader
/// refuses those over 1 MiB too).
const MAX_TAR_RECORD: u64 = 1 << 20;

/// A build context's tar as read: at most `max` bytes after decompression, and an error as
/// soon as `cancel` is set (the request was dropped: its client went away).
struct ContextReader<'a> {
    inner: Box<dyn std::io::Read>,
    left: u64,
    max: u64,
    cancel: &'a std::sync::atomic::AtomicBool,
}

impl std::io::Read for ContextReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.cancel.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(std::io::Error::other("the request was dropped"));
        }
        if self.left == 0 {
            // One byte more tells a context of exactly `max` bytes from a larger one.
            let mut probe = [0u8; 1];
            return match self.inner.read(&mut probe)? {
                0 => Ok(0),
                _ => Err(std::io::Error::other(format!(
                    "the build context is larger than docker.max_build_context ({} bytes) once decompressed",
                    self.max
                ))),
            };
        }
        let want = buf
            .len()
            .min(usize::try_from(self.left).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..want])?;
        self.left -= n as u64;
        Ok(n)
    }
}

/// A tar stream that may end right after its last entry's data, without the padding to a block
/// and the two zero blocks that end a tar: the docker CLI sends such a context when the
/// Dockerfile is outside it (`docker build -f ../Dockerfile ctx`), and the engine reads it. The
/// zeros are supplied, and where the real bytes ended is kept (`ended`), so that an entry whose
/// data they would complete (a stream cut short) is refused.
struct Padded<R> {
    inner: R,
    read: u64,
    zeros: u64,
    ended: Arc<std::sync::atomic::AtomicU64>,
}

impl<R> Padded<R> {
    fn new(inner: R, ended: Arc<std::sync::atomic::AtomicU64>) -> Self {
        Padded {
            inner,
            read: 0,
            zeros: 0,
            ended,
        }
    }
}

impl<R: std::io::Read> std::io::Read for Padded<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        if self.zeros == 0 {
            let n = self.inner.read(buf)?;
            if n > 0 {
                self.read += n as u64;
                return Ok(n);
            }
            if self.read == 0 || self.ended.load(std::sync::atomic::Ordering::Relaxed) != u64::MAX {
                return Ok(0);
            }
            self.ended
                .store(self.read, std::sync::atomic::Ordering::Relaxed);
            self.zeros = (512 - self.read % 512) % 512 + 1024;
        }
        let n = buf
            .len()
            .min(usize::try_from(self.zeros).unwrap_or(usize::MAX));
        buf[..n].fill(0);
        self.zeros -= n as u64;
        if self.zeros == 0 {
            // Once: the next read ends the stream.
            self.read = 0;
        }
        Ok(n)
    }
}

/// What a render stopped by its dropped request returns (no one reads it).
fn gone() -> Refusal {
    Refusal::BadRequest("the request was dropped".into())
}

/// Sets its flag when dropped: the request's future is gone, and the blocking work it started
/// stops.
struct CancelOnDrop(Arc<std::sync::atomic::AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// In a request's extensions: cancelled when its client leaves before its handler has ended
/// (the handler goes on: see `serve`).
#[derive(Clone)]
struct ClientGone(CancellationToken);

/// A build context read into regobox's model and written again: the tar the engine unpacks is
/// regobox's, so the Dockerfile the engine builds is the one regobox read. Returns that tar
/// (an unnamed file in `dir`) and the Dockerfile's text: `name`, else `Dockerfile`, else
/// `dockerfile`, as the engine looks for it.
///
/// The client's tar is never forwarded: two readers of one tar part ways (a PAX header with
/// two `path` records, an extension header without the ustar magic, a GNU sparse file's name
/// in PAX records: Go's reader and the Rust crate took different names, and the engine built
/// another Dockerfile than the one judged). The model holds files, directories and symbolic
/// links under clean relative names (no `..`, no absolute name), each once, a hard link only to
/// a file written before it; refused are other kinds (devices, FIFOs, sparse files, global
/// headers), an entry under a symbolic link of
/// the context or replacing a directory that holds entries (the engine would write through the
/// link or over what was read: `x -> .` then `x/Dockerfile`), a Dockerfile that is not a
/// regular file, and one larger than [`MAX_DOCKERFILE`].
fn render_context<T>(
    mut file: std::fs::File,
    name: &str,
    dir: &Path,
    max: u64,
    cancel: &std::sync::atomic::AtomicBool,
    read: impl FnOnce(&str) -> Result<(String, T), Refusal>,
) -> Result<(std::fs::File, String, T), Refusal> {
    use std::collections::BTreeSet;
    use std::io::{Read, Seek, Write};
    let err = |e: &dyn std::fmt::Display| {
        Refusal::BadRequest(format!(
            "the build context is not a readable tar archive: {e}"
        ))
    };
    let denied = |why: String| -> Refusal {
        Denied::new(
            "Dockerfile",
            format!("refused by regobox's Docker policy: {why}"),
        )
        .into()
    };
    file.seek(std::io::SeekFrom::Start(0))
        .map_err(|e| err(&e))?;
    let mut magic = [0u8; 6];
    let n = file.read(&mut magic).map_err(|e| err(&e))?;
    let gzip = match &magic[..n] {
        [0x1f, 0x8b, ..] => true,
        [b'B', b'Z', b'h', ..]
        | [0xfd, b'7', b'z', b'X', b'Z', 0]
        | [0x28, 0xb5, 0x2f, 0xfd, ..] => {
            return Err(Refusal::BadRequest(
                "the build context is compressed with bzip2, xz or zstd: send a plain or gzip tar"
                    .into(),
            ));
        }
        _ => false,
    };
    // The tar as read (decompressed), from its start, bounded by docker.max_build_context
    // (gzip makes a terabyte of a megabyte) and stopped when the request is dropped.
    let open =
        |ended: Arc<std::sync::atomic::AtomicU64>| -> Result<Padded<ContextReader<'_>>, Refusal> {
            let mut f = file.try_clone().map_err(|e| err(&e))?;
            f.seek(std::io::SeekFrom::Start(0)).map_err(|e| err(&e))?;
            let inner: Box<dyn Read> = if gzip {
                Box::new(flate2::read::MultiGzDecoder::new(f))
            } else {
                Box::new(f)
            };
            Ok(Padded::new(
                ContextReader {
                    inner,
                    left: max,
                    max,
                    cancel,
                },
                ended,
            ))
        };
    let unended = || Arc::new(std::sync::atomic::AtomicU64::new(u64::MAX));
    // First, the records the tar crate would read whole into memory whatever they declare
    // (GNU long names and link names, PAX headers), each judged by its declared size without
    // being read.
    let mut scan = tar::Archive::new(open(unended())?);
    for entry in scan.entries().map_err(|e| err(&e))?.raw(true) {
        let entry = entry.map_err(|e| err(&e))?;
        let kind = entry.header().entry_type();
        if (kind.is_gnu_longname()
            || kind.is_gnu_longlink()
            || kind.is_pax_local_extensions()
            || kind.is_pax_global_extensions())
            && entry.size() > MAX_TAR_RECORD
        {
            return Err(denied(format!(
                "the build context has a long name or PAX record of {} bytes; at most {MAX_TAR_RECORD}",
                entry.size()
            )));
        }
    }
    drop(scan);
    let ended = unended();
    let reader = open(ended.clone())?;
    // Where the last entry's data ends: within the bytes the client sent.
    let mut data_end: u64 = 0;
    let clean = |p: &str| -> Option<String> {
        let parts: Vec<&str> = p
            .split('/')
            .filter(|s| !s.is_empty() && *s != ".")
            .collect();
        (!parts.contains(&"..")).then(|| parts.join("/"))
    };
    let wanted: Vec<String> = match name {
        "" | "Dockerfile" => vec!["Dockerfile".into(), "dockerfile".into()],
        other => vec![
            clean(other)
                .filter(|c| !c.is_empty() && !other.starts_with('/'))
                .ok_or_else(|| {
                    denied(format!(
                        "the dockerfile parameter {other:?} is not a path inside the context"
                    ))
                })?,
        ],
    };
    let out = tempfile_in(dir)
        .map_err(|e| Refusal::Engine(format!("spooling the build context: {e}")))?;
    let mut builder =
        tar::Builder::new(std::io::BufWriter::new(out.try_clone().map_err(|e| {
            Refusal::Engine(format!("spooling the build context: {e}"))
        })?));
    let written = |e: std::io::Error| Refusal::Engine(format!("writing the build context: {e}"));
    // The first entry is always `./` (which the engine skips): the engine guesses a context's
    // compression from its first bytes, which would otherwise be a name of the client's choice
    // (`BZh...`).
    let mut first = tar::Header::new_gnu();
    first.as_old_mut().name[..2].copy_from_slice(b"./");
    first.set_entry_type(tar::EntryType::Directory);
    first.set_mode(0o755);
    first.set_size(0);
    first.set_cksum();
    builder.append(&first, std::io::empty()).map_err(written)?;
    // Every name written, the directories they imply, and the links among them.
    let mut names: BTreeSet<String> = BTreeSet::new();
    let mut implied: BTreeSet<String> = BTreeSet::new();
    let mut remembered: usize = 0;
    let mut links: BTreeSet<String> = BTreeSet::new();
    let mut files: BTreeSet<String> = BTreeSet::new();
    let mut found: Vec<Option<String>> = vec![None; wanted.len()];
    let mut archive = tar::Archive::new(reader);
    for entry in archive.entries().map_err(|e| err(&e))? {
        let mut entry = entry.map_err(|e| err(&e))?;
        if cancel.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(gone());
        }
        data_end = data_end.max(entry.raw_file_position() + entry.size());
        let raw = entry.path_bytes();
        let Ok(raw) = std::str::from_utf8(&raw).map(str::to_string) else {
            return Err(denied(format!(
                "the build context holds a name that is not UTF-8: {:?}",
                String::from_utf8_lossy(&raw)
            )));
        };
        // Go's reader cuts a long name at its first NUL (`Dockerfile/b.../..\0x` is
        // `Dockerfile` to it): a control character in a name is refused.
        if raw.contains(|c: char| c.is_control()) {
            return Err(denied(format!(
                "the build context holds the name {raw:?}, with a control character"
            )));
        }
        let path = match clean(&raw) {
            Some(p) if !raw.starts_with('/') => p,
            _ => {
                return Err(denied(format!(
                    "the build context holds {raw:?}, which leaves it"
                )));
            }
        };
        if path.is_empty() {
            continue;
        }
        // Longer names no file system takes (Linux's PATH_MAX); each name is checked against
        // every directory above it, once.
        if path.len() > MAX_CONTEXT_NAME {
            return Err(denied(format!(
                "the build context holds a name of {} bytes; at most {MAX_CONTEXT_NAME}",
                path.len()
            )));
        }
        use tar::EntryType;
        let kind = entry.header().entry_type();
        if !matches!(
            kind,
            EntryType::Regular
                | EntryType::Continuous
                | EntryType::Directory
                | EntryType::Symlink
                | EntryType::Link
        ) {
            return Err(denied(format!(
                "{path} in the build context is a {kind:?} entry: only files, directories and links"
            )));
        }
        // What the sets below hold, bounded: a context of deep names, each in a new
        // directory, made them hold every directory above each name (quadratic in its length).
        remembered += path.len();
        if remembered > MAX_CONTEXT_NAMES {
            return Err(denied(format!(
                "the build context's names, with the directories they imply, take more than {MAX_CONTEXT_NAMES} bytes"
            )));
        }
        if !names.insert(path.clone()) {
            return Err(denied(format!("{path} is in the build context twice")));
        }
        let mut parent = path.as_str();
        while let Some((up, _)) = parent.rsplit_once('/') {
            if links.contains(up) {
                return Err(denied(format!(
                    "{path} in the build context is under the link {up}: the engine would write through it"
                )));
            }
            if files.contains(up) {
                return Err(denied(format!(
                    "{path} in the build context is under the file {up}"
                )));
            }
            // Already implied: so are the directories above it, judged then (a link or file
            // named like one of them later is refused as it comes).
            if !implied.insert(up.to_string()) {
                break;
            }
            remembered += up.len();
            if remembered > MAX_CONTEXT_NAMES {
                return Err(denied(format!(
                    "the build context's names, with the directories they imply, take more than {MAX_CONTEXT_NAMES} bytes"
                )));
            }
            parent = up;
        }
        if kind != EntryType::Directory && implied.contains(&path) {
            return Err(denied(format!(
                "{path} in the build context holds entries and is not a directory"
            )));
        }
        for w in &wanted {
            if w.starts_with(&format!("{path}/")) && kind != EntryType::Directory {
                return Err(denied(format!(
                    "{path} in the build context, on the Dockerfile's path, is not a directory"
                )));
            }
            if *w == path && !matches!(kind, EntryType::Regular | EntryType::Continuous) {
                return Err(denied(format!(
                    "{path} in the build context is not a regular file"
                )));
            }
        }
        let header = entry.header();
        let mut out_header = tar::Header::new_gnu();
        out_header.set_entry_type(kind);
        out_header.set_mode(header.mode().map_err(|e| err(&e))? & 0o7777);
        out_header.set_mtime(header.mtime().unwrap_or(0));
        out_header.set_uid(header.uid().unwrap_or(0));
        out_header.set_gid(header.gid().unwrap_or(0));
        match kind {
            EntryType::Directory => {
                out_header.set_size(0);
                builder
                    .append_data(&mut out_header, &path, std::io::empty())
                    .map_err(written)?;
            }
            EntryType::Symlink => {
                let target = entry
                    .link_name_bytes()
                    .map(|t| t.into_owned())
                    .unwrap_or_default();
                let Some(target) = String::from_utf8(target)
                    .ok()
                    .filter(|t| !t.contains(|c: char| c.is_control()))
                else {
                    return Err(denied(format!(
                        "the link {path} in the build context names a target that is not UTF-8 text"
                    )));
                };
                out_header.set_size(0);
                builder
                    .append_link(&mut out_header, &path, &target)
                    .map_err(written)?;
                links.insert(path.clone());
            }
            EntryType::Link => {
                // A hard link (the docker CLI writes one for a file's second name): to a file
                // written before, by its name in regobox's model.
                let target = entry
                    .link_name_bytes()
                    .map(|t| t.into_owned())
                    .unwrap_or_default();
                let target = std::str::from_utf8(&target)
                    .ok()
                    .filter(|t| !t.starts_with('/'))
                    .and_then(clean)
                    .filter(|t| files.contains(t))
                    .ok_or_else(|| {
                        denied(format!(
                            "the hard link {path} in the build context names no file written before it"
                        ))
                    })?;
                out_header.set_size(0);
                builder
                    .append_link(&mut out_header, &path, &target)
                    .map_err(written)?;
                files.insert(path.clone());
            }
            _ => {
                let size = entry.size();
                let slot = wanted.iter().position(|w| *w == path);
                if let Some(i) = slot {
                    // Read whole or refused: a Dockerfile judged by its beginning would be run
                    // to its end.
                    if size > MAX_DOCKERFILE {
                        return Err(denied(format!(
                            "{path} is larger than {MAX_DOCKERFILE} bytes"
                        )));
                    }
                    let mut bytes = Vec::with_capacity(size as usize);
                    entry.read_to_end(&mut bytes).map_err(|e| err(&e))?;
                    let text = String::from_utf8(bytes)
                        .map_err(|_| denied(format!("{path} is not UTF-8 text")))?;
                    out_header.set_size(text.len() as u64);
                    builder
                        .append_data(&mut out_header, &path, text.as_bytes())
                        .map_err(written)?;
                    found[i] = Some(text);
                } else {
                    out_header.set_size(size);
                    builder
                        .append_data(&mut out_header, &path, &mut entry)
                        .map_err(written)?;
                }
                files.insert(path.clone());
            }
        }
    }
    let sent = ended.load(std::sync::atomic::Ordering::Relaxed);
    if data_end > sent {
        return Err(err(&format!(
            "it ends at byte {sent}, inside an entry's data (to byte {data_end})"
        )));
    }
    let text = found.into_iter().flatten().next().ok_or_else(|| {
        Refusal::BadRequest(format!(
            "the build context holds no {}",
            wanted.join(" or ")
        ))
    })?;
    // The Dockerfile the engine reads is regobox's rendering of it, under a name of regobox's
    // (the client's stays in the context, for what copies it).
    let (rendered, read) = read(&text)?;
    let rendered_name = format!(".regobox-dockerfile-{:032x}", rand::random::<u128>());
    if names.contains(&rendered_name) || implied.contains(&rendered_name) {
        return Err(denied(format!(
            "the build context holds {rendered_name}, a name regobox writes"
        )));
    }
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(tar::EntryType::Regular);
    header.set_mode(0o644);
    header.set_size(rendered.len() as u64);
    builder
        .append_data(&mut header, &rendered_name, rendered.as_bytes())
        .map_err(written)?;
    builder
        .into_inner()
        .and_then(|mut w| w.flush())
        .map_err(written)?;
    Ok((out, rendered_name, read))
}

fn json_response(status: StatusCode, value: &Value) -> Response<Body> {
    let mut response = Response::new(boxed(Full::new(Bytes::from(value.to_string() + "\n"))));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

/// The engine's answer (`what`) read whole as JSON, to be written again with [`rebuild`].
async fn engine_value<T: serde::de::DeserializeOwned>(
    response: Response<Body>,
    what: &str,
) -> Result<(hyper::http::response::Parts, T), Refusal> {
    let (parts, body) = response.into_parts();
    let bytes = body
        .collect()
        .await
        .map_err(|e| Refusal::Engine(format!("reading the {what}: {e}")))?
        .to_bytes();
    let value = serde_json::from_slice(&bytes)
        .map_err(|e| Refusal::Engine(format!("the engine's {what}: {e}")))?;
    Ok((parts, value))
}

/// The engine's list (`what`, a JSON array) with only the entries `keep` keeps, as regobox
/// writes it.
async fn only(
    response: Response<Body>,
    what: &str,
    keep: impl Fn(Value) -> Option<Value>,
) -> Result<Response<Body>, Refusal> {
    let (parts, list): (_, Vec<Value>) = engine_value(response, what).await?;
    let kept: Vec<Value> = list.into_iter().filter_map(keep).collect();
    Ok(rebuild(parts, &Value::Array(kept)))
}

/// A response with `value` as its JSON body in place of the engine's.
fn rebuild(mut parts: hyper::http::response::Parts, value: &Value) -> Response<Body> {
    let bytes = Bytes::from(value.to_string());
    parts.headers.remove(TRANSFER_ENCODING);
    parts
        .headers
        .insert(CONTENT_LENGTH, HeaderValue::from(bytes.len()));
    Response::from_parts(parts, boxed(Full::new(bytes)))
}

/// A request with regobox's serialisation of `value` as its JSON body, sent to `target`.
/// (Its headers are [`engine_headers`]'s, for [`Payload::Json`].)
fn with_json<T: Serialize>(
    parts: hyper::http::request::Parts,
    value: &T,
    target: &str,
) -> Result<Request<Body>, Refusal> {
    let bytes = Bytes::from(
        serde_json::to_vec(value).map_err(|e| Refusal::Engine(format!("serialising: {e}")))?,
    );
    retarget(Request::from_parts(parts, boxed(Full::new(bytes))), target)
}

/// `req` sent to `target` (path and query as regobox rendered them).
fn retarget(mut req: Request<Body>, target: &str) -> Result<Request<Body>, Refusal> {
    *req.uri_mut() = target
        .parse()
        .map_err(|e| Refusal::BadRequest(format!("cannot forward to {target:?}: {e}")))?;
    Ok(req)
}

/// What a list filter's value names.
#[derive(Debug, Clone, Copy)]
enum Named {
    Container,
    Image,
}

/// The instance's label among a list's label filters (the engine ANDs label filters, so whatever
/// else the client filters on, only this instance's objects remain).
fn with_instance_label(filters: &mut BTreeMap<String, Vec<String>>, instance: &str) {
    filters
        .entry("label".to_string())
        .or_default()
        .push(format!("{INSTANCE_LABEL}={instance}"));
}

/// What follows the object in `/containers/{id}/op` (None for the object itself).
fn operation(normalized: &str, prefix: &str) -> Option<String> {
    normalized
        .strip_prefix(prefix)
        .and_then(|rest| rest.split_once('/'))
        .map(|(_, op)| op.to_string())
}

/// The image id an untagged import printed (`{"status":"sha256:..."}`).
fn imported_id(tail: &[u8]) -> Option<String> {
    lines_from_the_end(tail)
        .filter_map(|v| v.get("status").and_then(Value::as_str).map(str::to_string))
        .find(|s| s.starts_with("sha256:"))
}

/// The JSON lines of the end of an engine's output stream, the last first.
fn lines_from_the_end(tail: &[u8]) -> impl Iterator<Item = Value> {
    String::from_utf8_lossy(tail)
        .lines()
        .rev()
        .filter_map(|l| serde_json::from_str::<Value>(l.trim()).ok())
        .collect::<Vec<_>>()
        .into_iter()
}

/// A line of an engine's output stream, as the engine writes it.
fn stream_line(line: &Value) -> Vec<u8> {
    format!("{line}\r\n").into_bytes()
}

/// An error line of an engine's output stream (the docker CLI fails on it, docker-py raises).
fn stream_error(message: &str) -> Vec<u8> {
    stream_line(&json!({ "errorDetail": { "message": message }, "error": message }))
}

/// A body (`what`) whose data stopped coming for `within` (`docker.idle_timeout`).
fn stalled(what: &str, within: Duration) -> Refusal {
    Refusal::Stalled(format!(
        "{what} stopped coming: nothing for docker.idle_timeout ({within:?})"
    ))
}

/// How long a build stopped before its end is waited for to commit the step it was at.
const LEFT_BUILD_WAIT: Duration = Duration::from_secs(600);

/// The most images a build's `cachefrom` names (each about 90 bytes of its query).
const MAX_CACHE_SOURCES: usize = 2000;

/// The ids of the images `all` shows to be ancestors of a recorded image (a step's image that
/// the cache gives back is the instance's if it is one: see [`Proxy::cache_sources`]).
fn ancestors_of_recorded<'a>(
    all: &'a [bollard::models::ImageSummary],
    images: &Recorded,
) -> BTreeSet<&'a str> {
    let parent: BTreeMap<&str, &str> = all
        .iter()
        .map(|i| (i.id.as_str(), i.parent_id.as_str()))
        .collect();
    let mut found = BTreeSet::new();
    for i in all.iter().filter(|i| images.contains(&i.id)) {
        let mut at = parent.get(i.id.as_str()).copied().unwrap_or("");
        while !at.is_empty() && found.insert(at) {
            at = parent.get(at).copied().unwrap_or("");
        }
    }
    found
}

/// What a build's output said it made, read line by line as it passed (see [`BuildOutput`]).
#[derive(Default)]
struct BuildSeen {
    /// The engine's `aux` ids, in order: the image each stage ended with.
    stages: Vec<String>,
    /// An error line came after the last of `stages` (the build failed in a later stage).
    failed: bool,
    /// The short ids of the ` ---> <id>` lines, in order: each step's image (a cached one, or
    /// the image a `FROM` names, too). A step's own output can write such a line as well: see
    /// [`Proxy::record_built`] for what makes one the instance's.
    steps: std::collections::VecDeque<String>,
    /// The short ids of the ` ---> Running in <id>` lines, the last [`MAX_STEPS`]: the
    /// containers the engine runs a step in (see [`Proxy::record_left_build`]).
    containers: std::collections::VecDeque<String>,
}

/// How many step lines of a build's output are kept, the last ones (a step's output can write
/// any number, before the engine's line for its image).
const MAX_STEPS: usize = 4096;

impl BuildSeen {
    fn take(&mut self) -> BuildSeen {
        std::mem::take(self)
    }

    /// One line of the engine's output.
    fn read(&mut self, line: &Value) {
        if line.get("error").is_some() || line.get("errorDetail").is_some() {
            self.failed = true;
        }
        if let Some(id) = line
            .get("aux")
            .and_then(|a| a.get("ID"))
            .and_then(Value::as_str)
            .filter(|id| full_image_id(id))
        {
            self.stages.push(id.to_string());
            self.failed = false;
        }
        let said = line
            .get("stream")
            .and_then(Value::as_str)
            .and_then(|s| s.strip_prefix(" ---> "))
            .and_then(|s| s.strip_suffix('\n'));
        let short_id =
            |h: &str| h.len() == 12 && h.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        let keep = |list: &mut std::collections::VecDeque<String>, id: &str| {
            if list.len() == MAX_STEPS {
                list.pop_front();
            }
            list.push_back(id.to_string());
        };
        match said {
            Some(h) if short_id(h) => keep(&mut self.steps, h),
            Some(said) => {
                if let Some(c) = said.strip_prefix("Running in ").filter(|c| short_id(c)) {
                    keep(&mut self.containers, c);
                }
            }
            None => {}
        }
    }

    /// The image the build made: its last stage's, unless an error came after it (the engine
    /// writes an `aux` line at the end of each stage, and a build whose last stage failed ends
    /// with the error: an attacker's finding, its first stage's image was tagged). A step's
    /// output is inside `stream` strings, never an `aux` line: nothing the build runs can forge
    /// it.
    fn built(&self) -> Option<String> {
        (!self.failed)
            .then(|| self.stages.last().cloned())
            .flatten()
    }
}

/// `sha256:` and 64 hexadecimal digits.
fn full_image_id(id: &str) -> bool {
    id.strip_prefix("sha256:")
        .is_some_and(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// A build's output from the engine, read line by line into [`BuildSeen`] as it passes to the
/// client: the images it made are the instance's (recorded by [`Proxy::record_built`], at the
/// end, or when the stream is dropped before it: a build whose client left keeps the images of
/// its finished steps). The build was asked of the engine with its steps' output: a quiet
/// build's client (`q`) gets what the engine would have written it, the image's id at the end
/// (see [`Proxy::build`]) or, on a failure, the output held back until then and the error.
struct BuildOutput {
    inner: Option<Body>,
    line: Vec<u8>,
    quiet: bool,
    /// A quiet build's output held back (its `stream` lines, the last [`MAX_QUIET_HELD`]
    /// bytes): the engine writes it before the error of a quiet build that fails.
    held: std::collections::VecDeque<Vec<u8>>,
    held_len: usize,
    seen: Arc<Mutex<BuildSeen>>,
    /// Who records what was seen if the stream is dropped before its end, and when the build
    /// began.
    recorder: Option<(Arc<Proxy>, i64)>,
}

/// How much of a quiet build's output is held back for its failure.
const MAX_QUIET_HELD: usize = 1 << 20;

/// The longest line of a build's output read (the engine writes a step's output as it comes, a
/// line per write); a longer one is passed on, and not read.
const MAX_BUILD_LINE: usize = 64 << 10;

impl BuildOutput {
    /// The lines `data` ends, read; what a quiet build's client gets of them.
    fn read(&mut self, data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut rest = data;
        while let Some(end) = rest.iter().position(|&c| c == b'\n') {
            let whole = self.line.len() + end <= MAX_BUILD_LINE;
            if whole {
                self.line.extend_from_slice(&rest[..end]);
                if let Ok(line) = serde_json::from_slice::<Value>(self.line.trim_ascii()) {
                    if let Ok(mut seen) = self.seen.lock() {
                        seen.read(&line);
                    }
                    if self.quiet {
                        if line.get("error").is_some() || line.get("errorDetail").is_some() {
                            for held in self.held.drain(..) {
                                out.extend(held);
                            }
                            self.held_len = 0;
                            out.extend(stream_line(&line));
                        } else if line.get("stream").is_some() {
                            let held = stream_line(&line);
                            self.held_len += held.len();
                            self.held.push_back(held);
                            while self.held_len > MAX_QUIET_HELD {
                                let dropped = self.held.pop_front().map_or(0, |h| h.len());
                                self.held_len -= dropped;
                            }
                        }
                    }
                }
            }
            self.line.clear();
            rest = &rest[end + 1..];
        }
        if self.line.len() + rest.len() <= MAX_BUILD_LINE {
            self.line.extend_from_slice(rest);
        } else {
            // Not read: marked so that its end is not taken for a line.
            self.line.clear();
            self.line.resize(MAX_BUILD_LINE + 1, b' ');
        }
        out
    }
}

impl hyper::body::Body for BuildOutput {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        loop {
            let Some(inner) = this.inner.as_mut() else {
                return Poll::Ready(None);
            };
            let frame = match std::task::ready!(Pin::new(inner).poll_frame(cx)) {
                Some(Ok(frame)) => frame,
                other => return Poll::Ready(other),
            };
            let Some(data) = frame.data_ref() else {
                return Poll::Ready(Some(Ok(frame)));
            };
            let out = this.read(data);
            if !this.quiet {
                return Poll::Ready(Some(Ok(frame)));
            }
            if !out.is_empty() {
                return Poll::Ready(Some(Ok(Frame::data(Bytes::from(out)))));
            }
        }
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        hyper::body::SizeHint::default()
    }
}

impl Drop for BuildOutput {
    fn drop(&mut self) {
        // Dropped before its end was recorded (the client left, the engine's stream broke):
        // the images of the steps that finished are the instance's still.
        let Some((proxy, began)) = self.recorder.take() else {
            return;
        };
        let seen = self.seen.lock().map(|mut s| s.take()).unwrap_or_default();
        if seen.stages.is_empty() && seen.steps.is_empty() && seen.containers.is_empty() {
            return;
        }
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                proxy.record_built(&seen, began).await;
                proxy.record_left_build(&seen, began).await;
            });
        }
    }
}

/// The bind sources of a container (its `HostConfig` as the engine reports it), translated
/// back to the paths regobox sees.
fn bind_sources(
    host: Option<&bollard::models::HostConfig>,
    host_paths: &[(PathBuf, PathBuf)],
) -> Vec<PathBuf> {
    let binds = host
        .and_then(|h| h.binds.as_ref())
        .into_iter()
        .flatten()
        .map(|b| b.split(':').next().unwrap_or("").to_string());
    let mounts = host
        .and_then(|h| h.mounts.as_ref())
        .into_iter()
        .flatten()
        .filter(|m| m.typ == Some(bollard::models::MountTypeEnum::BIND))
        .filter_map(|m| m.source.clone());
    binds
        .chain(mounts)
        .map(|s| container::from_host(Path::new(&s), host_paths))
        .collect()
}

/// What is done when a stream ends, before its end reaches the client; its output, if any, is
/// the stream's last piece.
type Recording = Pin<Box<dyn Future<Output = Option<Bytes>> + Send>>;

/// A body that, once read to the end, runs what `f` makes of its last bytes before it says so:
/// the client sees the end of a pull only once the image is recorded as the application's.
struct OnEnd {
    inner: Body,
    tail: Vec<u8>,
    /// In a mutex only to be `Sync` (it is reached through `&mut`, never locked).
    f: Option<Mutex<Finish>>,
    recording: Option<Mutex<Recording>>,
    /// The recording has run: nothing more comes.
    ended: bool,
    /// What is read of the stream, and recorded, if the client goes away before its end.
    finish: Unread,
}

/// How long a build's stream is still read for its end once its client has gone (see
/// [`OnEnd::finishing_within`]): its last line to its end is a moment; a build left in the
/// middle is stopped this much later.
const BUILD_END_GRACE: Duration = Duration::from_secs(2);

/// How much of a stream whose client has gone is still read for its recording.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Unread {
    /// None: the stream goes with its client, unrecorded (unless its recording had begun).
    Nothing,
    /// All of it (see [`OnEnd::finishing`]).
    All,
    /// What comes within this (see [`OnEnd::finishing_within`]); past it, nothing is recorded.
    Within(Duration),
}

type Finish = Box<dyn FnOnce(&[u8]) -> Recording + Send>;

impl OnEnd {
    fn new(inner: Body, f: impl FnOnce(&[u8]) -> Recording + Send + 'static) -> Self {
        OnEnd {
            inner,
            tail: Vec::new(),
            f: Some(Mutex::new(Box::new(f))),
            recording: None,
            ended: false,
            finish: Unread::Nothing,
        }
    }

    /// Read to its end and recorded even if the client goes away first (by a task of its own):
    /// an import is the engine's once its body is sent, a pull once asked for, and an image
    /// made but neither tagged
    /// nor recorded would be no one's, invisible to the application, never removed (an
    /// attacker's finding, nineteenth session: a client that hung up on the image's id line).
    fn finishing(mut self) -> Self {
        self.finish = Unread::All;
        self
    }

    /// Read to its end and recorded if the client goes away and the end comes within `grace`:
    /// a build, whose engine stops when its stream is no longer read (a build left running
    /// without a client would be bounded by nothing), but whose client may leave on its last
    /// line, before the stream's end was read: its image was left untagged (the last note's,
    /// twentieth session: 2 builds of 8).
    fn finishing_within(mut self, grace: Duration) -> Self {
        self.finish = Unread::Within(grace);
        self
    }
}

impl Drop for OnEnd {
    fn drop(&mut self) {
        // A recording begun (the stream has ended) is finished whatever the client does: a
        // build's tags are made under the lock that keeps the images it read, and a client that
        // left as they were being made left its image untagged.
        if self.ended || (self.finish == Unread::Nothing && self.recording.is_none()) {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let recording = self.recording.take().and_then(|r| r.into_inner().ok());
        let f = self.f.take().and_then(|f| f.into_inner().ok());
        let mut inner = std::mem::replace(
            &mut self.inner,
            boxed(http_body_util::Empty::<Bytes>::new()),
        );
        let mut tail = std::mem::take(&mut self.tail);
        let finish = self.finish;
        runtime.spawn(async move {
            let recording = match (recording, f) {
                (Some(recording), _) => recording,
                (None, Some(f)) => {
                    let read = async {
                        loop {
                            match inner.frame().await {
                                Some(Ok(frame)) => {
                                    if let Some(data) = frame.data_ref() {
                                        keep_tail(&mut tail, data);
                                    }
                                }
                                Some(Err(_)) => return false,
                                None => return true,
                            }
                        }
                    };
                    let ended = match finish {
                        Unread::All => read.await,
                        Unread::Within(grace) => {
                            tokio::time::timeout(grace, read).await.unwrap_or(false)
                        }
                        Unread::Nothing => false,
                    };
                    // A stream cut short is finished as it was: the recording reads what came.
                    if !ended && finish != Unread::All {
                        return;
                    }
                    f(&tail)
                }
                (None, None) => return,
            };
            let _ = recording.await;
        });
    }
}

/// `data` added to `tail`, which keeps the last [`TAIL`] bytes.
fn keep_tail(tail: &mut Vec<u8>, data: &[u8]) {
    tail.extend_from_slice(data);
    if tail.len() > TAIL {
        let cut = tail.len() - TAIL;
        tail.drain(..cut);
    }
}

const TAIL: usize = 4096;

impl hyper::body::Body for OnEnd {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if let Some(recording) = this.recording.as_mut() {
            let Ok(recording) = recording.get_mut() else {
                return Poll::Ready(None);
            };
            return match recording.as_mut().poll(cx) {
                Poll::Ready(last) => {
                    this.recording = None;
                    this.ended = true;
                    Poll::Ready(last.map(|b| Ok(Frame::data(b))))
                }
                Poll::Pending => Poll::Pending,
            };
        }
        if this.ended {
            return Poll::Ready(None);
        }
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    keep_tail(&mut this.tail, data);
                }
            }
            Poll::Ready(None) => {
                if let Some(f) = this.f.take().and_then(|f| f.into_inner().ok()) {
                    this.recording = Some(Mutex::new(f(&this.tail)));
                    return self.poll_frame(cx);
                }
            }
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.ended && self.recording.is_none()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// How the record of the instance's tags holds the tag `reference` made on the image `id`: the
/// tag as the engine reports it (`RepoTags`), then the id. A tag is the instance's only on the
/// image it made it on: moved by the host, or removed and made again elsewhere, it is the
/// host's.
pub fn owned_tag(reference: &str, id: &str) -> String {
    format!("{} {id}", image::familiar(reference))
}

/// The repository a tag or digest reference names, as the engine reports it (`busybox` for
/// `docker.io/library/busybox:1` and `busybox@sha256:...`).
fn repository(reference: &str) -> String {
    let familiar = image::familiar(reference);
    let name = familiar.split('@').next().unwrap_or(&familiar);
    image::split_tag(name).0.to_string()
}

/// The tag `name` names among the image's `tags` (the engine's familiar spellings), with its tag
/// written out (`:latest` when none was given): what an image remove is forwarded as. None when
/// `name` was read as an id or a digest.
fn removal_target(name: &str, tags: &[String]) -> Option<String> {
    if name.contains('@') {
        return None;
    }
    let familiar = image::familiar(name);
    let tag = tags.iter().find(|t| **t == familiar)?;
    // In full: no spelling of it is also one of an id (`sha256:<prefix>` is the tag of a
    // repository `sha256` too).
    let first = tag.split('/').next().unwrap_or(tag);
    let registry = tag.contains('/') && (first.contains(['.', ':']) || first == "localhost");
    Some(match (registry, tag.contains('/')) {
        (true, _) => tag.clone(),
        (false, true) => format!("docker.io/{tag}"),
        (false, false) => format!("docker.io/library/{tag}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stream that sends `line`, then ends `after` later; `dropped` is set when it is
    /// dropped (the engine's connection closed: a build stopped).
    fn stream_ending_after(
        line: &'static str,
        after: Duration,
        dropped: Arc<std::sync::atomic::AtomicBool>,
    ) -> Body {
        struct Guard(Arc<std::sync::atomic::AtomicBool>);
        impl Drop for Guard {
            fn drop(&mut self) {
                self.0.store(true, std::sync::atomic::Ordering::SeqCst);
            }
        }
        let stream =
            futures_util::stream::unfold((0, Guard(dropped)), move |(step, g)| async move {
                match step {
                    0 => Some((Ok::<_, BoxError>(Frame::data(Bytes::from(line))), (1, g))),
                    _ => {
                        tokio::time::sleep(after).await;
                        None
                    }
                }
            });
        boxed(http_body_util::StreamBody::new(stream))
    }

    /// What a build's recording is given when its client leaves after `line` and before the
    /// stream's end, which comes `after` later (None: not run); and whether the stream was
    /// dropped by then.
    async fn recorded_when_the_client_leaves(
        after: Duration,
        grace: Option<Duration>,
    ) -> (Option<Vec<u8>>, bool) {
        let dropped = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let inner =
            stream_ending_after("{\"aux\":{\"ID\":\"sha256:ab\"}}\n", after, dropped.clone());
        let mut body = OnEnd::new(inner, move |tail: &[u8]| {
            let _ = tx.send(tail.to_vec());
            Box::pin(async { None }) as Recording
        });
        if let Some(grace) = grace {
            body = body.finishing_within(grace);
        }
        // The client reads the last line and goes.
        let frame = body.frame().await.unwrap().unwrap();
        assert!(frame.is_data());
        drop(body);
        tokio::time::sleep(after + Duration::from_millis(300)).await;
        (
            rx.try_recv().ok(),
            dropped.load(std::sync::atomic::Ordering::SeqCst),
        )
    }

    /// The last note's (twentieth session): a build whose client left on its last line, before
    /// the stream's end was read, was left untagged. Its end, coming within the grace, is read
    /// and recorded; a build left in the middle is stopped once the grace is over, unrecorded.
    #[tokio::test]
    async fn a_build_whose_client_leaves_on_its_last_line_is_recorded() {
        let (recorded, _) =
            recorded_when_the_client_leaves(Duration::from_millis(50), Some(BUILD_END_GRACE)).await;
        let tail = recorded.expect("the end came within the grace and nothing was recorded");
        assert!(String::from_utf8_lossy(&tail).contains("sha256:ab"));
        // Past the grace: stopped (its stream dropped), nothing recorded.
        let (recorded, dropped) = recorded_when_the_client_leaves(
            Duration::from_millis(1500),
            Some(Duration::from_millis(200)),
        )
        .await;
        assert_eq!(recorded, None);
        assert!(dropped);
        // A stream without the grace: dropped at once with its client.
        let (recorded, dropped) =
            recorded_when_the_client_leaves(Duration::from_millis(50), None).await;
        assert_eq!(recorded, None);
        assert!(dropped);
    }

    #[test]
    fn an_image_remove_is_forwarded_by_the_tag_written_out_in_full_or_the_id() {
        let tags = vec!["816ac826f8e2:latest".to_string(), "lab/app:1".to_string()];
        let target = |name: &str, tags: &[String]| removal_target(name, tags);
        assert_eq!(
            target("816ac826f8e2", &tags).as_deref(),
            Some("docker.io/library/816ac826f8e2:latest")
        );
        assert_eq!(
            target("docker.io/lab/app:1", &tags).as_deref(),
            Some("docker.io/lab/app:1")
        );
        assert_eq!(target("lab/app", &tags), None);
        assert_eq!(target("816ac8", &tags), None);
        assert_eq!(target("lab/app@sha256:abc", &tags), None);
        let sha = vec!["sha256:e29740426826".to_string()];
        assert_eq!(
            target("sha256:e29740426826", &sha).as_deref(),
            Some("docker.io/library/sha256:e29740426826")
        );
        let registry = vec!["127.0.0.1:5000/x:latest".to_string()];
        assert_eq!(
            target("127.0.0.1:5000/x", &registry).as_deref(),
            Some("127.0.0.1:5000/x:latest")
        );
    }

    #[test]
    fn list_queries_get_the_instance_filter() {
        let mut filters = query::filters(None, query::CONTAINER_FILTERS).unwrap();
        with_instance_label(&mut filters, "i1");
        assert_eq!(
            serde_json::to_value(&filters).unwrap(),
            json!({"label": ["regobox.instance=i1"]})
        );
        // Both forms the engine reads, rendered in one.
        let mut filters = query::filters(
            Some(r#"{"label":{"app=x":true},"status":["running"]}"#),
            query::CONTAINER_FILTERS,
        )
        .unwrap();
        with_instance_label(&mut filters, "i1");
        assert_eq!(
            serde_json::to_value(&filters).unwrap(),
            json!({"label": ["app=x", "regobox.instance=i1"], "status": ["running"]})
        );
        for bad in [
            "notjson",
            r#"{"lab":["x"]}"#,
            r#"{"label":{"x":false}}"#,
            r#"{"label":[1]}"#,
            r#"{"label":"x"}"#,
        ] {
            assert!(
                query::filters(Some(bad), query::CONTAINER_FILTERS).is_err(),
                "{bad}"
            );
        }
        assert!(query::filters(Some(r#"{"before":["x"]}"#), query::NETWORK_FILTERS).is_err());
    }

    #[test]
    fn a_builds_image_is_read_from_the_engines_lines_alone() {
        let read = |text: &str| {
            let mut seen = BuildSeen::default();
            for line in text.split("\r\n").filter(|l| !l.is_empty()) {
                seen.read(&serde_json::from_str(line).unwrap());
            }
            seen
        };
        let id = format!("sha256:{}", "ab".repeat(32));
        let full = format!(
            "{{\"stream\":\"Step 2/2 : RUN echo {id}\"}}\r\n{{\"stream\":\"{id}\\n\"}}\r\n{{\"stream\":\" ---> 0123456789ab\\n\"}}\r\n{{\"aux\":{{\"ID\":\"{id}\"}}}}\r\n{{\"stream\":\"Successfully built abababababab\\n\"}}\r\n"
        );
        let seen = read(&full);
        assert_eq!(seen.built(), Some(id.clone()));
        assert_eq!(seen.steps, ["0123456789ab"]);
        // A step's output that looks like a quiet build's last line is not an id.
        let forged =
            format!("{{\"stream\":\"{id}\\n\"}}\r\n{{\"errorDetail\":{{}},\"error\":\"x\"}}\r\n");
        assert_eq!(read(&forged).built(), None);
        assert_eq!(read("{\"aux\":{\"ID\":\"sha256:12\"}}\r\n").built(), None);
        // A stage's aux line, then the last stage's failure.
        let failed = format!(
            "{{\"aux\":{{\"ID\":\"{id}\"}}}}\r\n{{\"stream\":\"Step 3/4 : RUN exit 1\\n\"}}\r\n{{\"errorDetail\":{{\"code\":1,\"message\":\"x\"}},\"error\":\"x\"}}\r\n"
        );
        let seen = read(&failed);
        assert_eq!(seen.built(), None);
        assert_eq!(seen.stages, std::slice::from_ref(&id));
        // A step that writes more step lines than are kept does not push the engine's out.
        let mut many = String::new();
        for i in 0..MAX_STEPS + 10 {
            many.push_str(&format!("{{\"stream\":\" ---> {i:012x}\\n\"}}\r\n"));
        }
        many.push_str("{\"stream\":\" ---> 0123456789ab\\n\"}\r\n");
        let seen = read(&many);
        assert_eq!(seen.steps.len(), MAX_STEPS);
        assert_eq!(seen.steps.back().map(String::as_str), Some("0123456789ab"));
        // Not a step's line: another length, upper case, more on the line.
        for line in [
            " ---> 0123456789a\\n",
            " ---> 0123456789AB\\n",
            " ---> 0123456789ab \\n",
            "x ---> 0123456789ab\\n",
        ] {
            assert!(
                read(&format!("{{\"stream\":\"{line}\"}}\r\n"))
                    .steps
                    .is_empty(),
                "{line}"
            );
        }
    }

    #[test]
    fn a_builds_output_is_read_across_pieces_and_a_quiet_client_gets_it_only_on_a_failure() {
        let seen: Arc<Mutex<BuildSeen>> = Arc::default();
        let mut out = BuildOutput {
            inner: None,
            line: Vec::new(),
            quiet: true,
            held: Default::default(),
            held_len: 0,
            seen: seen.clone(),
            recorder: None,
        };
        let text = "{\"stream\":\" ---> 0123456789ab\\n\"}\r\n{\"errorDetail\":{\"message\":\"no\"},\"error\":\"no\"}\r\n";
        let mut said = Vec::new();
        for piece in text.as_bytes().chunks(5) {
            said.extend(out.read(piece));
        }
        assert_eq!(seen.lock().unwrap().steps, ["0123456789ab"]);
        assert!(seen.lock().unwrap().failed);
        // The output held back, then the error, as the engine writes a quiet build's failure.
        let said: Vec<Value> = String::from_utf8(said)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(said.len(), 2, "{said:?}");
        assert_eq!(said[0]["stream"], " ---> 0123456789ab\n");
        assert_eq!(said[1]["error"], "no");
        // A line over the bound is passed on, not read, and its end not taken for a line.
        let long = format!("{{\"stream\":\"{}\"}}", "x".repeat(MAX_BUILD_LINE));
        out.read(long.as_bytes());
        out.read(b"\r\n{\"stream\":\" ---> 00000000000a\\n\"}\r\n");
        assert_eq!(seen.lock().unwrap().steps, ["0123456789ab", "00000000000a"]);
    }

    #[test]
    fn registry_credentials_are_rendered_by_regobox_or_refused() {
        use base64::Engine as _;
        use base64::engine::general_purpose::{STANDARD, URL_SAFE};
        assert!(registry_auth(None).unwrap().is_none());
        let header = |json: &str| HeaderValue::from_str(&URL_SAFE.encode(json)).unwrap();
        let rendered =
            registry_auth(Some(&header(r#"{"username":"u","password":"p?>"}"#))).unwrap();
        let decoded = URL_SAFE.decode(rendered.unwrap().as_bytes()).unwrap();
        assert_eq!(decoded, br#"{"username":"u","password":"p?>"}"#);
        // An empty object (the docker CLI's when it has none) stays one.
        let rendered = registry_auth(Some(&header("{}"))).unwrap().unwrap();
        assert_eq!(URL_SAFE.decode(rendered.as_bytes()).unwrap(), b"{}");
        for bad in [
            header(r#"{"Username":"u"}"#),
            header(r#"{"username":"u","username":"v"}"#),
            header(r#"{"username":"u","extra":1}"#),
            header(r#"{"username":1}"#),
            header("[]"),
            HeaderValue::from_static("not base64!"),
            // Standard base64 where the engine reads base64url: `+` and `/` differ.
            HeaderValue::from_str(&STANDARD.encode(r#"{"password":"??>>"}"#)).unwrap(),
        ] {
            assert!(
                matches!(registry_auth(Some(&bad)), Err(Refusal::BadRequest(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn engine_headers_are_regoboxs_alone() {
        let h = engine_headers(Payload::Tar(None), false, None);
        assert_eq!(h.len(), 2);
        assert_eq!(h[CONTENT_TYPE], "application/x-tar");
        let h = engine_headers(Payload::Tar(Some(5)), true, None);
        assert_eq!(h[CONTENT_LENGTH], "5");
        assert_eq!(h[UPGRADE], "tcp");
        let h = engine_headers(Payload::Empty, false, None);
        assert_eq!(h.len(), 1);
        assert_eq!(h[HOST], "docker");
    }

    #[test]
    fn image_references() {
        assert_eq!(
            imported_id(b"{\"status\":\"sha256:abc\"}\r\n").as_deref(),
            Some("sha256:abc")
        );
    }
}

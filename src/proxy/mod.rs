//! TLS on 80/443 and the reverse proxy to the application (what nginx did in such images).
//!
//! - [`tls`]: the certificate (files reloaded live, self-signed kept on the volume, or ACME via
//!   [`acme`]), one certificate whatever the SNI.
//! - this module: the listeners and connections: TLS handshake with a deadline, HTTP/2 or
//!   HTTP/1.1 by ALPN, header, idle and send deadlines, the caps on connections to the
//!   application, graceful stop; [`framing`] follows HTTP/1.1 requests, [`frames`] HTTP/2's.
//! - [`forward`]: one request: redirect to https, ACME challenges, static directories
//!   ([`files`]), 503 while starting or in maintenance, forwarded headers, streaming both ways,
//!   upgrades, 502 when the application does not answer, the access log.
//!
//! Started before PostgreSQL and the services (so it answers 503 during start-up), and stopped
//! first: it stops accepting, lets in-flight requests finish within `proxy.grace`, then the
//! services are stopped.

pub mod access;
pub mod acme;
pub mod clock;
pub mod coalesce;
pub mod cork;
pub mod files;
pub mod forward;
pub mod frames;
pub mod framing;
pub mod landing;
pub mod linger;
pub mod net;
pub mod progress;
pub mod sentry;
pub mod tls;
pub mod tunnel;
pub mod upstream;

use std::cell::Cell;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full, combinators::BoxBody};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{Config, ProxyConfig};
use crate::supervisor::status::Board;
use crate::volumes::Layout;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// Every body the proxy sends, whatever its source.
pub type Body = BoxBody<Bytes, BoxError>;

pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).map_err(|n| match n {}).boxed()
}

pub fn empty() -> Body {
    Empty::new().map_err(|n| match n {}).boxed()
}

/// What every connection shares.
pub struct Shared {
    pub config: ProxyConfig,
    /// This worker's connections to the application.
    pub pool: Arc<upstream::Pool>,
    pub board: Arc<Board>,
    pub challenges: Arc<acme::Challenges>,
    pub trusted: Vec<net::Cidr>,
    pub tracker: TaskTracker,
    pub force: CancellationToken,
    /// No application is configured (no service, `proxy.upstream` left at its default): the
    /// built-in landing page answers instead.
    pub landing: Option<Arc<landing::Facts>>,
    /// For the https listener's connections.
    pub tls: Option<TlsAcceptor>,
    pub dispatch: Arc<Dispatch>,
    /// This worker's index in `dispatch`.
    pub me: usize,
    /// Connections to the application held by requests, all workers together (see [`Lease`]).
    pub caps: Arc<Caps>,
    /// Client connections open, overall and by address (`proxy.max_connections...`).
    pub clients: Arc<Clients>,
    pub shutdown: CancellationToken,
}

/// The running proxy.
pub struct Proxy {
    /// The worker threads, joined at stop (their last access lines are written by then).
    threads: std::sync::Mutex<Vec<std::thread::JoinHandle<()>>>,
    shutdown: CancellationToken,
    force: CancellationToken,
    tracker: TaskTracker,
    grace: Duration,
    background: CancellationToken,
}

/// Bind `listen:port`; the error names the key to change.
fn bind(listen: &str, port: u16, key: &str) -> anyhow::Result<std::net::TcpListener> {
    let ip: IpAddr = listen
        .parse()
        .with_context(|| format!("proxy.listen `{listen}`"))?;
    let addr = SocketAddr::new(ip, port);
    let explain = |e: std::io::Error| {
        if e.kind() == std::io::ErrorKind::PermissionDenied {
            anyhow::anyhow!(
                "cannot listen on {addr} ({key} = {port}): permission denied. Ports below 1024 need root or CAP_NET_BIND_SERVICE: set {key} to 1024 or above and publish it (e.g. -p {port}:8{port:03}), or grant the capability"
            )
        } else {
            anyhow::anyhow!("cannot listen on {addr} ({key} = {port}): {e}")
        }
    };
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into()).map_err(explain)?;
    socket.listen(1024).map_err(explain)?;
    Ok(socket.into())
}

impl Proxy {
    /// Bind the listeners, set up the certificate and serve; `None` when `proxy.enabled` is
    /// false. `status` gets what `/status` shows under `components.proxy`.
    pub async fn start(
        config: &Config,
        layout: &Layout,
        board: Arc<Board>,
        status: watch::Sender<Value>,
    ) -> anyhow::Result<Option<Proxy>> {
        let p = &config.proxy;
        if !p.enabled {
            status.send_replace(json!({"state": "disabled"}));
            return Ok(None);
        }
        let mut http = if p.http_port != 0 {
            Some(bind(&p.listen, p.http_port, "proxy.http_port")?)
        } else {
            None
        };
        let mut https = if p.https_port != 0 {
            Some(bind(&p.listen, p.https_port, "proxy.https_port")?)
        } else {
            None
        };

        let background = CancellationToken::new();
        let challenges = Arc::new(acme::Challenges::default());
        let (cert_tx, mut cert_rx) = watch::channel(None);
        let tls_dir = tls::tls_dir(&layout.secrets)?;
        let acceptor = if https.is_some() || !p.acme.directory.is_empty() {
            let first = if !p.tls.cert.as_os_str().is_empty() {
                tls::load_files(&p.tls.cert, &p.tls.key)?
            } else {
                tls::self_signed(&tls_dir, &p.hostnames).context("the self-signed certificate")?
            };
            let certs = Arc::new(tls::Certificates {
                resolver: tls::Resolver::new(first.key.clone()),
                status: cert_tx,
            });
            certs.install(first);
            if !p.tls.cert.as_os_str().is_empty() {
                tokio::spawn(tls::watch_files(
                    certs.clone(),
                    p.tls.cert.clone(),
                    p.tls.key.clone(),
                    p.tls.reload_interval,
                    background.clone(),
                ));
            }
            if !p.acme.directory.is_empty() {
                let hostnames = if p.acme.hostnames.is_empty() {
                    p.hostnames.clone()
                } else {
                    p.acme.hostnames.clone()
                };
                tokio::spawn(acme::run(
                    p.acme.clone(),
                    hostnames,
                    tls_dir.clone(),
                    certs.clone(),
                    challenges.clone(),
                    background.clone(),
                ));
            }
            // The server picks the suite: AES-128-GCM with SHA-256 first (as strong in practice,
            // and its key schedule runs on the CPU's SHA extensions where SHA-384's does not).
            let mut provider = rustls::crypto::ring::default_provider();
            provider.cipher_suites.sort_by_key(|s| {
                use rustls::CipherSuite::*;
                match s.suite() {
                    TLS13_AES_128_GCM_SHA256 => 0,
                    TLS13_CHACHA20_POLY1305_SHA256 => 1,
                    TLS13_AES_256_GCM_SHA384 => 2,
                    _ => 3,
                }
            });
            let mut server = rustls::ServerConfig::builder_with_provider(Arc::new(provider))
                .with_safe_default_protocol_versions()?
                .with_no_client_auth()
                .with_cert_resolver(certs.resolver.clone());
            server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
            server.ignore_client_order = true;
            server.ticketer = rustls::crypto::ring::Ticketer::new()?;
            Some(TlsAcceptor::from(Arc::new(server)))
        } else {
            None
        };

        let shutdown = CancellationToken::new();
        let force = CancellationToken::new();
        let tracker = TaskTracker::new();
        let upstream: hyper::Uri = p.upstream.parse().context("proxy.upstream")?;
        let trusted: Vec<net::Cidr> = p
            .trusted_proxies
            .iter()
            .filter_map(|t| net::Cidr::parse(t))
            .collect();
        let mut described = json!({
            "state": "up",
            "upstream": p.upstream,
        });
        if let Some(l) = &http {
            described["http"] = json!(l.local_addr()?.to_string());
        }
        if let Some(l) = &https {
            described["https"] = json!(l.local_addr()?.to_string());
        }
        // Thread per core, as nginx's workers: each thread runs its own event loop and keeps its
        // own pool of connections to the application, so a request never hops between threads;
        // the first one accepts and hands connections out (see `Dispatch`).
        let workers = if p.workers == 0 {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        } else {
            p.workers
        };
        // No service to supervise and no upstream of its own: nothing to proxy to.
        let landing = (config.services.is_empty()
            && p.upstream == crate::config::ProxyConfig::default().upstream)
            .then(|| Arc::new(landing::Facts::of(config)));
        let (senders, receivers): (Vec<_>, Vec<_>) = (0..workers)
            .map(|_| tokio::sync::mpsc::unbounded_channel::<Handoff>())
            .unzip();
        let mut receivers = receivers.into_iter();
        // What the open files limit allows (see `fit_open_files`).
        let mut fitted = p.clone();
        let lowered = fit_open_files(&mut fitted, raise_open_files(), workers);
        if !lowered.is_empty() {
            tracing::warn!(lowered = %lowered.join(", "), "proxy: the open files limit is low; caps lowered to fit it (raise the container's hard limit: docker run --ulimit nofile=...)");
        }
        let p = &fitted;
        let caps = Arc::new(Caps::new(p));
        let clients = Arc::new(Clients::new(p));
        let dispatch = Arc::new(Dispatch {
            open: (0..workers).map(|_| AtomicUsize::new(0)).collect(),
            workers: senders,
        });
        // Static directories resolved once, here: what a request opens must be inside the
        // directory as it was at start (the application may own a directory above it and
        // replace it with a link to `/`).
        let mut p = p.clone();
        for s in &mut p.statics {
            match std::fs::canonicalize(&s.dir) {
                Ok(dir) => s.dir = dir,
                Err(e) => {
                    tracing::warn!(dir = %s.dir.display(), error = %e, "a static directory cannot be resolved; it answers 404 until regobox starts again")
                }
            }
        }
        let p = &p;
        let mut threads = Vec::new();
        for i in 0..workers {
            // The first worker accepts for all (see `Dispatch`).
            let (http, https) = (http.take(), https.take());
            let mut handoffs = receivers.next().expect("one receiver per worker");
            let dispatch = dispatch.clone();
            let (caps, clients) = (caps.clone(), clients.clone());
            let acceptor = acceptor.clone();
            let (config, upstream, trusted) = (p.clone(), upstream.clone(), trusted.clone());
            let (board, challenges, landing) = (board.clone(), challenges.clone(), landing.clone());
            let (shutdown, force, tracker) = (shutdown.clone(), force.clone(), tracker.clone());
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("starting a proxy worker")?;
            let handle = std::thread::Builder::new()
                .name(format!("proxy-{i}"))
                .spawn(move || {
                    runtime.block_on(async move {
                        let shared = Arc::new(Shared {
                            pool: upstream::Pool::new(
                                &upstream,
                                config.upstream_connect_timeout,
                                config.upstream_keepalive,
                            ),
                            config,
                            board,
                            challenges,
                            trusted,
                            tracker: tracker.clone(),
                            force: force.clone(),
                            landing,
                            tls: acceptor,
                            dispatch,
                            me: i,
                            caps,
                            clients,
                            shutdown: shutdown.clone(),
                        });
                        let mut loops = tokio::task::JoinSet::new();
                        for (listener, https) in [(http, false), (https, true)] {
                            let Some(listener) = listener else { continue };
                            match TcpListener::from_std(listener) {
                                Ok(l) => {
                                    loops.spawn(accept(l, https, shared.clone()));
                                }
                                Err(e) => tracing::error!(error = %e, "proxy worker: listener"),
                            }
                        }
                        // Connections the accepting worker hands over.
                        let (receiving, stop) = (shared.clone(), shutdown.clone());
                        loops.spawn(async move {
                            loop {
                                let h = tokio::select! {
                                    h = handoffs.recv() => match h {
                                        Some(h) => h,
                                        None => return,
                                    },
                                    _ = stop.cancelled() => return,
                                };
                                match TcpStream::from_std(h.stream) {
                                    Ok(stream) => serve(&receiving, stream, h.peer, h.https, h.slot),
                                    Err(e) => {
                                        receiving.dispatch.closed(receiving.me);
                                        tracing::warn!(error = %e, "proxy worker: a handed-over connection");
                                    }
                                }
                            }
                        });
                        let pool = shared.pool.clone();
                        let flusher = tokio::spawn(async move {
                            let mut idle = Idle::default();
                            loop {
                                tokio::time::sleep(Duration::from_millis(250)).await;
                                access::flush();
                                pool.sweep();
                                idle.tick();
                            }
                        });
                        while loops.join_next().await.is_some() {}
                        // Stopping: in-flight connections finish on this thread.
                        tokio::select! {
                            _ = tracker.wait() => {}
                            _ = force.cancelled() => {}
                        }
                        flusher.abort();
                    });
                    // The connections still open at a forced stop go with the runtime; their
                    // requests' access lines are written after that.
                    drop(runtime);
                    access::flush();
                })
                .context("starting a proxy worker thread")?;
            threads.push(handle);
        }
        tracing::info!(http = %described["http"], https = %described["https"], upstream = %p.upstream, "proxy listening");
        status.send_replace(described);
        // The certificate's details follow it into the status.
        let bg = background.clone();
        tokio::spawn(async move {
            loop {
                let info = cert_rx.borrow_and_update().clone();
                status.send_modify(|s| {
                    s["certificate"] = info.as_ref().map(tls::Info::to_json).unwrap_or(Value::Null)
                });
                tokio::select! {
                    r = cert_rx.changed() => if r.is_err() { return },
                    _ = bg.cancelled() => return,
                }
            }
        });
        Ok(Some(Proxy {
            threads: std::sync::Mutex::new(threads),
            shutdown,
            force,
            tracker,
            grace: p.grace,
            background,
        }))
    }

    /// Stop accepting, let in-flight requests finish (at most `proxy.grace`, less if `force`
    /// fires), then close what is left. Idempotent.
    pub async fn stop(&self, force: impl std::future::Future<Output = ()>) {
        if self.shutdown.is_cancelled() {
            return;
        }
        self.shutdown.cancel();
        self.tracker.close();
        let started = Instant::now();
        tokio::select! {
            _ = self.tracker.wait() => {}
            _ = tokio::time::sleep(self.grace) => {
                tracing::warn!(open = self.tracker.len(), "proxy: connections still busy after proxy.grace; closing them");
            }
            _ = force => {}
        }
        self.force.cancel();
        self.background.cancel();
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|e| e.into_inner()));
        let joined = tokio::task::spawn_blocking(move || {
            for t in threads {
                let _ = t.join();
            }
        });
        let _ = tokio::time::timeout(Duration::from_secs(2), joined).await;
        tracing::info!(
            elapsed_ms = started.elapsed().as_millis() as u64,
            "proxy stopped"
        );
    }
}

async fn accept(listener: TcpListener, https: bool, shared: Arc<Shared>) {
    loop {
        // At `proxy.max_connections`, no more are taken until one ends: those beyond wait in
        // the kernel's backlog, and the descriptors left serve the connections open.
        while shared.clients.full() {
            if let Some(left_out) = AT_MAX_CONNECTIONS.should_log() {
                tracing::warn!(
                    max = shared.clients.max,
                    similar_left_out = left_out,
                    "proxy: at proxy.max_connections; new connections wait until one ends"
                );
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(10)) => {}
                _ = shared.shutdown.cancelled() => return,
            }
        }
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // Out of descriptors, typically: breathe, then go on (a line per interval).
                    if let Some(left_out) = ACCEPT_FAILURES.should_log() {
                        tracing::warn!(error = %e, similar_left_out = left_out, "proxy: accept failed");
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shared.shutdown.cancelled() => return,
        };
        let Some(slot) = shared.clients.open(peer.ip()) else {
            // One address's many connections (`proxy.max_connections_per_address`): closed at
            // once, at most a line per interval.
            if let Some(left_out) = AT_MAX_PER_ADDRESS.should_log() {
                tracing::warn!(peer = %peer.ip(), max = shared.clients.per_address, similar_left_out = left_out, "proxy: a client address at proxy.max_connections_per_address; its new connection closed");
            }
            continue;
        };
        let _ = stream.set_nodelay(true);
        let to = shared.dispatch.choose();
        if to == shared.me {
            serve(&shared, stream, peer, https, slot);
            continue;
        }
        let handed = stream
            .into_std()
            .map_err(|e| e.to_string())
            .and_then(|stream| {
                shared.dispatch.workers[to]
                    .send(Handoff {
                        stream,
                        peer,
                        https,
                        slot,
                    })
                    .map_err(|_| "the worker has stopped".to_string())
            });
        if let Err(e) = handed {
            shared.dispatch.closed(to);
            tracing::warn!(error = %e, "proxy: handing a connection over");
        }
    }
}

static ACCEPT_FAILURES: forward::RateLimit = forward::RateLimit::new();
static AT_MAX_CONNECTIONS: forward::RateLimit = forward::RateLimit::new();
static AT_MAX_PER_ADDRESS: forward::RateLimit = forward::RateLimit::new();

/// Serve an accepted connection on this worker (counted in [`Dispatch`] until it ends, and in
/// [`Clients`] by its `slot`).
fn serve(shared: &Arc<Shared>, stream: TcpStream, peer: SocketAddr, https: bool, slot: ClientSlot) {
    let s = shared.clone();
    shared.tracker.spawn(async move {
        // Each poll of the connection's task reads the clock once (see `clock`).
        let mut conn = std::pin::pin!(connection(stream, peer, https, s.clone(), slot));
        std::future::poll_fn(|cx| {
            let _turn = clock::turn();
            conn.as_mut().poll(cx)
        })
        .await;
        s.dispatch.closed(s.me);
        count_release();
    });
}

/// Where accepted connections go: the first worker accepts them all and hands each to the worker
/// with the fewest open connections (itself included). The kernel's spreading over
/// `SO_REUSEPORT` sockets is by a hash of the addresses, blind to load: 65/35 shares of 32
/// connections were seen, and the busier worker's requests waited longer.
pub struct Dispatch {
    open: Vec<AtomicUsize>,
    workers: Vec<tokio::sync::mpsc::UnboundedSender<Handoff>>,
}

pub struct Handoff {
    stream: std::net::TcpStream,
    peer: SocketAddr,
    https: bool,
    slot: ClientSlot,
}

/// The open files limit regobox may use: the soft one raised to the hard one (Docker gives a
/// container a soft limit of 1024, and each proxied request holds two descriptors: one client
/// holding 1 100 idle connections left none for the application's connections, and every
/// request failed). Children get the soft limit regobox started with ([`crate::process`]).
/// Returns the soft limit now.
fn raise_open_files() -> u64 {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return 1024;
    };
    // The kernel's own ceiling (`fs.nr_open`) when the hard limit is unlimited.
    let target = hard.min(1 << 20);
    if target > soft && setrlimit(Resource::RLIMIT_NOFILE, target, hard).is_ok() {
        crate::process::children_open_files(soft, hard);
        tracing::debug!(from = soft, to = target, "open files limit raised");
        return target;
    }
    soft
}

/// Client connections open: at most `max` (`proxy.max_connections`), at most `per_address`
/// from one address (an IPv6 client's /64); each counted while its socket is open (a WebSocket's
/// too, after its connection's task: the slot is its [`Activity`]'s, which the socket's wrapper
/// holds).
pub struct Clients {
    max: usize,
    per_address: usize,
    open: AtomicUsize,
    by_address: ByAddress,
}

/// One client connection counted in [`Clients`] until dropped.
pub struct ClientSlot {
    clients: Arc<Clients>,
    address: Option<IpAddr>,
}

/// Fit the caps to the open files limit `files` (each is a descriptor: a client connection, one
/// to the application in use, one kept idle): client connections at most half of it, connections
/// to the application in use a quarter, those kept idle by the `workers` pools an eighth (a pool
/// keeps up to twice `upstream_keepalive`), the rest for everything else (PostgreSQL, the logs,
/// the Docker socket); and where an overall cap is lowered, one address (by its per-address cap)
/// at most a quarter of it.
/// With a limit of 1 024 and the defaults, one client's WebSockets, or three clients' slow
/// requests, took every descriptor. What was lowered, for a person.
pub fn fit_open_files(p: &mut ProxyConfig, files: u64, workers: usize) -> Vec<String> {
    let files = usize::try_from(files).unwrap_or(usize::MAX);
    let mut lowered = Vec::new();
    let mut fit = |name: &str, value: &mut usize, most: usize| {
        let most = most.max(1);
        if *value > most {
            lowered.push(format!("proxy.{name} {value} -> {most}"));
            *value = most;
        }
    };
    let max_connections = p.max_connections;
    fit("max_connections", &mut p.max_connections, files / 2);
    let upstream_max = p.upstream_max;
    fit("upstream_max", &mut p.upstream_max, files / 4);
    fit(
        "upstream_keepalive",
        &mut p.upstream_keepalive,
        files / (16 * workers.max(1)),
    );
    // An overall cap lowered, its per-address cap goes down with it (as configured otherwise):
    // else one address could hold every slot the limit leaves.
    for (name, per_address, overall, configured) in [
        (
            "max_connections_per_address",
            &mut p.max_connections_per_address,
            p.max_connections,
            max_connections,
        ),
        (
            "upstream_max_per_address",
            &mut p.upstream_max_per_address,
            p.upstream_max,
            upstream_max,
        ),
    ] {
        if overall < configured && *per_address > 0 {
            fit(name, per_address, overall / 4);
        }
    }
    lowered
}

impl Clients {
    pub fn new(cfg: &ProxyConfig) -> Clients {
        Clients {
            max: cfg.max_connections.max(1),
            per_address: cfg.max_connections_per_address,
            open: AtomicUsize::new(0),
            by_address: ByAddress::default(),
        }
    }

    fn full(&self) -> bool {
        self.open.load(Ordering::Relaxed) >= self.max
    }

    /// A connection from `ip` counted, if its address has room.
    fn open(self: &Arc<Self>, ip: IpAddr) -> Option<ClientSlot> {
        let address = if self.per_address > 0 {
            let key = address_key(ip);
            if !self.by_address.take(key, self.per_address) {
                return None;
            }
            Some(key)
        } else {
            None
        };
        self.open.fetch_add(1, Ordering::Relaxed);
        Some(ClientSlot {
            clients: self.clone(),
            address,
        })
    }
}

impl std::fmt::Debug for ClientSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientSlot")
            .field("address", &self.address)
            .finish()
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        self.clients.open.fetch_sub(1, Ordering::Relaxed);
        if let Some(address) = self.address {
            self.clients.by_address.give_back(address);
        }
    }
}

/// What a client address counts as for the caps by address: an IPv4 address (an IPv4-mapped
/// IPv6 one too), or an IPv6 address's /64, which one host has whole (counted by address, a
/// host took every connection to the application from addresses of its /64).
pub fn address_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(std::net::Ipv6Addr::from(
                u128::from(v6) & !((1u128 << 64) - 1),
            )),
        },
        v4 => v4,
    }
}

impl Dispatch {
    /// The worker with the fewest open connections, counted as one more from now on.
    fn choose(&self) -> usize {
        let (to, _) = self
            .open
            .iter()
            .enumerate()
            .min_by_key(|(_, n)| n.load(Ordering::Relaxed))
            .unwrap_or((0, &self.open[0]));
        self.open[to].fetch_add(1, Ordering::Relaxed);
        to
    }

    fn closed(&self, worker: usize) {
        self.open[worker].fetch_sub(1, Ordering::Relaxed);
    }
}

thread_local! {
    /// Requests this worker thread has started and connections it has parked: what frees or
    /// takes memory (see [`Idle`]).
    static STARTED: Cell<u64> = const { Cell::new(0) };
}

/// Count a request on this worker.
pub(crate) fn count_request() {
    STARTED.set(STARTED.get().wrapping_add(1));
}

/// Count a connection parked or closed on this worker (its memory was freed: worth a trim).
fn count_release() {
    STARTED.set(STARTED.get().wrapping_add(1));
}

/// Gives freed memory back to the system when a worker's burst of requests is over (or its idle
/// connections have been parked): the allocator keeps what the connections of a burst freed
/// (some MiB after thousands of requests) for a while. Collecting costs a walk of the worker's
/// heap, so it is done once per burst, after a tick with no new request.
#[derive(Default)]
struct Idle {
    seen: u64,
    trimmed: u64,
}

impl Idle {
    fn tick(&mut self) {
        let now = STARTED.get();
        if now == self.seen && now != self.trimmed {
            release_memory();
            self.trimmed = now;
        }
        self.seen = now;
    }
}

/// Return what this thread's heap has free to the system (the binary's allocator is mimalloc:
/// see `main.rs`; in unit tests, on the system's allocator, mimalloc's heap is empty).
fn release_memory() {
    // SAFETY: mi_collect has no preconditions: it walks the calling thread's heap (and, forced,
    // the abandoned pages) and frees what is unused.
    unsafe { libmimalloc_sys::mi_collect(true) }
}

/// When a connection last moved a byte, and how many of its requests are in flight.
#[derive(Debug)]
pub struct Activity {
    /// The connection's count in [`Clients`], released with the last holder of this (the
    /// socket's wrapper, which an upgraded connection keeps).
    client: std::sync::OnceLock<ClientSlot>,
    epoch: Instant,
    last_ms: AtomicU64,
    moved: AtomicBool,
    in_flight: AtomicUsize,
    /// When the request head being read began ([`NEVER`]: none is being read).
    head_since_ms: AtomicU64,
    /// When the last request head began (kept once it ends: see [`Activity::head_took`]).
    head_last_ms: AtomicU64,
    /// HTTP/1.1: that head may be behind requests in flight (pipelined); its deadline waits
    /// for their end (see [`Activity::head_behind_begins`]).
    head_behind: AtomicBool,
    /// The responses being sent, each with when its last piece was handed to the connection
    /// and not taken since (see [`Handover`]).
    sending: std::sync::Mutex<Vec<Arc<Handover>>>,
    /// Connections to the application this connection's requests hold (see [`Lease`]).
    leases: AtomicUsize,
    /// Bytes of response bodies sent (what an HTTP/2 client earns its control frames with).
    pub sent: AtomicU64,
    /// HTTP/2: the streams whose response body is under way on the wire (DATA written) and not
    /// ended (no END_STREAM written, no RST_STREAM either way), as `frames` follows them; and
    /// the DATA bytes written.
    pub open_streams: AtomicUsize,
    pub data_written: AtomicU64,
    /// HTTP/2: since when (ms) a response has been held back by its stream's send window or
    /// the connection's, as `frames` follows them ([`NEVER`]: none is; see
    /// [`Activity::send_stalled`]).
    pub window_held_ms: AtomicU64,
    /// HTTP/2: the bytes of frames other than DATA written to the client (`frames` counts
    /// them), and their count at the last look (see [`Activity::send_stalled`]).
    pub control_written: AtomicU64,
    control_seen: AtomicU64,
    /// Bytes of the socket's send queue that its shrinking must go past before it counts as
    /// the client taking a response (see [`Activity::send_stalled`]).
    debt: AtomicU64,
    /// What the queue's shrinking paid beyond that and has not yet credited to a response
    /// (less than a piece; see [`Activity::send_stalled`]).
    credit: AtomicU64,
    /// Since when (ms) the socket's send queue has held bytes and the client acknowledged none
    /// of them ([`NEVER`]: it was empty at the last look, or not looked at; see
    /// [`Activity::takes_nothing`]).
    stuck_ms: AtomicU64,
    /// What the client had acknowledged at that look (TCP_INFO's bytes acked).
    acked: AtomicU64,
    /// regobox wrote to the client since that look.
    wrote: AtomicBool,
    /// The last write to the client could not go out (its socket is full).
    write_blocked: AtomicBool,
    /// When a request last began or ended (see [`Activity::quiet_for`]).
    request_ms: AtomicU64,
    /// The client's socket, to read how much of what was written it still has to take (see
    /// [`Activity::send_stalled`]); -1: none.
    fd: std::sync::atomic::AtomicI32,
    /// Bytes in that socket's send queue at the last look.
    queued: AtomicU64,
    /// Past `idle_timeout`, what that queue held when the client last took a piece of it, and
    /// when ([`NEVER`]: not looked at since the connection was last busy; see
    /// [`Activity::still_taking`]).
    drain_queued: AtomicU64,
    drain_ms: AtomicU64,
    /// The socket's close was made a reset ([`Activity::reset_if_untaken`]).
    reset: AtomicBool,
    /// The connection was closed as idle (see [`Activity::closing`]).
    idle_closed: AtomicBool,
    /// The socket, kept past the connection's end while its client takes what the kernel
    /// holds for it (see [`linger`]).
    held: std::sync::Mutex<Option<std::os::fd::OwnedFd>>,
}

/// One response being sent: since when (ms on its connection's clock) a piece of it has waited
/// for the client's side to take it ([`NEVER`]: none is waiting).
///
/// A piece waits from when it is handed over until the next poll of the body, and from when
/// the body wakes its reader (the application's next piece has come) until that reader polls
/// it: the reader does not poll while the client does not take what it has (HTTP/1.1: hyper's
/// buffer full; HTTP/2: the stream's window at zero). So the response is also the waker the
/// body sees, passing its wakes on.
#[derive(Debug)]
pub struct Handover {
    since_ms: AtomicU64,
    epoch: Instant,
    /// The reader's waker (hyper's connection or stream task).
    reader: std::sync::Mutex<Option<std::task::Waker>>,
}

impl Handover {
    /// The reader polls the body (with `waker`).
    pub fn asked(&self, waker: &std::task::Waker) {
        self.since_ms.store(NEVER, Ordering::Relaxed);
        let mut reader = self.reader.lock().unwrap_or_else(|e| e.into_inner());
        if !reader.as_ref().is_some_and(|w| w.will_wake(waker)) {
            *reader = Some(waker.clone());
        }
    }

    /// A piece was handed over, or is ready: it waits for the reader's next poll.
    pub fn waits(&self) {
        let now = clock::now()
            .saturating_duration_since(self.epoch)
            .as_millis() as u64;
        let _ = self
            .since_ms
            .compare_exchange(NEVER, now, Ordering::Relaxed, Ordering::Relaxed);
    }
}

impl std::task::Wake for Handover {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.waits();
        if let Some(w) = &*self.reader.lock().unwrap_or_else(|e| e.into_inner()) {
            w.wake_by_ref();
        }
    }
}

/// A connection to the application held for a request, counted per client connection, per
/// client address and overall until dropped (with the response body, or the tunnel).
pub struct Lease {
    activity: Arc<Activity>,
    caps: Arc<Caps>,
    address: IpAddr,
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.activity.leases.fetch_sub(1, Ordering::Relaxed);
        self.caps.overall.fetch_sub(1, Ordering::Relaxed);
        if self.caps.per_address > 0 {
            self.caps.by_address.give_back(self.address);
        }
    }
}

/// The connections to the application held by requests, all workers together, and the caps
/// on them (see [`Lease`]).
pub struct Caps {
    per_connection: usize,
    per_address: usize,
    max: usize,
    overall: AtomicUsize,
    by_address: ByAddress,
}

/// What each client address holds (see [`address_key`]), for the caps by address: only the
/// addresses holding something are kept.
#[derive(Default)]
struct ByAddress(std::sync::Mutex<std::collections::HashMap<IpAddr, usize, AddressHash>>);

impl ByAddress {
    /// One more for `address`, unless it holds `max` already.
    fn take(&self, address: IpAddr, max: usize) -> bool {
        let mut held = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let n = held.entry(address).or_insert(0);
        if *n >= max {
            return false;
        }
        *n += 1;
        true
    }

    /// One fewer for `address`.
    fn give_back(&self, address: IpAddr) {
        let mut held = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let std::collections::hash_map::Entry::Occupied(mut e) = held.entry(address) {
            *e.get_mut() -= 1;
            if *e.get() == 0 {
                e.remove();
            }
        }
    }
}

/// The hash of the per-address map: a folded multiply (the high and low halves of a 128-bit
/// product, XORed) per word of the address, keyed per process. The map is looked up twice per
/// request, and std's SipHash cost more than the rest of the cap. The fold makes every bit of
/// the result depend on every bit of the word and of the key (with a plain multiply, the low
/// bits do not depend on the key's high bits), so addresses that share buckets cannot be chosen
/// without the key; and the map holds only the addresses with a request in flight.
#[derive(Clone, Copy)]
struct AddressHash {
    seed: u64,
    key: u64,
}

impl Default for AddressHash {
    fn default() -> Self {
        AddressHash {
            seed: rand::random(),
            key: rand::random::<u64>() | 1,
        }
    }
}

impl std::hash::BuildHasher for AddressHash {
    type Hasher = AddressHasher;
    fn build_hasher(&self) -> AddressHasher {
        AddressHasher {
            state: self.seed,
            key: self.key,
        }
    }
}

struct AddressHasher {
    state: u64,
    key: u64,
}

impl std::hash::Hasher for AddressHasher {
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.write_u64(u64::from_le_bytes(word));
        }
    }

    fn write_u64(&mut self, n: u64) {
        let product = u128::from(self.state ^ n) * u128::from(self.key);
        self.state = (product as u64) ^ ((product >> 64) as u64);
    }

    fn write_usize(&mut self, n: usize) {
        self.write_u64(n as u64);
    }

    fn finish(&self) -> u64 {
        let product = u128::from(self.state) * u128::from(self.key.rotate_left(32) | 1);
        (product as u64) ^ ((product >> 64) as u64)
    }
}

impl Caps {
    pub fn new(cfg: &ProxyConfig) -> Caps {
        Caps {
            per_connection: cfg.upstream_max_per_connection,
            per_address: cfg.upstream_max_per_address,
            max: cfg.upstream_max,
            overall: AtomicUsize::new(0),
            by_address: ByAddress::default(),
        }
    }
}

/// Why a request cannot have a connection to the application now: the key of the cap reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AtCap {
    /// `proxy.upstream_max_per_connection`
    Connection,
    /// `proxy.upstream_max_per_address`
    Address,
    /// `proxy.upstream_max`
    Overall,
}

/// What the client of the TCP socket `fd` has acknowledged of what was sent to it (TCP_INFO's
/// `tcpi_bytes_acked`); None where the kernel does not say.
fn bytes_acked(fd: i32) -> Option<u64> {
    if fd < 0 {
        return None;
    }
    // SAFETY: tcp_info is plain data, all zeroes a valid value.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: TCP_INFO writes at most `len` bytes into `info` and the length it wrote into
    // `len`; `fd` is the connection's own socket, open while the connection's task (which
    // calls this) runs.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    let end = std::mem::offset_of!(libc::tcp_info, tcpi_bytes_acked) + 8;
    (r == 0 && len as usize >= end).then_some(info.tcpi_bytes_acked)
}

/// No time: no head being read, no piece waiting.
const NEVER: u64 = u64::MAX;

impl Activity {
    fn new() -> Arc<Activity> {
        Arc::new(Activity {
            epoch: Instant::now(),
            last_ms: AtomicU64::new(0),
            moved: AtomicBool::new(false),
            in_flight: AtomicUsize::new(0),
            head_since_ms: AtomicU64::new(NEVER),
            head_last_ms: AtomicU64::new(0),
            head_behind: AtomicBool::new(false),
            sending: std::sync::Mutex::new(Vec::new()),
            leases: AtomicUsize::new(0),
            sent: AtomicU64::new(0),
            open_streams: AtomicUsize::new(0),
            data_written: AtomicU64::new(0),
            window_held_ms: AtomicU64::new(NEVER),
            control_written: AtomicU64::new(0),
            control_seen: AtomicU64::new(0),
            debt: AtomicU64::new(0),
            credit: AtomicU64::new(0),
            stuck_ms: AtomicU64::new(NEVER),
            acked: AtomicU64::new(0),
            wrote: AtomicBool::new(false),
            write_blocked: AtomicBool::new(false),
            request_ms: AtomicU64::new(0),
            fd: std::sync::atomic::AtomicI32::new(-1),
            queued: AtomicU64::new(0),
            drain_queued: AtomicU64::new(0),
            drain_ms: AtomicU64::new(NEVER),
            reset: AtomicBool::new(false),
            idle_closed: AtomicBool::new(false),
            held: std::sync::Mutex::new(None),
            client: std::sync::OnceLock::new(),
        })
    }

    /// A response begins to be sent; `waiting`: its first piece waits for the client already
    /// (it has a body the client has not asked for yet).
    pub fn sending(&self, waiting: bool) -> Arc<Handover> {
        let h = Arc::new(Handover {
            since_ms: AtomicU64::new(if waiting { self.now_ms() } else { NEVER }),
            epoch: self.epoch,
            reader: std::sync::Mutex::new(None),
        });
        let mut sending = self.sending.lock().unwrap_or_else(|e| e.into_inner());
        sending.push(h.clone());
        h
    }

    /// Whether a response has waited `limit` for the client to take its next piece (a client
    /// that stopped reading, an HTTP/2 stream held at a zero window); forgets the responses
    /// sent to the end.
    ///
    /// A piece waits while the socket is full, and the kernel reports room only once a third of
    /// its send buffer (megabytes) has drained: a steady reader at tens of KB/s would take
    /// longer than the deadline. So the socket's send queue is read too: what it shrank by since
    /// the last look is what the client took, and each piece's worth of it ([`forward::PIECE`])
    /// makes a waiting response, the longest waiting first, count from now. (It was every
    /// waiting response for any shrinking: over HTTP/2, a client reading 700 B/s with its
    /// windows wide open held 63 streams, and their connections to the application, for a
    /// minute at a send_timeout of 4 s: an attacker's, twentieth session. Now each response
    /// waiting must be taken at a piece per `limit`, 273 B/s at the default.) Over HTTP/2
    /// the queue also holds what the client made regobox write without asking for a response
    /// (PING and SETTINGS acknowledgements, heads of empty responses): a queue kept full of
    /// those and drained a little at a time held responses, and their connections to the
    /// application, for ever (an attacker's, nineteenth session). So such frames written while
    /// a response waits are a debt, [`CONTROL_WEIGHT`] bytes a byte (what the TLS record around
    /// a lone small frame costs), that the queue's shrinking pays before it counts.
    ///
    /// Over HTTP/2 that is the connection's queue: a client taking one stream's response (or
    /// a few bytes of the queue now and then) made it shrink while it held its other streams at
    /// a zero window, and their connections to the application, for ever (the last note's,
    /// twentieth session). A stream's window is the client's choice, not its socket's pace: a
    /// response held back by its window, or by the connection's, must move a piece of DATA
    /// within `limit` whatever the queue does (`frames` keeps the windows: see
    /// `frames::Held::review`). That also covers the end of a body h2 keeps for a window
    /// once regobox has handed it over (done as far as the body knows).
    fn send_stalled(&self, limit: Duration) -> bool {
        let now = self.now_ms();
        let limit = limit.as_millis() as u64;
        let held = self.window_held_ms.load(Ordering::Relaxed);
        if held != NEVER && now.saturating_sub(held) >= limit {
            return true;
        }
        let mut sending = self.sending.lock().unwrap_or_else(|e| e.into_inner());
        sending.retain(|h| Arc::strong_count(h) > 1);
        let waiting = sending
            .iter()
            .any(|h| h.since_ms.load(Ordering::Relaxed) != NEVER);
        let control = self.control_written.load(Ordering::Relaxed);
        let control_new =
            control.saturating_sub(self.control_seen.swap(control, Ordering::Relaxed));
        if !waiting {
            // A wait's first look credits nothing: the queue counts from there.
            self.queued.store(0, Ordering::Relaxed);
            self.debt.store(0, Ordering::Relaxed);
            self.credit.store(0, Ordering::Relaxed);
            return false;
        }
        if let Some(queued) = crate::outq::queued(self.fd.load(Ordering::Relaxed)) {
            let before = self.queued.swap(queued, Ordering::Relaxed);
            let debt = self.debt.load(Ordering::Relaxed) + control_new * CONTROL_WEIGHT;
            let shrank = before.saturating_sub(queued);
            // An empty queue owes nothing more; what emptied it paid first.
            self.debt.store(
                if queued == 0 {
                    0
                } else {
                    debt.saturating_sub(shrank)
                },
                Ordering::Relaxed,
            );
            let piece = forward::PIECE as u64;
            let credit = self.credit.load(Ordering::Relaxed) + shrank.saturating_sub(debt);
            let pieces = (credit / piece) as usize;
            let mut waiting: Vec<(u64, &Arc<Handover>)> = sending
                .iter()
                .map(|h| (h.since_ms.load(Ordering::Relaxed), h))
                .filter(|(since, _)| *since != NEVER)
                .collect();
            // Nothing is banked beyond the responses waiting now.
            self.credit.store(
                if pieces >= waiting.len() {
                    0
                } else {
                    credit % piece
                },
                Ordering::Relaxed,
            );
            if pieces < waiting.len() {
                waiting.sort_unstable_by_key(|(since, _)| *since);
            }
            for (_, h) in waiting.iter().take(pieces) {
                let _ = h
                    .since_ms
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |s| {
                        (s != NEVER).then_some(now)
                    });
            }
        }
        sending.iter().any(|h| {
            let since = h.since_ms.load(Ordering::Relaxed);
            since != NEVER && now.saturating_sub(since) >= limit
        })
    }

    /// Whether the connection is past one of its deadlines (checked every tick): idle with
    /// nothing in flight, a request head taking too long (slowloris; the first one counts from
    /// the connection), a response the client does not take (nginx's `send_timeout`).
    fn overdue(&self, cfg: &ProxyConfig) -> Overdue {
        if self.head_overdue(cfg.header_timeout) {
            return Overdue::Cut;
        }
        if self.send_stalled(cfg.send_timeout) || self.takes_nothing(cfg.send_timeout) {
            if let Some(left_out) = forward::CLIENT_ERRORS.should_log() {
                tracing::info!(target: "regobox::proxy", timeout = ?cfg.send_timeout, similar_left_out = left_out, "a client did not take its response (proxy.send_timeout); connection closed");
            }
            return Overdue::Cut;
        }
        // A response on the wire (HTTP/2: its end kept for the client's window) is in flight; a
        // request head arriving is under `header_timeout`, not idle (an attacker's, twentieth
        // session: the next request of a kept-alive connection sent in two pieces was cut
        // between them).
        // What the kernel holds for the client is first looked at halfway (see
        // `Activity::still_taking`).
        if self.in_flight.load(Ordering::Relaxed) == 0
            && self.open_streams.load(Ordering::Relaxed) == 0
            && self.head_for().is_none()
            && self.quiet_for() >= cfg.idle_timeout / 2
        {
            let taking = self.still_taking(cfg.idle_timeout);
            if self.quiet_for() >= cfg.idle_timeout && !taking {
                return Overdue::Idle;
            }
            return Overdue::No;
        }
        self.drain_ms.store(NEVER, Ordering::Relaxed);
        Overdue::No
    }

    /// Whether the client has taken nothing of what the kernel holds for it for `limit`: the
    /// socket's send queue not empty, and none of it acknowledged (TCP_INFO's count of bytes
    /// acked, which what regobox writes meanwhile does not hide, as it hides the queue's
    /// shrinking). The connection's own floor, whatever its responses do: a client resetting
    /// each stream before its deadline and asking again held 60 connections to the application
    /// with nothing taken (an attacker's, twentieth session); one asking for small responses,
    /// each handed over at once and so never waiting, and reading none of them, held its
    /// connection, a growing queue in the kernel and, in bursts, connections to the
    /// application for as long as it asked (an attacker's, twenty-first session). Looked at
    /// only when regobox wrote since the last look or the queue held bytes then.
    fn takes_nothing(&self, limit: Duration) -> bool {
        let wrote = self.wrote.swap(false, Ordering::Relaxed);
        let since = self.stuck_ms.load(Ordering::Relaxed);
        if !wrote && since == NEVER {
            return false;
        }
        let fd = self.fd.load(Ordering::Relaxed);
        let queued = crate::outq::queued(fd).unwrap_or(0);
        if queued == 0 {
            self.stuck_ms.store(NEVER, Ordering::Relaxed);
            return false;
        }
        let Some(acked) = bytes_acked(fd) else {
            return false;
        };
        let now = self.now_ms();
        let before = self.acked.swap(acked, Ordering::Relaxed);
        if since == NEVER || acked != before {
            self.stuck_ms.store(now, Ordering::Relaxed);
            return false;
        }
        now.saturating_sub(since) >= limit.as_millis() as u64
    }

    /// A connection about to be cut whose client has not taken what the kernel holds for it is
    /// reset when closed (`SO_LINGER` 0, nginx's `reset_timedout_connection`): closed as usual,
    /// the kernel kept the queue, megabytes, for minutes, probing the client's closed window
    /// (an attacker's, twenty-first session: 2.8 MB for 339 s after a `send_timeout` cut, and
    /// as many connections as a client makes and leaves so). A queue the client has taken
    /// closes as usual.
    fn reset_if_untaken(&self) {
        let fd = self.fd.load(Ordering::Relaxed);
        if crate::outq::queued(fd).unwrap_or(0) == 0 {
            return;
        }
        // (`fd` is the connection's own socket, open while the connection's task, which calls
        // this before dropping it, runs.)
        linger::reset_on_close(fd);
        self.reset.store(true, Ordering::Relaxed);
    }

    /// What the client had left in the socket's send queue when it last took a piece of it, and
    /// when, if the queue was looked at since the connection was last busy (see
    /// [`Activity::still_taking`]): where [`linger`] goes on from.
    fn last_taken(&self) -> Option<(u64, Instant)> {
        let since = self.drain_ms.load(Ordering::Relaxed);
        (since != NEVER).then(|| {
            (
                self.drain_queued.load(Ordering::Relaxed),
                self.epoch + Duration::from_millis(since),
            )
        })
    }

    /// As the connection's socket closes: kept if its send queue holds bytes still to be taken
    /// (and it was not reset; see [`linger`]): over a piece, or any if it was closed as idle.
    /// (A connection's last response is most often still unacknowledged as it closes over a
    /// network, and keeping every such socket a tick cost a new TLS connection a quarter more
    /// of regobox's time on loopback: the small ones are left to the kernel, as before; a
    /// connection closed as idle is rare, and its client may have left bytes on purpose.)
    fn closing(&self) {
        if self.reset.load(Ordering::Relaxed) {
            return;
        }
        let more_than = if self.idle_closed.load(Ordering::Relaxed) {
            0
        } else {
            forward::PIECE as u64
        };
        if let Some(socket) = linger::hold(self.fd.load(Ordering::Relaxed), more_than) {
            *self.held.lock().unwrap_or_else(|e| e.into_inner()) = Some(socket);
        }
    }

    /// Whether the client is still taking what was written to it: the socket's send queue not
    /// empty, and shrunk by a piece ([`forward::PIECE`]) or emptied within `limit`. A response
    /// is done for regobox once the kernel has it, and the kernel may hold a slow client's
    /// seconds of it: a connection closed as idle then lost the rest, and the client's next
    /// frame (an HTTP/2 WINDOW_UPDATE for what it read) made the kernel reset it (an attacker's
    /// finding, twentieth session: downloads at 19 KB/s cut short). A client must take a piece
    /// of that queue within `limit`, as a response's within `send_timeout`: one draining it a
    /// few bytes at a time held its connection for as long as the kernel had bytes for it
    /// (490 B/s for 90 s seen). The queue's emptying counts as the connection's last move: a
    /// client that has just taken the end of a response has `limit` to ask for the next.
    ///
    /// The first look is made halfway through `limit` of quiet, and counts from the quiet's
    /// start: a piece must be taken by its end. (Made at `limit`, it could only count from
    /// there, and a client taking nothing was closed at twice `idle_timeout`: an attacker's,
    /// twenty-first session.)
    fn still_taking(&self, limit: Duration) -> bool {
        let queued = crate::outq::queued(self.fd.load(Ordering::Relaxed)).unwrap_or(0);
        let now = self.now_ms();
        let since = self.drain_ms.load(Ordering::Relaxed);
        // The queue when the client last took a piece of it (or emptied it).
        let mark = self.drain_queued.load(Ordering::Relaxed);
        let limit_ms = limit.as_millis() as u64;
        if since == NEVER {
            // The first half is taken as taken at the rate asked (half a piece: what the queue
            // held then is not known), so a piece's pace is all that is asked of the rest. (A
            // look made late, past halfway, counts from halfway.) An empty queue is marked too:
            // bytes regobox writes later in the quiet (a PING's answer) are none of a response,
            // and their taking is no move of the client's (an attacker's, twenty-first session:
            // PINGs answered, then read, kept a connection asking nothing open past its GOAWAY).
            let quiet = (self.quiet_for().as_millis() as u64).min(limit_ms / 2);
            let quiet_since = now.saturating_sub(quiet);
            let mark = if queued > 0 {
                queued + forward::PIECE as u64 / 2
            } else {
                0
            };
            self.drain_queued.store(mark, Ordering::Relaxed);
            self.drain_ms.store(quiet_since, Ordering::Relaxed);
            return queued > 0 && now.saturating_sub(quiet_since) < limit_ms;
        }
        // What regobox wrote since the mark (over HTTP/2, answers to what the client sends)
        // does not raise it: the client takes it on top of its piece.
        let took =
            (queued == 0 && mark > 0) || mark.saturating_sub(queued) >= forward::PIECE as u64;
        if took {
            self.drain_queued.store(queued, Ordering::Relaxed);
            self.drain_ms.store(now, Ordering::Relaxed);
            return true;
        }
        now.saturating_sub(since) < limit_ms
    }

    /// A connection to the application for one of this connection's requests from `address`,
    /// if no cap is reached.
    pub fn lease(self: &Arc<Self>, caps: &Arc<Caps>, address: IpAddr) -> Result<Lease, AtCap> {
        if self.leases.load(Ordering::Relaxed) >= caps.per_connection {
            return Err(AtCap::Connection);
        }
        if caps.overall.fetch_add(1, Ordering::Relaxed) >= caps.max {
            caps.overall.fetch_sub(1, Ordering::Relaxed);
            return Err(AtCap::Overall);
        }
        if caps.per_address > 0 && !caps.by_address.take(address, caps.per_address) {
            caps.overall.fetch_sub(1, Ordering::Relaxed);
            return Err(AtCap::Address);
        }
        self.leases.fetch_add(1, Ordering::Relaxed);
        Ok(Lease {
            activity: self.clone(),
            caps: caps.clone(),
            address,
        })
    }

    fn now_ms(&self) -> u64 {
        clock::now()
            .saturating_duration_since(self.epoch)
            .as_millis() as u64
    }

    pub fn head_begins(&self) {
        let now = self.now_ms();
        self.head_since_ms.store(now, Ordering::Relaxed);
        self.head_last_ms.store(now, Ordering::Relaxed);
        self.head_behind.store(false, Ordering::Relaxed);
    }

    /// HTTP/1.1: a request head begins. Behind requests in flight (pipelined), hyper reads it
    /// only once they have ended, and its deadline counts from then, as nginx's does: the
    /// answers the application takes its time over are no part of the client's head (the
    /// sixteenth session's attacker: a request in flight was cut at `header_timeout` when its
    /// client had begun the next head behind it).
    pub fn head_behind_begins(&self) {
        let now = self.now_ms();
        self.head_since_ms.store(now, Ordering::Relaxed);
        self.head_last_ms.store(now, Ordering::Relaxed);
        self.head_behind.store(true, Ordering::Relaxed);
    }

    pub fn head_ends(&self) {
        self.head_since_ms.store(NEVER, Ordering::Relaxed);
        self.head_behind.store(false, Ordering::Relaxed);
    }

    /// A request head of which some bytes have come is past `limit` (slowloris): a request
    /// begun and not finished, logged 408 as nginx logs one (a connection that sent nothing
    /// is not a request). Some of it has come when the follower said it began
    /// ([`Activity::head_behind_begins`], at its first byte), not `serve_h1`'s mark at the
    /// connection's start ([`Activity::head_begins`]).
    fn head_timed_out(&self, limit: Duration) -> bool {
        self.head_behind.load(Ordering::Relaxed) && self.head_overdue(limit)
    }

    /// Whether the request head being read is past `limit`: not while it waits behind requests
    /// in flight.
    fn head_overdue(&self, limit: Duration) -> bool {
        self.head_for().is_some_and(|t| t >= limit)
            && !(self.head_behind.load(Ordering::Relaxed)
                && self.in_flight.load(Ordering::Relaxed) > 0)
    }

    /// How long since the last request head's first byte (the connection's first head: since
    /// the connection), whether it has ended or not (the time a head hyper refused took: the
    /// follower, which refuses it too, ends it).
    pub fn head_took(&self) -> Duration {
        let since = self.head_last_ms.load(Ordering::Relaxed);
        Duration::from_millis(self.now_ms().saturating_sub(since))
    }

    /// How long the current request head has been arriving, if one is.
    fn head_for(&self) -> Option<Duration> {
        let since = self.head_since_ms.load(Ordering::Relaxed);
        (since != NEVER).then(|| Duration::from_millis(self.now_ms().saturating_sub(since)))
    }

    /// A byte moved (or a request ended): a flag, not a clock reading, as it happens on every
    /// read and write; [`Activity::idle_for`] turns it into a time.
    fn touch(&self) {
        self.moved.store(true, Ordering::Relaxed);
    }

    /// Since a byte last moved, as seen by the previous call (the watchdog calls this every
    /// tick, so it is at most a tick late): when a connection may be parked, and when a tunnel
    /// is idle.
    fn idle_for(&self) -> Duration {
        let now = self.now_ms();
        if self.moved.swap(false, Ordering::Relaxed) {
            self.last_ms.store(now, Ordering::Relaxed);
        }
        Duration::from_millis(now.saturating_sub(self.last_ms.load(Ordering::Relaxed)))
    }

    /// HTTP/2: a response ended on the wire (its last DATA, or a reset, written); the
    /// connection is idle from then on if nothing else is in flight.
    pub fn stream_ended(&self) {
        self.request_ms.store(self.now_ms(), Ordering::Relaxed);
    }

    /// Count a request as in flight until the guard is dropped.
    pub fn begin(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.request_ms.store(self.now_ms(), Ordering::Relaxed);
        InFlight(self.clone())
    }

    /// Since a request last began or ended (or the connection opened): what `idle_timeout`
    /// measures. Bytes that ask for nothing (line breaks between HTTP/1.1 requests, HTTP/2
    /// PINGs) do not keep a connection open.
    fn quiet_for(&self) -> Duration {
        Duration::from_millis(
            self.now_ms()
                .saturating_sub(self.request_ms.load(Ordering::Relaxed)),
        )
    }
}

/// A request in flight (see [`Activity::begin`]).
pub struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        let now = self.0.now_ms();
        if self.0.in_flight.fetch_sub(1, Ordering::Relaxed) == 1
            && self.0.head_behind.load(Ordering::Relaxed)
        {
            // The head behind it, if it has not ended meanwhile, is read from now on.
            let _ = self
                .0
                .head_since_ms
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |s| {
                    (s != NEVER).then_some(now)
                });
        }
        self.0.touch();
        self.0.request_ms.store(now, Ordering::Relaxed);
    }
}

/// A TLS client connection's stream.
type TlsIo = tokio_rustls::server::TlsStream<cork::Corked<Tracked<TcpStream>>>;

/// A stream that records activity.
struct Tracked<S> {
    inner: S,
    activity: Arc<Activity>,
}

/// The socket closes with its connection's stream: kept if its client still has to take what
/// the kernel holds (see [`linger`]).
impl<S> Drop for Tracked<S> {
    fn drop(&mut self) {
        self.activity.closing();
    }
}

impl<S> Tracked<S> {
    fn wrote(&self, r: &Poll<std::io::Result<usize>>) {
        match r {
            Poll::Ready(Ok(n)) if *n > 0 => {
                self.activity.touch();
                self.activity.write_blocked.store(false, Ordering::Relaxed);
                self.activity.wrote.store(true, Ordering::Relaxed);
            }
            Poll::Pending => self.activity.write_blocked.store(true, Ordering::Relaxed),
            _ => {}
        }
    }
}

/// The socket under a connection's stream, when waiting on it alone tells that the client sent
/// something: plain TCP (TLS may hold decrypted bytes of its own).
trait Socket {
    fn tcp(&self) -> Option<&TcpStream>;
}

impl Socket for Tracked<TcpStream> {
    fn tcp(&self) -> Option<&TcpStream> {
        Some(&self.inner)
    }
}

impl cork::Last for Tracked<TcpStream> {
    /// `send` with `MSG_MORE`: TCP holds a segment not full for the shutdown's FIN, which then
    /// pushes it out with the FIN.
    fn poll_write_last(
        &mut self,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = loop {
            match self.inner.poll_write_ready(cx) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(e)) => break Poll::Ready(Err(e)),
                Poll::Pending => break Poll::Pending,
            }
            let sent = self.inner.try_io(tokio::io::Interest::WRITABLE, || {
                socket2::SockRef::from(&self.inner)
                    .send_with_flags(buf, libc::MSG_MORE | libc::MSG_NOSIGNAL)
            });
            match sent {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                r => break Poll::Ready(r),
            }
        };
        self.wrote(&r);
        r
    }
}

impl Socket for TlsIo {
    fn tcp(&self) -> Option<&TcpStream> {
        None
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Tracked<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.touch();
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Tracked<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.wrote(&r);
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.wrote(&r);
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// What the socket's send queue must drain per byte of HTTP/2 frames other than DATA written
/// while a response waits, before its draining counts as the client taking the response (see
/// [`Activity::send_stalled`]): a frame of 9 bytes alone in a TLS 1.2 record takes 38.
const CONTROL_WEIGHT: u64 = 5;

/// What a connection's watchdog finds on a tick (see [`Activity::overdue`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Overdue {
    No,
    /// Idle past `proxy.idle_timeout`, nothing in flight: closed as the protocol closes (see
    /// [`IdleClose`]).
    Idle,
    /// Past a deadline the client missed (a head too slow, a response not taken): cut at once.
    Cut,
}

/// How long a connection closed for idleness has to let go, nothing in flight, once asked.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// An idle connection's close, as nginx closes one: asked of the protocol first (hyper's
/// graceful shutdown: HTTP/2's GOAWAY, the last stream named once the client has answered a
/// PING, so that a request sent meanwhile is either served or known to be unserved; then TLS's
/// `close_notify`, which tells a client the connection ended, not that it was cut), then cut if
/// it has not ended within [`CLOSE_GRACE`] with nothing in flight (a client that does not answer).
#[derive(Default)]
struct IdleClose(Option<Instant>);

impl IdleClose {
    /// On a tick that found the connection idle: whether to ask it to close now (the first
    /// time), or to cut it (asked [`CLOSE_GRACE`] ago or more).
    fn on_idle(&mut self) -> Step {
        match self.0 {
            None => {
                self.0 = Some(clock::now());
                Step::Ask
            }
            Some(asked) if clock::now().saturating_duration_since(asked) >= CLOSE_GRACE => {
                Step::Cut
            }
            Some(_) => Step::Wait,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Step {
    Ask,
    Wait,
    Cut,
}

/// Drive `$conn` (a hyper server connection) until it ends, the proxy stops (graceful, then
/// forced), it idles past `proxy.idle_timeout` with no request in flight (closed gracefully, see
/// [`IdleClose`]), or it misses one of its deadlines (cut).
macro_rules! drive {
    ($conn:expr, |$c:ident| $graceful:expr, $activity:expr, $cfg:expr, $shutdown:expr, $force:expr) => {{
        let conn = $conn;
        tokio::pin!(conn);
        // (See `sentry`.)
        let mut sentry = sentry::Sentry::new(Some(&$shutdown), &$force, Duration::from_millis(500));
        let mut idle = IdleClose::default();
        loop {
            tokio::select! {
                biased;
                // (Closed as idle or not, what the kernel still holds for the client is left to
                // `linger`.)
                _ = conn.as_mut() => break,
                e = sentry.next() => match e {
                    sentry::Event::Shutdown => {
                        let $c = conn.as_mut();
                        $graceful;
                    }
                    sentry::Event::Force => break,
                    sentry::Event::Tick => match $activity.overdue($cfg) {
                        Overdue::No => {}
                        Overdue::Cut => {
                            $activity.reset_if_untaken();
                            break;
                        }
                        Overdue::Idle => match idle.on_idle() {
                            Step::Ask => {
                                $activity.idle_closed.store(true, Ordering::Relaxed);
                                let $c = conn.as_mut();
                                $graceful;
                            }
                            Step::Wait => {}
                            Step::Cut => break,
                        },
                    },
                },
            }
        }
    }};
}

async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    https: bool,
    shared: Arc<Shared>,
    slot: ClientSlot,
) {
    let activity = Activity::new();
    // Held as long as the socket is: an upgraded connection's (a WebSocket) outlives this task.
    let _ = activity.client.set(slot);
    activity.touch();
    activity
        .fd
        .store(std::os::fd::AsRawFd::as_raw_fd(&stream), Ordering::Relaxed);
    let io = Tracked {
        inner: stream,
        activity: activity.clone(),
    };
    let shutdown = shared.shutdown.clone();
    // Each kind of connection's future is boxed: the task of an idle connection then holds only
    // the state of its own kind (a parked HTTP/1.1 connection, a few hundred bytes), not that of
    // the largest (a TLS handshake).
    match shared.tls.clone().filter(|_| https) {
        None => {
            Box::pin(serve_h1(
                io,
                peer,
                false,
                &shared,
                activity.clone(),
                shutdown,
                Arc::new(framing::Signals::default()),
            ))
            .await
        }
        Some(acceptor) => {
            Box::pin(serve_tls(
                acceptor,
                io,
                peer,
                &shared,
                activity.clone(),
                shutdown,
            ))
            .await;
        }
    }
    // The connection is over; its socket may not be yet (see `linger`).
    let held = activity
        .held
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take();
    if let Some(socket) = held {
        let from = activity.last_taken();
        linger::linger(socket, from, shared.config.send_timeout, &shared.shutdown).await;
    }
}

/// A TLS connection: its handshake, then HTTP/2 or HTTP/1.1, as ALPN chose.
async fn serve_tls(
    acceptor: TlsAcceptor,
    io: Tracked<TcpStream>,
    peer: SocketAddr,
    shared: &Arc<Shared>,
    activity: Arc<Activity>,
    shutdown: CancellationToken,
) {
    // The handshake's state (rustls' connection as it is built) boxed too: freed once done.
    // Its last writes are held for the first response (see `cork`).
    let handshake = tokio::time::timeout(
        shared.config.handshake_timeout,
        Box::pin(acceptor.accept(cork::Corked::new(io)).into_fallible()),
    );
    let mut tls_stream = tokio::select! {
        r = handshake => match r {
            Ok(Ok(s)) => s,
            // The alert that says why, if the session wrote one: sent if the socket takes it.
            Ok(Err((_, mut io))) => {
                let _ = futures_util::FutureExt::now_or_never(io.release());
                return;
            }
            Err(_) => return,
        },
        _ = shared.force.cancelled() => return,
    };
    let (corked, session) = tls_stream.get_mut();
    if session.protocol_version() == Some(rustls::ProtocolVersion::TLSv1_3) {
        corked.hold();
    } else {
        // TLS 1.2: the client waits for the last flight.
        match tokio::time::timeout(shared.config.handshake_timeout, corked.release()).await {
            Ok(Ok(())) => {}
            _ => return,
        }
    }
    tls_served(tls_stream, peer, shared, activity, shutdown).await;
}

/// The protocol ALPN chose on `tls_stream`, served. Not an `async fn`: the stream is moved into
/// its protocol's future here, and no state of this function's stays beside that future.
fn tls_served(
    mut tls_stream: TlsIo,
    peer: SocketAddr,
    shared: &Arc<Shared>,
    activity: Arc<Activity>,
    shutdown: CancellationToken,
) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
    if tls_stream.get_ref().1.alpn_protocol() == Some(b"h2") {
        Box::pin(serve_h2(tls_stream, peer, shared, activity, shutdown))
    } else {
        let (corked, session) = tls_stream.get_mut();
        // TLS 1.3: the server has nothing to send after the client's Finished until the
        // response (its tickets wait for that, see `cork`), so the Finished's acknowledgement
        // waits for the kernel's delayed ACK (40 ms); a client whose socket has Nagle's
        // algorithm on (the default) holds its small request until then. Acknowledged now (an
        // attacker's finding: 40 ms on every new connection of such clients). HTTP/2's server
        // settings leave at once and carry it.
        if session.protocol_version() == Some(rustls::ProtocolVersion::TLSv1_3) {
            let _ = socket2::SockRef::from(&corked.get_ref().inner).set_quickack(true);
        }
        // Its writes wait for a pass of the worker's queue (see `cork`); HTTP/2's do above TLS.
        let signals = Arc::new(framing::Signals::default());
        corked.defer(Some(signals.clone()));
        Box::pin(serve_h1(
            tls_stream, peer, true, shared, activity, shutdown, signals,
        ))
    }
}

/// HTTP/2 on a TLS connection, its frames followed (see [`frames`]).
async fn serve_h2(
    tls_stream: TlsIo,
    peer: SocketAddr,
    shared: &Arc<Shared>,
    activity: Arc<Activity>,
    shutdown: CancellationToken,
) {
    let cfg = &shared.config;
    let force = shared.force.clone();
    let ctx = Arc::new(forward::ConnCtx::new(
        shared.clone(),
        peer,
        true,
        activity.clone(),
        Arc::new(framing::Signals::default()),
    ));
    // The streams run in the connection's task (see `coalesce`).
    let streams = coalesce::Streams::default();
    let mut b = hyper::server::conn::http2::Builder::new(streams.clone());
    b.timer(TokioTimer::new())
        .max_header_list_size(cfg.max_header_bytes as u32)
        .max_concurrent_streams(256)
        .initial_stream_window_size(1 << 20)
        .initial_connection_window_size(4 << 20)
        // What h2 keeps of a stream's response that the client has not taken (its window, or
        // its socket, full): one piece (see `forward::PIECE`), not hyper's default of 400 KiB.
        // A body whose last pieces fit there is done as far as the body knows, and no longer
        // watched by `proxy.send_timeout`; 256 streams of a client that read nothing held
        // 100 MB per connection that way (an attacker's finding).
        .max_send_buf_size(forward::PIECE);
    // Writes gathered per turn of the connection's task (see `coalesce`).
    // Control frames counted against what the client asks for (see `frames`).
    let followed = frames::Frames::new(tls_stream, activity.clone());
    let conn = coalesce::wrap(followed, streams, |io| {
        b.serve_connection(TokioIo::new(io), ctx.service())
    });
    drive!(
        conn,
        |c| c.get_mut().conn().graceful_shutdown(),
        activity,
        cfg,
        shutdown,
        force
    );
}

/// A plain HTTP/1.1 connection idle this long between two requests is parked: hyper's side of it
/// (its read and write buffers, 16 KiB) is dropped until the client sends again.
const PARK_AFTER: Duration = Duration::from_secs(1);

/// HTTP/1.1 on `io` (plain or TLS), its request framing followed (see [`framing`]).
///
/// A plain connection idle between two requests for [`PARK_AFTER`] is parked: hyper's connection
/// is taken apart (its buffers freed) and the socket waited on alone, until the client sends
/// the next request (a new hyper connection then reads it) or the idle deadline passes. Parked
/// only when nothing can be lost: no request in flight, nothing of the next one read, no write
/// waiting for the client, and a connection that stays open (see `framing::Signals`).
/// `signals`: what its follower and its handler tell each other (a TLS connection's cork reads
/// them too, see `cork`).
async fn serve_h1<S>(
    io: S,
    peer: SocketAddr,
    https: bool,
    shared: &Arc<Shared>,
    activity: Arc<Activity>,
    shutdown: CancellationToken,
    signals: Arc<framing::Signals>,
) where
    S: AsyncRead + AsyncWrite + Socket + Unpin + Send + 'static,
{
    let cfg = &shared.config;
    activity.head_begins();
    let plain = io.tcp().is_some();
    let mut io = framing::Framing::new(
        io,
        cfg.max_header_bytes,
        signals.clone(),
        Some(activity.clone()),
    );
    let ctx = Arc::new(forward::ConnCtx::new(
        shared.clone(),
        peer,
        https,
        activity.clone(),
        signals.clone(),
    ));
    loop {
        // Boxed, hyper's connection with it: freed when the connection is parked, so that a
        // parked connection holds only what is below.
        let served = Box::pin(serve_until_parked(
            io, shared, &ctx, &activity, &signals, plain, &shutdown,
        ))
        .await;
        let Some((back, read_buf)) = served else {
            return;
        };
        io = back;
        ctx.parked();
        tracing::debug!(target: "regobox::proxy", peer = %peer, "idle connection parked");
        count_release();
        if !read_buf.is_empty() {
            // Line breaks before a request line, at most (anything else would have been
            // followed): hyper reads them again.
            io.replay(read_buf);
            continue;
        }
        // hyper's read buffer goes with its last handle.
        drop(read_buf);
        let Some(tcp) = io.get_ref().tcp() else {
            return;
        };
        // Idle at `idle_timeout`, unless the client is still taking what the kernel holds for
        // it (see `Activity::still_taking`): looked at halfway, then every half second.
        let (idle, half, tick) = (
            cfg.idle_timeout,
            cfg.idle_timeout / 2,
            Duration::from_millis(500),
        );
        loop {
            let quiet = activity.quiet_for();
            let next = if quiet < half {
                half - quiet
            } else if quiet < idle {
                (idle - quiet).min(tick)
            } else {
                tick
            };
            // (`proxy.force` is cancelled only after `shutdown`.)
            tokio::select! {
                r = tcp.readable() => if r.is_err() { return } else { break },
                _ = tokio::time::sleep(next) => {
                    let quiet = activity.quiet_for();
                    if quiet >= half {
                        let taking = activity.still_taking(idle);
                        if quiet >= idle && !taking {
                            activity.idle_closed.store(true, Ordering::Relaxed);
                            return;
                        }
                    }
                }
                _ = shutdown.cancelled() => return,
            }
        }
    }
}

/// hyper's HTTP/1.1 connection on `io` until it is over (`None`) or, a plain connection, parked
/// (see [`serve_h1`]): then its io back, with what hyper had read of it and not used.
async fn serve_until_parked<S>(
    io: framing::Framing<S>,
    shared: &Shared,
    ctx: &Arc<forward::ConnCtx>,
    activity: &Activity,
    signals: &framing::Signals,
    plain: bool,
    shutdown: &CancellationToken,
) -> Option<(framing::Framing<S>, bytes::Bytes)>
where
    S: AsyncRead + AsyncWrite + Socket + Unpin + Send + 'static,
{
    let (cfg, force) = (&shared.config, &shared.force);
    let mut conn = h1(cfg)
        .serve_connection(TokioIo::new(io), ctx.clone().service())
        .with_upgrades();
    let mut draining = false;
    let mut idle = IdleClose::default();
    // (See `sentry`.)
    let mut sentry = sentry::Sentry::new(Some(shutdown), force, Duration::from_millis(500));
    loop {
        tokio::select! {
            biased;
            // (Closed as idle or not, what the kernel still holds for the client is left to
            // `linger`.)
            // (Each poll of hyper's connection a turn: see `cork`.)
            ended = std::future::poll_fn(|cx| {
                signals.next_turn();
                Pin::new(&mut conn).poll(cx)
            }) => {
                // A head hyper answered itself has its access line too.
                if let Err(e) = ended {
                    ctx.refused(&e);
                }
                return None;
            }
            e = sentry.next() => {
                if e == sentry::Event::Shutdown {
                    draining = true;
                    Pin::new(&mut conn).graceful_shutdown();
                    continue;
                }
                if e == sentry::Event::Force {
                    return None;
                }
                match activity.overdue(cfg) {
                    Overdue::No => {}
                    Overdue::Cut => {
                        if activity.head_timed_out(cfg.header_timeout) {
                            ctx.unread(hyper::StatusCode::REQUEST_TIMEOUT.as_u16());
                        }
                        activity.reset_if_untaken();
                        return None;
                    }
                    Overdue::Idle => match idle.on_idle() {
                        Step::Ask => {
                            activity.idle_closed.store(true, Ordering::Relaxed);
                            draining = true;
                            Pin::new(&mut conn).graceful_shutdown();
                            continue;
                        }
                        Step::Wait => continue,
                        Step::Cut => return None,
                    },
                }
                if plain
                    && !draining
                    && activity.in_flight.load(Ordering::Relaxed) == 0
                    && signals.between_requests()
                    && !activity.write_blocked.load(Ordering::Relaxed)
                    && activity.idle_for() >= PARK_AFTER
                {
                    break;
                }
            }
        }
    }
    let parts = conn.into_parts()?;
    drop(parts.service);
    Some((parts.io.into_inner(), parts.read_buf))
}

fn h1(cfg: &ProxyConfig) -> hyper::server::conn::http1::Builder {
    let mut b = hyper::server::conn::http1::Builder::new();
    // The header deadline is the connection watchdog's (see `drive!`): hyper's own would also
    // cut idle keep-alive connections.
    b.timer(TokioTimer::new())
        .header_read_timeout(None)
        .max_buf_size(cfg.max_header_bytes.max(8192))
        .keep_alive(true);
    b
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::hash::BuildHasher;

    /// Addresses of one /64 that differ only in the high bits of a word (which a plain multiply
    /// keeps out of the low bits, the bucket, whatever its key) spread over the buckets.
    #[test]
    fn addresses_chosen_to_collide_do_not_share_a_bucket() {
        let hash = AddressHash::default();
        let buckets: std::collections::HashSet<u64> = (0..4096u128)
            .map(|i| {
                let address = std::net::Ipv6Addr::from((0x2001_0db8u128 << 96) | (i << 52));
                hash.hash_one(IpAddr::V6(address)) & 2047
            })
            .collect();
        assert!(buckets.len() > 1000, "{} buckets of 2048", buckets.len());
    }

    #[test]
    fn an_ipv6_client_counts_by_its_64() {
        let key = |a: &str| address_key(a.parse().unwrap()).to_string();
        assert_eq!(key("2001:db8:1:2:aaaa::1"), "2001:db8:1:2::");
        assert_eq!(key("2001:db8:1:2:ffff:ffff:ffff:ffff"), "2001:db8:1:2::");
        assert_ne!(key("2001:db8:1:3::1"), key("2001:db8:1:2::1"));
        assert_eq!(key("::ffff:192.0.2.7"), "192.0.2.7");
        assert_eq!(key("192.0.2.7"), "192.0.2.7");
    }

    #[test]
    fn the_caps_fit_the_open_files_limit() {
        let mut p = ProxyConfig::default();
        assert_eq!(fit_open_files(&mut p, 1 << 20, 2), Vec::<String>::new());
        assert_eq!(p.max_connections, ProxyConfig::default().max_connections);
        let lowered = fit_open_files(&mut p, 1024, 2);
        assert_eq!(
            (
                p.max_connections,
                p.upstream_max,
                p.upstream_keepalive,
                p.max_connections_per_address,
                p.upstream_max_per_address
            ),
            (512, 256, 32, 128, 64),
            "{lowered:?}"
        );
        // Every descriptor counted: clients, the application's in use, the pools' idle ones.
        let used = p.max_connections + p.upstream_max + 2 * 2 * p.upstream_keepalive;
        assert!(used < 1024, "{used}");
        assert_eq!(lowered.len(), 5, "{lowered:?}");
    }
}

//! The layered configuration.
//!
//! Layers, later wins: the compiled defaults ([`Config::default`]), then every `*.toml` file of
//! the configuration directories sorted by file name across all directories (Grocker's
//! convention: `10_low.toml` < `50_default.toml` < `90_override.toml`, so a user's mounted
//! `/config/90_x.toml` overrides one key of the image's `/etc/regobox/50_default.toml`), then
//! environment variables `REGOBOX_<SECTION>__<KEY>`.
//!
//! Loading never stops at the first problem: every unknown key, wrong type and impossible value
//! is collected, each named with the file or variable that set it, and reported together as one
//! [`ConfigError`] (exit code 78). The merged [`figment::Figment`] is kept so that
//! `regobox config --origin` can say which layer set every key.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::providers::{Format, Serialized, Toml};
use figment::value::{Dict, Map, Value};
use figment::{Figment, Metadata, Profile, Provider, Source};
use serde::{Deserialize, Serialize};

/// The prefix of configuration environment variables.
pub const ENV_PREFIX: &str = "REGOBOX_";
/// Separator between key levels in an environment variable name.
pub const ENV_SEPARATOR: &str = "__";
/// `REGOBOX_*` variables that are not configuration keys (they configure the command line).
/// The last five are exported to services (see the supervisor), so a `regobox` run from a service
/// must not take them for configuration.
pub const ENV_RESERVED: &[&str] = &[
    "REGOBOX_CONFIG_DIR",
    "REGOBOX_LOG",
    "REGOBOX_LOG_FORMAT",
    "REGOBOX_SERVICE",
    "REGOBOX_VOLUMES_ROOT",
    "REGOBOX_FILES_DIR",
    "REGOBOX_LOGS_DIR",
    "REGOBOX_BACKUPS_DIR",
    "REGOBOX_FAULT_INJECT",
];
/// Configuration directories used when none is given: the image's defaults, then the user's.
pub const DEFAULT_CONFIG_DIRS: &[&str] = &["/etc/regobox", "/config"];
/// What replaces a secret when the configuration is printed.
pub const REDACTED: &str = "<redacted>";

/// The whole configuration, as validated. Every field has a default.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Directory for sockets and files that live only as long as the container (not on a volume).
    pub runtime_dir: PathBuf,
    /// Grocker's scripts mount: `regobox exec NAME` runs `<scripts_dir>/NAME` when it exists.
    pub scripts_dir: PathBuf,
    pub volumes: VolumesConfig,
    pub postgres: PostgresConfig,
    pub app: AppConfig,
    pub services: BTreeMap<String, ServiceConfig>,
    pub cron: BTreeMap<String, CronConfig>,
    pub logs: LogsConfig,
    pub supervision: SupervisionConfig,
    pub backup: BackupConfig,
    pub docker: DockerConfig,
    pub proxy: ProxyConfig,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            runtime_dir: PathBuf::from("/run/regobox"),
            scripts_dir: PathBuf::from("/scripts"),
            volumes: VolumesConfig::default(),
            postgres: PostgresConfig::default(),
            app: AppConfig::default(),
            services: BTreeMap::new(),
            cron: BTreeMap::new(),
            logs: LogsConfig::default(),
            supervision: SupervisionConfig::default(),
            backup: BackupConfig::default(),
            docker: DockerConfig::default(),
            proxy: ProxyConfig::default(),
        }
    }
}

/// `[proxy]`: TLS on 80/443 and the reverse proxy to the application.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProxyConfig {
    pub enabled: bool,
    /// The application, `http://host:port`.
    pub upstream: String,
    pub listen: String,
    /// Plain HTTP (0: off): a permanent redirect to https, but for `plain_http_paths`.
    pub http_port: u16,
    /// HTTPS, HTTP/1.1 and HTTP/2 (0: off).
    pub https_port: u16,
    /// `false`: port 80 proxies everything instead of redirecting.
    pub redirect_http: bool,
    /// The host clients reach https on, for redirects from port 80 (empty: the request's
    /// host).
    pub public_host: String,
    /// The port clients reach https on, for redirects (0: `https_port`). With `docker run -p
    /// 38443:443`, 38443.
    pub public_https_port: u16,
    /// `Strict-Transport-Security` on https responses: its max-age (0: not sent, the default;
    /// once a browser has seen it, it refuses plain HTTP to this host for that long).
    #[serde(with = "humantime_serde")]
    pub hsts_max_age: Duration,
    /// Add `includeSubDomains` to it.
    pub hsts_include_subdomains: bool,
    /// Path prefixes proxied over plain HTTP on port 80 (callbacks from pipeline containers).
    pub plain_http_paths: Vec<String>,
    /// The names this server answers to (the self-signed certificate's, ACME's by default).
    pub hostnames: Vec<String>,
    /// Peers (IP or CIDR) whose X-Forwarded-* / Forwarded headers are kept and extended.
    pub trusted_proxies: Vec<String>,
    /// Time allowed for a request's headers (slowloris).
    #[serde(with = "humantime_serde")]
    pub header_timeout: Duration,
    /// A connection with no request in flight for this long since its last request is closed
    /// (keep-alive, silent connections); bytes that ask for nothing (line breaks, PINGs) do not
    /// keep it open.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub handshake_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub upstream_connect_timeout: Duration,
    /// The application must make progress within this: its response head, then each read of
    /// its body (504 if the head does not come; the response cut if its body stalls). The
    /// time a request body is still being sent to it does not count.
    #[serde(with = "humantime_serde")]
    pub upstream_read_timeout: Duration,
    /// A request body must make progress within this, between two reads (408, closed).
    #[serde(with = "humantime_serde")]
    pub client_body_timeout: Duration,
    /// A request body must average at least this many bytes a second once
    /// `client_body_timeout` has passed since it began (0: no floor): a body trickled just
    /// within the progress deadline does not hold a connection to the application for ever.
    pub client_body_min_rate: u64,
    /// A response must be taken by the client within this, between two pieces (nginx's
    /// `send_timeout`): a client that stops reading, or holds an HTTP/2 stream at a zero
    /// window, has its connection closed.
    #[serde(with = "humantime_serde")]
    pub send_timeout: Duration,
    /// An upgraded connection (WebSocket) with no byte either way for this long is closed.
    #[serde(with = "humantime_serde")]
    pub websocket_idle_timeout: Duration,
    /// Connections to the application one client connection's requests may hold at once
    /// (HTTP/2 streams, a WebSocket); beyond, 503 with `Retry-After`.
    pub upstream_max_per_connection: usize,
    /// Connections to the application the requests of one client address (all its
    /// connections) may hold at once; beyond, 503 with `Retry-After` (0: no such cap). Behind a
    /// trusted proxy, every client has the proxy's address: raise it or set 0.
    pub upstream_max_per_address: usize,
    /// Connections to the application all requests may hold at once; beyond, 503 with
    /// `Retry-After`.
    pub upstream_max: usize,
    /// Client connections open at once (at most half the open files limit, which regobox
    /// raises to its hard limit); beyond, new ones wait in the kernel's backlog until one ends.
    pub max_connections: usize,
    /// Client connections one address (an IPv6 client's /64) may have open at once; beyond,
    /// its new ones are closed at once (0: no such cap). Behind a trusted proxy, or a lab's
    /// NAT, many clients share an address: raise it or set 0.
    pub max_connections_per_address: usize,
    /// Idle keep-alive connections to the application kept per worker (nginx's `keepalive`);
    /// more are opened under load, and as many again as this are kept until unused for a second.
    pub upstream_keepalive: usize,
    /// Largest request head (431 beyond).
    pub max_header_bytes: usize,
    /// At stop, in-flight requests get this long to finish.
    #[serde(with = "humantime_serde")]
    pub grace: Duration,
    /// One line per request in the log.
    pub access_log: bool,
    /// Threads serving connections (0: one per CPU).
    pub workers: usize,
    pub tls: ProxyTlsConfig,
    pub acme: AcmeConfig,
    /// `[[proxy.static]]`: directories served directly.
    #[serde(rename = "static")]
    pub statics: Vec<StaticDir>,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            enabled: true,
            upstream: "http://127.0.0.1:8500".into(),
            listen: "0.0.0.0".into(),
            http_port: 80,
            https_port: 443,
            redirect_http: true,
            public_host: String::new(),
            public_https_port: 0,
            hsts_max_age: Duration::ZERO,
            hsts_include_subdomains: false,
            plain_http_paths: Vec::new(),
            hostnames: vec!["localhost".into()],
            trusted_proxies: Vec::new(),
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(75),
            handshake_timeout: Duration::from_secs(10),
            upstream_connect_timeout: Duration::from_secs(5),
            upstream_read_timeout: Duration::from_secs(60),
            client_body_timeout: Duration::from_secs(60),
            client_body_min_rate: 500,
            send_timeout: Duration::from_secs(60),
            websocket_idle_timeout: Duration::from_secs(3600),
            upstream_max_per_connection: 64,
            upstream_max_per_address: 256,
            upstream_max: 1024,
            max_connections: 10_000,
            max_connections_per_address: 1_000,
            upstream_keepalive: 256,
            max_header_bytes: 32 * 1024,
            grace: Duration::from_secs(5),
            access_log: true,
            workers: 0,
            tls: ProxyTlsConfig::default(),
            acme: AcmeConfig::default(),
            statics: Vec::new(),
        }
    }
}

/// `[proxy.tls]`: the certificate. Neither set and no ACME: a self-signed certificate for
/// `proxy.hostnames`, generated once and kept on the volume.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProxyTlsConfig {
    /// PEM, full chain (RSA or ECDSA).
    pub cert: PathBuf,
    pub key: PathBuf,
    /// How often the files are checked for changes (picked up without a restart).
    #[serde(with = "humantime_serde")]
    pub reload_interval: Duration,
}

impl Default for ProxyTlsConfig {
    fn default() -> Self {
        ProxyTlsConfig {
            cert: PathBuf::new(),
            key: PathBuf::new(),
            reload_interval: Duration::from_secs(2),
        }
    }
}

/// `[proxy.acme]`: certificates from an ACME CA (HTTP-01, answered by regobox on port 80).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AcmeConfig {
    /// The directory URL, e.g. https://acme-v02.api.letsencrypt.org/directory (empty: off).
    pub directory: String,
    /// e.g. ["mailto:admin@example.org"].
    pub contact: Vec<String>,
    /// Empty: `proxy.hostnames`.
    pub hostnames: Vec<String>,
    /// Extra CA certificates (PEM) trusted for the directory (a private or test CA).
    pub ca_bundle: PathBuf,
    /// Renew when the certificate expires within this.
    #[serde(with = "humantime_serde")]
    pub renew_before: Duration,
    /// How often expiry is checked.
    #[serde(with = "humantime_serde")]
    pub check_interval: Duration,
}

impl Default for AcmeConfig {
    fn default() -> Self {
        AcmeConfig {
            directory: String::new(),
            contact: Vec::new(),
            hostnames: Vec::new(),
            ca_bundle: PathBuf::new(),
            renew_before: Duration::from_secs(30 * 24 * 3600),
            check_interval: Duration::from_secs(12 * 3600),
        }
    }
}

/// One `[[proxy.static]]` entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StaticDir {
    /// URL path prefix, e.g. "/static/".
    pub prefix: String,
    pub dir: PathBuf,
}

/// `[docker]`: the host's Docker engine, offered to the application through a socket of
/// regobox's that enforces `[docker.policy]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DockerConfig {
    /// `false` turns the bridge off (no socket, no `DOCKER_HOST` for the application).
    pub enabled: bool,
    /// The engine: `unix:///path`, `tcp://host:port` (TLS when `tls_ca` is set). Empty:
    /// `DOCKER_HOST`, else `unix:///var/run/docker.sock`.
    pub host: String,
    /// TLS to a remote engine: the CA that signed the engine's certificate, and this client's
    /// certificate and key (PEM). Empty: `$DOCKER_CERT_PATH/{ca,cert,key}.pem` when
    /// `DOCKER_TLS_VERIFY` is set.
    pub tls_ca: PathBuf,
    pub tls_cert: PathBuf,
    pub tls_key: PathBuf,
    /// The socket given to the application (its `DOCKER_HOST`). Empty: `<runtime_dir>/docker.sock`.
    pub proxy_socket: PathBuf,
    /// Paths as regobox sees them -> the host paths behind them, for bind sources. Empty:
    /// found by inspecting regobox's own container; outside a container, paths are the host's.
    pub host_paths: BTreeMap<String, String>,
    /// The value of the `regobox.instance` label on everything the application creates. Empty:
    /// generated once and kept on the volume (`secrets/docker-instance`).
    pub instance: String,
    /// At start, this instance's containers that exited longer ago than this are removed
    /// (0s: never).
    #[serde(with = "humantime_serde")]
    pub gc_after: Duration,
    /// At stop, stop this instance's running containers too (default: leave jobs running).
    pub stop_jobs: bool,
    /// Largest request body regobox reads to check it (container create, network create).
    pub max_inspected_body: u64,
    /// Largest build context, spooled to a temporary file so that its Dockerfile is read
    /// before the build is forwarded.
    pub max_build_context: u64,
    /// Bodies spooled at once (build contexts, copies into a job): each takes up to
    /// `max_build_context` of the temporary directory (a build twice: its context as sent and
    /// as forwarded). More wait their turn.
    pub max_spooled: usize,
    /// Connections the application may hold open to the socket at once. At the cap, regobox
    /// accepts no more until one closes (the application's connects wait), and says so.
    pub max_connections: usize,
    /// A connection with no request in progress (idle between requests, or a request's head
    /// not yet whole) is closed after this; so is one whose client takes nothing of what is
    /// written to it for as long.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    pub limits: DockerLimits,
    pub policy: DockerPolicyConfig,
}

impl Default for DockerConfig {
    fn default() -> Self {
        DockerConfig {
            enabled: true,
            host: String::new(),
            tls_ca: PathBuf::new(),
            tls_cert: PathBuf::new(),
            tls_key: PathBuf::new(),
            proxy_socket: PathBuf::new(),
            host_paths: BTreeMap::new(),
            instance: String::new(),
            gc_after: Duration::from_secs(24 * 3600),
            stop_jobs: false,
            max_inspected_body: 1024 * 1024,
            max_build_context: 1 << 30,
            max_spooled: 2,
            max_connections: 128,
            idle_timeout: Duration::from_secs(60),
            limits: DockerLimits::default(),
            policy: DockerPolicyConfig::default(),
        }
    }
}

/// `[docker.limits]`: ceilings of a container the application creates. A create that sets none
/// (or 0, or -1) gets the ceiling; one that asks for more is refused (0 or "": no ceiling).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DockerLimits {
    /// Memory, in bytes or with a unit (`512m`, `2g`).
    pub memory: String,
    /// CPUs (e.g. 1.5).
    pub cpus: f64,
    /// Processes.
    pub pids: i64,
    /// Size of /dev/shm, in bytes or with a unit.
    pub shm: String,
    /// Networks the application may have at once (0: no ceiling). Each bridge takes a subnet
    /// from the engine's address pools, about 30 in all on a default engine, shared with the
    /// host: past them, nobody on the host creates a network.
    pub networks: u32,
}

impl Default for DockerLimits {
    fn default() -> Self {
        DockerLimits {
            memory: String::new(),
            cpus: 0.0,
            pids: 4096,
            shm: String::new(),
            networks: 8,
        }
    }
}

/// `[docker.policy]`: what the application may ask of the engine.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DockerPolicyConfig {
    /// Bind sources (as the application names them) must lie under one of these. Empty:
    /// the files volume (`<volumes.root>/files`).
    pub bind_roots: Vec<PathBuf>,
    /// The registries the application may pull from (`host[:port]`; `docker.io` is Docker
    /// Hub). The engine contacts a registry, and the authentication server it names, from the
    /// host's network: an address of the application's choosing would reach the host's own.
    pub registries: Vec<String>,
}

impl Default for DockerPolicyConfig {
    fn default() -> Self {
        DockerPolicyConfig {
            bind_roots: Vec::new(),
            registries: vec!["docker.io".into()],
        }
    }
}

/// `512m`, `2g`, `1048576` -> bytes.
pub fn parse_bytes(text: &str) -> Option<i64> {
    let t = text.trim().to_ascii_lowercase();
    let t = t
        .strip_suffix("ib")
        .or_else(|| t.strip_suffix('b'))
        .unwrap_or(&t);
    let (digits, mult) = match t.chars().last()? {
        'k' => (&t[..t.len() - 1], 1i64 << 10),
        'm' => (&t[..t.len() - 1], 1 << 20),
        'g' => (&t[..t.len() - 1], 1 << 30),
        't' => (&t[..t.len() - 1], 1 << 40),
        _ => (t, 1),
    };
    let n: f64 = digits.trim().parse().ok()?;
    (n >= 0.0 && n.is_finite()).then_some((n * mult as f64) as i64)
}

/// `[backup]`: archives of the database and the file volumes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BackupConfig {
    /// Directories under `volumes.root` to include; empty: all of them but the database and the
    /// backups themselves.
    pub include: Vec<String>,
    /// Where archives are written and listed; empty: `<volumes.root>/backups`.
    pub dir: PathBuf,
    /// After each backup into `dir`, keep only the newest `keep` archives (0: keep all).
    pub keep: u32,
    /// Automatic backups inside `regobox run`, in cron syntax (empty: none).
    pub schedule: String,
    /// zstd compression level, 1 (fastest) to 19.
    pub level: i32,
}

impl Default for BackupConfig {
    fn default() -> Self {
        BackupConfig {
            include: Vec::new(),
            dir: PathBuf::new(),
            keep: 0,
            schedule: String::new(),
            level: 3,
        }
    }
}

/// `[app]`: what every service, cron job and one-off command shares.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AppConfig {
    /// The OS user services run as unless they name one (empty: regobox's own user).
    pub user: String,
    /// Environment variables given to every service, cron job and command.
    pub env: BTreeMap<String, String>,
    /// Names of environment variables whose values are generated once on first boot and kept
    /// in `<volumes.root>/secrets/app-<NAME>` (0600), e.g. `["SECRET_KEY"]`.
    pub secrets: Vec<String>,
    /// Files rendered (minijinja) from config values and secrets before services start.
    pub templates: Vec<TemplateConfig>,
}

/// One `[[app.templates]]` entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TemplateConfig {
    pub source: PathBuf,
    pub destination: PathBuf,
    /// Octal permission bits of the rendered file.
    #[serde(default = "default_template_mode")]
    pub mode: String,
}

fn default_template_mode() -> String {
    "0640".into()
}

/// Whether a service runs for good or runs once to completion.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ServiceKind {
    Longrun,
    Oneshot,
}

/// When a service that exited is started again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RestartMode {
    Always,
    OnFailure,
    Never,
}

/// How readiness of a service is established: exactly one of `tcp`, `http`, `command`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReadyConfig {
    /// `host:port` (or a port on 127.0.0.1, as a string or a number) that accepts a TCP
    /// connection.
    #[serde(deserialize_with = "string_or_port")]
    pub tcp: String,
    /// An `http://` URL answering with a 2xx or 3xx status.
    pub http: String,
    /// A command (argv) exiting with 0, run with the service's environment and user.
    pub command: Vec<String>,
    /// Time between attempts.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// Not ready by then: the start failed (the child is stopped and the restart policy applies).
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
}

impl Default for ReadyConfig {
    fn default() -> Self {
        ReadyConfig {
            tcp: String::new(),
            http: String::new(),
            command: Vec::new(),
            interval: Duration::from_millis(250),
            timeout: Duration::from_secs(60),
        }
    }
}

/// One `[services.<name>]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServiceConfig {
    /// The program and its arguments (no shell).
    pub command: Vec<String>,
    pub env: BTreeMap<String, String>,
    /// Working directory (empty: regobox's).
    pub workdir: PathBuf,
    /// OS user (empty: `app.user`).
    pub user: String,
    /// Services, or `postgres`, that must be ready before this one starts.
    pub depends_on: Vec<String>,
    pub kind: ServiceKind,
    pub ready: Option<ReadyConfig>,
    /// Default: `always` for a longrun, `never` for a oneshot.
    pub restart: Option<RestartMode>,
    /// When it fails for good, regobox stops everything. Default: true for a longrun.
    pub essential: Option<bool>,
    pub stop_signal: String,
    #[serde(with = "humantime_serde")]
    pub stop_timeout: Duration,
    /// First restart delay, doubled at each consecutive failure up to `backoff_max`.
    #[serde(with = "humantime_serde")]
    pub backoff_initial: Duration,
    #[serde(with = "humantime_serde")]
    pub backoff_max: Duration,
    /// More than `restart_limit` failures within `restart_window`: the service is FATAL.
    pub restart_limit: u32,
    #[serde(with = "humantime_serde")]
    pub restart_window: Duration,
}

impl Default for ServiceConfig {
    fn default() -> Self {
        ServiceConfig {
            command: Vec::new(),
            env: BTreeMap::new(),
            workdir: PathBuf::new(),
            user: String::new(),
            depends_on: Vec::new(),
            kind: ServiceKind::Longrun,
            ready: None,
            restart: None,
            essential: None,
            stop_signal: "SIGTERM".into(),
            stop_timeout: Duration::from_secs(10),
            backoff_initial: Duration::from_secs(1),
            backoff_max: Duration::from_secs(30),
            restart_limit: 5,
            restart_window: Duration::from_secs(60),
        }
    }
}

impl ServiceConfig {
    pub fn restart_mode(&self) -> RestartMode {
        self.restart.unwrap_or(match self.kind {
            ServiceKind::Longrun => RestartMode::Always,
            ServiceKind::Oneshot => RestartMode::Never,
        })
    }

    pub fn is_essential(&self) -> bool {
        self.essential.unwrap_or(self.kind == ServiceKind::Longrun)
    }
}

/// One `[cron.<name>]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CronConfig {
    /// Five fields (minute hour day-of-month month day-of-week); a sixth, leading field for
    /// seconds is accepted.
    pub schedule: String,
    /// IANA time zone the schedule is read in (empty: UTC).
    pub timezone: String,
    pub command: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub workdir: PathBuf,
    /// OS user (empty: `app.user`).
    pub user: String,
    /// A run still going after this long is stopped (SIGTERM, then SIGKILL 10 s later).
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
}

impl Default for CronConfig {
    fn default() -> Self {
        CronConfig {
            schedule: String::new(),
            timezone: String::new(),
            command: Vec::new(),
            env: BTreeMap::new(),
            workdir: PathBuf::new(),
            user: String::new(),
            timeout: Duration::from_secs(24 * 3600),
        }
    }
}

/// `[logs]`: the copies of every child's output kept under `<volumes.root>/logs`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogsConfig {
    /// A log file is rotated when it reaches this many bytes.
    pub max_bytes: u64,
    /// Rotated files kept (`name.log.1` ... `name.log.<keep>`).
    pub keep: u32,
}

impl Default for LogsConfig {
    fn default() -> Self {
        LogsConfig {
            max_bytes: 10 * 1024 * 1024,
            keep: 5,
        }
    }
}

/// `[supervision]`: the health port (Grocker's 8081) and the final stop deadline.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SupervisionConfig {
    pub listen: String,
    /// 0 disables the port.
    pub port: u16,
    /// After a stop request, everything left is killed by then.
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Duration,
}

impl Default for SupervisionConfig {
    fn default() -> Self {
        SupervisionConfig {
            listen: "0.0.0.0".into(),
            port: 8081,
            shutdown_timeout: Duration::from_secs(30),
        }
    }
}

/// The signal named `name` (`SIGTERM`, `TERM`, `term`...).
pub fn parse_signal(name: &str) -> Option<nix::sys::signal::Signal> {
    let upper = name.trim().to_ascii_uppercase();
    let full = if upper.starts_with("SIG") {
        upper
    } else {
        format!("SIG{upper}")
    };
    full.parse().ok()
}

/// The pseudo-service every service may depend on.
pub const POSTGRES_SERVICE: &str = "postgres";

/// Service names in an order where every service comes after its dependencies, or the cycle.
pub fn start_order(services: &BTreeMap<String, ServiceConfig>) -> Result<Vec<String>, Vec<String>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        New,
        Active,
        Done,
    }
    fn visit(
        name: &str,
        services: &BTreeMap<String, ServiceConfig>,
        marks: &mut BTreeMap<String, Mark>,
        path: &mut Vec<String>,
        out: &mut Vec<String>,
    ) -> Result<(), Vec<String>> {
        match marks.get(name).copied() {
            Some(Mark::Done) | None => return Ok(()),
            Some(Mark::Active) => {
                let start = path.iter().position(|p| p == name).unwrap_or(0);
                let mut cycle = path[start..].to_vec();
                cycle.push(name.to_string());
                return Err(cycle);
            }
            Some(Mark::New) => {}
        }
        marks.insert(name.to_string(), Mark::Active);
        path.push(name.to_string());
        if let Some(svc) = services.get(name) {
            for dep in &svc.depends_on {
                visit(dep, services, marks, path, out)?;
            }
        }
        path.pop();
        marks.insert(name.to_string(), Mark::Done);
        out.push(name.to_string());
        Ok(())
    }
    let mut marks: BTreeMap<String, Mark> =
        services.keys().map(|k| (k.clone(), Mark::New)).collect();
    let mut out = Vec::new();
    for name in services.keys() {
        visit(name, services, &mut marks, &mut Vec::new(), &mut out)?;
    }
    Ok(out)
}

/// `[volumes]`: where the persistent data lives.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VolumesConfig {
    /// The root of the data volume(s): `db/`, `secrets/`, `logs/`, `files/`, `backups/`.
    pub root: PathBuf,
    /// Below this many free bytes on the volume, regobox warns and `/readyz` answers 503, and a
    /// scheduled backup that would take it lower is not started.
    pub min_free: u64,
}

impl Default for VolumesConfig {
    fn default() -> Self {
        VolumesConfig {
            root: PathBuf::from("/volumes"),
            min_free: 1 << 30,
        }
    }
}

/// Whether regobox runs the PostgreSQL server itself or the app uses an external one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PostgresMode {
    Embedded,
    External,
}

/// What `run` does with a cluster of an older major than the server binaries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UpgradePolicy {
    /// Upgrade it in place with pg_upgrade, keeping the old cluster.
    Auto,
    /// Refuse, naming `regobox upgrade`.
    Manual,
}

/// How pg_upgrade makes the new cluster's files.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UpgradeMethod {
    /// `--clone` where the file system can (reflinks: instant, no extra space), else `--copy`.
    Auto,
    Clone,
    Copy,
    /// `--link`: the new cluster hard-links the old one's files (fast, no extra space); once
    /// the new server has run, the old cluster cannot be put back. Never automatic: `regobox
    /// upgrade` takes a backup archive first, and a rollback after the new server has run is
    /// a restore of that archive.
    Link,
}

/// One server setting (`postgresql.conf` parameter) value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum SettingValue {
    Bool(bool),
    Int(i64),
    Float(f64),
    Text(String),
}

impl fmt::Display for SettingValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SettingValue::Bool(b) => write!(f, "{}", if *b { "on" } else { "off" }),
            SettingValue::Int(i) => write!(f, "{i}"),
            SettingValue::Float(x) => write!(f, "{x}"),
            SettingValue::Text(s) => f.write_str(s),
        }
    }
}

/// `[postgres]`: the database server and the application's role and database.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PostgresConfig {
    pub mode: PostgresMode,
    /// Directory of the server binaries; empty means auto-detect.
    pub bin_dir: PathBuf,
    /// The cluster's data directory; empty means `<volumes.root>/db/pgdata`.
    pub data_dir: PathBuf,
    /// `listen_addresses`: comma-separated addresses, `*` for all, empty for the Unix socket only.
    pub listen: String,
    pub port: u16,
    /// The application's database.
    pub database: String,
    /// The application's role, owner of the database.
    pub user: String,
    /// The application role's password; empty means generated once and kept on the volume.
    pub password: String,
    /// External mode: the URL of the server the application uses.
    pub url: String,
    /// Extensions created in the application database (e.g. `uuid-ossp`).
    pub extensions: Vec<String>,
    /// Server settings, passed to `postgres` as `-c key=value`.
    pub settings: BTreeMap<String, SettingValue>,
    /// The unprivileged OS account the server runs as when regobox runs as root.
    pub os_user: String,
    /// The cluster's bootstrap superuser role.
    pub superuser: String,
    /// Locale given to `initdb` for a new cluster.
    pub locale: String,
    /// How long the server may take to accept connections (crash recovery included).
    #[serde(with = "humantime_serde")]
    pub start_timeout: Duration,
    /// How long a fast shutdown (SIGINT) may take before regobox escalates.
    #[serde(with = "humantime_serde")]
    pub stop_timeout: Duration,
    /// A cluster of an older major: upgraded in place (`auto`) or refused (`manual`).
    pub upgrade: UpgradePolicy,
    /// How pg_upgrade makes the new cluster's files.
    pub upgrade_method: UpgradeMethod,
    /// How long the old cluster is kept after an upgrade (`regobox upgrade --finish` removes it
    /// sooner, `--rollback` puts it back).
    #[serde(with = "humantime_serde")]
    pub upgrade_keep_old: Duration,
    /// More directories of server binaries of older majors, for pg_upgrade.
    pub old_bin_dirs: Vec<PathBuf>,
}

impl Default for PostgresConfig {
    fn default() -> Self {
        PostgresConfig {
            mode: PostgresMode::Embedded,
            bin_dir: PathBuf::new(),
            data_dir: PathBuf::new(),
            listen: "127.0.0.1".into(),
            port: 5432,
            database: "app".into(),
            user: "app".into(),
            password: String::new(),
            url: String::new(),
            extensions: Vec::new(),
            settings: BTreeMap::new(),
            os_user: "postgres".into(),
            superuser: "postgres".into(),
            locale: "C.UTF-8".into(),
            start_timeout: Duration::from_secs(300),
            stop_timeout: Duration::from_secs(8),
            upgrade: UpgradePolicy::Auto,
            upgrade_method: UpgradeMethod::Auto,
            upgrade_keep_old: Duration::from_secs(7 * 24 * 3600),
            old_bin_dirs: Vec::new(),
        }
    }
}

/// Keys whose default is computed from another key.
const DERIVED: &[(&str, &str)] = &[
    ("postgres.data_dir", "volumes.root"),
    ("backup.dir", "volumes.root"),
    ("docker.proxy_socket", "runtime_dir"),
    ("docker.policy.bind_roots", "volumes.root"),
];

/// Server settings regobox sets itself, with the key that controls each.
const RESERVED_SETTINGS: &[(&str, &str)] = &[
    ("port", "postgres.port"),
    ("listen_addresses", "postgres.listen"),
    ("unix_socket_directories", "runtime_dir"),
    ("data_directory", "postgres.data_dir"),
    ("config_file", "postgres.data_dir"),
    ("hba_file", "runtime_dir"),
    ("ident_file", "postgres.data_dir"),
    ("external_pid_file", "postgres.data_dir"),
];

/// Where a key's value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// The compiled default.
    Default,
    /// The compiled default, computed from another key.
    Derived(&'static str),
    /// A configuration file.
    File(PathBuf),
    /// An environment variable (its full name).
    Env(String),
    /// The command line (`--config-dir`) or `REGOBOX_CONFIG_DIR`.
    CommandLine,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Default => f.write_str("default"),
            Origin::Derived(from) => write!(f, "default (derived from {from})"),
            Origin::File(path) => write!(f, "file {}", path.display()),
            Origin::Env(var) => write!(f, "environment variable {var}"),
            Origin::CommandLine => f.write_str("--config-dir / REGOBOX_CONFIG_DIR"),
        }
    }
}

/// One configuration problem: where, which key, what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub origin: Origin,
    pub key: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            write!(f, "{}: {}", self.origin, self.message)
        } else {
            write!(f, "{}: key `{}`: {}", self.origin, self.key, self.message)
        }
    }
}

/// Every problem found while loading the configuration.
#[derive(Debug, thiserror::Error)]
pub struct ConfigError {
    pub problems: Vec<Problem>,
}

impl ConfigError {
    fn one(origin: Origin, key: &str, message: impl Into<String>) -> Self {
        ConfigError {
            problems: vec![Problem {
                origin,
                key: key.into(),
                message: message.into(),
            }],
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.problems.len();
        write!(
            f,
            "invalid configuration ({n} problem{}):",
            if n == 1 { "" } else { "s" }
        )?;
        for p in &self.problems {
            write!(f, "\n  - {p}")?;
        }
        Ok(())
    }
}

/// A loaded, validated configuration and what is needed to explain it.
#[derive(Debug)]
pub struct Loaded {
    pub config: Config,
    /// The configuration directories that were read, in order.
    pub dirs: Vec<PathBuf>,
    /// The files that were merged, in merge order.
    pub files: Vec<PathBuf>,
    figment: Figment,
}

impl Loaded {
    /// Which layer set `key` (dotted path).
    pub fn origin(&self, key: &str) -> Origin {
        origin_in(&self.figment, key)
    }

    /// The effective configuration as TOML, secrets redacted; with `origins`, every key is
    /// followed by a comment naming the layer that set it.
    pub fn to_toml(&self, origins: bool) -> String {
        let redacted = self.config.redacted();
        let value = match toml::Value::try_from(&redacted) {
            Ok(v) => v,
            Err(e) => return format!("# cannot render configuration: {e}\n"),
        };
        let mut out = String::new();
        if let toml::Value::Table(table) = value {
            let origin = |key: &str| origins.then(|| self.origin(key).to_string());
            write_table(&mut out, &[], &table, &origin);
        }
        out
    }
}

/// Where the configuration comes from.
#[derive(Debug, Clone, Default)]
pub struct Sources {
    /// Directories given explicitly; when empty, [`DEFAULT_CONFIG_DIRS`] that exist are used.
    pub dirs: Vec<PathBuf>,
    /// The process environment (all of it; only `REGOBOX_*` is looked at).
    pub env: Vec<(String, String)>,
}

impl Sources {
    /// The given directories (or the defaults) and the process environment.
    pub fn from_process(dirs: Vec<PathBuf>) -> Self {
        Sources {
            dirs,
            env: std::env::vars_os()
                .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
                .collect(),
        }
    }
}

/// Load, merge and validate the configuration; every problem is reported at once.
pub fn load(sources: &Sources) -> Result<Loaded, ConfigError> {
    let mut problems = Vec::new();

    // The configuration directories.
    let dirs: Vec<PathBuf> = if sources.dirs.is_empty() {
        DEFAULT_CONFIG_DIRS
            .iter()
            .map(PathBuf::from)
            .filter(|d| d.is_dir())
            .collect()
    } else {
        for dir in &sources.dirs {
            if !dir.is_dir() {
                problems.push(Problem {
                    origin: Origin::CommandLine,
                    key: String::new(),
                    message: format!(
                        "configuration directory {} does not exist or is not a directory",
                        dir.display()
                    ),
                });
            }
        }
        sources.dirs.clone()
    };

    // Every `*.toml` file, sorted by file name across directories (later directory wins a tie).
    let mut files: Vec<(std::ffi::OsString, usize, PathBuf)> = Vec::new();
    for (index, dir) in dirs.iter().enumerate() {
        let Ok(entries) = std::fs::read_dir(dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "toml") && path.is_file() {
                files.push((entry.file_name(), index, path));
            }
        }
    }
    files.sort();
    let files: Vec<PathBuf> = files.into_iter().map(|(_, _, p)| p).collect();

    let mut figment = Figment::from(Serialized::defaults(Config::default()));
    for file in &files {
        // Parse once here so that a syntax error is reported with the others, not instead.
        match std::fs::read_to_string(file) {
            Ok(text) => match text.parse::<toml::Table>() {
                Ok(_) => figment = figment.merge(Toml::file_exact(file)),
                Err(e) => {
                    let line = e
                        .span()
                        .map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1);
                    problems.push(Problem {
                        origin: Origin::File(file.clone()),
                        key: String::new(),
                        message: format!(
                            "not valid TOML{}: {}",
                            line.map(|l| format!(" (line {l})")).unwrap_or_default(),
                            e.message().trim_end()
                        ),
                    })
                }
            },
            Err(e) => problems.push(Problem {
                origin: Origin::File(file.clone()),
                key: String::new(),
                message: format!("cannot read: {e}"),
            }),
        }
    }
    let (env, env_problems) = EnvLayer::from_vars(&sources.env);
    problems.extend(env_problems);
    figment = figment.merge(env);

    let mut config = extract_all(&figment, &mut problems);
    for (key, message) in config.validate() {
        problems.push(Problem {
            origin: origin_in(&figment, &key),
            key,
            message,
        });
    }
    if !problems.is_empty() {
        return Err(ConfigError { problems });
    }
    config.resolve();
    Ok(Loaded {
        config,
        dirs,
        files,
        figment,
    })
}

/// Extract the configuration, collecting every deserialisation error: each failing key is
/// recorded, dropped (its default then applies) and the extraction tried again.
fn extract_all(figment: &Figment, problems: &mut Vec<Problem>) -> Config {
    let mut dict: Dict = match figment.extract::<Dict>() {
        Ok(dict) => dict,
        Err(e) => {
            problems.push(Problem {
                origin: Origin::Default,
                key: String::new(),
                message: e.to_string(),
            });
            return Config::default();
        }
    };
    // Each round removes at least one key, so this ends; the bound is a safety net.
    for _ in 0..256 {
        match Figment::from(Serialized::globals(&dict)).extract::<Config>() {
            Ok(config) => return config,
            Err(errors) => {
                let mut removed_any = false;
                for error in errors {
                    let mut path = error.path.clone();
                    let message = match &error.kind {
                        figment::error::Kind::UnknownField(field, expected) => {
                            if path.last() != Some(field) {
                                path.push(field.clone());
                            }
                            format!("unknown key (expected one of: {})", expected.join(", "))
                        }
                        figment::error::Kind::InvalidType(actual, expected) => {
                            format!(
                                "wrong type: expected {}, found {actual}",
                                in_words(expected)
                            )
                        }
                        figment::error::Kind::InvalidValue(actual, expected) => {
                            format!(
                                "invalid value: expected {}, found {actual}",
                                in_words(expected)
                            )
                        }
                        figment::error::Kind::UnknownVariant(actual, expected) => {
                            format!(
                                "unknown value `{actual}` (expected one of: {})",
                                expected.join(", ")
                            )
                        }
                        other => other.to_string(),
                    };
                    let key = path.join(".");
                    problems.push(Problem {
                        origin: origin_in(figment, &key),
                        key,
                        message,
                    });
                    removed_any |= remove_path(&mut dict, &path);
                }
                if !removed_any {
                    break;
                }
            }
        }
    }
    Config::default()
}

/// Remove the value at `path` from `dict`; true if something was removed.
fn remove_path(dict: &mut Dict, path: &[String]) -> bool {
    match path {
        [] => false,
        [last] => dict.remove(last).is_some(),
        [first, rest @ ..] => match dict.get_mut(first) {
            Some(Value::Dict(_, inner)) => remove_path(inner, rest),
            Some(_) => dict.remove(first).is_some(),
            None => false,
        },
    }
}

/// The origin of `key` in `figment`.
fn origin_in(figment: &Figment, key: &str) -> Origin {
    let origin = match figment.find_metadata(key) {
        Some(md) => match &md.source {
            Some(Source::File(path)) => Origin::File(path.clone()),
            Some(Source::Custom(var)) if var == ENV_SOURCE => {
                let parts: Vec<&str> = key.split('.').collect();
                Origin::Env(md.interpolate(&Profile::Global, &parts))
            }
            _ => Origin::Default,
        },
        None => Origin::Default,
    };
    match origin {
        Origin::Default => DERIVED
            .iter()
            .find(|(k, _)| *k == key)
            .map_or(Origin::Default, |(_, from)| Origin::Derived(from)),
        other => other,
    }
}

const ENV_SOURCE: &str = "environment";

/// The environment layer: `REGOBOX_POSTGRES__PORT=5433` sets `postgres.port`. Values are parsed
/// as figment parses them (numbers, booleans, `[arrays]`, else strings).
struct EnvLayer {
    dict: Dict,
    /// (dotted key, variable name) of every variable taken, to name the one that set a key.
    names: std::sync::Arc<Vec<(String, String)>>,
}

impl EnvLayer {
    fn from_vars(vars: &[(String, String)]) -> (Self, Vec<Problem>) {
        let mut dict = Dict::new();
        let mut names = Vec::new();
        let mut problems = Vec::new();
        let mut vars: Vec<&(String, String)> = vars
            .iter()
            .filter(|(k, _)| k.starts_with(ENV_PREFIX) && !ENV_RESERVED.contains(&k.as_str()))
            .collect();
        vars.sort();
        for (name, value) in vars {
            let rest = &name[ENV_PREFIX.len()..];
            let parts: Vec<String> = rest
                .split(ENV_SEPARATOR)
                .map(|p| p.to_ascii_lowercase())
                .collect();
            let valid = parts.iter().all(|p| {
                !p.is_empty()
                    && p.chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
            });
            if !valid {
                problems.push(Problem {
                    origin: Origin::Env(name.clone()),
                    key: String::new(),
                    message: format!(
                        "not a configuration variable (expected {ENV_PREFIX}<SECTION>{ENV_SEPARATOR}<KEY>)"
                    ),
                });
                continue;
            }
            let parsed: Value = value.parse().unwrap_or_else(|_| Value::from(value.clone()));
            names.push((parts.join("."), name.clone()));
            let nested = figment::util::nest(&parts.join("."), parsed);
            if let Value::Dict(_, d) = nested {
                dict = merge_dicts(dict, d);
            }
        }
        (
            EnvLayer {
                dict,
                names: std::sync::Arc::new(names),
            },
            problems,
        )
    }
}

fn merge_dicts(mut base: Dict, other: Dict) -> Dict {
    for (k, v) in other {
        match (base.remove(&k), v) {
            (Some(Value::Dict(t, a)), Value::Dict(_, b)) => {
                base.insert(k, Value::Dict(t, merge_dicts(a, b)));
            }
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
    base
}

impl Provider for EnvLayer {
    fn metadata(&self) -> Metadata {
        let names = self.names.clone();
        Metadata::from("environment variable", Source::Custom(ENV_SOURCE.into())).interpolater(
            move |_: &Profile, keys: &[&str]| {
                let key = keys.join(".");
                let below = format!("{key}.");
                names
                    .iter()
                    .find(|(k, _)| *k == key || k.starts_with(&below))
                    .map(|(_, var)| var.clone())
                    .unwrap_or_else(|| {
                        let upper: Vec<String> =
                            keys.iter().map(|k| k.to_ascii_uppercase()).collect();
                        format!("{ENV_PREFIX}{}", upper.join(ENV_SEPARATOR))
                    })
            },
        )
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        Ok(Profile::Global.collect(self.dict.clone()))
    }
}

impl Config {
    /// Semantic checks that types alone cannot express: (key, message) for each problem.
    pub fn validate(&self) -> Vec<(String, String)> {
        let mut out: Vec<(String, String)> = Vec::new();
        let mut bad = |key: &str, msg: String| out.push((key.to_string(), msg));
        let bad = &mut bad;

        if self.runtime_dir.as_os_str().is_empty() {
            bad("runtime_dir", "must not be empty".into());
        }
        if self.volumes.root.as_os_str().is_empty() {
            bad("volumes.root", "must not be empty".into());
        }
        let pg = &self.postgres;
        if pg.port == 0 {
            bad(
                "postgres.port",
                "must be between 1 and 65535 (0 is not a port)".into(),
            );
        }
        for item in pg.listen.split(',').map(str::trim) {
            if pg.listen.trim().is_empty() {
                break;
            }
            if item != "*" && item != "localhost" && item.parse::<IpAddr>().is_err() {
                bad(
                    "postgres.listen",
                    format!(
                        "`{item}` is not an IP address, `*` or `localhost` (use commas between addresses; empty for the Unix socket only)"
                    ),
                );
            }
        }
        for (key, value) in [
            ("postgres.database", &pg.database),
            ("postgres.user", &pg.user),
            ("postgres.superuser", &pg.superuser),
        ] {
            if let Err(msg) = check_identifier(value) {
                bad(key, msg);
            }
        }
        if pg.password.contains('\0') {
            bad("postgres.password", "must not contain a NUL byte".into());
        }
        if pg.os_user.trim().is_empty() {
            bad("postgres.os_user", "must not be empty".into());
        }
        if pg.locale.trim().is_empty() {
            bad("postgres.locale", "must not be empty".into());
        }
        if pg.start_timeout.is_zero() {
            bad("postgres.start_timeout", "must be longer than 0s".into());
        }
        if pg.stop_timeout.is_zero() {
            bad("postgres.stop_timeout", "must be longer than 0s".into());
        }
        match pg.mode {
            PostgresMode::External => {
                if pg.url.trim().is_empty() {
                    bad(
                        "postgres.url",
                        "must be set when postgres.mode = \"external\" (e.g. postgresql://user:password@db.example:5432/app)".into(),
                    );
                } else if !(pg.url.starts_with("postgres://")
                    || pg.url.starts_with("postgresql://"))
                {
                    bad(
                        "postgres.url",
                        "must be a postgresql:// or postgres:// URL".into(),
                    );
                } else if let Err(e) = crate::dburl::Target::parse(&pg.url) {
                    bad("postgres.url", format!("not a valid connection URL: {e}"));
                }
            }
            PostgresMode::Embedded => {}
        }
        for ext in &pg.extensions {
            let ok = !ext.is_empty()
                && ext
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
            if !ok {
                bad(
                    "postgres.extensions",
                    format!("`{ext}` is not an extension name"),
                );
            }
        }
        self.validate_supervision(bad);
        for (name, value) in &pg.settings {
            let key = format!("postgres.settings.{name}");
            let name_ok = !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '.');
            if !name_ok {
                bad(&key, "not a PostgreSQL setting name".into());
                continue;
            }
            if let Some((_, owner)) = RESERVED_SETTINGS.iter().find(|(s, _)| s == name) {
                bad(&key, format!("regobox sets `{name}` itself: use `{owner}`"));
            }
            if (name == "fsync" || name == "full_page_writes") && setting_is_off(value) {
                bad(
                    &key,
                    format!(
                        "turning {name} off risks losing or corrupting committed data after a crash; it is refused"
                    ),
                );
            }
        }
        out
    }

    fn validate_supervision(&self, bad: &mut dyn FnMut(&str, String)) {
        let env_name_ok = |n: &str| {
            !n.is_empty()
                && !n.starts_with(|c: char| c.is_ascii_digit())
                && n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        };
        for name in self.app.env.keys() {
            if !env_name_ok(name) {
                bad(
                    &format!("app.env.{name}"),
                    "not an environment variable name".into(),
                );
            }
        }
        for name in &self.app.secrets {
            if !env_name_ok(name) {
                bad(
                    "app.secrets",
                    format!("`{name}` is not an environment variable name"),
                );
            }
        }
        for (i, t) in self.app.templates.iter().enumerate() {
            if u32::from_str_radix(t.mode.trim_start_matches("0o"), 8).is_err() {
                bad(
                    &format!("app.templates[{i}].mode"),
                    format!("`{}` is not an octal mode such as \"0640\"", t.mode),
                );
            }
            if !t.destination.is_absolute() {
                bad(
                    &format!("app.templates[{i}].destination"),
                    "must be an absolute path".into(),
                );
            }
        }
        for (name, svc) in &self.services {
            let key = |k: &str| format!("services.{name}.{k}");
            let name_ok = !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
            if !name_ok {
                bad(
                    &format!("services.{name}"),
                    "a service name is made of letters, digits, `_` and `-`".into(),
                );
            }
            if name == POSTGRES_SERVICE {
                bad(
                    &format!("services.{name}"),
                    "`postgres` is the name of the database server; choose another".into(),
                );
            }
            if svc.command.is_empty() || svc.command[0].is_empty() {
                bad(
                    &key("command"),
                    "must name a program, e.g. [\"python\", \"app.py\"]".into(),
                );
            }
            for dep in &svc.depends_on {
                if dep != POSTGRES_SERVICE && !self.services.contains_key(dep) {
                    bad(
                        &key("depends_on"),
                        format!(
                            "unknown service `{dep}` (known: postgres, {})",
                            self.services.keys().cloned().collect::<Vec<_>>().join(", ")
                        ),
                    );
                }
                if dep == POSTGRES_SERVICE && self.postgres.mode == PostgresMode::External {
                    // The external server is checked at start like the embedded one: allowed.
                }
            }
            if parse_signal(&svc.stop_signal).is_none() {
                bad(
                    &key("stop_signal"),
                    format!("`{}` is not a signal name", svc.stop_signal),
                );
            }
            if svc.stop_timeout.is_zero() {
                bad(&key("stop_timeout"), "must be longer than 0s".into());
            }
            if svc.backoff_initial.is_zero() || svc.backoff_max < svc.backoff_initial {
                bad(
                    &key("backoff_max"),
                    "backoff_initial must be > 0 and backoff_max >= backoff_initial".into(),
                );
            }
            if svc.restart_window.is_zero() {
                bad(&key("restart_window"), "must be longer than 0s".into());
            }
            for var in svc.env.keys() {
                if !env_name_ok(var) {
                    bad(
                        &format!("services.{name}.env.{var}"),
                        "not an environment variable name".into(),
                    );
                }
            }
            if let Some(ready) = &svc.ready {
                let set = [
                    !ready.tcp.is_empty(),
                    !ready.http.is_empty(),
                    !ready.command.is_empty(),
                ]
                .iter()
                .filter(|b| **b)
                .count();
                if set != 1 {
                    bad(
                        &key("ready"),
                        "set exactly one of tcp, http or command".into(),
                    );
                }
                if !ready.tcp.is_empty() && parse_tcp_target(&ready.tcp).is_none() {
                    bad(
                        &key("ready.tcp"),
                        format!("`{}` is not host:port or a port", ready.tcp),
                    );
                }
                if !ready.http.is_empty() && !ready.http.starts_with("http://") {
                    bad(&key("ready.http"), "must be an http:// URL".into());
                }
                if ready.interval.is_zero() || ready.timeout.is_zero() {
                    bad(
                        &key("ready"),
                        "interval and timeout must be longer than 0s".into(),
                    );
                }
                if svc.kind == ServiceKind::Oneshot {
                    bad(
                        &key("ready"),
                        "a oneshot is ready when it exits with 0; it takes no ready probe".into(),
                    );
                }
            }
        }
        if let Err(cycle) = start_order(&self.services) {
            bad(
                &format!("services.{}.depends_on", cycle[0]),
                format!("dependency cycle: {}", cycle.join(" -> ")),
            );
        }
        for (name, job) in &self.cron {
            let key = |k: &str| format!("cron.{name}.{k}");
            if job.command.is_empty() || job.command[0].is_empty() {
                bad(&key("command"), "must name a program".into());
            }
            if let Err(e) = job.schedule.parse::<croner::Cron>() {
                bad(
                    &key("schedule"),
                    format!("`{}` is not a cron schedule: {e}", job.schedule),
                );
            } else if job.schedule.split_whitespace().count() > 6 {
                bad(
                    &key("schedule"),
                    "use 5 fields (or 6 with leading seconds)".into(),
                );
            }
            if !job.timezone.is_empty() && job.timezone.parse::<chrono_tz::Tz>().is_err() {
                bad(
                    &key("timezone"),
                    format!(
                        "`{}` is not an IANA time zone such as Europe/Paris",
                        job.timezone
                    ),
                );
            }
            if job.timeout.is_zero() {
                bad(&key("timeout"), "must be longer than 0s".into());
            }
        }
        if self.logs.max_bytes < 1024 {
            bad("logs.max_bytes", "must be at least 1024".into());
        }
        if self.supervision.port != 0 && self.supervision.listen.parse::<IpAddr>().is_err() {
            bad(
                "supervision.listen",
                format!("`{}` is not an IP address", self.supervision.listen),
            );
        }
        for inc in &self.backup.include {
            let p = Path::new(inc);
            if inc.is_empty()
                || p.is_absolute()
                || p.components()
                    .any(|c| !matches!(c, std::path::Component::Normal(_)))
            {
                bad(
                    "backup.include",
                    format!("`{inc}` must be a directory name under volumes.root"),
                );
            }
        }
        if !(1..=19).contains(&self.backup.level) {
            bad("backup.level", "must be between 1 and 19".into());
        }
        if !self.backup.schedule.is_empty() {
            if let Err(e) = self.backup.schedule.parse::<croner::Cron>() {
                bad(
                    "backup.schedule",
                    format!("`{}` is not a cron schedule: {e}", self.backup.schedule),
                );
            }
        }
        self.validate_docker(bad);
        self.validate_proxy(bad);
        if self.supervision.shutdown_timeout.is_zero() {
            bad(
                "supervision.shutdown_timeout",
                "must be longer than 0s".into(),
            );
        }
    }

    fn validate_proxy(&self, bad: &mut dyn FnMut(&str, String)) {
        let p = &self.proxy;
        if !p.enabled {
            return;
        }
        match p.upstream.strip_prefix("http://") {
            Some(rest) if !rest.is_empty() && rest.parse::<hyper::Uri>().is_ok() => {}
            _ => bad(
                "proxy.upstream",
                format!("`{}` is not an http://host:port URL", p.upstream),
            ),
        }
        if p.listen.parse::<IpAddr>().is_err() {
            bad(
                "proxy.listen",
                format!("`{}` is not an IP address", p.listen),
            );
        }
        if p.http_port != 0 && p.http_port == p.https_port {
            bad(
                "proxy.http_port",
                format!("is the same as proxy.https_port ({})", p.https_port),
            );
        }
        for (key, port) in [
            ("proxy.http_port", p.http_port),
            ("proxy.https_port", p.https_port),
        ] {
            if port != 0 && port == self.supervision.port {
                bad(key, format!("is the same as supervision.port ({port})"));
            }
        }
        for prefix in &p.plain_http_paths {
            if !prefix.starts_with('/') {
                bad(
                    "proxy.plain_http_paths",
                    format!("`{prefix}` must start with `/`"),
                );
            }
        }
        if p.hostnames.is_empty() {
            bad("proxy.hostnames", "must name at least one host".into());
        }
        for h in &p.hostnames {
            let ok = !h.is_empty()
                && h.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '*' | ':'));
            if !ok {
                bad("proxy.hostnames", format!("`{h}` is not a host name"));
            }
        }
        let h = &p.public_host;
        if !h.is_empty()
            && !h
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '[' | ']'))
        {
            bad("proxy.public_host", format!("`{h}` is not a host name"));
        }
        for t in &p.trusted_proxies {
            if crate::proxy::net::Cidr::parse(t).is_none() {
                bad(
                    "proxy.trusted_proxies",
                    format!("`{t}` is not an IP address or CIDR block"),
                );
            }
        }
        for (key, d) in [
            ("proxy.header_timeout", p.header_timeout),
            ("proxy.idle_timeout", p.idle_timeout),
            ("proxy.handshake_timeout", p.handshake_timeout),
            ("proxy.upstream_connect_timeout", p.upstream_connect_timeout),
            ("proxy.upstream_read_timeout", p.upstream_read_timeout),
            ("proxy.client_body_timeout", p.client_body_timeout),
            ("proxy.send_timeout", p.send_timeout),
            ("proxy.websocket_idle_timeout", p.websocket_idle_timeout),
            ("proxy.tls.reload_interval", p.tls.reload_interval),
        ] {
            if d.is_zero() {
                bad(key, "must be longer than 0s".into());
            }
        }
        for (key, n) in [
            (
                "proxy.upstream_max_per_connection",
                p.upstream_max_per_connection,
            ),
            ("proxy.upstream_max", p.upstream_max),
        ] {
            if n == 0 {
                bad(key, "must be at least 1".into());
            }
        }
        if p.max_header_bytes < 8192 {
            bad("proxy.max_header_bytes", "must be at least 8192".into());
        }
        let (cert, key) = (&p.tls.cert, &p.tls.key);
        if cert.as_os_str().is_empty() != key.as_os_str().is_empty() {
            bad(
                if cert.as_os_str().is_empty() {
                    "proxy.tls.cert"
                } else {
                    "proxy.tls.key"
                },
                "proxy.tls.cert and proxy.tls.key go together".into(),
            );
        }
        let a = &p.acme;
        if !a.directory.is_empty() {
            if !(a.directory.starts_with("https://") || a.directory.starts_with("http://")) {
                bad(
                    "proxy.acme.directory",
                    format!("`{}` is not a URL", a.directory),
                );
            }
            if !cert.as_os_str().is_empty() {
                bad(
                    "proxy.acme.directory",
                    "set either proxy.tls.cert/key or proxy.acme, not both".into(),
                );
            }
            if p.http_port == 0 {
                bad(
                    "proxy.acme.directory",
                    "ACME's HTTP-01 challenge needs proxy.http_port".into(),
                );
            }
            for c in &a.contact {
                if !c.contains(':') {
                    bad(
                        "proxy.acme.contact",
                        format!("`{c}` is not a URL (e.g. mailto:admin@example.org)"),
                    );
                }
            }
            if a.check_interval.is_zero() {
                bad("proxy.acme.check_interval", "must be longer than 0s".into());
            }
        }
        for s in &p.statics {
            if !s.prefix.starts_with('/') {
                bad(
                    "proxy.static.prefix",
                    format!("`{}` must start with `/`", s.prefix),
                );
            }
            if !s.dir.is_absolute() {
                bad(
                    "proxy.static.dir",
                    format!("`{}` must be an absolute path", s.dir.display()),
                );
            }
        }
    }

    fn validate_docker(&self, bad: &mut dyn FnMut(&str, String)) {
        let d = &self.docker;
        if !(d.host.is_empty() || d.host.starts_with("unix:///") || d.host.starts_with("tcp://")) {
            bad(
                "docker.host",
                format!("`{}` is not unix:///path or tcp://host:port", d.host),
            );
        }
        let tls = [
            ("docker.tls_ca", &d.tls_ca),
            ("docker.tls_cert", &d.tls_cert),
            ("docker.tls_key", &d.tls_key),
        ];
        let set = tls
            .iter()
            .filter(|(_, p)| !p.as_os_str().is_empty())
            .count();
        if set != 0 && set != 3 {
            for (key, p) in tls {
                if p.as_os_str().is_empty() {
                    bad(key, "must be set with the other docker.tls_* keys".into());
                }
            }
        }
        if !d.proxy_socket.as_os_str().is_empty() && !d.proxy_socket.is_absolute() {
            bad("docker.proxy_socket", "must be an absolute path".into());
        }
        for (inside, host) in &d.host_paths {
            if !inside.starts_with('/') || !host.starts_with('/') {
                bad(
                    &format!("docker.host_paths.{inside}"),
                    format!("both sides must be absolute paths (`{inside}` = `{host}`)"),
                );
            }
        }
        for root in &d.policy.bind_roots {
            let dotted = root.components().any(|c| {
                matches!(
                    c,
                    std::path::Component::ParentDir | std::path::Component::CurDir
                )
            });
            if !root.is_absolute() || dotted || root == Path::new("/") {
                bad(
                    "docker.policy.bind_roots",
                    format!(
                        "`{}` must be an absolute path other than `/`, without `.` or `..`",
                        root.display()
                    ),
                );
            }
        }
        if !d.limits.memory.is_empty() && parse_bytes(&d.limits.memory).is_none() {
            bad(
                "docker.limits.memory",
                format!("`{}` is not a size (e.g. 512m, 2g)", d.limits.memory),
            );
        }
        if !d.limits.shm.is_empty() && parse_bytes(&d.limits.shm).is_none() {
            bad(
                "docker.limits.shm",
                format!("`{}` is not a size (e.g. 64m)", d.limits.shm),
            );
        }
        if d.limits.cpus < 0.0 || !d.limits.cpus.is_finite() {
            bad("docker.limits.cpus", "must be 0 or more".into());
        }
        if d.limits.pids < 0 {
            bad("docker.limits.pids", "must be 0 or more".into());
        }
        if d.max_inspected_body < 1024 {
            bad(
                "docker.max_inspected_body",
                "must be at least 1024 bytes".into(),
            );
        }
        for (key, value) in [
            ("docker.max_spooled", d.max_spooled),
            ("docker.max_connections", d.max_connections),
        ] {
            if value == 0 {
                bad(key, "must be at least 1".into());
            }
        }
        if d.idle_timeout < Duration::from_secs(1) {
            bad("docker.idle_timeout", "must be at least 1s".into());
        }
    }

    /// Fill in derived defaults and make paths absolute (relative to the working directory).
    fn resolve(&mut self) {
        let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/"));
        let abs = |p: &Path| {
            if p.is_absolute() {
                p.to_path_buf()
            } else {
                cwd.join(p)
            }
        };
        self.runtime_dir = abs(&self.runtime_dir);
        self.volumes.root = abs(&self.volumes.root);
        self.scripts_dir = abs(&self.scripts_dir);
        if self.backup.dir.as_os_str().is_empty() {
            self.backup.dir = self.volumes.root.join("backups");
        } else {
            self.backup.dir = abs(&self.backup.dir);
        }
        if self.postgres.data_dir.as_os_str().is_empty() {
            self.postgres.data_dir = self.volumes.root.join("db").join("pgdata");
        } else {
            self.postgres.data_dir = abs(&self.postgres.data_dir);
        }
        if !self.postgres.bin_dir.as_os_str().is_empty() {
            self.postgres.bin_dir = abs(&self.postgres.bin_dir);
        }
        if self.docker.proxy_socket.as_os_str().is_empty() {
            self.docker.proxy_socket = self.runtime_dir.join("docker.sock");
        }
        if self.docker.policy.bind_roots.is_empty() {
            self.docker.policy.bind_roots = vec![self.volumes.root.join("files")];
        }
    }

    /// A copy fit for printing: secrets replaced by [`REDACTED`].
    pub fn redacted(&self) -> Config {
        let mut c = self.clone();
        if !c.postgres.password.is_empty() {
            c.postgres.password = REDACTED.into();
        }
        c.postgres.url = redact_url(&c.postgres.url);
        let redact_env = |env: &mut BTreeMap<String, String>| {
            for (k, v) in env.iter_mut() {
                if looks_secret(k) && !v.is_empty() {
                    *v = REDACTED.into();
                }
            }
        };
        redact_env(&mut c.app.env);
        c.services.values_mut().for_each(|s| redact_env(&mut s.env));
        c.cron.values_mut().for_each(|j| redact_env(&mut j.env));
        c
    }
}

/// Whether an environment variable name suggests a secret value (printed redacted).
fn looks_secret(name: &str) -> bool {
    let upper = name.to_ascii_uppercase();
    ["PASSWORD", "PASSWD", "SECRET", "TOKEN", "KEY", "CREDENTIAL"]
        .iter()
        .any(|w| upper.contains(w))
}

fn setting_is_off(value: &SettingValue) -> bool {
    match value {
        SettingValue::Bool(b) => !b,
        SettingValue::Int(i) => *i == 0,
        SettingValue::Float(x) => *x == 0.0,
        SettingValue::Text(s) => {
            matches!(
                s.trim().to_ascii_lowercase().as_str(),
                "off" | "false" | "no" | "0" | "f" | "n"
            )
        }
    }
}

/// `host:port`, or a bare port meaning 127.0.0.1.
/// What serde expected, in a user's words rather than Rust's (the configuration's `u16` keys
/// are all ports).
fn in_words(expected: &str) -> String {
    match expected {
        "u16" => "a port number (0-65535)".into(),
        "u8" => "a whole number from 0 to 255".into(),
        "u32" => "a whole number from 0 to 4294967295".into(),
        "u64" | "usize" => "a whole number, 0 or more".into(),
        "i32" | "i64" | "isize" => "a whole number".into(),
        "f32" | "f64" => "a number".into(),
        "a sequence" => "a list (`[...]`)".into(),
        "a map" => "a table (`{ ... }` or a `[section]`)".into(),
        other => other.into(),
    }
}

/// `ready.tcp`: a string, or a port given as a number.
fn string_or_port<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Target {
        Text(String),
        Port(u16),
    }
    match Target::deserialize(d) {
        Ok(Target::Text(t)) => Ok(t),
        Ok(Target::Port(p)) => Ok(p.to_string()),
        Err(_) => Err(serde::de::Error::custom(
            "expected \"host:port\" or a port number (0-65535)",
        )),
    }
}

pub fn parse_tcp_target(text: &str) -> Option<(String, u16)> {
    let text = text.trim();
    if let Ok(port) = text.parse::<u16>() {
        return (port != 0).then(|| ("127.0.0.1".to_string(), port));
    }
    let (host, port) = text.rsplit_once(':')?;
    let port: u16 = port.parse().ok().filter(|p| *p != 0)?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    (!host.is_empty()).then(|| (host.to_string(), port))
}

/// A role or database name: 1 to 63 bytes, no NUL, no surrounding spaces.
fn check_identifier(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("must not be empty".into());
    }
    if name.len() > 63 {
        return Err(format!(
            "`{name}` is {} bytes long; PostgreSQL names are at most 63",
            name.len()
        ));
    }
    if name.contains('\0') || name.trim() != name {
        return Err(format!(
            "`{name}` contains a NUL byte or surrounding spaces"
        ));
    }
    Ok(())
}

/// Replace the password of a `scheme://user:password@host/...` URL.
pub fn redact_url(url: &str) -> String {
    let (url, query) = match url.split_once('?') {
        Some((u, q)) => (u, Some(q)),
        None => (url, None),
    };
    // A password in the query (refused by validation, but printed while saying so).
    let query = query.map(|q| {
        q.split('&')
            .map(|pair| match pair.split_once('=') {
                Some((k, _)) if k.eq_ignore_ascii_case("password") || k.contains('%') => {
                    format!("{k}={REDACTED}")
                }
                _ => pair.to_string(),
            })
            .collect::<Vec<_>>()
            .join("&")
    });
    let with_query = |base: String| match &query {
        Some(q) => format!("{base}?{q}"),
        None => base,
    };
    let Some(scheme_end) = url.find("://") else {
        return with_query(url.to_string());
    };
    let rest = &url[scheme_end + 3..];
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    let Some(at) = authority.rfind('@') else {
        return with_query(url.to_string());
    };
    let userinfo = &authority[..at];
    let Some(colon) = userinfo.find(':') else {
        return with_query(url.to_string());
    };
    with_query(format!(
        "{}{}:{REDACTED}{}",
        &url[..scheme_end + 3],
        &userinfo[..colon],
        &rest[at..]
    ))
}

/// Print a TOML table: scalars first, then sub-tables under `[a.b]` headers.
fn write_table(
    out: &mut String,
    path: &[String],
    table: &toml::Table,
    origin: &dyn Fn(&str) -> Option<String>,
) {
    use std::fmt::Write as _;
    let key_of = |k: &str| {
        let mut p = path.to_vec();
        p.push(k.to_string());
        p.join(".")
    };
    let is_table = |v: &toml::Value| matches!(v, toml::Value::Table(_));
    let mut wrote_scalar = false;
    for (k, v) in table.iter().filter(|(_, v)| !is_table(v)) {
        let _ = write!(out, "{} = {}", toml_key(k), v);
        if let Some(o) = origin(&key_of(k)) {
            let _ = write!(out, "  # {o}");
        }
        out.push('\n');
        wrote_scalar = true;
    }
    for (k, v) in table.iter() {
        if let toml::Value::Table(sub) = v {
            let mut p = path.to_vec();
            p.push(k.to_string());
            if wrote_scalar || !out.is_empty() {
                out.push('\n');
            }
            let header: Vec<String> = p.iter().map(|s| toml_key(s)).collect();
            let _ = writeln!(out, "[{}]", header.join("."));
            if sub.is_empty() {
                if let Some(o) = origin(&p.join(".")) {
                    let _ = writeln!(out, "# (empty)  # {o}");
                }
            }
            write_table(out, &p, sub, origin);
            wrote_scalar = false;
        }
    }
}

/// A key as TOML writes it: bare when possible, quoted otherwise.
fn toml_key(k: &str) -> String {
    if !k.is_empty()
        && k.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        k.to_string()
    } else {
        toml::Value::String(k.to_string()).to_string()
    }
}

/// A single problem as a [`ConfigError`], for checks made outside [`load`].
pub fn error(origin: Origin, key: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::one(origin, key, message)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(vars: &[(&str, &str)]) -> Sources {
        Sources {
            dirs: vec![],
            env: vars
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    fn with_dir(files: &[(&str, &str)], vars: &[(&str, &str)]) -> (tempfile::TempDir, Sources) {
        let dir = tempfile::tempdir().unwrap();
        for (name, body) in files {
            std::fs::write(dir.path().join(name), body).unwrap();
        }
        let mut s = env(vars);
        s.dirs = vec![dir.path().to_path_buf()];
        (dir, s)
    }

    #[test]
    fn defaults_are_valid_and_derive_the_data_dir() {
        let (_d, s) = with_dir(&[], &[]);
        let loaded = load(&s).unwrap();
        assert_eq!(loaded.config.postgres.port, 5432);
        assert_eq!(
            loaded.config.postgres.data_dir,
            PathBuf::from("/volumes/db/pgdata")
        );
        assert_eq!(
            loaded.origin("postgres.data_dir"),
            Origin::Derived("volumes.root")
        );
        assert_eq!(loaded.origin("postgres.port"), Origin::Default);
    }

    #[test]
    fn files_merge_in_name_order_across_directories_then_env_wins() {
        let image = tempfile::tempdir().unwrap();
        let user = tempfile::tempdir().unwrap();
        std::fs::write(
            image.path().join("50_default.toml"),
            "[postgres]\nport = 5000\ndatabase = \"img\"\nuser = \"img\"\n",
        )
        .unwrap();
        std::fs::write(user.path().join("10_low.toml"), "[postgres]\nport = 4000\n").unwrap();
        std::fs::write(
            user.path().join("90_x.toml"),
            "[postgres]\ndatabase = \"mine\"\n",
        )
        .unwrap();
        let s = Sources {
            dirs: vec![image.path().into(), user.path().into()],
            env: vec![("REGOBOX_POSTGRES__USER".into(), "fromenv".into())],
        };
        let loaded = load(&s).unwrap();
        let pg = &loaded.config.postgres;
        assert_eq!(pg.port, 5000, "50_default beats 10_low");
        assert_eq!(pg.database, "mine", "90_x beats 50_default");
        assert_eq!(pg.user, "fromenv", "environment beats files");
        assert_eq!(
            loaded.origin("postgres.port"),
            Origin::File(image.path().join("50_default.toml"))
        );
        assert_eq!(
            loaded.origin("postgres.user"),
            Origin::Env("REGOBOX_POSTGRES__USER".into())
        );
    }

    #[test]
    fn every_problem_is_reported_with_its_origin() {
        let (dir, s) = with_dir(
            &[
                (
                    "50_a.toml",
                    "[postgres]\nportt = 1\nport = \"high\"\nmode = \"sideways\"\n",
                ),
                ("60_b.toml", "[nosuch]\nx = 1\n"),
                ("70_c.toml", "this is = = not toml"),
            ],
            &[
                ("REGOBOX_POSTGRES__START_TIMEOUT", "soon"),
                ("REGOBOX_POSTGRES__EXTENSIONS", "[\"bad name\"]"),
                ("REGOBOX_CONFIG_DIR", "/ignored"),
                ("REGOBOX_WEIRD___", "1"),
            ],
        );
        let err = load(&s).unwrap_err();
        let a = Origin::File(dir.path().join("50_a.toml"));
        let find = |key: &str| err.problems.iter().find(|p| p.key == key);
        assert_eq!(find("postgres.portt").unwrap().origin, a);
        assert!(
            find("postgres.portt")
                .unwrap()
                .message
                .contains("unknown key")
        );
        assert_eq!(find("postgres.port").unwrap().origin, a);
        assert_eq!(find("postgres.mode").unwrap().origin, a);
        assert_eq!(
            find("nosuch").unwrap().origin,
            Origin::File(dir.path().join("60_b.toml"))
        );
        assert_eq!(
            find("postgres.start_timeout").unwrap().origin,
            Origin::Env("REGOBOX_POSTGRES__START_TIMEOUT".into())
        );
        assert_eq!(
            find("postgres.extensions").unwrap().origin,
            Origin::Env("REGOBOX_POSTGRES__EXTENSIONS".into())
        );
        assert!(
            err.problems
                .iter()
                .any(|p| p.origin == Origin::File(dir.path().join("70_c.toml"))
                    && p.message.contains("not valid TOML"))
        );
        assert!(
            err.problems
                .iter()
                .any(|p| p.origin == Origin::Env("REGOBOX_WEIRD___".into()))
        );
        assert_eq!(err.problems.len(), 8, "{err}");
    }

    #[test]
    fn impossible_values_are_refused() {
        let (_d, s) = with_dir(
            &[(
                "50.toml",
                "[postgres]\nport = 0\nmode = \"external\"\nlisten = \"1.2.3.4, nowhere\"\n[postgres.settings]\nfsync = false\nport = 1\n",
            )],
            &[],
        );
        let err = load(&s).unwrap_err();
        let keys: Vec<&str> = err.problems.iter().map(|p| p.key.as_str()).collect();
        for k in [
            "postgres.port",
            "postgres.url",
            "postgres.listen",
            "postgres.settings.fsync",
            "postgres.settings.port",
        ] {
            assert!(keys.contains(&k), "{k} missing from {err}");
        }
    }

    #[test]
    fn a_missing_explicit_directory_is_an_error() {
        let s = Sources {
            dirs: vec![PathBuf::from("/nonexistent/regobox-config")],
            env: vec![],
        };
        let err = load(&s).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/regobox-config"));
    }

    #[test]
    fn secrets_are_redacted_and_origins_printed() {
        let (_d, s) = with_dir(
            &[(
                "50.toml",
                "[postgres]\npassword = \"hunter2\"\n[postgres.settings]\nwork_mem = \"64MB\"\n",
            )],
            &[(
                "REGOBOX_POSTGRES__URL",
                "postgresql://u:topsecret@db:5432/x",
            )],
        );
        let loaded = load(&s).unwrap();
        let text = loaded.to_toml(true);
        assert!(
            !text.contains("hunter2") && !text.contains("topsecret"),
            "{text}"
        );
        assert!(text.contains("password = \"<redacted>\""), "{text}");
        assert!(
            text.contains("url = \"postgresql://u:<redacted>@db:5432/x\"  # environment variable REGOBOX_POSTGRES__URL"),
            "{text}"
        );
        assert!(text.contains("work_mem = \"64MB\"  # file "), "{text}");
        // The plain rendering is valid TOML that loads back to the same configuration.
        let plain = loaded.to_toml(false);
        let back: Config = toml::from_str(&plain).unwrap();
        assert_eq!(back.postgres.settings, loaded.config.postgres.settings);
    }

    /// Issue 17: `ready.tcp` takes a port as a number too, and a value of the wrong type is
    /// described in a user's words, not Rust's.
    #[test]
    fn a_port_is_a_number_and_errors_speak_of_ports() {
        let (_d, s) = with_dir(
            &[(
                "50.toml",
                "[services.web]\ncommand = [\"web\"]\nready = { tcp = 8500 }\n",
            )],
            &[],
        );
        let loaded = load(&s).unwrap();
        assert_eq!(
            loaded.config.services["web"].ready.as_ref().unwrap().tcp,
            "8500"
        );

        let (_d, s) = with_dir(
            &[(
                "50.toml",
                "[postgres]\nport = 70000\n[services.web]\ncommand = [\"web\"]\nready = { tcp = true }\n",
            )],
            &[("REGOBOX_SUPERVISION__PORT", "abc")],
        );
        let text = load(&s).unwrap_err().to_string();
        for needle in [
            "key `supervision.port`: wrong type: expected a port number (0-65535), found string \"abc\"",
            "key `postgres.port`: invalid value: expected a port number (0-65535), found signed int `70000`",
            "key `services.web.ready.tcp`: expected \"host:port\" or a port number (0-65535)",
        ] {
            assert!(text.contains(needle), "{needle:?} missing from:\n{text}");
        }
        assert!(!text.contains("u16"), "{text}");
    }

    /// A public host that would break or steer the redirect's `Location` is refused.
    #[test]
    fn a_public_host_must_be_a_host_name() {
        let (_d, s) = with_dir(
            &[("50.toml", "[proxy]\npublic_host = \"evil.example/@x y\"\n")],
            &[],
        );
        let text = load(&s).unwrap_err().to_string();
        assert!(
            text.contains("key `proxy.public_host`: `evil.example/@x y` is not a host name"),
            "{text}"
        );
        let (_d, s) = with_dir(
            &[("50.toml", "[proxy]\npublic_host = \"lab.example.org\"\n")],
            &[],
        );
        assert!(load(&s).is_ok());
    }

    #[test]
    fn services_dependency_errors_name_the_key() {
        let (_d, s) = with_dir(
            &[(
                "50.toml",
                "[services.web]\ncommand = [\"web\"]\ndepends_on = [\"migrate\", \"nosuch\"]\n\
                 [services.migrate]\ncommand = [\"m\"]\nkind = \"oneshot\"\ndepends_on = [\"postgres\", \"web\"]\n\
                 [services.bad]\ncommand = []\nstop_signal = \"SIGNOPE\"\nready = { tcp = \"x\", http = \"http://a\" }\n\
                 [cron.nightly]\nschedule = \"61 * * * *\"\ncommand = [\"x\"]\ntimezone = \"Mars/Base\"\n",
            )],
            &[],
        );
        let err = load(&s).unwrap_err();
        let text = err.to_string();
        for needle in [
            "key `services.web.depends_on`: unknown service `nosuch`",
            "dependency cycle: migrate -> web -> migrate",
            "key `services.bad.command`",
            "key `services.bad.stop_signal`",
            "key `services.bad.ready`: set exactly one",
            "key `services.bad.ready.tcp`",
            "key `cron.nightly.schedule`",
            "key `cron.nightly.timezone`",
        ] {
            assert!(text.contains(needle), "{needle:?} missing from:\n{text}");
        }
    }

    #[test]
    fn start_order_puts_dependencies_first() {
        let mut services = BTreeMap::new();
        for (name, deps) in [
            ("a", vec!["c"]),
            ("b", vec![]),
            ("c", vec!["b", "postgres"]),
        ] {
            services.insert(
                name.to_string(),
                ServiceConfig {
                    command: vec!["x".into()],
                    depends_on: deps.into_iter().map(String::from).collect(),
                    ..Default::default()
                },
            );
        }
        assert_eq!(start_order(&services).unwrap(), vec!["b", "c", "a"]);
        assert_eq!(parse_tcp_target("8500"), Some(("127.0.0.1".into(), 8500)));
        assert_eq!(parse_tcp_target("[::1]:80"), Some(("::1".into(), 80)));
        assert_eq!(parse_tcp_target("db:0"), None);
        assert_eq!(
            parse_signal("term"),
            Some(nix::sys::signal::Signal::SIGTERM)
        );
        assert_eq!(
            parse_signal("SIGQUIT"),
            Some(nix::sys::signal::Signal::SIGQUIT)
        );
        assert_eq!(parse_signal("nope"), None);
    }

    #[test]
    fn docker_keys_are_checked_and_derived() {
        let (_d, s) = with_dir(
            &[(
                "50.toml",
                "[docker]\nhost = \"ssh://x\"\ntls_ca = \"/ca.pem\"\n[docker.limits]\nmemory = \"lots\"\n[docker.policy]\nbind_roots = [\"/\", \"rel\"]\n[docker.host_paths]\n\"/a\" = \"b\"\n",
            )],
            &[],
        );
        let err = load(&s).unwrap_err();
        let keys: Vec<&str> = err.problems.iter().map(|p| p.key.as_str()).collect();
        for key in [
            "docker.host",
            "docker.tls_cert",
            "docker.tls_key",
            "docker.limits.memory",
            "docker.policy.bind_roots",
            "docker.host_paths./a",
        ] {
            assert!(keys.contains(&key), "{key} not in {keys:?}");
        }
        let (_d, s) = with_dir(&[], &[("REGOBOX_RUNTIME_DIR", "/r")]);
        let c = load(&s).unwrap().config;
        assert_eq!(c.docker.proxy_socket, PathBuf::from("/r/docker.sock"));
        assert_eq!(
            c.docker.policy.bind_roots,
            vec![PathBuf::from("/volumes/files")]
        );
        assert_eq!(parse_bytes("512m"), Some(512 << 20));
        assert_eq!(parse_bytes("2GiB"), Some(2 << 30));
        assert_eq!(parse_bytes("x"), None);
    }

    #[test]
    fn the_shipped_defaults_file_is_valid() {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("config");
        let s = Sources {
            dirs: vec![dir],
            env: vec![],
        };
        let loaded = load(&s).unwrap();
        assert_eq!(loaded.config, {
            let mut c = Config::default();
            c.resolve();
            c
        });
        // Every key documented, even commented out.
        let text = std::fs::read_to_string(
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("config/50_default.toml"),
        )
        .unwrap();
        for key in [
            "gc_after",
            "stop_jobs",
            "proxy_socket",
            "bind_roots",
            "tls_ca",
            "pids",
            "networks",
        ] {
            assert!(text.contains(&format!("#{key} =")), "{key} undocumented");
        }
    }

    #[test]
    fn url_redaction() {
        assert_eq!(
            redact_url("postgres://a:b@h/d"),
            "postgres://a:<redacted>@h/d"
        );
        assert_eq!(redact_url("postgres://a@h/d"), "postgres://a@h/d");
        assert_eq!(redact_url("postgres://h/d?x=@"), "postgres://h/d?x=@");
        assert_eq!(
            redact_url("postgres://a:b@h/d?password=c&pass%77ord=e&x=1"),
            "postgres://a:<redacted>@h/d?password=<redacted>&pass%77ord=<redacted>&x=1"
        );
    }
}

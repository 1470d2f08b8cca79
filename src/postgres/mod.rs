//! The PostgreSQL server on the data volume (or an external one).
//!
//! [`Embedded::open`] prepares a data directory for use: it classifies it (refusing foreign
//! content or another major, touching nothing), finds binaries of the right major, hands the
//! directory to the unprivileged account, takes the volume lock, finishes or starts `initdb`, and
//! clears a stale `postmaster.pid`. [`Embedded::start`] then runs the server; [`wait_ready`]
//! waits for a real connection; [`bootstrap`] creates the application's role, database,
//! extensions and init scripts. [`Session`] gives `init` and `psql` a server whichever way it is
//! available: the one `regobox run` keeps up, a temporary one, or the external one.

pub mod binaries;
pub mod bootstrap;
pub mod cluster;
pub mod server;
pub mod tls;
pub mod upgrade;

use std::io;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use tokio_postgres::config::Host;
use tokio_postgres::{Client, NoTls};
use tokio_util::sync::CancellationToken;

pub use tls::Tls;

use crate::config::{Config, PostgresMode};
use crate::logs::{Observer, SharedLogFile, Sink};
use crate::secrets::{SecretError, SecretStore};
use crate::users::{Account, UserError};
use crate::volumes::{VolumeError, ensure_dir};
use binaries::{Binaries, Major};
use cluster::{DataDirLock, DataDirState};
pub use server::Server;

/// The secret holding the application role's password (unless `postgres.password` is set).
pub const APP_PASSWORD_SECRET: &str = "postgres-password";
/// The secret holding the bootstrap superuser's password.
pub const SUPERUSER_PASSWORD_SECRET: &str = crate::secrets::SUPERUSER_PASSWORD;

#[derive(Debug, thiserror::Error)]
pub enum PostgresError {
    #[error(
        "no PostgreSQL server binaries found (looked in: {}). Install them (Debian/Ubuntu: `apt-get install postgresql`), or set `postgres.bin_dir` to the directory holding `postgres` and `initdb`",
        .looked.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
    )]
    NoBinaries { looked: Vec<PathBuf> },
    #[error(
        "the PostgreSQL cluster in {data_dir} was not upgraded, nothing of it changed: {reason}"
    )]
    UpgradeRefused { data_dir: PathBuf, reason: String },
    #[error("nothing was rolled back in {data_dir}, nothing of it changed: {reason}")]
    RollbackRefused { data_dir: PathBuf, reason: String },
    #[error(
        "pg_upgrade failed on {data_dir}; the old cluster is in place and unchanged, what the upgrade made is removed: {reason}"
    )]
    UpgradeFailed { data_dir: PathBuf, reason: String },
    #[error(
        "the cluster in {data_dir} cannot be adopted, nothing of its data was changed: {reason}"
    )]
    Unadoptable { data_dir: PathBuf, reason: String },
    #[error("postgres.url = {url}: {reason}")]
    BadUrl { url: String, reason: String },
    #[error("postgres.bin_dir = {dir}: {reason}")]
    BadBinDir { dir: PathBuf, reason: String },
    #[error(
        "the PostgreSQL data directory {path} exists but is not a directory (postgres.data_dir); nothing was changed"
    )]
    NotADirectory { path: PathBuf },
    #[error(
        "the PostgreSQL data directory {data_dir} is not empty and holds no PostgreSQL cluster (found: {}); refusing to use it, nothing was changed. Point postgres.data_dir (or volumes.root) at an empty directory or an existing cluster",
        .entries.join(", ")
    )]
    Foreign {
        data_dir: PathBuf,
        entries: Vec<String>,
    },
    #[error(
        "the cluster in {data_dir} was created by PostgreSQL {cluster}, newer than the server binaries, PostgreSQL {binaries} ({bin_dir}); refusing to start, nothing was changed. Run regobox with PostgreSQL {cluster} binaries or newer (an image built with PG_MAJOR={cluster}, or postgres.bin_dir)"
    )]
    WrongMajor {
        data_dir: PathBuf,
        cluster: Major,
        binaries: Major,
        bin_dir: PathBuf,
    },
    #[error(
        "a postgres process (pid {pid}) is running on {data_dir}; refusing to start a second server on it"
    )]
    AlreadyRunning { pid: i32, data_dir: PathBuf },
    #[error(
        "the PostgreSQL account `{account}` cannot reach {path} (mode {mode:o}, owner uid {owner}), which leads to postgres.data_dir; make it traversable (e.g. chmod o+x) or move the data directory"
    )]
    Unreachable {
        account: String,
        path: PathBuf,
        mode: u32,
        owner: u32,
    },
    #[error(
        "the role `{role}` has a password in the cluster that {secret} does not open. regobox never changes a password the cluster already has without being asked: `regobox password` gives the role the value of {secret}; `regobox password --reset` makes a new one (then give it to every client of the old one)"
    )]
    PasswordMismatch { role: String, secret: PathBuf },
    #[error(
        "{secret} is missing (or empty) and the role `{role}` has a password in the cluster: regobox does not make a new one on its own, which would lock out every client of the old one. Put the file back (from a backup), set postgres.password to the password its clients use (a cluster regobox adopts), or run `regobox password --reset` for a new one"
    )]
    PasswordMissing { role: String, secret: PathBuf },
    #[error(
        "the role `{role}` (postgres.user) does not exist in this cluster, which regobox did not create, and {secret} is missing: set postgres.password to the password it should have, and regobox creates it with that"
    )]
    RoleWithoutPassword { role: String, secret: PathBuf },
    #[error(
        "{what}, not to regobox's superuser: regobox keeps its bookkeeping there and never writes into what the application controls. Rename or drop it (as the application: `regobox psql`), then start again"
    )]
    ForeignBookkeeping { what: String },
    #[error(
        "the cluster in {data_dir} is PostgreSQL {cluster} and the server binaries are PostgreSQL {binaries}; nothing was changed: {why}"
    )]
    NeedsUpgrade {
        data_dir: PathBuf,
        cluster: Major,
        binaries: Major,
        why: String,
    },
    #[error(
        "the superuser role {name:?} cannot be written in pg_hba.conf (a double quote or a control character): rename it (ALTER ROLE ... RENAME TO) with the server of the image that made it"
    )]
    UnusableName { name: String },
    #[error("another regobox is running PostgreSQL on {data_dir} (its lock file is held)")]
    Busy { data_dir: PathBuf },
    #[error(
        "there is no database in {data_dir}: only `regobox init` and `regobox run` (or `start`, `restore`) create one, and this command never does. Is REGOBOX_VOLUMES__ROOT (volumes.root) or postgres.data_dir the volume you mean?"
    )]
    NoCluster { data_dir: PathBuf },
    #[error(
        "a regobox holds {data_dir} ({holder}) but its PostgreSQL socket {socket} does not exist: it runs with another runtime directory, or its server is not up. This command looked in runtime_dir {runtime_dir}; set REGOBOX_RUNTIME_DIR to the running regobox's"
    )]
    NoSocket {
        data_dir: PathBuf,
        holder: String,
        socket: PathBuf,
        runtime_dir: PathBuf,
    },
    #[error("initdb failed in {data_dir}: {detail}")]
    Initdb { data_dir: PathBuf, detail: String },
    #[error("{path}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("PostgreSQL exited during start-up ({status}); its log is above")]
    ExitedDuringStart { status: ExitStatus },
    /// The command was asked to stop (Ctrl-C, SIGTERM) while it opened the database; a
    /// temporary server it had started is stopped.
    #[error("interrupted while opening the database")]
    Interrupted,
    #[error("PostgreSQL exited unexpectedly ({status}); its log is above")]
    Exited { status: ExitStatus },
    #[error(
        "PostgreSQL did not accept connections within {timeout:?} (postgres.start_timeout); last error: {last}"
    )]
    StartTimeout { timeout: Duration, last: String },
    #[error("{what}")]
    Sql {
        what: String,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("init script {path} failed, nothing of it was applied")]
    InitScript {
        path: PathBuf,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error(transparent)]
    Volume(#[from] VolumeError),
    #[error(transparent)]
    Secret(#[from] SecretError),
    #[error(transparent)]
    User(#[from] UserError),
}

impl PostgresError {
    pub fn exit_code(&self) -> u8 {
        use crate::exit;
        match self {
            PostgresError::NoBinaries { .. } | PostgresError::BadBinDir { .. } => exit::UNAVAILABLE,
            PostgresError::NotADirectory { .. }
            | PostgresError::Unreachable { .. }
            | PostgresError::Foreign { .. }
            | PostgresError::NoCluster { .. }
            | PostgresError::BadUrl { .. }
            | PostgresError::Unadoptable { .. }
            | PostgresError::UpgradeRefused { .. }
            | PostgresError::RollbackRefused { .. }
            | PostgresError::NeedsUpgrade { .. }
            | PostgresError::WrongMajor { .. } => exit::DATA,
            PostgresError::Busy { .. } => exit::TEMPFAIL,
            _ => exit::FAILURE,
        }
    }
}

/// How to reach a server: as the superuser (embedded only) and as the application's role.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub superuser: Option<tokio_postgres::Config>,
    pub app: tokio_postgres::Config,
    /// How connections to the server are protected (the external server's `sslmode`).
    pub tls: Tls,
    /// The external server's URL as regobox wrote it back (the application's `DATABASE_URL`).
    pub url: Option<String>,
    /// The binaries, when regobox runs the server (for `psql` and friends).
    pub binaries: Option<Binaries>,
}

impl Endpoint {
    /// The external server of `postgres.url`.
    pub fn external(config: &Config) -> Result<Endpoint, PostgresError> {
        let bad = |reason: String| PostgresError::BadUrl {
            url: crate::config::redact_url(&config.postgres.url),
            reason,
        };
        let target = crate::dburl::Target::parse(&config.postgres.url).map_err(bad)?;
        let tls = Tls::load(target.tls).map_err(|failure| bad(failure.0))?;
        Ok(Endpoint {
            superuser: None,
            app: target.config,
            tls,
            url: Some(target.client_url),
            binaries: None,
        })
    }

    /// Variables that make libpq tools (`psql`, `pg_dump`) connect as the application role,
    /// without putting the password on a command line.
    pub fn libpq_env(&self) -> Vec<(String, String)> {
        libpq_env(&self.app, &self.tls)
    }

    /// Connect with `config` (one of this endpoint's, or derived from one) and its TLS.
    pub async fn connect(
        &self,
        config: &tokio_postgres::Config,
    ) -> Result<Client, tokio_postgres::Error> {
        connect(config, &self.tls).await
    }

    /// The path of a client program: from the server's binaries if it is there, else `PATH`.
    pub async fn client_program(&self, name: &str) -> PathBuf {
        let local = self.binaries.as_ref().map(|b| b.path(name));
        match local {
            Some(p) if p.is_file() => p,
            _ => Binaries::find(Path::new(""), None)
                .await
                .ok()
                .map(|b| b.path(name))
                .filter(|p| p.is_file())
                .unwrap_or_else(|| PathBuf::from(name)),
        }
    }
}

/// libpq environment variables equivalent to `config` and `tls`.
pub fn libpq_env(config: &tokio_postgres::Config, tls: &Tls) -> Vec<(String, String)> {
    let mut env = Vec::new();
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .map(|h| match h {
            Host::Tcp(s) => s.clone(),
            Host::Unix(p) => p.display().to_string(),
        })
        .collect();
    if !hosts.is_empty() {
        env.push(("PGHOST".into(), hosts.join(",")));
    }
    let ports: Vec<String> = config.get_ports().iter().map(u16::to_string).collect();
    if !ports.is_empty() {
        env.push(("PGPORT".into(), ports.join(",")));
    }
    if let Some(u) = config.get_user() {
        env.push(("PGUSER".into(), u.to_string()));
    }
    if let Some(p) = config.get_password() {
        env.push(("PGPASSWORD".into(), String::from_utf8_lossy(p).into_owned()));
    }
    if let Some(d) = config.get_dbname() {
        env.push(("PGDATABASE".into(), d.to_string()));
    }
    if let Some(o) = config.get_options().filter(|o| !o.is_empty()) {
        env.push(("PGOPTIONS".into(), o.to_string()));
    }
    env.extend(tls.libpq_env());
    env
}

/// Connect, driving the connection on a task of its own.
pub async fn connect(
    config: &tokio_postgres::Config,
    tls: &Tls,
) -> Result<Client, tokio_postgres::Error> {
    let client = match tls.connector() {
        Some(connector) => {
            let (client, connection) = config.connect(connector.clone()).await?;
            tokio::spawn(connection);
            client
        }
        None => {
            let mut plain = config.clone();
            if tls.mode() == crate::dburl::SslMode::Disable {
                plain.ssl_mode(tokio_postgres::config::SslMode::Disable);
            }
            // Without a loaded connector, `prefer` is plain and anything stricter fails.
            let (client, connection) = plain.connect(NoTls).await?;
            tokio::spawn(connection);
            client
        }
    };
    Ok(client)
}

/// An error with its causes, as one line (tokio-postgres's own text names only the kind:
/// "error performing TLS handshake").
pub fn describe(e: &tokio_postgres::Error) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// Whether waiting may cure a failed connection: the server is not up yet (nothing answers, the
/// connection is refused or cut, "the database system is starting up"). What the server refuses
/// (a password, a database, TLS) and what regobox cannot set up (a certificate file) will not
/// change by waiting.
pub fn retryable(e: &tokio_postgres::Error) -> bool {
    if let Some(db) = e.as_db_error() {
        return *db.code() == tokio_postgres::error::SqlState::CANNOT_CONNECT_NOW;
    }
    match std::error::Error::source(e) {
        None => true,
        Some(s) => s.is::<io::Error>(),
    }
}

/// The result of opening the embedded data directory.
// Returned once per command: boxing to even out the variants would buy nothing.
#[allow(clippy::large_enum_variant)]
pub enum Opened {
    /// regobox holds the directory and may run a server on it.
    Owned(Embedded),
    /// A running regobox holds it: its server is reachable at this endpoint.
    Busy(Endpoint),
}

/// A data directory regobox holds (its lock is taken), ready to run a server on.
#[derive(Debug)]
pub struct Embedded {
    pub binaries: Binaries,
    pub account: Account,
    pub data_dir: PathBuf,
    pub socket_dir: PathBuf,
    pub port: u16,
    endpoint: Endpoint,
    settings: Vec<(String, String)>,
    /// The cluster's superuser (authenticated by its OS account, see [`write_hba`]), and
    /// whether it was adopted.
    record: cluster::Record,
    _lock: DataDirLock,
}

impl Embedded {
    /// Prepare `postgres.data_dir` for a server; see the module documentation. `create`: this
    /// command may create a cluster (`init`, `run`, `start`); others refuse a volume without one.
    /// Nothing in the data directory or the secrets changes before its lock is held.
    pub async fn open(
        config: &Config,
        secrets: &SecretStore,
        create: bool,
    ) -> Result<Opened, PostgresError> {
        Embedded::open_with(config, secrets, create, None).await
    }

    /// [`Embedded::open`]; `upgrade`: asked for explicitly (`regobox upgrade`), an older
    /// cluster is upgraded whatever `postgres.upgrade` says or an earlier rollback did.
    pub async fn open_with(
        config: &Config,
        secrets: &SecretStore,
        create: bool,
        upgrade: Option<&upgrade::Request>,
    ) -> Result<Opened, PostgresError> {
        let request = upgrade;
        let upgrade = request.is_some();
        let pg = &config.postgres;
        let data_dir = pg.data_dir.clone();
        let home = data_dir.parent().unwrap_or(&data_dir).to_path_buf();
        let account = crate::users::service_account(&pg.os_user, &home, "postgres.os_user").await?;

        // Held until the directory is opened: no other command uses it mid-upgrade. An
        // upgrade's swap a kill interrupted is undone first: one whole cluster is in place.
        let _guard = upgrade::guard(&data_dir, pg.start_timeout).await?;
        upgrade::recover_guarded(&data_dir)?;
        // Read-only checks first: a refused directory is never written to.
        let state = cluster::inspect(&data_dir)?;
        if let DataDirState::Foreign(entries) = &state {
            return Err(PostgresError::Foreign {
                data_dir,
                entries: entries.clone(),
            });
        }
        if !create && !matches!(state, DataDirState::Cluster(_)) {
            return Err(PostgresError::NoCluster { data_dir });
        }
        let cluster_major = match state {
            DataDirState::Cluster(m) => Some(m),
            _ => None,
        };
        // The highest major found is the server's; older ones are for pg_upgrade only.
        let binaries = Binaries::find(&pg.bin_dir, None).await?;
        let mut upgrade_from = None;
        if let Some(m) = cluster_major {
            if m > binaries.major {
                return Err(PostgresError::WrongMajor {
                    data_dir,
                    cluster: m,
                    binaries: binaries.major,
                    bin_dir: binaries.dir,
                });
            }
            if m < binaries.major {
                let rolled_back = upgrade::State::read(&data_dir)?
                    .is_some_and(|s| s.status == upgrade::Status::RolledBack);
                let why = if !(create || upgrade) {
                    Some(
                        "this command does not upgrade it: `regobox run` (postgres.upgrade = \"auto\") or `regobox upgrade` does",
                    )
                } else if upgrade {
                    None
                } else if pg.upgrade == crate::config::UpgradePolicy::Manual {
                    Some(
                        "postgres.upgrade = \"manual\": run `regobox upgrade` to upgrade it in place (the old cluster is kept until `regobox upgrade --finish`)",
                    )
                } else if rolled_back {
                    Some(
                        "an upgrade of it was rolled back: run `regobox upgrade` to upgrade it again",
                    )
                } else if pg.upgrade_method == crate::config::UpgradeMethod::Link {
                    Some(
                        "postgres.upgrade_method = \"link\" is never automatic (the old cluster cannot be put back once the new server has run): run `regobox upgrade`, which takes a backup archive first",
                    )
                } else {
                    None
                };
                if let Some(why) = why {
                    return Err(PostgresError::NeedsUpgrade {
                        data_dir,
                        cluster: m,
                        binaries: binaries.major,
                        why: why.into(),
                    });
                }
                upgrade_from = Some((m, upgrade::preflight(config, m, &binaries).await?));
            }
        }
        if upgrade_from.is_none()
            && cluster_major.is_some()
            && cluster::Record::read(&data_dir)?.is_none()
        {
            cluster::check_adoptable(&binaries, &data_dir).await?;
        }
        check_reachable(&data_dir, &account)?;
        let socket_dir = config.runtime_dir.join("postgresql");
        if state == DataDirState::Missing {
            // No server can run on a directory that does not exist: create it to hold the lock.
            if let Some(parent) = data_dir.parent() {
                ensure_dir(parent, 0o755, "postgres.data_dir")?;
            }
            ensure_dir(&data_dir, 0o700, "postgres.data_dir")?;
            cluster::chown(&data_dir, &account)?;
        }
        let Some(lock) = DataDirLock::try_acquire(&data_dir, &account, &config.runtime_dir)? else {
            // Another regobox holds it: reach its server with the passwords it uses, changing
            // nothing (a missing secret is not generated here).
            let endpoint = running_endpoint(config, secrets, &socket_dir, &binaries)?;
            return Ok(Opened::Busy(endpoint));
        };
        // Held: repairs and first-time set-up may start. Passwords are generated for a new
        // cluster only: an existing one keeps its own (see `bootstrap::RolePassword`).
        cluster::ensure_ownership(&data_dir, &account)?;
        let fresh = !matches!(state, DataDirState::Cluster(_));
        let secret = |name: &str| {
            if fresh {
                secrets.get_or_generate(name)
            } else {
                secrets.get(name).map(Option::unwrap_or_default)
            }
        };
        let superuser_password = secret(SUPERUSER_PASSWORD_SECRET)?;
        let app_password = if pg.password.is_empty() {
            secret(APP_PASSWORD_SECRET)?
        } else {
            pg.password.clone()
        };
        match state {
            DataDirState::InterruptedInit => {
                cluster::clear_interrupted_init(&data_dir)?;
                initdb(config, &binaries, &account, &superuser_password).await?;
            }
            DataDirState::Missing | DataDirState::Empty => {
                initdb(config, &binaries, &account, &superuser_password).await?;
            }
            DataDirState::Cluster(_) | DataDirState::Foreign(_) => {}
        }
        cluster::clear_stale_pid(&data_dir)?;
        let mut lock = lock;
        if let Some((from, old)) = &upgrade_from {
            upgrade::upgrade(config, &account, *from, old, &binaries, request).await?;
            // The lock taken was in the directory the old cluster left with: take the new one's.
            lock = DataDirLock::try_acquire(&data_dir, &account, &config.runtime_dir)?.ok_or_else(
                || PostgresError::Busy {
                    data_dir: data_dir.clone(),
                },
            )?;
        } else if create {
            upgrade::expire(&data_dir, pg.upgrade_keep_old)?;
        }
        let record = cluster_record(config, &binaries, &account).await?;
        let endpoint = local_endpoint(
            config,
            &socket_dir,
            &record.superuser,
            &superuser_password,
            &app_password,
            &binaries,
        );

        ensure_dir(&config.runtime_dir, 0o755, "runtime_dir")?;
        ensure_dir(&socket_dir, 0o700, "runtime_dir")?;
        cluster::chown(&socket_dir, &account)?;

        let settings = pg
            .settings
            .iter()
            .map(|(k, v)| (k.clone(), v.to_string()))
            .collect();
        Ok(Opened::Owned(Embedded {
            binaries,
            account,
            data_dir,
            socket_dir,
            port: pg.port,
            endpoint,
            settings,
            record,
            _lock: lock,
        }))
    }

    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// After an upgrade, the job that gathers the planner's statistics on the running server
    /// (see [`upgrade::Statistics`]); `None` when the cluster has them.
    pub fn statistics_job(&self) -> Option<upgrade::Statistics> {
        self.record.statistics_pending.then(|| upgrade::Statistics {
            vacuumdb: self.binaries.path("vacuumdb"),
            data_dir: self.data_dir.clone(),
            socket_dir: self.socket_dir.clone(),
            port: self.port,
            record: self.record.clone(),
            account: self.account.clone(),
        })
    }

    /// Start the server listening on `listen` (empty: the Unix socket only), its log going to
    /// `sink` and, if given, to a log file.
    pub fn start(
        &self,
        listen: &str,
        sink: Sink,
        file: Option<SharedLogFile>,
        observer: Option<Observer>,
    ) -> Result<Server, PostgresError> {
        let auth = self.write_hba(listen)?;
        // From here, a rollback of an upgrade would lose what this server writes.
        upgrade::mark_started(&self.data_dir)?;
        // A socket lock file left by a killed server would make the new one refuse to start;
        // the data directory lock proves no server of this instance is running.
        for name in [
            format!(".s.PGSQL.{}", self.port),
            format!(".s.PGSQL.{}.lock", self.port),
        ] {
            let _ = std::fs::remove_file(self.socket_dir.join(name));
        }
        let mut params: Vec<(String, String)> = vec![
            ("listen_addresses".into(), listen.into()),
            ("port".into(), self.port.to_string()),
            (
                "unix_socket_directories".into(),
                self.socket_dir.display().to_string(),
            ),
            ("hba_file".into(), auth.hba.display().to_string()),
            ("ident_file".into(), auth.ident.display().to_string()),
            // Whatever postgresql.conf says: a crash must never lose a committed row.
            ("fsync".into(), "on".into()),
            ("full_page_writes".into(), "on".into()),
        ];
        params.extend(self.settings.iter().cloned());
        tracing::info!(
            version = %self.binaries.version,
            data_dir = %self.data_dir.display(),
            listen,
            port = self.port,
            user = %self.account.name,
            "starting PostgreSQL"
        );
        Server::spawn(
            &self.binaries,
            &self.data_dir,
            &self.account,
            &params,
            server::Output {
                label: "postgres",
                sink,
                file,
                observer,
            },
        )
        .map_err(|source| PostgresError::Io {
            path: self.binaries.path("postgres"),
            source,
        })
    }

    fn write_hba(&self, listen: &str) -> Result<AuthFiles, PostgresError> {
        write_hba(
            &self.socket_dir,
            &self.account,
            password_auth(self.binaries.major, &self.record),
            listen,
            &self.record.superuser,
        )
    }
}

/// The password authentication method: SCRAM for a cluster regobox made (from PostgreSQL 10 on),
/// `md5` for an adopted one, whose roles may have md5 passwords (the method accepts those, and
/// SCRAM for SCRAM passwords).
fn password_auth(major: Major, record: &cluster::Record) -> &'static str {
    if record.adopted {
        "md5"
    } else {
        major.password_auth()
    }
}

/// What regobox knows of the cluster in `postgres.data_dir` (its lock held, no server running
/// on it): recorded by `initdb`, or, for a cluster without a record (made by someone else, or by
/// a regobox before records), its superuser read once and recorded.
async fn cluster_record(
    config: &Config,
    binaries: &Binaries,
    account: &Account,
) -> Result<cluster::Record, PostgresError> {
    let pg = &config.postgres;
    if let Some(record) = cluster::Record::read(&pg.data_dir)? {
        return Ok(record);
    }
    let record = {
        let superuser = cluster::bootstrap_superuser(binaries, &pg.data_dir, account).await?;
        tracing::info!(
            data_dir = %pg.data_dir.display(),
            superuser,
            "adopting a cluster regobox has no record of: managing it as its superuser, by the OS account over the Unix socket (no password); password authentication accepts md5 passwords as well as SCRAM"
        );
        if superuser != pg.superuser {
            tracing::info!(
                superuser,
                configured = %pg.superuser,
                "the cluster's superuser is not postgres.superuser: regobox uses the cluster's"
            );
        }
        cluster::Record {
            superuser,
            adopted: true,
            statistics_pending: false,
        }
    };
    record.write(&pg.data_dir, account)?;
    Ok(record)
}

/// When regobox runs as root, every existing ancestor of `dir` must let `account` through.
fn check_reachable(dir: &Path, account: &Account) -> Result<(), PostgresError> {
    use std::os::unix::fs::MetadataExt;
    if !crate::users::is_root() {
        return Ok(());
    }
    for ancestor in dir.ancestors().skip(1) {
        let Ok(meta) = std::fs::metadata(ancestor) else {
            continue; // created later, 0755
        };
        let mode = meta.mode() & 0o7777;
        let through = if meta.uid() == account.uid.as_raw() {
            mode & 0o100 != 0
        } else if account.groups.iter().any(|g| g.as_raw() == meta.gid()) {
            mode & 0o010 != 0
        } else {
            mode & 0o001 != 0
        };
        if !through {
            return Err(PostgresError::Unreachable {
                account: account.name.clone(),
                path: ancestor.to_path_buf(),
                mode,
                owner: meta.uid(),
            });
        }
    }
    Ok(())
}

/// The client authentication files regobox writes at each start.
pub struct AuthFiles {
    pub hba: PathBuf,
    pub ident: PathBuf,
}

/// Write the client authentication rules into `dir` (owned by `account`). The superuser
/// authenticates over the Unix socket by its OS account (`peer`, mapped from regobox's own user
/// and the server's account): regobox manages its cluster without any password file. Everyone
/// else uses a password; remote addresses only when the server listens beyond loopback.
pub fn write_hba(
    dir: &Path,
    account: &Account,
    auth: &str,
    listen: &str,
    superuser: &str,
) -> Result<AuthFiles, PostgresError> {
    let me = nix::unistd::User::from_uid(nix::unistd::geteuid())
        .ok()
        .flatten()
        .map(|u| u.name);
    // Quoted: a role name is one token whatever it holds (a space, `all`, a `#`).
    if superuser.is_empty() || superuser.chars().any(|c| c == '"' || c.is_control()) {
        return Err(PostgresError::UnusableName {
            name: superuser.to_string(),
        });
    }
    let superuser = format!("\"{superuser}\"");
    let mut ident =
        String::from("# Written by regobox at every start of PostgreSQL; edits are lost.\n");
    for os_user in me.iter().chain([&account.name]) {
        ident.push_str(&format!("regobox {os_user} {superuser}\n"));
    }
    let mut text = format!(
        "# Written by regobox at every start of PostgreSQL; edits are lost.\n\
         local all {superuser} peer map=regobox\n\
         local all all {auth}\n\
         host  all all 127.0.0.1/32 {auth}\n\
         host  all all ::1/128 {auth}\n"
    );
    let loopback_only = listen
        .split(',')
        .map(str::trim)
        .all(|a| a.is_empty() || a == "localhost" || a == "127.0.0.1" || a == "::1");
    if !loopback_only {
        text.push_str(&format!(
            "host  all all 0.0.0.0/0 {auth}\nhost  all all ::/0 {auth}\n"
        ));
    }
    Ok(AuthFiles {
        hba: write_conf(dir, "pg_hba.conf", &text, account)?,
        ident: write_conf(dir, "pg_ident.conf", &ident, account)?,
    })
}

/// Write `name` in `dir` (0600, owned by `account`), replacing it at once.
fn write_conf(
    dir: &Path,
    name: &str,
    text: &str,
    account: &Account,
) -> Result<PathBuf, PostgresError> {
    cluster::write_private(dir, name, text.as_bytes(), account, false)
}

async fn initdb(
    config: &Config,
    binaries: &Binaries,
    account: &Account,
    superuser_password: &str,
) -> Result<(), PostgresError> {
    cluster::initdb(&cluster::InitSpec {
        binaries,
        data_dir: &config.postgres.data_dir,
        account,
        superuser: &config.postgres.superuser,
        superuser_password,
        locale: &config.postgres.locale,
    })
    .await
}

fn local_endpoint(
    config: &Config,
    socket_dir: &Path,
    superuser: &str,
    superuser_password: &str,
    app_password: &str,
    binaries: &Binaries,
) -> Endpoint {
    let pg = &config.postgres;
    let base = |user: &str, password: &str, db: &str| {
        let mut c = tokio_postgres::Config::new();
        c.host_path(socket_dir)
            .port(pg.port)
            .user(user)
            .password(password)
            .dbname(db)
            .application_name("regobox")
            .connect_timeout(Duration::from_secs(5));
        c
    };
    let mut su = base(superuser, superuser_password, "postgres");
    pin_superuser_session(&mut su);
    Endpoint {
        superuser: Some(su),
        app: base(&pg.user, app_password, &pg.database),
        tls: Tls::disabled(),
        url: None,
        binaries: Some(binaries.clone()),
    }
}

/// regobox's superuser sessions are its own, whatever the application set on its database or
/// role (client options win over those settings): names resolve in `pg_catalog` only (then
/// `pg_temp`), so nothing the application defines (an operator `public.=`, a function
/// shadowing a built-in) runs with the superuser's rights; no `role` or
/// `session_authorization` turns them into another role; no read-only default or timeout
/// stops regobox's bootstrap or backups.
pub fn pin_superuser_session(config: &mut tokio_postgres::Config) {
    // The options string is split at spaces, a backslash escaping the next character: a
    // name with a space (an adopted cluster's superuser) stays one value.
    let superuser: String = config
        .get_user()
        .unwrap_or("postgres")
        .chars()
        .flat_map(|c| match c {
            ' ' | '\\' => vec!['\\', c],
            c => vec![c],
        })
        .collect();
    config.options(format!(
        "-c search_path=pg_catalog,pg_temp -c role=none -c session_authorization={superuser} \
         -c default_transaction_read_only=off -c statement_timeout=0 -c lock_timeout=0 \
         -c idle_in_transaction_session_timeout=0"
    ));
}

/// `fut`, unless `cancel` fires first: then [`PostgresError::Interrupted`], and `fut` is
/// dropped (what it started and owns is its to undo).
pub async fn unless<T>(
    cancel: &CancellationToken,
    fut: impl std::future::Future<Output = Result<T, PostgresError>>,
) -> Result<T, PostgresError> {
    tokio::select! {
        r = fut => r,
        () = cancel.cancelled() => Err(PostgresError::Interrupted),
    }
}

/// Wait until a real connection succeeds (as the superuser when known, else the application's
/// role), or the server exits, or `timeout` passes.
pub async fn wait_ready(
    server: Option<&mut Server>,
    endpoint: &Endpoint,
    timeout: Duration,
) -> Result<(), PostgresError> {
    let target = endpoint.superuser.as_ref().unwrap_or(&endpoint.app);
    let deadline = Instant::now() + timeout;
    let mut last;
    let mut server = server;
    loop {
        match connect(target, &endpoint.tls).await {
            Ok(client) => match client.simple_query("SELECT 1").await {
                Ok(_) => return Ok(()),
                Err(e) => last = describe(&e),
            },
            // The server answered with an error that waiting will not cure (a wrong password, a
            // missing database, a refused TLS handshake): report it now. "Starting up",
            // "shutting down" and a server not listening yet are waited out.
            Err(e) if !retryable(&e) => {
                return Err(PostgresError::Sql {
                    what: "connecting to PostgreSQL".into(),
                    source: e,
                });
            }
            Err(e) => last = describe(&e),
        }
        if Instant::now() >= deadline {
            return Err(PostgresError::StartTimeout { timeout, last });
        }
        let pause = tokio::time::sleep(Duration::from_millis(100));
        match server.as_deref_mut() {
            Some(s) => {
                tokio::select! {
                    status = s.wait() => {
                        let status = status.map_err(|source| PostgresError::Io { path: "postgres".into(), source })?;
                        return Err(PostgresError::ExitedDuringStart { status });
                    }
                    _ = pause => {}
                }
            }
            None => pause.await,
        }
    }
}

/// Give the application role the password `value` (`regobox password`), through the running
/// regobox's server or a temporary one; as the superuser, which needs no password.
///
/// `cancel` interrupts the wait for the server, never the change itself: once the role is being
/// given its password, the command finishes, so that the secret its caller commits is the
/// cluster's.
pub async fn set_app_password(
    config: &Config,
    secrets: &SecretStore,
    value: &str,
    cancel: &CancellationToken,
) -> Result<(), PostgresError> {
    let pg = &config.postgres;
    let (endpoint, mut temporary) =
        match unless(cancel, Embedded::open(config, secrets, false)).await? {
            Opened::Busy(endpoint) => (endpoint, None),
            Opened::Owned(embedded) => {
                let server = embedded.start("", Sink::Stderr, None, None)?;
                let endpoint = embedded.endpoint().clone();
                (endpoint, Some((embedded, server)))
            }
        };
    let set = async {
        unless(
            cancel,
            wait_ready(
                temporary.as_mut().map(|(_, s)| s),
                &endpoint,
                pg.start_timeout,
            ),
        )
        .await?;
        let su_config = endpoint
            .superuser
            .as_ref()
            .ok_or_else(|| PostgresError::Io {
                path: pg.data_dir.clone(),
                source: io::Error::other("no superuser connection"),
            })?;
        let su = connect(su_config, &endpoint.tls)
            .await
            .map_err(|source| PostgresError::Sql {
                what: "connecting as the superuser".into(),
                source,
            })?;
        let major = server_major(&su).await?;
        bootstrap::role_and_database(
            &su,
            major,
            &pg.user,
            bootstrap::RolePassword::Set(value),
            &pg.database,
        )
        .await
    }
    .await;
    if let Some((_embedded, mut server)) = temporary {
        let _ = server.stop(pg.stop_timeout, std::future::pending()).await;
    }
    set
}

/// Refuse, changing nothing, a volume without a cluster (embedded mode): for the commands that
/// use an existing database and never create one (`psql`, `exec`, `shell`, `backup`, `cron`).
pub fn require_cluster(config: &Config) -> Result<(), PostgresError> {
    if config.postgres.mode != PostgresMode::Embedded {
        return Ok(());
    }
    let data_dir = &config.postgres.data_dir;
    match cluster::inspect(data_dir)? {
        DataDirState::Cluster(_) => Ok(()),
        DataDirState::Foreign(entries) => Err(PostgresError::Foreign {
            data_dir: data_dir.clone(),
            entries,
        }),
        _ => Err(PostgresError::NoCluster {
            data_dir: data_dir.clone(),
        }),
    }
}

/// The endpoint of the server another regobox runs on this volume: its socket must exist (a
/// command looking in another runtime directory fails at once, naming both), and its passwords
/// are read, never generated.
fn running_endpoint(
    config: &Config,
    secrets: &SecretStore,
    socket_dir: &Path,
    binaries: &Binaries,
) -> Result<Endpoint, PostgresError> {
    let pg = &config.postgres;
    let socket = socket_dir.join(format!(".s.PGSQL.{}", pg.port));
    if !socket.exists() {
        return Err(PostgresError::NoSocket {
            data_dir: pg.data_dir.clone(),
            holder: cluster::holder(&pg.data_dir).unwrap_or_else(|| "holder unknown".into()),
            socket,
            runtime_dir: config.runtime_dir.clone(),
        });
    }
    let superuser_password = secrets.get(SUPERUSER_PASSWORD_SECRET)?.unwrap_or_default();
    let app_password = if pg.password.is_empty() {
        secrets.get(APP_PASSWORD_SECRET)?.unwrap_or_default()
    } else {
        pg.password.clone()
    };
    // The holder recorded the cluster's superuser before starting its server.
    let superuser = cluster::Record::read(&pg.data_dir)?
        .map(|r| r.superuser)
        .unwrap_or_else(|| pg.superuser.clone());
    Ok(local_endpoint(
        config,
        socket_dir,
        &superuser,
        &superuser_password,
        &app_password,
        binaries,
    ))
}

/// How much of the bootstrap to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bootstrap {
    /// Only what a client needs to log in: the application's role and database.
    Login,
    /// Everything: role, database, extensions and init scripts.
    Full,
}

/// Bring the application's role, database, extensions and init scripts up to date.
pub async fn bootstrap(
    config: &Config,
    endpoint: &Endpoint,
    config_dirs: &[PathBuf],
) -> Result<(), PostgresError> {
    bootstrap_part(config, endpoint, config_dirs, Bootstrap::Full).await
}

async fn bootstrap_part(
    config: &Config,
    endpoint: &Endpoint,
    config_dirs: &[PathBuf],
    part: Bootstrap,
) -> Result<(), PostgresError> {
    let pg = &config.postgres;
    let scripts = bootstrap::init_scripts(config_dirs);
    match &endpoint.superuser {
        Some(su_config) => {
            let su =
                connect(su_config, &endpoint.tls)
                    .await
                    .map_err(|source| PostgresError::Sql {
                        what: "connecting as the superuser".into(),
                        source,
                    })?;
            let major = server_major(&su).await?;
            let password = endpoint
                .app
                .get_password()
                .map(|p| String::from_utf8_lossy(p).into_owned())
                .unwrap_or_default();
            let secret = config
                .volumes
                .root
                .join("secrets")
                .join(APP_PASSWORD_SECRET);
            bootstrap::role_and_database(
                &su,
                major,
                &pg.user,
                bootstrap::RolePassword::Expect {
                    value: &password,
                    from_config: !pg.password.is_empty(),
                    secret: &secret,
                    login: &endpoint.app,
                },
                &pg.database,
            )
            .await?;
            if part == Bootstrap::Login {
                return Ok(());
            }
            let mut in_app_db = su_config.clone();
            in_app_db.dbname(&pg.database);
            let su_app =
                connect(&in_app_db, &endpoint.tls)
                    .await
                    .map_err(|source| PostgresError::Sql {
                        what: format!("connecting to database `{}` as the superuser", pg.database),
                        source,
                    })?;
            bootstrap::extensions(&su_app, &pg.extensions).await?;
            // regobox's bookkeeping is the superuser's; the scripts run in a session of the
            // application role itself (no `SET ROLE` its code could undo).
            bootstrap::bookkeeping(&su_app, Some(&pg.user)).await?;
            drop(su_app);
            if !scripts.is_empty() {
                let mut app = connect(&endpoint.app, &endpoint.tls)
                    .await
                    .map_err(|source| PostgresError::Sql {
                        what: format!("connecting to database `{}` as `{}`", pg.database, pg.user),
                        source,
                    })?;
                bootstrap::run_init_scripts(&mut app, &scripts).await?;
            }
        }
        None if part == Bootstrap::Login => {}
        None => {
            let mut client = connect(&endpoint.app, &endpoint.tls)
                .await
                .map_err(|source| PostgresError::Sql {
                    what: format!("connecting to {}", crate::config::redact_url(&pg.url)),
                    source,
                })?;
            bootstrap::extensions(&client, &pg.extensions).await?;
            if !scripts.is_empty() {
                bootstrap::bookkeeping(&client, None).await?;
            }
            bootstrap::run_init_scripts(&mut client, &scripts).await?;
        }
    }
    Ok(())
}

/// The major version of the server `client` is connected to.
pub async fn server_major(client: &Client) -> Result<Major, PostgresError> {
    let row = client
        .query_one("SHOW server_version", &[])
        .await
        .map_err(|source| PostgresError::Sql {
            what: "reading server_version".into(),
            source,
        })?;
    let text: String = row.get(0);
    Ok(Major::parse(&text).unwrap_or(Major(0, 0)))
}

/// A server to talk to for one command (`init`, `psql`, `exec`, `shell`): the one a running
/// regobox keeps up, the external one, or a temporary one regobox starts (listening on `listen`;
/// the Unix socket only when empty) and stops at the end.
pub struct Session {
    pub endpoint: Endpoint,
    temporary: Option<(Embedded, Server)>,
    stop_timeout: Duration,
}

impl Session {
    /// Open a session; `bootstrap` brings the role, database, extensions and scripts up to date
    /// first. Without it, a temporary server still gets the role and database (its cluster may
    /// be brand new), but nothing that could fail and lock the user out of `psql`.
    pub async fn open(
        config: &Config,
        secrets: &SecretStore,
        config_dirs: &[PathBuf],
        bootstrap: bool,
        create: bool,
        listen: &str,
        cancel: &CancellationToken,
    ) -> Result<Session, PostgresError> {
        let pg = &config.postgres;
        let reach = |endpoint: Endpoint| async move {
            wait_ready(None, &endpoint, pg.start_timeout).await?;
            if bootstrap {
                self::bootstrap(config, &endpoint, config_dirs).await?;
            }
            Ok(endpoint)
        };
        let (endpoint, temporary) = match pg.mode {
            PostgresMode::External => {
                let endpoint = Endpoint::external(config)?;
                (unless(cancel, reach(endpoint)).await?, None)
            }
            PostgresMode::Embedded => {
                match unless(cancel, Embedded::open(config, secrets, create)).await? {
                    Opened::Busy(endpoint) => {
                        tracing::debug!("using the PostgreSQL server of the running regobox");
                        (unless(cancel, reach(endpoint)).await?, None)
                    }
                    Opened::Owned(embedded) => {
                        let mut server = embedded.start(listen, Sink::Stderr, None, None)?;
                        let endpoint = embedded.endpoint().clone();
                        let ready = unless(cancel, async {
                            wait_ready(Some(&mut server), &endpoint, pg.start_timeout).await?;
                            let part = if bootstrap {
                                Bootstrap::Full
                            } else {
                                Bootstrap::Login
                            };
                            bootstrap_part(config, &endpoint, config_dirs, part).await
                        })
                        .await;
                        // The server is stopped, and waited for, before regobox exits: the next
                        // command does not find it still shutting down.
                        if let Err(e) = ready {
                            let _ = server.stop(pg.stop_timeout, std::future::pending()).await;
                            return Err(e);
                        }
                        (endpoint, Some((embedded, server)))
                    }
                }
            }
        };
        let session = Session {
            endpoint,
            temporary,
            stop_timeout: pg.stop_timeout,
        };
        if cancel.is_cancelled() {
            // Asked to stop as the database became ready: the command does not run.
            let _ = session.close().await;
            return Err(PostgresError::Interrupted);
        }
        Ok(session)
    }

    /// Stop the temporary server, if any.
    pub async fn close(self) -> Result<(), PostgresError> {
        if let Some((_embedded, mut server)) = self.temporary {
            let status = server
                .stop(self.stop_timeout, std::future::pending())
                .await
                .map_err(|source| PostgresError::Io {
                    path: "postgres".into(),
                    source,
                })?;
            if !status.success() {
                return Err(PostgresError::Exited { status });
            }
        }
        Ok(())
    }
}

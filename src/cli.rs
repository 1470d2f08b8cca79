//! The command line: parse arguments, load the configuration, run one command, and turn its
//! outcome into an exit code (printing an error once, with its causes).

use std::ffi::OsString;
use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use tokio::signal::unix::{SignalKind, signal};

use crate::config::{self, Loaded, PostgresMode};
use crate::exit;
use crate::postgres::Session;
use crate::secrets::SecretStore;
use crate::supervisor::{self, Plan, StopSignals};
use crate::volumes::Layout;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Parser)]
#[command(
    name = "regobox",
    version,
    about = "PID 1 of an all-in-one server image: PostgreSQL on a host volume and the app it serves"
)]
pub struct Cli {
    /// Configuration directory; its `*.toml` files are merged in file-name order across all
    /// directories. May be repeated (or `:`-separated in REGOBOX_CONFIG_DIR). Default:
    /// /etc/regobox then /config, where they exist.
    #[arg(
        long = "config-dir",
        env = "REGOBOX_CONFIG_DIR",
        value_delimiter = ':',
        global = true
    )]
    pub config_dir: Vec<PathBuf>,

    /// Format of regobox's own log lines (on stderr).
    #[arg(long, env = "REGOBOX_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,

    #[command(subcommand)]
    pub command: Command,
}

pub use crate::logs::Format as LogFormat;

#[derive(Debug, clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct BackupArgs {
    #[command(subcommand)]
    pub command: Option<BackupCommand>,
    /// Where to write the archive: a path, or `-` for stdout. Default: a new file in the
    /// backups directory (backup.dir), where backup.keep applies.
    #[arg(long, short)]
    pub output: Option<String>,
    /// Same as --output (so `regobox backup -` streams to stdout).
    #[arg(value_name = "OUTPUT", conflicts_with = "output")]
    pub target: Option<String>,
    /// Leave the generated secrets out.
    #[arg(long)]
    pub no_secrets: bool,
    /// Leave the configuration files out.
    #[arg(long)]
    pub no_config: bool,
}

#[derive(Debug, Subcommand)]
pub enum BackupCommand {
    /// The archives of the backups directory: size, date, PostgreSQL major, whether they verify.
    List,
    /// Check an archive's structure and every checksum.
    Verify {
        archive: PathBuf,
        /// Also restore its database into a throwaway server and check that it starts.
        #[arg(long)]
        restore_test: bool,
        /// Where the restore test writes the dump and its throwaway cluster (never the live
        /// volume; default: the temporary directory, TMPDIR or /tmp).
        #[arg(long, value_name = "DIR")]
        work_dir: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Bring everything up and supervise it; stop cleanly on SIGTERM or SIGINT.
    Run,
    /// Run one service in the foreground, with what it depends on (e.g. PostgreSQL); exit with
    /// its exit code when it ends.
    Start { service: String },
    /// Run only the cron scheduler (with PostgreSQL).
    Cron,
    /// An interactive shell with the application environment.
    Shell,
    /// Run `<scripts_dir>/CMD` if it is an executable file, else CMD from PATH, with the
    /// application environment; exit with its exit code.
    Exec {
        command: OsString,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
    /// Write an archive of the database and the volumes (see `backup list` and `backup verify`).
    Backup(BackupArgs),
    /// Restore an archive into this volume: verified first; refuses to replace existing data
    /// without --force; the previous data stays until the restore has succeeded.
    Restore {
        archive: PathBuf,
        /// Replace the data the volume holds.
        #[arg(long)]
        force: bool,
    },
    /// Print the state of every service (from the supervision port).
    Status,
    /// Exit 0 if every essential service is ready, else 1 (for a Docker HEALTHCHECK).
    Health,
    /// Prepare the volumes, secrets and database, then stop PostgreSQL and exit (idempotent).
    Init,
    /// Print the effective configuration as TOML, secrets redacted.
    Config {
        /// Say for every key which layer set it.
        #[arg(long)]
        origin: bool,
    },
    /// Run psql connected to the application database as its owner; ARGS are passed through.
    Psql {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
    /// Upgrade the cluster to the server binaries' major in place with pg_upgrade, keeping the
    /// old cluster (whatever postgres.upgrade says); or finish or roll back the last upgrade.
    /// regobox must not be running on the volume.
    Upgrade {
        /// Remove the old cluster the last upgrade kept.
        #[arg(long, conflicts_with = "rollback")]
        finish: bool,
        /// Put the old cluster back (the upgraded one is removed).
        #[arg(long)]
        rollback: bool,
        /// With --rollback: even though a server ran on the upgraded cluster (what it wrote is
        /// lost).
        #[arg(long, requires = "rollback")]
        force: bool,
    },
    /// Give the application role the password of the configuration (postgres.password) or of
    /// the secret file: the one way regobox changes a password the cluster already has.
    Password {
        /// Make a new secret first (its clients must then be given it).
        #[arg(long)]
        reset: bool,
    },
}

/// Parse the command line, run the command, and return the process exit code.
pub fn main() -> u8 {
    crate::process::mark_launch();
    crate::process::file_size_limit_is_an_error();
    let cli = Cli::parse();
    init_logging(cli.log_format);
    crate::logs::set_format(cli.log_format);
    let sources = config::Sources::from_process(cli.config_dir.clone());
    let loaded = match config::load(&sources) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("regobox: {e}");
            return exit::CONFIG;
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("regobox: cannot start the async runtime: {e}");
            return exit::FAILURE;
        }
    };
    let outcome = runtime.block_on(async {
        crate::process::install().context("starting the reaper")?;
        dispatch(cli.command, &loaded).await
    });
    // Do not wait for tasks still blocked on a child's output.
    runtime.shutdown_timeout(std::time::Duration::from_millis(200));
    match outcome {
        Ok(code) => code,
        Err(e) => {
            eprintln!("regobox: error: {e:#}");
            exit::code_for(&e)
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("REGOBOX_LOG")
        // tokio-postgres reports server NOTICEs at info level: only warnings are of interest.
        // The HTTP crates log what clients do wrong, a line each (an unsolicited PING ACK is an
        // h2 WARN): a client could flood the log. regobox logs what matters itself, rate-limited.
        .unwrap_or_else(|_| {
            tracing_subscriber::EnvFilter::new("info,tokio_postgres=warn,h2=off,hyper=off")
        });
    let builder = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

async fn dispatch(command: Command, loaded: &Loaded) -> anyhow::Result<u8> {
    let touches_volume = !matches!(
        command,
        Command::Config { .. } | Command::Status | Command::Health
    );
    if touches_volume {
        crate::backup::recover(&loaded.config)?;
        if loaded.config.postgres.mode == PostgresMode::Embedded {
            crate::postgres::upgrade::recover(&loaded.config.postgres.data_dir)?;
        }
    }
    match command {
        Command::Run => {
            let plan = Plan::everything(&loaded.config)?;
            supervisor::run(loaded, plan).await
        }
        Command::Start { service } => {
            let plan = Plan::one(&loaded.config, &service)?;
            supervisor::run(loaded, plan).await
        }
        Command::Cron => supervisor::run(loaded, Plan::cron_only()).await,
        Command::Shell => {
            let shell = ["/bin/bash", "/bin/sh"]
                .iter()
                .find(|p| std::path::Path::new(p).is_file())
                .copied()
                .unwrap_or("/bin/sh");
            one_off(loaded, shell.into(), Vec::new()).await
        }
        Command::Exec { command, args } => {
            let program = command
                .to_str()
                .and_then(|name| supervisor::script_path(&loaded.config, name))
                .map(OsString::from)
                .unwrap_or(command);
            one_off(loaded, program, args).await
        }
        Command::Backup(args) => backup(loaded, args).await,
        Command::Restore { archive, force } => {
            let opts = crate::backup::RestoreOptions {
                archive,
                force,
                scripts: crate::postgres::bootstrap::init_scripts(&loaded.dirs),
            };
            let stop = stop_requested()?;
            // A running regobox does it: it checks and builds the restored data beside the live
            // data while everything runs, then stops everything in order, swaps it in, and
            // starts everything again.
            if let Some(reply) =
                supervisor::control::request_restore(&loaded.config, &opts, &stop).await?
            {
                if reply.code == exit::OK {
                    tracing::info!("{} (through the running regobox)", reply.message);
                } else {
                    eprintln!("regobox: error: {}", reply.message);
                }
                return Ok(reply.code);
            }
            let layout = Layout::new(&loaded.config);
            // A restore refused on a fresh volume leaves it as it was: absent.
            let missing = layout.missing();
            let restored = async {
                layout.prepare()?;
                crate::backup::restore(&loaded.config, &layout, &opts, &stop).await
            }
            .await;
            if restored.is_err() {
                Layout::unprepare(&missing);
            }
            restored?;
            Ok(exit::OK)
        }
        Command::Status => status(loaded).await,
        Command::Health => health(loaded).await,
        Command::Init => init(loaded).await,
        Command::Config { origin } => {
            print!("{}", loaded.to_toml(origin));
            Ok(exit::OK)
        }
        Command::Psql { args } => psql(loaded, args).await,
        Command::Password { reset } => password(loaded, reset).await,
        Command::Upgrade {
            finish,
            rollback,
            force,
        } => upgrade(loaded, finish, rollback, force).await,
    }
}

/// What `open` makes of a cancellation token (opening the database), cancelled by the first
/// stop signal: `open` then stops a temporary server it started, and waits for it, and the
/// command fails naming the signal. What ends well in spite of the signal (a change already under
/// way when it came) is kept.
async fn interruptible<T, F>(
    signals: &mut StopSignals,
    open: impl FnOnce(CancellationToken) -> F,
) -> anyhow::Result<T>
where
    F: std::future::Future<Output = Result<T, crate::postgres::PostgresError>>,
{
    let cancel = CancellationToken::new();
    match signals.cancelling(open(cancel.clone()), &cancel).await {
        (Err(crate::postgres::PostgresError::Interrupted), Some(s)) => {
            anyhow::bail!("interrupted by {s} while opening the database")
        }
        (r, _) => Ok(r?),
    }
}

async fn password(loaded: &Loaded, reset: bool) -> anyhow::Result<u8> {
    let config = &loaded.config;
    let pg = &config.postgres;
    if pg.mode != PostgresMode::Embedded {
        anyhow::bail!(
            "the PostgreSQL server is external (postgres.url): its passwords are its administrator's"
        );
    }
    let mut signals = StopSignals::install().context("installing signal handlers")?;
    crate::postgres::require_cluster(config)?;
    let layout = Layout::new(config);
    layout.prepare()?;
    let secrets = SecretStore::new(&layout.secrets);
    let secret = secrets.path(crate::postgres::APP_PASSWORD_SECRET);
    // A new secret is put in place only once the cluster has it (a refusal leaves the old).
    let mut staged = None;
    let value = if !pg.password.is_empty() {
        if reset {
            anyhow::bail!(
                "the application role's password is postgres.password in the configuration: change it there (and run `regobox password` or restart)"
            );
        }
        pg.password.clone()
    } else if reset {
        let s = secrets.stage(crate::postgres::APP_PASSWORD_SECRET)?;
        let value = s.value.clone();
        staged = Some(s);
        value
    } else {
        secrets
            .get(crate::postgres::APP_PASSWORD_SECRET)?
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "{} is missing: `regobox password --reset` makes a new one",
                    secret.display()
                )
            })?
    };
    interruptible(&mut signals, |cancel| async move {
        crate::postgres::set_app_password(config, &secrets, &value, &cancel).await
    })
    .await?;
    if let Some(s) = staged {
        s.commit()?;
    }
    let from = if pg.password.is_empty() {
        secret.display().to_string()
    } else {
        "postgres.password".into()
    };
    tracing::warn!(role = %pg.user, from, new = reset, "the application role's password is set");
    println!(
        "role {}: password set from {from}; restart what uses the old one (regobox restarts the application with the new one at its next start)",
        pg.user
    );
    Ok(exit::OK)
}

async fn init(loaded: &Loaded) -> anyhow::Result<u8> {
    let config = &loaded.config;
    let mut signals = StopSignals::install().context("installing signal handlers")?;
    let layout = Layout::new(config);
    layout.prepare()?;
    let secrets = SecretStore::new(&layout.secrets);
    let session = interruptible(&mut signals, |cancel| async move {
        Session::open(config, &secrets, &loaded.dirs, true, true, "", &cancel).await
    })
    .await?;
    session.close().await?;
    tracing::info!(
        mode = ?config.postgres.mode,
        database = %config.postgres.database,
        "initialised"
    );
    Ok(exit::OK)
}

async fn upgrade(loaded: &Loaded, finish: bool, rollback: bool, force: bool) -> anyhow::Result<u8> {
    use crate::postgres::{Embedded, Opened, upgrade};
    let config = &loaded.config;
    anyhow::ensure!(
        config.postgres.mode == PostgresMode::Embedded,
        "postgres.mode = \"external\": regobox does not run that server, and does not upgrade it"
    );
    let data_dir = &config.postgres.data_dir;
    let layout = Layout::new(config);
    layout.prepare()?;
    let secrets = SecretStore::new(&layout.secrets);
    let _signals = StopSignals::install().context("installing signal handlers")?;
    if finish || rollback {
        // No other command may be opening the cluster, and no server running on it.
        let _guard = upgrade::guard(data_dir, std::time::Duration::ZERO).await?;
        let home = data_dir.parent().unwrap_or(data_dir).to_path_buf();
        let account =
            crate::users::service_account(&config.postgres.os_user, &home, "postgres.os_user")
                .await?;
        let lock = crate::postgres::cluster::DataDirLock::try_acquire(
            data_dir,
            &account,
            &config.runtime_dir,
        )?;
        anyhow::ensure!(
            lock.is_some(),
            "a regobox is running on {}: stop it first",
            data_dir.display()
        );
        let done = if finish {
            upgrade::finish(data_dir)?
        } else {
            upgrade::rollback(data_dir, force)?
        };
        drop(lock);
        tracing::info!("{done}");
        return Ok(exit::OK);
    }
    let before = crate::postgres::cluster::inspect(data_dir)?;
    let request = upgrade::Request {
        backup: backup_before_link(loaded, &layout, &secrets, &before).await?,
    };
    // Not interruptible: a stop signal waits for pg_upgrade rather than leaving it running.
    match Embedded::open_with(config, &secrets, false, Some(&request)).await? {
        Opened::Busy(_) => anyhow::bail!(
            "a regobox is running on {}: stop it first",
            data_dir.display()
        ),
        Opened::Owned(embedded) => {
            if crate::postgres::cluster::inspect(data_dir)? == before {
                tracing::info!(
                    major = %embedded.binaries.major,
                    "nothing to upgrade: the cluster is of the server binaries' major"
                );
            }
        }
    }
    Ok(exit::OK)
}

/// With `postgres.upgrade_method = "link"` and a cluster of an older major than the server
/// binaries: a backup archive of it, taken with its own major's binaries (a rollback once the
/// new server has run is a restore of it); its path.
async fn backup_before_link(
    loaded: &Loaded,
    layout: &Layout,
    secrets: &SecretStore,
    state: &crate::postgres::cluster::DataDirState,
) -> anyhow::Result<Option<PathBuf>> {
    use crate::postgres::binaries::Binaries;
    let config = &loaded.config;
    let pg = &config.postgres;
    let crate::postgres::cluster::DataDirState::Cluster(major) = state else {
        return Ok(None);
    };
    if pg.upgrade_method != crate::config::UpgradeMethod::Link {
        return Ok(None);
    }
    let server = Binaries::find(&pg.bin_dir, None).await?;
    if *major >= server.major {
        return Ok(None);
    }
    // Everything the upgrade checks before it changes anything, checked before the backup too.
    let old = crate::postgres::upgrade::preflight(config, *major, &server).await?;
    let mut at_old = config.clone();
    at_old.postgres.bin_dir = old.dir.clone();
    tracing::info!(
        from = %major,
        to = %server.major,
        "postgres.upgrade_method = link: taking a backup archive of the cluster first (the old cluster cannot be put back once the new server has run)"
    );
    let session = Session::open(
        &at_old,
        secrets,
        &loaded.dirs,
        false,
        false,
        "",
        &CancellationToken::new(),
    )
    .await?;
    // In the backups directory, under a name `backup.keep`'s retention does not count (nor
    // remove): it is the way back for as long as the upgraded cluster lives.
    let name = format!(
        "pre-upgrade-pg{major}-{}.tar.zst",
        chrono::Utc::now().format("%Y%m%dT%H%M%SZ")
    );
    let opts = crate::backup::CreateOptions {
        output: crate::backup::Output::Path(layout.backups.join(name)),
        secrets: true,
        config: true,
    };
    let made = crate::backup::create(&at_old, layout, &loaded.dirs, &session.endpoint, &opts).await;
    session.close().await?;
    let archive = made?.context("the backup before a linked upgrade wrote no archive")?;
    tracing::warn!(
        archive = %archive.display(),
        "backup taken before the linked upgrade: once the new server has run, it is the way back (`regobox restore` with an image of PostgreSQL {major})"
    );
    Ok(Some(archive))
}

async fn psql(loaded: &Loaded, args: Vec<OsString>) -> anyhow::Result<u8> {
    let config = &loaded.config;
    // From here on, Ctrl-C goes to psql (same terminal process group) and does not kill regobox.
    let mut signals = StopSignals::install().context("installing signal handlers")?;
    crate::postgres::require_cluster(config)?;
    let layout = Layout::new(config);
    if config.postgres.mode == PostgresMode::Embedded {
        layout.prepare()?;
    }
    let secrets = SecretStore::new(&layout.secrets);
    let session = interruptible(&mut signals, |cancel| async move {
        Session::open(config, &secrets, &loaded.dirs, false, false, "", &cancel).await
    })
    .await?;
    let program = session.endpoint.client_program("psql").await;
    let mut command = std::process::Command::new(&program);
    command.args(&args).envs(session.endpoint.libpq_env());
    let spawned = crate::process::spawn(&mut command);
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => {
            session.close().await?;
            return Err(e).with_context(|| format!("running {}", program.display()));
        }
    };
    let status = loop {
        tokio::select! {
            status = child.wait() => break status,
            s = signals.recv() => {
                if s == "SIGTERM" {
                    child.signal(nix::sys::signal::Signal::SIGTERM);
                }
            }
        }
    };
    session.close().await?;
    Ok(crate::process::exit_code(status))
}

/// `exec` and `shell`: one command with the application environment, stdio inherited, its exit
/// code returned exactly. The database is the running regobox's, the external one, or a
/// temporary server stopped afterwards.
async fn one_off(loaded: &Loaded, program: OsString, args: Vec<OsString>) -> anyhow::Result<u8> {
    use nix::sys::signal::Signal;
    let config = &loaded.config;
    let mut signals = StopSignals::install().context("installing signal handlers")?;
    let mut hup = signal(SignalKind::hangup()).ok();
    let mut quit = signal(SignalKind::quit()).ok();
    let mut usr1 = signal(SignalKind::user_defined1()).ok();
    let mut usr2 = signal(SignalKind::user_defined2()).ok();
    crate::postgres::require_cluster(config)?;
    let layout = Layout::new(config);
    layout.prepare()?;
    let secrets = SecretStore::new(&layout.secrets);
    // Checked before a temporary server is started for the command.
    let account = match config.app.user.as_str() {
        "" => None,
        user if crate::users::is_root() => Some(crate::users::lookup(user)?.ok_or_else(|| {
            crate::config::error(
                crate::config::Origin::Default,
                "app.user",
                format!("OS user `{user}` does not exist"),
            )
        })?),
        _ => None,
    };
    let store = &secrets;
    let session = interruptible(&mut signals, |cancel| async move {
        let listen = &config.postgres.listen;
        Session::open(config, store, &loaded.dirs, true, false, listen, &cancel).await
    })
    .await?;
    let env =
        match supervisor::environment::build(config, &layout, &secrets, Some(&session.endpoint)) {
            Ok(env) => env,
            Err(e) => {
                // The temporary server, if any, is stopped before regobox exits.
                let _ = session.close().await;
                return Err(e);
            }
        };
    let mut command = std::process::Command::new(&program);
    command.args(&args).env_clear().envs(&env);
    if let Some(acct) = &account {
        acct.apply(&mut command);
    }
    let mut child = match crate::process::spawn(&mut command) {
        Ok(c) => c,
        Err(e) => {
            session.close().await?;
            let code = if e.kind() == std::io::ErrorKind::NotFound {
                127
            } else {
                126
            };
            eprintln!("regobox: cannot run {}: {e}", program.to_string_lossy());
            return Ok(code);
        }
    };
    // A terminal's Ctrl-C reaches the child directly (same process group); a SIGINT sent to
    // regobox alone is forwarded only when there is no terminal.
    let interactive = std::io::IsTerminal::is_terminal(&std::io::stdin());
    let status = loop {
        tokio::select! {
            status = child.wait() => break status,
            s = signals.recv() => {
                if s == "SIGTERM" {
                    child.signal(Signal::SIGTERM);
                } else if !interactive {
                    child.signal(Signal::SIGINT);
                }
            }
            _ = recv(&mut hup) => child.signal(Signal::SIGHUP),
            _ = recv(&mut quit) => child.signal(Signal::SIGQUIT),
            _ = recv(&mut usr1) => child.signal(Signal::SIGUSR1),
            _ = recv(&mut usr2) => child.signal(Signal::SIGUSR2),
        }
    };
    session.close().await?;
    Ok(crate::process::exit_code(status))
}

/// The next delivery of a signal that could be installed; never for one that could not.
async fn recv(stream: &mut Option<tokio::signal::unix::Signal>) {
    match stream {
        Some(s) => {
            s.recv().await;
        }
        None => std::future::pending().await,
    }
}

/// `regobox status`: the supervision port's `/status`, for a person.
async fn status(loaded: &Loaded) -> anyhow::Result<u8> {
    let sup = &loaded.config.supervision;
    anyhow::ensure!(
        sup.port != 0,
        "the supervision port is disabled (supervision.port = 0)"
    );
    let url = crate::health::local_url(&sup.listen, sup.port, "/status");
    let (code, body) = crate::health::get(&url)
        .await
        .map_err(|e| anyhow::anyhow!("regobox does not answer on {url}: {e}"))?;
    anyhow::ensure!(code == 200, "{url} answered {code}");
    let snap: crate::supervisor::status::Snapshot = serde_json::from_slice(&body)?;
    println!(
        "{} (up {:.0}s, {} orphans reaped)",
        if snap.ready { "READY" } else { "NOT READY" },
        snap.uptime_seconds,
        snap.orphans_reaped
    );
    println!(
        "{:<20} {:<9} {:<9} {:>8} {:>8} {:>10}  {:<16} DETAIL",
        "NAME", "KIND", "STATE", "PID", "RESTARTS", "UPTIME", "LAST EXIT"
    );
    let now = crate::supervisor::status::now_epoch();
    for s in &snap.services {
        let st = &s.status;
        let uptime = match (st.pid, st.started_at) {
            (Some(_), Some(t)) => format!("{:.0}s", now - t),
            _ => "-".into(),
        };
        println!(
            "{:<20} {:<9} {:<9} {:>8} {:>8} {:>10}  {:<16} {}",
            s.name,
            s.kind,
            format!("{:?}", st.state).to_lowercase(),
            st.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
            st.restarts,
            uptime,
            st.last_exit.clone().unwrap_or_else(|| "-".into()),
            st.detail.clone().unwrap_or_default()
        );
    }
    Ok(exit::OK)
}

/// `regobox health`: 0 when `/readyz` says ready, 1 otherwise.
async fn health(loaded: &Loaded) -> anyhow::Result<u8> {
    let sup = &loaded.config.supervision;
    let url = crate::health::local_url(&sup.listen, sup.port, "/readyz");
    match crate::health::get(&url).await {
        Ok((200, _)) => Ok(exit::OK),
        Ok((code, body)) => {
            eprintln!("regobox: {code} {}", String::from_utf8_lossy(&body).trim());
            Ok(exit::FAILURE)
        }
        Err(e) => {
            eprintln!("regobox: no answer on {url}: {e}");
            Ok(exit::FAILURE)
        }
    }
}

async fn backup(loaded: &Loaded, args: BackupArgs) -> anyhow::Result<u8> {
    let config = &loaded.config;
    let layout = Layout::new(config);
    match args.command {
        Some(BackupCommand::List) => {
            let listed = crate::backup::list(config, &layout).await;
            println!(
                "{:<44} {:>12}  {:<20}  {:<6}  VERIFIES",
                "ARCHIVE", "SIZE", "CREATED", "PG"
            );
            for l in &listed {
                let name = l
                    .path
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                let (created, major, ok) = match &l.manifest {
                    Ok(m) => (
                        m.created_at.clone(),
                        m.postgres
                            .as_ref()
                            .map(|p| p.major.clone())
                            .unwrap_or_else(|| "-".into()),
                        "yes".to_string(),
                    ),
                    Err(e) => ("-".into(), "-".into(), format!("NO: {e}")),
                };
                println!("{name:<44} {:>12}  {created:<20}  {major:<6}  {ok}", l.size);
            }
            Ok(if listed.iter().all(|l| l.manifest.is_ok()) {
                exit::OK
            } else {
                exit::DATA
            })
        }
        Some(BackupCommand::Verify {
            archive,
            restore_test,
            work_dir,
        }) => {
            let rules = crate::backup::rules(config, &layout);
            let manifest = crate::backup::verify(&archive, &rules).await?;
            // What a restore here would refuse, verify refuses in the same words.
            crate::backup::restorable_here(config, &archive, &manifest).await?;
            println!(
                "{}: OK, {} members, created {}, PostgreSQL {}",
                archive.display(),
                manifest.contents.members,
                manifest.created_at,
                manifest
                    .postgres
                    .as_ref()
                    .map(|p| p.server_version.as_str())
                    .unwrap_or("-")
            );
            if restore_test {
                layout.prepare()?;
                let work_dir = work_dir.unwrap_or_else(std::env::temp_dir);
                let stop = stop_requested()?;
                let scripts = crate::postgres::bootstrap::init_scripts(&loaded.dirs);
                crate::backup::restore_test(config, &layout, &archive, &work_dir, &scripts, &stop)
                    .await?;
                println!(
                    "{}: restore test OK (the database restores and the server starts)",
                    archive.display()
                );
            }
            Ok(exit::OK)
        }
        None => {
            crate::postgres::require_cluster(config)?;
            layout.prepare()?;
            // SIGINT or SIGTERM cancels the backup at any step: a temporary server is stopped,
            // the work directory and partial archive are removed as they are dropped.
            let mut signals = StopSignals::install().context("installing signal handlers")?;
            let output = match args.output.or(args.target).as_deref() {
                None => crate::backup::Output::Default,
                Some("-") => crate::backup::Output::Stdout,
                Some(p) => crate::backup::Output::Path(PathBuf::from(p)),
            };
            let opts = crate::backup::CreateOptions {
                output,
                secrets: !args.no_secrets,
                config: !args.no_config,
            };
            let secrets = SecretStore::new(&layout.secrets);
            let session = interruptible(&mut signals, |cancel| async move {
                Session::open(config, &secrets, &loaded.dirs, false, false, "", &cancel).await
            })
            .await?;
            let result = tokio::select! {
                r = crate::backup::create(config, &layout, &loaded.dirs, &session.endpoint, &opts) => r,
                s = signals.recv() => Err(anyhow::anyhow!("backup cancelled ({s}): nothing was left behind")),
            };
            session.close().await?;
            if let Some(path) = result? {
                println!("{}", path.display());
            }
            Ok(exit::OK)
        }
    }
}

/// A token cancelled by the first SIGINT or SIGTERM: a restore (or a restore test) stops where
/// it is and removes what it made, rather than dying with its server still running.
fn stop_requested() -> anyhow::Result<tokio_util::sync::CancellationToken> {
    let mut signals =
        supervisor::StopSignals::install().context("installing the signal handlers")?;
    let stop = tokio_util::sync::CancellationToken::new();
    let cancel = stop.clone();
    tokio::spawn(async move {
        let signal = signals.recv().await;
        tracing::warn!(
            signal,
            "stop requested: cancelling the restore (unless its data is already being swapped in: it then ends first)"
        );
        cancel.cancel();
        // Later requests are ignored while it cleans up (bounded by postgres.stop_timeout).
        loop {
            signals.recv().await;
        }
    });
    Ok(stop)
}

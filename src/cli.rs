//! The command line: parse arguments, load the configuration, run one command, and turn its
//! outcome into an exit code (printing an error once, with its causes).

use std::ffi::OsString;
use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};

use crate::config::{self, Loaded, PostgresMode};
use crate::exit;
use crate::postgres::Session;
use crate::run::StopSignals;
use crate::secrets::SecretStore;
use crate::volumes::Layout;

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

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Bring everything up and supervise it; stop cleanly on SIGTERM or SIGINT.
    Run,
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
}

/// Parse the command line, run the command, and return the process exit code.
pub fn main() -> u8 {
    let cli = Cli::parse();
    init_logging(cli.log_format);
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
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,tokio_postgres=warn"));
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
    match command {
        Command::Run => crate::run::run(loaded).await,
        Command::Init => init(loaded).await,
        Command::Config { origin } => {
            print!("{}", loaded.to_toml(origin));
            Ok(exit::OK)
        }
        Command::Psql { args } => psql(loaded, args).await,
    }
}

async fn init(loaded: &Loaded) -> anyhow::Result<u8> {
    let config = &loaded.config;
    let mut signals = StopSignals::install().context("installing signal handlers")?;
    let layout = Layout::new(config);
    layout.prepare()?;
    let secrets = SecretStore::new(&layout.secrets);
    tokio::select! {
        session = Session::open(config, &secrets, &loaded.dirs, true) => {
            session?.close().await?;
        }
        s = signals.recv() => {
            anyhow::bail!("interrupted by {s}");
        }
    }
    tracing::info!(
        mode = ?config.postgres.mode,
        database = %config.postgres.database,
        "initialised"
    );
    Ok(exit::OK)
}

async fn psql(loaded: &Loaded, args: Vec<OsString>) -> anyhow::Result<u8> {
    let config = &loaded.config;
    // From here on, Ctrl-C goes to psql (same terminal process group) and does not kill regobox.
    let mut signals = StopSignals::install().context("installing signal handlers")?;
    let layout = Layout::new(config);
    if config.postgres.mode == PostgresMode::Embedded {
        layout.prepare()?;
    }
    let secrets = SecretStore::new(&layout.secrets);
    let session = Session::open(config, &secrets, &loaded.dirs, false).await?;
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

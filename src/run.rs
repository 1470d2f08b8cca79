//! `regobox run`: bring everything up, keep it up, and stop it in order on a signal.
//!
//! Today this is PostgreSQL (embedded or external); the supervision of the application's
//! services, the proxy and the Docker bridge plug in here. The first SIGTERM or SIGINT stops
//! everything gracefully; a second one during the stop makes it immediate. regobox exits 0 after
//! a clean stop and non-zero when something essential failed.

use std::time::Duration;

use anyhow::Context as _;
use tokio::signal::unix::{Signal, SignalKind, signal};

use crate::config::{Loaded, PostgresMode};
use crate::exit;
use crate::logs::Sink;
use crate::postgres::{self, Embedded, Endpoint, Opened, PostgresError};
use crate::secrets::SecretStore;
use crate::volumes::Layout;

/// SIGTERM and SIGINT, as one stream of stop requests.
pub struct StopSignals {
    term: Signal,
    int: Signal,
}

impl StopSignals {
    /// Install the handlers (from then on these signals no longer kill regobox by default).
    pub fn install() -> std::io::Result<Self> {
        Ok(StopSignals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    /// The next stop request; returns the signal's name.
    pub async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        }
    }
}

/// Run until stopped; the exit code.
pub async fn run(loaded: &Loaded) -> anyhow::Result<u8> {
    let config = &loaded.config;
    let mut signals = StopSignals::install().context("installing signal handlers")?;
    let layout = Layout::new(config);
    layout.prepare()?;
    let secrets = SecretStore::new(&layout.secrets);
    let started = std::time::Instant::now();

    match config.postgres.mode {
        PostgresMode::External => {
            let endpoint = Endpoint::external(config)?;
            let ready = async {
                postgres::wait_ready(None, &endpoint, config.postgres.start_timeout).await?;
                postgres::bootstrap(config, &endpoint, &loaded.dirs).await
            };
            tokio::select! {
                r = ready => r?,
                s = signals.recv() => {
                    tracing::info!(signal = s, "stop requested during start-up");
                    return Ok(exit::OK);
                }
            }
            tracing::info!(
                elapsed_ms = started.elapsed().as_millis() as u64,
                url = %crate::config::redact_url(&config.postgres.url),
                "regobox is ready (external PostgreSQL)"
            );
            let s = signals.recv().await;
            tracing::info!(signal = s, "stopping");
            Ok(exit::OK)
        }
        PostgresMode::Embedded => {
            let embedded = match Embedded::open(config, &secrets).await? {
                Opened::Owned(e) => e,
                Opened::Busy(_) => {
                    return Err(PostgresError::Busy {
                        data_dir: config.postgres.data_dir.clone(),
                    }
                    .into());
                }
            };
            let mut server = embedded.start(&config.postgres.listen, Sink::Stdout)?;
            let grace = config.postgres.stop_timeout;
            let ready = tokio::select! {
                r = async {
                    postgres::wait_ready(Some(&mut server), embedded.endpoint(), config.postgres.start_timeout).await?;
                    postgres::bootstrap(config, embedded.endpoint(), &loaded.dirs).await
                } => Some(r),
                s = signals.recv() => {
                    tracing::info!(signal = s, "stop requested during start-up");
                    None
                }
            };
            match ready {
                None => return stop(&mut server, grace, &mut signals).await,
                Some(Err(e)) => {
                    let _ = stop(&mut server, grace, &mut signals).await;
                    return Err(e.into());
                }
                Some(Ok(())) => {}
            }
            tracing::info!(
                elapsed_ms = started.elapsed().as_millis() as u64,
                pid = server.pid(),
                "regobox is ready"
            );
            tokio::select! {
                status = server.wait() => {
                    let status = status.context("waiting for PostgreSQL")?;
                    Err(PostgresError::Exited { status }.into())
                }
                s = signals.recv() => {
                    tracing::info!(signal = s, "stopping");
                    stop(&mut server, grace, &mut signals).await
                }
            }
        }
    }
}

/// Stop PostgreSQL; a further stop signal makes the stop immediate.
async fn stop(
    server: &mut postgres::Server,
    grace: Duration,
    signals: &mut StopSignals,
) -> anyhow::Result<u8> {
    let status = server
        .stop(grace, async {
            signals.recv().await;
        })
        .await
        .context("stopping PostgreSQL")?;
    if status.success() {
        tracing::info!("PostgreSQL stopped cleanly");
        Ok(exit::OK)
    } else {
        tracing::warn!(%status, "PostgreSQL did not stop cleanly");
        Ok(exit::FAILURE)
    }
}

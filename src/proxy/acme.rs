//! Certificates from an ACME CA (RFC 8555) with the HTTP-01 challenge, answered by the proxy's
//! plain HTTP listener from [`Challenges`]. The account, the certificate and its key are kept in
//! `<secrets>/tls/`; the certificate is renewed `renew_before` its expiry and swapped in live.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::Context as _;
use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, ChallengeType, Identifier, NewAccount,
    NewOrder, OrderStatus, RetryPolicy,
};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::tls::{self, Certificates, Source};
use crate::config::AcmeConfig;

/// The path prefix of HTTP-01 challenges.
pub const CHALLENGE_PREFIX: &str = "/.well-known/acme-challenge/";

/// Pending HTTP-01 answers: token -> key authorization.
#[derive(Debug, Default)]
pub struct Challenges(RwLock<HashMap<String, String>>);

impl Challenges {
    pub fn answer(&self, token: &str) -> Option<String> {
        self.0.read().ok()?.get(token).cloned()
    }

    fn set(&self, token: String, value: String) {
        if let Ok(mut m) = self.0.write() {
            m.insert(token, value);
        }
    }

    fn clear(&self) {
        if let Ok(mut m) = self.0.write() {
            m.clear();
        }
    }
}

#[derive(Serialize, Deserialize)]
struct StoredAccount {
    directory: String,
    credentials: AccountCredentials,
}

/// Obtain and renew until `shutdown`.
pub async fn run(
    config: AcmeConfig,
    hostnames: Vec<String>,
    dir: PathBuf,
    certs: Arc<Certificates>,
    challenges: Arc<Challenges>,
    shutdown: CancellationToken,
) {
    let cert_path = dir.join("acme.pem");
    let key_path = dir.join("acme.key");
    let mut installed_serial: Option<String> = None;
    loop {
        let stored = match (std::fs::read(&cert_path), std::fs::read(&key_path)) {
            (Ok(c), Ok(k)) => tls::load_pem(&c, &k, Source::Acme).ok(),
            _ => None,
        };
        let fresh = stored.as_ref().is_some_and(|s| {
            s.info.remaining() > config.renew_before.as_secs() as i64
                && hostnames.iter().all(|h| s.info.names.contains(h))
        });
        let wait = if fresh {
            let s = stored.expect("checked above");
            if installed_serial.as_deref() != Some(s.info.serial.as_str()) {
                installed_serial = Some(s.info.serial.clone());
                certs.install(s);
            }
            config.check_interval
        } else {
            tracing::info!(directory = %config.directory, hostnames = ?hostnames, "requesting a certificate from the ACME CA");
            match issue(&config, &hostnames, &dir, &challenges).await {
                Ok((chain, key)) => {
                    challenges.clear();
                    let stored = tls::write_private(&key_path, key.as_bytes(), 0o600)
                        .and_then(|_| tls::write_private(&cert_path, chain.as_bytes(), 0o644));
                    if let Err(e) = stored {
                        tracing::warn!("cannot keep the ACME certificate on the volume: {e:#}");
                    }
                    match tls::load_pem(chain.as_bytes(), key.as_bytes(), Source::Acme) {
                        Ok(loaded) => {
                            installed_serial = Some(loaded.info.serial.clone());
                            certs.install(loaded);
                            config.check_interval
                        }
                        Err(e) => {
                            tracing::warn!("the ACME CA returned an unusable certificate: {e:#}");
                            retry_delay(&config)
                        }
                    }
                }
                Err(e) => {
                    challenges.clear();
                    tracing::warn!(
                        "ACME: no certificate this time ({e:#}); the current certificate stays in use, retrying in {}",
                        humantime::format_duration(retry_delay(&config))
                    );
                    retry_delay(&config)
                }
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}

fn retry_delay(config: &AcmeConfig) -> Duration {
    config.check_interval.min(Duration::from_secs(60))
}

async fn account(config: &AcmeConfig, dir: &Path) -> anyhow::Result<Account> {
    let builder = || -> anyhow::Result<_> {
        Ok(if config.ca_bundle.as_os_str().is_empty() {
            Account::builder()?
        } else {
            Account::builder_with_root(&config.ca_bundle)
                .with_context(|| format!("proxy.acme.ca_bundle {}", config.ca_bundle.display()))?
        })
    };
    let path = dir.join("acme-account.json");
    if let Ok(bytes) = std::fs::read(&path) {
        match serde_json::from_slice::<StoredAccount>(&bytes) {
            Ok(stored) if stored.directory == config.directory => {
                return Ok(builder()?.from_credentials(stored.credentials).await?);
            }
            Ok(_) => tracing::info!("proxy.acme.directory changed: registering a new account"),
            Err(e) => {
                tracing::warn!(path = %path.display(), "unreadable ACME account ({e}): registering a new one")
            }
        }
    }
    let contact: Vec<&str> = config.contact.iter().map(String::as_str).collect();
    let (account, credentials) = builder()?
        .create(
            &NewAccount {
                contact: &contact,
                terms_of_service_agreed: true,
                only_return_existing: false,
            },
            config.directory.clone(),
            None,
        )
        .await
        .with_context(|| format!("registering an account at {}", config.directory))?;
    let stored = StoredAccount {
        directory: config.directory.clone(),
        credentials,
    };
    tls::write_private(&path, &serde_json::to_vec_pretty(&stored)?, 0o600)?;
    Ok(account)
}

/// One order: (chain PEM, key PEM).
async fn issue(
    config: &AcmeConfig,
    hostnames: &[String],
    dir: &Path,
    challenges: &Challenges,
) -> anyhow::Result<(String, String)> {
    let account = account(config, dir).await?;
    let identifiers: Vec<Identifier> = hostnames.iter().cloned().map(Identifier::Dns).collect();
    let mut order = account
        .new_order(&NewOrder::new(&identifiers))
        .await
        .context("creating the order")?;
    {
        let mut authorizations = order.authorizations();
        while let Some(authz) = authorizations.next().await {
            let mut authz = authz?;
            match authz.status {
                AuthorizationStatus::Pending => {}
                AuthorizationStatus::Valid => continue,
                other => anyhow::bail!("authorization is {other:?}"),
            }
            let mut challenge = authz
                .challenge(ChallengeType::Http01)
                .context("the CA offers no HTTP-01 challenge")?;
            challenges.set(
                challenge.token.clone(),
                challenge.key_authorization().as_str().to_string(),
            );
            challenge.set_ready().await?;
        }
    }
    let retry = RetryPolicy::default().timeout(Duration::from_secs(120));
    let status = order.poll_ready(&retry).await?;
    if status != OrderStatus::Ready {
        let detail = order
            .state()
            .error
            .as_ref()
            .map(|e| format!(": {e}"))
            .unwrap_or_default();
        anyhow::bail!("the order is {status:?}{detail}");
    }
    let key = order.finalize().await.context("finalizing the order")?;
    let chain = order
        .poll_certificate(&retry)
        .await
        .context("downloading the certificate")?;
    Ok((chain, key))
}

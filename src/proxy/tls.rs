//! The proxy's certificate: from files (reloaded when they change), self-signed (generated once,
//! kept on the volume), or from ACME ([`super::acme`]). One certificate at a time, served
//! whatever the client's SNI (or lack of it).

use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio_rustls::rustls;
use tokio_rustls::rustls::server::{ClientHello, ResolvesServerCert};
use tokio_rustls::rustls::sign::CertifiedKey;

/// Where the current certificate came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    File,
    SelfSigned,
    Acme,
}

impl Source {
    fn name(self) -> &'static str {
        match self {
            Source::File => "file",
            Source::SelfSigned => "self-signed",
            Source::Acme => "acme",
        }
    }
}

/// What `/status`, `/metrics` and the log say of a certificate.
#[derive(Debug, Clone, PartialEq)]
pub struct Info {
    pub source: Source,
    pub subject: String,
    pub issuer: String,
    pub serial: String,
    pub names: Vec<String>,
    pub not_before: i64,
    pub not_after: i64,
}

impl Info {
    pub fn to_json(&self) -> Value {
        let time = |t: i64| {
            chrono::DateTime::from_timestamp(t, 0)
                .map(|d| d.to_rfc3339())
                .unwrap_or_default()
        };
        json!({
            "source": self.source.name(),
            "subject": self.subject,
            "issuer": self.issuer,
            "serial": self.serial,
            "names": self.names,
            "not_before": time(self.not_before),
            "not_after": time(self.not_after),
            "not_after_unix": self.not_after,
        })
    }

    /// Seconds until expiry (negative once expired).
    pub fn remaining(&self) -> i64 {
        self.not_after - chrono::Utc::now().timestamp()
    }
}

/// A certificate chain and key, parsed and checked.
pub struct Loaded {
    pub key: Arc<CertifiedKey>,
    pub info: Info,
}

/// Parse PEM `chain` and `key` (RSA, ECDSA or Ed25519; PKCS#8, PKCS#1 or SEC1).
pub fn load_pem(chain: &[u8], key: &[u8], source: Source) -> anyhow::Result<Loaded> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(chain)
        .collect::<Result<_, _>>()
        .context("not a PEM certificate chain")?;
    anyhow::ensure!(!certs.is_empty(), "no certificate in the chain file");
    let key = PrivateKeyDer::from_pem_slice(key).context("not a PEM private key")?;
    let provider = rustls::crypto::ring::default_provider();
    let signing = provider
        .key_provider
        .load_private_key(key)
        .context("unsupported private key")?;
    let certified = CertifiedKey::new(certs, signing);
    certified
        .keys_match()
        .context("the private key does not belong to the certificate")?;
    let info = describe(&certified.cert[0], source)?;
    Ok(Loaded {
        key: Arc::new(certified),
        info,
    })
}

fn describe(der: &CertificateDer<'_>, source: Source) -> anyhow::Result<Info> {
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref())
        .map_err(|e| anyhow::anyhow!("unreadable certificate: {e}"))?;
    let names = cert
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    x509_parser::extensions::GeneralName::DNSName(d) => Some(d.to_string()),
                    x509_parser::extensions::GeneralName::IPAddress(ip) => match ip.len() {
                        4 => Some(std::net::Ipv4Addr::new(ip[0], ip[1], ip[2], ip[3]).to_string()),
                        _ => None,
                    },
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    Ok(Info {
        source,
        subject: cert.subject().to_string(),
        issuer: cert.issuer().to_string(),
        serial: cert.raw_serial_as_string(),
        names,
        not_before: cert.validity().not_before.timestamp(),
        not_after: cert.validity().not_after.timestamp(),
    })
}

/// Serves the current certificate to every handshake; swapped live.
#[derive(Debug)]
pub struct Resolver {
    current: RwLock<Arc<CertifiedKey>>,
}

impl Resolver {
    pub fn new(key: Arc<CertifiedKey>) -> Arc<Resolver> {
        Arc::new(Resolver {
            current: RwLock::new(key),
        })
    }

    pub fn set(&self, key: Arc<CertifiedKey>) {
        if let Ok(mut c) = self.current.write() {
            *c = key;
        }
    }
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current.read().ok().map(|c| c.clone())
    }
}

/// The certificate state shared by the reloader, ACME and the status.
pub struct Certificates {
    pub resolver: Arc<Resolver>,
    pub status: watch::Sender<Option<Info>>,
}

impl Certificates {
    pub fn install(&self, loaded: Loaded) {
        tracing::info!(
            source = loaded.info.source.name(),
            subject = %loaded.info.subject,
            issuer = %loaded.info.issuer,
            names = ?loaded.info.names,
            not_after = %chrono::DateTime::from_timestamp(loaded.info.not_after, 0).map(|d| d.to_rfc3339()).unwrap_or_default(),
            "TLS certificate in use"
        );
        self.resolver.set(loaded.key);
        self.status.send_replace(Some(loaded.info));
    }
}

/// Write `bytes` to `path` atomically with `mode`.
pub fn write_private(path: &Path, bytes: &[u8], mode: u32) -> anyhow::Result<()> {
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)
            .with_context(|| format!("creating {}", tmp.display()))?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// The directory of the proxy's generated keys: `<secrets>/tls`, 0700.
pub fn tls_dir(secrets_dir: &Path) -> anyhow::Result<PathBuf> {
    let dir = secrets_dir.join("tls");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
    Ok(dir)
}

/// The self-signed certificate for `hostnames`: the one on the volume if it still covers them
/// and has more than 30 days left, else a new one (valid 825 days from yesterday).
pub fn self_signed(dir: &Path, hostnames: &[String]) -> anyhow::Result<Loaded> {
    let cert_path = dir.join("self-signed.pem");
    let key_path = dir.join("self-signed.key");
    if let (Ok(chain), Ok(key)) = (std::fs::read(&cert_path), std::fs::read(&key_path)) {
        match load_pem(&chain, &key, Source::SelfSigned) {
            Ok(loaded)
                if hostnames.iter().all(|h| loaded.info.names.contains(h))
                    && loaded.info.remaining() > 30 * 86400 =>
            {
                return Ok(loaded);
            }
            Ok(_) => tracing::info!(
                "the self-signed certificate no longer fits proxy.hostnames or expires soon: generating a new one"
            ),
            Err(e) => {
                tracing::warn!(path = %cert_path.display(), "unusable self-signed certificate ({e:#}): generating a new one")
            }
        }
    }
    let key = rcgen::KeyPair::generate().context("generating a key")?;
    let mut params = rcgen::CertificateParams::new(hostnames.to_vec())
        .context("proxy.hostnames for the self-signed certificate")?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, hostnames[0].clone());
    params
        .distinguished_name
        .push(rcgen::DnType::OrganizationName, "regobox self-signed");
    let now = SystemTime::now();
    params.not_before = (now - Duration::from_secs(86400)).into();
    params.not_after = (now + Duration::from_secs(825 * 86400)).into();
    let cert = params.self_signed(&key).context("self-signing")?;
    write_private(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
    write_private(&cert_path, cert.pem().as_bytes(), 0o600)?;
    load_pem(
        cert.pem().as_bytes(),
        key.serialize_pem().as_bytes(),
        Source::SelfSigned,
    )
}

/// Identity of a file's current content, cheaply.
fn stamp(path: &Path) -> Option<(u64, u64, i64, i64)> {
    let m = std::fs::metadata(path).ok()?;
    Some((
        m.dev(),
        m.ino(),
        m.mtime_nsec() + m.mtime() * 1_000_000_000,
        m.size() as i64,
    ))
}

/// Load `cert` and `key` from files, naming them in errors.
pub fn load_files(cert: &Path, key: &Path) -> anyhow::Result<Loaded> {
    let chain = std::fs::read(cert)
        .with_context(|| format!("reading proxy.tls.cert {}", cert.display()))?;
    let k =
        std::fs::read(key).with_context(|| format!("reading proxy.tls.key {}", key.display()))?;
    load_pem(&chain, &k, Source::File).with_context(|| {
        format!(
            "proxy.tls.cert {} / proxy.tls.key {}",
            cert.display(),
            key.display()
        )
    })
}

/// Watch `cert` and `key`; install them when they change and parse. A half-written pair is
/// retried at the next tick; the previous certificate stays in use meanwhile.
pub async fn watch_files(
    certs: Arc<Certificates>,
    cert: PathBuf,
    key: PathBuf,
    every: Duration,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let mut seen = (stamp(&cert), stamp(&key));
    let mut warned = None;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shutdown.cancelled() => return,
        }
        let now = (stamp(&cert), stamp(&key));
        if now == seen {
            continue;
        }
        match load_files(&cert, &key) {
            Ok(loaded) => {
                tracing::info!("certificate files changed: reloaded");
                certs.install(loaded);
                seen = now;
                warned = None;
            }
            Err(e) => {
                if warned != Some(now) {
                    tracing::warn!(
                        "certificate files changed but cannot be used yet ({e:#}); the previous certificate stays in use"
                    );
                    warned = Some(now);
                }
            }
        }
    }
}

//! Where the Docker engine is and how to reach it: bollard for regobox's own calls (ping, version,
//! inspections, the lifecycle), raw streams for the proxy (which forwards bytes it does not
//! reinterpret).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpStream, UnixStream};

use crate::config::DockerConfig;

/// The default engine socket.
pub const DEFAULT_SOCKET: &str = "/var/run/docker.sock";

/// A bidirectional byte stream to the engine.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// TLS material for a remote engine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// The engine's address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Host {
    Unix(PathBuf),
    Tcp {
        /// `host:port`.
        addr: String,
        tls: Option<TlsFiles>,
    },
}

impl Host {
    /// From `docker.host` (else `DOCKER_HOST`, else the default socket) and the TLS keys (else
    /// `DOCKER_CERT_PATH` when `DOCKER_TLS_VERIFY` is set).
    pub fn resolve(config: &DockerConfig) -> anyhow::Result<Host> {
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let (text, key) = if !config.host.is_empty() {
            (config.host.clone(), "docker.host")
        } else if let Some(h) = env("DOCKER_HOST") {
            (h, "DOCKER_HOST")
        } else {
            (format!("unix://{DEFAULT_SOCKET}"), "docker.host")
        };
        if let Some(path) = text.strip_prefix("unix://") {
            return Ok(Host::Unix(PathBuf::from(path)));
        }
        let Some(addr) = text.strip_prefix("tcp://") else {
            anyhow::bail!("{key} = `{text}` is not unix:///path or tcp://host:port");
        };
        let addr = addr.trim_end_matches('/').to_string();
        let tls = if !config.tls_ca.as_os_str().is_empty() {
            Some(TlsFiles {
                ca: config.tls_ca.clone(),
                cert: config.tls_cert.clone(),
                key: config.tls_key.clone(),
            })
        } else if env("DOCKER_TLS_VERIFY").is_some_and(|v| v != "0") {
            let dir = env("DOCKER_CERT_PATH")
                .map(PathBuf::from)
                .or_else(|| env("HOME").map(|h| PathBuf::from(h).join(".docker")))
                .context("DOCKER_TLS_VERIFY is set but neither DOCKER_CERT_PATH nor HOME is")?;
            Some(TlsFiles {
                ca: dir.join("ca.pem"),
                cert: dir.join("cert.pem"),
                key: dir.join("key.pem"),
            })
        } else {
            None
        };
        Ok(Host::Tcp { addr, tls })
    }

    /// For logs and `/status`.
    pub fn describe(&self) -> String {
        match self {
            Host::Unix(p) => format!("unix://{}", p.display()),
            Host::Tcp { addr, tls: None } => format!("tcp://{addr}"),
            Host::Tcp { addr, tls: Some(_) } => format!("tcp://{addr} (TLS)"),
        }
    }

    /// A bollard client (API version not negotiated yet).
    pub fn bollard(&self) -> anyhow::Result<bollard::Docker> {
        let timeout = 120;
        let version = bollard::API_DEFAULT_VERSION;
        Ok(match self {
            Host::Unix(p) => {
                bollard::Docker::connect_with_unix(&p.display().to_string(), timeout, version)?
            }
            Host::Tcp { addr, tls: None } => {
                bollard::Docker::connect_with_http(&format!("tcp://{addr}"), timeout, version)?
            }
            Host::Tcp {
                addr,
                tls: Some(files),
            } => bollard::Docker::connect_with_ssl(
                &format!("tcp://{addr}"),
                &files.key,
                &files.cert,
                &files.ca,
                timeout,
                version,
            )?,
        })
    }
}

/// Opens raw connections to the engine for the proxy.
#[derive(Clone)]
pub struct Connector {
    host: Host,
    tls: Option<(tokio_rustls::TlsConnector, ServerName<'static>)>,
}

impl Connector {
    pub fn new(host: &Host) -> anyhow::Result<Connector> {
        let tls = match host {
            Host::Tcp {
                addr,
                tls: Some(files),
            } => Some(tls_connector(addr, files)?),
            _ => None,
        };
        Ok(Connector {
            host: host.clone(),
            tls,
        })
    }

    /// A new connection to the engine (10 s to connect).
    pub async fn connect(&self) -> std::io::Result<Box<dyn Io>> {
        let timeout = Duration::from_secs(10);
        let timed_out = || std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out");
        match &self.host {
            Host::Unix(path) => Ok(Box::new(
                tokio::time::timeout(timeout, UnixStream::connect(path))
                    .await
                    .map_err(|_| timed_out())??,
            )),
            Host::Tcp { addr, .. } => {
                let tcp = tokio::time::timeout(timeout, TcpStream::connect(addr.as_str()))
                    .await
                    .map_err(|_| timed_out())??;
                tcp.set_nodelay(true)?;
                match &self.tls {
                    None => Ok(Box::new(tcp)),
                    Some((connector, name)) => Ok(Box::new(
                        tokio::time::timeout(timeout, connector.connect(name.clone(), tcp))
                            .await
                            .map_err(|_| timed_out())??,
                    )),
                }
            }
        }
    }
}

fn tls_connector(
    addr: &str,
    files: &TlsFiles,
) -> anyhow::Result<(tokio_rustls::TlsConnector, ServerName<'static>)> {
    let read_certs = |path: &PathBuf| -> anyhow::Result<Vec<CertificateDer<'static>>> {
        let certs = CertificateDer::pem_file_iter(path)
            .with_context(|| format!("reading {}", path.display()))?
            .collect::<Result<Vec<_>, _>>()
            .with_context(|| format!("{} is not a PEM certificate file", path.display()))?;
        anyhow::ensure!(!certs.is_empty(), "{} holds no certificate", path.display());
        Ok(certs)
    };
    let mut roots = tokio_rustls::rustls::RootCertStore::empty();
    for cert in read_certs(&files.ca)? {
        roots
            .add(cert)
            .with_context(|| format!("{}: unusable CA certificate", files.ca.display()))?;
    }
    let chain = read_certs(&files.cert)?;
    let key = PrivateKeyDer::from_pem_file(&files.key)
        .with_context(|| format!("{} is not a PEM private key", files.key.display()))?;
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let config = tokio_rustls::rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .context("the Docker client certificate and key do not match")?;
    let host = addr
        .rsplit_once(':')
        .map(|(h, _)| h)
        .unwrap_or(addr)
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let name = ServerName::try_from(host.clone())
        .with_context(|| format!("`{host}` is not a host name for TLS"))?;
    Ok((tokio_rustls::TlsConnector::from(Arc::new(config)), name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_are_parsed() {
        let mut c = DockerConfig {
            host: "unix:///run/x.sock".into(),
            ..Default::default()
        };
        assert_eq!(
            Host::resolve(&c).unwrap(),
            Host::Unix(PathBuf::from("/run/x.sock"))
        );
        c.host = "tcp://engine.example:2376/".into();
        c.tls_ca = "/c/ca.pem".into();
        c.tls_cert = "/c/cert.pem".into();
        c.tls_key = "/c/key.pem".into();
        let h = Host::resolve(&c).unwrap();
        assert_eq!(h.describe(), "tcp://engine.example:2376 (TLS)");
        c.host = "ssh://x".into();
        assert!(Host::resolve(&c).is_err());
    }
}

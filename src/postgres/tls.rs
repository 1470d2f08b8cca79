//! TLS to an external PostgreSQL server, as libpq's `sslmode` means it, through rustls.
//!
//! `postgres.url` is read into a [`Target`]: the connection settings tokio-postgres knows, and
//! regobox's own [`Tls`] for what it does not (`sslmode=verify-ca|verify-full`, `sslrootcert`,
//! `sslcert`, `sslkey`). The same [`Tls`] gives libpq's variables to `psql`, `pg_dump` and the
//! application, so every client of the server checks it the same way.
//!
//! The modes, as in libpq: `disable` never uses TLS; `prefer` (a URL without `sslmode`) uses it
//! when the server offers it, without checking the certificate; `require` insists on it, and
//! checks the certificate's issuer only when `sslrootcert` is given; `verify-ca` checks the issuer
//! against `sslrootcert`; `verify-full` checks the issuer and that the certificate names the host.
//! `sslrootcert=system` is the system's CA bundle.

use std::fmt;
use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};

use crate::dburl::{SYSTEM_ROOTS, SslMode, TlsSettings};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use sha2::Digest;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::Socket;
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect};
use tokio_rustls::rustls;
use tokio_rustls::rustls::client::WebPkiServerVerifier;
use tokio_rustls::rustls::client::danger::{
    HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier,
};
use tokio_rustls::rustls::{CertificateError, DigitallySignedStruct, SignatureScheme};

/// TLS settings with the connector made from them.
#[derive(Debug, Clone)]
pub struct Tls {
    pub settings: TlsSettings,
    /// Made by [`Tls::load`], once: the files are read when the settings are taken up.
    connector: Option<Connector>,
}

impl Tls {
    /// No TLS: regobox's own server, reached over its Unix socket or loopback.
    pub fn disabled() -> Tls {
        Tls {
            settings: TlsSettings::disabled(),
            connector: None,
        }
    }

    pub fn mode(&self) -> SslMode {
        self.settings.mode
    }

    pub fn libpq_env(&self) -> Vec<(String, String)> {
        self.settings.libpq_env()
    }

    /// Read the certificate files and make the connector (none for `disable`). A missing or
    /// unreadable file is reported now, as what it is, before any connection is tried.
    pub fn load(settings: TlsSettings) -> Result<Tls, TlsFailure> {
        let connector = match settings.mode {
            SslMode::Disable => None,
            _ => Some(make_connector(&settings)?),
        };
        Ok(Tls {
            settings,
            connector,
        })
    }

    /// The connector made by [`Tls::load`].
    pub fn connector(&self) -> Option<&Connector> {
        self.connector.as_ref()
    }
}

fn make_connector(settings: &TlsSettings) -> Result<Connector, TlsFailure> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsFailure(format!("TLS set-up: {e}")))?;
    let verifier: Arc<dyn ServerCertVerifier> = if settings.verifies_issuer() {
        let root = settings.root_cert.as_deref().ok_or_else(|| {
                TlsFailure(format!(
                    "sslmode={} needs sslrootcert in postgres.url: the CA certificates the server's certificate must chain to (a PEM file, or `system` for {SYSTEM_ROOTS})",
                    settings.mode.as_str()
                ))
            })?;
        let mut roots = rustls::RootCertStore::empty();
        for cert in read_certs(root, "sslrootcert")? {
            roots.add(cert).map_err(|e| {
                TlsFailure(format!(
                    "sslrootcert {}: an unusable CA certificate: {e}",
                    root.display()
                ))
            })?;
        }
        let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
            .map_err(|e| TlsFailure(format!("sslrootcert {}: {e}", root.display())))?;
        Arc::new(Verifier {
            webpki: Some(webpki),
            check_name: settings.mode == SslMode::VerifyFull,
            provider: rustls::crypto::ring::default_provider(),
        })
    } else {
        Arc::new(Verifier {
            webpki: None,
            check_name: false,
            provider: rustls::crypto::ring::default_provider(),
        })
    };
    let builder = builder
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let config = match &settings.client {
        Some((cert, key)) => {
            let chain = read_certs(cert, "sslcert")?;
            let key = PrivateKeyDer::from_pem_file(key).map_err(|e| {
                TlsFailure(format!(
                    "sslkey {}: not a readable PEM private key: {e}",
                    key.display()
                ))
            })?;
            builder.with_client_auth_cert(chain, key).map_err(|e| {
                TlsFailure(format!(
                    "sslcert {} and sslkey do not make a client certificate: {e}",
                    cert.display()
                ))
            })?
        }
        None => builder.with_no_client_auth(),
    };
    Ok(Connector {
        config: Arc::new(config),
        mode: settings.mode,
        root: settings.root_cert.clone(),
    })
}

fn read_certs(path: &Path, key: &str) -> Result<Vec<CertificateDer<'static>>, TlsFailure> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| TlsFailure(format!("{key} {}: cannot read it: {e}", path.display())))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsFailure(format!("{key} {}: not a PEM file: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(TlsFailure(format!(
            "{key} {}: holds no certificate",
            path.display()
        )));
    }
    Ok(certs)
}

/// A TLS failure: its own type (not an `io::Error`), so that a refused handshake is known for
/// one that waiting will not cure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFailure(pub String);

impl fmt::Display for TlsFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for TlsFailure {}

/// Checks the server's certificate as the mode asks: the issuer against the roots (`webpki`),
/// the name only with `check_name`; with neither, the handshake is still checked (the server
/// proves it holds the key of the certificate it sent), the certificate is not.
#[derive(Debug)]
struct Verifier {
    webpki: Option<Arc<WebPkiServerVerifier>>,
    check_name: bool,
    provider: rustls::crypto::CryptoProvider,
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(webpki) = &self.webpki else {
            return Ok(ServerCertVerified::assertion());
        };
        // webpki checks the chain first, then the name: a name error means the chain held.
        match webpki.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) if !self.check_name => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// tokio-postgres's TLS: one per connection attempt.
#[derive(Clone)]
pub struct Connector {
    config: Arc<rustls::ClientConfig>,
    mode: SslMode,
    root: Option<PathBuf>,
}

impl fmt::Debug for Connector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connector")
            .field("mode", &self.mode)
            .field("root", &self.root)
            .finish_non_exhaustive()
    }
}

impl MakeTlsConnect<Socket> for Connector {
    type Stream = Stream;
    type TlsConnect = Handshake;
    type Error = TlsFailure;

    fn make_tls_connect(&mut self, domain: &str) -> Result<Handshake, TlsFailure> {
        // A Unix socket has no name; tokio-postgres never starts TLS on one without a host.
        let name = ServerName::try_from(domain.to_string()).ok();
        Ok(Handshake {
            connector: self.clone(),
            name,
            host: domain.to_string(),
        })
    }
}

pub struct Handshake {
    connector: Connector,
    name: Option<ServerName<'static>>,
    host: String,
}

impl TlsConnect<Socket> for Handshake {
    type Stream = Stream;
    type Error = TlsFailure;
    type Future = Pin<Box<dyn Future<Output = Result<Stream, TlsFailure>> + Send>>;

    fn connect(self, socket: Socket) -> Self::Future {
        Box::pin(async move {
            let Some(name) = self.name else {
                return Err(TlsFailure(format!(
                    "`{}` is not a host name or address to check a certificate against",
                    self.host
                )));
            };
            let connector = tokio_rustls::TlsConnector::from(self.connector.config.clone());
            match connector.connect(name, socket).await {
                Ok(stream) => Ok(Stream(Box::new(stream))),
                Err(e) => Err(explain(&e, &self.host, &self.connector)),
            }
        })
    }
}

/// Say what a failed handshake means for the user, naming the setting involved.
fn explain(e: &io::Error, host: &str, connector: &Connector) -> TlsFailure {
    let rustls_error = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>());
    let root = connector
        .root
        .as_deref()
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    let text = match rustls_error {
        Some(rustls::Error::InvalidCertificate(
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
        )) => format!(
            "the server's certificate does not name `{host}` (sslmode=verify-full checks the host name of postgres.url against it): {e}"
        ),
        Some(rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer)) => format!(
            "the server's certificate was not issued by a CA in sslrootcert {root} (sslmode={}): {e}",
            connector.mode.as_str()
        ),
        Some(rustls::Error::InvalidCertificate(c)) => {
            format!("the server's certificate is refused: {c:?}")
        }
        _ => format!("the TLS handshake with `{host}` failed: {e}"),
    };
    TlsFailure(text)
}

/// A TLS connection to the server.
pub struct Stream(Box<tokio_rustls::client::TlsStream<Socket>>);

impl tokio_postgres::tls::TlsStream for Stream {
    /// `tls-server-end-point` (RFC 5929): the server certificate's hash, with the hash of its
    /// signature (SHA-256 for SHA-1 and MD5), for SCRAM-SHA-256-PLUS.
    fn channel_binding(&self) -> ChannelBinding {
        let Some(cert) = self
            .0
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
        else {
            return ChannelBinding::none();
        };
        let Ok((_, parsed)) = x509_parser::parse_x509_certificate(cert) else {
            return ChannelBinding::none();
        };
        let oid = parsed.signature_algorithm.algorithm.to_id_string();
        let hash = match oid.as_str() {
            // sha384WithRSAEncryption, ecdsa-with-SHA384
            "1.2.840.113549.1.1.12" | "1.2.840.10045.4.3.3" => sha2::Sha384::digest(cert).to_vec(),
            // sha512WithRSAEncryption, ecdsa-with-SHA512
            "1.2.840.113549.1.1.13" | "1.2.840.10045.4.3.4" => sha2::Sha512::digest(cert).to_vec(),
            // Ed25519 and Ed448 have no defined binding.
            "1.3.101.112" | "1.3.101.113" => return ChannelBinding::none(),
            _ => sha2::Sha256::digest(cert).to_vec(),
        };
        ChannelBinding::tls_server_end_point(hash)
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_shutdown(cx)
    }
}

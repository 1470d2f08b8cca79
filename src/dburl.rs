//! `postgres.url`, read: the connection settings tokio-postgres knows, and the TLS settings
//! libpq has and tokio-postgres does not (`sslmode=verify-ca|verify-full`, `sslrootcert`,
//! `sslcert`, `sslkey`). Pure: configuration validates with it, `postgres::tls` acts on it.

use std::path::PathBuf;

/// The CA bundle `sslrootcert=system` stands for (Debian's, as in the image).
pub const SYSTEM_ROOTS: &str = "/etc/ssl/certs/ca-certificates.crt";

/// libpq's `sslmode`, the values regobox supports (`allow` is refused: it tries plain first).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    fn parse(value: &str) -> Result<SslMode, String> {
        Ok(match value {
            "disable" => SslMode::Disable,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            "allow" => {
                return Err(
                    "sslmode=allow is not supported (it tries a plain connection first): use prefer, require, verify-ca or verify-full".into(),
                );
            }
            other => {
                return Err(format!(
                    "sslmode={other:?} is not one of disable, prefer, require, verify-ca, verify-full"
                ));
            }
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }
}

/// How a client protects its connection to the server, as libpq's parameters say it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSettings {
    pub mode: SslMode,
    /// The CA certificates the server's certificate must chain to (`sslrootcert`).
    pub root_cert: Option<PathBuf>,
    /// The client certificate and key (`sslcert`, `sslkey`).
    pub client: Option<(PathBuf, PathBuf)>,
}

impl TlsSettings {
    /// No TLS.
    pub fn disabled() -> TlsSettings {
        TlsSettings {
            mode: SslMode::Disable,
            root_cert: None,
            client: None,
        }
    }

    /// libpq's variables for these settings.
    pub fn libpq_env(&self) -> Vec<(String, String)> {
        let mut env = vec![("PGSSLMODE".to_string(), self.mode.as_str().to_string())];
        if let Some(root) = &self.root_cert {
            env.push(("PGSSLROOTCERT".into(), root.display().to_string()));
        }
        if let Some((cert, key)) = &self.client {
            env.push(("PGSSLCERT".into(), cert.display().to_string()));
            env.push(("PGSSLKEY".into(), key.display().to_string()));
        }
        env
    }

    /// Whether the issuer of the server's certificate is checked.
    pub fn verifies_issuer(&self) -> bool {
        match self.mode {
            SslMode::VerifyCa | SslMode::VerifyFull => true,
            // libpq: `require` with a root certificate file checks like `verify-ca`.
            SslMode::Require => self.root_cert.is_some(),
            SslMode::Disable | SslMode::Prefer => false,
        }
    }
}

/// A connection string split into what tokio-postgres reads and what regobox does.
#[derive(Debug, Clone)]
pub struct Target {
    pub config: tokio_postgres::Config,
    pub tls: TlsSettings,
}

impl Target {
    /// Read a `postgres://` or `postgresql://` URL. The TLS parameters are taken out of its
    /// query; the rest goes to tokio-postgres, which refuses what it does not know.
    pub fn parse(url: &str) -> Result<Target, String> {
        let (base, query) = match url.split_once('?') {
            Some((b, q)) => (b, q),
            None => (url, ""),
        };
        let mut mode = None;
        let mut root_cert = None;
        let mut cert = None;
        let mut key = None;
        let mut rest = form_urlencoded::Serializer::new(String::new());
        let mut kept = false;
        for (k, v) in form_urlencoded::parse(query.as_bytes()) {
            let once = |given: bool| {
                if given {
                    Err(format!("`{k}` is given twice"))
                } else {
                    Ok(())
                }
            };
            match &*k {
                "sslmode" => {
                    once(mode.is_some())?;
                    mode = Some(SslMode::parse(&v)?);
                }
                "sslrootcert" => {
                    once(root_cert.is_some())?;
                    root_cert = Some(if v == "system" {
                        PathBuf::from(SYSTEM_ROOTS)
                    } else {
                        PathBuf::from(&*v)
                    });
                }
                "sslcert" => {
                    once(cert.is_some())?;
                    cert = Some(PathBuf::from(&*v));
                }
                "sslkey" => {
                    once(key.is_some())?;
                    key = Some(PathBuf::from(&*v));
                }
                _ => {
                    rest.append_pair(&k, &v);
                    kept = true;
                }
            }
        }
        for path in [&root_cert, &cert, &key].into_iter().flatten() {
            if !path.is_absolute() {
                return Err(format!(
                    "{} is a relative path: TLS files are named by absolute paths",
                    path.display()
                ));
            }
        }
        let client = match (cert, key) {
            (Some(c), Some(k)) => Some((c, k)),
            (None, None) => None,
            _ => return Err("sslcert and sslkey go together: give both or neither".into()),
        };
        let mode = mode.unwrap_or(SslMode::Prefer);
        let tls = TlsSettings {
            mode,
            root_cert,
            client,
        };
        if matches!(mode, SslMode::VerifyCa | SslMode::VerifyFull) && tls.root_cert.is_none() {
            return Err(format!(
                "sslmode={} needs sslrootcert: the CA certificates the server's certificate must chain to (a PEM file, or `system` for {SYSTEM_ROOTS})",
                mode.as_str()
            ));
        }
        let mut stripped = base.to_string();
        if kept {
            stripped.push('?');
            stripped.push_str(&rest.finish());
        }
        let mut config: tokio_postgres::Config = stripped.parse().map_err(|e| {
            let cause = std::error::Error::source(&e)
                .map(|s| format!(": {s}"))
                .unwrap_or_default();
            format!("{e}{cause}")
        })?;
        config.ssl_mode(match mode {
            SslMode::Disable => tokio_postgres::config::SslMode::Disable,
            SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
            _ => tokio_postgres::config::SslMode::Require,
        });
        Ok(Target { config, tls })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn tls_parameters_are_taken_out_of_the_url() {
        let t = Target::parse(
            "postgresql://u:p@db.example:5433/app?sslmode=verify-full&sslrootcert=/c/ca.pem&application_name=x",
        )
        .unwrap();
        assert_eq!(t.tls.mode, SslMode::VerifyFull);
        assert_eq!(t.tls.root_cert.as_deref(), Some(Path::new("/c/ca.pem")));
        assert_eq!(t.config.get_application_name(), Some("x"));
        assert_eq!(
            t.config.get_ssl_mode(),
            tokio_postgres::config::SslMode::Require
        );
        let t = Target::parse("postgres://u@h/d").unwrap();
        assert_eq!(t.tls.mode, SslMode::Prefer, "libpq's default");
        let t = Target::parse("postgres://u@h/d?sslmode=require&sslrootcert=system").unwrap();
        assert_eq!(t.tls.root_cert.as_deref(), Some(Path::new(SYSTEM_ROOTS)));
        assert!(
            t.tls.verifies_issuer(),
            "require with a root checks like verify-ca"
        );
        let env = t.tls.libpq_env();
        assert!(env.contains(&("PGSSLMODE".into(), "require".into())));
        assert!(env.contains(&("PGSSLROOTCERT".into(), SYSTEM_ROOTS.into())));
    }

    #[test]
    fn unsupported_or_incomplete_tls_settings_are_refused() {
        for (url, says) in [
            ("postgres://h/d?sslmode=allow", "allow"),
            ("postgres://h/d?sslmode=verify", "verify"),
            ("postgres://h/d?sslmode=verify-full", "needs sslrootcert"),
            ("postgres://h/d?sslmode=verify-ca", "needs sslrootcert"),
            ("postgres://h/d?sslcert=/a.pem", "go together"),
            ("postgres://h/d?sslrootcert=ca.pem", "relative"),
            ("postgres://h/d?sslmode=require&sslmode=disable", "twice"),
            ("postgres://h/d?sslcrl=/x", "sslcrl"),
        ] {
            let err = Target::parse(url).unwrap_err();
            assert!(err.contains(says), "{url}: {err}");
        }
    }
}

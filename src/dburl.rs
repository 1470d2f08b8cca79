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
    /// The URL the application gets (`DATABASE_URL`): regobox's own writing of what it read,
    /// with every TLS setting explicit (`sslrootcert=system` as the file it stands for, which
    /// libpq before 16 would take for a file named `system`).
    pub client_url: String,
}

/// The query parameters `postgres.url` may have besides the TLS ones: what libpq and
/// tokio-postgres read alike. Where the server is and who logs in are said once, in the URL's
/// authority and path, so that regobox and every client reach the same server as the same role.
const ALLOWED: &[&str] = &[
    "application_name",
    "connect_timeout",
    "options",
    "keepalives",
    "keepalives_idle",
    "target_session_attrs",
    "channel_binding",
    "sslnegotiation",
    "tcp_user_timeout",
];

impl Target {
    /// Read a `postgres://` or `postgresql://` URL: the TLS parameters regobox acts on, the
    /// rest from an allow-list, each at most once.
    pub fn parse(url: &str) -> Result<Target, String> {
        let (base, query) = match url.split_once('?') {
            Some((b, q)) => (b, q),
            None => (url, ""),
        };
        let mut mode = None;
        let mut root_cert = None;
        let mut cert = None;
        let mut key = None;
        let mut seen: Vec<String> = Vec::new();
        let mut kept: Vec<(String, String)> = Vec::new();
        for (k, v) in form_urlencoded::parse(query.as_bytes()) {
            if seen.iter().any(|s| *s == k) {
                return Err(format!("`{k}` is given twice"));
            }
            seen.push(k.to_string());
            match &*k {
                "sslmode" => mode = Some(SslMode::parse(&v)?),
                "sslrootcert" => {
                    root_cert = Some(if v == "system" {
                        PathBuf::from(SYSTEM_ROOTS)
                    } else {
                        PathBuf::from(&*v)
                    })
                }
                "sslcert" => cert = Some(PathBuf::from(&*v)),
                "sslkey" => key = Some(PathBuf::from(&*v)),
                "host" | "hostaddr" | "port" | "user" | "password" | "dbname" => {
                    return Err(format!(
                        "`{k}` in the query is not taken: the server, user, password and database go in the URL itself (postgresql://user:password@host:port/database)"
                    ));
                }
                other if ALLOWED.contains(&other) => kept.push((k.to_string(), v.to_string())),
                other => {
                    return Err(format!(
                        "`{other}` is not a parameter regobox takes in postgres.url (it takes sslmode, sslrootcert, sslcert, sslkey, {})",
                        ALLOWED.join(", ")
                    ));
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
        match mode {
            SslMode::VerifyCa | SslMode::VerifyFull if tls.root_cert.is_none() => {
                return Err(format!(
                    "sslmode={} needs sslrootcert: the CA certificates the server's certificate must chain to (a PEM file, or `system` for {SYSTEM_ROOTS})",
                    mode.as_str()
                ));
            }
            // libpq would check with them and then try without TLS: say what is meant.
            SslMode::Disable | SslMode::Prefer
                if tls.root_cert.is_some() || tls.client.is_some() =>
            {
                return Err(format!(
                    "sslrootcert, sslcert and sslkey need sslmode=require, verify-ca or verify-full (here {})",
                    mode.as_str()
                ));
            }
            _ => {}
        }
        let mut tokio_query = form_urlencoded::Serializer::new(String::new());
        for (k, v) in &kept {
            tokio_query.append_pair(k, v);
        }
        let tokio_query = tokio_query.finish();
        let for_tokio = if tokio_query.is_empty() {
            base.to_string()
        } else {
            format!("{base}?{tokio_query}")
        };
        let mut config: tokio_postgres::Config = for_tokio.parse().map_err(|e| {
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
        let mut client_query = form_urlencoded::Serializer::new(String::new());
        for (k, v) in &kept {
            client_query.append_pair(k, v);
        }
        for (k, v) in tls.libpq_env() {
            let name = match k.as_str() {
                "PGSSLMODE" => "sslmode",
                "PGSSLROOTCERT" => "sslrootcert",
                "PGSSLCERT" => "sslcert",
                _ => "sslkey",
            };
            client_query.append_pair(name, &v);
        }
        let client_url = format!("{base}?{}", client_query.finish());
        Ok(Target {
            config,
            tls,
            client_url,
        })
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
        assert_eq!(
            t.client_url,
            format!(
                "postgres://u@h/d?sslmode=require&sslrootcert={}",
                SYSTEM_ROOTS.replace('/', "%2F")
            ),
            "what the application gets names the file"
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
            ("postgres://h/d?host=other", "in the URL itself"),
            ("postgres://h/d?password=x", "in the URL itself"),
            (
                "postgres://h/d?application_name=a&application_name=b",
                "twice",
            ),
            ("postgres://h/d?sslrootcert=/ca.pem", "need sslmode=require"),
            (
                "postgres://h/d?sslmode=prefer&sslcert=/c&sslkey=/k",
                "need sslmode=require",
            ),
        ] {
            let err = Target::parse(url).unwrap_err();
            assert!(err.contains(says), "{url}: {err}");
        }
    }
}

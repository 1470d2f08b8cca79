//! Idempotent bootstrap of a ready server: the application's role (with its password), its
//! database, the configured extensions, and the init scripts, each run once.
//!
//! Init scripts are the `initdb.d/*.sql` files of the configuration directories, in file-name
//! order. Each runs in one transaction as the application role, together with the row that
//! records it in `regobox.init_scripts`, so a script is applied exactly once even if regobox
//! dies half-way. A script changed after it was applied is reported, not run again.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use tokio_postgres::Client;

use super::PostgresError;
use super::binaries::Major;

/// What regobox gives PostgreSQL as `role`'s password: the verifier of `password`, computed
/// here (SCRAM-SHA-256; MD5 below PostgreSQL 10), never the text itself. PostgreSQL takes a
/// text that looks like a verifier (`md5` and 32 hex digits, `SCRAM-SHA-256$...`) as one: a
/// secret of that shape (an archive's, an operator's) would set a password no one knows.
pub fn password_verifier(major: Major, role: &str, password: &str) -> String {
    if major.0 >= 10 {
        postgres_protocol::password::scram_sha_256(password.as_bytes())
    } else {
        postgres_protocol::password::md5(password.as_bytes(), role)
    }
}

/// The SQL identifier `name`, quoted.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// The SQL string literal `value`, quoted whatever `standard_conforming_strings` is.
pub fn quote_literal(value: &str) -> String {
    let doubled = value.replace('\'', "''");
    if doubled.contains('\\') {
        format!("E'{}'", doubled.replace('\\', "\\\\"))
    } else {
        format!("'{doubled}'")
    }
}

fn db_err(what: impl Into<String>) -> impl FnOnce(tokio_postgres::Error) -> PostgresError {
    let what = what.into();
    move |source| PostgresError::Sql { what, source }
}

/// What may be done with the application role's password.
pub enum RolePassword<'a> {
    /// Set it: a role created for a new cluster, or `regobox password`.
    Set(&'a str),
    /// The role's password is `value` (from the configuration when `from_config`, else from
    /// the secret file `secret`). It is set where the role has none; where the role has one
    /// that `value` does not open (a login through `login` is refused), it is changed only if
    /// the configuration asks, else that is an error naming `regobox password`.
    Expect {
        value: &'a str,
        from_config: bool,
        secret: &'a Path,
        login: &'a tokio_postgres::Config,
    },
}

/// Create the application role (or check its password, see [`RolePassword`]) and database, as
/// the superuser connected to the `postgres` database.
pub async fn role_and_database(
    su: &Client,
    major: Major,
    user: &str,
    password: RolePassword<'_>,
    database: &str,
) -> Result<(), PostgresError> {
    let encryption = if major.0 >= 10 {
        "scram-sha-256"
    } else {
        "md5"
    };
    su.batch_execute(&format!("SET password_encryption = '{encryption}'"))
        .await
        .map_err(db_err("setting password_encryption"))?;
    let has_password: Option<bool> = su
        .query_opt(
            "SELECT rolpassword IS NOT NULL FROM pg_catalog.pg_authid WHERE rolname = $1",
            &[&user],
        )
        .await
        .map_err(db_err("looking up the application role"))?
        .map(|r| r.get(0));
    let set = |verb: &'static str, value: String| async move {
        su.batch_execute(&format!(
            "{verb} ROLE {} WITH LOGIN PASSWORD {}",
            quote_ident(user),
            quote_literal(&password_verifier(major, user, &value))
        ))
        .await
        .map_err(db_err(format!("setting up role `{user}` (postgres.user)")))
    };
    let missing = |secret: &Path| PostgresError::PasswordMissing {
        role: user.into(),
        secret: secret.to_path_buf(),
    };
    match (has_password, password) {
        (None, RolePassword::Set(value)) => {
            set("CREATE", value.into()).await?;
            tracing::info!(role = user, "application role created");
        }
        (None, RolePassword::Expect { value, secret, .. }) => {
            if value.is_empty() {
                // An adopted cluster without the role: its password was not generated with
                // the cluster, which regobox did not make.
                return Err(PostgresError::RoleWithoutPassword {
                    role: user.into(),
                    secret: secret.to_path_buf(),
                });
            }
            set("CREATE", value.into()).await?;
            tracing::info!(role = user, "application role created");
        }
        (Some(_), RolePassword::Set(value)) => {
            set("ALTER", value.into()).await?;
            tracing::warn!(role = user, "application role's password set");
        }
        (Some(false), RolePassword::Expect { value, secret, .. }) => {
            if value.is_empty() {
                return Err(missing(secret));
            }
            set("ALTER", value.into()).await?;
            tracing::warn!(role = user, from = %secret.display(), "the application role had no password; set");
        }
        (
            Some(true),
            RolePassword::Expect {
                value,
                from_config,
                secret,
                login,
            },
        ) => {
            if value.is_empty() {
                return Err(missing(secret));
            }
            if !opens(login, value).await? {
                if !from_config {
                    return Err(PostgresError::PasswordMismatch {
                        role: user.into(),
                        secret: secret.to_path_buf(),
                    });
                }
                set("ALTER", value.into()).await?;
                tracing::warn!(
                    role = user,
                    "postgres.password changed in the configuration: applied to the role"
                );
            }
        }
    }
    let owner: Option<String> = su
        .query_opt(
            "SELECT pg_get_userbyid(datdba)::text FROM pg_database WHERE datname = $1",
            &[&database],
        )
        .await
        .map_err(db_err("looking up the application database"))?
        .map(|row| row.get(0));
    match owner {
        None => {
            su.batch_execute(&format!(
                "CREATE DATABASE {} OWNER {} ENCODING 'UTF8' TEMPLATE template0",
                quote_ident(database),
                quote_ident(user)
            ))
            .await
            .map_err(db_err(format!(
                "creating database `{database}` (postgres.database)"
            )))?;
            tracing::info!(database, owner = user, "application database created");
        }
        Some(o) if o != user => {
            su.batch_execute(&format!(
                "ALTER DATABASE {} OWNER TO {}",
                quote_ident(database),
                quote_ident(user)
            ))
            .await
            .map_err(db_err(format!("giving database `{database}` to `{user}`")))?;
            tracing::info!(database, from = %o, to = user, "application database owner changed");
        }
        Some(_) => {}
    }
    // Its owner may close it to connections (regobox's included) or make it a template: put
    // back, logged, so that regobox can start and back it up.
    let row = su
        .query_one(
            "SELECT datallowconn, datconnlimit, datistemplate FROM pg_catalog.pg_database WHERE datname OPERATOR(pg_catalog.=) $1",
            &[&database],
        )
        .await
        .map_err(db_err("reading the application database's flags"))?;
    let (allow, limit, template): (bool, i32, bool) = (row.get(0), row.get(1), row.get(2));
    if (allow, limit, template) != (true, -1, false) {
        su.batch_execute(&format!(
            "ALTER DATABASE {} WITH ALLOW_CONNECTIONS true CONNECTION LIMIT -1 IS_TEMPLATE false",
            quote_ident(database)
        ))
        .await
        .map_err(db_err(format!("reopening database `{database}`")))?;
        tracing::warn!(
            database,
            allow_connections = allow,
            connection_limit = limit,
            is_template = template,
            "repaired the application database's flags (it must accept connections)"
        );
    }
    Ok(())
}

/// Whether `password` logs in through `login` (a refusal of the password is `false`; any
/// other failure is an error).
async fn opens(login: &tokio_postgres::Config, password: &str) -> Result<bool, PostgresError> {
    let mut c = login.clone();
    c.password(password).dbname("postgres");
    // regobox's own server, over its Unix socket: no TLS.
    match super::connect(&c, &super::Tls::disabled()).await {
        Ok(_) => Ok(true),
        Err(e)
            if e.as_db_error().is_some_and(|d| {
                *d.code() == tokio_postgres::error::SqlState::INVALID_PASSWORD
                    || *d.code()
                        == tokio_postgres::error::SqlState::INVALID_AUTHORIZATION_SPECIFICATION
            }) =>
        {
            Ok(false)
        }
        Err(source) => Err(PostgresError::Sql {
            what: "checking the application role's password".into(),
            source,
        }),
    }
}

/// Create the configured extensions in the database `client` is connected to (in `public`).
pub async fn extensions(client: &Client, names: &[String]) -> Result<(), PostgresError> {
    for name in names {
        extension(client, name, "public").await?;
    }
    Ok(())
}

/// Create the extension `name` in `schema` if it does not exist.
pub async fn extension(client: &Client, name: &str, schema: &str) -> Result<(), PostgresError> {
    client
        .batch_execute(&format!(
            "CREATE EXTENSION IF NOT EXISTS {} WITH SCHEMA {}",
            quote_ident(name),
            quote_ident(schema)
        ))
        .await
        .map_err(|source| PostgresError::Sql {
            what: format!(
                "creating extension `{name}` (postgres.extensions; is the package that provides it installed, e.g. postgresql-contrib?)"
            ),
            source,
        })
}

/// The init scripts of the configuration directories, in file-name order; for the same name in
/// two directories, the later directory's file wins.
pub fn init_scripts(config_dirs: &[PathBuf]) -> Vec<PathBuf> {
    let mut by_name: std::collections::BTreeMap<String, PathBuf> = Default::default();
    for dir in config_dirs {
        let Ok(entries) = std::fs::read_dir(dir.join("initdb.d")) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "sql") && path.is_file() {
                by_name.insert(entry.file_name().to_string_lossy().into_owned(), path);
            }
        }
    }
    by_name.into_values().collect()
}

/// regobox's bookkeeping in the application database: the schema `regobox` and its table of
/// the init scripts applied. `role`: the client is the superuser (regobox runs the server); the
/// schema and table must then be the superuser's (an application that made them first is
/// refused, never written through), and `role` may read the table and add its records (the
/// scripts run as that role). Without `role` (an external server), they are the application's.
pub async fn bookkeeping(client: &Client, role: Option<&str>) -> Result<(), PostgresError> {
    client
        .batch_execute(
            "CREATE SCHEMA IF NOT EXISTS regobox;
             CREATE TABLE IF NOT EXISTS regobox.init_scripts (
                 name text PRIMARY KEY,
                 sha256 text NOT NULL,
                 applied_at timestamptz NOT NULL DEFAULT now()
             );",
        )
        .await
        .map_err(db_err("creating regobox.init_scripts"))?;
    if let Some(role) = role {
        let foreign: Option<String> = client
            .query_opt(
                "SELECT coalesce(
                   (SELECT 'the schema regobox belongs to ' || pg_catalog.pg_get_userbyid(nspowner)
                      FROM pg_catalog.pg_namespace WHERE nspname = 'regobox' AND nspowner <> (SELECT oid FROM pg_catalog.pg_roles WHERE rolname = current_user)),
                   (SELECT 'the table regobox.init_scripts belongs to ' || pg_catalog.pg_get_userbyid(relowner)
                      FROM pg_catalog.pg_class WHERE oid = 'regobox.init_scripts'::pg_catalog.regclass AND relowner <> (SELECT oid FROM pg_catalog.pg_roles WHERE rolname = current_user)),
                   (SELECT 'regobox.init_scripts has a trigger or a rule'
                      WHERE EXISTS (SELECT 1 FROM pg_catalog.pg_trigger WHERE tgrelid = 'regobox.init_scripts'::pg_catalog.regclass AND NOT tgisinternal)
                         OR EXISTS (SELECT 1 FROM pg_catalog.pg_rewrite WHERE ev_class = 'regobox.init_scripts'::pg_catalog.regclass)))",
                &[],
            )
            .await
            .map_err(db_err("checking the schema regobox"))?
            .and_then(|r| r.get(0));
        if let Some(what) = foreign {
            return Err(PostgresError::ForeignBookkeeping { what });
        }
        // The application may read which scripts ran and record the ones it runs.
        client
            .batch_execute(&format!(
                "GRANT USAGE ON SCHEMA regobox TO {r}; GRANT SELECT, INSERT ON regobox.init_scripts TO {r};",
                r = quote_ident(role)
            ))
            .await
            .map_err(db_err("granting access to regobox.init_scripts"))?;
    }
    Ok(())
}

/// Run every script not yet recorded, each in one transaction with its record, in the
/// application role's own session (`client`); the name recorded is the file name. The caller
/// made the bookkeeping ([`bookkeeping`]).
pub async fn run_init_scripts(
    client: &mut Client,
    scripts: &[PathBuf],
) -> Result<usize, PostgresError> {
    if scripts.is_empty() {
        return Ok(0);
    }
    let mut applied = 0;
    for path in scripts {
        let name = file_name(path);
        let sql = std::fs::read_to_string(path).map_err(|source| PostgresError::Io {
            path: path.clone(),
            source,
        })?;
        let digest = format!("{:x}", Sha256::digest(sql.as_bytes()));
        let recorded: Option<String> = client
            .query_opt(
                "SELECT sha256 FROM regobox.init_scripts WHERE name OPERATOR(pg_catalog.=) $1",
                &[&name],
            )
            .await
            .map_err(db_err("reading regobox.init_scripts"))?
            .map(|r| r.get(0));
        match recorded {
            Some(d) if d == digest => continue,
            Some(_) => {
                tracing::warn!(script = %path.display(), "init script changed since it was applied; it is not run again");
                continue;
            }
            None => {}
        }
        let tx = client
            .transaction()
            .await
            .map_err(db_err("starting a transaction"))?;
        let failed = |source| PostgresError::InitScript {
            path: path.clone(),
            source,
        };
        tx.batch_execute(&sql).await.map_err(failed)?;
        tx.execute(
            "INSERT INTO regobox.init_scripts (name, sha256) VALUES ($1, $2)",
            &[&name, &digest],
        )
        .await
        .map_err(failed)?;
        tx.commit().await.map_err(failed)?;
        tracing::info!(script = %path.display(), "init script applied");
        applied += 1;
    }
    Ok(applied)
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting() {
        assert_eq!(quote_ident("app"), "\"app\"");
        assert_eq!(quote_ident("we\"ird"), "\"we\"\"ird\"");
        assert_eq!(quote_literal("it's"), "'it''s'");
        assert_eq!(quote_literal("a\\b'c"), "E'a\\\\b''c'");
    }

    #[test]
    fn scripts_are_ordered_by_name_and_later_directories_win() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        for (dir, name) in [
            (&a, "20_b.sql"),
            (&a, "10_a.sql"),
            (&b, "10_a.sql"),
            (&b, "readme.txt"),
        ] {
            std::fs::create_dir_all(dir.path().join("initdb.d")).unwrap();
            std::fs::write(dir.path().join("initdb.d").join(name), "select 1").unwrap();
        }
        let scripts = init_scripts(&[a.path().into(), b.path().into()]);
        assert_eq!(
            scripts,
            vec![
                b.path().join("initdb.d/10_a.sql"),
                a.path().join("initdb.d/20_b.sql")
            ]
        );
    }
}

//! regobox: the PID 1 of an all-in-one server image.
//!
//! One binary brings up, inside one container, everything an application such as Regovar needs:
//! a PostgreSQL server on a volume shared with the host, the supervision of the application's
//! processes, a TLS reverse proxy on 80/443, a policy-enforcing Docker socket and verifiable
//! backups.
//!
//! A map of the modules, in the order data flows through them at start-up:
//!
//! - [`cli`]: the command line (clap). Parses arguments, loads the configuration and hands it to
//!   a command; turns the outcome into an exit code and nothing else.
//! - [`dburl`]: `postgres.url` read into tokio-postgres's settings and libpq's TLS settings
//!   (pure; configuration validates with it).
//! - [`config`]: the layered configuration (figment): compiled defaults, then every `*.toml` file
//!   of the configuration directories in file-name order, then `REGOBOX_*` environment variables.
//!   Validates everything at once and remembers where each key came from.
//! - [`volumes`]: the layout of the data volume (database, secrets, logs, files, backups) and the
//!   creation of its directories.
//! - [`secrets`]: values generated once on first boot and kept in 0600 files on the volume.
//! - [`users`]: the unprivileged OS accounts children run as, and dropping privileges in a child.
//! - [`process`]: every child process regobox starts, and the one reaper (`waitpid(-1)`).
//! - [`postgres`]: the embedded PostgreSQL server: finding binaries, classifying and initialising
//!   the data directory, running the server in the foreground, readiness and bootstrap.
//! - [`logs`]: forwarding a child's output to regobox's stdout (text or JSON) and to rotated
//!   files, line by line.
//! - [`supervisor`]: `regobox run`/`start`: PostgreSQL, then the services in dependency order
//!   with readiness, restarts and budgets; stopped in reverse order on a signal.
//! - [`cron`]: the in-process scheduler of `[cron.*]` jobs.
//! - [`health`]: the supervision port (`/healthz`, `/readyz`, `/status`, `/metrics`).
//! - [`outq`]: what a socket's peer has not taken yet of what was written to it (the proxy's and
//!   the Docker socket's write deadlines).
//! - [`unread`]: request bodies an answer left unread, read to their end in the background and
//!   thrown away, so that a client still sending gets the answer (the proxy and the Docker socket).
//! - [`proxy`]: TLS on 80/443 (rustls; files, self-signed or ACME certificates) and the reverse
//!   proxy to the application (hyper), started first and stopped first.
//! - [`docker`]: the host's Docker engine for the application, through a socket of regobox's
//!   that enforces a policy (endpoints, container create fields, bind roots and translation,
//!   ownership by label, audit).
//! - [`backup`]: one verifiable archive of the database and the volumes; restore with a journal.
//! - [`exit`]: the named exit codes.

pub mod backup;
pub mod cli;
pub mod config;
pub mod cron;
pub mod dburl;
pub mod docker;
pub mod exit;
pub mod health;
pub mod logs;
pub(crate) mod outq;
pub mod postgres;
pub mod process;
pub mod proxy;
pub mod secrets;
pub mod supervisor;
pub(crate) mod unread;
pub mod users;
pub mod volumes;

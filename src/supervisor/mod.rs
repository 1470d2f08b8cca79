//! The supervisor: brings up PostgreSQL, then the services in dependency order and the cron
//! scheduler, keeps them up, and stops everything in reverse order.
//!
//! Start: the health port first (so `/healthz` answers during start-up), PostgreSQL (embedded,
//! the running one, or external) until a real connection succeeds and the bootstrap is done, the
//! application environment and templates, then one task per service ([`service::run`]), each
//! starting once its dependencies are ready.
//!
//! Stop: on the first SIGTERM/SIGINT, an essential service failing for good, PostgreSQL dying,
//! or (for `regobox start`) the target service ending. Cron stops first; each service stops once
//! every service depending on it has stopped; PostgreSQL last (fast shutdown). A second signal
//! makes the stop immediate (SIGKILL, PostgreSQL immediate shutdown). Then every process left
//! (orphans re-parented to regobox) gets SIGTERM, and SIGKILL at `supervision.shutdown_timeout`.
//! regobox exits only when no child is left or that deadline passed.

pub mod control;
pub mod environment;
pub mod keeper;
pub mod ready;
pub mod restart;
pub mod service;
pub mod status;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, Loaded, POSTGRES_SERVICE, PostgresMode, start_order};
use crate::exit;
use crate::logs::{LogFile, SharedLogFile, Sink};
use crate::postgres::{self, Embedded, Endpoint, Opened, PostgresError, Server};
use crate::secrets::SecretStore;
use crate::users::Account;
use crate::volumes::Layout;
use service::{Outcome, ServiceCtx};
use status::{Board, Entry, ServiceStatus, State, now_epoch};

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

    /// `fut` to its end, `cancel` cancelled at the first stop request meanwhile (whose name is
    /// returned beside the outcome): `fut` decides what a cancellation undoes.
    pub async fn cancelling<F: std::future::Future>(
        &mut self,
        fut: F,
        cancel: &CancellationToken,
    ) -> (F::Output, Option<&'static str>) {
        tokio::pin!(fut);
        let mut by = None;
        loop {
            tokio::select! {
                r = &mut fut => return (r, by),
                s = self.recv(), if by.is_none() => {
                    by = Some(s);
                    cancel.cancel();
                }
            }
        }
    }
}

/// What to bring up.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Services to run (they are started in dependency order).
    pub services: Vec<String>,
    /// Run the cron scheduler.
    pub cron: bool,
    /// `regobox start`: stop everything when this service ends, with its exit code.
    pub target: Option<String>,
    /// Use the PostgreSQL of a `regobox run` already up on the volume instead of refusing.
    pub reuse_running_postgres: bool,
    /// Serve the TLS proxy on 80/443 (`regobox run` only).
    pub proxy: bool,
    /// May create the cluster on an empty volume (`run`, `start`; never `cron`).
    pub create_cluster: bool,
}

impl Plan {
    /// `regobox run`: every service and the scheduler.
    pub fn everything(config: &Config) -> anyhow::Result<Plan> {
        Ok(Plan {
            services: order(config)?,
            cron: true,
            target: None,
            reuse_running_postgres: false,
            proxy: true,
            create_cluster: true,
        })
    }

    /// `regobox start NAME`: that service and what it depends on, transitively.
    pub fn one(config: &Config, name: &str) -> anyhow::Result<Plan> {
        if !config.services.contains_key(name) {
            let known: Vec<&String> = config.services.keys().collect();
            return Err(crate::config::error(
                crate::config::Origin::CommandLine,
                "",
                format!("no service named `{name}` (configured: {known:?})"),
            )
            .into());
        }
        let mut wanted = std::collections::BTreeSet::new();
        let mut stack = vec![name.to_string()];
        while let Some(n) = stack.pop() {
            if n == POSTGRES_SERVICE || !wanted.insert(n.clone()) {
                continue;
            }
            stack.extend(config.services[&n].depends_on.iter().cloned());
        }
        let services = order(config)?
            .into_iter()
            .filter(|s| wanted.contains(s))
            .collect();
        Ok(Plan {
            services,
            cron: false,
            target: Some(name.to_string()),
            reuse_running_postgres: true,
            proxy: false,
            create_cluster: true,
        })
    }

    /// `regobox cron`: the scheduler alone.
    pub fn cron_only() -> Plan {
        Plan {
            services: Vec::new(),
            cron: true,
            target: None,
            reuse_running_postgres: true,
            proxy: false,
            create_cluster: false,
        }
    }
}

fn order(config: &Config) -> anyhow::Result<Vec<String>> {
    start_order(&config.services)
        .map_err(|cycle| anyhow::anyhow!("dependency cycle: {}", cycle.join(" -> ")))
}

/// Why a cycle ended.
enum Reason {
    Signal(&'static str),
    Essential(String, Option<ExitStatus>),
    Target(String, Option<ExitStatus>),
    PostgresExited(ExitStatus),
    Maintenance(Box<control::Request>),
}

/// How a cycle ended, everything being stopped.
enum Cycle {
    Exit(u8),
    Maintenance(Box<control::Request>),
}

/// The database as the supervisor holds it.
enum Database {
    /// regobox runs the server.
    Owned {
        embedded: Box<Embedded>,
        server: Server,
    },
    /// Another regobox's server, or the external one.
    Remote,
}

impl Database {
    /// Stop the server if regobox runs it (fast shutdown, waited for up to
    /// `postgres.stop_timeout`, then harder): for a run that ends before its services start.
    async fn stop(&mut self, config: &Config) {
        if let Database::Owned { server, .. } = self {
            let _ = server
                .stop(config.postgres.stop_timeout, std::future::pending())
                .await;
        }
    }
}

/// What lives across cycles: the board and its writers, the accounts, the signals.
struct Persistent {
    signals: StopSignals,
    board: Arc<Board>,
    pg_tx: watch::Sender<ServiceStatus>,
    senders: BTreeMap<String, watch::Sender<ServiceStatus>>,
    receivers: BTreeMap<String, watch::Receiver<ServiceStatus>>,
    maintenance: watch::Sender<Option<String>>,
    accounts: BTreeMap<String, Option<Account>>,
    app_account: Option<Account>,
    /// Each cron job's account: its `user`, else `app.user`.
    cron_accounts: BTreeMap<String, Option<Account>>,
    control: tokio::sync::mpsc::Receiver<control::Request>,
    /// Cancels the control socket's requests in hand (see [`control::Control::stopping`]).
    control_stopping: CancellationToken,
    /// Stopped first, before the services.
    proxy: Option<crate::proxy::Proxy>,
    /// Cycles begun (more than one after a restore).
    cycles: u32,
    /// The scheduled backups' state, under `components.backup`.
    backup: watch::Sender<serde_json::Value>,
}

/// Bring everything in `plan` up, keep it up, stop it; the exit code. A maintenance request
/// (a restore through the control socket, its data already built beside the live data) stops
/// everything in order, swaps that data in, and starts everything again.
pub async fn run(loaded: &Loaded, plan: Plan) -> anyhow::Result<u8> {
    let config = &loaded.config;
    let signals = StopSignals::install().context("installing signal handlers")?;
    if !plan.create_cluster {
        crate::postgres::require_cluster(config)?;
    }
    let layout = Layout::new(config);
    layout.prepare()?;
    // What backups killed outright left (their work directories are unlocked).
    crate::backup::clean_dead_work(&layout.backups);
    let secrets = SecretStore::new(&layout.secrets);

    // Accounts first: an unknown user is a configuration error found before anything starts.
    let mut accounts: BTreeMap<String, Option<Account>> = BTreeMap::new();
    for name in &plan.services {
        let svc = &config.services[name];
        let user = if svc.user.is_empty() {
            &config.app.user
        } else {
            &svc.user
        };
        let key = if svc.user.is_empty() {
            "app.user".to_string()
        } else {
            format!("services.{name}.user")
        };
        accounts.insert(name.clone(), resolve_account(user, &key).await?);
    }
    let app_account = resolve_account(&config.app.user, "app.user").await?;
    let mut cron_accounts = BTreeMap::new();
    for (name, job) in &config.cron {
        let account = if job.user.is_empty() {
            app_account.clone()
        } else {
            resolve_account(&job.user, &format!("cron.{name}.user")).await?
        };
        cron_accounts.insert(name.clone(), account);
    }

    // The board: PostgreSQL, then the services.
    let (pg_tx, pg_rx) = watch::channel(ServiceStatus::default());
    let mut entries = vec![Entry {
        name: POSTGRES_SERVICE.into(),
        kind: "database",
        essential: true,
        rx: pg_rx.clone(),
    }];
    let mut senders = BTreeMap::new();
    let mut receivers: BTreeMap<String, watch::Receiver<ServiceStatus>> = BTreeMap::new();
    receivers.insert(POSTGRES_SERVICE.into(), pg_rx);
    for name in &plan.services {
        let svc = &config.services[name];
        let (tx, rx) = watch::channel(ServiceStatus::default());
        entries.push(Entry {
            name: name.clone(),
            kind: match svc.kind {
                crate::config::ServiceKind::Longrun => "longrun",
                crate::config::ServiceKind::Oneshot => "oneshot",
            },
            essential: svc.is_essential(),
            rx: rx.clone(),
        });
        senders.insert(name.clone(), tx);
        receivers.insert(name.clone(), rx);
    }
    let (maintenance, maintenance_rx) = watch::channel(None);
    let (docker_tx, docker_rx) = watch::channel(serde_json::json!({"state": "starting"}));
    let (proxy_tx, proxy_rx) = watch::channel(serde_json::json!({"state": "starting"}));
    let (backup_tx, backup_rx) = watch::channel(serde_json::json!({
        "schedule": config.backup.schedule,
        "next": null,
        "last_failure": null,
    }));
    let board = Arc::new(Board {
        entries,
        started_at: now_epoch(),
        maintenance: maintenance_rx,
        components: [
            ("docker".to_string(), docker_rx),
            ("proxy".to_string(), proxy_rx),
            ("backup".to_string(), backup_rx),
        ]
        .into_iter()
        .collect(),
        volume: Some(status::VolumeWatch {
            root: layout.root.clone(),
            min_free: config.volumes.min_free,
        }),
    });
    tokio::spawn(watch_volume(board.clone()));
    let (control_tx, control_rx) = tokio::sync::mpsc::channel(1);
    let mut p = Persistent {
        signals,
        board,
        pg_tx,
        senders,
        receivers,
        maintenance,
        accounts,
        app_account,
        cron_accounts,
        control: control_rx,
        control_stopping: CancellationToken::new(),
        proxy: None,
        cycles: 0,
        backup: backup_tx,
    };

    let background = CancellationToken::new();
    let mut first = true;
    let mut bridge = None;
    let mut control_socket = None;
    // What follows ends in the teardown below, with an error too: nothing regobox started is
    // left running when it exits.
    let ran = async {
        loop {
            let opened = open_database(config, &secrets, &plan).await?;
            if first {
                first = false;
                if plan.proxy {
                    p.proxy =
                        crate::proxy::Proxy::start(config, &layout, p.board.clone(), proxy_tx.clone())
                            .await?;
                } else {
                    proxy_tx.send_replace(serde_json::json!({"state": "not run by this command"}));
                }
                // After the volume lock: a second regobox on the volume is the clearer error.
                if config.supervision.port != 0 {
                    let listener =
                        crate::health::bind(&config.supervision.listen, config.supervision.port)
                            .await?;
                    tokio::spawn(crate::health::serve(
                        listener,
                        p.board.clone(),
                        background.clone(),
                    ));
                }
                bridge = crate::docker::Bridge::start(
                    config,
                    &layout,
                    &secrets,
                    p.app_account.as_ref(),
                    &docker_tx,
                )
                .await?;
                match control::listen(
                    config,
                    postgres::bootstrap::init_scripts(&loaded.dirs),
                    control_tx.clone(),
                ) {
                    Ok(control) => {
                        p.control_stopping = control.stopping();
                        control_socket = Some(control);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "no control socket: a restore cannot be done while running")
                    }
                }
            }
            match cycle(loaded, &plan, &layout, &secrets, &mut p, opened).await? {
                Cycle::Exit(code) => break Ok(code),
                Cycle::Maintenance(request) => {
                    if restore_while_running(config, &layout, &mut p, *request).await {
                        break Ok(exit::OK);
                    }
                }
            }
        }
    }
    .await;
    // Requests the supervisor will not take are answered "stopped before it took the restore"
    // (what was built for them removed), a restore still being built is cancelled and removes
    // what it built, and the answers reach their clients: before the processes left behind are
    // stopped (a restore's server and pg_restore are regobox's children, and would fail it
    // otherwise).
    p.control.close();
    while p.control.try_recv().is_ok() {}
    if let Some(control) = control_socket {
        control.close(Duration::from_secs(5)).await;
    }
    if let Some(proxy) = &p.proxy {
        proxy.stop(std::future::ready(())).await;
    }
    if let Some(bridge) = bridge {
        bridge.stop().await;
    }
    let force = CancellationToken::new();
    finish(config, &force).await;
    background.cancel();
    ran
}

/// A restore asked of the running regobox, its data built, everything stopped for it: swapped
/// in, cancelled (its client went away, or a stop request came, before the swap began) or
/// failed, with the previous data in place; its client is answered. True when a stop request
/// came (regobox then exits).
async fn restore_while_running(
    config: &Config,
    layout: &Layout,
    p: &mut Persistent,
    request: control::Request,
) -> bool {
    let control::Request {
        options,
        built,
        reply,
        withdrawn,
    } = request;
    p.maintenance
        .send_replace(Some(format!("restoring {}", options.archive.display())));
    // A stop request cancels the restore unless its data is being swapped in (then
    // it ends first); regobox then stops.
    let stop = CancellationToken::new();
    if withdrawn.is_cancelled() {
        tracing::warn!(
            "the restore's client went away while everything stopped for it: the restore is not started"
        );
        stop.cancel();
    }
    let restore = async {
        let held = crate::backup::HeldData::take(config, layout, &options, built.planned())?;
        crate::backup::swap_in(config, layout, &options, built, held, &stop).await
    };
    tokio::pin!(restore);
    let mut stop_after = false;
    let result = loop {
        tokio::select! {
            r = &mut restore => break r,
            _ = withdrawn.cancelled(), if !stop.is_cancelled() => {
                tracing::warn!("the restore's client went away (Ctrl-C): cancelling the restore (unless its data is being swapped in); everything then starts again");
                stop.cancel();
            }
            s = p.signals.recv() => {
                tracing::warn!(signal = s, "stop requested during a restore: cancelling it (unless its data is being swapped in), then stopping");
                stop.cancel();
                stop_after = true;
            }
        }
    };
    let answer = match &result {
        Ok(()) => control::Reply {
            code: exit::OK,
            message: "restore complete".into(),
        },
        Err(e)
            if e.downcast_ref::<crate::backup::RestoreCancelled>()
                .is_some() =>
        {
            tracing::warn!("{e:#}");
            control::Reply {
                code: exit::code_for(e),
                message: format!("{e:#}"),
            }
        }
        Err(e) => {
            tracing::error!("restore failed, the previous data is in place: {e:#}");
            control::Reply {
                code: exit::code_for(e),
                message: format!("{e:#}"),
            }
        }
    };
    let _ = reply.send(answer);
    p.maintenance.send_replace(None);
    stop_after
}

/// One cycle: bring the database, the services and the scheduler up, supervise them until a
/// reason to stop, and stop them all in order.
async fn cycle(
    loaded: &Loaded,
    plan: &Plan,
    layout: &Layout,
    secrets: &SecretStore,
    p: &mut Persistent,
    opened: Opening,
) -> anyhow::Result<Cycle> {
    let config = &loaded.config;
    let started = Instant::now();
    p.cycles += 1;
    let first_cycle = p.cycles == 1;
    let shutdown = CancellationToken::new();
    let force = CancellationToken::new();
    p.pg_tx.send_replace(ServiceStatus::default());
    for tx in p.senders.values() {
        tx.send_replace(ServiceStatus::default());
    }

    // PostgreSQL.
    let pg_log = open_log(config, layout, POSTGRES_SERVICE);
    let space = keeper::SpaceWatch::new(&config.postgres.data_dir);
    // A stop during start-up cancels it; a server already started is stopped, and waited for,
    // before regobox exits.
    let starting = CancellationToken::new();
    let up = bring_up_database(
        loaded,
        opened,
        &p.pg_tx,
        pg_log.clone(),
        space.observer(),
        &starting,
    );
    let (up, stopped_by) = p.signals.cancelling(up, &starting).await;
    if let Some(s) = stopped_by {
        tracing::info!(signal = s, "stop requested during start-up");
    }
    let (mut database, endpoint) = match up {
        Ok(up) if stopped_by.is_none() => up,
        Ok((mut database, _)) => {
            // Up just as the stop came.
            database.stop(config).await;
            return Ok(Cycle::Exit(exit::OK));
        }
        Err(e) if stopped_by.is_some() => {
            tracing::debug!(error = %format!("{e:#}"), "start-up cancelled");
            return Ok(Cycle::Exit(exit::OK));
        }
        Err(e) => return Err(e),
    };

    // The application environment. A failure here ends the run with the server stopped, so the
    // next command does not find it still shutting down on the data directory.
    let prepared = environment::build(config, layout, secrets, Some(&endpoint)).and_then(|env| {
        environment::render_templates(config, &env, p.app_account.as_ref())?;
        Ok(Arc::new(env))
    });
    let env = match prepared {
        Ok(env) => env,
        Err(e) => {
            database.stop(config).await;
            return Err(e);
        }
    };

    // Services.
    let mut tasks = tokio::task::JoinSet::new();
    for name in &plan.services {
        let mut svc = config.services[name].clone();
        // `regobox start NAME`: the service's end is regobox's (with its exit code), unless its
        // configuration asks for restarts.
        if plan.target.as_deref() == Some(name.as_str()) && svc.restart.is_none() {
            svc.restart = Some(crate::config::RestartMode::Never);
        }
        let deps = svc
            .depends_on
            .iter()
            .map(|d| (d.clone(), p.receivers[d].clone()))
            .collect();
        let dependents = plan
            .services
            .iter()
            .filter(|other| config.services[*other].depends_on.contains(name))
            .map(|other| p.receivers[other].clone())
            .collect();
        let ctx = ServiceCtx {
            name: name.clone(),
            spec: svc,
            env: env.clone(),
            account: p.accounts[name].clone(),
            status: p.senders[name].clone(),
            deps,
            dependents,
            shutdown: shutdown.clone(),
            force: force.clone(),
            log_file: open_log(config, layout, name),
        };
        let name = name.clone();
        tasks.spawn(async move { (name, service::run(ctx).await) });
    }
    let cron_task = (plan.cron && !config.cron.is_empty()).then(|| {
        let jobs = config
            .cron
            .iter()
            .map(|(name, job)| crate::cron::Job {
                name: name.clone(),
                config: job.clone(),
                // A job naming a user runs as that user, never as regobox's own (root).
                account: p.cron_accounts.get(name).cloned().flatten(),
            })
            .collect();
        tokio::spawn(crate::cron::run(
            jobs,
            env.clone(),
            shutdown.clone(),
            force.clone(),
        ))
    });
    let backups = (plan.cron && !config.backup.schedule.is_empty()).then(|| {
        tokio::spawn(scheduled_backups(
            config.clone(),
            layout.clone(),
            loaded.dirs.clone(),
            endpoint.clone(),
            shutdown.clone(),
            p.backup.clone(),
        ))
    });
    {
        let board = p.board.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let all_ready = async {
                for e in board.entries.iter().filter(|e| e.essential) {
                    let mut rx = e.rx.clone();
                    if rx.wait_for(|s| s.state.is_ready()).await.is_err() {
                        return false;
                    }
                }
                true
            };
            tokio::select! {
                ready = all_ready => if ready {
                    // The first time, since launch (initdb included); after a restore, since
                    // everything started again.
                    let (elapsed, since) = if first_cycle {
                        (crate::process::since_launch(), "launch")
                    } else {
                        (started.elapsed(), "restore")
                    };
                    tracing::info!(elapsed_ms = elapsed.as_millis() as u64, since, "regobox is ready");
                },
                _ = shutdown.cancelled() => {}
            }
        });
    }

    // Supervise until a reason to stop.
    let essential: BTreeMap<&String, bool> = plan
        .services
        .iter()
        .map(|n| (n, config.services[n].is_essential()))
        .collect();
    let reason = {
        // Kept across the loop: a restart in progress is not cut short by another event.
        let keep_postgres = async {
            match &mut database {
                Database::Owned { embedded, server } => {
                    keeper::Keeper {
                        embedded,
                        endpoint: &endpoint,
                        listen: &config.postgres.listen,
                        status: &p.pg_tx,
                        log: pg_log,
                        space,
                        min_free: config.volumes.min_free,
                        start_timeout: config.postgres.start_timeout,
                        stop_timeout: config.postgres.stop_timeout,
                    }
                    .keep(server)
                    .await
                }
                Database::Remote => std::future::pending().await,
            }
        };
        tokio::pin!(keep_postgres);
        loop {
            tokio::select! {
                s = p.signals.recv() => break Reason::Signal(s),
                Some(request) = p.control.recv() => {
                    if request.withdrawn.is_cancelled() {
                        tracing::warn!(archive = %request.options.archive.display(), "restore withdrawn by its client before it began: nothing stopped");
                        continue;
                    }
                    break Reason::Maintenance(Box::new(request));
                }
                Some(joined) = tasks.join_next(), if !tasks.is_empty() => {
                    let Ok((name, outcome)) = joined else { continue };
                    let is_target = plan.target.as_deref() == Some(name.as_str());
                    match outcome {
                        Outcome::Done if is_target => break Reason::Target(name, None),
                        Outcome::Exited(st) if is_target => break Reason::Target(name, Some(st)),
                        Outcome::Fatal(st, _) if is_target || essential[&name] => break Reason::Essential(name, st),
                        Outcome::Exited(st) if essential[&name] => break Reason::Essential(name, Some(st)),
                        _ => {}
                    }
                }
                st = &mut keep_postgres => break Reason::PostgresExited(st),
            }
        }
    };

    // Stop, in order.
    let mut code = match &reason {
        Reason::Signal(s) => {
            tracing::info!(signal = s, "stopping (a second signal forces)");
            exit::OK
        }
        Reason::Maintenance(r) => {
            tracing::info!(archive = %r.options.archive.display(), "maintenance: stopping everything for a restore");
            exit::OK
        }
        Reason::Essential(name, st) => {
            let code = st
                .map(crate::process::exit_code)
                .filter(|c| *c != 0)
                .unwrap_or(exit::FAILURE);
            tracing::error!(service = %name, exit_code = code, "an essential service failed for good; stopping everything");
            code
        }
        Reason::Target(name, st) => {
            let code = st.map(crate::process::exit_code).unwrap_or(exit::OK);
            tracing::info!(service = %name, exit_code = code, "service ended; stopping");
            code
        }
        Reason::PostgresExited(st) => {
            tracing::error!(status = %st, "PostgreSQL cannot be kept up; stopping everything");
            exit::FAILURE
        }
    };
    if let Some(b) = backups {
        b.abort();
    }
    if !matches!(reason, Reason::Maintenance(_)) {
        // regobox is to stop: a restore being built is cancelled now, not once the services
        // have stopped (it would go on writing meanwhile).
        p.control_stopping.cancel();
    }
    let deadline = Instant::now() + config.supervision.shutdown_timeout;
    let stop_proxy = !matches!(reason, Reason::Maintenance(_));
    let mut stop_during_maintenance: Option<&'static str> = None;
    let clean = {
        let ordered_stop = async {
            // The proxy first: no new requests, in-flight ones finish, then the services stop.
            if let (true, Some(proxy)) = (stop_proxy, &p.proxy) {
                let force = force.clone();
                proxy.stop(async move { force.cancelled().await }).await;
            }
            shutdown.cancel();
            if let Some(cron) = cron_task {
                let _ = cron.await;
            }
            while tasks.join_next().await.is_some() {}
            p.pg_tx.send_modify(|s| s.state = State::Stopping);
            let mut clean = true;
            if let Database::Owned { server, .. } = &mut database
                && server.has_exited()
            {
                tracing::info!(
                    "PostgreSQL was not running (it had exited and was waiting to be started again)"
                );
            } else if let Database::Owned { server, .. } = &mut database {
                let grace = config.postgres.stop_timeout;
                let force = force.clone();
                match server
                    .stop(grace, async move { force.cancelled().await })
                    .await
                {
                    Ok(st) if st.success() => tracing::info!("PostgreSQL stopped cleanly"),
                    Ok(st) => {
                        tracing::warn!(status = %st, "PostgreSQL did not stop cleanly");
                        clean = false;
                    }
                    Err(e) => tracing::warn!(error = %e, "waiting for PostgreSQL"),
                }
            }
            clean
        };
        tokio::pin!(ordered_stop);
        loop {
            tokio::select! {
                clean = &mut ordered_stop => break clean,
                s = p.signals.recv(), if !force.is_cancelled() => {
                    if matches!(reason, Reason::Maintenance(_)) && stop_during_maintenance.is_none() {
                        // The first stop request of this run: the restore is called off, the
                        // stop goes on in order, and regobox then exits.
                        tracing::warn!(signal = s, "stop requested while stopping for a restore: the restore is cancelled, regobox stops (a second signal forces)");
                        stop_during_maintenance = Some(s);
                        continue;
                    }
                    tracing::warn!(signal = s, "second stop request: stopping now");
                    force.cancel();
                }
                _ = tokio::time::sleep_until(deadline), if !force.is_cancelled() => {
                    tracing::warn!("shutdown deadline reached: stopping now");
                    force.cancel();
                }
            }
        }
    };
    if !clean && code == exit::OK && !matches!(reason, Reason::Target(..)) {
        code = exit::FAILURE;
    }
    p.pg_tx.send_modify(|s| {
        s.state = State::Stopped;
        s.pid = None;
    });
    drop(database);
    Ok(match reason {
        Reason::Maintenance(request) if stop_during_maintenance.is_some() => {
            let e = anyhow::Error::from(crate::backup::RestoreCancelled);
            tracing::warn!("{e:#}");
            let _ = request.reply.send(control::Reply {
                code: exit::code_for(&e),
                message: format!("{e:#}"),
            });
            Cycle::Exit(code)
        }
        Reason::Maintenance(request) => Cycle::Maintenance(request),
        _ => Cycle::Exit(code),
    })
}

/// Log when the data volume's free space goes below `volumes.min_free`, and when it is back.
async fn watch_volume(board: Arc<Board>) {
    let Some(watch) = board.volume.clone() else {
        return;
    };
    let mut low = false;
    loop {
        if let Some(v) = watch.measure() {
            if v.low && !low {
                tracing::warn!(
                    "low space: {}; writes may soon fail, /readyz answers 503 until there is room",
                    v.why()
                );
            } else if !v.low && low {
                tracing::info!(path = %v.path.display(), free = %crate::backup::archive::bytes(v.free_bytes), "the data volume has room again");
            }
            low = v.low;
        }
        tokio::time::sleep(Duration::from_secs(10)).await;
    }
}

/// Whether a scheduled backup fits: about the size of the last archive, with `volumes.min_free`
/// left on the file system of the backups directory. Why not, if it does not.
fn backup_fits(config: &Config, layout: &Layout) -> Result<(), String> {
    let last = crate::backup::archives(&layout.backups)
        .last()
        .and_then(|p| std::fs::metadata(p).ok())
        .map(|m| m.len())
        .unwrap_or(0);
    let Ok((free, _)) = crate::volumes::free_space(&layout.backups) else {
        return Ok(());
    };
    let needs = last.saturating_add(config.volumes.min_free);
    if needs > free {
        return Err(format!(
            "scheduled backup not started: not enough space: needs {} (about the last archive, {}, with volumes.min_free, {}, left), {} free on {}",
            crate::backup::archive::bytes(needs),
            crate::backup::archive::bytes(last),
            crate::backup::archive::bytes(config.volumes.min_free),
            crate::backup::archive::bytes(free),
            layout.backups.display()
        ));
    }
    Ok(())
}

/// `backup.schedule`: archives taken through the running server, with retention.
async fn scheduled_backups(
    config: Config,
    layout: Layout,
    dirs: Vec<PathBuf>,
    endpoint: Endpoint,
    shutdown: CancellationToken,
    state: watch::Sender<serde_json::Value>,
) {
    let failed = |error: String| {
        state.send_modify(|s| {
            s["last_failure"] = serde_json::json!({
                "at": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                "error": error,
            })
        })
    };
    let Ok(schedule) = config.backup.schedule.parse::<croner::Cron>() else {
        return;
    };
    loop {
        let now = chrono::Utc::now();
        let Some(next) = crate::cron::next_run(&schedule, chrono_tz::Tz::UTC, now) else {
            return;
        };
        let wait = (next - now).to_std().unwrap_or(Duration::ZERO);
        state.send_modify(|s| {
            s["next"] = serde_json::json!(next.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        });
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.cancelled() => return,
        }
        if let Err(why) = backup_fits(&config, &layout) {
            tracing::error!("{why}");
            failed(why);
            continue;
        }
        let opts = crate::backup::CreateOptions {
            output: crate::backup::Output::Default,
            secrets: true,
            config: true,
        };
        match crate::backup::create(&config, &layout, &dirs, &endpoint, &opts).await {
            Err(e) => {
                tracing::error!("scheduled backup failed: {e:#}");
                failed(format!("{e:#}"));
            }
            Ok(_) => state.send_modify(|s| s["last_failure"] = serde_json::Value::Null),
        }
    }
}

/// Stop whatever is left (orphans re-parented to regobox): SIGTERM, then SIGKILL when the
/// shutdown is forced or its deadline passes; return once no child is left (or 2 s after that).
async fn finish(config: &Config, force: &CancellationToken) {
    let left = crate::process::direct_children();
    if left.is_empty() {
        return;
    }
    tracing::info!(count = left.len(), "stopping processes left behind");
    for pid in &left {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(*pid),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
    let limit = Instant::now() + config.supervision.shutdown_timeout;
    let mut killed = false;
    loop {
        if crate::process::direct_children().is_empty() {
            return;
        }
        if !killed && (force.is_cancelled() || Instant::now() >= limit) {
            for pid in crate::process::direct_children() {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            killed = true;
        }
        if killed && Instant::now() >= limit + Duration::from_secs(2) {
            tracing::warn!("processes still present after SIGKILL; exiting anyway");
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn resolve_account(user: &str, key: &str) -> anyhow::Result<Option<Account>> {
    if user.is_empty() {
        return Ok(None);
    }
    if !crate::users::is_root() {
        let me = Account::current();
        if me.as_ref().is_some_and(|a| a.name == user) {
            return Ok(None);
        }
        tracing::warn!(
            user,
            key,
            "regobox does not run as root and cannot switch users; running as itself"
        );
        return Ok(None);
    }
    match crate::users::lookup(user)? {
        Some(a) => Ok(Some(a)),
        None => Err(crate::config::error(
            crate::config::Origin::Default,
            key,
            format!("OS user `{user}` does not exist (create it in the image)"),
        )
        .into()),
    }
}

fn open_log(config: &Config, layout: &Layout, name: &str) -> Option<SharedLogFile> {
    match LogFile::open(&layout.logs, name, config.logs.max_bytes, config.logs.keep) {
        Ok(f) => Some(f),
        Err(e) => {
            tracing::warn!(dir = %layout.logs.display(), error = %e, "cannot open a log file; logging to stdout only");
            None
        }
    }
}

/// The database before it is started.
enum Opening {
    External(Endpoint),
    Running(Endpoint),
    Owned(Box<Embedded>),
}

/// Prepare the data directory and take its lock (embedded), or find the server to use.
async fn open_database(
    config: &Config,
    secrets: &SecretStore,
    plan: &Plan,
) -> anyhow::Result<Opening> {
    if config.postgres.mode == PostgresMode::External {
        return Ok(Opening::External(Endpoint::external(config)?));
    }
    match Embedded::open(config, secrets, plan.create_cluster).await? {
        Opened::Owned(e) => Ok(Opening::Owned(Box::new(e))),
        Opened::Busy(endpoint) if plan.reuse_running_postgres => Ok(Opening::Running(endpoint)),
        Opened::Busy(_) => Err(PostgresError::Busy {
            data_dir: config.postgres.data_dir.clone(),
        }
        .into()),
    }
}

/// Start (or reach) the database and bootstrap it; the board's `postgres` entry follows along.
async fn bring_up_database(
    loaded: &Loaded,
    opening: Opening,
    pg_tx: &watch::Sender<ServiceStatus>,
    log: Option<SharedLogFile>,
    observer: crate::logs::Observer,
    cancel: &CancellationToken,
) -> anyhow::Result<(Database, Endpoint)> {
    let config = &loaded.config;
    let pg = &config.postgres;
    let ready = |pid: Option<i32>| {
        pg_tx.send_modify(|s| {
            s.state = State::Ready;
            s.pid = pid;
            s.started_at = Some(now_epoch());
        })
    };
    pg_tx.send_modify(|s| s.state = State::Starting);
    match opening {
        Opening::External(endpoint) => {
            tracing::info!(url = %crate::config::redact_url(&pg.url), "using the external PostgreSQL");
            postgres::unless(cancel, async {
                postgres::wait_ready(None, &endpoint, pg.start_timeout).await?;
                postgres::bootstrap(config, &endpoint, &loaded.dirs).await
            })
            .await?;
            ready(None);
            Ok((Database::Remote, endpoint))
        }
        Opening::Running(endpoint) => {
            tracing::info!(
                "using the PostgreSQL server of the regobox already running on this volume"
            );
            postgres::unless(
                cancel,
                postgres::wait_ready(None, &endpoint, pg.start_timeout),
            )
            .await?;
            ready(None);
            Ok((Database::Remote, endpoint))
        }
        Opening::Owned(embedded) => {
            let mut server = embedded.start(&pg.listen, Sink::Stdout, log, Some(observer))?;
            pg_tx.send_modify(|s| s.pid = Some(server.pid()));
            let endpoint = embedded.endpoint().clone();
            let up = postgres::unless(cancel, async {
                postgres::wait_ready(Some(&mut server), &endpoint, pg.start_timeout).await?;
                postgres::bootstrap(config, &endpoint, &loaded.dirs).await
            })
            .await;
            if let Err(e) = up {
                // Stopped before regobox ends: the next command finds no server still going.
                let _ = server.stop(pg.stop_timeout, std::future::pending()).await;
                return Err(e.into());
            }
            ready(Some(server.pid()));
            if let Some(job) = embedded.statistics_job() {
                tokio::spawn(async move {
                    if let Err(e) = job.run().await {
                        tracing::warn!(error = %e, "the planner's statistics could not be gathered after the upgrade; the next start tries again");
                    }
                });
            }
            Ok((Database::Owned { embedded, server }, endpoint))
        }
    }
}

/// The directory of scripts for `regobox exec`.
pub fn script_path(config: &Config, name: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    if name.contains('/') {
        return None;
    }
    let path = config.scripts_dir.join(name);
    let meta = std::fs::metadata(&path).ok()?;
    (meta.is_file() && meta.permissions().mode() & 0o111 != 0).then_some(path)
}

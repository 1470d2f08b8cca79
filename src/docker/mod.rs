//! The host's Docker engine for the pipeline layer, behind a policy.
//!
//! regobox is the only thing that talks to the engine's socket. The application gets a socket of
//! its own (`docker.proxy_socket`, its `DOCKER_HOST`), served by [`proxy`], which applies
//! [`policy`] to what is inside every request: the endpoints a pipeline runner needs, container
//! creates without anything that hands the host over, bind sources under `docker.policy.bind_roots`
//! translated to the host paths behind them, and everything the application creates labelled as
//! this instance's, the rest invisible to it.
//!
//! [`Bridge::start`] pings the engine, negotiates the API version, finds the host paths behind
//! regobox's own mounts (by inspecting its own container), reconciles this instance's containers
//! (reports those running, removes those exited longer than `docker.gc_after` ago) and serves the
//! socket. No engine: one warning, no socket, everything else runs.

pub mod binds;
pub mod engine;
pub mod model;
pub mod policy;
pub mod proxy;

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, parse_bytes};
use crate::logs::LogFile;
use crate::secrets::SecretStore;
use crate::users::Account;
use crate::volumes::Layout;
use engine::{Connector, Host};
use policy::INSTANCE_LABEL;
use policy::container::{CreatePolicy, Limits};
use proxy::{Proxy, Recorded};

/// The running bridge.
pub struct Bridge {
    socket: PathBuf,
    docker: bollard::Docker,
    instance: String,
    /// The containers the application created (see [`Recorded`]).
    containers: Arc<Recorded>,
    /// The creates and starts forwarded to the engine and not yet answered (see `Proxy::creates`).
    creates: tokio_util::task::TaskTracker,
    stop_jobs: bool,
    shutdown: CancellationToken,
}

/// The `DOCKER_HOST` the application gets, when the bridge's socket answers.
pub fn application_host(config: &Config) -> Option<String> {
    let socket = &config.docker.proxy_socket;
    (config.docker.enabled && std::os::unix::net::UnixStream::connect(socket).is_ok())
        .then(|| format!("unix://{}", socket.display()))
}

impl Bridge {
    /// Start the bridge; `None` when it is disabled, the engine cannot be reached (warned once)
    /// or another regobox already serves the socket. `status` gets what `/status` shows.
    pub async fn start(
        config: &Config,
        layout: &Layout,
        secrets: &SecretStore,
        app: Option<&Account>,
        status: &watch::Sender<Value>,
    ) -> anyhow::Result<Option<Bridge>> {
        let d = &config.docker;
        if !d.enabled {
            status.send_replace(json!({"state": "disabled"}));
            return Ok(None);
        }
        let host = match Host::resolve(d) {
            Ok(h) => h,
            Err(e) => {
                tracing::warn!("the Docker bridge is disabled: {e:#}");
                status.send_replace(json!({"state": "unreachable", "detail": format!("{e:#}")}));
                return Ok(None);
            }
        };
        let described = host.describe();
        let connected = async {
            let docker = host.bollard()?;
            tokio::time::timeout(Duration::from_secs(5), docker.ping())
                .await
                .map_err(|_| anyhow::anyhow!("no answer to ping within 5 s"))??;
            let docker = docker.negotiate_version().await?;
            let version = docker.version().await?;
            anyhow::Ok((docker, version))
        }
        .await;
        let (docker, version) = match connected {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(
                    engine = %described,
                    "the Docker engine cannot be reached ({e:#}): the Docker bridge is disabled and the application gets no DOCKER_HOST; everything else runs (mount the engine's socket, or set docker.enabled = false to silence this)"
                );
                status.send_replace(json!({
                    "state": "unreachable",
                    "engine": described,
                    "detail": format!("{e:#}"),
                }));
                return Ok(None);
            }
        };
        let engine_version = version.version.clone().unwrap_or_default();
        let api_version = docker.client_version().to_string();

        let socket = d.proxy_socket.clone();
        if !prepare_socket_path(&socket)? {
            tracing::info!(socket = %socket.display(), "another regobox already serves the Docker socket; using it");
            status.send_replace(json!({"state": "shared", "socket": socket}));
            return Ok(None);
        }

        let instance = if d.instance.is_empty() {
            secrets
                .get_or_generate(crate::secrets::DOCKER_INSTANCE)
                .context("generating the Docker instance id")?
        } else {
            d.instance.clone()
        };
        let host_paths = host_paths(config, &docker).await;
        let policy = CreatePolicy {
            bind_roots: d.policy.bind_roots.clone(),
            host_paths: host_paths
                .iter()
                .map(|(a, b)| (PathBuf::from(a), PathBuf::from(b)))
                .collect(),
            instance: instance.clone(),
            limits: Limits {
                memory: parse_bytes(&d.limits.memory).filter(|m| *m > 0),
                nano_cpus: (d.limits.cpus > 0.0).then_some((d.limits.cpus * 1e9) as i64),
                pids: (d.limits.pids > 0).then_some(d.limits.pids),
                shm: parse_bytes(&d.limits.shm).filter(|m| *m > 0),
            },
            ulimits: own_hard_limits(),
            registries: d.policy.registries.clone(),
        };
        let images = Arc::new(Recorded::load(
            layout.secrets.join(crate::secrets::DOCKER_IMAGES),
            "images",
        )?);
        // The engine's deletes are followed from before its images are listed: one between the
        // list and the start of the events (which the application can lengthen, with many old
        // jobs to collect) would go unseen (an attacker's, twenty-third session).
        let deletes_since = chrono::Utc::now().timestamp();
        if images.is_new() {
            adopt_images(
                &docker,
                &instance,
                &images,
                &layout.secrets.join(crate::secrets::DOCKER_IMAGES_BEFORE),
            )
            .await?;
        }
        let tags = Arc::new(Recorded::load(
            layout.secrets.join(crate::secrets::DOCKER_TAGS),
            "tags",
        )?);
        // One list of the engine's images for both records.
        let opts = bollard::query_parameters::ListImagesOptions {
            all: true,
            ..Default::default()
        };
        match docker.list_images(Some(opts)).await {
            Ok(list) => {
                forget_gone_images(&list, &images);
                keep_tags(&list, &images, &tags);
            }
            // Not adopted unless listed: the application's tags would be the host's for good.
            Err(e) if tags.is_new() => {
                return Err(e)
                    .context("listing the engine's images, to adopt this instance's tags");
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot list the engine's images to forget the instance's images and tags gone")
            }
        }
        let creates = tokio_util::task::TaskTracker::new();
        let shutdown = CancellationToken::new();
        let containers = Arc::new(Recorded::load(
            layout.secrets.join(crate::secrets::DOCKER_CONTAINERS),
            "containers",
        )?);
        let freeze_journal = layout.secrets.join(crate::secrets::DOCKER_BINDS_FROZEN);
        binds::thaw_leftovers(&freeze_journal);
        if !nix::unistd::geteuid().is_root() {
            tracing::warn!(
                "regobox is not root: bind sources are checked before the engine mounts them, not held still while it does (the application runs as the same user)"
            );
        }
        let audit = match LogFile::open(
            &layout.logs,
            "docker-audit",
            config.logs.max_bytes,
            config.logs.keep,
        ) {
            Ok(f) => Some(f),
            Err(e) => {
                tracing::warn!(error = %e, "no Docker audit file; audit lines go to the log only");
                None
            }
        };
        let (running, removed) = reconcile(&docker, &instance, &containers, d.gc_after).await;

        let listener = tokio::net::UnixListener::bind(&socket)
            .with_context(|| format!("binding the Docker proxy socket {}", socket.display()))?;
        secure_socket(&socket, app)?;
        let proxy = Arc::new(Proxy {
            connector: Connector::new(&host)?,
            docker: docker.clone(),
            instance: instance.clone(),
            policy,
            images: images.clone(),
            tags,
            containers: containers.clone(),
            creates: creates.clone(),
            stopping: shutdown.clone(),
            audit,
            max_body: d.max_inspected_body as usize,
            max_build_context: d.max_build_context,
            spool_dir: std::env::temp_dir(),
            spools: Arc::new(tokio::sync::Semaphore::new(d.max_spooled)),
            builds: Default::default(),
            max_connections: d.max_connections,
            idle_timeout: d.idle_timeout,
            freeze_journal,
            freezing: tokio::sync::Mutex::new(()),
            making: Default::default(),
            networks: Default::default(),
            max_networks: d.limits.networks as usize,
            network_creates: tokio::sync::Mutex::new(()),
        });
        tokio::spawn(proxy::serve(listener, proxy, shutdown.clone()));
        tokio::spawn(forget_deleted(
            docker.clone(),
            images,
            containers.clone(),
            deletes_since,
            shutdown.clone(),
        ));
        tracing::info!(
            engine = %described,
            engine_version,
            api_version,
            socket = %socket.display(),
            instance,
            jobs_running = running.len(),
            jobs_removed = removed,
            "Docker bridge up"
        );
        status.send_replace(json!({
            "state": "up",
            "engine": described,
            "engine_version": engine_version,
            "api_version": api_version,
            "socket": socket,
            "instance": instance,
            "host_paths": host_paths,
            "jobs_running_at_start": running,
            "jobs_removed_at_start": removed,
        }));
        Ok(Some(Bridge {
            socket,
            docker,
            instance,
            containers,
            creates,
            stop_jobs: d.stop_jobs,
            shutdown,
        }))
    }

    /// Stop serving the socket; stop this instance's running containers if `docker.stop_jobs`.
    pub async fn stop(self) {
        self.shutdown.cancel();
        let _ = std::fs::remove_file(&self.socket);
        // A create the engine is making is recorded before regobox exits: cut, its container
        // would be labelled and unrecorded, no one's; and a start in flight is over before
        // `docker.stop_jobs` lists the running jobs (an attacker's, twenty-third session).
        // Nothing more is made or started: requests answer 503, each connection takes no more.
        self.creates.close();
        if tokio::time::timeout(CREATES_GRACE, self.creates.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                "a container create was still waiting for the engine at the stop: if the engine makes it, it is no one's"
            );
        }
        if !self.stop_jobs {
            return;
        }
        let running = list_own(&self.docker, &self.instance, false)
            .await
            .unwrap_or_default()
            .into_iter()
            .filter(|c| self.containers.contains(c.id.as_deref().unwrap_or("")));
        let stops = running.map(|c| {
            let id = c.id.clone().unwrap_or_default();
            let docker = self.docker.clone();
            async move {
                let opts = bollard::query_parameters::StopContainerOptions {
                    t: Some(10),
                    signal: None,
                };
                match docker.stop_container(&id, Some(opts)).await {
                    Ok(()) => tracing::info!(container = %id, "job stopped (docker.stop_jobs)"),
                    Err(e) => tracing::warn!(container = %id, error = %e, "cannot stop job"),
                }
            }
        });
        futures_util::future::join_all(stops).await;
    }
}

/// The hard limits regobox runs with, by the names the engine gives ulimits (-1: unlimited).
fn own_hard_limits() -> BTreeMap<String, i64> {
    use nix::sys::resource::{RLIM_INFINITY, Resource, getrlimit};
    [
        ("core", Resource::RLIMIT_CORE),
        ("cpu", Resource::RLIMIT_CPU),
        ("data", Resource::RLIMIT_DATA),
        ("fsize", Resource::RLIMIT_FSIZE),
        ("locks", Resource::RLIMIT_LOCKS),
        ("memlock", Resource::RLIMIT_MEMLOCK),
        ("msgqueue", Resource::RLIMIT_MSGQUEUE),
        ("nice", Resource::RLIMIT_NICE),
        ("nofile", Resource::RLIMIT_NOFILE),
        ("nproc", Resource::RLIMIT_NPROC),
        ("rss", Resource::RLIMIT_RSS),
        ("rtprio", Resource::RLIMIT_RTPRIO),
        ("sigpending", Resource::RLIMIT_SIGPENDING),
        ("stack", Resource::RLIMIT_STACK),
    ]
    .into_iter()
    .filter_map(|(name, resource)| {
        let (_, hard) = getrlimit(resource).ok()?;
        let hard = if hard == RLIM_INFINITY {
            -1
        } else {
            i64::try_from(hard).unwrap_or(i64::MAX)
        };
        Some((name.to_string(), hard))
    })
    .collect()
}

/// Make `socket` free to bind: false when a live server is there; a stale socket is removed;
/// anything else there is an error that names it (never removed).
fn prepare_socket_path(socket: &Path) -> anyhow::Result<bool> {
    if let Some(parent) = socket.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {} (docker.proxy_socket)", parent.display()))?;
    }
    match std::fs::symlink_metadata(socket) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(true),
        Err(e) => Err(anyhow::anyhow!(
            "{} (docker.proxy_socket): {e}",
            socket.display()
        )),
        Ok(m) if m.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(socket).is_ok() {
                return Ok(false);
            }
            std::fs::remove_file(socket)
                .with_context(|| format!("removing the stale socket {}", socket.display()))?;
            Ok(true)
        }
        Ok(_) => Err(anyhow::anyhow!(
            "{} exists and is not a socket; regobox will not replace it (docker.proxy_socket)",
            socket.display()
        )),
    }
}

/// Root and the application's group only.
fn secure_socket(socket: &Path, app: Option<&Account>) -> anyhow::Result<()> {
    let mode = if app.is_some() { 0o660 } else { 0o600 };
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {}", socket.display()))?;
    if let Some(account) = app {
        nix::unistd::chown(socket, None, Some(account.gid))
            .with_context(|| format!("chown {}", socket.display()))?;
    }
    Ok(())
}

/// Paths as regobox sees them -> host paths: `docker.host_paths`, else its own container's
/// mounts, else none (regobox runs on the host: paths are the host's).
async fn host_paths(config: &Config, docker: &bollard::Docker) -> BTreeMap<String, String> {
    if !config.docker.host_paths.is_empty() {
        return config.docker.host_paths.clone();
    }
    let Some(id) = std::fs::read_to_string("/proc/self/mountinfo")
        .ok()
        .and_then(|m| own_container_id(&m))
    else {
        return BTreeMap::new();
    };
    match docker
        .inspect_container(
            &id,
            None::<bollard::query_parameters::InspectContainerOptions>,
        )
        .await
    {
        Ok(c) => {
            let map: BTreeMap<String, String> = c
                .mounts
                .unwrap_or_default()
                .into_iter()
                .filter(|m| {
                    matches!(
                        m.typ,
                        Some(bollard::models::MountPointTypeEnum::BIND)
                            | Some(bollard::models::MountPointTypeEnum::VOLUME)
                    )
                })
                .filter_map(|m| Some((m.destination?, m.source?)))
                .collect();
            tracing::info!(container = %&id[..12], mounts = ?map, "bind sources are translated through regobox's own mounts");
            map
        }
        Err(e) => {
            tracing::warn!(container = %&id[..12], error = %e, "regobox runs in a container the engine does not know (a remote engine?): bind sources are passed untranslated; set docker.host_paths");
            BTreeMap::new()
        }
    }
}

/// The id of the container regobox runs in, from its mount table (the engine bind-mounts
/// `/etc/hostname` and friends from `.../containers/<id>/`).
pub fn own_container_id(mountinfo: &str) -> Option<String> {
    for line in mountinfo.lines() {
        for field in line.split(' ').take(5) {
            let mut rest = field;
            while let Some(i) = rest.find("containers/") {
                let candidate = &rest[i + "containers/".len()..];
                let id: String = candidate.chars().take(64).collect();
                if id.len() == 64 && id.chars().all(|c| c.is_ascii_hexdigit()) {
                    return Some(id);
                }
                rest = candidate;
            }
        }
    }
    None
}

/// How long a stop waits for the creates the engine is making.
const CREATES_GRACE: Duration = Duration::from_secs(10);

/// The application's recorded images the engine no longer has are forgotten (removed on the
/// host, or while regobox was not running): an image's id is its content, and the same content
/// made again by someone else (the host pulling the same tag, a `docker load`) would otherwise be
/// the application's to tag over and remove (an attacker's, twenty-third session).
fn forget_gone_images(list: &[bollard::models::ImageSummary], images: &Recorded) {
    let present: BTreeSet<&str> = list.iter().map(|i| i.id.as_str()).collect();
    images.keep_only(|id| present.contains(id));
}

/// The first start that keeps the record of the instance's images, built ones included (a fresh
/// volume, or one an earlier version of regobox ran on, which recorded pulled and imported
/// images in `before` and judged a built one by its label alone): the images labelled as the
/// instance's now and those `before` recorded are adopted, as that version would have had them;
/// from now on only what the socket makes. `before` is removed once the new record is written.
async fn adopt_images(
    docker: &bollard::Docker,
    instance: &str,
    images: &Recorded,
    before: &Path,
) -> anyhow::Result<()> {
    let earlier: BTreeSet<String> = match std::fs::read(before) {
        Ok(bytes) => serde_json::from_slice(&bytes).with_context(|| {
            format!(
                "{} is not a JSON list of image ids; move it away to start afresh",
                before.display()
            )
        })?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeSet::new(),
        Err(e) => return Err(e).with_context(|| format!("reading {}", before.display())),
    };
    let mut filters = std::collections::HashMap::new();
    filters.insert(
        "label".to_string(),
        vec![format!("{INSTANCE_LABEL}={instance}")],
    );
    let opts = bollard::query_parameters::ListImagesOptions {
        all: true,
        filters: Some(filters),
        ..Default::default()
    };
    // Not adopted unless listed: a start that cannot list would record nothing, and the
    // application's built images would be lost to it for good.
    let labelled = docker
        .list_images(Some(opts))
        .await
        .context("listing this instance's labelled images, to adopt them")?;
    let adopted = earlier.len() + labelled.len();
    images.update(|s| {
        s.extend(earlier);
        s.extend(labelled.into_iter().map(|i| i.id));
        true
    });
    if images.is_new() {
        anyhow::bail!(
            "cannot write the record of the application's images ({}): see the warning above",
            crate::secrets::DOCKER_IMAGES
        );
    }
    match std::fs::remove_file(before) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            tracing::warn!(path = %before.display(), error = %e, "cannot remove the earlier record of the application's images (it is read no more)")
        }
    }
    if adopted > 0 {
        tracing::info!(
            images = adopted,
            "recorded the images labelled as this instance's, and those it pulled or imported, as its own (the first start that keeps a record of the images it builds)"
        );
    }
    Ok(())
}

/// The record of the instance's tags (see [`proxy::owned_tag`]) keeps those still on the image
/// they were made on. The first start that keeps it (a fresh volume, or one an earlier version
/// ran on, for which every tag of the instance's images was the application's) adopts every tag
/// of the instance's images, as that version judged.
fn keep_tags(list: &[bollard::models::ImageSummary], images: &Recorded, tags: &Recorded) {
    let present: BTreeSet<String> = list
        .iter()
        .filter(|i| images.contains(&i.id))
        .flat_map(|i| {
            i.repo_tags
                .iter()
                .chain(&i.repo_digests)
                .filter(|t| *t != "<none>:<none>" && *t != "<none>@<none>")
                .map(|t| proxy::owned_tag(t, &i.id))
        })
        .collect();
    if tags.is_new() {
        let adopted = present.len();
        tags.update(|s| {
            s.extend(present);
            true
        });
        if adopted > 0 {
            tracing::info!(
                tags = adopted,
                "recorded the tags of this instance's images as its own (the first start that keeps a record of them)"
            );
        }
    } else {
        tags.keep_only(|t| present.contains(t));
    }
}

/// While the bridge serves, each image the engine deletes (whoever asked) is forgotten as the
/// engine reports it (see [`forget_gone_images`]), and each container it destroys (removed on
/// the host, or at its end with `AutoRemove`: the record stays as small as what is there).
/// The events are asked for again from the last one seen if the stream ends (the engine keeps
/// the recent ones).
async fn forget_deleted(
    docker: bollard::Docker,
    images: Arc<Recorded>,
    containers: Arc<Recorded>,
    mut since: i64,
    shutdown: CancellationToken,
) {
    use bollard::models::EventMessageTypeEnum as Type;
    loop {
        let mut filters = std::collections::HashMap::new();
        filters.insert(
            "type".to_string(),
            vec!["image".to_string(), "container".to_string()],
        );
        filters.insert(
            "event".to_string(),
            vec!["delete".to_string(), "destroy".to_string()],
        );
        let opts = bollard::query_parameters::EventsOptions {
            since: Some(since.to_string()),
            until: None,
            filters: Some(filters),
        };
        let mut events = std::pin::pin!(docker.events(Some(opts)));
        loop {
            let event = tokio::select! {
                _ = shutdown.cancelled() => return,
                e = futures_util::StreamExt::next(&mut events) => e,
            };
            match event {
                Some(Ok(m)) => {
                    since = since.max(m.time.unwrap_or(since));
                    let record = match (m.typ, m.action.as_deref()) {
                        (Some(Type::IMAGE), Some("delete")) => &images,
                        (Some(Type::CONTAINER), Some("destroy")) => &containers,
                        _ => continue,
                    };
                    if let Some(id) = m.actor.and_then(|a| a.id) {
                        record.forget(&id);
                    }
                }
                Some(Err(_)) | None => break,
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

/// The containers labelled as this instance's: those it created, and any made from one of its
/// images (a label is inherited), which only the record of what it created tells apart.
async fn list_own(
    docker: &bollard::Docker,
    instance: &str,
    all: bool,
) -> Option<Vec<bollard::models::ContainerSummary>> {
    let mut filters = std::collections::HashMap::new();
    filters.insert(
        "label".to_string(),
        vec![format!("{INSTANCE_LABEL}={instance}")],
    );
    let opts = bollard::query_parameters::ListContainersOptions {
        all,
        filters: Some(filters),
        ..Default::default()
    };
    docker
        .list_containers(Some(opts))
        .await
        .inspect_err(|e| tracing::warn!(error = %e, "cannot list this instance's containers"))
        .ok()
}

/// Report this instance's running containers; remove those that exited more than `gc_after`
/// ago. Returns (running names, removed count).
async fn reconcile(
    docker: &bollard::Docker,
    instance: &str,
    containers: &Recorded,
    gc_after: Duration,
) -> (Vec<String>, usize) {
    let mut running = Vec::new();
    let mut removed = 0;
    let Some(labelled) = list_own(docker, instance, true).await else {
        return (running, removed);
    };
    let ids: BTreeSet<String> = labelled.iter().filter_map(|c| c.id.clone()).collect();
    if containers.is_new() {
        // The first start that keeps the record (a fresh volume, or one an earlier version of
        // regobox ran on, which judged by the label alone): what is labelled now is adopted, as
        // that version would have had it; from now on only what the socket creates.
        // (Written even empty: the record then exists.)
        containers.update(|s| {
            s.extend(ids.iter().cloned());
            true
        });
        if !ids.is_empty() {
            tracing::info!(
                containers = ids.len(),
                "recorded the containers labelled as this instance's as its own (the first start that keeps a record of them)"
            );
        }
    } else {
        // Gone since (removed on the host, or by the engine at their end): forgotten.
        containers.keep_only(|id| ids.contains(id));
    }
    for c in labelled {
        let id = c.id.clone().unwrap_or_default();
        if !containers.contains(&id) {
            // Labelled by inheritance (made on the host from one of the instance's images):
            // someone else's, left alone.
            continue;
        }
        let name = c
            .names
            .as_ref()
            .and_then(|n| n.first())
            .map(|n| n.trim_start_matches('/').to_string())
            .unwrap_or_else(|| id.chars().take(12).collect());
        use bollard::models::ContainerSummaryStateEnum as S;
        match c.state {
            Some(S::RUNNING) | Some(S::PAUSED) | Some(S::RESTARTING) => {
                tracing::info!(container = %name, image = c.image.as_deref().unwrap_or(""), status = c.status.as_deref().unwrap_or(""), "job still running from before");
                running.push(name);
            }
            Some(S::EXITED) | Some(S::DEAD) | Some(S::CREATED) if !gc_after.is_zero() => {
                let finished = match docker
                    .inspect_container(
                        &id,
                        None::<bollard::query_parameters::InspectContainerOptions>,
                    )
                    .await
                {
                    Ok(i) => i
                        .state
                        .and_then(|s| s.finished_at)
                        .and_then(|t| chrono::DateTime::parse_from_rfc3339(&t).ok())
                        .filter(|t| t.timestamp() > 0)
                        .or_else(|| {
                            c.created
                                .and_then(|t| chrono::DateTime::from_timestamp(t, 0))
                                .map(|t| t.fixed_offset())
                        }),
                    Err(_) => None,
                };
                let old = finished.is_some_and(|t| {
                    chrono::Utc::now()
                        .signed_duration_since(t)
                        .to_std()
                        .unwrap_or_default()
                        > gc_after
                });
                if old {
                    let opts = bollard::query_parameters::RemoveContainerOptions {
                        v: true,
                        force: false,
                        link: false,
                    };
                    match docker.remove_container(&id, Some(opts)).await {
                        Ok(()) => {
                            removed += 1;
                            tracing::info!(container = %name, "removed a job container that exited more than docker.gc_after ago");
                        }
                        Err(e) => {
                            tracing::warn!(container = %name, error = %e, "cannot remove an old job container")
                        }
                    }
                }
            }
            _ => {}
        }
    }
    (running, removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_container_id_from_mountinfo() {
        let id = "0123456789abcdef".repeat(4);
        let info = format!(
            "612 590 0:52 / / rw,relatime - overlay overlay rw\n\
             630 612 8:1 /var/lib/docker/containers/{id}/hostname /etc/hostname rw,relatime - ext4 /dev/sda1 rw\n"
        );
        assert_eq!(own_container_id(&info), Some(id));
        assert_eq!(
            own_container_id("22 1 8:1 / / rw - ext4 /dev/sda1 rw\n"),
            None
        );
    }
}

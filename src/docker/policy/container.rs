//! What a container the application creates may be: decisions on a decoded
//! [`ContainerCreate`], field by field, returning the body regobox forwards (built anew from the
//! fields it allows, never the request with things removed).

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};

use super::names;
use super::{Denied, INSTANCE_LABEL};
use crate::docker::model::{
    BindOptions, ContainerCreate, EndpointIpam, EndpointSettings, HostConfig, LogConfig, Mount,
    NetworkingConfig, RestartPolicy, TmpfsOptions, Ulimit,
};

/// What a container create is checked against.
#[derive(Debug, Clone, Default)]
pub struct CreatePolicy {
    /// Bind sources must lie under one of these (as the application names them).
    pub bind_roots: Vec<PathBuf>,
    /// (path as regobox sees it, path on the host): bind sources are translated with the longest
    /// matching prefix.
    pub host_paths: Vec<(PathBuf, PathBuf)>,
    /// The value of [`INSTANCE_LABEL`].
    pub instance: String,
    pub limits: Limits,
    /// Hard limits regobox itself runs with, by ulimit name: a job may not get more.
    pub ulimits: BTreeMap<String, i64>,
    /// `docker.policy.registries`: where pulls may come from.
    pub registries: Vec<String>,
}

/// `[docker.limits]`: ceilings (None: none).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    pub memory: Option<i64>,
    pub nano_cpus: Option<i64>,
    pub pids: Option<i64>,
    pub shm: Option<i64>,
}

/// A create the policy allows, before its references are resolved: the body to forward, and
/// what the proxy must resolve to full ids and judge as this instance's.
#[derive(Debug, Clone, PartialEq)]
pub struct CreatePlan {
    pub body: ContainerCreate,
    /// The image as the request named it.
    pub image: String,
    /// The user-defined networks it names (not `default`, `bridge`, `none`).
    pub networks: Vec<String>,
    /// Bind sources as the application named them, for the check on the file system.
    pub bind_sources: Vec<PathBuf>,
    /// Every path a bind, mount or tmpfs covers in the container (an image's `VOLUME` must be
    /// one of them, or the engine would make an anonymous volume).
    pub targets: Vec<String>,
}

impl CreatePlan {
    /// The first of an image's `VOLUME`s that no bind, mount or tmpfs of this create covers
    /// (the engine would make it an anonymous volume, outside the allowed roots).
    pub fn uncovered<'a>(
        &self,
        volumes: impl IntoIterator<Item = &'a String>,
    ) -> Option<&'a String> {
        volumes.into_iter().find(|v| {
            let v = Path::new(v.trim_end_matches('/'));
            !self.targets.iter().any(|t| Path::new(t) == v)
        })
    }

    /// The body with the image and networks replaced by the full ids they were resolved to, so
    /// that a name changing hands after the check cannot redirect the create.
    pub fn resolved(
        mut self,
        image_id: &str,
        networks: &BTreeMap<String, String>,
    ) -> ContainerCreate {
        self.body.image = Some(image_id.to_string());
        let host = self.body.host_config.get_or_insert_with(Default::default);
        if let Some(mode) = host.network_mode.as_mut() {
            if let Some(id) = networks.get(mode.as_str()) {
                *mode = id.clone();
            }
        }
        if let Some(endpoints) = self
            .body
            .networking_config
            .as_mut()
            .and_then(|n| n.endpoints_config.as_mut())
        {
            *endpoints = std::mem::take(endpoints)
                .into_iter()
                .map(|(name, settings)| (networks.get(&name).cloned().unwrap_or(name), settings))
                .collect();
        }
        self.body
    }
}

pub(crate) fn deny(field: &str, why: impl std::fmt::Display) -> Denied {
    Denied::new(
        field,
        format!("refused by regobox's Docker policy: {field} {why}"),
    )
}

/// Network modes anyone has; anything else but `host` and `container:` is a network's name.
pub(crate) fn is_default_network(name: &str) -> bool {
    matches!(name, "" | "default" | "bridge" | "none")
}

/// Check a container create and build the body to forward: bind sources translated to the host,
/// the instance label, the configured ceilings.
pub fn check_create(req: &ContainerCreate, policy: &CreatePolicy) -> Result<CreatePlan, Denied> {
    let image = req
        .image
        .clone()
        .filter(|i| !i.is_empty())
        .ok_or_else(|| deny("Image", "is missing: the create names no image"))?;
    if req.on_build.as_ref().is_some_and(|v| !v.is_empty()) {
        return Err(deny("OnBuild", "is for images, not containers"));
    }
    let empty = HostConfig::default();
    let hc = req.host_config.as_ref().unwrap_or(&empty);
    let (host, bind_sources, targets) = check_host_config(hc, policy)?;

    // Config.Volumes: the targets of the binds and mounts (docker-py names them there), never
    // an anonymous volume, which would live outside the allowed roots.
    for target in req.volumes.iter().flat_map(|v| v.keys()) {
        if !targets.contains(&clean_target(target)) {
            return Err(deny(
                "Volumes",
                format!(
                    "declares the anonymous volume {target:?} (only the targets of binds, mounts and tmpfs)"
                ),
            ));
        }
    }

    let mut networks = Vec::new();
    let mode = host.network_mode.clone().unwrap_or_default();
    if mode == "host" || mode.starts_with("container:") {
        return Err(deny(
            "HostConfig.NetworkMode",
            format!("= {mode:?} shares a namespace"),
        ));
    }
    if !is_default_network(&mode) {
        networks.push(mode.clone());
    }
    let networking_config = match &req.networking_config {
        None => None,
        Some(nc) => {
            let mut endpoints = BTreeMap::new();
            for (name, settings) in nc.endpoints_config.iter().flatten() {
                if name == "host" || name.starts_with("container:") || name.is_empty() {
                    return Err(deny(
                        "NetworkingConfig.EndpointsConfig",
                        format!("names the network {name:?}"),
                    ));
                }
                if !is_default_network(name) && !networks.contains(name) {
                    networks.push(name.clone());
                }
                let settings = match settings {
                    Some(s) => check_endpoint(s, "NetworkingConfig.EndpointsConfig")?,
                    None => EndpointSettings::default(),
                };
                endpoints.insert(name.clone(), Some(settings));
            }
            Some(NetworkingConfig {
                endpoints_config: (!endpoints.is_empty()).then_some(endpoints),
            })
        }
    };

    // An attacker's (twelfth session): a job given the MAC address of another container on
    // the default bridge took its traffic's address.
    if req.mac_address.as_deref().is_some_and(|m| !m.is_empty()) {
        return Err(deny(
            "MacAddress",
            "is the engine's to choose: a chosen one can be another container's on a shared network",
        ));
    }
    let mut labels = req.labels.clone().unwrap_or_default();
    super::check_labels("Labels", labels.keys())?;
    labels.insert(INSTANCE_LABEL.into(), policy.instance.clone());
    let body = ContainerCreate {
        hostname: names::host_name(req.hostname.as_deref())?,
        domainname: names::domain_name(req.domainname.as_deref())?,
        user: req.user.clone(),
        attach_stdin: req.attach_stdin,
        attach_stdout: req.attach_stdout,
        attach_stderr: req.attach_stderr,
        exposed_ports: req.exposed_ports.clone(),
        tty: req.tty,
        open_stdin: req.open_stdin,
        stdin_once: req.stdin_once,
        env: req.env.clone(),
        cmd: req.cmd.clone(),
        healthcheck: check_healthcheck(&req.healthcheck)?,
        args_escaped: req.args_escaped,
        image: Some(image.clone()),
        volumes: None,
        working_dir: req.working_dir.clone(),
        entrypoint: req.entrypoint.clone(),
        network_disabled: req.network_disabled,
        mac_address: None,
        on_build: None,
        labels: Some(labels),
        stop_signal: req.stop_signal.clone(),
        stop_timeout: match req.stop_timeout {
            // The engine's wait for a negative one has no end (see `query::MAX_STOP_WAIT`).
            Some(t) if !(0..=super::query::MAX_STOP_WAIT).contains(&t) => {
                return Err(deny(
                    "StopTimeout",
                    format!(
                        "= {t} is not a wait from 0 to {} seconds",
                        super::query::MAX_STOP_WAIT
                    ),
                ));
            }
            t => t,
        },
        shell: req.shell.clone(),
        host_config: Some(host),
        networking_config,
    };
    Ok(CreatePlan {
        body,
        image,
        networks,
        bind_sources,
        targets,
    })
}

fn must_be_empty<T>(field: &str, value: &Option<Vec<T>>, why: &str) -> Result<(), Denied> {
    if value.as_ref().is_some_and(|v| !v.is_empty()) {
        return Err(deny(field, why));
    }
    Ok(())
}

fn must_be_empty_map<T>(
    field: &str,
    value: &Option<BTreeMap<String, T>>,
    why: &str,
) -> Result<(), Denied> {
    if value.as_ref().is_some_and(|v| !v.is_empty()) {
        return Err(deny(field, why));
    }
    Ok(())
}

fn one_of(field: &str, value: &Option<String>, allowed: &[&str]) -> Result<Option<String>, Denied> {
    match value.as_deref() {
        None | Some("") => Ok(None),
        Some(v) if allowed.contains(&v) => Ok(Some(v.to_string())),
        Some(v) => Err(deny(
            field,
            format!("= {v:?} is not allowed (allowed: {})", allowed.join(", ")),
        )),
    }
}

/// A resource the request may lower under a configured ceiling, never lift: unset, 0 and -1
/// give the ceiling; more than the ceiling is refused.
fn bounded(
    field: &str,
    key: &str,
    asked: Option<i64>,
    ceiling: Option<i64>,
) -> Result<Option<i64>, Denied> {
    match (asked, ceiling) {
        (None | Some(0), c) => Ok(c),
        (Some(-1), Some(c)) => Ok(Some(c)),
        (Some(-1), None) => Ok(None),
        (Some(v), _) if v < 0 => Err(deny(field, format!("= {v} is not a limit"))),
        (Some(v), Some(c)) if v > c => Err(deny(
            field,
            format!("= {v} is above the ceiling docker.limits.{key} = {c}"),
        )),
        (Some(v), _) => Ok(Some(v)),
    }
}

/// The HostConfig to forward, the bind sources as named, and every mount target.
fn check_host_config(
    hc: &HostConfig,
    policy: &CreatePolicy,
) -> Result<(HostConfig, Vec<PathBuf>, Vec<String>), Denied> {
    let f = |name: &str| format!("HostConfig.{name}");
    // Fields that hand over the host, or have no use for a job: refused unless empty.
    if hc.privileged == Some(true) {
        return Err(deny(&f("Privileged"), "is not allowed"));
    }
    if hc.publish_all_ports == Some(true) {
        return Err(deny(&f("PublishAllPorts"), "publishes ports on the host"));
    }
    if hc.oom_kill_disable == Some(true) {
        return Err(deny(&f("OomKillDisable"), "is not allowed"));
    }
    must_be_empty(&f("CapAdd"), &hc.cap_add, "adds capabilities")?;
    must_be_empty(&f("Devices"), &hc.devices, "passes host devices")?;
    must_be_empty(
        &f("DeviceRequests"),
        &hc.device_requests,
        "requests host devices",
    )?;
    must_be_empty(
        &f("DeviceCgroupRules"),
        &hc.device_cgroup_rules,
        "opens device access",
    )?;
    must_be_empty(
        &f("VolumesFrom"),
        &hc.volumes_from,
        "mounts another container's volumes",
    )?;
    must_be_empty(&f("Links"), &hc.links, "links to other containers")?;
    for (name, v) in [
        ("BlkioWeightDevice", &hc.blkio_weight_device),
        ("BlkioDeviceReadBps", &hc.blkio_device_read_bps),
        ("BlkioDeviceWriteBps", &hc.blkio_device_write_bps),
        ("BlkioDeviceReadIOps", &hc.blkio_device_read_iops),
        ("BlkioDeviceWriteIOps", &hc.blkio_device_write_iops),
    ] {
        must_be_empty(&f(name), v, "names host devices")?;
    }
    must_be_empty_map(&f("Sysctls"), &hc.sysctls, "changes kernel parameters")?;
    must_be_empty_map(&f("StorageOpt"), &hc.storage_opt, "is not allowed")?;
    if hc.port_bindings.as_ref().is_some_and(|p| {
        p.values()
            .any(|b| b.as_ref().is_some_and(|b| !b.is_empty()))
    }) {
        return Err(deny(&f("PortBindings"), "publishes ports on the host"));
    }
    if hc.masked_paths.is_some() {
        return Err(deny(
            &f("MaskedPaths"),
            "replaces the engine's masked paths",
        ));
    }
    if hc.readonly_paths.is_some() {
        return Err(deny(
            &f("ReadonlyPaths"),
            "replaces the engine's read-only paths",
        ));
    }
    for (name, v) in [
        ("ContainerIDFile", &hc.container_id_file),
        ("VolumeDriver", &hc.volume_driver),
        ("Cgroup", &hc.cgroup),
        ("CgroupParent", &hc.cgroup_parent),
        ("PidMode", &hc.pid_mode),
        ("UTSMode", &hc.uts_mode),
        ("UsernsMode", &hc.userns_mode),
    ] {
        if v.as_deref().is_some_and(|s| !s.is_empty()) {
            return Err(deny(
                &f(name),
                format!("= {:?} is not allowed", v.as_deref().unwrap_or("")),
            ));
        }
    }
    let ipc_mode = one_of(
        &f("IpcMode"),
        &hc.ipc_mode,
        &["private", "shareable", "none"],
    )?;
    // Always private: the engine's default on a cgroup v1 host is the host's.
    one_of(&f("CgroupnsMode"), &hc.cgroupns_mode, &["private"])?;
    let cgroupns_mode = Some("private".to_string());
    let runtime = one_of(&f("Runtime"), &hc.runtime, &["runc"])?;
    let isolation = one_of(&f("Isolation"), &hc.isolation, &["default"])?;
    for (name, v) in [
        ("KernelMemory", hc.kernel_memory),
        ("KernelMemoryTCP", hc.kernel_memory_tcp),
        ("CpuRealtimePeriod", hc.cpu_realtime_period),
        ("CpuRealtimeRuntime", hc.cpu_realtime_runtime),
        ("CpuPeriod", hc.cpu_period),
        ("CpuQuota", hc.cpu_quota),
        ("CpuCount", hc.cpu_count),
        ("CpuPercent", hc.cpu_percent),
    ] {
        if v.is_some_and(|v| v != 0) {
            return Err(deny(&f(name), "is not allowed (CPU limits: NanoCpus)"));
        }
    }
    if hc.io_maximum_iops.is_some_and(|v| v != 0) || hc.io_maximum_bandwidth.is_some_and(|v| v != 0)
    {
        return Err(deny(&f("IOMaximumIOps"), "is not allowed"));
    }
    if let Some(opts) = &hc.security_opt {
        for opt in opts {
            if !matches!(
                opt.as_str(),
                "no-new-privileges" | "no-new-privileges:true" | "no-new-privileges=true"
            ) {
                return Err(deny(
                    &f("SecurityOpt"),
                    format!("{opt:?} is not allowed (only no-new-privileges)"),
                ));
            }
        }
    }
    if let Some(caps) = &hc.cap_drop {
        if let Some(c) = caps
            .iter()
            .find(|c| c.is_empty() || !c.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
        {
            return Err(deny(&f("CapDrop"), format!("{c:?} is not a capability")));
        }
    }
    if hc.oom_score_adj.is_some_and(|v| !(0..=1000).contains(&v)) {
        return Err(deny(
            &f("OomScoreAdj"),
            "must be between 0 and 1000 (below 0 protects the job from the OOM killer at the host's expense)",
        ));
    }
    if hc.cpu_shares.is_some_and(|v| !(0..=1024).contains(&v)) {
        return Err(deny(
            &f("CpuShares"),
            "must be between 0 and 1024 (the engine's default weight)",
        ));
    }
    if hc
        .memory_swappiness
        .is_some_and(|v| v != -1 && !(0..=100).contains(&v))
    {
        return Err(deny(&f("MemorySwappiness"), "must be between 0 and 100"));
    }
    if hc.memory_reservation.is_some_and(|v| v < 0) {
        return Err(deny(&f("MemoryReservation"), "must not be negative"));
    }
    let restart_policy = check_restart(&hc.restart_policy)?;
    let log_config = check_log_config(&hc.log_config)?;
    let ulimits = check_ulimits(&hc.ulimits, &policy.ulimits)?;

    let limits = &policy.limits;
    let memory = bounded(&f("Memory"), "memory", hc.memory, limits.memory)?;
    let nano_cpus = bounded(&f("NanoCpus"), "cpus", hc.nano_cpus, limits.nano_cpus)?;
    let pids_limit = bounded(&f("PidsLimit"), "pids", hc.pids_limit, limits.pids)?;
    let shm_size = bounded(&f("ShmSize"), "shm", hc.shm_size, limits.shm)?;
    let memory_swap = match hc.memory_swap {
        Some(-1) if limits.memory.is_some() => {
            return Err(deny(
                &f("MemorySwap"),
                "= -1 (unlimited swap) would lift docker.limits.memory",
            ));
        }
        Some(v) if v < -1 => return Err(deny(&f("MemorySwap"), format!("= {v} is not a limit"))),
        // Memory and swap together: under a memory ceiling, at most the engine's default (as
        // much swap as memory). A huge value was unlimited swap as -1 is (an attacker's,
        // thirty-second session).
        Some(v) if limits.memory.is_some() && memory.is_some_and(|m| v > m.saturating_mul(2)) => {
            return Err(deny(
                &f("MemorySwap"),
                format!(
                    "= {v} is above twice the job's memory ({}): swap beyond the engine's default would lift docker.limits.memory",
                    memory.unwrap_or_default()
                ),
            ));
        }
        other => other.filter(|v| *v != 0),
    };

    // Binds, mounts and tmpfs.
    let mut bind_sources = Vec::new();
    let mut targets = Vec::new();
    let mut binds = Vec::new();
    for text in hc.binds.iter().flatten() {
        let bind = Bind::parse(text)?;
        let host_source = check_source(&bind.source, policy, "HostConfig.Binds")?;
        bind_sources.push(PathBuf::from(&bind.source));
        targets.push(bind.target.clone());
        binds.push(bind.render(&host_source));
    }
    let mut mounts = Vec::new();
    for m in hc.mounts.iter().flatten() {
        let (mount, source) = check_mount(m, policy)?;
        if let Some(s) = source {
            bind_sources.push(s);
        }
        targets.push(mount.target.clone().unwrap_or_default());
        mounts.push(mount);
    }
    // Forwarded under the targets judged: the engine compares an image's `VOLUME` with a
    // tmpfs's target as written, so `/data/` covered `/data` here and not there, which made an
    // anonymous volume (an attacker's, thirty-second session).
    let mut tmpfs = BTreeMap::new();
    for (target, options) in hc.tmpfs.iter().flatten() {
        check_target(target, "HostConfig.Tmpfs")?;
        check_tmpfs_options(options)?;
        let target = clean_target(target);
        targets.push(target.clone());
        tmpfs.insert(target, options.clone());
    }
    // One mount a target: two spellings of one would be one for the engine, the other dropped.
    let mut seen = std::collections::BTreeSet::new();
    if let Some(twice) = targets.iter().find(|t| !seen.insert(t.as_str())) {
        return Err(deny(
            "HostConfig",
            format!(
                "mounts {twice:?} twice (Binds, Mounts and Tmpfs, once their paths are cleaned)"
            ),
        ));
    }

    let host = HostConfig {
        binds: (!binds.is_empty()).then_some(binds),
        log_config,
        network_mode: hc.network_mode.clone().filter(|m| !m.is_empty()),
        restart_policy,
        auto_remove: hc.auto_remove,
        cap_drop: hc.cap_drop.clone().filter(|c| !c.is_empty()),
        cgroupns_mode,
        dns: names::each(hc.dns.as_deref(), "HostConfig.Dns", names::dns_server)?,
        dns_options: names::each(
            hc.dns_options.as_deref(),
            "HostConfig.DnsOptions",
            names::dns_option,
        )?,
        dns_search: names::each(
            hc.dns_search.as_deref(),
            "HostConfig.DnsSearch",
            names::search_domain,
        )?,
        extra_hosts: names::each(
            hc.extra_hosts.as_deref(),
            "HostConfig.ExtraHosts",
            names::extra_host,
        )?,
        group_add: hc.group_add.clone(),
        ipc_mode,
        oom_score_adj: hc.oom_score_adj.filter(|v| *v != 0),
        readonly_rootfs: hc.readonly_rootfs,
        security_opt: hc.security_opt.clone().filter(|s| !s.is_empty()),
        tmpfs: (!tmpfs.is_empty()).then_some(tmpfs),
        shm_size,
        runtime,
        console_size: hc.console_size,
        isolation,
        cpu_shares: hc.cpu_shares.filter(|v| *v != 0),
        memory,
        nano_cpus,
        blkio_weight: hc.blkio_weight.filter(|v| *v != 0),
        cpuset_cpus: hc.cpuset_cpus.clone().filter(|s| !s.is_empty()),
        cpuset_mems: hc.cpuset_mems.clone().filter(|s| !s.is_empty()),
        memory_reservation: hc.memory_reservation.filter(|v| *v != 0),
        memory_swap,
        memory_swappiness: hc.memory_swappiness.filter(|v| *v != -1),
        pids_limit,
        ulimits,
        mounts: (!mounts.is_empty()).then_some(mounts),
        init: hc.init,
        ..HostConfig::default()
    };
    Ok((host, bind_sources, targets))
}

/// Only `no`: a restart the engine makes on its own is one regobox does not see, and bind
/// sources are checked again at every start regobox forwards.
fn check_restart(policy: &Option<RestartPolicy>) -> Result<Option<RestartPolicy>, Denied> {
    let Some(p) = policy else { return Ok(None) };
    match p.name.as_deref() {
        None | Some("") | Some("no") => Ok(None),
        Some(other) => Err(deny(
            "HostConfig.RestartPolicy",
            format!(
                "{other:?} is not allowed: the engine would restart the job without regobox checking its bind sources again (restart it through the socket)"
            ),
        )),
    }
}

/// The engine's own drivers, writing on the host's disk, with their size options.
fn check_log_config(config: &Option<LogConfig>) -> Result<Option<LogConfig>, Denied> {
    let Some(c) = config else { return Ok(None) };
    let kind = one_of(
        "HostConfig.LogConfig.Type",
        &c.kind,
        &["json-file", "local", "none"],
    )?;
    const OPTIONS: &[&str] = &[
        "max-size",
        "max-file",
        "compress",
        "mode",
        "max-buffer-size",
        "labels",
        "env",
        "env-regex",
        "tag",
    ];
    for key in c.config.iter().flat_map(|m| m.keys()) {
        if !OPTIONS.contains(&key.as_str()) {
            return Err(deny(
                "HostConfig.LogConfig.Config",
                format!(
                    "option {key:?} is not allowed (allowed: {})",
                    OPTIONS.join(", ")
                ),
            ));
        }
    }
    if kind.is_none() && c.config.as_ref().is_none_or(|m| m.is_empty()) {
        return Ok(None);
    }
    // The sizes on the host's disk: bounded, and forwarded as numbers (an attacker's, twelfth
    // session: `max-size = -1` lifted the engine's default rotation).
    let mut config = c.config.clone().filter(|m| !m.is_empty());
    if let Some(m) = config.as_mut() {
        for (key, max, what) in [
            ("max-size", LOG_MAX_SIZE, "e.g. 10m"),
            ("max-buffer-size", LOG_MAX_BUFFER, "the engine's memory"),
        ] {
            if let Some(v) = m.get_mut(key) {
                let bytes = log_size(v).filter(|b| (1..=max).contains(b));
                *v = bytes
                    .ok_or_else(|| {
                        deny(
                            &format!("HostConfig.LogConfig.Config.{key}"),
                            format!(
                                "{v:?} is not a size from 1 byte to {} MiB ({what})",
                                max >> 20
                            ),
                        )
                    })?
                    .to_string();
            }
        }
        // A template the engine runs for every line (an attacker's, twelfth session: `{{pad ..}}`
        // made 10 MB of log of 16 bytes, `{{.Hostname}}` printed the host's name): plain text.
        if let Some(v) = m.get("tag")
            && (v.contains("{{") || v.chars().any(char::is_control) || v.len() > 256)
        {
            return Err(deny(
                "HostConfig.LogConfig.Config.tag",
                format!("{v:?} is not a plain tag (no template, at most 256 bytes)"),
            ));
        }
        if let Some(v) = m.get_mut("max-file") {
            let files = v
                .parse::<u32>()
                .ok()
                .filter(|n| (1..=LOG_MAX_FILES).contains(n));
            *v = files
                .ok_or_else(|| {
                    deny(
                        "HostConfig.LogConfig.Config.max-file",
                        format!("{v:?} is not a number of files from 1 to {LOG_MAX_FILES}"),
                    )
                })?
                .to_string();
        }
    }
    Ok(Some(LogConfig { kind, config }))
}

/// The shortest interval between a job's health checks: a second, in nanoseconds.
const MIN_HEALTH_INTERVAL: i64 = 1_000_000_000;

/// A health check runs in the job but is started by the engine, outside the job's CPU limit
/// (an attacker's, twelfth session: every millisecond took 0.3 of a core of the engine's):
/// at most one a second.
fn check_healthcheck(
    check: &Option<crate::docker::model::Healthcheck>,
) -> Result<Option<crate::docker::model::Healthcheck>, Denied> {
    if let Some(interval) = check.as_ref().and_then(|c| c.interval)
        && interval != 0
        && interval < MIN_HEALTH_INTERVAL
    {
        return Err(deny(
            "Healthcheck.Interval",
            format!("{interval} ns: 0 (the image's) or at least one second"),
        ));
    }
    Ok(check.clone())
}

/// The health check the engine runs, the image's (`image_test`, `image_interval`) where the
/// create's leaves a part out, judged as merged (an attacker's, twelfth session:
/// `HEALTHCHECK --interval=1ms` imported or built into an image, then a create that gave none).
pub fn check_merged_healthcheck(
    own: Option<&crate::docker::model::Healthcheck>,
    image_test: Option<&[String]>,
    image_interval: Option<i64>,
) -> Result<(), Denied> {
    let test = own
        .and_then(|h| h.test.as_deref())
        .filter(|t| !t.is_empty())
        .or(image_test)
        .unwrap_or_default();
    let interval = own
        .and_then(|h| h.interval)
        .filter(|i| *i != 0)
        .or(image_interval)
        .unwrap_or(0);
    if test.first().is_some_and(|t| t != "NONE") && interval != 0 && interval < MIN_HEALTH_INTERVAL
    {
        return Err(deny(
            "Healthcheck.Interval",
            format!("{interval} ns: at least one second (give Healthcheck.Interval)"),
        ));
    }
    Ok(())
}

/// The largest log file a job may ask for, and how many it may keep.
const LOG_MAX_SIZE: u64 = 1 << 30;
const LOG_MAX_FILES: u32 = 10;
/// The most the engine may hold in memory for a job's log in `non-blocking` mode.
const LOG_MAX_BUFFER: u64 = 16 << 20;

/// A size as the engine's log drivers read it: digits, then an optional unit (k, m or g, with
/// or without b, any case), in bytes. None for anything else (a sign, a fraction, spaces).
fn log_size(text: &str) -> Option<u64> {
    let digits = text.bytes().take_while(u8::is_ascii_digit).count();
    let (number, unit) = text.split_at(digits);
    let number: u64 = number.parse().ok()?;
    let shift = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" => 10,
        "m" | "mb" => 20,
        "g" | "gb" => 30,
        _ => return None,
    };
    number.checked_mul(1 << shift)
}

/// Each limit named, soft at most hard, hard at most what regobox itself has.
fn check_ulimits(
    ulimits: &Option<Vec<Ulimit>>,
    own: &BTreeMap<String, i64>,
) -> Result<Option<Vec<Ulimit>>, Denied> {
    let Some(list) = ulimits.as_ref().filter(|l| !l.is_empty()) else {
        return Ok(None);
    };
    for u in list {
        let name = u.name.as_deref().unwrap_or("");
        let (soft, hard) = (u.soft.unwrap_or(0), u.hard.unwrap_or(0));
        let Some(&max) = own.get(name) else {
            return Err(deny(
                "HostConfig.Ulimits",
                format!("{name:?} is not a limit regobox knows"),
            ));
        };
        if soft < 0 || hard < 0 || soft > hard {
            return Err(deny(
                "HostConfig.Ulimits",
                format!("{name}: soft {soft} and hard {hard} are not a limit"),
            ));
        }
        if max >= 0 && hard > max {
            return Err(deny(
                "HostConfig.Ulimits",
                format!("{name}: hard {hard} is above regobox's own ({max})"),
            ));
        }
    }
    Ok(Some(list.clone()))
}

fn check_endpoint(s: &EndpointSettings, field: &str) -> Result<EndpointSettings, Denied> {
    must_be_empty(
        &format!("{field}.Links"),
        &s.links,
        "links to other containers",
    )?;
    must_be_empty_map(
        &format!("{field}.DriverOpts"),
        &s.driver_opts,
        "is not allowed",
    )?;
    let reported = [
        ("NetworkID", s.network_id.as_deref()),
        ("EndpointID", s.endpoint_id.as_deref()),
        ("Gateway", s.gateway.as_deref()),
        ("IPAddress", s.ip_address.as_deref()),
        ("IPv6Gateway", s.ipv6_gateway.as_deref()),
        ("GlobalIPv6Address", s.global_ipv6_address.as_deref()),
        ("MacAddress", s.mac_address.as_deref()),
    ];
    for (name, v) in reported {
        if v.is_some_and(|v| !v.is_empty()) {
            return Err(deny(
                &format!("{field}.{name}"),
                "is reported by the engine, not set",
            ));
        }
    }
    must_be_empty(
        &format!("{field}.DNSNames"),
        &s.dns_names,
        "is reported by the engine, not set",
    )?;
    if s.gw_priority.is_some_and(|v| v != 0) {
        return Err(deny(
            &format!("{field}.GwPriority"),
            "is not supported by this engine",
        ));
    }
    if s.ip_prefix_len.is_some_and(|v| v != 0) || s.global_ipv6_prefix_len.is_some_and(|v| v != 0) {
        return Err(deny(
            &format!("{field}.IPPrefixLen"),
            "is reported by the engine, not set",
        ));
    }
    // Read as what they name, and written back as regobox writes them.
    let aliases = names::each(
        s.aliases.as_deref(),
        &format!("{field}.Aliases"),
        names::alias,
    )?;
    let ipam_config = match &s.ipam_config {
        None => None,
        Some(ipam) => {
            let address = |v: &Option<String>, name: &str, v6: bool| match v
                .as_deref()
                .filter(|a| !a.is_empty())
            {
                None => Ok(None),
                Some(a) => match a.parse::<std::net::IpAddr>() {
                    Ok(ip) if ip.is_ipv6() == v6 => Ok(Some(ip.to_string())),
                    _ => Err(deny(
                        &format!("{field}.IPAMConfig.{name}"),
                        format!("{a:?} is not an IPv{} address", if v6 { 6 } else { 4 }),
                    )),
                },
            };
            Some(EndpointIpam {
                ipv4_address: address(&ipam.ipv4_address, "IPv4Address", false)?,
                ipv6_address: address(&ipam.ipv6_address, "IPv6Address", true)?,
                link_local_ips: names::each(
                    ipam.link_local_ips.as_deref(),
                    &format!("{field}.IPAMConfig.LinkLocalIPs"),
                    names::link_local,
                )?,
            })
        }
    };
    Ok(EndpointSettings {
        ipam_config,
        aliases,
        ..Default::default()
    })
}

/// A network connect's endpoint settings (the same rules as at create).
pub fn check_endpoint_config(s: &EndpointSettings) -> Result<EndpointSettings, Denied> {
    check_endpoint(s, "EndpointConfig")
}

/// `source:target[:options]`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Bind {
    source: String,
    target: String,
    read_only: bool,
    propagation: Option<String>,
}

impl Bind {
    fn parse(text: &str) -> Result<Bind, Denied> {
        let field = "HostConfig.Binds";
        let parts: Vec<&str> = text.split(':').collect();
        let (source, target, options) = match parts.as_slice() {
            [s, t] => (*s, *t, ""),
            [s, t, o] => (*s, *t, *o),
            _ => {
                return Err(deny(
                    field,
                    format!("{text:?} is not source:target[:options]"),
                ));
            }
        };
        check_target(target, field)?;
        let mut bind = Bind {
            source: source.to_string(),
            target: clean_target(target),
            read_only: false,
            propagation: None,
        };
        let mut mode_set = false;
        for opt in options.split(',').filter(|o| !o.is_empty()) {
            match opt {
                "ro" | "rw" if !mode_set => {
                    mode_set = true;
                    bind.read_only = opt == "ro";
                }
                "private" | "rprivate" if bind.propagation.is_none() => {
                    bind.propagation = Some(opt.to_string());
                }
                _ => {
                    return Err(deny(
                        field,
                        format!(
                            "option {opt:?} of {text:?} is not allowed (ro, rw, private, rprivate)"
                        ),
                    ));
                }
            }
        }
        Ok(bind)
    }

    fn render(&self, host_source: &str) -> String {
        let mut options = Vec::new();
        if self.read_only {
            options.push("ro");
        }
        if let Some(p) = &self.propagation {
            options.push(p);
        }
        if options.is_empty() {
            format!("{host_source}:{}", self.target)
        } else {
            format!("{host_source}:{}:{}", self.target, options.join(","))
        }
    }
}

/// A path inside the container: absolute, no `..`, nothing the engine's bind syntax splits on.
fn check_target(target: &str, field: &str) -> Result<(), Denied> {
    let path = Path::new(target);
    if !path.is_absolute()
        || target.contains([':', ',', '\0', '\n'])
        || target.split('/').any(|s| s == "..")
    {
        return Err(deny(
            field,
            format!("target {target:?} is not an absolute path without `..`"),
        ));
    }
    Ok(())
}

fn clean_target(target: &str) -> String {
    Path::new(target)
        .components()
        .filter(|c| !matches!(c, Component::CurDir))
        .collect::<PathBuf>()
        .display()
        .to_string()
}

/// A tmpfs's options (`HostConfig.Tmpfs`, comma-separated, as `mount -o` takes them): an
/// allow-list of those that shape the tmpfs itself. Refused are the rest: `bind`/`rbind` (runc
/// makes such a "tmpfs" a bind mount), propagation, `suid` and `dev` (the engine's defaults,
/// `nosuid` and `nodev`, lifted), and anything unknown.
fn check_tmpfs_options(options: &str) -> Result<(), Denied> {
    const FLAGS: &[&str] = &[
        "ro",
        "rw",
        "exec",
        "noexec",
        "nosuid",
        "nodev",
        "atime",
        "noatime",
        "relatime",
        "norelatime",
        "strictatime",
        "nostrictatime",
        "diratime",
        "nodiratime",
        "tmpcopyup",
        "notmpcopyup",
    ];
    const VALUES: &[&str] = &["size", "mode", "nr_inodes", "uid", "gid"];
    for option in options.split(',').filter(|o| !o.is_empty()) {
        let allowed = match option.split_once('=') {
            Some((key, value)) => {
                VALUES.contains(&key)
                    && !value.is_empty()
                    && value.bytes().all(|b| b.is_ascii_alphanumeric())
            }
            None => FLAGS.contains(&option),
        };
        if !allowed {
            return Err(deny(
                "HostConfig.Tmpfs",
                format!(
                    "the option {option:?} is not allowed (allowed: {}, and {} with a value)",
                    FLAGS.join(", "),
                    VALUES.join(", ")
                ),
            ));
        }
    }
    Ok(())
}

/// A mount: a bind under the roots (private propagation) or a tmpfs; the bind's source as named.
fn check_mount(m: &Mount, policy: &CreatePolicy) -> Result<(Mount, Option<PathBuf>), Denied> {
    let field = "HostConfig.Mounts";
    let target = m.target.as_deref().unwrap_or("");
    check_target(target, field)?;
    if m.consistency
        .as_deref()
        .is_some_and(|c| !c.is_empty() && c != "default")
    {
        return Err(deny(field, "Consistency is not allowed"));
    }
    if m.volume_options.as_ref().is_some_and(|v| !v.is_null()) {
        return Err(deny(
            field,
            "VolumeOptions is not allowed (bind or tmpfs only)",
        ));
    }
    match m.kind.as_deref() {
        Some("bind") => {
            if m.tmpfs_options.is_some() {
                return Err(deny(field, "a bind has no TmpfsOptions"));
            }
            let source = m.source.as_deref().unwrap_or("");
            let host = check_source(source, policy, field)?;
            let bind_options = match &m.bind_options {
                None => None,
                Some(o) => {
                    let propagation = one_of(
                        &format!("{field}.BindOptions.Propagation"),
                        &o.propagation,
                        &["private", "rprivate"],
                    )?;
                    Some(BindOptions {
                        propagation,
                        non_recursive: o.non_recursive,
                    })
                }
            };
            Ok((
                Mount {
                    kind: Some("bind".into()),
                    source: Some(host),
                    target: Some(clean_target(target)),
                    read_only: m.read_only,
                    bind_options,
                    ..Default::default()
                },
                Some(PathBuf::from(source)),
            ))
        }
        Some("tmpfs") => {
            if m.source.as_deref().is_some_and(|s| !s.is_empty()) || m.bind_options.is_some() {
                return Err(deny(field, "a tmpfs has no Source or BindOptions"));
            }
            Ok((
                Mount {
                    kind: Some("tmpfs".into()),
                    target: Some(clean_target(target)),
                    read_only: m.read_only,
                    tmpfs_options: m.tmpfs_options.as_ref().map(|o| TmpfsOptions {
                        size_bytes: o.size_bytes,
                        mode: o.mode,
                    }),
                    ..Default::default()
                },
                None,
            ))
        }
        other => Err(deny(
            field,
            format!(
                "type {:?} is not allowed (bind under the allowed roots, or tmpfs)",
                other.unwrap_or("")
            ),
        )),
    }
}

/// A bind source must be an absolute path without `.` or `..`, not the Docker socket, under a
/// bind root; it is returned translated to the host.
pub(crate) fn check_source(
    source: &str,
    policy: &CreatePolicy,
    field: &str,
) -> Result<String, Denied> {
    let bad = |why: String| deny(field, format!("source {source:?} {why}"));
    let path = Path::new(source);
    if !path.is_absolute() {
        return Err(bad(
            "is not an absolute path (named volumes are not allowed)".into(),
        ));
    }
    if source.contains([':', ',', '\0', '\n'])
        || source
            .split('/')
            .skip(1)
            .any(|s| s.is_empty() || s == "." || s == "..")
    {
        return Err(bad(
            "contains `.`, `..`, `//` or a character of the bind syntax".into(),
        ));
    }
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    if name.ends_with("docker.sock") || name == "containerd.sock" || source == "/" {
        return Err(bad(
            "is the Docker socket or the root of the filesystem".into()
        ));
    }
    if !policy.bind_roots.iter().any(|root| path.starts_with(root)) {
        let roots: Vec<String> = policy
            .bind_roots
            .iter()
            .map(|r| r.display().to_string())
            .collect();
        return Err(bad(format!(
            "is outside the allowed roots ({})",
            roots.join(", ")
        )));
    }
    Ok(to_host(path, &policy.host_paths).display().to_string())
}

/// A path as regobox sees it -> the host's, by the longest matching prefix.
pub(crate) fn to_host(path: &Path, host_paths: &[(PathBuf, PathBuf)]) -> PathBuf {
    translate(path, host_paths.iter().map(|(a, b)| (a, b)))
}

/// A host path -> as regobox sees it (the inverse of [`to_host`]).
pub(crate) fn from_host(path: &Path, host_paths: &[(PathBuf, PathBuf)]) -> PathBuf {
    translate(path, host_paths.iter().map(|(a, b)| (b, a)))
}

fn translate<'a>(path: &Path, pairs: impl Iterator<Item = (&'a PathBuf, &'a PathBuf)>) -> PathBuf {
    let best = pairs
        .filter(|(from, _)| path.starts_with(from))
        .max_by_key(|(from, _)| from.components().count());
    match best {
        Some((from, to)) => to.join(path.strip_prefix(from).unwrap_or(Path::new(""))),
        None => path.to_path_buf(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::docker::model::decode;

    fn policy() -> CreatePolicy {
        CreatePolicy {
            bind_roots: vec![PathBuf::from("/volumes/files")],
            host_paths: vec![
                (PathBuf::from("/volumes"), PathBuf::from("/srv/regobox")),
                (
                    PathBuf::from("/volumes/files"),
                    PathBuf::from("/mnt/big/files"),
                ),
            ],
            instance: "i1".into(),
            limits: Limits {
                memory: Some(1 << 30),
                nano_cpus: None,
                pids: Some(512),
                shm: None,
            },
            ulimits: [("nofile".to_string(), 4096)].into_iter().collect(),
            registries: vec!["docker.io".into()],
        }
    }

    fn check(body: &str) -> Result<CreatePlan, Denied> {
        let req: ContainerCreate = decode(body.as_bytes(), "container create")
            .map_err(|e| Denied::new(e.field, e.message))?;
        check_create(&req, &policy())
    }

    #[test]
    fn dangerous_create_fields_are_refused_by_name() {
        let hc = |inner: &str| format!(r#"{{"Image":"busybox","HostConfig":{{{inner}}}}}"#);
        for (body, field) in [
            (hc(r#""Privileged":true"#), "HostConfig.Privileged"),
            (r#"{"Image":"busybox","StopTimeout":-1}"#.into(), "StopTimeout"),
            (r#"{"Image":"busybox","StopTimeout":100000}"#.into(), "StopTimeout"),
            (
                r#"{"Image":"busybox","Labels":{"com.docker.compose.project":"srv"}}"#.into(),
                "Labels",
            ),
            (hc(r#""CapAdd":["SYS_ADMIN"]"#), "HostConfig.CapAdd"),
            (hc(r#""Devices":[{"PathOnHost":"/dev/sda"}]"#), "HostConfig.Devices"),
            (hc(r#""PidMode":"host""#), "HostConfig.PidMode"),
            (hc(r#""PidMode":"container:x""#), "HostConfig.PidMode"),
            (hc(r#""IpcMode":"host""#), "HostConfig.IpcMode"),
            (hc(r#""NetworkMode":"host""#), "HostConfig.NetworkMode"),
            (hc(r#""NetworkMode":"container:other""#), "HostConfig.NetworkMode"),
            (hc(r#""UTSMode":"host""#), "HostConfig.UTSMode"),
            (hc(r#""UsernsMode":"host""#), "HostConfig.UsernsMode"),
            (hc(r#""CgroupnsMode":"host""#), "HostConfig.CgroupnsMode"),
            (hc(r#""SecurityOpt":["seccomp=unconfined"]"#), "HostConfig.SecurityOpt"),
            (hc(r#""SecurityOpt":["seccomp={\"defaultAction\":\"SCMP_ACT_ALLOW\"}"]"#), "HostConfig.SecurityOpt"),
            (hc(r#""SecurityOpt":["apparmor:unconfined"]"#), "HostConfig.SecurityOpt"),
            (hc(r#""SecurityOpt":["label:disable"]"#), "HostConfig.SecurityOpt"),
            (hc(r#""Binds":["/var/run/docker.sock:/var/run/docker.sock"]"#), "HostConfig.Binds"),
            (hc(r#""Binds":["/:/host"]"#), "HostConfig.Binds"),
            (hc(r#""Binds":["/etc:/x"]"#), "HostConfig.Binds"),
            (hc(r#""Binds":["/volumes/files/../secrets:/x"]"#), "HostConfig.Binds"),
            (hc(r#""Binds":["/volumes/files/./x:/x"]"#), "HostConfig.Binds"),
            (hc(r#""Binds":["named:/x"]"#), "HostConfig.Binds"),
            (hc(r#""Binds":["/volumes/files/a:/x:shared"]"#), "HostConfig.Binds"),
            (hc(r#""Binds":["/volumes/files/a:/x:z"]"#), "HostConfig.Binds"),
            (hc(r#""Binds":["/volumes/files/a:/x:ro:extra"]"#), "HostConfig.Binds"),
            (hc(r#""Binds":["/volumes/files/a:relative"]"#), "HostConfig.Binds"),
            (hc(r#""Mounts":[{"Type":"bind","Source":"/etc","Target":"/x"}]"#), "HostConfig.Mounts"),
            (hc(r#""Mounts":[{"Type":"volume","Source":"v","Target":"/x"}]"#), "HostConfig.Mounts"),
            (hc(r#""Mounts":[{"Type":"npipe","Source":"v","Target":"/x"}]"#), "HostConfig.Mounts"),
            (hc(r#""Mounts":[{"Type":"bind","Source":"/volumes/files/a","Target":"/x","BindOptions":{"Propagation":"rshared"}}]"#), "HostConfig.Mounts.BindOptions.Propagation"),
            (hc(r#""VolumesFrom":["other"]"#), "HostConfig.VolumesFrom"),
            (hc(r#""CgroupParent":"/""#), "HostConfig.CgroupParent"),
            (hc(r#""MaskedPaths":[]"#), "HostConfig.MaskedPaths"),
            (hc(r#""ReadonlyPaths":[]"#), "HostConfig.ReadonlyPaths"),
            (hc(r#""Sysctls":{"kernel.core_pattern":"|/x"}"#), "HostConfig.Sysctls"),
            (hc(r#""Links":["other:db"]"#), "HostConfig.Links"),
            (hc(r#""LogConfig":{"Type":"syslog","Config":{"syslog-address":"udp://10.0.0.1:514"}}"#), "HostConfig.LogConfig.Type"),
            (hc(r#""LogConfig":{"Type":"json-file","Config":{"fluentd-address":"x"}}"#), "HostConfig.LogConfig.Config"),
            (hc(r#""Runtime":"kata""#), "HostConfig.Runtime"),
            (hc(r#""Tmpfs":{"/t":"rbind,rshared,dev,suid,exec"}"#), "HostConfig.Tmpfs"),
            (hc(r#""Tmpfs":{"/t":"bind"}"#), "HostConfig.Tmpfs"),
            (hc(r#""Tmpfs":{"/t":"size=1m,suid"}"#), "HostConfig.Tmpfs"),
            (hc(r#""Tmpfs":{"/t":"dev"}"#), "HostConfig.Tmpfs"),
            (hc(r#""Tmpfs":{"/t":"mode=1777,context=x"}"#), "HostConfig.Tmpfs"),
            (hc(r#""Tmpfs":{"/t":"size=1m\nx"}"#), "HostConfig.Tmpfs"),
            (hc(r#""OomScoreAdj":-1000"#), "HostConfig.OomScoreAdj"),
            (hc(r#""Ulimits":[{"Name":"nofile","Soft":1,"Hard":1048576}]"#), "HostConfig.Ulimits"),
            (hc(r#""Ulimits":[{"Name":"rtprio","Soft":1,"Hard":1}]"#), "HostConfig.Ulimits"),
            (hc(r#""PortBindings":{"80/tcp":[{"HostPort":"80"}]}"#), "HostConfig.PortBindings"),
            (hc(r#""PublishAllPorts":true"#), "HostConfig.PublishAllPorts"),
            (hc(r#""RestartPolicy":{"Name":"always"}"#), "HostConfig.RestartPolicy"),
            (hc(r#""RestartPolicy":{"Name":"on-failure","MaximumRetryCount":3}"#), "HostConfig.RestartPolicy"),
            (hc(r#""Memory":2147483648"#), "HostConfig.Memory"),
            (hc(r#""PidsLimit":100000"#), "HostConfig.PidsLimit"),
            (hc(r#""MemorySwap":-1"#), "HostConfig.MemorySwap"),
            // An attacker's (thirty-second session): unlimited swap by another name.
            (hc(r#""MemorySwap":4611686018427387904"#), "HostConfig.MemorySwap"),
            (hc(r#""Memory":1048576,"MemorySwap":2097153"#), "HostConfig.MemorySwap"),
            (hc(r#""CpuQuota":100000"#), "HostConfig.CpuQuota"),
            (hc(r#""KernelMemory":1"#), "HostConfig.KernelMemory"),
            (hc(r#""DeviceCgroupRules":["a *:* rwm"]"#), "HostConfig.DeviceCgroupRules"),
            (hc(r#""Tmpfs":{"relative":""}"#), "HostConfig.Tmpfs"),
            // An attacker's (thirty-second session): one target, two spellings.
            (hc(r#""Tmpfs":{"/data":"","/data/":"size=1m"}"#), "HostConfig"),
            (hc(r#""Binds":["/volumes/files/a:/data/"],"Tmpfs":{"//data":""}"#), "HostConfig"),
            (hc(r#""Mounts":[{"Type":"tmpfs","Target":"/data/."}],"Tmpfs":{"/data":""}"#), "HostConfig"),
            (r#"{"Image":"busybox","Volumes":{"/data":{}}}"#.to_string(), "Volumes"),
            (r#"{"HostConfig":{}}"#.to_string(), "Image"),
            (r#"{"Image":"busybox","HostConfig":{"NetworkMode":"bridge"},"NetworkingConfig":{"EndpointsConfig":{"n":{"Links":["x:y"]}}}}"#.to_string(), "NetworkingConfig.EndpointsConfig.Links"),
            (r#"{"Image":"busybox","OnBuild":["RUN x"]}"#.to_string(), "OnBuild"),
            // An attacker's (twelfth session).
            (r#"{"Image":"busybox","MacAddress":"02:42:ac:11:00:02"}"#.to_string(), "MacAddress"),
            (format!(r#"{{"Image":"busybox","Domainname":"x.{}-b.com"}}"#, "a".repeat(60)), "Domainname"),
            (r#"{"Image":"busybox","NetworkingConfig":{"EndpointsConfig":{"n":{"Aliases":["a\nb"]}}}}"#.to_string(), "NetworkingConfig.EndpointsConfig.Aliases"),
            (r#"{"Image":"busybox","NetworkingConfig":{"EndpointsConfig":{"n":{"IPAMConfig":{"IPv4Address":"x\ny"}}}}}"#.to_string(), "NetworkingConfig.EndpointsConfig.IPAMConfig.IPv4Address"),
            (r#"{"Image":"busybox","NetworkingConfig":{"EndpointsConfig":{"n":{"IPAMConfig":{"IPv4Address":"fe80::1"}}}}}"#.to_string(), "NetworkingConfig.EndpointsConfig.IPAMConfig.IPv4Address"),
            (r#"{"Image":"busybox","NetworkingConfig":{"EndpointsConfig":{"n":{"IPAMConfig":{"LinkLocalIPs":["169.254.0.1 x"]}}}}}"#.to_string(), "NetworkingConfig.EndpointsConfig.IPAMConfig.LinkLocalIPs"),
            (hc(r#""LogConfig":{"Type":"json-file","Config":{"max-size":"-1"}}"#), "HostConfig.LogConfig.Config.max-size"),
            (hc(r#""LogConfig":{"Type":"local","Config":{"max-size":"100g"}}"#), "HostConfig.LogConfig.Config.max-size"),
            (hc(r#""LogConfig":{"Type":"json-file","Config":{"max-size":"1.5m"}}"#), "HostConfig.LogConfig.Config.max-size"),
            (hc(r#""LogConfig":{"Type":"json-file","Config":{"max-file":"1000000"}}"#), "HostConfig.LogConfig.Config.max-file"),
            (hc(r#""LogConfig":{"Type":"json-file","Config":{"max-file":"0"}}"#), "HostConfig.LogConfig.Config.max-file"),
            (hc(r#""LogConfig":{"Type":"json-file","Config":{"tag":"{{pad \"x\" 0 5000000}}"}}"#), "HostConfig.LogConfig.Config.tag"),
            (hc(r#""LogConfig":{"Type":"json-file","Config":{"mode":"non-blocking","max-buffer-size":"100g"}}"#), "HostConfig.LogConfig.Config.max-buffer-size"),
            (r#"{"Image":"busybox","Healthcheck":{"Test":["CMD","true"],"Interval":1000000}}"#.to_string(), "Healthcheck.Interval"),
            (r#"{"Image":"busybox","NetworkingConfig":{"EndpointsConfig":{"n":{"IPAMConfig":{"LinkLocalIPs":["172.17.0.2"]}}}}}"#.to_string(), "NetworkingConfig.EndpointsConfig.IPAMConfig.LinkLocalIPs"),
            (r#"{"Image":"busybox","Healthcheck":{"Test":["CMD","true"],"Interval":-5}}"#.to_string(), "Healthcheck.Interval"),
        ] {
            let d = check(&body).unwrap_err();
            assert_eq!(d.rule, field, "{body}: {}", d.message);
            assert!(d.message.contains(field), "{}", d.message);
        }
    }

    #[test]
    fn a_health_check_is_judged_merged_with_the_images() {
        use crate::docker::model::Healthcheck;
        let test = ["CMD".to_string(), "true".to_string()];
        let none = ["NONE".to_string()];
        let every = |interval| Healthcheck {
            interval: Some(interval),
            ..Default::default()
        };
        assert!(check_merged_healthcheck(None, Some(&test), Some(1_000_000)).is_err());
        assert!(check_merged_healthcheck(Some(&every(0)), Some(&test), Some(1_000_000)).is_err());
        assert!(
            check_merged_healthcheck(Some(&every(2_000_000_000)), Some(&test), Some(1_000_000))
                .is_ok()
        );
        assert!(check_merged_healthcheck(None, Some(&none), Some(1_000_000)).is_ok());
        assert!(check_merged_healthcheck(None, Some(&test), None).is_ok());
        assert!(check_merged_healthcheck(None, None, Some(1_000_000)).is_ok());
    }

    #[test]
    fn log_sizes_and_endpoint_addresses_are_forwarded_as_regobox_writes_them() {
        let plan = check(
            r#"{"Image":"busybox","HostConfig":{"LogConfig":{"Type":"json-file","Config":{"max-size":"10M","max-file":"3"}}},
                "NetworkingConfig":{"EndpointsConfig":{"jobs":{"Aliases":["db."],"IPAMConfig":{"IPv4Address":"172.30.0.5","IPv6Address":"FE80::1"}}}}}"#,
        )
        .unwrap();
        let out = serde_json::to_value(&plan.body).unwrap();
        assert_eq!(
            out["HostConfig"]["LogConfig"]["Config"],
            serde_json::json!({"max-size": "10485760", "max-file": "3"})
        );
        assert_eq!(
            out["NetworkingConfig"]["EndpointsConfig"]["jobs"],
            serde_json::json!({"Aliases": ["db"], "IPAMConfig": {"IPv4Address": "172.30.0.5", "IPv6Address": "fe80::1"}})
        );
        assert_eq!(log_size("1g"), Some(1 << 30));
        for bad in ["", "-1", "1.5m", "10 m", "10t", "m"] {
            assert_eq!(log_size(bad), None, "{bad:?}");
        }
    }

    /// The engine compares an image's `VOLUME` with mount targets as it is given them (a
    /// tmpfs's exactly): each target goes out as the policy judged it, cleaned, so that what
    /// covers a `VOLUME` here covers it there (an attacker's, thirty-second session: `/data/`
    /// made an anonymous volume).
    /// Memory and swap together: up to twice the job's memory (the engine's default) under a
    /// memory ceiling, forwarded as asked.
    #[test]
    fn swap_up_to_the_engines_default_passes() {
        for (asked, memory) in [
            (r#""Memory":1048576,"MemorySwap":2097152"#, 1_048_576i64),
            (r#""MemorySwap":2147483648"#, 1 << 30),
        ] {
            let plan = check(&format!(
                r#"{{"Image":"busybox","HostConfig":{{{asked}}}}}"#
            ))
            .unwrap();
            let host = plan.body.host_config.unwrap();
            assert_eq!(
                (host.memory, host.memory_swap),
                (Some(memory), Some(2 * memory))
            );
        }
    }

    #[test]
    fn targets_are_forwarded_as_judged() {
        let plan = check(
            r#"{"Image":"busybox","HostConfig":{"Binds":["/volumes/files/a://in/./"],
                "Mounts":[{"Type":"tmpfs","Target":"/m/"},
                          {"Type":"bind","Source":"/volumes/files/b","Target":"/b//c/."}],
                "Tmpfs":{"/data/":"size=1m","//t/.":""}}}"#,
        )
        .unwrap();
        let volumes = ["/data".to_string(), "/t".to_string(), "/in".to_string()];
        assert_eq!(plan.uncovered(&volumes), None);
        let out = serde_json::to_value(plan.resolved("sha256:abc", &BTreeMap::new())).unwrap();
        let host = &out["HostConfig"];
        assert_eq!(host["Binds"][0], "/mnt/big/files/a:/in");
        assert_eq!(host["Mounts"][0]["Target"], "/m");
        assert_eq!(host["Mounts"][1]["Target"], "/b/c");
        assert_eq!(
            host["Tmpfs"],
            serde_json::json!({"/data": "size=1m", "/t": ""})
        );
    }

    #[test]
    fn an_allowed_create_is_rebuilt_translated_labelled_and_limited() {
        let plan = check(
            r#"{"Image":"busybox","Labels":{"app":"pipeline","regobox.instance":"forged"},
                "Volumes":{"/data":{},"/ref":{}},
                "HostConfig":{"Binds":["/volumes/files/job-42:/data:rw"],
                  "Mounts":[{"Type":"bind","Source":"/volumes/files/ref","Target":"/ref","ReadOnly":true},
                            {"Type":"tmpfs","Target":"/tmp"}],
                  "Tmpfs":{"/scratch":"size=64m,mode=1777,noexec,nosuid,nodev","/run":""},
                  "Memory":0,"PidsLimit":64,"Privileged":false,"CapAdd":null,"MaskedPaths":null,
                  "NetworkMode":"jobs","RestartPolicy":{"Name":"no","MaximumRetryCount":0},
                  "LogConfig":{"Type":"","Config":{}},"PortBindings":{}},
                "NetworkingConfig":{"EndpointsConfig":{"jobs":{"Aliases":["a"],"NetworkID":""}}}}"#,
        )
        .unwrap();
        assert_eq!(plan.image, "busybox");
        assert_eq!(plan.networks, vec!["jobs".to_string()]);
        assert_eq!(
            plan.bind_sources,
            vec![
                PathBuf::from("/volumes/files/job-42"),
                PathBuf::from("/volumes/files/ref")
            ]
        );
        let ids: BTreeMap<String, String> =
            [("jobs".to_string(), "f".repeat(64))].into_iter().collect();
        let volumes = ["/data/".to_string(), "/elsewhere".to_string()];
        assert_eq!(
            plan.uncovered(&volumes),
            Some(&volumes[1]),
            "/data is a bind's target"
        );
        let body = plan.resolved("sha256:abc", &ids);
        let out = serde_json::to_value(&body).unwrap();
        let host = &out["HostConfig"];
        assert_eq!(
            host["Binds"][0], "/mnt/big/files/job-42:/data",
            "the longest prefix wins"
        );
        assert_eq!(host["Mounts"][0]["Source"], "/mnt/big/files/ref");
        assert_eq!(
            host["Tmpfs"]["/scratch"],
            "size=64m,mode=1777,noexec,nosuid,nodev"
        );
        assert_eq!(host["Memory"], 1 << 30, "the ceiling fills an unset limit");
        assert_eq!(host["PidsLimit"], 64, "a lower limit is kept");
        assert_eq!(host["NetworkMode"], "f".repeat(64));
        assert_eq!(out["Image"], "sha256:abc");
        assert_eq!(out["Labels"][INSTANCE_LABEL], "i1");
        assert_eq!(out["Labels"]["app"], "pipeline");
        assert!(out.get("Volumes").is_none(), "bind targets need no volume");
        assert_eq!(
            out["NetworkingConfig"]["EndpointsConfig"][&"f".repeat(64)],
            serde_json::json!({"Aliases": ["a"]})
        );
        for absent in [
            "Privileged",
            "CapAdd",
            "MaskedPaths",
            "RestartPolicy",
            "LogConfig",
            "PortBindings",
        ] {
            assert!(host.get(absent).is_none(), "{absent} forwarded: {host}");
        }
        // -1 and 0 do not lift a ceiling.
        let plan = check(r#"{"Image":"b","HostConfig":{"PidsLimit":-1,"Memory":-1}}"#).unwrap();
        let host = plan.body.host_config.unwrap();
        assert_eq!((host.pids_limit, host.memory), (Some(512), Some(1 << 30)));
    }

    #[test]
    fn paths_translate_both_ways() {
        let p = policy();
        let host = to_host(Path::new("/volumes/files/a/b"), &p.host_paths);
        assert_eq!(host, PathBuf::from("/mnt/big/files/a/b"));
        assert_eq!(
            from_host(&host, &p.host_paths),
            PathBuf::from("/volumes/files/a/b")
        );
        assert_eq!(
            from_host(Path::new("/elsewhere"), &p.host_paths),
            PathBuf::from("/elsewhere")
        );
    }
}

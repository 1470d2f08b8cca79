//! The policy of the Docker socket regobox gives the application: pure decisions, no I/O.
//!
//! A request path is normalised first (the `/vX.Y` prefix removed, percent decoding done once;
//! encoded slashes, `..`, empty segments and NUL refused), then matched against an allow-list of
//! (method, pattern) ([`endpoint`]). Query parameters are read as the engine reads them
//! ([`query`]); bodies are decoded into regobox's typed model ([`crate::docker::model`]) and
//! judged field by field ([`container`], [`network`]): what would hand the host to a job
//! (privileges, capabilities, devices, host namespaces, security profiles, kernel parameters,
//! the Docker socket, a bind source outside the allowed roots, limits above the configured
//! ceilings) is refused with the field named, and what is allowed is rebuilt from the model,
//! bind sources translated to the host paths behind them, the instance label added.

pub mod build;
pub mod container;
pub mod image;
mod names;
pub mod network;
pub mod query;

/// The label marking what this regobox instance created.
pub const INSTANCE_LABEL: &str = "regobox.instance";

/// The label namespaces Docker keeps for its own tools: `com.docker.compose.project` and
/// `...network` on a network of the application's made the host's `docker-compose -p <name> up`
/// take that network for its project's and put the host's containers on the application's
/// bridge (an attacker's, thirty-third session).
const RESERVED_LABELS: &[&str] = &["com.docker.", "io.docker.", "org.dockerproject."];

/// Labels the application gives something it makes (`field`): none in Docker's own namespaces.
pub fn check_labels<'a>(
    field: &str,
    mut keys: impl Iterator<Item = &'a String>,
) -> Result<(), Denied> {
    match keys.find(|k| {
        RESERVED_LABELS
            .iter()
            .any(|ns| k.to_ascii_lowercase().starts_with(ns))
    }) {
        Some(k) => Err(container::deny(
            field,
            format!(
                "{k:?}: a label in a namespace Docker keeps for its own tools ({}): the host's would take what bears it for theirs",
                RESERVED_LABELS.join(", ")
            ),
        )),
        None => Ok(()),
    }
}

/// A refusal: which rule, and a message for the client (`{"message": ...}` with a 403).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denied {
    pub rule: String,
    pub message: String,
}

impl Denied {
    pub fn new(rule: impl Into<String>, message: impl Into<String>) -> Self {
        Denied {
            rule: rule.into(),
            message: message.into(),
        }
    }
}

/// The engine's information (`GET /info`) an application is shown: what describes the engine
/// and its host's kind (versions, the operating system, drivers, limits supported, the
/// registry `docker pull` authenticates with). Left out: what tells of the host and its other
/// tenants (counts of every container and image, the host's name, the engine's id, root
/// directory, labels, proxies, registry mirrors, swarm, plugins, warnings, file descriptors and
/// listeners in use).
const INFO_SHOWN: &[&str] = &[
    "Architecture",
    "CgroupDriver",
    "CgroupVersion",
    "CpuCfsPeriod",
    "CpuCfsQuota",
    "CPUSet",
    "CPUShares",
    "DefaultRuntime",
    "Driver",
    "ExperimentalBuild",
    "IndexServerAddress",
    "IPv4Forwarding",
    "Isolation",
    "KernelMemory",
    "KernelMemoryTCP",
    "KernelVersion",
    "LoggingDriver",
    "MemoryLimit",
    "MemTotal",
    "NCPU",
    "OomKillDisable",
    "OperatingSystem",
    "OSType",
    "OSVersion",
    "PidsLimit",
    "SecurityOptions",
    "ServerVersion",
    "SwapLimit",
    "SystemTime",
];

/// `info` with only the fields in [`INFO_SHOWN`].
pub fn engine_info(info: serde_json::Value) -> serde_json::Value {
    match info {
        serde_json::Value::Object(fields) => serde_json::Value::Object(
            fields
                .into_iter()
                .filter(|(k, _)| INFO_SHOWN.contains(&k.as_str()))
                .collect(),
        ),
        _ => serde_json::Value::Object(Default::default()),
    }
}

/// What an allowed endpoint is, for the proxy's further checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Ping,
    Version,
    Info,
    Events,
    Build,
    ImageCreate,
    ImageList,
    ImageInspect,
    ImageRemove,
    ContainerCreate,
    ContainerList,
    /// Any call on one container (inspect, start, wait, stop, kill, pause, unpause, logs, stats,
    /// remove): the proxy checks the container is this instance's.
    ContainerOp,
    NetworkList,
    NetworkCreate,
    NetworkOp,
    /// Inspecting a kind of object the application can never own (volumes, plugins, swarm
    /// objects): always "no such object", so that `docker inspect NAME`, which tries every kind
    /// in turn, reports the name as missing.
    Invisible,
    /// Inspecting a container or a network by a name no container or network can have (an
    /// image's, `docker inspect busybox:1` tries a container first): missing, as the engine
    /// answers.
    NoSuchContainer,
    NoSuchNetwork,
}

/// (method, pattern, endpoint). In patterns `{id}` is one segment, a name or an id, and `{name+}`
/// one or more with an image reference's characters (image names contain slashes); the first
/// route a path matches with valid captures is its endpoint.
const ROUTES: &[(&str, &str, Endpoint)] = &[
    ("GET", "/_ping", Endpoint::Ping),
    ("HEAD", "/_ping", Endpoint::Ping),
    ("GET", "/version", Endpoint::Version),
    ("GET", "/info", Endpoint::Info),
    ("GET", "/events", Endpoint::Events),
    ("POST", "/build", Endpoint::Build),
    ("POST", "/images/create", Endpoint::ImageCreate),
    ("GET", "/images/json", Endpoint::ImageList),
    ("GET", "/images/{name+}/json", Endpoint::ImageInspect),
    ("DELETE", "/images/{name+}", Endpoint::ImageRemove),
    ("POST", "/containers/create", Endpoint::ContainerCreate),
    ("GET", "/containers/json", Endpoint::ContainerList),
    ("GET", "/containers/{id}/json", Endpoint::ContainerOp),
    ("POST", "/containers/{id}/start", Endpoint::ContainerOp),
    ("POST", "/containers/{id}/wait", Endpoint::ContainerOp),
    ("POST", "/containers/{id}/stop", Endpoint::ContainerOp),
    ("POST", "/containers/{id}/kill", Endpoint::ContainerOp),
    ("POST", "/containers/{id}/pause", Endpoint::ContainerOp),
    ("POST", "/containers/{id}/unpause", Endpoint::ContainerOp),
    ("GET", "/containers/{id}/logs", Endpoint::ContainerOp),
    ("GET", "/containers/{id}/stats", Endpoint::ContainerOp),
    ("GET", "/containers/{id}/top", Endpoint::ContainerOp),
    ("POST", "/containers/{id}/attach", Endpoint::ContainerOp),
    ("POST", "/containers/{id}/resize", Endpoint::ContainerOp),
    ("POST", "/containers/{id}/restart", Endpoint::ContainerOp),
    ("GET", "/containers/{id}/archive", Endpoint::ContainerOp),
    ("HEAD", "/containers/{id}/archive", Endpoint::ContainerOp),
    ("PUT", "/containers/{id}/archive", Endpoint::ContainerOp),
    ("DELETE", "/containers/{id}", Endpoint::ContainerOp),
    ("GET", "/networks", Endpoint::NetworkList),
    ("POST", "/networks/create", Endpoint::NetworkCreate),
    ("GET", "/networks/{id}", Endpoint::NetworkOp),
    ("DELETE", "/networks/{id}", Endpoint::NetworkOp),
    ("POST", "/networks/{id}/connect", Endpoint::NetworkOp),
    ("POST", "/networks/{id}/disconnect", Endpoint::NetworkOp),
    ("GET", "/containers/{name+}/json", Endpoint::NoSuchContainer),
    ("GET", "/networks/{name+}", Endpoint::NoSuchNetwork),
    ("GET", "/volumes/{name+}", Endpoint::Invisible),
    ("GET", "/plugins/{name+}/json", Endpoint::Invisible),
    ("GET", "/services/{name+}", Endpoint::Invisible),
    ("GET", "/tasks/{name+}", Endpoint::Invisible),
    ("GET", "/nodes/{name+}", Endpoint::Invisible),
    ("GET", "/secrets/{name+}", Endpoint::Invisible),
    ("GET", "/configs/{name+}", Endpoint::Invisible),
];

/// The request path without its `/vX.Y` prefix, percent-decoded once; `Err` when it is
/// ambiguous or tries to go somewhere else.
pub fn normalize(raw: &str) -> Result<String, Denied> {
    let bad = |why: &str| Denied::new("path", format!("refused: the path {raw:?} {why}"));
    let path = raw.split('?').next().unwrap_or("");
    if !path.starts_with('/') {
        return Err(bad("is not absolute"));
    }
    let lower = path.to_ascii_lowercase();
    if lower.contains("%2f")
        || lower.contains("%5c")
        || lower.contains("%00")
        || lower.contains("%25")
    {
        return Err(bad(
            "contains an encoded slash, backslash, NUL or percent sign",
        ));
    }
    let decoded = percent_decode(path).ok_or_else(|| bad("is not valid percent-encoded UTF-8"))?;
    let mut segments: Vec<&str> = decoded.split('/').skip(1).collect();
    if segments
        .iter()
        .any(|s| s.is_empty() || *s == "." || *s == "..")
    {
        return Err(bad("has an empty, `.` or `..` segment"));
    }
    if let Some(first) = segments.first() {
        let is_version = first.len() > 1
            && first.starts_with('v')
            && first[1..]
                .split('.')
                .all(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_digit()));
        if is_version {
            segments.remove(0);
        }
    }
    if segments.is_empty() {
        return Err(bad("names no endpoint"));
    }
    Ok(format!("/{}", segments.join("/")))
}

/// The `/vX.Y` prefix of a request path, if it has one (kept when forwarding: the engine's
/// behaviour depends on it).
pub fn version_prefix(raw: &str) -> Option<&str> {
    let rest = raw.strip_prefix('/')?;
    let first = rest.split(['/', '?']).next()?;
    let ok = first.len() > 1
        && first.starts_with('v')
        && first[1..]
            .split('.')
            .all(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_digit()));
    ok.then(|| &raw[..first.len() + 1])
}

/// `%XX` sequences decoded once; `None` when malformed or not UTF-8.
pub(crate) fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// The API version regobox's model is of, and every request is forwarded at: the engine reads
/// bodies and fills defaults differently at other versions (below 1.24 a start's body replaces
/// the container's HostConfig; below 1.40 and 1.41 the IPC and cgroup namespaces default to
/// shareable and host).
pub const API_VERSION: &str = "1.41";

/// A request without a version prefix, or with [`API_VERSION`]'s.
pub fn check_version(raw_path: &str) -> Result<(), Denied> {
    match version_prefix(raw_path) {
        None => Ok(()),
        Some(v) if v[2..] == *API_VERSION => Ok(()),
        Some(v) => Err(Denied::new(
            "version",
            format!(
                "refused by regobox's Docker socket: API version {} is not the one it speaks ({API_VERSION}); let the client negotiate, or set DOCKER_API_VERSION={API_VERSION}",
                &v[2..]
            ),
        )),
    }
}

/// A container or network reference: a name or an id, nothing the engine would read as more.
pub fn valid_object_ref(r: &str) -> bool {
    !r.is_empty()
        && r.len() <= 255
        && r.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

/// An image reference: `[host[:port]/]path[:tag][@digest]` characters only.
pub fn valid_image_ref(r: &str) -> bool {
    !r.is_empty()
        && r.len() <= 512
        && !r.starts_with(['/', ':', '@', '.', '-'])
        && r.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-' | '/' | ':' | '@'))
}

/// A name the application gives a container or network: the engine's grammar, and not one that
/// looks like an id (a name is found before an id prefix: it would capture another's short id).
pub fn valid_new_name(name: &str) -> bool {
    let name = name.strip_prefix('/').unwrap_or(name);
    let looks_like_id = (12..=64).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c));
    name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && valid_object_ref(name)
        && !looks_like_id
}

/// The endpoint `method path` is, if the policy allows it; `path` is normalised here, and what
/// it names is checked against the grammar of references.
pub fn endpoint(method: &str, raw_path: &str) -> Result<(Endpoint, Vec<String>), Denied> {
    check_version(raw_path)?;
    let path = normalize(raw_path)?;
    let segments: Vec<&str> = path.split('/').skip(1).collect();
    let mut refused = None;
    for (m, pattern, ep) in ROUTES {
        if *m != method {
            continue;
        }
        if let Some(captures) = matches(pattern, &segments) {
            let images = pattern.contains("+}");
            if let Some(bad) = captures.iter().find(|c| {
                if images {
                    !valid_image_ref(c)
                } else {
                    !valid_object_ref(c)
                }
            }) {
                refused.get_or_insert_with(|| {
                    Denied::new(
                        "path",
                        format!("refused by regobox's Docker policy: {bad:?} is not a name or id"),
                    )
                });
                continue;
            }
            return Ok((*ep, captures));
        }
    }
    Err(refused.unwrap_or_else(|| {
        Denied::new(
            "endpoint",
            format!(
                "refused by regobox's Docker policy: {method} {path} is not an allowed endpoint"
            ),
        )
    }))
}

fn matches(pattern: &str, segments: &[&str]) -> Option<Vec<String>> {
    let parts: Vec<&str> = pattern.split('/').skip(1).collect();
    let mut captures = Vec::new();
    let (mut i, mut j) = (0, 0);
    while i < parts.len() {
        let part = parts[i];
        if part.ends_with("+}") {
            // One or more segments, up to what the rest of the pattern needs.
            let rest = parts.len() - i - 1;
            if segments.len() < j + 1 + rest {
                return None;
            }
            let end = segments.len() - rest;
            captures.push(segments[j..end].join("/"));
            j = end;
        } else if part.starts_with('{') {
            captures.push(segments.get(j)?.to_string());
            j += 1;
        } else {
            if segments.get(j) != Some(&part) {
                return None;
            }
            j += 1;
        }
        i += 1;
    }
    (j == segments.len()).then_some(captures)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_normalised_and_versions_stripped() {
        assert_eq!(
            normalize("/v1.41/containers/json?all=1").unwrap(),
            "/containers/json"
        );
        assert_eq!(
            normalize("/containers/abc/start").unwrap(),
            "/containers/abc/start"
        );
        assert_eq!(
            normalize("/v1.41/images/regobox-test/busybox:local/json").unwrap(),
            "/images/regobox-test/busybox:local/json"
        );
        assert!(check_version("/v1.23/containers/x/start").is_err());
        assert!(check_version("/v1.41/containers/x/start").is_ok());
        assert!(check_version("/containers/x/start").is_ok());
        assert!(endpoint("DELETE", "/images/own/json%3Fx=").is_err());
        assert!(endpoint("GET", "/containers/a%20b/json").is_err());
        assert!(
            valid_new_name("job-42") && !valid_new_name("0123456789ab") && !valid_new_name("a b")
        );
        for bad in [
            "/containers/../secrets",
            "/v1.41/containers/%2e%2e/x",
            "/images/a%2Fb/json",
            "//containers/json",
            "/containers/x%00/json",
            "containers/json",
            "/v1.41",
        ] {
            assert!(normalize(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn only_the_pipeline_endpoints_are_allowed() {
        for (m, p, ep) in [
            ("GET", "/_ping", Endpoint::Ping),
            (
                "POST",
                "/v1.41/containers/create?name=job",
                Endpoint::ContainerCreate,
            ),
            (
                "POST",
                "/containers/abc123/wait?condition=not-running",
                Endpoint::ContainerOp,
            ),
            (
                "GET",
                "/containers/abc/logs?follow=1",
                Endpoint::ContainerOp,
            ),
            ("DELETE", "/images/library/busybox:1", Endpoint::ImageRemove),
            (
                "GET",
                "/images/library/busybox:1/json",
                Endpoint::ImageInspect,
            ),
        ] {
            assert_eq!(endpoint(m, p).unwrap().0, ep, "{m} {p}");
        }
        // What no container or network can be named is missing (`docker inspect busybox:1`
        // asks for a container of that name first), not refused.
        for (p, ep) in [
            ("/containers/busybox:1/json", Endpoint::NoSuchContainer),
            (
                "/containers/regobox-test/busybox:1/json",
                Endpoint::NoSuchContainer,
            ),
            (
                "/networks/localhost:5000/x@sha256:ab",
                Endpoint::NoSuchNetwork,
            ),
            ("/volumes/a/b:c", Endpoint::Invisible),
        ] {
            assert_eq!(endpoint("GET", p).unwrap().0, ep, "{p}");
        }
        for (m, p) in [
            ("POST", "/containers/busybox:1/start"),
            ("DELETE", "/networks/a:b"),
            ("GET", "/containers/a%20b/json"),
        ] {
            assert_eq!(endpoint(m, p).unwrap_err().rule, "path", "{m} {p}");
        }
        assert_eq!(
            endpoint("GET", "/images/a/b/c/json").unwrap().1,
            vec!["a/b/c".to_string()]
        );
        for (m, p) in [
            ("POST", "/containers/abc/exec"),
            ("POST", "/exec/abc/start"),
            ("GET", "/containers/abc/export"),
            ("POST", "/swarm/init"),
            ("POST", "/plugins/pull"),
            ("GET", "/secrets"),
            ("POST", "/containers/prune"),
            ("POST", "/containers/abc/update"),
            ("DELETE", "/containers/abc/extra"),
        ] {
            let d = endpoint(m, p).unwrap_err();
            assert_eq!(d.rule, "endpoint", "{m} {p}");
            assert!(d.message.contains("not an allowed endpoint"));
        }
    }
}

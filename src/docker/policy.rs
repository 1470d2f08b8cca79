//! The policy of the Docker socket regobox gives the application: which endpoints it may call,
//! and what a container it creates may ask for.
//!
//! Pure decisions, no I/O. A request path is normalised first (the `/vX.Y` prefix removed, percent
//! decoding done once; encoded slashes, `..`, empty segments and NUL refused), then matched
//! against an allow-list of (method, pattern). A container create body is inspected field by
//! field: anything that would hand the host to the container (privileges, capabilities, devices,
//! host namespaces, unconfined security profiles, the Docker socket, a bind source outside the
//! allowed roots) is refused with the field named; allowed bind sources are translated from the
//! paths regobox sees to the host paths that back them; the instance label and default limits
//! are added.

use std::path::{Component, Path, PathBuf};

use serde_json::{Map, Value};

/// The label marking what this regobox instance created.
pub const INSTANCE_LABEL: &str = "regobox.instance";

/// A refusal: which rule, and a message for the client (`{"message": ...}` with a 403).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denied {
    pub rule: String,
    pub message: String,
}

impl Denied {
    fn new(rule: impl Into<String>, message: impl Into<String>) -> Self {
        Denied {
            rule: rule.into(),
            message: message.into(),
        }
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
}

/// (method, pattern, endpoint). In patterns `{id}` is one segment and `{name+}` one or more (image
/// names contain slashes).
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
    ("GET", "/volumes/{id}", Endpoint::Invisible),
    ("GET", "/plugins/{name+}/json", Endpoint::Invisible),
    ("GET", "/services/{id}", Endpoint::Invisible),
    ("GET", "/tasks/{id}", Endpoint::Invisible),
    ("GET", "/nodes/{id}", Endpoint::Invisible),
    ("GET", "/secrets/{id}", Endpoint::Invisible),
    ("GET", "/configs/{id}", Endpoint::Invisible),
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

/// The endpoint `method path` is, if the policy allows it; `path` is normalised here.
pub fn endpoint(method: &str, raw_path: &str) -> Result<(Endpoint, Vec<String>), Denied> {
    let path = normalize(raw_path)?;
    let segments: Vec<&str> = path.split('/').skip(1).collect();
    for (m, pattern, ep) in ROUTES {
        if *m != method {
            continue;
        }
        if let Some(captures) = matches(pattern, &segments) {
            return Ok((*ep, captures));
        }
    }
    Err(Denied::new(
        "endpoint",
        format!("refused by regobox's Docker policy: {method} {path} is not an allowed endpoint"),
    ))
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
    /// Defaults applied when the request sets none.
    pub memory: Option<i64>,
    pub nano_cpus: Option<i64>,
    pub pids_limit: Option<i64>,
}

/// Host namespaces a container may not join, by field.
const NAMESPACE_FIELDS: &[&str] = &[
    "PidMode",
    "IpcMode",
    "NetworkMode",
    "UTSMode",
    "UsernsMode",
    "CgroupnsMode",
];

/// Check a `POST /containers/create` body and return it rewritten (translated binds, the
/// instance label, default limits).
pub fn check_create(body: &Value, policy: &CreatePolicy) -> Result<Value, Denied> {
    let mut body = body.clone();
    let obj = body
        .as_object_mut()
        .ok_or_else(|| Denied::new("body", "the container create body is not a JSON object"))?;
    let deny = |field: &str, why: &str| {
        Denied::new(
            field,
            format!("refused by regobox's Docker policy: {field} {why}"),
        )
    };
    let host = obj
        .entry("HostConfig")
        .or_insert_with(|| Value::Object(Map::new()))
        .as_object_mut()
        .ok_or_else(|| Denied::new("HostConfig", "HostConfig is not an object"))?;
    if host.get("Privileged").and_then(Value::as_bool) == Some(true) {
        return Err(deny("HostConfig.Privileged", "is not allowed"));
    }
    for (field, why) in [
        ("CapAdd", "adds capabilities"),
        ("Devices", "passes host devices"),
        ("DeviceRequests", "requests host devices"),
        ("DeviceCgroupRules", "opens device access"),
        ("VolumesFrom", "mounts another container's volumes"),
    ] {
        if host
            .get(field)
            .and_then(Value::as_array)
            .is_some_and(|a| !a.is_empty())
        {
            return Err(deny(&format!("HostConfig.{field}"), why));
        }
    }
    for field in NAMESPACE_FIELDS {
        if let Some(mode) = host.get(*field).and_then(Value::as_str) {
            if mode == "host" || mode.starts_with("container:") {
                return Err(deny(
                    &format!("HostConfig.{field}"),
                    &format!("= {mode:?} shares a namespace"),
                ));
            }
        }
    }
    if let Some(opts) = host.get("SecurityOpt").and_then(Value::as_array) {
        for opt in opts.iter().filter_map(Value::as_str) {
            let o = opt.to_ascii_lowercase().replace('=', ":");
            if o.contains("unconfined") || o == "label:disable" {
                return Err(deny(
                    "HostConfig.SecurityOpt",
                    &format!("{opt:?} lifts confinement"),
                ));
            }
        }
    }
    if host
        .get("CgroupParent")
        .and_then(Value::as_str)
        .is_some_and(|s| !s.is_empty())
    {
        return Err(deny(
            "HostConfig.CgroupParent",
            "moves the container out of the engine's cgroups",
        ));
    }

    // Binds ("source:target[:options]") and Mounts ({Type, Source, Target}).
    if let Some(binds) = host.get_mut("Binds").and_then(Value::as_array_mut) {
        for bind in binds.iter_mut() {
            let text = bind
                .as_str()
                .ok_or_else(|| deny("HostConfig.Binds", "holds a non-string entry"))?;
            let (source, rest) = text.split_once(':').unwrap_or((text, ""));
            let translated = check_source(source, policy, "HostConfig.Binds")?;
            *bind = Value::String(if rest.is_empty() {
                translated
            } else {
                format!("{translated}:{rest}")
            });
        }
    }
    if let Some(mounts) = host.get_mut("Mounts").and_then(Value::as_array_mut) {
        for m in mounts.iter_mut() {
            let kind = m
                .get("Type")
                .and_then(Value::as_str)
                .unwrap_or("volume")
                .to_string();
            match kind.as_str() {
                "tmpfs" => {}
                "bind" => {
                    let source = m
                        .get("Source")
                        .and_then(Value::as_str)
                        .ok_or_else(|| deny("HostConfig.Mounts", "has a bind without a Source"))?;
                    let translated = check_source(source, policy, "HostConfig.Mounts")?;
                    m["Source"] = Value::String(translated);
                }
                other => {
                    return Err(deny(
                        "HostConfig.Mounts",
                        &format!(
                            "type {other:?} is not allowed (bind under the allowed roots, or tmpfs)"
                        ),
                    ));
                }
            }
        }
    }
    // Default limits.
    for (field, value) in [
        ("Memory", policy.memory),
        ("NanoCpus", policy.nano_cpus),
        ("PidsLimit", policy.pids_limit),
    ] {
        if let Some(v) = value {
            let unset = host.get(field).and_then(Value::as_i64).unwrap_or(0) <= 0;
            if unset {
                host.insert(field.into(), Value::from(v));
            }
        }
    }
    // Anonymous volumes declared by the request would live outside the allowed roots.
    if obj
        .get("Volumes")
        .and_then(Value::as_object)
        .is_some_and(|v| !v.is_empty())
    {
        return Err(deny("Volumes", "declares anonymous volumes"));
    }
    let labels = obj
        .entry("Labels")
        .or_insert_with(|| Value::Object(Map::new()));
    if !labels.is_object() {
        *labels = Value::Object(Map::new());
    }
    labels[INSTANCE_LABEL] = Value::String(policy.instance.clone());
    Ok(body)
}

/// A bind source must be an absolute path without `..`, not the Docker socket, under a bind
/// root; it is returned translated to the host.
fn check_source(source: &str, policy: &CreatePolicy, field: &str) -> Result<String, Denied> {
    let deny = |why: String| {
        Denied::new(
            field,
            format!("refused by regobox's Docker policy: {field} source {source:?} {why}"),
        )
    };
    let path = Path::new(source);
    if !path.is_absolute() {
        return Err(deny(
            "is not an absolute path (named volumes are not allowed)".into(),
        ));
    }
    if path
        .components()
        .any(|c| matches!(c, Component::ParentDir | Component::CurDir))
    {
        return Err(deny("contains `.` or `..`".into()));
    }
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    if name.ends_with("docker.sock") || name == "containerd.sock" || source == "/" {
        return Err(deny(
            "is the Docker socket or the root of the filesystem".into(),
        ));
    }
    if !policy.bind_roots.iter().any(|root| path.starts_with(root)) {
        let roots: Vec<String> = policy
            .bind_roots
            .iter()
            .map(|r| r.display().to_string())
            .collect();
        return Err(deny(format!(
            "is outside the allowed roots ({})",
            roots.join(", ")
        )));
    }
    let best = policy
        .host_paths
        .iter()
        .filter(|(inside, _)| path.starts_with(inside))
        .max_by_key(|(inside, _)| inside.components().count());
    Ok(match best {
        Some((inside, host)) => host
            .join(path.strip_prefix(inside).unwrap_or(Path::new("")))
            .display()
            .to_string(),
        None => source.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

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
            memory: Some(1 << 30),
            nano_cpus: None,
            pids_limit: Some(512),
        }
    }

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

    #[test]
    fn dangerous_create_fields_are_refused_by_name() {
        let p = policy();
        for (body, field) in [
            (
                json!({"HostConfig": {"Privileged": true}}),
                "HostConfig.Privileged",
            ),
            (
                json!({"HostConfig": {"CapAdd": ["SYS_ADMIN"]}}),
                "HostConfig.CapAdd",
            ),
            (
                json!({"HostConfig": {"Devices": [{"PathOnHost": "/dev/sda"}]}}),
                "HostConfig.Devices",
            ),
            (
                json!({"HostConfig": {"PidMode": "host"}}),
                "HostConfig.PidMode",
            ),
            (
                json!({"HostConfig": {"IpcMode": "host"}}),
                "HostConfig.IpcMode",
            ),
            (
                json!({"HostConfig": {"NetworkMode": "host"}}),
                "HostConfig.NetworkMode",
            ),
            (
                json!({"HostConfig": {"NetworkMode": "container:other"}}),
                "HostConfig.NetworkMode",
            ),
            (
                json!({"HostConfig": {"UTSMode": "host"}}),
                "HostConfig.UTSMode",
            ),
            (
                json!({"HostConfig": {"UsernsMode": "host"}}),
                "HostConfig.UsernsMode",
            ),
            (
                json!({"HostConfig": {"SecurityOpt": ["seccomp=unconfined"]}}),
                "HostConfig.SecurityOpt",
            ),
            (
                json!({"HostConfig": {"SecurityOpt": ["apparmor:unconfined"]}}),
                "HostConfig.SecurityOpt",
            ),
            (
                json!({"HostConfig": {"Binds": ["/var/run/docker.sock:/var/run/docker.sock"]}}),
                "HostConfig.Binds",
            ),
            (
                json!({"HostConfig": {"Binds": ["/:/host"]}}),
                "HostConfig.Binds",
            ),
            (
                json!({"HostConfig": {"Binds": ["/etc:/x"]}}),
                "HostConfig.Binds",
            ),
            (
                json!({"HostConfig": {"Binds": ["/volumes/files/../secrets:/x"]}}),
                "HostConfig.Binds",
            ),
            (
                json!({"HostConfig": {"Binds": ["named:/x"]}}),
                "HostConfig.Binds",
            ),
            (
                json!({"HostConfig": {"Mounts": [{"Type": "bind", "Source": "/etc", "Target": "/x"}]}}),
                "HostConfig.Mounts",
            ),
            (
                json!({"HostConfig": {"Mounts": [{"Type": "volume", "Source": "v", "Target": "/x"}]}}),
                "HostConfig.Mounts",
            ),
            (
                json!({"HostConfig": {"VolumesFrom": ["other"]}}),
                "HostConfig.VolumesFrom",
            ),
            (
                json!({"HostConfig": {"CgroupParent": "/"}}),
                "HostConfig.CgroupParent",
            ),
            (json!({"Volumes": {"/data": {}}}), "Volumes"),
        ] {
            let d = check_create(&body, &p).unwrap_err();
            assert_eq!(d.rule, field, "{body}");
            assert!(d.message.contains(field), "{}", d.message);
        }
    }

    #[test]
    fn an_allowed_create_is_translated_labelled_and_limited() {
        let body = json!({
            "Image": "busybox",
            "Labels": {"app": "pipeline"},
            "HostConfig": {
                "Binds": ["/volumes/files/job-42:/data:rw"],
                "Mounts": [
                    {"Type": "bind", "Source": "/volumes/files/ref", "Target": "/ref", "ReadOnly": true},
                    {"Type": "tmpfs", "Target": "/tmp"}
                ],
                "Memory": 0,
                "PidsLimit": 64
            }
        });
        let out = check_create(&body, &policy()).unwrap();
        let host = &out["HostConfig"];
        assert_eq!(
            host["Binds"][0], "/mnt/big/files/job-42:/data:rw",
            "the longest prefix wins"
        );
        assert_eq!(host["Mounts"][0]["Source"], "/mnt/big/files/ref");
        assert_eq!(host["Memory"], 1 << 30, "a default fills an unset limit");
        assert_eq!(host["PidsLimit"], 64, "a limit the request sets is kept");
        assert_eq!(out["Labels"][INSTANCE_LABEL], "i1");
        assert_eq!(out["Labels"]["app"], "pipeline");
    }
}

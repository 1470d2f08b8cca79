//! Query parameters, read as the engine reads them and forwarded as regobox writes them.
//!
//! The engine takes the first value of a parameter (Go's `url.Values.Get`) and reads a boolean
//! as true unless it is empty, `0`, `no`, `false` or `none` (any case, spaces trimmed): docker-py
//! sends `False`. Here every parameter must be one the endpoint knows, given once; booleans
//! are forwarded as `1`/`0`, numbers as numbers, so the engine reads exactly what was judged.

use super::Denied;

/// How a parameter's value is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Bool,
    Int,
    Text,
    /// Text that may be given more than once (a build's `t`).
    Repeated,
}

/// The parameters of one request: (name, value) in the order given, each checked.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Query(pub Vec<(String, String)>);

impl Query {
    /// The first value of `name`.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn all(&self, name: &str) -> impl Iterator<Item = &str> {
        self.0
            .iter()
            .filter(move |(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn flag(&self, name: &str) -> bool {
        self.get(name) == Some("1")
    }

    pub fn set(&mut self, name: &str, value: String) {
        self.0.retain(|(k, _)| k != name);
        self.0.push((name.to_string(), value));
    }

    pub fn remove(&mut self, name: &str) {
        self.0.retain(|(k, _)| k != name);
    }

    pub fn encode(&self) -> String {
        form_urlencoded::Serializer::new(String::new())
            .extend_pairs(&self.0)
            .finish()
    }
}

/// The `filters` a list knows (the engine's names); `ContainerList`'s `before`, `since` and
/// `ancestor`, and `ImageList`'s `before` and `since`, name objects, which the proxy resolves
/// to this instance's (the engine answers a missing one with an error: an oracle for others'
/// names).
pub const CONTAINER_FILTERS: &[&str] = &[
    "ancestor",
    "before",
    "expose",
    "exited",
    "health",
    "id",
    "isolation",
    "is-task",
    "label",
    "name",
    "network",
    "publish",
    "since",
    "status",
    "volume",
];
pub const IMAGE_FILTERS: &[&str] = &["before", "dangling", "label", "reference", "since"];
pub const NETWORK_FILTERS: &[&str] =
    &["dangling", "driver", "id", "label", "name", "scope", "type"];
pub const EVENT_FILTERS: &[&str] = &[
    "config",
    "container",
    "daemon",
    "event",
    "image",
    "label",
    "network",
    "node",
    "plugin",
    "scope",
    "secret",
    "service",
    "type",
    "volume",
];

/// A list's `filters` parameter, read as the engine reads it (a JSON object of lists of
/// strings, or of objects whose keys are the values, the older form), each name one `allowed`
/// lists; regobox forwards its own rendering (`{"name":["value",...]}`).
pub fn filters(
    raw: Option<&str>,
    allowed: &[&str],
) -> Result<std::collections::BTreeMap<String, Vec<String>>, Denied> {
    use serde_json::Value;
    let mut out = std::collections::BTreeMap::new();
    let Some(raw) = raw.filter(|r| !r.trim().is_empty()) else {
        return Ok(out);
    };
    let bad = |why: String| {
        Denied::new(
            "query.filters",
            format!("refused by regobox's Docker policy: query.filters: {why}"),
        )
    };
    let object: serde_json::Map<String, Value> =
        super::super::model::decode(raw.as_bytes(), "filters").map_err(|u| bad(u.message))?;
    for (name, value) in object {
        if !allowed.contains(&name.as_str()) {
            return Err(bad(format!(
                "{name:?} is not a filter of this list (allowed: {})",
                allowed.join(", ")
            )));
        }
        let values: Vec<String> = match value {
            Value::Array(items) => items
                .into_iter()
                .map(|v| match v {
                    Value::String(s) => Ok(s),
                    other => Err(bad(format!("{name}: {other} is not a string"))),
                })
                .collect::<Result<_, _>>()?,
            Value::Object(map) => map
                .into_iter()
                .map(|(k, v)| match v {
                    Value::Bool(true) => Ok(k),
                    other => Err(bad(format!("{name}: {k}: {other} is not true"))),
                })
                .collect::<Result<_, _>>()?,
            other => return Err(bad(format!("{name}: {other} is not a list"))),
        };
        out.insert(name, values);
    }
    Ok(out)
}

/// Go's `httputils.BoolValue`.
pub fn go_bool(v: &str) -> bool {
    !matches!(
        v.trim().to_ascii_lowercase().as_str(),
        "" | "0" | "no" | "false" | "none"
    )
}

/// Parse `raw` against the parameters `allowed` of `what`.
pub fn parse(raw: &str, what: &str, allowed: &[(&str, Kind)]) -> Result<Query, Denied> {
    let mut out: Vec<(String, String)> = Vec::new();
    if raw.contains(';') {
        return Err(Denied::new(
            "query",
            format!("refused: the query of {what} contains `;`"),
        ));
    }
    for (k, v) in form_urlencoded::parse(raw.as_bytes()) {
        let (k, v) = (k.into_owned(), v.into_owned());
        let Some((_, kind)) = allowed.iter().find(|(name, _)| *name == k) else {
            let names: Vec<&str> = allowed.iter().map(|(n, _)| *n).collect();
            return Err(Denied::new(
                format!("query.{k}"),
                format!(
                    "refused by regobox's Docker policy: the parameter {k:?} is not one {what} takes here (allowed: {})",
                    if names.is_empty() {
                        "none".to_string()
                    } else {
                        names.join(", ")
                    }
                ),
            ));
        };
        if *kind != Kind::Repeated && out.iter().any(|(n, _)| *n == k) {
            return Err(Denied::new(
                format!("query.{k}"),
                format!(
                    "refused by regobox's Docker policy: the parameter {k:?} of {what} is given twice"
                ),
            ));
        }
        let value = match kind {
            Kind::Bool => if go_bool(&v) { "1" } else { "0" }.to_string(),
            Kind::Int => {
                if v.is_empty() {
                    continue;
                }
                v.parse::<i64>()
                    .map_err(|_| {
                        Denied::new(
                            format!("query.{k}"),
                            format!("refused: the parameter {k:?} of {what} is not a whole number: {v:?}"),
                        )
                    })?
                    .to_string()
            }
            Kind::Text | Kind::Repeated => v,
        };
        out.push((k, value));
    }
    Ok(Query(out))
}

use Kind::*;

/// `POST /containers/create`.
pub const CONTAINER_CREATE: &[(&str, Kind)] = &[("name", Text), ("platform", Text)];
/// The list endpoints (the instance's label filter is added to `filters`).
pub const CONTAINER_LIST: &[(&str, Kind)] = &[
    ("all", Bool),
    // docker-py's `containers.list` sends it (the engine no longer reads it).
    ("trunc_cmd", Bool),
    ("limit", Int),
    ("size", Bool),
    ("filters", Text),
    ("since", Text),
    ("before", Text),
];
pub const NETWORK_LIST: &[(&str, Kind)] = &[("filters", Text)];
pub const EVENTS: &[(&str, Kind)] = &[("since", Text), ("until", Text), ("filters", Text)];
/// `only_ids` is docker-py's, sent on every list and not read by the engine: not forwarded.
pub const IMAGE_LIST: &[(&str, Kind)] = &[
    ("all", Bool),
    ("only_ids", Bool),
    ("filters", Text),
    ("digests", Bool),
    ("filter", Text),
];
pub const IMAGE_REMOVE: &[(&str, Kind)] = &[("force", Bool), ("noprune", Bool)];
pub const NONE: &[(&str, Kind)] = &[];
/// `POST /images/create`: a pull (`fromImage`) or an import of the request body (`fromSrc=-`).
pub const IMAGE_CREATE: &[(&str, Kind)] = &[
    ("fromImage", Text),
    ("fromSrc", Text),
    ("repo", Text),
    ("tag", Text),
    ("message", Text),
    ("changes", Repeated),
    ("platform", Text),
];
/// `POST /build`, without `remote` (the engine would fetch a URL from the host's network);
/// `cgroupparent`, `ulimits` and `isolation` only empty ([`super::build`]).
pub const BUILD: &[(&str, Kind)] = &[
    ("dockerfile", Text),
    ("t", Repeated),
    ("extrahosts", Repeated),
    ("q", Bool),
    ("nocache", Bool),
    ("cachefrom", Text),
    ("pull", Bool),
    ("rm", Bool),
    ("forcerm", Bool),
    ("memory", Int),
    ("memswap", Int),
    ("cpushares", Int),
    ("cpusetcpus", Text),
    ("cpusetmems", Text),
    ("cgroupparent", Text),
    ("ulimits", Text),
    ("isolation", Text),
    ("cpuperiod", Int),
    ("cpuquota", Int),
    ("buildargs", Text),
    ("shmsize", Int),
    ("squash", Bool),
    ("labels", Text),
    ("networkmode", Text),
    ("platform", Text),
    ("target", Text),
    ("version", Text),
];

/// The longest a stop (or a restart's) may wait for a job to end before killing it, in seconds:
/// the engine's wait for a negative one has no end, nor does its request's (it waits on no
/// context of the request), so the request's handler, which runs to its end whatever its
/// client does, held its turn until the job ended: eight stops of a job that ignores SIGTERM,
/// their clients gone, left the application's socket answering nothing (an attacker's,
/// thirty-third session).
pub const MAX_STOP_WAIT: i64 = 300;

/// What an operation's parameters may not ask: removing links (they name other containers),
/// `ps` arguments beyond letters, digits, spaces, commas and dashes (the engine runs `ps` on
/// the host with them), a stop's wait without end or past [`MAX_STOP_WAIT`].
pub fn check_container_op(q: &Query) -> Result<(), Denied> {
    if let Some(t) = q.get("t").filter(|t| !t.is_empty()) {
        if !t
            .parse::<i64>()
            .is_ok_and(|t| (0..=MAX_STOP_WAIT).contains(&t))
        {
            return Err(Denied::new(
                "query.t",
                format!(
                    "refused by regobox's Docker policy: t = {t} is not a wait from 0 to {MAX_STOP_WAIT} seconds"
                ),
            ));
        }
    }
    if q.flag("link") {
        return Err(Denied::new(
            "query.link",
            "refused by regobox's Docker policy: removing links is not allowed",
        ));
    }
    let odd = |c: char| !(c.is_ascii_alphanumeric() || " ,-".contains(c));
    if q.get("ps_args").is_some_and(|a| a.chars().any(odd)) {
        return Err(Denied::new(
            "query.ps_args",
            "refused by regobox's Docker policy: ps_args holds characters other than letters, digits, spaces, commas and dashes",
        ));
    }
    Ok(())
}

/// The parameters of an operation on one container, by method and last path segment (`None`
/// for the container itself).
pub fn container_op(method: &str, op: Option<&str>) -> &'static [(&'static str, Kind)] {
    match (method, op) {
        ("GET", Some("json")) => &[("size", Bool)],
        ("POST", Some("start")) => &[("detachKeys", Text)],
        ("POST", Some("wait")) => &[("condition", Text)],
        ("POST", Some("stop")) | ("POST", Some("restart")) => &[("t", Int)],
        ("POST", Some("kill")) => &[("signal", Text)],
        ("GET", Some("logs")) => &[
            ("follow", Bool),
            ("stdout", Bool),
            ("stderr", Bool),
            ("since", Text),
            ("until", Text),
            ("timestamps", Bool),
            ("tail", Text),
            ("details", Bool),
        ],
        ("GET", Some("stats")) => &[("stream", Bool), ("one-shot", Bool)],
        ("GET", Some("top")) => &[("ps_args", Text)],
        ("POST", Some("attach")) => &[
            ("stream", Bool),
            ("stdin", Bool),
            ("stdout", Bool),
            ("stderr", Bool),
            ("logs", Bool),
            ("detachKeys", Text),
        ],
        ("POST", Some("resize")) => &[("h", Int), ("w", Int)],
        (_, Some("archive")) => &[
            ("path", Text),
            ("noOverwriteDirNonDir", Bool),
            ("copyUIDGID", Bool),
        ],
        ("DELETE", None) => &[("force", Bool), ("v", Bool), ("link", Bool)],
        _ => &[],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_as_the_engine_reads_and_written_plainly() {
        let q = parse(
            "force=False&v=True&link=",
            "DELETE",
            container_op("DELETE", None),
        )
        .unwrap();
        assert_eq!(q.encode(), "force=0&v=1&link=0");
        assert_eq!(
            parse("t=10", "stop", container_op("POST", Some("stop")))
                .unwrap()
                .encode(),
            "t=10"
        );
        for (raw, field) in [
            ("force=1&force=0", "query.force"),
            ("Force=1", "query.Force"),
            ("force=1;v=1", "query"),
        ] {
            let d = parse(raw, "DELETE", container_op("DELETE", None)).unwrap_err();
            assert_eq!(d.rule, field, "{raw}");
        }
        assert!(parse("t=x", "stop", container_op("POST", Some("stop"))).is_err());
        let q = parse("t=a%3A1&t=b%3A2&remote=", "build", BUILD);
        assert_eq!(q.unwrap_err().rule, "query.remote");
        let q = parse("t=a%3A1&t=b%3A2", "build", BUILD).unwrap();
        assert_eq!(q.all("t").collect::<Vec<_>>(), vec!["a:1", "b:2"]);
        let op = |raw| parse(raw, "op", container_op("DELETE", None)).unwrap();
        assert_eq!(
            check_container_op(&op("link=1")).unwrap_err().rule,
            "query.link"
        );
        assert!(check_container_op(&op("link=False&force=1")).is_ok());
        let top = |raw| parse(raw, "top", container_op("GET", Some("top"))).unwrap();
        assert!(check_container_op(&top("ps_args=-ef")).is_ok());
        assert!(check_container_op(&top("ps_args=%24%28id%29")).is_err());
        // An attacker's (thirty-third session): a stop waiting for ever.
        let stop = |raw| parse(raw, "stop", container_op("POST", Some("stop"))).unwrap();
        for t in ["t=-1", "t=301", "t=-9223372036854775808"] {
            assert_eq!(
                check_container_op(&stop(t)).unwrap_err().rule,
                "query.t",
                "{t}"
            );
        }
        for t in ["t=0", "t=10", "t=300", "", "t="] {
            assert!(check_container_op(&stop(t)).is_ok(), "{t}");
        }
        for (v, b) in [
            ("False", false),
            (" NONE ", false),
            ("no", false),
            ("", false),
            ("x", true),
            ("1", true),
        ] {
            assert_eq!(go_bool(v), b, "{v:?}");
        }
    }
}

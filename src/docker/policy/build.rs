//! What an image build may do: its query parameters (no URL for the engine to fetch, no host
//! network, limits under the ceilings, the instance label), and what its Dockerfile reads (no
//! `ADD` of a URL, which the engine fetches from the host's network; the images it starts
//! from, which the proxy checks are this instance's or absent, to be pulled).
//!
//! Decided: a build may not read a local image the instance does not own (`FROM` or
//! `COPY --from`): an image on the host may hold another application's code or secrets. An
//! image that is not on the host is pulled from its registry by the engine, as a pull through
//! the socket would.

use std::collections::BTreeMap;

use super::container::{Limits, deny, is_default_network};
use super::query::Query;
use super::{Denied, INSTANCE_LABEL};

/// Check a build's parameters and return those to forward: the instance label added to
/// `labels`, limits bounded by the ceilings.
pub fn check_build_query(mut q: Query, limits: &Limits, instance: &str) -> Result<Query, Denied> {
    if let Some(mode) = q.get("networkmode") {
        if !is_default_network(mode) {
            return Err(deny(
                "query.networkmode",
                format!("{mode:?} is not allowed for a build (default, bridge, none)"),
            ));
        }
    }
    match q.get("version") {
        None | Some("") | Some("1") => {}
        Some(v) => {
            return Err(deny(
                "query.version",
                format!("{v:?}: only the classic builder (1)"),
            ));
        }
    }
    if let Some(c) = q.get("cachefrom") {
        let list: Vec<String> = serde_json::from_str(c).map_err(|e| {
            deny(
                "query.cachefrom",
                format!("is not a JSON list of images: {e}"),
            )
        })?;
        if !list.is_empty() {
            return Err(deny(
                "query.cachefrom",
                "reads other images' layers: not allowed",
            ));
        }
        q.remove("cachefrom");
    }
    if q.get("cgroupparent").is_some_and(|v| !v.is_empty()) {
        return Err(deny(
            "query.cgroupparent",
            "moves the build out of the engine's cgroups",
        ));
    }
    if q.get("ulimits")
        .is_some_and(|v| !matches!(v, "" | "null" | "[]"))
    {
        return Err(deny("query.ulimits", "is not allowed for a build"));
    }
    if q.get("isolation")
        .is_some_and(|v| !matches!(v, "" | "default"))
    {
        return Err(deny("query.isolation", "is not allowed"));
    }
    // The build's intermediate containers are not labelled: the application could neither see
    // nor remove them, so they are always removed (docker-py sends rm=False).
    q.set("rm", "1".into());
    q.set("forcerm", "1".into());
    for key in ["cpuperiod", "cpuquota"] {
        if q.get(key).is_some_and(|v| v != "0") {
            return Err(deny(&format!("query.{key}"), "is not allowed"));
        }
    }
    let bound =
        |q: &mut Query, key: &str, ceiling: Option<i64>, name: &str| -> Result<(), Denied> {
            let asked: i64 = q.get(key).and_then(|v| v.parse().ok()).unwrap_or(0);
            match ceiling {
                Some(c) if asked > c => Err(deny(
                    &format!("query.{key}"),
                    format!("= {asked} is above the ceiling docker.limits.{name} = {c}"),
                )),
                Some(c) if asked <= 0 => {
                    q.set(key, c.to_string());
                    Ok(())
                }
                _ if asked < 0 => Err(deny(
                    &format!("query.{key}"),
                    format!("= {asked} is not a limit"),
                )),
                _ => Ok(()),
            }
        };
    bound(&mut q, "memory", limits.memory, "memory")?;
    bound(&mut q, "shmsize", limits.shm, "shm")?;
    if limits.memory.is_some() && q.get("memswap") == Some("-1") {
        return Err(deny(
            "query.memswap",
            "= -1 (unlimited swap) would lift docker.limits.memory",
        ));
    }
    let mut labels: BTreeMap<String, String> = match q.get("labels") {
        Some(v) if !v.is_empty() => serde_json::from_str(v).map_err(|e| {
            deny(
                "query.labels",
                format!("is not a JSON object of strings: {e}"),
            )
        })?,
        _ => BTreeMap::new(),
    };
    labels.insert(INSTANCE_LABEL.into(), instance.to_string());
    q.set("labels", serde_json::to_string(&labels).unwrap_or_default());
    if let Some(v) = q.get("buildargs") {
        let args: BTreeMap<String, Option<String>> = serde_json::from_str(v).map_err(|e| {
            deny(
                "query.buildargs",
                format!("is not a JSON object of strings: {e}"),
            )
        })?;
        q.set(
            "buildargs",
            serde_json::to_string(&args).unwrap_or_default(),
        );
    }
    Ok(q)
}

/// The build arguments given, for the Dockerfile's `FROM` lines.
pub fn build_args(q: &Query) -> BTreeMap<String, String> {
    q.get("buildargs")
        .and_then(|v| serde_json::from_str::<BTreeMap<String, Option<String>>>(v).ok())
        .unwrap_or_default()
        .into_iter()
        .filter_map(|(k, v)| Some((k, v?)))
        .collect()
}

/// The images a Dockerfile reads (`FROM`, `COPY --from`), other than its own stages and
/// `scratch`; refuses an `ADD` of a URL and references it cannot resolve.
pub fn dockerfile_images(
    text: &str,
    args: &BTreeMap<String, String>,
) -> Result<Vec<String>, Denied> {
    let field = "Dockerfile";
    let mut escape = '\\';
    for line in text.lines() {
        let t = line.trim();
        let Some(directive) = t.strip_prefix('#') else {
            break;
        };
        let d = directive.trim().to_ascii_lowercase();
        if let Some(v) = d.strip_prefix("escape") {
            let v = v.trim_start().trim_start_matches('=').trim();
            escape = v.chars().next().unwrap_or('\\');
        } else if !d.contains('=') {
            break;
        }
    }
    // Logical lines: continuations joined, comments and blank lines dropped.
    let mut logical = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let t = line.trim();
        if current.is_empty() && (t.is_empty() || t.starts_with('#')) {
            continue;
        }
        if !current.is_empty() && t.starts_with('#') {
            continue;
        }
        if let Some(stripped) = t.strip_suffix(escape) {
            current.push_str(stripped);
            current.push(' ');
            continue;
        }
        current.push_str(t);
        logical.push(std::mem::take(&mut current));
    }
    if !current.is_empty() {
        logical.push(current);
    }

    let mut scope: BTreeMap<String, String> = BTreeMap::new();
    let mut stages: Vec<String> = Vec::new();
    let mut images = Vec::new();
    let mut seen_from = false;
    for line in logical {
        let mut words = line.split_whitespace();
        let Some(instruction) = words.next() else {
            continue;
        };
        let rest: Vec<&str> = words.collect();
        match instruction.to_ascii_uppercase().as_str() {
            "ARG" if !seen_from => {
                for decl in &rest {
                    let (name, default) = match decl.split_once('=') {
                        Some((n, d)) => (n, Some(d.trim_matches('"').to_string())),
                        None => (*decl, None),
                    };
                    if let Some(v) = args.get(name).cloned().or(default) {
                        scope.insert(name.to_string(), v);
                    }
                }
            }
            "FROM" => {
                seen_from = true;
                let words: Vec<&str> = rest
                    .iter()
                    .copied()
                    .filter(|w| !w.starts_with("--"))
                    .collect();
                let image = words
                    .first()
                    .ok_or_else(|| deny(field, "has a FROM without an image"))?;
                let image = substitute(image, &scope)?;
                let lower = image.to_ascii_lowercase();
                if lower != "scratch" && !stages.contains(&lower) {
                    images.push(image);
                }
                if let [_, as_kw, name] = words.as_slice() {
                    if as_kw.eq_ignore_ascii_case("as") {
                        stages.push(name.to_ascii_lowercase());
                    }
                }
            }
            "COPY" => {
                for flag in rest.iter().filter(|w| w.starts_with("--from=")) {
                    let from = substitute(&flag["--from=".len()..], &scope)?;
                    let lower = from.to_ascii_lowercase();
                    let is_index = from.chars().all(|c| c.is_ascii_digit());
                    if !is_index && !stages.contains(&lower) {
                        images.push(from);
                    }
                }
            }
            "ADD" => {
                let sources: Vec<String> = match line.find('[') {
                    Some(i) if line[i..].trim_end().ends_with(']') => {
                        serde_json::from_str(line[i..].trim_end()).map_err(|_| {
                            deny(field, format!("ADD has a malformed JSON form: {line:?}"))
                        })?
                    }
                    _ => rest
                        .iter()
                        .filter(|w| !w.starts_with("--"))
                        .map(|w| w.to_string())
                        .collect(),
                };
                for s in &sources {
                    if s.contains("://") || s.starts_with("git@") {
                        return Err(deny(
                            field,
                            format!(
                                "ADD {s:?} makes the engine fetch a URL from the host's network: fetch it in a RUN step, or into the build context"
                            ),
                        ));
                    }
                }
            }
            _ => {}
        }
    }
    Ok(images)
}

/// `$VAR` and `${VAR}` from the build arguments; anything left unresolved is refused.
fn substitute(word: &str, scope: &BTreeMap<String, String>) -> Result<String, Denied> {
    let mut out = String::new();
    let mut chars = word.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '$' {
            out.push(c);
            continue;
        }
        let braced = chars.peek() == Some(&'{');
        if braced {
            chars.next();
        }
        let mut name = String::new();
        while let Some(&n) = chars.peek() {
            if n.is_ascii_alphanumeric() || n == '_' {
                name.push(n);
                chars.next();
            } else {
                break;
            }
        }
        if braced && chars.next() != Some('}') {
            return Err(deny(
                "Dockerfile",
                format!("cannot resolve {word:?} (only $NAME and ${{NAME}})"),
            ));
        }
        match scope.get(&name) {
            Some(v) => out.push_str(v),
            None => {
                return Err(deny(
                    "Dockerfile",
                    format!("cannot resolve {word:?}: ${name} has no value"),
                ));
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::docker::policy::query::{BUILD, parse};

    #[test]
    fn build_parameters() {
        let limits = Limits {
            memory: Some(1 << 30),
            ..Default::default()
        };
        let q = check_build_query(
            parse(
                "t=a%3A1&labels=%7B%22x%22%3A%22y%22%7D&rm=False",
                "build",
                BUILD,
            )
            .unwrap(),
            &limits,
            "i1",
        )
        .unwrap();
        let labels: BTreeMap<String, String> =
            serde_json::from_str(q.get("labels").unwrap()).unwrap();
        assert_eq!(labels.get(INSTANCE_LABEL).map(String::as_str), Some("i1"));
        assert_eq!(labels.get("x").map(String::as_str), Some("y"));
        assert_eq!(q.get("memory"), Some("1073741824"));
        assert_eq!((q.get("rm"), q.get("forcerm")), (Some("1"), Some("1")));
        for (raw, field) in [
            ("networkmode=host", "query.networkmode"),
            ("networkmode=container%3Ax", "query.networkmode"),
            ("memory=4294967296", "query.memory"),
            ("version=2", "query.version"),
            ("cachefrom=%5B%22other%22%5D", "query.cachefrom"),
            ("memswap=-1", "query.memswap"),
            ("cpuquota=1", "query.cpuquota"),
            ("cgroupparent=%2F", "query.cgroupparent"),
            (
                "ulimits=%5B%7B%22Name%22%3A%22nofile%22%7D%5D",
                "query.ulimits",
            ),
        ] {
            let d =
                check_build_query(parse(raw, "build", BUILD).unwrap(), &limits, "i1").unwrap_err();
            assert_eq!(d.rule, field, "{raw}");
        }
        for raw in [
            "remote=http%3A%2F%2F127.0.0.1%2Fx",
            "cgroupparent=%2F",
            "t=a&t=b&REMOTE=x",
        ] {
            assert!(parse(raw, "build", BUILD).is_err(), "{raw}");
        }
    }

    #[test]
    fn dockerfiles() {
        let args = BTreeMap::from([("BASE".to_string(), "mine:1".to_string())]);
        let images = dockerfile_images(
            "# syntax comment\nARG BASE=other\nARG TAG=2\nFROM ${BASE} AS build\nRUN x \\\n  && y\nFROM scratch\nCOPY --from=build /a /b\nCOPY --from=their/img:$TAG /c /d\nFROM build\nADD local.tar /\n",
            &args,
        )
        .unwrap();
        assert_eq!(
            images,
            vec!["mine:1".to_string(), "their/img:2".to_string()]
        );
        for text in [
            "FROM a\nADD http://127.0.0.1:8081/x /x\n",
            "FROM a\nadd --chown=1 https://example.org/x /x\n",
            "FROM a\nADD [\"http://127.0.0.1/x\", \"/x\"]\n",
            "FROM a\nADD \\\n  http://127.0.0.1/x /x\n",
            "FROM $UNSET\n",
            "# escape=`\nFROM a\nADD `\n  http://127.0.0.1/x /x\n",
        ] {
            assert!(dockerfile_images(text, &BTreeMap::new()).is_err(), "{text}");
        }
    }
}

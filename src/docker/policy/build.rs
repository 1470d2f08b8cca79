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
use super::names;
use super::query::Query;
use super::{Denied, INSTANCE_LABEL};

/// The most tags a build makes.
pub const MAX_TAGS: usize = 16;

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
    // Tags are made by regobox at the build's end, with the engine's tag endpoint, each judged
    // again just before: a few, each once (an attacker's, twenty-fourth session: 1 200 copies of
    // one tag held the moment between a check and its tag open for seconds, and a host's tag
    // made then was moved).
    let tags: Vec<&str> = q.all("t").collect();
    if tags.len() > MAX_TAGS {
        return Err(deny(
            "query.t",
            format!("{} tags: a build makes at most {MAX_TAGS}", tags.len()),
        ));
    }
    for t in &tags {
        if t.is_empty() || t.contains('@') {
            return Err(deny(
                "query.t",
                format!("{t:?} is not a tag: a build makes tags"),
            ));
        }
        if super::image::names_like_an_id(t) {
            return Err(deny(
                "query.t",
                format!("{t:?} is named like an image id: the name would stand for that id"),
            ));
        }
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
    if q.flag("pull") {
        return Err(deny(
            "query.pull",
            "would replace the base images with ones from a registry, unread: pull them through the socket first",
        ));
    }
    if q.get("cpushares")
        .and_then(|v| v.parse::<i64>().ok())
        .is_some_and(|v| !(0..=1024).contains(&v))
    {
        return Err(deny(
            "query.cpushares",
            "must be between 0 and 1024 (the engine's default weight)",
        ));
    }
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
    super::check_labels("query.labels", labels.keys())?;
    labels.insert(INSTANCE_LABEL.into(), instance.to_string());
    q.set("labels", serde_json::to_string(&labels).unwrap_or_default());
    // Written into the build's containers' /etc/hosts, a line each: read as `name:address`,
    // as at create, and forwarded as regobox writes them (the engine reads every value given).
    let hosts = names::each(
        Some(&q.all("extrahosts").map(str::to_string).collect::<Vec<_>>()),
        "query.extrahosts",
        names::extra_host,
    )?;
    q.remove("extrahosts");
    for host in hosts.into_iter().flatten() {
        q.0.push(("extrahosts".into(), host));
    }
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
/// `scratch`; refuses an `ADD` of a URL, `ONBUILD` (its instructions would run in a later
/// build, unread), and references it cannot resolve.
///
/// Read as the engine's parser reads it: parser directives only in the leading lines (`escape`
/// and `syntax`; the first other line ends them), continuation lines joined with empty and
/// comment lines inside them skipped. A Dockerfile that another reading could take differently
/// is refused: an `escape` directive anywhere but there, an escape character other than `\` or
/// `` ` ``, a control character but tab and line ends or a space other than the ASCII space
/// (Go's and Rust's trimming and splitting would disagree on them: a backslash followed by a
/// form feed continues a line for one and not the other), and, in what regobox reads (`FROM`,
/// `COPY --from`, `ADD`'s words), a quote or an escape character, which the engine's word
/// processing would remove (`http:\//host` is a URL to it). A stage is a name `COPY --from`
/// or `FROM` may use once it is complete (the engine's rule): in its own stage, a stage's name
/// is an image's.
///
/// Also renders the Dockerfile the engine is given: regobox's own serialisation of what it
/// read (each instruction on a line of its own, as joined; the escape directive if it is not
/// the default), with the instance's label set right after each `FROM`. The engine commits an
/// image for every step: with the label only at the end (the build's `labels`), a build that
/// failed or was left kept its finished steps' images, and a multi-stage build its earlier
/// stages', untagged and unlabelled, which the application could neither see nor remove (an
/// attacker's finding, twentieth session).
pub fn read_dockerfile(
    text: &str,
    args: &BTreeMap<String, String>,
    instance: &str,
) -> Result<Dockerfile, Denied> {
    let field = "Dockerfile";
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        let line_end = c == '\n' || (c == '\r' && chars.peek() == Some(&'\n'));
        if (c.is_control() || c.is_whitespace()) && c != '\t' && c != ' ' && !line_end {
            return Err(deny(
                field,
                format!(
                    "holds the character {c:?}: only spaces, tabs and line ends may separate its words"
                ),
            ));
        }
    }
    let directive = |line: &str| -> Option<(String, String)> {
        let rest = line.trim().strip_prefix('#')?;
        let (name, value) = rest.split_once('=')?;
        let name = name.trim();
        let value = value.trim();
        // The engine's pattern: a name that starts with a letter, and a value.
        (name.starts_with(|c: char| c.is_ascii_alphabetic())
            && name.chars().all(|c| c.is_ascii_alphanumeric())
            && !value.is_empty())
        .then(|| (name.to_ascii_lowercase(), value.to_string()))
    };
    let mut escape = '\\';
    let lines: Vec<&str> = text.lines().collect();
    let mut body_start = 0;
    for (i, line) in lines.iter().enumerate() {
        match directive(line) {
            Some((name, value)) if name == "escape" || name == "syntax" => {
                if name == "escape" {
                    escape = match value.as_str() {
                        "\\" => '\\',
                        "`" => '`',
                        other => {
                            return Err(deny(
                                field,
                                format!("has the escape character {other:?} (only \\ or `)"),
                            ));
                        }
                    };
                }
                body_start = i + 1;
            }
            _ => break,
        }
    }
    if lines[body_start..]
        .iter()
        .any(|l| directive(l).is_some_and(|(n, _)| n == "escape"))
    {
        return Err(deny(
            field,
            "has an escape directive after its first lines: ambiguous, refused",
        ));
    }
    // Logical lines, joined as the engine joins them: a line continues when it ends with the
    // escape character and nothing but spaces and tabs after it; those are removed and the next
    // line appended as it is (no space added, its indentation kept: `http:\` then `//host` is
    // `http://host`); comment and empty lines inside a continuation are skipped; the first line
    // of each loses its indentation.
    // (An escape character escaped by another does not continue the line: `\\`.)
    let continues = |line: &str| -> Option<usize> {
        let t = line.trim_end_matches([' ', '\t']);
        let cut = t.strip_suffix(escape)?;
        (!cut.ends_with(escape)).then_some(cut.len())
    };
    let mut logical: Vec<String> = Vec::new();
    let mut current: Option<String> = None;
    for line in &lines[body_start..] {
        let left = line.trim_start_matches([' ', '\t']);
        match current.as_mut() {
            None => {
                if left.is_empty() || left.starts_with('#') {
                    continue;
                }
                match continues(left) {
                    Some(cut) => current = Some(left[..cut].to_string()),
                    None => logical.push(left.to_string()),
                }
            }
            Some(joined) => {
                if left.is_empty() || left.starts_with('#') {
                    continue;
                }
                match continues(line) {
                    Some(cut) => joined.push_str(&line[..cut]),
                    None => {
                        joined.push_str(line);
                        logical.extend(current.take());
                    }
                }
            }
        }
    }
    logical.extend(current);

    // The build arguments before the first FROM (what FROM may use), and those whose value
    // regobox cannot read as the engine does (quoted, escaped or made of other variables): a
    // FROM using one is refused.
    let mut scope: BTreeMap<String, String> = BTreeMap::new();
    let mut unreadable: Vec<String> = Vec::new();
    // The names of the stages complete so far (a stage without a name is counted, as `None`),
    // and the one under way.
    let mut stages: Vec<Option<String>> = Vec::new();
    let mut stage: Option<Option<String>> = None;
    let mut images = Vec::new();
    let mut seen_from = false;
    let mut rendered = String::new();
    if escape != '\\' {
        rendered.push_str(&format!("# escape={escape}\n"));
    }
    let label = format!("LABEL {INSTANCE_LABEL}={}\n", label_value(instance, escape));
    let is_stage =
        |stages: &[Option<String>], name: &str| stages.iter().any(|s| s.as_deref() == Some(name));
    // Text the engine's word processing would change (quotes, escapes) is not read as regobox
    // reads it.
    let plain = |what: &str, text: &str| -> Result<(), Denied> {
        if text.contains(['"', '\'', '\\', '`']) {
            return Err(deny(
                field,
                format!(
                    "{what} {text:?}: quotes and escape characters are not allowed there (the engine would read it otherwise)"
                ),
            ));
        }
        Ok(())
    };
    // The engine splits flags byte by byte, and takes the second byte of `à` (0xa0) or `х`
    // (0x85) for a space: a flag is ASCII.
    let ascii_flag = |what: &str, flag: &str| -> Result<(), Denied> {
        if !flag.is_ascii() {
            return Err(deny(
                field,
                format!("{what} {flag:?}: a flag is ASCII (the engine would split it otherwise)"),
            ));
        }
        Ok(())
    };
    for line in logical {
        render_line(&mut rendered, &line, escape)?;
        let (instruction, operands) = match line.split_once([' ', '\t']) {
            Some((i, a)) => (i, a.trim_matches([' ', '\t'])),
            None => (line.as_str(), ""),
        };
        // The flags (leading `--name=value` words) and what follows them.
        let mut rest = operands;
        let mut flags: Vec<&str> = Vec::new();
        while rest.starts_with("--") {
            let (flag, after) = rest.split_once([' ', '\t']).unwrap_or((rest, ""));
            flags.push(flag);
            rest = after.trim_start_matches([' ', '\t']);
        }
        // Go lowercases Unicode (`ONBUİLD` is `onbuild` to the engine): an instruction is ASCII.
        if !instruction.is_ascii() {
            return Err(deny(
                field,
                format!("the instruction {instruction:?} is not ASCII"),
            ));
        }
        match instruction.to_ascii_uppercase().as_str() {
            "ONBUILD" => {
                return Err(deny(
                    field,
                    "ONBUILD is not allowed: its instructions would run in a later build without being read",
                ));
            }
            "ARG" if !seen_from => {
                for decl in operands.split_whitespace() {
                    let (name, default) = match decl.split_once('=') {
                        Some((n, d)) => (n, Some(d)),
                        None => (decl, None),
                    };
                    scope.remove(name);
                    unreadable.retain(|u| u != name);
                    if let Some(v) = args.get(name) {
                        scope.insert(name.to_string(), v.clone());
                    } else if let Some(d) = default {
                        if d.contains(['"', '\'', '\\', '`', '$'])
                            || operands.contains(['"', '\'', '\\', '`'])
                        {
                            unreadable.push(name.to_string());
                        } else {
                            scope.insert(name.to_string(), d.to_string());
                        }
                    }
                }
            }
            "FROM" => {
                seen_from = true;
                rendered.push_str(&label);
                if let Some(done) = stage.take() {
                    stages.push(done);
                }
                plain("FROM", operands)?;
                for flag in &flags {
                    ascii_flag("FROM", flag)?;
                    if !simple_variables(flag) {
                        return Err(deny(
                            field,
                            format!("FROM {flag:?}: only $NAME and ${{NAME}} may name a variable"),
                        ));
                    }
                }
                let words: Vec<&str> = rest.split_whitespace().collect();
                let image = words
                    .first()
                    .ok_or_else(|| deny(field, "has a FROM without an image"))?;
                let image = substitute(image, &scope, &unreadable)?;
                let lower = image.to_ascii_lowercase();
                if lower != "scratch" && !is_stage(&stages, &lower) {
                    images.push(image);
                }
                let name = match words.as_slice() {
                    [_] => None,
                    [_, as_kw, name] if as_kw.eq_ignore_ascii_case("as") => {
                        Some(name.to_ascii_lowercase())
                    }
                    _ => {
                        return Err(deny(
                            field,
                            format!(
                                "FROM {operands:?} is not `FROM image` or `FROM image AS name`"
                            ),
                        ));
                    }
                };
                stage = Some(name);
            }
            "LABEL" => {
                // Ownership is regobox's: no key a reading could take for the instance's (the
                // engine substitutes variables and removes quotes and escapes in keys). Read as
                // the engine's parser reads it: its words (quotes and escapes kept), a first
                // word without `=` the old form `LABEL key value`.
                let words = label_words(operands, escape);
                let keys: Vec<&str> = match words.first() {
                    Some(first) if !first.contains('=') => {
                        operands.split([' ', '\t']).next().into_iter().collect()
                    }
                    _ => words.iter().filter_map(|w| w.split('=').next()).collect(),
                };
                for &key in &keys {
                    if key.contains(['"', '\'', '$', escape]) || key == INSTANCE_LABEL {
                        return Err(deny(
                            field,
                            format!(
                                "LABEL {key:?}: the label {INSTANCE_LABEL} is regobox's, and a key with a variable, a quote or an escape is not read (the engine would read it otherwise)"
                            ),
                        ));
                    }
                }
                let owned: Vec<String> = keys.iter().map(|k| k.to_string()).collect();
                super::check_labels(field, owned.iter())?;
            }
            "COPY" => {
                for flag in &flags {
                    ascii_flag("COPY", flag)?;
                    plain("COPY", flag)?;
                    let Some(from) = flag
                        .to_ascii_lowercase()
                        .strip_prefix("--from=")
                        .map(|_| &flag["--from=".len()..])
                    else {
                        continue;
                    };
                    if from.contains('$') {
                        return Err(deny(
                            field,
                            format!(
                                "COPY {flag:?}: a variable in --from is not allowed; name the stage or image"
                            ),
                        ));
                    }
                    let lower = from.to_ascii_lowercase();
                    let is_index = from.parse::<usize>().is_ok_and(|i| i < stages.len());
                    if !is_index && !is_stage(&stages, &lower) {
                        images.push(from.to_string());
                    }
                }
                // A flag glued to quotes (`--fr""om=`) is no flag here, and is refused.
                if !rest.starts_with('[') {
                    plain("COPY", rest)?;
                }
            }
            "ADD" => {
                for flag in &flags {
                    ascii_flag("ADD", flag)?;
                    plain("ADD", flag)?;
                }
                // The JSON form when what follows the flags starts with `[`, as the engine
                // reads it; its strings then go through the engine's word processing too.
                let sources: Vec<String> = if rest.starts_with('[') {
                    if rest.contains('\\') {
                        return Err(deny(
                            field,
                            format!("ADD {rest:?}: escapes are not allowed in its JSON form"),
                        ));
                    }
                    serde_json::from_str(rest).map_err(|_| {
                        deny(field, format!("ADD has a malformed JSON form: {line:?}"))
                    })?
                } else {
                    plain("ADD", rest)?;
                    rest.split_whitespace().map(str::to_string).collect()
                };
                for s in &sources {
                    plain("ADD", s)?;
                    if s.contains('$') {
                        return Err(deny(
                            field,
                            format!(
                                "ADD {s:?}: a variable in an ADD source could make it a URL the engine fetches; name the file"
                            ),
                        ));
                    }
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
    Ok(Dockerfile { images, rendered })
}

/// What [`read_dockerfile`] read of a Dockerfile.
#[derive(Debug)]
pub struct Dockerfile {
    /// The images it reads.
    pub images: Vec<String>,
    /// The Dockerfile the engine is given.
    pub rendered: String,
}

/// The words of a `LABEL`'s operands as the engine's parser splits them (its `parseWords`):
/// at spaces and tabs outside quotes, an escape character keeping the character after it in
/// the word (not in single quotes), quotes and escapes kept in the words.
fn label_words(text: &str, escape: char) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut quote: Option<char> = None;
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match quote {
            None if c == ' ' || c == '\t' => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
                continue;
            }
            None => {
                in_word = true;
                if c == '"' || c == '\'' {
                    quote = Some(c);
                }
                if c == escape {
                    // An escape at the end is dropped.
                    let Some(next) = chars.next() else { continue };
                    word.push(c);
                    word.push(next);
                    continue;
                }
            }
            Some(q) => {
                if c == q {
                    quote = None;
                }
                if c == escape && q != '\'' {
                    let Some(next) = chars.next() else {
                        quote = None;
                        continue;
                    };
                    word.push(c);
                    word.push(next);
                    continue;
                }
            }
        }
        word.push(c);
    }
    if in_word {
        words.push(word);
    }
    words
}

/// The engine's longest line (its scanner's buffer is 64 KiB).
const ENGINE_LINE: usize = 65_535;

/// `line` (an instruction as joined) rendered on one line, or, when longer than the engine
/// takes, on continuation lines it joins back into the same: each piece but the last ends with
/// the escape character, and a cut is made only where it cannot read otherwise (a piece does
/// not end with the escape character, the next does not start as a comment or is not blank).
fn render_line(rendered: &mut String, line: &str, escape: char) -> Result<(), Denied> {
    let mut rest = line;
    while rest.len() >= ENGINE_LINE {
        let cut = (ENGINE_LINE / 2..ENGINE_LINE - 8)
            .rev()
            .filter(|k| rest.is_char_boundary(*k))
            .find(|k| {
                let (piece, next) = rest.split_at(*k);
                let next = next.trim_start_matches([' ', '\t']);
                !piece.ends_with(escape) && !next.is_empty() && !next.starts_with('#')
            })
            .ok_or_else(|| {
                deny(
                    "Dockerfile",
                    format!(
                        "has an instruction of {} bytes that cannot be cut into lines the engine takes",
                        line.len()
                    ),
                )
            })?;
        rendered.push_str(&rest[..cut]);
        rendered.push(escape);
        rendered.push('\n');
        rest = &rest[cut..];
    }
    rendered.push_str(rest);
    rendered.push('\n');
    Ok(())
}

/// `value` as a `LABEL` value: as it is when made of letters, digits and `._:-`, else in double
/// quotes, with `"` and the escape character escaped.
fn label_value(value: &str, escape: char) -> String {
    if !value.is_empty()
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._:-".contains(c))
    {
        return value.to_string();
    }
    let mut quoted = String::from('"');
    for c in value.chars() {
        if c == '"' || c == escape {
            quoted.push(escape);
        }
        quoted.push(c);
    }
    quoted.push('"');
    quoted
}

/// The images a Dockerfile reads (see [`read_dockerfile`]).
#[cfg(test)]
fn dockerfile_images(text: &str, args: &BTreeMap<String, String>) -> Result<Vec<String>, Denied> {
    read_dockerfile(text, args, "i1").map(|d| d.images)
}

/// An import's `changes` (Dockerfile instructions applied to the image's configuration): those
/// that only set how the image runs; not `ONBUILD` (unread instructions for a later build),
/// `VOLUME` (anonymous volumes outside the allowed roots) or `LABEL` (ownership is regobox's).
pub fn check_import_changes(changes: &[&str]) -> Result<(), Denied> {
    const ALLOWED: &[&str] = &[
        "CMD",
        "ENTRYPOINT",
        "ENV",
        "EXPOSE",
        "USER",
        "WORKDIR",
        "STOPSIGNAL",
        "HEALTHCHECK",
    ];
    for change in changes {
        // The engine joins the values with newlines and parses the whole as a Dockerfile: a
        // value must be one instruction, alone on its line (an attacker's, twelfth session:
        // `ENV A=b\nLABEL regobox.instance=...` stamped another instance's label). No line
        // break or control character, no continuation into the next value (`\` or `` ` `` at
        // the end), no comment or parser directive.
        let trimmed = change.trim_end();
        if change
            .chars()
            .any(|c| c.is_control() || (c.is_whitespace() && c != ' ' && c != '\t'))
            || trimmed.ends_with(['\\', '`'])
            || change.trim_start().starts_with('#')
        {
            return Err(deny(
                "query.changes",
                format!("{change:?} is not one instruction on a line of its own"),
            ));
        }
        let instruction = change
            .split_whitespace()
            .next()
            .unwrap_or("")
            .to_ascii_uppercase();
        if !ALLOWED.contains(&instruction.as_str()) {
            return Err(deny(
                "query.changes",
                format!(
                    "{instruction:?} is not allowed (allowed: {})",
                    ALLOWED.join(", ")
                ),
            ));
        }
    }
    Ok(())
}

/// Whether every `$` in `word` starts `$NAME` or `${NAME}` (no other form of the engine's
/// expansion: `${A:+...}`, `${A:-...}` read otherwise by a reader that does not know them).
fn simple_variables(word: &str) -> bool {
    let name = |c: char| c.is_ascii_alphanumeric() || c == '_';
    let mut rest = word;
    while let Some(i) = rest.find('$') {
        let after = &rest[i + 1..];
        rest = if let Some(braced) = after.strip_prefix('{') {
            let len = braced.find(|c: char| !name(c)).unwrap_or(braced.len());
            if len == 0 || !braced[len..].starts_with('}') {
                return false;
            }
            &braced[len + 1..]
        } else {
            let len = after.find(|c: char| !name(c)).unwrap_or(after.len());
            if len == 0 {
                return false;
            }
            &after[len..]
        };
    }
    true
}

/// `$VAR` and `${VAR}` from the build arguments; anything left unresolved (or `unreadable`, a
/// value regobox cannot read as the engine does) is refused.
fn substitute(
    word: &str,
    scope: &BTreeMap<String, String>,
    unreadable: &[String],
) -> Result<String, Denied> {
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
        if unreadable.contains(&name) {
            return Err(deny(
                "Dockerfile",
                format!(
                    "cannot resolve {word:?}: the value of ${name} is quoted, escaped or made of variables"
                ),
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
            ("pull=1", "query.pull"),
            ("cpushares=262144", "query.cpushares"),
            ("cgroupparent=%2Fx", "query.cgroupparent"),
            (
                "ulimits=%5B%7B%22Name%22%3A%22nofile%22%7D%5D",
                "query.ulimits",
            ),
            // An attacker's (twelfth session): a line of its own in the build's /etc/hosts.
            (
                "extrahosts=foo%0A6.6.6.6%20evil.example.com%0A%23%3A1.2.3.4",
                "query.extrahosts",
            ),
            (
                "extrahosts=foo%3A1.2.3.4%0A6.6.6.6%20evil",
                "query.extrahosts",
            ),
            (
                "extrahosts=db%3A10.0.0.1&extrahosts=x%20y%3A1.2.3.4",
                "query.extrahosts",
            ),
        ] {
            let d =
                check_build_query(parse(raw, "build", BUILD).unwrap(), &limits, "i1").unwrap_err();
            assert_eq!(d.rule, field, "{raw}");
        }
        let many: Vec<String> = (0..=MAX_TAGS).map(|i| format!("t=a{i}")).collect();
        let d = check_build_query(
            parse(&many.join("&"), "build", BUILD).unwrap(),
            &limits,
            "i1",
        )
        .unwrap_err();
        assert_eq!(d.rule, "query.t");
        assert!(
            check_build_query(
                parse(&many[1..].join("&"), "build", BUILD).unwrap(),
                &limits,
                "i1"
            )
            .is_ok()
        );
        // Each host given, as regobox writes it.
        let raw = "t=a&extrahosts=db%3A10.0.0.1&extrahosts=v6%3A%5Bfe80%3A%3A1%5D";
        let q = check_build_query(parse(raw, "build", BUILD).unwrap(), &limits, "i1").unwrap();
        assert_eq!(
            q.all("extrahosts").collect::<Vec<_>>(),
            ["db:10.0.0.1", "v6:fe80::1"]
        );
        for raw in [
            "remote=http%3A%2F%2F127.0.0.1%2Fx",
            "session=x",
            "t=a&t=b&REMOTE=x",
        ] {
            assert!(parse(raw, "build", BUILD).is_err(), "{raw}");
        }
    }

    #[test]
    fn the_dockerfile_given_to_the_engine_is_regobox_rendering_with_the_label_after_each_from() {
        let read = read_dockerfile(
            "\u{feff}# escape=`\r\nARG B=x\r\nFROM  a `\r\n# c\r\n  AS one\r\nRUN echo `\r\n\r\n hi\r\n\r\nfrom one\r\nCOPY --from=one /a /b\r\n",
            &BTreeMap::new(),
            "i1",
        )
        .unwrap();
        assert_eq!(read.images, vec!["a".to_string()]);
        assert_eq!(
            read.rendered,
            "# escape=`\nARG B=x\nFROM  a   AS one\nLABEL regobox.instance=i1\nRUN echo  hi\nfrom one\nLABEL regobox.instance=i1\nCOPY --from=one /a /b\n"
        );
        // A value that is not a plain word is quoted, its quotes and escapes escaped.
        assert_eq!(label_value("a-b_c.d:1", '\\'), "a-b_c.d:1");
        assert_eq!(label_value("a \"b\\", '\\'), "\"a \\\"b\\\\\"");
        assert_eq!(label_value("", '`'), "\"\"");
    }

    #[test]
    fn no_label_key_a_reading_could_take_for_the_instances() {
        let read = |text: &str| read_dockerfile(text, &BTreeMap::new(), "i1");
        // An attacker's (twentieth session): each made step images labelled `evil`.
        for label in [
            "LABEL regobox.instance=evil",
            "LABEL regobox\\.instance=evil",
            "LABEL \"regobox\".instance=evil",
            "LABEL regobox.instance evil",
            "LABEL regobox.inst${NOPE}ance=evil",
            "LABEL regobox.instanc\\e evil",
            "LABEL $K=evil",
            "LABEL ${K}=evil",
            "LABEL a=1 regobox.instance=evil b=2",
            "LABEL a=\"x\" regobox.instance=evil",
            "LABEL 'regobox.instance'=evil",
            "label regobox.instance=evil",
            // An attacker's (thirty-third session): Docker's own namespaces.
            "LABEL com.docker.compose.project=srv",
            "LABEL a=1 COM.DOCKER.compose.service=db",
            "LABEL io.docker.x=1",
        ] {
            let text = format!("ARG K=regobox.instance\nFROM a\n{label}\n");
            assert!(read(&text).is_err(), "{label}");
        }
        // With the backtick escape, a backslash is a character, a backtick escapes.
        assert!(read("# escape=`\nFROM a\nLABEL regobox.`instance=evil\n").is_err());
        // Labels of the application's own, values quoted, escaped, spaced (Docker's own
        // example), the old form.
        for label in [
            "LABEL version=\"1.0\" description=\"This text illustrates \\\nthat label-values can span multiple lines.\"",
            "LABEL a=1 b=\"x regobox.instance=y\" c='z = w'",
            "LABEL description=\"a \\\"quoted\\\" = thing\"",
            "LABEL maintainer me@example.org",
            "LABEL regobox.instance.note=fine",
        ] {
            let text = format!("FROM a\n{label}\n");
            assert!(read(&text).is_ok(), "{label}: {:?}", read(&text));
        }
    }

    #[test]
    fn an_instruction_longer_than_the_engine_takes_is_rendered_on_lines_it_joins_back() {
        let run: String = (0..8000)
            .map(|i| format!("echo {i} \\\n  && "))
            .collect::<String>()
            + "true\n";
        let text = format!("FROM a\nRUN {run}");
        let read = read_dockerfile(&text, &BTreeMap::new(), "i1").unwrap();
        assert!(read.rendered.lines().all(|l| l.len() < ENGINE_LINE));
        assert!(read.rendered.lines().count() > 3);
        // Read again, the rendering renders the same: the same instructions.
        let ours = "LABEL regobox.instance=i1\n";
        let again =
            read_dockerfile(&read.rendered.replace(ours, ""), &BTreeMap::new(), "i1").unwrap();
        assert_eq!(again.rendered, read.rendered);
        let joined = |r: &str| r.replace("\\\n", "");
        assert_eq!(
            joined(&read.rendered),
            format!("FROM a\n{ours}RUN {}", run.replace("\\\n", ""))
        );
        // A piece never ends with the escape character, and the next never starts as a comment.
        let tricky = format!("FROM a\nRUN {}\n", "x\\ #".repeat(40_000));
        let read = read_dockerfile(&tricky, &BTreeMap::new(), "i1").unwrap();
        for l in read.rendered.lines() {
            assert!(l.len() < ENGINE_LINE);
            assert!(!l.trim_start().starts_with('#') || l.starts_with("# escape"));
        }
        assert_eq!(
            joined(&read.rendered),
            format!(
                "FROM a\nLABEL regobox.instance=i1\nRUN {}\n",
                "x\\ #".repeat(40_000)
            )
        );
    }

    #[test]
    fn dockerfiles() {
        let args = BTreeMap::from([("BASE".to_string(), "mine:1".to_string())]);
        let images = dockerfile_images(
            "# syntax comment\nARG BASE=other\nARG TAG=2\nFROM --platform=$BUILDPLATFORM ${BASE} AS build\nRUN x \\\n  && y\nFROM scratch\nCOPY --from=build /a /b\nCOPY --from=their/img:2 [\"/c d\", \"/e\"]\nFROM build\nADD local.tar /\nADD --chown=1:1 [\"a b\", \"/c\"]\nRUN echo \"it's\" \\\n  'fine'\n",
            &args,
        )
        .unwrap();
        assert_eq!(
            images,
            vec!["mine:1".to_string(), "their/img:2".to_string()]
        );
        // Continuations joined as the engine joins them (no space added).
        let images = dockerfile_images(
            "FROM mi\\\nne\nFROM th\\  \n\n# c\neirs AS x\n",
            &BTreeMap::new(),
        )
        .unwrap();
        assert_eq!(images, vec!["mine".to_string(), "theirs".to_string()]);
        let images = dockerfile_images("FROM own-vic\\\ntim:latest\n", &BTreeMap::new()).unwrap();
        assert_eq!(images, vec!["own-victim:latest".to_string()]);
        // An escaped escape character ends the line, as for the engine.
        let images = dockerfile_images(
            "FROM scratch\nMAINTAINER me \\\\\nFROM victim\n",
            &BTreeMap::new(),
        )
        .unwrap();
        assert_eq!(images, vec!["victim".to_string()]);
        // The engine skips empty and comment lines inside a continuation.
        let images = dockerfile_images(
            "FROM mine\nCOPY \\\n\n# c\n--from=theirs /a /b\n",
            &BTreeMap::new(),
        )
        .unwrap();
        assert_eq!(images, vec!["mine".to_string(), "theirs".to_string()]);
        // An unknown directive ends the directives: the escape stays a backslash.
        assert!(dockerfile_images("# foo=bar\n# escape=`\nFROM a\n", &BTreeMap::new()).is_err());
        let images = dockerfile_images(
            "FROM a AS b\nCOPY --from=99999999999999999999 /x /y\nCOPY --from=0 /x /y\n",
            &BTreeMap::new(),
        )
        .unwrap();
        assert_eq!(
            images,
            vec![
                "a".to_string(),
                "99999999999999999999".to_string(),
                "0".to_string()
            ]
        );
        // A stage's name, and its index, are the stage's once it is complete.
        let images = dockerfile_images(
            "FROM a AS b\nFROM c AS d\nCOPY --from=d /x /y\nCOPY --from=1 /x /y\nCOPY --from=b /x /y\nCOPY --from=0 /x /y\nFROM d\n",
            &BTreeMap::new(),
        )
        .unwrap();
        assert_eq!(
            images,
            vec![
                "a".to_string(),
                "c".to_string(),
                "d".to_string(),
                "1".to_string()
            ]
        );
        assert!(check_import_changes(&["CMD [\"x\"]", "ENV A=b"]).is_ok());
        for bad in [
            "ONBUILD ADD http://x /y",
            "VOLUME /data",
            "LABEL regobox.instance=x",
        ] {
            assert!(check_import_changes(&[bad]).is_err(), "{bad}");
        }
        for text in [
            "FROM a\nONBUILD COPY --from=victim /s /s\n",
            "FROM a\nARG U=http://127.0.0.1:5078/x\nADD $U /x\n",
            "FROM a\nADD [\"${U}\", \"/x\"]\n",
            "FROM a\nADD http://127.0.0.1:8081/x /x\n",
            "FROM a\nadd --chown=1 https://example.org/x /x\n",
            "FROM a\nADD [\"http://127.0.0.1/x\", \"/x\"]\n",
            "FROM a\nADD \\\n  http://127.0.0.1/x /x\n",
            "FROM $UNSET\n",
            "# escape=`\nFROM a\nADD `\n  http://127.0.0.1/x /x\n",
            // What the engine's parser and word processing read otherwise (an attacker's).
            "FROM a\nMAINTAINER a \\\x0c\nFROM victim\n",
            "FROM a\nLABEL x=\\\x0b\nADD http://127.0.0.1/x /x\n",
            "FROM a\nLABEL x=\\\u{a0}\nADD http://127.0.0.1/x /x\n",
            "FROM a\rFROM victim\n",
            "FROM a\nADD http:\\//127.0.0.1/x /x\n",
            "FROM a\nADD [\"http:\\\\//127.0.0.1/x\", \"/x\"]\n",
            "FROM a\nADD 'http://127.0.0.1/x' /x\n",
            "FROM a\nADD \"ht\"tp://127.0.0.1/x /x\n",
            "FROM \"victim\"\n",
            "FROM a\nCOPY --from=\"victim\" /s /s\n",
            "FROM a\nCOPY --from=vic\\tim /s /s\n",
            // A third attacker's (2026-12-03), after the fixes above.
            "FROM a\nADD http://127.0.0.1:18766/evil.txt /d[]\n",
            "FROM a\nADD http:\\\n//127.0.0.1:18766/evil.txt /x\n",
            "FROM a\nCOPY --fr\"\"om=victim /s /s\n",
            "FROM a\nCOPY --\\from=victim /s /s\n",
            "FROM --platform=\"linux/amd64${NOPE:+ a }\" victim\n",
            "FROM --platform=linux${NOPE:+x} victim\n",
            "ARG S=own\nARG S\nFROM victim${S}\n",
            "ARG S=\"own\"\nFROM victim${S}\n",
            "FROM a\nCOPY --from=$X /s /s\n",
            "FROM a\nONBU\u{130}LD ADD http://127.0.0.1/x /x\n",
            // A fresh reviewer's (2026-12-03), reading both parsers.
            "# syntax=\n# escape=`\nFROM scratch\nMAINTAINER me `\nFROM victim\n",
            "# 1x=y\n# escape=`\nFROM scratch\nMAINTAINER me `\nFROM victim\n",
            "FROM a\nCOPY --chown=$X\u{e0}--from=victim /secret /s\n",
            "FROM a\nADD --chown=$X\u{e0}http://169.254.169.254/ /m\n",
            "FROM a b c d\n",
        ] {
            assert!(dockerfile_images(text, &BTreeMap::new()).is_err(), "{text}");
        }
    }
}

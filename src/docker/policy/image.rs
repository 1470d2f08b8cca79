//! What a pull or an import makes: one reference, read as the engine reads it.
//!
//! The engine applies the `tag` parameter to the repository with `WithTag`, which replaces a tag
//! already in the name: `repo=victim:unused&tag=latest` moves `victim:latest`. A name with a tag
//! or digest is therefore refused when `tag` is given too, and the reference judged is the one
//! the engine will make.

use super::build::check_import_changes;
use super::container::deny;
use super::query::Query;
use super::{Denied, valid_image_ref};

/// A pull or an import the policy allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageCreatePlan {
    /// The reference made (empty: an untagged import, the id printed at the end).
    pub reference: String,
    pub import: bool,
}

fn has_tag_or_digest(name: &str) -> bool {
    name.contains('@') || name.rsplit('/').next().unwrap_or(name).contains(':')
}

/// `name` with `tag` (a digest after `@`), refusing a second tag.
fn reference(name: &str, tag: &str, field: &str) -> Result<String, Denied> {
    if !valid_image_ref(name) {
        return Err(deny(field, format!("{name:?} is not an image reference")));
    }
    if tag.is_empty() {
        return Ok(name.to_string());
    }
    if has_tag_or_digest(name) {
        return Err(deny(
            "query.tag",
            format!(
                "is given while {name:?} already names a tag or digest (the engine would replace it)"
            ),
        ));
    }
    if tag.starts_with("sha256:") {
        return Ok(format!("{name}@{tag}"));
    }
    if !tag
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
        || tag.len() > 128
    {
        return Err(deny("query.tag", format!("{tag:?} is not a tag")));
    }
    Ok(format!("{name}:{tag}"))
}

/// The registry a reference names, as the engine reads it: the first component when it holds a
/// `.` or a `:` or is `localhost`, else Docker Hub.
pub fn registry_of(reference: &str) -> String {
    let first = reference.split('/').next().unwrap_or("");
    let named = reference.contains('/')
        && (first.contains('.') || first.contains(':') || first == "localhost");
    if !named {
        return "docker.io".into();
    }
    match first.to_ascii_lowercase().as_str() {
        "index.docker.io" | "registry-1.docker.io" => "docker.io".into(),
        other => other.to_string(),
    }
}

/// `reference` without the default registry and namespace, as the engine shows it (its
/// `FamiliarName`): its legacy name (`index.docker.io`) and `docker.io`, then `library/` where a
/// single name follows it. `library/a/b` is a repository of its own, not `a/b` (an attacker's,
/// twenty-fourth session: the application's `library/atthost/prod:1` was recorded as the
/// host's `atthost/prod:1`, which it then moved).
fn without_default_registry(reference: &str) -> &str {
    let r = ["index.docker.io/", "docker.io/"]
        .iter()
        .find_map(|p| reference.strip_prefix(p))
        .unwrap_or(reference);
    match r.strip_prefix("library/") {
        Some(name) if !name.contains('/') => name,
        _ => r,
    }
}

/// Whether a tag the engine reports (`docker.io/library/x:1` is `x:1`) is `reference`.
pub fn same_reference(tag: &str, reference: &str) -> bool {
    familiar(tag) == familiar(reference)
}

/// `reference` as the engine reports its tags (`RepoTags`): `docker.io/library/x` is `x:latest`.
pub fn familiar(reference: &str) -> String {
    let r = without_default_registry(reference).to_string();
    let last = r.rsplit('/').next().unwrap_or(&r);
    if last.contains(':') || r.contains('@') {
        r
    } else {
        format!("{r}:latest")
    }
}

/// Whether a tag made as `reference` would be read in place of an image id: the engine looks a
/// name up as a tag before it looks it up as an id prefix, so a repository named like an id
/// (12 to 64 hexadecimal digits, in `docker.io/library`, as `docker run <id>` writes it) would
/// later stand for whatever image that id names (an attacker's finding, nineteenth session).
/// Refused, as for container and network names.
pub fn names_like_an_id(reference: &str) -> bool {
    let name = reference.split(['@']).next().unwrap_or(reference);
    let name = match name.rsplit_once(':') {
        Some((repo, tag)) if !tag.contains('/') => repo,
        _ => name,
    };
    let name = without_default_registry(name);
    (12..=64).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c))
}

/// A reference's repository and tag, as the engine's tag endpoint takes them (`latest` where it
/// names none; a registry's port is not a tag). For references without a digest.
pub fn split_tag(reference: &str) -> (&str, &str) {
    let last = reference.rsplit('/').next().unwrap_or(reference);
    match last.rfind(':') {
        Some(i) => {
            let cut = reference.len() - last.len() + i;
            (&reference[..cut], &reference[cut + 1..])
        }
        None => (reference, "latest"),
    }
}

/// Check a `POST /images/create`'s parameters; pulls only from `registries`.
pub fn check_image_create(q: &Query, registries: &[String]) -> Result<ImageCreatePlan, Denied> {
    let get = |k: &str| q.get(k).unwrap_or("");
    let changes: Vec<&str> = q.all("changes").collect();
    if !get("fromImage").is_empty() {
        if !get("fromSrc").is_empty() || !get("repo").is_empty() || !changes.is_empty() {
            return Err(deny(
                "query.fromSrc",
                "a pull takes no fromSrc, repo or changes",
            ));
        }
        let reference = reference(get("fromImage"), get("tag"), "query.fromImage")?;
        if !has_tag_or_digest(&reference) {
            return Err(deny(
                "query.tag",
                "is missing: a pull without a tag or digest pulls every tag of the repository",
            ));
        }
        let registry = registry_of(&reference);
        if !registries.iter().any(|r| r.eq_ignore_ascii_case(&registry)) {
            return Err(deny(
                "query.fromImage",
                format!(
                    "names the registry {registry}, which is not in docker.policy.registries ({}): the engine would contact it, and the server it names, from the host's network",
                    registries.join(", ")
                ),
            ));
        }
        if names_like_an_id(&reference) {
            return Err(deny(
                "query.fromImage",
                format!(
                    "{reference:?} is named like an image id: the name would stand for that id"
                ),
            ));
        }
        return Ok(ImageCreatePlan {
            reference,
            import: false,
        });
    }
    match get("fromSrc") {
        "-" => {}
        "" => {
            return Err(deny(
                "query.fromImage",
                "is missing: an image create names neither fromImage nor fromSrc",
            ));
        }
        other => {
            return Err(deny(
                "query.fromSrc",
                format!(
                    "{other:?} makes the engine fetch a URL from the host's network (send the image in the request body: fromSrc=-)"
                ),
            ));
        }
    }
    check_import_changes(&changes)?;
    let reference = if get("repo").is_empty() {
        if !get("tag").is_empty() {
            return Err(deny("query.tag", "is given without a repo"));
        }
        String::new()
    } else {
        if get("repo").contains('@') {
            return Err(deny("query.repo", "an import cannot name a digest"));
        }
        let made = reference(get("repo"), get("tag"), "query.repo")?;
        if made.contains('@') {
            return Err(deny("query.tag", "an import cannot name a digest"));
        }
        if names_like_an_id(&made) {
            return Err(deny(
                "query.repo",
                format!("{made:?} is named like an image id: the name would stand for that id"),
            ));
        }
        made
    };
    Ok(ImageCreatePlan {
        reference,
        import: true,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::docker::policy::query::{IMAGE_CREATE, parse};

    fn check(raw: &str) -> Result<ImageCreatePlan, Denied> {
        let registries = vec!["docker.io".to_string(), "reg:5000".to_string()];
        check_image_create(
            &parse(raw, "an image create", IMAGE_CREATE).unwrap(),
            &registries,
        )
    }

    #[test]
    fn a_reference_splits_into_repository_and_tag() {
        assert_eq!(split_tag("a/b:1"), ("a/b", "1"));
        assert_eq!(split_tag("a/b"), ("a/b", "latest"));
        assert_eq!(split_tag("reg:5000/b"), ("reg:5000/b", "latest"));
        assert_eq!(split_tag("reg:5000/b:x.1"), ("reg:5000/b", "x.1"));
        assert!(check("fromSrc=-&repo=a&tag=sha256%3Aabc").is_err());
    }

    #[test]
    fn a_name_that_reads_as_an_image_id_is_refused() {
        for named in [
            "a0dd48a413e2",
            "a0dd48a413e2:latest",
            "docker.io/library/a0dd48a413e2:1",
            "library/a0dd48a413e2",
            "index.docker.io/a0dd48a413e2",
            "index.docker.io/library/a0dd48a413e2:latest",
        ] {
            assert!(names_like_an_id(named), "{named}");
        }
        for plain in [
            "cafe",
            "a0dd48a413e2x",
            "lab/a0dd48a413e2",
            "reg:5000/x",
            "regobox-demo/job:1",
        ] {
            assert!(!names_like_an_id(plain), "{plain}");
        }
        assert!(same_reference("foo:1", "index.docker.io/foo:1"));
        assert!(same_reference("foo:1", "library/foo:1"));
        assert!(!same_reference("a/b:1", "library/a/b:1"));
        assert!(!same_reference("a/b:1", "docker.io/library/a/b:1"));
        assert_eq!(familiar("docker.io/library/a/b"), "library/a/b:latest");
        assert_eq!(familiar("docker.io/a/b:2"), "a/b:2");
        assert_eq!(familiar("localhost:5000/a"), "localhost:5000/a:latest");
        assert!(same_reference("docker.io/library/foo", "foo:latest"));
        assert!(!same_reference("foo:1", "other.io/foo:1"));
        let refused = check("fromSrc=-&repo=a0dd48a413e2").unwrap_err();
        assert_eq!(refused.rule, "query.repo");
        assert!(check("fromImage=a0dd48a413e2&tag=1").is_err());
    }

    #[test]
    fn the_demo_import_is_allowed() {
        let plan = check("fromSrc=-&repo=regobox-demo/job&tag=1").unwrap();
        assert_eq!(plan.reference, "regobox-demo/job:1");
        assert!(plan.import);
    }

    #[test]
    fn the_reference_the_engine_makes() {
        assert_eq!(
            check("fromImage=busybox&tag=1.36").unwrap().reference,
            "busybox:1.36"
        );
        assert_eq!(
            check("fromImage=reg%3A5000%2Fa%2Fb%3A2").unwrap().reference,
            "reg:5000/a/b:2"
        );
        assert_eq!(
            check("fromImage=a&tag=sha256%3Aab").unwrap().reference,
            "a@sha256:ab"
        );
        assert_eq!(
            check("fromSrc=-&repo=mine&tag=1").unwrap().reference,
            "mine:1"
        );
        assert_eq!(check("fromSrc=-").unwrap().reference, "");
        assert_eq!(registry_of("library/busybox:1"), "docker.io");
        assert!(same_reference(
            "docker.io/library/busybox:latest",
            "busybox"
        ));
        assert!(!same_reference("victim/app:1", "mirror/copy:1"));
        assert_eq!(registry_of("index.docker.io/a/b:1"), "docker.io");
        assert_eq!(registry_of("127.0.0.1:5000/a:1"), "127.0.0.1:5000");
        for (raw, rule) in [
            (
                "fromSrc=-&repo=victim%2Fapp%3Aunused&tag=latest",
                "query.tag",
            ),
            ("fromImage=victim%2Fapp%3Aunused&tag=latest", "query.tag"),
            ("fromImage=busybox", "query.tag"),
            ("fromSrc=http%3A%2F%2F127.0.0.1%2Fx", "query.fromSrc"),
            (
                "fromSrc=-&changes=ONBUILD+ADD+http%3A%2F%2Fx+%2Fy",
                "query.changes",
            ),
            ("fromSrc=-&changes=VOLUME+%2Fdata", "query.changes"),
            // An attacker's (twelfth session): a second instruction on a line of its own.
            (
                "fromSrc=-&changes=ENV+A%3Db%0ALABEL+regobox.instance%3Dother",
                "query.changes",
            ),
            ("fromSrc=-&changes=ENV+A%3Db%0DVOLUME+%2Fv", "query.changes"),
            (
                "fromSrc=-&changes=ENV+A%3Db+%5C&changes=VOLUME+%2Fv",
                "query.changes",
            ),
            ("fromSrc=-&changes=%23+escape%3D%60", "query.changes"),
            // The third attacker's: a separator the engine splits words on.
            ("fromSrc=-&changes=ENV+A%3Db%E2%80%A8C%3Dd", "query.changes"),
            ("fromImage=a%3F%2Fb&tag=1", "query.fromImage"),
            ("fromImage=a&tag=1&changes=CMD+x", "query.fromSrc"),
            ("", "query.fromImage"),
            ("fromImage=127.0.0.1%3A5079%2Fx&tag=1", "query.fromImage"),
            ("fromImage=localhost%2Fx&tag=1", "query.fromImage"),
            ("fromImage=evil.example%2Fx&tag=1", "query.fromImage"),
        ] {
            assert_eq!(check(raw).unwrap_err().rule, rule, "{raw}");
        }
    }
}

//! What a network the application creates may be: a plain bridge that touches no host
//! interface, with addresses the engine picks.

use std::collections::BTreeMap;

use super::container::{deny, is_default_network};
use super::{Denied, INSTANCE_LABEL};
use crate::docker::model::NetworkCreate;

/// Driver options a bridge may take (the others name host interfaces or change the host's
/// firewall: `com.docker.network.bridge.name`, `...host_binding_ipv4`, masquerading).
const OPTIONS: &[&str] = &["com.docker.network.driver.mtu"];

/// Check a network create and build the body to forward, labelled as the instance's.
pub fn check_network_create(req: &NetworkCreate, instance: &str) -> Result<NetworkCreate, Denied> {
    let name = req.name.clone().unwrap_or_default();
    if name.is_empty() {
        return Err(deny("Name", "is missing"));
    }
    // The engine's own names, for networks it makes itself (swarm's `ingress` and
    // `docker_gwbridge`, Windows' `nat`): one of the application's there would be taken for it.
    const ENGINES: &[&str] = &["host", "ingress", "docker_gwbridge", "nat"];
    if is_default_network(&name)
        || ENGINES.contains(&name.as_str())
        || !super::valid_new_name(&name)
    {
        return Err(deny(
            "Name",
            format!(
                "{name:?} is reserved or not a network name (letters, digits, _ . -; not one that looks like an id)"
            ),
        ));
    }
    match req.driver.as_deref() {
        None | Some("") | Some("bridge") => {}
        Some(other) => {
            return Err(deny(
                "Driver",
                format!("{other:?} is not allowed (bridge only)"),
            ));
        }
    }
    match req.scope.as_deref() {
        None | Some("") | Some("local") => {}
        Some(other) => return Err(deny("Scope", format!("{other:?} is not allowed"))),
    }
    if req.ingress == Some(true) {
        return Err(deny("Ingress", "is not allowed"));
    }
    if req.config_only == Some(true) {
        return Err(deny("ConfigOnly", "is not allowed"));
    }
    if req.config_from.as_ref().is_some_and(|v| !v.is_null()) {
        return Err(deny("ConfigFrom", "is not allowed"));
    }
    for key in req.options.iter().flat_map(|o| o.keys()) {
        if !OPTIONS.contains(&key.as_str()) {
            return Err(deny(
                "Options",
                format!("{key:?} is not allowed (allowed: {})", OPTIONS.join(", ")),
            ));
        }
    }
    if let Some(i) = &req.ipam {
        {
            match i.driver.as_deref() {
                None | Some("") | Some("default") => {}
                Some(other) => {
                    return Err(deny("IPAM.Driver", format!("{other:?} is not allowed")));
                }
            }
            if i.options.as_ref().is_some_and(|o| !o.is_empty()) {
                return Err(deny("IPAM.Options", "is not allowed"));
            }
            if i.config.as_ref().is_some_and(|c| !c.is_empty()) {
                return Err(deny(
                    "IPAM.Config",
                    "is not allowed: a subnet of the application's choosing could shadow the host's own networks (the engine picks one from its pools)",
                ));
            }
        }
    }
    let mut labels: BTreeMap<String, String> = req.labels.clone().unwrap_or_default();
    super::check_labels("Labels", labels.keys())?;
    labels.insert(INSTANCE_LABEL.into(), instance.to_string());
    Ok(NetworkCreate {
        name: Some(name),
        // Always: a second network of a taken name would make the first ambiguous to its owner.
        check_duplicate: Some(true),
        driver: Some("bridge".into()),
        enable_ipv6: req.enable_ipv6,
        internal: req.internal,
        attachable: req.attachable,
        options: req.options.clone().filter(|o| !o.is_empty()),
        labels: Some(labels),
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::docker::model::decode;

    fn check(body: &str) -> Result<NetworkCreate, Denied> {
        let req: NetworkCreate = decode(body.as_bytes(), "network create")
            .map_err(|e| Denied::new(e.field, e.message))?;
        check_network_create(&req, "i1")
    }

    #[test]
    fn only_plain_bridges() {
        for (body, field) in [
            (r#"{"Name":"n","Driver":"macvlan"}"#, "Driver"),
            // An attacker's (twelfth session): the engine's own names.
            (r#"{"Name":"docker_gwbridge"}"#, "Name"),
            (r#"{"Name":"ingress"}"#, "Name"),
            (r#"{"Name":"n","Driver":"ipvlan"}"#, "Driver"),
            (
                r#"{"Name":"n","Options":{"com.docker.network.bridge.name":"docker0"}}"#,
                "Options",
            ),
            (r#"{"Name":"n","Options":{"parent":"eth0"}}"#, "Options"),
            (r#"{"Name":"n","ConfigOnly":true}"#, "ConfigOnly"),
            (r#"{"Name":"n","ConfigFrom":{"Network":"x"}}"#, "ConfigFrom"),
            (r#"{"Name":"n","Ingress":true}"#, "Ingress"),
            (r#"{"Name":"n","Scope":"swarm"}"#, "Scope"),
            (
                r#"{"Name":"n","IPAM":{"Config":[{"Subnet":"10.0.0.0/8"}]}}"#,
                "IPAM.Config",
            ),
            (r#"{"Name":"n","IPAM":{"Driver":"x"}}"#, "IPAM.Driver"),
            (r#"{"Name":"bridge"}"#, "Name"),
            (r#"{"Name":"host"}"#, "Name"),
            (r#"{"Name":"0123456789abcdef"}"#, "Name"),
            (r#"{}"#, "Name"),
            // An attacker's (thirty-third session): the host's compose took this network for
            // its project's.
            (
                r#"{"Name":"srv_default","Labels":{"com.docker.compose.project":"srv","com.docker.compose.network":"default"}}"#,
                "Labels",
            ),
        ] {
            let d = check(body).unwrap_err();
            assert_eq!(d.rule, field, "{body}: {}", d.message);
        }
        for body in [r#"{"Name":"n","options":{}}"#, r#"{"Name":"n","Name":"m"}"#] {
            assert!(check(body).is_err(), "{body}");
        }
        let ok = check(r#"{"Name":"jobs","CheckDuplicate":true,"Labels":{"a":"b"},"IPAM":{"Driver":"default","Config":[],"Options":{}}}"#).unwrap();
        let v = serde_json::to_value(&ok).unwrap();
        assert_eq!(v["Labels"][INSTANCE_LABEL], "i1");
        assert_eq!(v["Driver"], "bridge");
        assert!(v.get("IPAM").is_none());
    }
}

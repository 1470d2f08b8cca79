//! The names a job's create gives its own container (`Hostname`, `Domainname`, `Dns`,
//! `DnsSearch`, `DnsOptions`, `ExtraHosts`): the engine writes them into the container's
//! `/etc/hostname`, `/etc/hosts` and `/etc/resolv.conf`, a line each. Each is read into what it
//! names (an address, a host or domain name of RFC 1123 labels, a resolver option) and forwarded
//! as regobox writes it, so no value carries a line of its own, or anything but its one meaning.

use std::net::IpAddr;

use super::Denied;
use super::container::deny;

/// Labels of letters, digits and `-` (not first or last), 1 to 63 bytes each, dot-separated;
/// at most `max` bytes in all (a trailing dot is dropped).
fn dns_name(value: &str, max: usize) -> Option<String> {
    let name = value.strip_suffix('.').unwrap_or(value);
    let ok = !name.is_empty()
        && name.len() <= max
        && name.split('.').all(|label| {
            (1..=63).contains(&label.len())
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        });
    ok.then(|| name.to_string())
}

/// `Hostname`: a host name the kernel holds (at most 64 bytes); empty is the engine's default.
pub(super) fn host_name(value: Option<&str>) -> Result<Option<String>, Denied> {
    optional_name(value, "Hostname", "host", 64)
}

/// `Domainname`: a domain name; empty is the engine's default. At most 64 bytes, what the kernel
/// keeps of the job's `kernel.domainname` (it cuts a longer one, where `/etc/hosts` has it
/// whole).
pub(super) fn domain_name(value: Option<&str>) -> Result<Option<String>, Denied> {
    optional_name(value, "Domainname", "domain", 64)
}

/// A network alias: a host name other jobs on the network resolve to this one.
pub(super) fn alias(value: &str) -> Result<String, String> {
    dns_name(value, 253).ok_or_else(|| "is not a host name".into())
}

/// A name of at most `max` bytes in `field`, or none (absent or empty).
fn optional_name(
    value: Option<&str>,
    field: &str,
    what: &str,
    max: usize,
) -> Result<Option<String>, Denied> {
    match value {
        None | Some("") => Ok(None),
        Some(v) => dns_name(v, max).map(Some).ok_or_else(|| {
            deny(
                field,
                format!(
                    "{v:?} is not a {what} name (labels of letters, digits and -, at most {max} bytes)"
                ),
            )
        }),
    }
}

/// Each of a list read by `read` (the reason it is refused otherwise); an empty list is none.
pub(super) fn each(
    values: Option<&[String]>,
    field: &str,
    read: fn(&str) -> Result<String, String>,
) -> Result<Option<Vec<String>>, Denied> {
    let Some(values) = values.filter(|v| !v.is_empty()) else {
        return Ok(None);
    };
    if values.len() > 64 {
        return Err(deny(
            field,
            format!("has {} entries (at most 64)", values.len()),
        ));
    }
    values
        .iter()
        .map(|v| read(v).map_err(|why| deny(field, format!("{v:?}: {why}"))))
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

/// A name server: an IP address.
pub(super) fn dns_server(value: &str) -> Result<String, String> {
    value
        .parse::<IpAddr>()
        .map(|ip| ip.to_string())
        .map_err(|_| "is not an IP address".into())
}

/// A link-local address (169.254.0.0/16, fe80::/10): another would be another host's or
/// container's on the network.
pub(super) fn link_local(value: &str) -> Result<String, String> {
    match value.parse::<IpAddr>() {
        Ok(IpAddr::V4(ip)) if ip.is_link_local() => Ok(ip.to_string()),
        Ok(IpAddr::V6(ip)) if (ip.segments()[0] & 0xffc0) == 0xfe80 => Ok(ip.to_string()),
        _ => Err("is not a link-local address".into()),
    }
}

/// A search domain.
pub(super) fn search_domain(value: &str) -> Result<String, String> {
    dns_name(value, 253).ok_or_else(|| "is not a domain name".into())
}

/// A resolver option: a word of lower-case letters, digits and `-`, with a number after `:` for
/// some (`ndots:2`, `timeout:1`, `rotate`, `edns0`, `use-vc`).
pub(super) fn dns_option(value: &str) -> Result<String, String> {
    let (word, number) = match value.split_once(':') {
        Some((w, n)) => (w, Some(n)),
        None => (value, None),
    };
    let word_ok = (1..=32).contains(&word.len())
        && word
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    let number_ok =
        number.is_none_or(|n| (1..=5).contains(&n.len()) && n.bytes().all(|b| b.is_ascii_digit()));
    if word_ok && number_ok {
        Ok(value.to_string())
    } else {
        Err("is not a resolver option (a word, and `:` and a number for some)".into())
    }
}

/// `name:address`: a host name and an IP address (or `host-gateway`, the engine's name for the
/// host's address on the job's network), written back as `name:address`.
pub(super) fn extra_host(value: &str) -> Result<String, String> {
    let (name, address) = value
        .split_once(':')
        .ok_or_else(|| "is not name:address".to_string())?;
    let name = dns_name(name, 253).ok_or_else(|| "does not start with a host name".to_string())?;
    let address = if address == "host-gateway" {
        address.to_string()
    } else {
        let bare = address
            .strip_prefix('[')
            .and_then(|a| a.strip_suffix(']'))
            .unwrap_or(address);
        bare.parse::<IpAddr>()
            .map_err(|_| "does not end with an IP address (or host-gateway)".to_string())?
            .to_string()
    };
    Ok(format!("{name}:{address}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_read_and_written_back_or_refused() {
        assert_eq!(host_name(Some("job-1")).unwrap(), Some("job-1".into()));
        assert_eq!(host_name(Some("")).unwrap(), None);
        for bad in ["a\nb", "a b", "-a", "a..b", "a_b", &"x".repeat(65), "é"] {
            assert!(host_name(Some(bad)).is_err(), "{bad:?}");
        }
        assert_eq!(
            domain_name(Some("lab.example.")).unwrap(),
            Some("lab.example".into())
        );
        assert_eq!(dns_server("10.0.0.53").unwrap(), "10.0.0.53");
        assert_eq!(dns_server("::1").unwrap(), "::1");
        for bad in [
            "1.1.1.1\noptions debug",
            "1.1.1.1 ",
            "localhost",
            "01.1.1.1x",
        ] {
            assert!(dns_server(bad).is_err(), "{bad:?}");
        }
        assert_eq!(dns_option("ndots:2").unwrap(), "ndots:2");
        assert_eq!(dns_option("use-vc").unwrap(), "use-vc");
        for bad in ["ndots:2\nnameserver 9.9.9.9", "a b", "ndots:", "x:1:2", ""] {
            assert!(dns_option(bad).is_err(), "{bad:?}");
        }
        assert_eq!(extra_host("db:10.0.0.1").unwrap(), "db:10.0.0.1");
        assert_eq!(extra_host("db:[::1]").unwrap(), "db:::1");
        assert_eq!(extra_host("v6:fe80::1").unwrap(), "v6:fe80::1");
        assert_eq!(extra_host("gw:host-gateway").unwrap(), "gw:host-gateway");
        for bad in [
            "db:10.0.0.1\n6.6.6.6 bank",
            "db 10.0.0.1",
            "db\tx:10.0.0.1",
            "db:",
            ":10.0.0.1",
        ] {
            assert!(extra_host(bad).is_err(), "{bad:?}");
        }
        assert!(search_domain("a b").is_err());
        let many: Vec<String> = (0..65).map(|i| format!("10.0.0.{i}")).collect();
        assert!(each(Some(&many), "HostConfig.Dns", dns_server).is_err());
        assert_eq!(each(Some(&[]), "HostConfig.Dns", dns_server).unwrap(), None);
    }
}

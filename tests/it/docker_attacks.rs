//! The Docker bridge against an application that is not well-behaved: crafted bodies, network
//! options, tags that belong to others, URLs for the engine to fetch, names that change hands,
//! bind sources swapped after the check; and the reference application's own client
//! (docker-py) running Regovar's job sequence. Every request here that must be refused would be
//! harmless if it were not: containers are created but never started, binds name a scratch
//! directory, networks a new bridge.

use std::io::Read;
use std::net::TcpListener;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use crate::docker::{
    Bridged, busybox_rootfs_tar, containers_of, engine, image_id, raw, raw_bytes, tar_of,
};
use crate::support::*;

/// A raw request with a body on the proxy socket.
fn send(socket: &Path, method: &str, path: &str, content_type: &str, body: &[u8]) -> (u16, String) {
    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nHost: d\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    request.extend_from_slice(body);
    raw_bytes(socket, &request)
}

/// A raw POST with a JSON body.
fn post(socket: &Path, path: &str, body: &str) -> (u16, String) {
    send(socket, "POST", path, "application/json", body.as_bytes())
}

/// A raw POST of a tar (a build context).
fn post_bytes(socket: &Path, path: &str, content_type: &str, body: &[u8]) -> (u16, String) {
    send(socket, "POST", path, content_type, body)
}

/// A connection to the socket `socket` on which a POST of the tar `body` to `path` was sent
/// (the answer left to read, within 60 s).
fn posted_tar(socket: &std::path::Path, path: &str, body: &[u8]) -> std::os::unix::net::UnixStream {
    use std::io::Write;
    let mut conn = std::os::unix::net::UnixStream::connect(socket).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    conn.write_all(
        format!(
            "POST {path} HTTP/1.1\r\nHost: d\r\nContent-Type: application/x-tar\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    )
    .unwrap();
    conn.write_all(body).unwrap();
    conn
}

/// A tar of (path, kind, content): kind 'f' a file, 'd' a directory, 'l' a link to content.
fn context(entries: &[(&str, char, &str)]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (path, kind, content) in entries {
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o755);
        match kind {
            'd' => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_size(0);
                b.append_data(&mut h, path, std::io::empty()).unwrap();
            }
            'l' => {
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_size(0);
                b.append_link(&mut h, path, content).unwrap();
            }
            _ => {
                h.set_size(content.len() as u64);
                b.append_data(&mut h, path, content.as_bytes()).unwrap();
            }
        }
    }
    b.into_inner().unwrap()
}

/// PAX extended header records (`length key=value\n`).
fn pax(records: &[(&str, &str)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (key, value) in records {
        let body = format!(" {key}={value}\n");
        let mut len = body.len() + 1;
        while len.to_string().len() + body.len() != len {
            len = len.to_string().len() + body.len();
        }
        out.extend_from_slice(format!("{len}{body}").as_bytes());
    }
    out
}

/// A tar of raw entries (type byte, name, data, whether the header carries the ustar magic),
/// for headers that a builder would not write.
fn raw_tar(entries: &[(u8, &str, Vec<u8>, bool)]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (kind, name, data, ustar) in entries {
        let mut h = if *ustar {
            tar::Header::new_ustar()
        } else {
            tar::Header::new_old()
        };
        h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
        h.set_entry_type(tar::EntryType::new(*kind));
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        h.set_cksum();
        b.append(&h, data.as_slice()).unwrap();
    }
    b.into_inner().unwrap()
}

fn message(body: &str) -> String {
    serde_json::from_str::<Value>(body)
        .ok()
        .and_then(|v| v["message"].as_str().map(str::to_string))
        .unwrap_or_else(|| body.to_string())
}

fn names(args: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = stdout(&engine(args))
        .split_whitespace()
        .map(str::to_string)
        .collect();
    v.sort();
    v
}

/// An image made directly on the engine (someone else's), holding `/etc/secret`.
fn foreign_image(dir: &Path, tag: &str, secret: &str) {
    let root = dir.join(format!("foreign-{}", tag.replace(['/', ':'], "-")));
    std::fs::create_dir_all(root.join("etc")).unwrap();
    std::fs::create_dir_all(root.join("bin")).unwrap();
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).unwrap();
    std::os::unix::fs::symlink("busybox", root.join("bin/sleep")).unwrap();
    std::fs::write(root.join("etc/secret"), secret).unwrap();
    let tar = dir.join(format!("{}.tar", tag.replace(['/', ':'], "-")));
    tar_of(&root, &tar);
    let out = Command::new("docker")
        .args(["import", "-", tag])
        .stdin(std::fs::File::open(tar).unwrap())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
}

/// The ids of the engine's networks named `name` exactly.
fn networks_named(name: &str) -> Vec<String> {
    let out = engine(&["network", "ls", "--format", "{{.ID}} {{.Name}}"]);
    stdout(&out)
        .lines()
        .filter_map(|l| l.split_once(' '))
        .filter(|(_, n)| *n == name)
        .map(|(id, _)| id.to_string())
        .collect()
}

/// Attack (thirty-third session): the engine's check that a network's name is free
/// (`CheckDuplicate`, which regobox sets) is a lookup and then a create with nothing between:
/// twelve creates of one name sent at once through the socket were all made, twelve bridges of
/// one name, each ambiguous to the engine (and the host's, raced the same way). Nor was the
/// number of networks bounded: each takes a subnet of the engine's pools, about 30, shared with
/// the host.
#[test]
fn networks_are_one_of_a_name_and_bounded_in_number() {
    let b = Bridged::start("[docker.limits]\nnetworks = 3");
    let on = OnEngine::default();
    let name = format!("rbx-race-{}", b.inst.port);
    let more: Vec<String> = (2..=4).map(|i| format!("{name}-{i}")).collect();
    on.network(&name);
    for n in &more {
        on.network(n);
    }
    let (socket, config) = (b.socket.clone(), b.docker_config.clone());
    let create = |name: &str| {
        Command::new("docker")
            .args(["network", "create", name])
            .env("DOCKER_HOST", format!("unix://{}", socket.display()))
            .env("DOCKER_CONFIG", &config)
            .output()
            .unwrap()
    };
    let outs: Vec<_> = std::thread::scope(|s| {
        let all: Vec<_> = (0..8).map(|_| s.spawn(|| create(&name))).collect();
        all.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let made = outs.iter().filter(|o| o.status.success()).count();
    assert_eq!(made, 1, "{:?}", outs);
    assert_eq!(networks_named(&name).len(), 1);
    for o in outs.iter().filter(|o| !o.status.success()) {
        assert!(stderr(o).contains("already exists"), "{}", stderr(o));
    }

    // Three at most: the fourth is refused, naming the ceiling, and not made.
    assert!(create(&more[0]).status.success());
    assert!(create(&more[1]).status.success());
    let out = create(&more[2]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("docker.limits.networks"),
        "{}",
        stderr(&out)
    );
    assert!(networks_named(&more[2]).is_empty());
    // One removed, one more can be made.
    b.cli_ok(&["network", "rm", &more[0]]);
    assert!(create(&more[2]).status.success());
    for n in [&name, &more[1], &more[2]] {
        b.cli_ok(&["network", "rm", n]);
    }

    // Clients that leave as soon as their create is sent (a second attacker's, the same
    // session): the handler was dropped with the connection, and the ceiling's lock with it,
    // while the engine went on making the network: seven made against a ceiling of four. The
    // handler runs to its end whatever its client does.
    let dropped: Vec<String> = (0..6).map(|i| format!("{name}-d{i}")).collect();
    for n in &dropped {
        on.network(n);
    }
    for n in &dropped {
        let body = format!(r#"{{"Name":"{n}"}}"#);
        let mut s = std::os::unix::net::UnixStream::connect(&socket).unwrap();
        std::io::Write::write_all(
            &mut s,
            format!("POST /v1.41/networks/create HTTP/1.1\r\nHost: d\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len()).as_bytes(),
        )
        .unwrap();
        std::thread::sleep(Duration::from_millis(20));
        drop(s);
    }
    let own = || {
        names(&[
            "network",
            "ls",
            "-q",
            "--filter",
            &format!("label=regobox.instance={}", b.instance_id()),
        ])
        .len()
    };
    // The engine's work ends in well under 10 s; the count never passes the ceiling meanwhile.
    let started = std::time::Instant::now();
    while started.elapsed() < Duration::from_secs(10) {
        assert!(own() <= 3, "{} networks", own());
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(own(), 3);
}

/// Attack (thirty-third session, cosmetic): `GET /info` was the engine's whole, telling the
/// application of the host and its other tenants (every container and image counted, the
/// host's name, the engine's root directory, proxies, registry mirrors, swarm). It shows what
/// describes the engine alone; `docker info` and `docker pull`'s registry still read it.
#[test]
fn the_engines_information_tells_nothing_of_the_host_or_other_tenants() {
    let b = Bridged::start("");
    let (status, body) = raw(
        &b.socket,
        "GET /v1.41/info HTTP/1.1\r\nHost: d\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(status, 200, "{body}");
    let info: Value = serde_json::from_str(&body).unwrap();
    let engine: Value =
        serde_json::from_str(&stdout(&engine(&["info", "--format", "{{json .}}"]))).unwrap();
    for kept in [
        "ServerVersion",
        "OSType",
        "Architecture",
        "IndexServerAddress",
    ] {
        assert_eq!(info[kept], engine[kept], "{kept}");
        assert!(!info[kept].is_null(), "{kept}");
    }
    for gone in [
        "Containers",
        "ContainersRunning",
        "Images",
        "Name",
        "ID",
        "DockerRootDir",
        "HttpProxy",
        "RegistryConfig",
        "Swarm",
        "Plugins",
        "Labels",
        "NFd",
    ] {
        assert!(engine.get(gone).is_some(), "the engine says {gone}");
        assert!(info.get(gone).is_none(), "{gone} shown: {body}");
    }
    let out = b.cli_ok(&["info", "--format", "{{.ServerVersion}} {{.OSType}}"]);
    assert_eq!(
        out.trim(),
        format!(
            "{} {}",
            engine["ServerVersion"].as_str().unwrap(),
            engine["OSType"].as_str().unwrap()
        )
    );
}

/// What a test made, or might have made had a refusal failed, directly on the engine: removed
/// when the test ends, failed or not.
#[derive(Default)]
struct OnEngine {
    containers: std::cell::RefCell<Vec<String>>,
    networks: std::cell::RefCell<Vec<String>>,
    images: std::cell::RefCell<Vec<String>>,
}

impl OnEngine {
    fn container(&self, c: &str) {
        self.containers.borrow_mut().push(c.to_string());
    }
    fn network(&self, n: &str) {
        self.networks.borrow_mut().push(n.to_string());
    }
    fn image(&self, i: &str) {
        self.images.borrow_mut().push(i.to_string());
    }
}

impl Drop for OnEngine {
    fn drop(&mut self) {
        // (With its anonymous volumes: a refusal that failed leaves none behind.)
        for c in self.containers.borrow().iter() {
            engine(&["rm", "-f", "-v", c]);
        }
        // By id: a name given twice (a refusal that failed) is ambiguous to the engine.
        for n in self.networks.borrow().iter() {
            for id in networks_named(n) {
                engine(&["network", "rm", &id]);
            }
        }
        for i in self.images.borrow().iter() {
            engine(&["rmi", "-f", i]);
        }
    }
}

#[test]
fn bodies_the_engine_would_read_otherwise_are_refused_with_nothing_created() {
    let mut b = Bridged::start("");
    let image = format!("regobox-test/busybox:crafted{}", b.inst.port);
    b.import_busybox(&image);
    let scratch = b.inst.dir.path().join("scratch");
    std::fs::create_dir_all(&scratch).unwrap();
    let ok_dir = b.inst.root.join("files/ok");
    std::fs::create_dir_all(&ok_dir).unwrap();
    let before = containers_of(&image);
    let volumes_before = names(&["volume", "ls", "-q"]);
    let (s, ok) = (scratch.display(), ok_dir.display());
    let cases: Vec<(String, &str)> = vec![
        (
            format!(r#"{{"Image":"{image}","HostConfig":{{"privileged":true}}}}"#),
            "privileged",
        ),
        (
            format!(r#"{{"Image":"{image}","hostConfig":{{"Privileged":true}}}}"#),
            "hostConfig",
        ),
        (
            format!(
                r#"{{"Image":"{image}","HostConfig":{{"PRIVILEGED":true,"Privileged":false}}}}"#
            ),
            "PRIVILEGED",
        ),
        (
            format!(r#"{{"Image":"{image}","HostConfig":{{"Privil\u0065ged":true}}}}"#),
            "Privileged",
        ),
        (
            format!(r#"{{"Image":"{image}","Privileged":true}}"#),
            "Privileged",
        ),
        (
            format!(r#"{{"Image":"{image}","Binds":["{s}:/host"]}}"#),
            "Binds",
        ),
        (
            format!(
                r#"{{"Image":"{image}","HostConfig":{{"Binds":["{ok}:/ok"],"binds":["{s}:/host"]}}}}"#
            ),
            "binds",
        ),
        (
            format!(
                r#"{{"Image":"{image}","HostConfig":{{"Binds":["{ok}:/ok"],"Binds":["{s}:/host"]}}}}"#
            ),
            "Binds",
        ),
        (
            format!(r#"{{"Image":"{image}","image":"someone-else"}}"#),
            "image",
        ),
        (
            format!(r#"{{"Image":"{image}","Image":"someone-else"}}"#),
            "Image",
        ),
        (
            format!(r#"{{"Image":"{image}","HostConfig":{{"CapAdd":"SYS_ADMIN"}}}}"#),
            "CapAdd",
        ),
        (
            format!(
                r#"{{"Image":"{image}","HostConfig":{{"\u017FecurityOpt":["seccomp=unconfined"]}}}}"#
            ),
            "ecurityOpt",
        ),
        (
            format!(r#"{{"Image":"{image}","HostConfig":{{"\u212AernelMemory":1}}}}"#),
            "ernelMemory",
        ),
        (
            format!(r#"{{"Image":"{image}","HostConfig":{{"MaskedPaths":[]}}}}"#),
            "MaskedPaths",
        ),
        (
            format!(r#"{{"Image":"{image}","HostConfig":{{"ReadonlyPaths":[]}}}}"#),
            "ReadonlyPaths",
        ),
        (
            format!(
                r#"{{"Image":"{image}","HostConfig":{{"SecurityOpt":["seccomp={{\"defaultAction\":\"SCMP_ACT_ALLOW\"}}"]}}}}"#
            ),
            "SecurityOpt",
        ),
        (
            format!(
                r#"{{"Image":"{image}","HostConfig":{{"Sysctls":{{"net.ipv4.ip_forward":"1"}}}}}}"#
            ),
            "Sysctls",
        ),
        (
            format!(r#"{{"Image":"{image}","HostConfig":{{"Links":["x:y"]}}}}"#),
            "Links",
        ),
        (
            format!(
                r#"{{"Image":"{image}","HostConfig":{{"LogConfig":{{"Type":"syslog","Config":{{"syslog-address":"udp://127.0.0.1:9"}}}}}}}}"#
            ),
            "LogConfig",
        ),
        (
            format!(r#"{{"Image":"{image}","HostConfig":{{"PidsLimit":100000}}}}"#),
            "PidsLimit",
        ),
        (
            format!(r#"{{"Image":"{image}","HostConfig":{{"OomScoreAdj":-1000}}}}"#),
            "OomScoreAdj",
        ),
        (
            format!(
                r#"{{"Image":"{image}","HostConfig":{{"RestartPolicy":{{"Name":"always"}}}}}}"#
            ),
            "RestartPolicy",
        ),
        (
            format!(
                r#"{{"Image":"{image}","HostConfig":{{"PortBindings":{{"80/tcp":[{{"HostPort":"38099"}}]}}}}}}"#
            ),
            "PortBindings",
        ),
        (
            format!(r#"{{"Image":"{image}","HostConfig":{{"CgroupnsMode":"host"}}}}"#),
            "CgroupnsMode",
        ),
        (
            format!(r#"{{"Image":"{image}","HostConfig":{{"Runtime":"io.containerd.runc.v2"}}}}"#),
            "Runtime",
        ),
        (
            format!(
                r#"{{"Image":"{image}","HostConfig":{{"Mounts":[{{"Type":"bind","Source":"{s}","Target":"/x"}}]}}}}"#
            ),
            "Mounts",
        ),
        (
            format!(
                r#"{{"Image":"{image}","HostConfig":{{"Mounts":[{{"Type":"bind","Source":"{ok}","Target":"/x","BindOptions":{{"Propagation":"rshared"}}}}]}}}}"#
            ),
            "Propagation",
        ),
        (
            format!(r#"{{"Image":"{image}","Volumes":{{"/anonymous":{{}}}}}}"#),
            "Volumes",
        ),
        (
            format!(
                r#"{{"Image":"{image}","NetworkingConfig":{{"EndpointsConfig":{{"host":{{}}}}}}}}"#
            ),
            "EndpointsConfig",
        ),
        (
            format!(
                r#"{{"Image":"{image}"}} {{"Image":"{image}","HostConfig":{{"Privileged":true}}}}"#
            ),
            "body",
        ),
        // Names the engine writes into the job's /etc files, a line each: a line of their own
        // in them (a name server, a host's address) is refused.
        (
            format!(
                r#"{{"Image":"{image}","Hostname":"job
evil"}}"#
            ),
            "Hostname",
        ),
        (
            format!(r#"{{"Image":"{image}","Domainname":"lab example"}}"#),
            "Domainname",
        ),
        (
            format!(
                r#"{{"Image":"{image}","HostConfig":{{"Dns":["10.0.0.53
nameserver 6.6.6.6"]}}}}"#
            ),
            "Dns",
        ),
        (
            format!(
                r#"{{"Image":"{image}","HostConfig":{{"DnsOptions":["ndots:1
nameserver 6.6.6.6"]}}}}"#
            ),
            "DnsOptions",
        ),
        (
            format!(r#"{{"Image":"{image}","HostConfig":{{"DnsSearch":["lab	example"]}}}}"#),
            "DnsSearch",
        ),
        (
            format!(
                r#"{{"Image":"{image}","HostConfig":{{"ExtraHosts":["db:10.0.0.1
6.6.6.6 bank.example"]}}}}"#
            ),
            "ExtraHosts",
        ),
        // An attacker's (twelfth session): another container's MAC address on the bridge.
        (
            format!(r#"{{"Image":"{image}","MacAddress":"02:42:ac:11:00:02"}}"#),
            "MacAddress",
        ),
        (
            format!(
                r#"{{"Image":"{image}","HostConfig":{{"LogConfig":{{"Type":"json-file","Config":{{"max-size":"-1"}}}}}}}}"#
            ),
            "max-size",
        ),
    ];
    for (body, needle) in &cases {
        let (status, answer) = post(&b.socket, "/v1.41/containers/create", body);
        assert_eq!(status, 403, "{body}: {answer}");
        let m = message(&answer);
        assert!(m.contains(needle) && m.contains("refused"), "{body}: {m}");
    }
    assert_eq!(
        containers_of(&image),
        before,
        "a refused create made a container"
    );
    assert_eq!(names(&["volume", "ls", "-q"]), volumes_before);
    // An image name the engine cannot read is the client's error (was regobox's 502).
    let (status, answer) = post(
        &b.socket,
        "/v1.41/containers/create",
        r#"{"Image":"Regobox:E2E"}"#,
    );
    assert_eq!(status, 400, "{answer}");

    // The same names, well formed, reach the engine as regobox writes them.
    let (status, answer) = post(
        &b.socket,
        "/v1.41/containers/create",
        &format!(
            r#"{{"Image":"{image}","Cmd":["true"],"Hostname":"job-1","Domainname":"lab.example.","HostConfig":{{"Dns":["10.0.0.53"],"DnsOptions":["ndots:2"],"DnsSearch":["lab.example"],"ExtraHosts":["db:10.0.0.1","v6:[fe80::1]","gw:host-gateway"]}}}}"#
        ),
    );
    assert_eq!(status, 201, "{answer}");
    let named = serde_json::from_str::<Value>(&answer).unwrap()["Id"]
        .as_str()
        .unwrap()
        .to_string();
    let made_named = OnEngine::default();
    made_named.container(&named);
    let state: Value = serde_json::from_str(&stdout(&engine(&["inspect", &named]))).unwrap();
    let (config, host) = (&state[0]["Config"], &state[0]["HostConfig"]);
    assert_eq!(config["Hostname"], "job-1");
    assert_eq!(config["Domainname"], "lab.example");
    assert_eq!(host["Dns"], serde_json::json!(["10.0.0.53"]));
    assert_eq!(host["DnsOptions"], serde_json::json!(["ndots:2"]));
    assert_eq!(host["DnsSearch"], serde_json::json!(["lab.example"]));
    assert_eq!(
        host["ExtraHosts"],
        serde_json::json!(["db:10.0.0.1", "v6:fe80::1", "gw:host-gateway"])
    );
    drop(made_named);

    // Another API version (below 1.24 a start's body replaces the HostConfig), a body on an
    // operation that takes none, a name that looks like an id, a reference the engine would
    // read as a path and a query.
    let own = b.cli_ok(&["create", &image, "true"]).trim().to_string();
    let made = OnEngine::default();
    made.container(&own);
    let hostile = format!(r#"{{"Binds":["{s}:/host"],"PidMode":"host","Privileged":true}}"#);
    for (path, body, needle) in [
        (
            format!("/v1.23/containers/{own}/start"),
            hostile.as_str(),
            "version",
        ),
        (
            format!("/v1.41/containers/{own}/start"),
            hostile.as_str(),
            "takes no body",
        ),
        (
            format!("/v1.41/containers/{own}/kill"),
            "{}",
            "takes no body",
        ),
        (
            "/v1.41/containers/create?name=0123456789abcdef".to_string(),
            "{}",
            "looks like an id",
        ),
    ] {
        let (status, answer) = post(&b.socket, &path, body);
        assert_eq!(status, 403, "{path}: {answer}");
        assert!(message(&answer).contains(needle), "{path}: {answer}");
    }
    let state: Value = serde_json::from_str(&stdout(&engine(&["inspect", &own]))).unwrap();
    assert_eq!(state[0]["State"]["Status"], "created");
    assert_eq!(state[0]["HostConfig"]["PidMode"], "");
    let (status, answer) = raw(
        &b.socket,
        &format!(
            "DELETE /v1.41/images/{}%3Fforce=1 HTTP/1.1\r\nHost: d\r\nConnection: close\r\n\r\n",
            image.replace(':', "/json:")
        ),
    );
    assert_eq!(status, 403, "{answer}");

    // A query parameter twice, or one the endpoint does not take.
    let (status, answer) = post(
        &b.socket,
        "/v1.41/containers/create?name=a&name=b",
        &format!(r#"{{"Image":"{image}"}}"#),
    );
    assert_eq!(status, 403, "{answer}");
    let mut expected = before.clone();
    expected.push(own.clone());
    expected.sort();
    assert_eq!(containers_of(&image), expected);

    // What is allowed reaches the engine as regobox wrote it: full image id, instance label,
    // the PIDs ceiling in place of -1.
    let id = b.cli_ok(&["create", "--pids-limit", "-1", &image, "true"]);
    let id = id.trim();
    let made = OnEngine::default();
    made.container(id);
    let inspect: Value = serde_json::from_str(&stdout(&engine(&["inspect", id]))).unwrap();
    assert_eq!(inspect[0]["HostConfig"]["PidsLimit"], 4096);
    assert_eq!(inspect[0]["HostConfig"]["CgroupnsMode"], "private");
    assert_eq!(inspect[0]["Config"]["Image"], image_id(&image));
    assert_eq!(
        inspect[0]["Config"]["Labels"]["regobox.instance"],
        b.instance_id()
    );
    engine(&["rm", id]);
    b.stop();
}

#[test]
fn the_configured_ceilings_bound_every_job() {
    let mut b = Bridged::start("[docker.limits]\nmemory = \"256m\"\nshm = \"32m\"\npids = 100");
    let image = format!("regobox-test/busybox:limits{}", b.inst.port);
    b.import_busybox(&image);
    let made = OnEngine::default();
    for args in [
        vec!["--memory", "1g"],
        vec!["--memory-swap", "-1", "--memory", "128m"],
        vec!["--shm-size", "1g"],
        vec!["--pids-limit", "1000"],
        vec!["--cpu-shares", "4096"],
    ] {
        let mut cmd = vec!["create"];
        cmd.extend(&args);
        cmd.extend([image.as_str(), "true"]);
        let out = b.cli(&cmd);
        assert!(!out.status.success(), "{args:?} went through");
        assert!(
            stderr(&out).contains("refused"),
            "{args:?}: {}",
            stderr(&out)
        );
    }
    let id = b.cli_ok(&[
        "create",
        "--memory",
        "0",
        "--pids-limit",
        "0",
        &image,
        "true",
    ]);
    made.container(id.trim());
    let hc: Value = serde_json::from_str(&stdout(&engine(&[
        "inspect",
        "--format",
        "{{json .HostConfig}}",
        id.trim(),
    ])))
    .unwrap();
    assert_eq!(hc["Memory"], 256 << 20, "{hc}");
    assert_eq!(hc["ShmSize"], 32 << 20, "{hc}");
    assert_eq!(hc["PidsLimit"], 100, "{hc}");
    let id = b.cli_ok(&["create", "--memory", "64m", &image, "true"]);
    made.container(id.trim());
    let memory = stdout(&engine(&[
        "inspect",
        "--format",
        "{{.HostConfig.Memory}}",
        id.trim(),
    ]));
    assert_eq!(
        memory.trim(),
        (64u64 << 20).to_string(),
        "a lower limit is kept"
    );
    b.stop();
}

#[test]
fn networks_touch_no_host_interface_and_connect_only_the_instances() {
    let mut b = Bridged::start("");
    let image = format!("regobox-test/busybox:net{}", b.inst.port);
    b.import_busybox(&image);
    let port = b.inst.port;
    // The networks this test could make (other tests make networks meanwhile).
    let tried = || -> Vec<String> {
        names(&["network", "ls", "--format", "{{.Name}}"])
            .into_iter()
            .filter(|n| n.contains(&port.to_string()) || n == "0123456789abcdef0123")
            .collect()
    };
    let before = tried();
    let made = OnEngine::default();
    for n in ["a", "b", "mine", "theirs"] {
        made.network(&format!("rbx-{n}{port}"));
    }
    made.network("0123456789abcdef0123");
    for (body, needle) in [
        (
            format!(
                r#"{{"Name":"rbx-a{port}","Options":{{"com.docker.network.bridge.name":"rbxt{port}"}}}}"#
            ),
            "Options",
        ),
        (
            format!(r#"{{"Name":"rbx-a{port}","Driver":"macvlan","Options":{{"parent":"lo"}}}}"#),
            "Driver",
        ),
        (
            format!(r#"{{"name":"rbx-a{port}","Driver":"bridge"}}"#),
            "name",
        ),
        (
            format!(r#"{{"Name":"rbx-a{port}","Driver":"bridge","driver":"ipvlan"}}"#),
            "driver",
        ),
        (
            format!(r#"{{"Name":"rbx-a{port}","IPAM":{{"Config":[{{"Subnet":"127.0.0.0/8"}}]}}}}"#),
            "IPAM",
        ),
        (
            format!(r#"{{"Name":"rbx-a{port}","ConfigOnly":true}}"#),
            "ConfigOnly",
        ),
        (
            r#"{"Name":"0123456789abcdef0123"}"#.to_string(),
            "looks like an id",
        ),
    ] {
        let (status, answer) = post(&b.socket, "/networks/create", &body);
        assert_eq!(status, 403, "{body}: {answer}");
        assert!(message(&answer).contains(needle), "{body}: {answer}");
    }
    let out = b.cli(&[
        "network",
        "create",
        "--opt",
        &format!("com.docker.network.bridge.name=rbxt{port}"),
        &format!("rbx-b{port}"),
    ]);
    assert!(
        !out.status.success(),
        "created a bridge named by the application"
    );
    assert_eq!(tried(), before, "a refused create made a network");
    assert!(!Path::new(&format!("/sys/class/net/rbxt{port}")).exists());

    // Connect and disconnect judge both sides on the full ids.
    let mine = format!("rbx-mine{port}");
    b.cli_ok(&["network", "create", &mine]);
    let theirs = format!("rbx-theirs{port}");
    assert!(engine(&["network", "create", &theirs]).status.success());
    // A second network of the same name would make the owner's ambiguous.
    let theirs_id = stdout(&engine(&[
        "network", "inspect", "--format", "{{.Id}}", &theirs,
    ]))
    .trim()
    .to_string();
    let (status, answer) = post(
        &b.socket,
        "/networks/create",
        &format!(r#"{{"Name":"{theirs}"}}"#),
    );
    assert_eq!(status, 409, "{answer}");
    assert!(
        !answer.contains(&theirs_id) && !answer.contains(&theirs_id[..12]),
        "{answer}"
    );
    let other = stdout(&engine(&["create", &image, "true"]))
        .trim()
        .to_string();
    let job = b.cli_ok(&["create", &image, "true"]).trim().to_string();
    let out = b.cli(&["network", "connect", &mine, &other]);
    assert!(
        !out.status.success() && stderr(&out).contains("No such container"),
        "{}",
        stderr(&out)
    );
    let out = b.cli(&["network", "connect", &theirs, &job]);
    assert!(
        !out.status.success() && stderr(&out).contains("not found"),
        "{}",
        stderr(&out)
    );
    let (status, answer) = post(
        &b.socket,
        &format!("/networks/{mine}/connect"),
        &format!(r#"{{"Container":"{job}","container":"{other}"}}"#),
    );
    assert_eq!(status, 403, "{answer}");
    b.cli_ok(&["network", "connect", &mine, &job]);
    b.cli_ok(&["network", "disconnect", &mine, &job]);
    let attached = stdout(&engine(&[
        "inspect",
        "--format",
        "{{json .NetworkSettings.Networks}}",
        &other,
    ]));
    assert!(!attached.contains(&mine), "{attached}");
    engine(&["rm", "-f", &other, &job]);
    engine(&["network", "rm", &theirs, &mine]);
    b.stop();
}

#[test]
fn images_never_move_anothers_tag_nor_make_the_engine_fetch() {
    let mut b = Bridged::start("");
    let port = b.inst.port;
    let base = format!("regobox-test/busybox:img{port}");
    b.import_busybox(&base);
    let victim = format!("regobox-test/victim:{port}");
    let own_tag = format!("regobox-test/own:{port}");
    let made = OnEngine::default();
    for i in [&victim, &own_tag, &"regobox-test/fetched:1".to_string()] {
        made.image(i);
    }
    foreign_image(b.inst.dir.path(), &victim, "victim-secret");
    let victim_id = image_id(&victim);
    // Anything the engine fetches would arrive here.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let url = format!(
        "http://127.0.0.1:{}/x.tar",
        listener.local_addr().unwrap().port()
    );

    let ctx = b.inst.dir.path().join("ctx");
    std::fs::create_dir_all(&ctx).unwrap();
    // A context the client is still writing when a refusal could be decided: the refusal must
    // reach it as the reason, not as a broken pipe.
    let mut bulk = vec![0u8; 32 << 20];
    std::fs::File::open("/dev/urandom")
        .unwrap()
        .read_exact(&mut bulk)
        .unwrap();
    std::fs::write(ctx.join("bulk"), bulk).unwrap();
    let build = |dockerfile: &str, tag: &str| {
        std::fs::write(ctx.join("Dockerfile"), dockerfile).unwrap();
        b.cli(&["build", "-q", "-t", tag, &ctx.display().to_string()])
    };
    for (out, needle) in [
        (
            build(&format!("FROM {base}\n"), &victim),
            "is not this instance's",
        ),
        (
            build(&format!("FROM {base}\nADD {url} /x\n"), &own_tag),
            "fetch a URL",
        ),
        (
            build(&format!("FROM {victim}\n"), &own_tag),
            "not this instance's",
        ),
        (
            build(
                &format!("FROM {base} AS a\nFROM scratch\nCOPY --from={victim} /etc/secret /s\n"),
                &own_tag,
            ),
            "not this instance's",
        ),
        (
            build(&format!("ARG B={victim}\nFROM $B\n"), &own_tag),
            "not this instance's",
        ),
    ] {
        assert!(!out.status.success(), "build went through");
        assert!(stderr(&out).contains(needle), "{}", stderr(&out));
    }
    for (path, needle) in [
        (
            format!(
                "/build?remote={}&t=x",
                url.replace(':', "%3A").replace('/', "%2F")
            ),
            "remote",
        ),
        (
            format!(
                "/images/create?fromSrc={}&repo=regobox-test/fetched&tag=1",
                url.replace(':', "%3A").replace('/', "%2F")
            ),
            "fetch a URL",
        ),
        (
            format!("/images/create?fromImage=regobox-test/victim&tag={port}"),
            "is not this instance's",
        ),
        ("/images/create?fromImage=busybox".to_string(), "every tag"),
        (
            format!("/images/create?fromSrc=-&repo=regobox-test/victim&tag={port}"),
            "is not this instance's",
        ),
        (
            format!("/images/create?fromSrc=-&repo=regobox-test/victim:unused&tag={port}"),
            "already names a tag",
        ),
        (
            format!("/images/create?fromImage=regobox-test/victim:unused&tag={port}"),
            "already names a tag",
        ),
        (
            "/images/create?fromSrc=-&repo=regobox-test/onb&tag=1&changes=ONBUILD+RUN+true"
                .to_string(),
            "ONBUILD",
        ),
        (
            "/images/create?fromSrc=-&repo=regobox-test/vol&tag=1&changes=VOLUME+/data".to_string(),
            "VOLUME",
        ),
        ("/v1.41/build?t=x&pull=1".to_string(), "pull"),
        (
            "/v1.41/build?t=x&networkmode=host".to_string(),
            "networkmode",
        ),
        (
            "/v1.41/build?t=x&cgroupparent=%2F".to_string(),
            "cgroupparent",
        ),
        ("/v1.41/build?t=x&cpushares=262144".to_string(), "cpushares"),
        // An attacker's (twelfth session): a tag the engine cannot read (was regobox's 502).
        (
            "/v1.41/build?t=Regobox%3Ae2e".to_string(),
            "not an image reference",
        ),
        // An attacker's (twelfth session): lines of its own in the build's /etc/hosts.
        (
            "/v1.41/build?t=x&extrahosts=foo%0A6.6.6.6%20evil.example.com%0A%23%3A1.2.3.4"
                .to_string(),
            "extrahosts",
        ),
        (
            "/images/regobox-test/victim/tag?repo=x".to_string(),
            "not an allowed endpoint",
        ),
        (
            "/commit?container=x&repo=y".to_string(),
            "not an allowed endpoint",
        ),
    ] {
        let (status, answer) = post(&b.socket, &path, "");
        assert_eq!(status, 403, "{path}: {answer}");
        assert!(message(&answer).contains(needle), "{path}: {answer}");
    }
    // Contexts whose Dockerfile another reader would read otherwise.
    let evil = format!("FROM {base}\nCOPY --from={victim} /etc/secret /stolen\n");
    let benign = format!("FROM {base}\nRUN true\n");
    let continued = format!("FROM {base}\nCOPY \\\n\n--from={victim} /etc/secret /stolen\n");
    let directive = format!(
        "# foo=bar\n# escape=`\nFROM {base}\nLABEL x=`\nCOPY --from={victim} /etc/secret /stolen\n"
    );
    let onbuild = format!("FROM {base}\nONBUILD ADD {url} /x\n");
    for (ctx_tar, dockerfile, needle) in [
        (
            context(&[("Dockerfile", 'f', &benign), ("Dockerfile", 'f', &evil)]),
            "",
            "twice",
        ),
        (
            context(&[("Dockerfile", 'f', &continued)]),
            "",
            "not this instance's",
        ),
        (context(&[("Dockerfile", 'f', &directive)]), "", "escape"),
        (
            context(&[
                ("d/Dockerfile", 'f', &benign),
                ("e/Dockerfile", 'f', &evil),
                ("d", 'l', "e"),
            ]),
            "d/Dockerfile",
            "not a directory",
        ),
        (context(&[("Dockerfile", 'f', &onbuild)]), "", "ONBUILD"),
        (
            context(&[("Dockerfile", 'l', "/etc/passwd")]),
            "",
            "not a regular file",
        ),
    ] {
        let (status, answer) = post_bytes(
            &b.socket,
            &format!("/v1.41/build?t={own_tag}&dockerfile={dockerfile}"),
            "application/x-tar",
            &ctx_tar,
        );
        assert_eq!(status, 403, "{needle}: {answer}");
        assert!(message(&answer).contains(needle), "{needle}: {answer}");
    }
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        listener.accept().is_err(),
        "the engine fetched a URL the application gave"
    );
    assert_eq!(image_id(&victim), victim_id, "the victim's tag moved");
    assert!(!engine(&["image", "inspect", &own_tag]).status.success());
    // An image's VOLUME would be an anonymous volume: covered by a bind or a tmpfs, or refused.
    let vol_tag = format!("regobox-test/vol:{port}");
    made.image(&vol_tag);
    let out = build(&format!("FROM {base}\nVOLUME /data\n"), &vol_tag);
    assert!(out.status.success(), "{}", stderr(&out));
    let volumes_before = names(&["volume", "ls", "-q"]);
    let out = b.cli(&["create", &vol_tag, "true"]);
    assert!(stderr(&out).contains("VOLUME /data"), "{}", stderr(&out));
    let out = b.cli(&["create", "--tmpfs", "/data", &vol_tag, "true"]);
    assert!(out.status.success(), "{}", stderr(&out));
    made.container(stdout(&out).trim());
    assert_eq!(names(&["volume", "ls", "-q"]), volumes_before);
    // Attack (thirty-second session): a tmpfs's target spelled otherwise (`/data/`, `//data/.`)
    // covered `/data` for the policy, not for the engine, which compares it as written and made
    // an anonymous volume, left behind on the host when the container was removed. The target
    // judged is the one forwarded; one target mounted twice is refused.
    for spelling in ["/data/", "//data/."] {
        let out = b.cli(&["create", "--tmpfs", spelling, &vol_tag, "true"]);
        assert!(out.status.success(), "{spelling}: {}", stderr(&out));
        let id = stdout(&out).trim().to_string();
        made.container(&id);
        let inspect = engine(&[
            "inspect",
            "-f",
            "{{json .HostConfig.Tmpfs}} {{len .Mounts}}",
            &id,
        ]);
        assert_eq!(stdout(&inspect).trim(), r#"{"/data":""} 0"#, "{spelling}");
        assert_eq!(names(&["volume", "ls", "-q"]), volumes_before, "{spelling}");
    }
    let (status, answer) = post_bytes(
        &b.socket,
        "/v1.41/containers/create",
        "application/json",
        format!(
            r#"{{"Image":"{vol_tag}","HostConfig":{{"Tmpfs":{{"/data":"","/data/":"size=1m"}}}}}}"#
        )
        .as_bytes(),
    );
    assert_eq!(status, 403, "{answer}");
    assert!(
        message(&answer).contains("mounts \"/data\" twice"),
        "{answer}"
    );
    assert_eq!(names(&["volume", "ls", "-q"]), volumes_before);

    // A build of its own works, and may tag its own image again.
    let out = build(&format!("FROM {base}\nLABEL step=1\n"), &own_tag);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = build(&format!("FROM {base}\nLABEL step=1\n"), &own_tag);
    assert!(out.status.success(), "{}", stderr(&out));
    b.stop();
}

#[test]
fn a_name_that_changes_hands_never_redirects_a_request() {
    let mut b = Bridged::start("");
    let port = b.inst.port;
    let mine = format!("regobox-test/busybox:race{port}");
    b.import_busybox(&mine);
    let victim = format!("regobox-test/victim-race:{port}");
    let name = format!("rbx-race-{port}");
    let made = OnEngine::default();
    made.container(&name);
    made.image(&victim);
    foreign_image(b.inst.dir.path(), &victim, "victim-secret");
    let mut leaked = 0;
    let mut answered = 0;
    for _ in 0..15 {
        b.cli_ok(&["create", "--name", &name, &mine, "true"]);
        let socket = b.socket.clone();
        let readers: Vec<_> = (0..24)
            .map(|_| {
                let socket = socket.clone();
                let name = name.clone();
                std::thread::spawn(move || {
                    raw(
                        &socket,
                        &format!("GET /v1.41/containers/{name}/archive?path=/etc/secret HTTP/1.1\r\nHost: d\r\nConnection: close\r\n\r\n"),
                    )
                })
            })
            .collect();
        engine(&["rm", "-f", &name]);
        engine(&["create", "--name", &name, &victim, "sleep", "1"]);
        for r in readers {
            let (status, body) = r.join().unwrap();
            answered += 1;
            if status == 200 || body.contains("victim-secret") {
                leaked += 1;
            }
        }
        // The name is someone else's now: invisible, and no message names its container.
        let (status, body) = raw(
            &b.socket,
            &format!(
                "GET /containers/{name}/json HTTP/1.1\r\nHost: d\r\nConnection: close\r\n\r\n"
            ),
        );
        assert_eq!(status, 404, "{body}");
        let other = stdout(&engine(&["inspect", "--format", "{{.Id}}", &name]))
            .trim()
            .to_string();
        let out = b.cli(&["create", "--name", &name, &mine, "true"]);
        assert!(!out.status.success());
        assert!(
            !stderr(&out).contains(&other) && !stderr(&out).contains(&other[..12]),
            "{}",
            stderr(&out)
        );
        engine(&["rm", "-f", &name]);
    }
    assert_eq!(answered, 15 * 24);
    assert_eq!(
        leaked, 0,
        "{leaked} requests read the other container's file"
    );
    engine(&["rmi", &victim]);
    b.stop();
}

#[test]
fn a_bind_source_swapped_for_a_link_after_the_create_is_refused_at_start() {
    let mut b = Bridged::start("");
    let image = format!("regobox-test/busybox:swap{}", b.inst.port);
    b.import_busybox(&image);
    let scratch = b.inst.dir.path().join("scratch");
    std::fs::create_dir_all(&scratch).unwrap();
    std::fs::write(scratch.join("outside"), "outside the roots").unwrap();
    let job = b.inst.root.join("files/job");
    // The test's host path translation maps files/ to host-files/: the engine mounts from there,
    // so the swap is made on both sides.
    let host_job = b.host_files.join("job");
    for dir in [&job, &host_job] {
        std::fs::create_dir_all(dir).unwrap();
    }
    let made = OnEngine::default();
    let id = b
        .cli_ok(&[
            "create",
            "-v",
            &format!("{}:/mnt", job.display()),
            &image,
            "ls",
            "/mnt",
        ])
        .trim()
        .to_string();
    made.container(&id);
    for dir in [&job, &host_job] {
        std::fs::remove_dir(dir).unwrap();
        std::os::unix::fs::symlink(&scratch, dir).unwrap();
    }
    let out = b.cli(&["start", "-a", &id]);
    assert!(!out.status.success(), "started: {}", stdout(&out));
    assert!(stderr(&out).contains("symbolic link"), "{}", stderr(&out));
    assert!(!stdout(&out).contains("outside"));
    // A copy out of or into the stopped container mounts its binds too.
    let (status, answer) = raw(
        &b.socket,
        &format!(
            "GET /v1.41/containers/{id}/archive?path=/mnt/outside HTTP/1.1\r\nHost: d\r\nConnection: close\r\n\r\n"
        ),
    );
    assert_eq!(status, 403, "{answer}");
    assert!(!answer.contains("outside the roots"));
    let (status, answer) = send(
        &b.socket,
        "PUT",
        &format!("/v1.41/containers/{id}/archive?path=/mnt"),
        "application/x-tar",
        &context(&[("planted", 'f', "x")]),
    );
    assert_eq!(status, 403, "{answer}");
    assert!(
        !scratch.join("planted").exists(),
        "a copy went through the link"
    );
    let state = stdout(&engine(&["inspect", "--format", "{{.State.Status}}", &id]));
    assert_eq!(state.trim(), "created");
    // An engine-driven restart would mount without regobox looking again: refused.
    let out = b.cli(&["create", "--restart", "on-failure:3", &image, "true"]);
    assert!(stderr(&out).contains("RestartPolicy"), "{}", stderr(&out));
    b.stop();
}

/// The application (not root) swaps a bind source's directory for a link to a scratch directory
/// and back while regobox forwards a thousand requests that make the engine mount it
/// (scripts/bench-docker-race.py: one start in ten, copies out of the stopped job otherwise):
/// none may mount the scratch directory.
#[test]
fn a_thousand_mounts_racing_a_swapped_bind_source_never_mount_the_link() {
    let mut b = Bridged::start_untranslated("");
    let image = format!("regobox-test/busybox:race{}", b.inst.port);
    b.import_busybox(&image);
    // The application's files are its own, and reachable: the swapper runs as nobody.
    use std::os::unix::fs::PermissionsExt;
    for dir in [b.inst.dir.path(), b.inst.root.as_path()] {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let dir = b.inst.root.join("files/race");
    let out = Command::new("python3")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/bench-docker-race.py"))
        .args([
            "--image",
            &image,
            "--attempts",
            "1000",
            "--swapper-uid",
            "65534",
        ])
        .args([
            "--dir",
            &dir.display().to_string(),
            "--host-dir",
            &dir.display().to_string(),
        ])
        .env("DOCKER_HOST", format!("unix://{}", b.socket.display()))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}\n{}", stdout(&out), stderr(&out));
    let counts: Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    eprintln!("race: {counts}");
    assert_eq!(counts["escaped"], 0, "a start mounted the link: {counts}");
    assert!(
        counts["inside"].as_u64().unwrap() >= 100,
        "too few starts got past the check to say anything: {counts}"
    );
    assert!(
        counts["swaps"].as_u64().unwrap() >= 500,
        "the swapper hardly ran: {counts}"
    );
    // Nothing stays frozen: the files volume is the application's again.
    use std::os::unix::fs::MetadataExt;
    assert_eq!(
        std::fs::metadata(b.inst.root.join("files")).unwrap().uid(),
        65534
    );
    b.stop();
}

#[test]
fn regovars_job_sequence_runs_with_docker_py() {
    let mut b = Bridged::start("");
    let port = b.inst.port;
    let base = format!("regobox-test/busybox:py{port}");
    b.import_busybox(&base);
    let ctx = b.inst.dir.path().join("py-ctx");
    std::fs::create_dir_all(&ctx).unwrap();
    std::fs::write(
        ctx.join("Dockerfile"),
        format!("FROM {base}\nLABEL regovar.pipeline=demo\n"),
    )
    .unwrap();
    let input = b.inst.root.join("files/jobs/42/in");
    let output = b.inst.root.join("files/jobs/42/out");
    for (inside, host) in [
        (&input, b.host_files.join("jobs/42/in")),
        (&output, b.host_files.join("jobs/42/out")),
    ] {
        std::fs::create_dir_all(inside).unwrap();
        std::fs::create_dir_all(&host).unwrap();
    }
    std::fs::write(b.host_files.join("jobs/42/in/in.txt"), "genome-42").unwrap();
    let before = containers_of(&base);
    let tag = format!("regobox-test/regovar-job:{port}");
    let made = OnEngine::default();
    made.container(&format!("rbx-regovar-{port}"));
    made.network(&format!("rbx-regovar-{port}"));
    made.image(&tag);
    let out = Command::new("python3")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/regovar_jobs.py"))
        .args(["--context", &ctx.display().to_string(), "--tag", &tag])
        .args([
            "--network",
            &format!("rbx-regovar-{port}"),
            "--name",
            &format!("rbx-regovar-{port}"),
        ])
        .args([
            "--input",
            &input.display().to_string(),
            "--output",
            &output.display().to_string(),
        ])
        .args([
            "--output-seen-at",
            &b.host_files.join("jobs/42/out").display().to_string(),
        ])
        .env("DOCKER_HOST", format!("unix://{}", b.socket.display()))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "docker-py: {}\n{}",
        stdout(&out),
        stderr(&out)
    );
    let seen: Value = serde_json::from_str(stdout(&out).trim().lines().last().unwrap()).unwrap();
    assert_eq!(seen["exit_code"], 0, "{seen}");
    assert_eq!(seen["status_paused"], "paused", "{seen}");
    assert_eq!(seen["out_txt"], "job=42 a=b input=genome-42", "{seen}");
    assert!(
        seen["logs"]
            .as_str()
            .unwrap()
            .contains("regovar-job stdout"),
        "{seen}"
    );
    assert!(!seen["logs"].as_str().unwrap().contains("stderr"), "{seen}");
    assert!(seen["stats_keys"].as_u64().unwrap() > 5, "{seen}");
    // Nothing left behind: the container, the network, the image, the build's containers.
    assert_eq!(containers_of(&base), before);
    assert!(
        !engine(&["network", "inspect", &format!("rbx-regovar-{port}")])
            .status
            .success()
    );
    assert!(!engine(&["image", "inspect", &tag]).status.success());
    b.stop();
}

/// A registry on loopback (Debian's docker-registry), killed when dropped.
struct Registry {
    child: std::process::Child,
    port: u16,
}

impl Registry {
    fn start(dir: &Path) -> Registry {
        let port = free_port();
        let config = dir.join("registry.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\n",
                dir.join("registry-data").display()
            ),
        )
        .unwrap();
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("docker-registry (scripts/install-deps.sh --tests installs it)");
        let registry = Registry { child, port };
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return registry;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("the registry did not listen on {port}");
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_pull_from_a_registry_is_the_instances_and_never_moves_anothers_tag() {
    let dir = tempdir();
    let registry = Registry::start(dir.path());
    let mut b = Bridged::start(&format!(
        "[docker.policy]\nregistries = [\"docker.io\", \"127.0.0.1:{}\"]",
        registry.port
    ));
    let repo = format!("127.0.0.1:{}/rbx/pulled", registry.port);
    let (tag, victim) = (format!("{repo}:1"), format!("{repo}:victim"));
    let made = OnEngine::default();
    made.image(&tag);
    made.image(&victim);
    // Pushed from the engine directly, then gone from it: the pull below really pulls.
    let tar = busybox_rootfs_tar(b.inst.dir.path());
    let out = Command::new("docker")
        .args(["import", "-", &tag])
        .stdin(std::fs::File::open(tar).unwrap())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let out = engine(&["push", &tag]);
    assert!(out.status.success(), "push: {}", stderr(&out));
    assert!(engine(&["rmi", &tag]).status.success());
    // Someone else's image, under a tag of the same repository.
    foreign_image(b.inst.dir.path(), &victim, "victim-secret");

    b.cli_ok(&["pull", &tag]);
    assert_eq!(
        b.cli_ok(&["run", "--rm", &tag, "echo", "pulled"]).trim(),
        "pulled"
    );
    // The host pushes the instance's image to a repository of its own: the digest names the
    // host's registry and repository, which are the host's (an attacker's, twenty-fifth
    // session: listed in RepoDigests, and the image answered to it).
    let digests = |b: &Bridged| {
        b.cli_ok(&[
            "image",
            "inspect",
            "--format",
            "{{json .RepoDigests}}",
            &tag,
        ])
    };
    let own_digest: Vec<String> = serde_json::from_str(&digests(&b)).unwrap();
    assert_eq!(own_digest.len(), 1, "{own_digest:?}");
    assert!(
        own_digest[0].starts_with(&format!("{repo}@sha256:")),
        "{own_digest:?}"
    );
    let pushed = format!("127.0.0.1:{}/rbx/host-secret:v1", registry.port);
    made.image(&pushed);
    assert!(engine(&["tag", &tag, &pushed]).status.success());
    let out = engine(&["push", &pushed]);
    assert!(out.status.success(), "push: {}", stderr(&out));
    let all: Vec<String> = serde_json::from_str(&stdout(&engine(&[
        "image",
        "inspect",
        "--format",
        "{{json .RepoDigests}}",
        &tag,
    ])))
    .unwrap();
    let host_digest = all
        .iter()
        .find(|d| d.contains("host-secret"))
        .unwrap_or_else(|| panic!("no digest of the push: {all:?}"))
        .clone();
    let seen = digests(&b);
    assert!(!seen.contains("host-secret"), "{seen}");
    assert!(seen.contains(&own_digest[0]), "{seen}");
    assert!(!b.cli(&["image", "inspect", &host_digest]).status.success());
    b.cli_ok(&["image", "inspect", &own_digest[0]]);
    let listed = b.cli_ok(&[
        "images",
        "--digests",
        "--format",
        "{{.Repository}}@{{.Digest}}",
    ]);
    assert!(!listed.contains("host-secret"), "{listed}");
    // Content the host holds by a digest alone (no tag): the application's pull of a tag of
    // the same content finds the image there, and it stays the host's (the next attacker's:
    // recorded, the application removed the host's image).
    let pinned = format!("{repo}:pinned");
    made.image(&pinned);
    foreign_image(b.inst.dir.path(), &pinned, "pinned-secret");
    let out = engine(&["push", &pinned]);
    assert!(out.status.success(), "push: {}", stderr(&out));
    let pinned_id = image_id(&pinned);
    let digest: Vec<String> = serde_json::from_str(&stdout(&engine(&[
        "image",
        "inspect",
        "--format",
        "{{json .RepoDigests}}",
        &pinned,
    ])))
    .unwrap();
    let digest = digest[0].clone();
    made.image(&digest);
    assert!(engine(&["rmi", &pinned]).status.success());
    let out = engine(&["pull", &digest]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(image_id(&digest), pinned_id);
    b.cli_ok(&["pull", &pinned]);
    assert!(!b.cli(&["image", "inspect", &pinned]).status.success());
    assert!(!b.cli(&["rmi", &pinned]).status.success());
    let (status, body) = raw(
        &b.socket,
        &format!("DELETE /images/{pinned_id} HTTP/1.1\r\nHost: d\r\nConnection: close\r\n\r\n"),
    );
    assert_eq!(status, 404, "{body}");
    assert_eq!(image_id(&digest), pinned_id, "the host's image was removed");

    // Someone else's tag of the same repository: a pull would move it.
    let before = image_id(&victim);
    let out = b.cli(&["pull", &victim]);
    assert!(
        !out.status.success() && stderr(&out).contains("is not this instance's"),
        "{}",
        stderr(&out)
    );
    let out = b.cli(&["pull", "--all-tags", &repo]);
    assert!(!out.status.success(), "pulled every tag: {}", stdout(&out));
    assert_eq!(image_id(&victim), before);

    // The same content under someone else's tag: pulling it does not make their tag ours.
    let copy = format!("{repo}:copy");
    made.image(&copy);
    assert!(engine(&["tag", &victim, &copy]).status.success());
    assert!(engine(&["push", &copy]).status.success());
    assert!(engine(&["rmi", &copy]).status.success());
    b.cli_ok(&["pull", &copy]);
    assert!(
        !b.cli(&["image", "inspect", &victim]).status.success(),
        "the victim's tag became the instance's"
    );
    let ctx = b.inst.dir.path().join("ctx-copy");
    std::fs::create_dir_all(&ctx).unwrap();
    std::fs::write(ctx.join("Dockerfile"), format!("FROM {copy}\n")).unwrap();
    let out = b.cli(&["build", "-q", "-t", &victim, ctx.to_str().unwrap()]);
    assert!(
        stderr(&out).contains("is not this instance's"),
        "{}",
        stderr(&out)
    );
    assert_eq!(image_id(&victim), before);

    // Registries not in docker.policy.registries are not contacted.
    let other = free_port();
    let out = b.cli(&["pull", &format!("127.0.0.1:{other}/x:1")]);
    assert!(
        stderr(&out).contains("docker.policy.registries"),
        "{}",
        stderr(&out)
    );
    b.stop();
}

/// A second attacker's requests (a fresh reviewer's, 2026-12-03), each of which got past the
/// policy once: a form body read by the engine as parameters over the judged query, a
/// Dockerfile judged by its first MiB, or read otherwise by the engine's parser and word
/// processing, a stage's name read as an image in its own stage, a filter answering whether
/// someone else's object exists, a trickled copy holding the lock every start waits for. Each
/// is harmless had it got through: what the engine would fetch comes to a listener of the
/// test's, and what it would read is a scratch image's.
#[test]
fn what_the_engine_reads_is_what_regobox_judged() {
    let mut b = Bridged::start("");
    let port = b.inst.port;
    let base = format!("regobox-test/busybox:rd{port}");
    b.import_busybox(&base);
    let victim = format!("regobox-test/victim-rd:{port}");
    // Someone else's image under a name a stage can have (`name` is `name:latest`).
    let staged = format!("regobox-victim-rd{port}");
    let own_tag = format!("regobox-test/own-rd:{port}");
    let foreign_container = format!("rbx-foreign-rd{port}");
    let made = OnEngine::default();
    made.container(&foreign_container);
    for i in [&victim, &staged, &own_tag] {
        made.image(i);
    }
    foreign_image(b.inst.dir.path(), &victim, "victim-secret");
    foreign_image(b.inst.dir.path(), &staged, "staged-secret");
    let victim_id = image_id(&victim);
    let staged_id = image_id(&staged);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let fetch_port = listener.local_addr().unwrap().port();
    let url = format!("http://127.0.0.1:{fetch_port}/evil.tar");
    let (victim_repo, victim_tag) = victim.rsplit_once(':').unwrap();

    // The import's tar goes to the engine as a tar: a form's fields never become parameters.
    for body in [
        format!("fromSrc={url}&repo={victim_repo}&tag={victim_tag}"),
        format!("fromImage=127.0.0.1:{fetch_port}/evilrepo&tag=x1"),
    ] {
        let (status, answer) = send(
            &b.socket,
            "POST",
            "/v1.41/images/create?fromSrc=-",
            "application/x-www-form-urlencoded",
            body.as_bytes(),
        );
        assert!(
            !answer.contains("Downloading") && !answer.contains("evilrepo"),
            "{body}: {status} {answer}"
        );
    }
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        listener.accept().is_err(),
        "the engine fetched what a form body named"
    );
    assert_eq!(image_id(&victim), victim_id, "the victim's tag moved");

    // Dockerfiles the engine would read otherwise.
    let long = format!(
        "FROM {base}\n{}FROM {victim}\nADD {url} /fetched\n",
        "#\n".repeat(600 * 1024)
    );
    for (dockerfile, needle) in [
        (long.as_str(), "larger than"),
        (
            &format!(
                "FROM {base}\nMAINTAINER a \\\x0c\nFROM {victim}\nMAINTAINER b \\\x0c\nADD {url} /x\n"
            ),
            "character",
        ),
        (
            &format!("FROM {base}\nADD http:\\//127.0.0.1:{fetch_port}/evil.tar /x\n"),
            "escape",
        ),
        (
            &format!("FROM {base}\nADD [\"http:\\\\//127.0.0.1:{fetch_port}/evil.tar\", \"/x\"]\n"),
            "escape",
        ),
        (
            &format!("FROM {base} AS {staged}\nCOPY --from={staged} /etc/secret /s\n"),
            "not this instance's",
        ),
        // A third attacker's, after the fixes above: a JSON form only regobox saw, a
        // continuation joined with a space by regobox only, a flag glued to quotes, a flag
        // with quoted spaces, an ARG declared again without a value.
        (&format!("FROM {base}\nADD {url} /d[]\n"), "fetch a URL"),
        (
            &format!("FROM {base}\nADD http:\\\n//127.0.0.1:{fetch_port}/evil.tar /x\n"),
            "fetch a URL",
        ),
        (
            &format!("FROM {base}\n{}\\\n{}\n", &staged[..4], &staged[4..])
                .replacen('\n', "\nFROM ", 1),
            "not this instance's",
        ),
        (
            &format!("FROM {base}\nCOPY --fr\"\"om={staged} /etc/secret /s\n"),
            "quotes",
        ),
        (
            &format!("FROM --platform=\"linux/amd64${{NOPE:+ {base} }}\" {staged}\n"),
            "quotes",
        ),
        (
            &format!("ARG S=:rd{port}\nARG S\nFROM regobox-test/busybox${{S}}\nFROM {staged}\n"),
            "cannot resolve",
        ),
    ] {
        let (status, answer) = post_bytes(
            &b.socket,
            &format!("/v1.41/build?t={own_tag}"),
            "application/x-tar",
            &context(&[("Dockerfile", 'f', dockerfile)]),
        );
        assert_eq!(status, 403, "{needle}: {answer}");
        assert!(message(&answer).contains(needle), "{needle}: {answer}");
    }

    // Build contexts that Go's tar reader and the Rust crate read differently (a fourth
    // attacker's): regobox forwards its own rendering of the tar, so the engine builds the
    // Dockerfile regobox read, or regobox refuses.
    let ctx_tag = format!("regobox-test/ctx-rd:{port}");
    made.image(&ctx_tag);
    let good = format!("FROM {base}\nLABEL ok=1\n");
    let evil = format!("FROM {base}\nCOPY --from={staged} /etc/secret /s\nADD {url} /e\n");
    let mut sparse = format!("1\n0\n{}\n", evil.len()).into_bytes();
    sparse.resize(512, 0);
    sparse.extend_from_slice(evil.as_bytes());
    let realsize = evil.len().to_string();
    for (what, ctx_tar) in [
        (
            "a later entry through a link",
            context(&[
                ("Dockerfile", 'f', &good),
                ("x", 'l', "."),
                ("x/Dockerfile", 'f', &evil),
            ]),
        ),
        (
            "two path records",
            raw_tar(&[
                (b'0', "Dockerfile", good.clone().into_bytes(), true),
                (
                    b'x',
                    "pax",
                    pax(&[("path", "junk"), ("path", "Dockerfile")]),
                    true,
                ),
                (b'0', "junk", evil.clone().into_bytes(), true),
            ]),
        ),
        (
            "a PAX header without the ustar magic",
            raw_tar(&[
                (b'0', "Dockerfile", good.clone().into_bytes(), true),
                (b'x', "pax", pax(&[("path", "Dockerfile")]), false),
                (b'0', "junk", evil.clone().into_bytes(), true),
            ]),
        ),
        (
            "a GNU long name without the ustar magic",
            raw_tar(&[
                (b'0', "Dockerfile", good.clone().into_bytes(), true),
                (b'L', "././@LongLink", b"Dockerfile\0".to_vec(), false),
                (b'0', "junk", evil.clone().into_bytes(), true),
            ]),
        ),
        (
            "a long name that Go cuts at its NUL",
            raw_tar(&[
                (b'0', "Dockerfile", good.clone().into_bytes(), true),
                (
                    b'L',
                    "././@LongLink",
                    format!("Dockerfile/{}/..\0x", "b".repeat(100)).into_bytes(),
                    true,
                ),
                (b'0', "junk", evil.clone().into_bytes(), true),
            ]),
        ),
        (
            "a sparse file's name",
            raw_tar(&[
                (b'0', "Dockerfile", good.clone().into_bytes(), true),
                (
                    b'x',
                    "pax",
                    pax(&[
                        ("GNU.sparse.major", "1"),
                        ("GNU.sparse.minor", "0"),
                        ("GNU.sparse.name", "Dockerfile"),
                        ("GNU.sparse.realsize", &realsize),
                    ]),
                    true,
                ),
                (b'0', "junk", sparse.clone(), true),
            ]),
        ),
    ] {
        let (status, answer) = post_bytes(
            &b.socket,
            &format!("/v1.41/build?t={ctx_tag}"),
            "application/x-tar",
            &ctx_tar,
        );
        assert!(status == 200 || status == 403, "{what}: {status} {answer}");
        assert!(
            !answer.contains("COPY --from") && !answer.contains("ADD http"),
            "{what}: the engine built another Dockerfile: {answer}"
        );
    }
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        listener.accept().is_err(),
        "the engine fetched a URL from a Dockerfile regobox did not read"
    );

    // A filter naming someone else's object answers as one naming nothing.
    engine(&["create", "--name", &foreign_container, &victim, "true"]);
    for (list, kind, foreign) in [
        ("images", "image", victim.as_str()),
        ("containers", "container", foreign_container.as_str()),
    ] {
        let ask = |name: &str| {
            let filters = format!("{{\"before\":[\"{name}\"]}}")
                .replace('"', "%22")
                .replace(['{', '}'], "")
                .replace('[', "%5B")
                .replace(']', "%5D");
            raw(
                &b.socket,
                &format!(
                    "GET /v1.41/{list}/json?all=1&filters=%7B{filters}%7D HTTP/1.1\r\nHost: d\r\nConnection: close\r\n\r\n"
                ),
            )
        };
        let (status, answer) = ask(foreign);
        let (missing_status, missing) = ask(&format!("nothing-here-{port}"));
        assert_eq!(status, 404, "{list}: {answer}");
        assert_eq!(missing_status, 404, "{list}: {missing}");
        assert!(
            message(&answer).contains(&format!("No such {kind}")),
            "{answer}"
        );
        assert_eq!(
            message(&answer).replace(foreign, "X"),
            message(&missing).replace(&format!("nothing-here-{port}"), "X")
        );
    }

    // A copy into a container whose body stops arriving holds no lock: creates and starts go on.
    let own = b.cli_ok(&["create", &base, "true"]);
    let own = own.trim().to_string();
    made.container(&own);
    let mut trickle = std::os::unix::net::UnixStream::connect(&b.socket).unwrap();
    use std::io::Write;
    trickle
        .write_all(format!("PUT /v1.41/containers/{own}/archive?path=/tmp HTTP/1.1\r\nHost: d\r\nContent-Type: application/x-tar\r\nContent-Length: 100000\r\n\r\n").as_bytes())
        .unwrap();
    trickle.write_all(&[0u8; 512]).unwrap();
    let (done, finished) = std::sync::mpsc::channel();
    let socket = b.socket.clone();
    let image = base.clone();
    std::thread::spawn(move || {
        let out = Command::new("docker")
            .args([
                "-H",
                &format!("unix://{}", socket.display()),
                "create",
                &image,
                "true",
            ])
            .output()
            .unwrap();
        let _ = done.send(out);
    });
    let out = finished
        .recv_timeout(Duration::from_secs(60))
        .expect("a create waited behind a trickled copy");
    assert!(out.status.success(), "{}", stderr(&out));
    made.container(stdout(&out).trim());
    drop(trickle);

    std::thread::sleep(Duration::from_millis(300));
    assert!(
        listener.accept().is_err(),
        "the engine fetched a URL the application gave"
    );
    assert_eq!(image_id(&victim), victim_id, "the victim's tag moved");
    assert_eq!(
        image_id(&staged),
        staged_id,
        "the staged victim's tag moved"
    );
    assert!(!engine(&["image", "inspect", &own_tag]).status.success());
    b.stop();
}

/// The victim's mount, if an engine's mount landed on it, undone when the test ends (the test
/// stays harmless if the refusal fails: the victim is a scratch directory).
struct Unmount(std::path::PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        while mounted_at(&self.0) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).output();
        }
    }
}

fn mounted_at(path: &Path) -> bool {
    let at = path.display().to_string();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(at.as_str()))
}

/// Attack (seventh session's attacker): a copy into or out of a job makes the engine mount the
/// job's binds itself, resolving each destination once and mounting it by name. With one bind
/// nested under another (`a:/data`, `b:/data/sub/x`), the application, which owns `a` on the
/// host, swaps `a/sub` with a link to a directory outside the roots: a HEAD on the archive
/// mounted `b` over that directory after 21 requests (the engine's network files too, under a
/// bind at `/etc`; and a running job can swap its own root). Copies are refused for a job with
/// a bind and for a running job; a stopped job without one still copies both ways.
#[test]
fn copies_that_make_the_engine_mount_binds_or_race_a_running_job_are_refused() {
    let mut b = Bridged::start_untranslated("");
    let port = b.inst.port;
    let image = format!("regobox-test/busybox:copy{port}");
    b.import_busybox(&image);
    let made = OnEngine::default();
    let jobs = b.inst.root.join("files/copyjobs");
    let victim = b.inst.dir.path().join("victim");
    std::fs::create_dir_all(victim.join("x")).unwrap();
    std::fs::create_dir_all(jobs.join("a/sub/x")).unwrap();
    std::fs::create_dir_all(jobs.join("b")).unwrap();
    std::fs::write(jobs.join("b/marker"), "from b").unwrap();
    std::os::unix::fs::symlink(&victim, jobs.join("a/sublink")).unwrap();
    let _unmount = Unmount(victim.join("x"));
    let nested = b
        .cli_ok(&[
            "create",
            "-v",
            &format!("{}:/data", jobs.join("a").display()),
            "-v",
            &format!("{}:/data/sub/x", jobs.join("b").display()),
            &image,
            "true",
        ])
        .trim()
        .to_string();
    made.container(&nested);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let swapper = {
        let stop = stop.clone();
        let to_c = |p: std::path::PathBuf| {
            std::ffi::CString::new(p.into_os_string().into_encoded_bytes()).unwrap()
        };
        let (sub, link) = (to_c(jobs.join("a/sub")), to_c(jobs.join("a/sublink")));
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                // SAFETY: two NUL-terminated paths; renameat2 only reads them.
                unsafe {
                    libc::renameat2(
                        libc::AT_FDCWD,
                        sub.as_ptr(),
                        libc::AT_FDCWD,
                        link.as_ptr(),
                        libc::RENAME_EXCHANGE,
                    )
                };
            }
        })
    };
    let mut answers = Vec::new();
    for _ in 0..60 {
        answers.push(raw(
            &b.socket,
            &format!("HEAD /v1.41/containers/{nested}/archive?path=/ HTTP/1.1\r\nHost: d\r\nConnection: close\r\n\r\n"),
        ));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    swapper.join().unwrap();
    assert!(
        !mounted_at(&victim.join("x")),
        "a copy mounted b over the victim"
    );
    assert!(!victim.join("x/marker").exists());
    assert!(
        answers.iter().all(|(s, _)| *s == 403),
        "{:?}",
        answers.iter().map(|(s, _)| s).collect::<Vec<_>>()
    );
    let (status, body) = raw(
        &b.socket,
        &format!(
            "GET /v1.41/containers/{nested}/archive?path=/data HTTP/1.1\r\nHost: d\r\nConnection: close\r\n\r\n"
        ),
    );
    assert_eq!(status, 403, "{body}");
    assert!(
        body.contains("a copy into or out of a job with a bind"),
        "{body}"
    );

    // A running job: refused, whatever it binds (here nothing).
    let running = b
        .cli_ok(&["run", "-d", &image, "sleep", "30"])
        .trim()
        .to_string();
    made.container(&running);
    let (status, body) = send(
        &b.socket,
        "PUT",
        &format!("/v1.41/containers/{running}/archive?path=/tmp"),
        "application/x-tar",
        &context(&[("in", 'f', "x")]),
    );
    assert_eq!(status, 403, "{body}");
    assert!(
        body.contains("a copy into or out of a running job"),
        "{body}"
    );
    b.cli_ok(&["kill", &running]);

    // A stopped job without binds: copies go both ways.
    let (status, body) = send(
        &b.socket,
        "PUT",
        &format!("/v1.41/containers/{running}/archive?path=/"),
        "application/x-tar",
        &context(&[("in", 'f', "copied in")]),
    );
    assert_eq!(status, 200, "{body}");
    let out = b.cli(&["cp", &format!("{running}:/in"), "-"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("copied in"), "{}", stdout(&out));
    b.stop();
}

/// One exchange on an open connection: `GET /_ping`, its status line read back.
fn ping(conn: &mut std::os::unix::net::UnixStream) -> std::io::Result<String> {
    use std::io::Write;
    conn.write_all(b"GET /_ping HTTP/1.1\r\nHost: d\r\n\r\n")?;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let whole = |got: &[u8]| {
        let text = String::from_utf8_lossy(got);
        let Some((head, body)) = text.split_once("\r\n\r\n") else {
            return false;
        };
        if head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked")
        {
            body.ends_with("0\r\n\r\n")
        } else {
            body.ends_with("OK")
        }
    };
    while !whole(&got) {
        let n = conn.read(&mut buf)?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        got.extend_from_slice(&buf[..n]);
    }
    Ok(String::from_utf8_lossy(&got)
        .lines()
        .next()
        .unwrap_or("")
        .to_string())
}

/// Whether the peer closed `conn` within `within` (reads until end of stream or the time).
fn closed_within(conn: &mut std::os::unix::net::UnixStream, within: Duration) -> bool {
    let deadline = std::time::Instant::now() + within;
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return false;
        }
        conn.set_read_timeout(Some(left)).unwrap();
        match conn.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
    }
}

fn open_descriptors(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

#[test]
fn the_applications_connections_are_bounded_in_number_and_in_idle_time() {
    use std::io::Write;
    use std::os::unix::net::UnixStream;
    let mut b = Bridged::start("max_connections = 4\nidle_timeout = \"5s\"\nmax_spooled = 1");
    let pid = b.run.pid();
    // Four connections, each after one exchange, idle: the cap.
    let mut held: Vec<UnixStream> = (0..4)
        .map(|i| {
            let mut c = UnixStream::connect(&b.socket).unwrap();
            c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
            assert_eq!(ping(&mut c).unwrap(), "HTTP/1.1 200 OK", "connection {i}");
            c
        })
        .collect();
    // The fifth connects (the socket's backlog) but is not served while the four are open.
    let mut fifth = UnixStream::connect(&b.socket).unwrap();
    fifth
        .set_read_timeout(Some(Duration::from_secs(1)))
        .unwrap();
    fifth
        .write_all(b"GET /_ping HTTP/1.1\r\nHost: d\r\n\r\n")
        .unwrap();
    let mut buf = [0u8; 64];
    let early = fifth.read(&mut buf);
    assert!(
        early
            .as_ref()
            .is_err_and(|e| e.kind() == std::io::ErrorKind::WouldBlock
                || e.kind() == std::io::ErrorKind::TimedOut),
        "a fifth connection was served past docker.max_connections = 4: {early:?}"
    );
    // A hundred more waiting cost regobox no descriptor each.
    let before = open_descriptors(pid);
    let waiting: Vec<UnixStream> = (0..100)
        .map(|_| UnixStream::connect(&b.socket).unwrap())
        .collect();
    let after = open_descriptors(pid);
    assert!(
        after < before + 10,
        "{} descriptors for 100 connections over the cap",
        after - before
    );
    drop(waiting);
    assert!(
        b.run.log_text().contains("docker.max_connections"),
        "the cap is said in the log"
    );
    // The four, idle, are closed after docker.idle_timeout; the fifth is served then.
    for (i, c) in held.iter_mut().enumerate() {
        assert!(
            closed_within(c, Duration::from_secs(30)),
            "idle connection {i} still open"
        );
    }
    fifth
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut got = Vec::new();
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = fifth.read(&mut buf).unwrap();
        assert!(n > 0, "the fifth connection was closed unanswered");
        got.extend_from_slice(&buf[..n]);
    }
    assert!(
        got.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&got)
    );
    // A streamed answer is a request in progress: events followed past the idle timeout.
    let mut events = UnixStream::connect(&b.socket).unwrap();
    events
        .write_all(b"GET /events HTTP/1.1\r\nHost: d\r\n\r\n")
        .unwrap();
    assert!(
        !closed_within(&mut events, Duration::from_secs(8)),
        "a followed stream of events was cut by docker.idle_timeout"
    );
    drop(events);
    // A head trickled a byte a second is cut at docker.idle_timeout, not held for ever.
    let mut slow = UnixStream::connect(&b.socket).unwrap();
    let started = std::time::Instant::now();
    let mut cut = false;
    for byte in b"GET /_ping HTTP/1.1\r\nHost: d\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa" {
        if slow.write_all(&[*byte]).is_err() {
            cut = true;
            break;
        }
        if closed_within(&mut slow, Duration::from_secs(1)) {
            cut = true;
            break;
        }
    }
    assert!(
        cut,
        "a trickled head held its connection for {:?}",
        started.elapsed()
    );
    drop(slow);

    // Spooled bodies take their turn (docker.max_spooled = 1): a second copy into a job waits
    // while a first one's tar is still arriving, and goes through once it has.
    let image = format!("regobox-test/busybox:spool{}", b.inst.port);
    b.import_busybox(&image);
    let made = OnEngine::default();
    let job = b.cli_ok(&["create", &image, "true"]);
    let job = job.trim().to_string();
    made.container(&job);
    let dir = b.inst.dir.path().join("copied");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("x"), b"x").unwrap();
    let tar = b.inst.dir.path().join("copied.tar");
    tar_of(&dir, &tar);
    let body = std::fs::read(&tar).unwrap();
    let head = format!(
        "PUT /v1.41/containers/{job}/archive?path=/ HTTP/1.1\r\nHost: d\r\nContent-Type: application/x-tar\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let mut first = UnixStream::connect(&b.socket).unwrap();
    first.write_all(head.as_bytes()).unwrap();
    first.write_all(&body[..512]).unwrap();
    std::thread::sleep(Duration::from_secs(1));
    let mut second = UnixStream::connect(&b.socket).unwrap();
    second.write_all(head.as_bytes()).unwrap();
    second.write_all(&body).unwrap();
    second
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let early = second.read(&mut buf);
    assert!(
        early
            .as_ref()
            .is_err_and(|e| e.kind() == std::io::ErrorKind::WouldBlock
                || e.kind() == std::io::ErrorKind::TimedOut),
        "a second body was spooled past docker.max_spooled = 1: {early:?}"
    );
    first.write_all(&body[512..]).unwrap();
    for (name, conn) in [("first", &mut first), ("second", &mut second)] {
        conn.set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let mut got = Vec::new();
        let _ = conn.read_to_end(&mut got);
        assert!(
            got.starts_with(b"HTTP/1.1 200"),
            "{name} copy: {}",
            String::from_utf8_lossy(&got)
        );
    }
    drop((first, second));

    // A build whose client goes away once its context is sent leaves no render behind (it ran
    // on a blocking thread, its spool files open, with the turn and the connection given back:
    // renders piled up beyond every bound). A context that takes long to read: 900 MiB of
    // zeros in an entry named `.`, which the render reads and skips.
    let context = gzip_context(&tar_block(b".", b'0', 900 << 20), 900 << 20, &[0u8; 1024]);
    std::thread::sleep(Duration::from_secs(1));
    let baseline = open_descriptors(pid);
    let mut build = UnixStream::connect(&b.socket).unwrap();
    build
        .write_all(
            format!(
                "POST /v1.41/build?t=regobox-test/gone:x HTTP/1.1\r\nHost: d\r\nContent-Type: application/x-tar\r\nContent-Length: {}\r\n\r\n",
                context.len()
            )
            .as_bytes(),
        )
        .unwrap();
    build.write_all(&context).unwrap();
    // The render has started (the context is spooled: a file more than before).
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while open_descriptors(pid) <= baseline + 1 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(500));
    let rendering = open_descriptors(pid);
    assert!(
        rendering > baseline + 1,
        "{rendering} descriptors, {baseline} before"
    );
    drop(build);
    let gone = std::time::Instant::now();
    while open_descriptors(pid) > baseline && gone.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(50));
    }
    let left = open_descriptors(pid);
    assert!(
        left <= baseline && gone.elapsed() < Duration::from_secs(5),
        "the render went on after its client left: {left} descriptors ({baseline} before, {rendering} while it ran) {:?} after",
        gone.elapsed()
    );
    b.stop();
}

/// What comes back on `conn` until it is closed, `finals` final answers have come, or
/// `within` passes: the status lines (interim ones too), the text, and whether it was closed.
fn answers_on(
    conn: &mut std::os::unix::net::UnixStream,
    finals: usize,
    within: Duration,
) -> (Vec<String>, String, bool) {
    let deadline = std::time::Instant::now() + within;
    let mut got = Vec::new();
    let mut buf = [0u8; 65536];
    let statuses = |got: &[u8]| -> Vec<String> {
        String::from_utf8_lossy(got)
            .split("HTTP/1.1 ")
            .skip(1)
            .map(|rest| rest.lines().next().unwrap_or("").to_string())
            .collect()
    };
    let closed = loop {
        let st = statuses(&got);
        if st.iter().filter(|l| !l.starts_with("100 ")).count() >= finals {
            break false;
        }
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            break false;
        }
        conn.set_read_timeout(Some(left)).unwrap();
        match conn.read(&mut buf) {
            Ok(0) => break true,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break true,
            Err(_) => break false,
        }
    };
    (
        statuses(&got),
        String::from_utf8_lossy(&got).into_owned(),
        closed,
    )
}

/// Attack (eighteenth session, from a CI run: `docker network connect` to another's network got
/// "write: broken pipe" in place of "not found"): a request refused before its body is read,
/// while the client is still writing the body. hyper closes a connection whose request body
/// was left unread, under the client. Now what is left of the body is read and dropped, so the
/// client gets the refusal as the reason and its connection goes on; bounded by
/// `docker.max_build_context` and `docker.idle_timeout` (between pieces, and in all). And the
/// attempts of an attacker (fresh context) at the kept connection: a refused body is never read
/// as a request, whatever its framing; a client that waits to be asked for its body is not
/// asked after the answer.
#[test]
fn a_request_refused_before_its_body_is_read_is_answered_and_its_connection_kept() {
    use std::io::Write;
    use std::os::unix::net::UnixStream;
    let mut b = Bridged::start("max_build_context = 1048576\nidle_timeout = \"3s\"");
    let port = b.inst.port;
    let json = format!(r#"{{"Container":"rbx-nothing{port}","EndpointConfig":{{}}}}"#);
    let pad = " ".repeat(4000);
    let json = format!("{json}{pad}");
    for (request, content_type, body, status, says) in [
        // Ownership of the network judged before the body is read.
        (
            format!("POST /v1.41/networks/rbx-none{port}/connect"),
            "application/json",
            json.as_bytes().to_vec(),
            404,
            "not found",
        ),
        // The query refused before the body is read.
        (
            "GET /v1.41/_ping?verbose=1".to_string(),
            "application/json",
            json.as_bytes().to_vec(),
            403,
            "verbose",
        ),
        // A route refused before anything is read.
        (
            "POST /v1.41/swarm/init".to_string(),
            "application/json",
            json.as_bytes().to_vec(),
            403,
            "",
        ),
        // An import under a name refused before its tar is read.
        (
            "POST /v1.41/images/create?fromSrc=-&repo=regobox-test/UPPER:x".to_string(),
            "application/x-tar",
            vec![0u8; 256 << 10],
            400,
            "",
        ),
    ] {
        let mut conn = UnixStream::connect(&b.socket).unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        conn.write_all(
            format!(
                "{request} HTTP/1.1\r\nHost: d\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\r\n",
                body.len()
            )
            .as_bytes(),
        )
        .unwrap();
        let half = body.len() / 2;
        conn.write_all(&body[..half]).unwrap();
        std::thread::sleep(Duration::from_millis(300));
        if let Err(e) = conn.write_all(&body[half..]) {
            panic!("{request}: the rest of the body was refused: {e}");
        }
        let (got, answer) = answer_on(&mut conn).unwrap_or_else(|e| panic!("{request}: {e}"));
        assert!(
            (400..500).contains(&got) && message(&answer).contains(says),
            "{request}: {got} {answer}"
        );
        if status != 400 {
            assert_eq!(got, status, "{request}: {answer}");
        }
        assert_eq!(
            ping(&mut conn).unwrap_or_else(|e| panic!("{request}: the connection ended: {e}")),
            "HTTP/1.1 200 OK",
            "{request}"
        );
    }

    // The attacker's framings of a refused body that holds a request (one that would be refused
    // 403 "verbose" if it were ever read as one), followed by a real ping: at most the refusal
    // and the ping's answer, never the body's.
    let target = format!("POST /v1.41/networks/rbx-none{port}/connect HTTP/1.1\r\nHost: d\r\n");
    let s = "GET /v1.41/_ping?verbose=1 HTTP/1.1\r\nHost: d\r\n\r\n";
    let n = s.len();
    let zeros = "0".repeat(5000);
    for (name, request) in [
        (
            "content-length",
            format!("{target}Content-Length: {n}\r\n\r\n{s}"),
        ),
        (
            "chunked",
            format!("{target}Transfer-Encoding: chunked\r\n\r\n{n:x}\r\n{s}\r\n0\r\n\r\n"),
        ),
        (
            "chunk extensions and trailers",
            format!(
                "{target}Transfer-Encoding: chunked\r\n\r\n{n:x};a=b;c=\"GET / HTTP/1.1\"\r\n{s}\r\n0;z\r\nX-T: GET /version HTTP/1.1\r\nHost: x\r\n\r\n"
            ),
        ),
        (
            "leading zeros and spaces",
            format!(
                "{target}Transfer-Encoding: chunked\r\n\r\n{zeros}{n:x}   \t \r\n{s}\r\n0\r\n\r\n"
            ),
        ),
        (
            "chunked and a shorter content-length",
            format!(
                "{target}Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n{n:x}\r\n{s}\r\n0\r\n\r\n"
            ),
        ),
        (
            "two content-lengths",
            format!("{target}Content-Length: 0\r\nContent-Length: {n}\r\n\r\n{s}"),
        ),
        (
            "a content-length list",
            format!("{target}Content-Length: {n}, {n}\r\n\r\n{s}"),
        ),
        (
            "identity, chunked",
            format!(
                "{target}Transfer-Encoding: identity, chunked\r\n\r\n{n:x}\r\n{s}\r\n0\r\n\r\n"
            ),
        ),
        (
            "a bare LF chunk line",
            format!("{target}Transfer-Encoding: chunked\r\n\r\n{n:x}\n{s}\r\n0\r\n\r\n"),
        ),
        (
            "a chunk shorter than said",
            format!(
                "{target}Transfer-Encoding: chunked\r\n\r\n{:x}\r\n{s}\r\n0\r\n\r\n",
                n - 2
            ),
        ),
        (
            "expect, the body sent at once",
            format!("{target}Expect: 100-continue\r\nContent-Length: {n}\r\n\r\n{s}"),
        ),
        (
            "HTTP/1.0 kept alive",
            format!(
                "POST /v1.41/networks/rbx-none{port}/connect HTTP/1.0\r\nHost: d\r\nConnection: keep-alive\r\nContent-Length: {n}\r\n\r\n{s}"
            ),
        ),
    ] {
        let mut conn = UnixStream::connect(&b.socket).unwrap();
        let _ =
            conn.write_all(format!("{request}GET /_ping HTTP/1.1\r\nHost: d\r\n\r\n").as_bytes());
        let (statuses, text, _) = answers_on(&mut conn, 3, Duration::from_secs(3));
        assert!(
            !text.contains("verbose"),
            "{name}: the body was read as a request: {text}"
        );
        let finals = statuses.iter().filter(|l| !l.starts_with("100 ")).count();
        assert!(finals <= 2, "{name}: {statuses:?}");
        if let Some(first) = statuses.iter().position(|l| !l.starts_with("100 ")) {
            assert!(
                !statuses[first..].iter().any(|l| l.starts_with("100 ")),
                "{name}: 100 Continue after the answer: {statuses:?}"
            );
        }
    }
    // A client that waits to be asked for its body gets the refusal, is never asked after it,
    // and its connection ends.
    for expect in [
        "Expect: 100-continue\r\n",
        "Expect: 100-CONTINUE\r\n",
        "Expect: x\r\nExpect: 100-continue\r\n",
        "Expect: 100-continue\r\nExpect: x\r\n",
    ] {
        let mut conn = UnixStream::connect(&b.socket).unwrap();
        conn.write_all(format!("{target}{expect}Content-Length: 100\r\n\r\n").as_bytes())
            .unwrap();
        let (statuses, _, _) = answers_on(&mut conn, 2, Duration::from_secs(2));
        let first = statuses.iter().position(|l| !l.starts_with("100 "));
        assert!(first.is_some(), "{expect:?}: no answer: {statuses:?}");
        assert!(
            !statuses[first.unwrap()..]
                .iter()
                .any(|l| l.starts_with("100 ")),
            "{expect:?}: 100 Continue after the answer: {statuses:?}"
        );
    }

    // The answer comes before the body is whole, and the body left to come is not held for
    // ever: past docker.max_build_context the connection is closed...
    let mut big = UnixStream::connect(&b.socket).unwrap();
    big.write_all(
        format!(
            "POST /v1.41/networks/rbx-none{port}/connect HTTP/1.1\r\nHost: d\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            8 << 20
        )
        .as_bytes(),
    )
    .unwrap();
    big.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let (got, _) = answer_on(&mut big).unwrap();
    assert_eq!(got, 404);
    let piece = vec![b' '; 64 << 10];
    let mut written = 0usize;
    while written < 8 << 20 {
        if big.write_all(&piece).is_err() {
            break;
        }
        written += piece.len();
    }
    assert!(
        closed_within(&mut big, Duration::from_secs(10)),
        "a refused body past docker.max_build_context kept its connection"
    );
    // ... as it is once docker.idle_timeout has passed since the answer, however the bytes
    // come (the attacker's: chunk-size lines padded with zeros carry no data, and the limit
    // counts data)...
    let mut padded = UnixStream::connect(&b.socket).unwrap();
    padded
        .write_all(format!("{target}Transfer-Encoding: chunked\r\n\r\n").as_bytes())
        .unwrap();
    padded
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    assert_eq!(answer_on(&mut padded).unwrap().0, 404);
    let chunk = format!("{}1\r\nx\r\n", "0".repeat(64 << 10));
    let answered = std::time::Instant::now();
    while answered.elapsed() < Duration::from_secs(30) {
        if padded.write_all(chunk.as_bytes()).is_err() {
            break;
        }
    }
    assert!(
        answered.elapsed() < Duration::from_secs(30),
        "a padded body was read on for 30 s after its refusal"
    );
    // A body past a bound is refused naming the bound, in the answer and in the audit line (and
    // nothing more of it is read: the rest of the client's write may fail).
    for (request, len, key) in [
        (
            format!("PUT /v1.41/containers/rbx-nothing{port}/archive?path=/"),
            2 << 20,
            "docker.max_build_context",
        ),
        (
            "POST /v1.41/networks/create".to_string(),
            2 << 20,
            "docker.max_inspected_body",
        ),
    ] {
        let mut conn = UnixStream::connect(&b.socket).unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let _ = conn.write_all(
            format!("{request} HTTP/1.1\r\nHost: d\r\nContent-Type: application/x-tar\r\nContent-Length: {len}\r\n\r\n")
                .as_bytes(),
        );
        let _ = conn.write_all(&vec![0u8; len]);
        let (status, answer) = answer_on(&mut conn).unwrap();
        assert_eq!(status, 413, "{request}: {answer}");
        assert!(message(&answer).contains(key), "{request}: {answer}");
        let audit = b.audit();
        let line = audit
            .iter()
            .rev()
            .find(|l| l["path"].as_str().is_some_and(|p| request.contains(p)))
            .unwrap_or_else(|| panic!("{request}: no audit line"));
        assert_eq!(line["rule"], key, "{request}: {line}");
    }

    // ... and a body that stops coming is let go after docker.idle_timeout.
    let mut stalled = UnixStream::connect(&b.socket).unwrap();
    stalled
        .write_all(
            format!(
                "POST /v1.41/networks/rbx-none{port}/connect HTTP/1.1\r\nHost: d\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{{"
            )
            .as_bytes(),
        )
        .unwrap();
    stalled
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let (got, _) = answer_on(&mut stalled).unwrap();
    assert_eq!(got, 404);
    let started = std::time::Instant::now();
    assert!(
        closed_within(&mut stalled, Duration::from_secs(15)),
        "a refused body that stopped coming kept its connection"
    );
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    b.stop();
}

/// An import streams its tar to the engine as it comes (`fromSrc=-`): a body that stops coming
/// for docker.idle_timeout is cut there too (408), the engine's request with it (nothing
/// imported, no connection to the engine left), as the README says of every body. The bound is on
/// progress: an import whose pieces keep coming, each within the timeout, takes as long as it
/// takes.
#[test]
fn an_import_whose_body_stops_coming_is_cut_and_imports_nothing() {
    use std::io::Write;
    use std::os::unix::net::UnixStream;
    let b = Bridged::start("idle_timeout = \"3s\"");
    let pid = b.run.pid();
    let port = b.inst.port;
    let tar = std::fs::read(busybox_rootfs_tar(b.inst.dir.path())).unwrap();
    let made = OnEngine::default();
    let head = |repo: &str| {
        format!(
            "POST /v1.41/images/create?fromSrc=-&repo={repo}&tag=x HTTP/1.1\r\nHost: d\r\nContent-Type: application/x-tar\r\nContent-Length: {}\r\n\r\n",
            tar.len()
        )
    };
    // At rest: a first exchange made, so that what regobox holds for the socket is counted.
    let mut first = UnixStream::connect(&b.socket).unwrap();
    first
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    assert_eq!(ping(&mut first).unwrap(), "HTTP/1.1 200 OK");
    drop(first);
    std::thread::sleep(Duration::from_millis(300));
    let at_rest = open_descriptors(pid);

    // Half the tar, then nothing.
    let stalled = format!("regobox-test/stalled{port}");
    made.image(&format!("{stalled}:x"));
    let mut conn = UnixStream::connect(&b.socket).unwrap();
    conn.write_all(head(&stalled).as_bytes()).unwrap();
    conn.write_all(&tar[..tar.len() / 2]).unwrap();
    let sent = std::time::Instant::now();
    conn.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let (status, answer) = answer_on(&mut conn)
        .unwrap_or_else(|e| panic!("an import whose body stalled got no answer: {e}"));
    let waited = sent.elapsed();
    assert_eq!(status, 408, "{answer}");
    assert!(message(&answer).contains("docker.idle_timeout"), "{answer}");
    assert!(waited >= Duration::from_secs(2), "cut after {waited:?}");
    assert!(
        closed_within(&mut conn, Duration::from_secs(5)),
        "the stalled connection was kept"
    );
    drop(conn);
    assert!(
        !engine(&["image", "inspect", &format!("{stalled}:x")])
            .status
            .success(),
        "half an import made an image"
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while open_descriptors(pid) > at_rest && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        open_descriptors(pid),
        at_rest,
        "descriptors left behind by the stalled import"
    );
    let audit = b.audit();
    assert!(
        audit.iter().any(|l| l["rule"] == "docker.idle_timeout"
            && l["path"]
                .as_str()
                .is_some_and(|p| p.contains("images/create"))),
        "{audit:?}"
    );

    // Half the tar, then the client's end of the body (a half-close): the client's fault (400),
    // not the engine's (it was 502, "the Docker engine cannot be reached", an attacker's finding).
    let broken = format!("regobox-test/broken{port}");
    made.image(&format!("{broken}:x"));
    let mut conn = UnixStream::connect(&b.socket).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    conn.write_all(head(&broken).as_bytes()).unwrap();
    conn.write_all(&tar[..tar.len() / 2]).unwrap();
    conn.shutdown(std::net::Shutdown::Write).unwrap();
    let (status, answer) = answer_on(&mut conn).unwrap();
    assert_eq!(status, 400, "{answer}");
    assert!(message(&answer).contains("the image's tar"), "{answer}");
    assert!(
        !engine(&["image", "inspect", &format!("{broken}:x")])
            .status
            .success()
    );

    // The same tar in pieces two seconds apart (the whole longer than the timeout): imported.
    let slow = format!("regobox-test/slow{port}");
    made.image(&format!("{slow}:x"));
    let mut conn = UnixStream::connect(&b.socket).unwrap();
    conn.write_all(head(&slow).as_bytes()).unwrap();
    let piece = tar.len().div_ceil(3);
    for part in tar.chunks(piece) {
        std::thread::sleep(Duration::from_secs(2));
        conn.write_all(part).unwrap();
    }
    conn.set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let (status, answer) = answer_on(&mut conn).unwrap();
    assert_eq!(status, 200, "{answer}");
    assert!(
        engine(&["image", "inspect", &format!("{slow}:x")])
            .status
            .success(),
        "a slow import made no image: {answer}"
    );
}

/// Waits (up to a minute) for the tag `tagged` on the engine, then for its image to be the
/// instance's as regobox's socket says; returns the image's id (to be removed with `made`).
fn tagged_and_the_instances(b: &Bridged, tagged: &str, made: &OnEngine, what: &str) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !engine(&["image", "inspect", tagged]).status.success() {
        assert!(std::time::Instant::now() < deadline, "{what}: not tagged");
        std::thread::sleep(Duration::from_millis(100));
    }
    let imported = image_id(tagged);
    made.image(&imported);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (status, _) = raw(
            &b.socket,
            &format!(
                "GET /v1.41/images/{imported}/json HTTP/1.1\r\nHost: d\r\nConnection: close\r\n\r\n"
            ),
        );
        if status == 200 {
            return imported;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: not the instance's: {status}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// An import is the engine's once its body is sent: a client that sends the whole tar and hangs
/// up at once, before the engine answers, leaves an image regobox finishes anyway, tagged and
/// recorded as the application's (cut with the request, it was an image with no tag that the
/// application could neither see nor remove, and regobox never did: the host's disk filled by
/// a loop of them).
#[test]
fn an_import_whose_client_leaves_before_the_answer_is_finished_tagged_and_recorded() {
    use std::io::Write;
    use std::os::unix::net::UnixStream;
    let mut b = Bridged::start("");
    let port = b.inst.port;
    let made = OnEngine::default();
    // A tar the engine takes a while over once it is sent (the answer comes at the import's end).
    let root = b.inst.dir.path().join("left-rootfs");
    std::fs::create_dir_all(root.join("bin")).unwrap();
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).unwrap();
    let mut blob = vec![0u8; 24 << 20];
    let mut state = u64::from(port) | 1;
    for chunk in blob.chunks_mut(8) {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        chunk.copy_from_slice(&state.to_le_bytes()[..chunk.len()]);
    }
    std::fs::write(root.join("blob"), &blob).unwrap();
    drop(blob);
    let tar_path = b.inst.dir.path().join("left.tar");
    tar_of(&root, &tar_path);
    let tar = std::fs::read(&tar_path).unwrap();
    for round in 0..2 {
        let repo = format!("regobox-test/left-early{port}-{round}");
        let tagged = format!("{repo}:x");
        made.image(&tagged);
        let mut conn = UnixStream::connect(&b.socket).unwrap();
        conn.write_all(
            format!(
                "POST /v1.41/images/create?fromSrc=-&repo={repo}&tag=x HTTP/1.1\r\nHost: d\r\nContent-Type: application/x-tar\r\nContent-Length: {}\r\n\r\n",
                tar.len()
            )
            .as_bytes(),
        )
        .unwrap();
        conn.write_all(&tar).unwrap();
        // Round 0 hangs up; round 1 closes its side only (a half-close, which hyper reads as the
        // end of the connection).
        if round == 0 {
            drop(conn);
        } else {
            conn.shutdown(std::net::Shutdown::Write).unwrap();
            std::mem::forget(conn);
        }
        tagged_and_the_instances(
            &b,
            &tagged,
            &made,
            &format!("round {round}: an import whose client left before the answer"),
        );
        // The application may remove it, as any image it made.
        let (status, answer) = raw(
            &b.socket,
            &format!(
                "DELETE /v1.41/images/{tagged} HTTP/1.1\r\nHost: d\r\nConnection: close\r\n\r\n"
            ),
        );
        assert_eq!(status, 200, "round {round}: {answer}");
    }
    b.stop();
}

/// The attacker's (eighteenth session) other findings: an import the engine answers before
/// taking its tar whole (not a tar) while the client is still writing: the engine's answer,
/// no broken pipe, and the connection goes on (the engine's `Connection: close` was passed on);
/// a client that stops sending an image remove's body held every build back (the lock taken
/// before the body was read, which had no time bound): now read first, within
/// docker.idle_timeout (408). And the docker CLI and docker-py refused before their bodies are
/// read get the reason.
#[test]
fn an_engine_answering_early_or_a_stalled_body_costs_no_connection_and_holds_nothing() {
    use std::io::Write;
    use std::os::unix::net::UnixStream;
    let mut b = Bridged::start("max_build_context = 67108864\nidle_timeout = \"3s\"");
    let port = b.inst.port;
    let image = format!("regobox-test/busybox:early{port}");
    b.import_busybox(&image);
    let repo = format!("regobox-test/early{port}");
    let made = OnEngine::default();
    made.image(&format!("{repo}:x"));

    let mut conn = UnixStream::connect(&b.socket).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let size = 4usize << 20;
    conn.write_all(
        format!(
            "POST /v1.41/images/create?fromSrc=-&repo={repo}&tag=x HTTP/1.1\r\nHost: d\r\nContent-Type: application/x-tar\r\nContent-Length: {size}\r\n\r\n"
        )
        .as_bytes(),
    )
    .unwrap();
    let piece = vec![0x5au8; 64 << 10];
    for i in 0..size / piece.len() {
        if let Err(e) = conn.write_all(&piece) {
            panic!(
                "an import answered early broke after {} bytes: {e}",
                i * piece.len()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let (status, answer) = answer_on(&mut conn).unwrap();
    assert_eq!(status, 500, "{answer}");
    assert_eq!(
        ping(&mut conn)
            .unwrap_or_else(|e| panic!("the connection ended after the engine's answer: {e}")),
        "HTTP/1.1 200 OK"
    );
    assert!(
        !engine(&["image", "inspect", &format!("{repo}:x")])
            .status
            .success()
    );

    // A build refused once it has the lock (its Dockerfile names an image not the instance's),
    // while an image remove's body has stalled.
    let mut ctx = tar::Builder::new(Vec::new());
    let dockerfile = b"FROM rbx-not-ours-at-all:none\n";
    let mut h = tar::Header::new_gnu();
    h.set_path("Dockerfile").unwrap();
    h.set_size(dockerfile.len() as u64);
    h.set_mode(0o644);
    h.set_cksum();
    ctx.append(&h, &dockerfile[..]).unwrap();
    let ctx = ctx.into_inner().unwrap();
    let mut remove = UnixStream::connect(&b.socket).unwrap();
    remove
        .write_all(
            format!(
                "DELETE /v1.41/images/{image} HTTP/1.1\r\nHost: d\r\nContent-Length: 10\r\n\r\n "
            )
            .as_bytes(),
        )
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let mut build = UnixStream::connect(&b.socket).unwrap();
    build
        .write_all(
            format!(
                "POST /v1.41/build HTTP/1.1\r\nHost: d\r\nContent-Type: application/x-tar\r\nContent-Length: {}\r\n\r\n",
                ctx.len()
            )
            .as_bytes(),
        )
        .unwrap();
    build.write_all(&ctx).unwrap();
    build
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let (status, answer) = answer_on(&mut build)
        .unwrap_or_else(|e| panic!("a build waited behind an image remove's stalled body: {e}"));
    assert_eq!(status, 403, "{answer}");
    remove
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let (status, answer) = answer_on(&mut remove).unwrap();
    assert_eq!(status, 408, "{answer}");
    assert!(message(&answer).contains("docker.idle_timeout"), "{answer}");
    assert!(
        closed_within(&mut remove, Duration::from_secs(2)),
        "a stalled body was drained"
    );
    assert!(
        engine(&["image", "inspect", &image]).status.success(),
        "the image was removed"
    );

    // The docker CLI: the CI run's `network connect`, again and again.
    for i in 0..10 {
        let out = b.cli(&[
            "network",
            "connect",
            &format!("rbx-none{port}"),
            &format!("rbx-nothing{port}-{i}"),
        ]);
        assert!(
            !out.status.success() && stderr(&out).contains("not found"),
            "network connect {i}: {}",
            stderr(&out)
        );
    }
    // docker-py: one client, its pooled connection reused after each refusal.
    let script = format!(
        r#"
import docker, sys
c = docker.APIClient(base_url="unix://{sock}", version="1.41")
for i in range(20):
    try:
        c.connect_container_to_network("rbx-nothing{port}", "rbx-none{port}")
        sys.exit("connected")
    except docker.errors.NotFound:
        pass
try:
    c.import_image_from_data(b"\0" * (16 << 20), repository="regobox-test/UPPER", tag="x")
    sys.exit("imported")
except docker.errors.APIError as e:
    assert e.response.status_code == 403 and "not an image reference" in str(e), e
print(c.ping())
"#,
        sock = b.socket.display()
    );
    let out = Command::new("python3")
        .args(["-c", &script])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}\n{}", stdout(&out), stderr(&out));
    assert_eq!(stdout(&out).trim(), "True");
    b.stop();
}

/// A tar header block for `name` (`kind`, `size`), with its checksum.
fn tar_block(name: &[u8], kind: u8, size: u64) -> Vec<u8> {
    let mut h = tar::Header::new_gnu();
    h.as_gnu_mut().unwrap().name[..name.len()].copy_from_slice(name);
    h.set_entry_type(tar::EntryType::new(kind));
    h.set_mode(0o644);
    h.set_size(size);
    h.set_cksum();
    h.as_bytes().to_vec()
}

/// A gzip build context of `head`, then `zeros` zero bytes (as many gzip members of 16 MiB
/// each: quick to make, as slow to read as one), then `tail`.
fn gzip_context(head: &[u8], zeros: u64, tail: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let gz = |bytes: &[u8]| {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(bytes).unwrap();
        e.finish().unwrap()
    };
    let chunk = 16u64 << 20;
    let mut out = gz(head);
    let block = gz(&vec![0u8; chunk as usize]);
    for _ in 0..zeros / chunk {
        out.extend_from_slice(&block);
    }
    out.extend(gz(&vec![0u8; (zeros % chunk) as usize]));
    out.extend(gz(tail));
    out
}

/// Attacks (eighth session): a build context is bounded as sent (`docker.max_build_context`),
/// but regobox decompressed a gzip context whole into a second file before judging it (2 MB
/// sent held 2 GiB of the temporary directory; the default bound allowed about a terabyte), and
/// the tar crate read a GNU long name whole into memory (a 512 KB upload took 3.2 GB). Both are
/// refused now, by what they declare or at the bound, with nothing built.
/// The docker CLI sends the context of a build whose Dockerfile is outside it (`docker build -f
/// ../Dockerfile ctx`) without the padding and the end blocks of a tar, which the engine reads:
/// regobox refused it ("not a readable tar archive": an attacker's, twenty-fifth session). Such
/// a context builds; one cut inside an entry's data is refused.
#[test]
fn a_context_without_its_end_blocks_builds_and_one_cut_short_is_refused() {
    let b = Bridged::start("");
    let port = b.inst.port;
    let base = format!("regobox-test/busybox:outside{port}");
    b.import_busybox(&base);
    let dir = b.inst.dir.path().join("outside");
    let ctx = dir.join("ctx");
    std::fs::create_dir_all(&ctx).unwrap();
    std::fs::write(ctx.join("x"), "from-the-context\n").unwrap();
    let dockerfile = dir.join("Dockerfile.outside");
    std::fs::write(&dockerfile, format!("FROM {base}\nCOPY x /x\nRUN cat /x\n")).unwrap();
    let tag = format!("regobox-test/outside:{port}");
    let made = OnEngine::default();
    made.image(&tag);
    made.image(&format!("{tag}-unended"));
    made.image(&format!("{tag}-cut"));
    let out = b.cli(&[
        "build",
        "-f",
        dockerfile.to_str().unwrap(),
        "-t",
        &tag,
        ctx.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    assert!(
        stdout(&out).contains("from-the-context"),
        "{}",
        stdout(&out)
    );
    let full = context(&[
        ("Dockerfile", 'f', &format!("FROM {base}\nRUN true\n")),
        ("y", 'f', &"z".repeat(2000)),
    ]);
    // The Dockerfile's header and data (a block each), y's header, then y's data: all of it,
    // or half.
    let unended = &full[..3 * 512 + 2000];
    let (status, body) = post_bytes(
        &b.socket,
        &format!("/v1.41/build?t={tag}-unended"),
        "application/x-tar",
        unended,
    );
    assert_eq!(status, 200, "{body}");
    assert!(
        image_id(&format!("{tag}-unended")).starts_with("sha256:"),
        "not built: {body}"
    );
    let cut = &full[..3 * 512 + 1000];
    let (status, body) = post_bytes(
        &b.socket,
        &format!("/v1.41/build?t={tag}-cut"),
        "application/x-tar",
        cut,
    );
    assert_eq!(status, 400, "{body}");
    assert!(message(&body).contains("inside an entry's data"), "{body}");
    assert!(
        !engine(&["image", "inspect", &format!("{tag}-cut")])
            .status
            .success()
    );
}

#[test]
fn a_build_context_is_bounded_once_decompressed_and_its_long_names_by_what_they_declare() {
    let mut b = Bridged::start("max_build_context = 8388608");
    let ask = |context: &[u8]| {
        post_bytes(
            &b.socket,
            "/v1.41/build?t=regobox-test/bomb:x",
            "application/x-tar",
            context,
        )
    };
    // A file of 32 MiB of zeros in a context of about 40 KB.
    let big = gzip_context(&tar_block(b"big", b'0', 32 << 20), 32 << 20, &[]);
    assert!(big.len() < 1 << 20, "{}", big.len());
    let (status, body) = ask(&big);
    assert!(status == 400 || status == 413, "{status} {body}");
    assert!(
        message(&body).contains("larger than docker.max_build_context")
            && message(&body).contains("once decompressed"),
        "{body}"
    );
    // A GNU long name declaring 4 MiB.
    let mut long = tar_block(b"././@LongLink", b'L', 4 << 20);
    long.extend(std::iter::repeat_n(b'a', 4 << 20));
    long.extend(tar_block(b"x", b'0', 0));
    long.extend([0u8; 1024]);
    let long = gzip_context(&long, 0, &[]);
    let (status, body) = ask(&long);
    assert_eq!(status, 403, "{body}");
    assert!(
        message(&body).contains("long name or PAX record of 4194304 bytes"),
        "{body}"
    );
    assert!(
        !engine(&["image", "inspect", "regobox-test/bomb:x"])
            .status
            .success()
    );
    // (The re-attack.) A name over 4 096 bytes, and deep names each in new directories: the
    // directories they imply were kept whole, quadratic in a name's length (a 200-byte upload
    // took 1.15 GB).
    let entry = |name: &[u8], kind: u8| {
        let mut e = tar_block(b"././@LongLink", b'L', name.len() as u64 + 1);
        e.extend_from_slice(name);
        e.push(0);
        e.resize(e.len().next_multiple_of(512), 0);
        e.extend(tar_block(b"x", kind, 0));
        e
    };
    let mut too_long = entry(&b"a/".repeat(2100), b'5');
    too_long.extend([0u8; 1024]);
    let (status, body) = ask(&gzip_context(&too_long, 0, &[]));
    assert_eq!(status, 403, "{body}");
    assert!(
        message(&body).contains("a name of 4199 bytes; at most 4096"),
        "{body}"
    );
    let mut deep = Vec::new();
    for k in 0..40 {
        let mut name = format!("b{k}/").into_bytes();
        name.extend(b"a/".repeat(2000));
        deep.extend(entry(&name, b'5'));
    }
    deep.extend([0u8; 1024]);
    let (status, body) = ask(&gzip_context(&deep, 0, &[]));
    assert_eq!(status, 403, "{body}");
    assert!(
        message(&body).contains("with the directories they imply, take more than"),
        "{body}"
    );
    b.stop();
}

/// Attack (twelfth session, the third attacker): a health check every millisecond (run by the
/// engine, outside the job's CPU limit) baked into an imported image, then a create that gives
/// none: the engine merges the image's. Judged as merged; an interval of the create's own is
/// the way.
#[test]
fn a_health_check_more_often_than_a_second_is_refused_from_the_image_too() {
    let b = Bridged::start("");
    let tag = format!("regobox-test/hc-rd:{}", b.inst.port);
    let made = OnEngine::default();
    made.image(&tag);
    let out = Command::new("docker")
        .args([
            "import",
            "--change",
            "HEALTHCHECK --interval=1ms CMD true",
            "-",
            &tag,
        ])
        .env("DOCKER_HOST", format!("unix://{}", b.socket.display()))
        .stdin(std::fs::File::open(busybox_rootfs_tar(b.inst.dir.path())).unwrap())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    for body in [
        format!(r#"{{"Image":"{tag}","Cmd":["true"]}}"#),
        format!(r#"{{"Image":"{tag}","Cmd":["true"],"Healthcheck":{{"Interval":0}}}}"#),
    ] {
        let (status, answer) = post(&b.socket, "/v1.41/containers/create", &body);
        if let Some(id) = serde_json::from_str::<Value>(&answer)
            .ok()
            .and_then(|v| v["Id"].as_str().map(str::to_string))
        {
            made.container(&id);
        }
        assert_eq!(status, 403, "{body}: {answer}");
        assert!(
            message(&answer).contains("Healthcheck.Interval"),
            "{answer}"
        );
    }
    assert_eq!(containers_of(&tag), Vec::<String>::new());
    let (status, answer) = post(
        &b.socket,
        "/v1.41/containers/create",
        &format!(r#"{{"Image":"{tag}","Cmd":["true"],"Healthcheck":{{"Interval":2000000000}}}}"#),
    );
    assert_eq!(status, 201, "{answer}");
    made.container(
        serde_json::from_str::<Value>(&answer).unwrap()["Id"]
            .as_str()
            .unwrap(),
    );
}

/// Attack (twelfth session): the application tags an image of its own with another image's
/// id prefix, builds `FROM` that name after a stage that sleeps, and removes its tag while the
/// first stage sleeps: the engine, reading the name again for the second stage, took the other
/// image (its files in a build labelled the instance's). A name that reads as an image id is
/// now refused outright (nineteenth session); the same race with a tag naming a registry would
/// make the engine pull from it. A remove waits for the builds in progress, so the name the
/// build reads stays the instance's image.
#[test]
fn a_name_a_build_reads_cannot_be_removed_under_it() {
    let b = Bridged::start("");
    let port = b.inst.port;
    let base = format!("regobox-test/busybox:rd{port}");
    b.import_busybox(&base);
    let made = OnEngine::default();
    let victim = format!("regobox-test/victim-rd:{port}");
    made.image(&victim);
    foreign_image(b.inst.dir.path(), &victim, "the other's secret");
    let victim_id = image_id(&victim);
    let prefix = victim_id.trim_start_matches("sha256:")[..12].to_string();
    let own = format!("FROM {base}\nRUN echo mine > /mine\n");
    // A tag of the instance's named like the other image's id prefix: refused.
    made.image(&format!("{prefix}:latest"));
    let (status, answer) = post_bytes(
        &b.socket,
        &format!("/v1.41/build?t={prefix}%3Alatest"),
        "application/x-tar",
        &context(&[("Dockerfile", 'f', &own)]),
    );
    assert_eq!(status, 403, "{answer}");
    assert!(answer.contains("image id"), "{answer}");
    // A tag of the instance's naming a registry (where no image is), removed mid-build.
    let shadow = format!("localhost:5999/shadow-rd{port}:latest");
    made.image(&shadow);
    let (status, answer) = post_bytes(
        &b.socket,
        &format!(
            "/v1.41/build?t={}",
            shadow.replace(':', "%3A").replace('/', "%2F")
        ),
        "application/x-tar",
        &context(&[("Dockerfile", 'f', &own)]),
    );
    assert_eq!(status, 200, "{answer}");
    let stolen = format!("regobox-test/stolen-rd:{port}");
    made.image(&stolen);
    let two_stages = format!("FROM {base} AS a\nRUN sleep 3\nFROM {shadow}\nLABEL read=1\n");
    let socket = b.socket.clone();
    let path = format!("/v1.41/build?t={}&nocache=1", stolen.replace(':', "%3A"));
    let build = std::thread::spawn(move || {
        post_bytes(
            &socket,
            &path,
            "application/x-tar",
            &context(&[("Dockerfile", 'f', &two_stages)]),
        )
    });
    std::thread::sleep(Duration::from_millis(1500));
    let (status, answer) = send(
        &b.socket,
        "DELETE",
        &format!("/v1.41/images/{shadow}"),
        "",
        b"",
    );
    assert_eq!(status, 200, "{answer}");
    let (status, answer) = build.join().unwrap();
    assert_eq!(status, 200, "{answer}");
    // The build read the instance's image, not a registry's (none: the build would fail).
    let out = engine(&["run", "--rm", &stolen, "/bin/busybox", "cat", "/mine"]);
    assert!(
        stdout(&out).contains("mine"),
        "{answer}\n{}{}",
        stdout(&out),
        stderr(&out)
    );
    // And the other image is still there, its tag untouched.
    assert_eq!(image_id(&victim), victim_id);
}

/// Attack (nineteenth session): the tag an import or a build makes was judged free when the
/// request came, and made by the engine when its stream ended, after a wait the application
/// controls (an import's body trickled within docker.idle_timeout, a build's step that sleeps).
/// A tag made on the host meanwhile (an administrator's pull, another tenant's import) was moved
/// to the application's image. Now the engine is asked for no tag and regobox makes it at the
/// end, judged again: the host's tag stays where it is, and the client is told why its own was
/// not made (an error in the stream: the docker CLI fails on it). Tags nobody else made are made
/// as before.
#[test]
fn a_tag_made_on_the_host_while_an_import_or_a_build_runs_is_not_moved() {
    use std::io::Write;
    use std::os::unix::net::UnixStream;
    let b = Bridged::start("idle_timeout = \"5s\"");
    let port = b.inst.port;
    let base = format!("regobox-test/busybox:late{port}");
    b.import_busybox(&base);
    let made = OnEngine::default();
    let hosts = format!("regobox-test/hosts-late:{port}");
    made.image(&hosts);
    foreign_image(b.inst.dir.path(), &hosts, "the host's");
    let host_id = image_id(&hosts);
    assert!(host_id.starts_with("sha256:"), "{host_id}");

    // An import: all but its last bytes, the host's tag, the rest.
    let victim = format!("regobox-test/victim-late{port}");
    made.image(&format!("{victim}:x"));
    let tar = std::fs::read(busybox_rootfs_tar(b.inst.dir.path())).unwrap();
    let mut conn = UnixStream::connect(&b.socket).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    conn.write_all(
        format!(
            "POST /v1.41/images/create?fromSrc=-&repo={victim}&tag=x HTTP/1.1\r\nHost: d\r\nContent-Type: application/x-tar\r\nContent-Length: {}\r\n\r\n",
            tar.len()
        )
        .as_bytes(),
    )
    .unwrap();
    conn.write_all(&tar[..tar.len() - 10]).unwrap();
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        engine(&["tag", &hosts, &format!("{victim}:x")])
            .status
            .success()
    );
    std::thread::sleep(Duration::from_secs(1));
    conn.write_all(&tar[tar.len() - 10..]).unwrap();
    let (status, answer) = answer_on(&mut conn).unwrap();
    assert_eq!(
        image_id(&format!("{victim}:x")),
        host_id,
        "the host's tag was moved by the import: {answer}"
    );
    assert_eq!(status, 200, "{answer}");
    assert!(
        answer.contains("errorDetail") && answer.contains("not this instance's"),
        "{answer}"
    );
    // The import's own image is the instance's, untagged.
    let imported = answer
        .split('"')
        .find(|w| w.starts_with("sha256:") && w.len() == 71)
        .unwrap_or_else(|| panic!("no image id in {answer}"))
        .to_string();
    made.image(&imported);
    let (status, inspected) = raw(
        &b.socket,
        &format!(
            "GET /v1.41/images/{imported}/json HTTP/1.1\r\nHost: d\r\nConnection: close\r\n\r\n"
        ),
    );
    assert_eq!(status, 200, "{inspected}");
    // The tag refused is not recorded as made: moved onto that image by the host afterwards, it
    // is the host's (an attacker's, twenty-fifth session: the application removed it).
    let out = engine(&["tag", &imported, &format!("{victim}:x")]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = b.cli(&["rmi", &format!("{victim}:x")]);
    assert!(
        !out.status.success(),
        "removed the host's tag: {}",
        stdout(&out)
    );
    assert_eq!(image_id(&format!("{victim}:x")), imported);
    // The docker CLI fails on such an import, and makes a tag nobody else made.
    let late = format!("regobox-test/victim-late{port}:cli");
    made.image(&late);
    let out = b.cli(&[
        "import",
        busybox_rootfs_tar(b.inst.dir.path()).to_str().unwrap(),
        &late,
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let cli_id = image_id(&late);
    made.image(&cli_id);
    assert!(cli_id.starts_with("sha256:") && cli_id != host_id);

    // A build whose step sleeps; the host tags the name while it runs.
    let stolen = format!("regobox-test/stolen-late:{port}");
    made.image(&stolen);
    let base_id = image_id(&base);
    let socket = b.socket.clone();
    let path = format!(
        "/v1.41/build?t={}&t=regobox-test/free-late:{port}&nocache=1",
        stolen.replace(':', "%3A")
    );
    made.image(&format!("regobox-test/free-late:{port}"));
    let dockerfile = format!("FROM {base}\nRUN sleep 3\n");
    let build = std::thread::spawn(move || {
        let body = context(&[("Dockerfile", 'f', &dockerfile)]);
        let mut conn = posted_tar(&socket, &path, &body);
        answer_on(&mut conn).unwrap()
    });
    // Once the step runs (its container is made from the base image), the host's tag.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while stdout(&engine(&[
        "ps",
        "-q",
        "--filter",
        &format!("ancestor={base_id}"),
    ]))
    .trim()
    .is_empty()
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the build's step never ran"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(engine(&["tag", &hosts, &stolen]).status.success());
    let (status, answer) = build.join().unwrap();
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        image_id(&stolen),
        host_id,
        "the host's tag was moved by the build: {answer}"
    );
    assert!(
        answer.contains("errorDetail") && answer.contains("not this instance's"),
        "{answer}"
    );
    // The other tag, nobody's, was made on the build's image, and said as the engine says it.
    let free = image_id(&format!("regobox-test/free-late:{port}"));
    assert!(free.starts_with("sha256:") && free != host_id, "{free}");
    made.image(&free);
    assert!(
        answer.contains(&format!(
            "Successfully tagged regobox-test/free-late:{port}"
        )),
        "{answer}"
    );
    // Each tag refused at the end is audited as a refusal, naming the image it was not made
    // on (the request's own line, written when the stream began, says allow).
    let audit = b.audit();
    let refused = |endpoint: &str, rule: &str| {
        audit
            .iter()
            .find(|l| l["decision"] == "deny" && l["endpoint"] == endpoint && l["rule"] == rule)
    };
    let import_line = refused("ImageCreate", "query.tag")
        .unwrap_or_else(|| panic!("the import's refused tag not audited: {audit:?}"));
    assert_eq!(import_line["object"], imported.as_str(), "{import_line}");
    assert_eq!(import_line["path"], "/v1.41/images/create", "{import_line}");
    let build_line = refused("Build", "query.t")
        .unwrap_or_else(|| panic!("the build's refused tag not audited: {audit:?}"));
    assert_eq!(
        build_line["object"]
            .as_str()
            .map(|o| o.starts_with("sha256:")),
        Some(true),
        "{build_line}"
    );
    assert_eq!(build_line["status"], 403, "{build_line}");
}

/// Attacks on the tags made at the end (nineteenth session): a build whose last stage fails is
/// tagged on nothing (the engine writes an image id at the end of every stage: the first
/// stage's was tagged); a quiet build's output is its id alone (scripts read it); an import
/// whose client hangs up once the image's id is sent is still tagged and recorded (it was no
/// one's: untagged, invisible to the application); a name that reads as an image id is refused
/// for an import, a pull and a build's tag (`index.docker.io/` included), and an empty tag is
/// the client's error.
#[test]
fn the_tags_made_at_the_end_are_the_finished_images_and_nothing_is_left_unowned() {
    use std::io::Write;
    use std::os::unix::net::UnixStream;
    let b = Bridged::start("");
    let port = b.inst.port;
    let base = format!("regobox-test/busybox:end{port}");
    b.import_busybox(&base);
    let made = OnEngine::default();
    let whole = |path: &str, body: &[u8]| {
        let mut conn = posted_tar(&b.socket, path, body);
        answer_on(&mut conn).unwrap()
    };

    // Two stages, the second failing, its client reading to the end; the first from an image
    // built through regobox (labelled the instance's, as its stages are).
    let labelled = format!("regobox-test/labelled-end:{port}");
    made.image(&labelled);
    let (status, answer) = whole(
        &format!("/v1.41/build?t={}", labelled.replace(':', "%3A")),
        &context(&[("Dockerfile", 'f', &format!("FROM {base}\nLABEL l=1\n"))]),
    );
    assert_eq!(status, 200, "{answer}");
    let failed = format!("regobox-test/failed-end:{port}");
    made.image(&failed);
    let two = format!(
        "FROM {labelled} AS first\nRUN echo first > /stage\nFROM {base}\nCOPY --from=first /stage /stage\nRUN exit 3\n"
    );
    let (status, answer) = whole(
        &format!("/v1.41/build?t={}&nocache=1", failed.replace(':', "%3A")),
        &context(&[("Dockerfile", 'f', &two)]),
    );
    assert_eq!(status, 200, "{answer}");
    assert!(answer.contains("errorDetail"), "{answer}");
    assert!(!answer.contains("Successfully tagged"), "{answer}");
    assert!(
        !engine(&["image", "inspect", &failed]).status.success(),
        "a failed build was tagged: {answer}"
    );

    // A quiet build through the CLI: its output is the image's id alone, and it is tagged.
    let quiet = format!("regobox-test/quiet-end:{port}");
    made.image(&quiet);
    let ctx = b.inst.dir.path().join("quiet-ctx");
    std::fs::create_dir_all(&ctx).unwrap();
    std::fs::write(ctx.join("Dockerfile"), format!("FROM {base}\nLABEL q=1\n")).unwrap();
    let out = b.cli_ok(&["build", "-q", "-t", &quiet, &ctx.display().to_string()]);
    let id = out.trim();
    assert!(
        id.starts_with("sha256:") && !id.contains('\n'),
        "a quiet build printed {out:?}"
    );
    assert_eq!(image_id(&quiet), id);

    // An import whose client hangs up once the image's id is on its way: tagged and recorded.
    let left = format!("regobox-test/left-end{port}");
    made.image(&format!("{left}:x"));
    let tar = std::fs::read(busybox_rootfs_tar(b.inst.dir.path())).unwrap();
    let mut conn = UnixStream::connect(&b.socket).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    conn.write_all(
        format!(
            "POST /v1.41/images/create?fromSrc=-&repo={left}&tag=x HTTP/1.1\r\nHost: d\r\nContent-Type: application/x-tar\r\nContent-Length: {}\r\n\r\n",
            tar.len()
        )
        .as_bytes(),
    )
    .unwrap();
    conn.write_all(&tar).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&got).contains("sha256:") {
        let n = conn.read(&mut buf).unwrap();
        assert!(n > 0, "{}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    drop(conn);
    tagged_and_the_instances(
        &b,
        &format!("{left}:x"),
        &made,
        "an import whose client left",
    );

    // Names that read as an image id; an empty tag.
    let like_an_id = "a0dd48a413e2";
    for repo in [
        like_an_id.to_string(),
        format!("index.docker.io/{like_an_id}"),
    ] {
        let (status, answer) = whole(&format!("/v1.41/images/create?fromSrc=-&repo={repo}"), &tar);
        assert_eq!(status, 403, "{repo}: {answer}");
        assert!(answer.contains("image id"), "{answer}");
    }
    for t in [like_an_id, ""] {
        let (status, answer) = whole(
            &format!("/v1.41/build?t={t}"),
            &context(&[("Dockerfile", 'f', &format!("FROM {base}\n"))]),
        );
        assert_eq!(status, 403, "t={t:?}: {answer}");
    }
    let (status, answer) = raw(
        &b.socket,
        &format!(
            "POST /v1.41/images/create?fromImage={like_an_id}&tag=latest HTTP/1.1\r\nHost: d\r\nConnection: close\r\n\r\n"
        ),
    );
    assert_eq!(status, 403, "{answer}");
    assert!(!engine(&["image", "inspect", like_an_id]).status.success());
}

/// Attack (eighth session): `restart?t=N` of a job that ignores SIGTERM held, for the whole
/// `N` seconds, the turn that every start, copy and create waits for (the engine's restart
/// mounts the binds after its wait); with `t` at 2^31 the socket was the application's no
/// more. A restart is forwarded as a stop, then a start that takes the turn.
#[test]
fn a_restart_waiting_for_its_job_holds_up_no_other_request() {
    let mut b = Bridged::start("");
    let image = format!("regobox-test/busybox:restart{}", b.inst.port);
    b.import_busybox(&image);
    let made = OnEngine::default();
    // PID 1 of its container, `sleep` ignores SIGTERM: a stop waits its `t` out.
    let job = b.cli_ok(&["create", &image, "sleep", "1000"]);
    let job = job.trim().to_string();
    made.container(&job);
    b.cli_ok(&["start", &job]);
    let socket = b.socket.clone();
    let restarting = {
        let job = job.clone();
        std::thread::spawn(move || {
            raw(
                &socket,
                &format!(
                    "POST /v1.41/containers/{job}/restart?t=15 HTTP/1.1\r\nHost: d\r\nConnection: close\r\n\r\n"
                ),
            )
        })
    };
    std::thread::sleep(Duration::from_secs(2));
    let other = b.cli_ok(&["create", &image, "true"]);
    made.container(other.trim());
    assert!(
        !restarting.is_finished(),
        "the create waited for the restart's wait to end"
    );
    let (status, body) = restarting.join().unwrap();
    assert_eq!(status, 204, "{body}");
    let running = stdout(&engine(&[
        "inspect",
        "--format",
        "{{.State.Running}}",
        &job,
    ]));
    assert_eq!(running.trim(), "true", "restarted");
    b.stop();
}

/// An attacker's finding (twentieth session): the engine commits an image for every step of a
/// build, and the instance's label came only with the step the build's `labels` adds at the
/// end. A build that failed kept its finished steps' images, and a multi-stage build its earlier
/// stage's, untagged and unlabelled: the application could neither see nor remove them, and a
/// loop of failed builds filled the host's disk. regobox now gives the engine its own rendering
/// of the Dockerfile, with the label right after each `FROM`: every image a build commits is the
/// instance's.
#[test]
fn every_image_a_build_commits_is_the_instances() {
    let b = Bridged::start("");
    let port = b.inst.port;
    let base = format!("regobox-test/busybox:steps{port}");
    b.import_busybox(&base);
    let made = OnEngine::default();
    let instance = std::fs::read_to_string(b.inst.secret("docker-instance")).unwrap();
    let ctx = b.inst.dir.path().join("steps-ctx");
    std::fs::create_dir_all(&ctx).unwrap();
    // The images a build's output says it committed (` ---> <id>`), and its base's.
    let base_id = image_id(&base);
    let committed = |out: &str| -> Vec<String> {
        out.lines()
            .filter_map(|l| l.trim().strip_prefix("---> "))
            .filter(|id| id.len() == 12 && id.chars().all(|c| c.is_ascii_hexdigit()))
            .filter(|id| !base_id.trim_start_matches("sha256:").starts_with(*id))
            .map(str::to_string)
            .collect()
    };
    let instances = |id: &str| {
        let label = stdout(&engine(&[
            "image",
            "inspect",
            "--format",
            "{{index .Config.Labels \"regobox.instance\"}}",
            id,
        ]));
        let (status, _) = raw(
            &b.socket,
            &format!(
                "GET /v1.41/images/{id}/json HTTP/1.1\r\nHost: d\r\nConnection: close\r\n\r\n"
            ),
        );
        (label.trim() == instance.trim(), status)
    };
    // A build that fails after a step, and one of two stages whose first is only copied from;
    // with continuation lines, a comment inside one, and a `FROM` with its stage name.
    let stamp = format!("{port}");
    for (name, dockerfile, succeeds) in [
        (
            "failed",
            format!("FROM {base}\nRUN echo {stamp} \\\n# inside\n  > /x\nRUN false\n"),
            false,
        ),
        (
            "staged",
            format!(
                "FROM {base} AS first\nRUN echo {stamp} > /a\nFROM {base}\nCOPY --from=first /a /a\nRUN cat /a\n"
            ),
            true,
        ),
        // A step longer than the engine's longest line once joined (an attacker's, on the
        // rendering: the engine refused it), on lines it joins back.
        (
            "long",
            format!(
                "FROM {base}\nRUN true \\\n{}  && echo {stamp} > /a\n",
                "  && echo 0123456789012345678901234567890123456789 > /dev/null \\\n".repeat(2000)
            ),
            true,
        ),
    ] {
        std::fs::write(ctx.join("Dockerfile"), dockerfile).unwrap();
        let tag = format!("regobox-test/steps-{name}:{port}");
        made.image(&tag);
        let out = b.cli(&["build", "-t", &tag, &ctx.display().to_string()]);
        let text = format!("{}{}", stdout(&out), String::from_utf8_lossy(&out.stderr));
        assert_eq!(out.status.success(), succeeds, "{name}: {text}");
        let ids = committed(&text);
        for id in &ids {
            made.image(id);
        }
        assert!(!ids.is_empty(), "{name}: {ids:?}\n{text}");
        for id in &ids {
            assert_eq!(
                instances(id),
                (true, 200),
                "{name}: the step image {id} is not the instance's\n{text}"
            );
        }
        if succeeds {
            // The file written (copied from the first stage), and the build's own tag.
            let run = b.cli_ok(&["run", "--rm", &tag, "cat", "/a"]);
            assert_eq!(run.trim(), stamp);
        }
        // The application may remove them all (children first: a step shared by both stages,
        // from the cache, goes once neither stage's next step is left).
        let mut left = ids.clone();
        for _ in 0..ids.len() {
            left.retain(|id| {
                let (status, answer) = raw(
                    &b.socket,
                    &format!(
                        "DELETE /v1.41/images/{id}?force=1 HTTP/1.1\r\nHost: d\r\nConnection: close\r\n\r\n"
                    ),
                );
                assert!(
                    matches!(status, 200 | 404 | 409),
                    "{name}: removing {id}: {status} {answer}"
                );
                status == 409
            });
        }
        assert!(left.is_empty(), "{name}: not removed: {left:?}");
        for id in &ids {
            assert!(
                !engine(&["image", "inspect", id]).status.success(),
                "{name}: {id} is still on the engine"
            );
        }
    }
    // A label of the application's own may not be the instance's (an attacker's: step images
    // labelled with another value were no one's, or another instance's).
    std::fs::write(
        ctx.join("Dockerfile"),
        format!("FROM {base}\nRUN true\nLABEL a=1 regobox.instance=other b=2\n"),
    )
    .unwrap();
    let out = b.cli(&["build", &ctx.display().to_string()]);
    assert!(!out.status.success());
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("regobox.instance is regobox's"), "{said}");
    assert!(!stdout(&out).contains("Step 1"), "{}", stdout(&out));
}

/// The last note's (twentieth session): a build whose client left on its last line, before the
/// stream's end was read, was left untagged (2 builds of 8). The end is still read for a moment
/// once the client has gone, and the tags made.
#[test]
fn a_build_whose_client_leaves_on_its_last_line_is_tagged() {
    use std::io::Read;
    let b = Bridged::start("");
    let port = b.inst.port;
    let base = format!("regobox-test/busybox:last{port}");
    b.import_busybox(&base);
    let made = OnEngine::default();
    for n in 0..6 {
        let tag = format!("regobox-test/last-line{port}:{n}");
        made.image(&tag);
        let body = context(&[(
            "Dockerfile",
            'f',
            &format!("FROM {base}\nRUN echo {port}-{n} > /n\n"),
        )]);
        let path = format!("/v1.41/build?t={}&nocache=1", tag.replace(':', "%3A"));
        let mut conn = posted_tar(&b.socket, &path, &body);
        // Read until the engine's last line, then go.
        let (mut seen, mut piece) = (Vec::new(), [0u8; 4096]);
        while !String::from_utf8_lossy(&seen).contains("Successfully built") {
            let read = conn.read(&mut piece).unwrap();
            assert!(read > 0, "{}", String::from_utf8_lossy(&seen));
            seen.extend_from_slice(&piece[..read]);
        }
        drop(conn);
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        while !engine(&["image", "inspect", &tag]).status.success() {
            assert!(
                std::time::Instant::now() < deadline,
                "build {n}: not tagged once its client left on its last line"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        made.image(&image_id(&tag));
    }
}

/// A build (tagged `regobox-test/<name><port>:x`, the tag made on `made`) whose step writes
/// 16 MB of output, then sleeps: its stream outlasts any buffer. The connection it was asked on,
/// nothing read, and its tag.
fn long_build_output(
    b: &Bridged,
    name: &str,
    made: &OnEngine,
) -> (std::os::unix::net::UnixStream, String) {
    let port = b.inst.port;
    let base = format!("regobox-test/busybox:{name}{port}");
    b.import_busybox(&base);
    let tag = format!("regobox-test/{name}{port}:x");
    made.image(&tag);
    let body = context(&[(
        "Dockerfile",
        'f',
        &format!(
            "FROM {base}\nRUN i=0; while [ $i -lt 160000 ]; do echo 0123456789012345678901234567890123456789012345678901234567890123456789012345678901234567890123456789; i=$((i+1)); done; sleep 30\n"
        ),
    )]);
    let path = format!("/v1.41/build?t={}&nocache=1", tag.replace(':', "%3A"));
    (posted_tar(&b.socket, &path, &body), tag)
}

/// The last note's (twentieth session): nothing bounded the socket's writing side, so a client
/// that asked for a stream and never read it held its connection, and what the engine was
/// sending (a build, held at its step's output; a followed log), for as long as it liked. A write
/// that waits for `docker.idle_timeout` with nothing taken closes the connection, and the
/// engine's stream with it.
#[test]
fn a_client_that_never_reads_its_stream_is_cut() {
    use std::io::Read;
    let b = Bridged::start("idle_timeout = \"3s\"");
    let made = OnEngine::default();
    let (mut conn, tag) = long_build_output(&b, "unread", &made);
    // Nothing read for 12 s, then what is there: the end of the stream (regobox closed the
    // connection), not more output.
    std::thread::sleep(Duration::from_secs(12));
    conn.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let (mut got, mut piece) = (0usize, vec![0u8; 1 << 16]);
    let started = std::time::Instant::now();
    let closed = loop {
        match conn.read(&mut piece) {
            Ok(0) => break true,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break true,
            Err(_) => break false,
        }
        if started.elapsed() > Duration::from_secs(20) {
            break false;
        }
    };
    assert!(
        closed,
        "a stream not read for 12 s was held open ({got} bytes read after)"
    );
    // The build stopped with it: never tagged.
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        !engine(&["image", "inspect", &tag]).status.success(),
        "the build went on without its client"
    );
}

/// A reviewer's finding (twenty-first session), on the bound above: a waiting write is woken only
/// once the client has read most of the socket's buffer, so a client reading its stream slowly
/// but steadily (a log piped to a slow script) was cut as one that reads nothing. The deadline
/// counts from the client's last read.
#[test]
fn a_client_reading_its_stream_slowly_is_not_cut() {
    use std::io::Read;
    let b = Bridged::start("idle_timeout = \"3s\"");
    let made = OnEngine::default();
    let (mut conn, _) = long_build_output(&b, "slow-reader", &made);
    // 512 B every 0.1 s (5 KB/s) for 12 s: the socket's buffer takes longer than
    // docker.idle_timeout to drain at that pace.
    let started = std::time::Instant::now();
    let (mut got, mut piece) = (0usize, [0u8; 512]);
    while started.elapsed() < Duration::from_secs(12) {
        let n = conn.read(&mut piece).unwrap_or(0);
        assert!(n > 0, "cut after {:?}, {got} bytes read", started.elapsed());
        got += n;
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A container the host's administrator makes from one of the instance's images carries the
/// image's labels, the instance's among them (the engine copies an image's labels into every
/// container made from it). It is still not the instance's: invisible through the socket
/// (inspect, list, start, copy, remove, network connect), and left alone by regobox's own
/// collection of old jobs at a start. (An attacker's, twenty-third session: the application
/// read such a container's environment, copied a program into it and started it with the
/// capability and published port the administrator had given it, then removed it.) A volume
/// that has no record of the instance's containers yet (an earlier version's) keeps those it
/// has.
#[test]
fn a_container_the_host_makes_from_the_instances_image_is_not_the_instances() {
    let mut b = Bridged::start("gc_after = \"1s\"");
    let port = b.inst.port;
    // Built through the socket: labelled as the instance's.
    let image = b.build_labelled("inherit");
    let theirs = format!("rbx-admin-{port}");
    let done = format!("rbx-done-{port}");
    let kept = format!("rbx-kept-{port}");
    let net = format!("rbx-inherit{port}");
    let made = OnEngine::default();
    made.container(&theirs);
    made.network(&net);
    // Made by the administrator, straight on the engine, never started.
    let out = engine(&[
        "create",
        "--name",
        &theirs,
        "-e",
        "ADMIN_SECRET=hunter2",
        &image,
        "sleep",
        "1000",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let labels = stdout(&engine(&[
        "inspect",
        "--format",
        "{{json .Config.Labels}}",
        &theirs,
    ]));
    assert!(
        labels.contains(&b.instance_id()),
        "the engine no longer copies an image's labels into its containers: {labels}"
    );
    b.cli_ok(&["run", "--name", &done, &image, "true"]);
    b.cli_ok(&["network", "create", &net]);

    let listed = b.cli_ok(&["ps", "-a", "--format", "{{.Names}}"]);
    assert!(listed.contains(&done), "{listed}");
    assert!(!listed.contains(&theirs), "listed: {listed}");
    let (status, body) = raw(
        &b.socket,
        &format!("GET /containers/{theirs}/json HTTP/1.1\r\nHost: d\r\nConnection: close\r\n\r\n"),
    );
    assert_eq!(status, 404, "{body}");
    assert!(!body.contains("hunter2"), "{body}");
    for args in [
        vec!["start", theirs.as_str()],
        // (`rm -f` says nothing of a container it does not find: whether it is still there is
        // asked of the engine below.)
        vec!["rm", "-f", theirs.as_str()],
        vec!["rm", theirs.as_str()],
        vec!["network", "connect", net.as_str(), theirs.as_str()],
        vec!["ps", "-a", "--filter", &format!("since={theirs}")],
    ] {
        let out = b.cli(&args);
        assert!(
            !out.status.success() || args[..2] == ["rm", "-f"],
            "docker {args:?}: {}",
            stdout(&out)
        );
    }
    let (status, body) = raw(
        &b.socket,
        &format!(
            "GET /containers/{theirs}/archive?path=/bin HTTP/1.1\r\nHost: d\r\nConnection: close\r\n\r\n"
        ),
    );
    assert_eq!(status, 404, "{body}");
    let state = stdout(&engine(&[
        "inspect",
        "--format",
        "{{.State.Status}}",
        &theirs,
    ]));
    assert_eq!(state.trim(), "created");

    // The record keeps only what is there: a container removed on the host (or by the engine,
    // `--rm`) is forgotten as the engine reports it.
    let gone = b.cli_ok(&["create", &image, "true"]).trim().to_string();
    let record = b.inst.secret("docker-containers.json");
    let recorded = |id: &str| std::fs::read_to_string(&record).unwrap().contains(id);
    assert!(recorded(&gone), "{gone}");
    engine(&["rm", &gone]);
    b.cli_ok(&["run", "--rm", &image, "true"]);
    let count = || {
        serde_json::from_str::<Vec<String>>(&std::fs::read_to_string(&record).unwrap())
            .unwrap()
            .len()
    };
    let t0 = std::time::Instant::now();
    while (recorded(&gone) || count() != 1) && t0.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!recorded(&gone), "{gone} is still recorded");
    assert_eq!(
        count(),
        1,
        "recorded: {}",
        std::fs::read_to_string(&record).unwrap()
    );

    // A start collects the instance's old jobs (docker.gc_after), not the administrator's.
    b.stop();
    std::thread::sleep(Duration::from_millis(1500));
    b.run = b.inst.start();
    b.run
        .wait_for_log("Docker bridge up", Duration::from_secs(20));
    assert!(
        !engine(&["inspect", &done]).status.success(),
        "the instance's exited job was not collected"
    );
    assert!(
        engine(&["inspect", &theirs]).status.success(),
        "regobox removed the administrator's container"
    );

    // A volume an earlier version ran on has no record: what is labelled then is kept.
    b.cli_ok(&["create", "--name", &kept, &image, "true"]);
    b.stop();
    std::fs::remove_file(b.inst.secret("docker-containers.json")).unwrap();
    b.inst
        .config_file("95_no_gc.toml", "[docker]\ngc_after = \"0s\"\n");
    b.run = b.inst.start();
    b.run
        .wait_for_log("Docker bridge up", Duration::from_secs(20));
    assert!(b.inst.secret("docker-containers.json").exists());
    b.cli_ok(&["inspect", &kept]);
    b.cli_ok(&["rm", &kept]);
    b.cli_ok(&["network", "rm", &net]);
    b.stop();
}

/// The ids of the images the application imported or pulled, recorded because such images carry
/// no label: an id is its content, so once the image is deleted (by the host, on the engine)
/// the same content made again by someone else (`docker load`, a pull of the same tag) must not
/// be the application's. (An attacker's, twenty-third session: the host's administrator
/// removed an image the application had imported, loaded the same one back under a tag of its
/// own, and the application listed and removed it.) Forgotten as the engine reports the delete
/// while regobox runs, and at a start for what went while it did not.
#[test]
fn an_image_deleted_on_the_host_and_made_again_is_not_the_instances() {
    let mut b = Bridged::start("");
    let port = b.inst.port;
    let mine = format!("regobox-test/busybox:recorded{port}");
    let theirs = format!("regobox-test/admin-restored:{port}");
    b.import_busybox(&mine);
    let made = OnEngine::default();
    made.image(&theirs);
    made.image(&mine);
    let record = b.inst.secret("docker-owned-images.json");
    let recorded = |id: &str| std::fs::read_to_string(&record).unwrap().contains(id);
    // The image saved as it is (`docker save`), to be loaded again by the host.
    let save = |b: &Bridged, turn: u32| {
        let id = image_id(&mine);
        assert!(recorded(&id));
        let saved = b.inst.dir.path().join(format!("saved{turn}.tar"));
        let out = engine(&["save", "-o", saved.to_str().unwrap(), &mine]);
        assert!(out.status.success(), "{}", stderr(&out));
        (id, saved)
    };
    let made_again = |id: &str, saved: &Path| {
        let out = engine(&["load", "-i", saved.to_str().unwrap()]);
        assert!(out.status.success(), "{}", stderr(&out));
        let out = engine(&["tag", id, &theirs]);
        assert!(out.status.success(), "{}", stderr(&out));
    };
    let not_the_instances = |b: &Bridged, id: &str| {
        let (status, body) = raw(
            &b.socket,
            &format!("GET /images/{theirs}/json HTTP/1.1\r\nHost: d\r\nConnection: close\r\n\r\n"),
        );
        assert_eq!(status, 404, "{body}");
        let listed = b.cli_ok(&["images", "--format", "{{.Repository}}:{{.Tag}}"]);
        assert!(!listed.contains(&theirs), "{listed}");
        assert!(!b.cli(&["rmi", &theirs]).status.success());
        assert_eq!(image_id(&theirs), id, "the host's image was removed");
    };

    // Deleted while regobox runs.
    let (id, saved) = save(&b, 1);
    let out = engine(&["rmi", &mine]);
    assert!(out.status.success(), "{}", stderr(&out));
    let t0 = std::time::Instant::now();
    while recorded(&id) && t0.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!recorded(&id), "the deleted image's id is still recorded");
    made_again(&id, &saved);
    not_the_instances(&b, &id);

    // Deleted while regobox was stopped.
    for tag in [&mine, &theirs] {
        engine(&["rmi", tag]);
    }
    b.import_busybox(&mine);
    let (id, saved) = save(&b, 2);
    b.stop();
    let out = engine(&["rmi", &mine]);
    assert!(out.status.success(), "{}", stderr(&out));
    b.run = b.inst.start();
    b.run
        .wait_for_log("Docker bridge up", Duration::from_secs(20));
    assert!(
        !recorded(&id),
        "an image gone at the start is still recorded"
    );
    made_again(&id, &saved);
    not_the_instances(&b, &id);
    b.stop();
}

/// A container create whose client leaves before the answer still ends recorded as the
/// instance's if the engine made it: cut with the request, it was labelled and unrecorded,
/// no one's (invisible to the application, never collected by regobox).
#[test]
fn a_create_whose_client_leaves_before_the_answer_is_the_instances() {
    let b = Bridged::start("");
    let port = b.inst.port;
    let image = format!("regobox-test/busybox:leaves{port}");
    b.import_busybox(&image);
    let made = OnEngine::default();
    let mut created = 0;
    for i in 0..5 {
        let name = format!("rbx-leaves-{port}-{i}");
        made.container(&name);
        let body = format!(r#"{{"Image":"{image}","Cmd":["true"]}}"#);
        let mut conn = std::os::unix::net::UnixStream::connect(&b.socket).unwrap();
        use std::io::Write;
        write!(
            conn,
            "POST /v1.41/containers/create?name={name} HTTP/1.1\r\nHost: d\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        // Gone once the request is judged and on its way to the engine.
        std::thread::sleep(Duration::from_millis(5 * i));
        drop(conn);
        let t0 = std::time::Instant::now();
        while !engine(&["inspect", &name]).status.success() && t0.elapsed() < Duration::from_secs(3)
        {
            std::thread::sleep(Duration::from_millis(50));
        }
        if !engine(&["inspect", &name]).status.success() {
            continue;
        }
        created += 1;
        // Recorded by the time the engine's answer is read; give the task that long.
        let t0 = std::time::Instant::now();
        while !b.cli(&["inspect", &name]).status.success() && t0.elapsed() < Duration::from_secs(3)
        {
            std::thread::sleep(Duration::from_millis(50));
        }
        b.cli_ok(&["rm", &name]);
    }
    assert!(
        created > 0,
        "no create reached the engine: the test tried nothing"
    );
}

/// A container create in flight when regobox is stopped is recorded before it exits: cut, the
/// container the engine made was labelled and unrecorded, no one's (its name taken for good, never
/// collected). (An attacker's, twenty-third session.)
#[test]
fn a_create_in_flight_at_the_stop_is_recorded() {
    use std::io::Write;
    let mut b = Bridged::start("");
    let port = b.inst.port;
    let image = format!("regobox-test/busybox:stopping{port}");
    b.import_busybox(&image);
    let made = OnEngine::default();
    // Many at once, so that the engine is still making some when regobox is stopped.
    let names: Vec<String> = (0..24)
        .map(|i| format!("rbx-stopping-{port}-{i}"))
        .collect();
    let conns: Vec<_> = names
        .iter()
        .map(|name| {
            made.container(name);
            let body = format!(r#"{{"Image":"{image}","Cmd":["true"]}}"#);
            let mut conn = std::os::unix::net::UnixStream::connect(&b.socket).unwrap();
            write!(
                conn,
                "POST /v1.41/containers/create?name={name} HTTP/1.1\r\nHost: d\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
            .unwrap();
            conn
        })
        .collect();
    std::thread::sleep(Duration::from_millis(100));
    b.stop();
    drop(conns);
    let there: Vec<&String> = names
        .iter()
        .filter(|n| engine(&["inspect", n]).status.success())
        .collect();
    assert!(
        !there.is_empty(),
        "no create reached the engine before the stop: the test tried nothing"
    );
    b.run = b.inst.start();
    b.run
        .wait_for_log("Docker bridge up", Duration::from_secs(20));
    for name in &there {
        let out = b.cli(&["inspect", name]);
        assert!(
            out.status.success(),
            "{name} was made by the engine but is not the instance's ({} of {} made)",
            there.len(),
            names.len()
        );
        b.cli_ok(&["rm", name]);
    }
    b.stop();
}

/// The engine's events of a container the host made from one of the instance's images (which
/// carries the instance's label) are not the application's: its name, labels and the commands
/// run in it were (an attacker's, twenty-third session). The instance's own are all there: a
/// create's, which the engine sends before its answer, and the past events of a container
/// removed since.
#[test]
fn the_events_of_a_container_the_host_made_from_the_instances_image_are_not_seen() {
    let b = Bridged::start("");
    let port = b.inst.port;
    // Built through the socket: labelled as the instance's.
    let image = b.build_labelled("events");
    let theirs = format!("rbx-ev-admin-{port}");
    let mine = format!("rbx-ev-mine-{port}");
    let live = format!("rbx-ev-live-{port}");
    let made = OnEngine::default();
    made.container(&theirs);
    let t0 = chrono::Utc::now().timestamp() - 1;
    let format = "{{.Type}} {{.Action}} {{.Actor.Attributes.name}}";

    // A live stream sees the instance's own create (sent before the engine's answer).
    let watch = Watch::start(&b, &["--since", &t0.to_string(), "--format", format]);
    let out = engine(&[
        "run", "--name", &theirs, "--label", "team=ops", &image, "true",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    engine(&["rm", &theirs]);
    b.cli_ok(&["run", "--name", &mine, &image, "true"]);
    b.cli_ok(&["rm", &mine]);
    b.cli_ok(&["create", "--name", &live, &image, "true"]);
    let seen = watch.until(|text| text.contains(&format!("container create {live}")));
    // And the past, asked for afterwards.
    let past = b.cli_ok(&[
        "events",
        "--since",
        &t0.to_string(),
        "--until",
        &chrono::Utc::now().timestamp().to_string(),
        "--format",
        format,
    ]);
    for events in [&seen, &past] {
        assert!(
            !events.contains(&theirs),
            "the host's container's events: {events}"
        );
        assert!(!events.contains("team"), "{events}");
        for line in [
            format!("container create {mine}"),
            format!("container start {mine}"),
            format!("container die {mine}"),
            format!("container destroy {mine}"),
            format!("container create {live}"),
        ] {
            assert!(events.contains(&line), "{line:?} missing from: {events}");
        }
    }
    b.cli_ok(&["rm", &live]);

    // Every destroy of the instance's own containers, on a live stream (an attacker's: one
    // forgotten between the record and the memory of what was forgotten was dropped).
    let t1 = chrono::Utc::now().timestamp() - 1;
    let cycles = 15;
    let watch = Watch::start(
        &b,
        &[
            "--since",
            &t1.to_string(),
            "--filter",
            "event=destroy",
            "--format",
            format,
        ],
    );
    for i in 0..cycles {
        let name = format!("rbx-ev-cycle-{port}-{i}");
        b.cli_ok(&["create", "--name", &name, &image, "true"]);
        b.cli_ok(&["rm", &name]);
    }
    let seen = watch.until(|text| text.matches("container destroy rbx-ev-cycle").count() >= cycles);
    assert_eq!(
        seen.matches("container destroy rbx-ev-cycle").count(),
        cycles,
        "{seen}"
    );
}

/// The events of the instance's images and networks reach the application, which carry no
/// labels (an image's delete, an import, a network's): it saw none of them while the engine's
/// label filter chose its events (an attacker's, twenty-fourth session). Those of the host's
/// images and networks, and the host's tags on the instance's images, stay out.
#[test]
fn the_events_of_the_instances_images_and_networks_are_seen_and_no_others() {
    let b = Bridged::start("");
    let port = b.inst.port;
    let mine = format!("regobox-test/busybox:ev-img{port}");
    let theirs = format!("regobox-test/host-ev:{port}");
    let net = format!("rbx-ev-net-{port}");
    let host_net = format!("rbx-ev-hostnet-{port}");
    let made = OnEngine::default();
    made.image(&theirs);
    made.network(&net);
    made.network(&host_net);
    let t0 = chrono::Utc::now().timestamp() - 1;
    let format = "{{.Type}} {{.Action}} {{.Actor.ID}} {{.Actor.Attributes.name}}";
    let watch = Watch::start(&b, &["--since", &t0.to_string(), "--format", format]);

    b.import_busybox(&mine);
    let id = image_id(&mine);
    let out = engine(&["tag", &mine, &theirs]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = engine(&["rmi", &theirs]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = engine(&["network", "create", &host_net]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = engine(&["network", "rm", &host_net]);
    assert!(out.status.success(), "{}", stderr(&out));
    let tar = busybox_rootfs_tar(b.inst.dir.path());
    let out = engine(&["import", tar.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let host_image = stdout(&out).trim().to_string();
    made.image(&host_image);
    b.cli_ok(&["network", "create", &net]);
    b.cli_ok(&["network", "rm", &net]);
    b.cli_ok(&["rmi", &mine]);

    let seen = watch.until(|text| text.contains(&format!("image delete {id}")));
    for line in [
        format!("image import {id}"),
        format!("image tag {id} {mine}"),
        "network create ".to_string(),
        "network destroy ".to_string(),
        format!("image untag {id}"),
        format!("image delete {id}"),
    ] {
        assert!(seen.contains(&line), "{line:?} missing from: {seen}");
    }
    assert!(seen.contains(&format!(" {net}\n")), "{seen}");
    assert_eq!(seen.matches("network destroy ").count(), 1, "{seen}");
    for theirs in [&theirs, &host_net, &host_image] {
        assert!(!seen.contains(theirs.as_str()), "{theirs} seen: {seen}");
    }
}

/// `docker events` through the socket, followed live until what is looked for has come (or a
/// minute has passed), then one second more (for anything that should not have come), then cut.
struct Watch {
    child: std::process::Child,
    text: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Watch {
    fn start(b: &Bridged, args: &[&str]) -> Watch {
        let mut child = Command::new("docker")
            .arg("events")
            .args(args)
            .env("DOCKER_HOST", format!("unix://{}", b.socket.display()))
            .env("DOCKER_CONFIG", &b.docker_config)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let text: std::sync::Arc<std::sync::Mutex<String>> = Default::default();
        let mut out = child.stdout.take().unwrap();
        let into = text.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = out.read(&mut buf) {
                if n == 0 {
                    break;
                }
                into.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        Watch { child, text }
    }

    fn until(mut self, done: impl Fn(&str) -> bool) -> String {
        let t0 = std::time::Instant::now();
        while !done(&self.text.lock().unwrap()) && t0.elapsed() < Duration::from_secs(60) {
            std::thread::sleep(Duration::from_millis(50));
        }
        std::thread::sleep(Duration::from_secs(1));
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.text.lock().unwrap().clone()
    }
}

/// At a stop, the application's connections opened before it make and start nothing more once
/// the bridge stops (503, then closed), what they made is recorded, and `docker.stop_jobs`
/// stops every job started before. (An attacker's, twenty-third session: on connections opened
/// before SIGTERM, jobs were created and started after `stop_jobs` had listed the running ones,
/// and left running; creates answered as regobox exited left containers no one's.)
#[test]
fn at_a_stop_what_was_made_is_recorded_and_stopped_and_nothing_more_is_made() {
    use std::io::Write;
    use std::os::unix::net::UnixStream;
    let mut b = Bridged::start("stop_jobs = true");
    let port = b.inst.port;
    let image = format!("regobox-test/busybox:stop{port}");
    b.import_busybox(&image);
    let prefix = format!("rbx-stop-{port}-");
    let conns: Vec<UnixStream> = (0..4)
        .map(|_| {
            let mut c = UnixStream::connect(&b.socket).unwrap();
            c.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
            c.write_all(b"GET /_ping HTTP/1.1\r\nHost: d\r\n\r\n")
                .unwrap();
            assert_eq!(answer_on(&mut c).unwrap().0, 200);
            c
        })
        .collect();
    b.run.signal(nix::sys::signal::Signal::SIGTERM);
    let workers: Vec<_> = conns
        .into_iter()
        .enumerate()
        .map(|(t, mut c)| {
            let (prefix, image) = (prefix.clone(), image.clone());
            std::thread::spawn(move || {
                let body = format!(
                    r#"{{"Image":"{image}","Cmd":["sh","-c","trap 'exit 0' TERM; sleep 600 & wait"]}}"#
                );
                for n in 0.. {
                    let name = format!("{prefix}{t}-{n}");
                    let create = format!(
                        "POST /v1.41/containers/create?name={name} HTTP/1.1\r\nHost: d\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    if c.write_all(create.as_bytes()).is_err()
                        || !matches!(answer_on(&mut c), Ok((201, _)))
                    {
                        return;
                    }
                    let start = format!(
                        "POST /v1.41/containers/{name}/start HTTP/1.1\r\nHost: d\r\nContent-Length: 0\r\n\r\n"
                    );
                    if c.write_all(start.as_bytes()).is_err()
                        || !matches!(answer_on(&mut c), Ok((204, _)))
                    {
                        return;
                    }
                }
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    let status = b.run.wait(Duration::from_secs(60));
    assert!(status.success(), "{}", b.run.log_text());
    let made: Vec<(String, String)> = stdout(&engine(&[
        "ps",
        "-a",
        "--filter",
        &format!("name={prefix}"),
        "--format",
        "{{.Names}} {{.State}}",
    ]))
    .lines()
    .filter_map(|l| l.split_once(' '))
    .map(|(n, s)| (n.to_string(), s.to_string()))
    .collect();
    let running: Vec<&(String, String)> = made.iter().filter(|(_, s)| s == "running").collect();
    assert!(
        running.is_empty(),
        "left running by docker.stop_jobs: {running:?}"
    );
    b.run = b.inst.start();
    b.run
        .wait_for_log("Docker bridge up", Duration::from_secs(20));
    for (name, _) in &made {
        let out = b.cli(&["inspect", name]);
        assert!(
            out.status.success(),
            "{name}, made at the stop, is no one's"
        );
        b.cli_ok(&["rm", name]);
    }
    b.stop();
}

/// An image the host's administrator makes from one of the instance's carries the instance's
/// label (a build `FROM` it inherits its labels, and so does a `docker commit` of a container
/// made from it). It is still not the instance's: the socket neither shows it nor lets the
/// application run it, build on it or remove it, its events are not the application's, and a
/// build whose step writes a line naming it as a step's image does not make it the instance's.
/// (The residual risk the twenty-third session's note left: an image was the instance's by its
/// label alone.) What the application builds is the instance's, a build that fails included.
#[test]
fn an_image_the_host_derives_from_the_instances_is_not_the_instances() {
    let b = Bridged::start("");
    let port = b.inst.port;
    let image = b.build_labelled("derive");
    let instance = b.instance_id();
    let derived = format!("regobox-test/derived:{port}");
    let retagged = format!("regobox-test/derived-commit:{port}");
    let mine = format!("regobox-test/busybox:derive-mine{port}");
    let committer = format!("rbx-commit-{port}");
    let made = OnEngine::default();
    made.container(&committer);
    made.image(&derived);
    made.image(&retagged);
    made.image(&mine);
    let t0 = chrono::Utc::now().timestamp() - 1;
    let ctx = |name: &str, dockerfile: String| {
        let dir = b.inst.dir.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("Dockerfile"), dockerfile).unwrap();
        dir.display().to_string()
    };

    // The host builds on it, and commits a container made from it (untagged).
    let out = Command::new("docker")
        .args(["build", "-q", "-t", &derived])
        .arg(ctx(
            "derive-host",
            format!("FROM {image}\nENV ADMIN_SECRET=hunter2\n"),
        ))
        .env("DOCKER_BUILDKIT", "0")
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let out = engine(&["create", "--name", &committer, &image, "true"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = engine(&["commit", &committer]);
    assert!(out.status.success(), "{}", stderr(&out));
    let committed = stdout(&out).trim().to_string();
    made.image(&committed);
    let short = committed.trim_start_matches("sha256:")[..12].to_string();
    for name in [&derived, &committed] {
        let label = stdout(&engine(&[
            "image",
            "inspect",
            "--format",
            "{{index .Config.Labels \"regobox.instance\"}}",
            name,
        ]));
        assert_eq!(
            label.trim(),
            instance.trim(),
            "the engine no longer passes an image's labels on to {name}"
        );
    }

    let not_the_instances = |name: &str| {
        let (status, body) = raw(
            &b.socket,
            &format!("GET /images/{name}/json HTTP/1.1\r\nHost: d\r\nConnection: close\r\n\r\n"),
        );
        assert_eq!(status, 404, "{name}: {body}");
        assert!(!body.contains("hunter2"), "{body}");
        for args in [
            vec!["create", name, "true"],
            vec!["run", "--rm", name, "true"],
            vec!["rmi", name],
        ] {
            let out = b.cli(&args);
            assert!(!out.status.success(), "docker {args:?}: {}", stdout(&out));
        }
        // (`rmi -f` says nothing of an image it does not find.)
        let (status, body) = raw(
            &b.socket,
            &format!(
                "DELETE /images/{name}?force=1 HTTP/1.1\r\nHost: d\r\nConnection: close\r\n\r\n"
            ),
        );
        assert_eq!(status, 404, "{name}: {body}");
        let out = b.cli(&[
            "build",
            &ctx("derive-on", format!("FROM {name}\nRUN true\n")),
        ]);
        assert!(!out.status.success(), "a build on {name}: {}", stdout(&out));
        assert!(
            stderr(&out).contains("not this instance's"),
            "{}",
            stderr(&out)
        );
    };
    for name in [derived.as_str(), committed.as_str(), short.as_str()] {
        not_the_instances(name);
    }
    assert!(engine(&["image", "inspect", &derived]).status.success());
    assert!(engine(&["image", "inspect", &committed]).status.success());
    let listed = b.cli_ok(&["images", "-a", "--no-trunc", "--format", "{{.ID}}"]);
    assert!(listed.contains(&image_id(&image)), "{listed}");
    assert!(!listed.contains(&image_id(&derived)), "{listed}");
    assert!(!listed.contains(&committed), "{listed}");

    // A step that writes a line the engine's own for a step's image (its id cut to 12), naming
    // the host's image, in a build that then fails: the step images the build made are the
    // instance's, the one named is not.
    std::thread::sleep(Duration::from_millis(1100));
    let out = b.cli(&[
        "build",
        &ctx(
            "derive-forge",
            format!("FROM {image}\nRUN echo ' ---> {short}'\nRUN false\n"),
        ),
    ]);
    let text = stdout(&out);
    assert!(!out.status.success(), "{text}");
    let steps: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix(" ---> "))
        .filter(|id| id.len() == 12 && id.bytes().all(|c| c.is_ascii_hexdigit()))
        .collect();
    assert!(
        steps.iter().filter(|id| **id == short).count() == 1,
        "the step's line did not come as the engine writes a step's image: {text}"
    );
    not_the_instances(&committed);
    // The echo step's image, the last the engine committed: the instance's, to remove.
    let leftover = steps.last().unwrap().to_string();
    assert_ne!(leftover, short, "{text}");
    made.image(&leftover);
    let (status, body) = raw(
        &b.socket,
        &format!("DELETE /images/{leftover} HTTP/1.1\r\nHost: d\r\nConnection: close\r\n\r\n"),
    );
    assert_eq!(
        status, 200,
        "the failed build's step image {leftover}: {body}"
    );

    // The host tags its committed image: no event of it reaches the application, which sees
    // its own build's tag (and a quiet build prints its image's id alone).
    let out = engine(&["tag", &committed, &retagged]);
    assert!(out.status.success(), "{}", stderr(&out));
    let printed = b.cli_ok(&[
        "build",
        "-q",
        "-t",
        &mine,
        &ctx("derive-mine", format!("FROM {image}\nCMD [\"x\"]\n")),
    ]);
    assert_eq!(printed.trim(), image_id(&mine), "a quiet build's output");
    let past = b.cli_ok(&[
        "events",
        "--since",
        &t0.to_string(),
        "--until",
        &(chrono::Utc::now().timestamp() + 1).to_string(),
        "--filter",
        "type=image",
        "--format",
        "{{.Action}} {{.Actor.ID}} {{.Actor.Attributes.name}}",
    ]);
    assert!(
        past.contains(&format!("tag {} {mine}", image_id(&mine))),
        "{past}"
    );
    assert!(!past.contains(&committed), "{past}");
    assert!(!past.contains("derived"), "{past}");
}

/// A volume an earlier version of regobox ran on has a record of the images the application
/// pulled or imported only (`docker-images.json`: a built one was the instance's by its label).
/// Its first start with the record of built images adopts both, and the earlier record goes.
#[test]
fn a_volume_from_before_the_record_of_built_images_keeps_its_images() {
    let mut b = Bridged::start("");
    let port = b.inst.port;
    let imported = format!("regobox-test/busybox:adopt-i{port}");
    b.import_busybox(&imported);
    let built = b.build_labelled("adopt");
    b.stop();
    let now = b.inst.secret("docker-owned-images.json");
    let before = b.inst.secret("docker-images.json");
    std::fs::remove_file(&now).unwrap();
    std::fs::remove_file(b.inst.secret("docker-owned-tags.json")).unwrap();
    std::fs::write(
        &before,
        serde_json::to_string(&[image_id(&imported)]).unwrap(),
    )
    .unwrap();
    b.run = b.inst.start();
    b.run
        .wait_for_log("Docker bridge up", Duration::from_secs(20));
    assert!(!before.exists(), "the earlier record is still there");
    let recorded = std::fs::read_to_string(&now).unwrap();
    for tag in [&imported, &built] {
        assert!(recorded.contains(&image_id(tag)), "{tag}: {recorded}");
        b.cli_ok(&["image", "inspect", tag]);
    }
    // Its tags too: the application removes its images by them.
    b.cli_ok(&["rmi", &built]);
    b.cli_ok(&["rmi", &imported]);
    b.stop();
}

/// A tag the host's administrator puts on one of the instance's images is the host's: the
/// application neither removes it (by its name, or with the image by the image's id) nor moves
/// it to an image of its own (a build or an import tagged the same). (An attacker's,
/// twenty-fourth session: the host tagged the application's image `prod`, and the application's
/// next build tagged `prod` moved the host's tag to whatever it had built.) The instance's own
/// tags are its to remove and make again.
#[test]
fn a_tag_the_host_puts_on_the_instances_image_is_the_hosts() {
    let b = Bridged::start("");
    let port = b.inst.port;
    let mine = format!("regobox-test/busybox:tag-mine{port}");
    let theirs = format!("regobox-test/host-prod:{port}");
    b.import_busybox(&mine);
    let made = OnEngine::default();
    made.image(&theirs);
    let id = image_id(&mine);
    let out = engine(&["tag", &mine, &theirs]);
    assert!(out.status.success(), "{}", stderr(&out));
    let remove_by_id = |b: &Bridged| {
        raw(
            &b.socket,
            &format!(
                "DELETE /images/{id}?force=1 HTTP/1.1\r\nHost: d\r\nConnection: close\r\n\r\n"
            ),
        )
    };

    assert!(!b.cli(&["rmi", &theirs]).status.success());
    let (status, body) = remove_by_id(&b);
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("did not make"), "{body}");
    // The host's tag is the host's name: not shown on the instance's image, and nothing by it
    // (an attacker's: `docker images` and an inspect listed it, and the image answered to it).
    assert!(!body.contains(&theirs), "{body}");
    let listed = b.cli_ok(&["images", "--format", "{{.Repository}}:{{.Tag}} {{.ID}}"]);
    assert!(listed.contains(&mine), "{listed}");
    assert!(!listed.contains(&theirs), "{listed}");
    // Nor found by a pattern its host tag alone matches (the engine lists the image then).
    // (Asked of the API: the docker CLI does not print an untagged image's row.)
    let by = |pattern: &str| {
        let filters = serde_json::json!({ "reference": [pattern] }).to_string();
        let encoded: String = filters.bytes().map(|c| format!("%{c:02X}")).collect();
        let (status, body) = raw(
            &b.socket,
            &format!(
                "GET /images/json?filters={encoded} HTTP/1.1\r\nHost: d\r\nConnection: close\r\n\r\n"
            ),
        );
        assert_eq!(status, 200, "{body}");
        let listed: Vec<Value> = serde_json::from_str(&body).unwrap();
        listed
            .iter()
            .map(|i| i["Id"].as_str().unwrap().to_string())
            .collect::<Vec<_>>()
    };
    assert_eq!(by("regobox-test/host-*"), Vec::<String>::new());
    assert_eq!(by(&theirs), Vec::<String>::new());
    assert_eq!(by("regobox-test/busybox:tag-mine*"), vec![id.clone()]);
    let tags = b.cli_ok(&["image", "inspect", "--format", "{{json .RepoTags}}", &mine]);
    assert_eq!(tags.trim(), format!("[{mine:?}]"));
    // `docker inspect` with no type asks for a container, then an image, ... by the name.
    assert!(
        b.cli_ok(&["inspect", "--format", "{{.Id}}", &mine])
            .contains(&id)
    );
    let out = b.cli(&["inspect", &theirs]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("No such object"), "{}", stderr(&out));
    for kind in ["image", "container", "network"] {
        let out = b.cli(&[kind, "inspect", &theirs]);
        assert!(!out.status.success(), "{kind}");
        assert!(
            stderr(&out).to_lowercase().contains("no such") || stderr(&out).contains("not found"),
            "{kind}: {}",
            stderr(&out)
        );
    }
    let out = b.cli(&["run", "--rm", &theirs, "true"]);
    assert!(!out.status.success(), "ran the host's tag");
    let ctx = b.inst.dir.path().join("tag-ctx");
    std::fs::create_dir_all(&ctx).unwrap();
    std::fs::write(
        ctx.join("Dockerfile"),
        format!("FROM {mine}\nCMD [\"x\"]\n"),
    )
    .unwrap();
    let out = b.cli(&["build", "-t", &theirs, &ctx.display().to_string()]);
    assert!(!out.status.success(), "{}", stdout(&out));
    assert!(
        stderr(&out).contains("not this instance's"),
        "{}",
        stderr(&out)
    );
    let tar = busybox_rootfs_tar(b.inst.dir.path());
    let out = b.cli(&["import", tar.to_str().unwrap(), &theirs]);
    assert!(!out.status.success(), "{}", stdout(&out));
    assert_eq!(image_id(&theirs), id, "the host's tag was moved");

    // `library/a/b` is a repository of its own, not `a/b` (an attacker's: the application's
    // `library/...` tag was recorded as the host's spelling, which it then moved).
    let lib = format!("regobox-test/host-lib:{port}");
    let lib_mine = format!("library/{lib}");
    made.image(&lib);
    made.image(&lib_mine);
    b.import_busybox(&lib_mine);
    let lib_id = image_id(&lib_mine);
    let out = engine(&["tag", &lib_mine, &lib]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = b.cli(&["build", "-t", &lib, &ctx.display().to_string()]);
    assert!(!out.status.success(), "{}", stdout(&out));
    assert!(!b.cli(&["rmi", &lib]).status.success());
    assert_eq!(image_id(&lib), lib_id, "the host's tag was moved");
    b.cli_ok(&["rmi", &lib_mine]);

    // The instance's own tag: moved by a build to its new image, then moved back by the host:
    // the host's there (an attacker's: the record of the tag on the first image stayed, and
    // the application removed the host's tag). The image stays the host's to hold by its
    // tags, and is not removed by its id.
    made.image(&mine);
    let out = b.cli_ok(&["build", "-q", "-t", &mine, &ctx.display().to_string()]);
    let built = out.trim().to_string();
    made.image(&built);
    assert_eq!(image_id(&mine), built);
    let out = engine(&["tag", &id, &mine]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = b.cli(&["rmi", &mine]);
    assert!(
        !out.status.success(),
        "removed the host's tag: {}",
        stdout(&out)
    );
    assert_eq!(image_id(&mine), id);
    assert_eq!(image_id(&theirs), id);
    let (status, body) = remove_by_id(&b);
    assert_eq!(status, 403, "{body}");
    assert_eq!(image_id(&theirs), id);
    // The built image, untagged, is still the instance's to remove.
    b.cli_ok(&["rmi", &built]);
}

/// The classic builder's cache gives a step any child of its parent whose configuration
/// matches: an application that repeated, step for step, what the host had done with one of
/// the instance's images (here a `docker commit` of a container made from it, holding a file
/// the host copied in) was given the host's image by its build, read it and had it recorded as
/// its own (an attacker's, twenty-fourth session). The cache is now the instance's own images
/// (the engine's `cachefrom`): the step runs, the host's image stays the host's, and the
/// instance's own builds still come from the cache.
#[test]
fn the_engines_cache_gives_a_build_only_the_instances_images() {
    let b = Bridged::start("");
    let port = b.inst.port;
    let image = b.build_labelled("cache");
    let base = format!("regobox-test/busybox:cache-base{port}");
    let instance = b.instance_id();
    let committer = format!("rbx-cache-commit-{port}");
    let made = OnEngine::default();
    made.container(&committer);
    // The host: a container made from the instance's image (as `docker run -d` makes one, but
    // never started), a file copied in, committed.
    let host = bollard::Docker::connect_with_unix(
        "/var/run/docker.sock",
        60,
        bollard::API_DEFAULT_VERSION,
    )
    .unwrap();
    crate::docker::rt()
        .block_on(host.create_container(
            Some(bollard::query_parameters::CreateContainerOptions {
                name: Some(committer.clone()),
                ..Default::default()
            }),
            bollard::models::ContainerCreateBody {
                image: Some(image.clone()),
                ..Default::default()
            },
        ))
        .unwrap();
    let secret = b.inst.dir.path().join("secret");
    std::fs::write(&secret, "hunter2\n").unwrap();
    let out = engine(&[
        "cp",
        secret.to_str().unwrap(),
        &format!("{committer}:/secret"),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = engine(&["commit", &committer]);
    assert!(out.status.success(), "{}", stderr(&out));
    let committed = stdout(&out).trim().to_string();
    made.image(&committed);
    let short = committed.trim_start_matches("sha256:")[..12].to_string();

    // The application: the steps of its own image, the build's label step as a `RUN` of the
    // same command, then the command the host's container was made with.
    let ctx = b.inst.dir.path().join("cache-ctx");
    std::fs::create_dir_all(&ctx).unwrap();
    std::fs::write(
        ctx.join("Dockerfile"),
        format!(
            "FROM {base} AS s\nCMD [\"true\"]\nRUN [\"/bin/sh\",\"-c\",\"#(nop) \",\"LABEL regobox.instance={}\"]\nRUN [\"true\"]\nFROM {base}\nRUN echo b\n",
            instance.trim()
        ),
    )
    .unwrap();
    let out = b.cli(&["build", &ctx.display().to_string()]);
    let text = stdout(&out);
    assert!(out.status.success(), "{text}{}", stderr(&out));
    assert!(
        !text.contains(&short),
        "the host's image came from the cache: {text}"
    );
    let record = std::fs::read_to_string(b.inst.secret("docker-owned-images.json")).unwrap();
    assert!(!record.contains(&committed), "{record}");
    assert!(
        !b.cli(&["run", "--rm", &committed, "cat", "/secret"])
            .status
            .success()
    );
    for line in text.lines().filter_map(|l| l.strip_prefix(" ---> ")) {
        if line.len() == 12 {
            made.image(line);
        }
    }

    // The instance's own build again: from the cache.
    let ctx = b.inst.dir.path().join("cache-ctx");
    std::fs::write(
        ctx.join("Dockerfile"),
        format!("FROM {base}\nCMD [\"true\"]\n"),
    )
    .unwrap();
    let again = b.cli_ok(&["build", &ctx.display().to_string()]);
    assert!(again.contains("Using cache"), "{again}");
    assert!(
        again.contains(&image_id(&image).trim_start_matches("sha256:")[..12]),
        "{again}"
    );
}

/// A build whose client leaves once a step's command has ended, while the engine commits the
/// step (a big one: seconds): the engine stops the build, but only after the commit, and the
/// step's image came after regobox had stopped reading (an attacker's, twenty-fourth session:
/// 1.5 GB left labelled, unrecorded, no one's). regobox waits for the step's container to go and
/// records the image made from it: the application sees and removes it.
#[test]
fn a_step_committed_after_the_builds_client_left_is_the_instances() {
    let b = Bridged::start("");
    let port = b.inst.port;
    let base = format!("regobox-test/busybox:left-base{port}");
    b.import_busybox(&base);
    let instance = b.instance_id();
    let label = format!("label=regobox.instance={}", instance.trim());
    let ctx = b.inst.dir.path().join("left-ctx");
    std::fs::create_dir_all(&ctx).unwrap();
    std::fs::write(
        ctx.join("Dockerfile"),
        format!(
            "FROM {base}\nRUN busybox dd if=/dev/zero of=/big bs=1M count=1024 2>/dev/null; echo DONE-$((40+2))\nRUN echo after\n"
        ),
    )
    .unwrap();
    let s = build_until(&b, &ctx, "DONE-42");
    let left = chrono::Utc::now().timestamp();
    drop(s);

    // Once the engine has removed the step's container, the image it committed is there and
    // the instance's.
    let labelled_images = || {
        stdout(&engine(&[
            "images",
            "-a",
            "-q",
            "--no-trunc",
            "--filter",
            &label,
        ]))
        .split_whitespace()
        .map(str::to_string)
        .collect::<Vec<_>>()
    };
    let t0 = std::time::Instant::now();
    let big = loop {
        let containers = stdout(&engine(&["ps", "-aq", "--filter", &label]));
        let big = labelled_images().into_iter().find(|id| {
            stdout(&engine(&["image", "inspect", "--format", "{{.Size}}", id]))
                .trim()
                .parse::<u64>()
                .is_ok_and(|size| size > 1 << 30)
        });
        if let Some(big) = big.filter(|_| containers.trim().is_empty()) {
            break big;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "no step image: containers {containers}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let created = stdout(&engine(&[
        "image",
        "inspect",
        "--format",
        "{{.Created}}",
        &big,
    ]));
    let created = chrono::DateTime::parse_from_rfc3339(created.trim()).unwrap();
    assert!(
        created.timestamp() >= left + 3,
        "the step was committed within the 2 s regobox reads a stream whose client has gone: the test shows nothing ({created} against {left})"
    );
    let record = b.inst.secret("docker-owned-images.json");
    let t0 = std::time::Instant::now();
    while !std::fs::read_to_string(&record).unwrap().contains(&big) {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "the step image {big} is not recorded"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    for id in labelled_images() {
        let (status, body) = raw(
            &b.socket,
            &format!("GET /images/{id}/json HTTP/1.1\r\nHost: d\r\nConnection: close\r\n\r\n"),
        );
        assert_eq!(status, 200, "{id} is not the instance's: {body}");
    }
    let (status, body) = raw(
        &b.socket,
        &format!("DELETE /images/{big} HTTP/1.1\r\nHost: d\r\nConnection: close\r\n\r\n"),
    );
    assert_eq!(status, 200, "{body}");
}

/// A step's output that writes the line the engine writes for a step's container, naming a
/// container of the application's own, then leaves the build: the next attacker's (twenty-fourth
/// session) found that regobox then recorded every image made since the build began on the
/// image that container ran, the host's build on the application's image among them (read and
/// run by the application). Only an image the engine committed from a build's own step
/// container is recorded.
#[test]
fn a_step_line_naming_a_container_claims_nothing_the_host_made() {
    let b = Bridged::start("");
    let port = b.inst.port;
    let image = b.build_labelled("forge-ctr");
    let base = format!("regobox-test/busybox:forge-ctr-base{port}");
    let hosts = format!("regobox-test/host-forge:{port}");
    let made = OnEngine::default();
    made.image(&hosts);
    let mine = b.cli_ok(&["create", &image, "true"]).trim().to_string();
    let ctx = b.inst.dir.path().join("forge-ctr-ctx");
    std::fs::create_dir_all(&ctx).unwrap();
    std::fs::write(
        ctx.join("Dockerfile"),
        format!(
            "FROM {base}\nRUN printf ' ---> Running in %s\\n' {}; sleep 1; echo SAID-$((40+2)); sleep 30\n",
            &mine[..12]
        ),
    )
    .unwrap();
    let (s, seen) = build_until_said(&b, &ctx, "SAID-42");
    // As the engine writes a step container's line: a line of its own.
    let said = format!(
        "{{\"stream\":\" ---\\u003e Running in {}\\n\"}}",
        &mine[..12]
    );
    assert!(seen.contains(&said), "{said} not in {seen}");
    // The host builds on the application's image meanwhile.
    let host_ctx = b.inst.dir.path().join("forge-ctr-host");
    std::fs::create_dir_all(&host_ctx).unwrap();
    std::fs::write(
        host_ctx.join("Dockerfile"),
        format!("FROM {image}\nRUN echo hostsecret > /s\nRUN echo more > /m\n"),
    )
    .unwrap();
    let out = Command::new("docker")
        .args(["build", "-q", "-t", &hosts])
        .arg(&host_ctx)
        .env("DOCKER_BUILDKIT", "0")
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let theirs: Vec<String> = stdout(&engine(&["history", "-q", "--no-trunc", &hosts]))
        .split_whitespace()
        .take(2)
        .map(str::to_string)
        .collect();
    assert_eq!(theirs.len(), 2, "{theirs:?}");
    // The client leaves; once regobox has given up reading (2 s) and looked for the step's
    // container, the application removes its container.
    drop(s);
    std::thread::sleep(Duration::from_secs(4));
    b.cli_ok(&["rm", &mine]);
    let record = b.inst.secret("docker-owned-images.json");
    // The build's own step container goes once the engine has stopped the build.
    let t0 = std::time::Instant::now();
    while !stdout(&engine(&[
        "ps",
        "-aq",
        "--filter",
        &format!("ancestor={base}"),
    ]))
    .trim()
    .is_empty()
    {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "the build's step is still there"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_secs(3));
    let recorded = std::fs::read_to_string(&record).unwrap();
    for id in &theirs {
        assert!(!recorded.contains(id.as_str()), "{id}: {recorded}");
        let (status, body) = raw(
            &b.socket,
            &format!("GET /images/{id}/json HTTP/1.1\r\nHost: d\r\nConnection: close\r\n\r\n"),
        );
        assert_eq!(status, 404, "{id}: {body}");
    }
}

/// The host commits one of the application's containers while the application's build runs:
/// the commit's event named the new image (`imageID`), a step printed the line the engine
/// writes for a step's image with it, and regobox recorded the host's image (its environment
/// holding the host's secret) as the application's, to read, run and remove (an attacker's,
/// twenty-fifth session). A step's image is recorded only if the engine committed it from a
/// container the build's output named that the socket did not create; and the host's commit,
/// exec, rename of a job are not the application's events.
#[test]
fn an_image_the_host_commits_from_a_job_during_a_build_is_not_the_instances() {
    use std::io::Write;
    let b = Bridged::start("");
    let port = b.inst.port;
    let image = b.build_labelled("commit");
    let base = format!("regobox-test/busybox:commit-base{port}");
    let tag = format!("regobox-test/busybox:commit-built{port}");
    let job = format!("rbx-commit-job-{port}");
    let made = OnEngine::default();
    made.container(&job);
    made.image(&tag);
    b.cli_ok(&["create", "--name", &job, &image, "true"]);
    let t0 = chrono::Utc::now().timestamp() - 1;
    // What the step learns, once the host has made it, from the host's side of the engine's
    // default bridge.
    let ipam = stdout(&engine(&[
        "network",
        "inspect",
        "bridge",
        "--format",
        "{{range .IPAM.Config}}{{.Gateway}} {{.Subnet}}{{end}}",
    ]));
    // The gateway, or the subnet's first address (the engine's default).
    let gateway = match ipam.split_whitespace().collect::<Vec<_>>()[..] {
        [gateway, _] => gateway.to_string(),
        [subnet] => {
            let net: std::net::Ipv4Addr = subnet.split('/').next().unwrap().parse().unwrap();
            std::net::Ipv4Addr::from(u32::from(net) + 1).to_string()
        }
        _ => panic!("the default bridge's addresses: {ipam}"),
    };
    let listener = TcpListener::bind((gateway.as_str(), 0)).unwrap();
    let served = listener.local_addr().unwrap().port();
    let said: std::sync::Arc<std::sync::Mutex<String>> = Default::default();
    let serving = said.clone();
    std::thread::spawn(move || {
        for mut conn in listener.incoming().flatten() {
            let mut buf = [0u8; 1024];
            let _ = conn.read(&mut buf);
            let body = serving.lock().unwrap().clone();
            let status = if body.is_empty() { "404 No" } else { "200 OK" };
            let _ = write!(
                conn,
                "HTTP/1.0 {status}\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
        }
    });
    let ctx = b.inst.dir.path().join("commit-ctx");
    std::fs::create_dir_all(&ctx).unwrap();
    std::fs::write(
        ctx.join("Dockerfile"),
        format!(
            "FROM {base}\nRUN echo STEP-$((40+2)); for i in $(seq 1 60); do id=$(busybox wget -qO- http://{gateway}:{served}/ 2>/dev/null) && [ -n \"$id\" ] && {{ echo \" ---> $id\"; break; }}; sleep 1; done; true\n"
        ),
    )
    .unwrap();
    let build = Command::new("docker")
        .args(["build", "-t", &tag])
        .arg(&ctx)
        .env("DOCKER_HOST", format!("unix://{}", b.socket.display()))
        .env("DOCKER_CONFIG", &b.docker_config)
        .env("DOCKER_BUILDKIT", "0")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The build's step is running: the host commits the application's job.
    let t1 = std::time::Instant::now();
    while stdout(&engine(&[
        "ps",
        "-q",
        "--filter",
        &format!("ancestor={base}"),
    ]))
    .trim()
    .is_empty()
    {
        assert!(t1.elapsed() < Duration::from_secs(60), "no step ran");
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(1));
    let out = engine(&["commit", "--change", "ENV HOST_SECRET=hostsecret", &job]);
    assert!(out.status.success(), "{}", stderr(&out));
    let committed = stdout(&out).trim().to_string();
    made.image(&committed);
    *said.lock().unwrap() = committed[7..19].to_string();
    let out = build.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let output = stdout(&out);
    assert!(
        output.contains(&format!(" ---> {}", &committed[7..19])),
        "the step did not print the host's image: {output}"
    );
    // Not the application's.
    let recorded = std::fs::read_to_string(b.inst.secret("docker-owned-images.json")).unwrap();
    assert!(!recorded.contains(&committed), "{recorded}");
    let (status, body) = raw(
        &b.socket,
        &format!("GET /images/{committed}/json HTTP/1.1\r\nHost: d\r\nConnection: close\r\n\r\n"),
    );
    assert_eq!(status, 404, "{body}");
    // The build's own images are.
    b.cli_ok(&["image", "inspect", &tag]);
    // Nor is the host's commit of the job among its events.
    let events = b.cli_ok(&[
        "events",
        "--since",
        &t0.to_string(),
        "--until",
        &chrono::Utc::now().timestamp().to_string(),
        "--format",
        "{{.Type}} {{.Action}} {{json .Actor.Attributes}}",
    ]);
    assert!(events.contains("container create"), "{events}");
    assert!(!events.contains("container commit"), "{events}");
    assert!(!events.contains(&committed[7..19]), "{events}");
}

/// What the host makes with the instance's network or image is neither named to the
/// application nor broken by it: a container the host connects to the application's network
/// was listed, with its name and address, in the network's inspection; the engine's answer to
/// a remove of an image a host's container uses named that container; and a forced remove
/// took the image from under it (an attacker's, twenty-fifth session).
#[test]
fn what_the_host_makes_with_the_instances_network_or_image_is_not_named_nor_broken() {
    let b = Bridged::start("");
    let port = b.inst.port;
    let mine = format!("regobox-test/busybox:used{port}");
    b.import_busybox(&mine);
    let net = format!("rbx-used-net-{port}");
    let job = format!("rbx-used-job-{port}");
    let hosts = format!("rbx-used-host-{port}");
    let made = OnEngine::default();
    made.container(&job);
    made.container(&hosts);
    made.network(&net);
    b.cli_ok(&["network", "create", &net]);
    b.cli_ok(&[
        "run",
        "-d",
        "--name",
        &job,
        "--network",
        &net,
        &mine,
        "sleep",
        "60",
    ]);
    let out = engine(&[
        "run",
        "-d",
        "--name",
        &hosts,
        "--network",
        &net,
        &mine,
        "sleep",
        "60",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let host_id = stdout(&out).trim().to_string();
    let job_id = b
        .cli_ok(&["inspect", "--format", "{{.Id}}", &job])
        .trim()
        .to_string();
    let attached = b.cli_ok(&[
        "network",
        "inspect",
        "--format",
        "{{json .Containers}}",
        &net,
    ]);
    assert!(attached.contains(&job_id), "{attached}");
    assert!(!attached.contains(&host_id), "{attached}");
    assert!(!attached.contains(&hosts), "{attached}");
    // A network of the host's the host connects the job to is the host's: not among the job's
    // networks, inspected or listed (the next attacker's).
    let host_net = format!("rbx-used-hostnet-{port}");
    made.network(&host_net);
    assert!(engine(&["network", "create", &host_net]).status.success());
    let out = engine(&["network", "connect", &host_net, &job]);
    assert!(out.status.success(), "{}", stderr(&out));
    let host_net_id = stdout(&engine(&[
        "network", "inspect", "--format", "{{.Id}}", &host_net,
    ]))
    .trim()
    .to_string();
    let networks = b.cli_ok(&[
        "inspect",
        "--format",
        "{{json .NetworkSettings.Networks}}",
        &job,
    ]);
    assert!(networks.contains(&net), "{networks}");
    assert!(!networks.contains(&host_net), "{networks}");
    assert!(!networks.contains(&host_net_id), "{networks}");
    let listed = b.cli_ok(&[
        "ps",
        "--filter",
        &format!("name={job}"),
        "--format",
        "{{.Networks}}",
    ]);
    assert!(listed.contains(&net), "{listed}");
    assert!(!listed.contains(&host_net), "{listed}");
    // A container of the host's connected to the instance's network keeps it (stopped, the
    // engine would remove the network, and the container would not start again).
    let stopped = format!("rbx-used-stopped-{port}");
    made.container(&stopped);
    let kept_for_the_hosts_container = |net: &str| {
        let out = engine(&[
            "create",
            "--name",
            &stopped,
            "--network",
            net,
            &mine,
            "true",
        ]);
        assert!(out.status.success(), "{}", stderr(&out));
        let out = b.cli(&["network", "rm", net]);
        assert!(!out.status.success(), "{}", stdout(&out));
        assert!(stderr(&out).contains("did not make"), "{}", stderr(&out));
        assert!(engine(&["network", "inspect", net]).status.success());
        assert!(engine(&["rm", &stopped]).status.success());
    };
    kept_for_the_hosts_container(&net);
    // Alone on a network of the instance's, never started (the engine's filter by the network's
    // id does not find it: the next attacker's).
    let net2 = format!("rbx-used-net2-{port}");
    made.network(&net2);
    b.cli_ok(&["network", "create", &net2]);
    kept_for_the_hosts_container(&net2);
    b.cli_ok(&["network", "rm", &net2]);

    b.cli_ok(&["rm", "-f", &job]);
    for force in [false, true] {
        let mut args = vec!["rmi"];
        if force {
            args.push("-f");
        }
        args.push(&mine);
        let out = b.cli(&args);
        assert!(!out.status.success(), "force {force}: {}", stdout(&out));
        assert!(
            !stderr(&out).contains(&host_id[..12]),
            "force {force}: {}",
            stderr(&out)
        );
        assert!(stderr(&out).contains("conflict"), "{}", stderr(&out));
        assert_eq!(
            stdout(&engine(&["inspect", "--format", "{{.Image}}", &hosts])).trim(),
            image_id(&mine),
            "force {force}: the host's container lost its image"
        );
    }
    // The host's container gone, the image is the application's to remove.
    engine(&["rm", "-f", &hosts]);
    b.cli_ok(&["rmi", &mine]);
}

/// A remove by id of an image the host tags at that moment: the engine's forced remove by id
/// drops every tag the image has, one the host put on it after regobox judged the image's tags
/// included (the next attacker's, twenty-fourth session: 1 round in 15). Asked by id, an image
/// with tags is removed by each of the instance's tags, unforced first, so the host's keeps the
/// image, but for the engine's own window (between its conflict check and its removal of the
/// references), which no client closes. A measurement, not a test (a race): it counts the rounds
/// in which the host tagged the image as it was removed, and those in which the remove untagged
/// the host's tag. `cargo nextest run --run-ignored only --no-capture -E 'test(/a_remove_by_id_and_a_host_tag_racing/)'`
#[test]
#[ignore = "a measurement of a race (see its doc)"]
fn a_remove_by_id_and_a_host_tag_racing() {
    let b = Bridged::start("");
    let port = b.inst.port;
    let made = OnEngine::default();
    let mut raced = 0;
    let rounds = 200;
    let mut taken = 0;
    for round in 0..rounds {
        let mine = format!("regobox-test/busybox:race{port}-{round}");
        let theirs = format!("regobox-test/race-host{port}:{round}");
        made.image(&mine);
        made.image(&theirs);
        b.import_busybox(&mine);
        let id = image_id(&mine);
        // The remove in flight, and the host's tag a moment later, the moment moving on each
        // round.
        let remove = {
            let (socket, id) = (b.socket.clone(), id.clone());
            std::thread::spawn(move || {
                raw(
                    &socket,
                    &format!(
                        "DELETE /images/{id}?force=1 HTTP/1.1\r\nHost: d\r\nConnection: close\r\n\r\n"
                    ),
                )
            })
        };
        std::thread::sleep(Duration::from_micros(300 * (round % 20)));
        let (tag_status, _) = raw(
            Path::new("/var/run/docker.sock"),
            &format!(
                "POST /v1.41/images/{id}/tag?repo=regobox-test/race-host{port}&tag={round} HTTP/1.1\r\nHost: d\r\nConnection: close\r\n\r\n"
            ),
        );
        let (status, said) = remove.join().unwrap();
        // (A tag the engine makes as it deletes the image is lost with it, whoever deletes it:
        // the engine's own race. What the remove must never do is untag the host's.)
        if said.contains(&format!(
            "\"Untagged\":\"regobox-test/race-host{port}:{round}\""
        )) {
            taken += 1;
        }
        if tag_status == 201 && status == 200 {
            raced += 1;
        }
    }
    eprintln!(
        "{rounds} rounds: the host tagged the image as it was removed in {raced}, the remove untagged the host's tag in {taken}"
    );
}

/// An image removed by its id goes by its tags (see [`a_remove_by_id_and_a_host_tag_racing`]),
/// as the engine would have it by id: refused unforced with two tags, and, forced, removed even
/// while a stopped job was made from it.
#[test]
fn a_remove_by_id_of_a_tagged_image_answers_as_the_engines() {
    let b = Bridged::start("");
    let port = b.inst.port;
    let one = format!("regobox-test/busybox:byid{port}");
    let two = format!("regobox-test/busybox:byid{port}-two");
    let made = OnEngine::default();
    made.image(&one);
    made.image(&two);
    // One image, two tags of the instance's (a build tagged twice, one of them in two
    // spellings: made once).
    let full = format!("docker.io/{one}");
    let base = format!("regobox-test/busybox:byid-base{port}");
    b.import_busybox(&base);
    let ctx = b.inst.dir.path().join("byid-ctx");
    std::fs::create_dir_all(&ctx).unwrap();
    std::fs::write(ctx.join("Dockerfile"), format!("FROM {base}\n")).unwrap();
    b.cli_ok(&[
        "build",
        "-q",
        "-t",
        &one,
        "-t",
        &two,
        "-t",
        &full,
        &ctx.display().to_string(),
    ]);
    let id = image_id(&one);
    assert_eq!(image_id(&two), id);
    let (status, body) = raw(
        &b.socket,
        &format!("DELETE /images/{id} HTTP/1.1\r\nHost: d\r\nConnection: close\r\n\r\n"),
    );
    assert_eq!(status, 409, "{body}");
    assert!(body.contains("must be forced"), "{body}");
    assert_eq!(image_id(&one), id);
    // A stopped job made from it: forced, by id, both tags and the image go.
    let job = b.cli_ok(&["create", &one, "true"]).trim().to_string();
    let (status, body) = raw(
        &b.socket,
        &format!("DELETE /images/{id}?force=1 HTTP/1.1\r\nHost: d\r\nConnection: close\r\n\r\n"),
    );
    assert_eq!(status, 200, "{body}");
    for tag in [&one, &two] {
        assert!(body.contains(&format!("\"Untagged\":\"{tag}\"")), "{body}");
    }
    assert!(body.contains("Deleted"), "{body}");
    assert!(!engine(&["image", "inspect", &id]).status.success());
    b.cli_ok(&["rm", &job]);
}

/// A build of the context directory `ctx` asked on a connection of its own, read until its
/// output says `marker`: the connection, to leave the build by dropping it.
fn build_until(b: &Bridged, ctx: &Path, marker: &str) -> std::os::unix::net::UnixStream {
    build_until_said(b, ctx, marker).0
}

/// [`build_until`], and the output read.
fn build_until_said(
    b: &Bridged,
    ctx: &Path,
    marker: &str,
) -> (std::os::unix::net::UnixStream, String) {
    use std::io::Write;
    let tar = ctx.with_extension("tar");
    tar_of(ctx, &tar);
    let body = std::fs::read(&tar).unwrap();
    let mut s = std::os::unix::net::UnixStream::connect(&b.socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    s.write_all(
        format!(
            "POST /v1.41/build HTTP/1.1\r\nHost: d\r\nContent-Type: application/x-tar\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    )
    .unwrap();
    s.write_all(&body).unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains(marker) {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "{}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&buf[..n]);
    }
    let seen = String::from_utf8_lossy(&seen).into_owned();
    (s, seen)
}

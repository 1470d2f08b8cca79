//! The differential test of the Docker policy's decoding: thousands of request bodies with case
//! variants, Unicode folding, duplicate keys, escapes, legacy top-level fields, injected
//! dangerous fields and other shapes, each decoded by regobox's model and by the engine's own Go
//! code (`tests/fixtures/engine-decode`, Debian's docker 20.10 sources). Whenever regobox
//! accepts a body, the engine must read the client's bytes exactly as it reads regobox's
//! rendering of what regobox read; and what regobox forwards must hold none of what the policy
//! refuses, as the engine reads it.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use regobox::docker::model::{
    self, ContainerCreate, NetworkConnect, NetworkCreate, NetworkDisconnect,
};
use regobox::docker::policy::container::{self, CreatePolicy, Limits};
use regobox::docker::policy::network;
use serde_json::{Value, json};

/// The Go decoder, built once per test process.
fn engine_decode() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = root.join("target/engine-decode");
    let st = Command::new(root.join("tests/fixtures/engine-decode/build.sh"))
        .arg(&out)
        .status()
        .expect("tests/fixtures/engine-decode/build.sh (scripts/install-deps.sh --tests installs Go and the docker sources)");
    assert!(st.success(), "building the engine decoder failed");
    out
}

/// Decode every (kind, body) with the engine's code: one result per body.
fn go_decode(inputs: &[(&str, Vec<u8>)]) -> Vec<Value> {
    use base64_engine::encode;
    let mut child = Command::new(engine_decode())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let lines: Vec<String> = inputs
        .iter()
        .map(|(kind, body)| json!({"kind": kind, "body": encode(body)}).to_string())
        .collect();
    let writer = std::thread::spawn(move || {
        for l in lines {
            writeln!(stdin, "{l}").unwrap();
        }
    });
    let out: Vec<Value> = BufReader::new(child.stdout.take().unwrap())
        .lines()
        .map(|l| serde_json::from_str(&l.unwrap()).unwrap())
        .collect();
    writer.join().unwrap();
    assert!(child.wait().unwrap().success());
    assert_eq!(out.len(), inputs.len());
    out
}

/// Standard base64, for the decoder's protocol.
mod base64_engine {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    pub fn encode(data: &[u8]) -> String {
        let mut out = String::new();
        for chunk in data.chunks(3) {
            let b = [
                chunk[0],
                *chunk.get(1).unwrap_or(&0),
                *chunk.get(2).unwrap_or(&0),
            ];
            let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
            for i in 0..4 {
                if i <= chunk.len() {
                    out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
                } else {
                    out.push('=');
                }
            }
        }
        out
    }
}

/// A JSON text kept as written: keys may repeat and carry escapes.
#[derive(Clone, Debug)]
enum J {
    Obj(Vec<(String, J)>),
    Arr(Vec<J>),
    Raw(String),
}

impl J {
    fn from(v: &Value) -> J {
        match v {
            Value::Object(m) => J::Obj(
                m.iter()
                    .map(|(k, v)| (serde_json::to_string(k).unwrap(), J::from(v)))
                    .collect(),
            ),
            Value::Array(a) => J::Arr(a.iter().map(J::from).collect()),
            other => J::Raw(other.to_string()),
        }
    }

    fn emit(&self, out: &mut String) {
        match self {
            J::Obj(entries) => {
                out.push('{');
                for (i, (k, v)) in entries.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    out.push_str(k);
                    out.push(':');
                    v.emit(out);
                }
                out.push('}');
            }
            J::Arr(items) => {
                out.push('[');
                for (i, v) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    v.emit(out);
                }
                out.push(']');
            }
            J::Raw(s) => out.push_str(s),
        }
    }

    fn text(&self) -> Vec<u8> {
        let mut s = String::new();
        self.emit(&mut s);
        s.into_bytes()
    }

    /// Every object in the tree, by a path of indices.
    fn objects(&self, path: &mut Vec<usize>, out: &mut Vec<Vec<usize>>) {
        match self {
            J::Obj(entries) => {
                out.push(path.clone());
                for (i, (_, v)) in entries.iter().enumerate() {
                    path.push(i);
                    v.objects(path, out);
                    path.pop();
                }
            }
            J::Arr(items) => {
                for (i, v) in items.iter().enumerate() {
                    path.push(i);
                    v.objects(path, out);
                    path.pop();
                }
            }
            J::Raw(_) => {}
        }
    }

    fn at(&mut self, path: &[usize]) -> &mut J {
        let mut node = self;
        for &i in path {
            node = match node {
                J::Obj(entries) => &mut entries[i].1,
                J::Arr(items) => &mut items[i],
                J::Raw(_) => unreachable!(),
            };
        }
        node
    }
}

/// A key (without quotes) spelled another way the engine reads as the same: case, folding,
/// escapes.
fn respell(rng: &mut StdRng, key: &str) -> String {
    let mut out = String::from("\"");
    for c in key.chars() {
        let r = rng.random_range(0..10);
        let c = match (r, c) {
            (0, 's' | 'S') => '\u{017F}',
            (1, 'k' | 'K') => '\u{212A}',
            (2..=4, c) if c.is_ascii_alphabetic() => {
                if c.is_ascii_uppercase() {
                    c.to_ascii_lowercase()
                } else {
                    c.to_ascii_uppercase()
                }
            }
            _ => c,
        };
        if rng.random_range(0..8) == 0 {
            out.push_str(&format!("\\u{:04x}", c as u32));
        } else {
            out.push(c);
        }
    }
    out.push('"');
    out
}

fn unquote(key: &str) -> String {
    serde_json::from_str(key).unwrap_or_default()
}

const ODD_VALUES: &[&str] = &[
    "null",
    "true",
    "false",
    "0",
    "-1",
    "1",
    "1.5",
    "1e3",
    "\"\"",
    "\"x\"",
    "\"SYS_ADMIN\"",
    "[]",
    "{}",
    "[\"x\"]",
    "[null]",
    "{\"x\":1}",
    "[1,2,3]",
    "18446744073709551616",
    "\"/:/host\"",
    "[\"/:/host\"]",
];

/// Dangerous entries a body may be given, under HostConfig or at the top level.
const INJECTED: &[(&str, &str)] = &[
    ("Privileged", "true"),
    ("CapAdd", "\"SYS_ADMIN\""),
    ("CapAdd", "[\"ALL\"]"),
    ("Binds", "[\"/:/host\"]"),
    ("MaskedPaths", "[]"),
    ("ReadonlyPaths", "[]"),
    ("SecurityOpt", "[\"seccomp=unconfined\"]"),
    ("Sysctls", "{\"kernel.core_pattern\":\"|/x\"}"),
    ("PidMode", "\"host\""),
    ("NetworkMode", "\"host\""),
    (
        "Devices",
        "[{\"PathOnHost\":\"/dev/sda\",\"PathInContainer\":\"/dev/sda\",\"CgroupPermissions\":\"rwm\"}]",
    ),
    ("PidsLimit", "-1"),
    ("Memory", "0"),
    (
        "Mounts",
        "[{\"Type\":\"bind\",\"Source\":\"/\",\"Target\":\"/host\"}]",
    ),
    ("VolumesFrom", "[\"other\"]"),
    ("CgroupParent", "\"/\""),
    ("Image", "\"someone-else:latest\""),
];

fn mutate(rng: &mut StdRng, body: &mut J) {
    let mut objects = Vec::new();
    body.objects(&mut Vec::new(), &mut objects);
    let path = objects[rng.random_range(0..objects.len())].clone();
    let is_top = path.is_empty();
    let J::Obj(entries) = body.at(&path) else {
        unreachable!()
    };
    match rng.random_range(0..8) {
        // Another spelling of an existing key.
        0 | 1 if !entries.is_empty() => {
            let i = rng.random_range(0..entries.len());
            let k = unquote(&entries[i].0);
            entries[i].0 = respell(rng, &k);
        }
        // A repeat, before or after, under the same or another spelling, with another value.
        2 if !entries.is_empty() => {
            let i = rng.random_range(0..entries.len());
            let k = unquote(&entries[i].0);
            let key = if rng.random_bool(0.5) {
                serde_json::to_string(&k).unwrap()
            } else {
                respell(rng, &k)
            };
            let value = J::Raw(ODD_VALUES[rng.random_range(0..ODD_VALUES.len())].into());
            let at = if rng.random_bool(0.5) { i } else { i + 1 };
            entries.insert(at, (key, value));
        }
        // Another shape for a value.
        3 if !entries.is_empty() => {
            let i = rng.random_range(0..entries.len());
            entries[i].1 = J::Raw(ODD_VALUES[rng.random_range(0..ODD_VALUES.len())].into());
        }
        // A dangerous field, in some spelling.
        4 | 5 => {
            let (k, v) = INJECTED[rng.random_range(0..INJECTED.len())];
            let key = if rng.random_bool(0.5) {
                format!("\"{k}\"")
            } else {
                respell(rng, k)
            };
            let at = rng.random_range(0..=entries.len());
            entries.insert(at, (key, J::Raw(v.into())));
        }
        // A HostConfig field moved to the top level (the engine's legacy form).
        6 if is_top => {
            if let Some(hc) = entries.iter().position(|(k, _)| unquote(k) == "HostConfig") {
                if let J::Obj(inner) = &mut entries[hc].1 {
                    if !inner.is_empty() {
                        let moved = inner.remove(rng.random_range(0..inner.len()));
                        entries.push(moved);
                    }
                }
            }
        }
        // An unknown key.
        _ => {
            let at = rng.random_range(0..=entries.len());
            entries.insert(at, ("\"Unknown\"".into(), J::Raw("1".into())));
        }
    }
}

/// A change that keeps the body's meaning for a reader that gets JSON right: escapes in
/// strings, null for an absent field, repeated keys inside maps (the last wins for both).
fn benign(rng: &mut StdRng, body: &mut J) {
    let mut objects = Vec::new();
    body.objects(&mut Vec::new(), &mut objects);
    let path = objects[rng.random_range(0..objects.len())].clone();
    let J::Obj(entries) = body.at(&path) else {
        unreachable!()
    };
    if entries.is_empty() {
        return;
    }
    let i = rng.random_range(0..entries.len());
    match rng.random_range(0..4) {
        0 => {
            if let J::Raw(text) = &entries[i].1 {
                if let Ok(Value::String(s)) = serde_json::from_str::<Value>(text) {
                    let mut out = String::from("\"");
                    for c in s.chars() {
                        if rng.random_range(0..3) == 0 && (c as u32) < 0x10000 {
                            out.push_str(&format!("\\u{:04x}", c as u32));
                        } else if c == '"' || c == '\\' {
                            out.push('\\');
                            out.push(c);
                        } else {
                            out.push(c);
                        }
                    }
                    out.push('"');
                    entries[i].1 = J::Raw(out);
                }
            }
        }
        1 => entries[i].1 = J::Raw("null".into()),
        2 => {
            let k = unquote(&entries[i].0);
            if matches!(
                k.as_str(),
                "Labels" | "Tmpfs" | "ExposedPorts" | "Volumes" | "Config"
            ) {
                if let J::Obj(inner) = &mut entries[i].1 {
                    inner.push(("\"dup\"".into(), J::Raw("\"1\"".into())));
                    inner.push(("\"dup\"".into(), J::Raw("\"2\"".into())));
                }
            }
        }
        _ => {
            let moved = entries.remove(i);
            let at = rng.random_range(0..=entries.len());
            entries.insert(at, moved);
        }
    }
}

fn policy() -> CreatePolicy {
    CreatePolicy {
        bind_roots: vec![PathBuf::from("/volumes/files")],
        host_paths: vec![(PathBuf::from("/volumes"), PathBuf::from("/srv/regobox"))],
        instance: "i1".into(),
        limits: Limits {
            memory: Some(1 << 30),
            nano_cpus: Some(2_000_000_000),
            pids: Some(512),
            shm: Some(64 << 20),
        },
        ulimits: [("nofile".to_string(), 65536)].into_iter().collect(),
        registries: vec!["docker.io".into()],
    }
}

/// Bodies as the docker CLI (every field, zero values), docker-py and bollard send them, and one
/// using every allowed feature.
fn corpus() -> Vec<Value> {
    vec![
        json!({"Hostname":"","Domainname":"","User":"","AttachStdin":false,"AttachStdout":true,"AttachStderr":true,
               "Tty":false,"OpenStdin":false,"StdinOnce":false,"Env":null,"Cmd":["sh","-c","echo hi"],"Image":"busybox",
               "Volumes":{},"WorkingDir":"","Entrypoint":null,"OnBuild":null,"Labels":{},
               "HostConfig":{"Binds":["/volumes/files/job:/out"],"ContainerIDFile":"","LogConfig":{"Type":"","Config":{}},
                 "NetworkMode":"default","PortBindings":{},"RestartPolicy":{"Name":"no","MaximumRetryCount":0},
                 "AutoRemove":false,"VolumeDriver":"","VolumesFrom":null,"ConsoleSize":[24,80],"CapAdd":null,"CapDrop":null,
                 "CgroupnsMode":"","Dns":[],"DnsOptions":[],"DnsSearch":[],"ExtraHosts":null,"GroupAdd":null,"IpcMode":"",
                 "Cgroup":"","Links":null,"OomScoreAdj":0,"PidMode":"","Privileged":false,"PublishAllPorts":false,
                 "ReadonlyRootfs":false,"SecurityOpt":null,"UTSMode":"","UsernsMode":"","ShmSize":0,"Isolation":"",
                 "CpuShares":0,"Memory":0,"NanoCpus":0,"CgroupParent":"","BlkioWeight":0,"BlkioWeightDevice":[],
                 "BlkioDeviceReadBps":[],"BlkioDeviceWriteBps":[],"BlkioDeviceReadIOps":[],"BlkioDeviceWriteIOps":[],
                 "CpuPeriod":0,"CpuQuota":0,"CpuRealtimePeriod":0,"CpuRealtimeRuntime":0,"CpusetCpus":"","CpusetMems":"",
                 "Devices":[],"DeviceCgroupRules":null,"DeviceRequests":null,"MemoryReservation":0,"MemorySwap":0,
                 "MemorySwappiness":null,"OomKillDisable":null,"PidsLimit":null,"Ulimits":null,"CpuCount":0,"CpuPercent":0,
                 "IOMaximumIOps":0,"IOMaximumBandwidth":0,"MaskedPaths":null,"ReadonlyPaths":null},
               "NetworkingConfig":{"EndpointsConfig":{"default":{"IPAMConfig":null,"Links":null,"Aliases":null,"MacAddress":"",
                 "NetworkID":"","EndpointID":"","Gateway":"","IPAddress":"","IPPrefixLen":0,"IPv6Gateway":"",
                 "GlobalIPv6Address":"","GlobalIPv6PrefixLen":0,"DriverOpts":null}}}}),
        json!({"Tty":false,"OpenStdin":false,"StdinOnce":false,"AttachStdin":false,"AttachStdout":false,"AttachStderr":false,
               "Env":["JOB=42","A=b"],"Cmd":["sh","-c","cat /input/in.txt"],"Image":"rbx/job:1",
               "Volumes":{"/input":{},"/output":{}},"NetworkDisabled":false,
               "HostConfig":{"NetworkMode":"jobs","Binds":["/volumes/files/in:/input:ro","/volumes/files/out:/output:rw"]},
               "NetworkingConfig":{"jobs":null}}),
        json!({"Image":"busybox","Cmd":["true"],"HostConfig":{"Binds":["/volumes/files/a:/a"]}}),
        json!({"Image":"busybox","Entrypoint":["/bin/sh"],"WorkingDir":"/w","User":"1000:1000","Labels":{"app":"x"},
               "ExposedPorts":{"80/tcp":{}},"StopSignal":"SIGINT","StopTimeout":5,
               "Healthcheck":{"Test":["CMD","true"],"Interval":1000000000,"Retries":3},
               "HostConfig":{"Mounts":[{"Type":"bind","Source":"/volumes/files/r","Target":"/r","ReadOnly":true,
                   "BindOptions":{"Propagation":"rprivate"}},{"Type":"tmpfs","Target":"/t","TmpfsOptions":{"SizeBytes":1048576}}],
                 "Tmpfs":{"/run":"size=1m"},"Memory":536870912,"NanoCpus":1000000000,"PidsLimit":100,"ShmSize":1048576,
                 "Ulimits":[{"Name":"nofile","Soft":1024,"Hard":4096}],"LogConfig":{"Type":"json-file","Config":{"max-size":"1m"}},
                 "SecurityOpt":["no-new-privileges"],"CapDrop":["NET_RAW"],"Init":true,"AutoRemove":true,"ReadonlyRootfs":true},
               "NetworkingConfig":{"EndpointsConfig":{"jobs":{"Aliases":["w"]}}}}),
    ]
}

#[test]
fn the_engine_reads_what_regobox_read_or_regobox_refuses() {
    let mut rng = StdRng::seed_from_u64(0x5eed_0001);
    let policy = policy();
    let mut bodies: Vec<Vec<u8>> = Vec::new();
    for base in corpus() {
        bodies.push(J::from(&base).text());
        for n in 0..800 {
            let mut j = J::from(&base);
            for _ in 0..rng.random_range(1..=4) {
                benign(&mut rng, &mut j);
            }
            if n % 2 == 0 {
                for _ in 0..rng.random_range(1..=3) {
                    mutate(&mut rng, &mut j);
                }
            }
            bodies.push(j.text());
        }
    }
    // For each body regobox accepts: the client's bytes, regobox's reading, what it forwards.
    let mut accepted = Vec::new();
    let mut refused = 0;
    for body in &bodies {
        let Ok(read) = model::decode::<ContainerCreate>(body, "container create") else {
            refused += 1;
            continue;
        };
        let Ok(plan) = container::check_create(&read, &policy) else {
            refused += 1;
            continue;
        };
        let ids: BTreeMap<String, String> = plan
            .networks
            .iter()
            .map(|n| (n.clone(), "f".repeat(64)))
            .collect();
        let forwarded = serde_json::to_vec(&plan.resolved("sha256:0123", &ids)).unwrap();
        accepted.push((body.clone(), serde_json::to_vec(&read).unwrap(), forwarded));
    }
    let mut inputs: Vec<(&str, Vec<u8>)> = Vec::new();
    for (client, read, forwarded) in &accepted {
        inputs.push(("container_create", client.clone()));
        inputs.push(("container_create", read.clone()));
        inputs.push(("container_create", forwarded.clone()));
    }
    let decoded = go_decode(&inputs);
    for (i, (client, _, _)) in accepted.iter().enumerate() {
        let (engine_client, engine_read, engine_fwd) =
            (&decoded[3 * i], &decoded[3 * i + 1], &decoded[3 * i + 2]);
        let text = String::from_utf8_lossy(client);
        assert_eq!(
            engine_client["ok"], true,
            "regobox accepted what the engine refuses: {text}\n{engine_client}"
        );
        assert_eq!(
            engine_client["decoded"], engine_read["decoded"],
            "the engine reads the client's body differently from regobox:\n{text}"
        );
        assert_eq!(engine_fwd["ok"], true, "{engine_fwd}");
        let hc = &engine_fwd["decoded"]["HostConfig"];
        assert_eq!(hc["Privileged"], false, "{text}");
        assert!(hc["CapAdd"].is_null(), "{text}");
        assert!(
            hc["MaskedPaths"].is_null() && hc["ReadonlyPaths"].is_null(),
            "{text}"
        );
        assert!(
            hc["Sysctls"].is_null() && hc["Devices"].as_array().is_none_or(|d| d.is_empty()),
            "{text}"
        );
        assert!(
            hc["SecurityOpt"]
                .as_array()
                .is_none_or(|s| s.iter().all(|o| o == "no-new-privileges")),
            "{text}"
        );
        for b in hc["Binds"].as_array().into_iter().flatten() {
            assert!(
                b.as_str().unwrap().starts_with("/srv/regobox/files/"),
                "{b} from {text}"
            );
        }
        for m in hc["Mounts"].as_array().into_iter().flatten() {
            assert!(
                m["Type"] == "tmpfs"
                    || m["Source"]
                        .as_str()
                        .unwrap()
                        .starts_with("/srv/regobox/files/"),
                "{m}"
            );
        }
        assert_eq!(hc["PidMode"], "", "{text}");
        assert!(
            hc["Memory"].as_i64().unwrap() <= 1 << 30 && hc["Memory"].as_i64().unwrap() > 0,
            "{text}"
        );
        assert!(
            hc["PidsLimit"]
                .as_i64()
                .is_some_and(|p| (1..=512).contains(&p)),
            "{text}"
        );
        assert_eq!(
            engine_fwd["decoded"]["Config"]["Labels"]["regobox.instance"],
            "i1"
        );
        assert_eq!(engine_fwd["decoded"]["Config"]["Image"], "sha256:0123");
    }
    eprintln!(
        "container create: {} bodies, {} accepted (the engine agreed on each), {refused} refused",
        bodies.len(),
        accepted.len()
    );
    assert!(
        accepted.len() > 200,
        "too few accepted bodies to say anything: {}",
        accepted.len()
    );
    assert!(refused > 1000, "too few refused bodies: {refused}");
}

#[test]
fn network_bodies_are_read_alike_or_refused() {
    let mut rng = StdRng::seed_from_u64(0x5eed_0002);
    let bases: Vec<(&str, Value)> = vec![
        (
            "network_create",
            json!({"Name":"jobs","CheckDuplicate":true,"Driver":"bridge","Internal":false,"Attachable":false,
            "Ingress":false,"IPAM":{"Driver":"default","Config":[],"Options":{}},"EnableIPv6":false,
            "Options":{"com.docker.network.driver.mtu":"1400"},"Labels":{"a":"b"}}),
        ),
        ("network_create", json!({"Name":"rbx-pytest-net"})),
        (
            "network_connect",
            json!({"Container":"abc","EndpointConfig":{"Aliases":["x"],"IPAMConfig":null}}),
        ),
        (
            "network_disconnect",
            json!({"Container":"abc","Force":false}),
        ),
    ];
    let mut accepted = Vec::new();
    let mut total = 0;
    for (kind, base) in &bases {
        for n in 0..600 {
            let mut j = J::from(base);
            for _ in 0..rng.random_range(0..=3) {
                benign(&mut rng, &mut j);
            }
            if n % 2 == 1 {
                for _ in 0..rng.random_range(1..=3) {
                    mutate(&mut rng, &mut j);
                }
            }
            total += 1;
            let body = j.text();
            let read = match *kind {
                "network_create" => model::decode::<NetworkCreate>(&body, "n")
                    .ok()
                    .filter(|r| network::check_network_create(r, "i1").is_ok())
                    .map(|r| serde_json::to_vec(&r).unwrap()),
                "network_connect" => model::decode::<NetworkConnect>(&body, "n")
                    .ok()
                    .filter(|r| {
                        r.endpoint_config
                            .as_ref()
                            .is_none_or(|e| container::check_endpoint_config(e).is_ok())
                    })
                    .map(|r| serde_json::to_vec(&r).unwrap()),
                _ => model::decode::<NetworkDisconnect>(&body, "n")
                    .ok()
                    .map(|r| serde_json::to_vec(&r).unwrap()),
            };
            if let Some(read) = read {
                accepted.push((*kind, body, read));
            }
        }
    }
    let mut inputs = Vec::new();
    for (kind, client, read) in &accepted {
        inputs.push((*kind, client.clone()));
        inputs.push((*kind, read.clone()));
    }
    let decoded = go_decode(&inputs);
    for (i, (kind, client, _)) in accepted.iter().enumerate() {
        let text = String::from_utf8_lossy(client);
        assert_eq!(
            decoded[2 * i]["ok"],
            true,
            "{kind}: regobox accepted what the engine refuses: {text}"
        );
        assert_eq!(
            decoded[2 * i]["decoded"],
            decoded[2 * i + 1]["decoded"],
            "{kind}: the engine reads the client's body differently from regobox:\n{text}"
        );
    }
    eprintln!(
        "network bodies: {total}, {} accepted (the engine agreed on each)",
        accepted.len()
    );
    assert!(
        accepted.len() > 600,
        "too few accepted bodies: {}",
        accepted.len()
    );
}

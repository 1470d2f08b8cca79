//! The Docker bridge against the real engine of this machine: the docker CLI and bollard through
//! regobox's socket, the engine inspected directly to see what really happened.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use bollard::Docker;
use bollard::models::{ContainerCreateBody, HostConfig};
use bollard::query_parameters::{
    CreateContainerOptions, LogsOptions, RemoveContainerOptions, WaitContainerOptions,
};

use crate::support::*;

/// A regobox whose Docker bridge is on, with `host_paths` translating its files volume to
/// `<tmp>/host-files` (as if the host kept the data elsewhere).
pub(crate) struct Bridged {
    pub(crate) inst: Instance,
    pub(crate) run: Running,
    /// Images imported through the proxy, removed at the end.
    pub(crate) images: std::cell::RefCell<Vec<String>>,
    pub(crate) socket: PathBuf,
    pub(crate) host_files: PathBuf,
    pub(crate) docker_config: PathBuf,
}

impl Bridged {
    pub(crate) fn start(extra: &str) -> Bridged {
        Self::start_with(
            Instance::new(),
            "host = \"unix:///var/run/docker.sock\"",
            extra,
        )
    }

    pub(crate) fn start_with(inst: Instance, host: &str, extra: &str) -> Bridged {
        Self::start_inner(inst, host, extra, true)
    }

    /// With the files volume where the engine sees it (no host path translation), as when
    /// regobox's volume is the host's directory.
    pub(crate) fn start_untranslated(extra: &str) -> Bridged {
        Self::start_inner(
            Instance::new(),
            "host = \"unix:///var/run/docker.sock\"",
            extra,
            false,
        )
    }

    fn start_inner(mut inst: Instance, host: &str, extra: &str, translated: bool) -> Bridged {
        let files = inst.root.join("files");
        let host_files = if translated {
            inst.dir.path().join("host-files")
        } else {
            files.clone()
        };
        std::fs::create_dir_all(&host_files).unwrap();
        let host_paths = if translated {
            format!(
                "[docker.host_paths]\n\"{}\" = \"{}\"\n",
                files.display(),
                host_files.display()
            )
        } else {
            String::new()
        };
        inst.config_file(
            "90_docker.toml",
            &format!("[docker]\nenabled = true\n{host}\n{extra}\n{host_paths}"),
        );
        inst.env
            .push(("REGOBOX_DOCKER__ENABLED".into(), "true".into()));
        let mut run = inst.start();
        run.wait_for_log("Docker bridge up", Duration::from_secs(20));
        let socket = inst.runtime.join("docker.sock");
        let docker_config = inst.dir.path().join("docker-cli");
        std::fs::create_dir_all(&docker_config).unwrap();
        Bridged {
            inst,
            run,
            images: Default::default(),
            socket,
            host_files,
            docker_config,
        }
    }

    /// The docker CLI through regobox's socket.
    pub(crate) fn cli(&self, args: &[&str]) -> Output {
        Command::new("docker")
            .args(args)
            .env("DOCKER_HOST", format!("unix://{}", self.socket.display()))
            .env("DOCKER_CONFIG", &self.docker_config)
            .env("DOCKER_BUILDKIT", "0")
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    pub(crate) fn cli_ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "docker {args:?} through the proxy failed:\n{}\n{}",
            stdout(&out),
            stderr(&out)
        );
        stdout(&out)
    }

    /// Import the busybox image through the proxy (so that it is this instance's).
    pub(crate) fn import_busybox(&self, tag: &str) {
        let tar = busybox_rootfs_tar(self.inst.dir.path());
        let out = Command::new("docker")
            .args(["import", "-", tag])
            .env("DOCKER_HOST", format!("unix://{}", self.socket.display()))
            .env("DOCKER_CONFIG", &self.docker_config)
            .stdin(std::fs::File::open(tar).unwrap())
            .output()
            .unwrap();
        assert!(out.status.success(), "docker import: {}", stderr(&out));
        self.images.borrow_mut().push(tag.to_string());
    }

    /// An image built through the proxy (so labelled as this instance's) on busybox imported
    /// through it: its tag, `regobox-test/busybox:<what><port>`.
    pub(crate) fn build_labelled(&self, what: &str) -> String {
        let port = self.inst.port;
        let base = format!("regobox-test/busybox:{what}-base{port}");
        self.import_busybox(&base);
        let image = format!("regobox-test/busybox:{what}{port}");
        let ctx = self.inst.dir.path().join(format!("{what}-ctx"));
        std::fs::create_dir_all(&ctx).unwrap();
        std::fs::write(
            ctx.join("Dockerfile"),
            format!("FROM {base}\nCMD [\"true\"]\n"),
        )
        .unwrap();
        self.cli_ok(&["build", "-q", "-t", &image, &ctx.display().to_string()]);
        self.images.borrow_mut().push(image.clone());
        image
    }

    /// SIGTERM, exit 0; the log.
    pub(crate) fn stop(&mut self) -> String {
        self.run.signal(nix::sys::signal::Signal::SIGTERM);
        let status = self.run.wait(Duration::from_secs(30));
        let log = self.run.log_text();
        assert!(status.success(), "run exited with {status}:\n{log}");
        log
    }

    pub(crate) fn bollard(&self) -> Docker {
        Docker::connect_with_unix(
            &self.socket.display().to_string(),
            60,
            bollard::API_DEFAULT_VERSION,
        )
        .unwrap()
    }

    pub(crate) fn instance_id(&self) -> String {
        std::fs::read_to_string(self.inst.secret("docker-instance")).unwrap()
    }

    pub(crate) fn audit(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.inst.root.join("logs/docker-audit.log"))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

impl Drop for Bridged {
    fn drop(&mut self) {
        // Whatever a failed test left on the engine.
        if let Ok(id) = std::fs::read_to_string(self.inst.secret("docker-instance")) {
            let out = engine(&[
                "ps",
                "-aq",
                "--filter",
                &format!("label=regobox.instance={id}"),
            ]);
            for c in stdout(&out).split_whitespace() {
                engine(&["rm", "-f", c]);
            }
        }
        for image in self.images.borrow().iter() {
            engine(&["rmi", image]);
        }
        // And what builds left untagged (a failed step's image, an earlier stage's): all this
        // instance's, labelled. Children before parents: a second pass for what a first could
        // not remove.
        if let Ok(id) = std::fs::read_to_string(self.inst.secret("docker-instance")) {
            for _ in 0..2 {
                let out = engine(&[
                    "images",
                    "-aq",
                    "--filter",
                    &format!("label=regobox.instance={id}"),
                ]);
                for image in stdout(&out).split_whitespace() {
                    engine(&["rmi", image]);
                }
            }
        }
    }
}

/// The docker CLI straight to the engine.
pub(crate) fn engine(args: &[&str]) -> Output {
    Command::new("docker")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// A root filesystem holding a static busybox, as a tar file.
pub(crate) fn busybox_rootfs_tar(dir: &Path) -> PathBuf {
    let tar = dir.join("busybox-rootfs.tar");
    if tar.exists() {
        return tar;
    }
    let root = dir.join("busybox-rootfs");
    std::fs::create_dir_all(root.join("bin")).unwrap();
    std::fs::create_dir_all(root.join("out")).unwrap();
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).unwrap();
    for applet in ["sh", "echo", "cat", "sleep", "ls", "true", "seq", "id"] {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(applet)).unwrap();
    }
    tar_of(&root, &tar);
    tar
}

/// `root`'s contents as the tar file `tar`.
pub(crate) fn tar_of(root: &Path, tar: &Path) {
    let st = Command::new("tar")
        .arg("-C")
        .arg(root)
        .arg("-cf")
        .arg(tar)
        .arg(".")
        .status()
        .unwrap();
    assert!(st.success(), "tar of {}", root.display());
}

pub(crate) fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// One raw HTTP/1.1 request on the proxy socket: (status, body).
pub(crate) fn raw(socket: &Path, request: &str) -> (u16, String) {
    raw_bytes(socket, request.as_bytes())
}

/// `request` (its first line) with a body of `len` bytes written in 1 MiB pieces, 10 ms apart,
/// every piece of which must be taken; then the answer's status and body.
pub(crate) fn refused_while_writing(socket: &Path, request: &str, len: usize) -> (u16, String) {
    let mut s = UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let head = format!(
        "{request}\r\nHost: docker\r\nContent-Type: application/x-tar\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n"
    );
    s.write_all(head.as_bytes()).unwrap();
    let piece = vec![0u8; 1 << 20];
    let mut sent = 0;
    while sent < len {
        let n = piece.len().min(len - sent);
        if let Err(e) = s.write_all(&piece[..n]) {
            panic!("{request}: the connection was closed after {sent} of {len} bytes: {e}");
        }
        sent += n;
        std::thread::sleep(Duration::from_millis(10));
    }
    answer(s)
}

/// The status and body of the answer read from `s` to its end.
fn answer(mut s: UnixStream) -> (u16, String) {
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    (status, body)
}

/// [`raw`] for a request holding binary data (a tar).
pub(crate) fn raw_bytes(socket: &Path, request: &[u8]) -> (u16, String) {
    let mut s = UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    s.write_all(request).unwrap();
    answer(s)
}

fn all_containers() -> Vec<String> {
    let mut v: Vec<String> = stdout(&engine(&["ps", "-aq", "--no-trunc"]))
        .split_whitespace()
        .map(str::to_string)
        .collect();
    v.sort();
    v
}

/// The engine's containers made from `image`, running or not.
pub(crate) fn containers_of(image: &str) -> Vec<String> {
    let filter = format!("ancestor={image}");
    let mut v: Vec<String> = stdout(&engine(&["ps", "-aq", "--no-trunc", "--filter", &filter]))
        .split_whitespace()
        .map(str::to_string)
        .collect();
    v.sort();
    v
}

/// The engine's id of an image, asked of the engine directly.
pub(crate) fn image_id(reference: &str) -> String {
    stdout(&engine(&[
        "image", "inspect", "--format", "{{.Id}}", reference,
    ]))
    .trim()
    .to_string()
}

#[test]
fn a_job_runs_through_the_proxy_with_the_cli_and_bollard() {
    let mut b = Bridged::start("");
    b.import_busybox("regobox-test/busybox:cli");

    // The application's environment points at the proxy.
    let out = b.inst.ok(&["exec", "sh", "-c", "echo $DOCKER_HOST"]);
    assert_eq!(
        stdout(&out).trim(),
        format!("unix://{}", b.socket.display())
    );

    // docker run (create, attach through an upgrade, start, wait) with a translated bind.
    let job_dir = b.inst.root.join("files/job-42");
    let out = b.cli_ok(&[
        "run",
        "--name",
        &format!("rbx-cli-{}", b.inst.port),
        "-v",
        &format!("{}:/out", job_dir.display()),
        "regobox-test/busybox:cli",
        "sh",
        "-c",
        "echo from-the-job > /out/result.txt; echo done",
    ]);
    assert_eq!(out.trim(), "done");
    // The engine mounted the host path behind the application's path.
    let written = b.host_files.join("job-42/result.txt");
    assert_eq!(
        std::fs::read_to_string(&written).unwrap().trim(),
        "from-the-job"
    );
    let name = format!("rbx-cli-{}", b.inst.port);
    assert_eq!(b.cli_ok(&["logs", &name]).trim(), "done");
    let labels = b.cli_ok(&[
        "inspect",
        "--format",
        "{{index .Config.Labels \"regobox.instance\"}} {{.HostConfig.PidsLimit}}",
        &name,
    ]);
    assert_eq!(labels.trim(), format!("{} 4096", b.instance_id()));
    b.cli_ok(&["rm", &name]);
    assert!(!stdout(&engine(&["ps", "-a", "--format", "{{.Names}}"])).contains(&name));

    // bollard: create, start, wait, logs, remove.
    let docker = b.bollard();
    rt().block_on(async {
        use futures_util::StreamExt;
        let body = ContainerCreateBody {
            image: Some("regobox-test/busybox:cli".into()),
            cmd: Some(vec![
                "sh".into(),
                "-c".into(),
                "seq 3 > /out/bollard.txt; echo bollard-ok".into(),
            ]),
            host_config: Some(HostConfig {
                binds: Some(vec![format!("{}:/out", job_dir.display())]),
                ..Default::default()
            }),
            ..Default::default()
        };
        let created = docker
            .create_container(None::<CreateContainerOptions>, body)
            .await
            .unwrap();
        docker
            .start_container(
                &created.id,
                None::<bollard::query_parameters::StartContainerOptions>,
            )
            .await
            .unwrap();
        let waited: Vec<_> = docker
            .wait_container(&created.id, None::<WaitContainerOptions>)
            .collect()
            .await;
        assert_eq!(waited.len(), 1);
        assert_eq!(waited[0].as_ref().unwrap().status_code, 0);
        let logs: Vec<String> = docker
            .logs(
                &created.id,
                Some(LogsOptions {
                    stdout: true,
                    ..Default::default()
                }),
            )
            .map(|l| l.unwrap().to_string())
            .collect()
            .await;
        assert_eq!(logs.concat().trim(), "bollard-ok");
        docker
            .remove_container(&created.id, None::<RemoveContainerOptions>)
            .await
            .unwrap();
    });
    assert_eq!(
        std::fs::read_to_string(b.host_files.join("job-42/bollard.txt")).unwrap(),
        "1\n2\n3\n"
    );

    // Every mutation is in the audit file, with its decision and object.
    let audit = b.audit();
    assert!(audit.iter().any(|l| l["endpoint"] == "ContainerCreate"
        && l["decision"] == "allow"
        && l["object"].as_str().is_some_and(|o| o.len() == 64)));
    assert!(
        audit
            .iter()
            .any(|l| l["endpoint"] == "ImageCreate" && l["object"] == "regobox-test/busybox:cli")
    );
    b.stop();
}

#[test]
fn what_others_created_is_invisible() {
    let mut b = Bridged::start("");
    b.import_busybox("regobox-test/busybox:mine");
    // Someone else's image and container, made directly on the engine.
    let tar = busybox_rootfs_tar(b.inst.dir.path());
    let other_image = format!("regobox-test/other:{}", b.inst.port);
    let out = Command::new("docker")
        .args(["import", "-", &other_image])
        .stdin(std::fs::File::open(tar).unwrap())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let other = stdout(&engine(&[
        "create",
        "--label",
        "owner=someone-else",
        &other_image,
        "true",
    ]))
    .trim()
    .to_string();
    assert_eq!(other.len(), 64, "docker create printed {other:?}");

    let listed = b.cli_ok(&["ps", "-aq", "--no-trunc"]);
    assert!(!listed.contains(&other), "{listed}");
    for args in [
        vec!["inspect", other.as_str()],
        vec!["logs", other.as_str()],
        vec!["rm", other.as_str()],
        vec!["start", other.as_str()],
        vec![
            "cp",
            &format!("{other}:/bin/busybox"),
            "/tmp/rbx-should-not-exist",
        ],
    ] {
        let out = b.cli(&args);
        assert!(!out.status.success(), "docker {args:?} succeeded");
        assert!(
            stderr(&out).to_lowercase().contains("no such"),
            "docker {args:?}: {}",
            stderr(&out)
        );
    }
    // Still there on the engine, untouched.
    let state = stdout(&engine(&[
        "inspect",
        "--format",
        "{{.State.Status}}",
        &other,
    ]));
    assert_eq!(state.trim(), "created");

    let images = b.cli_ok(&["images", "--format", "{{.Repository}}:{{.Tag}}"]);
    assert!(images.contains("regobox-test/busybox:mine"), "{images}");
    assert!(!images.contains(&other_image), "{images}");
    assert!(!b.cli(&["image", "inspect", &other_image]).status.success());
    let out = b.cli(&["run", "--rm", &other_image, "true"]);
    assert!(!out.status.success(), "ran someone else's image");
    // An import under their tag, and a copy into their container, with a body the client is
    // still writing when the refusal is decided: the whole body is taken, then the refusal
    // given as the reason (not a connection closed under the client: a broken pipe).
    let before = image_id(&other_image);
    for (request, says) in [
        (
            format!("POST /v1.41/images/create?fromSrc=-&repo={other_image} HTTP/1.1"),
            "is not this instance's",
        ),
        (
            format!("PUT /v1.41/containers/{other}/archive?path=/tmp HTTP/1.1"),
            "No such container",
        ),
    ] {
        let (status, body) = refused_while_writing(&b.socket, &request, 16 << 20);
        assert!(
            (400..500).contains(&status) && body.contains(says),
            "{request}: {status} {body}"
        );
    }
    assert_eq!(image_id(&other_image), before);

    // An image built through the proxy (its context uploaded) is labelled, hence usable.
    let ctx = b.inst.dir.path().join("build-ctx");
    std::fs::create_dir_all(&ctx).unwrap();
    std::fs::write(ctx.join("hello.txt"), "built through regobox\n").unwrap();
    std::fs::write(
        ctx.join("Dockerfile"),
        "FROM regobox-test/busybox:mine\nCOPY hello.txt /hello.txt\nRUN cat /etc/hosts > /hosts.txt\nCMD [\"cat\", \"/hello.txt\"]\n",
    )
    .unwrap();
    let built = format!("regobox-test/built:{}", b.inst.port);
    // Each --add-host (a repeated parameter) reaches the build's containers as regobox writes it.
    b.cli_ok(&[
        "build",
        "-q",
        "--add-host",
        "db:10.0.0.1",
        "--add-host",
        "v6.lab:FE80::1",
        "-t",
        &built,
        &ctx.display().to_string(),
    ]);
    let hosts = b.cli_ok(&["run", "--rm", &built, "cat", "/hosts.txt"]);
    assert!(
        hosts.contains("10.0.0.1\tdb\n") && hosts.contains("fe80::1\tv6.lab\n"),
        "{hosts}"
    );
    let label = stdout(&engine(&[
        "image",
        "inspect",
        "--format",
        "{{index .Config.Labels \"regobox.instance\"}}",
        &built,
    ]));
    assert_eq!(label.trim(), b.instance_id());
    assert_eq!(
        b.cli_ok(&["run", "--rm", &built]).trim(),
        "built through regobox"
    );
    b.cli_ok(&["rmi", &built]);
    assert!(!engine(&["image", "inspect", &built]).status.success());

    // Networks: the instance's own can be created, used and removed; another's cannot be used.
    let net = format!("rbx-net-{}", b.inst.port);
    b.cli_ok(&["network", "create", &net]);
    let out = b.cli_ok(&[
        "run",
        "--rm",
        "--network",
        &net,
        "regobox-test/busybox:mine",
        "echo",
        "on-my-net",
    ]);
    assert_eq!(out.trim(), "on-my-net");
    let others_net = format!("rbx-othernet-{}", b.inst.port);
    assert!(engine(&["network", "create", &others_net]).status.success());
    let out = b.cli(&[
        "run",
        "--rm",
        "--network",
        &others_net,
        "regobox-test/busybox:mine",
        "true",
    ]);
    assert!(!out.status.success(), "joined someone else's network");
    assert!(
        stderr(&out).contains("not one of this instance's networks"),
        "{}",
        stderr(&out)
    );
    assert!(!b.cli(&["network", "rm", &others_net]).status.success());
    assert!(!b.cli_ok(&["network", "ls"]).contains(&others_net));
    engine(&["network", "rm", &others_net]);
    let out = b.cli(&["network", "create", "--driver", "macvlan", "rbx-mac"]);
    assert!(stderr(&out).contains("Driver"), "{}", stderr(&out));
    b.cli_ok(&["network", "rm", &net]);

    engine(&["rm", "-f", &other]);
    engine(&["rmi", &other_image]);
    b.stop();
}

#[test]
fn dangerous_requests_are_refused_with_nothing_created() {
    let mut b = Bridged::start("");
    b.import_busybox("regobox-test/busybox:policy");
    let before = containers_of("regobox-test/busybox:policy");
    let docker = b.bollard();
    let files = b.inst.root.join("files");
    std::fs::create_dir_all(files.join("jobs")).unwrap();
    std::os::unix::fs::symlink("/etc", files.join("jobs/escape")).unwrap();
    let cases: Vec<(HostConfig, &str)> = vec![
        (
            HostConfig {
                privileged: Some(true),
                ..Default::default()
            },
            "Privileged",
        ),
        (
            HostConfig {
                cap_add: Some(vec!["SYS_ADMIN".into()]),
                ..Default::default()
            },
            "CapAdd",
        ),
        (
            HostConfig {
                devices: Some(vec![bollard::models::DeviceMapping {
                    path_on_host: Some("/dev/sda".into()),
                    path_in_container: Some("/dev/sda".into()),
                    cgroup_permissions: Some("rwm".into()),
                }]),
                ..Default::default()
            },
            "Devices",
        ),
        (
            HostConfig {
                pid_mode: Some("host".into()),
                ..Default::default()
            },
            "PidMode",
        ),
        (
            HostConfig {
                network_mode: Some("host".into()),
                ..Default::default()
            },
            "NetworkMode",
        ),
        (
            HostConfig {
                ipc_mode: Some("host".into()),
                ..Default::default()
            },
            "IpcMode",
        ),
        (
            HostConfig {
                uts_mode: Some("host".into()),
                ..Default::default()
            },
            "UTSMode",
        ),
        (
            HostConfig {
                userns_mode: Some("host".into()),
                ..Default::default()
            },
            "UsernsMode",
        ),
        (
            HostConfig {
                security_opt: Some(vec!["seccomp=unconfined".into()]),
                ..Default::default()
            },
            "SecurityOpt",
        ),
        (
            HostConfig {
                binds: Some(vec!["/var/run/docker.sock:/var/run/docker.sock".into()]),
                ..Default::default()
            },
            "Docker socket",
        ),
        (
            HostConfig {
                binds: Some(vec!["/etc:/host-etc".into()]),
                ..Default::default()
            },
            "outside the allowed roots",
        ),
        (
            HostConfig {
                binds: Some(vec![format!("{}/../secrets:/s", files.display())]),
                ..Default::default()
            },
            "..",
        ),
        (
            HostConfig {
                binds: Some(vec![format!("{}/jobs/escape:/e", files.display())]),
                ..Default::default()
            },
            "symbolic link",
        ),
        (
            HostConfig {
                mounts: Some(vec![bollard::models::Mount {
                    typ: Some(bollard::models::MountTypeEnum::VOLUME),
                    source: Some("somevolume".into()),
                    target: Some("/v".into()),
                    ..Default::default()
                }]),
                ..Default::default()
            },
            "Mounts",
        ),
    ];
    rt().block_on(async {
        for (host_config, needle) in cases {
            let body = ContainerCreateBody {
                image: Some("regobox-test/busybox:policy".into()),
                cmd: Some(vec!["true".into()]),
                host_config: Some(host_config),
                ..Default::default()
            };
            match docker
                .create_container(None::<CreateContainerOptions>, body)
                .await
            {
                Err(bollard::errors::Error::DockerResponseServerError {
                    status_code,
                    message,
                }) => {
                    assert_eq!(status_code, 403, "{needle}: {message}");
                    assert!(message.contains(needle), "{needle}: {message}");
                }
                other => panic!("{needle}: not refused: {other:?}"),
            }
        }
    });
    // The docker CLI says why, too.
    let out = b.cli(&["run", "--privileged", "regobox-test/busybox:policy", "true"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("HostConfig.Privileged"),
        "{}",
        stderr(&out)
    );

    // Endpoints outside the allow-list, and paths that try to leave theirs.
    let some_id = all_containers()
        .first()
        .cloned()
        .unwrap_or_else(|| "x".into());
    for request in [
        format!("POST /v1.41/containers/{some_id}/exec HTTP/1.1\r\nHost: d\r\nContent-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{{}}"),
        "POST /containers/prune HTTP/1.1\r\nHost: d\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".into(),
        "POST /swarm/init HTTP/1.1\r\nHost: d\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".into(),
        "GET /v1.41/containers/%2e%2e/json HTTP/1.1\r\nHost: d\r\nConnection: close\r\n\r\n".into(),
        "GET /containers/a%2Fb/json HTTP/1.1\r\nHost: d\r\nConnection: close\r\n\r\n".into(),
        "DELETE /images/../containers/x HTTP/1.1\r\nHost: d\r\nConnection: close\r\n\r\n".into(),
        "GET /volumes HTTP/1.1\r\nHost: d\r\nConnection: close\r\n\r\n".into(),
    ] {
        let (status, body) = raw(&b.socket, &request);
        assert_eq!(status, 403, "{request}: {body}");
        let message = serde_json::from_str::<serde_json::Value>(&body).unwrap()["message"]
            .as_str()
            .unwrap()
            .to_string();
        assert!(message.contains("refused"), "{message}");
    }
    // Other tests create containers at the same time; this one's could only be of its image.
    assert_eq!(
        containers_of("regobox-test/busybox:policy"),
        before,
        "something was created on the engine"
    );
    // ...and the filter does see a container of that image, when there is one.
    let made = stdout(&engine(&["create", "regobox-test/busybox:policy", "true"]));
    let made = made.trim();
    assert!(
        containers_of("regobox-test/busybox:policy").contains(&made.to_string()),
        "{made}"
    );
    engine(&["rm", made]);
    let denied = b
        .audit()
        .into_iter()
        .filter(|l| l["decision"] == "deny")
        .count();
    assert!(denied >= 20, "{denied} deny lines in the audit");
    b.stop();
}

#[test]
fn followed_logs_and_events_stream_through() {
    let mut b = Bridged::start("");
    b.import_busybox("regobox-test/busybox:stream");
    let mut events = Command::new("docker")
        .args([
            "events",
            "--format",
            "{{.Action}} {{.Actor.Attributes.name}}",
        ])
        .env("DOCKER_HOST", format!("unix://{}", b.socket.display()))
        .env("DOCKER_CONFIG", &b.docker_config)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    // Another container on the engine, whose events must not show.
    let other = format!("rbx-other-{}", b.inst.port);
    let tar = busybox_rootfs_tar(b.inst.dir.path());
    let other_image = format!("regobox-test/other-stream:{}", b.inst.port);
    let out = Command::new("docker")
        .args(["import", "-", &other_image])
        .stdin(std::fs::File::open(tar).unwrap())
        .output()
        .unwrap();
    assert!(out.status.success());
    engine(&["run", "--name", &other, &other_image, "true"]);

    let name = format!("rbx-stream-{}", b.inst.port);
    b.cli_ok(&[
        "run",
        "-d",
        "--name",
        &name,
        "regobox-test/busybox:stream",
        "sh",
        "-c",
        "for i in 1 2 3 4; do echo line-$i; sleep 1; done",
    ]);
    // `logs --follow` returns each line as it comes, and ends when the container does.
    let start = std::time::Instant::now();
    let mut follow = Command::new("docker")
        .args(["logs", "--follow", &name])
        .env("DOCKER_HOST", format!("unix://{}", b.socket.display()))
        .env("DOCKER_CONFIG", &b.docker_config)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    {
        use std::io::BufRead;
        let mut reader = std::io::BufReader::new(follow.stdout.as_mut().unwrap());
        reader.read_line(&mut first).unwrap();
        assert_eq!(first.trim(), "line-1");
        let first_at = start.elapsed();
        let mut rest = String::new();
        reader.read_to_string(&mut rest).unwrap();
        assert_eq!(rest, "line-2\nline-3\nline-4\n");
        // The job spends 3 s between its first and last line: a buffered answer would bring
        // them together.
        assert!(
            start.elapsed() - first_at >= Duration::from_secs(1),
            "not streamed: line 1 at {first_at:?}, the end at {:?}",
            start.elapsed()
        );
    }
    assert!(follow.wait().unwrap().success());

    std::thread::sleep(Duration::from_millis(500));
    let _ = events.kill();
    let mut seen = String::new();
    events
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut seen)
        .unwrap();
    let _ = events.wait();
    assert!(seen.contains(&format!("start {name}")), "events: {seen}");
    assert!(seen.contains(&format!("die {name}")), "events: {seen}");
    assert!(!seen.contains(&other), "another's events leaked: {seen}");
    engine(&["rm", "-f", &other]);
    engine(&["rmi", &other_image]);
    b.cli_ok(&["rm", &name]);
    b.stop();
}

#[test]
fn old_jobs_are_collected_at_start_and_running_ones_left_alone() {
    let mut b = Bridged::start("gc_after = \"1s\"");
    b.import_busybox("regobox-test/busybox:gc");
    let done = format!("rbx-done-{}", b.inst.port);
    let running = format!("rbx-running-{}", b.inst.port);
    b.cli_ok(&["run", "--name", &done, "regobox-test/busybox:gc", "true"]);
    b.cli_ok(&[
        "run",
        "-d",
        "--name",
        &running,
        "regobox-test/busybox:gc",
        "sleep",
        "600",
    ]);
    b.stop();
    std::thread::sleep(Duration::from_millis(1500));
    // Jobs outlive regobox (docker.stop_jobs = false).
    let state = stdout(&engine(&[
        "inspect",
        "--format",
        "{{.State.Status}}",
        &running,
    ]));
    assert_eq!(state.trim(), "running");
    let inst = &b.inst;
    let mut again = inst.start();
    again.wait_for_log("Docker bridge up", Duration::from_secs(20));
    let log = again.log_text();
    assert!(log.contains("job still running from before"), "{log}");
    assert!(
        !engine(&["inspect", &done]).status.success(),
        "the exited job was not collected"
    );
    assert!(engine(&["inspect", &running]).status.success());
    let status = inst.status();
    assert_eq!(status["components"]["docker"]["state"], "up");
    assert_eq!(
        status["components"]["docker"]["jobs_running_at_start"],
        serde_json::json!([running])
    );
    assert_eq!(status["components"]["docker"]["jobs_removed_at_start"], 1);
    let (_, metrics) = inst.health_get("/metrics");
    assert!(metrics.contains("regobox_docker_up 1"), "{metrics}");
    again.stop();
    engine(&["rm", "-f", &running]);
}

#[test]
fn without_an_engine_everything_else_runs() {
    let mut inst = Instance::new();
    inst.env
        .push(("REGOBOX_DOCKER__ENABLED".into(), "true".into()));
    inst.env.push((
        "REGOBOX_DOCKER__HOST".into(),
        format!("unix://{}/no-engine.sock", inst.dir.path().display()),
    ));
    inst.env
        .push(("DOCKER_HOST".into(), "unix:///var/run/docker.sock".into()));
    let run = inst.start();
    let log = run.log_text();
    assert_eq!(
        log.matches("the Docker engine cannot be reached").count(),
        1,
        "{log}"
    );
    assert!(log.contains("no-engine.sock"), "{log}");
    let (code, _) = inst.health_get("/readyz");
    assert_eq!(code, 200);
    assert_eq!(
        inst.status()["components"]["docker"]["state"],
        "unreachable"
    );
    assert!(!inst.runtime.join("docker.sock").exists());
    // The application does not get the engine's own socket instead.
    let out = inst.ok(&["exec", "sh", "-c", "echo \"[$DOCKER_HOST]\""]);
    assert_eq!(stdout(&out).trim(), "[]");
    assert_eq!(inst.sql("SELECT 1"), "1");
    run.stop();
}

#[test]
fn a_remote_engine_over_tls_with_a_client_certificate() {
    let inst = Instance::new();
    let certs = inst.dir.path().join("certs");
    std::fs::create_dir_all(&certs).unwrap();
    let ca = issue(&certs, "ca", None, &[]);
    issue(&certs, "server", Some(&ca), &["localhost"]);
    issue(&certs, "client", Some(&ca), &[]);
    // stunnel: TLS that requires a client certificate signed by the CA, in front of the engine.
    let port = free_port();
    let conf = certs.join("stunnel.conf");
    std::fs::write(
        &conf,
        format!(
            "foreground = yes\npid =\n[docker]\naccept = 127.0.0.1:{port}\nconnect = /var/run/docker.sock\ncert = {0}/server.pem\nkey = {0}/server-key.pem\nCAfile = {0}/ca.pem\nrequireCert = yes\nverifyChain = yes\n",
            certs.display()
        ),
    )
    .unwrap();
    let mut stunnel = Command::new("stunnel4")
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("stunnel4 (scripts/install-deps.sh installs it)");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "stunnel did not listen"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let host = format!(
        "host = \"tcp://localhost:{port}\"\ntls_ca = \"{0}/ca.pem\"\ntls_cert = \"{0}/client.pem\"\ntls_key = \"{0}/client-key.pem\"",
        certs.display()
    );
    let mut b = Bridged::start_with(inst, &host, "");
    assert!(
        b.run
            .log_text()
            .contains(&format!("tcp://localhost:{port} (TLS)")),
        "{}",
        b.run.log_text()
    );
    b.import_busybox("regobox-test/busybox:tls");
    // A job with attach (an upgrade), through the proxy and TLS.
    let out = b.cli_ok(&[
        "run",
        "--rm",
        "regobox-test/busybox:tls",
        "echo",
        "over-tls",
    ]);
    assert_eq!(out.trim(), "over-tls");
    b.cli_ok(&["rmi", "regobox-test/busybox:tls"]);
    b.stop();
    let _ = stunnel.kill();
    let _ = stunnel.wait();
}

//! The image end to end on the real engine: build it (docker/build-offline.sh, with the binary
//! under test) and the demo application on top (docker/examples/demo), `docker run` it with real
//! ports, a real volume and the host's Docker socket, and use it as a user would.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::support::*;

const DEMO: &str = "regobox-demo:e2e";

fn docker(args: &[&str]) -> Output {
    Command::new("docker")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn docker_ok(args: &[&str]) -> String {
    let out = docker(args);
    assert!(
        out.status.success(),
        "docker {args:?}: {}\n{}",
        stdout(&out),
        stderr(&out)
    );
    stdout(&out).trim().to_string()
}

/// Build regobox:e2e from the binary under test, then the demo on top (layers cached by the
/// engine between runs).
fn build_images() {
    let root = env!("CARGO_MANIFEST_DIR");
    let started = Instant::now();
    let id = |tag: &str| {
        stdout(&docker(&["image", "inspect", "-f", "{{.Id}}", tag]))
            .trim()
            .to_string()
    };
    let before = [id("regobox:e2e"), id(DEMO)];
    let out = Command::new(format!("{root}/docker/build-offline.sh"))
        .arg("regobox:e2e")
        .env("REGOBOX_BINARY", BIN)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "build-offline: {}\n{}",
        stdout(&out),
        stderr(&out)
    );
    docker_ok(&[
        "build",
        "-q",
        "-t",
        DEMO,
        "--build-arg",
        "REGOBOX_IMAGE=regobox:e2e",
        &format!("{root}/docker/examples/demo"),
    ]);
    eprintln!("images built in {:?}", started.elapsed());
    // The images these replaced, if any, are not left dangling.
    for (old, tag) in before.iter().zip(["regobox:e2e", DEMO]) {
        if !old.is_empty() && *old != id(tag) {
            let _ = docker(&["rmi", old]);
        }
    }
}

/// One container of the demo image, removed when dropped.
struct Container {
    name: String,
    volume: PathBuf,
    http: u16,
    https: u16,
}

impl Container {
    fn run(name: &str, volume: &Path, with_docker: bool) -> Container {
        let (http, https) = (free_port(), free_port());
        let _ = docker(&["rm", "-f", name]);
        let mut args = vec![
            "run".to_string(),
            "-d".into(),
            "--name".into(),
            name.into(),
            "-p".into(),
            format!("127.0.0.1:{http}:80"),
            "-p".into(),
            format!("127.0.0.1:{https}:443"),
            "-v".into(),
            format!("{}:/volumes", volume.display()),
        ];
        if with_docker {
            args.push("-v".into());
            args.push("/var/run/docker.sock:/var/run/docker.sock".into());
        }
        args.push(DEMO.into());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        docker_ok(&args);
        Container {
            name: name.into(),
            volume: volume.to_path_buf(),
            http,
            https,
        }
    }

    /// Wait for Docker's health status `healthy`; the time it took.
    fn healthy(&self) -> Duration {
        let started = Instant::now();
        loop {
            let status = docker_ok(&["inspect", "-f", "{{.State.Health.Status}}", &self.name]);
            if status == "healthy" {
                return started.elapsed();
            }
            assert!(
                started.elapsed() < Duration::from_secs(120) && status != "unhealthy",
                "{} is {status}:\n{}",
                self.name,
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn logs(&self) -> String {
        let out = docker(&["logs", &self.name]);
        stdout(&out) + &stderr(&out)
    }

    fn curl(&self, args: &[&str]) -> Output {
        curl(
            &self.volume.join("secrets/tls/self-signed.pem"),
            &[self.https, self.http],
            args,
        )
    }

    fn url(&self, path: &str) -> String {
        format!("https://localhost:{}{path}", self.https)
    }

    fn notes(&self) -> serde_json::Value {
        let out = self.curl(&[&self.url("/notes")]);
        serde_json::from_str(&stdout(&out))
            .unwrap_or_else(|e| panic!("{e}: {} {}", stdout(&out), stderr(&out)))
    }

    fn add_note(&self, text: &str) -> Option<i64> {
        add_note(&self.volume, self.https, self.http, text)
    }

    /// `docker stop`: its duration and the container's exit code.
    fn stop(&self) -> (Duration, i64) {
        let started = Instant::now();
        docker_ok(&["stop", &self.name]);
        let took = started.elapsed();
        let code = docker_ok(&["inspect", "-f", "{{.State.ExitCode}}", &self.name]);
        (took, code.parse().unwrap())
    }

    fn memory(&self) -> String {
        docker_ok(&[
            "stats",
            "--no-stream",
            "--format",
            "{{.MemUsage}}",
            &self.name,
        ])
    }
}

/// POST a note to the demo on `localhost:https`; its id if it was committed.
fn add_note(volume: &Path, https: u16, http: u16, text: &str) -> Option<i64> {
    let out = curl(
        &volume.join("secrets/tls/self-signed.pem"),
        &[https, http],
        &[
            "-X",
            "POST",
            "--data-binary",
            text,
            &format!("https://localhost:{https}/notes"),
        ],
    );
    let v: serde_json::Value = serde_json::from_str(&stdout(&out)).ok()?;
    v["id"].as_i64()
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = docker(&["rm", "-f", &self.name]);
    }
}

#[test]
fn the_image_deploys_the_whole_thing() {
    // A run killed before its clean-up left the demo's job image, which another instance may
    // not move: remove it first.
    let _ = docker(&["rmi", "regobox-demo/job:1"]);
    build_images();
    let size = docker_ok(&["image", "inspect", "-f", "{{.Size}}", "regobox:e2e"]);
    eprintln!(
        "regobox:e2e image: {} MB",
        size.parse::<u64>().unwrap() / 1_000_000
    );
    let dir = tempdir();
    let volume = dir.path().join("volumes");
    std::fs::create_dir_all(&volume).unwrap();
    let tag = free_port();

    // 2-3. Run with real ports, the volume and the Docker socket; healthy.
    let c = Container::run(&format!("rbx-e2e-{tag}"), &volume, true);
    let fresh = c.healthy();
    eprintln!(
        "docker run to healthy, empty volume: {fresh:?}; idle memory {}",
        c.memory()
    );

    // 4. HTTPS from the host: the app answers and writes to PostgreSQL; a WebSocket round trip;
    // port 80 redirects.
    let out = c.curl(&["-D", "-", &c.url("/")]);
    let page = stdout(&out);
    assert!(page.starts_with("HTTP/2 200"), "{page}\n{}", c.logs());
    assert!(page.contains("regobox demo"), "{page}");
    assert!(page.contains("(https)"), "{page}");
    let first = c.add_note("first note").expect("a note id");
    assert_eq!(
        c.notes(),
        serde_json::json!([{"id": first, "body": "first note"}])
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        use futures_util::{SinkExt, StreamExt};
        use tokio_tungstenite::tungstenite::Message;
        let ca = volume.join("secrets/tls/self-signed.pem");
        let mut ws = crate::proxy::wss(c.https, &ca, "/ws").await;
        ws.send(Message::text("ping")).await.unwrap();
        assert_eq!(
            ws.next().await.unwrap().unwrap(),
            Message::text("echo: ping")
        );
    });
    let out = c.curl(&[
        "-D",
        "-",
        "-o",
        "/dev/null",
        &format!("http://localhost:{}/notes", c.http),
    ]);
    assert!(stdout(&out).starts_with("HTTP/1.1 301"), "{}", stdout(&out));

    // 5. A pipeline job: a sibling container on the host's engine, through the bridge, mounting
    // a path the app names as it sees it, translated to the host path behind /volumes.
    let out = c.curl(&[
        "-X",
        "POST",
        "--data-binary",
        "hello pipeline",
        &c.url("/jobs"),
    ]);
    let job: serde_json::Value = serde_json::from_str(&stdout(&out))
        .unwrap_or_else(|e| panic!("{e}: {}\n{}", stdout(&out), c.logs()));
    assert_eq!(job["exit"], 0, "{job}\n{}", c.logs());
    assert_eq!(job["result"], "HELLO PIPELINE", "{job}");
    let on_host = volume.join(format!(
        "files/jobs/{}/result.txt",
        job["id"].as_str().unwrap()
    ));
    assert_eq!(std::fs::read_to_string(&on_host).unwrap(), "HELLO PIPELINE");
    let audit = std::fs::read_to_string(volume.join("logs/docker-audit.log")).unwrap();
    assert!(
        audit.contains("\"endpoint\":\"ContainerCreate\""),
        "{audit}"
    );

    // 6. docker stop: well inside 10 s, exit code 0, PostgreSQL shut down cleanly.
    let (took, code) = c.stop();
    eprintln!("docker stop: {took:?}, exit code {code}");
    assert!(took < Duration::from_secs(8), "docker stop took {took:?}");
    assert_eq!(code, 0, "{}", c.logs());
    assert!(
        c.logs().contains("database system is shut down"),
        "{}",
        c.logs()
    );

    // 7. A new container on the same volume: the data is there.
    drop(c);
    let c = Container::run(&format!("rbx-e2e-{tag}"), &volume, true);
    let existing = c.healthy();
    eprintln!(
        "docker run to healthy, existing volume: {existing:?}; idle memory {}",
        c.memory()
    );
    assert_eq!(
        c.notes(),
        serde_json::json!([{"id": first, "body": "first note"}])
    );

    // 8. Backup inside, restore into a fresh volume with `docker run --rm ... restore`, serve it.
    let out = docker_ok(&["exec", &c.name, "regobox", "backup"]);
    eprintln!("backup: {out}");
    let archive = std::fs::read_dir(volume.join("backups"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .find(|n| n.ends_with(".tar.zst"))
        .expect("an archive in the backups volume");
    let volume2 = dir.path().join("volumes2");
    std::fs::create_dir_all(&volume2).unwrap();
    docker_ok(&[
        "run",
        "--rm",
        "-v",
        &format!("{}:/volumes", volume2.display()),
        "-v",
        &format!("{}:/backups:ro", volume.join("backups").display()),
        DEMO,
        "restore",
        &format!("/backups/{archive}"),
    ]);
    let restored = Container::run(&format!("rbx-e2e-restored-{tag}"), &volume2, false);
    restored.healthy();
    assert_eq!(restored.notes(), c.notes());
    drop(restored);

    // 9. docker kill (SIGKILL) during writes, start again: healthy, every committed row there.
    let committed = Arc::new(std::sync::Mutex::new(Vec::new()));
    let writing = Arc::new(AtomicBool::new(true));
    let writer = {
        let (committed, writing) = (committed.clone(), writing.clone());
        let (https, http, volume) = (c.https, c.http, c.volume.clone());
        std::thread::spawn(move || {
            let mut n = 0;
            while writing.load(Ordering::Relaxed) {
                n += 1;
                if let Some(id) = add_note(&volume, https, http, &format!("during the kill {n}")) {
                    committed.lock().unwrap().push(id);
                }
            }
        })
    };
    std::thread::sleep(Duration::from_secs(2));
    docker_ok(&["kill", &c.name]);
    std::thread::sleep(Duration::from_millis(300));
    writing.store(false, Ordering::Relaxed);
    writer.join().unwrap();
    let committed = committed.lock().unwrap().clone();
    assert!(
        committed.len() > 5,
        "only {} notes written",
        committed.len()
    );
    docker_ok(&["start", &c.name]);
    c.healthy();
    let ids: Vec<i64> = c
        .notes()
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["id"].as_i64().unwrap())
        .collect();
    for id in &committed {
        assert!(
            ids.contains(id),
            "committed note {id} lost after docker kill"
        );
    }
    eprintln!(
        "{} notes committed before docker kill, all present",
        committed.len()
    );
    drop(c);
    // The job image the demo imported through the bridge.
    let _ = docker(&["rmi", "regobox-demo/job:1"]);
}

//! The TLS proxy with real clients (curl, openssl, rustls, a WebSocket client) in front of a
//! real application (tests/fixtures/upstream.py, supervised by regobox).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_rustls::rustls;

use crate::support::*;

const UPSTREAM: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/upstream.py");

/// A regobox with the proxy on free ports in front of the fixture application.
pub(crate) struct Proxied {
    pub(crate) inst: Instance,
    run: Option<Running>,
    pub(crate) http: u16,
    pub(crate) https: u16,
    pub(crate) app: u16,
}

impl Proxied {
    pub(crate) fn config(extra: &str) -> Proxied {
        let mut inst = Instance::new();
        let (http, https, app) = (free_port(), free_port(), free_port());
        inst.config_file(
            "90_proxy.toml",
            &format!(
                r#"[proxy]
listen = "127.0.0.1"
upstream = "http://127.0.0.1:{app}"
plain_http_paths = ["/job/", "/ws-plain"]
{extra}

[services.app]
command = ["python3", "{UPSTREAM}", "{app}"]
ready = {{ tcp = "127.0.0.1:{app}" }}
"#
            ),
        );
        inst.env
            .push(("REGOBOX_PROXY__ENABLED".into(), "true".into()));
        let mut p = Proxied {
            inst,
            run: None,
            http,
            https,
            app,
        };
        p.set_ports();
        p
    }

    /// The proxy's ports go through the environment, so that a retry can change them.
    fn set_ports(&mut self) {
        self.inst
            .env
            .retain(|(k, _)| !k.starts_with("REGOBOX_PROXY__HTTP"));
        self.inst
            .env
            .push(("REGOBOX_PROXY__HTTP_PORT".into(), self.http.to_string()));
        self.inst
            .env
            .push(("REGOBOX_PROXY__HTTPS_PORT".into(), self.https.to_string()));
    }

    /// `regobox run` until the proxy listens.
    fn launch(&mut self) -> Running {
        let mut run = self.inst.spawn_run();
        run.wait_for_log("proxy listening", Duration::from_secs(60));
        run
    }

    /// Launch and wait until ready.
    pub(crate) fn start_again(&mut self) {
        let mut run = self.launch();
        run.wait_for_log("regobox is ready", Duration::from_secs(60));
        self.run = Some(run);
    }

    pub(crate) fn start(extra: &str) -> Proxied {
        let mut p = Self::config(extra);
        p.start_again();
        p
    }

    fn self_signed(&self) -> PathBuf {
        self.inst.root.join("secrets/tls/self-signed.pem")
    }

    /// curl against `localhost` (resolved to 127.0.0.1), trusting the self-signed certificate.
    pub(crate) fn curl(&self, args: &[&str]) -> Output {
        curl(&self.self_signed(), &[self.https, self.http], args)
    }

    pub(crate) fn curl_command(&self, args: &[&str]) -> Command {
        curl_command(&self.self_signed(), &[self.https, self.http], args)
    }

    pub(crate) fn https_url(&self, path: &str) -> String {
        format!("https://localhost:{}{path}", self.https)
    }

    fn http_url(&self, path: &str) -> String {
        format!("http://localhost:{}{path}", self.http)
    }

    pub(crate) fn stop(&mut self) -> String {
        self.run.take().unwrap().stop()
    }
}

/// The access lines of the requests for `path` (exactly) in a regobox log.
pub(crate) fn access_lines<'a>(log: &'a str, path: &str) -> Vec<&'a str> {
    let field = format!(" path={path} ");
    log.lines()
        .filter(|l| l.contains(" INFO access ") && l.contains(&field))
        .collect()
}

/// A rustls client configuration trusting `ca` (PEM), or anything when `None`.
pub fn client_config(ca: Option<&Path>, alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap();
    let mut config = match ca {
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            let pem = std::fs::read(ca).unwrap();
            use rustls::pki_types::pem::PemObject;
            for cert in rustls::pki_types::CertificateDer::pem_slice_iter(&pem) {
                roots.add(cert.unwrap()).unwrap();
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        None => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAny))
            .with_no_client_auth(),
    };
    config.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    Arc::new(config)
}

/// For reading what a server presents without trusting it.
#[derive(Debug)]
struct AcceptAny;

impl rustls::client::danger::ServerCertVerifier for AcceptAny {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }
    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        rustls::crypto::ring::default_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A blocking TLS connection to 127.0.0.1:`port` with SNI `localhost`.
fn tls(port: u16, ca: Option<&Path>) -> rustls::StreamOwned<rustls::ClientConnection, TcpStream> {
    tls_alpn(port, ca, &[b"http/1.1"])
}

/// [`tls`], offering the protocols `alpn`.
pub(crate) fn tls_alpn(
    port: u16,
    ca: Option<&Path>,
    alpn: &[&[u8]],
) -> rustls::StreamOwned<rustls::ClientConnection, TcpStream> {
    let conn =
        rustls::ClientConnection::new(client_config(ca, alpn), "localhost".try_into().unwrap())
            .unwrap();
    let tcp = TcpStream::connect(("127.0.0.1", port)).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut s = rustls::StreamOwned::new(conn, tcp);
    s.flush().unwrap(); // completes the handshake
    while s.conn.is_handshaking() {
        s.conn.complete_io(&mut s.sock).unwrap();
    }
    s
}

/// The serial number of the certificate the server presents on a new connection.
fn served_serial(port: u16) -> String {
    let s = tls(port, None);
    serial_of(&s.conn.peer_certificates().unwrap()[0])
}

fn serial_of(der: &[u8]) -> String {
    let (_, cert) = x509_parser::parse_x509_certificate(der).unwrap();
    cert.raw_serial_as_string()
}

/// One HTTP/1.1 request on an open stream; the status and body (Content-Length framed).
fn request(stream: &mut impl ReadWrite, path: &str) -> (u16, String) {
    write!(stream, "GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").unwrap();
    stream.flush().unwrap();
    response(stream)
}

/// An HTTP/1.1 response read off `stream`: status and body (Content-Length framed).
pub(crate) fn response(stream: &mut impl Read) -> (u16, String) {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        stream.read_exact(&mut byte).unwrap();
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_string();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    let len: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    stream.read_exact(&mut body).unwrap();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// A WebSocket over TLS to `localhost:port` (127.0.0.1), trusting `ca`.
pub async fn wss(
    port: u16,
    ca: &Path,
    path: &str,
) -> tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let connector = tokio_rustls::TlsConnector::from(client_config(Some(ca), &[b"http/1.1"]));
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let tls = connector
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .unwrap();
    let (ws, response) =
        tokio_tungstenite::client_async(format!("wss://localhost:{port}{path}"), tls)
            .await
            .unwrap();
    assert_eq!(response.status(), 101);
    ws
}

trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}

/// Raw bytes to a plain port; what comes back until the server closes (or 10 s).
pub(crate) fn raw(port: u16, bytes: &[u8]) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(bytes).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

pub(crate) fn header_of(json: &serde_json::Value, name: &str) -> Vec<String> {
    json["headers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|h| h[0].as_str().unwrap().eq_ignore_ascii_case(name))
        .map(|h| h[1].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn https_h1_h2_redirects_plain_paths_and_forwarded_headers() {
    let mut p = Proxied::start("");
    // HTTP/1.1 and HTTP/2 over TLS; what the client claims in X-Forwarded-* is replaced.
    for (flag, version) in [("--http1.1", "1.1"), ("--http2", "2")] {
        let out = p.curl(&[
            flag,
            "-H",
            "X-Forwarded-For: 6.6.6.6",
            "-H",
            "Forwarded: for=6.6.6.6",
            "-H",
            "Connection: keep-alive, X-Secret",
            "-H",
            "X-Secret: hop",
            "-w",
            "\n%{http_version}",
            &p.https_url("/headers?q=1"),
        ]);
        let text = stdout(&out);
        let (body, got_version) = text.rsplit_once('\n').unwrap();
        assert_eq!(got_version, version, "{}", stderr(&out));
        let json: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(json["path"], "/headers?q=1");
        assert_eq!(header_of(&json, "x-forwarded-for"), vec!["127.0.0.1"]);
        assert_eq!(header_of(&json, "x-forwarded-proto"), vec!["https"]);
        // The forwarding fields name the host as the application gets it, port included
        // (RFC 7239 5.3: the Host field as received).
        assert_eq!(
            header_of(&json, "x-forwarded-host"),
            vec![format!("localhost:{}", p.https)]
        );
        assert_eq!(
            header_of(&json, "forwarded"),
            vec![format!(
                "for=127.0.0.1;proto=https;host=\"localhost:{}\"",
                p.https
            )]
        );
        assert_eq!(
            header_of(&json, "host"),
            vec![format!("localhost:{}", p.https)]
        );
        if version == "1.1" {
            assert!(header_of(&json, "x-secret").is_empty(), "{json}");
        }
    }

    // Port 80: a permanent redirect to https, same host, path and query...
    let out = p.curl(&["-D", "-", "-o", "/dev/null", &p.http_url("/a/b?c=d&e=f")]);
    let head = stdout(&out);
    assert!(head.starts_with("HTTP/1.1 301"), "{head}");
    assert!(
        head.contains(&format!(
            "location: https://localhost:{}/a/b?c=d&e=f",
            p.https
        )),
        "{head}"
    );
    let out = p.curl(&[
        "-D",
        "-",
        "-o",
        "/dev/null",
        "-X",
        "POST",
        &p.http_url("/form"),
    ]);
    assert!(stdout(&out).starts_with("HTTP/1.1 308"), "{}", stdout(&out));
    // ...but for the plain paths, proxied over HTTP.
    let out = p.curl(&[&p.http_url("/job/42/notify")]);
    assert_eq!(stdout(&out), "app: /job/42/notify\n");
    let out = p.curl(&[&p.http_url("/job/headers")]);
    assert_eq!(stdout(&out), "app: /job/headers\n");

    // A client without SNI (https://<ip>/) gets the default certificate.
    let out = Command::new("openssl")
        .args([
            "s_client",
            "-connect",
            &format!("127.0.0.1:{}", p.https),
            "-noservername",
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(stdout(&out).contains("CN = localhost"), "{}", stdout(&out));

    // Oversized heads: 431. Both framings: 400. Neither reaches the application.
    let big = format!(
        "GET /job/x HTTP/1.1\r\nHost: localhost\r\nX-Big: {}\r\n\r\n",
        "a".repeat(40_000)
    );
    assert!(raw(p.http, big.as_bytes()).starts_with("HTTP/1.1 431"));
    let smuggle = b"POST /job/upload HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /job/smuggled HTTP/1.1\r\nHost: localhost\r\n\r\n";
    let answer = raw(p.http, smuggle);
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(!answer.contains("app: "), "{answer}");
    // Requests pipelined before one with both framings, in the same write, are served; it and
    // what follows are not (the refusal was the connection's: every request in the read got it).
    let pipelined = b"GET /job/first HTTP/1.1\r\nHost: localhost\r\n\r\nGET /job/second HTTP/1.1\r\nHost: localhost\r\n\r\nPOST /job/upload HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /job/smuggled HTTP/1.1\r\nHost: localhost\r\n\r\n";
    let answer = raw(p.http, pipelined);
    let statuses: Vec<&str> = answer.split("HTTP/1.1 ").skip(1).map(|r| &r[..3]).collect();
    assert_eq!(statuses, ["200", "200", "400"], "{answer}");
    assert!(answer.contains("app: /job/first"), "{answer}");
    assert!(answer.contains("app: /job/second"), "{answer}");
    assert!(!answer.contains("app: /job/upload"), "{answer}");
    assert!(!answer.contains("/job/smuggled"), "{answer}");
    // Refused here too (RFC 9112 3.2 and 6.1), whatever the application would have said: no Host
    // in HTTP/1.1, two Hosts, a Host that is not one, CONNECT, a transfer coding hyper would
    // leave on the body.
    for (request, status) in [
        ("GET /job/a HTTP/1.1\r\n\r\n", "400"),
        ("GET /job/a HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", "400"),
        ("GET /job/a HTTP/1.1\r\nHost: a b\r\n\r\n", "400"),
        ("GET /job/a HTTP/1.1\r\nHost: u@localhost\r\n\r\n", "400"),
        (
            "CONNECT localhost:22 HTTP/1.1\r\nHost: localhost:22\r\n\r\n",
            "501",
        ),
        (
            "POST /job/a HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: gzip, chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
            "501",
        ),
    ] {
        let answer = raw(p.http, request.as_bytes());
        assert!(
            answer.starts_with(&format!("HTTP/1.1 {status}")),
            "{request:?}: {answer}"
        );
        assert!(!answer.contains("app: "), "{request:?}: {answer}");
    }
    // HTTP/1.0 needs no Host: the first of proxy.hostnames stands in.
    let answer = raw(p.http, b"GET /job/a HTTP/1.0\r\n\r\n");
    assert!(answer.contains("app: /job/a"), "{answer}");

    // The certificate in /status and /metrics, and one access line per request.
    let status = p.inst.status();
    let cert = &status["components"]["proxy"]["certificate"];
    assert_eq!(cert["source"], "self-signed");
    assert!(
        cert["subject"].as_str().unwrap().contains("CN=localhost"),
        "{cert}"
    );
    let (_, metrics) = p.inst.health_get("/metrics");
    assert!(
        metrics.contains("regobox_tls_certificate_not_after_seconds "),
        "{metrics}"
    );
    let log = p.stop();
    assert!(
        log.lines().any(|l| l.contains("access")
            && l.contains("path=/headers?q=1")
            && l.contains("status=200")
            && l.contains("upstream_ms=")),
        "{log}"
    );
    // The oversized head's 431 is hyper's, which answers it before any handler: its line has
    // `-` for what was not read (see `every_head_hyper_refuses_has_an_access_line`).
    assert!(
        log.lines()
            .any(|l| l.contains(" version=- ") && l.contains(" status=431 ")),
        "{log}"
    );
}

#[test]
fn websockets_and_large_streams_with_bounded_memory() {
    let p = Proxied::start("");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    // WebSocket echo through TLS (wss) and through port 80's plain path (ws).
    rt.block_on(async {
        use futures_util::{SinkExt, StreamExt};
        use tokio_tungstenite::tungstenite::Message;
        let mut ws = wss(p.https, &p.self_signed(), "/ws").await;
        for i in 0..20 {
            let text = format!("hello {i}");
            ws.send(Message::text(text.clone())).await.unwrap();
            assert_eq!(ws.next().await.unwrap().unwrap(), Message::text(text));
        }
        let blob = vec![7u8; 200_000];
        ws.send(Message::binary(blob.clone())).await.unwrap();
        assert_eq!(ws.next().await.unwrap().unwrap(), Message::binary(blob));
        ws.close(None).await.unwrap();

        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", p.http))
            .await
            .unwrap();
        let (mut ws, _) =
            tokio_tungstenite::client_async(format!("ws://localhost:{}/ws-plain", p.http), tcp)
                .await
                .unwrap();
        ws.send(Message::text("plain")).await.unwrap();
        assert_eq!(ws.next().await.unwrap().unwrap(), Message::text("plain"));
    });

    // 512 MiB up (a resumable-upload PATCH, streamed) and down, HTTP/1.1 and HTTP/2, while the
    // proxy's memory is sampled.
    let pid = p.run.as_ref().unwrap().pid();
    let rss = move || -> u64 {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
            .unwrap()
    };
    let baseline = rss();
    let sampling = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let peak = Arc::new(std::sync::atomic::AtomicU64::new(baseline));
    let sampler = {
        let (sampling, peak) = (sampling.clone(), peak.clone());
        std::thread::spawn(move || {
            while sampling.load(std::sync::atomic::Ordering::Relaxed) {
                peak.fetch_max(rss(), std::sync::atomic::Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    const SIZE: u64 = 512 << 20;
    let file = p.inst.dir.path().join("upload.bin");
    {
        let f = std::fs::File::create(&file).unwrap();
        f.set_len(SIZE).unwrap();
    }
    let zeros_sha = {
        use sha2::Digest;
        let mut h = sha2::Sha256::new();
        let block = vec![0u8; 1 << 20];
        for _ in 0..(SIZE >> 20) {
            h.update(&block);
        }
        format!("{:x}", h.finalize())
    };
    for flag in ["--http1.1", "--http2"] {
        // Chunked upload (no length known in advance), as a streamed PATCH.
        let out = p.curl(&[
            flag,
            "-X",
            "PATCH",
            "-H",
            "Transfer-Encoding: chunked",
            "-T",
            &file.display().to_string(),
            &p.https_url("/upload"),
        ]);
        let json: serde_json::Value = serde_json::from_str(&stdout(&out))
            .unwrap_or_else(|e| panic!("{e}: {} {}", stdout(&out), stderr(&out)));
        assert_eq!(json["bytes"], SIZE, "{flag}");
        assert_eq!(json["sha256"], zeros_sha, "{flag}");
        let out = p.curl(&[
            flag,
            "-o",
            "/dev/null",
            "-w",
            "%{size_download} %{http_code}",
            &p.https_url(&format!("/download?n={SIZE}")),
        ]);
        assert_eq!(stdout(&out), format!("{SIZE} 200"), "{}", stderr(&out));
    }
    sampling.store(false, std::sync::atomic::Ordering::Relaxed);
    sampler.join().unwrap();
    let grew = peak.load(std::sync::atomic::Ordering::Relaxed) - baseline;
    eprintln!("proxy RSS: baseline {baseline} KiB, peak +{grew} KiB over 4 x 512 MiB");
    assert!(
        grew < 64 * 1024,
        "the proxy grew by {grew} KiB while streaming 512 MiB bodies"
    );
    p.run.unwrap().stop();
}

#[test]
fn certificates_self_signed_stable_and_files_reloaded_live() {
    // Self-signed: generated once, key 0600, the same after a restart.
    let mut p = Proxied::start("");
    let first = served_serial(p.https);
    let key = p.inst.root.join("secrets/tls/self-signed.key");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    p.stop();
    p.start_again();
    assert_eq!(
        served_serial(p.https),
        first,
        "a new certificate after a restart"
    );
    p.stop();

    // Files: changed on disk, picked up by new connections; an open one stays up.
    let certs = p.inst.dir.path().join("certs");
    std::fs::create_dir_all(&certs).unwrap();
    let issue = |n: u32| -> String {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        params.serial_number = Some(rcgen::SerialNumber::from(vec![0x10, n as u8]));
        let cert = params.self_signed(&key).unwrap();
        // Written the way a renewal tool does it: new files renamed into place.
        std::fs::write(certs.join("new.pem"), cert.pem()).unwrap();
        std::fs::write(certs.join("new.key"), key.serialize_pem()).unwrap();
        std::fs::rename(certs.join("new.key"), certs.join("key.pem")).unwrap();
        std::fs::rename(certs.join("new.pem"), certs.join("cert.pem")).unwrap();
        serial_of(cert.der())
    };
    let serial_a = issue(1);
    p.inst.config_file(
        "95_tls.toml",
        &format!(
            "[proxy.tls]\ncert = \"{0}/cert.pem\"\nkey = \"{0}/key.pem\"\nreload_interval = \"200ms\"\n",
            certs.display()
        ),
    );
    p.start_again();
    assert_eq!(served_serial(p.https), serial_a);
    let mut old = tls(p.https, None);
    assert_eq!(request(&mut old, "/hello").0, 200);
    let serial_b = issue(2);
    let deadline = Instant::now() + Duration::from_secs(10);
    while served_serial(p.https) != serial_b {
        assert!(
            Instant::now() < deadline,
            "the new certificate was not picked up"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // The connection opened before the change still works, with the old certificate.
    assert_eq!(
        serial_of(&old.conn.peer_certificates().unwrap()[0]),
        serial_a
    );
    assert_eq!(request(&mut old, "/hello"), (200, "app: /hello\n".into()));
    // A broken write (a key that does not match) is not taken; the last good one stays.
    std::fs::write(
        certs.join("key.pem"),
        rcgen::KeyPair::generate().unwrap().serialize_pem(),
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(served_serial(p.https), serial_b);
    assert_eq!(
        p.inst.status()["components"]["proxy"]["certificate"]["serial"]
            .as_str()
            .unwrap()
            .replace(':', ""),
        serial_b.replace(':', "")
    );
    let log = p.stop();
    assert!(log.contains("cannot be used yet"), "{log}");
}

/// pebble (a test ACME CA) with a TLS certificate of ours, validating on `http_port`.
struct Pebble {
    child: std::process::Child,
    directory: String,
    ca: PathBuf,
}

impl Pebble {
    fn start(dir: &Path, http_port: u16) -> Pebble {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "pebble test root");
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        let cert = params.signed_by(&key, &ca, &ca_key).unwrap();
        std::fs::write(dir.join("pebble-ca.pem"), ca.pem()).unwrap();
        std::fs::write(dir.join("pebble-cert.pem"), cert.pem()).unwrap();
        std::fs::write(dir.join("pebble-key.pem"), key.serialize_pem()).unwrap();
        let (port, mgmt) = (free_port(), free_port());
        std::fs::write(
            dir.join("pebble.json"),
            serde_json::json!({"pebble": {
                "listenAddress": format!("127.0.0.1:{port}"),
                "managementListenAddress": format!("127.0.0.1:{mgmt}"),
                "certificate": dir.join("pebble-cert.pem"),
                "privateKey": dir.join("pebble-key.pem"),
                "httpPort": http_port,
                "tlsPort": free_port(),
                "ocspResponderURL": "",
                "externalAccountBindingRequired": false
            }})
            .to_string(),
        )
        .unwrap();
        let child = Command::new("pebble")
            .arg("-config")
            .arg(dir.join("pebble.json"))
            .env("PEBBLE_VA_NOSLEEP", "1")
            .env("PEBBLE_WFE_NONCEREJECT", "0")
            .stdout(std::fs::File::create(dir.join("pebble.log")).unwrap())
            .stderr(Stdio::null())
            .spawn()
            .expect("pebble (scripts/install-deps.sh installs it)");
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "pebble did not listen");
            std::thread::sleep(Duration::from_millis(50));
        }
        Pebble {
            child,
            directory: format!("https://localhost:{port}/dir"),
            ca: dir.join("pebble-ca.pem"),
        }
    }
}

impl Drop for Pebble {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn acme_issuance_and_renewal_against_pebble() {
    let mut p = Proxied::config("");
    let pebble = Pebble::start(p.inst.dir.path(), p.http);
    // Renew whenever checked (the certificate always "expires within" renew_before).
    p.inst.config_file(
        "95_acme.toml",
        &format!(
            "[proxy.acme]\ndirectory = \"{}\"\nca_bundle = \"{}\"\ncontact = [\"mailto:admin@example.org\"]\ncheck_interval = \"2s\"\nrenew_before = \"100000d\"\n",
            pebble.directory,
            pebble.ca.display()
        ),
    );
    p.start_again();
    let self_signed = served_serial(p.https);
    let wait_for_new = |previous: &str| -> String {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let s = tls(p.https, None);
            let der = s.conn.peer_certificates().unwrap()[0].to_vec();
            let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
            if cert.raw_serial_as_string() != previous {
                assert!(
                    cert.issuer().to_string().contains("Pebble"),
                    "issued by {}",
                    cert.issuer()
                );
                return cert.raw_serial_as_string();
            }
            assert!(
                Instant::now() < deadline,
                "no certificate from pebble:\n{}",
                p.run.as_ref().unwrap().log_text()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    let issued = wait_for_new(&self_signed);
    let renewed = wait_for_new(&issued);
    assert_ne!(renewed, self_signed);
    let cert = p.inst.status()["components"]["proxy"]["certificate"].clone();
    assert_eq!(cert["source"], "acme");
    assert!(
        cert["issuer"].as_str().unwrap().contains("Pebble"),
        "{cert}"
    );
    // The application was never asked: the challenges were answered by regobox.
    let log = p.stop();
    assert!(
        log.lines()
            .any(|l| l.contains("/.well-known/acme-challenge/")
                && l.contains("status=200")
                && l.contains("upstream_ms=\"-\"")),
        "{log}"
    );
    // Kept on the volume (key 0600) and used at the next start without a new order.
    use std::os::unix::fs::PermissionsExt;
    let key = p.inst.root.join("secrets/tls/acme.key");
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
}

#[test]
fn slow_silent_and_idle_connections_are_closed() {
    let mut p = Proxied::start(
        "header_timeout = \"1s\"\nidle_timeout = \"2s\"\nhandshake_timeout = \"1s\"",
    );
    let closed_within = |mut s: TcpStream, drip: bool| -> Duration {
        let start = Instant::now();
        s.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let mut buf = [0u8; 1024];
        loop {
            assert!(start.elapsed() < Duration::from_secs(15), "never closed");
            if drip {
                // One more header line now and then: a slowloris.
                if s.write_all(b"X-Drip: 1\r\n").is_err() {
                    return start.elapsed();
                }
            }
            match s.read(&mut buf) {
                Ok(0) => return start.elapsed(),
                Ok(_) => {} // an error response before the close is fine
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
                Err(_) => return start.elapsed(),
            }
        }
    };
    // Slowloris on the plain port.
    let mut s = TcpStream::connect(("127.0.0.1", p.http)).unwrap();
    s.write_all(b"GET /job/x HTTP/1.1\r\nHost: localhost\r\n")
        .unwrap();
    let t = closed_within(s, true);
    assert!(t < Duration::from_secs(5), "slowloris kept for {t:?}");
    // Silent TCP on both ports (no TLS ClientHello, no request line).
    for port in [p.http, p.https] {
        let t = closed_within(TcpStream::connect(("127.0.0.1", port)).unwrap(), false);
        assert!(
            t < Duration::from_secs(5),
            "silent connection on {port} kept for {t:?}"
        );
    }
    // TLS done, h2 chosen, and the preface never comes.
    let conn = rustls::ClientConnection::new(
        client_config(None, &[b"h2"]),
        "localhost".try_into().unwrap(),
    )
    .unwrap();
    let tcp = TcpStream::connect(("127.0.0.1", p.https)).unwrap();
    let mut s = rustls::StreamOwned::new(conn, tcp);
    while s.conn.is_handshaking() {
        s.conn.complete_io(&mut s.sock).unwrap();
    }
    assert_eq!(s.conn.alpn_protocol(), Some(&b"h2"[..]));
    let start = Instant::now();
    s.sock
        .set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    let mut buf = [0u8; 256];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(_) => {} // the server's SETTINGS
        }
    }
    let t = start.elapsed();
    assert!(t < Duration::from_secs(6), "no preface, kept for {t:?}");
    // An idle keep-alive connection is closed after idle_timeout, a busy one is not.
    let mut s = tls(p.https, Some(&p.self_signed()));
    assert_eq!(request(&mut s, "/slow?s=3").0, 200); // longer than idle_timeout: in flight
    let start = Instant::now();
    let mut buf = [0u8; 1];
    s.sock
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let _ = s.read(&mut buf);
    let t = start.elapsed();
    assert!(
        t >= Duration::from_millis(1500) && t < Duration::from_secs(5),
        "idle keep-alive closed after {t:?}"
    );
    // The slowloris's request is logged 408 (begun, not finished), as nginx logs it; the
    // connections that sent nothing and the idle one are not requests.
    let log = p.stop();
    let unread: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(" INFO access ") && l.contains(" version=- "))
        .collect();
    assert_eq!(unread.len(), 1, "{log}");
    assert!(unread[0].contains(" status=408 "), "{}", unread[0]);
    assert_eq!(access_lines(&log, "/slow?s=3").len(), 1, "{log}");
}

#[test]
fn bad_gateway_unavailable_while_starting_and_graceful_stop() {
    // The application is slow to become ready: 503 with Retry-After meanwhile.
    let p = Proxied::config("grace = \"10s\"");
    p.inst.config_file(
        "96_slow_ready.toml",
        &format!(
            "[services.app]\ncommand = [\"sh\", \"-c\", \"sleep 3; exec python3 {UPSTREAM} {}\"]\n",
            p.app
        ),
    );
    let mut p = p;
    let mut run = p.launch();
    let out = p.curl(&["-D", "-", &p.https_url("/")]);
    let text = stdout(&out);
    assert!(text.starts_with("HTTP/2 503"), "{text}");
    assert!(text.contains("retry-after: 5"), "{text}");
    assert!(text.contains("<h1>503"), "{text}");
    run.wait_for_log("regobox is ready", Duration::from_secs(60));
    assert_eq!(stdout(&p.curl(&[&p.https_url("/x")])), "app: /x\n");

    // Graceful stop: an in-flight request finishes; the app is stopped after it.
    let (connected, is_connected) = std::sync::mpsc::channel();
    let slow = {
        let https = p.https;
        let ca = p.self_signed();
        std::thread::spawn(move || {
            let mut s = tls(https, Some(&ca));
            connected.send(()).unwrap();
            request(&mut s, "/slow?s=2")
        })
    };
    is_connected.recv().unwrap();
    // The request on its way to the application (it takes 2 s there).
    std::thread::sleep(Duration::from_millis(500));
    run.signal(nix::sys::signal::Signal::SIGTERM);
    // No new connections once the stop has begun (well before the slow request ends).
    p.inst
        .wait_until("the listener to close", Duration::from_secs(1), || {
            TcpStream::connect(("127.0.0.1", p.https)).is_err()
        });
    assert_eq!(slow.join().unwrap(), (200, "slow done\n".into()));
    let status = run.wait(Duration::from_secs(30));
    assert!(status.success());
    let log = run.log_text();
    let proxy_stopped = log.find("proxy stopped").expect("proxy stopped");
    let app_stopping = log.find("stopping service").expect("stopping service");
    assert!(
        proxy_stopped < app_stopping,
        "the app was stopped before the proxy:\n{log}"
    );
    let served = log
        .find("path=/slow?s=2")
        .expect("the slow request in the access log");
    assert!(served < app_stopping, "{log}");

    // The application does not answer (its process runs, its port is closed): 502.
    let mut p = Proxied::config("");
    std::fs::remove_file(p.inst.config_dir.join("90_proxy.toml")).unwrap();
    p.inst.config_file(
        "90_proxy.toml",
        &format!(
            "[proxy]\nlisten = \"127.0.0.1\"\nupstream = \"http://127.0.0.1:{}\"\n[services.app]\ncommand = [\"sleep\", \"1000\"]\n",
            p.app
        ),
    );
    p.start_again();
    let out = p.curl(&["-D", "-", &p.https_url("/")]);
    assert!(stdout(&out).starts_with("HTTP/2 502"), "{}", stdout(&out));
    assert!(stdout(&out).contains("<h1>502 Bad gateway</h1>"));
    p.stop();
}

#[test]
fn without_an_application_the_landing_page_answers() {
    let mut p = Proxied::config("");
    std::fs::remove_file(p.inst.config_dir.join("90_proxy.toml")).unwrap();
    p.inst
        .config_file("90_proxy.toml", "[proxy]\nlisten = \"127.0.0.1\"\n");
    p.start_again();
    let out = p.curl(&["-D", "-", &p.https_url("/")]);
    let page = stdout(&out);
    assert!(page.starts_with("HTTP/2 200"), "{page}");
    // Issue 16, item 11: only `/` is the landing page.
    for other in ["/favicon.ico", "/anything"] {
        let out = p.curl(&["-D", "-", "-o", "/dev/null", &p.https_url(other)]);
        assert!(
            stdout(&out).starts_with("HTTP/2 404"),
            "{other}: {}",
            stdout(&out)
        );
    }
    assert!(page.contains("regobox is running"), "{page}");
    assert!(page.contains("Ready: <b>true</b>"), "{page}");
    assert!(
        page.contains("<td>postgres</td><td>database</td><td>ready</td>"),
        "{page}"
    );
    assert!(
        page.contains("self-signed certificate for CN=localhost"),
        "{page}"
    );
    // Issue 17: what an operator needs first, about this instance, not a generic container.
    let root = p.inst.root.display().to_string();
    for needle in [
        "(expires in 82".to_string(),
        " free of ".to_string(),
        format!("Backups in {root}/backups: last none yet; none scheduled"),
        format!("its files under <code>{root}/files</code>"),
        "\"http.server\", \"8500\"".to_string(),
        "apt-get install -y python3".to_string(),
    ] {
        assert!(page.contains(&needle), "{needle:?} not in {page}");
    }
    assert!(!page.contains("<code>/volumes/files</code>"), "{page}");
    let uptime = page
        .split("up ")
        .nth(1)
        .unwrap()
        .split(" &middot;")
        .next()
        .unwrap();
    assert!(
        uptime.ends_with(" s") && !uptime.contains('.'),
        "uptime {uptime:?}"
    );
    // Every file under secrets/ is 0600, the generated certificate too (a restore of regobox's
    // own archive would otherwise warn that it narrowed a mode).
    for name in ["self-signed.pem", "self-signed.key"] {
        use std::os::unix::fs::PermissionsExt;
        let path = p.inst.root.join("secrets/tls").join(name);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{}", path.display());
    }
    p.inst.ok(&["backup"]);
    let page = stdout(&p.curl(&[&p.https_url("/")]));
    assert!(
        page.contains(&format!(
            "Backups in {root}/backups: last {root}/backups/regobox-"
        )),
        "{page}"
    );
    // Port 80 still redirects to it.
    let out = p.curl(&["-D", "-", "-o", "/dev/null", &p.http_url("/")]);
    assert!(stdout(&out).starts_with("HTTP/1.1 301"), "{}", stdout(&out));
    p.stop();
}

#[test]
fn static_directories_with_types_validators_and_ranges() {
    let dir = tempdir();
    std::fs::create_dir_all(dir.path().join("css")).unwrap();
    std::fs::write(dir.path().join("css/site.css"), "body { color: red }\n").unwrap();
    std::fs::write(dir.path().join("index.html"), "<h1>home</h1>\n").unwrap();
    let bytes: Vec<u8> = (0..=255u8).cycle().take(100_000).collect();
    std::fs::write(dir.path().join("data.bin"), &bytes).unwrap();
    let fifo =
        std::ffi::CString::new(dir.path().join("fifo").as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
    let p = Proxied::start(&format!(
        "[[proxy.static]]\nprefix = \"/static/\"\ndir = \"{}\"\n",
        dir.path().display()
    ));
    let head = |args: &[&str]| stdout(&p.curl(&[&["-D", "-", "-o", "/dev/null"], args].concat()));
    let h = head(&[&p.https_url("/static/css/site.css")]);
    assert!(h.starts_with("HTTP/2 200"), "{h}");
    assert!(h.contains("content-type: text/css"), "{h}");
    let etag = h
        .lines()
        .find_map(|l| l.strip_prefix("etag: "))
        .unwrap()
        .trim()
        .to_string();
    assert!(h.contains("last-modified: "), "{h}");
    let h = head(&[
        "-H",
        &format!("If-None-Match: {etag}"),
        &p.https_url("/static/css/site.css"),
    ]);
    assert!(h.starts_with("HTTP/2 304"), "{h}");
    let out = p.curl(&["-r", "1000-1999", &p.https_url("/static/data.bin")]);
    assert_eq!(out.stdout, bytes[1000..2000].to_vec());
    let h = head(&["-r", "1000-1999", &p.https_url("/static/data.bin")]);
    assert!(h.starts_with("HTTP/2 206"), "{h}");
    assert!(h.contains("content-range: bytes 1000-1999/100000"), "{h}");
    let h = head(&["-r", "200000-", &p.https_url("/static/data.bin")]);
    assert!(h.starts_with("HTTP/2 416"), "{h}");
    assert_eq!(
        stdout(&p.curl(&[&p.https_url("/static/")])),
        "<h1>home</h1>\n"
    );
    // Dot segments are removed before matching (issue 16, item 10): this is `/etc/passwd`,
    // outside the prefix, so the application answers it; nothing is read from the disk.
    assert_eq!(
        stdout(&p.curl(&["--path-as-is", &p.https_url("/static/../../etc/passwd")])),
        "app: /etc/passwd\n"
    );
    // A FIFO is not a file: not found, at once (an open that waited for a writer would hold
    // a thread for ever).
    for bad in [
        "/static/%2e%2e/%2e%2e/etc/passwd",
        "/static/nope",
        "/static/fifo",
    ] {
        let h = head(&["--path-as-is", "-m", "20", &p.https_url(bad)]);
        assert!(h.starts_with("HTTP/2 404"), "{bad}: {h}");
    }
    // Outside the prefix, the application answers.
    assert_eq!(stdout(&p.curl(&[&p.https_url("/other")])), "app: /other\n");
    p.run.unwrap().stop();
}

/// Attack (seventh session): whoever writes a static directory (the application, which may be
/// compromised) swaps a directory on a served path for a link to a directory outside, over and
/// over (an atomic exchange of the two names), while a client asks for the file under it. A
/// check of the path before the open leaves a window; what is served is judged on what was
/// opened, so no answer ever holds the file outside.
#[test]
fn a_link_swapped_in_while_a_static_file_is_served_never_leads_outside() {
    let dir = tempdir();
    let statics = dir.path().join("static");
    let outside = dir.path().join("outside");
    std::fs::create_dir_all(statics.join("a")).unwrap();
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(statics.join("a/x"), "inside\n").unwrap();
    std::fs::write(outside.join("x"), "OUTSIDE\n").unwrap();
    std::os::unix::fs::symlink(&outside, statics.join("b")).unwrap();
    let p = Proxied::start(&format!(
        "[[proxy.static]]\nprefix = \"/static/\"\ndir = \"{}\"\n",
        statics.display()
    ));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let swapper = {
        let stop = stop.clone();
        let (a, b) = (
            std::ffi::CString::new(statics.join("a").as_os_str().as_encoded_bytes()).unwrap(),
            std::ffi::CString::new(statics.join("b").as_os_str().as_encoded_bytes()).unwrap(),
        );
        std::thread::spawn(move || {
            let mut swaps = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                // SAFETY: two NUL-terminated paths; renameat2 only reads them.
                let r = unsafe {
                    libc::renameat2(
                        libc::AT_FDCWD,
                        a.as_ptr(),
                        libc::AT_FDCWD,
                        b.as_ptr(),
                        libc::RENAME_EXCHANGE,
                    )
                };
                assert_eq!(r, 0, "{}", std::io::Error::last_os_error());
                swaps += 1;
            }
            swaps
        })
    };
    let urls = dir.path().join("urls");
    let url = p.https_url("/static/a/x");
    std::fs::write(&urls, format!("url = \"{url}\"\n").repeat(3000)).unwrap();
    let out = p.curl(&["-K", urls.to_str().unwrap()]);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let swaps = swapper.join().unwrap();
    let body = stdout(&out);
    assert!(swaps > 1000, "{swaps} swaps");
    assert!(
        body.matches("inside").count() > 0,
        "no request was served while the directory was in place: {body}"
    );
    assert_eq!(body.matches("OUTSIDE").count(), 0, "served from outside");
    // The directory itself replaced with a link to `/` by whoever owns the one above it: the
    // directory is the one resolved when the proxy started.
    std::fs::rename(&statics, dir.path().join("static.old")).unwrap();
    std::os::unix::fs::symlink("/", &statics).unwrap();
    let h = stdout(&p.curl(&[
        "-D",
        "-",
        "-o",
        "/dev/null",
        &p.https_url("/static/etc/hostname"),
    ]));
    assert!(h.starts_with("HTTP/2 404"), "{h}");
    p.run.unwrap().stop();
}

/// Attack (seventh session, a second attacker): the application, in a mount namespace of its
/// own (`unshare -Urm`, as an unprivileged user), bind-mounts a root-only directory under the
/// static directory *in its namespace*, and links a static name to it through
/// `/proc/<pid>/root`: the file opened showed a path inside the directory, and root served the
/// root-only file. The open is beneath the directory, without magic links: 404. (A magic link
/// to a file inside is refused as well.)
#[test]
fn a_link_through_another_mount_namespace_serves_nothing() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempdir();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let statics = dir.path().join("static");
    let secret = dir.path().join("secret");
    std::fs::create_dir_all(&statics).unwrap();
    std::fs::create_dir_all(&secret).unwrap();
    std::fs::write(secret.join("key"), "ROOT-ONLY\n").unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o700)).unwrap();
    std::fs::write(statics.join("inside.txt"), "inside\n").unwrap();
    std::os::unix::fs::symlink(
        format!("/proc/self/root{}/inside.txt", statics.display()),
        statics.join("magic"),
    )
    .unwrap();
    // The application's part: the static directory is its own.
    let nobody = 65534;
    std::os::unix::fs::chown(&statics, Some(nobody), Some(nobody)).unwrap();
    let p = Proxied::start(&format!(
        "[[proxy.static]]\nprefix = \"/static/\"\ndir = \"{}\"\n",
        statics.display()
    ));
    let status = |path: &str| {
        let h = stdout(&p.curl(&["-D", "-", "-o", "/dev/null", &p.https_url(path)]));
        h.lines().next().unwrap_or("").to_string()
    };
    assert!(status("/static/inside.txt").starts_with("HTTP/2 200"));
    assert!(status("/static/magic").starts_with("HTTP/2 404"));
    let script = format!(
        "mkdir -p {s}/s && mount --bind {secret} {s}/s && ln -sfn /proc/$$/root{s}/s/key {s}/x && echo up && exec sleep 20",
        s = statics.display(),
        secret = secret.display()
    );
    let mut ns = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .args(["unshare", "-Urm", "sh", "-c", &script])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut up = [0u8; 3];
    let mounted = ns.stdout.as_mut().unwrap().read_exact(&mut up).is_ok();
    if mounted {
        let out = p.curl(&[&p.https_url("/static/x")]);
        assert!(
            !stdout(&out).contains("ROOT-ONLY"),
            "served the root-only file"
        );
        assert!(status("/static/x").starts_with("HTTP/2 404"));
    } else {
        eprintln!(
            "skipped the mount namespace part: this machine refuses unprivileged user namespaces"
        );
    }
    let _ = ns.kill();
    let _ = ns.wait();
    p.run.unwrap().stop();
}

#[test]
fn a_port_below_1024_without_the_capability_names_the_key() {
    let mut p = Proxied::config("");
    p.https = 443;
    p.set_ports();
    let inner = p.inst.command(&["run"]);
    let mut cmd = Command::new("setpriv");
    cmd.args([
        "--bounding-set",
        "-net_bind_service",
        "--inh-caps",
        "-net_bind_service",
    ])
    .arg(inner.get_program())
    .args(inner.get_args());
    for (k, v) in inner.get_envs() {
        match v {
            Some(v) => cmd.env(k, v),
            None => cmd.env_remove(k),
        };
    }
    let out = cmd.stdin(Stdio::null()).output().unwrap();
    assert!(!out.status.success());
    let err = stderr(&out) + &stdout(&out);
    assert!(err.contains("proxy.https_port"), "{err}");
    assert!(err.contains("443"), "{err}");
    assert!(err.contains("permission denied"), "{err}");
}

#[test]
fn a_restore_in_progress_answers_503_with_retry_after() {
    let mut p = Proxied::start("");
    p.inst.ok(&["backup"]);
    let archive = archives_in(&p.inst.root.join("backups"))
        .pop()
        .expect("an archive");
    // Ask continuously while the running regobox restores.
    let asking = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let poller = {
        let (asking, ca, ports) = (asking.clone(), p.self_signed(), [p.https, p.http]);
        let url = p.https_url("/hello");
        std::thread::spawn(move || {
            let mut seen = Vec::new();
            while asking.load(std::sync::atomic::Ordering::Relaxed) {
                let out = curl(&ca, &ports, &["-D", "-", &url]);
                seen.push(stdout(&out));
                std::thread::sleep(Duration::from_millis(20));
            }
            seen
        })
    };
    let out = p
        .inst
        .output(&["restore", "--force", archive.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    p.inst
        .wait_until("ready again", Duration::from_secs(30), || {
            p.inst.health_get("/readyz").0 == 200
        });
    std::thread::sleep(Duration::from_millis(300));
    asking.store(false, std::sync::atomic::Ordering::Relaxed);
    let seen = poller.join().unwrap();
    let during = seen
        .iter()
        .find(|r| r.starts_with("HTTP/2 503") && r.contains("Maintenance in progress"))
        .unwrap_or_else(|| panic!("no maintenance 503 among {} answers", seen.len()));
    assert!(during.contains("retry-after: 5"), "{during}");
    assert!(
        seen.last().unwrap().starts_with("HTTP/2 200"),
        "{}",
        seen.last().unwrap()
    );
    p.stop();
}

/// Issue 16, item 6: HEAD over HTTP/2 on regobox's own pages (the landing page, a 502) answers
/// headers only, with the page's length; it used to send the page's bytes, which HTTP/2 forbids
/// after HEAD (curl: exit 92, stream PROTOCOL_ERROR).
#[test]
fn head_over_http2_on_regoboxs_own_pages_has_no_body() {
    let mut p = Proxied::config("");
    std::fs::remove_file(p.inst.config_dir.join("90_proxy.toml")).unwrap();
    p.inst
        .config_file("90_proxy.toml", "[proxy]\nlisten = \"127.0.0.1\"\n");
    p.start_again();
    let get = p.curl(&["--http2", &p.https_url("/")]);
    assert!(get.status.success(), "{}", stderr(&get));
    let length = get.stdout.len();
    let head = p.curl(&["--http2", "-I", &p.https_url("/")]);
    assert!(
        head.status.success(),
        "curl: {:?} {}",
        head.status.code(),
        stderr(&head)
    );
    let text = stdout(&head);
    assert!(text.starts_with("HTTP/2 200"), "{text}");
    assert!(
        text.contains(&format!("content-length: {length}")),
        "{text} (GET gave {length} bytes)"
    );
    p.stop();

    // A 502 (no application answering).
    let mut p = Proxied::config("");
    std::fs::remove_file(p.inst.config_dir.join("90_proxy.toml")).unwrap();
    p.inst.config_file(
        "90_proxy.toml",
        &format!(
            "[proxy]\nlisten = \"127.0.0.1\"\nupstream = \"http://127.0.0.1:{}\"\n[services.app]\ncommand = [\"sleep\", \"1000\"]\n",
            p.app
        ),
    );
    p.start_again();
    let head = p.curl(&["--http2", "-I", &p.https_url("/x")]);
    assert!(
        head.status.success(),
        "curl: {:?} {}",
        head.status.code(),
        stderr(&head)
    );
    assert!(stdout(&head).starts_with("HTTP/2 502"), "{}", stdout(&head));
    p.stop();
}

/// Issue 16, item 8: an application answering HTTP/1.0 (Python's `http.server`) does not make
/// regobox answer HTTP/1.0 to an HTTP/1.1 client.
#[test]
fn the_applications_http_version_does_not_leak_to_clients() {
    let site = tempdir();
    std::fs::write(site.path().join("index.html"), "<h1>old</h1>\n").unwrap();
    let mut p = Proxied::config("");
    std::fs::remove_file(p.inst.config_dir.join("90_proxy.toml")).unwrap();
    p.inst.config_file(
        "90_proxy.toml",
        &format!(
            "[proxy]\nlisten = \"127.0.0.1\"\nupstream = \"http://127.0.0.1:{app}\"\n\
             [services.app]\ncommand = [\"python3\", \"-m\", \"http.server\", \"{app}\", \"--bind\", \"127.0.0.1\", \"--directory\", \"{dir}\"]\n\
             ready = {{ tcp = {app} }}\n",
            app = p.app,
            dir = site.path().display()
        ),
    );
    p.start_again();
    let out = p.curl(&["--http1.1", "-D", "-", &p.https_url("/")]);
    let text = stdout(&out);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.contains("<h1>old</h1>"), "{text}");
    p.stop();
}

/// A request whose client leaves before the application answers still has its access line:
/// status 499 (nginx's), no bytes, and the time the application had it; over HTTP/1.1 (the
/// connection closed) and HTTP/2 (the stream reset, curl giving up).
#[test]
fn a_request_whose_client_leaves_before_the_answer_is_logged_499() {
    let mut p = Proxied::start("");
    let mut s = tls(p.https, Some(&p.self_signed()));
    s.write_all(b"GET /slow?s=2&by=h1 HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .unwrap();
    s.flush().unwrap();
    std::thread::sleep(Duration::from_millis(500));
    drop(s);
    let out = p.curl(&[
        "--http2",
        "--max-time",
        "0.5",
        &p.https_url("/slow?s=2&by=h2"),
    ]);
    assert_eq!(out.status.code(), Some(28), "{}", stderr(&out));
    // Both requests answered by the application meanwhile (nobody left to take it).
    std::thread::sleep(Duration::from_secs(2));
    let log = p.stop();
    for by in ["h1", "h2"] {
        let lines = access_lines(&log, &format!("/slow?s=2&by={by}"));
        assert_eq!(lines.len(), 1, "{by}: {log}");
        assert!(lines[0].contains("status=499"), "{by}: {}", lines[0]);
        assert!(lines[0].contains("bytes=0"), "{by}: {}", lines[0]);
        assert!(
            !lines[0].contains("upstream_ms=\"-\""),
            "{by}: {}",
            lines[0]
        );
    }
}

/// Issue 16, item 7: the redirect to https keeps the public port (and host) of the
/// configuration: behind `-p 38080:80 -p 38443:443` it names 38443. Item 12: HSTS, off by
/// default, sent on https only when configured.
#[test]
fn redirects_name_the_public_https_port_and_hsts_is_opt_in() {
    let mut p = Proxied::start("");
    let out = p.curl(&["-D", "-", "-o", "/dev/null", &p.https_url("/")]);
    assert!(
        !stdout(&out)
            .to_lowercase()
            .contains("strict-transport-security"),
        "{}",
        stdout(&out)
    );
    p.stop();

    let mut p = Proxied::start(
        "public_https_port = 38443\npublic_host = \"lab.example.org\"\nhsts_max_age = \"180d\"\n",
    );
    let out = p.curl(&["-D", "-", "-o", "/dev/null", &p.http_url("/x?y=1")]);
    let text = stdout(&out);
    assert!(text.starts_with("HTTP/1.1 301"), "{text}");
    assert!(
        text.contains("location: https://lab.example.org:38443/x?y=1"),
        "{text}"
    );
    let out = p.curl(&["-D", "-", "-o", "/dev/null", &p.https_url("/")]);
    assert!(
        stdout(&out).contains("strict-transport-security: max-age=15552000\r\n"),
        "{}",
        stdout(&out)
    );
    // Never on plain HTTP (a plain path is proxied, not redirected).
    let out = p.curl(&["-D", "-", "-o", "/dev/null", &p.http_url("/job/1")]);
    assert!(
        !stdout(&out)
            .to_lowercase()
            .contains("strict-transport-security"),
        "{}",
        stdout(&out)
    );
    p.stop();
}

/// Issue 16, item 11: `Transfer-Encoding: chunked, chunked` is refused, a method regobox does not
/// know is refused (501) rather than forwarded, and `OPTIONS *` on port 80 is answered, not
/// redirected to `https://host:port*`.
#[test]
fn looser_requests_are_refused_or_answered() {
    let mut p = Proxied::start("");
    let raw = |port: u16, request: &str| -> String {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(request.as_bytes()).unwrap();
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        String::from_utf8_lossy(&out).into_owned()
    };
    let chunked_twice = raw(
        p.http,
        "POST /job/1 HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked, chunked\r\nConnection: close\r\n\r\n0\r\n\r\n",
    );
    assert!(chunked_twice.starts_with("HTTP/1.1 400"), "{chunked_twice}");
    let long_method = format!(
        "{} /job/1 HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
        "X".repeat(7000)
    );
    let answer = raw(p.http, &long_method);
    assert!(
        answer.starts_with("HTTP/1.1 501"),
        "{}",
        &answer[..answer.len().min(300)]
    );
    let answer = raw(
        p.http,
        "BREW /job/1 HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    );
    assert!(answer.starts_with("HTTP/1.1 501"), "{answer}");
    let answer = raw(
        p.http,
        "OPTIONS * HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    );
    assert!(answer.starts_with("HTTP/1.1 204"), "{answer}");
    assert!(!answer.to_lowercase().contains("location:"), "{answer}");
    // `*` is for OPTIONS only (the attacker's finding: `GET *` got 204 too).
    let answer = raw(
        p.http,
        "GET * HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    );
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    // What is known still goes through.
    let answer = raw(
        p.http,
        "PATCH /job/1 HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    );
    assert!(!answer.starts_with("HTTP/1.1 501"), "{answer}");
    p.stop();
}

/// Issue 16, item 10: `plain_http_paths` is matched on the path without dot segments, and that
/// path is what is forwarded: `/job/../admin` is `/admin`, redirected to https, never served in
/// plain HTTP.
#[test]
fn plain_http_paths_match_the_path_without_dot_segments() {
    let mut p = Proxied::start("");
    let out = p.curl(&[
        "--path-as-is",
        "-D",
        "-",
        "-o",
        "/dev/null",
        &p.http_url("/job/../admin"),
    ]);
    let text = stdout(&out);
    assert!(text.starts_with("HTTP/1.1 301"), "{text}");
    assert!(
        text.contains(&format!(
            "location: https://localhost:{}/admin\r\n",
            p.https
        )),
        "{text}"
    );
    // Attack (fresh-context attacker): what an application might read as another path is
    // redirected, never served in plain HTTP.
    for doubtful in [
        "/job/%2e%2e/admin",
        "/job/.%2E/admin",
        "/job/..%2fadmin",
        "/job/..;/admin",
    ] {
        let out = p.curl(&[
            "--path-as-is",
            "-D",
            "-",
            "-o",
            "/dev/null",
            &p.http_url(doubtful),
        ]);
        assert!(
            stdout(&out).starts_with("HTTP/1.1 301"),
            "{doubtful}: {}",
            stdout(&out)
        );
    }
    let out = p.curl(&["--path-as-is", &p.http_url("/job/./7/../8")]);
    assert_eq!(stdout(&out).trim_end(), "app: /job/8", "{}", stderr(&out));
    p.stop();
}

/// Issue 16, item 9: a response head is limited by its size (64 KiB), not by hyper's default
/// of 100 fields: 300 small fields pass; a 100 KiB head is a 502.
#[test]
fn many_response_fields_pass_and_only_a_huge_head_is_refused() {
    let server = r#"
import sys
from http.server import BaseHTTPRequestHandler, HTTPServer
class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        n, size = (300, 20) if self.path == "/many" else (50, 2048)
        self.send_response(200)
        for i in range(n):
            self.send_header("x-field-%d" % i, "v" * size)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")
    def log_message(self, *a):
        pass
HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"#;
    let mut p = Proxied::config("");
    let script = p.inst.dir.path().join("fields.py");
    std::fs::write(&script, server).unwrap();
    std::fs::remove_file(p.inst.config_dir.join("90_proxy.toml")).unwrap();
    p.inst.config_file(
        "90_proxy.toml",
        &format!(
            "[proxy]\nlisten = \"127.0.0.1\"\nupstream = \"http://127.0.0.1:{app}\"\n\
             [services.app]\ncommand = [\"python3\", \"{script}\", \"{app}\"]\nready = {{ tcp = {app} }}\n",
            app = p.app,
            script = script.display()
        ),
    );
    p.start_again();
    let out = p.curl(&["-D", "-", &p.https_url("/many")]);
    let text = stdout(&out);
    assert!(
        text.starts_with("HTTP/2 200"),
        "{}",
        &text[..text.len().min(400)]
    );
    assert!(text.contains("x-field-299: "), "all 300 fields forwarded");
    let out = p.curl(&["-D", "-", "-o", "/dev/null", &p.https_url("/huge")]);
    assert!(stdout(&out).starts_with("HTTP/2 502"), "{}", stdout(&out));
    p.stop();
}

/// Issue 16, item 3: malformed request bodies (a bare LF in chunked framing, a chunk size that
/// overflows, a 100 KB chunk extension) are the client's fault: 400, closed, and no WARN line
/// blaming the application (at most one line per interval, whatever the number of requests).
#[test]
fn malformed_request_bodies_are_the_clients_fault() {
    let mut p = Proxied::start("");
    let raw = |request: &[u8]| -> String {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", p.http)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let _ = s.write_all(request);
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        String::from_utf8_lossy(&out).into_owned()
    };
    let head = b"POST /job/1 HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n";
    let mut extension = b"5;".to_vec();
    extension.extend(vec![b'a'; 100_000]);
    extension.extend(b"\r\nhello\r\n0\r\n\r\n");
    let bodies: Vec<Vec<u8>> = vec![
        b"5\nhello\r\n0\r\n\r\n".to_vec(),
        b"fffffffffffffffffffffff\r\nhello\r\n0\r\n\r\n".to_vec(),
        extension,
    ];
    for _ in 0..3 {
        for body in &bodies {
            let answer = raw(&[&head[..], body].concat());
            assert!(
                answer.starts_with("HTTP/1.1 400"),
                "{:?}: {}",
                String::from_utf8_lossy(&body[..body.len().min(30)]),
                &answer[..answer.len().min(300)]
            );
        }
    }
    let log = p.stop();
    assert!(!log.contains("upstream request failed"), "{log}");
    assert!(
        log.matches("answered 400").count() <= 1,
        "one line at most within the interval:\n{log}"
    );
}

/// Issue 16, item 1 (in part): deadlines on progress, not on the total. With both timeouts at
/// 1 s: an application that never answers gets 504; a response body that stalls is cut; a
/// request body that stops arriving gets 408 and the connection closed; an upload and a
/// download that keep moving for longer than the timeout in total are never cut.
#[test]
fn requests_in_flight_are_bounded_by_progress_deadlines() {
    let server = r#"
import sys, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        if self.path == "/never":
            time.sleep(60)
            return
        if self.path == "/stall":
            self.send_response(200)
            self.send_header("Content-Length", "10")
            self.end_headers()
            self.wfile.write(b"12345")
            self.wfile.flush()
            time.sleep(60)
            return
        # /moving: 5 pieces, 0.5 s apart (2.5 s in all).
        self.send_response(200)
        self.send_header("Content-Length", "5")
        self.end_headers()
        for piece in b"abcde":
            time.sleep(0.5)
            self.wfile.write(bytes([piece]))
            self.wfile.flush()
    def do_POST(self):
        n = int(self.headers["Content-Length"])
        got = 0
        while got < n:
            chunk = self.rfile.read(min(n - got, 4096))
            if not chunk:
                break
            got += len(chunk)
        if self.path == "/never":
            time.sleep(60)
            return
        body = ("got %d" % got).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"#;
    let mut p = Proxied::config("");
    let script = p.inst.dir.path().join("slow.py");
    std::fs::write(&script, server).unwrap();
    std::fs::remove_file(p.inst.config_dir.join("90_proxy.toml")).unwrap();
    p.inst.config_file(
        "90_proxy.toml",
        &format!(
            "[proxy]\nlisten = \"127.0.0.1\"\nupstream = \"http://127.0.0.1:{app}\"\nredirect_http = false\n\
             upstream_read_timeout = \"1s\"\nclient_body_timeout = \"4s\"\nclient_body_min_rate = 0\n\
             [services.app]\ncommand = [\"python3\", \"{script}\", \"{app}\"]\nready = {{ tcp = {app} }}\n",
            app = p.app,
            script = script.display()
        ),
    );
    p.start_again();

    let out = p.curl(&["-D", "-", "-o", "/dev/null", &p.https_url("/never")]);
    assert!(stdout(&out).starts_with("HTTP/2 504"), "{}", stdout(&out));

    // A request whose body came whole: the application's time counts from the body's end, not
    // from the end of the body's own allowance (client_body_timeout, 4 s here).
    for proto in ["--http2", "--http1.1"] {
        let started = Instant::now();
        let out = p.curl(&[
            proto,
            "-D",
            "-",
            "-o",
            "/dev/null",
            "--data-binary",
            "0123456789",
            &p.https_url("/never"),
        ]);
        let took = started.elapsed();
        assert!(
            stdout(&out).starts_with(if proto == "--http2" {
                "HTTP/2 504"
            } else {
                "HTTP/1.1 504"
            }),
            "{}",
            stdout(&out)
        );
        assert!(
            took < Duration::from_millis(3500),
            "{proto}: 504 after {took:?}"
        );
    }

    let out = p.curl(&["--http1.1", &p.https_url("/stall")]);
    assert!(
        !out.status.success(),
        "a stalled body is cut: {}",
        stdout(&out)
    );
    assert_eq!(stdout(&out), "12345");

    let out = p.curl(&[&p.https_url("/moving")]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "abcde");

    // Raw HTTP/1.1 on port 80 (proxied, not redirected): a body that stops, one that moves.
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", p.http)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(
        b"POST /upload HTTP/1.1\r\nHost: localhost\r\nContent-Length: 100\r\n\r\n0123456789",
    )
    .unwrap();
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");

    let mut s = std::net::TcpStream::connect(("127.0.0.1", p.http)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(b"POST /upload HTTP/1.1\r\nHost: localhost\r\nContent-Length: 50\r\nConnection: close\r\n\r\n")
        .unwrap();
    for _ in 0..5 {
        std::thread::sleep(Duration::from_millis(500));
        s.write_all(b"0123456789").unwrap();
    }
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.ends_with("got 50"), "{answer}");
    p.stop();
}

/// What a TLS handshake writes last leaves with the first response (`proxy::cork`): a TLS 1.3
/// client that has finished its handshake gets nothing until it asks (the session tickets wait
/// for the response, and then serve to resume); a TLS 1.2 client, which waits for the server's
/// last flight, still gets it; a HelloRetryRequest goes through (the attacker's attempt, with
/// openssl); a failed handshake still gets its alert; a client with Nagle's algorithm on does
/// not wait for the server's delayed ACK to send its first request (an attacker's finding).
#[test]
fn a_handshakes_last_writes_leave_with_the_first_response() {
    let mut p = Proxied::start("header_timeout = \"2s\"\nidle_timeout = \"2s\"");
    let config = client_config(None, &[b"http/1.1"]);
    let connect = |config: &Arc<rustls::ClientConfig>| {
        let conn =
            rustls::ClientConnection::new(config.clone(), "localhost".try_into().unwrap()).unwrap();
        let tcp = TcpStream::connect(("127.0.0.1", p.https)).unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut s = rustls::StreamOwned::new(conn, tcp);
        while s.conn.is_handshaking() {
            s.conn.complete_io(&mut s.sock).unwrap();
        }
        s
    };

    let mut s = connect(&config);
    assert_eq!(
        s.conn.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_3)
    );
    std::thread::sleep(Duration::from_millis(500));
    s.sock.set_nonblocking(true).unwrap();
    let mut byte = [0u8; 1];
    let early = s.sock.peek(&mut byte);
    assert!(
        matches!(&early, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "the server wrote after the handshake before any request (its tickets alone): {early:?}"
    );
    s.sock.set_nonblocking(false).unwrap();
    let (status, _) = request(&mut s, "/");
    assert_eq!(status, 200);
    // Keep-alive: the next response goes as usual.
    let (status, _) = request(&mut s, "/");
    assert_eq!(status, 200);
    drop(s);
    // The tickets came with the response: a new connection resumes the session.
    let s = connect(&config);
    assert_eq!(
        s.conn.handshake_kind(),
        Some(rustls::HandshakeKind::Resumed)
    );
    drop(s);

    // A client with Nagle's algorithm on (std's default, as here) writes its request just after
    // its Finished, and the kernel holds the request until the Finished is acknowledged: the
    // server acknowledges it at once, not with its delayed ACK 40 ms later (it sends nothing
    // before the response; an attacker's finding). The fastest of five new connections, so
    // that a busy machine does not decide.
    let fastest = (0..5)
        .map(|_| {
            let mut s = connect(&config);
            let started = Instant::now();
            // One write, one record; a request regobox answers itself (400: two hosts), so
            // that the application's own writes (the fixture's head and body go in two, with
            // Nagle on) do not count.
            s.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\nHost: other\r\n\r\n")
                .unwrap();
            let (status, _) = response(&mut s);
            assert_eq!(status, 400);
            started.elapsed()
        })
        .min()
        .unwrap();
    assert!(
        fastest < Duration::from_millis(30),
        "the first request on a new TLS 1.3 connection waited {fastest:?} (a delayed ACK is 40 ms)"
    );

    // A HelloRetryRequest (the client's one key share is for P-521, which regobox does not take):
    // the retry, its answer and the rest of the handshake go as they should (openssl).
    let mut openssl = Command::new("timeout")
        .args([
            "20",
            "openssl",
            "s_client",
            "-connect",
            &format!("127.0.0.1:{}", p.https),
        ])
        .args([
            "-servername",
            "localhost",
            "-tls1_3",
            "-groups",
            "P-521:X25519",
        ])
        .args(["-alpn", "http/1.1", "-msg", "-ign_eof"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    openssl
        .stdin
        .take()
        .unwrap()
        .write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .unwrap();
    let out = openssl.wait_with_output().unwrap();
    let text = stdout(&out);
    assert_eq!(text.matches("ServerHello").count(), 2, "{text}");
    assert!(text.contains("HTTP/1.1 200"), "{text}");

    // A connection regobox closes before any request (its idle and header deadlines) still gets
    // them: the next connection resumes.
    let config = client_config(None, &[b"http/1.1"]);
    let mut s = connect(&config);
    let started = Instant::now();
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "closed after {:?}",
        started.elapsed()
    );
    assert!(rest.is_empty(), "{rest:?}");
    drop(s);
    let s = connect(&config);
    assert_eq!(
        s.conn.handshake_kind(),
        Some(rustls::HandshakeKind::Resumed),
        "the tickets of a connection closed by regobox before any request did not come"
    );
    drop(s);

    // TLS 1.2: the server's Finished is the handshake's last write, and the client waits for it.
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls12 = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS12])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAny))
        .with_no_client_auth();
    tls12.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tls12 = Arc::new(tls12);
    for _ in 0..2 {
        let mut s = connect(&tls12);
        assert_eq!(
            s.conn.protocol_version(),
            Some(rustls::ProtocolVersion::TLSv1_2)
        );
        let (status, _) = request(&mut s, "/");
        assert_eq!(status, 200);
    }

    // A handshake that fails (no protocol in common) ends with the alert that says why.
    let conn = rustls::ClientConnection::new(
        client_config(None, &[b"spdy/3"]),
        "localhost".try_into().unwrap(),
    )
    .unwrap();
    let tcp = TcpStream::connect(("127.0.0.1", p.https)).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut s = rustls::StreamOwned::new(conn, tcp);
    let failed = loop {
        match s.conn.complete_io(&mut s.sock) {
            Ok(_) if s.conn.is_handshaking() => continue,
            Ok(_) => panic!("the handshake succeeded"),
            Err(e) => break e,
        }
    };
    let alert = failed
        .get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>())
        .cloned();
    assert_eq!(
        alert,
        Some(rustls::Error::AlertReceived(
            rustls::AlertDescription::NoApplicationProtocol
        )),
        "{failed:?}"
    );
    p.stop();
}

/// The TCP segments on the loopback interface, read from a packet socket (root), for a test of
/// what travels in which segment.
struct Capture(std::os::fd::OwnedFd);

impl Capture {
    fn loopback() -> Capture {
        use std::os::fd::{AsRawFd, FromRawFd};
        let all = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: plain arguments; the descriptor returned is owned below.
        let fd = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                all.into(),
            )
        };
        assert!(
            fd >= 0,
            "a packet socket (needs root): {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: `fd` was just opened and is owned by nothing else.
        let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
        // Room for what the other tests send over loopback meanwhile.
        let room: libc::c_int = 64 << 20;
        // SAFETY: an int option, its size given.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVBUFFORCE,
                (&room as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        // SAFETY: zero is a valid sockaddr_ll; the fields set below.
        let mut at: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        at.sll_family = libc::AF_PACKET as u16;
        at.sll_protocol = all;
        // SAFETY: a NUL-terminated name.
        at.sll_ifindex = unsafe { libc::if_nametoindex(c"lo".as_ptr()) } as i32;
        // SAFETY: `at` is a sockaddr_ll, its size given.
        let bound = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&at as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        assert_eq!(bound, 0, "{}", std::io::Error::last_os_error());
        Capture(fd)
    }

    /// The TCP segments from port `from` to port `to` (IPv4) captured since the last call:
    /// their flags and payload sizes, in order.
    fn segments(&self, from: u16, to: u16) -> Vec<(u8, usize)> {
        use std::os::fd::AsRawFd;
        let mut found = Vec::new();
        let mut frame = vec![0u8; 70_000];
        loop {
            // SAFETY: zero is a valid sockaddr_ll.
            let mut at: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            let mut at_len = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
            // SAFETY: `frame` and `at` are writable for the sizes given.
            let n = unsafe {
                libc::recvfrom(
                    self.0.as_raw_fd(),
                    frame.as_mut_ptr().cast(),
                    frame.len(),
                    libc::MSG_DONTWAIT,
                    (&mut at as *mut libc::sockaddr_ll).cast(),
                    &mut at_len,
                )
            };
            if n < 0 {
                return found;
            }
            // Each loopback packet is seen leaving and arriving: counted once, arriving.
            if at.sll_pkttype == libc::PACKET_OUTGOING {
                continue;
            }
            // An Ethernet header (zeros on loopback), then IPv4, then TCP.
            let f = &frame[..n as usize];
            if f.len() < 14 + 20 || f[12..14] != [0x08, 0x00] {
                continue;
            }
            let ip = &f[14..];
            let (ihl, total) = (
                usize::from(ip[0] & 0xf) * 4,
                usize::from(u16::from_be_bytes([ip[2], ip[3]])),
            );
            if ip[9] != 6 || ip.len() < ihl + 20 {
                continue;
            }
            let tcp = &ip[ihl..];
            let (source, dest) = (
                u16::from_be_bytes([tcp[0], tcp[1]]),
                u16::from_be_bytes([tcp[2], tcp[3]]),
            );
            if (source, dest) == (from, to) {
                let doff = usize::from(tcp[12] >> 4) * 4;
                found.push((tcp[13], total - ihl - doff));
            }
        }
    }
}

const FIN: u8 = 0x01;

/// A connection's last answer over TLS leaves with the connection's end (`proxy::cork`): the
/// answer, TLS's `close_notify` and TCP's FIN in one segment, where there were three (the
/// client woken three times, regobox writing three times). The answer's last because the
/// client said so (`Connection: close`, HTTP/1.0) or because regobox did (a request it
/// refuses); the client reads all of it and a clean end. Seen on the wire (a packet socket on
/// loopback).
#[test]
fn a_last_answer_leaves_with_the_connections_end_in_one_segment() {
    let mut p = Proxied::start("");
    let capture = Capture::loopback();
    let cases: [(&str, &[u8], &str); 3] = [
        (
            "the client's last request",
            b"GET /status?code=200 HTTP/1.1\r\nHost: localhost\r\nConnection: keep-alive, close\r\n\r\n",
            "HTTP/1.1 200",
        ),
        (
            "an HTTP/1.0 request",
            b"GET /status?code=200 HTTP/1.0\r\nHost: localhost\r\n\r\n",
            " 200 ",
        ),
        (
            "an answer regobox closes with",
            b"GET / HTTP/1.1\r\nHost: localhost\r\nHost: other\r\n\r\n",
            "HTTP/1.1 400",
        ),
    ];
    for (what, request, status) in cases {
        let mut s = tls_alpn(p.https, None, &[b"http/1.1"]);
        let client = s.sock.local_addr().unwrap().port();
        // The handshake's, left behind.
        capture.segments(p.https, client);
        s.write_all(request).unwrap();
        let mut answer = Vec::new();
        let end = s.read_to_end(&mut answer);
        let answer = String::from_utf8_lossy(&answer);
        assert!(
            end.is_ok(),
            "{what}: the connection ended without close_notify: {end:?}"
        );
        assert!(answer.starts_with("HTTP/1."), "{what}: {answer}");
        assert!(answer.contains(status), "{what}: {answer}");
        // What the server sent after the request, but bare acknowledgements.
        let sent: Vec<(u8, usize)> = capture
            .segments(p.https, client)
            .into_iter()
            .filter(|&(flags, payload)| payload > 0 || flags & FIN != 0)
            .collect();
        assert!(
            sent.len() == 1 && sent[0].1 > 0 && sent[0].0 & FIN != 0,
            "{what}: the answer, close_notify and FIN went as (flags, payload bytes) {sent:?}"
        );
    }
    // A connection that stays open answers as usual, and its answers do not wait for an end.
    let mut s = tls_alpn(p.https, None, &[b"http/1.1"]);
    for path in ["/status?code=200", "/keep"] {
        let (status, _) = request(&mut s, path);
        assert_eq!(status, 200);
    }
    p.stop();
}

/// Attack (thirty-first session): `Connection: close, \x80` (an option beside a byte that is not
/// text) was the connection's last request for regobox's request follower and not for hyper,
/// which reads no option in such a value: the connection stayed open, and everything the client
/// sent next was thrown away unanswered until the idle deadline (75 s). Both read it as hyper
/// does now: the next request is answered, over TLS and over plain HTTP.
#[test]
fn a_connection_option_hyper_does_not_read_does_not_end_the_connection() {
    let mut p = Proxied::start("");
    let first = b"GET /job/a HTTP/1.1\r\nHost: localhost\r\nConnection: close, \x80\r\n\r\n";
    let tls = tls_alpn(p.https, None, &[b"http/1.1"]);
    let plain = TcpStream::connect(("127.0.0.1", p.http)).unwrap();
    plain
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let streams: [(&str, Box<dyn ReadWrite>); 2] =
        [("TLS", Box::new(tls)), ("plain", Box::new(plain))];
    for (what, mut s) in streams {
        s.write_all(first).unwrap();
        assert_eq!(
            response(&mut s),
            (200, "app: /job/a\n".to_string()),
            "{what}"
        );
        let started = Instant::now();
        let (status, body) = request(&mut s, "/job/b");
        assert_eq!((status, body.as_str()), (200, "app: /job/b\n"), "{what}");
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{what}: the next request waited {:?}",
            started.elapsed()
        );
    }
    // The same for a body's framing: a coding list that is not text is not chunked for hyper
    // (400, closed), nor for the follower.
    let started = Instant::now();
    let answer = raw(
        p.http,
        b"POST /job/c HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: \x80, chunked\r\n\r\n0\r\n\r\n",
    );
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(started.elapsed() < Duration::from_secs(10), "{answer}");
    p.stop();
}

/// Attack (thirty-first session, a second attacker, on the request follower beside hyper): four
/// places where the two read the same bytes otherwise, each seen on the plain port (the follower
/// is the same over TLS). A head past `max_header_bytes` that one read brought whole was hyper's
/// to serve (200), with every request after it in the read, none followed (a request with both
/// framings among them reached the application); a `Content-Length` after `Transfer-Encoding`
/// that did not read as a number escaped the both-framings refusal; a length of 20 digits
/// (zeros first) left the connection open and deaf for 75 s; a body cut for its tiny chunks
/// waited 60 s for a 408.
#[test]
fn the_follower_and_hyper_read_a_request_alike() {
    let mut p = Proxied::start("");
    let quick = Duration::from_secs(10);

    let mut big = b"GET /job/big HTTP/1.1\r\nHost: localhost\r\nX-Pad:".to_vec();
    big.extend_from_slice(&[b' '; 40_000]);
    big.extend_from_slice(b"v\r\n\r\nGET /job/next HTTP/1.1\r\nHost: localhost\r\n\r\nPOST /job/both HTTP/1.1\r\nHost: localhost\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n");
    let started = Instant::now();
    let answer = raw(p.http, &big);
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
    assert!(
        !answer.contains("app: "),
        "a request after the head was served: {answer}"
    );
    assert!(started.elapsed() < quick, "{:?}", started.elapsed());

    let started = Instant::now();
    let answer = raw(
        p.http,
        b"POST /job/b1 HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\nContent-Length: x\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    );
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(
        answer.contains("both Content-Length and Transfer-Encoding"),
        "{answer}"
    );
    assert!(started.elapsed() < quick, "{:?}", started.elapsed());

    // A length of 20 digits is a length (hyper's reading); the next request is answered.
    let mut s = TcpStream::connect(("127.0.0.1", p.http)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(b"POST /job/a HTTP/1.1\r\nHost: localhost\r\nContent-Length: 00000000000000000005\r\n\r\nhello")
        .unwrap();
    assert_eq!(response(&mut s), (200, "app: /job/a\n".to_string()));
    let started = Instant::now();
    assert_eq!(
        request(&mut s, "/job/b"),
        (200, "app: /job/b\n".to_string())
    );
    assert!(started.elapsed() < quick, "{:?}", started.elapsed());

    // A body in chunks too small is refused at once (400), not after client_body_timeout.
    let mut tiny =
        b"POST /job/tiny HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n"
            .to_vec();
    for _ in 0..1100 {
        tiny.extend_from_slice(b"1\r\na\r\n");
    }
    tiny.extend_from_slice(b"0\r\n\r\n");
    let started = Instant::now();
    let answer = raw(p.http, &tiny);
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(started.elapsed() < quick, "{:?}", started.elapsed());
    p.stop();
}

/// Attack (eighteenth session): an answer made before the request's body is read (regobox's
/// redirect or 503, the application's early 413) reached a client still sending the body as a
/// broken pipe (HTTP/1.1: hyper closed the connection) or a reset stream (HTTP/2: curl exit 92),
/// not as the answer. Now the rest of the body is read and thrown away, for at most
/// proxy.client_body_timeout; not once a body was cut for stalling.
#[test]
fn an_answer_made_before_the_body_is_read_reaches_a_client_still_sending_it() {
    use std::io::{Read, Write};
    let mut p = Proxied::start("client_body_timeout = \"4s\"\nclient_body_min_rate = 0");
    let file = p.inst.dir.path().join("upload");
    std::fs::write(&file, vec![b'x'; 16 << 20]).unwrap();
    let data = format!("@{}", file.display());
    // The application answers 413 without reading the body (curl asks first with `Expect:
    // 100-continue` over HTTP/1.1, and here also without).
    for (proto, expect) in [
        ("--http2", "X-Expect: none"),
        ("--http1.1", "X-Expect: none"),
        ("--http1.1", "Expect:"),
    ] {
        let out = p.curl(&[
            proto,
            "-H",
            expect,
            "-sS",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--data-binary",
            &data,
            &p.https_url("/status?code=413"),
        ]);
        assert!(
            out.status.success() && stdout(&out) == "413",
            "{proto} {expect}: {} {} {}",
            out.status,
            stdout(&out),
            stderr(&out)
        );
    }
    // regobox's redirect on port 80, to a client that sends its whole body before it reads
    // (as Python's http.client does): the body is taken, the answer read, and the connection
    // serves the next request.
    let mut s = std::net::TcpStream::connect(("127.0.0.1", p.http)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let len = 8 << 20;
    s.write_all(
        format!("POST /form HTTP/1.1\r\nHost: localhost\r\nContent-Length: {len}\r\n\r\n")
            .as_bytes(),
    )
    .unwrap();
    let piece = vec![b'y'; 64 << 10];
    for i in 0..len / piece.len() {
        if let Err(e) = s.write_all(&piece) {
            panic!("the body was refused after {} bytes: {e}", i * piece.len());
        }
    }
    let (status, _) = answer_on(&mut s).unwrap();
    assert_eq!(status, 308);
    s.write_all(b"GET /job/next HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .unwrap();
    let (status, body) = answer_on(&mut s).unwrap();
    assert_eq!(status, 200);
    assert_eq!(body, "app: /job/next\n");
    drop(s);

    // The attacker's framings of a body that holds a request, the next request after it: the
    // body is never read as a request (never answered, never forwarded), the next one is.
    let inner = |tag: &str| format!("GET /job/smuggled-{tag} HTTP/1.1\r\nHost: localhost\r\n\r\n");
    let after = |tag: &str| format!("GET /job/after-{tag} HTTP/1.1\r\nHost: localhost\r\n\r\n");
    for (tag, head, body) in [
        ("cl", "Content-Length: {n}".to_string(), inner("cl")),
        (
            "chunked",
            "Transfer-Encoding: chunked".to_string(),
            format!(
                "{:x};a=\"GET / HTTP/1.1\"\r\n{}\r\n0\r\nX-T: GET /job/smuggled-tr HTTP/1.1\r\n\r\n",
                inner("chunked").len(),
                inner("chunked")
            ),
        ),
        (
            "padded",
            "Transfer-Encoding: chunked".to_string(),
            format!(
                "0000000000000000000{:x} \r\n{}\r\n00000\r\n\r\n",
                inner("padded").len(),
                inner("padded")
            ),
        ),
    ] {
        for target in ["/form", "/job/status?code=413"] {
            let head = head.replace("{n}", &body.len().to_string());
            let mut s = std::net::TcpStream::connect(("127.0.0.1", p.http)).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
            s.write_all(
                format!("POST {target} HTTP/1.1\r\nHost: localhost\r\n{head}\r\n\r\n").as_bytes(),
            )
            .unwrap();
            let (status, _) = answer_on(&mut s).unwrap();
            assert!(status == 308 || status == 413, "{tag} {target}: {status}");
            s.write_all(format!("{body}{}", after(tag)).as_bytes())
                .unwrap();
            let (status, answer) = answer_on(&mut s).unwrap();
            assert_eq!(status, 200, "{tag} {target}: {answer}");
            assert_eq!(answer, format!("app: /job/after-{tag}\n"), "{tag} {target}");
        }
    }

    // A client waiting to be asked for its body is not asked after the answer, whichever of two
    // `Expect` fields says so: its next request is never read as the body (an attacker's, with
    // `Expect: x` before), the connection ends.
    let next = "GET /job/next HTTP/1.1\r\nHost: localhost\r\n\r\n";
    for expect in [
        "Expect: 100-continue\r\n",
        "Expect: x\r\nExpect: 100-continue\r\n",
        "Expect: 100-continue\r\nExpect: x\r\n",
    ] {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", p.http)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        s.write_all(
            format!(
                "POST /form HTTP/1.1\r\nHost: localhost\r\n{expect}Content-Length: {}\r\n\r\n",
                next.len()
            )
            .as_bytes(),
        )
        .unwrap();
        let (status, _) = answer_on(&mut s).unwrap();
        assert_eq!(status, 308, "{expect:?}");
        let _ = s.write_all(next.as_bytes());
        let mut rest = Vec::new();
        let ended = s.read_to_end(&mut rest);
        assert!(
            ended.is_ok() || ended.is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionReset),
            "{expect:?}: the connection stayed open: its next request was read as the body"
        );
    }

    // A body that keeps coming after the answer is read for proxy.client_body_timeout (4 s),
    // no longer.
    let mut s = std::net::TcpStream::connect(("127.0.0.1", p.http)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(b"POST /form HTTP/1.1\r\nHost: localhost\r\nContent-Length: 100000000000\r\n\r\n")
        .unwrap();
    let (status, _) = answer_on(&mut s).unwrap();
    assert_eq!(status, 308);
    let answered = Instant::now();
    let mut taken = 0u64;
    while answered.elapsed() < Duration::from_secs(30) {
        if s.write_all(&piece).is_err() {
            break;
        }
        taken += piece.len() as u64;
    }
    let cut = answered.elapsed();
    assert!(
        cut < Duration::from_secs(30),
        "a body after the answer was read for {cut:?} ({taken} bytes)"
    );
    drop(s);

    // A body cut for stalling (408) is not read on: the connection closes with the answer.
    let mut s = std::net::TcpStream::connect(("127.0.0.1", p.http)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(
        b"POST /job/upload HTTP/1.1\r\nHost: localhost\r\nContent-Length: 100\r\n\r\n0123456789",
    )
    .unwrap();
    let (status, _) = answer_on(&mut s).unwrap();
    assert_eq!(status, 408);
    let _ = s.write_all(b"more");
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut rest = [0u8; 64];
    let closed = s.read(&mut rest);
    assert!(
        matches!(&closed, Ok(0))
            || closed
                .as_ref()
                .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionReset),
        "a stalled body's connection stayed open after its 408: {closed:?}"
    );
    let log = p.stop();
    assert!(
        !log.contains("smuggled"),
        "a request in a body thrown away was read: {log}"
    );
}

/// An attacker's (eighteenth session): bodies being thrown away (HTTP/1.1 to the port-80
/// redirect, HTTP/2 to the application's early 413, trickled, with a minute of
/// proxy.client_body_timeout left) do not hold a graceful stop past its grace, and each request
/// has its access line.
#[test]
fn a_stop_is_not_held_by_bodies_being_thrown_away() {
    use std::io::Write;
    let mut p = Proxied::start("client_body_timeout = \"60s\"\nclient_body_min_rate = 0");
    let file = p.inst.dir.path().join("upload");
    std::fs::write(&file, vec![b'x'; 64 << 20]).unwrap();
    let mut uploads: Vec<_> = (0..3)
        .map(|_| {
            let mut c = p.curl_command(&[
                "--http2",
                "-sS",
                "-o",
                "/dev/null",
                "--limit-rate",
                "64k",
                "--data-binary",
                &format!("@{}", file.display()),
                &p.https_url("/status?code=413"),
            ]);
            c.stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut held = Vec::new();
    for _ in 0..5 {
        let mut s = TcpStream::connect(("127.0.0.1", p.http)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        s.write_all(
            b"POST /form HTTP/1.1\r\nHost: localhost\r\nContent-Length: 1000000000\r\n\r\n",
        )
        .unwrap();
        let (status, _) = answer_on(&mut s).unwrap();
        assert_eq!(status, 308);
        s.write_all(&[b'a'; 4096]).unwrap();
        held.push(s);
    }
    std::thread::sleep(Duration::from_secs(3));
    let stopping = Instant::now();
    let log = p.stop();
    let took = stopping.elapsed();
    for u in &mut uploads {
        let _ = u.kill();
        let _ = u.wait();
    }
    assert!(took < Duration::from_secs(20), "the stop took {took:?}");
    assert_eq!(access_lines(&log, "/status?code=413").len(), 3, "{log}");
    assert_eq!(access_lines(&log, "/form").len(), 5, "{log}");
}

/// "One access line per request" held only for the requests hyper hands over: a head hyper
/// refuses itself (too large, too many fields, a URI too long, a method, field or version it
/// cannot read) got hyper's answer and left no trace in the access log, so the hostile clients
/// an operator looks for there were the ones missing. Each now has its line, with what was
/// answered and `-` for what could not be read; a client that leaves before its head is whole,
/// which nobody answers, has none.
#[test]
fn every_head_hyper_refuses_has_an_access_line() {
    // Above hyper's longest URI (65 534 bytes), so that one is refused for its URI alone.
    let mut p = Proxied::start("max_header_bytes = 98304");
    let fields: String = (0..101).map(|i| format!("X-F{i}: v\r\n")).collect();
    let cases: Vec<(String, u16)> = vec![
        (
            format!(
                "GET /job/a HTTP/1.1\r\nHost: localhost\r\nX-Big: {}\r\n\r\n",
                "a".repeat(100_000)
            ),
            431,
        ),
        (
            format!("GET /job/a HTTP/1.1\r\nHost: localhost\r\n{fields}\r\n"),
            431,
        ),
        (
            format!(
                "GET /job/{} HTTP/1.1\r\nHost: localhost\r\n\r\n",
                "u".repeat(70_000)
            ),
            414,
        ),
        ("G@T /job/a HTTP/1.1\r\nHost: localhost\r\n\r\n".into(), 400),
        (
            "GET /job/a HTTP/1.1\r\nHost: localhost\r\nBad Field: x\r\n\r\n".into(),
            400,
        ),
        ("GET /job/a HTTP/1.2\r\nHost: localhost\r\n\r\n".into(), 400),
        (
            "GET /job/a HTTP/1.1\r\nHost: localhost\r\nContent-Length: abc\r\n\r\n".into(),
            400,
        ),
    ];
    let mut expected = Vec::new();
    for (request, status) in &cases {
        let answer = raw(p.http, request.as_bytes());
        assert!(
            answer.starts_with(&format!("HTTP/1.1 {status}")),
            "{}: {answer}",
            &request[..request.len().min(60)]
        );
        expected.push(*status);
    }
    // Behind a request that was served, in the same write.
    let answer = raw(
        p.http,
        b"GET /job/ok HTTP/1.1\r\nHost: localhost\r\n\r\nG@T /job/b HTTP/1.1\r\nHost: localhost\r\n\r\n",
    );
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("HTTP/1.1 400"), "{answer}");
    expected.push(400);
    // Over TLS.
    let mut s = tls(p.https, None);
    s.write_all(b"G@T /job/a HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .unwrap();
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    expected.push(400);
    // A request read whole whose method and target are `-` (an attacker's: its line read as a
    // refused head's but for its version, which a request read always has).
    let answer = raw(p.http, b"- - HTTP/1.1\r\nHost: localhost\r\n\r\n");
    assert!(answer.starts_with("HTTP/1.1 501"), "{answer}");
    // A head sent in two pieces a second apart: its line has the time it took.
    let mut s = TcpStream::connect(("127.0.0.1", p.http)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(b"GET /job/a HTTP/1.1\r\nHost: localhost\r\n")
        .unwrap();
    std::thread::sleep(Duration::from_millis(1200));
    s.write_all(b"Bad Field: x\r\n\r\n").unwrap();
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    assert!(answer.starts_with(b"HTTP/1.1 400"));
    expected.push(400);
    // A head left unfinished: nobody answers it, nothing is logged.
    let mut s = TcpStream::connect(("127.0.0.1", p.http)).unwrap();
    s.write_all(b"GET /job/a HTTP/1.1\r\nHost: loc").unwrap();
    drop(s);
    std::thread::sleep(Duration::from_millis(300));

    let log = p.stop();
    let refused: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(" INFO access ") && l.contains(" method=- path=- version=- "))
        .collect();
    let mut statuses: Vec<u16> = refused
        .iter()
        .map(|l| {
            let status = l.split(" status=").nth(1).unwrap();
            status[..3].parse().unwrap()
        })
        .collect();
    statuses.sort_unstable();
    expected.sort_unstable();
    assert_eq!(statuses, expected, "{}", refused.join("\n"));
    let slow = refused.iter().filter(|l| {
        let ms = l.split(" duration_ms=\"").nth(1).unwrap();
        ms[..ms.find('"').unwrap()].parse::<f64>().unwrap() >= 1200.0
    });
    assert_eq!(slow.count(), 1, "{}", refused.join("\n"));
    for line in &refused {
        assert!(line.contains(" peer=127.0.0.1 "), "{line}");
        assert!(line.contains(" bytes=0 "), "{line}");
        assert!(line.contains(" upstream_ms=\"-\""), "{line}");
    }
    assert_eq!(access_lines(&log, "/job/ok").len(), 1, "{log}");
}

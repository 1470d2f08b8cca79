//! The page a bare `docker run` (or `scripts/run-local.sh`) shows while no application is
//! configured: what an operator needs first (services, PostgreSQL, the certificate and its
//! expiry, free space, the last and next backup) and how to add the application. The detailed
//! state stays on the supervision port.

use std::path::PathBuf;

use bytes::Bytes;
use hyper::header;
use hyper::{Response, StatusCode};

use super::{Body, full};
use crate::backup::archive::bytes;
use crate::config::Config;
use crate::supervisor::status::{Board, Snapshot};

/// What the page says of this instance's configuration.
#[derive(Debug, Clone)]
pub struct Facts {
    pub files_dir: PathBuf,
    pub backups_dir: PathBuf,
    pub backup_schedule: String,
    pub supervision_port: u16,
    pub upstream: String,
}

impl Facts {
    pub fn of(config: &Config) -> Facts {
        let layout = crate::volumes::Layout::new(config);
        Facts {
            files_dir: layout.files.clone(),
            backups_dir: layout.backups.clone(),
            backup_schedule: config.backup.schedule.clone(),
            supervision_port: config.supervision.port,
            upstream: config.proxy.upstream.clone(),
        }
    }
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// `3 d 4 h`, `2 h 5 min`, `42 s`: a duration for a person.
pub fn human(seconds: f64) -> String {
    let s = seconds.max(0.0) as u64;
    let (d, h, m) = (s / 86_400, s % 86_400 / 3600, s % 3600 / 60);
    if d > 0 {
        format!("{d} d {h} h")
    } else if h > 0 {
        format!("{h} h {m} min")
    } else if m > 0 {
        format!("{m} min {} s", s % 60)
    } else {
        format!("{s} s")
    }
}

/// The page's HTML.
pub fn render(snap: &Snapshot, facts: &Facts, now: chrono::DateTime<chrono::Utc>) -> String {
    let mut rows = String::new();
    for s in &snap.services {
        rows.push_str(&format!(
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            escape(&s.name),
            escape(&s.kind),
            format!("{:?}", s.status.state).to_lowercase(),
            escape(s.status.detail.as_deref().unwrap_or(""))
        ));
    }
    let component = |name: &str| {
        snap.components
            .get(name)
            .and_then(|c| c.get("state"))
            .and_then(|s| s.as_str())
            .unwrap_or("unknown")
            .to_string()
    };
    let cert = snap
        .components
        .get("proxy")
        .and_then(|p| p.get("certificate"))
        .map(|c| {
            let expiry = c["not_after"]
                .as_str()
                .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
                .map(|t| {
                    let left = (t.with_timezone(&chrono::Utc) - now).num_seconds() as f64;
                    if left <= 0.0 {
                        "<b>expired</b>".to_string()
                    } else {
                        format!("expires in {}", human(left))
                    }
                })
                .unwrap_or_default();
            format!(
                "{} certificate for {}, issued by {}, valid until {} ({expiry})",
                escape(c["source"].as_str().unwrap_or("")),
                escape(c["subject"].as_str().unwrap_or("")),
                escape(c["issuer"].as_str().unwrap_or("")),
                escape(c["not_after"].as_str().unwrap_or("")),
            )
        })
        .unwrap_or_else(|| "no certificate yet".into());
    let space = snap
        .volume
        .as_ref()
        .map(|v| {
            let low = if v.low {
                " &mdash; <b>below volumes.min_free: not ready</b>"
            } else {
                ""
            };
            format!(
                "{} free of {} on {}{low}",
                bytes(v.free_bytes),
                bytes(v.size_bytes),
                escape(&v.path.display().to_string())
            )
        })
        .unwrap_or_else(|| "unknown".into());
    let last = crate::backup::archives(&facts.backups_dir)
        .last()
        .and_then(|p| {
            let meta = std::fs::metadata(p).ok()?;
            let age = meta.modified().ok()?.elapsed().ok()?.as_secs_f64();
            Some(format!(
                "{} ({}, {} ago)",
                escape(&p.display().to_string()),
                bytes(meta.len()),
                human(age)
            ))
        })
        .unwrap_or_else(|| "none yet".into());
    let backup = snap.components.get("backup");
    let next = backup
        .and_then(|b| b["next"].as_str())
        .map(|t| format!("next scheduled at {} (backup.schedule)", escape(t)))
        .unwrap_or_else(|| {
            if facts.backup_schedule.is_empty() {
                "none scheduled (set backup.schedule, e.g. \"0 3 * * *\")".into()
            } else {
                "scheduled".into()
            }
        });
    let failure = backup
        .and_then(|b| b.get("last_failure"))
        .filter(|f| !f.is_null())
        .map(|f| {
            format!(
                "<br><b>last scheduled backup failed</b> at {}: {}",
                escape(f["at"].as_str().unwrap_or("")),
                escape(f["error"].as_str().unwrap_or(""))
            )
        })
        .unwrap_or_default();
    let supervision = if facts.supervision_port == 0 {
        "the supervision port is off (supervision.port = 0)".to_string()
    } else {
        format!(
            "the supervision port ({}) serves <code>/status</code> (JSON) and <code>/metrics</code>; keep it off the internet",
            facts.supervision_port
        )
    };
    format!(
        r#"<!doctype html>
<html><head><meta charset="utf-8"><title>regobox</title>
<style>body{{font-family:system-ui,sans-serif;max-width:52em;margin:3em auto;color:#222;line-height:1.4}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:.3em .6em;text-align:left}}
code,pre{{background:#f4f4f4;padding:.1em .3em}}pre{{padding:.8em}}</style></head>
<body><h1>regobox is running</h1>
<p>This instance runs PostgreSQL, a supervisor, this TLS proxy, a Docker bridge and backups.
No application is configured yet, so this page answers instead of one.</p>
<h2>State</h2>
<p>Ready: <b>{ready}</b> &middot; up {uptime} &middot; Docker bridge: <b>{docker}</b></p>
<table><tr><th>service</th><th>kind</th><th>state</th><th>detail</th></tr>{rows}</table>
<p>Certificate: {cert}</p>
<p>Space: {space}</p>
<p>Backups in {backups}: last {last}; {next}.{failure}</p>
<h2>Adding the application</h2>
<p>Mount a configuration directory on <code>/config</code> with a file such as
<code>90_app.toml</code>, or build an image <code>FROM</code> this one (see
<code>docker/examples/</code> in regobox's repository). For example, a Python web server (the image
has no Python: add it in an image <code>FROM</code> this one, <code>RUN apt-get update &amp;&amp;
apt-get install -y python3</code>, as the demo does):</p>
<pre>[services.web]
command = ["python3", "-m", "http.server", "8500", "--bind", "127.0.0.1"]
ready = {{ http = "http://127.0.0.1:8500/" }}

[proxy]
upstream = "{upstream}"</pre>
<p>A command that cannot be executed stops regobox at once, naming it. The application gets
<code>DATABASE_URL</code>, its files under <code>{files}</code> and, when the host's Docker socket is
mounted, a policy-enforcing <code>DOCKER_HOST</code>. <code>regobox config --origin</code> shows every
key and where it was set; {supervision}.</p>
</body></html>
"#,
        ready = snap.ready,
        uptime = human(snap.uptime_seconds),
        docker = escape(&component("docker")),
        backups = escape(&facts.backups_dir.display().to_string()),
        upstream = escape(&facts.upstream),
        files = escape(&facts.files_dir.display().to_string()),
    )
}

/// The page as a response.
pub fn page(board: &Board, facts: &Facts) -> Response<Body> {
    let html = render(&board.snapshot(), facts, chrono::Utc::now());
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "text/html; charset=utf-8")
        .header(header::CACHE_CONTROL, "no-store")
        .body(full(Bytes::from(html)))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_as_a_person_reads_them() {
        assert_eq!(human(42.4), "42 s");
        assert_eq!(human(125.0), "2 min 5 s");
        assert_eq!(human(2.0 * 3600.0 + 300.0), "2 h 5 min");
        assert_eq!(human(3.0 * 86_400.0 + 4.0 * 3600.0), "3 d 4 h");
    }
}

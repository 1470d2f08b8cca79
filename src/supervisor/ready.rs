//! Readiness probes: a TCP connection, an HTTP answer, or a command exiting with 0.

use std::time::Duration;

use crate::config::{ReadyConfig, parse_tcp_target};

/// One attempt: Ok if ready, Err with why not.
pub async fn probe(
    ready: &ReadyConfig,
    command: impl FnOnce() -> std::process::Command,
) -> Result<(), String> {
    let attempt = Duration::from_secs(5).min(ready.timeout);
    if !ready.tcp.is_empty() {
        let (host, port) = parse_tcp_target(&ready.tcp).ok_or("bad tcp target")?;
        return match tokio::time::timeout(
            attempt,
            tokio::net::TcpStream::connect((host.as_str(), port)),
        )
        .await
        {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(format!("tcp {host}:{port}: {e}")),
            Err(_) => Err(format!("tcp {host}:{port}: timed out")),
        };
    }
    if !ready.http.is_empty() {
        return match tokio::time::timeout(attempt, crate::health::get(&ready.http)).await {
            Ok(Ok((status, _))) if (200..400).contains(&status) => Ok(()),
            Ok(Ok((status, _))) => Err(format!("{} answered {status}", ready.http)),
            Ok(Err(e)) => Err(format!("{}: {e}", ready.http)),
            Err(_) => Err(format!("{}: timed out", ready.http)),
        };
    }
    if !ready.command.is_empty() {
        let mut cmd = command();
        return match tokio::time::timeout(ready.timeout, crate::process::output(&mut cmd)).await {
            Ok(Ok(out)) if out.status.success() => Ok(()),
            Ok(Ok(out)) => Err(format!("ready command ended with {}", out.status)),
            Ok(Err(e)) => Err(format!("ready command: {e}")),
            Err(_) => Err("ready command timed out".into()),
        };
    }
    Ok(())
}

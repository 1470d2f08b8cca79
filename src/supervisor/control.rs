//! The control socket: how a command reaches the running supervisor (today: a restore).
//!
//! `<runtime_dir>/control.sock`, mode 0600 (root, or regobox's user). One JSON line in, one JSON
//! line out: `{"restore": {"archive": "/volumes/backups/x.tar.zst", "force": false}}` is answered
//! with `{"code": 0, "message": "restore complete"}` once the restore has been checked and its data
//! built beside the live data while everything runs ([`crate::backup::build`]), and the supervisor
//! has then stopped everything in order, swapped the built data in, and started everything again
//! (or rolled back). A restore refused, failed or cancelled before that stopped nothing.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::backup::RestoreOptions;
use crate::config::Config;

/// A maintenance request handed to the supervisor, once everything that can be done without
/// stopping anything has been: the archive checked, its data built beside the live data
/// ([`crate::backup::build`]). A restore refused, or whose dump fails to load, costs no
/// downtime; the supervisor stops everything only to swap the built data in.
#[derive(Debug)]
pub struct Request {
    pub options: RestoreOptions,
    /// The restored data, built and checked; removed if dropped without being swapped in.
    pub built: crate::backup::Built,
    pub reply: oneshot::Sender<Reply>,
    /// Cancelled when the client goes away (Ctrl-C): the restore is cancelled as by a stop,
    /// unless its data is being swapped in, and everything starts again on the previous data.
    pub withdrawn: CancellationToken,
}

/// The answer: an exit code for the client, and what happened.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Reply {
    pub code: u8,
    pub message: String,
}

#[derive(Debug, Serialize, Deserialize)]
struct Wire {
    restore: RestoreWire,
}

#[derive(Debug, Serialize, Deserialize)]
struct RestoreWire {
    archive: PathBuf,
    force: bool,
    /// The volume the client means: a regobox serving another one refuses.
    volumes_root: PathBuf,
}

pub fn socket_path(config: &Config) -> PathBuf {
    config.runtime_dir.join("control.sock")
}

/// The control socket's file, removed when this is dropped (a cleanly stopped regobox leaves
/// no socket behind).
#[derive(Debug)]
struct SocketFile(PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The served control socket: closing it stops taking requests and lets those in hand write
/// their answer (a restore cancelled by a stop says so to its client before regobox exits).
#[derive(Debug)]
pub struct Control {
    _file: SocketFile,
    connections: TaskTracker,
    stop: CancellationToken,
}

impl Control {
    /// What cancels the requests in hand (a restore being built removes what it built) and
    /// refuses new ones: cancelled as soon as regobox is to stop, so that a build does not go on
    /// while the services stop ([`Control::close`] then waits for the answers).
    pub fn stopping(&self) -> CancellationToken {
        self.stop.clone()
    }

    /// Stop taking requests; a request still being read is answered "regobox is stopping", one
    /// being checked or built is cancelled (what it built removed) and answered so, and every
    /// answer is given up to `grace` to reach its client.
    pub async fn close(self, grace: std::time::Duration) {
        self.stop.cancel();
        self.connections.close();
        if tokio::time::timeout(grace, self.connections.wait())
            .await
            .is_err()
        {
            tracing::warn!("a control client did not take its answer in time");
        }
    }
}

/// Serve the control socket until [`Control::close`], handing requests to `tx`.
/// `scripts`: the configuration's init scripts, which a restore runs in what it rebuilt (see
/// `RestoreOptions::scripts`).
pub fn listen(
    config: &Config,
    scripts: Vec<PathBuf>,
    tx: mpsc::Sender<Request>,
) -> std::io::Result<Control> {
    let path = socket_path(config);
    let config = std::sync::Arc::new(config.clone());
    let scripts = std::sync::Arc::new(scripts);
    std::fs::create_dir_all(&config.runtime_dir)?;
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path)?;
    let file = SocketFile(path.clone());
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    let stop = CancellationToken::new();
    let connections = TaskTracker::new();
    let (tracker, stopped) = (connections.clone(), stop.clone());
    connections.spawn(async move {
        loop {
            let stream = tokio::select! {
                r = listener.accept() => match r {
                    Ok((s, _)) => s,
                    Err(_) => continue,
                },
                _ = stopped.cancelled() => break,
            };
            tracker.spawn(serve(
                stream,
                tx.clone(),
                config.clone(),
                scripts.clone(),
                stopped.clone(),
            ));
        }
    });
    Ok(Control {
        _file: file,
        connections,
        stop,
    })
}

async fn serve(
    stream: UnixStream,
    tx: mpsc::Sender<Request>,
    config: std::sync::Arc<Config>,
    scripts: std::sync::Arc<Vec<PathBuf>>,
    stop: CancellationToken,
) {
    let (read, mut write) = stream.into_split();
    // Not dropped at the stop: a restore being built ends by removing what it built.
    let reply = answer(read, &tx, &config, &scripts, &stop).await;
    if let Ok(text) = serde_json::to_string(&reply) {
        let _ = write.write_all(format!("{text}\n").as_bytes()).await;
    }
}

/// Read one request, check it and build its data without stopping anything, and hand it to the
/// supervisor. Once the request is read the client only waits: its end of the connection
/// closing (Ctrl-C, or the client killed) withdraws the request, as a stop would. `stop`: the
/// control socket closing (regobox stopping) cancels the request too.
async fn answer(
    read: tokio::net::unix::OwnedReadHalf,
    tx: &mpsc::Sender<Request>,
    config: &Config,
    scripts: &[PathBuf],
    stop: &CancellationToken,
) -> Reply {
    let mut line = String::new();
    let mut reader = BufReader::new(read.take_limit());
    let read = tokio::select! {
        r = reader.read_line(&mut line) => r,
        _ = stop.cancelled() => return Reply {
            code: crate::exit::FAILURE,
            message: "regobox is stopping: the request was not carried out".into(),
        },
    };
    if let Err(e) = read {
        return Reply {
            code: crate::exit::FAILURE,
            message: format!("bad request: {e}"),
        };
    }
    // Cancelled when the client goes away, and when regobox stops.
    let withdrawn = stop.child_token();
    let watch = async {
        let mut rest = [0u8; 64];
        // Bytes after the request line are not the protocol's: read and dropped (at most the
        // reader's limit, then its end).
        while let Ok(n) = tokio::io::AsyncReadExt::read(&mut reader, &mut rest).await {
            if n == 0 {
                break;
            }
        }
        withdrawn.cancel();
        std::future::pending::<()>().await
    };
    tokio::select! {
        reply = carry_out(&line, tx, config, scripts, &withdrawn, stop) => reply,
        () = watch => unreachable!("the watch never ends"),
    }
}

async fn carry_out(
    line: &str,
    tx: &mpsc::Sender<Request>,
    config: &Config,
    scripts: &[PathBuf],
    withdrawn: &CancellationToken,
    stop: &CancellationToken,
) -> Reply {
    let root = &config.volumes.root;
    match serde_json::from_str::<Wire>(line) {
        Ok(w) if w.restore.volumes_root != *root => Reply {
            code: crate::exit::FAILURE,
            message: format!(
                "this regobox serves {}, not {}",
                root.display(),
                w.restore.volumes_root.display()
            ),
        },
        Ok(w) => {
            let options = RestoreOptions {
                archive: w.restore.archive,
                force: w.restore.force,
                scripts: scripts.to_vec(),
            };
            let layout = crate::volumes::Layout::new(config);
            let archive = options.archive.display().to_string();
            let planned = crate::backup::begin(config, &layout, &options, true, withdrawn).await;
            let built = match planned {
                Ok(planned) => {
                    tracing::info!(%archive, "restore checked: building its data beside the live data while everything runs");
                    crate::backup::build(config, &layout, &options, planned, withdrawn).await
                }
                Err(e)
                    if e.downcast_ref::<crate::backup::RestoreCancelled>()
                        .is_none() =>
                {
                    tracing::warn!(%archive, "restore refused, nothing stopped: {e:#}");
                    return Reply {
                        code: crate::exit::code_for(&e),
                        message: format!("{e:#}"),
                    };
                }
                Err(e) => Err(e),
            };
            match built {
                Ok(built) => ask(tx, options, built, withdrawn.clone()).await,
                Err(e) => {
                    if e.downcast_ref::<crate::backup::RestoreCancelled>()
                        .is_none()
                    {
                        tracing::warn!(%archive, "restore failed while its data was built beside the live data, nothing stopped: {e:#}");
                    } else if stop.is_cancelled() {
                        tracing::warn!(%archive, "regobox is stopping: {e:#}; nothing was stopped for it");
                    } else {
                        tracing::warn!(%archive, "the restore's client went away (Ctrl-C): {e:#}; nothing was stopped for it");
                    }
                    Reply {
                        code: crate::exit::code_for(&e),
                        message: format!("{e:#}"),
                    }
                }
            }
        }
        Err(e) => Reply {
            code: crate::exit::FAILURE,
            message: format!("bad request: {e}"),
        },
    }
}

/// Hand a checked request to the supervisor and wait for its answer.
async fn ask(
    tx: &mpsc::Sender<Request>,
    options: RestoreOptions,
    built: crate::backup::Built,
    withdrawn: CancellationToken,
) -> Reply {
    let (reply_tx, reply_rx) = oneshot::channel();
    let request = Request {
        options,
        built,
        reply: reply_tx,
        withdrawn,
    };
    if tx.send(request).await.is_err() {
        return Reply {
            code: crate::exit::FAILURE,
            message:
                "regobox is stopping: the restore was not swapped in, the previous data is in place"
                    .into(),
        };
    }
    reply_rx.await.unwrap_or(Reply {
        code: crate::exit::FAILURE,
        message: "regobox stopped before it took the restore: nothing was swapped in, the previous data is in place".into(),
    })
}

trait TakeLimit: Sized {
    fn take_limit(self) -> tokio::io::Take<Self>;
}

impl<R: tokio::io::AsyncRead> TakeLimit for R {
    /// Requests are one short line: never read more than 64 KiB.
    fn take_limit(self) -> tokio::io::Take<Self> {
        tokio::io::AsyncReadExt::take(self, 64 * 1024)
    }
}

/// The volume is held by a regobox that takes no requests here: another command (a restore, an
/// upgrade, `init`), or a `regobox run` with another runtime directory. Exit 75: try again once
/// it is done.
#[derive(Debug, thiserror::Error)]
#[error(
    "the volume is held by {holder}, which takes no requests on {} ({cause}): another command (a restore, an upgrade) or a regobox with another runtime directory; try again once it is done",
    .socket.display()
)]
pub struct HeldElsewhere {
    pub holder: String,
    pub socket: PathBuf,
    pub cause: std::io::Error,
}

/// Ask the regobox running on this volume to restore; `None` if none runs on it (its data
/// directory lock is free). Once `stop` is cancelled (Ctrl-C) the request is withdrawn (this
/// end of the connection is shut for writing) and the answer awaited: the restore cancelled and
/// the previous data in place, or, if its data was already being swapped in, the restore done.
pub async fn request_restore(
    config: &Config,
    options: &RestoreOptions,
    stop: &CancellationToken,
) -> anyhow::Result<Option<Reply>> {
    if !crate::postgres::cluster::is_locked(&config.postgres.data_dir) {
        return Ok(None);
    }
    let stream = UnixStream::connect(socket_path(config))
        .await
        .map_err(|e| HeldElsewhere {
            holder: crate::postgres::cluster::holder(&config.postgres.data_dir)
                .unwrap_or_else(|| "another process".into()),
            socket: socket_path(config),
            cause: e,
        })?;
    let archive = options
        .archive
        .canonicalize()
        .map_err(|e| anyhow::anyhow!("{}: {e}", options.archive.display()))?;
    let wire = Wire {
        restore: RestoreWire {
            archive,
            force: options.force,
            volumes_root: config.volumes.root.clone(),
        },
    };
    let (read, mut write) = stream.into_split();
    write
        .write_all(format!("{}\n", serde_json::to_string(&wire)?).as_bytes())
        .await?;
    // `read_until` keeps what it read when the select drops it: the answer is never torn.
    let mut line = Vec::new();
    let mut reader = BufReader::new(read);
    tokio::select! {
        r = reader.read_until(b'\n', &mut line) => { r?; }
        _ = stop.cancelled() => {
            tracing::warn!("withdrawing the restore: the running regobox cancels it unless its data is already being swapped in");
            write.shutdown().await?;
            reader.read_until(b'\n', &mut line).await?;
        }
    }
    if line.is_empty() {
        anyhow::bail!(
            "the running regobox stopped without answering: see its log for what became of the restore"
        );
    }
    let reply: Reply = serde_json::from_slice(&line)
        .map_err(|e| anyhow::anyhow!("the running regobox gave no answer ({e})"))?;
    Ok(Some(reply))
}

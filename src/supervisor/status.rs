//! The state of every supervised thing, shared between the supervisor, which writes it, and the
//! health port and `regobox status`, which read it.

use std::collections::BTreeMap;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

/// Where a service is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// Waiting for its dependencies.
    Waiting,
    /// Started, not ready yet.
    Starting,
    /// Running and ready.
    Ready,
    /// A oneshot that completed successfully.
    Done,
    /// Exited; waiting before the next start.
    Backoff,
    /// Exited and will not be started again (its policy).
    Exited,
    /// Exhausted its restart budget (or cannot be started at all).
    Fatal,
    /// Being stopped.
    Stopping,
    /// Stopped by a stop request.
    Stopped,
}

impl State {
    /// Dependents may start.
    pub fn is_ready(self) -> bool {
        matches!(self, State::Ready | State::Done)
    }

    /// Nothing of it runs any more, nor will.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            State::Done | State::Exited | State::Fatal | State::Stopped
        )
    }
}

/// What the board says of one service (or of PostgreSQL).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServiceStatus {
    pub state: State,
    pub pid: Option<i32>,
    pub restarts: u32,
    /// When the current process started (seconds since the epoch).
    pub started_at: Option<f64>,
    /// How the last process ended, e.g. `exit 1` or `signal 9`.
    pub last_exit: Option<String>,
    /// Why it is in this state, when that is not obvious.
    pub detail: Option<String>,
}

impl Default for ServiceStatus {
    fn default() -> Self {
        ServiceStatus {
            state: State::Waiting,
            pid: None,
            restarts: 0,
            started_at: None,
            last_exit: None,
            detail: None,
        }
    }
}

/// Seconds since the epoch, now.
pub fn now_epoch() -> f64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// One line of the board.
#[derive(Debug, Clone)]
pub struct Entry {
    pub name: String,
    pub kind: &'static str,
    pub essential: bool,
    pub rx: watch::Receiver<ServiceStatus>,
}

/// Everything the health port reports.
#[derive(Debug, Clone)]
pub struct Board {
    pub entries: Vec<Entry>,
    pub started_at: f64,
    /// Why regobox is in maintenance (a restore), if it is: nothing is ready then.
    pub maintenance: watch::Receiver<Option<String>>,
    /// What the other components (the Docker bridge, the proxy) report, by name.
    pub components: BTreeMap<String, watch::Receiver<serde_json::Value>>,
    /// The data volume whose free space is reported (and must stay above `min_free`).
    pub volume: Option<VolumeWatch>,
}

/// The data volume and the free space it keeps.
#[derive(Debug, Clone)]
pub struct VolumeWatch {
    pub root: std::path::PathBuf,
    pub min_free: u64,
}

impl VolumeWatch {
    /// The volume's space now (`None` if it cannot be read).
    pub fn measure(&self) -> Option<VolumeSpace> {
        let (free, size) = crate::volumes::free_space(&self.root).ok()?;
        Some(VolumeSpace {
            path: self.root.clone(),
            free_bytes: free,
            size_bytes: size,
            min_free_bytes: self.min_free,
            low: free < self.min_free,
        })
    }
}

/// The data volume's space, in `/status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeSpace {
    pub path: std::path::PathBuf,
    pub free_bytes: u64,
    pub size_bytes: u64,
    pub min_free_bytes: u64,
    /// Below `volumes.min_free`: not ready.
    pub low: bool,
}

impl VolumeSpace {
    /// Why the volume makes regobox not ready, for a person.
    pub fn why(&self) -> String {
        format!(
            "the data volume {} has {} free, below volumes.min_free ({})",
            self.path.display(),
            crate::backup::archive::bytes(self.free_bytes),
            crate::backup::archive::bytes(self.min_free_bytes)
        )
    }
}

/// The JSON of `/status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Snapshot {
    pub ready: bool,
    #[serde(default)]
    pub maintenance: Option<String>,
    pub uptime_seconds: f64,
    pub orphans_reaped: u64,
    pub services: Vec<NamedStatus>,
    #[serde(default)]
    pub components: BTreeMap<String, serde_json::Value>,
    #[serde(default)]
    pub volume: Option<VolumeSpace>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NamedStatus {
    pub name: String,
    pub kind: String,
    pub essential: bool,
    #[serde(flatten)]
    pub status: ServiceStatus,
}

impl Board {
    /// Every essential entry is ready.
    pub fn ready(&self) -> bool {
        self.maintenance.borrow().is_none()
            && !self.entries.is_empty()
            && self
                .entries
                .iter()
                .filter(|e| e.essential)
                .all(|e| e.rx.borrow().state.is_ready())
    }

    pub fn snapshot(&self) -> Snapshot {
        let volume = self.volume.as_ref().and_then(VolumeWatch::measure);
        Snapshot {
            ready: self.ready() && !volume.as_ref().is_some_and(|v| v.low),
            volume,
            maintenance: self.maintenance.borrow().clone(),
            uptime_seconds: (now_epoch() - self.started_at).max(0.0),
            orphans_reaped: crate::process::orphans_reaped(),
            services: self
                .entries
                .iter()
                .map(|e| NamedStatus {
                    name: e.name.clone(),
                    kind: e.kind.to_string(),
                    essential: e.essential,
                    status: e.rx.borrow().clone(),
                })
                .collect(),
            components: self
                .components
                .iter()
                .map(|(k, rx)| (k.clone(), rx.borrow().clone()))
                .collect(),
        }
    }
}

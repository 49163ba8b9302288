//! The local API: newline-delimited JSON over a Unix socket, versioned.
//!
//! Request: `{"v":1,"method":"status","params":{}}`. Response:
//! `{"v":1,"ok":true,"result":…}` or `{"v":1,"ok":false,"error":{"code":…,
//! "message":…}}`. Methods: `status`, `flows`, `incidents` (`since_secs`,
//! `active`), `explain` (`id` or `pid`), `events` (then one verdict change
//! per line until the client hangs up), and for enforcement `throttle`
//! (`pid` | `cgroup` | `unit`, `dest`, `rate`, `burst`, `retry_ratio`,
//! `for_secs`, `errno`, `dry_run`; root only), `release` (`id` or
//! `all`; root only) and `throttles`.
pub mod backoff;
pub mod client;
pub mod server;
pub mod socket;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Protocol version; a request with another is refused.
pub const VERSION: u32 = 1;
/// Longest request line accepted.
pub const MAX_REQUEST: usize = 64 * 1024;
/// How the refusal of a root-only method to a peer let in (a member of
/// the group) begins; the client tells it from the refusal of the peer
/// itself by this.
pub const ROOT_ONLY: &str = "only root may throttle or release";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Request {
    pub v: u32,
    pub method: String,
    #[serde(default)]
    pub params: serde_json::Value,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ApiError {
    /// Stable, machine-readable: bad_request, request_too_large,
    /// unsupported_version, unknown_method, not_found, permission_denied,
    /// busy, internal; and from enforcement unavailable, protected, full,
    /// kernel.
    pub code: String,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Response {
    pub v: u32,
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ApiError>,
}

impl Response {
    pub fn ok(result: serde_json::Value) -> Self {
        Response {
            v: VERSION,
            ok: true,
            result: Some(result),
            error: None,
        }
    }

    pub fn err(code: &str, message: impl Into<String>) -> Self {
        Response {
            v: VERSION,
            ok: false,
            result: None,
            error: Some(ApiError {
                code: code.into(),
                message: message.into(),
            }),
        }
    }
}

/// What `status` returns. Every field has a default, so a client reads
/// the answer of an older or newer daemon (fields it lacks are empty).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct StatusView {
    pub version: String,
    pub pid: u32,
    pub uptime_s: u64,
    pub always_on: Vec<String>,
    pub on_demand: OnDemandView,
    /// Kernel features looked for at start-up, and what was found.
    pub kernel_features: Vec<(String, String)>,
    /// This kernel's release (`uname -r`).
    pub kernel: String,
    /// What this kernel gives, signal by signal, with stand-ins and gaps.
    pub signals: Vec<SignalView>,
    /// Records from the kernel per second, over the last second.
    pub events_per_s: f64,
    pub ring_drops: u64,
    pub untracked: u64,
    pub flows_tracked: usize,
    pub storms_active: usize,
    pub incidents_total: u64,
    pub socket: String,
    pub database: String,
    pub metrics: String,
    /// Runtime errors survived since start, by kind (e.g. "map_update",
    /// "store", "probe_attach", "ring", "proc"): after READY nothing is
    /// fatal, so this is where trouble shows.
    pub errors: BTreeMap<String, u64>,
    /// What is degraded right now and why (e.g. "on-demand probes
    /// detached: …", "store failing: …").
    pub degraded: Vec<String>,
    /// The incident writer: whether writes succeed, and what waits.
    pub store: StoreHealthView,
    /// Every bounded table and kernel map: entries, capacity, evictions.
    pub tables: Vec<TableView>,
    /// Anomalies the eBPF programs reported, by kind (e.g. "map_full",
    /// "ring_reserve").
    pub kernel_anomalies: BTreeMap<String, u64>,
    /// Budgets and their decisions.
    #[serde(default)]
    pub enforce: crate::enforce::EnforceSummary,
    /// Call stacks taken, unwound and resolved (see `stacks`).
    #[serde(default)]
    pub stacks: crate::stacks::StackStats,
}

/// Health of the incident store, as the writer sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct StoreHealthView {
    /// "ok" or "failing".
    pub state: String,
    /// The last write error, while failing (and after, until the next one).
    pub last_error: Option<String>,
    /// Writes waiting in the writer's queue.
    pub queued: u64,
    /// Writes given up on since start (queue full, or failed for good).
    pub dropped_writes: u64,
}

impl Default for StoreHealthView {
    fn default() -> Self {
        StoreHealthView {
            state: "ok".into(),
            last_error: None,
            queued: 0,
            dropped_writes: 0,
        }
    }
}

impl StoreHealthView {
    pub fn is_failing(&self) -> bool {
        self.state == "failing"
    }
}

/// One bounded table (user space) or kernel map.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TableView {
    pub name: String,
    pub entries: u64,
    pub capacity: u64,
    /// Entries pushed out to make room since start.
    pub evictions: u64,
}

/// One signal of `status` (see `kernel::coverage::Signal`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SignalView {
    pub name: String,
    pub available: bool,
    pub required: bool,
    pub on_demand: bool,
    pub via: Vec<String>,
    pub fallback: Option<String>,
    pub problems: Vec<String>,
    /// What detection loses without it.
    pub without: String,
}

impl From<&crate::kernel::Signal> for SignalView {
    fn from(s: &crate::kernel::Signal) -> Self {
        SignalView {
            name: s.name.into(),
            available: s.available(),
            required: s.required,
            on_demand: s.on_demand,
            via: s.via.clone(),
            fallback: s.fallback.clone(),
            problems: s.problems.clone(),
            without: s.without.into(),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct OnDemandView {
    pub mode: String,
    pub hooks: Vec<String>,
    pub attached: bool,
    pub attached_for_s: u64,
    pub max_attached_s: u64,
    pub cooling_down: bool,
    pub suspects: Vec<u32>,
}

/// One row of `flows` (what `top` shows).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FlowView {
    pub pid: u32,
    pub comm: String,
    pub proto: String,
    pub destination: String,
    pub attempts_per_s: f64,
    pub failures_per_s: f64,
    pub main_error: Option<String>,
    pub verdict: String,
    pub score: u8,
    pub explanation: Option<String>,
    /// Cores the process used in the last second, for storming processes
    /// (see `cost`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_cores: Option<f64>,
    /// The process's service (systemd unit, container, `namespace/pod`,
    /// "host"; see `ingest::service`), when its cgroup is known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
}

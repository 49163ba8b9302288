//! `[enforce]`: the mode, the budget a storm gets, and who is never
//! throttled.
use serde::{Deserialize, Serialize};

/// What the daemon does about storms.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Nothing enforced automatically; manual `throttle`s still apply.
    #[default]
    Observe,
    /// A storm gets a budget that counts what it would limit and limits nothing.
    DryRun,
    /// A storm gets a budget.
    Enforce,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Observe => "observe",
            Mode::DryRun => "dry-run",
            Mode::Enforce => "enforce",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EnforceConfig {
    pub mode: Mode,
    /// errno a connect denied by a budget fails with.
    pub errno: String,
    /// The retry budget a storm gets: successes deposit this fraction…
    pub retry_ratio: f64,
    /// …on top of this floor, attempts per second…
    pub floor_per_s: f64,
    /// …with a bucket of this many attempts.
    pub burst: u32,
    /// A storm's budget lasts this long, renewed while the storm goes on.
    pub ttl_secs: u64,
    /// Budgets at once (manual and automatic); at most 256.
    pub max_budgets: u32,
    /// Never throttled, on top of PID 1, kernel threads, stormguard
    /// itself, sshd and systemd's own units.
    pub allow: Allowlist,
}

impl Default for EnforceConfig {
    fn default() -> Self {
        EnforceConfig {
            mode: Mode::Observe,
            errno: "ECONNREFUSED".into(),
            retry_ratio: 0.2,
            floor_per_s: 10.0,
            burst: 10,
            ttl_secs: 300,
            max_budgets: 64,
            allow: Allowlist::default(),
        }
    }
}

/// Processes and groups that are never throttled.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Allowlist {
    /// Process names (`comm`).
    pub comm: Vec<String>,
    /// Executable paths.
    pub exe: Vec<String>,
    pub uid: Vec<u32>,
    /// cgroup paths; everything below them too.
    pub cgroup: Vec<String>,
    /// systemd units (`postgresql.service`).
    pub unit: Vec<String>,
}

//! Verdicts: the state of a flow or roll-up, and the one line that says why.
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use super::{
    config::DetectConfig,
    signals::{Assessment, Signals, label},
};
use crate::ingest::{Comm, Destination, Proto};

/// Where a flow is in its life. healthy → suspect → storm → recovering →
/// resolved; a resolved flow that storms again is a new storm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    Healthy,
    Suspect,
    Storm,
    Recovering,
    Resolved,
}

impl State {
    pub fn as_str(&self) -> &'static str {
        match self {
            State::Healthy => "healthy",
            State::Suspect => "suspect",
            State::Storm => "storm",
            State::Recovering => "recovering",
            State::Resolved => "resolved",
        }
    }
}

/// What a verdict is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Subject {
    /// One process towards one destination.
    Flow { pid: u32, dest: Destination },
    /// All children of one parent towards one destination.
    Parent { ppid: u32, dest: Destination },
    /// All processes of one cgroup towards one destination.
    Cgroup { cgroup: u64, dest: Destination },
}

impl Subject {
    pub fn dest(&self) -> Destination {
        match *self {
            Subject::Flow { dest, .. }
            | Subject::Parent { dest, .. }
            | Subject::Cgroup { dest, .. } => dest,
        }
    }
}

/// A change of state, as the engine reports it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VerdictChange {
    pub ts_ns: u64,
    pub subject: Subject,
    pub comm: Comm,
    pub from: State,
    pub to: State,
    pub score: u8,
    /// Start of the run of attempts this verdict is about (time to flag =
    /// `ts_ns - run_start_ns`).
    pub run_start_ns: u64,
    pub persistent_failure: bool,
    pub explanation: String,
}

/// A verdict as shown by `watch`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Verdict {
    pub state: State,
    pub score: u8,
    pub persistent_failure: bool,
    pub explanation: String,
}

fn duration(ns: u64) -> String {
    let s = ns as f64 / 1e9;
    if s >= 1.0 {
        format!("{s:.1} s")
    } else {
        format!("{:.0} ms", s * 1e3)
    }
}

fn gap(us: u32) -> String {
    if us >= 1_000_000 {
        format!("{:.1} s", us as f64 / 1e6)
    } else if us >= 1_000 {
        format!("{} ms", us / 1_000)
    } else {
        format!("{:.1} ms", us as f64 / 1e3)
    }
}

/// The retry budget stormguard measures against (Finagle's and Linkerd's
/// default, `../shared/retry-facts.md`): retries ≤ 20% of requests plus 10
/// retries a second.
pub const RETRY_BUDGET_RATIO: f64 = 0.2;
/// See [`RETRY_BUDGET_RATIO`].
pub const RETRY_BUDGET_FLOOR: f64 = 10.0;

/// Amplification (attempts per success) and how far the retries exceed the
/// published budget, over the attempts whose outcome was seen. Every failed
/// attempt is taken as a retry.
fn budget(s: &mut String, attempts: u64, failures: u64, span_ns: u64) {
    let successes = attempts.saturating_sub(failures);
    if successes == 0 {
        let _ = write!(s, "; amplification: {attempts} attempts, none succeeded");
    } else {
        let _ = write!(
            s,
            "; amplification {:.1} attempts per success",
            attempts as f64 / successes as f64
        );
    }
    let allowed =
        RETRY_BUDGET_RATIO * attempts as f64 + RETRY_BUDGET_FLOOR * (span_ns as f64 / 1e9).max(1.0);
    let over = failures as f64 / allowed;
    if over > 1.0 {
        let _ = write!(
            s,
            ", retries {over:.0}× the budget (20% of requests + 10/s)"
        );
    } else {
        let _ = write!(s, ", retries within the budget (20% of requests + 10/s)");
    }
}

/// The one line: who, where, how many in how long, failing how, how fast,
/// and whether it backs off. Numbers are the current run's.
pub fn explain(
    who: &str,
    dest: &Destination,
    sig: &Signals,
    a: &Assessment,
    syscalls_per_s: Option<f64>,
    cfg: &DetectConfig,
) -> String {
    let mut s = String::with_capacity(160);
    let noun = match (dest.proto, sig.run_requests > 0) {
        (Proto::Udp, _) => "datagrams",
        (Proto::Tcp, true) => "requests",
        (Proto::Tcp, false) => "attempts",
    };
    let span = sig.last_ns.saturating_sub(sig.run_start_ns);
    let _ = write!(
        s,
        "{who} → {dest}: {} {noun} in {}",
        sig.run_attempts,
        duration(span.max(1))
    );
    if let Some(name) = sig
        .last_question
        .as_deref()
        .and_then(|q| crate::ingest::reply::dns_name(q))
    {
        let _ = write!(s, " asking {name}");
    }
    let repeated = a.repeating || a.same_length >= cfg.repeat_ratio;
    if sig.run_failures > 0 {
        // Of the attempts whose outcome was seen (replies are read only
        // once a flow is suspect).
        let known = sig
            .run_attempts
            .saturating_sub(sig.run_unknown)
            .max(sig.run_failures);
        let pct = 100.0 * sig.run_failures as f64 / known.max(1) as f64;
        let main = sig
            .errors
            .main()
            .map(|(c, _)| label::name(c))
            .unwrap_or_default();
        if pct >= 99.5 {
            let _ = write!(s, ", 100% {main}");
        } else {
            let _ = write!(s, ", {:.0}% failed, mostly {main}", pct.min(100.0));
        }
        if repeated {
            let what = if a.repeating {
                "the same"
            } else {
                "same-length"
            };
            let _ = write!(s, ", {what} {} B request each time", sig.last_sent);
        }
    } else if repeated {
        let what = if a.repeating {
            "the same"
        } else {
            "same-length"
        };
        match dest.proto {
            Proto::Tcp => {
                let _ = write!(
                    s,
                    ", {:.0}% {what} {} B request answered with {} B",
                    a.same_content.max(a.same_length) * 100.0,
                    sig.last_sent,
                    sig.last_received
                );
            }
            Proto::Udp => {
                let _ = write!(
                    s,
                    ", {:.0}% {what} {} B datagram, {} replies in the last second",
                    a.same_content.max(a.same_length) * 100.0,
                    sig.last_sent,
                    a.window.replies
                );
            }
        }
    } else {
        let _ = write!(s, ", no failures");
    }
    if let Some(g) = sig.gaps.median_us() {
        let _ = write!(s, ", median gap {}", gap(g));
    }
    match a.growth {
        Some(g) if a.backoff => {
            let _ = write!(s, ", backing off (gaps ×{g:.1})");
        }
        Some(g) if g >= 1.15 && a.window.attempts < 100 => {
            let _ = write!(s, ", gaps growing slowly (×{g:.1})");
        }
        Some(_) => s.push_str(", no backoff"),
        None => {}
    }
    if let Some(r) = syscalls_per_s {
        let _ = write!(s, ", {:.0} syscalls/s", r);
    }
    if sig.run_failures >= RETRY_BUDGET_FLOOR as u64 {
        let known = sig
            .run_attempts
            .saturating_sub(sig.run_unknown)
            .max(sig.run_failures);
        budget(&mut s, known, sig.run_failures, span);
    }
    if a.persistent && !a.storm {
        s.push_str(": persistent failure");
    }
    s
}

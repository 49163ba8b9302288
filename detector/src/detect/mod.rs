//! # Detection engine
//!
//! Tells a runaway retry loop from a busy but healthy client, and says why
//! in one line. Pure: no I/O, no aya, no tokio. Fed [`Observation`]s with
//! their kernel timestamps and ticked with an injected clock, it gives the
//! same verdicts for the same input — live or replayed from a recording.
//!
//! A storm is a sustained high rate of attempts at one destination (per
//! process, or per parent / cgroup across short-lived processes) — or a
//! burst of more than `burst_attempts` — with evidence of failure: errno,
//! RST, timeout, a request the peer closed on without answering, a UDP
//! request left unanswered or refused by ICMP, or a reply that says no
//! (HTTP 4xx/5xx, DNS SERVFAIL, a PostgreSQL or Redis error) — and no
//! backoff. The same request repeated (on one connection or across new
//! connections and processes) makes a flow suspect, so its replies are
//! read; identical requests that succeed are load, not a storm. See
//! [`DetectConfig`] for the thresholds.
//!
//! [`Observation`]: crate::ingest::Observation
pub mod config;
pub mod engine;
pub mod groups;
pub mod probes;
pub mod signals;
pub mod synthetic;
pub mod udp;
pub mod verdict;
pub mod window;

/// Defined at the bottom of the data flow (ingest) so the process table can
/// report its usage without importing the engine; re-exported here for the
/// engine's callers.
pub use crate::ingest::bounded::TableUsage;
pub use config::DetectConfig;

/// How often the engine is ticked (100 ms): verdicts are at most this
/// late. Here, not in `pipeline`, so the engine's own replay helpers need
/// nothing from the layer above.
pub const TICK_NS: u64 = 100_000_000;
pub use engine::{Engine, FlowKey, Limits, SubjectStats};
pub use verdict::{State, Subject, Verdict, VerdictChange};

#[cfg(test)]
mod tests;

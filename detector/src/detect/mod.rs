//! # Detection engine
//!
//! Tells a runaway retry loop from a busy but healthy client, and says why
//! in one line. Pure: no I/O, no aya, no tokio. Fed [`Observation`]s with
//! their kernel timestamps and ticked with an injected clock, it gives the
//! same verdicts for the same input — live or replayed from a recording.
//!
//! A storm is a sustained high rate of attempts at one destination (per
//! process, or per parent / cgroup across short-lived processes) with
//! evidence of failure — errno, RST, timeout, connections that die young
//! with no response — or the same request repeated with the same response,
//! and no backoff. See [`DetectConfig`] for the thresholds.
//!
//! [`Observation`]: crate::ingest::Observation
pub mod config;
pub mod engine;
pub mod probes;
pub mod signals;
pub mod synthetic;
pub mod verdict;
pub mod window;

pub use config::DetectConfig;
pub use engine::{Engine, FlowKey, SubjectStats};
pub use verdict::{State, Subject, Verdict, VerdictChange};

#[cfg(test)]
mod tests;

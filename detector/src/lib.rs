//! # stormguard
//!
//! Finds runaway retry loops from inside the kernel.
//!
//! ## Layout — data flows one way
//! ```text
//! kernel/   load the eBPF programs, attach, read maps (the only aya user)
//!    │  ring buffer records (detector_common::Event)
//!    ▼
//! ingest/   decode records into observations; process table from /proc
//!    ▼
//! pipeline  observations → flows (per-interval counts), detect (engine),
//!    │      record (JSON lines); ticks attach/detach on-demand probes
//!    ▼
//! detect/   pure engine: signals, verdicts, explanations; injected clock
//!    ▼
//! cli/      `stormguard watch | record | replay`
//! ```
pub mod api;
pub mod cli;
pub mod config;
pub mod cost;
pub mod daemon;
pub mod detect;
pub mod enforce;
pub mod flows;
pub mod health;
pub mod incident;
pub mod ingest;
pub mod kernel;
pub mod metrics;
pub mod notify;
pub mod pipeline;
pub mod record;
pub mod service;
pub mod stacks;
pub mod store;

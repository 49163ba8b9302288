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
//! flows     per process × destination counts per interval
//!    ▼
//! suspect   which processes look like a storm → on-demand probes
//!    ▼
//! cli/      `stormguard watch`: the table, JSON rows
//! ```
pub mod cli;
pub mod flows;
pub mod ingest;
pub mod kernel;
pub mod suspect;

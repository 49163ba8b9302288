//! Synthetic traces for tests and benchmarks: a client that retries a
//! failing connect with given gaps, fed through an engine ticked like the
//! live pipeline (every 100 ms).
use std::net::{IpAddr, Ipv4Addr};

use super::{DetectConfig, Engine, State, TICK_NS, VerdictChange};
use crate::ingest::{Comm, ConnectOutcome, Destination, Observation, Proto};

/// 127.0.0.1:`port` over TCP in namespace 1.
pub fn dest(port: u16) -> Destination {
    Destination {
        proto: Proto::Tcp,
        addr: IpAddr::V4(Ipv4Addr::LOCALHOST),
        port,
        netns: 1,
    }
}

/// A refused connect at `ts`.
pub fn refused(ts: u64, pid: u32, dest: Destination) -> Observation {
    Observation::Connect {
        ts_ns: ts,
        start_ns: ts,
        pid,
        comm: Comm::from("client"),
        cgroup: 1,
        dest,
        outcome: ConnectOutcome::Failed {
            errno: libc::ECONNREFUSED,
        },
        rst: true,
        syn_retransmits: 0,
    }
}

/// Timestamps starting at `start` separated by `gaps`.
pub fn times(start: u64, gaps: impl IntoIterator<Item = u64>) -> Vec<u64> {
    let mut t = start;
    let mut out = vec![t];
    for g in gaps {
        t += g;
        out.push(t);
    }
    out
}

/// Feeds observations in time order, ticking every 100 ms, and keeps
/// ticking `tail_ns` after the last one. Returns every change.
pub fn run(engine: &mut Engine, obs: &[Observation], tail_ns: u64) -> Vec<VerdictChange> {
    let mut changes = Vec::new();
    let Some(first) = obs.first() else {
        return changes;
    };
    let mut next_tick = (first.ts_ns() / TICK_NS + 1) * TICK_NS;
    for o in obs {
        while o.ts_ns() >= next_tick {
            changes.extend(engine.tick(next_tick));
            next_tick += TICK_NS;
        }
        engine.observe(o);
    }
    let end = obs.last().map(|o| o.ts_ns()).unwrap_or(0) + tail_ns;
    while next_tick <= end {
        changes.extend(engine.tick(next_tick));
        next_tick += TICK_NS;
    }
    changes
}

/// The first time a subject became a storm, relative to its run's start.
pub fn time_to_storm(changes: &[VerdictChange]) -> Option<u64> {
    changes
        .iter()
        .find(|c| c.to == State::Storm)
        .map(|c| c.ts_ns - c.run_start_ns)
}

/// Runs a failing client with the given gaps through a default engine.
pub fn failing_client(gaps: impl IntoIterator<Item = u64>) -> Vec<VerdictChange> {
    let d = dest(8080);
    let obs: Vec<Observation> = times(1_000_000_000, gaps)
        .into_iter()
        .map(|t| refused(t, 4242, d))
        .collect();
    run(
        &mut Engine::new(DetectConfig::default()),
        &obs,
        6_000_000_000,
    )
}

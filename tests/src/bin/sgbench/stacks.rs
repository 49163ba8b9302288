//! `sgbench stacks`: what call stacks cost a suspect's calls, and how long
//! symbolizing takes. This process loads the real sensors, attaches the
//! on-demand probes and makes itself a suspect; the states are then
//! switched in place (suspect or not, stacks off or on) and interleaved
//! over rounds, so drift lands on all of them.
use std::{collections::BTreeMap, fmt::Write as _, time::Duration};

use anyhow::{Context as _, bail};
use stormguard::{kernel::Sensors, stacks::symbolize::Symbols};

use super::{
    Sample,
    enforce::{fmt_delta, fmt_ns, median},
    refused_connect, udp_send_connected,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum State {
    /// Not a suspect: the on-demand probe returns at its first lookup.
    NotSuspect,
    /// A suspect with stacks off: syscall counts and fingerprints only.
    NoStacks,
    /// A suspect with stacks on: a frame-pointer walk per connect and
    /// send, a counter per (destination, stack), a copy once a second.
    Stacks,
}

const STATES: [State; 3] = [State::NotSuspect, State::NoStacks, State::Stacks];

impl State {
    fn name(self) -> &'static str {
        match self {
            State::NotSuspect => "not suspect",
            State::NoStacks => "suspect, no stacks",
            State::Stacks => "suspect, stacks",
        }
    }
}

struct Workload {
    name: &'static str,
    ops: u64,
    run: fn(u64, Duration) -> anyhow::Result<Sample>,
}

const WORKLOADS: [Workload; 2] = [
    Workload {
        name: "refused connect",
        ops: 3_000,
        run: refused_connect,
    },
    Workload {
        name: "UDP send (connected)",
        ops: 15_000,
        run: udp_send_connected,
    },
];

fn set(s: &mut Sensors, state: State) -> anyhow::Result<()> {
    let me = std::process::id();
    s.set_suspects(if state == State::NotSuspect {
        &[]
    } else {
        std::slice::from_ref(&me)
    })?;
    s.set_stacks(state == State::Stacks)?;
    Ok(())
}

pub fn run(
    rounds: u32,
    ops_scale: f64,
    max: Duration,
    cpu: Option<usize>,
) -> anyhow::Result<String> {
    let mut sensors = Sensors::load().context("loading the sensors")?;
    let mut ring = sensors.take_events()?;
    let mut copy_ring = sensors.take_stack_copies()?;
    sensors
        .attach_on_demand()
        .context("attaching the on-demand probes")?;
    let mut cells: BTreeMap<(usize, State), Vec<f64>> = BTreeMap::new();
    let mut copies = 0;
    for round in 0..rounds as usize {
        let mut line = format!("stacks round {}/{rounds}:", round + 1);
        for (wi, w) in WORKLOADS.iter().enumerate() {
            let _ = write!(line, " {}", w.name);
            for i in 0..STATES.len() {
                let state = STATES[(i + round + wi) % STATES.len()];
                set(&mut sensors, state)?;
                let ops = ((w.ops as f64 * ops_scale).round() as u64).max(1);
                let s = (w.run)(ops, max)?;
                let ns = s.elapsed.as_nanos() as f64 / s.ops as f64;
                let _ = write!(line, " {}={}", state.name(), fmt_ns(ns));
                cells.entry((wi, state)).or_default().push(ns);
                // What the daemon would do between cells: drain the ring,
                // take the counts and copies, so no map or ring fills.
                while ring.drain(|_| {}) > 0 {}
                copies += copy_ring.read().len();
                sensors.take_stack_counts()?;
            }
        }
        eprintln!("{line}");
    }
    set(&mut sensors, State::NotSuspect)?;
    sensors.detach_on_demand()?;

    // Symbolizing: a symbolizer that has never seen this binary, then the
    // same addresses again (its caches warm).
    let me = std::process::id();
    let addrs = [
        run as *const () as u64,
        Symbols::symbolize as *const () as u64,
    ];
    let mut first = Vec::new();
    let mut cached = Vec::new();
    for _ in 0..5 {
        let mut symbols = Symbols::default();
        let t = std::time::Instant::now();
        let frames = symbols
            .symbolize(me, &addrs, None)
            .map_err(anyhow::Error::msg)?;
        first.push(t.elapsed().as_secs_f64() * 1e3);
        if frames.iter().all(|f| f.function.is_none()) {
            bail!("symbolizing our own code found nothing: {frames:?}");
        }
        for _ in 0..20 {
            let t = std::time::Instant::now();
            symbols
                .symbolize(me, &addrs, None)
                .map_err(anyhow::Error::msg)?;
            cached.push(t.elapsed().as_secs_f64() * 1e6);
        }
    }

    let mut out = String::new();
    let _ = writeln!(
        out,
        "\nCall stacks: ns per op for a suspect, stacks off and on (medians of {rounds} interleaved rounds{})",
        cpu.map(|c| format!(", pinned to CPU {c}"))
            .unwrap_or_default()
    );
    let _ = writeln!(
        out,
        "| workload | not suspect | suspect, no stacks | suspect, stacks | stacks add |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|");
    for (wi, w) in WORKLOADS.iter().enumerate() {
        let m = |s| median(&cells[&(wi, s)]);
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} ns |",
            w.name,
            fmt_ns(m(State::NotSuspect)),
            fmt_ns(m(State::NoStacks)),
            fmt_ns(m(State::Stacks)),
            fmt_delta(m(State::Stacks) - m(State::NoStacks))
        );
    }
    let _ = writeln!(
        out,
        "({copies} stack copies taken; at most one per second per process)"
    );
    let _ = writeln!(
        out,
        "Symbolizing 2 addresses of sgbench (with DWARF): first seen {:.1} ms, cached {:.1} µs (medians of {} and {})",
        median(&first),
        median(&cached),
        first.len(),
        cached.len()
    );
    Ok(out)
}

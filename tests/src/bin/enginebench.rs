//! Detection-engine throughput and memory, for `cargo xtask bench`: feeds
//! a synthetic mix of observations to one engine on one thread and counts
//! the bytes it keeps per tracked flow with a counting allocator. Prints
//! one JSON line. No kernel needed.
use std::{
    alloc::{GlobalAlloc, Layout, System},
    hint::black_box,
    net::{IpAddr, Ipv4Addr},
    sync::atomic::{AtomicIsize, Ordering},
    time::Instant,
};

use clap::Parser;
use stormguard::{
    detect::{DetectConfig, Engine},
    ingest::{Comm, ConnectOutcome, Destination, Observation, Proto},
    pipeline::TICK_NS,
};

/// Bytes currently allocated by the process.
struct Counting;
static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: delegates to the system allocator; only adds bookkeeping.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(
            new_size as isize - layout.size() as isize,
            Ordering::Relaxed,
        );
        // SAFETY: same contract as the caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[derive(Parser)]
struct Args {
    /// Observations to feed.
    #[arg(long, default_value_t = 4_000_000)]
    observations: usize,
    /// Distinct flows (process × destination) they belong to.
    #[arg(long, default_value_t = 5_000)]
    flows: u32,
}

fn dest(i: u32, proto: Proto) -> Destination {
    Destination {
        proto,
        addr: IpAddr::V4(Ipv4Addr::new(10, 0, (i >> 8) as u8, i as u8)),
        port: 8000 + (i % 100) as u16,
        netns: 1,
    }
}

/// The i-th observation: flows take turns; a third are refused connects, a
/// third request/response exchanges, a third UDP sends. 1 µs apart.
fn observation(i: usize, flows: u32) -> Observation {
    let flow = (i as u32) % flows;
    let ts = 1_000_000_000 + i as u64 * 1_000;
    let pid = 10_000 + flow;
    let comm = Comm::from("client");
    let cgroup = 1 + (flow % 10) as u64;
    match flow % 3 {
        0 => Observation::Connect {
            ts_ns: ts,
            start_ns: ts,
            pid,
            comm,
            cgroup,
            dest: dest(flow % 200, Proto::Tcp),
            outcome: ConnectOutcome::Failed {
                errno: libc::ECONNREFUSED,
            },
            rst: true,
            syn_retransmits: 0,
        },
        1 => Observation::Exchange {
            ts_ns: ts,
            pid,
            comm,
            cgroup,
            dest: dest(flow % 200, Proto::Tcp),
            sent: 64,
            received: 128 + (i % 7) as u32,
            fingerprint: i as u64,
            sock: flow as u64,
            first: false,
            reply: stormguard::ingest::Reply::Http { status: 200 },
        },
        _ => Observation::UdpSend {
            ts_ns: ts,
            pid,
            comm,
            cgroup,
            dest: dest(flow % 200, Proto::Udp),
            bytes: 40,
            fingerprint: 0,
            sock: flow as u64,
            connected: true,
            question: None,
        },
    }
}

fn main() {
    let args = Args::parse();
    let obs: Vec<Observation> = (0..args.observations)
        .map(|i| observation(i, args.flows))
        .collect();

    // Memory: live bytes an engine holds once every flow has been seen.
    let before = LIVE.load(Ordering::Relaxed);
    let mut engine = Engine::new(DetectConfig::default());
    for o in &obs[..(args.flows as usize * 4).min(obs.len())] {
        engine.observe(o);
    }
    engine.tick(obs[args.flows as usize * 4 - 1].ts_ns());
    let held = LIVE.load(Ordering::Relaxed) - before;
    let tracked = engine.flow_count();
    drop(engine);

    // Throughput: all observations through a fresh engine, ticked every
    // 100 ms of observation time as the daemon does.
    let mut engine = Engine::new(DetectConfig::default());
    let start = Instant::now();
    let mut next_tick = obs[0].ts_ns() + TICK_NS;
    let mut changes = 0usize;
    for o in &obs {
        if o.ts_ns() >= next_tick {
            changes += engine.tick(next_tick).len();
            next_tick += TICK_NS;
        }
        engine.observe(black_box(o));
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{}",
        serde_json::json!({
            "observations": obs.len(),
            "secs": secs,
            "observations_per_s": obs.len() as f64 / secs,
            "flows": tracked,
            "bytes_per_flow": held as f64 / tracked.max(1) as f64,
            "bytes_per_flow_estimate": Engine::bytes_per_flow(),
            "verdict_changes": changes,
        })
    );
}

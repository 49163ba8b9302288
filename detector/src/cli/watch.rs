//! `stormguard watch`: foreground view of connect attempts and failures
//! per process × destination, one table (or JSON rows) per interval.
use std::{
    collections::HashMap,
    io::Write as _,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::Context as _;
use clap::{Args, ValueEnum};
use serde::Serialize;
use tokio::io::{Interest, unix::AsyncFd};

use crate::{
    flows::{FlowRow, FlowTable},
    ingest::{Observation, procs::ProcessTable},
    kernel::{self, Sensors},
    suspect::{ProbePlan, SuspectConfig, SuspectTracker},
};

/// When the on-demand syscall probes are attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OnDemand {
    /// While some process is suspect (the default).
    Auto,
    /// All the time (costs every syscall on the host; for measuring).
    Always,
    /// Never.
    Never,
}

#[derive(Debug, Args)]
pub struct WatchArgs {
    /// One JSON object per row per interval instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Reporting interval in milliseconds.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(100..=60_000))]
    pub interval_ms: u64,
    /// Stop after this many seconds (default: until Ctrl-C).
    #[arg(long)]
    pub duration: Option<u64>,
    /// Failed connects per second that, sustained, make a process suspect.
    #[arg(long, default_value_t = 10.0)]
    pub fail_rate: f64,
    /// Seconds of failures above the rate before a process is suspect.
    #[arg(long, default_value_t = 2)]
    pub sustain_secs: u64,
    /// Longest the on-demand probes stay attached in one go, in seconds.
    #[arg(long, default_value_t = 60)]
    pub probe_max_secs: u64,
    /// When to attach the on-demand syscall probes.
    #[arg(long, value_enum, default_value_t = OnDemand::Auto)]
    pub on_demand: OnDemand,
    /// Rows shown per table (JSON prints them all).
    #[arg(long, default_value_t = 20)]
    pub top: usize,
}

/// One JSON row.
#[derive(Debug, Serialize)]
struct JsonRow<'a> {
    time: f64,
    interval_s: f64,
    pid: u32,
    comm: String,
    ppid: Option<u32>,
    cgroup: Option<&'a str>,
    exe: Option<&'a str>,
    cmdline: Option<&'a str>,
    proto: crate::ingest::Proto,
    destination: String,
    netns: u64,
    attempts: u64,
    attempts_per_s: f64,
    failures: u64,
    failures_per_s: f64,
    established: u64,
    main_error: Option<&'a str>,
    errors: &'a std::collections::BTreeMap<String, u64>,
    udp_sends: u64,
    syscalls_per_s: Option<f64>,
    suspect: bool,
}

struct State {
    flows: FlowTable,
    procs: ProcessTable,
    tracker: SuspectTracker,
    plan: ProbePlan,
    exited: Vec<u32>,
    decode_errors: u64,
    last_syscalls: HashMap<u32, u64>,
}

impl State {
    fn observe(&mut self, obs: &Observation) {
        self.procs.observe(obs);
        self.flows.observe(obs);
        if let Observation::Exit {
            pid,
            group_dead: true,
            ..
        } = obs
        {
            self.exited.push(*pid);
        }
    }
}

pub async fn run(args: WatchArgs) -> anyhow::Result<()> {
    let mut sensors = Sensors::load()?;
    let ring = sensors.take_events()?;
    // SAFETY: the ring's fd stays open as long as the AsyncFd owns the ring.
    let mut ring = unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }
        .map_err(|e| e.into_parts().1)
        .context("registering the ring buffer with tokio")?;
    let interval = Duration::from_millis(args.interval_ms);
    let mut state = State {
        flows: FlowTable::new(),
        procs: ProcessTable::new("/proc", 65_536),
        tracker: SuspectTracker::new(SuspectConfig {
            fail_rate: args.fail_rate,
            sustain_ns: args.sustain_secs * 1_000_000_000,
            max_attached_ns: args.probe_max_secs * 1_000_000_000,
            ..Default::default()
        }),
        plan: ProbePlan {
            attach: false,
            suspects: vec![],
            cooling_down_until_ns: None,
            attached_since_ns: None,
        },
        exited: Vec::new(),
        decode_errors: 0,
        last_syscalls: HashMap::new(),
    };
    state.procs.scan();
    if args.on_demand == OnDemand::Always {
        sensors.attach_on_demand()?;
    }
    eprintln!(
        "stormguard: watching; always-on hooks: {}; on-demand ({}): {}",
        sensors.always_on.join(", "),
        match args.on_demand {
            OnDemand::Auto => "when a process is suspect",
            OnDemand::Always => "always",
            OnDemand::Never => "never",
        },
        Sensors::on_demand_hooks().join(", ")
    );
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    let deadline = args
        .duration
        .map(|s| tokio::time::Instant::now() + Duration::from_secs(s));
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut last_tick = kernel::monotonic_ns();
    loop {
        tokio::select! {
            guard = ring.readable_mut() => {
                let mut guard = guard?;
                guard.get_inner_mut().drain(|r| match r {
                    Ok(obs) => state.observe(&obs),
                    Err(_) => state.decode_errors += 1,
                });
                guard.clear_ready();
            }
            _ = ticker.tick() => {
                let now = kernel::monotonic_ns();
                let elapsed = now - last_tick;
                last_tick = now;
                // Records that are already in the ring belong to this interval.
                ring.get_mut().drain(|r| match r {
                    Ok(obs) => state.observe(&obs),
                    Err(_) => state.decode_errors += 1,
                });
                for ev in sensors.sweep_closed(now, 200_000_000)? {
                    if let Ok(obs) = crate::ingest::decode::from_event(&ev) {
                        state.observe(&obs);
                    }
                }
                tick(&mut sensors, &mut state, &args, now, elapsed)?;
            }
            _ = tokio::signal::ctrl_c() => break,
            _ = sigterm.recv() => break,
            _ = async { tokio::time::sleep_until(deadline.unwrap_or_else(tokio::time::Instant::now)).await }, if deadline.is_some() => break,
        }
    }
    sensors.detach_on_demand()?;
    drop(sensors);
    eprintln!("stormguard: detached");
    Ok(())
}

fn tick(
    sensors: &mut Sensors,
    state: &mut State,
    args: &WatchArgs,
    now: u64,
    elapsed_ns: u64,
) -> anyhow::Result<()> {
    let secs = elapsed_ns as f64 / 1e9;
    let failures = state.flows.failures_by_pid();
    let rows = state.flows.take_interval();

    // Syscall rates of probed processes since the last interval.
    let mut syscall_rate = HashMap::new();
    if sensors.on_demand_attached() {
        let counts = sensors.syscall_counts()?;
        for (pid, n) in &counts {
            let prev = state.last_syscalls.get(pid).copied().unwrap_or(0);
            syscall_rate.insert(*pid, n.saturating_sub(prev) as f64 / secs);
        }
        state.last_syscalls = counts;
    } else {
        state.last_syscalls.clear();
    }

    let suspects = state.plan.suspects.clone();
    if args.json {
        print_json(state, &rows, secs, &syscall_rate, &suspects)?;
    } else {
        print_table(sensors, state, &rows, secs, &syscall_rate, args.top)?;
    }

    for pid in state.exited.drain(..) {
        state.tracker.forget(pid);
    }
    state.procs.reap();

    let plan = state.tracker.update(now, elapsed_ns, &failures);
    match args.on_demand {
        OnDemand::Auto if plan.attach => {
            if !sensors.on_demand_attached() {
                tracing::info!(suspects = ?plan.suspects, "attaching on-demand probes");
            }
            sensors.attach_on_demand()?;
            sensors.set_suspects(&plan.suspects)?;
        }
        OnDemand::Auto => {
            if sensors.on_demand_attached() {
                tracing::info!(
                    capped = plan.cooling_down_until_ns.is_some(),
                    "detaching on-demand probes"
                );
            }
            sensors.detach_on_demand()?;
        }
        OnDemand::Always => sensors.set_suspects(&plan.suspects)?,
        OnDemand::Never => {}
    }
    state.plan = plan;
    Ok(())
}

fn print_json(
    state: &mut State,
    rows: &[FlowRow],
    secs: f64,
    syscall_rate: &HashMap<u32, f64>,
    suspects: &[u32],
) -> anyhow::Result<()> {
    let time = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0);
    let mut out = std::io::stdout().lock();
    for row in rows {
        let info = state.procs.describe(row.key.pid);
        let c = &row.counts;
        let json = JsonRow {
            time,
            interval_s: secs,
            pid: row.key.pid,
            comm: row.comm.to_string(),
            ppid: info.ppid,
            cgroup: info.cgroup.as_deref(),
            exe: info.exe.as_deref(),
            cmdline: info.cmdline.as_deref(),
            proto: row.key.dest.proto,
            destination: row.key.dest.to_string(),
            netns: row.key.dest.netns,
            attempts: c.attempts,
            attempts_per_s: c.attempts as f64 / secs,
            failures: c.failures,
            failures_per_s: c.failures as f64 / secs,
            established: c.established,
            main_error: c.main_error(),
            errors: &c.errors,
            udp_sends: c.udp_sends,
            syscalls_per_s: syscall_rate.get(&row.key.pid).copied(),
            suspect: suspects.contains(&row.key.pid),
        };
        serde_json::to_writer(&mut out, &json)?;
        writeln!(out)?;
    }
    out.flush()?;
    Ok(())
}

fn print_table(
    sensors: &Sensors,
    state: &mut State,
    rows: &[FlowRow],
    secs: f64,
    syscall_rate: &HashMap<u32, f64>,
    top: usize,
) -> anyhow::Result<()> {
    let stats = sensors.stats()?;
    let probes = if sensors.on_demand_attached() {
        let since = state.plan.attached_since_ns.unwrap_or(0);
        format!(
            "attached {}s for pids {:?}",
            kernel::monotonic_ns().saturating_sub(since) / 1_000_000_000,
            state.plan.suspects
        )
    } else if state.plan.cooling_down_until_ns.is_some() {
        "off (cap reached, cooling down)".to_string()
    } else {
        "off".to_string()
    };
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "\n{} flows | on-demand probes: {} | ring drops {} | untracked {} | bad records {}",
        rows.len(),
        probes,
        stats.ring_drops,
        stats.map_full,
        state.decode_errors
    )?;
    writeln!(
        out,
        "{:>7} {:<15} {:<24} {:<4} {:<28} {:>9} {:>9} {:<20} {:>9}",
        "PID",
        "COMM",
        "CGROUP",
        "PROTO",
        "DESTINATION",
        "ATTEMPT/s",
        "FAIL/s",
        "ERROR",
        "SYSCALL/s"
    )?;
    for row in rows.iter().take(top) {
        let info = state.procs.describe(row.key.pid);
        let c = &row.counts;
        let proto = match row.key.dest.proto {
            crate::ingest::Proto::Tcp => "tcp",
            crate::ingest::Proto::Udp => "udp",
        };
        writeln!(
            out,
            "{:>7} {:<15} {:<24} {:<4} {:<28} {:>9.1} {:>9.1} {:<20} {:>9}",
            row.key.pid,
            row.comm.to_string(),
            truncate(info.cgroup.as_deref().unwrap_or("-"), 24),
            proto,
            row.key.dest.to_string(),
            c.attempts as f64 / secs,
            c.failures as f64 / secs,
            c.main_error().unwrap_or("-"),
            syscall_rate
                .get(&row.key.pid)
                .map(|r| format!("{r:.0}"))
                .unwrap_or_else(|| "-".into()),
        )?;
    }
    if rows.len() > top {
        writeln!(out, "… {} more (use --top or --json)", rows.len() - top)?;
    }
    out.flush()?;
    Ok(())
}

/// Keeps the end of a long path, which is the informative part.
fn truncate(s: &str, width: usize) -> String {
    let n = s.chars().count();
    if n <= width {
        s.to_string()
    } else {
        let tail: String = s.chars().skip(n - (width - 1)).collect();
        format!("…{tail}")
    }
}

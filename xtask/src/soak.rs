//! `cargo xtask soak [--minutes N]`: the release daemon under a steady mix
//! of storms, process churn and datagrams for N minutes (10 by default),
//! sampled once a round, mid-load — RSS, tracked flows, every bounded
//! table's entries and the incidents written — then judged flat: nothing may keep growing
//! once the load is steady. Not in CI (too long); the curve goes in notes.
use std::{
    net::{TcpListener, UdpSocket},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::{
    bench::{build, existing, workspace_root},
    daemon::Daemon,
};

#[derive(clap::Args)]
pub struct SoakArgs {
    /// How long to run.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=240))]
    pub minutes: u64,
    /// Use the release binaries already built.
    #[arg(long)]
    pub no_build: bool,
}

/// One sample of the daemon.
struct Sample {
    at: Duration,
    rss_kib: u64,
    flows: u64,
    table_entries: u64,
    kernel_entries: u64,
    incidents: u64,
    errors: u64,
}

/// Kills the child when dropped.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn closed_port() -> anyhow::Result<String> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.to_string())
}

fn sample(d: &Daemon, at: Duration) -> anyhow::Result<Sample> {
    let s = d.status()?;
    let tables = s["tables"].as_array().cloned().unwrap_or_default();
    let sum = |kernel: bool| -> u64 {
        tables
            .iter()
            .filter(|t| t["name"].as_str().unwrap_or("").starts_with("kernel") == kernel)
            .filter_map(|t| t["entries"].as_u64())
            .sum()
    };
    Ok(Sample {
        at,
        rss_kib: d.status_kib("VmRSS"),
        flows: s["flows_tracked"].as_u64().unwrap_or(0),
        table_entries: sum(false),
        kernel_entries: sum(true),
        incidents: s["incidents_total"].as_u64().unwrap_or(0),
        errors: s["errors"]
            .as_object()
            .map(|m| m.values().filter_map(|v| v.as_u64()).sum())
            .unwrap_or(0),
    })
}

/// One round of load (about 30 s): a storm to a fresh destination, 300
/// short-lived processes each making 3 refused connects, 50,000 datagrams.
fn load_round(client: &Path, sink: &str) -> anyhow::Result<Vec<Guard>> {
    let storm = closed_port()?;
    let churn = closed_port()?;
    let spawn = |args: &[&str]| -> anyhow::Result<Guard> {
        Ok(Guard(
            Command::new(client)
                .args(args)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("starting stormclient")?,
        ))
    };
    Ok(vec![
        spawn(&["storm", "--addr", &storm, "--secs", "5"])?,
        spawn(&[
            "spawn", "--count", "300", "--gap-ms", "80", "--", "tcp", "--addr", &churn, "--count",
            "3",
        ])?,
        spawn(&["udp", "--addr", sink, "--count", "50000"])?,
    ])
}

/// Flat: the last third's peak within 25% (plus a little slack) of the
/// first third's.
fn flat(name: &str, samples: &[Sample], f: impl Fn(&Sample) -> u64, slack: u64) -> bool {
    let third = (samples.len() / 3).max(1);
    let first = samples[..third].iter().map(&f).max().unwrap_or(0);
    let last = samples[samples.len() - third..]
        .iter()
        .map(&f)
        .max()
        .unwrap_or(0);
    let ok = last <= first + first / 4 + slack;
    println!(
        "soak: {name}: first third peak {first}, last third peak {last}: {}",
        if ok { "flat" } else { "GROWING" }
    );
    ok
}

pub fn run(args: SoakArgs) -> anyhow::Result<()> {
    let root = workspace_root()?;
    if !args.no_build {
        build(&root)?;
    }
    let target: PathBuf = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"))
        .join("release");
    let bin = existing(target.join("stormguard"))?;
    let client = existing(target.join("stormclient"))?;
    let daemon = Daemon::start(&bin, "soak", "")?;
    let sink = UdpSocket::bind("127.0.0.1:0")?;
    let sink_addr = sink.local_addr()?.to_string();
    let total = Duration::from_secs(args.minutes * 60);
    let start = Instant::now();
    let mut samples = Vec::new();
    println!(
        "soak: {} minutes; sample every 30 s\n{:>6} {:>8} {:>7} {:>9} {:>9} {:>9} {:>6}",
        args.minutes, "t(s)", "RSS MiB", "flows", "tables", "kernel", "incid.", "errors"
    );
    sink.set_nonblocking(true)?;
    while start.elapsed() < total {
        let round = load_round(&client, &sink_addr)?;
        let began = Instant::now();
        let mut s = None;
        while began.elapsed() < Duration::from_secs(30) {
            // Drain the sink so its socket buffer never fills.
            let mut buf = [0u8; 2048];
            while sink.recv(&mut buf).is_ok() {}
            // Sampled mid-load (the storm lasts 5 s): the tables at work.
            if s.is_none() && began.elapsed() >= Duration::from_secs(4) {
                s = Some(sample(&daemon, start.elapsed())?);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        drop(round);
        let s = s.expect("sampled within the round");
        println!(
            "{:>6} {:>8.1} {:>7} {:>9} {:>9} {:>9} {:>6}",
            s.at.as_secs(),
            s.rss_kib as f64 / 1024.0,
            s.flows,
            s.table_entries,
            s.kernel_entries,
            s.incidents,
            s.errors
        );
        samples.push(s);
    }
    drop(daemon);
    if samples.len() < 3 {
        bail!("too few samples to judge (run at least 2 minutes)");
    }
    let ok = [
        flat("RSS (KiB)", &samples, |s| s.rss_kib, 4 * 1024),
        flat("flows", &samples, |s| s.flows, 1_000),
        flat("table entries", &samples, |s| s.table_entries, 1_000),
        flat("kernel map entries", &samples, |s| s.kernel_entries, 1_000),
    ]
    .iter()
    .all(|ok| *ok);
    if !ok {
        bail!("something kept growing under a steady load (see above)");
    }
    println!("soak: flat");
    Ok(())
}

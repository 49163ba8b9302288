//! `sgbench load`: refused loopback connects at a fixed rate, spread over
//! many destinations, for the daemon sections of `cargo xtask bench`
//! (detection latency, daemon CPU and memory per connect rate and per
//! tracked flow).
//!
//! Paced with absolute deadlines (attempt `i` is due at `start + i/rate`),
//! so a late wake-up is caught up rather than lowering the rate, and the
//! rate achieved is printed for the bench to report. Destinations are
//! `127.16.0.0 + i` on one port: every 127/8 address is loopback on Linux,
//! so a connect to a port nobody listens on is refused by RST at once, and
//! each address is a distinct destination (a distinct flow) to the daemon.
use std::{
    io::{ErrorKind, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

/// First address of the destinations (127.16.0.0): away from 127.0.0.1,
/// where the bench's own sockets and other tenants' listeners live.
const BASE: u32 = 0x7f10_0000;

/// Most destinations: 127.16.0.0 – 127.31.255.255 stays inside 127/8.
pub const MAX_DESTS: u32 = 1 << 20;

/// The clock the kernel stamps its events with (bpf_ktime_get_ns) and the
/// one the bench reads on arrival of a verdict.
pub fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into `ts`.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Runs the load and prints `{"event":"first",…}` as soon as the first
/// attempt returned (with its CLOCK_MONOTONIC and CLOCK_REALTIME start),
/// then `{"event":"done",…}` at the end.
pub fn run(rate: f64, secs: f64, dests: u32, port: u16) -> anyhow::Result<()> {
    if !(rate > 0.0 && rate.is_finite() && secs > 0.0 && secs.is_finite()) {
        bail!("--rate and --secs must be positive numbers");
    }
    if dests == 0 || dests > MAX_DESTS {
        bail!("--dests must be in 1..={MAX_DESTS}");
    }
    let period = Duration::from_secs_f64(1.0 / rate);
    let limit = Duration::from_secs_f64(secs);
    let start = Instant::now();
    let (mut attempts, mut refused, mut other) = (0u64, 0u64, 0u64);
    let mut stdout = std::io::stdout();
    loop {
        let due = start + period.saturating_mul(attempts.min(u32::MAX as u64) as u32);
        let now = Instant::now();
        if now.duration_since(start) >= limit {
            break;
        }
        if due > now {
            std::thread::sleep(due - now);
        }
        let ip = Ipv4Addr::from(BASE + (attempts % u64::from(dests)) as u32);
        let (mono, real) = (
            clock_ns(libc::CLOCK_MONOTONIC),
            clock_ns(libc::CLOCK_REALTIME),
        );
        match TcpStream::connect(SocketAddr::from((ip, port))) {
            Err(e) if e.kind() == ErrorKind::ConnectionRefused => refused += 1,
            Err(_) => other += 1,
            Ok(_) => bail!("a connect to {ip}:{port} succeeded; something listens there"),
        }
        attempts += 1;
        if attempts == 1 {
            writeln!(
                stdout,
                "{}",
                serde_json::json!({
                    "event": "first",
                    "pid": std::process::id(),
                    "mono_ns": mono,
                    "real_ns": real,
                })
            )
            .and_then(|()| stdout.flush())
            .context("writing stdout")?;
        }
    }
    let elapsed = start.elapsed();
    writeln!(
        stdout,
        "{}",
        serde_json::json!({
            "event": "done",
            "attempts": attempts,
            "refused": refused,
            "other_errors": other,
            "elapsed_ns": elapsed.as_nanos() as u64,
            "rate": attempts as f64 / elapsed.as_secs_f64(),
        })
    )
    .context("writing stdout")?;
    Ok(())
}

//! The service loop shared by `watch`, `record` and `daemon`: sensors
//! loaded, the ring drained as records arrive, the engine ticked every
//! 100 ms, a report every interval, until Ctrl-C, SIGTERM or a duration.
mod watchdog;
pub mod writer;

use std::time::Duration;

use anyhow::Context as _;
use tokio::io::{Interest, unix::AsyncFd};

use self::watchdog::Watchdog;
use crate::{
    config::Config,
    detect::{VerdictChange, probes::ProbeConfig},
    flows::FlowRow,
    health::kind,
    kernel::{self, DRAIN_MAX, EventRing, Sensors},
    pipeline::{OnDemand, Pipeline, TICK_NS},
};

/// What the shared loop needs.
pub struct Options {
    pub config: Config,
    pub interval_ms: u64,
    pub duration: Option<u64>,
    pub on_demand: OnDemand,
    pub probe_max_secs: u64,
    pub record: Option<Box<dyn std::io::Write + Send>>,
    /// Called once the probes are loaded and attached.
    pub on_ready: Option<OnReady>,
}

/// What `Options::on_ready` holds.
pub type OnReady = Box<dyn FnOnce(&Sensors)>;

/// One finished reporting interval.
pub struct Interval {
    pub rows: Vec<FlowRow>,
    pub secs: f64,
}

/// Loads the sensors and runs the pipeline until Ctrl-C, SIGTERM or the
/// duration: records drained as they arrive, the engine ticked every
/// 100 ms (`on_changes`), a report every interval (`on_interval`).
///
/// Errors by kind: anything that fails before `on_ready` (loading,
/// attaching, the ring) is returned — the environment is wrong and the
/// caller exits 2. After it, kernel and ring errors are counted in
/// `pipe.health` and survived; a callback's error ends the loop, so a
/// caller that must survive (the daemon) handles its own errors, while
/// `watch` stops when its output is gone.
pub async fn drive(
    opts: Options,
    mut on_changes: impl FnMut(&mut Pipeline, &[VerdictChange]) -> anyhow::Result<()>,
    mut on_interval: impl FnMut(&mut Pipeline, &mut Sensors, Interval) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let mut sensors = Sensors::load()?;
    let ring = sensors.take_events()?;
    // SAFETY: the ring's fd stays open as long as the AsyncFd owns the ring.
    let mut ring = unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }
        .map_err(|e| e.into_parts().1)
        .context("registering the ring buffer with tokio")?;
    let copies = sensors.take_stack_copies()?;
    // SAFETY: as above, the AsyncFd owns the ring whose fd it watches.
    let mut copies = unsafe { AsyncFd::register_with_interest(copies, Interest::READABLE) }
        .map_err(|e| e.into_parts().1)
        .context("registering the stack copies ring with tokio")?;
    let mut pipe = Pipeline::new(
        opts.config.detect.clone(),
        ProbeConfig {
            max_attached_ns: opts.probe_max_secs * 1_000_000_000,
            ..Default::default()
        },
        opts.on_demand,
    );
    pipe.procs
        .set_metadata_root(&opts.config.services.metadata_root);
    if let Some(out) = opts.record {
        pipe.record_to(out);
    }
    if opts.on_demand == OnDemand::Always {
        sensors.attach_on_demand()?;
    }
    // Signal handlers before anyone is told we are ready: a SIGTERM that
    // follows READY=1 at once must still stop us cleanly.
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut sigint = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    if let Some(ready) = opts.on_ready {
        ready(&sensors);
    }
    eprintln!(
        "stormguard: watching; always-on hooks: {}; on-demand ({}): {}",
        sensors.always_on().join(", "),
        match opts.on_demand {
            OnDemand::Auto => "when a process is suspect",
            OnDemand::Always => "always",
            OnDemand::Never => "never",
        },
        Sensors::on_demand_hooks().join(", ")
    );
    let lacking: Vec<String> = kernel::caps::missing_for_stacks()
        .iter()
        .map(|c| format!("without {}: cannot {}", c.name, c.why))
        .collect();
    if !lacking.is_empty() {
        pipe.health.degrade(kind::STACKS, lacking.join("; "));
    }
    let interval = Duration::from_millis(opts.interval_ms);
    let start = tokio::time::Instant::now();
    let mut ticker = tokio::time::interval_at(
        start + Duration::from_nanos(TICK_NS),
        Duration::from_nanos(TICK_NS),
    );
    // Ticks missed while a batch ran are not made up in a burst: the
    // next tick covers them (it is biased ahead of the ring below).
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut reporter = tokio::time::interval_at(start + interval, interval);
    let deadline = opts.duration.map(|s| start + Duration::from_secs(s));
    let mut last_report = kernel::monotonic_ns();
    let mut watchdog = Watchdog::from_env();
    loop {
        // Biased, the ring last: a full ring stays ready, and the timers
        // and signals (made ready by the yield below) must win over it.
        tokio::select! {
            biased;
            _ = ticker.tick() => {
                // Records already in the ring belong before this tick.
                drain(ring.get_mut(), &mut pipe);
                if let Some(w) = watchdog.as_mut() {
                    w.tick();
                }
                let changes = pipe.tick(&mut sensors, kernel::monotonic_ns());
                on_changes(&mut pipe, &changes)?;
            }
            _ = reporter.tick() => {
                let now = kernel::monotonic_ns();
                let secs = (now - last_report) as f64 / 1e9;
                last_report = now;
                let rows = pipe.flows.take_interval();
                on_interval(&mut pipe, &mut sensors, Interval { rows, secs })?;
                pipe.end_interval();
            }
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
            _ = async { tokio::time::sleep_until(deadline.unwrap_or(start)).await }, if deadline.is_some() => break,
            // Stack copies at once, not on the next tick: the worker must
            // read a short-lived process's mappings while it still runs.
            guard = copies.readable_mut() => {
                match guard {
                    Ok(mut guard) => {
                        let batch = guard.get_inner_mut().read();
                        if batch.len() < kernel::stacks::COPIES_MAX {
                            guard.clear_ready();
                        }
                        pipe.stacks.on_copies(batch);
                    }
                    Err(e) => {
                        pipe.health.error(kind::RING, "polling the stack copies ring", &e);
                        tokio::time::sleep(Duration::from_nanos(TICK_NS)).await;
                    }
                }
            }
            guard = ring.readable_mut() => {
                match guard {
                    Ok(mut guard) => {
                        let n = drain(guard.get_inner_mut(), &mut pipe);
                        // A full batch means more is waiting: stay ready,
                        // but let the ticker and signals have their turn.
                        // That needs a yield: while the ring stays ready
                        // this future never returns Pending, so the
                        // runtime never polls its timer and signal drivers
                        // and the ticker never fires (a storm from the
                        // first moment went undetected to its end).
                        if n < DRAIN_MAX {
                            guard.clear_ready();
                        } else {
                            drop(guard);
                            tokio::task::yield_now().await;
                        }
                    }
                    Err(e) => {
                        pipe.health.error(kind::RING, "polling the ring buffer", &e);
                        tokio::time::sleep(Duration::from_nanos(TICK_NS)).await;
                    }
                }
            }
        }
    }
    if let Err(e) = sensors.detach_on_demand() {
        tracing::warn!(error = %e, "detaching the on-demand probes at exit");
    }
    drop(sensors);
    eprintln!("stormguard: detached");
    Ok(())
}

/// One bounded batch from the ring into the pipeline; how many were read.
fn drain(ring: &mut EventRing, pipe: &mut Pipeline) -> usize {
    ring.drain(|r| match r {
        Ok(obs) => pipe.observe(&obs),
        Err(_) => pipe.decode_errors += 1,
    })
}

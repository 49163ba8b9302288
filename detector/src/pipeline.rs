//! The live path from sensors to verdicts, shared by `watch`, `record` and
//! the tests: observations go to the process table, the per-interval flow
//! counts, the engine and (optionally) a recording; each tick evaluates the
//! engine and attaches or detaches the on-demand probes.
use std::{collections::HashMap, io::Write};

use crate::{
    detect::{
        DetectConfig, Engine, VerdictChange,
        probes::{ProbeConfig, ProbePlan, ProbeScheduler},
    },
    flows::FlowTable,
    health::{Health, kind},
    ingest::{
        Observation,
        decode::from_event,
        procs::{ProcessTable, READS_PER_TICK},
    },
    kernel::Sensors,
    record::{Line, Recorder},
};

/// When the on-demand probes are attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OnDemand {
    /// While some process is suspect (the default).
    Auto,
    /// All the time (costs every syscall on the host; for measuring).
    Always,
    /// Never.
    Never,
}

pub use crate::detect::TICK_NS;

/// Processes checked for liveness per second (a stat of /proc/PID each).
const SWEEP_PER_SECOND: usize = 2_048;

/// How long after a failed attach of the on-demand probes the next try is.
pub const ATTACH_RETRY_NS: u64 = 30_000_000_000;

pub struct Pipeline {
    pub engine: Engine,
    pub flows: FlowTable,
    pub procs: ProcessTable,
    pub plan: ProbePlan,
    pub on_demand: OnDemand,
    scheduler: ProbeScheduler,
    recorder: Option<Recorder<Box<dyn Write + Send>>>,
    last_syscalls: HashMap<u32, u64>,
    exited: Vec<u32>,
    pub decode_errors: u64,
    /// Runtime errors survived, and what is degraded.
    pub health: Health,
    /// No attach of the on-demand probes before this (after a failure).
    attach_retry_at: Option<u64>,
    /// When the kernel maps were last swept of dead processes.
    last_sweep: u64,
    /// Observations seen so far (for the event rate).
    pub observed: u64,
    /// Successes of budgeted processes, for retry budgets' deposits.
    pub tally: crate::enforce::tally::Tally,
    /// Call stacks of suspects' calls, by flow.
    pub stacks: crate::stacks::StackBook,
}

impl Pipeline {
    pub fn new(detect: DetectConfig, probes: ProbeConfig, on_demand: OnDemand) -> Self {
        let mut procs = ProcessTable::new("/proc", 65_536);
        procs.scan();
        Pipeline {
            engine: Engine::new(detect),
            flows: FlowTable::new(),
            procs,
            plan: ProbePlan::default(),
            on_demand,
            scheduler: ProbeScheduler::new(probes),
            recorder: None,
            last_syscalls: HashMap::new(),
            exited: Vec::new(),
            decode_errors: 0,
            health: Health::default(),
            attach_retry_at: None,
            last_sweep: 0,
            observed: 0,
            tally: Default::default(),
            stacks: Default::default(),
        }
    }

    /// Records every observation and tick from now on.
    pub fn record_to(&mut self, out: Box<dyn Write + Send>) {
        self.recorder = Some(Recorder::new(out));
    }

    pub fn observe(&mut self, obs: &Observation) {
        self.observed += 1;
        if let Some(r) = self.recorder.as_mut()
            && r.write(&Line::Observation(obs.clone())).is_err()
        {
            tracing::warn!("recording failed; stopping it");
            self.recorder = None;
        }
        self.procs.observe(obs);
        self.flows.observe(obs);
        self.engine.observe(obs);
        self.tally.observe(obs);
        if let Observation::Exit {
            pid,
            group_dead: true,
            ..
        } = obs
        {
            self.exited.push(*pid);
        }
    }

    /// Evaluates the engine at `now` (CLOCK_MONOTONIC) after collecting
    /// what the kernel holds back (closed attempts, syscall counts), and
    /// attaches or detaches the on-demand probes. Never fails: a kernel
    /// call that fails is counted in [`Pipeline::health`] and the tick goes
    /// on without what it would have given (see `health`).
    pub fn tick(&mut self, sensors: &mut Sensors, now: u64) -> Vec<VerdictChange> {
        match sensors.sweep_closed(now, 200_000_000) {
            Ok(closed) => {
                for ev in closed {
                    match from_event(&ev) {
                        Ok(obs) => self.observe(&obs),
                        Err(_) => self.decode_errors += 1,
                    }
                }
            }
            Err(e) => self.health.error(kind::MAP, "sweeping closed attempts", &e),
        }
        self.stacks.poll();
        if sensors.on_demand_attached() {
            match sensors.syscall_counts() {
                Ok(counts) => self.syscall_deltas(counts, now),
                Err(e) => self.health.error(kind::MAP, "reading syscall counts", &e),
            }
        } else {
            self.last_syscalls.clear();
        }
        // Once a second: kernel entries of threads and processes that died
        // without their exit being seen (bounded work per call).
        if now.saturating_sub(self.last_sweep) >= 1_000_000_000 {
            self.last_sweep = now;
            if let Err(e) = self.stacks.take(sensors, now) {
                self.health.error(kind::MAP, "taking stack counts", &e);
            }
            if let Err(e) = sensors.sweep() {
                self.health
                    .error(kind::MAP, "sweeping entries of dead processes", &e);
            }
            // Processes gone without their exit seen (it arrived before
            // their fork): an exit now, so every table forgets them.
            for pid in self.procs.sweep_dead(SWEEP_PER_SECOND) {
                self.observe(&Observation::Exit {
                    ts_ns: now,
                    pid,
                    tid: pid,
                    group_dead: true,
                });
            }
        }
        // /proc is read here, a bounded number of processes per tick, never
        // for each ring record (see `ProcessTable::observe`).
        self.procs.resolve_pending(READS_PER_TICK);
        let changes = self.engine.tick(now);
        if let Some(r) = self.recorder.as_mut() {
            let _ = r.write(&Line::Tick { ts_ns: now });
            let _ = r.flush();
        }
        let plan = self.scheduler.plan(now, self.engine.suspects());
        self.apply_plan(sensors, &plan, now);
        self.plan = plan;
        changes
    }

    fn syscall_deltas(&mut self, counts: HashMap<u32, u64>, now: u64) {
        let mut deltas: Vec<(u32, u64)> = counts
            .iter()
            .map(|(pid, n)| {
                (
                    *pid,
                    n.saturating_sub(*self.last_syscalls.get(pid).unwrap_or(&0)),
                )
            })
            .collect();
        deltas.sort_unstable();
        for (pid, count) in deltas {
            self.observe(&Observation::Syscalls {
                ts_ns: now,
                pid,
                count,
            });
        }
        self.last_syscalls = counts;
    }

    /// Attaches or detaches the on-demand probes as the plan says. An
    /// attach that fails (EMFILE in a storm, a verifier refusal) detaches
    /// what did attach and waits [`ATTACH_RETRY_NS`] before trying again:
    /// detection goes on with the always-on probes.
    fn apply_plan(&mut self, sensors: &mut Sensors, plan: &ProbePlan, now: u64) {
        let want = match self.on_demand {
            OnDemand::Auto => plan.attach,
            OnDemand::Always => true,
            OnDemand::Never => return,
        };
        if !want {
            if sensors.on_demand_attached() {
                tracing::info!(
                    capped = plan.cooling_down_until_ns.is_some(),
                    "detaching on-demand probes"
                );
                if let Err(e) = sensors.detach_on_demand() {
                    self.health
                        .error(kind::PROBE_ATTACH, "detaching on-demand probes", &e);
                }
            }
            return;
        }
        if !sensors.on_demand_attached() {
            if self.attach_retry_at.is_some_and(|t| now < t) {
                return;
            }
            tracing::info!(suspects = ?plan.suspects, "attaching on-demand probes");
            if let Err(e) = sensors.attach_on_demand() {
                self.health
                    .error(kind::PROBE_ATTACH, "attaching on-demand probes", &e);
                self.health.degrade(
                    kind::PROBE_ATTACH,
                    format!("on-demand probes off (retrying in 30 s): {e}"),
                );
                if let Err(e) = sensors.detach_on_demand() {
                    self.health
                        .error(kind::PROBE_ATTACH, "detaching on-demand probes", &e);
                }
                self.attach_retry_at = Some(now + ATTACH_RETRY_NS);
                return;
            }
            self.attach_retry_at = None;
            self.health.recover(kind::PROBE_ATTACH);
        }
        if let Err(e) = sensors.set_suspects(&plan.suspects) {
            self.health.error(kind::MAP, "writing the suspects map", &e);
        }
        if let Err(e) = sensors.set_suspect_cgroups(&self.engine.suspect_cgroups()) {
            self.health
                .error(kind::MAP, "writing the suspect cgroups map", &e);
        }
    }

    /// Every bounded table of the detection path: entries, capacity,
    /// evictions (for status and metrics).
    pub fn tables(&self) -> Vec<crate::detect::TableUsage> {
        let mut v = self.engine.tables();
        v.extend(self.procs.tables());
        v.extend(self.flows.tables());
        v.extend(self.stacks.tables());
        v
    }

    /// After an interval has been reported: forget exited processes.
    pub fn end_interval(&mut self) {
        self.exited.clear();
        self.procs.reap();
    }
}

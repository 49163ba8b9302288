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
    ingest::{Observation, decode::from_event, procs::ProcessTable},
    kernel::{KernelError, Sensors},
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

/// Engine ticks per second: verdicts are at most this late.
pub const TICK_NS: u64 = 100_000_000;

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
    /// Observations seen so far (for the event rate).
    pub observed: u64,
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
            observed: 0,
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
    /// attaches or detaches the on-demand probes.
    pub fn tick(
        &mut self,
        sensors: &mut Sensors,
        now: u64,
    ) -> Result<Vec<VerdictChange>, KernelError> {
        for ev in sensors.sweep_closed(now, 200_000_000)? {
            match from_event(&ev) {
                Ok(obs) => self.observe(&obs),
                Err(_) => self.decode_errors += 1,
            }
        }
        if sensors.on_demand_attached() {
            let counts = sensors.syscall_counts()?;
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
        } else {
            self.last_syscalls.clear();
        }
        let changes = self.engine.tick(now);
        if let Some(r) = self.recorder.as_mut() {
            let _ = r.write(&Line::Tick { ts_ns: now });
            let _ = r.flush();
        }
        let plan = self.scheduler.plan(now, self.engine.suspects());
        match self.on_demand {
            OnDemand::Auto if plan.attach => {
                if !sensors.on_demand_attached() {
                    tracing::info!(suspects = ?plan.suspects, "attaching on-demand probes");
                    sensors.attach_on_demand()?;
                }
                sensors.set_suspects(&plan.suspects)?;
                sensors.set_suspect_cgroups(&self.engine.suspect_cgroups())?;
            }
            OnDemand::Auto => {
                if sensors.on_demand_attached() {
                    tracing::info!(
                        capped = plan.cooling_down_until_ns.is_some(),
                        "detaching on-demand probes"
                    );
                    sensors.detach_on_demand()?;
                }
            }
            OnDemand::Always => {
                sensors.attach_on_demand()?;
                sensors.set_suspects(&plan.suspects)?;
                sensors.set_suspect_cgroups(&self.engine.suspect_cgroups())?;
            }
            OnDemand::Never => {}
        }
        self.plan = plan;
        Ok(changes)
    }

    /// After an interval has been reported: forget exited processes.
    pub fn end_interval(&mut self) {
        self.exited.clear();
        self.procs.reap();
    }
}

//! The engine: observations in, verdict changes out, on an injected clock.
//! Deterministic — the same observations and ticks give the same changes —
//! which is what makes a recording replayable.
use std::collections::HashMap;

use super::{
    TableUsage,
    config::DetectConfig,
    groups::{self, Groups},
    signals::{Assessment, Signals, label},
    udp::{self, Owner, UdpSockets},
    verdict::{State, Subject, Verdict, VerdictChange, explain},
    window::{GAP_BUCKETS, WINDOW_NS},
};
use crate::ingest::{
    Comm, Destination, Observation,
    bounded::{batch, lowest},
};

/// A flow: one process towards one destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlowKey {
    pub pid: u32,
    pub dest: Destination,
}

impl FlowKey {
    pub fn subject(&self) -> Subject {
        Subject::Flow {
            pid: self.pid,
            dest: self.dest,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum RollupKey {
    Parent(u32, Destination),
    Cgroup(u64, Destination),
}

impl RollupKey {
    fn of(subject: &Subject) -> Option<RollupKey> {
        match *subject {
            Subject::Flow { .. } => None,
            Subject::Parent { ppid, dest } => Some(RollupKey::Parent(ppid, dest)),
            Subject::Cgroup { cgroup, dest } => Some(RollupKey::Cgroup(cgroup, dest)),
        }
    }

    fn subject(&self) -> Subject {
        match *self {
            RollupKey::Parent(ppid, dest) => Subject::Parent { ppid, dest },
            RollupKey::Cgroup(cgroup, dest) => Subject::Cgroup { cgroup, dest },
        }
    }

    /// How a roll-up is named in explanations.
    fn who(&self, r: &Rollup) -> String {
        let pids = r.distinct.len();
        match *self {
            RollupKey::Parent(ppid, _) => format!(
                "{pids} {} processes of {} (pid {ppid})",
                r.t.comm, r.parent_comm
            ),
            RollupKey::Cgroup(cgroup, _) => {
                format!("{pids} {} processes of cgroup {cgroup}", r.t.comm)
            }
        }
    }
}

/// Signals plus the verdict state built on them.
#[derive(Debug, Clone)]
struct Tracked {
    sig: Signals,
    state: State,
    /// When the state last changed.
    since: u64,
    /// Since when the criteria to leave the current state hold.
    calm_since: Option<u64>,
    comm: Comm,
    score: u8,
    persistent: bool,
}

impl Tracked {
    fn new(comm: Comm, now: u64) -> Self {
        Tracked {
            sig: Signals::default(),
            state: State::Healthy,
            since: now,
            calm_since: None,
            comm,
            score: 0,
            persistent: false,
        }
    }

    /// How much it matters to keep: eviction takes the lowest first, so a
    /// healthy (or resolved) subject always goes before a suspect one, a
    /// suspect before a recovering one, and a storm last; within a state
    /// the lower score and the longer idle go first.
    fn keep_rank(&self) -> (u8, bool, u8, u64) {
        let severity = match self.state {
            State::Healthy | State::Resolved => 0,
            State::Suspect => 1,
            State::Recovering => 2,
            State::Storm => 3,
        };
        (severity, self.persistent, self.score, self.sig.last_ns)
    }

    /// Moves the state machine; returns the previous state if it changed.
    fn step(&mut self, a: &Assessment, now: u64, cfg: &DetectConfig) -> Option<State> {
        let from = self.state;
        let calm_for = |calm_since: &mut Option<u64>, ok: bool| -> u64 {
            if ok {
                now - *calm_since.get_or_insert(now)
            } else {
                *calm_since = None;
                0
            }
        };
        let to = match from {
            State::Healthy | State::Resolved if a.storm => State::Storm,
            State::Healthy | State::Resolved if a.suspect => State::Suspect,
            State::Healthy | State::Resolved => from,
            State::Suspect if a.storm => State::Storm,
            State::Suspect => {
                if calm_for(&mut self.calm_since, !a.suspect) >= cfg.calm_ms * 1_000_000 {
                    State::Healthy
                } else {
                    State::Suspect
                }
            }
            State::Storm if a.calm => State::Recovering,
            State::Storm => State::Storm,
            State::Recovering if a.storm => State::Storm,
            State::Recovering => {
                if calm_for(&mut self.calm_since, a.calm) >= cfg.resolve_ms * 1_000_000 {
                    State::Resolved
                } else {
                    State::Recovering
                }
            }
        };
        self.score = a.score(cfg);
        if to == from {
            return None;
        }
        self.state = to;
        self.since = now;
        self.calm_since = None;
        Some(from)
    }
}

/// A roll-up: the attempts of several processes sharing a parent or a
/// cgroup, towards one destination.
#[derive(Debug, Clone)]
struct Rollup {
    t: Tracked,
    /// Recent member pids with when they last attempted.
    members: [(u32, u64); 8],
    /// Distinct member pids in the current run, up to [`MAX_DISTINCT`]:
    /// "1,000 processes" is what a person must read in an incident.
    distinct: std::collections::HashSet<u32>,
    /// `run_start_ns` of the run `distinct` counts.
    distinct_run: u64,
    /// The parent's own name (Parent roll-ups), from its fork records.
    parent_comm: Comm,
}

/// Most member pids a roll-up counts one by one.
const MAX_DISTINCT: usize = 100_000;

impl Rollup {
    fn touch(&mut self, pid: u32, ts: u64) {
        if self.distinct_run != self.t.sig.run_start_ns {
            self.distinct_run = self.t.sig.run_start_ns;
            self.distinct.clear();
        }
        // A recent member seen since the run began was counted already;
        // only others (new, or back after a while) pay for a hash insert.
        let counted = self
            .members
            .iter()
            .any(|m| m.0 == pid && m.1 > 0 && m.1 >= self.distinct_run);
        if !counted && self.distinct.len() < MAX_DISTINCT {
            self.distinct.insert(pid);
        }
        if let Some(m) = self.members.iter_mut().find(|m| m.0 == pid && m.1 > 0) {
            m.1 = m.1.max(ts);
        } else if let Some(m) = self.members.iter_mut().min_by_key(|m| m.1) {
            *m = (pid, ts);
        }
    }

    fn member_pids(&self) -> Vec<u32> {
        let mut v: Vec<u32> = self
            .members
            .iter()
            .filter(|(p, ts)| *ts > 0 && *p > 0)
            .map(|(p, _)| *p)
            .collect();
        v.sort_unstable();
        v
    }

    fn active_pids(&self, now: u64) -> usize {
        self.members
            .iter()
            .filter(|(_, ts)| *ts > 0 && now.saturating_sub(*ts) <= WINDOW_NS)
            .count()
    }
}

/// A subject's numbers, as an incident records them.
#[derive(Debug, Clone, PartialEq)]
pub struct SubjectStats {
    pub state: State,
    pub comm: Comm,
    /// Attempts per second over the last second.
    pub rate: f64,
    pub run_attempts: u64,
    pub run_failures: u64,
    /// Failure kinds by name, most frequent first.
    pub errors: Vec<(String, u32)>,
    /// The last gaps between attempts, by size.
    pub gap_histogram: Vec<(String, u32)>,
    pub median_gap_us: Option<u32>,
    pub backoff: String,
    pub explanation: String,
    /// Processes in it (one for a flow; a roll-up's most recent, at most 8).
    pub members: Vec<u32>,
    /// How many distinct processes took part in the current run.
    pub member_count: usize,
    pub persistent: bool,
    pub syscalls_per_s: Option<f64>,
}

/// Capacities of the engine's tables, beyond `DetectConfig::max_flows`
/// (the flows). Constants rather than configuration: they only bound
/// memory in a storm of new keys (each is far above what a host shows in
/// normal work), and no detection threshold depends on them. Tests shrink
/// them to drive a table past its bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Parent and cgroup roll-ups (one per group × destination).
    pub rollups: usize,
    /// Flows of exited processes kept until their verdict settles.
    pub ended: usize,
    /// Syscall rates of probed processes (the kernel's SUSPECTS map holds
    /// 16,384 processes).
    pub syscall_rates: usize,
    /// Processes whose parent and cgroup are known.
    pub parents: usize,
    /// Children forked but not yet seen acting as processes.
    pub forks: usize,
    /// UDP sockets watched for replies.
    pub udp_sockets: usize,
    /// Processes' last connected UDP socket (for ICMP errors).
    pub udp_processes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            rollups: 16_384,
            ended: 4_096,
            syscall_rates: 16_384,
            parents: groups::MAX_PROCS,
            forks: groups::MAX_FORKS,
            udp_sockets: udp::MAX_SOCKETS,
            udp_processes: udp::MAX_PROCESSES,
        }
    }
}

/// A syscall rate not measured for this long is forgotten: the probes
/// were detached, or the process left without its exit being seen.
const SYSCALLS_STALE_NS: u64 = 30_000_000_000;

/// Entries each table dropped because it was full.
#[derive(Debug, Clone, Copy, Default)]
struct Evictions {
    flows: u64,
    ended: u64,
    rollups: u64,
    syscalls: u64,
}

/// The detection engine.
pub struct Engine {
    cfg: DetectConfig,
    limits: Limits,
    evicted: Evictions,
    flows: HashMap<FlowKey, Tracked>,
    /// How many flows each process has, so an exit looks for flows only
    /// when there are some (most exiting processes never connected).
    flows_per_pid: HashMap<u32, u32>,
    /// Flows of processes that exited, kept until their verdict settles.
    ended: Vec<(FlowKey, Tracked)>,
    rollups: HashMap<RollupKey, Rollup>,
    /// Parent (and its name) and cgroup of each process: the roll-up keys.
    groups: Groups,
    /// Syscalls per second of probed processes, with when last measured.
    syscalls: HashMap<u32, (u64, f64)>,
    /// UDP sockets: replies awaited, servers.
    udp: UdpSockets,
    now: u64,
    /// When flows were last evaluated (by a tick or a catch-up).
    last_eval: u64,
    /// Changes found while catching up, for the next tick to return.
    backlog: Vec<VerdictChange>,
}

/// Observation time after the last evaluation at which the engine
/// evaluates on its own (ticks come every 100 ms when the host keeps up).
const CATCH_UP_NS: u64 = 200_000_000;

/// DNS: a request/response peer by its port.
const DNS_PORT: u16 = 53;

impl Engine {
    pub fn new(cfg: DetectConfig) -> Self {
        Self::with_limits(cfg, Limits::default())
    }

    /// An engine whose tables hold at most `limits` entries.
    pub fn with_limits(cfg: DetectConfig, limits: Limits) -> Self {
        Engine {
            cfg,
            limits,
            evicted: Evictions::default(),
            flows: HashMap::new(),
            flows_per_pid: HashMap::new(),
            ended: Vec::new(),
            rollups: HashMap::new(),
            groups: Groups::with_capacity(limits.parents, limits.forks),
            syscalls: HashMap::new(),
            udp: UdpSockets::with_capacity(limits.udp_sockets, limits.udp_processes),
            now: 0,
            last_eval: 0,
            backlog: Vec::new(),
        }
    }

    pub fn config(&self) -> &DetectConfig {
        &self.cfg
    }

    /// Parent and cgroup of each process, as the roll-ups use them.
    pub fn groups(&self) -> &Groups {
        &self.groups
    }

    /// Flows tracked now.
    pub fn flow_count(&self) -> usize {
        self.flows.len()
    }

    /// Every table of the engine: entries, capacity and evictions, for
    /// status and metrics.
    pub fn tables(&self) -> Vec<TableUsage> {
        let mut v = vec![
            TableUsage::new(
                "flows",
                self.flows.len(),
                self.cfg.max_flows,
                self.evicted.flows,
            ),
            TableUsage::new(
                "exited_flows",
                self.ended.len(),
                self.limits.ended,
                self.evicted.ended,
            ),
            TableUsage::new(
                "rollups",
                self.rollups.len(),
                self.limits.rollups,
                self.evicted.rollups,
            ),
            TableUsage::new(
                "syscall_rates",
                self.syscalls.len(),
                self.limits.syscall_rates,
                self.evicted.syscalls,
            ),
        ];
        v.extend(self.groups.tables());
        v.extend(self.udp.tables());
        v
    }

    /// Feeds one observation.
    pub fn observe(&mut self, obs: &Observation) {
        self.now = self.now.max(obs.ts_ns());
        // Catching up on a backlog (a flood drained for longer than a
        // tick): judge it as it happened, on the observations' own clock,
        // or everything in it is older than the window by the next tick.
        // Only observations decide when, so a replay does the same.
        if self.now >= self.last_eval.saturating_add(CATCH_UP_NS) && self.last_eval > 0 {
            let changes = self.evaluate(self.now);
            self.backlog.extend(changes);
        }
        match *obs {
            Observation::Connect {
                ts_ns,
                pid,
                comm,
                cgroup,
                dest,
                outcome,
                ..
            } => {
                let failure = label::code(&outcome);
                self.apply(pid, comm, cgroup, dest, ts_ns, |s, cfg| {
                    s.attempt(ts_ns, failure, cfg)
                });
            }
            Observation::UdpSend {
                ts_ns,
                pid,
                comm,
                cgroup,
                dest,
                bytes,
                fingerprint,
                sock,
                connected,
                question,
            } => {
                let owner = Owner {
                    pid,
                    comm,
                    cgroup,
                    dest,
                };
                let sent = self
                    .udp
                    .send(sock, owner, ts_ns, connected, dest.port == DNS_PORT);
                let unanswered = match sent {
                    udp::Send::Server => return,
                    udp::Send::Client { unanswered } => unanswered,
                };
                self.apply(pid, comm, cgroup, dest, ts_ns, |s, cfg| {
                    for _ in 0..unanswered {
                        s.failure(ts_ns, label::NO_REPLY);
                    }
                    s.attempt(ts_ns, None, cfg);
                    s.request(ts_ns, sock, bytes, 0, fingerprint);
                    if let Some(q) = question
                        && s.last_question.as_deref() != Some(&q)
                    {
                        s.last_question = Some(Box::new(q));
                    }
                });
            }
            Observation::Exchange {
                ts_ns,
                pid,
                comm,
                cgroup,
                dest,
                sent,
                received,
                fingerprint,
                sock,
                first,
                reply,
            } => {
                // A last send with no answer as the connection ends (a TLS
                // close_notify, a QUIT) is not a request: the connection's
                // end judges it.
                if received == 0 && !first {
                    return;
                }
                let failure = reply.failure();
                // A response that came but was not read: outcome unknown.
                let unread = received > 0 && !reply.is_known();
                self.apply(pid, comm, cgroup, dest, ts_ns, |s, cfg| {
                    // A request is an attempt of its own when it repeats one
                    // on its connection (keep-alive). Otherwise the connect
                    // was the attempt and this exchange — the first, or a
                    // later step of the protocol — tells its outcome.
                    if !first && s.repeats_on(sock, sent) {
                        s.attempt(ts_ns, failure, cfg);
                        if unread {
                            s.unknown(ts_ns);
                        }
                    } else {
                        if let Some(code) = failure {
                            s.failure(ts_ns, code);
                        }
                        if first && unread {
                            s.unknown(ts_ns);
                        }
                    }
                    s.request(ts_ns, sock, sent, received, fingerprint);
                });
            }
            Observation::UdpRecv {
                ts_ns,
                pid,
                comm,
                cgroup,
                dest,
                sock,
                reply,
                ..
            } => {
                if self.udp.is_server(sock) {
                    return;
                }
                let owner = Owner {
                    pid,
                    comm,
                    cgroup,
                    dest,
                };
                self.udp.reply(sock, owner, ts_ns);
                let failure = reply.failure();
                self.apply(pid, comm, cgroup, dest, ts_ns, |s, _| {
                    s.reply(ts_ns);
                    if let Some(code) = failure {
                        s.failure(ts_ns, code);
                    }
                });
            }
            Observation::UdpError {
                ts_ns,
                pid,
                comm,
                cgroup,
                mut dest,
                errno,
            } => {
                if let Some(netns) = self.udp.error(pid, &dest) {
                    dest.netns = netns;
                    self.apply(pid, comm, cgroup, dest, ts_ns, |s, _| {
                        s.failure(ts_ns, errno)
                    });
                }
            }
            Observation::ConnEnd {
                ts_ns,
                start_ns,
                pid,
                comm,
                cgroup,
                dest,
                sent,
                received,
            } => {
                // A request sent and the connection gone young without a
                // byte back: the peer closed or reset before answering. A
                // connection closed with nothing sent is a port check or a
                // health probe, not a failure.
                if received == 0
                    && sent > 0
                    && ts_ns.saturating_sub(start_ns) < self.cfg.short_lived_ms * 1_000_000
                {
                    self.apply(pid, comm, cgroup, dest, ts_ns, |s, _| {
                        s.failure(ts_ns, label::NO_RESPONSE)
                    });
                }
            }
            Observation::Syscalls { ts_ns, pid, count } => {
                let prev = self.syscalls.get(&pid).map(|(t, _)| *t);
                let rate = match prev.filter(|p| *p < ts_ns) {
                    Some(prev) => count as f64 * 1e9 / (ts_ns - prev) as f64,
                    None => 0.0,
                };
                if prev.is_none() && self.syscalls.len() >= self.limits.syscall_rates {
                    // Full: the longest unmeasured go.
                    let victims = lowest(
                        self.syscalls.iter().map(|(p, (t, _))| (*t, *p)),
                        batch(self.limits.syscall_rates),
                    );
                    self.evicted.syscalls += victims.len() as u64;
                    for p in victims {
                        self.syscalls.remove(&p);
                    }
                }
                self.syscalls.insert(pid, (ts_ns, rate));
            }
            Observation::Fork { child, .. } => {
                // A pid forked while the engine still holds state for it was
                // reused (its exit was missed): the new process starts
                // with none of the old one's flows or rates.
                if self.flows_per_pid.contains_key(&child) || self.syscalls.contains_key(&child) {
                    self.process_exited(child);
                }
                self.groups.observe(obs);
            }
            Observation::Exit {
                pid, group_dead, ..
            } => {
                // Groups keeps an exited process's parent a while: a socket
                // it left open is closed after its exit record (the kernel
                // closes files after sched_process_exit), and that
                // connection's last exchange still belongs to the parent's
                // roll-up. A thread's end drops its id there.
                self.groups.observe(obs);
                if group_dead {
                    self.process_exited(pid);
                }
            }
            Observation::Exec { pid, .. } => {
                // An exec under a pid that exited is a new process whose
                // fork was missed: whatever its predecessor left goes.
                let reused = self.groups.has_exited(pid);
                self.groups.observe(obs);
                if reused {
                    self.process_exited(pid);
                }
            }
            Observation::UdpConnect { .. } => {}
        }
    }

    /// Updates the flow and the roll-ups it belongs to.
    fn apply(
        &mut self,
        pid: u32,
        comm: Comm,
        cgroup: u64,
        dest: Destination,
        ts: u64,
        f: impl Fn(&mut Signals, &DetectConfig),
    ) {
        let key = FlowKey { pid, dest };
        let now = self.now;
        if self.flows.len() >= self.cfg.max_flows && !self.flows.contains_key(&key) {
            self.evict_flows();
        }
        let flow = self.flows.entry(key).or_insert_with(|| {
            *self.flows_per_pid.entry(pid).or_default() += 1;
            Tracked::new(comm, now)
        });
        flow.comm = comm;
        f(&mut flow.sig, &self.cfg);
        let (parent, parent_comm) = match self.groups.attempt(pid, cgroup, ts) {
            Some((p, pcomm)) => (Some(RollupKey::Parent(p, dest)), pcomm),
            None => (None, Comm::default()),
        };
        let group = (cgroup != 0).then_some(RollupKey::Cgroup(cgroup, dest));
        for key in [parent, group].into_iter().flatten() {
            if self.rollups.len() >= self.limits.rollups && !self.rollups.contains_key(&key) {
                let victims = lowest(
                    self.rollups.iter().map(|(k, r)| (r.t.keep_rank(), *k)),
                    batch(self.limits.rollups),
                );
                self.evicted.rollups += victims.len() as u64;
                for k in victims {
                    self.rollups.remove(&k);
                }
            }
            let r = self.rollups.entry(key).or_insert_with(|| Rollup {
                t: Tracked::new(comm, now),
                members: [(0, 0); 8],
                distinct: Default::default(),
                distinct_run: 0,
                parent_comm,
            });
            r.t.comm = comm;
            f(&mut r.t.sig, &self.cfg);
            r.touch(pid, ts);
        }
    }

    /// The table is full: the least important flows go (healthy and
    /// least recently active first, storms last).
    fn evict_flows(&mut self) {
        let victims = lowest(
            self.flows.iter().map(|(k, t)| (t.keep_rank(), *k)),
            batch(self.cfg.max_flows),
        );
        self.evicted.flows += victims.len() as u64;
        for k in victims {
            self.flows.remove(&k);
            self.forget_flow_of(k.pid);
        }
    }

    fn forget_flow_of(&mut self, pid: u32) {
        if let Some(n) = self.flows_per_pid.get_mut(&pid) {
            *n -= 1;
            if *n == 0 {
                self.flows_per_pid.remove(&pid);
            }
        }
    }

    /// Keeps an exited process's unsettled flow; when too many are kept,
    /// the least important go.
    fn keep_ended(&mut self, key: FlowKey, t: Tracked) {
        if self.ended.len() >= self.limits.ended {
            let mut victims = lowest(
                self.ended
                    .iter()
                    .enumerate()
                    .map(|(i, (_, t))| (t.keep_rank(), i)),
                batch(self.limits.ended),
            );
            self.evicted.ended += victims.len() as u64;
            victims.sort_unstable();
            for i in victims.into_iter().rev() {
                self.ended.swap_remove(i);
            }
        }
        self.ended.push((key, t));
    }

    /// A process is gone: its flows leave the table (a reused pid starts
    /// fresh) but stay in `ended` until their verdict settles.
    fn process_exited(&mut self, pid: u32) {
        if self.flows_per_pid.remove(&pid).is_some() {
            let mut keys: Vec<FlowKey> = self
                .flows
                .keys()
                .filter(|k| k.pid == pid)
                .copied()
                .collect();
            keys.sort_unstable();
            for key in keys {
                if let Some(t) = self.flows.remove(&key)
                    && t.state != State::Healthy
                {
                    self.keep_ended(key, t);
                }
            }
        }
        self.syscalls.remove(&pid);
        self.udp.process_exited(pid);
    }

    /// Syscalls per second of a probed process.
    pub fn syscall_rate(&self, pid: u32) -> Option<f64> {
        self.syscalls
            .get(&pid)
            .map(|(_, r)| *r)
            .filter(|r| *r > 0.0)
    }

    /// Evaluates every flow and roll-up at `now`; returns what changed,
    /// in a stable order.
    pub fn tick(&mut self, now: u64) -> Vec<VerdictChange> {
        self.now = self.now.max(now);
        let mut changes = std::mem::take(&mut self.backlog);
        changes.extend(self.evaluate(self.now));
        changes
    }

    /// Evaluates every flow and roll-up at `now`.
    fn evaluate(&mut self, now: u64) -> Vec<VerdictChange> {
        self.last_eval = now;
        self.groups.expire(now);
        for (o, n) in self.udp.sweep(now) {
            self.apply(o.pid, o.comm, o.cgroup, o.dest, now, |s, _| {
                for _ in 0..n {
                    s.failure(now, label::NO_REPLY);
                }
            });
        }
        let mut changes = Vec::new();
        let cfg = self.cfg.clone();

        for (key, t) in self.flows.iter_mut() {
            let a = t.sig.assess(now, &cfg);
            let rate = self
                .syscalls
                .get(&key.pid)
                .map(|(_, r)| *r)
                .filter(|r| *r > 0.0);
            let (comm, pid) = (t.comm, key.pid);
            report(
                &mut changes,
                t,
                &a,
                now,
                &cfg,
                key.subject(),
                || format!("{comm} (pid {pid})"),
                rate,
            );
        }
        for (key, t) in self.ended.iter_mut() {
            let a = t.sig.assess(now, &cfg);
            let (comm, pid) = (t.comm, key.pid);
            report(
                &mut changes,
                t,
                &a,
                now,
                &cfg,
                key.subject(),
                || format!("{comm} (pid {pid}, exited)"),
                None,
            );
        }
        self.ended
            .retain(|(_, t)| !matches!(t.state, State::Healthy | State::Resolved));

        for (key, r) in self.rollups.iter_mut() {
            let mut a = r.t.sig.assess(now, &cfg);
            let pids = r.active_pids(now);
            // One process is its own flow; a roll-up needs several.
            if pids < cfg.rollup_min_pids {
                a.storm = false;
                a.suspect = false;
            }
            let who = key.who(r);
            report(
                &mut changes,
                &mut r.t,
                &a,
                now,
                &cfg,
                key.subject(),
                || who.clone(),
                None,
            );
        }
        self.evict(now);
        changes.sort_by_key(|a| a.subject);
        changes
    }

    /// Drops what has expired: idle healthy flows and roll-ups, and
    /// syscall rates no longer measured. (The tables' bounds are kept as
    /// entries arrive, see [`Limits`].)
    fn evict(&mut self, now: u64) {
        let idle = |t: &Tracked| {
            matches!(t.state, State::Healthy | State::Resolved)
                && now.saturating_sub(t.sig.last_ns) > self.cfg.run_gap_ms * 1_000_000
        };
        let mut gone = Vec::new();
        self.flows.retain(|k, t| {
            let keep = !idle(t);
            if !keep {
                gone.push(k.pid);
            }
            keep
        });
        self.rollups.retain(|_, r| !idle(&r.t));
        for pid in gone {
            self.forget_flow_of(pid);
        }
        self.syscalls
            .retain(|_, (t, _)| now.saturating_sub(*t) < SYSCALLS_STALE_NS);
    }

    /// The current verdict of a flow, if it is tracked.
    pub fn verdict(&self, pid: u32, dest: &Destination) -> Option<Verdict> {
        let t = self.flows.get(&FlowKey { pid, dest: *dest })?;
        let a = t.sig.assess(self.now, &self.cfg);
        Some(Verdict {
            state: t.state,
            score: t.score,
            persistent_failure: t.persistent,
            explanation: explain(
                &format!("{} (pid {pid})", t.comm),
                dest,
                &t.sig,
                &a,
                self.syscall_rate(pid),
                &self.cfg,
            ),
        })
    }

    /// Every flow and roll-up that is not healthy, highest score first.
    pub fn alerts(&self) -> Vec<(Subject, Verdict)> {
        let now = self.now;
        let mut out = Vec::new();
        for (k, t) in &self.flows {
            if (t.state != State::Healthy || t.persistent)
                && let Some(v) = self.verdict(k.pid, &k.dest)
            {
                out.push((
                    Subject::Flow {
                        pid: k.pid,
                        dest: k.dest,
                    },
                    v,
                ));
            }
        }
        for (key, r) in &self.rollups {
            if r.t.state == State::Healthy {
                continue;
            }
            let a = r.t.sig.assess(now, &self.cfg);
            let who = key.who(r);
            let subject = key.subject();
            out.push((
                subject,
                Verdict {
                    state: r.t.state,
                    score: r.t.score,
                    persistent_failure: r.t.persistent,
                    explanation: explain(&who, &subject.dest(), &r.t.sig, &a, None, &self.cfg),
                },
            ));
        }
        out.sort_by(|a, b| b.1.score.cmp(&a.1.score).then(a.0.cmp(&b.0)));
        out
    }

    /// Everything known of one subject now, for incidents.
    /// Whether the engine still tracks `subject` — what
    /// [`Engine::subject_stats`] would answer `Some` for, without building
    /// the stats (callers check thousands of subjects a second).
    pub fn knows(&self, subject: &Subject) -> bool {
        match *subject {
            Subject::Flow { pid, dest } => {
                let key = FlowKey { pid, dest };
                self.flows.contains_key(&key) || self.ended.iter().any(|(k, _)| *k == key)
            }
            Subject::Parent { .. } | Subject::Cgroup { .. } => {
                RollupKey::of(subject).is_some_and(|k| self.rollups.contains_key(&k))
            }
        }
    }

    pub fn subject_stats(&self, subject: &Subject) -> Option<SubjectStats> {
        let (t, who, members, member_count, syscalls) = match *subject {
            Subject::Flow { pid, dest } => {
                let key = FlowKey { pid, dest };
                let t = self
                    .flows
                    .get(&key)
                    .or_else(|| self.ended.iter().find(|(k, _)| *k == key).map(|(_, t)| t))?;
                (
                    t,
                    format!("{} (pid {pid})", t.comm),
                    vec![pid],
                    1,
                    self.syscall_rate(pid),
                )
            }
            Subject::Parent { .. } | Subject::Cgroup { .. } => {
                let key = RollupKey::of(subject)?;
                let r = self.rollups.get(&key)?;
                (&r.t, key.who(r), r.member_pids(), r.distinct.len(), None)
            }
        };
        let a = t.sig.assess(self.now, &self.cfg);
        let hist = t.sig.gaps.histogram();
        Some(SubjectStats {
            state: t.state,
            comm: t.comm,
            rate: a.rate,
            run_attempts: t.sig.run_attempts,
            run_failures: t.sig.run_failures,
            errors: t
                .sig
                .errors
                .all()
                .into_iter()
                .map(|(c, n)| (label::name(c), n))
                .collect(),
            gap_histogram: GAP_BUCKETS
                .iter()
                .zip(hist)
                .map(|(l, n)| (l.to_string(), n))
                .collect(),
            median_gap_us: t.sig.gaps.median_us(),
            backoff: match a.growth {
                Some(g) if a.backoff => format!("backing off (gaps ×{g:.1})"),
                Some(_) => "no backoff".into(),
                None => "too few attempts to tell".into(),
            },
            explanation: explain(&who, &subject.dest(), &t.sig, &a, syscalls, &self.cfg),
            members,
            member_count,
            persistent: t.persistent,
            syscalls_per_s: syscalls,
        })
    }

    /// How severe a suspect or storming subject is, for ordering.
    fn severity(&self, t: &Tracked) -> Severity {
        let rate = t.sig.assess(self.now, &self.cfg).rate;
        Severity {
            storm: t.state == State::Storm,
            score: t.score,
            // Attempts per 1,000 s: an integer, so severities are totally
            // ordered.
            milli_rate: (rate.max(0.0) * 1000.0) as u64,
        }
    }

    /// Processes that are suspect or storming, alone or as members of a
    /// suspect roll-up: the ones the on-demand probes should look at. Most
    /// severe first — storms before suspects, then by score, then by rate
    /// (a process counts as its most severe subject) — so a caller whose
    /// map holds fewer (the kernel's SUSPECTS) keeps the worst by
    /// truncating. Ties by pid.
    pub fn suspects(&self) -> Vec<u32> {
        let hot = |s: State| matches!(s, State::Suspect | State::Storm);
        let mut best: HashMap<u32, Severity> = HashMap::new();
        let mut note = |pid: u32, s: Severity| {
            let e = best.entry(pid).or_insert(s);
            *e = (*e).max(s);
        };
        for (k, t) in self.flows.iter().filter(|(_, t)| hot(t.state)) {
            note(k.pid, self.severity(t));
        }
        for (key, r) in self.rollups.iter().filter(|(_, r)| hot(r.t.state)) {
            let s = self.severity(&r.t);
            // The parent itself: the kernel passes suspicion on to the
            // children it forks next, read from their first request.
            if let RollupKey::Parent(ppid, _) = key {
                note(*ppid, s);
            }
            for (p, ts) in r.members {
                if ts > 0 && self.now.saturating_sub(ts) <= WINDOW_NS && p > 0 {
                    note(p, s);
                }
            }
        }
        by_severity(best)
    }

    /// cgroups of suspect or storming cgroup roll-ups: every process in
    /// them, new ones too, is looked at closely. Most severe first, like
    /// [`Engine::suspects`].
    pub fn suspect_cgroups(&self) -> Vec<u64> {
        let mut best: HashMap<u64, Severity> = HashMap::new();
        for (k, r) in &self.rollups {
            if let RollupKey::Cgroup(id, _) = k
                && matches!(r.t.state, State::Suspect | State::Storm)
            {
                let s = self.severity(&r.t);
                let e = best.entry(*id).or_insert(s);
                *e = (*e).max(s);
            }
        }
        by_severity(best)
    }

    /// Bytes one tracked flow costs, table overhead included (for the bench).
    pub fn bytes_per_flow() -> usize {
        // Entry plus hashbrown's control byte, at its worst load factor (7/8).
        (std::mem::size_of::<(FlowKey, Tracked)>() + 1) * 8 / 7 + std::mem::size_of::<Destination>()
    }
}

/// How severe a hot subject is: compared field by field, storms first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Severity {
    storm: bool,
    score: u8,
    milli_rate: u64,
}

/// Keys most severe first, ties by key.
fn by_severity<K: Ord + Copy>(best: HashMap<K, Severity>) -> Vec<K> {
    let mut v: Vec<(Severity, K)> = best.into_iter().map(|(k, s)| (s, k)).collect();
    v.sort_unstable_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    v.into_iter().map(|(_, k)| k).collect()
}

/// Steps the state machine and records a change (or a newly persistent
/// failure) with its explanation. Explanations are built only here, so the
/// per-observation path never allocates.
#[allow(clippy::too_many_arguments)]
fn report(
    changes: &mut Vec<VerdictChange>,
    t: &mut Tracked,
    a: &Assessment,
    now: u64,
    cfg: &DetectConfig,
    subject: Subject,
    who: impl Fn() -> String,
    syscalls: Option<f64>,
) {
    let changed = t.step(a, now, cfg);
    let newly_persistent = a.persistent && !t.persistent;
    t.persistent = a.persistent;
    if changed.is_none() && !newly_persistent {
        return;
    }
    let from = changed.unwrap_or(t.state);
    changes.push(VerdictChange {
        ts_ns: now,
        subject,
        comm: t.comm,
        from,
        to: t.state,
        score: t.score,
        run_start_ns: t.sig.run_start_ns,
        persistent_failure: t.persistent,
        explanation: explain(&who(), &subject.dest(), &t.sig, a, syscalls, cfg),
    });
}

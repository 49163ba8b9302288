//! Which roll-ups a process's attempts count towards: its parent (from
//! fork records, with the parent's own name) and the cgroup id its
//! attempts carried. The engine rolls flows up by these keys; the incident
//! tracker reads the same table (through [`super::Engine::groups`]) to
//! tell which flows a storming roll-up covers, so 1,000 storming children
//! of one parent make one incident, not 1,000. The process table knows
//! cgroup paths, not the ids the kernel reports.
//!
//! Processes only, never threads: a fork record does not say whether it
//! made a thread or a process, so a child waits in a bounded table of
//! forks until it shows itself as a process (an attempt, an exec or a fork
//! of its own under its own id — a thread only ever appears under its
//! process's id). A busy thread pool therefore churns the fork table, not
//! the parent table, and the parent table holds processes that did
//! something worth a roll-up.
//!
//! Both tables are bounded and evict instead of refusing: exited processes
//! first (oldest exit first), then the least recently active; a full table
//! never stops parents being learned. An exited process is remembered for
//! a grace period: its sockets close after its exit record (their last
//! exchanges still belong to its parent's roll-up), and its flow's last
//! verdicts (a storm seen on the tick after its last connect, a resolution
//! seconds later) still need to be placed.
use std::collections::{HashMap, VecDeque};

use crate::ingest::{
    Comm, Observation,
    bounded::{TableUsage, batch, lowest},
};

/// Most processes remembered (a fork bomb must not grow this).
pub const MAX_PROCS: usize = 65_536;

/// Most children remembered between their fork and their first sign of
/// being a process (threads wait here until they exit or are evicted).
pub const MAX_FORKS: usize = 65_536;

/// How long an exited process stays known: longer than a storm takes to
/// resolve (`resolve_ms`, 5 s by default) after its last attempt.
pub const GRACE_NS: u64 = 30_000_000_000;

type Fast = foldhash::fast::RandomState;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Membership {
    /// 0 = not known (pid 0 forks nothing we see).
    ppid: u32,
    /// The parent's name when it forked this process.
    parent_comm: Comm,
    /// 0 = not seen yet.
    cgroup: u64,
    /// When it exited (observation time), 0 if it has not.
    exited_at: u64,
    /// When it was last seen (fork, exec, attempt): live processes are
    /// evicted least recently seen first.
    seen: u64,
}

/// Parent and cgroup id per process.
#[derive(Debug)]
pub struct Groups {
    /// foldhash: this table is looked up on every observation.
    procs: HashMap<u32, Membership, Fast>,
    /// Children forked but not yet seen as processes (maybe threads).
    forks: HashMap<u32, Membership, Fast>,
    /// Exited processes in exit order, to forget after [`GRACE_NS`] (or
    /// first, when the table is full).
    exited: VecDeque<(u64, u32)>,
    max_procs: usize,
    max_forks: usize,
    proc_evictions: u64,
    fork_evictions: u64,
}

impl Default for Groups {
    fn default() -> Self {
        Self::with_capacity(MAX_PROCS, MAX_FORKS)
    }
}

impl Groups {
    pub fn new() -> Self {
        Self::default()
    }

    /// A table holding at most `procs` processes and `forks` children not
    /// yet seen as processes (tests use small ones).
    pub fn with_capacity(procs: usize, forks: usize) -> Self {
        Groups {
            procs: HashMap::default(),
            forks: HashMap::default(),
            exited: VecDeque::new(),
            max_procs: procs.max(1),
            max_forks: forks.max(1),
            proc_evictions: 0,
            fork_evictions: 0,
        }
    }

    /// Follows forks, execs, exits and the cgroup of every attempt.
    pub fn observe(&mut self, obs: &Observation) {
        let ts = obs.ts_ns();
        match *obs {
            Observation::Connect { pid, cgroup, .. }
            | Observation::UdpConnect { pid, cgroup, .. }
            | Observation::UdpSend { pid, cgroup, .. }
            | Observation::UdpRecv { pid, cgroup, .. }
            | Observation::Exchange { pid, cgroup, .. }
            | Observation::ConnEnd { pid, cgroup, .. } => {
                self.attempt(pid, cgroup, ts);
            }
            Observation::Fork {
                parent,
                child,
                comm,
                ..
            } => {
                // Only a process forks under its own id.
                self.promote(parent, ts);
                // A known pid forked again was reused: the new process
                // inherits nothing of the old one.
                self.procs.remove(&child);
                // A child starts in its parent's cgroup.
                let cgroup = self.procs.get(&parent).map(|p| p.cgroup).unwrap_or(0);
                self.insert_fork(
                    child,
                    Membership {
                        ppid: parent,
                        parent_comm: comm,
                        cgroup,
                        exited_at: 0,
                        seen: ts,
                    },
                );
            }
            Observation::Exec { pid, .. } => {
                // An exec under an id that already exited is a new process
                // whose fork was missed: it starts with nothing.
                if self.has_exited(pid) {
                    self.procs.remove(&pid);
                }
                self.promote(pid, ts);
                if !self.procs.contains_key(&pid) {
                    self.insert(
                        pid,
                        Membership {
                            seen: ts,
                            ..Default::default()
                        },
                    );
                }
            }
            Observation::Exit {
                ts_ns,
                pid,
                tid,
                group_dead,
            } => {
                if tid != pid {
                    self.forks.remove(&tid);
                }
                if group_dead {
                    // Never seen as a process: nothing rolls up to it.
                    self.forks.remove(&pid);
                    if let Some(m) = self.procs.get_mut(&pid)
                        && m.exited_at == 0
                    {
                        m.exited_at = ts_ns.max(1);
                        self.exited.push_back((ts_ns.max(1), pid));
                        if self.exited.len() > self.max_procs {
                            self.forget_oldest_exited(1);
                        }
                    }
                }
            }
            _ => {}
        }
        self.expire(ts);
    }

    /// An attempt (or anything carrying a cgroup id) of `pid` at `ts`:
    /// records its cgroup and returns its parent with the parent's name —
    /// one lookup, on the engine's per-observation path, for a known
    /// process.
    pub fn attempt(&mut self, pid: u32, cgroup: u64, ts: u64) -> Option<(u32, Comm)> {
        if let Some(m) = self.procs.get_mut(&pid) {
            m.seen = m.seen.max(ts);
            if cgroup != 0 {
                m.cgroup = cgroup;
            }
            return (m.ppid != 0).then_some((m.ppid, m.parent_comm));
        }
        let mut m = match self.forks.remove(&pid) {
            Some(m) => m,
            // Nothing to learn: no parent, no cgroup.
            None if cgroup == 0 => return None,
            None => Membership::default(),
        };
        m.seen = m.seen.max(ts);
        if cgroup != 0 {
            m.cgroup = cgroup;
        }
        self.insert(pid, m);
        (m.ppid != 0).then_some((m.ppid, m.parent_comm))
    }

    /// The parent a process's attempts roll up to, if known.
    pub fn parent(&self, pid: u32) -> Option<u32> {
        self.procs.get(&pid).map(|m| m.ppid).filter(|p| *p != 0)
    }

    /// The cgroup id a process's attempts carried, if any were seen.
    pub fn cgroup(&self, pid: u32) -> Option<u64> {
        self.procs.get(&pid).map(|m| m.cgroup).filter(|c| *c != 0)
    }

    /// Whether `pid` is a process known to have exited (still in its grace
    /// period): anything new under that id is another process.
    pub fn has_exited(&self, pid: u32) -> bool {
        self.procs.get(&pid).is_some_and(|m| m.exited_at != 0)
    }

    /// Processes known now.
    pub fn len(&self) -> usize {
        self.procs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.procs.is_empty()
    }

    /// Children forked and not yet seen as processes.
    pub fn forks_len(&self) -> usize {
        self.forks.len()
    }

    /// The parent table and the fork table, for status and metrics.
    pub fn tables(&self) -> [TableUsage; 2] {
        [
            TableUsage::new(
                "parents",
                self.procs.len(),
                self.max_procs,
                self.proc_evictions,
            ),
            TableUsage::new(
                "forks",
                self.forks.len(),
                self.max_forks,
                self.fork_evictions,
            ),
        ]
    }

    /// A child seen acting as a process leaves the fork table for the
    /// process table.
    fn promote(&mut self, pid: u32, ts: u64) {
        if let Some(m) = self.procs.get_mut(&pid) {
            m.seen = m.seen.max(ts);
        } else if let Some(mut m) = self.forks.remove(&pid) {
            m.seen = m.seen.max(ts);
            self.insert(pid, m);
        }
    }

    fn insert(&mut self, pid: u32, m: Membership) {
        if self.procs.len() >= self.max_procs && !self.procs.contains_key(&pid) {
            let n = batch(self.max_procs);
            let gone = self.forget_oldest_exited(n);
            if gone < n {
                // Exited ones are gone; then the least recently seen.
                let victims = lowest(
                    self.procs
                        .iter()
                        .map(|(p, m)| ((m.exited_at == 0, m.seen), *p)),
                    n - gone,
                );
                self.proc_evictions += victims.len() as u64;
                for p in victims {
                    self.procs.remove(&p);
                }
            }
        }
        self.procs.insert(pid, m);
    }

    fn insert_fork(&mut self, pid: u32, m: Membership) {
        if self.forks.len() >= self.max_forks && !self.forks.contains_key(&pid) {
            let victims = lowest(
                self.forks.iter().map(|(p, m)| (m.seen, *p)),
                batch(self.max_forks),
            );
            self.fork_evictions += victims.len() as u64;
            for p in victims {
                self.forks.remove(&p);
            }
        }
        self.forks.insert(pid, m);
    }

    /// Forgets up to `n` exited processes before their grace period ends,
    /// oldest exit first (the table is full); returns how many.
    fn forget_oldest_exited(&mut self, n: usize) -> usize {
        let mut gone = 0;
        while gone < n
            && let Some((at, pid)) = self.exited.pop_front()
        {
            if self.procs.get(&pid).is_some_and(|m| m.exited_at == at) {
                self.procs.remove(&pid);
                gone += 1;
            }
        }
        self.proc_evictions += gone as u64;
        gone
    }

    /// Forgets processes that exited more than the grace period ago.
    pub fn expire(&mut self, now: u64) {
        while let Some(&(at, pid)) = self.exited.front() {
            if now.saturating_sub(at) < GRACE_NS {
                break;
            }
            self.exited.pop_front();
            // Unless the pid was reused since (a new entry, not exited).
            if self.procs.get(&pid).is_some_and(|m| m.exited_at == at) {
                self.procs.remove(&pid);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{detect::synthetic, ingest::Comm};

    fn fork(ts: u64, parent: u32, child: u32) -> Observation {
        Observation::Fork {
            ts_ns: ts,
            parent,
            child,
            comm: Comm::from("x"),
        }
    }

    fn exit(ts: u64, pid: u32, tid: u32) -> Observation {
        Observation::Exit {
            ts_ns: ts,
            pid,
            tid,
            group_dead: pid == tid,
        }
    }

    fn exec(ts: u64, pid: u32) -> Observation {
        Observation::Exec {
            ts_ns: ts,
            pid,
            comm: Comm::from("y"),
        }
    }

    /// An attempt of `pid` carrying cgroup `cgroup` (0: none).
    fn attempt(ts: u64, pid: u32, cgroup: u64) -> Observation {
        let mut o = synthetic::refused(ts, pid, synthetic::dest(80));
        if let Observation::Connect { cgroup: c, .. } = &mut o {
            *c = cgroup;
        }
        o
    }

    #[test]
    fn parents_and_cgroups_follow_forks_attempts_and_exits() {
        let mut g = Groups::new();
        let d = synthetic::dest(80);
        g.observe(&synthetic::refused(1, 100, d)); // cgroup 1
        g.observe(&fork(2, 100, 101));
        // Not known as a process until it acts as one.
        assert_eq!((g.parent(101), g.len(), g.forks_len()), (None, 1, 1));
        g.observe(&attempt(3, 101, 0));
        assert_eq!((g.parent(101), g.cgroup(101)), (Some(100), Some(1)));
        assert_eq!((g.parent(100), g.cgroup(100)), (None, Some(1)));
        assert_eq!(g.cgroup(7), None);
        // A thread comes and goes without a trace.
        g.observe(&fork(3, 101, 102));
        assert_eq!((g.len(), g.forks_len()), (2, 1));
        g.observe(&exit(4, 101, 102));
        assert_eq!((g.len(), g.forks_len()), (2, 0));
        // An exited process is remembered for the grace period only.
        g.observe(&exit(5, 101, 101));
        g.observe(&synthetic::refused(5 + GRACE_NS - 1, 100, d));
        assert_eq!(g.parent(101), Some(100));
        g.observe(&synthetic::refused(5 + GRACE_NS, 100, d));
        assert_eq!(g.parent(101), None);
        // A reused pid is not forgotten for its predecessor's exit.
        g.observe(&exit(10 * GRACE_NS, 100, 100));
        g.observe(&fork(10 * GRACE_NS + 1, 1, 100));
        g.observe(&exec(10 * GRACE_NS + 2, 100));
        g.observe(&synthetic::refused(12 * GRACE_NS, 100, d));
        assert_eq!(g.parent(100), Some(1));
        assert_eq!(g.tables()[0].evictions + g.tables()[1].evictions, 0);
    }

    #[test]
    fn threads_never_fill_the_parent_table() {
        let mut g = Groups::new();
        g.observe(&attempt(1, 10, 3));
        for tid in 11..1_011 {
            g.observe(&fork(2, 10, tid));
        }
        assert_eq!((g.len(), g.forks_len()), (1, 1_000));
        for tid in 11..1_011 {
            g.observe(&exit(3, 10, tid));
        }
        assert_eq!((g.len(), g.forks_len()), (1, 0));
    }

    #[test]
    fn full_tables_evict_exited_then_least_recent_and_keep_learning() {
        let mut g = Groups::with_capacity(8, 4);
        // 20 children of pid 1, each attempting once, none exiting.
        for child in 100..120u32 {
            let ts = u64::from(child);
            g.observe(&fork(ts, 1, child));
            g.observe(&attempt(ts, child, 5));
        }
        let [parents, forks] = g.tables();
        assert_eq!((parents.entries, parents.capacity), (8, 8));
        // Batch of one at capacity 8: one eviction per child beyond 8.
        assert_eq!(parents.evictions, 12);
        assert_eq!((forks.entries, forks.evictions), (0, 0));
        // The most recently seen survived, and parents are still learned.
        assert_eq!(g.parent(111), None);
        assert_eq!((g.parent(112), g.parent(119)), (Some(1), Some(1)));
        // Exited go first, oldest exit first, before any live one.
        g.observe(&exit(200, 118, 118));
        g.observe(&exit(201, 119, 119));
        g.observe(&fork(202, 1, 300));
        g.observe(&attempt(203, 300, 5));
        assert_eq!(g.parent(300), Some(1));
        assert_eq!(g.parent(118), None, "oldest exit evicted");
        assert_eq!(g.parent(119), Some(1), "exited later, kept");
        assert_eq!(g.parent(112), Some(1), "live, kept");
        assert_eq!((g.len(), g.tables()[0].evictions), (8, 13));
        // Threads that never act: the fork table is bounded too.
        for tid in 400..410 {
            g.observe(&fork(300 + u64::from(tid), 1, tid));
        }
        let forks = g.tables()[1];
        assert_eq!((forks.entries, forks.capacity, forks.evictions), (4, 4, 6));
        assert_eq!(g.len(), 8, "threads never reach the parent table");
    }

    #[test]
    fn a_reused_pid_inherits_neither_parent_nor_cgroup() {
        let mut g = Groups::new();
        g.observe(&fork(1, 10, 50));
        g.observe(&attempt(2, 50, 7));
        assert_eq!((g.parent(50), g.cgroup(50)), (Some(10), Some(7)));
        g.observe(&exit(3, 50, 50));
        assert!(g.has_exited(50));
        // Forked again by another parent: nothing of the old one.
        g.observe(&fork(4, 20, 50));
        assert_eq!((g.parent(50), g.cgroup(50)), (None, None));
        g.observe(&attempt(5, 50, 0));
        assert_eq!((g.parent(50), g.cgroup(50)), (Some(20), None));
        // An exec after an exit whose fork was missed: a stranger.
        g.observe(&fork(6, 10, 60));
        g.observe(&attempt(7, 60, 7));
        g.observe(&exit(8, 60, 60));
        g.observe(&exec(9, 60));
        assert!(!g.has_exited(60));
        assert_eq!((g.parent(60), g.cgroup(60)), (None, None));
    }
}

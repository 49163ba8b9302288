//! Which roll-ups a process's attempts count towards: its parent (from
//! fork records, with the parent's own name) and the cgroup id its
//! attempts carried. The engine rolls flows up by these keys; the incident
//! tracker reads the same table (through [`super::Engine::groups`]) to
//! tell which flows a storming roll-up covers, so 1,000 storming children
//! of one parent make one incident, not 1,000. The process table knows
//! cgroup paths, not the ids the kernel reports.
//!
//! Bounded, and an exited process is remembered for a grace period: its
//! sockets close after its exit record (their last exchanges still belong
//! to its parent's roll-up), and its flow's last verdicts (a storm seen on
//! the tick after its last connect, a resolution seconds later) still need
//! to be placed.
use std::collections::{HashMap, VecDeque};

use crate::ingest::{Comm, Observation};

/// Most processes remembered (a fork bomb must not grow this).
const MAX_PROCS: usize = 65_536;

/// How long an exited process stays known: longer than a storm takes to
/// resolve (`resolve_ms`, 5 s by default) after its last attempt.
const GRACE_NS: u64 = 30_000_000_000;

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
}

/// Parent and cgroup id per process.
#[derive(Debug, Default)]
pub struct Groups {
    /// foldhash: this table is looked up on every observation.
    procs: HashMap<u32, Membership, foldhash::fast::RandomState>,
    /// Exited processes in exit order, to forget after [`GRACE_NS`].
    exited: VecDeque<(u64, u32)>,
}

impl Groups {
    pub fn new() -> Self {
        Self::default()
    }

    /// Follows forks, exits and the cgroup of every attempt.
    pub fn observe(&mut self, obs: &Observation) {
        match *obs {
            Observation::Connect { pid, cgroup, .. }
            | Observation::UdpConnect { pid, cgroup, .. }
            | Observation::UdpSend { pid, cgroup, .. }
            | Observation::UdpRecv { pid, cgroup, .. }
            | Observation::Exchange { pid, cgroup, .. }
            | Observation::ConnEnd { pid, cgroup, .. } => {
                self.attempt(pid, cgroup);
            }
            Observation::Fork {
                parent,
                child,
                comm,
                ..
            } => {
                // A child starts in its parent's cgroup. Thread creation
                // also arrives as a fork; the thread's entry goes when it
                // exits.
                let cgroup = self.procs.get(&parent).map(|p| p.cgroup).unwrap_or(0);
                if let Some(m) = self.entry(child) {
                    *m = Membership {
                        ppid: parent,
                        parent_comm: comm,
                        cgroup,
                        exited_at: 0,
                    };
                }
            }
            Observation::Exit {
                ts_ns,
                pid,
                tid,
                group_dead,
            } => {
                if tid != pid {
                    self.procs.remove(&tid);
                }
                if group_dead && let Some(m) = self.procs.get_mut(&pid) {
                    m.exited_at = ts_ns.max(1);
                    self.exited.push_back((ts_ns.max(1), pid));
                }
            }
            _ => {}
        }
        self.expire(obs.ts_ns());
    }

    /// An attempt (or anything carrying a cgroup id) of `pid`: records its
    /// cgroup and returns its parent with the parent's name — one lookup,
    /// on the engine's per-observation path.
    pub fn attempt(&mut self, pid: u32, cgroup: u64) -> Option<(u32, Comm)> {
        if cgroup == 0 {
            let m = self.procs.get(&pid)?;
            return (m.ppid != 0).then_some((m.ppid, m.parent_comm));
        }
        let m = self.entry(pid)?;
        m.cgroup = cgroup;
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

    /// Processes known now.
    pub fn len(&self) -> usize {
        self.procs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.procs.is_empty()
    }

    fn entry(&mut self, pid: u32) -> Option<&mut Membership> {
        if self.procs.len() >= MAX_PROCS && !self.procs.contains_key(&pid) {
            return None;
        }
        Some(self.procs.entry(pid).or_default())
    }

    /// Forgets processes that exited more than the grace period ago.
    pub fn expire(&mut self, now: u64) {
        while let Some(&(at, pid)) = self.exited.front() {
            if now.saturating_sub(at) < GRACE_NS {
                break;
            }
            self.exited.pop_front();
            // Unless the pid was reused (forked again) since.
            if self
                .procs
                .get(&pid)
                .is_some_and(|m| m.exited_at == at.max(1))
            {
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

    #[test]
    fn parents_and_cgroups_follow_forks_attempts_and_exits() {
        let mut g = Groups::new();
        let d = synthetic::dest(80);
        g.observe(&synthetic::refused(1, 100, d)); // cgroup 1
        g.observe(&fork(2, 100, 101));
        assert_eq!((g.parent(101), g.cgroup(101)), (Some(100), Some(1)));
        assert_eq!((g.parent(100), g.cgroup(100)), (None, Some(1)));
        assert_eq!(g.cgroup(7), None);
        // A thread comes and goes without a trace.
        g.observe(&fork(3, 101, 102));
        g.observe(&exit(4, 101, 102));
        assert_eq!(g.len(), 2);
        // An exited process is remembered for the grace period only.
        g.observe(&exit(5, 101, 101));
        g.observe(&synthetic::refused(5 + GRACE_NS - 1, 100, d));
        assert_eq!(g.parent(101), Some(100));
        g.observe(&synthetic::refused(5 + GRACE_NS, 100, d));
        assert_eq!(g.parent(101), None);
        // A reused pid is not forgotten for its predecessor's exit.
        g.observe(&exit(10 * GRACE_NS, 100, 100));
        g.observe(&fork(10 * GRACE_NS + 1, 1, 100));
        g.observe(&synthetic::refused(12 * GRACE_NS, 100, d));
        assert_eq!(g.parent(100), Some(1));
    }
}

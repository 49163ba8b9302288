//! Successes of budgeted processes, counted from the observations as they
//! pass, for retry budgets' deposits. Only processes and cgroups the
//! enforcer names are counted, in a bounded map drained every tick.
use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
};

use crate::ingest::Observation;

/// At most this many (process, destination) counts between two drains.
pub const MAX_KEYS: usize = 4096;

/// A success: who, in which cgroup, towards where.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Key {
    pub pid: u32,
    pub cgroup: u64,
    pub addr: IpAddr,
    pub port: u16,
}

/// A deposit needs a reply that was read: one not read (the probes were
/// not looking) proves nothing, and a storm of 503s whose heads were
/// missed must not earn its budget back. A reply read but of a protocol
/// not parsed counts, or healthy callers of such protocols would never
/// earn a deposit.
fn reply_says_ok(reply: &crate::ingest::reply::Reply) -> bool {
    !matches!(reply, crate::ingest::reply::Reply::NotRead) && reply.failure().is_none()
}

#[derive(Debug, Default)]
pub struct Tally {
    pids: HashSet<u32>,
    cgroups: HashSet<u64>,
    counts: HashMap<Key, u64>,
    /// Successes not counted because the map was full.
    pub dropped: u64,
}

impl Tally {
    /// Counts only these from now on.
    pub fn watch(&mut self, pids: HashSet<u32>, cgroups: HashSet<u64>) {
        self.pids = pids;
        self.cgroups = cgroups;
    }

    /// Counts `obs` if it is a success of a watched process: a request
    /// answered without error, or a datagram answered.
    pub fn observe(&mut self, obs: &Observation) {
        if self.pids.is_empty() && self.cgroups.is_empty() {
            return;
        }
        let (pid, cgroup, dest) = match obs {
            Observation::Exchange {
                pid,
                cgroup,
                dest,
                received,
                reply,
                ..
            } if *received > 0 && reply_says_ok(reply) => (*pid, *cgroup, dest),
            Observation::UdpRecv {
                pid,
                cgroup,
                dest,
                reply,
                ..
            } if reply_says_ok(reply) => (*pid, *cgroup, dest),
            _ => return,
        };
        if !self.pids.contains(&pid) && !self.cgroups.contains(&cgroup) {
            return;
        }
        let key = Key {
            pid,
            cgroup,
            addr: dest.addr,
            port: dest.port,
        };
        if let Some(n) = self.counts.get_mut(&key) {
            *n += 1;
        } else if self.counts.len() < MAX_KEYS {
            self.counts.insert(key, 1);
        } else {
            self.dropped += 1;
        }
    }

    /// Everything counted since the last drain.
    pub fn drain(&mut self) -> Vec<(Key, u64)> {
        self.counts.drain().collect()
    }
}

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
            } if *received > 0 && reply.failure().is_none() => (*pid, *cgroup, dest),
            Observation::UdpRecv {
                pid,
                cgroup,
                dest,
                reply,
                ..
            } if reply.failure().is_none() => (*pid, *cgroup, dest),
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

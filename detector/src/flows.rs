//! Counts per process × destination for one reporting interval: what
//! `stormguard watch` prints and what the integration tests check exactly.
use std::collections::{BTreeMap, HashMap};

use serde::Serialize;

use crate::ingest::{
    Comm, Destination, Observation,
    bounded::{TableUsage, batch, lowest},
    failure,
};

/// Most flows counted in one interval. A scan of a /16 or a fan-out to
/// thousands of peers must not grow the table (nor the interval's output)
/// without limit; past it the rows with the fewest failures, then the
/// fewest attempts, are dropped — the failing ones are what is shown.
pub const MAX_ROWS: usize = 16_384;

/// A flow: one process talking to one destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct FlowKey {
    pub pid: u32,
    pub dest: Destination,
}

/// What one flow did in an interval.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct FlowCounts {
    /// TCP connect() calls (every outcome), UDP connect() calls and UDP sends.
    pub attempts: u64,
    pub established: u64,
    /// Failed: errno, closed before an answer, or failed before the SYN.
    pub failures: u64,
    /// TCP failures by code (see `ingest::failure`); [`FlowCounts::errors`]
    /// names them.
    pub failure_codes: BTreeMap<i32, u64>,
    pub udp_connects: u64,
    pub udp_sends: u64,
    pub udp_bytes: u64,
    /// Datagrams received on a connected UDP socket (replies).
    pub udp_recvs: u64,
    /// ICMP errors reported on UDP sockets (destination netns unknown: 0).
    pub udp_errors: u64,
    /// Request/response exchanges on client TCP connections.
    pub exchanges: u64,
    /// RSTs received while connecting.
    pub resets: u64,
    pub syn_retransmits: u64,
}

impl FlowCounts {
    /// Failures by name ("ECONNREFUSED", "closed in SYN_SENT", "failed
    /// before SYN").
    pub fn errors(&self) -> BTreeMap<String, u64> {
        self.failure_codes
            .iter()
            .map(|(c, n)| (failure::name(*c), *n))
            .collect()
    }

    /// The most frequent failure, or None without failures.
    pub fn main_error(&self) -> Option<String> {
        self.failure_codes
            .iter()
            .max_by_key(|(code, n)| (**n, std::cmp::Reverse(**code)))
            .map(|(code, _)| failure::name(*code))
    }
}

pub use failure::{CLOSED_IN_SYN_SENT, FAILED_BEFORE_SYN};

/// One row of a finished interval.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FlowRow {
    pub key: FlowKey,
    pub comm: Comm,
    pub counts: FlowCounts,
}

/// Flows seen in the current interval.
pub struct FlowTable {
    flows: HashMap<FlowKey, (Comm, FlowCounts)>,
    capacity: usize,
    /// Rows dropped because the table was full, since start.
    evictions: u64,
}

impl Default for FlowTable {
    fn default() -> Self {
        Self::with_capacity(MAX_ROWS)
    }
}

impl FlowTable {
    pub fn new() -> Self {
        Self::default()
    }

    /// A table of at most `capacity` rows per interval.
    pub fn with_capacity(capacity: usize) -> Self {
        FlowTable {
            flows: HashMap::new(),
            capacity: capacity.max(1),
            evictions: 0,
        }
    }

    /// The interval's rows now, the capacity, and rows dropped since start.
    pub fn tables(&self) -> Vec<TableUsage> {
        vec![TableUsage::new(
            "interval_flows",
            self.flows.len(),
            self.capacity,
            self.evictions,
        )]
    }

    /// Adds one observation; process records are ignored here.
    pub fn observe(&mut self, obs: &Observation) {
        match *obs {
            Observation::Connect {
                pid,
                comm,
                dest,
                outcome,
                rst,
                syn_retransmits,
                ..
            } => {
                let c = self.entry(pid, dest, comm);
                c.attempts += 1;
                c.resets += u64::from(rst);
                c.syn_retransmits += u64::from(syn_retransmits);
                match failure::code(&outcome) {
                    None => c.established += 1,
                    Some(code) => {
                        c.failures += 1;
                        *c.failure_codes.entry(code).or_default() += 1;
                    }
                }
            }
            Observation::UdpConnect {
                pid, comm, dest, ..
            } => {
                let c = self.entry(pid, dest, comm);
                c.attempts += 1;
                c.udp_connects += 1;
            }
            Observation::UdpSend {
                pid,
                comm,
                dest,
                bytes,
                ..
            } => {
                let c = self.entry(pid, dest, comm);
                c.attempts += 1;
                c.udp_sends += 1;
                c.udp_bytes += u64::from(bytes);
            }
            Observation::UdpRecv {
                pid, comm, dest, ..
            } => self.entry(pid, dest, comm).udp_recvs += 1,
            Observation::Exchange {
                pid, comm, dest, ..
            } => self.entry(pid, dest, comm).exchanges += 1,
            Observation::UdpError {
                pid, comm, dest, ..
            } => self.entry(pid, dest, comm).udp_errors += 1,
            Observation::ConnEnd { .. }
            | Observation::Syscalls { .. }
            | Observation::Fork { .. }
            | Observation::Exec { .. }
            | Observation::Exit { .. } => {}
        }
    }

    fn entry(&mut self, pid: u32, dest: Destination, comm: Comm) -> &mut FlowCounts {
        let key = FlowKey { pid, dest };
        if self.flows.len() >= self.capacity && !self.flows.contains_key(&key) {
            let victims = lowest(
                self.flows
                    .iter()
                    .map(|(k, (_, c))| ((c.failures, c.attempts), *k)),
                batch(self.capacity),
            );
            self.evictions += victims.len() as u64;
            for k in victims {
                self.flows.remove(&k);
            }
        }
        let e = self
            .flows
            .entry(key)
            .or_insert_with(|| (comm, FlowCounts::default()));
        e.0 = comm;
        &mut e.1
    }

    /// Ends the interval: its rows, busiest first.
    pub fn take_interval(&mut self) -> Vec<FlowRow> {
        let mut rows: Vec<FlowRow> = self
            .flows
            .drain()
            .map(|(key, (comm, counts))| FlowRow { key, comm, counts })
            .collect();
        rows.sort_by(|a, b| {
            b.counts
                .attempts
                .cmp(&a.counts.attempts)
                .then(a.key.cmp(&b.key))
        });
        rows
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ingest::{ConnectOutcome, Proto};

    fn dest(port: u16) -> Destination {
        Destination {
            proto: Proto::Tcp,
            addr: "127.0.0.1".parse().unwrap(),
            port,
            netns: 1,
        }
    }

    fn connect(pid: u32, port: u16, outcome: ConnectOutcome) -> Observation {
        Observation::Connect {
            ts_ns: 0,
            start_ns: 0,
            pid,
            comm: Comm::from("client"),
            cgroup: 1,
            dest: dest(port),
            outcome,
            rst: matches!(
                outcome,
                ConnectOutcome::Failed {
                    errno: libc::ECONNREFUSED
                }
            ),
            syn_retransmits: 0,
        }
    }

    #[test]
    fn counts_per_process_and_destination() {
        let mut t = FlowTable::new();
        let refused = ConnectOutcome::Failed {
            errno: libc::ECONNREFUSED,
        };
        for _ in 0..5 {
            t.observe(&connect(1, 80, refused));
        }
        t.observe(&connect(
            1,
            80,
            ConnectOutcome::FailedBeforeSyn { errno: None },
        ));
        t.observe(&connect(1, 443, ConnectOutcome::Established));
        t.observe(&connect(2, 80, ConnectOutcome::Established));
        let rows = t.take_interval();
        assert_eq!(rows.len(), 3);
        let r = &rows[0];
        assert_eq!((r.key.pid, r.key.dest.port), (1, 80));
        assert_eq!(r.counts.attempts, 6);
        assert_eq!(r.counts.failures, 6);
        assert_eq!(r.counts.resets, 5);
        assert_eq!(r.counts.errors()["ECONNREFUSED"], 5);
        assert_eq!(r.counts.errors()[FAILED_BEFORE_SYN], 1);
        assert_eq!(r.counts.main_error().as_deref(), Some("ECONNREFUSED"));
        assert_eq!(rows[1].counts.established, 1);
        assert_eq!(rows[1].counts.main_error(), None);
        assert!(t.take_interval().is_empty(), "an interval starts empty");
    }

    #[test]
    fn rows_are_capped_and_failing_ones_kept() {
        let mut t = FlowTable::with_capacity(16);
        let refused = ConnectOutcome::Failed {
            errno: libc::ECONNREFUSED,
        };
        // Two failing flows first, then 40 healthy ones.
        t.observe(&connect(1, 1, refused));
        t.observe(&connect(2, 2, refused));
        for port in 100..140 {
            t.observe(&connect(3, port, ConnectOutcome::Established));
        }
        // Full at 16, then batches of 2: the 26 beyond are 13 batches.
        assert_eq!(t.tables(), [TableUsage::new("interval_flows", 16, 16, 26)]);
        let rows = t.take_interval();
        assert_eq!(rows.len(), 16);
        assert_eq!(rows.iter().filter(|r| r.counts.failures == 1).count(), 2);
        // The next interval starts empty; evictions stay counted.
        assert_eq!(t.tables()[0].entries, 0);
        assert_eq!(t.tables()[0].evictions, 26);
    }

    #[test]
    fn udp_sends_and_connects() {
        let mut t = FlowTable::new();
        let d = Destination {
            proto: Proto::Udp,
            ..dest(53)
        };
        t.observe(&Observation::UdpConnect {
            ts_ns: 0,
            pid: 3,
            comm: Comm::from("dig"),
            cgroup: 1,
            dest: d,
        });
        for _ in 0..3 {
            t.observe(&Observation::UdpSend {
                ts_ns: 0,
                pid: 3,
                comm: Comm::from("dig"),
                cgroup: 1,
                dest: d,
                bytes: 40,
                fingerprint: 0,
                sock: 9,
                connected: true,
                question: None,
            });
        }
        let rows = t.take_interval();
        assert_eq!(rows.len(), 1);
        let c = &rows[0].counts;
        assert_eq!(
            (c.attempts, c.udp_connects, c.udp_sends, c.udp_bytes),
            (4, 1, 3, 120)
        );
        assert_eq!(c.failures, 0);
    }
}

//! Counts per process × destination for one reporting interval: what
//! `stormguard watch` prints and what the integration tests check exactly.
use std::collections::{BTreeMap, HashMap};

use serde::Serialize;

use crate::ingest::{Comm, ConnectOutcome, Destination, Observation};

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
    /// TCP failures by errno name ("ECONNREFUSED"); "closed in SYN_SENT"
    /// and "failed before SYN" when the kernel gave no errno.
    pub errors: BTreeMap<String, u64>,
    pub udp_connects: u64,
    pub udp_sends: u64,
    pub udp_bytes: u64,
    /// Datagrams received on a connected UDP socket (replies).
    pub udp_recvs: u64,
    /// Request/response exchanges on client TCP connections.
    pub exchanges: u64,
    /// RSTs received while connecting.
    pub resets: u64,
    pub syn_retransmits: u64,
}

impl FlowCounts {
    /// The most frequent failure, or None without failures.
    pub fn main_error(&self) -> Option<&str> {
        self.errors
            .iter()
            .max_by_key(|(name, n)| (**n, std::cmp::Reverse(name.as_str())))
            .map(|(name, _)| name.as_str())
    }
}

/// Label used when a failure has no errno.
pub const FAILED_BEFORE_SYN: &str = "failed before SYN";
/// Label used when a socket closed in SYN_SENT without an error report.
pub const CLOSED_IN_SYN_SENT: &str = "closed in SYN_SENT";

/// The name of an errno ("ECONNREFUSED"), or its number.
pub fn errno_name(errno: i32) -> String {
    let name = match errno {
        libc::ECONNREFUSED => "ECONNREFUSED",
        libc::ETIMEDOUT => "ETIMEDOUT",
        libc::ECONNRESET => "ECONNRESET",
        libc::EHOSTUNREACH => "EHOSTUNREACH",
        libc::ENETUNREACH => "ENETUNREACH",
        libc::EADDRNOTAVAIL => "EADDRNOTAVAIL",
        libc::EACCES => "EACCES",
        libc::EPERM => "EPERM",
        libc::ECONNABORTED => "ECONNABORTED",
        libc::EPROTO => "EPROTO",
        libc::EINVAL => "EINVAL",
        libc::EAFNOSUPPORT => "EAFNOSUPPORT",
        libc::ENOBUFS => "ENOBUFS",
        _ => return format!("errno {errno}"),
    };
    name.to_string()
}

/// One row of a finished interval.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FlowRow {
    pub key: FlowKey,
    pub comm: Comm,
    pub counts: FlowCounts,
}

/// Flows seen in the current interval.
#[derive(Default)]
pub struct FlowTable {
    flows: HashMap<FlowKey, (Comm, FlowCounts)>,
}

impl FlowTable {
    pub fn new() -> Self {
        Self::default()
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
                let label = match outcome {
                    ConnectOutcome::Established => {
                        c.established += 1;
                        return;
                    }
                    ConnectOutcome::Failed { errno } => errno_name(errno),
                    ConnectOutcome::Closed => CLOSED_IN_SYN_SENT.to_string(),
                    ConnectOutcome::FailedBeforeSyn { errno: Some(e) } => errno_name(e),
                    ConnectOutcome::FailedBeforeSyn { errno: None } => FAILED_BEFORE_SYN.into(),
                };
                c.failures += 1;
                *c.errors.entry(label).or_default() += 1;
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
            Observation::ConnEnd { .. }
            | Observation::Syscalls { .. }
            | Observation::Fork { .. }
            | Observation::Exec { .. }
            | Observation::Exit { .. } => {}
        }
    }

    fn entry(&mut self, pid: u32, dest: Destination, comm: Comm) -> &mut FlowCounts {
        let e = self
            .flows
            .entry(FlowKey { pid, dest })
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
    use crate::ingest::Proto;

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
        assert_eq!(r.counts.errors["ECONNREFUSED"], 5);
        assert_eq!(r.counts.errors[FAILED_BEFORE_SYN], 1);
        assert_eq!(r.counts.main_error(), Some("ECONNREFUSED"));
        assert_eq!(rows[1].counts.established, 1);
        assert_eq!(rows[1].counts.main_error(), None);
        assert!(t.take_interval().is_empty(), "an interval starts empty");
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

    #[test]
    fn errno_names() {
        assert_eq!(errno_name(libc::ECONNREFUSED), "ECONNREFUSED");
        assert_eq!(errno_name(libc::ETIMEDOUT), "ETIMEDOUT");
        assert_eq!(errno_name(9999), "errno 9999");
    }
}

//! Decoding `detector_common::Event` bytes into [`Observation`]s. Pure: no
//! kernel needed, so every kind and edge is unit-tested here.
use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use detector_common::{AF_INET, AF_INET6, Event, HEAD_BYTES, flags, kind, outcome};
use serde::{Deserialize, Serialize};

use super::Reply;

/// A task name as the kernel keeps it: up to 16 bytes, NUL padded. Kept
/// inline so decoding an event allocates nothing.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Comm(pub [u8; 16]);

impl Comm {
    pub fn as_str(&self) -> std::borrow::Cow<'_, str> {
        let end = self.0.iter().position(|&b| b == 0).unwrap_or(16);
        String::from_utf8_lossy(&self.0[..end])
    }
}

impl From<&str> for Comm {
    fn from(s: &str) -> Self {
        let mut out = [0u8; 16];
        let n = s.len().min(15);
        out[..n].copy_from_slice(&s.as_bytes()[..n]);
        Comm(out)
    }
}

impl fmt::Display for Comm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.as_str())
    }
}

impl fmt::Debug for Comm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.as_str())
    }
}

impl Serialize for Comm {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.as_str())
    }
}

impl<'de> Deserialize<'de> for Comm {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Ok(Comm::from(s.as_str()))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    Tcp,
    Udp,
}

/// Where a process connects or sends. `netns` is the network namespace
/// cookie: 127.0.0.1:80 in two namespaces is two destinations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Destination {
    pub proto: Proto,
    pub addr: IpAddr,
    pub port: u16,
    pub netns: u64,
}

impl fmt::Display for Destination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.addr {
            IpAddr::V4(a) => write!(f, "{a}:{}", self.port),
            IpAddr::V6(a) => write!(f, "[{a}]:{}", self.port),
        }
    }
}

/// How one TCP connect() ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "result")]
pub enum ConnectOutcome {
    Established,
    /// Closed from SYN_SENT with this errno (ECONNREFUSED, ETIMEDOUT, …).
    Failed {
        errno: i32,
    },
    /// Closed from SYN_SENT with no error report: given up by the caller.
    Closed,
    /// Never reached SYN_SENT; the errno is known only while the on-demand
    /// `sys_exit_connect` probe is attached.
    FailedBeforeSyn {
        errno: Option<i32>,
    },
}

impl ConnectOutcome {
    pub fn is_failure(&self) -> bool {
        !matches!(self, ConnectOutcome::Established)
    }
}

/// One decoded record. Times are CLOCK_MONOTONIC nanoseconds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Observation {
    /// A TCP connect() and its outcome.
    Connect {
        ts_ns: u64,
        start_ns: u64,
        pid: u32,
        comm: Comm,
        /// cgroup v2 id of the connecting task.
        cgroup: u64,
        dest: Destination,
        outcome: ConnectOutcome,
        rst: bool,
        syn_retransmits: u32,
    },
    /// connect() on a UDP socket.
    UdpConnect {
        ts_ns: u64,
        pid: u32,
        comm: Comm,
        cgroup: u64,
        dest: Destination,
    },
    /// One UDP datagram sent.
    UdpSend {
        ts_ns: u64,
        pid: u32,
        comm: Comm,
        cgroup: u64,
        dest: Destination,
        bytes: u32,
        /// Content fingerprint (DNS transaction id skipped); 0 = not taken.
        fingerprint: u64,
        /// Opaque id of the sending socket.
        sock: u64,
        /// Sent on a connected socket, whose replies are counted.
        #[serde(default)]
        connected: bool,
        /// A probed DNS query's question bytes (after the header).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        question: Option<[u8; HEAD_BYTES]>,
    },
    /// One datagram received on a connected UDP socket.
    UdpRecv {
        ts_ns: u64,
        pid: u32,
        comm: Comm,
        cgroup: u64,
        dest: Destination,
        bytes: u32,
        /// Opaque id of the receiving socket.
        #[serde(default)]
        sock: u64,
        /// What the reply said, when the receiver was probed.
        #[serde(default)]
        reply: Reply,
    },
    /// An ICMP error reported on a UDP socket (port unreachable…). The
    /// destination's netns is unknown (0).
    UdpError {
        ts_ns: u64,
        pid: u32,
        comm: Comm,
        cgroup: u64,
        dest: Destination,
        errno: i32,
    },
    /// One request and its response on a client TCP connection.
    Exchange {
        ts_ns: u64,
        pid: u32,
        comm: Comm,
        cgroup: u64,
        dest: Destination,
        sent: u32,
        received: u32,
        /// Content fingerprint of the request; 0 = not taken.
        fingerprint: u64,
        /// Opaque id of the connection's socket.
        sock: u64,
        /// The connection's first request: its connect was the attempt.
        #[serde(default)]
        first: bool,
        /// What the response said, when the client was probed.
        #[serde(default)]
        reply: Reply,
    },
    /// A client TCP connection ended.
    ConnEnd {
        ts_ns: u64,
        /// When it was established.
        start_ns: u64,
        pid: u32,
        comm: Comm,
        cgroup: u64,
        dest: Destination,
        sent: u32,
        received: u32,
    },
    /// Syscalls a probed process made since the last such record.
    Syscalls {
        ts_ns: u64,
        pid: u32,
        count: u64,
    },
    Fork {
        ts_ns: u64,
        parent: u32,
        child: u32,
        comm: Comm,
    },
    Exec {
        ts_ns: u64,
        pid: u32,
        comm: Comm,
    },
    Exit {
        ts_ns: u64,
        pid: u32,
        tid: u32,
        group_dead: bool,
    },
}

impl Observation {
    pub fn ts_ns(&self) -> u64 {
        match self {
            Observation::Connect { ts_ns, .. }
            | Observation::UdpConnect { ts_ns, .. }
            | Observation::UdpSend { ts_ns, .. }
            | Observation::UdpRecv { ts_ns, .. }
            | Observation::UdpError { ts_ns, .. }
            | Observation::Exchange { ts_ns, .. }
            | Observation::ConnEnd { ts_ns, .. }
            | Observation::Syscalls { ts_ns, .. }
            | Observation::Fork { ts_ns, .. }
            | Observation::Exec { ts_ns, .. }
            | Observation::Exit { ts_ns, .. } => *ts_ns,
        }
    }
}

/// Why a record could not be decoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("record is {0} bytes, expected {expected}", expected = std::mem::size_of::<Event>())]
    Size(usize),
    #[error("unknown record kind {0}")]
    Kind(u8),
    #[error("unknown address family {0}")]
    Family(u16),
    #[error("unknown connect outcome {0}")]
    Outcome(u8),
}

pub(crate) fn address(family: u16, bytes: &[u8; 16]) -> Result<IpAddr, DecodeError> {
    match family {
        AF_INET => Ok(IpAddr::V4(Ipv4Addr::new(
            bytes[0], bytes[1], bytes[2], bytes[3],
        ))),
        AF_INET6 => Ok(IpAddr::V6(Ipv6Addr::from(*bytes))),
        other => Err(DecodeError::Family(other)),
    }
}

fn destination(ev: &Event, proto: Proto) -> Result<Destination, DecodeError> {
    Ok(Destination {
        proto,
        addr: address(ev.family, &ev.daddr)?,
        port: ev.dport,
        netns: ev.netns,
    })
}

/// Bytes of a DNS question a send record carries.
pub const QUESTION_BYTES: usize = HEAD_BYTES;

/// The reply a record carries, if its head was read.
fn reply(ev: &Event) -> Reply {
    if ev.flags & flags::HEAD == 0 {
        Reply::NotRead
    } else if ev.kind == kind::TCP_EXCHANGE && ev.dport == 53 {
        // DNS over TCP: a 2-byte length, then the message.
        Reply::parse(&ev.head[2..], ev.dport)
    } else {
        Reply::parse(&ev.head, ev.dport)
    }
}

/// Turns an already-copied [`Event`] into an observation.
pub fn from_event(ev: &Event) -> Result<Observation, DecodeError> {
    let comm = Comm(ev.comm);
    let errno = (ev.errno != 0).then_some(ev.errno);
    Ok(match ev.kind {
        kind::TCP_OUTCOME => Observation::Connect {
            ts_ns: ev.ts_ns,
            start_ns: ev.start_ns,
            pid: ev.tgid,
            comm,
            cgroup: ev.cgroup,
            dest: destination(ev, Proto::Tcp)?,
            outcome: match ev.outcome {
                outcome::ESTABLISHED => ConnectOutcome::Established,
                outcome::FAILED => ConnectOutcome::Failed { errno: ev.errno },
                outcome::CLOSED => ConnectOutcome::Closed,
                other => return Err(DecodeError::Outcome(other)),
            },
            rst: ev.flags & flags::RST != 0,
            syn_retransmits: ev.aux,
        },
        kind::TCP_PRE_SYN_FAIL => Observation::Connect {
            ts_ns: ev.ts_ns,
            start_ns: ev.start_ns,
            pid: ev.tgid,
            comm,
            cgroup: ev.cgroup,
            dest: destination(ev, Proto::Tcp)?,
            outcome: ConnectOutcome::FailedBeforeSyn { errno },
            rst: false,
            syn_retransmits: 0,
        },
        kind::UDP_CONNECT => Observation::UdpConnect {
            ts_ns: ev.ts_ns,
            pid: ev.tgid,
            comm,
            cgroup: ev.cgroup,
            dest: destination(ev, Proto::Udp)?,
        },
        kind::UDP_SEND => Observation::UdpSend {
            ts_ns: ev.ts_ns,
            pid: ev.tgid,
            comm,
            cgroup: ev.cgroup,
            dest: destination(ev, Proto::Udp)?,
            bytes: ev.aux,
            fingerprint: ev.hash,
            sock: ev.sock,
            connected: ev.flags & flags::CONNECTED != 0,
            question: (ev.flags & flags::HEAD != 0 && ev.dport == 53).then_some(ev.head),
        },
        kind::UDP_RECV => Observation::UdpRecv {
            ts_ns: ev.ts_ns,
            pid: ev.tgid,
            comm,
            cgroup: ev.cgroup,
            dest: destination(ev, Proto::Udp)?,
            bytes: ev.aux,
            sock: ev.sock,
            reply: reply(ev),
        },
        kind::UDP_ERROR => Observation::UdpError {
            ts_ns: ev.ts_ns,
            pid: ev.tgid,
            comm,
            cgroup: ev.cgroup,
            dest: destination(ev, Proto::Udp)?,
            errno: ev.errno,
        },
        kind::TCP_EXCHANGE => Observation::Exchange {
            ts_ns: ev.ts_ns,
            pid: ev.tgid,
            comm,
            cgroup: ev.cgroup,
            dest: destination(ev, Proto::Tcp)?,
            sent: ev.aux,
            received: ev.aux2,
            fingerprint: ev.hash,
            sock: ev.sock,
            first: ev.flags & flags::FIRST_EXCHANGE != 0,
            reply: reply(ev),
        },
        kind::TCP_CONN_END => Observation::ConnEnd {
            ts_ns: ev.ts_ns,
            start_ns: ev.start_ns,
            pid: ev.tgid,
            comm,
            cgroup: ev.cgroup,
            dest: destination(ev, Proto::Tcp)?,
            sent: ev.aux,
            received: ev.aux2,
        },
        kind::PROC_FORK => Observation::Fork {
            ts_ns: ev.ts_ns,
            parent: ev.tgid,
            child: ev.aux,
            comm,
        },
        kind::PROC_EXEC => Observation::Exec {
            ts_ns: ev.ts_ns,
            pid: ev.tgid,
            comm,
        },
        kind::PROC_EXIT => Observation::Exit {
            ts_ns: ev.ts_ns,
            pid: ev.tgid,
            tid: ev.aux,
            group_dead: ev.flags & flags::GROUP_DEAD != 0,
        },
        other => return Err(DecodeError::Kind(other)),
    })
}

/// Decodes one ring-buffer record.
pub fn decode(bytes: &[u8]) -> Result<Observation, DecodeError> {
    if bytes.len() != std::mem::size_of::<Event>() {
        return Err(DecodeError::Size(bytes.len()));
    }
    // SAFETY: the length matches, Event is plain integers and byte arrays
    // (every bit pattern valid), and read_unaligned copes with the ring's
    // 8-byte alignment not being guaranteed for a borrowed slice.
    let ev = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<Event>()) };
    from_event(&ev)
}

/// The bytes of an event, as the ring buffer delivers them (for tests).
pub fn event_bytes(ev: &Event) -> Vec<u8> {
    // SAFETY: Event is repr(C) with explicit padding; all bytes initialised.
    unsafe {
        std::slice::from_raw_parts(
            (ev as *const Event).cast::<u8>(),
            std::mem::size_of::<Event>(),
        )
    }
    .to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp_event() -> Event {
        let mut ev = Event::zeroed();
        ev.kind = kind::TCP_OUTCOME;
        ev.ts_ns = 2_000;
        ev.start_ns = 1_000;
        ev.netns = 4026531840;
        ev.tgid = 4242;
        ev.family = AF_INET;
        ev.dport = 8080;
        ev.daddr[..4].copy_from_slice(&[127, 0, 0, 1]);
        ev.comm[..4].copy_from_slice(b"wget");
        ev.cgroup = 77;
        ev
    }

    #[test]
    fn decodes_a_refused_connect() {
        let mut ev = tcp_event();
        ev.outcome = outcome::FAILED;
        ev.errno = libc::ECONNREFUSED;
        ev.flags = flags::RST;
        let obs = decode(&event_bytes(&ev)).unwrap();
        assert_eq!(
            obs,
            Observation::Connect {
                ts_ns: 2_000,
                start_ns: 1_000,
                pid: 4242,
                comm: Comm::from("wget"),
                cgroup: 77,
                dest: Destination {
                    proto: Proto::Tcp,
                    addr: "127.0.0.1".parse().unwrap(),
                    port: 8080,
                    netns: 4026531840,
                },
                outcome: ConnectOutcome::Failed {
                    errno: libc::ECONNREFUSED
                },
                rst: true,
                syn_retransmits: 0,
            }
        );
    }

    #[test]
    fn decodes_ipv6_and_udp_sends() {
        let mut ev = tcp_event();
        ev.kind = kind::UDP_SEND;
        ev.family = AF_INET6;
        ev.daddr = Ipv6Addr::LOCALHOST.octets();
        ev.dport = 53;
        ev.aux = 33;
        match decode(&event_bytes(&ev)).unwrap() {
            Observation::UdpSend {
                dest,
                bytes,
                fingerprint,
                ..
            } => {
                assert_eq!(fingerprint, 0);
                assert_eq!(dest.to_string(), "[::1]:53");
                assert_eq!(dest.proto, Proto::Udp);
                assert_eq!(bytes, 33);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn pre_syn_failure_has_errno_only_when_known() {
        let mut ev = tcp_event();
        ev.kind = kind::TCP_PRE_SYN_FAIL;
        let errno_of = |ev: &Event| match decode(&event_bytes(ev)).unwrap() {
            Observation::Connect {
                outcome: ConnectOutcome::FailedBeforeSyn { errno },
                ..
            } => errno,
            other => panic!("{other:?}"),
        };
        assert_eq!(errno_of(&ev), None);
        ev.errno = libc::ENETUNREACH;
        assert_eq!(errno_of(&ev), Some(libc::ENETUNREACH));
    }

    #[test]
    fn process_records() {
        let mut ev = Event::zeroed();
        ev.kind = kind::PROC_EXIT;
        ev.tgid = 10;
        ev.aux = 11;
        ev.flags = flags::GROUP_DEAD;
        assert_eq!(
            decode(&event_bytes(&ev)).unwrap(),
            Observation::Exit {
                ts_ns: 0,
                pid: 10,
                tid: 11,
                group_dead: true
            }
        );
        ev.kind = kind::PROC_FORK;
        assert!(matches!(
            decode(&event_bytes(&ev)).unwrap(),
            Observation::Fork {
                parent: 10,
                child: 11,
                ..
            }
        ));
    }

    #[test]
    fn decodes_exchanges_and_connection_ends() {
        let mut ev = tcp_event();
        ev.kind = kind::TCP_EXCHANGE;
        ev.aux = 78;
        ev.aux2 = 1024;
        ev.hash = 0xfeed;
        match decode(&event_bytes(&ev)).unwrap() {
            Observation::Exchange {
                sent,
                received,
                fingerprint,
                cgroup,
                ..
            } => assert_eq!(
                (sent, received, fingerprint, cgroup),
                (78, 1024, 0xfeed, 77)
            ),
            other => panic!("{other:?}"),
        }
        ev.kind = kind::TCP_CONN_END;
        match decode(&event_bytes(&ev)).unwrap() {
            Observation::ConnEnd {
                start_ns,
                ts_ns,
                sent,
                received,
                ..
            } => assert_eq!((start_ns, ts_ns, sent, received), (1_000, 2_000, 78, 1024)),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn replies_are_parsed_from_the_head_dns_over_tcp_after_its_length() {
        let mut ev = tcp_event();
        ev.kind = kind::TCP_EXCHANGE;
        ev.aux = 40;
        ev.aux2 = 60;
        ev.flags = flags::HEAD | flags::FIRST_EXCHANGE;
        ev.head[..12].copy_from_slice(b"HTTP/1.1 503");
        let Observation::Exchange { reply, first, .. } = decode(&event_bytes(&ev)).unwrap() else {
            panic!("not an exchange");
        };
        assert_eq!(reply, Reply::Http { status: 503 });
        assert!(first);
        ev.dport = 53;
        ev.head = [0; 32];
        ev.head[..14].copy_from_slice(&[0, 40, 0x12, 0x34, 0x81, 0x82, 0, 1, 0, 0, 0, 0, 0, 0]);
        let Observation::Exchange { reply, .. } = decode(&event_bytes(&ev)).unwrap() else {
            panic!("not an exchange");
        };
        assert_eq!(
            reply,
            Reply::Dns {
                rcode: 2,
                answers: 0
            }
        );
        ev.flags = 0;
        let Observation::Exchange { reply, .. } = decode(&event_bytes(&ev)).unwrap() else {
            panic!("not an exchange");
        };
        assert_eq!(reply, Reply::NotRead, "no head, nothing read");
    }

    #[test]
    fn rejects_bad_records() {
        assert_eq!(decode(&[0u8; 7]), Err(DecodeError::Size(7)));
        let mut ev = tcp_event();
        ev.kind = 99;
        assert_eq!(decode(&event_bytes(&ev)), Err(DecodeError::Kind(99)));
        let mut ev = tcp_event();
        ev.outcome = outcome::ESTABLISHED;
        ev.family = 1;
        assert_eq!(decode(&event_bytes(&ev)), Err(DecodeError::Family(1)));
    }

    #[test]
    fn observations_round_trip_through_json() {
        let mut ev = tcp_event();
        ev.outcome = outcome::ESTABLISHED;
        let obs = decode(&event_bytes(&ev)).unwrap();
        let json = serde_json::to_string(&obs).unwrap();
        assert_eq!(serde_json::from_str::<Observation>(&json).unwrap(), obs);
    }
}

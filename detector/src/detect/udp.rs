//! UDP sockets as the engine sees them: whether a request got its reply,
//! and which sockets are servers.
//!
//! A UDP request that fails leaves no errno on the send: the peer either
//! never answers (a dead server), or the kernel reports an ICMP error on
//! the socket (port unreachable), which the report ties to a tuple, not a
//! socket. So per socket we keep the flow it belongs to and how many
//! requests await a reply; a request still unanswered when the socket sends
//! again (a resend) or after [`NO_REPLY_NS`] is a failure, and an ICMP
//! error is joined to the process's last socket towards that address.
//!
//! Only connected sockets have their replies counted (the kernel knows
//! their peer), so only they are watched for missing replies; and only
//! when the peer is a request/response one (DNS, or it answered before):
//! fire-and-forget UDP (metrics, syslog) never gets replies and is never
//! failing for that. A socket that sends to many peers is a server (or a
//! fan-out), never a client flow.
use std::collections::HashMap;

use crate::ingest::{Comm, Destination};

/// A request unanswered when its socket sends again this much later was
/// not answered (a resend); sooner is a batch (glibc sends A and AAAA
/// together).
pub const RESEND_NS: u64 = 5_000_000;
/// A request unanswered this long was not answered.
pub const NO_REPLY_NS: u64 = 2_000_000_000;
/// A socket idle this long is forgotten.
const IDLE_NS: u64 = 10_000_000_000;
/// Most sockets remembered; beyond it new sockets are not tracked
/// (counted in [`UdpSockets::untracked`]).
pub const MAX_SOCKETS: usize = 65_536;
/// A socket that sends to more distinct peers than this is a server (or
/// a fan-out), not a client.
pub const SERVER_PEERS: usize = 4;

/// The flow a socket's records belong to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owner {
    pub pid: u32,
    pub comm: Comm,
    pub cgroup: u64,
    pub dest: Destination,
}

#[derive(Debug, Clone)]
struct Socket {
    owner: Owner,
    /// Hashes of the peers it sent to, up to [`SERVER_PEERS`].
    peers: [u64; SERVER_PEERS],
    server: bool,
    /// Requests awaiting a reply (watched sockets only).
    pending: u16,
    watched: bool,
    last_send: u64,
}

/// What the engine should do with a send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Send {
    /// A server's (or fan-out) socket: not a client flow.
    Server,
    /// A client's send; `unanswered` earlier requests on the socket failed.
    Client { unanswered: u16 },
}

/// Failures found when sockets are swept.
pub type Unanswered = (Owner, u16);

#[derive(Debug, Default)]
pub struct UdpSockets {
    socks: HashMap<u64, Socket>,
    /// Each process's last socket, to join ICMP errors to.
    last_by_pid: HashMap<u32, u64>,
    /// Sockets not tracked because the table was full.
    pub untracked: u64,
}

fn peer_hash(d: &Destination) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    d.addr.hash(&mut h);
    d.port.hash(&mut h);
    h.finish() | 1
}

impl UdpSockets {
    /// A datagram sent on `sock`; `watch` when its replies are counted and
    /// the peer answers requests.
    pub fn send(&mut self, sock: u64, owner: Owner, ts: u64, watch: bool) -> Send {
        if !self.socks.contains_key(&sock) && self.socks.len() >= MAX_SOCKETS {
            self.untracked += 1;
            return Send::Client { unanswered: 0 };
        }
        let s = self.socks.entry(sock).or_insert(Socket {
            owner,
            peers: [0; SERVER_PEERS],
            server: false,
            pending: 0,
            watched: false,
            last_send: ts,
        });
        if s.server {
            return Send::Server;
        }
        let peer = peer_hash(&owner.dest);
        if !s.peers.contains(&peer) {
            match s.peers.iter_mut().find(|p| **p == 0) {
                Some(slot) => *slot = peer,
                None => {
                    s.server = true;
                    return Send::Server;
                }
            }
        }
        let mut unanswered = 0;
        if s.pending > 0 && ts.saturating_sub(s.last_send) >= RESEND_NS {
            unanswered = s.pending;
            s.pending = 0;
        }
        s.owner = owner;
        s.watched = watch;
        if watch {
            s.pending = s.pending.saturating_add(1);
        }
        s.last_send = ts;
        self.last_by_pid.insert(owner.pid, sock);
        Send::Client { unanswered }
    }

    /// A reply arrived on `sock`: its oldest request is answered.
    pub fn reply(&mut self, sock: u64) {
        if let Some(s) = self.socks.get_mut(&sock) {
            s.pending = s.pending.saturating_sub(1);
        }
    }

    /// An ICMP error reported to `pid` about `dest` (netns unknown): the
    /// flow of its last socket towards that address, whose request it
    /// answers.
    pub fn error(&mut self, pid: u32, dest: &Destination) -> Option<Owner> {
        let sock = self.last_by_pid.get(&pid)?;
        let s = self.socks.get_mut(sock)?;
        if s.owner.dest.addr != dest.addr || s.owner.dest.port != dest.port || s.server {
            return None;
        }
        s.pending = s.pending.saturating_sub(1);
        Some(s.owner)
    }

    /// Whether a socket is known as a server's.
    pub fn is_server(&self, sock: u64) -> bool {
        self.socks.get(&sock).is_some_and(|s| s.server)
    }

    /// Requests unanswered for [`NO_REPLY_NS`] are failures; idle sockets
    /// are forgotten. In a stable order.
    pub fn sweep(&mut self, now: u64) -> Vec<Unanswered> {
        let mut out = Vec::new();
        self.socks.retain(|_, s| {
            let idle = now.saturating_sub(s.last_send);
            if s.pending > 0 && idle >= NO_REPLY_NS {
                out.push((s.owner, s.pending));
                s.pending = 0;
            }
            idle < IDLE_NS
        });
        let socks = &self.socks;
        self.last_by_pid.retain(|_, sock| socks.contains_key(sock));
        out.sort_by_key(|(o, _)| (o.pid, o.dest));
        out
    }

    /// A process exited: its sockets are gone too (pending requests of a
    /// process that gave up are failures, reported by the next sweep).
    pub fn process_exited(&mut self, pid: u32) {
        self.last_by_pid.remove(&pid);
    }

    pub fn len(&self) -> usize {
        self.socks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.socks.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ingest::Proto;

    fn owner(port: u16) -> Owner {
        Owner {
            pid: 7,
            comm: Comm::from("dig"),
            cgroup: 1,
            dest: Destination {
                proto: Proto::Udp,
                addr: "127.0.0.1".parse().unwrap(),
                port,
                netns: 3,
            },
        }
    }

    const MS: u64 = 1_000_000;

    #[test]
    fn a_resend_fails_the_unanswered_request_a_batch_does_not() {
        let mut u = UdpSockets::default();
        assert_eq!(
            u.send(1, owner(53), 0, true),
            Send::Client { unanswered: 0 }
        );
        // A and AAAA in one sendmmsg: a batch.
        assert_eq!(
            u.send(1, owner(53), MS / 10, true),
            Send::Client { unanswered: 0 }
        );
        // Resent 20 ms later, nothing answered: both failed.
        assert_eq!(
            u.send(1, owner(53), 20 * MS, true),
            Send::Client { unanswered: 2 }
        );
        u.reply(1);
        assert_eq!(
            u.send(1, owner(53), 40 * MS, true),
            Send::Client { unanswered: 0 }
        );
    }

    #[test]
    fn icmp_errors_join_the_last_socket_and_sweeps_fail_the_silent() {
        let mut u = UdpSockets::default();
        u.send(1, owner(53), 0, true);
        let mut d = owner(53).dest;
        d.netns = 0;
        assert_eq!(
            u.error(7, &d),
            Some(owner(53)),
            "netns comes from the socket"
        );
        d.port = 54;
        assert_eq!(u.error(7, &d), None, "another destination");
        assert!(u.sweep(NO_REPLY_NS * 2).is_empty(), "the error answered it");
        u.send(2, owner(53), NO_REPLY_NS * 2, true);
        let failed = u.sweep(NO_REPLY_NS * 4);
        assert_eq!(failed, vec![(owner(53), 1)]);
    }

    #[test]
    fn fire_and_forget_is_not_watched_and_servers_are_not_clients() {
        let mut u = UdpSockets::default();
        for i in 0..10 {
            u.send(1, owner(8125), i * 10 * MS, false);
        }
        assert!(u.sweep(NO_REPLY_NS * 10).is_empty());
        for port in 1000..=1000 + SERVER_PEERS as u16 {
            let r = u.send(9, owner(port), 0, false);
            assert_eq!(r == Send::Server, port == 1000 + SERVER_PEERS as u16);
        }
        assert!(u.is_server(9));
        assert_eq!(u.send(9, owner(1000), 0, false), Send::Server);
    }

    #[test]
    fn the_table_is_bounded() {
        let mut u = UdpSockets::default();
        for sock in 0..(MAX_SOCKETS as u64 + 10) {
            u.send(sock, owner(53), 0, true);
        }
        assert_eq!(u.len(), MAX_SOCKETS);
        assert_eq!(u.untracked, 10);
        assert!(!u.is_empty());
    }
}

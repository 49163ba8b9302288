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
//! failing for that, and is not even tracked. An unconnected socket that
//! sends to many peers is a server (or a fan-out), never a client flow.
use std::collections::HashMap;

use crate::ingest::{
    Comm, Destination,
    bounded::{TableUsage, batch, lowest},
};

/// A request unanswered when its socket sends again this much later was
/// not answered (a resend); sooner is a batch (glibc sends A and AAAA
/// together).
pub const RESEND_NS: u64 = 5_000_000;
/// A request unanswered this long was not answered.
pub const NO_REPLY_NS: u64 = 2_000_000_000;
/// A socket idle this long is forgotten.
const IDLE_NS: u64 = 10_000_000_000;
/// Most sockets remembered; beyond it the least important (idle, nothing
/// awaited) are forgotten to make room.
pub const MAX_SOCKETS: usize = 65_536;
/// Most processes whose last connected socket is remembered.
pub const MAX_PROCESSES: usize = 65_536;
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
    /// Hashes of the peers it sent to, up to [`SERVER_PEERS`] (unconnected
    /// sockets only: a connected one has one peer).
    peers: [u64; SERVER_PEERS],
    server: bool,
    /// Requests awaiting a reply (watched sockets only).
    pending: u16,
    /// Connected, and its peer answers requests (DNS, or it replied).
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

/// A process's last connected socket: where its ICMP errors belong.
#[derive(Debug, Clone, Copy)]
struct LastSocket {
    sock: u64,
    peer: u64,
    netns: u64,
    /// When it last sent: the least recent go first when the table is full.
    ts: u64,
}

/// Sockets are tracked only where it pays: connected sockets of peers that
/// answer (to see requests go unanswered) and unconnected ones (to tell a
/// server by its many peers). A connected socket to a fire-and-forget peer
/// costs nothing here but its process's last-socket entry.
#[derive(Debug)]
pub struct UdpSockets {
    socks: HashMap<u64, Socket>,
    /// Each process's last connected socket, to join ICMP errors to.
    last_by_pid: HashMap<u32, LastSocket>,
    max_sockets: usize,
    max_processes: usize,
    socket_evictions: u64,
    process_evictions: u64,
}

impl Default for UdpSockets {
    fn default() -> Self {
        Self::with_capacity(MAX_SOCKETS, MAX_PROCESSES)
    }
}

/// A cheap hash of a peer (address and port); 0 means "none".
fn peer_hash(d: &Destination) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let bytes = match d.addr {
        std::net::IpAddr::V4(a) => u128::from(u32::from(a)),
        std::net::IpAddr::V6(a) => u128::from(a),
    };
    for x in [bytes as u64, (bytes >> 64) as u64, u64::from(d.port)] {
        h = (h ^ x).wrapping_mul(0x0100_0000_01b3);
        h ^= h >> 29;
    }
    h | 1
}

impl UdpSockets {
    /// Tables holding at most `sockets` sockets and `processes` processes'
    /// last sockets (tests use small ones).
    pub fn with_capacity(sockets: usize, processes: usize) -> Self {
        UdpSockets {
            socks: HashMap::new(),
            last_by_pid: HashMap::new(),
            max_sockets: sockets.max(1),
            max_processes: processes.max(1),
            socket_evictions: 0,
            process_evictions: 0,
        }
    }

    /// Makes room for one more socket: the least important go — idle ones
    /// with no request awaited, then unwatched, then the least recent. A
    /// socket awaiting replies goes last: its silence is evidence.
    fn make_room(&mut self) {
        let victims = lowest(
            self.socks
                .iter()
                .map(|(k, s)| ((s.pending > 0, s.watched, s.last_send), *k)),
            batch(self.max_sockets),
        );
        self.socket_evictions += victims.len() as u64;
        for k in victims {
            self.socks.remove(&k);
        }
    }

    /// A datagram sent on `sock`, on a connected socket or not; `dns` when
    /// its peer is a resolver (a request/response peer by its port).
    pub fn send(&mut self, sock: u64, owner: Owner, ts: u64, connected: bool, dns: bool) -> Send {
        let peer = peer_hash(&owner.dest);
        if connected {
            if self.last_by_pid.len() >= self.max_processes
                && !self.last_by_pid.contains_key(&owner.pid)
            {
                let victims = lowest(
                    self.last_by_pid.iter().map(|(p, l)| (l.ts, *p)),
                    batch(self.max_processes),
                );
                self.process_evictions += victims.len() as u64;
                for p in victims {
                    self.last_by_pid.remove(&p);
                }
            }
            self.last_by_pid.insert(
                owner.pid,
                LastSocket {
                    sock,
                    peer,
                    netns: owner.dest.netns,
                    ts,
                },
            );
        }
        if !self.socks.contains_key(&sock) {
            // Connected to a peer not known to answer: nothing to track.
            if connected && !dns {
                return Send::Client { unanswered: 0 };
            }
            if self.socks.len() >= self.max_sockets {
                self.make_room();
            }
        }
        let s = self.socks.entry(sock).or_insert(Socket {
            owner,
            peers: [0; SERVER_PEERS],
            server: false,
            pending: 0,
            watched: connected,
            last_send: ts,
        });
        if s.server {
            return Send::Server;
        }
        if !connected && !s.peers.contains(&peer) {
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
        if s.watched {
            s.pending = s.pending.saturating_add(1);
        }
        s.last_send = ts;
        Send::Client { unanswered }
    }

    /// A reply arrived on connected socket `sock`: its oldest request is
    /// answered, and its peer is one that answers (watched from now on).
    pub fn reply(&mut self, sock: u64, owner: Owner, ts: u64) {
        if let Some(s) = self.socks.get_mut(&sock) {
            s.pending = s.pending.saturating_sub(1);
            s.watched = true;
        } else {
            if self.socks.len() >= self.max_sockets {
                self.make_room();
            }
            self.socks.insert(
                sock,
                Socket {
                    owner,
                    peers: [0; SERVER_PEERS],
                    server: false,
                    pending: 0,
                    watched: true,
                    last_send: ts,
                },
            );
        }
    }

    /// An ICMP error reported to `pid` about `dest` (netns unknown): the
    /// network namespace of its last connected socket towards that
    /// address, whose request it answers.
    pub fn error(&mut self, pid: u32, dest: &Destination) -> Option<u64> {
        let last = self.last_by_pid.get(&pid)?;
        if last.peer != peer_hash(dest) {
            return None;
        }
        if let Some(s) = self.socks.get_mut(&last.sock) {
            s.pending = s.pending.saturating_sub(1);
        }
        Some(last.netns)
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
        out.sort_by_key(|(o, _)| (o.pid, o.dest));
        out
    }

    /// A process exited: no more errors can be its (pending requests of a
    /// process that gave up are failures, reported by the next sweep).
    pub fn process_exited(&mut self, pid: u32) {
        self.last_by_pid.remove(&pid);
    }

    pub fn len(&self) -> usize {
        self.socks.len()
    }

    /// Processes whose last connected socket is remembered.
    pub fn processes(&self) -> usize {
        self.last_by_pid.len()
    }

    /// The socket table and the last-socket table, for status and metrics.
    pub fn tables(&self) -> [TableUsage; 2] {
        [
            TableUsage::new(
                "udp_sockets",
                self.socks.len(),
                self.max_sockets,
                self.socket_evictions,
            ),
            TableUsage::new(
                "udp_processes",
                self.last_by_pid.len(),
                self.max_processes,
                self.process_evictions,
            ),
        ]
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
        let send = |u: &mut UdpSockets, ts| u.send(1, owner(53), ts, true, true);
        assert_eq!(send(&mut u, 0), Send::Client { unanswered: 0 });
        // A and AAAA in one sendmmsg: a batch.
        assert_eq!(send(&mut u, MS / 10), Send::Client { unanswered: 0 });
        // Resent 20 ms later, nothing answered: both failed.
        assert_eq!(send(&mut u, 20 * MS), Send::Client { unanswered: 2 });
        u.reply(1, owner(53), 21 * MS);
        assert_eq!(send(&mut u, 40 * MS), Send::Client { unanswered: 0 });
    }

    #[test]
    fn icmp_errors_join_the_last_socket_and_sweeps_fail_the_silent() {
        let mut u = UdpSockets::default();
        u.send(1, owner(53), 0, true, true);
        let mut d = owner(53).dest;
        d.netns = 0;
        assert_eq!(u.error(7, &d), Some(3), "netns comes from the socket");
        d.port = 54;
        assert_eq!(u.error(7, &d), None, "another destination");
        assert!(u.sweep(NO_REPLY_NS * 2).is_empty(), "the error answered it");
        u.send(2, owner(53), NO_REPLY_NS * 2, true, true);
        let failed = u.sweep(NO_REPLY_NS * 4);
        assert_eq!(failed, vec![(owner(53), 1)]);
    }

    #[test]
    fn a_peer_that_answered_is_watched_fire_and_forget_costs_nothing() {
        let mut u = UdpSockets::default();
        for i in 0..10 {
            u.send(1, owner(8125), i * 10 * MS, true, false);
        }
        assert!(
            u.is_empty(),
            "a connected socket to a silent peer is not tracked"
        );
        assert!(u.sweep(NO_REPLY_NS * 10).is_empty());
        // An ICMP error still finds it.
        assert_eq!(u.error(7, &owner(8125).dest), Some(3));
        // Once its peer answers, a resend without a reply is a failure.
        u.reply(1, owner(8125), 0);
        u.send(1, owner(8125), MS, true, false);
        assert_eq!(
            u.send(1, owner(8125), 20 * MS, true, false),
            Send::Client { unanswered: 1 }
        );
    }

    #[test]
    fn a_socket_sending_to_many_peers_is_a_server() {
        let mut u = UdpSockets::default();
        for port in 1000..=1000 + SERVER_PEERS as u16 {
            let r = u.send(9, owner(port), 0, false, false);
            assert_eq!(r == Send::Server, port == 1000 + SERVER_PEERS as u16);
        }
        assert!(u.is_server(9));
        assert_eq!(u.send(9, owner(1000), 0, false, false), Send::Server);
    }

    #[test]
    fn full_tables_forget_the_idle_and_keep_the_awaited() {
        let mut u = UdpSockets::with_capacity(16, 16);
        // Socket 0 awaits a reply to a DNS request (evidence); sockets
        // 1.. are unconnected, nothing awaited.
        u.send(0, owner(53), 0, true, true);
        for sock in 1..40u64 {
            u.send(sock, owner(9), sock * MS, false, false);
        }
        let [socks, pids] = u.tables();
        // Full at 16, then batches of 2 (an eighth): the 24 sockets
        // beyond are 12 rounds of 2 evicted, 2 inserted.
        assert_eq!(
            (socks.entries, socks.capacity, socks.evictions),
            (16, 16, 24)
        );
        assert_eq!(pids.entries, 1);
        // The socket awaiting a reply survived, and its silence still fails.
        assert_eq!(
            u.sweep(NO_REPLY_NS + 40 * MS),
            vec![(owner(53), 1)],
            "the awaited request was kept"
        );
        // Last sockets of 40 more processes (41 with pid 7): 25 beyond
        // the 16 are 13 rounds of 2 evicted, the last round inserting one.
        for pid in 100..140u32 {
            let mut o = owner(53);
            o.pid = pid;
            u.send(1_000 + u64::from(pid), o, u64::from(pid) * MS, true, false);
        }
        let pids = u.tables()[1];
        assert_eq!((pids.entries, pids.evictions), (15, 26));
        assert_eq!(u.error(139, &owner(53).dest), Some(3));
        assert_eq!(u.error(100, &owner(53).dest), None, "evicted");
    }
}

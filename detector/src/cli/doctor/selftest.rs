//! The self-test of `stormguard doctor`: known traffic made in a network
//! namespace of its own, then the exact counts the loaded sensors saw of
//! it, for this process and those destinations only.
//!
//! The namespace belongs to one thread: `unshare(CLONE_NEWNET)` moves only
//! the calling thread, so the host's network is never touched, and the
//! namespace (with its loopback and every socket in it) is gone when the
//! thread ends. Everything the thread does is synchronous on loopback, so
//! its records are in the ring by the time it is joined (its own exit
//! record, which follows the join closely, excepted).
use std::{
    io::{self, Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::fd::AsRawFd as _,
    time::{Duration, Instant},
};

use serde::Serialize;

use crate::{
    flows::{FlowCounts, FlowTable},
    ingest::{Observation, Proto, decode::from_event},
    kernel::{DRAIN_MAX, EventRing, Sensors, Signal, coverage::name, monotonic_ns},
};

/// Refused TCP connects to 127.0.0.1.
pub const REFUSED_V4: u64 = 20;
/// Refused TCP connects to [::1], when the namespace has IPv6 loopback.
pub const REFUSED_V6: u64 = 5;
/// Datagrams sent on an unconnected UDP socket, and as many on a
/// connected one (each to its own receiver).
pub const UDP_SENDS: u64 = 10;
/// The one request of the successful connection, and its response.
pub const REQUEST: &[u8] = b"stormguard doctor ping\n";
pub const RESPONSE: &[u8] = b"pong\n";
/// How long the counts may take to settle after the traffic.
const SETTLE: Duration = Duration::from_secs(2);
/// How long no more records of this process must come once the counts
/// are reached.
const QUIET: Duration = Duration::from_millis(150);

/// Why the self-test could not run (as opposed to counting wrong).
#[derive(Debug)]
pub enum SelfTestError {
    /// No network namespace could be made: an environment problem.
    Namespace(io::Error),
    /// The traffic itself did not go as planned, or the sensors failed.
    Run(String),
}

/// One count: what was expected of a signal and what the sensors saw.
#[derive(Debug, Clone, Serialize)]
pub struct Count {
    /// Stable key, e.g. `tcp_refused_v4.attempts`.
    pub key: &'static str,
    /// What is counted, for people.
    pub what: String,
    /// Signals this count needs; a missing one skips it.
    pub needs: Vec<&'static str>,
    pub expected: u64,
    pub seen: u64,
    /// "ok", "fail" or "skipped".
    pub status: &'static str,
    /// Why it was skipped.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// What the self-test found.
#[derive(Debug, Clone, Serialize)]
pub struct SelfTest {
    pub pid: u32,
    /// SO_NETNS_COOKIE of the namespace it made.
    pub netns_cookie: Option<u64>,
    pub counts: Vec<Count>,
    /// Traffic start to settled counts.
    pub elapsed_ms: u64,
    /// The traffic alone.
    pub traffic_ms: u64,
    /// Records the ring buffer dropped meanwhile (a busy host).
    pub ring_drops: u64,
    /// Records (anyone's) that could not be decoded meanwhile.
    pub bad_records: u64,
    /// Why the IPv6 connects were left out, if they were.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ipv6_skipped: Option<String>,
}

impl SelfTest {
    pub fn failures(&self) -> impl Iterator<Item = &Count> {
        self.counts.iter().filter(|c| c.status == "fail")
    }
}

/// Addresses the traffic used and what its own syscalls saw.
struct Traffic {
    netns_cookie: Option<u64>,
    tid: u32,
    refused_v4: SocketAddr,
    refused_v6: Result<SocketAddr, String>,
    ok: SocketAddr,
    udp_unconnected: SocketAddr,
    udp_connected: SocketAddr,
    took: Duration,
}

/// Runs the traffic on its own thread in a new namespace while draining
/// the ring, then counts. `signals` says which counts can be checked.
pub fn run(
    sensors: &mut Sensors,
    ring: &mut EventRing,
    signals: &[Signal],
) -> Result<SelfTest, SelfTestError> {
    let me = std::process::id();
    let started = Instant::now();
    let drops_before = sensors
        .stats()
        .map_err(|e| SelfTestError::Run(format!("reading the drop counter: {e}")))?
        .ring_drops;
    let mut seen = Collector {
        me,
        ours: Vec::new(),
        bad: 0,
    };

    let thread = std::thread::Builder::new()
        .name("sg-doctor-netns".into())
        .spawn(traffic)
        .map_err(|e| SelfTestError::Run(format!("spawning the self-test thread: {e}")))?;
    // Keep the ring from filling with the host's records meanwhile.
    while !thread.is_finished() {
        seen.drain(ring);
        std::thread::sleep(Duration::from_millis(10));
    }
    let traffic = thread
        .join()
        .map_err(|_| SelfTestError::Run("the self-test thread panicked".into()))??;

    let available = |n: &str| signals.iter().any(|s| s.name == n && s.available());
    // Until every count that can be checked has been reached and nothing
    // more of ours came for QUIET (a surplus would show then), or SETTLE.
    let settle_end = Instant::now() + SETTLE;
    let mut last_growth = Instant::now();
    let mut last_len = usize::MAX;
    let counts = loop {
        seen.drain(ring);
        // Every attempt's connect() has returned, so its error report (if
        // any) came already: what is left in CLOSED closed without one.
        let swept = sensors
            .sweep_closed(monotonic_ns(), 0)
            .map_err(|e| SelfTestError::Run(format!("sweeping closed attempts: {e}")))?;
        for ev in swept {
            seen.keep(from_event(&ev));
        }
        if seen.ours.len() != last_len {
            last_len = seen.ours.len();
            last_growth = Instant::now();
        }
        let counts = tally(&traffic, me, &seen.ours, &available);
        let reached = counts
            .iter()
            .all(|c| c.status == "skipped" || c.seen >= c.expected);
        if (reached && last_growth.elapsed() >= QUIET) || Instant::now() >= settle_end {
            break counts;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let drops_after = sensors
        .stats()
        .map_err(|e| SelfTestError::Run(format!("reading the drop counter: {e}")))?
        .ring_drops;
    Ok(SelfTest {
        pid: me,
        netns_cookie: traffic.netns_cookie,
        counts,
        elapsed_ms: started.elapsed().as_millis() as u64,
        traffic_ms: traffic.took.as_millis() as u64,
        ring_drops: drops_after.saturating_sub(drops_before),
        bad_records: seen.bad,
        ipv6_skipped: traffic.refused_v6.err(),
    })
}

/// This process's observations, and how many records (anyone's) could
/// not be decoded.
struct Collector {
    me: u32,
    ours: Vec<Observation>,
    bad: u64,
}

impl Collector {
    fn keep(&mut self, r: Result<Observation, crate::ingest::DecodeError>) {
        match r {
            Ok(o) if pid_of(&o) == Some(self.me) => self.ours.push(o),
            Ok(_) => {}
            Err(_) => self.bad += 1,
        }
    }

    /// Reads the ring until it is empty; returns how many records.
    fn drain(&mut self, ring: &mut EventRing) -> usize {
        let mut total = 0;
        loop {
            let n = ring.drain(|r| self.keep(r));
            total += n;
            if n < DRAIN_MAX {
                return total;
            }
        }
    }
}

/// The process an observation belongs to.
fn pid_of(o: &Observation) -> Option<u32> {
    match *o {
        Observation::Connect { pid, .. }
        | Observation::UdpConnect { pid, .. }
        | Observation::UdpSend { pid, .. }
        | Observation::UdpRecv { pid, .. }
        | Observation::UdpError { pid, .. }
        | Observation::Exchange { pid, .. }
        | Observation::ConnEnd { pid, .. }
        | Observation::Syscalls { pid, .. }
        | Observation::Exec { pid, .. }
        | Observation::Exit { pid, .. } => Some(pid),
        Observation::Fork { parent, .. } => Some(parent),
    }
}

/// The counts, from this process's observations.
fn tally(
    t: &Traffic,
    me: u32,
    ours: &[Observation],
    available: &dyn Fn(&str) -> bool,
) -> Vec<Count> {
    let mut table = FlowTable::new();
    for o in ours {
        table.observe(o);
    }
    let rows = table.take_interval();
    let flow = |proto: Proto, addr: SocketAddr| -> FlowCounts {
        rows.iter()
            .filter(|r| {
                r.key.pid == me
                    && r.key.dest.proto == proto
                    && r.key.dest.addr == addr.ip()
                    && r.key.dest.port == addr.port()
            })
            .fold(FlowCounts::default(), |mut acc, r| {
                acc.attempts += r.counts.attempts;
                acc.established += r.counts.established;
                acc.failures += r.counts.failures;
                for (code, n) in &r.counts.failure_codes {
                    *acc.failure_codes.entry(*code).or_default() += n;
                }
                acc.resets += r.counts.resets;
                acc.udp_connects += r.counts.udp_connects;
                acc.udp_sends += r.counts.udp_sends;
                acc.exchanges += r.counts.exchanges;
                acc
            })
    };
    let mut counts = Vec::new();
    let mut add = |key: &'static str, what: String, needs: &[&'static str], expected, seen| {
        let missing: Vec<&str> = needs.iter().copied().filter(|n| !available(n)).collect();
        let (status, note) = if !missing.is_empty() {
            (
                "skipped",
                Some(format!("{} missing on this kernel", missing.join(", "))),
            )
        } else if seen == expected {
            ("ok", None)
        } else {
            ("fail", None)
        };
        counts.push(Count {
            key,
            what,
            needs: needs.to_vec(),
            expected,
            seen,
            status,
            note,
        });
    };
    let refused = libc::ECONNREFUSED;

    let f = flow(Proto::Tcp, t.refused_v4);
    let d = t.refused_v4;
    add(
        "tcp_refused_v4.attempts",
        format!("TCP connects to {d} (nothing listens)"),
        &[name::CONNECTS],
        REFUSED_V4,
        f.attempts,
    );
    add(
        "tcp_refused_v4.failures",
        format!("failed TCP connects to {d}"),
        &[name::CONNECTS],
        REFUSED_V4,
        f.failures,
    );
    add(
        "tcp_refused_v4.econnrefused",
        format!("ECONNREFUSED on connects to {d}"),
        &[name::CONNECT_ERRORS],
        REFUSED_V4,
        f.failure_codes.get(&refused).copied().unwrap_or(0),
    );
    add(
        "tcp_refused_v4.resets",
        format!("RSTs answering connects to {d}"),
        &[name::RESETS],
        REFUSED_V4,
        f.resets,
    );
    if let Ok(d) = t.refused_v6 {
        let f = flow(Proto::Tcp, d);
        add(
            "tcp_refused_v6.attempts",
            format!("TCP connects to {d} (nothing listens)"),
            &[name::CONNECTS],
            REFUSED_V6,
            f.attempts,
        );
        add(
            "tcp_refused_v6.econnrefused",
            format!("ECONNREFUSED on connects to {d}"),
            &[name::CONNECT_ERRORS],
            REFUSED_V6,
            f.failure_codes.get(&refused).copied().unwrap_or(0),
        );
    }

    let d = t.ok;
    let f = flow(Proto::Tcp, d);
    add(
        "tcp_ok.attempts",
        format!("TCP connects to {d} (a listener)"),
        &[name::CONNECTS],
        1,
        f.attempts,
    );
    add(
        "tcp_ok.established",
        format!("established connects to {d}"),
        &[name::CONNECTS],
        1,
        f.established,
    );
    let exchanges: Vec<(u32, u32)> = ours
        .iter()
        .filter_map(|o| match *o {
            Observation::Exchange {
                pid,
                dest,
                sent,
                received,
                ..
            } if pid == me
                && dest.proto == Proto::Tcp
                && dest.addr == d.ip()
                && dest.port == d.port() =>
            {
                Some((sent, received))
            }
            _ => None,
        })
        .collect();
    add(
        "tcp_ok.exchanges",
        format!("request/response exchanges with {d}"),
        &[name::SENDS, name::RECEIVES],
        1,
        exchanges.len() as u64,
    );
    add(
        "tcp_ok.request_bytes",
        format!("request bytes sent to {d}"),
        &[name::SENDS],
        REQUEST.len() as u64,
        exchanges.iter().map(|e| u64::from(e.0)).sum(),
    );
    add(
        "tcp_ok.response_bytes",
        format!("response bytes received from {d}"),
        &[name::RECEIVES],
        RESPONSE.len() as u64,
        exchanges.iter().map(|e| u64::from(e.1)).sum(),
    );

    let d = t.udp_unconnected;
    add(
        "udp_unconnected.sends",
        format!("UDP sendto() to {d} on an unconnected socket"),
        &[name::SENDS, name::UDP_DESTINATIONS],
        UDP_SENDS,
        flow(Proto::Udp, d).udp_sends,
    );
    let d = t.udp_connected;
    let f = flow(Proto::Udp, d);
    add(
        "udp_connected.connects",
        format!("UDP connect() to {d}"),
        &[name::CONNECTS],
        1,
        f.udp_connects,
    );
    add(
        "udp_connected.sends",
        format!("UDP send() to {d} on a connected socket"),
        &[name::SENDS],
        UDP_SENDS,
        f.udp_sends,
    );

    add(
        "thread_exit.exits",
        format!("exit of the self-test thread (tid {})", t.tid),
        &[name::PROCESSES],
        1,
        ours.iter()
            .filter(|o| {
                matches!(o, Observation::Exit { pid, tid, group_dead: false, .. }
                    if *pid == me && *tid == t.tid)
            })
            .count() as u64,
    );

    // Anything else of this process with a destination: doctor does no
    // other network work, so it would be a record made up or misattributed
    // (the listener's side of the connection counted as a connect…).
    let known = [
        (Proto::Tcp, Some(t.refused_v4)),
        (Proto::Tcp, t.refused_v6.as_ref().ok().copied()),
        (Proto::Tcp, Some(t.ok)),
        (Proto::Udp, Some(t.udp_unconnected)),
        (Proto::Udp, Some(t.udp_connected)),
    ];
    let unaddressed_udp = !available(name::UDP_DESTINATIONS);
    let unexpected = rows
        .iter()
        .filter(|r| r.key.pid == me)
        .filter(|r| {
            !known.iter().any(|(p, a)| {
                a.is_some_and(|a| {
                    *p == r.key.dest.proto
                        && a.ip() == r.key.dest.addr
                        && a.port() == r.key.dest.port
                })
            })
        })
        // Without udp_destinations, unconnected sends have no destination.
        .filter(|r| !(unaddressed_udp && r.key.dest.proto == Proto::Udp && r.key.dest.port == 0))
        .map(|r| {
            let c = &r.counts;
            c.attempts + c.udp_recvs + c.udp_errors + c.exchanges
        })
        .sum();
    add(
        "unexpected.records",
        "records of this process towards any other destination".into(),
        &[name::CONNECTS],
        0,
        unexpected,
    );
    counts
}

/// The self-test thread: a namespace of its own, then the traffic.
fn traffic() -> Result<Traffic, SelfTestError> {
    let started = Instant::now();
    // SAFETY: unshare affects only the calling thread's namespaces.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        return Err(SelfTestError::Namespace(io::Error::last_os_error()));
    }
    // SAFETY: gettid has no preconditions.
    let tid = unsafe { libc::gettid() } as u32;
    let run = |what: &str, e: io::Error| SelfTestError::Run(format!("{what}: {e}"));
    let netns_cookie = loopback_up().map_err(|e| run("bringing lo up in the namespace", e))?;
    let v4 = |port| SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port);

    // Ports: bound, then released, in a namespace where nothing else runs.
    let free_port = |addr: SocketAddr| -> io::Result<SocketAddr> {
        let l = TcpListener::bind(addr)?;
        l.local_addr()
    };
    let refused_v4 = free_port(v4(0)).map_err(|e| run("binding 127.0.0.1", e))?;
    let refused_v6 = free_port(SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), 0))
        .map_err(|e| format!("no IPv6 loopback in a new namespace here ({e})"));
    let listener = TcpListener::bind(v4(0)).map_err(|e| run("listening on 127.0.0.1", e))?;
    let ok = listener
        .local_addr()
        .map_err(|e| run("listener address", e))?;
    let rx_unconnected = UdpSocket::bind(v4(0)).map_err(|e| run("binding UDP", e))?;
    let rx_connected = UdpSocket::bind(v4(0)).map_err(|e| run("binding UDP", e))?;
    let udp_unconnected = rx_unconnected
        .local_addr()
        .map_err(|e| run("UDP address", e))?;
    let udp_connected = rx_connected
        .local_addr()
        .map_err(|e| run("UDP address", e))?;

    let refuse = |dest: SocketAddr, n: u64| -> Result<(), SelfTestError> {
        for i in 0..n {
            match TcpStream::connect(dest) {
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {}
                Err(e) => return Err(run(&format!("connect {} to {dest}", i + 1), e)),
                Ok(_) => {
                    return Err(SelfTestError::Run(format!(
                        "connect {} to {dest} succeeded: something listens there",
                        i + 1
                    )));
                }
            }
        }
        Ok(())
    };
    refuse(refused_v4, REFUSED_V4)?;
    if let Ok(d) = refused_v6 {
        refuse(d, REFUSED_V6)?;
    }

    // One connection, one request, one response, closed by the client.
    let mut client = TcpStream::connect(ok).map_err(|e| run(&format!("connect to {ok}"), e))?;
    let (mut server, _) = listener.accept().map_err(|e| run("accept", e))?;
    client
        .write_all(REQUEST)
        .map_err(|e| run("sending the request", e))?;
    let mut buf = vec![0u8; REQUEST.len()];
    server
        .read_exact(&mut buf)
        .map_err(|e| run("reading the request", e))?;
    server
        .write_all(RESPONSE)
        .map_err(|e| run("sending the response", e))?;
    let mut buf = vec![0u8; RESPONSE.len()];
    client
        .read_exact(&mut buf)
        .map_err(|e| run("reading the response", e))?;
    drop(client);
    drop(server);

    let sender = UdpSocket::bind(v4(0)).map_err(|e| run("binding UDP", e))?;
    for _ in 0..UDP_SENDS {
        sender
            .send_to(REQUEST, udp_unconnected)
            .map_err(|e| run(&format!("sendto {udp_unconnected}"), e))?;
    }
    let connected = UdpSocket::bind(v4(0)).map_err(|e| run("binding UDP", e))?;
    connected
        .connect(udp_connected)
        .map_err(|e| run(&format!("UDP connect to {udp_connected}"), e))?;
    for _ in 0..UDP_SENDS {
        connected
            .send(REQUEST)
            .map_err(|e| run(&format!("send to {udp_connected}"), e))?;
    }
    Ok(Traffic {
        netns_cookie,
        tid,
        refused_v4,
        refused_v6,
        ok,
        udp_unconnected,
        udp_connected,
        took: started.elapsed(),
    })
}

/// Brings `lo` up in this thread's namespace (SIOCGIFFLAGS/SIOCSIFFLAGS)
/// and returns the namespace's cookie, if the kernel tells it.
fn loopback_up() -> io::Result<Option<u64>> {
    let sock = UdpSocket::bind(SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0));
    // A socket can be made before lo is up; binding 0.0.0.0 needs no lo.
    let sock = sock?;
    let fd = sock.as_raw_fd();
    // SAFETY: ifreq is plain data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: the ioctls read and write the ifreq we own.
    if unsafe { libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut req) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
    unsafe { req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short };
    // SAFETY: as above.
    if unsafe { libc::ioctl(fd, libc::SIOCSIFFLAGS, &mut req) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut cookie = 0u64;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cookie`.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    Ok((rc == 0).then_some(cookie))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ingest::{Comm, ConnectOutcome, Destination};

    const ME: u32 = 100;

    fn traffic() -> Traffic {
        let a = |s: &str| s.parse::<SocketAddr>().unwrap();
        Traffic {
            netns_cookie: Some(7),
            tid: 101,
            refused_v4: a("127.0.0.1:1000"),
            refused_v6: Err("no IPv6".into()),
            ok: a("127.0.0.1:2000"),
            udp_unconnected: a("127.0.0.1:3000"),
            udp_connected: a("127.0.0.1:4000"),
            took: Duration::ZERO,
        }
    }

    fn dest(proto: Proto, a: SocketAddr) -> Destination {
        Destination {
            proto,
            addr: a.ip(),
            port: a.port(),
            netns: 7,
        }
    }

    fn connect(pid: u32, to: SocketAddr, outcome: ConnectOutcome) -> Observation {
        Observation::Connect {
            ts_ns: 1,
            start_ns: 0,
            pid,
            comm: Comm::from("stormguard"),
            cgroup: 1,
            dest: dest(Proto::Tcp, to),
            outcome,
            rst: matches!(outcome, ConnectOutcome::Failed { .. }),
            syn_retransmits: 0,
        }
    }

    fn udp_send(to: SocketAddr, connected: bool) -> Observation {
        Observation::UdpSend {
            ts_ns: 1,
            pid: ME,
            comm: Comm::from("stormguard"),
            cgroup: 1,
            dest: dest(Proto::Udp, to),
            bytes: REQUEST.len() as u32,
            fingerprint: 0,
            sock: 9,
            connected,
            question: None,
        }
    }

    /// What the sensors would report of the traffic, `refused` times
    /// refused with `refused_outcome`.
    fn observations(
        t: &Traffic,
        refused: u64,
        refused_outcome: ConnectOutcome,
    ) -> Vec<Observation> {
        let mut v = Vec::new();
        for _ in 0..refused {
            v.push(connect(ME, t.refused_v4, refused_outcome));
        }
        // Another process's attempts at the same address are not ours.
        v.push(connect(ME + 1, t.refused_v4, refused_outcome));
        v.push(connect(ME, t.ok, ConnectOutcome::Established));
        v.push(Observation::Exchange {
            ts_ns: 2,
            pid: ME,
            comm: Comm::from("stormguard"),
            cgroup: 1,
            dest: dest(Proto::Tcp, t.ok),
            sent: REQUEST.len() as u32,
            received: RESPONSE.len() as u32,
            fingerprint: 0,
            sock: 8,
            first: true,
            reply: Default::default(),
        });
        for _ in 0..UDP_SENDS {
            v.push(udp_send(t.udp_unconnected, false));
        }
        v.push(Observation::UdpConnect {
            ts_ns: 1,
            pid: ME,
            comm: Comm::from("stormguard"),
            cgroup: 1,
            dest: dest(Proto::Udp, t.udp_connected),
        });
        for _ in 0..UDP_SENDS {
            v.push(udp_send(t.udp_connected, true));
        }
        v.push(Observation::Exit {
            ts_ns: 3,
            pid: ME,
            tid: t.tid,
            group_dead: false,
        });
        v
    }

    fn status(counts: &[Count], key: &str) -> (&'static str, u64, u64) {
        let c = counts.iter().find(|c| c.key == key).expect(key);
        (c.status, c.seen, c.expected)
    }

    #[test]
    fn exact_counts_pass_and_counts_of_a_missing_signal_are_skipped() {
        let t = traffic();
        let refused = ConnectOutcome::Failed {
            errno: libc::ECONNREFUSED,
        };
        let obs = observations(&t, REFUSED_V4, refused);
        let counts = tally(&t, ME, &obs, &|_| true);
        let wrong: Vec<&Count> = counts.iter().filter(|c| c.status != "ok").collect();
        assert!(wrong.is_empty(), "{wrong:#?}");
        assert_eq!(status(&counts, "tcp_refused_v4.attempts"), ("ok", 20, 20));
        assert_eq!(status(&counts, "udp_connected.sends"), ("ok", 10, 10));
        assert!(!counts.iter().any(|c| c.key.starts_with("tcp_refused_v6")));

        // Without connect_errors the errno is not known: closed, skipped.
        let obs = observations(&t, REFUSED_V4, ConnectOutcome::Closed);
        let counts = tally(&t, ME, &obs, &|n| n != name::CONNECT_ERRORS);
        assert_eq!(
            status(&counts, "tcp_refused_v4.econnrefused"),
            ("skipped", 0, 20)
        );
        let c = counts
            .iter()
            .find(|c| c.key == "tcp_refused_v4.econnrefused")
            .unwrap();
        assert_eq!(
            c.note.as_deref(),
            Some("connect_errors missing on this kernel")
        );
        assert_eq!(status(&counts, "tcp_refused_v4.failures"), ("ok", 20, 20));
    }

    #[test]
    fn a_short_count_fails_and_a_misattributed_record_is_unexpected() {
        let t = traffic();
        let refused = ConnectOutcome::Failed {
            errno: libc::ECONNREFUSED,
        };
        let mut obs = observations(&t, REFUSED_V4 - 1, refused);
        // The listener's side of the connection counted as a connect.
        obs.push(connect(
            ME,
            "127.0.0.1:45000".parse().unwrap(),
            ConnectOutcome::Established,
        ));
        let counts = tally(&t, ME, &obs, &|_| true);
        assert_eq!(status(&counts, "tcp_refused_v4.attempts"), ("fail", 19, 20));
        assert_eq!(
            status(&counts, "tcp_refused_v4.econnrefused"),
            ("fail", 19, 20)
        );
        assert_eq!(status(&counts, "unexpected.records"), ("fail", 1, 0));
        assert_eq!(status(&counts, "tcp_ok.established"), ("ok", 1, 1));
    }
}

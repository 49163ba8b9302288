//! The always-on sensors against real processes: exact counts per process
//! and destination, for each way a connect can end and for UDP sends.
use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, UdpSocket},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use stormguard::ingest::Proto;
use stormguard_tests::{Capture, ChildGuard, NetNs, closed_port, run, scaled, time_scale};

const CLIENT: &str = env!("CARGO_BIN_EXE_stormclient");

fn client(args: &[&str]) -> ChildGuard {
    ChildGuard::spawn(Command::new(CLIENT).args(args).stdout(Stdio::piped()))
}

fn refused(v6: bool, what: &str) {
    let Some(mut cap) = Capture::start(what) else {
        return;
    };
    let dest = closed_port(v6);
    let addr = dest.to_string();
    let started = Instant::now();
    // The storm, and an unrelated process hitting the same port meanwhile.
    let storm = client(&["tcp", "--addr", &addr, "--count", "500"]);
    let noise = client(&["tcp", "--addr", &addr, "--count", "37"]);
    let (storm_pid, noise_pid) = (storm.pid(), noise.pid());
    let out = cap.wait_child(storm, Duration::from_secs(60));
    assert_eq!(
        out.trim(),
        r#"{"ok":0,"refused":500,"timed_out":0,"other":0}"#
    );
    cap.wait_child(noise, Duration::from_secs(60));
    cap.settle();
    println!(
        "{what}: 500 refused connects observed in {:?}",
        started.elapsed()
    );

    let f = cap.flow(storm_pid, Proto::Tcp, dest);
    assert_eq!(f.attempts, 500);
    assert_eq!(f.failures, 500);
    assert_eq!(f.established, 0);
    assert_eq!(f.resets, 500);
    assert_eq!(f.errors().len(), 1, "{:?}", f.errors());
    assert_eq!(f.errors()["ECONNREFUSED"], 500);
    assert_eq!(cap.flow(noise_pid, Proto::Tcp, dest).attempts, 37);
    assert_eq!(
        cap.pids_towards(Proto::Tcp, dest),
        {
            let mut v = vec![(storm_pid, 500), (noise_pid, 37)];
            v.sort_unstable();
            v
        },
        "only the two clients connect there, with their own counts"
    );
}

#[test]
fn refused_ipv4_connects_are_counted_exactly() {
    refused(false, "refused_ipv4");
}

#[test]
fn refused_ipv6_connects_are_counted_exactly() {
    refused(true, "refused_ipv6");
}

#[test]
fn successful_connects_with_request_and_response() {
    let Some(mut cap) = Capture::start("successful_connects") else {
        return;
    };
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let dest = listener.local_addr().unwrap();
    // The server runs in this test process: its accepted sockets go
    // SYN_RECV→ESTABLISHED in the client's task on loopback, and must not
    // be counted for anyone.
    let server = thread::spawn(move || {
        for _ in 0..200 {
            let (mut s, _) = listener.accept().unwrap();
            let mut buf = [0u8; 5];
            s.read_exact(&mut buf).unwrap();
            s.write_all(b"pong\n").unwrap();
        }
    });
    let c = client(&[
        "tcp",
        "--addr",
        &dest.to_string(),
        "--count",
        "200",
        "--request",
    ]);
    let pid = c.pid();
    assert_eq!(
        cap.wait_child(c, Duration::from_secs(60)).trim(),
        r#"{"ok":200,"refused":0,"timed_out":0,"other":0}"#
    );
    server.join().unwrap();
    cap.settle();
    let f = cap.flow(pid, Proto::Tcp, dest);
    assert_eq!((f.attempts, f.established, f.failures), (200, 200, 0));
    assert_eq!(cap.pids_towards(Proto::Tcp, dest), vec![(pid, 200)]);
    assert_eq!(
        cap.connects_by(std::process::id()),
        0,
        "server-side sockets counted as connects"
    );
}

#[test]
fn a_connect_that_times_out_is_one_etimedout() {
    let Some(mut cap) = Capture::start("timeout") else {
        return;
    };
    let ns = NetNs::create("timeout");
    // Drop SYNs to one port inside the namespace's loopback.
    let nft = "add table inet sg; \
               add chain inet sg input { type filter hook input priority 0; }; \
               add rule inet sg input tcp dport 9999 drop";
    run("ip", &["netns", "exec", &ns.name, "nft", nft]);
    let started = Instant::now();
    let c = ChildGuard::spawn(
        ns.command(CLIENT)
            .args(["timeout", "--addr", "127.0.0.1:9999"])
            .stdout(Stdio::piped()),
    );
    let pid = c.pid();
    assert_eq!(
        cap.wait_child(c, Duration::from_secs(30)).trim(),
        r#"{"ok":0,"refused":0,"timed_out":1,"other":0}"#
    );
    println!("timeout: connect failed after {:?}", started.elapsed());
    cap.settle();
    let dest: SocketAddr = "127.0.0.1:9999".parse().unwrap();
    let f = cap.flow(pid, Proto::Tcp, dest);
    assert_eq!((f.attempts, f.failures, f.established), (1, 1, 0));
    assert_eq!(f.errors()["ETIMEDOUT"], 1);
    // With TCP_SYNCNT=1 this kernel retransmits the SYN once or twice
    // within the ~3 s budget (timer rounding); without any, the timeout
    // would not have come from SYN retransmits.
    assert!(
        (1..=2).contains(&f.syn_retransmits),
        "SYN retransmits: {}",
        f.syn_retransmits
    );
    // The namespace is part of the destination: not the host's loopback.
    let host_netns = cap
        .observations
        .iter()
        .filter_map(|o| match o {
            stormguard::ingest::Observation::Connect { pid: p, dest, .. } if *p == pid => {
                Some(dest.netns)
            }
            _ => None,
        })
        .collect::<Vec<_>>();
    assert_eq!(host_netns.len(), 1);
    assert_ne!(host_netns[0], own_netns_cookie(), "namespace not recorded");
}

/// SO_NETNS_COOKIE of this process's namespace.
fn own_netns_cookie() -> u64 {
    use std::os::fd::AsRawFd;
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut cookie = 0u64;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cookie`.
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    assert_eq!(rc, 0);
    cookie
}

fn udp(connected: bool, what: &str) {
    let Some(mut cap) = Capture::start(what) else {
        return;
    };
    let server = UdpSocket::bind("127.0.0.1:0").unwrap();
    let dest = server.local_addr().unwrap();
    let mut args = vec!["udp", "--addr"];
    let addr = dest.to_string();
    args.extend([addr.as_str(), "--count", "300"]);
    if connected {
        args.push("--connected");
    }
    let c = client(&args);
    let pid = c.pid();
    cap.wait_child(c, Duration::from_secs(60));
    cap.settle();
    let f = cap.flow(pid, Proto::Udp, dest);
    assert_eq!(f.udp_sends, 300);
    assert_eq!(f.udp_connects, u64::from(connected));
    assert_eq!(f.attempts, 300 + u64::from(connected));
    assert!(
        f.udp_bytes >= 300 * "query 0".len() as u64,
        "bytes {}",
        f.udp_bytes
    );
    assert_eq!(cap.pids_towards(Proto::Udp, dest), vec![(pid, f.attempts)]);
}

#[test]
fn unconnected_udp_sends_are_counted_per_destination() {
    udp(false, "udp_unconnected");
}

#[test]
fn connected_udp_sends_are_counted_per_destination() {
    udp(true, "udp_connected");
}

/// Connects that never reach SYN_SENT (no route) are seen by the cgroup
/// hook alone; their errno only while the on-demand probes are attached.
fn unreachable(probed: bool, what: &str) {
    let Some(mut cap) = Capture::start(what) else {
        return;
    };
    if probed {
        cap.sensors
            .attach_on_demand()
            .expect("attach on-demand probes");
    }
    // A namespace with only loopback: 10.9.9.9 has no route.
    let ns = NetNs::create(if probed { "unreach-p" } else { "unreach" });
    let c = ChildGuard::spawn(
        ns.command(CLIENT)
            .args(["tcp", "--addr", "10.9.9.9:80", "--count", "50"])
            .stdout(Stdio::piped()),
    );
    let pid = c.pid();
    assert_eq!(
        cap.wait_child(c, Duration::from_secs(30)).trim(),
        r#"{"ok":0,"refused":0,"timed_out":0,"other":50}"#
    );
    cap.settle();
    let f = cap.flow(pid, Proto::Tcp, "10.9.9.9:80".parse().unwrap());
    assert_eq!((f.attempts, f.failures, f.established), (50, 50, 0));
    let label = if probed {
        "ENETUNREACH"
    } else {
        stormguard::flows::FAILED_BEFORE_SYN
    };
    assert_eq!(f.errors().len(), 1, "{:?}", f.errors());
    assert_eq!(f.errors()[label], 50, "{:?}", f.errors());
}

#[test]
fn connects_failing_before_syn_are_counted() {
    unreachable(false, "unreachable");
}

#[test]
fn connects_failing_before_syn_get_their_errno_when_probed() {
    unreachable(true, "unreachable_probed");
}

/// The reply a test server gives every request.
const REPLY: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n";

/// A server for one connection that answers every request with `reply`
/// until the client closes.
fn answer_one_connection(reply: &'static [u8]) -> (SocketAddr, thread::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let dest = listener.local_addr().unwrap();
    let server = thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut buf = [0u8; 256];
        loop {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => s.write_all(reply).unwrap(),
            }
        }
    });
    (dest, server)
}

#[test]
fn keep_alive_requests_are_one_exchange_each_with_their_lengths() {
    let Some(mut cap) = Capture::start("keep_alive_exchanges") else {
        return;
    };
    let (dest, server) = answer_one_connection(REPLY);
    let c = client(&[
        "http",
        "--addr",
        &dest.to_string(),
        "--count",
        "150",
        "--reply-len",
        &REPLY.len().to_string(),
    ]);
    let pid = c.pid();
    cap.wait_child(c, Duration::from_secs(60));
    server.join().unwrap();
    cap.settle();
    let request_len = "GET /api HTTP/1.1\r\nHost: test\r\n\r\n".len() as u32;
    use stormguard::ingest::Observation;
    // (sent, received) of this client's records of one kind.
    let lengths = |exchange: bool| -> Vec<(u32, u32)> {
        cap.observations
            .iter()
            .filter_map(|o| match *o {
                Observation::Exchange {
                    pid: p,
                    sent,
                    received,
                    ..
                } if exchange && p == pid => Some((sent, received)),
                Observation::ConnEnd {
                    pid: p,
                    sent,
                    received,
                    ..
                } if !exchange && p == pid => Some((sent, received)),
                _ => None,
            })
            .collect()
    };
    let exchanges = lengths(true);
    assert_eq!(exchanges.len(), 150);
    assert!(
        exchanges
            .iter()
            .all(|e| *e == (request_len, REPLY.len() as u32)),
        "{exchanges:?}"
    );
    let ends = lengths(false);
    assert_eq!(
        ends,
        vec![(150 * request_len, 150 * REPLY.len() as u32)],
        "one connection end with its totals"
    );
    // The server's side of the connection is not a client connection.
    assert_eq!(cap.connects_by(std::process::id()), 0);
}

#[test]
fn udp_replies_on_a_connected_socket_are_counted() {
    let Some(mut cap) = Capture::start("udp_replies") else {
        return;
    };
    let server = UdpSocket::bind("127.0.0.1:0").unwrap();
    let dest = server.local_addr().unwrap();
    server
        .set_read_timeout(Some(scaled(Duration::from_secs(20))))
        .unwrap();
    let echo = thread::spawn(move || {
        let mut buf = [0u8; 512];
        for _ in 0..120 {
            let (n, from) = server.recv_from(&mut buf).unwrap();
            server.send_to(&buf[..n], from).unwrap();
        }
    });
    let c = client(&[
        "udp",
        "--addr",
        &dest.to_string(),
        "--count",
        "120",
        "--connected",
        "--replies",
    ]);
    let pid = c.pid();
    cap.wait_child(c, Duration::from_secs(60));
    echo.join().unwrap();
    cap.settle();
    let f = cap.flow(pid, Proto::Udp, dest);
    assert_eq!((f.udp_sends, f.udp_recvs, f.udp_connects), (120, 120, 1));
}

/// The reply's first bytes are read for a probed process: every response
/// the client got after it became a suspect is an HTTP 503 — and only the
/// connection's first request is marked first.
#[test]
fn replies_of_a_probed_client_are_read_as_http_statuses() {
    use stormguard::ingest::{Observation, Reply};
    let Some(mut cap) = Capture::start("http_replies_read") else {
        return;
    };
    let (dest, server) = answer_one_connection(REPLY);
    // 10 ms apart (stretched on a slow machine), so attaching the probes
    // below costs only the first few replies.
    let gap_ms = (10.0 * time_scale()).round().to_string();
    let c = client(&[
        "http",
        "--addr",
        &dest.to_string(),
        "--count",
        "100",
        "--gap-ms",
        &gap_ms,
        "--reply-len",
        &REPLY.len().to_string(),
    ]);
    let pid = c.pid();
    cap.sensors.attach_on_demand().expect("on-demand probes");
    cap.sensors.set_suspects(&[pid]).expect("suspects");
    cap.wait_child(c, Duration::from_secs(60));
    server.join().unwrap();
    cap.settle();
    cap.sensors.detach_on_demand().expect("detach");
    let replies: Vec<(bool, Reply)> = cap
        .observations
        .iter()
        .filter_map(|o| match *o {
            Observation::Exchange {
                pid: p,
                first,
                reply,
                ..
            } if p == pid => Some((first, reply)),
            _ => None,
        })
        .collect();
    assert_eq!(replies.len(), 100);
    assert_eq!(replies.iter().filter(|(first, _)| *first).count(), 1);
    assert!(replies[0].0, "the first exchange is the connection's first");
    let read: Vec<Reply> = replies
        .iter()
        .map(|(_, r)| *r)
        .skip_while(|r| *r == Reply::NotRead)
        .collect();
    assert!(read.len() >= 90, "only {} of 100 read", read.len());
    assert!(
        read.iter().all(|r| *r == Reply::Http { status: 503 }),
        "{read:?}"
    );
}

/// ICMP port unreachable on a connected UDP socket is one UDP error per
/// datagram that drew it, attributed to the sender.
#[test]
fn icmp_errors_on_a_connected_udp_socket_are_counted() {
    use stormguard::ingest::Observation;
    let Some(mut cap) = Capture::start("udp_icmp_errors") else {
        return;
    };
    let port = {
        let s = UdpSocket::bind("127.0.0.1:0").unwrap();
        s.local_addr().unwrap().port()
    };
    let script = format!(
        "import socket, time\n\
         s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
         s.connect(('127.0.0.1', {port}))\n\
         ok = 0\n\
         for i in range(100):\n\
         \x20   try:\n\
         \x20       s.send(b'x' * 20); ok += 1\n\
         \x20   except ConnectionRefusedError:\n\
         \x20       pass\n\
         \x20   time.sleep(0.002)\n\
         print(ok)\n"
    );
    let c = ChildGuard::spawn(
        Command::new("python3")
            .args(["-c", &script])
            .stdout(Stdio::piped()),
    );
    let pid = c.pid();
    let out = cap.wait_child(c, Duration::from_secs(60));
    cap.settle();
    let sent: usize = out.trim().parse().expect("sends");
    let errors = cap
        .observations
        .iter()
        .filter(|o| {
            matches!(o, Observation::UdpError { pid: p, errno, dest, .. }
                if *p == pid && *errno == libc::ECONNREFUSED && dest.port == port)
        })
        .count();
    assert!(sent >= 40, "python sent {sent}");
    assert_eq!(errors, sent, "one ICMP error per datagram sent");
}

/// A suspect cgroup: every process in it is read from its first request,
/// though none of them is a suspect by pid.
#[test]
fn replies_of_a_process_in_a_suspect_cgroup_are_read() {
    use stormguard::ingest::{Observation, Reply};
    let Some(mut cap) = Capture::start("suspect_cgroup") else {
        return;
    };
    let cg = stormguard_tests::Cgroup::create("suspect-cgroup");
    let (dest, server) = answer_one_connection(REPLY);
    cap.sensors.attach_on_demand().expect("on-demand probes");
    cap.sensors
        .set_suspect_cgroups(&[cg.id()])
        .expect("suspect cgroups");
    let c = ChildGuard::spawn(
        cg.exec_in(
            CLIENT,
            &[
                "http",
                "--addr",
                &dest.to_string(),
                "--count",
                "20",
                "--reply-len",
                &REPLY.len().to_string(),
            ],
        )
        .stdout(Stdio::piped()),
    );
    let pid = c.pid();
    cap.wait_child(c, Duration::from_secs(60));
    server.join().unwrap();
    cap.settle();
    cap.sensors.detach_on_demand().expect("detach");
    let replies: Vec<Reply> = cap
        .observations
        .iter()
        .filter_map(|o| match *o {
            Observation::Exchange { pid: p, reply, .. } if p == pid => Some(reply),
            _ => None,
        })
        .collect();
    assert_eq!(replies.len(), 20);
    assert!(
        replies.iter().all(|r| *r == Reply::Http { status: 503 }),
        "{replies:?}"
    );
}

/// A UDP socket's destination dies with it: a new socket the kernel puts
/// at a released socket's address must never be taken for a connected
/// socket to the old destination. Many rounds, because only some of them
/// reuse the address (socket memory is freed after an RCU grace period).
#[test]
fn a_new_udp_socket_never_inherits_a_released_sockets_destination() {
    use stormguard::ingest::Observation;
    let Some(mut cap) = Capture::start("udp_dest_release") else {
        return;
    };
    // A: takes datagrams, never answers. B: answers each one.
    let a = UdpSocket::bind("127.0.0.1:0").unwrap();
    let a_addr = a.local_addr().unwrap();
    let b = UdpSocket::bind("127.0.0.1:0").unwrap();
    let b_addr = b.local_addr().unwrap();
    b.set_read_timeout(Some(scaled(Duration::from_secs(10))))
        .unwrap();
    const ROUNDS: usize = 300;
    let echo = thread::spawn(move || {
        let mut buf = [0u8; 64];
        for _ in 0..ROUNDS {
            let (n, from) = b.recv_from(&mut buf).unwrap();
            b.send_to(&buf[..n], from).unwrap();
        }
    });
    let mut buf = [0u8; 64];
    for round in 0..ROUNDS {
        let old = UdpSocket::bind("127.0.0.1:0").unwrap();
        old.connect(a_addr).unwrap();
        old.send(b"old").unwrap();
        drop(old);
        // Let the released socket's memory come back for the next one.
        if round % 2 == 1 {
            thread::sleep(Duration::from_millis(2));
        }
        let new = UdpSocket::bind("127.0.0.1:0").unwrap();
        new.set_read_timeout(Some(scaled(Duration::from_secs(10))))
            .unwrap();
        new.send_to(b"new", b_addr).unwrap();
        let (n, from) = new.recv_from(&mut buf).unwrap();
        assert_eq!((n, from), (3, b_addr));
        if round % 50 == 0 {
            cap.drain();
        }
    }
    echo.join().unwrap();
    cap.settle();
    drop(a);
    let me = std::process::id();
    let inherited = cap
        .observations
        .iter()
        .filter(|o| {
            matches!(o, Observation::UdpRecv { pid, dest, .. }
                if *pid == me && dest.port == a_addr.port())
        })
        .count();
    let connects = cap
        .observations
        .iter()
        .filter(|o| {
            matches!(o, Observation::UdpConnect { pid, dest, .. }
                if *pid == me && dest.port == a_addr.port())
        })
        .count();
    assert_eq!(connects, ROUNDS, "every old socket's connect seen");
    assert_eq!(
        inherited, 0,
        "replies to new sockets attributed to a released socket's destination"
    );
}

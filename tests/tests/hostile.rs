//! A hostile local user against the real daemon: 1,000 idle connections to
//! the metrics port must not exhaust its descriptors nor stop it answering
//! the API; connections beyond the cap are closed at once and counted, and
//! the idle ones are closed after the header timeout (5 s).
use std::{
    io::{ErrorKind, Read, Write},
    net::TcpStream,
    time::{Duration, Instant},
};

use stormguard_tests::{Daemon, scaled};

/// The metrics server's cap (`metrics::MAX_CONNECTIONS`).
const CAP: usize = stormguard::metrics::MAX_CONNECTIONS;
/// Idle connections the test opens.
const IDLE: usize = 1_000;
/// Most descriptors the daemon may hold while they are open.
const FD_BOUND: usize = 300;

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Whether the server closed `s` (EOF or reset), without waiting.
fn closed(mut s: &TcpStream) -> bool {
    let mut buf = [0u8; 512];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == ErrorKind::WouldBlock => return false,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => return true,
        }
    }
}

/// One GET /metrics with `Connection: close`: the body, or None when the
/// server closed the connection without answering (it was full).
fn scrape(addr: std::net::SocketAddr) -> Option<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(
        format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    text.starts_with("HTTP/1.1 200").then_some(text)
}

fn sample(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

#[test]
fn a_thousand_idle_metrics_connections_cost_nothing() {
    let dir = std::env::temp_dir().join(format!("sg-hostile-{}", std::process::id()));
    let Some(d) = Daemon::start("hostile", &dir, "") else {
        return;
    };
    let pid = d.child.as_ref().expect("daemon").pid();
    let addr = d.metrics.expect("metrics port");
    let before = open_fds(pid);
    println!("daemon {pid}: {before} descriptors before");

    let start = Instant::now();
    let mut conns = Vec::with_capacity(IDLE);
    for i in 0..IDLE {
        let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
            .unwrap_or_else(|e| panic!("connection {i}: {e}"));
        s.set_nonblocking(true).unwrap();
        conns.push(s);
    }
    println!("{IDLE} connections in {:?}", start.elapsed());

    // Exactly the cap stay open; every other one is closed at once.
    let (mut open, mut worst_fds) = (IDLE, 0);
    let settle = Instant::now() + scaled(Duration::from_secs(3));
    while Instant::now() < settle {
        open = conns.iter().filter(|s| !closed(s)).count();
        worst_fds = worst_fds.max(open_fds(pid));
        if open == CAP {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "too slow to judge the cap before the header timeout: {:?}",
        start.elapsed()
    );
    assert_eq!(open, CAP, "connections held open by the daemon");
    let fds = open_fds(pid);
    worst_fds = worst_fds.max(fds);
    println!("daemon holds {fds} descriptors (worst {worst_fds}) with {IDLE} connections");
    assert!(worst_fds < FD_BOUND, "{worst_fds} descriptors");
    assert!(worst_fds <= before + CAP + 16, "{worst_fds} vs {before}");

    // The API answers meanwhile.
    let api_start = Instant::now();
    let status = d.json(&["status"]);
    let took = api_start.elapsed();
    println!("status answered in {took:?} with {CAP} idle metrics connections");
    assert_eq!(status["pid"], pid, "{status}");
    assert!(took < scaled(Duration::from_secs(2)), "{took:?}");

    // The held ones are closed by the server after the 5 s header timeout
    // (not before 4 s from their accept), and /metrics answers again.
    let mut refused_polls = 0u64;
    let body = loop {
        if let Some(body) = scrape(addr) {
            break body;
        }
        refused_polls += 1;
        assert!(
            start.elapsed() < scaled(Duration::from_secs(10)),
            "/metrics never answered"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let answered = start.elapsed();
    println!("/metrics answered {answered:?} after the flood ({refused_polls} polls refused)");
    assert!(answered >= Duration::from_secs(4), "{answered:?}");
    assert_eq!(
        sample(&body, "stormguard_metrics_connections_refused_total"),
        Some((IDLE - CAP) as u64 + refused_polls),
        "{body}"
    );
    let end = Instant::now() + scaled(Duration::from_secs(5));
    loop {
        let open = conns.iter().filter(|s| !closed(s)).count();
        if open == 0 {
            break;
        }
        assert!(Instant::now() < end, "{open} connections still open");
        std::thread::sleep(Duration::from_millis(50));
    }
    println!(
        "all idle connections closed {:?} after opening",
        start.elapsed()
    );
    drop(conns);
    // Descriptors come back: the 64 connections' are released (a few others
    // may have appeared meanwhile: the API's database connection, on-demand
    // probes attached for someone's storm).
    let end = Instant::now() + scaled(Duration::from_secs(5));
    while open_fds(pid) > before + 16 {
        assert!(
            Instant::now() < end,
            "{} descriptors, {before} before",
            open_fds(pid)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

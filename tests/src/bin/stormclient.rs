//! A real client process for the integration tests: makes an exact number
//! of connects or sends and reports what it saw, so the tests can compare
//! the kernel's counts with the application's own.
use std::{
    io::{ErrorKind, Read, Write},
    net::{SocketAddr, TcpStream, UdpSocket},
    os::fd::AsRawFd,
    time::{Duration, Instant},
};

use clap::{Parser, Subcommand};

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// `count` connects, each on a new socket; with `--request`, each
    /// established connection sends one line and reads one reply.
    Tcp {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long)]
        count: u64,
        #[arg(long)]
        request: bool,
        /// Pause between attempts, in milliseconds.
        #[arg(long, default_value_t = 0)]
        gap_ms: u64,
        /// Pace attempts at this many per second instead.
        #[arg(long)]
        rate: Option<f64>,
    },
    /// One connect with TCP_SYNCNT=1, expected to time out (~3 s).
    Timeout {
        #[arg(long)]
        addr: SocketAddr,
    },
    /// `count` UDP datagrams, with sendto() or, with `--connected`,
    /// connect() then send().
    Udp {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long)]
        count: u64,
        #[arg(long)]
        connected: bool,
        /// Wait for a reply to each datagram (connected sockets only).
        #[arg(long)]
        replies: bool,
    },
    /// One keep-alive connection: `count` times, send `request` and read
    /// a reply of `reply_len` bytes, with `gap_ms` between requests.
    Http {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long)]
        count: u64,
        #[arg(long, default_value = "GET /api HTTP/1.1\r\nHost: test\r\n\r\n")]
        request: String,
        /// Make each request distinct (a counter in the path), same length.
        #[arg(long)]
        distinct: bool,
        #[arg(long)]
        reply_len: usize,
        #[arg(long, default_value_t = 0)]
        gap_ms: u64,
        /// Stop after this many seconds even if `count` is not reached.
        #[arg(long, default_value_t = 30.0)]
        max_secs: f64,
        /// Pace requests at this many per second.
        #[arg(long)]
        rate: Option<f64>,
    },
    /// DNS-style queries for one name on a connected UDP socket, each with
    /// a fresh transaction id, for `secs` seconds with `gap_ms` between.
    Dns {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long)]
        secs: f64,
        #[arg(long, default_value_t = 5)]
        gap_ms: u64,
    },
    /// Starts `count` copies of this program, one every `gap_ms`, each
    /// running the command after `--` (a new short-lived process per try).
    Spawn {
        #[arg(long)]
        count: u64,
        #[arg(long)]
        gap_ms: u64,
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Always-failing connects with exponential backoff: gaps of
    /// base × factor^i, each scaled by a random 1 ± jitter.
    Backoff {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long)]
        count: u64,
        #[arg(long)]
        base_ms: f64,
        #[arg(long)]
        factor: f64,
        #[arg(long, default_value_t = 0.2)]
        jitter: f64,
    },
    /// A pool of `size` connections; when the server drops them, each
    /// reconnects once.
    Pool {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long)]
        size: usize,
    },
    /// Forks `children` copies of itself (no exec), each making `rate`
    /// refused-or-not connects a second to `addr` for `secs` seconds, then
    /// waits for them all: many processes of one parent storming one
    /// destination. The children die with the parent (PR_SET_PDEATHSIG), so
    /// killing it stops the storm. Prints how many children exited cleanly.
    Fanout {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long)]
        children: u32,
        #[arg(long)]
        rate: f64,
        #[arg(long)]
        secs: f64,
    },
    /// One refused connect to each of `count` loopback addresses
    /// (127.1.0.0 upwards, port `port`): many destinations from one process.
    Scatter {
        #[arg(long)]
        count: u32,
        #[arg(long)]
        port: u16,
    },
    /// Refused connects in a tight loop for `secs` seconds (at most
    /// `max` attempts): a retry storm.
    Storm {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long)]
        secs: f64,
        #[arg(long, default_value_t = 2_000_000)]
        max: u64,
    },
    /// Connects for `secs` seconds (at `rate` per second, or as fast as
    /// possible; at most 20,000,000), each on a new socket closed at once,
    /// counted by outcome in 100 ms buckets, with the CPU time it used:
    /// what an enforced budget does to a client, as the client sees it.
    /// Prints one JSON object; `ready` on stderr once started.
    Budgeted {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long)]
        secs: f64,
        #[arg(long)]
        rate: Option<f64>,
        /// The errno a budget denies with, counted as `denied`.
        #[arg(long, default_value_t = 113)]
        deny_errno: i32,
    },
}

#[derive(Default, Debug)]
struct Tally {
    ok: u64,
    refused: u64,
    timed_out: u64,
    other: u64,
}

impl Tally {
    fn add(&mut self, r: &std::io::Result<TcpStream>) {
        match r {
            Ok(_) => self.ok += 1,
            Err(e) if e.kind() == ErrorKind::ConnectionRefused => self.refused += 1,
            Err(e) if e.kind() == ErrorKind::TimedOut => self.timed_out += 1,
            Err(_) => self.other += 1,
        }
    }

    /// One JSON line; the elapsed time goes to stderr so the counts stay
    /// exact to compare.
    fn print(&self, elapsed: Duration) {
        println!(
            "{{\"ok\":{},\"refused\":{},\"timed_out\":{},\"other\":{}}}",
            self.ok, self.refused, self.timed_out, self.other
        );
        eprintln!("elapsed_s {}", elapsed.as_secs_f64());
    }
}

fn main() -> anyhow::Result<()> {
    let started = Instant::now();
    let mut tally = Tally::default();
    match Cli::parse().cmd {
        Cmd::Tcp {
            addr,
            count,
            request,
            gap_ms,
            rate,
        } => {
            let mut pace = rate.map(Pacer::new);
            for _ in 0..count {
                if let Some(p) = pace.as_mut() {
                    p.wait();
                }
                let r = TcpStream::connect(addr);
                tally.add(&r);
                if let (Ok(mut s), true) = (r, request) {
                    s.write_all(b"ping\n")?;
                    let mut buf = [0u8; 5];
                    s.read_exact(&mut buf)?;
                }
                if gap_ms > 0 {
                    std::thread::sleep(Duration::from_millis(gap_ms));
                }
            }
        }
        Cmd::Http {
            addr,
            count,
            request,
            distinct,
            reply_len,
            gap_ms,
            max_secs,
            rate,
        } => {
            let mut pace = rate.map(Pacer::new);
            let request = request.replace("\\r\\n", "\r\n");
            let mut s = TcpStream::connect(addr)?;
            tally.ok += 1;
            let mut reply = vec![0u8; reply_len];
            let end = Instant::now() + Duration::from_secs_f64(max_secs);
            for i in 0..count {
                if Instant::now() >= end {
                    break;
                }
                if let Some(p) = pace.as_mut() {
                    p.wait();
                }
                if distinct {
                    s.write_all(request.replace("/api", &format!("/{i:08}")).as_bytes())?;
                } else {
                    s.write_all(request.as_bytes())?;
                }
                s.read_exact(&mut reply)?;
                if gap_ms > 0 {
                    std::thread::sleep(Duration::from_millis(gap_ms));
                }
            }
        }
        Cmd::Dns { addr, secs, gap_ms } => {
            let s = UdpSocket::bind(if addr.is_ipv4() {
                "0.0.0.0:0"
            } else {
                "[::]:0"
            })?;
            s.connect(addr)?;
            let end = Instant::now() + Duration::from_secs_f64(secs);
            let mut id: u16 = std::process::id() as u16;
            while Instant::now() < end {
                // A cheap LCG: a different transaction id every query.
                id = id.wrapping_mul(25173).wrapping_add(13849);
                s.send(&dns_query(id, "service.example.com"))?;
                tally.ok += 1;
                std::thread::sleep(Duration::from_millis(gap_ms));
            }
        }
        Cmd::Spawn {
            count,
            gap_ms,
            args,
        } => {
            let exe = std::env::current_exe()?;
            let mut children = Vec::new();
            for _ in 0..count {
                children.push(
                    std::process::Command::new(&exe)
                        .args(&args)
                        .stdout(std::process::Stdio::null())
                        .spawn()?,
                );
                std::thread::sleep(Duration::from_millis(gap_ms));
                // Reap as we go so the process table stays small.
                children.retain_mut(|c| !matches!(c.try_wait(), Ok(Some(_))));
            }
            for mut c in children {
                c.wait()?;
            }
            tally.ok = count;
        }
        Cmd::Scatter { count, port } => {
            for i in 0..count {
                let ip = std::net::Ipv4Addr::new(127, 1 + (i >> 16) as u8, (i >> 8) as u8, i as u8);
                match TcpStream::connect(SocketAddr::from((ip, port))) {
                    Ok(_) => tally.ok += 1,
                    Err(e) if e.kind() == ErrorKind::ConnectionRefused => tally.refused += 1,
                    Err(_) => tally.other += 1,
                }
            }
        }
        Cmd::Backoff {
            addr,
            count,
            base_ms,
            factor,
            jitter,
        } => {
            let mut seed = std::process::id() as u64;
            let mut gap = base_ms;
            for _ in 0..count {
                tally.add(&TcpStream::connect(addr));
                seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let r = (seed >> 33) as f64 / (1u64 << 31) as f64; // 0..1
                let scale = 1.0 + jitter * (2.0 * r - 1.0);
                std::thread::sleep(Duration::from_secs_f64(gap * scale / 1e3));
                gap *= factor;
            }
        }
        Cmd::Pool { addr, size } => {
            let mut pool = Vec::new();
            for _ in 0..size {
                let r = TcpStream::connect(addr);
                tally.add(&r);
                pool.push(r?);
            }
            println!("ready");
            std::io::stdout().flush()?;
            // Wait for the server to drop each connection, then reconnect it once.
            let mut again = Vec::new();
            for mut s in pool {
                let mut buf = [0u8; 1];
                let _ = s.read(&mut buf);
                let r = TcpStream::connect(addr);
                tally.add(&r);
                again.push(r);
            }
        }
        Cmd::Timeout { addr } => {
            let r = connect_with_syncnt(addr, 1);
            tally.add(&r);
        }
        Cmd::Udp {
            addr,
            count,
            connected,
            replies,
        } => {
            let bind: SocketAddr = if addr.is_ipv4() {
                "0.0.0.0:0".parse()?
            } else {
                "[::]:0".parse()?
            };
            let s = UdpSocket::bind(bind)?;
            if connected {
                s.connect(addr)?;
            }
            for i in 0..count {
                let msg = format!("query {i}");
                if connected {
                    s.send(msg.as_bytes())?;
                    if replies {
                        let mut buf = [0u8; 512];
                        s.recv(&mut buf)?;
                    }
                } else {
                    s.send_to(msg.as_bytes(), addr)?;
                }
                tally.ok += 1;
            }
        }
        Cmd::Fanout {
            addr,
            children,
            rate,
            secs,
        } => {
            let pids = fanout(addr, children, rate, secs)?;
            for pid in pids {
                let mut status = 0;
                // SAFETY: waiting for our own child.
                let rc = unsafe { libc::waitpid(pid, &mut status, 0) };
                if rc == pid && libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0 {
                    tally.ok += 1;
                } else {
                    tally.other += 1;
                }
            }
        }
        Cmd::Budgeted {
            addr,
            secs,
            rate,
            deny_errno,
        } => {
            budgeted(addr, secs, rate, deny_errno);
            return Ok(());
        }
        Cmd::Storm { addr, secs, max } => {
            let end = Instant::now() + Duration::from_secs_f64(secs);
            let mut n = 0;
            while Instant::now() < end && n < max {
                tally.add(&TcpStream::connect(addr));
                n += 1;
            }
        }
    }
    tally.print(started.elapsed());
    Ok(())
}

/// CPU time of this process so far (user + system), in clock ticks.
fn cpu_ticks() -> u64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<u64> = after
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    // After the comm: state is field 3; utime 14 and stime 15.
    f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0)
}

fn budgeted(addr: SocketAddr, secs: f64, rate: Option<f64>, deny_errno: i32) {
    const BUCKET_MS: u128 = 100;
    let n = (secs * 1000.0 / BUCKET_MS as f64).ceil() as usize + 1;
    let (mut ok, mut refused, mut denied, mut other) =
        (vec![0u64; n], vec![0u64; n], vec![0u64; n], vec![0u64; n]);
    let mut errnos = std::collections::BTreeMap::<i32, u64>::new();
    let mut pace = rate.map(Pacer::new);
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(secs);
    eprintln!("ready");
    let mut count = 0u64;
    while Instant::now() < end && count < 20_000_000 {
        if let Some(p) = pace.as_mut() {
            p.wait();
        }
        let r = TcpStream::connect(addr);
        let b = ((start.elapsed().as_millis() / BUCKET_MS) as usize).min(n - 1);
        match r {
            Ok(_) => ok[b] += 1,
            Err(e) => {
                let code = e.raw_os_error().unwrap_or(-1);
                *errnos.entry(code).or_default() += 1;
                if code == deny_errno {
                    denied[b] += 1;
                } else if e.kind() == ErrorKind::ConnectionRefused {
                    refused[b] += 1;
                } else {
                    other[b] += 1;
                }
            }
        }
        count += 1;
    }
    let list = |v: &[u64]| v.iter().map(u64::to_string).collect::<Vec<_>>().join(",");
    let errnos = errnos
        .iter()
        .map(|(k, v)| format!("\"{k}\":{v}"))
        .collect::<Vec<_>>()
        .join(",");
    println!(
        "{{\"bucket_ms\":{BUCKET_MS},\"ok\":[{}],\"refused\":[{}],\"denied\":[{}],\"other\":[{}],\"errnos\":{{{errnos}}},\"cpu_ticks\":{},\"elapsed_s\":{}}}",
        list(&ok),
        list(&refused),
        list(&denied),
        list(&other),
        cpu_ticks(),
        start.elapsed().as_secs_f64()
    );
}

/// Forks the children of `fanout`; returns their pids. On a failed fork
/// the children already started are killed.
fn fanout(addr: SocketAddr, children: u32, rate: f64, secs: f64) -> anyhow::Result<Vec<i32>> {
    let parent = std::process::id() as i32;
    let mut pids = Vec::with_capacity(children as usize);
    for _ in 0..children {
        // SAFETY: this program has one thread, so the child may run Rust
        // code; it leaves with _exit, never returning into main.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            let err = std::io::Error::last_os_error();
            for p in &pids {
                // SAFETY: signalling our own children.
                unsafe { libc::kill(*p, libc::SIGKILL) };
            }
            anyhow::bail!("fork after {} children: {err}", pids.len());
        }
        if pid == 0 {
            // SAFETY: prctl and getppid have no memory effects; _exit ends
            // the child without running the parent's destructors.
            unsafe {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                if libc::getppid() != parent {
                    libc::_exit(1); // the parent died before prctl
                }
            }
            let end = Instant::now() + Duration::from_secs_f64(secs);
            let max = (rate * secs).ceil() as u64;
            let mut pace = Pacer::new(rate);
            let mut n = 0;
            while n < max && Instant::now() < end {
                pace.wait();
                let _ = TcpStream::connect(addr);
                n += 1;
            }
            // SAFETY: see above.
            unsafe { libc::_exit(0) };
        }
        pids.push(pid);
    }
    Ok(pids)
}

/// Spaces operations evenly at a rate, catching up after a late one.
struct Pacer {
    period: Duration,
    next: Instant,
}

impl Pacer {
    fn new(rate: f64) -> Self {
        Pacer {
            period: Duration::from_secs_f64(1.0 / rate),
            next: Instant::now(),
        }
    }

    fn wait(&mut self) {
        let now = Instant::now();
        if self.next > now {
            std::thread::sleep(self.next - now);
        }
        self.next += self.period;
    }
}

/// A DNS query for an A record (RFC 1035 §4.1).
fn dns_query(id: u16, name: &str) -> Vec<u8> {
    let mut q = Vec::with_capacity(64);
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    q
}

/// A blocking connect with TCP_SYNCNT set first, which std cannot do.
fn connect_with_syncnt(addr: SocketAddr, syncnt: i32) -> std::io::Result<TcpStream> {
    let SocketAddr::V4(v4) = addr else {
        return Err(std::io::Error::other("timeout test uses IPv4"));
    };
    // SAFETY: plain socket syscalls on a descriptor we own; on success it
    // is moved into the TcpStream, which closes it.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let stream = <TcpStream as std::os::fd::FromRawFd>::from_raw_fd(fd);
        let rc = libc::setsockopt(
            stream.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_SYNCNT,
            (&syncnt as *const i32).cast(),
            std::mem::size_of::<i32>() as u32,
        );
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let sa = libc::sockaddr_in {
            sin_family: libc::AF_INET as u16,
            sin_port: v4.port().to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from_ne_bytes(v4.ip().octets()),
            },
            sin_zero: [0; 8],
        };
        let rc = libc::connect(
            stream.as_raw_fd(),
            (&sa as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as u32,
        );
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(stream)
    }
}

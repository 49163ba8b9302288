//! Workload driver for `cargo xtask bench`.
//!
//! `sgbench run <workload>` times one workload on loopback and prints one
//! JSON line with its ns/op; the bench runs it once per cell (fresh process,
//! so no state carries over between configurations). `sgbench floor` holds
//! the floor programs (one counter increment per hit, on stormguard's hooks)
//! attached until it is told to stop.
//!
//! Every loop is bounded twice: by an op count and by a wall-clock limit, so
//! a hook that makes an op pathologically slow cannot stall the bench.
//! Servers run in threads of this process and die with it.
use std::{
    io::{ErrorKind, Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::unix::net::UnixStream,
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(
    name = "sgbench",
    about = "workloads and floor programs for `cargo xtask bench`"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Time one workload and print `{"workload", "ops", "warmup_ops",
    /// "elapsed_ns", "ns_per_op", "stopped_by"}` as one JSON line on stdout.
    Run {
        workload: Workload,
        /// Pin the whole process (client and server threads) to this CPU.
        /// Unpinned, a ping-pong between two threads on two CPUs costs
        /// 4–5× more and flips between placements from run to run.
        #[arg(long)]
        cpu: Option<usize>,
        /// Most operations to time (after the warm-up).
        #[arg(long)]
        ops: u64,
        /// Most seconds to spend timing; the loop stops at whichever limit
        /// comes first and divides by the ops actually done.
        #[arg(long, default_value_t = 1.0)]
        max_secs: f64,
    },
    /// Attach the floor programs, print `sgbench: floor ready` on stderr,
    /// hold them until `--duration` passes (or stdin reaches EOF with
    /// `--until-stdin-eof`), then print hits per hook as JSON on stdout.
    Floor {
        /// Also attach the on-demand floor (raw_tracepoint sys_enter and
        /// syscalls:sys_exit_connect).
        #[arg(long)]
        on_demand: bool,
        /// Seconds to hold the programs at most.
        #[arg(long, default_value_t = 600)]
        duration: u64,
        /// Stop as soon as stdin is closed: the bench holds the pipe, so the
        /// floor can never outlive it.
        #[arg(long)]
        until_stdin_eof: bool,
    },
}

/// The workloads. Each op is what one iteration of a real client does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Workload {
    /// `getpid()` (raw syscall): the price every syscall pays.
    Getpid,
    /// socket + connect to a bound, non-listening loopback port (refused by
    /// RST) + close: one failed attempt of a retry storm.
    RefusedConnect,
    /// socket + connect + 64 B request + 64 B response + close, against a
    /// listener thread that closes after answering (HTTP/1.0 style).
    ConnectRr,
    /// One 64 B round trip on a kept-open TCP connection (TCP_NODELAY).
    TcpEcho,
    /// One 64 B round trip on a Unix stream socket pair.
    UnixEcho,
    /// One 64 B `sendto()` on an unconnected UDP socket to a bound sink
    /// that never reads (the kernel drops what does not fit its buffer).
    UdpSend,
}

/// Message size for every request, response and datagram.
const MSG: usize = 64;

fn main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
        Cmd::Run {
            workload,
            cpu,
            ops,
            max_secs,
        } => {
            if !(max_secs > 0.0 && max_secs.is_finite()) {
                bail!("--max-secs must be a positive number of seconds");
            }
            if ops == 0 {
                bail!("--ops must be at least 1");
            }
            if let Some(cpu) = cpu {
                pin(cpu)?;
            }
            let sample = run(workload, ops, Duration::from_secs_f64(max_secs))
                .with_context(|| format!("workload {workload:?}"))?;
            let name = workload
                .to_possible_value()
                .map(|v| v.get_name().to_string())
                .unwrap_or_default();
            println!(
                "{}",
                serde_json::json!({
                    "workload": name,
                    "ops": sample.ops,
                    "warmup_ops": sample.warmup_ops,
                    "elapsed_ns": sample.elapsed.as_nanos() as u64,
                    "ns_per_op": sample.elapsed.as_nanos() as f64 / sample.ops as f64,
                    "stopped_by": if sample.by_time { "time" } else { "ops" },
                })
            );
            Ok(())
        }
        Cmd::Floor {
            on_demand,
            duration,
            until_stdin_eof,
        } => floor(on_demand, Duration::from_secs(duration), until_stdin_eof),
    }
}

/// What one timed loop did.
struct Sample {
    ops: u64,
    /// Ops run before timing started (also under the probes).
    warmup_ops: u64,
    elapsed: Duration,
    /// True when the time limit, not the op count, ended the loop.
    by_time: bool,
}

/// Runs `op` up to `ops` times or until `max` has passed. The clock is read
/// only every `check` ops so that it does not weigh on a 150 ns syscall.
fn timed(
    ops: u64,
    max: Duration,
    check: u64,
    mut op: impl FnMut() -> anyhow::Result<()>,
) -> anyhow::Result<Sample> {
    let start = Instant::now();
    let mut done = 0;
    let mut by_time = false;
    while done < ops {
        op()?;
        done += 1;
        if done % check == 0 && start.elapsed() >= max {
            by_time = done < ops;
            break;
        }
    }
    Ok(Sample {
        ops: done,
        warmup_ops: 0,
        elapsed: start.elapsed(),
        by_time,
    })
}

/// Warms up (a tenth of the ops, at most a tenth of the time: page faults,
/// first-use paths, lazily created kernel objects), then times the rest.
fn warm_and_time(
    ops: u64,
    max: Duration,
    check: u64,
    mut op: impl FnMut() -> anyhow::Result<()>,
) -> anyhow::Result<Sample> {
    let warm = timed((ops / 10).max(1), max / 10, check, &mut op)?;
    Ok(Sample {
        warmup_ops: warm.ops,
        ..timed(ops, max, check, op)?
    })
}

/// Pins this thread, and so every thread it starts later, to one CPU.
fn pin(cpu: usize) -> anyhow::Result<()> {
    // SAFETY: cpu_set_t is plain data; all-zero is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    if cpu >= libc::CPU_SETSIZE as usize {
        bail!("CPU {cpu} is out of range");
    }
    // SAFETY: `cpu` is within the set's size (checked above).
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: pid 0 is the calling thread; `set` is a valid cpu_set_t of
    // the size passed.
    let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("pinning to CPU {cpu}"));
    }
    Ok(())
}

fn run(workload: Workload, ops: u64, max: Duration) -> anyhow::Result<Sample> {
    match workload {
        Workload::Getpid => warm_and_time(ops, max, 4096, || {
            // SAFETY: getpid takes no arguments and touches no memory.
            unsafe { libc::syscall(libc::SYS_getpid) };
            Ok(())
        }),
        Workload::RefusedConnect => refused_connect(ops, max),
        Workload::ConnectRr => connect_rr(ops, max),
        Workload::TcpEcho => tcp_echo(ops, max),
        Workload::UnixEcho => unix_echo(ops, max),
        Workload::UdpSend => udp_send(ops, max),
    }
}

fn loopback_any() -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, 0))
}

/// A loopback TCP port that is bound but not listening, held for the life
/// of the returned socket, so connects to it are refused by the kernel and
/// no other process can start listening there meanwhile.
struct RefusingPort {
    fd: libc::c_int,
    addr: SocketAddr,
}

impl RefusingPort {
    fn new() -> anyhow::Result<Self> {
        // SAFETY: plain socket(2) call; the fd is owned by the struct.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error()).context("socket()");
        }
        // Owned from here, so every error path below closes it.
        let mut port = RefusingPort {
            fd,
            addr: loopback_any(),
        };
        let mut sin = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: 0,
            sin_addr: libc::in_addr {
                s_addr: u32::from(Ipv4Addr::LOCALHOST).to_be(),
            },
            sin_zero: [0; 8],
        };
        let mut len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        // SAFETY: `sin` is a valid sockaddr_in and `len` its size.
        let rc = unsafe { libc::bind(fd, (&raw const sin).cast(), len) };
        if rc != 0 {
            return Err(std::io::Error::last_os_error()).context("bind(127.0.0.1:0)");
        }
        // SAFETY: getsockname writes at most `len` bytes into `sin`.
        let rc = unsafe { libc::getsockname(fd, (&raw mut sin).cast(), &mut len) };
        if rc != 0 {
            return Err(std::io::Error::last_os_error()).context("getsockname()");
        }
        port.addr = SocketAddr::from((Ipv4Addr::LOCALHOST, u16::from_be(sin.sin_port)));
        Ok(port)
    }
}

impl Drop for RefusingPort {
    fn drop(&mut self) {
        // SAFETY: the fd was opened by `new` and is closed only here.
        unsafe { libc::close(self.fd) };
    }
}

fn refused_connect(ops: u64, max: Duration) -> anyhow::Result<Sample> {
    let port = RefusingPort::new()?;
    let addr = port.addr;
    // std's connect is exactly socket + connect + (on error) close.
    warm_and_time(ops, max, 64, || match TcpStream::connect(addr) {
        Err(e) if e.kind() == ErrorKind::ConnectionRefused => Ok(()),
        Err(e) => Err(e).context("connect to the refusing port failed the wrong way"),
        Ok(_) => bail!("connect to {addr} succeeded; something is listening there"),
    })
}

fn connect_rr(ops: u64, max: Duration) -> anyhow::Result<Sample> {
    let listener = TcpListener::bind(loopback_any()).context("binding the listener")?;
    let addr = listener.local_addr()?;
    thread::spawn(move || {
        let mut req = [0u8; MSG];
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { continue };
            // Errors only mean the client went away; the next accept goes on.
            if s.read_exact(&mut req).is_ok() {
                let _ = s.write_all(&req);
            }
            // Dropping closes first, as an HTTP/1.0 server does.
        }
    });
    let req = [b'q'; MSG];
    let mut resp = Vec::with_capacity(MSG * 2);
    warm_and_time(ops, max, 64, || {
        let mut s = TcpStream::connect(addr).context("connect to the listener")?;
        s.set_nodelay(true)?;
        s.write_all(&req).context("sending the request")?;
        resp.clear();
        s.read_to_end(&mut resp).context("reading the response")?;
        if resp.len() != MSG {
            bail!("response was {} bytes, expected {MSG}", resp.len());
        }
        Ok(())
    })
}

/// Echoes fixed-size messages until the peer closes.
fn echo<S: Read + Write>(mut s: S) {
    let mut buf = [0u8; MSG];
    while s.read_exact(&mut buf).is_ok() {
        if s.write_all(&buf).is_err() {
            break;
        }
    }
}

/// One request/response round trip on a kept-open stream.
fn round_trip<S: Read + Write>(s: &mut S, buf: &mut [u8; MSG]) -> anyhow::Result<()> {
    s.write_all(buf).context("echo write")?;
    s.read_exact(buf).context("echo read")?;
    Ok(())
}

fn tcp_echo(ops: u64, max: Duration) -> anyhow::Result<Sample> {
    let listener = TcpListener::bind(loopback_any()).context("binding the listener")?;
    let addr = listener.local_addr()?;
    thread::spawn(move || {
        if let Ok((s, _)) = listener.accept() {
            let _ = s.set_nodelay(true);
            echo(s);
        }
    });
    let mut s = TcpStream::connect(addr).context("connect to the echo server")?;
    s.set_nodelay(true)?;
    let mut buf = [b'e'; MSG];
    warm_and_time(ops, max, 256, || round_trip(&mut s, &mut buf))
}

fn unix_echo(ops: u64, max: Duration) -> anyhow::Result<Sample> {
    let (mut client, server) = UnixStream::pair().context("socketpair")?;
    thread::spawn(move || echo(server));
    let mut buf = [b'u'; MSG];
    warm_and_time(ops, max, 256, || round_trip(&mut client, &mut buf))
}

fn udp_send(ops: u64, max: Duration) -> anyhow::Result<Sample> {
    // Bound so the datagrams are delivered (and dropped when its buffer is
    // full) rather than answered with ICMP port-unreachable.
    let sink = UdpSocket::bind(loopback_any()).context("binding the sink")?;
    let dest = sink.local_addr()?;
    let sock = UdpSocket::bind(loopback_any()).context("binding the sender")?;
    let buf = [b'd'; MSG];
    warm_and_time(ops, max, 256, || {
        let n = sock.send_to(&buf, dest).context("sendto")?;
        if n != MSG {
            bail!("sent {n} bytes, expected {MSG}");
        }
        Ok(())
    })
}

fn floor(on_demand: bool, duration: Duration, until_stdin_eof: bool) -> anyhow::Result<()> {
    let probes =
        stormguard::kernel::floor::load(on_demand).context("loading the floor programs")?;
    eprintln!(
        "sgbench: floor ready; attached: {}",
        probes.attached.join(", ")
    );
    let (tx, rx) = mpsc::channel::<()>();
    if until_stdin_eof {
        thread::spawn(move || {
            let mut sink = [0u8; 256];
            let mut stdin = std::io::stdin();
            while matches!(stdin.read(&mut sink), Ok(n) if n > 0) {}
            let _ = tx.send(());
        });
    }
    // Ends on EOF from the stdin thread, or when the duration passes (with
    // no thread, `tx` stays alive here and only the timeout can end it).
    let _ = rx.recv_timeout(duration);
    let hits: serde_json::Map<String, serde_json::Value> = probes
        .hits()
        .context("reading the floor counters")?
        .into_iter()
        .map(|(hook, n)| (hook, n.into()))
        .collect();
    println!("{}", serde_json::json!({ "hits": hits }));
    drop(probes);
    eprintln!("sgbench: floor detached");
    Ok(())
}

//! Workload driver for `cargo xtask bench`.
//!
//! `sgbench run <workload>` times one workload on loopback and prints one
//! JSON line with its ns/op; the bench runs it once per cell (fresh process,
//! so no state carries over between configurations). `sgbench floor` holds
//! the floor programs (one counter increment per hit, on stormguard's hooks)
//! attached until it is told to stop. `sgbench enforce` times what the
//! enforcement programs add to a connect and a send, in four states
//! interleaved in one process, and prints a table.
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
    /// Time the enforcement programs' decisions: a refused loopback
    /// connect, a send on a connected UDP socket and an unconnected UDP
    /// sendto, each with no enforcement programs, then attached with a
    /// budget for another pid only, a budget for this pid with plenty of
    /// tokens, and one exhausted; states interleaved over rounds (order
    /// rotated), all in this process. Prints a table on stdout, progress
    /// on stderr. Attaches at the cgroup v2 root (as root); only this
    /// process is ever throttled, and everything detaches when it exits.
    Enforce {
        #[command(flatten)]
        section: SectionArgs,
    },
    /// Time what taking call stacks adds to a suspect's refused connect and
    /// connected UDP send (this process made a suspect of the real sensors,
    /// stacks off and on, interleaved over rounds; not suspect for
    /// reference), then how long symbolizing takes for a binary seen first
    /// and once cached. Prints a table on stdout.
    Stacks {
        #[command(flatten)]
        section: SectionArgs,
    },
    /// Refused loopback connects at `--rate` per second for `--secs`,
    /// round-robin over `--dests` destinations (127.16.0.0 + i, one
    /// port), paced with absolute deadlines. Prints `{"event":"first",
    /// "pid","mono_ns","real_ns"}` once the first attempt returned and
    /// `{"event":"done","attempts","refused","other_errors","elapsed_ns",
    /// "rate"}` at the end: load for the bench's daemon sections.
    Load {
        #[arg(long)]
        rate: f64,
        #[arg(long)]
        secs: f64,
        #[arg(long, default_value_t = 1)]
        dests: u32,
        /// A port nobody listens on (on any loopback address).
        #[arg(long)]
        port: u16,
    },
}

/// What the in-process sections (`enforce`, `stacks`) take.
#[derive(clap::Args)]
struct SectionArgs {
    /// Pin the process to this CPU.
    #[arg(long)]
    cpu: Option<usize>,
    /// Rounds; each runs every workload under every state once.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=200))]
    rounds: u32,
    /// Multiplies each workload's op count (defaults aim at ~40 ms per
    /// cell without programs).
    #[arg(long, default_value_t = 1.0)]
    ops_scale: f64,
    /// Wall-clock limit per cell in seconds.
    #[arg(long, default_value_t = 1.0)]
    max_secs: f64,
}

impl SectionArgs {
    /// Checks the numbers, pins the process, and checks it runs as root
    /// (the sections load eBPF programs).
    fn prepare(&self, what: &str) -> anyhow::Result<Duration> {
        if !(self.max_secs > 0.0
            && self.max_secs.is_finite()
            && self.ops_scale > 0.0
            && self.ops_scale.is_finite())
        {
            bail!("--max-secs and --ops-scale must be positive numbers");
        }
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            bail!("sgbench {what} loads eBPF programs: run it as root");
        }
        if let Some(cpu) = self.cpu {
            pin(cpu)?;
        }
        Ok(Duration::from_secs_f64(self.max_secs))
    }
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
        Cmd::Enforce { section } => {
            let max = section.prepare("enforce")?;
            print!(
                "{}",
                enforce::run(section.rounds, section.ops_scale, max, section.cpu)?
            );
            Ok(())
        }
        Cmd::Load {
            rate,
            secs,
            dests,
            port,
        } => load::run(rate, secs, dests, port),
        Cmd::Stacks { section } => {
            let max = section.prepare("stacks")?;
            print!(
                "{}",
                stacks::run(section.rounds, section.ops_scale, max, section.cpu)?
            );
            Ok(())
        }
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

/// One 64 B `send()` on a UDP socket connected to a bound sink that never
/// reads: no sendmsg hook runs (the socket is connected), only egress.
fn udp_send_connected(ops: u64, max: Duration) -> anyhow::Result<Sample> {
    let sink = UdpSocket::bind(loopback_any()).context("binding the sink")?;
    let sock = UdpSocket::bind(loopback_any()).context("binding the sender")?;
    sock.connect(sink.local_addr()?)
        .context("connecting the sender")?;
    let buf = [b'c'; MSG];
    warm_and_time(ops, max, 256, || {
        let n = sock.send(&buf).context("send")?;
        if n != MSG {
            bail!("sent {n} bytes, expected {MSG}");
        }
        Ok(())
    })
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

/// `sgbench enforce`: what the enforcement programs add per decision.
mod load;
mod stacks;

mod enforce {
    use std::{collections::BTreeMap, fmt::Write as _, time::Duration};

    use anyhow::Context as _;
    use detector_common::enforce::{
        Budget, BudgetKey, Counters, EnforceConfig, MAX_RATE_PER_S, TOKEN, kind, mode, present,
        scope,
    };
    use stormguard::enforce::kernel::Programs;

    use super::{Sample, refused_connect, udp_send, udp_send_connected};

    /// Slot of this process's budget, and of the other pid's.
    const OURS: u32 = 0;
    const OTHERS: u32 = 1;
    /// A tgid no process has (pid_max is at most 2^22).
    const OTHER_TGID: u64 = u32::MAX as u64 - 1;
    /// The target: ns one decision may add to a connect or a send.
    const TARGET_NS: f64 = 300.0;

    /// What is attached and which budgets exist while a cell runs.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
    enum State {
        None,
        Other,
        Tokens,
        Exhausted,
    }

    const STATES: [State; 4] = [State::None, State::Other, State::Tokens, State::Exhausted];

    impl State {
        fn name(self) -> &'static str {
            match self {
                State::None => "none",
                State::Other => "other",
                State::Tokens => "tokens",
                State::Exhausted => "exhausted",
            }
        }

        fn legend(self) -> &'static str {
            match self {
                State::None => "no enforcement programs attached",
                State::Other => {
                    "attached (connect4/6, sendmsg4/6, egress at the cgroup root); a budget for another pid only: ours are looked up and not found"
                }
                State::Tokens => {
                    "+ a budget for this pid, 10^6/s (the maximum), burst 10^9: every decision takes a token"
                }
                State::Exhausted => {
                    "+ instead a budget for this pid of 1/s, burst 1: connects denied (ECONNREFUSED, before any SYN), sends counted slowed"
                }
            }
        }
    }

    /// A workload and its op count at scale 1: ~40 ms without programs
    /// here (refused connect 4.9 µs, connected send 0.72 µs, sendto
    /// 0.84 µs); `--max-secs` caps slower machines.
    struct Workload {
        name: &'static str,
        ops: u64,
        run: fn(u64, Duration) -> anyhow::Result<Sample>,
        what: &'static str,
    }

    const WORKLOADS: [Workload; 3] = [
        Workload {
            name: "refused-connect",
            ops: 8_000,
            run: refused_connect,
            what: "socket + connect refused by RST + close; connect4 decides, egress sees the SYN",
        },
        Workload {
            name: "udp-send-connected",
            ops: 56_000,
            run: udp_send_connected,
            what: "64 B send() on a connected UDP socket; connect4 noted it, egress decides per datagram",
        },
        Workload {
            name: "udp-sendto",
            ops: 48_000,
            run: udp_send,
            what: "64 B sendto() on an unconnected UDP socket; sendmsg4 notes it, egress decides per datagram",
        },
    ];

    fn key(id: u64) -> BudgetKey {
        BudgetKey {
            id,
            scope: scope::PROCESS,
            _pad: 0,
            dport: 0,
            family: 0,
            _pad2: 0,
            daddr: [0; 16],
        }
    }

    fn monotonic_ns() -> u64 {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime writes only the timespec we own.
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
        ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
    }

    /// The programs and the budgets of the bench.
    struct Bench {
        progs: Programs,
        tgid: u64,
        generation: u32,
        /// Our budget is in the map (removing an absent key is an error).
        ours_present: bool,
    }

    impl Bench {
        /// A rate budget in enforce mode, expiring in an hour; a new
        /// generation each time so the kernel starts its bucket full.
        fn budget(&mut self, slot: u32, per_s: u64, burst: u64) -> Budget {
            self.generation += 1;
            Budget {
                slot,
                errno: libc::ECONNREFUSED as u32,
                rate_milli: per_s * TOKEN as u64,
                burst_milli: burst * TOKEN as u64,
                credit_milli: 0,
                expires_ns: monotonic_ns() + 3_600_000_000_000,
                generation: self.generation,
                kind: kind::RATE,
                mode: mode::ENFORCE,
                _pad: 0,
            }
        }

        fn set(&mut self, state: State) -> anyhow::Result<()> {
            if state == State::None {
                self.progs.detach();
                return Ok(());
            }
            // self_tgid is the one pid never throttled: not ours here (0 is
            // nobody; the kernel skips tgid ≤ 1 anyway).
            self.progs.configure(&EnforceConfig {
                present: present::PROCESS_ANY,
                self_tgid: 0,
                ..Default::default()
            })?;
            let other = self.budget(OTHERS, 100, 100);
            self.progs.put(&key(OTHER_TGID), &other)?;
            let ours = key(self.tgid);
            match state {
                State::None | State::Other => {
                    if self.ours_present {
                        self.progs.remove(&ours)?;
                        self.ours_present = false;
                    }
                }
                State::Tokens => {
                    let b = self.budget(OURS, MAX_RATE_PER_S, 1_000_000_000);
                    self.progs.put(&ours, &b)?;
                    self.ours_present = true;
                }
                State::Exhausted => {
                    let b = self.budget(OURS, 1, 1);
                    self.progs.put(&ours, &b)?;
                    self.ours_present = true;
                }
            }
            self.progs.attach()?;
            Ok(())
        }
    }

    /// One (workload, state) over the rounds.
    #[derive(Default)]
    struct Cell {
        ns_per_op: Vec<f64>,
        /// Every op run, warm-up included, and our budget's decisions.
        all_ops: u64,
        decided: Counters,
    }

    fn add(a: &mut Counters, b: &Counters) {
        a.allowed += b.allowed;
        a.slowed += b.slowed;
        a.denied += b.denied;
        a.expired += b.expired;
    }

    pub fn run(
        rounds: u32,
        ops_scale: f64,
        max: Duration,
        cpu: Option<usize>,
    ) -> anyhow::Result<String> {
        let mounts = std::fs::read_to_string("/proc/mounts").context("reading /proc/mounts")?;
        let root = stormguard::kernel::find_cgroup2(&mounts)
            .context("no cgroup2 filesystem is mounted")?;
        let mut bench = Bench {
            progs: Programs::load(&root).context("loading the enforcement programs")?,
            tgid: u64::from(std::process::id()),
            generation: 0,
            ours_present: false,
        };
        let ops = |w: &Workload| ((w.ops as f64 * ops_scale).round() as u64).max(1);
        let mut cells: BTreeMap<(usize, State), Cell> = BTreeMap::new();
        let started = std::time::Instant::now();
        let (ns, nw) = (STATES.len(), WORKLOADS.len());
        let mut current = None;
        // Workloads outside, states inside: the four states of a workload
        // run back to back (~0.15 s here), so a burst of load from another
        // tenant lands on all of them, and the per-round differences
        // cancel it.
        for round in 0..rounds as usize {
            let mut line = format!("enforce round {}/{rounds}:", round + 1);
            for j in 0..nw {
                let wi = (j + round) % nw;
                let w = &WORKLOADS[wi];
                let _ = write!(line, " {}", w.name);
                for i in 0..ns {
                    let state = STATES[(i + round + j) % ns];
                    if current != Some(state) {
                        bench
                            .set(state)
                            .with_context(|| format!("setting up state {}", state.name()))?;
                        current = Some(state);
                    }
                    bench.progs.reset_counters(OURS)?;
                    let s = (w.run)(ops(w), max)
                        .with_context(|| format!("{} in state {}", w.name, state.name()))?;
                    let decided = bench.progs.counters(OURS)?;
                    let ns_per_op = s.elapsed.as_nanos() as f64 / s.ops as f64;
                    let _ = write!(line, " {}={}", state.name(), fmt_ns(ns_per_op));
                    let cell = cells.entry((wi, state)).or_default();
                    cell.ns_per_op.push(ns_per_op);
                    cell.all_ops += s.ops + s.warmup_ops;
                    add(&mut cell.decided, &decided);
                }
            }
            eprintln!("{line}");
        }
        bench.progs.detach();
        Ok(report(&cells, rounds, cpu, started.elapsed()))
    }

    pub(crate) fn median(v: &[f64]) -> f64 {
        let mut s = v.to_vec();
        s.sort_by(f64::total_cmp);
        let n = s.len();
        if n == 0 {
            f64::NAN
        } else if n % 2 == 1 {
            s[n / 2]
        } else {
            (s[n / 2 - 1] + s[n / 2]) / 2.0
        }
    }

    pub(crate) fn fmt_ns(ns: f64) -> String {
        if ns.abs() < 1000.0 {
            format!("{ns:.1}")
        } else {
            format!("{ns:.0}")
        }
    }

    pub(crate) fn fmt_delta(ns: f64) -> String {
        if ns >= 0.0 {
            format!("+{}", fmt_ns(ns))
        } else {
            fmt_ns(ns)
        }
    }

    /// Our budget's decisions per op ("denied 1.00"; rare ones as counts,
    /// e.g. the burst's one token per cell: "allowed 5 in all"), or "—".
    fn decisions(cell: &Cell) -> String {
        let per = |n: u64| n as f64 / cell.all_ops.max(1) as f64;
        let d = &cell.decided;
        let parts: Vec<String> = [
            ("allowed", d.allowed),
            ("slowed", d.slowed),
            ("denied", d.denied),
            ("expired", d.expired),
        ]
        .iter()
        .filter(|(_, n)| *n > 0)
        .map(|(k, n)| {
            if per(*n) >= 0.005 {
                format!("{k} {:.2}", per(*n))
            } else {
                format!("{k} {n} in all")
            }
        })
        .collect();
        if parts.is_empty() {
            "—".into()
        } else {
            parts.join(", ")
        }
    }

    fn report(
        cells: &BTreeMap<(usize, State), Cell>,
        rounds: u32,
        cpu: Option<usize>,
        elapsed: Duration,
    ) -> String {
        let mut o = String::new();
        let _ = writeln!(
            o,
            "\nEnforcement decisions: ns/op over {rounds} rounds in one process, {}, {:.0} s; each round runs every workload under the four states back to back (order rotated)",
            match cpu {
                Some(c) => format!("pinned to CPU {c}"),
                None => "unpinned".into(),
            },
            elapsed.as_secs_f64(),
        );
        let _ = writeln!(o, "states:");
        for s in STATES {
            let _ = writeln!(o, "  {:<9} {}", s.name(), s.legend());
        }
        let _ = writeln!(o, "workloads:");
        for w in &WORKLOADS {
            let _ = writeln!(o, "  {:<18} {}", w.name, w.what);
        }
        let _ = writeln!(
            o,
            "median and min–max of ns/op over rounds; delta = median over rounds of (state − none, same round), ± twice the median absolute deviation of those differences; decisions = what our budget counted, per op"
        );
        let _ = writeln!(
            o,
            "{:<18} {:<9} {:>8} {:>17} {:>8} {:>7}  decisions",
            "workload", "state", "median", "min–max", "delta", "±"
        );
        let mut verdicts = Vec::new();
        let mut met = true;
        let mut unseen = Vec::new();
        let mut ratios = BTreeMap::new();
        for (wi, w) in WORKLOADS.iter().enumerate() {
            let Some(none) = cells.get(&(wi, State::None)) else {
                continue;
            };
            let mut row_verdicts = Vec::new();
            for (i, s) in STATES.iter().enumerate() {
                let Some(cell) = cells.get(&(wi, *s)) else {
                    continue;
                };
                let (lo, hi) = cell
                    .ns_per_op
                    .iter()
                    .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &x| {
                        (lo.min(x), hi.max(x))
                    });
                // Every state ran once per round, so the samples pair up.
                let diffs: Vec<f64> = cell
                    .ns_per_op
                    .iter()
                    .zip(&none.ns_per_op)
                    .map(|(x, n)| x - n)
                    .collect();
                let delta = median(&diffs);
                let dev: Vec<f64> = diffs.iter().map(|d| (d - delta).abs()).collect();
                let spread = 2.0 * median(&dev);
                let base = *s == State::None;
                let _ = writeln!(
                    o,
                    "{:<18} {:<9} {:>8} {:>17} {:>8} {:>7}  {}",
                    if i == 0 { w.name } else { "" },
                    s.name(),
                    fmt_ns(median(&cell.ns_per_op)),
                    format!("{}–{}", fmt_ns(lo), fmt_ns(hi)),
                    if base { "—".into() } else { fmt_delta(delta) },
                    if base { String::new() } else { fmt_ns(spread) },
                    decisions(cell)
                );
                if matches!(s, State::Tokens | State::Exhausted)
                    && cell.decided.allowed + cell.decided.slowed + cell.decided.denied == 0
                {
                    unseen.push(format!("{} {}", w.name, s.name()));
                }
                if !base {
                    // Slowdown against no programs: a dimensionless
                    // figure `cargo xtask bench --check` can compare
                    // across machines.
                    ratios.insert(
                        format!("enforce.{}.{}÷none", w.name, s.name()),
                        median(&cell.ns_per_op) / median(&none.ns_per_op),
                    );
                    let ok = delta <= TARGET_NS;
                    met &= ok;
                    row_verdicts.push(format!(
                        "{} {}{}",
                        s.name(),
                        fmt_delta(delta),
                        match (ok, delta - spread <= TARGET_NS) {
                            (true, _) => "",
                            (false, true) => " (NOT MET, within ±)",
                            (false, false) => " (NOT MET)",
                        }
                    ));
                }
            }
            verdicts.push(format!("{}: {}", w.name, row_verdicts.join(", ")));
        }
        let _ = writeln!(
            o,
            "Target ≤ {TARGET_NS:.0} ns added per decision (delta; printed, never asserted): {}",
            if met { "MET" } else { "NOT MET" }
        );
        for v in verdicts {
            let _ = writeln!(o, "  {v}");
        }
        let _ = writeln!(
            o,
            "  (refused-connect exhausted: the hook fails the connect before any SYN is sent, so it is cheaper than a connect refused by RST; its delta is that saving, not the decision's cost)"
        );
        if !unseen.is_empty() {
            let _ = writeln!(
                o,
                "WARNING: our budget counted no decisions in {}: the hooks did not see this process's sockets, so those rows do not measure decisions",
                unseen.join(", ")
            );
        }
        // Read (and removed from the table) by `cargo xtask bench`.
        let _ = writeln!(
            o,
            "sgbench-ratios {}",
            serde_json::Value::from(serde_json::Map::from_iter(
                ratios
                    .into_iter()
                    .map(|(k, v)| (k, serde_json::Value::from(v)))
            ))
        );
        o
    }
}

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

    fn print(&self) {
        println!(
            "{{\"ok\":{},\"refused\":{},\"timed_out\":{},\"other\":{}}}",
            self.ok, self.refused, self.timed_out, self.other
        );
    }
}

fn main() -> anyhow::Result<()> {
    let mut tally = Tally::default();
    match Cli::parse().cmd {
        Cmd::Tcp {
            addr,
            count,
            request,
            gap_ms,
        } => {
            for _ in 0..count {
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
        } => {
            let request = request.replace("\\r\\n", "\r\n");
            let mut s = TcpStream::connect(addr)?;
            tally.ok += 1;
            let mut reply = vec![0u8; reply_len];
            let end = Instant::now() + Duration::from_secs_f64(max_secs);
            for i in 0..count {
                if Instant::now() >= end {
                    break;
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
        Cmd::Storm { addr, secs, max } => {
            let end = Instant::now() + Duration::from_secs_f64(secs);
            let mut n = 0;
            while Instant::now() < end && n < max {
                tally.add(&TcpStream::connect(addr));
                n += 1;
            }
        }
    }
    tally.print();
    Ok(())
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

//! The TCP and UDP sockets a process already holds, with their socket
//! cookies: what enforcement keys a per-socket budget on, for sockets
//! that were open before the budget started (the connect hook only sees
//! new ones).
//!
//! Two sources, joined on the socket inode: the `socket:[INODE]` links in
//! /proc/PID/fd (which sockets are the process's), and the kernel's own
//! socket list from NETLINK_SOCK_DIAG (inet_diag), which gives inode,
//! cookie, peer and state for every TCP and UDP socket of the caller's
//! network namespace. The cookie there is the same value as
//! `bpf_get_socket_cookie` and `getsockopt(SO_COOKIE)`.
//!
//! Everything is bounded: one 32 KiB receive buffer, a 2 s read timeout,
//! a deadline per dump and a cap on messages, so a kernel that never says
//! DONE cannot hang the daemon.
use std::{
    collections::HashSet,
    io,
    mem::size_of,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::Path,
    time::{Duration, Instant},
};

/// One TCP or UDP socket of a process, as the kernel lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SockInfo {
    /// The socket cookie: `bpf_get_socket_cookie`, `SO_COOKIE`.
    pub cookie: u64,
    /// The socket inode, as in /proc/PID/fd's `socket:[INODE]`.
    pub inode: u64,
    /// `IPPROTO_TCP` (6) or `IPPROTO_UDP` (17).
    pub proto: u8,
    /// `AF_INET` or `AF_INET6`.
    pub family: u16,
    /// The peer; the unspecified address and port 0 when unconnected
    /// (a listener, an unconnected UDP socket).
    pub dst: SocketAddr,
    /// The kernel's socket state (`TCP_ESTABLISHED` = 1, `TCP_LISTEN` =
    /// 10, `TCP_CLOSE` = 7 for an unconnected UDP socket, ...).
    pub state: u8,
    /// The cgroup v2 id the socket was created in (`INET_DIAG_CGROUP_ID`,
    /// Linux 5.9); 0 when the kernel does not say.
    pub cgroup: u64,
}

/// The TCP and UDP sockets (IPv4 and IPv6) of `pid`. `proc_root` is
/// normally "/proc".
///
/// Only sockets of this process's network namespace are listed: the
/// kernel's socket list (NETLINK_SOCK_DIAG) is per namespace, so the
/// sockets of a process in another network namespace (a container with
/// its own) are silently missing, not an error.
///
/// Errors: a `pid` that does not exist is [`io::ErrorKind::NotFound`];
/// a /proc/PID/fd the caller may not read is `PermissionDenied`; a dump
/// that fails names which one (`TCP/IPv6`, ...). A kernel without UDP
/// diagnostics (no `udp_diag`) answers the UDP dumps with ENOENT: that is
/// logged and the UDP sockets are left out rather than failing the call.
pub fn sockets_of(proc_root: &Path, pid: u32) -> io::Result<Vec<SockInfo>> {
    let inodes = socket_inodes(proc_root, pid)?;
    if inodes.is_empty() {
        return Ok(Vec::new());
    }
    sockets_where(|info| inodes.contains(&info.inode))
}

/// Every TCP and UDP socket (IPv4 and IPv6) of this network namespace
/// that `keep` keeps. For when /proc/PID/fd may not be read (another
/// user's or a more privileged process, without CAP_SYS_PTRACE): callers
/// select by cgroup and peer instead.
pub fn sockets_where(keep: impl Fn(&SockInfo) -> bool) -> io::Result<Vec<SockInfo>> {
    let mut out = Vec::new();
    let mut diag = Diag::open()?;
    for (family, proto) in DUMPS {
        let name = dump_name(family, proto);
        let res = diag.dump(family, proto, |info| {
            if keep(&info) {
                out.push(info);
            }
        });
        match res {
            Ok(()) => {}
            Err(e) if proto == IPPROTO_UDP && e.raw_os_error() == Some(libc::ENOENT) => {
                tracing::warn!(
                    dump = name,
                    "the kernel has no UDP socket diagnostics (udp_diag); \
                     UDP sockets are not listed"
                );
            }
            Err(e) => return Err(context(e, &format!("inet_diag dump of {name} sockets"))),
        }
    }
    Ok(out)
}

/// The socket inodes in `proc_root`/PID/fd.
fn socket_inodes(proc_root: &Path, pid: u32) -> io::Result<HashSet<u64>> {
    let dir = proc_root.join(pid.to_string()).join("fd");
    let entries = std::fs::read_dir(&dir).map_err(|e| context(e, &dir.display().to_string()))?;
    let mut inodes = HashSet::new();
    for entry in entries {
        let entry = entry.map_err(|e| context(e, &dir.display().to_string()))?;
        let target = match std::fs::read_link(entry.path()) {
            Ok(t) => t,
            // Listing may be allowed where reading the links is not (no
            // ptrace access): that must not pass for "no sockets".
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
                return Err(context(e, &dir.display().to_string()));
            }
            // An fd closed since the listing: not an error.
            Err(_) => continue,
        };
        if let Some(inode) = socket_inode(&target) {
            inodes.insert(inode);
        }
    }
    Ok(inodes)
}

/// `socket:[12345]` → 12345.
fn socket_inode(link: &Path) -> Option<u64> {
    link.to_str()?
        .strip_prefix("socket:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

/// Keeps the kind (NotFound stays NotFound), adds what was being done.
fn context(e: io::Error, what: &str) -> io::Error {
    io::Error::new(e.kind(), format!("{what}: {e}"))
}

const IPPROTO_TCP: u8 = libc::IPPROTO_TCP as u8;
const IPPROTO_UDP: u8 = libc::IPPROTO_UDP as u8;
const AF_INET: u8 = libc::AF_INET as u8;
const AF_INET6: u8 = libc::AF_INET6 as u8;

/// The four dumps, in order.
const DUMPS: [(u8, u8); 4] = [
    (AF_INET, IPPROTO_TCP),
    (AF_INET6, IPPROTO_TCP),
    (AF_INET, IPPROTO_UDP),
    (AF_INET6, IPPROTO_UDP),
];

fn dump_name(family: u8, proto: u8) -> &'static str {
    match (family, proto) {
        (AF_INET, IPPROTO_TCP) => "TCP/IPv4",
        (AF_INET6, IPPROTO_TCP) => "TCP/IPv6",
        (AF_INET, IPPROTO_UDP) => "UDP/IPv4",
        (AF_INET6, IPPROTO_UDP) => "UDP/IPv6",
        _ => "inet",
    }
}

/// One receive buffer, reused for every read.
const RECV_BUF: usize = 32 * 1024;
/// Per read: a kernel that stops answering fails the dump after this.
const RECV_TIMEOUT: Duration = Duration::from_secs(2);
/// Per dump, however the kernel trickles its answer.
const DUMP_DEADLINE: Duration = Duration::from_secs(10);
/// Per dump: more sockets than this is a kernel that never says DONE.
const MAX_MESSAGES: usize = 1_000_000;

/// `SOCK_DIAG_BY_FAMILY` from linux/sock_diag.h (libc lacks it).
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLMSG_NOOP: u16 = libc::NLMSG_NOOP as u16;
const NLMSG_ERROR: u16 = libc::NLMSG_ERROR as u16;
const NLMSG_DONE: u16 = libc::NLMSG_DONE as u16;
const NLMSG_HDRLEN: usize = size_of::<libc::nlmsghdr>();

/// `struct inet_diag_sockid` from linux/inet_diag.h.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct InetDiagSockId {
    /// Big endian.
    sport: u16,
    /// Big endian.
    dport: u16,
    /// Big-endian 32-bit words: the address bytes in network order.
    src: [u32; 4],
    dst: [u32; 4],
    /// The bound interface (`sk_bound_dev_if`).
    ifindex: u32,
    /// Host-endian words, low first (the kernel's sock_diag_save_cookie:
    /// `cookie[0] = (u32)res; cookie[1] = (u32)(res >> 32)`).
    cookie: [u32; 2],
}

/// `struct inet_diag_req_v2` from linux/inet_diag.h.
#[repr(C)]
#[derive(Clone, Copy)]
struct InetDiagReqV2 {
    sdiag_family: u8,
    sdiag_protocol: u8,
    idiag_ext: u8,
    pad: u8,
    /// A bit per state (`1 << TCP_ESTABLISHED`, ...).
    idiag_states: u32,
    id: InetDiagSockId,
}

/// `struct inet_diag_msg` from linux/inet_diag.h.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct InetDiagMsg {
    idiag_family: u8,
    idiag_state: u8,
    idiag_timer: u8,
    idiag_retrans: u8,
    id: InetDiagSockId,
    idiag_expires: u32,
    idiag_rqueue: u32,
    idiag_wqueue: u32,
    idiag_uid: u32,
    idiag_inode: u32,
}

/// What is sent: the netlink header, then the request.
#[repr(C)]
#[derive(Clone, Copy)]
struct Request {
    nlh: libc::nlmsghdr,
    req: InetDiagReqV2,
}

// The kernel's sizes: a mismatch here is a wrong definition above.
const _: () = assert!(size_of::<InetDiagSockId>() == 48);
const _: () = assert!(size_of::<InetDiagReqV2>() == 56);
const _: () = assert!(size_of::<InetDiagMsg>() == 72);
const _: () = assert!(size_of::<Request>() == 16 + 56);

/// NLMSG_ALIGN.
fn nlmsg_align(len: usize) -> usize {
    (len + 3) & !3
}

/// A `T` read from the start of `bytes` (which must be long enough).
/// Only for the plain-integer repr(C) types above and `nlmsghdr`: every
/// bit pattern is a valid value.
fn read_pod<T: Copy>(bytes: &[u8]) -> T {
    assert!(bytes.len() >= size_of::<T>());
    // SAFETY: length checked; read_unaligned has no alignment need; the
    // types used are integers and arrays of integers only.
    unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) }
}

/// The bytes of an inet_diag address, in network order.
fn addr_bytes(words: [u32; 4]) -> [u8; 16] {
    let mut out = [0u8; 16];
    for (chunk, w) in out.chunks_exact_mut(4).zip(words) {
        chunk.copy_from_slice(&w.to_ne_bytes());
    }
    out
}

/// One `inet_diag_msg` payload → a socket; None for a family that is
/// neither IPv4 nor IPv6.
fn parse_msg(payload: &[u8], proto: u8) -> io::Result<Option<SockInfo>> {
    if payload.len() < size_of::<InetDiagMsg>() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("short inet_diag_msg ({} bytes)", payload.len()),
        ));
    }
    let msg: InetDiagMsg = read_pod(payload);
    let port = u16::from_be(msg.id.dport);
    let dst = addr_bytes(msg.id.dst);
    let dst = match msg.idiag_family {
        AF_INET => SocketAddr::V4(SocketAddrV4::new(
            Ipv4Addr::new(dst[0], dst[1], dst[2], dst[3]),
            port,
        )),
        AF_INET6 => {
            let ip = Ipv6Addr::from(dst);
            // A link-local peer is only meaningful with its interface.
            let scope = if ip.segments()[0] & 0xffc0 == 0xfe80 {
                msg.id.ifindex
            } else {
                0
            };
            SocketAddr::V6(SocketAddrV6::new(ip, port, 0, scope))
        }
        _ => return Ok(None),
    };
    Ok(Some(SockInfo {
        cookie: u64::from(msg.id.cookie[0]) | (u64::from(msg.id.cookie[1]) << 32),
        inode: u64::from(msg.idiag_inode),
        proto,
        family: u16::from(msg.idiag_family),
        dst,
        state: msg.idiag_state,
        cgroup: cgroup_attr(&payload[size_of::<InetDiagMsg>()..]).unwrap_or(0),
    }))
}

/// `INET_DIAG_CGROUP_ID` from linux/inet_diag.h.
const INET_DIAG_CGROUP_ID: u16 = 21;

/// The cgroup id among the attributes after an `inet_diag_msg`.
fn cgroup_attr(mut attrs: &[u8]) -> Option<u64> {
    // struct rtattr { u16 rta_len; u16 rta_type; }, then the value,
    // each padded to 4 bytes.
    while attrs.len() >= 4 {
        let len = u16::from_ne_bytes([attrs[0], attrs[1]]) as usize;
        let ty = u16::from_ne_bytes([attrs[2], attrs[3]]);
        if len < 4 || len > attrs.len() {
            return None;
        }
        if ty == INET_DIAG_CGROUP_ID && len >= 12 {
            return Some(u64::from_ne_bytes(attrs[4..12].try_into().ok()?));
        }
        attrs = &attrs[nlmsg_align(len).min(attrs.len())..];
    }
    None
}

/// Where a batch of netlink messages left the dump.
#[derive(Debug, PartialEq, Eq)]
enum Batch {
    More,
    Done,
}

/// The netlink messages in one read. `count` is the dump's socket count
/// so far, checked against [`MAX_MESSAGES`]. Messages of another
/// sequence number (a stale answer) are skipped.
fn parse_batch(
    buf: &[u8],
    seq: u32,
    proto: u8,
    count: &mut usize,
    each: &mut impl FnMut(SockInfo),
) -> io::Result<Batch> {
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_string());
    let mut off = 0;
    while off + NLMSG_HDRLEN <= buf.len() {
        let hdr: libc::nlmsghdr = read_pod(&buf[off..]);
        let len = hdr.nlmsg_len as usize;
        if len < NLMSG_HDRLEN || len > buf.len() - off {
            return Err(bad("malformed netlink message length"));
        }
        let payload = &buf[off + NLMSG_HDRLEN..off + len];
        off = (off + nlmsg_align(len)).min(buf.len());
        if hdr.nlmsg_seq != seq {
            continue;
        }
        match hdr.nlmsg_type {
            NLMSG_DONE => {
                // The dump's own result: 0, or a negative errno.
                if payload.len() >= 4 {
                    let err: i32 = read_pod(payload);
                    if err < 0 {
                        return Err(io::Error::from_raw_os_error(-err));
                    }
                }
                return Ok(Batch::Done);
            }
            NLMSG_ERROR => {
                if payload.len() < 4 {
                    return Err(bad("short netlink error message"));
                }
                let err: i32 = read_pod(payload);
                return if err == 0 {
                    Ok(Batch::Done) // an ack
                } else {
                    Err(io::Error::from_raw_os_error(-err))
                };
            }
            SOCK_DIAG_BY_FAMILY => {
                *count += 1;
                if *count > MAX_MESSAGES {
                    return Err(io::Error::other(format!(
                        "more than {MAX_MESSAGES} sockets and no end of dump"
                    )));
                }
                if let Some(info) = parse_msg(payload, proto)? {
                    each(info);
                }
            }
            NLMSG_NOOP => {}
            _ => {}
        }
    }
    Ok(Batch::More)
}

/// A NETLINK_SOCK_DIAG socket and its receive buffer.
struct Diag {
    fd: OwnedFd,
    buf: Vec<u8>,
    seq: u32,
}

impl Diag {
    fn open() -> io::Result<Self> {
        // SAFETY: plain syscall; the result is checked.
        let raw = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_SOCK_DIAG,
            )
        };
        if raw < 0 {
            return Err(context(
                io::Error::last_os_error(),
                "opening a NETLINK_SOCK_DIAG socket",
            ));
        }
        // SAFETY: a fresh fd that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let tv = libc::timeval {
            tv_sec: RECV_TIMEOUT.as_secs() as libc::time_t,
            tv_usec: 0,
        };
        // SAFETY: a valid fd and a timeval of the size given.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&raw const tv).cast(),
                size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            return Err(context(
                io::Error::last_os_error(),
                "setting the netlink read timeout",
            ));
        }
        let seq = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.subsec_nanos() | 1);
        Ok(Self {
            fd,
            buf: vec![0; RECV_BUF],
            seq,
        })
    }

    /// Dumps every socket of one family and protocol, any state.
    fn dump(&mut self, family: u8, proto: u8, mut each: impl FnMut(SockInfo)) -> io::Result<()> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let req = Request {
            nlh: libc::nlmsghdr {
                nlmsg_len: size_of::<Request>() as u32,
                nlmsg_type: SOCK_DIAG_BY_FAMILY,
                nlmsg_flags: (libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16,
                nlmsg_seq: seq,
                nlmsg_pid: 0,
            },
            req: InetDiagReqV2 {
                sdiag_family: family,
                sdiag_protocol: proto,
                idiag_ext: 0,
                pad: 0,
                idiag_states: !0,
                id: InetDiagSockId::default(),
            },
        };
        self.send(&req)?;
        let deadline = Instant::now() + DUMP_DEADLINE;
        let mut count = 0;
        loop {
            if Instant::now() > deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the kernel did not finish the dump in time",
                ));
            }
            let n = self.recv()?;
            if parse_batch(&self.buf[..n], seq, proto, &mut count, &mut each)? == Batch::Done {
                return Ok(());
            }
        }
    }

    fn send(&self, req: &Request) -> io::Result<()> {
        // SAFETY: zeroed sockaddr_nl is valid; the kernel is port 0.
        let mut kernel: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        kernel.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        loop {
            // SAFETY: `req` is a live repr(C) value of the size given,
            // without padding; `kernel` a sockaddr_nl of the size given.
            let n = unsafe {
                libc::sendto(
                    self.fd.as_raw_fd(),
                    (req as *const Request).cast(),
                    size_of::<Request>(),
                    0,
                    (&raw const kernel).cast(),
                    size_of::<libc::sockaddr_nl>() as libc::socklen_t,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(context(e, "sending the request"));
            }
            if n as usize != size_of::<Request>() {
                return Err(io::Error::other("short netlink send"));
            }
            return Ok(());
        }
    }

    /// One datagram from the kernel into `buf`; its length.
    fn recv(&mut self) -> io::Result<usize> {
        loop {
            // SAFETY: zeroed sockaddr_nl is valid.
            let mut from: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
            let mut from_len = size_of::<libc::sockaddr_nl>() as libc::socklen_t;
            // SAFETY: `buf` is writable for its length; `from` for
            // `from_len`. MSG_TRUNC makes a too-long datagram report its
            // real length, so truncation is seen rather than parsed.
            let n = unsafe {
                libc::recvfrom(
                    self.fd.as_raw_fd(),
                    self.buf.as_mut_ptr().cast(),
                    self.buf.len(),
                    libc::MSG_TRUNC,
                    (&raw mut from).cast(),
                    &raw mut from_len,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                return match e.kind() {
                    io::ErrorKind::Interrupted => continue,
                    io::ErrorKind::WouldBlock => Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("no answer from the kernel in {RECV_TIMEOUT:?}"),
                    )),
                    _ => Err(context(e, "reading the answer")),
                };
            }
            let n = n as usize;
            if n > self.buf.len() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("a {n}-byte netlink datagram, more than the {RECV_BUF}-byte buffer"),
                ));
            }
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "an empty netlink datagram",
                ));
            }
            // Only the kernel (port 0) answers; anything else is ignored.
            if from.nl_pid != 0 {
                continue;
            }
            return Ok(n);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{
        net::{TcpListener, TcpStream, UdpSocket},
        os::fd::{AsRawFd, RawFd},
        process::{Command, Stdio},
    };

    use super::*;

    /// getsockopt(SO_COOKIE).
    fn cookie_of(fd: RawFd) -> u64 {
        const SO_COOKIE: libc::c_int = 57;
        let mut cookie = 0u64;
        let mut len = size_of::<u64>() as libc::socklen_t;
        // SAFETY: a live fd; a u64 of the size given.
        let rc = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                SO_COOKIE,
                (&raw mut cookie).cast(),
                &raw mut len,
            )
        };
        assert_eq!(rc, 0, "SO_COOKIE: {}", io::Error::last_os_error());
        cookie
    }

    fn inode_of(fd: RawFd) -> u64 {
        // SAFETY: zeroed stat is valid; a live fd.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        let rc = unsafe { libc::fstat(fd, &raw mut st) };
        assert_eq!(rc, 0);
        st.st_ino
    }

    /// Finds `fd`'s socket in `got` and checks what the kernel says of it.
    fn check(got: &[SockInfo], what: &str, fd: &impl AsRawFd, proto: u8, dst: SocketAddr) {
        let fd = fd.as_raw_fd();
        let inode = inode_of(fd);
        let info = got
            .iter()
            .find(|s| s.inode == inode)
            .unwrap_or_else(|| panic!("{what} (inode {inode}) not listed in {got:#?}"));
        assert_eq!(info.cookie, cookie_of(fd), "{what}: cookie");
        assert_ne!(info.cookie, 0, "{what}: cookie");
        assert_eq!(info.proto, proto, "{what}: proto");
        let family = if dst.is_ipv4() {
            libc::AF_INET
        } else {
            libc::AF_INET6
        };
        assert_eq!(info.family, family as u16, "{what}: family");
        assert_eq!(info.dst, dst, "{what}: dst");
    }

    fn self_socket_inodes() -> HashSet<u64> {
        socket_inodes(Path::new("/proc"), std::process::id()).unwrap()
    }

    #[test]
    fn lists_own_tcp_udp_v4_v6_sockets_with_their_cookies() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let server_addr = listener.local_addr().unwrap();
        let client = TcpStream::connect(server_addr).unwrap();
        let (accepted, client_addr) = listener.accept().unwrap();
        let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
        udp.connect("127.0.0.1:9").unwrap();
        let unconnected = UdpSocket::bind("127.0.0.1:0").unwrap();
        let v6 = TcpListener::bind("[::1]:0").ok().map(|l| {
            let addr = l.local_addr().unwrap();
            let c = TcpStream::connect(addr).unwrap();
            (l, addr, c)
        });

        let got = sockets_of(Path::new("/proc"), std::process::id()).unwrap();
        let unspec4: SocketAddr = "0.0.0.0:0".parse().unwrap();
        check(&got, "TCP client", &client, IPPROTO_TCP, server_addr);
        check(&got, "TCP accepted", &accepted, IPPROTO_TCP, client_addr);
        check(&got, "TCP listener", &listener, IPPROTO_TCP, unspec4);
        check(
            &got,
            "UDP connected",
            &udp,
            IPPROTO_UDP,
            "127.0.0.1:9".parse().unwrap(),
        );
        check(&got, "UDP unconnected", &unconnected, IPPROTO_UDP, unspec4);
        let state = |fd: &dyn AsRawFd| {
            let inode = inode_of(fd.as_raw_fd());
            got.iter().find(|s| s.inode == inode).unwrap().state
        };
        assert_eq!(state(&client), 1, "TCP_ESTABLISHED");
        assert_eq!(state(&listener), 10, "TCP_LISTEN");
        assert_eq!(state(&udp), 1, "connected UDP: TCP_ESTABLISHED");
        assert_eq!(state(&unconnected), 7, "unconnected UDP: TCP_CLOSE");
        match &v6 {
            Some((listener, addr, client)) => {
                check(&got, "TCP/IPv6 client", client, IPPROTO_TCP, *addr);
                check(
                    &got,
                    "TCP/IPv6 listener",
                    listener,
                    IPPROTO_TCP,
                    "[::]:0".parse().unwrap(),
                );
            }
            None => eprintln!("no ::1 here: the IPv6 part is skipped"),
        }
    }

    #[test]
    fn lists_only_the_process_own_sockets() {
        // Every listed inode is a socket in our fd table. Other tests of
        // this binary open and close sockets concurrently, so the check is
        // against the fd table read just before and just after, and
        // retried: a real leak (another process's sockets) is persistent
        // and fails every attempt.
        let _mine = UdpSocket::bind("127.0.0.1:0").unwrap();
        let mut last = None;
        for _ in 0..5 {
            let mut ours = self_socket_inodes();
            let got = sockets_of(Path::new("/proc"), std::process::id()).unwrap();
            ours.extend(self_socket_inodes());
            let strays: Vec<_> = got.iter().filter(|s| !ours.contains(&s.inode)).collect();
            if strays.is_empty() {
                return;
            }
            last = Some(format!("{strays:#?}"));
        }
        panic!("sockets not in /proc/self/fd: {}", last.unwrap());
    }

    #[test]
    fn another_process_socket_is_its_own_not_ours() {
        // A UDP socket handed to a child as its stdin, then closed here:
        // only the child holds it.
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        sock.connect("127.0.0.1:9").unwrap();
        let inode = inode_of(sock.as_raw_fd());
        let cookie = cookie_of(sock.as_raw_fd());
        let mut child = {
            let mut cmd = Command::new("sleep");
            cmd.arg("30")
                .stdin(Stdio::from(OwnedFd::from(sock)))
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            cmd.spawn().expect("spawning sleep")
            // `cmd`, and with it our copy of the socket, dropped here.
        };
        let theirs = sockets_of(Path::new("/proc"), child.id());
        let ours = sockets_of(Path::new("/proc"), std::process::id());
        let _ = child.kill();
        let _ = child.wait();

        let theirs = theirs.unwrap();
        assert_eq!(theirs.len(), 1, "sleep's one socket: {theirs:#?}");
        assert_eq!(theirs[0].inode, inode);
        assert_eq!(theirs[0].cookie, cookie);
        assert_eq!(theirs[0].proto, IPPROTO_UDP);
        assert_eq!(theirs[0].dst, "127.0.0.1:9".parse().unwrap());
        assert!(
            !ours.unwrap().iter().any(|s| s.inode == inode),
            "the child's socket is listed as ours"
        );
    }

    #[test]
    fn a_missing_pid_is_not_found() {
        let e = sockets_of(Path::new("/proc"), u32::MAX).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound, "{e}");
        let e = sockets_of(Path::new("/nonexistent-proc"), 1).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound, "{e}");
    }

    #[test]
    fn sockets_carry_the_cgroup_they_were_made_in() {
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        sock.connect("127.0.0.1:9").unwrap();
        let inode = inode_of(sock.as_raw_fd());
        let mounts = std::fs::read_to_string("/proc/mounts").unwrap();
        let root = crate::kernel::find_cgroup2(&mounts).expect("cgroup2");
        let own = std::fs::read_to_string("/proc/self/cgroup").unwrap();
        let rel = own
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .expect("cgroup v2 line");
        use std::os::unix::fs::MetadataExt as _;
        let id = std::fs::metadata(root.join(rel.trim_start_matches('/')))
            .unwrap()
            .ino();
        let got = sockets_where(|s| s.inode == inode).unwrap();
        assert_eq!(got.len(), 1, "{got:#?}");
        assert_eq!(got[0].cgroup, id, "INET_DIAG_CGROUP_ID");
        assert!(
            cgroup_attr(&[8, 0, 21, 0, 1, 0, 0, 0]).is_none(),
            "short value"
        );
    }

    #[test]
    fn socket_links_parse() {
        assert_eq!(socket_inode(Path::new("socket:[12345]")), Some(12345));
        assert_eq!(socket_inode(Path::new("pipe:[12345]")), None);
        assert_eq!(socket_inode(Path::new("/dev/null")), None);
        assert_eq!(socket_inode(Path::new("socket:[x]")), None);
    }

    /// A netlink message of `ty` with `payload`, padded to 4.
    fn nlmsg(ty: u16, seq: u32, payload: &[u8]) -> Vec<u8> {
        let hdr = libc::nlmsghdr {
            nlmsg_len: (NLMSG_HDRLEN + payload.len()) as u32,
            nlmsg_type: ty,
            nlmsg_flags: libc::NLM_F_MULTI as u16,
            nlmsg_seq: seq,
            nlmsg_pid: 0,
        };
        // SAFETY: nlmsghdr is plain integers, no padding.
        let mut out = unsafe {
            std::slice::from_raw_parts((&raw const hdr).cast::<u8>(), NLMSG_HDRLEN).to_vec()
        };
        out.extend_from_slice(payload);
        out.resize(nlmsg_align(out.len()), 0);
        out
    }

    fn msg_bytes(msg: &InetDiagMsg) -> Vec<u8> {
        // SAFETY: InetDiagMsg is plain integers, no padding (72 bytes).
        unsafe { std::slice::from_raw_parts((msg as *const InetDiagMsg).cast::<u8>(), 72).to_vec() }
    }

    /// Be32 words as inet_diag stores them: the address bytes in order.
    fn words(bytes: [u8; 16]) -> [u32; 4] {
        let mut w = [0u32; 4];
        for (w, c) in w.iter_mut().zip(bytes.chunks_exact(4)) {
            *w = u32::from_ne_bytes(c.try_into().unwrap());
        }
        w
    }

    #[test]
    fn cookie_is_low_word_first_and_addresses_are_network_order() {
        // sock_diag_save_cookie: cookie[0] = (u32)res, cookie[1] = res >> 32.
        let mut v4 = [0u8; 16];
        v4[..4].copy_from_slice(&[10, 1, 2, 3]);
        let msg = InetDiagMsg {
            idiag_family: AF_INET,
            idiag_state: 1,
            id: InetDiagSockId {
                sport: 1234u16.to_be(),
                dport: 8080u16.to_be(),
                dst: words(v4),
                cookie: [0x9abc_def0, 0x1234_5678],
                ..Default::default()
            },
            idiag_inode: 4242,
            ..Default::default()
        };
        let info = parse_msg(&msg_bytes(&msg), IPPROTO_TCP).unwrap().unwrap();
        assert_eq!(info.cookie, 0x1234_5678_9abc_def0);
        assert_eq!(info.inode, 4242);
        assert_eq!(info.dst, "10.1.2.3:8080".parse().unwrap());
        assert_eq!(info.family, libc::AF_INET as u16);
        assert_eq!(info.state, 1);

        let ll: Ipv6Addr = "fe80::1".parse().unwrap();
        let msg = InetDiagMsg {
            idiag_family: AF_INET6,
            id: InetDiagSockId {
                dport: 443u16.to_be(),
                dst: words(ll.octets()),
                ifindex: 3,
                ..Default::default()
            },
            ..Default::default()
        };
        let info = parse_msg(&msg_bytes(&msg), IPPROTO_UDP).unwrap().unwrap();
        assert_eq!(info.dst, SocketAddr::V6(SocketAddrV6::new(ll, 443, 0, 3)));
        assert_eq!(info.proto, IPPROTO_UDP);

        assert!(parse_msg(&[0; 71], IPPROTO_TCP).is_err());
    }

    #[test]
    fn batches_end_fail_and_skip_as_the_kernel_says() {
        let msg = InetDiagMsg {
            idiag_family: AF_INET,
            idiag_inode: 7,
            ..Default::default()
        };
        let body = msg_bytes(&msg);
        let run = |buf: &[u8]| {
            let mut got = Vec::new();
            let mut count = 0;
            let r = parse_batch(buf, 5, IPPROTO_TCP, &mut count, &mut |s| got.push(s.inode));
            (r, got)
        };

        // Two sockets, one of a stale sequence, then more to come.
        let mut buf = nlmsg(SOCK_DIAG_BY_FAMILY, 5, &body);
        buf.extend(nlmsg(SOCK_DIAG_BY_FAMILY, 4, &body));
        buf.extend(nlmsg(SOCK_DIAG_BY_FAMILY, 5, &body));
        let (r, got) = run(&buf);
        assert_eq!(r.unwrap(), Batch::More);
        assert_eq!(got, [7, 7]);

        // DONE with 0, DONE with an errno, an error message.
        let (r, _) = run(&nlmsg(NLMSG_DONE, 5, &0i32.to_ne_bytes()));
        assert_eq!(r.unwrap(), Batch::Done);
        let (r, _) = run(&nlmsg(NLMSG_DONE, 5, &(-libc::ENOENT).to_ne_bytes()));
        assert_eq!(r.unwrap_err().raw_os_error(), Some(libc::ENOENT));
        let (r, _) = run(&nlmsg(NLMSG_ERROR, 5, &(-libc::EINVAL).to_ne_bytes()));
        assert_eq!(r.unwrap_err().raw_os_error(), Some(libc::EINVAL));

        // A length past the end of the read.
        let mut bad = nlmsg(SOCK_DIAG_BY_FAMILY, 5, &body);
        bad[0] = 200;
        assert_eq!(run(&bad).0.unwrap_err().kind(), io::ErrorKind::InvalidData);

        // The cap.
        let mut count = MAX_MESSAGES;
        let r = parse_batch(
            &nlmsg(SOCK_DIAG_BY_FAMILY, 5, &body),
            5,
            IPPROTO_TCP,
            &mut count,
            &mut |_| {},
        );
        assert!(r.is_err());
    }
}

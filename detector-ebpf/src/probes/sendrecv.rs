//! Socket sends and receives from `sock:sock_send_length` and
//! `sock:sock_recv_length`, which fire in the calling task for every socket
//! and cost unrelated syscalls nothing. Kernels before 6.3 lack both; there
//! the same bodies run from fexit programs on tcp/udp/udpv6 sendmsg and
//! recvmsg (distribution kernels have BTF and fexit).
//!
//! - UDP: one record per datagram sent (connected or not; glibc's resolver
//!   connects, then uses send/sendmmsg, which the cgroup sendmsg hooks
//!   miss) and per datagram received on a connected socket.
//! - TCP: for client connections only (they went through SYN_SENT), the
//!   lengths of each request (consecutive sends) and its response
//!   (consecutive receives), one record per exchange. A retried request and
//!   its error reply keep their lengths, even through TLS.
use aya_ebpf::{
    EbpfContext,
    helpers::bpf_probe_read_kernel,
    programs::{FExitContext, TracePointContext},
};
use detector_common::{
    AF_INET, AF_INET6, Event, Fingerprint, HEAD_BYTES, IPPROTO_TCP, IPPROTO_UDP, UdpDest,
    conn_phase, flags, kind, table,
};

use super::tcp::exchange;
use crate::{
    maps::{CONNS, FINGERPRINTS, MSG_DEST, RECV_NOTES, THREAD_SOCK, TLS_FP, UDP_DEST},
    tables::{put, take},
    util::{armed, cgroup, comm, current, emit, field, now, off, sock_id},
};

/// MSG_PEEK: a peek is read again later; count it once, then.
const MSG_PEEK: i32 = 2;
/// DNS: its first two bytes are a transaction id that changes per retry.
const DNS_PORT: u16 = 53;

/// The fingerprint the on-demand probe left for this thread's send, and
/// the head of what it sends; None when the thread was not probed.
#[inline(always)]
fn take_fingerprint(tid: u32) -> Option<&'static Fingerprint> {
    let p = FINGERPRINTS.get_ptr_mut(0)?;
    // SAFETY: this CPU's slot; nothing else runs on this CPU meanwhile.
    let fp = unsafe { &mut *p };
    if fp.tid != tid || tid == 0 {
        return None;
    }
    fp.tid = 0;
    Some(fp)
}

/// The fingerprint to compare requests by: a DNS query's without its
/// transaction id.
#[inline(always)]
fn request_hash(fp: &Fingerprint, dport: u16) -> u64 {
    if dport == DNS_PORT {
        fp.skip2
    } else {
        fp.whole
    }
}

/// The user buffer a probed thread is receiving into, consumed.
#[inline(always)]
fn take_recv_note(tid: u32) -> Option<u64> {
    if !armed() {
        return None;
    }
    take(&RECV_NOTES, table::RECV_NOTES, &tid)
}

/// Reads the first [`HEAD_BYTES`] of a user buffer the kernel just filled.
#[inline(always)]
fn read_head(dst: &mut [u8; HEAD_BYTES], buf: u64) -> bool {
    // SAFETY: a probe read of at most HEAD_BYTES of user memory into a
    // buffer of that size; a failure leaves zeros and returns false.
    unsafe {
        aya_ebpf::helpers::generated::bpf_probe_read_user(
            dst.as_mut_ptr().cast(),
            HEAD_BYTES as u32,
            buf as *const core::ffi::c_void,
        ) == 0
    }
}

pub fn send_length(ctx: &TracePointContext) -> Result<(), i64> {
    let family: u16 = field(ctx, off!(sl_family))?;
    let protocol: u16 = field(ctx, off!(sl_protocol))?;
    let sk: u64 = field(ctx, off!(sl_sk))?;
    let ret: i32 = field(ctx, off!(sl_ret))?;
    sent(sk, family, protocol, ret)
}

/// The fallback for kernels before 6.3 (no `sock:sock_send_length`): an
/// fexit of the protocol's sendmsg, which the tracepoint's caller calls
/// with the same socket and returns the same length.
pub fn sendmsg_exit(ctx: &FExitContext, protocol: u16, v6_hook: bool) -> Result<(), i64> {
    let sk = scalar_arg(ctx, 0)?;
    // tcp_sendmsg/udp_sendmsg/udpv6_sendmsg(sk, msg, len) → int.
    let ret: i64 = ctx.arg(3);
    let family = sk_family(sk)?;
    if skip_family(family, protocol, v6_hook) {
        return Ok(());
    }
    sent(sk, family, protocol, ret as i32)
}

/// A send of `ret` bytes (or an error) on `sk`, from either front end.
#[inline(always)]
fn sent(sk: u64, family: u16, protocol: u16, ret: i32) -> Result<(), i64> {
    if family != AF_INET && family != AF_INET6 {
        return Ok(());
    }
    match protocol {
        IPPROTO_UDP => udp_send(sk, ret, family),
        IPPROTO_TCP if ret > 0 => {
            tcp_send(sk, ret as u32);
            Ok(())
        }
        _ => Ok(()),
    }
}

/// An fexit argument as a plain number. The verifier types a `struct
/// sock *` argument as a kernel pointer and refuses arithmetic on it
/// (socket ids are salted hashes of it); a probe read of the argument slot
/// gives the same value as a scalar.
#[inline(always)]
fn scalar_arg(ctx: &FExitContext, n: usize) -> Result<u64, i64> {
    let slot = (ctx.as_ptr() as *const u64).wrapping_add(n);
    // SAFETY: a checked kernel read of one argument slot of the context.
    unsafe { bpf_probe_read_kernel(slot) }.map_err(i64::from)
}

/// `sk->__sk_common.skc_family`: at offset 16 of `struct sock_common`
/// (after the address pair, hash and port pair) since Linux 2.6.38; read
/// with a checked probe, so a kernel that moved it reads garbage, not a
/// fault.
#[inline(always)]
fn sk_family(sk: u64) -> Result<u16, i64> {
    const SKC_FAMILY: u64 = 16;
    // SAFETY: a checked kernel read of two bytes.
    unsafe { bpf_probe_read_kernel((sk + SKC_FAMILY) as *const u16) }.map_err(i64::from)
}

/// An IPv6 UDP socket sending to an IPv4-mapped peer goes through
/// udpv6_sendmsg and then udp_sendmsg: count it once, in the v6 hook, as
/// the tracepoint does (it reports the socket's family).
#[inline(always)]
fn skip_family(family: u16, protocol: u16, v6_hook: bool) -> bool {
    protocol == IPPROTO_UDP && (family == AF_INET6) != v6_hook
}

fn tcp_send(sk: u64, bytes: u32) {
    let Some(conn) = CONNS.get_ptr_mut(sk) else {
        return;
    };
    let (_, tid) = current();
    // SAFETY: pointer into the map value. Sends and receives of one
    // connection are serialised by the socket lock in practice; a racing
    // update could only misplace a few bytes between two exchanges.
    let conn = unsafe { &mut *conn };
    if conn.phase == conn_phase::RECEIVING {
        // A response came: the previous exchange is complete.
        emit(&exchange(conn, now()));
        conn.req_sent = 0;
        conn.req_recv = 0;
        conn.head_set = 0;
    }
    if conn.req_sent == 0 {
        // A new request; not the connection's first, whose call stack was
        // counted at its connect (the attempt).
        if conn.total_sent != 0 {
            super::stack::count_call(tid, &conn.tmpl, IPPROTO_TCP);
        }
        let syscall = take_fingerprint(tid)
            .map(|fp| request_hash(fp, conn.tmpl.dport))
            .unwrap_or(0);
        // Through libssl: the plaintext's fingerprint, not the ciphertext's.
        let tls = if armed() {
            take(&TLS_FP, table::TLS_FP, &tid)
        } else {
            None
        };
        conn.req_hash = tls.unwrap_or(syscall);
    } else {
        let _ = take_fingerprint(tid);
    }
    conn.phase = conn_phase::SENDING;
    conn.req_sent = conn.req_sent.saturating_add(bytes);
    conn.total_sent = conn.total_sent.saturating_add(bytes);
}

fn udp_send(sk: u64, ret: i32, family: u16) -> Result<(), i64> {
    let (tgid, tid) = current();
    // An unconnected send: the sendmsg hook left this thread a note with
    // the destination. Consume it whether or not the send succeeded.
    // Kept fully initialised (not an Option): the 6.1 verifier refuses a
    // read of the uninitialised payload that LLVM may hoist out of a match.
    let mut dest = UdpDest {
        netns: 0,
        dport: 0,
        family: 0,
        _pad: 0,
        daddr: [0; 16],
    };
    let mut known = false;
    let mut connected = false;
    if let Some(p) = MSG_DEST.get_ptr_mut(0) {
        // SAFETY: this CPU's slot; nothing else runs on this CPU meanwhile.
        let note = unsafe { &mut *p };
        if note.tid == tid && note.sk == sk {
            dest = note.dest;
            known = true;
        }
        note.tid = 0;
    }
    if ret < 0 {
        let _ = take_fingerprint(tid);
        return Ok(());
    }
    // Otherwise a connected socket: the destination its connect() named.
    if !known && let Some(p) = UDP_DEST.get_ptr(sk) {
        // SAFETY: pointer from a successful lookup, copied at once.
        dest = unsafe { *p };
        known = true;
        connected = true;
    }
    let mut ev = Event::zeroed();
    ev.kind = kind::UDP_SEND;
    ev.aux = ret as u32;
    ev.sock = sock_id(sk);
    fill(&mut ev, tgid, family, known.then_some(&dest));
    super::stack::count_call(tid, &ev, IPPROTO_UDP);
    if connected {
        ev.flags |= flags::CONNECTED;
    }
    if let Some(fp) = take_fingerprint(tid) {
        ev.hash = request_hash(fp, ev.dport);
        // A DNS query's name starts after its 12-byte header.
        if ev.dport == DNS_PORT {
            ev.head.copy_from_slice(&fp.head[12..12 + HEAD_BYTES]);
        } else {
            ev.head.copy_from_slice(&fp.head[..HEAD_BYTES]);
        }
        ev.flags |= flags::HEAD;
    }
    emit(&ev);
    Ok(())
}

/// Process and destination of a UDP record. A socket connected before
/// stormguard started has no known destination; it is still counted, as
/// port 0 of the unspecified address.
#[inline(always)]
fn fill(ev: &mut Event, tgid: u32, family: u16, dest: Option<&UdpDest>) {
    ev.ts_ns = now();
    ev.tgid = tgid;
    ev.family = family;
    ev.comm = comm();
    ev.cgroup = cgroup();
    if let Some(d) = dest {
        ev.netns = d.netns;
        ev.dport = d.dport;
        ev.family = d.family;
        ev.daddr = d.daddr;
    }
}

pub fn recv_length(ctx: &TracePointContext) -> Result<(), i64> {
    let family: u16 = field(ctx, off!(rl_family))?;
    let ret: i32 = field(ctx, off!(rl_ret))?;
    let flags: i32 = field(ctx, off!(rl_flags))?;
    let protocol: u16 = field(ctx, off!(rl_protocol))?;
    let sk: u64 = field(ctx, off!(rl_sk))?;
    received(sk, family, protocol, ret, flags)
}

/// The fallback for kernels before 6.3 (no `sock:sock_recv_length`): an
/// fexit of the protocol's recvmsg, `(sk, msg, len, flags, addr_len) →
/// int` since Linux 5.19 (before that a `nonblock` argument came first,
/// and MSG_PEEK is not seen).
pub fn recvmsg_exit(ctx: &FExitContext, protocol: u16, v6_hook: bool) -> Result<(), i64> {
    let sk = scalar_arg(ctx, 0)?;
    let flags: i64 = ctx.arg(3);
    let ret: i64 = ctx.arg(5);
    let family = sk_family(sk)?;
    if skip_family(family, protocol, v6_hook) {
        return Ok(());
    }
    received(sk, family, protocol, ret as i32, flags as i32)
}

/// `ret` bytes received on `sk` (or an error), from either front end.
#[inline(always)]
fn received(sk: u64, family: u16, protocol: u16, ret: i32, flags: i32) -> Result<(), i64> {
    if family != AF_INET && family != AF_INET6 {
        return Ok(());
    }
    if ret <= 0 || flags & MSG_PEEK != 0 {
        return Ok(());
    }
    if protocol == IPPROTO_TCP {
        if let Some(conn) = CONNS.get_ptr_mut(sk) {
            // SAFETY: pointer into the map value; see tcp_send.
            let conn = unsafe { &mut *conn };
            // The response's first chunk: where a status line starts.
            let tid = current().1;
            if let Some(buf) = take_recv_note(tid) {
                // A probed thread: its SSL_read's plaintext belongs here.
                put(&THREAD_SOCK, table::THREAD_SOCK, &tid, &sk);
                if conn.req_recv == 0 && conn.head_set == 0 && read_head(&mut conn.reply_head, buf)
                {
                    conn.head_set = 1;
                }
            }
            conn.phase = conn_phase::RECEIVING;
            conn.req_recv = conn.req_recv.saturating_add(ret as u32);
            conn.total_recv = conn.total_recv.saturating_add(ret as u32);
        }
    } else if protocol == IPPROTO_UDP {
        // Replies are counted only on connected sockets, whose peer is known.
        if let Some(p) = UDP_DEST.get_ptr(sk) {
            // SAFETY: pointer from a successful lookup, copied at once.
            let dest = unsafe { &*p };
            let mut ev = Event::zeroed();
            ev.kind = kind::UDP_RECV;
            ev.aux = ret as u32;
            ev.sock = sock_id(sk);
            let (tgid, tid) = current();
            fill(&mut ev, tgid, family, Some(dest));
            if let Some(buf) = take_recv_note(tid)
                && read_head(&mut ev.head, buf)
            {
                ev.flags |= flags::HEAD;
            }
            emit(&ev);
        }
    }
    Ok(())
}

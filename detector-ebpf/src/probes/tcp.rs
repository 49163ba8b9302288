//! TCP connect attempts and their outcomes from `sock:` and `tcp:`
//! tracepoints, which cost unrelated syscalls nothing.
//!
//! Join rules (platform.md): a socket address means one socket only from its
//! CLOSE→SYN_SENT until its CLOSE; only sockets that went through SYN_SENT
//! are counted (on loopback the server side's transitions run in the
//! client's task); after SYN_SENT the outcome may run in softirq, so the
//! process is the one recorded at SYN_SENT, never the current one.
use aya_ebpf::programs::TracePointContext;
use detector_common::{
    AF_INET, AF_INET6, Conn, Event, FIELD_ABSENT, HEAD_BYTES, IPPROTO_TCP, IPPROTO_UDP, TupleKey,
    conn_phase, flags, kind, outcome, table, tcp_state,
};

use crate::{
    maps::{CLOSED, CONNS, INFLIGHT, PRE_SYN},
    tables::{del, odd_syn_sent, put, take, take_into},
    util::{cgroup, comm, current, emit, field, now, off, sock_id},
};

/// Destination address of a `sock:` record, in the shared 16-byte layout.
#[inline(always)]
fn daddr(ctx: &TracePointContext, family: u16, v4: usize, v6: usize) -> Result<[u8; 16], i64> {
    let mut out = [0u8; 16];
    if family == AF_INET {
        let a: [u8; 4] = field(ctx, v4)?;
        out[..4].copy_from_slice(&a);
    } else {
        out = field(ctx, v6)?;
    }
    Ok(out)
}

pub fn set_state(ctx: &TracePointContext) -> Result<(), i64> {
    let protocol: u16 = field(ctx, off!(ss_protocol))?;
    if protocol != IPPROTO_TCP {
        return Ok(());
    }
    let old: i32 = field(ctx, off!(ss_oldstate))?;
    let new: i32 = field(ctx, off!(ss_newstate))?;
    let sk: u64 = field(ctx, off!(ss_skaddr))?;
    if old == tcp_state::CLOSE && new == tcp_state::SYN_SENT {
        return attempt_started(ctx, sk);
    }
    if old != tcp_state::SYN_SENT {
        // A client connection ends when it is finally closed, not when it
        // leaves ESTABLISHED: a server that answers and closes at once
        // (HTTP/1.0, `ab`) has its FIN arrive with the response, before the
        // client has read it in CLOSE_WAIT.
        if new == tcp_state::CLOSE {
            connection_ended(sk);
        }
        return Ok(());
    }
    let mut ev = Event::zeroed();
    if !take_into(&INFLIGHT, table::INFLIGHT, &sk, &mut ev) {
        return Ok(());
    }
    ev.ts_ns = now();
    if new == tcp_state::ESTABLISHED {
        ev.outcome = outcome::ESTABLISHED;
        emit(&ev);
        connection_established(sk, &ev);
        return Ok(());
    }
    // Closed: the errno arrives next in inet_sk_error_report, which only
    // carries the tuple. Anything else (a simultaneous open's SYN_RECV) is
    // treated as a close, and heard.
    if new != tcp_state::CLOSE {
        odd_syn_sent();
    }
    ev.outcome = outcome::CLOSED;
    let key = TupleKey {
        family: ev.family,
        sport: field(ctx, off!(ss_sport))?,
        dport: ev.dport,
        _pad: 0,
        daddr: ev.daddr,
    };
    if !put(&CLOSED, table::CLOSED, &key, &ev) {
        emit(&ev);
    }
    Ok(())
}

/// Starts request/response bookkeeping for a client connection. Never
/// inlined, like [`connection_ended`]: each holds a 232-byte connection
/// record, and inlined into `set_state` beside its attempt record they
/// pass the 512-byte stack that the 6.1 verifier counts across calls.
#[inline(never)]
fn connection_established(sk: u64, attempt: &Event) {
    let mut tmpl = *attempt;
    tmpl.start_ns = attempt.ts_ns;
    tmpl.sock = sock_id(sk);
    let conn = Conn {
        tmpl,
        req_hash: 0,
        req_sent: 0,
        req_recv: 0,
        total_sent: 0,
        total_recv: 0,
        phase: conn_phase::IDLE,
        head_set: 0,
        reply_head: [0; HEAD_BYTES],
    };
    put(&CONNS, table::CONNS, &sk, &conn);
}

/// → CLOSE after ESTABLISHED: the connection has ended. Reports the request
/// still open (a response may never have come) and the connection's life.
#[inline(never)]
fn connection_ended(sk: u64) {
    let Some(p) = CONNS.get_ptr(sk) else {
        return;
    };
    // SAFETY: pointer from a successful lookup. Read in place rather than
    // copied out (a copy of the 232-byte record would pass the stack
    // limit): the entry is deleted only below, and only this socket's
    // one transition to CLOSE gets here, so nothing else deletes it.
    let conn = unsafe { &*p };
    let ts = now();
    // One record on the stack, reused for both.
    let mut ev = exchange(conn, ts);
    if conn.req_sent > 0 {
        emit(&ev);
    }
    ev = conn.tmpl;
    ev.kind = kind::TCP_CONN_END;
    ev.ts_ns = ts;
    ev.aux = conn.total_sent;
    ev.aux2 = conn.total_recv;
    ev.outcome = 0;
    // Reported only by the side that deletes it, as everywhere.
    if del(&CONNS, table::CONNS, &sk) {
        emit(&ev);
    }
}

/// The record of the connection's current request/response.
#[inline(always)]
pub fn exchange(conn: &Conn, ts: u64) -> Event {
    let mut ev = conn.tmpl;
    ev.kind = kind::TCP_EXCHANGE;
    ev.ts_ns = ts;
    ev.aux = conn.req_sent;
    ev.aux2 = conn.req_recv;
    ev.hash = conn.req_hash;
    ev.outcome = 0;
    if conn.total_sent == conn.req_sent {
        ev.flags |= flags::FIRST_EXCHANGE;
    }
    if conn.head_set != 0 {
        ev.head = conn.reply_head;
        ev.flags |= flags::HEAD;
    }
    ev
}

/// CLOSE→SYN_SENT runs in the connecting task: one connect() of one socket.
fn attempt_started(ctx: &TracePointContext, sk: u64) -> Result<(), i64> {
    let family: u16 = field(ctx, off!(ss_family))?;
    if family != AF_INET && family != AF_INET6 {
        return Ok(());
    }
    let (tgid, tid) = current();
    let mut ev = Event::zeroed();
    // The connect hook's note carries the network namespace and when the
    // connect() began; consuming it marks this connect as past the SYN.
    if let Some(note) = take(&PRE_SYN, table::PRE_SYN, &tid) {
        ev.netns = note.netns;
        ev.start_ns = note.start_ns;
    } else {
        ev.start_ns = now();
    }
    ev.kind = kind::TCP_OUTCOME;
    ev.tgid = tgid;
    ev.family = family;
    ev.dport = field(ctx, off!(ss_dport))?;
    ev.daddr = daddr(ctx, family, off!(ss_daddr), off!(ss_daddr_v6))?;
    ev.comm = comm();
    ev.cgroup = cgroup();
    put(&INFLIGHT, table::INFLIGHT, &sk, &ev);
    Ok(())
}

/// Joins the errno to the attempt that closed just before, by tuple.
pub fn error_report(ctx: &TracePointContext) -> Result<(), i64> {
    let protocol: u16 = field(ctx, off!(er_protocol))?;
    let error: i32 = field(ctx, off!(er_error))?;
    // Each failure is reported twice, the second time with error=0.
    if error == 0 {
        return Ok(());
    }
    let family: u16 = field(ctx, off!(er_family))?;
    if protocol == IPPROTO_UDP {
        return udp_error(ctx, family, error);
    }
    if protocol != IPPROTO_TCP {
        return Ok(());
    }
    let key = TupleKey {
        family,
        sport: field(ctx, off!(er_sport))?,
        dport: field(ctx, off!(er_dport))?,
        _pad: 0,
        daddr: daddr(ctx, family, off!(er_daddr), off!(er_daddr_v6))?,
    };
    // Only the side that removes the entry reports it (user space sweeps
    // the same map for entries that never get an error).
    if let Some(mut ev) = take(&CLOSED, table::CLOSED, &key) {
        ev.errno = error.abs();
        ev.outcome = outcome::FAILED;
        emit(&ev);
    }
    Ok(())
}

/// An ICMP error on a UDP socket (port unreachable → ECONNREFUSED…): the
/// datagram's sender learns it only from the socket. The report carries the
/// tuple but no socket, so it is attributed to the task it fires in — the
/// sender's own on loopback, where the ICMP is made while the send is
/// still being processed.
fn udp_error(ctx: &TracePointContext, family: u16, error: i32) -> Result<(), i64> {
    if family != AF_INET && family != AF_INET6 {
        return Ok(());
    }
    let mut ev = Event::zeroed();
    ev.kind = kind::UDP_ERROR;
    ev.ts_ns = now();
    ev.tgid = current().0;
    ev.family = family;
    ev.dport = field(ctx, off!(er_dport))?;
    ev.daddr = daddr(ctx, family, off!(er_daddr), off!(er_daddr_v6))?;
    ev.errno = error.abs();
    ev.comm = comm();
    ev.cgroup = cgroup();
    emit(&ev);
    Ok(())
}

pub fn receive_reset(ctx: &TracePointContext) -> Result<(), i64> {
    let sk: u64 = field(ctx, off!(rr_skaddr))?;
    if let Some(p) = INFLIGHT.get_ptr_mut(sk) {
        // SAFETY: pointer into the map value; a racing update only loses a flag.
        unsafe { (*p).flags |= flags::RST };
    }
    Ok(())
}

pub fn retransmit(ctx: &TracePointContext) -> Result<(), i64> {
    let state: i32 = field(ctx, off!(rt_state))?;
    if state != tcp_state::SYN_SENT {
        return Ok(());
    }
    let err_off = off!(rt_err);
    if err_off != FIELD_ABSENT as usize {
        // A retransmit that did not go out (e.g. still queued) is retried.
        let err: i32 = field(ctx, err_off)?;
        if err != 0 {
            return Ok(());
        }
    }
    let sk: u64 = field(ctx, off!(rt_skaddr))?;
    if let Some(p) = INFLIGHT.get_ptr_mut(sk) {
        // SAFETY: pointer into the map value; counts SYN retransmits.
        unsafe { (*p).aux += 1 };
    }
    Ok(())
}

//! cgroup `connect4/6` and `sendmsg4/6`: see the destination of every
//! connect() and unconnected UDP send before the kernel acts on it. Observe
//! only: the entry points always allow.
use core::ptr::read_volatile;

use aya_ebpf::{
    EbpfContext as _, bindings::bpf_sock_addr, helpers::generated::bpf_get_netns_cookie,
    programs::SockAddrContext,
};
use detector_common::{Event, IPPROTO_TCP, IPPROTO_UDP, MsgDest, UdpDest, kind, table};

use crate::{
    maps::{MSG_DEST, PRE_SYN, UDP_DEST},
    tables::{put, take_into},
    util::{cgroup, comm, current, emit, now},
};

/// The destination the caller asked for, in the shared layout.
#[inline(always)]
fn destination(ctx: &SockAddrContext, sa: &bpf_sock_addr, family: u16) -> UdpDest {
    let (daddr, dport) = crate::sockaddr::user_dest(sa, family);
    UdpDest {
        // SAFETY: the helper takes the program context, which ctx is.
        netns: unsafe { bpf_get_netns_cookie(ctx.as_ptr()) },
        dport,
        family,
        _pad: 0,
        daddr,
    }
}

/// The kernel address of the socket, the key the tracepoints see as `sk`.
#[inline(always)]
fn socket_address(sa: &bpf_sock_addr) -> u64 {
    // SAFETY: `sk` is the active member of this union in sock_addr programs.
    unsafe { read_volatile(&sa.__bindgen_anon_1.sk) as u64 }
}

pub fn connect(ctx: &SockAddrContext, family: u16) -> Result<(), i64> {
    // SAFETY: the kernel passes a valid bpf_sock_addr for this program type.
    let sa = unsafe { &*ctx.sock_addr };
    // SAFETY: a plain load of a context field.
    let proto = unsafe { read_volatile(&sa.protocol) } as u16;
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
        return Ok(());
    }
    let (tgid, tid) = current();
    let ts = now();
    let mut ev = Event::zeroed();
    // If this thread's previous TCP connect left a note, that connect
    // never reached SYN_SENT: it failed before the SYN. Read into `ev`
    // itself: two records on the stack would pass the 512-byte limit.
    if proto == IPPROTO_TCP && take_into(&PRE_SYN, table::PRE_SYN, &tid, &mut ev) {
        ev.ts_ns = ts;
        emit(&ev);
        ev = Event::zeroed();
    }
    let dest = destination(ctx, sa, family);
    ev.ts_ns = ts;
    ev.start_ns = ts;
    ev.netns = dest.netns;
    ev.tgid = tgid;
    ev.dport = dest.dport;
    ev.family = family;
    ev.daddr = dest.daddr;
    ev.comm = comm();
    ev.cgroup = cgroup();
    super::stack::count_call(tid, &ev, proto);
    if proto == IPPROTO_TCP {
        // A note for SYN_SENT.
        ev.kind = kind::TCP_PRE_SYN_FAIL;
        put(&PRE_SYN, table::PRE_SYN, &tid, &ev);
    } else {
        ev.kind = kind::UDP_CONNECT;
        emit(&ev);
        put(&UDP_DEST, table::UDP_DEST, &socket_address(sa), &dest);
    }
    Ok(())
}

pub fn sendmsg(ctx: &SockAddrContext, family: u16) -> Result<(), i64> {
    // SAFETY: the kernel passes a valid bpf_sock_addr for this program type.
    let sa = unsafe { &*ctx.sock_addr };
    // SAFETY: a plain load of a context field.
    if unsafe { read_volatile(&sa.protocol) } as u16 != IPPROTO_UDP {
        return Ok(());
    }
    let (_, tid) = current();
    let slot = MSG_DEST.get_ptr_mut(0).ok_or(-1i64)?;
    // SAFETY: this CPU's slot; nothing else runs on this CPU meanwhile.
    unsafe {
        *slot = MsgDest {
            sk: socket_address(sa),
            tid,
            _pad: 0,
            dest: destination(ctx, sa, family),
        }
    };
    Ok(())
}

//! `cgroup/sock_release`: per-socket state dies with its socket. The maps
//! are keyed by the socket's kernel address, which the kernel hands to the
//! next socket soon after this one is freed; without this hook a new UDP
//! socket at a reused address would be taken for a connected socket to the
//! old one's destination.
//!
//! TCP state needs no help here: `INFLIGHT` and `CONNS` entries end at the
//! socket's transition to CLOSE, which always comes before its memory is
//! freed (and after this hook, which runs before the protocol's close —
//! deleting them here would lose the connection's last exchange).
use core::ptr::read_volatile;

use aya_ebpf::programs::SockContext;
use detector_common::{IPPROTO_TCP, IPPROTO_UDP, table};

use crate::{
    maps::{THREAD_SOCK, UDP_DEST},
    tables::del,
    util::{armed, current},
};

pub fn release(ctx: &SockContext) {
    // The context is the `struct sock *` itself: the same address the
    // connect hook reads from `bpf_sock_addr.sk` and the tracepoints see
    // as `skaddr`. Using it as a number is a pointer leak the verifier
    // allows only with CAP_PERFMON (which the sensors require).
    let sk = ctx.sock as u64;
    // SAFETY: a plain load of a context field the verifier allows.
    let protocol = unsafe { read_volatile(&(*ctx.sock).protocol) } as u16;
    if protocol == IPPROTO_UDP {
        del(&UDP_DEST, table::UDP_DEST, &sk);
    } else if protocol == IPPROTO_TCP && armed() {
        // The thread closing a TLS connection is usually the one that
        // read it last: forget its socket, so a later `SSL_read` cannot
        // write into another connection at this address.
        let tid = current().1;
        // SAFETY: pointer from a successful lookup, read at once.
        if THREAD_SOCK
            .get_ptr(tid)
            .is_some_and(|p| unsafe { *p } == sk)
        {
            del(&THREAD_SOCK, table::THREAD_SOCK, &tid);
        }
    }
}

//! UDP sends per destination from `sock:sock_send_length`, which fires for
//! connected and unconnected sockets in the sending task (glibc's resolver
//! connects, then uses send/sendmmsg, which the cgroup sendmsg hooks miss).
use aya_ebpf::programs::TracePointContext;
use detector_common::{AF_INET, AF_INET6, Event, IPPROTO_UDP, kind};

use crate::{
    maps::{MSG_DEST, UDP_DEST},
    util::{comm, current, emit, field, now, off},
};

pub fn send_length(ctx: &TracePointContext) -> Result<(), i64> {
    let family: u16 = field(ctx, off!(sl_family))?;
    if family != AF_INET && family != AF_INET6 {
        return Ok(());
    }
    let protocol: u16 = field(ctx, off!(sl_protocol))?;
    if protocol != IPPROTO_UDP {
        return Ok(());
    }
    let sk: u64 = field(ctx, off!(sl_sk))?;
    let ret: i32 = field(ctx, off!(sl_ret))?;
    let (tgid, tid) = current();
    // An unconnected send: the sendmsg hook left this thread a note with
    // the destination. Consume it whether or not the send succeeded.
    let mut dest = None;
    if let Some(p) = MSG_DEST.get_ptr(tid) {
        // SAFETY: pointer from a successful lookup, copied at once.
        let note = unsafe { *p };
        let _ = MSG_DEST.remove(tid);
        if note.sk == sk {
            dest = Some(note.dest);
        }
    }
    if ret < 0 {
        return Ok(());
    }
    // Otherwise a connected socket: the destination its connect() named.
    // SAFETY: pointer from a successful lookup, copied at once.
    let dest = dest.or_else(|| UDP_DEST.get_ptr(sk).map(|p| unsafe { *p }));
    let mut ev = Event::zeroed();
    ev.kind = kind::UDP_SEND;
    ev.ts_ns = now();
    ev.tgid = tgid;
    ev.aux = ret as u32;
    ev.family = family;
    ev.comm = comm();
    // A socket connected before stormguard started has no known
    // destination; it is still counted, as port 0 of the unspecified address.
    if let Some(d) = dest {
        ev.netns = d.netns;
        ev.dport = d.dport;
        ev.family = d.family;
        ev.daddr = d.daddr;
    }
    emit(&ev);
    Ok(())
}

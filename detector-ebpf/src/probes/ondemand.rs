//! Probes attached only while some process is suspect: syscall tracepoints
//! put every syscall on the host on the slow path, so they must not be
//! always on (platform.md: +64 ns on every getpid).
use aya_ebpf::{
    helpers::generated::bpf_probe_read_user,
    programs::{RawTracePointContext, TracePointContext},
};
use detector_common::{FINGERPRINT_BYTES, FINGERPRINT_HEAD, Fingerprint, stat, table};

use crate::{
    maps::{FINGERPRINTS, PRE_SYN, RECV_NOTES, SYSCALLS},
    tables::{NEG_EEXIST, NOEXIST, insert_failed, put, take},
    util::{count, current, emit, field, is_suspect, now, off},
};

/// `raw_syscalls:sys_enter`: counts syscalls of suspect processes,
/// fingerprints what they send and notes where they receive, so the socket
/// tracepoints can read the request's head and the reply's first bytes.
pub fn sys_enter(ctx: &RawTracePointContext) -> Result<(), i64> {
    let (tgid, tid) = current();
    if !is_suspect(tgid) {
        return Ok(());
    }
    count_syscall(tgid);
    if super::stack::is_call(ctx.arg(1)) && crate::util::stacks_on() {
        super::stack::take(ctx, tgid, tid);
    }
    let slot = FINGERPRINTS.get_ptr_mut(0).ok_or(-1i64)?;
    // SAFETY: this CPU's slot; nothing else runs on this CPU meanwhile.
    let slot = unsafe { &mut *slot };
    match user_buffer(ctx) {
        Some(Buffer::Send(buf, len)) => fingerprint(slot, buf, len, tid),
        Some(Buffer::Recv(buf)) => {
            put(&RECV_NOTES, table::RECV_NOTES, &tid, &(buf as u64));
            if slot.tid == tid {
                slot.tid = 0;
            }
        }
        // Not a send: a fingerprint left by an earlier syscall (a write to
        // a file, say) must not be taken for the next socket send.
        None if slot.tid == tid => slot.tid = 0,
        None => {}
    }
    Ok(())
}

/// One more syscall of `tgid`, on this CPU's counter. A new key is counted
/// as an insert (a per-CPU LRU map is not an [`aya_ebpf::maps::LruHashMap`],
/// so [`put`] does not apply).
#[inline(always)]
fn count_syscall(tgid: u32) {
    for _ in 0..2 {
        if let Some(p) = SYSCALLS.get_ptr_mut(tgid) {
            // SAFETY: per-CPU value, only this CPU writes it while we run.
            unsafe { *p += 1 };
            return;
        }
        match SYSCALLS.insert(tgid, 1, NOEXIST) {
            Ok(()) => {
                count(stat::inserts(table::SYSCALLS));
                return;
            }
            // Another CPU made the key meanwhile: count on it.
            Err(e) if e == NEG_EEXIST => {}
            Err(e) => {
                insert_failed(table::SYSCALLS, e);
                return;
            }
        }
    }
}

/// The user buffer a syscall sends from or receives into.
#[cfg_attr(not(bpf_target_arch = "x86_64"), allow(dead_code))]
enum Buffer {
    Send(*const u8, usize),
    Recv(*const u8),
}

/// The first iovec of a `struct user_msghdr` (msg_iov at 16; iovec: base,
/// len).
///
/// # Safety
/// Probe reads of user memory only; failures return None.
#[cfg(bpf_target_arch = "x86_64")]
unsafe fn first_iov_of_msghdr(msg: *const u8) -> Option<(*const u8, usize)> {
    // SAFETY: see the function's contract.
    unsafe {
        let iov: u64 = aya_ebpf::helpers::bpf_probe_read_user(msg.add(16).cast()).ok()?;
        first_iov(iov as *const u64)
    }
}

/// Base and length of the first `struct iovec` at `iov`.
///
/// # Safety
/// Probe reads of user memory only; failures return None.
#[cfg(bpf_target_arch = "x86_64")]
unsafe fn first_iov(iov: *const u64) -> Option<(*const u8, usize)> {
    // SAFETY: see the function's contract.
    unsafe {
        let base: u64 = aya_ebpf::helpers::bpf_probe_read_user(iov).ok()?;
        let len: u64 = aya_ebpf::helpers::bpf_probe_read_user(iov.add(1)).ok()?;
        Some((base as *const u8, len as usize))
    }
}

/// The user buffer of every send and receive path real runtimes use:
/// write/writev/sendto (send)/sendmsg/sendmmsg and
/// read/readv/recvfrom (recv)/recvmsg/recvmmsg — the first buffer of
/// vectored and batched calls. Syscall numbers and registers are x86_64's;
/// other architectures get no fingerprints (the rest works everywhere).
#[cfg(bpf_target_arch = "x86_64")]
fn user_buffer(ctx: &RawTracePointContext) -> Option<Buffer> {
    use aya_ebpf::{bindings::pt_regs, helpers::bpf_probe_read_kernel};
    const READ: u64 = 0;
    const WRITE: u64 = 1;
    const READV: u64 = 19;
    const WRITEV: u64 = 20;
    const SENDTO: u64 = 44;
    const RECVFROM: u64 = 45;
    const SENDMSG: u64 = 46;
    const RECVMSG: u64 = 47;
    const RECVMMSG: u64 = 299;
    const SENDMMSG: u64 = 307;
    let regs: *const pt_regs = ctx.arg(0);
    let id: u64 = ctx.arg(1);
    // SAFETY: probe reads of the syscall's saved registers; a bad pointer
    // yields an error, not a fault.
    let (a1, a2) = unsafe {
        (
            bpf_probe_read_kernel(&(*regs).rsi).ok()?,
            bpf_probe_read_kernel(&(*regs).rdx).ok()?,
        )
    };
    // SAFETY (all arms): probe reads of user memory; failures give None.
    match id {
        WRITE | SENDTO => Some(Buffer::Send(a1 as *const u8, a2 as usize)),
        READ | RECVFROM => Some(Buffer::Recv(a1 as *const u8)),
        WRITEV => unsafe { first_iov(a1 as *const u64) }.map(|(b, l)| Buffer::Send(b, l)),
        READV => unsafe { first_iov(a1 as *const u64) }.map(|(b, _)| Buffer::Recv(b)),
        // struct mmsghdr starts with its struct user_msghdr.
        SENDMSG | SENDMMSG => {
            unsafe { first_iov_of_msghdr(a1 as *const u8) }.map(|(b, l)| Buffer::Send(b, l))
        }
        RECVMSG | RECVMMSG => {
            unsafe { first_iov_of_msghdr(a1 as *const u8) }.map(|(b, _)| Buffer::Recv(b))
        }
        _ => None,
    }
}

#[cfg(not(bpf_target_arch = "x86_64"))]
fn user_buffer(_ctx: &RawTracePointContext) -> Option<Buffer> {
    None
}

/// FNV-1a over the first bytes of the send, whole and from byte 2 on, and
/// its first [`FINGERPRINT_HEAD`] bytes, into this CPU's slot.
fn fingerprint(slot: &mut Fingerprint, buf: *const u8, len: usize, tid: u32) {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0100_0000_01b3;
    let mut bytes = [0u8; FINGERPRINT_BYTES];
    let n = if len > FINGERPRINT_BYTES {
        FINGERPRINT_BYTES
    } else {
        len
    };
    // SAFETY: reads at most n ≤ 64 bytes of user memory into our buffer;
    // on failure the buffer stays zeroed and the length still counts.
    if n > 0 {
        unsafe { bpf_probe_read_user(bytes.as_mut_ptr().cast(), n as u32, buf.cast()) };
    }
    let mut whole = OFFSET ^ len as u64;
    let mut skip2 = OFFSET ^ len as u64;
    for (i, b) in bytes.iter().enumerate() {
        if i >= n {
            break;
        }
        whole = (whole ^ *b as u64).wrapping_mul(PRIME);
        if i >= 2 {
            skip2 = (skip2 ^ *b as u64).wrapping_mul(PRIME);
        }
    }
    // 0 means "no fingerprint" to user space.
    slot.whole = whole | 1;
    slot.skip2 = skip2 | 1;
    slot.tid = tid;
    slot.head.copy_from_slice(&bytes[..FINGERPRINT_HEAD]);
}

/// `syscalls:sys_exit_connect`: the errno of a connect that never reached
/// SYN_SENT, which no always-on sensor can see.
pub fn exit_connect(ctx: &TracePointContext) -> Result<(), i64> {
    let ret: i64 = field(ctx, off!(xc_ret))?;
    if ret >= 0 {
        return Ok(());
    }
    let (_, tid) = current();
    if let Some(mut ev) = take(&PRE_SYN, table::PRE_SYN, &tid) {
        ev.ts_ns = now();
        ev.errno = (-ret) as i32;
        emit(&ev);
    }
    Ok(())
}

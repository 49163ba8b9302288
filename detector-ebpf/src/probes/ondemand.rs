//! Probes attached only while some process is suspect: syscall tracepoints
//! put every syscall on the host on the slow path, so they must not be
//! always on (platform.md: +64 ns on every getpid).
use aya_ebpf::{
    helpers::generated::bpf_probe_read_user,
    programs::{RawTracePointContext, TracePointContext},
};
use detector_common::{FINGERPRINT_BYTES, Fingerprint};

use crate::{
    maps::{FINGERPRINTS, PRE_SYN, SUSPECTS, SYSCALLS},
    util::{current, emit, field, now, off},
};

/// `raw_syscalls:sys_enter`: counts syscalls of suspect processes, and
/// fingerprints what they send.
pub fn sys_enter(ctx: &RawTracePointContext) -> Result<(), i64> {
    let (tgid, tid) = current();
    // SAFETY: the value is only tested for presence.
    if unsafe { SUSPECTS.get(tgid) }.is_none() {
        return Ok(());
    }
    match SYSCALLS.get_ptr_mut(tgid) {
        // SAFETY: per-CPU value, only this CPU writes it while we run.
        Some(p) => unsafe { *p += 1 },
        None => SYSCALLS.insert(tgid, 1, 0).map_err(|e| e as i64)?,
    }
    let slot = FINGERPRINTS.get_ptr_mut(0).ok_or(-1i64)?;
    // SAFETY: this CPU's slot; nothing else runs on this CPU meanwhile.
    let slot = unsafe { &mut *slot };
    match send_buffer(ctx) {
        Some((buf, len)) => *slot = fingerprint(buf, len, tid),
        // Not a send: a fingerprint left by an earlier syscall (a write to
        // a file, say) must not be taken for the next socket send.
        None if slot.tid == tid => slot.tid = 0,
        None => {}
    }
    Ok(())
}

/// The user buffer and length of a write/sendto/sendmsg (first iovec).
/// Syscall numbers and registers are x86_64's; other architectures get no
/// fingerprints (the rest of the probe works everywhere).
#[cfg(bpf_target_arch = "x86_64")]
fn send_buffer(ctx: &RawTracePointContext) -> Option<(*const u8, usize)> {
    use aya_ebpf::{bindings::pt_regs, helpers::bpf_probe_read_kernel};
    const WRITE: u64 = 1;
    const SENDTO: u64 = 44;
    const SENDMSG: u64 = 46;
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
    match id {
        WRITE | SENDTO => Some((a1 as *const u8, a2 as usize)),
        SENDMSG => {
            // struct user_msghdr: msg_iov at 16; struct iovec: base, len.
            let msg = a1 as *const u8;
            // SAFETY: probe reads of user memory; failures return None.
            unsafe {
                let iov: u64 = aya_ebpf::helpers::bpf_probe_read_user(msg.add(16).cast()).ok()?;
                let base: u64 = aya_ebpf::helpers::bpf_probe_read_user(iov as *const u64).ok()?;
                let len: u64 =
                    aya_ebpf::helpers::bpf_probe_read_user((iov as *const u64).add(1)).ok()?;
                Some((base as *const u8, len as usize))
            }
        }
        _ => None,
    }
}

#[cfg(not(bpf_target_arch = "x86_64"))]
fn send_buffer(_ctx: &RawTracePointContext) -> Option<(*const u8, usize)> {
    None
}

/// FNV-1a over the first bytes of the send, whole and from byte 2 on.
fn fingerprint(buf: *const u8, len: usize, tid: u32) -> Fingerprint {
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
    Fingerprint {
        whole: whole | 1,
        skip2: skip2 | 1,
        tid,
        _pad: 0,
    }
}

/// `syscalls:sys_exit_connect`: the errno of a connect that never reached
/// SYN_SENT, which no always-on sensor can see.
pub fn exit_connect(ctx: &TracePointContext) -> Result<(), i64> {
    let ret: i64 = field(ctx, off!(xc_ret))?;
    if ret >= 0 {
        return Ok(());
    }
    let (_, tid) = current();
    if let Some(p) = PRE_SYN.get_ptr(tid) {
        // SAFETY: pointer from a successful lookup, copied at once.
        let mut ev = unsafe { *p };
        if PRE_SYN.remove(tid).is_ok() {
            ev.ts_ns = now();
            ev.errno = (-ret) as i32;
            emit(&ev);
        }
    }
    Ok(())
}

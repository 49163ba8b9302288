//! Probes attached only while some process is suspect: syscall tracepoints
//! put every syscall on the host on the slow path, so they must not be
//! always on (platform.md: +64 ns on every getpid).
use aya_ebpf::programs::TracePointContext;

use crate::{
    maps::{PRE_SYN, SUSPECTS, SYSCALLS},
    util::{current, emit, field, now, off},
};

/// `raw_syscalls:sys_enter`: counts syscalls of suspect processes only.
pub fn sys_enter() -> Result<(), i64> {
    let (tgid, _) = current();
    // SAFETY: the value is only tested for presence.
    if unsafe { SUSPECTS.get(tgid) }.is_none() {
        return Ok(());
    }
    match SYSCALLS.get_ptr_mut(tgid) {
        // SAFETY: per-CPU value, only this CPU writes it while we run.
        Some(p) => unsafe { *p += 1 },
        None => SYSCALLS.insert(tgid, 1, 0).map_err(|e| e as i64)?,
    }
    Ok(())
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

//! Call stacks of suspect processes (see `detector_common::stack`): taken
//! by the on-demand `sys_enter` probe at the calls that connect or send,
//! counted by the hook that sees the destination in the same syscall.
use aya_ebpf::{
    bindings::{BPF_F_USER_STACK, BPF_NOEXIST},
    programs::{RawTracePointContext, tracing::StackIdContext as _},
};
use detector_common::{
    Event,
    stack::{CountKey, Note},
    stat, table,
};

use crate::{
    maps::{STACK_COPIED, STACK_COUNTS, STACK_NOTE, STACKS},
    tables::{insert_failed, put},
    util::{count, now},
};

/// At most one copy of a process's stack per this many ns.
const COPY_EVERY_NS: u64 = 1_000_000_000;

/// Whether syscall `id` connects or sends (x86_64 numbers): connect,
/// sendto, sendmsg, sendmmsg, write, writev.
/// Other architectures take no stacks (their numbers differ).
#[inline(always)]
pub fn is_call(id: u64) -> bool {
    cfg!(bpf_target_arch = "x86_64") && matches!(id, 42 | 44 | 46 | 307 | 1 | 20)
}

/// Walks the user stack by frame pointers and leaves the note for this
/// syscall's hook; at most once a second per process, also copies the top
/// of the stack for user space to unwind.
pub fn take(ctx: &RawTracePointContext, tgid: u32, tid: u32) {
    let stack = match ctx.get_stackid(&STACKS, BPF_F_USER_STACK as u64) {
        Ok(id) => id as u32 + 1,
        Err(_) => {
            count(stat::STACK_WALK_FAILED);
            0
        }
    };
    if let Some(p) = STACK_NOTE.get_ptr_mut(0) {
        // SAFETY: this CPU's slot; nothing else runs on this CPU meanwhile.
        unsafe { *p = Note { tid, stack } };
    }
    if stack != 0 && copy_due(tgid) {
        copy(ctx, tgid, tid, stack);
    }
}

/// True (and the time noted) when `tgid` had no copy in the last second.
#[inline(always)]
fn copy_due(tgid: u32) -> bool {
    let t = now();
    if let Some(last) = STACK_COPIED.get_ptr_mut(tgid) {
        // SAFETY: pointer into the map value; a racing update could only
        // let two copies through in the same second.
        unsafe {
            if t.wrapping_sub(*last) < COPY_EVERY_NS {
                return false;
            }
            *last = t;
        }
        return true;
    }
    put(&STACK_COPIED, table::STACK_COPIED, &tgid, &t)
}

/// The registers at syscall entry and the top of the user stack, on the
/// copies ring. Tries 8, 4, 2 and 1 KiB: a read that runs past the top of
/// the stack fails whole.
#[cfg(bpf_target_arch = "x86_64")]
#[inline(never)]
fn copy(ctx: &RawTracePointContext, tgid: u32, tid: u32, stack: u32) {
    use aya_ebpf::{
        bindings::pt_regs,
        helpers::{bpf_probe_read_kernel, generated::bpf_probe_read_user},
    };
    use detector_common::stack::{COPY_BYTES, Copy};

    use crate::maps::STACK_COPIES;

    let regs: *const pt_regs = ctx.arg(0);
    // SAFETY: probe reads of the syscall's saved user registers.
    let (ip, sp, bp) = unsafe {
        match (
            bpf_probe_read_kernel(&(*regs).rip),
            bpf_probe_read_kernel(&(*regs).rsp),
            bpf_probe_read_kernel(&(*regs).rbp),
        ) {
            (Ok(ip), Ok(sp), Ok(bp)) => (ip, sp, bp),
            _ => {
                count(stat::STACK_COPY_LOST);
                return;
            }
        }
    };
    let Some(mut entry) = STACK_COPIES.reserve::<Copy>(0) else {
        count(stat::STACK_COPY_LOST);
        return;
    };
    let c = entry.as_mut_ptr();
    // SAFETY: `c` points at a reserved record of the right size; every
    // header field is written, and `bytes` by the helper (zeroed on a
    // failed read) before submit.
    unsafe {
        (*c).ip = ip;
        (*c).sp = sp;
        (*c).bp = bp;
        (*c).tgid = tgid;
        (*c).tid = tid;
        (*c).stack = stack;
        let dst = (*c).bytes.as_mut_ptr().cast();
        let src = sp as *const core::ffi::c_void;
        // Constant sizes, one call each: the verifier checks each against
        // the record without having to follow a loop.
        let len = if bpf_probe_read_user(dst, COPY_BYTES as u32, src) == 0 {
            COPY_BYTES as u32
        } else if bpf_probe_read_user(dst, 4096, src) == 0 {
            4096
        } else if bpf_probe_read_user(dst, 2048, src) == 0 {
            2048
        } else if bpf_probe_read_user(dst, 1024, src) == 0 {
            1024
        } else {
            count(stat::STACK_COPY_LOST);
            0
        };
        (*c).len = len;
    }
    entry.submit(0);
}

#[cfg(not(bpf_target_arch = "x86_64"))]
fn copy(_ctx: &RawTracePointContext, _tgid: u32, _tid: u32, _stack: u32) {}

/// The hook that knows the destination of this thread's call (`ev` holds
/// the process and destination): one more call of the noted stack
/// towards it. Nothing unless the thread's `sys_enter` left a note.
#[inline(always)]
pub fn count_call(tid: u32, ev: &Event, proto: u16) {
    let Some(p) = STACK_NOTE.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: this CPU's slot; nothing else runs on this CPU meanwhile.
    let note = unsafe { &mut *p };
    if note.tid != tid || tid == 0 {
        return;
    }
    note.tid = 0;
    if note.stack == 0 {
        return;
    }
    let key = CountKey {
        netns: ev.netns,
        tgid: ev.tgid,
        stack: note.stack,
        dport: ev.dport,
        family: ev.family,
        proto,
        _pad: 0,
        daddr: ev.daddr,
    };
    if let Some(n) = STACK_COUNTS.get_ptr_mut(key) {
        // SAFETY: pointer into the map value; a racing increment may be lost.
        unsafe { *n += 1 };
        return;
    }
    match STACK_COUNTS.insert(key, 1, BPF_NOEXIST as u64) {
        Ok(()) => count(stat::inserts(table::STACK_COUNTS)),
        Err(e) => {
            if let Some(n) = STACK_COUNTS.get_ptr_mut(key) {
                // SAFETY: as above (another CPU made the key meanwhile).
                unsafe { *n += 1 };
            } else {
                insert_failed(table::STACK_COUNTS, e);
            }
        }
    }
}

//! Process lifecycle, so user space knows parents, names and when a pid's
//! state must be dropped (a reused pid starts fresh).
use aya_ebpf::programs::TracePointContext;
use detector_common::{Event, FIELD_ABSENT, flags, kind};

const FIELD_ABSENT_USIZE: usize = FIELD_ABSENT as usize;

use crate::{
    maps::{PRE_SYN, RECV_NOTES, SUSPECT_INHERITED, SUSPECTS, SYSCALLS},
    util::{armed, comm, current, emit, field, now, off},
};

fn record(kind: u8) -> Event {
    let mut ev = Event::zeroed();
    ev.kind = kind;
    ev.ts_ns = now();
    ev.tgid = current().0;
    ev.comm = comm();
    ev
}

pub fn fork(ctx: &TracePointContext) -> Result<(), i64> {
    let child: i32 = field(ctx, off!(fk_child_pid))?;
    let mut ev = record(kind::PROC_FORK);
    // A suspect's children are read from their first request: a shell
    // loop of curl is one new process per attempt.
    // SAFETY: the value is only tested for presence.
    if armed() && unsafe { SUSPECTS.get(ev.tgid) }.is_some() {
        let _ = SUSPECTS.insert(child as u32, SUSPECT_INHERITED, 0);
    }
    ev.aux = child as u32;
    emit(&ev);
    Ok(())
}

pub fn exec(_ctx: &TracePointContext) -> Result<(), i64> {
    emit(&record(kind::PROC_EXEC));
    Ok(())
}

pub fn exit(ctx: &TracePointContext) -> Result<(), i64> {
    let tid: i32 = field(ctx, off!(ex_pid))?;
    // `group_dead` came in Linux 6.16. Before that, the main thread's exit
    // stands for the process's: right unless the main thread leaves
    // before the others (rare; their state then goes at their pid's reuse).
    let group_dead = match off!(ex_group_dead) {
        FIELD_ABSENT_USIZE => u8::from(tid as u32 == current().0),
        at => field::<u8>(ctx, at)?,
    };
    let ts = now();
    // The thread's last connect never reached SYN_SENT: report it now.
    if let Some(p) = PRE_SYN.get_ptr(tid as u32) {
        // SAFETY: pointer from a successful lookup, copied at once.
        let mut prev = unsafe { *p };
        if PRE_SYN.remove(tid as u32).is_ok() {
            prev.ts_ns = ts;
            emit(&prev);
        }
    }
    let mut ev = record(kind::PROC_EXIT);
    ev.aux = tid as u32;
    if group_dead != 0 {
        ev.flags = flags::GROUP_DEAD;
        let _ = SUSPECTS.remove(ev.tgid);
        let _ = SYSCALLS.remove(ev.tgid);
    }
    let _ = RECV_NOTES.remove(tid as u32);
    emit(&ev);
    Ok(())
}

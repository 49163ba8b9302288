//! Process lifecycle, so user space knows parents, names and when a pid's
//! state must be dropped (a reused pid starts fresh).
use aya_ebpf::programs::TracePointContext;
use detector_common::{Event, FIELD_ABSENT, flags, kind, stat, table};

const FIELD_ABSENT_USIZE: usize = FIELD_ABSENT as usize;

use crate::{
    maps::{
        PRE_SYN, RECV_NOTES, SUSPECT_INHERITED, SUSPECTS, SYSCALLS, THREAD_SOCK, TLS_FP, TLS_READS,
    },
    tables::{NEG_EEXIST, NOEXIST, del, insert_failed, take},
    util::{armed, comm, count, current, emit, field, now, off},
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
        // A full map keeps the suspects it has (the most severe, which
        // user space wrote first): this child is not probed, and heard.
        match SUSPECTS.insert(child as u32, SUSPECT_INHERITED, NOEXIST) {
            Ok(()) => count(stat::inserts(table::SUSPECTS)),
            // A dead process's entry at a reused pid: it stays suspect.
            Err(e) if e == NEG_EEXIST => {}
            Err(e) => insert_failed(table::SUSPECTS, e),
        }
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
    let tid = tid as u32;
    if let Some(mut prev) = take(&PRE_SYN, table::PRE_SYN, &tid) {
        prev.ts_ns = ts;
        emit(&prev);
    }
    let mut ev = record(kind::PROC_EXIT);
    ev.aux = tid;
    if group_dead != 0 {
        ev.flags = flags::GROUP_DEAD;
        if SUSPECTS.remove(ev.tgid).is_ok() {
            count(stat::deletes(table::SUSPECTS));
        }
        if SYSCALLS.remove(ev.tgid).is_ok() {
            count(stat::deletes(table::SYSCALLS));
        }
    }
    // The thread's on-demand notes: only made while the probes are armed
    // (user space sweeps what a disarmed exit leaves behind).
    if armed() {
        del(&RECV_NOTES, table::RECV_NOTES, &tid);
        del(&TLS_FP, table::TLS_FP, &tid);
        del(&TLS_READS, table::TLS_READS, &tid);
        del(&THREAD_SOCK, table::THREAD_SOCK, &tid);
    }
    emit(&ev);
    Ok(())
}

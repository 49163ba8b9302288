//! Counted map writes and heard anomalies.
//!
//! - Every insert of a new key and every successful delete a program makes
//!   in an LRU map is counted in `STATS` (`detector_common::stat::inserts`
//!   / `deletes`), so user space can tell evictions apart: evictions =
//!   inserts − deletes − live entries. An overwrite of an existing key is
//!   made in place and counts nothing (it is also cheaper than an update:
//!   an LRU update allocates a new element and may evict another key).
//! - An anomaly (a refused insert, a full ring, an unexpected state, a
//!   failed helper) is counted per kind in `STATS` and logged through
//!   aya-log, at most once per second per kind per CPU: the rate limit is
//!   here in the kernel, so a flood of failures costs one per-CPU array
//!   read each and cannot flood the 128 KiB log ring.
//!
//! Hot-path cost when nothing goes wrong: one extra per-CPU array
//! increment per new key or delete; the logging code runs only on the
//! error branch (it is never reached otherwise: no ring reservation, no
//! helper call).
use aya_ebpf::{
    bindings::BPF_NOEXIST,
    macros::map,
    maps::{LruHashMap, PerCpuArray},
};
use detector_common::{anomaly, stat, table};

use crate::util::{count, now};

/// `-EEXIST`: an insert with `BPF_NOEXIST` met a key another CPU just made.
const EEXIST: i32 = 17;

/// Per CPU and anomaly kind: when it was last logged (0: never).
#[map]
static LOG_LAST: PerCpuArray<u64> = PerCpuArray::with_max_entries(anomaly::COUNT, 0);

/// At most one log line per anomaly kind per second per CPU.
const LOG_EVERY_NS: u64 = 1_000_000_000;

/// Counts one anomaly of `kind`; true when it may also be logged now.
#[inline(always)]
pub fn heard(kind: u32) -> bool {
    count(kind);
    let Some(last) = LOG_LAST.get_ptr_mut(kind) else {
        return false;
    };
    let t = now();
    // SAFETY: this CPU's slot of a per-CPU array; nothing else writes it
    // while this program runs on this CPU.
    unsafe {
        if *last != 0 && t.wrapping_sub(*last) < LOG_EVERY_NS {
            return false;
        }
        *last = t;
    }
    true
}

// The log lines themselves are in functions of their own (BPF-to-BPF
// calls, never inlined): an aya-log expansion needs stack, and inlined
// into a probe that already holds two records it would pass the 512-byte
// limit. Each line's text is a literal inside its function: aya-log can
// copy a string only when its length is a constant.

/// One never-inlined function per map, logging its refused insert.
macro_rules! insert_loggers {
    ($($table:path => $fn:ident, $name:literal;)*) => {
        $(
            #[inline(never)]
            fn $fn(errno: i32) {
                aya_log_ebpf::warn!(
                    &(),
                    "map {} refused an insert (errno {}); counted as map_insert, more this second not logged",
                    $name,
                    errno
                );
            }
        )*

        /// A map refused an insert (`err` is the helper's negative errno).
        #[inline(always)]
        pub fn insert_failed(table: u32, err: i32) {
            if heard(anomaly::MAP_INSERT) {
                match table {
                    $($table => $fn(-err),)*
                    _ => {}
                }
            }
        }
    };
}

insert_loggers! {
    table::INFLIGHT => log_inflight, "INFLIGHT";
    table::CLOSED => log_closed, "CLOSED";
    table::PRE_SYN => log_pre_syn, "PRE_SYN";
    table::UDP_DEST => log_udp_dest, "UDP_DEST";
    table::SUSPECTS => log_suspects, "SUSPECTS";
    table::SYSCALLS => log_syscalls, "SYSCALLS";
    table::RECV_NOTES => log_recv_notes, "RECV_NOTES";
    table::CONNS => log_conns, "CONNS";
    table::TLS_FP => log_tls_fp, "TLS_FP";
    table::TLS_READS => log_tls_reads, "TLS_READS";
    table::THREAD_SOCK => log_thread_sock, "THREAD_SOCK";
    table::STACK_COUNTS => log_stack_counts, "STACK_COUNTS";
    table::STACK_COPIED => log_stack_copied, "STACK_COPIED";
}

#[inline(never)]
fn log_ring_full() {
    aya_log_ebpf::warn!(
        &(),
        "event ring full: records lost; counted as ring_full, more this second not logged"
    );
}

/// The ring refused a record: it is lost.
#[inline(always)]
pub fn ring_full() {
    if heard(anomaly::RING_FULL) {
        log_ring_full();
    }
}

#[inline(never)]
fn log_odd_syn_sent() {
    aya_log_ebpf::warn!(
        &(),
        "unexpected state: a TCP socket left SYN_SENT for neither ESTABLISHED nor CLOSE (taken as a close); counted as unexpected_state, more this second not logged"
    );
}

/// A TCP socket left SYN_SENT for neither ESTABLISHED nor CLOSE.
#[inline(always)]
pub fn odd_syn_sent() {
    if heard(anomaly::UNEXPECTED_STATE) {
        log_odd_syn_sent();
    }
}

/// Runs a hook body's result through the `probe_error` anomaly: counted,
/// and logged with the program's name by a never-inlined function of the
/// entry point's own (see above).
macro_rules! check {
    ($program:literal, $result:expr $(,)?) => {{
        #[inline(never)]
        fn log_probe_error(err: i64) {
            aya_log_ebpf::warn!(
                &(),
                "program {} gave up on a helper error ({}); counted as probe_error, more this second not logged",
                $program,
                err
            );
        }
        if let Err(e) = $result
            && $crate::tables::heard(detector_common::anomaly::PROBE_ERROR)
        {
            log_probe_error(e);
        }
    }};
}
pub(crate) use check;

/// Writes `value` at `key`: in place when the key exists, else as a new
/// key (counted). False, with the refusal heard, when the map refused.
#[inline(always)]
pub fn put<K, V: Copy>(map: &LruHashMap<K, V>, table: u32, key: &K, value: &V) -> bool {
    if let Some(p) = map.get_ptr_mut(key) {
        // SAFETY: pointer into the map value from a successful lookup.
        unsafe { *p = *value };
        return true;
    }
    match map.insert(key, value, BPF_NOEXIST as u64) {
        Ok(()) => {
            count(stat::inserts(table));
            true
        }
        Err(e) => {
            // Another CPU made the key meanwhile: overwrite theirs.
            if e == NEG_EEXIST
                && let Some(p) = map.get_ptr_mut(key)
            {
                // SAFETY: as above.
                unsafe { *p = *value };
                return true;
            }
            insert_failed(table, e);
            false
        }
    }
}

/// Deletes `key`, counting it when it was there.
#[inline(always)]
pub fn del<K, V>(map: &LruHashMap<K, V>, table: u32, key: &K) -> bool {
    let removed = map.remove(key).is_ok();
    if removed {
        count(stat::deletes(table));
    }
    removed
}

/// Copies the value at `key` out and deletes it; None when absent or when
/// another CPU deleted it first (only the deleter acts on an entry).
#[inline(always)]
pub fn take<K, V: Copy>(map: &LruHashMap<K, V>, table: u32, key: &K) -> Option<V> {
    // SAFETY: pointer from a successful lookup, copied at once.
    let v = unsafe { *map.get_ptr(key)? };
    del(map, table, key).then_some(v)
}

/// [`take`] into a value the caller already has on its stack (records
/// are 136 bytes; two copies can pass the stack limit). True when taken.
#[inline(always)]
pub fn take_into<K, V: Copy>(map: &LruHashMap<K, V>, table: u32, key: &K, out: &mut V) -> bool {
    let Some(p) = map.get_ptr(key) else {
        return false;
    };
    // SAFETY: pointer from a successful lookup, copied at once.
    *out = unsafe { *p };
    del(map, table, key)
}

/// `BPF_NOEXIST` for maps that are not [`LruHashMap`]s.
pub const NOEXIST: u64 = BPF_NOEXIST as u64;
/// See [`EEXIST`].
pub const NEG_EEXIST: i32 = -EEXIST;

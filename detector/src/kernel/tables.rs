//! The kernel maps as bounded tables: their sizes at load, how full they
//! are and how many entries LRU eviction took ([`Sensors::map_usage`]),
//! and a sweep of entries left by dead threads and processes
//! ([`Sensors::sweep`]).
//!
//! Evictions are not visible to eBPF, so they are derived: the programs
//! count every new key they insert and every key they delete (`STATS`,
//! see `detector_common::stat::inserts`), user space counts its own, and
//! evictions = inserts − deletes − live entries. Live entries are counted
//! by walking the keys, which costs one `bpf(BPF_MAP_GET_NEXT_KEY)` per
//! entry: ~1 µs each, so even with every map full at its default size
//! (~270,000 entries) one call stays under half a second, and a host with
//! little in flight pays microseconds.
use std::{collections::HashSet, os::fd::AsRawFd as _};

use aya::maps::{Map, MapData, PerCpuArray};
use detector_common::{capacity, stack, stat, table};

use super::{KernelError, Sensors};

/// One kernel map's bounds, for status and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct MapUsage {
    /// The map's name in the object (`INFLIGHT`, `UDP_DEST`, …).
    pub name: &'static str,
    /// Live entries, counted by a key walk (at most `capacity`).
    pub entries: u64,
    /// The map's size as loaded (`max_entries`).
    pub capacity: u64,
    /// Entries the kernel evicted to make room (LRU maps; 0 for plain
    /// hashes, which refuse instead — see [`Sensors::anomalies`]).
    /// Exactly inserts − deletes − entries when the map is quiet during
    /// the walk; under churn an estimate, never decreasing.
    pub evictions: u64,
    /// New keys inserted since load, by the programs and by user space.
    pub inserts: u64,
    /// Keys deleted since load, by the programs and by user space.
    pub deletes: u64,
}

/// Map sizes to load with, instead of the defaults in
/// `detector_common::capacity`: tests shrink a map to fill it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoadOptions {
    /// (map name, max_entries) pairs; a name must be one of [`SIZED_MAPS`].
    pub map_sizes: Vec<(&'static str, u32)>,
}

/// Maps whose size [`LoadOptions`] may set and [`Sensors::map_usage`]
/// reports: every counted table, then `SUSPECT_CGROUPS` (written by user
/// space only; never evicts).
pub const SIZED_MAPS: [(&str, u32); table::COUNT as usize + 1] = [
    ("INFLIGHT", capacity::INFLIGHT),
    ("CLOSED", capacity::CLOSED),
    ("PRE_SYN", capacity::PRE_SYN),
    ("UDP_DEST", capacity::UDP_DEST),
    ("SUSPECTS", capacity::SUSPECTS),
    ("SYSCALLS", capacity::SUSPECTS),
    ("RECV_NOTES", capacity::RECV_NOTES),
    ("CONNS", capacity::CONNS),
    ("TLS_FP", capacity::RECV_NOTES),
    ("TLS_READS", capacity::RECV_NOTES),
    ("THREAD_SOCK", capacity::RECV_NOTES),
    ("STACK_COUNTS", stack::capacity::COUNTS),
    ("STACK_COPIED", stack::capacity::COPIED),
    ("SUSPECT_CGROUPS", capacity::SUSPECT_CGROUPS),
];

/// Index of `SUSPECT_CGROUPS` in [`SIZED_MAPS`].
const SUSPECT_CGROUPS: usize = table::COUNT as usize;

/// Tables keyed by a thread or process id, which [`Sensors::sweep`]
/// checks for dead ones.
const BY_TASK: [u32; 8] = [
    table::SUSPECTS,
    table::SYSCALLS,
    table::PRE_SYN,
    table::RECV_NOTES,
    table::TLS_FP,
    table::TLS_READS,
    table::THREAD_SOCK,
    table::STACK_COPIED,
];

/// Most keys one [`Sensors::sweep`] examines (two syscalls each: ~2 ms).
pub const SWEEP_KEYS: usize = 1024;

/// User-space bookkeeping of the tables: sizes, own inserts and deletes,
/// where the sweep stopped.
#[derive(Debug)]
pub(super) struct Tables {
    /// max_entries per [`SIZED_MAPS`] entry, as loaded.
    pub capacity: [u32; SIZED_MAPS.len()],
    /// Inserts of new keys made by user space, per table.
    pub inserts: [u64; table::COUNT as usize],
    /// Deletes made by user space, per table.
    pub deletes: [u64; table::COUNT as usize],
    /// Highest evictions reported so far, per table (never decreases).
    evictions: [u64; table::COUNT as usize],
    /// Which [`BY_TASK`] table the sweep is in, and the first key there
    /// it has not examined yet (None: from the start).
    sweep_at: (usize, Option<u32>),
}

impl Tables {
    /// Sizes from the defaults and `opts`; an unknown name is an error.
    pub fn new(opts: &LoadOptions) -> Result<Self, KernelError> {
        let mut capacity = SIZED_MAPS.map(|(_, n)| n);
        for (name, size) in &opts.map_sizes {
            let i = SIZED_MAPS
                .iter()
                .position(|(n, _)| n == name)
                .ok_or(KernelError::NoMap(name))?;
            capacity[i] = *size;
        }
        Ok(Tables {
            capacity,
            inserts: [0; table::COUNT as usize],
            deletes: [0; table::COUNT as usize],
            evictions: [0; table::COUNT as usize],
            sweep_at: (0, None),
        })
    }

    /// The loaded size of the map called `name`.
    pub fn capacity_of(&self, name: &str) -> usize {
        SIZED_MAPS
            .iter()
            .position(|(n, _)| *n == name)
            .map_or(0, |i| self.capacity[i] as usize)
    }
}

/// The `MapData` under any map kind these tables use.
fn data(map: &Map) -> Option<&MapData> {
    match map {
        Map::HashMap(d) | Map::LruHashMap(d) | Map::PerCpuHashMap(d) | Map::PerCpuLruHashMap(d) => {
            Some(d)
        }
        _ => None,
    }
}

/// `bpf_attr` for the map element commands.
#[repr(C)]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    next_key: u64,
    flags: u64,
}

const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;

/// One map element command; false when the kernel said no (no next key,
/// key already gone).
fn elem_cmd(cmd: libc::c_long, fd: i32, key: Option<&[u8]>, out: Option<&mut [u8]>) -> bool {
    let mut attr = ElemAttr {
        map_fd: fd as u32,
        _pad: 0,
        key: key.map_or(0, |k| k.as_ptr() as u64),
        next_key: out.map_or(0, |o| o.as_mut_ptr() as u64),
        flags: 0,
    };
    // SAFETY: `attr` is a valid bpf_attr prefix for this command; the key
    // and output buffers are the map's key size (the caller's contract)
    // and live across the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            &mut attr as *mut ElemAttr,
            std::mem::size_of::<ElemAttr>() as u32,
        )
    };
    rc == 0
}

/// Counts the keys of a map, walking at most `limit` of them (a key
/// deleted under the walk restarts it; the limit keeps that bounded).
fn count_keys(d: &MapData, key_size: usize, limit: u64) -> u64 {
    let fd = d.fd().as_fd().as_raw_fd();
    let mut key = vec![0u8; key_size];
    let mut next = vec![0u8; key_size];
    let mut n = 0;
    let mut first = true;
    while n < limit {
        let prev = (!first).then_some(key.as_slice());
        if !elem_cmd(BPF_MAP_GET_NEXT_KEY, fd, prev, Some(&mut next)) {
            break;
        }
        std::mem::swap(&mut key, &mut next);
        first = false;
        n += 1;
    }
    n
}

use std::os::fd::AsFd as _;

/// True when no task has this id any more (`kill(id, 0)` says ESRCH).
/// A zombie still counts as alive until it is reaped.
pub fn task_gone(id: u32) -> bool {
    if id == 0 || id > i32::MAX as u32 {
        return false;
    }
    // SAFETY: signal 0 only checks that the task exists; nothing is sent.
    let rc = unsafe { libc::kill(id as libc::pid_t, 0) };
    rc == -1 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH)
}

impl Sensors {
    /// Entries, capacity and evictions of every bounded kernel map (see
    /// the module doc for how evictions are known). Costs about 1 µs per
    /// live entry, at most the maps' total capacity: call it every 10 s
    /// or so (status, metrics), not per tick.
    pub fn map_usage(&mut self) -> Result<Vec<MapUsage>, KernelError> {
        let map_err = |cause| KernelError::Map {
            name: "STATS",
            cause,
        };
        let stats_map = self.ebpf.map("STATS").ok_or(KernelError::NoMap("STATS"))?;
        let stats: PerCpuArray<_, u64> = PerCpuArray::try_from(stats_map).map_err(map_err)?;
        let sum = |i: u32| -> Result<u64, KernelError> {
            Ok(stats.get(&i, 0).map_err(map_err)?.iter().sum())
        };
        let mut out = Vec::with_capacity(SIZED_MAPS.len());
        for (i, (name, _)) in SIZED_MAPS.iter().enumerate() {
            let capacity = u64::from(self.tables.capacity[i]);
            let map = self.ebpf.map(name).ok_or(KernelError::NoMap(name))?;
            let d = data(map).ok_or(KernelError::NoMap(name))?;
            let key_size = d
                .info()
                .map_err(|cause| KernelError::Map { name, cause })?
                .key_size() as usize;
            let entries = count_keys(d, key_size, capacity);
            let (inserts, deletes, evictions) = if i == SUSPECT_CGROUPS {
                (0, 0, 0)
            } else {
                let t = i as u32;
                let inserts = sum(stat::inserts(t))? + self.tables.inserts[i];
                let deletes = sum(stat::deletes(t))? + self.tables.deletes[i];
                let now = inserts.saturating_sub(deletes).saturating_sub(entries);
                let e = &mut self.tables.evictions[i];
                *e = (*e).max(now);
                (inserts, deletes, *e)
            };
            out.push(MapUsage {
                name,
                entries,
                capacity,
                evictions,
                inserts,
                deletes,
            });
        }
        Ok(out)
    }

    /// Removes entries of threads and processes that no longer exist from
    /// the maps keyed by them (`SUSPECTS` entries inherited by children,
    /// `SYSCALLS`, `PRE_SYN`, `RECV_NOTES`, `TLS_FP`, `TLS_READS`,
    /// `THREAD_SOCK`). The exit tracepoint removes most; this catches what
    /// it cannot (a process whose main thread left first before Linux
    /// 6.16, notes left while the probes were disarmed). The suspects
    /// user space set, and their syscall counts, are left to
    /// [`Sensors::set_suspects`].
    ///
    /// Bounded: examines at most [`SWEEP_KEYS`] keys per call (~2 ms),
    /// resuming where the last call stopped; call it once a second and a
    /// full pass over every map at its default size takes under a minute.
    /// Returns how many entries it removed.
    pub fn sweep(&mut self) -> Result<usize, KernelError> {
        let protected: HashSet<u32> = self.user_suspects.iter().copied().collect();
        let mut budget = SWEEP_KEYS;
        let mut removed = 0;
        // Each map at most once per call, so an empty pass ends.
        for _ in 0..BY_TASK.len() {
            if budget == 0 {
                break;
            }
            let (at, cursor) = self.tables.sweep_at;
            let t = BY_TASK[at];
            let name = table::NAMES[t as usize];
            let map = self.ebpf.map(name).ok_or(KernelError::NoMap(name))?;
            let d = data(map).ok_or(KernelError::NoMap(name))?;
            let fd = d.fd().as_fd().as_raw_fd();
            // The keys to examine, plus the next one (where to resume).
            let mut keys: Vec<u32> = cursor.into_iter().collect();
            let mut last = cursor;
            while keys.len() <= budget {
                let mut next = [0u8; 4];
                let prev = last.map(u32::to_ne_bytes);
                if !elem_cmd(
                    BPF_MAP_GET_NEXT_KEY,
                    fd,
                    prev.as_ref().map(|p| p.as_slice()),
                    Some(&mut next),
                ) {
                    break;
                }
                let k = u32::from_ne_bytes(next);
                keys.push(k);
                last = Some(k);
            }
            let resume = (keys.len() > budget).then(|| keys[budget]);
            keys.truncate(budget);
            budget -= keys.len();
            let user_set = t == table::SUSPECTS || t == table::SYSCALLS;
            for k in keys {
                if (user_set && protected.contains(&k)) || !task_gone(k) {
                    continue;
                }
                if elem_cmd(BPF_MAP_DELETE_ELEM, fd, Some(&k.to_ne_bytes()), None) {
                    self.tables.deletes[t as usize] += 1;
                    removed += 1;
                }
            }
            self.tables.sweep_at = match resume {
                Some(k) => (at, Some(k)),
                None => ((at + 1) % BY_TASK.len(), None),
            };
        }
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn load_options_set_sizes_by_name_and_refuse_unknown_maps() {
        let t = Tables::new(&LoadOptions {
            map_sizes: vec![("UDP_DEST", 16), ("SUSPECT_CGROUPS", 2)],
        })
        .unwrap();
        assert_eq!(t.capacity_of("UDP_DEST"), 16);
        assert_eq!(t.capacity_of("SUSPECT_CGROUPS"), 2);
        assert_eq!(t.capacity_of("CONNS"), capacity::CONNS as usize);
        let err = Tables::new(&LoadOptions {
            map_sizes: vec![("NOPE", 1)],
        })
        .unwrap_err();
        assert!(matches!(err, KernelError::NoMap("NOPE")), "{err}");
    }

    #[test]
    fn counted_tables_are_listed_in_table_order() {
        for (i, name) in table::NAMES.iter().enumerate() {
            assert_eq!(SIZED_MAPS[i].0, *name);
        }
        assert_eq!(SIZED_MAPS[SUSPECT_CGROUPS].0, "SUSPECT_CGROUPS");
    }

    #[test]
    fn a_dead_task_is_gone_and_a_live_or_zombie_one_is_not() {
        assert!(!task_gone(std::process::id()));
        assert!(!task_gone(0), "0 is never a task to sweep");
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        // Exited but not reaped: a zombie, still there.
        let zombie = || {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .is_ok_and(|s| s.rsplit(") ").next().is_some_and(|r| r.starts_with('Z')))
        };
        for _ in 0..500 {
            if zombie() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert!(zombie(), "child never became a zombie");
        assert!(!task_gone(pid));
        child.wait().unwrap();
        assert!(task_gone(pid));
    }
}

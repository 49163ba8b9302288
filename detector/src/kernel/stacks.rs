//! The kernel's side of call stacks (see `detector_common::stack`): calls
//! counted per (process, destination, stack), the frame-pointer stacks by
//! id, and the copies of user stacks to unwind.
use aya::maps::{HashMap, MapData, RingBuf, StackTraceMap};
use detector_common::{
    IPPROTO_TCP,
    stack::{Copy, CountKey},
    table,
};

use super::{KernelError, Sensors};
use crate::ingest::{Destination, Proto, decode::address};

/// Calls of one stack of one process towards one destination, since the
/// last [`Sensors::take_stack_counts`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StackCount {
    pub pid: u32,
    pub dest: Destination,
    /// Id in the kernel's stack map (valid until the next take).
    pub stack: u32,
    pub calls: u64,
}

/// A stack id and its frame-pointer frames (innermost first).
pub type IdFrames = (u32, Vec<u64>);

/// Most counters one take reads: the map's default size.
pub const TAKE_MAX: usize = detector_common::stack::capacity::COUNTS as usize;

/// Most copies one [`Sensors::stack_copies`] reads.
pub const COPIES_MAX: usize = 64;

impl Sensors {
    /// Takes (reads and deletes) the call counters, at most [`TAKE_MAX`],
    /// with the frame-pointer stack of each id they name; the stack ids
    /// read are deleted from the stack map, so it never fills with the
    /// stacks of processes long gone (the next call of a stack still
    /// counted puts it back under the same id). Returns the counts and the
    /// frames by id.
    pub fn take_stack_counts(&mut self) -> Result<(Vec<StackCount>, Vec<IdFrames>), KernelError> {
        let map_err = |name| move |cause| KernelError::Map { name, cause };
        let mut counts: HashMap<_, CountKey, u64> =
            HashMap::try_from(self.map_mut("STACK_COUNTS")?).map_err(map_err("STACK_COUNTS"))?;
        let keys: Vec<CountKey> = counts
            .keys()
            .take(TAKE_MAX)
            .filter_map(Result::ok)
            .collect();
        let mut out = Vec::with_capacity(keys.len());
        let mut deleted = 0;
        for k in keys {
            let Ok(calls) = counts.get(&k, 0) else {
                continue;
            };
            if counts.remove(&k).is_ok() {
                deleted += 1;
            }
            let Ok(addr) = address(k.family, &k.daddr) else {
                continue;
            };
            let proto = if k.proto == IPPROTO_TCP {
                Proto::Tcp
            } else {
                Proto::Udp
            };
            out.push(StackCount {
                pid: k.tgid,
                dest: Destination {
                    proto,
                    addr,
                    port: k.dport,
                    netns: k.netns,
                },
                stack: k.stack.saturating_sub(1),
                calls,
            });
        }
        self.tables.deletes[table::STACK_COUNTS as usize] += deleted;
        let mut ids: Vec<u32> = out.iter().map(|c| c.stack).collect();
        ids.sort_unstable();
        ids.dedup();
        let mut stacks: StackTraceMap<_> =
            StackTraceMap::try_from(self.map_mut("STACKS")?).map_err(map_err("STACKS"))?;
        let mut frames = Vec::with_capacity(ids.len());
        for id in ids {
            if let Ok(st) = stacks.get(&id, 0) {
                frames.push((id, st.frames().iter().map(|f| f.ip).collect()));
                let _ = stacks.remove(&id);
            }
        }
        Ok((out, frames))
    }

    /// Takes the ring of stack copies (once): the service loop polls it
    /// on its own, so a copy is unwound while its process still runs.
    pub fn take_stack_copies(&mut self) -> Result<CopyRing, KernelError> {
        let map = self
            .ebpf
            .take_map("STACK_COPIES")
            .ok_or(KernelError::NoMap("STACK_COPIES"))?;
        let ring = RingBuf::try_from(map).map_err(|cause| KernelError::Map {
            name: "STACK_COPIES",
            cause,
        })?;
        Ok(CopyRing { ring })
    }
}

/// The ring of stack copies; poll its fd for readability, then read.
pub struct CopyRing {
    ring: RingBuf<MapData>,
}

impl CopyRing {
    /// The copies waiting, at most [`COPIES_MAX`].
    pub fn read(&mut self) -> Vec<Box<Copy>> {
        let mut out = Vec::new();
        while out.len() < COPIES_MAX {
            let Some(item) = self.ring.next() else { break };
            if item.len() < size_of::<Copy>() {
                continue;
            }
            // SAFETY: the record is a `Copy` written by the programs (size
            // checked); read unaligned into an owned box.
            let c: Copy = unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
            out.push(Box::new(c));
        }
        out
    }
}

impl std::os::fd::AsRawFd for CopyRing {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.ring.as_raw_fd()
    }
}

//! Which line of code makes a storm's calls: the call stacks the kernel
//! counted per (process, destination, stack) for suspect processes (see
//! `detector_common::stack`), unwound and symbolized on a worker thread so
//! the service loop never waits on /proc or on parsing DWARF.
//!
//! Data flow: `kernel::stacks` (counts, frame-pointer stacks, stack
//! copies) → [`StackBook::take`] → worker ([`unwind`], [`symbolize`]) →
//! [`StackBook::top`] → incidents, `explain`, `--json`.
pub mod symbolize;
pub mod unwind;
mod worker;

use std::collections::HashMap;

use detector_common::stack::Copy;
use serde::{Deserialize, Serialize};

use crate::{
    ingest::{Destination, TableUsage, bounded::batch},
    kernel::{Sensors, stacks::StackCount},
};
use worker::{Done, Job, Worker};

/// One frame of a symbolized stack.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Frame {
    /// The lookup address (a return address minus one).
    pub addr: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub function: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub line: Option<u32>,
    /// The file the code is in (executable or shared library).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub module: Option<String>,
    /// Inlined into the frame below it (same address).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub inlined: bool,
}

/// How a stack's frames were found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Method {
    /// Unwound from a copy of the user stack with `.eh_frame`.
    Unwound,
    /// The kernel's frame-pointer walk: code built without frame pointers
    /// (most distributions' libc) hides its caller or ends the walk.
    #[default]
    FramePointers,
}

/// A symbolized stack.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resolved {
    pub frames: Vec<Frame>,
    pub method: Method,
    /// The stack may be missing outer frames (or, from frame pointers,
    /// the caller of a frameless function).
    pub truncated: bool,
    /// What the reader should know (interpreter frames not resolved, the
    /// process exited before it was read…).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// A stack with its part of a storm's calls.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StackShare {
    /// Calls made from this stack.
    pub calls: u64,
    /// `calls` over all calls with a stack of the same flows.
    pub share: f64,
    #[serde(flatten)]
    pub stack: Resolved,
}

/// (process, hash of the frame-pointer frames): one stack of one process
/// (addresses differ between processes, so the process is part of it).
type StackKey = (u32, u64);

/// Most flows whose stacks are kept.
pub const FLOWS_MAX: usize = 4_096;
/// Most distinct stacks kept per flow (beyond it, calls count as "other").
pub const STACKS_PER_FLOW: usize = 8;
/// Most stacks kept resolved.
pub const RESOLVED_MAX: usize = 2_048;
/// Most resolved copies waiting for their stack's count.
const EARLY_MAX: usize = 512;
/// A flow with no call for this long is forgotten, with its stacks: a
/// storming process calls every second, and a dead one's stacks must not
/// pile up under process churn (incidents keep the stacks they were
/// given).
pub const FLOW_TTL_NS: u64 = 30_000_000_000;

#[derive(Debug, Default)]
struct FlowStacks {
    stacks: Vec<(StackKey, u64)>,
    other: u64,
    last_ns: u64,
}

/// What [`StackBook`] counted, for status and metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StackStats {
    pub calls: u64,
    pub copies: u64,
    pub resolved: u64,
    pub unwound: u64,
    /// Jobs dropped: the worker's queue was full.
    pub queue_full: u64,
    /// Flows forgotten at their bound (the longest idle first).
    pub flows_evicted: u64,
    /// Resolved stacks forgotten at their bound (those no flow counts).
    pub stacks_evicted: u64,
}

/// Calls per flow and stack, and the stacks resolved so far.
pub struct StackBook {
    flows: HashMap<(u32, Destination), FlowStacks>,
    resolved: HashMap<StackKey, Option<Resolved>>,
    /// Copies resolved before their stack was counted, by (pid, stack
    /// id), with the take they arrived after.
    early: HashMap<(u32, u32), (Resolved, u64)>,
    /// The stack each (pid, stack id) of the last take counted under.
    id_keys: HashMap<(u32, u32), StackKey>,
    /// Takes so far.
    takes: u64,
    worker: Worker,
    pub stats: StackStats,
}

impl Default for StackBook {
    fn default() -> Self {
        Self::new()
    }
}

fn hash_frames(frames: &[u64]) -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = foldhash::fast::FixedState::with_seed(0x5347).build_hasher();
    for f in frames {
        h.write_u64(*f);
    }
    h.finish()
}

impl StackBook {
    pub fn new() -> Self {
        StackBook {
            flows: HashMap::new(),
            resolved: HashMap::new(),
            early: HashMap::new(),
            id_keys: HashMap::new(),
            takes: 0,
            worker: Worker::start(),
            stats: StackStats::default(),
        }
    }

    /// Stack copies, as soon as they arrive: to the worker at once, which
    /// reads the process's mappings while it still runs.
    pub fn on_copies(&mut self, copies: Vec<Box<Copy>>) {
        for c in copies {
            self.stats.copies += 1;
            if !self.worker.send_copy(c) {
                self.stats.queue_full += 1;
            }
        }
    }

    /// Every tick: what the worker finished.
    pub fn poll(&mut self) {
        for done in self.worker.results() {
            self.stats.resolved += 1;
            match done {
                Done::Stack(key, r) => {
                    if let Some(slot @ None) = self.resolved.get_mut(&key) {
                        *slot = Some(r);
                    }
                }
                // A copy that could not be unwound says nothing the
                // frame-pointer walk will not.
                Done::Copy(_, r) if r.method != Method::Unwound => {}
                Done::Copy(id, r) => {
                    self.stats.unwound += 1;
                    match self.id_keys.get(&id).copied() {
                        Some(key) => self.upgrade(key, r),
                        None if self.early.len() < EARLY_MAX => {
                            self.early.insert(id, (r, self.takes));
                        }
                        None => self.stats.queue_full += 1,
                    }
                }
            }
        }
    }

    /// A stack resolved from a copy replaces one not resolved yet or
    /// resolved from frame pointers only.
    fn upgrade(&mut self, key: StackKey, r: Resolved) {
        if !self.room_for(&key) {
            return;
        }
        let slot = self.resolved.entry(key).or_insert(None);
        let better = match slot {
            None => true,
            Some(old) => old.method == Method::FramePointers && r.method == Method::Unwound,
        };
        if better {
            *slot = Some(r);
        }
    }

    /// Once a second: takes the kernel's counts, files them by flow, and
    /// resolves each new stack (from its copy when the worker has one,
    /// else from its frame-pointer walk).
    pub fn take(
        &mut self,
        sensors: &mut Sensors,
        now_ns: u64,
    ) -> Result<(), crate::kernel::KernelError> {
        let (counts, frames) = sensors.take_stack_counts()?;
        let frames: HashMap<u32, Vec<u64>> = frames.into_iter().collect();
        self.takes += 1;
        self.id_keys.clear();
        for c in counts {
            let Some(fp) = frames.get(&c.stack) else {
                continue;
            };
            let key = (c.pid, hash_frames(fp));
            self.add(&c, key, now_ns);
            self.id_keys.insert((c.pid, c.stack), key);
            if let Some((r, _)) = self.early.remove(&(c.pid, c.stack)) {
                self.upgrade(key, r);
                continue;
            }
            if self.resolved.contains_key(&key) || !self.room_for(&key) {
                continue;
            }
            let job = Job {
                key,
                pid: c.pid,
                frames: fp.clone(),
            };
            if self.worker.send(job) {
                self.resolved.insert(key, None);
            } else {
                self.stats.queue_full += 1;
            }
        }
        // A copy whose stack was not counted by the next take will not be.
        let takes = self.takes;
        self.early.retain(|_, (_, t)| *t + 1 >= takes);
        self.expire(now_ns);
        Ok(())
    }

    /// Forgets flows idle for [`FLOW_TTL_NS`] and the stacks only they
    /// used; the worker drops what it kept of their processes.
    fn expire(&mut self, now_ns: u64) {
        let before = self.flows.len();
        let mut gone = Vec::new();
        self.flows.retain(|(pid, _), f| {
            let keep = now_ns.saturating_sub(f.last_ns) < FLOW_TTL_NS;
            if !keep {
                gone.push(*pid);
            }
            keep
        });
        if self.flows.len() == before {
            return;
        }
        gone.retain(|pid| !self.flows.keys().any(|(p, _)| p == pid));
        for pid in gone {
            self.resolved.retain(|(p, _), _| *p != pid);
            self.worker.forget(pid);
        }
    }

    fn add(&mut self, c: &StackCount, key: StackKey, now_ns: u64) {
        self.stats.calls += c.calls;
        let fk = (c.pid, c.dest);
        if !self.flows.contains_key(&fk) && self.flows.len() >= FLOWS_MAX {
            // The flows seen longest ago go, a batch at a time.
            let mut by_age: Vec<((u32, Destination), u64)> =
                self.flows.iter().map(|(k, f)| (*k, f.last_ns)).collect();
            by_age.sort_unstable_by_key(|(_, t)| *t);
            for (k, _) in by_age.into_iter().take(batch(FLOWS_MAX)) {
                self.flows.remove(&k);
                self.stats.flows_evicted += 1;
            }
        }
        let f = self.flows.entry(fk).or_default();
        f.last_ns = now_ns;
        if let Some(s) = f.stacks.iter_mut().find(|(k, _)| *k == key) {
            s.1 += c.calls;
        } else if f.stacks.len() < STACKS_PER_FLOW {
            f.stacks.push((key, c.calls));
        } else {
            f.other += c.calls;
        }
    }

    /// Whether `key` is held or can be: at [`RESOLVED_MAX`], the stacks no
    /// flow counts any more go first; if every one is still counted, the
    /// new stack is not kept (counted as evicted).
    fn room_for(&mut self, key: &StackKey) -> bool {
        if self.resolved.contains_key(key) || self.resolved.len() < RESOLVED_MAX {
            return true;
        }
        self.evict_resolved();
        if self.resolved.len() < RESOLVED_MAX {
            return true;
        }
        self.stats.stacks_evicted += 1;
        false
    }

    fn evict_resolved(&mut self) {
        let live: std::collections::HashSet<StackKey> = self
            .flows
            .values()
            .flat_map(|f| f.stacks.iter().map(|(k, _)| *k))
            .collect();
        let dead: Vec<StackKey> = self
            .resolved
            .keys()
            .filter(|k| !live.contains(k))
            .copied()
            .collect();
        for k in dead {
            self.resolved.remove(&k);
            self.stats.stacks_evicted += 1;
        }
    }

    /// The `n` stacks with the most calls of the flows of `pids` towards
    /// `dest`, with their share; stacks not resolved yet are left out.
    pub fn top(&self, pids: &[u32], dest: &Destination, n: usize) -> Vec<StackShare> {
        let mut calls: HashMap<StackKey, u64> = HashMap::new();
        let mut total = 0;
        for pid in pids {
            if let Some(f) = self.flows.get(&(*pid, *dest)) {
                total += f.other;
                for (k, c) in &f.stacks {
                    *calls.entry(*k).or_default() += c;
                    total += c;
                }
            }
        }
        // The same code in several processes has different addresses but
        // the same frames once symbolized: merged by their text.
        let mut merged: Vec<(u64, Resolved)> = Vec::new();
        for (k, c) in calls {
            let Some(Some(r)) = self.resolved.get(&k) else {
                continue;
            };
            let same = |m: &(u64, Resolved)| {
                m.1.frames.len() == r.frames.len()
                    && m.1.frames.iter().zip(&r.frames).all(|(a, b)| {
                        // Unnamed frames only when they are the same address.
                        a.function == b.function
                            && a.file == b.file
                            && a.line == b.line
                            && (a.function.is_some() || a.addr == b.addr)
                    })
            };
            match merged.iter_mut().find(|m| same(m)) {
                Some(m) => m.0 += c,
                None => merged.push((c, r.clone())),
            }
        }
        merged.sort_by_key(|m| std::cmp::Reverse(m.0));
        merged
            .into_iter()
            .take(n)
            .map(|(c, r)| StackShare {
                calls: c,
                share: c as f64 / total.max(1) as f64,
                stack: r,
            })
            .collect()
    }

    /// Flows and resolved stacks held (for the bounds tests and status).
    pub fn sizes(&self) -> (usize, usize) {
        (self.flows.len(), self.resolved.len())
    }

    /// The bounded tables, for status and metrics.
    pub fn tables(&self) -> Vec<TableUsage> {
        vec![
            TableUsage::new(
                "stack_flows",
                self.flows.len(),
                FLOWS_MAX,
                self.stats.flows_evicted,
            ),
            TableUsage::new(
                "stacks",
                self.resolved.len(),
                RESOLVED_MAX,
                self.stats.stacks_evicted,
            ),
        ]
    }
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr};

    use super::*;
    use crate::ingest::Proto;

    fn dest(port: u16) -> Destination {
        Destination {
            proto: Proto::Tcp,
            addr: IpAddr::V4(Ipv4Addr::LOCALHOST),
            port,
            netns: 1,
        }
    }

    fn count(pid: u32, port: u16, calls: u64) -> StackCount {
        StackCount {
            pid,
            dest: dest(port),
            stack: 0,
            calls,
        }
    }

    fn resolved(function: &str) -> Resolved {
        Resolved {
            frames: vec![Frame {
                addr: 1,
                function: Some(function.into()),
                ..Frame::default()
            }],
            ..Resolved::default()
        }
    }

    #[test]
    fn flows_are_bounded_and_the_longest_idle_goes() {
        let mut b = StackBook::new();
        for i in 0..FLOWS_MAX as u32 + 10 {
            b.add(&count(i, 1, 1), (i, 1), u64::from(i));
        }
        // Full at FLOWS_MAX + 1: one batch went, then 10 came in.
        assert_eq!(b.sizes().0, FLOWS_MAX - batch(FLOWS_MAX) + 10);
        assert_eq!(b.stats.flows_evicted, batch(FLOWS_MAX) as u64);
        assert_eq!(b.tables()[0].evictions, b.stats.flows_evicted);
        // The first ones (idle longest) went.
        assert!(!b.flows.contains_key(&(0, dest(1))));
        assert!(b.flows.contains_key(&(FLOWS_MAX as u32 + 9, dest(1))));
    }

    #[test]
    fn a_flow_keeps_its_first_stacks_and_counts_the_rest_as_other() {
        let mut b = StackBook::new();
        for s in 0..STACKS_PER_FLOW as u64 + 4 {
            b.add(&count(7, 1, 10), (7, s), 1);
            b.resolved.insert((7, s), Some(resolved(&format!("f{s}"))));
        }
        let f = &b.flows[&(7, dest(1))];
        assert_eq!((f.stacks.len(), f.other), (STACKS_PER_FLOW, 40));
        let top = b.top(&[7], &dest(1), 3);
        assert_eq!(top.len(), 3);
        // Shares are of every call, "other" included.
        assert!((top[0].share - 10.0 / 120.0).abs() < 1e-9, "{top:?}");
    }

    #[test]
    fn the_same_code_in_two_processes_is_one_stack_with_both_counts() {
        let mut b = StackBook::new();
        b.add(&count(1, 1, 30), (1, 11), 1);
        b.add(&count(2, 1, 10), (2, 22), 1);
        b.add(&count(2, 1, 60), (2, 33), 1);
        b.resolved.insert((1, 11), Some(resolved("retry")));
        b.resolved.insert((2, 22), Some(resolved("retry")));
        b.resolved.insert((2, 33), Some(resolved("other")));
        let top = b.top(&[1, 2], &dest(1), 5);
        let names: Vec<(&str, u64)> = top
            .iter()
            .map(|s| (s.stack.frames[0].function.as_deref().unwrap(), s.calls))
            .collect();
        assert_eq!(names, [("other", 60), ("retry", 40)]);
        // Another destination's calls are not this flow's.
        assert!(b.top(&[1, 2], &dest(2), 5).is_empty());
    }

    #[test]
    fn resolved_stacks_stay_within_their_bound_even_when_all_are_counted() {
        let mut b = StackBook::new();
        // RESOLVED_MAX stacks, each counted by a live flow.
        for i in 0..RESOLVED_MAX as u32 {
            b.add(&count(i, 1, 1), (i, 1), 1);
            b.upgrade((i, 1), resolved("x"));
        }
        assert_eq!(b.sizes().1, RESOLVED_MAX);
        // One more is refused, and counted.
        b.add(&count(9_999, 1, 1), (9_999, 1), 1);
        b.upgrade((9_999, 1), resolved("y"));
        assert_eq!(b.sizes().1, RESOLVED_MAX);
        assert_eq!(b.stats.stacks_evicted, 1);
        // Once a flow is gone, its stack makes room.
        b.flows.remove(&(0, dest(1)));
        b.upgrade((9_999, 1), resolved("y"));
        assert!(b.resolved.contains_key(&(9_999, 1)));
        assert!(!b.resolved.contains_key(&(0, 1)));
        assert!(b.sizes().1 <= RESOLVED_MAX);
    }

    #[test]
    fn an_unwound_stack_replaces_a_frame_pointer_one_not_the_reverse() {
        let mut b = StackBook::new();
        let fp = Resolved {
            method: Method::FramePointers,
            ..resolved("fp")
        };
        let unwound = Resolved {
            method: Method::Unwound,
            ..resolved("unwound")
        };
        b.upgrade((1, 1), fp.clone());
        b.upgrade((1, 1), unwound.clone());
        assert_eq!(b.resolved[&(1, 1)], Some(unwound.clone()));
        b.upgrade((1, 1), fp);
        assert_eq!(b.resolved[&(1, 1)], Some(unwound));
    }

    #[test]
    fn idle_flows_expire_with_their_stacks() {
        let mut b = StackBook::new();
        b.add(&count(1, 1, 1), (1, 1), 0);
        b.resolved.insert((1, 1), Some(resolved("x")));
        b.add(&count(2, 1, 1), (2, 2), FLOW_TTL_NS);
        b.expire(FLOW_TTL_NS + 1);
        assert_eq!(b.sizes(), (1, 0));
        b.expire(2 * FLOW_TTL_NS + 1);
        assert_eq!(b.sizes(), (0, 0));
    }
}

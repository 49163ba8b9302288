//! The thread that unwinds and symbolizes, off the service loop: reading
//! /proc/PID/maps and parsing a binary's DWARF can take tens of
//! milliseconds, and a tick must not wait on it. Jobs go through a bounded
//! queue (a full queue drops the job, counted); results come back on the
//! next poll.
use std::{
    collections::HashMap,
    sync::mpsc::{Receiver, SyncSender, sync_channel},
};

use detector_common::stack::Copy;

use super::{
    Frame, Method, Resolved, StackKey,
    symbolize::{Symbols, is_interpreter},
    unwind::{Mapping, Modules, read_mappings, unwind},
};

/// Jobs waiting at most.
const QUEUE: usize = 256;

/// Functions where a user stack begins: a walk that ends in one is whole.
const ROOTS: [&str; 5] = [
    "_start",
    "__libc_start_main",
    "__libc_start_call_main",
    "start_thread",
    "clone3",
];

pub struct Job {
    pub key: StackKey,
    pub pid: u32,
    /// The frame-pointer walk, innermost first (instruction pointer, then
    /// return addresses).
    pub frames: Vec<u64>,
}

/// What the worker is asked.
enum Msg {
    /// A copy just arrived: read the process's mappings now (it may be
    /// short-lived), keep them, unwind and symbolize.
    Copy(Box<Copy>),
    /// A counted stack without a usable copy: its frame-pointer walk.
    Resolve(Job),
    /// The process is gone for good: drop what is kept of it.
    Forget(u32),
}

/// What the worker answers.
pub enum Done {
    /// A copy of (pid, stack id), resolved.
    Copy((u32, u32), Resolved),
    /// A counted stack, resolved.
    Stack(StackKey, Resolved),
}

/// Processes whose mappings are kept (from their first copy) at most.
const SNAPSHOTS_MAX: usize = 512;

/// Mappings of flagged processes as read at their latest copy, so a
/// process that exits before its stacks are counted is still symbolized
/// (from the files' paths). Bounded: the oldest goes.
#[derive(Default)]
struct Snapshots {
    by_pid: HashMap<u32, (Vec<Mapping>, u64)>,
    next: u64,
}

impl Snapshots {
    fn put(&mut self, pid: u32, maps: Vec<Mapping>) {
        if !self.by_pid.contains_key(&pid)
            && self.by_pid.len() >= SNAPSHOTS_MAX
            && let Some(old) = self
                .by_pid
                .iter()
                .min_by_key(|(_, (_, n))| *n)
                .map(|(p, _)| *p)
        {
            self.by_pid.remove(&old);
        }
        self.next += 1;
        self.by_pid.insert(pid, (maps, self.next));
    }

    fn get(&self, pid: u32) -> Option<&[Mapping]> {
        self.by_pid.get(&pid).map(|(m, _)| m.as_slice())
    }
}

pub struct Worker {
    jobs: SyncSender<Msg>,
    results: Receiver<Done>,
}

impl Worker {
    pub fn start() -> Worker {
        let (jobs, rx) = sync_channel::<Msg>(QUEUE);
        let (tx, results) = sync_channel(QUEUE);
        std::thread::Builder::new()
            .name("stacks".into())
            .spawn(move || {
                let mut modules = Modules::default();
                let mut symbols = Symbols::default();
                let mut snapshots = Snapshots::default();
                for msg in rx {
                    let done = match msg {
                        Msg::Copy(c) => {
                            if let Ok(maps) = read_mappings(c.tgid) {
                                snapshots.put(c.tgid, maps);
                            }
                            let maps = snapshots.get(c.tgid);
                            let r =
                                resolve(c.tgid, &[], Some(&c), maps, &mut modules, &mut symbols);
                            Done::Copy((c.tgid, c.stack.saturating_sub(1)), r)
                        }
                        Msg::Resolve(job) => {
                            let maps = snapshots.get(job.pid);
                            let r = resolve(
                                job.pid,
                                &job.frames,
                                None,
                                maps,
                                &mut modules,
                                &mut symbols,
                            );
                            Done::Stack(job.key, r)
                        }
                        Msg::Forget(pid) => {
                            symbols.forget(pid);
                            snapshots.by_pid.remove(&pid);
                            continue;
                        }
                    };
                    if tx.send(done).is_err() {
                        break;
                    }
                }
            })
            .expect("spawning the stacks thread");
        Worker { jobs, results }
    }

    /// Queues a counted stack; false when the queue is full.
    pub fn send(&self, job: Job) -> bool {
        self.jobs.try_send(Msg::Resolve(job)).is_ok()
    }

    /// Queues a copy; false when the queue is full.
    pub fn send_copy(&self, copy: Box<Copy>) -> bool {
        self.jobs.try_send(Msg::Copy(copy)).is_ok()
    }

    pub fn forget(&self, pid: u32) {
        let _ = self.jobs.try_send(Msg::Forget(pid));
    }

    /// The jobs finished since the last call.
    pub fn results(&self) -> Vec<Done> {
        self.results.try_iter().collect()
    }
}

/// Lookup addresses of a frame-pointer walk: return addresses minus one.
fn fp_lookups(frames: &[u64]) -> Vec<u64> {
    frames
        .iter()
        .enumerate()
        .map(|(i, a)| if i == 0 { *a } else { a.saturating_sub(1) })
        .collect()
}

/// Unwinds the job's copy if it has one (with `maps`, the process's
/// mappings), else takes its frame-pointer walk; symbolizes either.
pub fn resolve(
    pid: u32,
    fp_frames: &[u64],
    copy: Option<&Copy>,
    maps: Option<&[Mapping]>,
    modules: &mut Modules,
    symbols: &mut Symbols,
) -> Resolved {
    let unwound = copy
        .zip(maps)
        .and_then(|(c, maps)| unwind(pid, c, maps, modules).ok())
        .filter(|u| u.addrs.len() >= 2);
    let (addrs, method, complete) = match unwound {
        Some(u) => (u.addrs, Method::Unwound, u.complete),
        None => (fp_lookups(fp_frames), Method::FramePointers, false),
    };
    let (frames, mut note) = match symbols.symbolize(pid, &addrs, maps) {
        Ok(f) => (f, None),
        Err(e) => (
            addrs
                .iter()
                .map(|a| Frame {
                    addr: *a,
                    ..Frame::default()
                })
                .collect(),
            Some(format!("not symbolized: {e}")),
        ),
    };
    let rooted = frames
        .last()
        .and_then(|f| f.function.as_deref())
        .is_some_and(|f| ROOTS.contains(&f));
    if note.is_none()
        && frames
            .iter()
            .any(|f| f.module.as_deref().is_some_and(is_interpreter))
    {
        note = Some(
            "interpreted code (Python, Node, JVM…): its own frames are not resolved, only the runtime's native ones (and JIT code the runtime lists in a perf map)"
                .into(),
        );
    }
    Resolved {
        frames,
        method,
        truncated: !(complete || rooted),
        note,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn return_addresses_are_looked_up_at_their_call() {
        assert_eq!(
            fp_lookups(&[0x1000, 0x2005, 0x3010]),
            [0x1000, 0x2004, 0x300f]
        );
    }

    /// This test's own stack, walked by the kernel-style frame list of its
    /// own return address: symbolizes to this crate's code.
    #[test]
    fn a_live_process_is_symbolized_with_file_and_line() {
        let here = a_live_process_is_symbolized_with_file_and_line as *const () as u64;
        let r = resolve(
            std::process::id(),
            &[here],
            None,
            None,
            &mut Modules::default(),
            &mut Symbols::default(),
        );
        assert_eq!(r.method, Method::FramePointers);
        assert!(r.truncated, "one frame, no root: {r:?}");
        let f = r.frames.last().expect("a frame");
        assert!(
            f.function
                .as_deref()
                .is_some_and(|n| n.contains("a_live_process_is_symbolized_with_file_and_line")),
            "{f:?}"
        );
        assert!(
            f.file.as_deref().is_some_and(|p| p.ends_with("worker.rs")),
            "{f:?}"
        );
    }
}

//! The thread that unwinds and symbolizes, off the service loop: reading
//! /proc/PID/maps and parsing a binary's DWARF can take tens of
//! milliseconds, and a tick must not wait on it. Jobs go through a bounded
//! queue (a full queue drops the job, counted); results come back on the
//! next poll.
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};

use detector_common::stack::Copy;

use super::{
    Frame, Method, Resolved, StackKey,
    symbolize::{Symbols, is_interpreter},
    unwind::{Modules, unwind},
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
    pub copy: Option<Box<Copy>>,
}

enum Msg {
    Resolve(Job),
    Forget(u32),
}

pub struct Worker {
    jobs: SyncSender<Msg>,
    results: Receiver<(StackKey, Resolved)>,
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
                for msg in rx {
                    match msg {
                        Msg::Resolve(job) => {
                            let r = resolve(&job, &mut modules, &mut symbols);
                            if tx.send((job.key, r)).is_err() {
                                break;
                            }
                        }
                        Msg::Forget(pid) => symbols.forget(pid),
                    }
                }
            })
            .expect("spawning the stacks thread");
        Worker { jobs, results }
    }

    /// Queues a job; false when the queue is full.
    pub fn send(&self, job: Job) -> bool {
        !matches!(
            self.jobs.try_send(Msg::Resolve(job)),
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_))
        )
    }

    pub fn forget(&self, pid: u32) {
        let _ = self.jobs.try_send(Msg::Forget(pid));
    }

    /// The jobs finished since the last call.
    pub fn results(&self) -> Vec<(StackKey, Resolved)> {
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

pub fn resolve(job: &Job, modules: &mut Modules, symbols: &mut Symbols) -> Resolved {
    let unwound = job
        .copy
        .as_deref()
        .and_then(|c| unwind(job.pid, c, modules).ok())
        .filter(|u| u.addrs.len() >= 2);
    let (addrs, method, complete) = match unwound {
        Some(u) => (u.addrs, Method::Unwound, u.complete),
        None => (fp_lookups(&job.frames), Method::FramePointers, false),
    };
    let (frames, mut note) = match symbols.symbolize(job.pid, &addrs) {
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
        let job = Job {
            key: (std::process::id(), 1),
            pid: std::process::id(),
            frames: vec![here],
            copy: None,
        };
        let r = resolve(&job, &mut Modules::default(), &mut Symbols::default());
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

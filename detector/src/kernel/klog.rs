//! Kernel-side anomalies, heard: the programs log them through aya-log
//! (rate-limited in the kernel to one line per kind per second per CPU)
//! and count them per kind in `STATS`.
//!
//! The log lines reach the process's `log` logger — in stormguard that is
//! tracing's (`tracing-subscriber` installs a `log` bridge when it is
//! initialised; it must be before [`super::Sensors::load`], which captures
//! the logger). aya-log 0.3's `EbpfLogger` starts no task of its own: it
//! must be flushed when its ring is readable. A small thread of our own
//! does that, so no caller has to (the service loop, `watch`, `doctor`
//! and the tests alike), and a stalled event loop cannot stall it. It
//! sleeps in `poll` and wakes for records or every 250 ms to check
//! whether the sensors are being dropped.
use std::{
    os::fd::AsRawFd as _,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
};

use aya::{Ebpf, maps::PerCpuArray};
use detector_common::anomaly;

use super::{KernelError, Sensors};

/// The thread forwarding the programs' log lines; stopped on drop.
pub(super) struct KernelLog {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// How long the reader sleeps between checks for a stop.
const POLL_MS: i32 = 250;

impl KernelLog {
    /// Takes the programs' log ring and starts forwarding it. Call after
    /// every program is loaded: aya cannot load a program whose map was
    /// taken and dropped. Err: the object has no log ring, or the thread
    /// could not start (the sensors work without it; only the lines are
    /// lost, the counts stay).
    pub fn start(ebpf: &mut Ebpf) -> Result<KernelLog, String> {
        let mut logger = aya_log::EbpfLogger::init(ebpf).map_err(|e| e.to_string())?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("sg-kernel-log".into())
            .spawn(move || {
                let fd = logger.as_raw_fd();
                loop {
                    let mut pfd = libc::pollfd {
                        fd,
                        events: libc::POLLIN,
                        revents: 0,
                    };
                    // SAFETY: one valid pollfd for the logger's ring fd,
                    // which `logger` keeps open for the whole loop.
                    unsafe { libc::poll(&mut pfd, 1, POLL_MS) };
                    // aya-log unwraps a record it cannot parse; ours are
                    // made by aya-log itself, but a panic here must not
                    // end the daemon.
                    let flushed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        logger.flush();
                    }));
                    if flushed.is_err() || stopping.load(Ordering::Relaxed) {
                        break;
                    }
                }
            })
            .map_err(|e| e.to_string())?;
        Ok(KernelLog {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for KernelLog {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// User-side anomaly: suspects (pids or cgroups) not written to the
/// kernel because its map was full or refused them.
pub const SUSPECTS_LEFT_OUT: &str = "suspects_left_out";

impl Sensors {
    /// Kernel-side anomalies so far, by kind (`detector_common::anomaly`
    /// names, in that order: ring_full, map_insert, unexpected_state,
    /// probe_error), then [`SUSPECTS_LEFT_OUT`] from user space. Each was
    /// also logged (rate-limited) when it happened.
    pub fn anomalies(&self) -> Result<Vec<(&'static str, u64)>, KernelError> {
        let map_err = |cause| KernelError::Map {
            name: "STATS",
            cause,
        };
        let stats: PerCpuArray<_, u64> =
            PerCpuArray::try_from(self.map("STATS")?).map_err(map_err)?;
        let mut out = Vec::with_capacity(anomaly::COUNT as usize + 1);
        for (kind, name) in anomaly::NAMES.iter().enumerate() {
            let n = stats.get(&(kind as u32), 0).map_err(map_err)?.iter().sum();
            out.push((*name, n));
        }
        out.push((SUSPECTS_LEFT_OUT, self.suspect_insert_failures));
        Ok(out)
    }
}

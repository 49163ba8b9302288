//! The incident writer: a thread that owns the database connection and
//! takes incidents from a bounded queue, so the service loop never waits on
//! SQLite. A full disk, a slow disk or a locked file then costs the
//! history (the store says "failing", writes wait and are retried), never
//! detection.
//!
//! Numbers are handed out here, in memory (from the highest ever stored),
//! so opening an incident needs no round trip. Pending writes are kept by
//! number, latest version only: an incident rewritten every second while
//! the disk is failing takes one slot, not one per second.
use std::{
    collections::BTreeMap,
    sync::{
        Arc, Mutex,
        mpsc::{self, RecvTimeoutError, SyncSender, TrySendError},
    },
    thread::JoinHandle,
    time::Duration,
};

use crate::{
    api::StoreHealthView,
    incident::{Incident, Sink, SinkError},
    store::{Store, StoreError},
};

/// Jobs the queue holds before writes are dropped (and counted).
pub const QUEUE_MAX: usize = 4_096;
/// Incidents the writer keeps while the disk fails; beyond it the oldest
/// numbers' pending versions are dropped (and counted).
pub const PENDING_MAX: usize = 4_096;
/// Longest wait between retries while writes fail.
const RETRY_MAX: Duration = Duration::from_secs(5);

enum Job {
    Put(Box<Incident>),
    Retain {
        now_ms: i64,
        retention_days: u32,
        max_incidents: u32,
    },
    /// Answered once everything before it was tried.
    Flush(mpsc::Sender<()>),
}

/// What the writer reports; read by the service loop for status.
#[derive(Default)]
struct Report {
    health: StoreHealthView,
    total: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum WriterError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot start the incident writer thread: {0}")]
    Thread(std::io::Error),
}

pub struct StoreWriter {
    tx: Option<SyncSender<Job>>,
    next: i64,
    report: Arc<Mutex<Report>>,
    /// Writes refused by a full queue (counted here: the writer never saw
    /// them).
    refused: u64,
    thread: Option<JoinHandle<()>>,
}

impl StoreWriter {
    /// Starts the writer on `store` (already open and checked).
    pub fn start(store: Store, queue: usize) -> Result<StoreWriter, WriterError> {
        let next = store.max_id()? + 1;
        let report = Arc::new(Mutex::new(Report {
            health: StoreHealthView::default(),
            total: store.total()?,
        }));
        let (tx, rx) = mpsc::sync_channel(queue);
        let shared = report.clone();
        let thread = std::thread::Builder::new()
            .name("sg-store".into())
            .spawn(move || run(store, rx, shared))
            .map_err(WriterError::Thread)?;
        Ok(StoreWriter {
            tx: Some(tx),
            next,
            report,
            refused: 0,
            thread: Some(thread),
        })
    }

    fn send(&mut self, job: Job) {
        let Some(tx) = &self.tx else { return };
        match tx.try_send(job) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => self.refused += 1,
        }
    }

    /// Deletes old incidents (in the background).
    pub fn retain(&mut self, now_ms: i64, retention_days: u32, max_incidents: u32) {
        self.send(Job::Retain {
            now_ms,
            retention_days,
            max_incidents,
        });
    }

    /// The store's health as of the last write.
    pub fn health(&self) -> StoreHealthView {
        let mut h = self
            .report
            .lock()
            .map(|r| r.health.clone())
            .unwrap_or_default();
        h.dropped_writes += self.refused;
        h
    }

    /// Incidents in the database as of the last successful write.
    pub fn total(&self) -> u64 {
        self.report.lock().map(|r| r.total).unwrap_or(0)
    }

    /// Waits up to `bound` for everything queued to be tried; true if it
    /// was.
    pub fn flush(&mut self, bound: Duration) -> bool {
        let Some(tx) = &self.tx else { return false };
        let start = std::time::Instant::now();
        let (done, wait) = mpsc::channel();
        // Unlike writes, a flush waits for room in the queue: it is only
        // asked for at exit and in tests, never on the service loop's path.
        let mut job = Job::Flush(done);
        loop {
            match tx.try_send(job) {
                Ok(()) => break,
                Err(TrySendError::Full(j)) if start.elapsed() < bound => {
                    job = j;
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(_) => return false,
            }
        }
        wait.recv_timeout(bound.saturating_sub(start.elapsed()))
            .is_ok()
    }

    /// Writes what is queued (waiting up to `bound`) and stops the thread.
    pub fn close(mut self, bound: Duration) -> bool {
        let flushed = self.flush(bound);
        self.tx = None;
        if flushed && let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        flushed
    }
}

impl Sink for StoreWriter {
    fn insert(&mut self, inc: &Incident) -> Result<i64, SinkError> {
        let n = self.next;
        self.next += 1;
        let mut inc = inc.clone();
        inc.set_number(n);
        self.send(Job::Put(Box::new(inc)));
        Ok(n)
    }

    fn update(&mut self, inc: &Incident) -> Result<(), SinkError> {
        self.send(Job::Put(Box::new(inc.clone())));
        Ok(())
    }
}

/// The writer thread: waits for work, takes everything queued, writes it,
/// and on failure keeps it and retries with backoff.
fn run(store: Store, rx: mpsc::Receiver<Job>, report: Arc<Mutex<Report>>) {
    let mut pending: BTreeMap<i64, Incident> = BTreeMap::new();
    let mut retain: Option<(i64, u32, u32)> = None;
    let mut flushes: Vec<mpsc::Sender<()>> = Vec::new();
    let mut dropped = 0u64;
    let mut backoff = Duration::from_millis(100);
    let mut open = true;
    while open || !pending.is_empty() {
        let first = if pending.is_empty() && retain.is_none() {
            rx.recv().map_err(|_| RecvTimeoutError::Disconnected)
        } else {
            rx.recv_timeout(backoff)
        };
        let mut take = |job: Job| match job {
            Job::Put(inc) => {
                pending.insert(inc.number, *inc);
                if pending.len() > PENDING_MAX {
                    pending.pop_first();
                    dropped += 1;
                }
            }
            Job::Retain {
                now_ms,
                retention_days,
                max_incidents,
            } => retain = Some((now_ms, retention_days, max_incidents)),
            Job::Flush(done) => flushes.push(done),
        };
        match first {
            Ok(job) => take(job),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => open = false,
        }
        while let Ok(job) = rx.try_recv() {
            take(job);
        }
        let result = write(&store, &mut pending).and_then(|()| {
            if let Some((now, days, max)) = retain.take() {
                store.retain(now, days, max)?;
            }
            store.total()
        });
        if let Ok(mut r) = report.lock() {
            r.health.queued = pending.len() as u64;
            r.health.dropped_writes = dropped;
            match &result {
                Ok(total) => {
                    if r.health.is_failing() {
                        tracing::info!("incident store: writes succeed again");
                    }
                    r.health.state = "ok".into();
                    r.total = *total;
                }
                Err(e) => {
                    if !r.health.is_failing() {
                        tracing::warn!(error = %e, "incident store failing; detection goes on, writes are retried");
                    }
                    r.health.state = "failing".into();
                    r.health.last_error = Some(e.to_string());
                }
            }
        }
        backoff = if result.is_ok() {
            Duration::from_millis(100)
        } else {
            (backoff * 2).min(RETRY_MAX)
        };
        for done in flushes.drain(..) {
            let _ = done.send(());
        }
        if !open && result.is_err() {
            // Stopping with a failing disk: what is pending is lost; say so.
            tracing::warn!(
                pending = pending.len(),
                "incident store: stopping with unwritten incidents"
            );
            break;
        }
    }
}

/// Writes pending incidents, oldest number first, removing each once
/// written; stops at the first error (the rest wait for the retry).
fn write(store: &Store, pending: &mut BTreeMap<i64, Incident>) -> Result<(), StoreError> {
    while let Some((&n, inc)) = pending.first_key_value() {
        store.put(inc)?;
        pending.remove(&n);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh directory per test (removed at the end of each).
    fn tmp() -> std::path::PathBuf {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("sg-writer-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn incident(pid: u32) -> Incident {
        let subject = crate::detect::Subject::Flow {
            pid,
            dest: crate::detect::synthetic::dest(1),
        };
        let mut procs = crate::ingest::procs::ProcessTable::new("/nonexistent", 16);
        crate::incident::identify(&subject, "x".into(), "x", &mut procs, 0)
    }

    #[test]
    fn numbers_continue_after_the_highest_stored_and_writes_land() {
        let dir = tmp();
        let path = dir.join("db.sqlite");
        {
            let store = Store::open(&path).unwrap();
            for pid in 0..3 {
                store.insert(&incident(pid)).unwrap();
            }
        }
        let mut w = StoreWriter::start(Store::open(&path).unwrap(), QUEUE_MAX).unwrap();
        let n = w.insert(&incident(10)).unwrap();
        assert_eq!(n, 4);
        let mut inc = incident(10);
        inc.set_number(n);
        inc.active = false;
        w.update(&inc).unwrap();
        assert!(w.close(Duration::from_secs(10)));
        let store = Store::open(&path).unwrap();
        assert_eq!(store.total().unwrap(), 4);
        let got = store.get(4).unwrap().unwrap();
        assert!(!got.active);
        assert_eq!(got.pid, Some(10));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_full_queue_drops_and_counts_never_blocks() {
        let dir = tmp();
        let path = dir.join("db.sqlite");
        // A queue of 1 and a writer busy on a locked database: sends
        // beyond what fits are refused at once.
        let mut w = StoreWriter::start(Store::open(&path).unwrap(), 1).unwrap();
        let locker = rusqlite::Connection::open(&path).unwrap();
        locker.execute_batch("BEGIN EXCLUSIVE").unwrap();
        let t0 = std::time::Instant::now();
        for pid in 0..1_000 {
            w.insert(&incident(pid)).unwrap();
        }
        assert!(t0.elapsed() < Duration::from_secs(1), "{:?}", t0.elapsed());
        let h = w.health();
        assert!(h.dropped_writes >= 990, "{h:?}");
        locker.execute_batch("ROLLBACK").unwrap();
        assert!(w.close(Duration::from_secs(30)));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

//! Alerts on one host without a fleet: `[[notify]]` tables run a command or
//! POST to a webhook when a storm starts (an incident opens) and when it
//! ends (the incident closes: resolved, merged into a group incident, or
//! the daemon stopped).
//!
//! # Never in detection's way
//!
//! The service loop only *hands* events over: [`Handle::send`] is a
//! `try_send` into a bounded queue ([`QUEUE`]); when it is full the event is
//! dropped and counted (`stormguard_notify_dropped_total`), never waited
//! for. Everything slow — starting processes, connecting, waiting for a
//! receiver that hangs, backing off between retries — happens on a thread
//! and runtime of its own (`sg-notify`), each notifier in its own task with
//! its own bounded queue, so a hanging webhook delays neither the loop nor
//! the other notifiers.
//!
//! # What a receiver gets
//!
//! The same JSON body for a command (on its stdin) and a webhook (the POST
//! body, `Content-Type: application/json`): the event, the host, and the
//! incident exactly as the API returns it (`stormguard explain --json`):
//!
//! ```json
//! {"event":"start","host":"web-1","incident":{"id":"inc-7","pid":4242,
//!  "comm":"api","destination":"10.0.0.5:5432","active":true,...}}
//! ```
//!
//! An `end` carries the incident as closed (`active: false`, `ended_at`,
//! `end_reason`: "resolved", "merged into inc-N", "daemon stopped").
//!
//! # Commands are argv, never a shell line
//!
//! `command = ["/usr/local/bin/page-me", "--team", "sre"]` is executed
//! directly (no `sh -c`): nothing from the traffic (a process name, a
//! command line, a cgroup path) is ever interpreted; it arrives as JSON on
//! stdin. `argv[0]` must be an absolute path to an executable (checked at
//! load), not a name looked up in `PATH`: the daemon's `PATH` under systemd
//! is not the one of the shell that ran `stormguard config check`. The
//! environment is cleared but for a fixed `PATH`, `STORMGUARD_EVENT` and
//! `STORMGUARD_INCIDENT`; the working directory is `/`. The command runs in
//! a process group of its own, killed (SIGKILL) at the timeout. Its stdout
//! and stderr are read (at most [`OUTPUT_READ_MAX`] bytes kept, the rest
//! drained) and logged cut to [`OUTPUT_SHOWN`] bytes. A non-zero exit or a
//! timeout is a failed attempt.
//!
//! # Webhooks are plain HTTP
//!
//! Only `http://` URLs: the tree has no TLS client, and the daemon runs as
//! root, so a TLS stack for one feature is not worth its weight. Point it
//! at a local relay (127.0.0.1) that forwards to wherever alerts go;
//! `https://` is refused at load with a message that says so. A 2xx status
//! is success; any other status, a connection error or the timeout is a
//! failed attempt.
//!
//! # Retries, rate limit
//!
//! A failed attempt is retried up to `retries` times after [`backoff`]
//! (1 s, 2 s, 4 s, … capped at [`BACKOFF_CAP`]); an event whose every
//! attempt failed is counted in `stormguard_notify_failed_total`, one that
//! got through in `stormguard_notify_sent_total`.
//!
//! `min_interval` limits *pages*, not events (see [`Gate`]): a start within
//! `min_interval` of the last start this notifier delivered is dropped
//! (counted in `stormguard_notify_dropped_total`, logged), and so is that
//! incident's end later; the end of an incident whose start was delivered
//! is always delivered. So a receiver never gets an end without its start,
//! nor is left with a start whose end was rate-limited away. Dropped, not
//! coalesced: a batch would need a second JSON shape, and the incident list
//! (`stormguard incidents`) has what was not paged.
//!
//! # At exit
//!
//! The daemon closes its open incidents ("daemon stopped"), hands their
//! ends over, and waits at most 5 s for the queues to empty (a hanging
//! receiver must not hold the stop past systemd's timeout); what is left
//! is abandoned and logged.
use std::{
    collections::{HashSet, VecDeque},
    path::Path,
    sync::Arc,
    time::{Duration, Instant},
};

use prometheus_client::metrics::counter::Counter;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::incident::{Incident, Sink, SinkError};

mod config;
mod deliver;
mod pace;

pub use config::*;
pub use deliver::*;
pub use pace::*;

/// The notify counters (the daemon's are registered in `metrics`).
#[derive(Debug, Clone, Default)]
pub struct Counters {
    /// Events delivered (an attempt succeeded).
    pub sent: Counter,
    /// Events given up on after every attempt failed.
    pub failed: Counter,
    /// Events never attempted: a queue was full, or rate-limited.
    pub dropped: Counter,
}

/// One event for the notify thread.
#[derive(Debug)]
struct Event {
    kind: EventKind,
    incident: Incident,
}

/// The body every receiver gets.
#[derive(Serialize)]
struct Payload<'a> {
    event: EventKind,
    host: &'a str,
    incident: &'a Incident,
}

/// One event for one notifier, serialized once.
#[derive(Debug, Clone)]
struct Job {
    kind: EventKind,
    id: String,
    body: Arc<String>,
}

/// The service loop's side: hands events to the notify thread.
pub struct Handle {
    tx: Option<mpsc::Sender<Event>>,
    counters: Counters,
    done: std::sync::mpsc::Receiver<()>,
    /// Drops not yet logged, and when the last line was.
    unlogged_drops: u64,
    last_drop_log: Option<Instant>,
}

impl Handle {
    /// Hands an event over without waiting; a full queue drops it (counted,
    /// logged at most every 10 s).
    pub fn send(&mut self, kind: EventKind, incident: &Incident) {
        let Some(tx) = &self.tx else { return };
        let ev = Event {
            kind,
            incident: incident.clone(),
        };
        if tx.try_send(ev).is_err() {
            self.counters.dropped.inc();
            self.unlogged_drops += 1;
            if self
                .last_drop_log
                .is_none_or(|t| t.elapsed() >= Duration::from_secs(10))
            {
                tracing::warn!(
                    dropped = self.unlogged_drops,
                    "notifications dropped: the notify queue is full (receivers too slow)"
                );
                self.unlogged_drops = 0;
                self.last_drop_log = Some(Instant::now());
            }
        }
    }

    /// Stops taking events and waits at most `grace` for those queued (the
    /// ends of "daemon stopped") to be delivered; false if some were not.
    pub fn finish(mut self, grace: Duration) -> bool {
        self.tx = None;
        match self.done.recv_timeout(grace) {
            Ok(()) | Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => true,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => false,
        }
    }
}

/// Starts the notify thread for the configured tables; None when there
/// are none. The tables must have been checked ([`resolve_all`]).
pub fn start(tables: &[NotifyConfig], counters: Counters) -> anyhow::Result<Option<Handle>> {
    use anyhow::Context as _;
    if tables.is_empty() {
        return Ok(None);
    }
    let notifiers = resolve_all(tables)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the notify runtime")?;
    let (tx, rx) = mpsc::channel(QUEUE);
    let (done_tx, done) = std::sync::mpsc::channel();
    let host = hostname();
    let c = counters.clone();
    std::thread::Builder::new()
        .name("sg-notify".into())
        .spawn(move || {
            rt.block_on(dispatch(notifiers, rx, c, host));
            let _ = done_tx.send(());
        })
        .context("starting the notify thread")?;
    Ok(Some(Handle {
        tx: Some(tx),
        counters,
        done,
        unlogged_drops: 0,
        last_drop_log: None,
    }))
}

/// The host's name, for the payload ("" if unknown).
fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes into buf.
    if unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } != 0 {
        return String::new();
    }
    let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

/// Serializes each event once and hands it to the notifiers that want it.
async fn dispatch(
    notifiers: Vec<Notifier>,
    mut rx: mpsc::Receiver<Event>,
    counters: Counters,
    host: String,
) {
    let mut queues = Vec::new();
    let mut tasks = Vec::new();
    for n in notifiers {
        let (tx, q) = mpsc::channel(QUEUE);
        queues.push((n.on_start, n.on_end, n.name(), tx));
        tasks.push(tokio::spawn(run_notifier(n, q, counters.clone())));
    }
    while let Some(ev) = rx.recv().await {
        let body = match serde_json::to_string(&Payload {
            event: ev.kind,
            host: &host,
            incident: &ev.incident,
        }) {
            Ok(b) => Arc::new(b),
            Err(e) => {
                tracing::warn!(error = %e, incident = %ev.incident.id, "cannot serialize a notification");
                continue;
            }
        };
        for (on_start, on_end, name, q) in &queues {
            let wanted = match ev.kind {
                EventKind::Start => *on_start,
                EventKind::End => *on_end,
            };
            if !wanted {
                continue;
            }
            let job = Job {
                kind: ev.kind,
                id: ev.incident.id.clone(),
                body: body.clone(),
            };
            if q.try_send(job).is_err() {
                counters.dropped.inc();
                tracing::warn!(notifier = %name, incident = %ev.incident.id, event = ev.kind.as_str(),
                    "notification dropped: this notifier's queue is full");
            }
        }
    }
    drop(queues);
    for t in tasks {
        let _ = t.await;
    }
}

/// One notifier: its events in order, each through the gate, then tried
/// with retries.
async fn run_notifier(n: Notifier, mut q: mpsc::Receiver<Job>, counters: Counters) {
    let name = n.name();
    let mut gate = Gate::new(n.min_interval, n.on_start && n.on_end);
    while let Some(job) = q.recv().await {
        if gate.admit(job.kind, &job.id, Instant::now()) == Admit::RateLimited {
            counters.dropped.inc();
            tracing::info!(notifier = %name, incident = %job.id, event = job.kind.as_str(),
                "notification not sent: min_interval");
            continue;
        }
        let mut retry = 0;
        loop {
            let started = Instant::now();
            match attempt(&n, &job).await {
                Ok(detail) => {
                    counters.sent.inc();
                    tracing::info!(notifier = %name, incident = %job.id, event = job.kind.as_str(),
                        took_ms = started.elapsed().as_millis() as u64, "notified{detail}");
                    break;
                }
                Err(e) if retry < n.retries => {
                    retry += 1;
                    let wait = backoff(retry);
                    tracing::warn!(notifier = %name, incident = %job.id, event = job.kind.as_str(),
                        error = %e, "notification failed; retry {retry}/{} in {wait:?}", n.retries);
                    tokio::time::sleep(wait).await;
                }
                Err(e) => {
                    counters.failed.inc();
                    tracing::warn!(notifier = %name, incident = %job.id, event = job.kind.as_str(),
                        error = %e, attempts = retry + 1, "notification failed; given up");
                    break;
                }
            }
        }
    }
}

/// A [`Sink`] in front of the store that keeps the incidents it sees
/// closed (an update with `active: false` and an end time: resolved,
/// merged, daemon stopped), so that the daemon can send their end events
/// after the starts of the same tick. Not a change to the tracker: every
/// close already goes through the sink.
pub struct EndTap<'a> {
    pub inner: &'a mut dyn Sink,
    /// Whether to keep them (no notifier: nothing is cloned).
    pub keep: bool,
    pub ended: Vec<Incident>,
}

impl<'a> EndTap<'a> {
    pub fn new(inner: &'a mut dyn Sink, keep: bool) -> EndTap<'a> {
        EndTap {
            inner,
            keep,
            ended: Vec::new(),
        }
    }
}

impl Sink for EndTap<'_> {
    fn insert(&mut self, inc: &Incident) -> Result<i64, SinkError> {
        self.inner.insert(inc)
    }

    fn update(&mut self, inc: &Incident) -> Result<(), SinkError> {
        // Closed whether or not the store keeps it: the tracker has let it go.
        if self.keep && !inc.active && inc.ended_at.is_some() {
            self.ended.push(inc.clone());
        }
        self.inner.update(inc)
    }
}

#[cfg(test)]
mod tests;

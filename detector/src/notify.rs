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

/// Most `[[notify]]` tables.
pub const MAX_NOTIFIERS: usize = 16;
/// Events waiting for the notify thread; beyond, dropped and counted. Each
/// notifier's own queue has the same bound.
pub const QUEUE: usize = 64;
/// Allowed `timeout` per attempt, inclusive.
pub const TIMEOUT_MIN: Duration = Duration::from_millis(100);
pub const TIMEOUT_MAX: Duration = Duration::from_secs(60);
/// Longest `min_interval`.
pub const MIN_INTERVAL_MAX: Duration = Duration::from_secs(3600);
/// Most `retries`.
pub const RETRIES_MAX: u32 = 10;
/// First wait before a retry; doubled each retry up to [`BACKOFF_CAP`].
pub const BACKOFF_FIRST: Duration = Duration::from_secs(1);
pub const BACKOFF_CAP: Duration = Duration::from_secs(30);
/// Bytes of a command's stdout or stderr kept; the rest is read and dropped
/// (so the command never blocks on a full pipe).
pub const OUTPUT_READ_MAX: usize = 64 * 1024;
/// Bytes of a command's output (or a webhook's error) shown in the log.
pub const OUTPUT_SHOWN: usize = 512;
/// `PATH` of a command notifier (its environment is otherwise cleared).
pub const COMMAND_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// Incidents whose start was rate-limited, remembered so that their end is
/// dropped too (oldest forgotten first).
const SUPPRESSED_MAX: usize = 1024;

/// One `[[notify]]` table, as written. Durations are humantime strings
/// ("5s", "500ms", "1m"), checked by [`NotifyConfig::resolve`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NotifyConfig {
    /// argv of a command to run (absolute path first); the event JSON on
    /// its stdin.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub command: Option<Vec<String>>,
    /// `http://host[:port]/path` to POST the event JSON to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub webhook: Option<String>,
    /// Which events: "start", "end".
    pub on: Vec<String>,
    /// Per attempt.
    pub timeout: String,
    /// At most one page per this interval ("0s": no limit).
    pub min_interval: String,
    /// Attempts after the first one fails.
    pub retries: u32,
}

impl Default for NotifyConfig {
    fn default() -> Self {
        NotifyConfig {
            command: None,
            webhook: None,
            on: vec!["start".into(), "end".into()],
            timeout: "5s".into(),
            min_interval: "0s".into(),
            retries: 3,
        }
    }
}

/// Why the `[[notify]]` tables were refused; the message names the table
/// (1-based, in file order), the field and what to do.
#[derive(Debug, thiserror::Error)]
pub enum NotifyConfigError {
    #[error(
        "{0} [[notify]] tables: at most {MAX_NOTIFIERS}; send to one relay that fans out instead"
    )]
    TooMany(usize),
    #[error("[[notify]] #{index}: {field}: {problem}")]
    Field {
        index: usize,
        field: &'static str,
        problem: String,
    },
}

/// The event a notifier is told about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EventKind {
    /// An incident opened.
    Start,
    /// An incident closed.
    End,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Start => "start",
            EventKind::End => "end",
        }
    }
}

/// Where a notifier sends.
#[derive(Debug, Clone, PartialEq)]
pub enum Target {
    /// argv, `argv[0]` absolute.
    Command(Vec<String>),
    /// An `http://` URL, split for the connection.
    Webhook {
        url: String,
        host: String,
        port: u16,
        /// Path and query, at least "/".
        path: String,
    },
}

/// A checked `[[notify]]` table.
#[derive(Debug, Clone, PartialEq)]
pub struct Notifier {
    /// 1-based position in the file, for logs.
    pub index: usize,
    pub target: Target,
    pub on_start: bool,
    pub on_end: bool,
    pub timeout: Duration,
    pub min_interval: Duration,
    pub retries: u32,
}

impl Notifier {
    /// For logs: which table, what kind, where (a webhook's host and port
    /// only: its path may hold a token).
    pub fn name(&self) -> String {
        match &self.target {
            Target::Command(argv) => format!("#{} command {}", self.index, argv[0]),
            Target::Webhook { host, port, .. } => {
                format!("#{} webhook {host}:{port}", self.index)
            }
        }
    }

    pub fn wants(&self, kind: EventKind) -> bool {
        match kind {
            EventKind::Start => self.on_start,
            EventKind::End => self.on_end,
        }
    }
}

fn duration(
    index: usize,
    field: &'static str,
    text: &str,
    lo: Duration,
    hi: Duration,
) -> Result<Duration, NotifyConfigError> {
    let bad = |problem: String| NotifyConfigError::Field {
        index,
        field,
        problem,
    };
    let d = humantime::parse_duration(text.trim()).map_err(|e| {
        bad(format!(
            "{text:?} is not a duration ({e}); write e.g. \"5s\""
        ))
    })?;
    if d < lo || d > hi {
        return Err(bad(format!(
            "{text:?} is out of range: must be {} to {}",
            humantime::format_duration(lo),
            humantime::format_duration(hi)
        )));
    }
    Ok(d)
}

impl NotifyConfig {
    /// Checks the table (text only; see [`check_commands`] for the files)
    /// and resolves it. `index` is 1-based.
    pub fn resolve(&self, index: usize) -> Result<Notifier, NotifyConfigError> {
        let bad = |field: &'static str, problem: String| NotifyConfigError::Field {
            index,
            field,
            problem,
        };
        let target = match (&self.command, &self.webhook) {
            (None, None) => {
                return Err(bad(
                    "command/webhook",
                    "neither is set; give command = [\"/absolute/path\", \"arg\", ...] or \
                     webhook = \"http://host:port/path\""
                        .into(),
                ));
            }
            (Some(_), Some(_)) => {
                return Err(bad(
                    "command/webhook",
                    "both are set; give one per [[notify]] table (add another table for the other)"
                        .into(),
                ));
            }
            (Some(argv), None) => {
                let Some(first) = argv.first() else {
                    return Err(bad(
                        "command",
                        "is empty; give the program's absolute path first, e.g. \
                         [\"/usr/local/bin/page-me\", \"--team\", \"sre\"]"
                            .into(),
                    ));
                };
                if !first.starts_with('/') {
                    return Err(bad(
                        "command",
                        format!(
                            "{first:?} is not an absolute path; give the full path (it is run \
                             without a shell and without a PATH lookup), e.g. \"/usr/bin/{}\"",
                            first.rsplit('/').next().unwrap_or(first)
                        ),
                    ));
                }
                if argv.iter().any(|a| a.contains('\0')) {
                    return Err(bad("command", "an argument contains a NUL byte".into()));
                }
                Target::Command(argv.clone())
            }
            (None, Some(url)) => webhook(url).map_err(|p| bad("webhook", p))?,
        };
        if self.on.is_empty() {
            return Err(bad(
                "on",
                "is empty, so it would never notify; give [\"start\"], [\"end\"] or both".into(),
            ));
        }
        for o in &self.on {
            if o != "start" && o != "end" {
                return Err(bad(
                    "on",
                    format!("{o:?} is not an event; the events are \"start\" and \"end\""),
                ));
            }
        }
        if self.retries > RETRIES_MAX {
            return Err(bad(
                "retries",
                format!(
                    "{} is out of range: must be 0..={RETRIES_MAX}",
                    self.retries
                ),
            ));
        }
        Ok(Notifier {
            index,
            target,
            on_start: self.on.iter().any(|o| o == "start"),
            on_end: self.on.iter().any(|o| o == "end"),
            timeout: duration(index, "timeout", &self.timeout, TIMEOUT_MIN, TIMEOUT_MAX)?,
            min_interval: duration(
                index,
                "min_interval",
                &self.min_interval,
                Duration::ZERO,
                MIN_INTERVAL_MAX,
            )?,
            retries: self.retries,
        })
    }
}

/// Splits an `http://` URL; the error says what to write instead.
fn webhook(url: &str) -> Result<Target, String> {
    let uri: hyper::Uri = url.parse().map_err(|e| {
        format!("{url:?} is not a URL ({e}); write e.g. \"http://127.0.0.1:9000/hook\"")
    })?;
    match uri.scheme_str() {
        Some("http") => {}
        Some("https") => {
            return Err(format!(
                "{url:?}: https is not supported (stormguard has no TLS client); POST to a \
                 local relay over http://, e.g. \"http://127.0.0.1:9000/hook\", that forwards it"
            ));
        }
        _ => {
            return Err(format!(
                "{url:?} is not an http:// URL; write e.g. \"http://127.0.0.1:9000/hook\""
            ));
        }
    }
    let Some(authority) = uri.authority() else {
        return Err(format!("{url:?} has no host"));
    };
    if authority.as_str().contains('@') {
        return Err(format!(
            "{url:?}: credentials in the URL are not supported (they would be logged and sent \
             in clear); use a token in the path of a local relay"
        ));
    }
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']');
    if host.is_empty() {
        return Err(format!("{url:?} has no host"));
    }
    Ok(Target::Webhook {
        url: url.to_string(),
        host: host.to_string(),
        port: authority.port_u16().unwrap_or(80),
        path: uri
            .path_and_query()
            .map(|p| p.as_str().to_string())
            .filter(|p| !p.is_empty())
            .unwrap_or_else(|| "/".into()),
    })
}

/// Checks and resolves every table.
pub fn resolve_all(tables: &[NotifyConfig]) -> Result<Vec<Notifier>, NotifyConfigError> {
    if tables.len() > MAX_NOTIFIERS {
        return Err(NotifyConfigError::TooMany(tables.len()));
    }
    tables
        .iter()
        .enumerate()
        .map(|(i, t)| t.resolve(i + 1))
        .collect()
}

/// Checks on the filesystem that each command's `argv[0]` is an executable
/// file (at load and in `config check`: a typo must stop the start, not
/// surface at the first storm).
pub fn check_commands(tables: &[NotifyConfig]) -> Result<(), NotifyConfigError> {
    use std::os::unix::fs::PermissionsExt as _;
    for (i, t) in tables.iter().enumerate() {
        let Some(first) = t.command.as_ref().and_then(|c| c.first()) else {
            continue;
        };
        let bad = |problem: String| NotifyConfigError::Field {
            index: i + 1,
            field: "command",
            problem,
        };
        match std::fs::metadata(Path::new(first)) {
            Ok(m) if m.is_file() && m.permissions().mode() & 0o111 != 0 => {}
            Ok(m) if m.is_file() => {
                return Err(bad(format!("{first:?} is not executable; chmod +x it")));
            }
            Ok(_) => return Err(bad(format!("{first:?} is not a file"))),
            Err(e) => {
                return Err(bad(format!(
                    "{first:?}: {e}; give the absolute path of an executable"
                )));
            }
        }
    }
    Ok(())
}

/// The wait before retry number `retry` (1-based): 1 s, 2 s, 4 s, …,
/// at most [`BACKOFF_CAP`].
pub fn backoff(retry: u32) -> Duration {
    let shift = retry.saturating_sub(1).min(16);
    BACKOFF_FIRST.saturating_mul(1 << shift).min(BACKOFF_CAP)
}

/// What a [`Gate`] says about an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    Send,
    /// Within `min_interval` of the last page, or the end of an incident
    /// whose start was rate-limited.
    RateLimited,
}

/// A notifier's rate limit. It limits pages: the first event of an
/// incident this notifier takes (its start, or its end for a notifier
/// that takes ends only) is sent if `min_interval` has passed since the
/// last one sent; an end follows its start's fate. The clock is passed in.
#[derive(Debug)]
pub struct Gate {
    min_interval: Duration,
    /// Ends follow starts (the notifier takes both).
    paired: bool,
    last: Option<Instant>,
    suppressed: HashSet<String>,
    suppressed_order: VecDeque<String>,
}

impl Gate {
    pub fn new(min_interval: Duration, paired: bool) -> Gate {
        Gate {
            min_interval,
            paired,
            last: None,
            suppressed: HashSet::new(),
            suppressed_order: VecDeque::new(),
        }
    }

    pub fn admit(&mut self, kind: EventKind, incident: &str, now: Instant) -> Admit {
        if self.paired && kind == EventKind::End {
            return if self.suppressed.remove(incident) {
                self.suppressed_order.retain(|i| i != incident);
                Admit::RateLimited
            } else {
                Admit::Send
            };
        }
        let open = self
            .last
            .is_none_or(|t| now.saturating_duration_since(t) >= self.min_interval);
        if open {
            self.last = Some(now);
            return Admit::Send;
        }
        if self.paired && self.suppressed.insert(incident.to_string()) {
            self.suppressed_order.push_back(incident.to_string());
            if self.suppressed_order.len() > SUPPRESSED_MAX
                && let Some(old) = self.suppressed_order.pop_front()
            {
                self.suppressed.remove(&old);
            }
        }
        Admit::RateLimited
    }
}

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

/// Why one attempt failed.
#[derive(Debug, thiserror::Error)]
pub enum AttemptError {
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("cannot start: {0}")]
    Spawn(std::io::Error),
    #[error("{status}; stderr: {stderr:?}")]
    Exit { status: String, stderr: String },
    #[error("cannot connect: {0}")]
    Connect(std::io::Error),
    #[error("HTTP: {0}")]
    Http(String),
    #[error("HTTP status {0}")]
    Status(u16),
}

async fn attempt(n: &Notifier, job: &Job) -> Result<String, AttemptError> {
    match &n.target {
        Target::Command(argv) => run_command(argv, job, n.timeout).await,
        Target::Webhook {
            host, port, path, ..
        } => post(host, *port, path, job, n.timeout).await,
    }
}

/// `s` cut to [`OUTPUT_SHOWN`] bytes (at a character boundary), lossy.
fn shown(bytes: &[u8]) -> String {
    let s = String::from_utf8_lossy(bytes);
    let s = s.trim();
    if s.len() <= OUTPUT_SHOWN {
        return s.to_string();
    }
    let mut end = OUTPUT_SHOWN;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

/// Reads a pipe to its end, keeping at most [`OUTPUT_READ_MAX`] bytes.
async fn read_capped(pipe: Option<impl tokio::io::AsyncRead + Unpin>) -> Vec<u8> {
    use tokio::io::AsyncReadExt as _;
    let mut kept = Vec::new();
    let Some(mut pipe) = pipe else { return kept };
    let mut buf = [0u8; 4096];
    loop {
        match pipe.read(&mut buf).await {
            Ok(0) | Err(_) => return kept,
            Ok(n) => {
                let room = OUTPUT_READ_MAX.saturating_sub(kept.len());
                kept.extend_from_slice(&buf[..n.min(room)]);
            }
        }
    }
}

async fn run_command(
    argv: &[String],
    job: &Job,
    timeout: Duration,
) -> Result<String, AttemptError> {
    use std::process::Stdio;
    use tokio::io::AsyncWriteExt as _;
    let mut cmd = tokio::process::Command::new(&argv[0]);
    cmd.args(&argv[1..])
        .env_clear()
        .env("PATH", COMMAND_PATH)
        .env("STORMGUARD_EVENT", job.kind.as_str())
        .env("STORMGUARD_INCIDENT", &job.id)
        .current_dir("/")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        // Its own group, so the timeout kills what it started too.
        .process_group(0);
    let mut child = cmd.spawn().map_err(AttemptError::Spawn)?;
    let pid = child.id();
    let stdin = child.stdin.take();
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    let body = job.body.clone();
    let work = async {
        let write = async move {
            if let Some(mut s) = stdin {
                // A command that does not read its stdin is not an error.
                let _ = s.write_all(body.as_bytes()).await;
                let _ = s.shutdown().await;
            }
        };
        let (_, out, err, status) = tokio::join!(
            write,
            read_capped(stdout),
            read_capped(stderr),
            child.wait()
        );
        (out, err, status)
    };
    let done = tokio::time::timeout(timeout, work).await;
    match done {
        Ok((out, err, Ok(status))) if status.success() => {
            let mut detail = String::new();
            if !out.is_empty() {
                detail.push_str(&format!("; stdout: {:?}", shown(&out)));
            }
            if !err.is_empty() {
                detail.push_str(&format!("; stderr: {:?}", shown(&err)));
            }
            Ok(detail)
        }
        Ok((_, err, Ok(status))) => Err(AttemptError::Exit {
            status: status.to_string(),
            stderr: shown(&err),
        }),
        Ok((_, _, Err(e))) => Err(AttemptError::Spawn(e)),
        Err(_) => {
            if let Some(pid) = pid {
                // SAFETY: signalling the process group we created.
                unsafe { libc::kill(-(pid as i32), libc::SIGKILL) };
            }
            let _ = child.start_kill();
            let _ = tokio::time::timeout(Duration::from_secs(1), child.wait()).await;
            Err(AttemptError::Timeout(timeout))
        }
    }
}

async fn post(
    host: &str,
    port: u16,
    path: &str,
    job: &Job,
    timeout: Duration,
) -> Result<String, AttemptError> {
    let work = async {
        let stream = tokio::net::TcpStream::connect((host, port))
            .await
            .map_err(AttemptError::Connect)?;
        let io = hyper_util::rt::TokioIo::new(stream);
        let (mut send, conn) = hyper::client::conn::http1::handshake::<_, String>(io)
            .await
            .map_err(|e| AttemptError::Http(e.to_string()))?;
        let conn = tokio::spawn(conn);
        let authority = if port == 80 {
            host.to_string()
        } else if host.contains(':') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        };
        let req = hyper::Request::post(path)
            .header(hyper::header::HOST, authority)
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .header(
                hyper::header::USER_AGENT,
                concat!("stormguard/", env!("CARGO_PKG_VERSION")),
            )
            .header(hyper::header::CONNECTION, "close")
            .header("X-Stormguard-Event", job.kind.as_str())
            .body(job.body.as_str().to_string())
            .map_err(|e| AttemptError::Http(e.to_string()))?;
        let resp = send.send_request(req).await;
        conn.abort();
        let status = resp
            .map_err(|e| AttemptError::Http(e.to_string()))?
            .status();
        if status.is_success() {
            Ok(format!("; HTTP {}", status.as_u16()))
        } else {
            Err(AttemptError::Status(status.as_u16()))
        }
    };
    tokio::time::timeout(timeout, work)
        .await
        .unwrap_or(Err(AttemptError::Timeout(timeout)))
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
mod tests {
    use super::*;

    fn table(text: &str) -> Result<Vec<Notifier>, String> {
        #[derive(Deserialize)]
        struct T {
            notify: Vec<NotifyConfig>,
        }
        let t: T = toml::from_str(text).map_err(|e| e.message().to_string())?;
        resolve_all(&t.notify).map_err(|e| e.to_string())
    }

    #[test]
    fn a_command_and_a_webhook_with_defaults() {
        let n = table(
            "[[notify]]\ncommand = [\"/usr/local/bin/page-me\", \"--team\", \"sre\"]\n\
             [[notify]]\nwebhook = \"http://127.0.0.1:9000/hook?k=v\"\non = [\"end\"]\n\
             timeout = \"500ms\"\nmin_interval = \"30s\"\nretries = 0\n",
        )
        .unwrap();
        assert_eq!(
            n[0],
            Notifier {
                index: 1,
                target: Target::Command(vec![
                    "/usr/local/bin/page-me".into(),
                    "--team".into(),
                    "sre".into()
                ]),
                on_start: true,
                on_end: true,
                timeout: Duration::from_secs(5),
                min_interval: Duration::ZERO,
                retries: 3,
            }
        );
        assert_eq!(
            n[1].target,
            Target::Webhook {
                url: "http://127.0.0.1:9000/hook?k=v".into(),
                host: "127.0.0.1".into(),
                port: 9000,
                path: "/hook?k=v".into(),
            }
        );
        assert!(!n[1].on_start && n[1].on_end);
        assert_eq!(n[1].timeout, Duration::from_millis(500));
        assert_eq!(n[1].min_interval, Duration::from_secs(30));
        assert_eq!(n[1].retries, 0);
        assert_eq!(n[1].name(), "#2 webhook 127.0.0.1:9000");
        let n = table("[[notify]]\nwebhook = \"http://[::1]\"\n").unwrap();
        assert_eq!(
            n[0].target,
            Target::Webhook {
                url: "http://[::1]".into(),
                host: "::1".into(),
                port: 80,
                path: "/".into()
            }
        );
    }

    #[test]
    fn bad_tables_are_refused_naming_the_table_the_field_and_the_fix() {
        for (text, want) in [
            (
                "[[notify]]\n",
                "[[notify]] #1: command/webhook: neither is set",
            ),
            (
                "[[notify]]\ncommand = [\"/bin/true\"]\nwebhook = \"http://h/\"\n",
                "[[notify]] #1: command/webhook: both are set",
            ),
            (
                "[[notify]]\ncommand = []\n",
                "[[notify]] #1: command: is empty",
            ),
            (
                "[[notify]]\ncommand = [\"page-me\"]\n",
                "[[notify]] #1: command: \"page-me\" is not an absolute path",
            ),
            (
                "[[notify]]\nwebhook = \"https://hooks.example.com/x\"\n",
                "[[notify]] #1: webhook: \"https://hooks.example.com/x\": https is not supported",
            ),
            (
                "[[notify]]\nwebhook = \"ftp://h/x\"\n",
                "is not an http:// URL",
            ),
            (
                "[[notify]]\nwebhook = \"http://user:pw@h/x\"\n",
                "credentials in the URL are not supported",
            ),
            (
                "[[notify]]\nwebhook = \"not a url\"\n",
                "[[notify]] #1: webhook: \"not a url\" is not a URL",
            ),
            (
                "[[notify]]\ncommand = [\"/bin/true\"]\non = [\"begin\"]\n",
                "[[notify]] #1: on: \"begin\" is not an event",
            ),
            (
                "[[notify]]\ncommand = [\"/bin/true\"]\non = []\n",
                "[[notify]] #1: on: is empty",
            ),
            (
                "[[notify]]\ncommand = [\"/bin/true\"]\n[[notify]]\ncommand = [\"/bin/true\"]\ntimeout = \"0s\"\n",
                "[[notify]] #2: timeout: \"0s\" is out of range: must be 100ms to 1m",
            ),
            (
                "[[notify]]\ncommand = [\"/bin/true\"]\ntimeout = \"5 parsecs\"\n",
                "[[notify]] #1: timeout: \"5 parsecs\" is not a duration",
            ),
            (
                "[[notify]]\ncommand = [\"/bin/true\"]\nmin_interval = \"2h\"\n",
                "[[notify]] #1: min_interval: \"2h\" is out of range: must be 0s to 1h",
            ),
            (
                "[[notify]]\ncommand = [\"/bin/true\"]\nretries = 11\n",
                "[[notify]] #1: retries: 11 is out of range: must be 0..=10",
            ),
            (
                "[[notify]]\ncommand = [\"/bin/true\"]\nretry = 1\n",
                "unknown field `retry`",
            ),
        ] {
            let e = table(text).expect_err(text);
            assert!(e.contains(want), "{text}\n→ {e}\nnot {want}");
        }
        let many = "[[notify]]\ncommand = [\"/bin/true\"]\n".repeat(MAX_NOTIFIERS + 1);
        assert_eq!(
            table(&many).unwrap_err(),
            "17 [[notify]] tables: at most 16; send to one relay that fans out instead"
        );
        assert_eq!(
            table(&"[[notify]]\ncommand = [\"/bin/true\"]\n".repeat(MAX_NOTIFIERS))
                .unwrap()
                .len(),
            MAX_NOTIFIERS
        );
    }

    #[test]
    fn commands_must_be_executable_files() {
        let c = |p: &str| NotifyConfig {
            command: Some(vec![p.into()]),
            ..Default::default()
        };
        check_commands(&[c("/bin/sh")]).unwrap();
        let e = check_commands(&[c("/bin/sh"), c("/nonexistent/page-me")])
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("[[notify]] #2: command: \"/nonexistent/page-me\": No such file"),
            "{e}"
        );
        let e = check_commands(&[c("/")]).unwrap_err().to_string();
        assert_eq!(e, "[[notify]] #1: command: \"/\" is not a file");
        let dir = std::env::temp_dir().join(format!("sg-notify-x-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("script");
        std::fs::write(&f, "#!/bin/sh\n").unwrap();
        let e = check_commands(&[c(f.to_str().unwrap())])
            .unwrap_err()
            .to_string();
        assert!(e.ends_with("is not executable; chmod +x it"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn backoff_doubles_from_one_second_and_is_capped() {
        let s: Vec<u64> = (1..=8).map(|r| backoff(r).as_secs()).collect();
        assert_eq!(s, [1, 2, 4, 8, 16, 30, 30, 30]);
        assert_eq!(backoff(u32::MAX), BACKOFF_CAP);
    }

    #[test]
    fn the_rate_limit_counts_pages_and_ends_follow_their_start() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut g = Gate::new(Duration::from_secs(30), true);
        assert_eq!(g.admit(EventKind::Start, "inc-1", at(0)), Admit::Send);
        // Within 30 s of the last page: dropped, and so is its end.
        assert_eq!(
            g.admit(EventKind::Start, "inc-2", at(10)),
            Admit::RateLimited
        );
        assert_eq!(g.admit(EventKind::End, "inc-2", at(12)), Admit::RateLimited);
        // The end of a page sent is always sent, whenever.
        assert_eq!(g.admit(EventKind::End, "inc-1", at(13)), Admit::Send);
        assert_eq!(
            g.admit(EventKind::Start, "inc-3", at(29)),
            Admit::RateLimited
        );
        assert_eq!(g.admit(EventKind::Start, "inc-4", at(30)), Admit::Send);
        // Rate-limited ones do not push the window.
        assert_eq!(g.admit(EventKind::Start, "inc-5", at(60)), Admit::Send);
        assert_eq!(g.admit(EventKind::End, "inc-3", at(61)), Admit::RateLimited);
        assert_eq!(g.admit(EventKind::End, "inc-4", at(61)), Admit::Send);
        assert_eq!(g.admit(EventKind::End, "inc-5", at(61)), Admit::Send);
        // Remembered once only.
        assert_eq!(g.admit(EventKind::End, "inc-3", at(62)), Admit::Send);

        // Ends only: the ends are the pages.
        let mut g = Gate::new(Duration::from_secs(30), false);
        assert_eq!(g.admit(EventKind::End, "inc-1", at(0)), Admit::Send);
        assert_eq!(g.admit(EventKind::End, "inc-2", at(1)), Admit::RateLimited);
        assert_eq!(g.admit(EventKind::End, "inc-3", at(31)), Admit::Send);

        // No limit.
        let mut g = Gate::new(Duration::ZERO, true);
        for i in 0..100 {
            let id = format!("inc-{i}");
            assert_eq!(g.admit(EventKind::Start, &id, at(0)), Admit::Send);
            assert_eq!(g.admit(EventKind::End, &id, at(0)), Admit::Send);
        }
    }

    #[test]
    fn suppressed_incidents_are_bounded() {
        let t0 = Instant::now();
        let mut g = Gate::new(Duration::from_secs(3600), true);
        g.admit(EventKind::Start, "inc-0", t0);
        for i in 1..=SUPPRESSED_MAX + 10 {
            g.admit(EventKind::Start, &format!("inc-{i}"), t0);
        }
        assert_eq!(g.suppressed.len(), SUPPRESSED_MAX);
        assert_eq!(g.suppressed_order.len(), SUPPRESSED_MAX);
        // The oldest were forgotten: their end goes out.
        assert_eq!(g.admit(EventKind::End, "inc-1", t0), Admit::Send);
        assert_eq!(
            g.admit(EventKind::End, &format!("inc-{}", SUPPRESSED_MAX + 10), t0),
            Admit::RateLimited
        );
    }

    fn incident(id: &str) -> Incident {
        let mut inc: Incident = serde_json::from_value(serde_json::json!({
            "id": id, "kind": "flow", "active": true, "state": "storm", "pid": 42,
            "process_start": null, "comm": "a;$(touch x)", "exe": null, "cmdline": null,
            "uid": 0, "ppid": 1, "cgroup_id": null, "cgroup": null, "unit": null,
            "container": null, "proto": "tcp", "destination": "127.0.0.1:9",
            "netns": 0, "started_at": 1, "updated_at": 1, "ended_at": null,
            "end_reason": null, "peak_rate": 100.0, "total_attempts": 10,
            "total_failures": 10, "failure_mix": [], "gap_histogram": [],
            "median_gap_us": null, "backoff": "none", "explanation": "x",
            "timeline": [], "members": [42], "syscalls_per_s": null
        }))
        .unwrap();
        inc.id = id.into();
        inc
    }

    fn job(kind: EventKind, inc: &Incident) -> Job {
        Job {
            kind,
            id: inc.id.clone(),
            body: Arc::new(
                serde_json::to_string(&Payload {
                    event: kind,
                    host: "h",
                    incident: inc,
                })
                .unwrap(),
            ),
        }
    }

    fn notifier(target: Target, timeout: Duration) -> Notifier {
        Notifier {
            index: 1,
            target,
            on_start: true,
            on_end: true,
            timeout,
            min_interval: Duration::ZERO,
            retries: 0,
        }
    }

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    #[test]
    fn a_command_gets_the_event_on_stdin_and_a_minimal_environment() {
        let dir = std::env::temp_dir().join(format!("sg-notify-cmd-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let out = dir.join("out");
        let inc = incident("inc-3");
        let n = notifier(
            Target::Command(vec![
                "/bin/sh".into(),
                "-c".into(),
                "cat > \"$1\"; env | sort > \"$1.env\"; echo said; echo moaned >&2".into(),
                "sh".into(),
                out.to_str().unwrap().into(),
            ]),
            Duration::from_secs(5),
        );
        let detail = rt()
            .block_on(attempt(&n, &job(EventKind::Start, &inc)))
            .unwrap();
        assert_eq!(detail, "; stdout: \"said\"; stderr: \"moaned\"");
        let got: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
        assert_eq!(got["event"], "start");
        assert_eq!(got["host"], "h");
        assert_eq!(got["incident"]["id"], "inc-3");
        assert_eq!(got["incident"]["comm"], "a;$(touch x)");
        assert_eq!(got["incident"]["pid"], 42);
        let env = std::fs::read_to_string(dir.join("out.env")).unwrap();
        let names: Vec<&str> = env.lines().map(|l| l.split('=').next().unwrap()).collect();
        // sh adds PWD, SHLVL and _ of its own.
        for n in &names {
            assert!(
                [
                    "PATH",
                    "STORMGUARD_EVENT",
                    "STORMGUARD_INCIDENT",
                    "PWD",
                    "SHLVL",
                    "_"
                ]
                .contains(n),
                "{env}"
            );
        }
        assert!(env.contains("STORMGUARD_EVENT=start\n"), "{env}");
        assert!(env.contains("STORMGUARD_INCIDENT=inc-3\n"), "{env}");
        assert!(env.contains("PWD=/\n"), "{env}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_failing_or_hanging_command_fails_and_is_killed() {
        let inc = incident("inc-4");
        let fail = notifier(
            Target::Command(vec![
                "/bin/sh".into(),
                "-c".into(),
                "echo no way >&2; exit 3".into(),
            ]),
            Duration::from_secs(5),
        );
        let e = rt()
            .block_on(attempt(&fail, &job(EventKind::End, &inc)))
            .unwrap_err()
            .to_string();
        assert_eq!(e, "exit status: 3; stderr: \"no way\"");
        // A grandchild holding the pipes open is killed with its group.
        let hang = notifier(
            Target::Command(vec![
                "/bin/sh".into(),
                "-c".into(),
                "sleep 30 & sleep 30".into(),
            ]),
            Duration::from_millis(300),
        );
        let t = Instant::now();
        let e = rt()
            .block_on(attempt(&hang, &job(EventKind::End, &inc)))
            .unwrap_err();
        assert!(matches!(e, AttemptError::Timeout(_)), "{e}");
        assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
        let e = rt()
            .block_on(attempt(
                &notifier(
                    Target::Command(vec!["/nonexistent".into()]),
                    Duration::from_secs(1),
                ),
                &job(EventKind::End, &inc),
            ))
            .unwrap_err();
        assert!(matches!(e, AttemptError::Spawn(_)), "{e}");
    }

    #[test]
    fn a_webhook_needs_a_2xx_in_time() {
        use std::io::{Read as _, Write as _};
        let inc = incident("inc-5");
        // Answers each connection with `status` after reading the request.
        let server = |status: Option<u16>| {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let port = l.local_addr().unwrap().port();
            let (tx, rx) = std::sync::mpsc::channel::<String>();
            std::thread::spawn(move || {
                for mut c in l.incoming().flatten() {
                    let mut buf = vec![0u8; 65536];
                    let n = c.read(&mut buf).unwrap_or(0);
                    let _ = tx.send(String::from_utf8_lossy(&buf[..n]).into_owned());
                    match status {
                        Some(s) => {
                            let _ = write!(c, "HTTP/1.1 {s} X\r\nContent-Length: 0\r\n\r\n");
                        }
                        None => std::thread::sleep(Duration::from_secs(5)),
                    }
                }
            });
            (port, rx)
        };
        let hook = |port: u16, timeout: Duration| {
            notifier(
                Target::Webhook {
                    url: String::new(),
                    host: "127.0.0.1".into(),
                    port,
                    path: "/h?x=1".into(),
                },
                timeout,
            )
        };
        let (port, got) = server(Some(204));
        let detail = rt()
            .block_on(attempt(
                &hook(port, Duration::from_secs(5)),
                &job(EventKind::Start, &inc),
            ))
            .unwrap();
        assert_eq!(detail, "; HTTP 204");
        let req = got.recv_timeout(Duration::from_secs(5)).unwrap();
        assert!(req.starts_with("POST /h?x=1 HTTP/1.1\r\n"), "{req}");
        assert!(
            req.to_ascii_lowercase()
                .contains("content-type: application/json\r\n"),
            "{req}"
        );
        assert!(
            req.contains(&format!("host: 127.0.0.1:{port}\r\n")),
            "{req}"
        );
        assert!(req.contains("\"event\":\"start\""), "{req}");

        let (port, _got) = server(Some(503));
        let e = rt()
            .block_on(attempt(
                &hook(port, Duration::from_secs(5)),
                &job(EventKind::Start, &inc),
            ))
            .unwrap_err();
        assert!(matches!(e, AttemptError::Status(503)), "{e}");

        let (port, _got) = server(None);
        let t = Instant::now();
        let e = rt()
            .block_on(attempt(
                &hook(port, Duration::from_millis(300)),
                &job(EventKind::Start, &inc),
            ))
            .unwrap_err();
        assert!(matches!(e, AttemptError::Timeout(_)), "{e}");
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());

        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = closed.local_addr().unwrap().port();
        drop(closed);
        let e = rt()
            .block_on(attempt(
                &hook(port, Duration::from_secs(5)),
                &job(EventKind::Start, &inc),
            ))
            .unwrap_err();
        assert!(matches!(e, AttemptError::Connect(_)), "{e}");
    }

    #[test]
    fn handing_over_never_waits_and_a_full_queue_drops_and_counts() {
        let counters = Counters::default();
        let table = NotifyConfig {
            command: Some(vec!["/bin/sleep".into(), "5".into()]),
            timeout: "1s".into(),
            retries: 0,
            ..Default::default()
        };
        let mut h = start(&[table], counters.clone()).unwrap().unwrap();
        let inc = incident("inc-9");
        let t = Instant::now();
        for _ in 0..300 {
            h.send(EventKind::Start, &inc);
        }
        assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
        // At most the two queues and the one being tried are kept.
        let dropped = counters.dropped.get();
        assert!(dropped >= 300 - 2 * QUEUE as u64 - 2, "{dropped}");
        assert!(!h.finish(Duration::from_millis(100)));
        assert!(start(&[], Counters::default()).unwrap().is_none());
    }

    #[test]
    fn a_notifier_sends_in_order_through_its_rate_limit_and_counts() {
        let dir = std::env::temp_dir().join(format!("sg-notify-rl-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let table = |file: &str, on: &[&str]| NotifyConfig {
            command: Some(vec![
                "/bin/sh".into(),
                "-c".into(),
                "cat >> \"$1\"; echo >> \"$1\"".into(),
                "sh".into(),
                dir.join(file).to_str().unwrap().into(),
            ]),
            on: on.iter().map(|o| o.to_string()).collect(),
            min_interval: "1h".into(),
            ..Default::default()
        };
        let counters = Counters::default();
        let mut h = start(
            &[table("both", &["start", "end"]), table("ends", &["end"])],
            counters.clone(),
        )
        .unwrap()
        .unwrap();
        let (one, two) = (incident("inc-1"), incident("inc-2"));
        h.send(EventKind::Start, &one);
        h.send(EventKind::Start, &two);
        h.send(EventKind::End, &two);
        h.send(EventKind::End, &one);
        assert!(h.finish(Duration::from_secs(10)));
        let got = |file: &str| -> Vec<String> {
            std::fs::read_to_string(dir.join(file))
                .unwrap()
                .lines()
                .map(|l| {
                    let v: serde_json::Value = serde_json::from_str(l).unwrap();
                    format!(
                        "{} {}",
                        v["event"].as_str().unwrap(),
                        v["incident"]["id"].as_str().unwrap()
                    )
                })
                .collect()
        };
        // inc-2's start came within the hour of inc-1's: dropped, and so is
        // its end; inc-1's end follows its start.
        assert_eq!(got("both"), ["start inc-1", "end inc-1"]);
        // Ends only: the ends are the pages; inc-1's is within the hour.
        assert_eq!(got("ends"), ["end inc-2"]);
        assert_eq!(counters.sent.get(), 3);
        assert_eq!(counters.dropped.get(), 3);
        assert_eq!(counters.failed.get(), 0);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_end_tap_keeps_closed_incidents_only() {
        struct Null(u32);
        impl Sink for Null {
            fn insert(&mut self, _: &Incident) -> Result<i64, SinkError> {
                self.0 += 1;
                Ok(1)
            }
            fn update(&mut self, _: &Incident) -> Result<(), SinkError> {
                self.0 += 1;
                Ok(())
            }
        }
        let mut null = Null(0);
        let mut tap = EndTap::new(&mut null, true);
        let mut inc = incident("inc-1");
        tap.insert(&inc).unwrap();
        tap.update(&inc).unwrap();
        inc.active = false;
        inc.ended_at = Some(5);
        tap.update(&inc).unwrap();
        assert_eq!(tap.ended.len(), 1);
        let mut off = EndTap::new(&mut null, false);
        off.update(&inc).unwrap();
        assert!(off.ended.is_empty());
        assert_eq!(null.0, 4);
    }
}

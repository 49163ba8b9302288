//! What one flow (or roll-up) did: windowed counts, gaps, run totals, the
//! failure mix and the last request, and the assessment made from them.
use super::{
    config::DetectConfig,
    window::{Gaps, Sums, WINDOW_NS, Window},
};

/// Failure codes (positive errno or a negative code with no errno).
pub use crate::ingest::failure as label;

/// The most frequent failure kinds, at most four (plus "other").
#[derive(Debug, Clone, Default)]
pub struct ErrorMix {
    top: [(i32, u32); 4],
    other: u32,
}

impl ErrorMix {
    pub fn add(&mut self, code: i32) {
        if let Some(slot) = self.top.iter_mut().find(|(c, n)| *c == code && *n > 0) {
            slot.1 = slot.1.saturating_add(1);
        } else if let Some(slot) = self.top.iter_mut().find(|(_, n)| *n == 0) {
            *slot = (code, 1);
        } else {
            self.other = self.other.saturating_add(1);
        }
    }

    /// The most frequent kind and its count.
    pub fn main(&self) -> Option<(i32, u32)> {
        self.top
            .iter()
            .filter(|(_, n)| *n > 0)
            .max_by_key(|(c, n)| (*n, std::cmp::Reverse(*c)))
            .copied()
    }

    /// Every kind with its count, most frequent first.
    pub fn all(&self) -> Vec<(i32, u32)> {
        let mut v: Vec<(i32, u32)> = self.top.iter().copied().filter(|(_, n)| *n > 0).collect();
        v.sort_by_key(|(c, n)| (std::cmp::Reverse(*n), *c));
        v
    }
}

/// Requests remembered to tell a repeat from a new one: a retry on a new
/// connection repeats the whole conversation (PostgreSQL's SSL request,
/// startup and two SCRAM steps are four requests; more would cost every
/// flow 16 bytes each).
const RECENT_REQUESTS: usize = 4;
/// Bytes by which the answers to one repeated request may differ.
const REPLY_SLACK: u32 = 8;

/// A request seen, to tell a repeat from a new one.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Request {
    /// Low bits of the socket id and of the fingerprint: enough to tell
    /// one connection or one content from the few others remembered, and
    /// half the size (a flow must stay under 1 KB).
    sock: u32,
    fingerprint: u32,
    sent: u32,
    received: u32,
}

/// Accumulated signals of one flow or roll-up.
#[derive(Debug, Clone, Default)]
pub struct Signals {
    pub window: Window,
    pub gaps: Gaps,
    pub errors: ErrorMix,
    /// First and last attempt of the current run (a run ends after a gap
    /// longer than `run_gap_ms`).
    pub run_start_ns: u64,
    pub last_ns: u64,
    pub run_attempts: u64,
    pub run_failures: u64,
    pub run_requests: u64,
    /// Attempts of the run whose outcome was not seen.
    pub run_unknown: u64,
    /// The last few requests: a retry over a new connection is several
    /// exchanges (TLS handshake then request; a database login), so "the
    /// same as the one before" must look a little further back.
    recent: [Request; RECENT_REQUESTS],
    recent_next: u8,
    /// Lengths of the last request and its response, for explanations.
    pub last_sent: u32,
    pub last_received: u32,
    /// The question of the last probed DNS query (boxed: most flows never
    /// have one, and a flow must stay small).
    pub last_question: Option<Box<[u8; crate::ingest::decode::QUESTION_BYTES]>>,
}

impl Signals {
    /// One attempt (connect, request, datagram); `failure` is its failure
    /// code if it failed.
    pub fn attempt(&mut self, ts: u64, failure: Option<i32>, cfg: &DetectConfig) {
        if self.run_attempts == 0 || ts.saturating_sub(self.last_ns) > cfg.run_gap_ms * 1_000_000 {
            self.run_start_ns = ts;
            self.run_attempts = 0;
            self.run_failures = 0;
            self.run_requests = 0;
            self.run_unknown = 0;
            self.errors = ErrorMix::default();
            self.gaps.clear();
            self.recent = Default::default();
        } else {
            self.gaps.push(ts.saturating_sub(self.last_ns));
        }
        self.last_ns = self.last_ns.max(ts);
        self.run_attempts += 1;
        let c = self.window.at(ts);
        c.attempts = c.attempts.saturating_add(1);
        if let Some(code) = failure {
            c.failures = c.failures.saturating_add(1);
            self.run_failures += 1;
            self.errors.add(code);
        }
    }

    /// An attempt whose outcome was not seen (a reply not read).
    pub fn unknown(&mut self, ts: u64) {
        let c = self.window.at(ts);
        c.unknown = c.unknown.saturating_add(1);
        self.run_unknown += 1;
    }

    /// A failure that is not an attempt of its own (a connection that
    /// ended young with no response, a reply that said no: the connect
    /// or send was already counted).
    pub fn failure(&mut self, ts: u64, code: i32) {
        let c = self.window.at(ts);
        c.failures = c.failures.saturating_add(1);
        self.run_failures += 1;
        self.errors.add(code);
    }

    /// The lengths (and fingerprint, 0 if none) of a request and its
    /// response, compared with the one before — on any connection: a loop
    /// that opens a new connection (or a new process) per retry repeats
    /// itself as much as one that resends on a keep-alive connection.
    /// Repetition alone only makes a flow a candidate for a closer look;
    /// whether it is a retry (fails) or load (succeeds) is the outcome's
    /// to say. Call after `attempt`.
    pub fn request(&mut self, ts: u64, sock: u64, sent: u32, received: u32, fingerprint: u64) {
        let req = Request {
            sock: sock as u32,
            fingerprint: fingerprint as u32,
            sent,
            received,
        };
        let c = self.window.at(ts);
        c.requests = c.requests.saturating_add(1);
        // The same request; its answer the same give or take a few bytes
        // (a request id, a TLS record's padding).
        let alike = |prev: &&Request| {
            prev.sent == sent && prev.sent > 0 && prev.received.abs_diff(received) <= REPLY_SLACK
        };
        if let Some(prev) = self.recent.iter().find(alike) {
            c.same_length = c.same_length.saturating_add(1);
            if fingerprint != 0 && prev.fingerprint == fingerprint as u32 {
                c.same_content = c.same_content.saturating_add(1);
            }
        }
        self.recent[self.recent_next as usize % RECENT_REQUESTS] = req;
        self.recent_next = self.recent_next.wrapping_add(1);
        self.run_requests += 1;
        self.last_sent = sent;
        self.last_received = received;
    }

    /// Whether a request of `sent` bytes on socket `sock` repeats one of
    /// the last few on that same connection: a keep-alive client sending
    /// again, as opposed to the next step of a protocol (TLS handshake,
    /// then the request; PostgreSQL startup, then the password).
    pub fn repeats_on(&self, sock: u64, sent: u32) -> bool {
        self.recent
            .iter()
            .any(|r| r.sock == sock as u32 && r.sent == sent && sent > 0)
    }

    /// A UDP reply.
    pub fn reply(&mut self, ts: u64) {
        let c = self.window.at(ts);
        c.replies = c.replies.saturating_add(1);
    }

    /// What the signals say at `now`.
    pub fn assess(&self, now: u64, cfg: &DetectConfig) -> Assessment {
        let w: Sums = self.window.sum(now);
        let rate = w.attempts as f64 * 1e9 / WINDOW_NS as f64;
        let ratio = |n: u32, d: u32| {
            if d == 0 {
                0.0
            } else {
                (n as f64 / d as f64).min(1.0)
            }
        };
        // Over the attempts whose outcome is known: before the on-demand
        // probes read a flow's replies, its requests are neither failures
        // nor successes.
        let known = w.attempts.saturating_sub(w.unknown).max(w.failures);
        let fail_ratio = ratio(w.failures, known);
        let enough_requests = w.requests >= 5;
        let same_length = if enough_requests {
            ratio(w.same_length, w.requests)
        } else {
            0.0
        };
        let same_content = if enough_requests {
            ratio(w.same_content, w.requests)
        } else {
            0.0
        };
        let growth = self.gaps.growth();
        let backoff = growth.is_some_and(|g| {
            g.rising
                && g.ratio >= cfg.backoff_growth
                && g.step_us as u64 >= cfg.backoff_min_step_ms * 1_000
        });
        // Leaving a storm takes clearer backoff than staying out of one: a
        // loop of short-lived processes on a busy host has gaps that wander
        // by ×1.4 from scheduling alone; real exponential backoff grows by
        // far more than ×2 over the last 32 gaps.
        let strong_backoff =
            backoff && growth.is_some_and(|g| g.ratio >= cfg.backoff_growth * cfg.backoff_growth);
        let growth = growth.map(|g| g.ratio);
        let active = now.saturating_sub(self.last_ns) <= WINDOW_NS;
        let span_ns = if active {
            self.last_ns.saturating_sub(self.run_start_ns)
        } else {
            0
        };
        let failing = fail_ratio >= cfg.failure_ratio;
        let repeating = same_content >= cfg.repeat_ratio;
        let looks_failing = fail_ratio >= 0.5 || same_length >= cfg.repeat_ratio;
        // A burst: more failed attempts than any reconnecting pool makes,
        // however soon it ends.
        let burst = active
            && self.run_failures >= cfg.burst_attempts
            && self.run_failures as f64 >= cfg.failure_ratio * self.run_attempts as f64;
        // Identical requests that succeed are polling or load: a storm
        // needs failures.
        let storm = rate >= cfg.storm_rate
            && (span_ns >= cfg.min_span_ms * 1_000_000 || burst)
            && failing
            && !backoff;
        let suspect = rate >= cfg.suspect_rate && looks_failing && !backoff;
        // Attempts whose outcome is no longer seen (the on-demand probes
        // rest) are not evidence of recovery while they keep repeating.
        let blind = w.attempts > 0 && known == 0;
        let still_failing = fail_ratio >= 0.5 || (blind && same_length >= cfg.repeat_ratio);
        let calm = rate < cfg.storm_rate / 2.0 || strong_backoff || !still_failing;
        let run_span = self.last_ns.saturating_sub(self.run_start_ns);
        let persistent = self.run_attempts >= 3
            && run_span >= cfg.persistent_ms * 1_000_000
            && self.run_failures as f64 >= cfg.failure_ratio * self.run_attempts as f64;
        Assessment {
            window: w,
            rate,
            fail_ratio,
            same_length,
            same_content,
            growth,
            backoff,
            span_ns,
            storm,
            suspect,
            calm,
            persistent,
            repeating,
        }
    }
}

/// The signals of a flow at one instant, and what they amount to.
#[derive(Debug, Clone)]
pub struct Assessment {
    pub window: Sums,
    /// Attempts per second over the last second.
    pub rate: f64,
    pub fail_ratio: f64,
    pub same_length: f64,
    pub same_content: f64,
    pub growth: Option<f64>,
    pub backoff: bool,
    pub span_ns: u64,
    /// Storm criteria met.
    pub storm: bool,
    /// Suspect criteria met.
    pub suspect: bool,
    /// Clearly below storm criteria (the way out of a storm is wider than
    /// the way in, so a flow does not flap).
    pub calm: bool,
    /// Failing for a long time, at any rate.
    pub persistent: bool,
    /// The same request (by content) over and over.
    pub repeating: bool,
}

impl Assessment {
    /// 0–100: how storm-like, for ranking.
    pub fn score(&self, cfg: &DetectConfig) -> u8 {
        let rate = (self.rate / cfg.storm_rate).min(1.0);
        let evidence = self
            .fail_ratio
            .max(self.same_content)
            .max(self.same_length * 0.5);
        let mut s = rate * 50.0 + evidence * 50.0;
        if self.backoff {
            s /= 2.0;
        }
        s.round().clamp(0.0, 100.0) as u8
    }
}

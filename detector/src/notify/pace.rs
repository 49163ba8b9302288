//! When to send: the retry schedule and a notifier's rate limit.
use super::*;

/// Incidents whose start was rate-limited, remembered so that their end is
/// dropped too (oldest forgotten first).
pub(super) const SUPPRESSED_MAX: usize = 1024;

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

    /// Rate-limited incidents whose end is still to be dropped.
    pub fn remembered(&self) -> usize {
        debug_assert_eq!(self.suppressed.len(), self.suppressed_order.len());
        self.suppressed.len()
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

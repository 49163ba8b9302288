//! Fixed-size signal windows: counts per 100 ms over the last second, and
//! the last gaps between attempts. No allocation, so a flow costs the same
//! few hundred bytes however busy it is.

/// Width of one bucket.
pub const BUCKET_NS: u64 = 100_000_000;
/// Buckets in the window: the window is one second.
pub const BUCKETS: usize = 10;
/// Length of the window.
pub const WINDOW_NS: u64 = BUCKET_NS * BUCKETS as u64;

/// Counts of one 100 ms slice (u16, saturating: 655,350/s per flow is
/// beyond any threshold, and small buckets keep a flow under 1 KB), or of
/// a whole window (then summed into u32).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts<T = u16> {
    /// Connects, requests and datagrams sent.
    pub attempts: T,
    /// Attempts that failed (errno, RST, timeout, closed before an answer)
    /// and connections that ended young with no response.
    pub failures: T,
    /// Requests (TCP exchanges, UDP datagrams) that had lengths to compare.
    pub requests: T,
    /// Requests with the same lengths as the one before.
    pub same_length: T,
    /// Requests with the same content fingerprint as the one before.
    pub same_content: T,
    /// UDP replies received.
    pub replies: T,
    /// Attempts whose outcome was not seen: requests whose reply was not
    /// read (the process was not probed yet), so the failure ratio is taken
    /// over what is known.
    pub unknown: T,
}

/// Counts summed over a window.
pub type Sums = Counts<u32>;

impl Sums {
    fn add(&mut self, o: &Counts) {
        self.attempts += u32::from(o.attempts);
        self.failures += u32::from(o.failures);
        self.requests += u32::from(o.requests);
        self.same_length += u32::from(o.same_length);
        self.same_content += u32::from(o.same_content);
        self.replies += u32::from(o.replies);
        self.unknown += u32::from(o.unknown);
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct Bucket {
    /// Which 100 ms slice of time this bucket holds (ts / BUCKET_NS).
    slice: u32,
    counts: Counts,
}

/// Counts over the last second, in 100 ms buckets reused in a ring.
#[derive(Debug, Clone, Default)]
pub struct Window {
    buckets: [Bucket; BUCKETS],
}

impl Window {
    /// The bucket for time `ts`, cleared if it held an older slice.
    pub fn at(&mut self, ts: u64) -> &mut Counts {
        let slice = (ts / BUCKET_NS) as u32;
        let b = &mut self.buckets[slice as usize % BUCKETS];
        if b.slice != slice {
            *b = Bucket {
                slice,
                counts: Counts::default(),
            };
        }
        &mut b.counts
    }

    /// Sum of the buckets within the second ending at `now`.
    pub fn sum(&self, now: u64) -> Sums {
        let newest = (now / BUCKET_NS) as u32;
        let oldest = newest.saturating_sub(BUCKETS as u32 - 1);
        let mut total = Sums::default();
        for b in &self.buckets {
            if b.slice >= oldest && b.slice <= newest {
                total.add(&b.counts);
            }
        }
        total
    }
}

/// Labels of [`Gaps::histogram`].
pub const GAP_BUCKETS: [&str; 5] = ["<1 ms", "1-10 ms", "10-100 ms", "0.1-1 s", ">=1 s"];

/// How many gaps are kept.
pub const GAPS: usize = 32;

/// The last gaps between attempts, in microseconds.
#[derive(Debug, Clone)]
pub struct Gaps {
    gaps: [u32; GAPS],
    next: u8,
    len: u8,
}

impl Default for Gaps {
    fn default() -> Self {
        Gaps {
            gaps: [0; GAPS],
            next: 0,
            len: 0,
        }
    }
}

impl Gaps {
    pub fn push(&mut self, gap_ns: u64) {
        self.gaps[self.next as usize] = (gap_ns / 1_000).min(u32::MAX as u64) as u32;
        self.next = ((self.next as usize + 1) % GAPS) as u8;
        self.len = (self.len as usize + 1).min(GAPS) as u8;
    }

    pub fn clear(&mut self) {
        self.len = 0;
        self.next = 0;
    }

    pub fn len(&self) -> usize {
        self.len as usize
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Gaps oldest first.
    fn ordered(&self, out: &mut [u32; GAPS]) -> usize {
        let n = self.len as usize;
        let start = (self.next as usize + GAPS - n) % GAPS;
        for (i, slot) in out.iter_mut().enumerate().take(n) {
            *slot = self.gaps[(start + i) % GAPS];
        }
        n
    }

    /// Counts of the kept gaps in [`GAP_BUCKETS`].
    pub fn histogram(&self) -> [u32; 5] {
        let mut buf = [0u32; GAPS];
        let n = self.ordered(&mut buf);
        let mut h = [0u32; 5];
        for g in &buf[..n] {
            let i = match *g {
                0..1_000 => 0,
                1_000..10_000 => 1,
                10_000..100_000 => 2,
                100_000..1_000_000 => 3,
                _ => 4,
            };
            h[i] += 1;
        }
        h
    }

    /// Median gap in microseconds.
    pub fn median_us(&self) -> Option<u32> {
        let mut buf = [0u32; GAPS];
        let n = self.ordered(&mut buf);
        median(&mut buf[..n])
    }

    /// Growth of the gaps, from the medians of the oldest, middle and
    /// newest third of the kept gaps: (newest / oldest, newest − oldest in
    /// microseconds, whether the three medians rise steadily). Near 1 for a
    /// steady loop with or without jitter; ≥ 1.5 and rising for exponential
    /// backoff. A loop starved of CPU can show a large ratio, but rarely a
    /// steady rise. None with fewer than 6 gaps.
    pub fn growth(&self) -> Option<Growth> {
        let mut buf = [0u32; GAPS];
        let n = self.ordered(&mut buf);
        if n < 6 {
            return None;
        }
        let third = n / 3;
        let (a, rest) = buf[..n].split_at_mut(third);
        let (b, c) = rest.split_at_mut(third);
        // Means as well as medians: a loop of short-lived processes has
        // bimodal gaps (a connect and its request 1 ms apart, then 30 ms to
        // the next process), whose medians jump between the modes by chance
        // while their means hold still. Backoff moves both.
        let (a1, a2, a3) = (mean(a), mean(b), mean(c));
        let (m1, m2, m3) = (median(a)?, median(b)?, median(c)?);
        let ratio = |x: u32, y: u32| (y as f64 + 1.0) / (x as f64 + 1.0);
        Some(Growth {
            ratio: ratio(m1, m3).min(ratio(a1, a3)),
            step_us: m3.saturating_sub(m1).min(a3.saturating_sub(a1)),
            rising: m1 <= m2 && m2 <= m3 && a1 <= a2 && a2 <= a3,
        })
    }
}

/// How the gaps between attempts change; see [`Gaps::growth`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Growth {
    pub ratio: f64,
    pub step_us: u32,
    pub rising: bool,
}

fn mean(v: &[u32]) -> u32 {
    (v.iter().map(|x| u64::from(*x)).sum::<u64>() / v.len().max(1) as u64) as u32
}

fn median(v: &mut [u32]) -> Option<u32> {
    if v.is_empty() {
        return None;
    }
    let mid = v.len() / 2;
    let (_, m, _) = v.select_nth_unstable(mid);
    Some(*m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_sums_the_last_second_only() {
        let mut w = Window::default();
        for i in 0..30u64 {
            // one attempt every 100 ms for 3 s
            w.at(i * BUCKET_NS).attempts += 1;
        }
        let now = 29 * BUCKET_NS + 1;
        assert_eq!(w.sum(now).attempts, 10);
        // 5 s later nothing is left.
        assert_eq!(w.sum(now + 5 * WINDOW_NS).attempts, 0);
    }

    #[test]
    fn steady_gaps_do_not_grow_and_backoff_does() {
        let mut steady = Gaps::default();
        for i in 0..20 {
            // 10 ms ± 2 ms of jitter
            steady.push(10_000_000 + (i % 5) * 1_000_000 - 2_000_000);
        }
        let g = steady.growth().unwrap().ratio;
        assert!((0.8..1.25).contains(&g), "{g}");
        assert_eq!(steady.median_us(), Some(10_000));

        let mut backoff = Gaps::default();
        let mut gap = 100_000_000u64;
        for _ in 0..8 {
            backoff.push(gap);
            gap *= 2;
        }
        let g = backoff.growth().unwrap();
        assert!(g.ratio > 4.0 && g.step_us > 100_000 && g.rising, "{g:?}");
    }

    #[test]
    fn the_ring_keeps_the_newest_gaps() {
        let mut g = Gaps::default();
        for i in 0..100u64 {
            g.push(i * 1_000);
        }
        assert_eq!(g.len(), GAPS);
        assert_eq!(g.median_us(), Some(84));
        assert!(Gaps::default().growth().is_none());
    }
}

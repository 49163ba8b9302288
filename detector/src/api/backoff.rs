//! Backoff after a failed `accept` (EMFILE, ENFILE, ENOBUFS): a server
//! that has run out of descriptors must wait for some to be freed, not
//! spin on the error. Shared by the API and metrics servers.
use std::time::Duration;

const MIN: Duration = Duration::from_millis(5);
const MAX: Duration = Duration::from_secs(1);

/// 5 ms, doubling to 1 s while accepts fail; reset by a success.
pub struct AcceptBackoff {
    next: Duration,
}

impl Default for AcceptBackoff {
    fn default() -> Self {
        AcceptBackoff { next: MIN }
    }
}

impl AcceptBackoff {
    /// An accept succeeded.
    pub fn reset(&mut self) {
        self.next = MIN;
    }

    /// An accept failed: logs it and returns how long to wait.
    pub fn failed(&mut self, server: &str, error: &std::io::Error) -> Duration {
        let wait = self.next;
        tracing::warn!(%error, "{server}: accept failed; backing off {wait:?}");
        self.next = (self.next * 2).min(MAX);
        wait
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_to_a_second_and_resets() {
        let mut b = AcceptBackoff::default();
        let e = std::io::Error::from_raw_os_error(libc::EMFILE);
        let waits: Vec<u128> = (0..10).map(|_| b.failed("t", &e).as_millis()).collect();
        assert_eq!(waits, [5, 10, 20, 40, 80, 160, 320, 640, 1000, 1000]);
        b.reset();
        assert_eq!(b.failed("t", &e), MIN);
    }
}

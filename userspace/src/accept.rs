//! What every accept loop does when `accept(2)` fails: back off (10 ms
//! doubling to 1 s) instead of spinning — `EMFILE` would otherwise turn the
//! loop into a busy loop that starves every connection — and log once per
//! run of failures, not once per attempt.

use std::time::Duration;

use tracing::{info, warn};

/// First pause after a failed accept.
const FIRST: Duration = Duration::from_millis(10);
/// Longest pause.
const MAX: Duration = Duration::from_secs(1);

/// Backoff state of one accept loop.
#[derive(Debug, Default)]
pub struct Backoff {
    failures: u32,
}

impl Backoff {
    /// The pause after the `n`-th consecutive failure (1-based).
    pub fn delay(n: u32) -> Duration {
        FIRST.saturating_mul(1 << n.saturating_sub(1).min(16)).min(MAX)
    }

    /// Records a failed accept on `pod`'s `what` listener and sleeps.
    pub async fn failed(&mut self, pod: &str, what: &str, e: &std::io::Error) {
        self.failures = self.failures.saturating_add(1);
        if self.failures == 1 {
            warn!(pod, what, error = %e, "accept failed; backing off until it works again (is the daemon out of file descriptors?)");
        }
        tokio::time::sleep(Self::delay(self.failures)).await;
    }

    /// Records a successful accept.
    pub fn reset(&mut self) {
        if self.failures > 0 {
            info!(failures = self.failures, "accepting again");
            self.failures = 0;
        }
    }

    /// Consecutive failures so far.
    pub fn failures(&self) -> u32 {
        self.failures
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pause_doubles_up_to_a_second() {
        assert_eq!(Backoff::delay(1), Duration::from_millis(10));
        assert_eq!(Backoff::delay(2), Duration::from_millis(20));
        assert_eq!(Backoff::delay(7), Duration::from_millis(640));
        assert_eq!(Backoff::delay(8), Duration::from_secs(1));
        assert_eq!(Backoff::delay(u32::MAX), Duration::from_secs(1));
    }

    #[tokio::test(start_paused = true)]
    async fn failures_sleep_and_a_success_resets() {
        let mut b = Backoff::default();
        let e = std::io::Error::from_raw_os_error(libc::EMFILE);
        let t0 = tokio::time::Instant::now();
        for _ in 0..5 {
            b.failed("ns/p", "outbound", &e).await;
        }
        // 10 + 20 + 40 + 80 + 160 ms of (virtual) time: no busy loop.
        assert_eq!(t0.elapsed(), Duration::from_millis(310));
        assert_eq!(b.failures(), 5);
        b.reset();
        assert_eq!(b.failures(), 0);
    }
}

//! Per-task rate limits on this worker: starts are spaced by at least the limit's interval.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use celery_core::sync::lock;
use tokio::time::Instant;

#[derive(Debug, Default)]
pub(crate) struct RateLimits {
    next: Mutex<HashMap<&'static str, Instant>>,
}

impl RateLimits {
    /// Waits for the next start slot of `task` spaced by `interval`.
    pub(crate) async fn acquire(&self, task: &'static str, interval: Duration) {
        let slot = {
            let mut m = lock(&self.next);
            let now = Instant::now();
            let slot = m.get(task).copied().unwrap_or(now).max(now);
            m.insert(task, celery_core::clock::instant_from(slot, interval));
            slot
        };
        tokio::time::sleep_until(slot).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn starts_are_spaced() {
        let r = RateLimits::default();
        let t0 = Instant::now();
        for _ in 0..5 {
            r.acquire("t", Duration::from_millis(100)).await;
        }
        assert_eq!(t0.elapsed(), Duration::from_millis(400));
    }

    #[tokio::test(start_paused = true)]
    async fn a_huge_interval_saturates() {
        let r = RateLimits::default();
        let t0 = Instant::now();
        // The first start is now; the next one is far away, not a panic or a wrapped instant.
        r.acquire("t", Duration::MAX).await;
        assert_eq!(t0.elapsed(), Duration::ZERO);
        let second = tokio::time::timeout(Duration::from_secs(86_400 * 365), r.acquire("t", Duration::MAX)).await;
        assert!(second.is_err(), "the second start must wait (about 30 years), not run at once");
    }
}

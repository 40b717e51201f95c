//! Per-task rate limits on this worker: starts are spaced by at least the limit's interval.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

#[derive(Debug, Default)]
pub(crate) struct RateLimits {
    next: Mutex<HashMap<&'static str, Instant>>,
}

impl RateLimits {
    /// Waits for the next start slot of `task` spaced by `interval`.
    pub(crate) async fn acquire(&self, task: &'static str, interval: Duration) {
        let slot = {
            let mut m = self.next.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            let slot = m.get(task).copied().unwrap_or(now).max(now);
            m.insert(task, slot + interval);
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
}

//! Retry countdowns: Celery's exponential backoff with full jitter.

use std::time::Duration;

use crate::task::TaskOptions;

/// The countdown before retry number `retries + 1`.
///
/// An explicit countdown wins; else with `retry_backoff = f` it is `min(retry_backoff_max, f * 2^retries)`,
/// drawn uniformly from `[0, that]` when `retry_jitter` is on; else `default_retry_delay`.
///
/// ```
/// use std::time::Duration;
/// use celery_core::{backoff::retry_countdown, TaskOptions};
/// let mut o = TaskOptions::new("t");
/// o.retry_backoff = Some(2.0);
/// o.retry_jitter = false;
/// assert_eq!(retry_countdown(&o, 3, None), Duration::from_secs(16));
/// assert_eq!(retry_countdown(&o, 30, None), Duration::from_secs(600));
/// ```
pub fn retry_countdown(options: &TaskOptions, retries: u32, explicit: Option<Duration>) -> Duration {
    if let Some(c) = explicit {
        return c;
    }
    let Some(factor) = options.retry_backoff else {
        return crate::clock::secs_f64(options.default_retry_delay);
    };
    let exp = 2f64.powi(retries.min(62) as i32);
    let cap = (factor * exp).min(options.retry_backoff_max).max(0.0);
    let secs = if options.retry_jitter { rand::random::<f64>() * cap } else { cap };
    crate::clock::secs_f64(secs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_stays_below_the_cap() {
        let mut o = TaskOptions::new("t");
        o.retry_backoff = Some(1.0);
        for r in 0..10 {
            let d = retry_countdown(&o, r, None);
            assert!(d <= Duration::from_secs_f64((2f64.powi(r as i32)).min(600.0)));
        }
        o.retry_backoff = None;
        assert_eq!(retry_countdown(&o, 0, None), Duration::from_secs(180));
        assert_eq!(retry_countdown(&o, 0, Some(Duration::from_millis(5))), Duration::from_millis(5));
    }

    #[test]
    fn huge_or_nan_settings_saturate() {
        let mut o = TaskOptions::new("t");
        o.default_retry_delay = f64::INFINITY;
        assert_eq!(retry_countdown(&o, 0, None), Duration::MAX);
        o.default_retry_delay = f64::NAN;
        assert_eq!(retry_countdown(&o, 0, None), Duration::ZERO);
        o.retry_backoff = Some(1e300);
        o.retry_backoff_max = f64::INFINITY;
        o.retry_jitter = false;
        assert_eq!(retry_countdown(&o, u32::MAX, None), Duration::MAX);
        o.retry_backoff = Some(-5.0);
        assert_eq!(retry_countdown(&o, 3, None), Duration::ZERO);
    }
}

/// Capped exponential backoff for reconnect loops: 100 ms doubling up to 10 s, with jitter.
///
/// ```
/// use celery_core::backoff::Reconnect;
/// let mut b = Reconnect::default();
/// let first = b.next_delay();
/// assert!(first <= std::time::Duration::from_millis(100));
/// b.reset();
/// ```
#[derive(Debug, Clone, Default)]
pub struct Reconnect {
    attempt: u32,
}

impl Reconnect {
    /// The delay before the next attempt.
    pub fn next_delay(&mut self) -> Duration {
        let cap = (0.1 * 2f64.powi(self.attempt.min(10) as i32)).min(10.0);
        self.attempt += 1;
        Duration::from_secs_f64(cap * (0.5 + rand::random::<f64>() * 0.5))
    }

    /// How many attempts failed in a row.
    pub fn attempts(&self) -> u32 {
        self.attempt
    }

    /// After a success.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    /// The one reconnect step every loop takes after a failure: picks the next delay, logs `what`
    /// failed with the error, the attempt and the delay at `warn`, and sleeps for it. Returns the
    /// delay slept.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// use celery_core::backoff::Reconnect;
    /// let mut backoff = Reconnect::default();
    /// let err = std::io::Error::other("connection refused");
    /// let slept = backoff.pause("redis consumer", &err).await;
    /// assert!(slept <= std::time::Duration::from_millis(100));
    /// assert_eq!(backoff.attempts(), 1);
    /// # }
    /// ```
    pub async fn pause(&mut self, what: &str, error: &(dyn std::fmt::Display + Sync)) -> Duration {
        let delay = self.next_delay();
        tracing::warn!(what, error = %error, attempt = self.attempt, retry_in = ?delay, "connection lost; reconnecting");
        tokio::time::sleep(delay).await;
        delay
    }

    /// Runs `op` until it succeeds, fails with an error `worth_retrying` refuses, or has been
    /// retried `retries` times, with a [`pause`](Reconnect::pause) (named `what`) before each
    /// retry; returns the last outcome.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// use celery_core::backoff::Reconnect;
    /// let mut calls = 0;
    /// let got: Result<u32, std::io::Error> = Reconnect::default()
    ///     .retry(5, "a flaky call", |_| true, || {
    ///         calls += 1;
    ///         let n = calls;
    ///         async move { if n < 3 { Err(std::io::Error::other("not yet")) } else { Ok(n) } }
    ///     })
    ///     .await;
    /// assert_eq!(got.unwrap(), 3);
    /// # }
    /// ```
    pub async fn retry<T, E, F, Fut>(
        &mut self,
        retries: u32,
        what: &str,
        worth_retrying: impl Fn(&E) -> bool,
        mut op: F,
    ) -> Result<T, E>
    where
        E: std::fmt::Display + Sync,
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, E>>,
    {
        loop {
            match op().await {
                Err(e) if worth_retrying(&e) && self.attempts() < retries => {
                    self.pause(what, &e).await;
                }
                other => return other,
            }
        }
    }
}

/// Runs a broker operation, retrying connection errors ([`BrokerError::is_retryable`]) up to three
/// attempts with backoff; any other error, or the third failure, is returned.
///
/// ```no_run
/// # async fn demo(app: celery_core::App, msg: celery_core::protocol::Message) -> Result<(), celery_core::BrokerError> {
/// let route = celery_core::routing::Route::queue("celery");
/// celery_core::backoff::retrying(|| app.broker().publish(&route, &msg)).await?;
/// # Ok(()) }
/// ```
///
/// [`BrokerError::is_retryable`]: crate::BrokerError::is_retryable
pub async fn retrying<T, F, Fut>(op: F) -> Result<T, crate::BrokerError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, crate::BrokerError>>,
{
    Reconnect::default().retry(2, "broker operation", crate::BrokerError::is_retryable, op).await
}

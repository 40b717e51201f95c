//! Time arithmetic on values that input controls (countdowns, etas, expiries, time limits, rate
//! limits, lease and result ttls): every conversion and sum saturates instead of panicking or
//! wrapping.
//!
//! Invariants: a negative or NaN number of seconds is zero; one too large for a [`Duration`] (or
//! infinite) is [`Duration::MAX`]; a time too far ahead is the latest one a Celery message can carry
//! ([`latest`], the end of year 9999: ISO-8601 with four-digit years), and for a
//! [`tokio::time::Instant`] about 30 years ahead, as tokio's own timers do. So a huge ttl means
//! "practically never", never "already expired", and a huge time limit means "no limit".
//!
//! ```
//! use std::time::Duration;
//! use celery_core::clock;
//! assert_eq!(clock::secs_f64(-1.0), Duration::ZERO);
//! assert_eq!(clock::secs_f64(f64::NAN), Duration::ZERO);
//! assert_eq!(clock::secs_f64(1e300), Duration::MAX);
//! assert_eq!(clock::millis(Duration::MAX), u64::MAX);
//! let t = chrono::Utc::now();
//! assert_eq!(clock::after(t, Duration::MAX), clock::latest());
//! ```

use std::time::Duration;

use chrono::{DateTime, Utc};

/// About 30 years: the horizon of [`instant_after`] (what tokio uses for "never").
const FAR: Duration = Duration::from_secs(86_400 * 365 * 30);

/// The longest ttl a store is asked for (100 years): a longer one is this. Stores such as Redis
/// refuse expiry times past their clock's range (so a longer ttl would fail or wrap).
pub const LONGEST_TTL: Duration = Duration::from_secs(100 * 365 * 86_400);

/// `d`, at most [`LONGEST_TTL`].
pub fn ttl(d: Duration) -> Duration {
    d.min(LONGEST_TTL)
}

/// A number of seconds as a duration: zero when negative or NaN, [`Duration::MAX`] when too large.
pub fn secs_f64(secs: f64) -> Duration {
    match Duration::try_from_secs_f64(secs) {
        Ok(d) => d,
        Err(_) if secs > 0.0 => Duration::MAX,
        Err(_) => Duration::ZERO,
    }
}

/// A positive, finite-or-huge number of seconds as a duration; `None` for zero, negative or NaN
/// (what "no limit" means in Celery's time limit headers).
pub fn positive_secs(secs: f64) -> Option<Duration> {
    (secs > 0.0).then(|| secs_f64(secs))
}

/// Whole milliseconds, saturating at `u64::MAX`.
pub fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Whole milliseconds, saturating at `i64::MAX`.
pub fn millis_i64(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// The same span as a chrono duration, saturating at chrono's largest.
pub fn chrono(d: Duration) -> chrono::Duration {
    chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX)
}

/// The latest time a message carries: 9999-12-31T23:59:59.999999Z (what ISO-8601 with four-digit
/// years, as Celery writes times, can express).
pub fn latest() -> DateTime<Utc> {
    DateTime::from_timestamp(253_402_300_799, 999_999_000).unwrap_or(DateTime::<Utc>::MAX_UTC)
}

/// `t + d`, saturating at [`latest`].
pub fn after(t: DateTime<Utc>, d: Duration) -> DateTime<Utc> {
    t.checked_add_signed(chrono(d)).map_or_else(latest, |s| s.min(latest()))
}

/// `d` from now on the runtime's clock, saturating about 30 years ahead.
pub fn instant_after(d: Duration) -> tokio::time::Instant {
    instant_from(tokio::time::Instant::now(), d)
}

/// `t + d` on the runtime's clock, saturating about 30 years after `t`.
pub fn instant_from(t: tokio::time::Instant, d: Duration) -> tokio::time::Instant {
    t + d.min(FAR)
}

/// `ms_since_epoch + d` in milliseconds, saturating at `i64::MAX` (an expiry that never comes).
pub fn expiry_ms(ms_since_epoch: i64, d: Duration) -> i64 {
    ms_since_epoch.saturating_add(millis_i64(d))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seconds_saturate() {
        assert_eq!(secs_f64(1.5), Duration::from_millis(1500));
        assert_eq!(secs_f64(-0.0), Duration::ZERO);
        assert_eq!(secs_f64(f64::NEG_INFINITY), Duration::ZERO);
        assert_eq!(secs_f64(f64::INFINITY), Duration::MAX);
        assert_eq!(secs_f64(u64::MAX as f64 * 2.0), Duration::MAX);
        assert_eq!(positive_secs(0.0), None);
        assert_eq!(positive_secs(f64::NAN), None);
        assert_eq!(positive_secs(-3.0), None);
        assert_eq!(positive_secs(1e300), Some(Duration::MAX));
    }

    #[test]
    fn sums_saturate() {
        assert_eq!(millis(Duration::from_secs(u64::MAX)), u64::MAX);
        assert_eq!(millis_i64(Duration::MAX), i64::MAX);
        assert_eq!(expiry_ms(1_700_000_000_000, Duration::MAX), i64::MAX);
        assert_eq!(expiry_ms(1_000, Duration::from_secs(1)), 2_000);
        assert_eq!(ttl(Duration::MAX), LONGEST_TTL);
        assert_eq!(ttl(Duration::from_secs(5)), Duration::from_secs(5));
        let now = Utc::now();
        assert_eq!(after(now, Duration::from_secs(u64::MAX)), latest());
        let formatted = crate::protocol::format_time(latest());
        assert_eq!(crate::protocol::parse_time(&formatted), Ok(latest()), "{formatted}");
        assert_eq!(after(now, Duration::from_secs(2)), now + chrono::Duration::seconds(2));
        assert!(after(now, Duration::from_secs(u64::MAX / 1000)) > now);
    }

    #[tokio::test(start_paused = true)]
    async fn instants_saturate() {
        let now = tokio::time::Instant::now();
        assert_eq!(instant_from(now, Duration::MAX), now + FAR);
        assert_eq!(instant_from(now, Duration::from_secs(3)), now + Duration::from_secs(3));
        assert!(instant_after(Duration::MAX) > now);
    }
}

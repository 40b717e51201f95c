//! What a consumer knows locally about its own heartbeat: whether a delivery it fetched can still
//! be its own without asking the broker. Shared by the brokers that tie leases to a worker's
//! heartbeat (Redis: a key per worker; PostgreSQL: a row per worker).
//!
//! The *epoch* counts the lapses the consumer has seen (a renewal that found its heartbeat expired
//! or taken): a delivery fetched in an earlier epoch may have been given to another worker since.
//! A delivery fetched in the current epoch is surely still held while the last renewal that found
//! the heartbeat alive was sent less than nine tenths of the grace ago: the heartbeat cannot have
//! expired yet (the broker's server keeps its time to live; the margin absorbs clock rates).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use celery_core::sync::lock;
use celery_core::url::{ServiceUrl, UrlError};

/// The default `worker_heartbeat`.
pub const DEFAULT_WORKER_HEARTBEAT: Duration = Duration::from_secs(2);
/// The default `worker_grace`.
pub const DEFAULT_WORKER_GRACE: Duration = Duration::from_secs(10);

/// The URL options `worker_heartbeat` and `worker_grace` (seconds), read from `u` and checked: the
/// heartbeat from 0.1 s to 60 s (default 2), the grace from twice the heartbeat to 3600 s
/// (default 10, or five heartbeats if that is longer).
pub(crate) fn options(u: &ServiceUrl) -> Result<(Duration, Duration), UrlError> {
    let beat = u.seconds("worker_heartbeat")?.unwrap_or(DEFAULT_WORKER_HEARTBEAT);
    let grace = u.seconds("worker_grace")?.unwrap_or(DEFAULT_WORKER_GRACE.max(beat * 5));
    if beat < Duration::from_millis(100) || beat > Duration::from_secs(60) {
        return Err(u.invalid("worker_heartbeat is from 0.1 to 60 seconds"));
    }
    if grace < beat * 2 || grace > Duration::from_secs(3600) {
        return Err(u.invalid("worker_grace is from twice worker_heartbeat to 3600 seconds"));
    }
    Ok((beat, grace))
}

/// A consumer's view of its own heartbeat.
#[derive(Debug)]
pub(crate) struct Liveness {
    grace: Duration,
    epoch: AtomicU64,
    /// When the last renewal that found the heartbeat alive and ours was sent.
    last_ok: Mutex<Option<Instant>>,
}

impl Liveness {
    /// A heartbeat whose time to live is `grace`, not renewed yet.
    pub(crate) fn new(grace: Duration) -> Liveness {
        Liveness { grace, epoch: AtomicU64::new(0), last_ok: Mutex::new(None) }
    }

    /// The grace (the heartbeat's time to live).
    pub(crate) fn grace(&self) -> Duration {
        self.grace
    }

    /// The current epoch: read it *before* a fetch is sent.
    pub(crate) fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::SeqCst)
    }

    /// A renewal sent at `sent` found the heartbeat alive and ours.
    pub(crate) fn renewed(&self, sent: Instant) {
        *lock(&self.last_ok) = Some(sent);
    }

    /// A renewal found the heartbeat lapsed: set again at `sent` (`Some`), or held by another
    /// process (`None`).
    pub(crate) fn lapsed(&self, sent: Option<Instant>) {
        self.epoch.fetch_add(1, Ordering::SeqCst);
        *lock(&self.last_ok) = sent;
    }

    /// True when a delivery fetched in epoch `since` is certainly still held, without asking.
    pub(crate) fn surely_held(&self, since: u64) -> bool {
        self.epoch() == since && lock(&self.last_ok).is_some_and(|t| t.elapsed() < self.grace * 9 / 10)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn held_only_within_the_grace_and_the_epoch() {
        let l = Liveness::new(Duration::from_secs(10));
        assert!(!l.surely_held(0), "never renewed");
        l.renewed(Instant::now());
        assert!(l.surely_held(0));
        let old = Instant::now().checked_sub(Duration::from_secs(9)).unwrap();
        l.renewed(old);
        assert!(!l.surely_held(0), "renewed too long ago");
        l.lapsed(Some(Instant::now()));
        assert!(!l.surely_held(0), "fetched before a lapse");
        assert!(l.surely_held(1), "fetched after it");
        l.lapsed(None);
        assert!(!l.surely_held(2), "the heartbeat is someone else's");
    }
}

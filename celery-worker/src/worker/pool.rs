//! The worker's pool: how many tasks may hold a slot at once, a size that remote control
//! (`pool_grow`, `pool_shrink`) and the autoscaler change while the worker runs.
//!
//! A slot is a permit of one semaphore, taken before the next reserved delivery is started and
//! held until that delivery is settled. Growing adds permits at once (first cancelling what a
//! shrink still owes). Shrinking takes free permits away at once and owes the rest: the next slots
//! given back by running tasks are discarded instead of freed, so a task that runs is never
//! stopped by a shrink and no new one starts until the pool is down to its size. The size is the
//! target: `permits out + permits free - permits owed`.
//!
//! Invariants: the size stays within [`MAX_POOL`]; [`Pool::held`] counts slots held right now, so
//! [`Pool::idle`] (what shutdown waits for) does not depend on the size at the time.
//!
//! The autoscaler (`worker --autoscale MAX,MIN`) follows Celery's: the wanted size is the number
//! of tasks the worker holds (running plus reserved), kept within `[min, max]`; it grows as soon
//! as more are held than there are slots, and shrinks only once `keepalive` has passed since it
//! last grew.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use celery_core::sync::lock;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

/// The largest pool a worker accepts (from its configuration, `pool_grow` or `autoscale`).
pub(crate) const MAX_POOL: usize = 10_000;

/// The concurrency limit of a running worker.
#[derive(Debug)]
pub(crate) struct Pool {
    slots: Arc<Semaphore>,
    /// The target size.
    size: Mutex<usize>,
    /// Slots held now.
    held: Arc<AtomicUsize>,
    /// Permits a shrink still has to take away (from slots given back).
    owed: Arc<AtomicUsize>,
    /// Woken when `held` drops to zero.
    emptied: Arc<Notify>,
}

/// One held slot; given back when dropped.
#[derive(Debug)]
pub(crate) struct Slot {
    permit: Option<OwnedSemaphorePermit>,
    held: Arc<AtomicUsize>,
    owed: Arc<AtomicUsize>,
    emptied: Arc<Notify>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(p) = self.permit.take() {
            if self.owed.fetch_update(Ordering::AcqRel, Ordering::Acquire, |o| o.checked_sub(1)).is_ok() {
                // Owed to a shrink: the pool is one smaller from now on.
                p.forget();
            }
        }
        if self.held.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.emptied.notify_waiters();
        }
    }
}

impl Pool {
    /// A pool of `size` slots (within `0..=MAX_POOL`).
    pub(crate) fn new(size: usize) -> Pool {
        let size = size.min(MAX_POOL);
        Pool {
            slots: Arc::new(Semaphore::new(size)),
            size: Mutex::new(size),
            held: Arc::default(),
            owed: Arc::default(),
            emptied: Arc::default(),
        }
    }

    /// The target size.
    pub(crate) fn size(&self) -> usize {
        *lock(&self.size)
    }

    /// Slots held now (by tasks started, waiting on a rate limit or a near eta).
    pub(crate) fn held(&self) -> usize {
        self.held.load(Ordering::Acquire)
    }

    /// Waits for a free slot; `None` once the pool is closed.
    pub(crate) async fn acquire(&self) -> Option<Slot> {
        if let Some(slot) = self.try_acquire() {
            return Some(slot);
        }
        let permit = self.slots.clone().acquire_owned().await.ok()?;
        Some(self.hold(permit))
    }

    /// A free slot now, if there is one (and no one queued before).
    pub(crate) fn try_acquire(&self) -> Option<Slot> {
        let permit = self.slots.clone().try_acquire_owned().ok()?;
        Some(self.hold(permit))
    }

    /// A slot for a permit just taken, counted as held.
    fn hold(&self, permit: OwnedSemaphorePermit) -> Slot {
        self.held.fetch_add(1, Ordering::AcqRel);
        Slot { permit: Some(permit), held: self.held.clone(), owed: self.owed.clone(), emptied: self.emptied.clone() }
    }

    /// Resolves once no slot is held.
    pub(crate) async fn idle(&self) {
        loop {
            let emptied = self.emptied.notified();
            tokio::pin!(emptied);
            emptied.as_mut().enable();
            if self.held() == 0 {
                return;
            }
            emptied.await;
        }
    }

    /// Sets the size to `target` (within `floor..=MAX_POOL`); returns the new size.
    pub(crate) fn resize(&self, target: usize, floor: usize) -> usize {
        let mut size = lock(&self.size);
        let target = target.clamp(floor.min(MAX_POOL), MAX_POOL);
        if target > *size {
            let grow = target - *size;
            let cancelled = self
                .owed
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |o| Some(o - o.min(grow)))
                .map_or(0, |before| before.min(grow));
            self.slots.add_permits(grow - cancelled);
        } else if target < *size {
            let shrink = *size - target;
            let rest = shrink - self.slots.forget_permits(shrink);
            // Taken as running tasks end: a shrink never stops a task.
            self.owed.fetch_add(rest, Ordering::AcqRel);
        }
        tracing::info!(from = *size, to = target, "pool resized");
        *size = target;
        target
    }

    /// Grows by `n`; returns the new size.
    pub(crate) fn grow(&self, n: usize) -> usize {
        let size = self.size();
        self.resize(size.saturating_add(n), 0)
    }

    /// Shrinks by `n`, never below `floor`; returns the new size.
    pub(crate) fn shrink(&self, n: usize, floor: usize) -> usize {
        let size = self.size();
        self.resize(size.saturating_sub(n), floor)
    }
}

/// The autoscaler's settings and state (`worker --autoscale MAX,MIN`, `control autoscale`).
#[derive(Debug)]
pub(crate) struct Autoscaler {
    bounds: Mutex<(usize, usize)>,
    keepalive: Duration,
    last_scale_up: Mutex<Option<Instant>>,
}

impl Autoscaler {
    /// An autoscaler between `min` and `max` slots (`max` at least 1 and `min` at most `max`,
    /// both within [`MAX_POOL`]).
    pub(crate) fn new(max: usize, min: usize, keepalive: Duration) -> Autoscaler {
        let (max, min) = Autoscaler::bound(max, min);
        Autoscaler { bounds: Mutex::new((max, min)), keepalive, last_scale_up: Mutex::new(None) }
    }

    fn bound(max: usize, min: usize) -> (usize, usize) {
        let max = max.clamp(1, MAX_POOL);
        (max, min.min(max))
    }

    /// `(max, min)`.
    pub(crate) fn bounds(&self) -> (usize, usize) {
        *lock(&self.bounds)
    }

    /// Changes the bounds (either may be kept) and moves the pool inside them at once, as
    /// Celery's `Autoscaler.update`; returns the new `(max, min)`.
    pub(crate) fn update(&self, pool: &Pool, max: Option<usize>, min: Option<usize>) -> (usize, usize) {
        let mut b = lock(&self.bounds);
        let (max, min) = Autoscaler::bound(max.unwrap_or(b.0), min.unwrap_or(b.1));
        *b = (max, min);
        let size = pool.size();
        if size > max {
            pool.resize(max, 0);
        } else if size < min {
            pool.resize(min, 0);
        }
        (max, min)
    }

    /// One step: grow to the number of tasks held (`qty`: running plus reserved) when it exceeds
    /// the pool, within `max`; shrink toward `max(qty, min)` once `keepalive` passed since the last
    /// growth. Returns the new size when it changed.
    pub(crate) fn scale(&self, pool: &Pool, qty: usize) -> Option<usize> {
        let (max, min) = self.bounds();
        let size = pool.size();
        let up = qty.min(max);
        if up > size {
            *lock(&self.last_scale_up) = Some(Instant::now());
            tracing::info!(from = size, to = up, "autoscaler: scaling up");
            return Some(pool.resize(up, 0));
        }
        let down = qty.max(min);
        let cooled = lock(&self.last_scale_up).is_none_or(|t| t.elapsed() > self.keepalive);
        if down < size && cooled {
            tracing::info!(from = size, to = down, "autoscaler: scaling down");
            return Some(pool.resize(down, 0));
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn growing_adds_slots_and_shrinking_waits_for_running_tasks() {
        let pool = Pool::new(1);
        let a = pool.acquire().await.unwrap();
        assert_eq!(pool.grow(2), 3);
        let b = pool.acquire().await.unwrap();
        let c = pool.acquire().await.unwrap();
        assert_eq!(pool.held(), 3);
        // Three run; shrinking to one stops none of them, but no new slot is free until two end.
        assert_eq!(pool.shrink(2, 1), 1);
        drop(a);
        tokio::task::yield_now().await;
        assert!(pool.slots.available_permits() == 0);
        drop(b);
        drop(c);
        let d = tokio::time::timeout(Duration::from_secs(5), pool.acquire()).await.unwrap().unwrap();
        assert_eq!((pool.size(), pool.held()), (1, 1));
        assert!(pool.slots.available_permits() == 0, "one slot in all");
        drop(d);
        tokio::time::timeout(Duration::from_secs(5), pool.idle()).await.unwrap();
        assert_eq!(pool.shrink(5, 1), 1, "never below the floor");
        assert_eq!(pool.grow(usize::MAX), MAX_POOL, "bounded");
    }

    #[tokio::test]
    async fn growing_cancels_what_a_shrink_still_owes() {
        let pool = Pool::new(2);
        let a = pool.acquire().await.unwrap();
        let b = pool.acquire().await.unwrap();
        pool.shrink(2, 0);
        assert_eq!(pool.owed.load(Ordering::Acquire), 2);
        pool.grow(1);
        assert_eq!((pool.size(), pool.owed.load(Ordering::Acquire)), (1, 1));
        assert_eq!(pool.slots.available_permits(), 0);
        drop(a);
        assert_eq!(pool.slots.available_permits(), 0, "paid the debt");
        drop(b);
        assert_eq!(pool.slots.available_permits(), 1, "one slot in all");
    }

    #[tokio::test(start_paused = true)]
    async fn the_autoscaler_follows_the_load_and_waits_keepalive_before_shrinking() {
        let pool = Pool::new(1);
        let scaler = Autoscaler::new(4, 1, Duration::from_secs(30));
        assert_eq!(scaler.scale(&pool, 3), Some(3));
        assert_eq!(scaler.scale(&pool, 9), Some(4), "at most max");
        assert_eq!(scaler.scale(&pool, 0), None, "not within keepalive of the last growth");
        tokio::time::advance(Duration::from_secs(31)).await;
        assert_eq!(scaler.scale(&pool, 2), Some(2));
        assert_eq!(scaler.scale(&pool, 0), Some(1), "at least min");
        assert_eq!(scaler.update(&pool, Some(8), Some(5)), (8, 5));
        assert_eq!(pool.size(), 5, "raised to the new min at once");
        assert_eq!(scaler.update(&pool, Some(2), None), (2, 2), "min never above max");
        assert_eq!(pool.size(), 2);
    }
}

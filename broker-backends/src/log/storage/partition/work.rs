//! Who is told when a partition may have records to take.
//!
//! A consumer of many queues keeps the partitions that may have work in a list of its own
//! ([`WorkList`]), in the order they got it: finding the next record costs the same whether the
//! consumer reads ten queues or ten thousand, and an idle partition costs it nothing per take
//! (before, every take looked at every consumed partition, so draining N queues cost N² looks).
//!
//! Each partition has a [`WorkSignal`]: a flag (false only when a take found nothing since, so a
//! take of an idle partition returns without its lock) and the lists watching it. Whatever may give
//! the partition a record to take (records published, a lease returned or expired, a take that
//! found one and may find more) calls [`WorkSignal::raise`], which queues the partition once on every
//! watching list.
//!
//! Invariant: a partition with a record to take is queued on every list watching it, or the
//! consumer of that list is taking from it now (and queues it again if it took one, see
//! `Partition::take`). A list holds each partition at most once, so it never holds more entries
//! than its consumer reads partitions. Records not yet due are the one exception: a take that finds
//! only those leaves the flag set without queueing, and each consumer that saw it sets a timer of
//! its own for the earliest due time (`consumer.rs`).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};

use celery_core::sync::lock;
use tokio::sync::Notify;

/// A partition's "may have work" flag and the lists to tell.
#[derive(Debug)]
pub(crate) struct WorkSignal {
    /// False only when a take found nothing since it was last set.
    maybe: AtomicBool,
    /// The lists watching this partition, with the partition's slot in each.
    watchers: Mutex<Vec<(Weak<WorkList>, u32)>>,
}

impl Default for WorkSignal {
    /// Set: a partition just opened may hold records.
    fn default() -> Self {
        WorkSignal { maybe: AtomicBool::new(true), watchers: Mutex::default() }
    }
}

impl WorkSignal {
    /// The partition may have records to take: sets the flag and queues the partition on every
    /// watching list that does not hold it yet. Call it after the records are readable.
    pub(crate) fn raise(&self) {
        self.maybe.store(true, Ordering::SeqCst);
        lock(&self.watchers).retain(|(list, slot)| match list.upgrade() {
            Some(list) => {
                list.push(*slot);
                true
            }
            None => false,
        });
    }

    /// Sets the flag without queueing the partition anywhere (records wait for their time: the
    /// consumers that saw them set timers).
    pub(crate) fn keep(&self) {
        self.maybe.store(true, Ordering::SeqCst);
    }

    /// Clears the flag before a take looks; false when it was clear (nothing to look at).
    pub(crate) fn clear(&self) -> bool {
        self.maybe.swap(false, Ordering::SeqCst)
    }

    /// Tells `list` (as `slot`) from now on, and queues the partition there once now (it may hold
    /// records from before).
    pub(crate) fn watch(&self, list: &Arc<WorkList>, slot: u32) {
        lock(&self.watchers).push((Arc::downgrade(list), slot));
        list.push(slot);
    }

    /// Stops telling `list`.
    pub(crate) fn unwatch(&self, list: &WorkList) {
        lock(&self.watchers).retain(|(l, _)| l.strong_count() > 0 && !std::ptr::eq(l.as_ptr(), list));
    }

    /// Lists watching now.
    #[cfg(test)]
    pub(crate) fn watchers(&self) -> usize {
        lock(&self.watchers).len()
    }
}

/// One consumer's partitions that may have work (by the consumer's slot numbers), oldest first,
/// each at most once.
#[derive(Debug, Default)]
pub(crate) struct WorkList {
    inner: Mutex<Queued>,
    /// Notified on every push (a push with nobody waiting leaves a permit: no wake-up is lost).
    pub(crate) pushed: Notify,
}

#[derive(Debug, Default)]
struct Queued {
    order: VecDeque<u32>,
    /// By slot: in `order` now.
    queued: Vec<bool>,
}

impl WorkList {
    /// An empty list.
    pub(crate) fn new() -> Arc<WorkList> {
        Arc::default()
    }

    /// Queues `slot` unless it is queued already.
    pub(crate) fn push(&self, slot: u32) {
        let mut q = lock(&self.inner);
        let i = slot as usize;
        if q.queued.len() <= i {
            q.queued.resize(i + 1, false);
        }
        if q.queued[i] {
            return;
        }
        q.queued[i] = true;
        q.order.push_back(slot);
        drop(q);
        self.pushed.notify_one();
    }

    /// The slot queued longest, taken off the list.
    pub(crate) fn pop(&self) -> Option<u32> {
        let mut q = lock(&self.inner);
        let slot = q.order.pop_front()?;
        q.queued[slot as usize] = false;
        if q.order.is_empty() && q.order.capacity() > 1024 {
            // After a burst over many queues: an idle consumer keeps no large buffer.
            q.order = VecDeque::new();
        }
        Some(slot)
    }

    /// Slots queued now.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        lock(&self.inner).order.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_raised_partition_is_queued_once_on_every_watching_list() {
        let (a, b) = (WorkList::new(), WorkList::new());
        let (p, q) = (WorkSignal::default(), WorkSignal::default());
        p.watch(&a, 0);
        q.watch(&a, 1);
        p.watch(&b, 7);
        assert_eq!((a.len(), b.len()), (2, 1), "watching queues the partition once");
        p.raise();
        p.raise();
        q.raise();
        assert_eq!((a.len(), b.len()), (2, 1), "raised while queued: still once");
        assert_eq!((a.pop(), a.pop(), a.pop()), (Some(0), Some(1), None), "in the order they got work");
        q.raise();
        p.raise();
        assert_eq!((a.pop(), a.pop()), (Some(1), Some(0)));
        assert_eq!((b.pop(), b.pop()), (Some(7), None));
    }

    #[test]
    fn the_flag_skips_a_partition_that_was_found_idle_until_it_is_raised() {
        let s = WorkSignal::default();
        assert!(s.clear(), "a partition just opened may hold records");
        assert!(!s.clear(), "found idle: skipped");
        s.keep();
        assert!(s.clear());
        s.raise();
        assert!(s.clear());
    }

    #[test]
    fn a_list_that_is_gone_or_unwatched_is_not_told() {
        let (a, b) = (WorkList::new(), WorkList::new());
        let s = WorkSignal::default();
        s.watch(&a, 0);
        s.watch(&b, 0);
        assert_eq!(s.watchers(), 2);
        s.unwatch(&a);
        assert_eq!(s.watchers(), 1);
        drop(b);
        s.raise();
        assert_eq!(s.watchers(), 0, "a dropped list leaves at the next raise");
        assert_eq!(a.pop(), Some(0), "queued when it watched");
        s.raise();
        assert_eq!(a.pop(), None, "unwatched: not queued again");
    }

    #[tokio::test]
    async fn a_push_before_the_consumer_waits_still_wakes_it() {
        let a = WorkList::new();
        a.push(3);
        // The permit was left by the push: this returns at once.
        tokio::time::timeout(std::time::Duration::from_secs(10), a.pushed.notified()).await.unwrap();
        assert_eq!(a.pop(), Some(3));
    }
}

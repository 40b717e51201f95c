//! Requests gathered for one call while the call before is on its way (group commit): the worker
//! takes key slots ([`super::key_slots`]) and stores task states ([`super::stores`]) this way, so
//! that tasks ending together cost the broker or backend one round trip, not one each.

/// Requests waiting for the next call of a batch: while one call is in flight (`busy`), later
/// requests queue here; the task that sends them drains the queue until empty, at most `MAX`
/// requests a call.
#[derive(Debug)]
pub(super) struct Batch<T, const MAX: usize> {
    queued: Vec<T>,
    busy: bool,
}

impl<T, const MAX: usize> Default for Batch<T, MAX> {
    fn default() -> Self {
        Batch { queued: Vec::new(), busy: false }
    }
}

impl<T, const MAX: usize> Batch<T, MAX> {
    /// Queues `item`; true when no call is in flight (the caller starts one).
    pub(super) fn push(&mut self, item: T) -> bool {
        self.queued.push(item);
        !std::mem::replace(&mut self.busy, true)
    }

    /// The next requests to send (up to `MAX`), or none, and then no call is in flight any more.
    pub(super) fn next(&mut self) -> Option<Vec<T>> {
        if self.queued.is_empty() {
            self.busy = false;
            return None;
        }
        let n = self.queued.len().min(MAX);
        Some(self.queued.drain(..n).collect())
    }

    /// Everything queued, taken out, and no call in flight any more: for a sender that ends
    /// without draining (the next request starts a call again).
    pub(super) fn abandon(&mut self) -> Vec<T> {
        self.busy = false;
        std::mem::take(&mut self.queued)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_queues_while_busy_and_is_sent_in_bounded_calls() {
        let mut b = Batch::<usize, 4>::default();
        assert!(b.push(1), "the first request starts a call");
        assert!(!b.push(2), "later ones queue while it is in flight");
        assert_eq!(b.next(), Some(vec![1, 2]));
        for i in 0..5 {
            assert!(!b.push(i), "still in flight");
        }
        assert_eq!(b.next(), Some(vec![0, 1, 2, 3]));
        assert_eq!(b.next(), Some(vec![4]));
        assert_eq!(b.next(), None);
        assert!(b.push(7), "once drained, the next request starts a call again");
        assert!(!b.push(8));
        assert_eq!(b.abandon(), vec![7, 8]);
        assert!(b.push(9), "once abandoned, the next request starts a call again");
    }
}

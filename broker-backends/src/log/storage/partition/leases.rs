//! The lease state of a partition: the records handed to consumers and not settled yet, who holds
//! each (the consumer renews the leases it owns while it lives) and until when. A lease ends when
//! its record is settled, or when its deadline passes without renewal; then the partition hands
//! the record out again (or dead-letters it). Leases live in memory only: after a restart, an
//! unfinished record counts one earlier delivery instead (see `Partition::open`).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::Arc;
use std::time::Instant;

use crate::log::storage::record::Record;

/// A record handed to a consumer, until it is settled or its lease expires.
#[derive(Debug)]
pub(super) struct Lease {
    pub(super) deadline: Instant,
    /// The consumer that holds it (and renews it while it lives).
    pub(super) owner: u64,
    pub(super) deliveries: u32,
    pub(super) record: Arc<Record>,
}

/// The leases of one partition, by offset, with their deadlines earliest first.
#[derive(Debug, Default)]
pub(super) struct Leases {
    held: HashMap<u64, Lease>,
    /// (deadline, offset), earliest first. A renewal pushes a new entry and leaves the old one: an
    /// entry whose lease is gone or was renewed past it is skipped when it comes up.
    expiry: BinaryHeap<Reverse<(Instant, u64)>>,
}

impl Leases {
    /// Leases `record` to `owner` until `deadline`.
    pub(super) fn grant(&mut self, record: Arc<Record>, deliveries: u32, owner: u64, deadline: Instant) {
        self.expiry.push(Reverse((deadline, record.offset)));
        self.held.insert(record.offset, Lease { deadline, owner, deliveries, record });
    }

    /// Ends the lease of `offset` (settled); the lease, if there was one.
    pub(super) fn end(&mut self, offset: u64) -> Option<Lease> {
        self.held.remove(&offset)
    }

    /// True when `offset` is leased now.
    pub(super) fn contains(&self, offset: u64) -> bool {
        self.held.contains_key(&offset)
    }

    /// The offsets leased now.
    pub(super) fn offsets(&self) -> Vec<u64> {
        self.held.keys().copied().collect()
    }

    /// Extends every lease `owner` holds to `deadline`.
    pub(super) fn renew(&mut self, owner: u64, deadline: Instant) {
        for (o, l) in self.held.iter_mut().filter(|(_, l)| l.owner == owner) {
            l.deadline = deadline;
            self.expiry.push(Reverse((deadline, *o)));
        }
    }

    /// True when nothing is leased; the deadlines left behind (all stale then) are dropped.
    pub(super) fn settle_empty(&mut self) -> bool {
        if self.held.is_empty() {
            self.expiry = BinaryHeap::new();
        }
        self.held.is_empty()
    }

    /// Ends and returns the leases whose deadline is at or before `now`, earliest first.
    pub(super) fn expire(&mut self, now: Instant) -> Vec<Lease> {
        let mut out = Vec::new();
        while let Some(Reverse((deadline, offset))) = self.expiry.peek().cloned() {
            if deadline > now {
                break;
            }
            self.expiry.pop();
            if self.held.get(&offset).is_some_and(|l| l.deadline <= now) {
                out.extend(self.held.remove(&offset));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn rec(offset: u64) -> Arc<Record> {
        Arc::new(Record { offset, ..Record::default() })
    }

    #[test]
    fn renewed_leases_outlive_their_first_deadline_and_settled_ones_never_expire() {
        let now = Instant::now();
        let mut leases = Leases::default();
        leases.grant(rec(0), 1, 7, now);
        leases.grant(rec(1), 1, 8, now);
        leases.grant(rec(2), 2, 7, now);
        leases.renew(7, now + Duration::from_secs(60));
        assert!(leases.end(2).is_some() && !leases.contains(2));
        let expired: Vec<u64> = leases.expire(now).iter().map(|l| l.record.offset).collect();
        assert_eq!(expired, [1], "only the lease its owner did not renew");
        assert_eq!(leases.offsets(), [0]);
        let later: Vec<u64> = leases.expire(now + Duration::from_secs(61)).iter().map(|l| l.record.offset).collect();
        assert_eq!(later, [0]);
        assert!(leases.offsets().is_empty());
    }
}

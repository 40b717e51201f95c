//! The fair index of a partition: the records the cursor read ahead, by fairness key, served in
//! weighted round robin (`Signature::fairness_key`, `celery_core::flow::FairQueues`).
//!
//! While no record with a fairness key is waiting, the cursor hands records out in log order and
//! this index is empty. Once it reads a keyed one, the partition reads ahead (at most
//! [`FILL_PER_TAKE`] records per take, at most [`MAX_INDEXED`] indexed) and files each unfinished,
//! due record here under its key (unkeyed records under `""`, one more key); a take then serves
//! the key at the front of the ring up to its weight in a row, then moves it to the back. A key
//! whose line runs empty leaves the ring; one that gets records again joins at its back.
//!
//! Memory: an entry is the record's offset and position (32 bytes), and the record itself while
//! the records kept stay under [`MAX_CACHED_BYTES`] (the rest are read again when served); at most [`MAX_FAIRNESS_KEYS`] keys are tracked, the records of further keys share the
//! line [`OTHER`] until tracked keys drain.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use celery_core::flow::{FairnessWeights, MAX_FAIRNESS_KEYS};

use super::writer::Pos;
use crate::log::storage::record::Record;

/// At most this many records read ahead per take (a take holds the partition's lock while it
/// reads, and acks wait for that lock): a key queued behind a backlog of B records is seen after
/// B / 10,000 takes.
pub(super) const FILL_PER_TAKE: usize = 10_000;
/// At most this many records indexed per partition (24 bytes each): the cursor stops reading ahead
/// while the index is full, so fairness holds among the first million waiting records.
pub(super) const MAX_INDEXED: usize = 1_000_000;
/// The shared line of the keys past [`MAX_FAIRNESS_KEYS`] (a control character: no key has one).
pub(super) const OTHER: &str = "\u{1}other";

/// The most payload bytes the index keeps in memory per partition: records read ahead within it
/// are served without reading them again; the rest are read again (by position) when served.
pub(super) const MAX_CACHED_BYTES: usize = 8 << 20;

/// A record waiting in its key's line: where it is, and the record itself while the index's
/// cache has room ([`MAX_CACHED_BYTES`]).
#[derive(Debug, Clone)]
pub(super) struct Entry {
    pub(super) offset: u64,
    pub(super) at: Pos,
    pub(super) record: Option<Arc<Record>>,
}

impl Entry {
    fn cached_bytes(&self) -> usize {
        self.record.as_ref().map_or(0, |r| r.payload.len())
    }
}

/// The records read ahead, by fairness key, and whose turn it is.
#[derive(Debug, Default)]
pub(super) struct FairIndex {
    lines: HashMap<Arc<str>, VecDeque<Entry>>,
    /// The keys with records, in turn: the front one is served.
    ring: VecDeque<Arc<str>>,
    /// Deliveries left for the front key in this turn (0: its turn starts at the next take).
    credit: u32,
    len: usize,
    /// Payload bytes of the records kept in entries.
    cached: usize,
}

impl FairIndex {
    /// Records indexed.
    pub(super) fn len(&self) -> usize {
        self.len
    }

    pub(super) fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// True when no more records may be indexed.
    pub(super) fn is_full(&self) -> bool {
        self.len >= MAX_INDEXED
    }

    /// Files a record under `key` (`""`: unkeyed), keeping the record itself while the cache has
    /// room.
    pub(super) fn push(&mut self, key: &str, mut entry: Entry) {
        if self.cached + entry.cached_bytes() > MAX_CACHED_BYTES {
            entry.record = None;
        }
        self.cached += entry.cached_bytes();
        let key: Arc<str> = match self.lines.get_key_value(key) {
            Some((k, _)) => k.clone(),
            None if self.lines.len() >= MAX_FAIRNESS_KEYS && !self.lines.contains_key(OTHER) => {
                tracing::warn!(
                    keys = MAX_FAIRNESS_KEYS,
                    "log: fair index tracks its most keys: further keys share one line"
                );
                Arc::from(OTHER)
            }
            None if self.lines.len() >= MAX_FAIRNESS_KEYS => Arc::from(OTHER),
            None => Arc::from(key),
        };
        let line = self.lines.entry(key.clone()).or_default();
        if line.is_empty() {
            self.ring.push_back(key);
        }
        line.push_back(entry);
        self.len += 1;
    }

    /// The record [`next`](FairIndex::next) returns, left in place.
    pub(super) fn peek(&self) -> Option<&Entry> {
        self.ring.front().and_then(|k| self.lines.get(k)).and_then(|l| l.front())
    }

    /// The next record to serve: the front key's oldest, the front key moving to the back once it
    /// had its weight in a row (or ran empty).
    pub(super) fn next(&mut self, weights: &FairnessWeights) -> Option<Entry> {
        let key = self.ring.front()?.clone();
        if self.credit == 0 {
            self.credit = weights.weight(&key).max(1);
        }
        let line = self.lines.get_mut(&key)?;
        let entry = line.pop_front()?;
        self.len -= 1;
        self.cached -= entry.cached_bytes();
        self.credit -= 1;
        if line.is_empty() {
            self.lines.remove(&key);
            self.ring.pop_front();
            self.credit = 0;
        } else if self.credit == 0 {
            self.ring.rotate_left(1);
        }
        Some(entry)
    }

    /// Drops every record below `first` (retention deleted them).
    pub(super) fn retain_from(&mut self, first: u64) {
        for line in self.lines.values_mut() {
            line.retain(|e| e.offset >= first);
        }
        self.lines.retain(|_, line| !line.is_empty());
        self.len = self.lines.values().map(VecDeque::len).sum();
        self.cached = self.lines.values().flatten().map(Entry::cached_bytes).sum();
        let lines = &self.lines;
        self.ring.retain(|k| lines.contains_key(k));
        self.credit = 0;
    }

    /// Forgets every record (purge).
    pub(super) fn clear(&mut self) {
        *self = FairIndex::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(offset: u64) -> Entry {
        Entry { offset, at: Pos { seg: 0, byte: offset }, record: None }
    }

    #[test]
    fn records_are_kept_only_within_the_cache_budget() {
        let mut ix = FairIndex::default();
        let big = Arc::new(Record { payload: vec![0; MAX_CACHED_BYTES / 2 + 1], ..Record::default() });
        for o in 0..3 {
            ix.push("a", Entry { record: Some(big.clone()), ..e(o) });
        }
        let kept: Vec<bool> = ix.lines["a"].iter().map(|e| e.record.is_some()).collect();
        assert_eq!(kept, [true, false, false]);
        ix.next(&FairnessWeights::default());
        assert_eq!(ix.cached, 0);
        ix.push("a", Entry { record: Some(big), ..e(3) });
        assert_eq!(ix.cached, MAX_CACHED_BYTES / 2 + 1);
    }

    fn order(ix: &mut FairIndex, w: &FairnessWeights) -> Vec<u64> {
        std::iter::from_fn(|| ix.next(w)).map(|e| e.offset).collect()
    }

    #[test]
    fn keys_take_turns_by_weight_in_log_order_within_a_key() {
        let mut ix = FairIndex::default();
        for o in 0..6 {
            ix.push("a", e(o));
        }
        ix.push("b", e(10));
        ix.push("", e(11));
        ix.push("b", e(12));
        let w = FairnessWeights::new(vec!["a=3".parse().unwrap()]).unwrap();
        assert_eq!(ix.len(), 9);
        assert_eq!(order(&mut ix, &w), vec![0, 1, 2, 10, 11, 3, 4, 5, 12]);
        assert!(ix.is_empty());
    }

    #[test]
    fn a_key_that_drains_joins_at_the_back_again() {
        let w = FairnessWeights::default();
        let mut ix = FairIndex::default();
        ix.push("a", e(0));
        ix.push("b", e(1));
        assert_eq!(ix.next(&w).unwrap().offset, 0);
        ix.push("a", e(2));
        ix.push("c", e(3));
        assert_eq!(order(&mut ix, &w), vec![1, 2, 3]);
    }

    #[test]
    fn keys_past_the_limit_share_one_line() {
        let w = FairnessWeights::default();
        let mut ix = FairIndex::default();
        for k in 0..MAX_FAIRNESS_KEYS as u64 + 5 {
            ix.push(&k.to_string(), e(k));
        }
        assert_eq!(ix.lines.len(), MAX_FAIRNESS_KEYS + 1);
        assert_eq!(ix.lines[OTHER].len(), 5);
        ix.retain_from(MAX_FAIRNESS_KEYS as u64);
        assert_eq!(ix.len(), 5);
        assert_eq!(order(&mut ix, &w).len(), 5);
    }
}

//! The task consumer of a local store: takes records from the consumed queues' partitions in turn
//! (a stopped partition is skipped), leases them to itself and renews its leases while it lives,
//! holds at most `prefetch` unsettled, and settles them ([`LogSettle`]: ack, requeue, defer,
//! dead-letter). A record handed out `max_deliveries` times and never settled is dead-lettered at
//! its next take. The server hands these same deliveries to its remote consumers.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use celery_core::broker::Settle;
use celery_core::flow::FairnessWeights;
use celery_core::protocol::Message;
use celery_core::{BrokerError, Consumer, Delivery};
use chrono::{DateTime, Utc};
use tokio::sync::Semaphore;

use super::error::LogError;
use super::names;
use super::partition::{Partition, Taken, WorkList};
use super::payload;
use super::record::{now_ms, Record};
use super::store::LogStore;
use super::topic::Topic;

/// Renews the leases consumer `owner` holds in `queues`, until it is dropped (then they expire).
async fn renew_loop(store: Arc<LogStore>, queues: Vec<String>, owner: u64) {
    let lease = store.config().lease;
    loop {
        tokio::time::sleep(lease / 3).await;
        let deadline = Instant::now() + lease;
        for t in queues.iter().filter_map(|q| store.find_topic(q).ok().flatten()) {
            for p in &t.partitions {
                p.renew(owner, deadline);
            }
        }
    }
}

/// A record taken from a partition of a topic.
type Took = (Arc<Topic>, Arc<Partition>, Taken);

/// The longest a consumer waits before it looks again by itself (a safety net: the partitions
/// and its timers wake it).
const MAX_WAIT: Duration = Duration::from_millis(500);

/// How soon a partition whose take failed is tried again (a read error may pass).
const RETRY_MS: i64 = 500;

/// Records a consumer takes from one partition in a row before the next partition with records
/// has its turn: the records of a queue run close together, so their acks share the partition's
/// frames in the acks journal (one record per turn cost a write per ack when many queues had work),
/// while no queue waits behind another's backlog for more than this many.
const IN_A_ROW: u32 = 16;

/// A task consumer of some queues of a log store.
///
/// It takes from the partitions its [`WorkList`] names, in the order they got work (a partition
/// that gave [`IN_A_ROW`] records goes to the back): what a take costs does not depend on how
/// many queues it reads, and the queues with records take turns. Records not yet due wait on a
/// timer of its own per partition (the earliest due time).
#[derive(Debug)]
pub(crate) struct LogConsumer {
    store: Arc<LogStore>,
    /// The consumed partitions that exist, by slot (their number on `work`).
    parts: Vec<(Arc<Topic>, Arc<Partition>)>,
    /// The slots that may have records, queued by the partitions themselves.
    work: Arc<WorkList>,
    /// Timers for records not yet due: (due ms, slot), earliest first. `armed[slot]` is the due
    /// time of the slot's live timer (`i64::MAX`: none); other entries of the slot are stale.
    timers: BinaryHeap<Reverse<(i64, u32)>>,
    armed: Vec<i64>,
    /// The slot taken from last and how many records it gave in a row.
    current: Option<(u32, u32)>,
    /// Consumed queues that do not exist yet (consuming does not create them): looked up again
    /// whenever the store creates a queue.
    waiting_for: Vec<String>,
    /// The store's `topics_created` when `waiting_for` was last looked up.
    created_seen: u64,
    slots: Arc<Semaphore>,
    /// Names this consumer's leases in its partitions.
    id: u64,
    stopped: bool,
    renew: tokio::task::JoinHandle<()>,
    /// The weights of fairness keys when they take turns.
    weights: Arc<FairnessWeights>,
    /// Partitions taken from or looked at so far.
    #[cfg(test)]
    looks: usize,
}

impl LogConsumer {
    /// A consumer of `queues` (which need not exist yet) holding at most `prefetch` unsettled
    /// records; its leases are renewed while it lives.
    pub(crate) fn new(store: Arc<LogStore>, queues: &[String], prefetch: usize) -> Result<LogConsumer, LogError> {
        for q in queues {
            names::component("queue", q)?;
        }
        // A queue named twice is read once.
        let mut seen = std::collections::HashSet::new();
        let queues: Vec<String> = queues.iter().filter(|q| seen.insert(q.as_str())).cloned().collect();
        static NEXT_ID: AtomicU64 = AtomicU64::new(1);
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        let renew = tokio::spawn(renew_loop(store.clone(), queues.clone(), id));
        Ok(LogConsumer {
            store,
            parts: Vec::new(),
            work: WorkList::new(),
            timers: BinaryHeap::new(),
            armed: Vec::new(),
            current: None,
            waiting_for: queues,
            created_seen: u64::MAX,
            slots: Arc::new(Semaphore::new(prefetch.max(1))),
            id,
            stopped: false,
            renew,
            weights: Arc::default(),
            #[cfg(test)]
            looks: 0,
        })
    }

    /// Takes with these weights of fairness keys (every key: 1 without).
    pub(crate) fn with_fairness(mut self, weights: Arc<FairnessWeights>) -> LogConsumer {
        self.weights = weights;
        self
    }

    /// Looks up the consumed queues that did not exist, when the store has created a queue since;
    /// their partitions tell this consumer from now on.
    fn find_new_topics(&mut self) {
        let created = self.store.topics_created.load(Ordering::Acquire);
        if self.waiting_for.is_empty() || created == self.created_seen {
            return;
        }
        self.created_seen = created;
        let mut found = Vec::new();
        let store = &self.store;
        self.waiting_for.retain(|q| match store.find_topic(q) {
            Ok(Some(t)) => {
                found.push(t);
                false
            }
            Ok(None) => true,
            Err(e) => {
                tracing::error!(error = %e, "log: a consumed queue is not served");
                false
            }
        });
        for t in found {
            for p in &t.partitions {
                let slot = self.parts.len() as u32;
                self.parts.push((t.clone(), p.clone()));
                self.armed.push(i64::MAX);
                p.watch(&self.work, slot);
            }
        }
    }

    /// Takes the next record of any consumed queue. A partition that fails (damage with nothing
    /// valid after it, a read error) is tried again later, so it never starves the others.
    fn try_take(&mut self) -> Option<Took> {
        self.find_new_topics();
        self.fire_timers();
        let deadline = Instant::now() + self.store.config().lease;
        // The last partition again, while its turn lasts (it is queued at the back as well: a
        // take that finds nothing here leaves that to the list).
        if let Some((slot, n)) = self.current.take().filter(|(_, n)| *n < IN_A_ROW) {
            let (t, p) = self.parts[slot as usize].clone();
            #[cfg(test)]
            {
                self.looks += 1;
            }
            if let Ok(Some(taken)) = p.take(deadline, self.id, &self.weights) {
                self.current = Some((slot, n + 1));
                return Some((t, p, taken));
            }
        }
        // Each queued slot once at most: a burst of raises elsewhere never holds this loop.
        for _ in 0..=self.parts.len() {
            let slot = self.work.pop()?;
            let (t, p) = self.parts[slot as usize].clone();
            #[cfg(test)]
            {
                self.looks += 1;
            }
            match p.take(deadline, self.id, &self.weights) {
                Ok(Some(taken)) => {
                    self.current = Some((slot, 1));
                    return Some((t, p, taken));
                }
                Ok(None) => {
                    if let Some(due) = p.next_due_ms() {
                        self.arm(slot, due);
                    }
                }
                Err(e) => {
                    tracing::debug!(error = %e, queue = %t.name, "log: partition skipped");
                    self.arm(slot, now_ms() + RETRY_MS);
                }
            }
        }
        None
    }

    /// Looks at `slot` again at `due` (ms since the epoch), unless an earlier look is set.
    fn arm(&mut self, slot: u32, due: i64) {
        if due < self.armed[slot as usize] {
            self.armed[slot as usize] = due;
            self.timers.push(Reverse((due, slot)));
        }
    }

    /// Queues the slots whose timer fell due; returns when the next one falls due.
    fn fire_timers(&mut self) -> Option<i64> {
        let now = now_ms();
        while let Some(&Reverse((due, slot))) = self.timers.peek() {
            if self.armed[slot as usize] != due {
                self.timers.pop();
                continue;
            }
            if due > now {
                return Some(due);
            }
            self.timers.pop();
            self.armed[slot as usize] = i64::MAX;
            self.work.push(slot);
        }
        None
    }
}

impl Drop for LogConsumer {
    fn drop(&mut self) {
        self.renew.abort();
        for (_, p) in &self.parts {
            p.unwatch(&self.work);
        }
    }
}

impl LogConsumer {
    /// Waits for the next record and leases it; `None` once stopped.
    pub(crate) async fn next_raw(&mut self) -> Option<LogSettle> {
        let permit = self.slots.clone().acquire_owned().await.ok()?;
        loop {
            if self.stopped {
                return None;
            }
            // Before looking: a queue created meanwhile wakes this wait.
            let store_notify = self.store.notify.clone();
            let appended = store_notify.notified();
            match self.try_take() {
                Some((topic, part, taken)) => {
                    let max = self.store.config().max_deliveries;
                    if taken.deliveries > max {
                        // Handed out `max` times and never settled (its consumers died with it).
                        let done = self
                            .store
                            .dead_letter_exhausted(&topic.name, &part, &taken.record, taken.deliveries - 1)
                            .await;
                        if !done {
                            // Back to its queue, tried again shortly (a full disk may clear).
                            part.requeue(taken.record.offset);
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                        continue;
                    }
                    if taken.counted {
                        // The count is written before the task runs: a crash while it runs still counts.
                        if let Err(e) = part.log.flush().await {
                            tracing::error!(error = %e, "log: recording a delivery count failed");
                        }
                    }
                    permit.forget();
                    return Some(LogSettle {
                        store: self.store.clone(),
                        part,
                        record: taken.record,
                        deliveries: taken.deliveries,
                        queue: topic.name.clone(),
                        slots: self.slots.clone(),
                    });
                }
                None => {
                    let wait = match self.fire_timers() {
                        Some(due) => Duration::from_millis((due - now_ms()).max(0) as u64).min(MAX_WAIT),
                        None => MAX_WAIT,
                    };
                    let (work, waiting) = (self.work.clone(), !self.waiting_for.is_empty());
                    let _ = tokio::time::timeout(wait, async {
                        tokio::select! {
                            _ = work.pushed.notified() => {}
                            _ = appended, if waiting => {}
                        }
                    })
                    .await;
                }
            }
        }
    }
}

#[async_trait]
impl Consumer for LogConsumer {
    async fn next(&mut self) -> Option<Delivery> {
        let s = self.next_raw().await?;
        let (record, queue, redelivered) = (s.record.clone(), s.queue.clone(), s.deliveries > 1);
        let size = record.payload.len();
        // Decoded where the task runs: this loop only takes records.
        let decode = Box::new(move || payload::decode(&record.payload));
        Some(Delivery::lazy(decode, queue, redelivered, Box::new(s)).with_size(size))
    }

    fn stop(&mut self) {
        self.stopped = true;
    }

    async fn close(&mut self) {
        self.stopped = true;
        if let Err(e) = self.store.sync().await {
            tracing::warn!(error = %e, "log: final checkpoint failed");
        }
    }
}

/// A leased record of the local store and how to settle it.
#[derive(Debug)]
pub(crate) struct LogSettle {
    store: Arc<LogStore>,
    part: Arc<Partition>,
    pub(crate) record: Arc<Record>,
    pub(crate) deliveries: u32,
    pub(crate) queue: String,
    slots: Arc<Semaphore>,
}

impl LogSettle {
    /// Acks now (what `ack` does; nothing in it waits).
    pub(crate) fn ack_now(&self) -> Result<(), LogError> {
        self.release();
        self.part.ack(&[self.record.offset])
    }

    /// Returns the record to its queue now (what `requeue` does; nothing in it waits).
    pub(crate) fn requeue_now(&self) {
        self.release();
        // The partition tells its consumers (`Partition::requeue`).
        self.part.requeue(self.record.offset);
    }

    /// Frees its prefetch slot (the partition forgot its lease when it was settled).
    fn release(&self) {
        self.slots.add_permits(1);
    }
}

#[async_trait]
impl Settle for LogSettle {
    async fn ack(&self) -> Result<(), BrokerError> {
        Ok(self.ack_now()?)
    }

    async fn requeue(&self) -> Result<(), BrokerError> {
        self.requeue_now();
        Ok(())
    }

    async fn defer(&self, msg: &Message, until: DateTime<Utc>) -> Result<(), BrokerError> {
        let mut m = msg.clone();
        m.headers.eta = Some(until);
        let mut rec = payload::to_record(&m);
        rec.not_before_ms = until.timestamp_millis();
        // The same task as a record that was accepted: not refused by the size limit now.
        if let Err(e) = self.store.append_unchecked(&self.queue, vec![rec]).await {
            // Not lost, not stuck: back to its queue (its lease would be renewed forever).
            self.requeue_now();
            return Err(e.into());
        }
        self.release();
        Ok(self.part.ack(&[self.record.offset])?)
    }

    async fn dead_letter(&self, reason: &str) -> Result<(), BrokerError> {
        if let Err(e) = self.store.dead_letter(&self.queue, &self.part, &self.record, reason).await {
            self.requeue_now();
            return Err(e.into());
        }
        self.release();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::storage::partition::tests::tempdir;
    use crate::log::storage::partition::Fsync;
    use crate::log::storage::record::NewRecord;
    use crate::log::storage::store::StoreConfig;

    fn rec(payload: &str) -> NewRecord {
        NewRecord { payload: payload.as_bytes().to_vec(), ..NewRecord::default() }
    }

    #[tokio::test]
    async fn consuming_a_queue_does_not_create_it() {
        let dir = tempdir();
        let store = LogStore::open(&dir, StoreConfig::default()).unwrap();
        let consumer = LogConsumer::new(store.clone(), &["ghost".to_string()], 1).unwrap();
        assert!(!dir.join("topics").exists(), "consuming created the queue");
        drop((consumer, store));
        std::fs::remove_dir_all(dir).ok();
    }

    #[tokio::test]
    async fn a_consumer_of_a_queue_that_does_not_exist_yet_gets_its_first_record() {
        let dir = tempdir();
        let store = LogStore::open(&dir, StoreConfig::default()).unwrap();
        let mut consumer = LogConsumer::new(store.clone(), &["later".to_string()], 1).unwrap();
        let waiting = tokio::spawn(async move { consumer.next_raw().await.map(|s| s.record.payload.clone()) });
        store.append("later", vec![rec("hello")]).await.unwrap();
        let got = tokio::time::timeout(Duration::from_secs(10), waiting).await.unwrap().unwrap();
        assert_eq!(got.as_deref(), Some(&b"hello"[..]));
        drop(store);
        std::fs::remove_dir_all(dir).ok();
    }

    #[tokio::test]
    async fn a_stopped_partition_does_not_starve_the_other_queues_of_a_consumer() {
        let dir = tempdir();
        let store = LogStore::open(&dir, StoreConfig::default()).unwrap();
        store.append("bad", vec![rec("b0"), rec("b1")]).await.unwrap();
        // Damage the active segment's records while the store serves them: nothing valid after
        // them, so the partition stops (and says so) instead of guessing.
        let seg = dir.join("topics/bad/0/00000000000000000000.log");
        let mut data = std::fs::read(&seg).unwrap();
        data[20..].fill(0xAB);
        std::fs::write(&seg, &data).unwrap();
        store.append("good", vec![rec("g0")]).await.unwrap();
        let mut consumer = LogConsumer::new(store.clone(), &["bad".to_string(), "good".to_string()], 4).unwrap();
        let got = tokio::time::timeout(Duration::from_secs(10), consumer.next_raw()).await.unwrap().unwrap();
        assert_eq!((got.queue.as_str(), &got.record.payload[..]), ("good", &b"g0"[..]));
        drop((consumer, got, store));
        std::fs::remove_dir_all(dir).ok();
    }

    fn names(prefix: &str, n: usize) -> Vec<String> {
        (0..n).map(|i| format!("{prefix}{i}")).collect()
    }

    async fn take(consumer: &mut LogConsumer) -> LogSettle {
        tokio::time::timeout(Duration::from_secs(10), consumer.next_raw()).await.unwrap().unwrap()
    }

    /// The queues with records take turns, [`IN_A_ROW`] records each (before, the first queue was
    /// drained before the second was looked at).
    #[tokio::test]
    async fn the_queues_with_records_take_turns() {
        let dir = tempdir();
        let store = LogStore::open(&dir, StoreConfig { fsync: Fsync::Os, ..StoreConfig::default() }).unwrap();
        let n = IN_A_ROW as usize + 4;
        for q in ["a", "b", "c"] {
            store.append(q, (0..n).map(|_| rec(q)).collect()).await.unwrap();
        }
        let queues = ["a", "b", "c"].map(String::from).to_vec();
        let mut consumer = LogConsumer::new(store.clone(), &queues, 1000).unwrap();
        let mut got = String::new();
        for _ in 0..3 * n {
            let s = take(&mut consumer).await;
            got.push_str(std::str::from_utf8(&s.record.payload).unwrap());
            s.ack_now().unwrap();
        }
        let turn = |q: &str, k: usize| q.repeat(k);
        let k = IN_A_ROW as usize;
        let expected = [turn("a", k), turn("b", k), turn("c", k), turn("a", 4), turn("b", 4), turn("c", 4)].concat();
        assert_eq!(got, expected);
        drop((consumer, store));
        std::fs::remove_dir_all(dir).ok();
    }

    /// After its first pass over the partitions (which may hold records from before), a consumer
    /// of many queues looks only at those that got records: a take costs the same with 1,000
    /// queues as with one.
    #[tokio::test]
    async fn a_consumer_of_many_queues_looks_only_at_the_partitions_with_records() {
        let dir = tempdir();
        let cfg = StoreConfig { fsync: Fsync::Os, ..StoreConfig::default() };
        let store = LogStore::open(&dir, cfg).unwrap();
        let queues = names("q", 1000);
        for q in &queues {
            store.append(q, vec![rec("old")]).await.unwrap();
        }
        let mut consumer = LogConsumer::new(store.clone(), &queues, 2000).unwrap();
        for _ in 0..1000 {
            take(&mut consumer).await.ack_now().unwrap();
        }
        // Each partition gave its record, then was found empty once or twice (as the last one
        // taken from, and when its turn came again).
        assert!(consumer.try_take().is_none());
        let first_pass = consumer.looks;
        assert!(first_pass <= 3001, "{first_pass} looks for the first 1,000 records");
        // Ten records in ten queues near the end of the list, then one more.
        for q in &queues[990..] {
            store.append(q, vec![rec("new")]).await.unwrap();
        }
        for _ in 0..10 {
            assert_eq!(take(&mut consumer).await.record.payload, b"new");
        }
        store.append(&queues[500], vec![rec("last")]).await.unwrap();
        assert_eq!(take(&mut consumer).await.record.payload, b"last");
        let looks = consumer.looks - first_pass;
        // Each partition with a record: its take, and at most two more looks that find it empty.
        assert!(looks <= 33, "{looks} looks for 11 records over 1,000 queues");
        drop((consumer, store));
        std::fs::remove_dir_all(dir).ok();
    }

    /// Two consumers of one queue: the second gets the record the first left, at once, though
    /// the first took from the partition last (the take queues it again for every consumer).
    #[tokio::test]
    async fn every_consumer_of_a_partition_is_told_of_its_records() {
        let dir = tempdir();
        let store = LogStore::open(&dir, StoreConfig { fsync: Fsync::Os, ..StoreConfig::default() }).unwrap();
        let q = vec!["shared".to_string()];
        let mut a = LogConsumer::new(store.clone(), &q, 1).unwrap();
        let mut b = LogConsumer::new(store.clone(), &q, 1).unwrap();
        // Both wait on an empty queue.
        let first = tokio::spawn(async move { (take(&mut a).await.record.payload.clone(), a) });
        tokio::task::yield_now().await;
        store.append("shared", vec![rec("r0"), rec("r1")]).await.unwrap();
        let (got_a, a) = first.await.unwrap();
        let got_b = take(&mut b).await.record.payload.clone();
        let mut got = [got_a, got_b];
        got.sort();
        assert_eq!(got, [b"r0".to_vec(), b"r1".to_vec()]);
        drop((a, b, store));
        std::fs::remove_dir_all(dir).ok();
    }

    /// A record not yet due in one of many idle queues is handed out when due, by the consumer's
    /// own timer (nothing else happens in the store meanwhile).
    #[tokio::test]
    async fn a_record_not_yet_due_is_taken_when_it_falls_due() {
        let dir = tempdir();
        let store = LogStore::open(&dir, StoreConfig { fsync: Fsync::Os, ..StoreConfig::default() }).unwrap();
        let queues = names("d", 50);
        for q in &queues {
            store.append(q, vec![rec("x")]).await.unwrap();
        }
        let mut consumer = LogConsumer::new(store.clone(), &queues, 100).unwrap();
        for _ in 0..50 {
            take(&mut consumer).await.ack_now().unwrap();
        }
        let due = now_ms() + 300;
        let later = NewRecord { not_before_ms: due, ..rec("later") };
        store.append(&queues[7], vec![later]).await.unwrap();
        let s = take(&mut consumer).await;
        assert_eq!(s.record.payload, b"later");
        assert!(now_ms() >= due, "handed out before its time");
        drop((consumer, s, store));
        std::fs::remove_dir_all(dir).ok();
    }

    /// A dropped consumer leaves the partitions it watched.
    #[tokio::test]
    async fn a_dropped_consumer_is_no_longer_told() {
        let dir = tempdir();
        let store = LogStore::open(&dir, StoreConfig::default()).unwrap();
        store.append("w", vec![rec("x")]).await.unwrap();
        let mut consumer = LogConsumer::new(store.clone(), &["w".to_string()], 1).unwrap();
        take(&mut consumer).await.ack_now().unwrap();
        let part = store.find_topic("w").unwrap().unwrap().partitions[0].clone();
        assert_eq!(part.log.watchers(), 1);
        drop(consumer);
        assert_eq!(part.log.watchers(), 0);
        drop((part, store));
        std::fs::remove_dir_all(dir).ok();
    }
}

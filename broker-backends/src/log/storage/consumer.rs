//! The task consumer of a local store: takes records from the consumed queues' partitions in turn
//! (a stopped partition is skipped), leases them to itself and renews its leases while it lives,
//! holds at most `prefetch` unsettled, and settles them ([`LogSettle`]: ack, requeue, defer,
//! dead-letter). A record handed out `max_deliveries` times and never settled is dead-lettered at
//! its next take. The server hands these same deliveries to its remote consumers.

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
use super::partition::{Partition, Taken};
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

/// A task consumer of some queues of a log store.
#[derive(Debug)]
pub(crate) struct LogConsumer {
    store: Arc<LogStore>,
    /// The consumed queues that exist.
    topics: Vec<Arc<Topic>>,
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
    turn: usize,
    /// The weights of fairness keys when they take turns.
    weights: Arc<FairnessWeights>,
}

impl LogConsumer {
    /// A consumer of `queues` (which need not exist yet) holding at most `prefetch` unsettled
    /// records; its leases are renewed while it lives.
    pub(crate) fn new(store: Arc<LogStore>, queues: &[String], prefetch: usize) -> Result<LogConsumer, LogError> {
        for q in queues {
            names::component("queue", q)?;
        }
        static NEXT_ID: AtomicU64 = AtomicU64::new(1);
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        let renew = tokio::spawn(renew_loop(store.clone(), queues.to_vec(), id));
        Ok(LogConsumer {
            store,
            topics: Vec::new(),
            waiting_for: queues.to_vec(),
            created_seen: u64::MAX,
            slots: Arc::new(Semaphore::new(prefetch.max(1))),
            id,
            stopped: false,
            renew,
            turn: 0,
            weights: Arc::default(),
        })
    }

    /// Takes with these weights of fairness keys (every key: 1 without).
    pub(crate) fn with_fairness(mut self, weights: Arc<FairnessWeights>) -> LogConsumer {
        self.weights = weights;
        self
    }

    /// Looks up the consumed queues that did not exist, when the store has created a queue since.
    fn find_new_topics(&mut self) {
        let created = self.store.topics_created.load(Ordering::Acquire);
        if self.waiting_for.is_empty() || created == self.created_seen {
            return;
        }
        self.created_seen = created;
        let store = &self.store;
        let found = &mut self.topics;
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
    }

    /// Takes the next record of any consumed queue. A partition that fails (damage with nothing
    /// valid after it, a read error) is skipped, so it never starves the others.
    fn try_take(&mut self) -> Option<Took> {
        self.find_new_topics();
        let deadline = Instant::now() + self.store.config().lease;
        self.turn = self.turn.wrapping_add(1);
        for t in &self.topics {
            let n = t.partitions.len();
            for i in 0..n {
                let p = &t.partitions[(self.turn + i) % n];
                match p.take(deadline, self.id, &self.weights) {
                    Ok(Some(taken)) => return Some((t.clone(), p.clone(), taken)),
                    Ok(None) => {}
                    Err(e) => tracing::debug!(error = %e, queue = %t.name, "log: partition skipped"),
                }
            }
        }
        None
    }

    fn next_due(&self) -> Duration {
        let now = now_ms();
        self.topics
            .iter()
            .flat_map(|t| t.partitions.iter())
            .filter_map(|p| p.next_due_ms())
            .map(|due| Duration::from_millis((due - now).max(0) as u64))
            .min()
            .unwrap_or(Duration::from_millis(500))
            .min(Duration::from_millis(500))
    }
}

impl Drop for LogConsumer {
    fn drop(&mut self) {
        self.renew.abort();
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
            let notify = self.store.notify.clone();
            let notified = notify.notified();
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
                    let wait = self.next_due();
                    let _ = tokio::time::timeout(wait, notified).await;
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
        self.part.requeue(self.record.offset);
        self.store.notify.notify_waiters();
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
}

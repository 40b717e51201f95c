//! Flow control in the worker (the mechanisms are in [`celery_core::flow`]).
//!
//! Per-key concurrency: right before a
//! task with a concurrency key and a limit runs, its slot is taken from the broker, or the broker
//! parks the message and the delivery is acked; the slot is renewed while the task runs and
//! released after its outcome is stored (on a task of its own: the worker slot does not wait for
//! the broker's answer). One loop ([`upkeep_loop`]) renews every slot the worker holds and frees
//! the slots of dead workers on brokers that need a sweep: a held slot costs an entry in
//! [`HeldSlots`], not a timer task of its own.
//!
//! A slot whose task ended is kept a moment ([`SPARE_GRACE`]) for the next task of its key and
//! limit on this worker, which then runs without asking the broker (on a broker that
//! [batches](celery_core::flow::KeySlots::batches), a round trip per call, the takes and releases
//! that do reach it go in batches; the embedded log answers each at once): the slot is held (and renewed) a
//! little longer, never shorter, so at most the key's limit runs at once. Not for a key whose take
//! was refused here lately ([`REFUSED_FOR`]: tasks wait for it, parked, and a release moves the
//! oldest back), and a slot serves at most [`MAX_SLOT_USES`] tasks and is passed on only within
//! [`MAX_SLOT_AGE`] of its take, so a busy worker cannot keep a key's slots for long from the
//! tasks parked by others: a slot of a long task is given back when that task ends.
//!
//! Cluster-wide rate limits: [`cluster_wait`] reserves the task's next start from the broker's
//! bucket; the caller waits for it as for a per-worker limit.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use celery_core::sync::lock;
use futures::StreamExt;

use celery_core::flow::{
    limit_for, validate_limit, Admission, SlotRelease, SlotRequest, CONCURRENCY_KEY, MAX_SLOT_BATCH, MIN_KEY_LEASE,
};
use celery_core::protocol::Message;
use celery_core::registry;
use celery_core::{Broker, BrokerError, Delivery, TaskOptions};
use tokio::sync::oneshot;

use super::batch::Batch;
use super::shared::Shared;

/// Renewals in flight at once in [`upkeep_loop`].
const RENEWALS_AT_ONCE: usize = 32;

/// How long a slot whose task ended waits for the next task of its key on this worker before it
/// is given back.
const SPARE_GRACE: Duration = Duration::from_millis(20);

/// The most tasks one slot serves in a row before it is given back to the broker.
const MAX_SLOT_USES: u32 = 64;

/// How long after its take a slot may still pass to the next task of its key.
const MAX_SLOT_AGE: Duration = Duration::from_millis(500);

/// How long after a refused take (the key was full) its slots are given back at once.
const REFUSED_FOR: Duration = Duration::from_secs(1);

/// The most slots kept spare, and the most keys remembered as refused, at once.
const MAX_SPARES: usize = 4096;

/// The key slots a worker holds (id -> key and holder), renewed together by [`upkeep_loop`], and
/// on a broker that [batches](celery_core::flow::KeySlots::batches), the takes and releases
/// waiting for the call in flight.
#[derive(Debug, Default)]
pub(crate) struct HeldSlots {
    held: Mutex<HashMap<u64, (String, String)>>,
    next: AtomicU64,
    takes: Mutex<Batch<PendingTake, MAX_SLOT_BATCH>>,
    releases: Mutex<Batch<PendingRelease, MAX_SLOT_BATCH>>,
    spares: Mutex<Spares>,
}

/// Slots whose task ended, waiting a moment for the next task of their key, and the keys whose
/// takes were refused lately (their slots go back at once).
#[derive(Debug, Default)]
struct Spares {
    /// Per key, its spare slots (of any limit), the newest last.
    by_key: HashMap<String, Vec<Spare>>,
    count: usize,
    refused: HashMap<String, Instant>,
    /// Whether a task gives back the spares that waited [`SPARE_GRACE`] in vain.
    flushing: bool,
}

/// A slot kept for the next task of its key (see [`Spares`]), since its last task ended.
#[derive(Debug)]
struct Spare {
    lease: SlotLease,
    since: Instant,
}

impl Spares {
    /// Keeps `slot` spare, unless its key was refused lately, it served its share of tasks or
    /// too many are spare: then it is handed back to go to the broker. True when the caller
    /// starts the task that gives back the spares that are not taken.
    fn keep(&mut self, lease: SlotLease, now: Instant) -> Result<bool, SlotLease> {
        let refused = self.refused.get(&lease.key).is_some_and(|t| now.duration_since(*t) < REFUSED_FOR);
        let worn = lease.uses >= MAX_SLOT_USES || now.duration_since(lease.taken) >= MAX_SLOT_AGE;
        if refused || worn || self.count >= MAX_SPARES {
            return Err(lease);
        }
        match self.by_key.get_mut(&lease.key) {
            Some(slots) => slots.push(Spare { lease, since: now }),
            None => {
                self.by_key.insert(lease.key.clone(), vec![Spare { lease, since: now }]);
            }
        }
        self.count += 1;
        Ok(!std::mem::replace(&mut self.flushing, true))
    }

    /// A spare slot of `key` with `limit`, the newest first.
    fn reuse(&mut self, key: &str, limit: u32) -> Option<SlotLease> {
        if self.count == 0 {
            return None;
        }
        let slots = self.by_key.get_mut(key)?;
        let i = slots.iter().rposition(|s| s.lease.limit == limit)?;
        let spare = slots.remove(i);
        if slots.is_empty() {
            self.by_key.remove(key);
        }
        self.count -= 1;
        Some(spare.lease)
    }

    /// Notes that a take of `key` was refused: its slots go back at once for a while.
    fn refuse(&mut self, key: &str, now: Instant) {
        if self.refused.len() >= MAX_SPARES {
            self.refused.retain(|_, t| now.duration_since(*t) < REFUSED_FOR);
            if self.refused.len() >= MAX_SPARES {
                self.refused.clear();
            }
        }
        self.refused.insert(key.to_owned(), now);
    }

    /// Every spare, at once (a worker that stops).
    fn take_all(&mut self) -> Vec<SlotLease> {
        self.count = 0;
        self.by_key.drain().flat_map(|(_, slots)| slots.into_iter().map(|s| s.lease)).collect()
    }

    /// The spares that waited [`SPARE_GRACE`]; when none is left, the flushing task ends.
    fn expired(&mut self, now: Instant) -> Vec<SlotLease> {
        let mut out = Vec::new();
        self.by_key.retain(|_, slots| {
            let (gone, kept): (Vec<Spare>, Vec<Spare>) =
                slots.drain(..).partition(|s| now.duration_since(s.since) >= SPARE_GRACE);
            out.extend(gone.into_iter().map(|s| s.lease));
            *slots = kept;
            !slots.is_empty()
        });
        self.count -= out.len();
        if self.count == 0 {
            self.flushing = false;
        }
        out
    }
}

/// A slot taken from the broker, as the worker holds it: its entry in [`HeldSlots::held`], its
/// key and limit, its holder at the broker, the queue of the task it serves now (where a release
/// moves a parked task back from), how many tasks it served and when it was taken.
#[derive(Debug)]
struct SlotLease {
    id: u64,
    key: String,
    holder: String,
    queue: String,
    limit: u32,
    uses: u32,
    taken: Instant,
}

/// A take waiting for its batch: the answer is whether the slot is held.
#[derive(Debug)]
struct PendingTake {
    key: String,
    limit: u32,
    holder: String,
    ttl: Duration,
    answer: oneshot::Sender<bool>,
}

/// A release waiting for its batch.
#[derive(Debug)]
struct PendingRelease {
    key: String,
    holder: String,
    queue: String,
}

impl HeldSlots {
    fn add(&self, key: &str, holder: &str) -> u64 {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        lock(&self.held).insert(id, (key.to_owned(), holder.to_owned()));
        id
    }

    /// A number no other take of this worker gets (a holder's suffix).
    fn nonce(&self) -> u64 {
        self.next.fetch_add(1, Ordering::Relaxed)
    }

    fn remove(&self, id: u64) {
        lock(&self.held).remove(&id);
    }

    fn holds(&self, id: u64) -> bool {
        lock(&self.held).contains_key(&id)
    }

    /// Slots held now, as (id, key, holder).
    fn snapshot(&self) -> Vec<(u64, String, String)> {
        lock(&self.held).iter().map(|(id, (k, h))| (*id, k.clone(), h.clone())).collect()
    }

    /// Takes `req`'s slot without parking, batched with the takes asked for meanwhile: true
    /// when held, false when not (the key was full or the batch failed: the caller goes through
    /// `acquire_or_park`).
    async fn take(self: &Arc<Self>, broker: &Arc<dyn Broker>, req: &SlotRequest<'_>) -> bool {
        let (answer, got) = oneshot::channel();
        let pending = PendingTake {
            key: req.key.to_owned(),
            limit: req.limit,
            holder: req.holder.to_owned(),
            ttl: req.ttl,
            answer,
        };
        if lock(&self.takes).push(pending) {
            tokio::spawn(send_takes(broker.clone(), self.clone()));
        }
        got.await.unwrap_or(false)
    }

    /// Gives a slot back: batched with the releases asked for meanwhile on a broker that
    /// [batches](celery_core::flow::KeySlots::batches); otherwise at once, on a task of its own
    /// only when the broker does not answer at once.
    fn give_back(self: &Arc<Self>, broker: Arc<dyn Broker>, key: String, holder: String, queue: String) {
        let Ok(rt) = tokio::runtime::Handle::try_current() else { return };
        if broker.key_slots().is_some_and(|s| s.batches()) {
            if lock(&self.releases).push(PendingRelease { key, holder, queue }) {
                rt.spawn(send_releases(broker, self.clone()));
            }
            return;
        }
        let mut release = Box::pin(async move {
            let Some(slots) = broker.key_slots() else { return };
            if let Err(e) = celery_core::backoff::retrying(|| slots.release(&key, &holder, &queue)).await {
                tracing::warn!(%key, error = %e, "could not release a key slot; it frees when its lease ends");
            }
        });
        // Polled once here: a broker in this process (the embedded log) answers at once, without
        // a task spawned; one over the network has sent the request and goes on on a task.
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        if release.as_mut().poll(&mut cx).is_pending() {
            rt.spawn(release);
        }
    }

    /// A slot of `key` with `limit` whose task ended a moment ago on this worker, if any.
    fn reuse(&self, key: &str, limit: u32) -> Option<SlotLease> {
        lock(&self.spares).reuse(key, limit)
    }

    /// Notes that a take of `key` found it full.
    fn refuse(&self, key: &str) {
        lock(&self.spares).refuse(key, Instant::now());
    }

    /// Keeps the slot of an ended task spare for the next task of its key, or gives it back.
    fn end(self: &Arc<Self>, broker: Arc<dyn Broker>, lease: SlotLease) {
        let Ok(rt) = tokio::runtime::Handle::try_current() else { return };
        let kept = lock(&self.spares).keep(lease, Instant::now());
        match kept {
            Ok(start) => {
                if start {
                    rt.spawn(give_back_spares(broker, self.clone()));
                }
            }
            Err(lease) => {
                self.remove(lease.id);
                self.give_back(broker, lease.key, lease.holder, lease.queue);
            }
        }
    }

    /// Gives back every spare slot now, a batch per call, waiting at most `wait` in all (a
    /// stopping worker: the tasks parked for those keys need not wait for the leases to end).
    pub(super) async fn give_back_spares_now(&self, broker: &Arc<dyn Broker>, wait: Duration) {
        let gone = lock(&self.spares).take_all();
        if gone.is_empty() {
            return;
        }
        for lease in &gone {
            self.remove(lease.id);
        }
        let Some(slots) = broker.key_slots() else { return };
        let released = tokio::time::timeout(wait, async {
            for chunk in gone.chunks(MAX_SLOT_BATCH) {
                let rels: Vec<SlotRelease<'_>> =
                    chunk.iter().map(|l| SlotRelease { key: &l.key, holder: &l.holder, queue: &l.queue }).collect();
                celery_core::backoff::retrying(|| slots.release_many(&rels)).await?;
            }
            Ok::<(), BrokerError>(())
        });
        match released.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(n = gone.len(), error = %e, "could not give back spare key slots; they free when their leases end")
            }
            Err(_) => {
                tracing::warn!(n = gone.len(), "giving back spare key slots timed out; they free when their leases end")
            }
        }
    }

    /// How many slots are held.
    #[cfg(test)]
    fn len(&self) -> usize {
        lock(&self.held).len()
    }
}

/// Sends the queued takes, a batch per call, until none is left (each taker gets its answer;
/// a failed call answers false to its batch, whose takers then ask one by one).
async fn send_takes(broker: Arc<dyn Broker>, held: Arc<HeldSlots>) {
    loop {
        let next = lock(&held.takes).next();
        let Some(batch) = next else { return };
        let reqs: Vec<SlotRequest<'_>> =
            batch.iter().map(|p| SlotRequest { key: &p.key, limit: p.limit, holder: &p.holder, ttl: p.ttl }).collect();
        let taken = match broker.key_slots() {
            Some(slots) => match slots.acquire_many(&reqs).await {
                Ok(taken) => taken,
                Err(e) => {
                    tracing::debug!(error = %e, n = reqs.len(), "batched key slot takes failed; asking one by one");
                    Vec::new()
                }
            },
            None => Vec::new(),
        };
        drop(reqs);
        for (i, p) in batch.into_iter().enumerate() {
            let _ = p.answer.send(taken.get(i).copied().unwrap_or(false));
        }
    }
}

/// Sends the queued releases, a batch per call, until none is left; a batch that fails after
/// the retries frees when its leases end.
async fn send_releases(broker: Arc<dyn Broker>, held: Arc<HeldSlots>) {
    loop {
        let next = lock(&held.releases).next();
        let Some(batch) = next else { return };
        let Some(slots) = broker.key_slots() else { continue };
        let rels: Vec<SlotRelease<'_>> =
            batch.iter().map(|p| SlotRelease { key: &p.key, holder: &p.holder, queue: &p.queue }).collect();
        if let Err(e) = celery_core::backoff::retrying(|| slots.release_many(&rels)).await {
            tracing::warn!(n = rels.len(), error = %e, "could not release key slots; they free when their leases end");
        }
    }
}

/// Gives back the spare slots no task took within [`SPARE_GRACE`], every grace period until none
/// is spare.
async fn give_back_spares(broker: Arc<dyn Broker>, held: Arc<HeldSlots>) {
    loop {
        tokio::time::sleep(SPARE_GRACE).await;
        let (gone, more) = {
            let mut spares = lock(&held.spares);
            let gone = spares.expired(Instant::now());
            (gone, spares.flushing)
        };
        for lease in gone {
            held.remove(lease.id);
            held.give_back(broker.clone(), lease.key, lease.holder, lease.queue);
        }
        if !more {
            return;
        }
    }
}

/// A held slot: renewed by the worker's [`upkeep_loop`] until released (dropping it releases it
/// too).
#[derive(Debug)]
pub(super) struct HeldSlot {
    broker: Arc<dyn Broker>,
    held: Arc<HeldSlots>,
    /// Always some until dropped.
    lease: Option<SlotLease>,
}

impl HeldSlot {
    /// Gives the slot back (the broker moves a parked message of the key back to its queue).
    pub(super) fn release(self) {
        drop(self);
    }
}

impl Drop for HeldSlot {
    /// Releases the slot on a task of its own: the task's worker slot frees without waiting for
    /// the broker's answer. The key's slot is held that round trip longer, never shorter, so at
    /// most its limit still run at once; if the release fails, the slot frees when its lease ends.
    fn drop(&mut self) {
        let Some(lease) = self.lease.take() else { return };
        self.held.end(self.broker.clone(), lease);
    }
}

/// What the key step decided for a delivery.
#[derive(Debug)]
pub(super) enum KeyStep {
    /// No key, or no limit: run as usual.
    Free,
    /// Run holding this slot.
    Held(HeldSlot),
    /// Parked by the broker; the delivery is acked (or, if it could not be, comes back).
    Parked,
    /// The slot could not be asked for: the delivery goes back to its queue.
    Failed(BrokerError),
}

/// The concurrency key of `msg`, if it has one (a non-string value counts as none).
pub(super) fn key_of(msg: &Message) -> Option<&str> {
    msg.headers.extra.get(CONCURRENCY_KEY).and_then(serde_json::Value::as_str)
}

/// The limit of `key` for a task: the worker's first matching `--key-limit` pattern, else the
/// task's own `key_concurrency`.
pub(super) fn limit_of(w: &Shared, key: &str, opts: &TaskOptions) -> Option<u32> {
    limit_for(key, &w.config.key_limits, opts.key_concurrency).and_then(|n| validate_limit(n).ok())
}

/// Takes a slot for `msg` or has it parked. `d` is acked once parked.
pub(super) async fn admit(w: &Shared, d: &Delivery, msg: &Message, opts: &TaskOptions) -> KeyStep {
    let Some(key) = key_of(msg) else { return KeyStep::Free };
    let Some(limit) = limit_of(w, key, opts) else { return KeyStep::Free };
    let broker = w.app.broker().clone();
    let Some(slots) = broker.key_slots() else {
        return KeyStep::Failed(BrokerError::Unsupported {
            broker: broker.kind(),
            option: format!("per-key concurrency (`key_concurrency` of task `{}`)", opts.name),
        });
    };
    if let Some(spare) = w.held_slots.reuse(key, limit) {
        let lease = SlotLease { queue: d.queue.clone(), uses: spare.uses + 1, ..spare };
        return KeyStep::Held(HeldSlot { broker, held: w.held_slots.clone(), lease: Some(lease) });
    }
    // Unique per take, not per task id: a retry keeps its id, and its take must not find the
    // slot a spare passed on to another task under the first try's name (the broker hands a
    // holder's slot back to it), nor release that task's slot when it ends. Made once, so the
    // retried calls below stay one take.
    let holder = format!("{}/{}/{}", w.config.hostname, msg.headers.id, w.held_slots.nonce());
    let ttl = w.config.key_lease.max(MIN_KEY_LEASE);
    let req = SlotRequest { key, limit, holder: &holder, ttl };
    if let Err(e) = req.validate() {
        return KeyStep::Failed(e.into());
    }
    // On a broker that batches, most takes find a slot free in a batch; the others (a full key
    // to park at) go one by one.
    let taken = slots.batches() && w.held_slots.take(&broker, &req).await;
    if slots.batches() && !taken {
        w.held_slots.refuse(key);
    }
    let admission = if taken {
        Ok(Admission::Acquired)
    } else {
        celery_core::backoff::retrying(|| slots.acquire_or_park(&req, &d.queue, msg)).await
    };
    if !slots.batches() && matches!(admission, Ok(Admission::Parked)) {
        w.held_slots.refuse(key);
    }
    match admission {
        Ok(Admission::Acquired) => {
            let id = w.held_slots.add(key, &holder);
            let (key, queue, taken) = (key.to_owned(), d.queue.clone(), Instant::now());
            let lease = SlotLease { id, key, holder, queue, limit, uses: 1, taken };
            KeyStep::Held(HeldSlot { broker, held: w.held_slots.clone(), lease: Some(lease) })
        }
        Ok(Admission::Parked) => KeyStep::Parked,
        Err(e) => KeyStep::Failed(e),
    }
}

/// The tasks linked into this binary that declare `key_concurrency`.
pub(super) fn keyed_tasks() -> Vec<&'static str> {
    registry::tasks().iter().filter(|e| (e.options)().key_concurrency.is_some()).map(|e| e.name).collect()
}

/// The tasks linked into this binary whose rate limit is cluster-wide.
pub(super) fn cluster_rated_tasks() -> Vec<&'static str> {
    registry::tasks().iter().filter(|e| (e.options)().rate_scope == Some("cluster")).map(|e| e.name).collect()
}

/// Every third of the lease, while the worker runs (only when a linked task declares
/// `key_concurrency` or `--key-limit` is given, and the broker holds slots): renews every slot in
/// `held` (up to [`RENEWALS_AT_ONCE`] at a time; a slot released meanwhile is skipped), then
/// sweeps the broker's expired slots (those of dead workers).
pub(super) async fn upkeep_loop(broker: Arc<dyn Broker>, held: Arc<HeldSlots>, lease: Duration) {
    let ttl = lease.max(MIN_KEY_LEASE);
    let mut tick = tokio::time::interval(ttl / 3);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(slots) = broker.key_slots() else { return };
        let renewals =
            futures::stream::iter(held.snapshot()).for_each_concurrent(RENEWALS_AT_ONCE, |(id, key, holder)| {
                let held = &held;
                async move {
                    if !held.holds(id) {
                        return;
                    }
                    match slots.renew(&key, &holder, ttl).await {
                        Ok(true) => {}
                        Ok(false) => {
                            tracing::warn!(%key, "the key slot's lease ended before its task did (renewals too late)")
                        }
                        Err(e) => tracing::warn!(%key, error = %e, "could not renew a key slot"),
                    }
                }
            });
        renewals.await;
        match slots.sweep().await {
            Ok(0) => {}
            Ok(n) => tracing::info!(moved = n, "key slots of dead workers freed; parked tasks moved back"),
            Err(e) => tracing::debug!(error = %e, "key slot sweep failed; next time"),
        }
    }
}

/// How long to wait for the next cluster-wide start of `task` spaced by `interval` (reserved
/// from the broker's bucket), or why it cannot be had.
pub(super) async fn cluster_wait(w: &Shared, task: &str, interval: Duration) -> Result<Duration, BrokerError> {
    let broker = w.app.broker();
    let buckets = broker.require_rate_buckets("rate_scope = \"cluster\"")?;
    celery_core::backoff::retrying(|| buckets.reserve(task, interval)).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ended(id: u64, key: &str, limit: u32, uses: u32) -> SlotLease {
        SlotLease {
            id,
            key: key.into(),
            holder: format!("w/{id}"),
            queue: "q".into(),
            limit,
            uses,
            taken: Instant::now(),
        }
    }

    #[test]
    fn a_spare_slot_serves_the_next_task_of_its_key_and_limit_only() {
        let (mut sp, t0) = (Spares::default(), Instant::now());
        assert!(sp.keep(ended(1, "k", 2, 1), t0).unwrap(), "the first spare starts the flusher");
        assert!(!sp.keep(ended(2, "k", 2, 3), t0).unwrap(), "one flusher at a time");
        assert!(sp.reuse("k", 3).is_none(), "another limit does not share the slot");
        assert!(sp.reuse("other", 2).is_none());
        let s = sp.reuse("k", 2).unwrap();
        assert_eq!((s.id, s.uses, s.holder.as_str()), (2, 3, "w/2"), "the newest first, with its holder");
        assert_eq!(sp.reuse("k", 2).unwrap().id, 1);
        assert!(sp.reuse("k", 2).is_none() && sp.count == 0 && sp.by_key.is_empty());
    }

    #[test]
    fn refused_keys_worn_slots_and_too_many_spares_go_back_at_once() {
        let (mut sp, t0) = (Spares::default(), Instant::now());
        sp.refuse("full", t0);
        assert!(sp.keep(ended(1, "full", 2, 1), t0).is_err(), "a key refused lately");
        let later = SlotLease { taken: t0 + REFUSED_FOR, ..ended(2, "full", 2, 1) };
        assert!(sp.keep(later, t0 + REFUSED_FOR).is_ok(), "refused a while ago");
        assert!(sp.keep(ended(3, "k", 2, MAX_SLOT_USES), t0).is_err(), "served its share of tasks");
        let old = SlotLease { taken: t0, ..ended(4, "k", 2, 1) };
        assert!(sp.keep(old, t0 + MAX_SLOT_AGE).is_err(), "taken too long ago (a long task's slot)");
        for i in 0..MAX_SPARES as u64 {
            let _ = sp.keep(ended(10 + i, "k", 2, 1), t0);
        }
        assert_eq!(sp.count, MAX_SPARES);
        assert!(sp.keep(ended(9, "k", 2, 1), t0).is_err(), "bounded");
        for i in 0..=MAX_SPARES {
            sp.refuse(&format!("r{i}"), t0);
        }
        assert!(sp.refused.len() <= MAX_SPARES, "the refused keys are bounded too");
    }

    #[test]
    fn spares_go_back_after_their_grace() {
        let (mut sp, t0) = (Spares::default(), Instant::now());
        assert!(sp.keep(ended(1, "a", 1, 1), t0).unwrap());
        assert!(!sp.keep(ended(2, "b", 1, 1), t0 + SPARE_GRACE / 2).unwrap());
        assert!(sp.expired(t0 + SPARE_GRACE / 4).is_empty());
        let gone = sp.expired(t0 + SPARE_GRACE);
        assert_eq!(gone.iter().map(|l| (l.key.as_str(), l.id)).collect::<Vec<_>>(), vec![("a", 1)]);
        assert!(sp.flushing, "one is still spare");
        assert_eq!(sp.expired(t0 + SPARE_GRACE * 2).len(), 1);
        assert!(!sp.flushing && sp.count == 0, "none left: the flusher ends, the next spare starts one");
        assert!(sp.keep(ended(3, "a", 1, 1), t0).unwrap());
    }

    #[test]
    fn a_stopping_worker_takes_every_spare_at_once() {
        let (mut sp, t0) = (Spares::default(), Instant::now());
        assert!(sp.keep(ended(1, "a", 1, 1), t0).unwrap());
        assert!(!sp.keep(ended(2, "b", 2, 1), t0).unwrap());
        assert!(!sp.keep(ended(3, "b", 2, 1), t0).unwrap());
        let mut all: Vec<u64> = sp.take_all().iter().map(|l| l.id).collect();
        all.sort_unstable();
        assert_eq!(all, vec![1, 2, 3]);
        assert!(sp.count == 0 && sp.by_key.is_empty() && sp.reuse("b", 2).is_none());
        assert!(sp.expired(t0 + SPARE_GRACE).is_empty() && !sp.flushing, "the flusher ends at its next look");
    }

    #[test]
    fn held_slots_are_listed_until_removed() {
        let held = HeldSlots::default();
        let (a, b) = (held.add("k", "w1/t1"), held.add("k", "w1/t2"));
        assert_ne!(a, b);
        assert!(held.holds(a) && held.holds(b));
        let mut now = held.snapshot();
        now.sort();
        assert_eq!(now, vec![(a, "k".into(), "w1/t1".into()), (b, "k".into(), "w1/t2".into())]);
        held.remove(a);
        assert!(!held.holds(a));
        assert_eq!(held.len(), 1);
        held.remove(a); // removing twice is harmless
        held.remove(b);
        assert_eq!(held.len(), 0);
    }
}

//! Flow control in the worker (the mechanisms are in [`celery_core::flow`]).
//!
//! Per-key concurrency: right before a
//! task with a concurrency key and a limit runs, its slot is taken from the broker, or the broker
//! parks the message and the delivery is acked; the slot is renewed while the task runs and
//! released after its outcome is stored (on a task of its own: the worker slot does not wait for
//! the broker's answer). A sweep loop frees the slots of dead workers on brokers
//! that need one.
//!
//! Cluster-wide rate limits: [`cluster_wait`] reserves the task's next start from the broker's
//! bucket; the caller waits for it as for a per-worker limit.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use celery_core::flow::{limit_for, validate_limit, Admission, SlotRequest, CONCURRENCY_KEY, MIN_KEY_LEASE};
use celery_core::protocol::Message;
use celery_core::registry;
use celery_core::{Broker, BrokerError, Delivery, TaskOptions};

use super::shared::Shared;

/// A held slot: renewed on a task of its own until released (dropping it releases it too).
#[derive(Debug)]
pub(super) struct HeldSlot {
    broker: Arc<dyn Broker>,
    key: String,
    holder: String,
    queue: String,
    renewer: tokio::task::JoinHandle<()>,
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
        self.renewer.abort();
        let (broker, key, holder, queue) = (
            self.broker.clone(),
            std::mem::take(&mut self.key),
            std::mem::take(&mut self.holder),
            std::mem::take(&mut self.queue),
        );
        let Ok(rt) = tokio::runtime::Handle::try_current() else { return };
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
    let holder = format!("{}/{}", w.config.hostname, msg.headers.id);
    let ttl = w.config.key_lease.max(MIN_KEY_LEASE);
    let req = SlotRequest { key, limit, holder: &holder, ttl };
    if let Err(e) = req.validate() {
        return KeyStep::Failed(e.into());
    }
    match celery_core::backoff::retrying(|| slots.acquire_or_park(&req, &d.queue, msg)).await {
        Ok(Admission::Acquired) => {
            let renewer = tokio::spawn(renew(broker.clone(), key.to_owned(), holder.clone(), ttl));
            KeyStep::Held(HeldSlot { broker, key: key.to_owned(), holder, queue: d.queue.clone(), renewer })
        }
        Ok(Admission::Parked) => KeyStep::Parked,
        Err(e) => KeyStep::Failed(e),
    }
}

/// Renews a slot every third of its lease until aborted.
async fn renew(broker: Arc<dyn Broker>, key: String, holder: String, ttl: Duration) {
    let mut tick = tokio::time::interval(ttl / 3);
    tick.tick().await;
    loop {
        tick.tick().await;
        let Some(slots) = broker.key_slots() else { return };
        match slots.renew(&key, &holder, ttl).await {
            Ok(true) => {}
            Ok(false) => tracing::warn!(%key, "the key slot's lease ended before its task did (renewals too late)"),
            Err(e) => tracing::warn!(%key, error = %e, "could not renew a key slot"),
        }
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

/// Sweeps the broker's expired key slots every third of the lease, while the worker runs (only
/// when a linked task declares `key_concurrency` and the broker holds slots).
pub(super) async fn sweep_loop(broker: Arc<dyn Broker>, lease: Duration) {
    let mut tick = tokio::time::interval(lease.max(MIN_KEY_LEASE) / 3);
    loop {
        tick.tick().await;
        let Some(slots) = broker.key_slots() else { return };
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

//! What a worker takes in: the queues it consumes (changed at run time by `add_consumer` and
//! `cancel_consumer`), the broker consumer over them, and the deliveries it reserved (received,
//! not started yet: Celery's reserved requests).
//!
//! The broker gives one [`Consumer`] over a fixed list of queues and a fixed prefetch, so a change
//! of either builds a new consumer (a new *generation*) and retires the old one:
//! 1. the old one stops fetching;
//! 2. its deliveries still reserved here, and those it had prefetched but not handed out, go back
//!    to their queues (never started, so nothing runs twice);
//! 3. once every delivery it handed out that did start has been settled by its task (acked,
//!    requeued, deferred or dead-lettered through the connection it came from), it is closed.
//!
//! So nothing is lost or settled twice; the only cost of a change is that the retired
//! generation's unstarted deliveries may be taken again in a different order. A fetcher task per
//! generation takes deliveries from its consumer: while nothing waits in [`Reserved`] and a slot
//! is free, it starts each at once (the [`Starter`]); otherwise it adds it to [`Reserved`]
//! (bounded: a consumer never has more than its prefetch unsettled), from which the worker starts
//! them in order as slots free.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use celery_core::broker::Consumer;
use celery_core::routing::{Binding, ExchangeKind, QueueNames};
use celery_core::sync::lock;
use celery_core::{App, BrokerError, Delivery};
use serde_json::{json, Value};
use tokio::sync::{mpsc, watch, Notify};
use tokio::task::JoinHandle;

use super::outcome::requeue;
use super::requests::DeliveryInfo;
use super::WorkerStats;

/// The most queues one worker consumes (`-Q`, `--queues-file` and remote `add_consumer` together).
pub(crate) const MAX_QUEUES: usize = 100_000;
/// The longest queue name accepted (AMQP's short string).
pub(crate) const MAX_QUEUE_NAME: usize = 255;

/// A queue this worker consumes, described as Kombu's `Queue.as_dict(recurse=True)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct QueueSpec {
    pub(crate) name: String,
    /// The exchange it is bound to (Celery's default: one named like the queue, direct).
    pub(crate) exchange: String,
    pub(crate) exchange_type: String,
    pub(crate) routing_key: String,
}

impl QueueSpec {
    /// A queue as `worker -Q name` consumes it (Celery's automatic queue: a direct exchange and a
    /// routing key of the queue's name).
    pub(crate) fn named(name: &str) -> QueueSpec {
        QueueSpec {
            name: name.to_owned(),
            exchange: name.to_owned(),
            exchange_type: "direct".into(),
            routing_key: name.to_owned(),
        }
    }

    /// Kombu's `Queue.as_dict(recurse=True)`: every key Kombu has. The options this worker does not
    /// apply (arguments, TTLs, lengths, priorities set by a client) are `null`, their default.
    pub(crate) fn as_dict(&self) -> Value {
        json!({
            "name": self.name,
            "exchange": {
                "name": self.exchange, "type": self.exchange_type, "arguments": null, "durable": true,
                "passive": false, "auto_delete": false, "delivery_mode": null, "no_declare": false,
            },
            "routing_key": self.routing_key,
            "queue_arguments": null, "binding_arguments": null, "consumer_arguments": null,
            "durable": true, "exclusive": false, "auto_delete": false, "no_ack": false, "alias": null,
            "bindings": [], "no_declare": false, "expires": null, "message_ttl": null,
            "max_length": null, "max_length_bytes": null, "max_priority": null,
        })
    }
}

/// Why a queue was not added.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum QueueError {
    /// The name is empty or too long.
    #[error("invalid queue name {0:?}: 1 to {MAX_QUEUE_NAME} bytes")]
    Name(String),
    /// The worker consumes [`MAX_QUEUES`] already.
    #[error("already consuming from {MAX_QUEUES} queues")]
    TooMany,
    /// The exchange type is not one of direct, topic, fanout, headers.
    #[error("unknown exchange type {0:?}")]
    ExchangeType(String),
    /// The worker is stopping.
    #[error("the worker is shutting down")]
    Stopping,
    /// The broker refused.
    #[error(transparent)]
    Broker(#[from] BrokerError),
}

/// A delivery received and not started yet, with the token that keeps its consumer open until it
/// is settled.
#[derive(Debug)]
pub(crate) struct Reservation {
    pub(crate) delivery: Delivery,
    generation: u64,
    pub(crate) open: ConsumerOpen,
}

/// Keeps a retired consumer from closing while the delivery it travels with is unsettled.
#[derive(Debug)]
pub(crate) struct ConsumerOpen(#[allow(dead_code)] mpsc::Sender<()>);

/// The deliveries received and not started, in the order the broker gave them.
#[derive(Debug, Default)]
pub(crate) struct Reserved {
    queue: Mutex<VecDeque<Reservation>>,
    /// For the consume loop (one waiter; a notification is kept until it waits).
    arrived: Notify,
    /// For observers (the autoscaler).
    pushed: Notify,
    len: AtomicUsize,
}

impl Reserved {
    fn push(&self, r: Reservation) {
        let mut q = lock(&self.queue);
        q.push_back(r);
        self.len.store(q.len(), Ordering::Release);
        drop(q);
        self.arrived.notify_one();
        self.pushed.notify_waiters();
    }

    /// The oldest reservation.
    pub(crate) fn pop(&self) -> Option<Reservation> {
        let mut q = lock(&self.queue);
        let r = q.pop_front();
        self.len.store(q.len(), Ordering::Release);
        r
    }

    /// Resolves when a reservation may have arrived since the last [`Reserved::pop`].
    pub(crate) async fn arrived(&self) {
        self.arrived.notified().await
    }

    /// Resolves at the next arrival (for observers; the consume loop uses [`Reserved::arrived`]).
    pub(crate) async fn pushed(&self) {
        self.pushed.notified().await
    }

    /// Reservations waiting now.
    #[allow(clippy::len_without_is_empty)]
    pub(crate) fn len(&self) -> usize {
        self.len.load(Ordering::Acquire)
    }

    fn take_generation(&self, generation: u64) -> Vec<Reservation> {
        let mut q = lock(&self.queue);
        let (mine, rest): (VecDeque<_>, VecDeque<_>) = q.drain(..).partition(|r| r.generation == generation);
        *q = rest;
        self.len.store(q.len(), Ordering::Release);
        mine.into()
    }

    /// Applies `f` to each reservation that decodes, in order (a reservation is decoded in place:
    /// the task decodes it no second time); one larger than `max_size` bytes is never decoded here.
    pub(crate) fn each(&self, max_size: usize, mut f: impl FnMut(&celery_core::protocol::Message, &DeliveryInfo)) {
        let mut q = lock(&self.queue);
        for r in q.iter_mut().filter(|r| r.delivery.size().is_none_or(|s| s <= max_size)) {
            let info = DeliveryInfo { queue: r.delivery.queue.clone(), redelivered: r.delivery.redelivered };
            if let Ok(m) = r.delivery.message() {
                f(m, &info);
            }
        }
    }
}

/// Starts a reservation now if a slot is free, else gives it back.
#[derive(Clone)]
pub(crate) struct Starter(pub(crate) Arc<dyn Fn(Reservation) -> Option<Reservation> + Send + Sync>);

impl std::fmt::Debug for Starter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Starter")
    }
}

/// One consumer and the task that feeds its deliveries into [`Reserved`].
#[derive(Debug)]
struct Generation {
    retire: watch::Sender<bool>,
    task: JoinHandle<()>,
}

#[derive(Debug)]
struct State {
    queues: Vec<QueueSpec>,
    prefetch: usize,
    current: Option<Generation>,
    retiring: Vec<JoinHandle<()>>,
    next_generation: u64,
    stopping: bool,
}

/// The queues, the consumer over them and the reserved deliveries of one worker.
#[derive(Debug)]
pub(crate) struct Intake {
    app: App,
    max_message_size: usize,
    stats: Arc<WorkerStats>,
    reserved: Arc<Reserved>,
    starter: OnceLock<Starter>,
    state: tokio::sync::Mutex<State>,
    /// Set when a consumer ended by itself (the broker is gone for good).
    ended: watch::Sender<bool>,
    prefetch: AtomicUsize,
}

impl Intake {
    /// An intake consuming nothing yet ([`Intake::begin`] starts it), with `prefetch` per consumer.
    pub(crate) fn new(app: App, prefetch: usize, max_message_size: usize, stats: Arc<WorkerStats>) -> Arc<Intake> {
        Arc::new(Intake {
            app,
            max_message_size,
            stats,
            reserved: Arc::default(),
            starter: OnceLock::new(),
            state: tokio::sync::Mutex::new(State {
                queues: Vec::new(),
                prefetch,
                current: None,
                retiring: Vec::new(),
                next_generation: 0,
                stopping: false,
            }),
            ended: watch::channel(false).0,
            prefetch: AtomicUsize::new(prefetch),
        })
    }

    /// Sets how deliveries are started at once when nothing waits (set once, before `begin`).
    pub(crate) fn set_starter(&self, starter: Starter) {
        let _ = self.starter.set(starter);
    }

    /// Starts consuming `queues` (in priority order).
    pub(crate) async fn begin(&self, queues: Vec<QueueSpec>) -> Result<(), BrokerError> {
        let mut st = self.state.lock().await;
        let prefetch = st.prefetch;
        self.replace(&mut st, queues, prefetch).await
    }

    /// The reserved deliveries.
    pub(crate) fn reserved(&self) -> &Arc<Reserved> {
        &self.reserved
    }

    /// The prefetch of the current consumer.
    pub(crate) fn prefetch(&self) -> usize {
        self.prefetch.load(Ordering::Relaxed)
    }

    /// Resolves if a consumer ended by itself.
    pub(crate) async fn ended(&self) {
        let mut rx = self.ended.subscribe();
        let _ = rx.wait_for(|e| *e).await;
    }

    /// The queues consumed now, in priority order.
    pub(crate) async fn queues(&self) -> Vec<QueueSpec> {
        self.state.lock().await.queues.clone()
    }

    /// Starts consuming `spec` too (after the others); `Ok(false)` when it is consumed already.
    /// A queue bound to an exchange other than its own default is declared and bound first.
    pub(crate) async fn add_queue(&self, spec: QueueSpec) -> Result<bool, QueueError> {
        if spec.name.is_empty() || spec.name.len() > MAX_QUEUE_NAME {
            return Err(QueueError::Name(spec.name));
        }
        let mut st = self.state.lock().await;
        if st.stopping {
            return Err(QueueError::Stopping);
        }
        if st.queues.iter().any(|q| q.name == spec.name) {
            return Ok(false);
        }
        if st.queues.len() >= MAX_QUEUES {
            return Err(QueueError::TooMany);
        }
        if spec.exchange != spec.name || spec.exchange_type != "direct" || spec.routing_key != spec.name {
            let kind: ExchangeKind =
                spec.exchange_type.parse().map_err(|_| QueueError::ExchangeType(spec.exchange_type.clone()))?;
            if !spec.exchange.is_empty() {
                self.app.broker().require_routing("add_consumer")?.declare_exchange(&spec.exchange, kind).await?;
                let binding = Binding {
                    exchange: spec.exchange.clone(),
                    queue: spec.name.clone(),
                    routing_key: spec.routing_key.clone(),
                    headers: Default::default(),
                    match_all: true,
                };
                self.app.broker().require_routing("add_consumer")?.bind(&binding).await?;
            }
        }
        let mut queues = st.queues.clone();
        queues.push(spec);
        let prefetch = st.prefetch;
        self.replace(&mut st, queues, prefetch).await?;
        Ok(true)
    }

    /// Stops consuming `name`; false when it was not consumed.
    pub(crate) async fn cancel_queue(&self, name: &str) -> Result<bool, QueueError> {
        let mut st = self.state.lock().await;
        if st.stopping {
            return Err(QueueError::Stopping);
        }
        if !st.queues.iter().any(|q| q.name == name) {
            return Ok(false);
        }
        let queues: Vec<QueueSpec> = st.queues.iter().filter(|q| q.name != name).cloned().collect();
        let prefetch = st.prefetch;
        self.replace(&mut st, queues, prefetch).await?;
        Ok(true)
    }

    /// Consumes with `prefetch` from now on (the pool changed size).
    pub(crate) async fn set_prefetch(&self, prefetch: usize) -> Result<(), QueueError> {
        let mut st = self.state.lock().await;
        if st.stopping || st.prefetch == prefetch {
            return Ok(());
        }
        let queues = st.queues.clone();
        self.replace(&mut st, queues, prefetch).await?;
        Ok(())
    }

    /// Builds the consumer for `queues` first (on failure nothing changes), then retires the old.
    async fn replace(&self, st: &mut State, queues: Vec<QueueSpec>, prefetch: usize) -> Result<(), BrokerError> {
        let names: Vec<String> = queues.iter().map(|q| q.name.clone()).collect();
        let consumer = if names.is_empty() {
            None
        } else {
            Some(self.app.broker().consume_capped(&names, prefetch.max(1), self.max_message_size).await?)
        };
        if let Some(old) = st.current.take() {
            let _ = old.retire.send(true);
            st.retiring.push(old.task);
        }
        st.retiring.retain(|t| !t.is_finished());
        st.current = consumer.map(|c| {
            let generation = st.next_generation;
            st.next_generation += 1;
            let (retire, retired) = watch::channel(false);
            let task = tokio::spawn(feed(
                c,
                generation,
                self.reserved.clone(),
                self.starter.get().cloned(),
                retired,
                self.stats.clone(),
                self.ended.clone(),
            ));
            Generation { retire, task }
        });
        tracing::info!(queues = %QueueNames(&names), count = names.len(), prefetch, "consuming");
        st.queues = queues;
        st.prefetch = prefetch;
        self.prefetch.store(prefetch, Ordering::Relaxed);
        Ok(())
    }

    /// Shutdown, first step: stop fetching and return every reserved delivery to its queue.
    pub(crate) async fn stop(&self) {
        let mut st = self.state.lock().await;
        st.stopping = true;
        if let Some(old) = st.current.take() {
            let _ = old.retire.send(true);
            st.retiring.push(old.task);
        }
    }

    /// Shutdown, last step: waits until every consumer is closed (each closes once the deliveries
    /// it handed out are settled).
    pub(crate) async fn closed(&self) {
        let tasks = std::mem::take(&mut self.state.lock().await.retiring);
        for t in tasks {
            let _ = t.await;
        }
    }
}

/// Feeds one generation's deliveries into `reserved` until it is retired, then retires it (see the
/// module docs).
async fn feed(
    mut consumer: Box<dyn Consumer>,
    generation: u64,
    reserved: Arc<Reserved>,
    starter: Option<Starter>,
    mut retire: watch::Receiver<bool>,
    stats: Arc<WorkerStats>,
    ended: watch::Sender<bool>,
) {
    let (open, mut settled) = mpsc::channel::<()>(1);
    // Made once, not per delivery: each `wait_for` registers a waiter anew.
    let retired = retire.wait_for(|r| *r);
    tokio::pin!(retired);
    loop {
        tokio::select! {
            biased;
            _ = &mut retired => break,
            d = consumer.next() => match d {
                Some(delivery) => {
                    let r = Reservation { delivery, generation, open: ConsumerOpen(open.clone()) };
                    // Started at once while nothing waits before it and a slot is free.
                    let r = match &starter {
                        Some(start) if reserved.len() == 0 => (start.0)(r),
                        _ => Some(r),
                    };
                    if let Some(r) = r {
                        reserved.push(r);
                    }
                }
                None => {
                    tracing::error!("the broker consumer ended: the worker stops");
                    let _ = ended.send(true);
                    break;
                }
            },
        }
    }
    consumer.stop();
    let unstarted = reserved.take_generation(generation);
    let returned = unstarted.len();
    for r in unstarted {
        requeue(&stats, r.delivery).await;
    }
    while let Some(d) = consumer.next().await {
        requeue(&stats, d).await;
    }
    tracing::debug!(generation, returned, "consumer retired: waiting for its deliveries to be settled");
    drop(open);
    let _ = settled.recv().await;
    consumer.close().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_queue_is_described_with_every_key_kombu_has() {
        let d = QueueSpec::named("emails").as_dict();
        let keys = [
            "name",
            "exchange",
            "routing_key",
            "queue_arguments",
            "binding_arguments",
            "consumer_arguments",
            "durable",
            "exclusive",
            "auto_delete",
            "no_ack",
            "alias",
            "bindings",
            "no_declare",
            "expires",
            "message_ttl",
            "max_length",
            "max_length_bytes",
            "max_priority",
        ];
        assert_eq!(d.as_object().unwrap().len(), keys.len());
        for k in keys {
            assert!(d.get(k).is_some(), "{k}");
        }
        assert_eq!(d["exchange"]["name"], "emails");
        assert_eq!(d["exchange"]["type"], "direct");
        assert_eq!(d["routing_key"], "emails");
    }
}

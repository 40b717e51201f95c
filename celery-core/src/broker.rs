//! The broker traits: publish messages to routes, consume them with leases, settle each delivery.
//!
//! Delivery guarantees every broker gives the worker:
//! - A delivery stays invisible to other consumers until it is settled (ack, requeue, defer,
//!   dead-letter) or its consumer dies (then it comes back; at-least-once).
//! - A message published with an `eta` in the future is stored durably and runs no earlier than
//!   its eta, whether or not a worker is running, and survives every worker stopping. On the brokers
//!   Python Celery shares (Redis, RabbitMQ) it is put on its queue like any other, with its `eta`
//!   header as Celery sends it, so a Python worker can run it; a consumer of ours that takes it
//!   before it is due hands it to the broker's durable delay store with [`Delivery::defer`] (stored
//!   there before the delivery is acked: a crash in between leaves a duplicate at worst, never a
//!   loss), where it occupies no consumer until due. Brokers no Python worker reads (the built-in
//!   log, memory) may keep it in that delay store from the start.
//! - [`Broker::purge`] removes what waits for a queue, on its queue and in its delay store.
//! - `consume(.., prefetch)` never has more than `prefetch` unsettled deliveries out.

use std::fmt::Debug;

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use crate::capability::{Broadcasts, Documents, Leases, Routing};
use crate::error::{BrokerError, ProtocolError};
use crate::flow::{FairQueues, KeySlots, RateBuckets};
use crate::protocol::Message;
use crate::routing::Route;

/// A message store with routing and leased consumption.
///
/// ```no_run
/// # async fn demo(broker: std::sync::Arc<dyn celery_core::Broker>) -> Result<(), Box<dyn std::error::Error>> {
/// use celery_core::{protocol::Message, routing::Route, Signature};
/// let msg = Message::from_signature(&Signature::by_name("add").args(serde_json::json!([1, 2])))?;
/// broker.publish(&Route::queue("celery"), &msg).await?;
/// let mut consumer = broker.consume(&["celery".to_string()], 8).await?;
/// if let Some(delivery) = consumer.next().await {
///     delivery.ack().await?;
/// }
/// # Ok(()) }
/// ```
#[async_trait]
pub trait Broker: Send + Sync + Debug {
    /// A short name for messages (`"redis"`).
    fn kind(&self) -> &'static str;

    /// Stores `msg` for the queues `route` leads to. Returns once the broker has it.
    async fn publish(&self, route: &Route, msg: &Message) -> Result<(), BrokerError>;

    /// Publishes many messages at once (one round trip where the broker allows).
    async fn publish_batch(&self, batch: &[(Route, Message)]) -> Result<(), BrokerError> {
        for (route, msg) in batch {
            self.publish(route, msg).await?;
        }
        Ok(())
    }

    /// Starts consuming `queues` (in priority order) with at most `prefetch` unsettled deliveries.
    async fn consume(&self, queues: &[String], prefetch: usize) -> Result<Box<dyn Consumer>, BrokerError>;

    /// Like [`Broker::consume`], refusing messages larger than `max_message_size` bytes: a broker
    /// that can tell a message's size before reading it dead-letters a larger one itself, with a
    /// reason naming the size and the limit, and hands out only a delivery whose
    /// [`Delivery::size`] says so (its message is a [`ProtocolError::TooLarge`]; settling it does
    /// nothing more). Others hand it out as usual, with its size, and the worker dead-letters it
    /// before decoding it. The default ignores the limit.
    async fn consume_capped(
        &self,
        queues: &[String],
        prefetch: usize,
        max_message_size: usize,
    ) -> Result<Box<dyn Consumer>, BrokerError> {
        let _ = max_message_size;
        self.consume(queues, prefetch).await
    }

    /// Deletes every message waiting for `queue`: the ready ones and those its delay store holds
    /// (eta messages published or deferred there); returns how many in all. Leased (unsettled)
    /// deliveries stay: acked, they are done; returned, they are queued again.
    ///
    /// ```no_run
    /// # async fn demo(broker: std::sync::Arc<dyn celery_core::Broker>) -> Result<(), celery_core::BrokerError> {
    /// let removed = broker.purge("celery").await?;
    /// println!("purged {removed} messages from celery");
    /// # Ok(()) }
    /// ```
    async fn purge(&self, queue: &str) -> Result<u64, BrokerError>;

    /// Messages waiting on `queue`: neither leased nor held in its delay store. An eta message on
    /// its queue (as Redis and RabbitMQ keep it until a worker defers it) counts.
    async fn queue_len(&self, queue: &str) -> Result<u64, BrokerError>;

    /// The oldest messages waiting in `queue`, oldest first, at most `max` of them, each decoded
    /// (or why it could not be). Nothing is leased, taken, reordered or counted as a delivery: a
    /// dashboard may look as often as it likes. A broker that cannot read a queue without taking
    /// from it fails with [`BrokerError::Unsupported`] ("peek"), never by taking messages.
    ///
    /// ```no_run
    /// # async fn demo(broker: std::sync::Arc<dyn celery_core::Broker>) -> Result<(), celery_core::BrokerError> {
    /// for msg in broker.peek("celery.dead", 50).await?.into_iter().flatten() {
    ///     println!("{} {}", msg.headers.id, msg.headers.task);
    /// }
    /// # Ok(()) }
    /// ```
    async fn peek(&self, queue: &str, max: usize) -> Result<Vec<Result<Message, ProtocolError>>, BrokerError> {
        let _ = max;
        Err(BrokerError::Unsupported {
            broker: self.kind(),
            option: format!("peek (reading `{queue}` without taking)"),
        })
    }

    /// Names the worker that consumes through this broker (Celery's node name, `celery@host`),
    /// before its first consume. A broker that ties leases to a live worker (Redis: a heartbeat
    /// key per worker) restores what an earlier run under the same name left unsettled when the
    /// worker starts, instead of waiting for those leases to expire. The default ignores it.
    ///
    /// ```
    /// fn before_consuming(broker: &dyn celery_core::Broker) {
    ///     broker.set_worker_name("celery@host-1");
    /// }
    /// ```
    fn set_worker_name(&self, name: &str) {
        let _ = name;
    }

    /// The health of `queue`: its depth, its dead letters and, where the broker knows them, the
    /// deliveries out to consumers and how long the oldest waiting message has waited. The
    /// default reads [`queue_len`](Broker::queue_len) of the queue and of its dead-letter queue
    /// ([`dead_letter_queue`]); a broker that keeps more (the PostgreSQL broker's rows) overrides it.
    ///
    /// ```no_run
    /// # async fn demo(broker: std::sync::Arc<dyn celery_core::Broker>) -> Result<(), celery_core::BrokerError> {
    /// let s = broker.queue_stats("celery").await?;
    /// println!("{} waiting, {} dead, oldest {:?}, {:?} in flight", s.depth, s.dead_letters, s.oldest_age, s.in_flight);
    /// # Ok(()) }
    /// ```
    async fn queue_stats(&self, queue: &str) -> Result<QueueStats, BrokerError> {
        Ok(QueueStats {
            depth: self.queue_len(queue).await?,
            dead_letters: self.queue_len(&dead_letter_queue(queue)).await?,
            in_flight: None,
            oldest_age: None,
        })
    }

    /// Exchanges and bindings, when the broker has them ([`Routing`]).
    fn routing(&self) -> Option<&dyn Routing> {
        None
    }

    /// Broadcasts, when the broker has them ([`Broadcasts`]).
    fn broadcasts(&self) -> Option<&dyn Broadcasts> {
        None
    }

    /// Leases, when the broker has them ([`Leases`]).
    fn leases(&self) -> Option<&dyn Leases> {
        None
    }

    /// Stored documents, when the broker has them ([`Documents`]).
    fn documents(&self) -> Option<&dyn Documents> {
        None
    }

    /// Task history, when the broker keeps it ([`History`](crate::history::History)): what the
    /// monitor records and searches.
    fn history(&self) -> Option<&dyn crate::history::History> {
        None
    }

    /// Per-key concurrency slots, when the broker holds them ([`KeySlots`]).
    fn key_slots(&self) -> Option<&dyn KeySlots> {
        None
    }

    /// Cluster-wide rate limit buckets, when the broker holds them ([`RateBuckets`]).
    fn rate_buckets(&self) -> Option<&dyn RateBuckets> {
        None
    }

    /// Fair queues, when the broker serves fairness keys in turn ([`FairQueues`]).
    fn fair_queues(&self) -> Option<&dyn FairQueues> {
        None
    }
}

/// A queue's health ([`Broker::queue_stats`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct QueueStats {
    /// Messages waiting (as [`Broker::queue_len`] counts them).
    pub depth: u64,
    /// Messages in its dead-letter queue.
    pub dead_letters: u64,
    /// Deliveries taken by consumers and not settled yet, when the broker knows.
    pub in_flight: Option<u64>,
    /// How long the oldest waiting message (due now) has waited, when the broker knows.
    #[serde(serialize_with = "secs")]
    pub oldest_age: Option<std::time::Duration>,
}

fn secs<S: serde::Serializer>(d: &Option<std::time::Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => s.serialize_f64(d.as_secs_f64()),
        None => s.serialize_none(),
    }
}

/// A stream of deliveries from some queues.
#[async_trait]
pub trait Consumer: Send + Debug {
    /// The next delivery; `None` once stopped. Connection loss is retried inside, with backoff.
    async fn next(&mut self) -> Option<Delivery>;

    /// Stops fetching: `next` drains what was fetched, then returns `None`. Settling still works.
    fn stop(&mut self);

    /// Flushes pending settlements and releases the consumer's resources.
    async fn close(&mut self);
}

/// A broadcast as received: its routing key and its message's body.
#[derive(Debug, Clone, PartialEq)]
pub struct Broadcast {
    /// The routing key it was published with.
    pub routing_key: String,
    /// The message body (the event document, for Celery events).
    pub body: Vec<u8>,
}

/// The broadcasts of one subscription ([`Broadcasts::subscribe`](crate::capability::Broadcasts::subscribe)).
#[async_trait]
pub trait Subscription: Send + Debug {
    /// The next broadcast; `None` when the subscription ended (its connection is gone for good).
    async fn next(&mut self) -> Option<Broadcast>;
}

/// A subscription fed through a channel by a task of the broker's, which stops when it is dropped.
#[derive(Debug)]
pub struct ChannelSubscription {
    rx: tokio::sync::mpsc::Receiver<Broadcast>,
    feeder: Option<tokio::task::JoinHandle<()>>,
}

impl ChannelSubscription {
    /// A subscription reading `rx`, fed by `feeder` (aborted on drop) or by whoever holds the sender.
    pub fn new(
        rx: tokio::sync::mpsc::Receiver<Broadcast>,
        feeder: Option<tokio::task::JoinHandle<()>>,
    ) -> ChannelSubscription {
        ChannelSubscription { rx, feeder }
    }
}

impl Drop for ChannelSubscription {
    fn drop(&mut self) {
        if let Some(f) = &self.feeder {
            f.abort();
        }
    }
}

#[async_trait]
impl Subscription for ChannelSubscription {
    async fn next(&mut self) -> Option<Broadcast> {
        self.rx.recv().await
    }
}

/// How a delivery is settled; implemented by each broker.
#[async_trait]
pub trait Settle: Send + Sync + Debug {
    /// Done: remove it for good.
    async fn ack(&self) -> Result<(), BrokerError>;
    /// Give it back to its queue now, for any consumer.
    async fn requeue(&self) -> Result<(), BrokerError>;
    /// Hold `msg` (the delivered message, possibly changed) durably until `until` in the broker's
    /// delay store, then ack this delivery: stored before acked (or both in one atomic step), so a
    /// failure between them leaves a duplicate at worst, never a loss. [`Broker::purge`] of the
    /// delivery's queue removes it.
    async fn defer(&self, msg: &Message, until: DateTime<Utc>) -> Result<(), BrokerError>;
    /// Copy the raw payload to the queue's dead-letter queue with `reason`, and ack this delivery.
    async fn dead_letter(&self, reason: &str) -> Result<(), BrokerError>;

    /// False once the broker has given this delivery to another consumer (its worker was declared
    /// dead while it stalled, see [`Broker::set_worker_name`]): its outcome should then not be
    /// stored here. The default: always held.
    async fn is_held(&self) -> bool {
        true
    }
}

/// Decodes a payload: the message (or why not) and whether the payload says it was redelivered.
pub type Decoder = Box<dyn FnOnce() -> (Result<Message, ProtocolError>, bool) + Send + Sync>;

/// One leased message.
pub struct Delivery {
    // Boxed: a delivery moves through every step of a task's run, and each step's future holds
    // it; inline, the message would make each of those futures a kilobyte larger.
    decoded: Option<Box<Result<Message, ProtocolError>>>,
    raw: Option<Decoder>,
    /// The queue it came from.
    pub queue: String,
    /// True when it was delivered before and not acked (for a [`Delivery::lazy`] one, what the
    /// payload says is added once it is decoded).
    pub redelivered: bool,
    size: Option<usize>,
    settle: Box<dyn Settle>,
}

impl std::fmt::Debug for Delivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Delivery")
            .field("message", &self.decoded)
            .field("decoded", &self.raw.is_none())
            .field("queue", &self.queue)
            .field("redelivered", &self.redelivered)
            .field("size", &self.size)
            .finish()
    }
}

fn taken() -> ProtocolError {
    ProtocolError::MissingField("message (already taken)")
}

impl Delivery {
    /// A delivery settled through `settle`.
    pub fn new(
        message: Result<Message, ProtocolError>,
        queue: String,
        redelivered: bool,
        settle: Box<dyn Settle>,
    ) -> Delivery {
        Delivery { decoded: Some(Box::new(message)), raw: None, queue, redelivered, size: None, settle }
    }

    /// A delivery decoded on first use ([`Delivery::message`], [`Delivery::take_message`]): where
    /// its task runs, not in the loop that takes deliveries, so decoding runs in parallel.
    pub fn lazy(decode: Decoder, queue: String, redelivered: bool, settle: Box<dyn Settle>) -> Delivery {
        Delivery { decoded: None, raw: Some(decode), queue, redelivered, size: None, settle }
    }

    /// The same delivery, saying its payload is `bytes` long (what the worker checks against its
    /// size cap before decoding anything).
    pub fn with_size(mut self, bytes: usize) -> Delivery {
        self.size = Some(bytes);
        self
    }

    /// The payload's size in bytes, when the broker told it.
    pub fn size(&self) -> Option<usize> {
        self.size
    }

    /// The decoded message (decoded now if it was not yet), or why it could not be decoded.
    pub fn message(&mut self) -> &Result<Message, ProtocolError> {
        let (raw, redelivered) = (&mut self.raw, &mut self.redelivered);
        self.decoded.get_or_insert_with(|| {
            let (message, again) = raw.take().map_or_else(|| (Err(taken()), false), |decode| decode());
            *redelivered |= again;
            Box::new(message)
        })
    }

    /// Why the message could not be decoded, when that is known already (never decodes: `None` for
    /// a delivery not decoded yet, or decoded fine).
    pub fn decoded_error(&self) -> Option<&ProtocolError> {
        self.decoded.as_deref()?.as_ref().err()
    }

    /// Moves the decoded message out (decoding it now if it was not yet); taken again, it is an
    /// error.
    pub fn take_message(&mut self) -> Result<Message, ProtocolError> {
        if let Some(decoded) = self.decoded.take() {
            return *decoded;
        }
        let (message, again) = self.raw.take().map_or_else(|| (Err(taken()), false), |decode| decode());
        self.redelivered |= again;
        message
    }

    /// Acknowledge: done.
    pub async fn ack(self) -> Result<(), BrokerError> {
        self.settle.ack().await
    }

    /// Return to the queue now.
    pub async fn requeue(self) -> Result<(), BrokerError> {
        self.settle.requeue().await
    }

    /// Hold `msg` until `until` in the broker's durable delay store, acking this delivery.
    pub async fn defer(self, msg: &Message, until: DateTime<Utc>) -> Result<(), BrokerError> {
        self.settle.defer(msg, until).await
    }

    /// Dead-letter with a reason.
    pub async fn dead_letter(self, reason: &str) -> Result<(), BrokerError> {
        self.settle.dead_letter(reason).await
    }

    /// False once the broker has given this delivery to another consumer (this worker stalled
    /// past its heartbeat's grace): a worker checks before storing an outcome, so that the run of
    /// the worker that took it over is the one stored.
    ///
    /// ```
    /// # async fn demo() {
    /// use celery_core::broker::{Delivery, Settled};
    /// let d = Delivery::new(Err(celery_core::ProtocolError::MissingField("body")), "celery".into(), false, Box::new(Settled));
    /// assert!(d.is_held().await);
    /// # }
    /// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(demo());
    /// ```
    pub async fn is_held(&self) -> bool {
        self.settle.is_held().await
    }
}

/// The dead-letter queue of `queue`.
pub fn dead_letter_queue(queue: &str) -> String {
    format!("{queue}.dead")
}

/// The header that carries a dead letter's reason.
pub const DEAD_LETTER_REASON: &str = "x-dead-letter-reason";
/// The header that carries a dead letter's original queue.
pub const DEAD_LETTER_QUEUE: &str = "x-dead-letter-queue";

/// How a delivery the broker settled already (dead-lettered while fetching it) is settled: every
/// operation is done.
#[derive(Debug, Clone, Copy, Default)]
pub struct Settled;

#[async_trait]
impl Settle for Settled {
    async fn ack(&self) -> Result<(), BrokerError> {
        Ok(())
    }
    async fn requeue(&self) -> Result<(), BrokerError> {
        Ok(())
    }
    async fn defer(&self, _msg: &Message, _until: DateTime<Utc>) -> Result<(), BrokerError> {
        Ok(())
    }
    async fn dead_letter(&self, _reason: &str) -> Result<(), BrokerError> {
        Ok(())
    }
}

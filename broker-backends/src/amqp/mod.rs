//! `amqp://` (RabbitMQ) through lapin: one connection per process, a confirm-mode publishing
//! channel, a channel per consumer with `basic.qos` prefetch (fair dispatch), ack after execute, and
//! reconnection with backoff (topology re-declared, consumers resumed; the deliveries of a dead
//! channel come back from RabbitMQ and are never acked on the new one).
//!
//! Queues are declared as Celery declares them (durable, no arguments), so Python Celery and we
//! share them. Two opt-ins change that (Celery's queue settings must then say the same):
//! - `?max_priority=N`: task queues get `x-max-priority` (priority queues: messages with a higher
//!   `priority` are delivered first; Celery's `task_queue_max_priority`);
//! - `?queue_type=quorum` (with `&max_deliveries=N`, default 10): replicated quorum queues whose
//!   messages are dead-lettered to `<queue>.dead` after N deliveries (`x-delivery-limit`), so a
//!   message that keeps killing its worker stops coming back. Every queue that holds tasks is then
//!   a quorum queue: the task queues, their delay levels (ETA) and their dead-letter queues; the
//!   task queues and delay levels dead-letter with `x-dead-letter-strategy=at-least-once` (and
//!   `x-overflow=reject-publish`, which RabbitMQ requires for it), so a message moving from a
//!   delay level into its queue, or into `<queue>.dead`, survives the loss of a node on the way.
//!   Broadcast subscription queues (exclusive, auto-delete) and `rpc://` reply queues cannot be
//!   quorum queues and stay classic. Quorum queues have no `x-max-priority` (RabbitMQ 3.x ignores
//!   priorities on them; 3.13+ knows two), so `max_priority` needs classic queues: the URL refuses
//!   both together rather than silently dropping priorities.
//!
//! The URL may list the nodes of a cluster separated by `;` ([`Nodes`]): every loop that holds a
//! connection (publishing, each consumer, broadcast subscriptions, the `rpc://` backend) moves to
//! the next node that answers when its connection dies. A publish interrupted by a lost connection
//! is sent again on the next connection (up to [`PUBLISH_ATTEMPTS`] times), marked with the
//! [`RESENT`] header: its outcome was unknown, so the first copy may have arrived too, and a worker
//! treats a resent message as a redelivery (it acks without running when the task's SUCCESS is
//! stored already).
//!
//! ETA/countdown messages are published to their queue like any other, with their `eta` header as
//! Celery sends it, so a Python Celery worker sharing the queue runs them. A consumer that takes one
//! whose eta is ahead defers it ([`celery_core::Delivery::defer`]): it is published (confirmed) to a
//! durable delay queue, `<queue>.delay.<N>s`, before the delivery is acked (a crash between leaves
//! a duplicate at worst, never a loss). Those queues' messages expire after N seconds (a power of
//! two, at most 2^20) and dead-letter back into `<queue>`, where the next consumer defers what is
//! still ahead to a shorter level: a long countdown hops down the levels, held by RabbitMQ, never in
//! a worker's memory. Purge empties `<queue>` and deletes every delay queue of it (a level is declared
//! again when next used). A producer that declared a level before a purge deleted it still believes
//! it exists, so deferrals are published `mandatory`: RabbitMQ returns one sent to a missing level,
//! and the producer declares the level again and sends it once more.
//!
//! Where things are: `url.rs` (the URL and the connection), `consumer.rs`, `settle.rs` (acks,
//! requeues, deferral, dead letters), `error.rs` (lapin errors as ours), `broadcast.rs`,
//! `lease.rs` (leases and documents), `fields.rs` (headers as AMQP tables); topology and
//! publishing here.
//!
//! ```no_run
//! # async fn demo() -> Result<(), celery_core::BrokerError> {
//! let broker = broker_backends::amqp::AmqpBroker::connect("amqp://guest:guest@127.0.0.1:5672/%2f").await?;
//! # Ok(()) }
//! ```

mod broadcast;
mod consumer;
pub mod error;
mod fields;
mod lease;
mod probe;
mod settle;
mod url;

pub use url::{connect, Nodes, MAX_NODES};

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use celery_core::broker::dead_letter_queue;
use celery_core::capability::{Broadcasts, Documents, Leases, Routing};
use celery_core::protocol::{Message, CONTENT_ENCODING, CONTENT_TYPE};
use celery_core::routing::{Binding, Exchange, ExchangeKind, Route};
use celery_core::sync::lock;
use celery_core::{Broker, BrokerError, Consumer};
use chrono::{DateTime, Utc};
use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Connection};

use consumer::AmqpConsumer;
use error::{broker_error, failed};

fn short(s: &str) -> Result<ShortString, BrokerError> {
    ShortString::try_new(s.to_owned()).map_err(|_| BrokerError::operation(format!("name longer than 255 bytes: `{s}`")))
}

/// How many times a publish is tried when its connection is lost under it (each try reconnects,
/// failing over to the next node).
pub const PUBLISH_ATTEMPTS: u32 = 3;

/// The header that marks a message sent again after a publish whose outcome was unknown (a lost
/// connection before the confirm): a consumer counts it as redelivered.
pub const RESENT: &str = "celery_rs_resent";

/// `props` with the [`RESENT`] mark.
fn resent(props: BasicProperties) -> BasicProperties {
    let mut headers = props.headers().clone().unwrap_or_default();
    headers.insert(RESENT.into(), AMQPValue::Boolean(true));
    props.with_headers(headers)
}

/// True for a delivery that is, or may be, a second copy: redelivered by RabbitMQ, or [`RESENT`].
fn maybe_duplicate(d: &lapin::message::Delivery) -> bool {
    d.redelivered || d.properties.headers().as_ref().is_some_and(|h| h.contains_key(RESENT))
}

/// The largest delay level, in seconds (about 12 days); longer countdowns hop again.
const MAX_DELAY_SECS: u64 = 1 << 20;

/// The delay queue of `queue` whose messages wait `secs` seconds.
fn delay_queue_name(queue: &str, secs: u64) -> String {
    format!("{queue}.delay.{secs}s")
}

/// Every delay level, in seconds: 1, 2, 4, ... [`MAX_DELAY_SECS`].
fn delay_levels() -> impl Iterator<Item = u64> {
    (0..=MAX_DELAY_SECS.trailing_zeros()).map(|i| 1u64 << i)
}

/// The delay level for a message due in `remaining` seconds: the largest power of two not above
/// it (at least 1, at most [`MAX_DELAY_SECS`]), so it never comes back after its due time.
fn delay_level(remaining: u64) -> u64 {
    let r = remaining.max(1);
    (1u64 << (63 - r.leading_zeros())).min(MAX_DELAY_SECS)
}

#[derive(Debug)]
struct Inner {
    /// The nodes (servers, TLS files) and how task queues are declared.
    nodes: Nodes,
    conn: tokio::sync::Mutex<Option<(Arc<Connection>, Channel)>>,
    declared: Mutex<HashSet<String>>,
    holds: lease::Holds,
    probes: probe::Probes,
}

/// The RabbitMQ broker.
#[derive(Debug, Clone)]
pub struct AmqpBroker {
    inner: Arc<Inner>,
}

impl AmqpBroker {
    /// Connects to an `amqp://` or `amqps://` URL, or to the first node that answers of a
    /// `;`-separated list of them ([`Nodes`]); the first connection must succeed, later losses
    /// are retried (on the next node). A `heartbeat=30` is added to each URL unless it names one.
    pub async fn connect(url: &str) -> Result<AmqpBroker, BrokerError> {
        let nodes = Nodes::parse(url)?;
        let b = AmqpBroker {
            inner: Arc::new(Inner {
                nodes,
                conn: tokio::sync::Mutex::new(None),
                declared: Mutex::default(),
                holds: Default::default(),
                probes: Default::default(),
            }),
        };
        b.connection().await?;
        Ok(b)
    }

    /// The live connection and publishing channel, reconnecting when needed.
    async fn connection(&self) -> Result<(Arc<Connection>, Channel), BrokerError> {
        let mut guard = self.inner.conn.lock().await;
        let lost = guard.is_some();
        if let Some((c, ch)) = guard.as_ref() {
            if c.status().connected() {
                if ch.status().connected() {
                    return Ok((c.clone(), ch.clone()));
                }
                // The channel alone was closed (a channel error, or a nack: see `publish_once`).
                let c = c.clone();
                let ch = publishing_channel(&c).await?;
                *guard = Some((c.clone(), ch.clone()));
                return Ok((c, ch));
            }
            tracing::warn!("amqp: connection lost; reconnecting");
        }
        let conn =
            Arc::new(if lost { self.inner.nodes.reconnect().await? } else { self.inner.nodes.connect().await? });
        let ch = publishing_channel(&conn).await?;
        lock(&self.inner.declared).clear();
        if lost {
            crate::reconnected("amqp");
        }
        *guard = Some((conn.clone(), ch.clone()));
        Ok((conn, ch))
    }

    /// Declares a task queue: as Celery does (durable, no arguments), or with the URL's opt-ins;
    /// a quorum queue's dead-letter queue is declared first, so nothing it hands on is dropped.
    async fn declare_task_queue(&self, ch: &Channel, queue: &str) -> Result<(), BrokerError> {
        let mut args = FieldTable::default();
        let o = self.inner.nodes.queues();
        if let Some(p) = o.max_priority {
            args.insert("x-max-priority".into(), AMQPValue::ShortShortUInt(p));
        }
        if let Some(limit) = o.delivery_limit {
            self.declare_dead_letter_queue(ch, queue).await?;
            args.insert("x-delivery-limit".into(), AMQPValue::LongLongInt(i64::from(limit)));
            quorum_dead_lettering(&mut args, &dead_letter_queue(queue));
        }
        self.declare_queue(ch, queue, args).await
    }

    /// Declares `<queue>.dead`: a quorum queue with `queue_type=quorum`, else as Celery would.
    async fn declare_dead_letter_queue(&self, ch: &Channel, queue: &str) -> Result<(), BrokerError> {
        let mut args = FieldTable::default();
        if self.inner.nodes.queues().quorum() {
            args.insert("x-queue-type".into(), AMQPValue::LongString("quorum".into()));
        }
        self.declare_queue(ch, &dead_letter_queue(queue), args).await
    }

    /// `exchange.declare` as `exchange` says (kind, durability), on a channel of its own.
    async fn exchange_declare(&self, exchange: &Exchange) -> Result<(), BrokerError> {
        let ch = self.channel().await?;
        let kind = match exchange.kind {
            ExchangeKind::Direct => lapin::ExchangeKind::Direct,
            ExchangeKind::Topic => lapin::ExchangeKind::Topic,
            ExchangeKind::Fanout => lapin::ExchangeKind::Fanout,
            ExchangeKind::Headers => lapin::ExchangeKind::Headers,
        };
        let opts = ExchangeDeclareOptions { durable: exchange.durable, ..Default::default() };
        ch.exchange_declare(short(&exchange.name)?, kind, opts, FieldTable::default())
            .await
            .map_err(failed("amqp: declare an exchange"))?;
        let _ = ch.close(200, "declared".into()).await;
        Ok(())
    }

    /// A fresh channel (consumers, passive checks).
    async fn channel(&self) -> Result<Channel, BrokerError> {
        let (conn, _) = self.connection().await?;
        conn.create_channel().await.map_err(failed("amqp: open a channel"))
    }

    async fn declare_queue(&self, ch: &Channel, name: &str, args: FieldTable) -> Result<(), BrokerError> {
        if lock(&self.inner.declared).contains(name) {
            return Ok(());
        }
        ch.queue_declare(short(name)?, QueueDeclareOptions::durable(), args)
            .await
            .map_err(failed("amqp: declare a queue"))?;
        lock(&self.inner.declared).insert(name.to_owned());
        Ok(())
    }

    /// The delay queue for `queue` at `secs` (declared on first use).
    async fn delay_queue(&self, ch: &Channel, queue: &str, secs: u64) -> Result<String, BrokerError> {
        let name = delay_queue_name(queue, secs);
        let mut args = FieldTable::default();
        args.insert("x-message-ttl".into(), AMQPValue::LongLongInt((secs * 1000) as i64));
        if self.inner.nodes.queues().quorum() {
            quorum_dead_lettering(&mut args, queue);
        } else {
            args.insert("x-dead-letter-exchange".into(), AMQPValue::LongString("".into()));
            args.insert("x-dead-letter-routing-key".into(), AMQPValue::LongString(queue.into()));
        }
        self.declare_queue(ch, &name, args).await?;
        Ok(name)
    }

    /// Publishes and waits for RabbitMQ's confirm; a publish whose connection was lost under it
    /// is sent again, [`RESENT`], on the next connection (see the module docs). A `mandatory`
    /// publish that RabbitMQ returned (no queue took it) is an error.
    async fn publish_raw(
        &self,
        exchange: &str,
        key: &str,
        mandatory: bool,
        props: BasicProperties,
        body: &[u8],
    ) -> Result<(), BrokerError> {
        match self.publish_routed(exchange, key, mandatory, props, body).await? {
            Routed::Queued => Ok(()),
            Routed::Returned(text) => Err(unroutable(exchange, key, &text)),
        }
    }

    /// [`Self::publish_raw`], telling a returned `mandatory` publish apart.
    async fn publish_routed(
        &self,
        exchange: &str,
        key: &str,
        mandatory: bool,
        props: BasicProperties,
        body: &[u8],
    ) -> Result<Routed, BrokerError> {
        let mut props = props;
        let mut attempt = 1;
        loop {
            match self.publish_once(exchange, key, mandatory, props.clone(), body).await {
                Err(e) if e.is_retryable() && attempt < PUBLISH_ATTEMPTS => {
                    tracing::warn!(error = %e, exchange, key, attempt, "amqp: publish interrupted; sending it again");
                    props = resent(props);
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    async fn publish_once(
        &self,
        exchange: &str,
        key: &str,
        mandatory: bool,
        props: BasicProperties,
        body: &[u8],
    ) -> Result<Routed, BrokerError> {
        let (_, ch) = self.connection().await?;
        let opts = BasicPublishOptions { mandatory, ..Default::default() };
        let pending = ch
            .basic_publish(short(exchange)?, short(key)?, opts, body, props)
            .await
            .map_err(publish_failed("amqp: publish"))?;
        let confirm = pending.await.map_err(publish_failed("amqp: wait for the publish confirm"))?;
        if confirm.is_nack() {
            drop_nacking_channel(&ch).await;
        }
        check_confirm(confirm, key)
    }

    /// One try of [`Broker::publish_batch`]; `resend` marks every message [`RESENT`].
    async fn publish_batch_once(&self, batch: &[(Route, Message)], resend: bool) -> Result<(), BrokerError> {
        let (_, ch) = self.connection().await?;
        let mut pending = Vec::with_capacity(batch.len());
        for (route, msg) in batch {
            if route.exchange.is_empty() {
                self.declare_task_queue(&ch, &route.routing_key).await?;
            }
            let opts = BasicPublishOptions { mandatory: route.mandatory, ..Default::default() };
            let key = short(&route.routing_key)?;
            let props = if resend { resent(properties(msg)) } else { properties(msg) };
            let p = ch
                .basic_publish(short(&route.exchange)?, key, opts, &msg.body, props)
                .await
                .map_err(publish_failed("amqp: publish a batch"))?;
            pending.push((p, route));
        }
        let mut outcome = Ok(());
        for (p, route) in pending {
            let confirm = p.await.map_err(publish_failed("amqp: wait for a batch's confirms"))?;
            if confirm.is_nack() && outcome.is_ok() {
                drop_nacking_channel(&ch).await;
            }
            let checked = check_confirm(confirm, &route.routing_key).and_then(|routed| match routed {
                Routed::Queued => Ok(()),
                Routed::Returned(text) => Err(unroutable(&route.exchange, &route.routing_key, &text)),
            });
            if let (Err(e), true) = (checked, outcome.is_ok()) {
                outcome = Err(e);
            }
        }
        outcome
    }

    /// Holds `msg` in the delay queues of `queue` until `until` (returns once RabbitMQ confirmed it).
    /// Published `mandatory`: when a purge (here or in another process) deleted the level since
    /// this process declared it, RabbitMQ returns the message, and the level is declared again
    /// and the message sent once more.
    async fn publish_delayed(&self, queue: &str, msg: &Message, until: DateTime<Utc>) -> Result<(), BrokerError> {
        let (_, ch) = self.connection().await?;
        self.declare_task_queue(&ch, queue).await?;
        let remaining = u64::try_from((until - Utc::now()).num_seconds()).unwrap_or(0);
        let level = delay_level(remaining);
        let delay = self.delay_queue(&ch, queue, level).await?;
        let props = properties(msg);
        if let Routed::Returned(text) = self.publish_routed("", &delay, true, props.clone(), &msg.body).await? {
            tracing::info!(queue = %delay, reason = %text, "amqp: delay queue gone (purged); declaring it again");
            lock(&self.inner.declared).remove(&delay);
            let (_, ch) = self.connection().await?;
            self.delay_queue(&ch, queue, level).await?;
            self.publish_raw("", &delay, true, props, &msg.body).await?;
        }
        Ok(())
    }
}

/// Where RabbitMQ put a confirmed publish.
#[derive(Debug)]
enum Routed {
    /// In a queue (or routed nowhere without `mandatory`).
    Queued,
    /// Returned: `mandatory` and no queue took it (RabbitMQ's reply text).
    Returned(String),
}

/// The error of a `mandatory` publish that no queue took.
fn unroutable(exchange: &str, key: &str, reply_text: &str) -> BrokerError {
    BrokerError::operation(format!(
        "unroutable (mandatory) publish to exchange `{exchange}` with key `{key}`: {reply_text}"
    ))
}

/// The x-arguments of a quorum queue that dead-letters into queue `to` (by the default exchange)
/// at least once: RabbitMQ keeps a message until `to` confirmed it, which needs `reject-publish`
/// as the overflow strategy (it only acts with a length limit, which we never set).
fn quorum_dead_lettering(args: &mut FieldTable, to: &str) {
    args.insert("x-queue-type".into(), AMQPValue::LongString("quorum".into()));
    args.insert("x-dead-letter-exchange".into(), AMQPValue::LongString("".into()));
    args.insert("x-dead-letter-routing-key".into(), AMQPValue::LongString(to.into()));
    args.insert("x-dead-letter-strategy".into(), AMQPValue::LongString("at-least-once".into()));
    args.insert("x-overflow".into(), AMQPValue::LongString("reject-publish".into()));
}

/// [`failed`] for a publish: a publishing channel closed under it (another publish's nack
/// replaced it, see [`drop_nacking_channel`]) is retryable too, on the next channel.
fn publish_failed(context: &'static str) -> impl FnOnce(lapin::Error) -> BrokerError {
    move |e| match e.kind() {
        lapin::ErrorKind::InvalidChannelState(..) => BrokerError::connection_with(context, e),
        _ => broker_error(context, e),
    }
}

/// A confirm-mode channel for publishing.
async fn publishing_channel(conn: &Connection) -> Result<Channel, BrokerError> {
    let ch = conn.create_channel().await.map_err(failed("amqp: open the publishing channel"))?;
    ch.confirm_select(ConfirmSelectOptions::default()).await.map_err(failed("amqp: enable publisher confirms"))?;
    Ok(ch)
}

/// Closes a publishing channel that got a nack, so the next publish opens a fresh one. A quorum
/// queue whose leader was lost can nack every later publish of a channel (its queue client stays
/// refused) while a new channel is served by the new leader: seen on RabbitMQ 3.10 after a node's
/// `kill -9`.
async fn drop_nacking_channel(ch: &Channel) {
    tracing::warn!("amqp: a publish was refused (nack); replacing the publishing channel");
    let _ = ch.close(200, "nacked: replaced".into()).await;
}

/// Where a confirmed publish went; an error for a nack (retryable).
fn check_confirm(confirm: Confirmation, key: &str) -> Result<Routed, BrokerError> {
    match confirm {
        Confirmation::Ack(None) | Confirmation::NotRequested => Ok(Routed::Queued),
        Confirmation::Ack(Some(ret)) => Ok(Routed::Returned(ret.reply_text.to_string())),
        // Retryable: sent again on a fresh channel ([`drop_nacking_channel`]).
        Confirmation::Nack(_) => Err(BrokerError::connection(format!(
            "amqp: RabbitMQ refused the message (nack) for `{key}`; its channel is replaced"
        ))),
    }
}

/// Celery's AMQP properties for a message: headers, JSON content type, persistent delivery
/// (what [`AmqpBroker`] publishes with the message's body).
///
/// ```
/// let msg = celery_core::protocol::Message::from_signature(&celery_core::Signature::by_name("add"))?;
/// assert_eq!(broker_backends::amqp::properties(&msg).delivery_mode(), &Some(2));
/// # Ok::<(), celery_core::ProtocolError>(())
/// ```
pub fn properties(msg: &Message) -> BasicProperties {
    // Unset (null) headers are left out: Celery reads every optional header with a default, and
    // RabbitMQ's cost per message grows with the header table (about 13% more drain without them).
    let mut headers = msg.headers.to_json();
    headers.retain(|_, v| !v.is_null());
    let mut p = BasicProperties::default()
        .with_content_type(CONTENT_TYPE.into())
        .with_content_encoding(CONTENT_ENCODING.into())
        .with_delivery_mode(2)
        .with_headers(fields::to_table(&headers));
    if let Ok(id) = ShortString::try_new(msg.properties.correlation_id.clone()) {
        p = p.with_correlation_id(id);
    }
    if let Some(r) = msg.properties.reply_to.as_ref().and_then(|r| ShortString::try_new(r.clone()).ok()) {
        p = p.with_reply_to(r);
    }
    if let Some(pr) = msg.properties.priority {
        p = p.with_priority(pr);
    }
    p
}

#[async_trait]
impl Broker for AmqpBroker {
    fn kind(&self) -> &'static str {
        "amqp"
    }

    /// An eta message goes to its queue like any other (see the module docs).
    async fn publish(&self, route: &Route, msg: &Message) -> Result<(), BrokerError> {
        if route.exchange.is_empty() {
            let (_, ch) = self.connection().await?;
            self.declare_task_queue(&ch, &route.routing_key).await?;
        }
        self.publish_raw(&route.exchange, &route.routing_key, route.mandatory, properties(msg), &msg.body).await
    }

    /// Publishes every message, then waits for all the confirms (one round trip for the batch);
    /// a batch whose connection was lost under it is sent again whole, [`RESENT`].
    async fn publish_batch(&self, batch: &[(Route, Message)]) -> Result<(), BrokerError> {
        let mut attempt = 1;
        loop {
            match self.publish_batch_once(batch, attempt > 1).await {
                Err(e) if e.is_retryable() && attempt < PUBLISH_ATTEMPTS => {
                    tracing::warn!(error = %e, size = batch.len(), attempt, "amqp: batch interrupted; sending it again");
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    async fn consume(&self, queues: &[String], prefetch: usize) -> Result<Box<dyn Consumer>, BrokerError> {
        self.consume_capped(queues, prefetch, usize::MAX).await
    }

    /// A delivery larger than the cap is handed out undecoded (lapin has buffered its body already:
    /// AMQP sends the body after a content header that announces its size, and lapin reads it
    /// whole); the worker dead-letters it with the reason.
    async fn consume_capped(
        &self,
        queues: &[String],
        prefetch: usize,
        max_message_size: usize,
    ) -> Result<Box<dyn Consumer>, BrokerError> {
        let c = AmqpConsumer::start(self.clone(), queues, prefetch, max_message_size).await?;
        Ok(Box::new(c))
    }

    /// Deletes the delay queues of `queue` (each `queue.delete` answers with the messages it
    /// dropped, 0 for a level never declared), then purges `queue` itself, all in flight at once on
    /// one channel: RabbitMQ serves a channel's methods in order, so a message that expires from a
    /// delay queue into `queue` meanwhile is purged too. A level is declared again when next used
    /// (see the module docs). Unacked deliveries stay.
    async fn purge(&self, queue: &str) -> Result<u64, BrokerError> {
        let levels: Vec<ShortString> = delay_levels()
            .filter_map(|secs| ShortString::try_new(delay_queue_name(queue, secs)).ok()) // too long: never declared
            .collect();
        {
            let mut declared = lock(&self.inner.declared);
            for level in &levels {
                declared.remove(level.as_str());
            }
        }
        let ch = self.channel().await?;
        self.declare_task_queue(&ch, queue).await?;
        let deletes: Vec<_> =
            levels.into_iter().map(|level| ch.queue_delete(level, QueueDeleteOptions::default())).collect();
        let purge = ch.queue_purge(short(queue)?, QueuePurgeOptions::default());
        let (deleted, purged) = futures::join!(futures::future::try_join_all(deletes), purge);
        let n = deleted.map_err(failed("amqp: delete a delay queue"))?.into_iter().map(u64::from).sum::<u64>()
            + u64::from(purged.map_err(failed("amqp: purge"))?);
        let _ = ch.close(200, "purged".into()).await;
        Ok(n)
    }

    async fn queue_len(&self, queue: &str) -> Result<u64, BrokerError> {
        let name = short(queue)?;
        let passive = QueueDeclareOptions { passive: true, ..Default::default() };
        let declare = |ch: Channel| async move { ch.queue_declare(name, passive, FieldTable::default()).await };
        let q = self.inner.probes.run(&self.inner.nodes, "amqp: queue length", declare).await?;
        Ok(q.map_or(0, |q| u64::from(q.message_count())))
    }

    /// RabbitMQ cannot read a queue without taking from it: `basic.get` and a requeue (or closing
    /// the channel) marks each message redelivered, moves it, and on a quorum queue counts a
    /// delivery toward `x-delivery-limit`, so looking would dead-letter what it looked at. Refused,
    /// so a dashboard shows the depth ([`Broker::queue_len`]) only; RabbitMQ's management UI
    /// ("Get messages", which is also destructive) or a consumer of the dead-letter queue shows more.
    async fn peek(
        &self,
        queue: &str,
        max: usize,
    ) -> Result<Vec<Result<Message, celery_core::ProtocolError>>, BrokerError> {
        let _ = max;
        Err(BrokerError::Unsupported {
            broker: "amqp",
            option: format!("peek (RabbitMQ cannot read `{queue}` without taking from it and counting a delivery)"),
        })
    }

    celery_core::offers!(routing, broadcasts, leases, documents);
}
#[async_trait]
impl Routing for AmqpBroker {
    async fn declare_exchange(&self, name: &str, kind: ExchangeKind) -> Result<(), BrokerError> {
        self.exchange_declare(&Exchange::new(name, kind)).await
    }

    async fn bind(&self, b: &Binding) -> Result<(), BrokerError> {
        let ch = self.channel().await?;
        self.declare_task_queue(&ch, &b.queue).await?;
        let mut args = fields::to_table(&b.headers);
        if !b.headers.is_empty() {
            args.insert("x-match".into(), AMQPValue::LongString(if b.match_all { "all" } else { "any" }.into()));
        }
        ch.queue_bind(short(&b.queue)?, short(&b.exchange)?, short(&b.routing_key)?, QueueBindOptions::default(), args)
            .await
            .map_err(failed("amqp: bind a queue"))
    }
}

#[async_trait]
impl Broadcasts for AmqpBroker {
    async fn broadcast(&self, exchange: &Exchange, routing_key: &str, msg: &Message) -> Result<(), BrokerError> {
        self.amqp_broadcast(exchange, routing_key, msg).await
    }

    async fn subscribe(
        &self,
        exchange: &Exchange,
        pattern: &str,
    ) -> Result<Box<dyn celery_core::broker::Subscription>, BrokerError> {
        self.amqp_subscribe(exchange, pattern).await
    }
}

#[async_trait]
impl Leases for AmqpBroker {
    /// A single-active-consumer queue's token (see the `lease` module); `ttl` is not needed, as
    /// RabbitMQ hands the token on as soon as the holder's channel dies.
    async fn lease(&self, name: &str, holder: &str, _ttl: std::time::Duration) -> Result<bool, BrokerError> {
        self.amqp_lease(name, holder).await
    }

    async fn release(&self, name: &str, holder: &str) -> Result<(), BrokerError> {
        self.amqp_release(name, holder).await
    }
}

#[async_trait]
impl Documents for AmqpBroker {
    async fn load_doc(&self, key: &str) -> Result<Option<Vec<u8>>, BrokerError> {
        self.amqp_load_doc(key).await
    }

    async fn store_doc(&self, key: &str, doc: &[u8]) -> Result<(), BrokerError> {
        self.amqp_store_doc(key, doc).await
    }
}

celery_core::register_broker!("amqp", "amqps" => AmqpBroker::connect);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_resent_message_keeps_its_headers_and_is_marked() {
        let msg = Message::from_signature(&celery_core::Signature::by_name("add")).unwrap();
        let props = resent(properties(&msg));
        let headers = props.headers().as_ref().expect("headers");
        assert_eq!(headers.inner().get(RESENT), Some(&AMQPValue::Boolean(true)));
        assert!(headers.contains_key("task") && headers.contains_key("id"), "{headers:?}");
        assert_eq!(props.delivery_mode(), &Some(2));
        assert!(!properties(&msg).headers().as_ref().is_some_and(|h| h.contains_key(RESENT)), "only resends");
    }

    #[test]
    fn quorum_dead_lettering_is_at_least_once() {
        let mut args = FieldTable::default();
        quorum_dead_lettering(&mut args, "celery");
        let get = |k: &str| args.inner().get(k).cloned();
        assert_eq!(get("x-queue-type"), Some(AMQPValue::LongString("quorum".into())));
        assert_eq!(get("x-dead-letter-strategy"), Some(AMQPValue::LongString("at-least-once".into())));
        assert_eq!(get("x-overflow"), Some(AMQPValue::LongString("reject-publish".into())));
        assert_eq!(get("x-dead-letter-routing-key"), Some(AMQPValue::LongString("celery".into())));
    }

    #[test]
    fn delay_levels_are_powers_of_two_up_to_the_largest() {
        let levels: Vec<u64> = delay_levels().collect();
        assert_eq!(levels.len(), 21);
        assert_eq!((levels[0], levels[1], levels[20]), (1, 2, MAX_DELAY_SECS));
        assert_eq!(delay_queue_name("celery", 4), "celery.delay.4s");
    }

    #[test]
    fn a_delay_level_never_overshoots_the_due_time() {
        for (remaining, level) in [(0, 1), (1, 1), (2, 2), (3, 2), (5, 4), (1023, 512), (1 << 20, 1 << 20)] {
            assert_eq!(delay_level(remaining), level, "{remaining} s");
        }
        assert_eq!(delay_level(u64::MAX), MAX_DELAY_SECS, "a far eta hops again");
        assert!(delay_levels().any(|l| l == delay_level(12_345)), "every level used is purged");
    }
}

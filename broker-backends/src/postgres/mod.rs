//! `postgres://USER@HOST[:PORT]/DB` (and `postgresql://`): a broker in PostgreSQL tables, for
//! teams that run PostgreSQL and nothing else.
//!
//! - Publish: one row per message and queue in `celery_rs_tasks` (a batch is one statement over
//!   arrays), with a `NOTIFY` per queue in the same statement. An eta or countdown message gets
//!   `run_at` = its eta: no Python worker reads these tables, so it waits in the broker, not on a
//!   worker.
//! - Consume: `FOR UPDATE SKIP LOCKED` takes up to the free prefetch slots (at most 500), an
//!   equal share from each of the consumer's queues (one each when there are more queues than
//!   slots; the queues taking turns from fetch to fetch, what one leaves going to the others), in
//!   one statement over up to 1,000 queues, by priority then age, and leases them for the
//!   visibility timeout (`visibility_timeout`, default 3600 s), which the consumer renews
//!   while the deliveries are unsettled; every consumer returns expired leases to their queues.
//!   A dead worker's tasks come back sooner: each leased row names its worker, whose row in
//!   `celery_rs_workers` is renewed every `worker_heartbeat` (2 s); once it is `worker_grace`
//!   (10 s) old, the next sweep returns its tasks ([`holder`]). An idle consumer sleeps until a `NOTIFY` for one of its
//!   queues or the next eta, never polling while its `LISTEN` connection is up (once a second
//!   while it reconnects). A consumer with a size cap ([`Broker::consume_capped`]) has the fetch
//!   move a larger message to `<queue>.dead` itself: its payload never leaves the server.
//! - Settle: acks are deleted in batches; requeue, defer (a new `run_at`) and dead-letter (to
//!   `<queue>.dead`, with the reason in a column and in the message's headers) are one statement
//!   each, fenced by the delivery count so that a lease lost to another consumer is never settled.
//! - Routing: direct, topic and fanout exchanges through `celery_rs_bindings`, matched by
//!   celery-core's matcher; the default exchange routes by queue name.
//! - Broadcasts (events, remote control): rows of `celery_rs_broadcasts`, announced by a `NOTIFY`
//!   of `<id>:<nonce>` that a subscription checks against the row ([`broadcast`]).
//! - Names: queues up to [`MAX_QUEUE`] bytes (so that `<queue>.dead` fits in [`MAX_NAME`]);
//!   exchanges, routing keys, leases and documents up to [`MAX_NAME`]; no NUL.
//! - Errors: driver errors are judged once, in [`error`], for the broker and the result backend.
//! - Leases (beat's leader) and documents (beat's state) are rows.
//! - Flow control ([`limits`]): cluster-wide rate limits (a row per bucket) and per-key
//!   concurrency (a row per held slot with its lease; a message over its key's limit parked in a
//!   table, moved back to its queue with a `NOTIFY` when a slot frees).
//! - Fair queues ([`celery_core::flow::FairQueues`]): a task with a fairness key is a row with
//!   that key (and its priority plus 1,000, so it sorts after the queue's unkeyed rows); its
//!   queue gets a rotation (a row with the front key's credit, and a ring of its keys with
//!   messages) that each fair fetch (one function call per queue, with the consumer's weights)
//!   locks, serves key after key by weight and turns; a queue without keyed rows is fetched as
//!   before. Layout and locking in [`sql`], the fetch in `consumer.rs`.
//! - Transactional enqueue ([`transactional`]): a task written by the caller's own transaction,
//!   into `celery_rs_tasks`, or into the [`outbox`] that a relay forwards to any other broker.
//! - Tables are created and upgraded at connect by versioned migrations under an advisory lock
//!   ([`migrate`]); their layout and autovacuum settings are in [`sql`].
//!
//! Options: those of [`url`] (libpq's, TLS, `pool_size`), `visibility_timeout`, `worker_heartbeat`
//! and `worker_grace`.
//!
//! ```no_run
//! # async fn demo() -> Result<(), celery_core::BrokerError> {
//! use celery_core::Broker;
//! let broker = broker_backends::postgres::PostgresBroker::connect(
//!     "postgres://postgres@127.0.0.1:5432/test?visibility_timeout=300",
//! )
//! .await?;
//! println!("{} tasks waiting", broker.queue_len("celery").await?);
//! # Ok(()) }
//! ```

pub mod broadcast;
pub mod connect;
mod consumer;
pub mod error;
pub mod history;
mod holder;
pub mod limits;
mod listen;
pub mod migrate;
pub mod outbox;
pub mod sql;
pub mod transactional;
pub mod url;

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use celery_core::broker::Subscription;
use celery_core::capability::{Broadcasts, Documents, Leases, Routing};
use celery_core::flow::{validate_key, FairQueues, FairnessWeights, FAIRNESS_KEY};
use celery_core::protocol::Message;
use celery_core::routing::{topic_matches, Binding, Exchange, ExchangeKind, Route};
use celery_core::sync::lock;
use celery_core::{Broker, BrokerError, Consumer, ProtocolError};
use chrono::{DateTime, Utc};
use deadpool_postgres::Pool;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::Row;

use self::broadcast::{Filter, PgSubscription};
use self::connect::Tls;
use self::error::PgError;
use self::listen::Listener;
use self::url::BrokerOptions;
use crate::envelope;

pub use broadcast::MAX_BROADCAST;
pub use consumer::PostgresConsumer;
/// The driver whose transactions [`transactional::SendInTransaction`] takes.
pub use tokio_postgres;

/// The longest exchange, routing key, lease or document name accepted, in bytes; also the
/// longest queue name read (a dead-letter queue's).
pub const MAX_NAME: usize = 255;
/// The longest queue name published to, bound or consumed: `<queue>.dead` must fit in
/// [`MAX_NAME`].
pub const MAX_QUEUE: usize = MAX_NAME - ".dead".len();
/// The most of one message [`Broker::peek`] reads; a larger one is listed as too large, unread.
pub const PEEK_MESSAGE_BYTES: usize = 1 << 20;
/// The most [`Broker::peek`] reads in all; the list ends before it.
pub const PEEK_TOTAL_BYTES: usize = 8 << 20;
/// The largest message stored, in bytes (PostgreSQL's `bytea` holds at most 1 GiB).
pub const MAX_PAYLOAD: usize = 256 * 1024 * 1024;
/// The largest stored document, in bytes.
pub const MAX_DOC: usize = 16 * 1024 * 1024;
/// Messages one [`Broker::peek`] returns at most.
const PEEK_MAX: usize = 1000;
/// Messages one publish statement inserts at most.
const PUBLISH_BATCH: usize = 1000;
/// A row to insert.
#[derive(Debug)]
pub(crate) struct NewRow {
    pub(crate) queue: String,
    pub(crate) priority: i16,
    pub(crate) eta: Option<DateTime<Utc>>,
    pub(crate) payload: Vec<u8>,
    /// Its fairness key (`x-fairness-key`), when it has one.
    pub(crate) fair_key: Option<String>,
}

impl NewRow {
    /// The row of `msg` in `queue`: its envelope checked against `limit` bytes.
    pub(crate) fn of(msg: &Message, exchange: &str, queue: String, limit: usize) -> Result<NewRow, BrokerError> {
        let env = envelope::encode(msg, exchange, &queue);
        if env.len() > limit {
            return Err(ProtocolError::TooLarge { size: env.len(), limit }.into());
        }
        Ok(NewRow {
            priority: i16::from(envelope::kombu_priority(msg)),
            eta: msg.headers.eta,
            payload: env.into_bytes(),
            fair_key: fair_key_of(msg),
            queue,
        })
    }
}

/// The fairness key of `msg` (`x-fairness-key`), when it has a valid one ([`validate_key`]): a
/// message with any other value there (not a string, empty, too long, a control character) is
/// stored unkeyed, with a warning, rather than fail its whole publish batch (an outbox relay's
/// batch too).
fn fair_key_of(msg: &Message) -> Option<String> {
    let value = msg.headers.extra.get(FAIRNESS_KEY)?;
    let checked = match value.as_str() {
        Some(key) => validate_key(key).map(|()| key).map_err(|e| e.to_string()),
        None => Err("not a string".to_owned()),
    };
    match checked {
        Ok(key) => Some(key.to_owned()),
        Err(reason) => {
            tracing::warn!(task_id = %msg.headers.id, %reason, "postgresql: invalid fairness key ignored (stored unkeyed)");
            None
        }
    }
}

/// The columns of up to [`PUBLISH_BATCH`] rows, as one publish statement takes them.
pub(crate) struct Columns<'a> {
    queues: Vec<&'a str>,
    priorities: Vec<i16>,
    etas: Vec<Option<DateTime<Utc>>>,
    payloads: Vec<&'a [u8]>,
    /// `None` when no row has a fairness key ([`sql::PUBLISH`], as before fair queues).
    keys: Option<Vec<Option<&'a str>>>,
}

impl<'a> Columns<'a> {
    pub(crate) fn new(rows: &'a [NewRow]) -> Columns<'a> {
        let keyed = rows.iter().any(|r| r.fair_key.is_some());
        Columns {
            queues: rows.iter().map(|r| r.queue.as_str()).collect(),
            priorities: rows.iter().map(|r| r.priority).collect(),
            etas: rows.iter().map(|r| r.eta).collect(),
            payloads: rows.iter().map(|r| r.payload.as_slice()).collect(),
            keys: keyed.then(|| rows.iter().map(|r| r.fair_key.as_deref()).collect()),
        }
    }

    /// The statement and its parameters (with their types), `channel` notified; `joined`: the
    /// keys joined their rotations already, under locks the transaction holds
    /// ([`sql::FAIR_PUBLISH_JOINED`]).
    pub(crate) fn statement(
        &'a self,
        channel: &'a String,
        joined: bool,
    ) -> (&'static str, Vec<(&'a (dyn ToSql + Sync), Type)>) {
        let mut params: Vec<(&(dyn ToSql + Sync), Type)> = vec![
            (&self.queues, Type::TEXT_ARRAY),
            (&self.priorities, Type::INT2_ARRAY),
            (&self.etas, Type::TIMESTAMPTZ_ARRAY),
            (&self.payloads, Type::BYTEA_ARRAY),
        ];
        let sql = match &self.keys {
            Some(keys) => {
                params.push((keys, Type::TEXT_ARRAY));
                if joined {
                    sql::FAIR_PUBLISH_JOINED
                } else {
                    sql::FAIR_PUBLISH
                }
            }
            None => sql::PUBLISH,
        };
        params.push((channel, Type::TEXT));
        (sql, params)
    }
}

/// Checks a name that input controls: at most `max` bytes, no NUL (PostgreSQL's text refuses it).
fn check_bounded(what: &str, name: &str, max: usize, why: &str) -> Result<(), BrokerError> {
    if name.len() > max {
        return Err(BrokerError::operation(format!(
            "postgresql: {what} of {} bytes is longer than {max}{why}",
            name.len()
        )));
    }
    if name.contains('\0') {
        return Err(BrokerError::operation(format!("postgresql: {what} `{}` holds a NUL", name.escape_debug())));
    }
    Ok(())
}

/// Checks an exchange, routing key, lease or document name (or a queue name only read: a
/// dead-letter queue's is as long as [`MAX_NAME`]).
pub(crate) fn check_name(what: &str, name: &str) -> Result<(), BrokerError> {
    check_bounded(what, name, MAX_NAME, "")
}

/// Checks a queue name published to, bound or consumed: it leaves room for `.dead`.
pub(crate) fn check_queue(name: &str) -> Result<(), BrokerError> {
    check_bounded("queue name", name, MAX_QUEUE, " (255 less room for `.dead`)")
}

/// Statements on the pool, prepared once per pooled connection.
#[derive(Debug, Clone)]
pub(crate) struct Db {
    pool: Pool,
}

impl Db {
    /// Runs `sql` (doing `what`, for errors) on a pooled connection.
    pub(crate) async fn query(
        &self,
        what: &'static str,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, BrokerError> {
        let client = self.pool.get().await.map_err(|e| PgError::pool(what, e))?;
        let statement = client.prepare_cached(sql).await.map_err(PgError::at(what))?;
        Ok(client.query(&statement, params).await.map_err(PgError::at(what))?)
    }
}

#[derive(Debug)]
struct Inner {
    db: Db,
    options: BrokerOptions,
    tls: Tls,
    /// `NOTIFY` channels of the schema: tasks, broadcasts.
    channels: (String, String),
    listener: tokio::sync::OnceCell<Listener>,
    /// When expired broadcasts were last pruned (Unix seconds).
    pruned: AtomicI64,
    /// The worker's name ([`Broker::set_worker_name`]), the holder of what it consumes.
    worker: std::sync::OnceLock<String>,
    /// Registered at the first consume; shared by every consumer of this broker.
    holder: tokio::sync::OnceCell<Arc<holder::Holder>>,
    /// The monitor's task history (`postgres/history.rs`), its table created on first use.
    history: history::PgHistory,
    /// The weights of fairness keys its consumers take with ([`FairQueues`]).
    fairness: std::sync::Mutex<Arc<FairnessWeights>>,
}

/// The PostgreSQL broker. Clones share the pool and the listener.
#[derive(Debug, Clone)]
pub struct PostgresBroker {
    inner: Arc<Inner>,
}

impl PostgresBroker {
    /// Connects and applies the broker's migrations (the first connection must succeed; later
    /// losses are retried).
    pub async fn connect(url: &str) -> Result<PostgresBroker, BrokerError> {
        let options = url::broker_options(url)?;
        let tls = Tls::new(options.connect.tls.as_ref(), &options.connect.shown)?;
        let pool = connect::pool(&options.connect, &tls)?;
        let mut client = pool.get().await.map_err(|e| PgError::pool("connect", e))?;
        let version = migrate::migrate(&mut client, sql::COMPONENT, sql::MIGRATIONS).await?;
        let row = client.query_one(sql::CHANNELS, &[]).await.map_err(PgError::at("connect"))?;
        let channels = (row.get(0), row.get(1));
        drop(client);
        tracing::debug!(url = %options.connect.shown, version, "postgresql broker: connected");
        Ok(PostgresBroker {
            inner: Arc::new(Inner {
                history: history::PgHistory::new(pool.clone()),
                db: Db { pool },
                options,
                tls,
                channels,
                listener: tokio::sync::OnceCell::new(),
                pruned: AtomicI64::new(0),
                worker: std::sync::OnceLock::new(),
                holder: tokio::sync::OnceCell::new(),
                fairness: std::sync::Mutex::default(),
            }),
        })
    }

    /// The options in force.
    pub fn options(&self) -> &BrokerOptions {
        &self.inner.options
    }

    /// The listener, started on first use (a process that only publishes opens none).
    fn listener(&self) -> &Listener {
        let inner = &self.inner;
        if let Some(l) = inner.listener.get() {
            return l;
        }
        let l = Listener::start(
            inner.options.connect.clone(),
            inner.tls.clone(),
            inner.channels.0.clone(),
            inner.channels.1.clone(),
        );
        // A concurrent first use may have won: its listener is kept, ours dropped (aborted).
        let _ = inner.listener.set(l);
        inner.listener.get().expect("the listener was just set")
    }

    /// The queues `route` leads to: the routing key on the default exchange, else the bindings.
    async fn resolve(&self, route: &Route) -> Result<Vec<String>, BrokerError> {
        if route.exchange.is_empty() {
            // The default exchange: the routing key is the queue.
            check_queue(&route.routing_key)?;
            return Ok(vec![route.routing_key.clone()]);
        }
        check_name("routing key", &route.routing_key)?;
        check_name("exchange", &route.exchange)?;
        let rows = self.inner.db.query("resolve a route", sql::BINDINGS, &[&route.exchange]).await?;
        let mut queues = Vec::new();
        for row in rows {
            let (key, queue, kind): (String, String, Option<String>) = (row.get(0), row.get(1), row.get(2));
            let matches = match kind.as_deref() {
                Some("fanout") => true,
                Some("direct") => key == route.routing_key,
                _ => key == route.routing_key || topic_matches(&key, &route.routing_key),
            };
            if matches && !queues.contains(&queue) {
                queues.push(queue);
            }
        }
        if queues.is_empty() {
            let what =
                format!("no queue is bound to exchange `{}` for routing key `{}`", route.exchange, route.routing_key);
            if route.mandatory {
                return Err(BrokerError::operation(format!("unroutable (mandatory) publish: {what}")));
            }
            tracing::warn!("postgresql: unroutable publish dropped: {what}");
        }
        Ok(queues)
    }

    /// Inserts rows, at most [`PUBLISH_BATCH`] per statement.
    async fn insert(&self, rows: Vec<NewRow>) -> Result<(), BrokerError> {
        for chunk in rows.chunks(PUBLISH_BATCH) {
            let columns = Columns::new(chunk);
            let (statement, params) = columns.statement(&self.inner.channels.0, false);
            let params: Vec<&(dyn ToSql + Sync)> = params.into_iter().map(|(p, _)| p).collect();
            self.inner.db.query("publish", statement, &params).await?;
        }
        Ok(())
    }

    /// The rows `(route, msg)` becomes.
    async fn rows_of(&self, route: &Route, msg: &Message, out: &mut Vec<NewRow>) -> Result<(), BrokerError> {
        for queue in self.resolve(route).await? {
            out.push(NewRow::of(msg, &route.exchange, queue, MAX_PAYLOAD)?);
        }
        Ok(())
    }

    /// Deletes broadcasts older than a minute, in the background, at most every ten seconds per
    /// process: batches of [`sql::BROADCAST_PRUNE_BATCH`] until none is left (at most a hundred
    /// batches a round, so a flood is caught up over a few rounds).
    fn prune_broadcasts(&self) {
        let now = Utc::now().timestamp();
        let last = self.inner.pruned.load(Ordering::Relaxed);
        if now - last < 10
            || self.inner.pruned.compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed).is_err()
        {
            return;
        }
        let db = self.inner.db.clone();
        tokio::spawn(async move {
            for _ in 0..100 {
                match db
                    .query(
                        "prune broadcasts",
                        sql::BROADCAST_PRUNE,
                        &[&broadcast::KEEP_SECS, &sql::BROADCAST_PRUNE_BATCH],
                    )
                    .await
                {
                    Ok(rows) if rows.first().map_or(0, |r| r.get::<_, i64>(0)) >= sql::BROADCAST_PRUNE_BATCH => {}
                    Ok(_) => return,
                    Err(e) => {
                        tracing::warn!(error = %e, "postgresql: pruning expired broadcasts failed; will retry");
                        return;
                    }
                }
            }
        });
    }

    async fn consumer(
        &self,
        queues: &[String],
        prefetch: usize,
        max_message_size: usize,
    ) -> Result<Box<dyn Consumer>, BrokerError> {
        for q in queues {
            check_queue(q)?;
        }
        let holder = self
            .inner
            .holder
            .get_or_try_init(|| {
                holder::Holder::start(
                    holder::PgBeat::new(self.inner.db.clone(), self.inner.channels.0.clone()),
                    self.inner.worker.get().map(String::as_str),
                    self.inner.options.worker_heartbeat,
                    self.inner.options.worker_grace,
                )
            })
            .await?
            .clone();
        let listener = self.listener();
        let c = PostgresConsumer::start(
            self.inner.db.clone(),
            holder,
            self.inner.channels.0.clone(),
            listener.subscribe(),
            listener.connected(),
            self.inner.options.visibility_timeout,
            queues,
            prefetch,
            max_message_size,
            lock(&self.inner.fairness).clone(),
        );
        Ok(Box::new(c))
    }
}

#[async_trait]
impl Broker for PostgresBroker {
    fn kind(&self) -> &'static str {
        "postgres"
    }

    async fn publish(&self, route: &Route, msg: &Message) -> Result<(), BrokerError> {
        let mut rows = Vec::with_capacity(1);
        self.rows_of(route, msg, &mut rows).await?;
        if rows.is_empty() {
            return Ok(());
        }
        self.insert(rows).await
    }

    async fn publish_batch(&self, batch: &[(Route, Message)]) -> Result<(), BrokerError> {
        let mut rows = Vec::with_capacity(batch.len());
        for (route, msg) in batch {
            self.rows_of(route, msg, &mut rows).await?;
        }
        self.insert(rows).await
    }

    async fn consume(&self, queues: &[String], prefetch: usize) -> Result<Box<dyn Consumer>, BrokerError> {
        self.consumer(queues, prefetch, usize::MAX).await
    }

    /// A message larger than `max_message_size` is moved to `<queue>.dead` by the fetch itself,
    /// with the reason: its payload never leaves the server. The consumer hands out a delivery
    /// that says so (its size, and the task id the server read from the headers).
    async fn consume_capped(
        &self,
        queues: &[String],
        prefetch: usize,
        max_message_size: usize,
    ) -> Result<Box<dyn Consumer>, BrokerError> {
        self.consumer(queues, prefetch, max_message_size).await
    }

    /// Deletes every row of the queue that is not leased: ready ones and those waiting for their
    /// eta (published with one, or deferred), keyed or not; then the keys of its fair rotation
    /// left without messages (the rotation itself when no keyed message is left).
    async fn purge(&self, queue: &str) -> Result<u64, BrokerError> {
        check_name("queue", queue)?;
        let rows = self.inner.db.query("purge", sql::PURGE, &[&queue]).await?;
        self.inner.db.query("purge a fair rotation", sql::FAIR_FORGET, &[&queue]).await?;
        Ok(rows.first().map_or(0, |r| r.get::<_, i64>(0)).max(0) as u64)
    }

    async fn queue_len(&self, queue: &str) -> Result<u64, BrokerError> {
        check_name("queue", queue)?;
        let rows = self.inner.db.query("queue length", sql::QUEUE_LEN, &[&queue]).await?;
        Ok(rows.first().map_or(0, |r| r.get::<_, i64>(0)).max(0) as u64)
    }

    /// Depth and dead letters as [`queue_len`](Broker::queue_len) counts them, the leased rows as
    /// in flight, and the age of the oldest ready row since it became due, in one statement.
    async fn queue_stats(&self, queue: &str) -> Result<celery_core::QueueStats, BrokerError> {
        check_name("queue", queue)?;
        let dead = celery_core::broker::dead_letter_queue(queue);
        let rows = self.inner.db.query("queue stats", sql::QUEUE_STATS, &[&queue, &dead]).await?;
        let count = |i: usize| rows.first().map_or(0, |r| r.get::<_, i64>(i)).max(0) as u64;
        let age = rows.first().and_then(|r| r.get::<_, Option<f64>>(3));
        Ok(celery_core::QueueStats {
            depth: count(0),
            dead_letters: count(1),
            in_flight: Some(count(2)),
            oldest_age: age.map(|s| celery_core::clock::secs_f64(s.max(0.0))),
        })
    }

    /// At most [`PEEK_MESSAGE_BYTES`] of one message (a larger one is listed as
    /// [`ProtocolError::TooLarge`], unread) and [`PEEK_TOTAL_BYTES`] in all (the list ends
    /// before).
    async fn peek(&self, queue: &str, max: usize) -> Result<Vec<Result<Message, ProtocolError>>, BrokerError> {
        check_name("queue", queue)?;
        let max = max.min(PEEK_MAX) as i64;
        if max == 0 {
            return Ok(Vec::new());
        }
        let (one, all) = (PEEK_MESSAGE_BYTES as i64, PEEK_TOTAL_BYTES as i64);
        let rows = self.inner.db.query("peek", sql::PEEK, &[&queue, &max, &one, &all]).await?;
        Ok(rows
            .iter()
            .map(|r| match r.get::<_, Option<&[u8]>>(1) {
                Some(payload) => envelope::decode(payload).message,
                None => Err(ProtocolError::TooLarge {
                    size: usize::try_from(r.get::<_, i64>(0)).unwrap_or(usize::MAX),
                    limit: PEEK_MESSAGE_BYTES,
                }),
            })
            .collect())
    }

    /// The holder name of this broker's consumers: a restart under the same name returns what the
    /// earlier run held at once (`holder.rs`). Only the first name given counts.
    fn set_worker_name(&self, name: &str) {
        let _ = self.inner.worker.set(name.to_owned());
    }

    celery_core::offers!(routing, broadcasts, leases, documents, key_slots, rate_buckets, fair_queues);

    fn history(&self) -> Option<&dyn celery_core::history::History> {
        Some(&self.inner.history)
    }
}
#[async_trait]
impl Routing for PostgresBroker {
    /// Direct, topic and fanout exchanges; headers exchanges are not offered.
    async fn declare_exchange(&self, name: &str, kind: ExchangeKind) -> Result<(), BrokerError> {
        check_name("exchange", name)?;
        let kind = match kind {
            ExchangeKind::Direct => "direct",
            ExchangeKind::Topic => "topic",
            ExchangeKind::Fanout => "fanout",
            other => {
                return Err(BrokerError::Unsupported {
                    broker: "postgres",
                    option: format!("{other:?} exchanges (`{name}`)"),
                })
            }
        };
        self.inner.db.query("declare an exchange", sql::DECLARE_EXCHANGE, &[&name, &kind]).await.map(drop)
    }

    async fn bind(&self, binding: &Binding) -> Result<(), BrokerError> {
        if !binding.headers.is_empty() {
            return Err(BrokerError::Unsupported { broker: "postgres", option: "headers bindings".into() });
        }
        check_name("exchange", &binding.exchange)?;
        check_name("routing key", &binding.routing_key)?;
        check_queue(&binding.queue)?;
        self.inner
            .db
            .query("bind", sql::BIND, &[&binding.exchange, &binding.routing_key, &binding.queue])
            .await
            .map(drop)
    }
}

#[async_trait]
impl Broadcasts for PostgresBroker {
    /// A row of `celery_rs_broadcasts` (body up to [`MAX_BROADCAST`], kept a minute) and a
    /// `NOTIFY` of its id and nonce, to every subscriber connected now ([`broadcast`]).
    async fn broadcast(&self, exchange: &Exchange, routing_key: &str, msg: &Message) -> Result<(), BrokerError> {
        check_name("exchange", &exchange.name)?;
        check_name("routing key", routing_key)?;
        if msg.body.len() > MAX_BROADCAST {
            return Err(ProtocolError::TooLarge { size: msg.body.len(), limit: MAX_BROADCAST }.into());
        }
        let nonce: i64 = rand::random();
        let params: [&(dyn ToSql + Sync); 5] =
            [&nonce, &exchange.name, &routing_key, &msg.body, &self.inner.channels.1];
        self.inner.db.query("broadcast", sql::BROADCAST, &params).await?;
        self.prune_broadcasts();
        Ok(())
    }

    /// The broadcasts to `exchange` whose routing key matches `pattern` (fanout: all; direct:
    /// equal; topic: celery-core's matcher), from now on, while the subscription lives; a
    /// notification that names no such row, with its nonce, is never delivered.
    async fn subscribe(&self, exchange: &Exchange, pattern: &str) -> Result<Box<dyn Subscription>, BrokerError> {
        check_name("exchange", &exchange.name)?;
        check_name("routing key", pattern)?;
        let listener = self.listener();
        let notes = listener.subscribe();
        // Broadcasts sent once this returns reach the subscription: wait until the listening
        // connection is up (a first subscription starts it).
        let mut up = listener.connected();
        let wait = self.inner.options.connect.config.get_connect_timeout().copied().unwrap_or(Duration::from_secs(10))
            + Duration::from_secs(5);
        if !matches!(tokio::time::timeout(wait, up.wait_for(|c| *c)).await, Ok(Ok(_))) {
            return Err(BrokerError::connection(format!(
                "postgresql: the listening connection is not up after {wait:?}"
            )));
        }
        let rows = self.inner.db.query("subscribe", sql::BROADCAST_NEWEST, &[]).await?;
        let floor: i64 = rows.first().map_or(0, |r| r.get(0));
        let filter = Filter { exchange: exchange.name.clone(), kind: exchange.kind, pattern: pattern.to_owned() };
        Ok(Box::new(PgSubscription::start(self.inner.db.clone(), notes, filter, floor)))
    }
}

#[async_trait]
impl Leases for PostgresBroker {
    async fn lease(&self, name: &str, holder: &str, ttl: Duration) -> Result<bool, BrokerError> {
        check_name("lease", name)?;
        check_name("lease holder", holder)?;
        let secs = celery_core::clock::ttl(ttl).as_secs_f64().max(0.001);
        Ok(!self.inner.db.query("take a lease", sql::LEASE, &[&name, &holder, &secs]).await?.is_empty())
    }

    async fn release(&self, name: &str, holder: &str) -> Result<(), BrokerError> {
        check_name("lease", name)?;
        check_name("lease holder", holder)?;
        self.inner.db.query("release a lease", sql::RELEASE, &[&name, &holder]).await.map(drop)
    }
}

#[async_trait]
impl Documents for PostgresBroker {
    async fn load_doc(&self, key: &str) -> Result<Option<Vec<u8>>, BrokerError> {
        check_name("document key", key)?;
        Ok(self.inner.db.query("load a document", sql::LOAD_DOC, &[&key]).await?.first().map(|r| r.get(0)))
    }

    async fn store_doc(&self, key: &str, doc: &[u8]) -> Result<(), BrokerError> {
        check_name("document key", key)?;
        if doc.len() > MAX_DOC {
            return Err(BrokerError::operation(format!(
                "postgresql: a document of {} bytes is larger than {MAX_DOC}",
                doc.len()
            )));
        }
        self.inner.db.query("store a document", sql::STORE_DOC, &[&key, &doc]).await.map(drop)
    }
}

/// The weights travel with each fair fetch (`sql::FAIR_FETCH`), so each consumer serves by its own.
impl FairQueues for PostgresBroker {
    fn set_fairness_weights(&self, weights: FairnessWeights) {
        *lock(&self.inner.fairness) = Arc::new(weights);
    }
}

celery_core::register_broker!("postgres", "postgresql" => PostgresBroker::connect);

#[cfg(test)]
mod tests {
    use super::*;
    use celery_core::broker::dead_letter_queue;

    #[test]
    fn names_are_bounded() {
        assert!(check_queue("celery").is_ok());
        assert!(check_queue(&"q".repeat(MAX_QUEUE)).is_ok());
        let e = check_queue(&"q".repeat(MAX_QUEUE + 1)).unwrap_err().to_string();
        assert!(e.contains("queue name of 251 bytes is longer than 250 (255 less room for `.dead`)"), "{e}");
        assert!(check_name("queue", &dead_letter_queue(&"q".repeat(MAX_QUEUE))).is_ok(), "its dead letters are read");
        assert!(check_name("exchange", &"e".repeat(MAX_NAME + 1))
            .unwrap_err()
            .to_string()
            .contains("of 256 bytes is longer than 255"));
        assert!(check_queue("a\0b").is_err() && check_name("exchange", "a\0b").is_err());
    }
}

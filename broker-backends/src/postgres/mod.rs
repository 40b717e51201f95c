//! `postgres://USER@HOST[:PORT]/DB` (and `postgresql://`): a broker in PostgreSQL tables, for
//! teams that run PostgreSQL and nothing else.
//!
//! - Publish: one row per message and queue in `celery_rs_tasks` (a batch is one statement over
//!   arrays), with a `NOTIFY` per queue in the same statement. An eta or countdown message gets
//!   `run_at` = its eta: no Python worker reads these tables, so it waits in the broker, not on a
//!   worker.
//! - Consume: `FOR UPDATE SKIP LOCKED` takes up to the free prefetch slots (at most 500) of the
//!   first queue that has ready rows, in queue order, by priority then age, and leases them for
//!   the visibility timeout (`visibility_timeout`, default 3600 s), which the consumer renews
//!   while the deliveries are unsettled; every consumer returns expired leases to their queues
//!   (a dead worker's tasks come back). An idle consumer sleeps until a `NOTIFY` for one of its
//!   queues or the next eta, never polling while its `LISTEN` connection is up (once a second
//!   while it reconnects).
//! - Settle: acks are deleted in batches; requeue, defer (a new `run_at`) and dead-letter (to
//!   `<queue>.dead`, with the reason in a column and in the message's headers) are one statement
//!   each, fenced by the delivery count so that a lease lost to another consumer is never settled.
//! - Routing: direct, topic and fanout exchanges through `celery_rs_bindings`, matched by
//!   celery-core's matcher; the default exchange routes by queue name.
//! - Broadcasts (events, remote control): a `NOTIFY` carrying the exchange, the routing key and the
//!   body; a body too large for a notification (8000 bytes) is stored in `celery_rs_broadcasts`,
//!   announced by its id, and deleted after five minutes.
//! - Leases (beat's leader) and documents (beat's state) are rows.
//! - Transactional enqueue ([`transactional`]): a task written by the caller's own transaction,
//!   into `celery_rs_tasks`, or into the [`outbox`] that a relay forwards to any other broker.
//! - Tables are created and upgraded at connect by versioned migrations under an advisory lock
//!   ([`migrate`]); their layout and autovacuum settings are in [`sql`].
//!
//! Options: those of [`url`] (libpq's, TLS, `pool_size`), and `visibility_timeout`.
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

pub mod connect;
mod consumer;
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
use celery_core::broker::{Broadcast, ChannelSubscription, Subscription};
use celery_core::capability::{Broadcasts, Documents, Leases, Routing};
use celery_core::protocol::Message;
use celery_core::routing::{topic_matches, Binding, Exchange, ExchangeKind, Route};
use celery_core::{BackendError, Broker, BrokerError, Consumer, ProtocolError};
use chrono::{DateTime, Utc};
use deadpool_postgres::Pool;
use tokio_postgres::types::ToSql;
use tokio_postgres::Row;

use self::connect::Tls;
use self::listen::{Channel, Listener};
use self::url::BrokerOptions;
use crate::envelope;

pub use consumer::PostgresConsumer;
/// The driver whose transactions [`transactional::SendInTransaction`] takes.
pub use tokio_postgres;

/// The longest queue, exchange, routing key, lease or document name accepted, in bytes.
pub const MAX_NAME: usize = 255;
/// The largest message stored, in bytes (PostgreSQL's `bytea` holds at most 1 GiB).
pub const MAX_PAYLOAD: usize = 256 * 1024 * 1024;
/// The largest stored document, in bytes.
pub const MAX_DOC: usize = 16 * 1024 * 1024;
/// Messages one [`Broker::peek`] returns at most.
const PEEK_MAX: usize = 1000;
/// Messages one publish statement inserts at most.
const PUBLISH_BATCH: usize = 1000;
/// The largest `NOTIFY` payload PostgreSQL takes is 8000 bytes; broadcasts above this are stored.
const NOTIFY_MAX: usize = 7900;
/// Separates the fields of a broadcast notification.
const FIELD: char = '\u{1f}';

/// A row to insert: queue, priority, eta, payload.
type NewRow = (String, i16, Option<DateTime<Utc>>, Vec<u8>);

/// A result-backend-typed error of the shared connection code, as a broker error.
pub fn broker_error(e: BackendError) -> BrokerError {
    match e {
        BackendError::Connection { context, source } => BrokerError::Connection { context, source },
        BackendError::InvalidUrl { url, reason } => BrokerError::InvalidUrl { url, reason },
        BackendError::Operation { context, source } => BrokerError::Operation { context, source },
        other => BrokerError::operation_with("postgresql", other),
    }
}

/// A driver error as a broker error (retryable ones are `Connection`).
pub(crate) fn pg_error(e: tokio_postgres::Error) -> BrokerError {
    broker_error(connect::backend_error(e))
}

/// Checks a name that input controls: bounded, no NUL (PostgreSQL's text refuses it), no field
/// separator (broadcast notifications use it).
pub(crate) fn check_name(what: &str, name: &str) -> Result<(), BrokerError> {
    if name.len() > MAX_NAME {
        return Err(BrokerError::operation(format!(
            "postgresql: {what} of {} bytes is longer than {MAX_NAME}",
            name.len()
        )));
    }
    if name.contains(['\0', FIELD]) {
        return Err(BrokerError::operation(format!(
            "postgresql: {what} `{}` holds a control character",
            name.escape_debug()
        )));
    }
    Ok(())
}

/// Statements on the pool, prepared once per pooled connection.
#[derive(Debug, Clone)]
pub(crate) struct Db {
    pool: Pool,
}

impl Db {
    pub(crate) async fn query(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Vec<Row>, BrokerError> {
        let client = self.pool.get().await.map_err(|e| broker_error(connect::pool_error(e)))?;
        let statement = client.prepare_cached(sql).await.map_err(pg_error)?;
        client.query(&statement, params).await.map_err(pg_error)
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
    /// When stored broadcasts were last pruned (Unix seconds).
    pruned: AtomicI64,
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
        let options = url::broker_options(url).map_err(broker_error)?;
        let tls = Tls::new(options.connect.tls.as_ref(), &options.connect.shown).map_err(broker_error)?;
        let pool = connect::pool(&options.connect, &tls).map_err(broker_error)?;
        let mut client = pool.get().await.map_err(|e| broker_error(connect::pool_error(e)))?;
        let version = migrate::migrate(&mut client, sql::COMPONENT, sql::MIGRATIONS).await.map_err(broker_error)?;
        let row = client.query_one(sql::CHANNELS, &[]).await.map_err(pg_error)?;
        let channels = (row.get(0), row.get(1));
        drop(client);
        tracing::debug!(url = %options.connect.shown, version, "postgresql broker: connected");
        Ok(PostgresBroker {
            inner: Arc::new(Inner {
                db: Db { pool },
                options,
                tls,
                channels,
                listener: tokio::sync::OnceCell::new(),
                pruned: AtomicI64::new(0),
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
        check_name("routing key", &route.routing_key)?;
        if route.exchange.is_empty() {
            return Ok(vec![route.routing_key.clone()]);
        }
        check_name("exchange", &route.exchange)?;
        let rows = self.inner.db.query(sql::BINDINGS, &[&route.exchange]).await?;
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
            let queues: Vec<&str> = chunk.iter().map(|r| r.0.as_str()).collect();
            let priorities: Vec<i16> = chunk.iter().map(|r| r.1).collect();
            let etas: Vec<Option<DateTime<Utc>>> = chunk.iter().map(|r| r.2).collect();
            let payloads: Vec<&[u8]> = chunk.iter().map(|r| r.3.as_slice()).collect();
            self.inner
                .db
                .query(sql::PUBLISH, &[&queues, &priorities, &etas, &payloads, &self.inner.channels.0])
                .await?;
        }
        Ok(())
    }

    /// The rows `(route, msg)` becomes.
    async fn rows_of(&self, route: &Route, msg: &Message, out: &mut Vec<NewRow>) -> Result<(), BrokerError> {
        for queue in self.resolve(route).await? {
            let env = envelope::encode(msg, &route.exchange, &queue);
            if env.len() > MAX_PAYLOAD {
                return Err(ProtocolError::TooLarge { size: env.len(), limit: MAX_PAYLOAD }.into());
            }
            let priority = i16::from(envelope::kombu_priority(msg));
            out.push((queue, priority, msg.headers.eta, env.into_bytes()));
        }
        Ok(())
    }

    /// Deletes stored broadcasts older than five minutes, at most every ten seconds per process.
    async fn prune_broadcasts(&self) {
        let now = Utc::now().timestamp();
        let last = self.inner.pruned.load(Ordering::Relaxed);
        if now - last < 10
            || self.inner.pruned.compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed).is_err()
        {
            return;
        }
        if let Err(e) = self.inner.db.query(sql::BROADCAST_PRUNE, &[]).await {
            tracing::warn!(error = %e, "postgresql: pruning stored broadcasts failed; will retry");
        }
    }
}

/// A broadcast notification: `exchange FIELD routing_key FIELD ('i' body | 'r' stored id)`.
fn broadcast_note(exchange: &str, routing_key: &str, body: &[u8]) -> Option<String> {
    let body = std::str::from_utf8(body).ok().filter(|b| !b.contains('\0'))?;
    let note = format!("{exchange}{FIELD}{routing_key}{FIELD}i{body}");
    (note.len() <= NOTIFY_MAX).then_some(note)
}

/// What a broadcast notification says, without the body: `(exchange, routing key, inline body or
/// stored id)`.
fn parse_note(note: &str) -> Option<(&str, &str, Result<&str, i64>)> {
    let mut parts = note.splitn(3, FIELD);
    let (exchange, key, rest) = (parts.next()?, parts.next()?, parts.next()?);
    match rest.split_at_checked(1)? {
        ("i", body) => Some((exchange, key, Ok(body))),
        ("r", id) => Some((exchange, key, Err(id.parse().ok()?))),
        _ => None,
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
        for q in queues {
            check_name("queue", q)?;
        }
        let listener = self.listener();
        let c = PostgresConsumer::start(
            self.inner.db.clone(),
            self.inner.channels.0.clone(),
            listener.subscribe(),
            listener.connected(),
            self.inner.options.visibility_timeout,
            queues,
            prefetch,
        );
        Ok(Box::new(c))
    }

    /// Deletes every row of the queue that is not leased: ready ones and those waiting for their
    /// eta (published with one, or deferred).
    async fn purge(&self, queue: &str) -> Result<u64, BrokerError> {
        check_name("queue", queue)?;
        let rows = self.inner.db.query(sql::PURGE, &[&queue]).await?;
        Ok(rows.first().map_or(0, |r| r.get::<_, i64>(0)).max(0) as u64)
    }

    async fn queue_len(&self, queue: &str) -> Result<u64, BrokerError> {
        check_name("queue", queue)?;
        let rows = self.inner.db.query(sql::QUEUE_LEN, &[&queue]).await?;
        Ok(rows.first().map_or(0, |r| r.get::<_, i64>(0)).max(0) as u64)
    }

    async fn peek(&self, queue: &str, max: usize) -> Result<Vec<Result<Message, ProtocolError>>, BrokerError> {
        check_name("queue", queue)?;
        let max = max.min(PEEK_MAX) as i64;
        if max == 0 {
            return Ok(Vec::new());
        }
        let rows = self.inner.db.query(sql::PEEK, &[&queue, &max]).await?;
        Ok(rows.iter().map(|r| envelope::decode(r.get::<_, &[u8]>(0)).message).collect())
    }

    celery_core::offers!(routing, broadcasts, leases, documents);
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
        self.inner.db.query(sql::DECLARE_EXCHANGE, &[&name, &kind]).await.map(drop)
    }

    async fn bind(&self, binding: &Binding) -> Result<(), BrokerError> {
        if !binding.headers.is_empty() {
            return Err(BrokerError::Unsupported { broker: "postgres", option: "headers bindings".into() });
        }
        check_name("exchange", &binding.exchange)?;
        check_name("routing key", &binding.routing_key)?;
        check_name("queue", &binding.queue)?;
        self.inner.db.query(sql::BIND, &[&binding.exchange, &binding.routing_key, &binding.queue]).await.map(drop)
    }
}

#[async_trait]
impl Broadcasts for PostgresBroker {
    /// A `NOTIFY` to every subscriber connected now, with the body inline (or, above 7900 bytes,
    /// stored for five minutes and announced by id).
    async fn broadcast(&self, exchange: &Exchange, routing_key: &str, msg: &Message) -> Result<(), BrokerError> {
        check_name("exchange", &exchange.name)?;
        check_name("routing key", routing_key)?;
        let channel = &self.inner.channels.1;
        if let Some(note) = broadcast_note(&exchange.name, routing_key, &msg.body) {
            return self.inner.db.query(sql::NOTIFY, &[channel, &note]).await.map(drop);
        }
        if msg.body.len() > MAX_PAYLOAD {
            return Err(ProtocolError::TooLarge { size: msg.body.len(), limit: MAX_PAYLOAD }.into());
        }
        let head = format!("{}{FIELD}{routing_key}{FIELD}r", exchange.name);
        self.inner.db.query(sql::BROADCAST_STORED, &[&msg.body, channel, &head]).await?;
        self.prune_broadcasts().await;
        Ok(())
    }

    /// The broadcasts to `exchange` whose routing key matches `pattern` (fanout: all; direct:
    /// equal; topic: celery-core's matcher), from now on, while the subscription lives.
    async fn subscribe(&self, exchange: &Exchange, pattern: &str) -> Result<Box<dyn Subscription>, BrokerError> {
        check_name("exchange", &exchange.name)?;
        check_name("routing key", pattern)?;
        let listener = self.listener();
        let mut notes = listener.subscribe();
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
        let (tx, rx) = tokio::sync::mpsc::channel(1024);
        let (db, name, kind, pattern) =
            (self.inner.db.clone(), exchange.name.clone(), exchange.kind, pattern.to_owned());
        let feeder = tokio::spawn(async move {
            loop {
                let note = match notes.recv().await {
                    Ok(n) => n,
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        tracing::warn!(missed = n, exchange = %name, "postgresql: a subscription fell behind");
                        continue;
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                };
                if note.channel != Channel::Broadcasts {
                    continue;
                }
                let Some((ex, key, body)) = parse_note(&note.payload) else { continue };
                let wanted = ex == name
                    && match kind {
                        ExchangeKind::Fanout => true,
                        ExchangeKind::Topic => topic_matches(&pattern, key),
                        _ => key == pattern,
                    };
                if !wanted {
                    continue;
                }
                let body = match body {
                    Ok(inline) => inline.as_bytes().to_vec(),
                    Err(id) => match db.query(sql::BROADCAST_BODY, &[&id]).await {
                        Ok(rows) => match rows.first() {
                            Some(r) => r.get::<_, Vec<u8>>(0),
                            None => continue,
                        },
                        Err(e) => {
                            tracing::warn!(error = %e, "postgresql: reading a stored broadcast failed");
                            continue;
                        }
                    },
                };
                if tx.send(Broadcast { routing_key: key.to_owned(), body }).await.is_err() {
                    return;
                }
            }
        });
        Ok(Box::new(ChannelSubscription::new(rx, Some(feeder))))
    }
}

#[async_trait]
impl Leases for PostgresBroker {
    async fn lease(&self, name: &str, holder: &str, ttl: Duration) -> Result<bool, BrokerError> {
        check_name("lease", name)?;
        check_name("lease holder", holder)?;
        let secs = celery_core::clock::ttl(ttl).as_secs_f64().max(0.001);
        Ok(!self.inner.db.query(sql::LEASE, &[&name, &holder, &secs]).await?.is_empty())
    }

    async fn release(&self, name: &str, holder: &str) -> Result<(), BrokerError> {
        check_name("lease", name)?;
        check_name("lease holder", holder)?;
        self.inner.db.query(sql::RELEASE, &[&name, &holder]).await.map(drop)
    }
}

#[async_trait]
impl Documents for PostgresBroker {
    async fn load_doc(&self, key: &str) -> Result<Option<Vec<u8>>, BrokerError> {
        check_name("document key", key)?;
        Ok(self.inner.db.query(sql::LOAD_DOC, &[&key]).await?.first().map(|r| r.get(0)))
    }

    async fn store_doc(&self, key: &str, doc: &[u8]) -> Result<(), BrokerError> {
        check_name("document key", key)?;
        if doc.len() > MAX_DOC {
            return Err(BrokerError::operation(format!(
                "postgresql: a document of {} bytes is larger than {MAX_DOC}",
                doc.len()
            )));
        }
        self.inner.db.query(sql::STORE_DOC, &[&key, &doc]).await.map(drop)
    }
}

celery_core::register_broker!("postgres", "postgresql" => PostgresBroker::connect);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broadcast_notes_round_trip() {
        let note = broadcast_note("celeryev", "task.succeeded", br#"{"type":"task-succeeded"}"#).unwrap();
        assert_eq!(parse_note(&note), Some(("celeryev", "task.succeeded", Ok(r#"{"type":"task-succeeded"}"#))));
        assert!(broadcast_note("e", "k", &vec![b'x'; NOTIFY_MAX]).is_none(), "too large: stored");
        assert!(broadcast_note("e", "k", b"a\0b").is_none(), "NUL: stored");
        assert!(broadcast_note("e", "k", &[0xff, 0xfe]).is_none(), "not UTF-8: stored");
        assert_eq!(parse_note(&format!("e{FIELD}k{FIELD}r42")), Some(("e", "k", Err(42))));
        for bad in ["", "e", &format!("e{FIELD}k"), &format!("e{FIELD}k{FIELD}x1"), &format!("e{FIELD}k{FIELD}rx")] {
            assert_eq!(parse_note(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn names_are_bounded() {
        assert!(check_name("queue", "celery").is_ok());
        assert!(check_name("queue", &"q".repeat(MAX_NAME)).is_ok());
        assert!(check_name("queue", &"q".repeat(MAX_NAME + 1)).unwrap_err().to_string().contains("longer than 255"));
        assert!(check_name("queue", "a\0b").is_err());
        assert!(check_name("queue", &format!("a{FIELD}b")).is_err());
    }
}

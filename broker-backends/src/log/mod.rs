//! `log://PATH`: the built-in broker, a Kafka-style durable log in a local directory.
//!
//! Each queue is a topic of partitions; a partition is a directory of segment files of CRC32C-checked
//! records, appended with group commit. Task workers consume with per-record leases: a delivered
//! record is invisible to other consumers until acked, requeued, deferred or dead-lettered, or until
//! its lease expires (its consumer stopped renewing it), when it is delivered again; after
//! `max_deliveries` it goes to `<queue>.dead` with the reason. The finished prefix of each partition
//! is durable, so a restart does not redeliver finished work. Results live in the same directory
//! (`log://` as the result backend URL). The on-disk format is in `DESIGN.md` beside this file.
//!
//! ETA: a message published with an eta in the future is appended to its queue with that due time
//! (the record's not-before) and is delivered when due, without blocking the records behind it; it
//! survives restarts. Redis and RabbitMQ put such a message on the queue for any worker (a Python
//! one included) and our worker then defers it to the broker's delay store; this broker is ours
//! alone, and a record with a not-before is exactly what that deferral would append
//! ([`Delivery::defer`](celery_core::Delivery::defer) does), so the eta is kept at publish and the
//! hop through a worker is saved. `purge` finishes a queue's waiting records, those not yet due
//! included (leased ones stay).
//!
//! URL options: `fsync=always|os|<ms>`, `segment_bytes=`, `lease_timeout=` (s), `max_deliveries=`,
//! `partitions=` (for new queues), `max_record_bytes=` (default 16 MiB + 64 KiB), `max_queues=`
//! (default 10,000). A served directory (`broker serve`) is reached as
//! `log+tcp://HOST:PORT?token=...`, or over TLS as `log+tls://HOST:PORT?token=...&ca_certs=PATH`
//! (plus `certfile=`/`keyfile=` when the server asks for a client certificate).
//!
//! Layout (`DESIGN.md`, "Code map"): `storage/` is the engine (records, segments, partitions,
//! results, streams, the store) and knows nothing of sockets; `net/` (wire, server, remote, TLS)
//! serves a store and reaches one through its server; this module is the facade over both:
//! [`LogBroker`] (and [`Results`], [`StreamConsumer`]) is the store in this process or a
//! connection to the process that owns it; `url.rs` parses the URLs.
//!
//! ```
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! use celery_core::{Broker, protocol::Message, routing::Route, Signature};
//! let dir = std::env::temp_dir().join(format!("doc-{}", std::process::id()));
//! let broker = broker_backends::log::LogBroker::connect(&format!("log://{}", dir.display())).await.unwrap();
//! let msg = Message::from_signature(&Signature::by_name("add").args(serde_json::json!([1, 2]))).unwrap();
//! broker.publish(&Route::queue("celery"), &msg).await.unwrap();
//! let mut consumer = broker.consume(&["celery".to_string()], 4).await.unwrap();
//! let delivery = consumer.next().await.unwrap();
//! let mut delivery = delivery;
//! assert_eq!(delivery.message().as_ref().unwrap().headers.task, "add");
//! delivery.ack().await.unwrap();
//! # std::fs::remove_dir_all(dir).ok();
//! # });
//! ```

pub(crate) mod net;
mod results;
pub(crate) mod storage;
mod stream;
#[cfg(test)]
mod tests;
mod url;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use celery_core::backoff::Reconnect;
use celery_core::capability::{Broadcasts, Documents, Leases, Routing};
use celery_core::flow::{Admission, FairQueues, FairnessWeights, KeySlots, RateBuckets, SlotRequest};
use celery_core::history::{History, HistoryPage, HistoryQuery, Retain, TaskRecord};
use celery_core::protocol::Message;
use celery_core::routing::{Binding, Exchange, ExchangeKind, Route};
use celery_core::sync::lock;
use celery_core::url::redacted;
use celery_core::{Broker, BrokerError, Consumer};

use net::socket_path;
pub use net::{serve_tcp, serve_tcp_with, ServerLimits, ServerTls};
pub use results::Results;
pub use storage::{
    Commit, Compacted, Fsync, LogError, LogStore, NewRecord, Record, ResultStore, Retention, StartFrom, StoreConfig,
    StreamRecord, DEFAULT_MAX_RECORD,
};
pub use stream::StreamConsumer;
pub use url::parse_url;

use net::remote::{broadcast_subscription, RemoteConsumer, RemoteStore, RemoteStream, Takeover, Target};
use storage::consumer::LogConsumer;
use storage::payload;
use storage::results::{doc_key, DOC_TTL};

/// The built-in broker: the store in this process, or a connection to the process that owns it.
#[derive(Debug, Clone)]
pub struct LogBroker {
    inner: Inner,
    /// The weights of fairness keys its consumers take with (`FairQueues`).
    fairness: Arc<Mutex<Arc<FairnessWeights>>>,
}

#[derive(Debug, Clone)]
enum Inner {
    Local(Arc<LogStore>),
    Remote(Arc<RemoteStore>),
}

impl LogBroker {
    /// Opens `log://PATH` (owning the directory, or connecting to its owner's socket), or connects
    /// to `log+tcp://HOST:PORT?token=...` or `log+tls://HOST:PORT?token=...&ca_certs=...`.
    pub async fn connect(url: &str) -> Result<LogBroker, BrokerError> {
        let invalid = |e: LogError| BrokerError::InvalidUrl { url: redacted(url), reason: e.to_string() };
        if let Some((target, token)) = url::parse_remote(url).map_err(invalid)? {
            let client = Arc::new(RemoteStore::new(target, token, None));
            client.hello().await?;
            return Ok(LogBroker { inner: Inner::Remote(client), fairness: Arc::default() });
        }
        let (dir, cfg) = parse_url(url).map_err(invalid)?;
        match LogStore::open(&dir, cfg.clone()) {
            Ok(store) => {
                // The owner serves the directory's socket to the other processes (the network
                // layer does; the store knows nothing of sockets).
                store.serve_unix();
                Ok(LogBroker::local(store))
            }
            Err(LogError::Locked { path, pid }) => {
                tracing::debug!(path = %path.display(), pid, "log: directory owned by another process; connecting to it");
                let takeover = Takeover::new(dir.clone(), cfg);
                let client =
                    Arc::new(RemoteStore::new(Target::Unix(socket_path(&path)), String::new(), Some(takeover)));
                // The owner may have just taken the lock and not be listening yet: retry briefly.
                match Reconnect::default()
                    .retry(6, "log: the directory owner's socket", |_| true, || client.hello())
                    .await
                {
                    Ok(()) => Ok(LogBroker { inner: Inner::Remote(client), fairness: Arc::default() }),
                    Err(e) => {
                        let what =
                            format!("{} is owned by process {pid}, whose socket does not answer", path.display());
                        Err(BrokerError::connection_with(what, e))
                    }
                }
            }
            Err(e) => Err(e.into()),
        }
    }

    pub(crate) fn local(store: Arc<LogStore>) -> LogBroker {
        LogBroker { inner: Inner::Local(store), fairness: Arc::default() }
    }

    /// The store, when this process owns the directory.
    pub fn store(&self) -> Option<&Arc<LogStore>> {
        match &self.inner {
            Inner::Local(s) => Some(s),
            Inner::Remote(_) => None,
        }
    }

    /// The results API of this store (what the `log://` result backend uses): in this process when
    /// it owns the directory, otherwise through the owner.
    ///
    /// ```
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// use std::time::Duration;
    /// let dir = std::env::temp_dir().join(format!("doc-results-handle-{}", std::process::id()));
    /// let broker = broker_backends::log::LogBroker::connect(&format!("log://{}", dir.display())).await.unwrap();
    /// let results = broker.results();
    /// results.put("t1", br#"{"status": "SUCCESS", "task_id": "t1"}"#.to_vec(), Duration::from_secs(60)).await.unwrap();
    /// assert!(results.wait("t1", Duration::from_secs(1)).await.unwrap().is_some());
    /// # std::fs::remove_dir_all(dir).ok();
    /// # });
    /// ```
    pub fn results(&self) -> Results {
        match &self.inner {
            Inner::Local(s) => Results::local(s.clone()),
            Inner::Remote(c) => Results::remote(c.clone()),
        }
    }

    /// Joins consumer group `group` on `queue` as a stream consumer: in this process when it owns
    /// the directory, otherwise on the server (the member leaves when its connection closes).
    pub async fn stream(
        &self,
        group: &str,
        queue: &str,
        start: StartFrom,
        commit: Commit,
    ) -> Result<StreamConsumer, BrokerError> {
        match &self.inner {
            Inner::Local(store) => {
                let member = store.join_stream(group, queue, start, commit)?;
                Ok(StreamConsumer::local(store.clone(), member))
            }
            Inner::Remote(c) => {
                Ok(StreamConsumer::remote(RemoteStream::join(c.clone(), group, queue, start, commit).await?))
            }
        }
    }

    /// Delayed records seen in `queue`.
    pub async fn delayed_len(&self, queue: &str) -> Result<u64, BrokerError> {
        match &self.inner {
            Inner::Local(s) => Ok(s.delayed_len(queue)?),
            Inner::Remote(c) => c.delayed_len(queue).await,
        }
    }

    /// The queues `route` leads to; an unroutable publish is counted, and an error when mandatory.
    async fn resolve(&self, route: &Route, msg: &Message) -> Result<Vec<String>, BrokerError> {
        if route.exchange.is_empty() {
            return Ok(vec![route.routing_key.clone()]);
        }
        let headers = msg.headers.to_json();
        let queues = match &self.inner {
            Inner::Local(s) => s.route(&route.exchange, &route.routing_key, &headers)?,
            Inner::Remote(c) => c.route(&route.exchange, &route.routing_key, &headers).await?,
        };
        if queues.is_empty() {
            if let Inner::Local(s) = &self.inner {
                s.unroutable.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            let what =
                format!("no queue is bound to exchange `{}` for routing key `{}`", route.exchange, route.routing_key);
            if route.mandatory {
                return Err(BrokerError::operation(format!("unroutable (mandatory) publish: {what}")));
            }
            tracing::warn!(task = %msg.headers.task, "log: unroutable publish dropped: {what}");
        }
        Ok(queues)
    }

    /// Appends records to `queue`, here or through the owner.
    async fn append(&self, queue: &str, records: Vec<NewRecord>) -> Result<(), BrokerError> {
        match &self.inner {
            Inner::Local(s) => Ok(s.append(queue, records).await?),
            Inner::Remote(c) => c.publish(queue, &records).await,
        }
    }
}

/// Decodes a task record's payload (the compact form, or Kombu's envelope of older records) into a
/// message.
pub fn decode_payload(payload: &[u8]) -> Result<Message, celery_core::ProtocolError> {
    payload::decode(payload).0
}

#[async_trait]
impl Broker for LogBroker {
    fn kind(&self) -> &'static str {
        "log"
    }

    async fn publish(&self, route: &Route, msg: &Message) -> Result<(), BrokerError> {
        let rec = payload::to_record(msg);
        for q in self.resolve(route, msg).await? {
            self.append(&q, vec![rec.clone()]).await?;
        }
        Ok(())
    }

    async fn publish_batch(&self, batch: &[(Route, Message)]) -> Result<(), BrokerError> {
        let mut by_queue: HashMap<String, Vec<NewRecord>> = HashMap::new();
        for (route, msg) in batch {
            let rec = payload::to_record(msg);
            for q in self.resolve(route, msg).await? {
                by_queue.entry(q).or_default().push(rec.clone());
            }
        }
        // The queues' appends at once: each partition commits (and fsyncs) its own records, so a
        // batch spread over many queues waits for the slowest fsync, not for one after another.
        let appends = by_queue.into_iter().map(|(q, recs)| async move { self.append(&q, recs).await });
        futures::future::try_join_all(appends).await?;
        Ok(())
    }

    async fn consume(&self, queues: &[String], prefetch: usize) -> Result<Box<dyn Consumer>, BrokerError> {
        let weights = lock(&self.fairness).clone();
        match &self.inner {
            Inner::Local(s) => Ok(Box::new(LogConsumer::new(s.clone(), queues, prefetch)?.with_fairness(weights))),
            Inner::Remote(c) => Ok(Box::new(RemoteConsumer::start(c.clone(), queues, prefetch, weights).await?)),
        }
    }

    /// Finishes every record of `queue` that is not leased, those not yet due included.
    async fn purge(&self, queue: &str) -> Result<u64, BrokerError> {
        match &self.inner {
            Inner::Local(s) => Ok(s.purge(queue)?),
            Inner::Remote(c) => c.purge(queue).await,
        }
    }

    async fn queue_len(&self, queue: &str) -> Result<u64, BrokerError> {
        match &self.inner {
            Inner::Local(s) => Ok(s.queue_len(queue)?),
            Inner::Remote(c) => c.queue_len(queue).await,
        }
    }

    /// Reads the oldest unfinished records without leasing or counting them (`storage/peek.rs`).
    async fn peek(
        &self,
        queue: &str,
        max: usize,
    ) -> Result<Vec<Result<Message, celery_core::ProtocolError>>, BrokerError> {
        let found = match &self.inner {
            Inner::Local(s) => s.peek(queue, max)?,
            Inner::Remote(c) => c.peek(queue, max).await?,
        };
        Ok(found.iter().map(|p| payload::decode(p).0).collect())
    }

    celery_core::offers!(routing, broadcasts, leases, documents, key_slots, rate_buckets, history, fair_queues);
}
#[async_trait]
impl Routing for LogBroker {
    async fn declare_exchange(&self, name: &str, kind: ExchangeKind) -> Result<(), BrokerError> {
        match &self.inner {
            Inner::Local(s) => Ok(s.declare_exchange(name, kind)?),
            Inner::Remote(c) => c.declare_exchange(name, kind).await,
        }
    }

    async fn bind(&self, binding: &Binding) -> Result<(), BrokerError> {
        match &self.inner {
            Inner::Local(s) => Ok(s.bind(binding)?),
            Inner::Remote(c) => c.bind(binding).await,
        }
    }
}

#[async_trait]
impl Broadcasts for LogBroker {
    /// Broadcasts go through the owner's memory to its current subscribers; nothing is stored.
    async fn broadcast(&self, exchange: &Exchange, routing_key: &str, msg: &Message) -> Result<(), BrokerError> {
        match &self.inner {
            Inner::Local(s) => Ok(s.broadcast(&exchange.name, routing_key, &msg.body)?),
            Inner::Remote(c) => c.broadcast(&exchange.name, routing_key, &msg.body).await,
        }
    }

    async fn subscribe(
        &self,
        exchange: &Exchange,
        pattern: &str,
    ) -> Result<Box<dyn celery_core::broker::Subscription>, BrokerError> {
        // A fanout subscriber takes every routing key.
        let pattern = if exchange.kind == ExchangeKind::Fanout { "#" } else { pattern };
        Ok(Box::new(match &self.inner {
            Inner::Local(s) => {
                celery_core::broker::ChannelSubscription::new(s.subscribe(&exchange.name, pattern)?, None)
            }
            Inner::Remote(c) => broadcast_subscription(c.clone(), exchange.name.clone(), pattern.to_owned()).await?,
        }))
    }
}

#[async_trait]
impl Leases for LogBroker {
    async fn lease(&self, name: &str, holder: &str, ttl: Duration) -> Result<bool, BrokerError> {
        self.results().lease(name, holder, Some(ttl.max(Duration::from_millis(1)))).await
    }

    async fn release(&self, name: &str, holder: &str) -> Result<(), BrokerError> {
        self.results().lease(name, holder, None).await.map(|_| ())
    }
}

/// The owner of the directory holds the slots and parked messages (`storage/flow.rs`) and sweeps
/// them itself every second.
#[async_trait]
impl KeySlots for LogBroker {
    async fn acquire_or_park(
        &self,
        req: &SlotRequest<'_>,
        queue: &str,
        msg: &Message,
    ) -> Result<Admission, BrokerError> {
        // Encoded only when parked (the embedded store decides first; an owner over the network
        // is sent it with the request).
        let record = || {
            let mut rec = payload::to_record(msg);
            rec.not_before_ms = 0;
            rec
        };
        match &self.inner {
            Inner::Local(s) => Ok(s.acquire_or_park(req, queue, record).await?),
            Inner::Remote(c) => c.acquire_or_park(req, queue, &record()).await,
        }
    }

    async fn renew(&self, key: &str, holder: &str, ttl: Duration) -> Result<bool, BrokerError> {
        match &self.inner {
            Inner::Local(s) => Ok(s.renew_slot(key, holder, ttl)?),
            Inner::Remote(c) => c.renew_slot(key, holder, ttl).await,
        }
    }

    async fn release(&self, key: &str, holder: &str, _queue: &str) -> Result<(), BrokerError> {
        match &self.inner {
            Inner::Local(s) => Ok(s.release_slot(key, holder).await?),
            Inner::Remote(c) => c.release_slot(key, holder).await,
        }
    }
}

/// The owner's partitions keep the records read ahead by key (`storage/partition/fair.rs`); the
/// weights travel with each consumer (`CONSUME`), so the owner serves each taker by its own.
impl FairQueues for LogBroker {
    fn set_fairness_weights(&self, weights: FairnessWeights) {
        *lock(&self.fairness) = Arc::new(weights);
    }
}

/// The owner holds the buckets, in memory.
#[async_trait]
impl RateBuckets for LogBroker {
    async fn reserve(&self, name: &str, interval: Duration) -> Result<Duration, BrokerError> {
        match &self.inner {
            Inner::Local(s) => Ok(s.reserve_start(name, interval)?),
            Inner::Remote(c) => c.reserve_start(name, interval).await,
        }
    }
}

/// The history is kept by the directory's owner, in its compacted results log
/// (`_celery_rs.history.<id>`), and searched there ([`Results`]).
#[async_trait]
impl History for LogBroker {
    async fn record(&self, tasks: &[TaskRecord], keep: &Retain) -> Result<(), BrokerError> {
        self.results().record(tasks, keep).await
    }

    async fn search(&self, query: &HistoryQuery) -> Result<HistoryPage, BrokerError> {
        self.results().search(query).await
    }
}

#[async_trait]
impl Documents for LogBroker {
    async fn load_doc(&self, key: &str) -> Result<Option<Vec<u8>>, BrokerError> {
        self.results().get(&doc_key(key)).await
    }

    async fn store_doc(&self, key: &str, doc: &[u8]) -> Result<(), BrokerError> {
        self.results().put(&doc_key(key), doc.to_vec(), DOC_TTL).await
    }
}

celery_core::register_broker!("log", "log+tcp", "log+tls" => LogBroker::connect);

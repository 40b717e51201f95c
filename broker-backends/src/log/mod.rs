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
//! `partitions=` (for new queues), `max_record_bytes=` (default 16 MiB + 64 KiB), `max_queues=` (default 10,000). A served directory (`broker serve`) is reached as
//! `log+tcp://HOST:PORT?token=...`, or over TLS as `log+tls://HOST:PORT?token=...&ca_certs=PATH`
//! (plus `certfile=`/`keyfile=` when the server asks for a client certificate).
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

mod disk;
mod error;
mod names;
mod partition;
pub(crate) mod payload;
mod peek;
pub(crate) mod record;
mod remote;
mod results;
pub(crate) mod segment;
mod server;
mod store;
mod stream;
mod tls;
pub(crate) mod wire;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use celery_core::backend::ChordMember;
use celery_core::broker::Settle;
use celery_core::protocol::Message;
use celery_core::routing::{Binding, Exchange, ExchangeKind, Route};
use celery_core::url::{redacted, ServiceUrl};
use celery_core::{Broker, BrokerError, Consumer, Delivery};
use chrono::{DateTime, Utc};
use tokio::sync::{Notify, Semaphore};

pub use error::LogError;
pub use partition::{Fsync, NewRecord, Retention};
pub use record::Record;
pub use results::Compacted;
pub use server::{serve_tcp, serve_tcp_with, ServerLimits};
pub use store::{LogStore, StoreConfig, DEFAULT_MAX_RECORD};
pub use stream::{Commit, StartFrom, StreamConsumer, StreamRecord};
pub use tls::ServerTls;

use partition::{now_ms, Partition};
use store::Topic;

/// Parses `log://PATH?options` into the directory and the settings.
///
/// ```
/// use broker_backends::log::{parse_url, Fsync};
/// let (dir, cfg) = parse_url("log://./data?fsync=os&partitions=4").unwrap();
/// assert_eq!(dir, std::path::PathBuf::from("./data"));
/// assert_eq!((cfg.fsync, cfg.partitions), (Fsync::Os, 4));
/// ```
pub fn parse_url(url: &str) -> Result<(PathBuf, StoreConfig), LogError> {
    let u = ServiceUrl::parse(url).map_err(|e| LogError::Invalid(e.reason().to_owned()))?;
    if u.scheme() != "log" {
        return Err(LogError::Invalid(format!("`{u}` is not a log:// URL")));
    }
    // A `#` is part of a directory name here, not a fragment.
    let path = match u.fragment() {
        Some(f) => format!("{}#{f}", u.location()),
        None => u.location().to_owned(),
    };
    if path.is_empty() {
        return Err(LogError::Invalid("log:// needs a directory, like log://./celery-data".into()));
    }
    let invalid = |e: celery_core::url::UrlError| LogError::Invalid(e.reason().to_owned());
    let mut cfg = StoreConfig::default();
    if let Some(v) = u.option("fsync") {
        cfg.fsync = match v {
            "always" => Fsync::Always,
            "os" | "never" => Fsync::Os,
            ms => Fsync::Interval(Duration::from_millis(
                ms.trim_start_matches("interval=")
                    .parse()
                    .map_err(|_| LogError::Invalid(format!("fsync `{v}`: expected always, os or milliseconds")))?,
            )),
        }
    }
    let num = |name| u.positive(name).map_err(invalid);
    if let Some(n) = num("segment_bytes")? {
        cfg.segment_bytes = n as u64;
    }
    if let Some(n) = num("lease_timeout")? {
        // Between 10 ms (renewed every third of it) and a year (deadlines stay representable).
        cfg.lease = celery_core::clock::secs_f64(n).clamp(Duration::from_millis(10), Duration::from_secs(365 * 86_400));
    }
    if let Some(n) = num("max_deliveries")? {
        cfg.max_deliveries = n as u32;
    }
    if let Some(n) = num("partitions")? {
        if n > 1024.0 {
            return Err(LogError::Invalid(format!("partitions `{n}` is over the limit of 1024 per queue")));
        }
        cfg.partitions = n as u32;
    }
    if let Some(n) = num("retention_bytes")? {
        cfg.retention.bytes = Some(n as u64);
    }
    if let Some(n) = num("retention_ms")? {
        cfg.retention.age = Some(Duration::from_millis(n as u64));
    }
    if let Some(force) = u.flag("retention_force").map_err(invalid)? {
        cfg.retention.force = force;
    }
    if let Some(n) = num("max_record_bytes")? {
        let n = n as usize;
        if n > record::MAX_RECORD - 1024 {
            return Err(LogError::Invalid(format!(
                "max_record_bytes `{n}` is over the on-disk limit of {} bytes",
                record::MAX_RECORD - 1024
            )));
        }
        cfg.max_record_bytes = n;
    }
    if let Some(n) = num("max_queues")? {
        cfg.max_queues = n as usize;
    }
    // The token of a served directory: no use to the owner, accepted so one URL serves both.
    u.accept(&["token"]);
    u.finish().map_err(invalid)?;
    Ok((PathBuf::from(path), cfg))
}

/// The built-in broker: the store in this process, or a connection to the process that owns it.
#[derive(Debug, Clone)]
pub struct LogBroker {
    inner: Inner,
}

#[derive(Debug, Clone)]
enum Inner {
    Local(Arc<LogStore>),
    Remote(Arc<remote::RemoteClient>),
}

/// The unix socket the owner of a data directory listens on.
pub fn socket_path(dir: &std::path::Path) -> PathBuf {
    dir.join("broker.sock")
}

/// `log+tcp://HOST:PORT?token=...` or `log+tls://HOST:PORT?token=...&ca_certs=&certfile=&keyfile=`:
/// where the server is, and the token; None for other URLs.
fn parse_remote(url: &str) -> Result<Option<(remote::Target, String)>, LogError> {
    let tls = match url.split_once("://").map(|(scheme, _)| scheme) {
        Some("log+tcp") => false,
        Some("log+tls") => true,
        _ => return Ok(None),
    };
    let invalid = |e: celery_core::url::UrlError| LogError::Invalid(e.reason().to_owned());
    let u = ServiceUrl::parse(url).map_err(invalid)?;
    let scheme = if tls { "log+tls://" } else { "log+tcp://" };
    let addr = u.host_port();
    let Some((host, _port)) = addr.rsplit_once(':').filter(|(h, p)| !h.is_empty() && !p.is_empty()) else {
        return Err(LogError::Invalid(format!("{scheme} needs HOST:PORT")));
    };
    let token = u.option("token").unwrap_or_default().to_owned();
    let files = tls::ClientFiles {
        ca_certs: u.option("ca_certs").map(Into::into),
        certfile: u.option("certfile").map(Into::into),
        keyfile: u.option("keyfile").map(Into::into),
    };
    if !tls {
        if let Some(k) = ["ca_certs", "certfile", "keyfile"].into_iter().find(|k| u.option(k).is_some()) {
            return Err(LogError::Invalid(format!("{k} is a TLS option: use log+tls://")));
        }
    }
    u.finish().map_err(|e| LogError::Invalid(format!("{} (the server's options go to `broker serve`)", e.reason())))?;
    let tls = tls.then(|| tls::ClientTls::new(host, &files)).transpose()?;
    Ok(Some((remote::Target::Tcp(addr.to_owned(), tls), token)))
}

impl LogBroker {
    /// Opens `log://PATH` (owning the directory, or connecting to its owner's socket), or connects
    /// to `log+tcp://HOST:PORT?token=...` or `log+tls://HOST:PORT?token=...&ca_certs=...`.
    pub async fn connect(url: &str) -> Result<LogBroker, BrokerError> {
        let invalid = |e: LogError| BrokerError::InvalidUrl { url: redacted(url), reason: e.to_string() };
        if let Some((target, token)) = parse_remote(url).map_err(invalid)? {
            let client = Arc::new(remote::RemoteClient::new(target, token.clone(), None));
            client.call(wire::kind::HELLO, |e| e.str(&token)).await?;
            return Ok(LogBroker { inner: Inner::Remote(client) });
        }
        let (dir, cfg) = parse_url(url).map_err(invalid)?;
        match LogStore::open(&dir, cfg.clone()) {
            Ok(store) => {
                store.serve_unix();
                Ok(LogBroker { inner: Inner::Local(store) })
            }
            Err(LogError::Locked { path, pid }) => {
                tracing::debug!(path = %path.display(), pid, "log: directory owned by another process; connecting to it");
                let takeover = remote::Takeover::new(dir.clone(), cfg);
                let client = Arc::new(remote::RemoteClient::new(
                    remote::Target::Unix(socket_path(&path)),
                    String::new(),
                    Some(takeover),
                ));
                // The owner may have just taken the lock and not be listening yet: retry briefly.
                let mut backoff = celery_core::backoff::Reconnect::default();
                loop {
                    match client.call(wire::kind::HELLO, |e| e.str("")).await {
                        Ok(_) => return Ok(LogBroker { inner: Inner::Remote(client) }),
                        Err(e) if backoff.attempts() < 6 => {
                            tracing::debug!(error = %e, "log: owner's socket not ready; retrying");
                            tokio::time::sleep(backoff.next_delay()).await;
                        }
                        Err(e) => {
                            return Err(BrokerError::connection(format!(
                                "{} is owned by process {pid}, whose socket does not answer: {e}",
                                path.display()
                            )))
                        }
                    }
                }
            }
            Err(e) => Err(e.into()),
        }
    }

    pub(crate) fn local(store: Arc<LogStore>) -> LogBroker {
        LogBroker { inner: Inner::Local(store) }
    }

    /// The store, when this process owns the directory.
    pub fn store(&self) -> Option<&Arc<LogStore>> {
        match &self.inner {
            Inner::Local(s) => Some(s),
            Inner::Remote(_) => None,
        }
    }

    pub(crate) fn local_consumer(&self, queues: &[String], prefetch: usize) -> Result<LogConsumer, LogError> {
        let Inner::Local(store) = &self.inner else {
            return Err(LogError::Invalid("not a local store".into()));
        };
        for q in queues {
            names::component("queue", q)?;
        }
        static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let id = NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let renew = tokio::spawn(renew_loop(store.clone(), queues.to_vec(), id));
        Ok(LogConsumer {
            store: store.clone(),
            topics: Vec::new(),
            waiting_for: queues.to_vec(),
            created_seen: u64::MAX,
            slots: Arc::new(Semaphore::new(prefetch.max(1))),
            id,
            stopped: false,
            renew,
            turn: 0,
        })
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
                Ok(StreamConsumer::local(stream::LocalStream::join(store.clone(), group, queue, start, commit)?))
            }
            Inner::Remote(c) => {
                Ok(StreamConsumer::remote(remote::RemoteStream::join(c.clone(), group, queue, start, commit).await?))
            }
        }
    }

    /// Delayed records seen in `queue`.
    pub async fn delayed_len(&self, queue: &str) -> Result<u64, BrokerError> {
        match &self.inner {
            Inner::Local(s) => {
                Ok(s.find_topic(queue)?.map_or(0, |t| t.partitions.iter().map(|p| p.delayed_len()).sum()))
            }
            Inner::Remote(c) => remote::read_u64(&c.call(wire::kind::DELAYED_LEN, |e| e.str(queue)).await?),
        }
    }

    /// Stores a result document unless a SUCCESS is stored already.
    pub async fn put_result(&self, id: &str, doc: Vec<u8>, ttl: Duration) -> Result<(), BrokerError> {
        match &self.inner {
            Inner::Local(s) => s.put_result(id, doc, ttl, server::is_success).await.map(|_| ()).map_err(Into::into),
            Inner::Remote(c) => c
                .call(wire::kind::RESULT_PUT, |e| e.str(id).bytes(&doc).u64(celery_core::clock::millis(ttl)))
                .await
                .map(|_| ()),
        }
    }

    /// The result document of `id`.
    pub async fn get_result(&self, id: &str) -> Result<Option<Vec<u8>>, BrokerError> {
        match &self.inner {
            Inner::Local(s) => Ok(s.get_result(id)),
            Inner::Remote(c) => remote::read_opt(&c.call(wire::kind::RESULT_GET, |e| e.str(id)).await?),
        }
    }

    /// Waits for a ready result document of `id`, at most `timeout`.
    pub async fn wait_result(&self, id: &str, timeout: Duration) -> Result<Option<Vec<u8>>, BrokerError> {
        match &self.inner {
            Inner::Local(s) => Ok(s.wait_result(id, timeout, server::is_ready).await),
            Inner::Remote(c) => {
                let deadline = celery_core::clock::instant_after(timeout);
                loop {
                    let left = deadline.saturating_duration_since(tokio::time::Instant::now()).min(remote::MAX_WAIT);
                    let doc = remote::read_opt(
                        &c.call(wire::kind::RESULT_WAIT, |e| e.str(id).u64(celery_core::clock::millis(left))).await?,
                    )?;
                    if doc.as_deref().is_some_and(server::is_ready) || tokio::time::Instant::now() >= deadline {
                        return Ok(doc);
                    }
                }
            }
        }
    }

    /// Who holds the lease `name`, if anyone.
    pub async fn lease_holder(&self, name: &str) -> Result<Option<String>, BrokerError> {
        Ok(self.get_result(&lease_key(name)).await?.map(|h| String::from_utf8_lossy(&h).into_owned()))
    }

    /// Records a chord's size.
    pub async fn chord_size(&self, group: &str, size: usize, ttl: Duration) -> Result<(), BrokerError> {
        match &self.inner {
            Inner::Local(s) => Ok(s.chord_size(group, size, ttl).await?),
            Inner::Remote(c) => c
                .call(wire::kind::CHORD, |e| {
                    e.u8(wire::chord::SIZE).str(group).u64(size as u64).u64(celery_core::clock::millis(ttl))
                })
                .await
                .map(|_| ()),
        }
    }

    /// Counts a chord member; the members, to the one that completes the chord.
    pub async fn chord_part(
        &self,
        group: &str,
        member: &ChordMember,
        ttl: Duration,
    ) -> Result<Option<Vec<ChordMember>>, BrokerError> {
        match &self.inner {
            Inner::Local(s) => Ok(s.chord_part(group, member.clone(), ttl).await?),
            Inner::Remote(c) => {
                let doc = serde_json::to_vec(member).map_err(|e| BrokerError::operation(e.to_string()))?;
                let body = c
                    .call(wire::kind::CHORD, |e| {
                        e.u8(wire::chord::PART).str(group).bytes(&doc).u64(celery_core::clock::millis(ttl))
                    })
                    .await?;
                match remote::read_opt(&body)? {
                    None => Ok(None),
                    Some(all) => {
                        serde_json::from_slice(&all).map(Some).map_err(|e| BrokerError::operation(e.to_string()))
                    }
                }
            }
        }
    }

    /// Forgets a chord's tally.
    pub async fn chord_done(&self, group: &str) -> Result<(), BrokerError> {
        match &self.inner {
            Inner::Local(s) => Ok(s.chord_done(group).await?),
            Inner::Remote(c) => c.call(wire::kind::CHORD, |e| e.u8(wire::chord::DONE).str(group)).await.map(|_| ()),
        }
    }

    /// Deletes the result document of `id`.
    pub async fn forget_result(&self, id: &str) -> Result<(), BrokerError> {
        match &self.inner {
            Inner::Local(s) => s.forget_result(id).await.map_err(Into::into),
            Inner::Remote(c) => c.call(wire::kind::RESULT_FORGET, |e| e.str(id)).await.map(|_| ()),
        }
    }
}

/// Decodes a task record's payload (the compact form, or Kombu's envelope of older records) into a
/// message.
pub fn decode_payload(payload: &[u8]) -> Result<Message, celery_core::ProtocolError> {
    payload::decode(payload).0
}

fn to_record(msg: &Message) -> NewRecord {
    let not_before_ms = msg.headers.eta.map(|t| t.timestamp_millis()).filter(|t| *t > now_ms()).unwrap_or(0);
    let key = match msg.headers.extra.get(celery_core::signature::PARTITION_KEY) {
        Some(serde_json::Value::String(k)) => k.as_bytes().to_vec(),
        _ => Vec::new(),
    };
    NewRecord { not_before_ms, headers: Vec::new(), key, payload: payload::encode(msg) }
}

impl LogBroker {
    /// The queues `route` leads to; an unroutable publish is counted, and an error when mandatory.
    async fn resolve(&self, route: &Route, msg: &Message) -> Result<Vec<String>, BrokerError> {
        if route.exchange.is_empty() {
            return Ok(vec![route.routing_key.clone()]);
        }
        let headers = msg.headers.to_json();
        let queues = match &self.inner {
            Inner::Local(s) => s.route(&route.exchange, &route.routing_key, &headers)?,
            Inner::Remote(c) => {
                let body = c
                    .call(wire::kind::ROUTE, |e| {
                        e.str(&route.exchange)
                            .str(&route.routing_key)
                            .bytes(&serde_json::to_vec(&headers).unwrap_or_default())
                    })
                    .await?;
                let mut d = wire::Dec::new(&body);
                let n = d.u32().map_err(|e| BrokerError::operation(e.to_string()))?;
                (0..n)
                    .map(|_| d.str())
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| BrokerError::operation(e.to_string()))?
            }
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
}

fn encode_records(mut enc: wire::Enc, queue: &str, records: &[NewRecord]) -> wire::Enc {
    enc = enc.str(queue).u32(records.len() as u32);
    for r in records {
        enc = enc.i64(r.not_before_ms).bytes(&r.key).bytes(&r.payload);
    }
    enc
}

#[async_trait]
impl Broker for LogBroker {
    fn kind(&self) -> &'static str {
        "log"
    }

    async fn publish(&self, route: &Route, msg: &Message) -> Result<(), BrokerError> {
        let rec = to_record(msg);
        for q in self.resolve(route, msg).await? {
            let records = vec![rec.clone()];
            match &self.inner {
                Inner::Local(s) => s.append(&q, records).await?,
                Inner::Remote(c) => {
                    c.call(wire::kind::PUBLISH, |e| encode_records(e, &q, &records)).await?;
                }
            }
        }
        Ok(())
    }

    async fn publish_batch(&self, batch: &[(Route, Message)]) -> Result<(), BrokerError> {
        let mut by_queue: HashMap<String, Vec<NewRecord>> = HashMap::new();
        for (route, msg) in batch {
            let rec = to_record(msg);
            for q in self.resolve(route, msg).await? {
                by_queue.entry(q).or_default().push(rec.clone());
            }
        }
        for (q, recs) in by_queue {
            match &self.inner {
                Inner::Local(s) => s.append(&q, recs).await?,
                Inner::Remote(c) => {
                    for chunk in recs.chunks(wire::MAX_PUBLISH_RECORDS) {
                        c.call(wire::kind::PUBLISH, |e| encode_records(e, &q, chunk)).await?;
                    }
                }
            }
        }
        Ok(())
    }

    async fn consume(&self, queues: &[String], prefetch: usize) -> Result<Box<dyn Consumer>, BrokerError> {
        match &self.inner {
            Inner::Local(_) => Ok(Box::new(self.local_consumer(queues, prefetch)?)),
            Inner::Remote(c) => Ok(Box::new(remote::RemoteConsumer::start(c.clone(), queues, prefetch).await?)),
        }
    }

    /// Finishes every record of `queue` that is not leased, those not yet due included.
    async fn purge(&self, queue: &str) -> Result<u64, BrokerError> {
        match &self.inner {
            Inner::Local(s) => {
                let mut n = 0;
                for p in s.find_topic(queue)?.iter().flat_map(|t| t.partitions.iter()) {
                    n += p.purge()?;
                }
                Ok(n)
            }
            Inner::Remote(c) => remote::read_u64(&c.call(wire::kind::PURGE, |e| e.str(queue)).await?),
        }
    }

    async fn queue_len(&self, queue: &str) -> Result<u64, BrokerError> {
        match &self.inner {
            Inner::Local(s) => Ok(s.find_topic(queue)?.map_or(0, |t| t.partitions.iter().map(|p| p.ready_len()).sum())),
            Inner::Remote(c) => remote::read_u64(&c.call(wire::kind::QUEUE_LEN, |e| e.str(queue)).await?),
        }
    }

    /// Reads the oldest unfinished records without leasing or counting them (`log/peek.rs`).
    async fn peek(
        &self,
        queue: &str,
        max: usize,
    ) -> Result<Vec<Result<Message, celery_core::ProtocolError>>, BrokerError> {
        self.peek_queue(queue, max).await
    }

    async fn declare_exchange(&self, name: &str, kind: ExchangeKind) -> Result<(), BrokerError> {
        match &self.inner {
            Inner::Local(s) => Ok(s.declare_exchange(name, kind)?),
            Inner::Remote(c) => {
                let k = format!("{kind:?}").to_lowercase();
                c.call(wire::kind::DECLARE, |e| e.str(name).str(&k)).await.map(|_| ())
            }
        }
    }

    async fn bind(&self, binding: &Binding) -> Result<(), BrokerError> {
        match &self.inner {
            Inner::Local(s) => Ok(s.bind(binding)?),
            Inner::Remote(c) => {
                let b = serde_json::to_vec(binding).map_err(|e| BrokerError::operation(e.to_string()))?;
                c.call(wire::kind::BIND, |e| e.bytes(&b)).await.map(|_| ())
            }
        }
    }

    /// Broadcasts go through the owner's memory to its current subscribers; nothing is stored.
    async fn broadcast(&self, exchange: &Exchange, routing_key: &str, msg: &Message) -> Result<(), BrokerError> {
        match &self.inner {
            Inner::Local(s) => Ok(s.broadcast(&exchange.name, routing_key, &msg.body)?),
            Inner::Remote(c) => c
                .call(wire::kind::BROADCAST, |e| e.str(&exchange.name).str(routing_key).bytes(&msg.body))
                .await
                .map(|_| ()),
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
            Inner::Remote(c) => {
                remote::broadcast_subscription(c.clone(), exchange.name.clone(), pattern.to_owned()).await?
            }
        }))
    }

    async fn lease(&self, name: &str, holder: &str, ttl: Duration) -> Result<bool, BrokerError> {
        let ttl = ttl.max(Duration::from_millis(1));
        match &self.inner {
            Inner::Local(s) => Ok(s.lease(name, holder, Some(ttl)).await?),
            Inner::Remote(c) => {
                let body =
                    c.call(wire::kind::LEASE, |e| e.str(name).str(holder).u64(celery_core::clock::millis(ttl))).await?;
                Ok(remote::read_u64(&body)? == 1)
            }
        }
    }

    async fn release(&self, name: &str, holder: &str) -> Result<(), BrokerError> {
        match &self.inner {
            Inner::Local(s) => s.lease(name, holder, None).await.map(|_| ()).map_err(Into::into),
            Inner::Remote(c) => c.call(wire::kind::LEASE, |e| e.str(name).str(holder).u64(0)).await.map(|_| ()),
        }
    }

    async fn load_doc(&self, key: &str) -> Result<Option<Vec<u8>>, BrokerError> {
        self.get_result(&doc_key(key)).await
    }

    async fn store_doc(&self, key: &str, doc: &[u8]) -> Result<(), BrokerError> {
        self.put_result(&doc_key(key), doc.to_vec(), DOC_TTL).await
    }
}

const CHORD_PREFIX: &str = "_celery_rs.chord.";

/// A chord's records among the results: `<prefix><group>` (size), `/<task id>` (members), `!by`.
fn chord_key(group: &str, suffix: &str) -> String {
    format!("{CHORD_PREFIX}{group}{suffix}")
}

/// The result key a lease is kept under.
fn lease_key(name: &str) -> String {
    format!("_celery_rs.lease.{name}")
}

/// Stored documents and leases live among the results (task ids are UUIDs, so the names never meet).
fn doc_key(key: &str) -> String {
    format!("_celery_rs.doc.{key}")
}

/// A stored document is kept until replaced.
const DOC_TTL: Duration = Duration::from_secs(100 * 365 * 86_400);

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

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
type Took = (Arc<Topic>, Arc<Partition>, partition::Taken);

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
}

impl LogConsumer {
    /// Looks up the consumed queues that did not exist, when the store has created a queue since.
    fn find_new_topics(&mut self) {
        let created = self.store.topics_created.load(std::sync::atomic::Ordering::Acquire);
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
                match p.take(deadline, self.id) {
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
        let mut rec = to_record(&m);
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

/// What the result backend over a log store needs: keyed documents with expiry and waiters.
impl LogStore {
    /// Stores a result document for `id` unless `keep(existing)` says the stored one must stay;
    /// returns whether it was stored. Reopening the store keeps an unexpired SUCCESS the same way.
    pub async fn put_result(
        &self,
        id: &str,
        doc: Vec<u8>,
        ttl: Duration,
        keep: impl Fn(&[u8]) -> bool,
    ) -> Result<bool, LogError> {
        store::check_size("result", id.len() + doc.len() + 64, self.config().max_record_bytes)?;
        let expires = celery_core::clock::expiry_ms(now_ms(), ttl);
        {
            let res = lock(&self.results);
            if res.values.get(id).is_some_and(|(old, exp)| *exp > now_ms() && keep(old)) {
                return Ok(false);
            }
        }
        let rec = NewRecord {
            headers: vec![("expires".into(), expires.to_string().into_bytes())],
            key: id.as_bytes().to_vec(),
            payload: doc.clone(),
            not_before_ms: 0,
        };
        // Decided again when applied: a concurrent write for the same id (a redelivered task's
        // STARTED beside its SUCCESS) passed the same check while neither was applied, and the
        // one applied last must not replace what must stay. Opening the store replays the log
        // with the same rule (`store::replay_result`), whatever order the records were written in.
        let (stored, waiter) = self
            .results_log
            .append(vec![rec], || {
                let mut res = lock(&self.results);
                if res.values.get(id).is_some_and(|(old, exp)| *exp > now_ms() && keep(old)) {
                    return (false, None);
                }
                res.values.insert(id.to_owned(), (doc, expires));
                (true, res.waiters.remove(id))
            })
            .await?;
        if let Some(w) = waiter {
            w.notify_waiters();
        }
        Ok(stored)
    }

    /// The result document of `id`, if stored and not expired.
    pub fn get_result(&self, id: &str) -> Option<Vec<u8>> {
        let res = lock(&self.results);
        res.values.get(id).filter(|(_, exp)| *exp > now_ms()).map(|(d, _)| d.clone())
    }

    /// Waits until `ready(doc)` holds for `id`'s document or `timeout` passes; returns the document.
    /// The id's waiter entry goes when its last waiter does (a timeout, a cancelled wait, or a stored
    /// result), so waits on ids that never get a result leave nothing behind.
    pub async fn wait_result(&self, id: &str, timeout: Duration, ready: impl Fn(&[u8]) -> bool) -> Option<Vec<u8>> {
        /// One waiter's hold on the id's entry; the last one to let go removes it.
        struct Waiting<'a> {
            store: &'a LogStore,
            id: &'a str,
            notify: Option<Arc<Notify>>,
        }
        impl Drop for Waiting<'_> {
            fn drop(&mut self) {
                let mut res = lock(&self.store.results);
                // Clones are made and dropped under this lock, so the count is exact: the map's
                // and this one mean no one else waits.
                if let Some(mine) = self.notify.take() {
                    if res.waiters.get(self.id).is_some_and(|n| Arc::ptr_eq(n, &mine)) && Arc::strong_count(&mine) == 2
                    {
                        res.waiters.remove(self.id);
                    }
                }
            }
        }
        let deadline = celery_core::clock::instant_after(timeout);
        loop {
            let notify =
                lock(&self.results).waiters.entry(id.to_owned()).or_insert_with(|| Arc::new(Notify::new())).clone();
            let waiting = Waiting { store: self, id, notify: Some(notify) };
            let notified = waiting.notify.as_deref().map(Notify::notified);
            let cur = self.get_result(id);
            if cur.as_deref().is_some_and(&ready) || tokio::time::Instant::now() >= deadline {
                return cur;
            }
            if let Some(notified) = notified {
                let _ = tokio::time::timeout_at(deadline, notified).await;
            }
        }
    }

    /// Takes or renews (`ttl` given) or releases (`None`) the lease `name` for `holder`; true when
    /// `holder` holds it afterwards. Leases are stored like results, so they survive an owner restart.
    pub async fn lease(&self, name: &str, holder: &str, ttl: Option<Duration>) -> Result<bool, LogError> {
        let key = lease_key(name);
        let _one_at_a_time = self.cas_lock.lock().await;
        let mine = match self.get_result(&key) {
            None => true,
            Some(cur) => cur == holder.as_bytes(),
        };
        match ttl {
            Some(ttl) if mine => self.put_result(&key, holder.as_bytes().to_vec(), ttl, |_| false).await.map(|_| true),
            Some(_) => Ok(false),
            None if mine => self.forget_result(&key).await.map(|_| false),
            None => Ok(false),
        }
    }

    /// Records a chord's size (kept for `ttl`).
    pub async fn chord_size(&self, group: &str, size: usize, ttl: Duration) -> Result<(), LogError> {
        let _one_at_a_time = self.cas_lock.lock().await;
        let doc = size.to_string().into_bytes();
        self.put_result(&chord_key(group, ""), doc, ttl, |_| false).await?;
        lock(&self.chords).entry(group.to_owned()).or_default().size = Some(size);
        Ok(())
    }

    /// Counts a chord member (see `ResultBackend::chord_part`): persisted first, then counted.
    pub async fn chord_part(
        &self,
        group: &str,
        member: ChordMember,
        ttl: Duration,
    ) -> Result<Option<Vec<ChordMember>>, LogError> {
        let _one_at_a_time = self.cas_lock.lock().await;
        let mut tally = lock(&self.chords).get(group).cloned().unwrap_or_default();
        let (known, by) = (tally.members.contains_key(&member.task_id), tally.completed_by.clone());
        let id = member.task_id.clone();
        let doc = serde_json::to_vec(&member).map_err(|e| LogError::Invalid(e.to_string()))?;
        let out = tally.part(member);
        if !known {
            self.put_result(&chord_key(group, &format!("/{id}")), doc, ttl, |_| false).await?;
        }
        if tally.completed_by != by {
            self.put_result(&chord_key(group, "!by"), id.into_bytes(), ttl, |_| false).await?;
        }
        lock(&self.chords).insert(group.to_owned(), tally);
        Ok(out)
    }

    /// Forgets a chord's tally.
    pub async fn chord_done(&self, group: &str) -> Result<(), LogError> {
        let _one_at_a_time = self.cas_lock.lock().await;
        let Some(tally) = lock(&self.chords).remove(group) else { return Ok(()) };
        let mut keys = vec![chord_key(group, ""), chord_key(group, "!by")];
        keys.extend(tally.members.keys().map(|id| chord_key(group, &format!("/{id}"))));
        let tombstones =
            keys.iter().map(|k| NewRecord { key: k.as_bytes().to_vec(), ..NewRecord::default() }).collect();
        self.results_log
            .append(tombstones, || {
                let mut res = lock(&self.results);
                for k in &keys {
                    res.values.remove(k);
                }
            })
            .await
    }

    /// Rebuilds the chord tallies from the stored results (on open).
    pub(crate) fn rebuild_chords(&self) {
        let res = lock(&self.results);
        let mut chords = lock(&self.chords);
        for (key, (doc, _)) in &res.values {
            let Some(rest) = key.strip_prefix(CHORD_PREFIX) else { continue };
            if let Some((group, _)) = rest.split_once('/') {
                if let Ok(m) = serde_json::from_slice::<ChordMember>(doc) {
                    chords.entry(group.to_owned()).or_default().members.insert(m.task_id.clone(), m);
                }
            } else if let Some(group) = rest.strip_suffix("!by") {
                chords.entry(group.to_owned()).or_default().completed_by = Some(String::from_utf8_lossy(doc).into());
            } else {
                chords.entry(rest.to_owned()).or_default().size =
                    std::str::from_utf8(doc).ok().and_then(|s| s.parse().ok());
            }
        }
    }

    /// Deletes `id`'s document.
    pub async fn forget_result(&self, id: &str) -> Result<(), LogError> {
        let rec = NewRecord { key: id.as_bytes().to_vec(), ..NewRecord::default() };
        self.results_log.append(vec![rec], || lock(&self.results).values.remove(id)).await?;
        Ok(())
    }
}

celery_core::register_broker!("log", "log+tcp", "log+tls" => LogBroker::connect);

#[cfg(test)]
mod tests {
    use super::*;

    fn remote_err(url: &str) -> String {
        parse_remote(url).unwrap_err().to_string()
    }

    #[test]
    fn remote_urls_are_checked() {
        let (target, token) = parse_remote("log+tcp://10.0.0.5:7575/?token=abc").unwrap().unwrap();
        assert!(matches!(target, remote::Target::Tcp(ref a, None) if a == "10.0.0.5:7575"), "{target:?}");
        assert_eq!(token, "abc");
        assert!(parse_remote("log:///tmp/x").unwrap().is_none());
        assert!(remote_err("log+tcp://?token=x").contains("needs HOST:PORT"));
        assert!(remote_err("log+tls://host").contains("log+tls:// needs HOST:PORT"));
        assert!(remote_err("log+tcp://h:1?ca_certs=/ca.pem").contains("use log+tls://"));
        assert!(remote_err("log+tcp://h:1?fsync=os").contains("unknown log+tcp:// option `fsync`"));
        assert!(remote_err("log+tls://h:1?certfile=/c.pem").contains("certfile and keyfile go together"));
        assert!(remote_err("log+tls://h:1?ca_certs=/nonexistent.pem").contains("ca_certs /nonexistent.pem"));
    }

    #[test]
    fn a_remote_broker_prints_no_token() {
        let client = remote::RemoteClient::new(remote::Target::Tcp("h:1".into(), None), "s3cret".into(), None);
        let shown = format!("{:?}", LogBroker { inner: Inner::Remote(Arc::new(client)) });
        assert!(!shown.contains("s3cret") && shown.contains("***"), "{shown}");
    }

    #[test]
    fn url_errors_print_the_url_redacted() {
        let e = tokio::runtime::Runtime::new()
            .unwrap()
            .block_on(LogBroker::connect("log+tcp://h:1/?token=s3cret&bogus=1"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("log+tcp://h:1/?token=***&bogus=1") && e.contains("`bogus`"), "{e}");
        assert!(!e.contains("s3cret"), "{e}");
    }

    /// Every `log://` form accepted today, and the settings it gives.
    #[test]
    fn accepted_log_urls_keep_their_settings() {
        let d = StoreConfig::default;
        let ms = Duration::from_millis;
        let table: Vec<(&str, &str, StoreConfig)> = vec![
            ("log://./data", "./data", d()),
            ("log:///abs/dir", "/abs/dir", d()),
            ("log://relative", "relative", d()),
            ("log://./data?", "./data", d()),
            ("log:///tmp/a b/c%20d", "/tmp/a b/c%20d", d()),
            ("log://./d?fsync=always", "./d", d()),
            ("log://./d?fsync=os", "./d", StoreConfig { fsync: Fsync::Os, ..d() }),
            ("log://./d?fsync=never", "./d", StoreConfig { fsync: Fsync::Os, ..d() }),
            ("log://./d?fsync=250", "./d", StoreConfig { fsync: Fsync::Interval(ms(250)), ..d() }),
            ("log://./d?fsync=interval=40", "./d", StoreConfig { fsync: Fsync::Interval(ms(40)), ..d() }),
            ("log://./d?segment_bytes=1048576", "./d", StoreConfig { segment_bytes: 1 << 20, ..d() }),
            ("log://./d?lease_timeout=2.5", "./d", StoreConfig { lease: ms(2500), ..d() }),
            ("log://./d?max_deliveries=3&partitions=4", "./d", StoreConfig { max_deliveries: 3, partitions: 4, ..d() }),
            (
                "log://./d?retention_bytes=1000&retention_ms=60000&retention_force=true",
                "./d",
                StoreConfig { retention: Retention { bytes: Some(1000), age: Some(ms(60_000)), force: true }, ..d() },
            ),
            (
                "log://./d?retention_force=1",
                "./d",
                StoreConfig { retention: Retention { force: true, ..Default::default() }, ..d() },
            ),
            (
                "log://./d?max_record_bytes=1024&max_queues=5",
                "./d",
                StoreConfig { max_record_bytes: 1024, max_queues: 5, ..d() },
            ),
            ("log://./d?token=abc", "./d", d()),
        ];
        for (url, dir, want) in table {
            let (got_dir, got) = parse_url(url).unwrap_or_else(|e| panic!("{url}: {e}"));
            assert_eq!(got_dir, PathBuf::from(dir), "{url}");
            assert_eq!(format!("{got:?}"), format!("{want:?}"), "{url}");
        }
    }

    #[test]
    fn bad_log_urls_are_errors_naming_the_problem() {
        for (url, needle) in [
            ("redis://h/0", "log://"),
            ("log://", "needs a directory"),
            ("log://./d?bogus=1", "bogus"),
            ("log://./d?partitions=0", "partitions"),
            ("log://./d?lease_timeout=soon", "lease_timeout"),
            ("log://./d?fsync=sometimes", "fsync"),
            ("log://./d?max_record_bytes=999999999999", "max_record_bytes"),
        ] {
            let e = parse_url(url).unwrap_err().to_string();
            assert!(e.contains(needle), "{url}: {e}");
        }
    }

    #[test]
    fn remote_tokens_are_read_as_written() {
        for (url, addr, token) in [
            ("log+tcp://h:7575", "h:7575", ""),
            ("log+tcp://h:7575/", "h:7575", ""),
            ("log+tcp://h:7575?token=abc", "h:7575", "abc"),
            ("log+tcp://[::1]:7575/?token=a+b/c==", "[::1]:7575", "a+b/c=="),
        ] {
            let (target, got) = parse_remote(url).unwrap().unwrap();
            assert!(matches!(target, remote::Target::Tcp(ref a, None) if a == addr), "{url}: {target:?}");
            assert_eq!(got, token, "{url}");
        }
    }
}

//! `redis://` (and `rediss://`): Kombu's list layout, so Python Celery sees the same queues, with a
//! reliable consume.
//!
//! - Publish: `LPUSH` of Kombu's envelope to the queue's priority bucket, an eta or countdown
//!   message too: it waits on its queue with its `eta` header, as Celery sends it, so a Python
//!   Celery worker sharing the queue runs it (Python's `celery purge` removes it too).
//! - ETA: a consumer that takes a message whose eta is ahead defers it
//!   ([`celery_core::Delivery::defer`]): one atomic step moves it from the `unacked` lease into the
//!   durable sorted set `_celery_rs.delayed.<queue>` (scored by its due time), and consumers of
//!   that queue move it back to its bucket by the server's clock when due. Nothing waits in a
//!   worker's memory, and a visibility timeout never duplicates it.
//! - Purge: the queue's buckets and its delayed set, in one `MULTI`.
//! - Wake-ups: every publish also `PUBLISH`es to the queue's wake-up channel; an idle consumer
//!   waits on one subscriber connection for all its queues and probes their lists once a second
//!   for what Python producers sent (`wake.rs`), so an idle worker's cost does not grow with its
//!   queues. Due ETA messages are found through one next-due index (`consumer.rs`).
//! - Consume: a Lua script takes up to N envelopes and records each in Kombu's `unacked` hash and
//!   `unacked_index` zset in the same step, so no message is ever only in a worker's memory.
//!   While a delivery is unsettled its lease is renewed; a worker that dies stops renewing and its
//!   messages are restored to their queues after `visibility_timeout` (default 3600 s), the
//!   same for Python workers' messages. What our own consumers hold comes back much sooner: each
//!   renews a heartbeat key (`worker_heartbeat`, 2 s) and tags its deliveries, and the others
//!   restore a holder's deliveries once its heartbeat is `worker_grace` (10 s) old (`holder.rs`).
//! - Connection loss: every loop retries with capped exponential backoff and logs it.
//!
//! Where things are: `url.rs`, `sentinel.rs` (the `sentinel://` URL and the question to the
//! sentinels), `connection.rs` (the connection every loop shares), `holder.rs` (our consumers'
//! heartbeats and the restore of a dead one's deliveries), `keys.rs` (Kombu's key
//! layout), `scripts.rs` (the Lua steps), `consumer.rs`, `wake.rs` (wake-ups of idle consumers),
//! `pubsub.rs` (subscriptions that outlive their connection), `settle.rs`, `error.rs` (redis
//! errors as ours); publishing, routing, broadcasts and leases here.
//!
//! URL options (query string): `visibility_timeout=SECONDS`, `global_keyprefix=PREFIX` (Kombu's
//! transport option of the same name); the redis client's own (`protocol`; `db`, `user`, `pass` on
//! unix sockets) and redis-py's `password=` (moved into the userinfo); Celery's connection options
//! listed in [`CELERY_COMPAT_OPTIONS`] are accepted with no effect; `min_replicas=N` and
//! `min_replicas_timeout=MS` ([`MinReplicas`]); `worker_heartbeat=SECONDS` and
//! `worker_grace=SECONDS` ([`worker_heartbeat`]). Any other option is an error.
//!
//! `sentinel://h1:26379;sentinel://h2:26379/0?master_name=NAME` ([`SentinelUrl`]) takes the same
//! options and connects to the master the sentinels name; every loop follows a failover through
//! [`RedisConn`] (`connection.rs`).
//!
//! `redis+cluster://h1:7001,h2:7002,h3:7003?shards=N` ([`ClusterUrl`], `cluster.rs`) runs on a
//! Redis Cluster: every key of a queue (and shard) carries one hash tag, so each step touches one
//! slot (`keys.rs`); with `shards=N` a producer spreads a queue's messages over N tags in turn and
//! a consumer takes from them in turn.
//!
//! ```no_run
//! # async fn demo() -> Result<(), celery_core::BrokerError> {
//! use broker_backends::redis::RedisBroker;
//! let broker = RedisBroker::connect("redis://127.0.0.1:6379/0?visibility_timeout=300").await?;
//! # Ok(()) }
//! ```

mod cluster;
mod connection;
mod consumer;
pub mod error;
pub mod history;
mod holder;
mod keys;
mod limits;
mod pubsub;
mod scripts;
mod sentinel;
mod settle;
mod url;
mod wake;

use std::ops::ControlFlow;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use celery_core::backoff::Reconnect;
use celery_core::capability::{Broadcasts, Documents, Leases, Routing};
use celery_core::flow::{FairQueues, FairnessWeights, FAIRNESS_KEY};
use celery_core::protocol::Message;
use celery_core::routing::{topic_matches, Binding, Exchange, ExchangeKind, Route};
use celery_core::sync::lock;
use celery_core::url::redacted;
use celery_core::{Broker, BrokerError, Consumer};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::AsyncCommands;

pub use cluster::{is_cluster, ClusterUrl, MAX_SEEDS, MAX_SHARDS};
pub use connection::{MinReplicas, RedisConn};
pub use consumer::{Acked, RedisConsumer};
pub use sentinel::SentinelUrl;
pub use url::{
    client_url, is_sentinel, min_replicas, worker_heartbeat, RedisOptions, CELERY_COMPAT_OPTIONS, DEFAULT_WORKER_GRACE,
    DEFAULT_WORKER_HEARTBEAT,
};

use crate::envelope;
use error::failed;
use holder::Holder;
use keys::{Keys, Scope, SEP};

/// Messages one [`Broker::peek`] returns at most.
const PEEK_MAX: usize = 1000;

/// A connection that reconnects by itself (3 quick retries of a command, then errors until the
/// server is back); `response_timeout` bounds each reply (`None` for blocking commands).
pub(crate) async fn manager(
    client: &redis::Client,
    response_timeout: Option<Duration>,
) -> Result<ConnectionManager, BrokerError> {
    let cfg = ConnectionManagerConfig::new()
        .set_response_timeout(response_timeout)
        .set_connection_timeout(Some(Duration::from_secs(5)))
        .set_number_of_retries(3)
        .set_max_delay(Duration::from_secs(2));
    client.get_connection_manager_with_config(cfg).await.map_err(failed("redis: connect"))
}

/// The Redis broker.
#[derive(Clone)]
pub struct RedisBroker {
    conn: RedisConn,
    keys: Keys,
    options: RedisOptions,
    /// The worker's name ([`Broker::set_worker_name`]), the holder of what it consumes.
    worker: Arc<OnceLock<String>>,
    /// Registered at the first consume; shared by every consumer of this broker and its clones.
    holder: Arc<tokio::sync::OnceCell<Arc<Holder>>>,
    /// Counts this producer's messages: the shard of the next one (`shards=N` on a cluster).
    next_shard: Arc<AtomicU64>,
    /// Where the key-slot sweep goes on in the parked-list index (an `SSCAN` cursor), so that every
    /// parked list is looked at within a bounded number of sweeps, however many there are.
    sweep_cursor: Arc<AtomicU64>,
    /// The monitor's task history (`redis/history.rs`).
    history: history::RedisHistory,
    /// The weights of fairness keys its consumers take with ([`FairQueues`]).
    fairness: Arc<Mutex<Arc<FairnessWeights>>>,
}

impl std::fmt::Debug for RedisBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisBroker")
            .field("url", &redacted(&self.options.url))
            .field("options", &self.options.visibility_timeout)
            .finish()
    }
}

impl RedisBroker {
    /// Connects (the first connection must succeed; later losses are retried). A `sentinel://`
    /// URL connects to the master the sentinels name and follows it over failovers; a
    /// `redis+cluster://` URL to the cluster its seed nodes belong to.
    pub async fn connect(url: &str) -> Result<RedisBroker, BrokerError> {
        let options = RedisOptions::parse(url)?;
        let conn = RedisConn::connect(options.target()?, options.min_replicas, Some(Duration::from_secs(30))).await?;
        Ok(RedisBroker {
            history: history::RedisHistory::new(conn.clone(), &options.key_prefix),
            conn,
            keys: Keys::new(&options.key_prefix, options.cluster.as_ref().map(|c| c.shards)).in_db(options.db),
            options,
            worker: Arc::default(),
            holder: Arc::default(),
            next_shard: Arc::default(),
            sweep_cursor: Arc::default(),
            fairness: Arc::default(),
        })
    }

    /// The holder every consumer of this broker leases under, registered (and its heartbeat
    /// started) on first use; on a cluster its heartbeat also lives in the scopes of `queues`.
    async fn holder(&self, queues: &[String]) -> Result<Arc<Holder>, BrokerError> {
        let groups = consumer::groups_of(&self.keys, queues);
        let holder = self
            .holder
            .get_or_try_init(|| {
                Holder::start(
                    holder::RedisBeat::new(self.conn.clone(), self.keys.clone(), groups.clone()),
                    self.worker.get().map(String::as_str),
                    self.options.worker_heartbeat,
                    self.options.worker_grace,
                )
            })
            .await?;
        holder.broker().adopt(holder.id(), groups).await;
        Ok(holder.clone())
    }

    /// The shard the next message goes to (round robin; 0 but with `shards=N` on a cluster).
    fn next_shard(&self) -> u16 {
        let shards = u64::from(self.keys.shards());
        if shards == 1 {
            return 0;
        }
        (self.next_shard.fetch_add(1, Ordering::Relaxed) % shards) as u16
    }

    /// The connection in use (it follows Sentinel failovers).
    pub fn connection(&self) -> &RedisConn {
        &self.conn
    }

    /// The options in force.
    pub fn options(&self) -> &RedisOptions {
        &self.options
    }

    /// The queues `route` leads to: the routing key on the default exchange, else Kombu's bindings.
    async fn resolve(&self, route: &Route) -> Result<Vec<String>, BrokerError> {
        if route.exchange.is_empty() {
            return Ok(vec![route.routing_key.clone()]);
        }
        let mut conn = self.conn.clone();
        let members: Vec<String> = conn
            .smembers(self.keys.binding(&route.exchange))
            .await
            .map_err(failed("redis: read an exchange's bindings"))?;
        let mut queues = Vec::new();
        for m in members {
            let parts: Vec<&str> = m.split(SEP).collect();
            if let [key, pattern, queue] = parts[..] {
                let pat = if pattern.is_empty() { key } else { pattern };
                if pat == route.routing_key || topic_matches(pat, &route.routing_key) {
                    queues.push(queue.to_owned());
                }
            }
        }
        if queues.is_empty() {
            let what =
                format!("no queue is bound to exchange `{}` for routing key `{}`", route.exchange, route.routing_key);
            if route.mandatory {
                return Err(BrokerError::operation(format!("unroutable (mandatory) publish: {what}")));
            }
            tracing::warn!("redis: unroutable publish dropped: {what}");
        }
        Ok(queues)
    }

    /// `LPUSH` to the priority bucket of `queue`'s `shard`, whatever the message's eta: an eta
    /// message waits on its queue with its `eta` header as Celery sends it (a worker that takes
    /// it early defers it), then `PUBLISH` to the queue's wake-up channel, which wakes its idle
    /// consumers ([`wake`]). The pipeline of the queue's scope is used (one slot each on a
    /// cluster; on one server every queue shares one).
    fn add_publish(
        &self,
        pipes: &mut Vec<(Scope, redis::Pipeline)>,
        queue: &str,
        shard: u16,
        route: &Route,
        msg: &Message,
    ) -> Result<(), BrokerError> {
        self.keys.check_queue(queue)?;
        let scope = self.keys.scope(queue, shard);
        let pipe = match pipes.iter().position(|(s, _)| *s == scope) {
            Some(i) => &mut pipes[i].1,
            None => {
                pipes.push((scope, redis::pipe()));
                &mut pipes.last_mut().expect("just pushed").1
            }
        };
        let env = envelope::encode(msg, &route.exchange, queue);
        let step = envelope::bucket_of(envelope::kombu_priority(msg));
        match msg.headers.extra.get(FAIRNESS_KEY).and_then(serde_json::Value::as_str) {
            // To its key's line, the key joining the queue's ring (`scripts::FAIR_FN`).
            Some(key) if !self.keys.is_cluster() => {
                pipe.cmd("EVAL")
                    .arg(scripts::publish_fair())
                    .arg(0)
                    .arg(self.keys.prefix())
                    .arg(queue)
                    .arg(env)
                    .arg(key)
                    .arg(step)
                    .ignore();
            }
            _ => {
                pipe.lpush(self.keys.bucket(queue, shard, step), env).ignore();
            }
        }
        pipe.publish(self.keys.wake(queue, shard), "").ignore();
        Ok(())
    }

    /// Publishes `msg` to the queues `route` leads to, into their `shard`.
    async fn publish_to(&self, route: &Route, msg: &Message, shard: u16) -> Result<(), BrokerError> {
        let queues = self.resolve(route).await?;
        if queues.is_empty() {
            return Ok(());
        }
        let mut pipes = Vec::new();
        for q in &queues {
            self.add_publish(&mut pipes, q, shard, route, msg)?;
        }
        self.write_all(pipes, "redis: publish").await
    }

    /// The [`scripts::fair_lines`] step on `queue`'s keyed lines (`op`: `len`, `purge`, `peek`).
    fn fair_lines(&self, queue: &str, op: &str, max: usize) -> redis::Cmd {
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(scripts::fair_lines()).arg(0).arg(self.keys.prefix()).arg(queue).arg(op).arg(max);
        cmd
    }

    /// Sends each scope's pipeline (a write each).
    async fn write_all(&self, pipes: Vec<(Scope, redis::Pipeline)>, context: &'static str) -> Result<(), BrokerError> {
        for (_, pipe) in pipes {
            self.conn.write(pipe, context).await?;
        }
        Ok(())
    }
}

#[async_trait]
impl Broker for RedisBroker {
    fn kind(&self) -> &'static str {
        "redis"
    }

    async fn publish(&self, route: &Route, msg: &Message) -> Result<(), BrokerError> {
        self.publish_to(route, msg, self.next_shard()).await
    }

    async fn publish_batch(&self, batch: &[(Route, Message)]) -> Result<(), BrokerError> {
        for chunk in batch.chunks(2000) {
            let mut pipes = Vec::new();
            for (route, msg) in chunk {
                let shard = self.next_shard();
                for q in self.resolve(route).await? {
                    self.add_publish(&mut pipes, &q, shard, route, msg)?;
                }
            }
            self.write_all(pipes, "redis: publish a batch").await?;
        }
        Ok(())
    }

    async fn consume(&self, queues: &[String], prefetch: usize) -> Result<Box<dyn Consumer>, BrokerError> {
        self.consume_capped(queues, prefetch, usize::MAX).await
    }

    /// Oversized envelopes are dead-lettered by the fetch script itself: their bodies never leave Redis.
    async fn consume_capped(
        &self,
        queues: &[String],
        prefetch: usize,
        max_message_size: usize,
    ) -> Result<Box<dyn Consumer>, BrokerError> {
        for q in queues {
            self.keys.check_queue(q)?;
        }
        let c = RedisConsumer::start(
            self.conn.clone(),
            self.keys.clone(),
            self.holder(queues).await?,
            &self.options,
            queues,
            prefetch,
            max_message_size,
            lock(&self.fairness).clone(),
        );
        Ok(Box::new(c))
    }

    /// Deletes the queue's priority buckets and its delayed set (`_celery_rs.delayed.<queue>`) in
    /// one `MULTI` (per shard on a cluster); leased (unacked) messages stay.
    async fn purge(&self, queue: &str) -> Result<u64, BrokerError> {
        self.keys.check_queue(queue)?;
        let mut total = 0;
        for shard in 0..self.keys.shards() {
            let mut pipe = redis::pipe();
            let mut keys: Vec<String> = self.keys.buckets(queue, shard).to_vec();
            keys.push(self.keys.delayed(queue, shard));
            for k in &keys[..4] {
                pipe.llen(k);
            }
            pipe.zcard(&keys[4]);
            pipe.del(&keys).ignore();
            if !self.keys.is_cluster() {
                pipe.add_command(self.fair_lines(queue, "purge", 0));
            }
            let mut conn = self.conn.clone();
            let counts: Vec<u64> = pipe.atomic().query_async(&mut conn).await.map_err(failed("redis: purge"))?;
            total += counts.iter().sum::<u64>();
        }
        Ok(total)
    }

    async fn queue_len(&self, queue: &str) -> Result<u64, BrokerError> {
        self.keys.check_queue(queue)?;
        let mut total = 0;
        for shard in 0..self.keys.shards() {
            let mut pipe = redis::pipe();
            for k in self.keys.buckets(queue, shard) {
                pipe.llen(k);
            }
            if !self.keys.is_cluster() {
                pipe.add_command(self.fair_lines(queue, "len", 0));
            }
            let mut conn = self.conn.clone();
            let counts: Vec<u64> = pipe.query_async(&mut conn).await.map_err(failed("redis: queue length"))?;
            total += counts.iter().sum::<u64>();
        }
        Ok(total)
    }

    /// `LRANGE` of the oldest end of each priority bucket, in the order a consumer takes them
    /// (shard after shard on a cluster). Kombu pushes with `LPUSH` and takes with `RPOP`, so the
    /// oldest are the list's tail: the last `max` elements, reversed. Nothing moves, so nothing is
    /// leased or counted.
    async fn peek(
        &self,
        queue: &str,
        max: usize,
    ) -> Result<Vec<Result<Message, celery_core::ProtocolError>>, BrokerError> {
        let max = max.min(PEEK_MAX);
        if max == 0 {
            return Ok(Vec::new());
        }
        self.keys.check_queue(queue)?;
        let mut out = Vec::new();
        for shard in 0..self.keys.shards() {
            let mut pipe = redis::pipe();
            for k in self.keys.buckets(queue, shard) {
                pipe.lrange(k, -(max as isize), -1);
            }
            let mut conn = self.conn.clone();
            let buckets: Vec<Vec<Vec<u8>>> = pipe.query_async(&mut conn).await.map_err(failed("redis: peek"))?;
            out.extend(buckets.into_iter().flat_map(|b| b.into_iter().rev()).take(max - out.len()));
            if out.len() >= max {
                break;
            }
        }
        if out.len() < max && !self.keys.is_cluster() {
            let mut conn = self.conn.clone();
            let keyed: Vec<Vec<u8>> = self
                .fair_lines(queue, "peek", max - out.len())
                .query_async(&mut conn)
                .await
                .map_err(failed("redis: peek"))?;
            out.extend(keyed);
        }
        Ok(out.into_iter().map(|raw| envelope::decode(&raw).message).collect())
    }

    /// The holder name of this broker's consumers: a restart under the same name restores what
    /// the earlier run held at once (`holder.rs`). Only the first name given counts.
    fn set_worker_name(&self, name: &str) {
        if self.worker.set(name.to_owned()).is_err() && self.worker.get().is_some_and(|w| w != name) {
            tracing::debug!(name, "redis: this broker consumes under its first worker name already");
        }
    }

    celery_core::offers!(routing, broadcasts, leases, documents, rate_buckets);

    fn history(&self) -> Option<&dyn celery_core::history::History> {
        Some(&self.history)
    }

    /// Not on a Redis Cluster: a key's slots, its parked lists and its queues' buckets would be in
    /// different slots, which one script cannot touch.
    fn key_slots(&self) -> Option<&dyn celery_core::flow::KeySlots> {
        (!self.keys.is_cluster()).then_some(self)
    }

    /// Not on a Redis Cluster: a key's line and its queue's ring are built by the scripts, which
    /// on a cluster may touch only the keys they are passed.
    fn fair_queues(&self) -> Option<&dyn FairQueues> {
        (!self.keys.is_cluster()).then_some(self)
    }
}
#[async_trait]
impl Routing for RedisBroker {
    /// Direct and topic exchanges live in Kombu's binding sets; fanout (Kombu uses at-most-once
    /// PUB/SUB for it) and headers exchanges are not offered on Redis.
    async fn declare_exchange(&self, name: &str, kind: ExchangeKind) -> Result<(), BrokerError> {
        match kind {
            ExchangeKind::Direct | ExchangeKind::Topic => Ok(()),
            other => {
                Err(BrokerError::Unsupported { broker: "redis", option: format!("{other:?} exchanges (`{name}`)") })
            }
        }
    }

    /// Adds `binding_key \x06\x16 "" \x06\x16 queue` to Kombu's `_kombu.binding.<exchange>` set.
    async fn bind(&self, binding: &Binding) -> Result<(), BrokerError> {
        if !binding.headers.is_empty() {
            return Err(BrokerError::Unsupported { broker: "redis", option: "headers bindings".into() });
        }
        let mut conn = self.conn.clone();
        let member = format!("{}{SEP}{SEP}{}", binding.routing_key, binding.queue);
        let _: () =
            conn.sadd(self.keys.binding(&binding.exchange), member).await.map_err(failed("redis: bind a queue"))?;
        Ok(())
    }
}

#[async_trait]
impl Broadcasts for RedisBroker {
    /// As Kombu does it: fanout and topic broadcasts are `PUBLISH /<db>.<exchange>[/<routing key>]`
    /// (Celery's events and control requests); direct ones go to the lists bound to the exchange
    /// (Celery's control replies), never sharded: their reader waits on one list.
    async fn broadcast(&self, exchange: &Exchange, routing_key: &str, msg: &Message) -> Result<(), BrokerError> {
        if exchange.kind == ExchangeKind::Direct {
            return self.publish_to(&Route::exchange(exchange.name.clone(), routing_key), msg, 0).await;
        }
        let mut conn = self.conn.clone();
        let env = envelope::encode(msg, &exchange.name, routing_key);
        let channel = self.keys.fanout(self.options.db, &exchange.name, routing_key);
        if self.keys.is_cluster() {
            // A cluster routes `PUBLISH` by its channel's slot, and passes it on to every node:
            // channels on different nodes would reach a subscriber out of order (a task's
            // `task-succeeded` before its `task-received`). So every broadcast of this process
            // leaves through one node, in order.
            let cmd = redis::cmd("PUBLISH").arg(channel).arg(env).to_owned();
            let via = self.keys.broadcast_route();
            return self.conn.command_via(&via, cmd).await.map(drop).map_err(failed("redis: broadcast"));
        }
        let _: i64 = conn.publish(channel, env).await.map_err(failed("redis: broadcast"))?;
        Ok(())
    }

    /// Fanout and topic: `PSUBSCRIBE /<db>.<exchange>[/<pattern>]` (`#` becomes `*`, as in Kombu).
    /// Direct: a list `<routing key>.<exchange>` bound to the exchange, read until the subscription
    /// is dropped, then unbound and deleted.
    async fn subscribe(
        &self,
        exchange: &Exchange,
        pattern: &str,
    ) -> Result<Box<dyn celery_core::broker::Subscription>, BrokerError> {
        use celery_core::broker::{Broadcast, ChannelSubscription};
        let (tx, rx) = tokio::sync::mpsc::channel(1024);
        if exchange.kind == ExchangeKind::Direct {
            let queue = format!("{pattern}.{}", exchange.name);
            let member = format!("{pattern}{SEP}{SEP}{queue}");
            let (binding, list) = (self.keys.binding(&exchange.name), self.keys.bucket(&queue, 0, 0));
            let mut conn = self.conn.clone();
            let _: i64 = conn.sadd(&binding, &member).await.map_err(failed("redis: bind a subscription's queue"))?;
            let mut reader = self.conn.fresh(Some(Duration::from_secs(10))).await?;
            let key = pattern.to_owned();
            let feeder = tokio::spawn(async move {
                let _cleanup = Unbind { conn, binding, member, list: list.clone() };
                let mut backoff = Reconnect::default();
                loop {
                    let got: Option<(String, Vec<u8>)> = match reader.brpop(&list, 1.0).await {
                        Ok(v) => {
                            backoff.reset();
                            v
                        }
                        Err(e) => {
                            backoff.pause("redis: read a subscription", &e).await;
                            continue;
                        }
                    };
                    let Some(body) = got.and_then(|(_, env)| envelope::body_of(&env)) else { continue };
                    if tx.send(Broadcast { routing_key: key.clone(), body }).await.is_err() {
                        return;
                    }
                }
            });
            return Ok(Box::new(ChannelSubscription::new(rx, Some(feeder))));
        }
        let channel = self.keys.fanout(self.options.db, &exchange.name, &pattern.replace('#', "*"));
        let channels = pubsub::Channels { names: Vec::new(), patterns: vec![channel] };
        let first = pubsub::subscribe(&self.conn, &channels).await.map_err(failed("redis: subscribe"))?;
        let prefix_len = self.keys.fanout(self.options.db, &exchange.name, "").len() + 1;
        // A lost subscriber connection subscribes again, on the master the sentinels name then.
        let feeder = tokio::spawn(pubsub::follow(self.conn.clone(), channels, Some(first), "broadcast", move |m| {
            let tx = tx.clone();
            async move {
                let Some(m) = m else {
                    return if tx.is_closed() { ControlFlow::Break(()) } else { ControlFlow::Continue(()) };
                };
                let routing_key = m.get_channel_name().get(prefix_len..).unwrap_or_default().to_owned();
                let Some(body) = envelope::body_of(m.get_payload_bytes()) else { return ControlFlow::Continue(()) };
                match tx.send(Broadcast { routing_key, body }).await {
                    Ok(()) => ControlFlow::Continue(()),
                    Err(_) => ControlFlow::Break(()),
                }
            }
        }));
        Ok(Box::new(ChannelSubscription::new(rx, Some(feeder))))
    }
}

#[async_trait]
impl Leases for RedisBroker {
    async fn lease(&self, name: &str, holder: &str, ttl: Duration) -> Result<bool, BrokerError> {
        let mut conn = self.conn.clone();
        let held: i64 = scripts::lease()
            .key(self.keys.lease(name))
            .arg(holder)
            .arg(celery_core::clock::millis(celery_core::clock::ttl(ttl)).max(1))
            .invoke_async(&mut conn)
            .await
            .map_err(failed("redis: take a lease"))?;
        Ok(held == 1)
    }

    async fn release(&self, name: &str, holder: &str) -> Result<(), BrokerError> {
        let mut conn = self.conn.clone();
        let _: i64 = scripts::release()
            .key(self.keys.lease(name))
            .arg(holder)
            .invoke_async(&mut conn)
            .await
            .map_err(failed("redis: release a lease"))?;
        Ok(())
    }
}

#[async_trait]
impl Documents for RedisBroker {
    async fn load_doc(&self, key: &str) -> Result<Option<Vec<u8>>, BrokerError> {
        let mut conn = self.conn.clone();
        conn.get(self.keys.doc(key)).await.map_err(failed("redis: load a document"))
    }

    async fn store_doc(&self, key: &str, doc: &[u8]) -> Result<(), BrokerError> {
        let mut conn = self.conn.clone();
        conn.set(self.keys.doc(key), doc).await.map_err(failed("redis: store a document"))
    }
}

/// Removes a direct subscription's binding and list when its reader stops.
struct Unbind {
    conn: RedisConn,
    binding: String,
    member: String,
    list: String,
}

impl Drop for Unbind {
    fn drop(&mut self) {
        let (mut conn, binding, member, list) =
            (self.conn.clone(), self.binding.clone(), self.member.clone(), self.list.clone());
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let _: Result<i64, _> = conn.srem(&binding, &member).await;
                let _: Result<i64, _> = conn.del(&list).await;
            });
        }
    }
}

impl RedisBroker {
    /// Messages held for a later eta in `queue` (every shard).
    pub async fn delayed_len(&self, queue: &str) -> Result<u64, BrokerError> {
        let mut conn = self.conn.clone();
        let mut total = 0;
        for shard in 0..self.keys.shards() {
            let n: u64 =
                conn.zcard(self.keys.delayed(queue, shard)).await.map_err(failed("redis: count delayed messages"))?;
            total += n;
        }
        Ok(total)
    }

    /// Unacknowledged (leased) messages, over all queues. On a cluster, where leases are kept per
    /// queue, this is [`RedisBroker::unacked_len_of`] of no queue: refused.
    pub async fn unacked_len(&self) -> Result<u64, BrokerError> {
        if self.keys.is_cluster() {
            return Err(BrokerError::Unsupported {
                broker: "redis",
                option: "unacked_len over all queues on a cluster (leases are kept per queue: unacked_len_of)".into(),
            });
        }
        self.unacked_len_of("").await
    }

    /// Unacknowledged (leased) messages in the lease set `queue` uses: on one server Kombu's global
    /// one (every queue), on a cluster `queue`'s own (its shards and dead-letter queues).
    pub async fn unacked_len_of(&self, queue: &str) -> Result<u64, BrokerError> {
        let mut conn = self.conn.clone();
        let mut total = 0;
        let shards = if self.keys.is_cluster() { self.keys.shards() } else { 1 };
        for shard in 0..shards {
            let n: u64 = conn
                .hlen(self.keys.scope(queue, shard).unacked())
                .await
                .map_err(failed("redis: count unacked messages"))?;
            total += n;
        }
        Ok(total)
    }

    /// The key of priority bucket `step` (0, 3, 6 or 9) of `queue`'s `shard` (0 but with `shards=N`
    /// on a cluster): for tools and tests that look at the layout.
    pub fn bucket_key(&self, queue: &str, shard: u16, step: u8) -> String {
        self.keys.bucket(queue, shard, step)
    }
}

celery_core::register_broker!("redis", "rediss", "sentinel", "redis+cluster" => RedisBroker::connect);

/// The weights travel with each fetch (`scripts::fetch`), so each consumer serves by its own.
impl FairQueues for RedisBroker {
    fn set_fairness_weights(&self, weights: FairnessWeights) {
        *lock(&self.fairness) = Arc::new(weights);
    }
}

//! The reliable Redis consumer: the leased fetch (a Lua script that takes envelopes and records
//! each in Kombu's `unacked` hash in one step), the wait for new messages, and the background
//! loops: lease renewal, restore of leases past the visibility timeout (the heartbeat sweep in
//! [`super::holder`] restores a dead worker of ours sooner), and promotion of due ETA messages. The
//! shell (prefetch, reconnect pauses, batched acks, close) is [`crate::consumer`]'s; settling is in
//! [`super::settle`].

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use celery_core::broker::{dead_letter_queue, Settled};
use celery_core::protocol::lenient_task_id;
use celery_core::sync::lock;
use celery_core::{Delivery, ProtocolError};
use futures::future::select_all;
use redis::Script;
use tokio::sync::mpsc;

use super::connection::RedisConn;
use super::error::{broker_error, failed};
use super::holder::Holder;
use super::keys::{Keys, STEPS};
use super::settle::RedisSettle;
use super::{scripts, RedisOptions};
use crate::consumer::{ack_queue, AckQueue, Fetch, Fetched, FetchingConsumer, Slots};
use crate::envelope;

/// A consumer of some Redis queues: acks carry the delivery's tag in Kombu's `unacked` hash.
pub type RedisConsumer = FetchingConsumer<String>;

/// How many envelopes one fetch may take at most (measured: larger replies cost more to parse than
/// the round trips they save).
const MAX_FETCH: usize = 64;
/// How many acks one round trip carries at most.
const MAX_ACK_BATCH: usize = 2048;

fn now_secs() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

/// What the fetcher, the settlers and the background loops share.
#[derive(Debug)]
pub(super) struct Shared {
    pub(super) conn: RedisConn,
    pub(super) keys: Keys,
    /// The tags of unsettled deliveries (renewed until settled).
    leases: Mutex<HashSet<String>>,
    slots: Slots,
    pub(super) acks: AckQueue<String>,
    /// Whose heartbeat vouches for these leases (see [`super::holder`]).
    pub(super) holder: Arc<Holder>,
    /// The holder's `held` set.
    pub(super) held: String,
}

impl Shared {
    /// Forgets the lease `tag` and frees its prefetch slot.
    pub(super) fn release(&self, tag: &str) {
        lock(&self.leases).remove(tag);
        self.slots.give_back(1);
    }

    fn lease_snapshot(&self) -> Vec<String> {
        lock(&self.leases).iter().cloned().collect()
    }
}

impl RedisConsumer {
    /// Starts consuming `queues` (priority first across all of them, then queue order).
    pub(super) fn start(
        conn: RedisConn,
        keys: Keys,
        holder: Arc<Holder>,
        options: &RedisOptions,
        queues: &[String],
        prefetch: usize,
        max_message_size: usize,
    ) -> RedisConsumer {
        let prefetch = prefetch.max(1);
        let (acks, batcher) = ack_queue();
        let shared = Arc::new(Shared {
            conn: conn.clone(),
            keys: keys.clone(),
            leases: Mutex::new(HashSet::new()),
            slots: Slots::new(prefetch),
            acks: acks.clone(),
            held: keys.held(holder.id()),
            holder,
        });
        let mut lists = Vec::new();
        for step in STEPS {
            for q in queues {
                lists.push((keys.bucket(q, step), q.clone()));
            }
        }
        let waker =
            Waker { base: conn.clone(), keys: lists.iter().map(|(k, _)| k.clone()).collect(), conns: Vec::new() };
        let fetch = RedisFetch {
            shared: shared.clone(),
            lists,
            waker,
            script: scripts::fetch(),
            tag_prefix: format!("{}.", uuid::Uuid::new_v4().simple()),
            seq: 0,
            conn: conn.clone(),
            max_message_size,
        };
        let vt = options.visibility_timeout;
        let ack_keys = keys.clone();
        let ack_conn = conn.clone();
        let held = shared.held.clone();
        // Acks are retried whatever failed: a batch is only given up when the consumer is dropped.
        let ack = batcher.run(
            "redis",
            MAX_ACK_BATCH,
            |_| true,
            move |tags: &[String]| {
                let mut pipe = redis::pipe();
                pipe.atomic()
                    .hdel(ack_keys.unacked(), tags)
                    .ignore()
                    .zrem(ack_keys.unacked_index(), tags)
                    .ignore()
                    .srem(&held, tags)
                    .ignore();
                let mut conn = ack_conn.clone();
                async move { pipe.query_async::<()>(&mut conn).await.map_err(failed("redis: ack")) }
            },
        );
        let background = vec![
            tokio::spawn(ack),
            tokio::spawn(renew_loop(shared.clone(), vt)),
            tokio::spawn(restore_loop(conn.clone(), keys.clone(), vt)),
            tokio::spawn(promote_loop(conn, keys, queues.to_vec())),
        ];
        FetchingConsumer::spawn(prefetch, fetch, acks, background)
    }
}

/// Blocks until one of the lists has an element, without taking it (`BLMOVE k k RIGHT RIGHT`).
struct Waker {
    base: RedisConn,
    keys: Vec<String>,
    conns: Vec<RedisConn>,
}

impl Waker {
    async fn wait(&mut self, max: Duration) {
        if self.conns.is_empty() {
            for _ in &self.keys {
                match self.base.fresh(None).await {
                    Ok(c) => self.conns.push(c),
                    Err(e) => {
                        tracing::warn!(error = %e, "redis: cannot open a wait connection; polling instead");
                        self.conns.clear();
                        tokio::time::sleep(max.min(Duration::from_millis(100))).await;
                        return;
                    }
                }
            }
        }
        let secs = max.as_secs_f64().max(0.01);
        let waits = self.keys.iter().zip(self.conns.iter()).map(|(k, c)| {
            let mut c = c.clone();
            let cmd = redis::cmd("BLMOVE").arg(k).arg(k).arg("RIGHT").arg("RIGHT").arg(secs).to_owned();
            Box::pin(async move { cmd.query_async::<Option<Vec<u8>>>(&mut c).await })
        });
        let (res, _, _) = select_all(waits).await;
        if let Err(e) = res {
            tracing::warn!(error = %e, "redis: wait for messages failed");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// The Redis part of the fetcher: the fetch script over every bucket list.
struct RedisFetch {
    shared: Arc<Shared>,
    /// (bucket list, its queue), in the order they are taken from.
    lists: Vec<(String, String)>,
    waker: Waker,
    script: Script,
    tag_prefix: String,
    /// The sequence number of the next tag.
    seq: u64,
    conn: RedisConn,
    max_message_size: usize,
}

impl RedisFetch {
    /// The delivery of an envelope the script dead-lettered unread (it holds no lease nor slot).
    fn oversized(&self, chunk: &[redis::Value], size: i64) -> Delivery {
        let queue = redis::from_redis_value_ref::<usize>(&chunk[0])
            .map(|i| self.lists[i.min(self.lists.len() - 1)].1.clone())
            .unwrap_or_default();
        let size = usize::try_from(size).unwrap_or(usize::MAX);
        let limit = self.max_message_size;
        tracing::warn!(%queue, size, limit, "redis: oversized message dead-lettered unread");
        let too_large = ProtocolError::TooLarge { size, limit };
        let id = redis::from_redis_value_ref::<String>(&chunk[2]).ok().filter(|id| !id.is_empty());
        let message = Err(match lenient_task_id(&serde_json::json!({ "id": id })) {
            Some(id) => ProtocolError::InvalidHeaders { id, task: None, reply_to: None, error: Box::new(too_large) },
            None => too_large,
        });
        Delivery::new(message, queue, false, Box::new(Settled)).with_size(size)
    }
}

impl Fetch for RedisFetch {
    const BROKER: &'static str = "redis";
    const MAX_FETCH: usize = MAX_FETCH;

    fn slots(&self) -> &Slots {
        &self.shared.slots
    }

    async fn fetch(&mut self, n: usize, tx: &mpsc::Sender<Delivery>) -> Fetched {
        let keys = &self.shared.keys;
        let mut inv = self.script.prepare_invoke();
        inv.key(keys.unacked()).key(keys.unacked_index()).key(&self.shared.held).key(keys.workers());
        for (k, _) in &self.lists {
            inv.key(k);
        }
        for (_, q) in &self.lists {
            inv.key(keys.bucket(&dead_letter_queue(q), 0));
        }
        inv.arg(now_secs()).arg(n).arg(&self.tag_prefix).arg(self.seq).arg(self.max_message_size);
        inv.arg(self.shared.holder.id());
        // Read before the fetch runs: a lapse noticed after it means these may have been restored.
        let epoch = self.shared.holder.liveness().epoch();
        for (_, q) in &self.lists {
            inv.arg(q);
        }
        let items: Vec<redis::Value> = match inv.invoke_async(&mut self.conn).await {
            Ok(v) => v,
            Err(e) => return Fetched::Failed { taken: 0, error: broker_error("redis: fetch", e) },
        };
        // Dead-lettered ones hold no lease nor prefetch slot.
        let oversized = items.chunks_exact(3).filter(|c| matches!(c[1], redis::Value::Int(_))).count();
        let got = items.len() / 3 - oversized;
        self.seq += got as u64;
        for chunk in items.chunks_exact(3) {
            if let redis::Value::Int(size) = chunk[1] {
                if tx.send(self.oversized(chunk, size)).await.is_err() {
                    return Fetched::Closed;
                }
                continue;
            }
            let (Ok(idx), Ok(env), Ok(tag)) = (
                redis::from_redis_value_ref::<usize>(&chunk[0]),
                redis::from_redis_value_ref::<Vec<u8>>(&chunk[1]),
                redis::from_redis_value_ref::<String>(&chunk[2]),
            ) else {
                tracing::error!("redis: fetch script returned an unexpected reply");
                continue;
            };
            let (list_key, queue) = self.lists[idx.min(self.lists.len() - 1)].clone();
            lock(&self.shared.leases).insert(tag.clone());
            let decoded = envelope::decode(&env);
            let size = env.len();
            let settle = RedisSettle::new(self.shared.clone(), tag, epoch, env, list_key, queue.clone());
            let d = Delivery::new(decoded.message, queue, decoded.redelivered, Box::new(settle)).with_size(size);
            if tx.send(d).await.is_err() {
                return Fetched::Closed;
            }
        }
        Fetched::Sent { taken: got, drained: got == 0 }
    }

    async fn idle(&mut self) {
        self.waker.wait(Duration::from_secs(1)).await;
    }
}

async fn renew_loop(shared: Arc<Shared>, vt: Duration) {
    let every = (vt / 4).clamp(Duration::from_millis(100), Duration::from_secs(300));
    let mut conn = shared.conn.clone();
    loop {
        tokio::time::sleep(every).await;
        let tags = shared.lease_snapshot();
        for chunk in tags.chunks(1000) {
            let now = now_secs();
            let mut cmd = redis::cmd("ZADD");
            cmd.arg(shared.keys.unacked_index()).arg("XX");
            for t in chunk {
                cmd.arg(now).arg(t);
            }
            if let Err(e) = cmd.query_async::<()>(&mut conn).await {
                tracing::warn!(error = %e, "redis: lease renewal failed; will retry");
            }
        }
    }
}

async fn restore_loop(mut conn: RedisConn, keys: Keys, vt: Duration) {
    let every = (vt / 4).clamp(Duration::from_millis(100), Duration::from_secs(60));
    let script = scripts::restore();
    loop {
        let cutoff = now_secs() - vt.as_secs_f64();
        let r: Result<u64, _> = script
            .key(keys.unacked())
            .key(keys.unacked_index())
            .arg(cutoff)
            .arg(1000)
            .arg(keys.prefix())
            .invoke_async(&mut conn)
            .await;
        match r {
            Ok(0) => tokio::time::sleep(every).await,
            Ok(n) => tracing::warn!(restored = n, "redis: restored messages whose worker stopped renewing its lease"),
            Err(e) => {
                tracing::warn!(error = %e, "redis: restore sweep failed; will retry");
                tokio::time::sleep(every).await;
            }
        }
    }
}

async fn promote_loop(mut conn: RedisConn, keys: Keys, queues: Vec<String>) {
    let script = scripts::promote();
    let cap = Duration::from_millis(250);
    loop {
        let mut wait = cap;
        for q in &queues {
            let r: Result<(u64, i64), _> =
                script.key(keys.delayed(q)).arg(1000).arg(keys.prefix()).arg(q).invoke_async(&mut conn).await;
            match r {
                Ok((moved, next)) => {
                    if moved > 0 {
                        tracing::debug!(queue = %q, moved, "redis: delayed messages are due");
                        wait = Duration::ZERO;
                    } else if next >= 0 {
                        wait = wait.min(Duration::from_millis(next as u64));
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, queue = %q, "redis: promoting delayed messages failed; will retry")
                }
            }
        }
        tokio::time::sleep(wait).await;
    }
}

//! The reliable Redis consumer: the leased fetch (a Lua script that takes envelopes and records
//! each in Kombu's `unacked` hash in one step), the wait for new messages, and the background
//! loops: lease renewal, restore of leases past the visibility timeout (the heartbeat sweep in
//! [`super::holder`] restores a dead worker of ours sooner), and promotion of due ETA messages. The
//! shell (prefetch, reconnect pauses, batched acks, close) is [`crate::consumer`]'s; settling is in
//! [`super::settle`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use celery_core::broker::{dead_letter_queue, Settled};
use celery_core::flow::FairnessWeights;
use celery_core::protocol::lenient_task_id;
use celery_core::sync::lock;
use celery_core::{Delivery, ProtocolError};
use futures::future::select_all;
use redis::Script;
use tokio::sync::mpsc;

use super::connection::RedisConn;
use super::error::{broker_error, failed};
use super::holder::Holder;
use super::keys::{Keys, Scope, STEPS};
use super::settle::RedisSettle;
use super::{scripts, RedisOptions};
use crate::consumer::{ack_queue, AckQueue, Fetch, Fetched, FetchingConsumer, Slots};
use crate::envelope;

/// A consumer of some Redis queues: an ack carries the delivery's tag and its [`Group`].
pub type RedisConsumer = FetchingConsumer<Acked>;

/// What an ack names: the delivery's tag in its scope's `unacked` hash.
#[derive(Debug)]
pub struct Acked {
    tag: String,
    group: usize,
}

impl Acked {
    pub(super) fn new(tag: String, group: usize) -> Acked {
        Acked { tag, group }
    }
}

/// How many envelopes one fetch may take at most (measured: larger replies cost more to parse than
/// the round trips they save).
const MAX_FETCH: usize = 64;
/// How many acks one round trip carries at most.
const MAX_ACK_BATCH: usize = 2048;
/// Rounds of one restore sweep at most (each examines up to 1000 leases).
const RESTORE_ROUNDS: usize = 100;
/// How long a blocking wait for messages blocks at most.
const WAIT_BLOCK: Duration = Duration::from_secs(1);
/// The reply timeout of the wait connections (above [`WAIT_BLOCK`]).
const WAIT_REPLY_TIMEOUT: Duration = Duration::from_secs(10);

fn now_secs() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

/// The queues (and shards) of one [`Scope`]: what one fetch script takes from. On one server
/// every queue is in the one group; on a cluster each queue shard (with its dead-letter queues)
/// has its own, in its own slot.
#[derive(Debug)]
pub(super) struct Group {
    pub(super) scope: Scope,
    /// The holder's `held` set in this scope.
    pub(super) held: String,
    /// (bucket list, queue, shard), in the order they are taken from: priority first.
    lists: Vec<(String, String, u16)>,
    /// The (queue, shard) pairs, in the order given.
    pub(super) queues: Vec<(String, u16)>,
}

/// The groups of `queues` (every shard of each), in the order given.
pub(super) fn groups(keys: &Keys, queues: &[String]) -> Vec<(Scope, Vec<(String, u16)>)> {
    let mut out: Vec<(Scope, Vec<(String, u16)>)> = Vec::new();
    for q in queues {
        for shard in 0..keys.shards() {
            let scope = keys.scope(q, shard);
            match out.iter_mut().find(|(s, _)| *s == scope) {
                Some((_, qs)) => qs.push((q.clone(), shard)),
                None => out.push((scope, vec![(q.clone(), shard)])),
            }
        }
    }
    out
}

/// What the fetcher, the settlers and the background loops share.
#[derive(Debug)]
pub(super) struct Shared {
    pub(super) conn: RedisConn,
    pub(super) keys: Keys,
    /// The unsettled deliveries (renewed until settled): tag -> group.
    leases: Mutex<HashMap<String, usize>>,
    slots: Slots,
    pub(super) acks: AckQueue<Acked>,
    /// Whose heartbeat vouches for these leases (see [`super::holder`]).
    pub(super) holder: Arc<Holder>,
    pub(super) groups: Vec<Group>,
}

impl Shared {
    /// Forgets the lease `tag` and frees its prefetch slot.
    pub(super) fn release(&self, tag: &str) {
        lock(&self.leases).remove(tag);
        self.slots.give_back(1);
    }

    /// The unsettled tags, per group.
    fn lease_snapshot(&self) -> Vec<Vec<String>> {
        let mut per = vec![Vec::new(); self.groups.len()];
        for (tag, g) in lock(&self.leases).iter() {
            per[*g].push(tag.clone());
        }
        per
    }
}

impl RedisConsumer {
    /// Starts consuming `queues` (priority first across the queues of one slot, then queue order;
    /// on a cluster the shards are taken from in turn).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn start(
        conn: RedisConn,
        keys: Keys,
        holder: Arc<Holder>,
        options: &RedisOptions,
        queues: &[String],
        prefetch: usize,
        max_message_size: usize,
        weights: Arc<FairnessWeights>,
    ) -> RedisConsumer {
        let prefetch = prefetch.max(1);
        let (acks, batcher) = ack_queue();
        let groups: Vec<Group> = groups(&keys, queues)
            .into_iter()
            .map(|(scope, queues)| {
                let mut lists = Vec::new();
                for step in STEPS {
                    for (q, shard) in &queues {
                        lists.push((keys.bucket(q, *shard, step), q.clone(), *shard));
                    }
                }
                Group { held: scope.held(holder.id()), scope, lists, queues }
            })
            .collect();
        let shared = Arc::new(Shared {
            conn: conn.clone(),
            keys: keys.clone(),
            leases: Mutex::new(HashMap::new()),
            slots: Slots::new(prefetch),
            acks: acks.clone(),
            holder,
            groups,
        });
        let mut all_lists: Vec<String> =
            shared.groups.iter().flat_map(|g| g.lists.iter().map(|(k, _, _)| k.clone())).collect();
        if !keys.is_cluster() {
            // A keyed publish wakes the consumers through its queue's ring (a list while it has keys).
            all_lists.extend(queues.iter().map(|q| keys.fair_ring(q)));
        }
        let waker = Waker { base: conn.clone(), keys: all_lists, conns: Vec::new() };
        let fetch = RedisFetch {
            shared: shared.clone(),
            waker,
            script: scripts::fetch(),
            tag_prefix: format!("{}.", uuid::Uuid::new_v4().simple()),
            seq: 0,
            next_group: 0,
            conn: conn.clone(),
            max_message_size,
            weights,
        };
        let vt = options.visibility_timeout;
        let ack_shared = shared.clone();
        // Acks are retried whatever failed: a batch is only given up when the consumer is dropped.
        let ack = batcher.run(
            "redis",
            MAX_ACK_BATCH,
            |_| true,
            move |acked: &[Acked]| {
                // One MULTI per group (one slot each on a cluster; the one group on a server).
                let mut per: Vec<Vec<&str>> = vec![Vec::new(); ack_shared.groups.len()];
                for a in acked {
                    per[a.group].push(&a.tag);
                }
                let mut pipes = Vec::new();
                for (g, tags) in ack_shared.groups.iter().zip(per).filter(|(_, t)| !t.is_empty()) {
                    let mut pipe = redis::pipe();
                    pipe.atomic()
                        .hdel(g.scope.unacked(), &tags)
                        .ignore()
                        .zrem(g.scope.unacked_index(), &tags)
                        .ignore()
                        .srem(&g.held, &tags)
                        .ignore();
                    pipes.push(pipe);
                }
                let mut conn = ack_shared.conn.clone();
                async move {
                    for pipe in pipes {
                        pipe.query_async::<()>(&mut conn).await.map_err(failed("redis: ack"))?;
                    }
                    Ok(())
                }
            },
        );
        let background = vec![
            tokio::spawn(ack),
            tokio::spawn(renew_loop(shared.clone(), vt)),
            tokio::spawn(restore_loop(shared.clone(), vt)),
            tokio::spawn(promote_loop(shared.clone())),
        ];
        FetchingConsumer::spawn(prefetch, fetch, acks, background)
    }
}

/// Blocks until one of the lists has an element, without taking it (`BLMOVE k k RIGHT RIGHT`),
/// each on a connection of its own (a blocking command holds its connection).
struct Waker {
    base: RedisConn,
    keys: Vec<String>,
    conns: Vec<RedisConn>,
}

impl Waker {
    async fn wait(&mut self, max: Duration) {
        if self.conns.is_empty() {
            for _ in &self.keys {
                match self.base.fresh(Some(WAIT_REPLY_TIMEOUT)).await {
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
        let secs = max.min(WAIT_BLOCK).as_secs_f64().max(0.01);
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

/// The Redis part of the fetcher: the fetch script over the bucket lists of each group.
struct RedisFetch {
    shared: Arc<Shared>,
    waker: Waker,
    script: Script,
    tag_prefix: String,
    /// The sequence number of the next tag.
    seq: u64,
    /// The group the next fetch starts with (turns, so that every shard is served).
    next_group: usize,
    conn: RedisConn,
    max_message_size: usize,
    /// The weights of fairness keys when they take turns.
    weights: Arc<FairnessWeights>,
}

impl RedisFetch {
    /// The delivery of an envelope the script dead-lettered unread (it holds no lease nor slot).
    fn oversized(&self, group: &Group, chunk: &[redis::Value], size: i64) -> Delivery {
        let queue = redis::from_redis_value_ref::<usize>(&chunk[0])
            .map(|i| group.lists[i.min(group.lists.len() - 1)].1.clone())
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

    /// Runs the fetch script on group `g` for up to `n` envelopes and sends their deliveries:
    /// `Ok(Some(taken))`, `Ok(None)` when nobody receives any more.
    async fn fetch_group(
        &mut self,
        g: usize,
        n: usize,
        tx: &mpsc::Sender<Delivery>,
    ) -> Result<Option<usize>, redis::RedisError> {
        let shared = self.shared.clone();
        let group = &shared.groups[g];
        let mut inv = self.script.prepare_invoke();
        inv.key(group.scope.unacked()).key(group.scope.unacked_index()).key(&group.held).key(group.scope.workers());
        for (k, _, _) in &group.lists {
            inv.key(k);
        }
        for (_, q, shard) in &group.lists {
            inv.key(shared.keys.bucket(&dead_letter_queue(q), *shard, 0));
        }
        inv.arg(now_secs()).arg(n).arg(&self.tag_prefix).arg(self.seq).arg(self.max_message_size);
        inv.arg(shared.holder.id());
        inv.arg(if shared.keys.is_cluster() { "0" } else { "1" }).arg(shared.keys.prefix());
        inv.arg(self.weights.iter().count());
        for (key, w) in self.weights.iter() {
            inv.arg(key).arg(w);
        }
        // Read before the fetch runs: a lapse noticed after it means these may have been restored.
        let epoch = shared.holder.liveness().epoch();
        for (_, q, _) in &group.lists {
            inv.arg(q);
        }
        let items: Vec<redis::Value> = inv.invoke_async(&mut self.conn).await?;
        // Dead-lettered ones hold no lease nor prefetch slot.
        let oversized = items.chunks_exact(3).filter(|c| matches!(c[1], redis::Value::Int(_))).count();
        let got = items.len() / 3 - oversized;
        self.seq += got as u64;
        for chunk in items.chunks_exact(3) {
            if let redis::Value::Int(size) = chunk[1] {
                if tx.send(self.oversized(group, chunk, size)).await.is_err() {
                    return Ok(None);
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
            let (list_key, queue, shard) = group.lists[idx.min(group.lists.len() - 1)].clone();
            lock(&shared.leases).insert(tag.clone(), g);
            let decoded = envelope::decode(&env);
            let size = env.len();
            let settle = RedisSettle::new(shared.clone(), tag, g, shard, epoch, env, list_key, queue.clone());
            let d = Delivery::new(decoded.message, queue, decoded.redelivered, Box::new(settle)).with_size(size);
            if tx.send(d).await.is_err() {
                return Ok(None);
            }
        }
        Ok(Some(got))
    }
}

impl Fetch for RedisFetch {
    const BROKER: &'static str = "redis";
    const MAX_FETCH: usize = MAX_FETCH;

    fn slots(&self) -> &Slots {
        &self.shared.slots
    }

    /// Takes from the groups in turn, starting one further each time, until `n` are taken.
    async fn fetch(&mut self, n: usize, tx: &mpsc::Sender<Delivery>) -> Fetched {
        let count = self.shared.groups.len();
        let start = self.next_group % count;
        self.next_group = (start + 1) % count;
        let mut taken = 0;
        for k in 0..count {
            if taken >= n {
                break;
            }
            match self.fetch_group((start + k) % count, n - taken, tx).await {
                Ok(Some(got)) => taken += got,
                Ok(None) => return Fetched::Closed,
                Err(e) => return Fetched::Failed { taken, error: broker_error("redis: fetch", e) },
            }
        }
        Fetched::Sent { taken, drained: taken == 0 }
    }

    async fn idle(&mut self) {
        self.waker.wait(WAIT_BLOCK).await;
    }
}

async fn renew_loop(shared: Arc<Shared>, vt: Duration) {
    let every = (vt / 4).clamp(Duration::from_millis(100), Duration::from_secs(300));
    let mut conn = shared.conn.clone();
    loop {
        tokio::time::sleep(every).await;
        for (g, tags) in shared.lease_snapshot().into_iter().enumerate() {
            for chunk in tags.chunks(1000) {
                let now = now_secs();
                let mut cmd = redis::cmd("ZADD");
                cmd.arg(shared.groups[g].scope.unacked_index()).arg("XX");
                for t in chunk {
                    cmd.arg(now).arg(t);
                }
                if let Err(e) = cmd.query_async::<()>(&mut conn).await {
                    tracing::warn!(error = %e, "redis: lease renewal failed; will retry");
                }
            }
        }
    }
}

/// Restores the leases past the visibility timeout, in every group: on one server Kombu's way
/// ([`scripts::restore`]); on a cluster into the group's own buckets ([`scripts::restore_scope`]).
async fn restore_loop(shared: Arc<Shared>, vt: Duration) {
    let every = (vt / 4).clamp(Duration::from_millis(100), Duration::from_secs(60));
    let script = if shared.keys.is_cluster() { scripts::restore_scope() } else { scripts::restore() };
    let mut conn = shared.conn.clone();
    loop {
        let mut busy = false;
        for group in &shared.groups {
            let cutoff = now_secs() - vt.as_secs_f64();
            match restore_group(&mut conn, &script, &shared.keys, group, cutoff).await {
                Ok(0) => {}
                Ok(n) => {
                    busy = true;
                    tracing::warn!(restored = n, "redis: restored messages whose worker stopped renewing its lease")
                }
                Err(e) => tracing::warn!(error = %e, "redis: restore sweep failed; will retry"),
            }
        }
        if !busy {
            tokio::time::sleep(every).await;
        }
    }
}

/// One restore sweep of `group`'s leases older than `cutoff` (at most 1000 on one server, at most
/// [`RESTORE_ROUNDS`] rounds of 1000 on a cluster, past leases of queues other consumers serve).
async fn restore_group(
    conn: &mut RedisConn,
    script: &Script,
    keys: &Keys,
    group: &Group,
    cutoff: f64,
) -> Result<u64, redis::RedisError> {
    if !keys.is_cluster() {
        let mut inv = script.prepare_invoke();
        inv.key(group.scope.unacked()).key(group.scope.unacked_index()).arg(cutoff).arg(1000).arg(keys.prefix());
        return inv.invoke_async(conn).await;
    }
    let (mut restored, mut offset) = (0, 0u64);
    for _ in 0..RESTORE_ROUNDS {
        let mut inv = script.prepare_invoke();
        inv.key(group.scope.unacked()).key(group.scope.unacked_index()).arg(cutoff).arg(1000).arg(offset);
        for (q, shard) in &group.queues {
            for b in keys.buckets(q, *shard) {
                inv.key(b);
            }
            inv.arg(q);
        }
        let (n, skipped, examined): (u64, u64, u64) = inv.invoke_async(conn).await?;
        restored += n;
        offset += skipped;
        if examined < 1000 {
            break;
        }
    }
    Ok(restored)
}

/// Moves due ETA messages of every queue (and shard) consumed to their buckets.
async fn promote_loop(shared: Arc<Shared>) {
    let keys = &shared.keys;
    let script = if keys.is_cluster() { scripts::promote_into() } else { scripts::promote() };
    let mut conn = shared.conn.clone();
    let cap = Duration::from_millis(250);
    loop {
        let mut wait = cap;
        for (q, shard) in shared.groups.iter().flat_map(|g| g.queues.iter()) {
            let mut inv = script.prepare_invoke();
            inv.key(keys.delayed(q, *shard)).arg(1000);
            if keys.is_cluster() {
                for b in keys.buckets(q, *shard) {
                    inv.key(b);
                }
            } else {
                inv.arg(keys.prefix()).arg(q);
            }
            let r: Result<(u64, i64), _> = inv.invoke_async(&mut conn).await;
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

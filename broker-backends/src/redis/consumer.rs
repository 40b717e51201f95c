//! The reliable Redis consumer: leased fetch, lease renewal, restore of dead workers' leases,
//! promotion of due ETA messages, and batched acknowledgements.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use celery_core::backoff::Reconnect;
use celery_core::broker::{dead_letter_queue, Settle, Settled};
use celery_core::protocol::{lenient_task_id, Message};
use celery_core::{BrokerError, Consumer, Delivery, ProtocolError};
use chrono::{DateTime, Utc};
use futures::future::select_all;
use redis::aio::ConnectionManager;
use tokio::sync::{mpsc, oneshot, watch, Semaphore};
use tokio::task::JoinHandle;

use super::{conn_error, manager, scripts, Keys, RedisOptions, STEPS};
use crate::envelope;

/// How many envelopes one fetch may take at most (measured: larger replies cost more to parse than
/// the round trips they save).
const MAX_FETCH: usize = 64;
/// How many acks one round trip carries at most.
const MAX_ACK_BATCH: usize = 2048;

fn now_secs() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

enum AckCmd {
    Ack(String),
    Flush(oneshot::Sender<()>),
}

#[derive(Debug)]
struct Shared {
    conn: ConnectionManager,
    keys: Keys,
    leases: Mutex<HashSet<String>>,
    slots: Semaphore,
    acks: mpsc::UnboundedSender<AckCmdBox>,
}

struct AckCmdBox(AckCmd);
impl std::fmt::Debug for AckCmdBox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AckCmd")
    }
}

impl Shared {
    fn release(&self, tag: &str) {
        self.leases.lock().unwrap_or_else(|p| p.into_inner()).remove(tag);
        self.slots.add_permits(1);
    }

    fn lease_snapshot(&self) -> Vec<String> {
        self.leases.lock().unwrap_or_else(|p| p.into_inner()).iter().cloned().collect()
    }

    /// Runs an atomic pipeline that also drops the lease `tag`. The lease is released here either
    /// way: after a failure it is no longer renewed, so (unless the step did happen after all) the
    /// restore sweep returns the message to its queue after the visibility timeout, instead of
    /// this consumer keeping it leased for as long as it lives.
    async fn settle_with(&self, tag: &str, mut pipe: redis::Pipeline) -> Result<(), BrokerError> {
        pipe.atomic();
        pipe.hdel(self.keys.unacked(), tag).ignore();
        pipe.zrem(self.keys.unacked_index(), tag).ignore();
        let mut conn = self.conn.clone();
        let r = pipe.query_async::<()>(&mut conn).await.map_err(conn_error);
        self.release(tag);
        r
    }
}

/// A consumer of some Redis queues.
#[derive(Debug)]
pub struct RedisConsumer {
    rx: mpsc::Receiver<Delivery>,
    shared: Arc<Shared>,
    stop: watch::Sender<bool>,
    fetcher: Option<JoinHandle<()>>,
    background: Vec<JoinHandle<()>>,
}

impl RedisConsumer {
    pub(crate) async fn start(
        client: redis::Client,
        conn: ConnectionManager,
        keys: Keys,
        options: RedisOptions,
        queues: &[String],
        prefetch: usize,
        max_message_size: usize,
    ) -> Result<RedisConsumer, BrokerError> {
        let prefetch = prefetch.max(1);
        let (ack_tx, ack_rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            conn: conn.clone(),
            keys: keys.clone(),
            leases: Mutex::new(HashSet::new()),
            slots: Semaphore::new(prefetch),
            acks: ack_tx,
        });
        let (stop, stop_rx) = watch::channel(false);
        let (tx, rx) = mpsc::channel(prefetch);
        // Priority first across all queues, then queue order.
        let mut lists = Vec::new();
        for step in STEPS {
            for q in queues {
                lists.push((keys.bucket(q, step), q.clone()));
            }
        }
        let waker =
            Waker { client: client.clone(), keys: lists.iter().map(|(k, _)| k.clone()).collect(), conns: Vec::new() };
        let fetcher = tokio::spawn(fetch_loop(shared.clone(), lists, waker, tx, stop_rx, max_message_size));
        let vt = options.visibility_timeout;
        let background = vec![
            tokio::spawn(ack_loop(shared.clone(), ack_rx)),
            tokio::spawn(renew_loop(shared.clone(), vt)),
            tokio::spawn(restore_loop(conn.clone(), keys.clone(), vt)),
            tokio::spawn(promote_loop(conn, keys, queues.to_vec())),
        ];
        Ok(RedisConsumer { rx, shared, stop, fetcher: Some(fetcher), background })
    }
}

impl Drop for RedisConsumer {
    fn drop(&mut self) {
        if let Some(f) = &self.fetcher {
            f.abort();
        }
        for t in &self.background {
            t.abort();
        }
    }
}

#[async_trait]
impl Consumer for RedisConsumer {
    async fn next(&mut self) -> Option<Delivery> {
        self.rx.recv().await
    }

    fn stop(&mut self) {
        let _ = self.stop.send(true);
    }

    async fn close(&mut self) {
        let _ = self.stop.send(true);
        if let Some(f) = self.fetcher.take() {
            let _ = f.await;
        }
        let (tx, rx) = oneshot::channel();
        if self.shared.acks.send(AckCmdBox(AckCmd::Flush(tx))).is_ok() {
            let _ = tokio::time::timeout(Duration::from_secs(30), rx).await;
        }
        for t in self.background.drain(..) {
            t.abort();
        }
    }
}

/// Blocks until one of the lists has an element, without taking it (`BLMOVE k k RIGHT RIGHT`).
struct Waker {
    client: redis::Client,
    keys: Vec<String>,
    conns: Vec<ConnectionManager>,
}

impl Waker {
    async fn wait(&mut self, max: Duration) {
        if self.conns.is_empty() {
            for _ in &self.keys {
                match manager(&self.client, None).await {
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

async fn fetch_loop(
    shared: Arc<Shared>,
    lists: Vec<(String, String)>,
    mut waker: Waker,
    tx: mpsc::Sender<Delivery>,
    mut stop: watch::Receiver<bool>,
    max_message_size: usize,
) {
    let script = scripts::fetch();
    let tag_prefix = format!("{}.", uuid::Uuid::new_v4().simple());
    let mut seq: u64 = 0;
    let mut backoff = Reconnect::default();
    let mut conn = shared.conn.clone();
    loop {
        if *stop.borrow() {
            break;
        }
        let first = tokio::select! {
            p = shared.slots.acquire() => match p { Ok(p) => p, Err(_) => break },
            _ = stop.changed() => break,
        };
        first.forget();
        let mut n = 1;
        while n < MAX_FETCH {
            match shared.slots.try_acquire() {
                Ok(p) => {
                    p.forget();
                    n += 1;
                }
                Err(_) => break,
            }
        }
        let mut inv = script.prepare_invoke();
        inv.key(shared.keys.unacked()).key(shared.keys.unacked_index());
        for (k, _) in &lists {
            inv.key(k);
        }
        for (_, q) in &lists {
            inv.key(shared.keys.bucket(&dead_letter_queue(q), 0));
        }
        inv.arg(now_secs()).arg(n).arg(&tag_prefix).arg(seq).arg(max_message_size);
        for (_, q) in &lists {
            inv.arg(q);
        }
        let items: Vec<redis::Value> = match inv.invoke_async(&mut conn).await {
            Ok(v) => v,
            Err(e) => {
                shared.slots.add_permits(n);
                let d = backoff.next_delay();
                tracing::warn!(error = %e, retry_in = ?d, "redis: fetch failed; retrying");
                tokio::time::sleep(d).await;
                continue;
            }
        };
        if backoff.attempts() > 0 {
            tracing::info!("redis: connection restored; consuming again");
            crate::reconnected("redis");
        }
        backoff.reset();
        // Dead-lettered ones hold no lease nor prefetch slot.
        let oversized = items.chunks_exact(3).filter(|c| matches!(c[1], redis::Value::Int(_))).count();
        let got = items.len() / 3 - oversized;
        seq += got as u64;
        shared.slots.add_permits(n - got);
        for chunk in items.chunks_exact(3) {
            if let redis::Value::Int(size) = chunk[1] {
                let queue = redis::from_redis_value_ref::<usize>(&chunk[0])
                    .map(|i| lists[i.min(lists.len() - 1)].1.clone())
                    .unwrap_or_default();
                let size = usize::try_from(size).unwrap_or(usize::MAX);
                tracing::warn!(%queue, size, limit = max_message_size, "redis: oversized message dead-lettered unread");
                let too_large = ProtocolError::TooLarge { size, limit: max_message_size };
                let id = redis::from_redis_value_ref::<String>(&chunk[2]).ok().filter(|id| !id.is_empty());
                let message = Err(match lenient_task_id(&serde_json::json!({ "id": id })) {
                    Some(id) => {
                        ProtocolError::InvalidHeaders { id, task: None, reply_to: None, error: Box::new(too_large) }
                    }
                    None => too_large,
                });
                let d = Delivery::new(message, queue, false, Box::new(Settled)).with_size(size);
                if tx.send(d).await.is_err() {
                    return;
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
            let (list_key, queue) = lists[idx.min(lists.len() - 1)].clone();
            shared.leases.lock().unwrap_or_else(|p| p.into_inner()).insert(tag.clone());
            let decoded = envelope::decode(&env);
            let settle = RedisSettle { shared: shared.clone(), tag, env, list_key, queue: queue.clone() };
            let size = settle.env.len();
            let d = Delivery::new(decoded.message, queue, decoded.redelivered, Box::new(settle)).with_size(size);
            if tx.send(d).await.is_err() {
                return;
            }
        }
        if got == 0 {
            tokio::select! {
                _ = waker.wait(Duration::from_secs(1)) => {}
                _ = stop.changed() => break,
            }
        }
    }
}

async fn ack_loop(shared: Arc<Shared>, mut rx: mpsc::UnboundedReceiver<AckCmdBox>) {
    let mut conn = shared.conn.clone();
    let mut backoff = Reconnect::default();
    while let Some(AckCmdBox(first)) = rx.recv().await {
        let mut tags = Vec::new();
        let mut flushes = Vec::new();
        let mut next = Some(first);
        while let Some(cmd) = next.take() {
            match cmd {
                AckCmd::Ack(t) => tags.push(t),
                AckCmd::Flush(f) => flushes.push(f),
            }
            if tags.len() >= MAX_ACK_BATCH {
                break;
            }
            next = rx.try_recv().ok().map(|b| b.0);
        }
        while !tags.is_empty() {
            let mut pipe = redis::pipe();
            pipe.atomic().hdel(shared.keys.unacked(), &tags).ignore().zrem(shared.keys.unacked_index(), &tags).ignore();
            match pipe.query_async::<()>(&mut conn).await {
                Ok(()) => {
                    backoff.reset();
                    break;
                }
                Err(e) => {
                    let d = backoff.next_delay();
                    tracing::warn!(error = %e, pending = tags.len(), retry_in = ?d, "redis: ack failed; retrying");
                    tokio::time::sleep(d).await;
                }
            }
        }
        for f in flushes {
            let _ = f.send(());
        }
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

async fn restore_loop(mut conn: ConnectionManager, keys: Keys, vt: Duration) {
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

async fn promote_loop(mut conn: ConnectionManager, keys: Keys, queues: Vec<String>) {
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

#[derive(Debug)]
struct RedisSettle {
    shared: Arc<Shared>,
    tag: String,
    env: Vec<u8>,
    list_key: String,
    queue: String,
}

#[async_trait]
impl Settle for RedisSettle {
    async fn ack(&self) -> Result<(), BrokerError> {
        self.shared.release(&self.tag);
        self.shared
            .acks
            .send(AckCmdBox(AckCmd::Ack(self.tag.clone())))
            .map_err(|_| BrokerError::operation("consumer is closed"))
    }

    async fn requeue(&self) -> Result<(), BrokerError> {
        let mut pipe = redis::pipe();
        pipe.rpush(&self.list_key, &self.env).ignore();
        self.shared.settle_with(&self.tag, pipe).await
    }

    /// Moves the message from its lease into the queue's delayed set in one `MULTI`.
    async fn defer(&self, msg: &Message, until: DateTime<Utc>) -> Result<(), BrokerError> {
        let mut m = msg.clone();
        m.headers.eta = Some(until);
        let env = envelope::encode(&m, "", &self.queue);
        let mut pipe = redis::pipe();
        pipe.zadd(self.shared.keys.delayed(&self.queue), env, until.timestamp_millis()).ignore();
        self.shared.settle_with(&self.tag, pipe).await
    }

    async fn dead_letter(&self, reason: &str) -> Result<(), BrokerError> {
        let dlq = dead_letter_queue(&self.queue);
        let env = envelope::dead_letter(&self.env, &self.queue, reason);
        let mut pipe = redis::pipe();
        pipe.lpush(self.shared.keys.bucket(&dlq, 0), env).ignore();
        self.shared.settle_with(&self.tag, pipe).await
    }
}

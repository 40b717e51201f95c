//! Heartbeats of our consumers: a dead worker's deliveries come back in seconds, not after the
//! visibility timeout.
//!
//! Every broker instance that consumes is a *holder*: it renews `_celery_rs.worker.<holder>`
//! (`SET PX worker_grace`) every `worker_heartbeat`, and the fetch script records each tag it
//! leases in `_celery_rs.held.<holder>` next to Kombu's `unacked` entry, which stays as Kombu
//! writes it. Each tick, after renewing, a holder sweeps `_celery_rs.workers`: one script per step
//! ([`scripts::recover`]) restores what every holder whose heartbeat key is gone held, at once,
//! marked redelivered and counted (`x-delivery-count`), exactly once however many sweep.
//!
//! - Python workers' deliveries are in no `held` set: only the visibility timeout restores them.
//! - Safe defaults, 2 s and 10 s: a holder is declared dead only after five renewals in a row did
//!   not reach Redis. The key's time to live is kept by the Redis server, so no two machines'
//!   clocks are compared. A worker busy with tasks is not robbed: the renewal is a task of its own
//!   on the runtime (blocking tasks run on the blocking pool), so only a frozen process, a runtime
//!   starved for the whole grace, or a network cut that long lets it lapse.
//! - A holder that was declared dead and resumes learns it at its next renewal; meanwhile and
//!   after, a delivery is checked before its outcome is stored ([`crate::liveness::Liveness::surely_held`], else one
//!   `HEXISTS`), so the resumed worker does not store a second result over the one the worker that
//!   ran it again stores, and settling moves a message only while its lease exists.
//! - A worker restarted with the same name (Celery's node name, [`celery_core::Broker::set_worker_name`])
//!   restores what its earlier run left at once ([`crate::liveness::Holder::start`]).
//!
//! The registration and the loop are [`crate::liveness`]'s; the steps on Redis are here.

use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use celery_core::sync::lock;
use celery_core::BrokerError;
use redis::AsyncCommands;

use super::connection::RedisConn;
use super::error::failed;
use super::keys::{Keys, Scope};
use super::scripts;
use crate::liveness::{Heartbeat, Renewal};

/// Holders one sweep step looks at (a hint to `SSCAN`).
const HOLDERS_PER_STEP: u64 = 100;
/// Tags of one dead holder restored per step (the rest at the next step).
const TAGS_PER_STEP: u64 = 10_000;
/// Sweep steps per tick at most.
const STEPS_PER_TICK: usize = 100;
/// Holders one cluster recover script checks at most.
const HOLDERS_PER_SCRIPT: usize = 50;

/// A holder of Redis deliveries.
pub(crate) type Holder = crate::liveness::Holder<RedisBeat>;

/// A scope and the (queue, shard) pairs consumed in it.
pub(crate) type ScopeQueues = (Scope, Vec<(String, u16)>);

/// The heartbeat steps on Redis (the scripts of [`scripts`]).
///
/// On one server a holder has one heartbeat key, `held` set and `workers` entry (Kombu's global
/// lease keys). On a cluster it has them in every [`Scope`] (queue shard) it consumes, so that each
/// step touches one slot: the heartbeat is renewed in each, a dead holder's deliveries are restored
/// scope by scope, and what it held in a queue shard goes back to that shard.
#[derive(Debug)]
pub(crate) struct RedisBeat {
    conn: RedisConn,
    keys: Keys,
    /// The scopes the holder's heartbeat lives in, with the queues consumed in each.
    scopes: Mutex<Vec<ScopeQueues>>,
    heartbeat: redis::Script,
    recover: redis::Script,
}

impl RedisBeat {
    /// The steps on `conn`, with the keys `keys`, for a holder that consumes `groups` (on one
    /// server: the one global scope, whatever the queues).
    pub(crate) fn new(conn: RedisConn, keys: Keys, groups: Vec<ScopeQueues>) -> RedisBeat {
        let scopes = if keys.is_cluster() { groups } else { vec![(keys.scope("", 0), Vec::new())] };
        let recover = if keys.is_cluster() { scripts::recover_scope() } else { scripts::recover() };
        RedisBeat { conn, keys, scopes: Mutex::new(scopes), heartbeat: scripts::heartbeat(), recover }
    }

    fn scopes(&self) -> Vec<ScopeQueues> {
        lock(&self.scopes).clone()
    }

    /// On a cluster, takes on the scopes of `groups` the holder `id` (process `nonce`) has no
    /// heartbeat in yet: restores what an earlier run of `id` left there and sets the heartbeat.
    /// Queues new to a known scope are added to it. Nothing to do on one server.
    pub(crate) async fn adopt(&self, id: &str, nonce: &str, grace: Duration, groups: Vec<ScopeQueues>) {
        if !self.keys.is_cluster() {
            return;
        }
        for (scope, queues) in groups {
            let new = {
                let mut known = lock(&self.scopes);
                match known.iter_mut().find(|(s, _)| *s == scope) {
                    Some((_, qs)) => {
                        let more: Vec<(String, u16)> = queues.iter().filter(|q| !qs.contains(q)).cloned().collect();
                        qs.extend(more);
                        false
                    }
                    None => {
                        known.push((scope.clone(), queues.clone()));
                        true
                    }
                }
            };
            if !new {
                continue;
            }
            let entry = (scope, queues);
            for _ in 0..3 {
                let mut c = self.conn.clone();
                let seen: Result<Option<String>, _> = c.get(entry.0.heartbeat(id)).await;
                let expected = match seen {
                    Ok(v) => v.unwrap_or_default(),
                    Err(e) => {
                        tracing::warn!(error = %e, "redis: cannot read a worker heartbeat; the renewal sets it");
                        break;
                    }
                };
                match self.claim_in(&entry, id, nonce, &expected, grace).await {
                    Ok(Some(restored)) => {
                        if restored > 0 {
                            tracing::warn!(restored, worker = %id, "redis: restored the deliveries an earlier run of this worker left unsettled");
                            super::wake::publish_restored(&self.conn, &self.keys, &entry.1).await;
                        }
                        break;
                    }
                    Ok(None) => continue,
                    Err(e) => {
                        tracing::warn!(error = %e, "redis: cannot register a worker heartbeat; the renewal sets it");
                        break;
                    }
                }
            }
        }
    }

    /// True when the lease `tag` still exists in `scope` (`HEXISTS unacked`); true too when Redis
    /// cannot say (an outcome is better stored twice than lost).
    pub(crate) async fn still_leased(&self, scope: &Scope, tag: &str) -> bool {
        let mut c = self.conn.clone();
        match c.hexists::<_, _, bool>(scope.unacked(), tag).await {
            Ok(held) => held,
            Err(e) => {
                tracing::warn!(error = %e, "redis: cannot check a lease; taking it as held");
                true
            }
        }
    }

    /// [`scripts::claim`] (or [`scripts::claim_scope`] on a cluster) in one scope.
    async fn claim_in(
        &self,
        (scope, queues): &ScopeQueues,
        id: &str,
        nonce: &str,
        expected: &str,
        grace: Duration,
    ) -> Result<Option<u64>, BrokerError> {
        let mut c = self.conn.clone();
        let script = if self.keys.is_cluster() { scripts::claim_scope() } else { scripts::claim() };
        let mut inv = script.prepare_invoke();
        inv.key(scope.heartbeat(id))
            .key(scope.held(id))
            .key(scope.workers())
            .key(scope.unacked())
            .key(scope.unacked_index())
            .arg(expected)
            .arg(format!("{nonce}:0"))
            .arg(ttl_ms(grace))
            .arg(id);
        if self.keys.is_cluster() {
            for (q, shard) in queues {
                for b in self.keys.buckets(q, *shard) {
                    inv.key(b);
                }
                inv.arg(q);
            }
        } else {
            inv.arg(self.keys.prefix());
        }
        let r: i64 = inv.invoke_async(&mut c).await.map_err(failed("redis: register a worker heartbeat"))?;
        Ok(u64::try_from(r).ok())
    }

    /// One sweep of `scope` on a cluster: `SSCAN` of its `workers`, then [`scripts::recover_scope`]
    /// over each batch of holders. Returns (restored, holders removed).
    async fn sweep_scope(&self, (scope, queues): &ScopeQueues) -> Result<(u64, u64), redis::RedisError> {
        let mut c = self.conn.clone();
        let (mut restored, mut gone, mut cursor) = (0, 0, 0u64);
        for _ in 0..STEPS_PER_TICK {
            let (next, holders): (u64, Vec<String>) = redis::cmd("SSCAN")
                .arg(scope.workers())
                .arg(cursor)
                .arg("COUNT")
                .arg(HOLDERS_PER_STEP)
                .query_async(&mut c)
                .await?;
            for batch in holders.chunks(HOLDERS_PER_SCRIPT) {
                let mut inv = self.recover.prepare_invoke();
                inv.key(scope.unacked()).key(scope.unacked_index()).key(scope.workers());
                inv.arg(batch.len()).arg(TAGS_PER_STEP);
                for h in batch {
                    inv.key(scope.heartbeat(h)).key(scope.held(h)).arg(h);
                }
                for (q, shard) in queues {
                    for b in self.keys.buckets(q, *shard) {
                        inv.key(b);
                    }
                    inv.arg(q);
                }
                let (r, g): (u64, u64) = inv.invoke_async(&mut c).await?;
                restored += r;
                gone += g;
            }
            cursor = next;
            if cursor == 0 {
                break;
            }
        }
        Ok((restored, gone))
    }
}

fn ttl_ms(grace: Duration) -> u64 {
    u64::try_from(grace.as_millis()).unwrap_or(u64::MAX).max(1)
}

#[async_trait]
impl Heartbeat for RedisBeat {
    fn broker(&self) -> &'static str {
        "redis"
    }

    /// The heartbeat's value; on a cluster with several scopes, each scope's (empty when absent),
    /// one a line, `None` when every one is absent.
    async fn read(&self, id: &str) -> Result<Option<String>, BrokerError> {
        let mut c = self.conn.clone();
        let scopes = self.scopes();
        let mut values = Vec::with_capacity(scopes.len());
        for (scope, _) in &scopes {
            let v: Option<String> =
                c.get(scope.heartbeat(id)).await.map_err(failed("redis: read a worker heartbeat"))?;
            values.push(v);
        }
        if values.len() == 1 {
            return Ok(values.pop().flatten());
        }
        let any = values.iter().any(Option::is_some);
        Ok(any.then(|| values.into_iter().map(Option::unwrap_or_default).collect::<Vec<_>>().join("\n")))
    }

    /// Each scope's `<nonce>:<beat>` line.
    fn nonces<'a>(&self, seen: &'a str) -> Vec<&'a str> {
        seen.split('\n').filter(|l| !l.is_empty()).map(|l| l.rsplit_once(':').map_or(l, |(n, _)| n)).collect()
    }

    /// [`scripts::claim`] in every scope ([`RedisBeat::read`]'s lines are each scope's expected
    /// value); `None` when any scope's heartbeat reads otherwise.
    async fn claim(&self, id: &str, nonce: &str, expected: &str, grace: Duration) -> Result<Option<u64>, BrokerError> {
        let scopes = self.scopes();
        let mut parts = expected.split('\n');
        let mut restored = 0;
        let mut all = true;
        for entry in &scopes {
            let part = if scopes.len() == 1 { expected } else { parts.next().unwrap_or("") };
            match self.claim_in(entry, id, nonce, part, grace).await? {
                Some(n) => restored += n,
                None => all = false,
            }
        }
        Ok(all.then_some(restored))
    }

    /// [`scripts::heartbeat`] in every scope: alive when alive in all, lapsed when it had expired
    /// in any, taken when another process holds it in any.
    async fn renew(&self, id: &str, nonce: &str, seq: u64, grace: Duration) -> Result<Renewal, BrokerError> {
        let mut c = self.conn.clone();
        let mut renewal = Renewal::Alive;
        for (scope, _) in self.scopes() {
            let r: i64 = self
                .heartbeat
                .key(scope.heartbeat(id))
                .key(scope.workers())
                .arg(nonce)
                .arg(format!("{nonce}:{seq}"))
                .arg(ttl_ms(grace))
                .arg(id)
                .invoke_async(&mut c)
                .await
                .map_err(failed("redis: renew a worker heartbeat"))?;
            renewal = match (renewal, r) {
                (Renewal::Taken, _) | (_, -1) => Renewal::Taken,
                (Renewal::Lapsed, _) | (_, 0) => Renewal::Lapsed,
                _ => Renewal::Alive,
            };
        }
        Ok(renewal)
    }

    /// [`scripts::recover`] over all of `workers` (a full `SSCAN` pass, bounded); on a cluster
    /// in every scope.
    async fn sweep(&self) {
        if self.keys.is_cluster() {
            for entry in self.scopes() {
                match self.sweep_scope(&entry).await {
                    Ok((0, _)) => {}
                    Ok((restored, gone)) => {
                        tracing::warn!(
                            restored,
                            workers = gone,
                            "redis: restored the deliveries of workers whose heartbeat stopped"
                        );
                        super::wake::publish_restored(&self.conn, &self.keys, &entry.1).await;
                    }
                    Err(e) => tracing::warn!(error = %e, "redis: sweep for dead workers failed; will retry"),
                }
            }
            return;
        }
        let scope = self.keys.scope("", 0);
        let mut c = self.conn.clone();
        let mut cursor = 0u64;
        for _ in 0..STEPS_PER_TICK {
            let r: Result<(u64, u64, u64), _> = self
                .recover
                .key(scope.unacked())
                .key(scope.unacked_index())
                .key(scope.workers())
                .arg(self.keys.prefix())
                .arg(scope.heartbeat(""))
                .arg(scope.held(""))
                .arg(cursor)
                .arg(HOLDERS_PER_STEP)
                .arg(TAGS_PER_STEP)
                .invoke_async(&mut c)
                .await;
            match r {
                Ok((next, restored, gone)) => {
                    if restored > 0 {
                        tracing::warn!(
                            restored,
                            workers = gone,
                            "redis: restored the deliveries of workers whose heartbeat stopped"
                        );
                        super::wake::publish_restored(&self.conn, &self.keys, &[]).await;
                    }
                    cursor = next;
                    if cursor == 0 {
                        return;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "redis: sweep for dead workers failed; will retry");
                    return;
                }
            }
        }
    }
}

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
//! On a Redis Cluster every key a script touches is in one slot, and each queue (shard) is a slot
//! of its own ([`super::keys`]), so a holder's keys are split in two, for an idle cost that does not
//! grow with the number of queues it consumes:
//! - In the slot of [`Keys::holders`], once per holder: its heartbeat (renewed each tick), its
//!   entry in the holders' `workers` set, and the list of the scopes (queue shards) it consumes,
//!   written at start. The sweep reads that `workers` set and the heartbeats (`SSCAN`, `MGET`): two
//!   commands a tick while every holder lives, whatever the queues.
//! - In each queue shard's scope, as before: `held`, and a heartbeat that is set before the first
//!   fetch there takes anything (by that fetch's own script, [`RedisBeat::activation`]) and
//!   renewed only while the holder holds deliveries there (or fetched there within half the
//!   grace). It is the fence of the restore: a holder whose
//!   heartbeat in the holders' slot is gone is restored scope by scope from its list, by
//!   [`scripts::recover_scope`], which restores only where the scope's heartbeat is gone too, in
//!   the same step. So a holder that comes back and fetches again (which sets the scope's
//!   heartbeat first) is not robbed of what it fetched since; what it fetched before the lapse may
//!   be restored, and it learns of the lapse from its renewal in the holders' slot.
//! - Once every scope of a dead holder is restored, its entry and list are removed
//!   ([`scripts::forget`]); a worker restarted under the same name restores what its earlier run
//!   left in every scope of that list at start.
//!
//! The registration and the loop are [`crate::liveness`]'s; the steps on Redis are here.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use celery_core::sync::lock;
use celery_core::BrokerError;
use futures::{StreamExt, TryStreamExt};
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
/// Scopes one `SADD` registers at most (cluster).
const SCOPES_PER_WRITE: usize = 1000;

/// A holder of Redis deliveries.
pub(crate) type Holder = crate::liveness::Holder<RedisBeat>;

/// A scope and the (queue, shard) pairs consumed in it.
pub(crate) type ScopeQueues = (Scope, Vec<(String, u16)>);

/// What a fetch script adds to set a holder's heartbeat in its scope before it takes anything
/// ([`scripts::fetch`]): the heartbeat key last in KEYS, then nonce, value and ttl last in ARGV.
#[derive(Debug)]
pub(crate) struct Activation {
    key: String,
    nonce: String,
    ttl_ms: u64,
}

impl Activation {
    /// Adds the heartbeat key and its arguments, after every other key and argument.
    pub(crate) fn add_to(&self, inv: &mut redis::ScriptInvocation<'_>) {
        inv.key(&self.key).arg(&self.nonce).arg(format!("{}:0", self.nonce)).arg(self.ttl_ms);
    }
}

/// A scope whose heartbeat a holder keeps on a cluster.
#[derive(Debug)]
struct Active {
    /// Deliveries held there (leased, not settled).
    held: usize,
    /// When a fetch was last sent there (or a delivery taken).
    used: Instant,
}

/// The heartbeat steps on Redis (the scripts of [`scripts`]).
///
/// On one server a holder has one heartbeat key, `held` set and `workers` entry (Kombu's global
/// lease keys). On a cluster it has one heartbeat in the slot of [`Keys::holders`], and one in
/// each [`Scope`] (queue shard) where it may hold deliveries (see the module doc).
#[derive(Debug)]
pub(crate) struct RedisBeat {
    conn: RedisConn,
    keys: Keys,
    /// On a cluster, the scopes the holder consumes, with the queues consumed in each.
    scopes: Mutex<Vec<ScopeQueues>>,
    /// On a cluster, the scopes whose heartbeat it keeps.
    active: Mutex<HashMap<Scope, Active>>,
    heartbeat: redis::Script,
}

impl RedisBeat {
    /// The steps on `conn`, with the keys `keys`, for a holder that consumes `groups` (on one
    /// server: the one global scope, whatever the queues).
    pub(crate) fn new(conn: RedisConn, keys: Keys, groups: Vec<ScopeQueues>) -> RedisBeat {
        let scopes = if keys.is_cluster() { groups } else { Vec::new() };
        RedisBeat {
            conn,
            keys,
            scopes: Mutex::new(scopes),
            active: Mutex::new(HashMap::new()),
            heartbeat: scripts::heartbeat(),
        }
    }

    /// On a cluster, adds the scopes of `groups` the holder `id` did not consume yet to its list
    /// (queues new to a known scope join it). Nothing to do on one server.
    pub(crate) async fn adopt(&self, id: &str, groups: Vec<ScopeQueues>) {
        if !self.keys.is_cluster() {
            return;
        }
        let mut added = Vec::new();
        {
            let mut known = lock(&self.scopes);
            for (scope, queues) in groups {
                match known.iter_mut().find(|(s, _)| *s == scope) {
                    Some((_, qs)) => {
                        let more: Vec<(String, u16)> = queues.iter().filter(|q| !qs.contains(q)).cloned().collect();
                        if !more.is_empty() {
                            qs.extend(more);
                            added.push(qs.clone());
                        }
                    }
                    None => {
                        added.push(queues.clone());
                        known.push((scope, queues));
                    }
                }
            }
        }
        if let Err(e) = self.register(id, &added).await {
            tracing::warn!(error = %e, "redis: cannot list the queues of this worker for the sweep of dead workers");
        }
    }

    /// Writes `scopes` (each a scope's queues) into holder `id`'s list of scopes.
    async fn register(&self, id: &str, scopes: &[Vec<(String, u16)>]) -> Result<(), BrokerError> {
        let key = self.keys.holders().scopes(id);
        let mut c = self.conn.clone();
        for chunk in scopes.chunks(SCOPES_PER_WRITE) {
            let members: Vec<String> = chunk.iter().filter_map(|qs| serde_json::to_string(qs).ok()).collect();
            let _: i64 = c.sadd(&key, members).await.map_err(failed("redis: list the queues of a worker"))?;
        }
        Ok(())
    }

    /// On a cluster, what a fetch in `scope` adds to set holder `id`'s heartbeat there first, in
    /// the same script ([`scripts::fetch`]): `None` when the scope is kept already (its use is
    /// noted) or on one server. Once the fetch succeeded, [`RedisBeat::activated`].
    pub(crate) fn activation(&self, id: &str, nonce: &str, grace: Duration, scope: &Scope) -> Option<Activation> {
        if !self.keys.is_cluster() {
            return None;
        }
        if let Some(a) = lock(&self.active).get_mut(scope) {
            a.used = Instant::now();
            return None;
        }
        Some(Activation { key: scope.heartbeat(id), nonce: nonce.to_owned(), ttl_ms: ttl_ms(grace) })
    }

    /// A fetch set the holder's heartbeat in `scope` ([`RedisBeat::activation`]): it is kept there
    /// from now on (while deliveries are held there, or fetched within half the grace).
    pub(crate) fn activated(&self, scope: &Scope) {
        lock(&self.active).entry(scope.clone()).or_insert(Active { held: 0, used: Instant::now() }).used =
            Instant::now();
    }

    /// [`scripts::heartbeat`] of holder `id` in `scope` (token `nonce:seq`): 1 renewed, 0 set
    /// again after it had lapsed, -1 held by another process.
    async fn beat(
        &self,
        scope: &Scope,
        id: &str,
        nonce: &str,
        seq: u64,
        grace: Duration,
        what: &'static str,
    ) -> Result<i64, BrokerError> {
        let mut c = self.conn.clone();
        self.heartbeat
            .key(scope.heartbeat(id))
            .key(scope.workers())
            .arg(nonce)
            .arg(format!("{nonce}:{seq}"))
            .arg(ttl_ms(grace))
            .arg(id)
            .invoke_async(&mut c)
            .await
            .map_err(failed(what))
    }

    /// A delivery of `scope` was taken: its heartbeat there is kept until [`RedisBeat::unhold`].
    pub(crate) fn hold(&self, scope: &Scope) {
        if self.keys.is_cluster() {
            let mut active = lock(&self.active);
            let a = active.entry(scope.clone()).or_insert(Active { held: 0, used: Instant::now() });
            a.held += 1;
            a.used = Instant::now();
        }
    }

    /// A fetch in `scope` took nothing: unless it holds deliveries there, its heartbeat there is
    /// let go now (a fetch in flight that takes some keeps it again, [`RedisBeat::hold`]).
    pub(crate) fn idle(&self, scope: &Scope) {
        if !self.keys.is_cluster() {
            return;
        }
        let mut active = lock(&self.active);
        if active.get(scope).is_some_and(|a| a.held == 0) {
            active.remove(scope);
        }
    }

    /// A delivery of `scope` was settled (or given up).
    pub(crate) fn unhold(&self, scope: &Scope) {
        if !self.keys.is_cluster() {
            return;
        }
        if let Some(a) = lock(&self.active).get_mut(scope) {
            a.held = a.held.saturating_sub(1);
        }
    }

    /// True when the lease `tag` still exists in `scope` (`HEXISTS unacked`); true too when Redis
    /// cannot say (an outcome is better stored twice than lost).
    pub(crate) async fn still_leased(&self, scope: &Scope, tag: impl redis::ToSingleRedisArg + Send + Sync) -> bool {
        let mut c = self.conn.clone();
        match c.hexists::<_, _, bool>(scope.unacked(), tag).await {
            Ok(held) => held,
            Err(e) => {
                tracing::warn!(error = %e, "redis: cannot check a lease; taking it as held");
                true
            }
        }
    }

    /// [`scripts::claim_scope`] in `scope` (cluster): restores what `id` held there when its
    /// heartbeat there reads `expected`, and sets it. `None` when it reads otherwise.
    async fn claim_scope(
        &self,
        (scope, queues): &ScopeQueues,
        id: &str,
        nonce: &str,
        expected: &str,
        grace: Duration,
    ) -> Result<Option<u64>, BrokerError> {
        let mut c = self.conn.clone();
        let script = scripts::claim_scope();
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
        for (q, shard) in queues {
            for b in self.keys.buckets(q, *shard) {
                inv.key(b);
            }
            inv.arg(q);
        }
        let r: i64 = inv.invoke_async(&mut c).await.map_err(failed("redis: register a worker heartbeat"))?;
        Ok(u64::try_from(r).ok())
    }

    /// On a cluster, at start: restores what an earlier run of `id` left in each scope of its
    /// list, whatever its heartbeat there reads (the name is ours now). Returns how many.
    async fn take_over_scopes(&self, id: &str, nonce: &str, grace: Duration) -> u64 {
        let key = self.keys.holders().scopes(id);
        let mut c = self.conn.clone();
        let members: Vec<String> = match c.smembers(&key).await {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(error = %e, "redis: cannot read the queues an earlier run of this worker consumed");
                return 0;
            }
        };
        let mut restored = 0;
        for m in members {
            let Some(entry) = scope_of(&self.keys, &m) else { continue };
            for _ in 0..3 {
                let seen: Result<Option<String>, _> = c.get(entry.0.heartbeat(id)).await;
                let expected = match seen {
                    Ok(v) => v.unwrap_or_default(),
                    Err(e) => {
                        tracing::warn!(error = %e, "redis: cannot read a worker heartbeat in a queue's slot");
                        break;
                    }
                };
                match self.claim_scope(&entry, id, nonce, &expected, grace).await {
                    Ok(Some(n)) => {
                        if n > 0 {
                            restored += n;
                            super::wake::publish_restored(&self.conn, &self.keys, &entry.1).await;
                        }
                        break;
                    }
                    Ok(None) => continue,
                    Err(e) => {
                        tracing::warn!(error = %e, "redis: cannot restore what an earlier run of this worker held");
                        break;
                    }
                }
            }
        }
        restored
    }

    /// On a cluster: restores what the dead holder `h` held, scope by scope of its list
    /// ([`scripts::recover_scope`], only where its heartbeat in the scope is gone too), and
    /// forgets it once every scope is done. Returns how many were restored.
    async fn recover_holder(&self, h: &str) -> Result<u64, redis::RedisError> {
        let home = self.keys.holders();
        let recover = scripts::recover_scope();
        let mut c = self.conn.clone();
        let (mut restored, mut scopes, mut done, mut cursor) = (0, 0u64, 0u64, 0u64);
        loop {
            let (next, members): (u64, Vec<String>) = redis::cmd("SSCAN")
                .arg(home.scopes(h))
                .arg(cursor)
                .arg("COUNT")
                .arg(HOLDERS_PER_STEP)
                .query_async(&mut c)
                .await?;
            for m in members {
                scopes += 1;
                let Some((scope, queues)) = scope_of(&self.keys, &m) else {
                    done += 1;
                    continue;
                };
                let mut inv = recover.prepare_invoke();
                inv.key(scope.unacked()).key(scope.unacked_index()).key(scope.workers());
                inv.arg(1).arg(TAGS_PER_STEP);
                inv.key(scope.heartbeat(h)).key(scope.held(h)).arg(h);
                for (q, shard) in &queues {
                    for b in self.keys.buckets(q, *shard) {
                        inv.key(b);
                    }
                    inv.arg(q);
                }
                let (r, g): (u64, u64) = inv.invoke_async(&mut c).await?;
                if r > 0 {
                    super::wake::publish_restored(&self.conn, &self.keys, &queues).await;
                }
                restored += r;
                done += g;
            }
            cursor = next;
            if cursor == 0 {
                break;
            }
        }
        if done == scopes {
            let _: i64 = scripts::forget()
                .key(home.heartbeat(h))
                .key(home.workers())
                .key(home.scopes(h))
                .arg(h)
                .invoke_async(&mut c)
                .await?;
        }
        Ok(restored)
    }

    /// The sweep on a cluster: the holders of [`Keys::holders`] whose heartbeat is gone, each
    /// restored by [`RedisBeat::recover_holder`].
    async fn sweep_holders(&self) -> Result<(), redis::RedisError> {
        let home = self.keys.holders();
        let mut c = self.conn.clone();
        let mut cursor = 0u64;
        for _ in 0..STEPS_PER_TICK {
            let (next, holders): (u64, Vec<String>) = redis::cmd("SSCAN")
                .arg(home.workers())
                .arg(cursor)
                .arg("COUNT")
                .arg(HOLDERS_PER_STEP)
                .query_async(&mut c)
                .await?;
            if !holders.is_empty() {
                let beats: Vec<Option<String>> = redis::cmd("MGET")
                    .arg(holders.iter().map(|h| home.heartbeat(h)).collect::<Vec<_>>())
                    .query_async(&mut c)
                    .await?;
                for (h, _) in holders.iter().zip(beats).filter(|(_, b)| b.is_none()) {
                    let restored = self.recover_holder(h).await?;
                    if restored > 0 {
                        tracing::warn!(restored, worker = %h, "redis: restored the deliveries of workers whose heartbeat stopped");
                    }
                }
            }
            cursor = next;
            if cursor == 0 {
                break;
            }
        }
        Ok(())
    }
}

/// A scope of a holder's list ([`Scope::scopes`]): its queues as JSON; `None` when unreadable.
fn scope_of(keys: &Keys, member: &str) -> Option<ScopeQueues> {
    let queues: Vec<(String, u16)> = serde_json::from_str(member).ok()?;
    let (q, shard) = queues.first()?;
    Some((keys.scope(q, *shard), queues))
}

/// Heartbeat renewals in flight at once on a cluster (one per scope kept).
const RENEWALS_AT_ONCE: usize = 32;

/// `so_far` with one more heartbeat answer: taken if taken anywhere, else lapsed if lapsed
/// anywhere, else alive.
fn renewal_of(so_far: Renewal, answer: i64) -> Renewal {
    match (so_far, answer) {
        (Renewal::Taken, _) | (_, -1) => Renewal::Taken,
        (Renewal::Lapsed, _) | (_, 0) => Renewal::Lapsed,
        _ => Renewal::Alive,
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

    /// The heartbeat's value (in [`Keys::holders`]).
    async fn read(&self, id: &str) -> Result<Option<String>, BrokerError> {
        let mut c = self.conn.clone();
        c.get(self.keys.holders().heartbeat(id)).await.map_err(failed("redis: read a worker heartbeat"))
    }

    fn nonces<'a>(&self, seen: &'a str) -> Vec<&'a str> {
        seen.split('\n').filter(|l| !l.is_empty()).map(|l| l.rsplit_once(':').map_or(l, |(n, _)| n)).collect()
    }

    /// [`scripts::claim`] in [`Keys::holders`]; on a cluster then what an earlier run left in the
    /// scopes of its list is restored, and the scopes consumed now are listed.
    async fn claim(&self, id: &str, nonce: &str, expected: &str, grace: Duration) -> Result<Option<u64>, BrokerError> {
        let home = self.keys.holders();
        let mut c = self.conn.clone();
        let r: i64 = scripts::claim()
            .key(home.heartbeat(id))
            .key(home.held(id))
            .key(home.workers())
            .key(home.unacked())
            .key(home.unacked_index())
            .arg(expected)
            .arg(format!("{nonce}:0"))
            .arg(ttl_ms(grace))
            .arg(id)
            .arg(self.keys.prefix())
            .invoke_async(&mut c)
            .await
            .map_err(failed("redis: register a worker heartbeat"))?;
        let Ok(mut restored) = u64::try_from(r) else { return Ok(None) };
        if self.keys.is_cluster() {
            restored += self.take_over_scopes(id, nonce, grace).await;
            let scopes: Vec<Vec<(String, u16)>> = lock(&self.scopes).iter().map(|(_, qs)| qs.clone()).collect();
            self.register(id, &scopes).await?;
        }
        Ok(Some(restored))
    }

    /// [`scripts::heartbeat`] in [`Keys::holders`] and, on a cluster, in every scope it keeps
    /// (those where it holds deliveries or fetched within half the grace; the others are let go):
    /// alive when alive in all, lapsed when it had expired in any, taken when another process
    /// holds it in any. On a cluster a lapse in the holders' slot lists its scopes again.
    async fn renew(&self, id: &str, nonce: &str, seq: u64, grace: Duration) -> Result<Renewal, BrokerError> {
        const WHAT: &str = "redis: renew a worker heartbeat";
        let first = self.beat(&self.keys.holders(), id, nonce, seq, grace, WHAT).await?;
        if !self.keys.is_cluster() {
            return Ok(renewal_of(Renewal::Alive, first));
        }
        if first == 0 {
            // A sweep that found it dead may have removed its list of scopes: written again.
            let scopes: Vec<Vec<(String, u16)>> = lock(&self.scopes).iter().map(|(_, qs)| qs.clone()).collect();
            self.register(id, &scopes).await?;
        }
        let scopes: Vec<Scope> = {
            let mut active = lock(&self.active);
            active.retain(|_, a| a.held > 0 || a.used.elapsed() < grace / 2);
            active.keys().cloned().collect()
        };
        // The holders' slot first (above), then the scopes, several at once: one after another,
        // thousands of scopes at a round trip each could outlast the grace.
        futures::stream::iter(scopes)
            .map(|scope| async move { self.beat(&scope, id, nonce, seq, grace, WHAT).await })
            .buffer_unordered(RENEWALS_AT_ONCE)
            .try_fold(renewal_of(Renewal::Alive, first), |renewal, r| async move { Ok(renewal_of(renewal, r)) })
            .await
    }

    /// [`scripts::recover`] over all of `workers` (a full `SSCAN` pass, bounded); on a cluster
    /// [`RedisBeat::sweep_holders`].
    async fn sweep(&self) {
        if self.keys.is_cluster() {
            if let Err(e) = self.sweep_holders().await {
                tracing::warn!(error = %e, "redis: sweep for dead workers failed; will retry");
            }
            return;
        }
        let scope = self.keys.holders();
        let recover = scripts::recover();
        let mut c = self.conn.clone();
        let mut cursor = 0u64;
        for _ in 0..STEPS_PER_TICK {
            let r: Result<(u64, u64, u64), _> = recover
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_listed_scope_names_its_queues_and_their_slot() {
        let keys = Keys::new("p:", Some(2));
        let queues = vec![("q".to_owned(), 1), ("q.dead".to_owned(), 1)];
        let member = serde_json::to_string(&queues).unwrap();
        assert_eq!(member, r#"[["q",1],["q.dead",1]]"#);
        let (scope, back) = scope_of(&keys, &member).expect("readable");
        assert_eq!((scope, back), (keys.scope("q", 1), queues));
        assert!(scope_of(&keys, "[]").is_none() && scope_of(&keys, "garbage").is_none());
        assert_ne!(keys.holders(), keys.scope("q", 1), "the holders' slot is not a queue's");
    }
}

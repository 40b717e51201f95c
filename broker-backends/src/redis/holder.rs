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

use std::time::Duration;

use async_trait::async_trait;
use celery_core::BrokerError;
use redis::AsyncCommands;

use super::connection::RedisConn;
use super::error::failed;
use super::keys::Keys;
use super::scripts;
use crate::liveness::{Heartbeat, Renewal};

/// Holders one sweep step looks at (a hint to `SSCAN`).
const HOLDERS_PER_STEP: u64 = 100;
/// Tags of one dead holder restored per step (the rest at the next step).
const TAGS_PER_STEP: u64 = 10_000;
/// Sweep steps per tick at most.
const STEPS_PER_TICK: usize = 100;

/// A holder of Redis deliveries.
pub(crate) type Holder = crate::liveness::Holder<RedisBeat>;

/// The heartbeat steps on Redis (the scripts of [`scripts`]).
#[derive(Debug)]
pub(crate) struct RedisBeat {
    conn: RedisConn,
    keys: Keys,
    heartbeat: redis::Script,
    recover: redis::Script,
}

impl RedisBeat {
    /// The steps on `conn`, with the keys `keys`.
    pub(crate) fn new(conn: RedisConn, keys: Keys) -> RedisBeat {
        RedisBeat { conn, keys, heartbeat: scripts::heartbeat(), recover: scripts::recover() }
    }

    /// True when the lease `tag` still exists (`HEXISTS unacked`); true too when Redis cannot say
    /// (an outcome is better stored twice than lost).
    pub(crate) async fn still_leased(&self, tag: &str) -> bool {
        let mut c = self.conn.clone();
        match c.hexists::<_, _, bool>(self.keys.unacked(), tag).await {
            Ok(held) => held,
            Err(e) => {
                tracing::warn!(error = %e, "redis: cannot check a lease; taking it as held");
                true
            }
        }
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

    async fn read(&self, id: &str) -> Result<Option<String>, BrokerError> {
        let mut c = self.conn.clone();
        c.get(self.keys.heartbeat(id)).await.map_err(failed("redis: read a worker heartbeat"))
    }

    /// [`scripts::claim`].
    async fn claim(&self, id: &str, nonce: &str, expected: &str, grace: Duration) -> Result<Option<u64>, BrokerError> {
        let mut c = self.conn.clone();
        let r: i64 = scripts::claim()
            .key(self.keys.heartbeat(id))
            .key(self.keys.held(id))
            .key(self.keys.workers())
            .key(self.keys.unacked())
            .key(self.keys.unacked_index())
            .arg(expected)
            .arg(format!("{nonce}:0"))
            .arg(ttl_ms(grace))
            .arg(id)
            .arg(self.keys.prefix())
            .invoke_async(&mut c)
            .await
            .map_err(failed("redis: register a worker heartbeat"))?;
        Ok(u64::try_from(r).ok())
    }

    /// [`scripts::heartbeat`].
    async fn renew(&self, id: &str, nonce: &str, seq: u64, grace: Duration) -> Result<Renewal, BrokerError> {
        let mut c = self.conn.clone();
        let r: i64 = self
            .heartbeat
            .key(self.keys.heartbeat(id))
            .key(self.keys.workers())
            .arg(nonce)
            .arg(format!("{nonce}:{seq}"))
            .arg(ttl_ms(grace))
            .arg(id)
            .invoke_async(&mut c)
            .await
            .map_err(failed("redis: renew a worker heartbeat"))?;
        Ok(match r {
            1 => Renewal::Alive,
            0 => Renewal::Lapsed,
            _ => Renewal::Taken,
        })
    }

    /// [`scripts::recover`] over all of `workers` (a full `SSCAN` pass, bounded).
    async fn sweep(&self) {
        let mut c = self.conn.clone();
        let mut cursor = 0u64;
        for _ in 0..STEPS_PER_TICK {
            let r: Result<(u64, u64, u64), _> = self
                .recover
                .key(self.keys.unacked())
                .key(self.keys.unacked_index())
                .key(self.keys.workers())
                .arg(self.keys.prefix())
                .arg(self.keys.heartbeat(""))
                .arg(self.keys.held(""))
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

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
//!   after, a delivery is checked before its outcome is stored ([`Liveness::surely_held`], else one
//!   `HEXISTS`), so the resumed worker does not store a second result over the one the worker that
//!   ran it again stores, and settling moves a message only while its lease exists.
//! - A worker restarted with the same name (Celery's node name, [`celery_core::Broker::set_worker_name`])
//!   restores what its earlier run left at once. When that name's heartbeat is still alive it first
//!   watches it for one and a half beats: renewed, another live process uses the name, and this one
//!   holds under `<name>#<nonce>` instead of robbing it.

use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use celery_core::BrokerError;
use redis::{AsyncCommands, Script};

use super::connection::RedisConn;
use super::error::failed;
use super::keys::Keys;
use super::scripts;
use crate::liveness::Liveness;

/// Holders one sweep step looks at (a hint to `SSCAN`).
const HOLDERS_PER_STEP: u64 = 100;
/// Tags of one dead holder restored per step (the rest at the next step).
const TAGS_PER_STEP: u64 = 10_000;
/// Sweep steps per tick at most.
const STEPS_PER_TICK: usize = 100;
/// The longest worker name used as a holder as is (a longer one holds under a random name).
const MAX_NAME: usize = 200;

/// One consuming broker instance's identity and heartbeat state.
#[derive(Debug)]
pub(crate) struct Holder {
    id: String,
    nonce: String,
    liveness: Liveness,
    conn: RedisConn,
    keys: Keys,
}

impl Holder {
    /// Registers a holder (named `worker`, or anonymous) and starts its heartbeat. A named one
    /// first restores what an earlier run under that name left (see the module's header).
    pub(crate) async fn start(
        conn: RedisConn,
        keys: Keys,
        worker: Option<&str>,
        beat: Duration,
        grace: Duration,
    ) -> Result<Arc<Holder>, BrokerError> {
        let nonce = uuid::Uuid::new_v4().simple().to_string();
        let id = match worker {
            Some(w) if !w.is_empty() && w.len() <= MAX_NAME => w.to_owned(),
            Some(w) => {
                tracing::warn!(
                    len = w.len(),
                    "redis: worker name too long to hold deliveries under; using a random one"
                );
                format!("anonymous#{nonce}")
            }
            None => format!("anonymous#{nonce}"),
        };
        let mut holder = Holder { id, nonce, liveness: Liveness::new(grace), conn, keys };
        let mut seen: Option<String> = {
            let mut c = holder.conn.clone();
            c.get(holder.keys.heartbeat(&holder.id)).await.map_err(failed("redis: read a worker heartbeat"))?
        };
        if seen.is_some() {
            // Alive a moment ago: an earlier run that just died, or a live process using the name.
            tokio::time::sleep((beat * 3 / 2).min(grace)).await;
        }
        for attempt in 0..2 {
            let sent = Instant::now();
            if let Some(restored) = holder.claim(seen.as_deref().unwrap_or("")).await? {
                holder.liveness.renewed(sent);
                if restored > 0 {
                    tracing::warn!(
                        restored,
                        worker = %holder.id,
                        "redis: restored the deliveries an earlier run of this worker left unsettled"
                    );
                }
                let holder = Arc::new(holder);
                tokio::spawn(beat_loop(Arc::downgrade(&holder), beat));
                return Ok(holder);
            }
            if attempt == 0 {
                tracing::warn!(
                    worker = %holder.id,
                    "redis: another live process consumes as this worker; give each worker its own name (-n)"
                );
                holder.id = format!("{}#{}", holder.id, holder.nonce);
                seen = None;
            }
        }
        Err(BrokerError::operation("redis: could not register this worker's heartbeat"))
    }
    /// The name the fetch records tags under.
    pub(crate) fn id(&self) -> &str {
        &self.id
    }

    /// What it knows of its own heartbeat (read the epoch before a fetch).
    pub(crate) fn liveness(&self) -> &Liveness {
        &self.liveness
    }

    fn ttl_ms(&self) -> u64 {
        u64::try_from(self.liveness.grace().as_millis()).unwrap_or(u64::MAX).max(1)
    }

    /// Runs [`scripts::claim`]: `Some(restored)`, or `None` when the key no longer holds `expected`.
    async fn claim(&self, expected: &str) -> Result<Option<u64>, BrokerError> {
        let mut c = self.conn.clone();
        let r: i64 = scripts::claim()
            .key(self.keys.heartbeat(&self.id))
            .key(self.keys.held(&self.id))
            .key(self.keys.workers())
            .key(self.keys.unacked())
            .key(self.keys.unacked_index())
            .arg(expected)
            .arg(format!("{}:0", self.nonce))
            .arg(self.ttl_ms())
            .arg(&self.id)
            .arg(self.keys.prefix())
            .invoke_async(&mut c)
            .await
            .map_err(failed("redis: register a worker heartbeat"))?;
        Ok(u64::try_from(r).ok())
    }

    /// Renews the heartbeat (beat number `seq`) and notes what the reply says.
    async fn renew(&self, script: &Script, seq: u64) {
        let mut c = self.conn.clone();
        let sent = Instant::now();
        let r: Result<i64, _> = script
            .key(self.keys.heartbeat(&self.id))
            .key(self.keys.workers())
            .arg(&self.nonce)
            .arg(format!("{}:{seq}", self.nonce))
            .arg(self.ttl_ms())
            .arg(&self.id)
            .invoke_async(&mut c)
            .await;
        match r {
            Ok(1) => self.liveness.renewed(sent),
            Ok(0) => {
                self.liveness.lapsed(Some(sent));
                tracing::warn!(
                    worker = %self.id,
                    grace = ?self.liveness.grace(),
                    "redis: this worker's heartbeat lapsed (stalled longer than worker_grace); what it held may run elsewhere, and is not settled here twice"
                );
            }
            Ok(_) => {
                self.liveness.lapsed(None);
                tracing::error!(
                    worker = %self.id,
                    "redis: another process took over this worker's name; give each worker its own name (-n)"
                );
            }
            Err(e) => tracing::warn!(error = %e, "redis: heartbeat renewal failed; will retry"),
        }
    }

    /// Restores what holders without a heartbeat held (a full pass over `workers`, bounded).
    async fn sweep(&self, script: &Script) {
        let mut c = self.conn.clone();
        let mut cursor = 0u64;
        for _ in 0..STEPS_PER_TICK {
            let r: Result<(u64, u64, u64), _> = script
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

/// Renews the heartbeat every `beat` and sweeps for dead holders, until the holder is dropped.
async fn beat_loop(holder: Weak<Holder>, beat: Duration) {
    let (heartbeat, recover) = (scripts::heartbeat(), scripts::recover());
    let mut tick = tokio::time::interval(beat);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut seq = 1u64;
    loop {
        let Some(h) = holder.upgrade() else { return };
        h.sweep(&recover).await;
        drop(h);
        tick.tick().await;
        let Some(h) = holder.upgrade() else { return };
        h.renew(&heartbeat, seq).await;
        seq += 1;
    }
}

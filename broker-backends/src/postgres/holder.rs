//! Workers' heartbeats: a dead worker's tasks come back in seconds, not after the visibility
//! timeout.
//!
//! Every broker instance that consumes is a *holder*: a row of `celery_rs_workers` (its name, a
//! nonce per process, `alive_until`) renewed every `worker_heartbeat` to now + `worker_grace`,
//! and the fetch writes the holder's name into each row it leases (`holder`). Each tick, after
//! renewing, a holder runs [`sql::RESTORE_DEAD`]: the rows of workers whose `alive_until` passed
//! are deleted and what they held goes back to its queues in the same statement, exactly once
//! however many sweep; the next fetch counts the delivery (`deliveries`, also the fencing token,
//! so the stalled worker's own settling changes nothing any more).
//!
//! The same choices as on Redis (`redis/holder.rs`): 2 s and 10 s by default, the server's clock
//! only (`now()` in every statement), a delivery checked before its outcome is stored
//! ([`Liveness::surely_held`], else one `SELECT`), and a restart under the same name returning its
//! earlier run's tasks at once after watching a live row for one and a half beats.

use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use celery_core::BrokerError;

use super::{sql, Db};
use crate::liveness::Liveness;

/// The longest worker name used as a holder as is (a longer one holds under a random name).
const MAX_NAME: usize = 200;

/// One consuming broker instance's identity and heartbeat state.
#[derive(Debug)]
pub(crate) struct Holder {
    id: String,
    nonce: String,
    liveness: Liveness,
    db: Db,
    /// The tasks channel, notified when tasks are returned.
    channel: String,
}

impl Holder {
    /// Registers a holder (named `worker`, or anonymous), returning what an earlier run under that
    /// name held, and starts its heartbeat.
    pub(crate) async fn start(
        db: Db,
        channel: String,
        worker: Option<&str>,
        beat: Duration,
        grace: Duration,
    ) -> Result<Arc<Holder>, BrokerError> {
        let nonce = uuid::Uuid::new_v4().simple().to_string();
        let id = match worker {
            Some(w) if !w.is_empty() && w.len() <= MAX_NAME => w.to_owned(),
            _ => format!("anonymous#{nonce}"),
        };
        let mut holder = Holder { id, nonce, liveness: Liveness::new(grace), db, channel };
        let rows = holder.db.query("read a worker heartbeat", sql::WORKER_SEEN, &[&holder.id]).await?;
        let mut seen: String = rows.first().map(|r| r.get(0)).unwrap_or_default();
        if !seen.is_empty() {
            // Alive a moment ago: an earlier run that just died, or a live process using the name.
            tokio::time::sleep((beat * 3 / 2).min(grace)).await;
        }
        for attempt in 0..2 {
            let sent = Instant::now();
            if let Some(returned) = holder.claim(&seen).await? {
                holder.liveness.renewed(sent);
                if returned > 0 {
                    tracing::warn!(
                        returned,
                        worker = %holder.id,
                        "postgresql: returned the tasks an earlier run of this worker left unsettled"
                    );
                }
                let holder = Arc::new(holder);
                tokio::spawn(beat_loop(Arc::downgrade(&holder), beat));
                return Ok(holder);
            }
            if attempt == 0 {
                tracing::warn!(
                    worker = %holder.id,
                    "postgresql: another live process consumes as this worker; give each worker its own name (-n)"
                );
                holder.id = format!("{}#{}", holder.id, holder.nonce);
                seen.clear();
            }
        }
        Err(BrokerError::operation("postgresql: could not register this worker's heartbeat"))
    }

    /// The name the fetch writes into the rows it leases.
    pub(crate) fn id(&self) -> &str {
        &self.id
    }

    /// What it knows of its own heartbeat (read the epoch before a fetch).
    pub(crate) fn liveness(&self) -> &Liveness {
        &self.liveness
    }

    fn grace_secs(&self) -> f64 {
        self.liveness.grace().as_secs_f64()
    }

    /// Runs [`sql::CLAIM`]: `Some(returned)`, or `None` when the row no longer reads `expected`.
    async fn claim(&self, expected: &str) -> Result<Option<i64>, BrokerError> {
        let rows = self
            .db
            .query(
                "register a worker heartbeat",
                sql::CLAIM,
                &[&self.id, &self.nonce, &self.grace_secs(), &expected, &self.channel],
            )
            .await?;
        let (registered, returned): (i64, i64) = rows.first().map_or((0, 0), |r| (r.get(0), r.get(1)));
        Ok((registered > 0).then_some(returned))
    }

    /// Renews the heartbeat and notes what the reply says.
    async fn renew(&self) {
        let sent = Instant::now();
        let r = self
            .db
            .query("renew a worker heartbeat", sql::HEARTBEAT, &[&self.id, &self.nonce, &self.grace_secs()])
            .await;
        match r.map(|rows| rows.first().map_or(-1, |r| r.get::<_, i32>(0))) {
            Ok(1) => self.liveness.renewed(sent),
            Ok(0) => {
                self.liveness.lapsed(Some(sent));
                tracing::warn!(
                    worker = %self.id,
                    grace = ?self.liveness.grace(),
                    "postgresql: this worker's heartbeat lapsed (stalled longer than worker_grace); what it held may run elsewhere, and is not settled here twice"
                );
            }
            Ok(_) => {
                self.liveness.lapsed(None);
                tracing::error!(
                    worker = %self.id,
                    "postgresql: another process took over this worker's name; give each worker its own name (-n)"
                );
            }
            Err(e) => tracing::warn!(error = %e, "postgresql: heartbeat renewal failed; will retry"),
        }
    }

    /// Returns what workers whose heartbeat expired held.
    async fn sweep(&self) {
        match self.db.query("return dead workers' tasks", sql::RESTORE_DEAD, &[&self.channel]).await {
            Ok(rows) => {
                let n: i64 = rows.iter().map(|r| r.get::<_, i64>(1)).sum();
                if n > 0 {
                    tracing::warn!(restored = n, "postgresql: returned the tasks of workers whose heartbeat stopped");
                }
            }
            Err(e) => tracing::warn!(error = %e, "postgresql: sweep for dead workers failed; will retry"),
        }
    }

    /// True when row `id` is still leased under `token`; true too when the database cannot say
    /// (an outcome is better stored twice than lost).
    pub(crate) async fn still_leased(&self, id: i64, token: i32) -> bool {
        match self.db.query("check a lease", sql::HELD, &[&id, &token]).await {
            Ok(rows) => rows.first().is_none_or(|r| r.get::<_, bool>(0)),
            Err(e) => {
                tracing::warn!(error = %e, "postgresql: cannot check a lease; taking it as held");
                true
            }
        }
    }
}

/// Renews the heartbeat every `beat` and sweeps for dead workers, until the holder is dropped.
async fn beat_loop(holder: Weak<Holder>, beat: Duration) {
    let mut tick = tokio::time::interval(beat);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let Some(h) = holder.upgrade() else { return };
        h.sweep().await;
        drop(h);
        tick.tick().await;
        let Some(h) = holder.upgrade() else { return };
        h.renew().await;
    }
}

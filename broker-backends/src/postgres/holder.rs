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
//! ([`crate::liveness::Liveness::surely_held`], else one `SELECT`), and a restart under the same
//! name returning its earlier run's tasks at once. The registration and the loop are
//! [`crate::liveness`]'s; the statements are here.

use std::time::Duration;

use async_trait::async_trait;
use celery_core::BrokerError;

use super::{sql, Db};
use crate::liveness::{Heartbeat, Renewal};

/// A holder of PostgreSQL leases.
pub(crate) type Holder = crate::liveness::Holder<PgBeat>;

/// The heartbeat steps on PostgreSQL (the statements of [`sql`]).
#[derive(Debug)]
pub(crate) struct PgBeat {
    db: Db,
    /// The tasks channel, notified when tasks are returned.
    channel: String,
}

impl PgBeat {
    /// The steps on `db`, notifying `channel` when tasks are returned.
    pub(crate) fn new(db: Db, channel: String) -> PgBeat {
        PgBeat { db, channel }
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

#[async_trait]
impl Heartbeat for PgBeat {
    fn broker(&self) -> &'static str {
        "postgresql"
    }

    async fn read(&self, id: &str) -> Result<Option<String>, BrokerError> {
        let rows = self.db.query("read a worker heartbeat", sql::WORKER_SEEN, &[&id]).await?;
        Ok(rows.first().map(|r| r.get(0)))
    }

    /// `<nonce> <alive_until>` ([`sql::WORKER_SEEN`]).
    fn nonces<'a>(&self, seen: &'a str) -> Vec<&'a str> {
        seen.split_once(' ').map(|(n, _)| n).into_iter().collect()
    }

    /// [`sql::CLAIM`].
    async fn claim(&self, id: &str, nonce: &str, expected: &str, grace: Duration) -> Result<Option<u64>, BrokerError> {
        let rows = self
            .db
            .query(
                "register a worker heartbeat",
                sql::CLAIM,
                &[&id, &nonce, &grace.as_secs_f64(), &expected, &self.channel],
            )
            .await?;
        let (registered, returned): (i64, i64) = rows.first().map_or((0, 0), |r| (r.get(0), r.get(1)));
        Ok((registered > 0).then(|| u64::try_from(returned).unwrap_or(0)))
    }

    /// [`sql::HEARTBEAT`].
    async fn renew(&self, id: &str, nonce: &str, _seq: u64, grace: Duration) -> Result<Renewal, BrokerError> {
        let rows =
            self.db.query("renew a worker heartbeat", sql::HEARTBEAT, &[&id, &nonce, &grace.as_secs_f64()]).await?;
        Ok(match rows.first().map_or(-1, |r| r.get::<_, i32>(0)) {
            1 => Renewal::Alive,
            0 => Renewal::Lapsed,
            _ => Renewal::Taken,
        })
    }

    /// [`sql::RESTORE_DEAD`].
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
}

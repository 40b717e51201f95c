//! Result expiry (Celery's `result_expires`): rows finished longer ago than the expiry are deleted
//! in batches of [`BATCH`] (`FOR UPDATE SKIP LOCKED`, so several processes sweeping at once share
//! the work instead of waiting on each other), with chord tallies untouched that long and lapsed
//! idempotency claims. Every process that connects the backend sweeps every `cleanup_interval`.

use std::time::Duration;

use celery_core::BackendError;
use deadpool_postgres::Pool;

use super::error::PgError;

/// Rows deleted per statement.
pub(crate) const BATCH: i64 = 1000;
/// The most batches per table in one sweep (the next sweep goes on).
const MAX_BATCHES: usize = 1000;

/// Our tables' expiry statements: `$1` the expiry in seconds, `$2` the batch size; each returns
/// the rows it deleted (chords counted, not their members).
const OURS: &[&str] = &[
    "WITH gone AS (DELETE FROM celery_rs_chord WHERE group_id IN (SELECT group_id FROM celery_rs_chord \
     WHERE updated_at < now() - make_interval(secs => $1) LIMIT $2 FOR UPDATE SKIP LOCKED) RETURNING group_id), \
     members AS (DELETE FROM celery_rs_chord_member WHERE group_id IN (SELECT group_id FROM gone)) \
     SELECT count(*) FROM gone",
    "WITH gone AS (DELETE FROM celery_rs_idempotency WHERE key IN (SELECT key FROM celery_rs_idempotency \
     WHERE expires_at < clock_timestamp() AND $1::float8 >= 0 LIMIT $2 FOR UPDATE SKIP LOCKED) RETURNING 1) \
     SELECT count(*) FROM gone",
];

/// Runs `statements` (each `$1` seconds, `$2` batch, returning `count(*)` of the rows it deleted)
/// until each deletes less than a batch; returns the rows deleted.
pub(crate) async fn sweep(pool: &Pool, statements: &[&str], expires: Duration) -> Result<u64, BackendError> {
    let c = pool.get().await.map_err(|e| PgError::pool("expire results", e))?;
    let secs = expires.as_secs_f64();
    let mut total = 0;
    for sql in statements.iter().chain(OURS) {
        let stmt = c.prepare_cached(sql).await.map_err(PgError::at("expire results"))?;
        for _ in 0..MAX_BATCHES {
            let n: i64 = c.query_one(&stmt, &[&secs, &BATCH]).await.map_err(PgError::at("expire results"))?.get(0);
            total += n.max(0) as u64;
            if n < BATCH {
                break;
            }
        }
    }
    Ok(total)
}

/// Sweeps every `interval` (with up to 10% jitter so processes started together spread out).
pub(crate) async fn run(pool: Pool, statements: Vec<&'static str>, expires: Duration, interval: Duration) {
    loop {
        let jitter = interval.mul_f64(rand::random::<f64>() * 0.1);
        tokio::time::sleep(interval + jitter).await;
        match sweep(&pool, &statements, expires).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(deleted = n, "postgresql results: expired rows deleted"),
            Err(e) => tracing::warn!(error = %e, "postgresql results: expiry sweep failed"),
        }
    }
}

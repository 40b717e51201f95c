//! Chord tallies and idempotency claims in our own tables (`celery_rs_chord`,
//! `celery_rs_chord_member`, `celery_rs_idempotency`), each operation one transaction.
//!
//! A chord's row is the lock: a member's report upserts it (taking its row lock until commit), adds
//! itself once (`ON CONFLICT DO NOTHING`), counts the members, and names itself `completed_by` when
//! it completes the chord and no other member did. Reports of one chord are thereby serialized, so
//! exactly one member sees the count reach the size, as [`celery_core::capability::Chords::chord_part`]
//! requires; the completing member reporting again gets the members again.

use std::time::Duration;

use celery_core::backend::ChordMember;
use celery_core::{BackendError, TaskState};
use deadpool_postgres::Object;

use super::error::PgError;

/// The longest idempotency key stored.
pub(crate) const MAX_KEY: usize = 1024;
/// The longest group or task id stored in our tables.
const MAX_ID: usize = 255;

fn check(what: &str, value: &str, max: usize) -> Result<(), BackendError> {
    super::check_len(what, value, "our tables", max)
}

pub(crate) async fn size(c: &Object, group_id: &str, size: usize) -> Result<(), BackendError> {
    check("group id", group_id, MAX_ID)?;
    let size =
        i32::try_from(size).map_err(|_| BackendError::operation(format!("postgresql: a chord of {size} members")))?;
    let stmt = c
        .prepare_cached(
            "INSERT INTO celery_rs_chord (group_id, size) VALUES ($1, $2) \
             ON CONFLICT (group_id) DO UPDATE SET size = EXCLUDED.size, updated_at = now()",
        )
        .await
        .map_err(PgError::at("chords and claims"))?;
    c.execute(&stmt, &[&group_id, &size]).await.map_err(PgError::at("chords and claims"))?;
    Ok(())
}

pub(crate) async fn part(
    c: &mut Object,
    group_id: &str,
    m: &ChordMember,
) -> Result<Option<Vec<ChordMember>>, BackendError> {
    check("group id", group_id, MAX_ID)?;
    check("task id", &m.task_id, MAX_ID)?;
    let result = serde_json::to_string(&m.result).map_err(|e| BackendError::Malformed(e.to_string()))?;
    let index = m.index.map(|i| i64::try_from(i).unwrap_or(i64::MAX));
    let tx = c.transaction().await.map_err(PgError::at("chords and claims"))?;
    let lock = tx
        .prepare_cached(
            "INSERT INTO celery_rs_chord (group_id) VALUES ($1) \
             ON CONFLICT (group_id) DO UPDATE SET updated_at = now() RETURNING size, completed_by",
        )
        .await
        .map_err(PgError::at("chords and claims"))?;
    let row = tx.query_one(&lock, &[&group_id]).await.map_err(PgError::at("chords and claims"))?;
    let size: Option<i32> = row.get(0);
    let completed_by: Option<String> = row.get(1);
    let add = tx
        .prepare_cached(
            "INSERT INTO celery_rs_chord_member (group_id, task_id, idx, state, result) VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT (group_id, task_id) DO NOTHING",
        )
        .await
        .map_err(PgError::at("chords and claims"))?;
    tx.execute(&add, &[&group_id, &m.task_id, &index, &m.state.as_str(), &result])
        .await
        .map_err(PgError::at("chords and claims"))?;
    let count = tx
        .prepare_cached("SELECT count(*) FROM celery_rs_chord_member WHERE group_id = $1")
        .await
        .map_err(PgError::at("chords and claims"))?;
    let n: i64 = tx.query_one(&count, &[&group_id]).await.map_err(PgError::at("chords and claims"))?.get(0);
    let complete = size.is_some_and(|s| n >= i64::from(s));
    if !complete || completed_by.as_ref().is_some_and(|by| *by != m.task_id) {
        tx.commit().await.map_err(PgError::at("chords and claims"))?;
        return Ok(None);
    }
    let mark = tx
        .prepare_cached("UPDATE celery_rs_chord SET completed_by = $2 WHERE group_id = $1")
        .await
        .map_err(PgError::at("chords and claims"))?;
    tx.execute(&mark, &[&group_id, &m.task_id]).await.map_err(PgError::at("chords and claims"))?;
    let all = tx
        .prepare_cached(
            "SELECT task_id, idx, state, result FROM celery_rs_chord_member WHERE group_id = $1 \
             ORDER BY idx NULLS LAST, task_id",
        )
        .await
        .map_err(PgError::at("chords and claims"))?;
    let rows = tx.query(&all, &[&group_id]).await.map_err(PgError::at("chords and claims"))?;
    tx.commit().await.map_err(PgError::at("chords and claims"))?;
    let mut members = Vec::with_capacity(rows.len());
    for r in rows {
        let task_id: String = r.get(0);
        let idx: Option<i64> = r.get(1);
        let state: String = r.get(2);
        let result: String = r.get(3);
        members.push(ChordMember {
            state: state
                .parse::<TaskState>()
                .map_err(|e| BackendError::Malformed(format!("celery_rs_chord_member {task_id}: {e}")))?,
            result: serde_json::from_str(&result)
                .map_err(|e| BackendError::Malformed(format!("celery_rs_chord_member {task_id}: {e}")))?,
            index: idx.and_then(|i| u64::try_from(i).ok()),
            task_id,
        });
    }
    Ok(Some(members))
}

pub(crate) async fn done(c: &mut Object, group_id: &str) -> Result<(), BackendError> {
    let tx = c.transaction().await.map_err(PgError::at("chords and claims"))?;
    tx.execute("DELETE FROM celery_rs_chord_member WHERE group_id = $1", &[&group_id])
        .await
        .map_err(PgError::at("chords and claims"))?;
    tx.execute("DELETE FROM celery_rs_chord WHERE group_id = $1", &[&group_id])
        .await
        .map_err(PgError::at("chords and claims"))?;
    Ok(tx.commit().await.map_err(PgError::at("chords and claims"))?)
}

/// Claims `key` for `task_id` unless a live claim holds it: None when claimed, else the holder.
pub(crate) async fn claim(c: &Object, key: &str, task_id: &str, ttl: Duration) -> Result<Option<String>, BackendError> {
    check("idempotency key", key, MAX_KEY)?;
    check("task id", task_id, MAX_ID)?;
    let secs = celery_core::clock::ttl(ttl).as_secs_f64().max(0.001);
    let take = c
        .prepare_cached(
            "INSERT INTO celery_rs_idempotency AS i (key, task_id, expires_at) \
             VALUES ($1, $2, clock_timestamp() + make_interval(secs => $3)) \
             ON CONFLICT (key) DO UPDATE SET task_id = EXCLUDED.task_id, expires_at = EXCLUDED.expires_at \
             WHERE i.expires_at <= clock_timestamp() RETURNING task_id",
        )
        .await
        .map_err(PgError::at("chords and claims"))?;
    let holder = c
        .prepare_cached("SELECT task_id FROM celery_rs_idempotency WHERE key = $1 AND expires_at > clock_timestamp()")
        .await
        .map_err(PgError::at("chords and claims"))?;
    // A claim that expires between the two statements lets the next round take it.
    for _ in 0..8 {
        if c.query_opt(&take, &[&key, &task_id, &secs]).await.map_err(PgError::at("chords and claims"))?.is_some() {
            return Ok(None);
        }
        if let Some(row) = c.query_opt(&holder, &[&key]).await.map_err(PgError::at("chords and claims"))? {
            return Ok(Some(row.get(0)));
        }
    }
    Err(BackendError::connection(format!("postgresql: idempotency key `{key}` kept changing hands")))
}

pub(crate) async fn unclaim(c: &Object, key: &str, task_id: &str) -> Result<(), BackendError> {
    let stmt = c
        .prepare_cached("DELETE FROM celery_rs_idempotency WHERE key = $1 AND task_id = $2")
        .await
        .map_err(PgError::at("chords and claims"))?;
    c.execute(&stmt, &[&key, &task_id]).await.map_err(PgError::at("chords and claims"))?;
    Ok(())
}

//! Celery's `celery_taskmeta` rows, read and written as Celery 5.7's database backend does.
//!
//! | column | written | read |
//! |---|---|---|
//! | `id` | `nextval('task_id_sequence')` on insert | — |
//! | `task_id` | the task id | the key |
//! | `status` | the state name | parsed; an unknown state is an error |
//! | `result` | the JSON of the value (or exception document) | JSON; an old row's pickle (`0x80...`) through [`super::pickle`] |
//! | `date_done` | UTC, naive, for ready states; NULL otherwise | as `2024-01-01T00:00:00.000000+00:00` |
//! | `traceback` | text | text |
//! | `children` | JSON list, NULL when empty | JSON (or pickle); absent column: `[]` |
//! | `name`, `worker`, `retries`, `queue` | when the table has the extended columns | when present |
//! | `args`, `kwargs`, `stamps` | left as they are (we do not carry them) | not read |
//!
//! A SUCCESS already stored is never overwritten: the upsert's `WHERE` leaves such a row alone.

use celery_core::protocol::format_time;
use celery_core::{BackendError, TaskMeta, TaskState};
use chrono::{DateTime, NaiveDateTime, Utc};
use deadpool_postgres::{GenericClient, Object};
use serde_json::Value;

use super::error::PgError;
use super::pickle;

/// The longest `result` or `children` value read, in bytes.
pub(crate) const MAX_VALUE_BYTES: usize = 64 << 20;

/// The most a row's large columns (`result`, `traceback`, `children`; Django's `result`,
/// `traceback`, `meta`) may add up to: a larger row is refused from its size, which the statement
/// reads first, before any of them is sent.
pub(crate) const MAX_ROW_BYTES: usize = 64 << 20;

/// `SELECT` of `cols` from `table` for `$1` (its `task_id`): first the bytes the `large` columns
/// add up to, then the columns, the large ones only when that is at most [`MAX_ROW_BYTES`].
pub(crate) fn bounded_select(table: &str, cols: &[&str], large: &[&str]) -> String {
    let size: Vec<String> = large.iter().map(|c| format!("coalesce(octet_length(t.{c}), 0)")).collect();
    let shown: Vec<String> = cols
        .iter()
        .map(|c| {
            if large.contains(c) {
                format!("CASE WHEN s.size <= {MAX_ROW_BYTES} THEN t.{c} END")
            } else {
                format!("t.{c}")
            }
        })
        .collect();
    format!(
        "SELECT s.size, {} FROM {table} t, LATERAL (SELECT ({})::bigint AS size) s WHERE t.task_id = $1",
        shown.join(", "),
        size.join(" + ")
    )
}

/// Refuses a row whose large columns add up to more than [`MAX_ROW_BYTES`] (column 0 of
/// [`bounded_select`]'s row).
pub(crate) fn check_row_size(row: &tokio_postgres::Row, table: &str, task_id: &str) -> Result<(), BackendError> {
    let size: i64 =
        row.try_get(0).map_err(|e| BackendError::Malformed(format!("{table} row of task {task_id}: {e}")))?;
    if size > MAX_ROW_BYTES as i64 {
        return Err(BackendError::Malformed(format!(
            "{table} row of task {task_id}: its result, traceback and children add up to {size} bytes, \
             more than {MAX_ROW_BYTES}: refused unread"
        )));
    }
    Ok(())
}

/// The longest task id Celery's `task_id` column holds.
pub(crate) const MAX_TASK_ID: usize = 155;

/// The rows of `celery_taskmeta` as this table has them.
#[derive(Debug, Clone)]
pub(crate) struct CeleryTable {
    children: bool,
    extended: bool,
    upsert: String,
    select: String,
}

impl CeleryTable {
    /// The statements for a table with `columns`.
    pub(crate) fn new(columns: &[String]) -> CeleryTable {
        let has = |c: &str| columns.iter().any(|x| x == c);
        let children = has("children");
        let extended = ["name", "worker", "retries", "queue"].iter().all(|c| has(c));
        let mut cols = vec!["status", "result", "date_done", "traceback"];
        if children {
            cols.push("children");
        }
        if extended {
            cols.extend(["name", "worker", "retries", "queue"]);
        }
        let params: Vec<String> = (0..cols.len()).map(|i| format!("${}", i + 2)).collect();
        let updates: Vec<String> = cols.iter().map(|c| format!("{c} = EXCLUDED.{c}")).collect();
        let upsert = format!(
            "INSERT INTO celery_taskmeta AS t (id, task_id, {}) VALUES (nextval('task_id_sequence'), $1, {}) \
             ON CONFLICT (task_id) DO UPDATE SET {} WHERE t.status IS DISTINCT FROM 'SUCCESS'",
            cols.join(", "),
            params.join(", "),
            updates.join(", ")
        );
        let large: &[&str] = if children { &["result", "traceback", "children"] } else { &["result", "traceback"] };
        let select = bounded_select("celery_taskmeta", &cols, large);
        CeleryTable { children, extended, upsert, select }
    }

    /// Upserts `meta` through `c` (a pooled client, or a transaction of one).
    pub(crate) async fn store(&self, c: &impl GenericClient, meta: &TaskMeta) -> Result<(), BackendError> {
        check_id(&meta.task_id)?;
        let result = serde_json::to_vec(&meta.result).map_err(|e| BackendError::Malformed(e.to_string()))?;
        let date_done = meta.status.is_ready().then(|| naive_utc(meta.date_done.as_deref()));
        let children = if meta.children.is_empty() {
            None
        } else {
            Some(serde_json::to_vec(&meta.children).map_err(|e| BackendError::Malformed(e.to_string()))?)
        };
        let retries = meta.retries.map(|r| i32::try_from(r).unwrap_or(i32::MAX));
        let status = meta.status.as_str();
        // Informative columns of 155 characters: a longer name is cut to fit, not refused.
        let traceback = super::without_nul(&meta.traceback);
        let (name, worker, queue) =
            (super::clipped(&meta.name, 155), super::clipped(&meta.worker, 155), super::clipped(&meta.queue, 155));
        let mut params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> =
            vec![&meta.task_id, &status, &result, &date_done, &traceback];
        if self.children {
            params.push(&children);
        }
        if self.extended {
            params.extend([&name as &(dyn tokio_postgres::types::ToSql + Sync), &worker, &retries, &queue]);
        }
        let stmt = c.prepare_cached(&self.upsert).await.map_err(PgError::at("celery_taskmeta"))?;
        c.execute(&stmt, &params).await.map_err(PgError::at("celery_taskmeta"))?;
        Ok(())
    }

    pub(crate) async fn get(&self, c: &Object, task_id: &str) -> Result<Option<TaskMeta>, BackendError> {
        let stmt = c.prepare_cached(&self.select).await.map_err(PgError::at("celery_taskmeta"))?;
        let Some(row) = c.query_opt(&stmt, &[&task_id]).await.map_err(PgError::at("celery_taskmeta"))? else {
            return Ok(None);
        };
        check_row_size(&row, "celery_taskmeta", task_id)?;
        let at = |col: &str| format!("celery_taskmeta.{col} of task {task_id}");
        let status: Option<String> =
            row.try_get(1).map_err(|e| BackendError::Malformed(format!("{}: {e}", at("status"))))?;
        let status: TaskState = status
            .as_deref()
            .unwrap_or("PENDING")
            .parse()
            .map_err(|e: String| BackendError::Malformed(format!("{}: {e}", at("status"))))?;
        let raw: Option<Vec<u8>> =
            row.try_get(2).map_err(|e| BackendError::Malformed(format!("{}: {e}", at("result"))))?;
        let result = match raw {
            Some(raw) => decode_stored(&raw).map_err(|e| BackendError::Malformed(format!("{}: {e}", at("result"))))?,
            None => Value::Null,
        };
        let date_done: Option<NaiveDateTime> =
            row.try_get(3).map_err(|e| BackendError::Malformed(format!("{}: {e}", at("date_done"))))?;
        let mut meta = TaskMeta::new(task_id, status, result);
        meta.date_done = date_done.map(|d| format_time(d.and_utc()));
        meta.traceback = row.try_get(4).map_err(|e| BackendError::Malformed(format!("{}: {e}", at("traceback"))))?;
        let mut next = 5;
        if self.children {
            let raw: Option<Vec<u8>> =
                row.try_get(next).map_err(|e| BackendError::Malformed(format!("{}: {e}", at("children"))))?;
            next += 1;
            meta.children = match raw.map(|r| decode_stored(&r)).transpose() {
                Ok(Some(Value::Array(items))) => items,
                Ok(None | Some(Value::Null)) => Vec::new(),
                Ok(Some(other)) => {
                    return Err(BackendError::Malformed(format!("{}: not a list: {other}", at("children"))))
                }
                Err(e) => return Err(BackendError::Malformed(format!("{}: {e}", at("children")))),
            };
        }
        if self.extended {
            let text = |i: usize, col: &str| -> Result<Option<String>, BackendError> {
                row.try_get(i).map_err(|e| BackendError::Malformed(format!("{}: {e}", at(col))))
            };
            meta.name = text(next, "name")?;
            meta.worker = text(next + 1, "worker")?;
            let retries: Option<i32> =
                row.try_get(next + 2).map_err(|e| BackendError::Malformed(format!("{}: {e}", at("retries"))))?;
            meta.retries = retries.and_then(|r| u32::try_from(r).ok());
            meta.queue = text(next + 3, "queue")?;
        }
        Ok(Some(meta))
    }
}

/// Refuses a task id Celery's column cannot hold (see [`super::check_len`]).
pub(crate) fn check_id(task_id: &str) -> Result<(), BackendError> {
    super::check_len("task id", task_id, "celery_taskmeta.task_id", MAX_TASK_ID)
}

/// A stored `result`/`children`: Celery 5.7 writes the serializer's JSON; older Celery pickled the
/// value (SQLAlchemy's `PickleType`), which starts with `0x80` and is read as plain values only.
pub(crate) fn decode_stored(raw: &[u8]) -> Result<Value, String> {
    if raw.len() > MAX_VALUE_BYTES {
        return Err(format!("{} bytes, more than {MAX_VALUE_BYTES}", raw.len()));
    }
    match serde_json::from_slice(raw) {
        Ok(v) => Ok(v),
        Err(json) if raw.first() == Some(&0x80) => {
            let limits = pickle::Limits { max_bytes: MAX_VALUE_BYTES, ..pickle::Limits::default() };
            pickle::loads(raw, &limits)
                .map_err(|e| {
                    tracing::warn!(error = %e, "postgresql: a stored pickle was refused");
                    e.to_string()
                })
                .map_err(|e| format!("{e} (and not JSON: {json})"))
        }
        Err(e) => Err(format!("not JSON: {e}")),
    }
}

/// A document's `date_done` as the naive UTC time Celery stores; now when it does not parse.
pub(crate) fn naive_utc(date_done: Option<&str>) -> NaiveDateTime {
    date_done
        .and_then(|s| DateTime::parse_from_rfc3339(s).ok())
        .map(|d| d.with_timezone(&Utc))
        .unwrap_or_else(Utc::now)
        .naive_utc()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statements_follow_the_columns() {
        let all: Vec<String> = [
            "id",
            "task_id",
            "status",
            "result",
            "date_done",
            "traceback",
            "children",
            "name",
            "args",
            "kwargs",
            "worker",
            "retries",
            "queue",
            "stamps",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let t = CeleryTable::new(&all);
        assert!(t.extended && t.children);
        assert!(t.upsert.contains("children, name, worker, retries, queue) VALUES (nextval('task_id_sequence'), $1, $2, $3, $4, $5, $6, $7, $8, $9, $10)"), "{}", t.upsert);
        assert!(t.upsert.ends_with("WHERE t.status IS DISTINCT FROM 'SUCCESS'"));
        // Celery 5.6's plain table: no children, no extended columns.
        let t = CeleryTable::new(&all[..6]);
        assert!(!t.extended && !t.children);
        assert_eq!(
            t.select,
            "SELECT s.size, t.status, CASE WHEN s.size <= 67108864 THEN t.result END, t.date_done, \
             CASE WHEN s.size <= 67108864 THEN t.traceback END FROM celery_taskmeta t, LATERAL (SELECT \
             (coalesce(octet_length(t.result), 0) + coalesce(octet_length(t.traceback), 0))::bigint AS size) s \
             WHERE t.task_id = $1"
        );
    }

    #[test]
    fn stored_values_are_json_or_plain_pickles() {
        assert_eq!(decode_stored(br#"{"a": 1}"#), Ok(serde_json::json!({"a": 1})));
        assert_eq!(decode_stored(b"null"), Ok(Value::Null));
        // pickle.dumps(5, protocol=4) as SQLAlchemy's PickleType wrote it.
        assert_eq!(decode_stored(b"\x80\x04K\x05."), Ok(serde_json::json!(5)));
        let e = decode_stored(b"\x80\x02cposix\nsystem\nq\x00X\x02\x00\x00\x00idq\x01\x85q\x02Rq\x03.").unwrap_err();
        assert!(e.contains("refused") && e.contains("GLOBAL"), "{e}");
        assert!(decode_stored(b"\x01garbage").unwrap_err().contains("not JSON"));
    }

    #[test]
    fn date_done_is_naive_utc() {
        let d = naive_utc(Some("2024-05-01T12:00:00.000000+02:00"));
        assert_eq!(format_time(d.and_utc()), "2024-05-01T10:00:00.000000+00:00");
        assert!(naive_utc(Some("garbage")) > naive_utc(Some("2024-05-01T12:00:00+00:00")));
    }
}

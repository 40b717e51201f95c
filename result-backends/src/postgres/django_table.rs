//! django-celery-results' `django_celery_results_taskresult` rows, read and written as its
//! `DatabaseBackend` does (django-celery-results 2.6).
//!
//! Django owns this table: its migrations create it (`python manage.py migrate
//! django_celery_results`), and connecting fails with that advice when it is missing. We only add
//! the trigger that wakes waiters (a migration of ours).
//!
//! | column | written | read |
//! |---|---|---|
//! | `task_id`, `status`, `traceback` | as is | as is |
//! | `content_type`, `content_encoding` | `application/json`, `utf-8` | `result` decoded by them (JSON, or a plain-values pickle; `binary` is base64) |
//! | `result` | JSON text | see above |
//! | `meta` | `{"children": [...]}` | `children` |
//! | `date_done` | every write (Django's `auto_now`) | as `...+00:00` |
//! | `date_created` | on insert (`auto_now_add`) | — |
//! | `date_started` | when STARTED | — |
//! | `task_name`, `worker` | when known | `name`, `worker` |
//! | `task_args`, `task_kwargs`, `periodic_task_name` | left as they are | — |
//!
//! As in every backend of ours, a SUCCESS already stored is never overwritten.

use base64::Engine as _;
use celery_core::protocol::format_time;
use celery_core::{BackendError, TaskMeta, TaskState};
use chrono::{DateTime, Utc};
use deadpool_postgres::{GenericClient, Object};
use serde_json::Value;

use super::celery_table::{bounded_select, check_row_size, decode_stored, MAX_VALUE_BYTES};
use super::error::PgError;
use super::migrate::Migration;
use super::pickle;

/// The table.
pub(crate) const TABLE: &str = "django_celery_results_taskresult";

/// The longest task id the table's `task_id` holds (Django's default `max_length`).
const MAX_TASK_ID: usize = 255;

/// Our additions to Django's table.
pub(crate) const MIGRATIONS: &[Migration] = &[Migration {
    version: 1,
    name: "notify waiters when a django_celery_results_taskresult row changes",
    sql: "
CREATE OR REPLACE FUNCTION celery_rs_notify_result() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('celery_rs_results', coalesce(NEW.task_id, ''));
    RETURN NULL;
END $$;
DROP TRIGGER IF EXISTS celery_rs_notify ON django_celery_results_taskresult;
CREATE TRIGGER celery_rs_notify AFTER INSERT OR UPDATE ON django_celery_results_taskresult
    FOR EACH ROW EXECUTE FUNCTION celery_rs_notify_result();
",
}];

/// Expiry (django-celery-results' `delete_expired`): `$1` seconds, `$2` batch; returns the count.
pub(crate) const EXPIRY: &str = "WITH gone AS (DELETE FROM django_celery_results_taskresult WHERE id IN (SELECT id FROM \
     django_celery_results_taskresult WHERE date_done < now() - make_interval(secs => $1) LIMIT $2 FOR UPDATE SKIP LOCKED) \
     RETURNING 1) SELECT count(*) FROM gone";

/// Fails with Django's advice when the table is missing.
pub(crate) async fn require(c: &Object) -> Result<(), BackendError> {
    let row = c
        .query_one("SELECT to_regclass($1)::text", &[&TABLE])
        .await
        .map_err(PgError::at("django_celery_results_taskresult"))?;
    let found: Option<String> = row.get(0);
    if found.is_none() {
        return Err(BackendError::operation(format!(
            "postgresql: table {TABLE} does not exist in this database's search_path; \
             create it with Django: python manage.py migrate django_celery_results"
        )));
    }
    Ok(())
}

/// The statements for the table as its migrations left it.
#[derive(Debug, Clone)]
pub(crate) struct DjangoTable {
    upsert: String,
    select: String,
}

impl DjangoTable {
    pub(crate) fn new(columns: &[String]) -> DjangoTable {
        let has = |c: &str| columns.iter().any(|x| x == c);
        let mut cols = vec![
            "task_id",
            "status",
            "content_type",
            "content_encoding",
            "result",
            "date_done",
            "traceback",
            "meta",
            "task_name",
            "worker",
        ];
        let mut values = vec!["$1", "$2::varchar", "'application/json'", "'utf-8'", "$3", "$4", "$5", "$6", "$7", "$8"];
        let mut updates: Vec<String> = cols[1..].iter().map(|c| format!("{c} = EXCLUDED.{c}")).collect();
        if has("date_created") {
            cols.push("date_created");
            values.push("now()");
        }
        if has("date_started") {
            cols.push("date_started");
            values.push("CASE WHEN $2::varchar = 'STARTED' THEN now() END");
            updates.push("date_started = coalesce(EXCLUDED.date_started, t.date_started)".into());
        }
        let upsert = format!(
            "INSERT INTO {TABLE} AS t ({}) VALUES ({}) ON CONFLICT (task_id) DO UPDATE SET {} \
             WHERE t.status IS DISTINCT FROM 'SUCCESS'",
            cols.join(", "),
            values.join(", "),
            updates.join(", ")
        );
        let select = bounded_select(
            TABLE,
            &[
                "status",
                "content_type",
                "content_encoding",
                "result",
                "date_done",
                "traceback",
                "meta",
                "task_name",
                "worker",
            ],
            &["result", "traceback", "meta"],
        );
        DjangoTable { upsert, select }
    }

    /// Upserts `meta` through `c` (a pooled client, or a transaction of one).
    pub(crate) async fn store(&self, c: &impl GenericClient, meta: &TaskMeta) -> Result<(), BackendError> {
        check_id(&meta.task_id)?;
        let malformed = |e: serde_json::Error| BackendError::Malformed(e.to_string());
        let result = serde_json::to_string(&meta.result).map_err(malformed)?;
        let extra = serde_json::to_string(&serde_json::json!({"children": meta.children})).map_err(malformed)?;
        let date_done = meta
            .date_done
            .as_deref()
            .and_then(|s| DateTime::parse_from_rfc3339(s).ok())
            .map_or_else(Utc::now, |d| d.with_timezone(&Utc));
        let status = meta.status.as_str();
        // Informative columns (`task_name` 255, `worker` 100 characters): a longer value is cut
        // to fit, not refused (a pod's long host name would otherwise fail every store).
        let (name, worker) = (super::clipped(&meta.name, 255), super::clipped(&meta.worker, 100));
        let traceback = super::without_nul(&meta.traceback);
        let stmt = c.prepare_cached(&self.upsert).await.map_err(PgError::at("django_celery_results_taskresult"))?;
        c.execute(&stmt, &[&meta.task_id, &status, &result, &date_done, &traceback, &extra, &name, &worker])
            .await
            .map_err(PgError::at(TABLE))?;
        Ok(())
    }

    pub(crate) async fn get(&self, c: &Object, task_id: &str) -> Result<Option<TaskMeta>, BackendError> {
        let stmt = c.prepare_cached(&self.select).await.map_err(PgError::at("django_celery_results_taskresult"))?;
        let Some(row) =
            c.query_opt(&stmt, &[&task_id]).await.map_err(PgError::at("django_celery_results_taskresult"))?
        else {
            return Ok(None);
        };
        check_row_size(&row, TABLE, task_id)?;
        let bad = |col: &str, e: String| BackendError::Malformed(format!("{TABLE}.{col} of task {task_id}: {e}"));
        let status: String = row.try_get(1).map_err(|e| bad("status", e.to_string()))?;
        let status: TaskState = status.parse().map_err(|e: String| bad("status", e))?;
        let content_type: String = row.try_get(2).map_err(|e| bad("content_type", e.to_string()))?;
        let encoding: String = row.try_get(3).map_err(|e| bad("content_encoding", e.to_string()))?;
        let decode = |col: &str, text: Option<String>| -> Result<Value, BackendError> {
            match text.filter(|t| !t.is_empty()) {
                None => Ok(Value::Null),
                Some(t) => decode_content(&content_type, &encoding, &t).map_err(|e| bad(col, e)),
            }
        };
        let result = decode("result", row.try_get(4).map_err(|e| bad("result", e.to_string()))?)?;
        let mut meta = TaskMeta::new(task_id, status, result);
        let date_done: Option<DateTime<Utc>> = row.try_get(5).map_err(|e| bad("date_done", e.to_string()))?;
        meta.date_done = date_done.map(format_time);
        meta.traceback = row.try_get(6).map_err(|e| bad("traceback", e.to_string()))?;
        let extra = decode("meta", row.try_get(7).map_err(|e| bad("meta", e.to_string()))?)?;
        if let Some(Value::Array(children)) = extra.get("children") {
            meta.children = children.clone();
        }
        meta.name = row.try_get(8).map_err(|e| bad("task_name", e.to_string()))?;
        meta.worker = row.try_get(9).map_err(|e| bad("worker", e.to_string()))?;
        Ok(Some(meta))
    }
}

/// A `result` or `meta` text by its row's content type and encoding: JSON, or (binary, base64)
/// a plain-values pickle.
fn decode_content(content_type: &str, encoding: &str, text: &str) -> Result<Value, String> {
    if text.len() > MAX_VALUE_BYTES {
        return Err(format!("{} bytes, more than {MAX_VALUE_BYTES}", text.len()));
    }
    let raw = if encoding == "binary" {
        base64::engine::general_purpose::STANDARD.decode(text.trim()).map_err(|e| format!("not base64: {e}"))?
    } else {
        text.as_bytes().to_vec()
    };
    match content_type {
        "application/json" => serde_json::from_slice(&raw).map_err(|e| format!("not JSON: {e}")),
        "application/x-python-serialize" => {
            let limits = pickle::Limits { max_bytes: MAX_VALUE_BYTES, ..pickle::Limits::default() };
            pickle::loads(&raw, &limits).map_err(|e| e.to_string())
        }
        _ => decode_stored(&raw).map_err(|e| format!("content type `{content_type}`: {e}")),
    }
}

/// Refuses a task id the table's column cannot hold (see [`super::check_len`]).
pub(crate) fn check_id(task_id: &str) -> Result<(), BackendError> {
    super::check_len("task id", task_id, "django_celery_results_taskresult.task_id", MAX_TASK_ID)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statements_follow_the_columns() {
        let cols: Vec<String> =
            ["id", "task_id", "date_created", "date_started"].iter().map(|s| s.to_string()).collect();
        let t = DjangoTable::new(&cols);
        assert!(
            t.upsert.contains("date_created, date_started) VALUES ($1, $2::varchar, 'application/json', 'utf-8'"),
            "{}",
            t.upsert
        );
        let t = DjangoTable::new(&cols[..2]);
        assert!(!t.upsert.contains("date_created") && !t.upsert.contains("date_started"), "{}", t.upsert);
    }

    #[test]
    fn content_is_decoded_by_its_type() {
        assert_eq!(decode_content("application/json", "utf-8", "[1, 2]"), Ok(serde_json::json!([1, 2])));
        // base64 of pickle.dumps(5, protocol=4)
        assert_eq!(decode_content("application/x-python-serialize", "binary", "gARLBS4="), Ok(serde_json::json!(5)));
        // base64 of a protocol 2 os.system REDUCE pickle.
        let evil = base64::engine::general_purpose::STANDARD
            .encode(b"\x80\x02cposix\nsystem\nq\x00X\x02\x00\x00\x00idq\x01\x85q\x02Rq\x03.");
        let e = decode_content("application/x-python-serialize", "binary", &evil).unwrap_err();
        assert!(e.contains("refused"), "{e}");
        assert!(decode_content("application/json", "binary", "***").unwrap_err().contains("base64"));
    }
}

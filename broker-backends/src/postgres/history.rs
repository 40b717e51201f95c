//! The monitor's task history in PostgreSQL ([`celery_core::history`]): the table
//! `celery_rs_history (id, time_ms, name, state, worker, args, doc)`, one row per task (its latest
//! record as JSON in `doc`; `args` holds its arguments and keyword arguments for search), indexed
//! by `(time_ms, id)`. It is created on first use (migration component `history`), so a database
//! that never runs a monitor gets no table. A batch is one `INSERT ... ON CONFLICT DO UPDATE`;
//! each batch then deletes what is older than the retention and beyond the count. A search is one
//! query, filtered and paged (keyset on `(time_ms, id)`) by the server. The broker and the
//! PostgreSQL result backend share this store (the result backend's when the broker is RabbitMQ).

use std::collections::HashMap;
use std::sync::Arc;

use celery_core::history::{check_batch, check_query, Cursor, History, HistoryPage, HistoryQuery, Retain, TaskRecord};
use celery_core::BrokerError;
use deadpool_postgres::Pool;

use super::error::PgError;
use super::migrate::{self, Migration};

/// The migrations of the history table.
pub const MIGRATIONS: &[Migration] = &[Migration {
    version: 1,
    name: "task history",
    sql: "CREATE TABLE IF NOT EXISTS celery_rs_history (
        id text PRIMARY KEY,
        time_ms bigint NOT NULL,
        name text NOT NULL,
        state text NOT NULL,
        worker text NOT NULL,
        args text NOT NULL,
        doc text NOT NULL
    );
    CREATE INDEX IF NOT EXISTS celery_rs_history_time ON celery_rs_history (time_ms, id);",
}];

const UPSERT: &str = "INSERT INTO celery_rs_history (id, time_ms, name, state, worker, args, doc)
    SELECT * FROM unnest($1::text[], $2::bigint[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[])
    ON CONFLICT (id) DO UPDATE SET time_ms = excluded.time_ms, name = excluded.name, state = excluded.state,
        worker = excluded.worker, args = excluded.args, doc = excluded.doc";

const TRIM_AGE: &str = "DELETE FROM celery_rs_history WHERE time_ms < $1";

const TRIM_COUNT: &str = "DELETE FROM celery_rs_history h
    USING (SELECT time_ms, id FROM celery_rs_history ORDER BY time_ms DESC, id DESC OFFSET $1 LIMIT 1) c
    WHERE (h.time_ms, h.id) <= (c.time_ms, c.id)";

const SEARCH: &str = "SELECT doc, time_ms, id FROM celery_rs_history
    WHERE time_ms >= $1 AND time_ms < $2 AND (time_ms, id) < ($3, $4)
      AND ($5 = '' OR lower(id) LIKE $5)
      AND ($6 = '' OR name ILIKE $6)
      AND ($7 = '' OR upper(state) = upper($7))
      AND ($8 = '' OR worker ILIKE $8)
      AND ($9 = '' OR args ILIKE $9)
    ORDER BY time_ms DESC, id DESC LIMIT $10";

/// `s` as a `LIKE` pattern matching itself (`\` escapes).
fn literal(s: &str) -> String {
    s.replace('\\', "\\\\").replace('%', "\\%").replace('_', "\\_")
}

/// Task history in PostgreSQL (see the [module docs](self)).
///
/// ```no_run
/// # async fn demo(pool: deadpool_postgres::Pool) -> Result<(), celery_core::BrokerError> {
/// use broker_backends::postgres::history::PgHistory;
/// use celery_core::history::{History, HistoryQuery};
/// let history = PgHistory::new(pool);
/// let page = history.search(&HistoryQuery { name: "add".into(), ..HistoryQuery::default() }).await?;
/// println!("{} tasks", page.tasks.len());
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct PgHistory {
    pool: Pool,
    ready: Arc<tokio::sync::OnceCell<()>>,
}

impl std::fmt::Debug for PgHistory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgHistory").finish_non_exhaustive()
    }
}

impl PgHistory {
    /// The history in the database (and schema) of `pool`.
    pub fn new(pool: Pool) -> PgHistory {
        PgHistory { pool, ready: Arc::default() }
    }

    /// A connection, the table created first if this is the first use.
    async fn client(&self, what: &str) -> Result<deadpool_postgres::Object, PgError> {
        let mut client = self.pool.get().await.map_err(|e| PgError::pool(what, e))?;
        self.ready
            .get_or_try_init(|| async { migrate::migrate(&mut client, "history", MIGRATIONS).await.map(drop) })
            .await?;
        Ok(client)
    }
}

#[async_trait::async_trait]
impl History for PgHistory {
    async fn record(&self, tasks: &[TaskRecord], keep: &Retain) -> Result<(), BrokerError> {
        check_batch(tasks)?;
        // One row per id (the last record of it wins): an upsert may not touch a row twice.
        let mut latest: HashMap<&str, usize> = HashMap::new();
        for (i, t) in tasks.iter().enumerate() {
            latest.insert(&t.id, i);
        }
        let (mut ids, mut times, mut names, mut states, mut workers, mut args, mut docs) =
            (vec![], vec![], vec![], vec![], vec![], vec![], vec![]);
        for i in latest.into_values() {
            let t = tasks[i].bounded();
            docs.push(
                serde_json::to_string(&t).map_err(|e| BrokerError::operation_with("encoding a history record", e))?,
            );
            times.push(t.time_ms());
            args.push(format!("{} {}", t.args, t.kwargs));
            ids.push(t.id);
            names.push(t.name);
            states.push(t.state);
            workers.push(t.hostname);
        }
        let client = self.client("history: record").await?;
        client
            .execute(UPSERT, &[&ids, &times, &names, &states, &workers, &args, &docs])
            .await
            .map_err(PgError::at("history: record"))?;
        client
            .execute(TRIM_AGE, &[&keep.oldest_ms(celery_core::history::now_ms())])
            .await
            .map_err(PgError::at("history: trim by age"))?;
        let max = i64::try_from(keep.max_tasks).unwrap_or(i64::MAX);
        client.execute(TRIM_COUNT, &[&max]).await.map_err(PgError::at("history: trim by count"))?;
        Ok(())
    }

    async fn search(&self, query: &HistoryQuery) -> Result<HistoryPage, BrokerError> {
        check_query(query)?;
        let (since, until) = query.range_ms();
        let start = query.start().unwrap_or(Cursor { time_ms: i64::MAX, id: String::new() });
        let size = query.page_size();
        let contains = |s: &str| if s.is_empty() { String::new() } else { format!("%{}%", literal(s)) };
        let id = if query.id.is_empty() { String::new() } else { format!("{}%", literal(&query.id.to_lowercase())) };
        let (name, worker, text) = (contains(&query.name), contains(&query.worker), contains(&query.text));
        let limit = size as i64 + 1;
        let client = self.client("history: search").await?;
        let rows = client
            .query(
                SEARCH,
                &[&since, &until, &start.time_ms, &start.id, &id, &name, &query.state, &worker, &text, &limit],
            )
            .await
            .map_err(PgError::at("history: search"))?;
        let mut page = HistoryPage::default();
        for row in rows.iter().take(size) {
            let doc: String = row.get(0);
            match serde_json::from_str::<TaskRecord>(&doc) {
                Ok(t) => page.tasks.push(t),
                Err(e) => tracing::warn!(error = %e, "postgresql: an unreadable history record skipped"),
            }
        }
        if rows.len() > size {
            let last = &rows[size - 1];
            page.next = Some(Cursor { time_ms: last.get(1), id: last.get(2) }.encode());
        }
        Ok(page)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn like_patterns_match_their_text_literally() {
        assert_eq!(literal(r"50%_a\b"), r"50\%\_a\\b");
    }
}

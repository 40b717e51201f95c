//! PostgreSQL results in the tables Python already reads: `db+postgresql://USER@HOST:5432/DB`
//! (Celery's SQLAlchemy backend: `celery_taskmeta`, `celery_tasksetmeta`) and
//! `django-db+postgresql://...` (django-celery-results: `django_celery_results_taskresult`).
//!
//! What Python sees: rows as Celery 5.7 writes them (the result serializer's JSON in the binary
//! `result` and `children` columns, `date_done` in naive UTC, the `result_extended` columns `name`,
//! `worker`, `retries`, `queue` filled when the table has them), so `AsyncResult.get()` with
//! `result_backend='db+postgresql://...'` reads what our workers store; and we read what Python
//! stores, including rows of Celery before 5.7, whose pickled results are read as plain values
//! only by [`pickle`], which refuses every opcode that imports or calls anything.
//!
//! Tables are created at connect when missing, exactly as Celery creates them (the extended
//! layout); a table that Python created first is used as it is, with or without the extended or
//! `children` columns. Beside them, in the same database, our own tables (all `celery_rs_`):
//! the migration versions (`celery_rs_schema_version`, applied under an advisory lock so processes
//! starting together do not race), chord tallies and idempotency claims (one transaction each,
//! serialized on the chord's row), and a trigger that `NOTIFY`s each change of a result row, which
//! waiters `LISTEN` for (falling back to a 1 s poll while that connection reconnects). Finished
//! rows older than `result_expires` (default one day) are deleted in batches by every connected
//! process every `cleanup_interval`; [`PostgresBackend::cleanup`] does it at once. The URL options
//! are in [`url`].
//!
//! ## Why tokio-postgres and deadpool-postgres (not sqlx)
//! - Async on tokio, which the whole project runs on; no compile-time database connection or
//!   offline query cache (sqlx's checked macros need one, and its runtime API gives nothing more).
//! - Prepared statements cached per pooled connection (`prepare_cached`), and pipelining for free:
//!   concurrent statements on one client are sent without waiting for each other.
//! - `LISTEN/NOTIFY` is the connection's message stream (`Connection::poll_message`), under our
//!   control for reconnects; the broker's wake-ups use the same code ([`connect::listening`]).
//! - `COPY` (`copy_in`) and `binary_copy` for batches, which a broker's bulk enqueue wants.
//! - TLS through rustls (`tokio-postgres-rustls`), the same rustls and ring the AMQP and built-in
//!   brokers use; no OpenSSL.
//! - Small: deadpool adds a pool of a few hundred lines; the transaction API is the driver's own,
//!   so the transactional enqueue (`send_in`) takes a caller's `tokio_postgres::Transaction`.
//!
//! The connection, pool, migration and error code ([`connect`], [`migrate`], [`error`], and the
//! connection part of [`url`]) knows nothing of results: it lives in `broker_backends::postgres`,
//! which the PostgreSQL broker builds on too, and is re-exported here. A driver error is judged
//! there once ([`error::kind_of`]): a lost connection, a server going away or a lost race is a
//! [`BackendError::Connection`] (retried), anything else the statement's; each keeps the driver's
//! error as its source.
//!
//! ```no_run
//! # async fn demo() -> Result<(), celery_core::BackendError> {
//! use celery_core::ResultBackend;
//! let backend = result_backends::postgres::PostgresBackend::connect(
//!     "db+postgresql://postgres@127.0.0.1:5432/test?result_expires=3600",
//! )
//! .await?;
//! println!("{:?}", backend.get("some-task-id").await?);
//! # Ok(()) }
//! ```

mod celery_table;
mod chord;
mod django_table;
mod expiry;
mod listen;
pub mod pickle;
mod schema;
pub mod url;

use broker_backends::postgres::history::PgHistory;
/// Connections, pool, TLS and migrations, shared with the PostgreSQL broker (which owns them).
pub use broker_backends::postgres::{connect, error, migrate};

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use celery_core::backend::ChordMember;
use celery_core::capability::{Chords, Claims};
use celery_core::{BackendError, ResultBackend, TaskMeta};
use deadpool_postgres::Pool;

use self::celery_table::CeleryTable;
use self::connect::Tls;
use self::django_table::DjangoTable;
use self::error::PgError;
use self::listen::Waiters;
pub use self::url::Layout;

/// The result table, by layout.
#[derive(Debug)]
enum Table {
    Celery(CeleryTable),
    Django(DjangoTable),
}

impl Table {
    /// Expiry statements: `$1` seconds, `$2` batch size; each returns the rows it deleted.
    fn expiry(&self) -> Vec<&'static str> {
        match self {
            Table::Celery(_) => vec![
                "WITH gone AS (DELETE FROM celery_taskmeta WHERE id IN (SELECT id FROM celery_taskmeta WHERE date_done < \
                 (now() AT TIME ZONE 'UTC') - make_interval(secs => $1) LIMIT $2 FOR UPDATE SKIP LOCKED) RETURNING 1) \
                 SELECT count(*) FROM gone",
                "WITH gone AS (DELETE FROM celery_tasksetmeta WHERE id IN (SELECT id FROM celery_tasksetmeta WHERE \
                 date_done < (now() AT TIME ZONE 'UTC') - make_interval(secs => $1) LIMIT $2 FOR UPDATE SKIP LOCKED) \
                 RETURNING 1) SELECT count(*) FROM gone",
            ],
            Table::Django(_) => vec![django_table::EXPIRY],
        }
    }

    fn forget(&self) -> &'static str {
        match self {
            Table::Celery(_) => "DELETE FROM celery_taskmeta WHERE task_id = $1",
            Table::Django(_) => "DELETE FROM django_celery_results_taskresult WHERE task_id = $1",
        }
    }
}

/// Background tasks, aborted when the last clone of the backend is dropped.
#[derive(Debug)]
struct Tasks(Vec<tokio::task::JoinHandle<()>>);

impl Drop for Tasks {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

/// The PostgreSQL result backend. Clones share the pool, the listener and the expiry sweeper.
#[derive(Clone)]
pub struct PostgresBackend {
    pool: Pool,
    table: Arc<Table>,
    waiters: Arc<Waiters>,
    expires: Option<Duration>,
    shown: Arc<str>,
    /// The monitor's task history, in the broker's table layout (`celery_rs_history`).
    history: PgHistory,
    _tasks: Arc<Tasks>,
}

impl std::fmt::Debug for PostgresBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresBackend").field("url", &self.shown).field("table", &self.table).finish()
    }
}

impl PostgresBackend {
    /// Connects, creates or adopts the tables (applying our migrations), and starts listening.
    /// The server must be reachable now; later losses are retried.
    pub async fn connect(url: &str) -> Result<PostgresBackend, BackendError> {
        let opts = url::result_options(url)?;
        let tls = Tls::new(opts.connect.tls.as_ref(), &opts.connect.shown)?;
        let pool = connect::pool(&opts.connect, &tls)?;
        let mut client = pool.get().await.map_err(|e| PgError::pool("results", e))?;
        migrate::migrate(&mut client, "results", schema::OURS).await?;
        let table = match opts.layout {
            Layout::Celery => {
                migrate::migrate(&mut client, "celery-results", schema::CELERY).await?;
                let cols = schema::columns(&client, "celery_taskmeta").await.map_err(PgError::at("results"))?;
                Table::Celery(CeleryTable::new(&cols))
            }
            Layout::Django => {
                django_table::require(&client).await?;
                migrate::migrate(&mut client, "django-results", django_table::MIGRATIONS).await?;
                let cols = schema::columns(&client, "django_celery_results_taskresult")
                    .await
                    .map_err(PgError::at("results"))?;
                Table::Django(DjangoTable::new(&cols))
            }
        };
        drop(client);
        let waiters = Arc::new(Waiters::default());
        let mut tasks = vec![tokio::spawn(listen::listen(opts.connect.clone(), tls, waiters.clone()))];
        if let Some(expires) = opts.expires {
            tasks.push(tokio::spawn(expiry::run(pool.clone(), table.expiry(), expires, opts.cleanup_interval)));
        }
        tracing::debug!(url = %opts.connect.shown, ?table, "postgresql results: connected");
        Ok(PostgresBackend {
            history: PgHistory::new(pool.clone()),
            pool,
            table: Arc::new(table),
            waiters,
            expires: opts.expires,
            shown: opts.connect.shown.into(),
            _tasks: Arc::new(Tasks(tasks)),
        })
    }

    /// Deletes the results finished longer than `result_expires` ago (and stale chord tallies
    /// and lapsed idempotency claims) now; returns the rows deleted. Nothing when results never
    /// expire (`result_expires=0`).
    pub async fn cleanup(&self) -> Result<u64, BackendError> {
        match self.expires {
            Some(expires) => expiry::sweep(&self.pool, &self.table.expiry(), expires).await,
            None => Ok(0),
        }
    }

    /// Which tables this backend reads and writes.
    pub fn layout(&self) -> Layout {
        match &*self.table {
            Table::Celery(_) => Layout::Celery,
            Table::Django(_) => Layout::Django,
        }
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, BackendError> {
        Ok(self.pool.get().await.map_err(|e| PgError::pool("results", e))?)
    }
}

impl Table {
    /// Refuses a task id this table's column cannot hold.
    fn check_id(&self, task_id: &str) -> Result<(), BackendError> {
        match self {
            Table::Celery(_) => celery_table::check_id(task_id),
            Table::Django(_) => django_table::check_id(task_id),
        }
    }

    /// Upserts `meta` into this table through `c`.
    async fn store(&self, c: &impl deadpool_postgres::GenericClient, meta: &TaskMeta) -> Result<(), BackendError> {
        match self {
            Table::Celery(t) => t.store(c, meta).await,
            Table::Django(t) => t.store(c, meta).await,
        }
    }
}

/// Refuses a `what` (a task id, a group id, a key) of more than `max` characters, what `holder`
/// (a `character varying(max)` column) holds, or with a NUL character (which PostgreSQL's text
/// cannot hold), with [`BackendError::Malformed`]: the value came with the message and storing
/// it again gives the same answer. Checked before the database refuses it less clearly.
fn check_len(what: &str, value: &str, holder: &str, max: usize) -> Result<(), BackendError> {
    // A byte is at most a character: only a long value is counted.
    if value.len() > max && value.chars().count() > max {
        return Err(BackendError::Malformed(format!(
            "postgresql: a {what} of {} characters is longer than {holder}'s {max}",
            value.chars().count()
        )));
    }
    if value.contains('\0') {
        return Err(BackendError::Malformed(format!("postgresql: a {what} with a NUL character")));
    }
    Ok(())
}

/// `s` with its NUL characters (which PostgreSQL's text cannot hold) replaced by U+FFFD: a task's
/// own text (its traceback) is stored rather than refused.
fn without_nul(s: &Option<String>) -> Option<std::borrow::Cow<'_, str>> {
    let s = s.as_deref()?;
    Some(if s.contains('\0') {
        std::borrow::Cow::Owned(s.replace('\0', "\u{fffd}"))
    } else {
        std::borrow::Cow::Borrowed(s)
    })
}

/// `s` cut to at most `max` characters (a `character varying(max)` column holds that many).
fn clipped(s: &Option<String>, max: usize) -> Option<&str> {
    let s = s.as_deref()?;
    Some(s.char_indices().nth(max).map_or(s, |(cut, _)| &s[..cut]))
}

/// The most rows one batched store's transaction writes (and locks).
const MAX_BATCH_ROWS: usize = 256;

#[async_trait]
impl celery_core::capability::StoreBatches for PostgresBackend {
    /// One transaction (one commit) for all of `metas`, their statements pipelined on its
    /// connection in task id order (stable; one after another when an id repeats, so that its
    /// states land in order), so that workers storing overlapping ids lock their rows in the same
    /// order and never deadlock one another. The waiters' `NOTIFY`s go out at the commit.
    /// A lone state is one statement (no transaction round trips); more than
    /// [`MAX_BATCH_ROWS`] go in several transactions.
    async fn store_many(&self, metas: &[TaskMeta]) -> Result<(), BackendError> {
        if let [meta] = metas {
            return self.store(meta).await;
        }
        // A state the table cannot hold fails the batch before it begins (the worker then stores
        // the states one by one, and dead-letters the task whose state is refused).
        for meta in metas {
            self.table.check_id(&meta.task_id)?;
        }
        for chunk in metas.chunks(MAX_BATCH_ROWS) {
            let mut order: Vec<&TaskMeta> = chunk.iter().collect();
            order.sort_by(|a, b| a.task_id.cmp(&b.task_id));
            let mut c = self.client().await?;
            let tx = c.transaction().await.map_err(PgError::at("results"))?;
            crate::batches::store_each(&order, |m| self.table.store(&tx, m)).await?;
            tx.commit().await.map_err(PgError::at("results"))?;
        }
        Ok(())
    }
}

#[async_trait]
impl ResultBackend for PostgresBackend {
    async fn store(&self, meta: &TaskMeta) -> Result<(), BackendError> {
        let c = self.client().await?;
        self.table.store(&c, meta).await
    }

    async fn get(&self, task_id: &str) -> Result<Option<TaskMeta>, BackendError> {
        let c = self.client().await?;
        match &*self.table {
            Table::Celery(t) => t.get(&c, task_id).await,
            Table::Django(t) => t.get(&c, task_id).await,
        }
    }

    async fn wait(&self, task_id: &str, timeout: Duration) -> Result<Option<TaskMeta>, BackendError> {
        let deadline = celery_core::clock::instant_after(timeout);
        let mut rx = self.waiters.register(task_id);
        // Unregistered however the wait ends, also when the caller drops it midway.
        let _registered = rx.is_some().then(|| listen::Registered { waiters: &self.waiters, task_id });
        // Woken by NOTIFY (see `listen`).
        crate::waiting::until_ready(|| self.get(task_id), rx.as_mut(), deadline, "postgresql").await
    }

    async fn forget(&self, task_id: &str) -> Result<(), BackendError> {
        let c = self.client().await?;
        let stmt = c.prepare_cached(self.table.forget()).await.map_err(PgError::at("results"))?;
        c.execute(&stmt, &[&task_id]).await.map_err(PgError::at("results"))?;
        Ok(())
    }

    fn kind(&self) -> &'static str {
        "postgresql"
    }

    celery_core::offers!(chords, claims, store_batches);

    fn history(&self) -> Option<&dyn celery_core::history::History> {
        Some(&self.history)
    }
}
#[async_trait]
impl Chords for PostgresBackend {
    async fn chord_size(&self, group_id: &str, size: usize) -> Result<(), BackendError> {
        chord::size(&self.client().await?, group_id, size).await
    }

    async fn chord_part(&self, group_id: &str, member: &ChordMember) -> Result<Option<Vec<ChordMember>>, BackendError> {
        chord::part(&mut self.client().await?, group_id, member).await
    }

    async fn chord_done(&self, group_id: &str) -> Result<(), BackendError> {
        chord::done(&mut self.client().await?, group_id).await
    }
}

#[async_trait]
impl Claims for PostgresBackend {
    async fn claim(&self, key: &str, task_id: &str, ttl: Duration) -> Result<Option<String>, BackendError> {
        chord::claim(&self.client().await?, key, task_id, ttl).await
    }

    async fn unclaim(&self, key: &str, task_id: &str) -> Result<(), BackendError> {
        chord::unclaim(&self.client().await?, key, task_id).await
    }
}

celery_core::register_backend!("db+postgresql", "db+postgresql+psycopg2", "db+postgresql+psycopg", "db+postgres", "django-db+postgresql", "django-db+postgres" => PostgresBackend::connect);

#[cfg(test)]
mod tests {
    #[test]
    fn every_scheme_is_registered() {
        let registered: Vec<&str> =
            inventory::iter::<celery_core::scheme::BackendScheme>.into_iter().map(|s| s.scheme).collect();
        for (scheme, _) in super::url::SCHEMES {
            assert!(registered.contains(scheme), "{scheme}");
        }
    }

    #[test]
    fn values_are_clipped_to_characters() {
        let s = |v: &str| Some(v.to_owned());
        assert_eq!(super::clipped(&s("abcdef"), 3), Some("abc"));
        assert_eq!(super::clipped(&s("ab"), 3), Some("ab"));
        assert_eq!(super::clipped(&s("éééé"), 2), Some("éé"), "characters, not bytes");
        assert_eq!(super::clipped(&None, 3), None);
    }
}

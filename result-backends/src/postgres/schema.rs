//! The result backend's migrations: Celery's tables exactly as Celery 5.7's SQLAlchemy models
//! create them on PostgreSQL (with the `result_extended` columns), django-celery-results' table as
//! its Django migrations leave it, and our own tables, all prefixed `celery_rs_`: chord tallies,
//! idempotency claims, and the trigger that `NOTIFY`s waiters when a result row changes.

use super::migrate::Migration;

/// The channel every result row change is announced on; the payload is the task id.
pub(crate) const CHANNEL: &str = "celery_rs_results";

/// Celery's `celery_taskmeta` and `celery_tasksetmeta` (`TaskExtended` and `TaskSet` in
/// celery/backends/database/models.py, as `metadata.create_all` emits them for PostgreSQL: the
/// `id` columns take `nextval` of their sequences in each INSERT, they have no default).
pub(crate) const CELERY: &[Migration] = &[
    Migration {
        version: 1,
        name: "Celery's celery_taskmeta and celery_tasksetmeta",
        sql: "
CREATE SEQUENCE IF NOT EXISTS task_id_sequence;
CREATE SEQUENCE IF NOT EXISTS taskset_id_sequence;
CREATE TABLE IF NOT EXISTS celery_taskmeta (
    id integer NOT NULL,
    task_id character varying(155),
    status character varying(50),
    result bytea,
    date_done timestamp without time zone,
    traceback text,
    children bytea,
    name character varying(155),
    args bytea,
    kwargs bytea,
    worker character varying(155),
    retries integer,
    queue character varying(155),
    stamps bytea,
    CONSTRAINT celery_taskmeta_pkey PRIMARY KEY (id),
    CONSTRAINT celery_taskmeta_task_id_key UNIQUE (task_id)
);
CREATE INDEX IF NOT EXISTS ix_celery_taskmeta_date_done ON celery_taskmeta (date_done);
CREATE TABLE IF NOT EXISTS celery_tasksetmeta (
    id integer NOT NULL,
    taskset_id character varying(155),
    result bytea,
    date_done timestamp without time zone,
    CONSTRAINT celery_tasksetmeta_pkey PRIMARY KEY (id),
    CONSTRAINT celery_tasksetmeta_taskset_id_key UNIQUE (taskset_id)
);
CREATE INDEX IF NOT EXISTS ix_celery_tasksetmeta_date_done ON celery_tasksetmeta (date_done);
",
    },
    Migration {
        version: 2,
        name: "notify waiters when a celery_taskmeta row changes",
        sql: "
CREATE OR REPLACE FUNCTION celery_rs_notify_result() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('celery_rs_results', coalesce(NEW.task_id, ''));
    RETURN NULL;
END $$;
DROP TRIGGER IF EXISTS celery_rs_notify ON celery_taskmeta;
CREATE TRIGGER celery_rs_notify AFTER INSERT OR UPDATE ON celery_taskmeta
    FOR EACH ROW EXECUTE FUNCTION celery_rs_notify_result();
",
    },
];

/// Our own tables: chords counted and idempotency keys claimed in the same database, atomically.
pub(crate) const OURS: &[Migration] = &[Migration {
    version: 1,
    name: "chord tallies and idempotency claims",
    sql: "
CREATE TABLE IF NOT EXISTS celery_rs_chord (
    group_id character varying(255) PRIMARY KEY,
    size integer,
    completed_by character varying(255),
    updated_at timestamp with time zone NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS celery_rs_chord_updated_at ON celery_rs_chord (updated_at);
CREATE TABLE IF NOT EXISTS celery_rs_chord_member (
    group_id character varying(255) NOT NULL,
    task_id character varying(255) NOT NULL,
    idx bigint,
    state character varying(50) NOT NULL,
    result text NOT NULL,
    PRIMARY KEY (group_id, task_id)
);
CREATE TABLE IF NOT EXISTS celery_rs_idempotency (
    key character varying(1024) PRIMARY KEY,
    task_id character varying(255) NOT NULL,
    expires_at timestamp with time zone NOT NULL
);
CREATE INDEX IF NOT EXISTS celery_rs_idempotency_expires_at ON celery_rs_idempotency (expires_at);
",
}];

/// The columns a table has (a table that Python created may lack `children`, `stamps` or the
/// extended ones).
pub(crate) async fn columns(
    client: &tokio_postgres::Client,
    table: &str,
) -> Result<Vec<String>, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT attname::text FROM pg_attribute WHERE attrelid = $1::text::regclass AND attnum > 0 AND NOT attisdropped",
            &[&table],
        )
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

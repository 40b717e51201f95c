//! PostgreSQL results (`db+postgresql://`, `django-db+postgresql://`) against the real server, each
//! test in a schema of its own:
//! 1. The tables are Celery's, column for column; a Celery 5.6 table (no `children`, no extended
//!    columns) is adopted as it is; eight processes' worth of backends migrating one schema at
//!    once apply each migration once.
//! 2. The backend contract: states, never overwriting SUCCESS, forget, waiting woken by NOTIFY,
//!    idempotency claims, chords counted once under concurrency, expiry in batches.
//! 3. Rows Python wrote: Celery 5.7's JSON, older Celery's pickles of plain values, and malicious
//!    pickles (REDUCE of os.system, protocols 0 to 5) reported as decode errors, never run.
//! 4. Workers on Redis and on the built-in broker storing into PostgreSQL: results, failures, a
//!    1,000-member chord on four workers firing once, idempotency keys.
//! 5. django-celery-results' table, as Django 5.2 migrates it.
//! 6. TLS: `sslmode=require` against a certificate no one trusts fails, naming the reason;
//!    `verify-full` with the server's certificate as `sslrootcert` connects.
//! 7. Python interop both ways: Python's `AsyncResult.get()` with `result_backend='db+postgresql://...'`
//!    reads what our worker stored (value, exception, extended fields), and our client reads what a
//!    Python worker stored.
//! 8. A row too large to read (Celery's and Django's tables) is refused before it crosses the wire;
//!    errors say whether to retry (a missing table is the statement's fault, a stopped server the
//!    connection's) and keep the driver's error as their source.

use std::collections::HashSet;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use celery_core::backend::ChordMember;
use celery_core::capability::{Chords, Claims};
use celery_core::{BackendError, ResultBackend, ResultError, Signature, TaskMeta, TaskState};
use celery_tests::pg_server::{CountingProxy, PgServer, Shutdown};
use celery_tests::python::{self, Service};
use celery_tests::{redis_available, PgSchema, RedisEnv};
use celery_worker::prelude::*;
use result_backends::postgres::PostgresBackend;
use serde_json::{json, Value};

const SUITE: &str = "postgres_results";
const T: Duration = Duration::from_secs(30);

/// Celery 5.7's `celery_taskmeta` columns with `result_extended`, in order.
const CELERY_COLUMNS: &[(&str, &str)] = &[
    ("id", "integer"),
    ("task_id", "character varying(155)"),
    ("status", "character varying(50)"),
    ("result", "bytea"),
    ("date_done", "timestamp without time zone"),
    ("traceback", "text"),
    ("children", "bytea"),
    ("name", "character varying(155)"),
    ("args", "bytea"),
    ("kwargs", "bytea"),
    ("worker", "character varying(155)"),
    ("retries", "integer"),
    ("queue", "character varying(155)"),
    ("stamps", "bytea"),
];

async fn backend(schema: &PgSchema, query: &str) -> PostgresBackend {
    PostgresBackend::connect(&schema.url("db+postgresql", query)).await.expect("connect")
}

fn column_types(schema: &PgSchema, table: &str) -> Vec<(String, String)> {
    schema
        .query(&format!(
            "SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute \
             WHERE attrelid = '{table}'::regclass AND attnum > 0 AND NOT attisdropped ORDER BY attnum"
        ))
        .unwrap()
        .into_iter()
        .map(|r| (r[0].clone().unwrap(), r[1].clone().unwrap()))
        .collect()
}

fn one(schema: &PgSchema, sql: &str) -> Option<String> {
    schema.query(sql).unwrap().into_iter().next().and_then(|r| r.into_iter().next().flatten())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tables_are_celerys_and_migrations_run_once() {
    let Some(schema) = PgSchema::new(SUITE) else { return };
    // Eight backends connect to a fresh schema at once: the advisory lock orders them.
    let url = schema.url("db+postgresql", "");
    let all = futures::future::join_all((0..8).map(|_| PostgresBackend::connect(&url))).await;
    for b in &all {
        assert!(b.is_ok(), "{b:?}");
    }
    let want: Vec<(String, String)> = CELERY_COLUMNS.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect();
    assert_eq!(column_types(&schema, "celery_taskmeta"), want);
    let taskset: Vec<(String, String)> = [
        ("id", "integer"),
        ("taskset_id", "character varying(155)"),
        ("result", "bytea"),
        ("date_done", "timestamp without time zone"),
    ]
    .iter()
    .map(|(a, b)| (a.to_string(), b.to_string()))
    .collect();
    assert_eq!(column_types(&schema, "celery_tasksetmeta"), taskset);
    let constraints = schema
        .query(
            "SELECT conname FROM pg_constraint WHERE conrelid IN ('celery_taskmeta'::regclass, 'celery_tasksetmeta'::regclass) ORDER BY 1",
        )
        .unwrap();
    let names: Vec<String> = constraints.into_iter().map(|r| r[0].clone().unwrap()).collect();
    assert_eq!(
        names,
        [
            "celery_taskmeta_pkey",
            "celery_taskmeta_task_id_key",
            "celery_tasksetmeta_pkey",
            "celery_tasksetmeta_taskset_id_key"
        ]
    );
    for seq in ["task_id_sequence", "taskset_id_sequence"] {
        assert_eq!(one(&schema, &format!("SELECT to_regclass('{seq}')::text")).as_deref(), Some(seq));
    }
    for ix in ["ix_celery_taskmeta_date_done", "ix_celery_tasksetmeta_date_done"] {
        assert_eq!(one(&schema, &format!("SELECT to_regclass('{ix}')::text")).as_deref(), Some(ix));
    }
    let versions = schema.query("SELECT component, version FROM celery_rs_schema_version ORDER BY 1, 2").unwrap();
    assert_eq!(versions.len(), 3, "each migration once: {versions:?}");
    // The id comes from Celery's sequence.
    all[0].as_ref().unwrap().store(&TaskMeta::success("seq-1", json!(1))).await.unwrap();
    assert_eq!(one(&schema, "SELECT id FROM celery_taskmeta WHERE task_id = 'seq-1'").as_deref(), Some("1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passwords_are_never_printed() {
    // Nothing listens on port 1: the connection fails, and neither the error nor the URL shows it.
    let url = "db+postgresql://postgres:s3cretpw@127.0.0.1:1/test?connect_timeout=2";
    let e = PostgresBackend::connect(url).await.unwrap_err();
    assert!(e.is_retryable(), "{e:?}");
    let e = format!("{e} {e:?}");
    assert!(!e.contains("s3cretpw"), "{e}");
    let e = PostgresBackend::connect("db+postgresql://postgres:s3cretpw@127.0.0.1:1/test?nope=1").await.unwrap_err();
    let e = format!("{e} {e:?}");
    assert!(e.contains("postgres:***@127.0.0.1:1") && !e.contains("s3cretpw"), "{e}");
    let Some(schema) = PgSchema::new(SUITE) else { return };
    let b = PostgresBackend::connect(&schema.url("db+postgresql", "").replace("postgres@", "postgres:s3cretpw@"))
        .await
        .unwrap();
    assert!(!format!("{b:?}").contains("s3cretpw"), "{b:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_celery_5_6_table_is_adopted_as_it_is() {
    let Some(schema) = PgSchema::new(SUITE) else { return };
    schema
        .exec(
            "CREATE SEQUENCE task_id_sequence;
             CREATE TABLE celery_taskmeta (id integer NOT NULL PRIMARY KEY, task_id varchar(155) UNIQUE,
                 status varchar(50), result bytea, date_done timestamp, traceback text);",
        )
        .unwrap();
    let b = backend(&schema, "").await;
    let mut meta = TaskMeta::success("old-1", json!({"a": [1, 2]}));
    meta.name = Some("not stored here".into());
    meta.children = vec![json!([["c1", null], null])];
    b.store(&meta).await.unwrap();
    let got = b.get("old-1").await.unwrap().unwrap();
    assert_eq!((got.status, got.result), (TaskState::Success, json!({"a": [1, 2]})));
    assert_eq!((got.name, got.children), (None, vec![]), "the table has no such columns");
    assert_eq!(column_types(&schema, "celery_taskmeta").len(), 6, "no column added to the user's table");
}

/// A batched store is one transaction with the rules of one store: a stored SUCCESS is kept, a
/// repeated id's states land in order, a waiter is woken at the commit; a batch with a state that
/// cannot be stored stores none of it (the worker then stores its states one by one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batched_store_is_one_transaction_with_the_rules_of_one() {
    use celery_core::capability::StoreBatches;
    let Some(schema) = PgSchema::new(SUITE) else { return };
    let b = Arc::new(backend(&schema, "").await);
    b.store(&TaskMeta::success("done", json!(1))).await.unwrap();
    let waiter = {
        let b = b.clone();
        tokio::spawn(async move { b.wait("waited", T).await })
    };
    let batch = [
        TaskMeta::success("waited", json!(3)),
        TaskMeta::success("done", json!(2)),
        TaskMeta::new("twice", TaskState::Started, Value::Null),
        TaskMeta::success("twice", json!(5)),
        TaskMeta::new("running", TaskState::Started, Value::Null),
    ];
    b.store_many(&batch).await.unwrap();
    assert_eq!(b.get("done").await.unwrap().unwrap().result, json!(1), "SUCCESS kept");
    assert_eq!(b.get("twice").await.unwrap().unwrap().status, TaskState::Success, "in order");
    assert_eq!(b.get("running").await.unwrap().unwrap().status, TaskState::Started);
    let woken = waiter.await.unwrap().unwrap().expect("woken with its state");
    assert_eq!(woken.result, json!(3));
    let bad = [TaskMeta::success("fine", json!(1)), TaskMeta::success("x".repeat(300), json!(1))];
    let err = b.store_many(&bad).await.unwrap_err().to_string();
    assert!(err.contains("task id of 300 characters"), "{err}");
    assert_eq!(b.get("fine").await.unwrap(), None, "nothing of a failed batch is stored");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_backend_contract_holds() {
    let Some(schema) = PgSchema::new(SUITE) else { return };
    let b = backend(&schema, "").await;
    assert_eq!(b.get("nope").await.unwrap(), None);
    let mut started = TaskMeta::new("t1", TaskState::Started, Value::Null);
    started.name = Some("tasks.add".into());
    started.worker = Some("w1@host".into());
    started.retries = Some(2);
    started.queue = Some("celery".into());
    b.store(&started).await.unwrap();
    let got = b.get("t1").await.unwrap().unwrap();
    assert_eq!((got.status, got.date_done.as_deref()), (TaskState::Started, None));
    assert_eq!(
        (got.name.as_deref(), got.worker.as_deref(), got.retries, got.queue.as_deref()),
        (Some("tasks.add"), Some("w1@host"), Some(2), Some("celery"))
    );
    let mut done = TaskMeta::success("t1", json!({"sum": 3, "list": [1, "x", null]}));
    done.children = vec![json!([["child-1", null], null])];
    b.store(&done).await.unwrap();
    let got = b.get("t1").await.unwrap().unwrap();
    assert_eq!((got.status, &got.result, &got.children), (TaskState::Success, &done.result, &done.children));
    assert!(got.date_done.as_deref().is_some_and(|d| d.ends_with("+00:00")), "{:?}", got.date_done);
    // Celery 5.7's encoding in the row: the JSON bytes of the value.
    assert_eq!(
        one(&schema, "SELECT convert_from(result, 'UTF8') FROM celery_taskmeta WHERE task_id = 't1'").as_deref(),
        Some(r#"{"list":[1,"x",null],"sum":3}"#)
    );
    // A SUCCESS is never overwritten.
    b.store(&TaskMeta::new("t1", TaskState::Started, Value::Null)).await.unwrap();
    assert_eq!(b.get("t1").await.unwrap().unwrap().status, TaskState::Success);
    let err = TaskMeta::error("t2", TaskState::Failure, &celery_core::TaskError::new("ValueError", "bad"));
    b.store(&err).await.unwrap();
    let got = b.get("t2").await.unwrap().unwrap();
    assert_eq!(got.exception(), Some(("ValueError".into(), "bad".into())));
    assert!(got.traceback.is_some());
    b.forget("t1").await.unwrap();
    assert_eq!(b.get("t1").await.unwrap(), None);

    // Waiting: woken by the trigger's NOTIFY, well before the 1 s fallback poll.
    let writer = b.clone();
    let store = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        writer.store(&TaskMeta::success("t3", json!(3))).await.unwrap();
        Instant::now()
    });
    let got = b.wait("t3", T).await.unwrap().unwrap();
    let woke = Instant::now();
    let stored = store.await.unwrap();
    assert_eq!(got.result, json!(3));
    assert!(woke.duration_since(stored) < Duration::from_millis(700), "woken {:?} after the store", woke - stored);
    // A row written by someone else (psql here, Python in production) wakes waiters too.
    let waiter = {
        let b = b.clone();
        tokio::spawn(async move { b.wait("t4", T).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    schema
        .exec(
            "INSERT INTO celery_taskmeta (id, task_id, status, result, date_done) \
             VALUES (nextval('task_id_sequence'), 't4', 'SUCCESS', convert_to('[4]', 'UTF8'), now())",
        )
        .unwrap();
    assert_eq!(waiter.await.unwrap().unwrap().unwrap().result, json!([4]));
    // A timeout returns what is there.
    let t = Instant::now();
    assert_eq!(b.wait("never", Duration::from_millis(300)).await.unwrap(), None);
    assert!(t.elapsed() >= Duration::from_millis(300));

    // Idempotency claims.
    assert_eq!(b.claim("k1", "a", Duration::from_secs(60)).await.unwrap(), None);
    assert_eq!(b.claim("k1", "b", Duration::from_secs(60)).await.unwrap().as_deref(), Some("a"));
    b.unclaim("k1", "b").await.unwrap();
    assert_eq!(
        b.claim("k1", "c", Duration::from_secs(60)).await.unwrap().as_deref(),
        Some("a"),
        "only the holder frees it"
    );
    b.unclaim("k1", "a").await.unwrap();
    assert_eq!(b.claim("k1", "c", Duration::from_secs(60)).await.unwrap(), None);
    assert_eq!(b.claim("k2", "a", Duration::from_millis(200)).await.unwrap(), None);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(b.claim("k2", "b", Duration::from_secs(60)).await.unwrap(), None, "a lapsed claim is taken");
    let racers = futures::future::join_all((0..16).map(|i| {
        let b = b.clone();
        async move { b.claim("k3", &format!("r{i}"), Duration::from_secs(60)).await.unwrap() }
    }))
    .await;
    assert_eq!(racers.iter().filter(|r| r.is_none()).count(), 1, "one of 16 concurrent claims wins: {racers:?}");
    let too_long = "k".repeat(2000);
    assert!(matches!(b.claim(&too_long, "a", Duration::from_secs(1)).await, Err(BackendError::Malformed(_))));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chords_are_counted_once_under_concurrency() {
    let Some(schema) = PgSchema::new(SUITE) else { return };
    // Two processes' worth of backends (separate pools) report the members of one chord at once.
    let b1 = backend(&schema, "pool_size=4").await;
    let b2 = backend(&schema, "pool_size=4").await;
    let n = 300u64;
    b1.chord_size("g1", n as usize).await.unwrap();
    let reports = futures::future::join_all((0..n).map(|i| {
        let b = if i % 2 == 0 { b1.clone() } else { b2.clone() };
        async move {
            let m = ChordMember {
                task_id: format!("m{i}"),
                index: Some(n - 1 - i),
                state: TaskState::Success,
                result: json!(i),
            };
            // Each member reports twice (a redelivery): it still counts once.
            let first = b.chord_part("g1", &m).await.unwrap();
            let second = b.chord_part("g1", &m).await.unwrap();
            (i, first, second)
        }
    }))
    .await;
    let completing: Vec<_> = reports.iter().filter(|(_, a, b)| a.is_some() || b.is_some()).collect();
    assert_eq!(completing.len(), 1, "exactly one member completes the chord");
    let (i, first, second) = completing[0];
    let all = first.clone().or_else(|| second.clone()).unwrap();
    assert_eq!(all.len(), n as usize);
    let order: Vec<u64> = all.iter().map(|m| m.index.unwrap()).collect();
    assert_eq!(order, (0..n).collect::<Vec<_>>(), "members in group order");
    assert_eq!(all[0].result, json!(n - 1));
    // The completing member reporting again gets the members again; another does not.
    let again =
        ChordMember { task_id: format!("m{i}"), index: Some(n - 1 - i), state: TaskState::Success, result: json!(i) };
    assert!(b1.chord_part("g1", &again).await.unwrap().is_some());
    let other =
        ChordMember { task_id: format!("m{}", (i + 1) % n), index: None, state: TaskState::Success, result: json!(0) };
    assert!(b1.chord_part("g1", &other).await.unwrap().is_none());
    b1.chord_done("g1").await.unwrap();
    assert_eq!(one(&schema, "SELECT count(*) FROM celery_rs_chord_member").as_deref(), Some("0"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_rows_are_deleted_in_batches() {
    let Some(schema) = PgSchema::new(SUITE) else { return };
    let b = backend(&schema, "result_expires=3600").await;
    for i in 0..2500 {
        b.store(&TaskMeta::success(format!("old-{i}"), json!(i))).await.unwrap();
    }
    b.store(&TaskMeta::success("fresh", json!(1))).await.unwrap();
    b.store(&TaskMeta::new("running", TaskState::Started, Value::Null)).await.unwrap();
    b.chord_size("stale-chord", 2).await.unwrap();
    b.chord_size("live-chord", 2).await.unwrap();
    b.claim("lapsed", "x", Duration::from_millis(1)).await.unwrap();
    b.claim("live", "x", Duration::from_secs(600)).await.unwrap();
    schema
        .exec(
            "UPDATE celery_taskmeta SET date_done = date_done - interval '2 hours' WHERE task_id LIKE 'old-%';
             UPDATE celery_rs_chord SET updated_at = updated_at - interval '2 hours' WHERE group_id = 'stale-chord';
             INSERT INTO celery_tasksetmeta (id, taskset_id, date_done) VALUES (nextval('taskset_id_sequence'), 'g-old', now() - interval '2 hours');",
        )
        .unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let deleted = b.cleanup().await.unwrap();
    assert_eq!(deleted, 2500 + 1 + 1 + 1, "2,500 results, the group, the stale chord, the lapsed claim");
    assert_eq!(
        one(&schema, "SELECT string_agg(task_id, ',' ORDER BY task_id) FROM celery_taskmeta").as_deref(),
        Some("fresh,running")
    );
    assert_eq!(one(&schema, "SELECT string_agg(group_id, ',') FROM celery_rs_chord").as_deref(), Some("live-chord"));
    assert_eq!(one(&schema, "SELECT string_agg(key, ',') FROM celery_rs_idempotency").as_deref(), Some("live"));
    assert_eq!(b.cleanup().await.unwrap(), 0);
    // result_expires=0 keeps everything.
    let keep = backend(&schema, "result_expires=0").await;
    schema.exec("UPDATE celery_taskmeta SET date_done = now() - interval '3650 days'").unwrap();
    assert_eq!(keep.cleanup().await.unwrap(), 0);
}

/// `pickle.dumps({'a': [1, 'x', None], 'b': 2.5}, protocol=P)` for P = 2, 4 (what SQLAlchemy's
/// `PickleType` stored before Celery 5.7).
const OLD_ROWS: &[&[u8]] = &[
    b"\x80\x02}q\x00(X\x01\x00\x00\x00aq\x01]q\x02(K\x01X\x01\x00\x00\x00xq\x03NeX\x01\x00\x00\x00bq\x04G@\x04\x00\x00\x00\x00\x00\x00u.",
    b"\x80\x04\x95\x1a\x00\x00\x00\x00\x00\x00\x00}\x94(\x8c\x01a\x94]\x94(K\x01\x8c\x01x\x94Ne\x8c\x01b\x94G@\x04\x00\x00\x00\x00\x00\x00u.",
];

/// `pickle.dumps(R(), protocol=P)` for P = 0..5, where `R.__reduce__` returns
/// `(os.system, ('touch /tmp/celery-rs-pickle-ran',))`.
const EVIL_ROWS: &[&[u8]] = &[
    b"cposix\nsystem\np0\n(Vtouch /tmp/celery-rs-pickle-ran\np1\ntp2\nRp3\n.",
    b"cposix\nsystem\nq\x00(X\x1e\x00\x00\x00touch /tmp/celery-rs-pickle-ranq\x01tq\x02Rq\x03.",
    b"\x80\x02cposix\nsystem\nq\x00X\x1e\x00\x00\x00touch /tmp/celery-rs-pickle-ranq\x01\x85q\x02Rq\x03.",
    b"\x80\x03cposix\nsystem\nq\x00X\x1e\x00\x00\x00touch /tmp/celery-rs-pickle-ranq\x01\x85q\x02Rq\x03.",
    b"\x80\x04\x959\x00\x00\x00\x00\x00\x00\x00\x8c\x05posix\x94\x8c\x06system\x94\x93\x94\x8c\x1etouch /tmp/celery-rs-pickle-ran\x94\x85\x94R\x94.",
    b"\x80\x05\x959\x00\x00\x00\x00\x00\x00\x00\x8c\x05posix\x94\x8c\x06system\x94\x93\x94\x8c\x1etouch /tmp/celery-rs-pickle-ran\x94\x85\x94R\x94.",
];

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_pickles_are_read_and_malicious_ones_refused() {
    let Some(schema) = PgSchema::new(SUITE) else { return };
    let marker = Path::new("/tmp/celery-rs-pickle-ran");
    let _ = std::fs::remove_file(marker);
    let b = backend(&schema, "").await;
    for (i, row) in OLD_ROWS.iter().enumerate() {
        schema
            .exec(&format!(
                "INSERT INTO celery_taskmeta (id, task_id, status, result, date_done) \
                 VALUES (nextval('task_id_sequence'), 'old-{i}', 'SUCCESS', '\\x{}', now())",
                hex(row)
            ))
            .unwrap();
        let got = b.get(&format!("old-{i}")).await.unwrap().unwrap();
        assert_eq!(got.result, json!({"a": [1, "x", null], "b": 2.5}), "protocol row {i}");
    }
    for (p, row) in EVIL_ROWS.iter().enumerate() {
        let id = format!("evil-{p}");
        schema
            .exec(&format!(
                "INSERT INTO celery_taskmeta (id, task_id, status, result, date_done) \
                 VALUES (nextval('task_id_sequence'), '{id}', 'SUCCESS', '\\x{}', now())",
                hex(row)
            ))
            .unwrap();
        let e = b.get(&id).await.unwrap_err();
        assert!(matches!(e, BackendError::Malformed(_)), "protocol {p}: {e:?}");
        let text = e.to_string();
        assert!(text.contains(&id) && (text.contains("refused") || text.contains("not JSON")), "protocol {p}: {text}");
        if p >= 2 {
            assert!(text.contains("GLOBAL"), "protocol {p} names the opcode: {text}");
        }
        // Waiting reports it too, at once (it is not retried as a lost connection).
        assert!(matches!(b.wait(&id, T).await, Err(BackendError::Malformed(_))));
    }
    // Through the app: the caller sees a backend error, not a value.
    let app = celery_core::App::new(
        Arc::new(broker_backends::memory::MemoryBroker::default()),
        Arc::new(b.clone()) as Arc<dyn ResultBackend>,
    );
    let r = app.result("evil-4");
    assert!(matches!(r.get::<Value>(T).await, Err(ResultError::Backend(BackendError::Malformed(_)))));
    assert!(!marker.exists(), "a pickle ran");
}

#[task]
async fn pg_add(x: i64, y: i64) -> i64 {
    x + y
}

#[task]
async fn pg_fail(message: String) -> Result<i64, TaskError> {
    Err(TaskError::new("ValueError", message))
}

/// How many times each chord body ran, by token.
static BODY_RUNS: std::sync::Mutex<Vec<i64>> = std::sync::Mutex::new(Vec::new());

#[task]
async fn pg_chord_body(results: Vec<i64>, token: i64) -> i64 {
    BODY_RUNS.lock().unwrap().push(token);
    results.iter().sum()
}

struct Running {
    stop: tokio::sync::oneshot::Sender<()>,
    handle: tokio::task::JoinHandle<Result<(), celery_worker::WorkerError>>,
}

fn worker(app: &celery_core::App, hostname: &str) -> Running {
    let cfg = WorkerConfig {
        concurrency: 4,
        hostname: hostname.into(),
        shutdown_grace: Duration::from_secs(5),
        ..WorkerConfig::default()
    };
    let (stop, rx) = tokio::sync::oneshot::channel::<()>();
    let handle = tokio::spawn(Worker::new(app.clone(), cfg).run_until(async {
        let _ = rx.await;
    }));
    Running { stop, handle }
}

impl Running {
    async fn stop(self) {
        let _ = self.stop.send(());
        self.handle.await.expect("join").expect("worker");
    }
}

/// Our workers on `broker` storing into PostgreSQL.
async fn workers_store_into_postgres(broker: &str, schema: &PgSchema) {
    let app = celery_worker::connect(broker, &schema.url("db+postgresql", "")).await.expect("connect");
    let workers: Vec<Running> = (0..4).map(|i| worker(&app, &format!("pg{i}@test"))).collect();
    let a = app.send(pg_add::new(2, 3)).await.unwrap();
    let f = app.send(pg_fail::new("bad input".into())).await.unwrap();
    assert_eq!(a.get::<i64>(T).await.unwrap(), 5);
    match f.get::<i64>(T).await {
        Err(ResultError::Failed { exc_type, message, .. }) => {
            assert_eq!((exc_type.as_str(), message.as_str()), ("ValueError", "bad input"))
        }
        other => panic!("{other:?}"),
    }
    // The extended columns Celery's result_extended fills.
    let row = schema
        .query(&format!("SELECT name, worker, retries FROM celery_taskmeta WHERE task_id = '{}'", a.id()))
        .unwrap();
    assert_eq!(row[0][0].as_deref(), Some("pg_add"));
    assert!(row[0][1].as_deref().is_some_and(|w| w.starts_with("pg")), "{row:?}");
    assert_eq!(row[0][2].as_deref(), Some("0"));

    let token = (uuid::Uuid::new_v4().as_u128() & 0xffff_ffff) as i64;
    let body = Signature::by_name("pg_chord_body").args(json!([token]));
    let chord = app.send_chord((0..1000).map(|i| pg_add::new(i, i)), body).await.unwrap();
    assert_eq!(chord.get::<i64>(Duration::from_secs(120)).await.unwrap(), (0..1000).map(|i| 2 * i).sum::<i64>());

    let key = format!("order-{token}");
    let sends =
        futures::future::join_all((0..10).map(|_| app.send(pg_add::new(1, 2).idempotency_key(key.clone())))).await;
    let ids: HashSet<String> = sends.into_iter().map(|r| r.unwrap().id().to_owned()).collect();
    assert_eq!(ids.len(), 1, "one task for one key");
    for w in workers {
        w.stop().await;
    }
    assert_eq!(BODY_RUNS.lock().unwrap().iter().filter(|t| **t == token).count(), 1, "the chord body ran once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn workers_on_redis_store_into_postgres() {
    if !redis_available(SUITE) {
        return;
    }
    let Some(schema) = PgSchema::new(SUITE) else { return };
    workers_store_into_postgres(&RedisEnv::new(5.0).broker, &schema).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn workers_on_the_built_in_broker_store_into_postgres() {
    let Some(schema) = PgSchema::new(SUITE) else { return };
    let dir = celery_tests::TempDir::new("pg-results");
    workers_store_into_postgres(&dir.url("lease_timeout=5&fsync=os"), &schema).await;
}

/// django-celery-results' table as `manage.py migrate` (Django 5.2, django-celery-results 2.6)
/// creates it on PostgreSQL.
const DJANGO_TABLE: &str = "
CREATE TABLE django_celery_results_taskresult (
    id integer NOT NULL GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    task_id character varying(255) NOT NULL UNIQUE,
    status character varying(50) NOT NULL,
    content_type character varying(128) NOT NULL,
    content_encoding character varying(64) NOT NULL,
    result text,
    date_done timestamp with time zone NOT NULL,
    traceback text,
    meta text,
    task_args text,
    task_kwargs text,
    task_name character varying(255),
    worker character varying(100),
    date_created timestamp with time zone NOT NULL,
    periodic_task_name character varying(255),
    date_started timestamp with time zone
);
CREATE INDEX django_cele_date_do_f59aad_idx ON django_celery_results_taskresult (date_done);";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn django_celery_results_table_is_read_and_written() {
    let Some(schema) = PgSchema::new(SUITE) else { return };
    let url = schema.url("django-db+postgresql", "result_expires=60");
    let e = PostgresBackend::connect(&url).await.unwrap_err().to_string();
    assert!(e.contains("manage.py migrate django_celery_results"), "{e}");
    schema.exec(DJANGO_TABLE).unwrap();
    let b = PostgresBackend::connect(&url).await.unwrap();
    let mut started = TaskMeta::new("d1", TaskState::Started, Value::Null);
    started.name = Some("app.tasks.add".into());
    b.store(&started).await.unwrap();
    let mut done = TaskMeta::success("d1", json!([1, {"x": null}]));
    done.name = Some("app.tasks.add".into());
    done.children = vec![json!([["c", null], null])];
    done.worker = Some("w@h".into());
    b.store(&done).await.unwrap();
    b.store(&TaskMeta::new("d1", TaskState::Retry, Value::Null)).await.unwrap();
    let got = b.get("d1").await.unwrap().unwrap();
    assert_eq!((got.status, &got.result, &got.children), (TaskState::Success, &done.result, &done.children));
    assert_eq!(got.worker.as_deref(), Some("w@h"));
    let row = schema
        .query(
            "SELECT content_type, content_encoding, result, meta, task_name, date_started IS NOT NULL, date_created IS NOT NULL \
             FROM django_celery_results_taskresult WHERE task_id = 'd1'",
        )
        .unwrap();
    let row: Vec<Option<&str>> = row[0].iter().map(|c| c.as_deref()).collect();
    assert_eq!(
        row,
        [
            Some("application/json"),
            Some("utf-8"),
            Some(r#"[1,{"x":null}]"#),
            Some(r#"{"children":[[["c",null],null]]}"#),
            Some("app.tasks.add"),
            Some("t"),
            Some("t")
        ]
    );
    // A row Django wrote with the pickle serializer: plain values read, REDUCE refused.
    let evil = hex(b"\x80\x02cposix\nsystem\nq\x00X\x02\x00\x00\x00idq\x01\x85q\x02Rq\x03.");
    schema
        .exec(&format!(
            "INSERT INTO django_celery_results_taskresult (task_id, status, content_type, content_encoding, result, date_done, date_created, meta)
             VALUES ('p1', 'SUCCESS', 'application/x-python-serialize', 'binary', 'gARLBS4=', now(), now(), NULL),
                    ('p2', 'SUCCESS', 'application/x-python-serialize', 'binary', encode('\\x{evil}'::bytea, 'base64'), now(), now(), NULL)"
        ))
        .unwrap();
    assert_eq!(b.get("p1").await.unwrap().unwrap().result, json!(5));
    assert!(matches!(b.get("p2").await, Err(BackendError::Malformed(m)) if m.contains("refused")));
    // Waiting is woken through the trigger on Django's table; expiry follows date_done.
    let waiter = {
        let b = b.clone();
        tokio::spawn(async move { b.wait("d2", T).await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    b.store(&TaskMeta::success("d2", json!(2))).await.unwrap();
    assert_eq!(waiter.await.unwrap().unwrap().unwrap().result, json!(2));
    schema
        .exec("UPDATE django_celery_results_taskresult SET date_done = now() - interval '1 hour' WHERE task_id <> 'd2'")
        .unwrap();
    assert_eq!(b.cleanup().await.unwrap(), 3);
    b.forget("d2").await.unwrap();
    assert_eq!(one(&schema, "SELECT count(*) FROM django_celery_results_taskresult").as_deref(), Some("0"));
}

/// The host name the server's certificate is for (its first DNS name), from `openssl`.
fn server_cert_name(path: &str) -> Option<String> {
    let out = Command::new("openssl").args(["x509", "-in", path, "-noout", "-ext", "subjectAltName"]).output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.split(|c: char| c == ',' || c.is_whitespace()).find_map(|p| p.strip_prefix("DNS:")).map(str::to_owned)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_is_verified() {
    let Some(schema) = PgSchema::new(SUITE) else { return };
    let ssl = one(&schema, "SHOW ssl");
    let cert = one(&schema, "SHOW ssl_cert_file").unwrap_or_default();
    if ssl.as_deref() != Some("on") {
        assert!(!celery_tests::services_required() || std::env::var("CI").is_err(), "the server has ssl off");
        eprintln!("SKIPPED tls_is_verified: the server has ssl off");
        return;
    }
    // The server's certificate is self-signed: no system root vouches for it.
    let e = PostgresBackend::connect(&schema.url("db+postgresql", "sslmode=require")).await.unwrap_err();
    assert!(matches!(e, BackendError::Connection { .. }), "{e:?}");
    assert!(e.to_string().to_lowercase().contains("certificate"), "{e}");
    // Trusting it (sslrootcert) and naming the host it is for, TLS connects.
    let Some(name) = server_cert_name(&cert) else {
        panic!("cannot read the server certificate {cert}");
    };
    let url = format!(
        "db+postgresql://postgres@{name}:5432/test?options=-csearch_path%3D{}&sslmode=verify-full&sslrootcert={cert}",
        schema.0
    );
    let b = PostgresBackend::connect(&url).await.unwrap_or_else(|e| panic!("{url}: {e}"));
    b.store(&TaskMeta::success("tls-1", json!("over tls"))).await.unwrap();
    assert_eq!(b.wait("tls-1", T).await.unwrap().unwrap().result, json!("over tls"));
    // The listener connects in the background: wait for both connections to be there.
    let tls_connections = || {
        one(&schema, "SELECT count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) WHERE s.ssl AND a.application_name = 'celery-rs'")
            .map(|n| n.parse::<u32>().unwrap() >= 2)
    };
    celery_tests::wait_until(T, || tls_connections() == Some(true));
    assert_eq!(tls_connections(), Some(true), "the pool and the listener use TLS");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn python_reads_ours_and_we_read_pythons() {
    if !redis_available(SUITE) {
        return;
    }
    let Some(schema) = PgSchema::new(SUITE) else { return };
    let Some(py) = python::venv_or_skip(SUITE) else { return };
    let redis = RedisEnv::new(30.0);
    let ours = schema.url("db+postgresql", "");
    // Python creates the tables first here (create_all), as a Python deployment would have them.
    let pg = python::pg_app_command(py, &redis, &ours, &["pg_app.py", "create"]).output().unwrap();
    assert!(pg.status.success(), "{}", String::from_utf8_lossy(&pg.stderr));
    let app = celery_worker::connect(&redis.broker, &ours).await.expect("connect");

    // Python reads what our worker stored.
    let w = worker(&app, "rs@pg");
    let out = python::pg_app_command(py, &redis, &ours, &["pg_app.py", "produce"]).output().unwrap();
    w.stop().await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let got: Value = serde_json::from_slice(out.stdout.trim_ascii()).unwrap();
    assert_eq!(got["add"], json!(5));
    assert_eq!(got["fail"], json!({"type": "ValueError", "message": "oops"}));
    assert_eq!(got["meta"]["name"], json!("pg_add"));
    assert_eq!(got["meta"]["worker"], json!("rs@pg"));
    assert_eq!(got["meta"]["status"], json!("SUCCESS"));

    // We read what a Python worker stored (Celery 5.7's JSON in the binary columns).
    let worker = Service::start(&mut python::pg_app_command(
        py,
        &redis,
        &ours,
        &[
            "-m",
            "celery",
            "-A",
            "pg_app",
            "worker",
            "--pool=solo",
            "-Q",
            "pg-python",
            "-n",
            "py@pg",
            "--without-gossip",
            "--without-mingle",
        ],
    ));
    let added = app.send(Signature::by_name("pg_py_add").args(json!([20, 22])).queue("pg-python")).await.unwrap();
    let got = added.get::<i64>(T).await;
    assert_eq!(got.unwrap_or_else(|e| panic!("{e}\n{}", worker.log())), 42);
    let meta = app.backend().get(added.id()).await.unwrap().unwrap();
    assert_eq!((meta.name.as_deref(), meta.worker.as_deref()), (Some("pg_py_add"), Some("py@pg")));
    let failed = app.send(Signature::by_name("pg_py_fail").args(json!(["nope"])).queue("pg-python")).await.unwrap();
    match failed.get::<i64>(T).await {
        Err(ResultError::Failed { exc_type, message, .. }) => {
            assert_eq!((exc_type.as_str(), message.as_str()), ("KeyError", "nope"), "{}", worker.log())
        }
        other => panic!("{other:?}\n{}", worker.log()),
    }
    let raw = format!("SELECT convert_from(result, 'UTF8') FROM celery_taskmeta WHERE task_id = '{}'", added.id());
    assert_eq!(one(&schema, &raw).as_deref(), Some("42"), "Celery 5.7 writes JSON");
}

/// A result row whose large columns add up to more than 64 MiB is refused from its size alone:
/// the statement does not send them (counted through a proxy), in Celery's table and in Django's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_row_is_refused_before_it_is_sent() {
    let Some(schema) = PgSchema::new(SUITE) else { return };
    let proxy = CountingProxy::start("127.0.0.1:5432").await;
    let url = schema.url("db+postgresql", "").replace("127.0.0.1:5432", &proxy.addr);
    let b = PostgresBackend::connect(&url).await.expect("connect");
    // 40 MiB of result and 30 MiB of traceback: each under the cap, together over it.
    schema
        .exec(
            "INSERT INTO celery_taskmeta (id, task_id, status, result, traceback, date_done) \
             VALUES (nextval('task_id_sequence'), 'huge', 'SUCCESS', \
                     convert_to('\"' || repeat('x', 40 << 20) || '\"', 'UTF8'), repeat('t', 30 << 20), now())",
        )
        .unwrap();
    b.store(&TaskMeta::success("small", json!(1))).await.unwrap();
    let before = proxy.from_server();
    let e = b.get("huge").await.unwrap_err();
    let read = proxy.from_server() - before;
    assert!(matches!(e, BackendError::Malformed(_)), "{e:?}");
    assert!(e.to_string().contains("refused unread"), "{e}");
    assert!(read < 64 * 1024, "{read} bytes read for a 70 MiB row");
    assert_eq!(b.get("small").await.unwrap().unwrap().result, json!(1), "the others read as ever");

    schema
        .exec(
            "CREATE TABLE django_celery_results_taskresult (id serial PRIMARY KEY, task_id varchar(255) UNIQUE, \
             status varchar(50), content_type varchar(128), content_encoding varchar(64), result text, \
             date_done timestamptz, traceback text, meta text, task_args text, task_kwargs text, \
             task_name varchar(255), worker varchar(100), date_created timestamptz, periodic_task_name varchar(255), \
             date_started timestamptz); \
             INSERT INTO django_celery_results_taskresult (task_id, status, content_type, content_encoding, result, \
             date_done, meta) VALUES ('huge', 'SUCCESS', 'application/json', 'utf-8', \
             '\"' || repeat('x', 70 << 20) || '\"', now(), '{}')",
        )
        .unwrap();
    let url = schema.url("django-db+postgresql", "").replace("127.0.0.1:5432", &proxy.addr);
    let d = PostgresBackend::connect(&url).await.expect("connect");
    let before = proxy.from_server();
    let e = d.get("huge").await.unwrap_err();
    let read = proxy.from_server() - before;
    assert!(e.to_string().contains("refused unread"), "{e}");
    assert!(read < 64 * 1024, "{read} bytes read for a 70 MiB row");
}

/// Errors are judged in one place: a statement's fault is an operation error, a stopped server a
/// connection error (retryable), each with the driver's error as its source.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_say_whether_to_retry_and_keep_their_source() {
    let Some(pg) = PgServer::start(SUITE) else { return };
    let b = PostgresBackend::connect(&pg.url("db+postgresql", "")).await.expect("connect");
    b.store(&TaskMeta::success("a", json!(1))).await.unwrap();
    let driver = |e: &BackendError| {
        let mut source = std::error::Error::source(e);
        while let Some(s) = source {
            if s.downcast_ref::<tokio_postgres::Error>().is_some() {
                return true;
            }
            source = s.source();
        }
        false
    };
    pg_exec_on(&pg, "DROP TABLE celery_taskmeta").await;
    let e = b.get("a").await.unwrap_err();
    assert!(!e.is_retryable() && driver(&e), "{e:?}");
    assert!(e.to_string().contains("42P01"), "the SQLSTATE is named: {e}");
    pg.stop(Shutdown::Fast);
    let e = b.get("a").await.unwrap_err();
    assert!(e.is_retryable() && driver(&e), "{e:?}");
    assert!(e.to_string().starts_with("result backend connection error: postgresql: "), "{e}");
}

/// Runs `sql` on the private server.
async fn pg_exec_on(pg: &PgServer, sql: &str) {
    let cfg: tokio_postgres::Config = pg.url("postgresql", "").parse().unwrap();
    let (client, conn) = cfg.connect(tokio_postgres::NoTls).await.unwrap();
    let driver = tokio::spawn(conn);
    client.batch_execute(sql).await.unwrap();
    drop(client);
    let _ = driver.await;
}

static REFUSED_RUNS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

#[task]
async fn pg_count(x: i64) -> i64 {
    REFUSED_RUNS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    x
}

/// A state the table cannot hold (a task id over `celery_taskmeta.task_id`'s 155 characters, or
/// with a NUL character PostgreSQL refuses) would be refused however often its task ran: the task
/// runs once and is dead-lettered with the reason, while the tasks beside it (in the same
/// batches) are stored; a worker host name longer than the `worker` column is cut to fit; a
/// task's error message with a NUL is stored (it is the task's own text, not a refused id).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_state_the_table_cannot_hold_dead_letters_its_task_once() {
    use celery_core::broker::DEAD_LETTER_REASON;
    let Some(schema) = PgSchema::new(SUITE) else { return };
    let dir = celery_tests::TempDir::new("pg-refused");
    let app = celery_worker::connect(&dir.url("lease_timeout=5&fsync=os"), &schema.url("db+postgresql", ""))
        .await
        .expect("connect");
    let cfg = WorkerConfig {
        concurrency: 4,
        hostname: format!("{}@test", "h".repeat(300)),
        shutdown_grace: Duration::from_secs(5),
        ..WorkerConfig::default()
    };
    let worker = Worker::new(app.clone(), cfg);
    let stats = worker.stats();
    let (stop, rx) = tokio::sync::oneshot::channel::<()>();
    let w = Running {
        stop,
        handle: tokio::spawn(worker.run_until(async move {
            let _ = rx.await;
        })),
    };
    let (long, nul) = ("x".repeat(200), "nul\u{0}id".to_owned());
    let sigs = (0..40).map(|i| match i {
        10 => pg_count::new(i).task_id(long.clone()),
        20 => pg_count::new(i).task_id(nul.clone()),
        _ => pg_count::new(i),
    });
    let results = app.send_batch(sigs).await.unwrap();
    for (i, r) in results.iter().enumerate() {
        if i != 10 && i != 20 {
            assert_eq!(r.get::<i64>(T).await.unwrap(), i as i64, "the tasks beside them are stored");
        }
    }
    // Both refused ones reach the dead letters, each with the table's reason.
    let mut consumer = app.broker().consume(&["celery.dead".to_string()], 16).await.unwrap();
    let mut reasons = std::collections::BTreeMap::new();
    let deadline = Instant::now() + T;
    while reasons.len() < 2 {
        let left = deadline.saturating_duration_since(Instant::now());
        let mut d = tokio::time::timeout(left, consumer.next()).await.expect("both are dead-lettered").unwrap();
        let m = d.message().as_ref().expect("a dead letter decodes");
        let reason = m.headers.extra.get(DEAD_LETTER_REASON).and_then(Value::as_str).unwrap_or_default().to_owned();
        reasons.insert(m.headers.id.clone(), reason);
        d.ack().await.unwrap();
    }
    consumer.stop();
    consumer.close().await;
    assert!(reasons[&long].contains("task id of 200 characters"), "{reasons:?}");
    assert!(reasons[&nul].contains("NUL character"), "{reasons:?}");
    assert!(reasons[&nul].contains("the task ran"), "{reasons:?}");
    // A task's own text with a NUL (its error message) is stored, the NUL replaced in the
    // traceback column (text) and kept in the result (JSON).
    let f = app.send(pg_fail::new("bad\u{0}input".into())).await.unwrap();
    match f.get::<i64>(T).await {
        Err(ResultError::Failed { message, .. }) => assert_eq!(message, "bad\u{0}input"),
        other => panic!("{other:?}"),
    }
    w.stop().await;
    let requeued = stats.requeued.load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(requeued, 0, "a refused state sends its task back to run again, never");
    assert_eq!(stats.rejected.load(std::sync::atomic::Ordering::SeqCst), 2);
    assert_eq!(stats.failed.load(std::sync::atomic::Ordering::SeqCst), 1, "the failing task failed once");
    assert_eq!(REFUSED_RUNS.load(std::sync::atomic::Ordering::SeqCst), 40, "each task ran once");
    let hosts = schema.query("SELECT DISTINCT worker FROM celery_taskmeta").unwrap();
    assert_eq!(hosts.len(), 1, "{hosts:?}");
    assert_eq!(hosts[0][0].as_deref().map(|h| h.chars().count()), Some(155), "the host name cut to fit");
}

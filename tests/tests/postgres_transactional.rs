//! Transactional enqueue (`app.send_in(&tx, sig)`) against the real PostgreSQL and Redis, each
//! test in a schema (and a Redis key prefix) of its own:
//! 1. PostgreSQL broker, direct path: a send in a rolled-back transaction never runs; one in a
//!    committed transaction runs once, is invisible to others until the commit, and its `NOTIFY`
//!    (delivered at commit) wakes an idle worker.
//! 2. Redis broker, through the outbox: the same, with a relay; a send without an outbox table is
//!    refused without aborting the caller's transaction.
//! 3. A PostgreSQL broker in another schema than the transaction's goes through the outbox too.
//! 4. kill -9 of a relay process mid-forward (caught, through a lock on its tried marks, after it
//!    published a batch and before it deleted it): every committed task still runs; the batch is
//!    sent again, marked, and its copies are acked unrun (at most one batch runs again).
//! 5. A task sent again after a relay crash (its row marked tried) is acked unrun by a worker
//!    that stored its SUCCESS, on Redis and on a PostgreSQL broker (whose consumer does not read
//!    the mark: the worker does); an unmarked copy would run again.
//! 6. `worker --outbox URL` relays inside the worker process.
//! 7. Three relays on one outbox share it (`SKIP LOCKED`): every row is forwarded exactly once.
//! 8. A batch takes at most `batch` rows; undecodable and oversized rows are refused with the
//!    reason in `error` and never block the rows behind them.
//! 9. 16 concurrent transactions in READ COMMITTED and in SERIALIZABLE, on both paths, some
//!    committing, some rolling back, serialization failures retried as an application would:
//!    exactly the committed sends run, each once.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use broker_backends::postgres::outbox::{self, Relay, RelayConfig};
use broker_backends::postgres::tokio_postgres::{self, error::SqlState, IsolationLevel, NoTls};
use broker_backends::postgres::transactional::{sql_state, EnqueuePath, SendInTransaction};
use celery_core::{App, Signature, TaskState};
use celery_tests::{redis_available, wait_until, DemoProcess, PgSchema, RedisEnv};
use celery_worker::prelude::*;
use celery_worker::{Worker, WorkerConfig};
use serde_json::json;

const SUITE: &str = "postgres_transactional";
const T: Duration = Duration::from_secs(60);

/// Runs of `tx_tally` by token.
static RUNS: Mutex<BTreeMap<String, u32>> = Mutex::new(BTreeMap::new());

#[task]
async fn tx_tally(token: String) -> String {
    *RUNS.lock().unwrap_or_else(|e| e.into_inner()).entry(token.clone()).or_default() += 1;
    token
}

fn runs(token: &str) -> u32 {
    RUNS.lock().unwrap_or_else(|e| e.into_inner()).get(token).copied().unwrap_or(0)
}

fn tally(token: &str) -> Signature {
    Signature::by_name("tx_tally").args(json!([token]))
}

fn token() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

fn count(schema: &PgSchema, sql: &str) -> i64 {
    schema.query(sql).unwrap()[0][0].as_deref().unwrap().parse().unwrap()
}

/// A schema of its own and an app on Redis (whose broker is not the schema's): the outbox path.
/// `None` (skipped) when Redis or PostgreSQL is not there.
async fn redis_app() -> Option<(PgSchema, RedisEnv, App)> {
    if !redis_available(SUITE) {
        return None;
    }
    let schema = PgSchema::new(SUITE)?;
    let env = RedisEnv::new(30.0);
    let app = celery_worker::connect(&env.broker, &env.backend).await.unwrap();
    Some((schema, env, app))
}

/// A client whose search path is the schema's.
async fn client(schema: &PgSchema) -> tokio_postgres::Client {
    let (c, conn) = tokio_postgres::connect(&schema.url("postgresql", ""), NoTls).await.expect("connect");
    tokio::spawn(conn);
    c
}

/// Something running until dropped (a worker, a relay).
struct Running(Option<tokio::sync::oneshot::Sender<()>>, tokio::task::JoinHandle<()>);

impl Running {
    async fn stop(mut self) {
        let _ = self.0.take().map(|s| s.send(()));
        let _ = (&mut self.1).await;
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.1.abort();
    }
}

fn worker(app: &App) -> Running {
    worker_with_stats(app).0
}

fn worker_with_stats(app: &App) -> (Running, Arc<celery_worker::WorkerStats>) {
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let cfg = WorkerConfig { concurrency: 8, track_started: false, ..WorkerConfig::default() };
    let w = Worker::new(app.clone(), cfg);
    let stats = w.stats();
    let running = Running(
        Some(tx),
        tokio::spawn(async move {
            w.run_until(async {
                let _ = rx.await;
            })
            .await
            .expect("worker");
        }),
    );
    (running, stats)
}

async fn relay(app: &App, db: &str) -> Running {
    let relay = Relay::connect(db, app.broker().clone(), RelayConfig::for_app(app)).await.expect("relay");
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    Running(
        Some(tx),
        tokio::spawn(async move {
            relay
                .run_until(async {
                    let _ = rx.await;
                })
                .await
                .expect("relay");
        }),
    )
}

async fn wait_ran(tokens: &[String], why: &str) {
    let end = Instant::now() + T;
    while tokens.iter().any(|t| runs(t) == 0) {
        assert!(
            Instant::now() < end,
            "{why}: {} of {} never ran",
            tokens.iter().filter(|t| runs(t) == 0).count(),
            tokens.len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_broker_direct_rollback_never_runs_and_commit_runs_once() {
    let Some(schema) = PgSchema::new(SUITE) else { return };
    let app = celery_worker::connect(&schema.url("postgres", ""), &schema.url("db+postgresql", "")).await.unwrap();
    let mut c = client(&schema).await;
    let tasks = "SELECT count(*) FROM celery_rs_tasks";

    let (rolled, committed) = (token(), token());
    let tx = c.transaction().await.unwrap();
    assert_eq!(app.enqueue_path(&tx).await.unwrap(), EnqueuePath::Direct);
    let gone = app.send_in(&tx, tally(&rolled)).await.unwrap();
    let seen: i64 = tx.query_one(tasks, &[]).await.unwrap().get(0);
    assert_eq!(seen, 1, "the transaction sees its task");
    assert_eq!(count(&schema, tasks), 0, "nobody else does");
    tx.rollback().await.unwrap();

    // An idle worker, known to be consuming: a warm-up task went through it.
    let w = worker(&app);
    let warm = token();
    app.send(tally(&warm)).await.unwrap().get::<String>(T).await.unwrap();
    // Its result is stored before its row is acked (deleted): wait for the row to go.
    assert!(wait_until(T, || count(&schema, tasks) == 0), "the warm-up task acked");
    let tx = c.transaction().await.unwrap();
    let res = app.send_in(&tx, tally(&committed)).await.unwrap();
    assert_eq!(count(&schema, tasks), 0, "not visible before the commit");
    tx.commit().await.unwrap();
    // An idle consumer sleeps until a notification (or a minute): the commit's NOTIFY woke it.
    let woke = Instant::now();
    assert_eq!(res.get::<String>(Duration::from_secs(20)).await.unwrap(), committed);
    assert!(woke.elapsed() < Duration::from_secs(20));
    assert!(wait_until(T, || count(&schema, tasks) == 0), "acked and deleted");
    assert_eq!(runs(&committed), 1);
    assert_eq!(runs(&rolled), 0, "rolled back: never ran");
    assert_eq!(gone.state().await.unwrap(), TaskState::Pending);
    assert!(
        schema.query("SELECT to_regclass('celery_rs_outbox')").unwrap()[0][0].is_none(),
        "the direct path needs no outbox"
    );
    w.stop().await;
}

/// A keyed task sent in a transaction (direct path) is a keyed row whose key joins the queue's
/// rotation at once (committed on the broker's connection: a rollback leaves an empty key that a
/// fetch drops), and runs with the commit (served by the fair fetch).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keyed_task_sent_in_a_transaction_keeps_its_fairness_key() {
    let Some(schema) = PgSchema::new(SUITE) else { return };
    let app = celery_worker::connect(&schema.url("postgres", ""), &schema.url("db+postgresql", "")).await.unwrap();
    let mut c = client(&schema).await;
    let ring = "SELECT count(*) FROM celery_rs_fair_ring WHERE key = 'tenant-a'";
    let keyed = token();
    let tx = c.transaction().await.unwrap();
    let res = app.send_in(&tx, tally(&keyed).fairness_key("tenant-a")).await.unwrap();
    let row = tx.query_one("SELECT fair_key, priority FROM celery_rs_tasks", &[]).await.unwrap();
    assert_eq!((row.get::<_, Option<String>>(0).as_deref(), row.get::<_, i16>(1)), (Some("tenant-a"), 1000));
    assert_eq!(count(&schema, ring), 1, "the key joined the rotation outside the transaction");
    tx.commit().await.unwrap();
    assert_eq!(count(&schema, ring), 1);
    let w = worker(&app);
    assert_eq!(res.get::<String>(T).await.unwrap(), keyed);
    assert_eq!(runs(&keyed), 1);
    w.stop().await;
}

/// Under REPEATABLE READ, a keyed task sent in a transaction whose snapshot still shows its key
/// in the rotation after a fetch dropped it (committed meanwhile) puts the key back with the
/// commit (the join does not trust the caller's snapshot).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keyed_send_in_under_repeatable_read_puts_back_a_key_dropped_meanwhile() {
    let Some(schema) = PgSchema::new(SUITE) else { return };
    let app = celery_worker::connect(&schema.url("postgres", ""), &schema.url("db+postgresql", "")).await.unwrap();
    let q = format!("rr-{}", token());
    app.send(tally(&token()).queue(&q).fairness_key("k")).await.unwrap();
    let ring = format!("SELECT count(*) FROM celery_rs_fair_ring WHERE queue = '{q}' AND key = 'k'");
    assert_eq!(count(&schema, &ring), 1);
    let mut c = client(&schema).await;
    let tx = c.build_transaction().isolation_level(IsolationLevel::RepeatableRead).start().await.unwrap();
    // The snapshot is taken with the first statement: the key is in the ring.
    let seen: i64 = tx.query_one(ring.as_str(), &[]).await.unwrap().get(0);
    assert_eq!(seen, 1);
    // A fetch drops the key (as it does once the key has no task), committed after the snapshot.
    schema.exec(&format!("DELETE FROM celery_rs_fair_ring WHERE queue = '{q}' AND key = 'k'")).unwrap();
    assert_eq!(count(&schema, &ring), 0);
    app.send_in(&tx, tally(&token()).queue(&q).fairness_key("k")).await.unwrap();
    tx.commit().await.unwrap();
    assert_eq!(count(&schema, &ring), 1, "the key is back in the rotation");
}

/// A keyed send_in whose transaction has another (existing) schema first on its search path
/// (the direct path: `celery_rs_tasks` resolves to the broker's table) holds the same fair lock
/// of its key as the broker's own statements take: the fetch's exclusive try fails meanwhile (the
/// queue's own lock is not held: the queue's other keys may leave the ring).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keyed_send_in_locks_the_queue_whatever_the_callers_first_schema() {
    let Some(schema) = PgSchema::new(SUITE) else { return };
    let Some(other) = PgSchema::new(SUITE) else { return };
    let app = celery_worker::connect(&schema.url("postgres", ""), &schema.url("db+postgresql", "")).await.unwrap();
    let q = format!("schema-{}", token());
    let mut c = client(&schema).await;
    let tx = c.transaction().await.unwrap();
    tx.batch_execute(&format!("SET LOCAL search_path TO {}, {}", other.0, schema.0)).await.unwrap();
    app.send_in(&tx, tally(&token()).queue(&q).fairness_key("k")).await.unwrap();
    let keyed: i64 = tx.query_one("SELECT count(fair_key) FROM celery_rs_tasks", &[]).await.unwrap().get(0);
    assert_eq!(keyed, 1, "the direct path");
    let fetcher = client(&schema).await;
    let key_free = "SELECT celery_rs_fair_lock_key($1, 'k', false)";
    let free: bool = fetcher.query_one(key_free, &[&q]).await.unwrap().get(0);
    assert!(!free, "the send_in's shared lock holds off the exclusive one");
    let free: bool = fetcher.query_one("SELECT celery_rs_fair_lock($1, false)", &[&q]).await.unwrap().get(0);
    assert!(free, "the queue's own lock is free");
    tx.commit().await.unwrap();
    let free: bool = fetcher.query_one(key_free, &[&q]).await.unwrap().get(0);
    assert!(free);
}

/// An open transaction whose keyed send_in made its queue fair (and added a new key) holds up no
/// other producer: a keyed publish to that queue, and another transaction's keyed send_in of
/// the same new key, go through while it is open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_keyed_send_in_holds_up_no_other_producer() {
    let Some(schema) = PgSchema::new(SUITE) else { return };
    let app = celery_worker::connect(&schema.url("postgres", ""), &schema.url("db+postgresql", "")).await.unwrap();
    let q = format!("open-{}", token());
    let mut c = client(&schema).await;
    let tx = c.transaction().await.unwrap();
    app.send_in(&tx, tally(&token()).queue(&q).fairness_key("new")).await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), app.send(tally(&token()).queue(&q).fairness_key("other")))
        .await
        .expect("a keyed publish does not wait for the open transaction")
        .unwrap();
    let mut c2 = client(&schema).await;
    let tx2 = c2.transaction().await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), app.send_in(&tx2, tally(&token()).queue(&q).fairness_key("new")))
        .await
        .expect("another transaction's send_in of the same key does not wait")
        .unwrap();
    tx2.commit().await.unwrap();
    tx.commit().await.unwrap();
    assert_eq!(app.broker().queue_len(&q).await.unwrap(), 3);
}

/// A purge of a fair queue does not wait for an open transaction that sent a keyed task to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purge_does_not_wait_for_an_open_keyed_send_in() {
    let Some(schema) = PgSchema::new(SUITE) else { return };
    let app = celery_worker::connect(&schema.url("postgres", ""), &schema.url("db+postgresql", "")).await.unwrap();
    let q = format!("purge-{}", token());
    app.send(tally(&token()).queue(&q).fairness_key("a")).await.unwrap();
    let mut c = client(&schema).await;
    let tx = c.transaction().await.unwrap();
    app.send_in(&tx, tally(&token()).queue(&q).fairness_key("b")).await.unwrap();
    let purged = tokio::time::timeout(Duration::from_secs(10), app.broker().purge(&q))
        .await
        .expect("the purge does not wait for the open transaction")
        .unwrap();
    assert_eq!(purged, 1);
    tx.commit().await.unwrap();
    assert_eq!(app.broker().queue_len(&q).await.unwrap(), 1, "the transaction's task is there");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_broker_through_the_outbox_rollback_never_runs_and_commit_runs_once() {
    let Some((schema, _env, app)) = redis_app().await else { return };
    let db = schema.url("postgres", "");
    let mut c = client(&schema).await;

    // No outbox yet: refused before any statement that could fail, so the transaction goes on.
    let tx = c.transaction().await.unwrap();
    assert_eq!(app.enqueue_path(&tx).await.unwrap(), EnqueuePath::Outbox);
    let e = app.send_in(&tx, tally(&token())).await.unwrap_err().to_string();
    assert!(e.contains("celery_rs_outbox") && e.contains("outbox-relay"), "{e}");
    let one: i32 = tx.query_one("SELECT 1", &[]).await.expect("the transaction is not aborted").get(0);
    assert_eq!(one, 1);
    tx.rollback().await.unwrap();

    assert_eq!(outbox::install(&db).await.unwrap(), 1);
    let (rolled, committed) = (token(), token());
    let tx = c.transaction().await.unwrap();
    let gone = app.send_in(&tx, tally(&rolled)).await.unwrap();
    tx.rollback().await.unwrap();
    let tx = c.transaction().await.unwrap();
    let res = app.send_in(&tx, tally(&committed)).await.unwrap();
    assert_eq!(count(&schema, "SELECT count(*) FROM celery_rs_outbox"), 0, "not visible before the commit");
    tx.commit().await.unwrap();
    assert_eq!(count(&schema, "SELECT count(*) FROM celery_rs_outbox"), 1, "only the committed one");

    let w = worker(&app);
    let r = relay(&app, &db).await;
    assert_eq!(res.get::<String>(T).await.unwrap(), committed);
    assert!(wait_until(T, || count(&schema, "SELECT count(*) FROM celery_rs_outbox") == 0), "forwarded rows deleted");
    assert_eq!(count(&schema, "SELECT count(*) FROM celery_rs_outbox_tried"), 0, "and their marks");
    assert_eq!(runs(&committed), 1);
    assert_eq!(runs(&rolled), 0, "rolled back: never sent");
    assert_eq!(gone.state().await.unwrap(), TaskState::Pending);
    assert_eq!(app.broker().queue_len("celery").await.unwrap(), 0);
    r.stop().await;
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_broker_in_another_schema_goes_through_the_outbox() {
    let Some(broker_schema) = PgSchema::new(SUITE) else { return };
    let Some(app_schema) = PgSchema::new(SUITE) else { return };
    let app = celery_worker::connect(&broker_schema.url("postgres", ""), &broker_schema.url("db+postgresql", ""))
        .await
        .unwrap();
    let db = app_schema.url("postgres", "");
    outbox::install(&db).await.unwrap();
    let mut c = client(&app_schema).await;
    let tx = c.transaction().await.unwrap();
    assert_eq!(app.enqueue_path(&tx).await.unwrap(), EnqueuePath::Outbox, "not the broker's table");
    let t = token();
    let res = app.send_in(&tx, tally(&t)).await.unwrap();
    tx.commit().await.unwrap();
    let mut b = client(&broker_schema).await;
    let tx = b.transaction().await.unwrap();
    assert_eq!(app.enqueue_path(&tx).await.unwrap(), EnqueuePath::Direct, "the broker's own schema");
    tx.rollback().await.unwrap();

    let w = worker(&app);
    let r = relay(&app, &db).await;
    assert_eq!(res.get::<String>(T).await.unwrap(), t);
    assert_eq!(runs(&t), 1);
    r.stop().await;
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_a_relay_mid_forward_still_delivers_every_committed_task() {
    let Some((schema, env, app)) = redis_app().await else { return };
    let db = schema.url("postgres", "");
    outbox::install(&db).await.unwrap();
    let mut c = client(&schema).await;
    const N: usize = 3000;
    const BATCH: usize = 20;
    let tokens: Vec<String> = (0..N).map(|_| token()).collect();
    for chunk in tokens.chunks(1000) {
        let tx = c.transaction().await.unwrap();
        app.send_batch_in(&tx, chunk.iter().map(|t| tally(t)).collect::<Vec<_>>()).await.unwrap();
        tx.commit().await.unwrap();
    }
    let pending = || count(&schema, "SELECT count(*) FROM celery_rs_outbox");
    assert_eq!(pending(), N as i64);

    let (w, stats) = worker_with_stats(&app);
    let batch = BATCH.to_string();
    let args = ["outbox-relay", "--db", db.as_str(), "--batch", batch.as_str()];
    let mut first = DemoProcess::start_urls(&env.broker, &env.backend, &args);
    assert!(wait_until(T, || pending() <= (N - 5 * BATCH) as i64), "the first relay forwards\n{}", first.log());
    // Catch it mid-forward: lock the tried marks of its batch in flight (written before it
    // publishes), so that the statement deleting the forwarded rows and their marks waits on us.
    let end = Instant::now() + T;
    let (lock, marked) = loop {
        assert!(Instant::now() < end, "never found a batch in flight\n{}", first.log());
        let lock = c.transaction().await.unwrap();
        let marks = lock.query("SELECT id FROM celery_rs_outbox_tried FOR UPDATE", &[]).await.unwrap();
        if !marks.is_empty() {
            break (lock, marks.len());
        }
        lock.rollback().await.unwrap();
        tokio::time::sleep(Duration::from_millis(2)).await;
    };
    // Once it waits on our lock, it has published the batch and not deleted it: kill it there.
    let waiting = "SELECT count(*) FROM pg_stat_activity WHERE pg_backend_pid() = ANY(pg_blocking_pids(pid))";
    let end = Instant::now() + T;
    loop {
        lock.execute("SELECT pg_stat_clear_snapshot()", &[]).await.unwrap();
        let n: i64 = lock.query_one(waiting, &[]).await.unwrap().get(0);
        if n > 0 {
            break;
        }
        assert!(Instant::now() < end, "the relay never came to delete its batch\n{}", first.log());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    first.signal("KILL");
    first.wait_exit(Duration::from_secs(5)).expect("killed");
    lock.rollback().await.unwrap();
    // The dead session's transaction rolls back (its uncommitted delete is not seen meanwhile).
    let left = pending();
    let tried = count(&schema, "SELECT count(*) FROM celery_rs_outbox_tried");
    assert!(left > 0, "killed while rows were still waiting (left {left})");
    assert_eq!(tried as usize, marked, "the batch in flight stays, marked tried");
    assert!((1..=BATCH).contains(&marked), "one batch in flight: {marked}");
    eprintln!("killed with {left} rows left, {tried} of them marked tried (the batch in flight, published)");

    let second = DemoProcess::start_urls(&env.broker, &env.backend, &args);
    let end = Instant::now() + Duration::from_secs(120);
    while tokens.iter().any(|t| runs(t) == 0) {
        assert!(
            Instant::now() < end,
            "{} committed tasks never ran\n{}",
            tokens.iter().filter(|t| runs(t) == 0).count(),
            second.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(wait_until(T, || pending() == 0), "the outbox drained");
    // The batch in flight was sent again, marked: each copy either found its SUCCESS stored (acked
    // unrun) or arrived while the first still ran (run again).
    let again = || tokens.iter().map(|t| runs(t) as usize).sum::<usize>() - N;
    let unrun = || stats.already_done.load(std::sync::atomic::Ordering::SeqCst) as usize;
    assert!(wait_until(T, || again() + unrun() >= marked), "the {marked} marked rows were sent again");
    eprintln!("{N} committed tasks: {} ran again, {} acked unrun as already done", again(), unrun());
    assert!(again() <= BATCH, "at most the batch in flight is sent again, not {}", again());
    drop(second);
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_sent_again_after_a_relay_crash_does_not_run_twice_on_redis() {
    let Some((schema, _env, app)) = redis_app().await else { return };
    sent_again_after_a_crash(app, &schema).await;
}

/// The PostgreSQL broker's consumer does not read the header (the worker does).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_sent_again_after_a_relay_crash_does_not_run_twice_on_a_postgres_broker_elsewhere() {
    let Some(broker_schema) = PgSchema::new(SUITE) else { return };
    let Some(schema) = PgSchema::new(SUITE) else { return };
    let app = celery_worker::connect(&broker_schema.url("postgres", ""), &broker_schema.url("db+postgresql", ""))
        .await
        .unwrap();
    sent_again_after_a_crash(app, &schema).await;
}

async fn sent_again_after_a_crash(app: App, schema: &PgSchema) {
    let db = schema.url("postgres", "");
    let (w, stats) = worker_with_stats(&app);
    let relay = Relay::connect(&db, app.broker().clone(), RelayConfig::for_app(&app)).await.unwrap();
    let mut c = client(schema).await;
    let t = token();
    let sig = tally(&t).task_id(format!("id-{t}"));

    // A relay published the row, the task ran, and the relay died before deleting the row: the
    // row is still there, marked tried.
    let tx = c.transaction().await.unwrap();
    let res = app.send_in(&tx, sig.clone()).await.unwrap();
    tx.commit().await.unwrap();
    schema.exec("INSERT INTO celery_rs_outbox_tried (id) SELECT id FROM celery_rs_outbox").unwrap();
    app.send(sig.clone()).await.unwrap();
    assert_eq!(res.get::<String>(T).await.unwrap(), t);
    assert_eq!(runs(&t), 1);

    // The next relay sends it again, marked redelivered: the worker finds its SUCCESS and acks it.
    assert_eq!(relay.forward().await.unwrap(), outbox::Forwarded { sent: 1, refused: 0, more: false });
    let acked_unrun = || stats.already_done.load(std::sync::atomic::Ordering::SeqCst) == 1;
    let end = Instant::now() + T;
    while !acked_unrun() {
        assert!(Instant::now() < end, "the duplicate was never handled");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(runs(&t), 1, "not run again");
    assert_eq!(count(schema, "SELECT count(*) FROM celery_rs_outbox_tried"), 0, "the mark went with the row");

    // Unmarked (a fresh delivery of a finished id), a worker runs a task again: hence the mark.
    let tx = c.transaction().await.unwrap();
    app.send_in(&tx, sig).await.unwrap();
    tx.commit().await.unwrap();
    assert_eq!(relay.forward().await.unwrap().sent, 1);
    let end = Instant::now() + T;
    while runs(&t) < 2 {
        assert!(Instant::now() < end, "the unmarked copy never ran");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_started_with_outbox_relays_committed_sends() {
    let Some((schema, env, app)) = redis_app().await else { return };
    let db = schema.url("postgres", "");
    outbox::install(&db).await.unwrap();
    let mut c = client(&schema).await;
    let tx = c.transaction().await.unwrap();
    let res = app.send_in(&tx, Signature::by_name("add").args(json!([2, 3]))).await.unwrap();
    tx.commit().await.unwrap();
    let w = DemoProcess::start_urls(&env.broker, &env.backend, &["worker", "-c", "2", "--outbox", db.as_str()]);
    assert_eq!(res.get::<i64>(T).await.unwrap_or_else(|e| panic!("{e}\n{}", w.log())), 5);
    assert!(wait_until(T, || count(&schema, "SELECT count(*) FROM celery_rs_outbox") == 0));
    assert!(w.log().contains("outbox relay: connected"), "{}", w.log());
}

/// A PostgreSQL broker in a schema of its own (dropped with it): the relay's target in tests that
/// count what reached the broker without a worker.
async fn pg_broker_app(broker_schema: &PgSchema) -> App {
    celery_worker::connect(&broker_schema.url("postgres", ""), &broker_schema.url("db+postgresql", "")).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_relays_on_one_outbox_forward_every_row_exactly_once() {
    let Some(broker_schema) = PgSchema::new(SUITE) else { return };
    let Some(schema) = PgSchema::new(SUITE) else { return };
    let app = pg_broker_app(&broker_schema).await;
    let db = schema.url("postgres", "");
    outbox::install(&db).await.unwrap();
    const N: usize = 2000;
    let mut c = client(&schema).await;
    for chunk in (0..N).collect::<Vec<_>>().chunks(500) {
        let tx = c.transaction().await.unwrap();
        app.send_batch_in(&tx, chunk.iter().map(|_| tally(&token())).collect::<Vec<_>>()).await.unwrap();
        tx.commit().await.unwrap();
    }
    let config = RelayConfig { batch: 25, ..RelayConfig::for_app(&app) };
    let mut relays = Vec::new();
    for _ in 0..3 {
        relays.push(Arc::new(Relay::connect(&db, app.broker().clone(), config.clone()).await.unwrap()));
    }
    // Each relay forwards batches until one finds the outbox empty; all three start together.
    let start = Arc::new(tokio::sync::Barrier::new(3));
    let began = Instant::now();
    let handles: Vec<_> = relays
        .iter()
        .map(|r| {
            let (r, start) = (r.clone(), start.clone());
            tokio::spawn(async move {
                start.wait().await;
                let (mut sent, mut batches) = (0usize, 0usize);
                loop {
                    let f = r.forward().await.expect("forward");
                    assert!(f.sent <= 25, "a batch of {} rows", f.sent);
                    if f.sent == 0 && !f.more {
                        break;
                    }
                    sent += f.sent;
                    batches += 1;
                }
                (sent, batches)
            })
        })
        .collect();
    let mut per_relay = Vec::new();
    for h in handles {
        per_relay.push(h.await.unwrap());
    }
    let took = began.elapsed();
    eprintln!(
        "rows forwarded per relay (rows, batches): {per_relay:?} in {took:?} ({:.0} rows/s)",
        N as f64 / took.as_secs_f64()
    );
    let total: usize = per_relay.iter().map(|(s, _)| s).sum();
    assert_eq!(total, N, "every row forwarded once, none twice: {per_relay:?}");
    assert!(per_relay.iter().filter(|(s, _)| *s > 0).count() >= 2, "the relays shared the outbox: {per_relay:?}");
    assert_eq!(relays[0].pending().await.unwrap(), 0);
    assert_eq!(count(&schema, "SELECT count(*) FROM celery_rs_outbox_tried"), 0);
    assert_eq!(app.broker().queue_len("celery").await.unwrap(), N as u64, "no duplicate reached the broker");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_are_bounded_and_bad_rows_are_refused_with_a_reason_without_blocking() {
    let Some(broker_schema) = PgSchema::new(SUITE) else { return };
    let Some(schema) = PgSchema::new(SUITE) else { return };
    let app = pg_broker_app(&broker_schema).await;
    let db = schema.url("postgres", "");
    outbox::install(&db).await.unwrap();
    // The oldest rows are bad: one undecodable, one larger than the relay's limit.
    schema
        .exec(
            "INSERT INTO celery_rs_outbox (task_id, exchange, routing_key, payload) VALUES \
             ('bad-json', '', 'celery', convert_to('{not json', 'UTF8')), \
             ('too-big', '', 'celery', convert_to(repeat('x', 300000), 'UTF8'))",
        )
        .unwrap();
    let mut c = client(&schema).await;
    let tx = c.transaction().await.unwrap();
    // The first good one is larger than the payloads a take reads inline: it is read on its own.
    let big = "b".repeat(100_000);
    let sigs = std::iter::once(tally(&big)).chain((0..8).map(|_| tally(&token()))).collect::<Vec<_>>();
    let good = app.send_batch_in(&tx, sigs).await.unwrap();
    tx.commit().await.unwrap();

    let config = RelayConfig { batch: 7, max_payload: 200_000, ..RelayConfig::for_app(&app) };
    let relay = Relay::connect(&db, app.broker().clone(), config).await.unwrap();
    assert_eq!(relay.pending().await.unwrap(), 11);
    let first = relay.forward().await.unwrap();
    assert_eq!(first, outbox::Forwarded { sent: 5, refused: 2, more: true }, "7 rows taken: 2 bad, 5 good");
    let second = relay.forward().await.unwrap();
    assert_eq!(second, outbox::Forwarded { sent: 4, refused: 0, more: false }, "the rest, not blocked");
    assert_eq!(relay.forward().await.unwrap(), outbox::Forwarded::default(), "refused rows are not taken again");
    assert_eq!(relay.pending().await.unwrap(), 0);
    assert_eq!(app.broker().queue_len("celery").await.unwrap(), good.len() as u64);

    let reasons = schema.query("SELECT task_id, error FROM celery_rs_outbox ORDER BY id").unwrap();
    assert_eq!(reasons.len(), 2, "refused rows stay for an operator: {reasons:?}");
    let reason = |i: usize| reasons[i][1].clone().unwrap_or_default();
    assert_eq!(reasons[0][0].as_deref(), Some("bad-json"));
    assert!(reason(0).starts_with("undecodable"), "{}", reason(0));
    assert_eq!(reasons[1][0].as_deref(), Some("too-big"));
    assert!(reason(1).contains("300000 bytes exceeds the limit of 200000"), "{}", reason(1));
    let peeked = app.broker().peek("celery", 20).await.unwrap();
    let big_one = peeked.iter().flatten().find(|m| m.headers.id == good[0].id()).expect("the large task was forwarded");
    assert_eq!(big_one.body().unwrap().args, vec![json!(big)], "read whole");

    // `SET error = NULL` sends a row again: still undecodable, refused again (and not forwarded).
    schema.exec("UPDATE celery_rs_outbox SET error = NULL WHERE task_id = 'bad-json'").unwrap();
    assert_eq!(relay.forward().await.unwrap(), outbox::Forwarded { sent: 0, refused: 1, more: false });
}

/// A failure that an application retries the whole transaction for.
fn must_retry(code: Option<&SqlState>) -> bool {
    code.is_some_and(|c| *c == SqlState::T_R_SERIALIZATION_FAILURE || *c == SqlState::T_R_DEADLOCK_DETECTED)
}

/// What 16 concurrent transactions sent: `(committed tokens, tokens of rolled-back or failed
/// attempts, serialization failures)`. Each transaction sends first, then updates one shared row;
/// all 16 have sent (and taken their snapshot) before any updates, so under SERIALIZABLE all but
/// the first committer fail and retry. Every fourth transaction rolls back.
async fn sixteen_transactions(
    app: &App,
    schema: &PgSchema,
    level: IsolationLevel,
) -> (Vec<String>, Vec<String>, usize) {
    schema.exec("CREATE TABLE ledger (id int PRIMARY KEY, n int NOT NULL); INSERT INTO ledger VALUES (1, 0)").unwrap();
    let barrier = Arc::new(tokio::sync::Barrier::new(16));
    let mut handles = Vec::new();
    for i in 0..16 {
        let (app, barrier) = (app.clone(), barrier.clone());
        let mut c = client(schema).await;
        handles.push(tokio::spawn(async move {
            let (mut done, mut not, mut failures) = (None, Vec::new(), 0usize);
            for attempt in 0.. {
                assert!(attempt < 100, "transaction {i} never got through");
                let t = format!("{i}-{attempt}-{}", token());
                let tx = c.build_transaction().isolation_level(level).start().await.unwrap();
                let sent = app.send_in(&tx, tally(&t)).await;
                if attempt == 0 {
                    barrier.wait().await;
                }
                let outcome = match sent {
                    Err(e) => Err(sql_state(&e).cloned().ok_or(e.to_string())),
                    Ok(_) => match tx.execute("UPDATE ledger SET n = n + 1 WHERE id = 1", &[]).await {
                        Err(e) => Err(e.code().cloned().ok_or(e.to_string())),
                        Ok(_) if i % 4 == 0 => {
                            tx.rollback().await.unwrap();
                            not.push(t);
                            break;
                        }
                        Ok(_) => tx.commit().await.map_err(|e| e.code().cloned().ok_or(e.to_string())),
                    },
                };
                match outcome {
                    Ok(()) => {
                        done = Some(t);
                        break;
                    }
                    Err(Ok(code)) if must_retry(Some(&code)) => {
                        failures += 1;
                        not.push(t);
                    }
                    Err(e) => panic!("transaction {i}: {e:?}"),
                }
            }
            (done, not, failures)
        }));
    }
    let (mut committed, mut not, mut failures) = (Vec::new(), Vec::new(), 0);
    for h in handles {
        let (d, n, f) = h.await.unwrap();
        committed.extend(d);
        not.extend(n);
        failures += f;
    }
    assert_eq!(committed.len(), 12);
    assert_eq!(count(schema, "SELECT n FROM ledger"), 12, "the application's own writes agree");
    (committed, not, failures)
}

async fn exactly_the_committed_run(committed: &[String], not: &[String], drained: impl Fn() -> bool) {
    wait_ran(committed, "committed").await;
    assert!(wait_until(T, drained), "nothing else waits");
    for t in committed {
        assert_eq!(runs(t), 1, "{t} ran once");
    }
    for t in not {
        assert_eq!(runs(t), 0, "{t} was rolled back and never ran");
    }
}

async fn direct_concurrently(level: IsolationLevel) {
    let Some(schema) = PgSchema::new(SUITE) else { return };
    let app = celery_worker::connect(&schema.url("postgres", ""), &schema.url("db+postgresql", "")).await.unwrap();
    let w = worker(&app);
    let (committed, not, failures) = sixteen_transactions(&app, &schema, level).await;
    if matches!(level, IsolationLevel::Serializable) {
        assert!(failures > 0, "the transactions overlapped");
    }
    exactly_the_committed_run(&committed, &not, || count(&schema, "SELECT count(*) FROM celery_rs_tasks") == 0).await;
    w.stop().await;
}

async fn outbox_concurrently(level: IsolationLevel) {
    let Some((schema, _env, app)) = redis_app().await else { return };
    let db = schema.url("postgres", "");
    let w = worker(&app);
    let r = relay(&app, &db).await;
    let (committed, not, failures) = sixteen_transactions(&app, &schema, level).await;
    if matches!(level, IsolationLevel::Serializable) {
        assert!(failures > 0, "the transactions overlapped");
    }
    exactly_the_committed_run(&committed, &not, || count(&schema, "SELECT count(*) FROM celery_rs_outbox") == 0).await;
    r.stop().await;
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_concurrent_transactions_direct_read_committed() {
    direct_concurrently(IsolationLevel::ReadCommitted).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_concurrent_transactions_direct_serializable() {
    direct_concurrently(IsolationLevel::Serializable).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_concurrent_transactions_outbox_read_committed() {
    outbox_concurrently(IsolationLevel::ReadCommitted).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_concurrent_transactions_outbox_serializable() {
    outbox_concurrently(IsolationLevel::Serializable).await;
}

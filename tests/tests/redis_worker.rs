//! The worker against the real Redis, in-process: results, retries, time limits, panics, expiry,
//! countdown, bad input and dead letters, lease renewal.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use celery_core::{App, AppConfig, AppError, ProtocolError, ResultError, Signature, TaskState};
use celery_tests::{redis_available, wait_until, PrivateRedis, RedisEnv};
use celery_worker::prelude::*;
use chrono::Utc;
use redis::Commands;
use serde_json::{json, Value};

#[task]
async fn add(x: i64, y: i64) -> i64 {
    x + y
}

#[task]
fn blocking_add(x: i64, y: i64) -> i64 {
    x + y
}

#[task]
async fn now_ms() -> i64 {
    Utc::now().timestamp_millis()
}

#[task(time_limit = 0.5)]
async fn too_slow(ms: u64) -> u64 {
    tokio::time::sleep(Duration::from_millis(ms)).await;
    ms
}

#[task(soft_time_limit = 0.2)]
async fn soft_limited(ctx: TaskContext) -> bool {
    tokio::select! {
        _ = ctx.soft_time_limit() => true,
        _ = tokio::time::sleep(Duration::from_secs(5)) => false,
    }
}

#[task]
async fn boom() -> u32 {
    panic!("boom at the worker")
}

#[task(max_retries = 3)]
async fn flaky(ctx: TaskContext, failures: u32) -> Result<u32, TaskError> {
    if ctx.retries() < failures {
        return Err(ctx.retry(Some(Duration::from_millis(50))));
    }
    Ok(ctx.retries())
}

static BACKOFF_RUNS: AtomicU32 = AtomicU32::new(0);

#[task(autoretry, max_retries = 3, retry_backoff = 0.1, retry_jitter = false)]
async fn always_fails() -> Result<(), TaskError> {
    BACKOFF_RUNS.fetch_add(1, Ordering::SeqCst);
    Err(TaskError::new("ValueError", "nope"))
}

static LONG_RUNS: AtomicU32 = AtomicU32::new(0);

#[task]
async fn long_once(ms: u64) -> u32 {
    let n = LONG_RUNS.fetch_add(1, Ordering::SeqCst) + 1;
    tokio::time::sleep(Duration::from_millis(ms)).await;
    n
}

struct Harness {
    env: RedisEnv,
    app: App,
    stops: Vec<tokio::sync::oneshot::Sender<()>>,
    workers: Vec<tokio::task::JoinHandle<Result<(), celery_worker::WorkerError>>>,
}

impl Harness {
    async fn new(vt: f64) -> Option<Harness> {
        if !redis_available("redis_worker") {
            return None;
        }
        let env = RedisEnv::new(vt);
        let app = celery_worker::connect(&env.broker, &env.backend).await.expect("connect");
        Some(Harness { env, app, stops: Vec::new(), workers: Vec::new() })
    }

    async fn worker(&mut self, concurrency: usize) {
        self.worker_with(concurrency, 4).await
    }

    async fn worker_with(&mut self, concurrency: usize, prefetch_multiplier: usize) {
        let app = celery_worker::connect(&self.env.broker, &self.env.backend).await.expect("connect");
        let cfg = WorkerConfig {
            concurrency,
            prefetch_multiplier,
            shutdown_grace: Duration::from_secs(5),
            ..WorkerConfig::default()
        };
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        self.stops.push(tx);
        self.workers.push(tokio::spawn(Worker::new(app, cfg).run_until(async {
            let _ = rx.await;
        })));
    }

    async fn stop(mut self) {
        for s in self.stops.drain(..) {
            let _ = s.send(());
        }
        for w in self.workers.drain(..) {
            w.await.expect("join").expect("worker");
        }
    }

    fn dead_letters(&self, queue: &str) -> Vec<Value> {
        let raw: Vec<String> = self.env.conn().lrange(self.env.key(&format!("{queue}.dead")), 0, -1).unwrap();
        raw.iter().map(|s| serde_json::from_str(s).unwrap()).collect()
    }
}

const T: Duration = Duration::from_secs(15);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_of_async_and_blocking_tasks() {
    let Some(mut h) = Harness::new(30.0).await else {
        return;
    };
    h.worker(4).await;
    let a = h.app.send(add::new(2, 3)).await.unwrap();
    let b = h.app.send(blocking_add::new(4, 5)).await.unwrap();
    let c = h.app.send_by_name("add", json!([10, 20]), json!({})).await.unwrap();
    let d = h.app.send_by_name("add", json!([1]), json!({"y": 2})).await.unwrap();
    assert_eq!(a.get::<i64>(T).await.unwrap(), 5);
    assert_eq!(b.get::<i64>(T).await.unwrap(), 9);
    assert_eq!(c.get::<i64>(T).await.unwrap(), 30);
    assert_eq!(d.get::<i64>(T).await.unwrap(), 3);
    assert_eq!(a.state().await.unwrap(), TaskState::Success);
    let meta = a.info().await.unwrap().unwrap();
    assert_eq!(meta.name.as_deref(), Some("add"));
    a.forget().await.unwrap();
    assert_eq!(a.state().await.unwrap(), TaskState::Pending);
    h.stop().await;
}

/// Tasks that end together have their states stored together: 1,000 `add`s run 128 at a time
/// store their SUCCESS, and STARTED unless the task ended before it went out, each written once
/// (`SETEX`), in fewer script calls than tasks (counted on a server of the test's own; the
/// fetches' scripts included). Before, each state was a script call of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn states_of_tasks_ending_together_are_stored_in_batches() {
    const N: i64 = 1000;
    let Some(server) = PrivateRedis::start() else { return };
    let app = celery_worker::connect(&server.url, &server.url).await.expect("connect");
    let cfg = WorkerConfig { concurrency: 128, queues: vec!["celery".into()], ..WorkerConfig::default() };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let worker = tokio::spawn(Worker::new(app.clone(), cfg).run_until(async {
        let _ = stopped.await;
    }));
    let scripts = || server.calls("evalsha") + server.calls("eval");
    let (setex, calls) = (server.calls("setex"), scripts());
    let results = app.send_batch((0..N).map(|i| add::new(i, 1))).await.unwrap();
    for (i, r) in results.iter().enumerate() {
        assert_eq!(r.get::<i64>(T).await.unwrap(), i as i64 + 1);
    }
    let (setex, calls) = (server.calls("setex") - setex, scripts() - calls);
    assert!((N as u64..=2 * N as u64).contains(&setex), "{setex} states stored for {N} tasks");
    assert!(calls < N as u64, "{calls} script calls for {setex} states");
    let _ = stop.send(());
    worker.await.unwrap().unwrap();
}

/// A task that runs longer than a round trip shows STARTED while it runs (its STARTED is queued
/// without waiting, and left out only when the task ends before it goes out).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_task_shows_started() {
    let Some(mut h) = Harness::new(30.0).await else {
        return;
    };
    h.worker(2).await;
    let r = h.app.send(too_slow::new(400)).await.unwrap();
    let t = std::time::Instant::now();
    let mut state = r.state().await.unwrap();
    while state != TaskState::Started && t.elapsed() < T {
        tokio::time::sleep(Duration::from_millis(5)).await;
        state = r.state().await.unwrap();
    }
    assert_eq!(state, TaskState::Started);
    assert_eq!(r.get::<u64>(T).await.unwrap(), 400);
    h.stop().await;
}

/// The backend's batched store keeps `store`'s rules: a stored SUCCESS is not overwritten, each
/// state wakes its waiter, and documents over a call's byte bound go in calls of their own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batched_store_keeps_the_rules_of_one() {
    use celery_core::capability::StoreBatches;
    use celery_core::{ResultBackend, TaskMeta};
    let Some(server) = PrivateRedis::start() else { return };
    let b = result_backends::redis::RedisBackend::connect(&server.url).await.unwrap();
    b.store(&TaskMeta::success("done", json!(1))).await.unwrap();
    let mut sub = server.conn();
    sub.set_read_timeout(Some(T)).unwrap();
    let mut sub = sub.as_pubsub();
    sub.subscribe(b.key("waited")).unwrap();
    let big = "x".repeat(700 << 10);
    let metas = [
        TaskMeta::success("done", json!(2)),
        TaskMeta::success("waited", json!(3)),
        TaskMeta::new("started", TaskState::Started, json!({})),
        TaskMeta::success("big-1", json!(big)),
        TaskMeta::success("big-2", json!(big)),
    ];
    // The script loaded first (a first call on a fresh server is refused with NOSCRIPT and sent again).
    b.store_many(&[TaskMeta::new("loaded", TaskState::Started, json!({}))]).await.unwrap();
    let calls = server.calls("evalsha") + server.calls("eval");
    b.store_many(&metas).await.unwrap();
    let calls = server.calls("evalsha") + server.calls("eval") - calls;
    assert_eq!(calls, 2, "the second 700 KiB document goes in a call of its own");
    assert_eq!(b.get("done").await.unwrap().unwrap().result, json!(1), "SUCCESS kept");
    assert_eq!(b.get("started").await.unwrap().unwrap().status, TaskState::Started);
    assert_eq!(b.get("big-2").await.unwrap().unwrap().result, json!(big));
    let published: Vec<u8> = sub.get_message().expect("its state published").get_payload().unwrap();
    assert_eq!(TaskMeta::from_slice(&published).unwrap().result, json!(3));
    // One store keeps the rules too.
    b.store(&TaskMeta::new("done", TaskState::Started, json!({}))).await.unwrap();
    assert_eq!(b.get("done").await.unwrap().unwrap().result, json!(1), "SUCCESS kept by one store");
    let ttl: i64 = server.conn().ttl(b.key("done")).unwrap();
    assert!(ttl > 0, "{ttl}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_sends_all_run() {
    let Some(mut h) = Harness::new(30.0).await else {
        return;
    };
    h.worker(8).await;
    let results = h.app.send_batch((0..200).map(|i| add::new(i, i))).await.unwrap();
    for (i, r) in results.iter().enumerate() {
        assert_eq!(r.get::<i64>(T).await.unwrap(), 2 * i as i64);
    }
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_reach_success_and_give_up_at_max_retries() {
    let Some(mut h) = Harness::new(30.0).await else {
        return;
    };
    h.worker(4).await;
    let ok = h.app.send(flaky::new(2)).await.unwrap();
    assert_eq!(ok.get::<u32>(T).await.unwrap(), 2, "succeeds on its third run");
    let gives_up = h.app.send(flaky::new(10)).await.unwrap();
    match gives_up.get::<u32>(T).await {
        Err(ResultError::Failed { exc_type, .. }) => {
            assert_eq!(exc_type, "MaxRetriesExceededError")
        }
        other => panic!("expected FAILURE, got {other:?}"),
    }
    let meta = gives_up.info().await.unwrap().unwrap();
    assert_eq!(meta.retries, Some(3));
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn autoretry_backs_off_exponentially_then_fails() {
    let Some(mut h) = Harness::new(30.0).await else {
        return;
    };
    h.worker(4).await;
    let t0 = std::time::Instant::now();
    let r = h.app.send(always_fails::new()).await.unwrap();
    match r.get::<()>(T).await {
        Err(ResultError::Failed { exc_type, message, .. }) => {
            assert_eq!(exc_type, "ValueError");
            assert_eq!(message, "nope");
        }
        other => panic!("expected FAILURE, got {other:?}"),
    }
    // Backoff 0.1 * 2^n without jitter: 0.1 + 0.2 + 0.4 s before the fourth and last run.
    assert!(t0.elapsed() >= Duration::from_millis(700), "retried too early: {:?}", t0.elapsed());
    assert_eq!(BACKOFF_RUNS.load(Ordering::SeqCst), 4);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn countdown_is_honoured_and_held_by_the_broker() {
    let Some(mut h) = Harness::new(30.0).await else {
        return;
    };
    h.worker(2).await;
    let sent = Utc::now().timestamp_millis();
    let r = h.app.send(now_ms::new().countdown(Duration::from_millis(2500))).await.unwrap();
    // Sent to its queue (as Celery sends it), then moved by the worker into the broker's delayed
    // set, where it waits: not in a worker, not leased.
    let delayed = h.env.key("_celery_rs.delayed.celery");
    assert!(wait_until(Duration::from_secs(2), || h.env.conn().zcard::<_, u64>(&delayed).unwrap() == 1));
    let (queued, unacked): (u64, u64) =
        (h.env.conn().llen(h.env.key("celery")).unwrap(), h.env.conn().hlen(h.env.key("unacked")).unwrap());
    assert_eq!((queued, unacked), (0, 0));
    let ran: i64 = r.get(T).await.unwrap();
    assert!(ran - sent >= 2500, "ran {} ms after sending", ran - sent);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_tasks_are_revoked_not_run() {
    let Some(mut h) = Harness::new(30.0).await else {
        return;
    };
    h.worker(2).await;
    let r = h.app.send(add::new(1, 1).expires(Utc::now() - chrono::Duration::seconds(1))).await.unwrap();
    assert!(matches!(r.get::<i64>(T).await, Err(ResultError::Revoked)));
    assert_eq!(r.state().await.unwrap(), TaskState::Revoked);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hard_and_soft_time_limits() {
    let Some(mut h) = Harness::new(30.0).await else {
        return;
    };
    h.worker(4).await;
    let t0 = std::time::Instant::now();
    let slow = h.app.send(too_slow::new(10_000)).await.unwrap();
    match slow.get::<u64>(T).await {
        Err(ResultError::Failed { exc_type, .. }) => assert_eq!(exc_type, "TimeLimitExceeded"),
        other => panic!("expected TimeLimitExceeded, got {other:?}"),
    }
    assert!(t0.elapsed() < Duration::from_secs(5), "not abandoned at the hard limit");
    let soft = h.app.send(soft_limited::new()).await.unwrap();
    assert!(soft.get::<bool>(T).await.unwrap(), "the context was told of the soft limit");
    // A per-call limit in the message wins over none.
    let per_call = h.app.send(add::new(1, 2).time_limit(Duration::from_secs(3))).await.unwrap();
    assert_eq!(per_call.get::<i64>(T).await.unwrap(), 3);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_is_a_failure_and_the_worker_goes_on() {
    let Some(mut h) = Harness::new(30.0).await else {
        return;
    };
    h.worker(2).await;
    let r = h.app.send(boom::new()).await.unwrap();
    match r.get::<u32>(T).await {
        Err(ResultError::Failed { exc_type, message, .. }) => {
            assert_eq!(exc_type, "Panic");
            assert!(message.contains("boom at the worker"), "{message}");
        }
        other => panic!("expected FAILURE, got {other:?}"),
    }
    assert_eq!(h.app.send(add::new(2, 2)).await.unwrap().get::<i64>(T).await.unwrap(), 4);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_dead_lettered_with_a_reason() {
    let Some(mut h) = Harness::new(30.0).await else {
        return;
    };
    h.worker(2).await;
    let mut conn = h.env.conn();
    let q = h.env.key("celery");
    let _: () = conn.lpush(&q, "this is not json").unwrap();
    let _: () = conn.lpush(&q, r#"{"body": "W10=", "properties": {}}"#).unwrap();
    let unknown = h.app.send_by_name("no_such_task", json!([]), json!({})).await.unwrap();
    let wrong_types = h.app.send_by_name("add", json!(["two", 3]), json!({})).await.unwrap();
    let too_many = h.app.send_by_name("add", json!([1, 2, 3]), json!({})).await.unwrap();

    match unknown.get::<Value>(T).await {
        Err(ResultError::Failed { message, .. }) => {
            assert!(message.contains("unregistered task `no_such_task`"), "{message}")
        }
        other => panic!("expected FAILURE, got {other:?}"),
    }
    match wrong_types.get::<i64>(T).await {
        Err(ResultError::Failed { message, .. }) => {
            assert!(message.contains("argument `x`"), "{message}")
        }
        other => panic!("expected FAILURE, got {other:?}"),
    }
    assert!(matches!(too_many.get::<i64>(T).await, Err(ResultError::Failed { .. })));
    // The worker is still alive and well.
    assert_eq!(h.app.send(add::new(2, 3)).await.unwrap().get::<i64>(T).await.unwrap(), 5);

    let dead = h.dead_letters("celery");
    assert_eq!(dead.len(), 5, "{dead:#?}");
    let reasons: Vec<String> =
        dead.iter().map(|d| d["headers"]["x-dead-letter-reason"].as_str().unwrap().to_owned()).collect();
    assert!(reasons.iter().any(|r| r.contains("not valid JSON")), "{reasons:?}");
    assert!(reasons.iter().any(|r| r.contains("lacks the `headers` field")), "{reasons:?}");
    assert!(reasons.iter().any(|r| r.contains("unregistered task")), "{reasons:?}");
    assert!(reasons.iter().any(|r| r.contains("argument `x`")), "{reasons:?}");
    // Nothing is left leased.
    assert!(wait_until(Duration::from_secs(2), || h.env.conn().hlen::<_, u64>(h.env.key("unacked")).unwrap() == 0));
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_messages_are_refused_at_send_time() {
    let Some(h) = Harness::new(30.0).await else {
        return;
    };
    let big = "x".repeat(17 * 1024 * 1024);
    match h.app.send(Signature::by_name("echo").args(json!([big]))).await {
        Err(AppError::Protocol(ProtocolError::TooLarge { limit, .. })) => {
            assert_eq!(limit, 16 * 1024 * 1024)
        }
        other => panic!("expected TooLarge, got {other:?}"),
    }
    let small = h.app.clone().with_config(AppConfig { max_message_size: 100, ..AppConfig::default() });
    assert!(small.send(add::new(1, 2).header("pad", json!("y".repeat(200)))).await.is_err());
    assert_eq!(h.env.conn().llen::<_, u64>(h.env.key("celery")).unwrap(), 0, "nothing was queued");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_longer_than_the_visibility_timeout_runs_once() {
    let Some(mut h) = Harness::new(1.0).await else {
        return;
    };
    h.worker(2).await;
    h.worker(2).await;
    let r = h.app.send(long_once::new(3500)).await.unwrap();
    assert_eq!(r.get::<u32>(T).await.unwrap(), 1);
    // Give a wrongly restored copy time to run.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(LONG_RUNS.load(Ordering::SeqCst), 1, "the lease was not renewed: the task ran twice");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn higher_priority_runs_first() {
    let Some(mut h) = Harness::new(30.0).await else {
        return;
    };
    let low = h.app.send(now_ms::new().priority(0)).await.unwrap();
    let high = h.app.send(now_ms::new().priority(9)).await.unwrap();
    // One delivery at a time, so the broker's order is the run order.
    h.worker_with(1, 1).await;
    let (l, hi): (i64, i64) = (low.get(T).await.unwrap(), high.get(T).await.unwrap());
    assert!(hi <= l, "priority 9 ran after priority 0");
    h.stop().await;
}

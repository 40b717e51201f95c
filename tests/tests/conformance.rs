//! One suite, every broker and result backend: the same scenarios run against `log://` (a fresh
//! directory), `log+tcp://` (a server in this process, with a token), `redis://` (a fresh key
//! prefix) and `amqp://` (a fresh RabbitMQ vhost, results on Redis), through the public traits only;
//! the scenarios that store results run again on Redis with results in PostgreSQL (`db+postgresql://`),
//! and the whole suite runs on the loopback Redis Cluster (`redis+cluster://`, each queue over two
//! shards).

use std::time::Duration;

use celery_core::{App, ResultError, Signature, TaskState};
use celery_tests::Target;
use celery_worker::prelude::*;
use chrono::Utc;
use serde_json::json;

#[task]
async fn c_add(x: i64, y: i64) -> i64 {
    x + y
}

#[task]
fn c_blocking_mul(x: i64, y: i64) -> i64 {
    x * y
}

#[task]
async fn c_now_ms() -> i64 {
    Utc::now().timestamp_millis()
}

#[task]
async fn c_sleep(ms: u64) -> u64 {
    tokio::time::sleep(Duration::from_millis(ms)).await;
    ms
}

#[task(max_retries = 3)]
async fn c_flaky(ctx: TaskContext, failures: u32) -> Result<u32, TaskError> {
    if ctx.retries() < failures {
        return Err(ctx.retry(Some(Duration::from_millis(50))));
    }
    Ok(ctx.retries())
}

#[task(time_limit = 0.3)]
async fn c_too_slow() -> u32 {
    tokio::time::sleep(Duration::from_secs(10)).await;
    1
}

#[task]
async fn c_boom() -> u32 {
    panic!("conformance boom")
}

const T: Duration = Duration::from_secs(20);

struct Running {
    stats: std::sync::Arc<celery_worker::WorkerStats>,
    stop: tokio::sync::oneshot::Sender<()>,
    handle: tokio::task::JoinHandle<Result<(), celery_worker::WorkerError>>,
}

fn worker(app: &App, concurrency: usize, prefetch_multiplier: usize) -> Running {
    let cfg = WorkerConfig {
        concurrency,
        prefetch_multiplier,
        shutdown_grace: Duration::from_secs(5),
        ..WorkerConfig::default()
    };
    spawn_worker(app, cfg)
}

fn spawn_worker(app: &App, cfg: WorkerConfig) -> Running {
    let (stop, rx) = tokio::sync::oneshot::channel::<()>();
    let worker = Worker::new(app.clone(), cfg);
    let stats = worker.stats();
    let handle = tokio::spawn(worker.run_until(async {
        let _ = rx.await;
    }));
    Running { stats, stop, handle }
}

impl Running {
    async fn stop(self) {
        let _ = self.stop.send(());
        self.handle.await.expect("join").expect("worker");
    }
}

async fn results_and_failures(t: Target) {
    let app = t.app().await;
    let w = worker(&app, 4, 4);
    let a = app.send(c_add::new(2, 3)).await.unwrap();
    let b = app.send(c_blocking_mul::new(4, 5)).await.unwrap();
    let by_name = app.send_by_name("c_add", json!([1]), json!({"y": 1})).await.unwrap();
    let slow = app.send(c_too_slow::new()).await.unwrap();
    let boom = app.send(c_boom::new()).await.unwrap();
    assert_eq!(a.get::<i64>(T).await.unwrap(), 5);
    assert_eq!(b.get::<i64>(T).await.unwrap(), 20);
    assert_eq!(by_name.get::<i64>(T).await.unwrap(), 2);
    assert!(
        matches!(slow.get::<u32>(T).await, Err(ResultError::Failed { exc_type, .. }) if exc_type == "TimeLimitExceeded")
    );
    assert!(
        matches!(boom.get::<u32>(T).await, Err(ResultError::Failed { message, .. }) if message.contains("conformance boom"))
    );
    a.forget().await.unwrap();
    assert_eq!(a.state().await.unwrap(), TaskState::Pending);
    w.stop().await;
}

async fn retries_countdown_expiry(t: Target) {
    let app = t.app().await;
    let w = worker(&app, 4, 4);
    let ok = app.send(c_flaky::new(2)).await.unwrap();
    let gives_up = app.send(c_flaky::new(9)).await.unwrap();
    let sent = Utc::now().timestamp_millis();
    let later = app.send(c_now_ms::new().countdown(Duration::from_millis(1500))).await.unwrap();
    let expired = app.send(c_add::new(1, 1).expires(Utc::now() - chrono::Duration::seconds(1))).await.unwrap();
    assert_eq!(ok.get::<u32>(T).await.unwrap(), 2);
    assert!(
        matches!(gives_up.get::<u32>(T).await, Err(ResultError::Failed { exc_type, .. }) if exc_type == "MaxRetriesExceededError")
    );
    let ran: i64 = later.get(T).await.unwrap();
    assert!(ran - sent >= 1500, "countdown not honoured: ran after {} ms", ran - sent);
    assert!(matches!(expired.get::<i64>(T).await, Err(ResultError::Revoked)));
    w.stop().await;
}

async fn bad_input_is_dead_lettered(t: Target) {
    let app = t.app().await;
    let w = worker(&app, 2, 4);
    let unknown = app.send_by_name("c_no_such_task", json!([]), json!({})).await.unwrap();
    let wrong = app.send_by_name("c_add", json!(["x", 1]), json!({})).await.unwrap();
    assert!(
        matches!(unknown.get::<i64>(T).await, Err(ResultError::Failed { message, .. }) if message.contains("unregistered task"))
    );
    assert!(
        matches!(wrong.get::<i64>(T).await, Err(ResultError::Failed { message, .. }) if message.contains("argument `x`"))
    );
    assert_eq!(app.send(c_add::new(1, 2)).await.unwrap().get::<i64>(T).await.unwrap(), 3, "the worker goes on");
    w.stop().await;
    assert_eq!(app.broker().queue_len("celery.dead").await.unwrap(), 2);
}

async fn an_unsettled_delivery_comes_back_after_its_lease(t: Target) {
    let app = t.app().await;
    let sig = Signature::by_name("c_add").args(json!([20, 22]));
    let res = app.send(sig).await.unwrap();
    {
        // A consumer takes the message and dies without settling it.
        let (b, r) = t.urls();
        let other = celery_worker::connect(&b, &r).await.unwrap();
        let mut consumer = other.broker().consume(&["celery".into()], 1).await.unwrap();
        let mut d = consumer.next().await.expect("delivery");
        assert!(d.message().is_ok());
        assert_eq!(app.broker().queue_len("celery").await.unwrap(), 0, "leased: invisible to others");
        drop(d); // never settled
        drop(consumer);
    }
    let w = worker(&app, 2, 1);
    assert_eq!(res.get::<i64>(T).await.unwrap(), 42, "redelivered (lease expired, or its connection closed)");
    w.stop().await;
}

static RUNS: std::sync::Mutex<Vec<i64>> = std::sync::Mutex::new(Vec::new());

#[task]
async fn c_counted(token: i64) -> i64 {
    RUNS.lock().unwrap().push(token);
    token
}

async fn a_redelivered_success_is_not_run_again(t: Target) {
    let app = t.app().await;
    let token: i64 = rand_token();
    let res = app.send(c_counted::new(token)).await.unwrap();
    {
        // A worker ran it and stored SUCCESS, then died before acknowledging.
        let (b, r) = t.urls();
        let other = celery_worker::connect(&b, &r).await.unwrap();
        let mut consumer = other.broker().consume(&["celery".into()], 1).await.unwrap();
        let d = consumer.next().await.expect("delivery");
        app.backend().store(&celery_core::TaskMeta::success(res.id(), json!(token))).await.unwrap();
        drop(d);
        drop(consumer);
    }
    let w = worker(&app, 2, 1);
    let end = tokio::time::Instant::now() + T;
    while w.stats.already_done.load(std::sync::atomic::Ordering::Relaxed) == 0 && tokio::time::Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    w.stop().await;
    assert!(!RUNS.lock().unwrap().contains(&token), "the redelivery ran the task again");
    assert_eq!(res.get::<i64>(T).await.unwrap(), token);
}

fn rand_token() -> i64 {
    (uuid::Uuid::new_v4().as_u128() & 0xffff_ffff) as i64
}

/// A chain passes each result as the first argument of the next task and returns the last result; a
/// callback (`link`) gets the result too; an immutable signature ignores it; the callbacks are the
/// parent's `children`.
async fn chains_and_callbacks(t: Target) {
    let app = t.app().await;
    let w = worker(&app, 4, 4);
    let last = app
        .send_chain([
            c_add::new(1, 2),
            Signature::by_name("c_add").args(json!([10])),
            Signature::by_name("c_add").args(json!([100])),
        ])
        .await
        .unwrap();
    assert_eq!(last.get::<i64>(T).await.unwrap(), 113);
    let meta = last.info().await.unwrap().unwrap();
    assert!(meta.parent_id.is_some(), "the last task knows its parent");
    let callback =
        Signature::by_name("c_add").args(json!([1000])).task_id("cb-".to_string() + &uuid::Uuid::new_v4().to_string());
    let immutable =
        Signature::by_name("c_add").args(json!([7, 7])).immutable().task_id(uuid::Uuid::new_v4().to_string());
    let (cb_id, im_id) = (callback.options.task_id.clone().unwrap(), immutable.options.task_id.clone().unwrap());
    let first = app.send(c_add::new(20, 22).link(callback).link(immutable)).await.unwrap();
    assert_eq!(first.get::<i64>(T).await.unwrap(), 42);
    assert_eq!(app.result(&cb_id).get::<i64>(T).await.unwrap(), 1042);
    assert_eq!(app.result(&im_id).get::<i64>(T).await.unwrap(), 14);
    // Recorded as Celery records them, so Python's `AsyncResult.children` lists both.
    let children = first.info().await.unwrap().unwrap().children;
    assert_eq!(children, [json!([[cb_id, null], null]), json!([[im_id, null], null])]);
    w.stop().await;
}

/// A group runs its members in parallel; their results come back in the order given.
async fn groups_collect_results_in_order(t: Target) {
    let app = t.app().await;
    let w = worker(&app, 8, 4);
    let group = app.send_group((0..20).map(|i| c_add::new(i, i))).await.unwrap();
    let sums: Vec<i64> = group.get(T).await.unwrap();
    assert_eq!(sums, (0..20).map(|i| 2 * i).collect::<Vec<_>>());
    assert_eq!(group.completed_count().await.unwrap(), 20);
    assert!(group.ready().await.unwrap());
    let meta = group.results[3].info().await.unwrap().unwrap();
    assert_eq!(meta.group_id.as_deref(), Some(group.id.as_str()));
    w.stop().await;
}

/// Work queue with prefetch 1 (RabbitMQ's fair dispatch): a worker busy with a slow task holds no
/// other task, so the short ones all finish on the other worker before the slow one does.
async fn fair_dispatch_with_prefetch_one(t: Target) {
    let app = t.app().await;
    let (w1, w2) = (worker(&app, 1, 1), worker(&app, 1, 1));
    let slow = app.send(c_sleep::new(1500)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let fast = app.send_batch((0..4).map(|_| c_sleep::new(50))).await.unwrap();
    for f in &fast {
        assert_eq!(f.get::<u64>(T).await.unwrap(), 50);
    }
    assert_ne!(slow.state().await.unwrap(), TaskState::Success, "a short task waited behind the slow one");
    assert_eq!(slow.get::<u64>(T).await.unwrap(), 1500);
    w1.stop().await;
    w2.stop().await;
}

async fn shutdown_returns_prefetched_work(t: Target) {
    let app = t.app().await;
    let w = worker(&app, 1, 4);
    let ids: Vec<_> = app.send_batch((0..5).map(|_| c_sleep::new(400))).await.unwrap();
    let end = tokio::time::Instant::now() + T;
    while ids[0].state().await.unwrap() != TaskState::Started && tokio::time::Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    w.stop().await;
    let done = futures_count(&ids, TaskState::Success).await;
    assert_eq!(done, 1, "only the running task finished");
    assert_eq!(app.broker().queue_len("celery").await.unwrap(), 4, "the rest went back to the queue");
    let w = worker(&app, 4, 4);
    for r in &ids {
        assert_eq!(r.get::<u64>(T).await.unwrap(), 400);
    }
    w.stop().await;
    assert_eq!(app.broker().purge("celery").await.unwrap(), 0);
}

async fn futures_count(ids: &[celery_core::AsyncResult], state: TaskState) -> usize {
    let mut n = 0;
    for r in ids {
        if r.state().await.unwrap() == state {
            n += 1;
        }
    }
    n
}

async fn purge_and_len(t: Target) {
    let app = t.app().await;
    app.send_batch((0..7).map(|i| c_add::new(i, i).queue("purge_me"))).await.unwrap();
    assert_eq!(app.broker().queue_len("purge_me").await.unwrap(), 7);
    assert_eq!(app.broker().purge("purge_me").await.unwrap(), 7);
    assert_eq!(app.broker().queue_len("purge_me").await.unwrap(), 0);
}

/// Queue health: depth and dead letters on every broker; in-flight deliveries and the oldest
/// message's age where the broker knows them (and then right).
async fn queue_stats_count_waiting_in_flight_and_dead(t: Target) {
    let app = t.app().await;
    let q = "stats_me";
    let empty = app.broker().queue_stats(q).await.unwrap();
    assert_eq!((empty.depth, empty.dead_letters), (0, 0), "{empty:?}");
    assert!(empty.oldest_age.is_none() && empty.in_flight.is_none_or(|n| n == 0), "{empty:?}");
    app.send_batch((0..3).map(|i| c_add::new(i, i).queue(q))).await.unwrap();
    let waiting = app.broker().queue_stats(q).await.unwrap();
    assert_eq!((waiting.depth, waiting.dead_letters), (3, 0), "{waiting:?}");
    assert!(waiting.oldest_age.is_none_or(|a| a < T), "{waiting:?}");
    let mut consumer = app.broker().consume(&[q.to_owned()], 1).await.unwrap();
    let d = tokio::time::timeout(T, consumer.next()).await.unwrap().expect("a delivery");
    let taken = app.broker().queue_stats(q).await.unwrap();
    assert_eq!(taken.depth, 2, "{taken:?}");
    assert!(taken.in_flight.is_none_or(|n| n == 1), "{taken:?}");
    d.dead_letter("conformance: queue stats").await.unwrap();
    let deadline = tokio::time::Instant::now() + T;
    let dead = loop {
        let s = app.broker().queue_stats(q).await.unwrap();
        if s.dead_letters == 1 || tokio::time::Instant::now() >= deadline {
            break s;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(dead.dead_letters, 1, "{dead:?}");
    // The consumer (prefetch 1) may have taken the next one meanwhile.
    assert!(dead.in_flight.is_none_or(|n| n <= 1), "{dead:?}");
    consumer.close().await;
}

/// How many times each chord body ran, by token.
static BODY_RUNS: std::sync::Mutex<Vec<i64>> = std::sync::Mutex::new(Vec::new());

#[task]
async fn c_chord_body(results: Vec<i64>, token: i64) -> Vec<i64> {
    BODY_RUNS.lock().unwrap().push(token);
    results
}

fn body_runs(token: i64) -> usize {
    BODY_RUNS.lock().unwrap().iter().filter(|t| **t == token).count()
}

/// A chord of 1,000 members on 4 workers: the body runs exactly once, with the results in order;
/// a chord with a failing member fails with a `ChordError` and its body never runs.
async fn chords_complete_once(t: Target) {
    let app = t.app().await;
    let workers: Vec<Running> = (0..4).map(|_| worker(&app, 4, 4)).collect();
    let token = rand_token();
    let body = Signature::by_name("c_chord_body").args(json!([token]));
    let chord = app.send_chord((0..1000).map(|i| c_add::new(i, i)), body).await.unwrap();
    let results: Vec<i64> = chord.get(Duration::from_secs(60)).await.unwrap();
    assert_eq!(results, (0..1000).map(|i| 2 * i).collect::<Vec<_>>());

    let bad_token = rand_token();
    let header = vec![c_add::new(1, 1), c_boom::new(), c_add::new(2, 2)];
    let failed = app.send_chord(header, Signature::by_name("c_chord_body").args(json!([bad_token]))).await.unwrap();
    match failed.get::<Vec<i64>>(T).await {
        Err(ResultError::Failed { exc_type, message, .. }) => {
            assert_eq!(exc_type, "ChordError");
            assert!(message.contains("conformance boom"), "{message}");
        }
        other => panic!("expected a ChordError, got {other:?}"),
    }
    let empty = app.send_chord(Vec::new(), Signature::by_name("c_chord_body").args(json!([token]))).await.unwrap();
    assert_eq!(empty.get::<Vec<i64>>(T).await.unwrap(), Vec::<i64>::new());
    for w in workers {
        w.stop().await;
    }
    assert_eq!(body_runs(token), 2, "the 1,000-member body once, the empty chord's once");
    assert_eq!(body_runs(bad_token), 0);
}

/// Errbacks run, by token: the failed task's id.
static ERRBACKS: std::sync::Mutex<Vec<(i64, String)>> = std::sync::Mutex::new(Vec::new());

#[task]
async fn c_errback(failed_id: String, token: i64) {
    ERRBACKS.lock().unwrap().push((token, failed_id));
}

async fn errback_of(token: i64) -> Option<String> {
    for _ in 0..400 {
        if let Some((_, id)) = ERRBACKS.lock().unwrap().iter().find(|(t, _)| *t == token) {
            return Some(id.clone());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    None
}

/// `link_error`: a task that fails for good sends its errbacks with its id; so does a failed
/// chord, with its body's id. A success sends none.
async fn errbacks_get_the_failed_id(t: Target) {
    let app = t.app().await;
    let w = worker(&app, 4, 4);
    let (t1, t2, t3) = (rand_token(), rand_token(), rand_token());
    let errback = |token: i64| Signature::by_name("c_errback").args(json!([token]));
    let ok = app.send(c_add::new(1, 1).link_error(errback(t3))).await.unwrap();
    let boom = app.send(c_boom::new().link_error(errback(t1))).await.unwrap();
    assert!(boom.get::<u32>(T).await.is_err());
    assert_eq!(errback_of(t1).await.as_deref(), Some(boom.id()));
    let body = Signature::by_name("c_chord_body").args(json!([t2])).link_error(errback(t2));
    let chord = app.send_chord([c_add::new(1, 1), c_boom::new()], body).await.unwrap();
    assert!(chord.get::<Vec<i64>>(T).await.is_err());
    assert_eq!(errback_of(t2).await.as_deref(), Some(chord.id()));
    assert_eq!(ok.get::<i64>(T).await.unwrap(), 2);
    w.stop().await;
    assert!(!ERRBACKS.lock().unwrap().iter().any(|(t, _)| *t == t3), "a success sends no errback");
}

/// Celery's `map`, `starmap` and `chunks` (the `celery.map`/`celery.starmap` built-ins).
async fn map_starmap_chunks(t: Target) {
    let app = t.app().await;
    let w = worker(&app, 4, 4);
    let add10 = Signature::by_name("c_add").args(json!([10]));
    let mapped = app.send(add10.map(vec![json!(1), json!(2), json!(3)])).await.unwrap();
    assert_eq!(mapped.get::<Vec<i64>>(T).await.unwrap(), [11, 12, 13]);
    let starred = app.send(Signature::by_name("c_add").starmap(vec![json!([1, 2]), json!([3, 4])])).await.unwrap();
    assert_eq!(starred.get::<Vec<i64>>(T).await.unwrap(), [3, 7]);
    let items = (0..10).map(|i| json!([i, i])).collect();
    let chunks = app.send_chunks(Signature::by_name("c_add"), items, 3).await.unwrap();
    let got: Vec<Vec<i64>> = chunks.get(T).await.unwrap();
    assert_eq!(got, vec![vec![0, 2, 4], vec![6, 8, 10], vec![12, 14, 16], vec![18]]);
    let wrong = app.send(Signature::by_name("c_add").map(vec![json!("x")])).await.unwrap();
    assert!(matches!(wrong.get::<Vec<i64>>(T).await, Err(ResultError::Failed { .. })));
    w.stop().await;
}

/// Idempotency keys: concurrent and repeated sends with one key queue one task and return its
/// result; another key is another task; after the window the key sends again.
async fn idempotency_keys_send_once(t: Target) {
    let app = t.app().await;
    let key = format!("order-{}", rand_token());
    let sig = || c_add::new(1, 2).queue("idem").idempotency_key(key.clone());
    let sends = futures::future::join_all((0..10).map(|_| app.send(sig()))).await;
    let ids: std::collections::HashSet<String> = sends.into_iter().map(|r| r.unwrap().id().to_owned()).collect();
    assert_eq!(ids.len(), 1, "one task for one key: {ids:?}");
    assert_eq!(app.broker().queue_len("idem").await.unwrap(), 1);
    let other = app.send(c_add::new(1, 2).queue("idem").idempotency_key(format!("{key}-b"))).await.unwrap();
    assert!(!ids.contains(other.id()));
    let short = app
        .clone()
        .with_config(celery_core::AppConfig { idempotency_window: Duration::from_secs(1), ..Default::default() });
    let k = format!("short-{}", rand_token());
    let first = short.send(c_add::new(1, 1).queue("idem").idempotency_key(k.clone())).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await; // the window passes
    let again = short.send(c_add::new(1, 1).queue("idem").idempotency_key(k)).await.unwrap();
    assert_ne!(first.id(), again.id(), "after the window the key sends again");
    assert_eq!(app.broker().purge("idem").await.unwrap(), 4);
}

/// Events (`worker -E`): a task's life in order, and the worker's online, heartbeat and offline.
async fn events_follow_a_task(t: Target) {
    let app = t.app().await;
    let mut events = celery_worker::events::subscribe(&app).await.unwrap();
    let cfg = WorkerConfig {
        concurrency: 2,
        events: true,
        heartbeat: Duration::from_millis(200),
        hostname: format!("events-{}", rand_token()),
        ..WorkerConfig::default()
    };
    let host = cfg.hostname.clone();
    let w = spawn_worker(&app, cfg);
    let producer = app.clone().with_config(celery_core::AppConfig { send_sent_events: true, ..Default::default() });
    let ok = producer.send(c_add::new(2, 2)).await.unwrap();
    let boom = app.send(c_boom::new()).await.unwrap();
    let mut seen: Vec<(String, String)> = Vec::new();
    let want = |seen: &Vec<(String, String)>| {
        ["task-sent", "task-succeeded", "task-failed", "worker-heartbeat"]
            .iter()
            .all(|k| seen.iter().any(|(t, _)| t == k))
    };
    let collect = async {
        while !want(&seen) {
            let e = events.next().await.expect("subscription open");
            let uuid = e["uuid"].as_str().unwrap_or("");
            if e["hostname"] == host.as_str() || uuid == ok.id() {
                seen.push((e["type"].as_str().unwrap().to_owned(), uuid.to_owned()));
            }
        }
    };
    tokio::time::timeout(T, collect).await.unwrap_or_else(|_| panic!("events so far: {seen:?}"));
    let of = |id: &str| seen.iter().filter(|(_, u)| u == id).map(|(t, _)| t.as_str()).collect::<Vec<_>>();
    // The producer's task-sent and the worker's events come from two processes: only the
    // worker's are ordered among themselves.
    let mut ok_events = of(ok.id());
    assert_eq!(ok_events.iter().filter(|k| **k == "task-sent").count(), 1, "{seen:?}");
    ok_events.retain(|k| *k != "task-sent");
    assert_eq!(ok_events, ["task-received", "task-started", "task-succeeded"], "{seen:?}");
    assert_eq!(of(boom.id()), ["task-received", "task-started", "task-failed"], "{seen:?}");
    let first = |kind: &str| seen.iter().position(|(t, _)| t == kind).unwrap_or(usize::MAX);
    assert!(first("worker-online") < first("task-received"), "the worker is online before it receives: {seen:?}");
    w.stop().await;
    let offline = async {
        loop {
            let e = events.next().await.expect("subscription open");
            if e["hostname"] == host.as_str() && e["type"] == "worker-offline" {
                return e;
            }
        }
    };
    let e = tokio::time::timeout(T, offline).await.expect("worker-offline");
    assert_eq!(e["sw_ident"], "celery-rs");
}

static MARKS: std::sync::Mutex<Vec<i64>> = std::sync::Mutex::new(Vec::new());

#[task]
async fn c_mark(token: i64) -> i64 {
    MARKS.lock().unwrap().push(token);
    token
}

fn named_worker(app: &App, name: &str) -> Running {
    spawn_worker(app, WorkerConfig { concurrency: 1, hostname: name.to_owned(), ..WorkerConfig::default() })
}

/// Remote control: both workers answer `inspect`; a task revoked before it started is never run
/// on either; `revoke --terminate` stops a running task and records REVOKED.
async fn remote_control_inspects_and_revokes(t: Target) {
    use celery_worker::control;
    let app = t.app().await;
    let names = [format!("w1-{}", rand_token()), format!("w2-{}", rand_token())];
    let workers: Vec<Running> = names.iter().map(|n| named_worker(&app, n)).collect();
    let both = Some(names.to_vec());
    let ask = |method: &'static str| control::request(&app, method, json!({}), both.clone(), T);
    // The workers start in the background: ping until both answer.
    let mut pongs = Vec::new();
    for _ in 0..100 {
        let quick = control::request(&app, "ping", json!({}), both.clone(), Duration::from_millis(200));
        pongs = quick.await.unwrap();
        if pongs.len() == 2 {
            break;
        }
    }
    pongs.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(pongs, names.iter().map(|n| (n.clone(), json!({"ok": "pong"}))).collect::<Vec<_>>());
    let registered = ask("registered").await.unwrap();
    assert!(registered.iter().all(|(_, r)| r.as_array().unwrap().contains(&json!("c_mark"))), "{registered:?}");

    // Revoked before they are sent: neither worker runs them.
    let token = rand_token();
    let ids: Vec<String> = (0..4).map(|_| uuid::Uuid::new_v4().to_string()).collect();
    let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    let replies = control::revoke(&app, &refs, false, both.clone(), T).await.unwrap();
    assert!(replies.len() >= 2, "{replies:?}");
    for id in &ids {
        app.send(c_mark::new(token).task_id(id.clone())).await.unwrap();
    }
    let after = app.send(c_mark::new(token)).await.unwrap();
    assert_eq!(after.get::<i64>(T).await.unwrap(), token);
    for id in &ids {
        assert!(matches!(app.result(id).get::<i64>(T).await, Err(ResultError::Revoked)));
    }
    assert_eq!(MARKS.lock().unwrap().iter().filter(|t| **t == token).count(), 1, "only the unrevoked one ran");
    let revoked = ask("revoked").await.unwrap();
    assert!(revoked.iter().all(|(_, r)| r.as_array().unwrap().contains(&json!(ids[0]))), "{revoked:?}");

    // Terminate a running task.
    let slow = app.send(c_sleep::new(20_000)).await.unwrap();
    let running = async {
        loop {
            let active = ask("active").await.unwrap();
            if active.iter().any(|(_, a)| a.as_array().unwrap().iter().any(|t| t["id"] == slow.id())) {
                return;
            }
        }
    };
    tokio::time::timeout(T, running).await.expect("the slow task shows in inspect active");
    control::revoke(&app, &[slow.id()], true, both.clone(), T).await.unwrap();
    assert!(matches!(slow.get::<u64>(T).await, Err(ResultError::Revoked)));
    let meta = slow.info().await.unwrap().unwrap();
    assert_eq!(meta.status, TaskState::Revoked);
    for w in workers {
        w.stop().await;
    }

    // Revoked while no worker runs: a worker started later still never runs it.
    let late = uuid::Uuid::new_v4().to_string();
    let replies = control::revoke(&app, &[late.as_str()], false, None, Duration::from_millis(300)).await.unwrap();
    assert!(replies.is_empty(), "{replies:?}");
    app.send(c_mark::new(token).task_id(late.clone())).await.unwrap();
    let w3 = named_worker(&app, &format!("w3-{}", rand_token()));
    assert!(matches!(app.result(&late).get::<i64>(T).await, Err(ResultError::Revoked)));
    let after = app.send(c_mark::new(token)).await.unwrap();
    assert_eq!(after.get::<i64>(T).await.unwrap(), token);
    w3.stop().await;
    assert_eq!(MARKS.lock().unwrap().iter().filter(|t| **t == token).count(), 2, "the late-revoked task never ran");
}

/// Polls `cond` every 20 ms until it holds; panics naming `what` after [`T`].
async fn poll_until<F, Fut>(what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let end = tokio::time::Instant::now() + T;
    while !cond().await {
        assert!(tokio::time::Instant::now() < end, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// True on the brokers Python Celery shares, where an eta message waits on its queue (with its
/// `eta` header) until a worker defers it; the log keeps it in its own delay from the start.
fn shared_with_python(t: &Target) -> bool {
    matches!(t, Target::Redis(_) | Target::Amqp(..))
}

/// Waits until the one countdown message sent to `queue` is in the broker's delay store: deferred
/// by `w` where it was put on its queue (Redis, RabbitMQ), scanned past on the log.
async fn wait_deferred(t: &Target, app: &App, w: &Running, queue: &str, deferrals: u64) {
    use std::sync::atomic::Ordering::Relaxed;
    let python = shared_with_python(t);
    poll_until("the countdown message is in the delay store", || async {
        (!python || w.stats.deferred.load(Relaxed) >= deferrals) && app.broker().queue_len(queue).await.unwrap() == 0
    })
    .await;
}

/// Purge removes countdown tasks wherever they wait: one sent while no worker runs (on Redis and
/// RabbitMQ it is on its queue with its `eta` header, as Celery sends it) and one a worker put in
/// the broker's delay store. Neither ever runs.
async fn purge_removes_countdown_tasks(t: Target) {
    let app = t.app().await;
    let q = "later";
    let token = rand_token();
    let before = Utc::now();
    let queued = app.send(c_mark::new(token).queue(q).countdown(Duration::from_secs(3))).await.unwrap();
    let after = Utc::now();
    if shared_with_python(&t) {
        assert_eq!(app.broker().queue_len(q).await.unwrap(), 1, "on its queue, as Celery sends it");
    }
    if let Target::Redis(env) = &t {
        use redis::Commands;
        let raw: Vec<String> = env.conn().lrange(env.key(q), 0, -1).unwrap();
        assert_eq!(raw.len(), 1, "{raw:?}");
        let envelope: serde_json::Value = serde_json::from_str(&raw[0]).unwrap();
        let eta = envelope["headers"]["eta"].as_str().unwrap_or_else(|| panic!("no eta header: {envelope}"));
        assert!(eta.ends_with("+00:00"), "Celery's isoformat: {eta}");
        let eta = celery_core::protocol::parse_time(eta).unwrap();
        let countdown = chrono::Duration::seconds(3);
        assert!(eta >= before + countdown && eta <= after + countdown, "eta {eta} for a countdown of 3 s at {before}");
    }
    assert_eq!(app.broker().purge(q).await.unwrap(), 1, "the queued countdown task");
    assert_eq!(app.broker().queue_len(q).await.unwrap(), 0);

    let cfg = WorkerConfig { queues: vec![q.into()], concurrency: 2, ..WorkerConfig::default() };
    let w = spawn_worker(&app, cfg);
    let deferred = app.send(c_mark::new(token).queue(q).countdown(Duration::from_secs(3))).await.unwrap();
    wait_deferred(&t, &app, &w, q, 1).await;
    assert_eq!(app.broker().purge(q).await.unwrap(), 1, "the countdown task in the delay store");
    assert_eq!(app.broker().purge(q).await.unwrap(), 0, "gone");
    // A task due after the purged ones: once it ran, they would have run too.
    let marker = app.send(c_mark::new(token + 1).queue(q).countdown(Duration::from_secs(4))).await.unwrap();
    assert_eq!(marker.get::<i64>(T).await.unwrap(), token + 1);
    w.stop().await;
    assert!(!MARKS.lock().unwrap().contains(&token), "a purged countdown task ran");
    for r in [&queued, &deferred] {
        assert!(!r.state().await.unwrap().is_ready(), "{:?}", r.state().await);
    }
}

/// A countdown or eta task runs no earlier than its eta: sent while no worker consumes its queue,
/// sent to a running worker, and across a worker restart while it waits in the delay store.
async fn countdown_tasks_run_at_their_eta(t: Target) {
    let app = t.app().await;
    let at = |secs: i64| Utc::now() + chrono::Duration::seconds(secs);
    let cfg = |queues: &[&str]| WorkerConfig {
        queues: queues.iter().map(|q| q.to_string()).collect(),
        concurrency: 2,
        ..WorkerConfig::default()
    };
    let eta_idle = at(3);
    let idle = app.send(c_now_ms::new().queue("eta_idle").eta(eta_idle)).await.unwrap();
    let first = spawn_worker(&app, cfg(&["eta"]));
    let eta_restart = at(3);
    let restarted = app.send(c_now_ms::new().queue("eta").eta(eta_restart)).await.unwrap();
    wait_deferred(&t, &app, &first, "eta", 1).await;
    first.stop().await;
    let second = spawn_worker(&app, cfg(&["eta", "eta_idle"]));
    let eta_running = at(2);
    let running = app.send(c_now_ms::new().queue("eta").eta(eta_running)).await.unwrap();
    for (r, eta) in [(&idle, eta_idle), (&restarted, eta_restart), (&running, eta_running)] {
        let ran: i64 = r.get(T).await.unwrap();
        assert!(ran >= eta.timestamp_millis(), "ran {} ms before its eta", eta.timestamp_millis() - ran);
    }
    second.stop().await;
}

/// Leases: one holder at a time, renewal by the holder, release hands over; documents: replaced whole.
async fn leases_and_documents(t: Target) {
    let app = t.app().await;
    let b = app.broker().require_leases("the conformance lease").expect("every broker has leases");
    let d = app.broker().require_documents("the conformance doc").expect("every broker has documents");
    let ttl = Duration::from_secs(30);
    assert!(b.lease("conf", "a", ttl).await.unwrap(), "a free lease is taken");
    assert!(!b.lease("conf", "b", ttl).await.unwrap(), "a held lease is refused to another holder");
    assert!(b.lease("conf", "a", ttl).await.unwrap(), "the holder renews");
    b.release("conf", "a").await.unwrap();
    let handed_over = async {
        while !b.lease("conf", "b", ttl).await.unwrap() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(5), handed_over).await.expect("release hands the lease over");
    assert!(!b.lease("conf", "a", ttl).await.unwrap());

    assert_eq!(d.load_doc("conf").await.unwrap(), None);
    d.store_doc("conf", b"first").await.unwrap();
    assert_eq!(d.load_doc("conf").await.unwrap().as_deref(), Some(&b"first"[..]));
    d.store_doc("conf", b"second").await.unwrap();
    assert_eq!(d.load_doc("conf").await.unwrap().as_deref(), Some(&b"second"[..]));
    assert_eq!(d.load_doc("conf").await.unwrap().as_deref(), Some(&b"second"[..]), "reading keeps it");
}

celery_tests::each_broker!(
    results_and_failures,
    retries_countdown_expiry,
    bad_input_is_dead_lettered,
    an_unsettled_delivery_comes_back_after_its_lease,
    a_redelivered_success_is_not_run_again,
    fair_dispatch_with_prefetch_one,
    chains_and_callbacks,
    groups_collect_results_in_order,
    shutdown_returns_prefetched_work,
    purge_and_len,
    queue_stats_count_waiting_in_flight_and_dead,
    purge_removes_countdown_tasks,
    countdown_tasks_run_at_their_eta,
    leases_and_documents,
    chords_complete_once,
    errbacks_get_the_failed_id,
    map_starmap_chunks,
    idempotency_keys_send_once,
    events_follow_a_task,
    remote_control_inspects_and_revokes,
);

/// The scenarios that store and read results, again on Redis with results in PostgreSQL
/// (`db+postgresql://`, Celery's tables in a schema of the test's own). `chains_and_callbacks` and
/// `groups_collect_results_in_order` are not among them: they read a result's `parent_id` and
/// `group_id`, which Celery's `celery_taskmeta` has no column for (Python's database backend loses
/// them too).
macro_rules! postgres_results {
    ($($name:ident),* $(,)?) => {
        mod redis_broker_postgres_results {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    if !celery_tests::redis_available("conformance (redis, postgresql results)") {
                        return;
                    }
                    let Some(schema) = celery_tests::PgSchema::new("conformance (postgresql results)") else { return };
                    let mut env = celery_tests::RedisEnv::new(1.0);
                    env.backend = schema.url("db+postgresql", "");
                    super::$name(super::Target::Redis(env)).await;
                    drop(schema);
                }
            )*
        }
    };
}

postgres_results!(
    results_and_failures,
    retries_countdown_expiry,
    bad_input_is_dead_lettered,
    a_redelivered_success_is_not_run_again,
    chords_complete_once,
    errbacks_get_the_failed_id,
    map_starmap_chunks,
    idempotency_keys_send_once,
    remote_control_inspects_and_revokes,
);

/// The suite on the loopback Redis Cluster (`scripts/cluster redis-cluster`), each queue spread
/// over two shards (hash tags): one test at a time holds the cluster.
macro_rules! on_redis_cluster {
    ($($name:ident),* $(,)?) => {
        mod redis_cluster_broker {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    if let Some(t) = super::Target::redis_cluster(2) {
                        super::$name(t).await
                    }
                }
            )*
        }
    };
}

on_redis_cluster!(
    results_and_failures,
    retries_countdown_expiry,
    bad_input_is_dead_lettered,
    an_unsettled_delivery_comes_back_after_its_lease,
    a_redelivered_success_is_not_run_again,
    fair_dispatch_with_prefetch_one,
    chains_and_callbacks,
    groups_collect_results_in_order,
    shutdown_returns_prefetched_work,
    purge_and_len,
    queue_stats_count_waiting_in_flight_and_dead,
    purge_removes_countdown_tasks,
    countdown_tasks_run_at_their_eta,
    leases_and_documents,
    chords_complete_once,
    errbacks_get_the_failed_id,
    map_starmap_chunks,
    idempotency_keys_send_once,
    events_follow_a_task,
    remote_control_inspects_and_revokes,
);

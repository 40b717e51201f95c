//! Real worker processes on RabbitMQ (results on Redis): `kill -9` mid-task loses nothing (RabbitMQ
//! returns the dead connection's unacked deliveries), an ETA task waiting in a delay queue survives
//! every worker stopping, a deferral to a delay queue that a purge deleted under a running worker
//! still arrives, and a connection cut by the server (`rabbitmqctl close_all_connections`) is
//! survived: the worker reconnects and finishes everything.

use std::process::Command;
use std::time::Duration;

use celery_core::{App, AsyncResult, Signature, TaskState};
use celery_tests::{amqp_available, redis_available, AmqpVhost, DemoProcess, RedisEnv};
use chrono::{DateTime, Utc};
use serde_json::json;

const T: Duration = Duration::from_secs(40);

struct Env {
    vhost: AmqpVhost,
    redis: RedisEnv,
}

impl Env {
    fn new() -> Option<Env> {
        (amqp_available("amqp_process") && redis_available("amqp_process"))
            .then(|| Env { vhost: AmqpVhost::new(), redis: RedisEnv::new(60.0) })
    }
    async fn app(&self) -> App {
        celery_worker::connect(&self.vhost.url(), &self.redis.backend).await.expect("connect")
    }
    fn worker(&self, concurrency: &str) -> DemoProcess {
        DemoProcess::start_urls(&self.vhost.url(), &self.redis.backend, &["worker", "-c", concurrency])
    }
}

async fn count(results: &[AsyncResult], state: TaskState) -> usize {
    let mut n = 0;
    for r in results {
        n += (r.state().await.unwrap() == state) as usize;
    }
    n
}

async fn wait_count(results: &[AsyncResult], state: TaskState, want: usize) -> usize {
    let end = tokio::time::Instant::now() + T;
    loop {
        let n = count(results, state).await;
        if n >= want || tokio::time::Instant::now() > end {
            return n;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_task_loses_nothing() {
    let Some(env) = Env::new() else { return };
    let app = env.app().await;
    let mut results = Vec::new();
    for _ in 0..6 {
        results.push(app.send(Signature::by_name("sleep").args(json!([1500]))).await.unwrap());
    }
    let mut first = env.worker("3");
    assert_eq!(wait_count(&results, TaskState::Started, 3).await, 3, "{}", first.log());
    first.signal("KILL");
    first.wait_exit(Duration::from_secs(5)).expect("killed");
    let second = env.worker("6");
    assert_eq!(wait_count(&results, TaskState::Success, 6).await, 6, "{}", second.log());
}

/// When a stored task ran: its `date_done`.
async fn done_at(app: &App, id: &str) -> DateTime<Utc> {
    let meta = app.result(id).info().await.unwrap().expect("a stored result");
    celery_core::protocol::parse_time(meta.date_done.as_deref().expect("date_done")).unwrap()
}

/// Messages in the delay queues of `celery` a deferral within 8 s uses.
async fn delayed(app: &App) -> u64 {
    let mut n = 0;
    for secs in [1, 2, 4] {
        n += app.broker().queue_len(&format!("celery.delay.{secs}s")).await.unwrap();
    }
    n
}

/// An ETA task the worker moved into a delay queue survives every worker stopping, and one sent
/// while none runs waits on its queue (with its `eta` header); the next worker runs both at their
/// eta. (A `kill -9` just after a deferral can leave a duplicate: AMQP does not confirm acks, so
/// the deferred copy is confirmed first and the original's ack may be lost with the connection.
/// Never a loss; the stop here is SIGTERM, so the counts are exact.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eta_tasks_survive_every_worker_stopping() {
    let Some(env) = Env::new() else { return };
    let app = env.app().await;
    let mut first = env.worker("2");
    assert!(first.wait_log("worker ready", T), "{}", first.log());
    let eta = Utc::now() + chrono::Duration::seconds(5);
    let add = |x: i64| Signature::by_name("add").args(json!([x, 22])).eta(eta);
    let deferred = app.send(add(20)).await.unwrap();
    let end = tokio::time::Instant::now() + T;
    while delayed(&app).await != 1 {
        assert!(tokio::time::Instant::now() < end, "never deferred: {}", first.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    first.signal("TERM");
    first.wait_exit(T).expect("worker exits");
    let queued = app.send(add(0)).await.unwrap();
    assert_eq!(app.broker().queue_len("celery").await.unwrap(), 1, "on its queue while no worker runs");
    assert_eq!(delayed(&app).await, 1, "still held by RabbitMQ");
    let second = env.worker("2");
    assert_eq!(deferred.get::<i64>(T).await.unwrap(), 42, "{}", second.log());
    assert_eq!(queued.get::<i64>(T).await.unwrap(), 22, "{}", second.log());
    for id in [deferred.id(), queued.id()] {
        assert!(done_at(&app, id).await >= eta, "ran before its eta");
    }
}

/// A purge deletes the delay queues of `celery`, including the one a running worker declared and
/// remembers: the worker's next deferral to that level is returned by RabbitMQ (mandatory), and
/// the worker declares the level again and sends it there, so the task still runs at its eta.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deferral_after_a_purge_deleted_its_delay_queue_arrives() {
    let Some(env) = Env::new() else { return };
    let app = env.app().await;
    let worker = env.worker("2");
    assert!(worker.wait_log("worker ready", T), "{}", worker.log());
    // Both due 6 s after they are sent: the same delay level (4 s) unless a step takes over 1 s.
    let add = |x: i64| Signature::by_name("add").args(json!([x, 22])).eta(Utc::now() + chrono::Duration::seconds(6));
    let purged = app.send(add(1)).await.unwrap();
    let end = tokio::time::Instant::now() + T;
    while delayed(&app).await != 1 {
        assert!(tokio::time::Instant::now() < end, "never deferred: {}", worker.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(app.broker().purge("celery").await.unwrap(), 1, "the deferred task is purged");
    assert_eq!(delayed(&app).await, 0, "the delay queues are gone");
    let kept = app.send(add(20)).await.unwrap();
    let eta = Utc::now() + chrono::Duration::seconds(5);
    assert_eq!(kept.get::<i64>(T).await.unwrap(), 42, "{}", worker.log());
    assert!(done_at(&app, kept.id()).await >= eta, "ran before its eta");
    let state = purged.state().await.unwrap();
    assert!(!matches!(state, TaskState::Started | TaskState::Success), "the purged task ran: {state:?}");
    assert!(worker.log().contains("delay queue gone"), "the level was declared again: {}", worker.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_cut_is_survived() {
    let Some(env) = Env::new() else { return };
    let app = env.app().await;
    let worker = env.worker("4");
    assert!(worker.wait_log("worker ready", T), "{}", worker.log());
    let mut results = Vec::new();
    for _ in 0..12 {
        results.push(app.send(Signature::by_name("sleep").args(json!([1500]))).await.unwrap());
    }
    assert!(wait_count(&results, TaskState::Started, 1).await >= 1);
    let out = Command::new("rabbitmqctl")
        .args(["-q", "close_all_connections", "-p", &env.vhost.0, "test: connection cut"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // Sends after the cut reconnect too.
    results.push(app.send(Signature::by_name("add").args(json!([1, 2]))).await.unwrap());
    assert_eq!(wait_count(&results, TaskState::Success, 13).await, 13, "{}", worker.log());
    assert!(worker.log().contains("consuming again"), "the worker noticed the cut: {}", worker.log());
}

//! Real worker processes (the demo binary) against the real Redis: kill -9 mid-task loses nothing,
//! SIGTERM returns prefetched work to the queue, ETA tasks survive every worker stopping, `purge`
//! removes deferred ETA tasks too, and the CLI's `send --wait --json` contract.

use std::process::Command;
use std::time::Duration;

use celery_core::{App, TaskState};
use celery_tests::{demo_bin, redis_available, wait_until, DemoProcess, RedisEnv};
use redis::Commands;
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(30);

async fn app(env: &RedisEnv) -> App {
    celery_worker::connect(&env.broker, &env.backend).await.expect("connect")
}

async fn states(app: &App, ids: &[String]) -> Vec<TaskState> {
    let mut out = Vec::new();
    for id in ids {
        out.push(app.result(id).state().await.unwrap());
    }
    out
}

async fn wait_states(
    app: &App,
    ids: &[String],
    pred: impl Fn(&[TaskState]) -> bool,
    timeout: Duration,
) -> Vec<TaskState> {
    celery_tests::poll_until(timeout, || states(app, ids), |s| pred(s)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_task_loses_nothing() {
    if !redis_available("redis_process") {
        return;
    }
    let env = RedisEnv::new(2.0);
    let app = app(&env).await;
    let mut ids = Vec::new();
    for _ in 0..6 {
        ids.push(app.send_by_name("sleep", json!([1500]), json!({})).await.unwrap().id().to_owned());
    }
    let mut first = DemoProcess::start(&env, &["worker", "-c", "3"]);
    let s = wait_states(&app, &ids, |s| s.iter().filter(|x| **x == TaskState::Started).count() == 3, T).await;
    assert_eq!(s.iter().filter(|x| **x == TaskState::Started).count(), 3, "{s:?}\n{}", first.log());
    first.signal("KILL");
    first.wait_exit(Duration::from_secs(5)).expect("killed");
    let unacked: u64 = env.conn().hlen(env.key("unacked")).unwrap();
    assert!(unacked >= 3, "the killed worker's deliveries are still leased ({unacked})");

    let second = DemoProcess::start(&env, &["worker", "-c", "6"]);
    let s = wait_states(&app, &ids, |s| s.iter().all(|x| *x == TaskState::Success), T).await;
    assert!(s.iter().all(|x| *x == TaskState::Success), "{s:?}\n{}", second.log());
    assert!(wait_until(Duration::from_secs(5), || env.conn().hlen::<_, u64>(env.key("unacked")).unwrap() == 0));
    assert!(second.log().contains("restored"), "the second worker restored the lost leases");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_returns_prefetched_unstarted_tasks() {
    if !redis_available("redis_process") {
        return;
    }
    let env = RedisEnv::new(60.0);
    let app = app(&env).await;
    let mut worker = DemoProcess::start(&env, &["worker", "-c", "1", "--prefetch-multiplier", "4"]);
    assert!(worker.wait_log("worker ready", T), "{}", worker.log());
    let mut ids = Vec::new();
    for _ in 0..5 {
        ids.push(app.send_by_name("sleep", json!([1000]), json!({})).await.unwrap().id().to_owned());
    }
    let s = wait_states(&app, &ids, |s| s.contains(&TaskState::Started), T).await;
    assert!(s.contains(&TaskState::Started), "{s:?}");
    // Four are prefetched by now (prefetch = 1 x 4) while one runs.
    assert!(wait_until(T, || env.conn().hlen::<_, u64>(env.key("unacked")).unwrap() == 4), "prefetch");
    worker.signal("TERM");
    let status = worker.wait_exit(T).expect("worker exits after SIGTERM");
    assert!(status.success(), "{}", worker.log());
    let s = states(&app, &ids).await;
    assert_eq!(s.iter().filter(|x| **x == TaskState::Success).count(), 1, "the running task finished: {s:?}");
    let queued: u64 = env.conn().llen(env.key("celery")).unwrap();
    let unacked: u64 = env.conn().hlen(env.key("unacked")).unwrap();
    assert_eq!((queued, unacked), (4, 0), "unstarted tasks went back to the queue\n{}", worker.log());

    let _again = DemoProcess::start(&env, &["worker", "-c", "4"]);
    let s = wait_states(&app, &ids, |s| s.iter().all(|x| *x == TaskState::Success), T).await;
    assert!(s.iter().all(|x| *x == TaskState::Success), "{s:?}");
}

/// When a stored task ran: its `date_done`.
async fn done_at(app: &App, id: &str) -> chrono::DateTime<chrono::Utc> {
    let meta = app.result(id).info().await.unwrap().expect("a stored result");
    celery_core::protocol::parse_time(meta.date_done.as_deref().expect("date_done")).unwrap()
}

/// An ETA task a worker moved into the broker's delayed set survives every worker stopping (and
/// one sent while none runs waits on its queue); the next worker runs both at their eta.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eta_tasks_survive_every_worker_stopping() {
    if !redis_available("redis_process") {
        return;
    }
    let env = RedisEnv::new(60.0);
    let app = app(&env).await;
    let mut worker = DemoProcess::start(&env, &["worker", "-c", "2"]);
    assert!(worker.wait_log("worker ready", T), "{}", worker.log());
    let eta = chrono::Utc::now() + chrono::Duration::seconds(4);
    let add = |x: i64| celery_core::Signature::by_name("add").args(json!([x, 22])).eta(eta);
    let deferred = app.send(add(20)).await.unwrap();
    let delayed = env.key("_celery_rs.delayed.celery");
    assert!(wait_until(T, || env.conn().zcard::<_, u64>(&delayed).unwrap() == 1), "{}", worker.log());
    worker.signal("TERM");
    worker.wait_exit(T).expect("worker exits");
    // No worker runs now: one task waits in the delayed set, one on its queue; none is leased.
    let queued = app.send(add(0)).await.unwrap();
    let counts = |c: &mut redis::Connection| -> (u64, u64, u64) {
        (c.zcard(&delayed).unwrap(), c.llen(env.key("celery")).unwrap(), c.hlen(env.key("unacked")).unwrap())
    };
    assert_eq!(counts(&mut env.conn()), (1, 1, 0));
    assert_eq!(deferred.state().await.unwrap(), TaskState::Received, "RECEIVED is stored when deferred");
    let next = DemoProcess::start(&env, &["worker", "-c", "2"]);
    assert_eq!(deferred.get::<i64>(T).await.unwrap(), 42, "{}", next.log());
    assert_eq!(queued.get::<i64>(T).await.unwrap(), 22, "{}", next.log());
    for id in [deferred.id(), queued.id()] {
        assert!(done_at(&app, id).await >= eta, "ran before its eta");
    }
    assert_eq!(counts(&mut env.conn()), (0, 0, 0));
}

/// `purge` removes what waits on the queue and what a worker deferred into the delayed set, and
/// says how many.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_purge_counts_queued_and_deferred_messages() {
    if !redis_available("redis_process") {
        return;
    }
    let env = RedisEnv::new(60.0);
    let app = app(&env).await;
    let worker = DemoProcess::start(&env, &["worker", "-c", "2"]);
    assert!(worker.wait_log("worker ready", T), "{}", worker.log());
    let later = || celery_core::Signature::by_name("add").args(json!([1, 2])).countdown(Duration::from_secs(60));
    let deferred = app.send(later()).await.unwrap();
    let delayed = env.key("_celery_rs.delayed.celery");
    assert!(wait_until(T, || env.conn().zcard::<_, u64>(&delayed).unwrap() == 1), "{}", worker.log());
    drop(worker);
    app.send(later()).await.unwrap();
    app.send(celery_core::Signature::by_name("add").args(json!([1, 2]))).await.unwrap();
    let out = Command::new(demo_bin())
        .args(["purge", "-Q", "celery"])
        .env("CELERY_BROKER_URL", &env.broker)
        .env("CELERY_RESULT_BACKEND", &env.backend)
        .output()
        .expect("run demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(stdout.trim(), "purged 3 messages from celery");
    let left: (u64, u64) = (env.conn().zcard(&delayed).unwrap(), env.conn().llen(env.key("celery")).unwrap());
    assert_eq!(left, (0, 0));
    assert_eq!(deferred.state().await.unwrap(), TaskState::Received, "never ran");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_send_wait_json_and_result() {
    if !redis_available("redis_process") {
        return;
    }
    let env = RedisEnv::new(60.0);
    let _worker = DemoProcess::start(&env, &["worker", "-c", "2"]);
    let run = |args: &[&str]| {
        let out = Command::new(demo_bin())
            .args(args)
            .env("CELERY_BROKER_URL", &env.broker)
            .env("CELERY_RESULT_BACKEND", &env.backend)
            .output()
            .expect("run demo");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let last: Value = serde_json::from_str(stdout.lines().last().unwrap_or("")).unwrap_or(Value::Null);
        (out.status.code(), last)
    };
    let (code, v) = run(&["send", "add", "--args", "[2, 3]", "--wait", "20", "--json"]);
    assert_eq!(code, Some(0));
    assert_eq!(
        (v["state"].as_str(), v["result"].as_i64(), v["error"].is_null()),
        (Some("SUCCESS"), Some(5), true),
        "{v}"
    );
    let id = v["id"].as_str().unwrap().to_owned();
    let (code, v) = run(&["result", &id, "--json"]);
    assert_eq!((code, v["result"].as_i64()), (Some(0), Some(5)));

    let (code, v) = run(&["send", "fail", "--args", r#"["it broke"]"#, "--wait", "--json"]);
    assert_eq!(code, Some(1));
    assert_eq!(v["state"], "FAILURE");
    assert!(v["error"].as_str().unwrap().contains("it broke"), "{v}");

    let (code, v) = run(&["send", "flaky", "--args", "[2]", "--wait", "--json"]);
    assert_eq!((code, v["result"].as_i64()), (Some(0), Some(2)), "{v}");

    let (code, _) = run(&["send", "add", "--args", "not json"]);
    assert_eq!(code, Some(1), "bad --args is an error");
}

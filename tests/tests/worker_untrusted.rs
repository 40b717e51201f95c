//! The worker trusts no message (issue 13): against the real brokers, a message over the size cap is
//! dead-lettered with its size and the limit without being decoded (on Redis, without leaving Redis),
//! and the worker goes on; a message whose headers do not parse but name an id fails its caller's
//! `get()` at once; a rejected message sends none of its callbacks, errbacks or chord parts; and
//! huge times (lease and result ttls, time limits) saturate instead of wrapping or panicking.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use base64::Engine;
use celery_core::broker::DEAD_LETTER_REASON;
use celery_core::{App, AppConfig, ResultError, Signature, TaskState};
use celery_tests::{redis_available, wait_until, DemoProcess, RedisEnv, Target};
use celery_worker::prelude::*;
use redis::Commands;
use serde_json::{json, Value};

#[task]
async fn u_add(x: i64, y: i64) -> i64 {
    x + y
}

#[task]
async fn u_echo(s: String) -> usize {
    s.len()
}

/// Acked before it runs: a rejection of its arguments has nothing left to dead-letter.
#[task(acks_late = false)]
async fn u_early(x: i64) -> i64 {
    x
}

#[task]
async fn u_fails() -> Result<u32, TaskError> {
    Err(TaskError::new("ValueError", "fails on purpose"))
}

/// Tokens of the callbacks that ran (each test uses its own).
static MARKS: Mutex<Vec<i64>> = Mutex::new(Vec::new());

#[task]
async fn u_mark(token: i64) -> i64 {
    MARKS.lock().unwrap().push(token);
    token
}

fn marked(token: i64) -> bool {
    MARKS.lock().unwrap().contains(&token)
}

fn token() -> i64 {
    (uuid::Uuid::new_v4().as_u128() >> 68) as i64
}

fn mark(token: i64) -> Signature {
    Signature::by_name("u_mark").args(json!([token])).immutable()
}

const T: Duration = Duration::from_secs(20);

struct Running {
    stop: tokio::sync::oneshot::Sender<()>,
    handle: tokio::task::JoinHandle<Result<(), celery_worker::WorkerError>>,
}

impl Running {
    fn start(app: &App, concurrency: usize, prefetch_multiplier: usize) -> Running {
        let cfg = WorkerConfig {
            concurrency,
            prefetch_multiplier,
            shutdown_grace: Duration::from_secs(5),
            events: true,
            ..WorkerConfig::default()
        };
        let (stop, rx) = tokio::sync::oneshot::channel::<()>();
        let handle = tokio::spawn(Worker::new(app.clone(), cfg).run_until(async {
            let _ = rx.await;
        }));
        Running { stop, handle }
    }

    async fn stop(self) {
        let _ = self.stop.send(());
        self.handle.await.expect("join").expect("worker");
    }
}

/// The reasons of the dead letters of `celery` (read through the broker, so they stay put).
async fn dead_letter_reasons(t: &Target, app: &App) -> Vec<String> {
    if let Target::Redis(env) = t {
        let raw: Vec<String> = env.conn().lrange(env.key("celery.dead"), 0, -1).unwrap();
        return raw
            .iter()
            .map(|s| serde_json::from_str::<Value>(s).unwrap()["headers"][DEAD_LETTER_REASON].as_str().unwrap().into())
            .collect();
    }
    if let Target::RedisCluster(env) = t {
        // The raw dead-letter lists of both shards, read as on one server.
        use redis::AsyncCommands;
        let broker = broker_backends::redis::RedisBroker::connect(&env.broker).await.unwrap();
        let mut conn = broker.connection().clone();
        let mut reasons = Vec::new();
        for shard in 0..2 {
            let raw: Vec<String> = conn.lrange(broker.bucket_key("celery.dead", shard, 0), 0, -1).await.unwrap();
            reasons.extend(raw.iter().map(|s| {
                serde_json::from_str::<Value>(s).unwrap()["headers"][DEAD_LETTER_REASON].as_str().unwrap().to_owned()
            }));
        }
        return reasons;
    }
    let mut consumer = app.broker().consume(&["celery.dead".to_string()], 16).await.unwrap();
    let (mut reasons, mut held) = (Vec::new(), Vec::new());
    while let Ok(Some(mut d)) = tokio::time::timeout(Duration::from_millis(500), consumer.next()).await {
        let m = d.message().as_ref().expect("a dead letter decodes");
        reasons.push(m.headers.extra.get(DEAD_LETTER_REASON).and_then(Value::as_str).unwrap_or_default().to_owned());
        held.push(d);
    }
    consumer.stop();
    for d in held {
        d.requeue().await.unwrap();
    }
    consumer.close().await;
    reasons
}

/// A worker whose cap is 64 KiB gets a 200 KB message (the sender's cap is the default 16 MiB).
async fn oversized_messages_are_dead_lettered_undecoded(t: Target) {
    let app = t.app().await;
    let limit = 64 * 1024;
    let capped = app.clone().with_config(AppConfig { max_message_size: limit, ..AppConfig::default() });
    let w = Running::start(&capped, 2, 1);
    let errback = token();
    let big = app.send(u_echo::new("x".repeat(300_000)).link_error(mark(errback))).await.unwrap();
    let small = app.send(u_echo::new("y".repeat(1_000))).await.unwrap();
    // Just within the limit at send time: its encoded form (a base64 body on Redis) is larger,
    // and still within what the worker accepts.
    let near = capped.send(u_echo::new("z".repeat(limit - 200))).await.unwrap();
    assert_eq!(small.get::<usize>(T).await.unwrap(), 1_000, "the worker goes on");
    assert_eq!(near.get::<usize>(T).await.unwrap(), limit - 200, "accepted at send, accepted by the worker");
    assert_eq!(app.send(u_add::new(2, 3)).await.unwrap().get::<i64>(T).await.unwrap(), 5);
    let reasons = async {
        loop {
            let r = dead_letter_reasons(&t, &app).await;
            if !r.is_empty() {
                return r;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let reasons = tokio::time::timeout(T, reasons).await.expect("the big message is dead-lettered");
    assert_eq!(reasons.len(), 1, "{reasons:?}");
    let wire_limit = celery_core::protocol::max_encoded_size(limit);
    assert!(reasons[0].contains(&format!("exceeds the limit of {wire_limit} bytes")), "{reasons:?}");
    let size: usize = reasons[0].split_whitespace().nth(2).and_then(|s| s.parse().ok()).unwrap_or(0);
    assert!(size > 300_000, "the reason names the size: {reasons:?}");
    if matches!(t, Target::Redis(_) | Target::Amqp(..) | Target::Postgres(..) | Target::RedisCluster(_)) {
        // These brokers read its id apart from its body (Redis: in the envelope's tail, inside the
        // fetch script; RabbitMQ: in the content header; PostgreSQL: in the fetch statement), so
        // its caller is told at once.
        match big.get::<usize>(T).await {
            Err(ResultError::Failed { exc_type, message, .. }) => {
                assert_eq!(exc_type, "InvalidTaskError");
                assert!(message.contains(&format!("exceeds the limit of {wire_limit} bytes")), "{message}");
            }
            other => panic!("expected FAILURE, got {other:?}"),
        }
    } else {
        assert_eq!(big.state().await.unwrap(), TaskState::Pending, "never decoded, never run");
    }
    assert!(!marked(errback), "a message refused for its size sends no errback");
    w.stop().await;
    assert_eq!(app.broker().queue_len("celery").await.unwrap(), 0);
    if let Target::Redis(env) = &t {
        // Never leased: it went from the queue to the dead letters inside Redis.
        assert_eq!(env.conn().hlen::<_, u64>(env.key("unacked")).unwrap(), 0);
        let raw: Vec<String> = env.conn().lrange(env.key("celery.dead"), 0, -1).unwrap();
        let dead: Value = serde_json::from_str(&raw[0]).unwrap();
        let original: Value = serde_json::from_str(dead["body"].as_str().unwrap()).unwrap();
        assert_eq!(original["headers"]["id"], big.id(), "the original envelope is kept whole");
    }
}

/// Rejected messages (unknown task, bad arguments) with callbacks, errbacks and a chord: none of
/// them runs; a task that fails for real still sends its errback (so the test can see one).
async fn rejected_messages_trigger_nothing(t: Target) {
    let app = t.app().await;
    let mut events = celery_worker::events::subscribe(&app).await.expect("events");
    // One at a time, in queue order: whatever a rejected message sent would run before the control.
    let w = Running::start(&app, 1, 1);
    let (a, b, c, d, e, f, control) = (token(), token(), token(), token(), token(), token(), token());
    let unknown = Signature::by_name("u_no_such_task").args(json!([1])).link(mark(a)).link_error(mark(b));
    let unknown = app.send(unknown).await.unwrap();
    let bad_args = app.send(Signature::by_name("u_add").args(json!(["two", 3])).link_error(mark(c))).await.unwrap();
    let early = app.send(Signature::by_name("u_early").args(json!(["nope"])).link_error(mark(f))).await.unwrap();
    let member = Signature::by_name("u_no_such_task").args(json!([2]));
    let chord = app.send_chord([u_add::new(1, 1), member], mark(d).link_error(mark(e))).await.unwrap();
    // Celery's and Python's own exception types, so `except NotRegistered` works in Python too.
    for (r, expected) in [(&unknown, "NotRegistered"), (&bad_args, "TypeError"), (&early, "TypeError")] {
        match r.get::<Value>(T).await {
            Err(ResultError::Failed { exc_type, .. }) => assert_eq!(exc_type, expected),
            other => panic!("expected FAILURE, got {other:?}"),
        }
    }
    let failing = app.send(u_fails::new().link_error(mark(control))).await.unwrap();
    assert!(failing.get::<u32>(T).await.is_err());
    assert!(wait_until(T, || marked(control)), "a real failure sends its errback");
    for (what, tok) in [
        ("callback", a),
        ("errback", b),
        ("bad arguments' errback", c),
        ("chord body", d),
        ("chord errback", e),
        ("early task's errback", f),
    ] {
        assert!(!marked(tok), "a rejected message sent its {what}");
    }
    assert_eq!(chord.state().await.unwrap(), TaskState::Pending, "a rejected member completes no chord");
    // Each rejected task ends with `task-failed` (so Flower shows FAILURE), never `task-rejected`.
    let mut failed = std::collections::HashSet::new();
    let rejected = [unknown.id(), bad_args.id(), early.id()];
    let seen = tokio::time::timeout(T, async {
        while let Some(ev) = events.next().await {
            let uuid = ev["uuid"].as_str().unwrap_or_default();
            if rejected.contains(&uuid) {
                assert_ne!(ev["type"], "task-rejected", "{ev}");
                if ev["type"] == "task-failed" {
                    failed.insert(uuid.to_owned());
                }
            }
            if failed.len() == rejected.len() {
                return;
            }
        }
    })
    .await;
    assert!(seen.is_ok(), "task-failed for each rejected task; saw it for {failed:?}");
    w.stop().await;
}

celery_tests::each_broker!(
    oversized_messages_are_dead_lettered_undecoded,
    rejected_messages_trigger_nothing,
    huge_times_saturate
);

/// The same on the loopback Redis Cluster, each queue over two shards (the fetch script
/// dead-letters an oversized envelope into its shard's own `.dead` list, in the same slot).
mod redis_cluster_broker {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn oversized_messages_are_dead_lettered_undecoded() {
        if let Some(t) = super::Target::redis_cluster(2) {
            super::oversized_messages_are_dead_lettered_undecoded(t).await
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn rejected_messages_trigger_nothing() {
        if let Some(t) = super::Target::redis_cluster(2) {
            super::rejected_messages_trigger_nothing(t).await
        }
    }
}

/// A Kombu envelope for the `celery` list with these headers.
fn envelope(headers: Value, body: &[u8]) -> String {
    json!({
        "body": base64::engine::general_purpose::STANDARD.encode(body),
        "content-encoding": "utf-8", "content-type": "application/json", "headers": headers,
        "properties": {"correlation_id": headers["id"], "delivery_mode": 2, "body_encoding": "base64",
            "delivery_info": {"exchange": "", "routing_key": "celery"}, "priority": 0, "delivery_tag": "t"},
    })
    .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_that_do_not_parse_fail_get_at_once() {
    if !redis_available("worker_untrusted") {
        return;
    }
    let env = RedisEnv::new(30.0);
    let app = celery_worker::connect(&env.broker, &env.backend).await.unwrap();
    let w = Running::start(&app, 2, 1);
    let id = uuid::Uuid::new_v4().to_string();
    let headers = json!({"lang": "py", "task": "u_add", "id": id, "retries": "many", "timelimit": [null, null]});
    let _: () = env.conn().lpush(env.key("celery"), envelope(headers, br#"[[1, 2], {}, {}]"#)).unwrap();
    let started = Instant::now();
    match app.result(&id).get::<i64>(Duration::from_secs(60)).await {
        Err(ResultError::Failed { exc_type, message, .. }) => {
            assert_eq!(exc_type, "InvalidTaskError");
            assert!(message.contains("`retries`") && message.contains(&id), "{message}");
        }
        other => panic!("expected FAILURE, got {other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(15), "get() waited {:?}", started.elapsed());
    assert_eq!(app.send(u_add::new(1, 2)).await.unwrap().get::<i64>(T).await.unwrap(), 3, "the worker goes on");
    w.stop().await;
    let dead: Vec<String> = env.conn().lrange(env.key("celery.dead"), 0, -1).unwrap();
    assert_eq!(dead.len(), 1);
    let dead: Value = serde_json::from_str(&dead[0]).unwrap();
    assert!(dead["headers"][DEAD_LETTER_REASON].as_str().unwrap().contains("`retries`"), "{dead}");
    assert_eq!(dead["headers"]["id"], json!(id), "dead-lettered as received");
}

/// Lease ttls, result expiries and time limits as large as they get.
async fn huge_times_saturate(t: Target) {
    let app = t.app().await;
    let b = app.broker().require_leases("huge ttls").unwrap();
    assert!(b.lease("huge", "a", Duration::MAX).await.unwrap(), "a free lease is taken for ever");
    assert!(!b.lease("huge", "b", Duration::from_secs(1)).await.unwrap(), "not already expired: b is refused");
    assert!(b.lease("huge", "a", Duration::from_secs(u64::MAX)).await.unwrap(), "the holder renews");
    b.release("huge", "a").await.unwrap();
    let w = Running::start(&app, 2, 1);
    let mut sig = u_add::new(20, 22);
    sig.options.time_limit = Some(1e300);
    sig.options.soft_time_limit = Some(f64::MAX);
    assert_eq!(app.send(sig).await.unwrap().get::<i64>(T).await.unwrap(), 42, "a huge time limit is no limit");
    let mut sig = u_add::new(1, 1);
    sig.options.countdown = Some(Duration::MAX);
    let far = app.send(sig).await.unwrap();
    assert_eq!(app.send(u_add::new(2, 2)).await.unwrap().get::<i64>(T).await.unwrap(), 4);
    assert_ne!(far.state().await.unwrap(), TaskState::Success, "a huge countdown is far away, not now");
    let waited = app.send(u_add::new(3, 4)).await.unwrap().get::<i64>(Duration::MAX).await;
    assert_eq!(waited.unwrap(), 7, "get() with the longest timeout");
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_result_expiry_keeps_the_result() {
    let dir = celery_tests::TempDir::new("huge-expiry");
    let mut urls = vec![(dir.url(""), dir.url(&format!("result_expires={}", u64::MAX)))];
    let env = redis_available("worker_untrusted").then(|| RedisEnv::new(30.0));
    if let Some(env) = &env {
        urls.push((env.broker.clone(), format!("{}&result_expires={}", env.backend, u64::MAX)));
    }
    for (broker, backend) in urls {
        let app = celery_worker::connect(&broker, &backend).await.unwrap();
        let meta = celery_core::TaskMeta::success("huge-expiry", json!(7));
        app.backend().store(&meta).await.unwrap();
        let got = app.backend().get("huge-expiry").await.unwrap();
        assert_eq!(got.map(|m| m.result), Some(json!(7)), "{backend}: stored, not already expired");
    }
}

/// A 100 MB element on a Redis queue: the demo worker (its cap is 32 MiB) dead-letters it without
/// receiving it, its memory grows far less than the message's size, and it runs the next task.
/// The growth of the peak is what counts: a debug binary's mapped pages alone are tens of MiB.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_100_mb_message_never_reaches_the_worker() {
    if !redis_available("worker_untrusted") {
        return;
    }
    let env = RedisEnv::new(30.0);
    let size = 100 * 1024 * 1024;
    let worker = DemoProcess::start(&env, &["worker", "-c", "2"]);
    assert!(worker.wait_log("worker ready", T), "{}", worker.log());
    let peak_kb = || -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", worker.child.id())).unwrap();
        status
            .lines()
            .find(|l| l.starts_with("VmHWM:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap()
    };
    let before_kb = peak_kb();
    {
        let id = uuid::Uuid::new_v4().to_string();
        let headers = json!({"lang": "py", "task": "add", "id": id, "retries": 0});
        let mut env_json = envelope(headers, br#"[[1, 2], {}, {}]"#);
        env_json.push_str(&" ".repeat(size));
        let _: () = env.conn().lpush(env.key("celery"), env_json).unwrap();
    }
    let app = celery_worker::connect(&env.broker, &env.backend).await.unwrap();
    let r = app.send(Signature::by_name("add").args(json!([2, 3]))).await.unwrap();
    assert_eq!(r.get::<i64>(T).await.unwrap(), 5, "{}", worker.log());
    assert!(wait_until(T, || env.conn().llen::<_, u64>(env.key("celery.dead")).unwrap() == 1), "{}", worker.log());
    let grown_kb = peak_kb().saturating_sub(before_kb);
    eprintln!("demo worker peak RSS grew {} KiB after a {} MiB message", grown_kb, size / (1024 * 1024));
    assert!(grown_kb * 1024 < (size / 2) as u64, "peak RSS grew {grown_kb} kB: the body reached the worker");
    assert!(worker.log().contains("exceeds the limit of 33619968 bytes"), "{}", worker.log());
    let dead: Vec<String> = env.conn().lrange(env.key("celery.dead"), 0, -1).unwrap();
    let reason = serde_json::from_str::<Value>(&dead[0]).unwrap()["headers"][DEAD_LETTER_REASON].clone();
    assert!(reason.as_str().unwrap().contains("exceeds the limit of 33619968 bytes"), "{reason}");
}

/// The demo's `record` task appends whole lines: 16 concurrent tasks writing to one file never
/// interleave (a line written in two calls, token then newline, could).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_record_task_appends_whole_lines() {
    let dir = celery_tests::TempDir::new("record-lines");
    let url = dir.url("");
    let worker = DemoProcess::start_urls(&url, &url, &["worker", "-c", "16"]);
    assert!(worker.wait_log("worker ready", T), "{}", worker.log());
    let app = celery_worker::connect(&url, &url).await.unwrap();
    let file = dir.0.join("tokens.txt").display().to_string();
    let tokens: Vec<String> = (0..600).map(|i| format!("{i:04}-{}", "t".repeat(200))).collect();
    let sigs = tokens.iter().map(|t| Signature::by_name("record").args(json!([file, t])));
    let results = app.send_batch(sigs).await.unwrap();
    for r in results {
        r.get::<String>(Duration::from_secs(60)).await.unwrap();
    }
    let written = std::fs::read_to_string(&file).unwrap();
    let mut lines: Vec<&str> = written.lines().collect();
    lines.sort_unstable();
    assert_eq!(lines, tokens.iter().map(String::as_str).collect::<Vec<_>>(), "lines were interleaved");
}

/// `worker --max-message-size` sets the cap of a CLI worker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_flag_sets_the_cap() {
    let dir = celery_tests::TempDir::new("cap-flag");
    let url = dir.url("");
    let worker = DemoProcess::start_urls(&url, &url, &["worker", "-c", "2", "--max-message-size", "4096"]);
    assert!(worker.wait_log("worker ready", T), "{}", worker.log());
    let app = celery_worker::connect(&url, &url).await.unwrap();
    let file = dir.0.join("tokens.txt").display().to_string();
    let big = app.send(Signature::by_name("record").args(json!([file, "b".repeat(200_000)]))).await.unwrap();
    let small = app.send(Signature::by_name("record").args(json!([file, "small"]))).await.unwrap();
    assert_eq!(small.get::<String>(T).await.unwrap(), "small");
    let wire_limit = celery_core::protocol::max_encoded_size(4096);
    assert!(worker.wait_log(&format!("exceeds the limit of {wire_limit} bytes"), T), "{}", worker.log());
    assert_eq!(big.state().await.unwrap(), TaskState::Pending);
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "small\n");
}

/// The CLI's times saturate too: `send --countdown 1e400 --expires 1e400` sends (no panic).
#[test]
fn the_cli_takes_huge_times() {
    let dir = celery_tests::TempDir::new("cli-huge");
    let url = dir.url("");
    let out = std::process::Command::new(celery_tests::demo_bin())
        .args(["send", "add", "--args", "[1, 2]", "--countdown", "1e400", "--expires", "1e400"])
        .env("CELERY_BROKER_URL", &url)
        .env("CELERY_RESULT_BACKEND", &url)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

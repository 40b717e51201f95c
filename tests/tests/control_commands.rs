//! Remote control end to end, on every broker: our client (`celery_worker::control::request`)
//! drives a worker running in this process, and each command's effect is checked on real tasks:
//! consumers added and cancelled, the pool grown and shrunk (tasks held at a gate prove how many
//! run at once), the autoscaler, time limits, terminate, task events toggled, heartbeats on demand,
//! reserved/scheduled/query_task listing what the worker holds, Celery's reply shapes, and
//! shutdown's reply followed by `worker-offline`.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use celery_core::{App, ResultError, TaskState};
use celery_tests::Target;
use celery_worker::control;
use celery_worker::prelude::*;
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(20);

/// Tasks held at a gate, by key: how many are inside now, the most at once, and releases left.
#[derive(Debug, Default, Clone, Copy)]
struct Gate {
    inside: usize,
    most: usize,
    releases: usize,
}

static GATES: Mutex<Option<HashMap<String, Gate>>> = Mutex::new(None);

fn gate<R>(key: &str, f: impl FnOnce(&mut Gate) -> R) -> R {
    let mut g = GATES.lock().unwrap();
    f(g.get_or_insert_with(HashMap::new).entry(key.to_owned()).or_default())
}

/// Enters the gate `key` and waits there until released (at most a minute; then returns 0).
#[task]
async fn cc_gate(key: String) -> u32 {
    gate(&key, |g| {
        g.inside += 1;
        g.most = g.most.max(g.inside);
    });
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let released = gate(&key, |g| {
            let free = g.releases > 0;
            if free {
                g.releases -= 1;
                g.inside -= 1;
            }
            free
        });
        if released {
            return 1;
        }
        if tokio::time::Instant::now() > deadline {
            gate(&key, |g| g.inside -= 1);
            return 0;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[task]
async fn cc_sleep(ms: u64) -> u64 {
    tokio::time::sleep(Duration::from_millis(ms)).await;
    ms
}

#[task]
async fn cc_add(x: i64, y: i64) -> i64 {
    x + y
}

/// Polls `cond` every 20 ms until it holds or `T` passes.
async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let end = tokio::time::Instant::now() + T;
    while !cond() {
        assert!(tokio::time::Instant::now() < end, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn token() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..10].to_owned()
}

struct Running {
    host: String,
    stop: tokio::sync::oneshot::Sender<()>,
    handle: tokio::task::JoinHandle<Result<(), celery_worker::WorkerError>>,
}

impl Running {
    async fn stop(self) {
        let _ = self.stop.send(());
        tokio::time::timeout(T, self.handle).await.expect("worker stops").expect("join").expect("worker");
    }
}

/// Starts a worker named after `tag` and waits until it answers `ping`.
async fn start(app: &App, tag: &str, cfg: WorkerConfig) -> Running {
    let host = format!("{tag}-{}@test", token());
    let cfg = WorkerConfig { hostname: host.clone(), shutdown_grace: Duration::from_secs(5), ..cfg };
    let (stop, rx) = tokio::sync::oneshot::channel::<()>();
    let handle = tokio::spawn(Worker::new(app.clone(), cfg).run_until(async {
        let _ = rx.await;
    }));
    let end = tokio::time::Instant::now() + T;
    loop {
        let pong = control::request(app, "ping", json!({}), Some(vec![host.clone()]), Duration::from_millis(300));
        if pong.await.unwrap().iter().any(|(h, r)| *h == host && r["ok"] == "pong") {
            break;
        }
        assert!(tokio::time::Instant::now() < end, "{host} never answered ping");
    }
    Running { host, stop, handle }
}

/// The reply of worker `host` to `method(args)`.
async fn ask(app: &App, host: &str, method: &str, args: Value) -> Value {
    let started = tokio::time::Instant::now();
    let replies = control::request(app, method, args, Some(vec![host.to_owned()]), T).await.unwrap();
    if let Some((_, r)) = replies.into_iter().find(|(h, _)| h == host) {
        return r;
    }
    // Whether the worker still answers at all tells a lost reply from a stuck command.
    let ping = control::request(app, "ping", json!({}), Some(vec![host.to_owned()]), Duration::from_secs(5)).await;
    panic!("{host}: no reply to {method} within {:?}; a ping after it: {ping:?}", started.elapsed())
}

fn queue_config(queues: &[&str], concurrency: usize) -> WorkerConfig {
    WorkerConfig {
        queues: queues.iter().map(|q| q.to_string()).collect(),
        concurrency,
        prefetch_multiplier: 1,
        ..WorkerConfig::default()
    }
}

/// Celery's shapes: stats, conf (secrets masked), active_queues, clock, report, registered,
/// hello, memsample, objgraph, unknown methods, bad arguments, and pattern addressing.
async fn inspect_answers_in_celerys_shapes(t: Target) {
    let app = t.app().await;
    let q = format!("cc-shapes-{}", token());
    let w = start(&app, "shapes", queue_config(&[&q], 2)).await;
    let done = app.send(cc_add::new(2, 3).queue(q.clone())).await.unwrap();
    assert_eq!(done.get::<i64>(T).await.unwrap(), 5);

    let stats = ask(&app, &w.host, "stats", json!({})).await;
    for key in ["total", "pid", "clock", "uptime", "pool", "prefetch_count", "rusage", "broker"] {
        assert!(stats.get(key).is_some(), "stats.{key}: {stats}");
    }
    assert_eq!(stats["total"]["cc_add"], 1, "{stats}");
    assert_eq!(stats["pool"]["max-concurrency"], 2);
    assert_eq!(stats["prefetch_count"], 2);
    assert!(stats["clock"].as_str().unwrap().parse::<u64>().is_ok(), "Celery sends the clock as text");
    assert!(stats["rusage"]["maxrss"].as_u64().unwrap() > 0, "{stats}");
    let (broker_url, _) = t.urls();
    assert_eq!(stats["broker"]["transport"], broker_url.split("://").next().unwrap().split('+').next().unwrap());
    assert!(stats["broker"].get("password").is_none());

    let conf = ask(&app, &w.host, "conf", json!({"with_defaults": "true"})).await;
    let shown = conf.to_string();
    for secret in ["s3cret", "guest:guest"] {
        assert!(!shown.contains(secret), "conf shows a secret: {shown}");
    }
    assert_eq!(conf["worker_concurrency"], 2);
    assert_eq!(conf["task_default_queue"], "celery");
    assert!(conf["broker_url"].as_str().unwrap().starts_with(broker_url.split("://").next().unwrap()), "{conf}");
    let changed = ask(&app, &w.host, "conf", json!({})).await;
    assert!(changed.get("task_default_queue").is_none(), "without defaults: only what differs: {changed}");

    let queues = ask(&app, &w.host, "active_queues", json!({})).await;
    let queues = queues.as_array().unwrap();
    assert_eq!(queues.len(), 1);
    assert_eq!(queues[0]["name"], q.as_str());
    assert_eq!(queues[0]["exchange"]["type"], "direct");
    for key in ["routing_key", "queue_arguments", "binding_arguments", "durable", "exclusive", "auto_delete", "no_ack"]
    {
        assert!(queues[0].get(key).is_some(), "{key}");
    }

    let c1 = ask(&app, &w.host, "clock", json!({})).await["clock"].as_u64().unwrap();
    let c2 = ask(&app, &w.host, "clock", json!({})).await["clock"].as_u64().unwrap();
    assert!(c2 > c1, "each request moves the clock: {c1} {c2}");
    let report = ask(&app, &w.host, "report", json!({})).await;
    assert!(report["ok"].as_str().unwrap().contains("software -> celery-rs:"), "{report}");
    let registered = ask(&app, &w.host, "registered", json!({})).await;
    let names: Vec<&str> = registered.as_array().unwrap().iter().filter_map(Value::as_str).collect();
    assert!(names.contains(&"cc_add") && !names.iter().any(|n| n.starts_with("celery.")), "{names:?}");
    let with_builtins = ask(&app, &w.host, "dump_tasks", json!({"builtins": 1})).await;
    assert!(with_builtins.as_array().unwrap().len() > names.len(), "alias and builtins");

    let hello = ask(&app, &w.host, "hello", json!({"from_node": "other@host", "revoked": {"r1": [1.0, "r1"]}})).await;
    assert!(hello["clock"].as_u64().is_some() && hello["revoked"].get("r1").is_some(), "{hello}");
    assert!(ask(&app, &w.host, "revoked", json!({})).await.as_array().unwrap().contains(&json!("r1")));
    assert!(ask(&app, &w.host, "memsample", json!({})).await.as_str().unwrap().ends_with('B'));
    assert!(ask(&app, &w.host, "memdump", json!({})).await.as_str().unwrap().contains("- rss (end): "));
    assert_eq!(
        ask(&app, &w.host, "objgraph", json!({})).await,
        json!({"error": "ImportError('Requires the objgraph library')"})
    );
    assert_eq!(ask(&app, &w.host, "no_such_command", json!({})).await, json!({"error": "KeyError('no_such_command')"}));
    assert_eq!(
        ask(&app, &w.host, "add_consumer", json!({})).await,
        json!({"error": "TypeError(\"add_consumer() missing 1 required positional argument: 'queue'\")"})
    );
    assert_eq!(
        ask(&app, &w.host, "pool_grow", json!({"n": "x"})).await["error"],
        "ValueError(\"invalid literal for int() with base 10: 'x'\")"
    );
    assert_eq!(
        ask(&app, &w.host, "autoscale", json!({"max": 4})).await,
        json!({"error": "ValueError('Autoscale not enabled')"})
    );
    assert_eq!(
        ask(&app, &w.host, "pool_restart", json!({})).await,
        json!({"error": "ValueError('Pool restarts not enabled')"})
    );
    assert_eq!(ask(&app, &w.host, "election", json!({"id": "e", "topic": "t"})).await, Value::Null);

    // Addressed by pattern, as Kombu: glob, and pcre anchored at the start.
    for (pattern, matcher) in [("shapes-*@test", "glob"), (r"shapes-\w+@", "pcre")] {
        let replies = control::request_matching(&app, "ping", json!({}), pattern, matcher, Duration::from_millis(700))
            .await
            .unwrap();
        assert!(replies.iter().any(|(h, _)| *h == w.host), "{pattern} ({matcher}): {replies:?}");
    }
    let none = control::request_matching(&app, "ping", json!({}), "nobody-*", "glob", Duration::from_millis(500)).await;
    assert!(none.unwrap().iter().all(|(h, _)| *h != w.host));
    w.stop().await;
}

/// add_consumer makes a task waiting on a new queue run; cancel_consumer stops consuming it (a
/// task sent after stays queued).
async fn consumers_are_added_and_cancelled(t: Target) {
    let app = t.app().await;
    let (a, b) = (format!("cc-a-{}", token()), format!("cc-b-{}", token()));
    let w = start(&app, "consumers", queue_config(&[&a], 2)).await;
    let waiting = app.send(cc_add::new(1, 1).queue(b.clone())).await.unwrap();
    let first = app.send(cc_add::new(1, 2).queue(a.clone())).await.unwrap();
    assert_eq!(first.get::<i64>(T).await.unwrap(), 3);
    assert_eq!(waiting.state().await.unwrap(), TaskState::Pending, "not consumed yet");

    assert_eq!(
        ask(&app, &w.host, "add_consumer", json!({"queue": b})).await,
        json!({"ok": format!("add consumer {b}")})
    );
    assert_eq!(waiting.get::<i64>(T).await.unwrap(), 2, "the new queue is consumed");
    let again = ask(&app, &w.host, "add_consumer", json!({"queue": b})).await;
    assert_eq!(again, json!({"ok": format!("already consuming from {b}")}));
    let names =
        |v: Value| v.as_array().unwrap().iter().map(|q| q["name"].as_str().unwrap().to_owned()).collect::<Vec<_>>();
    assert_eq!(names(ask(&app, &w.host, "active_queues", json!({})).await), [a.clone(), b.clone()]);

    let cancelled = ask(&app, &w.host, "cancel_consumer", json!({"queue": b})).await;
    assert_eq!(cancelled, json!({"ok": format!("no longer consuming from {b}")}));
    assert_eq!(names(ask(&app, &w.host, "active_queues", json!({})).await), std::slice::from_ref(&a));
    let stays = app.send(cc_add::new(5, 5).queue(b.clone())).await.unwrap();
    let alive = app.send(cc_add::new(2, 2).queue(a.clone())).await.unwrap();
    assert_eq!(alive.get::<i64>(T).await.unwrap(), 4, "still consuming the other queue");
    assert_eq!(stays.state().await.unwrap(), TaskState::Pending);
    assert_eq!(app.broker().queue_len(&b).await.unwrap(), 1, "the task sent after the cancel waits in its queue");
    w.stop().await;
}

/// pool_grow lets more tasks run at once, pool_shrink fewer (running ones are not stopped);
/// reserved and query_task list the waiting and running ones.
async fn pool_grows_and_shrinks(t: Target) {
    let app = t.app().await;
    let q = format!("cc-pool-{}", token());
    let key = format!("pool-{}", token());
    // Two deliveries per slot: with one slot busy (tasks ack after they run), one more is fetched.
    let w = start(&app, "pool", WorkerConfig { prefetch_multiplier: 2, ..queue_config(&[&q], 1) }).await;
    let one = app.send(cc_gate::new(key.clone()).queue(q.clone())).await.unwrap();
    let two = app.send(cc_gate::new(key.clone()).queue(q.clone())).await.unwrap();
    eventually("one task inside the gate", || gate(&key, |g| g.inside) == 1).await;
    // The second waits for a slot: reserved, not active.
    let mut listed = false;
    for _ in 0..200 {
        let reserved = ask(&app, &w.host, "reserved", json!({})).await;
        let ids: Vec<&str> = reserved.as_array().unwrap().iter().filter_map(|r| r["id"].as_str()).collect();
        if ids.len() == 1 {
            let (running, waiting) = if ids[0] == two.id() { (&one, &two) } else { (&two, &one) };
            let states =
                ask(&app, &w.host, "query_task", json!({"ids": [running.id(), waiting.id(), "unknown"]})).await;
            assert_eq!(states[running.id()][0], "active", "{states}");
            assert_eq!(states[waiting.id()][0], "reserved", "{states}");
            assert_eq!(states[waiting.id()][1]["name"], "cc_gate");
            assert!(states.get("unknown").is_none());
            listed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(listed, "the waiting task shows in inspect reserved");
    assert_eq!(gate(&key, |g| g.most), 1, "one slot: one at a time");

    assert_eq!(ask(&app, &w.host, "pool_grow", json!({"n": 1})).await, json!({"ok": "pool will grow"}));
    eventually("both tasks inside the gate at once", || gate(&key, |g| g.inside) == 2).await;
    let stats = ask(&app, &w.host, "stats", json!({})).await;
    assert_eq!((stats["pool"]["max-concurrency"].as_u64(), stats["prefetch_count"].as_u64()), (Some(2), Some(4)));
    let active = ask(&app, &w.host, "active", json!({"safe": true})).await;
    assert_eq!(active.as_array().unwrap().len(), 2, "{active}");

    // Shrink while both run: neither is stopped, and from now on one runs at a time.
    assert_eq!(ask(&app, &w.host, "pool_shrink", json!({"n": "1"})).await, json!({"ok": "pool will shrink"}));
    let three = app.send(cc_gate::new(key.clone()).queue(q.clone())).await.unwrap();
    gate(&key, |g| g.releases += 2);
    assert_eq!((one.get::<u32>(T).await.unwrap(), two.get::<u32>(T).await.unwrap()), (1, 1), "neither was stopped");
    eventually("the third inside the gate", || gate(&key, |g| g.inside) == 1).await;
    gate(&key, |g| g.most = g.inside);
    let four = app.send(cc_gate::new(key.clone()).queue(q.clone())).await.unwrap();
    let mut reserved = 0;
    for _ in 0..500 {
        reserved = ask(&app, &w.host, "reserved", json!({})).await.as_array().unwrap().len();
        if reserved > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(reserved, 1, "the fourth waits for the one slot");
    assert_eq!(gate(&key, |g| g.most), 1, "after the shrink: one at a time");
    gate(&key, |g| g.releases += 2);
    assert_eq!((three.get::<u32>(T).await.unwrap(), four.get::<u32>(T).await.unwrap()), (1, 1));
    assert_eq!(gate(&key, |g| g.most), 1);
    let stats = ask(&app, &w.host, "stats", json!({})).await;
    assert_eq!((stats["pool"]["max-concurrency"].as_u64(), stats["prefetch_count"].as_u64()), (Some(1), Some(2)));
    w.stop().await;
}

/// The autoscaler grows the pool while tasks wait, shrinks it back after the keepalive, and
/// `autoscale` changes its bounds.
async fn autoscaler_follows_the_load(t: Target) {
    let app = t.app().await;
    let q = format!("cc-auto-{}", token());
    let key = format!("auto-{}", token());
    let cfg = WorkerConfig {
        autoscale: Some((3, 1)),
        autoscale_keepalive: Duration::from_millis(500),
        ..queue_config(&[&q], 1)
    };
    let w = start(&app, "auto", cfg).await;
    let stats = ask(&app, &w.host, "stats", json!({})).await;
    assert_eq!(stats["autoscaler"]["max"], 3, "{stats}");
    assert_eq!(stats["prefetch_count"], 3, "prefetch for the max");
    let mut tasks = Vec::new();
    for _ in 0..3 {
        tasks.push(app.send(cc_gate::new(key.clone()).queue(q.clone())).await.unwrap());
    }
    eventually("three tasks inside at once", || gate(&key, |g| g.inside) == 3).await;
    assert_eq!(
        ask(&app, &w.host, "pool_grow", json!({})).await["error"],
        "pool_grow is not supported with autoscale. Adjust autoscale range instead."
    );
    gate(&key, |g| g.releases += 3);
    for t in tasks {
        assert_eq!(t.get::<u32>(T).await.unwrap(), 1);
    }
    let mut current = 0;
    for _ in 0..300 {
        current = ask(&app, &w.host, "stats", json!({})).await["autoscaler"]["current"].as_u64().unwrap();
        if current == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(current, 1, "shrunk back to min once idle past the keepalive");
    assert_eq!(
        ask(&app, &w.host, "autoscale", json!({"max": "5", "min": 2})).await,
        json!({"ok": "autoscale now max=5 min=2"})
    );
    let stats = ask(&app, &w.host, "stats", json!({})).await;
    assert_eq!((stats["autoscaler"]["max"].as_u64(), stats["autoscaler"]["current"].as_u64()), (Some(5), Some(2)));
    w.stop().await;
}

/// time_limit stops a long task on its later runs; terminate stops a running one (REVOKED).
async fn time_limit_and_terminate(t: Target) {
    let app = t.app().await;
    let q = format!("cc-limits-{}", token());
    let w = start(&app, "limits", queue_config(&[&q], 2)).await;
    assert_eq!(
        ask(&app, &w.host, "time_limit", json!({"task_name": "nope", "hard": 1})).await,
        json!({"error": "unknown task"})
    );
    let set = ask(&app, &w.host, "time_limit", json!({"task_name": "cc_sleep", "soft": "0.2", "hard": 0.4})).await;
    assert_eq!(set, json!({"ok": "time limits set successfully"}));
    let slow = app.send(cc_sleep::new(60_000).queue(q.clone())).await.unwrap();
    assert!(
        matches!(slow.get::<u64>(T).await, Err(ResultError::Failed { exc_type, .. }) if exc_type == "TimeLimitExceeded"),
        "the hard limit set by remote control stopped it"
    );
    ask(&app, &w.host, "time_limit", json!({"task_name": "cc_sleep"})).await;
    let quick = app.send(cc_sleep::new(600).queue(q.clone())).await.unwrap();
    assert_eq!(quick.get::<u64>(T).await.unwrap(), 600, "limits removed");

    let key = format!("term-{}", token());
    let held = app.send(cc_gate::new(key.clone()).queue(q.clone())).await.unwrap();
    eventually("the task runs", || gate(&key, |g| g.inside) == 1).await;
    let reply = ask(&app, &w.host, "terminate", json!({"signal": "SIGKILL", "task_id": held.id()})).await;
    assert_eq!(reply, json!({"ok": format!("terminate: {}", held.id())}));
    assert!(matches!(held.get::<u32>(T).await, Err(ResultError::Revoked)));
    let unknown = ask(&app, &w.host, "revoke", json!({"task_id": ["nope"], "terminate": "true"})).await;
    assert_eq!(unknown, json!({"ok": "terminate: tasks unknown"}));
    let flagged = ask(&app, &w.host, "revoke", json!({"task_id": "x1"})).await;
    assert_eq!(flagged, json!({"ok": "tasks {'x1'} flagged as revoked"}));
    // A bare revoke request (what Python's `app.control.revoke` sends: it stores nothing itself):
    // the worker marks the task REVOKED in the backend, as Celery's workers do, so a waiter learns.
    let pending = format!("revoked-{}", token());
    ask(&app, &w.host, "revoke", json!({"task_id": [pending.clone()]})).await;
    assert!(matches!(app.result(&pending).get::<u32>(T).await, Err(ResultError::Revoked)));
    w.stop().await;
}

/// A task waiting on its rate limit holds its slot unstarted: reserved and query_task list it.
async fn rate_limited_tasks_are_reserved(t: Target) {
    let app = t.app().await;
    let q = format!("cc-rate-{}", token());
    let w = start(&app, "rate", queue_config(&[&q], 2)).await;
    let set = ask(&app, &w.host, "rate_limit", json!({"task_name": "cc_add", "rate_limit": "1/h"})).await;
    assert_eq!(set, json!({"ok": "new rate limit set successfully"}));
    let first = app.send(cc_add::new(1, 2).queue(q.clone())).await.unwrap();
    assert_eq!(first.get::<i64>(T).await.unwrap(), 3, "the first start is free");
    let second = app.send(cc_add::new(2, 2).queue(q.clone())).await.unwrap();
    let mut states = Value::Null;
    for _ in 0..500 {
        states = ask(&app, &w.host, "query_task", json!({"ids": [second.id()]})).await;
        if states.get(second.id()).is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(states[second.id()][0], "reserved", "{states}");
    let reserved = ask(&app, &w.host, "reserved", json!({})).await;
    assert_eq!(reserved[0]["id"], second.id(), "{reserved}");
    assert_eq!(reserved[0]["args"], json!([2, 2]));
    assert_eq!(reserved[0]["acknowledged"], false);
    let bad = ask(&app, &w.host, "rate_limit", json!({"task_name": "cc_add", "rate_limit": "fast"})).await;
    assert!(bad["error"].as_str().unwrap().starts_with("Invalid rate limit string: "), "{bad}");
    let unknown = ask(&app, &w.host, "rate_limit", json!({"task_name": "nope", "rate_limit": "1/s"})).await;
    assert_eq!(unknown, json!({"error": "unknown task"}));
    // Revoked while it waits: dropped at once (REVOKED), not an hour later.
    let flagged = ask(&app, &w.host, "revoke", json!({"task_id": [second.id()]})).await;
    assert_eq!(flagged, json!({"ok": format!("tasks {{'{}'}} flagged as revoked", second.id())}));
    assert!(matches!(second.get::<i64>(T).await, Err(ResultError::Revoked)));
    assert_eq!(ask(&app, &w.host, "reserved", json!({})).await, json!([]));
    w.stop().await;
}

/// A task received with an eta more than a second away (Redis and RabbitMQ producers, ours and
/// Python's, publish it straight to its queue) is listed by `scheduled`: deferred to the broker at
/// once by an idle worker, or held unstarted behind busy slots (then not `reserved`, as in Celery).
/// The built-in and PostgreSQL brokers hold an eta message themselves from the start (the log's
/// delay store, the row's `run_at`), so no worker lists it there.
async fn eta_tasks_are_scheduled(t: Target) {
    if matches!(t, Target::Log(_) | Target::LogTcp(..) | Target::Postgres(..)) {
        return;
    }
    let app = t.app().await;
    let q = format!("cc-eta-{}", token());
    let w = start(&app, "eta", WorkerConfig { prefetch_multiplier: 4, ..queue_config(&[&q], 1) }).await;
    let scheduled_entry = |id: String| {
        let app = app.clone();
        let host = w.host.clone();
        async move {
            for _ in 0..500 {
                let s = ask(&app, &host, "scheduled", json!({})).await;
                if let Some(e) = s.as_array().unwrap().iter().find(|e| e["request"]["id"] == id.as_str()) {
                    return e.clone();
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            panic!("{id} never listed by scheduled");
        }
    };
    let later = app.send(cc_add::new(1, 2).queue(q.clone()).countdown(Duration::from_secs(300))).await.unwrap();
    let deferred = scheduled_entry(later.id().to_owned()).await;
    assert!(deferred["eta"].as_str().is_some_and(|e| e.starts_with("20")), "{deferred}");
    assert_eq!(deferred["request"]["name"], "cc_add");
    let states = ask(&app, &w.host, "query_task", json!({"ids": later.id()})).await;
    assert_eq!(states[later.id()][0], "scheduled", "{states}");

    // The only slot busy: a countdown task waits behind it, listed as scheduled, not reserved.
    let key = format!("eta-{}", token());
    let busy = app.send(cc_gate::new(key.clone()).queue(q.clone())).await.unwrap();
    eventually("the slot is busy", || gate(&key, |g| g.inside) == 1).await;
    let behind = app.send(cc_add::new(3, 4).queue(q.clone()).countdown(Duration::from_secs(300))).await.unwrap();
    let entry = scheduled_entry(behind.id().to_owned()).await;
    assert_eq!(entry["request"]["args"], json!([3, 4]), "{entry}");
    let reserved = ask(&app, &w.host, "reserved", json!({})).await;
    assert!(reserved.as_array().unwrap().iter().all(|r| r["id"] != behind.id()), "{reserved}");
    let states = ask(&app, &w.host, "query_task", json!({"ids": [behind.id(), busy.id()]})).await;
    assert_eq!((states[behind.id()][0].as_str(), states[busy.id()][0].as_str()), (Some("scheduled"), Some("active")));
    gate(&key, |g| g.releases += 1);
    assert_eq!(busy.get::<u32>(T).await.unwrap(), 1);
    w.stop().await;
}

/// Worker events flow without task events; enable_events and disable_events switch task events;
/// heartbeat sends a worker-heartbeat at once.
async fn events_are_toggled_and_heartbeat_on_demand(t: Target) {
    let app = t.app().await;
    let q = format!("cc-events-{}", token());
    let mut events = celery_worker::events::subscribe(&app).await.unwrap();
    let cfg = WorkerConfig { heartbeat: Duration::from_secs(3600), ..queue_config(&[&q], 1) };
    let w = start(&app, "events", cfg).await;
    let host = w.host.clone();
    // Collects this worker's events until one satisfies `until`.
    async fn until(
        events: &mut celery_worker::events::EventStream,
        host: &str,
        stop: impl Fn(&Value) -> bool,
    ) -> Vec<Value> {
        let mut seen = Vec::new();
        let collect = async {
            loop {
                let e = events.next().await.expect("subscription open");
                if e["hostname"] == host {
                    let done = stop(&e);
                    seen.push(e);
                    if done {
                        return;
                    }
                }
            }
        };
        tokio::time::timeout(T, collect).await.unwrap_or_else(|_| panic!("events so far: {seen:?}"));
        seen
    }
    let quiet = app.send(cc_add::new(1, 1).queue(q.clone())).await.unwrap();
    quiet.get::<i64>(T).await.unwrap();
    assert_eq!(ask(&app, &host, "enable_events", json!({})).await, json!({"ok": "task events enabled"}));
    assert_eq!(ask(&app, &host, "enable_events", json!({})).await, json!({"ok": "task events already enabled"}));
    let loud = app.send(cc_add::new(2, 2).queue(q.clone())).await.unwrap();
    let seen = until(&mut events, &host, |e| e["type"] == "task-succeeded" && e["uuid"] == loud.id()).await;
    assert!(seen.iter().any(|e| e["type"] == "worker-online"), "worker events without -E: {seen:?}");
    // Its task-succeeded may follow its stored result (which the test waited for) and so come
    // after enable_events; the events before its result came before enable_events.
    let before = |e: &&Value| e["uuid"] == quiet.id() && e["type"] != "task-succeeded";
    assert!(!seen.iter().any(|e| before(&e)), "no task events before enable_events: {seen:?}");
    let clocks: Vec<u64> = seen.iter().filter_map(|e| e["clock"].as_u64()).collect();
    assert!(clocks.windows(2).all(|w| w[0] < w[1]), "one Lamport clock: {clocks:?}");

    assert_eq!(ask(&app, &host, "disable_events", json!({})).await, json!({"ok": "task events disabled"}));
    let quiet_again = app.send(cc_add::new(3, 3).queue(q.clone())).await.unwrap();
    quiet_again.get::<i64>(T).await.unwrap();
    assert_eq!(ask(&app, &host, "heartbeat", json!({})).await, Value::Null);
    let seen = until(&mut events, &host, |e| e["type"] == "worker-heartbeat").await;
    assert!(seen.iter().all(|e| e["uuid"] != quiet_again.id()), "no task events after disable_events: {seen:?}");
    w.stop().await;
}

/// shutdown replies first, then the worker stops and its worker-offline arrives.
async fn shutdown_replies_then_worker_offline(t: Target) {
    let app = t.app().await;
    let mut events = celery_worker::events::subscribe(&app).await.unwrap();
    let w = start(&app, "bye", queue_config(&[&format!("cc-bye-{}", token())], 1)).await;
    let reply = ask(&app, &w.host, "shutdown", json!({})).await;
    assert_eq!(reply, json!({"ok": "shutting down"}));
    tokio::time::timeout(T, w.handle).await.expect("the worker stops by itself").unwrap().unwrap();
    let host = w.host.clone();
    let offline = async {
        loop {
            let e = events.next().await.expect("subscription open");
            if e["hostname"] == host && e["type"] == "worker-offline" {
                return e;
            }
        }
    };
    let e = tokio::time::timeout(T, offline).await.expect("worker-offline arrives");
    assert_eq!(e["sw_ident"], "celery-rs");
}

celery_tests::each_broker!(
    inspect_answers_in_celerys_shapes,
    consumers_are_added_and_cancelled,
    pool_grows_and_shrinks,
    autoscaler_follows_the_load,
    time_limit_and_terminate,
    rate_limited_tasks_are_reserved,
    eta_tasks_are_scheduled,
    events_are_toggled_and_heartbeat_on_demand,
    shutdown_replies_then_worker_offline,
);

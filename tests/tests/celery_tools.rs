//! Celery's own tools against our workers: the real `celery` command line and Flower, from PyPI,
//! over Redis and over RabbitMQ (results in Redis). What a Python Celery 5.x worker answers is the
//! reference; where it is cheap, a Python worker runs side by side and the KEY SETS of its replies
//! are compared with ours.
//!
//! 1. `inspect_and_control_*`: our worker (the demo binary) and a Python worker (`--pool=threads
//!    -c 2`) answer every `celery inspect` command (ping, clock, conf, registered, report, stats,
//!    active_queues, revoked, active, reserved, scheduled, query_task) idle and under load, and
//!    every `celery control` command (terminate, revoke, rate_limit, time_limit, enable_events,
//!    disable_events, heartbeat, pool_grow, pool_shrink, autoscale, add_consumer, cancel_consumer,
//!    election, pool_restart), with the effect checked where there is one (a terminated task is
//!    REVOKED, a grown pool is larger, an added queue is consumed, a time limit fails a task).
//!    Where Celery answers an error for what a worker lacks (`autoscale` to a worker started
//!    without `--autoscale`, `pool_restart`), ours must answer exactly as the Python worker does.
//!    `celery result <id>` prints our result. Then Python's `AsyncResult.get()` on our worker's
//!    revoked, expired, time-limited, unregistered and wrong-argument tasks and on a chord with a
//!    failing member raises what `except celery.exceptions.TaskRevokedError` (twice),
//!    `TimeLimitExceeded`, `NotRegistered`, `builtins.TypeError` and `ChordError` catch (the real
//!    classes, not ones Celery makes up for an `exc_module` it cannot import). A Python worker
//!    stores nothing for an unregistered task (its caller's `get()` times out); ours stores a
//!    FAILURE with Celery's own `NotRegistered`, which is what we assert. A `link` callback sent
//!    from Python runs on our worker and shows in the parent's `AsyncResult.children`; and the
//!    Python worker runs a countdown task sent by our producer, not before its eta.
//! 2. `flower_*`: Flower (started with `--enable_events=False`, so that it does not re-enable
//!    events behind the test's back) lists our worker (`/api/workers?refresh=1` with stats,
//!    active_queues, registered, conf), serves its page (`/worker/<name>`), the broker page and
//!    `/api/queues/length`, our tasks (`/api/tasks`, `/task/<id>`, `/api/task/info/<id>`, a task
//!    with wrong arguments ending FAILURE), and steers it through its API: revoke with
//!    `terminate=true`, pool grow/shrink, autoscale (refused as Celery refuses it by a worker
//!    without `--autoscale`, applied by a second one started with `--autoscale 4,1`), add/cancel
//!    consumer, rate limit and time limit. `celery control disable_events` silences our task
//!    events (Flower never hears of a task run meanwhile) and `enable_events` brings them back. On
//!    Redis the test takes a screenshot of the worker page in headless Chromium
//!    (`tests/browser/flower.mjs`; saved as `$CELERY_RS_SCREENSHOT_DIR/flower-worker.png` when that
//!    is set, which is how `docs/flower-worker.png` is made). Last, `celery control shutdown` gets
//!    our worker's reply, the process exits, and `celery events --dump` prints its worker-offline
//!    event.
//! 3. `purge_*`: countdown tasks from our producer (no worker running) are removed by `celery purge
//!    -f -Q <queue>`, which counts them, and none of them runs when our worker starts after.
//!
//! Failures are collected per test and reported together (each check also prints `ok` or `FAIL`
//! as it goes), so one run shows everything our workers still answer differently. A failure of
//! the harness itself (a process that does not start, a Python script that fails) panics at once.
//!
//! The `celery` commands of one step run through `tools_app.py batch`: Celery's click entry point
//! called in one Python process (the code `python -m celery -A tools_app ...` runs, without paying
//! Python's start-up for each of some forty commands); `purge`, `events`, `flower`, `worker`,
//! `shutdown` and `enable_events`/`disable_events` in the Flower test run as `python -m celery`.
//!
//! Servers: every test uses database 9 of the test Redis (`celery_tests::TEST_DB`, shared by the
//! suites; `python_interop` owns 1-8 and 10-15) under a key prefix of its own, given to Kombu and to
//! Celery's result backend as `global_keyprefix` (`CELERY_KEYPREFIX` in `tests/python/tools_app.py`)
//! and to ours as `?global_keyprefix=`, so the six tests run in parallel; the RabbitMQ tests use a
//! vhost of their own, results in the same Redis database under a prefix. RabbitMQ's management
//! plugin is not enabled here, so on RabbitMQ Flower's broker page and `/api/queues/length` list no
//! queues (Flower's behaviour for any worker): those checks assert only that they answer.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use celery_core::{App, AsyncResult, ResultError, Signature, TaskState};
use celery_tests::python::{self, Service};
use celery_tests::{
    amqp_available, browser, free_port, redis_available, wait_until, AmqpVhost, DemoProcess, RedisEnv, REDIS, TEST_DB,
};
use serde_json::{json, Value};

const SUITE: &str = "celery_tools";
/// How long a precondition (a process starting, a result arriving) may take.
const T: Duration = Duration::from_secs(30);
/// How long an effect a check waits for (a revoke landing, a queue added) may take.
const EFFECT: Duration = Duration::from_secs(10);
/// The keys of one task in Celery's `active`, `reserved` and `scheduled` replies (`Request.info()`).
const REQUEST_KEYS: &[&str] =
    &["id", "name", "args", "kwargs", "type", "hostname", "time_start", "acknowledged", "delivery_info", "worker_pid"];
/// The keys of a request's `delivery_info`.
const DELIVERY_KEYS: &[&str] = &["exchange", "routing_key", "priority", "redelivered"];

// ---------------------------------------------------------------------------------------------
// The tests.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inspect_and_control_on_redis() {
    if let (Some(servers), Some(python)) = (Servers::redis(), python::venv_or_skip(SUITE)) {
        inspect_and_control(python, &servers).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inspect_and_control_on_rabbitmq() {
    if let (Some(servers), Some(python)) = (Servers::amqp(), python::venv_or_skip(SUITE)) {
        inspect_and_control(python, &servers).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flower_on_redis() {
    if let (Some(servers), Some(python)) = (Servers::redis(), python::venv_or_skip(SUITE)) {
        flower(python, &servers, true).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flower_on_rabbitmq() {
    if let (Some(servers), Some(python)) = (Servers::amqp(), python::venv_or_skip(SUITE)) {
        flower(python, &servers, false).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_on_redis() {
    if let (Some(servers), Some(python)) = (Servers::redis(), python::venv_or_skip(SUITE)) {
        purge(python, &servers).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_on_rabbitmq() {
    if let (Some(servers), Some(python)) = (Servers::amqp(), python::venv_or_skip(SUITE)) {
        purge(python, &servers).await;
    }
}

// ---------------------------------------------------------------------------------------------
// 1. Every inspect and control command, ours beside a Python worker.

async fn inspect_and_control(python: &Path, s: &Servers) {
    let mut c = Checks::new(format!("inspect/control over {}", s.kind));
    let rs = format!("rs-{}@tools", short());
    let py = format!("py-{}@tools", short());
    let ourq = format!("tools-rs-{}", short());
    let pyq = format!("tools-py-{}", short());
    let extraq = format!("tools-extra-{}", short());
    let both = format!("{rs},{py}");

    let ours = s.our_worker(&["-Q", &ourq, "-c", "2", "-n", &rs]);
    let theirs = Service::start(&mut s.python(
        python,
        &[
            "-m",
            "celery",
            "-A",
            "tools_app",
            "worker",
            "--pool=threads",
            "-c",
            "2",
            "-n",
            &py,
            "-Q",
            &pyq,
            "--without-gossip",
            "--without-mingle",
            "--loglevel=info",
        ],
    ));
    assert!(ours.wait_log("worker ready", T), "our worker did not start:\n{}", ours.log());
    assert!(theirs.wait_log(&format!("{py} ready."), T), "the Python worker did not start:\n{}", theirs.log());
    let app = s.app().await;

    // Idle: every inspect command, to both workers at once.
    let idle = ["ping", "clock", "conf", "registered", "report", "stats", "active_queues", "revoked"];
    let idle2 = ["active", "reserved", "scheduled"];
    let mut items: Vec<Value> =
        idle.iter().chain(&idle2).map(|cmd| cli(&["inspect", cmd, "--json", "-t", "10", "-d", &both])).collect();
    items.push(cli(&["inspect", "query_task", "no-such-task-id", "--json", "-t", "10", "-d", &both]));
    let out = s.batch(python, &items);
    let pairs: Vec<(Reply, Reply)> = out.iter().map(|o| (reply_of(o, &rs), reply_of(o, &py))).collect();

    c.check("inspect ping", pairs[0].0.clone().and_then(|r| expect_eq(&r, &json!({"ok": "pong"}))));
    c.check(
        "inspect clock",
        both_ok(&pairs[1]).and_then(|(o, p)| {
            same_keys(&o, &p)?;
            ensure(o["clock"].is_u64(), || format!("`clock` is not a number: {o}"))
        }),
    );
    c.check(
        "inspect conf",
        pairs[2].0.clone().and_then(|o| {
            no_error(&o)?;
            ensure(o.as_object().is_some_and(|m| !m.is_empty()), || format!("not a non-empty object: {o}"))
        }),
    );
    let registered: Option<Vec<String>> = pairs[3].0.as_ref().ok().and_then(|o| serde_json::from_value(o.clone()).ok());
    c.check(
        "inspect registered",
        pairs[3].0.clone().and_then(|o| {
            let names: Vec<&str> =
                o.as_array().map(|a| a.iter().filter_map(Value::as_str).collect()).unwrap_or_default();
            ensure(names.contains(&"add") && names.contains(&"sleep"), || format!("not a list with add and sleep: {o}"))
        }),
    );
    c.check(
        "inspect report",
        both_ok(&pairs[4]).and_then(|(o, p)| {
            has_keys_of(&o, &p)?;
            ensure(o["ok"].is_string(), || format!("`ok` is not a string: {o}"))
        }),
    );
    c.check("inspect stats", both_ok(&pairs[5]).and_then(|(o, p)| stats_shape(&o, &p, 2)));
    c.check(
        "inspect active_queues",
        both_ok(&pairs[6]).and_then(|(o, p)| {
            let mine = find_queue(&o, &ourq).ok_or_else(|| format!("no entry named {ourq}: {o}"))?;
            let theirs = find_queue(&p, &pyq).ok_or_else(|| format!("Python lists no {pyq}: {p}"))?;
            has_keys_of(mine, theirs)?;
            has_keys_of(&mine["exchange"], &theirs["exchange"]).map_err(|e| format!("exchange: {e}"))?;
            expect_eq(&mine["routing_key"], &json!(ourq))
        }),
    );
    c.check("inspect revoked", pairs[7].0.clone().and_then(|o| is_list(&o)));
    for (i, cmd) in idle2.iter().enumerate() {
        c.check(&format!("inspect {cmd} (idle)"), pairs[8 + i].0.clone().and_then(|o| expect_eq(&o, &json!([]))));
    }
    c.check("inspect query_task (an unknown id)", pairs[11].0.clone().and_then(|o| expect_eq(&o, &json!({}))));

    // Under load: two long tasks running on each worker, one more waiting for a slot (reserved),
    // and a countdown task (scheduled) sent by Celery, so with Celery's eta.
    let sleeps: Vec<AsyncResult> = {
        let mut v = Vec::new();
        for _ in 0..2 {
            v.push(app.send(Signature::by_name("sleep").args(json!([20000])).queue(&ourq)).await.expect("send"));
        }
        v
    };
    let waiting = app.send(Signature::by_name("add").args(json!([1, 1])).queue(&ourq)).await.expect("send");
    let sent = s.batch(
        python,
        &[
            json!({"send": "sleep", "args": [10000], "queue": pyq}),
            json!({"send": "sleep", "args": [10000], "queue": pyq}),
            json!({"send": "add", "args": [1, 1], "queue": pyq}),
            json!({"send": "add", "args": [2, 2], "queue": pyq, "countdown": 300}),
            json!({"send": "add", "args": [2, 2], "queue": ourq, "countdown": 300}),
        ],
    );
    let scheduled_id = sent[4]["id"].as_str().expect("an id").to_owned();
    let busy = |host: &str| {
        let host = host.to_owned();
        let app = app.clone();
        async move {
            let deadline = Instant::now() + T;
            while Instant::now() < deadline {
                let r = celery_worker::control::request(&app, "active", json!({}), Some(vec![host.clone()]), EFFECT)
                    .await
                    .unwrap_or_default();
                if r.iter().any(|(_, v)| v.as_array().is_some_and(|a| a.len() >= 2)) {
                    return true;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            false
        }
    };
    let ours_busy = busy(&rs).await;
    assert!(busy(&py).await, "the Python worker never ran two tasks at once:\n{}", theirs.log());
    c.check("our worker runs two tasks at once (seen by `active`)", ensure(ours_busy, || ours.log_tail()));
    // Celery's producer publishes no wake-up: on Redis our worker finds its countdown task by the
    // probe of its lists (within 100 ms here). Wait until it holds it before the CLI looks.
    let holds_scheduled = {
        let deadline = Instant::now() + T;
        let mut seen = false;
        while !seen && Instant::now() < deadline {
            let r = celery_worker::control::request(&app, "scheduled", json!({}), Some(vec![rs.to_string()]), EFFECT)
                .await
                .unwrap_or_default();
            seen = r.iter().any(|(_, v)| {
                v.as_array().is_some_and(|a| a.iter().any(|e| e["request"]["id"] == scheduled_id.as_str()))
            });
            if !seen {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        seen
    };
    c.check(
        "our worker holds Celery's countdown task (seen by `scheduled`)",
        ensure(holds_scheduled, || ours.log_tail()),
    );
    let ids: Vec<String> = sleeps.iter().map(|r| r.id().to_owned()).collect();
    let loaded = s.batch(
        python,
        &[
            cli(&["inspect", "active", "--json", "-t", "10", "-d", &both]),
            cli(&["inspect", "reserved", "--json", "-t", "10", "-d", &both]),
            cli(&["inspect", "scheduled", "--json", "-t", "10", "-d", &both]),
            cli(&["inspect", "query_task", &ids[0], waiting.id(), "--json", "-t", "10", "-d", &rs]),
        ],
    );
    let pairs: Vec<(Reply, Reply)> = loaded.iter().map(|o| (reply_of(o, &rs), reply_of(o, &py))).collect();
    c.check(
        "inspect active (two running)",
        both_ok(&pairs[0]).and_then(|(o, p)| {
            let listed: BTreeSet<&str> = requests(&o)?.iter().filter_map(|r| r["id"].as_str()).collect();
            ensure(listed == ids.iter().map(String::as_str).collect(), || format!("expected {ids:?}: {o}"))?;
            every_request_like(&o, &p, |r| r)
        }),
    );
    c.check(
        "inspect reserved (one waiting for a slot)",
        both_ok(&pairs[1]).and_then(|(o, p)| {
            ensure(requests(&o)?.iter().any(|r| r["id"] == waiting.id()), || format!("no {}: {o}", waiting.id()))?;
            every_request_like(&o, &p, |r| r)
        }),
    );
    c.check(
        "inspect scheduled (a countdown task)",
        both_ok(&pairs[2]).and_then(|(o, p)| {
            let entries = requests(&o)?;
            let entry = entries
                .iter()
                .find(|e| e["request"]["id"] == scheduled_id.as_str())
                .ok_or_else(|| format!("no {scheduled_id}: {o}"))?;
            has_keys(entry, &["eta", "priority", "request"])?;
            if let Some(theirs) = requests(&p)?.first() {
                has_keys_of(entry, theirs)?;
            }
            ensure(entry["eta"].as_str().is_some_and(|e| chrono::DateTime::parse_from_rfc3339(e).is_ok()), || {
                format!("`eta` is not an ISO-8601 time: {entry}")
            })?;
            every_request_like(&o, &p, |e| &e["request"])
        }),
    );
    c.check(
        "inspect query_task (active, reserved)",
        pairs[3].0.clone().and_then(|o| {
            for (id, state) in [(ids[0].as_str(), "active"), (waiting.id(), "reserved")] {
                let entry = &o[id];
                ensure(entry[0] == state && entry[1]["id"] == id, || {
                    format!("expected {id}: [{state}, {{id...}}]: {o}")
                })?;
            }
            Ok(())
        }),
    );

    // Terminate the running ones, revoke the scheduled one.
    let ended = s.batch(
        python,
        &[
            cli(&["control", "terminate", "SIGKILL", &ids[0], &ids[1], "--json", "-t", "10", "-d", &rs]),
            cli(&["control", "revoke", &scheduled_id, "--json", "-t", "10", "-d", &rs]),
            cli(&["inspect", "revoked", "--json", "-t", "10", "-d", &rs]),
        ],
    );
    c.check(
        "control terminate SIGKILL <ids>",
        reply_of(&ended[0], &rs).and_then(|o| {
            let ok = ok_text(&o)?;
            ensure(ok.starts_with("terminate:") && ids.iter().all(|id| ok.contains(id.as_str())), || {
                format!("expected `terminate: <both ids>`: {o}")
            })
        }),
    );
    for (i, r) in sleeps.iter().enumerate() {
        let state = state_within(r, EFFECT, TaskState::Revoked).await;
        c.check(&format!("terminated task {i} is REVOKED"), state);
    }
    c.check(
        "control revoke <id>",
        reply_of(&ended[1], &rs).and_then(|o| {
            let ok = ok_text(&o)?;
            ensure(ok.contains("flagged as revoked") && ok.contains(&scheduled_id), || format!("{o}"))
        }),
    );
    c.check(
        "inspect revoked (lists it)",
        reply_of(&ended[2], &rs).and_then(|o| {
            ensure(o.as_array().is_some_and(|a| a.iter().any(|v| v == scheduled_id.as_str())), || format!("{o}"))
        }),
    );
    c.check("the waiting task runs once a slot is free", get_value(&waiting, T, json!(2)).await);

    // Control commands with Celery's replies, and their effects.
    let add_ok = cli(&["control", "add_consumer", &extraq, "--json", "-t", "10", "-d", &rs]);
    let steer = s.batch(
        python,
        &[
            cli(&["control", "rate_limit", "add", "1000/s", "--json", "-t", "10", "-d", &both]),
            cli(&["control", "rate_limit", "no_such_task", "1/s", "--json", "-t", "10", "-d", &both]),
            cli(&["control", "time_limit", "sleep", "1", "2", "--json", "-t", "10", "-d", &both]),
            cli(&["control", "time_limit", "no_such_task", "1", "--json", "-t", "10", "-d", &both]),
            cli(&["control", "enable_events", "--json", "-t", "10", "-d", &rs]),
            cli(&["control", "disable_events", "--json", "-t", "10", "-d", &rs]),
            cli(&["control", "heartbeat", "--json", "-t", "10", "-d", &both]),
            cli(&["control", "pool_grow", "1", "--json", "-t", "10", "-d", &rs]),
            cli(&["inspect", "stats", "--json", "-t", "10", "-d", &rs]),
            cli(&["control", "pool_shrink", "1", "--json", "-t", "10", "-d", &rs]),
            cli(&["inspect", "stats", "--json", "-t", "10", "-d", &both]),
            cli(&["control", "autoscale", "4", "1", "--json", "-t", "10", "-d", &both]),
            add_ok,
            cli(&["control", "election", "--json", "-t", "10", "-d", &both]),
            json!({"broadcast": "election", "arguments": {"id": "e1", "topic": "tools", "action": null}, "destination": [rs]}),
            cli(&["control", "pool_restart", "--json", "-t", "10", "-d", &both]),
            cli(&["result", waiting.id()]),
        ],
    );
    let r = |i: usize| reply_of(&steer[i], &rs);
    c.check(
        "control rate_limit add 1000/s",
        r(0).and_then(|o| expect_eq(&o, &json!({"ok": "new rate limit set successfully"}))),
    );
    c.check("control rate_limit <unknown task>", r(1).and_then(|o| is_error(&o)));
    c.check(
        "control time_limit sleep 1 2",
        r(2).and_then(|o| expect_eq(&o, &json!({"ok": "time limits set successfully"}))),
    );
    c.check("control time_limit <unknown task>", r(3).and_then(|o| is_error(&o)));
    c.check("control enable_events", r(4).and_then(|o| ok_containing(&o, "enabled")));
    c.check("control disable_events", r(5).and_then(|o| ok_containing(&o, "disabled")));
    c.check("control heartbeat", r(6).and_then(|o| no_error(&o)));
    c.check("control pool_grow 1", r(7).and_then(|o| expect_eq(&o, &json!({"ok": "pool will grow"}))));
    c.check("pool_grow: stats shows 3", r(8).and_then(|o| expect_eq(&o["pool"]["max-concurrency"], &json!(3))));
    c.check("control pool_shrink 1", r(9).and_then(|o| expect_eq(&o, &json!({"ok": "pool will shrink"}))));
    c.check("pool_shrink: stats shows 2", r(10).and_then(|o| expect_eq(&o["pool"]["max-concurrency"], &json!(2))));
    c.check(
        "inspect stats (after tasks ran)",
        both_ok(&(r(10), reply_of(&steer[10], &py))).and_then(|(o, p)| stats_shape(&o, &p, 2)),
    );
    c.check(
        "inspect stats: `total` counts by task name",
        r(10).and_then(|o| {
            let total = o["total"].as_object().ok_or_else(|| format!("`total` is not an object: {o}"))?;
            let known = registered.clone().unwrap_or_default();
            ensure(total.contains_key("add") && total.keys().all(|k| known.iter().any(|n| n == k)), || {
                format!("expected registered task names, `add` among them: {}", o["total"])
            })
        }),
    );
    // Started without --autoscale: Celery's answer is its error, the same as the Python worker's.
    c.check(
        "control autoscale 4 1 (no autoscaler: Celery's error)",
        both_ok(&(r(11), reply_of(&steer[11], &py))).and_then(|(o, p)| expect_eq(&o, &p)),
    );
    c.check(
        "control add_consumer <queue>",
        r(12).and_then(|o| expect_eq(&o, &json!({"ok": format!("add consumer {extraq}")}))),
    );
    c.check("control election (no arguments, as the CLI sends it)", r(13).and_then(|o| not_unknown(&o)));
    c.check(
        "control election (id, topic, action)",
        steer[14]["replies"]
            .as_array()
            .and_then(|a| a.iter().find_map(|m| m.get(&rs).cloned()))
            .ok_or_else(|| format!("no reply from {rs}: {}", steer[14]))
            .and_then(|o| not_unknown(&o)),
    );
    c.check(
        "control pool_restart (nothing to restart: Celery's error)",
        both_ok(&(r(15), reply_of(&steer[15], &py))).and_then(|(o, p)| expect_eq(&o, &p)),
    );

    c.check(
        "celery result <id>",
        ensure(steer[16]["exit"] == 0 && steer[16]["stdout"].as_str().map(str::trim) == Some("2"), || {
            format!("{}", steer[16])
        }),
    );

    let mut listed = Value::Null;
    let deadline = Instant::now() + EFFECT;
    while find_queue(&listed, &extraq).is_none() && Instant::now() < deadline {
        listed = active_queues(&app, &rs).await;
    }
    c.check(
        "add_consumer: active_queues lists the queue",
        ensure(find_queue(&listed, &extraq).is_some(), || format!("{listed}")),
    );
    let extra = app.send(Signature::by_name("add").args(json!([3, 4])).queue(&extraq)).await.expect("send");
    c.check("add_consumer: a task on the added queue runs", get_value(&extra, EFFECT, json!(7)).await);
    let cancel = s.batch(python, &[cli(&["control", "cancel_consumer", &extraq, "--json", "-t", "10", "-d", &rs])]);
    c.check(
        "control cancel_consumer <queue>",
        reply_of(&cancel[0], &rs)
            .and_then(|o| expect_eq(&o, &json!({"ok": format!("no longer consuming from {extraq}")}))),
    );
    let deadline = Instant::now() + EFFECT;
    let mut removed = false;
    while !removed && Instant::now() < deadline {
        listed = active_queues(&app, &rs).await;
        removed = listed.is_array() && find_queue(&listed, &extraq).is_none();
    }
    c.check("cancel_consumer: active_queues no longer lists it", ensure(removed, || format!("{listed}")));
    let limited = app.send(Signature::by_name("sleep").args(json!([10000])).queue(&ourq)).await.expect("send");
    c.check(
        "time_limit: a task over its new hard limit fails",
        failed_with(&limited, EFFECT, "TimeLimitExceeded").await,
    );

    // Python callers: exceptions and children from our worker; our countdown on a Python worker.
    let script = |args: &[&str]| s.python(python, args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn();
    let expected = json!({
        "revoked": "celery.exceptions.TaskRevokedError",
        "expired": "celery.exceptions.TaskRevokedError",
        "time_limit": "celery.exceptions.TimeLimitExceeded",
        "unregistered": "celery.exceptions.NotRegistered",
        "wrong_arguments": "builtins.TypeError",
        "chord": "celery.exceptions.ChordError",
    });
    let exceptions = script(&["tools_app.py", "exceptions", &ourq, &rs, &expected.to_string()]);
    let link = script(&["tools_app.py", "link", &ourq]);
    let countdown_from = chrono::Utc::now();
    let on_python =
        app.send(Signature::by_name("add").args(json!([5, 6])).queue(&pyq).countdown(Duration::from_secs(2))).await;
    let on_python = on_python.expect("send");
    let ran = get_value(&on_python, Duration::from_secs(15), json!(11)).await;
    let done = on_python.info().await.ok().flatten().and_then(|m| m.date_done);
    let ran = ran.and_then(|()| {
        let done = done.ok_or("no date_done")?;
        let at = chrono::DateTime::parse_from_rfc3339(&done)
            .or_else(|_| {
                chrono::NaiveDateTime::parse_from_str(&done, "%Y-%m-%dT%H:%M:%S%.f").map(|t| t.and_utc().into())
            })
            .map_err(|e| format!("date_done {done}: {e}"))?;
        let early = countdown_from + chrono::Duration::milliseconds(1900);
        ensure(at >= early, || format!("done at {at}, before its eta ({early})"))
    });
    c.check(
        "a Python worker runs our countdown task at its eta",
        ran.map_err(|e| format!("{e}\nPython worker's log (tail):\n{}", tail(&theirs.log(), 20))),
    );

    let got = script_json(exceptions.expect("start the exceptions script"));
    for (case, class) in expected.as_object().into_iter().flatten() {
        c.check(
            &format!(
                "Python's get() on our {case} task raises what `except {}` catches",
                class.as_str().unwrap_or_default()
            ),
            got.clone().and_then(|g| ensure(g[case]["caught"] == true, || format!("it raised {}", g[case]["raised"]))),
        );
    }
    c.check(
        "a link callback from Python shows in AsyncResult.children",
        script_json(link.expect("start the link script")).and_then(|g| {
            expect_eq(&g["result"], &json!(4))?;
            ensure(g["children"].as_array().is_some_and(|a| !a.is_empty()), || format!("no children: {g}"))?;
            expect_eq(&g["child_result"], &json!(14))
        }),
    );
    c.finish(|| format!("our worker's log (tail):\n{}", ours.log_tail()));
}

// ---------------------------------------------------------------------------------------------
// 2. Flower.

async fn flower(python: &Path, s: &Servers, screenshot: bool) {
    let mut c = Checks::new(format!("Flower over {}", s.kind));
    let rs = format!("rs-{}@tools", short());
    let q = format!("tools-fl-{}", short());
    let q2 = format!("tools-fl2-{}", short());
    let port = free_port();

    let dump = Service::start(&mut s.python(python, &["-m", "celery", "-A", "tools_app", "events", "--dump"]));
    let flower = Service::start(
        s.python(
            python,
            &[
                "-m",
                "celery",
                "-A",
                "tools_app",
                "flower",
                &format!("--port={port}"),
                "--address=127.0.0.1",
                "--inspect_timeout=3000",
                "--enable_events=False",
            ],
        )
        .env("FLOWER_UNAUTHENTICATED_API", "true"),
    );
    let mut ours = s.our_worker(&["-E", "-c", "2", "-n", &rs, "-Q", &q]);
    assert!(ours.wait_log("worker ready", T), "our worker did not start:\n{}", ours.log());
    assert!(
        wait_until(T, || http(port, "GET", "/healthcheck", "").is_ok_and(|(code, _)| code == 200)),
        "Flower did not start:\n{}",
        flower.log()
    );
    assert!(dump.wait_log("starting capture", T), "celery events did not start:\n{}", dump.log());
    let app = s.app().await;
    let web = |method: &str, path: &str, form: &str| http(port, method, path, form);
    let api_json = |path: &str| -> Result<Value, String> {
        let (code, body) = web("GET", path, "")?;
        ensure(code == 200, || format!("GET {path}: HTTP {code}: {}", clip(&body)))?;
        serde_json::from_str(&body).map_err(|e| format!("GET {path}: {e}: {}", clip(&body)))
    };

    // The workers list, refreshed by Flower's own inspect calls.
    let mut listed = Value::Null;
    let seen = wait_until(T, || {
        listed = api_json(&format!("/api/workers?refresh=1&workername={rs}")).unwrap_or(Value::Null);
        listed[&rs]["stats"].is_object()
    });
    c.check("/api/workers lists our worker with stats", ensure(seen, || format!("{listed}\n{}", flower.log())));
    let worker = listed[&rs].clone();
    c.check("/api/workers: registered", {
        let names: Vec<&str> =
            worker["registered"].as_array().map(|a| a.iter().filter_map(Value::as_str).collect()).unwrap_or_default();
        ensure(names.contains(&"add"), || format!("{}", worker["registered"]))
    });
    c.check(
        "/api/workers: active_queues",
        find_queue(&worker["active_queues"], &q).ok_or_else(|| format!("{}", worker["active_queues"])).and_then(|e| {
            has_keys(
                e,
                &[
                    "name",
                    "exchange",
                    "routing_key",
                    "durable",
                    "exclusive",
                    "auto_delete",
                    "no_ack",
                    "alias",
                    "queue_arguments",
                    "binding_arguments",
                ],
            )
        }),
    );
    c.check(
        "/api/workers: conf",
        no_error(&worker["conf"]).and_then(|()| ensure(worker["conf"].is_object(), || format!("{}", worker["conf"]))),
    );
    c.check("/api/workers: stats.pool", expect_eq(&worker["stats"]["pool"]["max-concurrency"], &json!(2)));

    let page = |path: &str, needle: &str| -> Result<(), String> {
        let (code, body) = web("GET", path, "")?;
        ensure(code == 200, || format!("GET {path}: HTTP {code}: {}", clip(&body)))?;
        ensure(body.contains(needle), || format!("GET {path}: no {needle:?} in the page"))
    };
    c.check("the worker page /worker/<name>", page(&format!("/worker/{rs}"), &rs));
    let broker_needle = if s.kind == "redis" { q.as_str() } else { "Broker" };
    c.check("the broker page /broker", page("/broker", broker_needle));
    c.check(
        "/api/queues/length",
        api_json("/api/queues/length").and_then(|v| {
            let queues = v["active_queues"].as_array().ok_or_else(|| format!("{v}"))?;
            if s.kind == "redis" {
                ensure(queues.iter().any(|e| e["name"] == q.as_str() && e["messages"].is_u64()), || format!("{v}"))
            } else {
                Ok(())
            }
        }),
    );

    // Our tasks, seen through our events.
    let done = app.send(Signature::by_name("add").args(json!([2, 3])).queue(&q)).await.expect("send");
    assert_eq!(done.get::<i64>(T).await.ok(), Some(5), "{}", ours.log());
    let task_state = |id: &str| -> Option<String> {
        api_json(&format!("/api/task/info/{id}")).ok().and_then(|v| v["state"].as_str().map(str::to_owned))
    };
    let state_becomes = |id: &str, want: &str, within: Duration| -> Result<(), String> {
        let mut last = None;
        let ok = wait_until(within, || {
            last = task_state(id);
            last.as_deref() == Some(want)
        });
        ensure(ok, || format!("Flower's state for {id} is {last:?}, not {want}"))
    };
    c.check("/api/task/info: a task of ours SUCCESS", state_becomes(done.id(), "SUCCESS", EFFECT));
    c.check(
        "/api/tasks lists it",
        api_json("/api/tasks").and_then(|v| ensure(v.get(done.id()).is_some(), || clip(&v.to_string()))),
    );
    c.check("the task page /task/<id>", page(&format!("/task/{}", done.id()), done.id()));
    let bad = app.send(Signature::by_name("add").args(json!([1, 2, 3])).queue(&q)).await.expect("send");
    let _ = bad.wait(T).await;
    c.check("a task with wrong arguments ends FAILURE in Flower", state_becomes(bad.id(), "FAILURE", EFFECT));

    if screenshot {
        c.check("a screenshot of the worker page in Chromium", screenshot_worker_page(port, &rs));
    }

    // Revoke with terminate, as Flower's button sends it.
    let long = app.send(Signature::by_name("sleep").args(json!([30000])).queue(&q)).await.expect("send");
    let started = state_becomes(long.id(), "STARTED", T);
    assert!(started.is_ok(), "{started:?}\n{}", ours.log());
    c.check(
        "POST /api/task/revoke/<id>?terminate=true",
        web("POST", &format!("/api/task/revoke/{}?terminate=true", long.id()), "")
            .and_then(|(code, body)| ensure(code == 200, || format!("HTTP {code}: {}", clip(&body)))),
    );
    c.check("terminated through Flower: REVOKED", state_within(&long, EFFECT, TaskState::Revoked).await);
    c.check("terminated through Flower: Flower shows REVOKED", state_becomes(long.id(), "REVOKED", EFFECT));

    // Pool and queue buttons.
    let post_ok = |path: &str, form: &str, message: &str| -> Result<(), String> {
        let (code, body) = web("POST", path, form)?;
        ensure(code == 200, || format!("POST {path}: HTTP {code}: {}", clip(&body)))?;
        let v: Value = serde_json::from_str(&body).map_err(|e| format!("{e}: {body}"))?;
        expect_eq(&v["message"], &json!(message))
    };
    let concurrency = || {
        let app = app.clone();
        let rs = rs.clone();
        async move {
            celery_worker::control::request(&app, "stats", json!({}), Some(vec![rs]), EFFECT)
                .await
                .ok()
                .and_then(|r| r.into_iter().next())
                .map(|(_, v)| v["pool"]["max-concurrency"].clone())
                .unwrap_or(Value::Null)
        }
    };
    c.check(
        "POST /api/worker/pool/grow?n=2",
        post_ok(&format!("/api/worker/pool/grow/{rs}?n=2"), "", &format!("Growing '{rs}' worker's pool by 2")),
    );
    c.check("pool grown through Flower: 4", expect_eq(&concurrency().await, &json!(4)));
    c.check(
        "POST /api/worker/pool/shrink?n=2",
        post_ok(&format!("/api/worker/pool/shrink/{rs}?n=2"), "", &format!("Shrinking '{rs}' worker's pool by 2")),
    );
    c.check("pool shrunk through Flower: 2", expect_eq(&concurrency().await, &json!(2)));
    // Autoscale: refused by a worker started without --autoscale, as Celery refuses it; applied by
    // one started with it.
    c.check(
        "POST /api/worker/pool/autoscale to a worker without --autoscale: Celery's refusal",
        web("POST", &format!("/api/worker/pool/autoscale/{rs}?min=1&max=3"), "").and_then(|(code, body)| {
            ensure(code == 403 && body.contains("Autoscale not enabled"), || format!("HTTP {code}: {}", clip(&body)))
        }),
    );
    let scaled_name = format!("rs-{}@tools", short());
    let scaled_queue = format!("{q}-scaled");
    let scaled = s.our_worker(&["-E", "-n", &scaled_name, "-Q", &scaled_queue, "--autoscale", "4,1"]);
    let autoscaled =
        ensure(scaled.wait_log("worker ready", T), || format!("`worker --autoscale 4,1`: {}", scaled.log_tail()))
            .and_then(|()| {
                let mut listed = Value::Null;
                let known = wait_until(T, || {
                    listed =
                        api_json(&format!("/api/workers?refresh=1&workername={scaled_name}")).unwrap_or(Value::Null);
                    listed[&scaled_name]["stats"].is_object()
                });
                ensure(known, || format!("Flower does not list {scaled_name}: {listed}"))
            })
            .and_then(|()| {
                post_ok(
                    &format!("/api/worker/pool/autoscale/{scaled_name}?min=1&max=3"),
                    "",
                    &format!("Autoscaling '{scaled_name}' worker (min=1, max=3)"),
                )
            });
    c.check("POST /api/worker/pool/autoscale?min=1&max=3 to a worker started with --autoscale 4,1", autoscaled);
    drop(scaled);
    c.check(
        "POST /api/worker/queue/add-consumer",
        post_ok(&format!("/api/worker/queue/add-consumer/{rs}?queue={q2}"), "", &format!("add consumer {q2}")),
    );
    let extra = app.send(Signature::by_name("add").args(json!([4, 4])).queue(&q2)).await.expect("send");
    c.check("a task on the queue added through Flower runs", get_value(&extra, EFFECT, json!(8)).await);
    c.check(
        "POST /api/worker/queue/cancel-consumer",
        post_ok(
            &format!("/api/worker/queue/cancel-consumer/{rs}?queue={q2}"),
            "",
            &format!("no longer consuming from {q2}"),
        ),
    );
    let mut queues = Value::Null;
    let gone = wait_until(EFFECT, || {
        queues = api_json(&format!("/api/workers?refresh=1&workername={rs}")).unwrap_or(Value::Null)[&rs]
            ["active_queues"]
            .clone();
        queues.is_array() && find_queue(&queues, &q2).is_none() && find_queue(&queues, &q).is_some()
    });
    c.check("Flower's worker no longer lists the cancelled queue", ensure(gone, || format!("{queues}")));
    c.check(
        "POST /api/task/rate-limit/add",
        post_ok(
            "/api/task/rate-limit/add",
            &format!("ratelimit=1000%2Fs&workername={rs}"),
            "new rate limit set successfully",
        ),
    );
    c.check(
        "POST /api/task/timeout/sleep",
        post_ok("/api/task/timeout/sleep", &format!("soft=1&hard=2&workername={rs}"), "time limits set successfully"),
    );
    let limited = app.send(Signature::by_name("sleep").args(json!([10000])).queue(&q)).await.expect("send");
    c.check(
        "time limit set through Flower fails a longer task",
        failed_with(&limited, EFFECT, "TimeLimitExceeded").await,
    );

    // Events off, then on again: Flower never hears of the task run in between.
    let events = |cmd: &str| {
        s.python(python, &["-m", "celery", "-A", "tools_app", "control", cmd, "--json", "-t", "10", "-d", &rs])
            .output()
            .expect("celery control")
    };
    c.check(
        "celery control disable_events",
        cli_reply(&events("disable_events"), &rs).and_then(|o| ok_containing(&o, "disabled")),
    );
    let quiet = app.send(Signature::by_name("add").args(json!([100, 1])).queue(&q)).await.expect("send");
    let quiet_ran = quiet.get::<i64>(T).await;
    c.check(
        "celery control enable_events",
        cli_reply(&events("enable_events"), &rs).and_then(|o| ok_containing(&o, "enabled")),
    );
    let loud = app.send(Signature::by_name("add").args(json!([100, 2])).queue(&q)).await.expect("send");
    assert_eq!(loud.get::<i64>(T).await.ok(), Some(102), "{}", ours.log());
    let heard = state_becomes(loud.id(), "SUCCESS", EFFECT);
    c.check("events enabled again: Flower sees the next task", heard.clone());
    c.check(
        "events disabled: Flower never saw the task run meanwhile",
        ensure(quiet_ran.is_ok(), || format!("{quiet_ran:?}")).and_then(|()| {
            ensure(heard.is_ok() && task_state(quiet.id()).is_none(), || format!("Flower knows {}", quiet.id()))
        }),
    );

    // Shutdown: a reply, the process ends, and the worker-offline event (Kombu subscribes on Redis
    // only once it polls: the dump must have heard our worker before).
    let ours_prefix = format!("{rs} [");
    c.check(
        "celery events hears our worker",
        ensure(wait_until(T, || dump.log().lines().any(|l| l.starts_with(&ours_prefix))), || tail(&dump.log(), 15)),
    );
    let out = s
        .python(python, &["-m", "celery", "-A", "tools_app", "control", "shutdown", "--json", "-t", "10", "-d", &rs])
        .output()
        .expect("celery control shutdown");
    c.check(
        "celery control shutdown: our reply",
        cli_reply(&out, &rs).and_then(|o| no_error(&o).and_then(|()| ok_text(&o).map(drop))),
    );
    let exited = ours.wait_exit(T);
    c.check("celery control shutdown: the worker exits", ensure(exited.is_some(), || ours.log_tail()));
    c.check(
        "celery events sees worker-offline",
        ensure(
            wait_until(EFFECT, || dump.log().lines().any(|l| l.starts_with(&ours_prefix) && l.contains("] shutdown"))),
            || tail(&dump.log(), 15),
        ),
    );
    c.finish(|| {
        format!("our worker's log (tail):\n{}\nFlower's log (tail):\n{}", ours.log_tail(), tail(&flower.log(), 40))
    });
}

/// Loads Flower's page of our worker in headless Chromium and saves a screenshot.
fn screenshot_worker_page(port: u16, worker: &str) -> Result<(), String> {
    let Some(pw) = browser::playwright(SUITE) else {
        return Ok(());
    };
    let script = browser::script(&pw, "flower.mjs");
    let dir = std::env::temp_dir().join(format!("flower-shot-{}", short()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let shot = dir.join("flower-worker.png");
    let url = format!("http://127.0.0.1:{port}/worker/{worker}");
    let out = Command::new("node")
        .arg(&script)
        .arg(&url)
        .arg(worker)
        .arg(&shot)
        .output()
        .map_err(|e| format!("node: {e}"))?;
    let report = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let png = std::fs::read(&shot).unwrap_or_default();
    let _ = std::fs::remove_dir_all(&dir);
    ensure(out.status.success(), || report.clone())?;
    ensure(png.starts_with(b"\x89PNG"), || format!("no screenshot: {report}"))?;
    if let Ok(keep) = std::env::var("CELERY_RS_SCREENSHOT_DIR") {
        let keep = PathBuf::from(keep);
        std::fs::create_dir_all(&keep).map_err(|e| format!("{}: {e}", keep.display()))?;
        let to = keep.join("flower-worker.png");
        std::fs::write(&to, &png).map_err(|e| format!("{}: {e}", to.display()))?;
        eprintln!("{SUITE}: saved {}", to.display());
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 3. Purge with countdown tasks.

async fn purge(python: &Path, s: &Servers) {
    let mut c = Checks::new(format!("purge over {}", s.kind));
    let q = format!("tools-purge-{}", short());
    let app = s.app().await;
    let countdown = Duration::from_secs(1);
    let mut purged = Vec::new();
    for i in 0..5 {
        let sig = Signature::by_name("add").args(json!([i, i])).queue(&q).countdown(countdown);
        purged.push(app.send(sig).await.expect("send"));
    }
    let due = Instant::now() + countdown;
    let out = s.python(python, &["-m", "celery", "-A", "tools_app", "purge", "-f", "-Q", &q]).output().expect("purge");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    c.check(
        "celery purge -f -Q <queue> counts our 5 countdown tasks",
        ensure(out.status.success() && text.contains("Purged 5 messages"), || {
            format!("{text}{}", String::from_utf8_lossy(&out.stderr))
        }),
    );

    // Past their due time, our worker starts; a later countdown task runs, and none of the purged.
    assert!(wait_until(T, || Instant::now() > due + Duration::from_millis(200)));
    let worker = s.our_worker(&["-Q", &q, "-c", "2", "-n", &format!("rs-{}@tools", short())]);
    assert!(worker.wait_log("worker ready", T), "{}", worker.log());
    let marker = app.send(Signature::by_name("add").args(json!([100, 100])).queue(&q).countdown(countdown)).await;
    c.check("a countdown task sent after the purge runs", get_value(&marker.expect("send"), T, json!(200)).await);
    let last = app.send(Signature::by_name("add").args(json!([1, 2])).queue(&q)).await.expect("send");
    c.check("a task sent after it runs", get_value(&last, T, json!(3)).await);
    let mut ran = Vec::new();
    for r in &purged {
        if r.state().await.map(|s| s != TaskState::Pending).unwrap_or(true) {
            ran.push(r.id().to_owned());
        }
    }
    c.check("none of the purged countdown tasks ran", ensure(ran.is_empty(), || format!("these ran: {ran:?}")));
    c.finish(|| format!("our worker's log (tail):\n{}", worker.log_tail()));
}

// ---------------------------------------------------------------------------------------------
// Servers, processes and the Python side.

/// The servers one test owns.
struct Servers {
    /// `redis` or `rabbitmq`.
    kind: &'static str,
    /// Our broker URL (the key prefix as an option on Redis).
    broker: String,
    /// Our result backend URL (with the key prefix).
    backend: String,
    /// Python's broker URL; the prefix goes as `CELERY_KEYPREFIX`.
    py_broker: String,
    /// The key prefix, whose keys are deleted when the test ends.
    redis: RedisEnv,
    /// The RabbitMQ vhost, deleted when the test ends (after its processes).
    _vhost: Option<AmqpVhost>,
}

impl Servers {
    fn redis() -> Option<Servers> {
        redis_available(SUITE).then(|| {
            let redis = RedisEnv::new(60.0);
            Servers {
                kind: "redis",
                broker: redis.broker.clone(),
                backend: redis.backend.clone(),
                py_broker: format!("{REDIS}/{TEST_DB}"),
                redis,
                _vhost: None,
            }
        })
    }

    fn amqp() -> Option<Servers> {
        if !amqp_available(SUITE) || !redis_available(SUITE) {
            return None;
        }
        let vhost = AmqpVhost::new();
        let redis = RedisEnv::new(60.0);
        Some(Servers {
            kind: "rabbitmq",
            broker: vhost.url(),
            backend: redis.backend.clone(),
            py_broker: vhost.url(),
            redis,
            _vhost: Some(vhost),
        })
    }

    /// An app of ours on these servers.
    async fn app(&self) -> App {
        celery_worker::connect(&self.broker, &self.backend).await.expect("connect")
    }

    /// Our worker (the demo binary) with these `worker` options.
    fn our_worker(&self, options: &[&str]) -> DemoProcess {
        let mut args = vec!["worker"];
        args.extend_from_slice(options);
        DemoProcess::start_urls(&self.broker, &self.backend, &args)
    }

    /// `python <args>` in `tests/python`, pointed at these servers.
    fn python(&self, python: &Path, args: &[&str]) -> Command {
        let mut cmd = python::command(python, args);
        cmd.env("CELERY_BROKER_URL", &self.py_broker)
            .env("CELERY_RESULT_BACKEND", format!("{REDIS}/{TEST_DB}"))
            .env("CELERY_KEYPREFIX", &self.redis.prefix);
        cmd
    }

    /// Runs `items` through `tools_app.py batch` (one Python process) and returns their outcomes.
    fn batch(&self, python: &Path, items: &[Value]) -> Vec<Value> {
        let out = self
            .python(python, &["tools_app.py", "batch", &Value::from(items.to_vec()).to_string()])
            .output()
            .expect("run tools_app.py batch");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let report =
            || format!("tools_app.py batch ({}):\n{stdout}{}", out.status, String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "{}", report());
        let outcomes: Vec<Value> = stdout
            .lines()
            .last()
            .and_then(|l| serde_json::from_str(l).ok())
            .unwrap_or_else(|| panic!("no JSON list: {}", report()));
        assert_eq!(outcomes.len(), items.len(), "{}", report());
        outcomes
    }
}

/// The last lines of a process's log.
trait LogTail {
    fn log_tail(&self) -> String;
}

impl LogTail for DemoProcess {
    fn log_tail(&self) -> String {
        tail(&self.log(), 60)
    }
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// An 8-character random tag for names.
fn short() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..8].to_owned()
}

/// A `celery` command line for `tools_app.py batch`.
fn cli(args: &[&str]) -> Value {
    json!({ "cli": args })
}

/// The JSON line a script printed last (it is waited for).
fn script_json(child: Child) -> Result<Value, String> {
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure(out.status.success(), || format!("the script failed ({}): {stdout}{stderr}", out.status))?;
    stdout.lines().last().and_then(|l| serde_json::from_str(l).ok()).ok_or_else(|| format!("no JSON line: {stdout}"))
}

// ---------------------------------------------------------------------------------------------
// Replies and checks.

/// One worker's reply, or why there is none.
type Reply = Result<Value, String>;

/// `node`'s reply in the output of one `celery inspect|control ... --json` run: inspect prints
/// `{node: reply}`, control a list of `{node: reply}`.
fn reply_of(outcome: &Value, node: &str) -> Reply {
    let stdout = outcome["stdout"].as_str().unwrap_or_default();
    if outcome["exit"] != 0 {
        return Err(format!(
            "exit {}: {}{}{}",
            outcome["exit"],
            stdout,
            outcome["stderr"].as_str().unwrap_or_default(),
            outcome["exception"].as_str().unwrap_or_default()
        ));
    }
    let parsed: Value = serde_json::from_str(stdout.trim()).map_err(|e| format!("not JSON ({e}): {stdout}"))?;
    let found = match &parsed {
        Value::Object(m) => m.get(node).cloned(),
        Value::Array(list) => list.iter().find_map(|m| m.get(node).cloned()),
        _ => None,
    };
    found.ok_or_else(|| format!("no reply from {node}: {stdout}"))
}

/// `node`'s reply in the output of a `python -m celery control ... --json` process.
fn cli_reply(out: &Output, node: &str) -> Reply {
    let outcome = json!({
        "exit": out.status.code(),
        "stdout": String::from_utf8_lossy(&out.stdout),
        "stderr": String::from_utf8_lossy(&out.stderr),
    });
    reply_of(&outcome, node)
}

fn both_ok(pair: &(Reply, Reply)) -> Result<(Value, Value), String> {
    let ours = pair.0.clone()?;
    let theirs = pair.1.clone().map_err(|e| format!("(the Python worker) {e}"))?;
    Ok((ours, theirs))
}

fn ensure(cond: bool, why: impl FnOnce() -> String) -> Result<(), String> {
    if cond {
        Ok(())
    } else {
        Err(why())
    }
}

fn clip(s: &str) -> String {
    if s.len() <= 800 {
        return s.to_owned();
    }
    let cut = (0..=800).rev().find(|i| s.is_char_boundary(*i)).unwrap_or(0);
    format!("{}...", &s[..cut])
}

fn expect_eq(got: &Value, want: &Value) -> Result<(), String> {
    ensure(got == want, || format!("expected {want}, got {}", clip(&got.to_string())))
}

fn is_list(v: &Value) -> Result<(), String> {
    ensure(v.is_array(), || format!("not a list: {}", clip(&v.to_string())))
}

fn no_error(v: &Value) -> Result<(), String> {
    ensure(v.get("error").is_none(), || format!("an error: {v}"))
}

fn is_error(v: &Value) -> Result<(), String> {
    ensure(v["error"].is_string(), || format!("expected Celery's {{\"error\": ...}}, got {v}"))
}

/// A reply other than an "unknown command" error (Celery's reply or its error for an
/// unsupported operation).
fn not_unknown(v: &Value) -> Result<(), String> {
    let error = v["error"].as_str().unwrap_or_default().to_ascii_lowercase();
    ensure(!error.contains("unknown command") && !error.contains("keyerror"), || format!("{v}"))
}

fn ok_text(v: &Value) -> Result<&str, String> {
    v["ok"].as_str().ok_or_else(|| format!("expected {{\"ok\": ...}}, got {v}"))
}

fn ok_containing(v: &Value, needle: &str) -> Result<(), String> {
    ensure(ok_text(v)?.contains(needle), || format!("expected `ok` with {needle:?}: {v}"))
}

/// `ours` has every key of `theirs` (Python's reply).
fn has_keys_of(ours: &Value, theirs: &Value) -> Result<(), String> {
    let (Some(o), Some(t)) = (ours.as_object(), theirs.as_object()) else {
        return Err(format!(
            "not both objects: ours {}, Python's {}",
            clip(&ours.to_string()),
            clip(&theirs.to_string())
        ));
    };
    let missing: Vec<&String> = t.keys().filter(|k| !o.contains_key(*k)).collect();
    ensure(missing.is_empty(), || {
        format!("ours lacks {missing:?} that Python's has (ours: {})", clip(&ours.to_string()))
    })
}

fn same_keys(ours: &Value, theirs: &Value) -> Result<(), String> {
    has_keys_of(ours, theirs)?;
    has_keys_of(theirs, ours).map_err(|_| format!("ours has keys Python's lacks: ours {ours}, Python's {theirs}"))
}

fn has_keys(v: &Value, keys: &[&str]) -> Result<(), String> {
    let m = v.as_object().ok_or_else(|| format!("not an object: {v}"))?;
    let missing: Vec<&&str> = keys.iter().filter(|k| !m.contains_key(**k)).collect();
    ensure(missing.is_empty(), || format!("lacks {missing:?}: {}", clip(&v.to_string())))
}

fn requests(v: &Value) -> Result<&Vec<Value>, String> {
    v.as_array().ok_or_else(|| format!("not a list: {}", clip(&v.to_string())))
}

/// Every task in `ours` (a list) has Celery's request keys and those of Python's first entry;
/// `request` picks the request out of an entry.
fn every_request_like(ours: &Value, theirs: &Value, request: impl Fn(&Value) -> &Value) -> Result<(), String> {
    let theirs = requests(theirs)?.first().map(&request);
    for entry in requests(ours)? {
        let r = request(entry);
        has_keys(r, REQUEST_KEYS)?;
        has_keys(&r["delivery_info"], DELIVERY_KEYS).map_err(|e| format!("delivery_info: {e}"))?;
        if let Some(t) = theirs {
            has_keys_of(r, t)?;
            has_keys_of(&r["delivery_info"], &t["delivery_info"]).map_err(|e| format!("delivery_info: {e}"))?;
        }
    }
    Ok(())
}

/// `inspect stats`: Python's keys (and those of its broker and rusage), the pool's base keys.
fn stats_shape(ours: &Value, theirs: &Value, concurrency: u64) -> Result<(), String> {
    has_keys_of(ours, theirs)?;
    has_keys_of(&ours["broker"], &theirs["broker"]).map_err(|e| format!("broker: {e}"))?;
    has_keys_of(&ours["rusage"], &theirs["rusage"]).map_err(|e| format!("rusage: {e}"))?;
    has_keys(&ours["pool"], &["implementation", "max-concurrency"]).map_err(|e| format!("pool: {e}"))?;
    expect_eq(&ours["pool"]["max-concurrency"], &json!(concurrency)).map_err(|e| format!("pool: {e}"))?;
    ensure(ours["total"].is_object(), || format!("`total` is not an object: {}", ours["total"]))?;
    ensure(ours["uptime"].is_u64() && ours["pid"].is_u64(), || "`uptime` and `pid` are not numbers".into())
}

/// The entry of `queues` (an `active_queues` list) named `name`.
fn find_queue<'a>(queues: &'a Value, name: &str) -> Option<&'a Value> {
    queues.as_array()?.iter().find(|q| q["name"] == name)
}

async fn get_value(r: &AsyncResult, within: Duration, want: Value) -> Result<(), String> {
    match r.get::<Value>(within).await {
        Ok(v) => expect_eq(&v, &want),
        Err(e) => Err(format!("{}: {e}", r.id())),
    }
}

async fn failed_with(r: &AsyncResult, within: Duration, exc: &str) -> Result<(), String> {
    match r.get::<Value>(within).await {
        Err(ResultError::Failed { exc_type, .. }) if exc_type == exc => Ok(()),
        other => Err(format!("expected a {exc} failure, got {other:?}")),
    }
}

async fn state_within(r: &AsyncResult, within: Duration, want: TaskState) -> Result<(), String> {
    let deadline = Instant::now() + within;
    loop {
        let state = r.state().await.map_err(|e| e.to_string())?;
        if state == want {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(format!("{} is {state}, not {want}", r.id()));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `host`'s `active_queues` reply through our own client (`null` when it does not answer), after
/// a pause of 100 ms so that loops over it poll.
async fn active_queues(app: &App, host: &str) -> Value {
    tokio::time::sleep(Duration::from_millis(100)).await;
    celery_worker::control::request(app, "active_queues", json!({}), Some(vec![host.to_owned()]), EFFECT)
        .await
        .ok()
        .and_then(|r| r.into_iter().next())
        .map(|(_, v)| v)
        .unwrap_or(Value::Null)
}

/// One HTTP/1.0 request to 127.0.0.1:`port` (Tornado answers HTTP/1.0 without chunking and
/// closes); `form` is an urlencoded body. Returns the status and the body.
fn http(port: u16, method: &str, path: &str, form: &str) -> Result<(u16, String), String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(T)).map_err(|e| e.to_string())?;
    let request = format!(
        "{method} {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n{form}",
        form.len()
    );
    s.write_all(request.as_bytes()).map_err(|e| format!("send: {e}"))?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).map_err(|e| format!("read: {e}"))?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").ok_or_else(|| format!("no HTTP response: {}", clip(&text)))?;
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("bad status line: {head}"))?;
    Ok((code, body.to_owned()))
}

/// The outcomes of one test's checks, reported together at the end.
struct Checks {
    name: String,
    failures: Vec<String>,
    passed: usize,
}

impl Checks {
    fn new(name: String) -> Checks {
        Checks { name, failures: Vec::new(), passed: 0 }
    }

    /// Records one check (and prints it).
    fn check(&mut self, what: &str, outcome: Result<(), String>) {
        match outcome {
            Ok(()) => {
                self.passed += 1;
                eprintln!("{SUITE} [{}] ok   {what}", self.name);
            }
            Err(why) => {
                eprintln!("{SUITE} [{}] FAIL {what}: {why}", self.name);
                self.failures.push(format!("{what}: {why}"));
            }
        }
    }

    /// Fails the test when any check failed, listing them with `context`.
    fn finish(self, context: impl FnOnce() -> String) {
        if !self.failures.is_empty() {
            panic!(
                "[{}] {} of {} checks failed:\n- {}\n\n{}",
                self.name,
                self.failures.len(),
                self.failures.len() + self.passed,
                self.failures.join("\n- "),
                context()
            );
        }
        eprintln!("{SUITE} [{}] all {} checks passed", self.name, self.passed);
    }
}

//! Wire compatibility with real Python Celery from PyPI, both ways, over the real Redis and over
//! RabbitMQ (results in Redis):
//!
//! 1. A Python producer's `send_task('add', args=[2, 3])` runs on our worker (the demo binary, as a
//!    process) and Python's `AsyncResult.get()` returns 5; its `send_task('fail', args=['oops'])`
//!    raises on the Python side, with `oops` in the exception's message.
//! 2. Our producer's `add(2, 3)` runs on a Python Celery worker (`--pool=solo`) and our
//!    `AsyncResult::get` returns 5.
//! 3. Chains, both ways over Redis: Python's `chain(add(2, 3), add(10), add(100))` runs step by
//!    step on our worker and Python gets 115; our `send_chain([add(2, 3), add(10)])` runs on a
//!    Python worker and our handle on the last task gets 15.
//!
//! 4. Chords, both ways over Redis: Python's `chord([add(i, i) for i in range(10)])(tsum())` runs
//!    on our workers (members counted in Celery's `.j/.t/.s` keys) and Python gets 90; our
//!    `send_chord` of the same runs on a Python worker, whose chord counting fires the body, and we
//!    get 90.
//!
//! 5. Events: `celery -A interop_app events --dump` (Python) prints the task events of our worker
//!    started with `-E`, over Redis and over RabbitMQ.
//!
//! 1b. Tracing: the Python producer's `add` carries a `traceparent` header (as
//!    opentelemetry-instrumentation-celery injects it) and our traced worker's `run/add` span
//!    continues that trace; our traced `demo send` puts its send span's context where that
//!    instrumentation reads it on a Python worker (`task.request.traceparent`).
//!
//! 6. Remote control: Python's `celery inspect ping` gets our worker's pong, and a task id revoked
//!    with Python's `app.control.revoke` is not run by our worker, over Redis and over RabbitMQ.
//!
//! The Python side is `tests/python/interop_app.py`. Celery is installed once into a virtualenv
//! (`celery_tests::python`, shared with `celery_tools`); when that fails the suite is skipped, or
//! fails under `CELERY_REQUIRE_SERVICES=1`. Python's result backend does not share our
//! key prefixes, so each test owns its Redis databases instead, flushed first: 10/11 and 12/13 for
//! the Redis tests, 5 and 6 (broker and results in one database) for the chain tests, 14 and 15 for the chord tests, 3 and 4 for the events tests, 1 and 2 for the remote-control tests, 7 and 8 for the results of the AMQP tests, whose broker is a RabbitMQ vhost of
//! their own.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use celery_core::Signature;
use celery_tests::otlp::Collector;
use celery_tests::python::{self, Service};
use celery_tests::{amqp_available, demo_bin, poll_until, redis_available, wait_until, AmqpVhost, REDIS};
use serde_json::{json, Value};

const SUITE: &str = "python_interop";
/// The queue both directions use.
const QUEUE: &str = "interop";
/// The queue the chain tests use.
const CHAIN_QUEUE: &str = "interop-chain";
/// The queue the chord tests use.
const CHORD_QUEUE: &str = "interop-chord";
/// How long either side waits for a result.
const T: Duration = Duration::from_secs(30);

/// The broker and result backend a test owns.
struct Servers {
    broker: String,
    backend: String,
    /// The RabbitMQ vhost behind `broker`, deleted when the test ends (after its workers).
    _vhost: Option<AmqpVhost>,
}

impl Servers {
    /// Databases `broker` and `backend` of the test Redis, flushed; `None` (skipped) without Redis.
    fn redis(broker: u8, backend: u8) -> Option<Servers> {
        redis_available(SUITE).then(|| Servers { broker: flushed(broker), backend: flushed(backend), _vhost: None })
    }

    /// A fresh RabbitMQ vhost, results in database `backend` of the test Redis, flushed; `None`
    /// (skipped) without RabbitMQ or Redis.
    fn amqp(backend: u8) -> Option<Servers> {
        if !amqp_available(SUITE) || !redis_available(SUITE) {
            return None;
        }
        let vhost = AmqpVhost::new();
        Some(Servers { broker: vhost.url(), backend: flushed(backend), _vhost: Some(vhost) })
    }

    /// Points `cmd` (our CLI or Python Celery) at these servers.
    fn apply<'a>(&self, cmd: &'a mut Command) -> &'a mut Command {
        cmd.env("CELERY_BROKER_URL", &self.broker).env("CELERY_RESULT_BACKEND", &self.backend)
    }
}

/// The URL of database `db` of the test Redis, flushed.
fn flushed(db: u8) -> String {
    let url = format!("{REDIS}/{db}");
    let mut conn = redis::Client::open(url.as_str()).and_then(|c| c.get_connection()).expect("redis connection");
    redis::cmd("FLUSHDB").query::<()>(&mut conn).expect("FLUSHDB");
    url
}

/// The shared virtualenv's Python, or `None` after printing why the test is skipped.
fn python_or_skip() -> Option<&'static Path> {
    python::venv_or_skip(SUITE)
}

/// `python <args>` in `tests/python`, against `servers`.
fn python_cmd(python: &Path, servers: &Servers, args: &[&str]) -> Command {
    let mut cmd = python::command(python, args);
    servers.apply(&mut cmd);
    cmd
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_producer_runs_on_our_worker() {
    let Some(servers) = Servers::redis(10, 11) else {
        return;
    };
    if let Some(python) = python_or_skip() {
        python_producer_runs_on_our_worker_via(python, &servers).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_producer_runs_on_our_worker_over_amqp() {
    let Some(servers) = Servers::amqp(7) else {
        return;
    };
    if let Some(python) = python_or_skip() {
        python_producer_runs_on_our_worker_via(python, &servers).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_producer_runs_on_a_python_worker() {
    let Some(servers) = Servers::redis(12, 13) else {
        return;
    };
    if let Some(python) = python_or_skip() {
        our_producer_runs_on_a_python_worker_via(python, &servers).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_producer_runs_on_a_python_worker_over_amqp() {
    let Some(servers) = Servers::amqp(8) else {
        return;
    };
    if let Some(python) = python_or_skip() {
        our_producer_runs_on_a_python_worker_via(python, &servers).await;
    }
}

/// Direction 1: the Python producer's `add`, `fail` and a countdown `add` run on our worker,
/// started here (traced);
/// `add` carries a `traceparent` as Python's instrumentation sends it, and its run continues
/// that trace.
async fn python_producer_runs_on_our_worker_via(python: &Path, servers: &Servers) {
    let collector = Collector::start().await;
    let worker = Service::start(
        servers
            .apply(&mut Command::new(demo_bin()))
            .args(["worker", "-Q", QUEUE, "-c", "2", "--otlp-endpoint", &collector.url])
            .env("RUST_LOG", "info")
            .env("OTEL_BSP_SCHEDULE_DELAY", "100"),
    );
    let (trace_id, parent) = ("0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331");

    // The script waits (30 s at most) for both results and prints what it got as JSON.
    let mut cmd = python_cmd(python, servers, &["interop_app.py", QUEUE]);
    cmd.env("TRACEPARENT", format!("00-{trace_id}-{parent}-01"));
    let (got, report) = run_python_producer_cmd(cmd, &worker);
    eprintln!("{SUITE}: the Python producer got {got} over {}", servers.broker);
    assert_eq!(got["add"], json!(5), "{report}");
    let message = got["fail"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("oops"), "{report}");
    // A Python countdown task runs, not before it is due, and soon after.
    assert_eq!(got["countdown"], json!(9), "{report}");
    let took = got["countdown_took"].as_f64().unwrap_or_default();
    assert!((1.9..6.0).contains(&took), "the 2 s countdown task ran after {took} s\n{report}");
    let spans = poll_until(T, || async { collector.spans() }, |s| s.iter().any(|s| s.name == "run/add")).await;
    let run = spans.iter().find(|s| s.name == "run/add").unwrap_or_else(|| panic!("no run/add: {spans:#?}"));
    assert_eq!((run.trace_id.as_str(), run.parent_span_id.as_str()), (trace_id, parent), "{report}");
}

/// Our worker (the demo binary) with these `worker` options.
fn our_worker(servers: &Servers, options: &[&str]) -> Service {
    Service::start(servers.apply(&mut Command::new(demo_bin())).arg("worker").args(options).env("RUST_LOG", "info"))
}

/// A Python Celery worker (`--pool=solo`) consuming `queue`.
fn python_worker(python: &Path, servers: &Servers, queue: &str) -> Service {
    let args = [
        "-m",
        "celery",
        "-A",
        "interop_app",
        "worker",
        "--pool=solo",
        "-Q",
        queue,
        "--loglevel=info",
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
    ];
    Service::start(&mut python_cmd(python, servers, &args))
}

/// Runs a Python producer script that prints one JSON line last; returns that line and a report of
/// its output and our worker's log for assertion messages. Fails when the script fails.
fn run_python_producer(python: &Path, servers: &Servers, args: &[&str], worker: &Service) -> (Value, String) {
    run_python_producer_cmd(python_cmd(python, servers, args), worker)
}

/// [`run_python_producer`] with the command made.
fn run_python_producer_cmd(mut cmd: Command, worker: &Service) -> (Value, String) {
    let out = cmd.output().expect("run the Python producer");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report = format!(
        "Python producer ({}):\n{stdout}{}\nour worker's log:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        worker.log()
    );
    assert!(out.status.success(), "{report}");
    let got = stdout
        .lines()
        .last()
        .and_then(|line| serde_json::from_str(line).ok())
        .unwrap_or_else(|| panic!("no JSON line: {report}"));
    (got, report)
}

/// Direction 2: our `add(2, 3)` runs on a Python Celery worker, started here; then a traced
/// `demo send` of `traceparent` finds its send span's context where Python's instrumentation reads
/// it (`task.request.traceparent`).
async fn our_producer_runs_on_a_python_worker_via(python: &Path, servers: &Servers) {
    let app = celery_worker::connect(&servers.broker, &servers.backend).await.expect("connect");
    // Sent before the worker starts: it waits in the queue until the worker is up.
    let result = app.send(Signature::by_name("add").args(json!([2, 3])).queue(QUEUE)).await.expect("send");
    let worker = python_worker(python, servers, QUEUE);
    match result.get::<i64>(T).await {
        Ok(sum) => assert_eq!(sum, 5),
        Err(e) => panic!("{e:?}\nPython worker's log:\n{}", worker.log()),
    }
    let collector = Collector::start().await;
    let out = servers
        .apply(&mut Command::new(demo_bin()))
        .args(["send", "traceparent", "-Q", QUEUE, "--wait", "30", "--json", "--otlp-endpoint", &collector.url])
        .output()
        .expect("demo send");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report: Value = stdout.lines().last().and_then(|l| serde_json::from_str(l).ok()).unwrap_or_default();
    let seen = report["result"].as_str().unwrap_or_else(|| panic!("{stdout}\nPython worker's log:\n{}", worker.log()));
    let spans =
        poll_until(T, || async { collector.spans() }, |s| s.iter().any(|s| s.name == "apply_async/traceparent")).await;
    let send = spans.iter().find(|s| s.name == "apply_async/traceparent").expect("the send span");
    assert_eq!(seen, format!("00-{}-{}-01", send.trace_id, send.span_id));
}

#[test]
fn python_chain_runs_on_our_workers() {
    let Some(servers) = Servers::redis(5, 5) else {
        return;
    };
    let Some(python) = python_or_skip() else {
        return;
    };
    let worker = our_worker(&servers, &["-Q", CHAIN_QUEUE, "-c", "2"]);

    // The script sends every step to CHAIN_QUEUE and waits (30 s at most) for the last result.
    let (got, report) = run_python_producer(python, &servers, &["interop_app.py", "chain", CHAIN_QUEUE], &worker);
    eprintln!("{SUITE}: the Python chain got {got} from our worker");
    assert_eq!(got["chain"], json!(115), "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_chain_runs_on_python_workers() {
    let Some(servers) = Servers::redis(6, 6) else {
        return;
    };
    let Some(python) = python_or_skip() else {
        return;
    };
    let app = celery_worker::connect(&servers.broker, &servers.backend).await.expect("connect");
    // Sent before the worker starts: the first step waits in the queue until the worker is up.
    let result = app
        .send_chain([
            Signature::by_name("add").args(json!([2, 3])).queue(CHAIN_QUEUE),
            Signature::by_name("add").args(json!([10])).queue(CHAIN_QUEUE),
        ])
        .await
        .expect("send_chain");
    let worker = python_worker(python, &servers, CHAIN_QUEUE);
    match result.get::<i64>(T).await {
        Ok(sum) => assert_eq!(sum, 15),
        Err(e) => panic!("{e:?}\nPython worker's log:\n{}", worker.log()),
    }
}

#[test]
fn python_chord_runs_on_our_workers() {
    let Some(servers) = Servers::redis(14, 14) else {
        return;
    };
    let Some(python) = python_or_skip() else {
        return;
    };
    let worker = our_worker(&servers, &["-Q", CHORD_QUEUE, "-c", "4"]);
    let (got, report) = run_python_producer(python, &servers, &["interop_app.py", "chord", CHORD_QUEUE], &worker);
    eprintln!("{SUITE}: the Python chord got {got} from our workers");
    assert_eq!(got["chord"], json!(90), "{report}");
    assert!(worker.log().contains("chord complete"), "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_chord_runs_on_python_workers() {
    let Some(servers) = Servers::redis(15, 15) else {
        return;
    };
    let Some(python) = python_or_skip() else {
        return;
    };
    let app = celery_worker::connect(&servers.broker, &servers.backend).await.expect("connect");
    let header = (0..10).map(|i| Signature::by_name("add").args(json!([i, i])).queue(CHORD_QUEUE));
    let result = app.send_chord(header, Signature::by_name("tsum").queue(CHORD_QUEUE)).await.expect("send_chord");
    let worker = python_worker(python, &servers, CHORD_QUEUE);
    match result.get::<i64>(T).await {
        Ok(sum) => assert_eq!(sum, 90),
        Err(e) => panic!("{e:?}\nPython worker's log:\n{}", worker.log()),
    }
}

/// Python's `celery events --dump` sees our worker's task events.
fn python_event_dump_sees_our_worker_via(python: &Path, servers: &Servers, queue: &str) {
    let dump =
        Service::start(&mut python_cmd(python, servers, &["-m", "celery", "-A", "interop_app", "events", "--dump"]));
    assert!(wait_until(T, || dump.log().contains("starting capture")), "{}", dump.log());
    let worker = our_worker(servers, &["-E", "-Q", queue, "-c", "2"]);
    // Kombu subscribes on Redis only once it polls: wait for one of our heartbeats to show.
    assert!(wait_until(T, || dump.log().contains("sw_ident=celery-rs")), "{}\n{}", dump.log(), worker.log());
    let out = servers
        .apply(&mut Command::new(demo_bin()))
        .args(["send", "add", "--args", "[20, 22]", "--queue", queue, "--wait", "30", "--json"])
        .output()
        .expect("send");
    let line = String::from_utf8_lossy(&out.stdout);
    let sent: Value = serde_json::from_str(line.lines().last().unwrap_or("")).unwrap_or(Value::Null);
    assert_eq!(sent["result"], json!(42), "{line}\n{}", worker.log());
    let id = sent["id"].as_str().unwrap_or_default().to_owned();
    let seen = wait_until(T, || {
        let log = dump.log();
        log.lines().any(|l| l.contains(&id) && l.contains("succeeded")) && log.contains("received")
    });
    assert!(seen, "Python's event dump did not show task {id}:\n{}\nour worker:\n{}", dump.log(), worker.log());
}

#[test]
fn python_event_dump_sees_our_worker() {
    let Some(servers) = Servers::redis(3, 3) else {
        return;
    };
    let Some(python) = python_or_skip() else {
        return;
    };
    python_event_dump_sees_our_worker_via(python, &servers, "interop-events");
}

#[test]
fn python_event_dump_sees_our_worker_over_amqp() {
    let Some(servers) = Servers::amqp(4) else {
        return;
    };
    let Some(python) = python_or_skip() else {
        return;
    };
    python_event_dump_sees_our_worker_via(python, &servers, "interop-events");
}

/// Python's `celery inspect ping` and `app.control.revoke` reach our worker.
async fn python_controls_our_worker_via(python: &Path, servers: &Servers, queue: &str) {
    let host = format!("rs-{}@interop", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let worker = our_worker(servers, &["-Q", queue, "-c", "2", "-n", &host]);
    assert!(wait_until(T, || worker.log().contains("worker ready")), "{}", worker.log());
    let out =
        python_cmd(python, servers, &["-m", "celery", "-A", "interop_app", "inspect", "ping", "-d", &host, "-t", "10"])
            .output()
            .expect("celery inspect ping");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(
        text.contains(&host) && text.contains("pong"),
        "Python's inspect ping:\n{text}\nour worker:\n{}",
        worker.log()
    );

    let id = uuid::Uuid::new_v4().to_string();
    let out = python_cmd(python, servers, &["interop_app.py", "revoke", &id]).output().expect("revoke");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let app = celery_worker::connect(&servers.broker, &servers.backend).await.expect("connect");
    // Our worker learnt of the revoke: ask it (our client) until the id shows.
    let seen = async {
        loop {
            let r = celery_worker::control::request(&app, "revoked", json!({}), Some(vec![host.clone()]), T).await;
            if r.unwrap_or_default().iter().any(|(_, ids)| ids.as_array().is_some_and(|a| a.contains(&json!(id)))) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    tokio::time::timeout(T, seen).await.unwrap_or_else(|_| panic!("revoke not seen\n{}", worker.log()));
    let r = app.send(Signature::by_name("add").args(json!([1, 1])).queue(queue).task_id(id)).await.expect("send");
    assert!(matches!(r.get::<i64>(T).await, Err(celery_core::ResultError::Revoked)), "{}", worker.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_controls_our_worker() {
    let Some(servers) = Servers::redis(1, 1) else {
        return;
    };
    let Some(python) = python_or_skip() else {
        return;
    };
    python_controls_our_worker_via(python, &servers, "interop-control").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_controls_our_worker_over_amqp() {
    let Some(servers) = Servers::amqp(2) else {
        return;
    };
    let Some(python) = python_or_skip() else {
        return;
    };
    python_controls_our_worker_via(python, &servers, "interop-control").await;
}

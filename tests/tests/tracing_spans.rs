//! Tracing across services (README, "Tracing"), with real processes over the real Redis and an
//! in-test OTLP/HTTP collector ([`celery_tests::otlp`]):
//!
//! 1. `demo send add --then add` (one process) and a demo worker (another), both with
//!    `--otlp-endpoint`: one trace links the send, the first run, the chained send from inside that
//!    run and the chained run, each the parent of the next, with the queue waits and result stores
//!    beside them; the send's spans come from another process than the runs'.
//! 2. A retried task: the second attempt's run is a child of the first run's `retry` span.
//! 3. A message that carries a foreign `traceparent` (as Python's instrumentation sends it, a
//!    top-level header) continues that trace on our worker; a malformed one is ignored: the task
//!    runs and starts a trace of its own.
//! 4. A worker without `--otlp-endpoint` passes the trace context on: the next step of a chain,
//!    run on a traced worker, continues the trace the first step carried.

use std::process::{Command, Stdio};
use std::time::Duration;

use celery_core::Signature;
use celery_tests::otlp::{Collector, Span};
use celery_tests::{demo_bin, poll_until, redis_available, DemoProcess, RedisEnv};
use serde_json::{json, Value};

const SUITE: &str = "tracing_spans";
const T: Duration = Duration::from_secs(30);

/// `demo <args>` against `env`, exporting quickly (every 100 ms) to the collector.
fn demo(env: &RedisEnv, collector: &Collector, args: &[&str]) -> Command {
    let mut cmd = Command::new(demo_bin());
    cmd.args(args)
        .args(["--otlp-endpoint", &collector.url])
        .env("CELERY_BROKER_URL", &env.broker)
        .env("CELERY_RESULT_BACKEND", &env.backend)
        .env("RUST_LOG", "info")
        .env("OTEL_BSP_SCHEDULE_DELAY", "100")
        .env_remove("OTEL_SERVICE_NAME")
        .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT");
    cmd
}

/// A traced demo worker consuming `queue`.
fn worker(env: &RedisEnv, collector: &Collector, queue: &str) -> DemoProcess {
    let log = std::env::temp_dir().join(format!("demo-{}.log", uuid::Uuid::new_v4().simple()));
    let file = std::fs::File::create(&log).expect("log file");
    let child = demo(env, collector, &["worker", "-Q", queue, "-c", "2"])
        .stdout(Stdio::null())
        .stderr(file)
        .spawn()
        .expect("start the worker");
    DemoProcess { child, log }
}

fn named<'a>(spans: &'a [Span], name: &str) -> Vec<&'a Span> {
    spans.iter().filter(|s| s.name == name).collect()
}

/// The one span named `name` whose parent is `parent`.
fn child<'a>(spans: &'a [Span], name: &str, parent: &Span) -> &'a Span {
    let found: Vec<_> = spans.iter().filter(|s| s.name == name && s.parent_span_id == parent.span_id).collect();
    assert_eq!(found.len(), 1, "one {name} under {} {}: {spans:#?}", parent.name, parent.span_id);
    found[0]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chain_sent_from_one_process_is_one_trace_in_another() {
    if !redis_available(SUITE) {
        return;
    }
    let (env, collector) = (RedisEnv::new(30.0), Collector::start().await);
    let queue = "trace-chain";
    let w = worker(&env, &collector, queue);
    let then = json!({"task": "add", "args": [10]}).to_string();
    let send = demo(&env, &collector, &["send", "add", "--args", "[1, 2]", "--then", &then, "-Q", queue])
        .args(["--wait", "30", "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start demo send");
    let sender = send.id();
    let out = tokio::task::spawn_blocking(move || send.wait_with_output()).await.expect("join").expect("demo send");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report: Value = stdout.lines().last().and_then(|l| serde_json::from_str(l).ok()).unwrap_or_default();
    assert!(
        out.status.success() && report["result"] == json!(13),
        "{stdout}\n{}\nworker:\n{}",
        String::from_utf8_lossy(&out.stderr),
        w.log()
    );

    // Two sends, two runs, two waits, two stores: the worker exports every 100 ms.
    let spans = poll_until(
        T,
        || async { collector.spans() },
        |s| {
            named(s, "run/add").iter().filter(|r| r.attr("celery.state") == Some("SUCCESS")).count() == 2
                && named(s, "apply_async/add").len() == 2
                && named(s, "store/add").iter().filter(|r| r.attr("celery.state") == Some("SUCCESS")).count() == 2
                && named(s, "wait/add").len() == 2
        },
    )
    .await;
    let sends = named(&spans, "apply_async/add");
    let first_send = *sends.iter().find(|s| s.parent_span_id.is_empty()).unwrap_or_else(|| panic!("{spans:#?}"));
    assert_eq!(first_send.pid, i64::from(sender), "the first send is the send process's");
    assert_eq!((first_send.kind, first_send.attr("celery.task_name")), (4, Some("add")), "a producer span");
    let first_run = child(&spans, "run/add", first_send);
    assert_ne!(first_run.pid, first_send.pid, "the run is another process's");
    assert_eq!(first_run.pid, i64::from(w.child.id()));
    assert_eq!((first_run.kind, first_run.attr("messaging.destination.name")), (5, Some(queue)), "a consumer span");
    let chained_send = child(&spans, "apply_async/add", first_run);
    let chained_run = child(&spans, "run/add", chained_send);
    let run_ids = [first_run, chained_run].map(|r| r.attr("messaging.message.id").unwrap_or_default().to_owned());
    assert_eq!(report["id"].as_str(), Some(run_ids[1].as_str()), "the chained run is the task `send` waited for");
    for (send, run) in [(first_send, first_run), (chained_send, chained_run)] {
        let wait = child(&spans, "wait/add", send);
        assert!(wait.start_end.0 <= wait.start_end.1 && wait.start_end.1 <= run.start_end.1, "{wait:?} {run:?}");
        let stored = |state| {
            spans
                .iter()
                .any(|s| s.name == "store/add" && s.parent_span_id == run.span_id && s.attr("celery.state") == state)
        };
        assert!(stored(Some("STARTED")) && stored(Some("SUCCESS")), "{spans:#?}");
        assert_eq!(run.attr("celery.state"), Some("SUCCESS"));
    }
    let traced = [first_send, first_run, chained_send, chained_run];
    assert!(traced.iter().all(|s| s.trace_id == first_send.trace_id), "one trace: {traced:#?}");
    assert!(spans.iter().all(|s| s.trace_id == first_send.trace_id), "nothing outside it: {spans:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_is_the_parent_of_the_next_attempt() {
    if !redis_available(SUITE) {
        return;
    }
    let (env, collector) = (RedisEnv::new(30.0), Collector::start().await);
    let queue = "trace-retry";
    let w = worker(&env, &collector, queue);
    let out = demo(&env, &collector, &["send", "flaky", "--args", "[1]", "-Q", queue, "--wait", "30", "--json"])
        .output()
        .expect("demo send");
    assert!(out.status.success(), "{}\nworker:\n{}", String::from_utf8_lossy(&out.stdout), w.log());
    let spans = poll_until(
        T,
        || async { collector.spans() },
        |s| named(s, "run/flaky").iter().any(|r| r.attr("celery.state") == Some("SUCCESS")),
    )
    .await;
    let send = named(&spans, "apply_async/flaky");
    assert_eq!(send.len(), 1, "{spans:#?}");
    let first = child(&spans, "run/flaky", send[0]);
    assert_eq!(first.attr("celery.state"), Some("RETRY"));
    let retry = child(&spans, "retry/flaky", first);
    assert_eq!((retry.kind, retry.attr("celery.retries")), (4, Some("1")));
    let second = child(&spans, "run/flaky", retry);
    assert_eq!((second.attr("celery.state"), second.attr("celery.retries")), (Some("SUCCESS"), Some("1")));
    child(&spans, "wait/flaky", retry);
    assert!(spans.iter().all(|s| s.trace_id == send[0].trace_id), "{spans:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreign_traceparent_continues_and_a_malformed_one_is_ignored() {
    if !redis_available(SUITE) {
        return;
    }
    let (env, collector) = (RedisEnv::new(30.0), Collector::start().await);
    let queue = "trace-foreign";
    let w = worker(&env, &collector, queue);
    // This process does not trace: the headers go as given, as Python's instrumentation puts them.
    let app = celery_worker::connect(&env.broker, &env.backend).await.expect("connect");
    let (trace_id, parent) = ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7");
    let foreign = Signature::by_name("add")
        .args(json!([2, 3]))
        .queue(queue)
        .header("traceparent", json!(format!("00-{trace_id}-{parent}-01")))
        .header("tracestate", json!("congo=t61rcWkgMzE"));
    let malformed = Signature::by_name("add")
        .args(json!([4, 5]))
        .queue(queue)
        .header("traceparent", json!(format!("00-{}-{parent}-01", trace_id.to_uppercase())))
        .header("tracestate", json!(["not", "a", "string"]));
    let (a, b) = (app.send(foreign).await.expect("send"), app.send(malformed).await.expect("send"));
    for (res, sum) in [(&a, 5), (&b, 9)] {
        match res.get::<i64>(T).await {
            Ok(got) => assert_eq!(got, sum),
            Err(e) => panic!("{e:?}\nworker:\n{}", w.log()),
        }
    }
    let runs = poll_until(
        T,
        || async { collector.spans() },
        |s| named(s, "run/add").iter().filter(|r| r.attr("celery.state") == Some("SUCCESS")).count() == 2,
    )
    .await;
    let run_of = |id: &str| {
        runs.iter()
            .find(|s| s.name == "run/add" && s.attr("messaging.message.id") == Some(id))
            .unwrap_or_else(|| panic!("no run of {id}: {runs:#?}"))
    };
    let continued = run_of(a.id());
    assert_eq!((continued.trace_id.as_str(), continued.parent_span_id.as_str()), (trace_id, parent));
    let fresh = run_of(b.id());
    assert!(fresh.parent_span_id.is_empty(), "a malformed traceparent starts a new trace: {fresh:?}");
    assert_ne!(fresh.trace_id, trace_id.to_owned());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trace_crosses_an_untraced_worker() {
    if !redis_available(SUITE) {
        return;
    }
    let (env, collector) = (RedisEnv::new(30.0), Collector::start().await);
    let (first, second) = ("trace-untraced", "trace-traced");
    // The chain's first step runs on a worker without `--otlp-endpoint`, its second on a traced one.
    let untraced = DemoProcess::start(&env, &["worker", "-Q", first, "-c", "2"]);
    let traced = worker(&env, &collector, second);
    let app = celery_worker::connect(&env.broker, &env.backend).await.expect("connect");
    let (trace_id, parent) = ("5bf92f3577b34da6a3ce929d0e0e4737", "10f067aa0ba902b8");
    let steps = [
        Signature::by_name("add")
            .args(json!([1, 2]))
            .queue(first)
            .header("traceparent", json!(format!("00-{trace_id}-{parent}-01"))),
        Signature::by_name("add").args(json!([10])).queue(second),
    ];
    let last = app.send_chain(steps).await.expect("send the chain");
    match last.get::<i64>(T).await {
        Ok(sum) => assert_eq!(sum, 13),
        Err(e) => panic!("{e:?}\nuntraced:\n{}\ntraced:\n{}", untraced.log(), traced.log()),
    }
    let spans = poll_until(T, || async { collector.spans() }, |s| !named(s, "run/add").is_empty()).await;
    let run = named(&spans, "run/add");
    assert_eq!(run.len(), 1, "only the traced worker exports: {spans:#?}");
    assert_eq!(run[0].attr("messaging.message.id"), Some(last.id()));
    assert_eq!((run[0].trace_id.as_str(), run[0].parent_span_id.as_str()), (trace_id, parent));
    assert!(spans.iter().all(|s| s.pid == i64::from(traced.child.id())), "{spans:#?}");
}

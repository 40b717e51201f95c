//! Progress and custom states, against the real servers with the demo worker as a process:
//!
//! 1. The demo's `progress(steps, ms)` reports `PROGRESS` `{"done": i, "total": steps}` through
//!    `ctx.update_state`; our `AsyncResult::progress` sees the reports in order, then SUCCESS,
//!    and a `task-progress` event carries each report, with results in Redis, in the built-in
//!    store (over `log+tcp`) and in PostgreSQL (Celery's table).
//! 2. Python's `AsyncResult(id).state == "PROGRESS"` and `.info == {"done": n, "total": m}` while
//!    our worker runs it (results in PostgreSQL, which Python reads through SQLAlchemy).
//! 3. `send --wait` with stderr not a terminal prints one plain `PROGRESS n/m` line per report.

use std::process::Command;
use std::time::Duration;

use celery_core::{Signature, TaskMeta, TaskState};
use celery_tests::{demo_bin, python, redis_available, DemoProcess, PgSchema, RedisEnv, Target};
use futures::StreamExt;
use serde_json::{json, Value};

const SUITE: &str = "task_progress";
/// How long anything here may take.
const T: Duration = Duration::from_secs(60);

fn queue() -> String {
    format!("progress-{}", &uuid::Uuid::new_v4().simple().to_string()[..10])
}

/// Sends `progress(steps, ms)` to a demo worker on `broker`/`backend` and checks what the
/// caller and the event stream see.
async fn reports_are_followed(broker: &str, backend: &str) {
    let q = queue();
    let worker = DemoProcess::start_urls(broker, backend, &["worker", "-Q", &q, "-c", "2", "-E"]);
    assert!(worker.wait_log("consuming", T), "{}", worker.log());
    let app = celery_worker::connect(broker, backend).await.expect("connect");
    let mut events = celery_worker::events::subscribe(&app).await.expect("subscribe to events");
    let steps = 6;
    let res = app.send(Signature::by_name("progress").args(json!([steps, 150])).queue(&q)).await.expect("send");

    let seen: Vec<TaskMeta> =
        tokio::time::timeout(T, res.progress(Duration::from_millis(20)).map(|m| m.unwrap()).collect())
            .await
            .unwrap_or_else(|_| panic!("not ready in time: {}", worker.log()));
    let last = seen.last().expect("a ready document");
    assert_eq!((last.status, &last.result), (TaskState::Success, &json!(steps)), "{seen:?}");
    let progress: TaskState = "PROGRESS".parse().unwrap();
    let reports: Vec<&Value> = seen.iter().filter(|m| m.status == progress).map(|m| &m.result).collect();
    assert!(!reports.is_empty(), "no PROGRESS seen: {seen:?}");
    let done: Vec<u64> = reports.iter().map(|r| r["done"].as_u64().unwrap()).collect();
    assert!(done.windows(2).all(|w| w[0] < w[1]), "reports in order: {done:?}");
    assert!(reports.iter().all(|r| r["total"] == json!(steps) && r["done"].as_u64() <= Some(steps)), "{reports:?}");
    assert_eq!(res.info().await.unwrap().map(|m| m.status), Some(TaskState::Success));

    // Every report was broadcast as a task-progress event (best effort, but nothing is lost here).
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + T;
    while got.len() < steps as usize {
        let e = tokio::time::timeout_at(deadline, events.next())
            .await
            .unwrap_or_else(|_| panic!("task-progress events so far: {got:?}"))
            .expect("events end");
        if e["type"] == "task-progress" && e["uuid"] == json!(res.id()) {
            assert_eq!(e["state"], "PROGRESS");
            got.push(e["meta"]["done"].as_u64().unwrap());
        }
    }
    assert_eq!(got, (1..=steps).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_are_followed_with_results_in_redis() {
    let Some(target) = Target::redis() else { return };
    let (broker, backend) = target.urls();
    reports_are_followed(&broker, &backend).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_are_followed_with_results_in_the_built_in_store() {
    let target = Target::log_tcp().await;
    let (broker, backend) = target.urls();
    reports_are_followed(&broker, &backend).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_are_followed_with_results_in_postgres() {
    if !redis_available(SUITE) {
        return;
    }
    let Some(schema) = PgSchema::new(SUITE) else { return };
    let redis = RedisEnv::new(30.0);
    reports_are_followed(&redis.broker, &schema.url("db+postgresql", "")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_reads_the_progress_our_worker_reports() {
    if !redis_available(SUITE) {
        return;
    }
    let Some(schema) = PgSchema::new(SUITE) else { return };
    let Some(py) = python::venv_or_skip(SUITE) else { return };
    let redis = RedisEnv::new(30.0);
    let backend = schema.url("db+postgresql", "");
    let q = queue();
    let worker = DemoProcess::start_urls(&redis.broker, &backend, &["worker", "-Q", &q, "-c", "1"]);
    let app = celery_worker::connect(&redis.broker, &backend).await.expect("connect");
    // Long enough that Python sees it running: 40 steps of 200 ms.
    let res = app.send(Signature::by_name("progress").args(json!([40, 200])).queue(&q)).await.expect("send");
    let out =
        python::pg_app_command(py, &redis, &backend, &["pg_app.py", "state", res.id()]).output().expect("run Python");
    let report = format!(
        "{}\n{}\nworker:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        worker.log()
    );
    assert!(out.status.success(), "{report}");
    let got: Value = serde_json::from_slice(out.stdout.trim_ascii()).unwrap_or_else(|_| panic!("{report}"));
    assert_eq!(got["state"], "PROGRESS", "{report}");
    assert_eq!(got["info"]["total"], 40, "{report}");
    assert!(got["info"]["done"].as_u64().is_some_and(|d| (1..=40).contains(&d)), "{report}");
    res.forget().await.ok();
}

#[test]
fn send_wait_prints_plain_progress_lines_off_a_terminal() {
    let Some(target) = Target::redis() else { return };
    let (broker, backend) = target.urls();
    let q = queue();
    let worker = DemoProcess::start_urls(&broker, &backend, &["worker", "-Q", &q, "-c", "1"]);
    let out = Command::new(demo_bin())
        .args(["send", "progress", "--args", "[5, 200]", "-Q", &q, "--wait", "60"])
        .env("CELERY_BROKER_URL", &broker)
        .env("CELERY_RESULT_BACKEND", &backend)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run send");
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let report = format!("stdout:\n{stdout}\nstderr:\n{stderr}\nworker:\n{}", worker.log());
    assert!(out.status.success(), "{report}");
    assert_eq!(stdout.lines().last(), Some("5"), "{report}");
    let lines: Vec<&str> = stderr.lines().filter(|l| l.starts_with("PROGRESS ")).collect();
    assert!(!lines.is_empty(), "{report}");
    assert!(lines.iter().all(|l| l.ends_with("/5")), "{report}");
}

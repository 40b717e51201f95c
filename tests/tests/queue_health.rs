//! Queue health across processes: `control pause -Q q` stops a demo worker (a process) from
//! consuming `q` (Celery's `cancel_consumer`, answered by the worker), what is sent meanwhile
//! waits on the queue, and `control resume -Q q` (`add_consumer`) runs it. The metrics endpoint
//! exports the queue's depth and dead letters.

use std::process::Command;
use std::time::Duration;

use celery_core::{Signature, TaskState};
use celery_tests::{consumed_queues, demo_bin, free_port, wait_until, DemoProcess, Target};
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(30);

/// `demo <args>` against a broker and backend: whether it succeeded, its stdout and its stderr.
fn demo(broker: &str, backend: &str, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(demo_bin())
        .args(args)
        .env("CELERY_BROKER_URL", broker)
        .env("CELERY_RESULT_BACKEND", backend)
        .output()
        .expect("run demo");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `demo <args>`'s stdout, after checking it succeeded.
fn demo_ok(broker: &str, backend: &str, args: &[&str]) -> String {
    let (ok, stdout, stderr) = demo(broker, backend, args);
    assert!(ok, "demo {args:?}: {stdout}{stderr}");
    stdout
}

/// `demo control <args>`'s stdout, after checking it succeeded.
fn control(broker: &str, backend: &str, args: &[&str]) -> String {
    let mut all = vec!["control"];
    all.extend_from_slice(args);
    demo_ok(broker, backend, &all)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_and_resume_a_queue_across_processes() {
    let Some(target) = Target::redis() else { return };
    let (broker, backend) = target.urls();
    let q = format!("health-{}", &uuid::Uuid::new_v4().simple().to_string()[..10]);
    let host = format!("health-{}@test", std::process::id());
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let worker =
        DemoProcess::start_urls(&broker, &backend, &["worker", "-Q", &q, "-c", "1", "-n", &host, "--metrics", &listen]);
    assert!(worker.wait_log("consuming", T), "{}", worker.log());
    let app = celery_worker::connect(&broker, &backend).await.expect("connect");

    let paused = control(&broker, &backend, &["pause", "-Q", &q, "-d", &host, "-t", "10", "--json"]);
    let replies: Value = serde_json::from_str(paused.trim()).unwrap_or_else(|_| panic!("{paused}"));
    assert!(replies.get(&host).is_some(), "{paused}");
    assert!(!consumed_queues(&app, &host).await.contains(&q), "paused: {q} is not consumed");

    let res = app.send(Signature::by_name("add").args(json!([2, 3])).queue(&q)).await.expect("send");
    // A round trip to the worker after the send: had it still consumed, it would have taken it.
    assert!(!consumed_queues(&app, &host).await.contains(&q));
    let stats = app.broker().queue_stats(&q).await.unwrap();
    assert_eq!(stats.depth, 1, "{stats:?}");
    assert_eq!(res.state().await.unwrap(), TaskState::Pending);

    // The metrics endpoint shows the waiting message (polled every 5 s).
    let depth = format!("celery_queue_depth{{queue=\"{q}\"}} 1");
    let dead = format!("celery_queue_dead_letters{{queue=\"{q}\"}} 0");
    let mut last = String::new();
    let shown = wait_until(T, || {
        last = scrape(port);
        last.contains(&depth) && last.contains(&dead)
    });
    assert!(shown, "{depth} and {dead} in:\n{last}");

    control(&broker, &backend, &["resume", "-Q", &q, "-d", &host, "-t", "10"]);
    assert!(consumed_queues(&app, &host).await.contains(&q));
    assert_eq!(res.get::<i64>(T).await.unwrap_or_else(|e| panic!("{e}\n{}", worker.log())), 5);
}

/// `GET /metrics` on loopback.
fn scrape(port: u16) -> String {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else { return String::new() };
    let req = format!("GET /metrics HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n");
    if s.write_all(req.as_bytes()).is_err() {
        return String::new();
    }
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

/// `demo dead list|retry|discard` (the monitor's dead-letter buttons on the command line): a
/// filtered discard takes only what matches, `--id` one, `--all` the rest, and retried ones are
/// back in their queue; `retry` without a selector refuses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_lists_retries_and_discards_dead_letters() {
    use celery_core::broker::{DEAD_LETTER_QUEUE, DEAD_LETTER_REASON};
    use celery_core::protocol::Message;
    use celery_core::routing::Route;
    let Some(target) = Target::redis() else { return };
    let (broker, backend) = target.urls();
    let app = target.app().await;
    let q = format!("dq-{}", &uuid::Uuid::new_v4().simple().to_string()[..10]);
    let dead_letter = |sig: Signature| {
        let mut m = Message::from_signature(&sig).expect("message");
        m.headers.extra.insert(DEAD_LETTER_REASON.into(), "worker crashed".into());
        m.headers.extra.insert(DEAD_LETTER_QUEUE.into(), q.clone().into());
        m
    };
    let mut ids = Vec::new();
    for i in 0..5 {
        let m = dead_letter(Signature::by_name("add").args(json!([i, 1])));
        ids.push(m.headers.id.clone());
        app.broker().publish(&Route::queue(format!("{q}.dead")), &m).await.expect("publish");
    }
    let needle = dead_letter(Signature::by_name("echo").args(json!(["needle"])));
    app.broker().publish(&Route::queue(format!("{q}.dead")), &needle).await.expect("publish");

    let listed: Value =
        serde_json::from_str(&demo_ok(&broker, &backend, &["dead", "list", "-Q", &q, "--json"])).expect("json");
    assert_eq!(listed.as_array().map(Vec::len), Some(6), "{listed}");
    let out = demo_ok(&broker, &backend, &["dead", "discard", "-Q", &q, "--match", "NEEDLE"]);
    assert!(out.contains("discarded 1 dead letters"), "{out}");
    let out = demo_ok(&broker, &backend, &["dead", "retry", "-Q", &q, "--id", &ids[2]]);
    assert!(out.contains(&format!("retried {}", ids[2])), "{out}");
    assert_eq!(app.broker().queue_len(&q).await.expect("depth"), 1);
    let (ok, _, stderr) = demo(&broker, &backend, &["dead", "retry", "-Q", &q]);
    assert!(!ok && stderr.contains("--all"), "{stderr}");
    let out = demo_ok(&broker, &backend, &["dead", "retry", "-Q", &q, "--all"]);
    assert!(out.contains("retried 4 dead letters"), "{out}");
    assert_eq!(app.broker().queue_len(&q).await.expect("depth"), 5, "every add is back in {q}");
    let listed: Value =
        serde_json::from_str(&demo_ok(&broker, &backend, &["dead", "list", "-Q", &q, "--json"])).expect("json");
    assert_eq!(listed.as_array().map(Vec::len), Some(0), "{listed}");
    app.broker().purge(&q).await.expect("purge");
}

//! The built-in broker with real processes: two processes share one `log://` directory through its
//! owner's socket; `kill -9` of a worker mid-task loses nothing; `kill -9` of `broker serve` during a
//! stream of confirmed publishes (fsync `always`) loses none of them; an ETA task survives `kill -9`
//! of its worker and of `broker serve`.

use std::process::Command;
use std::time::Duration;

use celery_core::{Signature, TaskState};
use celery_tests::{demo_bin, free_port, wait_until, DemoProcess, TempDir};
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_and_a_sender_share_one_directory() {
    let dir = TempDir::new("shared");
    let url = dir.url("");
    let worker = DemoProcess::start_urls(&url, &url, &["worker", "-c", "4"]);
    assert!(worker.wait_log("worker ready", T), "{}", worker.log());
    // Another process: the CLI's send, through the worker's socket.
    let out = Command::new(demo_bin())
        .args(["send", "add", "--args", "[2, 3]", "--wait", "20", "--json"])
        .env("CELERY_BROKER_URL", &url)
        .env("CELERY_RESULT_BACKEND", &url)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let v: Value = serde_json::from_str(stdout.lines().last().unwrap_or("")).unwrap_or(Value::Null);
    assert_eq!(v["result"], json!(5), "{stdout}\n{}\n{}", String::from_utf8_lossy(&out.stderr), worker.log());
    // And this process too.
    let app = celery_worker::connect(&url, &url).await.unwrap();
    let r = app.send(Signature::by_name("add").args(json!([20, 22]))).await.unwrap();
    assert_eq!(r.get::<i64>(T).await.unwrap(), 42);
}

fn serve(dir: &TempDir, port: u16) -> DemoProcess {
    let listen = format!("127.0.0.1:{port}");
    let p = DemoProcess::start_urls(
        "unused://",
        "unused://",
        &["broker", "serve", "--data", &dir.0.display().to_string(), "--listen", &listen],
    );
    assert!(wait_until(T, || std::net::TcpStream::connect(&listen).is_ok()), "{}", p.log());
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_a_worker_mid_task_loses_nothing() {
    let dir = TempDir::new("kill-worker");
    let port = free_port();
    let _server = serve(&dir, port);
    let url = format!("log+tcp://127.0.0.1:{port}");
    let app = celery_worker::connect(&url, &url).await.unwrap();
    let mut ids = Vec::new();
    for _ in 0..6 {
        ids.push(app.send(Signature::by_name("sleep").args(json!([1500]))).await.unwrap());
    }
    let mut first = DemoProcess::start_urls(&url, &url, &["worker", "-c", "3"]);
    let end = tokio::time::Instant::now() + T;
    loop {
        let mut started = 0;
        for r in &ids {
            started += (r.state().await.unwrap() == TaskState::Started) as usize;
        }
        if started == 3 || tokio::time::Instant::now() > end {
            assert_eq!(started, 3, "{}", first.log());
            break;
        }
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    first.signal("KILL");
    first.wait_exit(Duration::from_secs(5)).expect("killed");
    let second = DemoProcess::start_urls(&url, &url, &["worker", "-c", "6"]);
    for r in &ids {
        assert_eq!(r.get::<u64>(T).await.unwrap(), 1500, "{}", second.log());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_broker_serve_loses_no_confirmed_publish() {
    let dir = TempDir::new("kill-server");
    let port = free_port();
    let mut server = serve(&dir, port);
    let url = format!("log+tcp://127.0.0.1:{port}");
    let broker = celery_core::scheme::connect_broker(&url).await.unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    // 16 concurrent publishers, each recording what the broker confirmed.
    let mut publishers = Vec::new();
    for p in 0..16 {
        let (broker, tx) = (broker.clone(), tx.clone());
        publishers.push(tokio::spawn(async move {
            for i in 0..100_000 {
                let sig = Signature::by_name("add").args(json!([p, i]));
                let msg = celery_core::protocol::Message::from_signature(&sig).unwrap();
                match broker.publish(&celery_core::routing::Route::queue("crash"), &msg).await {
                    Ok(()) => {
                        let _ = tx.send(msg.headers.id.clone());
                    }
                    Err(_) => return,
                }
            }
        }));
    }
    drop(tx);
    // Let a few thousand publishes through, then kill the server.
    let mut confirmed = std::collections::HashSet::new();
    while confirmed.len() < 3000 {
        confirmed.insert(tokio::time::timeout(T, rx.recv()).await.unwrap().unwrap());
    }
    server.signal("KILL");
    server.wait_exit(Duration::from_secs(5)).expect("server killed");
    for p in publishers {
        p.await.unwrap();
    }
    while let Some(id) = rx.recv().await {
        confirmed.insert(id);
    }
    drop(broker);
    // Restart on the same directory and read every stored message.
    let _again = serve(&dir, port);
    let broker = celery_core::scheme::connect_broker(&url).await.unwrap();
    let stored = broker.queue_len("crash").await.unwrap();
    assert!(stored as usize >= confirmed.len(), "stored {stored} < confirmed {}", confirmed.len());
    let mut consumer = broker.consume(&["crash".into()], 1000).await.unwrap();
    let mut seen = std::collections::HashSet::new();
    for _ in 0..stored {
        let mut d = tokio::time::timeout(T, consumer.next()).await.unwrap().unwrap();
        seen.insert(d.message().as_ref().unwrap().headers.id.clone());
        d.ack().await.unwrap();
    }
    let lost: Vec<_> = confirmed.difference(&seen).collect();
    assert!(lost.is_empty(), "{} confirmed publishes were lost, e.g. {:?}", lost.len(), lost.first());
}

/// An ETA task waiting in the log (its worker's consumer passed it) survives `kill -9` of the
/// worker and of `broker serve`; after the restart it runs at its eta.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_eta_task_survives_kill_9_of_its_worker_and_the_server() {
    let dir = TempDir::new("eta-restart");
    let port = free_port();
    let mut server = serve(&dir, port);
    let url = format!("log+tcp://127.0.0.1:{port}");
    let app = celery_worker::connect(&url, &url).await.unwrap();
    let mut worker = DemoProcess::start_urls(&url, &url, &["worker", "-c", "2"]);
    assert!(worker.wait_log("worker ready", T), "{}", worker.log());
    let eta = chrono::Utc::now() + chrono::Duration::seconds(4);
    let id = app.send(Signature::by_name("add").args(json!([20, 22])).eta(eta)).await.unwrap().id().to_owned();
    // Not ready (the consumer passed it into the log's delay), not leased.
    let end = tokio::time::Instant::now() + T;
    while app.broker().queue_len("celery").await.unwrap() != 0 {
        assert!(tokio::time::Instant::now() < end, "{}", worker.log());
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    drop(app);
    for p in [&mut worker, &mut server] {
        p.signal("KILL");
        p.wait_exit(Duration::from_secs(5)).expect("killed");
    }
    let _server = serve(&dir, port);
    let app = celery_worker::connect(&url, &url).await.unwrap();
    let next = DemoProcess::start_urls(&url, &url, &["worker", "-c", "2"]);
    assert_eq!(app.result(&id).get::<i64>(T).await.unwrap(), 42, "{}", next.log());
    let meta = app.result(&id).info().await.unwrap().expect("stored");
    let done = celery_core::protocol::parse_time(meta.date_done.as_deref().expect("date_done")).unwrap();
    assert!(done >= eta, "ran before its eta");
}

/// Runs `demo <args>` against `url` and returns its stdout.
fn demo(url: &str, args: &[&str]) -> String {
    let out = Command::new(demo_bin())
        .args(args)
        .env("CELERY_BROKER_URL", url)
        .env("CELERY_RESULT_BACKEND", url)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `kill -9` of the process that owns the directory: a worker connected through its socket takes
/// the directory over and runs every task, including the ones the dead owner had started.
#[test]
fn kill_9_of_the_owner_hands_the_directory_to_a_connected_worker() {
    let dir = TempDir::new("owner-kill");
    let url = dir.url("lease_timeout=1");
    let mut owner = DemoProcess::start_urls(&url, &url, &["worker", "-c", "2"]);
    assert!(owner.wait_log("worker ready", T), "{}", owner.log());
    let other = DemoProcess::start_urls(&url, &url, &["worker", "-c", "2"]);
    assert!(other.wait_log("worker ready", T), "{}", other.log());
    let ids: Vec<String> =
        (0..6).map(|_| demo(&url, &["send", "sleep", "--args", "[700]"]).trim().to_owned()).collect();
    let started = || ids.iter().any(|id| demo(&url, &["result", id, "--json"]).contains("\"STARTED\""));
    assert!(wait_until(T, started), "nothing started\n{}", owner.log());
    owner.signal("KILL");
    owner.wait_exit(Duration::from_secs(5)).expect("killed");
    assert!(other.wait_log("owns it now", T), "{}", other.log());
    for id in &ids {
        let out = demo(&url, &["result", id, "--wait", "20", "--json"]);
        let v: Value = serde_json::from_str(out.lines().last().unwrap_or("")).unwrap_or(Value::Null);
        assert_eq!(v["result"], json!(700), "{id}: {out}\n{}", other.log());
    }
}

/// A poison message that kills its worker, which owns the directory, never lets a lease expire:
/// its delivery count is persisted before it runs, so after `max_deliveries` crashes it goes to
/// the dead-letter queue with the reason, and the next worker stays up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_that_kills_its_owning_worker_is_dead_lettered_after_max_deliveries() {
    let dir = TempDir::new("poison");
    let url = dir.url("max_deliveries=3");
    let mut crashes = 0;
    // Each crashed worker's log, shown if a delivery count goes missing.
    let mut logs = Vec::new();
    let demo = |args: &[&str]| {
        Command::new(demo_bin())
            .args(args)
            .env("CELERY_BROKER_URL", &url)
            .env("CELERY_RESULT_BACKEND", &url)
            .output()
            .unwrap()
    };
    let survivor = loop {
        assert!(crashes <= 3, "still crashing after {crashes} deliveries:\n{}", logs.join("\n---\n"));
        // The first worker owns the directory and starts on another queue: the task is sent
        // through it and answered before anything runs it. (Had it run at once, the owner's crash
        // could cut the sender's reply, and the sender's retry, taking the directory over, would
        // append a second copy: publishing is at-least-once.)
        let queue = if crashes == 0 { "hold" } else { "celery" };
        let mut worker = DemoProcess::start_urls(&url, &url, &["worker", "-c", "1", "-Q", queue]);
        assert!(worker.wait_log("worker ready", T), "{}", worker.log());
        if crashes == 0 {
            let out = demo(&["send", "crash"]);
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
            logs.push(format!("send: {}", String::from_utf8_lossy(&out.stderr)));
            // Then it consumes `celery`: its delivery is the first. The reply may be cut by the crash.
            let out = demo(&["control", "add_consumer", "celery", "-t", "2"]);
            logs.push(format!("control: {}", String::from_utf8_lossy(&out.stderr)));
        }
        match worker.wait_exit(Duration::from_secs(3)) {
            Some(status) => {
                assert_eq!(status.code(), Some(70), "{}", worker.log());
                logs.push(worker.log());
                crashes += 1;
            }
            None => break worker,
        }
    };
    assert_eq!(crashes, 3, "delivered max_deliveries times, then dead-lettered");
    drop(survivor);
    let app = celery_worker::connect(&url, &url).await.unwrap();
    assert_eq!(app.broker().queue_len("celery").await.unwrap(), 0);
    assert_eq!(app.broker().queue_len("celery.dead").await.unwrap(), 1, "{}", logs.join("\n---\n"));
    let store = broker_backends::log::LogBroker::connect(&url).await.unwrap();
    let mut dead = store
        .stream(
            "inspect",
            "celery.dead",
            broker_backends::log::StartFrom::Earliest,
            broker_backends::log::Commit::AfterProcessing,
        )
        .await
        .unwrap();
    let rec = dead.poll(10, Duration::from_secs(5)).await.unwrap();
    let payload = String::from_utf8_lossy(&rec[0].record.payload).into_owned();
    assert!(payload.contains("delivered 3 times without being acknowledged (max_deliveries)"), "{payload}");
}

//! The built-in broker with real processes: two processes share one `log://` directory through its
//! owner's socket; `kill -9` of a worker mid-task loses nothing; `kill -9` of `broker serve` during a
//! stream of confirmed publishes (fsync `always`) loses none of them.

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
        let d = tokio::time::timeout(T, consumer.next()).await.unwrap().unwrap();
        seen.insert(d.message.as_ref().unwrap().headers.id.clone());
        d.ack().await.unwrap();
    }
    let lost: Vec<_> = confirmed.difference(&seen).collect();
    assert!(lost.is_empty(), "{} confirmed publishes were lost, e.g. {:?}", lost.len(), lost.first());
}

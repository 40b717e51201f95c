//! `worker --metrics HOST:PORT`: Prometheus text over HTTP, with the counters of a known workload.

use std::io::{Read, Write};
use std::time::Duration;

use celery_core::Signature;
use celery_tests::{free_port, wait_until, DemoProcess, TempDir};
use serde_json::json;

const T: Duration = Duration::from_secs(30);

/// `GET /metrics` with a plain HTTP/1.0 request.
fn scrape(port: u16) -> String {
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else { return String::new() };
    let _ = s.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n");
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_a_known_workload() {
    let dir = TempDir::new("metrics");
    let url = dir.url("");
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let w = DemoProcess::start_urls(&url, &url, &["worker", "-c", "4", "--metrics", &listen]);
    assert!(w.wait_log("worker ready", T), "{}", w.log());
    let app = celery_worker::connect(&url, &url).await.unwrap();
    let adds = app.send_batch((0..5).map(|i| Signature::by_name("add").args(json!([i, 1])))).await.unwrap();
    let fails = app.send_batch((0..2).map(|_| Signature::by_name("fail").args(json!(["no"])))).await.unwrap();
    for r in &adds {
        r.get::<i64>(T).await.unwrap();
    }
    for r in &fails {
        assert!(r.get::<()>(T).await.is_err());
    }
    let expected = [
        "celery_tasks_succeeded_total{task=\"add\"} 5",
        "celery_tasks_failed_total{task=\"fail\"} 2",
        "celery_tasks_received_total{task=\"add\"} 5",
        "celery_task_runtime_seconds_count{task=\"add\"} 5",
        "celery_worker_in_flight 0",
        "celery_queue_depth{queue=\"celery\"}",
    ];
    let mut last = String::new();
    let ok = wait_until(T, || {
        last = scrape(port);
        expected.iter().all(|e| last.contains(e))
    });
    assert!(ok, "missing some of {expected:?} in:\n{last}\n{}", w.log());
    assert!(last.contains("text/plain"), "{last}");
}

/// A worker on `log+tcp://` whose `broker serve` is killed and restarted counts the reconnect and
/// goes on working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_broker_reconnects() {
    let dir = TempDir::new("metrics-reconnect");
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let data = dir.0.display().to_string();
    let serve = || {
        DemoProcess::start_urls("unused://", "unused://", &["broker", "serve", "--data", &data, "--listen", &listen])
    };
    let mut server = serve();
    assert!(wait_until(T, || std::net::TcpStream::connect(&listen).is_ok()), "{}", server.log());
    let url = format!("log+tcp://{listen}");
    let mport = free_port();
    let w = DemoProcess::start_urls(&url, &url, &["worker", "-c", "2", "--metrics", &format!("127.0.0.1:{mport}")]);
    assert!(w.wait_log("worker ready", T), "{}", w.log());
    server.signal("KILL");
    server.wait_exit(Duration::from_secs(5)).expect("killed");
    let _server = serve();
    assert!(wait_until(T, || std::net::TcpStream::connect(&listen).is_ok()));
    let app = celery_worker::connect(&url, &url).await.unwrap();
    let r = app.send(Signature::by_name("add").args(json!([2, 2]))).await.unwrap();
    assert_eq!(r.get::<i64>(T).await.unwrap(), 4, "{}", w.log());
    let mut last = String::new();
    let ok = wait_until(T, || {
        last = scrape(mport);
        last.contains("celery_broker_reconnects_total{broker=\"log\"}")
    });
    assert!(ok, "{last}\n{}", w.log());
}

//! `broker serve`'s per-connection limits with real processes: a worker and a producer keep working
//! while the server closes their idle connections, and a connection over `--max-connections` is
//! refused with the limit while the admitted clients keep working.

use std::io::Read;
use std::time::Duration;

use celery_core::Signature;
use celery_tests::{wait_until, DemoProcess, TempDir};
use serde_json::json;

const T: Duration = Duration::from_secs(30);

fn serve(dir: &TempDir, port: u16, limits: &[&str]) -> DemoProcess {
    let listen = format!("127.0.0.1:{port}");
    let data = dir.0.display().to_string();
    let args = [&["broker", "serve", "--data", &data, "--listen", &listen][..], limits].concat();
    let p = DemoProcess::start_urls("unused://", "unused://", &args);
    assert!(wait_until(T, || std::net::TcpStream::connect(&listen).is_ok()), "{}", p.log());
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_and_a_producer_keep_working_across_idle_closes() {
    let dir = TempDir::new("limits-idle");
    let port = celery_tests::free_port();
    let server = serve(&dir, port, &["--idle-timeout", "1"]);
    let url = format!("log+tcp://127.0.0.1:{port}");
    let worker = DemoProcess::start_urls(&url, &url, &["worker", "-c", "2"]);
    assert!(worker.wait_log("worker ready", T), "{}", worker.log());
    let app = celery_worker::connect(&url, &url).await.unwrap();
    for round in 0..3i64 {
        let r = app.send(Signature::by_name("add").args(json!([round, 40]))).await.unwrap();
        assert_eq!(r.get::<i64>(T).await.unwrap(), round + 40, "{}\n{}", worker.log(), server.log());
        // Silence longer than the idle timeout: the server may close any connection that holds
        // nothing; the worker's consumer keeps its own, and a closed one is reopened on demand.
        tokio::time::sleep(Duration::from_millis(1500)).await;
    }
}

/// A connection that greets (HELLO, no token): Some while the server admits it, None when it is
/// refused with the limit.
fn greeted(port: u16) -> Option<std::net::TcpStream> {
    use std::io::Write;
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    // len 14 | version 2 | HELLO (1) | id 1 | an empty token
    s.write_all(&[14, 0, 0, 0, 2, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]).unwrap();
    let mut buf = [0u8; 256];
    let n = s.read(&mut buf).unwrap();
    assert!(n >= 14, "an answer");
    if buf[5] == 100 {
        return Some(s);
    }
    assert_eq!(buf[5], 101, "an ERR frame");
    let text = String::from_utf8_lossy(&buf[18..n]).into_owned();
    assert!(text.contains("too many connections (limit 6)"), "{text}");
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_over_the_limit_is_refused_and_admitted_clients_keep_working() {
    let dir = TempDir::new("limits-cap");
    let port = celery_tests::free_port();
    let server = serve(&dir, port, &["--max-connections", "6"]);
    let url = format!("log+tcp://127.0.0.1:{port}");
    let worker = DemoProcess::start_urls(&url, &url, &["worker", "-c", "2"]);
    assert!(worker.wait_log("worker ready", T), "{}", worker.log());
    let app = celery_worker::connect(&url, &url).await.unwrap();
    let r = app.send(Signature::by_name("add").args(json!([1, 2]))).await.unwrap();
    assert_eq!(r.get::<i64>(T).await.unwrap(), 3);

    // Greeting connections take the free slots; the next one is refused.
    let mut admitted = Vec::new();
    loop {
        match greeted(port) {
            Some(s) => admitted.push(s),
            None => break,
        }
        assert!(admitted.len() < 6, "no connection was refused\n{}", server.log());
    }
    // Silent connections take no slot: however many, they only close each other.
    let silent: Vec<_> = (0..200).map(|_| std::net::TcpStream::connect(("127.0.0.1", port)).unwrap()).collect();
    // A new client is told why (connecting may be lazy: then its first request is).
    let late = match celery_worker::connect(&url, &url).await {
        Err(e) => e.to_string(),
        Ok(other) => other.send(Signature::by_name("add").args(json!([0, 0]))).await.unwrap_err().to_string(),
    };
    assert!(late.contains("too many connections (limit 6)"), "{late}");

    // The admitted producer and worker keep working.
    let r = app.send(Signature::by_name("add").args(json!([20, 22]))).await.unwrap();
    assert_eq!(r.get::<i64>(T).await.unwrap(), 42, "{}", worker.log());

    // A freed slot goes to the next client that greets, whatever the silent connections do.
    drop(admitted.pop());
    assert!(wait_until(T, || greeted(port).is_some()), "{}", server.log());
    drop(silent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_started_before_its_broker_waits_for_it() {
    let dir = TempDir::new("limits-startup");
    let port = celery_tests::free_port();
    let url = format!("log+tcp://127.0.0.1:{port}");
    let mut worker = DemoProcess::start_urls(&url, &url, &["worker", "-c", "2"]);
    assert!(worker.wait_log("cannot connect yet", T), "{}", worker.log());
    assert!(worker.wait_exit(Duration::from_millis(500)).is_none(), "it waits: {}", worker.log());
    let _server = serve(&dir, port, &[]);
    assert!(worker.wait_log("worker ready", T), "{}", worker.log());
    let app = celery_worker::connect(&url, &url).await.unwrap();
    let r = app.send(Signature::by_name("add").args(json!([20, 22]))).await.unwrap();
    assert_eq!(r.get::<i64>(T).await.unwrap(), 42, "{}", worker.log());
}

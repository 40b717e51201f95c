//! The dashboard in a real browser: headless Chromium (Debian's `chromium`, driven by
//! `playwright-core` from npm, both installed here on first use) loads `monitor` while a worker
//! with events runs a workload, sees the worker and its task counts, a running task's progress bar
//! move, retries a dead letter through the page and saves a screenshot (copied to `$CELERY_RS_SCREENSHOT` when set).

use std::process::Command;
use std::time::Duration;

use celery_core::Signature;
use celery_tests::{browser, free_port, wait_until, DemoProcess, TempDir};
use serde_json::json;

const T: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_works_in_a_browser() {
    let Some(pw) = browser::playwright("monitor_browser") else {
        return;
    };
    let dir = TempDir::new("monitor");
    let url = dir.url("");
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let monitor = DemoProcess::start_urls(&url, &url, &["monitor", "--allow-control", "--listen", &listen]);
    assert!(wait_until(T, || std::net::TcpStream::connect(&listen).is_ok()), "{}", monitor.log());
    let host = format!("browser-{}@test", std::process::id());
    let worker = DemoProcess::start_urls(&url, &url, &["worker", "-E", "-c", "2", "-n", &host]);
    assert!(worker.wait_log("worker ready", T), "{}", worker.log());
    let app = celery_worker::connect(&url, &url).await.unwrap();
    for i in 0..4 {
        let r = app.send(Signature::by_name("add").args(json!([i, i]))).await.unwrap();
        assert_eq!(r.get::<i64>(T).await.unwrap(), 2 * i);
    }
    let bad = app.send(Signature::by_name("add").args(json!([1, 2, 3]))).await.unwrap();
    assert!(bad.get::<i64>(T).await.is_err());
    // Runs through the page's checks (100 steps of 300 ms), reporting PROGRESS after each.
    let long = app.send(Signature::by_name("progress").args(json!([100, 300]))).await.unwrap();

    let script = browser::script(&pw, "monitor.mjs");
    let shot = dir.0.join("monitor.png");
    let page = format!("http://{listen}/");
    let out = Command::new("node")
        .arg(&script)
        .args([page.as_str(), host.as_str(), bad.id(), shot.to_str().unwrap(), long.id()])
        .output()
        .expect("run node");
    let report = format!(
        "{}{}\nmonitor:\n{}\nworker:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        monitor.log(),
        worker.log()
    );
    assert!(out.status.success(), "{report}");
    let png = std::fs::read(&shot).unwrap_or_default();
    assert!(png.starts_with(b"\x89PNG"), "no screenshot\n{report}");
    if let Ok(keep) = std::env::var("CELERY_RS_SCREENSHOT") {
        std::fs::write(keep, &png).unwrap();
    }
}

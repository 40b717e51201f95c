//! The dashboard in a real browser: headless Chromium (Debian's `chromium`, driven by
//! `playwright-core` from npm, both installed here on first use; without them the test is skipped,
//! or fails under `CELERY_REQUIRE_SERVICES=1`) loads `monitor` while a worker with events runs a
//! workload, one step per run of `tests/browser/monitor.mjs`:
//! 1. the worker and its task counts appear, and a running task's progress bar moves;
//! 2. the queue is paused from its button, a task sent meanwhile waits (the page shows it), and
//!    resuming from the button runs it;
//! 3. "retry matching" retries the dead letters a filter matches, and only those;
//! 4. after the monitor is killed and started again, the history search finds the tasks of the
//!    first one by argument text over two pages, and the failed ones by state.
//!
//! With `CELERY_RS_SCREENSHOT_DIR` set, its screenshots are saved there (`monitor.png`,
//! `monitor-dead-letters.png`, `monitor-history.png`): that is how those in `docs/` are made.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use celery_core::Signature;
use celery_tests::{browser, free_port, http, wait_until, DemoProcess, TempDir};
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(30);
/// Tasks sent for the history search (more than a page of 20).
const HISTORY_TASKS: usize = 25;

/// The longest a step may take.
const STEP: Duration = Duration::from_secs(90);

/// Runs one step of `monitor.mjs` (killed after [`STEP`]); panics with its output and the
/// processes' logs if it fails.
fn step(script: &Path, args: &[&str], logs: &dyn Fn() -> String) {
    let out = std::env::temp_dir().join(format!("monitor-step-{}.log", uuid::Uuid::new_v4().simple()));
    let file = std::fs::File::create(&out).unwrap();
    let mut child = Command::new("node")
        .arg(script)
        .args(args)
        .stdout(file.try_clone().unwrap())
        .stderr(file)
        .spawn()
        .expect("run node");
    let mut status = None;
    let ended = wait_until(STEP, || {
        status = child.try_wait().ok().flatten();
        status.is_some()
    });
    if !ended {
        let _ = child.kill();
        let _ = child.wait();
    }
    let report = std::fs::read_to_string(&out).unwrap_or_default();
    let _ = std::fs::remove_file(&out);
    assert!(status.is_some_and(|s| s.success()), "step {args:?} (ended: {ended}): {report}\n{}", logs());
    eprintln!("monitor_browser: {report}");
}

/// `monitor --allow-control` on a free loopback port; returns it and its address.
fn monitor(url: &str) -> (DemoProcess, String) {
    let listen = format!("127.0.0.1:{}", free_port());
    let m = DemoProcess::start_urls(url, url, &["monitor", "--allow-control", "--listen", &listen]);
    assert!(wait_until(T, || std::net::TcpStream::connect(&listen).is_ok()), "{}", m.log());
    (m, listen)
}

/// Checks a screenshot and copies it to `$CELERY_RS_SCREENSHOT_DIR` when set.
fn keep(shot: &Path) {
    let png = std::fs::read(shot).unwrap_or_default();
    assert!(png.starts_with(b"\x89PNG"), "no screenshot at {}", shot.display());
    if let Ok(dir) = std::env::var("CELERY_RS_SCREENSHOT_DIR") {
        let dir = PathBuf::from(dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(shot.file_name().unwrap()), &png).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_works_in_a_browser() {
    let Some(pw) = browser::playwright("monitor_browser") else {
        return;
    };
    let script = browser::script(&pw, "monitor.mjs");
    let dir = TempDir::new("monitor");
    let url = dir.url("");
    // The worker owns the directory; the monitors reach it through its socket.
    let host = format!("browser-{}@test", std::process::id());
    let worker = DemoProcess::start_urls(&url, &url, &["worker", "-E", "-c", "2", "-n", &host]);
    assert!(worker.wait_log("worker ready", T), "{}", worker.log());
    let (mut first, listen) = monitor(&url);
    let page = format!("http://{listen}/");
    let logs = || format!("monitor:\n{}\nworker:\n{}", first.log(), worker.log());
    let app = celery_worker::connect(&url, &url).await.unwrap();
    for i in 0..4 {
        let r = app.send(Signature::by_name("add").args(json!([i, i]))).await.unwrap();
        assert_eq!(r.get::<i64>(T).await.unwrap(), 2 * i);
    }
    let mut bad = Vec::new();
    for first_arg in [111, 999] {
        let r = app.send(Signature::by_name("add").args(json!([first_arg, 2, 3]))).await.unwrap();
        assert!(r.get::<i64>(T).await.is_err());
        bad.push(r.id().to_owned());
    }
    // Runs through the first step (100 steps of 100 ms), reporting PROGRESS after each.
    let long = app.send(Signature::by_name("progress").args(json!([100, 100]))).await.unwrap();

    let shot = |name: &str| dir.0.join(name);
    let main_shot = shot("monitor.png");
    step(&script, &["live", &page, &host, long.id(), main_shot.to_str().unwrap()], &logs);
    keep(&main_shot);

    step(&script, &["pause", &page], &logs);
    assert!(worker.wait_log("cancelled consuming queue=celery", T), "{}", logs());
    let waiting = app.send(Signature::by_name("add").args(json!([5, 5]))).await.unwrap();
    step(&script, &["resume", &page, waiting.id()], &logs);
    assert!(worker.wait_log("started consuming queue=celery", T), "{}", logs());
    assert_eq!(waiting.get::<i64>(T).await.unwrap(), 10);

    let dead_shot = shot("monitor-dead-letters.png");
    step(&script, &["dead", &page, "999", &bad[1], &bad[0], dead_shot.to_str().unwrap()], &logs);
    keep(&dead_shot);

    // Tasks for the history, written by the first monitor, found by the second.
    let mut sent = Vec::new();
    for i in 0..HISTORY_TASKS {
        sent.push(app.send(Signature::by_name("add").args(json!([8_000_000 + i, i]))).await.unwrap());
    }
    for r in &sent {
        r.get::<i64>(T).await.unwrap();
    }
    let mut last = String::new();
    let written = wait_until(T, || {
        let a = http(&listen, "GET", "/api/history?text=80000&state=SUCCESS&limit=100", &[("Host", &listen)]);
        last = a.body;
        serde_json::from_str::<Value>(&last)
            .is_ok_and(|v| v["tasks"].as_array().is_some_and(|t| t.len() == HISTORY_TASKS))
    });
    assert!(written, "the history did not get the tasks: {last}\n{}", logs());
    first.signal("KILL");
    first.wait_exit(T).expect("the monitor ends on SIGKILL");
    drop(first);

    let (second, listen) = monitor(&url);
    let logs = || format!("monitor:\n{}\nworker:\n{}", second.log(), worker.log());
    let page = format!("http://{listen}/");
    let history_shot = shot("monitor-history.png");
    let count = HISTORY_TASKS.to_string();
    let failed = bad.join(",");
    step(&script, &["history", &page, "80000", &count, &failed, history_shot.to_str().unwrap()], &logs);
    keep(&history_shot);
}

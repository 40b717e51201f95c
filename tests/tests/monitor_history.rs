//! The monitor's task history outlives the monitor: a worker with events runs tasks, the monitor
//! (a process of its own) writes them to the broker's or result backend's history store, is
//! killed and started again, and the new one finds them over HTTP by name, state, worker, id,
//! argument text and time, a page at a time; its task list shows them without a new event; and
//! the store forgets what is beyond `--history-max` and older than `--history-retention`. On the
//! built-in broker (its compacted results log), Redis (a capped index), PostgreSQL (a table) and
//! RabbitMQ (through its Redis result backend).

use std::collections::HashSet;
use std::time::Duration;

use celery_core::{App, Signature};
use celery_tests::{free_port, http, wait_until, DemoProcess, Target};
use futures::StreamExt;
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(30);

/// `monitor` with these extra options on a free loopback port; returns it and its address.
fn monitor(broker: &str, backend: &str, extra: &[&str]) -> (DemoProcess, String) {
    let listen = format!("127.0.0.1:{}", free_port());
    let mut args = vec!["monitor", "--listen", listen.as_str()];
    args.extend_from_slice(extra);
    let m = DemoProcess::start_urls(broker, backend, &args);
    assert!(wait_until(T, || std::net::TcpStream::connect(&listen).is_ok()), "{}", m.log());
    (m, listen)
}

/// `GET path` on the monitor: status and JSON body.
fn get(addr: &str, path: &str) -> (u16, Value) {
    let a = http(addr, "GET", path, &[("Host", addr)]);
    (a.status, serde_json::from_str(&a.body).unwrap_or(Value::String(a.body)))
}

/// The ids of a history page's tasks, in order.
fn ids(page: &Value) -> Vec<String> {
    page["tasks"].as_array().into_iter().flatten().map(|t| t["id"].as_str().unwrap_or_default().to_owned()).collect()
}

/// Runs `n` adds with arguments `[7000000 + i, i]` (each waited for); their ids, oldest first.
async fn adds(app: &App, from: usize, n: usize) -> Vec<String> {
    let mut out = Vec::new();
    for i in from..from + n {
        let r = app.send(Signature::by_name("add").args(json!([7_000_000 + i, i]))).await.unwrap();
        assert_eq!(r.get::<i64>(T).await.unwrap(), 7_000_000 + 2 * i as i64);
        out.push(r.id().to_owned());
    }
    out
}

/// Waits until the history holds exactly `want` (as a set) in final states.
fn wait_history(addr: &str, want: &[String], log: impl Fn() -> String) {
    let want: HashSet<&str> = want.iter().map(String::as_str).collect();
    let mut last = Value::Null;
    let ok = wait_until(T, || {
        let (status, page) = get(addr, "/api/history?limit=500");
        let found: HashSet<String> = ids(&page).into_iter().collect();
        let done = page["tasks"]
            .as_array()
            .into_iter()
            .flatten()
            .all(|t| matches!(t["state"].as_str(), Some("SUCCESS" | "FAILURE")));
        last = page;
        status == 200 && done && found.len() == want.len() && want.iter().all(|id| found.contains(*id))
    });
    assert!(ok, "history {last}\nwanted {want:?}\n{}", log());
}

async fn history_survives_a_monitor_restart(target: Target) {
    let (broker, backend) = target.urls();
    let host = format!("hist-{}@test", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let worker = DemoProcess::start_urls(&broker, &backend, &["worker", "-E", "-c", "2", "-n", &host]);
    assert!(worker.wait_log("worker ready", T), "{}", worker.log());
    let (mut first, addr) = monitor(&broker, &backend, &[]);
    let app = celery_worker::connect(&broker, &backend).await.unwrap();
    let started = celery_core::event::now();
    let mut all = adds(&app, 0, 5).await;
    let bad = app.send(Signature::by_name("add").args(json!([1, 2, 3]))).await.unwrap();
    assert!(bad.get::<i64>(T).await.is_err());
    all.push(bad.id().to_owned());
    wait_history(&addr, &all, || format!("{}\n{}", first.log(), worker.log()));
    let (_, page) = get(&addr, "/api/history");
    assert!(page["kept"].as_str().unwrap().starts_with("kept in the"), "{page}");

    // Killed and started again: what the first one saw is found by the second.
    first.signal("KILL");
    first.wait_exit(T).expect("monitor killed");
    let (second, addr) = monitor(&broker, &backend, &[]);
    let log = || format!("{}\n{}", second.log(), worker.log());
    let (status, page) = get(&addr, "/api/history?limit=500");
    assert_eq!(status, 200, "{page}");
    let mut newest_first = all.clone();
    newest_first.reverse();
    assert_eq!(ids(&page), newest_first, "{}", log());
    let (_, failed) = get(&addr, "/api/history?state=failure&name=ADD");
    assert_eq!(ids(&failed), [bad.id()], "{failed}");
    assert!(failed["tasks"][0]["exception"].as_str().is_some_and(|e| !e.is_empty()), "{failed}");
    let (_, by_arg) = get(&addr, "/api/history?text=7000003");
    assert_eq!(ids(&by_arg), [all[3].as_str()], "{by_arg}");
    let (_, by_worker) = get(&addr, &format!("/api/history?worker={}", &host[..12]));
    assert_eq!(ids(&by_worker).len(), 6, "{by_worker}");
    let (_, by_id) = get(&addr, &format!("/api/history?id={}", &all[1][..8]));
    assert_eq!(ids(&by_id), [all[1].as_str()], "{by_id}");
    let (_, later) = get(&addr, &format!("/api/history?since={}", started + 3600.0));
    assert!(ids(&later).is_empty(), "{later}");
    let (_, earlier) = get(&addr, &format!("/api/history?until={}", started - 3600.0));
    assert!(ids(&earlier).is_empty(), "{earlier}");
    let (_, window) = get(&addr, &format!("/api/history?since={}&until={}", started - 1.0, started + 3600.0));
    assert_eq!(ids(&window).len(), 6, "{window}");

    // Pages of two walk everything once, newest first.
    let (mut walked, mut cursor) = (Vec::new(), None::<String>);
    for _ in 0..10 {
        let path = match &cursor {
            Some(c) => format!("/api/history?limit=2&cursor={}", c.replace(':', "%3A")),
            None => "/api/history?limit=2".to_owned(),
        };
        let (status, page) = get(&addr, &path);
        assert_eq!(status, 200, "{page}");
        assert!(ids(&page).len() <= 2);
        walked.extend(ids(&page));
        match page["next"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => break,
        }
    }
    assert_eq!(walked, newest_first);

    // Read back at start: the task list and a task's detail show them with no new event.
    let (_, state) = get(&addr, "/api/state");
    let listed: HashSet<&str> = state["tasks"].as_array().unwrap().iter().filter_map(|t| t["id"].as_str()).collect();
    assert!(all.iter().all(|id| listed.contains(id.as_str())), "{state}");
    let (_, detail) = get(&addr, &format!("/api/task/{}", all[0]));
    assert_eq!(detail["events"]["name"], "add", "{detail}");

    // Every input is bounded.
    let long = "x".repeat(300);
    for bad_query in [format!("name={long}"), "cursor=nonsense".to_owned(), "since=abc".to_owned()] {
        let (status, body) = get(&addr, &format!("/api/history?{bad_query}"));
        assert_eq!(status, 400, "{bad_query}: {body}");
    }
    let (status, _) = get(&addr, "/api/history?limit=1000000");
    assert_eq!(status, 200);
    drop(second);

    // At most --history-max: a new task pushes the oldest out.
    let (third, addr) = monitor(&broker, &backend, &["--history-max", "3"]);
    all.extend(adds(&app, 10, 1).await);
    wait_history(&addr, &all[all.len() - 3..], || format!("{}\n{}", third.log(), worker.log()));
    drop(third);

    // Nothing older than --history-retention: once the earlier tasks are over a second old, a new
    // task's write forgets them.
    let (fourth, addr) = monitor(&broker, &backend, &["--history-retention", "1s"]);
    let last_old = celery_core::event::now();
    assert!(wait_until(T, || celery_core::event::now() > last_old + 1.5));
    let fresh = adds(&app, 20, 1).await;
    wait_history(&addr, &fresh, || format!("{}\n{}", fourth.log(), worker.log()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_survives_a_monitor_restart_on_the_log_broker() {
    history_survives_a_monitor_restart(Target::log()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_survives_a_monitor_restart_on_redis() {
    if let Some(t) = Target::redis() {
        history_survives_a_monitor_restart(t).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_survives_a_monitor_restart_on_postgres() {
    if let Some(t) = Target::postgres() {
        history_survives_a_monitor_restart(t).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_survives_a_monitor_restart_on_rabbitmq_through_its_result_backend() {
    if let Some(t) = Target::amqp() {
        history_survives_a_monitor_restart(t).await;
    }
}

/// RabbitMQ with `rpc://` results keeps no history: the monitor keeps it in memory, and the page
/// and the log say so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_store_the_history_is_in_memory_and_says_so() {
    if !celery_tests::amqp_available("monitor_history (rpc)") {
        return;
    }
    let vhost = celery_tests::AmqpVhost::new();
    let broker = vhost.url();
    let host = format!("mem-{}@test", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let worker = DemoProcess::start_urls(&broker, "rpc://", &["worker", "-E", "-n", &host]);
    assert!(worker.wait_log("worker ready", T), "{}", worker.log());
    let (monitor, addr) = monitor(&broker, "rpc://", &[]);
    assert!(monitor.wait_log("task history in memory only", T), "{}", monitor.log());
    let app = celery_worker::connect(&broker, "rpc://").await.unwrap();
    let ran = adds(&app, 0, 1).await;
    wait_history(&addr, &ran, || format!("{}\n{}", monitor.log(), worker.log()));
    let (_, page) = get(&addr, "/api/history");
    assert_eq!(page["memory_only"], true, "{page}");
    assert!(page["kept"].as_str().unwrap().contains("lost on restart"), "{page}");
}

/// Tasks of the burst tests: as many as a user's burst that the issue measured losing a third of.
const BURST: usize = 5000;

/// Every task of the history whose state is final, walking all its pages (newest first).
fn final_ids(addr: &str) -> Result<HashSet<String>, String> {
    let mut found = HashSet::new();
    let mut path = "/api/history?limit=500".to_owned();
    loop {
        let (status, page) = get(addr, &path);
        if status != 200 {
            return Err(format!("{status}: {page}"));
        }
        for t in page["tasks"].as_array().into_iter().flatten() {
            if matches!(t["state"].as_str(), Some("SUCCESS" | "FAILURE")) {
                found.insert(t["id"].as_str().unwrap_or_default().to_owned());
            }
        }
        match page["next"].as_str() {
            Some(next) => path = format!("/api/history?limit=500&cursor={}", next.replace(':', "%3A")),
            None => return Ok(found),
        }
    }
}

/// The lines of `log` that carry `needle` (the counts a worker or monitor logs about its events).
fn lines_with(log: &str, needle: &str) -> String {
    log.lines().filter(|l| l.contains(needle)).collect::<Vec<_>>().join("\n")
}

/// A burst of [`BURST`] adds, sent 32 at a time without waiting for any to run, run by a worker
/// with 64 at once: every one of them reaches the history in a final state (the events are sent in
/// batches, and what is still not final is settled from the result backend).
async fn a_burst_reaches_the_history_complete(target: Target) {
    let (broker, backend) = target.urls();
    let host = format!("burst-{}@test", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let (monitor, addr) = monitor(&broker, &backend, &[]);
    let mut worker = DemoProcess::start_urls(&broker, &backend, &["worker", "-E", "-c", "64", "-n", &host]);
    assert!(worker.wait_log("worker ready", T), "{}", worker.log());
    let app = celery_worker::connect(&broker, &backend).await.unwrap();
    let sent_at = std::time::Instant::now();
    // 32 sends in flight at once, as a burst of web requests would.
    let sends = (0..BURST).map(|i| app.send(Signature::by_name("add").args(json!([i, i]))));
    let sent: HashSet<String> =
        futures::stream::iter(sends).buffer_unordered(32).map(|r| r.unwrap().id().to_owned()).collect().await;
    assert_eq!(sent.len(), BURST);
    let sending = sent_at.elapsed();
    let deadline = std::time::Instant::now() + Duration::from_secs(240);
    let (mut found, mut grew_at) = (HashSet::new(), std::time::Instant::now());
    // Until all are there, the deadline passes, or nothing new arrived for 30 s (then it fails).
    while std::time::Instant::now() < deadline && grew_at.elapsed() < Duration::from_secs(30) {
        let now = final_ids(&addr).unwrap_or_default();
        if now.len() > found.len() {
            grew_at = std::time::Instant::now();
        }
        found = now;
        if sent.iter().all(|id| found.contains(id)) {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let missing = sent.iter().filter(|id| !found.contains(*id)).count();
    worker.signal("TERM");
    let stopped = worker.wait_exit(T).is_some();
    eprintln!(
        "burst of {BURST} on {broker}: sent in {sending:?}, {} in the history in a final state after {:?}\n{}\n{}",
        BURST - missing,
        sent_at.elapsed(),
        lines_with(&worker.log(), "events:"),
        lines_with(&monitor.log(), "monitor: history"),
    );
    assert_eq!(missing, 0, "{missing} of {BURST} tasks missing from the history\n{}", monitor.log());
    assert!(stopped, "{}", worker.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_reaches_the_history_complete_on_the_log_broker() {
    a_burst_reaches_the_history_complete(Target::log()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_reaches_the_history_complete_on_redis() {
    if let Some(t) = Target::redis() {
        a_burst_reaches_the_history_complete(t).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_reaches_the_history_complete_on_postgres() {
    if let Some(t) = Target::postgres() {
        a_burst_reaches_the_history_complete(t).await;
    }
}

//! The monitor over HTTP, as a separate process: looking at dead letters changes nothing (log
//! broker, through the owner's socket, and Redis), a wrong Host is refused, a cross-site POST is
//! refused, a POST with the page's CSRF token works, and every answer carries the security headers;
//! bulk dead-letter actions take only what their filter matches, and pause/resume reach a worker.

use std::time::Duration;

use celery_core::broker::{DEAD_LETTER_QUEUE, DEAD_LETTER_REASON};
use celery_core::protocol::Message;
use celery_core::routing::Route;
use celery_core::{App, Signature};
use celery_tests::{consumed_queues, free_port, http, redis_available, wait_until, DemoProcess, RedisEnv, TempDir};
use serde_json::json;

const T: Duration = Duration::from_secs(30);
/// How many times the tests list the dead letters (more than `max_deliveries`).
const LOOKS: usize = 12;

/// `monitor --allow-control` on a free loopback port; returns it and its address.
fn monitor(broker: &str, backend: &str) -> (DemoProcess, String) {
    let listen = format!("127.0.0.1:{}", free_port());
    let m = DemoProcess::start_urls(broker, backend, &["monitor", "--allow-control", "--listen", &listen]);
    assert!(wait_until(T, || std::net::TcpStream::connect(&listen).is_ok()), "{}", m.log());
    (m, listen)
}

/// Publishes `n` dead letters of queue `celery` (as a worker dead-letters them); their ids.
async fn dead_letters(app: &App, n: usize) -> Vec<String> {
    let mut ids = Vec::new();
    for i in 0..n {
        let mut m = Message::from_signature(&Signature::by_name("add").args(json!([i, "x"]))).unwrap();
        m.headers.extra.insert(DEAD_LETTER_REASON.into(), "TypeError: bad input".into());
        m.headers.extra.insert(DEAD_LETTER_QUEUE.into(), "celery".into());
        app.broker().publish(&Route::queue("celery.dead"), &m).await.unwrap();
        ids.push(m.headers.id);
    }
    ids
}

/// Lists the dead letters through the monitor `LOOKS` times; each time they are all there, in order.
fn look(addr: &str, ids: &[String], log: impl Fn() -> String) {
    for i in 0..LOOKS {
        let a = http(addr, "GET", "/api/dead/celery", &[("Host", addr)]);
        assert_eq!(a.status, 200, "look {i}: {}\n{}", a.body, log());
        let list: Vec<serde_json::Value> = serde_json::from_str(&a.body).unwrap();
        let seen: Vec<&str> = list.iter().filter_map(|d| d["id"].as_str()).collect();
        assert_eq!(seen, ids, "look {i}: every dead letter, oldest first");
        assert!(list.iter().all(|d| d["reason"] == "TypeError: bad input"));
    }
}

/// Takes every dead letter with a consumer: each one is there, and is a first delivery.
async fn consume_all(app: &App, ids: &[String]) {
    let mut c = app.broker().consume(&["celery.dead".to_string()], ids.len()).await.unwrap();
    let mut got = Vec::new();
    for _ in ids {
        let mut d = tokio::time::timeout(T, c.next()).await.expect("a dead letter is missing").unwrap();
        assert!(!d.redelivered, "looking counted a delivery");
        got.push(d.message().as_ref().unwrap().headers.id.clone());
        d.ack().await.unwrap();
    }
    c.close().await;
    got.sort();
    let mut want = ids.to_vec();
    want.sort();
    assert_eq!(got, want);
}

/// Log broker with `max_deliveries=2`: before, each look took and requeued every dead letter, so
/// the third look dead-lettered them all again into `celery.dead.dead`. The monitor reaches the
/// directory through the owner's socket (this process), so this also runs the `PEEK` request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listing_dead_letters_changes_nothing_on_the_log_broker() {
    let dir = TempDir::new("monitor-peek");
    let url = dir.url("max_deliveries=2&lease_timeout=2");
    let app = celery_worker::connect(&url, &url).await.unwrap();
    let ids = dead_letters(&app, 4).await;
    let (m, addr) = monitor(&url, &url);
    look(&addr, &ids, || m.log());
    assert_eq!(app.broker().queue_len("celery.dead").await.unwrap(), 4);
    assert_eq!(app.broker().queue_len("celery.dead.dead").await.unwrap(), 0);
    let state = http(&addr, "GET", "/api/state", &[("Host", &addr)]);
    assert!(state.body.contains("\"dead\":4"), "{}", state.body);
    // What the broker and the result backend offer, as the page's header shows it.
    let offers: serde_json::Value = serde_json::from_str(&state.body).unwrap();
    assert_eq!(offers["offers"]["broker"], "routing, broadcasts, leases, documents, history", "{}", state.body);
    assert_eq!(offers["offers"]["backend"], "chords, claims, history", "{}", state.body);
    consume_all(&app, &ids).await;
}

/// Redis: the dead-letter list is byte for byte what it was (no take, no requeue, no reordering,
/// no `x-delivery-count`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listing_dead_letters_changes_nothing_on_redis() {
    if !redis_available("monitor_http (redis)") {
        return;
    }
    let env = RedisEnv::new(2.0);
    let app = celery_worker::connect(&env.broker, &env.backend).await.unwrap();
    let ids = dead_letters(&app, 4).await;
    let raw = |env: &RedisEnv| -> Vec<Vec<u8>> {
        redis::cmd("LRANGE").arg(env.key("celery.dead")).arg(0).arg(-1).query(&mut env.conn()).unwrap()
    };
    let before = raw(&env);
    assert_eq!(before.len(), 4);
    let (m, addr) = monitor(&env.broker, &env.backend);
    look(&addr, &ids, || m.log());
    assert_eq!(raw(&env), before, "the list changed");
    let unacked: usize = redis::cmd("HLEN").arg(env.key("unacked")).query(&mut env.conn()).unwrap();
    assert_eq!(unacked, 0, "looking leased something");
    consume_all(&app, &ids).await;
}

/// Host, CSRF and headers, against the real server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_is_same_origin_with_the_pages_csrf_token_and_hosts_are_checked() {
    let dir = TempDir::new("monitor-csrf");
    let url = dir.url("");
    let app = celery_worker::connect(&url, &url).await.unwrap();
    let ids = dead_letters(&app, 2).await;
    let (m, addr) = monitor(&url, &url);
    let origin = format!("http://{addr}");

    // The page: its CSRF token, a nonce on its one script and style, and the headers.
    let page = http(&addr, "GET", "/", &[("Host", &addr)]);
    assert_eq!(page.status, 200, "{}", m.log());
    let csrf = page.body.split("name=\"csrf-token\" content=\"").nth(1).and_then(|r| r.split('"').next()).unwrap();
    assert_eq!(csrf.len(), 64, "{csrf}");
    let csp = page.header("content-security-policy").expect("CSP on the page");
    let nonce = csp.split("'nonce-").nth(1).and_then(|r| r.split('\'').next()).unwrap();
    assert!(page.body.contains(&format!("<script nonce=\"{nonce}\">")), "the script carries the nonce");
    assert!(csp.starts_with("default-src 'self'") && !csp.contains("unsafe-inline"), "{csp}");
    let again = http(&addr, "GET", "/", &[("Host", &addr)]);
    assert_ne!(again.header("content-security-policy"), Some(csp), "a fresh nonce each time");
    for a in [&page, &http(&addr, "GET", "/api/state", &[("Host", &addr)])] {
        assert_eq!(a.header("x-frame-options"), Some("DENY"));
        assert_eq!(a.header("x-content-type-options"), Some("nosniff"));
        assert_eq!(a.header("referrer-policy"), Some("no-referrer"));
        assert!(a.header("content-security-policy").is_some());
    }

    // DNS rebinding: another name for this address is refused, with the headers too.
    let port = addr.rsplit(':').next().unwrap();
    for host in [format!("evil.example:{port}"), "127.0.0.1:1".into()] {
        let a = http(&addr, "GET", "/api/dead/celery", &[("Host", &host)]);
        assert_eq!(a.status, 421, "{host}: {}", a.body);
        assert!(!a.body.contains(&ids[0]));
        assert_eq!(a.header("x-frame-options"), Some("DENY"));
    }
    assert_eq!(http(&addr, "GET", "/", &[("Host", &format!("localhost:{port}"))]).status, 200);
    let other = http(&addr, "GET", "/api/dead/not-a-monitored-queue", &[("Host", &addr)]);
    assert_eq!(other.status, 404, "only the -Q queues: {}", other.body);

    // Cross-site POSTs are refused, whatever they carry; nothing is discarded.
    let discard = format!("/api/dead/celery/discard/{}", ids[0]);
    let refused: [&[(&str, &str)]; 5] = [
        &[("Host", &addr)],
        &[("Host", &addr), ("Origin", "http://evil.example")],
        &[("Host", &addr), ("Origin", "http://evil.example"), ("X-CSRF-Token", csrf)],
        &[("Host", &addr), ("Origin", &origin)],
        &[("Host", &addr), ("Origin", &origin), ("X-CSRF-Token", "0000")],
    ];
    for headers in refused {
        let a = http(&addr, "POST", &discard, headers);
        assert_eq!(a.status, 403, "{headers:?}: {}", a.body);
        let r = http(&addr, "POST", "/api/revoke/some-task", headers);
        assert_eq!(r.status, 403, "{headers:?}: {}", r.body);
    }
    assert_eq!(app.broker().queue_len("celery.dead").await.unwrap(), 2, "a refused POST acted");

    // Same origin with the page's token: works.
    let ok = http(&addr, "POST", &discard, &[("Host", &addr), ("Origin", &origin), ("X-CSRF-Token", csrf)]);
    assert_eq!(ok.status, 200, "{}\n{}", ok.body, m.log());
    let left = http(&addr, "GET", "/api/dead/celery", &[("Host", &addr)]);
    assert!(!left.body.contains(&ids[0]) && left.body.contains(&ids[1]), "{}", left.body);
    let revoke =
        http(&addr, "POST", "/api/revoke/some-task", &[("Host", &addr), ("Origin", &origin), ("X-CSRF-Token", csrf)]);
    assert_eq!(revoke.status, 200, "{}", revoke.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_dead_letter_actions_and_pause_resume_through_the_monitor() {
    let dir = TempDir::new("monitor-bulk");
    let url = dir.url("");
    let app = celery_worker::connect(&url, &url).await.unwrap();
    let ids = dead_letters(&app, 4).await;
    let (m, addr) = monitor(&url, &url);
    let origin = format!("http://{addr}");
    let page = http(&addr, "GET", "/", &[("Host", &addr)]);
    let csrf = page.body.split("name=\"csrf-token\" content=\"").nth(1).and_then(|r| r.split('"').next()).unwrap();
    let control = [("Host", addr.as_str()), ("Origin", origin.as_str()), ("X-CSRF-Token", csrf)];
    let post = |path: &str| {
        let a = http(&addr, "POST", path, &control);
        assert_eq!(a.status, 200, "{path}: {} {}\n{}", a.status, a.body, m.log());
        serde_json::from_str::<serde_json::Value>(&a.body).unwrap()
    };

    // One matched by its id is discarded; the others, passed over, stay in order.
    let one = post(&format!("/api/dead/celery/discard?match={}", ids[2]));
    assert_eq!((one["acted"].as_u64(), one["kept"].as_u64()), (Some(1), Some(3)), "{one}");
    let left = http(&addr, "GET", "/api/dead/celery", &[("Host", &addr)]);
    let left: Vec<serde_json::Value> = serde_json::from_str(&left.body).unwrap();
    let left: Vec<&str> = left.iter().filter_map(|d| d["id"].as_str()).collect();
    assert_eq!(left, [&ids[0], &ids[1], &ids[3]]);
    // A filter that matches none changes nothing; the task name matches the rest, retried.
    let none = post("/api/dead/celery/retry?match=no-such-task");
    assert_eq!((none["acted"].as_u64(), none["kept"].as_u64()), (Some(0), Some(3)), "{none}");
    let all = post("/api/dead/celery/retry?match=ADD");
    assert_eq!(all["acted"].as_u64(), Some(3), "{all}");
    assert_eq!(app.broker().queue_len("celery.dead").await.unwrap(), 0);
    assert_eq!(app.broker().queue_len("celery").await.unwrap(), 3, "back in their queue");
    let long = format!("/api/dead/celery/retry?match={}", "x".repeat(300));
    assert_eq!(http(&addr, "POST", &long, &control).status, 400, "a filter is bounded");

    // Pause and resume: the worker stops and starts consuming the queue.
    let host = format!("bulk-{}@test", std::process::id());
    let w = DemoProcess::start_urls(&url, &url, &["worker", "-c", "1", "-n", &host, "-Q", "other"]);
    assert!(w.wait_log("consuming", T), "{}", w.log());
    let resumed = post("/api/queue/celery/resume");
    assert!(resumed["replies"].as_u64() >= Some(1), "{resumed}");
    assert!(consumed_queues(&app, &host).await.contains(&"celery".to_owned()), "{}", w.log());
    let paused = post("/api/queue/celery/pause");
    assert!(paused["replies"].as_u64() >= Some(1), "{paused}");
    assert!(!consumed_queues(&app, &host).await.contains(&"celery".to_owned()), "{}", w.log());
    assert_eq!(http(&addr, "POST", "/api/queue/not-monitored/pause", &control).status, 404);
}

//! The PostgreSQL broker (`postgres://`) against the real server, each test in a schema of its
//! own (the conformance suites run on it too, as `postgres_broker::*`):
//! 1. kill -9 of a worker process mid-task: its tasks stay leased, come back once the visibility
//!    timeout passes, and run to SUCCESS on the next worker; nothing is left in the table.
//! 2. `LISTEN/NOTIFY` wakes an idle consumer at once (an idle consumer otherwise sleeps a minute).
//! 3. Purge removes ready and not-yet-due rows, never leased ones.
//! 4. Dead letters: the row moves to `<queue>.dead` with its reason in the table and the header.
//! 5. Direct, topic and fanout routing through the bindings table; mandatory unroutable publishes fail.
//! 6. A lease lost to another consumer is never settled by its first holder (the fencing token),
//!    also after the message was dead-lettered and taken from its dead-letter queue.
//! 7. Broadcasts, small and large, filtered by exchange and pattern; a forged, replayed or
//!    misdirected `NOTIFY` is never delivered, and a plain `LISTEN` sees no broadcast's content;
//!    rows older than a minute are never delivered and are deleted.
//! 8. Priorities: higher priority first, then oldest first.
//! 9. 5,000 events: each arrives once.
//! 10. The listening connection killed by the server: nothing waits meanwhile, and it comes back.
//! 11. Size caps: a message above the consumer's cap is dead-lettered without its payload being
//!     read; `peek` reads at most 1 MiB per message and 8 MiB in all.
//! 12. Queue names leave room for `.dead`; two busy queues of one consumer both progress; a
//!     consumer of 1,000 queues takes one of each first, many queues to a statement.
//! 13. A private server (not the machine's) stopped fast and killed mid-load: every task whose
//!     send was acknowledged runs, and the worker reconnects.
//! 14. Flow control in the tables: a parked task is a row until a slot frees; a key with parked
//!     tasks whose slot row is gone (a release lost) gets one back from the sweep; concurrent
//!     reservations of a rate bucket are spaced by its interval; unkeyed tasks leave the tables
//!     empty.
//! 15. The flow tables are bounded: a new key is refused once 100,000 keys hold slots or parked
//!     messages (known keys go on); a new rate bucket deletes the idle ones, and is refused once
//!     100,000 live ones remain.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use broker_backends::postgres::{PostgresBroker, MAX_BROADCAST, PEEK_MESSAGE_BYTES, PEEK_TOTAL_BYTES};
use celery_core::broker::DEAD_LETTER_REASON;
use celery_core::capability::{Broadcasts, Routing};
use celery_core::protocol::Message;
use celery_core::routing::{Binding, Exchange, ExchangeKind, Route};
use celery_core::{App, Broker, BrokerError, ProtocolError, Signature, TaskState};
use celery_tests::pg_server::{CountingProxy, PgServer, Shutdown};
use celery_tests::{wait_until, DemoProcess, PgSchema, POSTGRES};
use futures::StreamExt;
use serde_json::{json, Value};

const SUITE: &str = "postgres_broker";
const T: Duration = Duration::from_secs(30);

async fn broker(schema: &PgSchema, query: &str) -> PostgresBroker {
    PostgresBroker::connect(&schema.url("postgres", query)).await.expect("connect")
}

fn msg(x: i64) -> Message {
    Message::from_signature(&Signature::by_name("add").args(json!([x, 1]))).unwrap()
}

fn count(schema: &PgSchema, sql: &str) -> i64 {
    schema.query(sql).unwrap()[0][0].as_deref().unwrap().parse().unwrap()
}

/// The first argument of each message, in order.
fn firsts(msgs: &[Message]) -> Vec<i64> {
    msgs.iter().map(|m| serde_json::from_slice::<Value>(&m.body).unwrap()[0][0].as_i64().unwrap()).collect()
}

/// Resolves once every task of `ids` is STARTED.
async fn all_started(app: &App, ids: &[String]) {
    loop {
        let mut n = 0;
        for id in ids {
            n += usize::from(app.result(id).state().await.unwrap() == TaskState::Started);
        }
        if n == ids.len() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_task_brings_the_tasks_back_after_the_visibility_timeout() {
    let Some(schema) = PgSchema::new(SUITE) else { return };
    // A grace longer than the test and another worker name: only the visibility timeout returns them.
    let (broker_url, backend_url) =
        (schema.url("postgres", "visibility_timeout=2&worker_grace=60"), schema.url("db+postgresql", ""));
    let app: App = celery_worker::connect(&broker_url, &backend_url).await.expect("connect");
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(app.send_by_name("sleep", json!([3000]), json!({})).await.unwrap().id().to_owned());
    }
    let mut first = DemoProcess::start_urls(&broker_url, &backend_url, &["worker", "-c", "3"]);
    let started = all_started(&app, &ids);
    tokio::time::timeout(T, started).await.unwrap_or_else(|_| panic!("all three started\n{}", first.log()));
    first.signal("KILL");
    let killed_at = chrono::Utc::now();
    first.wait_exit(Duration::from_secs(5)).expect("killed");
    let leased = "SELECT count(*) FROM celery_rs_tasks WHERE leased_until IS NOT NULL AND deliveries = 1";
    assert_eq!(count(&schema, leased), 3, "the killed worker's tasks are still leased");

    let second = DemoProcess::start_urls(&broker_url, &backend_url, &["worker", "-n", "second@pg", "-c", "3"]);
    for id in &ids {
        let r = app.result(id);
        assert_eq!(r.get::<u64>(T).await.unwrap_or_else(|e| panic!("{e}\n{}", second.log())), 3000);
        let meta = r.info().await.unwrap().expect("stored");
        let done = celery_core::protocol::parse_time(meta.date_done.as_deref().unwrap()).unwrap();
        // Not before the lease (renewed until the kill) expired, plus the run itself.
        assert!(done >= killed_at + chrono::Duration::milliseconds(4000), "ran again too early: {done} vs {killed_at}");
    }
    assert!(wait_until(Duration::from_secs(5), || count(&schema, "SELECT count(*) FROM celery_rs_tasks") == 0));
    assert!(second.log().contains("lease expired"), "the second worker returned them\n{}", second.log());
}

/// A worker killed -9 and started again under its name on this machine takes the name over at
/// once (its earlier run's row names a pid that is gone) instead of watching the row for 1.5 beats.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_restarted_after_kill_9_takes_its_name_over_at_once() {
    let Some(schema) = PgSchema::new(SUITE) else { return };
    let (broker_url, backend_url) = (schema.url("postgres", "worker_grace=60"), schema.url("db+postgresql", ""));
    let worker = || {
        let w = DemoProcess::start_urls(&broker_url, &backend_url, &["worker", "-n", "again@pg", "-c", "1"]);
        assert!(w.wait_log("worker ready", T), "{}", w.log());
        w
    };
    let row = "SELECT count(*) FROM celery_rs_workers WHERE name = 'again@pg'";
    let mut first = worker();
    assert!(wait_until(T, || count(&schema, row) == 1), "registered\n{}", first.log());
    first.signal("KILL");
    first.wait_exit(Duration::from_secs(5)).expect("killed");
    assert_eq!(count(&schema, row), 1, "its row stays");
    let again = worker();
    assert!(again.wait_log("the earlier run of this worker on this machine is gone", T), "{}", again.log());
    assert!(!again.log().contains("another live process"), "{}", again.log());
}

/// kill -9 of a worker running four 5 s tasks, with the visibility timeout of an hour: the idle
/// worker returns them once the killed worker's row is `worker_grace` (10 s) old, and finishes all
/// four within 20 s of the kill; a worker restarted under the killed one's name would not wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_task_brings_the_tasks_back_within_the_heartbeat_grace() {
    let Some(schema) = PgSchema::new(SUITE) else { return };
    let (broker_url, backend_url) =
        (schema.url("postgres", "visibility_timeout=3600"), schema.url("db+postgresql", ""));
    let app: App = celery_worker::connect(&broker_url, &backend_url).await.expect("connect");
    let mut ids = Vec::new();
    for _ in 0..4 {
        ids.push(app.send_by_name("sleep", json!([5000]), json!({})).await.unwrap().id().to_owned());
    }
    let worker = |name: &str| {
        let w = DemoProcess::start_urls(
            &broker_url,
            &backend_url,
            &["worker", "-n", name, "-c", "4", "--prefetch-multiplier", "1"],
        );
        assert!(w.wait_log("worker ready", T), "{}", w.log());
        w
    };
    let mut first = worker("first@pg");
    let started = all_started(&app, &ids);
    tokio::time::timeout(T, started).await.unwrap_or_else(|_| panic!("all four started\n{}", first.log()));
    let second = worker("second@pg");
    first.signal("KILL");
    let killed = std::time::Instant::now();
    first.wait_exit(Duration::from_secs(5)).expect("killed");
    for id in &ids {
        let r = app.result(id);
        assert_eq!(r.get::<u64>(T).await.unwrap_or_else(|e| panic!("{e}\n{}", second.log())), 5000);
        assert_eq!(r.info().await.unwrap().and_then(|m| m.worker).as_deref(), Some("second@pg"));
    }
    let took = killed.elapsed();
    eprintln!("postgres_broker: four 5 s tasks of a killed worker finished elsewhere {took:?} after the kill");
    assert!(took < Duration::from_secs(20), "took {took:?}\n{}", second.log());
    assert!(second.log().contains("workers whose heartbeat stopped"), "{}", second.log());
    assert!(wait_until(Duration::from_secs(5), || count(&schema, "SELECT count(*) FROM celery_rs_tasks") == 0));
    assert_eq!(count(&schema, "SELECT count(*) FROM celery_rs_workers WHERE name = 'first@pg'"), 0, "forgotten");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notify_wakes_an_idle_consumer_at_once() {
    let Some(schema) = PgSchema::new(SUITE) else { return };
    let app_name = format!("wake_{}", schema.0);
    let b = broker(&schema, &format!("application_name={app_name}")).await;
    let mut consumer = b.consume(&["wake".into()], 1).await.unwrap();
    let listening =
        format!("SELECT count(*) FROM pg_stat_activity WHERE application_name = '{app_name}' AND query LIKE 'LISTEN%'");
    assert!(wait_until(T, || count(&schema, &listening) == 1), "the listener is connected");
    for i in 0..5 {
        // Long enough for the consumer to have found the queue empty and gone to sleep (for up
        // to a minute: only a notification wakes it within the bound below).
        tokio::time::sleep(Duration::from_millis(300)).await;
        let sent = Instant::now();
        b.publish(&Route::queue("wake"), &msg(i)).await.unwrap();
        let d = tokio::time::timeout(T, consumer.next()).await.expect("delivered").expect("a delivery");
        let latency = sent.elapsed();
        assert!(latency < Duration::from_millis(500), "round {i}: woken after {latency:?}");
        d.ack().await.unwrap();
    }
    consumer.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_removes_ready_and_future_rows_not_leased_ones() {
    let Some(schema) = PgSchema::new(SUITE) else { return };
    let b = broker(&schema, "visibility_timeout=60").await;
    let q = Route::queue("p");
    for i in 0..3 {
        b.publish(&q, &msg(i)).await.unwrap();
    }
    let later = Signature::by_name("add").args(json!([9, 9])).countdown(Duration::from_secs(3600));
    b.publish(&q, &Message::from_signature(&later).unwrap()).await.unwrap();
    assert_eq!(b.queue_len("p").await.unwrap(), 3, "the future one does not count");
    let mut consumer = b.consume(&["p".into()], 1).await.unwrap();
    let leased = tokio::time::timeout(T, consumer.next()).await.unwrap().unwrap();
    assert_eq!(b.purge("p").await.unwrap(), 3, "two ready and one not yet due");
    assert_eq!(b.purge("p").await.unwrap(), 0);
    assert_eq!(count(&schema, "SELECT count(*) FROM celery_rs_tasks WHERE queue = 'p'"), 1, "the leased one stays");
    leased.ack().await.unwrap();
    consumer.close().await;
    assert_eq!(count(&schema, "SELECT count(*) FROM celery_rs_tasks"), 0, "acked: deleted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_keep_their_reason() {
    let Some(schema) = PgSchema::new(SUITE) else { return };
    let b = broker(&schema, "").await;
    b.publish(&Route::queue("dl"), &msg(7)).await.unwrap();
    let mut consumer = b.consume(&["dl".into()], 4).await.unwrap();
    let d = tokio::time::timeout(T, consumer.next()).await.unwrap().unwrap();
    d.dead_letter("bad arguments: x is not an int").await.unwrap();
    let rows = schema.query("SELECT queue, reason FROM celery_rs_dead_letters").unwrap();
    assert_eq!(rows, vec![vec![Some("dl.dead".to_owned()), Some("bad arguments: x is not an int".to_owned())]]);
    assert_eq!((b.queue_len("dl").await.unwrap(), b.queue_len("dl.dead").await.unwrap()), (0, 1));
    let peeked = b.peek("dl.dead", 10).await.unwrap();
    let m = peeked[0].as_ref().expect("decodes");
    assert_eq!(m.headers.extra.get(DEAD_LETTER_REASON), Some(&json!("bad arguments: x is not an int")));
    assert_eq!(firsts(std::slice::from_ref(m)), vec![7], "the original message");
    consumer.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_topic_and_fanout_routing() {
    let Some(schema) = PgSchema::new(SUITE) else { return };
    let b = broker(&schema, "").await;
    let bind = |exchange: &str, key: &str, queue: &str| Binding::new(exchange, queue, key);
    b.declare_exchange("ev", ExchangeKind::Topic).await.unwrap();
    b.bind(&bind("ev", "a.*", "qa")).await.unwrap();
    b.bind(&bind("ev", "#.z", "qz")).await.unwrap();
    b.declare_exchange("dx", ExchangeKind::Direct).await.unwrap();
    b.bind(&bind("dx", "k", "qk")).await.unwrap();
    b.declare_exchange("fx", ExchangeKind::Fanout).await.unwrap();
    b.bind(&bind("fx", "", "f1")).await.unwrap();
    b.bind(&bind("fx", "", "f2")).await.unwrap();
    assert!(matches!(b.declare_exchange("hx", ExchangeKind::Headers).await, Err(BrokerError::Unsupported { .. })));

    for (ex, key) in
        [("ev", "a.b"), ("ev", "x.y.z"), ("ev", "a.z"), ("ev", "b.b"), ("dx", "k"), ("dx", "a.*"), ("fx", "any")]
    {
        b.publish(&Route::exchange(ex, key), &msg(0)).await.unwrap();
    }
    let mut lens = Vec::new();
    for q in ["qa", "qz", "qk", "f1", "f2"] {
        lens.push((q, b.queue_len(q).await.unwrap()));
    }
    assert_eq!(lens, [("qa", 2), ("qz", 2), ("qk", 1), ("f1", 1), ("f2", 1)]);
    let mut mandatory = Route::exchange("ev", "nothing.here");
    mandatory.mandatory = true;
    let e = b.publish(&mandatory, &msg(0)).await.unwrap_err().to_string();
    assert!(e.contains("unroutable"), "{e}");
    let e = b.publish(&Route::queue("q".repeat(300)), &msg(0)).await.unwrap_err().to_string();
    assert!(e.contains("longer than 250"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_lease_is_never_settled_by_its_first_holder() {
    let Some(schema) = PgSchema::new(SUITE) else { return };
    let b = broker(&schema, "visibility_timeout=60").await;
    b.publish(&Route::queue("f"), &msg(1)).await.unwrap();
    let mut first = b.consume(&["f".into()], 1).await.unwrap();
    let stale = tokio::time::timeout(T, first.next()).await.unwrap().unwrap();
    // Its lease runs out (as if its worker had hung past the visibility timeout) and a sweep
    // returns it; another consumer takes it.
    schema.exec("UPDATE celery_rs_tasks SET leased_until = NULL").unwrap();
    b.publish(&Route::queue("f"), &msg(2)).await.unwrap();
    let mut second = b.consume(&["f".into()], 2).await.unwrap();
    let mut fresh = Vec::new();
    for _ in 0..2 {
        fresh.push(tokio::time::timeout(T, second.next()).await.unwrap().unwrap());
    }
    assert!(fresh.iter().any(|d| d.redelivered), "the taken-again one says so");
    stale.ack().await.unwrap();
    first.close().await;
    assert_eq!(count(&schema, "SELECT count(*) FROM celery_rs_tasks"), 2, "the stale ack deleted nothing");
    for d in fresh {
        d.ack().await.unwrap();
    }
    second.close().await;
    assert_eq!(count(&schema, "SELECT count(*) FROM celery_rs_tasks"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broadcasts_small_and_large() {
    let Some(schema) = PgSchema::new(SUITE) else { return };
    let b = broker(&schema, "").await;
    let topic = Exchange::new("celeryev", ExchangeKind::Topic);
    let other = Exchange::new("other", ExchangeKind::Topic);
    let mut tasks = b.subscribe(&topic, "task.#").await.unwrap();
    let mut all = b.subscribe(&topic, "#").await.unwrap();
    let event = |body: String| Message { body: body.into_bytes(), ..msg(0) };
    let big = format!("\"{}\"", "x".repeat(20_000));
    // The listener connects in the background: send until the first arrives.
    let first = async {
        loop {
            b.broadcast(&topic, "task.started", &event("1".into())).await.unwrap();
            if let Ok(Some(got)) = tokio::time::timeout(Duration::from_millis(200), tasks.next()).await {
                return got;
            }
        }
    };
    let got = tokio::time::timeout(T, first).await.expect("a broadcast arrives");
    assert_eq!((got.routing_key.as_str(), got.body.as_slice()), ("task.started", &b"1"[..]));
    b.broadcast(&other, "task.x", &event("2".into())).await.unwrap();
    b.broadcast(&topic, "worker.heartbeat", &event("3".into())).await.unwrap();
    b.broadcast(&topic, "task.big", &event(big.clone())).await.unwrap();
    b.broadcast(&topic, "task.succeeded", &event("4".into())).await.unwrap();
    let mut bodies = Vec::new();
    while bodies.len() < 2 {
        let got = tokio::time::timeout(T, tasks.next()).await.expect("broadcasts").expect("open");
        // Repeats of the first, sent while waiting for the listener, may still be in flight.
        if got.body != b"1" {
            bodies.push((got.routing_key, String::from_utf8(got.body).unwrap()));
        }
    }
    assert_eq!(bodies, [("task.big".to_owned(), big.clone()), ("task.succeeded".to_owned(), "4".to_owned())]);
    let mut keys = Vec::new();
    while keys.last().map(String::as_str) != Some("task.succeeded") {
        keys.push(tokio::time::timeout(T, all.next()).await.expect("broadcasts").expect("open").routing_key);
    }
    keys.retain(|k| k != "task.started");
    assert_eq!(keys, ["worker.heartbeat", "task.big", "task.succeeded"]);
    let huge = event("x".repeat(MAX_BROADCAST + 1));
    let e = b.broadcast(&topic, "task.huge", &huge).await.unwrap_err();
    assert!(matches!(e, BrokerError::Protocol(ProtocolError::TooLarge { .. })), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn higher_priority_first_then_oldest() {
    let Some(schema) = PgSchema::new(SUITE) else { return };
    let b = broker(&schema, "").await;
    for (x, p) in [(1, 0), (2, 9), (3, 5), (4, 9), (5, 0)] {
        let sig = Signature::by_name("add").args(json!([x, 1])).priority(p);
        b.publish(&Route::queue("prio"), &Message::from_signature(&sig).unwrap()).await.unwrap();
    }
    let peeked: Vec<Message> = b.peek("prio", 10).await.unwrap().into_iter().map(Result::unwrap).collect();
    assert_eq!(firsts(&peeked), [2, 4, 3, 1, 5]);
    let mut consumer = b.consume(&["prio".into()], 10).await.unwrap();
    let mut taken = Vec::new();
    for _ in 0..5 {
        let mut d = tokio::time::timeout(T, consumer.next()).await.unwrap().unwrap();
        taken.push(d.take_message().unwrap());
        d.ack().await.unwrap();
    }
    assert_eq!(firsts(&taken), [2, 4, 3, 1, 5]);
    consumer.close().await;
}

/// Events at thousands a second: every one arrives, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_events_arrive_once_each() {
    let Some(schema) = PgSchema::new(SUITE) else { return };
    let b = broker(&schema, "pool_size=8").await;
    let ev = Exchange::new("celeryev", ExchangeKind::Topic);
    let mut sub = b.subscribe(&ev, "#").await.unwrap();
    let event =
        |i: usize| Message { body: format!("{{\"type\":\"task-succeeded\",\"i\":{i}}}").into_bytes(), ..msg(0) };
    // The listener connects in the background: a first event, sent until it arrives.
    let ready = async {
        loop {
            b.broadcast(&ev, "ready", &event(0)).await.unwrap();
            if let Ok(Some(_)) = tokio::time::timeout(Duration::from_millis(200), sub.next()).await {
                return;
            }
        }
    };
    tokio::time::timeout(T, ready).await.expect("the subscription is live");
    let n = 5000;
    let started = Instant::now();
    let sends = (1..=n).map(|i| {
        let (b, ev, m) = (b.clone(), ev.clone(), event(i));
        async move { b.broadcast(&ev, "task.succeeded", &m).await }
    });
    // Eight at a time (the pool's size): each is one statement and one commit.
    let results: Vec<_> = futures::stream::iter(sends).buffered(8).collect().await;
    assert!(results.iter().all(Result::is_ok));
    let mut seen = Vec::new();
    while seen.len() < n {
        let got = tokio::time::timeout(T, sub.next()).await.expect("every event").expect("open");
        if got.routing_key == "task.succeeded" {
            let v: Value = serde_json::from_slice(&got.body).unwrap();
            seen.push(v["i"].as_u64().unwrap() as usize);
        }
    }
    let rate = n as f64 / started.elapsed().as_secs_f64();
    eprintln!("{n} events in {:?} ({rate:.0}/s)", started.elapsed());
    let mut sorted = seen.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, (1..=n).collect::<Vec<_>>(), "each event once");
}

/// The listening connection killed by the server: messages still arrive (polled while it
/// reconnects), and once it is back an idle consumer is woken at once again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_listener_reconnects_and_nothing_waits_meanwhile() {
    let Some(schema) = PgSchema::new(SUITE) else { return };
    let app_name = format!("relisten_{}", schema.0);
    let b = broker(&schema, &format!("application_name={app_name}")).await;
    let mut consumer = b.consume(&["rl".into()], 1).await.unwrap();
    let listeners =
        format!("SELECT count(*) FROM pg_stat_activity WHERE application_name = '{app_name}' AND query LIKE 'LISTEN%'");
    let pids =
        format!("SELECT pid FROM pg_stat_activity WHERE application_name = '{app_name}' AND query LIKE 'LISTEN%'");
    assert!(wait_until(T, || count(&schema, &listeners) == 1), "listening");
    let old = schema.query(&pids).unwrap()[0][0].clone().unwrap();
    schema.query(&format!("SELECT pg_terminate_backend({old})")).unwrap();
    b.publish(&Route::queue("rl"), &msg(1)).await.unwrap();
    let d = tokio::time::timeout(T, consumer.next()).await.expect("delivered while reconnecting").unwrap();
    d.ack().await.unwrap();
    let relistening = || {
        let rows = schema.query(&pids).unwrap();
        rows.len() == 1 && rows[0][0].as_deref() != Some(old.as_str())
    };
    assert!(wait_until(T, relistening), "a new listening connection");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let sent = Instant::now();
    b.publish(&Route::queue("rl"), &msg(2)).await.unwrap();
    let d = tokio::time::timeout(T, consumer.next()).await.expect("delivered").unwrap();
    assert!(sent.elapsed() < Duration::from_millis(500), "woken after {:?}", sent.elapsed());
    d.ack().await.unwrap();
    consumer.close().await;
}

/// The schema's broadcast channel, as the broker names it.
fn broadcast_channel(schema: &PgSchema) -> String {
    schema.query("SELECT 'celery_rs_b_' || left(md5(current_schema()), 16)").unwrap()[0][0].clone().unwrap()
}

/// A plain connection (what any role that can connect may do) listening on `channel`: the
/// payloads it hears, while the returned client lives.
async fn eavesdrop(channel: &str) -> (tokio_postgres::Client, tokio::sync::mpsc::UnboundedReceiver<String>) {
    let cfg: tokio_postgres::Config = format!("postgresql://{POSTGRES}").parse().unwrap();
    let (client, mut conn) = cfg.connect(tokio_postgres::NoTls).await.unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(Ok(m)) = std::future::poll_fn(|cx| conn.poll_message(cx)).await {
            if let tokio_postgres::AsyncMessage::Notification(n) = m {
                let _ = tx.send(n.payload().to_owned());
            }
        }
    });
    client.batch_execute(&format!("LISTEN \"{channel}\"")).await.unwrap();
    (client, rx)
}

/// Broadcasts travel as rows: a `NOTIFY` names one by id and nonce, so a role that can `LISTEN`
/// reads nothing of them, and forged (old format, no such row, wrong nonce) or replayed
/// notifications are never delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_notifications_are_never_broadcasts() {
    let Some(schema) = PgSchema::new(SUITE) else { return };
    let b = broker(&schema, "").await;
    let pidbox = Exchange::new("celery.pidbox", ExchangeKind::Fanout);
    let mut sub = b.subscribe(&pidbox, "").await.unwrap();
    let channel = broadcast_channel(&schema);
    let (_spy, mut heard) = eavesdrop(&channel).await;
    let request = |body: &str| Message { body: body.as_bytes().to_vec(), ..msg(0) };

    b.broadcast(&pidbox, "", &request(r#"{"method":"shutdown","secret":"s3cret"}"#)).await.unwrap();
    let got = tokio::time::timeout(T, sub.next()).await.expect("delivered").expect("open");
    assert!(String::from_utf8(got.body).unwrap().contains("s3cret"));
    let payload = tokio::time::timeout(T, heard.recv()).await.expect("heard").unwrap();
    let (id, nonce) = payload.split_once(':').expect("id:nonce");
    assert!(id.parse::<i64>().is_ok() && nonce.parse::<i64>().is_ok(), "{payload}");
    assert!(!payload.contains("s3cret") && !payload.contains("pidbox"), "a listener learns nothing: {payload}");

    let wrong_nonce = nonce.parse::<i64>().unwrap().wrapping_add(1);
    for forged in [
        // The old format: the body in the notification.
        "celery.pidbox' || chr(31) || '' || chr(31) || 'i{\"method\":\"shutdown\"}".to_owned(),
        "999999999:1".to_owned(),
        format!("{id}:{wrong_nonce}"),
        // A replay of the genuine one.
        payload.clone(),
        "garbage".to_owned(),
    ] {
        schema.exec(&format!("SELECT pg_notify('{channel}', '{forged}')")).unwrap();
    }
    // Announcements are read in the order they come: once the next genuine one arrives, every
    // forged one before it was read and dropped.
    b.broadcast(&pidbox, "", &request(r#"{"method":"ping"}"#)).await.unwrap();
    let next = tokio::time::timeout(T, sub.next()).await.expect("delivered").expect("open");
    assert_eq!(next.body, br#"{"method":"ping"}"#, "no forged or replayed broadcast came first");
}

/// Broadcast rows expire after a minute: an older one is never delivered, even announced with its
/// own nonce, and the broadcasting process deletes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_broadcasts_are_never_delivered_and_are_deleted() {
    let Some(schema) = PgSchema::new(SUITE) else { return };
    let b = broker(&schema, "").await;
    let pidbox = Exchange::new("celery.pidbox", ExchangeKind::Fanout);
    let mut sub = b.subscribe(&pidbox, "").await.unwrap();
    let channel = broadcast_channel(&schema);
    // Written after the subscription (so newer than every broadcast it knew), but two minutes ago.
    let id = schema
        .query(
            "INSERT INTO celery_rs_broadcasts (nonce, exchange, routing_key, body, created_at) \
             VALUES (7, 'celery.pidbox', '', '\\x6f6c64', now() - interval '2 minutes') RETURNING id",
        )
        .unwrap()[0][0]
        .clone()
        .unwrap();
    schema.exec(&format!("SELECT pg_notify('{channel}', '{id}:7')")).unwrap();
    b.broadcast(&pidbox, "", &Message { body: br#"{"method":"ping"}"#.to_vec(), ..msg(0) }).await.unwrap();
    let next = tokio::time::timeout(T, sub.next()).await.expect("delivered").expect("open");
    assert_eq!(next.body, br#"{"method":"ping"}"#, "the expired one was not delivered");
    let old = format!("SELECT count(*) FROM celery_rs_broadcasts WHERE id = {id}");
    assert!(wait_until(T, || count(&schema, &old) == 0), "the expired row was deleted");
    assert_eq!(count(&schema, "SELECT count(*) FROM celery_rs_broadcasts"), 1, "the fresh one stays");
}

/// A message above the consumer's cap is dead-lettered by the fetch without its payload crossing
/// the wire: the worker gets its size and task id only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_messages_are_dead_lettered_unread() {
    let Some(schema) = PgSchema::new(SUITE) else { return };
    let direct = broker(&schema, "").await;
    let proxy = CountingProxy::start("127.0.0.1:5432").await;
    let via =
        PostgresBroker::connect(&schema.url("postgres", "").replace("127.0.0.1:5432", &proxy.addr)).await.unwrap();
    let big = Signature::by_name("echo").args(json!(["x".repeat(3 << 20)])).task_id("big-1");
    direct.publish(&Route::queue("cap"), &Message::from_signature(&big).unwrap()).await.unwrap();
    direct.publish(&Route::queue("cap"), &msg(5)).await.unwrap();
    let before = proxy.from_server();
    let limit = 1 << 20;
    // Prefetch 1: a fetch that only dead-lettered must not send the consumer to sleep.
    let mut consumer = via.consume_capped(&["cap".into()], 1, limit).await.unwrap();
    let mut first = tokio::time::timeout(T, consumer.next()).await.unwrap().unwrap();
    let mut second = tokio::time::timeout(T, consumer.next()).await.unwrap().unwrap();
    let read = proxy.from_server() - before;
    if first.size() < second.size() {
        std::mem::swap(&mut first, &mut second);
    }
    assert!(first.size().unwrap() > 4 << 20, "{:?}", first.size());
    match first.message() {
        Err(ProtocolError::InvalidHeaders { id, error, .. }) => {
            assert_eq!(id, "big-1");
            assert!(matches!(**error, ProtocolError::TooLarge { limit: l, .. } if l == limit), "{error}");
        }
        other => panic!("refused unread, naming the task: {other:?}"),
    }
    assert_eq!(firsts(&[second.take_message().unwrap()]), [5]);
    assert!(read < 256 * 1024, "{read} bytes read from the server for a 4 MiB message");
    first.dead_letter("too large").await.unwrap();
    second.ack().await.unwrap();
    consumer.close().await;
    let rows = schema.query("SELECT queue, reason FROM celery_rs_dead_letters").unwrap();
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0][0].as_deref(), Some("cap.dead"));
    let reason = rows[0][1].clone().unwrap();
    assert!(reason.starts_with("message of ") && reason.ends_with("exceeds the limit of 1048576 bytes"), "{reason}");
    assert_eq!(count(&schema, "SELECT count(*) FROM celery_rs_tasks"), 1, "only the dead letter");
}

/// `peek` reads at most 1 MiB of one message (a larger one is listed as too large, unread) and
/// stops before 8 MiB in all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peek_reads_bounded_bytes() {
    let Some(schema) = PgSchema::new(SUITE) else { return };
    let b = broker(&schema, "").await;
    let sized = |chars: usize| {
        let sig = Signature::by_name("echo").args(json!(["y".repeat(chars)]));
        Message::from_signature(&sig).unwrap()
    };
    b.publish(&Route::queue("pk"), &sized(PEEK_MESSAGE_BYTES)).await.unwrap();
    for _ in 0..12 {
        b.publish(&Route::queue("pk"), &sized(600 * 1024)).await.unwrap();
    }
    let peeked = b.peek("pk", 100).await.unwrap();
    match &peeked[0] {
        Err(ProtocolError::TooLarge { size, limit }) => {
            assert!(*size > PEEK_MESSAGE_BYTES && *limit == PEEK_MESSAGE_BYTES)
        }
        other => panic!("listed unread: {other:?}"),
    }
    let read: usize = peeked[1..].iter().map(|m| m.as_ref().expect("decodes").body.len()).sum();
    assert!(peeked.len() < 13, "stopped early: {} listed", peeked.len());
    assert!(peeked.len() > 5, "{} listed", peeked.len());
    assert!(read <= PEEK_TOTAL_BYTES, "{read}");
}

/// The delivery count goes on through a dead-letter: a holder whose lease was lost cannot ack the
/// row once it was dead-lettered and taken again from the dead-letter queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_ack_never_deletes_a_dead_letter_taken_again() {
    let Some(schema) = PgSchema::new(SUITE) else { return };
    let b = broker(&schema, "visibility_timeout=60").await;
    b.publish(&Route::queue("fence"), &msg(1)).await.unwrap();
    let mut first = b.consume(&["fence".into()], 1).await.unwrap();
    let stale = tokio::time::timeout(T, first.next()).await.unwrap().unwrap();
    // Its lease runs out and is swept back; another consumer takes it and dead-letters it.
    schema.exec("UPDATE celery_rs_tasks SET leased_until = NULL").unwrap();
    let mut second = b.consume(&["fence".into()], 1).await.unwrap();
    let d = tokio::time::timeout(T, second.next()).await.unwrap().unwrap();
    d.dead_letter("boom").await.unwrap();
    second.close().await;
    let mut third = b.consume(&["fence.dead".into()], 1).await.unwrap();
    let dead = tokio::time::timeout(T, third.next()).await.unwrap().unwrap();
    assert!(dead.redelivered);
    stale.ack().await.unwrap();
    first.close().await;
    assert_eq!(count(&schema, "SELECT count(*) FROM celery_rs_tasks WHERE queue = 'fence.dead'"), 1, "still there");
    assert_eq!(count(&schema, "SELECT deliveries FROM celery_rs_tasks"), 3, "counted on");
    dead.ack().await.unwrap();
    third.close().await;
    assert_eq!(count(&schema, "SELECT count(*) FROM celery_rs_tasks"), 0);
}

/// Queue names are bounded so that `<queue>.dead` fits: the error says so at publish, bind and
/// consume, and the longest queue's dead letters can be looked at.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_names_leave_room_for_their_dead_letter_queue() {
    let Some(schema) = PgSchema::new(SUITE) else { return };
    let b = broker(&schema, "").await;
    let (longest, too_long) = ("q".repeat(250), "q".repeat(251));
    let errors = [
        b.publish(&Route::queue(too_long.clone()), &msg(0)).await.unwrap_err(),
        b.bind(&Binding::new("ex", too_long.clone(), "k")).await.unwrap_err(),
        b.consume(std::slice::from_ref(&too_long), 1).await.err().unwrap(),
        b.bind(&Binding::new("e".repeat(256), "q", "k")).await.unwrap_err(),
        b.bind(&Binding::new("ex", "q", "k".repeat(256))).await.unwrap_err(),
    ];
    for (i, e) in errors.iter().enumerate() {
        let e = e.to_string();
        let want = if i < 3 {
            "queue name of 251 bytes is longer than 250 (255 less room for `.dead`)"
        } else {
            "of 256 bytes is longer than 255"
        };
        assert!(e.contains(want), "{i}: {e}");
    }
    b.publish(&Route::queue(longest.clone()), &msg(3)).await.unwrap();
    let mut consumer = b.consume(std::slice::from_ref(&longest), 1).await.unwrap();
    let d = tokio::time::timeout(T, consumer.next()).await.unwrap().unwrap();
    d.dead_letter("kept for a look").await.unwrap();
    consumer.close().await;
    let dead = format!("{longest}.dead");
    assert_eq!(dead.len(), 255);
    assert_eq!(b.queue_len(&dead).await.unwrap(), 1);
    assert_eq!(firsts(&[b.peek(&dead, 1).await.unwrap().remove(0).unwrap()]), [3]);
    assert_eq!(b.purge(&dead).await.unwrap(), 1);
}

/// One consumer of two busy queues takes from both, not the first until it is empty.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_busy_queues_both_progress() {
    let Some(schema) = PgSchema::new(SUITE) else { return };
    let b = broker(&schema, "").await;
    for q in ["busy_a", "busy_b"] {
        let batch: Vec<(Route, Message)> = (0..200).map(|i| (Route::queue(q), msg(i))).collect();
        b.publish_batch(&batch).await.unwrap();
    }
    let mut consumer = b.consume(&["busy_a".into(), "busy_b".into()], 10).await.unwrap();
    let (mut a, mut bb) = (0, 0);
    for _ in 0..60 {
        let d = tokio::time::timeout(T, consumer.next()).await.unwrap().unwrap();
        if d.queue == "busy_a" {
            a += 1;
        } else {
            bb += 1;
        }
        d.ack().await.unwrap();
    }
    consumer.close().await;
    assert!(a >= 20 && bb >= 20, "busy_a {a}, busy_b {bb}");
}

/// One consumer of 1,000 queues, a message in each and a backlog of 2,000 more in the first: the
/// first 1,000 deliveries are one of each queue (they take turns; the backlog waits), and a fetch
/// takes from many queues in one statement: the consumer's whole start and drain of those 1,000
/// cost at most 60 statements, where a statement per queue with work was over 1,000 (issue 20).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_of_1000_queues_takes_from_many_in_one_statement() {
    let Some(schema) = PgSchema::new(SUITE) else { return };
    let direct = broker(&schema, "").await;
    let queues: Vec<String> = (0..1000).map(|i| format!("many.{i}")).collect();
    let one_each: Vec<(Route, Message)> = queues.iter().map(|q| (Route::queue(q), msg(1))).collect();
    direct.publish_batch(&one_each).await.unwrap();
    let backlog: Vec<(Route, Message)> = (0..2000).map(|i| (Route::queue(&queues[0]), msg(i))).collect();
    direct.publish_batch(&backlog).await.unwrap();
    let proxy = CountingProxy::start("127.0.0.1:5432").await;
    let via =
        PostgresBroker::connect(&schema.url("postgres", "").replace("127.0.0.1:5432", &proxy.addr)).await.unwrap();
    let before = proxy.statements();
    let started = Instant::now();
    let mut consumer = via.consume(&queues, 1000).await.unwrap();
    let mut held = Vec::new();
    while held.len() < 1000 {
        held.push(tokio::time::timeout(T, consumer.next()).await.unwrap().unwrap());
    }
    let statements = proxy.statements() - before;
    println!("postgres_broker: 1,000 queues drained in {:?} with {statements} statements", started.elapsed());
    let seen: std::collections::HashSet<&str> = held.iter().map(|d| d.queue.as_str()).collect();
    assert_eq!(seen.len(), 1000, "one delivery of each queue first");
    assert!(statements >= 2, "the proxy counts statements: {statements}");
    assert!(statements <= 60, "{statements} statements to take one message from each of 1,000 queues");
    // Every slot is held: nothing more was taken.
    assert_eq!(direct.queue_len(&queues[0]).await.unwrap(), 2000, "the backlog waited");
    for d in held {
        d.ack().await.unwrap();
    }
    consumer.close().await;
}

/// A private server stopped with `-m fast`, then killed with `-m immediate`, while a producer
/// sends and a worker runs: every task whose send returned Ok runs to SUCCESS, and the worker
/// goes on after each restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_server_loses_nothing_acknowledged() {
    let Some(pg) = PgServer::start(SUITE) else { return };
    let (broker_url, backend_url) = (pg.url("postgres", "visibility_timeout=5"), pg.url("db+postgresql", ""));
    let app: App = celery_worker::connect(&broker_url, &backend_url).await.expect("connect");
    let worker = DemoProcess::start_urls(&broker_url, &backend_url, &["worker", "-c", "4"]);
    let acked: Arc<Mutex<Vec<(String, i64)>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let producer = {
        let (app, acked, stop) = (app.clone(), acked.clone(), stop.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(5));
            let mut i = 0i64;
            while !stop.load(Ordering::Relaxed) {
                tick.tick().await;
                if let Ok(r) = app.send_by_name("add", json!([i, 1]), json!({})).await {
                    acked.lock().unwrap().push((r.id().to_owned(), i + 1));
                }
                i += 1;
            }
        })
    };
    // Until `more` further sends were acknowledged and the last of them ran.
    let progress = |more: usize| {
        let (app, acked) = (app.clone(), acked.clone());
        async move {
            let target = acked.lock().unwrap().len() + more;
            loop {
                let last = { acked.lock().unwrap().get(target).cloned() };
                if let Some((id, want)) = last {
                    let got: i64 = app.result(&id).get(T).await.expect("the worker runs tasks");
                    assert_eq!(got, want);
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    tokio::time::timeout(T, progress(50)).await.unwrap_or_else(|_| panic!("running\n{}", worker.log()));
    for (round, how) in [Shutdown::Fast, Shutdown::Immediate].into_iter().enumerate() {
        pg.stop(how);
        let lost = |log: String| log.matches("listener connection lost").count() > round;
        assert!(wait_until(T, || lost(worker.log())), "{how:?}: the worker saw it\n{}", worker.log());
        pg.start_again();
        tokio::time::timeout(Duration::from_secs(60), progress(50))
            .await
            .unwrap_or_else(|_| panic!("{how:?}: back to work\n{}\n{}", worker.log(), pg.log()));
    }
    stop.store(true, Ordering::Relaxed);
    producer.await.unwrap();
    let all = acked.lock().unwrap().clone();
    let checks = all.iter().map(|(id, want)| {
        let app = app.clone();
        async move { (app.result(id).get::<i64>(T).await.ok() == Some(*want), id.clone()) }
    });
    let lost: Vec<String> = futures::stream::iter(checks)
        .buffer_unordered(16)
        .filter_map(|(ok, id)| async move { (!ok).then_some(id) })
        .collect()
        .await;
    assert!(lost.is_empty(), "{} of {} acknowledged tasks lost: {lost:?}\n{}", lost.len(), all.len(), worker.log());
    assert!(all.len() >= 150, "{}", all.len());
    let reconnects = worker.log().matches("listener connection lost").count();
    assert!(reconnects >= 2, "{reconnects}");
}

/// Flow control in the tables (the worker-level scenarios are in `flow_control`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_slots_and_rate_buckets_are_rows() {
    use celery_core::flow::{Admission, SlotRequest};
    let Some(schema) = PgSchema::new(SUITE) else { return };
    let b = broker(&schema, "").await;
    let slots = b.key_slots().expect("postgres holds key slots");
    let ttl = Duration::from_secs(30);
    // An unkeyed publish and take touch none of the flow tables.
    b.publish(&Route::queue("flow-q"), &msg(0)).await.unwrap();
    let mut c = b.consume(&["flow-q".to_owned()], 1).await.unwrap();
    let d = tokio::time::timeout(T, c.next()).await.unwrap().unwrap();
    d.ack().await.unwrap();
    let flow_rows = "SELECT (SELECT count(*) FROM celery_rs_key_slots) + (SELECT count(*) FROM celery_rs_parked) \
        + (SELECT count(*) FROM celery_rs_rate_buckets)";
    assert_eq!(count(&schema, flow_rows), 0);
    // Limit 1: the second is parked, as a row, and nothing is on the queue.
    let req = |holder| SlotRequest { key: "k", limit: 1, holder, ttl };
    assert_eq!(slots.acquire_or_park(&req("h1"), "flow-q", &msg(1)).await.unwrap(), Admission::Acquired);
    assert_eq!(slots.acquire_or_park(&req("h2"), "flow-q", &msg(2)).await.unwrap(), Admission::Parked);
    assert_eq!(count(&schema, "SELECT count(*) FROM celery_rs_parked WHERE key = 'k' AND queue = 'flow-q'"), 1);
    assert_eq!(b.queue_len("flow-q").await.unwrap(), 0);
    // The holder's row vanishes without a release (as if its release was lost): nothing moves
    // until the sweep finds a key with parked tasks and no slot, and moves one back.
    schema.exec("DELETE FROM celery_rs_key_slots").unwrap();
    assert_eq!(b.queue_len("flow-q").await.unwrap(), 0);
    assert_eq!(slots.sweep().await.unwrap(), 1);
    // Back in the queue's table (the open consumer may have leased it already: rows, not `queue_len`).
    assert_eq!(count(&schema, "SELECT count(*) FROM celery_rs_tasks WHERE queue = 'flow-q'"), 1);
    assert_eq!(count(&schema, "SELECT count(*) FROM celery_rs_parked"), 0);
    let mut d = tokio::time::timeout(T, c.next()).await.unwrap().unwrap();
    assert_eq!(firsts(&[d.take_message().unwrap()]), [2], "the parked task came back whole");
    d.ack().await.unwrap();
    c.close().await;
    // Renewing a slot the sweep took re-takes it, and says it was lost.
    assert!(!slots.renew("k", "h3", ttl).await.unwrap());
    assert!(slots.renew("k", "h3", ttl).await.unwrap());
    // Ten reservations at once over 100 ms: the starts they give (when each answer came, plus its
    // wait) are 100 ms apart, within the answers' own jitter.
    let buckets = b.rate_buckets().expect("postgres holds rate buckets");
    let interval = Duration::from_millis(100);
    let reserve = || async { buckets.reserve("flow-task", interval).await.map(|w| Instant::now() + w) };
    let starts = futures::future::join_all((0..10).map(|_| reserve())).await;
    let mut starts: Vec<Instant> = starts.into_iter().map(Result::unwrap).collect();
    starts.sort();
    let gaps: Vec<u128> = starts.windows(2).map(|w| (w[1] - w[0]).as_millis()).collect();
    assert!(gaps.iter().all(|g| (80..=120).contains(g)), "starts 100 ms apart: {gaps:?}");
    assert!(buckets.reserve("", interval).await.is_err(), "an empty bucket name is refused");
}

/// The flow tables are bounded as the built-in broker's memory is: keys tracked and rate buckets
/// (`MAX_TRACKED_KEYS`), idle buckets deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flow_tables_are_bounded() {
    use celery_core::flow::{Admission, SlotRequest, MAX_TRACKED_KEYS};
    let Some(schema) = PgSchema::new(SUITE) else { return };
    let b = broker(&schema, "").await;
    let slots = b.key_slots().expect("postgres holds key slots");
    let ttl = Duration::from_secs(30);
    let req = |key, holder| SlotRequest { key, limit: 1, holder, ttl };
    // One key with a parked message, the others with a slot each: MAX_TRACKED_KEYS in all.
    assert_eq!(slots.acquire_or_park(&req("p", "h1"), "flow-q", &msg(1)).await.unwrap(), Admission::Acquired);
    assert_eq!(slots.acquire_or_park(&req("p", "h2"), "flow-q", &msg(2)).await.unwrap(), Admission::Parked);
    schema.exec("DELETE FROM celery_rs_key_slots").unwrap();
    schema
        .exec(&format!(
            "INSERT INTO celery_rs_key_slots (key, holder, expires_at) \
             SELECT 'k' || g, 'h', now() + interval '1 hour' FROM generate_series(2, {MAX_TRACKED_KEYS}) g"
        ))
        .unwrap();
    let e = slots.acquire_or_park(&req("new", "h3"), "flow-q", &msg(3)).await.unwrap_err();
    assert!(!e.is_retryable(), "{e:?}");
    let limit = format!("too many concurrency keys tracked at once (the limit is {MAX_TRACKED_KEYS})");
    assert!(e.to_string().contains(&limit), "{e}");
    assert_eq!(count(&schema, "SELECT count(*) FROM celery_rs_key_slots WHERE key = 'new'"), 0);
    // Known keys go on: one with a slot (parked now, its limit is 1) and the one with a parked message.
    assert_eq!(slots.acquire_or_park(&req("k2", "h4"), "flow-q", &msg(4)).await.unwrap(), Admission::Parked);
    assert_eq!(slots.acquire_or_park(&req("p", "h5"), "flow-q", &msg(5)).await.unwrap(), Admission::Acquired);
    // A key that drains leaves room for a new one.
    schema.exec("DELETE FROM celery_rs_key_slots WHERE key = 'k3'").unwrap();
    assert_eq!(slots.acquire_or_park(&req("new", "h3"), "flow-q", &msg(3)).await.unwrap(), Admission::Acquired);

    // Rate buckets: a new one deletes those idle for over a minute, and keeps the others.
    let buckets = b.rate_buckets().expect("postgres holds rate buckets");
    let interval = Duration::from_millis(10);
    schema
        .exec(
            "INSERT INTO celery_rs_rate_buckets (name, next_at) SELECT 'idle' || g, now() - interval '2 minutes' \
             FROM generate_series(1, 1000) g; \
             INSERT INTO celery_rs_rate_buckets (name, next_at) VALUES ('live', now() + interval '1 hour')",
        )
        .unwrap();
    buckets.reserve("fresh", interval).await.unwrap();
    assert_eq!(count(&schema, "SELECT count(*) FROM celery_rs_rate_buckets WHERE name LIKE 'idle%'"), 0);
    assert_eq!(count(&schema, "SELECT count(*) FROM celery_rs_rate_buckets"), 2);
    // Once MAX_TRACKED_KEYS live buckets remain, a new one is refused; known ones go on.
    schema
        .exec(&format!(
            "INSERT INTO celery_rs_rate_buckets (name, next_at) \
             SELECT 'b' || g, now() + interval '1 hour' FROM generate_series(3, {MAX_TRACKED_KEYS}) g"
        ))
        .unwrap();
    let e = buckets.reserve("one-more", interval).await.unwrap_err();
    assert!(!e.is_retryable(), "{e:?}");
    assert!(e.to_string().contains(&format!("too many rate buckets (the limit is {MAX_TRACKED_KEYS})")), "{e}");
    assert!(buckets.reserve("fresh", interval).await.unwrap() <= interval);
}

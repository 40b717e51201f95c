//! The PostgreSQL broker (`postgres://`) against the real server, each test in a schema of its
//! own (the conformance suites run on it too, as `postgres_broker::*`):
//! 1. kill -9 of a worker process mid-task: its tasks stay leased, come back once the visibility
//!    timeout passes, and run to SUCCESS on the next worker; nothing is left in the table.
//! 2. `LISTEN/NOTIFY` wakes an idle consumer at once (an idle consumer otherwise sleeps a minute).
//! 3. Purge removes ready and not-yet-due rows, never leased ones.
//! 4. Dead letters: the row moves to `<queue>.dead` with its reason in the table and the header.
//! 5. Direct, topic and fanout routing through the bindings table; mandatory unroutable publishes fail.
//! 6. A lease lost to another consumer is never settled by its first holder (the fencing token).
//! 7. Broadcasts, inline and stored (larger than a notification), filtered by exchange and pattern.
//! 8. Priorities: higher priority first, then oldest first.
//! 9. 5,000 events through `NOTIFY` alone: each arrives once, none is stored.
//! 10. The listening connection killed by the server: nothing waits meanwhile, and it comes back.

use std::time::{Duration, Instant};

use broker_backends::postgres::PostgresBroker;
use celery_core::broker::DEAD_LETTER_REASON;
use celery_core::capability::{Broadcasts, Routing};
use celery_core::protocol::Message;
use celery_core::routing::{Binding, Exchange, ExchangeKind, Route};
use celery_core::{App, Broker, BrokerError, Signature, TaskState};
use celery_tests::{wait_until, DemoProcess, PgSchema};
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_task_brings_the_tasks_back_after_the_visibility_timeout() {
    let Some(schema) = PgSchema::new(SUITE) else { return };
    let (broker_url, backend_url) = (schema.url("postgres", "visibility_timeout=2"), schema.url("db+postgresql", ""));
    let app: App = celery_worker::connect(&broker_url, &backend_url).await.expect("connect");
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(app.send_by_name("sleep", json!([3000]), json!({})).await.unwrap().id().to_owned());
    }
    let mut first = DemoProcess::start_urls(&broker_url, &backend_url, &["worker", "-c", "3"]);
    let started = async {
        loop {
            let mut n = 0;
            for id in &ids {
                n += usize::from(app.result(id).state().await.unwrap() == TaskState::Started);
            }
            if n == ids.len() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::time::timeout(T, started).await.unwrap_or_else(|_| panic!("all three started\n{}", first.log()));
    first.signal("KILL");
    let killed_at = chrono::Utc::now();
    first.wait_exit(Duration::from_secs(5)).expect("killed");
    let leased = "SELECT count(*) FROM celery_rs_tasks WHERE leased_until IS NOT NULL AND deliveries = 1";
    assert_eq!(count(&schema, leased), 3, "the killed worker's tasks are still leased");

    let second = DemoProcess::start_urls(&broker_url, &backend_url, &["worker", "-c", "3"]);
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
    assert!(e.contains("longer than 255"), "{e}");
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
async fn broadcasts_inline_and_stored() {
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
    assert_eq!(count(&schema, "SELECT count(*) FROM celery_rs_broadcasts"), 1, "only the large one is stored");
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

/// Events at thousands a second: every one arrives, in order, and none is stored in a table.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_events_go_through_notify_alone() {
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
    use futures::StreamExt;
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
    assert_eq!(count(&schema, "SELECT count(*) FROM celery_rs_broadcasts"), 0, "nothing stored");
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

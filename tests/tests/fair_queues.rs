//! Fair queues (`Signature::fairness_key`) on the built-in broker (in this process, and over
//! `log+tcp://`), on Redis and on PostgreSQL: the broker contract (keys take turns by weight, also
//! when keys run out within one fetch; a key queued behind another's backlog is served at once;
//! length, peek, purge and requeue count keyed messages; a lost keyed delivery is restored into
//! its key's line; PostgreSQL: a dead worker's keyed task comes back into the rotation; Redis: an
//! oversized keyed message keeps its key in turn, and a fair fetch costs one `RPOP` a turn), then
//! real worker processes measured from outside (the order of the `span` lines in a file): 10 tasks
//! of key B queued behind 5,000 of key A all finish before 10% of A's, and `--fairness-weight A=3`
//! gives A 75% ± 10% of the first deliveries while both wait. A broker without fair queues refuses a keyed send.

use std::time::Duration;

use celery_core::flow::FairnessWeights;
use celery_core::{App, Signature};
use celery_tests::flow::Setup;
use celery_tests::{wait_until, PrivateRedis, Target, TempDir};
use serde_json::json;

const T: Duration = Duration::from_secs(60);

fn weights(list: &[&str]) -> FairnessWeights {
    FairnessWeights::new(list.iter().map(|w| w.parse().unwrap()).collect()).unwrap()
}

fn task(queue: &str, i: usize) -> Signature {
    Signature::by_name("fair_probe").args(json!([i])).queue(queue)
}

/// The fairness key of each of the next `n` deliveries of `queue` (each acked), with `weights`,
/// taken one at a time.
async fn take_keys(app: &App, queue: &str, n: usize, w: FairnessWeights) -> Vec<String> {
    take_keys_by(app, queue, n, w, 1).await
}

/// [`take_keys`] with a consumer that fetches up to `prefetch` at once.
async fn take_keys_by(app: &App, queue: &str, n: usize, w: FairnessWeights, prefetch: usize) -> Vec<String> {
    app.broker().require_fair_queues("test").unwrap().set_fairness_weights(w);
    let mut c = app.broker().consume(&[queue.to_owned()], prefetch).await.unwrap();
    let mut keys = Vec::new();
    while keys.len() < n {
        let mut d = tokio::time::timeout(T, c.next()).await.expect("a delivery in time").expect("open");
        let msg = d.take_message().unwrap();
        keys.push(msg.headers.extra.get("x-fairness-key").and_then(|v| v.as_str()).unwrap_or("").to_owned());
        d.ack().await.unwrap();
    }
    c.close().await;
    keys
}

/// Keys A (weight 3) and B both backlogged, A queued first: A gets 3 of every 4 deliveries.
async fn weights_share_deliveries(t: Target) {
    let app = t.app().await;
    let q = format!("fair-w-{}", uuid::Uuid::new_v4().simple());
    app.send_batch((0..200).map(|i| task(&q, i).fairness_key("A"))).await.unwrap();
    app.send_batch((0..200).map(|i| task(&q, i).fairness_key("B"))).await.unwrap();
    let keys = take_keys(&app, &q, 100, weights(&["A=3"])).await;
    let a = keys.iter().filter(|k| *k == "A").count();
    assert!((65..=85).contains(&a), "A's share of the first 100 is {a}%: {keys:?}");
    assert_eq!(&keys[..8], ["A", "A", "A", "B", "A", "A", "A", "B"], "weighted round robin");
}

/// Keys of 1 to 5 messages, weight 2 each, taken by a consumer fetching many at once: each key
/// gives 2 a turn in the order the keys came, and a key whose messages run out in its turn leaves
/// the rotation (the next key's turn starts with a full credit).
async fn keys_run_out_in_one_fetch(t: Target) {
    let app = t.app().await;
    let q = format!("fair-out-{}", uuid::Uuid::new_v4().simple());
    for (k, n) in ["A", "B", "C", "D", "E"].iter().zip(1..=5) {
        app.send_batch((0..n).map(|i| task(&q, i).fairness_key(*k))).await.unwrap();
    }
    let keys = take_keys_by(&app, &q, 15, weights(&["A=2", "B=2", "C=2", "D=2", "E=2"]), 32).await;
    let want = ["A", "B", "B", "C", "C", "D", "D", "E", "E", "C", "D", "D", "E", "E", "E"];
    assert_eq!(keys, want, "weighted turns with keys running out");
    assert_eq!(app.broker().queue_len(&q).await.unwrap(), 0);
}

/// Ten messages of B (and two unkeyed) queued behind 1,000 of A all come within the first 30.
async fn a_late_key_is_served_at_once(t: Target) {
    let app = t.app().await;
    let q = format!("fair-late-{}", uuid::Uuid::new_v4().simple());
    for chunk in 0..4 {
        app.send_batch((0..250).map(|i| task(&q, chunk * 250 + i).fairness_key("A"))).await.unwrap();
    }
    app.send_batch((0..10).map(|i| task(&q, i).fairness_key("B"))).await.unwrap();
    app.send_batch((0..2).map(|i| task(&q, i))).await.unwrap();
    let keys = take_keys(&app, &q, 30, FairnessWeights::default()).await;
    assert_eq!(keys.iter().filter(|k| *k == "B").count(), 10, "{keys:?}");
    assert_eq!(keys.iter().filter(|k| k.is_empty()).count(), 2, "unkeyed messages are one more key: {keys:?}");
    // One more may be prefetched for the closed consumer, leased until its lease lapses.
    let left = app.broker().queue_len(&q).await.unwrap();
    assert!((1012 - 31..=1012 - 30).contains(&left), "{left} left");
}

/// Length, peek and purge count keyed and unkeyed messages (a requeued keyed delivery too).
async fn length_peek_purge_and_requeue(t: Target) {
    let app = t.app().await;
    let q = format!("fair-ops-{}", uuid::Uuid::new_v4().simple());
    app.send_batch((0..5).map(|i| task(&q, i).fairness_key("A").priority(if i == 4 { 9 } else { 0 }))).await.unwrap();
    app.send_batch((0..3).map(|i| task(&q, i))).await.unwrap();
    let b = app.broker();
    assert_eq!(b.queue_len(&q).await.unwrap(), 8);
    let peeked = b.peek(&q, 100).await.unwrap();
    assert_eq!(peeked.len(), 8, "peek sees keyed messages too");
    let keyed = peeked.iter().filter(|m| m.as_ref().unwrap().headers.extra.contains_key("x-fairness-key")).count();
    assert_eq!(keyed, 5);
    let mut c = b.consume(std::slice::from_ref(&q), 1).await.unwrap();
    let d = tokio::time::timeout(T, c.next()).await.unwrap().unwrap();
    c.stop();
    d.requeue().await.unwrap();
    c.close().await;
    assert_eq!(b.queue_len(&q).await.unwrap(), 8, "requeued into its line");
    assert_eq!(b.peek(&q, 100).await.unwrap().len(), 8);
    assert_eq!(b.purge(&q).await.unwrap(), 8);
    assert_eq!(b.queue_len(&q).await.unwrap(), 0);
    assert!(b.peek(&q, 10).await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_contract() {
    weights_share_deliveries(Target::log()).await;
    a_late_key_is_served_at_once(Target::log()).await;
    length_peek_purge_and_requeue(Target::log()).await;
    keys_run_out_in_one_fetch(Target::log()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_tcp_contract() {
    weights_share_deliveries(Target::log_tcp().await).await;
    a_late_key_is_served_at_once(Target::log_tcp().await).await;
    length_peek_purge_and_requeue(Target::log_tcp().await).await;
    keys_run_out_in_one_fetch(Target::log_tcp().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_contract() {
    let Some(t) = Target::redis() else { return };
    weights_share_deliveries(t).await;
    a_late_key_is_served_at_once(Target::redis().unwrap()).await;
    length_peek_purge_and_requeue(Target::redis().unwrap()).await;
    keys_run_out_in_one_fetch(Target::redis().unwrap()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_contract() {
    let Some(t) = Target::postgres() else { return };
    weights_share_deliveries(t).await;
    a_late_key_is_served_at_once(Target::postgres().unwrap()).await;
    length_peek_purge_and_requeue(Target::postgres().unwrap()).await;
    keys_run_out_in_one_fetch(Target::postgres().unwrap()).await;
}

/// PostgreSQL: two consumers of one fair queue (each fair fetch locks the queue's rotation, so
/// they take turns) together get every one of 400 tasks of 4 keys exactly once, both of them
/// some, and the queue ends empty.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_two_consumers_share_a_fair_queue() {
    let Some(t) = Target::postgres() else { return };
    let app = t.app().await;
    let q = format!("fair-two-{}", uuid::Uuid::new_v4().simple());
    app.send_batch((0..400).map(|i| task(&q, i).fairness_key(format!("k{}", i % 4)))).await.unwrap();
    let total = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let deadline = std::time::Instant::now() + T;
    let take = |app: App, q: String, total: std::sync::Arc<std::sync::atomic::AtomicUsize>| async move {
        let mut c = app.broker().consume(&[q], 8).await.unwrap();
        let mut ids = Vec::new();
        // Until both together have all 400 (or the deadline: the count below then fails).
        while total.load(std::sync::atomic::Ordering::SeqCst) < 400 && std::time::Instant::now() < deadline {
            if let Ok(Some(mut d)) = tokio::time::timeout(Duration::from_millis(200), c.next()).await {
                ids.push(d.take_message().unwrap().headers.id.clone());
                d.ack().await.unwrap();
                total.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
        }
        c.close().await;
        ids
    };
    let (a, b) = tokio::join!(take(app.clone(), q.clone(), total.clone()), take(app.clone(), q.clone(), total.clone()));
    assert!(!a.is_empty() && !b.is_empty(), "both consumers took some: {} and {}", a.len(), b.len());
    let mut all: Vec<String> = a.into_iter().chain(b).collect();
    all.sort();
    all.dedup();
    assert_eq!(all.len(), 400, "every task once");
    assert_eq!(app.broker().queue_len(&q).await.unwrap(), 0);
}

/// A keyed delivery whose consumer goes away unsettled is restored (visibility timeout 1 s) into
/// its key's line, and served again.
async fn restores_a_lost_keyed_delivery_into_its_line(t: Target) {
    let app = t.app().await;
    let q = format!("fair-restore-{}", uuid::Uuid::new_v4().simple());
    app.send(task(&q, 1).fairness_key("A")).await.unwrap();
    app.send(task(&q, 2).fairness_key("B")).await.unwrap();
    let b = app.broker();
    let mut lost = b.consume(std::slice::from_ref(&q), 1).await.unwrap();
    let d = tokio::time::timeout(T, lost.next()).await.unwrap().unwrap();
    // Neither settled nor renewed: the consumer goes away with it.
    drop(d);
    drop(lost);
    // A second app: its consumer's restore loop brings it back after the timeout.
    let other = t.app().await;
    let mut keys = take_keys(&other, &q, 2, FairnessWeights::default()).await;
    keys.sort();
    assert_eq!(keys, ["A", "B"], "the lost one came back");
    assert_eq!(b.queue_len(&q).await.unwrap(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restores_a_lost_keyed_delivery_into_its_line() {
    if let Some(t) = Target::redis() {
        restores_a_lost_keyed_delivery_into_its_line(t).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restores_a_lost_keyed_delivery_into_its_line() {
    if let Some(t) = Target::postgres() {
        restores_a_lost_keyed_delivery_into_its_line(t).await;
    }
}

/// The fairness key of a delivery, or `too large` for one its consumer refused unread.
fn key_of(d: &mut celery_core::broker::Delivery) -> String {
    match d.take_message() {
        Ok(msg) => msg.headers.extra.get("x-fairness-key").and_then(|v| v.as_str()).unwrap_or("").to_owned(),
        Err(_) => "too large".to_owned(),
    }
}

/// A keyed envelope over the consumer's size limit is dead-lettered in its key's turn: it uses
/// the key's credit but no prefetch slot, so the turn goes on until the credit or the fetch is
/// used up and every key stays in the ring. (The next key used to take over the credit left and
/// the ring to lose the key whose turn it was: its other messages were never served.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_an_oversized_keyed_message_keeps_its_key_in_turn() {
    let Some(t) = Target::redis() else { return };
    let app = t.app().await;
    let q = format!("fair-big-{}", uuid::Uuid::new_v4().simple());
    app.send(task(&q, 0).args(json!(["x".repeat(4000)])).fairness_key("A")).await.unwrap();
    app.send_batch((1..5).map(|i| task(&q, i).fairness_key("A"))).await.unwrap();
    app.send_batch((0..4).map(|i| task(&q, i).fairness_key("B"))).await.unwrap();
    let b = app.broker();
    b.require_fair_queues("test").unwrap().set_fairness_weights(weights(&["A=3"]));
    let mut c = b.consume_capped(std::slice::from_ref(&q), 2, 2000).await.unwrap();
    let mut keys = Vec::new();
    while keys.len() < 9 {
        let next = tokio::time::timeout(Duration::from_secs(15), c.next()).await;
        let mut d = next.unwrap_or_else(|_| panic!("no delivery in time after {keys:?}")).expect("open");
        keys.push(key_of(&mut d));
        d.ack().await.unwrap();
    }
    c.close().await;
    // Served in turns (A up to 3, B 1) by two fetches in flight, whose order between them is not
    // defined: the oversized one first, A's first turn of at most 3 before B's first, A's last
    // one before B's last, and every message of both keys (a key lost from the ring would leave
    // A's others unserved).
    let first_b = keys.iter().position(|k| k == "B").expect("B served");
    let last_a = keys.iter().rposition(|k| k == "A").expect("A served");
    assert_eq!(keys[0], "too large", "{keys:?}");
    assert!((3..=4).contains(&first_b) && last_a < keys.len() - 1, "A's turns of 3, B's of 1: {keys:?}");
    assert_eq!((keys.iter().filter(|k| *k == "A").count(), keys.iter().filter(|k| *k == "B").count()), (4, 4));
    assert_eq!(b.queue_len(&q).await.unwrap(), 0);
}

/// A fair fetch costs Redis one `RPOP` per key's turn and reads and rotates a ring it holds whole
/// once, not once a lap: 600 tasks over 3 keys, fetched 128 at a time (none settled meanwhile),
/// counted on a server of the test's own (`INFO commandstats`). Before, each lap of the 4-key ring
/// (with the queue's own empty buckets) cost a `LRANGE`, `LTRIM` and `RPUSH` and 4 `RPOP`s more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_a_fair_fetch_costs_one_rpop_a_turn() {
    const N: usize = 600;
    let Some(server) = PrivateRedis::start() else { return };
    let app = celery_worker::connect(&server.url, &server.url).await.expect("connect");
    let q = "fair-calls".to_owned();
    for k in ["A", "B", "C"] {
        app.send_batch((0..N / 3).map(|i| task(&q, i).fairness_key(k))).await.unwrap();
    }
    let calls = |c: &str| server.calls(c);
    let before = ["rpop", "lrange", "ltrim", "evalsha", "eval"].map(calls);
    let mut c = app.broker().consume(std::slice::from_ref(&q), N).await.unwrap();
    let (mut keys, mut held) = (Vec::new(), Vec::new());
    while keys.len() < N {
        let mut d = tokio::time::timeout(T, c.next()).await.expect("a delivery in time").expect("open");
        keys.push(key_of(&mut d));
        held.push(d);
    }
    let after = ["rpop", "lrange", "ltrim", "evalsha", "eval"].map(calls);
    for d in held {
        d.ack().await.unwrap();
    }
    c.close().await;
    // Keys take turns within each fetch; the two fetches in flight may run in either order (each
    // is written from a task of its own, and the first one on a fresh server is sent again after
    // `NOSCRIPT`), so the turns are checked as counts: at no point has a key had two turns more
    // than another.
    let mut count = [0usize; 3];
    for (i, k) in keys.iter().enumerate() {
        count[["A", "B", "C"].iter().position(|x| x == k).expect("a key sent")] += 1;
        let (most, least) = (count.iter().max().unwrap(), count.iter().min().unwrap());
        assert!(most - least <= 2, "keys out of turn after {} deliveries: {count:?} in {keys:?}", i + 1);
    }
    assert_eq!(count, [N / 3; 3]);
    let [rpop, lrange, ltrim, evalsha, eval] = [0, 1, 2, 3, 4].map(|i| after[i] - before[i]);
    let scripts = evalsha + eval;
    assert!(scripts < 40, "{scripts} scripts for {N} tasks fetched 128 at a time");
    assert!(rpop <= N as u64 + 4 * scripts, "{rpop} RPOPs for {N} tasks in {scripts} scripts");
    assert!(lrange + ltrim <= 2 * scripts, "{lrange} LRANGEs and {ltrim} LTRIMs in {scripts} scripts");
    assert_eq!(app.broker().queue_len(&q).await.unwrap(), 0);
}

/// Sending a keyed task through a broker without fair queues fails with an error naming them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_without_fair_queues_refuses_keyed_sends() {
    let app = celery_worker::connect("memory://", "memory://").await.unwrap();
    let err = app.send(task("fair-mem", 1).fairness_key("A")).await.unwrap_err().to_string();
    assert!(err.contains("fair queues") && err.contains("fairness_key"), "{err}");
    let bad = app.send(task("fair-mem", 1).fairness_key("a\nb")).await.unwrap_err().to_string();
    assert!(bad.contains("x-fairness-key"), "{bad}");
    app.send(task("fair-mem", 1)).await.unwrap();
}

fn log_setup() -> Setup {
    Setup::log("fair", "fsync=os")
}

fn redis_setup() -> Option<Setup> {
    Setup::redis("fair_queues", 30.0)
}

fn postgres_setup() -> Option<Setup> {
    Setup::postgres("fair_queues", "visibility_timeout=30")
}

fn span(path: &std::path::Path, queue: &str, token: &str) -> Signature {
    Signature::by_name("span").args(json!([path.display().to_string(), token, 0])).queue(queue).ignore_result(true)
}

/// The tokens of the `end` lines (or `start` lines) in the file, in the order they were written.
fn lines(path: &std::path::Path, what: &str) -> Vec<String> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let mut parts = l.split(' ');
            let token = parts.next()?;
            (parts.next()? == what).then(|| token.to_owned())
        })
        .collect()
}

/// 5,000 tasks of key A queued first, then 10 of key B: one worker (4 slots, prefetch 1 each)
/// finishes all of B before it has finished 10% of A's backlog.
async fn a_small_key_passes_a_large_backlog(setup: Setup) {
    let app = setup.app().await;
    let dir = TempDir::new("fair-spans");
    let path = dir.0.join("spans");
    let q = format!("fair-p-{}", uuid::Uuid::new_v4().simple());
    for chunk in 0..5 {
        app.send_batch((0..1000).map(|i| span(&path, &q, &format!("a{}", chunk * 1000 + i)).fairness_key("A")))
            .await
            .unwrap();
    }
    app.send_batch((0..10).map(|i| span(&path, &q, &format!("b{i}")).fairness_key("B"))).await.unwrap();
    let _w = setup.worker(&["-Q", &q, "-c", "4", "--prefetch-multiplier", "1"]);
    let b_done = || lines(&path, "end").iter().filter(|t| t.starts_with('b')).count() == 10;
    assert!(wait_until(T, b_done), "B did not finish: {} lines", lines(&path, "end").len());
    let ends = lines(&path, "end");
    let last_b = ends.iter().rposition(|t| t.starts_with('b')).unwrap();
    let a_before = ends[..last_b].iter().filter(|t| t.starts_with('a')).count();
    println!("fair_queues: all 10 of B finished after {a_before} of A's 5000");
    assert!(a_before < 500, "{a_before} of A's 5,000 finished before the last of B (at most 10%)");
}

/// A (weight 3 by `--fairness-weight`) and B, 600 each, A queued first: A has 75% ± 10% of the
/// first 200 starts.
async fn worker_weights_share_starts(setup: Setup) {
    let app = setup.app().await;
    let dir = TempDir::new("fair-weights");
    let path = dir.0.join("spans");
    let q = format!("fair-pw-{}", uuid::Uuid::new_v4().simple());
    app.send_batch((0..600).map(|i| span(&path, &q, &format!("a{i}")).fairness_key("A"))).await.unwrap();
    app.send_batch((0..600).map(|i| span(&path, &q, &format!("b{i}")).fairness_key("B"))).await.unwrap();
    let _w = setup.worker(&["-Q", &q, "-c", "2", "--prefetch-multiplier", "1", "--fairness-weight", "A=3"]);
    assert!(wait_until(T, || lines(&path, "start").len() >= 200), "{} starts", lines(&path, "start").len());
    let starts = lines(&path, "start");
    let a = starts[..200].iter().filter(|t| t.starts_with('a')).count();
    println!("fair_queues: A (weight 3) had {a} of the first 200 starts");
    assert!((130..=170).contains(&a), "A had {a} of the first 200 starts (75% ± 10%: 130 to 170)");
}

/// Keyed tasks that wait elsewhere come back to their key's line and run: six with a concurrency
/// key too (`span` allows 2 at once: the others are parked, then moved back), and one with a
/// countdown (Redis: deferred by the worker, then promoted when due).
async fn keyed_tasks_come_back_from_waiting(setup: Setup) {
    let app = setup.app().await;
    let dir = TempDir::new("fair-back");
    let path = dir.0.join("spans");
    let q = format!("fair-back-{}", uuid::Uuid::new_v4().simple());
    let _w = setup.worker(&["-Q", &q, "-c", "4", "--key-lease", "5"]);
    for i in 0..6 {
        let sig = span(&path, &q, &format!("c{i}")).args(json!([path.display().to_string(), format!("c{i}"), 50]));
        app.send(sig.concurrency_key("ck").fairness_key("F")).await.unwrap();
    }
    app.send(span(&path, &q, "eta").fairness_key("E").countdown(Duration::from_secs(1))).await.unwrap();
    let all = || lines(&path, "end").len() == 7;
    assert!(wait_until(T, all), "ended: {:?}", lines(&path, "end"));
    assert_eq!(app.broker().queue_len(&q).await.unwrap(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_keyed_tasks_come_back_from_waiting() {
    keyed_tasks_come_back_from_waiting(log_setup()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_keyed_tasks_come_back_from_waiting() {
    if let Some(s) = redis_setup() {
        keyed_tasks_come_back_from_waiting(s).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_a_small_key_passes_a_large_backlog() {
    a_small_key_passes_a_large_backlog(log_setup()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_a_small_key_passes_a_large_backlog() {
    if let Some(s) = redis_setup() {
        a_small_key_passes_a_large_backlog(s).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_worker_weights_share_starts() {
    worker_weights_share_starts(log_setup()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_worker_weights_share_starts() {
    if let Some(s) = redis_setup() {
        worker_weights_share_starts(s).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_keyed_tasks_come_back_from_waiting() {
    if let Some(s) = postgres_setup() {
        keyed_tasks_come_back_from_waiting(s).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_small_key_passes_a_large_backlog() {
    if let Some(s) = postgres_setup() {
        a_small_key_passes_a_large_backlog(s).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_worker_weights_share_starts() {
    if let Some(s) = postgres_setup() {
        worker_weights_share_starts(s).await;
    }
}

/// PostgreSQL: a keyed task held by a worker killed with SIGKILL keeps its key in the queue's
/// ring while it is leased (its key has no other task), comes back once the dead worker's
/// heartbeat is `worker_grace` (10 s) old, and is served by the other worker through the fair
/// fetch; a purge of the empty queue drops its rotation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_dead_workers_keyed_task_comes_back_into_the_rotation() {
    let Some(setup) = Setup::postgres("fair_queues", "visibility_timeout=3600") else { return };
    let Setup::Postgres { schema, .. } = &setup else { unreachable!() };
    let app = setup.app().await;
    let dir = TempDir::new("fair-dead");
    let path = dir.0.join("spans");
    let q = format!("fair-dead-{}", uuid::Uuid::new_v4().simple());
    let long = span(&path, &q, "a0").args(json!([path.display().to_string(), "a0", 4000]));
    app.send(long.fairness_key("A")).await.unwrap();
    let mut first = setup.worker(&["-Q", &q, "-c", "1", "--prefetch-multiplier", "1"]);
    assert!(wait_until(T, || lines(&path, "start").contains(&"a0".to_owned())), "a0 did not start");
    first.signal("KILL");
    first.wait_exit(Duration::from_secs(5)).expect("killed");
    let ring = |key: &str| {
        schema
            .query(&format!("SELECT count(*) FROM celery_rs_fair_ring WHERE queue = '{q}' AND key = '{key}'"))
            .unwrap()[0][0]
            .clone()
            .unwrap()
    };
    assert_eq!(ring("A"), "1", "a key whose only task is leased stays in the ring");
    app.send_batch((0..3).map(|i| span(&path, &q, &format!("b{i}")).fairness_key("B"))).await.unwrap();
    let _second = setup.worker(&["-Q", &q, "-c", "2", "--prefetch-multiplier", "1"]);
    let ends = || lines(&path, "end");
    assert!(wait_until(T, || ends().len() == 4), "ended: {:?}", ends());
    assert_eq!(ends().iter().filter(|t| *t == "a0").count(), 1, "a0 ran to its end once, elsewhere");
    assert_eq!(app.broker().queue_len(&q).await.unwrap(), 0);
    // Once its acks are deleted, a purge of the empty queue drops its rotation.
    let rows = || schema.query(&format!("SELECT count(*) FROM celery_rs_tasks WHERE queue = '{q}'")).unwrap();
    assert!(wait_until(T, || rows()[0][0].as_deref() == Some("0")), "acked rows deleted");
    assert_eq!(app.broker().purge(&q).await.unwrap(), 0);
    let fair = schema.query(&format!("SELECT count(*) FROM celery_rs_fair_queues WHERE queue = '{q}'")).unwrap();
    assert_eq!(fair[0][0].as_deref(), Some("0"), "the rotation of an empty queue is dropped by a purge");
    assert_eq!(ring(""), "0");
}

/// A PostgreSQL target, its schema, and an app on it; `None` (skipped) without the servers.
async fn postgres_app() -> Option<(Target, App)> {
    let t = Target::postgres()?;
    let app = t.app().await;
    Some((t, app))
}

/// Runs `sql` in the target's schema; the first column of the first row.
fn pg_value(t: &Target, sql: &str) -> Option<String> {
    let Target::Postgres(schema, _) = t else { unreachable!("a postgres target") };
    schema.query(sql).unwrap().first().and_then(|r| r[0].clone())
}

/// PostgreSQL: 70 keys whose only tasks wait for an eta a day away (more than one fetch of 1
/// reads of the ring, 2 × 1 + 64 keys) do not hold up a key queued behind them with a ready task:
/// it is delivered at once, and the waiting keys stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_ready_key_passes_keys_that_only_wait() {
    let Some((t, app)) = postgres_app().await else { return };
    let q = format!("fair-wait-{}", uuid::Uuid::new_v4().simple());
    let later = chrono::Utc::now() + chrono::Duration::days(1);
    app.send_batch((0..70).map(|i| task(&q, i).fairness_key(format!("w{i}")).eta(later))).await.unwrap();
    app.send(task(&q, 70).fairness_key("late")).await.unwrap();
    let mut c = app.broker().consume(std::slice::from_ref(&q), 1).await.unwrap();
    let mut d = tokio::time::timeout(Duration::from_secs(10), c.next())
        .await
        .expect("the ready key is delivered at once")
        .expect("open");
    let msg = d.take_message().unwrap();
    assert_eq!(msg.headers.extra.get("x-fairness-key").and_then(|v| v.as_str()), Some("late"));
    d.ack().await.unwrap();
    c.close().await;
    let waiting =
        pg_value(&t, &format!("SELECT count(*) FROM celery_rs_fair_ring WHERE queue = '{q}' AND key LIKE 'w%'"));
    assert_eq!(waiting.as_deref(), Some("70"), "keys with waiting tasks stay in the ring");
}

/// PostgreSQL: a ring longer than one fetch reads (100 keys, fetches of 1 read 66) still serves
/// every key once before any key twice, with keys that only wait among them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_long_ring_serves_every_key_in_turn() {
    let Some((_t, app)) = postgres_app().await else { return };
    let q = format!("fair-long-{}", uuid::Uuid::new_v4().simple());
    let later = chrono::Utc::now() + chrono::Duration::days(1);
    for i in 0..100 {
        app.send(task(&q, i).fairness_key(format!("w{i}")).eta(later)).await.unwrap();
        app.send_batch((0..2).map(|j| task(&q, j).fairness_key(format!("k{i}")))).await.unwrap();
    }
    let keys = take_keys(&app, &q, 100, FairnessWeights::default()).await;
    let mut distinct = keys.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), 100, "every key once in the first 100: {keys:?}");
}

/// Runs one fair fetch of up to `n` rows of `q` by hand (`celery_rs_fair_pick`, with `weights`,
/// every other key of weight 1) and acks what it took (deletes the rows): their keys (`""`:
/// unkeyed), in the order taken.
fn pg_fair_take(schema: &celery_tests::PgSchema, q: &str, n: usize, weights: &[(&str, i32)]) -> Vec<String> {
    let keys: Vec<String> = weights.iter().map(|(k, _)| format!("'{k}'")).collect();
    let weights: Vec<String> = weights.iter().map(|(_, w)| w.to_string()).collect();
    let taken = schema.query(
        &format!(
            "WITH p AS MATERIALIZED (SELECT u.id, u.n FROM unnest(celery_rs_fair_pick('{q}', {n}, \
             ARRAY[{}]::text[], ARRAY[{}]::integer[], {visits})) WITH ORDINALITY AS u(id, n)),
             d AS (DELETE FROM celery_rs_tasks t USING p WHERE t.id = p.id RETURNING t.id, coalesce(t.fair_key, '') AS k)
             SELECT string_agg(d.k, ',' ORDER BY p.n) FROM d JOIN p ON p.id = d.id",
            keys.join(","),
            weights.join(","),
            visits = 2 * n + 64
        ),
    );
    let taken = taken.unwrap().first().and_then(|r| r[0].clone());
    taken.map(|s| s.split(',').map(str::to_owned).collect()).unwrap_or_default()
}

/// PostgreSQL: a backlogged key and unkeyed tasks keep their turns while a new key (one task
/// each, as a drained key that comes back) joins before every fetch of `n` (`n` new keys): a
/// key that joins takes its turn behind every key already waiting, so each of the two is served
/// again within as many fetches as keys wait (plus one), and the keys that ran out leave the ring.
async fn keys_joining_at_every_fetch_starve_no_waiting_key(n: usize) {
    let Some((t, app)) = postgres_app().await else { return };
    let Target::Postgres(schema, _) = &t else { unreachable!() };
    let q = format!("fair-join-{n}-{}", uuid::Uuid::new_v4().simple());
    app.send_batch((0..100).map(|i| task(&q, i).fairness_key("A"))).await.unwrap();
    app.send_batch((0..100).map(|i| task(&q, i))).await.unwrap();
    let waiting_keys = || {
        pg_value(
            &t,
            &format!(
                "SELECT count(DISTINCT coalesce(fair_key, '')) FROM celery_rs_tasks \
                 WHERE queue = '{q}' AND leased_until IS NULL AND run_at <= now()"
            ),
        )
        .unwrap()
        .parse::<usize>()
        .unwrap()
    };
    let fetches = 80;
    // Per fetch: the keys waiting before it, and the keys it took.
    let mut seen: Vec<(usize, Vec<String>)> = Vec::new();
    for f in 0..fetches {
        app.send_batch((0..n).map(|j| task(&q, j).fairness_key(format!("new-{f}-{j}")))).await.unwrap();
        let waiting = waiting_keys();
        let keys = pg_fair_take(schema, &q, n, &[]);
        assert_eq!(keys.len(), n, "fetch {f} is full");
        seen.push((waiting, keys));
    }
    for key in ["A", ""] {
        let served: Vec<usize> = (0..fetches).filter(|&f| seen[f].1.iter().any(|k| k == key)).collect();
        let mut from = 0;
        for &until in served.iter().chain([&fetches]) {
            let waiting = seen[from..until.min(fetches - 1) + 1].iter().map(|s| s.0).max().unwrap();
            assert!(
                until - from <= waiting / n + 1,
                "key {key:?} not served from fetch {from} to {until} while at most {waiting} keys waited: {seen:?}"
            );
            from = until;
        }
    }
    let ring = pg_value(&t, &format!("SELECT count(*) FROM celery_rs_fair_ring WHERE queue = '{q}'")).unwrap();
    let waiting = waiting_keys();
    // The keys that ran out in this pass leave when the next one reads them.
    assert!(ring.parse::<usize>().unwrap() <= 2 * (waiting + n), "{ring} keys in the ring while {waiting} wait");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_keys_joining_at_every_fetch_of_one_starve_no_waiting_key() {
    keys_joining_at_every_fetch_starve_no_waiting_key(1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_keys_joining_at_every_fetch_of_two_starve_no_waiting_key() {
    keys_joining_at_every_fetch_starve_no_waiting_key(2).await;
}

/// PostgreSQL: a fetch that ends among keys that joined during the pass gives no key a second
/// turn in a row: A, B and C (300 tasks each, weight 1) while, 100 times, one task is taken, a
/// new key publishes one task and four are taken, share the turns evenly (a front moved past the
/// joiner once restarted every pass at the lowest turn: A 200, B 100, C 100).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_pass_that_ends_among_joiners_favours_no_key() {
    let Some((t, app)) = postgres_app().await else { return };
    let Target::Postgres(schema, _) = &t else { unreachable!() };
    let q = format!("fair-ends-{}", uuid::Uuid::new_v4().simple());
    for key in ["A", "B", "C"] {
        app.send_batch((0..300).map(|i| task(&q, i).fairness_key(key))).await.unwrap();
    }
    let mut served = std::collections::HashMap::<String, usize>::new();
    for c in 0..100 {
        let mut keys = pg_fair_take(schema, &q, 1, &[]);
        app.send(task(&q, c).fairness_key(format!("new-{c}"))).await.unwrap();
        keys.extend(pg_fair_take(schema, &q, 4, &[]));
        assert_eq!(keys.len(), 5, "cycle {c}: {keys:?}");
        for k in keys {
            *served.entry(k).or_default() += 1;
        }
    }
    let abc: Vec<usize> = ["A", "B", "C"].iter().map(|k| served.get(*k).copied().unwrap_or(0)).collect();
    let (lo, hi) = (*abc.iter().min().unwrap(), *abc.iter().max().unwrap());
    assert!(hi - lo <= 10, "A, B, C served {abc:?} times");
}

/// PostgreSQL: the rest of a key's weighted turn (its credit) stays with that key: A (weight 3)
/// is served once, then leaves the ring (a purge takes its other task; B stays, its task leased),
/// and the keys after it take turns of their own weight (1), not A's credit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_credit_is_not_given_to_the_next_key() {
    let Some((t, app)) = postgres_app().await else { return };
    let q = format!("fair-credit-{}", uuid::Uuid::new_v4().simple());
    app.send_batch((0..2).map(|i| task(&q, i).fairness_key("A"))).await.unwrap();
    app.send(task(&q, 0).fairness_key("B")).await.unwrap();
    let Target::Postgres(schema, _) = &t else { unreachable!() };
    // Fetches by hand (a consumer may fetch ahead): exactly one row each.
    assert_eq!(pg_fair_take(schema, &q, 1, &[("A", 3)]), ["A"], "A's turn, 2 of 3 left");
    // B's task is held by someone (B stays in the ring through the purge).
    schema
        .exec(&format!(
            "UPDATE celery_rs_tasks SET leased_until = now() + interval '1 hour' WHERE queue = '{q}' AND fair_key = 'B'"
        ))
        .unwrap();
    assert_eq!(app.broker().purge(&q).await.unwrap(), 1, "A's other task");
    let ring = pg_value(
        &t,
        &format!("SELECT string_agg(key, ',' ORDER BY turn) FROM celery_rs_fair_ring WHERE queue = '{q}'"),
    );
    assert_eq!(ring.as_deref(), Some(",B"), "A left the ring");
    app.send_batch((0..3).map(|i| task(&q, i))).await.unwrap();
    app.send_batch((0..3).map(|i| task(&q, i).fairness_key("B"))).await.unwrap();
    let keys: Vec<String> = (0..6).flat_map(|_| pg_fair_take(schema, &q, 1, &[("A", 3)])).collect();
    assert_eq!(keys, ["", "B", "", "B", "", "B"], "turns of one each");
}

/// A schema as migration `version` left it (the version table as the migrations create it),
/// holding a fair queue (its name returned) of A (6 keyed tasks), 3 unkeyed and B (3 keyed),
/// published by that migration's own function (the tasks encoded by this version in a scratch
/// schema of their own, returned with it: its environment names the results backend).
async fn pg_schema_at(version: i32, name: &str) -> Option<(celery_tests::PgSchema, String, Target)> {
    use broker_backends::postgres::sql::{COMPONENT, MIGRATIONS};
    let old = celery_tests::PgSchema::new(name)?;
    let (scratch_target, scratch) = postgres_app().await?;
    let Target::Postgres(scratch_schema, _) = &scratch_target else { unreachable!() };
    let mut ddl = String::from(
        "CREATE TABLE celery_rs_schema_version (component varchar(64) NOT NULL, version integer NOT NULL, \
         name text NOT NULL, applied_at timestamp with time zone NOT NULL DEFAULT now(), \
         PRIMARY KEY (component, version));",
    );
    for m in MIGRATIONS.iter().filter(|m| m.version <= version) {
        ddl.push_str(m.sql);
        ddl.push_str(&format!(
            ";INSERT INTO celery_rs_schema_version (component, version, name) VALUES ('{COMPONENT}', {}, '{}');",
            m.version,
            m.name.replace('\'', "''")
        ));
    }
    old.exec(&ddl).unwrap();
    let q = format!("fair-upgrade{version}-{}", uuid::Uuid::new_v4().simple());
    scratch.send_batch((0..6).map(|i| task(&q, i).fairness_key("A"))).await.unwrap();
    scratch.send_batch((0..3).map(|i| task(&q, i))).await.unwrap();
    scratch.send_batch((0..3).map(|i| task(&q, i).fairness_key("B"))).await.unwrap();
    old.exec(&format!(
        "SELECT celery_rs_fair_publish(array_agg(queue ORDER BY id),
             array_agg((CASE WHEN fair_key IS NULL THEN priority ELSE priority - 1000 END)::smallint ORDER BY id),
             array_agg(NULL::timestamptz ORDER BY id), array_agg(payload ORDER BY id), array_agg(fair_key ORDER BY id),
             'celery_rs_upgrade_test')
         FROM {}.celery_rs_tasks WHERE queue = '{q}'",
        scratch_schema.0
    ))
    .unwrap();
    Some((old, q, scratch_target))
}

/// PostgreSQL: the broker's migrations from 8 on apply to a schema at migration 7 that holds
/// keyed tasks and a rotation part-way through a turn (left by migration 7's own fetch): the
/// rotation goes on where it was (the front key keeps the rest of its turn), every task comes
/// out once, and the function that fetches compiled before the upgrade still call is kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_migration_8_takes_over_a_rotation_of_migration_7() {
    let Some((old, q, scratch)) = pg_schema_at(7, "fair_queues (upgrade)").await else { return };
    let Target::Postgres(_, env) = &scratch else { unreachable!() };
    // Migration 7's fetch takes one of A (weight 3): A keeps 2 of its turn.
    let first = old
        .query(&format!(
            "WITH p AS MATERIALIZED (SELECT unnest(celery_rs_fair_pick('{q}', 1, ARRAY['A'], ARRAY[3], 66)) AS id)
             DELETE FROM celery_rs_tasks t USING p WHERE t.id = p.id RETURNING t.fair_key"
        ))
        .unwrap();
    assert_eq!(first, [[Some("A".to_owned())]]);
    let credit = old.query(&format!("SELECT credit FROM celery_rs_fair_queues WHERE queue = '{q}'")).unwrap();
    assert_eq!(credit, [[Some("2".to_owned())]]);
    // The upgrade: an app connects.
    let url = old.url("postgres", "visibility_timeout=30");
    let app = celery_worker::connect(&url, &env.backend).await.unwrap();
    let version = old.query("SELECT max(version) FROM celery_rs_schema_version WHERE component = 'broker'").unwrap();
    assert_eq!(version[0][0].as_deref(), Some(&*broker_backends::postgres::sql::MIGRATIONS.len().to_string()));
    // Fetches by hand (exactly one row each), then the last by a consumer of the upgraded app.
    let mut keys: Vec<String> = (0..10).flat_map(|_| pg_fair_take(&old, &q, 1, &[("A", 3)])).collect();
    keys.extend(take_keys(&app, &q, 1, weights(&["A=3"])).await);
    assert_eq!(keys, ["A", "A", "", "B", "A", "A", "A", "", "B", "", "B"], "A's turn goes on, then turns by weight");
    assert_eq!(app.broker().queue_len(&q).await.unwrap(), 0);
    // A fetch that compiled migration 7's body before the upgrade still finds what it calls.
    let kept = old.query(&format!("SELECT cardinality(celery_rs_fair_lock_rows('{q}', '{{}}'::bigint[]))"));
    assert_eq!(kept.unwrap(), [[Some("0".to_owned())]]);
}

/// PostgreSQL: the fair fetch rotates the ring by moving its front (`celery_rs_fair_queues.front`),
/// not by rewriting the ring's rows (a write per key served, which a drain piled up as dead
/// rows): three keys served in turn twice over leave every ring row as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_the_fair_fetch_rewrites_no_ring_row() {
    let Some((t, app)) = postgres_app().await else { return };
    let q = format!("fair-front-{}", uuid::Uuid::new_v4().simple());
    for key in ["A", "B", "C"] {
        app.send_batch((0..3).map(|i| task(&q, i).fairness_key(key))).await.unwrap();
    }
    let ring = || {
        pg_value(
            &t,
            &format!(
                "SELECT string_agg(key || '@' || turn || ':' || xmin, ',' ORDER BY turn) FROM celery_rs_fair_ring \
                 WHERE queue = '{q}' AND key <> ''"
            ),
        )
    };
    let before = ring();
    let keys = take_keys(&app, &q, 6, FairnessWeights::default()).await;
    assert_eq!(keys, ["A", "B", "C", "A", "B", "C"], "the keys in turn");
    assert_eq!(ring(), before, "no ring row rewritten");
}

/// PostgreSQL: a consumer of a plain queue and a fair one, taking one task at a time, keeps
/// taking the plain queue's backlog while the fair queue has a backlog too (they alternate).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_plain_queue_is_served_next_to_a_busy_fair_one() {
    let Some((_t, app)) = postgres_app().await else { return };
    let id = uuid::Uuid::new_v4().simple().to_string();
    let (plain, fair) = (format!("fair-mix-plain-{id}"), format!("fair-mix-fair-{id}"));
    app.send_batch((0..10).map(|i| task(&fair, i).fairness_key("B"))).await.unwrap();
    app.send_batch((0..10).map(|i| task(&plain, i))).await.unwrap();
    let mut c = app.broker().consume(&[plain.clone(), fair.clone()], 1).await.unwrap();
    let mut from_plain = 0;
    for _ in 0..6 {
        let mut d = tokio::time::timeout(T, c.next()).await.expect("a delivery in time").expect("open");
        from_plain += usize::from(d.take_message().unwrap().headers.extra.get("x-fairness-key").is_none());
        d.ack().await.unwrap();
    }
    c.close().await;
    assert!(from_plain >= 2, "the plain queue gave {from_plain} of the first 6 deliveries");
}

/// PostgreSQL: the fair fetch takes a key's rows only while they are ready in its queue: of a
/// key's four rows, one dead-lettered (moved to `q.dead`), one deferred and one leased are left
/// out, and the ready one is the only delivery.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_the_fair_fetch_takes_only_rows_ready_in_its_queue() {
    let Some((t, app)) = postgres_app().await else { return };
    let q = format!("fair-guard-{}", uuid::Uuid::new_v4().simple());
    app.send_batch((0..4).map(|i| task(&q, i).fairness_key("A"))).await.unwrap();
    let ids =
        pg_value(&t, &format!("SELECT string_agg(id::text, ',' ORDER BY id) FROM celery_rs_tasks WHERE queue = '{q}'"))
            .unwrap();
    let ids: Vec<&str> = ids.split(',').collect();
    let Target::Postgres(schema, _) = &t else { unreachable!() };
    schema
        .exec(&format!(
            "UPDATE celery_rs_tasks SET queue = queue || '.dead', fair_key = NULL, priority = 0 WHERE id = {};
             UPDATE celery_rs_tasks SET run_at = now() + interval '1 hour' WHERE id = {};
             UPDATE celery_rs_tasks SET leased_until = now() + interval '1 hour' WHERE id = {}",
            ids[0], ids[1], ids[2]
        ))
        .unwrap();
    let mut c = app.broker().consume(std::slice::from_ref(&q), 4).await.unwrap();
    let mut d = tokio::time::timeout(T, c.next()).await.expect("a delivery in time").expect("open");
    assert_eq!(d.take_message().unwrap().headers.extra.get("x-fairness-key").and_then(|v| v.as_str()), Some("A"));
    d.ack().await.unwrap();
    c.close().await;
    let taken = pg_value(
        &t,
        &format!(
            "SELECT string_agg(id || ':' || deliveries, ',' ORDER BY id) FROM celery_rs_tasks WHERE id IN ({})",
            ids.join(",")
        ),
    );
    assert_eq!(
        taken.as_deref(),
        Some(&*format!("{}:0,{}:0,{}:0", ids[0], ids[1], ids[2])),
        "none of the three was taken"
    );
}

/// PostgreSQL: a keyed task dead-lettered (by its consumer, or by the fetch for its size) loses
/// its key: its dead-letter queue does not serve it as a keyed row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_dead_letters_lose_their_fairness_key() {
    let Some((t, app)) = postgres_app().await else { return };
    let q = format!("fair-dead-letter-{}", uuid::Uuid::new_v4().simple());
    app.send(task(&q, 1).fairness_key("A")).await.unwrap();
    let mut c = app.broker().consume(std::slice::from_ref(&q), 1).await.unwrap();
    let d = tokio::time::timeout(T, c.next()).await.unwrap().unwrap();
    d.dead_letter("test").await.unwrap();
    c.close().await;
    app.send(task(&q, 2).fairness_key("B").args(json!(["x".repeat(4096)]))).await.unwrap();
    let mut capped = app.broker().consume_capped(std::slice::from_ref(&q), 1, 1024).await.unwrap();
    let d = tokio::time::timeout(T, capped.next()).await.unwrap().unwrap();
    drop(d);
    capped.close().await;
    let dead = |what: &str| pg_value(&t, &format!("SELECT {what} FROM celery_rs_tasks WHERE queue = '{q}.dead'"));
    assert_eq!(dead("count(*)").as_deref(), Some("2"), "both dead-lettered");
    assert_eq!(dead("count(fair_key)").as_deref(), Some("0"), "without their key");
}

/// PostgreSQL: a message whose fairness key is invalid (empty, too long, a control character, not
/// a string) is stored unkeyed, without failing the rest of its batch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_an_invalid_fairness_key_does_not_fail_its_batch() {
    let Some((t, app)) = postgres_app().await else { return };
    let q = format!("fair-invalid-{}", uuid::Uuid::new_v4().simple());
    let bad = [json!(""), json!("k".repeat(129)), json!("a\u{0}b"), json!(7)];
    let mut batch = Vec::new();
    for (i, key) in bad.into_iter().chain([json!("good")]).enumerate() {
        let mut m = celery_core::protocol::Message::from_signature(&task(&q, i)).unwrap();
        m.headers.extra.insert("x-fairness-key".to_owned(), key);
        batch.push((celery_core::routing::Route::queue(&q), m));
    }
    app.broker().publish_batch(&batch).await.unwrap();
    assert_eq!(app.broker().queue_len(&q).await.unwrap(), 5);
    let keys = pg_value(
        &t,
        &format!(
            "SELECT string_agg(coalesce(fair_key, '-'), ',' ORDER BY id) FROM celery_rs_tasks WHERE queue = '{q}'"
        ),
    );
    assert_eq!(keys.as_deref(), Some("-,-,-,-,good"));
}

/// PostgreSQL: a small key is not held up by thousands of keys whose only task waits for an eta:
/// A (5,000 tasks), B (10), then 5,000 keys of one task each due in a day, taken by fetches of 4
/// (by hand, each reading 72 keys at a time): all of B's are taken before 10% of A's. A fetch
/// whose keys read had only waiting tasks once took the queue's oldest rows (A's), and B's last
/// came after 22% of A's; now it reads on from the new front (up to 16 × 72 keys) first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_small_key_passes_thousands_of_keys_that_only_wait() {
    let Some((t, app)) = postgres_app().await else { return };
    let Target::Postgres(schema, _) = &t else { unreachable!() };
    let q = format!("fair-etas-{}", uuid::Uuid::new_v4().simple());
    let later = chrono::Utc::now() + chrono::Duration::days(1);
    app.send_batch((0..5000).map(|i| task(&q, i).fairness_key("A"))).await.unwrap();
    app.send_batch((0..10).map(|i| task(&q, i).fairness_key("B"))).await.unwrap();
    app.send_batch((0..5000).map(|i| task(&q, i).fairness_key(format!("w{i}")).eta(later))).await.unwrap();
    // As autovacuum would (the test server may run without it): without statistics the planner
    // may read a key's rows through the queue's ready index (every ready row of the queue per key).
    schema.exec("ANALYZE celery_rs_tasks").unwrap();
    let (mut a, mut b, mut fetches) = (0, 0, 0);
    while b < 10 {
        fetches += 1;
        assert!(fetches <= 1300, "B not done after {fetches} fetches ({a} of A's, {b} of B's)");
        for key in pg_fair_take(schema, &q, 4, &[]) {
            match key.as_str() {
                "A" => a += 1,
                "B" => b += 1,
                other => panic!("a waiting key's task was taken: {other}"),
            }
        }
    }
    assert!(a < 500, "B's 10 tasks took until {a} of A's 5,000 ({fetches} fetches)");
}

/// PostgreSQL: a fetch that reads on past a window of keys with nothing ready, round the ring to
/// a key it took a row from already, takes that row once: the rows a fetch took are locked by
/// its own transaction, which `SKIP LOCKED` does not skip (a row taken twice ran twice).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_fetch_that_reads_round_the_ring_takes_each_row_once() {
    let Some((t, app)) = postgres_app().await else { return };
    let Target::Postgres(schema, _) = &t else { unreachable!() };
    let q = format!("fair-round-{}", uuid::Uuid::new_v4().simple());
    let later = chrono::Utc::now() + chrono::Duration::days(1);
    // One ready task, and 83 keys whose tasks only wait for an eta.
    app.send(task(&q, 0).fairness_key("k0")).await.unwrap();
    app.send_batch((1..84).map(|i| task(&q, i).fairness_key(format!("k{i}")).eta(later))).await.unwrap();
    let ring = pg_value(&t, &format!("SELECT count(*) FROM celery_rs_fair_ring WHERE queue = '{q}'")).unwrap();
    // A window as long as the ring: the fetch reads it whole, short, and reads on from the front.
    let got = schema
        .query(&format!(
            "SELECT count(u.id), count(DISTINCT u.id) FROM unnest(celery_rs_fair_pick('{q}', 10, \
             ARRAY[]::text[], ARRAY[]::integer[], {ring})) AS u(id)"
        ))
        .unwrap();
    let row = &got[0];
    assert_eq!(
        (row[0].as_deref(), row[1].as_deref()),
        (Some("1"), Some("1")),
        "rows picked, distinct rows (the ring holds {ring} keys)"
    );
}

/// PostgreSQL: while a transaction that sent a keyed task to the queue (`send_in`) stays open,
/// the keys that ran out still leave the ring (but those of its key's lock stripe, about 1 in
/// 16), and the keys left take turns: after 600 keys of one task each are taken, A (200 tasks)
/// and the unkeyed tasks (200) share the next 200 deliveries. With the whole queue's lock held by
/// the transaction the empty keys once stayed: each fetch read only them, then took the queue's
/// oldest rows, the unkeyed ones (570 to A's 38 in a 600-key ring).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_drained_keys_leave_the_ring_while_a_keyed_send_in_is_open() {
    use broker_backends::postgres::transactional::SendInTransaction;
    let Some((t, app)) = postgres_app().await else { return };
    let Target::Postgres(schema, _) = &t else { unreachable!() };
    let q = format!("fair-open-{}", uuid::Uuid::new_v4().simple());
    app.send_batch((0..200).map(|i| task(&q, i).fairness_key("A"))).await.unwrap();
    app.send_batch((0..200).map(|i| task(&q, i))).await.unwrap();
    app.send_batch((0..600).map(|i| task(&q, i).fairness_key(format!("k{i}")))).await.unwrap();
    let (mut client, conn) =
        tokio_postgres::connect(&schema.url("postgresql", ""), tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    let tx = client.transaction().await.unwrap();
    app.send_in(&tx, task(&q, 0).fairness_key("held")).await.unwrap();
    // The first pass: every key once (the 600 run out).
    let mut first = Vec::new();
    while first.len() < 602 {
        let got = pg_fair_take(schema, &q, 4, &[]);
        assert!(!got.is_empty(), "short after {}", first.len());
        first.extend(got);
    }
    let mut served = std::collections::HashMap::<String, usize>::new();
    for _ in 0..50 {
        for key in pg_fair_take(schema, &q, 4, &[]) {
            *served.entry(key).or_default() += 1;
        }
    }
    let (a, unkeyed) = (served.get("A").copied().unwrap_or(0), served.get("").copied().unwrap_or(0));
    assert!(a >= 80 && unkeyed >= 80, "A {a}, unkeyed {unkeyed} of the 200 after the first pass: {served:?}");
    let left = pg_value(&t, &format!("SELECT count(*) FROM celery_rs_fair_ring WHERE queue = '{q}' AND key LIKE 'k%'"));
    let left: usize = left.unwrap().parse().unwrap();
    assert!(left <= 100, "{left} of the 600 empty keys still in the ring");
    tx.commit().await.unwrap();
    let taken = first.len() + served.values().sum::<usize>();
    assert_eq!(app.broker().queue_len(&q).await.unwrap() as usize, 1001 - taken, "every task once");
}

/// PostgreSQL: a task committed while a fair fetch waits for its queue's row (locked by another
/// fetch), by a transaction that began before the fetch (so the task is due by the fetch's clock),
/// is leased by that fetch, which picks it: `sql::FAIR_FETCH` leases in its function. The fetch
/// statement's own snapshot (older than the task) once left it picked and locked but not leased,
/// its key's turn counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_task_committed_while_the_fair_fetch_waits_is_leased() {
    let Some((t, app)) = postgres_app().await else { return };
    let Target::Postgres(schema, _) = &t else { unreachable!() };
    let q = format!("fair-wait-lock-{}", uuid::Uuid::new_v4().simple());
    // The rotation, A in its ring: A's first task is held by someone.
    app.send(task(&q, 0).fairness_key("A")).await.unwrap();
    schema
        .exec(&format!("UPDATE celery_rs_tasks SET leased_until = now() + interval '1 hour' WHERE queue = '{q}'"))
        .unwrap();
    let connect = || async {
        let (c, conn) = tokio_postgres::connect(&schema.url("postgresql", ""), tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(conn);
        c
    };
    let mut locker = connect().await;
    let mut publisher = connect().await;
    let fetcher = connect().await;
    let pid: i32 = fetcher.query_one("SELECT pg_backend_pid()", &[]).await.unwrap().get(0);
    let publish = publisher.transaction().await.unwrap();
    publish.execute("SELECT now()", &[]).await.unwrap();
    let lock = locker.transaction().await.unwrap();
    lock.execute("SELECT 1 FROM celery_rs_fair_queues WHERE queue = $1 FOR UPDATE", &[&q]).await.unwrap();
    let fetch = {
        let q = q.clone();
        tokio::spawn(async move {
            let (keys, weights): (Vec<String>, Vec<i32>) = (vec![], vec![]);
            fetcher
                .query(
                    broker_backends::postgres::sql::FAIR_FETCH,
                    &[&q, &1i32, &30f64, &(1i64 << 20), &"fair-test-holder", &keys, &weights, &66i32],
                )
                .await
                .unwrap()
        })
    };
    let waiting = format!("SELECT count(*) FROM pg_stat_activity WHERE pid = {pid} AND wait_event_type = 'Lock'");
    assert!(wait_until(Duration::from_secs(10), || pg_value(&t, &waiting).as_deref() == Some("1")), "the fetch waits");
    // A's second task, as a publish would insert it (the key is in the ring).
    publish
        .execute(
            "INSERT INTO celery_rs_tasks (queue, priority, payload, fair_key) \
             SELECT queue, priority, payload, fair_key FROM celery_rs_tasks WHERE queue = $1",
            &[&q],
        )
        .await
        .unwrap();
    publish.commit().await.unwrap();
    lock.commit().await.unwrap();
    let rows = tokio::time::timeout(T, fetch).await.unwrap().unwrap();
    let ids: Vec<Option<i64>> = rows.iter().map(|r| r.get(1)).collect();
    assert!(ids.len() == 1 && ids[0].is_some(), "the task committed meanwhile is delivered: {ids:?}");
    let leased = pg_value(
        &t,
        &format!(
            "SELECT count(*) FROM celery_rs_tasks WHERE queue = '{q}' AND holder = 'fair-test-holder' \
             AND leased_until > now() AND deliveries = 1"
        ),
    );
    assert_eq!(leased.as_deref(), Some("1"), "and leased");
}

/// PostgreSQL: the broker's migrations from 9 on apply to a schema at migration 8 that holds keyed
/// tasks and a rotation part-way through a turn (left by migration 8's fetch): the rotation goes
/// on where it was, every task comes out once, and the functions that fetches and transactional
/// sends compiled before the upgrade call are kept (migration 8's `celery_rs_fair_pick`, the
/// queue's own fair lock).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_migration_9_takes_over_a_rotation_of_migration_8() {
    let Some((old, q, scratch)) = pg_schema_at(8, "fair_queues (upgrade 9)").await else { return };
    let Target::Postgres(_, env) = &scratch else { unreachable!() };
    // Migration 8's fetch takes one of A (weight 3): A keeps 2 of its turn, the front on A.
    assert_eq!(pg_fair_take(&old, &q, 1, &[("A", 3)]), ["A"]);
    let state = old.query(&format!("SELECT credit FROM celery_rs_fair_queues WHERE queue = '{q}'")).unwrap();
    assert_eq!(state, [[Some("2".to_owned())]]);
    let url = old.url("postgres", "visibility_timeout=30");
    let app = celery_worker::connect(&url, &env.backend).await.unwrap();
    let version = old.query("SELECT max(version) FROM celery_rs_schema_version WHERE component = 'broker'").unwrap();
    assert_eq!(version[0][0].as_deref(), Some(&*broker_backends::postgres::sql::MIGRATIONS.len().to_string()));
    // By hand through migration 8's name (as a fetch compiled before the upgrade calls it), then
    // the last by a consumer of the upgraded app.
    let mut keys: Vec<String> = (0..10).flat_map(|_| pg_fair_take(&old, &q, 1, &[("A", 3)])).collect();
    keys.extend(take_keys(&app, &q, 1, weights(&["A=3"])).await);
    assert_eq!(keys, ["A", "A", "", "B", "A", "A", "A", "", "B", "", "B"], "A's turn goes on, then turns by weight");
    assert_eq!(app.broker().queue_len(&q).await.unwrap(), 0);
    // A transactional send of the earlier version takes the queue's own lock (shared).
    let kept = old.query(&format!("SELECT celery_rs_fair_lock('{q}', true)"));
    assert_eq!(kept.unwrap(), [[Some("t".to_owned())]]);
}

/// The task the contract tests send (never run: they consume with the broker directly).
#[celery_worker::prelude::task]
async fn fair_probe(i: u64) -> u64 {
    i
}

//! Flow control with real worker processes, on the built-in broker (`broker serve`, reached over
//! `log+tcp://`), on Redis and on PostgreSQL: per-key concurrency holds across three workers while
//! other keys run meanwhile, and a worker killed with `kill -9` while holding key slots gives them
//! back within the lease; a cluster-wide rate limit of 20/s over three workers gives 20/s overall. Plus the
//! [`KeySlots`] contract itself on each broker (park, release, bounds).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use celery_core::flow::{Admission, KeySlots, SlotRelease, SlotRequest};
use celery_core::protocol::Message;
use celery_core::{App, Signature, TaskState};
use celery_tests::flow::Setup;
use celery_tests::{poll_until, wait_until, DemoProcess, TempDir};
use serde_json::json;

const T: Duration = Duration::from_secs(60);

fn log_setup() -> Setup {
    Setup::log("flow", "lease_timeout=2&fsync=os")
}

fn redis_setup() -> Option<Setup> {
    Setup::redis("flow_control", 2.0)
}

fn postgres_setup() -> Option<Setup> {
    Setup::postgres("flow_control (postgres)", "visibility_timeout=30")
}

/// `(token, start ms, end ms)` of each finished span in the file.
fn intervals(path: &std::path::Path) -> Vec<(String, i64, i64)> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut starts = HashMap::new();
    let mut out = Vec::new();
    for line in text.lines() {
        let parts: Vec<&str> = line.split(' ').collect();
        let [token, what, ms] = parts[..] else { panic!("bad line {line:?}") };
        let ms: i64 = ms.parse().expect("ms");
        match what {
            "start" => {
                starts.insert(token.to_owned(), ms);
            }
            "end" => out.push((token.to_owned(), starts[token], ms)),
            _ => panic!("bad line {line:?}"),
        }
    }
    out
}

/// The most intervals open at once (an end at the same millisecond as a start counts first: the
/// slot is released after the end is written).
fn max_overlap(spans: &[(String, i64, i64)]) -> usize {
    let mut events: Vec<(i64, i32)> = spans.iter().flat_map(|(_, s, e)| [(*s, 1), (*e, -1)]).collect();
    events.sort();
    let (mut open, mut most) = (0i32, 0i32);
    for (_, d) in events {
        open += d;
        most = most.max(open);
    }
    most as usize
}

async fn all_succeeded(app: &App, ids: &[String]) -> usize {
    let mut n = 0;
    for id in ids {
        n += (app.result(id).state().await.unwrap() == TaskState::Success) as usize;
    }
    n
}

fn span(path: &std::path::Path, token: &str, ms: u64) -> Signature {
    Signature::by_name("span").args(json!([path.display().to_string(), token, ms]))
}

/// 60 spans of one key (limit 2) over three workers never overlap more than 2, and use both
/// slots; spans of other keys run meanwhile, many at once, and finish long before the key's.
async fn key_limit_holds_across_workers(setup: Setup) {
    let app = setup.app().await;
    let dir = TempDir::new("flow-spans");
    let (keyed, others) = (dir.0.join("keyed"), dir.0.join("others"));
    let _workers: Vec<DemoProcess> = (0..3).map(|_| setup.worker(&["-c", "8", "--key-lease", "5"])).collect();
    let mut ids = Vec::new();
    for i in 0..60 {
        let r = app.send(span(&keyed, &format!("k{i}"), 100).concurrency_key("tenant-a")).await.unwrap();
        ids.push(r.id().to_owned());
    }
    for i in 0..20 {
        let r = app.send(span(&others, &format!("o{i}"), 300).concurrency_key(format!("solo-{i}"))).await.unwrap();
        ids.push(r.id().to_owned());
    }
    let done = poll_until(T, || all_succeeded(&app, &ids), |n| *n == ids.len()).await;
    assert_eq!(done, ids.len(), "every task succeeded");
    let (k, o) = (intervals(&keyed), intervals(&others));
    assert_eq!((k.len(), o.len()), (60, 20));
    assert_eq!(max_overlap(&k), 2, "at most 2 of the key at once, and both slots used: {k:?}");
    assert!(max_overlap(&o) > 2, "other keys run many at once: {o:?}");
    let keyed_end = k.iter().map(|s| s.2).max().unwrap();
    let others_end = o.iter().map(|s| s.2).max().unwrap();
    assert!(
        others_end + 1000 < keyed_end,
        "other keys did not wait behind the limited key ({others_end} vs {keyed_end})"
    );
}

/// A worker killed while holding both slots of a key: a new holder gets a slot within the lease
/// (3 s), not before the slots' last renewal ran out; messages parked meanwhile move back to their
/// queue once the dead slots are swept.
async fn killed_worker_frees_its_slots(setup: Setup) {
    let app = setup.app().await;
    let dir = TempDir::new("flow-kill");
    let path = dir.0.join("spans");
    let mut first = setup.worker(&["-c", "4", "--key-lease", "3"]);
    for i in 0..2 {
        app.send(span(&path, &format!("long{i}"), 60_000).concurrency_key("tenant-k")).await.unwrap();
    }
    let started = || std::fs::read_to_string(&path).unwrap_or_default().matches(" start ").count();
    assert!(wait_until(T, || started() == 2), "{}", first.log());
    first.signal("KILL");
    first.wait_exit(Duration::from_secs(5)).expect("killed");
    let killed = Instant::now();
    // A worker on another queue: it runs none of the killed tasks, but sweeps (Redis needs one).
    let _sweeper = setup.worker(&["-Q", "elsewhere", "--key-lease", "3"]);
    let broker = app.broker().clone();
    let slots = broker.key_slots().expect("key slots");
    let probe = Message::from_signature(&Signature::by_name("flow_probe")).unwrap();
    let req = SlotRequest { key: "tenant-k", limit: 2, holder: "probe", ttl: Duration::from_secs(30) };
    let first_try = slots.acquire_or_park(&req, "probe-q", &probe).await.unwrap();
    assert_eq!(first_try, Admission::Parked, "the dead worker's slots are still leased right after the kill");
    let got = poll_until(
        Duration::from_secs(10),
        || async { slots.acquire_or_park(&req, "probe-q", &probe).await.unwrap() },
        |a| *a == Admission::Acquired,
    )
    .await;
    let freed_after = killed.elapsed();
    assert_eq!(got, Admission::Acquired);
    assert!(freed_after <= Duration::from_millis(4500), "slots came back within the lease: {freed_after:?}");
    // The probes parked meanwhile go back to their queue as the dead slots are swept.
    let back =
        poll_until(Duration::from_secs(10), || async { broker.queue_len("probe-q").await.unwrap() }, |n| *n >= 1).await;
    assert!(back >= 1, "parked messages moved back after the slots expired");
}

/// `control rate_limit span 20/s --cluster` over three workers: 100 spans start at 20/s ± 10%
/// overall (each worker alone would allow 20/s, 60/s in all).
async fn cluster_rate_limit_holds_over_workers(setup: Setup) {
    let app = setup.app().await;
    let dir = TempDir::new("flow-rate");
    let path = dir.0.join("spans");
    let _workers: Vec<DemoProcess> = (0..3).map(|_| setup.worker(&["-c", "8"])).collect();
    let args = json!({"task_name": "span", "rate_limit": "20/s", "cluster": true});
    let replies =
        celery_worker::control::request(&app, "rate_limit", args, None, Duration::from_secs(3)).await.unwrap();
    assert_eq!(replies.len(), 3, "every worker took the limit: {replies:?}");
    // One batch: the backlog is there at once, so the measure is the bucket's, not how fast one
    // send after another commits (on PostgreSQL at load 10, slower than one per 50 ms at times).
    let sent = app.send_batch((0..100).map(|i| span(&path, &format!("r{i}"), 0))).await.unwrap();
    let ids: Vec<String> = sent.iter().map(|r| r.id().to_owned()).collect();
    let done = poll_until(T, || all_succeeded(&app, &ids), |n| *n == ids.len()).await;
    assert_eq!(done, ids.len(), "every task succeeded");
    let mut starts: Vec<i64> = intervals(&path).iter().map(|s| s.1).collect();
    starts.sort();
    let secs = (starts[99] - starts[0]) as f64 / 1000.0;
    let rate = 99.0 / secs;
    let widest = starts.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0);
    let kind = app.broker().kind();
    eprintln!("{kind}: cluster-wide 20/s over 3 workers: {rate:.2}/s over {secs:.2} s (widest gap {widest} ms)");
    assert!((18.0..=22.0).contains(&rate), "{rate:.2}/s overall over {secs:.2} s, expected 20/s ± 10%");
}

/// The contract: over the limit parks (nothing on the queue), a release moves the oldest parked
/// message back, the same holder keeps its slot, other keys are independent, bad keys refused.
async fn key_slots_contract(broker: &dyn celery_core::Broker, queue: &str) {
    let slots: &dyn KeySlots = broker.key_slots().expect("key slots");
    let ttl = Duration::from_secs(30);
    let req = |holder: &'static str| SlotRequest { key: "contract", limit: 2, holder, ttl };
    let msgs: Vec<Message> =
        (0..11).map(|n| Message::from_signature(&Signature::by_name("add").args(json!([n, 0]))).unwrap()).collect();
    let msg = |n: usize| &msgs[n];
    assert_eq!(slots.acquire_or_park(&req("a"), queue, msg(1)).await.unwrap(), Admission::Acquired);
    assert_eq!(slots.acquire_or_park(&req("b"), queue, msg(2)).await.unwrap(), Admission::Acquired);
    assert_eq!(slots.acquire_or_park(&req("a"), queue, msg(1)).await.unwrap(), Admission::Acquired);
    assert_eq!(slots.acquire_or_park(&req("c"), queue, msg(3)).await.unwrap(), Admission::Parked);
    assert_eq!(slots.acquire_or_park(&req("d"), queue, msg(4)).await.unwrap(), Admission::Parked);
    let other = SlotRequest { key: "contract-other", ..req("e") };
    assert_eq!(slots.acquire_or_park(&other, queue, msg(5)).await.unwrap(), Admission::Acquired);
    assert_eq!(broker.queue_len(queue).await.unwrap(), 0);
    assert!(slots.renew("contract", "a", ttl).await.unwrap());
    slots.release("contract", "a", queue).await.unwrap();
    assert_eq!(broker.queue_len(queue).await.unwrap(), 1, "one parked message moved back");
    let mut consumer = broker.consume(&[queue.to_owned()], 1).await.unwrap();
    let mut d = tokio::time::timeout(T, consumer.next()).await.unwrap().unwrap();
    assert_eq!(d.message().as_ref().unwrap().headers.id, msg(3).headers.id, "the oldest parked moved first");
    d.ack().await.unwrap();
    consumer.close().await;
    let bad = SlotRequest { key: "", ..req("x") };
    assert!(slots.acquire_or_park(&bad, queue, msg(6)).await.is_err());
    let zero = SlotRequest { limit: 0, ..req("x") };
    assert!(slots.acquire_or_park(&zero, queue, msg(6)).await.is_err());

    // Batches (on a queue of their own): a full key's request is not taken (and nothing parked)
    // until asked one by one.
    let bq = format!("{queue}-batch");
    let one = |key: &'static str, holder: &'static str| SlotRequest { key, limit: 1, holder, ttl };
    // Keys interleaved, and a holder asking twice (it holds its slot, it takes no second one).
    let reqs = [
        one("contract-batch", "f"),
        one("contract-batch-2", "h"),
        one("contract-batch", "g"),
        one("contract-batch", "f"),
    ];
    let taken = slots.acquire_many(&reqs).await.unwrap();
    if slots.batches() {
        assert_eq!(taken, [true, true, false, true]);
    } else {
        assert_eq!(taken, [false; 4], "a broker that does not batch takes none here");
    }
    assert_eq!(broker.queue_len(&bq).await.unwrap(), 0);
    let mut admitted = Vec::new();
    for (i, r) in reqs.iter().enumerate() {
        if !taken[i] {
            admitted.push(slots.acquire_or_park(r, &bq, msg(7 + i)).await.unwrap());
        }
    }
    let expected: Vec<Admission> = if slots.batches() {
        vec![Admission::Parked]
    } else {
        vec![Admission::Acquired, Admission::Acquired, Admission::Parked, Admission::Acquired]
    };
    assert_eq!(admitted, expected);
    assert!(slots.acquire_many(&[]).await.unwrap().is_empty());
    let rel = |key, holder| SlotRelease { key, holder, queue: &bq };
    slots.release_many(&[rel("contract-batch", "f"), rel("contract-batch-2", "h")]).await.unwrap();
    assert_eq!(broker.queue_len(&bq).await.unwrap(), 1, "the parked message moved back on {}", broker.kind());
    let mut consumer = broker.consume(std::slice::from_ref(&bq), 1).await.unwrap();
    let mut d = tokio::time::timeout(T, consumer.next()).await.unwrap().unwrap();
    assert_eq!(d.message().as_ref().unwrap().headers.id, msg(9).headers.id);
    d.ack().await.unwrap();
    consumer.close().await;
    slots.release_many(&[rel("contract-batch", "g")]).await.unwrap();
    assert_eq!(broker.queue_len(&bq).await.unwrap(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_key_limit_holds_across_workers() {
    key_limit_holds_across_workers(log_setup()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_key_limit_holds_across_workers() {
    if let Some(s) = redis_setup() {
        key_limit_holds_across_workers(s).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_key_limit_holds_across_workers() {
    if let Some(s) = postgres_setup() {
        key_limit_holds_across_workers(s).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_killed_worker_frees_its_slots() {
    killed_worker_frees_its_slots(log_setup()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_worker_frees_its_slots() {
    if let Some(s) = redis_setup() {
        killed_worker_frees_its_slots(s).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_killed_worker_frees_its_slots() {
    if let Some(s) = postgres_setup() {
        killed_worker_frees_its_slots(s).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_slots_contract_on_each_broker() {
    let dir = TempDir::new("flow-contract");
    let local = broker_backends::log::LogBroker::connect(&dir.url("fsync=os")).await.unwrap();
    key_slots_contract(&local, "contract-q").await;
    let tcp = log_setup();
    let (url, _) = tcp.urls();
    let remote = broker_backends::log::LogBroker::connect(&url).await.unwrap();
    key_slots_contract(&remote, "contract-q").await;
    if let Some(Setup::Redis(env)) = redis_setup() {
        let redis = broker_backends::redis::RedisBroker::connect(&env.broker).await.unwrap();
        key_slots_contract(&redis, "contract-q").await;
    }
    if let Some(pg) = postgres_setup() {
        let (url, _) = pg.urls();
        let postgres = broker_backends::postgres::PostgresBroker::connect(&url).await.unwrap();
        key_slots_contract(&postgres, "contract-q").await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_cluster_rate_limit_holds_over_workers() {
    cluster_rate_limit_holds_over_workers(log_setup()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cluster_rate_limit_holds_over_workers() {
    if let Some(s) = redis_setup() {
        cluster_rate_limit_holds_over_workers(s).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_cluster_rate_limit_holds_over_workers() {
    if let Some(s) = postgres_setup() {
        cluster_rate_limit_holds_over_workers(s).await;
    }
}

/// `worker --key-limit 'pat-*=1'` wins over `span`'s own limit of 2 for matching keys only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_key_pattern_limit_wins_over_the_task() {
    let setup = log_setup();
    let app = setup.app().await;
    let dir = TempDir::new("flow-pattern");
    let (one, two) = (dir.0.join("one"), dir.0.join("two"));
    let _workers: Vec<DemoProcess> =
        (0..2).map(|_| setup.worker(&["-c", "8", "--key-lease", "5", "--key-limit", "pat-*=1"])).collect();
    let mut ids = Vec::new();
    for i in 0..8 {
        ids.push(app.send(span(&one, &format!("p{i}"), 150).concurrency_key("pat-x")).await.unwrap().id().to_owned());
        ids.push(app.send(span(&two, &format!("q{i}"), 150).concurrency_key("other-x")).await.unwrap().id().to_owned());
    }
    let done = poll_until(T, || all_succeeded(&app, &ids), |n| *n == ids.len()).await;
    assert_eq!(done, ids.len(), "every task succeeded");
    assert_eq!(max_overlap(&intervals(&one)), 1, "the pattern's limit");
    assert_eq!(max_overlap(&intervals(&two)), 2, "the task's own limit");
}

/// A task that declares `key_concurrency` (in this test binary).
#[celery_worker::prelude::task(key_concurrency = 1)]
async fn flow_keyed() -> u32 {
    1
}

/// On a broker without key slots (memory), a keyed task is rejected with a clear error instead of
/// running unlimited; the same task sent without a key runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_without_key_slots_rejects_keyed_tasks() {
    let app = celery_worker::connect("memory://", "memory://").await.unwrap();
    let cfg = celery_worker::WorkerConfig { queues: vec!["flow-mem".into()], concurrency: 2, ..Default::default() };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let worker = tokio::spawn(celery_worker::Worker::new(app.clone(), cfg).run_until(async {
        let _ = stopped.await;
    }));
    let keyed = app.send(flow_keyed::new().queue("flow-mem").concurrency_key("k")).await.unwrap();
    let free = app.send(flow_keyed::new().queue("flow-mem")).await.unwrap();
    assert_eq!(free.get::<u32>(T).await.unwrap(), 1);
    let err = keyed.get::<u32>(T).await.unwrap_err().to_string();
    assert!(err.contains("KeyConcurrencyUnsupported") && err.contains("per-key concurrency"), "{err}");
    let _ = stop.send(());
    worker.await.unwrap().unwrap();
}

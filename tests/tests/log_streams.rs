//! Stream consumers on the built-in broker: committed offsets per group, at-least-once versus
//! at-most-once across a crash, partitions divided among members with rebalancing, earliest/latest,
//! and keyed publishing that keeps per-key order within a partition. Each scenario runs in the
//! process that owns the directory and, over `log+tcp://`, as a client of `broker serve`.

use std::collections::HashMap;
use std::time::Duration;

use broker_backends::log::{parse_url, serve_tcp, LogStore};
use broker_backends::log::{Commit, LogBroker, StartFrom};
use celery_core::{protocol::Message, routing::Route, Broker, Signature};
use celery_tests::TempDir;
use serde_json::json;

const W: Duration = Duration::from_millis(300);

async fn publish(b: &LogBroker, queue: &str, n: i64) {
    for i in 0..n {
        let m = Message::from_signature(&Signature::by_name("evt").args(json!([i]))).unwrap();
        b.publish(&Route::queue(queue), &m).await.unwrap();
    }
}

/// Where the scenario runs.
#[derive(Clone, Copy)]
enum Mode {
    Embedded,
    Tcp,
}

/// The broker on `dir` with `opts`: the directory itself, or a server on it reached over TCP.
async fn open(mode: Mode, dir: &TempDir, opts: &str) -> (LogBroker, Option<tokio::task::JoinHandle<()>>) {
    match mode {
        Mode::Embedded => (LogBroker::connect(&dir.url(opts)).await.unwrap(), None),
        Mode::Tcp => {
            let (d, cfg) = parse_url(&dir.url(opts)).unwrap();
            let store = LogStore::open(&d, cfg).unwrap();
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let url = format!("log+tcp://{}", listener.local_addr().unwrap());
            let server = tokio::spawn(serve_tcp(store, listener, None, None));
            (LogBroker::connect(&url).await.unwrap(), Some(server))
        }
    }
}

/// Runs a scenario in both modes.
macro_rules! both_modes {
    ($scenario:ident, $embedded:ident, $tcp:ident) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $embedded() {
            $scenario(Mode::Embedded).await
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $tcp() {
            $scenario(Mode::Tcp).await
        }
    };
}

both_modes!(crash, at_least_once_rereads_after_a_crash_at_most_once_does_not, over_tcp_too);

async fn crash(mode: Mode) {
    let dir = TempDir::new("streams-crash");
    let (b, _server) = open(mode, &dir, "").await;
    publish(&b, "events", 10).await;

    let mut a = b.stream("alo", "events", StartFrom::Earliest, Commit::AfterProcessing).await.unwrap();
    assert_eq!(a.poll(100, W).await.unwrap().len(), 10);
    drop(a); // crashed while processing: nothing committed
    let mut again = b.stream("alo", "events", StartFrom::Earliest, Commit::AfterProcessing).await.unwrap();
    assert_eq!(again.poll(100, W).await.unwrap().len(), 10, "at-least-once: read again");
    again.commit().await.unwrap();
    drop(again);
    let mut after = b.stream("alo", "events", StartFrom::Earliest, Commit::AfterProcessing).await.unwrap();
    assert!(after.poll(100, W).await.unwrap().is_empty(), "committed: not read again");

    let mut c = b.stream("amo", "events", StartFrom::Earliest, Commit::BeforeProcessing).await.unwrap();
    assert_eq!(c.poll(100, W).await.unwrap().len(), 10);
    drop(c); // crashed while processing: already committed
    let mut d = b.stream("amo", "events", StartFrom::Earliest, Commit::BeforeProcessing).await.unwrap();
    assert!(d.poll(100, W).await.unwrap().is_empty(), "at-most-once: skipped");

    let mut late = b.stream("late", "events", StartFrom::Latest, Commit::AfterProcessing).await.unwrap();
    assert!(late.poll(100, W).await.unwrap().is_empty());
    publish(&b, "events", 2).await;
    assert_eq!(late.poll(100, W).await.unwrap().len(), 2, "latest: only new records");
}

both_modes!(rebalance, members_divide_partitions_and_rebalance, members_over_tcp_rebalance_too);

async fn rebalance(mode: Mode) {
    let dir = TempDir::new("streams-rebalance");
    let (b, _server) = open(mode, &dir, "partitions=4").await;
    publish(&b, "clicks", 40).await;
    let mut m1 = b.stream("g", "clicks", StartFrom::Earliest, Commit::AfterProcessing).await.unwrap();
    let mut m2 = b.stream("g", "clicks", StartFrom::Earliest, Commit::AfterProcessing).await.unwrap();
    let (a1, a2) = (m1.assignment().await.unwrap(), m2.assignment().await.unwrap());
    assert_eq!(a1.len() + a2.len(), 4);
    assert!(a1.iter().all(|p| !a2.contains(p)), "disjoint: {a1:?} {a2:?}");
    let (r1, r2) = (m1.poll(100, W).await.unwrap(), m2.poll(100, W).await.unwrap());
    assert_eq!(r1.len() + r2.len(), 40, "together they read everything once");
    m1.commit().await.unwrap();
    drop(m2); // leaves without committing: its partitions move to m1, from the committed offsets
    assert_eq!(m1.assignment().await.unwrap(), vec![0, 1, 2, 3]);
    assert_eq!(m1.poll(100, W).await.unwrap().len(), r2.len(), "m2's uncommitted records are read by m1");
}

both_modes!(keyed, keyed_publishing_keeps_per_key_order, keyed_over_tcp_too);

async fn keyed(mode: Mode) {
    let dir = TempDir::new("streams-keys");
    let (b, _server) = open(mode, &dir, "partitions=4").await;
    let batch: Vec<_> = (0..200)
        .map(|i| {
            let sig = Signature::by_name("evt").args(json!([i])).partition_key(format!("user-{}", i % 7));
            (Route::queue("orders"), Message::from_signature(&sig).unwrap())
        })
        .collect();
    b.publish_batch(&batch).await.unwrap();
    let mut c = b.stream("audit", "orders", StartFrom::Earliest, Commit::AfterProcessing).await.unwrap();
    let recs = c.poll(1000, W).await.unwrap();
    assert_eq!(recs.len(), 200);
    let mut partition_of: HashMap<String, usize> = HashMap::new();
    let mut last: HashMap<String, i64> = HashMap::new();
    let mut used = std::collections::HashSet::new();
    for r in recs {
        let m = broker_backends::log::decode_payload(&r.record.payload).unwrap();
        let key = String::from_utf8(r.record.key.clone()).unwrap();
        let seq = m.body().unwrap().args[0].as_i64().unwrap();
        assert_eq!(*partition_of.entry(key.clone()).or_insert(r.partition), r.partition, "one partition per key");
        used.insert(r.partition);
        if let Some(prev) = last.insert(key.clone(), seq) {
            if partition_of[&key] == r.partition {
                assert!(seq > prev, "order within {key}: {prev} then {seq}");
            }
        }
    }
    assert!(used.len() > 1, "keys spread over partitions");
}

/// A TCP relay to `target`; aborting the returned task cuts every connection through it, as a
/// client's crash does.
async fn relay(target: String) -> (String, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let task = tokio::spawn(async move {
        let mut links = tokio::task::JoinSet::new();
        while let Ok((mut inbound, _)) = listener.accept().await {
            let target = target.clone();
            links.spawn(async move {
                let mut outbound = tokio::net::TcpStream::connect(target).await.unwrap();
                let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
            });
        }
    });
    (addr, task)
}

/// A client whose connection dies (its process crashed) leaves the group: its partitions move to
/// the other member, which reads again what the dead one read without committing (at-least-once),
/// and not what it committed before processing (at-most-once). Its own late commit fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_whose_connection_dies_leaves_its_group() {
    let dir = TempDir::new("streams-conn-crash");
    let (d, cfg) = parse_url(&dir.url("partitions=2")).unwrap();
    let store = LogStore::open(&d, cfg).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server_addr = listener.local_addr().unwrap().to_string();
    let _server = tokio::spawn(serve_tcp(store, listener, None, None));
    let direct = LogBroker::connect(&format!("log+tcp://{server_addr}")).await.unwrap();
    publish(&direct, "feed", 40).await;

    for (commit, group, reread) in [(Commit::AfterProcessing, "alo", true), (Commit::BeforeProcessing, "amo", false)] {
        let (relay_addr, cut) = relay(server_addr.clone()).await;
        let doomed_client = LogBroker::connect(&format!("log+tcp://{relay_addr}")).await.unwrap();
        let mut survivor = direct.stream(group, "feed", StartFrom::Earliest, commit).await.unwrap();
        let mut doomed = doomed_client.stream(group, "feed", StartFrom::Earliest, commit).await.unwrap();
        assert_eq!(survivor.assignment().await.unwrap().len(), 1);
        let mine = survivor.poll(100, W).await.unwrap();
        let theirs = doomed.poll(100, W).await.unwrap();
        assert_eq!(mine.len() + theirs.len(), 40);
        survivor.commit().await.unwrap();
        cut.abort();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while survivor.assignment().await.unwrap().len() != 2 {
            assert!(tokio::time::Instant::now() < deadline, "the dead member never left");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let again = survivor.poll(100, W).await.unwrap();
        if reread {
            assert_eq!(again.len(), theirs.len(), "at-least-once: the dead member's uncommitted records come back");
        } else {
            assert!(again.is_empty(), "at-most-once: committed before processing, never read again");
        }
        let late = doomed.commit().await.unwrap_err().to_string();
        assert!(late.contains("connection"), "{late}");
    }
}

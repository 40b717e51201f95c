//! Stream consumers on the built-in broker: committed offsets per group, at-least-once versus
//! at-most-once across a crash, partitions divided among members with rebalancing, earliest/latest,
//! and keyed publishing that keeps per-key order within a partition.

use std::collections::HashMap;
use std::time::Duration;

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_least_once_rereads_after_a_crash_at_most_once_does_not() {
    let dir = TempDir::new("streams-crash");
    let b = LogBroker::connect(&dir.url("")).await.unwrap();
    publish(&b, "events", 10).await;

    let mut a = b.stream("alo", "events", StartFrom::Earliest, Commit::AfterProcessing).unwrap();
    assert_eq!(a.poll(100, W).await.unwrap().len(), 10);
    drop(a); // crashed while processing: nothing committed
    let mut again = b.stream("alo", "events", StartFrom::Earliest, Commit::AfterProcessing).unwrap();
    assert_eq!(again.poll(100, W).await.unwrap().len(), 10, "at-least-once: read again");
    again.commit().unwrap();
    drop(again);
    let mut after = b.stream("alo", "events", StartFrom::Earliest, Commit::AfterProcessing).unwrap();
    assert!(after.poll(100, W).await.unwrap().is_empty(), "committed: not read again");

    let mut c = b.stream("amo", "events", StartFrom::Earliest, Commit::BeforeProcessing).unwrap();
    assert_eq!(c.poll(100, W).await.unwrap().len(), 10);
    drop(c); // crashed while processing: already committed
    let mut d = b.stream("amo", "events", StartFrom::Earliest, Commit::BeforeProcessing).unwrap();
    assert!(d.poll(100, W).await.unwrap().is_empty(), "at-most-once: skipped");

    let mut late = b.stream("late", "events", StartFrom::Latest, Commit::AfterProcessing).unwrap();
    assert!(late.poll(100, W).await.unwrap().is_empty());
    publish(&b, "events", 2).await;
    assert_eq!(late.poll(100, W).await.unwrap().len(), 2, "latest: only new records");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_divide_partitions_and_rebalance() {
    let dir = TempDir::new("streams-rebalance");
    let b = LogBroker::connect(&dir.url("partitions=4")).await.unwrap();
    publish(&b, "clicks", 40).await;
    let mut m1 = b.stream("g", "clicks", StartFrom::Earliest, Commit::AfterProcessing).unwrap();
    let mut m2 = b.stream("g", "clicks", StartFrom::Earliest, Commit::AfterProcessing).unwrap();
    let (a1, a2) = (m1.assignment(), m2.assignment());
    assert_eq!(a1.len() + a2.len(), 4);
    assert!(a1.iter().all(|p| !a2.contains(p)), "disjoint: {a1:?} {a2:?}");
    let (r1, r2) = (m1.poll(100, W).await.unwrap(), m2.poll(100, W).await.unwrap());
    assert_eq!(r1.len() + r2.len(), 40, "together they read everything once");
    m1.commit().unwrap();
    drop(m2); // leaves without committing: its partitions move to m1, from the committed offsets
    assert_eq!(m1.assignment(), vec![0, 1, 2, 3]);
    assert_eq!(m1.poll(100, W).await.unwrap().len(), r2.len(), "m2's uncommitted records are read by m1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyed_publishing_keeps_per_key_order() {
    let dir = TempDir::new("streams-keys");
    let b = LogBroker::connect(&dir.url("partitions=4")).await.unwrap();
    let batch: Vec<_> = (0..200)
        .map(|i| {
            let sig = Signature::by_name("evt").args(json!([i])).partition_key(format!("user-{}", i % 7));
            (Route::queue("orders"), Message::from_signature(&sig).unwrap())
        })
        .collect();
    b.publish_batch(&batch).await.unwrap();
    let mut c = b.stream("audit", "orders", StartFrom::Earliest, Commit::AfterProcessing).unwrap();
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

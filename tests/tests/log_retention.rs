//! Retention on the built-in broker deletes whole closed segments by size or age, never a record
//! that a task consumer has not finished or a stream group has not committed, unless forced (then
//! the loss is counted and logged).

use std::time::Duration;

use broker_backends::log::{Commit, LogBroker, StartFrom};
use celery_core::{protocol::Message, routing::Route, Broker, Signature};
use celery_tests::TempDir;
use serde_json::json;

fn segments(dir: &TempDir, queue: &str) -> usize {
    std::fs::read_dir(dir.0.join("topics").join(queue).join("0"))
        .unwrap()
        .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().starts_with("000"))
        .count()
}

async fn fill(b: &LogBroker, queue: &str, n: i64) {
    let batch: Vec<_> = (0..n)
        .map(|i| (Route::queue(queue), Message::from_signature(&Signature::by_name("evt").args(json!([i]))).unwrap()))
        .collect();
    for chunk in batch.chunks(10) {
        b.publish_batch(chunk).await.unwrap();
    }
}

async fn consume_all(b: &LogBroker, queue: &str, n: usize) -> usize {
    let mut c = b.consume(&[queue.to_string()], 64).await.unwrap();
    let mut got = 0;
    while got < n {
        match tokio::time::timeout(Duration::from_millis(500), c.next()).await {
            Ok(Some(d)) => {
                d.ack().await.unwrap();
                got += 1;
            }
            _ => break,
        }
    }
    got
}

const OPTS: &str = "segment_bytes=4096&retention_bytes=8192&fsync=os";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finished_segments_are_deleted_unfinished_ones_kept() {
    let dir = TempDir::new("retention");
    let b = LogBroker::connect(&dir.url(OPTS)).await.unwrap();
    fill(&b, "q", 300).await;
    let before = segments(&dir, "q");
    assert!(before > 4, "{before} segments");
    b.store().unwrap().enforce_retention();
    assert_eq!(segments(&dir, "q"), before, "nothing is finished: nothing deleted");
    assert_eq!(consume_all(&b, "q", 300).await, 300);
    b.store().unwrap().sync().await.unwrap();
    b.store().unwrap().enforce_retention();
    let after = segments(&dir, "q");
    assert!(after < before && after <= 4, "{before} -> {after} segments");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_group_holds_what_it_has_not_committed() {
    let dir = TempDir::new("retention-group");
    let b = LogBroker::connect(&dir.url(OPTS)).await.unwrap();
    fill(&b, "s", 300).await;
    let mut g = b.stream("slow-reader", "s", StartFrom::Earliest, Commit::AfterProcessing).await.unwrap();
    assert_eq!(g.poll(10, Duration::from_secs(1)).await.unwrap().len(), 10);
    g.commit().await.unwrap();
    assert_eq!(consume_all(&b, "s", 300).await, 300, "task consumers finished everything");
    b.store().unwrap().enforce_retention();
    let rest = g.poll(1000, Duration::from_secs(1)).await.unwrap();
    assert_eq!(rest.len(), 290, "the group still reads everything after its committed offset");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forced_retention_deletes_and_counts() {
    let dir = TempDir::new("retention-force");
    let b = LogBroker::connect(&dir.url(&format!("{OPTS}&retention_force=true"))).await.unwrap();
    fill(&b, "f", 300).await;
    let before = segments(&dir, "f");
    b.store().unwrap().enforce_retention();
    let after = segments(&dir, "f");
    assert!(after < before, "{before} -> {after}");
    let left = consume_all(&b, "f", 300).await;
    assert!(left < 300 && left > 0, "unfinished records were dropped by force: {left} left");
}

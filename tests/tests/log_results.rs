//! The built-in result backend's log: compaction keeps exactly what is live (the latest document
//! of each id, unexpired, not forgotten), loses no write made while it runs, and what it wrote is
//! what a reopened store reads.

use std::sync::Arc;
use std::time::Duration;

use broker_backends::log::{parse_url, LogStore};
use celery_tests::TempDir;

const DAY: Duration = Duration::from_secs(86_400);

fn open(dir: &TempDir) -> Arc<LogStore> {
    let (d, cfg) = parse_url(&dir.url("fsync=os")).unwrap();
    LogStore::open(&d, cfg).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_keeps_what_is_live_and_loses_no_concurrent_write() {
    let dir = TempDir::new("results-compact");
    let store = open(&dir);
    let never = |_: &[u8]| false;
    for round in 0..5 {
        for i in 0..2000 {
            let doc = format!("{{\"id\": {i}, \"round\": {round}, \"pad\": \"{}\"}}", "x".repeat(200));
            store.results().put(&format!("r{i}"), doc.into_bytes(), DAY, never).await.unwrap();
        }
    }
    for i in 0..1000 {
        store.results().forget(&format!("r{i}")).await.unwrap();
    }
    for i in 0..500 {
        store
            .results()
            .put(&format!("short{i}"), b"soon gone".to_vec(), Duration::from_millis(1), never)
            .await
            .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(5)).await;

    // Writers keep going while the log is compacted.
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let store = store.clone();
            tokio::spawn(async move {
                for i in 0..500 {
                    store.results().put(&format!("during-{w}-{i}"), b"kept".to_vec(), DAY, never).await.unwrap();
                }
            })
        })
        .collect();
    let stats = store.results().compact().await.unwrap();
    for w in writers {
        w.await.unwrap();
    }
    assert!(stats.bytes_after * 5 < stats.bytes_before, "{stats:?}");
    assert!((1000..=3000).contains(&stats.records), "the live results, and the writes before it: {stats:?}");
    let again = store.results().compact().await.unwrap();
    assert_eq!(again.records, 3000, "1000 results and 2000 written meanwhile");

    drop(store);
    let store = open(&dir);
    for i in 0..1000 {
        assert_eq!(store.results().get(&format!("r{i}")), None, "forgotten r{i} stays forgotten");
    }
    for i in 1000..2000 {
        let doc = String::from_utf8(store.results().get(&format!("r{i}")).expect("live result kept")).unwrap();
        assert!(doc.contains("\"round\": 4"), "the latest document: {doc}");
    }
    assert_eq!(store.results().get("short0"), None, "expired results are not carried over");
    for w in 0..4 {
        for i in 0..500 {
            assert_eq!(store.results().get(&format!("during-{w}-{i}")).as_deref(), Some(&b"kept"[..]));
        }
    }
    let results_dirs: Vec<_> = std::fs::read_dir(dir.0.join("results"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.parse::<u64>().is_ok())
        .collect();
    assert_eq!(results_dirs, vec!["2".to_string()], "only the current generation is left");
}

/// A compaction interrupted before its switch (a half-written next generation on disk) changes
/// nothing: the old generation stays in charge and the leftover is removed on open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unfinished_compaction_is_discarded_on_open() {
    let dir = TempDir::new("results-compact-crash");
    let store = open(&dir);
    store.results().put("a", b"1".to_vec(), DAY, |_| false).await.unwrap();
    drop(store);
    let leftover = dir.0.join("results").join("1");
    std::fs::create_dir_all(&leftover).unwrap();
    std::fs::write(leftover.join("00000000000000000000.log"), b"garbage from a crash").unwrap();
    let store = open(&dir);
    assert_eq!(store.results().get("a").as_deref(), Some(&b"1"[..]));
    assert!(!leftover.exists(), "the unfinished generation is removed");
    store.results().compact().await.unwrap();
    drop(store);
    assert_eq!(open(&dir).results().get("a").as_deref(), Some(&b"1"[..]));
}

/// A stored SUCCESS is never replaced, even by a STARTED of another worker that is written at the
/// same moment (a redelivered task after a cut connection), neither in memory nor after a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_success_is_never_replaced_by_a_concurrent_write() {
    let dir = TempDir::new("results-race");
    let store = open(&dir);
    let keep_success =
        |doc: &[u8]| serde_json::from_slice::<serde_json::Value>(doc).is_ok_and(|v| v["status"] == "SUCCESS");
    let success = |id: &str| format!(r#"{{"task_id":"{id}","status":"SUCCESS","result":1}}"#).into_bytes();
    let started = |id: &str| format!(r#"{{"task_id":"{id}","status":"STARTED","result":null}}"#).into_bytes();
    let ids: Vec<String> = (0..2000).map(|i| format!("t{i}")).collect();
    let puts = ids.iter().map(|id| {
        let (a, b) = (store.clone(), store.clone());
        let (s, t) = (success(id), started(id));
        let (id1, id2) = (id.clone(), id.clone());
        async move {
            let one = tokio::spawn(async move { a.results().put(&id1, s, DAY, keep_success).await.unwrap() });
            let two = tokio::spawn(async move { b.results().put(&id2, t, DAY, keep_success).await.unwrap() });
            let _ = tokio::join!(one, two);
        }
    });
    futures::future::join_all(puts).await;
    let replaced = |store: &LogStore| {
        ids.iter().filter(|id| !store.results().get(id).is_some_and(|d| keep_success(&d))).cloned().collect::<Vec<_>>()
    };
    let in_memory = replaced(&store);
    drop(store);
    let store = open(&dir);
    let after_reopen = replaced(&store);
    assert!(
        in_memory.is_empty() && after_reopen.is_empty(),
        "{} in memory, {} after reopening: {:?}",
        in_memory.len(),
        after_reopen.len(),
        after_reopen.iter().take(5).collect::<Vec<_>>()
    );
}

/// A batched store (`StoreBatches::store_many`, what the worker's batches use) keeps the rules of
/// one store, in this process (one append for all) and through the directory's owner: a stored
/// SUCCESS stays, a repeated id's states land in order, a waiter is woken with its state, and a
/// reopened store reads what was written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batched_store_keeps_the_rules_of_one() {
    use celery_core::{ResultBackend, TaskMeta, TaskState};
    use result_backends::log::LogResultBackend;
    use serde_json::json;
    let tcp = celery_tests::Target::log_tcp().await;
    let (tcp_url, _) = tcp.urls();
    let dir = TempDir::new("results-batched");
    for url in [dir.url("fsync=os"), tcp_url] {
        let b = Arc::new(LogResultBackend::connect(&url).await.unwrap());
        assert!(b.store_batches().is_some(), "{url}");
        b.store(&TaskMeta::success("done", json!(1))).await.unwrap();
        let waiter = {
            let b = b.clone();
            tokio::spawn(async move { b.wait("waited", Duration::from_secs(10)).await })
        };
        let batch = [
            TaskMeta::success("waited", json!(3)),
            TaskMeta::success("done", json!(2)),
            TaskMeta::new("twice", TaskState::Started, json!(null)),
            TaskMeta::success("twice", json!(5)),
            TaskMeta::new("running", TaskState::Started, json!(null)),
        ];
        b.store_batches().unwrap().store_many(&batch).await.unwrap();
        assert_eq!(b.get("done").await.unwrap().unwrap().result, json!(1), "SUCCESS kept ({url})");
        assert_eq!(b.get("twice").await.unwrap().unwrap().status, TaskState::Success, "in order ({url})");
        assert_eq!(b.get("running").await.unwrap().unwrap().status, TaskState::Started);
        let woken = waiter.await.unwrap().unwrap().expect("woken with its state");
        assert_eq!(woken.result, json!(3));
    }
    let reopened = open(&dir);
    let doc = reopened.results().get("twice").expect("written");
    assert!(String::from_utf8_lossy(&doc).contains("SUCCESS"));
    let done = reopened.results().get("done").expect("written");
    assert!(String::from_utf8_lossy(&done).contains(r#""result":1"#), "{}", String::from_utf8_lossy(&done));
}

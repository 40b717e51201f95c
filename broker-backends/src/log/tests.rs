//! The facade's tests: a `LogBroker` in this process and through a server behave alike.

use std::sync::Arc;

use celery_core::protocol::Message;
use celery_core::routing::Route;
use celery_core::{Broker, ProtocolError, Signature};

use super::*;

#[test]
fn a_remote_broker_prints_no_token() {
    let client = RemoteStore::new(Target::Tcp("h:1".into(), None), "s3cret".into(), None);
    let shown = format!("{:?}", LogBroker { inner: Inner::Remote(Arc::new(client)), fairness: Arc::default() });
    assert!(!shown.contains("s3cret") && shown.contains("***"), "{shown}");
}

#[test]
fn url_errors_print_the_url_redacted() {
    let e = tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(LogBroker::connect("log+tcp://h:1/?token=s3cret&bogus=1"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("log+tcp://h:1/?token=***&bogus=1") && e.contains("`bogus`"), "{e}");
    assert!(!e.contains("s3cret"), "{e}");
}

fn dir(tag: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("peek-{tag}-{}", uuid::Uuid::new_v4().simple()))
}

fn msg(i: i64) -> Message {
    Message::from_signature(&Signature::by_name("t").args(serde_json::json!([i]))).unwrap()
}

fn ids(found: &[Result<Message, ProtocolError>]) -> Vec<String> {
    found.iter().map(|m| m.as_ref().map(|m| m.headers.id.clone()).unwrap_or_default()).collect()
}

/// Peeking shows the oldest unfinished records in order, any number of times, and changes
/// nothing a consumer sees: the same records come, in the same order, each a first delivery.
#[tokio::test]
async fn peek_takes_nothing_and_counts_nothing() {
    let d = dir("local");
    let broker = LogBroker::connect(&format!("log://{}?partitions=2&max_deliveries=1", d.display())).await.unwrap();
    let sent: Vec<Message> = (0..5).map(msg).collect();
    for m in &sent {
        broker.publish(&Route::queue("q"), m).await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    }
    let want: Vec<String> = sent.iter().map(|m| m.headers.id.clone()).collect();
    for _ in 0..5 {
        assert_eq!(ids(&broker.peek("q", 100).await.unwrap()), want);
    }
    assert_eq!(ids(&broker.peek("q", 2).await.unwrap()), want[..2]);
    assert_eq!(broker.queue_len("q").await.unwrap(), 5);

    // Finish the third out of order: it is no longer shown.
    let mut c = broker.consume(&["q".to_string()], 5).await.unwrap();
    let mut got = Vec::new();
    for _ in 0..5 {
        let mut d = c.next().await.unwrap();
        assert!(!d.redelivered, "peeking counted a delivery");
        got.push((d.message().as_ref().unwrap().headers.id.clone(), d));
    }
    let mut rest = Vec::new();
    for (id, d) in got {
        if id == want[2] {
            d.ack().await.unwrap();
        } else {
            rest.push(d);
        }
    }
    let shown = ids(&broker.peek("q", 100).await.unwrap());
    assert_eq!(shown, [&want[..2], &want[3..]].concat(), "leased ones are shown, the acked one is not");
    for d in rest {
        d.ack().await.unwrap();
    }
    assert!(broker.peek("q", 100).await.unwrap().is_empty());
    c.close().await;
    let _ = std::fs::remove_dir_all(d);
}

/// Over the socket protocol (`PEEK`), the same answer.
#[tokio::test]
async fn peek_over_tcp() {
    let d = dir("tcp");
    let (path, cfg) = parse_url(&format!("log://{}", d.display())).unwrap();
    let store = LogStore::open(&path, cfg).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(serve_tcp(Arc::clone(&store), listener, Some("t".into()), None));
    let broker = LogBroker::connect(&format!("log+tcp://{addr}?token=t")).await.unwrap();
    let sent: Vec<Message> = (0..3).map(msg).collect();
    for m in &sent {
        broker.publish(&Route::queue("q"), m).await.unwrap();
    }
    let want: Vec<String> = sent.iter().map(|m| m.headers.id.clone()).collect();
    for _ in 0..3 {
        assert_eq!(ids(&broker.peek("q", 10).await.unwrap()), want);
    }
    assert_eq!(ids(&broker.peek("q", 1).await.unwrap()), want[..1]);
    assert_eq!(broker.queue_len("q").await.unwrap(), 3);
    server.abort();
    let _ = std::fs::remove_dir_all(d);
}

/// The results API answers the same in the owning process and through a server: a SUCCESS is
/// kept, waits end at a ready state, leases have one holder, a chord completes once.
#[tokio::test]
async fn results_here_and_through_a_server_agree() {
    use celery_core::backend::ChordMember;
    let d = dir("results");
    let (path, cfg) = parse_url(&format!("log://{}", d.display())).unwrap();
    let store = LogStore::open(&path, cfg).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(serve_tcp(Arc::clone(&store), listener, Some("t".into()), None));
    let remote = LogBroker::connect(&format!("log+tcp://{addr}?token=t")).await.unwrap().results();
    let local = LogBroker::local(store.clone()).results();
    let ttl = std::time::Duration::from_secs(60);
    for (side, r) in [("local", &local), ("remote", &remote)] {
        let id = format!("task-{side}");
        let success = format!(r#"{{"task_id":"{id}","status":"SUCCESS","result":1}}"#).into_bytes();
        let started = format!(r#"{{"task_id":"{id}","status":"STARTED","result":null}}"#).into_bytes();
        let waiting = tokio::spawn({
            let (r, id) = (r.clone(), id.clone());
            async move { r.wait(&id, std::time::Duration::from_secs(10)).await.unwrap() }
        });
        r.put(&id, started, ttl).await.unwrap();
        r.put(&id, success.clone(), ttl).await.unwrap();
        r.put(&id, b"{}".to_vec(), ttl).await.unwrap();
        assert_eq!(r.get(&id).await.unwrap().as_deref(), Some(&success[..]), "{side}: a SUCCESS is kept");
        assert_eq!(waiting.await.unwrap().as_deref(), Some(&success[..]), "{side}");
        r.forget(&id).await.unwrap();
        assert_eq!(r.get(&id).await.unwrap(), None, "{side}");

        let lease = format!("lease-{side}");
        assert!(r.lease(&lease, "a", Some(ttl)).await.unwrap(), "{side}");
        assert!(!r.lease(&lease, "b", Some(ttl)).await.unwrap(), "{side}");
        assert_eq!(r.lease_holder(&lease).await.unwrap().as_deref(), Some("a"), "{side}");
        assert!(!r.lease(&lease, "a", None).await.unwrap(), "{side}: released");
        assert_eq!(r.lease_holder(&lease).await.unwrap(), None, "{side}");

        let group = format!("chord-{side}");
        r.chord_size(&group, 2, ttl).await.unwrap();
        let member = |i: usize| ChordMember {
            task_id: format!("{group}-{i}"),
            index: Some(i as u64),
            state: celery_core::TaskState::Success,
            result: serde_json::json!(i),
        };
        assert!(r.chord_part(&group, &member(0), ttl).await.unwrap().is_none(), "{side}");
        let all = r.chord_part(&group, &member(1), ttl).await.unwrap().expect("the chord completes");
        assert_eq!(all.len(), 2, "{side}");
        r.chord_done(&group).await.unwrap();
    }
    server.abort();
    let _ = std::fs::remove_dir_all(d);
}

/// The history survives reopening the store and a compaction; what the count trimmed stays gone.
#[tokio::test]
async fn history_survives_reopening_and_compaction() {
    use celery_core::history::{History, HistoryQuery, Retain, TaskRecord};
    let d = dir("history");
    let url = format!("log://{}", d.display());
    let now = celery_core::event::now();
    let task = |i: usize| TaskRecord {
        id: format!("t{i}"),
        name: "add".into(),
        state: "SUCCESS".into(),
        args: format!("[{i}]"),
        received: now + i as f64,
        ..TaskRecord::default()
    };
    let ids = |page: celery_core::history::HistoryPage| page.tasks.into_iter().map(|t| t.id).collect::<Vec<_>>();
    let all = HistoryQuery::default();
    {
        let broker = LogBroker::connect(&url).await.unwrap();
        let tasks: Vec<TaskRecord> = (0..5).map(task).collect();
        broker.record(&tasks, &Retain { max_tasks: 4, ..Retain::default() }).await.unwrap();
        let changed = TaskRecord { state: "FAILURE".into(), ..task(4) };
        broker.record(&[changed], &Retain::default()).await.unwrap();
        assert_eq!(ids(broker.search(&all).await.unwrap()), ["t4", "t3", "t2", "t1"]);
    }
    let broker = LogBroker::connect(&url).await.unwrap();
    assert_eq!(ids(broker.search(&all).await.unwrap()), ["t4", "t3", "t2", "t1"], "t0's tombstone holds");
    let failed = HistoryQuery { state: "FAILURE".into(), ..HistoryQuery::default() };
    assert_eq!(ids(broker.search(&failed).await.unwrap()), ["t4"], "the latest record of t4 wins");
    broker.store().unwrap().results().compact().await.unwrap();
    drop(broker);
    let broker = LogBroker::connect(&url).await.unwrap();
    assert_eq!(ids(broker.search(&all).await.unwrap()), ["t4", "t3", "t2", "t1"], "compaction kept them");
    let text = HistoryQuery { text: "[2]".into(), ..HistoryQuery::default() };
    assert_eq!(ids(broker.search(&text).await.unwrap()), ["t2"]);
    drop(broker);
    std::fs::remove_dir_all(d).ok();
}

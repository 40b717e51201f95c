//! A worker consuming 2,000 queues, on every broker, as real processes: a task sent to any one of
//! them runs within a second (issue 20). The built-in broker's resource bounds with thousands of
//! queues are in `log_many_queues`.

use std::time::{Duration, Instant};

use celery_core::Signature;
use celery_tests::{DemoProcess, Target};
use serde_json::json;

const T: Duration = Duration::from_secs(180);
const QUEUES: usize = 2000;

/// Starts a worker on `target` consuming 2,000 queues, sends one task to each and, once all ran,
/// checks that a new task on any of them (first, last, some between) runs within a second.
async fn a_task_sent_to_any_of_2000_queues_runs_within_a_second(target: Target) {
    let (broker, backend) = target.urls();
    let queues: Vec<String> = (0..QUEUES).map(|i| format!("mq.{i}")).collect();
    let list = queues.join(",");
    let started = Instant::now();
    let w = DemoProcess::start_urls(&broker, &backend, &["worker", "-c", "8", "-Q", &list]);
    assert!(w.wait_log("consuming", T), "{}", w.log());
    eprintln!("{broker}: consuming {QUEUES} queues {:?} after the start", started.elapsed());
    let app = target.app().await;
    for chunk in queues.chunks(500) {
        let sigs = chunk.iter().enumerate().map(|(i, q)| Signature::by_name("add").args(json!([i, 1])).queue(q));
        let results = app.send_batch(sigs).await.expect("send");
        for (i, r) in results.iter().enumerate() {
            assert_eq!(r.get::<i64>(T).await.expect("result"), i as i64 + 1, "{}", w.log());
        }
    }
    for i in [0, QUEUES - 1, 1000, 7, 1500, 333] {
        let t = Instant::now();
        let r = app.send(Signature::by_name("add").args(json!([i, 2])).queue(&queues[i])).await.expect("send");
        assert_eq!(r.get::<i64>(T).await.expect("result"), i as i64 + 2);
        let took = t.elapsed();
        assert!(took < Duration::from_secs(1), "{broker}, queue {}: {took:?}\n{}", queues[i], w.log());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log() {
    a_task_sent_to_any_of_2000_queues_runs_within_a_second(Target::log()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis() {
    if let Some(t) = Target::redis() {
        a_task_sent_to_any_of_2000_queues_runs_within_a_second(t).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp() {
    if let Some(t) = Target::amqp() {
        a_task_sent_to_any_of_2000_queues_runs_within_a_second(t).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres() {
    if let Some(t) = Target::postgres() {
        a_task_sent_to_any_of_2000_queues_runs_within_a_second(t).await;
    }
}

/// RabbitMQ says "no such queue" only by closing the channel that asked: purging 120 queues (each
/// with 22 delay levels that were never used) and reading depths of missing queues closes over
/// 2,047 channels (RabbitMQ's `channel_max`), which once broke channel creation on the connection
/// that publishes and consumes. Those calls now run on a probe connection of their own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_purges_of_hundreds_of_queues_leave_the_connection_usable() {
    let Some(target) = Target::amqp() else { return };
    let app = target.app().await;
    let broker = app.broker();
    for i in 0..120 {
        assert_eq!(broker.purge(&format!("pq.{i}")).await.expect("purge"), 0);
    }
    for i in 0..300 {
        assert_eq!(broker.queue_len(&format!("missing.{i}")).await.expect("depth of a missing queue"), 0);
    }
    // The connection still publishes, declares and counts.
    for _ in 0..3 {
        app.send(Signature::by_name("add").args(json!([1, 2])).queue("pq.7")).await.expect("send");
    }
    assert_eq!(broker.queue_len("pq.7").await.expect("depth"), 3);
    assert_eq!(broker.purge("pq.7").await.expect("purge"), 3);
}

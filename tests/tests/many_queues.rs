//! A worker consuming 2,000 queues, on every broker, as real processes: a task sent to any one of
//! them runs within a second (issue 20). The built-in broker's resource bounds with thousands of
//! queues are in `log_many_queues`.

use std::time::{Duration, Instant};

use celery_core::Signature;
use celery_tests::{DemoProcess, PrivateRedis, Target};
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
/// with 22 delay levels that were never used, when purge asked each level that way; it deletes
/// them now, which RabbitMQ answers for a missing queue too) and reading depths of missing queues
/// closed over 2,047 channels (RabbitMQ's `channel_max`), which once broke channel creation on the
/// connection that publishes and consumes. Such calls now run on a probe connection of their own.
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

/// An idle worker consuming 500 Redis queues sends at most 50 commands a second (measured by the
/// server's own counter over 10 s, on a server of its own): it waits on one wake-up subscription,
/// probes the lists in batches once a second and reads one next-due index (issue 20). It still
/// runs a task sent by one of ours at once, finds within about a second one that arrived with no
/// wake-up, as a Python producer's does, and a due delayed message the next-due index misses
/// within a sweep.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_idle_worker_sends_at_most_50_commands_a_second_on_500_queues() {
    const N: usize = 500;
    const WINDOW: Duration = Duration::from_secs(10);
    let Some(server) = PrivateRedis::start() else { return };
    let queues: Vec<String> = (0..N).map(|i| format!("idle.{i}")).collect();
    let w = DemoProcess::start_urls(&server.url, &server.url, &["worker", "-c", "4", "-Q", &queues.join(",")]);
    assert!(w.wait_log("consuming", T), "{}", w.log());
    // Past the start (the first fetch over every queue, the holder's registration).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = server.commands().expect("INFO");
    tokio::time::sleep(WINDOW).await;
    let after = server.commands().expect("INFO");
    let rate = (after - before).saturating_sub(1) as f64 / WINDOW.as_secs_f64();
    eprintln!("idle worker on {N} queues: {rate:.1} Redis commands/s");
    assert!(rate <= 50.0, "{rate:.1} commands/s while idle\n{}", w.log());

    let app = celery_worker::connect(&server.url, &server.url).await.expect("connect");
    let t = Instant::now();
    let r = app.send(Signature::by_name("add").args(json!([40, 2])).queue(&queues[N - 1])).await.expect("send");
    assert_eq!(r.get::<i64>(T).await.expect("result"), 42);
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}\n{}", t.elapsed(), w.log());

    // Sent to a queue nobody consumes, then moved into a consumed one without a wake-up.
    let r = app.send(Signature::by_name("add").args(json!([1, 2])).queue("idle.staging")).await.expect("send");
    let t = Instant::now();
    let moved: Option<Vec<u8>> = redis::cmd("LMOVE")
        .arg("idle.staging")
        .arg(&queues[7])
        .arg("RIGHT")
        .arg("LEFT")
        .query(&mut server.conn())
        .expect("LMOVE");
    assert!(moved.is_some(), "the message was not in its staging queue");
    assert_eq!(r.get::<i64>(T).await.expect("result"), 3);
    assert!(t.elapsed() < Duration::from_secs(3), "found by the probe after {:?}\n{}", t.elapsed(), w.log());

    // A due message in a queue's delayed set that the next-due index does not name (a process
    // stopped between its defer and its index write) is found by the sweep (every 10 s).
    let r = app.send(Signature::by_name("add").args(json!([5, 5])).queue("idle.staging")).await.expect("send");
    let env: Vec<u8> = redis::cmd("RPOP").arg("idle.staging").query(&mut server.conn()).expect("RPOP");
    let now_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_millis() as u64;
    let t = Instant::now();
    let _: i64 = redis::cmd("ZADD")
        .arg(format!("_celery_rs.delayed.{}", queues[9]))
        .arg(now_ms)
        .arg(env)
        .query(&mut server.conn())
        .expect("ZADD");
    assert_eq!(r.get::<i64>(T).await.expect("result"), 10);
    assert!(t.elapsed() < Duration::from_secs(13), "found by the sweep after {:?}\n{}", t.elapsed(), w.log());
}

//! A worker consuming thousands of queues on the built-in broker, as real processes: what the worker
//! holds (threads, file descriptors, memory) does not grow with the queues: partitions share the
//! writer threads and a bounded set of descriptors, and an idle partition holds neither. (That a
//! task sent to any of 2,000 queues runs within a second is in `many_queues`, for every broker.)

use std::time::Duration;

use celery_core::Signature;
use celery_tests::{proc_stats, DemoProcess, TempDir};
use serde_json::json;

const T: Duration = Duration::from_secs(120);

fn names(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("mq.{i}")).collect()
}

/// Starts a worker consuming `queues` on `url` and waits until it consumes them.
fn worker(url: &str, queues: &[String]) -> DemoProcess {
    let list = queues.join(",");
    let w = DemoProcess::start_urls(url, url, &["worker", "-c", "8", "-Q", &list]);
    assert!(w.wait_log("consuming", T), "{}", w.log());
    w
}

/// Sends one `add` to every queue (creating them, in the worker's store) and waits for every result.
async fn one_task_each(app: &celery_core::App, queues: &[String]) {
    for chunk in queues.chunks(1000) {
        let sigs = chunk.iter().enumerate().map(|(i, q)| Signature::by_name("add").args(json!([i, 1])).queue(q));
        let results = app.send_batch(sigs).await.unwrap();
        for (i, r) in results.iter().enumerate() {
            assert_eq!(r.get::<i64>(T).await.unwrap(), i as i64 + 1);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_with_5000_written_queues_holds_bounded_threads_and_descriptors() {
    let dir = TempDir::new("many-queues-bounds");
    let url = dir.url("");
    let queues = names(5000);
    let w = worker(&url, &queues);
    let pid = w.child.id();
    let idle = proc_stats(pid);
    let app = celery_worker::connect(&url, &url).await.unwrap();
    // Every queue written, read and acknowledged: each has its segment, journaled acks and state.
    one_task_each(&app, &queues).await;
    let after = proc_stats(pid);
    // The runtime's threads grow with the CPUs, not with the queues.
    let cpus = std::thread::available_parallelism().map_or(2, |n| n.get()) as u64;
    let thread_limit = 32 + cpus.saturating_sub(2);
    assert!(after.threads <= thread_limit, "{after:?} (before the queues were written: {idle:?})\n{}", w.log());
    assert!(after.fds <= 512, "{after:?} (before: {idle:?})");
    assert!(after.rss_kib <= 150 * 1024, "{after:?} (before: {idle:?})");
    eprintln!("5000 queues written and drained: {after:?}; before: {idle:?}");
    // The worker still serves them all.
    let r = app.send(Signature::by_name("add").args(json!([40, 2])).queue(&queues[4321])).await.unwrap();
    assert_eq!(r.get::<i64>(T).await.unwrap(), 42);
}

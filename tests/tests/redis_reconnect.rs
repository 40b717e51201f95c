//! Connection loss: every client connection is killed by the server (`CLIENT KILL TYPE normal`) while
//! tasks run; the worker logs it, reconnects and finishes everything. Its own test binary, because the
//! kill hits every client of the server.

use std::time::Duration;

use celery_core::Signature;
use celery_tests::{redis_available, RedisEnv};
use celery_worker::{Worker, WorkerConfig};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_survives_killed_connections() {
    if !redis_available("redis_reconnect") {
        return;
    }
    let _ = tracing_subscriber::fmt().with_env_filter("warn").try_init();
    let env = RedisEnv::new(30.0);
    let app = celery_worker::connect(&env.broker, &env.backend).await.unwrap();
    let worker_app = celery_worker::connect(&env.broker, &env.backend).await.unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let cfg = WorkerConfig { concurrency: 4, ..WorkerConfig::default() };
    let worker = tokio::spawn(Worker::new(worker_app, cfg).run_until(async {
        let _ = stopped.await;
    }));

    let first = app.send(Signature::by_name("reconnect_add").args(json!([1, 1]))).await.unwrap();
    assert_eq!(first.get::<i64>(Duration::from_secs(15)).await.unwrap(), 2);

    let mut c = env.conn();
    let killed: u64 =
        redis::cmd("CLIENT").arg("KILL").arg("TYPE").arg("normal").arg("SKIPME").arg("yes").query(&mut c).unwrap();
    let pubsub: u64 = redis::cmd("CLIENT").arg("KILL").arg("TYPE").arg("pubsub").query(&mut c).unwrap();
    assert!(killed + pubsub >= 3, "killed {killed} + {pubsub} connections");

    // Sends right after the kill go through once the producer reconnects.
    let after = app.send(Signature::by_name("reconnect_add").args(json!([2, 3]))).await.unwrap();
    assert_eq!(after.get::<i64>(Duration::from_secs(30)).await.unwrap(), 5);
    // The worker goes on consuming: a stream of sends after the kill all complete.
    let results =
        app.send_batch((0..20).map(|i| Signature::by_name("reconnect_add").args(json!([i, 1])))).await.unwrap();
    for (i, r) in results.iter().enumerate() {
        assert_eq!(r.get::<i64>(Duration::from_secs(30)).await.unwrap(), i as i64 + 1);
    }
    let _ = stop.send(());
    worker.await.unwrap().unwrap();
}

#[celery_worker::prelude::task]
async fn reconnect_add(x: i64, y: i64) -> i64 {
    x + y
}

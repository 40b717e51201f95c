//! The `rpc://` result backend on RabbitMQ: results come back to the caller's reply queue, with no
//! Redis involved; failures, countdowns and PENDING for unknown ids behave as with other backends.

use std::time::Duration;

use celery_core::{ResultError, Signature, TaskState};
use celery_tests::{amqp_available, AmqpVhost};
use celery_worker::prelude::*;
use serde_json::json;

#[task]
async fn r_add(x: i64, y: i64) -> i64 {
    x + y
}

#[task]
async fn r_fail() -> Result<(), TaskError> {
    Err(TaskError::new("ValueError", "rpc says no"))
}

const T: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_come_back_over_the_reply_queue() {
    if !amqp_available("amqp_rpc") {
        return;
    }
    let vhost = AmqpVhost::new();
    let app = celery_worker::connect(&vhost.url(), "rpc://").await.unwrap();
    let worker_app = celery_worker::connect(&vhost.url(), "rpc://").await.unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let worker = tokio::spawn(
        Worker::new(worker_app, WorkerConfig { concurrency: 4, ..WorkerConfig::default() }).run_until(async {
            let _ = stopped.await;
        }),
    );
    let a = app.send(r_add::new(2, 3)).await.unwrap();
    let b = app.send(r_fail::new()).await.unwrap();
    let c = app.send(r_add::new(20, 22).countdown(Duration::from_secs(2))).await.unwrap();
    assert_eq!(a.get::<i64>(T).await.unwrap(), 5);
    assert!(matches!(b.get::<()>(T).await, Err(ResultError::Failed { message, .. }) if message == "rpc says no"));
    assert_eq!(c.get::<i64>(T).await.unwrap(), 42);
    assert_eq!(app.result("no-such-id").state().await.unwrap(), TaskState::Pending);
    assert_eq!(a.state().await.unwrap(), TaskState::Success, "a reply is kept after get");
    let by_name = app.send(Signature::by_name("r_add").args(json!([1, 1]))).await.unwrap();
    assert_eq!(by_name.get::<i64>(T).await.unwrap(), 2);
    let _ = stop.send(());
    worker.await.unwrap().unwrap();
}

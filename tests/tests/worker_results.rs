//! A task's outcome is never lost to an unreachable result backend: a worker that cannot store the
//! result (after its retries) returns the delivery to its queue instead of acking it, so the task
//! runs again and its result is stored once the backend answers. Against the real built-in broker,
//! with a result backend whose first stores fail as a lost connection would.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use celery_core::backend::ResultBackend;
use celery_core::{App, BackendError, Signature, TaskMeta};
use celery_worker::prelude::*;
use celery_worker::{Worker, WorkerConfig};
use serde_json::json;

static RUNS: AtomicUsize = AtomicUsize::new(0);

#[task]
async fn outcome_kept(x: i64) -> i64 {
    RUNS.fetch_add(1, Ordering::SeqCst);
    x * 2
}

/// The memory backend, with its first `failing` stores refused as a lost connection.
#[derive(Debug)]
struct Flaky {
    inner: result_backends::memory::MemoryBackend,
    failing: AtomicUsize,
}

#[async_trait]
impl ResultBackend for Flaky {
    async fn store(&self, meta: &TaskMeta) -> Result<(), BackendError> {
        if self.failing.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok() {
            return Err(BackendError::connection("connection refused (injected)"));
        }
        self.inner.store(meta).await
    }
    async fn get(&self, task_id: &str) -> Result<Option<TaskMeta>, BackendError> {
        self.inner.get(task_id).await
    }
    async fn wait(&self, task_id: &str, timeout: Duration) -> Result<Option<TaskMeta>, BackendError> {
        self.inner.wait(task_id, timeout).await
    }
    async fn forget(&self, task_id: &str) -> Result<(), BackendError> {
        self.inner.forget(task_id).await
    }
}

#[tokio::test]
async fn a_result_that_cannot_be_stored_sends_the_task_back_to_run_again() {
    let dir = std::env::temp_dir().join(format!("worker-results-{}", uuid::Uuid::new_v4().simple()));
    let broker = celery_core::scheme::connect_broker(&format!("log://{}", dir.display())).await.unwrap();
    // More failures than the worker's retries of one store (8): the first run's result is lost.
    let backend = Arc::new(Flaky { inner: Default::default(), failing: AtomicUsize::new(9) });
    let app = App::new(broker, backend.clone());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let cfg = WorkerConfig {
        concurrency: 2,
        queues: vec!["outcomes".into()],
        track_started: false,
        ..WorkerConfig::default()
    };
    let worker = tokio::spawn(Worker::new(app.clone(), cfg).run_until(async {
        let _ = stopped.await;
    }));
    let res = app.send(Signature::by_name("outcome_kept").args(json!([21])).queue("outcomes")).await.unwrap();
    assert_eq!(res.get::<i64>(Duration::from_secs(90)).await.unwrap(), 42);
    assert_eq!(RUNS.load(Ordering::SeqCst), 2, "ran again after its first result could not be stored");
    assert_eq!(backend.failing.load(Ordering::SeqCst), 0);
    let _ = stop.send(());
    worker.await.unwrap().unwrap();
    std::fs::remove_dir_all(dir).ok();
}

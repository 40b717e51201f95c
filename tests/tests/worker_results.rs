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

/// The memory backend with injected failures: its first `failing` stores and its first
/// `failing_batches` batches are refused as a lost connection, its first `panicking_batches`
/// batches panic; with `batches` it stores batches,
/// each taking a while (so that the states of tasks ending meanwhile gather). It counts the batches,
/// the outcomes stored in them, and the states stored one by one.
#[derive(Debug, Default)]
struct Injected {
    inner: result_backends::memory::MemoryBackend,
    failing: AtomicUsize,
    failing_batches: AtomicUsize,
    panicking_batches: AtomicUsize,
    batches: bool,
    batch_calls: AtomicUsize,
    batched: AtomicUsize,
    single: AtomicUsize,
    single_started: AtomicUsize,
}

/// Takes one of `n`'s injected failures, if any is left.
fn fails(n: &AtomicUsize) -> bool {
    n.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok()
}

#[async_trait]
impl celery_core::capability::StoreBatches for Injected {
    async fn store_many(&self, metas: &[TaskMeta]) -> Result<(), BackendError> {
        tokio::time::sleep(Duration::from_millis(20)).await;
        if fails(&self.failing_batches) {
            return Err(BackendError::connection("connection refused (injected)"));
        }
        if fails(&self.panicking_batches) {
            panic!("a store_many that panics (injected)");
        }
        self.batch_calls.fetch_add(1, Ordering::SeqCst);
        let outcomes = metas.iter().filter(|m| m.status == celery_core::TaskState::Success).count();
        self.batched.fetch_add(outcomes, Ordering::SeqCst);
        for m in metas {
            self.inner.store(m).await?;
        }
        Ok(())
    }
}

#[async_trait]
impl ResultBackend for Injected {
    async fn store(&self, meta: &TaskMeta) -> Result<(), BackendError> {
        if fails(&self.failing) {
            return Err(BackendError::connection("connection refused (injected)"));
        }
        let counter = if meta.status == celery_core::TaskState::Started { &self.single_started } else { &self.single };
        counter.fetch_add(1, Ordering::SeqCst);
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
    fn store_batches(&self) -> Option<&dyn celery_core::capability::StoreBatches> {
        self.batches.then_some(self)
    }
}

/// A worker of `cfg` on a built-in broker of its own (a fresh directory) and `backend`.
struct Running {
    app: App,
    dir: std::path::PathBuf,
    stop: tokio::sync::oneshot::Sender<()>,
    worker: tokio::task::JoinHandle<Result<(), celery_worker::WorkerError>>,
}

impl Running {
    async fn start(backend: Arc<Injected>, cfg: WorkerConfig) -> Running {
        let dir = std::env::temp_dir().join(format!("worker-results-{}", uuid::Uuid::new_v4().simple()));
        let broker = celery_core::scheme::connect_broker(&format!("log://{}", dir.display())).await.unwrap();
        let app = App::new(broker, backend);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let worker = tokio::spawn(Worker::new(app.clone(), cfg).run_until(async {
            let _ = stopped.await;
        }));
        Running { app, dir, stop, worker }
    }

    async fn stop(self) {
        let _ = self.stop.send(());
        self.worker.await.unwrap().unwrap();
        std::fs::remove_dir_all(self.dir).ok();
    }
}

#[tokio::test]
async fn a_result_that_cannot_be_stored_sends_the_task_back_to_run_again() {
    // More failures than the worker's retries of one store (8): the first run's result is lost.
    let backend = Arc::new(Injected { failing: AtomicUsize::new(9), ..Default::default() });
    let cfg = WorkerConfig {
        concurrency: 2,
        queues: vec!["outcomes".into()],
        track_started: false,
        ..WorkerConfig::default()
    };
    let run = Running::start(backend.clone(), cfg).await;
    let app = &run.app;
    let res = app.send(Signature::by_name("outcome_kept").args(json!([21])).queue("outcomes")).await.unwrap();
    assert_eq!(res.get::<i64>(Duration::from_secs(90)).await.unwrap(), 42);
    assert_eq!(RUNS.load(Ordering::SeqCst), 2, "ran again after its first result could not be stored");
    assert_eq!(backend.failing.load(Ordering::SeqCst), 0);
    run.stop().await;
}

static BATCHED_RUNS: AtomicUsize = AtomicUsize::new(0);

#[task]
async fn batched_outcome(x: i64) -> i64 {
    BATCHED_RUNS.fetch_add(1, Ordering::SeqCst);
    x + 1
}

/// A worker stores the states of tasks ending together in batches; the outcomes of a batch that
/// fails are stored one by one instead (its STARTEDs are not: the outcome follows), and no result
/// is lost or stored twice over. 300 tasks, 50 at once, STARTED tracked, the first 2 batches
/// refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn states_are_stored_in_batches_and_one_by_one_when_a_batch_fails() {
    const N: i64 = 300;
    let backend = Arc::new(Injected { failing_batches: AtomicUsize::new(2), batches: true, ..Default::default() });
    let cfg = WorkerConfig { concurrency: 50, queues: vec!["batched".into()], ..WorkerConfig::default() };
    let run = Running::start(backend.clone(), cfg).await;
    let app = &run.app;
    let sigs = (0..N).map(|i| Signature::by_name("batched_outcome").args(json!([i])).queue("batched"));
    let results = app.send_batch(sigs).await.unwrap();
    for (i, r) in results.iter().enumerate() {
        assert_eq!(r.get::<i64>(Duration::from_secs(60)).await.unwrap(), i as i64 + 1);
    }
    run.stop().await;
    let load = |n: &AtomicUsize| n.load(Ordering::SeqCst);
    let (batches, batched, single) = (load(&backend.batch_calls), load(&backend.batched), load(&backend.single));
    assert_eq!(load(&backend.failing_batches), 0, "both failures met");
    assert_eq!(load(&backend.single_started), 0, "a STARTED of a failed batch is not stored again");
    assert!(single > 0, "the outcomes of the refused batches were stored one by one");
    assert_eq!(batched + single, N as usize, "each outcome stored once: {batched} in batches, {single} alone");
    assert!(batches * 4 < batched, "{batched} outcomes in {batches} batches");
    assert_eq!(BATCHED_RUNS.load(Ordering::SeqCst), N as usize, "each task ran once");
}

static PANIC_RUNS: AtomicUsize = AtomicUsize::new(0);

#[task]
async fn after_a_panic(x: i64) -> i64 {
    PANIC_RUNS.fetch_add(1, Ordering::SeqCst);
    x
}

/// A backend whose batched store panics does not leave later stores waiting for a sender that is
/// gone: the states of the panicked batch are not stored, their tasks go back to their queue and
/// run again, and every result is stored in the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_batch_sends_its_tasks_back_and_later_stores_go_on() {
    const N: i64 = 40;
    let backend = Arc::new(Injected { panicking_batches: AtomicUsize::new(1), batches: true, ..Default::default() });
    let cfg =
        WorkerConfig { concurrency: 8, queues: vec!["panics".into()], track_started: false, ..WorkerConfig::default() };
    let run = Running::start(backend.clone(), cfg).await;
    let app = &run.app;
    let sigs = (0..N).map(|i| Signature::by_name("after_a_panic").args(json!([i])).queue("panics"));
    let results = app.send_batch(sigs).await.unwrap();
    for (i, r) in results.iter().enumerate() {
        assert_eq!(r.get::<i64>(Duration::from_secs(60)).await.unwrap(), i as i64);
    }
    run.stop().await;
    assert_eq!(backend.panicking_batches.load(Ordering::SeqCst), 0, "the panic was met");
    assert!(PANIC_RUNS.load(Ordering::SeqCst) > N as usize, "the panicked batch's tasks ran again");
}

#[task]
async fn reports_then_runs(ctx: TaskContext) -> u32 {
    ctx.update_state("PROGRESS", json!({"done": 1})).await.expect("report stored");
    tokio::time::sleep(Duration::from_millis(400)).await;
    7
}

/// A report stored while the task's STARTED waits for its batch is not overwritten by that
/// STARTED: the report goes through the batches too, behind it (each batch here takes 20 ms).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_report_is_not_overwritten_by_the_tasks_started() {
    let backend = Arc::new(Injected { batches: true, ..Default::default() });
    let cfg = WorkerConfig { concurrency: 4, queues: vec!["reports".into()], ..WorkerConfig::default() };
    let run = Running::start(backend.clone(), cfg).await;
    let app = &run.app;
    let sigs = (0..4).map(|_| Signature::by_name("reports_then_runs").queue("reports"));
    let results = app.send_batch(sigs).await.unwrap();
    let t = std::time::Instant::now();
    let mut seen = Vec::new();
    while t.elapsed() < Duration::from_secs(30) {
        let mut states = Vec::new();
        for r in &results {
            states.push(r.state().await.unwrap());
        }
        if states.iter().all(|s| *s == celery_core::TaskState::Success) {
            break;
        }
        seen.push(states);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Once a task showed its report, it never went back to STARTED.
    for i in 0..results.len() {
        let mine: Vec<&celery_core::TaskState> = seen.iter().map(|s| &s[i]).collect();
        let reported = mine.iter().position(|s| s.to_string() == "PROGRESS");
        let reported = reported.unwrap_or_else(|| panic!("task {i} showed no report: {mine:?}"));
        assert!(
            mine[reported..].iter().all(|s| **s != celery_core::TaskState::Started),
            "task {i} went back to STARTED after its report: {mine:?}"
        );
    }
    for r in &results {
        assert_eq!(r.get::<u32>(Duration::from_secs(30)).await.unwrap(), 7);
    }
    run.stop().await;
}

static OVERSIZED_RUNS: AtomicUsize = AtomicUsize::new(0);

/// Returns a string of `len` bytes.
#[task]
async fn oversized_result(len: usize) -> String {
    OVERSIZED_RUNS.fetch_add(1, Ordering::SeqCst);
    "x".repeat(len)
}

/// A result over the built-in store's record size limit would be refused however often its task
/// ran: the task runs once, is dead-lettered with the store's reason, and its caller gets FAILURE
/// (`BackendStoreError`, stored in its place) instead of waiting for a result that never comes; in
/// the process owning the directory and through it (`log+tcp://`, the refusal marked on the wire).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_too_large_for_the_store_dead_letters_its_task_once() {
    use broker_backends::log::{parse_url, serve_tcp, LogStore};
    let dir = celery_tests::TempDir::new("oversized-result");
    oversized_result_is_dead_lettered(&dir.url("max_record_bytes=65536&fsync=os"), 1).await;
    let served = celery_tests::TempDir::new("oversized-result-tcp");
    let (d, cfg) = parse_url(&served.url("max_record_bytes=65536&fsync=os")).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(serve_tcp(LogStore::open(&d, cfg).unwrap(), listener, Some("s3cret".into()), None));
    oversized_result_is_dead_lettered(&format!("log+tcp://{addr}?token=s3cret"), 2).await;
    server.abort();
}

async fn oversized_result_is_dead_lettered(url: &str, runs: usize) {
    let app = celery_worker::connect(url, url).await.unwrap();
    let cfg = WorkerConfig { concurrency: 2, queues: vec!["big".into()], ..WorkerConfig::default() };
    let worker = Worker::new(app.clone(), cfg);
    let stats = worker.stats();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(worker.run_until(async {
        let _ = stopped.await;
    }));
    let res = app.send(Signature::by_name("oversized_result").args(json!([200_000])).queue("big")).await.unwrap();
    match res.get::<String>(Duration::from_secs(30)).await {
        Err(celery_core::ResultError::Failed { exc_type, message, .. }) => {
            assert_eq!(exc_type, "BackendStoreError", "{url}");
            assert!(message.contains("over the limit of 65536 bytes"), "{url}: {message}");
        }
        other => panic!("{url}: {other:?}"),
    }
    let mut dead = app.broker().consume(&["big.dead".to_string()], 1).await.unwrap();
    let mut d = tokio::time::timeout(Duration::from_secs(30), dead.next()).await.expect("dead-lettered").unwrap();
    let reason = d.message().as_ref().unwrap().headers.extra[celery_core::broker::DEAD_LETTER_REASON].clone();
    assert!(reason.as_str().is_some_and(|r| r.contains("over the limit") && r.contains("the task ran")), "{reason}");
    dead.stop();
    let _ = stop.send(());
    running.await.unwrap().unwrap();
    assert_eq!(stats.requeued.load(Ordering::SeqCst), 0, "{url}: never sent back to run again");
    assert_eq!(OVERSIZED_RUNS.load(Ordering::SeqCst), runs, "{url}: ran once");
}

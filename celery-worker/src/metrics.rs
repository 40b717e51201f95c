//! Prometheus metrics of a worker (`worker --metrics 127.0.0.1:9808`), through the `metrics` crate
//! and its Prometheus exporter. Without `--metrics` no recorder is installed and every call here
//! does nothing.
//!
//! | metric | labels | what |
//! | --- | --- | --- |
//! | `celery_tasks_received_total` | task | deliveries taken to run |
//! | `celery_tasks_succeeded_total` | task | SUCCESS |
//! | `celery_tasks_failed_total` | task | FAILURE (after retries) |
//! | `celery_tasks_retried_total` | task | retries scheduled |
//! | `celery_tasks_revoked_total` | task | expired before running |
//! | `celery_task_runtime_seconds` | task | histogram of run times |
//! | `celery_dead_letters_total` | queue | messages dead-lettered (bad input) |
//! | `celery_worker_in_flight` | | tasks running now |
//! | `celery_queue_depth` | queue | ready messages, polled every 5 s |
//! | `celery_broker_reconnects_total` | broker | connections re-established after a loss |
//!
//! ```no_run
//! celery_worker::metrics::serve("127.0.0.1:9808".parse().unwrap()).unwrap();
//! // curl http://127.0.0.1:9808/metrics
//! ```

use std::net::SocketAddr;
use std::time::Duration;

use celery_core::App;
use metrics::{counter, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};

/// Run-time histogram buckets, in seconds.
const RUNTIME_BUCKETS: &[f64] = &[0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 60.0, 300.0];

/// Installs the Prometheus recorder and serves `GET /metrics` on `addr` (on the current runtime).
pub fn serve(addr: SocketAddr) -> Result<(), metrics_exporter_prometheus::BuildError> {
    PrometheusBuilder::new()
        .with_http_listener(addr)
        .set_buckets_for_metric(Matcher::Full("celery_task_runtime_seconds".into()), RUNTIME_BUCKETS)?
        .install()?;
    describe();
    tracing::info!(%addr, "metrics on http://{addr}/metrics");
    Ok(())
}

/// The `# HELP` lines.
fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!("celery_tasks_received_total", "Deliveries taken to run, by task");
    describe_counter!("celery_tasks_succeeded_total", "Tasks that succeeded, by task");
    describe_counter!("celery_tasks_failed_total", "Tasks that failed for good, by task");
    describe_counter!("celery_tasks_retried_total", "Retries scheduled, by task");
    describe_counter!("celery_tasks_revoked_total", "Tasks expired before they ran, by task");
    describe_histogram!("celery_task_runtime_seconds", Unit::Seconds, "Task run time, by task");
    describe_counter!("celery_dead_letters_total", "Messages dead-lettered for bad input, by queue");
    describe_gauge!("celery_worker_in_flight", "Tasks running now");
    describe_gauge!("celery_queue_depth", "Ready messages in each consumed queue (polled every 5 s)");
    describe_counter!("celery_broker_reconnects_total", "Broker connections re-established after a loss");
}

/// Polls the depth of `queues` every 5 s until the process ends.
pub fn poll_queue_depth(app: App, queues: Vec<String>) {
    tokio::spawn(async move {
        loop {
            for q in &queues {
                if let Ok(n) = app.broker().queue_len(q).await {
                    gauge!("celery_queue_depth", "queue" => q.clone()).set(n as f64);
                }
            }
            tokio::time::sleep(Duration::from_secs(5)).await;
        }
    });
}

pub(crate) fn received(task: &'static str) {
    counter!("celery_tasks_received_total", "task" => task).increment(1);
}

pub(crate) fn started() {
    gauge!("celery_worker_in_flight").increment(1.0);
}

pub(crate) fn finished(task: &'static str, runtime: Duration) {
    gauge!("celery_worker_in_flight").decrement(1.0);
    histogram!("celery_task_runtime_seconds", "task" => task).record(runtime.as_secs_f64());
}

pub(crate) fn succeeded(task: &'static str) {
    counter!("celery_tasks_succeeded_total", "task" => task).increment(1);
}

pub(crate) fn failed(task: &'static str) {
    counter!("celery_tasks_failed_total", "task" => task).increment(1);
}

pub(crate) fn retried(task: &'static str) {
    counter!("celery_tasks_retried_total", "task" => task).increment(1);
}

pub(crate) fn revoked(task: &'static str) {
    counter!("celery_tasks_revoked_total", "task" => task).increment(1);
}

pub(crate) fn dead_lettered(queue: &str) {
    counter!("celery_dead_letters_total", "queue" => queue.to_owned()).increment(1);
}

//! Prometheus metrics of a worker (`worker --metrics 9808`), through the `metrics` crate and its
//! Prometheus recorder, served by a small HTTP server of our own. Without `--metrics` no recorder is
//! installed and every call here does nothing: the per-task ones return before building their
//! labels (which would allocate for every task).
//!
//! Where it listens: a bare port means loopback (`9808` is `127.0.0.1:9808`); an address beyond
//! loopback must be asked for with `--metrics-public` as well (`--metrics 0.0.0.0:9808
//! --metrics-public`), so metrics are never published by accident. It answers only requests whose
//! `Host` header names it (its address, `localhost` on loopback, or a name given with
//! `--metrics-allow-host`, e.g. the name Prometheus scrapes it by), else `421`: a web page cannot
//! read it through DNS rebinding. Answers carry the same security headers as the monitor's.
//!
//! | metric | labels | what |
//! | --- | --- | --- |
//! | `celery_tasks_received_total` | task | deliveries taken to run |
//! | `celery_tasks_succeeded_total` | task | SUCCESS |
//! | `celery_tasks_failed_total` | task | FAILURE (after retries) |
//! | `celery_tasks_retried_total` | task | retries scheduled |
//! | `celery_tasks_revoked_total` | task | expired before running |
//! | `celery_task_runtime_seconds` | task | histogram of run times |
//! | `celery_task_state_reports_total` | | states reported by running tasks (`update_state`) |
//! | `celery_dead_letters_total` | queue | messages dead-lettered (bad input) |
//! | `celery_worker_in_flight` | | tasks running now |
//! | `celery_queue_depth` | queue | ready messages, polled every 5 s |
//! | `celery_queue_dead_letters` | queue | messages in its dead-letter queue, polled every 5 s |
//! | `celery_queue_in_flight` | queue | deliveries out to consumers (brokers that know: PostgreSQL) |
//! | `celery_queue_oldest_age_seconds` | queue | how long the oldest ready message waited (0 when empty; brokers that know: PostgreSQL) |
//! | `celery_broker_reconnects_total` | broker | connections re-established after a loss |
//!
//! ```no_run
//! # async fn demo() -> Result<(), celery_worker::metrics::MetricsError> {
//! use celery_worker::metrics::{listen_addr, serve};
//! serve(listen_addr("9808").unwrap(), false, Vec::new()).await?;
//! // curl http://127.0.0.1:9808/metrics
//! # Ok(()) }
//! ```

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use celery_core::App;
use metrics::{counter, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::monitor::guard::{self, Guard};

/// Run-time histogram buckets, in seconds.
const RUNTIME_BUCKETS: &[f64] = &[0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 60.0, 300.0];
/// How often histograms are trimmed (what the exporter's own server does).
const UPKEEP: Duration = Duration::from_secs(5);

/// Why metrics cannot be served.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MetricsError {
    /// An address beyond loopback without `--metrics-public`.
    #[error("metrics on {0} (not loopback) must be asked for with --metrics-public")]
    NotLoopback(SocketAddr),
    /// The recorder could not be installed (one is installed already).
    #[error(transparent)]
    Recorder(#[from] metrics_exporter_prometheus::BuildError),
    /// The address cannot be bound.
    #[error("binding {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

/// Parses `--metrics`: a bare port (loopback) or `HOST:PORT`.
///
/// ```
/// use celery_worker::metrics::listen_addr;
/// assert_eq!(listen_addr("9808").unwrap(), "127.0.0.1:9808".parse().unwrap());
/// assert_eq!(listen_addr("0.0.0.0:9808").unwrap(), "0.0.0.0:9808".parse().unwrap());
/// assert!(listen_addr("localhost").is_err());
/// ```
pub fn listen_addr(s: &str) -> Result<SocketAddr, String> {
    if let Ok(port) = s.parse::<u16>() {
        return Ok(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port));
    }
    s.parse().map_err(|_| format!("`{s}`: expected PORT (loopback) or IP:PORT"))
}

/// Installs the Prometheus recorder and serves `GET /metrics` on `addr` (on the current runtime)
/// to requests whose `Host` names it (its address, or one of `hosts`). An address beyond loopback
/// needs `public`. Returns the bound address.
pub async fn serve(addr: SocketAddr, public: bool, hosts: Vec<String>) -> Result<SocketAddr, MetricsError> {
    if !addr.ip().is_loopback() && !public {
        return Err(MetricsError::NotLoopback(addr));
    }
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|source| MetricsError::Bind { addr, source })?;
    let bound = listener.local_addr().map_err(|source| MetricsError::Bind { addr, source })?;
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Full("celery_task_runtime_seconds".into()), RUNTIME_BUCKETS)?
        .install_recorder()?;
    RECORDING.store(true, std::sync::atomic::Ordering::Release);
    describe();
    let upkeep = handle.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(UPKEEP).await;
            upkeep.run_upkeep();
        }
    });
    let guard = Arc::new(Guard::new(bound, hosts, None));
    let router = Router::new()
        .route("/metrics", get(render))
        .with_state(handle)
        .layer(axum::middleware::from_fn_with_state(guard, check_host))
        .layer(axum::middleware::map_response(|mut res: Response| async move {
            guard::secure(res.headers_mut());
            res
        }));
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, router).await {
            tracing::error!(error = %e, "metrics server stopped");
        }
    });
    tracing::info!(addr = %bound, "metrics on http://{bound}/metrics");
    Ok(bound)
}

async fn render(State(handle): State<PrometheusHandle>) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], handle.render()).into_response()
}

/// Refuses a request whose `Host` does not name this server (421).
async fn check_host(State(guard): State<Arc<Guard>>, req: Request, next: Next) -> Response {
    let host = req.headers().get(header::HOST).and_then(|v| v.to_str().ok());
    if !guard.host_ok(host) {
        tracing::warn!(?host, "metrics: request with an unknown Host refused");
        return (StatusCode::MISDIRECTED_REQUEST, "unknown Host: start the worker with --metrics-allow-host NAME")
            .into_response();
    }
    next.run(req).await
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
    describe_counter!("celery_task_state_reports_total", "States reported by running tasks (update_state)");
    describe_counter!("celery_dead_letters_total", "Messages dead-lettered for bad input, by queue");
    describe_gauge!("celery_worker_in_flight", "Tasks running now");
    describe_gauge!("celery_queue_depth", "Ready messages in each consumed queue (polled every 5 s)");
    describe_gauge!("celery_queue_dead_letters", "Messages in each consumed queue's dead-letter queue");
    describe_gauge!("celery_queue_in_flight", "Deliveries of each consumed queue out to consumers, unsettled");
    describe_gauge!(
        "celery_queue_oldest_age_seconds",
        "Seconds the oldest ready message of each consumed queue waited"
    );
    describe_counter!("celery_broker_reconnects_total", "Broker connections re-established after a loss");
}

/// Sets the gauges of `queue` from its stats (those the broker does not know are left unset).
fn record_queue(queue: &str, s: &celery_core::QueueStats) {
    gauge!("celery_queue_depth", "queue" => queue.to_owned()).set(s.depth as f64);
    gauge!("celery_queue_dead_letters", "queue" => queue.to_owned()).set(s.dead_letters as f64);
    if let Some(n) = s.in_flight {
        gauge!("celery_queue_in_flight", "queue" => queue.to_owned()).set(n as f64);
    }
    let age = s.oldest_age.map_or(0.0, |a| a.as_secs_f64());
    if s.oldest_age.is_some() || s.depth == 0 {
        gauge!("celery_queue_oldest_age_seconds", "queue" => queue.to_owned()).set(age);
    }
}

/// Polls the health of `queues` ([`Broker::queue_stats`](celery_core::Broker::queue_stats)) every
/// 5 s until the process ends.
pub fn poll_queue_depth(app: App, queues: Vec<String>) {
    tokio::spawn(async move {
        loop {
            for q in &queues {
                match app.broker().queue_stats(q).await {
                    Ok(stats) => record_queue(q, &stats),
                    Err(e) => tracing::debug!(queue = %q, error = %e, "metrics: cannot read the queue's stats"),
                }
            }
            tokio::time::sleep(Duration::from_secs(5)).await;
        }
    });
}

/// Set once [`serve`] installed the recorder: until then the per-task calls do nothing at all.
static RECORDING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether metrics are recorded (see [`RECORDING`]).
fn recording() -> bool {
    RECORDING.load(std::sync::atomic::Ordering::Acquire)
}

pub(crate) fn received(task: &'static str) {
    if !recording() {
        return;
    }
    counter!("celery_tasks_received_total", "task" => task).increment(1);
}

pub(crate) fn started() {
    if !recording() {
        return;
    }
    gauge!("celery_worker_in_flight").increment(1.0);
}

pub(crate) fn finished(task: &'static str, runtime: Duration) {
    if !recording() {
        return;
    }
    gauge!("celery_worker_in_flight").decrement(1.0);
    histogram!("celery_task_runtime_seconds", "task" => task).record(runtime.as_secs_f64());
}

pub(crate) fn reported() {
    if !recording() {
        return;
    }
    counter!("celery_task_state_reports_total").increment(1);
}

pub(crate) fn succeeded(task: &'static str) {
    if !recording() {
        return;
    }
    counter!("celery_tasks_succeeded_total", "task" => task).increment(1);
}

pub(crate) fn failed(task: &'static str) {
    if !recording() {
        return;
    }
    counter!("celery_tasks_failed_total", "task" => task).increment(1);
}

pub(crate) fn retried(task: &'static str) {
    if !recording() {
        return;
    }
    counter!("celery_tasks_retried_total", "task" => task).increment(1);
}

pub(crate) fn revoked(task: &'static str) {
    if !recording() {
        return;
    }
    counter!("celery_tasks_revoked_total", "task" => task).increment(1);
}

pub(crate) fn dead_lettered(queue: &str) {
    counter!("celery_dead_letters_total", "queue" => queue.to_owned()).increment(1);
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    async fn get(addr: SocketAddr, host: &str) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(format!("GET /metrics HTTP/1.0\r\nHost: {host}\r\n\r\n").as_bytes()).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    /// The only test here that installs the recorder (one per process).
    #[tokio::test]
    async fn serves_loopback_by_default_and_only_to_its_own_host() {
        let public = serve("0.0.0.0:0".parse().unwrap(), false, Vec::new()).await;
        assert!(matches!(public, Err(MetricsError::NotLoopback(_))), "{public:?}");
        assert_eq!(listen_addr("9808").unwrap().ip(), IpAddr::V4(Ipv4Addr::LOCALHOST));

        let addr = serve(listen_addr("0").unwrap(), false, vec!["prometheus-target.internal".into()]).await.unwrap();
        received("add");
        let port = addr.port();
        for host in [format!("127.0.0.1:{port}"), format!("localhost:{port}"), "prometheus-target.internal".into()] {
            let ok = get(addr, &host).await;
            assert!(ok.starts_with("HTTP/1.0 200"), "{host}: {ok}");
            assert!(ok.contains("celery_tasks_received_total{task=\"add\"} 1"), "{ok}");
            assert!(ok.contains("text/plain") && ok.to_lowercase().contains("x-content-type-options: nosniff"));
        }
        for host in [format!("evil.example:{port}"), "127.0.0.1:1".into()] {
            let refused = get(addr, &host).await;
            assert!(refused.starts_with("HTTP/1.0 421"), "{host}: {refused}");
            assert!(!refused.contains("celery_tasks"), "{refused}");
        }
    }
}

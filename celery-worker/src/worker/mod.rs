//! The worker: consume with a concurrency limit and prefetch, run each task, store its outcome,
//! then settle the delivery (ack after execute by default).
//!
//! What happens to a delivery:
//! - a payload larger than [`max_encoded_size`](celery_core::protocol::max_encoded_size) of
//!   [`AppConfig::max_message_size`](celery_core::AppConfig::max_message_size) (what that limit
//!   allows once encoded): never decoded (on Redis never even read: the broker dead-letters it
//!   while fetching);
//! - undecodable (headers that do not parse but name an id included), unregistered task, or
//!   arguments that do not fit: never run; FAILURE stored (when the id is known: Celery's
//!   `InvalidTaskError`, `NotRegistered` or Python's `TypeError`), `task-failed` sent, and the message
//!   dead-lettered to `<queue>.dead` with the reason; nothing it carries is acted on (no callbacks,
//!   errbacks, chain steps or chord counts);
//! - redelivered (its worker died or its connection dropped, or an outbox relay sent it again after a
//!   crash, saying so in its `redelivered` header) but its SUCCESS is stored: acked, not run again;
//! - `expires` passed: REVOKED, acked, not run;
//! - `eta` more than a second away: handed to the broker's durable delay store at once (stored there
//!   before the delivery is acked), before any rate limit or wait, so it holds no slot and nothing
//!   of it lives only in this worker; it comes back when due. An eta message is on its queue when
//!   a Redis or RabbitMQ producer (ours or Python's) sent it, and after each hop of RabbitMQ's delay
//!   levels;
//! - a concurrency key at its task's `key_concurrency` limit, right before it would run: parked
//!   by the broker in the key's waiting list and acked (`key_slots`); it comes back to its queue
//!   when a slot of the key frees;
//! - otherwise (holding the concurrency slot it was taken with, so deliveries start in broker order)
//!   it waits for its rate limit, runs, and its outcome is
//!   stored: SUCCESS, FAILURE, or RETRY (republished with `retries + 1` and an eta, then acked).
//!
//! Where each part lives:
//! - `config`: [`WorkerConfig`], the settings and the sizes derived from them;
//! - `run`: start, the consume loop, and graceful shutdown (warm, then cold after the grace);
//! - `intake`: the queues consumed (changed at run time by remote control), the broker consumer
//!   over them and the deliveries reserved there; they start in order as the `pool` (resized at
//!   run time, or by its autoscaler) frees a slot;
//! - `lifecycle`: a task from its delivery to its run (decode, checks, eta, rate limit), and
//!   `execute`: the run itself within its time limits;
//! - `outcome`: its state stored, its delivery settled, its event sent, and what follows it
//!   (`followups`: chains, callbacks and errbacks; `chord`: counting chord members);
//! - `reports`: the states a running task reports (`update_state`: stored, `task-progress` sent);
//! - `requests`: what the worker holds, for `inspect active/reserved/scheduled/query_task`;
//! - `shared`: the state the running worker shares with remote control ([`crate::control`],
//!   started from `run` through `control::start`).
//!
//! Shutdown (SIGINT/SIGTERM through the CLI, remote control's `shutdown`, or the future given to
//! [`Worker::run_until`]): stop fetching, return reserved and prefetched unstarted deliveries to the
//! queue, give running tasks the grace period, then return what still runs to the queue; the
//! `worker-offline` event is flushed to the broker before `run_until` returns.

mod batch;
mod chord;
mod config;
mod execute;
mod followups;
pub(crate) mod intake;
mod key_slots;
mod lifecycle;
mod outcome;
pub(crate) mod pool;
mod rate_limit;
mod reports;
pub(crate) mod requests;
mod run;
mod shared;
mod stores;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use celery_core::{App, BrokerError};

pub use config::WorkerConfig;
pub(crate) use config::{gethostname, prefetch_for};
pub(crate) use lifecycle::LOCAL_ETA_WAIT;
pub(crate) use shared::{Shared, TimeLimits};

/// Counters a running worker keeps.
#[derive(Debug, Default)]
pub struct WorkerStats {
    /// Tasks that returned a value.
    pub succeeded: AtomicU64,
    /// Tasks that failed for good.
    pub failed: AtomicU64,
    /// Retries scheduled.
    pub retried: AtomicU64,
    /// Messages rejected to the dead-letter queue.
    pub rejected: AtomicU64,
    /// Expired tasks revoked.
    pub revoked: AtomicU64,
    /// Deliveries returned to their queue (shutdown).
    pub requeued: AtomicU64,
    /// Redeliveries of tasks whose SUCCESS was already stored (acked, not run again).
    pub already_done: AtomicU64,
    /// Deliveries whose eta was ahead, handed to the broker's delay store.
    pub deferred: AtomicU64,
    /// Tasks whose concurrency key was at its limit, parked by the broker (and acked here).
    pub parked: AtomicU64,
    /// Tasks running now.
    pub active: AtomicU64,
}

impl WorkerStats {
    /// Tasks that finished, whatever the outcome.
    pub fn finished(&self) -> u64 {
        self.succeeded.load(Ordering::Relaxed)
            + self.failed.load(Ordering::Relaxed)
            + self.rejected.load(Ordering::Relaxed)
            + self.revoked.load(Ordering::Relaxed)
    }
}

/// Why a worker could not run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WorkerError {
    /// The broker refused to start consuming.
    #[error(transparent)]
    Broker(#[from] BrokerError),
}

/// A worker over an [`App`].
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use celery_worker::{Worker, WorkerConfig};
/// let app = celery_worker::connect("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/1").await?;
/// let worker = Worker::new(app, WorkerConfig { concurrency: 8, ..WorkerConfig::default() });
/// worker.run_until(async { tokio::signal::ctrl_c().await.ok(); }).await?;
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Worker {
    app: App,
    config: WorkerConfig,
    stats: Arc<WorkerStats>,
}

impl Worker {
    /// A worker for `app` with `config`.
    pub fn new(app: App, config: WorkerConfig) -> Worker {
        Worker { app, config, stats: Arc::default() }
    }

    /// Live counters (shared with the running worker).
    pub fn stats(&self) -> Arc<WorkerStats> {
        self.stats.clone()
    }

    /// Runs until `shutdown` resolves (or remote control's `shutdown`), then shuts down gracefully;
    /// its `worker-offline` event has been handed to the broker when this returns.
    pub async fn run_until(self, shutdown: impl std::future::Future<Output = ()>) -> Result<(), WorkerError> {
        run::run_until(self.app, self.config, self.stats, shutdown).await
    }
}

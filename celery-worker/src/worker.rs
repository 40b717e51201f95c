//! The worker: consume with a concurrency limit and prefetch, run each task, store its outcome,
//! then settle the delivery (ack after execute by default).
//!
//! What happens to a delivery:
//! - a payload larger than [`max_encoded_size`] of
//!   [`AppConfig::max_message_size`](celery_core::AppConfig::max_message_size) (what that limit
//!   allows once encoded): never decoded (on Redis never even read: the broker dead-letters it
//!   while fetching);
//! - undecodable (headers that do not parse but name an id included), unregistered task, or
//!   arguments that do not fit: never run; FAILURE stored (when the id is known: Celery's
//!   `InvalidTaskError`, `NotRegistered` or Python's `TypeError`), `task-failed` sent, and the message
//!   dead-lettered to `<queue>.dead` with the reason; nothing it carries is acted on (no callbacks,
//!   errbacks, chain steps or chord counts);
//! - redelivered (its worker died or its connection dropped) but its SUCCESS is stored: acked, not run
//!   again;
//! - `expires` passed: REVOKED, acked, not run;
//! - `eta` more than a second away: handed to the broker's durable delay store at once (stored there
//!   before the delivery is acked), before any rate limit or wait, so it holds no slot and nothing
//!   of it lives only in this worker; it comes back when due. An eta message is on its queue when
//!   a Redis or RabbitMQ producer (ours or Python's) sent it, and after each hop of RabbitMQ's delay
//!   levels;
//! - otherwise (holding the concurrency slot it was taken with, so deliveries start in broker order)
//!   it waits for its rate limit, runs, and its outcome is
//!   stored: SUCCESS, FAILURE, or RETRY (republished with `retries + 1` and an eta, then acked).
//!
//! Shutdown (SIGINT/SIGTERM through the CLI, or the future given to [`Worker::run_until`]): stop
//! fetching, return prefetched unstarted deliveries to the queue, give running tasks the grace period,
//! then return what still runs to the queue.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use celery_core::backend::TaskMeta;
use celery_core::backoff::retry_countdown;
use celery_core::protocol::{max_encoded_size, Message};
use celery_core::registry::{self, TaskEntry};
use celery_core::routing::Route;
use celery_core::task::{TaskArgs, TaskErrorKind};
use celery_core::{App, BrokerError, Delivery, ProtocolError, TaskContext, TaskError, TaskState};
use chrono::Utc;
use tokio::sync::{oneshot, watch, OwnedSemaphorePermit, Semaphore};
use tracing::Instrument;

use crate::events::EventDispatcher;
use crate::execute::{self, Outcome};
use crate::rate_limit::RateLimits;

/// An eta closer than this is waited for in the worker instead of going back to the broker.
const LOCAL_ETA_WAIT: Duration = Duration::from_secs(1);

/// Worker settings.
///
/// ```
/// use celery_worker::WorkerConfig;
/// let cfg = WorkerConfig { queues: vec!["celery".into(), "emails".into()], concurrency: 16, ..WorkerConfig::default() };
/// assert_eq!(cfg.prefetch(), 64);
/// ```
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// Queues to consume, in priority order.
    pub queues: Vec<String>,
    /// Tasks run at once.
    pub concurrency: usize,
    /// Deliveries held per concurrency slot (Celery's default 4; 1 = fetch only when idle).
    pub prefetch_multiplier: usize,
    /// This worker's name (`celery@host`).
    pub hostname: String,
    /// How long running tasks may finish after a shutdown request.
    pub shutdown_grace: Duration,
    /// Store STARTED when a task starts (and RECEIVED when it is deferred to its eta).
    pub track_started: bool,
    /// Send Celery's task and worker events (`worker -E`).
    pub events: bool,
    /// How often `worker-heartbeat` is sent when events are on.
    pub heartbeat: Duration,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            queues: vec!["celery".into()],
            concurrency: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2),
            prefetch_multiplier: 4,
            hostname: format!("celery@{}", gethostname()),
            shutdown_grace: Duration::from_secs(30),
            track_started: true,
            events: false,
            heartbeat: Duration::from_secs(2),
        }
    }
}

/// This host's name.
pub(crate) fn gethostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .or_else(|_| std::env::var("HOSTNAME"))
        .unwrap_or_else(|_| "localhost".into())
}

impl WorkerConfig {
    /// Deliveries held at most: concurrency x multiplier.
    pub fn prefetch(&self) -> usize {
        self.concurrency.max(1) * self.prefetch_multiplier.max(1)
    }
}

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

struct Shared {
    app: App,
    config: WorkerConfig,
    slots: Arc<Semaphore>,
    limits: RateLimits,
    stats: Arc<WorkerStats>,
    shutdown: watch::Receiver<bool>,
    hard_stop: watch::Receiver<bool>,
    events: Option<EventDispatcher>,
    /// Revoked ids (remote control).
    revoked: crate::control::Revoked,
    /// Running tasks by id: what `inspect active` shows, and how to terminate each.
    running: std::sync::Mutex<std::collections::HashMap<String, Active>>,
    /// Rate limits set by `control rate_limit` (none: unlimited), overriding the tasks' own.
    rate_overrides: std::sync::Mutex<std::collections::HashMap<String, Option<Duration>>>,
    /// Set by `control shutdown`.
    remote_stop: watch::Sender<bool>,
}

impl Shared {
    /// Sends an event when events are on; its fields are built only then.
    fn event(&self, kind: &str, fields: impl FnOnce() -> serde_json::Value) {
        if let Some(ev) = &self.events {
            ev.send(kind, fields());
        }
    }

    /// `worker-online`, `worker-heartbeat` and `worker-offline`.
    fn worker_event(&self, kind: &str) {
        let active = self.stats.active.load(Ordering::Relaxed) as usize;
        let freq = self.config.heartbeat.as_secs_f64();
        self.event(kind, || crate::events::worker_fields(freq, active, self.stats.finished()));
    }
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

    /// Runs until `shutdown` resolves, then shuts down gracefully.
    pub async fn run_until(self, shutdown: impl std::future::Future<Output = ()>) -> Result<(), WorkerError> {
        let cfg = self.config;
        let cap = max_encoded_size(self.app.config().max_message_size);
        let mut consumer = self.app.broker().consume_capped(&cfg.queues, cfg.prefetch(), cap).await?;
        let (stop_tx, stop_rx) = watch::channel(false);
        let (hard_tx, hard_rx) = watch::channel(false);
        let events = cfg.events.then(|| EventDispatcher::start(self.app.clone(), &cfg.hostname));
        let (remote_stop, mut remote_stopped) = watch::channel(false);
        let shared = Arc::new(Shared {
            events,
            revoked: Default::default(),
            running: Default::default(),
            rate_overrides: Default::default(),
            remote_stop,
            app: self.app,
            slots: Arc::new(Semaphore::new(cfg.concurrency.max(1))),
            config: cfg.clone(),
            limits: RateLimits::default(),
            stats: self.stats,
            shutdown: stop_rx,
            hard_stop: hard_rx,
        });
        // Revokes stored for workers that start later.
        for id in crate::control::stored_revoked(&shared.app).await.into_keys() {
            shared.revoked.add(&id);
        }
        // Listening for remote control before "ready" (a broker without broadcasts has none).
        let control = match shared.app.broker().subscribe(&crate::control::request_exchange(), "").await {
            Ok(requests) => Some(tokio::spawn(serve_control(shared.clone(), requests))),
            Err(e) => {
                tracing::debug!(error = %e, "remote control unavailable");
                None
            }
        };
        let names: Vec<_> = registry::tasks().iter().map(|e| e.name).collect();
        tracing::info!(
            hostname = %cfg.hostname, queues = ?cfg.queues, concurrency = cfg.concurrency,
            prefetch = cfg.prefetch(), tasks = ?names, "worker ready"
        );
        shared.worker_event("worker-online");
        let heartbeat = shared.events.is_some().then(|| {
            let shared = shared.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(shared.config.heartbeat.max(Duration::from_millis(100)));
                tick.tick().await;
                loop {
                    tick.tick().await;
                    shared.worker_event("worker-heartbeat");
                }
            })
        });
        // Each running task holds one of `slots` until it ends: the semaphore is also what tells how
        // many run, and when all have ended (no JoinSet: its lock was taken twice per task).
        let slots = cfg.concurrency.max(1);
        // Made once, not per delivery: each `wait_for` registers a waiter anew.
        let stop = async {
            tokio::select! {
                _ = shutdown => {}
                _ = remote_stopped.wait_for(|s| *s) => {}
            }
        };
        tokio::pin!(stop);
        // A slot first, then the next delivery: deliveries start in the order the broker gave them.
        'consume: loop {
            let permit = match shared.slots.clone().try_acquire_owned() {
                Ok(p) => p,
                Err(tokio::sync::TryAcquireError::Closed) => break 'consume,
                Err(tokio::sync::TryAcquireError::NoPermits) => tokio::select! {
                    p = shared.slots.clone().acquire_owned() => match p {
                        Ok(p) => p,
                        Err(_) => break 'consume,
                    },
                    _ = &mut stop => break 'consume,
                },
            };
            tokio::select! {
                d = consumer.next() => match d {
                    Some(d) => {
                        // Boxed: the task cell then moves a pointer, not the whole future.
                        tokio::spawn(Box::pin(handle(shared.clone(), d, permit)));
                    }
                    None => break 'consume,
                },
                _ = &mut stop => break 'consume,
            }
        }
        let in_flight = || slots - shared.slots.available_permits();
        tracing::info!(in_flight = in_flight(), "worker shutting down: no new deliveries");
        consumer.stop();
        let _ = stop_tx.send(true);
        while let Some(d) = consumer.next().await {
            requeue(&shared, d).await;
        }
        let grace = tokio::time::sleep(cfg.shutdown_grace);
        tokio::pin!(grace);
        let all_ended = shared.slots.clone().acquire_many_owned(slots as u32);
        tokio::pin!(all_ended);
        loop {
            tokio::select! {
                _ = &mut all_ended => break,
                _ = &mut grace, if !*hard_tx.borrow() => {
                    tracing::warn!(still_running = in_flight(), "grace period over: returning running tasks to the queue");
                    let _ = hard_tx.send(true);
                }
            }
        }
        consumer.close().await;
        if let Some(h) = heartbeat {
            h.abort();
        }
        if let Some(c) = control {
            c.abort();
        }
        shared.worker_event("worker-offline");
        tracing::info!("worker stopped");
        Ok(())
    }
}

async fn requeue(w: &Shared, d: Delivery) {
    w.stats.requeued.fetch_add(1, Ordering::Relaxed);
    if let Err(e) = d.requeue().await {
        tracing::error!(error = %e, "could not return a delivery to its queue; it comes back after the visibility timeout");
    }
}

async fn handle(w: Arc<Shared>, mut d: Delivery, permit: OwnedSemaphorePermit) {
    let limit = max_encoded_size(w.app.config().max_message_size);
    if let Some(size) = d.size().filter(|s| *s > limit) {
        // Never decoded: its size alone rejects it (its id is known when the broker read it apart).
        let err = TaskError::new(INVALID_TASK, ProtocolError::TooLarge { size, limit }.to_string());
        let known = d.decoded_error().cloned();
        Box::pin(reject(&w, d, known.as_ref().and_then(Rejected::named_by), &err)).await;
        return;
    }
    let msg = match d.take_message() {
        Ok(m) => m,
        Err(e) => {
            let err = TaskError::new(INVALID_TASK, format!("undecodable message: {e}"));
            Box::pin(reject(&w, d, Rejected::named_by(&e), &err)).await;
            return;
        }
    };
    let span = tracing::info_span!("task", id = %msg.headers.id, name = %msg.headers.task);
    process(w, d, msg, permit).instrument(span).await
}

/// A running task, as `inspect active` reports it (built only when asked), and how to stop it.
#[derive(Debug)]
struct Active {
    msg: Arc<Message>,
    name: &'static str,
    started: std::time::Instant,
    acknowledged: bool,
    routing_key: Option<String>,
    /// A revoke with `terminate` sends on it (once).
    terminate: Option<oneshot::Sender<()>>,
}

impl Active {
    fn to_json(&self, hostname: &str) -> serde_json::Value {
        let (args, kwargs) = match self.msg.body() {
            Ok(b) => (serde_json::Value::Array(b.args), serde_json::Value::Object(b.kwargs)),
            Err(_) => (serde_json::json!([]), serde_json::json!({})),
        };
        serde_json::json!({
            "id": self.msg.headers.id, "name": self.name, "args": args, "kwargs": kwargs,
            "hostname": hostname, "time_start": celery_core::event::now() - self.started.elapsed().as_secs_f64(),
            "acknowledged": self.acknowledged, "delivery_info": {"routing_key": self.routing_key},
            "worker_pid": std::process::id(),
        })
    }
}

/// Runs one delivery holding a concurrency slot (released early when it does not run).
async fn process(w: Arc<Shared>, d: Delivery, msg: Message, _permit: OwnedSemaphorePermit) {
    let msg = Arc::new(msg);
    let Some(entry) = registry::lookup(&msg.headers.task) else {
        let err = TaskError::new("NotRegistered", format!("unregistered task `{}`", msg.headers.task));
        Box::pin(reject(&w, d, Some(Rejected::of(&msg)), &err)).await;
        return;
    };
    let body = match msg.body() {
        Ok(b) => b,
        Err(e) => {
            let err = TaskError::new(INVALID_TASK, format!("undecodable body: {e}"));
            Box::pin(reject(&w, d, Some(Rejected::of(&msg)), &err)).await;
            return;
        }
    };
    w.event("task-received", || {
        serde_json::json!({
            "uuid": msg.headers.id, "name": msg.headers.task, "args": msg.headers.argsrepr,
            "kwargs": msg.headers.kwargsrepr, "root_id": msg.headers.root_id, "parent_id": msg.headers.parent_id,
            "retries": msg.headers.retries, "eta": msg.headers.eta.map(celery_core::protocol::format_time),
            "expires": msg.headers.expires.map(celery_core::protocol::format_time),
        })
    });
    if w.revoked.contains(&msg.headers.id) {
        tracing::info!("revoked: not run");
        Box::pin(revoke(&w, d, &msg, entry, Revocation::Revoked)).await;
        return;
    }
    if let Some(done) = if d.redelivered { already_succeeded(&w, &msg).await } else { None } {
        tracing::info!("redelivered, but its SUCCESS is stored: acked without running again");
        w.stats.already_done.fetch_add(1, Ordering::Relaxed);
        // Its worker may have died before counting it into its chord: count it (once) now.
        Box::pin(chord_member(&w, &msg, TaskState::Success, &done.result)).await;
        settle(d.ack().await);
        return;
    }
    // The clock is read only when a time is set.
    if msg.headers.expires.is_some_and(|t| t <= Utc::now()) {
        tracing::info!("expired before it ran: revoked");
        Box::pin(revoke(&w, d, &msg, entry, Revocation::Expired)).await;
        return;
    }
    if let Some((eta, now)) = msg.headers.eta.map(|t| (t, Utc::now())).filter(|(t, now)| t > now) {
        let wait = (eta - now).to_std().unwrap_or_default();
        if wait > LOCAL_ETA_WAIT {
            tracing::debug!(%eta, "eta is ahead: held by the broker until due");
            let received = w.config.track_started.then(|| {
                task_meta(&w, &msg, entry, TaskMeta::new(&msg.headers.id, TaskState::Received, serde_json::Value::Null))
            });
            if let Some(meta) = received.flatten() {
                // Stored before the deferral, so it never lands after a state the run stores; one
                // attempt only (no backoff): the message must not wait on an unreachable backend.
                if let Err(e) = w.app.backend().store(&meta).await {
                    tracing::warn!(error = %e, "could not store RECEIVED; deferring anyway");
                }
            }
            match d.defer(&msg, eta).await {
                Ok(()) => {
                    w.stats.deferred.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => {
                    tracing::error!(error = %e, "could not defer; the message comes back (to its queue, or after the visibility timeout)")
                }
            }
            return;
        }
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stopped(w.shutdown.clone()) => { Box::pin(requeue(&w, d)).await; return; }
        }
    }
    let opts = (entry.options)();
    let overridden = w.rate_overrides.lock().unwrap_or_else(|p| p.into_inner()).get(entry.name).copied();
    let interval = match (overridden, opts.rate_limit) {
        (Some(set), _) => set,
        (None, Some(rate)) => celery_core::rate::parse_rate(rate)
            .map_err(|e| tracing::warn!(error = %e, "ignoring the task's rate limit"))
            .ok(),
        (None, None) => None,
    };
    if let Some(interval) = interval {
        tokio::select! {
            _ = Box::pin(w.limits.acquire(entry.name, interval)) => {}
            _ = stopped(w.shutdown.clone()) => { Box::pin(requeue(&w, d)).await; return; }
        }
    }
    if *w.shutdown.borrow() {
        Box::pin(requeue(&w, d)).await;
        return;
    }
    let mut d = Some(d);
    if !opts.acks_late {
        if let Some(d) = d.take() {
            settle(d.ack().await);
        }
    }
    let ignore = msg.headers.ignore_result || opts.ignore_result;
    if w.config.track_started && !ignore {
        let mut m = TaskMeta::new(
            &msg.headers.id,
            TaskState::Started,
            serde_json::json!({"hostname": w.config.hostname, "pid": std::process::id()}),
        );
        m.worker = Some(w.config.hostname.clone());
        Box::pin(store(&w, &msg, entry, m)).await;
    }
    let ctx = TaskContext::new(&msg.headers.id, entry.name, msg.headers.retries).with_eta(msg.headers.eta);
    let soft = msg.headers.soft_time_limit.or(opts.soft_time_limit).and_then(celery_core::clock::positive_secs);
    let hard = msg.headers.time_limit.or(opts.time_limit).and_then(celery_core::clock::positive_secs);
    let embed = body.embed;
    let args = TaskArgs { args: body.args, kwargs: body.kwargs };
    let started = std::time::Instant::now();
    crate::metrics::received(entry.name);
    crate::metrics::started();
    w.event("task-started", || serde_json::json!({"uuid": msg.headers.id}));
    w.stats.active.fetch_add(1, Ordering::Relaxed);
    let (terminate, terminated) = oneshot::channel();
    let active = Active {
        msg: msg.clone(),
        name: entry.name,
        started,
        acknowledged: !opts.acks_late,
        routing_key: d.as_ref().map(|d| d.queue.clone()),
        terminate: Some(terminate),
    };
    w.running.lock().unwrap_or_else(|p| p.into_inner()).insert(msg.headers.id.clone(), active);
    let outcome = execute::run(entry, ctx, args, soft, hard, w.hard_stop.clone(), terminated).await;
    w.running.lock().unwrap_or_else(|p| p.into_inner()).remove(&msg.headers.id);
    w.stats.active.fetch_sub(1, Ordering::Relaxed);
    let runtime = started.elapsed();
    crate::metrics::finished(entry.name, runtime);
    match outcome {
        Outcome::Interrupted => {
            if let Some(d) = d.take() {
                Box::pin(requeue(&w, d)).await;
            }
        }
        Outcome::Terminated => {
            if let Some(d) = d.take() {
                Box::pin(revoke(&w, d, &msg, entry, Revocation::Terminated)).await;
            }
        }
        Outcome::Done(Ok(value)) => {
            tracing::debug!(?runtime, "succeeded");
            // The rarer steps are boxed: inline, each would grow every task's future by its size.
            let next = crate::followups::after_success(&embed);
            let mut meta = TaskMeta::success(&msg.headers.id, value.clone());
            if !next.is_empty() {
                let root = msg.headers.root_id.as_deref();
                meta.children = Box::pin(crate::followups::send_all(&w.app, next, &value, &msg.headers.id, root)).await;
            }
            let stored = ignore || Box::pin(store(&w, &msg, entry, meta)).await;
            if let Some(chord) = crate::chord::body_in(&msg, &embed) {
                Box::pin(crate::chord::member_done(&w.app, &msg, chord, TaskState::Success, &value)).await;
            }
            w.stats.succeeded.fetch_add(1, Ordering::Relaxed);
            crate::metrics::succeeded(entry.name);
            w.event("task-succeeded", || serde_json::json!({"uuid": msg.headers.id, "result": repr(&value), "runtime": runtime.as_secs_f64()}),
            );
            if let Some(d) = d.take() {
                Box::pin(finish(&w, d, stored)).await;
            }
        }
        Outcome::Done(Err(err)) => match err.kind() {
            TaskErrorKind::InvalidArguments => {
                // Python raises TypeError for arguments that do not fit; the message is kept too.
                let err = TaskError::new("TypeError", format!("invalid arguments: {}", err.message()));
                match d.take() {
                    Some(d) => Box::pin(reject(&w, d, Some(Rejected::of(&msg)), &err)).await,
                    // Acked before it ran (acks_late off): nothing to dead-letter, but the caller learns why.
                    None => Box::pin(store_rejection(&w, Rejected::of(&msg), &err)).await,
                }
            }
            TaskErrorKind::Retry { countdown } => {
                let countdown = *countdown;
                Box::pin(retry_or_fail(&w, d, &msg, entry, err, countdown)).await
            }
            TaskErrorKind::Failed if opts.autoretry => Box::pin(retry_or_fail(&w, d, &msg, entry, err, None)).await,
            _ => Box::pin(fail(&w, d, &msg, entry, &err)).await,
        },
    }
}

/// Why a task ends REVOKED.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Revocation {
    /// Revoked (remote control) before it started.
    Revoked,
    /// Its `expires` passed before it started.
    Expired,
    /// Revoked with `terminate` while running.
    Terminated,
}

/// Records REVOKED (result, chord, stats, event) and acks the delivery.
async fn revoke(w: &Shared, d: Delivery, msg: &Message, entry: &'static TaskEntry, why: Revocation) {
    let reason = match why {
        Revocation::Revoked => "revoked",
        Revocation::Expired => "expired",
        Revocation::Terminated => "terminated",
    };
    let err = TaskError::new("TaskRevokedError", reason);
    let meta = TaskMeta::error(&msg.headers.id, TaskState::Revoked, &err);
    store(w, msg, entry, meta.clone()).await;
    chord_member(w, msg, TaskState::Revoked, &meta.result).await;
    w.stats.revoked.fetch_add(1, Ordering::Relaxed);
    crate::metrics::revoked(entry.name);
    let terminated = why == Revocation::Terminated;
    w.event("task-revoked", || {
        serde_json::json!({
            "uuid": msg.headers.id, "terminated": terminated, "signum": terminated.then_some("SIGTERM"),
            "expired": why == Revocation::Expired,
        })
    });
    settle(d.ack().await);
}

async fn retry_or_fail(
    w: &Shared,
    d: Option<Delivery>,
    msg: &Message,
    entry: &'static TaskEntry,
    err: TaskError,
    countdown: Option<Duration>,
) {
    let opts = (entry.options)();
    if msg.headers.retries >= opts.max_retries {
        let err = if matches!(err.kind(), TaskErrorKind::Retry { .. }) {
            TaskError::new(
                "MaxRetriesExceededError",
                format!(
                    "Can't retry {}[{}] args:{} kwargs:{}",
                    entry.name,
                    msg.headers.id,
                    msg.headers.argsrepr.as_deref().unwrap_or("?"),
                    msg.headers.kwargsrepr.as_deref().unwrap_or("?")
                ),
            )
        } else {
            err
        };
        fail(w, d, msg, entry, &err).await;
        return;
    }
    let delay = retry_countdown(&opts, msg.headers.retries, countdown);
    let eta = celery_core::clock::after(Utc::now(), delay);
    let next = msg.retried(eta);
    let queue = d.as_ref().map(|d| d.queue.clone()).unwrap_or_else(|| w.app.config().default_queue.clone());
    if let Err(e) = w.app.broker().publish(&Route::queue(queue), &next).await {
        tracing::error!(error = %e, "could not republish the retry; returning the message to the queue");
        if let Some(d) = d {
            requeue(w, d).await;
        }
        return;
    }
    tracing::info!(retries = next.headers.retries, ?delay, reason = %err, "retry scheduled");
    store(w, msg, entry, TaskMeta::error(&msg.headers.id, TaskState::Retry, &err)).await;
    w.stats.retried.fetch_add(1, Ordering::Relaxed);
    crate::metrics::retried(entry.name);
    w.event(
        "task-retried",
        || serde_json::json!({"uuid": msg.headers.id, "exception": err.to_string(), "traceback": err.traceback()}),
    );
    if let Some(d) = d {
        settle(d.ack().await);
    }
}

async fn fail(w: &Shared, d: Option<Delivery>, msg: &Message, entry: &'static TaskEntry, err: &TaskError) {
    tracing::warn!(error = %err, "failed");
    let meta = TaskMeta::error(&msg.headers.id, TaskState::Failure, err);
    let stored = store(w, msg, entry, meta.clone()).await;
    crate::followups::on_failure(&w.app, msg).await;
    chord_member(w, msg, TaskState::Failure, &meta.result).await;
    w.stats.failed.fetch_add(1, Ordering::Relaxed);
    crate::metrics::failed(entry.name);
    w.event(
        "task-failed",
        || serde_json::json!({"uuid": msg.headers.id, "exception": err.to_string(), "traceback": err.traceback()}),
    );
    if let Some(d) = d {
        finish(w, d, stored).await;
    }
}

/// What is known of a rejected message: enough to store its FAILURE.
#[derive(Debug, Clone, Copy)]
struct Rejected<'a> {
    id: &'a str,
    task: Option<&'a str>,
    reply_to: Option<&'a str>,
}

impl<'a> Rejected<'a> {
    fn of(msg: &'a Message) -> Rejected<'a> {
        Rejected { id: &msg.headers.id, task: Some(&msg.headers.task), reply_to: msg.properties.reply_to.as_deref() }
    }

    /// The task a decoding error still names ([`ProtocolError::InvalidHeaders`]).
    fn named_by(e: &'a ProtocolError) -> Option<Rejected<'a>> {
        match e {
            ProtocolError::InvalidHeaders { id, task, reply_to, .. } => {
                Some(Rejected { id, task: task.as_deref(), reply_to: reply_to.as_deref() })
            }
            _ => None,
        }
    }
}

/// Celery's exception for a message that is not a task it can read (too large, undecodable).
const INVALID_TASK: &str = "InvalidTaskError";

/// Bad input: never run; FAILURE stored when the id is known (so a waiting caller fails fast) with
/// `err` (Celery's `NotRegistered`, `InvalidTaskError`, or Python's `TypeError` for arguments that
/// do not fit), and `task-failed` sent so that Flower shows the final state; dead-lettered with
/// `err`'s message as the reason. Nothing it carries is acted on: no callbacks, errbacks, chain
/// steps or chord counts (its embedded workflow is input that was just refused).
async fn reject(w: &Shared, d: Delivery, known: Option<Rejected<'_>>, err: &TaskError) {
    let reason = err.message();
    tracing::error!(queue = %d.queue, reason, "rejected message: dead-lettered");
    if let Some(k) = known {
        store_rejection(w, k, err).await;
    }
    w.stats.rejected.fetch_add(1, Ordering::Relaxed);
    crate::metrics::dead_lettered(&d.queue);
    settle(d.dead_letter(reason).await);
}

/// Stores FAILURE with `err` for a rejected message and sends `task-failed`; nothing else.
async fn store_rejection(w: &Shared, k: Rejected<'_>, err: &TaskError) {
    let mut meta = TaskMeta::error(k.id, TaskState::Failure, err);
    meta.name = k.task.map(str::to_owned);
    meta.reply_to = k.reply_to.map(str::to_owned);
    store_meta(w, meta).await;
    w.event(
        "task-failed",
        || serde_json::json!({"uuid": k.id, "exception": err.to_string(), "traceback": err.to_string()}),
    );
}

/// Acks a delivery whose outcome is stored; one whose outcome could not be stored (the backend
/// stayed unreachable) goes back to its queue instead, so the task runs again rather than finish
/// without a result.
async fn finish(w: &Shared, d: Delivery, stored: bool) {
    if stored {
        settle(d.ack().await);
    } else {
        tracing::error!("the result could not be stored: the task goes back to its queue to run again");
        requeue(w, d).await;
    }
}

/// Stores a task's state unless it ignores results; false when it could not be stored.
async fn store(w: &Shared, msg: &Message, entry: &'static TaskEntry, meta: TaskMeta) -> bool {
    match task_meta(w, msg, entry, meta) {
        Some(meta) => store_meta(w, meta).await,
        None => true,
    }
}

/// `meta` with what the message and this worker say about the task; `None` when it ignores results.
fn task_meta(w: &Shared, msg: &Message, entry: &'static TaskEntry, mut meta: TaskMeta) -> Option<TaskMeta> {
    if msg.headers.ignore_result || (entry.options)().ignore_result {
        return None;
    }
    meta.name = Some(entry.name.to_owned());
    meta.retries = Some(msg.headers.retries);
    meta.worker = Some(w.config.hostname.clone());
    meta.parent_id = msg.headers.parent_id.clone();
    meta.group_id = msg.headers.group.clone();
    meta.reply_to = msg.properties.reply_to.clone();
    Some(meta)
}

/// Stores a state, retrying connection errors with backoff (a result is not given up lightly).
/// Stores a task's state, retrying while the backend is unreachable; false when it could not.
async fn store_meta(w: &Shared, meta: TaskMeta) -> bool {
    let mut backoff = celery_core::backoff::Reconnect::default();
    loop {
        match w.app.backend().store(&meta).await {
            Ok(()) => return true,
            Err(e) if e.is_retryable() && backoff.attempts() < 8 => {
                let d = backoff.next_delay();
                tracing::warn!(error = %e, retry_in = ?d, "storing the result failed; retrying");
                tokio::time::sleep(d).await;
            }
            Err(e) => {
                tracing::error!(error = %e, state = %meta.status, "could not store the task state");
                return false;
            }
        }
    }
}

/// The stored SUCCESS of this task id, if any (a redelivery of finished work).
async fn already_succeeded(w: &Shared, msg: &Message) -> Option<TaskMeta> {
    if msg.headers.ignore_result {
        return None;
    }
    w.app.backend().get(&msg.headers.id).await.ok().flatten().filter(|m| m.status == TaskState::Success)
}

/// A chord member reached a final state: count it into its chord (see [`crate::chord`]).
async fn chord_member(w: &Shared, msg: &Message, state: TaskState, result: &serde_json::Value) {
    if let Some(body) = crate::chord::body_of(msg) {
        crate::chord::member_done(&w.app, msg, &body, state, result).await;
    }
}

/// Resolves once the worker is shutting down.
async fn stopped(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

fn settle(r: Result<(), BrokerError>) {
    if let Err(e) = r {
        tracing::error!(error = %e, "could not settle a delivery; it comes back after the visibility timeout");
    }
}

/// A result as the short text events carry (Celery sends `repr(result)`).
fn repr(v: &serde_json::Value) -> String {
    let mut s = v.to_string();
    if s.len() > 1024 {
        let cut = (0..=1024).rev().find(|i| s.is_char_boundary(*i)).unwrap_or(0);
        s.truncate(cut);
        s.push_str("...");
    }
    s
}

/// Answers remote-control requests (see [`crate::control`]) until the worker stops.
async fn serve_control(w: Arc<Shared>, mut requests: Box<dyn celery_core::broker::Subscription>) {
    use crate::control::{meant_for, reply_exchange, request, task_ids};
    // Learn what the other workers revoked (as Celery's mingle does), without delaying startup.
    let peers = w.clone();
    tokio::spawn(async move {
        if let Ok(replies) = request(&peers.app, "revoked", serde_json::json!({}), None, Duration::from_secs(1)).await {
            for (_, ids) in replies {
                for id in ids.as_array().into_iter().flatten().filter_map(|v| v.as_str()) {
                    peers.revoked.add(id);
                }
            }
        }
    });
    while let Some(b) = requests.next().await {
        let Ok(req) = serde_json::from_slice::<serde_json::Value>(&b.body) else { continue };
        if !meant_for(&req, &w.config.hostname) {
            continue;
        }
        let method = req["method"].as_str().unwrap_or_default().to_owned();
        let args = &req["arguments"];
        tracing::debug!(%method, "remote control request");
        let reply = match method.as_str() {
            "ping" => serde_json::json!({"ok": "pong"}),
            "registered" => serde_json::json!(registry::tasks().iter().map(|e| e.name).collect::<Vec<_>>()),
            "active" => {
                let running = w.running.lock().unwrap_or_else(|p| p.into_inner());
                serde_json::Value::Array(running.values().map(|a| a.to_json(&w.config.hostname)).collect())
            }
            "reserved" | "scheduled" => serde_json::json!([]),
            "revoked" => serde_json::json!(w.revoked.list()),
            "stats" => serde_json::json!({
                "pid": std::process::id(),
                "pool": {"max-concurrency": w.config.concurrency, "implementation": "tokio"},
                "prefetch_count": w.config.prefetch(),
                "total": {"succeeded": w.stats.succeeded.load(Ordering::Relaxed), "failed": w.stats.failed.load(Ordering::Relaxed),
                          "retried": w.stats.retried.load(Ordering::Relaxed), "revoked": w.stats.revoked.load(Ordering::Relaxed)},
                "broker": {"transport": w.app.broker().kind()},
                "sw_ident": "celery-rs", "sw_ver": env!("CARGO_PKG_VERSION"),
            }),
            "revoke" => {
                let ids = task_ids(args);
                let terminate = crate::control::truthy(&args["terminate"]);
                for id in &ids {
                    w.revoked.add(id);
                    if terminate {
                        if let Some(a) = w.running.lock().unwrap_or_else(|p| p.into_inner()).get_mut(id) {
                            if let Some(t) = a.terminate.take() {
                                let _ = t.send(());
                            }
                        }
                    }
                }
                serde_json::json!({"ok": format!("tasks {} flagged as revoked", ids.join(", "))})
            }
            "rate_limit" => {
                let task = args["task_name"].as_str().unwrap_or_default().to_owned();
                let rate = match &args["rate_limit"] {
                    serde_json::Value::String(r) if r.trim() == "0" => Ok(None),
                    serde_json::Value::String(r) => {
                        celery_core::rate::parse_rate(r).map(Some).map_err(|e| e.to_string())
                    }
                    serde_json::Value::Number(n) if n.as_f64().is_some_and(|x| x > 0.0) => {
                        Ok(Some(celery_core::clock::secs_f64(1.0 / n.as_f64().unwrap_or(1.0))))
                    }
                    _ => Ok(None),
                };
                match (registry::lookup(&task), rate) {
                    (None, _) => serde_json::json!({"error": format!("unknown task {task}")}),
                    (_, Err(e)) => serde_json::json!({"error": format!("invalid rate limit string: {e}")}),
                    (Some(_), Ok(r)) => {
                        w.rate_overrides.lock().unwrap_or_else(|p| p.into_inner()).insert(task, r);
                        serde_json::json!({"ok": "new rate limit set successfully"})
                    }
                }
            }
            "shutdown" => {
                tracing::warn!("remote control: shutdown requested");
                let _ = w.remote_stop.send(true);
                serde_json::json!({"ok": "shutting down"})
            }
            other => serde_json::json!({"error": format!("unknown command `{other}`")}),
        };
        let (Some(to), Some(ticket)) = (req["reply_to"]["routing_key"].as_str(), req["ticket"].as_str()) else {
            continue;
        };
        let body = serde_json::json!({ w.config.hostname.clone(): reply });
        let msg = crate::control::message(&body, &[("ticket", ticket.into()), ("clock", 0.into())]);
        if let Err(e) = w.app.broker().broadcast(&reply_exchange(), to, &msg).await {
            tracing::warn!(error = %e, "remote control: cannot reply");
        }
    }
}

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
//! Deliveries come in through [`crate::intake`] (the queues consumed, changed at run time by
//! remote control, and the deliveries reserved there), and start in order as the pool
//! ([`crate::pool`], resized at run time) frees a slot; what the worker holds is tracked in
//! [`crate::requests`] for `inspect active/reserved/scheduled/query_task`.
//!
//! Shutdown (SIGINT/SIGTERM through the CLI, remote control's `shutdown`, or the future given to
//! [`Worker::run_until`]): stop fetching, return reserved and prefetched unstarted deliveries to the
//! queue, give running tasks the grace period, then return what still runs to the queue; the
//! `worker-offline` event is flushed to the broker before `run_until` returns.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
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
use tokio::sync::{oneshot, watch};
use tracing::Instrument;

use crate::events::{EventDispatcher, LamportClock};
use crate::execute::{self, Outcome};
use crate::intake::{Intake, QueueSpec, Reservation, Starter};
use crate::pool::{Autoscaler, Pool, Slot};
use crate::rate_limit::RateLimits;
use crate::requests::{DeliveryInfo, Held, Requests};

/// An eta closer than this is waited for in the worker instead of going back to the broker.
pub(crate) const LOCAL_ETA_WAIT: Duration = Duration::from_secs(1);

/// Worker settings.
///
/// ```
/// use celery_worker::WorkerConfig;
/// let cfg = WorkerConfig { queues: vec!["celery".into(), "emails".into()], concurrency: 16, ..WorkerConfig::default() };
/// assert_eq!(cfg.prefetch(), 64);
/// let scaled = WorkerConfig { autoscale: Some((10, 2)), ..cfg };
/// assert_eq!((scaled.initial_pool(), scaled.prefetch()), (2, 40));
/// ```
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// Queues to consume, in priority order (`add_consumer` and `cancel_consumer` change them at
    /// run time).
    pub queues: Vec<String>,
    /// Tasks run at once (`pool_grow` and `pool_shrink` change it at run time; at most 10,000).
    pub concurrency: usize,
    /// Deliveries held per concurrency slot (Celery's default 4; 1 = fetch only when idle).
    pub prefetch_multiplier: usize,
    /// This worker's name (`celery@host`).
    pub hostname: String,
    /// How long running tasks may finish after a shutdown request.
    pub shutdown_grace: Duration,
    /// Store STARTED when a task starts (and RECEIVED when it is deferred to its eta).
    pub track_started: bool,
    /// Send Celery's task events from the start (`worker -E`; remote control's `enable_events`
    /// and `disable_events` switch them at run time). Worker events (online, heartbeat, offline)
    /// are always sent, as Celery's workers do.
    pub events: bool,
    /// How often `worker-heartbeat` is sent.
    pub heartbeat: Duration,
    /// `Some((max, min))`: the pool grows up to `max` slots while deliveries wait and every slot
    /// is busy, and shrinks back toward `min` once `autoscale_keepalive` passed since it last grew
    /// (`worker --autoscale MAX,MIN`); `concurrency` is then unused.
    pub autoscale: Option<(usize, usize)>,
    /// How long the autoscaler keeps grown slots before shrinking (Celery's
    /// `AUTOSCALE_KEEPALIVE`, 30 s).
    pub autoscale_keepalive: Duration,
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
            autoscale: None,
            autoscale_keepalive: Duration::from_secs(30),
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
    /// Deliveries held at most: concurrency (the autoscaler's max) x multiplier.
    pub fn prefetch(&self) -> usize {
        prefetch_for(self.autoscale.map_or(self.concurrency, |(max, _)| max), self.prefetch_multiplier)
    }

    /// The pool's size at start: `concurrency`, or the autoscaler's `min` (both at most 10,000;
    /// at least 1 without an autoscaler).
    pub fn initial_pool(&self) -> usize {
        match self.autoscale {
            Some((max, min)) => min.min(max).min(crate::pool::MAX_POOL),
            None => self.concurrency.clamp(1, crate::pool::MAX_POOL),
        }
    }
}

/// Deliveries held at most for a pool of `slots`.
pub(crate) fn prefetch_for(slots: usize, multiplier: usize) -> usize {
    slots.clamp(1, crate::pool::MAX_POOL).saturating_mul(multiplier.clamp(1, 1_000))
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

/// What a running worker shares between its consume loop, its tasks and remote control.
pub(crate) struct Shared {
    pub(crate) app: App,
    pub(crate) config: WorkerConfig,
    /// The concurrency limit (resized by `pool_grow`, `pool_shrink` and the autoscaler).
    pub(crate) pool: Pool,
    pub(crate) autoscaler: Option<Autoscaler>,
    /// Queues, consumer and reserved deliveries.
    pub(crate) intake: Arc<Intake>,
    limits: RateLimits,
    pub(crate) stats: Arc<WorkerStats>,
    shutdown: watch::Receiver<bool>,
    hard_stop: watch::Receiver<bool>,
    pub(crate) events: EventDispatcher,
    /// Task events on (`-E`, `enable_events`).
    pub(crate) task_events: AtomicBool,
    /// The worker's Lamport clock (events, control replies, `inspect clock`).
    pub(crate) clock: Arc<LamportClock>,
    /// Revoked ids (remote control).
    pub(crate) revoked: crate::control::Revoked,
    /// Revoked stamps (`revoke_by_stamped_headers`).
    pub(crate) revoked_stamps: crate::control::RevokedStamps,
    /// What this worker holds: running, waiting and deferred requests.
    pub(crate) requests: Requests,
    /// Rate limits set by `control rate_limit` (none: unlimited), overriding the tasks' own.
    pub(crate) rate_overrides: std::sync::Mutex<std::collections::HashMap<String, Option<Duration>>>,
    /// Time limits set by `control time_limit` (soft, hard), overriding the tasks' own.
    pub(crate) time_limits: std::sync::Mutex<std::collections::HashMap<&'static str, TimeLimits>>,
    /// Tasks started, by name (`inspect stats` `total`).
    pub(crate) totals: std::sync::Mutex<std::collections::HashMap<&'static str, u64>>,
    /// Set by `control shutdown`.
    pub(crate) remote_stop: watch::Sender<bool>,
    /// When the worker started.
    pub(crate) started: std::time::Instant,
}

/// A task's time limits in seconds as `control time_limit` sets them (`None`: no limit).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(crate) struct TimeLimits {
    pub(crate) soft: Option<f64>,
    pub(crate) hard: Option<f64>,
}

impl Shared {
    /// Sends a task event when task events are on; its fields are built only then.
    fn event(&self, kind: &str, fields: impl FnOnce() -> serde_json::Value) {
        if self.task_events.load(Ordering::Relaxed) {
            self.events.send(kind, fields());
        }
    }

    /// `worker-online`, `worker-heartbeat` and `worker-offline` (sent with or without task events).
    pub(crate) fn worker_event(&self, kind: &str) {
        let active = self.stats.active.load(Ordering::Relaxed) as usize;
        let freq = self.config.heartbeat.as_secs_f64();
        self.events.send(kind, crate::events::worker_fields(freq, active, self.stats.finished()));
    }

    /// The lowest size remote control may shrink the pool to.
    pub(crate) fn pool_floor(&self) -> usize {
        self.autoscaler.as_ref().map_or(1, |a| a.bounds().1)
    }

    /// Tasks held now: started or waiting with a slot, and reserved without one (the
    /// autoscaler's load).
    pub(crate) fn held(&self) -> usize {
        self.pool.held() + self.intake.reserved().len()
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

    /// Runs until `shutdown` resolves (or remote control's `shutdown`), then shuts down gracefully;
    /// its `worker-offline` event has been handed to the broker when this returns.
    pub async fn run_until(self, shutdown: impl std::future::Future<Output = ()>) -> Result<(), WorkerError> {
        let cfg = self.config;
        let cap = max_encoded_size(self.app.config().max_message_size);
        let intake = Intake::new(self.app.clone(), cfg.prefetch(), cap, self.stats.clone());
        let (stop_tx, stop_rx) = watch::channel(false);
        let (hard_tx, hard_rx) = watch::channel(false);
        let clock = Arc::new(LamportClock::default());
        let events = EventDispatcher::with_clock(self.app.clone(), &cfg.hostname, clock.clone());
        let (remote_stop, mut remote_stopped) = watch::channel(false);
        let autoscaler = cfg.autoscale.map(|(max, min)| Autoscaler::new(max, min, cfg.autoscale_keepalive));
        let shared = Arc::new(Shared {
            events,
            task_events: AtomicBool::new(cfg.events),
            clock,
            revoked: Default::default(),
            revoked_stamps: Default::default(),
            requests: Default::default(),
            rate_overrides: Default::default(),
            time_limits: Default::default(),
            totals: Default::default(),
            remote_stop,
            started: std::time::Instant::now(),
            app: self.app,
            pool: Pool::new(cfg.initial_pool()),
            autoscaler,
            intake,
            config: cfg.clone(),
            limits: RateLimits::default(),
            stats: self.stats,
            shutdown: stop_rx,
            hard_stop: hard_rx,
        });
        // A delivery that arrives while nothing waits and a slot is free starts at once.
        let weak = Arc::downgrade(&shared);
        shared.intake.set_starter(Starter(Arc::new(move |r: Reservation| {
            let Some(w) = weak.upgrade() else { return Some(r) };
            match w.pool.try_acquire() {
                Some(slot) => {
                    tokio::spawn(Box::pin(handle(w, r, slot)));
                    None
                }
                None => Some(r),
            }
        })));
        // Revokes stored for workers that start later.
        for id in crate::control::stored_revoked(&shared.app).await.into_keys() {
            shared.revoked.add(&id);
        }
        // Listening for remote control before "ready" (a broker without broadcasts has none).
        let control = match shared.app.broker().subscribe(&crate::control::request_exchange(), "").await {
            Ok(requests) => Some(tokio::spawn(crate::control::serve(shared.clone(), requests))),
            Err(e) => {
                tracing::debug!(error = %e, "remote control unavailable");
                None
            }
        };
        let names: Vec<_> = registry::tasks().iter().map(|e| e.name).collect();
        tracing::info!(
            hostname = %cfg.hostname, queues = ?cfg.queues, concurrency = shared.pool.size(),
            autoscale = ?cfg.autoscale, prefetch = cfg.prefetch(), tasks = ?names, "worker ready"
        );
        shared.worker_event("worker-online");
        // Consuming starts once the worker is online: its first task events follow worker-online.
        let queues = cfg.queues.iter().map(|q| QueueSpec::named(q)).collect();
        if let Err(e) = shared.intake.begin(queues).await {
            if let Some(c) = control {
                c.abort();
            }
            shared.worker_event("worker-offline");
            shared.events.flush(Duration::from_secs(5)).await;
            return Err(e.into());
        }
        let heartbeat = {
            let shared = shared.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(shared.config.heartbeat.max(Duration::from_millis(100)));
                tick.tick().await;
                loop {
                    tick.tick().await;
                    shared.worker_event("worker-heartbeat");
                }
            })
        };
        let autoscaling = shared.autoscaler.is_some().then(|| tokio::spawn(autoscale(shared.clone())));
        // Made once, not per delivery: each `wait_for` registers a waiter anew.
        let stop = async {
            tokio::select! {
                _ = shutdown => {}
                _ = remote_stopped.wait_for(|s| *s) => {}
                _ = shared.intake.ended() => {}
            }
        };
        tokio::pin!(stop);
        let reserved = shared.intake.reserved().clone();
        // A slot first, then the oldest reserved delivery: deliveries start in the order the
        // broker gave them. Each running task holds its slot until its delivery is settled.
        'consume: loop {
            let slot = tokio::select! {
                biased;
                _ = &mut stop => break 'consume,
                s = shared.pool.acquire() => match s {
                    Some(s) => s,
                    None => break 'consume,
                },
            };
            let next = loop {
                if let Some(r) = reserved.pop() {
                    break r;
                }
                tokio::select! {
                    biased;
                    _ = &mut stop => break 'consume,
                    _ = reserved.arrived() => {}
                }
            };
            // Boxed: the task cell then moves a pointer, not the whole future.
            tokio::spawn(Box::pin(handle(shared.clone(), next, slot)));
        }
        tracing::info!(in_flight = shared.pool.held(), "worker shutting down: no new deliveries");
        let _ = stop_tx.send(true);
        shared.intake.stop().await;
        let grace = tokio::time::sleep(cfg.shutdown_grace);
        tokio::pin!(grace);
        let all_ended = shared.pool.idle();
        tokio::pin!(all_ended);
        loop {
            tokio::select! {
                _ = &mut all_ended => break,
                _ = &mut grace, if !*hard_tx.borrow() => {
                    tracing::warn!(still_running = shared.pool.held(), "grace period over: returning running tasks to the queue");
                    let _ = hard_tx.send(true);
                }
            }
        }
        shared.intake.closed().await;
        heartbeat.abort();
        if let Some(a) = autoscaling {
            a.abort();
        }
        if let Some(c) = control {
            c.abort();
        }
        shared.worker_event("worker-offline");
        if !shared.events.flush(Duration::from_secs(5)).await {
            tracing::warn!("worker-offline could not be sent within 5 s");
        }
        tracing::info!("worker stopped");
        Ok(())
    }
}

/// Resizes the pool to the load every second, and as soon as deliveries arrive (see
/// [`crate::pool`]); a grown pool consumes with the larger prefetch its max allows from the start.
async fn autoscale(w: Arc<Shared>) {
    let Some(scaler) = w.autoscaler.as_ref() else { return };
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = w.intake.reserved().pushed() => {}
        }
        scaler.scale(&w.pool, w.held());
    }
}

async fn requeue(w: &Shared, d: Delivery) {
    w.stats.requeued.fetch_add(1, Ordering::Relaxed);
    if let Err(e) = d.requeue().await {
        tracing::error!(error = %e, "could not return a delivery to its queue; it comes back after the visibility timeout");
    }
}

async fn handle(w: Arc<Shared>, reservation: Reservation, slot: Slot) {
    // Held until the delivery is settled: its consumer stays open until then.
    let Reservation { delivery: mut d, open: _open, .. } = reservation;
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
    process(w, d, msg, slot).instrument(span).await
}

/// Waits for `until` (a near eta, a rate limit) holding the slot, listed as `inspect reserved`
/// shows it; a revoke wakes it early (true, as when `until` resolves: the caller then finds it
/// revoked). False when the worker shuts down first.
async fn wait_listed(
    w: &Shared,
    msg: &Arc<Message>,
    name: &'static str,
    delivery: &DeliveryInfo,
    until: impl std::future::Future<Output = ()>,
) -> bool {
    let (wake, woken) = oneshot::channel::<()>();
    let held = Held {
        msg: msg.clone(),
        name,
        delivery: delivery.clone(),
        started: None,
        acknowledged: false,
        terminate: Some(wake),
    };
    w.requests.wait(held);
    // A dropped sender (the request left the list) never wakes it.
    let woken = async {
        if woken.await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    let waited = tokio::select! {
        _ = until => true,
        _ = woken => true,
        _ = stopped(w.shutdown.clone()) => false,
    };
    w.requests.unwait(&msg.headers.id);
    waited
}

/// Runs one delivery holding a concurrency slot (released early when it does not run).
async fn process(w: Arc<Shared>, d: Delivery, msg: Message, _slot: Slot) {
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
    if w.revoked.contains(&msg.headers.id) || w.revoked_stamps.matches(&msg) {
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
    let delivery = DeliveryInfo { queue: d.queue.clone(), redelivered: d.redelivered };
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
                    w.requests.schedule(&msg, entry.name, &w.config.hostname, &delivery, eta);
                }
                Err(e) => {
                    tracing::error!(error = %e, "could not defer; the message comes back (to its queue, or after the visibility timeout)")
                }
            }
            return;
        }
        if !wait_listed(&w, &msg, entry.name, &delivery, tokio::time::sleep(wait)).await {
            Box::pin(requeue(&w, d)).await;
            return;
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
        if !wait_listed(&w, &msg, entry.name, &delivery, Box::pin(w.limits.acquire(entry.name, interval))).await {
            Box::pin(requeue(&w, d)).await;
            return;
        }
    }
    if *w.shutdown.borrow() {
        Box::pin(requeue(&w, d)).await;
        return;
    }
    // Revoked while it waited for its eta or rate limit.
    if (msg.headers.eta.is_some() || interval.is_some())
        && (w.revoked.contains(&msg.headers.id) || w.revoked_stamps.matches(&msg))
    {
        tracing::info!("revoked while waiting: not run");
        Box::pin(revoke(&w, d, &msg, entry, Revocation::Revoked)).await;
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
    // The message's own limits first, then `control time_limit`'s, then the task's (as Celery).
    let set = w.time_limits.lock().unwrap_or_else(|p| p.into_inner()).get(entry.name).copied();
    let (task_soft, task_hard) = match set {
        Some(l) => (l.soft, l.hard),
        None => (opts.soft_time_limit, opts.time_limit),
    };
    let soft = msg.headers.soft_time_limit.or(task_soft).and_then(celery_core::clock::positive_secs);
    let hard = msg.headers.time_limit.or(task_hard).and_then(celery_core::clock::positive_secs);
    let embed = body.embed;
    let args = TaskArgs { args: body.args, kwargs: body.kwargs };
    let started = std::time::Instant::now();
    crate::metrics::received(entry.name);
    crate::metrics::started();
    w.event("task-started", || serde_json::json!({"uuid": msg.headers.id}));
    w.stats.active.fetch_add(1, Ordering::Relaxed);
    *w.totals.lock().unwrap_or_else(|p| p.into_inner()).entry(entry.name).or_default() += 1;
    let (terminate, terminated) = oneshot::channel();
    w.requests.start(Held {
        msg: msg.clone(),
        name: entry.name,
        delivery,
        started: Some(started),
        acknowledged: !opts.acks_late,
        terminate: Some(terminate),
    });
    let outcome = execute::run(entry, ctx, args, soft, hard, w.hard_stop.clone(), terminated).await;
    w.requests.finish(&msg.headers.id);
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

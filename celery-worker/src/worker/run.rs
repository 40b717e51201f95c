//! A worker's run from start to stop: it builds the shared state, starts remote control, the
//! heartbeat and the autoscaler, goes online, consumes until told to stop, then shuts down.
//!
//! Consuming: a slot first, then the oldest reserved delivery, so deliveries start in the order
//! the broker gave them (a delivery that arrives while nothing waits and a slot is free is
//! started at once by the intake's [`Starter`]); each runs as its own tokio task
//! ([`super::lifecycle`]) holding its slot until its delivery is settled.
//!
//! Shutdown, warm then cold: stop fetching and return reserved and prefetched unstarted
//! deliveries to their queues; give running tasks the grace period; when it is over, set the hard
//! stop, which abandons what still runs and returns it to its queue. Once every consumer closed,
//! the `worker-offline` event is flushed to the broker.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use celery_core::capability::Capabilities;
use celery_core::protocol::max_encoded_size;
use celery_core::routing::QueueNames;
use celery_core::{registry, App};
use tokio::sync::watch;

use super::intake::{Intake, QueueSpec, Reservation, Starter};
use super::key_slots;
use super::lifecycle::handle;
use super::pool::{Autoscaler, Pool};
use super::rate_limit::RateLimits;
use super::shared::Shared;
use super::{WorkerConfig, WorkerError, WorkerStats};
use crate::events::{EventDispatcher, LamportClock};

/// Runs a worker until `shutdown` resolves (or remote control's `shutdown`, or its consumer
/// ends), then shuts it down gracefully.
pub(super) async fn run_until(
    app: App,
    cfg: WorkerConfig,
    stats: Arc<WorkerStats>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), WorkerError> {
    app.broker().set_worker_name(&cfg.hostname);
    match app.broker().fair_queues() {
        Some(fair) => fair.set_fairness_weights(cfg.fairness_weights.clone()),
        None if !cfg.fairness_weights.is_empty() => tracing::warn!(
            broker = app.broker().kind(),
            "this broker has no fair queues: --fairness-weight is ignored (a task sent with a fairness key is refused \
             at send; use the built-in log broker or Redis)"
        ),
        None => {}
    }
    let cap = max_encoded_size(app.config().max_message_size);
    let intake = Intake::new(app.clone(), cfg.prefetch(), cap, stats.clone());
    let (stop_tx, stop_rx) = watch::channel(false);
    let (hard_tx, hard_rx) = watch::channel(false);
    let clock = Arc::new(LamportClock::default());
    let events = EventDispatcher::with_clock(app.clone(), &cfg.hostname, clock.clone());
    let (remote_stop, mut remote_stopped) = watch::channel(false);
    let autoscaler = cfg.autoscale.map(|(max, min)| Autoscaler::new(max, min, cfg.autoscale_keepalive));
    // Decided once, so that a task's STARTED and its outcome go the same way.
    let batch_stores = app.backend().store_batches().is_some() && !celery_core::trace::enabled();
    let shared = Arc::new(Shared {
        events,
        task_events: AtomicBool::new(cfg.events),
        clock,
        revoked: Default::default(),
        revoked_stamps: Default::default(),
        requests: Default::default(),
        rate_overrides: Default::default(),
        cluster_rates: Default::default(),
        time_limits: Default::default(),
        totals: Default::default(),
        remote_stop,
        started: std::time::Instant::now(),
        app,
        pool: Pool::new(cfg.initial_pool()),
        autoscaler,
        intake,
        config: cfg.clone(),
        limits: RateLimits::default(),
        held_slots: Default::default(),
        stores: Default::default(),
        batch_stores,
        stats,
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
    // Listening for remote control before "ready".
    let control = crate::control::start(&shared).await;
    let names: Vec<_> = registry::tasks().iter().map(|e| e.name).collect();
    tracing::info!(
        hostname = %cfg.hostname, queues = %QueueNames(&cfg.queues), concurrency = shared.pool.size(),
        autoscale = ?cfg.autoscale, prefetch = cfg.prefetch(), tasks = ?names,
        broker = shared.app.broker().kind(),
        broker_offers = %Capabilities::of_broker(shared.app.broker().as_ref()),
        backend = shared.app.backend().kind(),
        backend_offers = %Capabilities::of_backend(shared.app.backend().as_ref()),
        "worker ready"
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
    let heartbeat = tokio::spawn(heartbeat(shared.clone()));
    let clustered = key_slots::cluster_rated_tasks();
    if !clustered.is_empty() && shared.app.broker().rate_buckets().is_none() {
        tracing::error!(
            broker = shared.app.broker().kind(), tasks = ?clustered,
            "this broker cannot hold cluster-wide rate limits: these tasks are rejected (use the built-in log broker, Redis or PostgreSQL)"
        );
    }
    let mut keyed = key_slots::keyed_tasks();
    if !cfg.key_limits.is_empty() {
        keyed.push("(--key-limit)");
    }
    let upkeep = match (keyed.is_empty(), shared.app.broker().key_slots().is_some()) {
        (false, true) => Some(tokio::spawn(key_slots::upkeep_loop(
            shared.app.broker().clone(),
            shared.held_slots.clone(),
            cfg.key_lease,
        ))),
        (false, false) => {
            tracing::error!(
                broker = shared.app.broker().kind(), tasks = ?keyed,
                "this broker cannot enforce key_concurrency: tasks of these sent with a concurrency key are rejected \
                 (use the built-in log broker, Redis or PostgreSQL)"
            );
            None
        }
        (true, _) => None,
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
    consume(&shared, stop).await;
    tracing::info!(in_flight = shared.pool.held(), "worker shutting down: no new deliveries");
    let _ = stop_tx.send(true);
    shared.intake.stop().await;
    drain(&shared, &hard_tx).await;
    shared.held_slots.give_back_spares_now(shared.app.broker(), Duration::from_secs(5)).await;
    shared.intake.closed().await;
    heartbeat.abort();
    if let Some(s) = upkeep {
        s.abort();
    }
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
    let ev = &shared.events;
    tracing::info!(
        sent = ev.sent(),
        broadcasts = ev.broadcasts(),
        dropped = ev.dropped(),
        lost = ev.lost(),
        "events: handed to the broker (dropped: the sender was behind; lost: the broker refused them)"
    );
    tracing::info!("worker stopped");
    Ok(())
}

/// Starts reserved deliveries in order as slots free, until `stop` resolves (or the pool closes).
async fn consume(shared: &Arc<Shared>, stop: impl std::future::Future<Output = ()>) {
    tokio::pin!(stop);
    let reserved = shared.intake.reserved().clone();
    // A slot first, then the oldest reserved delivery: deliveries start in the order the
    // broker gave them. Each running task holds its slot until its delivery is settled.
    loop {
        let slot = tokio::select! {
            biased;
            _ = &mut stop => return,
            s = shared.pool.acquire() => match s {
                Some(s) => s,
                None => return,
            },
        };
        let next = loop {
            if let Some(r) = reserved.pop() {
                break r;
            }
            tokio::select! {
                biased;
                _ = &mut stop => return,
                _ = reserved.arrived() => {}
            }
        };
        // Boxed: the task cell then moves a pointer, not the whole future.
        tokio::spawn(Box::pin(handle(shared.clone(), next, slot)));
    }
}

/// Waits for the running tasks to end; once the grace period is over, sets the hard stop (they
/// are abandoned and return to their queues) and waits for them to have done so.
async fn drain(shared: &Shared, hard_tx: &watch::Sender<bool>) {
    let grace = tokio::time::sleep(shared.config.shutdown_grace);
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
}

/// Sends `worker-heartbeat` every `config.heartbeat` (at most ten a second).
async fn heartbeat(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(shared.config.heartbeat.max(Duration::from_millis(100)));
    tick.tick().await;
    loop {
        tick.tick().await;
        shared.worker_event("worker-heartbeat");
    }
}

/// Resizes the pool to the load every second, and as soon as deliveries arrive (see
/// [`super::pool`]); a grown pool consumes with the larger prefetch its max allows from the start.
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

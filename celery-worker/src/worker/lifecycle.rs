//! A task from its delivery to its run: decode, the checks that may keep it from running
//! (registered, revoked, already done, expired), its eta and rate limit, then the run itself
//! with its time limits. What its outcome leads to is [`super::outcome`]'s.
//!
//! Every step holds the concurrency slot the delivery was taken with (so deliveries start in
//! broker order), and the delivery itself until it is settled, which keeps its consumer open
//! ([`super::intake`]).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use celery_core::backend::TaskMeta;
use celery_core::protocol::{max_encoded_size, Message, TaskBody};
use celery_core::registry::{self, TaskEntry};
use celery_core::sync::lock;
use celery_core::task::TaskArgs;
use celery_core::{Delivery, ProtocolError, TaskContext, TaskError, TaskOptions, TaskState};
use chrono::{DateTime, Utc};
use tokio::sync::{oneshot, watch};
use tracing::Instrument;

use super::execute;
use super::intake::Reservation;
use super::key_slots::{self, KeyStep};
use super::outcome::{
    self, chord_member, reject, requeue, revoke, settle, task_meta, Rejected, Revocation, INVALID_TASK,
};
use super::pool::Slot;
use super::reports::TaskReports;
use super::requests::{DeliveryInfo, Held};
use super::shared::Shared;

/// An eta closer than this is waited for in the worker instead of going back to the broker.
pub(crate) const LOCAL_ETA_WAIT: Duration = Duration::from_secs(1);
/// How long a task whose key slot could not be taken (nor the task parked) waits in its queue.
const KEY_RETRY: Duration = Duration::from_secs(1);

/// Takes a reservation apart and decodes its message; one too large or undecodable is rejected.
pub(super) async fn handle(w: Arc<Shared>, reservation: Reservation, slot: Slot) {
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
        Ok(m) => Arc::new(m),
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

/// The checks before a delivery runs, then its eta and rate limit, holding a concurrency slot
/// (released early when it does not run).
async fn process(w: Arc<Shared>, d: Delivery, msg: Arc<Message>, _slot: Slot) {
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
    if is_revoked(&w, &msg) {
        tracing::info!("revoked: not run");
        Box::pin(revoke(&w, d, &msg, entry, Revocation::Revoked)).await;
        return;
    }
    // An outbox relay sends a task again after a crash with `redelivered` in its headers.
    let maybe_done = d.redelivered || msg.headers.says_redelivered();
    if let Some(done) = if maybe_done { already_succeeded(&w, &msg).await } else { None } {
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
            defer(&w, d, &msg, entry, &delivery, eta).await;
            return;
        }
        if !wait_listed(&w, &msg, entry.name, &delivery, tokio::time::sleep(wait)).await {
            Box::pin(requeue(&w.stats, d)).await;
            return;
        }
    }
    let opts = (entry.options)();
    let interval = rate_interval(&w, entry.name, opts.rate_limit);
    if let Some(interval) = interval {
        let waited = if cluster_scoped(&w, entry.name, &opts) {
            match key_slots::cluster_wait(&w, entry.name, interval).await {
                Ok(wait) => wait_listed(&w, &msg, entry.name, &delivery, tokio::time::sleep(wait)).await,
                Err(e @ celery_core::BrokerError::Unsupported { .. }) => {
                    let err = TaskError::new("ClusterRateUnsupported", e.to_string());
                    Box::pin(reject(&w, d, Some(Rejected::of(&msg)), &err)).await;
                    return;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cluster-wide rate limit unreachable: this worker's own limit applies");
                    wait_listed(&w, &msg, entry.name, &delivery, Box::pin(w.limits.acquire(entry.name, interval))).await
                }
            }
        } else {
            wait_listed(&w, &msg, entry.name, &delivery, Box::pin(w.limits.acquire(entry.name, interval))).await
        };
        if !waited {
            Box::pin(requeue(&w.stats, d)).await;
            return;
        }
    }
    if *w.shutdown.borrow() {
        Box::pin(requeue(&w.stats, d)).await;
        return;
    }
    // Revoked while it waited for its eta or rate limit.
    if (msg.headers.eta.is_some() || interval.is_some()) && is_revoked(&w, &msg) {
        tracing::info!("revoked while waiting: not run");
        Box::pin(revoke(&w, d, &msg, entry, Revocation::Revoked)).await;
        return;
    }
    // Last, right before it runs: a task parked here waits in the broker, holding nothing.
    let slot = match key_slots::admit(&w, &d, &msg, &opts).await {
        KeyStep::Free => None,
        KeyStep::Held(slot) => Some(slot),
        KeyStep::Parked => {
            tracing::debug!("its concurrency key is at its limit: parked by the broker until a slot frees");
            w.stats.parked.fetch_add(1, Ordering::Relaxed);
            settle(d.ack().await);
            return;
        }
        KeyStep::Failed(e @ celery_core::BrokerError::Unsupported { .. }) => {
            let err = TaskError::new("KeyConcurrencyUnsupported", e.to_string());
            Box::pin(reject(&w, d, Some(Rejected::of(&msg)), &err)).await;
            return;
        }
        KeyStep::Failed(e) => {
            // Back in its queue for a while (a broker refusing to park more, or unreachable),
            // so that it is not taken again at once, again and again.
            tracing::warn!(error = %e, "could not take a key slot: the task goes back to its queue for {KEY_RETRY:?}");
            w.stats.requeued.fetch_add(1, Ordering::Relaxed);
            let until = Utc::now() + KEY_RETRY;
            if let Err(e) = d.defer(&msg, until).await {
                tracing::error!(error = %e, "could not return a delivery to its queue; it comes back after the visibility timeout");
            }
            return;
        }
    };
    if celery_core::trace::enabled() {
        // Traced: the queue wait ends and the `run` span starts (the message's trace continues).
        let span = celery_core::trace::run_span(&msg.headers, &delivery.queue, &w.config.hostname);
        celery_core::trace::record_queue_wait(&msg.headers, &delivery.queue, Utc::now());
        run(&w, d, msg, entry, opts, body, delivery).instrument(span).await;
    } else {
        run(&w, d, msg, entry, opts, body, delivery).await;
    }
    if let Some(slot) = slot {
        slot.release();
    }
}

/// Runs the task: acks first unless `acks_late`, stores STARTED, runs it within its time limits
/// (listed as active meanwhile), then hands its outcome to [`outcome::conclude`].
async fn run(
    w: &Arc<Shared>,
    d: Delivery,
    msg: Arc<Message>,
    entry: &'static TaskEntry,
    opts: TaskOptions,
    body: TaskBody,
    delivery: DeliveryInfo,
) {
    let mut d = Some(d);
    if !opts.acks_late {
        if let Some(d) = d.take() {
            settle(d.ack().await);
        }
    }
    let ignore = msg.headers.ignore_result || opts.ignore_result;
    let mut started_store = None;
    if w.config.track_started && !ignore {
        let mut m = TaskMeta::new(
            &msg.headers.id,
            TaskState::Started,
            serde_json::json!({"hostname": w.config.hostname, "pid": std::process::id()}),
        );
        m.worker = Some(w.config.hostname.clone());
        started_store = Box::pin(outcome::store_started(w, &msg, entry, m)).await;
    }
    let reports = Arc::new(TaskReports { w: w.clone(), msg: msg.clone(), entry });
    let ctx = TaskContext::new(&msg.headers.id, entry.name, msg.headers.retries)
        .with_eta(msg.headers.eta)
        .with_state_sink(reports);
    let (soft, hard) = time_limits(w, &msg, entry, &opts);
    let embed = body.embed;
    let args = TaskArgs { args: body.args, kwargs: body.kwargs };
    let started = std::time::Instant::now();
    crate::metrics::received(entry.name);
    crate::metrics::started();
    w.event("task-started", || serde_json::json!({"uuid": msg.headers.id}));
    w.stats.active.fetch_add(1, Ordering::Relaxed);
    *lock(&w.totals).entry(entry.name).or_default() += 1;
    let (terminate, terminated) = oneshot::channel();
    w.requests.start(Held {
        msg: msg.clone(),
        name: entry.name,
        delivery,
        started: Some(started),
        acknowledged: !opts.acks_late,
        terminate: Some(terminate),
    });
    let ran = execute::run(entry, ctx, args, soft, hard, w.hard_stop.clone(), terminated).await;
    drop(started_store);
    w.requests.finish(&msg.headers.id);
    w.stats.active.fetch_sub(1, Ordering::Relaxed);
    let runtime = started.elapsed();
    crate::metrics::finished(entry.name, runtime);
    outcome::conclude(w, d, &msg, entry, &embed, ran, runtime).await
}

/// An eta more than [`LOCAL_ETA_WAIT`] away: RECEIVED stored (when tracked), then the delivery
/// handed to the broker's delay store and listed as scheduled.
async fn defer(
    w: &Shared,
    d: Delivery,
    msg: &Message,
    entry: &'static TaskEntry,
    delivery: &DeliveryInfo,
    eta: DateTime<Utc>,
) {
    tracing::debug!(%eta, "eta is ahead: held by the broker until due");
    let received = w.config.track_started.then(|| {
        task_meta(w, msg, entry, TaskMeta::new(&msg.headers.id, TaskState::Received, serde_json::Value::Null))
    });
    if let Some(meta) = received.flatten() {
        // Stored before the deferral, so it never lands after a state the run stores; one
        // attempt only (no backoff): the message must not wait on an unreachable backend.
        if let Err(e) = w.app.backend().store(&meta).await {
            tracing::warn!(error = %e, "could not store RECEIVED; deferring anyway");
        }
    }
    match d.defer(msg, eta).await {
        Ok(()) => {
            w.stats.deferred.fetch_add(1, Ordering::Relaxed);
            w.requests.schedule(msg, entry.name, &w.config.hostname, delivery, eta);
        }
        Err(e) => {
            tracing::error!(error = %e, "could not defer; the message comes back (to its queue, or after the visibility timeout)")
        }
    }
}

/// Revoked by id or by stamp (remote control).
fn is_revoked(w: &Shared, msg: &Message) -> bool {
    w.revoked.contains(&msg.headers.id) || w.revoked_stamps.matches(msg)
}

/// The interval between starts of `task`: `control rate_limit`'s, else the task's own (`None`:
/// unlimited; a rate that does not parse is ignored with a warning).
fn rate_interval(w: &Shared, task: &'static str, own: Option<&'static str>) -> Option<Duration> {
    let overridden = lock(&w.rate_overrides).get(task).copied();
    match (overridden, own) {
        (Some(set), _) => set,
        (None, Some(rate)) => celery_core::rate::parse_rate(rate)
            .map_err(|e| tracing::warn!(error = %e, "ignoring the task's rate limit"))
            .ok(),
        (None, None) => None,
    }
}

/// Whether `task`'s rate limit is cluster-wide: `control rate_limit --cluster`'s when one is set,
/// else the task's `rate_scope`.
fn cluster_scoped(w: &Shared, task: &'static str, opts: &TaskOptions) -> bool {
    if lock(&w.rate_overrides).contains_key(task) {
        return lock(&w.cluster_rates).contains(task);
    }
    opts.rate_scope == Some("cluster")
}

/// The soft and hard time limits of this run: the message's own first, then `control
/// time_limit`'s, then the task's (as Celery).
fn time_limits(
    w: &Shared,
    msg: &Message,
    entry: &'static TaskEntry,
    opts: &TaskOptions,
) -> (Option<Duration>, Option<Duration>) {
    let set = lock(&w.time_limits).get(entry.name).copied();
    let (task_soft, task_hard) = match set {
        Some(l) => (l.soft, l.hard),
        None => (opts.soft_time_limit, opts.time_limit),
    };
    let soft = msg.headers.soft_time_limit.or(task_soft).and_then(celery_core::clock::positive_secs);
    let hard = msg.headers.time_limit.or(task_hard).and_then(celery_core::clock::positive_secs);
    (soft, hard)
}

/// The stored SUCCESS of this task id, if any (a redelivery of finished work).
async fn already_succeeded(w: &Shared, msg: &Message) -> Option<TaskMeta> {
    if msg.headers.ignore_result {
        return None;
    }
    w.app.backend().get(&msg.headers.id).await.ok().flatten().filter(|m| m.status == TaskState::Success)
}

/// Resolves once the worker is shutting down.
async fn stopped(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

//! What a task's end leads to: its state stored in the result backend, its delivery settled
//! (acked, returned to its queue, or dead-lettered), its task event sent, and what follows it
//! (the next step of a chain, callbacks or errbacks, and its chord's count).
//!
//! A delivery is acked only once the outcome is stored: one whose result could not be stored
//! (the backend stayed unreachable) goes back to its queue to run again rather than finish
//! without a result. A message refused as bad input is dead-lettered, and nothing it carries is
//! acted on.

use std::sync::atomic::Ordering;
use std::time::Duration;

use celery_core::backend::TaskMeta;
use celery_core::backoff::{retry_countdown, Reconnect};
use celery_core::protocol::Message;
use celery_core::registry::TaskEntry;
use celery_core::routing::Route;
use celery_core::task::TaskErrorKind;
use celery_core::{BackendError, BrokerError, Delivery, ProtocolError, TaskError, TaskState};
use chrono::Utc;
use serde_json::{Map, Value};
use tracing::Instrument;

use super::execute::Outcome;
use super::shared::Shared;
use super::stores::{self, Batched};
use super::{chord, followups, WorkerStats};

/// Celery's exception for a message that is not a task it can read (too large, undecodable).
pub(super) const INVALID_TASK: &str = "InvalidTaskError";

/// Acts on how a run ended; `d` is `None` when the delivery was acked before the run (acks_late
/// off).
pub(super) async fn conclude(
    w: &Shared,
    mut d: Option<Delivery>,
    msg: &Message,
    entry: &'static TaskEntry,
    embed: &Map<String, Value>,
    outcome: Outcome,
    runtime: Duration,
) {
    let opts = (entry.options)();
    if let (Some(held), Outcome::Done(_)) = (&d, &outcome) {
        if !held.is_held().await {
            // This worker stalled past its heartbeat's grace and the broker gave the task to
            // another worker, whose run is the one stored. The ack removes nothing (the lease is
            // gone) but frees the prefetch slot.
            tracing::warn!(id = %msg.headers.id, "the task was given to another worker while this one stalled; its outcome here is not stored");
            if let Some(d) = d.take() {
                settle(d.ack().await);
            }
            return;
        }
    }
    match outcome {
        Outcome::Interrupted => {
            traced("INTERRUPTED", None);
            if let Some(d) = d.take() {
                Box::pin(requeue(&w.stats, d)).await;
            }
        }
        Outcome::Terminated => {
            if let Some(d) = d.take() {
                Box::pin(revoke(w, d, msg, entry, Revocation::Terminated)).await;
            }
        }
        Outcome::Done(Ok(value)) => {
            tracing::debug!(?runtime, "succeeded");
            traced("SUCCESS", None);
            // The rarer steps are boxed: inline, each would grow every task's future by its size.
            let next = followups::after_success(embed);
            let children = if next.is_empty() {
                Vec::new()
            } else {
                let root = msg.headers.root_id.as_deref();
                Box::pin(followups::send_all(&w.app, next, &value, &msg.headers, root)).await
            };
            // The result document only when it is stored (its time stamp and copy cost per task).
            let ignore = msg.headers.ignore_result || opts.ignore_result;
            let stored = if ignore {
                Stored::Yes
            } else {
                let mut meta = TaskMeta::success(&msg.headers.id, value.clone());
                meta.children = children;
                Box::pin(store(w, msg, entry, meta)).await
            };
            if let Some(body) = chord::body_in(msg, embed) {
                Box::pin(chord::member_done(&w.app, msg, body, TaskState::Success, &value)).await;
            }
            w.stats.succeeded.fetch_add(1, Ordering::Relaxed);
            crate::metrics::succeeded(entry.name);
            w.event("task-succeeded", || {
                serde_json::json!({"uuid": msg.headers.id, "result": repr(&value), "runtime": runtime.as_secs_f64()})
            });
            Box::pin(finish(w, d.take(), msg, stored)).await;
        }
        Outcome::Done(Err(err)) => match err.kind() {
            TaskErrorKind::InvalidArguments => {
                // Python raises TypeError for arguments that do not fit; the message is kept too.
                let err = TaskError::new("TypeError", format!("invalid arguments: {}", err.message()));
                traced("REJECTED", Some(&err));
                match d.take() {
                    Some(d) => Box::pin(reject(w, d, Some(Rejected::of(msg)), &err)).await,
                    // Acked before it ran (acks_late off): nothing to dead-letter, but the caller learns why.
                    None => {
                        Box::pin(store_rejection(w, Rejected::of(msg), &err)).await;
                    }
                }
            }
            TaskErrorKind::Retry { countdown } => {
                let countdown = *countdown;
                Box::pin(retry_or_fail(w, d, msg, entry, err, countdown)).await
            }
            TaskErrorKind::Failed if opts.autoretry => Box::pin(retry_or_fail(w, d, msg, entry, err, None)).await,
            _ => Box::pin(fail(w, d, msg, entry, &err)).await,
        },
    }
}

/// Why a task ends REVOKED.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Revocation {
    /// Revoked (remote control) before it started.
    Revoked,
    /// Its `expires` passed before it started.
    Expired,
    /// Revoked with `terminate` while running.
    Terminated,
}

/// Records REVOKED (result, chord, stats, event) and acks the delivery.
pub(super) async fn revoke(w: &Shared, d: Delivery, msg: &Message, entry: &'static TaskEntry, why: Revocation) {
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
    traced("REVOKED", None);
    let terminated = why == Revocation::Terminated;
    w.event("task-revoked", || {
        serde_json::json!({
            "uuid": msg.headers.id, "terminated": terminated, "signum": terminated.then_some("SIGTERM"),
            "expired": why == Revocation::Expired,
        })
    });
    settle(d.ack().await);
}

/// A retry: republished with `retries + 1` and an eta, RETRY stored, then the original acked; a
/// task out of retries fails instead (Celery's `MaxRetriesExceededError` for an explicit retry).
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
    let mut next = msg.retried(eta);
    let queue = d.as_ref().map(|d| d.queue.clone()).unwrap_or_else(|| w.app.config().default_queue.clone());
    // Untraced, the next attempt keeps the message's trace context; traced, it is the retry span's.
    next.headers.extra.remove(celery_core::trace::SENT_AT);
    let span = celery_core::trace::retry_span(&msg.headers, &err);
    celery_core::trace::inject(&span, &mut next.headers);
    let published = w.app.broker().publish(&Route::queue(queue), &next).instrument(span).await;
    if let Err(e) = published {
        tracing::error!(error = %e, "could not republish the retry; returning the message to the queue");
        if let Some(d) = d {
            requeue(&w.stats, d).await;
        }
        return;
    }
    tracing::info!(retries = next.headers.retries, ?delay, reason = %err, "retry scheduled");
    traced("RETRY", None);
    store(w, msg, entry, TaskMeta::error(&msg.headers.id, TaskState::Retry, &err)).await;
    w.stats.retried.fetch_add(1, Ordering::Relaxed);
    crate::metrics::retried(entry.name);
    failed_event(w, "task-retried", &msg.headers.id, &err, err.traceback());
    if let Some(d) = d {
        settle(d.ack().await);
    }
}

/// A final failure: FAILURE stored, errbacks sent, counted into its chord, then settled.
async fn fail(w: &Shared, d: Option<Delivery>, msg: &Message, entry: &'static TaskEntry, err: &TaskError) {
    tracing::warn!(error = %err, "failed");
    traced("FAILURE", Some(err));
    let meta = TaskMeta::error(&msg.headers.id, TaskState::Failure, err);
    let stored = store(w, msg, entry, meta.clone()).await;
    followups::on_failure(&w.app, msg).await;
    chord_member(w, msg, TaskState::Failure, &meta.result).await;
    w.stats.failed.fetch_add(1, Ordering::Relaxed);
    crate::metrics::failed(entry.name);
    failed_event(w, "task-failed", &msg.headers.id, err, err.traceback());
    finish(w, d, msg, stored).await;
}

/// `task-failed` or `task-retried` with the exception and its traceback.
fn failed_event(w: &Shared, kind: &str, id: &str, err: &TaskError, traceback: impl serde::Serialize) {
    w.event(kind, || serde_json::json!({"uuid": id, "exception": err.to_string(), "traceback": traceback}));
}

/// What is known of a rejected message: enough to store its FAILURE.
#[derive(Debug, Clone, Copy)]
pub(super) struct Rejected<'a> {
    id: &'a str,
    task: Option<&'a str>,
    reply_to: Option<&'a str>,
}

impl<'a> Rejected<'a> {
    pub(super) fn of(msg: &'a Message) -> Rejected<'a> {
        Rejected { id: &msg.headers.id, task: Some(&msg.headers.task), reply_to: msg.properties.reply_to.as_deref() }
    }

    /// The task a decoding error still names ([`ProtocolError::InvalidHeaders`]).
    pub(super) fn named_by(e: &'a ProtocolError) -> Option<Rejected<'a>> {
        match e {
            ProtocolError::InvalidHeaders { id, task, reply_to, .. } => {
                Some(Rejected { id, task: task.as_deref(), reply_to: reply_to.as_deref() })
            }
            _ => None,
        }
    }
}

/// Bad input: never run; FAILURE stored when the id is known (so a waiting caller fails fast) with
/// `err` (Celery's `NotRegistered`, `InvalidTaskError`, or Python's `TypeError` for arguments that
/// do not fit), and `task-failed` sent so that Flower shows the final state; dead-lettered with
/// `err`'s message as the reason. Nothing it carries is acted on: no callbacks, errbacks, chain
/// steps or chord counts (its embedded workflow is input that was just refused).
pub(super) async fn reject(w: &Shared, d: Delivery, known: Option<Rejected<'_>>, err: &TaskError) {
    tracing::error!(queue = %d.queue, reason = err.message(), "rejected message: dead-lettered");
    if let Some(k) = known {
        store_rejection(w, k, err).await;
    }
    dead_letter(w, d, err).await;
}

/// Dead-letters `d` with `err`'s message as the reason (counted in `rejected`).
async fn dead_letter(w: &Shared, d: Delivery, err: &TaskError) {
    w.stats.rejected.fetch_add(1, Ordering::Relaxed);
    crate::metrics::dead_lettered(&d.queue);
    settle(d.dead_letter(err.message()).await);
}

/// Stores FAILURE with `err` for a rejected message and sends `task-failed`; nothing else.
async fn store_rejection(w: &Shared, k: Rejected<'_>, err: &TaskError) -> Stored {
    let mut meta = TaskMeta::error(k.id, TaskState::Failure, err);
    meta.name = k.task.map(str::to_owned);
    meta.reply_to = k.reply_to.map(str::to_owned);
    let stored = store_meta(w, meta).await;
    failed_event(w, "task-failed", k.id, err, err.to_string());
    stored
}

/// The result backend refused a task's outcome for what it holds (see [`finish`]): FAILURE with
/// Celery's `BackendStoreError` is stored in its place (its caller learns at once) and the
/// delivery dead-lettered with a reason that says the task ran (what it sent on, a chain's next
/// step or a chord's count, went out before its outcome was refused). When that FAILURE could not
/// be stored either because the backend is unreachable, the delivery goes back to its queue to run
/// again rather than leave its caller waiting. Acked before it ran (acks_late off): only the
/// FAILURE.
async fn refused(w: &Shared, d: Option<Delivery>, msg: &Message, e: &BackendError) {
    let err = TaskError::new("BackendStoreError", format!("the task ran; the result backend refused its outcome: {e}"));
    tracing::error!(error = %e, "the result backend refused the task's outcome");
    let stored = store_rejection(w, Rejected::of(msg), &err).await;
    match (d, stored) {
        (Some(d), Stored::No) => requeue(&w.stats, d).await,
        (Some(d), _) => dead_letter(w, d, &err).await,
        (None, _) => {}
    }
}

/// Acks a delivery whose outcome is stored; one whose outcome could not be stored (the backend
/// stayed unreachable) goes back to its queue instead, so the task runs again rather than finish
/// without a result. One whose outcome the backend refused for what it holds (a task id longer
/// than its column, a result over its size limit) would be refused again however often it ran:
/// see [`refused`]. `d` is `None` when the delivery was acked before the run.
async fn finish(w: &Shared, d: Option<Delivery>, msg: &Message, stored: Stored) {
    match (stored, d) {
        (Stored::Refused(e), d) => Box::pin(refused(w, d, msg, &e)).await,
        (Stored::Yes, Some(d)) => settle(d.ack().await),
        (Stored::No, Some(d)) => {
            tracing::error!("the result could not be stored: the task goes back to its queue to run again");
            requeue(&w.stats, d).await;
        }
        (_, None) => {}
    }
}

/// Returns a delivery to its queue (counted in `requeued`).
pub(super) async fn requeue(stats: &WorkerStats, d: Delivery) {
    stats.requeued.fetch_add(1, Ordering::Relaxed);
    if let Err(e) = d.requeue().await {
        tracing::error!(error = %e, "could not return a delivery to its queue; it comes back after the visibility timeout");
    }
}

/// Logs a delivery that could not be settled (the broker hands it out again later).
pub(super) fn settle(r: Result<(), BrokerError>) {
    if let Err(e) = r {
        tracing::error!(error = %e, "could not settle a delivery; it comes back after the visibility timeout");
    }
}

/// What became of a task's state sent to the result backend.
#[derive(Debug)]
pub(super) enum Stored {
    /// Stored, or nothing to store (the task ignores results).
    Yes,
    /// Not stored: the backend stayed unreachable, or failed in a way that may pass later.
    No,
    /// Refused for what the state holds ([`BackendError::is_message_fault`]): storing it again
    /// gives the same answer.
    Refused(BackendError),
}

/// Stores a task's state unless it ignores results.
pub(super) async fn store(w: &Shared, msg: &Message, entry: &'static TaskEntry, meta: TaskMeta) -> Stored {
    match task_meta(w, msg, entry, meta) {
        Some(meta) => store_meta(w, meta).await,
        None => Stored::Yes,
    }
}

/// `meta` with what the message and this worker say about the task; `None` when it ignores results.
pub(super) fn task_meta(w: &Shared, msg: &Message, entry: &'static TaskEntry, mut meta: TaskMeta) -> Option<TaskMeta> {
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

/// Stores a task's STARTED: queued without waiting where states go in batches (the returned
/// store is superseded once the task ends, see [`stores`]), else stored now as [`store`] does.
pub(super) async fn store_started(
    w: &Shared,
    msg: &Message,
    entry: &'static TaskEntry,
    meta: TaskMeta,
) -> Option<stores::StartedStore> {
    if w.batch_stores {
        return task_meta(w, msg, entry, meta).map(|meta| stores::started(&w.app, &w.stores, meta));
    }
    store(w, msg, entry, meta).await;
    None
}

/// Stores a task's state, retrying with backoff while the backend is unreachable (a result is not
/// given up lightly).
async fn store_meta(w: &Shared, meta: TaskMeta) -> Stored {
    let meta = if w.batch_stores {
        match stores::store(&w.app, &w.stores, meta).await {
            Batched::Stored => return Stored::Yes,
            Batched::Failed(meta) => meta,
            Batched::Lost => {
                tracing::error!("the batch holding a task's state ended unanswered (shutdown, or a panic in the backend); not stored");
                return Stored::No;
            }
        }
    } else {
        meta
    };
    let mut reconnect = Reconnect::default();
    let store =
        reconnect.retry(8, "storing a task's result", BackendError::is_retryable, || w.app.backend().store(&meta));
    let stored = if celery_core::trace::enabled() {
        let task = meta.name.as_deref().unwrap_or_default();
        let state = meta.status.to_string();
        let span = celery_core::trace::store_span(task, &meta.task_id, &state, w.app.backend().kind());
        store.instrument(span).await
    } else {
        store.await
    };
    match stored {
        Ok(()) => Stored::Yes,
        Err(e) => {
            tracing::error!(error = %e, state = %meta.status, "could not store the task state");
            if e.is_message_fault() {
                Stored::Refused(e)
            } else {
                Stored::No
            }
        }
    }
}

/// A chord member reached a final state: count it into its chord (see [`super::chord`]).
pub(super) async fn chord_member(w: &Shared, msg: &Message, state: TaskState, result: &Value) {
    if let Some(body) = chord::body_of(msg) {
        chord::member_done(&w.app, msg, &body, state, result).await;
    }
}

/// Records the run's final state on its span (the current one) while tracing.
fn traced(state: &str, error: Option<&TaskError>) {
    if celery_core::trace::enabled() {
        let error = error.map(ToString::to_string);
        celery_core::trace::record_state(&tracing::Span::current(), state, error.as_deref());
    }
}

/// A result as the short text events carry (Celery sends `repr(result)`).
fn repr(v: &Value) -> String {
    let mut s = v.to_string();
    if s.len() > 1024 {
        let cut = (0..=1024).rev().find(|i| s.is_char_boundary(*i)).unwrap_or(0);
        s.truncate(cut);
        s.push_str("...");
    }
    s
}

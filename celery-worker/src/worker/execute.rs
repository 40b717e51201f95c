//! Runs one task: a panic is caught and becomes a FAILURE, the soft limit is signalled to its context,
//! and the hard limit or a revoke with `terminate` abandons it (the task's future is dropped).

use std::time::Duration;

use celery_core::registry::TaskEntry;
use std::panic::AssertUnwindSafe;

use celery_core::task::{panic_payload_error, TaskArgs};
use celery_core::{TaskContext, TaskError};
use futures::FutureExt;
use serde_json::Value;
use tokio::sync::{oneshot, watch};

/// How a run ended.
#[derive(Debug)]
pub(crate) enum Outcome {
    /// The task returned.
    Done(Result<Value, TaskError>),
    /// The worker's grace period ended first; the task was abandoned.
    Interrupted,
    /// Revoked with `terminate` while running; the task was abandoned.
    Terminated,
}

pub(crate) async fn run(
    entry: &'static TaskEntry,
    ctx: TaskContext,
    args: TaskArgs,
    soft: Option<Duration>,
    hard: Option<Duration>,
    mut hard_stop: watch::Receiver<bool>,
    mut terminate: oneshot::Receiver<()>,
) -> Outcome {
    let mut terminable = true;
    let mut task = AssertUnwindSafe((entry.run)(ctx.clone(), args)).catch_unwind();
    let soft_at = soft.map(celery_core::clock::instant_after);
    let hard_at = hard.map(celery_core::clock::instant_after);
    let mut soft_pending = soft_at.is_some();
    loop {
        tokio::select! {
            r = &mut task => {
                return Outcome::Done(r.map_err(panic_payload_error).and_then(|x| x));
            }
            _ = sleep_opt(soft_at), if soft_pending => {
                soft_pending = false;
                tracing::warn!("soft time limit exceeded");
                ctx.signal_soft_time_limit();
            }
            _ = sleep_opt(hard_at), if hard_at.is_some() => {
                let limit = hard.map(|d| d.as_secs_f64()).unwrap_or_default();
                tracing::error!(limit, "hard time limit exceeded; task abandoned");
                return Outcome::Done(Err(TaskError::time_limit_exceeded(limit)));
            }
            r = hard_stop.changed() => {
                if r.is_err() || *hard_stop.borrow() {
                    return Outcome::Interrupted;
                }
            }
            r = &mut terminate, if terminable => match r {
                Ok(()) => {
                    tracing::warn!("revoked with terminate: task abandoned");
                    return Outcome::Terminated;
                }
                Err(_) => terminable = false,
            }
        }
    }
}

async fn sleep_opt(at: Option<tokio::time::Instant>) {
    match at {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

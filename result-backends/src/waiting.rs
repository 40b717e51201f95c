//! Waiting for a task's ready state, shared by the backends that are woken by a notification
//! (Redis's PUB/SUB, PostgreSQL's NOTIFY): read, and until the state is ready or the deadline
//! passes, sleep until woken or for at most a second (the poll that covers a listener that is
//! reconnecting). Reads that fail with a retryable error are retried with backoff until the deadline.

use std::future::Future;
use std::time::Duration;

use celery_core::{BackendError, TaskMeta};
use tokio::sync::watch;
use tokio::time::Instant;

/// Reads with `get` until the state is ready or `deadline` passes; `wake` (when listening) changes
/// whenever the task's state may have. `what` names the backend in logs.
pub(crate) async fn until_ready<F, Fut, W>(
    mut get: F,
    mut wake: Option<&mut watch::Receiver<W>>,
    deadline: Instant,
    what: &str,
) -> Result<Option<TaskMeta>, BackendError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<TaskMeta>, BackendError>>,
{
    let mut backoff = celery_core::backoff::Reconnect::default();
    loop {
        let cur = match get().await {
            Ok(cur) => cur,
            Err(e) if e.is_retryable() && Instant::now() < deadline => {
                backoff.pause(&format!("{what} results read"), &e).await;
                continue;
            }
            Err(e) => return Err(e),
        };
        if cur.as_ref().is_some_and(|m| m.status.is_ready()) || Instant::now() >= deadline {
            return Ok(cur);
        }
        let poll = (Instant::now() + Duration::from_secs(1)).min(deadline);
        match wake.as_deref_mut() {
            Some(rx) => {
                let _ = tokio::time::timeout_at(poll, rx.changed()).await;
            }
            None => tokio::time::sleep_until(poll).await,
        }
    }
}

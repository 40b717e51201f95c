//! Progress and custom states: what a running task reports about itself before it finishes.
//!
//! A task calls [`TaskContext::update_state`](crate::TaskContext::update_state) with a state name
//! (`"PROGRESS"`) and a JSON document (`{"done": 40, "total": 100}`). The worker stores Celery's
//! result document for it (`status` = the state, `result` = the document, as Celery's
//! `self.update_state` does, so Python's `AsyncResult(id).state` / `.info` read it) and sends a
//! `task-progress` event (when task events are on) that the monitor shows as a bar. The caller
//! follows it with [`AsyncResult::progress`](crate::AsyncResult::progress).
//!
//! The worker hands a running task's context a [`StateSink`]; a context without one (a task
//! called directly in a unit test) keeps only the last report ([`TaskContext::last_state`](crate::TaskContext::last_state)).

use std::fmt::Debug;

use async_trait::async_trait;
use serde_json::Value;

use crate::error::BackendError;
use crate::state::TaskState;

/// The largest document one report may carry, in bytes of JSON: a progress report is stored
/// and broadcast on every call, so it stays small.
pub const MAX_REPORT_SIZE: usize = 64 * 1024;

/// Where a running task's reports go (the worker stores them and sends an event).
#[async_trait]
pub trait StateSink: Send + Sync + Debug {
    /// Records that task `task_id` is in `state` with `meta`.
    async fn report(&self, task_id: &str, state: TaskState, meta: &Value) -> Result<(), BackendError>;
}

/// Why [`TaskContext::update_state`](crate::TaskContext::update_state) failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UpdateStateError {
    /// The state name is not one a task may report.
    #[error("invalid task state: {0}")]
    InvalidState(String),
    /// The document is larger than [`MAX_REPORT_SIZE`].
    #[error("state document of {size} bytes is over the limit of {limit}")]
    TooLarge {
        /// Its size in bytes of JSON.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// The result backend did not store it.
    #[error("could not store the task state")]
    Backend(#[from] BackendError),
}

/// Checks a state a task reports: a name Celery would store, and not a ready state (a task
/// finishes by returning, so SUCCESS/FAILURE/REVOKED stored early would end its waiters' wait
/// with a result it has not produced yet).
pub(crate) fn reportable(state: &str) -> Result<TaskState, UpdateStateError> {
    let parsed: TaskState = state.parse().map_err(UpdateStateError::InvalidState)?;
    if parsed.is_ready() {
        return Err(UpdateStateError::InvalidState(format!(
            "{parsed} is a final state: a task reaches it by returning"
        )));
    }
    Ok(parsed)
}

/// A `{"done": n, "total": m}` report read back: the common shape of a `PROGRESS` document.
///
/// ```
/// use celery_core::progress::Progress;
/// let p = Progress::from_meta(&serde_json::json!({"done": 40, "total": 100})).unwrap();
/// assert_eq!((p.done, p.total), (40, Some(100)));
/// assert_eq!(p.fraction(), Some(0.4));
/// // Celery's own examples use current/total.
/// let p = Progress::from_meta(&serde_json::json!({"current": 3, "total": 4})).unwrap();
/// assert_eq!(p.done, 3);
/// assert!(Progress::from_meta(&serde_json::json!("working")).is_none());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Progress {
    /// Steps done.
    pub done: u64,
    /// Steps in all, when known.
    pub total: Option<u64>,
}

impl Progress {
    /// Reads `done` (or Celery's customary `current`) and `total` from a report's document.
    pub fn from_meta(meta: &Value) -> Option<Progress> {
        let done = meta.get("done").or_else(|| meta.get("current"))?.as_u64()?;
        Some(Progress { done, total: meta.get("total").and_then(Value::as_u64) })
    }

    /// `done / total` in 0..=1, when the total is known and not zero.
    pub fn fraction(&self) -> Option<f64> {
        self.total.filter(|t| *t > 0).map(|t| (self.done as f64 / t as f64).clamp(0.0, 1.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_task_reports_running_states_only() {
        assert!(reportable("PROGRESS").unwrap().is_custom());
        assert_eq!(reportable("STARTED").unwrap(), TaskState::Started);
        for ready in ["SUCCESS", "FAILURE", "REVOKED"] {
            assert!(matches!(reportable(ready), Err(UpdateStateError::InvalidState(_))), "{ready}");
        }
        assert!(matches!(reportable("has space"), Err(UpdateStateError::InvalidState(_))));
    }
}

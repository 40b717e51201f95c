//! The result-backend trait and Celery's result document.

use std::fmt::Debug;
use std::time::Duration;

use async_trait::async_trait;
use chrono::Utc;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::error::BackendError;
use crate::protocol::format_time;
use crate::state::TaskState;
use crate::task::TaskError;

/// Stores task states and results; wakes waiters when a result is ready.
///
/// Implementations never overwrite a stored SUCCESS.
///
/// ```no_run
/// # async fn demo(backend: std::sync::Arc<dyn celery_core::ResultBackend>) -> Result<(), celery_core::BackendError> {
/// use std::time::Duration;
/// use celery_core::TaskMeta;
/// backend.store(&TaskMeta::success("id-1", serde_json::json!(5))).await?;
/// let meta = backend.wait("id-1", Duration::from_secs(1)).await?.unwrap();
/// assert_eq!(meta.result, serde_json::json!(5));
/// # Ok(()) }
/// ```
#[async_trait]
pub trait ResultBackend: Send + Sync + Debug {
    /// Stores a state (and wakes waiters when it is ready).
    async fn store(&self, meta: &TaskMeta) -> Result<(), BackendError>;
    /// The stored state, if any.
    async fn get(&self, task_id: &str) -> Result<Option<TaskMeta>, BackendError>;
    /// Waits until the state is ready or `timeout` passes; returns what is stored then.
    async fn wait(&self, task_id: &str, timeout: Duration) -> Result<Option<TaskMeta>, BackendError>;
    /// Deletes the stored state.
    async fn forget(&self, task_id: &str) -> Result<(), BackendError>;

    /// The queue results must be sent to, for backends that reply to the caller (rpc): the producer
    /// puts it in each message's `reply_to`.
    fn reply_to(&self) -> Option<String> {
        None
    }
}

/// Waits until `read` returns a ready document or `timeout` passes, re-reading each time `notify`
/// wakes its waiters; returns what `read` gives last. For backends that keep results in this process
/// and notify on every store.
///
/// ```
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// use std::time::Duration;
/// use celery_core::{backend::wait_notified, TaskMeta};
/// let notify = tokio::sync::Notify::new();
/// let meta = wait_notified(&notify, Duration::from_millis(10), || Some(TaskMeta::success("t", 1.into()))).await;
/// assert!(meta.is_some());
/// # });
/// ```
pub async fn wait_notified(
    notify: &tokio::sync::Notify,
    timeout: Duration,
    mut read: impl FnMut() -> Option<TaskMeta>,
) -> Option<TaskMeta> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let notified = notify.notified();
        let cur = read();
        if cur.as_ref().is_some_and(|m| m.status.is_ready()) || tokio::time::Instant::now() >= deadline {
            return cur;
        }
        let _ = tokio::time::timeout_at(deadline, notified).await;
    }
}

/// Celery's result document (`celery-task-meta-<id>` on Redis).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskMeta {
    /// The task id.
    pub task_id: String,
    /// The state.
    pub status: TaskState,
    /// The return value, or the exception document for FAILURE/RETRY.
    #[serde(default)]
    pub result: Value,
    /// The traceback of a failure.
    #[serde(default)]
    pub traceback: Option<String>,
    /// Child task ids (Celery's format).
    #[serde(default)]
    pub children: Vec<Value>,
    /// When it became ready.
    #[serde(default)]
    pub date_done: Option<String>,
    /// The group, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group_id: Option<String>,
    /// The parent task, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_id: Option<String>,
    /// Task name (extended results).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Worker hostname (extended results).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker: Option<String>,
    /// Retries so far (extended results).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<u32>,
    /// The queue (extended results).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue: Option<String>,
    /// Where the caller waits for the result (the request's `reply_to`), for backends that reply
    /// to the caller (rpc). Not stored.
    #[serde(skip)]
    pub reply_to: Option<String>,
}

impl TaskMeta {
    /// A document in `status` with `result`.
    pub fn new(task_id: impl Into<String>, status: TaskState, result: Value) -> TaskMeta {
        TaskMeta {
            task_id: task_id.into(),
            status,
            result,
            traceback: None,
            children: Vec::new(),
            date_done: status.is_ready().then(|| format_time(Utc::now())),
            group_id: None,
            parent_id: None,
            name: None,
            worker: None,
            retries: None,
            queue: None,
            reply_to: None,
        }
    }

    /// SUCCESS with a value.
    pub fn success(task_id: impl Into<String>, value: Value) -> TaskMeta {
        TaskMeta::new(task_id, TaskState::Success, value)
    }

    /// `status` (FAILURE, RETRY, REVOKED, REJECTED) with an error, in Celery's exception format.
    pub fn error(task_id: impl Into<String>, status: TaskState, err: &TaskError) -> TaskMeta {
        let mut m = TaskMeta::new(
            task_id,
            status,
            json!({"exc_type": err.exc_type(), "exc_message": [err.message()], "exc_module": "celery_rs"}),
        );
        m.traceback = Some(err.traceback().map(str::to_owned).unwrap_or_else(|| err.to_string()));
        m
    }

    /// For FAILURE/REVOKED: the exception type and message.
    pub fn exception(&self) -> Option<(String, String)> {
        let obj = self.result.as_object()?;
        let exc_type = obj.get("exc_type")?.as_str()?.to_owned();
        let message = match obj.get("exc_message") {
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| v.as_str().map(str::to_owned).unwrap_or_else(|| v.to_string()))
                .collect::<Vec<_>>()
                .join(", "),
            Some(Value::String(s)) => s.clone(),
            Some(other) => other.to_string(),
            None => String::new(),
        };
        Some((exc_type, message))
    }

    /// Parses a stored document.
    pub fn from_slice(bytes: &[u8]) -> Result<TaskMeta, BackendError> {
        serde_json::from_slice(bytes).map_err(|e| BackendError::Malformed(e.to_string()))
    }

    /// Serializes to the stored form.
    pub fn to_vec(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_failure_document_parses() {
        let raw = br#"{"status": "FAILURE", "result": {"exc_type": "ValueError", "exc_message": ["bad"], "exc_module": "builtins"}, "traceback": "Traceback...", "children": [], "date_done": "2026-01-01T00:00:00.000000+00:00", "task_id": "x"}"#;
        let m = TaskMeta::from_slice(raw).unwrap();
        assert_eq!(m.status, TaskState::Failure);
        assert_eq!(m.exception(), Some(("ValueError".into(), "bad".into())));
    }

    #[test]
    fn error_document_has_celery_shape() {
        let m = TaskMeta::error("x", TaskState::Failure, &TaskError::new("ValueError", "bad"));
        let v: Value = serde_json::from_slice(&m.to_vec()).unwrap();
        assert_eq!(v["result"]["exc_type"], "ValueError");
        assert_eq!(v["result"]["exc_message"], json!(["bad"]));
        assert!(v["date_done"].is_string());
    }
}

//! The result-backend trait and Celery's result document.

use std::fmt::Debug;
use std::time::Duration;

use async_trait::async_trait;
use chrono::Utc;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::capability::{Chords, Claims, StoreBatches};
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

    /// A short name for messages (`"redis"`).
    fn kind(&self) -> &'static str {
        "this"
    }

    /// Chord counting, when the backend has it ([`Chords`]).
    fn chords(&self) -> Option<&dyn Chords> {
        None
    }

    /// Idempotency claims, when the backend has them ([`Claims`]).
    fn claims(&self) -> Option<&dyn Claims> {
        None
    }

    /// Several states stored in one call, when the backend can ([`StoreBatches`]).
    fn store_batches(&self) -> Option<&dyn StoreBatches> {
        None
    }

    /// Task history, when the backend keeps it ([`History`](crate::history::History)): the
    /// monitor's store when its broker keeps none (RabbitMQ).
    fn history(&self) -> Option<&dyn crate::history::History> {
        None
    }
}

/// A chord's tally kept in memory, for backends that count chords in their own process (the
/// built-in and in-memory backends; Redis does the same in a Lua script).
///
/// ```
/// use celery_core::backend::{ChordMember, ChordTally};
/// use celery_core::TaskState;
/// let m = |id: &str, i| ChordMember { task_id: id.into(), index: Some(i), state: TaskState::Success, result: i.into() };
/// let mut t = ChordTally::default();
/// t.size = Some(2);
/// assert!(t.part(m("b", 1)).is_none());
/// assert!(t.part(m("b", 1)).is_none(), "a member reported twice counts once");
/// let all = t.part(m("a", 0)).unwrap();
/// assert_eq!(all.iter().map(|m| m.task_id.as_str()).collect::<Vec<_>>(), ["a", "b"]);
/// assert!(t.part(m("b", 1)).is_none(), "only the completing member gets the results");
/// assert!(t.part(m("a", 0)).is_some(), "...again when it reports again");
/// ```
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ChordTally {
    /// The number of members (none until the producer set it).
    pub size: Option<usize>,
    /// The members counted so far, by task id.
    pub members: std::collections::BTreeMap<String, ChordMember>,
    /// The member whose report completed the chord.
    pub completed_by: Option<String>,
}

impl ChordTally {
    /// Counts `member`; returns every member in group order to the member that completes the chord.
    pub fn part(&mut self, member: ChordMember) -> Option<Vec<ChordMember>> {
        let id = member.task_id.clone();
        self.members.entry(id.clone()).or_insert(member);
        let complete = self.size.is_some_and(|n| self.members.len() >= n);
        if !complete || self.completed_by.as_ref().is_some_and(|by| *by != id) {
            return None;
        }
        self.completed_by = Some(id);
        let mut all: Vec<ChordMember> = self.members.values().cloned().collect();
        all.sort_by_key(|m| m.index.unwrap_or(u64::MAX));
        Some(all)
    }
}

/// One chord member's final state, as counted by [`Chords::chord_part`](crate::capability::Chords::chord_part).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChordMember {
    /// The member's task id.
    pub task_id: String,
    /// Its index in the group (`group_index`), which orders the results.
    pub index: Option<u64>,
    /// SUCCESS, FAILURE or REVOKED.
    pub state: TaskState,
    /// The return value, or the exception document.
    pub result: Value,
}

impl ChordMember {
    /// Celery's encoding in a chord's `.j` set: `[1, task_id, state, result]`.
    pub fn to_celery(&self) -> Value {
        json!([1, self.task_id, self.state, self.result])
    }

    /// Reads Celery's `[1, task_id, state, result]`.
    pub fn from_celery(v: &Value, index: Option<u64>) -> Option<ChordMember> {
        let a = v.as_array()?;
        Some(ChordMember {
            task_id: a.get(1)?.as_str()?.to_owned(),
            index,
            state: serde_json::from_value(a.get(2)?.clone()).ok()?,
            result: a.get(3).cloned().unwrap_or(Value::Null),
        })
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
    let deadline = crate::clock::instant_after(timeout);
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
            json!({"exc_type": err.exc_type(), "exc_message": [err.message()], "exc_module": err.exc_module()}),
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
        assert_eq!(v["result"]["exc_module"], "builtins");
        assert!(v["date_done"].is_string());
        // Celery's own exceptions name Celery's module, so Python raises the real class.
        let m = TaskMeta::error("x", TaskState::Revoked, &TaskError::new("TaskRevokedError", "revoked"));
        assert_eq!(m.result["exc_module"], "celery.exceptions");
        let m = TaskMeta::error("x", TaskState::Failure, &TaskError::new("ParseIntError", "x"));
        assert_eq!(m.result["exc_module"], "celery_rs");
    }
}

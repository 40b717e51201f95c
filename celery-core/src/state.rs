//! Task states, as Celery names them.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The state of a task as stored in a result backend.
///
/// ```
/// use celery_core::TaskState;
/// assert!(TaskState::Success.is_ready());
/// assert_eq!("FAILURE".parse::<TaskState>().unwrap(), TaskState::Failure);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum TaskState {
    /// Unknown id: nothing stored yet.
    Pending,
    /// A worker received the task.
    Received,
    /// A worker started running the task.
    Started,
    /// The task will be retried.
    Retry,
    /// The task returned a value.
    Success,
    /// The task failed.
    Failure,
    /// The task was revoked or expired.
    Revoked,
    /// The task was rejected (bad message).
    Rejected,
}

impl TaskState {
    /// SUCCESS, FAILURE and REVOKED: no further change is expected.
    pub fn is_ready(self) -> bool {
        matches!(self, TaskState::Success | TaskState::Failure | TaskState::Revoked)
    }

    /// The Celery name (`"SUCCESS"`).
    pub fn as_str(self) -> &'static str {
        match self {
            TaskState::Pending => "PENDING",
            TaskState::Received => "RECEIVED",
            TaskState::Started => "STARTED",
            TaskState::Retry => "RETRY",
            TaskState::Success => "SUCCESS",
            TaskState::Failure => "FAILURE",
            TaskState::Revoked => "REVOKED",
            TaskState::Rejected => "REJECTED",
        }
    }
}

impl fmt::Display for TaskState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for TaskState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "PENDING" => TaskState::Pending,
            "RECEIVED" => TaskState::Received,
            "STARTED" => TaskState::Started,
            "RETRY" => TaskState::Retry,
            "SUCCESS" => TaskState::Success,
            "FAILURE" => TaskState::Failure,
            "REVOKED" => TaskState::Revoked,
            "REJECTED" => TaskState::Rejected,
            other => return Err(format!("unknown task state `{other}`")),
        })
    }
}

//! Task states, as Celery names them, and the custom states a task reports itself.
//!
//! Celery's built-in states are the variants of [`TaskState`]; any other name (`PROGRESS`) is a
//! custom state ([`TaskState::Custom`]), as Celery's `self.update_state(state="PROGRESS", ...)`
//! stores it. A custom state is never ready: the task is still running.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The longest custom state name, in bytes (Celery's database backends keep 50; names are short).
pub const MAX_STATE_NAME: usize = 48;

/// The state of a task as stored in a result backend.
///
/// ```
/// use celery_core::TaskState;
/// assert!(TaskState::Success.is_ready());
/// assert_eq!("FAILURE".parse::<TaskState>().unwrap(), TaskState::Failure);
/// let progress: TaskState = "PROGRESS".parse().unwrap();
/// assert!(progress.is_custom() && !progress.is_ready());
/// assert_eq!(progress.as_str(), "PROGRESS");
/// assert_eq!(serde_json::to_string(&progress).unwrap(), "\"PROGRESS\"");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
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
    /// A state the task reported itself (`PROGRESS`), through
    /// [`TaskContext::update_state`](crate::TaskContext::update_state) or Celery's `update_state`.
    Custom(StateName),
}

/// The name of a custom state: 1 to [`MAX_STATE_NAME`] bytes of printable ASCII, kept inline so
/// [`TaskState`] stays `Copy`.
///
/// ```
/// use celery_core::state::StateName;
/// assert_eq!(StateName::new("PROGRESS").unwrap().as_str(), "PROGRESS");
/// assert!(StateName::new("").is_err());
/// assert!(StateName::new(&"X".repeat(49)).is_err());
/// assert!(StateName::new("NEW\nLINE").is_err());
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct StateName {
    len: u8,
    bytes: [u8; MAX_STATE_NAME],
}

impl StateName {
    /// Checks and keeps `name`.
    pub fn new(name: &str) -> Result<StateName, String> {
        if name.is_empty() || name.len() > MAX_STATE_NAME {
            return Err(format!("a task state is 1 to {MAX_STATE_NAME} bytes long, not {}", name.len()));
        }
        if !name.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(format!("a task state is printable ASCII without spaces: {name:?}"));
        }
        let mut bytes = [0; MAX_STATE_NAME];
        bytes[..name.len()].copy_from_slice(name.as_bytes());
        Ok(StateName { len: name.len() as u8, bytes })
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        // Only ASCII is ever stored (checked in `new`).
        std::str::from_utf8(&self.bytes[..self.len as usize]).unwrap_or_default()
    }
}

impl fmt::Debug for StateName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl TaskState {
    /// SUCCESS, FAILURE and REVOKED: no further change is expected.
    pub fn is_ready(self) -> bool {
        matches!(self, TaskState::Success | TaskState::Failure | TaskState::Revoked)
    }

    /// A state the task reported itself (not one of Celery's).
    pub fn is_custom(self) -> bool {
        matches!(self, TaskState::Custom(_))
    }

    /// The Celery name (`"SUCCESS"`, `"PROGRESS"`).
    pub fn as_str(&self) -> &str {
        match self {
            TaskState::Pending => "PENDING",
            TaskState::Received => "RECEIVED",
            TaskState::Started => "STARTED",
            TaskState::Retry => "RETRY",
            TaskState::Success => "SUCCESS",
            TaskState::Failure => "FAILURE",
            TaskState::Revoked => "REVOKED",
            TaskState::Rejected => "REJECTED",
            TaskState::Custom(name) => name.as_str(),
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
            other => TaskState::Custom(StateName::new(other)?),
        })
    }
}

impl Serialize for TaskState {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for TaskState {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_state_round_trips_through_its_name() {
        let all = [
            TaskState::Pending,
            TaskState::Received,
            TaskState::Started,
            TaskState::Retry,
            TaskState::Success,
            TaskState::Failure,
            TaskState::Revoked,
            TaskState::Rejected,
            "PROGRESS".parse().unwrap(),
        ];
        for s in all {
            assert_eq!(s.as_str().parse::<TaskState>().unwrap(), s);
            let json = serde_json::to_string(&s).unwrap();
            assert_eq!(serde_json::from_str::<TaskState>(&json).unwrap(), s);
        }
        assert!(serde_json::from_str::<TaskState>("\"\"").is_err());
        assert!(serde_json::from_str::<TaskState>("3").is_err());
    }
}

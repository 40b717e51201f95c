//! What a running task reports about itself ([`TaskContext::update_state`](celery_core::TaskContext::update_state)):
//! stored as Celery's custom-state result document (unless the task ignores results) and sent as
//! a `task-progress` event (`uuid`, `state`, `meta`) when task events are on.

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use celery_core::progress::StateSink;
use celery_core::protocol::Message;
use celery_core::registry::TaskEntry;
use celery_core::{BackendError, TaskMeta, TaskState};
use serde_json::{json, Value};

use super::outcome::task_meta;
use super::shared::Shared;
use super::stores::{self, Batched};

/// One running task's reports.
pub(super) struct TaskReports {
    pub(super) w: Arc<Shared>,
    pub(super) msg: Arc<Message>,
    pub(super) entry: &'static TaskEntry,
}

impl fmt::Debug for TaskReports {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TaskReports").field("id", &self.msg.headers.id).field("task", &self.entry.name).finish()
    }
}

#[async_trait]
impl StateSink for TaskReports {
    async fn report(&self, task_id: &str, state: TaskState, meta: &Value) -> Result<(), BackendError> {
        let doc = TaskMeta::new(task_id, state, meta.clone());
        if let Some(doc) = task_meta(&self.w, &self.msg, self.entry, doc) {
            // One attempt: the task decides what a report that could not be stored means. In a
            // batch when states go in batches, so that it lands after the task's STARTED.
            let doc = match self.w.batch_stores {
                true => match stores::store(&self.w.app, &self.w.stores, doc).await {
                    Batched::Stored => None,
                    Batched::Failed(doc) => Some(doc),
                    Batched::Lost => {
                        return Err(BackendError::operation("the worker stopped before the report was stored"))
                    }
                },
                false => Some(doc),
            };
            if let Some(doc) = doc {
                self.w.app.backend().store(&doc).await?;
            }
        }
        crate::metrics::reported();
        self.w.event("task-progress", || json!({"uuid": task_id, "state": state, "meta": meta}));
        Ok(())
    }
}

//! `log://PATH`: results in the built-in broker's data directory (a compacted-by-key results topic),
//! with the same states and `AsyncResult` behaviour as Redis: expiry (`result_expires=SECONDS`,
//! default one day), waiters woken without polling, a stored SUCCESS never overwritten.
//!
//! ```
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! use celery_core::{ResultBackend, TaskMeta};
//! let dir = std::env::temp_dir().join(format!("doc-results-{}", std::process::id()));
//! let b = result_backends::log::LogResultBackend::connect(&format!("log://{}", dir.display())).await.unwrap();
//! b.store(&TaskMeta::success("t1", serde_json::json!(5))).await.unwrap();
//! assert_eq!(b.get("t1").await.unwrap().unwrap().result, serde_json::json!(5));
//! # std::fs::remove_dir_all(dir).ok();
//! # });
//! ```

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use broker_backends::log::{parse_url, LogStore};
use celery_core::scheme::BackendScheme;
use celery_core::{BackendError, ResultBackend, TaskMeta, TaskState};

/// Results in a log store.
#[derive(Debug, Clone)]
pub struct LogResultBackend {
    store: Arc<LogStore>,
    expires: Duration,
}

fn status_of(doc: &[u8]) -> Option<TaskState> {
    TaskMeta::from_slice(doc).ok().map(|m| m.status)
}

impl LogResultBackend {
    /// Opens the directory of a `log://` URL (shared with the broker in this process).
    pub async fn connect(url: &str) -> Result<LogResultBackend, BackendError> {
        let (base, query) = url.split_once('?').unwrap_or((url, ""));
        let mut expires = Duration::from_secs(86_400);
        let mut keep = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            match pair.split_once('=') {
                Some(("result_expires", v)) => {
                    expires =
                        Duration::from_secs(v.parse().map_err(|_| BackendError::InvalidUrl {
                            url: url.into(),
                            reason: format!("result_expires `{v}` is not a number of seconds"),
                        })?)
                }
                _ => keep.push(pair),
            }
        }
        let clean = if keep.is_empty() {
            base.to_owned()
        } else {
            format!("{base}?{}", keep.join("&"))
        };
        let invalid = |e: broker_backends::log::LogError| BackendError::InvalidUrl {
            url: url.into(),
            reason: e.to_string(),
        };
        let (dir, cfg) = parse_url(&clean).map_err(invalid)?;
        let store =
            LogStore::open(&dir, cfg).map_err(|e| BackendError::Connection(e.to_string()))?;
        Ok(LogResultBackend { store, expires })
    }
}

#[async_trait]
impl ResultBackend for LogResultBackend {
    async fn store(&self, meta: &TaskMeta) -> Result<(), BackendError> {
        self.store
            .put_result(&meta.task_id, meta.to_vec(), self.expires, |old| {
                status_of(old) == Some(TaskState::Success)
            })
            .await
            .map_err(|e| BackendError::Operation(e.to_string()))?;
        Ok(())
    }

    async fn get(&self, task_id: &str) -> Result<Option<TaskMeta>, BackendError> {
        self.store
            .get_result(task_id)
            .map(|d| TaskMeta::from_slice(&d))
            .transpose()
    }

    async fn wait(
        &self,
        task_id: &str,
        timeout: Duration,
    ) -> Result<Option<TaskMeta>, BackendError> {
        let doc = self
            .store
            .wait_result(task_id, timeout, |d| {
                status_of(d).is_some_and(TaskState::is_ready)
            })
            .await;
        doc.map(|d| TaskMeta::from_slice(&d)).transpose()
    }

    async fn forget(&self, task_id: &str) -> Result<(), BackendError> {
        self.store
            .forget_result(task_id)
            .await
            .map_err(|e| BackendError::Operation(e.to_string()))
    }
}

inventory::submit! {
    BackendScheme { scheme: "log", connect: |url| Box::pin(async move { Ok(Arc::new(LogResultBackend::connect(&url).await?) as Arc<dyn ResultBackend>) }) }
}

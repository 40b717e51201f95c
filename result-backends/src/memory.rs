//! `memory://`: an in-process result backend for tests.
//!
//! ```
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! use celery_core::{ResultBackend, TaskMeta};
//! let b = result_backends::memory::MemoryBackend::default();
//! b.store(&TaskMeta::success("t1", serde_json::json!(5))).await.unwrap();
//! assert_eq!(b.get("t1").await.unwrap().unwrap().result, serde_json::json!(5));
//! # });
//! ```

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use celery_core::backend::{ChordMember, ChordTally};
use celery_core::{BackendError, ResultBackend, TaskMeta, TaskState};
use tokio::sync::Notify;

/// An in-process result backend.
#[derive(Debug, Clone, Default)]
pub struct MemoryBackend {
    inner: Arc<(Mutex<HashMap<String, TaskMeta>>, Notify)>,
    chords: Arc<Mutex<HashMap<String, ChordTally>>>,
    /// Idempotency key -> (task id, until).
    claims: Arc<Mutex<HashMap<String, (String, std::time::Instant)>>>,
}

#[async_trait]
impl ResultBackend for MemoryBackend {
    async fn store(&self, meta: &TaskMeta) -> Result<(), BackendError> {
        let mut m = self.inner.0.lock().unwrap_or_else(|p| p.into_inner());
        if m.get(&meta.task_id).is_some_and(|old| old.status == TaskState::Success) {
            return Ok(());
        }
        m.insert(meta.task_id.clone(), meta.clone());
        drop(m);
        self.inner.1.notify_waiters();
        Ok(())
    }

    async fn get(&self, task_id: &str) -> Result<Option<TaskMeta>, BackendError> {
        Ok(self.inner.0.lock().unwrap_or_else(|p| p.into_inner()).get(task_id).cloned())
    }

    async fn wait(&self, task_id: &str, timeout: Duration) -> Result<Option<TaskMeta>, BackendError> {
        let read = || self.inner.0.lock().unwrap_or_else(|p| p.into_inner()).get(task_id).cloned();
        Ok(celery_core::backend::wait_notified(&self.inner.1, timeout, read).await)
    }

    async fn forget(&self, task_id: &str) -> Result<(), BackendError> {
        self.inner.0.lock().unwrap_or_else(|p| p.into_inner()).remove(task_id);
        Ok(())
    }

    fn kind(&self) -> &'static str {
        "memory"
    }

    async fn claim(&self, key: &str, task_id: &str, ttl: Duration) -> Result<Option<String>, BackendError> {
        let now = std::time::Instant::now();
        let mut claims = self.claims.lock().unwrap_or_else(|p| p.into_inner());
        match claims.get(key) {
            Some((id, until)) if *until > now => Ok(Some(id.clone())),
            _ => {
                claims.insert(key.to_owned(), (task_id.to_owned(), now + celery_core::clock::ttl(ttl)));
                Ok(None)
            }
        }
    }

    async fn unclaim(&self, key: &str, task_id: &str) -> Result<(), BackendError> {
        let mut claims = self.claims.lock().unwrap_or_else(|p| p.into_inner());
        if claims.get(key).is_some_and(|(id, _)| id == task_id) {
            claims.remove(key);
        }
        Ok(())
    }

    async fn chord_size(&self, group_id: &str, size: usize) -> Result<(), BackendError> {
        self.chords.lock().unwrap_or_else(|p| p.into_inner()).entry(group_id.to_owned()).or_default().size = Some(size);
        Ok(())
    }

    async fn chord_part(&self, group_id: &str, member: &ChordMember) -> Result<Option<Vec<ChordMember>>, BackendError> {
        let mut chords = self.chords.lock().unwrap_or_else(|p| p.into_inner());
        Ok(chords.entry(group_id.to_owned()).or_default().part(member.clone()))
    }

    async fn chord_done(&self, group_id: &str) -> Result<(), BackendError> {
        self.chords.lock().unwrap_or_else(|p| p.into_inner()).remove(group_id);
        Ok(())
    }
}

impl MemoryBackend {
    /// A new in-process backend for a `memory://` URL, which takes no options.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let backend = result_backends::memory::MemoryBackend::connect("memory://").await.unwrap();
    /// assert!(result_backends::memory::MemoryBackend::connect("memory://?x=1").await.is_err());
    /// # }
    /// ```
    pub async fn connect(url: &str) -> Result<MemoryBackend, BackendError> {
        celery_core::url::ServiceUrl::parse(url)?.finish()?;
        Ok(MemoryBackend::default())
    }
}

celery_core::register_backend!("memory" => MemoryBackend::connect);

#[cfg(test)]
mod tests {
    #[test]
    fn memory_urls_take_no_options() {
        let rt = tokio::runtime::Runtime::new().unwrap();
        assert!(rt.block_on(celery_core::scheme::connect_backend("memory://")).is_ok());
        let e = rt.block_on(celery_core::scheme::connect_backend("memory://?x=1")).unwrap_err().to_string();
        assert!(e.contains("unknown memory:// option `x`"), "{e}");
    }
}

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
use celery_core::capability::{Chords, Claims};
use celery_core::sync::lock;
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
        let mut m = lock(&self.inner.0);
        if m.get(&meta.task_id).is_some_and(|old| old.status == TaskState::Success) {
            return Ok(());
        }
        m.insert(meta.task_id.clone(), meta.clone());
        drop(m);
        self.inner.1.notify_waiters();
        Ok(())
    }

    async fn get(&self, task_id: &str) -> Result<Option<TaskMeta>, BackendError> {
        Ok(lock(&self.inner.0).get(task_id).cloned())
    }

    async fn wait(&self, task_id: &str, timeout: Duration) -> Result<Option<TaskMeta>, BackendError> {
        let read = || lock(&self.inner.0).get(task_id).cloned();
        Ok(celery_core::backend::wait_notified(&self.inner.1, timeout, read).await)
    }

    async fn forget(&self, task_id: &str) -> Result<(), BackendError> {
        lock(&self.inner.0).remove(task_id);
        Ok(())
    }

    fn kind(&self) -> &'static str {
        "memory"
    }

    celery_core::offers!(chords, claims);
}
#[async_trait]
impl Chords for MemoryBackend {
    async fn chord_size(&self, group_id: &str, size: usize) -> Result<(), BackendError> {
        lock(&self.chords).entry(group_id.to_owned()).or_default().size = Some(size);
        Ok(())
    }

    async fn chord_part(&self, group_id: &str, member: &ChordMember) -> Result<Option<Vec<ChordMember>>, BackendError> {
        let mut chords = lock(&self.chords);
        Ok(chords.entry(group_id.to_owned()).or_default().part(member.clone()))
    }

    async fn chord_done(&self, group_id: &str) -> Result<(), BackendError> {
        lock(&self.chords).remove(group_id);
        Ok(())
    }
}

#[async_trait]
impl Claims for MemoryBackend {
    async fn claim(&self, key: &str, task_id: &str, ttl: Duration) -> Result<Option<String>, BackendError> {
        let now = std::time::Instant::now();
        let mut claims = lock(&self.claims);
        match claims.get(key) {
            Some((id, until)) if *until > now => Ok(Some(id.clone())),
            _ => {
                claims.insert(key.to_owned(), (task_id.to_owned(), now + celery_core::clock::ttl(ttl)));
                Ok(None)
            }
        }
    }

    async fn unclaim(&self, key: &str, task_id: &str) -> Result<(), BackendError> {
        let mut claims = lock(&self.claims);
        if claims.get(key).is_some_and(|(id, _)| id == task_id) {
            claims.remove(key);
        }
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
        for (url, name) in [("memory://?x=1", "x"), ("memory://?bogus=1", "bogus")] {
            let e = rt.block_on(celery_core::scheme::connect_backend(url)).unwrap_err();
            assert!(e.is_fatal(), "{e:?}");
            assert!(e.to_string().contains(&format!("unknown memory:// option `{name}`")), "{e}");
        }
    }
}

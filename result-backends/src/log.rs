//! `log://PATH` and `log+tcp://HOST:PORT`: results kept by the built-in broker (a results topic in
//! its data directory), with the same states and `AsyncResult` behaviour as Redis: expiry
//! (`result_expires=SECONDS`, default one day), waiters woken without polling, a stored SUCCESS never
//! overwritten. When another process owns the directory, results go through it. The other options
//! are the broker's (an unknown one is an error naming it).
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

use std::time::Duration;

use async_trait::async_trait;
use broker_backends::log::{LogBroker, Results};
use celery_core::backend::ChordMember;
use celery_core::capability::{Chords, Claims, StoreBatches};
use celery_core::url::ServiceUrl;
use celery_core::{BackendError, BrokerError, ResultBackend, TaskMeta};

/// Results in a log store.
#[derive(Debug, Clone)]
pub struct LogResultBackend {
    results: Results,
    expires: Duration,
}

impl LogResultBackend {
    /// Opens (or connects to) the store of a `log://` or `log+tcp://` URL.
    pub async fn connect(url: &str) -> Result<LogResultBackend, BackendError> {
        let u = ServiceUrl::parse(url)?;
        let secs = u.parse_option::<u64>("result_expires", "a number of seconds")?;
        let expires = Duration::from_secs(secs.unwrap_or(86_400));
        // The broker reads (and checks) the other options.
        let clean = u.connection_string_except(&["result_expires"]);
        let results = LogBroker::connect(&clean).await?.results();
        Ok(LogResultBackend { results, expires })
    }
}

#[async_trait]
impl ResultBackend for LogResultBackend {
    async fn store(&self, meta: &TaskMeta) -> Result<(), BackendError> {
        self.results.put(&meta.task_id, meta.to_vec(), self.expires).await.map_err(store_error)
    }

    async fn get(&self, task_id: &str) -> Result<Option<TaskMeta>, BackendError> {
        self.results.get(task_id).await?.map(|d| TaskMeta::from_slice(&d)).transpose()
    }

    async fn wait(&self, task_id: &str, timeout: Duration) -> Result<Option<TaskMeta>, BackendError> {
        self.results.wait(task_id, timeout).await?.map(|d| TaskMeta::from_slice(&d)).transpose()
    }

    async fn forget(&self, task_id: &str) -> Result<(), BackendError> {
        self.results.forget(task_id).await.map_err(BackendError::from)
    }

    fn kind(&self) -> &'static str {
        "log"
    }

    celery_core::offers!(chords, claims, store_batches);

    fn history(&self) -> Option<&dyn celery_core::history::History> {
        Some(&self.results)
    }
}
/// A store's error: a document the store refused for what it is (too large: a protocol error from
/// [`Results::put`]) is [`BackendError::Malformed`], so that a worker dead-letters its task rather
/// than run it again for a result refused again; anything else as the broker's error.
fn store_error(e: BrokerError) -> BackendError {
    match e {
        BrokerError::Protocol(p) => BackendError::Malformed(format!("log store: {p}")),
        e => e.into(),
    }
}

#[async_trait]
impl StoreBatches for LogResultBackend {
    /// The states in order, with one append of the results log (one write, one sync) for all
    /// when this process owns the directory; through the owner, all at once (one after another
    /// when a task id repeats).
    async fn store_many(&self, metas: &[TaskMeta]) -> Result<(), BackendError> {
        let docs = metas.iter().map(|m| (m.task_id.clone(), m.to_vec())).collect();
        self.results.put_many(docs, self.expires).await.map_err(store_error)
    }
}

#[async_trait]
impl Chords for LogResultBackend {
    async fn chord_size(&self, group_id: &str, size: usize) -> Result<(), BackendError> {
        self.results.chord_size(group_id, size, self.expires).await.map_err(BackendError::from)
    }

    async fn chord_part(&self, group_id: &str, member: &ChordMember) -> Result<Option<Vec<ChordMember>>, BackendError> {
        self.results.chord_part(group_id, member, self.expires).await.map_err(BackendError::from)
    }

    async fn chord_done(&self, group_id: &str) -> Result<(), BackendError> {
        self.results.chord_done(group_id).await.map_err(BackendError::from)
    }
}

#[async_trait]
impl Claims for LogResultBackend {
    /// A claim is a lease named `idempotency.<key>` held by the task id (as `Leases::lease`).
    async fn claim(&self, key: &str, task_id: &str, ttl: Duration) -> Result<Option<String>, BackendError> {
        let name = format!("idempotency.{key}");
        loop {
            if self.results.lease(&name, task_id, Some(ttl.max(Duration::from_millis(1)))).await? {
                return Ok(None);
            }
            // Held: by whom? (If it expired meanwhile, try again.)
            if let Some(holder) = self.results.lease_holder(&name).await? {
                return Ok(Some(holder));
            }
        }
    }

    async fn unclaim(&self, key: &str, task_id: &str) -> Result<(), BackendError> {
        self.results.lease(&format!("idempotency.{key}"), task_id, None).await.map(|_| ()).map_err(BackendError::from)
    }
}

celery_core::register_backend!("log", "log+tcp", "log+tls" => LogResultBackend::connect);

#[cfg(test)]
mod tests {
    use super::*;

    fn connect(url: &str) -> Result<LogResultBackend, BackendError> {
        tokio::runtime::Runtime::new().unwrap().block_on(LogResultBackend::connect(url))
    }

    #[test]
    fn result_expires_is_read_and_the_rest_goes_to_the_broker() {
        let dir = std::env::temp_dir().join(format!("results-url-{}", std::process::id()));
        let b = connect(&format!("log://{}?result_expires=60&fsync=os", dir.display())).unwrap();
        assert_eq!(b.expires, Duration::from_secs(60));
        drop(b);
        std::fs::remove_dir_all(&dir).ok();
        for (url, needle) in [
            ("log:///nonexistent?result_expires=soon", "result_expires `soon` is not a number of seconds"),
            ("log:///nonexistent?result_expire=60", "unknown log:// option `result_expire`"),
            ("log+tcp://h:1?token=s3cret&bogus=1", "log+tcp://h:1?token=***&bogus=1"),
        ] {
            let e = connect(url).unwrap_err();
            assert!(matches!(e, BackendError::InvalidUrl { .. }), "{url}: {e:?}");
            let e = e.to_string();
            assert!(e.contains(needle) && !e.contains("s3cret"), "{url}: {e}");
        }
    }
}

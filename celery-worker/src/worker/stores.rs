//! Task states stored in batches: on a backend that [stores several in one
//! call](celery_core::capability::StoreBatches), the states that tasks store while the worker's
//! last call is on its way go together in the next one (at most [`MAX_STORE_BATCH`]), so that a
//! worker finishing thousands of tasks a second pays a round trip, and the backend a script or a
//! statement, per batch rather than per state. A state waits at most for the call before its own;
//! one stored alone (nothing on its way) goes at once. The two states of one task never share a
//! batch out of order: STARTED is stored before the task runs, its outcome after.

use std::sync::{Arc, Mutex};

use celery_core::backend::TaskMeta;
use celery_core::sync::lock;
use celery_core::App;
use tokio::sync::oneshot;

use super::batch::Batch;

/// The most states one batch carries.
pub(super) const MAX_STORE_BATCH: usize = 256;

/// A state waiting for its batch; the answer gives it back when the batch failed.
struct PendingStore {
    meta: TaskMeta,
    answer: oneshot::Sender<Option<TaskMeta>>,
}

/// The states waiting for the next call (one per worker).
#[derive(Default)]
pub(crate) struct StoreQueue {
    batch: Mutex<Batch<PendingStore, MAX_STORE_BATCH>>,
}

/// How a batched store ended (returned once, not kept: the state is moved, not boxed).
#[allow(clippy::large_enum_variant)]
pub(super) enum Batched {
    /// Stored.
    Stored,
    /// The batch's call failed: the state comes back to be stored on its own (with retries).
    Failed(TaskMeta),
    /// The batch was dropped with the runtime (shutting down): not stored.
    Lost,
}

/// Stores `meta` with the states queued meanwhile, through the backend's batches (the caller
/// checked that it has them).
pub(super) async fn store(app: &App, queue: &Arc<StoreQueue>, meta: TaskMeta) -> Batched {
    let (answer, got) = oneshot::channel();
    if lock(&queue.batch).push(PendingStore { meta, answer }) {
        tokio::spawn(send(app.clone(), queue.clone()));
    }
    match got.await {
        Ok(None) => Batched::Stored,
        Ok(Some(meta)) => Batched::Failed(meta),
        Err(_) => Batched::Lost,
    }
}

/// Sends the queued states, a batch per call, until none is left; each batch's stores get their
/// answer (a failed call gives its states back).
async fn send(app: App, queue: Arc<StoreQueue>) {
    loop {
        let next = lock(&queue.batch).next();
        let Some(batch) = next else { return };
        let (metas, answers): (Vec<TaskMeta>, Vec<_>) = batch.into_iter().map(|p| (p.meta, p.answer)).unzip();
        let stored = match app.backend().store_batches() {
            Some(b) => b.store_many(&metas).await,
            None => Err(celery_core::BackendError::operation("this result backend stores no batches")),
        };
        match stored {
            Ok(()) => answers.into_iter().for_each(|a| {
                let _ = a.send(None);
            }),
            Err(e) => {
                tracing::debug!(error = %e, n = metas.len(), "a batch of task states failed; storing them one by one");
                for (a, m) in answers.into_iter().zip(metas) {
                    let _ = a.send(Some(m));
                }
            }
        }
    }
}

//! Task states stored in batches: on a backend that [stores several in one
//! call](celery_core::capability::StoreBatches), the states that tasks store while the worker's
//! last call is on its way go together in the next one (at most [`MAX_STORE_BATCH`]), so that a
//! worker finishing thousands of tasks a second pays a round trip, and the backend a script or a
//! statement, per batch rather than per state. A state waits at most for the call before its own;
//! one stored alone (nothing on its way) goes at once.
//!
//! STARTED is queued without waiting ([`started`]): the task runs meanwhile. Batches go one after
//! another, each in queue order, so a task's outcome (queued after its STARTED) is never stored
//! before it; and when the task ends before its STARTED went out, the STARTED is left out
//! (its [`StartedStore`] is dropped): a task that takes less than the worker's next call stores its
//! outcome alone, a longer one shows STARTED while it runs. A STARTED whose batch fails is not
//! stored again (the outcome follows; stored later, alone, it could land over it).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use celery_core::backend::TaskMeta;
use celery_core::sync::lock;
use celery_core::App;
use tokio::sync::oneshot;

use super::batch::Batch;

/// The most states one batch carries.
pub(super) const MAX_STORE_BATCH: usize = 256;

/// A state waiting for its batch; the answer gives it back when the batch failed (a STARTED has
/// none, and is left out once `superseded`).
struct PendingStore {
    meta: TaskMeta,
    answer: Option<oneshot::Sender<Option<TaskMeta>>>,
    superseded: Option<Arc<AtomicBool>>,
}

impl PendingStore {
    fn superseded(&self) -> bool {
        self.superseded.as_ref().is_some_and(|s| s.load(Ordering::Relaxed))
    }
}

/// A STARTED queued by [`started`]; dropped (the run ended, or was abandoned), it is left out
/// unless its batch went out already.
pub(super) struct StartedStore(Arc<AtomicBool>);

impl Drop for StartedStore {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
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
    /// The batch's sender ended without answering (the runtime shutting down, or a panic in the
    /// backend's `store_many`): not stored.
    Lost,
}

/// Stores `meta` with the states queued meanwhile, through the backend's batches (the caller
/// checked that it has them).
pub(super) async fn store(app: &App, queue: &Arc<StoreQueue>, meta: TaskMeta) -> Batched {
    let (answer, got) = oneshot::channel();
    push(app, queue, PendingStore { meta, answer: Some(answer), superseded: None });
    match got.await {
        Ok(None) => Batched::Stored,
        Ok(Some(meta)) => Batched::Failed(meta),
        Err(_) => Batched::Lost,
    }
}

/// Queues a task's STARTED (`meta`) through the backend's batches without waiting for it.
pub(super) fn started(app: &App, queue: &Arc<StoreQueue>, meta: TaskMeta) -> StartedStore {
    let superseded = Arc::new(AtomicBool::new(false));
    push(app, queue, PendingStore { meta, answer: None, superseded: Some(superseded.clone()) });
    StartedStore(superseded)
}

/// Queues `p`, and starts the sender when no call is on its way.
fn push(app: &App, queue: &Arc<StoreQueue>, p: PendingStore) {
    if lock(&queue.batch).push(p) {
        tokio::spawn(send(app.clone(), queue.clone()));
    }
}

/// Ends a sender: when it ends without draining the queue (a panic in a backend's `store_many`,
/// or its task aborted), the states queued are dropped unanswered ([`Batched::Lost`]: their
/// deliveries go back to their queues) and the next state starts a sender again, so that no store
/// waits for a sender that is gone.
struct Sending {
    queue: Arc<StoreQueue>,
    drained: bool,
}

impl Drop for Sending {
    fn drop(&mut self) {
        if !self.drained {
            let lost = lock(&self.queue.batch).abandon();
            tracing::error!(
                states = lost.len(),
                "the sender of batched task states ended early; their tasks go back to their queues"
            );
        }
    }
}

/// Sends the queued states, a batch per call, until none is left; each batch's stores get their
/// answer (a failed call gives its states back).
async fn send(app: App, queue: Arc<StoreQueue>) {
    let mut sending = Sending { queue, drained: false };
    loop {
        let next = lock(&sending.queue.batch).next();
        let Some(batch) = next else {
            sending.drained = true;
            return;
        };
        let (metas, answers): (Vec<TaskMeta>, Vec<_>) =
            batch.into_iter().filter(|p| !p.superseded()).map(|p| (p.meta, p.answer)).unzip();
        if metas.is_empty() {
            continue;
        }
        let stored = match app.backend().store_batches() {
            Some(b) => b.store_many(&metas).await,
            None => Err(celery_core::BackendError::operation("this result backend stores no batches")),
        };
        match stored {
            Ok(()) => answers.into_iter().flatten().for_each(|a| {
                let _ = a.send(None);
            }),
            Err(e) => {
                tracing::warn!(error = %e, n = metas.len(), "a batch of task states failed; storing them one by one (STARTED left out)");
                for (a, m) in answers.into_iter().zip(metas) {
                    if let Some(a) = a {
                        let _ = a.send(Some(m));
                    }
                }
            }
        }
    }
}

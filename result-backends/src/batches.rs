//! What the backends' batched stores ([`celery_core::capability::StoreBatches`]) share.

use std::future::Future;

use celery_core::{BackendError, TaskMeta};

/// Runs `store` on each of `metas`: all at once when no task id repeats, else one after another,
/// so that a repeated id's states land in their order. Stops at the first error.
pub(crate) async fn store_each<'a, F, Fut>(metas: &[&'a TaskMeta], store: F) -> Result<(), BackendError>
where
    F: Fn(&'a TaskMeta) -> Fut,
    Fut: Future<Output = Result<(), BackendError>>,
{
    let mut ids = std::collections::HashSet::new();
    if metas.iter().all(|m| ids.insert(m.task_id.as_str())) {
        futures::future::try_join_all(metas.iter().map(|m| store(m))).await?;
        return Ok(());
    }
    for m in metas {
        store(m).await?;
    }
    Ok(())
}

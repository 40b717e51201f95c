//! Groups: tasks sent together under one group id, whose results are collected in order.

use std::time::Duration;

use serde::de::DeserializeOwned;

use crate::app::AsyncResult;
use crate::error::ResultError;
use crate::state::TaskState;

/// The results of a group, in the order the tasks were given.
///
/// ```no_run
/// # async fn demo(app: celery_core::App) -> Result<(), Box<dyn std::error::Error>> {
/// use std::time::Duration;
/// use celery_core::Signature;
/// let group = app.send_group((0..10).map(|i| Signature::by_name("add").args(serde_json::json!([i, i])))).await?;
/// let sums: Vec<i64> = group.get(Duration::from_secs(10)).await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct GroupResult {
    /// The group id (the `group` header of each member).
    pub id: String,
    /// One result per member, in order.
    pub results: Vec<AsyncResult>,
}

impl GroupResult {
    /// Waits for every member and returns their values in order; the first failure is the error.
    pub async fn get<T: DeserializeOwned>(&self, timeout: Duration) -> Result<Vec<T>, ResultError> {
        let deadline = crate::clock::instant_after(timeout);
        let mut out = Vec::with_capacity(self.results.len());
        for r in &self.results {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            out.push(r.get(left).await?);
        }
        Ok(out)
    }

    /// How many members succeeded so far.
    pub async fn completed_count(&self) -> Result<usize, ResultError> {
        let mut n = 0;
        for r in &self.results {
            n += (r.state().await? == TaskState::Success) as usize;
        }
        Ok(n)
    }

    /// True when every member is in a ready state (SUCCESS, FAILURE, REVOKED).
    pub async fn ready(&self) -> Result<bool, ResultError> {
        for r in &self.results {
            if !r.state().await?.is_ready() {
                return Ok(false);
            }
        }
        Ok(true)
    }
}

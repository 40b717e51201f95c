//! Celery's built-in tasks that every worker serves: `celery.map` (a task over each item) and
//! `celery.starmap` (over each argument list). They run the named task's function in this worker,
//! one item after another, as Celery does; the results come back as one list. Chunks are sent by
//! the producer as a group of `celery.starmap` tasks ([`App::send_chunks`](celery_core::App::send_chunks)).
//!
//! ```no_run
//! # async fn demo(app: celery_core::App) -> Result<(), Box<dyn std::error::Error>> {
//! use std::time::Duration;
//! use celery_core::Signature;
//! use serde_json::json;
//! let squares = app.send(Signature::by_name("square").map(vec![json!(1), json!(2), json!(3)])).await?;
//! let sums = app.send(Signature::by_name("add").starmap(vec![json!([1, 2]), json!([3, 4])])).await?;
//! assert_eq!(sums.get::<Vec<i64>>(Duration::from_secs(10)).await?, [3, 7]);
//! # Ok(()) }
//! ```

use celery_core::registry;
use celery_core::task::TaskArgs;
use celery_core::{Signature, TaskContext, TaskError};
use serde_json::Value;

/// `celery.map(task, it)`: `task(item)` for each item.
#[celery_core::task(name = "celery.map")]
async fn map(ctx: TaskContext, task: Value, it: Vec<Value>) -> Result<Vec<Value>, TaskError> {
    run_each(ctx, &task, it.into_iter().map(|item| vec![item])).await
}

/// `celery.starmap(task, it)`: `task(*args)` for each argument list.
#[celery_core::task(name = "celery.starmap")]
async fn starmap(ctx: TaskContext, task: Value, it: Vec<Vec<Value>>) -> Result<Vec<Value>, TaskError> {
    run_each(ctx, &task, it.into_iter()).await
}

async fn run_each(
    ctx: TaskContext,
    task: &Value,
    calls: impl Iterator<Item = Vec<Value>>,
) -> Result<Vec<Value>, TaskError> {
    let sig = Signature::from_json(task).map_err(|e| TaskError::invalid_arguments(format!("`task`: {e}")))?;
    let entry = registry::lookup(&sig.task)
        .ok_or_else(|| TaskError::new("NotRegistered", format!("task `{}` is not registered here", sig.task)))?;
    let mut out = Vec::new();
    for item in calls {
        let mut args = sig.args.clone();
        args.extend(item);
        out.push((entry.run)(ctx.clone(), TaskArgs { args, kwargs: sig.kwargs.clone() }).await?);
    }
    Ok(out)
}

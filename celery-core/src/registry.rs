//! The task registry: every `#[task]` linked into a binary submits an entry through `inventory`, so a
//! worker finds its tasks without manual registration.
//!
//! ```
//! // Tasks defined with #[task] anywhere in the binary show up here.
//! for entry in celery_core::registry::tasks() {
//!     println!("{}", entry.name);
//! }
//! assert!(celery_core::registry::lookup("surely-not-registered").is_none());
//! ```

use std::collections::HashMap;
use std::sync::OnceLock;

use crate::task::{TaskArgs, TaskContext, TaskFuture, TaskOptions};

/// One registered task.
#[derive(Debug)]
pub struct TaskEntry {
    /// The registered name.
    pub name: &'static str,
    /// The task's options.
    pub options: fn() -> TaskOptions,
    /// Decodes the arguments and runs the task.
    pub run: fn(TaskContext, TaskArgs) -> TaskFuture,
    /// True for plain functions, which run on the blocking pool.
    pub blocking: bool,
}

inventory::collect!(TaskEntry);

fn index() -> &'static HashMap<&'static str, &'static TaskEntry> {
    static INDEX: OnceLock<HashMap<&'static str, &'static TaskEntry>> = OnceLock::new();
    INDEX.get_or_init(|| {
        let mut m = HashMap::new();
        for e in inventory::iter::<TaskEntry> {
            if m.insert(e.name, e).is_some() {
                tracing::warn!(task = e.name, "two tasks are registered under the same name; one wins");
            }
        }
        m
    })
}

/// The task registered under `name`.
pub fn lookup(name: &str) -> Option<&'static TaskEntry> {
    index().get(name).copied()
}

/// Every registered task, sorted by name.
pub fn tasks() -> Vec<&'static TaskEntry> {
    let mut v: Vec<_> = index().values().copied().collect();
    v.sort_by_key(|e| e.name);
    v
}

//! The worker runtime and the command line a user's binary embeds.
//!
//! ```no_run
//! use celery_worker::prelude::*;
//!
//! #[task]
//! async fn add(x: i64, y: i64) -> i64 {
//!     x + y
//! }
//!
//! fn main() -> std::process::ExitCode {
//!     // `mybin worker -Q celery -c 16`, `mybin send add --args '[2, 3]' --wait`, ...
//!     celery_worker::cli::run()
//! }
//! ```
//!
//! A task's arguments and result travel as JSON; a type that is not `Serialize + DeserializeOwned`
//! is a compile error that says so:
//!
//! ```compile_fail
//! use celery_worker::prelude::*;
//! struct NotSerde;
//! #[task]
//! async fn bad(x: NotSerde) -> u32 { 1 }
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs, unreachable_pub, missing_debug_implementations)]

pub mod beat;
pub mod bench;
mod builtins;
pub mod cli;
pub mod control;
pub mod events;
pub mod metrics;
pub mod monitor;
#[cfg(feature = "otel")]
pub mod otlp;
pub mod outbox;
pub mod worker;

pub use worker::{Worker, WorkerConfig, WorkerError, WorkerStats};

/// celery-core, for the code `#[task]` expands to in crates that depend only on this one.
#[doc(hidden)]
pub use celery_core as __core;

/// Everything a task module and a producer need.
pub mod prelude {
    pub use celery_core::schedule::Schedule;
    pub use celery_core::{task, App, AsyncResult, Signature, Task, TaskContext, TaskError, TaskOptions, TaskState};
    pub use std::time::Duration;

    pub use crate::outbox::SendInTransaction;
    pub use crate::{Worker, WorkerConfig};
}

/// Connects an [`App`](celery_core::App) by URL, with every broker and backend of this build linked.
///
/// ```no_run
/// # async fn demo() -> Result<(), celery_core::AppError> {
/// let app = celery_worker::connect("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/1").await?;
/// # Ok(()) }
/// ```
pub async fn connect(broker: &str, backend: &str) -> Result<celery_core::App, celery_core::AppError> {
    link_backends();
    celery_core::App::connect(broker, backend).await
}

/// Keeps the backend crates (and their URL scheme registrations) in the final binary.
pub(crate) fn link_backends() {
    broker_backends::link();
    result_backends::link();
}

//! Result backends: `log://` (in the built-in broker's directory), `memory://` for tests, `redis://` in
//! Celery's `celery-task-meta-<id>` layout, `rpc://`, and `db+postgresql://` in Celery's database tables
//! (`django-db+postgresql://` in django-celery-results' table), each registered under its URL scheme so
//! [`celery_core::App::connect`] finds it.
//!
//! ```no_run
//! # async fn demo() -> Result<(), celery_core::BackendError> {
//! let backend = celery_core::scheme::connect_backend("redis://127.0.0.1:6379/1").await?;
//! println!("{:?}", backend.get("some-task-id").await?);
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs, unreachable_pub, missing_debug_implementations)]

#[cfg(any(feature = "redis", feature = "postgres"))]
mod batches;
#[cfg(feature = "log")]
pub mod log;
pub mod memory;
#[cfg(feature = "postgres")]
pub mod postgres;
#[cfg(feature = "redis")]
pub mod redis;
#[cfg(feature = "rpc")]
pub mod rpc;
#[cfg(any(feature = "redis", feature = "postgres"))]
mod waiting;

/// Forces this crate (and its scheme registrations) to be linked; `celery-worker` calls it.
pub fn link() {}

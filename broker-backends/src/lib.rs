//! Brokers: `log://` (the built-in durable log), `memory://` for tests, `redis://` in Kombu's layout,
//! `amqp://` (RabbitMQ) and `postgres://` (tables in PostgreSQL), each registered under its URL
//! scheme so [`celery_core::App::connect`] finds it.
//!
//! ```no_run
//! # async fn demo() -> Result<(), celery_core::BrokerError> {
//! let broker = celery_core::scheme::connect_broker("redis://127.0.0.1:6379/0?visibility_timeout=600").await?;
//! println!("{} messages waiting", broker.queue_len("celery").await?);
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs, unreachable_pub, missing_debug_implementations)]

#[cfg(feature = "amqp")]
pub mod amqp;
#[cfg(any(feature = "redis", feature = "postgres"))]
pub mod consumer;
pub(crate) mod envelope;
#[cfg(any(test, feature = "fuzzing"))]
#[doc(hidden)]
pub mod fuzzing;
#[cfg(any(feature = "redis", feature = "postgres"))]
pub(crate) mod liveness;
#[cfg(feature = "log")]
pub mod log;
pub mod memory;
#[cfg(feature = "postgres")]
pub mod postgres;
#[cfg(feature = "redis")]
pub mod redis;

/// Forces this crate (and its scheme registrations) to be linked; `celery-worker` calls it.
pub fn link() {}

/// Counts a connection to the broker re-established after a loss (the Prometheus counter
/// `celery_broker_reconnects_total{broker}`, when a recorder is installed).
pub(crate) fn reconnected(broker: &'static str) {
    metrics::counter!("celery_broker_reconnects_total", "broker" => broker).increment(1);
}

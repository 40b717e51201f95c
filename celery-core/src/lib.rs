//! The vocabulary of the task queue: Celery's message protocol v2, the task model and its registry,
//! signatures, routing, the [`Broker`](broker::Broker) and [`ResultBackend`](backend::ResultBackend)
//! traits, and the producer API ([`App`], [`AsyncResult`]).
//!
//! ```
//! use celery_core::{Signature, protocol::Message};
//! let sig = Signature::by_name("add").args(serde_json::json!([2, 3]));
//! let msg = Message::from_signature(&sig).unwrap();
//! assert_eq!(msg.headers.task, "add");
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs, unreachable_pub, missing_debug_implementations)]

pub mod app;
pub mod backend;
pub mod backoff;
pub mod broker;
pub mod capability;
pub mod clock;
pub mod error;
pub mod event;
pub mod flow;
pub mod group;
pub mod history;
pub mod progress;
pub mod protocol;
pub mod rate;
pub mod registry;
pub mod routing;
pub mod schedule;
pub mod scheme;
pub mod signature;
pub mod state;
pub mod sync;
pub mod task;
pub mod trace;
pub mod url;

pub use app::{App, AppConfig, AsyncResult};
pub use backend::{ChordMember, ResultBackend, TaskMeta};
pub use broker::{Broker, Consumer, Delivery, QueueStats};
pub use error::{AppError, BackendError, BrokerError, ErrorKind, ProtocolError, ResultError};
pub use group::GroupResult;
pub use signature::Signature;
pub use state::TaskState;
pub use task::{Task, TaskContext, TaskError, TaskOptions};

/// Marks an `async fn` or a plain `fn` as a task. See the crate `celery-macros` for the options.
pub use celery_macros::task;

/// Items the `#[task]` macro expands to. Not a public API.
#[doc(hidden)]
pub mod __private {
    pub use inventory;
    pub use serde;
    pub use serde_json;

    pub use crate::task::{assert_task_argument, decode_arg, run_blocking, IntoTaskResult, TaskArgs};
}

//! Errors of the log store: [`LogError`], with a [`kind`](LogError::kind) in the core's terms
//! (`celery_core::error::ErrorKind`), so a caller of the store decides on retries the way it does
//! for any broker. Converted to a [`BrokerError`] it keeps itself as the source.

use std::path::{Path, PathBuf};

use celery_core::error::ErrorKind;
use celery_core::BrokerError;

/// A failure of the log store.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LogError {
    /// A file operation failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// Data on disk is corrupt in a way that is not a torn tail; the partition is not served.
    #[error("{path}: corrupt log at offset {offset}: {reason}")]
    Corrupt {
        /// The segment.
        path: PathBuf,
        /// The first offset that cannot be read.
        offset: u64,
        /// What is wrong.
        reason: String,
    },
    /// Another process owns the directory.
    #[error("{path} is owned by process {pid}")]
    Locked {
        /// The data directory.
        path: PathBuf,
        /// The owner.
        pid: String,
    },
    /// The store is shutting down.
    #[error("the log store is closed")]
    Closed,
    /// A bad argument.
    #[error("{0}")]
    Invalid(String),
    /// A name that cannot become a path.
    #[error("invalid {what} name `{name}`: {reason}")]
    InvalidName {
        /// What it names (`queue`, `stream group`).
        what: &'static str,
        /// The name (escaped, shortened).
        name: String,
        /// Why.
        reason: String,
    },
    /// Input over a configured size limit; nothing was stored.
    #[error("{what} of {size} bytes is over the limit of {limit} bytes ({option}=)")]
    TooLarge {
        /// What was too large.
        what: &'static str,
        /// Its size.
        size: usize,
        /// The limit.
        limit: usize,
        /// The URL option that sets the limit.
        option: &'static str,
    },
    /// Creating one more queue would pass `max_queues`.
    #[error("cannot create queue `{queue}`: the directory holds {limit} queues, the limit (max_queues=)")]
    TooManyQueues {
        /// The queue that was not created.
        queue: String,
        /// The limit.
        limit: usize,
    },
    /// An exchange, binding or route the routing model refuses.
    #[error(transparent)]
    Route(#[from] celery_core::routing::RouteError),
    /// A document that does not encode or decode as JSON (a routing table, a chord member).
    #[error("{what}: {source}")]
    Json {
        /// What was being encoded or decoded.
        what: &'static str,
        /// The cause.
        source: serde_json::Error,
    },
    /// A TLS certificate, key or setting that cannot be used.
    #[error("{context}: {source}")]
    Tls {
        /// The setting or file, and what was being done.
        context: String,
        /// The cause (rustls, a PEM reader, or what was found).
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The queue's files are damaged; it is set aside (not served) until repaired, and the other
    /// queues keep working.
    #[error("queue `{queue}` is quarantined: {reason}")]
    Quarantined {
        /// The queue.
        queue: String,
        /// What was found.
        reason: String,
    },
}

impl LogError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> LogError {
        LogError::Io { path: path.to_owned(), source }
    }

    /// What the failure means for the caller: [`Closed`](LogError::Closed) is a connection
    /// failure (the store is going away; its next owner may serve the same request), everything
    /// else a failed operation (a bad argument, a limit, a failing disk, damaged data), which
    /// retrying as is does not fix.
    ///
    /// ```
    /// use broker_backends::log::LogError;
    /// use celery_core::error::ErrorKind;
    /// assert_eq!(LogError::Closed.kind(), ErrorKind::Connection);
    /// assert!(LogError::Closed.is_retryable());
    /// assert!(!LogError::Invalid("bad".into()).is_retryable());
    /// ```
    pub fn kind(&self) -> ErrorKind {
        match self {
            LogError::Closed => ErrorKind::Connection,
            _ => ErrorKind::Operation,
        }
    }

    /// True when the operation may succeed if retried (after a reconnect).
    pub fn is_retryable(&self) -> bool {
        self.kind() == ErrorKind::Connection
    }
}

impl From<LogError> for BrokerError {
    /// A broker error of the same kind, with the store's error as its source.
    fn from(e: LogError) -> BrokerError {
        BrokerError::of_kind(e.kind(), "log store", e)
    }
}

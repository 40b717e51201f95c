//! Errors of the log store.

use std::path::{Path, PathBuf};

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
}

impl From<LogError> for BrokerError {
    fn from(e: LogError) -> BrokerError {
        match e {
            LogError::Closed => BrokerError::connection(e.to_string()),
            other => BrokerError::operation(other.to_string()),
        }
    }
}

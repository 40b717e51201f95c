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
}

impl LogError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> LogError {
        LogError::Io { path: path.to_owned(), source }
    }
}

impl From<LogError> for BrokerError {
    fn from(e: LogError) -> BrokerError {
        match e {
            LogError::Closed => BrokerError::Connection(e.to_string()),
            other => BrokerError::Operation(other.to_string()),
        }
    }
}

//! Error types, one per layer, each `#[non_exhaustive]` with the predicates callers decide on.

use std::time::Duration;

use thiserror::Error;

/// A message that cannot be decoded: the field at fault is named.
#[derive(Debug, Error, Clone, PartialEq)]
#[non_exhaustive]
pub enum ProtocolError {
    /// The payload is not JSON.
    #[error("message is not valid JSON: {0}")]
    InvalidJson(String),
    /// A required field is missing.
    #[error("message lacks the `{0}` field")]
    MissingField(&'static str),
    /// A field has the wrong type or value.
    #[error("message field `{field}` is invalid: {reason}")]
    InvalidField {
        /// The field's name.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// A content type we never execute (pickle, yaml, msgpack, ...).
    #[error("content type `{0}` is not supported (only application/json)")]
    UnsupportedContentType(String),
    /// The message is larger than the configured limit.
    #[error("message of {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge {
        /// Encoded size in bytes.
        size: usize,
        /// The limit in bytes.
        limit: usize,
    },
    /// A task message whose headers do not parse, though its task id could be read: the worker
    /// stores FAILURE for that id (so a waiting caller fails fast) before dead-lettering it.
    #[error("{error} (task id `{id}`)")]
    InvalidHeaders {
        /// The task id, read leniently.
        id: String,
        /// The task name, when it could be read.
        task: Option<String>,
        /// The caller's reply queue (rpc results), when the broker knows it.
        reply_to: Option<String>,
        /// Why the headers do not parse.
        error: Box<ProtocolError>,
    },
}

impl ProtocolError {
    /// The task id a malformed message still names ([`ProtocolError::InvalidHeaders`]).
    pub fn task_id(&self) -> Option<&str> {
        match self {
            ProtocolError::InvalidHeaders { id, .. } => Some(id),
            _ => None,
        }
    }

    /// The same error, naming the caller's reply queue for [`ProtocolError::InvalidHeaders`].
    pub fn with_reply_to(self, reply: Option<&str>) -> ProtocolError {
        match self {
            ProtocolError::InvalidHeaders { id, task, reply_to, error } => ProtocolError::InvalidHeaders {
                id,
                task,
                reply_to: reply_to.or_else(|| reply.map(str::to_owned)),
                error,
            },
            other => other,
        }
    }
}

/// A failure of a broker operation.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum BrokerError {
    /// The connection failed or was lost; retrying later may succeed.
    #[error("broker connection error: {0}")]
    Connection(String),
    /// The broker refused or failed the operation.
    #[error("broker error: {0}")]
    Operation(String),
    /// The URL is malformed or names an unknown option.
    #[error("invalid broker URL `{url}`: {reason}")]
    InvalidUrl {
        /// The URL, redacted (see [`crate::url::ServiceUrl`]).
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// No broker is registered for the URL's scheme.
    #[error("no broker for scheme `{0}` (is its cargo feature enabled?)")]
    UnknownScheme(String),
    /// The broker does not support an option.
    #[error("the {broker} broker does not support {option}")]
    Unsupported {
        /// The broker's name.
        broker: &'static str,
        /// The option.
        option: String,
    },
    /// A message could not be encoded or decoded.
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
}

impl BrokerError {
    /// True when the operation may succeed if retried after a reconnect.
    pub fn is_retryable(&self) -> bool {
        matches!(self, BrokerError::Connection(_))
    }
}

/// A failure of a result-backend operation.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum BackendError {
    /// The connection failed or was lost; retrying later may succeed.
    #[error("result backend connection error: {0}")]
    Connection(String),
    /// The backend failed the operation.
    #[error("result backend error: {0}")]
    Operation(String),
    /// The URL is malformed or names an unknown option.
    #[error("invalid result backend URL `{url}`: {reason}")]
    InvalidUrl {
        /// The URL, redacted (see [`crate::url::ServiceUrl`]).
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// No backend is registered for the URL's scheme.
    #[error("no result backend for scheme `{0}` (is its cargo feature enabled?)")]
    UnknownScheme(String),
    /// A stored value is not a Celery result document.
    #[error("stored result is malformed: {0}")]
    Malformed(String),
    /// The backend cannot do this (chords on `rpc://`, as in Celery).
    #[error("the {backend} result backend does not support {what}")]
    Unsupported {
        /// The backend's name.
        backend: &'static str,
        /// What it cannot do.
        what: &'static str,
    },
}

impl From<crate::url::UrlError> for BrokerError {
    fn from(e: crate::url::UrlError) -> Self {
        BrokerError::InvalidUrl { url: e.url().to_owned(), reason: e.reason().to_owned() }
    }
}

impl From<crate::url::UrlError> for BackendError {
    fn from(e: crate::url::UrlError) -> Self {
        BackendError::InvalidUrl { url: e.url().to_owned(), reason: e.reason().to_owned() }
    }
}

impl BackendError {
    /// True when the operation may succeed if retried after a reconnect.
    pub fn is_retryable(&self) -> bool {
        matches!(self, BackendError::Connection(_))
    }
}

/// A failure of the producer API.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum AppError {
    /// The broker failed.
    #[error(transparent)]
    Broker(#[from] BrokerError),
    /// The result backend failed.
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// The message could not be built.
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
}

impl AppError {
    /// True when connecting again later may succeed (the broker or backend was unreachable).
    pub fn is_retryable(&self) -> bool {
        match self {
            AppError::Broker(e) => e.is_retryable(),
            AppError::Backend(e) => e.is_retryable(),
            AppError::Protocol(_) => false,
        }
    }
}

/// Why `AsyncResult::get` did not return a value.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum ResultError {
    /// No ready state within the timeout.
    #[error("timed out after {0:?} waiting for the result")]
    Timeout(Duration),
    /// The task failed.
    #[error("task failed: {exc_type}: {message}")]
    Failed {
        /// The exception type (`ValueError`, `TimeLimitExceeded`, ...).
        exc_type: String,
        /// The error message.
        message: String,
        /// The traceback or error chain, if any.
        traceback: Option<String>,
    },
    /// The task was revoked (or expired before it ran).
    #[error("task was revoked")]
    Revoked,
    /// The result could not be converted to the requested type.
    #[error("result has an unexpected type: {0}")]
    Decode(String),
    /// The backend failed.
    #[error(transparent)]
    Backend(#[from] BackendError),
}

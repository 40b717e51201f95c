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

/// A boxed error kept as the [`source`](std::error::Error::source) of ours, so that the underlying
/// client's error (redis, lapin, tokio-postgres, io) is never flattened into a string and lost.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// What a failure means for the caller, in lapin's spirit: one kind per decision a caller makes.
///
/// ```
/// use celery_core::error::{BrokerError, ErrorKind};
/// let e = BrokerError::connection_with("publish to `celery`", std::io::Error::other("reset"));
/// assert_eq!(e.kind(), ErrorKind::Connection);
/// assert!(e.is_retryable() && !e.is_fatal() && !e.is_message_fault());
/// assert_eq!(e.to_string(), "broker connection error: publish to `celery`: reset");
/// assert!(std::error::Error::source(&e).is_some());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The connection failed or was lost: the same operation may succeed after a reconnect.
    Connection,
    /// The server refused or failed the operation; retrying as is will not help, but the
    /// process may go on.
    Operation,
    /// The message (or stored document) is at fault: dead-letter it, never retry it.
    Message,
    /// The configuration is wrong (URL, scheme, an option the backend lacks): fatal until changed.
    Config,
}

/// `connection`, `connection_with`, `operation` and `operation_with`: the constructors of the
/// `Connection { context, source }` and `Operation { context, source }` variants of `$ty`.
macro_rules! context_constructors {
    ($ty:ident, $who:literal) => {
        /// A lost or failed connection, with no underlying error to keep.
        pub fn connection(context: impl Into<String>) -> Self {
            $ty::Connection { context: context.into(), source: None }
        }

        /// A lost or failed connection, keeping the client library's error as the source.
        pub fn connection_with(context: impl Into<String>, source: impl Into<BoxError>) -> Self {
            $ty::Connection { context: context.into(), source: Some(source.into()) }
        }

        #[doc = concat!("An operation the ", $who, " refused or failed, with no underlying error to keep.")]
        pub fn operation(context: impl Into<String>) -> Self {
            $ty::Operation { context: context.into(), source: None }
        }

        #[doc = concat!("An operation the ", $who, " refused or failed, keeping the client library's error as the source.")]
        pub fn operation_with(context: impl Into<String>, source: impl Into<BoxError>) -> Self {
            $ty::Operation { context: context.into(), source: Some(source.into()) }
        }

        /// A connection error when `kind` is [`ErrorKind::Connection`], else an operation error:
        /// how a client library's error, judged by its backend's classification, becomes ours.
        pub fn of_kind(kind: ErrorKind, context: impl Into<String>, source: impl Into<BoxError>) -> Self {
            match kind {
                ErrorKind::Connection => Self::connection_with(context, source),
                _ => Self::operation_with(context, source),
            }
        }
    };
}

/// `is_retryable`, `is_fatal` and `is_message_fault`, read off the type's `kind()`.
macro_rules! kind_queries {
    () => {
        /// True when the operation may succeed if retried after a reconnect
        /// ([`ErrorKind::Connection`]).
        pub fn is_retryable(&self) -> bool {
            self.kind() == ErrorKind::Connection
        }

        /// True when no retry can help until the configuration changes: a bad URL, an unknown
        /// scheme, an option or capability the backend lacks ([`ErrorKind::Config`]).
        pub fn is_fatal(&self) -> bool {
            self.kind() == ErrorKind::Config
        }

        /// True when the message (or the stored document) is at fault: dead-letter it with this
        /// error as the reason, never retry it ([`ErrorKind::Message`]).
        pub fn is_message_fault(&self) -> bool {
            self.kind() == ErrorKind::Message
        }
    };
}

/// `": source"`, or nothing: the Display of our errors ends with their source's, so a log line
/// that prints only `{error}` still says what the client library said.
fn caused_by(source: &Option<BoxError>) -> String {
    match source {
        Some(s) => format!(": {s}"),
        None => String::new(),
    }
}

/// A failure of a broker operation.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum BrokerError {
    /// The connection failed or was lost; retrying later may succeed.
    #[error("broker connection error: {context}{}", caused_by(.source))]
    Connection {
        /// What was being done.
        context: String,
        /// The client library's error, when there is one.
        #[source]
        source: Option<BoxError>,
    },
    /// The broker refused or failed the operation.
    #[error("broker error: {context}{}", caused_by(.source))]
    Operation {
        /// What was being done, or what the broker said.
        context: String,
        /// The client library's error, when there is one.
        #[source]
        source: Option<BoxError>,
    },
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
    context_constructors!(BrokerError, "broker");

    /// What the failure means for the caller.
    pub fn kind(&self) -> ErrorKind {
        match self {
            BrokerError::Connection { .. } => ErrorKind::Connection,
            BrokerError::Operation { .. } => ErrorKind::Operation,
            BrokerError::Protocol(_) => ErrorKind::Message,
            BrokerError::InvalidUrl { .. } | BrokerError::UnknownScheme(_) | BrokerError::Unsupported { .. } => {
                ErrorKind::Config
            }
        }
    }

    kind_queries!();
}

/// A failure of a result-backend operation.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum BackendError {
    /// The connection failed or was lost; retrying later may succeed.
    #[error("result backend connection error: {context}{}", caused_by(.source))]
    Connection {
        /// What was being done.
        context: String,
        /// The client library's error, when there is one.
        #[source]
        source: Option<BoxError>,
    },
    /// The backend failed the operation.
    #[error("result backend error: {context}{}", caused_by(.source))]
    Operation {
        /// What was being done, or what the backend said.
        context: String,
        /// The client library's error, when there is one.
        #[source]
        source: Option<BoxError>,
    },
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

impl From<BrokerError> for BackendError {
    /// A broker's error met by a result backend that reaches its results through a broker (the
    /// built-in store, `rpc://`): a bad URL stays one, a connection or operation error keeps its
    /// context and source, anything else is kept as the source of an error of its kind.
    fn from(e: BrokerError) -> Self {
        match e {
            BrokerError::InvalidUrl { url, reason } => BackendError::InvalidUrl { url, reason },
            BrokerError::UnknownScheme(scheme) => BackendError::UnknownScheme(scheme),
            BrokerError::Connection { context, source } => BackendError::Connection { context, source },
            BrokerError::Operation { context, source } => BackendError::Operation { context, source },
            other => BackendError::of_kind(other.kind(), "broker", other),
        }
    }
}

impl BackendError {
    context_constructors!(BackendError, "backend");

    /// What the failure means for the caller.
    pub fn kind(&self) -> ErrorKind {
        match self {
            BackendError::Connection { .. } => ErrorKind::Connection,
            BackendError::Operation { .. } => ErrorKind::Operation,
            BackendError::Malformed(_) => ErrorKind::Message,
            BackendError::InvalidUrl { .. } | BackendError::UnknownScheme(_) | BackendError::Unsupported { .. } => {
                ErrorKind::Config
            }
        }
    }

    kind_queries!();
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
    /// What the failure means for the caller.
    pub fn kind(&self) -> ErrorKind {
        match self {
            AppError::Broker(e) => e.kind(),
            AppError::Backend(e) => e.kind(),
            AppError::Protocol(_) => ErrorKind::Message,
        }
    }

    kind_queries!();
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

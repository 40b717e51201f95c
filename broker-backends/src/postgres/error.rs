//! Errors of the shared PostgreSQL code (URL, TLS, pool, migrations, statements) and the one place
//! a driver error is judged.
//!
//! [`PgError`] is neither the broker's error nor the result backend's: each converts it into its
//! own (`From<PgError>` for [`BrokerError`] and [`BackendError`]), keeping the kind and the
//! driver's error as the source, so neither side converts the other's.
//!
//! How a [`tokio_postgres::Error`] is judged ([`kind_of`]):
//! - [`ErrorKind::Connection`] (retry after a reconnect): the connection is closed
//!   ([`tokio_postgres::Error::is_closed`]) or failed on I/O; the driver timed out or lost track of
//!   the stream; or the server said so by SQLSTATE: class 08 (connection exception), 57P
//!   (shutting down, starting up), 53 (insufficient resources: too many connections, out of
//!   memory, disk full), 58030 (I/O error), or the statement lost a race (40001 serialization
//!   failure, 40P01 deadlock, 55P03 lock not available).
//! - [`ErrorKind::Operation`]: everything else: the statement or the data is at fault, and trying
//!   again gives the same answer.
//!
//! ```
//! use broker_backends::postgres::error::PgError;
//! use celery_core::error::ErrorKind;
//! let e = PgError::operation("store a document of 20 MiB: larger than 16 MiB");
//! assert_eq!(e.kind(), ErrorKind::Operation);
//! let b: celery_core::BrokerError = e.into();
//! assert_eq!(b.to_string(), "broker error: postgresql: store a document of 20 MiB: larger than 16 MiB");
//! ```

use celery_core::error::{BoxError, ErrorKind};
use celery_core::{BackendError, BrokerError};
use tokio_postgres::error::SqlState;

/// A failure of the shared PostgreSQL code.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PgError {
    /// The connection failed or was lost, the server is going away, or the statement lost a race:
    /// the same statement may pass after a reconnect.
    #[error("postgresql: {context}{}", caused_by(.source))]
    Connection {
        /// What was being done, and what the server or the driver said.
        context: String,
        /// The driver's (or the pool's) error.
        #[source]
        source: Option<BoxError>,
    },
    /// The statement or the data is at fault.
    #[error("postgresql: {context}{}", caused_by(.source))]
    Operation {
        /// What was being done, and what the server or the driver said.
        context: String,
        /// The driver's (or the pool's) error.
        #[source]
        source: Option<BoxError>,
    },
    /// The URL is malformed or names an unknown option.
    #[error("invalid PostgreSQL URL `{url}`: {reason}")]
    InvalidUrl {
        /// The URL, redacted.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
}

fn caused_by(source: &Option<BoxError>) -> String {
    source.as_ref().map_or_else(String::new, |s| format!(": {s}"))
}

impl PgError {
    /// A driver error met while doing `what`, judged by [`kind_of`]; the driver's error is kept as
    /// the source, and what it says beyond its one-line `Display` (the server's message and
    /// SQLSTATE, or the I/O cause) goes into the context.
    pub fn driver(what: &str, e: tokio_postgres::Error) -> PgError {
        let detail = detail(&e);
        let context = if detail.is_empty() { what.to_owned() } else { format!("{what}: {detail}") };
        match kind_of(&e) {
            ErrorKind::Connection => PgError::Connection { context, source: Some(Box::new(e)) },
            _ => PgError::Operation { context, source: Some(Box::new(e)) },
        }
    }

    /// `|e| PgError::driver(what, e)`, for `map_err`.
    ///
    /// ```no_run
    /// # async fn demo(client: &tokio_postgres::Client) -> Result<(), celery_core::BackendError> {
    /// use broker_backends::postgres::error::PgError;
    /// client.execute("DELETE FROM celery_taskmeta WHERE task_id = $1", &[&"t1"]).await.map_err(PgError::at("forget"))?;
    /// # Ok(()) }
    /// ```
    pub fn at(what: &'static str) -> impl Fn(tokio_postgres::Error) -> PgError {
        move |e| PgError::driver(what, e)
    }

    /// A pool error met while doing `what`: a connection that could not be opened is judged as a
    /// driver error; a wait for a free connection that timed out is a connection error.
    pub fn pool(what: &str, e: deadpool_postgres::PoolError) -> PgError {
        use deadpool_postgres::PoolError;
        match e {
            PoolError::Backend(e) => PgError::driver(what, e),
            e @ (PoolError::Timeout(_) | PoolError::Closed) => {
                PgError::Connection { context: format!("{what}: no pooled connection"), source: Some(Box::new(e)) }
            }
            other => PgError::Operation { context: format!("{what}: pool"), source: Some(Box::new(other)) },
        }
    }

    /// An operation refused by our own checks, with no underlying error.
    pub fn operation(context: impl Into<String>) -> PgError {
        PgError::Operation { context: context.into(), source: None }
    }

    /// What the failure means for the caller.
    pub fn kind(&self) -> ErrorKind {
        match self {
            PgError::Connection { .. } => ErrorKind::Connection,
            PgError::Operation { .. } => ErrorKind::Operation,
            PgError::InvalidUrl { .. } => ErrorKind::Config,
        }
    }

    /// True when the operation may pass after a reconnect.
    pub fn is_retryable(&self) -> bool {
        self.kind() == ErrorKind::Connection
    }
}

/// Whether a driver error is the connection's ([`ErrorKind::Connection`]) or the statement's
/// ([`ErrorKind::Operation`]); see the module's documentation.
pub fn kind_of(e: &tokio_postgres::Error) -> ErrorKind {
    if e.is_closed() {
        return ErrorKind::Connection;
    }
    if let Some(db) = e.as_db_error() {
        return sqlstate_kind(db.code());
    }
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if s.is::<std::io::Error>() {
            return ErrorKind::Connection;
        }
        source = s.source();
    }
    // The driver's own failures without an I/O cause. Its messages are fixed strings: a timeout or
    // a garbled stream ends the connection; a parameter, column or row mismatch is the statement's,
    // and an authentication or configuration failure stays until the configuration changes.
    match e.to_string().as_str() {
        "timeout waiting for server"
        | "unexpected message from server"
        | "error parsing response from server"
        | "error encoding message to server"
        | "error connecting to server" => ErrorKind::Connection,
        _ => ErrorKind::Operation,
    }
}

/// The kind a SQLSTATE stands for.
pub fn sqlstate_kind(code: &SqlState) -> ErrorKind {
    let c = code.code();
    let retryable = c.starts_with("08")
        || c.starts_with("57P")
        || c.starts_with("53")
        || *code == SqlState::IO_ERROR
        || *code == SqlState::T_R_SERIALIZATION_FAILURE
        || *code == SqlState::T_R_DEADLOCK_DETECTED
        || *code == SqlState::LOCK_NOT_AVAILABLE;
    if retryable {
        ErrorKind::Connection
    } else {
        ErrorKind::Operation
    }
}

/// What a driver error says beyond its own `Display` (which the source prints): the server's
/// severity, message and SQLSTATE, or the causes of a connection failure.
fn detail(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return format!("{}: {} (SQLSTATE {})", db.severity(), db.message(), db.code().code());
    }
    let mut parts: Vec<String> = Vec::new();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        let text = s.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        source = s.source();
    }
    parts.join(": ")
}

impl From<celery_core::url::UrlError> for PgError {
    fn from(e: celery_core::url::UrlError) -> Self {
        PgError::InvalidUrl { url: e.url().to_owned(), reason: e.reason().to_owned() }
    }
}

impl From<PgError> for BrokerError {
    fn from(e: PgError) -> Self {
        match e {
            PgError::Connection { context, source } => {
                BrokerError::Connection { context: format!("postgresql: {context}"), source }
            }
            PgError::Operation { context, source } => {
                BrokerError::Operation { context: format!("postgresql: {context}"), source }
            }
            PgError::InvalidUrl { url, reason } => BrokerError::InvalidUrl { url, reason },
        }
    }
}

impl From<PgError> for BackendError {
    fn from(e: PgError) -> Self {
        match e {
            PgError::Connection { context, source } => {
                BackendError::Connection { context: format!("postgresql: {context}"), source }
            }
            PgError::Operation { context, source } => {
                BackendError::Operation { context: format!("postgresql: {context}"), source }
            }
            PgError::InvalidUrl { url, reason } => BackendError::InvalidUrl { url, reason },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlstates_are_judged() {
        for code in [
            SqlState::ADMIN_SHUTDOWN,
            SqlState::CRASH_SHUTDOWN,
            SqlState::CANNOT_CONNECT_NOW,
            SqlState::CONNECTION_FAILURE,
            SqlState::TOO_MANY_CONNECTIONS,
            SqlState::DISK_FULL,
            SqlState::T_R_SERIALIZATION_FAILURE,
            SqlState::T_R_DEADLOCK_DETECTED,
            SqlState::LOCK_NOT_AVAILABLE,
        ] {
            assert_eq!(sqlstate_kind(&code), ErrorKind::Connection, "{}", code.code());
        }
        for code in [
            SqlState::UNDEFINED_TABLE,
            SqlState::UNIQUE_VIOLATION,
            SqlState::SYNTAX_ERROR,
            SqlState::INSUFFICIENT_PRIVILEGE,
            SqlState::PROGRAM_LIMIT_EXCEEDED,
        ] {
            assert_eq!(sqlstate_kind(&code), ErrorKind::Operation, "{}", code.code());
        }
    }

    #[test]
    fn conversions_keep_the_kind_and_the_source() {
        let timeout = tokio_postgres::Error::__private_api_timeout();
        assert_eq!(kind_of(&timeout), ErrorKind::Connection);
        let e = PgError::driver("fetch", timeout);
        assert!(e.is_retryable());
        let b = BrokerError::from(e);
        assert!(b.is_retryable());
        assert_eq!(b.to_string(), "broker connection error: postgresql: fetch: timeout waiting for server");
        let source = std::error::Error::source(&b).expect("the driver's error");
        assert!(source.downcast_ref::<tokio_postgres::Error>().is_some());
        let r = BackendError::from(PgError::operation("a result of 70 MiB"));
        assert!(!r.is_retryable() && !r.is_fatal());
        assert_eq!(r.to_string(), "result backend error: postgresql: a result of 70 MiB");
        let u = BackendError::from(PgError::InvalidUrl { url: "db+postgresql://h".into(), reason: "no user".into() });
        assert!(u.is_fatal());
    }
}

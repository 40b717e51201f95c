//! Redis client errors as ours: one classification, by redis-rs's own predicates, for the broker
//! and the `redis://` result backend. The client's error stays the [`source`](std::error::Error::source).
//!
//! - Connection ([`ErrorKind::Connection`], retryable): an I/O error, a dropped or refused
//!   connection, a timeout. The same command may succeed once the connection is back.
//! - Operation ([`ErrorKind::Operation`]): everything else the server or the client refused (a
//!   script error, a wrong type, authentication, ...). Retrying as is will not help.

use celery_core::{BrokerError, ErrorKind};
use redis::RedisError;

/// What a redis-rs error means for the caller: [`ErrorKind::Connection`] or [`ErrorKind::Operation`].
///
/// ```
/// use celery_core::ErrorKind;
/// let lost = redis::RedisError::from(std::io::Error::from(std::io::ErrorKind::ConnectionReset));
/// assert_eq!(broker_backends::redis::error::kind_of(&lost), ErrorKind::Connection);
/// let refused = redis::RedisError::from((redis::ErrorKind::AuthenticationFailed, "wrong password"));
/// assert_eq!(broker_backends::redis::error::kind_of(&refused), ErrorKind::Operation);
/// ```
pub fn kind_of(e: &RedisError) -> ErrorKind {
    if e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal() || e.is_timeout() {
        ErrorKind::Connection
    } else {
        ErrorKind::Operation
    }
}

/// `e`, met while doing `context`, as a broker error of its [`kind_of`].
pub(crate) fn broker_error(context: impl Into<String>, e: RedisError) -> BrokerError {
    BrokerError::of_kind(kind_of(&e), context, e)
}

/// [`broker_error`] for `map_err`: `.map_err(failed("redis: publish"))`.
pub(crate) fn failed(context: &'static str) -> impl FnOnce(RedisError) -> BrokerError {
    move |e| broker_error(context, e)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_source_is_kept_and_printed_after_the_context() {
        let e = broker_error("redis: publish", RedisError::from(std::io::Error::other("reset by peer")));
        assert!(e.is_retryable());
        assert!(std::error::Error::source(&e).is_some());
        assert_eq!(e.to_string(), "broker connection error: redis: publish: reset by peer");
        let e = failed("redis: bind")(RedisError::from((redis::ErrorKind::UnexpectedReturnType, "not a set")));
        assert_eq!(e.kind(), ErrorKind::Operation);
        assert!(e.to_string().starts_with("broker error: redis: bind: "), "{e}");
    }
}

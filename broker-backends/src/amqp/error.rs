//! lapin errors as ours: one classification for the broker and the `rpc://` result backend. The
//! lapin error stays the [`source`](std::error::Error::source).
//!
//! - Connection ([`ErrorKind::Connection`], retryable): an I/O error, a connection-level (hard)
//!   AMQP error, a connection in a state that cannot carry the call, or a missed heartbeat. The
//!   same call may succeed on a new connection.
//! - Operation ([`ErrorKind::Operation`]): everything else: a channel-level (soft) AMQP error (a
//!   missing queue, an argument RabbitMQ refuses), a closed channel, a frame that does not parse.

use celery_core::{BrokerError, ErrorKind};
use lapin::ErrorKind as Lapin;

/// What a lapin error means for the caller: [`ErrorKind::Connection`] or [`ErrorKind::Operation`].
///
/// ```
/// use celery_core::ErrorKind;
/// let lost = lapin::Error::from(std::io::Error::from(std::io::ErrorKind::ConnectionReset));
/// assert_eq!(broker_backends::amqp::error::kind_of(&lost), ErrorKind::Connection);
/// ```
pub fn kind_of(e: &lapin::Error) -> ErrorKind {
    let lost = e.is_io_error()
        || e.is_amqp_hard_error()
        || matches!(e.kind(), Lapin::InvalidConnectionState(_) | Lapin::MissingHeartbeatError);
    if lost {
        ErrorKind::Connection
    } else {
        ErrorKind::Operation
    }
}

/// `e`, met while doing `context`, as a broker error of its [`kind_of`].
pub(crate) fn broker_error(context: impl Into<String>, e: lapin::Error) -> BrokerError {
    BrokerError::of_kind(kind_of(&e), context, e)
}

/// [`broker_error`] for `map_err`: `.map_err(failed("amqp: publish"))`.
pub(crate) fn failed(context: &'static str) -> impl FnOnce(lapin::Error) -> BrokerError {
    move |e| broker_error(context, e)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lost_connection_is_retryable_and_keeps_its_source() {
        let e = failed("amqp: publish")(lapin::Error::from(std::io::Error::other("reset by peer")));
        assert!(e.is_retryable());
        assert!(std::error::Error::source(&e).is_some());
        assert_eq!(e.to_string(), "broker connection error: amqp: publish: IO error: reset by peer");
        let e = broker_error("amqp: ack", lapin::Error::from(Lapin::InvalidChannel(7)));
        assert_eq!(e.kind(), ErrorKind::Operation);
    }
}

//! The `amqp://` and `amqps://` URL: lapin reads the server part (credentials, host, vhost,
//! `heartbeat`, `frame_max`, ...); the options we read are taken out first:
//! - how task queues are declared: `max_priority=N`, `queue_type=quorum|classic`,
//!   `max_deliveries=N` (see the module docs of [`crate::amqp`]);
//! - TLS on `amqps://`, named as Python's `ssl` module and Celery's `broker_use_ssl` name them:
//!   `ca_certs=PATH` (PEM certificates to trust besides the system's store), `certfile=PATH` and
//!   `keyfile=PATH` (a client certificate, PEM, for servers that ask for one). The files are read
//!   at each (re)connection, so a renewed certificate is picked up without a restart.

use std::path::PathBuf;

use celery_core::url::{redacted, ServiceUrl};
use celery_core::BrokerError;
use lapin::tcp::{OwnedIdentity, OwnedTLSConfig};
use lapin::types::LongString;
use lapin::{Connection, ConnectionProperties};

use super::error::failed;

/// How task queues are declared, from the URL.
#[derive(Debug, Default, Clone, PartialEq)]
pub(super) struct QueueOptions {
    /// `x-max-priority` (`max_priority=N`, 1-255).
    pub(super) max_priority: Option<u8>,
    /// Quorum queues with this `x-delivery-limit` (`queue_type=quorum`, `max_deliveries=N`).
    pub(super) delivery_limit: Option<u32>,
}

/// The TLS files of an `amqps://` URL.
#[derive(Debug, Default, Clone, PartialEq)]
struct TlsFiles {
    ca_certs: Option<PathBuf>,
    certfile: Option<PathBuf>,
    keyfile: Option<PathBuf>,
}

/// The options lapin reads itself (handed through): `heartbeat` (default 30 s here), `frame_max`,
/// `channel_max`, `connection_timeout` (ms) and `auth_mechanism`.
const LAPIN_OPTIONS: [&str; 5] = ["heartbeat", "frame_max", "channel_max", "connection_timeout", "auth_mechanism"];

/// A parsed broker URL. Its `Debug` is redacted.
#[derive(Clone, PartialEq)]
pub(super) struct AmqpUrl {
    /// What lapin connects to (our options removed, `heartbeat=30` added unless named).
    lapin: String,
    pub(super) queues: QueueOptions,
    tls: TlsFiles,
}

impl std::fmt::Debug for AmqpUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqpUrl")
            .field("lapin", &redacted(&self.lapin))
            .field("queues", &self.queues)
            .field("tls", &self.tls)
            .finish()
    }
}

impl AmqpUrl {
    /// Parses `url`; an unknown scheme, an unknown option or a bad value is an error naming it.
    pub(super) fn parse(url: &str) -> Result<AmqpUrl, BrokerError> {
        let u = ServiceUrl::parse(url)?;
        let invalid = |reason: &str| BrokerError::from(u.invalid(reason));
        let tls = match u.scheme() {
            "amqp" => false,
            "amqps" => true,
            _ => return Err(invalid("expected amqp:// or amqps://")),
        };
        if u.fragment().is_some() {
            return Err(invalid("an amqp:// URL takes no #fragment"));
        }
        let mut queues = QueueOptions {
            max_priority: match u.parse_option::<u8>("max_priority", "1 to 255")? {
                Some(0) => return Err(u.bad_value("max_priority", "1 to 255").into()),
                n => n,
            },
            delivery_limit: None,
        };
        let quorum = match u.option("queue_type") {
            None | Some("classic") => false,
            Some("quorum") => true,
            Some(v) => return Err(invalid(&format!("queue_type `{v}` is not classic or quorum"))),
        };
        let max_deliveries = match u.parse_option::<u32>("max_deliveries", "a positive number")? {
            Some(0) => return Err(u.bad_value("max_deliveries", "a positive number").into()),
            n => n.unwrap_or(10),
        };
        let files = TlsFiles {
            ca_certs: u.option("ca_certs").map(PathBuf::from),
            certfile: u.option("certfile").map(PathBuf::from),
            keyfile: u.option("keyfile").map(PathBuf::from),
        };
        if quorum {
            if queues.max_priority.is_some() {
                return Err(invalid("max_priority needs classic queues (not queue_type=quorum)"));
            }
            queues.delivery_limit = Some(max_deliveries);
        }
        if !tls && files != TlsFiles::default() {
            return Err(invalid("ca_certs, certfile and keyfile are TLS options: use amqps://"));
        }
        if files.certfile.is_some() != files.keyfile.is_some() {
            return Err(invalid("a client certificate needs both certfile and keyfile"));
        }
        let mut lapin = u.connection_string(&LAPIN_OPTIONS);
        if u.option("heartbeat").is_none() {
            let any = LAPIN_OPTIONS.iter().any(|n| u.option(n).is_some());
            lapin.push_str(if any { "&heartbeat=30" } else { "?heartbeat=30" });
        }
        u.finish()?;
        Ok(AmqpUrl { lapin, queues, tls: files })
    }

    /// Opens a connection, named `celery-rs <pid>` in RabbitMQ's management UI.
    pub(super) async fn connect(&self) -> Result<Connection, BrokerError> {
        let name = LongString::from(format!("celery-rs {}", std::process::id()));
        let props = ConnectionProperties::default().with_connection_name(name);
        lapin::DefaultConnectionBuilder::new()
            .map_err(failed("amqp: connect"))?
            .with_uri_str(self.lapin.clone())
            .with_properties(props)
            .with_tls_config(self.tls.load()?)
            .connect()
            .await
            .map_err(failed("amqp: connect"))
    }
}

impl TlsFiles {
    /// Reads the files into lapin's TLS settings.
    fn load(&self) -> Result<OwnedTLSConfig, BrokerError> {
        let read = |option: &str, path: &PathBuf| {
            std::fs::read(path).map_err(|e| BrokerError::InvalidUrl {
                url: format!("{option}={}", path.display()),
                reason: format!("cannot read the file: {e}"),
            })
        };
        let cert_chain = match &self.ca_certs {
            Some(p) => Some(String::from_utf8_lossy(&read("ca_certs", p)?).into_owned()),
            None => None,
        };
        let identity = match (&self.certfile, &self.keyfile) {
            (Some(c), Some(k)) => Some(OwnedIdentity::PKCS8 { pem: read("certfile", c)?, key: read("keyfile", k)? }),
            _ => None,
        };
        Ok(OwnedTLSConfig { identity, cert_chain })
    }
}

/// Connects to the server of an `amqp://` or `amqps://` URL (with its TLS options), for other
/// AMQP users in this process such as the `rpc://` result backend.
///
/// ```no_run
/// # async fn demo() -> Result<(), celery_core::BrokerError> {
/// let conn = broker_backends::amqp::connect("amqps://guest:guest@rabbit.example:5671/%2f?ca_certs=/etc/ca.pem").await?;
/// let channel = conn.create_channel().await.map_err(|e| celery_core::BrokerError::connection_with("open a channel", e))?;
/// # Ok(()) }
/// ```
pub async fn connect(url: &str) -> Result<Connection, BrokerError> {
    AmqpUrl::parse(url)?.connect().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn our_options_are_taken_out_and_a_heartbeat_added() {
        let u = AmqpUrl::parse("amqp://h/%2f?max_priority=10&frame_max=8192").unwrap();
        assert_eq!(u.lapin, "amqp://h/%2f?frame_max=8192&heartbeat=30");
        assert_eq!(u.queues, QueueOptions { max_priority: Some(10), delivery_limit: None });
        let u = AmqpUrl::parse("amqp://h/v?queue_type=quorum&heartbeat=5").unwrap();
        assert_eq!((u.lapin.as_str(), u.queues.delivery_limit), ("amqp://h/v?heartbeat=5", Some(10)));
        let u = AmqpUrl::parse("amqps://h/v?ca_certs=/ca.pem&certfile=/c.pem&keyfile=/k.pem").unwrap();
        assert_eq!(u.lapin, "amqps://h/v?heartbeat=30");
        assert_eq!(u.tls.ca_certs, Some(PathBuf::from("/ca.pem")));
    }

    /// Every `amqp://` form accepted today: what reaches lapin, and the queue settings.
    #[test]
    fn accepted_amqp_urls_keep_their_settings() {
        let q = |max_priority, delivery_limit| QueueOptions { max_priority, delivery_limit };
        for (url, lapin, queues) in [
            (
                "amqp://guest:guest@127.0.0.1:5672/%2f",
                "amqp://guest:guest@127.0.0.1:5672/%2f?heartbeat=30",
                q(None, None),
            ),
            ("amqp://h", "amqp://h?heartbeat=30", q(None, None)),
            ("amqp://h/v?heartbeat=10&frame_max=8192", "amqp://h/v?heartbeat=10&frame_max=8192", q(None, None)),
            (
                "amqp://h/v?channel_max=64&connection_timeout=5000&auth_mechanism=plain",
                "amqp://h/v?channel_max=64&connection_timeout=5000&auth_mechanism=plain&heartbeat=30",
                q(None, None),
            ),
            ("amqp://h/v?max_priority=255", "amqp://h/v?heartbeat=30", q(Some(255), None)),
            ("amqp://h/v?queue_type=classic", "amqp://h/v?heartbeat=30", q(None, None)),
            ("amqp://h/v?queue_type=quorum&max_deliveries=4", "amqp://h/v?heartbeat=30", q(None, Some(4))),
            ("amqps://u:p@h:5671/v?ca_certs=/ca.pem", "amqps://u:p@h:5671/v?heartbeat=30", q(None, None)),
        ] {
            let u = AmqpUrl::parse(url).unwrap_or_else(|e| panic!("{url}: {e}"));
            assert_eq!(u.lapin, lapin, "{url}");
            assert_eq!(u.queues, queues, "{url}");
        }
    }

    #[test]
    fn bad_options_are_errors_naming_them() {
        for (url, needle) in [
            ("amqp://h/?max_priority=0", "max_priority"),
            ("amqp://h/?queue_type=stream", "queue_type"),
            ("amqp://h/?queue_type=quorum&max_priority=5", "classic"),
            ("amqp://h/?ca_certs=/ca.pem", "amqps://"),
            ("amqps://h/?certfile=/c.pem", "keyfile"),
            ("redis://h/", "amqp://"),
            ("amqp://h/?heartbeat=5&prefetch=10", "unknown amqp:// option `prefetch`"),
            ("amqp://h/?max_priority=300", "max_priority `300` is not 1 to 255"),
            ("amqp://h/?max_deliveries=0", "max_deliveries"),
        ] {
            let e = AmqpUrl::parse(url).unwrap_err().to_string();
            assert!(e.contains(needle), "{url}: {e}");
        }
    }

    /// An unknown option fails the connect before any connection is tried (port 1 would refuse it).
    #[tokio::test]
    async fn unknown_options_are_refused_on_both_schemes() {
        for url in ["amqp://127.0.0.1:1/%2f?bogus=1", "amqps://127.0.0.1:1/%2f?heartbeat=5&bogus=1"] {
            let e = crate::amqp::AmqpBroker::connect(url).await.unwrap_err();
            assert!(matches!(e, BrokerError::InvalidUrl { .. }) && e.is_fatal(), "{url}: {e:?}");
            assert!(e.to_string().contains("option `bogus`"), "{url}: {e}");
        }
    }

    #[test]
    fn the_password_is_never_printed() {
        let u = AmqpUrl::parse("amqp://guest:hunter2@h/v?bogus=1");
        let e = u.unwrap_err().to_string();
        assert!(e.contains("amqp://guest:***@h/v?bogus=1") && !e.contains("hunter2"), "{e}");
        let u = AmqpUrl::parse("amqps://guest:hunter2@h/v").unwrap();
        let shown = format!("{u:?}");
        assert!(shown.contains("guest:***@h/v") && !shown.contains("hunter2"), "{shown}");
    }

    #[test]
    fn a_missing_tls_file_is_named() {
        let u = AmqpUrl::parse("amqps://h/?ca_certs=/nonexistent/ca.pem").unwrap();
        let e = u.tls.load().unwrap_err().to_string();
        assert!(e.contains("/nonexistent/ca.pem"), "{e}");
    }
}

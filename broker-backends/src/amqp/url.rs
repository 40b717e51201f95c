//! The `amqp://` and `amqps://` URL: lapin reads the server part (credentials, host, vhost,
//! `heartbeat`, `frame_max`, ...); the options we read are taken out first:
//! - how task queues are declared: `max_priority=N`, `queue_type=quorum|classic`,
//!   `max_deliveries=N` (see the module docs of [`crate::amqp`]);
//! - TLS on `amqps://`, named as Python's `ssl` module and Celery's `broker_use_ssl` name them:
//!   `ca_certs=PATH` (PEM certificates to trust besides the system's store), `certfile=PATH` and
//!   `keyfile=PATH` (a client certificate, PEM, for servers that ask for one). The files are read
//!   at each (re)connection, so a renewed certificate is picked up without a restart.
//!
//! A broker URL may list the nodes of a RabbitMQ cluster separated by `;`, as Celery's does
//! (`amqp://u:p@h1:5672//;amqp://u:p@h2:5672//`): [`Nodes`]. Each element is a URL of its own (its
//! own credentials, vhost, TLS files and lapin options, as in Kombu), but the queue options
//! (`queue_type`, `max_deliveries`, `max_priority`) must be the same on every element: they decide
//! how the cluster's queues are declared, and two answers would declare them differently depending
//! on which node answered.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use celery_core::url::{redacted, split_list, ServiceUrl};
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

impl QueueOptions {
    /// True with `queue_type=quorum`.
    pub(super) fn quorum(&self) -> bool {
        self.delivery_limit.is_some()
    }
}

/// How long one connection attempt may take when the URL names no `connection_timeout`, so that a
/// node that does not answer at all (a lost host) cannot hold the failover to the next one.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The most nodes a broker URL may list.
pub const MAX_NODES: usize = 32;

/// A parsed broker URL. Its `Debug` is redacted.
#[derive(Clone, PartialEq)]
pub(super) struct AmqpUrl {
    /// What lapin connects to (our options removed, `heartbeat=30` added unless named).
    lapin: String,
    pub(super) queues: QueueOptions,
    tls: TlsFiles,
    /// The bound of one connection attempt (`connection_timeout` plus a second, or
    /// [`CONNECT_TIMEOUT`]).
    timeout: Duration,
    /// The URL as it may be printed.
    shown: String,
}

impl std::fmt::Debug for AmqpUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqpUrl")
            .field("lapin", &redacted(&self.lapin))
            .field("queues", &self.queues)
            .field("tls", &self.tls)
            .field("timeout", &self.timeout)
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
        let timeout = match u.parse_option::<u64>("connection_timeout", "milliseconds")? {
            Some(ms) => Duration::from_millis(ms).saturating_add(Duration::from_secs(1)),
            None => CONNECT_TIMEOUT,
        };
        let mut lapin = u.connection_string(&LAPIN_OPTIONS);
        if u.option("heartbeat").is_none() {
            let any = LAPIN_OPTIONS.iter().any(|n| u.option(n).is_some());
            lapin.push_str(if any { "&heartbeat=30" } else { "?heartbeat=30" });
        }
        u.finish()?;
        Ok(AmqpUrl { lapin, queues, tls: files, timeout, shown: u.to_string() })
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

    /// [`AmqpUrl::connect`], given up after the URL's timeout.
    async fn connect_bounded(&self) -> Result<Connection, BrokerError> {
        match tokio::time::timeout(self.timeout, self.connect()).await {
            Ok(result) => result,
            Err(_) => Err(BrokerError::connection(format!("amqp: connect: no answer within {:?}", self.timeout))),
        }
    }
}

/// The nodes of a broker URL (one, or a RabbitMQ cluster's listed with `;`) and which of them this
/// process uses now. Connecting tries the nodes round robin, each attempt bounded by the URL's
/// `connection_timeout` (else 10 s), and logs every switch with the URL redacted; after a lost
/// connection it starts at the next node, as Kombu's default `round-robin` failover strategy does.
/// One round that reaches no node is an error: the caller's reconnect loop pauses
/// ([`celery_core::backoff::Reconnect`]) and tries another round.
///
/// ```
/// use broker_backends::amqp::Nodes;
/// let nodes = Nodes::parse("amqp://guest:pw@h1:5672//;amqp://guest:pw@h2:5672//?queue_type=quorum")
///     .unwrap_err();
/// assert!(nodes.to_string().contains("queue options"), "{nodes}");
/// let nodes = Nodes::parse("amqp://guest:pw@h1:5672//;amqp://guest:pw@h2:5672//").unwrap();
/// assert_eq!(nodes.count(), 2);
/// assert_eq!(format!("{nodes:?}"), "Nodes([amqp://guest:***@h1:5672//, amqp://guest:***@h2:5672//])");
/// ```
pub struct Nodes {
    urls: Vec<AmqpUrl>,
    /// The index of the node in use (or to try first).
    current: AtomicUsize,
}

impl std::fmt::Debug for Nodes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Nodes").field(&DebugList(&self.urls)).finish()
    }
}

/// The redacted URLs, without quotes.
struct DebugList<'a>(&'a [AmqpUrl]);

impl std::fmt::Debug for DebugList<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("[")?;
        for (i, u) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            f.write_str(&u.shown)?;
        }
        f.write_str("]")
    }
}

impl Nodes {
    /// Parses a broker URL: one `amqp://` or `amqps://` URL, or several separated by `;` (at most
    /// [`MAX_NODES`]); an empty element, a bad element (the error shows it, redacted) or queue
    /// options that differ between elements are errors.
    pub fn parse(url: &str) -> Result<Nodes, BrokerError> {
        let elements = split_list(url).unwrap_or_else(|| vec![url.trim()]);
        let list = |reason: String| BrokerError::InvalidUrl { url: redacted(url), reason };
        if elements.len() > MAX_NODES {
            return Err(list(format!("{} nodes listed; at most {MAX_NODES}", elements.len())));
        }
        let mut urls: Vec<AmqpUrl> = Vec::with_capacity(elements.len());
        for (i, element) in elements.iter().enumerate() {
            if element.is_empty() {
                return Err(list(format!("node {} of the `;`-separated list is empty", i + 1)));
            }
            let parsed = AmqpUrl::parse(element)?;
            if let Some(first) = urls.first() {
                if first.queues != parsed.queues {
                    return Err(list(format!(
                        "the queue options (queue_type, max_deliveries, max_priority) of node {} ({}) differ from \
                         node 1's ({}): give every node of the list the same",
                        i + 1,
                        parsed.shown,
                        first.shown
                    )));
                }
            }
            urls.push(parsed);
        }
        Ok(Nodes { urls, current: AtomicUsize::new(0) })
    }

    /// How many nodes the URL lists.
    pub fn count(&self) -> usize {
        self.urls.len()
    }

    /// How the queues are declared (the same on every node).
    pub(super) fn queues(&self) -> &QueueOptions {
        &self.urls[0].queues
    }

    /// Connects to the node in use, else to the next that answers (one round).
    pub async fn connect(&self) -> Result<Connection, BrokerError> {
        self.round(0).await
    }

    /// After a lost connection: connects to the next node that answers, the one in use last.
    pub async fn reconnect(&self) -> Result<Connection, BrokerError> {
        self.round(1).await
    }

    /// Tries every node once, from the one `skip` places after the node in use.
    async fn round(&self, skip: usize) -> Result<Connection, BrokerError> {
        let n = self.urls.len();
        let was = self.current.load(Ordering::Relaxed);
        let start = (was + skip) % n;
        let mut last = None;
        for k in 0..n {
            let i = (start + k) % n;
            let url = &self.urls[i];
            match url.connect_bounded().await {
                Ok(conn) => {
                    if i != was {
                        tracing::warn!(from = %self.urls[was].shown, to = %url.shown, "amqp: failed over to another node");
                    } else if skip > 0 && n > 1 {
                        tracing::warn!(node = %url.shown, "amqp: reconnected to the same node (no other answered)");
                    }
                    self.current.store(i, Ordering::Relaxed);
                    return Ok(conn);
                }
                Err(e) if n == 1 => return Err(e),
                Err(e) => {
                    tracing::warn!(node = %url.shown, error = %e, "amqp: node did not answer; trying the next");
                    last = Some(e);
                }
            }
        }
        let shown = self.urls.iter().map(|u| u.shown.as_str()).collect::<Vec<_>>().join(";");
        let context = format!("amqp: none of the {n} nodes answered ({shown})");
        Err(match last {
            Some(e) if e.is_fatal() => e,
            Some(e) => BrokerError::connection_with(context, e),
            None => BrokerError::connection(context),
        })
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

/// Connects to the server of an `amqp://` or `amqps://` URL (with its TLS options), or to the
/// first node that answers of a `;`-separated list ([`Nodes`]), for other AMQP users in this
/// process. A user that reconnects keeps a [`Nodes`] instead, so it fails over.
///
/// ```no_run
/// # async fn demo() -> Result<(), celery_core::BrokerError> {
/// let conn = broker_backends::amqp::connect("amqps://guest:guest@rabbit.example:5671/%2f?ca_certs=/etc/ca.pem").await?;
/// let channel = conn.create_channel().await.map_err(|e| celery_core::BrokerError::connection_with("open a channel", e))?;
/// # Ok(()) }
/// ```
pub async fn connect(url: &str) -> Result<Connection, BrokerError> {
    Nodes::parse(url)?.connect().await
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

    /// Celery's failover form: every element parsed on its own (credentials, vhost, TLS), the
    /// queue options shared.
    #[test]
    fn a_node_list_is_split_on_semicolons() {
        let nodes = Nodes::parse(
            "amqp://a:pa@h1:5672//?queue_type=quorum&max_deliveries=3; amqps://b:pb@h2:5671/v?queue_type=quorum&max_deliveries=3&ca_certs=/ca.pem;amqp://h3?max_deliveries=3&queue_type=quorum&heartbeat=5",
        )
        .unwrap();
        assert_eq!(nodes.count(), 3);
        let lapin: Vec<&str> = nodes.urls.iter().map(|u| u.lapin.as_str()).collect();
        assert_eq!(
            lapin,
            ["amqp://a:pa@h1:5672//?heartbeat=30", "amqps://b:pb@h2:5671/v?heartbeat=30", "amqp://h3?heartbeat=5"]
        );
        assert_eq!(nodes.urls[1].tls.ca_certs, Some(PathBuf::from("/ca.pem")));
        assert_eq!(nodes.queues(), &QueueOptions { max_priority: None, delivery_limit: Some(3) });
        assert!(nodes.queues().quorum());
        let shown = format!("{nodes:?}");
        assert!(
            shown.contains("a:***@h1")
                && shown.contains("b:***@h2")
                && !shown.contains("pa@")
                && !shown.contains("pb@")
        );
        // One URL is a list of one.
        let one = Nodes::parse("amqp://h/%2f").unwrap();
        assert_eq!((one.count(), one.queues().quorum()), (1, false));
    }

    #[test]
    fn a_bad_node_list_is_an_error_that_says_why() {
        let many = vec!["amqp://h"; MAX_NODES + 1].join(";");
        for (url, needle) in [
            ("amqp://h1;amqp://h2?queue_type=quorum", "differ from node 1's"),
            ("amqp://h1?queue_type=quorum;amqp://h2", "queue options"),
            ("amqp://h1?queue_type=quorum&max_deliveries=2;amqp://h2?queue_type=quorum", "node 2"),
            ("amqp://h1?max_priority=5;amqp://h2?max_priority=6", "same"),
            ("amqp://h1;;amqp://h2", "node 2 of the `;`-separated list is empty"),
            ("amqp://h1;", "node 2 of the `;`-separated list is empty"),
            ("amqp://h1;redis://h2", "expected amqp:// or amqps://"),
            ("amqp://h1;amqp://h2?bogus=1", "option `bogus`"),
            ("amqp://h1;amqp://h2?connection_timeout=soon", "connection_timeout"),
            (many.as_str(), "at most 32"),
        ] {
            let e = Nodes::parse(url).unwrap_err();
            assert!(matches!(e, BrokerError::InvalidUrl { .. }) && e.is_fatal(), "{url}: {e:?}");
            assert!(e.to_string().contains(needle), "{url}: {e}");
        }
        let e = Nodes::parse("amqp://u:s3cret@h1;amqp://u:s3cret@h2?queue_type=quorum").unwrap_err().to_string();
        assert!(!e.contains("s3cret") && e.contains("u:***@h2"), "{e}");
    }

    /// Nodes that refuse are skipped in order; one round that reaches none is one error naming
    /// every node, redacted, and the next round starts after the node in use.
    #[tokio::test]
    async fn a_round_that_reaches_no_node_is_a_retryable_error() {
        let nodes = Nodes::parse("amqp://u:s3cret@127.0.0.1:1/%2f;amqp://u:s3cret@127.0.0.1:2/%2f").unwrap();
        let e = nodes.connect().await.unwrap_err();
        assert!(e.is_retryable(), "{e:?}");
        let e = e.to_string();
        assert!(
            e.contains("none of the 2 nodes answered") && e.contains("127.0.0.1:2") && !e.contains("s3cret"),
            "{e}"
        );
        assert_eq!(nodes.current.load(Ordering::Relaxed), 0, "nothing answered: the node in use stays");
    }

    #[test]
    fn a_missing_tls_file_is_named() {
        let u = AmqpUrl::parse("amqps://h/?ca_certs=/nonexistent/ca.pem").unwrap();
        let e = u.tls.load().unwrap_err().to_string();
        assert!(e.contains("/nonexistent/ca.pem"), "{e}");
    }
}

//! The `redis://` URL (also `rediss://`, `redis+unix://`): what reaches the redis client, and our
//! options.
//!
//! - Ours: `visibility_timeout=SECONDS` (default 3600), `global_keyprefix=PREFIX` (Kombu's
//!   transport option of the same name), `min_replicas=N` with `min_replicas_timeout=MS`
//!   (default 1000): a `WAIT N MS` after each publish ([`MinReplicas`]); `worker_heartbeat=SECONDS`
//!   (default 2, from 0.1 to 60) and `worker_grace=SECONDS` (default 10, from twice the heartbeat
//!   to 3600): how often a consumer renews its heartbeat, and how long after the last renewal
//!   another worker restores what it held ([`super::holder`]).
//! - `sentinel://` lists ([`SentinelUrl`]) take the same options; `redis+cluster://` seed lists
//!   ([`ClusterUrl`]) too, plus `shards=N`.
//! - The redis client's own, handed through: `protocol` (`resp2`/`resp3`),
//!   and on unix sockets `db`, `user` and `pass` (a TCP URL's database is its path).
//! - redis-py's `?password=`, moved into the userinfo.
//! - Celery's connection options ([`CELERY_COMPAT_OPTIONS`]), accepted with no effect.
//!
//! Any other option is an error naming it ([`ServiceUrl::finish`]).

use std::sync::Arc;
use std::time::Duration;

use celery_core::url::{redacted, ServiceUrl, UrlError};
use celery_core::BrokerError;

use super::cluster::{is_cluster, ClusterUrl};
use super::connection::{MinReplicas, Target, MAX_REPLICAS, MAX_WAIT_MS};
use super::sentinel::SentinelUrl;

/// Options the redis client reads itself, handed through: `protocol` (`resp2`/`resp3`), and on
/// unix sockets `db`, `user` and `pass` (a TCP URL's database is its path).
const CLIENT_OPTIONS: [&str; 4] = ["db", "protocol", "user", "pass"];

/// Options of Celery's (redis-py's) Redis URLs accepted for compatibility, with no effect here.
pub const CELERY_COMPAT_OPTIONS: [&str; 6] = [
    "ssl_cert_reqs",
    "socket_timeout",
    "socket_connect_timeout",
    "socket_keepalive",
    "health_check_interval",
    "max_connections",
];

/// The URL to hand to the redis client: its own options (`CLIENT_OPTIONS`) kept, redis-py's
/// `?password=` moved into the userinfo, [`CELERY_COMPAT_OPTIONS`] accepted. The caller reads its
/// own options, then calls [`ServiceUrl::finish`]. The result holds the password: never print it.
///
/// ```
/// let u = celery_core::url::ServiceUrl::parse("redis://h:6379/0?password=pw&protocol=resp3&ssl_cert_reqs=none").unwrap();
/// assert_eq!(broker_backends::redis::client_url(&u).unwrap(), "redis://:pw@h:6379/0?protocol=resp3");
/// assert!(u.finish().is_ok());
/// ```
pub fn client_url(u: &ServiceUrl) -> Result<String, UrlError> {
    u.accept(&CELERY_COMPAT_OPTIONS);
    u.accept(&CLIENT_OPTIONS);
    let unix = u.scheme().ends_with("unix");
    if !unix && u.option("db").is_some() {
        // The redis client reads a TCP URL's database from the path only.
        return Err(u.invalid("the database of a TCP URL goes in the path: redis://HOST:6379/N"));
    }
    let Some(password) = u.option_as_written("password") else {
        return Ok(u.connection_string(&CLIENT_OPTIONS));
    };
    if u.has_password() {
        return Err(u.invalid("the password is given twice (in the userinfo and as ?password=)"));
    }
    if unix {
        return Err(u.invalid("on a unix socket the password is ?pass="));
    }
    let mut with = u.clone();
    with.set_password(password);
    Ok(with.connection_string(&CLIENT_OPTIONS))
}

/// `min_replicas=N` (at most 64; 0 or absent: no `WAIT`) and `min_replicas_timeout=MS` (1 to
/// 60000, default 1000), read from `u`.
///
/// ```
/// let u = celery_core::url::ServiceUrl::parse("redis://h/0?min_replicas=1&min_replicas_timeout=500").unwrap();
/// let r = broker_backends::redis::min_replicas(&u).unwrap().unwrap();
/// assert_eq!((r.count, r.timeout.as_millis()), (1, 500));
/// ```
pub fn min_replicas(u: &ServiceUrl) -> Result<Option<MinReplicas>, UrlError> {
    let count = u.parse_option::<u32>("min_replicas", "a number of replicas")?;
    let timeout = u.parse_option::<u64>("min_replicas_timeout", "a number of milliseconds")?;
    if count.is_some_and(|n| n > MAX_REPLICAS) {
        return Err(u.invalid(format!("min_replicas is at most {MAX_REPLICAS}")));
    }
    if timeout.is_some_and(|t| t == 0 || t > MAX_WAIT_MS) {
        return Err(u.invalid(format!("min_replicas_timeout is from 1 to {MAX_WAIT_MS} ms")));
    }
    match count {
        Some(n) if n > 0 => Ok(Some(MinReplicas { count: n, timeout: Duration::from_millis(timeout.unwrap_or(1000)) })),
        _ if timeout.is_some() => Err(u.invalid("min_replicas_timeout needs min_replicas=N (N > 0)")),
        _ => Ok(None),
    }
}

/// True for a `sentinel://` URL (or list).
pub fn is_sentinel(url: &str) -> bool {
    url.trim_start().starts_with("sentinel://")
}

/// `e` about the equivalent `redis://` URL of a `sentinel://` one, shown as the URL the user gave
/// (`shown`, redacted).
fn shown_as(e: BrokerError, shown: &str) -> BrokerError {
    match e {
        BrokerError::InvalidUrl { reason, .. } => BrokerError::InvalidUrl { url: shown.to_owned(), reason },
        other => other,
    }
}

/// Settings read from the URL.
#[derive(Clone)]
pub struct RedisOptions {
    /// The URL without our query options (handed to the redis client). It holds the password:
    /// print [`RedisOptions`] (redacted) instead.
    pub url: String,
    /// Restore an unacknowledged message after this long without a lease renewal.
    pub visibility_timeout: Duration,
    /// Prefix of every key (Kombu's `global_keyprefix`).
    pub key_prefix: String,
    /// The database number (Kombu puts it in broadcast channel names).
    pub db: u32,
    /// `min_replicas`: replicas that must acknowledge each publish.
    pub min_replicas: Option<MinReplicas>,
    /// The sentinels, for a `sentinel://` URL.
    pub sentinel: Option<SentinelUrl>,
    /// The seed nodes and `shards`, for a `redis+cluster://` URL.
    pub cluster: Option<ClusterUrl>,
    /// `worker_heartbeat`: how often a consumer renews its heartbeat key.
    pub worker_heartbeat: Duration,
    /// `worker_grace`: the heartbeat key's time to live; once it lapses, other workers restore
    /// what the consumer held.
    pub worker_grace: Duration,
}

pub use crate::liveness::{DEFAULT_WORKER_GRACE, DEFAULT_WORKER_HEARTBEAT};

/// `worker_heartbeat` and `worker_grace`, read from `u` and checked: the heartbeat from 0.1 s to
/// 60 s, the grace from twice the heartbeat to 3600 s.
///
/// ```
/// let u = celery_core::url::ServiceUrl::parse("redis://h/0?worker_heartbeat=1&worker_grace=5").unwrap();
/// let (beat, grace) = broker_backends::redis::worker_heartbeat(&u).unwrap();
/// assert_eq!((beat.as_secs(), grace.as_secs()), (1, 5));
/// ```
pub fn worker_heartbeat(u: &ServiceUrl) -> Result<(Duration, Duration), UrlError> {
    crate::liveness::options(u)
}

impl std::fmt::Debug for RedisOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisOptions")
            .field("url", &redacted(&self.url))
            .field("visibility_timeout", &self.visibility_timeout)
            .field("key_prefix", &self.key_prefix)
            .field("db", &self.db)
            .field("min_replicas", &self.min_replicas)
            .field("sentinel", &self.sentinel)
            .field("cluster", &self.cluster)
            .field("worker_heartbeat", &self.worker_heartbeat)
            .field("worker_grace", &self.worker_grace)
            .finish()
    }
}

impl RedisOptions {
    /// Parses a `redis://`, `sentinel://` or `redis+cluster://` URL with our query options; an
    /// unknown option is an error naming it.
    pub fn parse(url: &str) -> Result<RedisOptions, BrokerError> {
        if is_cluster(url) {
            let c = ClusterUrl::parse(url)?;
            let mut o = RedisOptions::parse_one(&c.redis_url()).map_err(|e| shown_as(e, &c.shown))?;
            if o.key_prefix.contains(['{', '}']) {
                let reason = "global_keyprefix may not hold `{` or `}` on a cluster (they make hash tags)".into();
                return Err(BrokerError::InvalidUrl { url: c.shown, reason });
            }
            o.cluster = Some(c);
            return Ok(o);
        }
        if !is_sentinel(url) {
            return RedisOptions::parse_one(url);
        }
        let s = SentinelUrl::parse(url)?;
        let mut o = RedisOptions::parse_one(&s.redis_url()).map_err(|e| shown_as(e, &s.shown))?;
        o.sentinel = Some(s);
        Ok(o)
    }

    /// Where the master is: the URL's server, or whatever the sentinels name.
    pub(crate) fn target(&self) -> Result<Arc<Target>, BrokerError> {
        Target::of(&self.url, self.sentinel.as_ref(), self.cluster.as_ref())
    }

    fn parse_one(url: &str) -> Result<RedisOptions, BrokerError> {
        let u = ServiceUrl::parse(url)?;
        let db_in_path = u.path().trim_start_matches('/').parse().ok();
        let (worker_heartbeat, worker_grace) = worker_heartbeat(&u)?;
        let opts = RedisOptions {
            worker_heartbeat,
            worker_grace,
            visibility_timeout: u.seconds("visibility_timeout")?.unwrap_or(Duration::from_secs(3600)),
            key_prefix: u.option("global_keyprefix").unwrap_or_default().to_owned(),
            db: db_in_path.or(u.parse_option("db", "a database number")?).unwrap_or(0),
            min_replicas: min_replicas(&u)?,
            sentinel: None,
            cluster: None,
            url: client_url(&u)?,
        };
        u.finish()?;
        Ok(opts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_options_are_read_and_stripped() {
        let o = RedisOptions::parse("redis://:pw@h:6379/3?visibility_timeout=2.5&global_keyprefix=t1:&protocol=resp2")
            .unwrap();
        assert_eq!(o.visibility_timeout, Duration::from_millis(2500));
        assert_eq!(o.key_prefix, "t1:");
        assert_eq!(o.url, "redis://:pw@h:6379/3?protocol=resp2");
        assert!(RedisOptions::parse("redis://h/0?visibility_timeout=soon").is_err());
        for (url, needle) in [
            ("redis://h:1?db=3", "goes in the path"),
            ("redis+unix:///s.sock?password=x", "?pass="),
            ("redis://:a@h/0?password=b", "given twice"),
        ] {
            let e = RedisOptions::parse(url).unwrap_err().to_string();
            assert!(e.contains(needle), "{url}: {e}");
        }
        let e = RedisOptions::parse("redis://u:secret@h:1/0?bogus=1").unwrap_err().to_string();
        assert!(e.contains("redis://u:***@h:1/0?bogus=1") && e.contains("`bogus`") && !e.contains("secret"), "{e}");
        let shown = format!("{:?}", RedisOptions::parse("redis://u:secret@h:1/0").unwrap());
        assert!(shown.contains("u:***@h:1/0") && !shown.contains("secret"), "{shown}");
    }

    /// An unknown option fails the connect before any connection is tried (port 1 would refuse it).
    #[tokio::test]
    async fn unknown_options_are_refused_on_every_scheme() {
        for url in [
            "redis://127.0.0.1:1/0?bogus=1",
            "rediss://127.0.0.1:1/0?bogus=1",
            "redis+unix:///nonexistent.sock?bogus=1",
        ] {
            let e = super::super::RedisBroker::connect(url).await.unwrap_err();
            assert!(matches!(e, BrokerError::InvalidUrl { .. }) && e.is_fatal(), "{url}: {e:?}");
            assert!(e.to_string().contains("option `bogus`"), "{url}: {e}");
        }
    }

    #[test]
    fn worker_heartbeat_and_grace_are_bounded() {
        let o = RedisOptions::parse("redis://h/0").unwrap();
        assert_eq!((o.worker_heartbeat, o.worker_grace), (DEFAULT_WORKER_HEARTBEAT, DEFAULT_WORKER_GRACE));
        let o = RedisOptions::parse("redis://h/0?worker_heartbeat=0.5&worker_grace=1.5").unwrap();
        assert_eq!((o.worker_heartbeat, o.worker_grace), (Duration::from_millis(500), Duration::from_millis(1500)));
        let o = RedisOptions::parse("redis://h/0?worker_heartbeat=30").unwrap();
        assert_eq!(o.worker_grace, Duration::from_secs(150), "the default grace is at least 5 beats");
        for (url, needle) in [
            ("redis://h/0?worker_heartbeat=0.01", "from 0.1 to 60"),
            ("redis://h/0?worker_heartbeat=61", "from 0.1 to 60"),
            ("redis://h/0?worker_heartbeat=2&worker_grace=3", "twice worker_heartbeat"),
            ("redis://h/0?worker_grace=3601", "to 3600"),
            ("redis://h/0?worker_grace=soon", "seconds"),
        ] {
            let e = RedisOptions::parse(url).unwrap_err().to_string();
            assert!(e.contains(needle), "{url}: {e}");
        }
    }

    #[test]
    fn min_replicas_is_bounded_and_read_on_both_schemes() {
        let o = RedisOptions::parse("redis://h/0?min_replicas=2&min_replicas_timeout=250").unwrap();
        assert_eq!(o.min_replicas, Some(MinReplicas { count: 2, timeout: Duration::from_millis(250) }));
        assert_eq!(RedisOptions::parse("redis://h/0?min_replicas=0").unwrap().min_replicas, None);
        let o = RedisOptions::parse("sentinel://h1;sentinel://h2/0?master_name=m&min_replicas=1").unwrap();
        assert_eq!(o.min_replicas.map(|r| (r.count, r.timeout)), Some((1, Duration::from_secs(1))));
        assert_eq!(o.sentinel.as_ref().map(|s| s.sentinels.len()), Some(2));
        for (url, needle) in [
            ("redis://h/0?min_replicas=65", "at most 64"),
            ("redis://h/0?min_replicas=1&min_replicas_timeout=0", "from 1 to 60000"),
            ("redis://h/0?min_replicas=1&min_replicas_timeout=60001", "from 1 to 60000"),
            ("redis://h/0?min_replicas_timeout=10", "needs min_replicas"),
            ("redis://h/0?min_replicas=some", "not a number"),
            ("sentinel://:s3cret@h1;sentinel://h2?master_name=m&bogus=1", "`bogus`"),
        ] {
            let e = RedisOptions::parse(url).unwrap_err().to_string();
            assert!(e.contains(needle) && !e.contains("s3cret"), "{url}: {e}");
        }
        let e = RedisOptions::parse("sentinel://:s3cret@h1;sentinel://h2?master_name=m&bogus=1").unwrap_err();
        assert!(e.to_string().contains("sentinel://:***@h1;sentinel://h2?"), "shown as given: {e}");
    }

    #[test]
    fn cluster_urls_take_the_redis_options_and_shards() {
        let o = RedisOptions::parse(
            "redis+cluster://:pw@h1:7001,h2:7002?visibility_timeout=30&shards=4&global_keyprefix=t:",
        )
        .unwrap();
        assert_eq!((o.visibility_timeout, o.key_prefix.as_str(), o.db), (Duration::from_secs(30), "t:", 0));
        assert_eq!(o.url, "redis://:pw@h1:7001/0");
        assert_eq!(o.cluster.as_ref().map(|c| (c.nodes.len(), c.shards)), Some((2, 4)));
        let o = RedisOptions::parse("redis+cluster://h1:7001?min_replicas=1").unwrap();
        assert_eq!(o.min_replicas.map(|r| r.count), Some(1));
        for (url, needle) in [
            ("redis+cluster://:s3cret@h1:7001?bogus=1", "`bogus`"),
            ("redis+cluster://:s3cret@h1:7001?global_keyprefix=a{b}", "hash tags"),
            ("redis+cluster://:s3cret@h1:7001?min_replicas=65", "at most 64"),
            ("redis+cluster://:s3cret@h1:7001/1", "database 0 only"),
        ] {
            let e = RedisOptions::parse(url).unwrap_err();
            assert!(matches!(e, BrokerError::InvalidUrl { .. }), "{url}: {e:?}");
            let e = e.to_string();
            assert!(
                e.contains(needle) && e.contains("redis+cluster://:***@h1:7001") && !e.contains("s3cret"),
                "{url}: {e}"
            );
        }
    }

    /// Every `redis://` form accepted today: what reaches the redis client, and our settings.
    #[test]
    fn accepted_redis_urls_keep_their_settings() {
        for (url, client, vt, prefix, db) in [
            ("redis://127.0.0.1:6379", "redis://127.0.0.1:6379", 3600.0, "", 0),
            ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0", 3600.0, "", 0),
            ("redis://h/5", "redis://h/5", 3600.0, "", 5),
            ("redis://:pw@h:6379/3", "redis://:pw@h:6379/3", 3600.0, "", 3),
            ("redis://u:pw@h/1?protocol=resp3", "redis://u:pw@h/1?protocol=resp3", 3600.0, "", 1),
            ("rediss://h:6380/2", "rediss://h:6380/2", 3600.0, "", 2),
            ("redis://h/0?visibility_timeout=300", "redis://h/0", 300.0, "", 0),
            ("redis://h/0?global_keyprefix=app:", "redis://h/0", 3600.0, "app:", 0),
            // The database of a unix socket is `?db=` (it used to be read as 0).
            ("redis+unix:///tmp/r.sock?db=2", "redis+unix:///tmp/r.sock?db=2", 3600.0, "", 2),
            ("redis://h/0?password=p%40ss", "redis://:p%40ss@h/0", 3600.0, "", 0),
            ("redis://h/0?ssl_cert_reqs=none&socket_timeout=5", "redis://h/0", 3600.0, "", 0),
            ("rediss://h/0#insecure", "rediss://h/0#insecure", 3600.0, "", 0),
        ] {
            let o = RedisOptions::parse(url).unwrap_or_else(|e| panic!("{url}: {e}"));
            assert_eq!(o.url, client, "{url}");
            assert_eq!(o.visibility_timeout, Duration::from_secs_f64(vt), "{url}");
            assert_eq!((o.key_prefix.as_str(), o.db), (prefix, db), "{url}");
        }
    }
}

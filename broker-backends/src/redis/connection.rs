//! [`RedisConn`]: the connection every Redis loop uses (fetch, acks, leases, the delayed mover,
//! results, pub/sub), for one server (`redis://`) or the master behind Sentinel (`sentinel://`).
//!
//! A `redis::aio::ConnectionManager` reconnects to one address only: after a failover it keeps
//! failing against the dead master, and once that node is back as a replica every write answers
//! `READONLY`, which is not a connection error. So behind Sentinel, a command that fails with an
//! I/O error, a refused or dropped connection, a timeout, `READONLY`, `MASTERDOWN` or `LOADING`
//! makes the handle ask the sentinels again; when they name another node, it logs the switch
//! (`old -> new`), connects there and bumps a generation: every clone of the handle (each loop
//! holds one) uses the new master from its next command on. The failed command still returns
//! its error, so the caller's own retry (with backoff) runs it again, now on the new master.
//!
//! Between errors a watch asks a sentinel once a second which node is the master, so a demoted
//! master that still takes writes (for up to Sentinel's reconfiguration) is left within about a
//! second.
//!
//! `min_replicas=N` (`min_replicas_timeout=MS`, default 1000): [`RedisConn::write`] sends
//! `WAIT N MS` in the same pipeline as the write, so on the same connection; fewer replicas than
//! N acknowledging is a retryable error (the write may still be on the master alone).
//!
//! On a Redis Cluster (`redis+cluster://`) the handle is redis-rs's
//! `cluster_async::ClusterConnection` (one multiplexed connection per node): it reads the slot
//! map from the seeds, follows `MOVED`/`ASK`, and after a master dies reconnects and refreshes the
//! map until the replica that took its slots answers, within [`CLUSTER_FAILOVER_ALLOWANCE`] past
//! the per-reply timeout. A pipeline or script must touch keys of one slot ([`super::keys`]).
//! [`RedisConn::fresh`] opens another `ClusterConnection` (its own sockets, for blocking
//! commands); [`RedisConn::client`] names a seed node in turn for pub/sub (a classic `PUBLISH`
//! reaches every node of a cluster, so any node serves a subscriber).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use celery_core::sync::{read, write};
use celery_core::BrokerError;
use redis::aio::{ConnectionLike, ConnectionManager};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisError, RedisFuture, Value};

use super::cluster::ClusterUrl;
use super::error::failed;
use super::manager;
use super::sentinel::SentinelUrl;

/// Longest `min_replicas_timeout` accepted (ms).
pub(crate) const MAX_WAIT_MS: u64 = 60_000;

/// Most replicas `min_replicas` may ask for.
pub(crate) const MAX_REPLICAS: u32 = 64;

/// How often, at most, a handle asks the sentinels again after errors.
const RECHECK_EVERY: Duration = Duration::from_millis(250);

/// How often a handle asks a sentinel which node is the master, between errors.
const WATCH_EVERY: Duration = Duration::from_secs(1);

/// On a cluster, how much longer than one reply's timeout a command may take in all: the
/// reconnects, slot-map refreshes and retries while a replica takes over a dead master's slots
/// (3-4 s with `cluster-node-timeout 2000`, more under load).
pub(crate) const CLUSTER_FAILOVER_ALLOWANCE: Duration = Duration::from_secs(20);

/// How long connecting to one cluster node may take.
const CLUSTER_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// `min_replicas=N` with `min_replicas_timeout=MS`: how many replicas must acknowledge a write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MinReplicas {
    /// Replicas that must acknowledge.
    pub count: u32,
    /// How long `WAIT` waits for them.
    pub timeout: Duration,
}

/// Where the master is: one address, whatever the sentinels name, or a cluster's nodes.
#[derive(Debug)]
pub(crate) enum Target {
    Direct(redis::Client),
    Sentinel {
        sentinels: SentinelUrl,
        /// The client URL for the master (password, database, protocol): secret.
        master: String,
    },
    Cluster {
        /// A client per seed node (their URLs hold the password).
        seeds: Vec<redis::Client>,
        /// The URL as given, redacted.
        shown: String,
        /// The seed [`RedisConn::client`] names next.
        next: AtomicUsize,
    },
}

impl Target {
    /// `client_url`'s server, with `sentinel` the master its sentinels name (`client_url` then
    /// gives the master's password, database and protocol), or with `cluster` its nodes
    /// (`client_url` gives the password and protocol of each).
    pub(crate) fn of(
        client_url: &str,
        sentinel: Option<&SentinelUrl>,
        cluster: Option<&ClusterUrl>,
    ) -> Result<Arc<Target>, BrokerError> {
        let shown = || match (sentinel, cluster) {
            (Some(s), _) => s.shown.clone(),
            (_, Some(c)) => c.shown.clone(),
            _ => celery_core::url::redacted(client_url),
        };
        let invalid = |e: RedisError| BrokerError::InvalidUrl { url: shown(), reason: e.to_string() };
        if let Some(c) = cluster {
            let seeds: Result<Vec<redis::Client>, RedisError> =
                c.node_urls(client_url).iter().map(|u| redis::Client::open(u.as_str())).collect();
            let seeds = seeds.map_err(invalid)?;
            return Ok(Arc::new(Target::Cluster { seeds, shown: shown(), next: AtomicUsize::new(0) }));
        }
        let client = redis::Client::open(client_url).map_err(invalid)?;
        Ok(Arc::new(match sentinel {
            None => Target::Direct(client),
            Some(s) => Target::Sentinel { sentinels: s.clone(), master: client_url.to_owned() },
        }))
    }

    /// The master's `host:port` (as far as known; a cluster: its URL) and a client for it (a
    /// cluster: its first seed).
    async fn resolve(&self) -> Result<(String, redis::Client), BrokerError> {
        match self {
            Target::Direct(client) => Ok((addr_of(client), client.clone())),
            Target::Sentinel { sentinels, master } => {
                sentinels.resolve(master).await.map_err(failed("redis: ask the sentinels for the master"))
            }
            Target::Cluster { seeds, shown, .. } => Ok((shown.clone(), seeds[0].clone())),
        }
    }

    /// A connection to the target: a reconnecting one to a server, or a cluster connection.
    async fn open(&self, client: &redis::Client, response_timeout: Option<Duration>) -> Result<Conn, BrokerError> {
        let Target::Cluster { seeds, .. } = self else {
            return Ok(Conn::Single(manager(client, response_timeout).await?));
        };
        let infos: Vec<redis::ConnectionInfo> = seeds.iter().map(|c| c.get_connection_info().clone()).collect();
        let mut b = ClusterClientBuilder::new(infos).connection_timeout(CLUSTER_CONNECT_TIMEOUT);
        b = match response_timeout {
            Some(t) => b.response_timeout(t).overall_response_timeout(Some(t + CLUSTER_FAILOVER_ALLOWANCE)),
            None => b.overall_response_timeout(None),
        };
        let client = b.build().map_err(failed("redis: a cluster client"))?;
        let conn = client.get_async_connection().await.map_err(failed("redis: connect to the cluster"))?;
        Ok(Conn::Cluster(Box::new(conn)))
    }

    fn is_cluster(&self) -> bool {
        matches!(self, Target::Cluster { .. })
    }
}

/// The connection in use: to one server, or to a cluster.
#[derive(Clone)]
enum Conn {
    Single(ConnectionManager),
    Cluster(Box<ClusterConnection>),
}

impl Conn {
    async fn command(&mut self, cmd: &Cmd) -> redis::RedisResult<Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd).await,
            Conn::Cluster(c) => c.req_packed_command(cmd).await,
        }
    }

    async fn commands(&mut self, pipeline: &Pipeline, offset: usize, count: usize) -> redis::RedisResult<Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(pipeline, offset, count).await,
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count).await,
        }
    }

    fn db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(_) => 0,
        }
    }
}

fn addr_of(client: &redis::Client) -> String {
    client.get_connection_info().addr().to_string()
}

#[derive(Clone)]
struct Current {
    generation: u64,
    master: String,
    client: redis::Client,
    conn: Conn,
}

struct Link {
    target: Arc<Target>,
    replicas: Option<MinReplicas>,
    response_timeout: Option<Duration>,
    current: RwLock<Current>,
    switching: tokio::sync::Mutex<Instant>,
}

/// A connection to the Redis master that follows a Sentinel failover; clones share it (and its
/// switches). It is a [`ConnectionLike`], so commands, pipelines and scripts run on it as on any
/// redis connection.
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use redis::AsyncCommands;
/// let mut conn = broker_backends::redis::RedisConn::open(
///     "sentinel://127.0.0.1:26801;sentinel://127.0.0.1:26802/0?master_name=mymaster",
/// )
/// .await?;
/// let _: () = conn.set("k", "v").await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct RedisConn {
    link: Arc<Link>,
}

impl std::fmt::Debug for RedisConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let c = read(&self.link.current);
        f.debug_struct("RedisConn").field("master", &c.master).field("generation", &c.generation).finish()
    }
}

impl RedisConn {
    /// Connects for a `redis://`, `rediss://`, `redis+unix://`, `sentinel://` or
    /// `redis+cluster://` URL (options read as the broker reads them).
    pub async fn open(url: &str) -> Result<RedisConn, BrokerError> {
        let options = super::RedisOptions::parse(url)?;
        RedisConn::connect(options.target()?, options.min_replicas, Some(Duration::from_secs(30))).await
    }

    /// Connects to `client_url`'s server (a URL [`client_url`](super::client_url) made), with
    /// `sentinel` to the master its sentinels name, or with `cluster` to that cluster;
    /// `min_replicas` makes [`RedisConn::write`] wait for replicas; `response_timeout` bounds
    /// each reply.
    pub async fn connect_url(
        client_url: &str,
        sentinel: Option<&SentinelUrl>,
        cluster: Option<&ClusterUrl>,
        min_replicas: Option<MinReplicas>,
        response_timeout: Option<Duration>,
    ) -> Result<RedisConn, BrokerError> {
        RedisConn::connect(Target::of(client_url, sentinel, cluster)?, min_replicas, response_timeout).await
    }

    /// Resolves the master and connects to it (the first connection must succeed).
    pub(crate) async fn connect(
        target: Arc<Target>,
        replicas: Option<MinReplicas>,
        response_timeout: Option<Duration>,
    ) -> Result<RedisConn, BrokerError> {
        let (master, client) = target.resolve().await?;
        let conn = target.open(&client, response_timeout).await?;
        match *target {
            Target::Sentinel { .. } => tracing::info!(%master, "redis: connected to the master the sentinels name"),
            Target::Cluster { .. } => tracing::debug!(cluster = %master, "redis: connected to the cluster"),
            Target::Direct(_) => {}
        }
        let current = RwLock::new(Current { generation: 0, master, client, conn });
        let switching = tokio::sync::Mutex::new(Instant::now());
        let link = Arc::new(Link { target, replicas, response_timeout, current, switching });
        if matches!(*link.target, Target::Sentinel { .. }) {
            tokio::spawn(watch(Arc::downgrade(&link)));
        }
        Ok(RedisConn { link })
    }

    /// Another connection to the same master or cluster (its own sockets, for blocking commands),
    /// following failovers on its own; `response_timeout` bounds each reply (give it above the
    /// longest block).
    pub async fn fresh(&self, response_timeout: Option<Duration>) -> Result<RedisConn, BrokerError> {
        RedisConn::connect(self.link.target.clone(), self.link.replicas, response_timeout).await
    }

    /// A client for the current master (for pub/sub connections); on a cluster, the next seed
    /// node in turn (each call another, so a subscriber whose node died tries the next).
    pub fn client(&self) -> redis::Client {
        if let Target::Cluster { seeds, next, .. } = &*self.link.target {
            return seeds[next.fetch_add(1, Ordering::Relaxed) % seeds.len()].clone();
        }
        read(&self.link.current).client.clone()
    }

    /// True on a Redis Cluster (`redis+cluster://`).
    pub fn is_cluster(&self) -> bool {
        self.link.target.is_cluster()
    }

    /// The current master's `host:port` (a cluster: its URL, redacted).
    pub fn master(&self) -> String {
        read(&self.link.current).master.clone()
    }

    /// Counts the switches to another master so far.
    pub fn generation(&self) -> u64 {
        read(&self.link.current).generation
    }

    /// The `min_replicas` setting in force.
    pub fn min_replicas(&self) -> Option<MinReplicas> {
        self.link.replicas
    }

    fn now(&self) -> (u64, Conn) {
        let c = read(&self.link.current);
        (c.generation, c.conn.clone())
    }

    /// Behind Sentinel: asks the sentinels again (at most every 250 ms) unless another loop
    /// already switched since `seen` (a [`RedisConn::generation`]); when they name another node,
    /// connects there, logs the switch and makes every clone use it. Nothing happens for
    /// `redis://`, nor on a cluster (its client follows failovers itself).
    pub async fn recheck(&self, seen: u64) {
        if !matches!(*self.link.target, Target::Sentinel { .. }) {
            return;
        }
        let mut last = self.link.switching.lock().await;
        if self.generation() != seen || last.elapsed() < RECHECK_EVERY {
            return;
        }
        *last = Instant::now();
        let old = self.master();
        match self.link.target.resolve().await {
            Ok((master, _)) if master == old => {
                tracing::debug!(%master, "redis: the sentinels still name the same master")
            }
            Ok((master, client)) => match self.link.target.open(&client, self.link.response_timeout).await {
                Ok(conn) => {
                    let mut c = write(&self.link.current);
                    let generation = c.generation + 1;
                    *c = Current { generation, master: master.clone(), client, conn };
                    tracing::warn!(old = %old, new = %master, generation, "redis: master switched: {old} -> {master}");
                }
                Err(e) => tracing::warn!(new = %master, error = %e, "redis: cannot connect to the new master yet"),
            },
            Err(e) => tracing::warn!(error = %e, "redis: no sentinel names a reachable master yet"),
        }
    }

    /// Runs `cmd` on the node that serves `key`'s slot (on a cluster), or as any command (one
    /// server). For a command whose own routing would scatter commands that must stay in order:
    /// a cluster routes `PUBLISH` by its channel, each channel's to another node.
    pub async fn command_via(&self, key: &str, cmd: Cmd) -> Result<Value, RedisError> {
        use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
        let (seen, conn) = self.now();
        match conn {
            Conn::Cluster(mut c) => {
                let route = Route::with_key(key, SlotAddr::Master);
                c.route_command(cmd, RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(route))).await
            }
            Conn::Single(mut c) => {
                let r = c.req_packed_command(&cmd).await;
                if let Err(e) = &r {
                    self.after(seen, e).await;
                }
                r
            }
        }
    }

    async fn after(&self, seen: u64, e: &RedisError) {
        if master_lost(e) {
            self.recheck(seen).await;
        }
    }

    /// Runs `pipe` (a write); with `min_replicas`, `WAIT N MS` follows it in the same pipeline
    /// and fewer acknowledging replicas is a retryable error naming how many did.
    pub async fn write(&self, mut pipe: Pipeline, context: &'static str) -> Result<(), BrokerError> {
        let mut conn = self.clone();
        let Some(r) = self.link.replicas else {
            return pipe.query_async::<()>(&mut conn).await.map_err(failed(context));
        };
        let seen = self.generation();
        pipe.cmd("WAIT").arg(r.count).arg(r.timeout.as_millis() as u64);
        let replies: Vec<Value> = pipe.query_async(&mut conn).await.map_err(failed(context))?;
        let acked = replies.last().and_then(|v| redis::from_redis_value_ref::<i64>(v).ok()).unwrap_or(0);
        if acked < i64::from(r.count) {
            // The replicas may have left this node for a new master.
            self.recheck(seen).await;
            return Err(BrokerError::connection(format!(
                "{context}: {acked} of the {} replicas asked for (min_replicas) acknowledged within {:?}; the write may be on the master alone",
                r.count, r.timeout
            )));
        }
        Ok(())
    }
}

/// Behind Sentinel, between errors: asks a sentinel every [`WATCH_EVERY`] which node is the
/// master, and when it names another one, switches ([`RedisConn::recheck`]). A demoted master can
/// take writes for seconds before Sentinel reconfigures it (writes lost once it resyncs from the
/// new master); this bounds that window. Ends with the last clone of the handle.
async fn watch(link: std::sync::Weak<Link>) {
    let mut held = None;
    loop {
        tokio::time::sleep(WATCH_EVERY).await;
        let Some(strong) = link.upgrade() else { return };
        let Target::Sentinel { sentinels, .. } = &*strong.target else { return };
        let named = sentinels.named(&mut held).await;
        let conn = RedisConn { link: strong.clone() };
        let (seen, master) = {
            let c = read(&strong.current);
            (c.generation, c.master.clone())
        };
        if named.is_some_and(|n| n != master) {
            conn.recheck(seen).await;
        }
    }
}

/// Errors after which the master may have moved: the connection's (I/O, refused, dropped,
/// timeout) and the server's `READONLY` (a demoted master), `MASTERDOWN`, `LOADING`.
pub(crate) fn master_lost(e: &RedisError) -> bool {
    use redis::{ErrorKind, ServerErrorKind};
    if e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal() || e.is_timeout() {
        return true;
    }
    if matches!(
        e.kind(),
        ErrorKind::Server(ServerErrorKind::ReadOnly | ServerErrorKind::MasterDown | ServerErrorKind::BusyLoading)
    ) {
        return true;
    }
    // Inside a MULTI the server's code comes back wrapped (EXECABORT ... READONLY ...).
    let text = e.to_string();
    ["READONLY", "MASTERDOWN", "LOADING"].iter().any(|code| text.contains(code))
}

impl ConnectionLike for RedisConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        Box::pin(async move {
            let (seen, mut conn) = self.now();
            let r = conn.command(cmd).await;
            if let Err(e) = &r {
                self.after(seen, e).await;
            }
            r
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        Box::pin(async move {
            let (seen, mut conn) = self.now();
            let r = conn.commands(pipeline, offset, count).await;
            if let Err(e) = &r {
                self.after(seen, e).await;
            }
            r
        })
    }

    fn get_db(&self) -> i64 {
        read(&self.link.current).conn.db()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_that_may_mean_a_new_master() {
        let io = RedisError::from(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert!(master_lost(&io));
        let ro = RedisError::from((
            redis::ErrorKind::Server(redis::ServerErrorKind::ReadOnly),
            "You can't write against a read only replica.",
        ));
        assert!(master_lost(&ro));
        let wrong = RedisError::from((redis::ErrorKind::UnexpectedReturnType, "not a list"));
        assert!(!master_lost(&wrong));
    }
}

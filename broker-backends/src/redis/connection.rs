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
//! Between errors the handle follows the sentinels' `+switch-master` announcements (one
//! subscription per process and sentinel set, [`SentinelUrl::switches`]): on one it asks the
//! sentinels again and switches at once, so a demoted master that still takes writes (for up to
//! Sentinel's reconfiguration) is left as soon as the failover is announced, and an idle handle
//! is on the new master before its next command.
//!
//! `min_replicas=N` (`min_replicas_timeout=MS`, default 1000): [`RedisConn::write`] returns once
//! N replicas acknowledged the write (`WAIT N MS` on the connection that wrote it); fewer is a
//! retryable error (the write may still be on the master alone). On one server (and behind
//! Sentinel) concurrent writers share their `WAIT`s: a `WAIT` confirms every earlier write of its
//! connection, and every clone of the handle writes on the same connection, so a writer whose
//! write was answered before a `WAIT` was sent takes that `WAIT`'s answer (group commit; at most
//! one `WAIT` in flight per handle). `CLIENT ID` beside the write and beside the `WAIT` proves
//! both went on the same connection (a reconnect in between is a retryable error). Acks do not
//! wait: an ack lost with the master makes the task run again, which at-least-once allows.
//!
//! On a Redis Cluster (`redis+cluster://`) the handle is redis-rs's
//! `cluster_async::ClusterConnection` (one multiplexed connection per node): it reads the slot
//! map from the seeds, follows `MOVED`/`ASK`, and after a master dies reconnects and refreshes the
//! map until the replica that took its slots answers, within [`CLUSTER_FAILOVER_ALLOWANCE`] past
//! the per-reply timeout. A pipeline or script must touch keys of one slot ([`super::keys`]).
//! [`RedisConn::fresh`] opens another `ClusterConnection` (its own sockets, for blocking
//! commands); [`RedisConn::client`] names a seed node in turn for pub/sub (a classic `PUBLISH`
//! reaches every node of a cluster, so any node serves a subscriber).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
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
use super::sentinel::{Followed, SentinelUrl, Switch};

/// Longest `min_replicas_timeout` accepted (ms).
pub(crate) const MAX_WAIT_MS: u64 = 60_000;

/// Most replicas `min_replicas` may ask for.
pub(crate) const MAX_REPLICAS: u32 = 64;

/// How often, at most, a handle asks the sentinels again after errors.
const RECHECK_EVERY: Duration = Duration::from_millis(250);

/// After an announcement, how long a handle keeps asking until the sentinels name the announced
/// node and it answers `ROLE` with `master`.
const FOLLOW_FOR: Duration = Duration::from_secs(10);

/// How often a handle's follower looks whether the handle is still held (between announcements).
const HELD_EVERY: Duration = Duration::from_secs(30);

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
    confirms: Confirms,
    /// Behind Sentinel: the process's `+switch-master` follower, held while the handle lives.
    _followed: Option<Arc<Followed>>,
}

/// The `WAIT`s of one handle (on one server or behind Sentinel), shared by concurrent writers.
#[derive(Default)]
struct Confirms {
    /// `WAIT`s sent so far: the epoch of the last one.
    sent: AtomicU64,
    /// Held while a `WAIT` runs (writers queue here, and the next `WAIT` serves them all); holds
    /// the answer of the last one.
    gate: tokio::sync::Mutex<Option<Confirmed>>,
}

/// A `WAIT`'s answer: its epoch, the connection it ran on (`CLIENT ID`), the replicas that acked.
#[derive(Debug, Clone, Copy)]
struct Confirmed {
    epoch: u64,
    client: i64,
    acked: i64,
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
        let confirms = Confirms::default();
        let followed = match &*target {
            Target::Sentinel { sentinels, .. } => Some(sentinels.switches()),
            _ => None,
        };
        let switches = followed.as_ref().map(|f| f.subscribe());
        let link =
            Arc::new(Link { target, replicas, response_timeout, current, switching, confirms, _followed: followed });
        if let Some(rx) = switches {
            tokio::spawn(follow(Arc::downgrade(&link), rx));
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

    /// Runs `pipe` (a write); with `min_replicas`, returns once that many replicas acknowledged
    /// it (a `WAIT` shared with concurrent writers, see the module doc); fewer acknowledging
    /// replicas is a retryable error naming how many did.
    pub async fn write(&self, mut pipe: Pipeline, context: &'static str) -> Result<(), BrokerError> {
        let mut conn = self.clone();
        let Some(r) = self.link.replicas else {
            return pipe.query_async::<()>(&mut conn).await.map_err(failed(context));
        };
        let seen = self.generation();
        let acked = if self.is_cluster() {
            // A cluster pipeline goes whole to its slot's node: the WAIT counts that node's replicas.
            pipe.cmd("WAIT").arg(r.count).arg(r.timeout.as_millis() as u64);
            let replies: Vec<Value> = pipe.query_async(&mut conn).await.map_err(failed(context))?;
            last_int(&replies).unwrap_or(0)
        } else {
            pipe.cmd("CLIENT").arg("ID");
            let replies: Vec<Value> = pipe.query_async(&mut conn).await.map_err(failed(context))?;
            // WAITs sent from here on were sent after the write was done.
            let after = self.link.confirms.sent.load(Ordering::SeqCst);
            let client = last_int(&replies).ok_or_else(|| {
                BrokerError::connection(format!(
                    "{context}: CLIENT ID gave no number; the write may be on the master alone"
                ))
            })?;
            match self.confirm(client, after, r).await.map_err(failed(context))? {
                Some(acked) => acked,
                None => {
                    return Err(BrokerError::connection(format!(
                        "{context}: the connection to the master changed between the write and its WAIT; the write may be on the master alone"
                    )))
                }
            }
        };
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

    /// How many replicas acknowledged the writes of connection `client` up to one answered when
    /// `after` `WAIT`s had been sent: the answer of a later `WAIT` on the same connection when one
    /// ran while this writer queued, else of a `WAIT` of its own. `None`: the connection changed.
    async fn confirm(&self, client: i64, after: u64, r: MinReplicas) -> Result<Option<i64>, RedisError> {
        let confirms = &self.link.confirms;
        let mut last = confirms.gate.lock().await;
        if let Some(c) = *last {
            if c.epoch > after && c.client == client {
                return Ok(Some(c.acked));
            }
        }
        *last = None;
        let epoch = confirms.sent.fetch_add(1, Ordering::SeqCst) + 1;
        let mut pipe = redis::pipe();
        pipe.cmd("CLIENT").arg("ID").cmd("WAIT").arg(r.count).arg(r.timeout.as_millis() as u64);
        let mut conn = self.clone();
        let (id, acked): (i64, i64) = pipe.query_async(&mut conn).await?;
        *last = Some(Confirmed { epoch, client: id, acked });
        Ok((id == client).then_some(acked))
    }
}

/// The last reply of a pipeline as an integer.
fn last_int(replies: &[Value]) -> Option<i64> {
    replies.last().and_then(|v| redis::from_redis_value_ref::<i64>(v).ok())
}

/// Behind Sentinel, between errors: on each `+switch-master` announcement, asks the sentinels
/// again ([`RedisConn::recheck`]) until the handle is on the announced node (every 250 ms, for at
/// most [`FOLLOW_FOR`]: the announcement may come before the node answers `ROLE` with `master`);
/// an announcement without a node (the subscription was made again) asks once. Ends with the last
/// clone of the handle.
async fn follow(link: std::sync::Weak<Link>, mut switches: tokio::sync::watch::Receiver<Switch>) {
    // Announcements from before this handle connected are not its own.
    switches.borrow_and_update();
    loop {
        let changed = tokio::time::timeout(HELD_EVERY, switches.changed()).await;
        let Some(strong) = link.upgrade() else { return };
        match changed {
            Err(_) => continue,
            Ok(Err(_)) => return,
            Ok(Ok(())) => {}
        }
        let (_, new) = switches.borrow_and_update().clone();
        let conn = RedisConn { link: strong };
        let until = Instant::now() + FOLLOW_FOR;
        loop {
            conn.recheck(conn.generation()).await;
            if new.is_empty() || conn.master() == new || Instant::now() >= until {
                break;
            }
            tokio::time::sleep(RECHECK_EVERY).await;
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

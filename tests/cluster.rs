//! Clusters on loopback for the failover suites (issue 15): a 3-node RabbitMQ cluster
//! ([`Rabbit`]), a Redis master with 2 replicas watched by 3 sentinels ([`Sentinel`]) and a Redis
//! Cluster of 3 masters with a replica each ([`RedisCluster`]), all run by `scripts/cluster`.
//!
//! `X::up()` holds the cluster for the calling test (one test at a time per kind, across test
//! binaries too: nodes get killed), then runs `scripts/cluster KIND up`: the first call of a run
//! starts the cluster (a RabbitMQ cluster boots in 30-60 s, the Redis ones in a few seconds),
//! later calls find it up and only check it (in about a second), or start again what an earlier
//! test killed and left down. The cluster stays up after the tests (`.ci/run` takes it down;
//! `scripts/cluster KIND down` by hand).
//!
//! When the binaries are missing (`rabbitmq-server`, `redis-server`, ...), `up()` prints why the
//! suite is skipped and returns `None`, unless `CELERY_REQUIRE_SERVICES=1`, where it panics. A
//! cluster that does not come up is a failure, never a skip.
//!
//! Nodes are numbered from 0 here (`kill_node(0)` kills `rabbit-c1`, the script's node 1). Every
//! call blocks the calling thread (a RabbitMQ node takes seconds to restart): from an async test
//! that keeps client connections open meanwhile, call them inside `tokio::task::block_in_place`.
//!
//! ```no_run
//! use celery_tests::cluster::Sentinel;
//! use std::time::Duration;
//!
//! let Some(sentinel) = Sentinel::up() else { return };
//! let master = sentinel.current_master().expect("the sentinels name a master");
//! sentinel.kill_node(master);
//! let promoted = sentinel.wait_new_master(master, Duration::from_secs(30)).expect("a replica is promoted");
//! assert_ne!(promoted, master);
//! sentinel.restart_node(master); // comes back as a replica of the new master
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use celery_core::{App, Signature};
use serde_json::json;

use crate::{services_required, wait_until};

/// One process of a cluster, as `scripts/cluster KIND nodes` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    /// Its index from 0 (the script's number minus one).
    pub index: usize,
    /// Its port on 127.0.0.1 (AMQP for RabbitMQ, Redis or sentinel otherwise).
    pub port: u16,
    /// The URL that reaches it alone: `amqp://guest:guest@127.0.0.1:PORT/%2f` or
    /// `redis://127.0.0.1:PORT`.
    pub url: String,
}

/// The kinds of cluster that `scripts/cluster` runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Rabbit,
    Sentinel,
    RedisCluster,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Rabbit => "rabbitmq",
            Kind::Sentinel => "sentinel",
            Kind::RedisCluster => "redis-cluster",
        }
    }

    /// The programs `scripts/cluster` needs for this kind.
    fn binaries(self) -> Vec<PathBuf> {
        let mut bins: Vec<PathBuf> = ["bash", "flock", "setsid", "ps"].iter().map(PathBuf::from).collect();
        match self {
            Kind::Rabbit => {
                let sbin =
                    std::env::var_os("RABBITMQ_SBIN").map_or_else(|| "/usr/lib/rabbitmq/bin".into(), PathBuf::from);
                bins.push(sbin.join("rabbitmq-server"));
                bins.push(sbin.join("rabbitmqctl"));
                bins.push(sbin.join("rabbitmq-queues"));
            }
            Kind::Sentinel | Kind::RedisCluster => {
                bins.push("redis-server".into());
                bins.push("redis-cli".into());
            }
        }
        bins
    }
}

/// `scripts/cluster` of this checkout.
pub fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..").join("scripts").join("cluster")
}

/// True when `bin` (a path, or a name looked up in `PATH`) is an existing file.
fn installed(bin: &std::path::Path) -> bool {
    if bin.components().count() > 1 {
        return bin.is_file();
    }
    std::env::var_os("PATH").is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(bin).is_file()))
}

/// The binaries of `kind` that are missing, or `None` (skip) after printing which, unless
/// `CELERY_REQUIRE_SERVICES=1`.
fn binaries_or_skip(kind: Kind) -> Option<()> {
    let missing: Vec<String> =
        kind.binaries().iter().filter(|b| !installed(b)).map(|b| b.display().to_string()).collect();
    if missing.is_empty() {
        return Some(());
    }
    let why = format!("the {} cluster needs {} (missing here)", kind.name(), missing.join(", "));
    if services_required() {
        panic!("{why} and CELERY_REQUIRE_SERVICES=1");
    }
    eprintln!("SKIPPED: {why}");
    None
}

/// Runs `scripts/cluster ARGS`; its standard output, or a panic with both outputs.
fn run_script(args: &[&str]) -> String {
    let out = Command::new("bash")
        .arg(script())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run scripts/cluster {}: {e}", args.join(" ")));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "scripts/cluster {} failed ({}):\n{stdout}\n{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// The holder of one kind of cluster for one test: a `scripts/cluster KIND lock` process that
/// holds the lock until its standard input closes (on drop, or when this process dies).
#[derive(Debug)]
struct Turn {
    child: Child,
    stdin: Option<ChildStdin>,
}

impl Turn {
    fn take(kind: Kind) -> Turn {
        let mut child = Command::new("bash")
            .arg(script())
            .args([kind.name(), "lock"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run scripts/cluster {} lock: {e}", kind.name()));
        let stdin = child.stdin.take();
        let mut line = String::new();
        if let Some(out) = child.stdout.take() {
            let _ = BufReader::new(out).read_line(&mut line);
        }
        assert_eq!(line.trim(), "locked", "scripts/cluster {} lock did not take the lock", kind.name());
        Turn { child, stdin }
    }
}

impl Drop for Turn {
    fn drop(&mut self) {
        drop(self.stdin.take());
        let _ = self.child.wait();
    }
}

/// The cluster of `kind` up and held for the caller, with its processes; `None` when skipped.
fn up(kind: Kind) -> Option<(Turn, Vec<Node>, Vec<Node>)> {
    binaries_or_skip(kind)?;
    let turn = Turn::take(kind);
    let started = Instant::now();
    let out = run_script(&[kind.name(), "up"]);
    if let Some(first) = out.lines().next() {
        eprintln!("scripts/cluster {} up: {first} ({:.1?})", kind.name(), started.elapsed());
    }
    let (nodes, sentinels) = listed(kind);
    Some((turn, nodes, sentinels))
}

/// The nodes and sentinels `scripts/cluster KIND nodes` lists.
fn listed(kind: Kind) -> (Vec<Node>, Vec<Node>) {
    let mut nodes = Vec::new();
    let mut sentinels = Vec::new();
    for line in run_script(&[kind.name(), "nodes"]).lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let parsed = match f.as_slice() {
            [role, n, port, _pid, url] => n
                .parse::<usize>()
                .ok()
                .zip(port.parse::<u16>().ok())
                .map(|(n, port)| (*role, Node { index: n.saturating_sub(1), port, url: (*url).to_owned() })),
            _ => None,
        };
        match parsed {
            Some(("node", node)) => nodes.push(node),
            Some(("sentinel", node)) => sentinels.push(node),
            _ => panic!("scripts/cluster {} nodes printed an unexpected line: {line}", kind.name()),
        }
    }
    (nodes, sentinels)
}

/// True when `scripts/cluster KIND nodes` shows a live process for node `index` (`role` is
/// `node` or `sentinel`).
fn running(kind: Kind, role: &str, index: usize) -> bool {
    let number = (index + 1).to_string();
    run_script(&[kind.name(), "nodes"]).lines().any(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        matches!(f.as_slice(), [r, n, _, pid, _] if *r == role && *n == number && *pid != "-")
    })
}

fn kill(kind: Kind, id: &str) {
    run_script(&[kind.name(), "kill", id]);
}

fn restart(kind: Kind, id: &str) {
    run_script(&[kind.name(), "start", id]);
}

/// A synchronous connection to one Redis process, or `None` when it does not answer.
fn redis_conn(url: &str) -> Option<redis::Connection> {
    redis::Client::open(url).ok()?.get_connection_with_timeout(Duration::from_secs(2)).ok()
}

/// Ends the process when the calling test file has run longer than `limit` in all (measured from
/// the first call), so that a hung cluster cannot hold CI: every wait here has a deadline, this
/// bounds their sum. Call it at the start of each test of a file.
pub fn bound_run_time(file: &'static str, limit: Duration) {
    static WATCHDOG: OnceLock<()> = OnceLock::new();
    WATCHDOG.get_or_init(|| {
        std::thread::spawn(move || {
            std::thread::sleep(limit);
            eprintln!("{file}: still running after {limit:?}, the bound of the whole file: ending the process");
            std::process::exit(101);
        });
    });
}

// ---------------------------------------------------------------------------------------------

/// The 3-node RabbitMQ cluster (`rabbit-c1@localhost`.. on AMQP ports 5701-5703 by default, guest
/// from loopback), held by this test while the value lives.
#[derive(Debug)]
pub struct Rabbit {
    nodes: Vec<Node>,
    _turn: Turn,
}

impl Rabbit {
    /// The cluster, up, with quorum queues usable; `None` when skipped (see the module doc).
    pub fn up() -> Option<Rabbit> {
        let (turn, nodes, _) = up(Kind::Rabbit)?;
        assert_eq!(nodes.len(), 3, "scripts/cluster rabbitmq nodes: {nodes:?}");
        Some(Rabbit { nodes, _turn: turn })
    }

    /// Its nodes.
    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// The AMQP URL of node `i` alone (vhost `/`).
    pub fn url(&self, i: usize) -> &str {
        &self.nodes[i].url
    }

    /// Every node's URL joined with `;`, the failover list that Celery's broker URL takes.
    pub fn failover_url(&self) -> String {
        self.nodes.iter().map(|n| n.url.as_str()).collect::<Vec<_>>().join(";")
    }

    /// The Erlang node name of node `i` (`rabbit-c1@localhost` for 0, by default).
    pub fn node_name(&self, i: usize) -> String {
        let prefix = std::env::var("CLUSTER_RABBITMQ_NODE_PREFIX").unwrap_or_else(|_| "rabbit-c".into());
        format!("{prefix}{}@localhost", i + 1)
    }

    /// kill -9 node `i`; returns once the process is gone.
    pub fn kill_node(&self, i: usize) {
        kill(Kind::Rabbit, &(i + 1).to_string());
    }

    /// Starts node `i` again (with its data) and waits until it is back in the cluster.
    pub fn restart_node(&self, i: usize) {
        restart(Kind::Rabbit, &(i + 1).to_string());
    }

    /// True when node `i`'s process runs.
    pub fn node_running(&self, i: usize) -> bool {
        running(Kind::Rabbit, "node", i)
    }

    /// Runs `tool` (`rabbitmqctl`, `rabbitmq-diagnostics` or `rabbitmq-queues`) against node `i`;
    /// its standard output, or a panic.
    pub fn cli(&self, i: usize, tool: &str, args: &[&str]) -> String {
        let node = (i + 1).to_string();
        let mut all = vec!["rabbitmq", "cli", node.as_str(), tool];
        all.extend_from_slice(args);
        run_script(&all)
    }

    /// The members of quorum queue `queue` (vhost `/`) as node `via` reports them: `(node index,
    /// raft state)` such as `(0, "leader")`; empty when it is not a quorum queue or not there.
    pub fn quorum_members(&self, via: usize, queue: &str) -> Vec<(usize, String)> {
        let node = (via + 1).to_string();
        let out = Command::new("bash")
            .arg(script())
            .args(["rabbitmq", "cli", &node, "rabbitmq-queues", "quorum_status", queue, "--formatter", "json"])
            .stdin(Stdio::null())
            .output();
        let Ok(out) = out else { return Vec::new() };
        let Ok(rows) = serde_json::from_slice::<Vec<serde_json::Value>>(&out.stdout) else { return Vec::new() };
        rows.iter()
            .filter_map(|row| {
                let name = row.get("Node Name")?.as_str()?;
                let i = (0..self.nodes.len()).find(|&i| self.node_name(i) == name)?;
                Some((i, row.get("Raft State")?.as_str()?.to_owned()))
            })
            .collect()
    }

    /// Waits until quorum queue `queue` has a leader on a node other than `not`, as node `via`
    /// sees it; that leader's index, or `None` at the deadline.
    pub fn wait_quorum_leader(&self, via: usize, queue: &str, not: usize, timeout: Duration) -> Option<usize> {
        let mut leader = None;
        wait_until(timeout, || {
            leader = self.quorum_members(via, queue).into_iter().find(|(i, s)| *i != not && s == "leader").map(|m| m.0);
            leader.is_some()
        });
        leader
    }
}

// ---------------------------------------------------------------------------------------------

/// A Redis master with 2 replicas (ports 6801-6803 by default) watched by 3 sentinels
/// (26801-26803) on master name `mymaster`, quorum 2, a master down after 2 s; held by this test
/// while the value lives. Which node is the master changes with failovers: ask
/// [`Sentinel::current_master`].
#[derive(Debug)]
pub struct Sentinel {
    nodes: Vec<Node>,
    sentinels: Vec<Node>,
    _turn: Turn,
}

impl Sentinel {
    /// The setup, up, every sentinel agreeing on the master and seeing both replicas and the
    /// other sentinels; `None` when skipped (see the module doc).
    pub fn up() -> Option<Sentinel> {
        let (turn, nodes, sentinels) = up(Kind::Sentinel)?;
        assert_eq!((nodes.len(), sentinels.len()), (3, 3), "scripts/cluster sentinel nodes: {nodes:?} {sentinels:?}");
        Some(Sentinel { nodes, sentinels, _turn: turn })
    }

    /// The master name the sentinels monitor.
    pub fn master_name(&self) -> String {
        std::env::var("CLUSTER_SENTINEL_MASTER").unwrap_or_else(|_| "mymaster".into())
    }

    /// The Redis nodes (master and replicas).
    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// The sentinels.
    pub fn sentinels(&self) -> &[Node] {
        &self.sentinels
    }

    /// The URL of Redis node `i` alone.
    pub fn url(&self, i: usize) -> &str {
        &self.nodes[i].url
    }

    /// Kombu's broker URL for this setup and database `db`:
    /// `sentinel://127.0.0.1:26801;sentinel://127.0.0.1:26802;sentinel://127.0.0.1:26803/DB?master_name=mymaster`.
    pub fn broker_url(&self, db: u8) -> String {
        let list: Vec<String> = self.sentinels.iter().map(|s| format!("sentinel://127.0.0.1:{}", s.port)).collect();
        format!("{}/{db}?master_name={}", list.join(";"), self.master_name())
    }

    /// A connection to Redis node `i`, or `None` when it does not answer.
    pub fn node_conn(&self, i: usize) -> Option<redis::Connection> {
        redis_conn(&self.nodes[i].url)
    }

    /// The node that sentinel `j` names as master (`SENTINEL get-master-addr-by-name`), or `None`
    /// when it does not answer or names no node of this setup.
    pub fn master_by(&self, j: usize) -> Option<usize> {
        let mut c = redis_conn(&self.sentinels[j].url)?;
        let addr: Option<(String, u16)> = redis::cmd("SENTINEL")
            .arg("get-master-addr-by-name")
            .arg(self.master_name())
            .query::<Option<(String, String)>>(&mut c)
            .ok()
            .flatten()
            .and_then(|(host, port)| port.parse().ok().map(|p| (host, p)));
        let (_, port) = addr?;
        self.nodes.iter().position(|n| n.port == port)
    }

    /// The master that a majority of the sentinels (2 of 3) name, or `None`.
    pub fn current_master(&self) -> Option<usize> {
        let named: Vec<usize> = (0..self.sentinels.len()).filter_map(|j| self.master_by(j)).collect();
        named.iter().copied().find(|m| named.iter().filter(|x| *x == m).count() * 2 > self.sentinels.len())
    }

    /// The replication role (`master` or `slave`) that Redis node `i` reports, or `None` when it
    /// does not answer.
    pub fn role(&self, i: usize) -> Option<String> {
        let mut c = self.node_conn(i)?;
        let role: Vec<redis::Value> = redis::cmd("ROLE").query(&mut c).ok()?;
        match role.first()? {
            redis::Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
            redis::Value::SimpleString(s) => Some(s.clone()),
            _ => None,
        }
    }

    /// Waits until every live sentinel names the same master other than `old` and that node says
    /// it is a master; its index, or `None` at the deadline.
    pub fn wait_new_master(&self, old: usize, timeout: Duration) -> Option<usize> {
        let mut found = None;
        wait_until(timeout, || {
            let named: Vec<Option<usize>> = (0..self.sentinels.len()).map(|j| self.master_by(j)).collect();
            let answering: Vec<usize> = named.iter().flatten().copied().collect();
            found = match answering.first() {
                Some(&m)
                    if m != old
                        && answering.len() * 2 > self.sentinels.len()
                        && answering.iter().all(|x| *x == m)
                        && self.role(m).as_deref() == Some("master") =>
                {
                    Some(m)
                }
                _ => None,
            };
            found.is_some()
        });
        found
    }

    /// kill -9 Redis node `i`; returns once the process is gone.
    pub fn kill_node(&self, i: usize) {
        kill(Kind::Sentinel, &(i + 1).to_string());
    }

    /// Starts Redis node `i` again (a replica of the master the sentinels name, unless it is that
    /// master) and waits until it serves (a replica: in sync).
    pub fn restart_node(&self, i: usize) {
        restart(Kind::Sentinel, &(i + 1).to_string());
    }

    /// kill -9 sentinel `j`.
    pub fn kill_sentinel(&self, j: usize) {
        kill(Kind::Sentinel, &format!("s{}", j + 1));
    }

    /// Starts sentinel `j` again (with what it had learnt).
    pub fn restart_sentinel(&self, j: usize) {
        restart(Kind::Sentinel, &format!("s{}", j + 1));
    }

    /// True when Redis node `i`'s process runs.
    pub fn node_running(&self, i: usize) -> bool {
        running(Kind::Sentinel, "node", i)
    }
}

// ---------------------------------------------------------------------------------------------

/// A Redis Cluster of 6 nodes (ports 7001-7006 by default): 3 masters with a replica each, a
/// master failed over 2 s after it stops answering; held by this test while the value lives.
/// Which node serves which slots changes with failovers: ask [`RedisCluster::master_of_slot`].
#[derive(Debug)]
pub struct RedisCluster {
    nodes: Vec<Node>,
    _turn: Turn,
}

impl RedisCluster {
    /// The cluster, up, every slot served and every master with a replica in sync; `None` when
    /// skipped (see the module doc).
    pub fn up() -> Option<RedisCluster> {
        let (turn, nodes, _) = up(Kind::RedisCluster)?;
        assert_eq!(nodes.len(), 6, "scripts/cluster redis-cluster nodes: {nodes:?}");
        Some(RedisCluster { nodes, _turn: turn })
    }

    /// Its nodes.
    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// Every node's `redis://` URL: the initial nodes for `redis::cluster::ClusterClient::new`.
    pub fn initial_nodes(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.url.clone()).collect()
    }

    /// The broker URL: `redis+cluster://127.0.0.1:7001,127.0.0.1:7002,...`.
    pub fn broker_url(&self) -> String {
        let list: Vec<String> = self.nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)).collect();
        format!("redis+cluster://{}", list.join(","))
    }

    /// A connection to node `i` alone, or `None` when it does not answer.
    pub fn node_conn(&self, i: usize) -> Option<redis::Connection> {
        redis_conn(&self.nodes[i].url)
    }

    /// `CLUSTER NODES` as node `from` reports it, parsed: the masters of this cluster that serve
    /// slots and are not flagged as failing, with their slot ranges; and each replica with its
    /// master. `None` when `from` does not answer.
    fn topology(&self, from: usize) -> Option<Topology> {
        let text: String = redis::cmd("CLUSTER").arg("NODES").query(&mut self.node_conn(from)?).ok()?;
        // <id> <ip:port@cport> <flags> <master id> <ping> <pong> <epoch> <link> <slot ranges>...
        let rows: Vec<Vec<&str>> = text.lines().map(|l| l.split_whitespace().collect()).collect();
        let index_of = |id: &str| {
            let addr = rows.iter().find(|f| f.first() == Some(&id))?.get(1)?;
            let port: u16 = addr.split('@').next()?.rsplit(':').next()?.parse().ok()?;
            self.nodes.iter().position(|n| n.port == port)
        };
        let mut topology = Topology::default();
        for f in &rows {
            let (Some(i), Some(flags)) = (f.first().and_then(|id| index_of(id)), f.get(2)) else { continue };
            if flags.contains("fail") {
                continue;
            }
            if flags.contains("master") {
                let ranges: Vec<(u16, u16)> = f
                    .iter()
                    .skip(8)
                    .filter_map(|s| match s.split_once('-') {
                        Some((a, b)) => Some((a.parse().ok()?, b.parse().ok()?)),
                        None => s.parse().ok().map(|x| (x, x)),
                    })
                    .collect();
                if !ranges.is_empty() {
                    topology.masters.push((i, ranges));
                }
            } else if flags.contains("slave") {
                if let Some(m) = f.get(3).and_then(|m| index_of(m)) {
                    topology.replicas.push((i, m));
                }
            }
        }
        Some(topology)
    }

    /// The first live node's view.
    fn any_topology(&self) -> Option<Topology> {
        (0..self.nodes.len()).find_map(|i| self.topology(i))
    }

    /// The slot of `key` (`CLUSTER KEYSLOT`, asked of a live node).
    pub fn slot_of(&self, key: &str) -> u16 {
        (0..self.nodes.len())
            .find_map(|i| redis::cmd("CLUSTER").arg("KEYSLOT").arg(key).query(&mut self.node_conn(i)?).ok())
            .expect("no node of the Redis Cluster answers CLUSTER KEYSLOT")
    }

    /// The masters that serve slots, as a live node sees them.
    pub fn masters(&self) -> Vec<usize> {
        self.any_topology().map(|t| t.masters.into_iter().map(|(i, _)| i).collect()).unwrap_or_default()
    }

    /// The node serving `slot` as a live node sees it, or `None`.
    pub fn master_of_slot(&self, slot: u16) -> Option<usize> {
        self.any_topology()?.master_of(slot)
    }

    /// The replicas of master `m`, as a live node sees them.
    pub fn replicas_of(&self, m: usize) -> Vec<usize> {
        let replicas = self.any_topology().map(|t| t.replicas).unwrap_or_default();
        replicas.into_iter().filter(|(_, of)| *of == m).map(|(i, _)| i).collect()
    }

    /// Waits until every live node says the cluster is ok and that one node other than `old`
    /// serves `slot`; that node, or `None` at the deadline.
    pub fn wait_slot_moved(&self, slot: u16, old: usize, timeout: Duration) -> Option<usize> {
        let mut found = None;
        wait_until(timeout, || {
            let views: Vec<Option<usize>> = (0..self.nodes.len())
                .filter(|&i| i != old)
                .filter_map(|i| {
                    let mut c = self.node_conn(i)?;
                    let info: String = redis::cmd("CLUSTER").arg("INFO").query(&mut c).ok()?;
                    let ok = info.lines().any(|l| l.trim() == "cluster_state:ok");
                    Some(if ok { self.topology(i).and_then(|t| t.master_of(slot)) } else { None })
                })
                .collect();
            found = match views.first() {
                Some(&Some(m)) if m != old && views.iter().all(|v| *v == Some(m)) => Some(m),
                _ => None,
            };
            found.is_some()
        });
        found
    }

    /// kill -9 node `i`; returns once the process is gone.
    pub fn kill_node(&self, i: usize) {
        kill(Kind::RedisCluster, &(i + 1).to_string());
    }

    /// Starts node `i` again (with its data and cluster state) and waits until the cluster is
    /// whole again (a master failed over meanwhile comes back as a replica).
    pub fn restart_node(&self, i: usize) {
        restart(Kind::RedisCluster, &(i + 1).to_string());
    }

    /// True when node `i`'s process runs.
    pub fn node_running(&self, i: usize) -> bool {
        running(Kind::RedisCluster, "node", i)
    }
}

/// Who serves what in a Redis Cluster, as one node sees it.
#[derive(Debug, Default)]
struct Topology {
    /// Masters serving slots (not flagged as failing): index and slot ranges.
    masters: Vec<(usize, Vec<(u16, u16)>)>,
    /// Replicas: index and the index of their master.
    replicas: Vec<(usize, usize)>,
}

impl Topology {
    fn master_of(&self, slot: u16) -> Option<usize> {
        self.masters.iter().find(|(_, ranges)| ranges.iter().any(|(a, b)| (*a..=*b).contains(&slot))).map(|(i, _)| *i)
    }
}

/// What the producer saw.
#[derive(Debug, Default)]
pub struct Sends {
    /// Tokens of the sends that returned OK.
    pub ok: BTreeSet<String>,
    pub failed: usize,
    /// The last failure.
    pub error: Option<String>,
    /// When each OK send started and returned.
    pub ok_at: Vec<(Instant, Instant)>,
}

/// A failover test's producer: sends `record` tasks (token `t1`, `t2`, ...) to `queue`, one every
/// 20 ms, until `stop`; each send bounded by `send_timeout`.
pub async fn produce(
    app: App,
    queue: String,
    path: String,
    sends: Arc<Mutex<Sends>>,
    stop: Arc<AtomicBool>,
    send_timeout: Duration,
) {
    let mut pace = tokio::time::interval(Duration::from_millis(20));
    let mut k = 0;
    while !stop.load(Ordering::SeqCst) {
        pace.tick().await;
        k += 1;
        let token = format!("t{k}");
        let sig = Signature::by_name("record").args(json!([path, token])).queue(queue.clone());
        let start = Instant::now();
        let sent = tokio::time::timeout(send_timeout, app.send(sig)).await;
        let mut s = sends.lock().unwrap();
        match sent {
            Ok(Ok(_)) => {
                s.ok.insert(token);
                s.ok_at.push((start, Instant::now()));
            }
            Ok(Err(e)) => (s.failed, s.error) = (s.failed + 1, Some(e.to_string())),
            Err(_) => (s.failed, s.error) = (s.failed + 1, Some(format!("no answer within {send_timeout:?}"))),
        }
    }
}

impl Sends {
    /// How many sends that started after `t` returned OK.
    pub fn ok_since(&self, t: Instant) -> usize {
        self.ok_at.iter().filter(|(start, _)| *start > t).count()
    }

    /// How long after `t` the first send that started after it returned OK.
    pub fn first_ok_after(&self, t: Instant) -> Option<Duration> {
        self.ok_at.iter().filter(|(start, _)| *start > t).map(|(_, done)| *done - t).min()
    }
}

/// Waits until `after` sends that started after `killed` returned OK; panics when none did within
/// `sends_again` of the kill, or not all within `drain`.
pub async fn wait_sends_resume(
    sends: &Mutex<Sends>,
    killed: Instant,
    after: usize,
    sends_again: Duration,
    drain: Duration,
) {
    let ok_since = |t: Instant| sends.lock().unwrap().ok_since(t);
    while ok_since(killed) < after {
        let failures = || {
            let s = sends.lock().unwrap();
            format!("{} failed, the last with {:?}", s.failed, s.error)
        };
        assert!(
            ok_since(killed) > 0 || killed.elapsed() < sends_again,
            "no send succeeded within {sends_again:?} of the kill ({})",
            failures()
        );
        assert!(killed.elapsed() < drain, "{after} sends after the kill ({})", failures());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A name unique to one test run: `tag-` and 12 hex digits.
pub fn unique(tag: &str) -> String {
    format!("{tag}-{}", &uuid::Uuid::new_v4().simple().to_string()[..12])
}

/// The tokens a `record` file holds, with how often each was recorded.
pub fn recorded(path: &Path) -> BTreeMap<String, usize> {
    let mut seen = BTreeMap::new();
    for line in std::fs::read_to_string(path).unwrap_or_default().lines() {
        *seen.entry(line.to_owned()).or_insert(0) += 1;
    }
    seen
}

/// How many `task` tasks worker `host` says it ran (remote control `stats`), `None` without an
/// answer within 5 s.
pub async fn runs(app: &App, host: &str, task: &str) -> Option<u64> {
    let replies =
        celery_worker::control::request(app, "stats", json!({}), Some(vec![host.to_owned()]), Duration::from_secs(5))
            .await
            .ok()?;
    let (_, stats) = replies.into_iter().find(|(h, _)| h == host)?;
    Some(stats["total"][task].as_u64().unwrap_or(0))
}

/// Asks [`runs`] until it answers (remote control subscribes again after a failover), at most
/// `within`.
pub async fn runs_within(app: &App, host: &str, task: &str, within: Duration) -> Option<u64> {
    let end = Instant::now() + within;
    loop {
        if let Some(n) = runs(app, host, task).await {
            return Some(n);
        }
        if Instant::now() > end {
            return None;
        }
    }
}

/// The tokens of `sends` that returned OK and are still not in the record file `file` after
/// polling it for at most `within` (empty: every acknowledged send ran, at least once).
pub async fn never_run(sends: &Sends, file: &Path, within: Duration) -> Vec<String> {
    let end = Instant::now() + within;
    loop {
        let seen = recorded(file);
        let missing: Vec<String> = sends.ok.iter().filter(|t| !seen.contains_key(*t)).cloned().collect();
        if missing.is_empty() || Instant::now() > end {
            return missing;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

//! Helpers for the cross-crate suites: reaching the real servers, isolating each test, and running
//! the demo binary as a real process.
//!
//! Every Redis test uses its own key prefix (Kombu's `global_keyprefix`), so tests run in parallel.
//! When Redis is not reachable, a test prints that it was skipped and why, unless
//! `CELERY_REQUIRE_SERVICES=1` (set by `.ci/run`), where it fails.
//!
//! [`python`] installs Python Celery and Flower for the suites that run them against ours;
//! [`browser`] installs headless Chromium for the suites that look at web pages;
//! [`cluster`] runs RabbitMQ and Redis clusters on loopback (`scripts/cluster`) for the failover
//! suites; [`pg_server`] runs a private PostgreSQL server for the suites that restart or crash one;
//! [`otlp`] is a small OTLP/HTTP collector for the tracing suites; [`flow`] is where the
//! flow-control suites run their worker processes (built-in broker, Redis or PostgreSQL).

pub mod browser;
pub mod cluster;
pub mod flow;
pub mod otlp;
pub mod pg_server;
pub mod python;

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The Redis server the suites use.
pub const REDIS: &str = "redis://127.0.0.1:6379";
/// The database the suites use, each test under a key prefix of its own (`python_interop` uses
/// databases 1-8 and 10-15 of its own).
pub const TEST_DB: u8 = 9;

/// True when the run must not skip a suite for a missing server.
pub fn services_required() -> bool {
    std::env::var("CELERY_REQUIRE_SERVICES").is_ok_and(|v| v == "1")
}

/// Checks that Redis answers; prints a skip line (or panics under `CELERY_REQUIRE_SERVICES=1`).
pub fn redis_available(suite: &str) -> bool {
    let ok = redis::Client::open(format!("{REDIS}/0"))
        .and_then(|c| c.get_connection_with_timeout(Duration::from_secs(2)))
        .and_then(|mut c| redis::cmd("PING").query::<String>(&mut c))
        .is_ok();
    if !ok {
        if services_required() {
            panic!("{suite}: Redis at {REDIS} is not reachable and CELERY_REQUIRE_SERVICES=1");
        }
        eprintln!("SKIPPED {suite}: Redis at {REDIS} is not reachable (start redis-server to run it)");
    }
    ok
}

/// A unique key prefix and the broker/backend URLs that use it.
#[derive(Debug, Clone)]
pub struct RedisEnv {
    /// The key prefix (ends with `:`).
    pub prefix: String,
    /// Broker URL with the prefix and a short visibility timeout.
    pub broker: String,
    /// Result backend URL with the prefix.
    pub backend: String,
}

impl RedisEnv {
    /// A fresh prefix; `visibility_timeout` in seconds.
    pub fn new(visibility_timeout: f64) -> RedisEnv {
        let prefix = format!("t{}:", &uuid::Uuid::new_v4().simple().to_string()[..12]);
        RedisEnv {
            broker: format!("{REDIS}/{TEST_DB}?global_keyprefix={prefix}&visibility_timeout={visibility_timeout}"),
            backend: format!("{REDIS}/{TEST_DB}?global_keyprefix={prefix}"),
            prefix,
        }
    }

    /// A plain connection to the test database.
    pub fn conn(&self) -> redis::Connection {
        redis::Client::open(format!("{REDIS}/{TEST_DB}")).and_then(|c| c.get_connection()).expect("redis connection")
    }

    /// The prefixed name of a key.
    pub fn key(&self, k: &str) -> String {
        format!("{}{k}", self.prefix)
    }
}

impl Drop for RedisEnv {
    fn drop(&mut self) {
        if let Ok(mut c) = redis::Client::open(format!("{REDIS}/{TEST_DB}")).and_then(|c| c.get_connection()) {
            let keys: Vec<String> =
                redis::cmd("KEYS").arg(format!("{}*", self.prefix)).query(&mut c).unwrap_or_default();
            if !keys.is_empty() {
                let _: Result<(), _> = redis::cmd("DEL").arg(keys).query(&mut c);
            }
        }
    }
}

/// The demo binary, built by `cargo test` as an example of the workspace.
pub fn demo_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let profile_dir = exe.parent().and_then(|p| p.parent()).expect("target/<profile>");
    let bin = profile_dir.join("examples").join("demo");
    assert!(
        bin.exists(),
        "{} is missing: run the suite with `cargo test --workspace` (it builds the examples)",
        bin.display()
    );
    bin
}

/// A demo process that is killed when dropped; its stderr goes to a log file.
#[derive(Debug)]
pub struct DemoProcess {
    /// The child process.
    pub child: Child,
    /// Where its stderr goes.
    pub log: PathBuf,
}

impl DemoProcess {
    /// Starts `demo <args>` against `env`.
    pub fn start(env: &RedisEnv, args: &[&str]) -> DemoProcess {
        DemoProcess::start_urls(&env.broker, &env.backend, args)
    }

    /// Starts `demo <args>` with these broker and backend URLs.
    pub fn start_urls(broker: &str, backend: &str, args: &[&str]) -> DemoProcess {
        let log = std::env::temp_dir().join(format!("demo-{}.log", uuid::Uuid::new_v4().simple()));
        let file = std::fs::File::create(&log).expect("log file");
        let child = Command::new(demo_bin())
            .args(args)
            .env("CELERY_BROKER_URL", broker)
            .env("CELERY_RESULT_BACKEND", backend)
            .env("RUST_LOG", std::env::var("DEMO_RUST_LOG").unwrap_or_else(|_| "info".into()))
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("start demo");
        DemoProcess { child, log }
    }

    /// Sends a signal (`libc`-free: through `kill`).
    pub fn signal(&self, sig: &str) {
        let status =
            Command::new("kill").arg(format!("-{sig}")).arg(self.child.id().to_string()).status().expect("kill");
        assert!(status.success(), "kill -{sig} failed");
    }

    /// Waits for the process to exit, at most `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let end = Instant::now() + timeout;
        while Instant::now() < end {
            if let Ok(Some(s)) = self.child.try_wait() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// The log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log contains `needle`.
    pub fn wait_log(&self, needle: &str, timeout: Duration) -> bool {
        wait_until(timeout, || self.log().contains(needle))
    }
}

impl Drop for DemoProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log);
    }
}

/// What a process holds now, from `/proc/PID` (Linux).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcStats {
    /// Threads (`Threads:` of `status`).
    pub threads: u64,
    /// Open file descriptors (entries of `fd/`).
    pub fds: u64,
    /// Resident memory in KiB (`VmRSS:`).
    pub rss_kib: u64,
}

/// The threads, descriptors and resident memory of process `pid`.
pub fn proc_stats(pid: u32) -> ProcStats {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count() as u64).unwrap_or(0);
    ProcStats { threads: field("Threads:"), fds, rss_kib: field("VmRSS:") }
}

/// Polls `cond` every 20 ms until it holds or `timeout` passes.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// An HTTP answer: status, headers (lowercase names), body.
#[derive(Debug)]
pub struct Answer {
    /// The status code (0 when the answer had no status line).
    pub status: u16,
    /// The headers, names in lowercase.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: String,
}

impl Answer {
    /// The value of header `name` (lowercase).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }
}

/// One HTTP/1.1 request (`Connection: close`) to `addr` with these extra header lines.
pub fn http(addr: &str, method: &str, path: &str, headers: &[(&str, &str)]) -> Answer {
    let mut s = std::net::TcpStream::connect(addr).expect("connect to the monitor");
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\nConnection: close\r\nContent-Length: 0\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let mut lines = head.lines();
    let status = lines.next().and_then(|l| l.split(' ').nth(1)).and_then(|c| c.parse().ok()).unwrap_or(0);
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Answer { status, headers, body: body.to_owned() }
}

/// A free TCP port on loopback.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("free port")
}

/// A redis-server of the test's own on a free loopback port (no persistence), killed on drop: its
/// command counters are the worker's alone.
pub struct PrivateRedis {
    child: std::process::Child,
    /// `redis://127.0.0.1:<port>/0`.
    pub url: String,
}

impl PrivateRedis {
    /// Starts one, or None (skipped) without `redis-server` unless `CELERY_REQUIRE_SERVICES=1`.
    pub fn start() -> Option<PrivateRedis> {
        let port = crate::free_port();
        let spawned = std::process::Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn();
        let child = match spawned {
            Ok(c) => c,
            Err(e) if !crate::services_required() => {
                eprintln!("SKIPPED: cannot start redis-server: {e}");
                return None;
            }
            Err(e) => panic!("cannot start redis-server and CELERY_REQUIRE_SERVICES=1: {e}"),
        };
        let url = format!("redis://127.0.0.1:{port}/0");
        let server = PrivateRedis { child, url };
        let up = crate::wait_until(std::time::Duration::from_secs(10), || server.commands().is_some());
        assert!(up, "redis-server on port {port} did not answer");
        Some(server)
    }

    /// The server's `total_commands_processed` (each call adds one: its `INFO`).
    pub fn commands(&self) -> Option<u64> {
        let mut c = redis::Client::open(self.url.as_str()).ok()?.get_connection().ok()?;
        let info: String = redis::cmd("INFO").arg("stats").query(&mut c).ok()?;
        info.lines().find_map(|l| l.strip_prefix("total_commands_processed:")).and_then(|v| v.trim().parse().ok())
    }

    /// How many times the server ran `command` (`INFO commandstats`; a script's own calls count).
    pub fn calls(&self, command: &str) -> u64 {
        let info: String = redis::cmd("INFO").arg("commandstats").query(&mut self.conn()).expect("INFO commandstats");
        let prefix = format!("cmdstat_{command}:calls=");
        info.lines()
            .find_map(|l| l.strip_prefix(prefix.as_str()))
            .and_then(|rest| rest.split(',').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }

    /// A new connection to it.
    pub fn conn(&self) -> redis::Connection {
        redis::Client::open(self.url.as_str()).and_then(|c| c.get_connection()).expect("redis connection")
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A fresh temporary directory, removed on drop.
#[derive(Debug)]
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// Creates it.
    pub fn new(tag: &str) -> TempDir {
        let d = std::env::temp_dir().join(format!("{tag}-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&d).expect("temp dir");
        TempDir(d)
    }

    /// `log://<dir>` with extra query options.
    pub fn url(&self, query: &str) -> String {
        if query.is_empty() {
            format!("log://{}", self.0.display())
        } else {
            format!("log://{}?{query}", self.0.display())
        }
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A broker/backend pair under test, cleaned up on drop.
pub enum Target {
    /// `log://` on a directory.
    Log(std::path::PathBuf),
    /// `log+tcp://` to a server in this process.
    LogTcp(std::path::PathBuf, String, tokio::task::JoinHandle<()>),
    /// `redis://` with a key prefix.
    Redis(RedisEnv),
    /// `amqp://` on a vhost of its own, results on Redis.
    Amqp(AmqpVhost, RedisEnv),
    /// `postgres://` in a schema of its own, results on Redis.
    Postgres(PgSchema, RedisEnv),
    /// `redis+cluster://` on the loopback Redis Cluster (held while it lives), with a key prefix.
    RedisCluster(RedisClusterEnv),
}

/// A key prefix on the loopback Redis Cluster of [`cluster::RedisCluster`], held (no node is
/// killed meanwhile) while it lives; its keys are deleted on drop.
#[derive(Debug)]
pub struct RedisClusterEnv {
    /// The key prefix (ends with `:`).
    pub prefix: String,
    /// Broker URL with the prefix, `shards` and a visibility timeout of one second.
    pub broker: String,
    /// Result backend URL with the prefix.
    pub backend: String,
    /// The cluster.
    pub cluster: cluster::RedisCluster,
}

impl RedisClusterEnv {
    /// A fresh prefix on the cluster with `shards` per queue, or `None` (skipped) without it.
    pub fn new(shards: u16) -> Option<RedisClusterEnv> {
        let cluster = tokio::task::block_in_place(cluster::RedisCluster::up)?;
        let prefix = format!("t{}:", &uuid::Uuid::new_v4().simple().to_string()[..12]);
        let url = cluster.broker_url();
        Some(RedisClusterEnv {
            broker: format!("{url}?global_keyprefix={prefix}&visibility_timeout=1&shards={shards}"),
            backend: format!("{url}?global_keyprefix={prefix}"),
            prefix,
            cluster,
        })
    }
}

impl Drop for RedisClusterEnv {
    fn drop(&mut self) {
        for i in 0..self.cluster.nodes().len() {
            let Some(mut c) = self.cluster.node_conn(i) else { continue };
            let keys: Vec<String> =
                redis::cmd("KEYS").arg(format!("{}*", self.prefix)).query(&mut c).unwrap_or_default();
            for k in keys {
                let _: Result<(), _> = redis::cmd("DEL").arg(k).query(&mut c);
            }
        }
    }
}

impl Target {
    /// A fresh directory.
    pub fn log() -> Target {
        let dir = std::env::temp_dir().join(format!("conformance-{}", uuid::Uuid::new_v4().simple()));
        Target::Log(dir)
    }

    /// A `broker serve` in this process, reached over TCP.
    pub async fn log_tcp() -> Target {
        use broker_backends::log::{parse_url, serve_tcp, LogStore};
        let dir = std::env::temp_dir().join(format!("conformance-tcp-{}", uuid::Uuid::new_v4().simple()));
        let (d, cfg) = parse_url(&format!("log://{}?lease_timeout=1&fsync=os", dir.display())).unwrap();
        let store = LogStore::open(&d, cfg).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let server = tokio::spawn(serve_tcp(store, listener, Some("s3cret".into()), None));
        Target::LogTcp(dir, addr, server)
    }

    /// RabbitMQ on a fresh vhost (results on Redis), or None (skipped) without the servers.
    pub fn amqp() -> Option<Target> {
        if !amqp_available("conformance (amqp)") || !redis_available("conformance (amqp results)") {
            return None;
        }
        Some(Target::Amqp(AmqpVhost::new(), RedisEnv::new(1.0)))
    }

    /// PostgreSQL in a fresh schema (results on Redis), or None (skipped) without the servers.
    pub fn postgres() -> Option<Target> {
        if !redis_available("conformance (postgres results)") {
            return None;
        }
        let schema = PgSchema::new("conformance (postgres)")?;
        Some(Target::Postgres(schema, RedisEnv::new(1.0)))
    }

    /// A fresh key prefix on the loopback Redis Cluster with `shards` per queue, or None
    /// (skipped) without its binaries.
    pub fn redis_cluster(shards: u16) -> Option<Target> {
        RedisClusterEnv::new(shards).map(Target::RedisCluster)
    }

    /// A fresh key prefix, or None (skipped) without Redis.
    pub fn redis() -> Option<Target> {
        redis_available("conformance (redis)").then(|| Target::Redis(RedisEnv::new(1.0)))
    }

    /// Broker URL with a short lease / visibility timeout of one second.
    pub fn urls(&self) -> (String, String) {
        match self {
            Target::Log(d) => {
                (format!("log://{}?lease_timeout=1&fsync=os", d.display()), format!("log://{}", d.display()))
            }
            Target::LogTcp(_, a, _) => (format!("log+tcp://{a}?token=s3cret"), format!("log+tcp://{a}?token=s3cret")),
            Target::Redis(e) => (e.broker.clone(), e.backend.clone()),
            Target::Amqp(v, e) => (v.url(), e.backend.clone()),
            Target::Postgres(s, e) => (s.url("postgres", "visibility_timeout=1"), e.backend.clone()),
            Target::RedisCluster(e) => (e.broker.clone(), e.backend.clone()),
        }
    }

    /// An app on this target.
    pub async fn app(&self) -> celery_core::App {
        let (b, r) = self.urls();
        celery_worker::connect(&b, &r).await.expect("connect")
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        match self {
            Target::Log(d) => {
                let _ = std::fs::remove_dir_all(d);
            }
            Target::LogTcp(d, _, server) => {
                server.abort();
                let _ = std::fs::remove_dir_all(d);
            }
            Target::Redis(_) | Target::Amqp(..) | Target::Postgres(..) | Target::RedisCluster(_) => {}
        }
    }
}

/// RabbitMQ's AMQP port.
pub const AMQP: &str = "127.0.0.1:5672";

/// Checks that RabbitMQ answers; prints a skip line (or panics under `CELERY_REQUIRE_SERVICES=1`).
pub fn amqp_available(suite: &str) -> bool {
    let ok = std::net::TcpStream::connect_timeout(&AMQP.parse().expect("addr"), Duration::from_secs(2)).is_ok();
    if !ok {
        if services_required() {
            panic!("{suite}: RabbitMQ at {AMQP} is not reachable and CELERY_REQUIRE_SERVICES=1");
        }
        eprintln!("SKIPPED {suite}: RabbitMQ at {AMQP} is not reachable (start rabbitmq-server to run it)");
    }
    ok
}

fn rabbitmqctl(args: &[&str]) -> bool {
    Command::new("rabbitmqctl")
        .arg("-q")
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A RabbitMQ vhost for one test (guest may use it), deleted on drop.
#[derive(Debug)]
pub struct AmqpVhost(pub String);

impl AmqpVhost {
    /// Creates it.
    pub fn new() -> AmqpVhost {
        let name = format!("t-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
        assert!(rabbitmqctl(&["add_vhost", &name]), "rabbitmqctl add_vhost {name} failed");
        assert!(rabbitmqctl(&["set_permissions", "-p", &name, "guest", ".*", ".*", ".*"]), "set_permissions failed");
        AmqpVhost(name)
    }

    /// The broker URL for it.
    pub fn url(&self) -> String {
        format!("amqp://guest:guest@{AMQP}/{}", self.0)
    }
}

impl Default for AmqpVhost {
    fn default() -> Self {
        AmqpVhost::new()
    }
}

impl Drop for AmqpVhost {
    fn drop(&mut self) {
        rabbitmqctl(&["delete_vhost", &self.0]);
    }
}

/// PEM files of a throwaway certificate authority, a server certificate it signed (for
/// `localhost` and 127.0.0.1) and a client certificate it signed, in a temporary directory.
#[derive(Debug)]
pub struct TestPki {
    /// Where the files are: `ca.pem`, `server.pem`, `server.key`, `client.pem`, `client.key`.
    pub dir: TempDir,
}

impl TestPki {
    /// Generates the files.
    pub fn new() -> TestPki {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
        let dir = TempDir::new("pki");
        let ca_key = KeyPair::generate().expect("key");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.distinguished_name.push(DnType::CommonName, "celery-rs test CA");
        let ca = ca_params.self_signed(&ca_key).expect("CA certificate");
        let write = |name: &str, pem: String| std::fs::write(dir.0.join(name), pem).expect("write PEM");
        write("ca.pem", ca.pem());
        for (name, sans) in
            [("server", vec!["localhost".to_string(), "127.0.0.1".into()]), ("client", vec!["client".into()])]
        {
            let key = KeyPair::generate().expect("key");
            let mut params = CertificateParams::new(sans).expect("params");
            params.distinguished_name.push(DnType::CommonName, name);
            let cert = params.signed_by(&key, &ca, &ca_key).expect("certificate");
            write(&format!("{name}.pem"), cert.pem());
            write(&format!("{name}.key"), key.serialize_pem());
        }
        TestPki { dir }
    }

    /// The path of one of the files, as a string.
    pub fn path(&self, name: &str) -> String {
        self.dir.0.join(name).display().to_string()
    }
}

impl Default for TestPki {
    fn default() -> Self {
        TestPki::new()
    }
}

/// A TLS listener added to the running RabbitMQ (through `rabbitmqctl eval`) on a free port of
/// 127.0.0.1, with the certificates of a [`TestPki`]; it asks clients for a certificate signed by
/// the same authority. Removed on drop.
#[derive(Debug)]
pub struct AmqpTlsListener {
    /// The certificates.
    pub pki: TestPki,
    /// The TLS port.
    pub port: u16,
}

impl AmqpTlsListener {
    /// Starts it.
    pub fn start() -> AmqpTlsListener {
        let pki = TestPki::new();
        let port = free_port();
        let expr = format!(
            "rabbit_networking:start_ssl_listener({{\"127.0.0.1\", {port}}}, [{{cacertfile, \"{}\"}}, \
             {{certfile, \"{}\"}}, {{keyfile, \"{}\"}}, {{verify, verify_peer}}, {{fail_if_no_peer_cert, true}}], 1, 1).",
            pki.path("ca.pem"),
            pki.path("server.pem"),
            pki.path("server.key"),
        );
        assert!(rabbitmqctl(&["eval", &expr]), "rabbitmqctl eval start_ssl_listener failed");
        AmqpTlsListener { pki, port }
    }
}

impl Drop for AmqpTlsListener {
    fn drop(&mut self) {
        rabbitmqctl(&["eval", &format!("rabbit_networking:stop_tcp_listener({{\"127.0.0.1\", {}}}).", self.port)]);
    }
}

/// Runs each named `async fn(Target)` of the calling test file as one test per broker (`log_broker`,
/// `log_tcp_broker`, `redis_broker`, `amqp_broker`, `postgres_broker`); the Redis, RabbitMQ and PostgreSQL ones skip (or fail under
/// `CELERY_REQUIRE_SERVICES`) when their server is down. The calling file imports `Target`.
#[macro_export]
macro_rules! each_broker {
    ($($name:ident),* $(,)?) => {
        mod log_broker {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() { super::$name(super::Target::log()).await }
            )*
        }
        mod log_tcp_broker {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() { super::$name(super::Target::log_tcp().await).await }
            )*
        }
        mod redis_broker {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    if let Some(t) = super::Target::redis() { super::$name(t).await }
                }
            )*
        }
        mod amqp_broker {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    if let Some(t) = super::Target::amqp() { super::$name(t).await }
                }
            )*
        }
        mod postgres_broker {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    if let Some(t) = super::Target::postgres() { super::$name(t).await }
                }
            )*
        }
    };
}

/// The PostgreSQL server and database the suites use (trust authentication).
pub const POSTGRES: &str = "postgres@127.0.0.1:5432/test";

/// Runs `sql` (several statements) on the test database and returns the rows they give, as text
/// (NULL as None), from a thread of its own so that sync and async tests alike can call it.
pub fn postgres_query(sql: &str) -> Result<Vec<Vec<Option<String>>>, String> {
    let sql = sql.to_owned();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
        rt.block_on(async {
            let mut cfg: tokio_postgres::Config =
                format!("postgresql://{POSTGRES}").parse().map_err(|e: tokio_postgres::Error| e.to_string())?;
            cfg.connect_timeout(Duration::from_secs(3));
            let (client, conn) = cfg.connect(tokio_postgres::NoTls).await.map_err(|e| e.to_string())?;
            let driver = tokio::spawn(conn);
            let r = client
                .simple_query(&sql)
                .await
                .map_err(|e| e.as_db_error().map_or_else(|| e.to_string(), |d| d.message().to_owned()));
            drop(client);
            let _ = driver.await;
            Ok(r?
                .into_iter()
                .filter_map(|m| match m {
                    tokio_postgres::SimpleQueryMessage::Row(row) => {
                        Some((0..row.len()).map(|i| row.get(i).map(str::to_owned)).collect())
                    }
                    _ => None,
                })
                .collect())
        })
    })
    .join()
    .map_err(|_| "the PostgreSQL helper thread panicked".to_owned())?
}

/// Runs `sql` (several statements) on the test database.
pub fn postgres_exec(sql: &str) -> Result<(), String> {
    postgres_query(sql).map(drop)
}

/// Checks that PostgreSQL answers; prints a skip line (or panics under `CELERY_REQUIRE_SERVICES=1`).
pub fn postgres_available(suite: &str) -> bool {
    match postgres_exec("SELECT 1") {
        Ok(()) => true,
        Err(e) if services_required() => panic!("{suite}: PostgreSQL at {POSTGRES} is not reachable: {e}"),
        Err(e) => {
            eprintln!("SKIPPED {suite}: PostgreSQL at {POSTGRES} is not reachable ({e})");
            false
        }
    }
}

/// A schema of its own in the test database, dropped with everything in it on drop: each test's
/// tables live there (the URL's `options=-csearch_path=...`), so tests run in parallel.
#[derive(Debug)]
pub struct PgSchema(pub String);

impl PgSchema {
    /// A fresh schema, or None (skipped) without PostgreSQL.
    pub fn new(suite: &str) -> Option<PgSchema> {
        if !postgres_available(suite) {
            return None;
        }
        let name = format!("t{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
        postgres_exec(&format!("CREATE SCHEMA {name}")).expect("create schema");
        Some(PgSchema(name))
    }

    /// `SCHEME://postgres@127.0.0.1:5432/test?options=-csearch_path%3D<schema>[&query]`.
    pub fn url(&self, scheme: &str, query: &str) -> String {
        let sep = if query.is_empty() { "" } else { "&" };
        format!("{scheme}://{POSTGRES}?options=-csearch_path%3D{}{sep}{query}", self.0)
    }

    /// Runs `sql` with this schema first in the search path.
    pub fn exec(&self, sql: &str) -> Result<(), String> {
        self.query(sql).map(drop)
    }

    /// Runs `sql` with this schema first in the search path; the rows as text.
    pub fn query(&self, sql: &str) -> Result<Vec<Vec<Option<String>>>, String> {
        postgres_query(&format!("SET search_path TO {}; {sql}", self.0))
    }
}

impl Drop for PgSchema {
    fn drop(&mut self) {
        let _ = postgres_exec(&format!("DROP SCHEMA IF EXISTS {} CASCADE", self.0));
    }
}

/// The queues worker `host` consumes now, as it answers `inspect active_queues`.
pub async fn consumed_queues(app: &celery_core::App, host: &str) -> Vec<String> {
    let t = Duration::from_secs(30);
    let replies =
        celery_worker::control::request(app, "active_queues", serde_json::json!({}), Some(vec![host.to_owned()]), t)
            .await
            .expect("active_queues");
    let (_, queues) = replies.into_iter().find(|(h, _)| h == host).expect("the worker answers");
    queues.as_array().into_iter().flatten().filter_map(|q| q["name"].as_str().map(str::to_owned)).collect()
}

/// Probes every 50 ms until `done` holds for what `probe` returns or `timeout` passes; returns the
/// last probe (the caller asserts on it, so a timeout fails with what was seen).
///
/// ```no_run
/// # async fn demo() {
/// use std::time::Duration;
/// let n = celery_tests::poll_until(Duration::from_secs(1), || async { 3 }, |n| *n == 3).await;
/// assert_eq!(n, 3);
/// # }
/// ```
pub async fn poll_until<T, F, Fut>(timeout: Duration, mut probe: F, done: impl Fn(&T) -> bool) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = T>,
{
    let end = tokio::time::Instant::now() + timeout;
    loop {
        let seen = probe().await;
        if done(&seen) || tokio::time::Instant::now() >= end {
            return seen;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

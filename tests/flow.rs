//! Where the flow-control suites (`flow_control`, `fair_queues`) run real worker processes: a
//! `broker serve` process reached over `log+tcp://`, a Redis key prefix, or a PostgreSQL schema of
//! its own (results in the same schema).
//!
//! ```no_run
//! # async fn demo() {
//! use celery_tests::flow::Setup;
//! let setup = Setup::log("flow", "lease_timeout=2&fsync=os");
//! let app = setup.app().await;
//! let _worker = setup.worker(&["-c", "4"]);
//! # drop(app);
//! # }
//! ```

use std::time::Duration;

use crate::{free_port, redis_available, wait_until, DemoProcess, PgSchema, RedisEnv, TempDir};

/// How long a server or a worker has to come up.
const UP: Duration = Duration::from_secs(60);

/// Where the tasks go.
pub enum Setup {
    /// A `broker serve` process (killed on drop) on a directory of its own.
    Log {
        /// The data directory.
        _dir: TempDir,
        /// The server process.
        _server: DemoProcess,
        /// `log+tcp://<addr>`.
        url: String,
    },
    /// A Redis key prefix.
    Redis(RedisEnv),
    /// A PostgreSQL schema (dropped on drop); `query` goes on the broker URL.
    Postgres {
        /// The schema.
        schema: PgSchema,
        /// Broker URL options.
        query: String,
    },
}

impl Setup {
    /// A `broker serve` process whose data URL takes `query` (e.g. `fsync=os`); `name` names its
    /// directory.
    pub fn log(name: &str, query: &str) -> Setup {
        let dir = TempDir::new(name);
        let listen = format!("127.0.0.1:{}", free_port());
        let data = dir.0.display().to_string();
        let server = DemoProcess::start_urls(
            "unused://",
            "unused://",
            &["broker", "serve", "--data", &format!("{data}?{query}"), "--listen", &listen],
        );
        assert!(wait_until(UP, || std::net::TcpStream::connect(&listen).is_ok()), "{}", server.log());
        Setup::Log { _dir: dir, _server: server, url: format!("log+tcp://{listen}") }
    }

    /// A fresh Redis prefix with `visibility_timeout` seconds, or None (skipped) without Redis.
    pub fn redis(suite: &str, visibility_timeout: f64) -> Option<Setup> {
        redis_available(suite).then(|| Setup::Redis(RedisEnv::new(visibility_timeout)))
    }

    /// A fresh PostgreSQL schema whose broker URL takes `query` (e.g. `visibility_timeout=30`),
    /// or None (skipped) without PostgreSQL.
    pub fn postgres(suite: &str, query: &str) -> Option<Setup> {
        PgSchema::new(suite).map(|schema| Setup::Postgres { schema, query: query.to_owned() })
    }

    /// Broker and result backend URLs.
    pub fn urls(&self) -> (String, String) {
        match self {
            Setup::Log { url, .. } => (url.clone(), url.clone()),
            Setup::Redis(env) => (env.broker.clone(), env.backend.clone()),
            Setup::Postgres { schema, query } => (schema.url("postgres", query), schema.url("db+postgresql", "")),
        }
    }

    /// An app on this setup.
    pub async fn app(&self) -> celery_core::App {
        let (b, r) = self.urls();
        celery_worker::connect(&b, &r).await.expect("connect")
    }

    /// A demo worker process with a name of its own and `args`, once it is ready.
    pub fn worker(&self, args: &[&str]) -> DemoProcess {
        let name = format!("flow{}@{}", uuid::Uuid::new_v4().simple(), std::process::id());
        let (b, r) = self.urls();
        let w = DemoProcess::start_urls(&b, &r, &[&["worker", "-n", &name][..], args].concat());
        assert!(w.wait_log("worker ready", UP), "{}", w.log());
        w
    }
}

//! PostgreSQL connection URLs, shared by the broker (`postgres://`) and the result backend
//! (`db+postgresql://`): the server, TLS and the pool, read from a [`ServiceUrl`] whose scheme the
//! caller already checked; the caller reads its own options, then calls [`ServiceUrl::finish`].
//!
//! libpq's options pass through to tokio-postgres as psycopg2 would pass them to libpq:
//! `options` (e.g. `options=-csearch_path%3Dmyschema`, where the tables are created and read),
//! `application_name`, `connect_timeout` (default 10 s), `keepalives`, `keepalives_idle`,
//! `target_session_attrs`, `tcp_user_timeout`, `load_balance_hosts`, `channel_binding`, `host`,
//! `hostaddr`, `port`, `user`, `password`, `dbname`. Several hosts (`h1:5432,h2:5432`) are tried
//! in turn. TLS: `sslmode=require`, `verify-ca` and `verify-full` all connect over TLS and verify
//! the server's certificate chain (the system's roots plus `sslrootcert=PATH`) and its name —
//! stricter than libpq's `require`, which encrypts without checking whom it talks to;
//! `disable`, `allow` and `prefer` (and no `sslmode`) connect without TLS. `pool_size`
//! (connections, 1 to 64, default 4).
//!
//! Errors are [`PgError`]s, which the broker and the result backend convert into their own.

use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use super::error::PgError;
use celery_core::url::ServiceUrl;

/// The libpq options handed to tokio-postgres.
const LIBPQ: &[&str] = &[
    "options",
    "application_name",
    "connect_timeout",
    "keepalives",
    "keepalives_idle",
    "target_session_attrs",
    "tcp_user_timeout",
    "load_balance_hosts",
    "channel_binding",
    "host",
    "hostaddr",
    "port",
    "user",
    "password",
    "dbname",
];

/// The most pooled connections one backend opens.
pub const MAX_POOL_SIZE: usize = 64;

/// How to reach the server: everything [`super::connect`] needs, reusable by any PostgreSQL
/// component. Its `Debug` shows no password.
#[derive(Clone)]
pub struct ConnectOptions {
    /// The server, user, database and session options (holds the password).
    pub config: tokio_postgres::Config,
    /// TLS, when asked for.
    pub tls: Option<TlsOptions>,
    /// Pooled connections.
    pub pool_size: usize,
    /// The URL, redacted: for messages.
    pub shown: String,
}

impl std::fmt::Debug for ConnectOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectOptions")
            .field("url", &self.shown)
            .field("tls", &self.tls)
            .field("pool_size", &self.pool_size)
            .finish()
    }
}

/// `sslmode=require|verify-ca|verify-full`: TLS with the server's certificate verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsOptions {
    /// Extra trusted authorities (`sslrootcert`), besides the system's.
    pub root_cert: Option<PathBuf>,
}

/// Reads the connection part of `u` (whose scheme is already known to be PostgreSQL's), leaving
/// the options it does not know for the caller to read before [`ServiceUrl::finish`].
pub fn connect_options(u: &ServiceUrl) -> Result<ConnectOptions, PgError> {
    let shown = u.to_string();
    let bad = |reason: String| PgError::InvalidUrl { url: shown.clone(), reason };
    let pool_size = u.parse_option::<usize>("pool_size", "a number of connections from 1 to 64")?.unwrap_or(4);
    if !(1..=MAX_POOL_SIZE).contains(&pool_size) {
        return Err(u.bad_value("pool_size", "a number of connections from 1 to 64").into());
    }
    let tls = match u.option("sslmode") {
        None | Some("disable" | "allow" | "prefer") => None,
        Some("require" | "verify-ca" | "verify-full") => {
            Some(TlsOptions { root_cert: u.option("sslrootcert").map(PathBuf::from) })
        }
        Some(_) => {
            return Err(u.bad_value("sslmode", "disable, allow, prefer, require, verify-ca or verify-full").into())
        }
    };
    if tls.is_none() && u.option("sslrootcert").is_some() {
        return Err(bad("sslrootcert needs sslmode=require, verify-ca or verify-full".into()));
    }
    // tokio-postgres reads a libpq URL: the same text with the scheme libpq knows.
    let full = u.connection_string(LIBPQ);
    let rest = full.split_once("://").map_or("", |(_, r)| r);
    let mut config = tokio_postgres::Config::from_str(&format!("postgresql://{rest}"))
        .map_err(|e| bad(format!("not a PostgreSQL URL: {e}")))?;
    if config.get_hosts().is_empty() {
        config.host("localhost");
    }
    if config.get_user().is_none() {
        return Err(bad("no user: write USER@HOST, as db+postgresql://postgres@127.0.0.1:5432/db".into()));
    }
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(Duration::from_secs(10));
    }
    if config.get_application_name().is_none() {
        config.application_name("celery-rs");
    }
    config.ssl_mode(if tls.is_some() {
        tokio_postgres::config::SslMode::Require
    } else {
        tokio_postgres::config::SslMode::Disable
    });
    Ok(ConnectOptions { config, tls, pool_size, shown })
}

/// The broker's schemes.
pub const BROKER_SCHEMES: [&str; 2] = ["postgres", "postgresql"];

/// The longest visibility timeout accepted (a day).
const MAX_VISIBILITY_TIMEOUT: Duration = Duration::from_secs(86_400);

/// What the broker reads from a `postgres://` URL.
#[derive(Debug, Clone)]
pub struct BrokerOptions {
    /// The connection.
    pub connect: ConnectOptions,
    /// A leased task whose lease is not renewed for this long goes back to its queue
    /// (`visibility_timeout`, seconds, default 3600 as on Redis; at most a day).
    pub visibility_timeout: Duration,
    /// `worker_heartbeat` (seconds, default 2): how often a consumer renews its worker row.
    pub worker_heartbeat: Duration,
    /// `worker_grace` (seconds, default 10): how long after its last renewal a worker's tasks go
    /// back to their queues.
    pub worker_grace: Duration,
}

/// Reads a broker URL (`postgres://` or `postgresql://`); an unknown option is an error naming it.
pub fn broker_options(url: &str) -> Result<BrokerOptions, PgError> {
    let u = ServiceUrl::parse(url)?;
    if !BROKER_SCHEMES.contains(&u.scheme()) {
        return Err(u.invalid(format!("`{}` is not a PostgreSQL broker scheme", u.scheme())).into());
    }
    let connect = connect_options(&u)?;
    let visibility_timeout = u.seconds("visibility_timeout")?.unwrap_or(Duration::from_secs(3600));
    if visibility_timeout < Duration::from_millis(100) || visibility_timeout > MAX_VISIBILITY_TIMEOUT {
        return Err(u.bad_value("visibility_timeout", "a number of seconds from 0.1 to 86400").into());
    }
    let (worker_heartbeat, worker_grace) = crate::liveness::options(&u)?;
    u.finish()?;
    Ok(BrokerOptions { connect, visibility_timeout, worker_heartbeat, worker_grace })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_urls_are_read() {
        let o = broker_options("postgres://postgres@127.0.0.1/test?visibility_timeout=1.5&pool_size=8").unwrap();
        assert_eq!(o.visibility_timeout, Duration::from_millis(1500));
        assert_eq!(o.connect.pool_size, 8);
        assert_eq!(o.connect.config.get_dbname(), Some("test"));
        let o = broker_options("postgresql://u:pw@h:5433/db?options=-csearch_path%3Ds1").unwrap();
        assert_eq!(o.visibility_timeout, Duration::from_secs(3600));
        assert_eq!(o.connect.config.get_options(), Some("-csearch_path=s1"));
        for (url, needle) in [
            ("postgres://u:s3cret@h/db?bogus=1", "`bogus`"),
            ("postgres://u:s3cret@h/db?visibility_timeout=0", "visibility_timeout `0`"),
            ("postgres://u:s3cret@h/db?visibility_timeout=1000000", "visibility_timeout"),
            ("postgres://h/db", "no user"),
            ("redis://u@h/db", "not a PostgreSQL broker scheme"),
        ] {
            let e = broker_options(url).unwrap_err().to_string();
            assert!(e.contains(needle) && !e.contains("s3cret"), "{url}: {e}");
        }
    }
}

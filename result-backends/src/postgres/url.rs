//! PostgreSQL URLs: Celery's `db+postgresql://USER[:PASSWORD]@HOST[:PORT]/DB[?OPTIONS]` (also
//! `db+postgresql+psycopg2://`, `db+postgresql+psycopg://`, `db+postgres://`, `django-db+postgresql://`)
//! into what [`super::connect`] needs (the server, TLS, the pool) and what the result backend reads.
//!
//! libpq's options pass through to tokio-postgres as psycopg2 would pass them to libpq:
//! `options` (e.g. `options=-csearch_path%3Dmyschema`, where the tables are created and read),
//! `application_name`, `connect_timeout` (default 10 s), `keepalives`, `keepalives_idle`,
//! `target_session_attrs`, `tcp_user_timeout`, `load_balance_hosts`, `channel_binding`, `host`,
//! `hostaddr`, `port`, `user`, `password`, `dbname`. Several hosts (`h1:5432,h2:5432`) are tried
//! in turn. TLS: `sslmode=require`, `verify-ca` and `verify-full` all connect over TLS and verify
//! the server's certificate chain (the system's roots plus `sslrootcert=PATH`) and its name —
//! stricter than libpq's `require`, which encrypts without checking whom it talks to;
//! `disable`, `allow` and `prefer` (and no `sslmode`) connect without TLS.
//!
//! Ours: `pool_size` (connections, 1 to 64, default 4), `result_expires` (seconds a finished result
//! is kept, default 86400 as Celery's `result_expires`; `0` keeps them for ever),
//! `cleanup_interval` (seconds between expiry sweeps, default 300). Anything else is an error
//! naming it, and every error prints the URL redacted.

use std::time::Duration;

use celery_core::url::ServiceUrl;
use celery_core::BackendError;

pub use broker_backends::postgres::url::{connect_options, ConnectOptions, TlsOptions, MAX_POOL_SIZE};

/// The schemes served, and which table layout each reads and writes.
pub(crate) const SCHEMES: &[(&str, Layout)] = &[
    ("db+postgresql", Layout::Celery),
    ("db+postgresql+psycopg2", Layout::Celery),
    ("db+postgresql+psycopg", Layout::Celery),
    ("db+postgres", Layout::Celery),
    ("django-db+postgresql", Layout::Django),
    ("django-db+postgres", Layout::Django),
];

/// Which tables hold the results.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// Celery's SQLAlchemy backend: `celery_taskmeta` and `celery_tasksetmeta`.
    Celery,
    /// django-celery-results: `django_celery_results_taskresult`.
    Django,
}

/// What the result backend reads from the URL.
#[derive(Debug, Clone)]
pub(crate) struct ResultOptions {
    pub(crate) connect: ConnectOptions,
    pub(crate) layout: Layout,
    /// None: results are kept for ever.
    pub(crate) expires: Option<Duration>,
    pub(crate) cleanup_interval: Duration,
}

/// Reads a result backend URL; an unknown option is an error naming it.
pub(crate) fn result_options(url: &str) -> Result<ResultOptions, BackendError> {
    let u = ServiceUrl::parse(url)?;
    let Some(&(_, layout)) = SCHEMES.iter().find(|(s, _)| *s == u.scheme()) else {
        return Err(u.invalid(format!("`{}` is not a PostgreSQL result backend scheme", u.scheme())).into());
    };
    let connect = connect_options(&u)?;
    let expires = match u.parse_option::<u64>("result_expires", "a number of seconds")? {
        Some(0) => None,
        Some(s) => Some(Duration::from_secs(s.min(celery_core::clock::LONGEST_TTL.as_secs()))),
        None => Some(Duration::from_secs(86_400)),
    };
    let cleanup_interval = u.seconds("cleanup_interval")?.unwrap_or(Duration::from_secs(300));
    u.finish()?;
    Ok(ResultOptions { connect, layout, expires, cleanup_interval })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn celery_urls_are_read() {
        let o = result_options("db+postgresql://postgres@127.0.0.1:5432/test").unwrap();
        assert_eq!(o.layout, Layout::Celery);
        assert_eq!(o.connect.config.get_user(), Some("postgres"));
        assert_eq!(o.connect.config.get_dbname(), Some("test"));
        assert_eq!(o.connect.config.get_ports(), [5432]);
        assert_eq!(o.expires, Some(Duration::from_secs(86_400)));
        assert!(o.connect.tls.is_none());
        let o = result_options(
            "db+postgresql+psycopg2://u:p%40ss@h1:5433,h2/db?options=-csearch_path%3Ds1&result_expires=0&pool_size=2",
        )
        .unwrap();
        assert_eq!(o.connect.config.get_password(), Some(&b"p@ss"[..]));
        assert_eq!(o.connect.config.get_options(), Some("-csearch_path=s1"));
        assert_eq!(o.connect.config.get_hosts().len(), 2);
        assert_eq!((o.expires, o.connect.pool_size), (None, 2));
        let o = result_options("django-db+postgresql://u@h/db?sslmode=verify-full&sslrootcert=/ca.pem").unwrap();
        assert_eq!(o.layout, Layout::Django);
        assert_eq!(o.connect.tls, Some(TlsOptions { root_cert: Some("/ca.pem".into()) }));
        assert!(result_options("db+postgres://u@h/db?sslmode=prefer").unwrap().connect.tls.is_none());
    }

    #[test]
    fn bad_urls_are_named_and_redacted() {
        for (url, needle) in [
            ("db+postgresql://u:s3cret@h/db?bogus=1", "unknown db+postgresql:// option `bogus`"),
            ("db+postgresql://u:s3cret@h/db?pool_size=0", "pool_size `0` is not a number of connections"),
            ("db+postgresql://u:s3cret@h/db?pool_size=1000", "pool_size `1000`"),
            ("db+postgresql://u:s3cret@h/db?sslmode=maybe", "sslmode `maybe`"),
            ("db+postgresql://u:s3cret@h/db?sslrootcert=/x", "sslrootcert needs sslmode"),
            ("db+postgresql://u:s3cret@h/db?result_expires=soon", "result_expires `soon`"),
            ("db+postgresql://u:s3cret@h:notaport/db", "not a PostgreSQL URL"),
            ("db+postgresql://h/db", "no user"),
        ] {
            let e = result_options(url).unwrap_err();
            assert!(matches!(e, BackendError::InvalidUrl { .. }), "{url}: {e:?}");
            let e = e.to_string();
            assert!(e.contains(needle) && !e.contains("s3cret"), "{url}: {e}");
        }
        let o = result_options("db+postgresql://u:s3cret@h/db").unwrap();
        assert!(!format!("{o:?}").contains("s3cret"));
    }
}

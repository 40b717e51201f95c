//! Transactional enqueue for applications, and its outbox relay on the command line.
//!
//! - [`SendInTransaction`] (in the [prelude](crate::prelude)): `app.send_in(&tx, sig)` sends a task
//!   as part of the caller's tokio-postgres transaction: sent if and only if it commits. With the
//!   PostgreSQL broker on the same database the row goes straight into the broker's table; with any
//!   other broker into the outbox, `celery_rs_outbox` (see `broker_backends::postgres::transactional`).
//! - `mybin outbox-relay --db URL` forwards the outbox's committed rows to the app's broker;
//!   `mybin worker --outbox URL` (or `CELERY_OUTBOX_URL` for both) runs a relay inside every worker.
//!   Several relays share one outbox; each committed task is sent at least once, and a task sent
//!   again after a relay crash carries `redelivered: true`, so a worker that already stored its
//!   SUCCESS acks it without running it again.
//!
//! ```no_run
//! use celery_worker::outbox::{tokio_postgres, SendInTransaction};
//! use celery_worker::prelude::*;
//!
//! # async fn demo() -> anyhow::Result<()> {
//! let app = celery_worker::connect("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/1").await?;
//! celery_worker::outbox::install("postgres://app@db/app").await?; // once; a relay does it too
//! let (mut client, conn) = tokio_postgres::connect("postgresql://app@db/app", tokio_postgres::NoTls).await?;
//! tokio::spawn(conn);
//! let tx = client.transaction().await?;
//! tx.execute("UPDATE accounts SET balance = balance - 10 WHERE id = 1", &[]).await?;
//! app.send_in(&tx, Signature::by_name("notify_debit").args(serde_json::json!([1, 10]))).await?;
//! tx.commit().await?;
//! # Ok(()) }
//! ```

use anyhow::Context;
use celery_core::App;

pub use broker_backends::postgres::outbox::{install, Forwarded, Relay, RelayConfig};
pub use broker_backends::postgres::tokio_postgres;
pub use broker_backends::postgres::transactional::{sql_state, EnqueuePath, SendInTransaction};

/// Connects, waiting for the database as a starting worker waits for its broker: connection
/// errors are retried with backoff; anything else (a bad URL, a refused migration) fails at once.
pub(crate) async fn connect(app: &App, db: &str, config: RelayConfig) -> anyhow::Result<Relay> {
    let mut backoff = celery_core::backoff::Reconnect::default();
    loop {
        match Relay::connect(db, app.broker().clone(), config.clone()).await {
            Ok(relay) => return Ok(relay),
            Err(e) if e.is_retryable() && backoff.attempts() < crate::cli::STARTUP_ATTEMPTS => {
                backoff.pause("outbox relay", &e).await;
            }
            Err(e) => {
                return Err(anyhow::Error::new(e))
                    .with_context(|| format!("outbox relay for {}", celery_core::url::redacted(db)))
            }
        }
    }
}

/// A relay running inside a worker; stopped when dropped (a batch in flight is sent again by the
/// next relay).
#[derive(Debug)]
pub struct WorkerRelay(tokio::task::JoinHandle<()>);

impl Drop for WorkerRelay {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// `worker --outbox URL`: starts a relay with the default settings beside the worker. A bad URL
/// or a refused migration fails here; an unreachable database is waited for in the background.
pub(crate) async fn start_in_worker(app: &App, db: Option<&str>) -> anyhow::Result<Option<WorkerRelay>> {
    let Some(db) = db else { return Ok(None) };
    let config = RelayConfig::for_app(app);
    let shown = celery_core::url::redacted(db);
    let first = Relay::connect(db, app.broker().clone(), config.clone()).await;
    let (app, db) = (app.clone(), db.to_owned());
    let relay = match first {
        Ok(relay) => Some(relay),
        Err(e) if e.is_retryable() => {
            tracing::warn!(error = %e, db = %shown, "outbox relay: the database is not reachable yet; retrying");
            None
        }
        Err(e) => return Err(anyhow::Error::new(e)).with_context(|| format!("outbox relay for {shown}")),
    };
    let task = tokio::spawn(async move {
        let relay = match relay {
            Some(r) => r,
            None => match connect(&app, &db, config).await {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!(error = %format!("{e:#}"), "outbox relay: giving up; this worker relays nothing");
                    return;
                }
            },
        };
        if let Err(e) = relay.run_until(std::future::pending()).await {
            tracing::error!(error = %e, "outbox relay stopped");
        }
    });
    Ok(Some(WorkerRelay(task)))
}

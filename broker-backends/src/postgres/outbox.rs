//! The transactional outbox: tasks written by the caller's transaction into `celery_rs_outbox`
//! ([`super::transactional`]), and the [`Relay`] that forwards committed rows to any broker.
//!
//! Tables (migrations of component `outbox`, in the first schema of the connection's
//! `search_path`):
//! - `celery_rs_outbox`: one row per message to send: the task id, the route (exchange, routing
//!   key, mandatory), the message as Kombu's JSON envelope, when it was written, and `error` — set
//!   when the broker refused the message for good (unroutable, too large, undecodable); such rows
//!   are kept for an operator and skipped (`UPDATE celery_rs_outbox SET error = NULL` sends them
//!   again).
//! - `celery_rs_outbox_tried`: ids of rows whose publish began. A relay that dies between
//!   publishing and deleting leaves its rows and these marks; the next relay sends those messages
//!   with the header `redelivered: true`, and a worker acks a redelivered task whose SUCCESS is
//!   already stored without running it again.
//!
//! Relaying, per batch (up to `batch` rows, oldest first, and at most 64 MiB of payload):
//! 1. In a transaction: take the rows `FOR UPDATE SKIP LOCKED` (several relays share the work
//!    and never take the same row at once).
//! 2. Mark them tried (a separate, committed statement).
//! 3. Publish them and wait for the broker's confirmation (`publish_batch` returns once the broker
//!    stored them: Redis' reply, RabbitMQ's publisher confirms, the log's append).
//! 4. Delete them (and their marks), record refusals, commit.
//!
//! A crash anywhere before 4 commits rolls the transaction back: the rows come back at once (the
//! server ends the dead session) and are sent again — at least once. A rolled-back caller
//! transaction never wrote its rows: never sent. The relay sleeps until a `NOTIFY` (sent at the
//! writer's commit) or a slow poll (`poll`, default 5 s; once a second while its `LISTEN`
//! connection reconnects).
//!
//! ```no_run
//! # async fn demo(app: celery_core::App) -> Result<(), celery_core::BrokerError> {
//! use broker_backends::postgres::outbox::{Relay, RelayConfig};
//! let relay = Relay::connect("postgres://app@db/app", app.broker().clone(), RelayConfig::for_app(&app)).await?;
//! println!("{} rows wait", relay.pending().await?);
//! relay.run_until(async { let _ = tokio::signal::ctrl_c().await; }).await?;
//! # Ok(()) }
//! ```

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use celery_core::backoff::Reconnect;
use celery_core::protocol::{max_encoded_size, Message};
use celery_core::routing::Route;
use celery_core::url::ServiceUrl;
use celery_core::{App, Broker, BrokerError};
use deadpool_postgres::Pool;
use tokio::sync::{watch, Notify};
use tokio_postgres::AsyncMessage;

use super::connect::{self, Tls};
use super::error::PgError;
use super::migrate::{self, Migration};
use super::transactional::tx_error;
use super::url::{self, ConnectOptions};
use crate::envelope;

/// The outbox's component name in `celery_rs_schema_version`.
pub const COMPONENT: &str = "outbox";

/// The outbox's migrations, in order.
pub const MIGRATIONS: &[Migration] = &[Migration {
    version: 1,
    name: "outbox and tried marks",
    sql: "
CREATE TABLE IF NOT EXISTS celery_rs_outbox (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    task_id text NOT NULL,
    exchange text NOT NULL,
    routing_key text NOT NULL,
    mandatory boolean NOT NULL DEFAULT false,
    payload bytea NOT NULL,
    created_at timestamp with time zone NOT NULL DEFAULT now(),
    error text
);
CREATE INDEX IF NOT EXISTS celery_rs_outbox_pending ON celery_rs_outbox (id) WHERE error IS NULL;
ALTER TABLE celery_rs_outbox SET (
    autovacuum_vacuum_scale_factor = 0.02,
    autovacuum_vacuum_threshold = 1000,
    autovacuum_vacuum_insert_scale_factor = 0.02,
    autovacuum_analyze_scale_factor = 0.05,
    autovacuum_vacuum_cost_delay = 0
);
CREATE TABLE IF NOT EXISTS celery_rs_outbox_tried (
    id bigint PRIMARY KEY,
    tried_at timestamp with time zone NOT NULL DEFAULT now()
);
ALTER TABLE celery_rs_outbox_tried SET (
    autovacuum_vacuum_scale_factor = 0.02,
    autovacuum_vacuum_threshold = 1000,
    autovacuum_vacuum_cost_delay = 0
);
",
}];

/// Inserts messages: `$1` task ids, `$2` exchanges, `$3` routing keys, `$4` mandatory flags, `$5`
/// envelopes; notifies `$6` (delivered at commit).
pub(crate) const INSERT: &str = "
WITH ins AS (
    INSERT INTO celery_rs_outbox (task_id, exchange, routing_key, mandatory, payload)
    SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::bool[], $5::bytea[])
    RETURNING 1)
SELECT pg_notify($6, '') WHERE EXISTS (SELECT 1 FROM ins)";

/// The outbox's notification channel (NULL without the table): database-wide, so it carries a
/// digest of the table's schema, as the broker's channels do.
const CHANNEL: &str = "
SELECT 'celery_rs_o_' || left(md5(n.nspname), 16) FROM pg_class c
JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = to_regclass('celery_rs_outbox')";

/// Takes up to `$1` rows, oldest first; returns `id, payload length, tried, exchange, routing_key,
/// mandatory, payload` (the payload only up to `$2` bytes, else NULL: read on its own).
const TAKE: &str = "
SELECT o.id, octet_length(o.payload)::int8,
    EXISTS (SELECT 1 FROM celery_rs_outbox_tried t WHERE t.id = o.id),
    o.exchange, o.routing_key, o.mandatory,
    CASE WHEN octet_length(o.payload) <= $2::int8 THEN o.payload END
FROM celery_rs_outbox o WHERE o.error IS NULL
ORDER BY o.id LIMIT $1
FOR UPDATE OF o SKIP LOCKED";

/// The payload of row `$1` (one larger than the inline size).
const PAYLOAD: &str = "SELECT payload FROM celery_rs_outbox WHERE id = $1";

/// Marks rows `$1` tried.
const TRIED: &str = "INSERT INTO celery_rs_outbox_tried (id) SELECT unnest($1::int8[]) ON CONFLICT DO NOTHING";

/// Deletes the forwarded rows `$1` and their marks; records refusals `$3` of rows `$2` (and drops
/// their marks: the broker refused them, so they were not delivered, and an operator who deletes a
/// refused row leaves no mark behind).
const SETTLE: &str = "
WITH gone AS (DELETE FROM celery_rs_outbox WHERE id = ANY($1::int8[]) RETURNING id),
     marks AS (DELETE FROM celery_rs_outbox_tried WHERE id = ANY($1::int8[]) OR id = ANY($2::int8[])),
     refused AS (UPDATE celery_rs_outbox o SET error = f.e
                 FROM unnest($2::int8[], $3::text[]) AS f(id, e) WHERE o.id = f.id)
SELECT count(*) FROM gone";

/// Rows waiting to be forwarded (refused ones excluded).
const PENDING: &str = "SELECT count(*) FROM celery_rs_outbox WHERE error IS NULL";

/// Payload bytes one batch reads at most (at least one row, however large).
const BATCH_BYTES: usize = 64 * 1024 * 1024;
/// The most rows one batch takes.
pub const MAX_BATCH: usize = 1000;
/// Payloads up to this size come with the rows that take them (so the rows of one take hold at
/// most [`BATCH_BYTES`] of payload); a larger one is read on its own, within the batch's budget.
const INLINE: i64 = (BATCH_BYTES / MAX_BATCH) as i64;
/// The longest refusal reason stored, in bytes.
const MAX_REASON: usize = 1000;
/// The poll interval while the `LISTEN` connection is down.
const POLL_WHILE_DEAF: Duration = Duration::from_secs(1);

/// How a relay works.
///
/// ```
/// let cfg = broker_backends::postgres::outbox::RelayConfig { batch: 500, ..Default::default() };
/// assert!(cfg.check().is_ok());
/// assert!(broker_backends::postgres::outbox::RelayConfig { batch: 0, ..cfg }.check().is_err());
/// ```
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// Rows per batch, 1 to 1000 (default 100).
    pub batch: usize,
    /// How often the outbox is read without a notification, 0.1 s to an hour (default 5 s).
    pub poll: Duration,
    /// Rows whose payload is larger are refused unread (default: what the default producer limit
    /// of 16 MiB allows once encoded; [`RelayConfig::for_app`] takes the app's).
    pub max_payload: usize,
}

impl Default for RelayConfig {
    fn default() -> Self {
        RelayConfig {
            batch: 100,
            poll: Duration::from_secs(5),
            max_payload: max_encoded_size(celery_core::AppConfig::default().max_message_size),
        }
    }
}

impl RelayConfig {
    /// The defaults, with the payload limit of `app`'s `max_message_size`.
    pub fn for_app(app: &App) -> RelayConfig {
        RelayConfig { max_payload: max_encoded_size(app.config().max_message_size), ..RelayConfig::default() }
    }

    /// Checks the bounds.
    pub fn check(&self) -> Result<(), BrokerError> {
        if !(1..=MAX_BATCH).contains(&self.batch) {
            return Err(BrokerError::operation(format!(
                "outbox relay: batch {} is not within 1..={MAX_BATCH}",
                self.batch
            )));
        }
        if self.poll < Duration::from_millis(100) || self.poll > Duration::from_secs(3600) {
            return Err(BrokerError::operation(format!(
                "outbox relay: poll {:?} is not within 0.1 s to an hour",
                self.poll
            )));
        }
        if self.max_payload == 0 {
            return Err(BrokerError::operation("outbox relay: max_payload is 0"));
        }
        Ok(())
    }
}

/// What one batch did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Forwarded {
    /// Messages the broker confirmed (their rows are deleted).
    pub sent: usize,
    /// Messages refused for good (their rows keep the reason in `error`).
    pub refused: usize,
    /// More rows may be waiting now.
    pub more: bool,
}

/// Reads an outbox database URL: `postgres://` or `postgresql://` with the connection options of
/// the PostgreSQL broker (libpq's, TLS, `pool_size`); anything else is an error naming it.
fn options_of(db_url: &str) -> Result<ConnectOptions, BrokerError> {
    let u = ServiceUrl::parse(db_url).map_err(BrokerError::from)?;
    if !url::BROKER_SCHEMES.contains(&u.scheme()) {
        return Err(BrokerError::from(
            u.invalid(format!("`{}` is not an outbox database scheme (postgres:// or postgresql://)", u.scheme())),
        ));
    }
    let options = url::connect_options(&u)?;
    u.finish().map_err(BrokerError::from)?;
    Ok(options)
}

/// Creates or upgrades the outbox tables in the database and schema of `db_url` (what
/// [`Relay::connect`] does first); returns the outbox's schema version.
///
/// ```no_run
/// # async fn demo() -> Result<(), celery_core::BrokerError> {
/// broker_backends::postgres::outbox::install("postgres://app@db/app").await?;
/// # Ok(()) }
/// ```
pub async fn install(db_url: &str) -> Result<i32, BrokerError> {
    let options = options_of(db_url)?;
    let tls = Tls::new(options.tls.as_ref(), &options.shown)?;
    let pool = connect::pool(&options, &tls)?;
    Ok(migrated(&pool).await?.0)
}

/// Applies the migrations; returns the version and the channel.
async fn migrated(pool: &Pool) -> Result<(i32, String), BrokerError> {
    let mut client = pool.get().await.map_err(|e| PgError::pool("outbox: install", e))?;
    let version = migrate::migrate(&mut client, COMPONENT, MIGRATIONS).await?;
    let row = client.query_one(CHANNEL, &[]).await.map_err(|e| tx_error("outbox: reading its channel", e))?;
    let channel: Option<String> = row.get(0);
    let channel = channel.ok_or_else(|| {
        BrokerError::operation("postgresql outbox: celery_rs_outbox is not on the search_path after its migration")
    })?;
    Ok((version, channel))
}

/// Forwards committed outbox rows to a broker. Any number may run against one outbox.
#[derive(Debug)]
pub struct Relay {
    pool: Pool,
    options: ConnectOptions,
    tls: Tls,
    broker: Arc<dyn Broker>,
    config: RelayConfig,
    channel: String,
}

/// One taken row.
struct Taken {
    id: i64,
    route: Route,
    msg: Message,
}

impl Relay {
    /// Connects to the outbox's database (`postgres://` URL; its `search_path` decides the schema),
    /// applies the outbox's migrations, and relays to `broker`.
    pub async fn connect(db_url: &str, broker: Arc<dyn Broker>, config: RelayConfig) -> Result<Relay, BrokerError> {
        config.check()?;
        let mut options = options_of(db_url)?;
        // A batch holds one connection for its transaction and takes another to mark rows tried.
        options.pool_size = options.pool_size.max(2);
        let tls = Tls::new(options.tls.as_ref(), &options.shown)?;
        let pool = connect::pool(&options, &tls)?;
        let (version, channel) = migrated(&pool).await?;
        tracing::info!(db = %options.shown, version, broker = broker.kind(), "outbox relay: connected");
        Ok(Relay { pool, options, tls, broker, config, channel })
    }

    /// Rows waiting to be forwarded (refused ones excluded).
    pub async fn pending(&self) -> Result<u64, BrokerError> {
        let client = self.client().await?;
        let row = client.query_one(PENDING, &[]).await.map_err(|e| tx_error("outbox: counting rows", e))?;
        Ok(row.get::<_, i64>(0).max(0) as u64)
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, BrokerError> {
        self.pool.get().await.map_err(|e| match e {
            deadpool_postgres::PoolError::Backend(e) => tx_error("outbox: connecting", e),
            other => BrokerError::connection_with("postgresql outbox: no connection", other),
        })
    }

    /// Forwards one batch (see the module's documentation): the rows the broker confirmed are
    /// deleted, those it refused for good keep the reason. An error leaves every row of the batch
    /// in the outbox (sent again later: at least once).
    pub async fn forward(&self) -> Result<Forwarded, BrokerError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(|e| tx_error("outbox: begin", e))?;
        let take = tx.prepare_cached(TAKE).await.map_err(|e| tx_error("outbox: preparing", e))?;
        let rows = tx
            .query(&take, &[&(self.config.batch as i64), &INLINE])
            .await
            .map_err(|e| tx_error("outbox: taking rows", e))?;
        if rows.is_empty() {
            return Ok(Forwarded::default());
        }
        let mut more = rows.len() == self.config.batch;
        let mut refused: Vec<(i64, String)> = Vec::new();
        let mut taken: Vec<Taken> = Vec::with_capacity(rows.len());
        let mut bytes = 0usize;
        for row in &rows {
            let (id, len, tried): (i64, i64, bool) = (row.get(0), row.get(1), row.get(2));
            let len = usize::try_from(len).unwrap_or(usize::MAX);
            if len > self.config.max_payload {
                refused.push((id, format!("payload of {len} bytes exceeds the limit of {}", self.config.max_payload)));
                continue;
            }
            if !taken.is_empty() && bytes.saturating_add(len) > BATCH_BYTES {
                // Left for the next batch (still locked until this one commits).
                more = true;
                break;
            }
            bytes += len;
            let payload: Option<Vec<u8>> = row.get(6);
            let payload = match payload {
                Some(p) => p,
                None => {
                    let r =
                        tx.query_one(PAYLOAD, &[&id]).await.map_err(|e| tx_error("outbox: reading a payload", e))?;
                    r.get(0)
                }
            };
            let decoded = envelope::decode(&payload);
            let mut msg = match decoded.message {
                Ok(m) => m,
                Err(e) => {
                    refused.push((id, format!("undecodable: {e}")));
                    continue;
                }
            };
            if tried {
                msg.headers.mark_redelivered();
            }
            let route =
                Route { mandatory: row.get(5), ..Route::exchange(row.get::<_, String>(3), row.get::<_, String>(4)) };
            taken.push(Taken { id, route, msg });
        }
        if !taken.is_empty() {
            let ids: Vec<i64> = taken.iter().map(|t| t.id).collect();
            // Committed before anything is published, on a connection of its own.
            self.client()
                .await?
                .execute(TRIED, &[&ids])
                .await
                .map_err(|e| tx_error("outbox: marking rows tried", e))?;
        }
        let sent = self.publish(&mut taken, &mut refused).await?;
        let (refused_ids, reasons): (Vec<i64>, Vec<String>) = refused.into_iter().unzip();
        let settle = tx.prepare_cached(SETTLE).await.map_err(|e| tx_error("outbox: preparing", e))?;
        tx.query_one(&settle, &[&sent, &refused_ids, &reasons])
            .await
            .map_err(|e| tx_error("outbox: deleting forwarded rows", e))?;
        tx.commit().await.map_err(|e| tx_error("outbox: commit", e))?;
        if !refused_ids.is_empty() {
            tracing::warn!(count = refused_ids.len(), "outbox relay: messages refused; their rows keep the reason");
        }
        tracing::debug!(sent = sent.len(), refused = refused_ids.len(), "outbox relay: batch forwarded");
        Ok(Forwarded { sent: sent.len(), refused: refused_ids.len(), more })
    }

    /// Publishes the batch; a message refused for good is isolated by publishing one at a time.
    /// Returns the ids sent; a retryable failure is returned (nothing is settled).
    async fn publish(&self, taken: &mut [Taken], refused: &mut Vec<(i64, String)>) -> Result<Vec<i64>, BrokerError> {
        if taken.is_empty() {
            return Ok(Vec::new());
        }
        let batch: Vec<(Route, Message)> = taken.iter().map(|t| (t.route.clone(), t.msg.clone())).collect();
        let first = celery_core::backoff::retrying(|| self.broker.publish_batch(&batch)).await;
        drop(batch);
        match first {
            Ok(()) => return Ok(taken.iter().map(|t| t.id).collect()),
            Err(e) if e.is_retryable() => return Err(e),
            Err(e) if taken.len() == 1 => {
                refused.push((taken[0].id, reason(&e)));
                return Ok(Vec::new());
            }
            Err(e) => tracing::warn!(error = %e, "outbox relay: a batch was refused; sending its messages one by one"),
        }
        let mut sent = Vec::with_capacity(taken.len());
        for t in taken.iter_mut() {
            // Part of the refused batch may have reached the broker.
            t.msg.headers.mark_redelivered();
            match celery_core::backoff::retrying(|| self.broker.publish(&t.route, &t.msg)).await {
                Ok(()) => sent.push(t.id),
                Err(e) if e.is_retryable() => return Err(e),
                Err(e) => refused.push((t.id, reason(&e))),
            }
        }
        Ok(sent)
    }

    /// Forwards until `stop` resolves: drains the outbox, then sleeps until a notification or the
    /// poll interval; connection failures are retried with backoff. A batch in flight when `stop`
    /// resolves is abandoned (its rows are sent again by the next relay).
    pub async fn run_until(self, stop: impl Future<Output = ()>) -> Result<(), BrokerError> {
        let wake = Arc::new(Notify::new());
        let (up_tx, up) = watch::channel(false);
        let listener =
            tokio::spawn(listen(self.options.clone(), self.tls.clone(), self.channel.clone(), wake.clone(), up_tx));
        let _listener = AbortOnDrop(listener);
        tokio::pin!(stop);
        let mut backoff = Reconnect::default();
        loop {
            let outcome = tokio::select! {
                biased;
                _ = &mut stop => return Ok(()),
                r = self.forward() => r,
            };
            match outcome {
                Ok(f) => {
                    backoff.reset();
                    if f.more {
                        continue;
                    }
                }
                Err(e) => {
                    tokio::select! {
                        _ = &mut stop => return Ok(()),
                        _ = backoff.pause("outbox relay", &e) => {}
                    }
                    continue;
                }
            }
            let wait = if *up.borrow() { self.config.poll } else { POLL_WHILE_DEAF.min(self.config.poll) };
            tokio::select! {
                _ = &mut stop => return Ok(()),
                _ = wake.notified() => {}
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }
}

/// A refusal's reason as stored: bounded, on a character boundary.
fn reason(e: &BrokerError) -> String {
    let mut s = e.to_string();
    if s.len() > MAX_REASON {
        let cut = (0..=MAX_REASON).rev().find(|i| s.is_char_boundary(*i)).unwrap_or(0);
        s.truncate(cut);
    }
    s
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// `LISTEN`s on the outbox's channel: every notification (and every reconnect) wakes the relay.
async fn listen(opts: ConnectOptions, tls: Tls, channel: String, wake: Arc<Notify>, up: watch::Sender<bool>) {
    let mut backoff = Reconnect::default();
    let statement = format!("LISTEN \"{}\"", channel.replace('"', "\"\""));
    loop {
        let (client, driver, mut rx) = connect::listening(&opts, &tls, &statement, &mut backoff, "outbox relay").await;
        backoff.reset();
        let _ = up.send(true);
        // Rows may have been committed unannounced while nobody listened.
        wake.notify_one();
        while let Some(msg) = rx.recv().await {
            if let AsyncMessage::Notification(_) = msg {
                wake.notify_one();
            }
        }
        let _ = up.send(false);
        driver.abort();
        drop(client);
        tracing::warn!("outbox relay: listener connection lost; reconnecting (polling meanwhile)");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use celery_core::Signature;

    #[test]
    fn an_envelope_round_trips_with_the_mark() {
        let sig = Signature::by_name("add").args(serde_json::json!([1, 2])).priority(7);
        let mut msg = Message::from_signature(&sig).unwrap();
        // Times travel with microseconds, as every broker's envelope carries them.
        msg.headers.eta = chrono::DateTime::from_timestamp(1_900_000_000, 123_456_000);
        let env = envelope::encode(&msg, "ex", "key");
        let back = envelope::decode(env.as_bytes()).message.unwrap();
        assert_eq!(back, msg);
        assert!(!back.headers.says_redelivered());
        msg.headers.mark_redelivered();
        assert!(msg.headers.says_redelivered());
        assert!(envelope::decode(envelope::encode(&msg, "", "q").as_bytes()).redelivered, "Redis reads it too");
    }

    #[test]
    fn configs_and_urls_are_checked() {
        assert!(RelayConfig::default().check().is_ok());
        for bad in [
            RelayConfig { batch: MAX_BATCH + 1, ..Default::default() },
            RelayConfig { poll: Duration::from_millis(10), ..Default::default() },
            RelayConfig { poll: Duration::from_secs(7200), ..Default::default() },
            RelayConfig { max_payload: 0, ..Default::default() },
        ] {
            assert!(bad.check().is_err(), "{bad:?}");
        }
        assert!(options_of("postgres://u:s3cret@h/db?pool_size=2").is_ok());
        for (url, needle) in [
            ("redis://u:s3cret@h/0", "not an outbox database scheme"),
            ("postgres://u:s3cret@h/db?bogus=1", "`bogus`"),
            ("postgres://h/db", "no user"),
        ] {
            let e = options_of(url).unwrap_err().to_string();
            assert!(e.contains(needle) && !e.contains("s3cret"), "{url}: {e}");
        }
    }

    #[test]
    fn reasons_are_bounded() {
        let long = BrokerError::operation("é".repeat(MAX_REASON));
        let r = reason(&long);
        assert!(r.len() <= MAX_REASON && r.starts_with("broker"), "{}", r.len());
    }
}

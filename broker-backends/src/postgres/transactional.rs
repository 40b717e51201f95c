//! Transactional enqueue: [`SendInTransaction::send_in`] writes a task inside the caller's open
//! tokio-postgres transaction, so that it is sent if and only if that transaction commits.
//!
//! Two paths, chosen per call:
//! - **Direct**: the app's broker is the PostgreSQL broker (connected by URL, `postgres://` or
//!   `postgresql://`) and the transaction reaches the very `celery_rs_tasks` table that broker
//!   reads. The task rows are inserted by the transaction (the broker's own publish statement,
//!   whose `NOTIFY` PostgreSQL delivers at commit): workers see them, and wake, on commit; a
//!   rollback leaves nothing.
//! - **Outbox**: any other broker (Redis, RabbitMQ, the built-in log, or a PostgreSQL broker in
//!   another database or schema). The message goes into `celery_rs_outbox` in the transaction; a
//!   relay ([`super::outbox::Relay`], run by `worker --outbox URL` or `mybin outbox-relay --db URL`)
//!   forwards committed rows to the broker, at least once.
//!
//! How "the same table" is decided, cheaply and without trusting host names (`localhost`, a
//! socket, a proxy or a replica all name servers differently): the transaction reads its
//! database's oid, the server's start time and the oid that `celery_rs_tasks` resolves to on its
//! `search_path` (one catalog query, which never fails, so it cannot abort the caller's
//! transaction, and takes no predicate locks under SERIALIZABLE). The broker's side of the same
//! triple is read once per process and broker URL through a connection of its own, cached, and
//! read again when the two disagree on a table that exists (a restart, a restore) at most every
//! 30 seconds. Equal triples mean the insert lands in the broker's table; anything else goes
//! through the outbox, which is correct for every broker, only slower.
//!
//! A task with a fairness key ([`Signature::fairness_key`]) keeps it on both paths: the direct
//! path inserts it with the broker's keyed publish (its key joins the queue's rotation in the
//! caller's transaction, under a shared lock of the queue held until that transaction ends: a
//! long transaction delays dropping the queue's empty keys, never a fetch); through the outbox it
//! travels in the message's headers, and the relay's broker serves it fairly if it has fair
//! queues (the app's broker is checked at send, as for `App::send`).
//!
//! What `send_in` does not do: idempotency keys (a key claimed outside the transaction would
//! outlive its rollback; the transaction already sends the task once), `task-sent` events, and
//! chords (their counter lives in the result backend, outside the transaction). A server error in
//! the insert aborts the caller's transaction, as any failed statement does: roll it back.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use celery_core::protocol::{max_encoded_size, Message};
use celery_core::routing::{topic_matches, Route};
use celery_core::{App, AppError, AsyncResult, BrokerError, ProtocolError, Signature};
use chrono::{DateTime, Utc};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::Type;
use tokio_postgres::Transaction;

use super::connect;
use super::error::PgError;
use super::{check_name, check_queue, sql, url, Columns, NewRow, MAX_PAYLOAD, PUBLISH_BATCH};
use crate::envelope;

/// The most signatures one [`SendInTransaction::send_batch_in`] takes.
pub const MAX_BATCH: usize = 10_000;

/// The broker identity is read again at most this often when a transaction disagrees with it.
const REFRESH_AFTER: Duration = Duration::from_secs(30);

/// Broker URLs whose identity a process keeps.
const MAX_CACHED: usize = 16;

/// What a session sees: its database's oid, the server's start, the oid `celery_rs_tasks` resolves
/// to (NULL: none on the `search_path`), and the outbox's notification channel (NULL: no
/// `celery_rs_outbox` on the `search_path`). Never fails on a healthy transaction.
const IDENTITY: &str = "
SELECT d.oid::int8, pg_postmaster_start_time(), to_regclass('celery_rs_tasks')::oid::int8,
    (SELECT 'celery_rs_o_' || left(md5(n.nspname), 16) FROM pg_class c
     JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = to_regclass('celery_rs_outbox'))
FROM pg_database d WHERE d.datname = current_database()";

/// Which way [`SendInTransaction::send_in`] sends from a given transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum EnqueuePath {
    /// Into the PostgreSQL broker's task table, in the transaction.
    Direct,
    /// Into `celery_rs_outbox`, in the transaction; a relay forwards it after the commit.
    Outbox,
}

/// Sending tasks inside the caller's PostgreSQL transaction: sent if and only if it commits.
///
/// Implemented for [`App`]; `use celery_worker::prelude::*` brings it into scope. The transaction
/// is tokio-postgres' (a `deadpool_postgres::Transaction` derefs to one).
///
/// ```no_run
/// # async fn demo(app: celery_core::App) -> Result<(), Box<dyn std::error::Error>> {
/// use broker_backends::postgres::transactional::SendInTransaction;
/// use broker_backends::postgres::tokio_postgres::{self, NoTls};
/// use celery_core::Signature;
///
/// let (mut client, conn) = tokio_postgres::connect("postgresql://app@db/app", NoTls).await?;
/// tokio::spawn(conn);
/// let tx = client.transaction().await?;
/// tx.execute("INSERT INTO orders (id, total) VALUES ($1, $2)", &[&42i64, &990i64]).await?;
/// let res = app.send_in(&tx, Signature::by_name("email_receipt").args(serde_json::json!([42]))).await?;
/// tx.commit().await?; // the task exists from here on; after a rollback it never would
/// println!("sent {}", res.id());
/// # Ok(()) }
/// ```
#[async_trait]
pub trait SendInTransaction {
    /// Sends `sig` as part of `tx`: visible to workers when `tx` commits, never if it rolls back.
    async fn send_in(&self, tx: &Transaction<'_>, sig: Signature) -> Result<AsyncResult, AppError>;

    /// Sends many signatures as part of `tx` (one statement per 1,000 tasks); at most
    /// [`MAX_BATCH`] per call.
    async fn send_batch_in<I>(&self, tx: &Transaction<'_>, sigs: I) -> Result<Vec<AsyncResult>, AppError>
    where
        I: IntoIterator<Item = Signature> + Send,
        I::IntoIter: Send;

    /// The path a send from `tx` takes now (reads the same identity `send_in` reads).
    async fn enqueue_path(&self, tx: &Transaction<'_>) -> Result<EnqueuePath, AppError>;
}

#[async_trait]
impl SendInTransaction for App {
    async fn send_in(&self, tx: &Transaction<'_>, sig: Signature) -> Result<AsyncResult, AppError> {
        let mut results = self.send_batch_in(tx, [sig]).await?;
        results.pop().ok_or_else(|| BrokerError::operation("postgresql: a send gave no result").into())
    }

    async fn send_batch_in<I>(&self, tx: &Transaction<'_>, sigs: I) -> Result<Vec<AsyncResult>, AppError>
    where
        I: IntoIterator<Item = Signature> + Send,
        I::IntoIter: Send,
    {
        let mut prepared = Vec::new();
        for sig in sigs {
            if prepared.len() == MAX_BATCH {
                return Err(invalid("batch", format!("more than {MAX_BATCH} signatures in one call: split it")));
            }
            if sig.options.idempotency_key.is_some() {
                return Err(invalid(
                    "idempotency_key",
                    "not taken by a transactional send (a key claimed outside the transaction would outlive its \
                     rollback; the transaction already sends the task once)"
                        .into(),
                ));
            }
            prepared.push(self.prepare(&sig)?);
        }
        if prepared.is_empty() {
            return Ok(Vec::new());
        }
        let limit = max_encoded_size(self.config().max_message_size).min(MAX_PAYLOAD);
        let here = Identity::of(tx).await?;
        match decide(self, &here).await? {
            Decision::Direct(side) => insert_tasks(tx, &side, &prepared, limit).await?,
            Decision::Outbox => {
                let Some(channel) = &here.outbox else {
                    return Err(BrokerError::operation(
                        "postgresql: this transaction reaches neither the app's PostgreSQL broker table nor an \
                         outbox (no celery_rs_outbox on its search_path): start a relay (`mybin outbox-relay --db \
                         URL`) or call broker_backends::postgres::outbox::install(URL) once for this database",
                    )
                    .into());
                };
                insert_outbox(tx, channel, &prepared, limit).await?
            }
        }
        Ok(prepared.iter().map(|(_, m)| self.result(&m.headers.id)).collect())
    }

    async fn enqueue_path(&self, tx: &Transaction<'_>) -> Result<EnqueuePath, AppError> {
        let here = Identity::of(tx).await?;
        Ok(match decide(self, &here).await? {
            Decision::Direct(_) => EnqueuePath::Direct,
            Decision::Outbox => EnqueuePath::Outbox,
        })
    }
}

/// The SQLSTATE of the PostgreSQL error behind `e`, if any: how an application tells a
/// serialization failure (`T_R_SERIALIZATION_FAILURE`, retry the transaction) from other errors.
///
/// ```
/// use broker_backends::postgres::transactional::sql_state;
/// let e = celery_core::AppError::from(celery_core::BrokerError::operation("no server involved"));
/// assert_eq!(sql_state(&e), None);
/// ```
pub fn sql_state(e: &AppError) -> Option<&SqlState> {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = source {
        if let Some(pg) = s.downcast_ref::<tokio_postgres::Error>() {
            return pg.code();
        }
        source = s.source();
    }
    None
}

fn invalid(field: &'static str, reason: String) -> AppError {
    AppError::Protocol(ProtocolError::InvalidField { field, reason })
}

/// A driver error of a statement run in the caller's transaction, judged as every PostgreSQL
/// error is ([`PgError::driver`]), the driver's error kept as its source (so [`sql_state`] finds
/// its SQLSTATE).
pub(crate) fn tx_error(what: &str, e: tokio_postgres::Error) -> BrokerError {
    PgError::driver(what, e).into()
}

/// The identity triple a session sees (see the module's documentation).
#[derive(Debug, Clone, PartialEq)]
struct Identity {
    database: i64,
    started: DateTime<Utc>,
    tasks: Option<i64>,
    outbox: Option<String>,
}

impl Identity {
    async fn of(tx: &Transaction<'_>) -> Result<Identity, BrokerError> {
        let row =
            tx.query_typed_one(IDENTITY, &[]).await.map_err(|e| tx_error("reading the transaction's database", e))?;
        Ok(Identity { database: row.get(0), started: row.get(1), tasks: row.get(2), outbox: row.get(3) })
    }

    /// Whether a session that sees `here` reaches the tasks table of the broker that sees this.
    fn same_table(&self, here: &Identity) -> bool {
        self.tasks.is_some()
            && self.tasks == here.tasks
            && self.database == here.database
            && self.started == here.started
    }
}

/// The PostgreSQL broker's side, as read through its URL.
#[derive(Debug)]
struct BrokerSide {
    identity: Identity,
    /// The broker's task notification channel.
    channel: String,
    read_at: Instant,
    /// A connection to the broker's database (one), for what a keyed send commits on its own
    /// before the caller's transaction inserts ([`sql::FAIR_JOIN`]).
    pool: deadpool_postgres::Pool,
}

impl BrokerSide {
    fn same_table(&self, here: &Identity) -> bool {
        self.identity.same_table(here)
    }
}

enum Decision {
    /// Insert into the broker's table (and notify its channel).
    Direct(Arc<BrokerSide>),
    Outbox,
}

/// Broker sides by broker URL (the URL holds secrets: it is a key, never printed).
static BROKERS: Mutex<Vec<(String, Arc<BrokerSide>)>> = Mutex::new(Vec::new());
/// One read of a broker side at a time (sixteen transactions starting together open one
/// connection, not sixteen).
static READING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn decide(app: &App, here: &Identity) -> Result<Decision, BrokerError> {
    if app.broker().kind() != "postgres" || here.tasks.is_none() {
        return Ok(Decision::Outbox);
    }
    let Some(url) = app.broker_url().filter(|u| url::BROKER_SCHEMES.contains(&u.scheme())) else {
        return Ok(Decision::Outbox);
    };
    let key = url.expose_secret();
    let cached = || celery_core::sync::lock(&BROKERS).iter().find(|(k, _)| k == key).map(|(_, b)| b.clone());
    let side = match cached() {
        Some(side) => side,
        None => {
            let _one = READING.lock().await;
            match cached() {
                Some(side) => side,
                None => remember(key, read_broker_side(key).await?),
            }
        }
    };
    if side.same_table(here) {
        return Ok(Decision::Direct(side));
    }
    if side.read_at.elapsed() < REFRESH_AFTER {
        return Ok(Decision::Outbox);
    }
    let _one = READING.lock().await;
    let side = match cached() {
        Some(s) if s.read_at.elapsed() < REFRESH_AFTER => s,
        _ => match read_broker_side(key).await {
            Ok(s) => remember(key, s),
            Err(e) => {
                // The broker's database is unreachable: the disagreement stands.
                tracing::debug!(error = %e, "postgresql: cannot read the broker's identity again");
                return Ok(Decision::Outbox);
            }
        },
    };
    Ok(if side.same_table(here) { Decision::Direct(side) } else { Decision::Outbox })
}

fn remember(key: &str, side: BrokerSide) -> Arc<BrokerSide> {
    let side = Arc::new(side);
    let mut all = celery_core::sync::lock(&BROKERS);
    all.retain(|(k, _)| k != key);
    if all.len() >= MAX_CACHED {
        all.remove(0);
    }
    all.push((key.to_owned(), side.clone()));
    side
}

/// Reads the broker's identity and channel through a connection of its own.
async fn read_broker_side(broker_url: &str) -> Result<BrokerSide, BrokerError> {
    let options = url::broker_options(broker_url)?;
    let tls = connect::Tls::new(options.connect.tls.as_ref(), &options.connect.shown)?;
    let mut single = options.connect.clone();
    single.pool_size = 1;
    let pool = connect::pool(&single, &tls)?;
    let client = pool.get().await.map_err(|e| PgError::pool("transactional: identify the broker's table", e))?;
    let what = "reading the broker's database";
    let row = client.query_typed_one(IDENTITY, &[]).await.map_err(|e| tx_error(what, e))?;
    let identity = Identity { database: row.get(0), started: row.get(1), tasks: row.get(2), outbox: row.get(3) };
    let row = client.query_one(sql::CHANNELS, &[]).await.map_err(|e| tx_error(what, e))?;
    tracing::debug!(url = %options.connect.shown, ?identity, "postgresql: the broker's identity, for transactional sends");
    drop(client);
    Ok(BrokerSide { identity, channel: row.get(0), read_at: Instant::now(), pool })
}

/// A binding as [`sql::BINDINGS`] returns it: routing key, queue, exchange kind.
type BindingRow = (String, String, Option<String>);

/// The queues `route` leads to, read in the transaction (the broker's routing: the default
/// exchange by queue name, else the bindings table matched by celery-core's matcher).
async fn queues_of(
    tx: &Transaction<'_>,
    route: &Route,
    bindings: &mut HashMap<String, Vec<BindingRow>>,
) -> Result<Vec<String>, BrokerError> {
    if route.exchange.is_empty() {
        // The default exchange: the routing key is the queue, bounded as the broker bounds queues.
        check_queue(&route.routing_key)?;
        return Ok(vec![route.routing_key.clone()]);
    }
    check_name("routing key", &route.routing_key)?;
    check_name("exchange", &route.exchange)?;
    if !bindings.contains_key(&route.exchange) {
        let rows = tx
            .query_typed(sql::BINDINGS, &[(&route.exchange, Type::TEXT)])
            .await
            .map_err(|e| tx_error("reading the bindings", e))?;
        bindings.insert(route.exchange.clone(), rows.iter().map(|r| (r.get(0), r.get(1), r.get(2))).collect());
    }
    let mut queues: Vec<String> = Vec::new();
    for (key, queue, kind) in bindings.get(&route.exchange).into_iter().flatten() {
        let matches = match kind.as_deref() {
            Some("fanout") => true,
            Some("direct") => key == &route.routing_key,
            _ => key == &route.routing_key || topic_matches(key, &route.routing_key),
        };
        if matches && !queues.contains(queue) {
            queues.push(queue.clone());
        }
    }
    if queues.is_empty() {
        let what =
            format!("no queue is bound to exchange `{}` for routing key `{}`", route.exchange, route.routing_key);
        if route.mandatory {
            return Err(BrokerError::operation(format!("unroutable (mandatory) publish: {what}")));
        }
        tracing::warn!("postgresql: unroutable transactional publish dropped: {what}");
    }
    Ok(queues)
}

fn checked_size(env: &str, limit: usize) -> Result<(), BrokerError> {
    if env.len() > limit {
        return Err(ProtocolError::TooLarge { size: env.len(), limit }.into());
    }
    Ok(())
}

/// The direct path: the broker's publish statement, run by the caller's transaction. Keyed
/// tasks: the transaction takes their keys' shared fair locks ([`sql::FAIR_LOCK_SHARED`], so
/// no fetch drops one of these keys until it ends; the queue's other keys may go), then their keys join the rotations committed on a
/// connection of the broker's ([`sql::FAIR_JOIN`]), and the transaction inserts the rows without
/// joining ([`sql::FAIR_PUBLISH_JOINED`]): it writes no rotation row, so no other producer waits
/// for it (an insert that conflicts with an uncommitted row waits for its transaction) and its
/// snapshot (REPEATABLE READ, SERIALIZABLE) never meets a rotation row committed after it. When
/// that connection fails, the transaction joins them itself (as a publish does).
async fn insert_tasks(
    tx: &Transaction<'_>,
    side: &BrokerSide,
    batch: &[(Route, Message)],
    limit: usize,
) -> Result<(), BrokerError> {
    let mut bindings = HashMap::new();
    let mut rows: Vec<NewRow> = Vec::with_capacity(batch.len());
    for (route, msg) in batch {
        for queue in queues_of(tx, route, &mut bindings).await? {
            rows.push(NewRow::of(msg, &route.exchange, queue, limit)?);
        }
    }
    let (queues, keys): (Vec<&str>, Vec<&str>) =
        rows.iter().filter_map(|r| Some((r.queue.as_str(), r.fair_key.as_deref()?))).unzip();
    let mut joined = false;
    if !keys.is_empty() {
        tx.query_typed(sql::FAIR_LOCK_SHARED, &[(&queues, Type::TEXT_ARRAY), (&keys, Type::TEXT_ARRAY)])
            .await
            .map_err(|e| tx_error("locking fair rotations in the transaction", e))?;
        match join_first(side, &queues, &keys).await {
            Ok(()) => joined = true,
            Err(e) => {
                tracing::debug!(error = %e, "postgresql: joining fair rotations before a transactional send failed")
            }
        }
    }
    let channel = side.channel.clone();
    for chunk in rows.chunks(PUBLISH_BATCH) {
        let columns = Columns::new(chunk);
        let (statement, params) = columns.statement(&channel, joined);
        tx.query_typed(statement, &params).await.map_err(|e| tx_error("inserting tasks in the transaction", e))?;
    }
    Ok(())
}

/// Joins `keys` to the rotations of `queues` (pairwise), committed on the broker's connection.
async fn join_first(side: &BrokerSide, queues: &[&str], keys: &[&str]) -> Result<(), BrokerError> {
    let client = side.pool.get().await.map_err(|e| PgError::pool("transactional: join fair rotations", e))?;
    client
        .query_typed(sql::FAIR_JOIN, &[(&queues, Type::TEXT_ARRAY), (&keys, Type::TEXT_ARRAY)])
        .await
        .map_err(|e| tx_error("joining fair rotations", e))?;
    Ok(())
}

/// The outbox path: one row per message in `celery_rs_outbox`, notified at commit.
async fn insert_outbox(
    tx: &Transaction<'_>,
    channel: &str,
    batch: &[(Route, Message)],
    limit: usize,
) -> Result<(), BrokerError> {
    let mut envs = Vec::with_capacity(batch.len());
    for (route, msg) in batch {
        check_name("routing key", &route.routing_key)?;
        check_name("exchange", &route.exchange)?;
        let env = envelope::encode(msg, &route.exchange, &route.routing_key);
        checked_size(&env, limit)?;
        envs.push(env);
    }
    for (chunk, envs) in batch.chunks(PUBLISH_BATCH).zip(envs.chunks(PUBLISH_BATCH)) {
        let ids: Vec<&str> = chunk.iter().map(|(_, m)| m.headers.id.as_str()).collect();
        let exchanges: Vec<&str> = chunk.iter().map(|(r, _)| r.exchange.as_str()).collect();
        let keys: Vec<&str> = chunk.iter().map(|(r, _)| r.routing_key.as_str()).collect();
        let mandatory: Vec<bool> = chunk.iter().map(|(r, _)| r.mandatory).collect();
        let payloads: Vec<&[u8]> = envs.iter().map(|e| e.as_bytes()).collect();
        tx.query_typed(
            super::outbox::INSERT,
            &[
                (&ids, Type::TEXT_ARRAY),
                (&exchanges, Type::TEXT_ARRAY),
                (&keys, Type::TEXT_ARRAY),
                (&mandatory, Type::BOOL_ARRAY),
                (&payloads, Type::BYTEA_ARRAY),
                (&channel, Type::TEXT),
            ],
        )
        .await
        .map_err(|e| tx_error("inserting into the outbox in the transaction", e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity(tasks: Option<i64>) -> Identity {
        Identity { database: 5, started: DateTime::UNIX_EPOCH, tasks, outbox: None }
    }

    #[test]
    fn only_the_same_table_of_the_same_server_is_direct() {
        let side = identity(Some(7));
        assert!(side.same_table(&identity(Some(7))));
        assert!(side.same_table(&Identity { outbox: Some("o".into()), ..identity(Some(7)) }), "an outbox too");
        assert!(!side.same_table(&identity(Some(8))), "another schema's table");
        assert!(!side.same_table(&identity(None)), "no broker table there");
        assert!(!side.same_table(&Identity { database: 6, ..identity(Some(7)) }), "another database");
        let restarted = Identity { started: DateTime::UNIX_EPOCH + chrono::Duration::seconds(1), ..identity(Some(7)) };
        assert!(!side.same_table(&restarted), "another server (or a restart: read again)");
        assert!(!identity(None).same_table(&identity(None)));
    }

    #[test]
    fn sizes_are_bounded() {
        assert!(checked_size("abc", 3).is_ok());
        let e = checked_size("abcd", 3).unwrap_err();
        assert!(e.is_message_fault(), "{e}");
    }

    #[test]
    fn sql_states_are_found_through_the_sources() {
        let plain = AppError::from(BrokerError::connection("down"));
        assert_eq!(sql_state(&plain), None);
    }
}

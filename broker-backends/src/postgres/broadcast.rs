//! Broadcasts (events, remote control) as rows of `celery_rs_broadcasts`, announced by a `NOTIFY`
//! that carries nothing worth reading.
//!
//! PostgreSQL has no privilege for `LISTEN` or `NOTIFY`: any role that can connect to the database
//! hears every notification on any channel and can send one. So a broadcast is a row (exchange,
//! routing key, body up to [`MAX_BROADCAST`], a random 64-bit nonce), and its notification says
//! only `<id>:<nonce>`. A subscription reads the rows announced to it and delivers one only when:
//! - the notification parses as exactly `<id>:<nonce>` (anything else is dropped);
//! - a row has that id *and* that nonce, for the subscription's exchange, written less than a
//!   minute ago ([`KEEP_SECS`]) — a forged id or nonce names no row, and an old one is expired;
//! - the id was not delivered to this subscription before, and is newer than every broadcast that
//!   existed when it subscribed (a replayed notification is dropped). The ids delivered are kept in
//!   a window of [`SEEN_WINDOW`]; anything older than the window is refused outright.
//!
//! Forging a broadcast therefore takes `INSERT` on the table, and reading one `SELECT`: grant
//! neither to roles other than the broker's.
//!
//! Broadcasts are at most once: a subscription whose owner falls [`SUBSCRIPTION_BACKLOG`]
//! broadcasts or [`SUBSCRIPTION_BYTES`] of bodies behind loses the next ones (logged), so memory
//! stays bounded however slow the reader. The rows are deleted after a minute by the processes
//! that broadcast (every ten seconds at most); the table is unlogged.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use celery_core::broker::{Broadcast, Subscription};
use celery_core::routing::{topic_matches, ExchangeKind};
use tokio::sync::broadcast::error::{RecvError, TryRecvError};
use tokio::sync::{broadcast, mpsc};

use super::listen::{Channel, Note};
use super::{sql, Db};

/// The largest broadcast body, in bytes.
pub const MAX_BROADCAST: usize = 1 << 20;
/// How long a broadcast row is readable (and kept), in seconds.
pub const KEEP_SECS: f64 = 60.0;
/// Broadcasts a subscription may hold undelivered before it loses the next ones.
pub const SUBSCRIPTION_BACKLOG: usize = 8192;
/// Bytes of bodies a subscription may hold undelivered before it loses the next ones.
pub const SUBSCRIPTION_BYTES: usize = 16 << 20;
/// Announcements one read looks up at most.
const READ_BATCH: usize = 32;
/// How many delivered ids a subscription remembers (replays within them are dropped; anything
/// older is refused).
const SEEN_WINDOW: usize = 65_536;

/// What a notification announces (the broker's statement writes `<id>:<nonce>`), if it is exactly
/// that, with a positive id.
pub(crate) fn parse_announcement(payload: &str) -> Option<(i64, i64)> {
    let (id, nonce) = payload.split_once(':')?;
    let strict =
        |s: &str| !s.is_empty() && s.bytes().enumerate().all(|(i, b)| b.is_ascii_digit() || (i == 0 && b == b'-'));
    if !strict(id) || !strict(nonce) {
        return None;
    }
    let id: i64 = id.parse().ok()?;
    (id > 0).then_some((id, nonce.parse().ok()?))
}

/// The broadcast ids a subscription delivered: newer than `floor`, each once.
#[derive(Debug)]
struct Seen {
    floor: i64,
    ids: BTreeSet<i64>,
}

impl Seen {
    /// True the first time `id` is offered, when it is newer than the floor.
    fn first_time(&mut self, id: i64) -> bool {
        if id <= self.floor || !self.ids.insert(id) {
            return false;
        }
        while self.ids.len() > SEEN_WINDOW {
            if let Some(oldest) = self.ids.pop_first() {
                self.floor = oldest;
            }
        }
        true
    }
}

/// What a subscription receives: one exchange, its routing keys filtered by `pattern`.
#[derive(Debug, Clone)]
pub(crate) struct Filter {
    pub(crate) exchange: String,
    pub(crate) kind: ExchangeKind,
    pub(crate) pattern: String,
}

impl Filter {
    fn wants(&self, routing_key: &str) -> bool {
        match self.kind {
            ExchangeKind::Fanout => true,
            ExchangeKind::Topic => topic_matches(&self.pattern, routing_key),
            _ => routing_key == self.pattern,
        }
    }
}

/// A subscription fed by its own task, bounded in count and bytes.
#[derive(Debug)]
pub(crate) struct PgSubscription {
    rx: mpsc::Receiver<Broadcast>,
    queued: Arc<AtomicUsize>,
    feeder: tokio::task::JoinHandle<()>,
}

impl Drop for PgSubscription {
    fn drop(&mut self) {
        self.feeder.abort();
    }
}

#[async_trait]
impl Subscription for PgSubscription {
    async fn next(&mut self) -> Option<Broadcast> {
        let b = self.rx.recv().await?;
        self.queued.fetch_sub(b.body.len(), Ordering::Relaxed);
        Some(b)
    }
}

impl PgSubscription {
    /// Starts delivering the broadcasts announced on `notes` that `filter` wants and whose id is
    /// above `floor` (the newest broadcast when it subscribed).
    pub(crate) fn start(db: Db, notes: broadcast::Receiver<Note>, filter: Filter, floor: i64) -> PgSubscription {
        let (tx, rx) = mpsc::channel(SUBSCRIPTION_BACKLOG);
        let queued = Arc::new(AtomicUsize::new(0));
        let feeder = tokio::spawn(feed(db, notes, filter, Seen { floor, ids: BTreeSet::new() }, tx, queued.clone()));
        PgSubscription { rx, queued, feeder }
    }
}

/// Reads announcements in the order they come, looks their rows up in batches, and delivers the
/// genuine ones.
async fn feed(
    db: Db,
    mut notes: broadcast::Receiver<Note>,
    filter: Filter,
    mut seen: Seen,
    tx: mpsc::Sender<Broadcast>,
    queued: Arc<AtomicUsize>,
) {
    let lagged = |n: u64| {
        tracing::warn!(missed = n, exchange = %filter.exchange, "postgresql: a subscription fell behind; broadcasts lost");
    };
    loop {
        let mut batch: Vec<(i64, i64)> = Vec::new();
        let first = match notes.recv().await {
            Ok(n) => n,
            Err(RecvError::Lagged(n)) => {
                lagged(n);
                continue;
            }
            Err(RecvError::Closed) => return,
        };
        take(&mut batch, &first);
        while batch.len() < READ_BATCH {
            match notes.try_recv() {
                Ok(n) => take(&mut batch, &n),
                Err(TryRecvError::Lagged(n)) => lagged(n),
                Err(TryRecvError::Empty | TryRecvError::Closed) => break,
            }
        }
        if batch.is_empty() {
            continue;
        }
        let (ids, nonces): (Vec<i64>, Vec<i64>) = batch.into_iter().unzip();
        let rows = match db
            .query("read broadcasts", sql::BROADCAST_READ, &[&ids, &nonces, &filter.exchange, &KEEP_SECS])
            .await
        {
            Ok(rows) => rows,
            Err(e) => {
                tracing::warn!(error = %e, exchange = %filter.exchange, "postgresql: reading broadcasts failed; they are lost");
                continue;
            }
        };
        for row in rows {
            let (id, routing_key, body): (i64, String, Vec<u8>) = (row.get(0), row.get(1), row.get(2));
            if !seen.first_time(id) || !filter.wants(&routing_key) {
                continue;
            }
            let size = body.len();
            if queued.load(Ordering::Relaxed) + size > SUBSCRIPTION_BYTES {
                tracing::warn!(exchange = %filter.exchange, size, "postgresql: a subscription holds too many bytes; broadcast lost");
                continue;
            }
            queued.fetch_add(size, Ordering::Relaxed);
            match tx.try_send(Broadcast { routing_key, body }) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(b)) => {
                    queued.fetch_sub(b.body.len(), Ordering::Relaxed);
                    tracing::warn!(exchange = %filter.exchange, "postgresql: a subscription fell behind; broadcast lost");
                }
                Err(mpsc::error::TrySendError::Closed(_)) => return,
            }
        }
    }
}

/// Adds what a broadcast notification announces to `batch` (once); drops anything else.
fn take(batch: &mut Vec<(i64, i64)>, note: &Note) {
    if note.channel != Channel::Broadcasts {
        return;
    }
    match parse_announcement(&note.payload) {
        Some(a) if !batch.contains(&a) => batch.push(a),
        Some(_) => {}
        None => tracing::debug!("postgresql: a malformed broadcast notification was dropped"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn announcements_are_strict() {
        assert_eq!(parse_announcement("42:-7"), Some((42, -7)));
        assert_eq!(parse_announcement("1:9223372036854775807"), Some((1, i64::MAX)));
        for bad in ["", "1", ":1", "1:", "0:1", "-1:1", "1:2:3", " 1:2", "1:2 ", "+1:2", "1:x", "a\u{1f}b\u{1f}i{}"] {
            assert_eq!(parse_announcement(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn each_id_is_delivered_once_and_old_ones_never() {
        let mut seen = Seen { floor: 10, ids: BTreeSet::new() };
        assert!(!seen.first_time(10), "existed before the subscription");
        assert!(seen.first_time(12));
        assert!(seen.first_time(11), "out of order is fine");
        assert!(!seen.first_time(12), "a replay");
        for id in 13..13 + SEEN_WINDOW as i64 {
            assert!(seen.first_time(id));
        }
        assert_eq!(seen.ids.len(), SEEN_WINDOW);
        assert!(!seen.first_time(11) && !seen.first_time(12), "out of the window: refused");
    }

    #[test]
    fn filters_follow_the_exchange_kind() {
        let f = |kind, pattern: &str| Filter { exchange: "e".into(), kind, pattern: pattern.into() };
        assert!(f(ExchangeKind::Fanout, "").wants("anything"));
        assert!(f(ExchangeKind::Topic, "task.#").wants("task.succeeded"));
        assert!(!f(ExchangeKind::Topic, "task.#").wants("worker.heartbeat"));
        assert!(f(ExchangeKind::Direct, "k").wants("k") && !f(ExchangeKind::Direct, "k").wants("l"));
    }
}

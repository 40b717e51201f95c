//! The PostgreSQL consumer: leased fetch with `FOR UPDATE SKIP LOCKED`, wake-ups by `NOTIFY`,
//! lease renewal, the return of expired leases, batched acks, and settling.
//!
//! - One statement for many queues ([`sql::FETCH`]): a fetch looks at up to 1,000 queues at once,
//!   so its cost follows the messages it takes, not the queues they come from (before, each queue
//!   with work cost a statement: with more queues than the fetch size, a statement per message).
//! - Fairness: a fetch of `n` gives each queue that may have work an equal share of `n` (one
//!   message each to the first `n` that have one, when there are more queues than `n`), in turn,
//!   then what is left to the queues that filled their share (at most [`MAX_REFILLS`] statements
//!   more), so a busy queue never starves the others. The next fetch begins with the first queue
//!   this one did not reach (so with thousands of busy queues each has its turn), otherwise with
//!   the next queue. The deliveries of one statement take turns too: the first of each queue, then
//!   the second of each, ...; within a queue, by priority then age.
//! - Fair queues: a queue with a rotation (read at the first fetch and after each reconnect of
//!   the listener, or marked by a keyed publish's notification, [`sql::FAIR_NOTE`]) is fetched by
//!   a statement of its own ([`sql::FAIR_FETCH`]: its keys take turns by the consumer's weights,
//!   one consumer at a time per queue) in its place among the fetch's queues (each run of other
//!   queues by one statement), its share as any queue's; the rows come in the order the turns gave them. When that statement says the
//!   rotation is gone (no keyed row was left), the queue is fetched as before.
//! - Size cap: a message above the consumer's `max_message_size` is dead-lettered by the fetch
//!   statement itself (its payload is not sent); the consumer hands out a delivery that holds no
//!   lease nor slot and says so.
//! - Fencing: each delivery carries its row's delivery count, which every settling statement
//!   names; the count grows with every take, also after a dead-letter.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use celery_core::broker::{dead_letter_queue, Decoder, Settle, Settled, DEAD_LETTER_QUEUE, DEAD_LETTER_REASON};
use celery_core::flow::FairnessWeights;
use celery_core::protocol::{lenient_task_id, Message};
use celery_core::{BrokerError, Delivery, ProtocolError};
use chrono::{DateTime, Utc};
use tokio::sync::broadcast::error::{RecvError, TryRecvError};
use tokio::sync::{broadcast, mpsc, watch};

use super::holder::Holder;
use super::listen::{Channel, Note};
use super::{sql, Db};
use crate::consumer::{ack_queue, AckQueue, Fetch, Fetched, FetchingConsumer, Slots};
use crate::envelope;

/// How many messages one fetch leases at most.
const MAX_FETCH: usize = 500;
/// How many queues one fetch statement looks at, at most.
const MAX_FETCH_QUEUES: usize = 1000;
/// How many more statements one fetch runs, at most, for the queues that filled their share
/// while others left some of theirs.
const MAX_REFILLS: usize = 4;
/// How many acks one statement deletes at most.
const MAX_ACK_BATCH: usize = 5000;
/// The most unsettled deliveries one consumer holds.
const MAX_PREFETCH: usize = 65_536;
/// Expired leases returned per statement.
const RESTORE_BATCH: i64 = 1000;
/// The longest an idle consumer sleeps without a notification (a safety net, not a poll).
const IDLE_MAX: Duration = Duration::from_secs(60);
/// How often an idle consumer looks while its listener reconnects.
const FALLBACK_POLL: Duration = Duration::from_secs(1);
/// The longest dead-letter reason kept in the `reason` column (the message's header has it whole).
const MAX_REASON: usize = 4096;
/// The most keys of a fair queue's ring one fetch visits (its rotation goes on at the next one).
const MAX_FAIR_VISITS: usize = 2000;

/// What the fetcher, the settlers and the background loops share.
struct Shared {
    db: Db,
    /// The tasks channel (notified when a message is returned or moved).
    channel: String,
    /// Unsettled deliveries: id -> fencing token (the delivery count).
    leases: Mutex<HashMap<i64, i32>>,
    slots: Slots,
    /// Acks: (id, fencing token).
    acks: AckQueue<(i64, i32)>,
    /// Whose heartbeat vouches for these leases (see [`super::holder`]).
    holder: Arc<Holder>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared").field("channel", &self.channel).finish_non_exhaustive()
    }
}

impl Shared {
    fn release(&self, id: i64) {
        if self.leases.lock().unwrap_or_else(|p| p.into_inner()).remove(&id).is_some() {
            self.slots.give_back(1);
        }
    }

    fn lease_snapshot(&self) -> (Vec<i64>, Vec<i32>) {
        self.leases.lock().unwrap_or_else(|p| p.into_inner()).iter().map(|(id, t)| (*id, *t)).unzip()
    }
}

/// A consumer of some PostgreSQL queues: acks carry the row's id and fencing token.
pub type PostgresConsumer = FetchingConsumer<(i64, i32)>;

impl PostgresConsumer {
    /// Starts consuming `queues` (in turn), dead-lettering unread any message above
    /// `max_message_size` bytes.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn start(
        db: Db,
        holder: Arc<Holder>,
        channel: String,
        notes: broadcast::Receiver<Note>,
        connected: watch::Receiver<bool>,
        vt: Duration,
        queues: &[String],
        prefetch: usize,
        max_message_size: usize,
        weights: Arc<FairnessWeights>,
    ) -> PostgresConsumer {
        let prefetch = prefetch.clamp(1, MAX_PREFETCH);
        let (acks, batcher) = ack_queue();
        let shared = Arc::new(Shared {
            db,
            channel,
            leases: Mutex::new(HashMap::new()),
            slots: Slots::new(prefetch),
            acks: acks.clone(),
            holder,
        });
        let cap = i64::try_from(max_message_size).unwrap_or(i64::MAX);
        // Each queue once: a fetch statement names each of its queues once.
        let mut index: HashMap<String, usize> = HashMap::new();
        let mut unique = Vec::new();
        for q in queues {
            if !index.contains_key(q) {
                index.insert(q.clone(), unique.len());
                unique.push(q.clone());
            }
        }
        let (weight_keys, weight_values) = weights.iter().map(|(k, w)| (k.to_owned(), w as i32)).unzip();
        let fetch = Fetcher {
            shared: shared.clone(),
            maybe: vec![true; unique.len()],
            fair: vec![false; unique.len()],
            fair_known: false,
            weight_keys,
            weight_values,
            queues: unique,
            index,
            notes,
            connected,
            vt,
            cap,
            turn: 0,
        };
        let db = shared.db.clone();
        let ack = batcher.run("postgres", MAX_ACK_BATCH, BrokerError::is_retryable, move |batch: &[(i64, i32)]| {
            let (ids, tokens): (Vec<i64>, Vec<i32>) = batch.iter().copied().unzip();
            let db = db.clone();
            async move { db.query("ack", sql::ACK, &[&ids, &tokens]).await.map(drop) }
        });
        let background = vec![
            tokio::spawn(ack),
            tokio::spawn(renew_loop(shared.clone(), vt)),
            tokio::spawn(restore_loop(shared.clone(), vt)),
        ];
        FetchingConsumer::spawn(prefetch, fetch, acks, background)
    }
}

/// One fetched row: leased, or dead-lettered unread for its size.
struct Row {
    id: i64,
    deliveries: i32,
    priority: i16,
    run_at: DateTime<Utc>,
    size: i64,
    /// `Err(task id)`: too large, moved to its dead-letter queue unread.
    payload: Result<Vec<u8>, Option<String>>,
    /// Why it was dead-lettered, when it was.
    reason: Option<String>,
}

/// The row of a [`sql::FETCH`] or [`sql::FAIR_FETCH`] result, noting the dead-letter queue
/// that received it when the fetch dead-lettered it for its size.
fn row_of(r: &tokio_postgres::Row, dead: &mut Vec<String>) -> Row {
    let payload = match r.get::<_, Option<Vec<u8>>>(6) {
        Some(p) => Ok(p),
        None => {
            if let Some(dlq) = r.get::<_, Option<String>>(8) {
                if !dead.contains(&dlq) {
                    dead.push(dlq);
                }
            }
            Err(r.get::<_, Option<String>>(7))
        }
    };
    Row {
        id: r.get(1),
        deliveries: r.get(2),
        priority: r.get(3),
        run_at: r.get(4),
        size: r.get(5),
        payload,
        reason: r.get(9),
    }
}

struct Fetcher {
    shared: Arc<Shared>,
    queues: Vec<String>,
    /// Each queue's place in `queues`.
    index: HashMap<String, usize>,
    /// The queues that may hold ready rows: a fetch looks only at these, so its cost follows the
    /// queues that have work, not how many are consumed. A queue leaves when a fetch found fewer
    /// rows than it asked for, and comes back with a notification naming it (a publish, a return,
    /// a move), and all come back when notifications may have been missed or an eta fell due.
    maybe: Vec<bool>,
    /// The queues with a fair rotation (fetched with [`sql::FAIR_FETCH`], one statement each):
    /// read at the first fetch and after the listener reconnected ([`sql::FAIR_QUEUES`]), set by a
    /// notification that marks its queue fair ([`sql::FAIR_NOTE`]), cleared when a fair fetch
    /// finds the rotation gone.
    fair: Vec<bool>,
    /// Whether `fair` is known (false: read it before the next fetch).
    fair_known: bool,
    /// The named fairness keys and their weights (every other key: 1), sent with each fair fetch.
    weight_keys: Vec<String>,
    weight_values: Vec<i32>,
    notes: broadcast::Receiver<Note>,
    connected: watch::Receiver<bool>,
    vt: Duration,
    /// The largest payload read (`max_message_size`).
    cap: i64,
    /// Which queue comes first in the next fetch.
    turn: usize,
}

/// What one fetch statement asks for: a share of each of some queues, `total` in all.
#[derive(Debug, PartialEq)]
struct Plan {
    /// The queues (places in [`Fetcher::queues`]), in the order they are looked at.
    queues: Vec<usize>,
    /// Each queue's share, at least 1.
    shares: Vec<usize>,
    /// The shares as the statement takes them.
    shares_sql: Vec<i64>,
    /// The most rows taken in all.
    total: usize,
}

impl Plan {
    /// Shares of `left` rows over `queues` (`left` at least 1): equal shares (the first ones one
    /// more when it does not divide) when there are at most `left` queues; otherwise one row
    /// each, for the first `left` queues that have one.
    fn new(queues: Vec<usize>, left: usize) -> Plan {
        let m = queues.len();
        let shares: Vec<usize> =
            if m <= left { (0..m).map(|i| left / m + usize::from(i < left % m)).collect() } else { vec![1; m] };
        let shares_sql = shares.iter().map(|&s| s as i64).collect();
        Plan { queues, shares, shares_sql, total: left }
    }
}

/// What a fetch statement found, per queue of its [`Plan`].
#[derive(Debug, PartialEq)]
struct Looked {
    /// Rows taken (leased or dead-lettered).
    taken: Vec<usize>,
    /// Rows leased.
    leased: Vec<usize>,
    /// How many of the plan's queues the statement looked at: all, unless it stopped at the
    /// total (then up to the last queue that gave a row).
    reached: usize,
}

impl Looked {
    fn count(plan: &Plan, rows: &[Vec<Row>]) -> Looked {
        let taken: Vec<usize> = rows.iter().map(Vec::len).collect();
        let leased = rows.iter().map(|line| line.iter().filter(|r| r.payload.is_ok()).count()).collect();
        Looked::new(plan, taken, leased)
    }

    fn new(plan: &Plan, taken: Vec<usize>, leased: Vec<usize>) -> Looked {
        let reached = if taken.iter().sum::<usize>() >= plan.total {
            taken.iter().rposition(|&t| t > 0).map_or(0, |i| i + 1)
        } else {
            plan.queues.len()
        };
        Looked { taken, leased, reached }
    }
}

impl Fetch for Fetcher {
    const BROKER: &'static str = "postgres";
    const MAX_FETCH: usize = MAX_FETCH;

    fn slots(&self) -> &Slots {
        &self.shared.slots
    }

    async fn fetch(&mut self, n: usize, tx: &mpsc::Sender<Delivery>) -> Fetched {
        // What was announced before this fetch, it sees; what is announced after, wakes the wait.
        self.drain_notes();
        let k = self.queues.len();
        if k == 0 {
            return Fetched::Sent { taken: 0, drained: true };
        }
        if !self.fair_known {
            if let Err(error) = self.learn_fair().await {
                return Fetched::Failed { taken: 0, error };
            }
        }
        let start = self.turn % k;
        // Queues not looked at yet in this fetch, in turn; then those that filled their share.
        let mut unseen: VecDeque<usize> = (0..k).map(|i| (start + i) % k).filter(|&i| self.maybe[i]).collect();
        let mut filled: VecDeque<usize> = VecDeque::new();
        let (mut got, mut dead_lettered, mut refills) = (0, false, 0);
        while got < n {
            let from = if !unseen.is_empty() {
                &mut unseen
            } else if !filled.is_empty() && refills < MAX_REFILLS {
                refills += 1;
                &mut filled
            } else {
                break;
            };
            let queues: Vec<usize> = from.drain(..from.len().min(MAX_FETCH_QUEUES)).collect();
            let plan = Plan::new(queues, n - got);
            let looked = match self.take(&plan, tx).await {
                Ok(Some(looked)) => looked,
                Ok(None) => return Fetched::Closed,
                Err(error) => return Fetched::Failed { taken: got, error },
            };
            // Those the statement did not reach are the first to look at next.
            for &q in plan.queues[looked.reached..].iter().rev() {
                from.push_front(q);
            }
            for (i, &q) in plan.queues[..looked.reached].iter().enumerate() {
                let (leased, taken) = (looked.leased[i], looked.taken[i]);
                got += leased;
                dead_lettered |= taken > leased;
                if taken == plan.shares[i] {
                    filled.push_back(q);
                } else if taken == leased {
                    self.maybe[q] = false;
                }
            }
        }
        // The next fetch begins with the first queue this one did not look at, so that with
        // more queues than one fetch takes, each has its turn; otherwise with the next queue.
        self.turn = unseen.front().copied().unwrap_or(start + 1);
        // Every queue is drained (as far as this snapshot saw) when fewer than `n` came, every
        // queue was looked at, none may have more and none was dead-lettered (whose slots were
        // not used: look again at once).
        let drained = got < n && unseen.is_empty() && filled.is_empty() && !dead_lettered;
        Fetched::Sent { taken: got, drained }
    }

    /// Sleeps until told, or until the next eta (then every queue is looked at again).
    async fn idle(&mut self) {
        let wait = self.idle_wait().await;
        tokio::select! {
            _ = self.woken() => {}
            _ = tokio::time::sleep(wait) => self.maybe.fill(true),
        }
    }
}

impl Fetcher {
    /// Takes what `plan` asks for in one statement and sends the deliveries, the queues taking
    /// turns (the first of each, then the second of each, ...): what each queue gave, or `None`
    /// when nobody receives deliveries any more.
    async fn take(&mut self, plan: &Plan, tx: &mpsc::Sender<Delivery>) -> Result<Option<Looked>, BrokerError> {
        // Read before the fetch runs: a lapse noticed after it means these may have been returned.
        let epoch = self.shared.holder.liveness().epoch();
        let (rows, dead) = self.lease(plan).await?;
        let names: Vec<&str> = plan.queues.iter().map(|&q| self.queues[q].as_str()).collect();
        for dlq in &dead {
            if let Err(e) = self.shared.db.query("wake", sql::WAKE, &[&self.shared.channel, dlq]).await {
                tracing::debug!(error = %e, queue = %dlq, "postgresql: waking a dead-letter queue failed");
            }
        }
        let looked = Looked::count(plan, &rows);
        let mut lines: Vec<std::vec::IntoIter<Row>> = rows.into_iter().map(Vec::into_iter).collect();
        loop {
            let mut sent = false;
            for (i, line) in lines.iter_mut().enumerate() {
                if let Some(row) = line.next() {
                    if tx.send(self.delivery(names[i], row, epoch)).await.is_err() {
                        return Ok(None);
                    }
                    sent = true;
                }
            }
            if !sent {
                return Ok(Some(looked));
            }
        }
    }

    /// Leases what `plan` asks for (rows too large are dead-lettered by the statement): the rows
    /// of each of its queues (in the plan's order) in the order they are to be handed out, and
    /// the dead-letter queues that received a message. In the plan's order (so that, as with one
    /// statement, the queues after the last that gave a row when the total was reached are the
    /// ones not looked at): a fair queue by a statement of its own ([`sql::FAIR_FETCH`]: the rows
    /// in the order their keys' turns gave them), each run of other queues by one statement
    /// ([`sql::FETCH`]) with what is left of the total.
    async fn lease(&mut self, plan: &Plan) -> Result<(Vec<Vec<Row>>, Vec<String>), BrokerError> {
        let mut dead: Vec<String> = Vec::new();
        let mut rows: Vec<Vec<Row>> = plan.queues.iter().map(|_| Vec::new()).collect();
        let mut left = plan.total;
        let mut i = 0;
        while i < plan.queues.len() && left > 0 {
            let q = plan.queues[i];
            if self.fair[q] {
                let (line, fair) = self.lease_fair(q, plan.shares[i].min(left), &mut dead).await?;
                left -= line.len().min(left);
                rows[i] = line;
                self.fair[q] = fair;
                i += 1;
                continue;
            }
            let end = (i..plan.queues.len()).find(|&j| self.fair[plan.queues[j]]).unwrap_or(plan.queues.len());
            let plain: Vec<usize> = (i..end).collect();
            i = end;
            let names: Vec<&str> = plain.iter().map(|&i| self.queues[plan.queues[i]].as_str()).collect();
            let shares: Vec<i64> = plain.iter().map(|&i| plan.shares_sql[i]).collect();
            let total = left as i64;
            let params: [&(dyn tokio_postgres::types::ToSql + Sync); 6] =
                [&names, &shares, &self.vt.as_secs_f64(), &self.cap, &self.shared.holder.id(), &total];
            let result = self.shared.db.query("fetch", sql::FETCH, &params).await?;
            let place: HashMap<&str, usize> = names.iter().zip(&plain).map(|(q, &i)| (*q, i)).collect();
            for r in result {
                let row = row_of(&r, &mut dead);
                match place.get(r.get::<_, &str>(0)) {
                    Some(&i) => {
                        rows[i].push(row);
                        left = left.saturating_sub(1);
                    }
                    // Never: the statement takes only from the queues it was given.
                    None => {
                        tracing::error!(
                            queue = r.get::<_, &str>(0),
                            "postgresql: a fetch returned a queue not asked for"
                        )
                    }
                }
            }
            for &i in &plain {
                rows[i].sort_by_key(|r| (r.priority, r.run_at, r.id));
            }
        }
        let mut leases = self.shared.leases.lock().unwrap_or_else(|p| p.into_inner());
        for line in &rows {
            for r in line.iter().filter(|r| r.payload.is_ok()) {
                leases.insert(r.id, r.deliveries);
            }
        }
        Ok((rows, dead))
    }

    /// Leases up to `n` rows of fair queue `q` ([`sql::FAIR_FETCH`]), in the order taken: the rows,
    /// and whether the queue is still fair.
    async fn lease_fair(&self, q: usize, n: usize, dead: &mut Vec<String>) -> Result<(Vec<Row>, bool), BrokerError> {
        let n_sql = n as i32;
        let visits = (2 * n + 64).min(MAX_FAIR_VISITS) as i32;
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 8] = [
            &self.queues[q],
            &n_sql,
            &self.vt.as_secs_f64(),
            &self.cap,
            &self.shared.holder.id(),
            &self.weight_keys,
            &self.weight_values,
            &visits,
        ];
        let result = self.shared.db.query("fair fetch", sql::FAIR_FETCH, &params).await?;
        let fair = result.first().is_some_and(|r| r.get::<_, bool>(10));
        // In the order the keys' turns picked them.
        let mut line = Vec::with_capacity(result.len());
        for r in result.iter().filter(|r| r.get::<_, Option<i64>>(1).is_some()) {
            // Never: the function locks only rows still ready in this queue.
            if r.get::<_, Option<&str>>(0) != Some(self.queues[q].as_str()) {
                tracing::error!(
                    queue = r.get::<_, Option<&str>>(0),
                    asked = %self.queues[q],
                    "postgresql: a fair fetch returned a row of another queue (left to its lease)"
                );
                continue;
            }
            line.push(row_of(r, dead));
        }
        Ok((line, fair))
    }

    /// Reads which of the queues are fair ([`sql::FAIR_QUEUES`]).
    async fn learn_fair(&mut self) -> Result<(), BrokerError> {
        let rows = self.shared.db.query("fair queues", sql::FAIR_QUEUES, &[&self.queues]).await?;
        self.fair.fill(false);
        for r in rows {
            if let Some(&i) = self.index.get(r.get::<_, &str>(0)) {
                self.fair[i] = true;
            }
        }
        self.fair_known = true;
        Ok(())
    }

    fn delivery(&self, queue: &str, row: Row, epoch: u64) -> Delivery {
        let payload = match row.payload {
            Ok(p) => Arc::new(p),
            Err(id) => return self.oversized(queue, row.size, id),
        };
        let size = payload.len();
        let raw = payload.clone();
        // A dead letter moved by the fetch statement (too large for a consumer's cap) keeps its
        // payload untouched: its reason and origin, kept in columns, are shown as the headers a
        // dead letter carries on every broker.
        let dead = row.reason.zip(queue.strip_suffix(".dead").map(str::to_owned));
        let decode: Decoder = Box::new(move || {
            let (mut message, redelivered) = envelope::decode(&raw).into_parts();
            if let (Ok(m), Some((reason, origin))) = (&mut message, dead) {
                m.headers.extra.entry(DEAD_LETTER_REASON.to_owned()).or_insert_with(|| reason.into());
                m.headers.extra.entry(DEAD_LETTER_QUEUE.to_owned()).or_insert_with(|| origin.into());
            }
            (message, redelivered)
        });
        let settle = PgSettle {
            shared: self.shared.clone(),
            id: row.id,
            token: row.deliveries,
            epoch,
            queue: queue.to_owned(),
            payload,
        };
        Delivery::lazy(decode, queue.to_owned(), row.deliveries > 1, Box::new(settle)).with_size(size)
    }

    /// The delivery of a message the fetch dead-lettered unread: it holds no lease nor slot, and
    /// names the task (so that its caller learns of the failure) when the server could read its id.
    fn oversized(&self, queue: &str, size: i64, id: Option<String>) -> Delivery {
        let size = usize::try_from(size).unwrap_or(usize::MAX);
        let limit = usize::try_from(self.cap).unwrap_or(usize::MAX);
        tracing::warn!(%queue, size, limit, "postgresql: oversized message dead-lettered unread");
        let too_large = ProtocolError::TooLarge { size, limit };
        let message = Err(match lenient_task_id(&serde_json::json!({ "id": id })) {
            Some(id) => ProtocolError::InvalidHeaders { id, task: None, reply_to: None, error: Box::new(too_large) },
            None => too_large,
        });
        Delivery::new(message, queue.to_owned(), false, Box::new(Settled)).with_size(size)
    }

    fn drain_notes(&mut self) {
        loop {
            match self.notes.try_recv() {
                Ok(note) => {
                    self.noted(&note);
                }
                Err(TryRecvError::Lagged(_)) => {
                    self.maybe.fill(true);
                    self.fair_known = false;
                }
                Err(TryRecvError::Empty | TryRecvError::Closed) => return,
            }
        }
    }

    /// Marks the queue a notification names as one to look at (all of them after the listener
    /// reconnected); true when the note concerns this consumer.
    fn noted(&mut self, note: &Note) -> bool {
        match note.channel {
            Channel::Tasks => {
                // A queue named like a mark is woken too (a mark for a queue not fair costs one
                // fair fetch that says so).
                let marked = note.payload.strip_prefix(sql::FAIR_NOTE).and_then(|q| self.index.get(q).copied());
                if let Some(i) = marked {
                    self.fair[i] = true;
                    self.maybe[i] = true;
                }
                match self.index.get(&*note.payload) {
                    Some(&i) => {
                        self.maybe[i] = true;
                        true
                    }
                    None => marked.is_some(),
                }
            }
            Channel::Reconnected => {
                self.maybe.fill(true);
                self.fair_known = false;
                true
            }
            _ => false,
        }
    }

    /// How long an idle consumer may sleep: until the next eta of its queues, at most
    /// [`IDLE_MAX`], or [`FALLBACK_POLL`] while its listener is down.
    async fn idle_wait(&self) -> Duration {
        let cap = if *self.connected.borrow() { IDLE_MAX } else { FALLBACK_POLL };
        match self.shared.db.query("next eta", sql::NEXT_DUE, &[&self.queues]).await {
            Ok(rows) => match rows.first().and_then(|r| r.get::<_, Option<f64>>(0)) {
                Some(secs) => Duration::try_from_secs_f64(secs.max(0.0)).unwrap_or(cap).min(cap),
                None => cap,
            },
            Err(e) => {
                tracing::debug!(error = %e, "postgresql: reading the next eta failed");
                FALLBACK_POLL
            }
        }
    }

    /// Returns on a notification for one of this consumer's queues, on a reconnect of the
    /// listener, or when notifications were missed.
    async fn woken(&mut self) {
        loop {
            tokio::select! {
                note = self.notes.recv() => match note {
                    Ok(n) => {
                        if self.noted(&n) {
                            return;
                        }
                    }
                    Err(RecvError::Lagged(_)) => {
                        self.maybe.fill(true);
                        self.fair_known = false;
                        return;
                    }
                    // The listener is gone (the broker was dropped): the caller's timer decides.
                    Err(RecvError::Closed) => std::future::pending::<()>().await,
                },
                changed = self.connected.changed() => {
                    if changed.is_err() {
                        std::future::pending::<()>().await;
                    }
                    // Lost: poll; back: look once.
                    self.maybe.fill(true);
                    return;
                }
            }
        }
    }
}

async fn renew_loop(shared: Arc<Shared>, vt: Duration) {
    let every = (vt / 4).clamp(Duration::from_millis(100), Duration::from_secs(300));
    loop {
        tokio::time::sleep(every).await;
        let (ids, tokens) = shared.lease_snapshot();
        for (ids, tokens) in ids.chunks(1000).zip(tokens.chunks(1000)) {
            if let Err(e) = shared.db.query("renew leases", sql::RENEW, &[&ids, &tokens, &vt.as_secs_f64()]).await {
                tracing::warn!(error = %e, "postgresql: lease renewal failed; will retry");
            }
        }
    }
}

/// Returns expired leases (of any consumer, in any queue) to their queues.
async fn restore_loop(shared: Arc<Shared>, vt: Duration) {
    let every = (vt / 4).clamp(Duration::from_millis(100), Duration::from_secs(60));
    loop {
        match shared.db.query("restore expired leases", sql::RESTORE, &[&shared.channel, &RESTORE_BATCH]).await {
            Ok(rows) => {
                let n: i64 = rows.iter().map(|r| r.get::<_, i64>(1)).sum();
                if n > 0 {
                    tracing::warn!(restored = n, "postgresql: returned messages whose lease expired");
                }
                if n < RESTORE_BATCH {
                    tokio::time::sleep(every).await;
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "postgresql: restore sweep failed; will retry");
                tokio::time::sleep(every).await;
            }
        }
    }
}

#[derive(Debug)]
struct PgSettle {
    shared: Arc<Shared>,
    id: i64,
    token: i32,
    /// The holder's epoch when it was fetched ([`crate::liveness::Liveness::surely_held`]).
    epoch: u64,
    queue: String,
    payload: Arc<Vec<u8>>,
}

impl PgSettle {
    /// Runs a settling statement; the lease is released either way (after a failure it is no
    /// longer renewed, so the message comes back after the visibility timeout).
    async fn settle(
        &self,
        what: &'static str,
        statement: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<(), BrokerError> {
        let r = self.shared.db.query(what, statement, params).await.map(drop);
        self.shared.release(self.id);
        r
    }
}

/// `s` cut to at most `max` bytes, on a character boundary.
fn truncated(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[async_trait]
impl Settle for PgSettle {
    /// Certain without a round trip while the worker's row has been renewed without a lapse since
    /// the fetch; otherwise whether the row is still leased under this delivery's token.
    async fn is_held(&self) -> bool {
        self.shared.holder.liveness().surely_held(self.epoch)
            || self.shared.holder.broker().still_leased(self.id, self.token).await
    }

    async fn ack(&self) -> Result<(), BrokerError> {
        self.shared.release(self.id);
        self.shared.acks.ack((self.id, self.token))
    }

    async fn requeue(&self) -> Result<(), BrokerError> {
        self.settle("requeue", sql::REQUEUE, &[&self.id, &self.token, &self.shared.channel]).await
    }

    /// A new `run_at` and payload for the same row, released from its lease in one statement.
    async fn defer(&self, msg: &Message, until: DateTime<Utc>) -> Result<(), BrokerError> {
        let mut m = msg.clone();
        m.headers.eta = Some(until);
        let env = envelope::encode(&m, "", &self.queue).into_bytes();
        self.settle("defer", sql::DEFER, &[&self.id, &self.token, &until, &env, &self.shared.channel]).await
    }

    async fn dead_letter(&self, reason: &str) -> Result<(), BrokerError> {
        let dlq = dead_letter_queue(&self.queue);
        let env = envelope::dead_letter(&self.payload, &self.queue, reason).into_bytes();
        let reason = truncated(reason, MAX_REASON).replace('\0', "");
        self.settle(
            "dead-letter",
            sql::DEAD_LETTER,
            &[&self.id, &self.token, &dlq, &reason, &env, &self.shared.channel],
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_are_equal_or_one_each() {
        let plan = Plan::new(vec![4, 5, 6], 10);
        assert_eq!(plan.shares, [4, 3, 3]);
        assert_eq!(plan.shares_sql, [4, 3, 3]);
        assert_eq!(plan.total, 10);
        let plan = Plan::new(vec![0, 1, 2, 3, 4], 2);
        assert_eq!(plan.shares, [1; 5], "more queues than rows: one each, the first two that have one");
        assert_eq!(plan.total, 2);
        assert_eq!(Plan::new(vec![7], 500).shares, [500]);
    }

    #[test]
    fn a_statement_stopped_at_its_total_reached_the_last_queue_that_gave() {
        let plan = Plan::new((0..6).collect(), 3);
        // Queues 0, 2 and 3 gave one each; 1 was empty; 4 and 5 were not looked at.
        let looked = Looked::new(&plan, vec![1, 0, 1, 1, 0, 0], vec![1, 0, 1, 1, 0, 0]);
        assert_eq!(looked.reached, 4);
        // Fewer than the total: every queue was looked at.
        let looked = Looked::new(&plan, vec![1, 0, 0, 1, 0, 0], vec![1, 0, 0, 1, 0, 0]);
        assert_eq!(looked.reached, 6);
        // Dead-lettered rows count towards the total.
        let looked = Looked::new(&plan, vec![2, 1, 0, 0, 0, 0], vec![0, 1, 0, 0, 0, 0]);
        assert_eq!(looked.reached, 2);
        let plan = Plan::new(vec![0, 1], 10);
        assert_eq!(Looked::new(&plan, vec![5, 5], vec![5, 5]).reached, 2);
    }

    #[test]
    fn reasons_are_cut_on_char_boundaries() {
        assert_eq!(truncated("abc", 10), "abc");
        assert_eq!(truncated("abcdef", 3), "abc");
        assert_eq!(truncated("aé", 2), "a");
    }
}

//! Serves a local store over a stream socket (the directory's unix socket, or TCP for
//! `broker serve`): one task per connection, requests handled concurrently, deliveries pushed. When a
//! connection drops, the deliveries it held go back to their queues at once.
//!
//! What a client can make the server hold is bounded ([`ServerLimits`]): connections at once; before
//! `HELLO`, one frame of 4 KiB within the HELLO timeout; after it, requests handled at once (in
//! count and bytes) and answers queued (in bytes). At a limit the read loop stops reading the
//! connection, so an unread socket holds the rest. The read loop never waits for a later frame of
//! its own connection (acks are applied where they are read, each handled request ends on its own),
//! so the limits cannot deadlock a connection. Silent connections that hold nothing are closed.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use celery_core::broker::Settle;
use celery_core::{Broker, TaskMeta, TaskState};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use super::store::LogStore;
use super::stream::{Commit, LocalStream, StartFrom};
use super::wire::{self, kind, settle, Dec, Enc};
use super::{LogBroker, LogConsumer, LogSettle};

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// What one client can make the server hold, and for how long. Before its `HELLO` a connection
/// may send one frame of at most 4 KiB (the token); after it, frames of up to 256 MiB.
///
/// Every field has a default ([`ServerLimits::default`]); `broker serve` sets them from its options.
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use std::time::Duration;
/// use broker_backends::log::{parse_url, serve_tcp_with, LogStore, ServerLimits};
/// let (dir, cfg) = parse_url("log://./celery-data")?;
/// let store = LogStore::open(&dir, cfg)?;
/// let limits = ServerLimits { max_connections: 200, idle_timeout: Duration::from_secs(60), ..ServerLimits::default() };
/// let listener = tokio::net::TcpListener::bind("127.0.0.1:7575").await?;
/// serve_tcp_with(store, listener, Some("s3cret".into()), None, limits).await;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerLimits {
    /// Connections served at once (default 1024); one more is sent an `ERR` ("too many
    /// connections (limit N)") and closed, and the others keep working.
    pub max_connections: usize,
    /// How long a new connection has to send its `HELLO` (default 10 s).
    pub hello_timeout: Duration,
    /// How long a connection that holds nothing (no consumer, subscription, stream member,
    /// unsettled delivery or unanswered request) may send nothing before it is closed (default
    /// 5 min). The client reconnects on its next request.
    pub idle_timeout: Duration,
    /// Requests of one connection handled at once (default 256), waits aside; at the limit the
    /// server stops reading the connection until one is answered.
    pub max_in_flight: usize,
    /// `RESULT_WAIT` and `STREAM_POLL` requests of one connection waiting at once (default 4096);
    /// counted apart so that waits never hold up the connection's other requests.
    pub max_waits: usize,
    /// Bytes of request frames of one connection being handled at once (default 64 MiB; a larger
    /// frame is handled alone).
    pub request_bytes: usize,
    /// Bytes of answers and deliveries queued for one connection (default 8 MiB; a larger frame
    /// is queued alone). A client that does not read its answers stops being read from.
    pub reply_bytes: usize,
    /// Connections that have not sent their `HELLO` yet (TLS handshake included), at most
    /// (default 128): one more closes the oldest of them. Silent connections then hold at most
    /// this many of `max_connections`, and a client that greets at once is never locked out.
    pub max_pending: usize,
}

impl Default for ServerLimits {
    fn default() -> ServerLimits {
        ServerLimits {
            max_connections: 1024,
            hello_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(300),
            max_in_flight: 256,
            max_waits: 4096,
            request_bytes: 64 << 20,
            reply_bytes: 8 << 20,
            max_pending: 128,
        }
    }
}

/// The longest a `RESULT_WAIT` may wait (the client splits longer waits into 30 s requests).
const MAX_RESULT_WAIT: Duration = Duration::from_secs(300);
/// Consumers, subscriptions and stream members of one connection (a worker needs one or two).
const MAX_SUBSCRIPTIONS: usize = 1024;
/// How long a connection closed for idleness still reads (answering [`wire::NOT_HANDLED`]).
const CLOSING_GRACE: Duration = Duration::from_secs(1);
/// How long a closing connection's last answers (a refusal) may take to be written.
const REFUSAL_TIMEOUT: Duration = Duration::from_secs(5);

/// Takes `len` bytes from a byte budget (a semaphore of bytes), or the whole budget for a larger
/// frame (which then goes alone); they go back when the permit drops. None once the budget is
/// closed.
async fn take_bytes(budget: &Arc<Semaphore>, cap: usize, len: usize) -> Option<OwnedSemaphorePermit> {
    let n = len.clamp(1, cap.clamp(1, u32::MAX as usize)) as u32;
    budget.clone().acquire_many_owned(n).await.ok()
}

/// What a connection holds in replies, for tests and logs.
#[derive(Debug, Default)]
pub(crate) struct ConnStats {
    /// Bytes of reply frames built and not yet written (queued, or waiting for room).
    pub(crate) queued: AtomicUsize,
    /// The most `queued` has been.
    pub(crate) peak: AtomicUsize,
}

/// A reply frame on its way to the writer, counted in [`ConnStats`] from when it is built until
/// it is written, and holding its share of the queue's budget once it has room.
#[derive(Debug)]
struct Reply {
    frame: Vec<u8>,
    budget: Option<OwnedSemaphorePermit>,
    stats: Arc<ConnStats>,
}

impl Reply {
    fn new(frame: Vec<u8>, stats: &Arc<ConnStats>) -> Reply {
        let queued = stats.queued.fetch_add(frame.len(), Ordering::Relaxed) + frame.len();
        stats.peak.fetch_max(queued, Ordering::Relaxed);
        Reply { frame, budget: None, stats: stats.clone() }
    }
}

impl AsRef<[u8]> for Reply {
    fn as_ref(&self) -> &[u8] {
        &self.frame
    }
}

impl Drop for Reply {
    fn drop(&mut self) {
        self.stats.queued.fetch_sub(self.frame.len(), Ordering::Relaxed);
    }
}

/// The connection's replies and deliveries on their way to the writer, bounded in bytes: sending
/// waits while the queue is full, and fails once the writer is gone.
#[derive(Debug, Clone)]
struct Replies {
    tx: mpsc::UnboundedSender<Reply>,
    budget: Arc<Semaphore>,
    cap: usize,
    /// Taken to build a reply whose size the client controls (a stored document) and hold it
    /// until it has room: at most one such reply waits outside the queue.
    building: Arc<tokio::sync::Mutex<()>>,
    stats: Arc<ConnStats>,
}

/// The writer is gone (the connection is closing).
#[derive(Debug)]
struct Closed;

impl Replies {
    async fn send(&self, frame: Vec<u8>) -> Result<(), Closed> {
        let mut reply = Reply::new(frame, &self.stats);
        reply.budget = Some(take_bytes(&self.budget, self.cap, reply.frame.len()).await.ok_or(Closed)?);
        self.tx.send(reply).map_err(|_| Closed)
    }

    /// Builds a large reply only when it is its turn to wait for room, and sends it.
    async fn send_built(&self, build: impl FnOnce() -> Vec<u8>) -> Result<(), Closed> {
        let _turn = self.building.lock().await;
        self.send(build()).await
    }

    /// Queues a last frame without waiting for room (one small frame: a refusal).
    fn send_now(&self, frame: Vec<u8>) {
        let _ = self.tx.send(Reply::new(frame, &self.stats));
    }
}

#[derive(Debug, Default)]
struct Conn {
    held: Mutex<HashMap<u64, LogSettle>>,
    consumers: Mutex<HashMap<u64, tokio::task::JoinHandle<()>>>,
    /// Stream-group members joined over this connection, by the id of their `STREAM_JOIN`; they
    /// leave their groups when the connection closes.
    streams: Mutex<HashMap<u64, Arc<tokio::sync::Mutex<LocalStream>>>>,
    next_delivery: AtomicU64,
}

impl Conn {
    fn stream(&self, handle: u64) -> Result<Arc<tokio::sync::Mutex<LocalStream>>, String> {
        lock(&self.streams).get(&handle).cloned().ok_or_else(|| format!("unknown stream member {handle}"))
    }

    /// Refuses one more consumer, subscription or stream member past [`MAX_SUBSCRIPTIONS`].
    fn room_for_subscription(&self) -> Result<(), String> {
        let n = lock(&self.consumers).len() + lock(&self.streams).len();
        if n >= MAX_SUBSCRIPTIONS {
            return Err(format!(
                "too many consumers, subscriptions and stream members on one connection (limit {MAX_SUBSCRIPTIONS})"
            ));
        }
        Ok(())
    }

    /// Whether the connection holds something a silent client still needs: a consumer or
    /// subscription, a stream member, an unsettled delivery.
    fn holds_anything(&self) -> bool {
        !lock(&self.consumers).is_empty() || !lock(&self.streams).is_empty() || !lock(&self.held).is_empty()
    }
}

/// Compares a presented token with the expected one in time that depends only on their lengths
/// (no early exit at the first differing byte).
fn tokens_match(presented: &[u8], expected: &[u8]) -> bool {
    let diff = presented.iter().zip(expected).fold(0u8, |acc, (a, b)| acc | (a ^ b));
    let diff = std::hint::black_box(diff) as usize | (presented.len() ^ expected.len());
    diff == 0
}

/// Connections that have not greeted yet, oldest first: joining past the limit closes the oldest
/// (its [`Ticket`] resolves), so silent connections cannot hold every slot.
#[derive(Debug, Default)]
struct Pending {
    next: AtomicU64,
    waiting: Mutex<std::collections::VecDeque<(u64, oneshot::Sender<()>)>>,
}

impl Pending {
    fn join(self: &Arc<Self>, max: usize) -> Ticket {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        let mut waiting = lock(&self.waiting);
        while waiting.len() >= max.max(1) {
            // Dropping its sender wakes it: it closes.
            waiting.pop_front();
            tracing::warn!(limit = max, "log server: too many connections waiting for HELLO; closing the oldest");
        }
        waiting.push_back((id, tx));
        Ticket { pending: self.clone(), id, evicted: rx }
    }
}

/// A connection's place among those that have not greeted; it leaves when dropped.
#[derive(Debug)]
struct Ticket {
    pending: Arc<Pending>,
    id: u64,
    evicted: oneshot::Receiver<()>,
}

impl Ticket {
    /// Resolves when the connection was closed to make room for a newer one.
    async fn evicted(&mut self) {
        let _ = (&mut self.evicted).await;
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        lock(&self.pending.waiting).retain(|(id, _)| *id != self.id);
    }
}

/// Serves one connection until it closes. `token`: when set, the client's HELLO must carry it;
/// `stats` counts what the reply queue holds; `pass` (a served socket's): its place among the
/// connections that have not greeted (it is closed when a newer one needs the room first), and
/// the slots of which it takes one when it greets.
async fn serve_counted<S>(
    store: Arc<LogStore>,
    stream: S,
    token: Option<String>,
    limits: Arc<ServerLimits>,
    stats: Arc<ConnStats>,
    pass: Option<Pass>,
) where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (rd, wr) = tokio::io::split(stream);
    let mut rd = tokio::io::BufReader::with_capacity(wire::READ_BUFFER, rd);
    let (tx, rx) = mpsc::unbounded_channel::<Reply>();
    let budget = Arc::new(Semaphore::new(limits.reply_bytes.max(1)));
    let replies = Replies { tx, budget: budget.clone(), cap: limits.reply_bytes, building: Arc::default(), stats };
    let (close, closing) = oneshot::channel::<()>();
    let stall = limits.idle_timeout;
    let writer = tokio::spawn(async move {
        wire::write_frames(wr, rx, Some(stall), async move {
            let _ = closing.await;
        })
        .await;
        // Whatever still waits for room fails: nothing will be written any more.
        budget.close();
    });
    let conn = Arc::new(Conn::default());
    let in_flight = Arc::new(Semaphore::new(limits.max_in_flight.max(1)));
    let waits = Arc::new(Semaphore::new(limits.max_waits.max(1)));
    let requests = Arc::new(Semaphore::new(limits.request_bytes.max(1)));
    let answering = |conn: &Conn| {
        in_flight.available_permits() < limits.max_in_flight.max(1)
            || waits.available_permits() < limits.max_waits.max(1)
            || conn.holds_anything()
    };
    let broker = LogBroker::local(store.clone());
    let mut greeted = false;
    let mut refused = false;
    // Closing an idle connection: what still arrives is answered `NOT_HANDLED`.
    let mut closing = false;
    let mut deadline = Instant::now() + limits.hello_timeout;
    let (mut ticket, slots) = match pass {
        Some(p) => (Some(p.ticket), Some(p.slots)),
        None => (None, None),
    };
    // This connection's slot among `max_connections`, taken when it greets.
    let mut _slot = None;
    loop {
        let max = if greeted { wire::MAX_FRAME } else { wire::MAX_HELLO_FRAME };
        let read = wire::read_frame(&mut rd, max);
        tokio::pin!(read);
        // The read is never cancelled half-way: at the deadline the connection either closes or
        // keeps the same read going.
        let read = loop {
            tokio::select! {
                biased;
                r = &mut read => break Ok(r),
                _ = async { ticket.as_mut().expect("guarded").evicted().await }, if ticket.is_some() => {
                    break Err("too many connections waiting for HELLO; this was the oldest".to_string());
                }
                _ = tokio::time::sleep_until(deadline) => {
                    if !greeted {
                        break Err(format!("no HELLO within {:?}", limits.hello_timeout));
                    }
                    if closing {
                        break Ok(Ok(None));
                    }
                    if !answering(&conn) {
                        // Said first; then requests already on their way get a while to arrive and
                        // be told they were not handled (the client sends them again elsewhere).
                        let why = format!("closing the connection: idle for {:?}", limits.idle_timeout);
                        tracing::debug!(reason = %why, "log server: closing a connection");
                        replies.send_now(Enc::frame(kind::ERR, 0).str(&why).finish());
                        closing = true;
                        deadline = Instant::now() + CLOSING_GRACE;
                        continue;
                    }
                    deadline = Instant::now() + limits.idle_timeout;
                }
            }
        };
        let frame = match read {
            Ok(Ok(Some(f))) => f,
            Ok(Ok(None)) => break,
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::InvalidData => {
                tracing::warn!(error = %e, "log server: closing a connection");
                replies.send_now(Enc::frame(kind::ERR, 0).str(&e.to_string()).finish());
                refused = true;
                break;
            }
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "log server: connection failed");
                break;
            }
            Err(why) => {
                tracing::debug!(reason = %why, "log server: closing a connection");
                replies.send_now(Enc::frame(kind::ERR, 0).str(&format!("closing the connection: {why}")).finish());
                refused = true;
                break;
            }
        };
        if closing {
            if frame.kind != kind::ACK
                && replies.send(Enc::frame(kind::ERR, frame.id).str(wire::NOT_HANDLED).finish()).await.is_err()
            {
                break;
            }
            continue;
        }
        if greeted {
            deadline = Instant::now() + limits.idle_timeout;
        } else {
            let accepted = frame.kind == kind::HELLO
                && token
                    .as_deref()
                    .is_none_or(|t| Dec::new(&frame.body).bytes().is_ok_and(|got| tokens_match(got, t.as_bytes())));
            if !accepted {
                let why = match token {
                    Some(_) => "authentication failed: wrong or missing token",
                    None => "the first frame must be HELLO",
                };
                replies.send_now(Enc::frame(kind::ERR, frame.id).str(why).finish());
                refused = true;
                break;
            }
            if let Some(slots) = &slots {
                match slots.clone().try_acquire_owned() {
                    Ok(slot) => _slot = Some(slot),
                    Err(_) => {
                        tracing::warn!(
                            limit = limits.max_connections,
                            "log server: too many connections; refusing one"
                        );
                        let why = format!("too many connections (limit {})", limits.max_connections);
                        replies.send_now(Enc::frame(kind::ERR, 0).str(&why).finish());
                        refused = true;
                        break;
                    }
                }
            }
            greeted = true;
            ticket = None;
            deadline = Instant::now() + limits.idle_timeout;
            if replies.send(Enc::frame(kind::OK, frame.id).finish()).await.is_err() {
                break;
            }
            continue;
        }
        if frame.kind == kind::ACK {
            ack_all(&conn, &frame.body);
            continue;
        }
        if let Some(reply) = in_read_order(&conn, &frame) {
            if replies.send(reply).await.is_err() {
                break;
            }
            continue;
        }
        // At a limit the read loop waits here: the client's further requests stay in its socket.
        let slots = if matches!(frame.kind, kind::RESULT_WAIT | kind::STREAM_POLL) { &waits } else { &in_flight };
        let (Ok(slot), Some(bytes)) =
            (slots.clone().acquire_owned().await, take_bytes(&requests, limits.request_bytes, frame.body.len()).await)
        else {
            break;
        };
        let (store, broker, conn, replies) = (store.clone(), broker.clone(), conn.clone(), replies.clone());
        tokio::spawn(async move {
            let id = frame.id;
            let reply = match handle(&store, &broker, &conn, &replies, frame).await {
                Ok(Some(body)) => body,
                Ok(None) => return,
                Err(e) => Enc::frame(kind::ERR, id).str(&e).finish(),
            };
            drop(bytes);
            let _ = replies.send(reply).await;
            drop(slot);
        });
    }
    for (_, c) in lock(&conn.consumers).drain() {
        c.abort();
    }
    lock(&conn.streams).clear();
    let held: Vec<LogSettle> = lock(&conn.held).drain().map(|(_, s)| s).collect();
    if !held.is_empty() {
        tracing::warn!(deliveries = held.len(), "log server: client gone; returning its deliveries to their queues");
    }
    for s in held {
        let _ = s.requeue().await;
    }
    // The writer writes what is queued (a refusal) and shuts the stream; a peer that reads nothing
    // does not keep it.
    let _ = close.send(());
    let mut writer = writer;
    if tokio::time::timeout(REFUSAL_TIMEOUT, &mut writer).await.is_err() {
        writer.abort();
    }
    if refused || closing {
        drain(&mut rd).await;
    }
}

/// Applies an `ACK` frame (count:u32, delivery:u64*) in read order. It has no answer: what cannot
/// be acked (a malformed frame, wholly; a delivery this connection does not hold) is logged, and
/// the record stays leased until the connection closes, when it goes back to its queue.
fn ack_all(conn: &Conn, body: &[u8]) {
    let mut d = Dec::new(body);
    let ids = d.u32().and_then(|n| (0..n.min(1 << 20)).map(|_| d.u64()).collect::<std::io::Result<Vec<u64>>>());
    let ids = match ids {
        Ok(ids) => ids,
        Err(e) => return tracing::warn!(error = %e, "log server: malformed ACK frame ignored"),
    };
    for delivery in ids {
        match lock(&conn.held).remove(&delivery) {
            Some(s) => {
                if let Err(e) = s.ack_now() {
                    tracing::error!(error = %e, delivery, "log server: ack failed; the record will be delivered again");
                }
            }
            None => tracing::warn!(delivery, "log server: ack of a delivery this connection does not hold"),
        }
    }
}

fn unknown_delivery(delivery: u64) -> String {
    format!("unknown delivery {delivery} (already settled, or returned when a connection dropped)")
}

/// Requests answered in the read loop, in the order they arrive, so that the connection's next
/// request sees them done: stopping a consumer, leaving a stream group, and requeues (which never
/// wait; no task per settlement). A requeue after a stop is then never handed out again by the
/// stopped consumer. None for any other request.
fn in_read_order(conn: &Conn, frame: &wire::Frame) -> Option<Vec<u8>> {
    let mut d = Dec::new(&frame.body);
    let done = |r: Result<(), String>| match r {
        Ok(()) => Enc::frame(kind::OK, frame.id).finish(),
        Err(e) => Enc::frame(kind::ERR, frame.id).str(&e).finish(),
    };
    match frame.kind {
        kind::STOP_CONSUME => Some(done(d.u64().map_err(|e| e.to_string()).map(|consumer| {
            if let Some(t) = lock(&conn.consumers).remove(&consumer) {
                t.abort();
            }
        }))),
        kind::STREAM_LEAVE => Some(done(d.u64().map_err(|e| e.to_string()).map(|member| {
            lock(&conn.streams).remove(&member);
        }))),
        kind::SETTLE => {
            let (delivery, how) = (d.u64().ok()?, d.u8().ok()?);
            if how != settle::REQUEUE {
                return None;
            }
            let Some(s) = lock(&conn.held).remove(&delivery) else {
                return Some(done(Err(unknown_delivery(delivery))));
            };
            s.requeue_now();
            Some(done(Ok(())))
        }
        _ => None,
    }
}

async fn handle(
    store: &Arc<LogStore>,
    broker: &LogBroker,
    conn: &Arc<Conn>,
    replies: &Replies,
    frame: wire::Frame,
) -> Result<Option<Vec<u8>>, String> {
    let id = frame.id;
    let mut d = Dec::new(&frame.body);
    let e = |e: std::io::Error| e.to_string();
    let ok = || Enc::frame(kind::OK, id);
    Ok(Some(match frame.kind {
        kind::HELLO => ok().finish(),
        kind::PUBLISH => {
            let queue = d.str().map_err(e)?;
            let n = d.u32().map_err(e)? as usize;
            if n > wire::MAX_PUBLISH_RECORDS {
                return Err(format!("{n} records in one PUBLISH (at most {})", wire::MAX_PUBLISH_RECORDS));
            }
            // Each record takes at least 16 bytes of the frame.
            let mut records = Vec::with_capacity(n.min(frame.body.len() / 16));
            for _ in 0..n {
                let not_before_ms = d.i64().map_err(e)?;
                let key = d.bytes().map_err(e)?.to_vec();
                let payload = d.bytes().map_err(e)?.to_vec();
                records.push(super::NewRecord { not_before_ms, headers: Vec::new(), key, payload });
            }
            store.append(&queue, records).await.map_err(|e| e.to_string())?;
            ok().finish()
        }
        kind::CONSUME => {
            conn.room_for_subscription()?;
            let prefetch = d.u32().map_err(e)? as usize;
            let n = d.u32().map_err(e)? as usize;
            let queues = (0..n.min(1024)).map(|_| d.str()).collect::<Result<Vec<_>, _>>().map_err(e)?;
            let mut consumer = broker.local_consumer(&queues, prefetch).map_err(|e| e.to_string())?;
            let (conn2, tx2) = (conn.clone(), replies.clone());
            let task = tokio::spawn(async move {
                while let Some(s) = LogConsumer::next_raw(&mut consumer).await {
                    let delivery = conn2.next_delivery.fetch_add(1, Ordering::Relaxed);
                    let frame = Enc::frame(kind::DELIVERY, id)
                        .u64(delivery)
                        .str(&s.queue)
                        .u32(s.deliveries)
                        .bytes(&s.record.payload)
                        .finish();
                    lock(&conn2.held).insert(delivery, s);
                    if tx2.send(frame).await.is_err() {
                        break;
                    }
                }
            });
            lock(&conn.consumers).insert(id, task);
            ok().finish()
        }
        kind::SETTLE => {
            let delivery = d.u64().map_err(e)?;
            let how = d.u8().map_err(e)?;
            let not_before = d.i64().map_err(e)?;
            let data = d.bytes().map_err(e)?.to_vec();
            let s = lock(&conn.held).remove(&delivery).ok_or_else(|| unknown_delivery(delivery))?;
            // Requeues were answered by `in_read_order`, acks by `ack_all`.
            let r = match how {
                settle::DEAD_LETTER => s.dead_letter(&String::from_utf8_lossy(&data)).await,
                settle::DEFER => match super::payload::decode(&data).0 {
                    Ok(msg) => {
                        let until =
                            chrono::DateTime::from_timestamp_millis(not_before).unwrap_or_else(chrono::Utc::now);
                        s.defer(&msg, until).await
                    }
                    Err(err) => Err(celery_core::BrokerError::Protocol(err)),
                },
                other => return Err(format!("unknown settlement {other}")),
            };
            r.map_err(|e| e.to_string())?;
            ok().finish()
        }
        kind::PURGE => {
            let q = d.str().map_err(e)?;
            ok().u64(broker.purge(&q).await.map_err(|e| e.to_string())?).finish()
        }
        kind::PEEK => super::peek::answer(store, ok(), &mut d)?,
        kind::QUEUE_LEN => {
            let q = d.str().map_err(e)?;
            ok().u64(broker.queue_len(&q).await.map_err(|e| e.to_string())?).finish()
        }
        kind::DELAYED_LEN => {
            let q = d.str().map_err(e)?;
            ok().u64(broker.delayed_len(&q).await.map_err(|e| e.to_string())?).finish()
        }
        kind::RESULT_PUT => {
            let rid = d.str().map_err(e)?;
            let doc = d.bytes().map_err(e)?.to_vec();
            let ttl = Duration::from_millis(d.u64().map_err(e)?);
            let stored = store.put_result(&rid, doc, ttl, is_success).await.map_err(|e| e.to_string())?;
            ok().u8(stored as u8).finish()
        }
        kind::RESULT_GET | kind::RESULT_WAIT => {
            let rid = d.str().map_err(e)?;
            if frame.kind == kind::RESULT_WAIT {
                let timeout = Duration::from_millis(d.u64().map_err(e)?).min(MAX_RESULT_WAIT);
                // The document is fetched again below, in turn: many waits ending at once do not
                // each hold a copy while their answers wait for room.
                drop(store.wait_result(&rid, timeout, is_ready).await);
            }
            let _ = replies.send_built(|| ok().opt_bytes(store.get_result(&rid).as_deref()).finish()).await;
            return Ok(None);
        }
        kind::RESULT_FORGET => {
            let rid = d.str().map_err(e)?;
            store.forget_result(&rid).await.map_err(|e| e.to_string())?;
            ok().finish()
        }
        kind::LEASE => {
            let name = d.str().map_err(e)?;
            let holder = d.str().map_err(e)?;
            let ttl = Some(Duration::from_millis(d.u64().map_err(e)?)).filter(|t| !t.is_zero());
            let held = store.lease(&name, &holder, ttl).await.map_err(|e| e.to_string())?;
            ok().u64(held as u64).finish()
        }
        kind::BROADCAST => {
            let exchange = d.str().map_err(e)?;
            let routing_key = d.str().map_err(e)?;
            store.broadcast(&exchange, &routing_key, d.bytes().map_err(e)?).map_err(|e| e.to_string())?;
            ok().finish()
        }
        kind::SUBSCRIBE => {
            conn.room_for_subscription()?;
            let exchange = d.str().map_err(e)?;
            let pattern = d.str().map_err(e)?;
            let mut rx = store.subscribe(&exchange, &pattern).map_err(|e| e.to_string())?;
            let tx2 = replies.clone();
            let task = tokio::spawn(async move {
                while let Some(b) = rx.recv().await {
                    let frame =
                        Enc::frame(kind::DELIVERY, id).u64(0).str(&b.routing_key).u32(0).bytes(&b.body).finish();
                    if tx2.send(frame).await.is_err() {
                        break;
                    }
                }
            });
            lock(&conn.consumers).insert(id, task);
            ok().finish()
        }
        kind::CHORD => {
            let op = d.u8().map_err(e)?;
            let group = d.str().map_err(e)?;
            match op {
                wire::chord::SIZE => {
                    let size = d.u64().map_err(e)? as usize;
                    let ttl = Duration::from_millis(d.u64().map_err(e)?);
                    store.chord_size(&group, size, ttl).await.map_err(|e| e.to_string())?;
                    ok().finish()
                }
                wire::chord::PART => {
                    let member: celery_core::backend::ChordMember =
                        serde_json::from_slice(d.bytes().map_err(e)?).map_err(|e| e.to_string())?;
                    let ttl = Duration::from_millis(d.u64().map_err(e)?);
                    let all = store.chord_part(&group, member, ttl).await.map_err(|e| e.to_string())?;
                    let doc = all.map(|a| serde_json::to_vec(&a)).transpose().map_err(|e| e.to_string())?;
                    ok().opt_bytes(doc.as_deref()).finish()
                }
                wire::chord::DONE => {
                    store.chord_done(&group).await.map_err(|e| e.to_string())?;
                    ok().finish()
                }
                other => return Err(format!("unknown chord operation {other}")),
            }
        }
        kind::DECLARE => {
            let name = d.str().map_err(e)?;
            let k: celery_core::routing::ExchangeKind = d.str().map_err(e)?.parse()?;
            store.declare_exchange(&name, k).map_err(|e| e.to_string())?;
            ok().finish()
        }
        kind::BIND => {
            let b: celery_core::routing::Binding =
                serde_json::from_slice(d.bytes().map_err(e)?).map_err(|e| e.to_string())?;
            store.bind(&b).map_err(|e| e.to_string())?;
            ok().finish()
        }
        kind::ROUTE => {
            let exchange = d.str().map_err(e)?;
            let key = d.str().map_err(e)?;
            let headers: serde_json::Map<String, serde_json::Value> =
                serde_json::from_slice(d.bytes().map_err(e)?).map_err(|e| e.to_string())?;
            let queues = store.route(&exchange, &key, &headers).map_err(|e| e.to_string())?;
            let mut enc = ok().u32(queues.len() as u32);
            for q in &queues {
                enc = enc.str(q);
            }
            enc.finish()
        }
        kind::STREAM_JOIN => {
            conn.room_for_subscription()?;
            let group = d.str().map_err(e)?;
            let queue = d.str().map_err(e)?;
            let start = if d.u8().map_err(e)? == 0 { StartFrom::Earliest } else { StartFrom::Latest };
            let commit = if d.u8().map_err(e)? == 0 { Commit::AfterProcessing } else { Commit::BeforeProcessing };
            let member = LocalStream::join(store.clone(), &group, &queue, start, commit).map_err(|e| e.to_string())?;
            lock(&conn.streams).insert(id, Arc::new(tokio::sync::Mutex::new(member)));
            ok().u64(id).finish()
        }
        kind::STREAM_POLL => {
            let member = conn.stream(d.u64().map_err(e)?)?;
            let max = d.u32().map_err(e)? as usize;
            let timeout = Duration::from_millis(d.u64().map_err(e)?).min(Duration::from_secs(300));
            let records = member.lock().await.poll(max, wire::POLL_BYTES, timeout).await.map_err(|e| e.to_string())?;
            records.iter().fold(ok().u32(records.len() as u32), |enc, r| enc.stream_record(r)).finish()
        }
        kind::STREAM_COMMIT => {
            let member = conn.stream(d.u64().map_err(e)?)?;
            let guard = member.lock().await;
            guard.commit().map_err(|e| e.to_string())?;
            ok().finish()
        }
        kind::STREAM_ASSIGNMENT => {
            let assigned = conn.stream(d.u64().map_err(e)?)?.lock().await.assignment();
            assigned.iter().fold(ok().u32(assigned.len() as u32), |enc, p| enc.u32(*p as u32)).finish()
        }
        other => return Err(format!("unknown request kind {other}")),
    }))
}

/// A stored SUCCESS is never overwritten.
pub(crate) fn is_success(doc: &[u8]) -> bool {
    TaskMeta::from_slice(doc).is_ok_and(|m| m.status == TaskState::Success)
}

/// SUCCESS, FAILURE, REVOKED.
pub(crate) fn is_ready(doc: &[u8]) -> bool {
    TaskMeta::from_slice(doc).is_ok_and(|m| m.status.is_ready())
}

/// Which connections are served: a new connection waits for its `HELLO` among at most
/// `max_pending` others (one more closes the oldest waiting), and takes one of `max_connections`
/// slots when it greets; without a free slot it is told the limit and closed.
#[derive(Debug)]
struct Gate {
    pending: Arc<Pending>,
    slots: Arc<Semaphore>,
    limits: Arc<ServerLimits>,
}

impl Gate {
    fn new(limits: Arc<ServerLimits>) -> Gate {
        Gate { pending: Arc::default(), slots: Arc::new(Semaphore::new(limits.max_connections)), limits }
    }

    /// A new connection's pass: its place among those waiting to greet.
    fn enter(&self) -> Pass {
        Pass { ticket: self.pending.join(self.limits.max_pending), slots: self.slots.clone() }
    }
}

/// What a connection holds until it greets: its place among those waiting, and the slots to take
/// one of.
#[derive(Debug)]
struct Pass {
    ticket: Ticket,
    slots: Arc<Semaphore>,
}

/// Reads and drops what the peer still sends (at most 64 KiB, for at most a second) after a
/// refusal: a socket closed with unread input is reset, and a reset can discard the refusal
/// before the peer reads it.
async fn drain<R: AsyncRead + Unpin>(r: &mut R) {
    use tokio::io::AsyncReadExt;
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        let mut buf = [0u8; 4096];
        let mut total = 0;
        while total < (64 << 10) {
            match r.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => total += n,
            }
        }
    })
    .await;
}

/// Accepts connections on the directory's unix socket until the store is dropped, within the
/// default [`ServerLimits`].
pub(crate) async fn serve_unix(store: std::sync::Weak<LogStore>, listener: tokio::net::UnixListener) {
    let limits = Arc::new(ServerLimits::default());
    let gate = Gate::new(limits.clone());
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!(error = %e, "log server: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Some(s) = store.upgrade() else { return };
        let (limits, pass) = (limits.clone(), gate.enter());
        tokio::spawn(serve_counted(s, stream, None, limits, Arc::default(), Some(pass)));
    }
}

/// How long a TLS client may take to finish its handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Accepts TCP connections (`broker serve`): `log+tcp://`, or `log+tls://` when `tls` is given.
/// `token`: when set, every client must present it. The default [`ServerLimits`] apply; see
/// [`serve_tcp_with`] to set them.
pub async fn serve_tcp(
    store: Arc<LogStore>,
    listener: tokio::net::TcpListener,
    token: Option<String>,
    tls: Option<super::ServerTls>,
) {
    serve_tcp_with(store, listener, token, tls, ServerLimits::default()).await
}

/// [`serve_tcp`] within `limits`: connections over `limits.max_connections` are refused with an
/// `ERR` frame, and each connection's frames, requests, replies and silence are bounded.
pub async fn serve_tcp_with(
    store: Arc<LogStore>,
    listener: tokio::net::TcpListener,
    token: Option<String>,
    tls: Option<super::ServerTls>,
    limits: ServerLimits,
) {
    let limits = Arc::new(limits);
    let gate = Gate::new(limits.clone());
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!(error = %e, "log server: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        tracing::debug!(%peer, tls = tls.is_some(), "log server: connection");
        let acceptor = tls.as_ref().map(|t| t.acceptor.clone());
        let (store, token, limits) = (store.clone(), token.clone(), limits.clone());
        let mut pass = gate.enter();
        tokio::spawn(async move {
            let stats = Arc::default();
            match acceptor {
                None => serve_counted(store, stream, token, limits, stats, Some(pass)).await,
                Some(acceptor) => {
                    let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream));
                    let done = tokio::select! {
                        r = handshake => r,
                        _ = pass.ticket.evicted() => {
                            tracing::debug!(%peer, "log server: TLS handshake closed for a newer connection");
                            return;
                        }
                    };
                    match done {
                        Ok(Ok(stream)) => serve_counted(store, stream, token, limits, stats, Some(pass)).await,
                        Ok(Err(e)) => tracing::warn!(%peer, error = %e, "log server: TLS handshake failed"),
                        Err(_) => tracing::warn!(%peer, "log server: TLS handshake timed out"),
                    }
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::{partition::tests::tempdir, NewRecord, StoreConfig};
    use tokio::io::{AsyncWriteExt, ReadHalf, WriteHalf};

    type Client = (ReadHalf<tokio::io::DuplexStream>, WriteHalf<tokio::io::DuplexStream>);

    /// A connection to `store` over an in-memory pipe, within `limits`, with its reply counters.
    fn connect_with(store: &Arc<LogStore>, token: Option<&str>, limits: ServerLimits) -> (Client, Arc<ConnStats>) {
        let (client, server) = tokio::io::duplex(1 << 16);
        let stats = Arc::new(ConnStats::default());
        let token = token.map(str::to_owned);
        tokio::spawn(serve_counted(store.clone(), server, token, Arc::new(limits), stats.clone(), None));
        (tokio::io::split(client), stats)
    }

    async fn next(r: &mut (impl tokio::io::AsyncRead + Unpin)) -> Option<wire::Frame> {
        let got = tokio::time::timeout(Duration::from_secs(10), wire::read_frame(r, wire::MAX_FRAME)).await;
        got.expect("the server answered within 10 s").expect("a well-formed frame")
    }

    /// Sends `frame` and returns the next frame the server writes.
    async fn exchange(
        w: &mut (impl tokio::io::AsyncWrite + Unpin),
        r: &mut (impl tokio::io::AsyncRead + Unpin),
        frame: Vec<u8>,
    ) -> wire::Frame {
        w.write_all(&frame).await.unwrap();
        next(r).await.expect("an answer, not the end of the connection")
    }

    async fn hello(c: &mut Client, token: &str) -> wire::Frame {
        exchange(&mut c.1, &mut c.0, Enc::frame(kind::HELLO, 1).str(token).finish()).await
    }

    fn err_text(f: &wire::Frame) -> String {
        assert_eq!(f.kind, kind::ERR, "expected an ERR frame");
        Dec::new(&f.body).str().unwrap()
    }

    #[tokio::test]
    async fn acks_are_unanswered_applied_in_order_and_bad_ones_are_harmless() {
        let store = LogStore::open(&tempdir(), StoreConfig::default()).unwrap();
        let broker = LogBroker::local(store.clone());
        let rec = || NewRecord { payload: b"{}".to_vec(), ..NewRecord::default() };
        store.append("q", vec![rec(), rec()]).await.unwrap();

        let (mut c, _) = connect_with(&store, None, ServerLimits::default());
        assert_eq!(hello(&mut c, "").await.kind, kind::OK);
        let (r, w) = &mut c;
        let ok = exchange(w, r, Enc::frame(kind::CONSUME, 1).u32(2).u32(1).str("q").finish()).await;
        assert_eq!((ok.kind, ok.id), (kind::OK, 1));
        let mut deliveries = Vec::new();
        for _ in 0..2 {
            let f = next(r).await.unwrap();
            assert_eq!((f.kind, f.id), (kind::DELIVERY, 1));
            deliveries.push(Dec::new(&f.body).u64().unwrap());
        }
        // One real ack, one for a delivery never made, one truncated frame (ignored whole): none is
        // answered, and the connection's next request is.
        let acks = [
            Enc::frame(kind::ACK, 0).u32(1).u64(deliveries[0]).finish(),
            Enc::frame(kind::ACK, 0).u32(1).u64(999).finish(),
            Enc::frame(kind::ACK, 0).u32(2).u64(deliveries[1]).finish(),
        ]
        .concat();
        let len = exchange(w, r, [acks, Enc::frame(kind::QUEUE_LEN, 7).str("q").finish()].concat()).await;
        assert_eq!((len.kind, len.id), (kind::OK, 7), "the first answer is the queue length's");
        assert_eq!(Dec::new(&len.body).u64().unwrap(), 0, "both records are acked or leased");

        // The connection closes: the unacked delivery (the truncated frame's) comes back, the
        // acked one does not.
        drop(c);
        let deadline = Instant::now() + Duration::from_secs(10);
        while broker.queue_len("q").await.unwrap() == 0 {
            assert!(Instant::now() < deadline, "the unacked delivery did not come back");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(broker.queue_len("q").await.unwrap(), 1);
    }

    #[tokio::test]
    async fn oversized_frames_are_refused_from_their_length_word_and_the_connection_closes() {
        let store = LogStore::open(&tempdir(), StoreConfig::default()).unwrap();

        // Before HELLO: only the length word is sent. Were the server to allocate and read the
        // 5000 bytes it announces, it would wait for them and never answer.
        let (mut c, _) = connect_with(&store, Some("s3cret"), ServerLimits::default());
        c.1.write_all(&5000u32.to_le_bytes()).await.unwrap();
        let refusal = next(&mut c.0).await.expect("an ERR before the close");
        assert_eq!(refusal.id, 0);
        let msg = err_text(&refusal);
        assert!(msg.contains("a frame of 5000 bytes is over the limit of 4096 bytes"), "{msg}");
        assert!(next(&mut c.0).await.is_none(), "the connection is closed after the refusal");

        // After HELLO the limit is the protocol's.
        let (mut c, _) = connect_with(&store, Some("s3cret"), ServerLimits::default());
        assert_eq!(hello(&mut c, "s3cret").await.kind, kind::OK);
        let huge = (wire::MAX_FRAME as u32 + 1).to_le_bytes();
        let msg = err_text(&exchange(&mut c.1, &mut c.0, huge.to_vec()).await);
        assert!(msg.contains(&format!("over the limit of {} bytes", wire::MAX_FRAME)), "{msg}");
        assert!(next(&mut c.0).await.is_none());
    }

    #[tokio::test]
    async fn a_hello_must_come_first_and_carry_the_whole_token() {
        assert!(tokens_match(b"s3cret", b"s3cret"));
        assert!(!tokens_match(b"s3cre", b"s3cret"), "a prefix is not the token");
        assert!(!tokens_match(b"s3cretX", b"s3cret"));
        assert!(!tokens_match(b"s3creT", b"s3cret"));
        assert!(!tokens_match(b"", b"s3cret"));

        let store = LogStore::open(&tempdir(), StoreConfig::default()).unwrap();
        let (mut c, _) = connect_with(&store, Some("s3cret"), ServerLimits::default());
        assert!(err_text(&hello(&mut c, "s3cre").await).contains("authentication failed"));
        assert!(next(&mut c.0).await.is_none());
        let (mut c, _) = connect_with(&store, None, ServerLimits::default());
        let first = exchange(&mut c.1, &mut c.0, Enc::frame(kind::QUEUE_LEN, 3).str("q").finish()).await;
        assert!(err_text(&first).contains("the first frame must be HELLO"));
        assert!(next(&mut c.0).await.is_none());
    }

    #[tokio::test]
    async fn silent_connections_are_closed_but_waits_and_consumers_are_not_cut() {
        let store = LogStore::open(&tempdir(), StoreConfig::default()).unwrap();
        let limits = ServerLimits {
            hello_timeout: Duration::from_millis(200),
            idle_timeout: Duration::from_millis(300),
            ..ServerLimits::default()
        };

        // No HELLO: closed after the HELLO timeout, with the reason.
        let started = Instant::now();
        let (mut silent, _) = connect_with(&store, Some("s3cret"), limits.clone());
        let msg = err_text(&next(&mut silent.0).await.unwrap());
        assert!(msg.contains("no HELLO within 200ms"), "{msg}");
        assert!(next(&mut silent.0).await.is_none());
        assert!(started.elapsed() >= Duration::from_millis(200));

        // Greeted, then silent and holding nothing: closed after the idle timeout.
        let started = Instant::now();
        let (mut idle, _) = connect_with(&store, None, limits.clone());
        assert_eq!(hello(&mut idle, "").await.kind, kind::OK);
        let msg = err_text(&next(&mut idle.0).await.unwrap());
        assert!(msg.contains("idle for 300ms"), "{msg}");
        assert!(started.elapsed() >= Duration::from_millis(300));

        // A consumer that gets nothing is not idle; nor is a wait longer than the idle timeout.
        let (mut consuming, _) = connect_with(&store, None, limits.clone());
        assert_eq!(hello(&mut consuming, "").await.kind, kind::OK);
        let sub = Enc::frame(kind::CONSUME, 2).u32(1).u32(1).str("empty").finish();
        assert_eq!(exchange(&mut consuming.1, &mut consuming.0, sub).await.kind, kind::OK);
        let (mut waiting, _) = connect_with(&store, None, limits);
        assert_eq!(hello(&mut waiting, "").await.kind, kind::OK);
        let started = Instant::now();
        let wait = Enc::frame(kind::RESULT_WAIT, 2).str("no-such-task").u64(1200).finish();
        let answer = exchange(&mut waiting.1, &mut waiting.0, wait).await;
        assert_eq!((answer.kind, answer.id), (kind::OK, 2), "the wait ran to its timeout");
        assert!(started.elapsed() >= Duration::from_millis(1200));
        let len = Enc::frame(kind::QUEUE_LEN, 3).str("empty").finish();
        assert_eq!(
            exchange(&mut consuming.1, &mut consuming.0, len).await.kind,
            kind::OK,
            "the consumer's connection lives"
        );
    }

    #[tokio::test]
    async fn a_connection_over_the_limit_is_refused_and_the_others_keep_working() {
        let store = LogStore::open(&tempdir(), StoreConfig::default()).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let limits = ServerLimits { max_connections: 2, ..ServerLimits::default() };
        let server = tokio::spawn(serve_tcp_with(store, listener, Some("s3cret".into()), None, limits));
        let open = || async {
            let (mut r, mut w) = tokio::net::TcpStream::connect(addr).await.unwrap().into_split();
            let answer = exchange(&mut w, &mut r, Enc::frame(kind::HELLO, 1).str("s3cret").finish()).await;
            (r, w, answer)
        };
        let (mut r1, mut w1, a1) = open().await;
        let (r2, w2, a2) = open().await;
        assert_eq!((a1.kind, a2.kind), (kind::OK, kind::OK));

        let (mut r3, _w3, refused) = open().await;
        assert_eq!(refused.id, 0);
        assert_eq!(err_text(&refused), "too many connections (limit 2)");
        assert!(next(&mut r3).await.is_none(), "the refused connection is closed");

        let len = exchange(&mut w1, &mut r1, Enc::frame(kind::QUEUE_LEN, 2).str("q").finish()).await;
        assert_eq!((len.kind, len.id), (kind::OK, 2), "an admitted client keeps working");

        // A closed connection frees its slot.
        drop((r2, w2));
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let (_r, _w, answer) = open().await;
            if answer.kind == kind::OK {
                break;
            }
            assert!(Instant::now() < deadline, "the closed connection's slot was not freed");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        server.abort();
    }

    #[tokio::test]
    async fn silent_connections_cannot_lock_out_a_client_that_greets() {
        let store = LogStore::open(&tempdir(), StoreConfig::default()).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let limits = ServerLimits { max_connections: 8, max_pending: 3, ..ServerLimits::default() };
        let server = tokio::spawn(serve_tcp_with(store, listener, Some("s3cret".into()), None, limits));
        // Far more silent connections than the server serves: each new one closes the oldest.
        let mut silent = Vec::new();
        for _ in 0..20 {
            silent.push(tokio::net::TcpStream::connect(addr).await.unwrap().into_split());
        }
        let (mut r0, _w0) = silent.remove(0);
        let closed = next(&mut r0).await.expect("told why");
        assert!(err_text(&closed).contains("waiting for HELLO"), "{}", err_text(&closed));
        assert!(next(&mut r0).await.is_none(), "the oldest silent connection is closed");
        for _ in 0..3 {
            let (mut r, mut w) = tokio::net::TcpStream::connect(addr).await.unwrap().into_split();
            let answer = exchange(&mut w, &mut r, Enc::frame(kind::HELLO, 1).str("s3cret").finish()).await;
            assert_eq!(answer.kind, kind::OK, "a client that greets at once is served: {}", err_text(&answer));
            let len = exchange(&mut w, &mut r, Enc::frame(kind::QUEUE_LEN, 2).str("q").finish()).await;
            assert_eq!((len.kind, len.id), (kind::OK, 2));
            // Greeted: more silent connections do not close it.
            for _ in 0..5 {
                silent.push(tokio::net::TcpStream::connect(addr).await.unwrap().into_split());
            }
            let len = exchange(&mut w, &mut r, Enc::frame(kind::QUEUE_LEN, 3).str("q").finish()).await;
            assert_eq!((len.kind, len.id), (kind::OK, 3));
        }
        server.abort();
    }

    #[tokio::test]
    async fn a_client_that_does_not_read_does_not_grow_the_server_beyond_its_bounds() {
        let store = LogStore::open(&tempdir(), StoreConfig::default()).unwrap();
        let doc = vec![b'x'; 1 << 20];
        let id = "d".repeat(1000);
        store.put_result(&id, doc.clone(), Duration::from_secs(600), |_| false).await.unwrap();
        let limits = ServerLimits { reply_bytes: 4 << 20, max_in_flight: 16, ..ServerLimits::default() };
        let (mut c, stats) = connect_with(&store, None, limits);
        assert_eq!(hello(&mut c, "").await.kind, kind::OK);

        // 300 pipelined RESULT_GETs of a 1 MiB document: 300 MiB of answers if nothing held back.
        let (mut r, mut w) = c;
        let requests: Vec<u8> =
            (0..300u64).flat_map(|i| Enc::frame(kind::RESULT_GET, 10 + i).str(&id).finish()).collect();
        let sender = tokio::spawn(async move {
            w.write_all(&requests).await.unwrap();
            w
        });
        let frame = 1 << 20;
        let deadline = Instant::now() + Duration::from_secs(10);
        while stats.queued.load(Ordering::Relaxed) < (3 << 20) {
            assert!(Instant::now() < deadline, "the server queued no answers");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // Watch the full queue a while: it stays within its budget plus the one answer being built.
        let watch = Instant::now() + Duration::from_millis(300);
        while Instant::now() < watch {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let bound = (4 << 20) + 2 * (frame + 2048);
        assert!(stats.peak.load(Ordering::Relaxed) <= bound, "peak {} > {bound}", stats.peak.load(Ordering::Relaxed));
        assert!(!sender.is_finished(), "the server stopped reading the requests (336 KB of them)");

        // Reading resumes everything: every answer arrives, whole.
        for i in 0..300u64 {
            let f = next(&mut r).await.unwrap();
            assert_eq!((f.kind, f.id), (kind::OK, 10 + i));
            assert_eq!(Dec::new(&f.body).opt_bytes().unwrap().as_deref(), Some(&doc[..]));
        }
        let _w = sender.await.unwrap();
        assert!(stats.peak.load(Ordering::Relaxed) <= bound);
    }

    #[tokio::test]
    async fn waiter_entries_go_when_their_waits_end() {
        let store = LogStore::open(&tempdir(), StoreConfig::default()).unwrap();
        let waiters = || lock(&store.results).waiters.len();

        // Pipelined waits on ids that never get a result, each ending at its timeout.
        let (mut c, _) = connect_with(&store, None, ServerLimits::default());
        assert_eq!(hello(&mut c, "").await.kind, kind::OK);
        let waits: Vec<u8> = (0..100u64)
            .flat_map(|i| Enc::frame(kind::RESULT_WAIT, 10 + i).str(&format!("task-{i}")).u64(50).finish())
            .collect();
        c.1.write_all(&waits).await.unwrap();
        for _ in 0..100 {
            assert_eq!(next(&mut c.0).await.unwrap().kind, kind::OK);
        }
        assert_eq!(waiters(), 0, "timed-out waits left entries");

        // A cancelled wait; and two waits on one id, the entry staying while one still waits.
        let _ = tokio::time::timeout(
            Duration::from_millis(20),
            store.wait_result("gone", Duration::from_secs(60), is_ready),
        )
        .await;
        assert_eq!(waiters(), 0, "a cancelled wait left its entry");
        let a = tokio::spawn({
            let store = store.clone();
            async move { store.wait_result("t", Duration::from_secs(60), is_ready).await }
        });
        let b = tokio::spawn({
            let store = store.clone();
            async move { store.wait_result("t", Duration::from_secs(60), is_ready).await }
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        while lock(&store.results).waiters.get("t").map_or(0, Arc::strong_count) < 3 {
            assert!(Instant::now() < deadline, "the waits did not start");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        b.abort();
        let _ = b.await;
        assert_eq!(waiters(), 1, "one wait remains");

        // A stored result ends the last wait, and its entry goes.
        let done = br#"{"status":"SUCCESS","result":1,"task_id":"t"}"#.to_vec();
        store.put_result("t", done.clone(), Duration::from_secs(60), is_success).await.unwrap();
        assert_eq!(a.await.unwrap(), Some(done));
        assert_eq!(waiters(), 0);
    }

    #[tokio::test]
    async fn the_directory_socket_is_its_owners_only() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempdir();
        let store = LogStore::open(&dir, StoreConfig::default()).unwrap();
        store.serve_unix();
        let path = crate::log::socket_path(&dir);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "broker.sock is mode {:o}", mode & 0o777);
        let mut s = tokio::net::UnixStream::connect(&path).await.unwrap();
        s.write_all(&Enc::frame(kind::HELLO, 1).str("").finish()).await.unwrap();
        assert_eq!(next(&mut s).await.unwrap().kind, kind::OK, "the owner still connects");
    }

    #[tokio::test]
    async fn one_connection_holds_a_bounded_number_of_subscriptions() {
        let store = LogStore::open(&tempdir(), StoreConfig::default()).unwrap();
        let (mut c, _) = connect_with(&store, None, ServerLimits::default());
        assert_eq!(hello(&mut c, "").await.kind, kind::OK);
        let subs: Vec<u8> = (0..MAX_SUBSCRIPTIONS as u64 + 1)
            .flat_map(|i| Enc::frame(kind::SUBSCRIBE, 10 + i).str("ex").str("#").finish())
            .collect();
        c.1.write_all(&subs).await.unwrap();
        let mut refused = Vec::new();
        for _ in 0..=MAX_SUBSCRIPTIONS {
            let f = next(&mut c.0).await.unwrap();
            if f.kind == kind::ERR {
                refused.push(err_text(&f));
            }
        }
        assert_eq!(refused.len(), 1, "{refused:?}");
        assert!(refused[0].contains("(limit 1024)"), "{}", refused[0]);
    }

    #[tokio::test]
    async fn a_peer_that_reads_nothing_is_dropped_after_the_idle_timeout() {
        let store = LogStore::open(&tempdir(), StoreConfig::default()).unwrap();
        store.put_result("big", vec![b'x'; 1 << 20], Duration::from_secs(600), |_| false).await.unwrap();
        let limits = ServerLimits { idle_timeout: Duration::from_millis(300), ..ServerLimits::default() };
        let (mut c, stats) = connect_with(&store, None, limits);
        assert_eq!(hello(&mut c, "").await.kind, kind::OK);
        c.1.write_all(&Enc::frame(kind::RESULT_GET, 2).str("big").finish()).await.unwrap();
        // The answer (1 MiB) does not fit the 64 KiB pipe: the writer waits, then gives up and
        // lets go of what it held.
        let deadline = Instant::now() + Duration::from_secs(10);
        while stats.peak.load(Ordering::Relaxed) < (1 << 20) || stats.queued.load(Ordering::Relaxed) > 0 {
            assert!(Instant::now() < deadline, "the stalled answer was never dropped");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let cut = tokio::time::timeout(Duration::from_secs(10), wire::read_frame(&mut c.0, wire::MAX_FRAME)).await;
        assert!(cut.unwrap().is_err(), "the answer was cut off with the connection");
    }

    #[tokio::test]
    async fn requests_arriving_as_an_idle_connection_closes_are_answered_not_handled() {
        let store = LogStore::open(&tempdir(), StoreConfig::default()).unwrap();
        let limits = ServerLimits { idle_timeout: Duration::from_millis(200), ..ServerLimits::default() };
        let (mut c, _) = connect_with(&store, None, limits);
        assert_eq!(hello(&mut c, "").await.kind, kind::OK);
        let notice = next(&mut c.0).await.unwrap();
        assert_eq!(notice.id, 0);
        assert!(err_text(&notice).contains("idle for 200ms"));
        // A request the client sent before it read the notice.
        let late = exchange(&mut c.1, &mut c.0, Enc::frame(kind::PURGE, 5).str("q").finish()).await;
        assert_eq!((late.kind, late.id), (kind::ERR, 5));
        assert_eq!(err_text(&late), wire::NOT_HANDLED);
        assert!(next(&mut c.0).await.is_none(), "closed after the grace");
    }
}

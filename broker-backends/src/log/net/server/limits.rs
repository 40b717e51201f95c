//! What one client can make the server hold, and for how long: [`ServerLimits`] (set by `broker
//! serve`), the fixed bounds beside them, the byte budgets requests and answers are counted in, and
//! the admission of new connections (at most `max_pending` waiting for their `HELLO`, at most
//! `max_connections` greeted).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use celery_core::sync::lock;
use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};

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
pub(super) const MAX_RESULT_WAIT: Duration = Duration::from_secs(300);
/// Consumers, subscriptions and stream members of one connection (a worker needs one or two).
pub(super) const MAX_SUBSCRIPTIONS: usize = 1024;
/// How long a connection closed for idleness still reads (answering [`wire::NOT_HANDLED`]).
pub(super) const CLOSING_GRACE: Duration = Duration::from_secs(1);
/// How long a closing connection's last answers (a refusal) may take to be written.
pub(super) const REFUSAL_TIMEOUT: Duration = Duration::from_secs(5);

/// Takes `len` bytes from a byte budget (a semaphore of bytes), or the whole budget for a larger
/// frame (which then goes alone); they go back when the permit drops. None once the budget is
/// closed.
pub(super) async fn take_bytes(budget: &Arc<Semaphore>, cap: usize, len: usize) -> Option<OwnedSemaphorePermit> {
    let n = len.clamp(1, cap.clamp(1, u32::MAX as usize)) as u32;
    budget.clone().acquire_many_owned(n).await.ok()
}

/// Connections that have not greeted yet, oldest first: joining past the limit closes the oldest
/// (its [`Ticket`] resolves), so silent connections cannot hold every slot.
#[derive(Debug, Default)]
pub(super) struct Pending {
    next: AtomicU64,
    waiting: Mutex<VecDeque<(u64, oneshot::Sender<()>)>>,
}

impl Pending {
    pub(super) fn join(self: &Arc<Self>, max: usize) -> Ticket {
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
pub(super) struct Ticket {
    pending: Arc<Pending>,
    id: u64,
    evicted: oneshot::Receiver<()>,
}

impl Ticket {
    /// Resolves when the connection was closed to make room for a newer one.
    pub(super) async fn evicted(&mut self) {
        let _ = (&mut self.evicted).await;
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        lock(&self.pending.waiting).retain(|(id, _)| *id != self.id);
    }
}

/// Which connections are served: a new connection waits for its `HELLO` among at most
/// `max_pending` others (one more closes the oldest waiting), and takes one of `max_connections`
/// slots when it greets; without a free slot it is told the limit and closed.
#[derive(Debug)]
pub(super) struct Gate {
    pending: Arc<Pending>,
    slots: Arc<Semaphore>,
    limits: Arc<ServerLimits>,
}

impl Gate {
    pub(super) fn new(limits: Arc<ServerLimits>) -> Gate {
        Gate { pending: Arc::default(), slots: Arc::new(Semaphore::new(limits.max_connections)), limits }
    }

    /// A new connection's pass: its place among those waiting to greet.
    pub(super) fn enter(&self) -> Pass {
        Pass { ticket: self.pending.join(self.limits.max_pending), slots: self.slots.clone() }
    }
}

/// What a connection holds until it greets: its place among those waiting, and the slots to take
/// one of.
#[derive(Debug)]
pub(super) struct Pass {
    pub(super) ticket: Ticket,
    pub(super) slots: Arc<Semaphore>,
}

/// How long a TLS client may take to finish its handshake.
pub(super) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

//! The state of one connection: what it holds (consumers and subscriptions, stream members,
//! unsettled deliveries) and its replies on their way to the writer, bounded in bytes.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use celery_core::sync::lock;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

use super::limits::{take_bytes, MAX_SUBSCRIPTIONS};
use crate::log::storage::consumer::LogSettle;
use crate::log::storage::stream::LocalStream;

/// What a connection holds in replies, for tests and logs.
#[derive(Debug, Default)]
pub(super) struct ConnStats {
    /// Bytes of reply frames built and not yet written (queued, or waiting for room).
    pub(super) queued: AtomicUsize,
    /// The most `queued` has been.
    pub(super) peak: AtomicUsize,
}

/// A reply frame on its way to the writer, counted in [`ConnStats`] from when it is built until
/// it is written, and holding its share of the queue's budget once it has room.
#[derive(Debug)]
pub(super) struct Reply {
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
pub(super) struct Replies {
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
pub(super) struct Closed;

impl Replies {
    /// The reply queue of a connection: replies go to its writer through `tx`, each holding its
    /// bytes of `budget` (`cap` bytes in all) until written.
    pub(super) fn new(
        tx: mpsc::UnboundedSender<Reply>,
        budget: Arc<Semaphore>,
        cap: usize,
        stats: Arc<ConnStats>,
    ) -> Replies {
        Replies { tx, budget, cap, building: Arc::default(), stats }
    }

    pub(super) async fn send(&self, frame: Vec<u8>) -> Result<(), Closed> {
        let mut reply = Reply::new(frame, &self.stats);
        reply.budget = Some(take_bytes(&self.budget, self.cap, reply.frame.len()).await.ok_or(Closed)?);
        self.tx.send(reply).map_err(|_| Closed)
    }

    /// Builds a large reply only when it is its turn to wait for room, and sends it.
    pub(super) async fn send_built(&self, build: impl FnOnce() -> Vec<u8>) -> Result<(), Closed> {
        let _turn = self.building.lock().await;
        self.send(build()).await
    }

    /// Queues a last frame without waiting for room (one small frame: a refusal).
    pub(super) fn send_now(&self, frame: Vec<u8>) {
        let _ = self.tx.send(Reply::new(frame, &self.stats));
    }
}

/// What one connection holds: its unsettled deliveries, consumers and subscriptions, stream members.
#[derive(Debug, Default)]
pub(super) struct Conn {
    pub(super) held: Mutex<HashMap<u64, LogSettle>>,
    pub(super) consumers: Mutex<HashMap<u64, tokio::task::JoinHandle<()>>>,
    /// Stream-group members joined over this connection, by the id of their `STREAM_JOIN`; they
    /// leave their groups when the connection closes.
    pub(super) streams: Mutex<HashMap<u64, Arc<tokio::sync::Mutex<LocalStream>>>>,
    pub(super) next_delivery: AtomicU64,
}

impl Conn {
    pub(super) fn stream(&self, handle: u64) -> Result<Arc<tokio::sync::Mutex<LocalStream>>, String> {
        lock(&self.streams).get(&handle).cloned().ok_or_else(|| format!("unknown stream member {handle}"))
    }

    /// Refuses one more consumer, subscription or stream member past [`MAX_SUBSCRIPTIONS`].
    pub(super) fn room_for_subscription(&self) -> Result<(), String> {
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
    pub(super) fn holds_anything(&self) -> bool {
        !lock(&self.consumers).is_empty() || !lock(&self.streams).is_empty() || !lock(&self.held).is_empty()
    }
}

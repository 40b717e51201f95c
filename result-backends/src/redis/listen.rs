//! Waking the waiters of the Redis result backend: one subscriber connection (PUB/SUB on the
//! tasks' `celery-task-meta-<id>` channels, where each stored state is published), a watch per
//! waited-for key, and a resubscribe after a reconnect, which also wakes every waiter to read its
//! key again (what was published meanwhile is not missed).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use broker_backends::redis::RedisConn;
use celery_core::backoff::Reconnect;
use celery_core::sync::lock;
use futures::StreamExt;
use redis::aio::PubSubSink;
use tokio::sync::watch;

/// What wakes a key's waiters: the state published on its channel, or none when they must read
/// the key (after a reconnect).
#[derive(Debug, Default)]
pub(super) struct Wake {
    pub(super) published: Option<Arc<[u8]>>,
}

/// Per key: how many wait on it, and the watch that wakes them.
type Waiters = HashMap<String, (usize, watch::Sender<Wake>)>;

/// The keys waited for, and the subscriber connection's sink while it is up.
#[derive(Debug, Default)]
pub(super) struct Subscriptions {
    waiters: Mutex<Waiters>,
    sink: Mutex<Option<PubSubSink>>,
}

impl Subscriptions {
    fn sink(&self) -> Option<PubSubSink> {
        lock(&self.sink).clone()
    }

    /// Registers a waiter on `key` (subscribing to it for the first one): the watch changes
    /// whenever the key's state may have.
    pub(super) async fn register(&self, key: &str) -> watch::Receiver<Wake> {
        let (rx, new) = {
            let mut w = lock(&self.waiters);
            match w.get_mut(key) {
                Some((n, tx)) => {
                    *n += 1;
                    (tx.subscribe(), false)
                }
                None => {
                    let (tx, rx) = watch::channel(Wake::default());
                    w.insert(key.to_owned(), (1, tx));
                    (rx, true)
                }
            }
        };
        if new {
            if let Some(mut sink) = self.sink() {
                if let Err(e) = sink.subscribe(key).await {
                    tracing::debug!(error = %e, "redis results: subscribe failed; polling");
                }
            }
        }
        rx
    }

    /// Drops a waiter on `key`; after the last one, unsubscribes on a task of its own (the waiter
    /// has its state and does not wait for the reply). A key waited for again before that is left
    /// subscribed.
    pub(super) fn unregister(self: &Arc<Self>, key: &str) {
        let last = {
            let mut w = lock(&self.waiters);
            match w.get_mut(key) {
                Some((n, _)) if *n > 1 => {
                    *n -= 1;
                    false
                }
                Some(_) => {
                    w.remove(key);
                    true
                }
                None => false,
            }
        };
        let Some(mut sink) = self.sink().filter(|_| last) else { return };
        let Ok(rt) = tokio::runtime::Handle::try_current() else { return };
        let (subs, key) = (self.clone(), key.to_owned());
        rt.spawn(async move {
            if !lock(&subs.waiters).contains_key(&key) {
                // Bounded: a stalled subscriber connection does not keep these tasks for good.
                let _ = tokio::time::timeout(UNSUBSCRIBE_WAIT, sink.unsubscribe(&key)).await;
            }
        });
    }
}

/// How long an unsubscribe waits for its reply.
const UNSUBSCRIBE_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// A waiter's registration, dropped when its wait ends however it ends (also when the caller
/// drops the wait midway): unregisters it.
pub(super) struct Registered<'a> {
    subs: &'a Arc<Subscriptions>,
    key: &'a str,
}

impl<'a> Registered<'a> {
    pub(super) fn new(subs: &'a Arc<Subscriptions>, key: &'a str) -> Registered<'a> {
        Registered { subs, key }
    }
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        self.subs.unregister(self.key);
    }
}

/// The subscriber task, ended when dropped.
#[derive(Debug)]
pub(super) struct Listener(tokio::task::JoinHandle<()>);

impl Listener {
    /// Starts keeping `subs`' subscriber connection to `conn`'s master.
    pub(super) fn start(conn: RedisConn, subs: Arc<Subscriptions>) -> Listener {
        Listener(tokio::spawn(listen(conn, subs)))
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Keeps one subscriber connection on the current master, wakes waiters, and resubscribes after a
/// reconnect (a lost connection first asks the sentinels again, [`RedisConn::recheck`]).
async fn listen(conn: RedisConn, subs: Arc<Subscriptions>) {
    let mut backoff = Reconnect::default();
    loop {
        let pubsub = match conn.client().get_async_pubsub().await {
            Ok(p) => p,
            Err(e) => {
                conn.recheck(conn.generation()).await;
                backoff.pause("redis results subscriber", &e).await;
                continue;
            }
        };
        backoff.reset();
        let (mut sink, mut stream) = pubsub.split();
        let keys: Vec<String> = lock(&subs.waiters).keys().cloned().collect();
        for k in &keys {
            let _ = sink.subscribe(k).await;
        }
        *lock(&subs.sink) = Some(sink);
        // Wake every waiter so each re-reads its key after a (re)connect.
        for (_, tx) in lock(&subs.waiters).values() {
            tx.send_modify(|w| w.published = None);
        }
        while let Some(msg) = stream.next().await {
            // Copied before the lock that every waiter takes.
            let published: Arc<[u8]> = Arc::from(msg.get_payload_bytes());
            let w = lock(&subs.waiters);
            if let Some((_, tx)) = w.get(msg.get_channel_name()) {
                tx.send_modify(|w| w.published = Some(published));
            }
        }
        *lock(&subs.sink) = None;
        tracing::warn!("redis results: subscriber connection lost; reconnecting");
        conn.recheck(conn.generation()).await;
    }
}

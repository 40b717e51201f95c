//! The consumer shell the leasing brokers share (Redis, PostgreSQL): a background fetcher fills a
//! bounded buffer of deliveries, a task of its own sends the acknowledgements in batches, and the
//! consumer itself only hands deliveries out, stops, and closes. A broker supplies what differs:
//! how to lease up to `n` messages and how to wait when its queues are drained (`Fetch`), the
//! statement that acknowledges a batch (`AckBatcher::run`), and its own background loops (lease
//! renewal, the restore sweep, ...).
//!
//! Invariants:
//! - A delivery holds one prefetch slot (`Slots`) from its fetch until it is settled. The fetcher
//!   takes slots before it fetches (one, waiting for it; then as many as are free, up to
//!   `Fetch::MAX_FETCH`) and gives back what the fetch did not use, so a consumer never holds more
//!   than `prefetch` unsettled deliveries.
//! - A failed fetch is retried after [`Reconnect::pause`] (a stop cuts the pause short); the first
//!   success after failures is logged and counted (`celery_broker_reconnects_total`).
//! - [`Consumer::close`] stops the fetcher and waits for it, then waits (at most `FLUSH_TIMEOUT`, 30 s)
//!   until every ack queued so far is sent, then ends the background tasks. Dropping the consumer
//!   ends every task at once.

use std::future::Future;
use std::time::Duration;

use async_trait::async_trait;
use celery_core::backoff::Reconnect;
use celery_core::{BrokerError, Consumer, Delivery};
use tokio::sync::{mpsc, oneshot, watch, Semaphore};
use tokio::task::JoinHandle;

/// The longest [`Consumer::close`] waits for the acks queued before it to be sent.
pub(crate) const FLUSH_TIMEOUT: Duration = Duration::from_secs(30);

/// The prefetch window: one slot per delivery a consumer may hold unsettled.
#[derive(Debug)]
pub(crate) struct Slots(Semaphore);

impl Slots {
    /// A window of `prefetch` slots.
    pub(crate) fn new(prefetch: usize) -> Slots {
        Slots(Semaphore::new(prefetch))
    }

    /// Waits for a free slot, then takes as many more as are free, `max` in all; `None` once
    /// `stop` says so.
    async fn take(&self, max: usize, stop: &mut watch::Receiver<bool>) -> Option<usize> {
        if *stop.borrow() {
            return None;
        }
        let first = tokio::select! {
            p = self.0.acquire() => p.ok()?,
            _ = stop.changed() => return None,
        };
        first.forget();
        let mut n = 1;
        while n < max {
            match self.0.try_acquire() {
                Ok(p) => {
                    p.forget();
                    n += 1;
                }
                Err(_) => break,
            }
        }
        Some(n)
    }

    /// Takes as many free slots as there are, `max` at most, without waiting.
    pub(crate) fn try_take(&self, max: usize) -> usize {
        let n = self.0.available_permits().min(max);
        match u32::try_from(n).map(|k| self.0.try_acquire_many(k)) {
            Ok(Ok(p)) => {
                p.forget();
                n
            }
            // Only the fetcher takes slots: what was available still is (unless past a u32).
            _ => 0,
        }
    }

    /// Gives back `n` slots (a settled delivery gives back its one).
    pub(crate) fn give_back(&self, n: usize) {
        self.0.add_permits(n);
    }
}

/// What one fetch did.
#[derive(Debug)]
pub(crate) enum Fetched {
    /// `taken` deliveries were sent, each holding a slot; `drained` when the queues had no more
    /// ready (the fetcher then waits in [`Fetch::idle`]).
    Sent {
        /// Deliveries sent that hold a slot.
        taken: usize,
        /// Nothing more is ready.
        drained: bool,
    },
    /// The fetch failed, after sending `taken` deliveries that hold a slot.
    Failed {
        /// Deliveries sent that hold a slot.
        taken: usize,
        /// Why it failed.
        error: BrokerError,
    },
    /// Nobody receives deliveries any more: the fetcher ends.
    Closed,
}

/// The broker-specific part of a fetcher.
pub(crate) trait Fetch: Send + 'static {
    /// The broker's name in logs and in the reconnect counter (`redis`, `postgres`).
    const BROKER: &'static str;
    /// The most slots (and so messages) one fetch takes.
    const MAX_FETCH: usize;

    /// The consumer's prefetch window (shared with its settlers, which give slots back).
    fn slots(&self) -> &Slots;

    /// Leases up to `n` messages and sends their deliveries to `tx`.
    fn fetch(&mut self, n: usize, tx: &mpsc::Sender<Delivery>) -> impl Future<Output = Fetched> + Send;

    /// Waits while the queues are drained: until woken, or until a timer says to look again.
    fn idle(&mut self) -> impl Future<Output = ()> + Send;
}

/// Fetches until stopped: takes slots, fetches, gives back the unused slots, and after a failure
/// pauses before the next attempt.
async fn fetch_loop<F: Fetch>(mut engine: F, tx: mpsc::Sender<Delivery>, mut stop: watch::Receiver<bool>) {
    let mut backoff = Reconnect::default();
    while let Some(n) = engine.slots().take(F::MAX_FETCH, &mut stop).await {
        let (taken, outcome) = match engine.fetch(n, &tx).await {
            Fetched::Sent { taken, drained } => (taken, Ok(drained)),
            Fetched::Failed { taken, error } => (taken, Err(error)),
            Fetched::Closed => return,
        };
        engine.slots().give_back(n.saturating_sub(taken));
        match outcome {
            Err(e) => {
                let what = format!("{} fetch", F::BROKER);
                tokio::select! {
                    _ = backoff.pause(&what, &e) => {}
                    _ = stop.changed() => return,
                }
            }
            Ok(drained) => {
                if backoff.attempts() > 0 {
                    tracing::info!(broker = F::BROKER, "connection restored; consuming again");
                    crate::reconnected(F::BROKER);
                }
                backoff.reset();
                if drained {
                    tokio::select! {
                        _ = engine.idle() => {}
                        _ = stop.changed() => return,
                    }
                }
            }
        }
    }
}

enum AckCmd<T> {
    Ack(T),
    Flush(oneshot::Sender<()>),
}

/// The sending side of a consumer's batched acknowledgements (cheap to clone).
pub(crate) struct AckQueue<T> {
    tx: mpsc::UnboundedSender<AckCmd<T>>,
}

impl<T> Clone for AckQueue<T> {
    fn clone(&self) -> Self {
        AckQueue { tx: self.tx.clone() }
    }
}

impl<T> std::fmt::Debug for AckQueue<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AckQueue")
    }
}

/// The task side of an [`AckQueue`]: see [`AckBatcher::run`].
pub(crate) struct AckBatcher<T> {
    rx: mpsc::UnboundedReceiver<AckCmd<T>>,
}

/// A new queue of acknowledgements and the batcher that sends them.
pub(crate) fn ack_queue<T>() -> (AckQueue<T>, AckBatcher<T>) {
    let (tx, rx) = mpsc::unbounded_channel();
    (AckQueue { tx }, AckBatcher { rx })
}

impl<T> AckQueue<T> {
    /// Queues the acknowledgement of `tag`; it is sent with the next batch.
    pub(crate) fn ack(&self, tag: T) -> Result<(), BrokerError> {
        self.tx.send(AckCmd::Ack(tag)).map_err(|_| BrokerError::operation("consumer is closed"))
    }

    /// Waits, at most `timeout`, until every ack queued before is sent (or given up).
    async fn flush(&self, timeout: Duration) {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(AckCmd::Flush(tx)).is_ok() {
            let _ = tokio::time::timeout(timeout, rx).await;
        }
    }
}

impl<T> AckBatcher<T> {
    /// Sends the queued acks with `send`, each time all that are waiting (at most `max_batch`),
    /// until every [`AckQueue`] is gone. A failure for which `retry` holds is retried after a
    /// [`Reconnect::pause`]; another gives the batch up (its leases expire and the messages come
    /// back). `broker` names the broker in logs.
    pub(crate) async fn run<F, Fut>(
        mut self,
        broker: &'static str,
        max_batch: usize,
        retry: fn(&BrokerError) -> bool,
        mut send: F,
    ) where
        F: FnMut(&[T]) -> Fut,
        Fut: Future<Output = Result<(), BrokerError>>,
    {
        let mut backoff = Reconnect::default();
        let (mut tags, mut flushes) = (Vec::new(), Vec::new());
        while let Some(first) = self.rx.recv().await {
            let mut next = Some(first);
            while let Some(cmd) = next.take() {
                match cmd {
                    AckCmd::Ack(t) => tags.push(t),
                    AckCmd::Flush(f) => flushes.push(f),
                }
                if tags.len() >= max_batch {
                    break;
                }
                next = self.rx.try_recv().ok();
            }
            while !tags.is_empty() {
                match send(&tags).await {
                    Ok(()) => {
                        backoff.reset();
                        break;
                    }
                    Err(e) if retry(&e) => {
                        backoff.pause(&format!("{broker} ack of {} deliveries", tags.len()), &e).await;
                    }
                    Err(e) => {
                        tracing::error!(broker, error = %e, dropped = tags.len(), "ack failed; the leases will expire");
                        break;
                    }
                }
            }
            tags.clear();
            for f in flushes.drain(..) {
                let _ = f.send(());
            }
        }
    }
}

/// A consumer of a leasing broker (see the [module docs](self)): a background fetcher fills a
/// buffer of at most `prefetch` deliveries, which [`Consumer::next`] hands out.
pub struct FetchingConsumer<T> {
    rx: mpsc::Receiver<Delivery>,
    acks: AckQueue<T>,
    stop: watch::Sender<bool>,
    fetcher: Option<JoinHandle<()>>,
    background: Vec<JoinHandle<()>>,
}

impl<T> std::fmt::Debug for FetchingConsumer<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FetchingConsumer")
            .field("buffered", &self.rx.len())
            .field("stopped", &*self.stop.borrow())
            .finish_non_exhaustive()
    }
}

impl<T: Send + 'static> FetchingConsumer<T> {
    /// Starts `fetch` with a buffer of `prefetch` deliveries; `acks` is the queue the settlers
    /// send to (flushed by `close`), `background` the broker's own tasks (ended by `close`).
    pub(crate) fn spawn<F: Fetch>(
        prefetch: usize,
        fetch: F,
        acks: AckQueue<T>,
        background: Vec<JoinHandle<()>>,
    ) -> FetchingConsumer<T> {
        let (stop, stop_rx) = watch::channel(false);
        let (tx, rx) = mpsc::channel(prefetch.max(1));
        let fetcher = tokio::spawn(fetch_loop(fetch, tx, stop_rx));
        FetchingConsumer { rx, acks, stop, fetcher: Some(fetcher), background }
    }
}

impl<T> Drop for FetchingConsumer<T> {
    fn drop(&mut self) {
        if let Some(f) = &self.fetcher {
            f.abort();
        }
        for t in &self.background {
            t.abort();
        }
    }
}

#[async_trait]
impl<T: Send + 'static> Consumer for FetchingConsumer<T> {
    async fn next(&mut self) -> Option<Delivery> {
        self.rx.recv().await
    }

    fn stop(&mut self) {
        let _ = self.stop.send(true);
    }

    async fn close(&mut self) {
        let _ = self.stop.send(true);
        if let Some(f) = self.fetcher.take() {
            let _ = f.await;
        }
        self.acks.flush(FLUSH_TIMEOUT).await;
        for t in self.background.drain(..) {
            t.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn try_take_takes_what_is_free_without_waiting() {
        let slots = super::Slots::new(5);
        assert_eq!(slots.try_take(3), 3);
        assert_eq!(slots.try_take(10), 2, "only what is left");
        assert_eq!(slots.try_take(1), 0, "none free: none, at once");
        slots.give_back(4);
        assert_eq!(slots.try_take(usize::MAX), 4);
        assert_eq!(slots.try_take(0), 0);
    }

    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};

    use celery_core::broker::Settled;

    /// A fetch that hands out numbered deliveries from a shared pile, failing when told.
    struct Pile {
        slots: Arc<Slots>,
        left: Arc<AtomicUsize>,
        failures: Arc<AtomicUsize>,
        asked: Arc<Mutex<Vec<usize>>>,
    }

    impl Fetch for Pile {
        const BROKER: &'static str = "test";
        const MAX_FETCH: usize = 3;

        fn slots(&self) -> &Slots {
            &self.slots
        }

        async fn fetch(&mut self, n: usize, tx: &mpsc::Sender<Delivery>) -> Fetched {
            self.asked.lock().unwrap().push(n);
            if self.failures.load(Ordering::SeqCst) > 0 {
                self.failures.fetch_sub(1, Ordering::SeqCst);
                return Fetched::Failed { taken: 0, error: BrokerError::connection("gone") };
            }
            let take = n.min(self.left.load(Ordering::SeqCst));
            self.left.fetch_sub(take, Ordering::SeqCst);
            for _ in 0..take {
                let d = Delivery::new(
                    Err(celery_core::ProtocolError::MissingField("t")),
                    "q".into(),
                    false,
                    Box::new(Settled),
                );
                if tx.send(d).await.is_err() {
                    return Fetched::Closed;
                }
            }
            Fetched::Sent { taken: take, drained: take < n }
        }

        async fn idle(&mut self) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    fn pile(left: usize, failures: usize) -> (Pile, Arc<Slots>, Arc<Mutex<Vec<usize>>>) {
        let slots = Arc::new(Slots::new(2));
        let asked = Arc::new(Mutex::new(Vec::new()));
        let p = Pile {
            slots: slots.clone(),
            left: Arc::new(AtomicUsize::new(left)),
            failures: Arc::new(AtomicUsize::new(failures)),
            asked: asked.clone(),
        };
        (p, slots, asked)
    }

    #[tokio::test]
    async fn the_fetcher_never_holds_more_than_the_prefetch_window() {
        let (p, slots, asked) = pile(5, 0);
        let (acks, _) = ack_queue::<u32>();
        let mut c = FetchingConsumer::spawn(2, p, acks, Vec::new());
        let a = tokio::time::timeout(Duration::from_secs(5), c.next()).await.unwrap();
        let b = tokio::time::timeout(Duration::from_secs(5), c.next()).await.unwrap();
        assert!(a.is_some() && b.is_some());
        // Both slots are held: no third delivery until one is given back.
        assert!(tokio::time::timeout(Duration::from_millis(50), c.next()).await.is_err());
        slots.give_back(1);
        assert!(tokio::time::timeout(Duration::from_secs(5), c.next()).await.unwrap().is_some());
        assert!(asked.lock().unwrap().iter().all(|&n| n <= 2), "{asked:?}");
        c.close().await;
    }

    #[tokio::test]
    async fn a_failed_fetch_gives_its_slots_back_and_is_retried() {
        let (p, _slots, asked) = pile(1, 2);
        let (acks, _) = ack_queue::<u32>();
        let mut c = FetchingConsumer::spawn(2, p, acks, Vec::new());
        let d = tokio::time::timeout(Duration::from_secs(10), c.next()).await.unwrap();
        assert!(d.is_some());
        // Every attempt could take both slots again: the failed ones gave theirs back.
        assert_eq!(asked.lock().unwrap()[..3], [2, 2, 2]);
        c.stop();
        c.close().await;
    }

    #[tokio::test]
    async fn close_waits_for_the_acks_queued_before_it() {
        let (p, _slots, _asked) = pile(0, 0);
        let (acks, batcher) = ack_queue::<u32>();
        let sent = Arc::new(Mutex::new(Vec::new()));
        let (seen, fails) = (sent.clone(), Arc::new(AtomicUsize::new(1)));
        let task = tokio::spawn(batcher.run("test", 2, BrokerError::is_retryable, move |tags: &[u32]| {
            let (seen, fails, tags) = (seen.clone(), fails.clone(), tags.to_vec());
            async move {
                if fails.swap(0, Ordering::SeqCst) == 1 {
                    return Err(BrokerError::connection("lost"));
                }
                seen.lock().unwrap().push(tags);
                Ok(())
            }
        }));
        let mut c = FetchingConsumer::spawn(2, p, acks.clone(), vec![task]);
        for t in 1..=3 {
            acks.ack(t).unwrap();
        }
        c.close().await;
        let sent: Vec<u32> = sent.lock().unwrap().concat();
        assert_eq!(sent, [1, 2, 3], "retried after the failure, in batches of at most 2");
    }

    #[tokio::test]
    async fn an_ack_failure_not_worth_retrying_gives_the_batch_up() {
        let (acks, batcher) = ack_queue::<u32>();
        let calls = Arc::new(AtomicUsize::new(0));
        let counted = calls.clone();
        let task = tokio::spawn(batcher.run("test", 10, BrokerError::is_retryable, move |_: &[u32]| {
            counted.fetch_add(1, Ordering::SeqCst);
            async { Err(BrokerError::operation("refused")) }
        }));
        acks.ack(1).unwrap();
        acks.flush(Duration::from_secs(5)).await;
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        task.abort();
    }
}

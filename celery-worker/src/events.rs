//! Celery's events: JSON documents broadcast on the `celeryev` exchange with routing keys like
//! `task.succeeded`, so Celery's own tools (`celery events`, Flower) understand them.
//!
//! Every worker sends `worker-online`, `worker-heartbeat` (every 2 s by default) and
//! `worker-offline` (flushed before [`Worker::run_until`](crate::Worker::run_until) returns), as
//! Celery's do without `-E`. A worker started with `-E`
//! ([`WorkerConfig::events`](crate::WorkerConfig::events)), or told `enable_events` by remote
//! control, also sends for each task `task-received`, `task-started`, then `task-succeeded`,
//! `task-failed`, `task-retried` or `task-revoked` (`task-failed` also for a message rejected as
//! bad input). Events are best effort: sent in the background,
//! dropped (and counted) when the broker cannot keep up, never slowing a task down; task events
//! that queue up while the sender waits on the broker go together in one broadcast (Celery's
//! `task.multi` list, see [`EventDispatcher`]), so under a burst it keeps up. Their `clock`
//! is the worker's Lamport clock ([`LamportClock`]), the one `inspect clock` reports.
//!
//! ```no_run
//! # async fn demo(app: celery_core::App) -> Result<(), Box<dyn std::error::Error>> {
//! // What `mybin events` does: print every event.
//! let mut events = celery_worker::events::subscribe(&app).await?;
//! while let Some(event) = events.next().await {
//!     println!("{} {}", event["type"], event["uuid"]);
//! }
//! # Ok(()) }
//! ```

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use celery_core::broker::Subscription;
use celery_core::{App, BrokerError};
use serde_json::{json, Value};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

use celery_core::event::{exchange, TASK_BATCH_ROUTING_KEY};
use celery_core::protocol::Message;
use celery_core::routing::Exchange;

/// A Lamport clock, as Kombu's `LamportClock`: every event sent moves it forward by one, and a
/// message received from another node carrying its clock moves it past that (`adjust`), so that
/// events from many nodes can be ordered. One per worker: its events, its remote-control replies
/// and `inspect clock` read the same clock.
///
/// ```
/// let clock = celery_worker::events::LamportClock::default();
/// assert_eq!(clock.forward(), 1);
/// assert_eq!(clock.adjust(41), 42);
/// assert_eq!(clock.adjust(3), 43);
/// assert_eq!(clock.value(), 43);
/// ```
#[derive(Debug, Default)]
pub struct LamportClock(AtomicU64);

impl LamportClock {
    /// The current value.
    pub fn value(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }

    /// Moves the clock one step (a local event); returns the new value.
    pub fn forward(&self) -> u64 {
        self.0.fetch_add(1, Ordering::Relaxed).saturating_add(1)
    }

    /// Takes in another node's clock `other`: the clock becomes `max(self, other) + 1`; returns it.
    pub fn adjust(&self, other: u64) -> u64 {
        let mut cur = self.0.load(Ordering::Relaxed);
        loop {
            let next = cur.max(other).saturating_add(1);
            match self.0.compare_exchange_weak(cur, next, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return next,
                Err(seen) => cur = seen,
            }
        }
    }
}

/// What the background sender is handed.
#[derive(Debug)]
enum Outgoing {
    Event(Value),
    /// Answered once every event queued before it was handed to the broker.
    Flush(oneshot::Sender<()>),
}

/// Events queued for the background sender at most; more are dropped (and counted).
const QUEUED: usize = 10_000;
/// The most task events one broadcast carries.
const BATCH_EVENTS: usize = 500;
/// The most bytes of task events one broadcast carries (an event larger than this goes alone).
const BATCH_BYTES: usize = 256 << 10;
/// Attempts to hand one broadcast to the broker before its events are given up (lost, counted).
const ATTEMPTS: u32 = 3;

/// What became of the events of one dispatcher.
#[derive(Debug, Default)]
struct Counts {
    sent: AtomicU64,
    broadcasts: AtomicU64,
    dropped: AtomicU64,
    lost: AtomicU64,
}

/// Sends events from one worker (cheap to clone).
///
/// [`send`](EventDispatcher::send) only queues (at most 10,000; beyond that an event is dropped and
/// counted, so a task never waits for the broker). One background task hands them to the broker
/// in order: whatever task events queued up while it sent the last ones go together in one
/// broadcast (a JSON list with the routing key `task.multi`, as Celery's dispatcher sends a
/// buffered group; at most 500 events or 256 KiB), so under a burst it needs one round trip for
/// hundreds of events and keeps up, while a lone event still goes alone, as before. A broadcast
/// the broker refuses is tried three times before its events are counted lost.
#[derive(Debug, Clone)]
pub struct EventDispatcher {
    tx: mpsc::Sender<Outgoing>,
    hostname: Arc<str>,
    clock: Arc<LamportClock>,
    counts: Arc<Counts>,
}

impl EventDispatcher {
    /// Starts the background sender for `hostname`'s events, with a clock of its own.
    pub fn start(app: App, hostname: &str) -> EventDispatcher {
        EventDispatcher::with_clock(app, hostname, Arc::default())
    }

    /// Starts the background sender for `hostname`'s events, stamping them with `clock`.
    pub fn with_clock(app: App, hostname: &str, clock: Arc<LamportClock>) -> EventDispatcher {
        let (tx, rx) = mpsc::channel::<Outgoing>(QUEUED);
        let counts = Arc::new(Counts::default());
        tokio::spawn(send_queued(app, hostname.to_owned(), rx, counts.clone()));
        EventDispatcher { tx, hostname: hostname.into(), clock, counts }
    }

    /// Sends an event of `kind` (`task-succeeded`) with `fields`, adding the common fields
    /// (`hostname`, `timestamp`, `utcoffset`, `pid`, `clock`).
    pub fn send(&self, kind: &str, fields: Value) {
        let clock = self.clock.forward();
        let event = celery_core::event::event(kind, &self.hostname, clock, fields);
        if self.tx.try_send(Outgoing::Event(event)).is_err() && self.counts.dropped.fetch_add(1, Ordering::Relaxed) == 0
        {
            tracing::warn!(
                "events: the sender fell behind the broker; events are dropped (counted) rather than slow tasks"
            );
        }
    }

    /// Waits (at most `timeout`) until every event sent before this call was handed to the broker:
    /// a worker calls it before it returns, so its `worker-offline` is not lost. False on timeout.
    pub async fn flush(&self, timeout: Duration) -> bool {
        let (done, flushed) = oneshot::channel();
        let queued = async { self.tx.send(Outgoing::Flush(done)).await.is_ok() && flushed.await.is_ok() };
        tokio::time::timeout(timeout, queued).await.unwrap_or(false)
    }

    /// Events dropped because the sender fell behind.
    pub fn dropped(&self) -> u64 {
        self.counts.dropped.load(Ordering::Relaxed)
    }

    /// Events handed to the broker.
    pub fn sent(&self) -> u64 {
        self.counts.sent.load(Ordering::Relaxed)
    }

    /// Broadcasts that carried them (fewer than the events when task events went in batches).
    pub fn broadcasts(&self) -> u64 {
        self.counts.broadcasts.load(Ordering::Relaxed)
    }

    /// Events whose broadcast the broker refused (three times, or once for good).
    pub fn lost(&self) -> u64 {
        self.counts.lost.load(Ordering::Relaxed)
    }
}

/// What the sender took from the queue, the event encoded for the broker.
enum Taken {
    Event { routing_key: String, body: Vec<u8>, task: bool },
    Flush(oneshot::Sender<()>),
}

impl Taken {
    fn of(out: Outgoing) -> Taken {
        match out {
            Outgoing::Event(e) => {
                let routing_key = celery_core::event::routing_key(&e);
                let task = routing_key.starts_with("task.");
                Taken::Event { routing_key, body: serde_json::to_vec(&e).unwrap_or_default(), task }
            }
            Outgoing::Flush(done) => Taken::Flush(done),
        }
    }
}

/// The background sender: hands the queued events to the broker in order, the task events that
/// queued up meanwhile together in one broadcast.
async fn send_queued(app: App, hostname: String, mut rx: mpsc::Receiver<Outgoing>, counts: Arc<Counts>) {
    let exchange = exchange();
    // What was taken from the queue but belongs after the batch being sent.
    let mut next: Option<Taken> = None;
    loop {
        let first = match next.take() {
            Some(t) => t,
            None => match rx.recv().await {
                Some(out) => Taken::of(out),
                None => return,
            },
        };
        let (routing_key, body) = match first {
            Taken::Flush(done) => {
                let _ = done.send(());
                continue;
            }
            Taken::Event { routing_key, body, task: false } => {
                let msg = celery_core::event::encoded_message(&hostname, body);
                broadcast(&app, &exchange, &routing_key, &msg, 1, &counts).await;
                continue;
            }
            Taken::Event { routing_key, body, task: true } => (routing_key, body),
        };
        let mut bytes = body.len();
        let mut batch = vec![body];
        while batch.len() < BATCH_EVENTS && bytes < BATCH_BYTES {
            let Ok(out) = rx.try_recv() else { break };
            match Taken::of(out) {
                Taken::Event { body, task: true, .. } if bytes + body.len() <= BATCH_BYTES => {
                    bytes += body.len();
                    batch.push(body);
                }
                other => {
                    next = Some(other);
                    break;
                }
            }
        }
        let n = batch.len() as u64;
        let (key, msg) = if n == 1 {
            (routing_key.as_str(), celery_core::event::encoded_message(&hostname, batch.pop().unwrap_or_default()))
        } else {
            (TASK_BATCH_ROUTING_KEY, celery_core::event::batch_message(&hostname, &batch))
        };
        broadcast(&app, &exchange, key, &msg, n, &counts).await;
    }
}

/// Hands one broadcast of `events` events to the broker, trying [`ATTEMPTS`] times.
async fn broadcast(app: &App, exchange: &Exchange, key: &str, msg: &Message, events: u64, counts: &Counts) {
    let mut pause = Duration::from_millis(50);
    for attempt in 1..=ATTEMPTS {
        match async { app.broker().require_broadcasts("events")?.broadcast(exchange, key, msg).await }.await {
            Ok(()) => {
                counts.sent.fetch_add(events, Ordering::Relaxed);
                counts.broadcasts.fetch_add(1, Ordering::Relaxed);
                return;
            }
            Err(e) if attempt < ATTEMPTS && e.is_retryable() => {
                tracing::debug!(error = %e, attempt, "events: the broker refused a broadcast; trying again");
                tokio::time::sleep(pause).await;
                pause *= 4;
            }
            Err(e) => {
                counts.lost.fetch_add(events, Ordering::Relaxed);
                tracing::warn!(error = %e, events, "events: the broker refused a broadcast; its events are lost");
                return;
            }
        }
    }
}

/// The events of every worker from now on, as JSON documents.
#[derive(Debug)]
pub struct EventStream {
    sub: Box<dyn Subscription>,
    /// Events of a batch not handed out yet.
    batch: std::collections::VecDeque<Value>,
}

/// The most events taken from one broadcast (Python workers send task events in batches).
const MAX_BATCH: usize = 10_000;

/// The events one broadcast holds: one event document, or a list of them (Python Celery's workers
/// group task events into lists); anything else holds none.
fn events_in(body: &[u8]) -> Vec<Value> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Array(list)) => list.into_iter().filter(|v| v.get("type").is_some()).take(MAX_BATCH).collect(),
        Ok(v) if v.get("type").is_some() => vec![v],
        _ => Vec::new(),
    }
}

impl EventStream {
    /// The next event (broadcasts that hold none are skipped); `None` when the subscription ended.
    pub async fn next(&mut self) -> Option<Value> {
        loop {
            if let Some(v) = self.batch.pop_front() {
                return Some(v);
            }
            let b = self.sub.next().await?;
            self.batch.extend(events_in(&b.body));
            if self.batch.is_empty() {
                tracing::debug!(routing_key = %b.routing_key, "events: skipping a broadcast that is not an event");
            }
        }
    }
}

/// Subscribes to every event on `app`'s broker.
pub async fn subscribe(app: &App) -> Result<EventStream, BrokerError> {
    Ok(EventStream {
        sub: app.broker().require_broadcasts("events")?.subscribe(&exchange(), "#").await?,
        batch: Default::default(),
    })
}

/// The fields of a worker event.
pub(crate) fn worker_fields(freq: f64, active: usize, processed: u64) -> Value {
    json!({
        "freq": freq,
        "sw_ident": "celery-rs",
        "sw_ver": env!("CARGO_PKG_VERSION"),
        "sw_sys": std::env::consts::OS,
        "active": active,
        "processed": processed,
        "loadavg": loadavg(),
    })
}

/// The 1, 5 and 15 minute load averages where the OS tells (Linux), else zeros.
fn loadavg() -> Value {
    let avg = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|s| s.split_whitespace().take(3).map(|x| x.parse::<f64>().unwrap_or(0.0)).collect::<Vec<_>>());
    json!(avg.unwrap_or_else(|| vec![0.0, 0.0, 0.0]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_events_and_python_batches_are_read() {
        let one = json!({"type": "worker-heartbeat", "hostname": "a"});
        assert_eq!(events_in(one.to_string().as_bytes()), vec![one]);
        let batch = json!([
            {"type": "task-received", "uuid": "1"},
            {"type": "task-started", "uuid": "1"},
            {"not": "an event"},
            {"type": "task-succeeded", "uuid": "1"}
        ]);
        let got = events_in(batch.to_string().as_bytes());
        let types: Vec<_> = got.iter().map(|e| e["type"].as_str().unwrap()).collect();
        assert_eq!(types, ["task-received", "task-started", "task-succeeded"]);
        assert!(events_in(b"[1, 2]").is_empty() && events_in(b"not json").is_empty());
    }

    #[tokio::test]
    async fn a_burst_of_task_events_goes_in_batches_and_a_lone_event_alone() {
        let dir = std::env::temp_dir().join(format!("events-{}", uuid::Uuid::new_v4().simple()));
        let url = format!("log://{}", dir.display());
        let app = crate::connect(&url, &url).await.unwrap();
        let broadcasts = app.broker().require_broadcasts("events").unwrap();
        let mut sub = broadcasts.subscribe(&exchange(), "#").await.unwrap();
        let events = EventDispatcher::start(app.clone(), "w1@test");
        let n = 3000;
        for i in 0..n {
            events.send("task-received", json!({"uuid": i.to_string()}));
        }
        events.send("worker-heartbeat", json!({}));
        assert!(events.flush(Duration::from_secs(30)).await);
        let (mut seen, mut keys) = (Vec::new(), Vec::new());
        while seen.len() < n + 1 {
            let b = tokio::time::timeout(Duration::from_secs(10), sub.next()).await.unwrap().unwrap();
            seen.extend(events_in(&b.body));
            keys.push(b.routing_key);
        }
        let ids: Vec<&str> = seen[..n].iter().map(|e| e["uuid"].as_str().unwrap()).collect();
        assert!(ids.iter().enumerate().all(|(i, id)| *id == i.to_string()), "in order, each once");
        assert_eq!(seen[n]["type"], "worker-heartbeat", "after the task events");
        assert_eq!(keys.last().map(String::as_str), Some("worker.heartbeat"), "a worker event goes alone");
        assert!(keys.iter().any(|k| k == TASK_BATCH_ROUTING_KEY));
        assert_eq!((events.sent(), events.dropped(), events.lost()), (n as u64 + 1, 0, 0));
        assert!(events.broadcasts() < n as u64 / 10, "{} broadcasts for {n} events", events.broadcasts());
        // Alone, an event goes as a document with its own routing key (what Celery's tools expect).
        events.send("task-started", json!({"uuid": "x"}));
        let b = tokio::time::timeout(Duration::from_secs(10), sub.next()).await.unwrap().unwrap();
        assert_eq!(b.routing_key, "task.started");
        let alone: Value = serde_json::from_slice(&b.body).unwrap();
        assert_eq!((alone["type"].as_str(), alone["hostname"].as_str()), (Some("task-started"), Some("w1@test")));
        drop((sub, app));
        std::fs::remove_dir_all(dir).ok();
    }

    #[tokio::test]
    async fn a_batch_broadcast_on_the_built_in_broker_arrives_as_its_events() {
        let dir = std::env::temp_dir().join(format!("events-{}", uuid::Uuid::new_v4().simple()));
        let url = format!("log://{}", dir.display());
        let app = crate::connect(&url, &url).await.unwrap();
        let mut events = subscribe(&app).await.unwrap();
        let batch = json!([{"type": "task-received", "uuid": "7"}, {"type": "task-succeeded", "uuid": "7"}]);
        let msg = celery_core::event::message(&batch);
        app.broker().require_broadcasts("events").unwrap().broadcast(&exchange(), "task.multi", &msg).await.unwrap();
        for want in ["task-received", "task-succeeded"] {
            let got = tokio::time::timeout(std::time::Duration::from_secs(10), events.next()).await.unwrap().unwrap();
            assert_eq!((got["type"].as_str(), got["uuid"].as_str()), (Some(want), Some("7")));
        }
        drop((events, app));
        std::fs::remove_dir_all(dir).ok();
    }
}

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
//! dropped (and counted) when the broker cannot keep up, never slowing a task down. Their `clock`
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

use celery_core::event::exchange;

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

/// Sends events from one worker (cheap to clone).
#[derive(Debug, Clone)]
pub struct EventDispatcher {
    tx: mpsc::Sender<Outgoing>,
    hostname: Arc<str>,
    clock: Arc<LamportClock>,
    dropped: Arc<AtomicU64>,
}

impl EventDispatcher {
    /// Starts the background sender for `hostname`'s events, with a clock of its own.
    pub fn start(app: App, hostname: &str) -> EventDispatcher {
        EventDispatcher::with_clock(app, hostname, Arc::default())
    }

    /// Starts the background sender for `hostname`'s events, stamping them with `clock`.
    pub fn with_clock(app: App, hostname: &str, clock: Arc<LamportClock>) -> EventDispatcher {
        let (tx, mut rx) = mpsc::channel::<Outgoing>(10_000);
        tokio::spawn(async move {
            let exchange = exchange();
            while let Some(out) = rx.recv().await {
                let event = match out {
                    Outgoing::Event(e) => e,
                    Outgoing::Flush(done) => {
                        let _ = done.send(());
                        continue;
                    }
                };
                let msg = celery_core::event::message(&event);
                let key = celery_core::event::routing_key(&event);
                if let Err(e) =
                    async { app.broker().require_broadcasts("events")?.broadcast(&exchange, &key, &msg).await }.await
                {
                    tracing::debug!(error = %e, "events: cannot send an event");
                }
            }
        });
        EventDispatcher { tx, hostname: hostname.into(), clock, dropped: Arc::default() }
    }

    /// Sends an event of `kind` (`task-succeeded`) with `fields`, adding the common fields
    /// (`hostname`, `timestamp`, `utcoffset`, `pid`, `clock`).
    pub fn send(&self, kind: &str, fields: Value) {
        let clock = self.clock.forward();
        let event = celery_core::event::event(kind, &self.hostname, clock, fields);
        if self.tx.try_send(Outgoing::Event(event)).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
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
        self.dropped.load(Ordering::Relaxed)
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

//! What a running worker shares between its consume loop, its tasks and remote control.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use celery_core::App;
use tokio::sync::watch;

use super::intake::Intake;
use super::pool::{Autoscaler, Pool};
use super::rate_limit::RateLimits;
use super::requests::Requests;
use super::{WorkerConfig, WorkerStats};
use crate::events::{EventDispatcher, LamportClock};

/// A running worker's state; one per [`super::Worker::run_until`], behind an `Arc`.
pub(crate) struct Shared {
    pub(crate) app: App,
    pub(crate) config: WorkerConfig,
    /// The concurrency limit (resized by `pool_grow`, `pool_shrink` and the autoscaler).
    pub(crate) pool: Pool,
    pub(crate) autoscaler: Option<Autoscaler>,
    /// Queues, consumer and reserved deliveries.
    pub(crate) intake: Arc<Intake>,
    pub(super) limits: RateLimits,
    /// The key slots held by running tasks (renewed by one loop).
    pub(super) held_slots: Arc<super::key_slots::HeldSlots>,
    /// The task states waiting for the next batched store.
    pub(super) stores: Arc<super::stores::StoreQueue>,
    /// Whether task states go in batches: the backend stores several in one call and stores are
    /// not traced (each is a span of its own then); decided at start.
    pub(super) batch_stores: bool,
    pub(crate) stats: Arc<WorkerStats>,
    /// Set when the worker stops fetching (waiting tasks give up their wait).
    pub(super) shutdown: watch::Receiver<bool>,
    /// Set when the grace period is over (running tasks are abandoned).
    pub(super) hard_stop: watch::Receiver<bool>,
    pub(crate) events: EventDispatcher,
    /// Task events on (`-E`, `enable_events`).
    pub(crate) task_events: AtomicBool,
    /// The worker's Lamport clock (events, control replies, `inspect clock`).
    pub(crate) clock: Arc<LamportClock>,
    /// Revoked ids (remote control).
    pub(crate) revoked: crate::control::Revoked,
    /// Revoked stamps (`revoke_by_stamped_headers`).
    pub(crate) revoked_stamps: crate::control::RevokedStamps,
    /// What this worker holds: running, waiting and deferred requests.
    pub(crate) requests: Requests,
    /// Rate limits set by `control rate_limit` (none: unlimited), overriding the tasks' own.
    pub(crate) rate_overrides: Mutex<HashMap<String, Option<Duration>>>,
    /// The tasks whose `control rate_limit` override is cluster-wide (`--cluster`).
    pub(crate) cluster_rates: Mutex<std::collections::HashSet<String>>,
    /// Time limits set by `control time_limit` (soft, hard), overriding the tasks' own.
    pub(crate) time_limits: Mutex<HashMap<&'static str, TimeLimits>>,
    /// Tasks started, by name (`inspect stats` `total`).
    pub(crate) totals: Mutex<HashMap<&'static str, u64>>,
    /// Set by `control shutdown`.
    pub(crate) remote_stop: watch::Sender<bool>,
    /// When the worker started.
    pub(crate) started: Instant,
}

/// A task's time limits in seconds as `control time_limit` sets them (`None`: no limit).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(crate) struct TimeLimits {
    pub(crate) soft: Option<f64>,
    pub(crate) hard: Option<f64>,
}

impl Shared {
    /// Sends a task event when task events are on; its fields are built only then.
    pub(super) fn event(&self, kind: &str, fields: impl FnOnce() -> serde_json::Value) {
        if self.task_events.load(Ordering::Relaxed) {
            self.events.send(kind, fields());
        }
    }

    /// `worker-online`, `worker-heartbeat` and `worker-offline` (sent with or without task events).
    pub(crate) fn worker_event(&self, kind: &str) {
        let active = self.stats.active.load(Ordering::Relaxed) as usize;
        let freq = self.config.heartbeat.as_secs_f64();
        self.events.send(kind, crate::events::worker_fields(freq, active, self.stats.finished()));
    }

    /// The lowest size remote control may shrink the pool to.
    pub(crate) fn pool_floor(&self) -> usize {
        self.autoscaler.as_ref().map_or(1, |a| a.bounds().1)
    }

    /// Tasks held now: started or waiting with a slot, and reserved without one (the
    /// autoscaler's load).
    pub(crate) fn held(&self) -> usize {
        self.pool.held() + self.intake.reserved().len()
    }
}

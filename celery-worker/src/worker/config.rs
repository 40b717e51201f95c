//! How a worker is set up: [`WorkerConfig`], its defaults, and the sizes derived from it (the
//! pool at start and the prefetch).

use std::time::Duration;

use super::pool::MAX_POOL;

/// Worker settings.
///
/// ```
/// use celery_worker::WorkerConfig;
/// let cfg = WorkerConfig { queues: vec!["celery".into(), "emails".into()], concurrency: 16, ..WorkerConfig::default() };
/// assert_eq!(cfg.prefetch(), 64);
/// let scaled = WorkerConfig { autoscale: Some((10, 2)), ..cfg };
/// assert_eq!((scaled.initial_pool(), scaled.prefetch()), (2, 40));
/// ```
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// Queues to consume, in priority order (`add_consumer` and `cancel_consumer` change them at
    /// run time).
    pub queues: Vec<String>,
    /// Tasks run at once (`pool_grow` and `pool_shrink` change it at run time; at most 10,000).
    pub concurrency: usize,
    /// Deliveries held per concurrency slot (Celery's default 4; 1 = fetch only when idle).
    pub prefetch_multiplier: usize,
    /// This worker's name (`celery@host`).
    pub hostname: String,
    /// How long running tasks may finish after a shutdown request.
    pub shutdown_grace: Duration,
    /// Store STARTED when a task starts (and RECEIVED when it is deferred to its eta).
    pub track_started: bool,
    /// Send Celery's task events from the start (`worker -E`; remote control's `enable_events`
    /// and `disable_events` switch them at run time). Worker events (online, heartbeat, offline)
    /// are always sent, as Celery's workers do.
    pub events: bool,
    /// How often `worker-heartbeat` is sent.
    pub heartbeat: Duration,
    /// `Some((max, min))`: the pool grows up to `max` slots while deliveries wait and every slot
    /// is busy, and shrinks back toward `min` once `autoscale_keepalive` passed since it last grew
    /// (`worker --autoscale MAX,MIN`); `concurrency` is then unused.
    pub autoscale: Option<(usize, usize)>,
    /// How long the autoscaler keeps grown slots before shrinking (Celery's
    /// `AUTOSCALE_KEEPALIVE`, 30 s).
    pub autoscale_keepalive: Duration,
    /// The lease of a per-key concurrency slot (`worker --key-lease`, default 30 s, at least
    /// 0.5 s): renewed every third of it while its task runs; a dead worker's slots free after it.
    pub key_lease: Duration,
    /// Per-key-pattern concurrency limits (`worker --key-limit 'tenant-*=3'`), the first match
    /// winning over the task's own `key_concurrency`; give every worker the same ones.
    pub key_limits: Vec<celery_core::flow::KeyLimit>,
    /// The weights of fairness keys in fair queues (`worker --fairness-weight tenant-a=3`; every
    /// key not named: 1); give every worker the same ones.
    pub fairness_weights: celery_core::flow::FairnessWeights,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            queues: vec!["celery".into()],
            concurrency: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2),
            prefetch_multiplier: 4,
            hostname: format!("celery@{}", gethostname()),
            shutdown_grace: Duration::from_secs(30),
            track_started: true,
            events: false,
            heartbeat: Duration::from_secs(2),
            autoscale: None,
            autoscale_keepalive: Duration::from_secs(30),
            key_lease: Duration::from_secs(30),
            key_limits: Vec::new(),
            fairness_weights: Default::default(),
        }
    }
}

/// This host's name.
pub(crate) fn gethostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .or_else(|_| std::env::var("HOSTNAME"))
        .unwrap_or_else(|_| "localhost".into())
}

impl WorkerConfig {
    /// Deliveries held at most: concurrency (the autoscaler's max) x multiplier.
    pub fn prefetch(&self) -> usize {
        prefetch_for(self.autoscale.map_or(self.concurrency, |(max, _)| max), self.prefetch_multiplier)
    }

    /// The pool's size at start: `concurrency`, or the autoscaler's `min` (both at most 10,000;
    /// at least 1 without an autoscaler).
    pub fn initial_pool(&self) -> usize {
        match self.autoscale {
            Some((max, min)) => min.min(max).min(MAX_POOL),
            None => self.concurrency.clamp(1, MAX_POOL),
        }
    }
}

/// Deliveries held at most for a pool of `slots`.
pub(crate) fn prefetch_for(slots: usize, multiplier: usize) -> usize {
    slots.clamp(1, MAX_POOL).saturating_mul(multiplier.clamp(1, 1_000))
}

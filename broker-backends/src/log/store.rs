//! The data directory: a lock file, one directory per queue (topic) with its partitions, the results
//! topic, and the lease-expiry sweep. One store per directory per process (`LogStore::open` shares it).

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use super::error::LogError;
use super::partition::{now_ms, Fsync, NewRecord, Partition, PartitionConfig};
use super::record::Record;
use celery_core::routing::{Binding, ExchangeKind, RoutingTable};
use serde_json::{Map, Value};

/// Bytes a stored record takes beyond its key and payload (frame, offset, time, expiry header).
const RECORD_OVERHEAD: usize = 60;
/// The results log is not compacted below this size.
const COMPACT_MIN_BYTES: u64 = 64 << 20;

/// The default of [`StoreConfig::max_record_bytes`]: the same as the producer's message limit.
pub const DEFAULT_MAX_RECORD: usize = 16 << 20;

/// Store settings, from the URL's query.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// fsync policy (`fsync=always|os|<ms>`).
    pub fsync: Fsync,
    /// Segment size limit (`segment_bytes=`), default 128 MiB.
    pub segment_bytes: u64,
    /// How long a delivery stays invisible without renewal (`lease_timeout=` seconds), default 30.
    pub lease: Duration,
    /// Deliveries before a record is dead-lettered (`max_deliveries=`), default 10.
    pub max_deliveries: u32,
    /// Partitions of a new queue (`partitions=`), default 1.
    pub partitions: u32,
    /// Retention of closed segments (none by default).
    pub retention: super::partition::Retention,
    /// The largest record (key, payload and headers) accepted on any path (`max_record_bytes=`),
    /// default 16 MiB, at most 64 MiB (the on-disk frame limit).
    pub max_record_bytes: usize,
    /// The most queues the directory may hold (`max_queues=`), default 10,000: a publish that would
    /// create one more fails with an error naming the limit.
    pub max_queues: usize,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            fsync: Fsync::Always,
            segment_bytes: 128 << 20,
            lease: Duration::from_secs(30),
            max_deliveries: 10,
            partitions: 1,
            retention: Default::default(),
            max_record_bytes: DEFAULT_MAX_RECORD,
            max_queues: 10_000,
        }
    }
}

/// A queue: its partitions.
#[derive(Debug)]
pub(crate) struct Topic {
    pub(crate) name: String,
    pub(crate) partitions: Vec<Arc<Partition>>,
    next: AtomicUsize,
}

impl Topic {
    /// The partition for a key (hash), or round robin without one.
    pub(crate) fn pick(&self, key: &[u8]) -> &Arc<Partition> {
        let n = self.partitions.len();
        let i = if key.is_empty() {
            self.next.fetch_add(1, Ordering::Relaxed) % n
        } else {
            (crc32c::crc32c(key) as usize) % n
        };
        &self.partitions[i]
    }
}

/// Encodes a queue name as a directory name.
pub(crate) fn dir_name(name: &str) -> String {
    name.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"._-".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// The results of one store: id -> (document, expiry in ms since the epoch).
#[derive(Debug, Default)]
pub(crate) struct Results {
    pub(crate) values: HashMap<String, (Vec<u8>, i64)>,
    pub(crate) waiters: HashMap<String, Arc<Notify>>,
}

/// An open data directory.
#[derive(Debug)]
pub struct LogStore {
    dir: PathBuf,
    cfg: StoreConfig,
    _lock: File,
    topics: Mutex<HashMap<String, Arc<Topic>>>,
    /// Woken on every append, requeue and expiry.
    pub(crate) notify: Arc<Notify>,
    pub(crate) results: Mutex<Results>,
    pub(crate) results_log: super::results::ResultsLog,
    /// Serializes read-decide-write operations (leases, chord tallies).
    pub(crate) cas_lock: tokio::sync::Mutex<()>,
    /// A results sweep (and compaction) is running: the next waits for it to end.
    maintaining: std::sync::atomic::AtomicBool,
    /// Live broadcast subscribers: (exchange, pattern, sender).
    pub(crate) subscribers: Mutex<Vec<(String, String, tokio::sync::mpsc::Sender<celery_core::broker::Broadcast>)>>,
    /// Chord tallies by group id (persisted among the results, rebuilt on open).
    pub(crate) chords: Mutex<HashMap<String, celery_core::backend::ChordTally>>,
    served: std::sync::Once,
    routing: Mutex<RoutingTable>,
    /// Publishes that matched no queue.
    pub unroutable: std::sync::atomic::AtomicU64,
    /// Stream consumer groups: (group, topic) -> members.
    pub(crate) groups: Mutex<HashMap<(String, String), super::stream::Membership>>,
}

fn registry() -> &'static Mutex<HashMap<PathBuf, Weak<LogStore>>> {
    static R: OnceLock<Mutex<HashMap<PathBuf, Weak<LogStore>>>> = OnceLock::new();
    R.get_or_init(Default::default)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl LogStore {
    /// Opens (creating) `dir`, or returns the store this process already has open there.
    pub fn open(dir: &Path, cfg: StoreConfig) -> Result<Arc<LogStore>, LogError> {
        std::fs::create_dir_all(dir).map_err(|e| LogError::io(dir, e))?;
        let canonical = dir.canonicalize().map_err(|e| LogError::io(dir, e))?;
        let mut reg = lock(registry());
        if let Some(s) = reg.get(&canonical).and_then(Weak::upgrade) {
            return Ok(s);
        }
        let lock_path = canonical.join("LOCK");
        let lock_file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&lock_path)
            .map_err(|e| LogError::io(&lock_path, e))?;
        if lock_file.try_lock().is_err() {
            let pid = std::fs::read_to_string(&lock_path).unwrap_or_default().trim().to_owned();
            return Err(LogError::Locked { path: canonical, pid });
        }
        lock_file.set_len(0).map_err(|e| LogError::io(&lock_path, e))?;
        std::fs::write(&lock_path, std::process::id().to_string()).map_err(|e| LogError::io(&lock_path, e))?;
        let notify = Arc::new(Notify::new());
        let pcfg = PartitionConfig { fsync: cfg.fsync, segment_bytes: cfg.segment_bytes };
        let mut results = Results::default();
        let now = now_ms();
        let results_log = super::results::ResultsLog::open(&canonical.join("results"), &pcfg, |rec| {
            let expires = rec
                .headers
                .iter()
                .find(|(k, _)| k == "expires")
                .and_then(|(_, v)| std::str::from_utf8(v).ok()?.parse().ok())
                .unwrap_or(i64::MAX);
            let id = String::from_utf8_lossy(&rec.key).into_owned();
            if rec.payload.is_empty() || expires <= now {
                results.values.remove(&id);
            } else {
                results.values.insert(id, (rec.payload, expires));
            }
        })?;
        let store = Arc::new(LogStore {
            dir: canonical.clone(),
            cfg,
            _lock: lock_file,
            topics: Mutex::new(HashMap::new()),
            notify,
            results: Mutex::new(results),
            results_log,
            cas_lock: tokio::sync::Mutex::new(()),
            maintaining: std::sync::atomic::AtomicBool::new(false),
            chords: Mutex::new(HashMap::new()),
            subscribers: Mutex::new(Vec::new()),
            served: std::sync::Once::new(),
            routing: Mutex::new(load_routing(&canonical)?),
            unroutable: std::sync::atomic::AtomicU64::new(0),
            groups: Mutex::new(HashMap::new()),
        });
        store.rebuild_chords();
        for entry in std::fs::read_dir(canonical.join("topics")).into_iter().flatten().flatten() {
            if let Ok(name) = std::fs::read_to_string(entry.path().join("name")) {
                store.topic(&name)?;
            }
        }
        reg.insert(canonical, Arc::downgrade(&store));
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(expiry_loop(Arc::downgrade(&store)));
        }
        Ok(store)
    }

    /// Listens on the directory's unix socket (once), so other processes that open the same
    /// directory use this store through it. The socket is its owner's only (mode 0600): other
    /// local users cannot connect to it.
    pub fn serve_unix(self: &Arc<Self>) {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        self.served.call_once(|| {
            let path = super::socket_path(&self.dir);
            let _ = std::fs::remove_file(&path);
            // Bound in a private (0700) directory, made 0600, then moved into place: no one else
            // can connect in between. A socket that cannot be made so is not served.
            // (A name no longer than `broker.sock`: socket paths are limited to 107 bytes.)
            let private = self.dir.join(format!(".s{:06x}", std::process::id() & 0xff_ffff));
            let _ = std::fs::remove_dir_all(&private);
            let listener = std::fs::DirBuilder::new().mode(0o700).create(&private).and_then(|()| {
                let tmp = private.join("s");
                let l = tokio::net::UnixListener::bind(&tmp)?;
                std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))?;
                std::fs::rename(&tmp, &path)?;
                Ok(l)
            });
            let _ = std::fs::remove_dir_all(&private);
            match listener {
                Ok(l) => {
                    tokio::spawn(super::server::serve_unix(Arc::downgrade(self), l));
                }
                Err(e) => {
                    let _ = std::fs::remove_file(&path);
                    tracing::warn!(error = %e, path = %path.display(), "log: cannot listen on the directory's socket; other processes cannot share it");
                }
            }
        });
    }

    /// Hands a broadcast to the current subscribers whose pattern matches (a full one misses it).
    pub fn broadcast(&self, exchange: &str, routing_key: &str, body: &[u8]) {
        let mut subs = lock(&self.subscribers);
        subs.retain(|(_, _, tx)| !tx.is_closed());
        for (ex, pattern, tx) in subs.iter() {
            if ex == exchange && celery_core::routing::topic_matches(pattern, routing_key) {
                let b = celery_core::broker::Broadcast { routing_key: routing_key.to_owned(), body: body.to_vec() };
                let _ = tx.try_send(b);
            }
        }
    }

    /// Subscribes to the broadcasts of `exchange` matching `pattern`.
    pub fn subscribe(
        &self,
        exchange: &str,
        pattern: &str,
    ) -> tokio::sync::mpsc::Receiver<celery_core::broker::Broadcast> {
        let (tx, rx) = tokio::sync::mpsc::channel(1024);
        lock(&self.subscribers).push((exchange.to_owned(), pattern.to_owned(), tx));
        rx
    }

    /// Declares an exchange; the declaration persists in `routing.json`.
    pub fn declare_exchange(&self, name: &str, kind: ExchangeKind) -> Result<(), LogError> {
        let mut t = lock(&self.routing);
        if t.declare(name, kind).map_err(|e| LogError::Invalid(e.to_string()))? {
            save_routing(&self.dir, &t)?;
        }
        Ok(())
    }

    /// Binds a queue; the binding persists in `routing.json`.
    pub fn bind(&self, b: &Binding) -> Result<(), LogError> {
        let mut t = lock(&self.routing);
        if t.bind(b.clone()).map_err(|e| LogError::Invalid(e.to_string()))? {
            save_routing(&self.dir, &t)?;
        }
        Ok(())
    }

    /// The queues a publish through `exchange` reaches.
    pub fn route(&self, exchange: &str, key: &str, headers: &Map<String, Value>) -> Result<Vec<String>, LogError> {
        lock(&self.routing).route(exchange, key, headers).map_err(|e| LogError::Invalid(e.to_string()))
    }

    /// The settings.
    pub fn config(&self) -> &StoreConfig {
        &self.cfg
    }

    /// The data directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The queue `name`, created on first use.
    pub(crate) fn topic(&self, name: &str) -> Result<Arc<Topic>, LogError> {
        let mut topics = lock(&self.topics);
        if let Some(t) = topics.get(name) {
            return Ok(t.clone());
        }
        if name.is_empty() {
            return Err(LogError::Invalid("a queue name cannot be empty".into()));
        }
        let tdir = self.dir.join("topics").join(dir_name(name));
        std::fs::create_dir_all(&tdir).map_err(|e| LogError::io(&tdir, e))?;
        let count_path = tdir.join("partitions");
        let count: u32 = match std::fs::read_to_string(&count_path) {
            Ok(s) => {
                s.trim().parse().map_err(|_| LogError::Invalid(format!("{}: not a number", count_path.display())))?
            }
            Err(_) => {
                std::fs::write(tdir.join("name"), name).map_err(|e| LogError::io(&tdir, e))?;
                std::fs::write(&count_path, self.cfg.partitions.max(1).to_string())
                    .map_err(|e| LogError::io(&count_path, e))?;
                self.cfg.partitions.max(1)
            }
        };
        let pcfg = PartitionConfig { fsync: self.cfg.fsync, segment_bytes: self.cfg.segment_bytes };
        let partitions = (0..count)
            .map(|p| Partition::open(&tdir.join(p.to_string()), &pcfg, self.notify.clone()).map(Arc::new))
            .collect::<Result<Vec<_>, _>>()?;
        let t = Arc::new(Topic { name: name.to_owned(), partitions, next: AtomicUsize::new(0) });
        topics.insert(name.to_owned(), t.clone());
        Ok(t)
    }

    /// Appends records to queue `name` (created on first use); returns once they are written and
    /// fsynced per the policy.
    pub async fn append(&self, name: &str, records: Vec<NewRecord>) -> Result<(), LogError> {
        let topic = self.topic(name)?;
        if topic.partitions.len() == 1 || records.iter().all(|r| r.key.is_empty()) {
            topic.pick(&[]).log.append(records).await?;
            return Ok(());
        }
        let mut groups: HashMap<usize, Vec<NewRecord>> = HashMap::new();
        for r in records {
            let p = Arc::as_ptr(topic.pick(&r.key)) as usize;
            groups.entry(p).or_default().push(r);
        }
        for (p, recs) in groups {
            if let Some(part) = topic.partitions.iter().find(|x| Arc::as_ptr(x) as usize == p) {
                part.log.append(recs).await?;
            }
        }
        Ok(())
    }

    /// Copies a record to `<queue>.dead` with the reason, then finishes the original.
    pub(crate) async fn dead_letter(
        &self,
        queue: &str,
        part: &Partition,
        record: &Record,
        reason: &str,
    ) -> Result<(), LogError> {
        // Undecodable compact payloads are kept whole, wrapped as binary.
        let raw = super::payload::to_envelope(&record.payload, queue).unwrap_or_else(|| record.payload.clone());
        let payload = crate::envelope::dead_letter(&raw, queue, reason);
        let rec = NewRecord {
            headers: vec![
                (celery_core::broker::DEAD_LETTER_REASON.into(), reason.as_bytes().to_vec()),
                (celery_core::broker::DEAD_LETTER_QUEUE.into(), queue.as_bytes().to_vec()),
            ],
            payload: payload.into_bytes(),
            ..NewRecord::default()
        };
        self.append(&celery_core::broker::dead_letter_queue(queue), vec![rec]).await?;
        part.ack(&[record.offset])
    }

    /// Dead-letters a record handed out `deliveries` times and never settled (`max_deliveries`);
    /// a failure is logged, and the record comes back when its lease expires.
    pub(crate) async fn dead_letter_exhausted(&self, queue: &str, part: &Partition, record: &Record, deliveries: u32) {
        let reason = format!("delivered {deliveries} times without being acknowledged (max_deliveries)");
        if let Err(e) = self.dead_letter(queue, part, record, &reason).await {
            tracing::error!(error = %e, "log: dead-lettering an exhausted record failed");
        }
    }

    /// Checkpoints every partition and waits for the writers (a clean shutdown).
    pub async fn sync(&self) -> Result<(), LogError> {
        let topics: Vec<_> = lock(&self.topics).values().cloned().collect();
        for t in topics {
            for p in &t.partitions {
                p.checkpoint().await?;
            }
        }
        self.results_log.flush().await
    }

    /// Forgets expired results in memory (their records go at the next compaction).
    fn sweep_results(&self) -> u64 {
        let now = now_ms();
        let mut res = lock(&self.results);
        res.values.retain(|_, (_, expires)| *expires > now);
        res.values.iter().map(|(k, (doc, _))| (k.len() + doc.len() + RECORD_OVERHEAD) as u64).sum()
    }

    /// Rewrites the results log with only what is live (unexpired results, leases, stored
    /// documents, chord tallies). It also runs by itself when the log is over 64 MiB and four times
    /// what is live.
    pub async fn compact_results(&self) -> Result<super::results::Compacted, LogError> {
        self.results_log
            .compact(|| {
                let now = now_ms();
                let res = lock(&self.results);
                res.values
                    .iter()
                    .filter(|(_, (_, expires))| *expires > now)
                    .map(|(id, (doc, expires))| NewRecord {
                        headers: vec![("expires".into(), expires.to_string().into_bytes())],
                        key: id.as_bytes().to_vec(),
                        payload: doc.clone(),
                        not_before_ms: 0,
                    })
                    .collect()
            })
            .await
    }

    /// Sweeps expired results and compacts the results log when it is mostly dead.
    async fn maintain_results(&self) {
        let live = self.sweep_results();
        let on_disk = self.results_log.disk_bytes().await;
        if on_disk > COMPACT_MIN_BYTES && on_disk > live.saturating_mul(4) {
            if let Err(e) = self.compact_results().await {
                tracing::error!(error = %e, "log: compacting the results failed; the old log stays in use");
            }
        }
    }
}

fn load_routing(dir: &Path) -> Result<RoutingTable, LogError> {
    let path = dir.join("routing.json");
    match std::fs::read(&path) {
        Ok(data) => serde_json::from_slice(&data).map_err(|e| LogError::Corrupt {
            path,
            offset: 0,
            reason: format!("routing table: {e}"),
        }),
        Err(_) => Ok(RoutingTable::default()),
    }
}

/// Replaces `routing.json` atomically (write, fsync, rename, fsync the directory).
fn save_routing(dir: &Path, t: &RoutingTable) -> Result<(), LogError> {
    let data = serde_json::to_vec_pretty(t).map_err(|e| LogError::Invalid(e.to_string()))?;
    super::segment::replace_file(&dir.join("routing.json"), &data)
}

impl LogStore {
    /// Applies the retention policy to every partition now (it also runs every second by itself).
    pub fn enforce_retention(&self) {
        let topics: Vec<_> = lock(&self.topics).values().cloned().collect();
        for t in topics {
            for (i, p) in t.partitions.iter().enumerate() {
                let keep_from = super::stream::min_committed(&self.dir, &t.name, i).unwrap_or(u64::MAX);
                match p.enforce_retention(&self.cfg.retention, keep_from) {
                    Ok((0, _)) => {}
                    Ok((deleted, 0)) => {
                        tracing::info!(queue = %t.name, partition = i, deleted, "log: retention deleted segments")
                    }
                    Ok((deleted, lost)) => tracing::warn!(
                        queue = %t.name, partition = i, deleted, lost,
                        "log: forced retention deleted unfinished records"
                    ),
                    Err(e) => tracing::error!(error = %e, queue = %t.name, "log: retention failed"),
                }
            }
        }
    }
}

async fn expiry_loop(store: Weak<LogStore>) {
    let mut ticks = 0u64;
    loop {
        ticks += 1;
        if ticks.is_multiple_of(10) {
            if let Some(s) = store.upgrade().filter(|s| s.cfg.retention.is_set()) {
                s.enforce_retention();
            }
        }
        let Some(s) = store.upgrade() else { return };
        if ticks.is_multiple_of(100) && !s.maintaining.swap(true, std::sync::atomic::Ordering::AcqRel) {
            // On its own: a compaction takes about a second per 100 MB, and lease expiry must not
            // wait for it.
            let s = s.clone();
            tokio::spawn(async move {
                s.maintain_results().await;
                s.maintaining.store(false, std::sync::atomic::Ordering::Release);
            });
        }
        let topics: Vec<_> = lock(&s.topics).values().cloned().collect();
        let now = Instant::now();
        let mut returned = false;
        for t in &topics {
            for p in &t.partitions {
                let (exhausted, back) = p.expire(now, s.cfg.max_deliveries);
                returned |= back > 0;
                for ex in exhausted {
                    s.dead_letter_exhausted(&t.name, p, &ex.record, ex.deliveries).await;
                }
            }
        }
        if returned {
            s.notify.notify_waiters();
        }
        drop(s);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

//! The data directory: a lock file, one directory per queue (topic) with its partitions, the
//! results, the routing table, stream groups, and the lease-expiry sweep. One store per directory
//! per process (`LogStore::open` shares it).
//!
//! The store knows nothing of sockets: the network layer (`log::net`) serves an open store, and
//! the facade (`LogBroker::connect`) opens one and starts its socket.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use celery_core::broker::Broadcast;
use celery_core::routing::{Binding, ExchangeKind};
use celery_core::sync::lock;
use serde_json::{Map, Value};
use tokio::sync::{mpsc, Notify};

use super::broadcast::Broadcasts;
use super::error::LogError;
use super::files::FileCache;
use super::flow::KeyFlow;
use super::partition::{AcksJournal, Fsync, Partition, PartitionConfig, Retention};
use super::record::{check_size, NewRecord, Record};
use super::results::ResultStore;
use super::routing::Routes;
use super::stream::{Commit, LocalStream, StartFrom, StreamGroups};
use super::topic::Topic;

/// The default of [`StoreConfig::max_record_bytes`]: the producer's message limit (16 MiB) plus
/// 64 KiB for the record's headers, so every message a producer accepts is stored.
pub const DEFAULT_MAX_RECORD: usize = (16 << 20) + (64 << 10);

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
    pub retention: Retention,
    /// The largest record (key, payload and headers) accepted on any path (`max_record_bytes=`),
    /// default 16 MiB + 64 KiB, at most 64 MiB (the on-disk frame limit).
    pub max_record_bytes: usize,
    /// The most queues the directory may hold (`max_queues=`), default 10,000: a publish that would
    /// create one more fails with an error naming the limit.
    pub max_queues: usize,
    /// Segment descriptors kept open (`max_open_files=`), default 256, whatever the
    /// number of queues: the least recently used one is closed for a new one. A descriptor that is
    /// being read or written (or holds bytes not fsynced yet) stays open until it is done.
    pub max_open_files: usize,
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
            max_open_files: super::files::DEFAULT_MAX_OPEN_FILES,
        }
    }
}

/// An open data directory.
#[derive(Debug)]
pub struct LogStore {
    dir: PathBuf,
    cfg: StoreConfig,
    _lock: File,
    topics: Mutex<HashMap<String, Arc<Topic>>>,
    /// Queues whose files are damaged, with what was found: set aside at open, not served.
    quarantined: Mutex<HashMap<String, String>>,
    /// Bumped whenever a queue is created (consumers waiting for one look again).
    pub(crate) topics_created: AtomicU64,
    /// Woken on every append, requeue and expiry.
    pub(crate) notify: Arc<Notify>,
    results: Arc<ResultStore>,
    broadcasts: Broadcasts,
    routes: Routes,
    /// Publishes that matched no queue.
    pub unroutable: AtomicU64,
    groups: Arc<StreamGroups>,
    /// The open segment files of every partition (bounded).
    files: Arc<FileCache>,
    /// The acks and delivery counts of every partition (`partition/journal.rs`).
    journal: Arc<AcksJournal>,
    /// Per-key concurrency slots and parked messages (`flow.rs`).
    flow: KeyFlow,
}

fn registry() -> &'static Mutex<HashMap<PathBuf, Weak<LogStore>>> {
    static R: OnceLock<Mutex<HashMap<PathBuf, Weak<LogStore>>>> = OnceLock::new();
    R.get_or_init(Default::default)
}

impl LogStore {
    /// Opens (creating) `dir`, or returns the store this process already has open there. Another
    /// process owning it is [`LogError::Locked`] (its clients reach it through its socket).
    pub fn open(dir: &Path, cfg: StoreConfig) -> Result<Arc<LogStore>, LogError> {
        super::disk::create_dir_all(dir)?;
        let canonical = dir.canonicalize().map_err(|e| LogError::io(dir, e))?;
        super::disk::restrict_dir(&canonical)?;
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
            .mode(super::disk::FILE_MODE)
            .open(&lock_path)
            .map_err(|e| LogError::io(&lock_path, e))?;
        if lock_file.try_lock().is_err() {
            let pid = std::fs::read_to_string(&lock_path).unwrap_or_default().trim().to_owned();
            return Err(LogError::Locked { path: canonical, pid });
        }
        lock_file.set_len(0).map_err(|e| LogError::io(&lock_path, e))?;
        std::fs::write(&lock_path, std::process::id().to_string()).map_err(|e| LogError::io(&lock_path, e))?;
        let files = FileCache::new(cfg.max_open_files);
        let journal = AcksJournal::open(&canonical, cfg.fsync)?;
        let pcfg = PartitionConfig {
            fsync: cfg.fsync,
            segment_bytes: cfg.segment_bytes,
            files: files.clone(),
            journal: journal.clone(),
        };
        let results = ResultStore::open(&canonical.join("results"), &pcfg, cfg.max_record_bytes)?;
        let flow = KeyFlow::load(&lock(&results.live).values);
        let store = Arc::new(LogStore {
            dir: canonical.clone(),
            cfg,
            _lock: lock_file,
            topics: Mutex::new(HashMap::new()),
            quarantined: Mutex::new(HashMap::new()),
            topics_created: AtomicU64::new(0),
            notify: Arc::new(Notify::new()),
            results: Arc::new(results),
            broadcasts: Broadcasts::default(),
            routes: Routes::load(&canonical)?,
            unroutable: AtomicU64::new(0),
            groups: Arc::new(StreamGroups::new(&canonical)),
            files,
            journal,
            flow,
        });
        store.open_topics()?;
        store.journal.trim_after_open();
        reg.insert(canonical, Arc::downgrade(&store));
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(expiry_loop(Arc::downgrade(&store)));
        }
        Ok(store)
    }

    /// The per-key concurrency slots and parked messages of this directory.
    pub(crate) fn flow(&self) -> &KeyFlow {
        &self.flow
    }

    /// The results, leases, stored documents and chord tallies of this directory.
    pub fn results(&self) -> &ResultStore {
        &self.results
    }

    /// Hands a broadcast to the current subscribers whose pattern matches (a full one misses it).
    /// Exchange names and routing keys are at most 255 bytes.
    pub fn broadcast(&self, exchange: &str, routing_key: &str, body: &[u8]) -> Result<(), LogError> {
        self.broadcasts.send(exchange, routing_key, body)
    }

    /// Subscribes to the broadcasts of `exchange` matching `pattern` (each at most 255 bytes; at
    /// most 10,000 live subscriptions per store).
    pub fn subscribe(&self, exchange: &str, pattern: &str) -> Result<mpsc::Receiver<Broadcast>, LogError> {
        self.broadcasts.subscribe(exchange, pattern)
    }

    /// Declares an exchange; the declaration persists in `routing.json`.
    pub fn declare_exchange(&self, name: &str, kind: ExchangeKind) -> Result<(), LogError> {
        self.routes.declare(name, kind)
    }

    /// Binds a queue; the binding persists in `routing.json`.
    pub fn bind(&self, b: &Binding) -> Result<(), LogError> {
        self.routes.bind(b)
    }

    /// The queues a publish through `exchange` reaches.
    pub fn route(&self, exchange: &str, key: &str, headers: &Map<String, Value>) -> Result<Vec<String>, LogError> {
        self.routes.route(exchange, key, headers)
    }

    /// The settings.
    pub fn config(&self) -> &StoreConfig {
        &self.cfg
    }

    /// The data directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Opens every queue of the directory. A queue whose files are damaged is quarantined (reported,
    /// not served) and the others open; leftovers of a creation that did not finish are removed.
    fn open_topics(&self) -> Result<(), LogError> {
        let root = self.dir.join("topics");
        let entries = match std::fs::read_dir(&root) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(LogError::io(&root, e)),
        };
        for entry in entries.flatten() {
            let (path, file_name) = (entry.path(), entry.file_name().to_string_lossy().into_owned());
            if file_name.starts_with(".tmp-") {
                tracing::info!(dir = %path.display(), "log: removing a queue whose creation did not finish");
                std::fs::remove_dir_all(&path).map_err(|e| LogError::io(&path, e))?;
                continue;
            }
            match self.open_topic_dir(&root, &path, &file_name) {
                Ok(t) => {
                    lock(&self.topics).insert(t.name.clone(), t);
                }
                Err((name, e)) => {
                    tracing::error!(dir = %path.display(), queue = %name, error = %e, "log: queue quarantined: not served until its files are repaired; the other queues open");
                    lock(&self.quarantined).insert(name, e.to_string());
                }
            }
        }
        Ok(())
    }

    /// Opens one queue directory found at open, repairing what is unambiguous: the name comes from
    /// `name` or, when that file is damaged, from the directory's own (reversible) encoding; a damaged
    /// `partitions` is rebuilt from the partition directories when they are `0..n`.
    fn open_topic_dir(&self, root: &Path, path: &Path, file_name: &str) -> Result<Arc<Topic>, (String, LogError)> {
        let from_dir = super::names::decode(file_name);
        let name = match std::fs::read(path.join("name")).ok().and_then(|b| String::from_utf8(b).ok()) {
            Some(n) if !n.is_empty() && from_dir.as_deref().is_none_or(|d| d == n) => n,
            _ => {
                let Some(n) = from_dir else {
                    return Err((
                        file_name.to_owned(),
                        LogError::Invalid("neither `name` nor the directory name is readable".into()),
                    ));
                };
                tracing::warn!(dir = %path.display(), queue = %n, "log: queue `name` file damaged; repaired from the directory name");
                super::disk::replace_file(&path.join("name"), n.as_bytes()).map_err(|e| (n.clone(), e))?;
                n
            }
        };
        let fail = |e: LogError| (name.clone(), e);
        let wanted = super::names::child(root, "queue", &name).map_err(fail)?;
        let dir = if wanted != path {
            // Made by an older version, whose encoding kept a leading `.`.
            if wanted.exists() {
                return Err(fail(LogError::Invalid(format!(
                    "{} and {} both hold this queue",
                    path.display(),
                    wanted.display()
                ))));
            }
            tracing::info!(from = %path.display(), to = %wanted.display(), "log: renaming a queue directory to the current name encoding");
            std::fs::rename(path, &wanted).map_err(|e| fail(LogError::io(path, e)))?;
            super::disk::sync_dir(root).map_err(fail)?;
            wanted
        } else {
            wanted
        };
        let count_path = dir.join("partitions");
        let count = match std::fs::read_to_string(&count_path).ok().and_then(|s| s.trim().parse::<u32>().ok()) {
            Some(n) if n >= 1 => n,
            _ => {
                let n = std::fs::read_dir(&dir)
                    .map_err(|e| fail(LogError::io(&dir, e)))?
                    .flatten()
                    .filter(|e| e.path().is_dir() && e.file_name().to_str().is_some_and(|n| n.parse::<u32>().is_ok()))
                    .count() as u32;
                if n == 0 || (0..n).any(|p| !dir.join(p.to_string()).is_dir()) {
                    return Err(fail(LogError::Corrupt {
                        path: count_path,
                        offset: 0,
                        reason: "the partition count is damaged and the partition directories do not tell it".into(),
                    }));
                }
                tracing::warn!(queue = %name, partitions = n, "log: queue `partitions` file damaged; repaired from its directories");
                super::disk::replace_file(&count_path, n.to_string().as_bytes()).map_err(fail)?;
                n
            }
        };
        self.open_partitions(&name, &dir, count).map_err(fail)
    }

    fn open_partitions(&self, name: &str, dir: &Path, count: u32) -> Result<Arc<Topic>, LogError> {
        let pcfg = PartitionConfig {
            fsync: self.cfg.fsync,
            segment_bytes: self.cfg.segment_bytes,
            files: self.files.clone(),
            journal: self.journal.clone(),
        };
        Ok(Arc::new(Topic::open(name, dir, count, &pcfg, &self.notify)?))
    }

    /// The queue `name` if it exists: reading never creates one. A quarantined queue is an error.
    pub(crate) fn find_topic(&self, name: &str) -> Result<Option<Arc<Topic>>, LogError> {
        if let Some(t) = lock(&self.topics).get(name) {
            return Ok(Some(t.clone()));
        }
        match lock(&self.quarantined).get(name) {
            Some(reason) => Err(LogError::Quarantined { queue: name.to_owned(), reason: reason.clone() }),
            None => Ok(None),
        }
    }

    /// The queue `name`, created on first use (publishing, a stream group joining). Its directory is
    /// made complete under a temporary name (metadata fsynced) and renamed into place, so a crash
    /// leaves the whole queue or none of it. At most `max_queues` (their dead-letter queues aside).
    pub(crate) fn topic(&self, name: &str) -> Result<Arc<Topic>, LogError> {
        if let Some(t) = self.find_topic(name)? {
            return Ok(t);
        }
        let root = self.dir.join("topics");
        let path = super::names::child(&root, "queue", name)?;
        let mut topics = lock(&self.topics);
        if let Some(t) = topics.get(name) {
            return Ok(t.clone());
        }
        let dead_letters_of_a_queue = name.strip_suffix(".dead").is_some_and(|q| topics.contains_key(q));
        if topics.len() >= self.cfg.max_queues && !dead_letters_of_a_queue {
            return Err(LogError::TooManyQueues { queue: name.to_owned(), limit: self.cfg.max_queues });
        }
        let count = self.cfg.partitions.max(1);
        if !root.exists() {
            super::disk::create_dir_all(&root)?;
            super::disk::sync_dir(&self.dir)?;
        }
        // Everything is written into a directory no reader looks at, made durable with one fsync
        // of each file and of the directory, then renamed into place: fewer fsyncs than replacing
        // each file, and a crash still leaves the whole queue or none of it.
        let tmp = root.join(format!(".tmp-{}", uuid::Uuid::new_v4().simple()));
        super::disk::create_dir_all(&tmp)?;
        super::disk::write_new(&tmp.join("name"), name.as_bytes())?;
        super::disk::write_new(&tmp.join("partitions"), count.to_string().as_bytes())?;
        for p in 0..count {
            super::disk::create_dir_all(&tmp.join(p.to_string()))?;
        }
        super::disk::sync_dir(&tmp)?;
        std::fs::rename(&tmp, &path).map_err(|e| LogError::io(&path, e))?;
        super::disk::sync_dir(&root)?;
        let t = self.open_partitions(name, &path, count)?;
        topics.insert(name.to_owned(), t.clone());
        self.topics_created.fetch_add(1, Ordering::Release);
        Ok(t)
    }

    /// Segment files the store keeps open now (at most `max_open_files`, besides
    /// those being read or written at this moment).
    pub fn open_files(&self) -> usize {
        self.files.len()
    }

    /// Records lost to damaged bytes since the store opened (each is reported as an error when found).
    pub fn corrupt_records(&self) -> u64 {
        lock(&self.topics)
            .values()
            .flat_map(|t| t.partitions.iter())
            .map(|p| p.log.corrupt_records.load(Ordering::Relaxed))
            .sum()
    }

    /// Queues set aside at open because their files are damaged, with what was found.
    pub fn quarantined(&self) -> Vec<(String, String)> {
        lock(&self.quarantined).iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }

    /// Appends records to queue `name` (created on first use); returns once they are written and
    /// fsynced per the policy.
    pub async fn append(&self, name: &str, records: Vec<NewRecord>) -> Result<(), LogError> {
        for r in &records {
            check_size("record", r.encoded_len(), self.cfg.max_record_bytes)?;
        }
        self.append_unchecked(name, records).await
    }

    /// [`LogStore::append`] without the configured size limit (the on-disk limit still holds): for
    /// what the store writes itself, such as a dead letter wrapping a record that was within it.
    pub(crate) async fn append_unchecked(&self, name: &str, records: Vec<NewRecord>) -> Result<(), LogError> {
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
        self.append_unchecked(&celery_core::broker::dead_letter_queue(queue), vec![rec]).await?;
        part.ack(&[record.offset])
    }

    /// Dead-letters a record handed out `deliveries` times and never settled (`max_deliveries`);
    /// false (logged) when that failed: the caller returns the record to its queue.
    pub(crate) async fn dead_letter_exhausted(
        &self,
        queue: &str,
        part: &Partition,
        record: &Record,
        deliveries: u32,
    ) -> bool {
        let reason = format!("delivered {deliveries} times without being acknowledged (max_deliveries)");
        match self.dead_letter(queue, part, record, &reason).await {
            Ok(()) => true,
            Err(e) => {
                tracing::error!(error = %e, "log: dead-lettering an exhausted record failed; it stays in its queue");
                false
            }
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
        self.results.flush().await
    }

    /// Records of `queue` ready to be taken (not leased, not delayed); 0 for a queue that does not
    /// exist (reading never creates one).
    pub fn queue_len(&self, queue: &str) -> Result<u64, LogError> {
        Ok(self.find_topic(queue)?.map_or(0, |t| t.ready_len()))
    }

    /// Delayed records seen in `queue`.
    pub fn delayed_len(&self, queue: &str) -> Result<u64, LogError> {
        Ok(self.find_topic(queue)?.map_or(0, |t| t.delayed_len()))
    }

    /// Finishes every record of `queue` that is not leased, those not yet due included; how many.
    pub fn purge(&self, queue: &str) -> Result<u64, LogError> {
        self.find_topic(queue)?.map_or(Ok(0), |t| t.purge())
    }

    /// The payloads of the oldest unfinished records of `queue`, oldest first, without leasing or
    /// counting them: at most `max` (and 1,000) and about 16 MiB beyond the first.
    pub fn peek(&self, queue: &str, max: usize) -> Result<Vec<Vec<u8>>, LogError> {
        match self.find_topic(queue)? {
            Some(topic) => super::peek::payloads(&topic, max),
            None => Ok(Vec::new()),
        }
    }

    /// Joins consumer group `group` on `queue` (created on first use) as a stream member of this
    /// process; it leaves when dropped.
    pub(crate) fn join_stream(
        &self,
        group: &str,
        queue: &str,
        start: StartFrom,
        commit: Commit,
    ) -> Result<LocalStream, LogError> {
        super::names::component("stream group", group)?;
        let topic = self.topic(queue)?;
        Ok(LocalStream::join(self.groups.clone(), topic, self.notify.clone(), group, start, commit))
    }

    /// Applies the retention policy to every partition now (it also runs every second by itself).
    pub fn enforce_retention(&self) {
        let topics: Vec<_> = lock(&self.topics).values().cloned().collect();
        for t in topics {
            for (i, p) in t.partitions.iter().enumerate() {
                let keep_from = self.groups.min_committed(&t.name, i).unwrap_or(u64::MAX);
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
        if ticks.is_multiple_of(100) {
            // On its own task: lease expiry must not wait for a compaction.
            s.results.maintain();
        }
        if ticks.is_multiple_of(10) {
            // Key slots of dead workers free within a second of their lease's end.
            if let Err(e) = s.sweep_slots().await {
                tracing::warn!(error = %e, "log: sweeping key slots failed; next time");
            }
        }
        // Only the partitions that may hold leases: an idle queue costs the sweep one load.
        let leased: Vec<(Arc<Topic>, Arc<Partition>)> = lock(&s.topics)
            .values()
            .flat_map(|t| t.partitions.iter().filter(|p| p.may_hold_leases()).map(move |p| (t.clone(), p.clone())))
            .collect();
        let now = Instant::now();
        let mut returned = false;
        for (t, p) in &leased {
            let (exhausted, back) = p.expire(now, s.cfg.max_deliveries);
            returned |= back > 0;
            for ex in exhausted {
                if !s.dead_letter_exhausted(&t.name, p, &ex.record, ex.deliveries).await {
                    p.give_back(ex.record, ex.deliveries);
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

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;
    use crate::log::storage::disk::faults::{self, Fault, Op};
    use crate::log::storage::partition::tests::tempdir;

    fn rec(payload: &str) -> NewRecord {
        NewRecord { payload: payload.as_bytes().to_vec(), ..NewRecord::default() }
    }

    /// Every record of `queue`, in order, taking and acking them.
    fn drain(store: &LogStore, queue: &str) -> Vec<String> {
        let mut out = Vec::new();
        let Some(t) = store.find_topic(queue).unwrap() else { return out };
        for p in &t.partitions {
            while let Some(taken) = p.take(Instant::now() + Duration::from_secs(30), 1, &Default::default()).unwrap() {
                out.push(String::from_utf8_lossy(&taken.record.payload).into_owned());
                p.ack(&[taken.record.offset]).unwrap();
            }
        }
        out
    }

    /// A closed store whose queue `q` holds `record-00` .. `record-29` in three or more small
    /// segments: its directory, its settings and the segment files in order.
    async fn segmented_queue() -> (PathBuf, StoreConfig, Vec<PathBuf>) {
        let dir = tempdir();
        let cfg = StoreConfig { segment_bytes: 600, ..StoreConfig::default() };
        let store = LogStore::open(&dir, cfg.clone()).unwrap();
        for i in 0..30 {
            store.append("q", vec![rec(&format!("record-{i:02}"))]).await.unwrap();
        }
        store.sync().await.unwrap();
        drop(store);
        let mut segs: Vec<PathBuf> = std::fs::read_dir(dir.join("topics/q/0"))
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.file_stem().and_then(|s| s.to_str()).is_some_and(|s| s.parse::<u64>().is_ok()))
            .collect();
        segs.sort();
        assert!(segs.len() >= 3, "{segs:?}");
        (dir, cfg, segs)
    }

    fn files_under(dir: &Path) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            if e.path().is_dir() {
                out.extend(files_under(&e.path()));
            }
            out.push(e.path());
        }
        out
    }

    #[tokio::test]
    async fn hostile_names_stay_inside_the_directory_and_apart() {
        let root = tempdir();
        let dir = root.join("data");
        let store = LogStore::open(&dir, StoreConfig::default()).unwrap();
        for name in ["..", ".", "0", "../../escape", "a/b", "/abs", "%2E", "é"] {
            store.append(name, vec![rec(name)]).await.unwrap();
        }
        for name in ["..", ".", "0", "../../escape", "a/b", "/abs", "%2E", "é"] {
            assert_eq!(drain(&store, name), [name], "queue {name:?} holds exactly its own record");
        }
        let err = store.append("", vec![rec("x")]).await.unwrap_err().to_string();
        assert!(err.contains("invalid queue name") && err.contains("empty"), "{err}");
        let err = store.append(&"q".repeat(300), vec![rec("x")]).await.unwrap_err().to_string();
        assert!(err.contains("too long"), "{err}");
        let err = store
            .join_stream("..", "0", StartFrom::Earliest, Commit::AfterProcessing)
            .map(|_| ())
            .map_err(|e| e.to_string());
        assert!(err.is_ok(), "`..` is a valid group name, encoded: {err:?}");
        let outside: Vec<_> = std::fs::read_dir(&root).unwrap().flatten().map(|e| e.file_name()).collect();
        assert_eq!(outside, ["data"], "nothing was written beside the data directory");
        for f in files_under(&dir.join("topics")) {
            let rel = f.strip_prefix(dir.join("topics")).unwrap();
            assert!(!rel.components().next().unwrap().as_os_str().to_string_lossy().starts_with('.'), "{f:?}");
        }
        drop(store);
        std::fs::remove_dir_all(root).ok();
    }

    #[tokio::test]
    async fn reading_never_creates_and_queues_are_capped() {
        let dir = tempdir();
        let cfg = StoreConfig { max_queues: 2, ..StoreConfig::default() };
        let store = LogStore::open(&dir, cfg).unwrap();
        for q in ["ghost-1", "ghost-2", "ghost-3"] {
            assert_eq!(store.queue_len(q).unwrap(), 0);
            assert_eq!(store.purge(q).unwrap(), 0);
            assert_eq!(store.delayed_len(q).unwrap(), 0);
            assert!(store.peek(q, 10).unwrap().is_empty());
        }
        assert!(!dir.join("topics").exists(), "reading created {:?}", files_under(&dir.join("topics")));
        store.append("a", vec![rec("1")]).await.unwrap();
        store.append("b", vec![rec("1")]).await.unwrap();
        match store.append("c", vec![rec("1")]).await {
            Err(LogError::TooManyQueues { limit: 2, .. }) => {}
            other => panic!("expected the queue limit, got {other:?}"),
        }
        // A queue's dead letters have room beyond the limit.
        store.append("a.dead", vec![rec("1")]).await.unwrap();
        drop(store);
        std::fs::remove_dir_all(dir).ok();
    }

    #[tokio::test]
    async fn sizes_over_the_limit_are_refused_and_nothing_is_stored() {
        let dir = tempdir();
        let cfg = StoreConfig { max_record_bytes: 1024, ..StoreConfig::default() };
        let store = LogStore::open(&dir, cfg).unwrap();
        store.append("q", vec![rec("small")]).await.unwrap();
        let big = "x".repeat(2000);
        match store.append("q", vec![rec("fits"), rec(&big)]).await {
            Err(e @ LogError::TooLarge { limit: 1024, .. }) => {
                assert!(e.to_string().contains("max_record_bytes"), "{e}")
            }
            other => panic!("expected a size error, got {other:?}"),
        }
        let err = store.results().put("id", big.clone().into_bytes(), Duration::from_secs(60), |_| false).await;
        assert!(matches!(err, Err(LogError::TooLarge { .. })), "{err:?}");
        assert_eq!(drain(&store, "q"), ["small"], "a refused batch stores none of its records");
        // Past the on-disk frame limit even the unchecked path refuses (it could not be read back).
        let huge = NewRecord { payload: vec![0; crate::log::storage::record::MAX_RECORD], ..NewRecord::default() };
        assert!(matches!(store.append_unchecked("q", vec![huge]).await, Err(LogError::TooLarge { .. })));
        // Huge times saturate instead of wrapping into the past.
        store.results().put("t", b"{}".to_vec(), Duration::MAX, |_| false).await.unwrap();
        assert!(store.results().get("t").is_some(), "a result with a huge ttl is kept, not expired at once");
        drop(store);
        std::fs::remove_dir_all(dir).ok();
    }

    #[tokio::test]
    async fn damaged_metadata_is_repaired_or_quarantined_and_the_broker_starts() {
        let dir = tempdir();
        let store = LogStore::open(&dir, StoreConfig::default()).unwrap();
        for q in ["name-lost", "count-lost", "beyond-repair", "healthy"] {
            store.append(q, vec![rec(q)]).await.unwrap();
        }
        store.sync().await.unwrap();
        drop(store);
        let topics = dir.join("topics");
        std::fs::write(topics.join("name-lost/name"), b"").unwrap();
        std::fs::write(topics.join("count-lost/partitions"), b"\0\0").unwrap();
        std::fs::write(topics.join("beyond-repair/partitions"), b"").unwrap();
        std::fs::remove_dir_all(topics.join("beyond-repair/0")).unwrap();
        // A queue whose creation a crash interrupted.
        std::fs::create_dir_all(topics.join(".tmp-0123/0")).unwrap();

        let store = LogStore::open(&dir, StoreConfig::default()).unwrap();
        assert_eq!(drain(&store, "name-lost"), ["name-lost"]);
        assert_eq!(std::fs::read(topics.join("name-lost/name")).unwrap(), b"name-lost");
        assert_eq!(drain(&store, "count-lost"), ["count-lost"]);
        assert_eq!(drain(&store, "healthy"), ["healthy"]);
        let q = store.quarantined();
        assert_eq!(q.len(), 1, "{q:?}");
        assert_eq!(q[0].0, "beyond-repair");
        let err = store.append("beyond-repair", vec![rec("x")]).await.unwrap_err();
        assert!(matches!(err, LogError::Quarantined { .. }), "{err}");
        assert!(!topics.join(".tmp-0123").exists(), "the unfinished creation was removed");
        drop(store);
        std::fs::remove_dir_all(dir).ok();
    }

    #[tokio::test]
    async fn damage_in_a_segment_is_skipped_and_reported_and_other_records_are_served() {
        let (dir, cfg, segs) = segmented_queue().await;
        let pdir = dir.join("topics/q/0");
        // Damage the second record of the first (closed) segment and the middle of the last one.
        for seg in [&segs[0], segs.last().unwrap()] {
            let mut data = std::fs::read(seg).unwrap();
            let second = Record::decode(&data).unwrap().1;
            data[second..second + 4].copy_from_slice(&u32::MAX.to_le_bytes());
            std::fs::write(seg, &data).unwrap();
        }
        let store = LogStore::open(&dir, cfg).unwrap();
        let got = drain(&store, "q");
        assert_eq!(got.len(), 28, "exactly the two damaged records are lost: {got:?}");
        assert_eq!(got.last().map(String::as_str), Some("record-29"), "the records after the damage are served");
        assert_eq!(store.corrupt_records(), 2);
        let quarantined = std::fs::read_dir(pdir.join("quarantine")).unwrap().count();
        assert_eq!(quarantined, 2, "the damaged bytes are kept for inspection");
        // Appends go on after the recovered tail, and a reopen finds everything acknowledged.
        store.append("q", vec![rec("after")]).await.unwrap();
        assert_eq!(drain(&store, "q"), ["after"]);
        drop(store);
        std::fs::remove_dir_all(dir).ok();
    }

    #[tokio::test]
    async fn a_lost_middle_segment_costs_only_its_records() {
        let (dir, cfg, segs) = segmented_queue().await;
        let lost_from: u64 = segs[1].file_stem().unwrap().to_str().unwrap().parse().unwrap();
        let lost_to: u64 = segs[2].file_stem().unwrap().to_str().unwrap().parse().unwrap();
        std::fs::remove_file(&segs[1]).unwrap();
        let store = LogStore::open(&dir, cfg).unwrap();
        let got = drain(&store, "q");
        assert_eq!(got.len() as u64, 30 - (lost_to - lost_from), "{got:?}");
        assert_eq!(got.last().map(String::as_str), Some("record-29"));
        assert_eq!(store.corrupt_records(), lost_to - lost_from);
        drop(store);
        std::fs::remove_dir_all(dir).ok();
    }

    #[tokio::test]
    async fn a_failing_disk_refuses_publishes_loses_nothing_acknowledged_and_recovers() {
        for fault in [(Op::Sync, Fault::Eio), (Op::Write, Fault::NoSpace), (Op::Write, Fault::ShortWrite)] {
            let dir = tempdir();
            let store = LogStore::open(&dir, StoreConfig::default()).unwrap();
            store.append("q", vec![rec("before")]).await.unwrap();
            faults::inject(&dir, fault.0, fault.1, 2);
            assert!(store.append("q", vec![rec("refused-1")]).await.is_err(), "{fault:?}: must not be acknowledged");
            assert!(store.append("q", vec![rec("refused-2"), rec("refused-3")]).await.is_err(), "{fault:?}");
            faults::clear(&dir);
            store.append("q", vec![rec("after")]).await.unwrap();
            store.sync().await.unwrap();
            drop(store);
            let store = LogStore::open(&dir, StoreConfig::default()).unwrap();
            assert_eq!(drain(&store, "q"), ["before", "after"], "{fault:?}");
            assert_eq!(store.corrupt_records(), 0, "{fault:?}: no refused bytes were left in the log");
            drop(store);
            std::fs::remove_dir_all(dir).ok();
        }
    }

    #[tokio::test]
    async fn a_failed_fsync_fails_the_checkpoint_that_needed_it() {
        let dir = tempdir();
        let store = LogStore::open(&dir, StoreConfig::default()).unwrap();
        store.append("q", vec![rec("x"), rec("y")]).await.unwrap();
        let t = store.find_topic("q").unwrap().unwrap();
        let taken =
            t.partitions[0].take(Instant::now() + Duration::from_secs(30), 1, &Default::default()).unwrap().unwrap();
        t.partitions[0].ack(&[taken.record.offset]).unwrap();
        // Everything written and synced.
        store.sync().await.unwrap();
        // A sync with nothing settled since writes no checkpoint (and needs no fsync).
        faults::inject(&dir, Op::Sync, Fault::Eio, 1);
        store.sync().await.unwrap();
        faults::clear(&dir);
        // One more ack: the checkpoint's own fsync fails.
        let second =
            t.partitions[0].take(Instant::now() + Duration::from_secs(30), 1, &Default::default()).unwrap().unwrap();
        t.partitions[0].ack(&[second.record.offset]).unwrap();
        faults::inject(&dir.join("topics/q/0/checkpoint.tmp"), Op::Sync, Fault::Eio, 1);
        assert!(store.sync().await.is_err(), "a checkpoint whose fsync failed is not reported done");
        faults::clear(&dir);
        store.sync().await.unwrap();
        drop((t, taken, second, store));
        std::fs::remove_dir_all(dir).ok();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn many_queues_share_the_writer_threads_and_a_bounded_set_of_descriptors() {
        let dir = tempdir();
        let cfg = StoreConfig { max_open_files: 16, segment_bytes: 300, ..StoreConfig::default() };
        let store = LogStore::open(&dir, cfg.clone()).unwrap();
        let sends = (0..100).map(|i| {
            let store = store.clone();
            async move { store.append(&format!("q{i}"), vec![rec(&format!("a{i}")), rec(&format!("b{i}"))]).await }
        });
        for r in futures::future::join_all(sends).await {
            r.unwrap();
        }
        for i in 0..100 {
            assert_eq!(drain(&store, &format!("q{i}")), [format!("a{i}"), format!("b{i}")]);
        }
        store.sync().await.unwrap();
        assert!(store.open_files() <= 16, "{} files open", store.open_files());
        assert!(super::super::partition::writer_threads() <= super::super::partition::MAX_WRITER_THREADS);
        // Every record, every ack, across several segments per queue: all there after a reopen.
        drop(store);
        let store = LogStore::open(&dir, cfg).unwrap();
        for i in (0..100).step_by(7) {
            store.append(&format!("q{i}"), vec![rec("c")]).await.unwrap();
            assert_eq!(drain(&store, &format!("q{i}")), ["c"], "q{i}: the acked records stay finished");
        }
        drop(store);
        std::fs::remove_dir_all(dir).ok();
    }

    #[tokio::test]
    async fn broadcast_keys_and_patterns_are_bounded() {
        let dir = tempdir();
        let store = LogStore::open(&dir, StoreConfig::default()).unwrap();
        let long = vec!["*"; 200].join(".");
        assert!(store.subscribe("x", &long).is_err(), "a 399-byte pattern is refused");
        let mut rx = store.subscribe("x", "a.#").unwrap();
        assert!(store.broadcast("x", &vec!["a"; 200].join("."), b"").is_err());
        store.broadcast("x", "a.b", b"hi").unwrap();
        assert_eq!(rx.try_recv().unwrap().body, b"hi");
        drop(store);
        std::fs::remove_dir_all(dir).ok();
    }

    #[tokio::test]
    async fn files_and_directories_are_owner_only() {
        let dir = tempdir();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let store = LogStore::open(&dir, StoreConfig::default()).unwrap();
        store.append("q", vec![rec("x")]).await.unwrap();
        store.results().put("id", b"{}".to_vec(), Duration::from_secs(60), |_| false).await.unwrap();
        store.sync().await.unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700);
        for f in files_under(&dir) {
            let want = if f.is_dir() { 0o700 } else { 0o600 };
            assert_eq!(mode(&f), want, "{}", f.display());
        }
        drop(store);
        std::fs::remove_dir_all(dir).ok();
    }
}

//! Results, stored documents, leases and chord tallies: [`ResultStore`], the results API of a
//! store (what the `log://` result backend and beat need), over the results log.
//!
//! Every put, forget, lease, stored document and chord tally is a keyed record appended to
//! `results/<generation>/` (an empty payload deletes its key), replayed into memory on open (the
//! latest record of each key wins; an unexpired SUCCESS is never replaced). Compaction rewrites what
//! is live into the next generation and then switches `results/CURRENT` to it atomically, so the log
//! stays proportional to the live results rather than to everything ever stored. A crash before the
//! switch leaves the old generation in charge (the half-written one is deleted on open); after it,
//! the new one.
//!
//! Leases and stored documents are results under reserved keys (`_celery_rs.lease.<name>`,
//! `_celery_rs.doc.<key>`; task ids are UUIDs, so they never meet); a chord's tally is
//! `_celery_rs.chord.<group>` (its size), `.../<task id>` (one per counted member) and `...!by`
//! (the member that completed it).
//!
//! The monitor's task history ([`celery_core::history`]) is kept here too, as a compacted topic:
//! `_celery_rs.history.<task id>` holds a task's latest record (JSON), expiring with the
//! retention; records trimmed by count get a tombstone. In memory the history is a
//! [`history::Index`] (by time, for search) instead of raw documents, and compaction writes it back.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use celery_core::backend::{ChordMember, ChordTally};
use celery_core::history::{self, HistoryPage, HistoryQuery, Retain, TaskRecord};
use celery_core::sync::lock;
use celery_core::{TaskMeta, TaskState};
use tokio::sync::{Notify, RwLock};

use super::error::LogError;
use super::partition::{Partition, PartitionConfig};
use super::record::{check_size, now_ms, NewRecord, Record};

/// Records written per append while compacting.
const COMPACT_BATCH: usize = 4096;

/// The most bytes of documents one append of [`ResultStore::put_many`] writes, unless its one
/// document is larger.
const MAX_PUT_MANY_BYTES: usize = 1 << 20;

/// The results log of a store: its generations, appends and compaction.
#[derive(Debug)]
struct ResultsLog {
    root: PathBuf,
    cfg: PartitionConfig,
    /// The current generation and its partition. Writers hold it shared; compaction exclusively.
    current: RwLock<(u64, Arc<Partition>)>,
}

/// What a compaction did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Compacted {
    /// Bytes on disk before.
    pub bytes_before: u64,
    /// Bytes on disk after.
    pub bytes_after: u64,
    /// Live records written.
    pub records: usize,
}

fn generation_dir(root: &Path, generation: u64) -> PathBuf {
    root.join(generation.to_string())
}

fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".log"))
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .sum()
}

impl ResultsLog {
    /// Opens `root` (creating it), deletes generations other than the current one (left by a
    /// compaction that did not finish), and calls `f` with every record in order.
    fn open(root: &Path, cfg: &PartitionConfig, f: impl FnMut(Record)) -> Result<ResultsLog, LogError> {
        super::disk::create_dir_all(root)?;
        let current_path = root.join("CURRENT");
        let generation = match std::fs::read_to_string(&current_path) {
            Ok(s) => s.trim().parse::<u64>().map_err(|_| LogError::Corrupt {
                path: current_path.clone(),
                offset: 0,
                reason: format!("not a generation number: {s:?}"),
            })?,
            Err(_) => 0,
        };
        for entry in std::fs::read_dir(root).map_err(|e| LogError::io(root, e))?.flatten() {
            let stale = entry.file_name().to_str().and_then(|n| n.parse::<u64>().ok()).is_some_and(|g| g != generation);
            if stale {
                tracing::info!(dir = %entry.path().display(), "log: removing a results generation left by an unfinished compaction");
                std::fs::remove_dir_all(entry.path()).map_err(|e| LogError::io(&entry.path(), e))?;
            }
        }
        let part = Partition::open(&generation_dir(root, generation), cfg, Arc::new(Notify::new()))?;
        part.scan_from(0, f)?;
        Ok(ResultsLog { root: root.to_owned(), cfg: cfg.clone(), current: RwLock::new((generation, Arc::new(part))) })
    }

    /// Appends `records`, then runs `apply` (the in-memory change) before a compaction can start,
    /// so a compaction's snapshot never misses a record of the old generation.
    async fn append<T>(&self, records: Vec<NewRecord>, apply: impl FnOnce() -> T) -> Result<T, LogError> {
        let cur = self.current.read().await;
        cur.1.log.append(records).await?;
        Ok(apply())
    }

    /// Waits until everything appended is written.
    async fn flush(&self) -> Result<(), LogError> {
        self.current.read().await.1.log.flush().await
    }

    /// Bytes of segments in the current generation.
    async fn disk_bytes(&self) -> u64 {
        dir_bytes(&generation_dir(&self.root, self.current.read().await.0))
    }

    /// Writes `live()` (taken once no write is in flight) into the next generation, makes it
    /// durable, switches to it and deletes the old one. Writers wait meanwhile.
    async fn compact(&self, live: impl FnOnce() -> Vec<NewRecord>) -> Result<Compacted, LogError> {
        let mut cur = self.current.write().await;
        let (old_gen, old) = (cur.0, cur.1.clone());
        let bytes_before = dir_bytes(&generation_dir(&self.root, old_gen));
        let next_gen = old_gen + 1;
        let next_dir = generation_dir(&self.root, next_gen);
        if next_dir.exists() {
            std::fs::remove_dir_all(&next_dir).map_err(|e| LogError::io(&next_dir, e))?;
        }
        let next = Arc::new(Partition::open(&next_dir, &self.cfg, Arc::new(Notify::new()))?);
        let mut records = live();
        let count = records.len();
        while !records.is_empty() {
            let rest = records.split_off(records.len().min(COMPACT_BATCH));
            next.log.append(std::mem::replace(&mut records, rest)).await?;
        }
        // fsyncs the new segments whatever the fsync policy.
        next.checkpoint().await?;
        super::disk::replace_file(&self.root.join("CURRENT"), next_gen.to_string().as_bytes())?;
        *cur = (next_gen, next);
        drop(cur);
        old.log.close();
        drop(old);
        let old_dir = generation_dir(&self.root, old_gen);
        if let Err(e) = std::fs::remove_dir_all(&old_dir) {
            tracing::warn!(error = %e, dir = %old_dir.display(), "log: cannot remove the old results generation");
        }
        let stats = Compacted { bytes_before, bytes_after: dir_bytes(&next_dir), records: count };
        tracing::info!(?stats, "log: results compacted");
        Ok(stats)
    }
}

/// Bytes a stored record takes beyond its key and payload (frame, offset, time, expiry header).
const RECORD_OVERHEAD: usize = 60;
/// The results log is not compacted below this size.
const COMPACT_MIN_BYTES: u64 = 64 << 20;
/// A stored document is kept until replaced.
pub(crate) const DOC_TTL: Duration = Duration::from_secs(100 * 365 * 86_400);

const CHORD_PREFIX: &str = "_celery_rs.chord.";
/// The key prefix of the monitor's task history.
const HISTORY_PREFIX: &str = "_celery_rs.history.";

/// The results log record of a history entry (an empty payload: its tombstone).
fn history_record(id: &str, payload: Vec<u8>, expires: i64) -> NewRecord {
    NewRecord {
        headers: vec![("expires".into(), expires.to_string().into_bytes())],
        key: format!("{HISTORY_PREFIX}{id}").into_bytes(),
        payload,
        not_before_ms: 0,
    }
}

/// About the bytes a history record takes in the log (for the compaction decision).
fn history_bytes(t: &TaskRecord) -> u64 {
    let opt = |s: &Option<String>| s.as_ref().map_or(0, String::len);
    (t.id.len() * 2
        + t.name.len()
        + t.state.len()
        + t.hostname.len()
        + t.args.len()
        + t.kwargs.len()
        + opt(&t.result)
        + opt(&t.exception)
        + opt(&t.traceback)
        + t.timeline.len() * 40
        + 300
        + RECORD_OVERHEAD) as u64
}

/// A chord's records among the results: `<prefix><group>` (size), `/<task id>` (members), `!by`.
fn chord_key(group: &str, suffix: &str) -> String {
    format!("{CHORD_PREFIX}{group}{suffix}")
}

/// The result key a lease is kept under.
pub(crate) fn lease_key(name: &str) -> String {
    format!("_celery_rs.lease.{name}")
}

/// The result key a stored document (`Documents::store_doc`) is kept under.
pub(crate) fn doc_key(key: &str) -> String {
    format!("_celery_rs.doc.{key}")
}

/// A stored SUCCESS is never overwritten.
pub(crate) fn is_success(doc: &[u8]) -> bool {
    TaskMeta::from_slice(doc).is_ok_and(|m| m.status == TaskState::Success)
}

/// SUCCESS, FAILURE, REVOKED.
pub(crate) fn is_ready(doc: &[u8]) -> bool {
    TaskMeta::from_slice(doc).is_ok_and(|m| m.status.is_ready())
}

/// The live results in memory: id -> (document, expiry in ms since the epoch), and the waiters.
#[derive(Debug, Default)]
pub(crate) struct Live {
    pub(crate) values: HashMap<String, (Vec<u8>, i64)>,
    pub(crate) waiters: HashMap<String, Arc<Notify>>,
}

impl Live {
    /// Applies one record of the results log when opening: an empty payload or an expired one
    /// deletes the key; a document never replaces an unexpired SUCCESS, as [`ResultStore::put`]
    /// decides when it applies a write (a write that raced a SUCCESS may be on disk after it).
    fn replay(&mut self, id: String, payload: Vec<u8>, expires: i64, now: i64) {
        if payload.is_empty() || expires <= now {
            self.values.remove(&id);
        } else if !self.values.get(&id).is_some_and(|(old, exp)| *exp > now && is_success(old)) {
            self.values.insert(id, (payload, expires));
        }
    }
}

/// The results of a store (`LogStore::results`): documents with expiry and waiters, leases, stored
/// documents and chord tallies, durable in the results log.
///
/// ```
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// use std::time::Duration;
/// use broker_backends::log::{LogStore, StoreConfig};
/// let dir = std::env::temp_dir().join(format!("doc-result-store-{}", std::process::id()));
/// let store = LogStore::open(&dir, StoreConfig::default()).unwrap();
/// let results = store.results();
/// results.put("t1", br#"{"status": "SUCCESS"}"#.to_vec(), Duration::from_secs(60), |_| false).await.unwrap();
/// assert!(results.get("t1").is_some());
/// assert!(results.lease("leader", "me", Some(Duration::from_secs(5))).await.unwrap());
/// assert_eq!(results.lease_holder("leader").as_deref(), Some("me"));
/// # drop(store); std::fs::remove_dir_all(dir).ok();
/// # });
/// ```
#[derive(Debug)]
pub struct ResultStore {
    log: ResultsLog,
    max_record_bytes: usize,
    pub(crate) live: Mutex<Live>,
    /// The monitor's task history (`_celery_rs.history.*` records), by time.
    history: Mutex<history::Index>,
    /// Chord tallies by group id (persisted among the results, rebuilt on open).
    chords: Mutex<HashMap<String, ChordTally>>,
    /// Serializes read-decide-write operations (leases, chord tallies).
    cas_lock: tokio::sync::Mutex<()>,
    /// A sweep (and compaction) is running: the next waits for it to end.
    maintaining: AtomicBool,
}

impl ResultStore {
    /// Opens the results log under `root` and replays it into memory.
    pub(crate) fn open(root: &Path, cfg: &PartitionConfig, max_record_bytes: usize) -> Result<ResultStore, LogError> {
        let mut live = Live::default();
        let mut hist = history::Index::default();
        let now = now_ms();
        let log = ResultsLog::open(root, cfg, |rec| {
            let expires = rec
                .headers
                .iter()
                .find(|(k, _)| k == "expires")
                .and_then(|(_, v)| std::str::from_utf8(v).ok()?.parse().ok())
                .unwrap_or(i64::MAX);
            let key = String::from_utf8_lossy(&rec.key).into_owned();
            if let Some(id) = key.strip_prefix(HISTORY_PREFIX) {
                match serde_json::from_slice::<TaskRecord>(&rec.payload) {
                    Ok(t) if expires > now && !rec.payload.is_empty() => hist.put(t, expires),
                    _ => {
                        hist.remove(id);
                    }
                }
                return;
            }
            live.replay(key, rec.payload, expires, now);
        })?;
        let chords = Mutex::new(rebuild_chords(&live));
        Ok(ResultStore {
            log,
            max_record_bytes,
            live: Mutex::new(live),
            history: Mutex::new(hist),
            chords,
            cas_lock: tokio::sync::Mutex::new(()),
            maintaining: AtomicBool::new(false),
        })
    }

    /// Stores a result document for `id` unless `keep(existing)` says the stored one must stay;
    /// returns whether it was stored. Reopening the store keeps an unexpired SUCCESS the same way.
    pub async fn put(
        &self,
        id: &str,
        doc: Vec<u8>,
        ttl: Duration,
        keep: impl Fn(&[u8]) -> bool,
    ) -> Result<bool, LogError> {
        check_size("result", id.len() + doc.len() + 64, self.max_record_bytes)?;
        let expires = celery_core::clock::expiry_ms(now_ms(), ttl);
        {
            let live = lock(&self.live);
            if live.values.get(id).is_some_and(|(old, exp)| *exp > now_ms() && keep(old)) {
                return Ok(false);
            }
        }
        let rec = NewRecord {
            headers: vec![("expires".into(), expires.to_string().into_bytes())],
            key: id.as_bytes().to_vec(),
            payload: doc.clone(),
            not_before_ms: 0,
        };
        // Decided again when applied: a concurrent write for the same id (a redelivered task's
        // STARTED beside its SUCCESS) passed the same check while neither was applied, and the
        // one applied last must not replace what must stay. Opening the store replays the log
        // with the same rule (`Live::replay`), whatever order the records were written in.
        let (stored, waiter) = self
            .log
            .append(vec![rec], || {
                let mut live = lock(&self.live);
                if live.values.get(id).is_some_and(|(old, exp)| *exp > now_ms() && keep(old)) {
                    return (false, None);
                }
                live.values.insert(id.to_owned(), (doc, expires));
                (true, live.waiters.remove(id))
            })
            .await?;
        if let Some(w) = waiter {
            w.notify_waiters();
        }
        Ok(stored)
    }

    /// Stores each `(id, document)` as [`put`](Self::put) does, in order (a later document of an
    /// id after an earlier one), with one append (one write, one sync) per
    /// [`MAX_PUT_MANY_BYTES`] of documents: what the worker's batched stores use. A document over
    /// the record size limit fails the call before anything is written. Returns how many were
    /// stored.
    pub async fn put_many(
        &self,
        docs: Vec<(String, Vec<u8>)>,
        ttl: Duration,
        keep: impl Fn(&[u8]) -> bool,
    ) -> Result<usize, LogError> {
        for (id, doc) in &docs {
            check_size("result", id.len() + doc.len() + 64, self.max_record_bytes)?;
        }
        let expires = celery_core::clock::expiry_ms(now_ms(), ttl);
        let expires_header = expires.to_string().into_bytes();
        let (mut stored, mut docs) = (0, docs.into_iter().peekable());
        while docs.peek().is_some() {
            let (mut chunk, mut bytes) = (Vec::new(), 0);
            while let Some((id, doc)) = docs.next_if(|(_, d)| chunk.is_empty() || bytes + d.len() <= MAX_PUT_MANY_BYTES)
            {
                bytes += doc.len();
                chunk.push((id, doc));
            }
            // Those that must stay are not written (as `put`); decided again when applied.
            {
                let live = lock(&self.live);
                let now = now_ms();
                chunk.retain(|(id, _)| !live.values.get(id).is_some_and(|(old, exp)| *exp > now && keep(old)));
            }
            if chunk.is_empty() {
                continue;
            }
            let records = chunk
                .iter()
                .map(|(id, doc)| NewRecord {
                    headers: vec![("expires".into(), expires_header.clone())],
                    key: id.as_bytes().to_vec(),
                    payload: doc.clone(),
                    not_before_ms: 0,
                })
                .collect();
            let (n, waiters) = self
                .log
                .append(records, || {
                    let mut live = lock(&self.live);
                    let now = now_ms();
                    let (mut n, mut waiters) = (0, Vec::new());
                    for (id, doc) in chunk {
                        if live.values.get(&id).is_some_and(|(old, exp)| *exp > now && keep(old)) {
                            continue;
                        }
                        waiters.extend(live.waiters.remove(&id));
                        live.values.insert(id, (doc, expires));
                        n += 1;
                    }
                    (n, waiters)
                })
                .await?;
            for w in waiters {
                w.notify_waiters();
            }
            stored += n;
        }
        Ok(stored)
    }

    /// The result document of `id`, if stored and not expired.
    pub fn get(&self, id: &str) -> Option<Vec<u8>> {
        let live = lock(&self.live);
        live.values.get(id).filter(|(_, exp)| *exp > now_ms()).map(|(d, _)| d.clone())
    }

    /// Waits until `ready(doc)` holds for `id`'s document or `timeout` passes; returns the document.
    /// The id's waiter entry goes when its last waiter does (a timeout, a cancelled wait, or a stored
    /// result), so waits on ids that never get a result leave nothing behind.
    pub async fn wait(&self, id: &str, timeout: Duration, ready: impl Fn(&[u8]) -> bool) -> Option<Vec<u8>> {
        /// One waiter's hold on the id's entry; the last one to let go removes it.
        struct Waiting<'a> {
            results: &'a ResultStore,
            id: &'a str,
            notify: Option<Arc<Notify>>,
        }
        impl Drop for Waiting<'_> {
            fn drop(&mut self) {
                let mut live = lock(&self.results.live);
                // Clones are made and dropped under this lock, so the count is exact: the map's
                // and this one mean no one else waits.
                if let Some(mine) = self.notify.take() {
                    if live.waiters.get(self.id).is_some_and(|n| Arc::ptr_eq(n, &mine)) && Arc::strong_count(&mine) == 2
                    {
                        live.waiters.remove(self.id);
                    }
                }
            }
        }
        let deadline = celery_core::clock::instant_after(timeout);
        loop {
            let notify =
                lock(&self.live).waiters.entry(id.to_owned()).or_insert_with(|| Arc::new(Notify::new())).clone();
            let waiting = Waiting { results: self, id, notify: Some(notify) };
            let notified = waiting.notify.as_deref().map(Notify::notified);
            let cur = self.get(id);
            if cur.as_deref().is_some_and(&ready) || tokio::time::Instant::now() >= deadline {
                return cur;
            }
            if let Some(notified) = notified {
                let _ = tokio::time::timeout_at(deadline, notified).await;
            }
        }
    }

    /// Deletes `id`'s document.
    pub async fn forget(&self, id: &str) -> Result<(), LogError> {
        let rec = NewRecord { key: id.as_bytes().to_vec(), ..NewRecord::default() };
        self.log.append(vec![rec], || lock(&self.live).values.remove(id)).await?;
        Ok(())
    }

    /// Takes or renews (`ttl` given) or releases (`None`) the lease `name` for `holder`; true when
    /// `holder` holds it afterwards. Leases are stored like results, so they survive an owner restart.
    pub async fn lease(&self, name: &str, holder: &str, ttl: Option<Duration>) -> Result<bool, LogError> {
        let key = lease_key(name);
        let _one_at_a_time = self.cas_lock.lock().await;
        let mine = match self.get(&key) {
            None => true,
            Some(cur) => cur == holder.as_bytes(),
        };
        match ttl {
            Some(ttl) if mine => self.put(&key, holder.as_bytes().to_vec(), ttl, |_| false).await.map(|_| true),
            Some(_) => Ok(false),
            None if mine => self.forget(&key).await.map(|_| false),
            None => Ok(false),
        }
    }

    /// Who holds the lease `name`, if anyone.
    pub fn lease_holder(&self, name: &str) -> Option<String> {
        self.get(&lease_key(name)).map(|h| String::from_utf8_lossy(&h).into_owned())
    }

    /// Records a chord's size (kept for `ttl`).
    pub async fn chord_size(&self, group: &str, size: usize, ttl: Duration) -> Result<(), LogError> {
        let _one_at_a_time = self.cas_lock.lock().await;
        let doc = size.to_string().into_bytes();
        self.put(&chord_key(group, ""), doc, ttl, |_| false).await?;
        lock(&self.chords).entry(group.to_owned()).or_default().size = Some(size);
        Ok(())
    }

    /// Counts a chord member (see `Chords::chord_part`): persisted first, then counted.
    pub async fn chord_part(
        &self,
        group: &str,
        member: ChordMember,
        ttl: Duration,
    ) -> Result<Option<Vec<ChordMember>>, LogError> {
        let _one_at_a_time = self.cas_lock.lock().await;
        let mut tally = lock(&self.chords).get(group).cloned().unwrap_or_default();
        let (known, by) = (tally.members.contains_key(&member.task_id), tally.completed_by.clone());
        let id = member.task_id.clone();
        let doc = serde_json::to_vec(&member).map_err(|source| LogError::Json { what: "chord member", source })?;
        let out = tally.part(member);
        if !known {
            self.put(&chord_key(group, &format!("/{id}")), doc, ttl, |_| false).await?;
        }
        if tally.completed_by != by {
            self.put(&chord_key(group, "!by"), id.into_bytes(), ttl, |_| false).await?;
        }
        lock(&self.chords).insert(group.to_owned(), tally);
        Ok(out)
    }

    /// Forgets a chord's tally.
    pub async fn chord_done(&self, group: &str) -> Result<(), LogError> {
        let _one_at_a_time = self.cas_lock.lock().await;
        let Some(tally) = lock(&self.chords).remove(group) else { return Ok(()) };
        let mut keys = vec![chord_key(group, ""), chord_key(group, "!by")];
        keys.extend(tally.members.keys().map(|id| chord_key(group, &format!("/{id}"))));
        let tombstones =
            keys.iter().map(|k| NewRecord { key: k.as_bytes().to_vec(), ..NewRecord::default() }).collect();
        self.log
            .append(tombstones, || {
                let mut live = lock(&self.live);
                for k in &keys {
                    live.values.remove(k);
                }
            })
            .await
    }

    /// Stores task history records (at most [`history::MAX_BATCH`]), each replacing its id's, then
    /// forgets what `keep` no longer keeps (with tombstones, so a reopened store does not bring
    /// them back).
    pub async fn record_history(&self, tasks: &[TaskRecord], keep: &Retain) -> Result<(), LogError> {
        history::check_batch(tasks).map_err(|e| LogError::Invalid(e.to_string()))?;
        let mut records = Vec::with_capacity(tasks.len());
        let mut bounded = Vec::with_capacity(tasks.len());
        for t in tasks {
            let t = t.bounded();
            let doc = serde_json::to_vec(&t).map_err(|source| LogError::Json { what: "history record", source })?;
            check_size("history record", t.id.len() + doc.len() + 64, self.max_record_bytes)?;
            let expires = history::expiry_ms(&t, keep);
            records.push(history_record(&t.id, doc, expires));
            bounded.push((t, expires));
        }
        let gone = self
            .log
            .append(records, || {
                let mut index = lock(&self.history);
                for (t, expires) in bounded {
                    index.put(t, expires);
                }
                index.trim(now_ms(), keep)
            })
            .await?;
        if !gone.is_empty() {
            let tombstones = gone.iter().map(|id| history_record(id, Vec::new(), 0)).collect();
            self.log.append(tombstones, || ()).await?;
        }
        Ok(())
    }

    /// One page of the task history matching `query` (checked by the caller).
    pub fn search_history(&self, query: &HistoryQuery) -> HistoryPage {
        lock(&self.history).search(query, now_ms())
    }

    /// Waits until everything appended is written.
    pub(crate) async fn flush(&self) -> Result<(), LogError> {
        self.log.flush().await
    }

    /// Forgets expired results in memory (their records go at the next compaction); the bytes of
    /// what is live.
    fn sweep(&self) -> u64 {
        let now = now_ms();
        let history = {
            let mut index = lock(&self.history);
            index.trim(now, &Retain { retention: Duration::MAX, max_tasks: usize::MAX });
            index.iter().map(|(t, _)| history_bytes(t)).sum::<u64>()
        };
        let mut live = lock(&self.live);
        live.values.retain(|_, (_, expires)| *expires > now);
        history + live.values.iter().map(|(k, (doc, _))| (k.len() + doc.len() + RECORD_OVERHEAD) as u64).sum::<u64>()
    }

    /// Rewrites the results log with only what is live (unexpired results, leases, stored
    /// documents, chord tallies). It also runs by itself when the log is over 64 MiB and four times
    /// what is live.
    pub async fn compact(&self) -> Result<Compacted, LogError> {
        self.log
            .compact(|| {
                let now = now_ms();
                let live = lock(&self.live);
                let mut records: Vec<NewRecord> = live
                    .values
                    .iter()
                    .filter(|(_, (_, expires))| *expires > now)
                    .map(|(id, (doc, expires))| NewRecord {
                        headers: vec![("expires".into(), expires.to_string().into_bytes())],
                        key: id.as_bytes().to_vec(),
                        payload: doc.clone(),
                        not_before_ms: 0,
                    })
                    .collect();
                let index = lock(&self.history);
                records.extend(
                    index
                        .iter()
                        .filter(|(_, expires)| *expires > now)
                        .filter_map(|(t, expires)| Some(history_record(&t.id, serde_json::to_vec(t).ok()?, expires))),
                );
                records
            })
            .await
    }

    /// Sweeps expired results and compacts the results log when it is mostly dead, on a task of
    /// its own (a compaction takes about a second per 100 MB); nothing when one is still running.
    pub(crate) fn maintain(self: &Arc<Self>) {
        if self.maintaining.swap(true, Ordering::AcqRel) {
            return;
        }
        let results = self.clone();
        tokio::spawn(async move {
            let live = results.sweep();
            let on_disk = results.log.disk_bytes().await;
            if on_disk > COMPACT_MIN_BYTES && on_disk > live.saturating_mul(4) {
                if let Err(e) = results.compact().await {
                    tracing::error!(error = %e, "log: compacting the results failed; the old log stays in use");
                }
            }
            results.maintaining.store(false, Ordering::Release);
        });
    }
}

/// The chord tallies held in the live results (on open).
fn rebuild_chords(live: &Live) -> HashMap<String, ChordTally> {
    let mut chords: HashMap<String, ChordTally> = HashMap::new();
    for (key, (doc, _)) in &live.values {
        let Some(rest) = key.strip_prefix(CHORD_PREFIX) else { continue };
        if let Some((group, _)) = rest.split_once('/') {
            if let Ok(m) = serde_json::from_slice::<ChordMember>(doc) {
                chords.entry(group.to_owned()).or_default().members.insert(m.task_id.clone(), m);
            }
        } else if let Some(group) = rest.strip_suffix("!by") {
            chords.entry(group.to_owned()).or_default().completed_by = Some(String::from_utf8_lossy(doc).into());
        } else {
            chords.entry(rest.to_owned()).or_default().size =
                std::str::from_utf8(doc).ok().and_then(|s| s.parse().ok());
        }
    }
    chords
}

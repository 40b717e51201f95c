//! The store's acks journal: the acks and delivery counts of every partition in one file, appended
//! by all the writers and fsynced once per window for all of them.
//!
//! Before it, each partition had an `acks.log` of its own: draining a thousand queues created,
//! wrote and fsynced a thousand files, and that was most of what the writers did. Now a writer
//! appends its batch of settlements as one frame (tagged with its partition) to the current
//! generation, and one fsync a window makes every partition's acks durable together.
//!
//! Layout: `acks/<generation:020>.log`, frames `len:u32 crc:u32 body` (bit 31 of `len`,
//! [`COUNTS_FRAME`], marks delivery counts), body = `klen:u16 key entries`, `key` = the
//! partition's directory relative to the store (`topics/<queue>/<n>`), entries `offset:u64*` (acks)
//! or `(offset:u64 deliveries:u32)*` (counts): the frames of the old `acks.log` with the
//! partition's name in front.
//!
//! Durability, per fsync policy: `always`: at most [`ACK_SYNC`] after the write (a pool timer);
//! `<ms>`: at most that long after; `os`: never explicitly. A crash in that window loses acks,
//! which only delivers their records again (at-least-once); a lost ack never loses a record.
//!
//! Bounded: a generation is closed at [`ROLL_BYTES`] and a new one started. A closed generation is
//! deleted once every partition with frames in it has written a `checkpoint` since (a checkpoint
//! covers every ack its writer journaled before it): on a roll, each of those partitions is asked
//! to checkpoint. A clean shutdown checkpoints every partition with journaled acks, so it leaves
//! no journal behind.
//!
//! Recovery: opening the store reads every generation, oldest first; each partition applies its
//! entries over its `checkpoint` (and over an `acks.log` left by an older version) in the order
//! they were written. A frame that fails its CRC or is cut short ends its generation's replay (a
//! torn tail: acks that were not durable, delivered again); the next generation is read as usual.
//! Appends go to a new generation after every open.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use celery_core::sync::lock;

use super::finished::{acks_frame, entry, read_frame, COUNTS_FRAME};
use super::pool::{pool, Job};
use super::round::AckRound;
use super::writer::Fsync;
use crate::log::storage::disk;
use crate::log::storage::error::LogError;

/// How long acks may wait for their fsync under `Fsync::Always` (every partition's acks of the
/// window share it).
pub(super) const ACK_SYNC: Duration = Duration::from_millis(10);

/// A generation is closed past this many bytes (about four million acks).
const ROLL_BYTES: u64 = 64 << 20;

/// Closed generations left at open beyond which their partitions checkpoint at once.
const MAX_CLOSED: usize = 8;

/// What one journal frame holds for its partition.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Entry {
    /// Offsets finished.
    Acks(Vec<u64>),
    /// Delivery counts of redelivered records.
    Counts(Vec<(u64, u32)>),
}

/// A partition's writer, asked to write its checkpoint (so a closed generation can go).
pub(super) trait Checkpointer: Send + Sync {
    /// Queues a checkpoint (nothing when the partition journaled nothing since its last one).
    fn ask(&self);
}

/// The acks journal of one store.
pub(crate) struct AcksJournal {
    /// The store's directory: keys are partition directories relative to it.
    root: PathBuf,
    /// `acks/`.
    dir: PathBuf,
    fsync: Fsync,
    roll_bytes: u64,
    state: Mutex<State>,
    /// Held while an fsync runs, so [`AcksJournal::sync`] returns only after one in flight is done.
    syncing: Mutex<()>,
    /// The writers whose acks the next write takes together (`round.rs`).
    round: Arc<AckRound>,
    /// Appends so far (tests count them).
    #[cfg(test)]
    pub(super) appends: std::sync::atomic::AtomicU64,
    me: Weak<AcksJournal>,
}

#[derive(Default)]
struct State {
    /// The generation appended to.
    generation: u64,
    /// Its file, created by the first append.
    file: Option<Arc<File>>,
    /// Its length (a failed write is cut back to it).
    len: u64,
    /// Written since the last fsync.
    dirty: bool,
    /// A sync timer is set.
    timer: bool,
    /// Per generation on disk (the current one too): the partitions with frames in it written
    /// after their last checkpoint.
    pending: BTreeMap<u64, HashSet<String>>,
    /// What opening read, per partition, until the partition opens.
    replayed: HashMap<String, Vec<Entry>>,
    /// The open partitions, to ask for checkpoints.
    writers: HashMap<String, Arc<dyn Checkpointer>>,
}

impl std::fmt::Debug for AcksJournal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let st = lock(&self.state);
        f.debug_struct("AcksJournal")
            .field("dir", &self.dir)
            .field("generation", &st.generation)
            .field("len", &st.len)
            .field("generations", &st.pending.len())
            .finish()
    }
}

impl AcksJournal {
    /// Opens the journal of the store at `root` (reading what it holds; nothing is created until
    /// the first ack).
    pub(crate) fn open(root: &Path, fsync: Fsync) -> Result<Arc<AcksJournal>, LogError> {
        Self::open_with(root, fsync, ROLL_BYTES)
    }

    fn open_with(root: &Path, fsync: Fsync, roll_bytes: u64) -> Result<Arc<AcksJournal>, LogError> {
        let dir = root.join("acks");
        let mut st = State::default();
        let mut generations: Vec<u64> = match std::fs::read_dir(&dir) {
            Ok(entries) => entries
                .filter_map(|e| e.ok())
                .filter_map(|e| {
                    e.file_name().to_str().and_then(|n| n.strip_suffix(".log")).and_then(|n| n.parse().ok())
                })
                .collect(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(LogError::io(&dir, e)),
        };
        generations.sort_unstable();
        for g in &generations {
            let path = generation_path(&dir, *g);
            let data = std::fs::read(&path).map_err(|e| LogError::io(&path, e))?;
            let keys = replay(&data, &path, &mut st.replayed);
            if keys.is_empty() {
                std::fs::remove_file(&path).map_err(|e| LogError::io(&path, e))?;
            } else {
                st.pending.insert(*g, keys);
            }
        }
        st.generation = generations.last().map_or(0, |g| g + 1);
        Ok(Arc::new_cyclic(|me| AcksJournal {
            root: root.to_owned(),
            dir,
            fsync,
            roll_bytes,
            state: Mutex::new(st),
            syncing: Mutex::new(()),
            round: AckRound::new(me.clone()),
            #[cfg(test)]
            appends: Default::default(),
            me: me.clone(),
        }))
    }

    /// The writers whose acks the next journal write takes together.
    pub(super) fn round(&self) -> &AckRound {
        &self.round
    }

    /// The key of the partition at `dir` (its path relative to the store).
    pub(super) fn key_of(&self, dir: &Path) -> String {
        dir.strip_prefix(&self.root).unwrap_or(dir).to_string_lossy().into_owned()
    }

    /// The entries opening found for `key`, in the order they were written (handed out once).
    pub(super) fn take_replayed(&self, key: &str) -> Vec<Entry> {
        lock(&self.state).replayed.remove(key).unwrap_or_default()
    }

    /// Registers an open partition's writer (asked to checkpoint when a generation closes).
    pub(super) fn register(&self, key: &str, writer: Arc<dyn Checkpointer>) {
        lock(&self.state).writers.insert(key.to_owned(), writer);
    }

    /// Forgets a closed partition's writer.
    pub(super) fn unregister(&self, key: &str) {
        lock(&self.state).writers.remove(key);
    }

    /// Appends `frames` (from [`frame`]) of the partition `key` with one write; they are fsynced per
    /// the policy. A failed write is cut back (those acks are not durable: their records are
    /// delivered again).
    pub(super) fn append(&self, key: &str, frames: &[u8]) -> Result<(), LogError> {
        self.append_many(&[key], frames)
    }

    /// Appends the frames of several partitions (`keys`: every partition with a frame in
    /// `frames`) with one write, as [`AcksJournal::append`] does for one.
    pub(super) fn append_many(&self, keys: &[&str], frames: &[u8]) -> Result<(), LogError> {
        if frames.is_empty() {
            return Ok(());
        }
        #[cfg(test)]
        self.appends.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut st = lock(&self.state);
        let path = generation_path(&self.dir, st.generation);
        let file = match &st.file {
            Some(f) => f.clone(),
            None => {
                let f = self.create(&path)?;
                st.file = Some(f.clone());
                st.len = 0;
                f
            }
        };
        if let Err(e) = disk::write_all(&file, frames, &path) {
            // A torn frame would end the replay of everything after it: cut it off, or (when even
            // that fails) write on in a new generation.
            if file.set_len(st.len).is_err() {
                let asks = self.roll_locked(&mut st);
                drop(st);
                asks.iter().for_each(|w| w.ask());
            }
            return Err(e);
        }
        st.len += frames.len() as u64;
        let generation = st.generation;
        let pending = st.pending.entry(generation).or_default();
        for key in keys {
            if !pending.contains(*key) {
                pending.insert((*key).to_owned());
            }
        }
        st.dirty = true;
        let timer = self.sync_timer(&mut st);
        let asks = if st.len >= self.roll_bytes { self.roll_locked(&mut st) } else { Vec::new() };
        drop(st);
        if let Some(at) = timer {
            let me: Weak<dyn Job> = self.me.clone();
            pool().wake_at(me, at);
        }
        asks.iter().for_each(|w| w.ask());
        Ok(())
    }

    /// The partition `key` wrote a checkpoint covering every frame it journaled so far: the closed
    /// generations no partition needs any more are deleted.
    pub(super) fn covered(&self, key: &str) {
        let mut st = lock(&self.state);
        let current = st.generation;
        let mut gone = Vec::new();
        st.pending.retain(|g, keys| {
            keys.remove(key);
            let done = keys.is_empty() && *g < current;
            if done {
                gone.push(*g);
            }
            !done
        });
        drop(st);
        for g in gone {
            let path = generation_path(&self.dir, g);
            if let Err(e) = std::fs::remove_file(&path) {
                // Replayed again at the next open: its acks are covered, so that costs only time.
                tracing::warn!(path = %path.display(), error = %e, "log: cannot delete a covered acks journal generation");
            }
        }
    }

    /// Called once the store opened its partitions: when stops without a clean shutdown left more
    /// than [`MAX_CLOSED`] closed generations (each open starts one), their partitions are asked to
    /// checkpoint now, so they go.
    pub(crate) fn trim_after_open(&self) {
        let asks: Vec<Arc<dyn Checkpointer>> = {
            let st = lock(&self.state);
            if st.pending.len() <= MAX_CLOSED {
                return;
            }
            let keys: HashSet<&String> = st.pending.values().flatten().collect();
            keys.into_iter().filter_map(|k| st.writers.get(k).cloned()).collect()
        };
        asks.iter().for_each(|w| w.ask());
    }

    /// fsyncs what was appended (returns after an fsync in flight is done too).
    pub(crate) fn sync(&self) -> Result<(), LogError> {
        if self.fsync == Fsync::Os {
            return Ok(());
        }
        let _one = lock(&self.syncing);
        let (file, path) = {
            let mut st = lock(&self.state);
            if !st.dirty {
                return Ok(());
            }
            st.dirty = false;
            (st.file.clone(), generation_path(&self.dir, st.generation))
        };
        let Some(file) = file else { return Ok(()) };
        if let Err(e) = disk::sync_data(&file, &path) {
            // Its pages may be lost whatever a later fsync says: the partitions with acks in it
            // make them durable in their checkpoints instead, and a new generation starts.
            tracing::error!(error = %e, "log: acks journal fsync failed; the partitions with acks in it checkpoint");
            let asks = {
                let mut st = lock(&self.state);
                if st.file.as_ref().is_some_and(|f| Arc::ptr_eq(f, &file)) {
                    self.roll_locked(&mut st)
                } else {
                    Vec::new()
                }
            };
            asks.iter().for_each(|w| w.ask());
            return Err(e);
        }
        Ok(())
    }

    /// Generations on disk now (tests).
    #[cfg(test)]
    pub(crate) fn generations(&self) -> Vec<u64> {
        let mut g: Vec<u64> = std::fs::read_dir(&self.dir)
            .map(|entries| {
                entries
                    .filter_map(|e| e.ok())
                    .filter_map(|e| e.file_name().to_str()?.strip_suffix(".log")?.parse().ok())
                    .collect()
            })
            .unwrap_or_default();
        g.sort_unstable();
        g
    }

    /// Creates the generation file at `path` (and `acks/` on first use), its entry made durable.
    fn create(&self, path: &Path) -> Result<Arc<File>, LogError> {
        if !self.dir.exists() {
            disk::create_dir_all(&self.dir)?;
            disk::sync_dir(&self.root)?;
        }
        let file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .mode(disk::FILE_MODE)
            .open(path)
            .map_err(|e| LogError::io(path, e))?;
        disk::sync_dir(&self.dir)?;
        Ok(Arc::new(file))
    }

    /// When the policy wants the appended frames fsynced, unless a timer is set already.
    fn sync_timer(&self, st: &mut State) -> Option<Instant> {
        let after = match self.fsync {
            Fsync::Always => ACK_SYNC,
            Fsync::Interval(d) => d,
            Fsync::Os => return None,
        };
        if st.timer {
            return None;
        }
        st.timer = true;
        Some(Instant::now() + after)
    }

    /// Closes the current generation (fsynced) and starts the next; returns the writers to ask for
    /// a checkpoint: every partition with frames in a closed generation.
    fn roll_locked(&self, st: &mut State) -> Vec<Arc<dyn Checkpointer>> {
        let old = st.generation;
        if let Some(f) = st.file.take() {
            if st.dirty && self.fsync != Fsync::Os {
                if let Err(e) = disk::sync_data(&f, &generation_path(&self.dir, old)) {
                    tracing::error!(error = %e, "log: acks journal fsync failed; the partitions with acks in it checkpoint");
                }
            }
        }
        st.dirty = false;
        st.generation += 1;
        st.len = 0;
        if st.pending.get(&old).is_some_and(|keys| keys.is_empty()) {
            st.pending.remove(&old);
            let _ = std::fs::remove_file(generation_path(&self.dir, old));
        }
        let keys: HashSet<&String> = st.pending.values().flatten().collect();
        keys.into_iter().filter_map(|k| st.writers.get(k).cloned()).collect()
    }
}

impl Job for AcksJournal {
    fn run(self: Arc<Self>) {
        self.tick();
    }

    fn tick(self: Arc<Self>) {
        lock(&self.state).timer = false;
        // A failure is logged and handled there (the partitions checkpoint).
        let _ = self.sync();
    }
}

impl Drop for AcksJournal {
    fn drop(&mut self) {
        if let Err(e) = self.sync() {
            tracing::error!(error = %e, "log: acks journal fsync at close failed");
        }
        // Every frame covered by a checkpoint (a clean shutdown): nothing to keep.
        let st = lock(&self.state);
        if st.pending.values().all(|keys| keys.is_empty()) && st.replayed.is_empty() {
            for g in st.pending.keys() {
                let _ = std::fs::remove_file(generation_path(&self.dir, *g));
            }
        }
    }
}

fn generation_path(dir: &Path, generation: u64) -> PathBuf {
    dir.join(format!("{generation:020}.log"))
}

/// The journal frames of one partition's settlements (acks first, then delivery counts), for
/// [`AcksJournal::append`].
pub(super) fn frame(key: &str, acks: &[u64], counts: &[(u64, u32)]) -> Vec<u8> {
    let head = |n: usize| {
        let mut body = Vec::with_capacity(2 + key.len() + n);
        body.extend_from_slice(&(key.len() as u16).to_le_bytes());
        body.extend_from_slice(key.as_bytes());
        body
    };
    let mut out = Vec::new();
    if !acks.is_empty() {
        let mut body = head(acks.len() * 8);
        acks.iter().for_each(|a| body.extend_from_slice(&a.to_le_bytes()));
        out.extend_from_slice(&acks_frame(0, &body));
    }
    if !counts.is_empty() {
        let mut body = head(counts.len() * 12);
        for (offset, n) in counts {
            body.extend_from_slice(&offset.to_le_bytes());
            body.extend_from_slice(&n.to_le_bytes());
        }
        out.extend_from_slice(&acks_frame(COUNTS_FRAME, &body));
    }
    out
}

/// Reads one generation into `out` (per partition, in order); returns the partitions found. A bad
/// or cut frame ends it (a torn tail, logged).
fn replay(data: &[u8], path: &Path, out: &mut HashMap<String, Vec<Entry>>) -> HashSet<String> {
    let mut keys = HashSet::new();
    let mut pos = 0;
    while pos < data.len() {
        let Some(((key, entry), used)) = decode(&data[pos..]) else {
            tracing::warn!(path = %path.display(), pos, bytes = data.len() - pos, "log: torn acks journal tail ignored (those acks were not durable; their records are delivered again)");
            break;
        };
        out.entry(key.clone()).or_default().push(entry);
        keys.insert(key);
        pos += used;
    }
    keys
}

/// One frame at the start of `data`: its partition, entry and length; `None` when it is bad or cut.
fn decode(data: &[u8]) -> Option<((String, Entry), usize)> {
    let (counts, body, used) = read_frame(data)?;
    let klen = u16::from_le_bytes(body.get(..2)?.try_into().ok()?) as usize;
    let key = std::str::from_utf8(body.get(2..2 + klen)?).ok()?.to_owned();
    Some(((key, entry(counts, &body[2 + klen..])?), used))
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use celery_core::flow::FairnessWeights;
    use tokio::sync::Notify;

    use super::super::finished::acks_frame;
    use super::super::tests::tempdir;
    use super::super::{Partition, PartitionConfig};
    use super::*;
    use crate::log::storage::files::FileCache;
    use crate::log::storage::record::NewRecord;

    fn cfg(journal: &Arc<AcksJournal>) -> PartitionConfig {
        PartitionConfig {
            fsync: Fsync::Always,
            segment_bytes: 1 << 20,
            files: FileCache::new(16),
            journal: journal.clone(),
        }
    }

    fn open(root: &Path, queue: &str, journal: &Arc<AcksJournal>) -> Partition {
        Partition::open(&root.join("topics").join(queue).join("0"), &cfg(journal), Arc::new(Notify::new())).unwrap()
    }

    async fn fill(p: &Partition, n: usize) {
        p.log
            .append((0..n).map(|i| NewRecord { payload: vec![i as u8], ..NewRecord::default() }).collect())
            .await
            .unwrap();
    }

    fn take(p: &Partition) -> Option<(u64, u32)> {
        let far = Instant::now() + Duration::from_secs(60);
        p.take(far, 1, &FairnessWeights::default()).unwrap().map(|t| (t.record.offset, t.deliveries))
    }

    /// Acks of two queues share the journal; a store that stops without a checkpoint (a crash)
    /// finds them there: acked records are not delivered again, the others are (as redeliveries).
    #[tokio::test]
    async fn acks_of_every_partition_survive_a_restart_through_the_journal() {
        let root = tempdir();
        {
            let journal = AcksJournal::open(&root, Fsync::Always).unwrap();
            let (a, b) = (open(&root, "a", &journal), open(&root, "b", &journal));
            fill(&a, 10).await;
            fill(&b, 10).await;
            for _ in 0..10 {
                take(&a).unwrap();
                take(&b).unwrap();
            }
            a.ack(&[0, 1, 2, 3, 4, 7]).unwrap();
            b.ack(&[0, 1, 2]).unwrap();
            a.log.flush().await.unwrap();
            b.log.flush().await.unwrap();
            assert_eq!(journal.generations(), [0], "one file for both queues");
        }
        for q in ["a", "b"] {
            let dir = root.join("topics").join(q).join("0");
            assert!(!dir.join("checkpoint").exists() && !dir.join("acks.log").exists(), "{q}: only the journal");
        }
        let journal = AcksJournal::open(&root, Fsync::Always).unwrap();
        let (a, b) = (open(&root, "a", &journal), open(&root, "b", &journal));
        let got: Vec<u64> = std::iter::from_fn(|| take(&a)).map(|(o, _)| o).collect();
        assert_eq!(got, [5, 6, 8, 9]);
        assert_eq!(take(&b), Some((3, 2)), "unacked: delivered again, counted as a redelivery");
        drop((a, b, journal));
        std::fs::remove_dir_all(root).ok();
    }

    /// A torn last frame (a crash mid-write) loses only its own acks (delivered again); the
    /// frames before it and the generations after it are read.
    #[tokio::test]
    async fn a_torn_journal_tail_costs_only_its_own_acks() {
        let root = tempdir();
        {
            let journal = AcksJournal::open(&root, Fsync::Always).unwrap();
            let a = open(&root, "a", &journal);
            fill(&a, 4).await;
            for _ in 0..4 {
                take(&a).unwrap();
            }
            a.ack(&[0]).unwrap();
            a.log.flush().await.unwrap();
            a.ack(&[1]).unwrap();
            a.log.flush().await.unwrap();
        }
        let file = root.join("acks").join(format!("{:020}.log", 0));
        let len = std::fs::metadata(&file).unwrap().len();
        std::fs::OpenOptions::new().write(true).open(&file).unwrap().set_len(len - 3).unwrap();
        {
            let journal = AcksJournal::open(&root, Fsync::Always).unwrap();
            let a = open(&root, "a", &journal);
            assert_eq!(take(&a), Some((1, 2)), "0 stays acked; the torn ack of 1 is lost: delivered again");
            a.ack(&[1]).unwrap();
            a.log.flush().await.unwrap();
            assert_eq!(journal.generations(), [0, 1], "appends go to a new generation after an open");
        }
        let journal = AcksJournal::open(&root, Fsync::Always).unwrap();
        let a = open(&root, "a", &journal);
        assert_eq!(take(&a).map(|(o, _)| o), Some(2), "the generation after the torn one is read");
        drop((a, journal));
        std::fs::remove_dir_all(root).ok();
    }

    /// A store written before the journal (an `acks.log` per partition, acks and delivery counts)
    /// opens with the same state; its next checkpoint takes the file's place.
    #[tokio::test]
    async fn an_old_acks_log_is_read_and_replaced_by_the_next_checkpoint() {
        let root = tempdir();
        let dir = root.join("topics").join("old").join("0");
        {
            let journal = AcksJournal::open(&root, Fsync::Always).unwrap();
            let p = open(&root, "old", &journal);
            fill(&p, 6).await;
        }
        let mut old = acks_frame(0, &[0u64, 1, 2].iter().flat_map(|o| o.to_le_bytes()).collect::<Vec<u8>>());
        let mut count = 3u64.to_le_bytes().to_vec();
        count.extend_from_slice(&4u32.to_le_bytes());
        old.extend_from_slice(&acks_frame(COUNTS_FRAME, &count));
        std::fs::write(dir.join("acks.log"), &old).unwrap();
        {
            let journal = AcksJournal::open(&root, Fsync::Always).unwrap();
            let p = open(&root, "old", &journal);
            assert_eq!(take(&p), Some((3, 5)), "0..2 acked; 3 was delivered 4 times");
            p.ack(&[3]).unwrap();
            p.checkpoint().await.unwrap();
            assert!(!dir.join("acks.log").exists(), "the checkpoint holds its acks now");
            assert!(dir.join("checkpoint").exists());
        }
        assert!(
            AcksJournal::open(&root, Fsync::Always).unwrap().generations().is_empty(),
            "a clean stop keeps no journal"
        );
        let journal = AcksJournal::open(&root, Fsync::Always).unwrap();
        let p = open(&root, "old", &journal);
        assert_eq!(take(&p).map(|(o, _)| o), Some(4));
        drop((p, journal));
        std::fs::remove_dir_all(root).ok();
    }

    /// The journal stays bounded: a full generation is closed, the partitions with frames in it
    /// are asked to checkpoint, and it is deleted once they have. Nothing acked comes back.
    #[tokio::test]
    async fn closed_generations_are_deleted_once_their_partitions_checkpoint() {
        let root = tempdir();
        {
            let journal = AcksJournal::open_with(&root, Fsync::Always, 100).unwrap();
            let (a, b) = (open(&root, "a", &journal), open(&root, "b", &journal));
            fill(&a, 30).await;
            fill(&b, 30).await;
            for _ in 0..30 {
                take(&a).unwrap();
                take(&b).unwrap();
            }
            for i in 0..25 {
                for p in [&a, &b] {
                    p.ack(&[i]).unwrap();
                    p.log.flush().await.unwrap();
                }
            }
            // Once more each: the checkpoints asked for by the last roll are written.
            a.log.flush().await.unwrap();
            b.log.flush().await.unwrap();
            let generations = journal.generations();
            assert!(generations.len() <= 2, "closed generations are deleted: {generations:?}");
            // 50 acks of about 40 bytes in generations of 100 bytes: rolled many times (fewer when
            // a round wrote both partitions' acks in one write).
            let generation = lock(&journal.state).generation;
            assert!(generation >= 5, "it rolled: generation {generation}");
            for q in ["a", "b"] {
                assert!(root.join("topics").join(q).join("0/checkpoint").exists(), "{q} was asked to checkpoint");
            }
        }
        let journal = AcksJournal::open(&root, Fsync::Always).unwrap();
        for q in ["a", "b"] {
            let p = open(&root, q, &journal);
            let got: Vec<u64> = std::iter::from_fn(|| take(&p)).map(|(o, _)| o).collect();
            assert_eq!(got, (25..30).collect::<Vec<u64>>(), "{q}");
        }
        drop(journal);
        std::fs::remove_dir_all(root).ok();
    }

    #[test]
    fn frames_round_trip_and_a_bad_one_ends_the_replay() {
        let mut data = frame("topics/q/0", &[1, 2, 3], &[(9, 2)]);
        data.extend_from_slice(&frame("topics/r/1", &[7], &[]));
        let mut out = HashMap::new();
        let keys = replay(&data, Path::new("x"), &mut out);
        assert_eq!(keys.len(), 2);
        assert_eq!(out["topics/q/0"], [Entry::Acks(vec![1, 2, 3]), Entry::Counts(vec![(9, 2)])]);
        assert_eq!(out["topics/r/1"], [Entry::Acks(vec![7])]);
        let last = data.len() - 1;
        data[last] ^= 1;
        let mut out = HashMap::new();
        replay(&data, Path::new("x"), &mut out);
        assert!(!out.contains_key("topics/r/1"), "a frame failing its CRC is not applied");
        assert_eq!(out["topics/q/0"].len(), 2);
    }
}

//! The append log of one partition and its writer (group commit).
//!
//! Publishers hand batches to the partition's writer, which drains everything pending, writes it
//! with one `write`, fsyncs once (policy `always`), then completes every waiter. The writer is a
//! job of the process's shared writer threads ([`pool`](super::pool)): it runs on one of them
//! while it has work, so an idle partition holds no thread, and it holds the descriptors it writes
//! through (from the store's [`FileCache`]) only until they are fsynced, so an idle partition holds
//! no descriptor either. Acks go
//! into the store's acks journal (`journal.rs`, one file and one fsync a window for every
//! partition): settling threads add them to a shared list, and the first one put the writer on the
//! store's round of acks (`round.rs`), which writes the acks of every writer on it with one journal
//! write and no wake-up of each (a writer already running writes its own). The
//! writer keeps its own copy of the finished set ([`Finished`]), built from exactly the acks it
//! journaled, and compacts it into `checkpoint` now and then (after which the journal no longer
//! needs its frames): a checkpoint therefore always covers every ack journaled before it.
//!
//! Readers ([`PartitionLog::read`]) see only what the writer has published: a batch whose write
//! fails is cut back and never read. Damage found while reading is skipped, reported once and
//! quarantined.

use std::collections::VecDeque;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard, Weak};
use std::time::{Duration, Instant};

use celery_core::sync::lock;
use tokio::sync::{oneshot, Notify};

use super::finished::Finished;
use super::journal::{self, AcksJournal, Checkpointer};
use super::pool::{pool, Job};
use super::round::{Member, ACK_GATHER};
use super::work::WorkSignal;
use crate::log::storage::disk;
use crate::log::storage::error::LogError;
use crate::log::storage::files::FileCache;
use crate::log::storage::record::{self, now_ms, NewRecord, Record};
use crate::log::storage::segment::{self, ReadAhead, ReadWindows, Segment};

/// When appended bytes are fsynced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fsync {
    /// Before a publish returns (many publishes share one fsync). The default.
    Always,
    /// At most this long after a write.
    Interval(Duration),
    /// Left to the operating system.
    Os,
}

/// Partition settings.
#[derive(Debug, Clone)]
pub(crate) struct PartitionConfig {
    /// The fsync policy.
    pub(crate) fsync: Fsync,
    /// Roll to a new segment past this many bytes.
    pub(crate) segment_bytes: u64,
    /// The store's open files.
    pub(crate) files: Arc<FileCache>,
    /// The store's acks journal.
    pub(crate) journal: Arc<AcksJournal>,
}

/// What the writer is asked to do.
enum WriterCmd {
    Append(Vec<NewRecord>, oneshot::Sender<Result<u64, LogError>>),
    /// Settlements are waiting in the shared list.
    Settled,
    /// Answered once what was sent before is written: an error when this batch's write, fsync or
    /// checkpoint failed.
    Flush(oneshot::Sender<Result<(), LogError>>),
    /// A timer fell due (an fsync the policy owes, acks gathered long enough).
    Tick,
    /// Write what was sent before, fsync, and stop (answered when done).
    Close(mpsc::Sender<()>),
}

/// Most commands one run of a writer takes (the rest wait for its next run).
const MAX_BATCH: usize = 4096;

/// A partition's writer as a job of the shared threads: its inbox, and its state (used by the one
/// thread running it).
struct Slot {
    inbox: Mutex<Inbox>,
    writer: Mutex<Option<Writer>>,
    me: Weak<Slot>,
}

#[derive(Default)]
struct Inbox {
    cmds: VecDeque<WriterCmd>,
    /// On the run queue or running: a new command only joins `cmds`.
    queued: bool,
    /// When the earliest timer set for this writer falls due.
    timer: Option<Instant>,
    /// No more commands are taken.
    closed: bool,
}

impl std::fmt::Debug for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let inbox = lock(&self.inbox);
        f.debug_struct("Slot").field("pending", &inbox.cmds.len()).field("closed", &inbox.closed).finish()
    }
}

impl Slot {
    fn send(&self, cmd: WriterCmd) -> Result<(), LogError> {
        let mut inbox = lock(&self.inbox);
        if inbox.closed {
            return Err(LogError::Closed);
        }
        if let WriterCmd::Close(_) = cmd {
            inbox.closed = true;
        }
        inbox.cmds.push_back(cmd);
        if !inbox.queued {
            inbox.queued = true;
            drop(inbox);
            if let Some(me) = self.me.upgrade() {
                pool().submit(me);
            }
        }
        Ok(())
    }

    /// Sets a timer for `at` unless an earlier one is set.
    fn wake_at(&self, at: Instant) {
        let mut inbox = lock(&self.inbox);
        if inbox.closed || inbox.timer.is_some_and(|t| t <= at) {
            return;
        }
        inbox.timer = Some(at);
        drop(inbox);
        let me: Weak<dyn Job> = self.me.clone();
        pool().wake_at(me, at);
    }
}

impl Job for Slot {
    fn run(self: Arc<Self>) {
        let batch: Vec<WriterCmd> = {
            let mut inbox = lock(&self.inbox);
            let n = inbox.cmds.len().min(MAX_BATCH);
            inbox.cmds.drain(..n).collect()
        };
        let mut writer = lock(&self.writer);
        let mut next_timer = None;
        if let Some(w) = writer.as_mut() {
            if !batch.is_empty() && batch.iter().all(|c| matches!(c, WriterCmd::Settled)) && !w.gathered {
                // Woken by acks alone: let more gather (anything else sent meanwhile runs it now).
                w.gathered = true;
                next_timer = Some(Instant::now() + ACK_GATHER);
            } else {
                let mut close = None;
                let mut cmds = Vec::with_capacity(batch.len());
                for c in batch {
                    match c {
                        WriterCmd::Close(done) => close = Some(done),
                        c => cmds.push(c),
                    }
                }
                w.gathered = false;
                w.process(cmds);
                if let Some(done) = close {
                    if let Err(e) = w.maybe_sync(true).and_then(|()| w.cfg.journal.sync()) {
                        tracing::error!(error = %e, "log: fsync failed");
                    }
                    *writer = None;
                    let _ = done.send(());
                } else {
                    next_timer = w.next_timer();
                }
            }
        } else {
            for c in batch {
                if let WriterCmd::Close(done) = c {
                    let _ = done.send(());
                }
            }
        }
        drop(writer);
        if let Some(at) = next_timer {
            self.wake_at(at);
        }
        let mut inbox = lock(&self.inbox);
        if inbox.cmds.is_empty() {
            inbox.queued = false;
            if inbox.cmds.capacity() > 64 {
                // After a burst: an idle partition keeps no large buffer.
                inbox.cmds = VecDeque::new();
            }
        } else {
            drop(inbox);
            pool().submit(self);
        }
    }

    fn tick(self: Arc<Self>) {
        {
            let mut inbox = lock(&self.inbox);
            if inbox.timer.is_some_and(|t| t <= Instant::now()) {
                inbox.timer = None;
            }
        }
        let _ = self.send(WriterCmd::Tick);
    }
}

impl Member for Slot {
    fn join(&self, frames: &mut Vec<u8>) -> Option<String> {
        {
            let mut inbox = lock(&self.inbox);
            if inbox.queued {
                // Queued or running: a run takes the settlements. One is due already when commands
                // wait; otherwise this one asks for the next.
                if inbox.cmds.is_empty() && !inbox.closed {
                    inbox.cmds.push_back(WriterCmd::Settled);
                }
                return None;
            }
            // Taken like a queued writer: nothing runs it until `leave`.
            inbox.queued = true;
        }
        let mut own_run = false;
        let key = {
            let mut writer = lock(&self.writer);
            writer.as_mut().and_then(|w| {
                let settled = std::mem::take(&mut *lock(&w.settled));
                if settled.is_empty() {
                    return None;
                }
                if w.checkpoints(&settled) {
                    // A checkpoint (its fsyncs) holds up only this writer, in a run of its own, not
                    // the round and every writer it holds: put back in front of any newer ones.
                    let mut left = lock(&w.settled);
                    let newer = std::mem::replace(&mut *left, settled);
                    left.extend(newer);
                    own_run = true;
                    return None;
                }
                let before = frames.len();
                if let Err(e) = w.apply_settled(settled, frames) {
                    tracing::error!(error = %e, "log: writing acks failed; those records will be delivered again");
                }
                (frames.len() > before).then(|| w.key.clone())
            })
        };
        if own_run {
            let mut inbox = lock(&self.inbox);
            if !inbox.closed {
                inbox.cmds.push_back(WriterCmd::Settled);
            }
        }
        if key.is_none() {
            self.leave(None);
        }
        key
    }

    fn leave(&self, failed: Option<&str>) {
        if failed.is_some() {
            // The frames are not in the journal: a checkpoint in the writer's next run makes the
            // acks durable (a flush waiting meanwhile is answered after it, with its error if it
            // fails too).
            if let Some(w) = lock(&self.writer).as_ref() {
                lock(&w.settled).push(AckOp::Checkpoint);
            }
        }
        let mut inbox = lock(&self.inbox);
        if failed.is_some() && !inbox.closed {
            inbox.cmds.push_back(WriterCmd::Settled);
        }
        if inbox.cmds.is_empty() {
            inbox.queued = false;
        } else {
            drop(inbox);
            if let Some(me) = self.me.upgrade() {
                pool().submit(me);
            }
        }
    }
}

/// A change to the finished set, in the order the writer applies it.
#[derive(Debug)]
pub(super) enum AckOp {
    /// Offsets finished.
    Ack(Vec<u64>),
    /// A record's delivery count (a redelivery).
    Count(u64, u32),
    /// The whole set replaced (purge, forced retention); checkpointed at once.
    Reset(Finished),
    /// Checkpoint now (clean shutdown; forces an fsync).
    Checkpoint,
}

/// Asks a partition's writer for a checkpoint (the journal's closed generations wait for them).
struct CheckpointAsk {
    settled: Arc<Mutex<Vec<AckOp>>>,
    slot: Weak<Slot>,
}

impl Checkpointer for CheckpointAsk {
    fn ask(&self) {
        let Some(slot) = self.slot.upgrade() else { return };
        let first = {
            let mut s = lock(&self.settled);
            s.push(AckOp::Checkpoint);
            s.len() == 1
        };
        if first {
            let _ = slot.send(WriterCmd::Settled);
        }
    }
}

/// Where a record is: its segment and its byte in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Pos {
    /// The base offset of the segment.
    pub(super) seg: u64,
    /// The byte in the segment.
    pub(super) byte: u64,
}

/// What readers may read: set by the writer once a batch is written.
#[derive(Debug)]
struct End {
    next_offset: u64,
    /// Where the published records end: nothing at or past it is read (a batch being written
    /// there may still fail and be rewritten).
    tail: Pos,
}

/// The append-only log of one partition.
#[derive(Debug)]
pub(crate) struct PartitionLog {
    segments: Arc<RwLock<Vec<Segment>>>,
    end: Arc<Mutex<End>>,
    /// The writer (a job of the shared writer threads).
    slot: Arc<Slot>,
    /// The store's open files.
    files: Arc<FileCache>,
    /// Raised when records are published (and by the queue state when records return): the
    /// consumers reading this partition are told (`work.rs`).
    pub(super) work: Arc<WorkSignal>,
    /// Settlements for the writer, in order.
    settled: Arc<Mutex<Vec<AckOp>>>,
    /// The partition's directory.
    dir: PathBuf,
    /// The store's acks journal, and this partition's key in it.
    journal: Arc<AcksJournal>,
    key: String,
    /// Damage reported so far: (segment, first lost offset).
    damaged: Mutex<std::collections::HashSet<(u64, u64)>>,
    /// Records lost to damage found so far.
    pub(crate) corrupt_records: std::sync::atomic::AtomicU64,
}

impl PartitionLog {
    /// Opens the log of the partition at `dir` whose finished set is `finished`; `legacy_acks`
    /// when it came partly from an `acks.log` (deleted by the next checkpoint), `journaled` when
    /// partly from the acks journal (the next checkpoint lets the journal drop those frames).
    pub(super) fn open(
        dir: &Path,
        cfg: &PartitionConfig,
        finished: Finished,
        on_append: Arc<Notify>,
        legacy_acks: bool,
        journaled: bool,
    ) -> Result<PartitionLog, LogError> {
        let first_offset = finished.watermark;
        let rec = segment::recover(dir, first_offset, &cfg.files)?;
        let active =
            rec.segments.last().cloned().ok_or_else(|| LogError::Invalid("a partition without a segment".into()))?;
        let tail = Pos { seg: active.base, byte: rec.tail_len };
        let segments = Arc::new(RwLock::new(rec.segments));
        let end = Arc::new(Mutex::new(End { next_offset: rec.next_offset, tail }));
        let settled: Arc<Mutex<Vec<AckOp>>> = Arc::default();
        let work = Arc::new(WorkSignal::default());
        let key = cfg.journal.key_of(dir);
        let writer = Writer {
            settled: settled.clone(),
            finished,
            acks_since_checkpoint: 0,
            dir: dir.to_owned(),
            cfg: cfg.clone(),
            segments: segments.clone(),
            active,
            end: end.clone(),
            tail_len: rec.tail_len,
            next_offset: rec.next_offset,
            on_append,
            key: key.clone(),
            legacy_acks,
            journaled: journaled || legacy_acks,
            work: work.clone(),
            pinned_segment: None,
            gathered: false,
            batch_start: rec.tail_len,
            broken: None,
            sync_failed: None,
            dirty: false,
            last_sync: Instant::now(),
        };
        let slot =
            Arc::new_cyclic(|me| Slot { inbox: Mutex::default(), writer: Mutex::new(Some(writer)), me: me.clone() });
        cfg.journal.register(&key, Arc::new(CheckpointAsk { settled: settled.clone(), slot: Arc::downgrade(&slot) }));
        Ok(PartitionLog {
            segments,
            end,
            slot,
            files: cfg.files.clone(),
            work,
            settled,
            dir: dir.to_owned(),
            journal: cfg.journal.clone(),
            key,
            damaged: Mutex::default(),
            corrupt_records: Default::default(),
        })
    }

    /// The segments, oldest first (a poisoned lock is still used: the list is whole between
    /// statements).
    pub(super) fn segments(&self) -> RwLockReadGuard<'_, Vec<Segment>> {
        celery_core::sync::read(&self.segments)
    }

    /// The segments, to change (retention deletes the oldest).
    pub(super) fn segments_mut(&self) -> RwLockWriteGuard<'_, Vec<Segment>> {
        celery_core::sync::write(&self.segments)
    }

    fn send(&self, cmd: WriterCmd) -> Result<(), LogError> {
        self.slot.send(cmd)
    }

    /// Hands a settlement to the writer, waking it when it had none waiting.
    pub(super) fn settle(&self, op: AckOp) -> Result<(), LogError> {
        if self.queue_settled(op) {
            self.wake_writer()?;
        }
        Ok(())
    }

    /// Queues a settlement for the writer; true when it had none waiting (then wake it with
    /// [`PartitionLog::wake_writer`]).
    pub(super) fn queue_settled(&self, op: AckOp) -> bool {
        let mut s = lock(&self.settled);
        s.push(op);
        s.len() == 1
    }

    pub(super) fn wake_writer(&self) -> Result<(), LogError> {
        self.send(WriterCmd::Settled)
    }

    /// True once the writer takes no more commands (the partition is closing or closed).
    pub(super) fn closed(&self) -> bool {
        lock(&self.slot.inbox).closed
    }

    /// Has the settlements queued by [`PartitionLog::queue_settled`] written by the store's next
    /// round of acks (`round.rs`: one journal write for every partition with acks, no wake-up of
    /// this writer), instead of waking the writer.
    pub(super) fn settle_in_round(&self) {
        self.journal.round().add(self.slot.clone());
    }

    /// Appends records; resolves with the first offset once they are written (and fsynced per policy).
    pub(crate) async fn append(&self, records: Vec<NewRecord>) -> Result<u64, LogError> {
        // Never write what could not be read back: a frame over the on-disk limit would stop every
        // reader at it.
        for r in &records {
            let limit = record::MAX_RECORD - record::FRAME_HEADER + 4;
            record::check_size("record", r.encoded_len(), limit)?;
        }
        let (tx, rx) = oneshot::channel();
        self.send(WriterCmd::Append(records, tx))?;
        rx.await.map_err(|_| LogError::Closed)?
    }

    /// The offset the next record will get.
    pub(crate) fn next_offset(&self) -> u64 {
        lock(&self.end).next_offset
    }

    /// Reads the record at `pos` if `pos` is before the end (through the reader's `ahead`).
    pub(crate) fn read(
        &self,
        pos: &mut Pos,
        offset: u64,
        ahead: &mut ReadAhead,
    ) -> Result<Option<(Record, Pos)>, LogError> {
        let tail = {
            let end = lock(&self.end);
            if offset >= end.next_offset {
                return Ok(None);
            }
            end.tail
        };
        let segs = self.segments();
        let mut idx = segs.partition_point(|s| s.base <= pos.seg).checked_sub(1).filter(|i| segs[*i].base == pos.seg);
        if idx.is_none() {
            // The segment of `pos` was deleted by retention: find `offset` again, if it is kept.
            let first = segs.first().map(|s| s.base).unwrap_or(0);
            drop(segs);
            if offset < first {
                return Err(LogError::Invalid(format!("offset {offset} is no longer kept (retention)")));
            }
            *pos = self.seek(offset)?;
            return self.read(pos, offset, ahead);
        }
        while let Some(i) = idx.filter(|i| i + 1 < segs.len() && offset >= segs[i + 1].base) {
            idx = Some(i + 1);
            pos.seg = segs[i + 1].base;
            pos.byte = 0;
        }
        let at = *pos;
        let seg = idx
            .and_then(|i| segs.get(i))
            .ok_or_else(|| LogError::Invalid(format!("no segment for offset {offset}")))?;
        let limit = (seg.base == tail.seg).then_some(tail.byte);
        let problem = match segment::read_at(seg, pos.byte, ahead, limit) {
            // A later offset than asked: the records between were lost to damage found before.
            Ok((rec, next)) if rec.offset >= offset => {
                if rec.offset > offset {
                    self.report_damage(seg, at.byte, at.byte, offset..rec.offset, "offsets missing");
                }
                pos.byte = next;
                return Ok(Some((rec, at)));
            }
            Ok((rec, _)) => format!("found offset {} at byte {}", rec.offset, at.byte),
            Err(LogError::Corrupt { reason, .. }) => reason,
            // A closed segment that ends before the next one begins (a segment file lost in
            // between, or a truncated one): the records up to the next segment are gone.
            Err(LogError::Io { source, .. })
                if source.kind() == std::io::ErrorKind::UnexpectedEof && limit.is_none() =>
            {
                format!("the segment ends at byte {} before offset {offset}", at.byte)
            }
            Err(e) => return Err(e),
        };
        // Damaged bytes: resume at the next valid record, in this segment or at the next one.
        let end = match limit {
            Some(l) => l,
            None => seg.file()?.metadata().map_err(|e| LogError::io(&seg.path, e))?.len(),
        };
        let next_seg = idx.and_then(|i| segs.get(i + 1)).map(|n| (Pos { seg: n.base, byte: 0 }, n.base));
        let resume = segment::resync(&*seg.file()?, &seg.path, at.byte, end, offset)?
            .map(|(byte, found)| (Pos { seg: seg.base, byte }, found))
            .or(next_seg);
        let Some((resume, found)) = resume else {
            return Err(LogError::Corrupt { path: seg.path.clone(), offset, reason: problem });
        };
        let damaged_to = if resume.seg == seg.base { resume.byte } else { end };
        self.report_damage(seg, at.byte, damaged_to, offset..found, &problem);
        drop(segs);
        *pos = resume;
        self.read(pos, found, ahead)
    }

    /// Reports damaged records once: logged as an error, counted, and their bytes copied to
    /// `quarantine/<segment base>-<byte>.bin` in the partition's directory for inspection.
    fn report_damage(&self, seg: &Segment, from: u64, to: u64, lost: std::ops::Range<u64>, problem: &str) {
        if !lock(&self.damaged).insert((seg.base, lost.start)) {
            return;
        }
        let count = lost.end.saturating_sub(lost.start);
        self.corrupt_records.fetch_add(count, std::sync::atomic::Ordering::Relaxed);
        let qdir = self.dir.join("quarantine");
        let saved = (to > from)
            .then(|| {
                // At most 64 MiB of it: enough to inspect, never a segment-sized allocation.
                let mut bytes = vec![0u8; (to - from).min(64 << 20) as usize];
                std::os::unix::fs::FileExt::read_exact_at(&*seg.file().ok()?, &mut bytes, from).ok()?;
                disk::create_dir_all(&qdir).ok()?;
                let path = qdir.join(format!("{}-{from}.bin", seg.base));
                disk::replace_file(&path, &bytes).ok().map(|()| path)
            })
            .flatten();
        tracing::error!(
            segment = %seg.path.display(), byte = from, lost_offsets = ?lost, count, problem,
            quarantined = ?saved, "log: damaged records skipped; the records after them are served"
        );
    }

    /// Re-reads the record at a position found earlier.
    pub(super) fn read_at(&self, at: Pos) -> Result<Record, LogError> {
        let segs = self.segments();
        let seg = segs
            .iter()
            .find(|s| s.base == at.seg)
            .ok_or_else(|| LogError::Invalid("segment is gone (retention)".into()))?;
        Ok(segment::read_at(seg, at.byte, &mut ReadAhead::exact(), None)?.0)
    }

    /// [`read_at`](Self::read_at) through `windows`: records near one read before come from
    /// memory (a window never reaches past what was written when it was read).
    pub(super) fn read_at_via(&self, at: Pos, windows: &mut ReadWindows) -> Result<Record, LogError> {
        let tail = lock(&self.end).tail;
        let segs = self.segments();
        let seg = segs
            .iter()
            .find(|s| s.base == at.seg)
            .ok_or_else(|| LogError::Invalid("segment is gone (retention)".into()))?;
        let limit = (seg.base == tail.seg).then_some(tail.byte);
        let read = segment::read_at(seg, at.byte, windows.at(at.seg, at.byte), limit);
        windows.trim();
        Ok(read?.0)
    }

    /// The position of `offset` (scanning its segment from the start).
    pub(crate) fn seek(&self, offset: u64) -> Result<Pos, LogError> {
        let base = {
            let segs = self.segments();
            segs.iter().rev().find(|s| s.base <= offset).or(segs.first()).map(|s| s.base).unwrap_or(0)
        };
        let mut pos = Pos { seg: base, byte: 0 };
        let mut o = base;
        let mut ahead = ReadAhead::default();
        while o < offset {
            match self.read(&mut pos, o, &mut ahead)? {
                // Damage skipped past `offset`: its record is gone, the next one is there.
                Some((rec, at)) if rec.offset >= offset => return Ok(at),
                Some((rec, _)) => o = rec.offset + 1,
                None => break,
            }
        }
        Ok(pos)
    }

    /// Waits until everything sent to the writer so far is written.
    pub(crate) async fn flush(&self) -> Result<(), LogError> {
        let (tx, rx) = oneshot::channel();
        self.send(WriterCmd::Flush(tx))?;
        rx.await.map_err(|_| LogError::Closed)?
    }

    /// Stops the writer after it has written (and fsynced) everything sent, and lets go of the
    /// partition's cached descriptors.
    pub(crate) fn close(&self) {
        let (tx, rx) = mpsc::channel();
        if self.send(WriterCmd::Close(tx)).is_ok() {
            let _ = rx.recv();
        }
        self.journal.unregister(&self.key);
        self.files.forget_under(&self.dir);
    }

    /// The writer as a member of a round of acks (tests run rounds by hand).
    #[cfg(test)]
    pub(super) fn member(&self) -> Arc<dyn Member> {
        self.slot.clone()
    }

    /// True when the writer is neither queued nor running, with no command waiting (a test
    /// waits for this before taking it into a round by hand: an answered command's run may still
    /// be ending).
    #[cfg(test)]
    pub(super) fn idle(&self) -> bool {
        let inbox = lock(&self.slot.inbox);
        !inbox.queued && inbox.cmds.is_empty()
    }

    /// Consumers told of this partition's records now.
    #[cfg(test)]
    pub(crate) fn watchers(&self) -> usize {
        self.work.watchers()
    }

    /// Forgets the cached descriptor of a segment file being deleted.
    pub(super) fn forget_file(&self, path: &Path) {
        self.files.forget(path);
    }
}

impl Drop for PartitionLog {
    fn drop(&mut self) {
        self.close();
    }
}

struct Writer {
    dir: PathBuf,
    cfg: PartitionConfig,
    segments: Arc<RwLock<Vec<Segment>>>,
    /// The last segment, the one appended to.
    active: Segment,
    end: Arc<Mutex<End>>,
    tail_len: u64,
    next_offset: u64,
    on_append: Arc<Notify>,
    work: Arc<WorkSignal>,
    /// This partition's key in the acks journal.
    key: String,
    /// An `acks.log` of an older version holds acks the checkpoint does not: the next checkpoint
    /// deletes it.
    legacy_acks: bool,
    /// Acks or counts journaled (or replayed at open) since the last checkpoint: a checkpoint asked
    /// for is written (so the journal can drop them).
    journaled: bool,
    /// The active segment while it holds records not fsynced yet: the fsync that acknowledges them
    /// is made on the descriptor that wrote them.
    pinned_segment: Option<Arc<File>>,
    /// The last run only gathered acks (the next one writes them).
    gathered: bool,
    /// Where the batch being written starts in the active segment: a batch whose write or fsync
    /// fails is cut back to it, so a later batch never lands behind bytes that were refused.
    batch_start: u64,
    /// Set when a failed batch could not be cut back: every later append fails (reopening the
    /// partition recovers it).
    broken: Option<String>,
    /// An fsync of this batch failed (even one whose error was handled, like a checkpoint's).
    sync_failed: Option<String>,
    settled: Arc<Mutex<Vec<AckOp>>>,
    /// The finished set as written to the journal and `checkpoint`.
    finished: Finished,
    acks_since_checkpoint: usize,
    dirty: bool,
    last_sync: Instant,
}

impl Writer {
    /// When this writer must run again if nothing is sent: an fsync the policy owes.
    fn next_timer(&self) -> Option<Instant> {
        match self.cfg.fsync {
            Fsync::Interval(d) if self.dirty => Some(self.last_sync + d),
            _ => None,
        }
    }

    /// The active segment's file, kept while it holds unsynced bytes (unless fsync is left to the OS).
    fn segment_file(&mut self) -> Result<Arc<File>, LogError> {
        if let Some(f) = &self.pinned_segment {
            return Ok(f.clone());
        }
        let f = self.active.file()?;
        if self.cfg.fsync != Fsync::Os {
            self.pinned_segment = Some(f.clone());
        }
        Ok(f)
    }

    fn process(&mut self, batch: Vec<WriterCmd>) {
        let mut buf = Vec::new();
        let mut waiters = Vec::new();
        let mut flushes = Vec::new();
        let start_offset = self.next_offset;
        let now = now_ms();
        for cmd in batch {
            match cmd {
                WriterCmd::Append(records, done) => {
                    let first = self.next_offset;
                    for r in records {
                        let rec = Record {
                            offset: self.next_offset,
                            timestamp_ms: now,
                            not_before_ms: r.not_before_ms,
                            headers: r.headers,
                            key: r.key,
                            payload: r.payload,
                        };
                        rec.encode_into(&mut buf);
                        self.next_offset += 1;
                    }
                    waiters.push((first, done));
                }
                WriterCmd::Settled | WriterCmd::Tick | WriterCmd::Close(_) => {}
                WriterCmd::Flush(f) => flushes.push(f),
            }
        }
        // Taken after the commands: a flush waits for the settlements made before it.
        let settled = std::mem::take(&mut *lock(&self.settled));
        self.sync_failed = None;
        let result = self.write_records(&buf, start_offset);
        let mut frames = Vec::new();
        let applied = self.apply_settled(settled, &mut frames);
        // Written even when a checkpoint failed: the journal keeps this batch's acks at least.
        let written = self.cfg.journal.append(&self.key, &frames);
        let settle_error = applied.and(written).err().map(|e| {
            tracing::error!(error = %e, "log: writing acks failed; those records will be delivered again");
            e.to_string()
        });
        // A failed fsync anywhere in this batch (a checkpoint's too) fails it: a second fsync of
        // the same file may report success for pages the first one lost.
        let result = result.and_then(|()| self.maybe_sync(false)).and_then(|()| match self.sync_failed.take() {
            Some(e) => Err(LogError::Invalid(format!("fsync failed: {e}"))),
            None => Ok(()),
        });
        let flushed = match (&result, settle_error) {
            (Err(e), _) => Some(e.to_string()),
            (Ok(()), e) => e,
        };
        match result {
            Ok(()) => {
                let tail = Pos { seg: self.active.base, byte: self.tail_len };
                *lock(&self.end) = End { next_offset: self.next_offset, tail };
                if !buf.is_empty() {
                    // After the records are readable: a take that cleared it before sees them.
                    self.work.raise();
                    self.on_append.notify_waiters();
                }
                for (first, w) in waiters {
                    let _ = w.send(Ok(first));
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "log: write failed; the batch is refused");
                self.next_offset = start_offset;
                self.undo_batch();
                for (_, w) in waiters {
                    let _ = w.send(Err(LogError::Invalid(format!("write failed, nothing stored: {e}"))));
                }
            }
        }
        for f in flushes {
            let _ = f.send(match &flushed {
                None => Ok(()),
                Some(e) => Err(LogError::Invalid(e.clone())),
            });
        }
    }

    /// Cuts the active segment back to where the failed batch began (its bytes were never
    /// acknowledged); when even that fails, the partition refuses appends until it is reopened.
    fn undo_batch(&mut self) {
        if self.tail_len == self.batch_start {
            return;
        }
        let seg = self.active.clone();
        match self.segment_file().and_then(|f| f.set_len(self.batch_start).map_err(|e| LogError::io(&seg.path, e))) {
            Ok(()) => {
                self.tail_len = self.batch_start;
                self.broken = None;
            }
            Err(e) => {
                tracing::error!(error = %e, path = %seg.path.display(), "log: cannot cut a failed batch back; the partition refuses appends until it is reopened");
                self.broken = Some(format!("{}: a failed write could not be undone: {e}", seg.path.display()));
            }
        }
    }

    fn write_records(&mut self, buf: &[u8], first: u64) -> Result<(), LogError> {
        if let Some(b) = &self.broken {
            return Err(LogError::Invalid(b.clone()));
        }
        self.batch_start = self.tail_len;
        if buf.is_empty() {
            return Ok(());
        }
        if self.tail_len > 0 && self.tail_len + buf.len() as u64 > self.cfg.segment_bytes {
            self.sync_now()?;
            let seg = segment::create(&self.dir, first, &self.cfg.files)?;
            celery_core::sync::write(&self.segments).push(seg.clone());
            self.active = seg;
            self.tail_len = 0;
            self.batch_start = 0;
        }
        // A failure is undone by the caller (`undo_batch`): never a half-written batch behind a later one.
        let file = self.segment_file()?;
        self.tail_len += buf.len() as u64;
        disk::write_all(&file, buf, &self.active.path)?;
        self.dirty = true;
        Ok(())
    }

    /// Applies settlements to the writer's finished set and adds their journal frames to `frames`
    /// (the caller appends them to the store's journal), checkpointing when asked, on a reset, or
    /// every [`CHECKPOINT_EVERY`] acks (then no frame is needed; when the checkpoint fails, the
    /// frames are added and the error returned).
    /// True when applying `settled` writes a checkpoint (a reset, a checkpoint asked for, or the
    /// [`CHECKPOINT_EVERY`]th ack since the last one).
    fn checkpoints(&self, settled: &[AckOp]) -> bool {
        let acks: usize = settled.iter().map(|op| if let AckOp::Ack(o) = op { o.len() } else { 0 }).sum();
        self.acks_since_checkpoint + acks >= CHECKPOINT_EVERY
            || settled.iter().any(|op| matches!(op, AckOp::Reset(_) | AckOp::Checkpoint))
    }

    fn apply_settled(&mut self, settled: Vec<AckOp>, frames: &mut Vec<u8>) -> Result<(), LogError> {
        let (mut acks, mut counts) = (Vec::new(), Vec::new());
        let (mut checkpoint, mut asked) = (false, false);
        for op in settled {
            match op {
                AckOp::Ack(offsets) => {
                    for o in &offsets {
                        self.finished.mark(*o);
                    }
                    acks.extend(offsets);
                }
                AckOp::Count(offset, n) => {
                    if !self.finished.is_done(offset) {
                        self.finished.counts.insert(offset, n);
                        counts.push((offset, n));
                    }
                }
                AckOp::Reset(f) => {
                    // Settlements before the reset are covered by it.
                    acks.clear();
                    counts.clear();
                    self.finished = f;
                    checkpoint = true;
                }
                AckOp::Checkpoint => asked = true,
            }
        }
        self.acks_since_checkpoint += acks.len();
        if asked {
            // Nothing settled since the last checkpoint (or ever): the files already hold this
            // state, and a clean shutdown of many idle queues costs no checkpoint each.
            let unchanged = self.acks_since_checkpoint == 0 && !self.journaled && counts.is_empty();
            if unchanged {
                self.sync_now()?;
            } else {
                checkpoint = true;
            }
        }
        if checkpoint || self.acks_since_checkpoint >= CHECKPOINT_EVERY {
            // The checkpoint holds every ack so far: the journal needs none of this partition's frames.
            let data = self.finished.encode();
            match self.write_checkpoint(&data) {
                Ok(()) => {
                    self.acks_since_checkpoint = 0;
                    Ok(())
                }
                Err(e) => {
                    // Keep this batch's acks in the journal at least (the next checkpoint covers them).
                    self.journal(&acks, &counts, frames);
                    Err(e)
                }
            }
        } else {
            self.journal(&acks, &counts, frames);
            Ok(())
        }
    }

    /// Adds the journal frames of this batch's acks and delivery counts to `frames` (written to
    /// the store's journal with one write, fsynced with every other partition's by the journal).
    fn journal(&mut self, acks: &[u64], counts: &[(u64, u32)], frames: &mut Vec<u8>) {
        if acks.is_empty() && counts.is_empty() {
            return;
        }
        // Set first: when the write fails, the next checkpoint asked for still covers them.
        self.journaled = true;
        frames.extend_from_slice(&journal::frame(&self.key, acks, counts));
    }

    /// fsyncs the records written since the last sync.
    fn sync_now(&mut self) -> Result<(), LogError> {
        if self.dirty {
            let file = self.segment_file()?;
            if let Err(e) = disk::sync_data(&file, &self.active.path) {
                self.sync_failed = Some(e.to_string());
                return Err(e);
            }
            self.dirty = false;
        }
        // Synced: nothing needs this descriptor any more (the cache may close it).
        self.pinned_segment = None;
        self.last_sync = Instant::now();
        Ok(())
    }

    /// Under `always`, appended records are fsynced before anyone is told (acks are the journal's:
    /// fsynced at most [`journal::ACK_SYNC`] later; a crash in that window delivers those finished
    /// records again).
    fn maybe_sync(&mut self, idle: bool) -> Result<(), LogError> {
        match self.cfg.fsync {
            Fsync::Always if self.dirty || idle => self.sync_now(),
            Fsync::Interval(d) if idle || self.last_sync.elapsed() >= d => self.sync_now(),
            _ => Ok(()),
        }
    }

    /// Replaces `checkpoint` atomically; then the journal's frames of this partition (and an old
    /// `acks.log`), whose acks it contains, are needed no more.
    fn write_checkpoint(&mut self, data: &[u8]) -> Result<(), LogError> {
        self.sync_now()?;
        disk::replace_file(&self.dir.join("checkpoint"), data)?;
        if self.legacy_acks {
            let path = self.dir.join("acks.log");
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(LogError::io(&path, e)),
            }
            self.legacy_acks = false;
        }
        self.journaled = false;
        self.cfg.journal.covered(&self.key);
        Ok(())
    }
}

/// Acks between two checkpoints.
const CHECKPOINT_EVERY: usize = 50_000;

//! A partition with task-queue semantics: the queue operations (take, ack, requeue, expiry, purge,
//! retention) over its append log.
//!
//! - [`writer`]: the append log and its writer (group commit, acks, checkpoints);
//! - [`journal`]: the store's acks journal (every partition's acks, one fsync a window);
//! - [`pool`]: the writer threads all partitions share;
//! - [`round`]: rounds of acks (many partitions' acks in one journal write, after one timer);
//! - [`finished`]: the durable finished set (watermark and ranges, delivery counts);
//! - [`leases`]: the records handed out and not settled, with their owners and deadlines;
//! - this file: the queue state on top (cursor, ready and delayed records) and its operations.

mod fair;
mod finished;
mod journal;
mod leases;
mod pool;
mod round;
mod work;
mod writer;

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use celery_core::sync::lock;
use tokio::sync::Notify;

#[cfg(test)]
pub(crate) use pool::MAX_WRITER_THREADS;
pub use writer::Fsync;

/// Writer threads started in this process so far (at most [`MAX_WRITER_THREADS`]).
#[cfg(test)]
pub(crate) fn writer_threads() -> usize {
    pool::pool().threads()
}
pub(crate) use journal::AcksJournal;
pub(crate) use work::WorkList;
pub(crate) use writer::{PartitionConfig, PartitionLog, Pos};

use celery_core::flow::FairnessWeights;
use fair::{Entry, FairIndex};
use finished::Finished;
use leases::Leases;
use writer::AckOp;

use super::error::LogError;
use super::payload;
use super::record::{now_ms, Record};
use super::segment::{ReadAhead, ReadWindows, Segment};

/// When closed segments are deleted.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Retention {
    /// Keep a partition under this many bytes (`retention_bytes=`).
    pub bytes: Option<u64>,
    /// Delete segments older than this (`retention_ms=`).
    pub age: Option<Duration>,
    /// Delete even unfinished records (`retention_force=true`); the loss is logged with counts.
    pub force: bool,
}

impl Retention {
    /// True when any limit is set.
    pub fn is_set(&self) -> bool {
        self.bytes.is_some() || self.age.is_some()
    }
}

/// A record taken for delivery.
#[derive(Debug, Clone)]
pub(crate) struct Taken {
    pub(crate) record: Arc<Record>,
    pub(crate) deliveries: u32,
    /// Its delivery count was handed to the writer: wait for it (`PartitionLog::flush`) before
    /// running the task, so a crash while it runs still counts.
    pub(crate) counted: bool,
}

/// What an expiry sweep found: records to dead-letter (delivered too often).
#[derive(Debug)]
pub(crate) struct Exhausted {
    pub(crate) record: Arc<Record>,
    pub(crate) deliveries: u32,
}

#[derive(Debug)]
struct QueueState {
    cursor_offset: u64,
    cursor: Pos,
    /// The cursor's read-ahead window.
    ahead: ReadAhead,
    finished: Finished,
    ready: VecDeque<(Arc<Record>, u32)>,
    delayed: BinaryHeap<Reverse<(i64, u64, Pos)>>,
    /// The records read ahead by fairness key, while keys take turns (`fair.rs`).
    fair: FairIndex,
    /// The windows through which `fair`'s records not kept in it are read again when served
    /// (freed when `fair` runs empty).
    fair_reads: ReadWindows,
    leases: Leases,
    /// Set when a corrupt record was found: the partition serves nothing more.
    error: Option<String>,
    /// The end of the log when it was opened: an unfinished record below it without a persisted
    /// count may have been delivered once by a previous owner (first deliveries are not written),
    /// so its first delivery here counts as a redelivery, and the worker checks for a stored result
    /// before running it.
    recovered_end: u64,
}

impl QueueState {
    /// Moves the fair index on past its front record ([`FairIndex::next`]), freeing the read
    /// windows once it runs empty.
    fn fair_next(&mut self, weights: &FairnessWeights) {
        self.fair.next(weights);
        if self.fair.is_empty() {
            self.fair_reads.release();
        }
    }

    /// Deliveries of an unfinished record before this one: its persisted count, or one when it was
    /// already in the log when the partition opened (a previous owner may have handed it out).
    fn prior_deliveries(&self, offset: u64) -> u32 {
        self.finished.counts.get(&offset).copied().unwrap_or(u32::from(offset < self.recovered_end))
    }
}

/// A partition with task-queue semantics.
#[derive(Debug)]
pub(crate) struct Partition {
    pub(crate) log: PartitionLog,
    state: Mutex<QueueState>,
    /// May hold leases: set when one is granted, cleared by an expiry sweep that finds none, so
    /// the sweep and the renewals skip a partition without leases for the cost of one load (an
    /// idle queue costs them no lock).
    leased: AtomicBool,
}

impl Partition {
    pub(crate) fn open(dir: &Path, cfg: &PartitionConfig, on_append: Arc<Notify>) -> Result<Partition, LogError> {
        let journaled = cfg.journal.take_replayed(&cfg.journal.key_of(dir));
        let (finished, legacy_acks) = Finished::load(dir, &journaled)?;
        let log = PartitionLog::open(dir, cfg, finished.clone(), on_append, legacy_acks, !journaled.is_empty())?;
        let cursor = log.seek(finished.watermark)?;
        let recovered_end = log.next_offset();
        Ok(Partition {
            state: Mutex::new(QueueState {
                cursor_offset: finished.watermark,
                cursor,
                ahead: ReadAhead::default(),
                finished,
                ready: VecDeque::new(),
                delayed: BinaryHeap::new(),
                fair: FairIndex::default(),
                fair_reads: ReadWindows::default(),
                leases: Leases::default(),
                error: None,
                recovered_end,
            }),
            log,
            leased: AtomicBool::new(false),
        })
    }

    /// Takes the next deliverable record and leases it until `deadline`; while records with a
    /// fairness key wait, their keys take turns by `weights` (`fair.rs`).
    pub(crate) fn take(
        &self,
        deadline: Instant,
        owner: u64,
        weights: &FairnessWeights,
    ) -> Result<Option<Taken>, LogError> {
        // Nothing published or returned since a take found nothing: skip without the lock.
        // Cleared before looking, so work added meanwhile sets it again (or is seen below).
        if !self.log.work.clear() {
            return Ok(None);
        }
        let taken = self.take_locked(deadline, owner, weights);
        match &taken {
            // There may be more: queued again on every consumer's list (this one's at the back, so
            // the consumer's other partitions take their turn first).
            Ok(Some(_)) => self.log.work.raise(),
            Ok(None) => {
                let st = lock(&self.state);
                if !(st.ready.is_empty() && st.delayed.is_empty() && st.fair.is_empty()) {
                    // Records wait for their time: looked at again when a consumer's timer for
                    // `next_due_ms` falls due.
                    self.log.work.keep();
                }
            }
            // An error to report again (a read error may pass).
            Err(_) => self.log.work.keep(),
        }
        taken
    }

    /// Marks the partition as having records to take (after returning some to `ready`).
    fn has_work(&self) {
        self.log.work.raise();
    }

    /// Tells `list` (as its `slot`) whenever this partition may have records to take (`work.rs`).
    pub(crate) fn watch(&self, list: &Arc<WorkList>, slot: u32) {
        self.log.work.watch(list, slot);
    }

    /// Stops telling `list`.
    pub(crate) fn unwatch(&self, list: &WorkList) {
        self.log.work.unwatch(list);
    }

    fn take_locked(&self, deadline: Instant, owner: u64, weights: &FairnessWeights) -> Result<Option<Taken>, LogError> {
        let mut st = lock(&self.state);
        if let Some(e) = &st.error {
            return Err(LogError::Invalid(e.clone()));
        }
        let now = now_ms();
        let found = loop {
            if let Some((rec, deliveries)) = st.ready.pop_front() {
                if st.finished.is_done(rec.offset) {
                    continue;
                }
                break Some((rec, deliveries));
            }
            if let Some(Reverse((due, offset, at))) = st.delayed.peek().cloned() {
                if due <= now {
                    st.delayed.pop();
                    if st.finished.is_done(offset) {
                        continue;
                    }
                    let rec = match self.log.read_at(at) {
                        Ok(rec) => rec,
                        Err(e) => {
                            // Kept for the next take (a read error may pass).
                            st.delayed.push(Reverse((due, offset, at)));
                            return Err(e);
                        }
                    };
                    // Due now: it joins its key's line when keys take turns.
                    let key = payload::fairness_key(&rec.payload);
                    if key.is_some() || !st.fair.is_empty() {
                        let entry = Entry { offset, at, record: Some(Arc::new(rec)) };
                        st.fair.push(key.as_deref().unwrap_or(""), entry);
                        continue;
                    }
                    break Some((Arc::new(rec), st.prior_deliveries(offset)));
                }
            }
            if !st.fair.is_empty() {
                self.fill(&mut st, now)?;
                // Not empty: its front key has a record (a key leaves the ring with its last one).
                let Some(entry) = st.fair.peek() else { break None };
                let (offset, at, kept) = (entry.offset, entry.at, entry.record.clone());
                if st.finished.is_done(offset) {
                    st.fair_next(weights);
                    continue;
                }
                // Read before it leaves the index: a read error keeps it for the next take.
                let rec = match kept {
                    Some(rec) => rec,
                    None => Arc::new(self.log.read_at_via(at, &mut st.fair_reads)?),
                };
                st.fair_next(weights);
                break Some((rec, st.prior_deliveries(offset)));
            }
            match self.advance(&mut st, now)? {
                None => break None,
                Some((rec, at)) => match payload::fairness_key(&rec.payload) {
                    None => {
                        let prior = st.prior_deliveries(rec.offset);
                        break Some((Arc::new(rec), prior));
                    }
                    Some(key) => {
                        // Keys take turns from here on: read ahead to see the others.
                        st.fair.push(&key, Entry { offset: rec.offset, at, record: Some(Arc::new(rec)) });
                    }
                },
            }
        };
        let Some((record, prior)) = found else { return Ok(None) };
        let deliveries = prior + 1;
        st.leases.grant(record.clone(), deliveries, owner, deadline);
        self.leased.store(true, Ordering::Release);
        // A redelivery's count is persisted (a first delivery's is implied by the record being
        // unfinished), so a record that kills its consumer's process still reaches max_deliveries.
        let counted = deliveries > 1;
        if counted {
            st.finished.counts.insert(record.offset, deliveries);
            self.log.settle(AckOp::Count(record.offset, deliveries))?;
        }
        Ok(Some(Taken { record, deliveries, counted }))
    }

    /// Moves the cursor to the next unfinished record that is due (a record not yet due goes to
    /// `delayed`); `None` at the end of the log.
    fn advance(&self, st: &mut QueueState, now: i64) -> Result<Option<(Record, Pos)>, LogError> {
        loop {
            let offset = st.cursor_offset;
            let mut pos = st.cursor;
            match self.log.read(&mut pos, offset, &mut st.ahead) {
                Ok(Some((rec, at))) => {
                    st.cursor = pos;
                    st.cursor_offset = rec.offset + 1;
                    if rec.offset > offset {
                        // Lost to damage (reported by the read): finished, so the watermark moves on.
                        let lost: Vec<u64> = (offset..rec.offset).filter(|o| !st.finished.is_done(*o)).collect();
                        for o in &lost {
                            st.finished.mark(*o);
                        }
                        self.log.settle(AckOp::Ack(lost))?;
                    }
                    let offset = rec.offset;
                    if st.finished.is_done(offset) {
                        continue;
                    }
                    if rec.not_before_ms > now {
                        st.delayed.push(Reverse((rec.not_before_ms, offset, at)));
                        continue;
                    }
                    return Ok(Some((rec, at)));
                }
                Ok(None) => {
                    // At the end: an idle queue keeps no read-ahead window.
                    st.ahead.release();
                    return Ok(None);
                }
                Err(e @ LogError::Corrupt { .. }) => {
                    tracing::error!(error = %e, "log: partition stopped: damage with nothing valid after it");
                    st.error = Some(e.to_string());
                    return Err(e);
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Reads ahead into the fair index (at most [`fair::FILL_PER_TAKE`] records a take, while
    /// it is not full), each record under its fairness key (`""`: none).
    fn fill(&self, st: &mut QueueState, now: i64) -> Result<(), LogError> {
        for _ in 0..fair::FILL_PER_TAKE {
            if st.fair.is_full() {
                break;
            }
            let Some((rec, at)) = self.advance(st, now)? else { break };
            let key = payload::fairness_key(&rec.payload);
            let offset = rec.offset;
            st.fair.push(key.as_deref().unwrap_or(""), Entry { offset, at, record: Some(Arc::new(rec)) });
        }
        Ok(())
    }

    /// Deletes whole closed segments past the retention limits, never one holding a record that is
    /// not finished (below the watermark) or not committed by a stream group (`keep_from`), unless
    /// `force`. Returns the segments deleted and the unfinished records they held.
    pub(crate) fn enforce_retention(&self, r: &Retention, keep_from: u64) -> Result<(usize, u64), LogError> {
        let protect = lock(&self.state).finished.watermark.min(keep_from);
        let segs: Vec<Segment> = self.log.segments().clone();
        let sizes: Vec<u64> = segs.iter().map(|s| std::fs::metadata(&s.path).map(|m| m.len()).unwrap_or(0)).collect();
        let mut total: u64 = sizes.iter().sum();
        let (mut deleted, mut lost) = (0, 0);
        for i in 0..segs.len().saturating_sub(1) {
            let (seg, next_base) = (&segs[i], segs[i + 1].base);
            let over = r.bytes.is_some_and(|b| total > b);
            let old = r.age.is_some_and(|a| {
                std::fs::metadata(&seg.path)
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.elapsed().ok())
                    .is_some_and(|e| e > a)
            });
            if !(over || old) {
                break;
            }
            let unfinished = next_base.saturating_sub(protect.max(seg.base));
            if unfinished > 0 && !r.force {
                tracing::debug!(segment = %seg.path.display(), unfinished, "log: retention held back by unfinished records");
                break;
            }
            self.log.segments_mut().retain(|s| s.base != seg.base);
            self.log.forget_file(&seg.path);
            std::fs::remove_file(&seg.path).map_err(|e| LogError::io(&seg.path, e))?;
            total -= sizes[i];
            deleted += 1;
            lost += unfinished;
        }
        if lost > 0 {
            let first = self.first_offset();
            let mut st = lock(&self.state);
            for o in st.finished.watermark..first {
                st.finished.mark(o);
            }
            self.log.settle(AckOp::Reset(st.finished.clone()))?;
            if st.cursor_offset < first {
                st.cursor_offset = first;
                st.cursor = Pos { seg: first, byte: 0 };
            }
            st.delayed.retain(|Reverse((_, o, _))| *o >= first);
            st.ready.retain(|(rec, _)| rec.offset >= first);
            st.fair.retain_from(first);
        }
        Ok((deleted, lost))
    }

    /// The offset of the oldest record kept.
    pub(crate) fn first_offset(&self) -> u64 {
        self.log.segments().first().map(|s| s.base).unwrap_or(0)
    }

    /// The earliest due time of a delayed record, if any.
    pub(crate) fn next_due_ms(&self) -> Option<i64> {
        lock(&self.state).delayed.peek().map(|Reverse((due, _, _))| *due)
    }

    /// Extends the leases `owner` holds.
    pub(crate) fn renew(&self, owner: u64, deadline: Instant) {
        if self.may_hold_leases() {
            lock(&self.state).leases.renew(owner, deadline);
        }
    }

    /// False when no lease is held (a lease granted meanwhile is seen by the next look).
    pub(crate) fn may_hold_leases(&self) -> bool {
        self.leased.load(Ordering::Acquire)
    }

    /// Finishes records for good: durable in the acks journal, and the watermark moves over them.
    pub(crate) fn ack(&self, offsets: &[u64]) -> Result<(), LogError> {
        if self.log.closed() {
            // Nothing would write it: the record stays unfinished (delivered again after a reopen).
            return Err(LogError::Closed);
        }
        let wake = {
            let mut st = lock(&self.state);
            for o in offsets {
                st.leases.end(*o);
                st.finished.mark(*o);
            }
            // Queued under the state lock, so the writer sees settlements in the order they were
            // made; the round is joined after it, since setting its timer may wake a thread (a
            // syscall) and every take and ack waits for this lock.
            self.log.queue_settled(AckOp::Ack(offsets.to_vec()))
        };
        if wake {
            self.log.settle_in_round();
        }
        Ok(())
    }

    /// Returns a record whose lease already ended (an expired one that could not be dead-lettered)
    /// to the queue.
    pub(crate) fn give_back(&self, record: Arc<Record>, deliveries: u32) {
        let mut st = lock(&self.state);
        if !st.finished.is_done(record.offset) && !st.leases.contains(record.offset) {
            st.ready.push_back((record, deliveries));
        }
        drop(st);
        self.has_work();
    }

    /// Gives a leased record back for immediate redelivery.
    pub(crate) fn requeue(&self, offset: u64) {
        let mut st = lock(&self.state);
        if let Some(l) = st.leases.end(offset) {
            st.ready.push_front((l.record, l.deliveries));
        }
        drop(st);
        self.has_work();
    }

    /// Returns expired leases to the queue, or (past `max_deliveries`) hands them back to be
    /// dead-lettered. Returns those and how many went back to the queue.
    pub(crate) fn expire(&self, now: Instant, max_deliveries: u32) -> (Vec<Exhausted>, usize) {
        if !self.may_hold_leases() {
            return (Vec::new(), 0);
        }
        let mut st = lock(&self.state);
        let mut out = Vec::new();
        let mut returned = 0;
        let expired = st.leases.expire(now);
        if st.leases.settle_empty() {
            // Under the state lock: a grant (under it too) sets it again after this.
            self.leased.store(false, Ordering::Release);
        }
        for l in expired {
            tracing::warn!(offset = l.record.offset, deliveries = l.deliveries, "log: lease expired: redelivering");
            if l.deliveries >= max_deliveries {
                out.push(Exhausted { record: l.record, deliveries: l.deliveries });
            } else {
                st.ready.push_back((l.record, l.deliveries));
                returned += 1;
            }
        }
        drop(st);
        if returned > 0 || !out.is_empty() {
            self.has_work();
        }
        (out, returned)
    }

    /// Ready records (not leased, not delayed).
    pub(crate) fn ready_len(&self) -> u64 {
        let end = self.log.next_offset();
        Self::ready_locked(&lock(&self.state), end)
    }

    fn ready_locked(st: &QueueState, end: u64) -> u64 {
        let ahead = end.saturating_sub(st.cursor_offset);
        let done_ahead = st.finished.done_from(st.cursor_offset);
        ahead.saturating_sub(done_ahead) + st.ready.len() as u64 + st.fair.len() as u64
    }

    /// Delayed records seen so far.
    pub(crate) fn delayed_len(&self) -> u64 {
        lock(&self.state).delayed.len() as u64
    }

    /// Finishes every record not leased right now; returns how many.
    pub(crate) fn purge(&self) -> Result<u64, LogError> {
        let end = self.log.next_offset();
        let end_pos = self.log.seek(end)?;
        let mut st = lock(&self.state);
        let pending = Self::ready_locked(&st, end) + st.delayed.len() as u64;
        // Leased records stay unfinished until settled: the watermark stays below them.
        let leased = st.leases.offsets();
        let mut finished = Finished::all_but(end, &leased);
        finished.counts = leased.iter().filter_map(|o| Some((*o, *st.finished.counts.get(o)?))).collect();
        st.finished = finished;
        st.ready.clear();
        st.delayed.clear();
        st.fair.clear();
        st.fair_reads.release();
        st.cursor_offset = end;
        st.cursor = end_pos;
        self.log.settle(AckOp::Reset(st.finished.clone()))?;
        Ok(pending)
    }

    /// Writes a checkpoint now and waits for it (clean shutdown); it also fsyncs what was appended.
    pub(crate) async fn checkpoint(&self) -> Result<(), LogError> {
        self.log.settle(AckOp::Checkpoint)?;
        self.log.flush().await
    }

    /// The finished prefix: every offset below it is finished.
    pub(crate) fn watermark(&self) -> u64 {
        lock(&self.state).finished.watermark
    }

    /// True when the record at `offset` is finished (acked, purged, dead-lettered).
    pub(crate) fn is_finished(&self, offset: u64) -> bool {
        lock(&self.state).finished.is_done(offset)
    }
}

impl Partition {
    /// Calls `f` with every record from `offset` to the end (recovery of the results topic).
    pub(crate) fn scan_from(&self, offset: u64, mut f: impl FnMut(Record)) -> Result<(), LogError> {
        let mut pos = self.log.seek(offset)?;
        let mut o = offset;
        let mut ahead = ReadAhead::default();
        while let Some((rec, _)) = self.log.read(&mut pos, o, &mut ahead)? {
            o = rec.offset + 1;
            f(rec);
        }
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    use crate::log::storage::record::NewRecord;

    /// The settings of a partition at `dir`, whose acks journal is `dir/acks` (a store's is
    /// `PATH/acks`, shared by its partitions).
    fn cfg(dir: &Path) -> PartitionConfig {
        PartitionConfig {
            fsync: Fsync::Always,
            segment_bytes: 1024,
            files: crate::log::storage::files::FileCache::new(16),
            journal: AcksJournal::open(dir, Fsync::Always).unwrap(),
        }
    }

    fn rec(p: &str) -> NewRecord {
        NewRecord { payload: p.as_bytes().to_vec(), ..NewRecord::default() }
    }

    #[tokio::test]
    async fn append_take_ack_and_reopen_resumes_after_the_finished_prefix() {
        let dir = tempdir();
        let notify = Arc::new(Notify::new());
        {
            let p = Partition::open(&dir, &cfg(&dir), notify.clone()).unwrap();
            for i in 0..100 {
                p.log.append(vec![rec(&format!("m{i}"))]).await.unwrap();
            }
            let far = Instant::now() + Duration::from_secs(60);
            let a = p.take(far, 1, &FairnessWeights::default()).unwrap().unwrap();
            let b = p.take(far, 1, &FairnessWeights::default()).unwrap().unwrap();
            let c = p.take(far, 1, &FairnessWeights::default()).unwrap().unwrap();
            assert_eq!((a.record.offset, b.record.offset, c.record.offset), (0, 1, 2));
            p.ack(&[0, 2]).unwrap();
            p.log.flush().await.unwrap();
            assert_eq!(p.watermark(), 1, "offset 1 is still leased");
            let segments = std::fs::read_dir(&dir)
                .unwrap()
                .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().starts_with("000"))
                .count();
            assert!(segments >= 3, "segments rolled: {segments}");
        }
        let p = Partition::open(&dir, &cfg(&dir), notify).unwrap();
        let far = Instant::now() + Duration::from_secs(60);
        let first = p.take(far, 1, &FairnessWeights::default()).unwrap().unwrap();
        assert_eq!(first.record.offset, 1, "1 was never acked: delivered again");
        assert_eq!(first.deliveries, 2, "and counted as a redelivery: the last owner may have handed it out");
        assert_eq!(
            p.take(far, 1, &FairnessWeights::default()).unwrap().unwrap().record.offset,
            3,
            "0 and 2 were finished"
        );
        assert_eq!(first.record.payload, b"m1");
    }

    #[tokio::test]
    async fn expired_leases_come_back_and_exhausted_ones_are_handed_out() {
        let dir = tempdir();
        let p = Partition::open(&dir, &cfg(&dir), Arc::new(Notify::new())).unwrap();
        p.log.append(vec![rec("x")]).await.unwrap();
        let now = Instant::now();
        assert_eq!(p.take(now, 1, &FairnessWeights::default()).unwrap().unwrap().deliveries, 1);
        let (ex, _) = p.expire(now + Duration::from_millis(1), 2);
        assert!(ex.is_empty());
        let again = p.take(now, 1, &FairnessWeights::default()).unwrap().unwrap();
        assert_eq!(again.deliveries, 2);
        let (ex, _) = p.expire(now + Duration::from_millis(1), 2);
        assert_eq!(ex.len(), 1, "delivered twice with max_deliveries 2: dead-letter it");
        assert!(p.take(now, 1, &FairnessWeights::default()).unwrap().is_none());
    }

    /// The expiry sweep and the renewals skip a partition that holds no lease (no lock taken):
    /// it says so once a sweep found its leases all settled, and again when one is granted.
    #[tokio::test]
    async fn a_partition_without_leases_is_skipped_by_the_sweep() {
        let dir = tempdir();
        let p = Partition::open(&dir, &cfg(&dir), Arc::new(Notify::new())).unwrap();
        assert!(!p.may_hold_leases(), "nothing taken yet");
        p.log.append(vec![rec("a"), rec("b")]).await.unwrap();
        let now = Instant::now();
        let far = now + Duration::from_secs(60);
        let a = p.take(far, 1, &FairnessWeights::default()).unwrap().unwrap();
        assert!(p.may_hold_leases());
        p.ack(&[a.record.offset]).unwrap();
        assert_eq!(p.expire(now, 10).1, 0);
        assert!(!p.may_hold_leases(), "a sweep found none left");
        // A lease granted afterwards is swept (and expires) as before.
        p.take(now, 1, &FairnessWeights::default()).unwrap().unwrap();
        assert!(p.may_hold_leases());
        assert_eq!(p.expire(now + Duration::from_millis(1), 10).1, 1);
        assert!(!p.may_hold_leases(), "the expired one went back to the queue");
        assert_eq!(p.take(far, 2, &FairnessWeights::default()).unwrap().unwrap().record.payload, b"b");
        assert!(p.may_hold_leases());
    }

    #[tokio::test]
    async fn a_consumer_renews_only_its_own_leases() {
        let dir = tempdir();
        let p = Partition::open(&dir, &cfg(&dir), Arc::new(Notify::new())).unwrap();
        p.log.append(vec![rec("mine"), rec("theirs")]).await.unwrap();
        let now = Instant::now();
        let mine = p.take(now, 1, &FairnessWeights::default()).unwrap().unwrap();
        p.take(now, 2, &FairnessWeights::default()).unwrap().unwrap();
        p.renew(1, now + Duration::from_secs(60));
        let (_, returned) = p.expire(now + Duration::from_millis(1), 10);
        assert_eq!(returned, 1, "only the lease consumer 2 did not renew expired");
        let again = p.take(now + Duration::from_secs(60), 3, &FairnessWeights::default()).unwrap().unwrap();
        assert_ne!(again.record.offset, mine.record.offset);
        assert_eq!(again.deliveries, 2);
    }

    #[tokio::test]
    async fn delayed_records_do_not_block_those_behind() {
        let dir = tempdir();
        let p = Partition::open(&dir, &cfg(&dir), Arc::new(Notify::new())).unwrap();
        let later = NewRecord { not_before_ms: now_ms() + 60_000, ..rec("later") };
        p.log.append(vec![later, rec("now")]).await.unwrap();
        let far = Instant::now() + Duration::from_secs(60);
        assert_eq!(p.take(far, 1, &FairnessWeights::default()).unwrap().unwrap().record.payload, b"now");
        assert!(p.take(far, 1, &FairnessWeights::default()).unwrap().is_none());
        assert_eq!(p.delayed_len(), 1);
    }

    /// Purge finishes the records not yet due, those the cursor passed and those it did not reach,
    /// for good (a reopened partition has none), and leaves a leased one alone.
    #[tokio::test]
    async fn purge_finishes_records_not_yet_due() {
        let dir = tempdir();
        let far = Instant::now() + Duration::from_secs(60);
        let later = |p: &str| NewRecord { not_before_ms: now_ms() + 60_000, ..rec(p) };
        {
            let p = Partition::open(&dir, &cfg(&dir), Arc::new(Notify::new())).unwrap();
            p.log.append(vec![later("seen"), rec("leased")]).await.unwrap();
            assert_eq!(p.take(far, 1, &FairnessWeights::default()).unwrap().unwrap().record.payload, b"leased");
            assert_eq!(p.delayed_len(), 1, "the cursor passed it");
            p.log.append(vec![later("unseen"), rec("ready")]).await.unwrap();
            assert_eq!(p.purge().unwrap(), 3);
            assert_eq!((p.delayed_len(), p.ready_len()), (0, 0));
            assert!(p.take(far, 2, &FairnessWeights::default()).unwrap().is_none());
            p.log.flush().await.unwrap();
        }
        let p = Partition::open(&dir, &cfg(&dir), Arc::new(Notify::new())).unwrap();
        let back = p.take(far, 1, &FairnessWeights::default()).unwrap().unwrap();
        assert_eq!(back.record.payload, b"leased", "the unsettled lease comes back after a restart");
        assert!(p.take(far, 1, &FairnessWeights::default()).unwrap().is_none());
        assert_eq!(p.delayed_len(), 0, "nothing purged comes back");
    }

    #[tokio::test]
    async fn delivery_counts_survive_reopening() {
        let dir = tempdir();
        let far = Instant::now() + Duration::from_secs(60);
        {
            let p = Partition::open(&dir, &cfg(&dir), Arc::new(Notify::new())).unwrap();
            p.log.append(vec![rec("poison"), rec("fine")]).await.unwrap();
            let t = p.take(far, 1, &FairnessWeights::default()).unwrap().unwrap();
            assert_eq!((t.deliveries, t.counted), (1, false), "a first delivery writes nothing");
        }
        // Each owner takes it and dies without settling it (no checkpoint, only acks.log).
        for expected in 2..=4 {
            let p = Partition::open(&dir, &cfg(&dir), Arc::new(Notify::new())).unwrap();
            let t = p.take(far, 1, &FairnessWeights::default()).unwrap().unwrap();
            assert_eq!((t.record.payload.as_slice(), t.deliveries, t.counted), (&b"poison"[..], expected, true));
            p.log.flush().await.unwrap();
        }
        // A checkpoint carries the counts too, and an ack drops them.
        {
            let p = Partition::open(&dir, &cfg(&dir), Arc::new(Notify::new())).unwrap();
            assert_eq!(p.take(far, 1, &FairnessWeights::default()).unwrap().unwrap().deliveries, 5);
            p.checkpoint().await.unwrap();
        }
        let p = Partition::open(&dir, &cfg(&dir), Arc::new(Notify::new())).unwrap();
        let t = p.take(far, 1, &FairnessWeights::default()).unwrap().unwrap();
        assert_eq!(t.deliveries, 6);
        p.ack(&[t.record.offset]).unwrap();
        assert!(lock(&p.state).finished.counts.is_empty());
        let fine = p.take(far, 1, &FairnessWeights::default()).unwrap().unwrap();
        assert_eq!((fine.record.payload.as_slice(), fine.deliveries), (&b"fine"[..], 2));
    }

    fn keyed(key: Option<&str>, not_before_ms: i64) -> NewRecord {
        let mut sig = celery_core::Signature::by_name("t");
        if let Some(k) = key {
            sig = sig.fairness_key(k);
        }
        let msg = celery_core::protocol::Message::from_signature(&sig).unwrap();
        NewRecord { payload: payload::encode(&msg), not_before_ms, ..NewRecord::default() }
    }

    fn key_of(t: &Taken) -> String {
        payload::fairness_key(&t.record.payload).unwrap_or_default()
    }

    /// A key queued after another's backlog is served at once, keys take turns by weight, and
    /// unkeyed records (before, among and after keyed ones) are one more key.
    #[tokio::test]
    async fn keys_take_turns_behind_a_backlog() {
        let dir = tempdir();
        let p = Partition::open(&dir, &cfg(&dir), Arc::new(Notify::new())).unwrap();
        let far = Instant::now() + Duration::from_secs(60);
        let w = FairnessWeights::new(vec!["a=3".parse().unwrap()]).unwrap();
        let mut recs = vec![keyed(None, 0)];
        recs.extend((0..50).map(|_| keyed(Some("a"), 0)));
        recs.extend((0..3).map(|_| keyed(Some("b"), 0)));
        recs.push(keyed(None, 0));
        recs.push(keyed(Some("b"), now_ms() + 200));
        p.log.append(recs).await.unwrap();
        let mut got = Vec::new();
        for _ in 0..12 {
            got.push(key_of(&p.take(far, 1, &w).unwrap().unwrap()));
        }
        assert_eq!(got, ["", "a", "a", "a", "b", "", "a", "a", "a", "b", "a", "a"]);
        assert_eq!(p.ready_len(), 55 - 12, "the index counts as ready");
        // The delayed one of b joins b's line when due.
        tokio::time::sleep(Duration::from_millis(250)).await;
        let mut rest = Vec::new();
        while let Some(t) = p.take(far, 1, &w).unwrap() {
            rest.push(key_of(&t));
        }
        assert_eq!(rest.len(), 44);
        assert_eq!(rest.iter().filter(|k| *k == "b").count(), 2);
        assert_eq!(p.ready_len(), 0);
    }

    /// Past the index's cache ([`fair::MAX_CACHED_BYTES`]), records are read again when served
    /// (through the read windows): each comes back whole, keys still take turns, and the windows
    /// are freed once the index runs empty.
    #[tokio::test]
    async fn records_past_the_cache_are_read_again_whole() {
        let dir = tempdir();
        let p = Partition::open(&dir, &cfg(&dir), Arc::new(Notify::new())).unwrap();
        let far = Instant::now() + Duration::from_secs(60);
        let w = FairnessWeights::default();
        let big = |key: &str, i: usize| {
            let sig = celery_core::Signature::by_name("t").args(serde_json::json!([i, "x".repeat(40_000)]));
            let msg = celery_core::protocol::Message::from_signature(&sig.fairness_key(key)).unwrap();
            NewRecord { payload: payload::encode(&msg), ..NewRecord::default() }
        };
        // 2 x 150 records of about 40 KB: 12 MB, past the 8 MiB kept.
        for key in ["a", "b"] {
            p.log.append((0..150).map(|i| big(key, i)).collect()).await.unwrap();
        }
        let mut got = Vec::new();
        while let Some(t) = p.take(far, 1, &w).unwrap() {
            let msg = payload::decode(&t.record.payload).0.unwrap();
            got.push((key_of(&t), msg.body().unwrap().args[0].as_u64().unwrap()));
            if got.len() == 200 {
                assert!(!lock(&p.state).fair_reads.windows_is_empty(), "records past the cache were read again");
            }
        }
        let want: Vec<(String, u64)> = (0..150).flat_map(|i| [("a".to_owned(), i), ("b".to_owned(), i)]).collect();
        assert_eq!(got, want);
        assert!(lock(&p.state).fair_reads.windows_is_empty(), "freed with the index");
    }

    /// Purge empties the index; records returned by a requeue come first as before.
    #[tokio::test]
    async fn purge_and_requeue_with_keys() {
        let dir = tempdir();
        let p = Partition::open(&dir, &cfg(&dir), Arc::new(Notify::new())).unwrap();
        let far = Instant::now() + Duration::from_secs(60);
        let w = FairnessWeights::default();
        p.log.append((0..10).map(|i| keyed(Some(if i < 5 { "a" } else { "b" }), 0)).collect()).await.unwrap();
        let t = p.take(far, 1, &w).unwrap().unwrap();
        assert_eq!(key_of(&t), "a");
        p.requeue(t.record.offset);
        assert_eq!(p.take(far, 1, &w).unwrap().unwrap().record.offset, t.record.offset);
        assert_eq!(p.purge().unwrap(), 9);
        assert!(p.take(far, 1, &w).unwrap().is_none());
        assert_eq!(p.ready_len(), 0);
    }

    pub(crate) fn tempdir() -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("logtest-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }
}

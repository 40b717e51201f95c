//! A partition: its segments, the writer thread that appends with group commit, and the task-queue
//! state on top (cursor, leases, redeliveries, delayed records, and the durable finished prefix).
//!
//! Group commit: publishers hand batches to one writer thread per partition, which drains everything
//! pending, writes it with one `write`, fsyncs once (policy `always`), then completes every waiter.
//! Acks go through the same thread into `acks.log`: settling threads add them to a shared list and
//! wake the writer only when the list was empty, so a busy queue costs one wake-up per batch of
//! acks, not per ack. The writer keeps its own copy of the finished set, built from exactly the
//! acks it wrote, and compacts it into `checkpoint` now and then (and truncates `acks.log`): a
//! checkpoint therefore always covers every ack written before it.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, VecDeque};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use tokio::sync::{oneshot, Notify};

use super::error::LogError;
use super::record::Record;
use super::segment::{self, ReadAhead, Segment};

/// How long an ack may wait for its fsync under `Fsync::Always` (acks share fsyncs).
const ACK_SYNC: Duration = Duration::from_millis(10);
/// How long the writer, woken by acks alone, gathers more before writing them.
const ACK_GATHER: Duration = Duration::from_micros(500);

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

/// A record to append (the offset and timestamp are assigned by the writer).
#[derive(Debug, Clone, Default)]
pub struct NewRecord {
    /// Not deliverable before this time (ms since the epoch); 0: now.
    pub not_before_ms: i64,
    /// Headers.
    pub headers: Vec<(String, Vec<u8>)>,
    /// Partitioning key.
    pub key: Vec<u8>,
    /// Payload.
    pub payload: Vec<u8>,
}

impl NewRecord {
    /// Its framed size on disk (what the size limits count).
    pub(crate) fn encoded_len(&self) -> usize {
        super::record::framed_len(&self.headers, self.key.len(), self.payload.len())
    }
}

/// Partition settings.
#[derive(Debug, Clone)]
pub(crate) struct PartitionConfig {
    /// The fsync policy.
    pub(crate) fsync: Fsync,
    /// Roll to a new segment past this many bytes.
    pub(crate) segment_bytes: u64,
}

enum WriterCmd {
    Append(Vec<NewRecord>, oneshot::Sender<Result<u64, LogError>>),
    /// Settlements are waiting in the shared list.
    Settled,
    /// Answered once what was sent before is written: an error when this batch's write, fsync or
    /// checkpoint failed.
    Flush(oneshot::Sender<Result<(), LogError>>),
}

/// A change to the finished set, in the order the writer applies it.
#[derive(Debug)]
enum AckOp {
    /// Offsets finished.
    Ack(Vec<u64>),
    /// A record's delivery count (a redelivery).
    Count(u64, u32),
    /// The whole set replaced (purge, forced retention); checkpointed at once.
    Reset(Finished),
    /// Checkpoint now (clean shutdown; forces an fsync).
    Checkpoint,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Pos {
    /// The base offset of the segment.
    seg: u64,
    byte: u64,
}

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
    tx: Mutex<Option<mpsc::Sender<WriterCmd>>>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Settlements for the writer, in order.
    settled: Arc<Mutex<Vec<AckOp>>>,
    /// The partition's directory.
    dir: PathBuf,
    /// Damage reported so far: (segment, first lost offset).
    damaged: Mutex<std::collections::HashSet<(u64, u64)>>,
    /// Records lost to damage found so far.
    pub(crate) corrupt_records: std::sync::atomic::AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

impl PartitionLog {
    fn open(
        dir: &Path,
        cfg: &PartitionConfig,
        finished: Finished,
        on_append: Arc<Notify>,
    ) -> Result<PartitionLog, LogError> {
        let first_offset = finished.watermark;
        let rec = segment::recover(dir, first_offset)?;
        let active =
            rec.segments.last().cloned().ok_or_else(|| LogError::Invalid("a partition without a segment".into()))?;
        let tail = Pos { seg: active.base, byte: rec.tail_len };
        let segments = Arc::new(RwLock::new(rec.segments));
        let end = Arc::new(Mutex::new(End { next_offset: rec.next_offset, tail }));
        let (tx, rx) = mpsc::channel();
        let settled: Arc<Mutex<Vec<AckOp>>> = Arc::default();
        let acks_path = dir.join("acks.log");
        let acks = super::disk::open_append(&acks_path)?;
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
            acks_len: acks.metadata().map_err(|e| LogError::io(&acks_path, e))?.len(),
            acks,
            batch_start: rec.tail_len,
            broken: None,
            sync_failed: None,
            dirty: false,
            acks_dirty: false,
            last_sync: Instant::now(),
        };
        let thread = std::thread::Builder::new()
            .name(format!("log-writer-{}", dir.file_name().and_then(|n| n.to_str()).unwrap_or("?")))
            .spawn(move || writer.run(rx))
            .map_err(|e| LogError::io(dir, e))?;
        Ok(PartitionLog {
            segments,
            end,
            tx: Mutex::new(Some(tx)),
            thread: Mutex::new(Some(thread)),
            settled,
            dir: dir.to_owned(),
            damaged: Mutex::default(),
            corrupt_records: Default::default(),
        })
    }

    fn send(&self, cmd: WriterCmd) -> Result<(), LogError> {
        lock(&self.tx).as_ref().ok_or(LogError::Closed)?.send(cmd).map_err(|_| LogError::Closed)
    }

    /// Hands a settlement to the writer, waking it when it had none waiting.
    fn settle(&self, op: AckOp) -> Result<(), LogError> {
        if self.queue_settled(op) {
            self.wake_writer()?;
        }
        Ok(())
    }

    /// Queues a settlement for the writer; true when it had none waiting (then wake it with
    /// [`PartitionLog::wake_writer`]).
    fn queue_settled(&self, op: AckOp) -> bool {
        let mut s = lock(&self.settled);
        s.push(op);
        s.len() == 1
    }

    fn wake_writer(&self) -> Result<(), LogError> {
        self.send(WriterCmd::Settled)
    }

    /// Appends records; resolves with the first offset once they are written (and fsynced per policy).
    pub(crate) async fn append(&self, records: Vec<NewRecord>) -> Result<u64, LogError> {
        // Never write what could not be read back: a frame over the on-disk limit would stop every
        // reader at it.
        for r in &records {
            let limit = super::record::MAX_RECORD - super::record::FRAME_HEADER + 4;
            super::store::check_size("record", r.encoded_len(), limit)?;
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
        let segs = self.segments.read().unwrap_or_else(|p| p.into_inner());
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
            None => seg.file.metadata().map_err(|e| LogError::io(&seg.path, e))?.len(),
        };
        let next_seg = idx.and_then(|i| segs.get(i + 1)).map(|n| (Pos { seg: n.base, byte: 0 }, n.base));
        let resume = segment::resync(&seg.file, &seg.path, at.byte, end, offset)?
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
                std::os::unix::fs::FileExt::read_exact_at(&*seg.file, &mut bytes, from).ok()?;
                super::disk::create_dir_all(&qdir).ok()?;
                let path = qdir.join(format!("{}-{from}.bin", seg.base));
                super::disk::replace_file(&path, &bytes).ok().map(|()| path)
            })
            .flatten();
        tracing::error!(
            segment = %seg.path.display(), byte = from, lost_offsets = ?lost, count, problem,
            quarantined = ?saved, "log: damaged records skipped; the records after them are served"
        );
    }

    /// Re-reads the record at a position found earlier.
    fn read_at(&self, at: Pos) -> Result<Record, LogError> {
        let segs = self.segments.read().unwrap_or_else(|p| p.into_inner());
        let seg = segs
            .iter()
            .find(|s| s.base == at.seg)
            .ok_or_else(|| LogError::Invalid("segment is gone (retention)".into()))?;
        Ok(segment::read_at(seg, at.byte, &mut ReadAhead::exact(), None)?.0)
    }

    /// The position of `offset` (scanning its segment from the start).
    pub(crate) fn seek(&self, offset: u64) -> Result<Pos, LogError> {
        let base = {
            let segs = self.segments.read().unwrap_or_else(|p| p.into_inner());
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

    /// Stops the writer thread after it has written everything sent.
    pub(crate) fn close(&self) {
        lock(&self.tx).take();
        if let Some(t) = lock(&self.thread).take() {
            let _ = t.join();
        }
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
    acks: File,
    /// Bytes of `acks.log` written by this writer (a failed write is cut back to it).
    acks_len: u64,
    /// Where the batch being written starts in the active segment: a batch whose write or fsync
    /// fails is cut back to it, so a later batch never lands behind bytes that were refused.
    batch_start: u64,
    /// Set when a failed batch could not be cut back: every later append fails (reopening the
    /// partition recovers it).
    broken: Option<String>,
    /// An fsync of this batch failed (even one whose error was handled, like a checkpoint's).
    sync_failed: Option<String>,
    settled: Arc<Mutex<Vec<AckOp>>>,
    /// The finished set as written to `acks.log` and `checkpoint`.
    finished: Finished,
    acks_since_checkpoint: usize,
    dirty: bool,
    acks_dirty: bool,
    last_sync: Instant,
}

impl Writer {
    fn run(mut self, rx: mpsc::Receiver<WriterCmd>) {
        loop {
            // Wake up for a pending fsync only when something is waiting for one.
            let idle = match self.cfg.fsync {
                Fsync::Interval(d) if self.dirty || self.acks_dirty => d,
                Fsync::Always if self.acks_dirty => ACK_SYNC,
                _ => Duration::from_secs(3600),
            };
            let first = match rx.recv_timeout(idle) {
                Ok(c) => c,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    if let Err(e) = self.maybe_sync(true) {
                        tracing::error!(error = %e, "log: fsync failed");
                    }
                    continue;
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            };
            let mut batch = vec![first];
            if matches!(batch[0], WriterCmd::Settled) {
                // Woken by acks alone: let more gather (anything else ends the wait).
                if let Ok(c) = rx.recv_timeout(ACK_GATHER) {
                    batch.push(c);
                }
            }
            while batch.len() < 4096 {
                match rx.try_recv() {
                    Ok(c) => batch.push(c),
                    Err(_) => break,
                }
            }
            self.process(batch);
        }
        if let Err(e) = self.maybe_sync(true) {
            tracing::error!(error = %e, "log: fsync failed");
        }
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
                WriterCmd::Settled => {}
                WriterCmd::Flush(f) => flushes.push(f),
            }
        }
        // Taken after the commands: a flush waits for the settlements made before it.
        let settled = std::mem::take(&mut *lock(&self.settled));
        self.sync_failed = None;
        let result = self.write_records(&buf, start_offset);
        let settle_error = self.apply_settled(settled).err().map(|e| {
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
        let seg = &self.active;
        if self.tail_len == self.batch_start {
            return;
        }
        match seg.file.set_len(self.batch_start) {
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
            let seg = segment::create(&self.dir, first)?;
            self.segments.write().unwrap_or_else(|p| p.into_inner()).push(seg.clone());
            self.active = seg;
            self.tail_len = 0;
            self.batch_start = 0;
        }
        let seg = &self.active;
        // A failure is undone by the caller (`undo_batch`): never a half-written batch behind a later one.
        self.tail_len += buf.len() as u64;
        super::disk::write_all(&seg.file, buf, &seg.path)?;
        self.dirty = true;
        Ok(())
    }

    /// Writes acks to `acks.log` and applies them to the writer's finished set, checkpointing when
    /// asked, on a reset, or every [`CHECKPOINT_EVERY`] acks.
    fn apply_settled(&mut self, settled: Vec<AckOp>) -> Result<(), LogError> {
        let (mut acks, mut counts) = (Vec::new(), Vec::new());
        let mut checkpoint = false;
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
                        counts.extend_from_slice(&offset.to_le_bytes());
                        counts.extend_from_slice(&n.to_le_bytes());
                    }
                }
                AckOp::Reset(f) => {
                    // Settlements before the reset are covered by it.
                    acks.clear();
                    counts.clear();
                    self.finished = f;
                    checkpoint = true;
                }
                AckOp::Checkpoint => checkpoint = true,
            }
        }
        self.acks_since_checkpoint += acks.len();
        if checkpoint || self.acks_since_checkpoint >= CHECKPOINT_EVERY {
            // The checkpoint holds every ack so far: acks.log starts over.
            let data = self.finished.encode();
            match self.write_checkpoint(&data) {
                Ok(()) => {
                    self.acks_since_checkpoint = 0;
                    Ok(())
                }
                Err(e) => {
                    // Keep this batch's acks in acks.log at least (the next checkpoint covers them).
                    let body: Vec<u8> = acks.iter().flat_map(|a| a.to_le_bytes()).collect();
                    let _ = self.write_acks_frame(0, &body).and_then(|()| self.write_acks_frame(COUNTS_FRAME, &counts));
                    Err(e)
                }
            }
        } else {
            let body: Vec<u8> = acks.iter().flat_map(|a| a.to_le_bytes()).collect();
            self.write_acks_frame(0, &body)?;
            self.write_acks_frame(COUNTS_FRAME, &counts)
        }
    }

    /// Appends one `acks.log` frame (`flags` marks its kind in the length word).
    fn write_acks_frame(&mut self, flags: u32, body: &[u8]) -> Result<(), LogError> {
        if body.is_empty() {
            return Ok(());
        }
        let mut frame = Vec::with_capacity(body.len() + 8);
        frame.extend_from_slice(&(body.len() as u32 | flags).to_le_bytes());
        frame.extend_from_slice(&crc32c::crc32c(body).to_le_bytes());
        frame.extend_from_slice(body);
        let path = self.dir.join("acks.log");
        if let Err(e) = super::disk::write_all(&self.acks, &frame, &path) {
            // A torn frame would hide every later one at the next open: cut it off.
            let _ = self.acks.set_len(self.acks_len);
            return Err(e);
        }
        self.acks_len += frame.len() as u64;
        self.acks_dirty = true;
        Ok(())
    }

    /// fsyncs what was written since the last sync (the segment, `acks.log`, or both).
    fn sync_now(&mut self) -> Result<(), LogError> {
        if self.dirty {
            let seg = &self.active;
            if let Err(e) = super::disk::sync_data(&seg.file, &seg.path) {
                self.sync_failed = Some(e.to_string());
                return Err(e);
            }
            self.dirty = false;
        }
        if self.acks_dirty {
            if let Err(e) = super::disk::sync_data(&self.acks, &self.dir.join("acks.log")) {
                self.sync_failed = Some(e.to_string());
                return Err(e);
            }
            self.acks_dirty = false;
        }
        self.last_sync = Instant::now();
        Ok(())
    }

    /// Under `always`, appended records are fsynced before anyone is told; acks alone are fsynced
    /// at most [`ACK_SYNC`] later (a crash in that window delivers those finished records again).
    fn maybe_sync(&mut self, idle: bool) -> Result<(), LogError> {
        match self.cfg.fsync {
            Fsync::Always if self.dirty || idle || self.last_sync.elapsed() >= ACK_SYNC => self.sync_now(),
            Fsync::Interval(d) if idle || self.last_sync.elapsed() >= d => self.sync_now(),
            _ => Ok(()),
        }
    }

    /// Replaces `checkpoint` atomically, then empties `acks.log` (whose acks it contains).
    fn write_checkpoint(&mut self, data: &[u8]) -> Result<(), LogError> {
        self.sync_now()?;
        super::disk::replace_file(&self.dir.join("checkpoint"), data)?;
        let path = self.dir.join("acks.log");
        self.acks.set_len(0).map_err(|e| LogError::io(&path, e))?;
        self.acks_len = 0;
        super::disk::sync_all(&self.acks, &path)
    }
}

/// The finished prefix: every offset below `watermark` is done, and so is every offset of the
/// ranges in `done` (`start -> end`, end exclusive; disjoint, never touching one another or the
/// watermark). A record that stays unfinished for long (a long task, a far-off eta) holds the
/// watermark, and everything finished behind it costs one range, not one entry per record.
#[derive(Debug, Default, Clone, PartialEq)]
pub(crate) struct Finished {
    pub(crate) watermark: u64,
    pub(crate) done: BTreeMap<u64, u64>,
    /// Delivery counts of unfinished records that were redelivered (dropped when they finish).
    pub(crate) counts: BTreeMap<u64, u32>,
}

impl Finished {
    fn mark(&mut self, offset: u64) {
        if self.is_done(offset) {
            return;
        }
        self.counts.remove(&offset);
        if offset == self.watermark {
            self.watermark += 1;
            if let Some(end) = self.done.remove(&self.watermark) {
                self.watermark = end;
            }
            return;
        }
        let before = self.done.range(..offset).next_back().filter(|(_, end)| **end == offset).map(|(s, _)| *s);
        let after = self.done.remove(&(offset + 1));
        match before {
            Some(start) => {
                self.done.insert(start, after.unwrap_or(offset + 1));
            }
            None => {
                self.done.insert(offset, after.unwrap_or(offset + 1));
            }
        }
    }

    fn is_done(&self, offset: u64) -> bool {
        offset < self.watermark || self.done.range(..=offset).next_back().is_some_and(|(_, end)| *end > offset)
    }

    /// How many offsets at or after `from` are done.
    fn done_from(&self, from: u64) -> u64 {
        self.done.iter().map(|(s, e)| e.saturating_sub((*s).max(from))).sum()
    }

    /// Everything below `end` is done except the `unfinished` offsets.
    fn all_but(end: u64, unfinished: &[u64]) -> Finished {
        let mut left: Vec<u64> = unfinished.iter().copied().filter(|o| *o < end).collect();
        left.sort_unstable();
        left.dedup();
        let Some(first) = left.first().copied() else {
            return Finished { watermark: end, ..Finished::default() };
        };
        let bounds = left.iter().copied().skip(1).chain(std::iter::once(end));
        let done = left.iter().zip(bounds).filter(|(a, b)| **a + 1 < *b).map(|(a, b)| (a + 1, b)).collect();
        Finished { watermark: first, done, counts: BTreeMap::new() }
    }

    fn encode(&self) -> Vec<u8> {
        let mut body = Vec::with_capacity(16 + self.done.len() * 16);
        body.extend_from_slice(&self.watermark.to_le_bytes());
        body.extend_from_slice(&(self.done.len() as u64).to_le_bytes());
        for (start, end) in &self.done {
            body.extend_from_slice(&start.to_le_bytes());
            body.extend_from_slice(&end.to_le_bytes());
        }
        body.extend_from_slice(&(self.counts.len() as u64).to_le_bytes());
        for (offset, count) in &self.counts {
            body.extend_from_slice(&offset.to_le_bytes());
            body.extend_from_slice(&u64::from(*count).to_le_bytes());
        }
        let mut out = b"CKPT3".to_vec();
        out.extend_from_slice(&crc32c::crc32c(&body).to_le_bytes());
        out.extend_from_slice(&body);
        out
    }

    /// Reads a checkpoint: `CKPT3` (ranges and delivery counts), or the older `CKPT2` (ranges) and
    /// `CKPT1` (one entry per offset).
    fn decode(data: &[u8], path: &Path) -> Result<Finished, LogError> {
        let bad = |reason: &str| LogError::Corrupt { path: path.to_owned(), offset: 0, reason: reason.into() };
        let (version, body) = match data.split_at_checked(5) {
            Some((b"CKPT3", rest)) => (3, rest),
            Some((b"CKPT2", rest)) => (2, rest),
            Some((b"CKPT1", rest)) => (1, rest),
            _ => return Err(bad("not a checkpoint")),
        };
        let ranges = version >= 2;
        let (crc, body) = body.split_at_checked(4).ok_or_else(|| bad("short"))?;
        if crc32c::crc32c(body).to_le_bytes() != crc || body.len() < 16 {
            return Err(bad("checksum mismatch"));
        }
        let word = |i: usize| u64::from_le_bytes(body[i * 8..i * 8 + 8].try_into().unwrap_or([0; 8]));
        let mut f = Finished { watermark: word(0), ..Finished::default() };
        let n = word(1) as usize;
        let per = if ranges { 2 } else { 1 };
        let counts_at = n.checked_mul(per).and_then(|w| w.checked_add(2)).ok_or_else(|| bad("length"))?;
        let words = body.len() / 8;
        let m = if version >= 3 && counts_at < words { word(counts_at) as usize } else { 0 };
        let expected =
            if version >= 3 { m.checked_mul(2).and_then(|c| c.checked_add(counts_at + 1)) } else { Some(counts_at) };
        if !body.len().is_multiple_of(8) || expected != Some(words) {
            return Err(bad("length mismatch"));
        }
        for i in 0..m {
            let (offset, count) = (word(counts_at + 1 + 2 * i), word(counts_at + 2 + 2 * i));
            f.counts.insert(offset, u32::try_from(count).map_err(|_| bad("invalid delivery count"))?);
        }
        for i in 0..n {
            if ranges {
                let (start, end) = (word(2 + 2 * i), word(3 + 2 * i));
                if start <= f.watermark || end <= start {
                    return Err(bad("invalid range"));
                }
                f.done.insert(start, end);
            } else {
                f.mark(word(2 + i));
            }
        }
        Ok(f)
    }

    /// Loads `checkpoint` and replays `acks.log` (a torn last frame of acks is ignored: those acks
    /// were not durable, and their records are delivered again).
    fn load(dir: &Path) -> Result<Finished, LogError> {
        let path = dir.join("checkpoint");
        let mut f = match std::fs::read(&path) {
            Ok(data) => Finished::decode(&data, &path)?,
            Err(_) => Finished::default(),
        };
        let acks_path = dir.join("acks.log");
        if let Ok(data) = std::fs::read(&acks_path) {
            let mut pos = 0;
            while pos + 8 <= data.len() {
                let word = u32::from_le_bytes(data[pos..pos + 4].try_into().unwrap_or([0; 4]));
                let (counts, len) = (word & COUNTS_FRAME != 0, (word & !COUNTS_FRAME) as usize);
                let crc = u32::from_le_bytes(data[pos + 4..pos + 8].try_into().unwrap_or([0; 4]));
                let Some(body) = data.get(pos + 8..pos + 8 + len) else {
                    break;
                };
                let entry = if counts { 12 } else { 8 };
                if crc32c::crc32c(body) != crc || !len.is_multiple_of(entry) {
                    tracing::warn!(path = %acks_path.display(), pos, "log: torn acks frame ignored");
                    break;
                }
                for c in body.chunks_exact(entry) {
                    let offset = u64::from_le_bytes(c[..8].try_into().unwrap_or([0; 8]));
                    if !counts {
                        f.mark(offset);
                    } else if !f.is_done(offset) {
                        f.counts.insert(offset, u32::from_le_bytes(c[8..].try_into().unwrap_or([0; 4])));
                    }
                }
                pos += 8 + len;
            }
        }
        Ok(f)
    }
}

/// A record handed to a consumer, until it is settled or its lease expires.
#[derive(Debug)]
struct Lease {
    deadline: Instant,
    /// The consumer that holds it (and renews it while it lives).
    owner: u64,
    deliveries: u32,
    record: Arc<Record>,
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
    leased: HashMap<u64, Lease>,
    expiry: BinaryHeap<Reverse<(Instant, u64)>>,
    /// Set when a corrupt record was found: the partition serves nothing more.
    error: Option<String>,
    /// The end of the log when it was opened: an unfinished record below it without a persisted
    /// count may have been delivered once by a previous owner (first deliveries are not written),
    /// so its first delivery here counts as a redelivery, and the worker checks for a stored result
    /// before running it.
    recovered_end: u64,
}

impl QueueState {
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
}

/// Marks an `acks.log` frame of delivery counts (`offset:u64 count:u32` each) in its length word.
const COUNTS_FRAME: u32 = 1 << 31;

/// Acks between two checkpoints.
const CHECKPOINT_EVERY: usize = 50_000;

impl Partition {
    pub(crate) fn open(dir: &Path, cfg: &PartitionConfig, on_append: Arc<Notify>) -> Result<Partition, LogError> {
        let finished = Finished::load(dir)?;
        let log = PartitionLog::open(dir, cfg, finished.clone(), on_append)?;
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
                leased: HashMap::new(),
                expiry: BinaryHeap::new(),
                error: None,
                recovered_end,
            }),
            log,
        })
    }

    /// Takes the next deliverable record and leases it until `deadline`.
    pub(crate) fn take(&self, deadline: Instant, owner: u64) -> Result<Option<Taken>, LogError> {
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
                    break Some((Arc::new(rec), st.prior_deliveries(offset)));
                }
            }
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
                    break Some((Arc::new(rec), st.prior_deliveries(offset)));
                }
                Ok(None) => break None,
                Err(e @ LogError::Corrupt { .. }) => {
                    tracing::error!(error = %e, "log: partition stopped: damage with nothing valid after it");
                    st.error = Some(e.to_string());
                    return Err(e);
                }
                Err(e) => return Err(e),
            }
        };
        let Some((record, prior)) = found else { return Ok(None) };
        let deliveries = prior + 1;
        st.expiry.push(Reverse((deadline, record.offset)));
        st.leased.insert(record.offset, Lease { deadline, owner, deliveries, record: record.clone() });
        // A redelivery's count is persisted (a first delivery's is implied by the record being
        // unfinished), so a record that kills its consumer's process still reaches max_deliveries.
        let counted = deliveries > 1;
        if counted {
            st.finished.counts.insert(record.offset, deliveries);
            self.log.settle(AckOp::Count(record.offset, deliveries))?;
        }
        Ok(Some(Taken { record, deliveries, counted }))
    }

    /// Deletes whole closed segments past the retention limits, never one holding a record that is
    /// not finished (below the watermark) or not committed by a stream group (`keep_from`), unless
    /// `force`. Returns the segments deleted and the unfinished records they held.
    pub(crate) fn enforce_retention(&self, r: &Retention, keep_from: u64) -> Result<(usize, u64), LogError> {
        let protect = lock(&self.state).finished.watermark.min(keep_from);
        let segs: Vec<Segment> = self.log.segments.read().unwrap_or_else(|p| p.into_inner()).clone();
        let sizes: Vec<u64> = segs.iter().map(|s| s.file.metadata().map(|m| m.len()).unwrap_or(0)).collect();
        let mut total: u64 = sizes.iter().sum();
        let (mut deleted, mut lost) = (0, 0);
        for i in 0..segs.len().saturating_sub(1) {
            let (seg, next_base) = (&segs[i], segs[i + 1].base);
            let over = r.bytes.is_some_and(|b| total > b);
            let old = r.age.is_some_and(|a| {
                seg.file
                    .metadata()
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
            self.log.segments.write().unwrap_or_else(|p| p.into_inner()).retain(|s| s.base != seg.base);
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
        }
        Ok((deleted, lost))
    }

    /// The offset of the oldest record kept.
    pub(crate) fn first_offset(&self) -> u64 {
        self.log.segments.read().unwrap_or_else(|p| p.into_inner()).first().map(|s| s.base).unwrap_or(0)
    }

    /// The earliest due time of a delayed record, if any.
    pub(crate) fn next_due_ms(&self) -> Option<i64> {
        lock(&self.state).delayed.peek().map(|Reverse((due, _, _))| *due)
    }

    /// Extends the leases `owner` holds.
    pub(crate) fn renew(&self, owner: u64, deadline: Instant) {
        let st = &mut *lock(&self.state);
        for (o, l) in st.leased.iter_mut().filter(|(_, l)| l.owner == owner) {
            l.deadline = deadline;
            st.expiry.push(Reverse((deadline, *o)));
        }
    }

    /// Finishes records for good: durable in `acks.log`, and the watermark moves over them.
    pub(crate) fn ack(&self, offsets: &[u64]) -> Result<(), LogError> {
        let wake = {
            let mut st = lock(&self.state);
            for o in offsets {
                st.leased.remove(o);
                st.finished.mark(*o);
            }
            // Queued under the state lock, so the writer sees settlements in the order they were
            // made; woken after it, since waking a thread enters the kernel and every take and ack
            // waits for this lock (held across a syscall, it made both threads sleep on it).
            self.log.queue_settled(AckOp::Ack(offsets.to_vec()))
        };
        if wake {
            self.log.wake_writer()?;
        }
        Ok(())
    }

    /// Returns a record whose lease already ended (an expired one that could not be dead-lettered)
    /// to the queue.
    pub(crate) fn give_back(&self, record: Arc<Record>, deliveries: u32) {
        let mut st = lock(&self.state);
        if !st.finished.is_done(record.offset) && !st.leased.contains_key(&record.offset) {
            st.ready.push_back((record, deliveries));
        }
    }

    /// Gives a leased record back for immediate redelivery.
    pub(crate) fn requeue(&self, offset: u64) {
        let mut st = lock(&self.state);
        if let Some(l) = st.leased.remove(&offset) {
            st.ready.push_front((l.record, l.deliveries));
        }
    }

    /// Returns expired leases to the queue, or (past `max_deliveries`) hands them back to be
    /// dead-lettered. Returns those and how many went back to the queue.
    pub(crate) fn expire(&self, now: Instant, max_deliveries: u32) -> (Vec<Exhausted>, usize) {
        let mut st = lock(&self.state);
        let mut out = Vec::new();
        let mut returned = 0;
        while let Some(Reverse((deadline, offset))) = st.expiry.peek().cloned() {
            if deadline > now {
                break;
            }
            st.expiry.pop();
            let expired = st.leased.get(&offset).is_some_and(|l| l.deadline <= now);
            if !expired {
                continue;
            }
            let Some(l) = st.leased.remove(&offset) else {
                continue;
            };
            tracing::warn!(offset, deliveries = l.deliveries, "log: lease expired: redelivering");
            if l.deliveries >= max_deliveries {
                out.push(Exhausted { record: l.record, deliveries: l.deliveries });
            } else {
                st.ready.push_back((l.record, l.deliveries));
                returned += 1;
            }
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
        ahead.saturating_sub(done_ahead) + st.ready.len() as u64
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
        let leased: Vec<u64> = st.leased.keys().copied().collect();
        let mut finished = Finished::all_but(end, &leased);
        finished.counts = leased.iter().filter_map(|o| Some((*o, *st.finished.counts.get(o)?))).collect();
        st.finished = finished;
        st.ready.clear();
        st.delayed.clear();
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

    fn cfg() -> PartitionConfig {
        PartitionConfig { fsync: Fsync::Always, segment_bytes: 1024 }
    }

    fn rec(p: &str) -> NewRecord {
        NewRecord { payload: p.as_bytes().to_vec(), ..NewRecord::default() }
    }

    #[tokio::test]
    async fn append_take_ack_and_reopen_resumes_after_the_finished_prefix() {
        let dir = tempdir();
        let notify = Arc::new(Notify::new());
        {
            let p = Partition::open(&dir, &cfg(), notify.clone()).unwrap();
            for i in 0..100 {
                p.log.append(vec![rec(&format!("m{i}"))]).await.unwrap();
            }
            let far = Instant::now() + Duration::from_secs(60);
            let a = p.take(far, 1).unwrap().unwrap();
            let b = p.take(far, 1).unwrap().unwrap();
            let c = p.take(far, 1).unwrap().unwrap();
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
        let p = Partition::open(&dir, &cfg(), notify).unwrap();
        let far = Instant::now() + Duration::from_secs(60);
        let first = p.take(far, 1).unwrap().unwrap();
        assert_eq!(first.record.offset, 1, "1 was never acked: delivered again");
        assert_eq!(first.deliveries, 2, "and counted as a redelivery: the last owner may have handed it out");
        assert_eq!(p.take(far, 1).unwrap().unwrap().record.offset, 3, "0 and 2 were finished");
        assert_eq!(first.record.payload, b"m1");
    }

    #[tokio::test]
    async fn expired_leases_come_back_and_exhausted_ones_are_handed_out() {
        let dir = tempdir();
        let p = Partition::open(&dir, &cfg(), Arc::new(Notify::new())).unwrap();
        p.log.append(vec![rec("x")]).await.unwrap();
        let now = Instant::now();
        assert_eq!(p.take(now, 1).unwrap().unwrap().deliveries, 1);
        let (ex, _) = p.expire(now + Duration::from_millis(1), 2);
        assert!(ex.is_empty());
        let again = p.take(now, 1).unwrap().unwrap();
        assert_eq!(again.deliveries, 2);
        let (ex, _) = p.expire(now + Duration::from_millis(1), 2);
        assert_eq!(ex.len(), 1, "delivered twice with max_deliveries 2: dead-letter it");
        assert!(p.take(now, 1).unwrap().is_none());
    }

    #[tokio::test]
    async fn a_consumer_renews_only_its_own_leases() {
        let dir = tempdir();
        let p = Partition::open(&dir, &cfg(), Arc::new(Notify::new())).unwrap();
        p.log.append(vec![rec("mine"), rec("theirs")]).await.unwrap();
        let now = Instant::now();
        let mine = p.take(now, 1).unwrap().unwrap();
        p.take(now, 2).unwrap().unwrap();
        p.renew(1, now + Duration::from_secs(60));
        let (_, returned) = p.expire(now + Duration::from_millis(1), 10);
        assert_eq!(returned, 1, "only the lease consumer 2 did not renew expired");
        let again = p.take(now + Duration::from_secs(60), 3).unwrap().unwrap();
        assert_ne!(again.record.offset, mine.record.offset);
        assert_eq!(again.deliveries, 2);
    }

    #[tokio::test]
    async fn delayed_records_do_not_block_those_behind() {
        let dir = tempdir();
        let p = Partition::open(&dir, &cfg(), Arc::new(Notify::new())).unwrap();
        let later = NewRecord { not_before_ms: now_ms() + 60_000, ..rec("later") };
        p.log.append(vec![later, rec("now")]).await.unwrap();
        let far = Instant::now() + Duration::from_secs(60);
        assert_eq!(p.take(far, 1).unwrap().unwrap().record.payload, b"now");
        assert!(p.take(far, 1).unwrap().is_none());
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
            let p = Partition::open(&dir, &cfg(), Arc::new(Notify::new())).unwrap();
            p.log.append(vec![later("seen"), rec("leased")]).await.unwrap();
            assert_eq!(p.take(far, 1).unwrap().unwrap().record.payload, b"leased");
            assert_eq!(p.delayed_len(), 1, "the cursor passed it");
            p.log.append(vec![later("unseen"), rec("ready")]).await.unwrap();
            assert_eq!(p.purge().unwrap(), 3);
            assert_eq!((p.delayed_len(), p.ready_len()), (0, 0));
            assert!(p.take(far, 2).unwrap().is_none());
            p.log.flush().await.unwrap();
        }
        let p = Partition::open(&dir, &cfg(), Arc::new(Notify::new())).unwrap();
        let back = p.take(far, 1).unwrap().unwrap();
        assert_eq!(back.record.payload, b"leased", "the unsettled lease comes back after a restart");
        assert!(p.take(far, 1).unwrap().is_none());
        assert_eq!(p.delayed_len(), 0, "nothing purged comes back");
    }

    #[tokio::test]
    async fn delivery_counts_survive_reopening() {
        let dir = tempdir();
        let far = Instant::now() + Duration::from_secs(60);
        {
            let p = Partition::open(&dir, &cfg(), Arc::new(Notify::new())).unwrap();
            p.log.append(vec![rec("poison"), rec("fine")]).await.unwrap();
            let t = p.take(far, 1).unwrap().unwrap();
            assert_eq!((t.deliveries, t.counted), (1, false), "a first delivery writes nothing");
        }
        // Each owner takes it and dies without settling it (no checkpoint, only acks.log).
        for expected in 2..=4 {
            let p = Partition::open(&dir, &cfg(), Arc::new(Notify::new())).unwrap();
            let t = p.take(far, 1).unwrap().unwrap();
            assert_eq!((t.record.payload.as_slice(), t.deliveries, t.counted), (&b"poison"[..], expected, true));
            p.log.flush().await.unwrap();
        }
        // A checkpoint carries the counts too, and an ack drops them.
        {
            let p = Partition::open(&dir, &cfg(), Arc::new(Notify::new())).unwrap();
            assert_eq!(p.take(far, 1).unwrap().unwrap().deliveries, 5);
            p.checkpoint().await.unwrap();
        }
        let p = Partition::open(&dir, &cfg(), Arc::new(Notify::new())).unwrap();
        let t = p.take(far, 1).unwrap().unwrap();
        assert_eq!(t.deliveries, 6);
        p.ack(&[t.record.offset]).unwrap();
        assert!(lock(&p.state).finished.counts.is_empty());
        let fine = p.take(far, 1).unwrap().unwrap();
        assert_eq!((fine.record.payload.as_slice(), fine.deliveries), (&b"fine"[..], 2));
    }

    #[test]
    fn finished_ranges_match_a_set_of_offsets() {
        use rand::seq::SliceRandom;
        let mut rng = rand::rng();
        for _ in 0..50 {
            let mut offsets: Vec<u64> = (0..300).collect();
            offsets.shuffle(&mut rng);
            let (marked, _) = offsets.split_at(200);
            let mut f = Finished::default();
            let mut set = std::collections::BTreeSet::new();
            for o in marked {
                f.mark(*o);
                f.mark(*o); // twice: no change
                set.insert(*o);
            }
            for o in 0..320 {
                assert_eq!(f.is_done(o), set.contains(&o), "offset {o}");
            }
            assert_eq!(f.watermark, (0..).find(|o| !set.contains(o)).unwrap());
            assert_eq!(f.done_from(150), set.range(150.max(f.watermark)..).count() as u64);
            let ranges: Vec<_> = f.done.iter().collect();
            for w in ranges.windows(2) {
                assert!(w[0].1 < w[1].0, "ranges neither overlap nor touch: {ranges:?}");
            }
            assert!(ranges.first().is_none_or(|(s, _)| **s > f.watermark));
            f.counts.insert(1000, 3);
            let back = Finished::decode(&f.encode(), Path::new("checkpoint")).unwrap();
            assert_eq!(back, f);
        }
    }

    #[test]
    fn one_stuck_record_costs_one_range() {
        let mut f = Finished::default();
        for o in 1..1_000_000 {
            f.mark(o);
        }
        assert_eq!((f.watermark, f.done.len()), (0, 1));
        assert!(f.encode().len() < 64, "the checkpoint stays small");
        f.mark(0);
        assert_eq!((f.watermark, f.done.len()), (1_000_000, 0));
    }

    #[test]
    fn all_but_and_old_checkpoints() {
        let f = Finished::all_but(10, &[3, 7, 8, 12]);
        assert_eq!(f.watermark, 3);
        assert_eq!(f.done, BTreeMap::from([(4, 7), (9, 10)]));
        assert_eq!(Finished::all_but(10, &[]), Finished { watermark: 10, ..Finished::default() });
        // A CKPT1 checkpoint (one entry per offset) written by an earlier version still loads.
        let mut body = Vec::new();
        for w in [2u64, 3, 4, 5, 9] {
            body.extend_from_slice(&w.to_le_bytes());
        }
        let mut old = b"CKPT1".to_vec();
        old.extend_from_slice(&crc32c::crc32c(&body).to_le_bytes());
        old.extend_from_slice(&body);
        let f = Finished::decode(&old, Path::new("checkpoint")).unwrap();
        assert_eq!((f.watermark, f.done.clone()), (2, BTreeMap::from([(4, 6), (9, 10)])));
        let mut corrupt = f.encode();
        let last = corrupt.len() - 1;
        corrupt[last] ^= 1;
        assert!(Finished::decode(&corrupt, Path::new("checkpoint")).is_err());
    }

    pub(crate) fn tempdir() -> PathBuf {
        let d = std::env::temp_dir().join(format!("logtest-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }
}

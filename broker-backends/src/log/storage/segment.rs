//! Segment files: `<base offset, 20 digits>.log`, records appended back to back. Opening a partition
//! scans its last segment, the only one a crash can leave torn (a segment is fsynced before the next
//! one is created): bytes after the last valid record (a write that never completed) are truncated
//! with a warning; a bad record with a valid record anywhere after it is damage in the middle: it is
//! reported, and the records after it are kept ([`resync`] finds them). Closed segments are not read
//! at open, so opening costs at most one segment whatever the backlog; every record's CRC is checked
//! when it is read, and damage found then is skipped the same way (the partition reports it).

use std::fs::{File, OpenOptions};
use std::io::{BufReader, Read, Seek};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::disk;
use super::error::LogError;
use super::files::FileCache;
use super::record::{Record, FRAME_HEADER};

/// One segment file. It holds no descriptor: [`Segment::file`] opens it through the store's
/// bounded [`FileCache`] when it is read or written.
#[derive(Debug, Clone)]
pub(crate) struct Segment {
    /// Offset of its first record.
    pub(crate) base: u64,
    /// Its path.
    pub(crate) path: PathBuf,
    /// The store's open files.
    pub(crate) files: Arc<FileCache>,
}

impl Segment {
    /// The segment's file (opened now if the cache does not hold it; never created).
    pub(crate) fn file(&self) -> Result<Arc<File>, LogError> {
        self.files.open(&self.path, false)
    }
}

pub(crate) fn segment_path(dir: &Path, base: u64) -> PathBuf {
    dir.join(format!("{base:020}.log"))
}

/// Creates an empty segment (owner-only) and makes its directory entry durable.
pub(crate) fn create(dir: &Path, base: u64, files: &Arc<FileCache>) -> Result<Segment, LogError> {
    let path = segment_path(dir, base);
    files.open(&path, true)?;
    disk::sync_dir(dir)?;
    Ok(Segment { base, path, files: files.clone() })
}

/// What opening found: the segments, the next offset and the byte length of the last segment.
#[derive(Debug)]
pub(crate) struct Recovered {
    pub(crate) segments: Vec<Segment>,
    pub(crate) next_offset: u64,
    pub(crate) tail_len: u64,
}

/// Opens (creating) the segments of a partition directory, checking every record of the last one.
pub(crate) fn recover(dir: &Path, first_offset: u64, files: &Arc<FileCache>) -> Result<Recovered, LogError> {
    if !dir.exists() {
        disk::create_dir_all(dir)?;
        disk::sync_dir(dir.parent().unwrap_or(Path::new(".")))?;
    }
    let mut bases: Vec<u64> = std::fs::read_dir(dir)
        .map_err(|e| LogError::io(dir, e))?
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.strip_suffix(".log")).and_then(|n| n.parse().ok()))
        .collect();
    bases.sort_unstable();
    if bases.is_empty() {
        let seg = create(dir, first_offset, files)?;
        return Ok(Recovered { segments: vec![seg], next_offset: first_offset, tail_len: 0 });
    }
    let mut segments = Vec::with_capacity(bases.len());
    let mut expected = bases[0];
    let mut tail_len = 0;
    for (i, base) in bases.iter().enumerate() {
        let last = i + 1 == bases.len();
        let path = segment_path(dir, *base);
        if *base != expected {
            return Err(LogError::Corrupt {
                path: path.clone(),
                offset: expected,
                reason: format!("segment starts at offset {base}, expected {expected}"),
            });
        }
        if !last {
            // Closed and fsynced: it ends where the next one starts (not opened until read).
            expected = bases[i + 1];
            segments.push(Segment { base: *base, path, files: files.clone() });
            continue;
        }
        let file = OpenOptions::new().read(true).append(true).open(&path).map_err(|e| LogError::io(&path, e))?;
        let (next, valid_len) = scan(&file, &path, *base)?;
        let file_len = file.metadata().map_err(|e| LogError::io(&path, e))?.len();
        if valid_len < file_len {
            tracing::warn!(
                path = %path.display(), offset = next, dropped_bytes = file_len - valid_len,
                "log: torn tail truncated (bytes of a write that was never acknowledged)"
            );
            file.set_len(valid_len).map_err(|e| LogError::io(&path, e))?;
            disk::sync_all(&file, &path)?;
        }
        expected = next;
        tail_len = valid_len;
        drop(file);
        segments.push(Segment { base: *base, path, files: files.clone() });
    }
    Ok(Recovered { segments, next_offset: expected, tail_len })
}

/// Scans the last segment; returns the offset after its last good record and the byte length up to
/// the end of that record. A bad record with a valid record anywhere after it is damage in the
/// middle: it is reported, and the records after it are kept (they may have been acknowledged).
/// Only bytes with no valid record after them (a write that never completed) are left out.
fn scan(file: &File, path: &Path, base: u64) -> Result<(u64, u64), LogError> {
    let file_len = file.metadata().map_err(|e| LogError::io(path, e))?.len();
    let mut reader = BufReader::with_capacity(1 << 20, file.try_clone().map_err(|e| LogError::io(path, e))?);
    let mut pos = 0u64;
    let mut expected = base;
    let mut buf = Vec::new();
    loop {
        if pos == file_len {
            return Ok((expected, pos));
        }
        let mut head = [0u8; 4];
        let problem = match reader.read_exact(&mut head) {
            Err(_) => "truncated frame header".to_string(),
            Ok(()) => match Record::frame_len(&head) {
                Err(e) => e.to_string(),
                Ok(len) if pos + 4 + len as u64 > file_len => "truncated record".to_string(),
                Ok(len) => {
                    buf.resize(4 + len, 0);
                    buf[..4].copy_from_slice(&head);
                    reader.read_exact(&mut buf[4..]).map_err(|e| LogError::io(path, e))?;
                    match Record::decode(&buf) {
                        Ok((rec, used)) if rec.offset == expected => {
                            pos += used as u64;
                            expected += 1;
                            continue;
                        }
                        Ok((rec, _)) => format!("record has offset {}, expected {expected}", rec.offset),
                        Err(e) => e.to_string(),
                    }
                }
            },
        };
        match resync(file, path, pos, file_len, expected)? {
            Some((at, offset)) => {
                tracing::error!(
                    path = %path.display(), byte = pos, problem, lost_offsets = ?(expected..offset), resumes_at = at,
                    "log: corrupt records in the middle of a segment; they are skipped, the records after them kept"
                );
                pos = at;
                expected = offset;
                reader.seek(std::io::SeekFrom::Start(at)).map_err(|e| LogError::io(path, e))?;
            }
            None => {
                tracing::debug!(problem, pos, "log: bad tail record");
                return Ok((expected, pos));
            }
        }
    }
}

/// The smallest framed record: header, offset, two times, header count, key length.
const MIN_FRAME: u64 = (FRAME_HEADER + 8 * 3 + 2 + 4) as u64;

/// Bytes of candidate frames one [`resync`] may CRC-check before it gives up (an error, never a
/// truncation): damage made of many frame-like bytes cannot make it quadratic.
const RESYNC_BUDGET: u64 = 1 << 30;

/// The first valid record after byte `from` (and before `end`) whose offset is at least
/// `min_offset`: its byte position and offset; None when there is none (a torn tail). A candidate
/// must be a CRC-checked frame whose offset fits, followed by the end or by a valid frame with the
/// next offset, so a frame-like run of bytes inside a payload is not taken for the log.
pub(crate) fn resync(
    file: &File,
    path: &Path,
    from: u64,
    end: u64,
    min_offset: u64,
) -> Result<Option<(u64, u64)>, LogError> {
    const WINDOW: u64 = 1 << 20;
    let mut budget = RESYNC_BUDGET;
    let frame_at = |pos: u64, budget: &mut u64| -> Result<Option<(u64, u64)>, LogError> {
        let mut head = [0u8; 4];
        if pos + 4 > end || file.read_exact_at(&mut head, pos).is_err() {
            return Ok(None);
        }
        let Ok(len) = Record::frame_len(&head) else { return Ok(None) };
        if pos + 4 + len as u64 > end {
            return Ok(None);
        }
        *budget = budget.checked_sub(4 + len as u64).ok_or_else(|| LogError::Corrupt {
            path: path.to_owned(),
            offset: min_offset,
            reason: format!("no valid record found after byte {from} within the search budget"),
        })?;
        let mut frame = vec![0u8; 4 + len];
        file.read_exact_at(&mut frame, pos).map_err(|e| LogError::io(path, e))?;
        Ok(Record::decode(&frame).ok().map(|(r, used)| (r.offset, pos + used as u64)))
    };
    // The bytes left bound how many records can follow, and so which offsets are plausible.
    // Every record takes at least a frame header and the fixed fields.
    let max_offset = min_offset.saturating_add(end.saturating_sub(from) / MIN_FRAME);
    let (mut window, mut window_at) = (Vec::new(), 0u64);
    let mut pos = from + 1;
    while pos + 16 <= end {
        if pos < window_at || pos + 16 > window_at + window.len() as u64 {
            window.resize(WINDOW.min(end - pos) as usize, 0);
            file.read_exact_at(&mut window, pos).map_err(|e| LogError::io(path, e))?;
            window_at = pos;
        }
        let at = (pos - window_at) as usize;
        let head = [window[at], window[at + 1], window[at + 2], window[at + 3]];
        let offset = u64::from_le_bytes(window[at + 8..at + 16].try_into().unwrap_or_default());
        if Record::frame_len(&head).is_ok() && (min_offset..=max_offset).contains(&offset) {
            if let Some((found, next)) = frame_at(pos, &mut budget)? {
                let chained = next == end || frame_at(next, &mut budget)?.is_some_and(|(o, _)| o == found + 1);
                if found == offset && chained {
                    return Ok(Some((pos, offset)));
                }
            }
        }
        pos += 1;
    }
    Ok(None)
}

/// Bytes a sequential reader reads ahead.
const READ_AHEAD: usize = 64 << 10;

/// A window of a segment read ahead of a sequential reader (a queue's cursor, a stream member), so
/// reading record after record costs one `pread` per window instead of two per record.
#[derive(Debug)]
pub(crate) struct ReadAhead {
    seg: u64,
    start: u64,
    buf: Vec<u8>,
    window: usize,
}

impl Default for ReadAhead {
    fn default() -> Self {
        ReadAhead { seg: 0, start: 0, buf: Vec::new(), window: READ_AHEAD }
    }
}

impl ReadAhead {
    /// Frees the window (a reader that reached the end: an idle queue keeps no buffer).
    pub(crate) fn release(&mut self) {
        self.buf = Vec::new();
        self.start = 0;
    }

    /// For one random read: reads just the record.
    pub(crate) fn exact() -> ReadAhead {
        ReadAhead { window: 0, ..ReadAhead::default() }
    }

    /// `need` bytes of `seg` at `pos`, reading a new window (never past `limit`) when they are not
    /// all in this one.
    fn bytes(&mut self, seg: &Segment, pos: u64, need: usize, limit: Option<u64>) -> Result<&[u8], LogError> {
        let end = self.start + self.buf.len() as u64;
        if self.seg != seg.base || pos < self.start || pos + need as u64 > end {
            self.seg = seg.base;
            self.start = pos;
            let room = limit.map_or(usize::MAX, |l| l.saturating_sub(pos).try_into().unwrap_or(usize::MAX));
            self.buf.resize(need.max(self.window.min(room)), 0);
            let mut filled = 0;
            let file = seg.file()?;
            while filled < self.buf.len() {
                match file.read_at(&mut self.buf[filled..], pos + filled as u64) {
                    Ok(0) => break,
                    Ok(n) => filled += n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(LogError::io(&seg.path, e)),
                }
            }
            self.buf.truncate(filled);
            if filled < need {
                let eof = std::io::Error::new(std::io::ErrorKind::UnexpectedEof, format!("short read at byte {pos}"));
                return Err(LogError::io(&seg.path, eof));
            }
        }
        let at = (pos - self.start) as usize;
        Ok(&self.buf[at..at + need])
    }
}

/// Bytes of each window of [`ReadWindows`].
const JUMP_WINDOW: usize = 32 << 10;

/// A few read windows for a reader that jumps between places of a log (a fair queue serving its
/// keys in turn, records it read ahead and did not keep): a read uses the window that holds its
/// position, else the least recently used one, loaded there. At most [`ReadWindows::MAX`]
/// windows of [`JUMP_WINDOW`] bytes (512 KiB), allocated as reads need them (a window a large
/// record grew is freed after that read: [`ReadWindows::trim`]).
#[derive(Debug, Default)]
pub(crate) struct ReadWindows {
    /// Each window and the read count when it was last used.
    windows: Vec<(ReadAhead, u64)>,
    reads: u64,
}

impl ReadWindows {
    /// The most windows kept.
    pub(crate) const MAX: usize = 16;

    /// The window to read byte `pos` of segment `seg` through.
    pub(crate) fn at(&mut self, seg: u64, pos: u64) -> &mut ReadAhead {
        self.reads += 1;
        let holds = |w: &ReadAhead| w.seg == seg && w.start <= pos && pos < w.start + w.buf.len() as u64;
        let i = match self.windows.iter().position(|(w, _)| holds(w)) {
            Some(i) => i,
            None if self.windows.len() < Self::MAX => {
                self.windows.push((ReadAhead { window: JUMP_WINDOW, ..ReadAhead::default() }, 0));
                self.windows.len() - 1
            }
            None => self.windows.iter().enumerate().min_by_key(|(_, (_, used))| *used).map_or(0, |(i, _)| i),
        };
        self.windows[i].1 = self.reads;
        &mut self.windows[i].0
    }

    /// Frees every window.
    pub(crate) fn release(&mut self) {
        self.windows = Vec::new();
    }

    /// Frees the windows a large record grew past twice their size (a window holds a whole
    /// record, up to `max_record_bytes`): such a record is read once, and 16 windows of it
    /// would otherwise stay allocated.
    pub(crate) fn trim(&mut self) {
        self.windows.retain(|(w, _)| w.buf.capacity() <= 2 * JUMP_WINDOW);
    }

    /// True when no window is held.
    #[cfg(test)]
    pub(crate) fn windows_is_empty(&self) -> bool {
        self.windows.is_empty()
    }
}

/// Reads the record at byte `pos` of `seg` through `ahead` (reading ahead no further than `limit`);
/// returns it and the position after it.
pub(crate) fn read_at(
    seg: &Segment,
    pos: u64,
    ahead: &mut ReadAhead,
    limit: Option<u64>,
) -> Result<(Record, u64), LogError> {
    let head = ahead.bytes(seg, pos, 4, limit)?;
    let len = Record::frame_len(&[head[0], head[1], head[2], head[3]]).map_err(|e| LogError::Corrupt {
        path: seg.path.clone(),
        offset: 0,
        reason: format!("{e} at byte {pos}"),
    })?;
    let buf = ahead.bytes(seg, pos, 4 + len, limit)?;
    let (rec, used) = Record::decode(buf).map_err(|e| LogError::Corrupt {
        path: seg.path.clone(),
        offset: 0,
        reason: format!("{e} at byte {pos}"),
    })?;
    debug_assert!(used >= FRAME_HEADER);
    Ok((rec, pos + used as u64))
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    fn write_records(dir: &Path, n: u64) -> PathBuf {
        std::fs::create_dir_all(dir).unwrap();
        let path = segment_path(dir, 0);
        let mut buf = Vec::new();
        for i in 0..n {
            Record { offset: i, payload: format!("payload-{i}").into_bytes(), ..Record::default() }
                .encode_into(&mut buf);
        }
        std::fs::File::create(&path).unwrap().write_all(&buf).unwrap();
        path
    }

    #[test]
    fn read_ahead_serves_records_in_order_and_sees_appends() {
        let dir = tmp();
        let path = write_records(&dir, 50);
        let seg = Segment { base: 0, path: path.clone(), files: FileCache::new(4) };
        let published = std::fs::metadata(&path).unwrap().len();
        let mut ahead = ReadAhead::default();
        let mut pos = 0;
        for i in 0..50 {
            let (rec, next) = read_at(&seg, pos, &mut ahead, Some(published)).unwrap();
            assert_eq!((rec.offset, rec.payload), (i, format!("payload-{i}").into_bytes()));
            pos = next;
        }
        // Appended after the window was read: a later read fetches a new window.
        let mut more = Vec::new();
        Record { offset: 50, payload: b"late".to_vec(), ..Record::default() }.encode_into(&mut more);
        std::fs::OpenOptions::new().append(true).open(&path).unwrap().write_all(&more).unwrap();
        let (rec, _) = read_at(&seg, pos, &mut ahead, None).unwrap();
        assert_eq!((rec.offset, rec.payload), (50, b"late".to_vec()));
        let (rec, _) = read_at(&seg, 0, &mut ReadAhead::exact(), None).unwrap();
        assert_eq!(rec.offset, 0, "a random read goes back");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn read_windows_serve_jumps_from_memory_and_stay_bounded() {
        let dir = tmp();
        let path = write_records(&dir, 20_000);
        let published = std::fs::metadata(&path).unwrap().len();
        assert!(published > (ReadWindows::MAX * JUMP_WINDOW) as u64, "the file is larger than the windows");
        let seg = Segment { base: 0, path: path.clone(), files: FileCache::new(4) };
        let mut positions = Vec::new();
        let mut pos = 0;
        for _ in 0..20_000 {
            positions.push(pos);
            pos = read_at(&seg, pos, &mut ReadAhead::exact(), None).unwrap().1;
        }
        // Two places taking turns (a fair queue's two keys): each read is right, and a window
        // holds each place.
        let mut w = ReadWindows::default();
        for i in 0..500 {
            for at in [i, 15_000 + i] {
                let (rec, _) = read_at(&seg, positions[at], w.at(0, positions[at]), Some(published)).unwrap();
                assert_eq!((rec.offset, rec.payload), (at as u64, format!("payload-{at}").into_bytes()));
            }
        }
        assert_eq!(w.windows.len(), 2, "one window per place");
        // Jumps all over: never more than MAX windows, every read still right.
        for k in 0..2_000 {
            let at = (k * 7_919) % 20_000;
            let (rec, _) = read_at(&seg, positions[at], w.at(0, positions[at]), Some(published)).unwrap();
            assert_eq!(rec.offset, at as u64);
        }
        assert_eq!(w.windows.len(), ReadWindows::MAX);
        w.trim();
        assert_eq!(w.windows.len(), ReadWindows::MAX, "windows of their own size stay");
        w.windows[0].0.buf.reserve(4 * JUMP_WINDOW);
        w.trim();
        assert_eq!(w.windows.len(), ReadWindows::MAX - 1, "a window grown by a large record is freed");
        // A window never reads past the limit it was given: a record written after it comes from disk.
        let mut w = ReadWindows::default();
        let last = positions[19_999];
        read_at(&seg, positions[19_990], w.at(0, positions[19_990]), Some(last)).unwrap();
        let (rec, _) = read_at(&seg, last, w.at(0, last), Some(published)).unwrap();
        assert_eq!(rec.offset, 19_999);
        w.release();
        assert!(w.windows.is_empty());
        std::fs::remove_dir_all(dir).unwrap();
    }

    fn tmp() -> PathBuf {
        std::env::temp_dir().join(format!("segtest-{}", uuid::Uuid::new_v4().simple()))
    }

    #[test]
    fn a_torn_tail_is_truncated() {
        let dir = tmp();
        let path = write_records(&dir, 10);
        let len = std::fs::metadata(&path).unwrap().len();
        std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(len - 5).unwrap();
        let r = recover(&dir, 0, &FileCache::new(4)).unwrap();
        assert_eq!(r.next_offset, 9, "the torn 10th record is gone");
        assert!(std::fs::metadata(&path).unwrap().len() < len - 5);
        std::fs::remove_dir_all(dir).ok();
    }

    #[test]
    fn a_bit_flip_in_the_last_record_is_truncated() {
        let dir = tmp();
        let path = write_records(&dir, 10);
        let mut data = std::fs::read(&path).unwrap();
        let n = data.len();
        data[n - 2] ^= 0x40;
        std::fs::write(&path, &data).unwrap();
        assert_eq!(recover(&dir, 0, &FileCache::new(4)).unwrap().next_offset, 9);
        std::fs::remove_dir_all(dir).ok();
    }

    #[test]
    fn a_closed_segment_is_not_read_at_open_and_its_corruption_is_caught_when_read() {
        let dir = tmp();
        let first = write_records(&dir, 10);
        let mut second = Vec::new();
        for i in 10..12 {
            Record { offset: i, payload: b"x".to_vec(), ..Record::default() }.encode_into(&mut second);
        }
        std::fs::write(segment_path(&dir, 10), &second).unwrap();
        let mut data = std::fs::read(&first).unwrap();
        data[60] ^= 0x01;
        std::fs::write(&first, &data).unwrap();
        let r = recover(&dir, 0, &FileCache::new(4)).unwrap();
        assert_eq!((r.segments.len(), r.next_offset), (2, 12));
        let mut pos = 0;
        let mut ahead = ReadAhead::default();
        let err = loop {
            match read_at(&r.segments[0], pos, &mut ahead, None) {
                Ok((_, next)) => pos = next,
                Err(e) => break e,
            }
        };
        assert!(matches!(err, LogError::Corrupt { .. }), "{err}");
        std::fs::remove_dir_all(dir).ok();
    }

    #[test]
    fn damage_in_the_middle_keeps_every_record_after_it() {
        for damage in ["bit flip", "impossible length", "zeroed"] {
            let dir = tmp();
            let path = write_records(&dir, 10);
            let mut data = std::fs::read(&path).unwrap();
            let len = data.len();
            match damage {
                "bit flip" => data[60] ^= 0x01,
                // The length word of the second record says 3 GiB (what an oversized record looked
                // like): recovery used to truncate there, losing every record after it.
                "impossible length" => {
                    let second = Record::decode(&data).unwrap().1;
                    data[second..second + 4].copy_from_slice(&u32::MAX.to_le_bytes());
                }
                _ => data[40..120].fill(0),
            }
            std::fs::write(&path, &data).unwrap();
            let r = recover(&dir, 0, &FileCache::new(4)).unwrap();
            assert_eq!((r.next_offset, r.tail_len), (10, len as u64), "{damage}: nothing after the damage is lost");
            assert_eq!(std::fs::metadata(&path).unwrap().len(), len as u64, "{damage}");
            // Reading resumes after the damage with the next valid record.
            let (at, offset) = resync(&r.segments[0].file().unwrap(), &path, 30, len as u64, 1).unwrap().unwrap();
            let (rec, _) = read_at(&r.segments[0], at, &mut ReadAhead::exact(), None).unwrap();
            assert_eq!(rec.offset, offset, "{damage}");
            assert!((1..4).contains(&offset), "{damage}: resumed at offset {offset}");
            std::fs::remove_dir_all(dir).ok();
        }
    }
}

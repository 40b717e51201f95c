//! The durable finished set of a partition: which offsets are done (acked, purged,
//! dead-lettered), as a watermark plus ranges above it, and the delivery counts of redelivered
//! records. It lives in `checkpoint` (replaced atomically now and then) plus the store's acks
//! journal (what was finished since, `journal.rs`); [`Finished::load`] reads both at open (and an
//! `acks.log` an older version left), and the partition's writer (`writer.rs`) writes both.
//!
//! `checkpoint`: `"CKPT3" crc:u32 watermark:u64 count:u64 (start:u64 end:u64)* counts:u64
//! (offset:u64 deliveries:u64)*` (older `CKPT2` without counts and `CKPT1` with one entry per
//! offset are still read). `acks.log`: frames `len:u32 crc:u32 body`, body = `offset:u64*` (acks)
//! or, with [`COUNTS_FRAME`] set in `len`, `(offset:u64 deliveries:u32)*`.

use std::collections::BTreeMap;
use std::path::Path;

use super::journal::Entry;
use crate::log::storage::error::LogError;

/// Marks a journal (or `acks.log`) frame of delivery counts (`offset:u64 count:u32` each) in its length word.
pub(super) const COUNTS_FRAME: u32 = 1 << 31;

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
    pub(super) fn mark(&mut self, offset: u64) {
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

    pub(super) fn is_done(&self, offset: u64) -> bool {
        offset < self.watermark || self.done.range(..=offset).next_back().is_some_and(|(_, end)| *end > offset)
    }

    /// How many offsets at or after `from` are done.
    pub(super) fn done_from(&self, from: u64) -> u64 {
        self.done.iter().map(|(s, e)| e.saturating_sub((*s).max(from))).sum()
    }

    /// Everything below `end` is done except the `unfinished` offsets.
    pub(super) fn all_but(end: u64, unfinished: &[u64]) -> Finished {
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

    pub(super) fn encode(&self) -> Vec<u8> {
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
    pub(super) fn decode(data: &[u8], path: &Path) -> Result<Finished, LogError> {
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

    /// Loads `checkpoint`, then replays `acks.log` (left by an older version; a torn last frame is
    /// ignored: those acks were not durable, and their records are delivered again), then this
    /// partition's entries of the store's acks journal (`journal.rs`), in the order they were
    /// written. Also says whether an `acks.log` was there (the next checkpoint deletes it).
    pub(super) fn load(dir: &Path, journaled: &[Entry]) -> Result<(Finished, bool), LogError> {
        let path = dir.join("checkpoint");
        let mut f = match std::fs::read(&path) {
            Ok(data) => Finished::decode(&data, &path)?,
            Err(_) => Finished::default(),
        };
        let acks_path = dir.join("acks.log");
        let legacy = match std::fs::read(&acks_path) {
            Ok(data) => {
                f.replay_acks_log(&data, &acks_path);
                true
            }
            Err(_) => false,
        };
        for entry in journaled {
            f.apply(entry);
        }
        Ok((f, legacy))
    }

    /// Applies one journal entry (acks, or delivery counts of records not finished).
    pub(super) fn apply(&mut self, entry: &Entry) {
        match entry {
            Entry::Acks(offsets) => offsets.iter().for_each(|o| self.mark(*o)),
            Entry::Counts(counts) => {
                for (offset, n) in counts {
                    if !self.is_done(*offset) {
                        self.counts.insert(*offset, *n);
                    }
                }
            }
        }
    }

    /// Replays the frames of an `acks.log` (the format before the store's journal).
    fn replay_acks_log(&mut self, data: &[u8], path: &Path) {
        let mut pos = 0;
        while pos < data.len() {
            let Some((entry, used)) =
                read_frame(&data[pos..]).and_then(|(counts, body, used)| Some((entry(counts, body)?, used)))
            else {
                tracing::warn!(path = %path.display(), pos, "log: torn acks frame ignored");
                break;
            };
            self.apply(&entry);
            pos += used;
        }
    }
}

/// The frame at the start of `data` (see [`acks_frame`]): whether it holds delivery counts, its
/// body and its length; `None` when it is cut short or fails its CRC.
pub(super) fn read_frame(data: &[u8]) -> Option<(bool, &[u8], usize)> {
    let word = u32::from_le_bytes(data.get(..4)?.try_into().ok()?);
    let crc = u32::from_le_bytes(data.get(4..8)?.try_into().ok()?);
    let (counts, len) = (word & COUNTS_FRAME != 0, (word & !COUNTS_FRAME) as usize);
    let body = data.get(8..8 + len)?;
    (crc32c::crc32c(body) == crc).then_some((counts, body, 8 + len))
}

/// The entries of a frame's body: offsets, or (with `counts`) offsets and delivery counts; `None`
/// when the length does not divide.
pub(super) fn entry(counts: bool, body: &[u8]) -> Option<Entry> {
    let word = |c: &[u8]| u64::from_le_bytes(c[..8].try_into().unwrap_or([0; 8]));
    if counts {
        body.len().is_multiple_of(12).then(|| {
            Entry::Counts(
                body.chunks_exact(12)
                    .map(|c| (word(c), u32::from_le_bytes(c[8..].try_into().unwrap_or([0; 4]))))
                    .collect(),
            )
        })
    } else {
        body.len().is_multiple_of(8).then(|| Entry::Acks(body.chunks_exact(8).map(word).collect()))
    }
}

/// One frame of the acks journal (or of an old `acks.log`): `len:u32 crc:u32 body`, `flags` (0, or
/// [`COUNTS_FRAME`]) marking its kind in the length word.
pub(super) fn acks_frame(flags: u32, body: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(body.len() + 8);
    frame.extend_from_slice(&(body.len() as u32 | flags).to_le_bytes());
    frame.extend_from_slice(&crc32c::crc32c(body).to_le_bytes());
    frame.extend_from_slice(body);
    frame
}

#[cfg(test)]
mod tests {
    use super::*;

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
}

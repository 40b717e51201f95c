//! Reading a queue without taking from it ([`Broker::peek`](celery_core::Broker::peek)): the
//! oldest unfinished records of each partition, read from its finished watermark on, skipping the
//! ones finished out of order. Nothing is leased, counted or moved: the queue's cursor, its ready
//! list and its delivery counts are left alone, and only the finished set is consulted. A record
//! leased by a consumer right now is unfinished, so it is shown too; a delayed one as well.
//!
//! Partitions are read one after the other and the records merged by append time, oldest first.
//! What one look returns is bounded: at most [`MAX_PEEK`] records and about [`PEEK_BYTES`] of
//! payload (always at least one record). Over the socket protocol this is the `PEEK` request
//! (`DESIGN.md`): queue and max in, the payloads out.

use super::error::LogError;
use super::partition::Partition;
use super::segment::ReadAhead;
use super::topic::Topic;

/// Records one look returns at most, whatever the caller asks for.
pub(crate) const MAX_PEEK: usize = 1000;
/// Payload bytes one look returns at most (beyond the first record).
pub(crate) const PEEK_BYTES: usize = 16 << 20;

/// A record found unfinished: (append time, partition, offset, payload).
type Found = (i64, usize, u64, Vec<u8>);

/// The unfinished records of `part` from its watermark on, at most `max`, stopping once `budget`
/// payload bytes are gathered.
fn unfinished(part: &Partition, index: usize, max: usize, budget: usize) -> Result<Vec<Found>, LogError> {
    let mut out = Vec::new();
    let mut offset = part.watermark().max(part.first_offset());
    let mut pos = part.log.seek(offset)?;
    let mut ahead = ReadAhead::default();
    let mut bytes = 0;
    while out.len() < max && bytes < budget {
        let Some((rec, _)) = part.log.read(&mut pos, offset, &mut ahead)? else { break };
        if !part.is_finished(offset) {
            bytes += rec.payload.len();
            out.push((rec.timestamp_ms, index, offset, rec.payload));
        }
        offset += 1;
    }
    Ok(out)
}

/// The payloads of the oldest unfinished records of `topic`, oldest first, at most `max` (and
/// [`MAX_PEEK`]) and about [`PEEK_BYTES`].
pub(crate) fn payloads(topic: &Topic, max: usize) -> Result<Vec<Vec<u8>>, LogError> {
    let max = max.min(MAX_PEEK);
    if max == 0 {
        return Ok(Vec::new());
    }
    let mut all = Vec::new();
    for (i, p) in topic.partitions.iter().enumerate() {
        all.extend(unfinished(p, i, max, PEEK_BYTES)?);
    }
    all.sort_by_key(|(ts, part, offset, _)| (*ts, *part, *offset));
    let mut bytes = 0;
    let mut out = Vec::new();
    for (_, _, _, payload) in all.into_iter().take(max) {
        if !out.is_empty() && bytes + payload.len() > PEEK_BYTES {
            break;
        }
        bytes += payload.len();
        out.push(payload);
    }
    Ok(out)
}

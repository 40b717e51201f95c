//! The record frame: `len u32 | crc32c u32 | body`, little-endian, where body is
//! `offset u64 | timestamp_ms i64 | not_before_ms i64 | header_count u16 | (klen u16, key, vlen u32,
//! value)* | key_len u32 | key | payload`. The CRC covers the body; `len` counts crc + body.

use std::fmt;

use super::error::LogError;

/// Frames larger than this are refused before anything is allocated.
pub(crate) const MAX_RECORD: usize = 64 * 1024 * 1024;
/// Bytes before the body: `len` and `crc`.
pub(crate) const FRAME_HEADER: usize = 8;

/// One record of a partition.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Record {
    /// Its offset in the partition.
    pub offset: u64,
    /// When it was appended (ms since the epoch).
    pub timestamp_ms: i64,
    /// Not deliverable before this time (ms since the epoch); 0 means now.
    pub not_before_ms: i64,
    /// Record headers.
    pub headers: Vec<(String, Vec<u8>)>,
    /// Partitioning key (empty: none).
    pub key: Vec<u8>,
    /// The payload.
    pub payload: Vec<u8>,
}

impl fmt::Debug for Record {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Record")
            .field("offset", &self.offset)
            .field("timestamp_ms", &self.timestamp_ms)
            .field("not_before_ms", &self.not_before_ms)
            .field("payload_len", &self.payload.len())
            .finish()
    }
}

/// The framed size of a record with these headers, key and payload (what size limits count).
pub(crate) fn framed_len(headers: &[(String, Vec<u8>)], key: usize, payload: usize) -> usize {
    FRAME_HEADER + 8 * 3 + 2 + headers.iter().map(|(k, v)| 2 + k.len() + 4 + v.len()).sum::<usize>() + 4 + key + payload
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
        framed_len(&self.headers, self.key.len(), self.payload.len())
    }
}

/// Refuses `size` bytes over `limit` (the store's `max_record_bytes`, or the on-disk frame limit).
pub(crate) fn check_size(what: &'static str, size: usize, limit: usize) -> Result<(), LogError> {
    if size > limit {
        return Err(LogError::TooLarge { what, size, limit, option: "max_record_bytes" });
    }
    Ok(())
}

/// Now, in ms since the epoch (record times, expiries).
pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// Why bytes are not a record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum RecordError {
    /// Fewer bytes than the frame says.
    #[error("truncated record")]
    Truncated,
    /// The checksum does not match.
    #[error("checksum mismatch")]
    Checksum,
    /// The frame's length is impossible.
    #[error("invalid record length {0}")]
    Length(usize),
    /// The body does not parse.
    #[error("malformed record body")]
    Malformed,
}

impl Record {
    /// Appends the framed record to `out`.
    pub(crate) fn encode_into(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&[0u8; FRAME_HEADER]);
        out.extend_from_slice(&self.offset.to_le_bytes());
        out.extend_from_slice(&self.timestamp_ms.to_le_bytes());
        out.extend_from_slice(&self.not_before_ms.to_le_bytes());
        out.extend_from_slice(&(self.headers.len().min(u16::MAX as usize) as u16).to_le_bytes());
        for (k, v) in self.headers.iter().take(u16::MAX as usize) {
            let k = &k.as_bytes()[..k.len().min(u16::MAX as usize)];
            out.extend_from_slice(&(k.len() as u16).to_le_bytes());
            out.extend_from_slice(k);
            out.extend_from_slice(&(v.len() as u32).to_le_bytes());
            out.extend_from_slice(v);
        }
        out.extend_from_slice(&(self.key.len() as u32).to_le_bytes());
        out.extend_from_slice(&self.key);
        out.extend_from_slice(&self.payload);
        let body_len = out.len() - start - FRAME_HEADER;
        let crc = crc32c::crc32c(&out[start + FRAME_HEADER..]);
        out[start..start + 4].copy_from_slice(&((body_len + 4) as u32).to_le_bytes());
        out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
    }

    /// The framed size of this record.
    #[cfg(test)]
    fn encoded_len(&self) -> usize {
        framed_len(&self.headers, self.key.len(), self.payload.len())
    }

    /// The frame length (crc + body) declared by the first 4 bytes, checked against the limit.
    pub(crate) fn frame_len(head: &[u8; 4]) -> Result<usize, RecordError> {
        let len = u32::from_le_bytes(*head) as usize;
        if !(4 + 8 * 3 + 2 + 4..=MAX_RECORD).contains(&len) {
            return Err(RecordError::Length(len));
        }
        Ok(len)
    }

    /// Decodes one framed record from the start of `buf`; returns it and the bytes it used.
    pub(crate) fn decode(buf: &[u8]) -> Result<(Record, usize), RecordError> {
        if buf.len() < 4 {
            return Err(RecordError::Truncated);
        }
        let len = Record::frame_len(&[buf[0], buf[1], buf[2], buf[3]])?;
        if buf.len() < 4 + len {
            return Err(RecordError::Truncated);
        }
        let crc = u32::from_le_bytes([buf[4], buf[5], buf[6], buf[7]]);
        let body = &buf[FRAME_HEADER..4 + len];
        if crc32c::crc32c(body) != crc {
            return Err(RecordError::Checksum);
        }
        Ok((Record::decode_body(body)?, 4 + len))
    }

    fn decode_body(b: &[u8]) -> Result<Record, RecordError> {
        let mut r = Reader { b, pos: 0 };
        let offset = r.u64()?;
        let timestamp_ms = r.u64()? as i64;
        let not_before_ms = r.u64()? as i64;
        let n = r.u16()? as usize;
        let mut headers = Vec::with_capacity(n.min(64));
        for _ in 0..n {
            let kl = r.u16()? as usize;
            let k = String::from_utf8(r.take(kl)?.to_vec()).map_err(|_| RecordError::Malformed)?;
            let vl = r.u32()? as usize;
            headers.push((k, r.take(vl)?.to_vec()));
        }
        let kl = r.u32()? as usize;
        let key = r.take(kl)?.to_vec();
        let payload = b[r.pos..].to_vec();
        Ok(Record { offset, timestamp_ms, not_before_ms, headers, key, payload })
    }
}

struct Reader<'a> {
    b: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], RecordError> {
        let end = self.pos.checked_add(n).ok_or(RecordError::Malformed)?;
        let s = self.b.get(self.pos..end).ok_or(RecordError::Malformed)?;
        self.pos = end;
        Ok(s)
    }
    fn u16(&mut self) -> Result<u16, RecordError> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().map_err(|_| RecordError::Malformed)?))
    }
    fn u32(&mut self) -> Result<u32, RecordError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().map_err(|_| RecordError::Malformed)?))
    }
    fn u64(&mut self) -> Result<u64, RecordError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().map_err(|_| RecordError::Malformed)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Record {
        Record {
            offset: 42,
            timestamp_ms: 1_700_000_000_000,
            not_before_ms: 5,
            headers: vec![("x-reason".into(), b"why".to_vec())],
            key: b"k".to_vec(),
            payload: b"hello".to_vec(),
        }
    }

    #[test]
    fn roundtrip_and_length() {
        let r = sample();
        let mut buf = Vec::new();
        r.encode_into(&mut buf);
        assert_eq!(buf.len(), r.encoded_len());
        let (back, used) = Record::decode(&buf).unwrap();
        assert_eq!((back, used), (r, buf.len()));
    }

    #[test]
    fn every_flipped_bit_and_every_cut_is_detected() {
        let mut buf = Vec::new();
        sample().encode_into(&mut buf);
        for i in 0..buf.len() * 8 {
            let mut b = buf.clone();
            b[i / 8] ^= 1 << (i % 8);
            assert!(Record::decode(&b).is_err() || Record::decode(&b).unwrap().0 != sample(), "bit {i}");
        }
        for cut in 0..buf.len() {
            assert!(Record::decode(&buf[..cut]).is_err(), "cut at {cut}");
        }
    }
}

//! The socket protocol of `log+tcp://` and of the directory's unix socket.
//!
//! A frame is `len u32 | version u8 | kind u8 | id u64 | body`, little-endian, `len` counting what
//! follows it, at most [`MAX_FRAME`] (checked before allocating; [`MAX_HELLO_FRAME`] on a server
//! connection until its `HELLO`). Requests carry a client-chosen id;
//! the response to a request carries the same id (`OK` or `ERR` with a message), so requests are
//! pipelined. Deliveries to a consumer are pushed as `DELIVERY` frames whose id is the consumer id.

use std::io;

use celery_core::BrokerError;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

use crate::log::storage::{LogError, Record, StreamRecord};

/// The protocol version byte (2: acks are `ACK` frames, unanswered).
pub(crate) const VERSION: u8 = 2;
/// The read buffer of a connection: many frames come in with one read.
pub(crate) const READ_BUFFER: usize = 64 << 10;
/// The most records one `PUBLISH` carries (a client sends more in several): decoding a frame
/// never makes more than this many records, whatever its size.
pub(crate) const MAX_PUBLISH_RECORDS: usize = 100_000;
/// The largest frame accepted.
pub(crate) const MAX_FRAME: usize = 256 << 20;
/// The largest frame a server accepts before `HELLO` (which carries only a token): an
/// unauthenticated client makes it allocate no more than this.
pub(crate) const MAX_HELLO_FRAME: usize = 4 << 10;

/// The `ERR` answer to a request that arrived on a connection the server is closing (for
/// idleness): it was not handled, so the client sends it again on a new connection.
pub(crate) const NOT_HANDLED: &str = "not handled: the server is closing this connection";

/// The start of the `ERR` answer to a result document the store refused for its size (the
/// document's fault, not the server's; an older server sends the text alone, read as an operation
/// error as before).
const REFUSED: &str = "refused: ";

/// The `ERR` text of a failed result put: marked [`REFUSED`] when the store refused the document
/// for its size.
pub(crate) fn result_put_error(e: &LogError) -> String {
    match e {
        LogError::TooLarge { .. } => format!("{REFUSED}{e}"),
        e => e.to_string(),
    }
}

/// A failed result put as the client reports it: a document the server refused for its size is a
/// protocol error (as the store in this process reports it: `Results::put`), anything else as is.
pub(crate) fn result_put_failed(e: BrokerError) -> BrokerError {
    match e {
        BrokerError::Operation { context, .. } if context.starts_with(REFUSED) => {
            crate::log::results::result_refused(context[REFUSED.len()..].to_owned())
        }
        e => e,
    }
}

/// Frame kinds.
pub(crate) mod kind {
    pub(crate) const HELLO: u8 = 1;
    pub(crate) const PUBLISH: u8 = 2;
    pub(crate) const CONSUME: u8 = 3;
    pub(crate) const SETTLE: u8 = 4;
    pub(crate) const PURGE: u8 = 5;
    pub(crate) const QUEUE_LEN: u8 = 6;
    pub(crate) const DELAYED_LEN: u8 = 7;
    pub(crate) const RESULT_PUT: u8 = 8;
    pub(crate) const RESULT_GET: u8 = 9;
    pub(crate) const RESULT_WAIT: u8 = 10;
    pub(crate) const RESULT_FORGET: u8 = 11;
    pub(crate) const STOP_CONSUME: u8 = 12;
    pub(crate) const DECLARE: u8 = 13;
    pub(crate) const BIND: u8 = 14;
    pub(crate) const ROUTE: u8 = 15;
    pub(crate) const LEASE: u8 = 16;
    pub(crate) const CHORD: u8 = 17;
    pub(crate) const BROADCAST: u8 = 18;
    pub(crate) const SUBSCRIBE: u8 = 19;
    pub(crate) const STREAM_JOIN: u8 = 20;
    pub(crate) const STREAM_POLL: u8 = 21;
    pub(crate) const STREAM_COMMIT: u8 = 22;
    pub(crate) const STREAM_ASSIGNMENT: u8 = 23;
    pub(crate) const STREAM_LEAVE: u8 = 24;
    /// Acks, the one request without an answer.
    pub(crate) const ACK: u8 = 25;
    /// Reads a queue's oldest unfinished records without taking them (`storage/peek.rs`).
    pub(crate) const PEEK: u8 = 26;
    /// Per-key concurrency slots (`storage/flow.rs`): op, key, ...
    pub(crate) const FLOW: u8 = 27;
    /// The monitor's task history (`storage/results.rs`): op, then the op's body.
    pub(crate) const HISTORY: u8 = 28;
    pub(crate) const OK: u8 = 100;
    pub(crate) const ERR: u8 = 101;
    pub(crate) const DELIVERY: u8 = 102;
}

/// How a delivery is settled other than by an ack (`SETTLE` body: delivery id, how, not_before,
/// data). Acks are [`kind::ACK`] frames.
pub(crate) mod settle {
    pub(crate) const REQUEUE: u8 = 1;
    pub(crate) const DEFER: u8 = 2;
    pub(crate) const DEAD_LETTER: u8 = 3;
}

/// Key slot operations (`FLOW` body: op, key, holder, ...).
pub(crate) mod flow {
    /// `limit:u32, ttl_ms:u64, queue, record key, payload` -> `u8` (1 acquired, 0 parked).
    pub(crate) const ACQUIRE: u8 = 0;
    /// `ttl_ms:u64` -> `u8` (1: it was held).
    pub(crate) const RENEW: u8 = 1;
    /// nothing -> nothing.
    pub(crate) const RELEASE: u8 = 2;
    /// (key: the bucket, holder: empty) `interval_us:u64` -> `wait_us:u64`.
    pub(crate) const RATE: u8 = 3;
}

/// Task history operations (`HISTORY` body: op, ...).
pub(crate) mod history {
    /// `retention_ms:u64, max_tasks:u64, records (a JSON array)` -> nothing.
    pub(crate) const RECORD: u8 = 0;
    /// `query (JSON)` -> `page (JSON)`.
    pub(crate) const SEARCH: u8 = 1;
}

/// Chord operations (`CHORD` body: op, group, ...).
pub(crate) mod chord {
    pub(crate) const SIZE: u8 = 0;
    pub(crate) const PART: u8 = 1;
    pub(crate) const DONE: u8 = 2;
}

/// Builds a frame.
#[derive(Debug)]
pub(crate) struct Enc(Vec<u8>);

impl Enc {
    pub(crate) fn frame(kind: u8, id: u64) -> Enc {
        let mut v = Vec::with_capacity(64);
        v.extend_from_slice(&[0; 4]);
        v.push(VERSION);
        v.push(kind);
        v.extend_from_slice(&id.to_le_bytes());
        Enc(v)
    }
    pub(crate) fn u8(mut self, x: u8) -> Enc {
        self.0.push(x);
        self
    }
    pub(crate) fn u32(mut self, x: u32) -> Enc {
        self.0.extend_from_slice(&x.to_le_bytes());
        self
    }
    pub(crate) fn u64(mut self, x: u64) -> Enc {
        self.0.extend_from_slice(&x.to_le_bytes());
        self
    }
    pub(crate) fn i64(self, x: i64) -> Enc {
        self.u64(x as u64)
    }
    pub(crate) fn bytes(mut self, b: &[u8]) -> Enc {
        self.0.extend_from_slice(&(b.len() as u32).to_le_bytes());
        self.0.extend_from_slice(b);
        self
    }
    pub(crate) fn str(self, s: &str) -> Enc {
        self.bytes(s.as_bytes())
    }
    pub(crate) fn opt_bytes(self, b: Option<&[u8]>) -> Enc {
        match b {
            Some(b) => self.u8(1).bytes(b),
            None => self.u8(0),
        }
    }
    pub(crate) fn finish(mut self) -> Vec<u8> {
        let len = (self.0.len() - 4) as u32;
        self.0[..4].copy_from_slice(&len.to_le_bytes());
        self.0
    }
}

/// Reads a frame's body; every read is bounds-checked.
#[derive(Debug)]
pub(crate) struct Dec<'a> {
    b: &'a [u8],
    pos: usize,
}

/// A malformed frame.
pub(crate) fn bad(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("malformed frame: {what}"))
}

impl<'a> Dec<'a> {
    pub(crate) fn new(b: &'a [u8]) -> Dec<'a> {
        Dec { b, pos: 0 }
    }
    fn take(&mut self, n: usize) -> io::Result<&'a [u8]> {
        let end = self.pos.checked_add(n).ok_or_else(|| bad("length"))?;
        let s = self.b.get(self.pos..end).ok_or_else(|| bad("truncated"))?;
        self.pos = end;
        Ok(s)
    }
    pub(crate) fn u8(&mut self) -> io::Result<u8> {
        Ok(self.take(1)?[0])
    }
    pub(crate) fn u32(&mut self) -> io::Result<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().map_err(|_| bad("u32"))?))
    }
    pub(crate) fn u64(&mut self) -> io::Result<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().map_err(|_| bad("u64"))?))
    }
    pub(crate) fn i64(&mut self) -> io::Result<i64> {
        Ok(self.u64()? as i64)
    }
    pub(crate) fn bytes(&mut self) -> io::Result<&'a [u8]> {
        let n = self.u32()? as usize;
        self.take(n)
    }
    pub(crate) fn str(&mut self) -> io::Result<String> {
        String::from_utf8(self.bytes()?.to_vec()).map_err(|_| bad("utf-8"))
    }
    /// True when every byte of the body was read (optional trailing fields are absent).
    pub(crate) fn at_end(&self) -> bool {
        self.pos >= self.b.len()
    }
    pub(crate) fn opt_bytes(&mut self) -> io::Result<Option<Vec<u8>>> {
        Ok(match self.u8()? {
            0 => None,
            _ => Some(self.bytes()?.to_vec()),
        })
    }
}

/// The bytes of stream records a `STREAM_POLL` answer carries at most (beyond its first record), so
/// an answer stays far below [`MAX_FRAME`].
pub(crate) const POLL_BYTES: usize = 16 << 20;

impl Enc {
    /// A stream record: `partition u32 | offset u64 | timestamp i64 | not_before i64 | header
    /// count u32 | (name, value)* | key | payload`.
    pub(crate) fn stream_record(self, r: &StreamRecord) -> Enc {
        let rec = &r.record;
        let e = self.u32(r.partition as u32).u64(rec.offset).i64(rec.timestamp_ms).i64(rec.not_before_ms);
        let e = rec.headers.iter().fold(e.u32(rec.headers.len() as u32), |e, (k, v)| e.str(k).bytes(v));
        e.bytes(&rec.key).bytes(&rec.payload)
    }
}

impl Dec<'_> {
    /// The inverse of [`Enc::stream_record`].
    pub(crate) fn stream_record(&mut self) -> io::Result<StreamRecord> {
        let partition = self.u32()? as usize;
        let (offset, timestamp_ms, not_before_ms) = (self.u64()?, self.i64()?, self.i64()?);
        let n = self.u32()? as usize;
        let headers = (0..n).map(|_| Ok((self.str()?, self.bytes()?.to_vec()))).collect::<io::Result<Vec<_>>>()?;
        let (key, payload) = (self.bytes()?.to_vec(), self.bytes()?.to_vec());
        Ok(StreamRecord { partition, record: Record { offset, timestamp_ms, not_before_ms, headers, key, payload } })
    }
}

/// Writes the frames sent on `rx` in order, coalescing what is queued into one write of up to
/// 1 MiB. It stops when every sender is gone, when a write fails or makes no progress for `stall`,
/// or when `until` resolves (then it first writes what is queued: a refusal is sent before the
/// close); either way it shuts the stream's write side. An item (a frame, or a frame with the
/// budget it holds) is dropped once written.
pub(crate) async fn write_frames<W, T>(
    mut wr: W,
    mut rx: mpsc::UnboundedReceiver<T>,
    stall: Option<std::time::Duration>,
    until: impl std::future::Future<Output = ()>,
) where
    W: AsyncWrite + Unpin,
    T: AsRef<[u8]>,
{
    tokio::pin!(until);
    let mut closing = false;
    let mut buf = Vec::new();
    let mut items = Vec::new();
    loop {
        let first = if closing {
            rx.try_recv().ok()
        } else {
            tokio::select! {
                biased;
                item = rx.recv() => item,
                _ = &mut until => {
                    closing = true;
                    rx.try_recv().ok()
                }
            }
        };
        let Some(first) = first else { break };
        let mut len = first.as_ref().len();
        items.push(first);
        while len < (1 << 20) {
            match rx.try_recv() {
                Ok(more) => {
                    len += more.as_ref().len();
                    items.push(more);
                }
                Err(_) => break,
            }
        }
        let bytes: &[u8] = if items.len() == 1 {
            items[0].as_ref()
        } else {
            buf.clear();
            items.iter().for_each(|i| buf.extend_from_slice(i.as_ref()));
            &buf
        };
        let written = match stall {
            Some(stall) => write_progressing(&mut wr, bytes, stall).await,
            None => wr.write_all(bytes).await,
        };
        items.clear();
        if buf.capacity() > (4 << 20) {
            buf = Vec::new();
        }
        if let Err(e) = written {
            tracing::debug!(error = %e, "log: stopped writing to a connection");
            break;
        }
    }
    let _ = wr.shutdown().await;
}

/// Writes all of `bytes`, failing when the peer takes none of them for `stall` (a slow reader
/// that keeps reading is not cut, however long the whole write takes).
async fn write_progressing<W: AsyncWrite + Unpin>(
    wr: &mut W,
    bytes: &[u8],
    stall: std::time::Duration,
) -> io::Result<()> {
    let mut at = 0;
    while at < bytes.len() {
        match tokio::time::timeout(stall, wr.write(&bytes[at..])).await {
            Ok(Ok(0)) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(Ok(n)) => at += n,
            Ok(Err(e)) => return Err(e),
            Err(_) => {
                return Err(io::Error::new(io::ErrorKind::TimedOut, format!("the peer read nothing for {stall:?}")))
            }
        }
    }
    Ok(())
}

/// One frame read from a stream.
#[derive(Debug)]
pub(crate) struct Frame {
    pub(crate) kind: u8,
    pub(crate) id: u64,
    pub(crate) body: Vec<u8>,
}

/// Reads the next frame of at most `max` bytes (checked from the length word, before allocating);
/// `Ok(None)` at a clean end of stream. A bad frame is an `InvalidData` error whose message names
/// what is wrong (for an oversized frame: its length and the limit).
pub(crate) async fn read_frame<R: AsyncRead + Unpin>(r: &mut R, max: usize) -> io::Result<Option<Frame>> {
    let mut head = [0u8; 4];
    match r.read_exact(&mut head).await {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_le_bytes(head) as usize;
    if len > max {
        return Err(bad(&format!("a frame of {len} bytes is over the limit of {max} bytes")));
    }
    if len < 10 {
        return Err(bad(&format!("a frame of {len} bytes is shorter than its header")));
    }
    let mut buf = vec![0u8; len];
    r.read_exact(&mut buf).await?;
    if buf[0] != VERSION {
        return Err(bad(&format!("protocol version {} (this side speaks {VERSION})", buf[0])));
    }
    let kind = buf[1];
    let id = u64::from_le_bytes(buf[2..10].try_into().map_err(|_| bad("id"))?);
    buf.drain(..10);
    Ok(Some(Frame { kind, id, body: buf }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn frames_roundtrip_and_bad_ones_are_refused() {
        let f = Enc::frame(kind::PUBLISH, 7).str("q").u32(1).i64(-1).bytes(b"k").opt_bytes(None).finish();
        let mut r = &f[..];
        let got = read_frame(&mut r, MAX_FRAME).await.unwrap().unwrap();
        assert_eq!((got.kind, got.id), (kind::PUBLISH, 7));
        let mut d = Dec::new(&got.body);
        assert_eq!(d.str().unwrap(), "q");
        assert_eq!((d.u32().unwrap(), d.i64().unwrap(), d.bytes().unwrap()), (1, -1, &b"k"[..]));
        assert_eq!(d.opt_bytes().unwrap(), None);
        assert!(d.u8().is_err(), "reading past the end is an error, not a panic");
        let huge = (u32::MAX).to_le_bytes();
        let err = read_frame(&mut &huge[..], MAX_FRAME).await.unwrap_err();
        assert!(err.to_string().contains(&format!("over the limit of {MAX_FRAME} bytes")), "{err}");
        let err = read_frame(&mut &f[..], 8).await.unwrap_err();
        assert!(err.to_string().contains("over the limit of 8 bytes"), "a frame is checked against the given limit");
        let mut wrong = f.clone();
        wrong[4] = 9;
        assert!(read_frame(&mut &wrong[..], MAX_FRAME).await.is_err());
    }

    #[test]
    fn stream_records_roundtrip() {
        let rec = Record {
            offset: 9,
            timestamp_ms: 1_700_000_000_000,
            not_before_ms: -1,
            headers: vec![("h".into(), b"v".to_vec())],
            key: b"user-1".to_vec(),
            payload: b"{}".to_vec(),
        };
        let f = Enc::frame(kind::OK, 1).stream_record(&StreamRecord { partition: 3, record: rec.clone() }).finish();
        let got = Dec::new(&f[14..]).stream_record().unwrap();
        assert_eq!((got.partition, got.record), (3, rec));
        assert!(Dec::new(&f[14..f.len() - 1]).stream_record().is_err(), "a truncated record is an error");
    }
}

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

use celery_core::protocol::Message;
use celery_core::{BrokerError, ProtocolError};

use super::partition::Partition;
use super::segment::ReadAhead;
use super::wire::{self, Dec, Enc};
use super::{payload, Inner, LogBroker, LogError, LogStore};

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

/// The payloads of the oldest unfinished records of `queue`, oldest first, at most `max` (and
/// [`MAX_PEEK`]) and about [`PEEK_BYTES`].
pub(crate) fn payloads(store: &LogStore, queue: &str, max: usize) -> Result<Vec<Vec<u8>>, LogError> {
    let max = max.min(MAX_PEEK);
    if max == 0 {
        return Ok(Vec::new());
    }
    // Reading never creates a queue.
    let Some(topic) = store.find_topic(queue)? else { return Ok(Vec::new()) };
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

/// Answers a `PEEK` request (queue, max:u32): count:u32, payload*.
pub(crate) fn answer(store: &LogStore, ok: Enc, d: &mut Dec<'_>) -> Result<Vec<u8>, String> {
    let queue = d.str().map_err(|e| e.to_string())?;
    let max = d.u32().map_err(|e| e.to_string())? as usize;
    let found = payloads(store, &queue, max).map_err(|e| e.to_string())?;
    let mut enc = ok.u32(found.len() as u32);
    for p in &found {
        enc = enc.bytes(p);
    }
    Ok(enc.finish())
}

/// Reads a `PEEK` answer.
fn read_answer(body: &[u8]) -> Result<Vec<Vec<u8>>, BrokerError> {
    let bad = |e: std::io::Error| BrokerError::operation(format!("malformed PEEK answer: {e}"));
    let mut d = Dec::new(body);
    let n = d.u32().map_err(bad)? as usize;
    if n > MAX_PEEK {
        return Err(BrokerError::operation(format!("malformed PEEK answer: {n} records (at most {MAX_PEEK})")));
    }
    (0..n).map(|_| d.bytes().map(<[u8]>::to_vec).map_err(bad)).collect()
}

impl LogBroker {
    /// [`Broker::peek`](celery_core::Broker::peek) for the log broker: in this process, or through
    /// the owner of the directory.
    pub(crate) async fn peek_queue(
        &self,
        queue: &str,
        max: usize,
    ) -> Result<Vec<Result<Message, ProtocolError>>, BrokerError> {
        let max = max.min(MAX_PEEK);
        let found = match &self.inner {
            Inner::Local(s) => payloads(s, queue, max)?,
            Inner::Remote(c) => read_answer(&c.call(wire::kind::PEEK, |e| e.str(queue).u32(max as u32)).await?)?,
        };
        Ok(found.iter().map(|p| payload::decode(p).0).collect())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use celery_core::routing::Route;
    use celery_core::{Broker, Signature};

    use super::*;

    fn dir(tag: &str) -> std::path::PathBuf {
        std::env::temp_dir().join(format!("peek-{tag}-{}", uuid::Uuid::new_v4().simple()))
    }

    fn msg(i: i64) -> Message {
        Message::from_signature(&Signature::by_name("t").args(serde_json::json!([i]))).unwrap()
    }

    fn ids(found: &[Result<Message, ProtocolError>]) -> Vec<String> {
        found.iter().map(|m| m.as_ref().map(|m| m.headers.id.clone()).unwrap_or_default()).collect()
    }

    /// Peeking shows the oldest unfinished records in order, any number of times, and changes
    /// nothing a consumer sees: the same records come, in the same order, each a first delivery.
    #[tokio::test]
    async fn peek_takes_nothing_and_counts_nothing() {
        let d = dir("local");
        let broker = LogBroker::connect(&format!("log://{}?partitions=2&max_deliveries=1", d.display())).await.unwrap();
        let sent: Vec<Message> = (0..5).map(msg).collect();
        for m in &sent {
            broker.publish(&Route::queue("q"), m).await.unwrap();
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        }
        let want: Vec<String> = sent.iter().map(|m| m.headers.id.clone()).collect();
        for _ in 0..5 {
            assert_eq!(ids(&broker.peek("q", 100).await.unwrap()), want);
        }
        assert_eq!(ids(&broker.peek("q", 2).await.unwrap()), want[..2]);
        assert_eq!(broker.queue_len("q").await.unwrap(), 5);

        // Finish the third out of order: it is no longer shown.
        let mut c = broker.consume(&["q".to_string()], 5).await.unwrap();
        let mut got = Vec::new();
        for _ in 0..5 {
            let mut d = c.next().await.unwrap();
            assert!(!d.redelivered, "peeking counted a delivery");
            got.push((d.message().as_ref().unwrap().headers.id.clone(), d));
        }
        let mut rest = Vec::new();
        for (id, d) in got {
            if id == want[2] {
                d.ack().await.unwrap();
            } else {
                rest.push(d);
            }
        }
        let shown = ids(&broker.peek("q", 100).await.unwrap());
        assert_eq!(shown, [&want[..2], &want[3..]].concat(), "leased ones are shown, the acked one is not");
        for d in rest {
            d.ack().await.unwrap();
        }
        assert!(broker.peek("q", 100).await.unwrap().is_empty());
        c.close().await;
        let _ = std::fs::remove_dir_all(d);
    }

    /// Over the socket protocol (`PEEK`), the same answer.
    #[tokio::test]
    async fn peek_over_tcp() {
        let d = dir("tcp");
        let (path, cfg) = super::super::parse_url(&format!("log://{}", d.display())).unwrap();
        let store = LogStore::open(&path, cfg).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(super::super::serve_tcp(Arc::clone(&store), listener, Some("t".into()), None));
        let broker = LogBroker::connect(&format!("log+tcp://{addr}?token=t")).await.unwrap();
        let sent: Vec<Message> = (0..3).map(msg).collect();
        for m in &sent {
            broker.publish(&Route::queue("q"), m).await.unwrap();
        }
        let want: Vec<String> = sent.iter().map(|m| m.headers.id.clone()).collect();
        for _ in 0..3 {
            assert_eq!(ids(&broker.peek("q", 10).await.unwrap()), want);
        }
        assert_eq!(ids(&broker.peek("q", 1).await.unwrap()), want[..1]);
        assert_eq!(broker.queue_len("q").await.unwrap(), 3);
        assert!(read_answer(&Enc::frame(0, 0).u32(MAX_PEEK as u32 + 1).finish()[14..]).is_err());
        server.abort();
        let _ = std::fs::remove_dir_all(d);
    }
}

//! The typed requests of a [`RemoteStore`]: what `LogStore` does in the owning process, asked of
//! the server (the table in `DESIGN.md`). Task consumers, subscriptions and stream members are in
//! [`super::consumer`] and [`super::stream`].

use std::time::Duration;

use celery_core::backend::ChordMember;
use celery_core::clock::millis;
use celery_core::routing::{Binding, ExchangeKind};
use celery_core::BrokerError;
use serde_json::{Map, Value};

use super::{bad_reply, read_opt, read_u64, RemoteStore, MAX_WAIT};
use crate::log::net::wire::{self, chord, kind, Dec};
use crate::log::storage::peek::MAX_PEEK;
use crate::log::storage::results::is_ready;
use crate::log::storage::NewRecord;

impl RemoteStore {
    /// Connects (if not connected) and greets the server: fails early on a wrong token or a server
    /// that is not there.
    pub(crate) async fn hello(&self) -> Result<(), BrokerError> {
        self.call(kind::HELLO, |e| e.str(&self.token)).await.map(|_| ())
    }

    /// Appends records to `queue`, at most [`wire::MAX_PUBLISH_RECORDS`] per request; returns once
    /// they are durable.
    pub(crate) async fn publish(&self, queue: &str, records: &[NewRecord]) -> Result<(), BrokerError> {
        for chunk in records.chunks(wire::MAX_PUBLISH_RECORDS) {
            self.call(kind::PUBLISH, |e| {
                chunk.iter().fold(e.str(queue).u32(chunk.len() as u32), |e, r| {
                    e.i64(r.not_before_ms).bytes(&r.key).bytes(&r.payload)
                })
            })
            .await?;
        }
        Ok(())
    }

    /// Finishes the waiting records of `queue`; how many.
    pub(crate) async fn purge(&self, queue: &str) -> Result<u64, BrokerError> {
        read_u64(&self.call(kind::PURGE, |e| e.str(queue)).await?)
    }

    /// Records of `queue` ready to be taken.
    pub(crate) async fn queue_len(&self, queue: &str) -> Result<u64, BrokerError> {
        read_u64(&self.call(kind::QUEUE_LEN, |e| e.str(queue)).await?)
    }

    /// Delayed records seen in `queue`.
    pub(crate) async fn delayed_len(&self, queue: &str) -> Result<u64, BrokerError> {
        read_u64(&self.call(kind::DELAYED_LEN, |e| e.str(queue)).await?)
    }

    /// The payloads of the oldest unfinished records of `queue` (`PEEK`), at most `max`.
    pub(crate) async fn peek(&self, queue: &str, max: usize) -> Result<Vec<Vec<u8>>, BrokerError> {
        let max = max.min(MAX_PEEK);
        read_peek(&self.call(kind::PEEK, |e| e.str(queue).u32(max as u32)).await?)
    }

    /// Declares an exchange.
    pub(crate) async fn declare_exchange(&self, name: &str, kind: ExchangeKind) -> Result<(), BrokerError> {
        let k = format!("{kind:?}").to_lowercase();
        self.call(kind::DECLARE, |e| e.str(name).str(&k)).await.map(|_| ())
    }

    /// Binds a queue.
    pub(crate) async fn bind(&self, binding: &Binding) -> Result<(), BrokerError> {
        let b = serde_json::to_vec(binding).map_err(|e| BrokerError::operation_with("encoding a binding", e))?;
        self.call(kind::BIND, |e| e.bytes(&b)).await.map(|_| ())
    }

    /// The queues a publish through `exchange` reaches (decided by the owner).
    pub(crate) async fn route(
        &self,
        exchange: &str,
        routing_key: &str,
        headers: &Map<String, Value>,
    ) -> Result<Vec<String>, BrokerError> {
        let headers = serde_json::to_vec(headers).unwrap_or_default();
        let body = self.call(kind::ROUTE, |e| e.str(exchange).str(routing_key).bytes(&headers)).await?;
        let mut d = Dec::new(&body);
        let n = d.u32().map_err(bad_reply)?;
        (0..n).map(|_| d.str().map_err(bad_reply)).collect()
    }

    /// Hands a broadcast to the owner's current subscribers.
    pub(crate) async fn broadcast(&self, exchange: &str, routing_key: &str, body: &[u8]) -> Result<(), BrokerError> {
        self.call(kind::BROADCAST, |e| e.str(exchange).str(routing_key).bytes(body)).await.map(|_| ())
    }

    /// Takes or renews (`ttl` given) or releases (`None`) the lease `name` for `holder`; true when
    /// `holder` holds it afterwards.
    pub(crate) async fn lease(&self, name: &str, holder: &str, ttl: Option<Duration>) -> Result<bool, BrokerError> {
        // A ttl of 0 releases: a lease taken is at least 1 ms.
        let ms = ttl.map_or(0, |t| millis(t).max(1));
        Ok(read_u64(&self.call(kind::LEASE, |e| e.str(name).str(holder).u64(ms)).await?)? == 1)
    }

    /// Takes a slot of `req.key`, or parks `record` (bound for `queue`) on the owner.
    pub(crate) async fn acquire_or_park(
        &self,
        req: &celery_core::flow::SlotRequest<'_>,
        queue: &str,
        record: &NewRecord,
    ) -> Result<celery_core::flow::Admission, BrokerError> {
        let body = self
            .call(kind::FLOW, |e| {
                e.u8(wire::flow::ACQUIRE)
                    .str(req.key)
                    .str(req.holder)
                    .u32(req.limit)
                    .u64(millis(req.ttl))
                    .str(queue)
                    .bytes(&record.key)
                    .bytes(&record.payload)
            })
            .await?;
        Ok(match Dec::new(&body).u8().map_err(bad_reply)? {
            1 => celery_core::flow::Admission::Acquired,
            _ => celery_core::flow::Admission::Parked,
        })
    }

    /// Renews a key slot on the owner.
    pub(crate) async fn renew_slot(&self, key: &str, holder: &str, ttl: Duration) -> Result<bool, BrokerError> {
        let body = self.call(kind::FLOW, |e| e.u8(wire::flow::RENEW).str(key).str(holder).u64(millis(ttl))).await?;
        Ok(Dec::new(&body).u8().map_err(bad_reply)? == 1)
    }

    /// Reserves the next start of a rate bucket on the owner; how long to wait.
    pub(crate) async fn reserve_start(&self, name: &str, interval: Duration) -> Result<Duration, BrokerError> {
        let us = interval.as_micros().min(u64::MAX as u128) as u64;
        let body = self.call(kind::FLOW, |e| e.u8(wire::flow::RATE).str(name).str("").u64(us)).await?;
        Ok(Duration::from_micros(read_u64(&body)?))
    }

    /// Releases a key slot on the owner (which moves a parked message back).
    pub(crate) async fn release_slot(&self, key: &str, holder: &str) -> Result<(), BrokerError> {
        self.call(kind::FLOW, |e| e.u8(wire::flow::RELEASE).str(key).str(holder)).await.map(|_| ())
    }

    /// Stores task history records on the owner (`HISTORY` `RECORD`).
    pub(crate) async fn record_history(
        &self,
        tasks: &[celery_core::history::TaskRecord],
        keep: &celery_core::history::Retain,
    ) -> Result<(), BrokerError> {
        let json = serde_json::to_vec(tasks).map_err(|e| BrokerError::operation_with("encoding history records", e))?;
        let max = u64::try_from(keep.max_tasks).unwrap_or(u64::MAX);
        self.call(kind::HISTORY, |e| e.u8(wire::history::RECORD).u64(millis(keep.retention)).u64(max).bytes(&json))
            .await
            .map(|_| ())
    }

    /// One page of the owner's task history (`HISTORY` `SEARCH`).
    pub(crate) async fn search_history(
        &self,
        query: &celery_core::history::HistoryQuery,
    ) -> Result<celery_core::history::HistoryPage, BrokerError> {
        let json = serde_json::to_vec(query).map_err(|e| BrokerError::operation_with("encoding a history query", e))?;
        let body = self.call(kind::HISTORY, |e| e.u8(wire::history::SEARCH).bytes(&json)).await?;
        let page = Dec::new(&body).bytes().map_err(|e| BrokerError::operation_with("malformed history answer", e))?;
        serde_json::from_slice(page).map_err(|e| BrokerError::operation_with("malformed history answer", e))
    }

    /// Stores a result document unless a SUCCESS is stored already.
    pub(crate) async fn put_result(&self, id: &str, doc: &[u8], ttl: Duration) -> Result<(), BrokerError> {
        let put = self.call(kind::RESULT_PUT, |e| e.str(id).bytes(doc).u64(millis(ttl))).await;
        put.map(|_| ()).map_err(wire::result_put_failed)
    }

    /// The result document of `id`.
    pub(crate) async fn get_result(&self, id: &str) -> Result<Option<Vec<u8>>, BrokerError> {
        read_opt(&self.call(kind::RESULT_GET, |e| e.str(id)).await?)
    }

    /// Waits for a ready result document of `id`, at most `timeout`, in waits of at most
    /// [`MAX_WAIT`] on the server.
    pub(crate) async fn wait_result(&self, id: &str, timeout: Duration) -> Result<Option<Vec<u8>>, BrokerError> {
        let deadline = celery_core::clock::instant_after(timeout);
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now()).min(MAX_WAIT);
            let doc = read_opt(&self.call(kind::RESULT_WAIT, |e| e.str(id).u64(millis(left))).await?)?;
            if doc.as_deref().is_some_and(is_ready) || tokio::time::Instant::now() >= deadline {
                return Ok(doc);
            }
        }
    }

    /// Deletes the result document of `id`.
    pub(crate) async fn forget_result(&self, id: &str) -> Result<(), BrokerError> {
        self.call(kind::RESULT_FORGET, |e| e.str(id)).await.map(|_| ())
    }

    /// Records a chord's size.
    pub(crate) async fn chord_size(&self, group: &str, size: usize, ttl: Duration) -> Result<(), BrokerError> {
        self.call(kind::CHORD, |e| e.u8(chord::SIZE).str(group).u64(size as u64).u64(millis(ttl))).await.map(|_| ())
    }

    /// Counts a chord member; the members, to the one that completes the chord.
    pub(crate) async fn chord_part(
        &self,
        group: &str,
        member: &ChordMember,
        ttl: Duration,
    ) -> Result<Option<Vec<ChordMember>>, BrokerError> {
        let doc = serde_json::to_vec(member).map_err(|e| BrokerError::operation_with("encoding a chord member", e))?;
        let body = self.call(kind::CHORD, |e| e.u8(chord::PART).str(group).bytes(&doc).u64(millis(ttl))).await?;
        match read_opt(&body)? {
            None => Ok(None),
            Some(all) => serde_json::from_slice(&all)
                .map(Some)
                .map_err(|e| BrokerError::operation_with("malformed chord members from the log server", e)),
        }
    }

    /// Forgets a chord's tally.
    pub(crate) async fn chord_done(&self, group: &str) -> Result<(), BrokerError> {
        self.call(kind::CHORD, |e| e.u8(chord::DONE).str(group)).await.map(|_| ())
    }
}

/// Reads a `PEEK` answer (count:u32, payload*).
fn read_peek(body: &[u8]) -> Result<Vec<Vec<u8>>, BrokerError> {
    let bad = |e: std::io::Error| BrokerError::operation_with("malformed PEEK answer", e);
    let mut d = Dec::new(body);
    let n = d.u32().map_err(bad)? as usize;
    if n > MAX_PEEK {
        return Err(BrokerError::operation(format!("malformed PEEK answer: {n} records (at most {MAX_PEEK})")));
    }
    (0..n).map(|_| d.bytes().map(<[u8]>::to_vec).map_err(bad)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::net::wire::Enc;

    #[test]
    fn a_peek_answer_over_the_limit_is_refused() {
        assert!(read_peek(&Enc::frame(0, 0).u32(MAX_PEEK as u32 + 1).finish()[14..]).is_err());
        assert_eq!(read_peek(&Enc::frame(0, 0).u32(1).bytes(b"x").finish()[14..]).unwrap(), [b"x".to_vec()]);
    }
}

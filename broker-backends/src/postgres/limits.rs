//! Flow control on PostgreSQL ([`celery_core::flow`]): cluster-wide rate limits and per-key
//! concurrency slots, held in the broker's schema (tables and functions in [`super::sql`],
//! migrations 4 to 6).
//!
//! - Rate buckets: one row per bucket (a task name) in `celery_rs_rate_buckets` with the next
//!   free start by the server's clock; a reservation is one call ([`sql::RATE_RESERVE`]) whose
//!   row lock orders concurrent workers, as Redis's one script does. Creating a bucket first
//!   deletes the buckets idle for a minute (their next start is past, so they hold nothing) and
//!   is refused when [`MAX_TRACKED_KEYS`] remain.
//! - Key slots: one row per held slot in `celery_rs_key_slots` (key, holder, lease expiry): a
//!   lease, not a counter, so a dead worker's slot frees once its lease ends. Taking a slot or
//!   parking the message is one call of `celery_rs_key_acquire` under the key's advisory lock: no
//!   slot frees between "full" and "parked". The batched take goes without the message (most find
//!   a slot free); only a full key gets a call with it, which checks again. A parked message is a row of `celery_rs_parked` (its
//!   queue, priority and Kombu envelope) committed before the worker acks its delivery; it waits
//!   on disk without a worker slot, and nothing polls for it. A release deletes the holder's row
//!   and moves the oldest parked message of the key (from any queue) back into `celery_rs_tasks`
//!   with a `NOTIFY` of its queue, as a publish does. The sweep, which every worker with keyed
//!   tasks runs each third of its lease, deletes expired slots of up to [`SWEEP_KEYS`] keys and
//!   moves one parked message back per slot it freed, and one for a key with parked messages and
//!   no slot at all.
//! - Batches and soft state: a worker sends the takes (without the message) and the releases
//!   asked for while one call is in flight together, one call of `celery_rs_key_acquire_many` or
//!   `celery_rs_key_release_many` per batch (migration 6; keys locked in the order of their lock's
//!   hash, so batches never wait on each other in a cycle). A release takes not the key's lock
//!   but a second lock of the key, shared: releases and takes of a key run at once, and a park
//!   (which takes both, the second exclusive) waits for the releases in flight and they for it,
//!   so no release misses a message being parked; concurrent releases move distinct parked
//!   messages (`SKIP LOCKED`). These two commit with
//!   `synchronous_commit = off`: they return before the WAL flush, their effect is visible to
//!   every other session at once, and only a crash of PostgreSQL or of its machine (not of a
//!   worker) can lose the last fraction of a second of them. A lost take heals at its holder's
//!   next renewal (a renewal inserts the slot again; until then the key may run one task more
//!   than its limit per lost take); a lost release frees its slot when the lease ends; a parked
//!   message whose move back was lost stays parked until the sweep moves it (a key with parked
//!   messages and no slot held, or with expired slots). Parking is committed durably before the delivery is acked, so a
//!   parked message is never lost; a later durable commit (an ack) flushes every asynchronous one
//!   before it, so a task that ran after a moved message is never acked without its move.
//! - Bounded as on the built-in broker: a key with no slot held and nothing parked is refused
//!   (``too many concurrency keys tracked at once``) when [`MAX_TRACKED_KEYS`] keys have slots
//!   or parked messages. The count is taken only for such a new key, under its own lock, so keys
//!   new at the same moment may pass it together (by at most the number of them). A slot's
//!   renewal re-takes a swept slot whatever the count (it is bounded by the tasks running).
//!
//! Tasks without a concurrency key or a cluster-wide rate limit never touch these tables.

use std::time::Duration;

use async_trait::async_trait;
use celery_core::flow::{
    validate_bucket, validate_key, Admission, KeySlots, RateBuckets, SlotRelease, SlotRequest, MAX_TRACKED_KEYS,
};
use celery_core::protocol::Message;
use celery_core::{BrokerError, ProtocolError};

use super::error::PgError;
use super::{check_name, sql, PostgresBroker, MAX_PAYLOAD};
use crate::envelope;

/// Keys one sweep visits at most, of each kind (with expired slots; parked with no slot held).
pub const SWEEP_KEYS: i32 = 256;

/// [`MAX_TRACKED_KEYS`] as the functions take it.
const MAX_KEYS: i32 = MAX_TRACKED_KEYS as i32;

/// A lease or interval in seconds, at least a millisecond.
fn secs(d: Duration) -> f64 {
    d.as_secs_f64().max(0.001)
}

#[async_trait]
impl KeySlots for PostgresBroker {
    async fn acquire_or_park(
        &self,
        req: &SlotRequest<'_>,
        queue: &str,
        msg: &Message,
    ) -> Result<Admission, BrokerError> {
        req.validate()?;
        check_name("key slot holder", req.holder)?;
        check_name("queue", queue)?;
        let limit = i32::try_from(req.limit).unwrap_or(i32::MAX);
        // Callers try `acquire_many` first (this broker batches), so this call carries the
        // message at once: it takes a slot freed meanwhile or parks, atomically, committed durably.
        let priority = i16::from(envelope::kombu_priority(msg));
        let env = envelope::encode(msg, "", queue);
        if env.len() > MAX_PAYLOAD {
            return Err(ProtocolError::TooLarge { size: env.len(), limit: MAX_PAYLOAD }.into());
        }
        let payload = Some(env.into_bytes());
        let rows = self
            .inner
            .db
            .query(
                "take a key slot",
                sql::KEY_ACQUIRE,
                &[&req.key, &limit, &req.holder, &secs(req.ttl), &queue, &priority, &payload, &MAX_KEYS],
            )
            .await?;
        let Some(row) = rows.first() else {
            return Err(PgError::operation("take a key slot: no answer").into());
        };
        match row.get::<_, Option<bool>>(0) {
            Some(true) => Ok(Admission::Acquired),
            Some(false) => Ok(Admission::Parked),
            None => Err(PgError::operation("take a key slot: neither taken nor parked").into()),
        }
    }

    fn batches(&self) -> bool {
        true
    }

    async fn acquire_many(&self, reqs: &[SlotRequest<'_>]) -> Result<Vec<bool>, BrokerError> {
        if reqs.is_empty() {
            return Ok(Vec::new());
        }
        let (mut keys, mut limits, mut holders, mut ttls) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for req in reqs {
            req.validate()?;
            check_name("key slot holder", req.holder)?;
            keys.push(req.key);
            limits.push(i32::try_from(req.limit).unwrap_or(i32::MAX));
            holders.push(req.holder);
            ttls.push(secs(req.ttl));
        }
        let rows = self
            .inner
            .db
            .query("take key slots", sql::KEY_ACQUIRE_MANY, &[&keys, &limits, &holders, &ttls, &MAX_KEYS])
            .await?;
        let taken: Vec<i16> = rows.first().and_then(|r| r.get::<_, Option<Vec<i16>>>(0)).unwrap_or_default();
        if taken.len() != reqs.len() {
            return Err(PgError::operation("take key slots: an answer per request expected").into());
        }
        Ok(taken.into_iter().map(|t| t == 1).collect())
    }

    async fn release_many(&self, slots: &[SlotRelease<'_>]) -> Result<(), BrokerError> {
        if slots.is_empty() {
            return Ok(());
        }
        let (mut keys, mut holders) = (Vec::with_capacity(slots.len()), Vec::with_capacity(slots.len()));
        for s in slots {
            validate_key(s.key)?;
            check_name("key slot holder", s.holder)?;
            keys.push(s.key);
            holders.push(s.holder);
        }
        let channel = &self.inner.channels.0;
        self.inner.db.query("release key slots", sql::KEY_RELEASE_MANY, &[&keys, &holders, channel]).await.map(drop)
    }

    async fn renew(&self, key: &str, holder: &str, ttl: Duration) -> Result<bool, BrokerError> {
        validate_key(key)?;
        check_name("key slot holder", holder)?;
        let rows = self.inner.db.query("renew a key slot", sql::KEY_RENEW, &[&key, &holder, &secs(ttl)]).await?;
        Ok(rows.first().is_some_and(|r| r.get::<_, bool>(0)))
    }

    /// Moves the oldest parked message of `key` back to the queue it was parked from (whichever
    /// that is: `queue` is not needed here).
    async fn release(&self, key: &str, holder: &str, _queue: &str) -> Result<(), BrokerError> {
        self.release_many(&[SlotRelease { key, holder, queue: _queue }]).await
    }

    async fn sweep(&self) -> Result<u64, BrokerError> {
        let channel = &self.inner.channels.0;
        let rows = self.inner.db.query("sweep key slots", sql::KEY_SWEEP, &[channel, &SWEEP_KEYS]).await?;
        Ok(rows.first().map_or(0, |r| r.get::<_, i64>(0)).max(0) as u64)
    }
}

#[async_trait]
impl RateBuckets for PostgresBroker {
    async fn reserve(&self, name: &str, interval: Duration) -> Result<Duration, BrokerError> {
        validate_bucket(name, interval)?;
        let rows = self
            .inner
            .db
            .query("reserve a rate limit start", sql::RATE_RESERVE, &[&name, &secs(interval), &MAX_KEYS])
            .await?;
        let wait = rows.first().map_or(0.0, |r| r.get::<_, f64>(0));
        Ok(wait_of(wait))
    }
}

/// The wait the server answered, in seconds (negative or not a number: none).
fn wait_of(secs: f64) -> Duration {
    if secs.is_finite() && secs > 0.0 {
        Duration::try_from_secs_f64(secs).unwrap_or(Duration::MAX)
    } else {
        Duration::ZERO
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_are_never_negative_and_keep_microseconds() {
        assert_eq!(wait_of(-0.0002), Duration::ZERO);
        assert_eq!(wait_of(f64::NAN), Duration::ZERO);
        assert_eq!(wait_of(0.049_5), Duration::from_micros(49_500));
        assert_eq!(secs(Duration::ZERO), 0.001);
        assert_eq!(secs(Duration::from_millis(50)), 0.05);
    }
}

//! Settling a Redis delivery. An ack is queued and sent in a batch (`HDEL unacked`, `ZREM
//! unacked_index` and `SREM` from the holder's `held` set in one `MULTI`); requeue, defer and
//! dead-letter each move the envelope and drop its lease in one script ([`scripts::settle`]) that
//! moves nothing when the lease is gone (restored to another worker meanwhile), so a message is
//! always in exactly one place.

use std::sync::Arc;

use async_trait::async_trait;
use celery_core::broker::{dead_letter_queue, Settle};
use celery_core::protocol::Message;
use celery_core::BrokerError;
use chrono::{DateTime, Utc};

use super::consumer::{Acked, LeaseTag, Shared};
use super::error::failed;
use super::scripts;
use crate::envelope;

/// One delivery's lease: its tag in `unacked`, the envelope as taken, and where it came from.
#[derive(Debug)]
pub(super) struct RedisSettle {
    shared: Arc<Shared>,
    tag: LeaseTag,
    /// Its group in [`Shared::groups`] (whose lease keys hold it).
    group: usize,
    /// The (queue, shard) it was taken from, in [`Shared::entries`].
    entry: usize,
    /// The priority bucket of that entry it was taken from.
    step: usize,
    /// The holder's epoch when it was fetched ([`crate::liveness::Liveness::surely_held`]).
    epoch: u64,
    env: Vec<u8>,
}

impl RedisSettle {
    /// The settlement of the envelope `env`, leased under `tag` in `group`, taken from bucket
    /// `step` of `entry`.
    pub(super) fn new(
        shared: Arc<Shared>,
        tag: LeaseTag,
        group: usize,
        entry: usize,
        step: usize,
        epoch: u64,
        env: Vec<u8>,
    ) -> Self {
        RedisSettle { shared, tag, group, entry, step, epoch, env }
    }

    /// The queue it was taken from.
    fn queue(&self) -> &str {
        &self.shared.entries[self.entry].queue
    }

    /// The queue's shard it was taken from.
    fn shard(&self) -> u16 {
        self.shared.entries[self.entry].shard
    }

    /// Moves `value` to `target` (`op`: `rpush`, `lpush`, or `zadd` with `score`) and drops the
    /// lease in one script, when the lease still exists. The lease is released here either way:
    /// after a failure it is no longer renewed, so (unless the step did happen after all) the
    /// restore sweep returns the message to its queue after the visibility timeout, instead of
    /// this consumer keeping it leased for as long as it lives.
    /// `wake`: the wake-up channel of the target list's queue (empty for none).
    async fn settle_with(
        &self,
        target: &str,
        op: &str,
        value: &[u8],
        score: i64,
        wake: &str,
    ) -> Result<(), BrokerError> {
        let mut conn = self.shared.conn.clone();
        let group = &self.shared.groups[self.group];
        let r = scripts::settle()
            .key(group.scope.unacked())
            .key(group.scope.unacked_index())
            .key(&group.held)
            .key(target)
            .arg(&self.tag)
            .arg(op)
            .arg(value)
            .arg(score)
            .arg(wake)
            .arg(self.shared.keys.prefix())
            .arg(self.queue())
            .arg(if self.shared.keys.is_cluster() { "0" } else { "1" })
            .invoke_async::<i64>(&mut conn)
            .await
            .map_err(failed("redis: settle a delivery"));
        self.shared.release(&self.tag);
        if let Ok(0) = r {
            tracing::warn!(queue = %self.queue(), "redis: a delivery restored to another worker meanwhile was not settled here");
        }
        r.map(|_| ())
    }

    /// Writes `until` (ms) into the next-due index for this delivery's queue shard (`ZADD LT`:
    /// an earlier due time there stays). A failure leaves the message to the sweep.
    async fn index_due(&self, until: i64) {
        let mut conn = self.shared.conn.clone();
        let keys = &self.shared.keys;
        let r = redis::cmd("ZADD")
            .arg(keys.due())
            .arg("LT")
            .arg(until)
            .arg(super::keys::Keys::due_member(self.queue(), self.shard()))
            .query_async::<i64>(&mut conn)
            .await;
        if let Err(e) = r {
            tracing::warn!(error = %e, queue = %self.queue(), "redis: cannot index a deferred message; the sweep finds it");
        }
    }
}

#[async_trait]
impl Settle for RedisSettle {
    async fn ack(&self) -> Result<(), BrokerError> {
        self.shared.release(&self.tag);
        self.shared.acks.ack(Acked::new(self.tag.clone(), self.group))
    }

    async fn requeue(&self) -> Result<(), BrokerError> {
        let entry = &self.shared.entries[self.entry];
        let wake = self.shared.keys.wake(&entry.queue, entry.shard);
        self.settle_with(&entry.buckets[self.step], "requeue", &self.env, 0, &wake).await
    }

    /// Certain without a round trip while the holder's heartbeat has been renewed without a lapse
    /// since the fetch; otherwise whether the tag is still in `unacked`.
    async fn is_held(&self) -> bool {
        self.shared.holder.liveness().surely_held(self.epoch)
            || self.shared.holder.broker().still_leased(&self.shared.groups[self.group].scope, &self.tag).await
    }

    /// Moves the message from its lease into the queue's delayed set in one script, then writes
    /// its due time into the next-due index.
    async fn defer(&self, msg: &Message, until: DateTime<Utc>) -> Result<(), BrokerError> {
        let mut m = msg.clone();
        m.headers.eta = Some(until);
        let env = envelope::encode(&m, "", self.queue());
        let delayed = self.shared.keys.delayed(self.queue(), self.shard());
        let until = until.timestamp_millis();
        self.settle_with(&delayed, "zadd", env.as_bytes(), until, "").await?;
        self.index_due(until).await;
        Ok(())
    }

    async fn dead_letter(&self, reason: &str) -> Result<(), BrokerError> {
        let dlq = dead_letter_queue(self.queue());
        let env = envelope::dead_letter(&self.env, self.queue(), reason);
        let keys = &self.shared.keys;
        let wake = keys.wake(&dlq, self.shard());
        self.settle_with(&keys.bucket(&dlq, self.shard(), 0), "lpush", env.as_bytes(), 0, &wake).await
    }
}

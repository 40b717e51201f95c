//! Settling a Redis delivery. An ack is queued and sent in a batch (`HDEL unacked` and `ZREM
//! unacked_index` in one `MULTI`); requeue, defer and dead-letter each move the envelope and drop
//! its lease in one `MULTI`, so a message is always in exactly one place.

use std::sync::Arc;

use async_trait::async_trait;
use celery_core::broker::{dead_letter_queue, Settle};
use celery_core::protocol::Message;
use celery_core::BrokerError;
use chrono::{DateTime, Utc};

use super::consumer::Shared;
use super::error::failed;
use crate::envelope;

/// One delivery's lease: its tag in `unacked`, the envelope as taken, and where it came from.
#[derive(Debug)]
pub(super) struct RedisSettle {
    shared: Arc<Shared>,
    tag: String,
    env: Vec<u8>,
    list_key: String,
    queue: String,
}

impl RedisSettle {
    /// The settlement of the envelope `env`, leased under `tag`, taken from `list_key` of `queue`.
    pub(super) fn new(shared: Arc<Shared>, tag: String, env: Vec<u8>, list_key: String, queue: String) -> Self {
        RedisSettle { shared, tag, env, list_key, queue }
    }

    /// Runs an atomic pipeline that also drops the lease. The lease is released here either way:
    /// after a failure it is no longer renewed, so (unless the step did happen after all) the
    /// restore sweep returns the message to its queue after the visibility timeout, instead of
    /// this consumer keeping it leased for as long as it lives.
    async fn settle_with(&self, mut pipe: redis::Pipeline) -> Result<(), BrokerError> {
        pipe.atomic();
        pipe.hdel(self.shared.keys.unacked(), &self.tag).ignore();
        pipe.zrem(self.shared.keys.unacked_index(), &self.tag).ignore();
        let mut conn = self.shared.conn.clone();
        let r = pipe.query_async::<()>(&mut conn).await.map_err(failed("redis: settle a delivery"));
        self.shared.release(&self.tag);
        r
    }
}

#[async_trait]
impl Settle for RedisSettle {
    async fn ack(&self) -> Result<(), BrokerError> {
        self.shared.release(&self.tag);
        self.shared.acks.ack(self.tag.clone())
    }

    async fn requeue(&self) -> Result<(), BrokerError> {
        let mut pipe = redis::pipe();
        pipe.rpush(&self.list_key, &self.env).ignore();
        self.settle_with(pipe).await
    }

    /// Moves the message from its lease into the queue's delayed set in one `MULTI`.
    async fn defer(&self, msg: &Message, until: DateTime<Utc>) -> Result<(), BrokerError> {
        let mut m = msg.clone();
        m.headers.eta = Some(until);
        let env = envelope::encode(&m, "", &self.queue);
        let mut pipe = redis::pipe();
        pipe.zadd(self.shared.keys.delayed(&self.queue), env, until.timestamp_millis()).ignore();
        self.settle_with(pipe).await
    }

    async fn dead_letter(&self, reason: &str) -> Result<(), BrokerError> {
        let dlq = dead_letter_queue(&self.queue);
        let env = envelope::dead_letter(&self.env, &self.queue, reason);
        let mut pipe = redis::pipe();
        pipe.lpush(self.shared.keys.bucket(&dlq, 0), env).ignore();
        self.settle_with(pipe).await
    }
}

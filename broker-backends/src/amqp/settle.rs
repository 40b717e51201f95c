//! Settling an AMQP delivery: [`AmqpSettle`] acks and requeues on the channel the delivery came
//! from, defers by publishing to a delay queue (see the [`super`] docs), and dead-letters by
//! publishing to `<queue>.dead` with the reason, each confirmed before the delivery is acked.
//!
//! Acks and requeues go through the channel's [`Acks`] queue, coalesced:
//! RabbitMQ spends about as much on a `basic.ack` as on a delivery, so acking each message alone
//! halves the drain rate. Here a task per channel takes every settlement that is waiting, then
//! sends one `basic.ack` with `multiple` for the run of finished delivery tags at the head of the
//! channel, and single acks only for tags that finished out of order (so a long task at the head
//! never holds finished work against the prefetch window). Nothing is acked before its task
//! finished: coalescing only batches what is already done, and `ack()` returns once the frame is
//! sent. A settlement of a dead channel fails; it is never sent on another channel.

use std::collections::BTreeSet;

use async_trait::async_trait;
use celery_core::broker::{dead_letter_queue, Settle, DEAD_LETTER_QUEUE, DEAD_LETTER_REASON};
use celery_core::protocol::Message;
use celery_core::BrokerError;
use chrono::{DateTime, Utc};
use lapin::options::{BasicAckOptions, BasicNackOptions};
use lapin::types::AMQPValue;
use lapin::Channel;
use tokio::sync::{mpsc, oneshot};

use super::AmqpBroker;

/// Settles one delivery on the channel it came from (through its coalescing settlement queue).
pub(super) struct AmqpSettle {
    pub(super) broker: AmqpBroker,
    pub(super) queue: String,
    pub(super) delivery: lapin::message::Delivery,
    pub(super) acks: Acks,
}

impl std::fmt::Debug for AmqpSettle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqpSettle").field("queue", &self.queue).field("tag", &self.delivery.delivery_tag).finish()
    }
}

#[async_trait]
impl Settle for AmqpSettle {
    async fn ack(&self) -> Result<(), BrokerError> {
        self.acks.settle(self.delivery.delivery_tag, Op::Ack).await
    }

    async fn requeue(&self) -> Result<(), BrokerError> {
        self.acks.settle(self.delivery.delivery_tag, Op::Requeue).await
    }

    /// Publishes to a delay queue and waits for RabbitMQ's confirm, then acks; if the publish
    /// fails, the delivery goes back to its queue (not lost, and not held unacked on this channel).
    async fn defer(&self, msg: &Message, until: DateTime<Utc>) -> Result<(), BrokerError> {
        if let Err(e) = self.broker.publish_delayed(&self.queue, msg, until).await {
            if let Err(r) = self.requeue().await {
                tracing::warn!(error = %r, "amqp: could not return a delivery after a failed deferral");
            }
            return Err(e);
        }
        self.ack().await
    }

    async fn dead_letter(&self, reason: &str) -> Result<(), BrokerError> {
        let dlq = dead_letter_queue(&self.queue);
        let (_, ch) = self.broker.connection().await?;
        self.broker.declare_dead_letter_queue(&ch, &self.queue).await?;
        let mut headers = self.delivery.properties.headers().clone().unwrap_or_default();
        headers.insert(DEAD_LETTER_REASON.into(), AMQPValue::LongString(reason.into()));
        headers.insert(DEAD_LETTER_QUEUE.into(), AMQPValue::LongString(self.queue.as_str().into()));
        let props = self.delivery.properties.clone().with_headers(headers);
        self.broker.publish_raw("", &dlq, false, props, &self.delivery.data).await?;
        self.ack().await
    }
}

/// What to do with a delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Op {
    /// Done: acknowledge.
    Ack,
    /// Back to the queue now (`basic.nack` with requeue).
    Requeue,
}

type Reply = oneshot::Sender<Result<(), BrokerError>>;

/// The settlement queue of one channel (cheap to clone; the task ends with the last clone).
#[derive(Debug, Clone)]
pub(super) struct Acks {
    tx: mpsc::UnboundedSender<(u64, Op, Reply)>,
}

impl Acks {
    /// Starts the settling task of `channel`.
    pub(super) fn new(channel: Channel) -> Acks {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(channel, rx));
        Acks { tx }
    }

    /// Settles delivery `tag`; returns once the frame is sent.
    pub(super) async fn settle(&self, tag: u64, op: Op) -> Result<(), BrokerError> {
        let (reply, done) = oneshot::channel();
        let gone = || BrokerError::connection("amqp: the delivery's channel is closed");
        self.tx.send((tag, op, reply)).map_err(|_| gone())?;
        done.await.map_err(|_| gone())?
    }
}

async fn run(channel: Channel, mut rx: mpsc::UnboundedReceiver<(u64, Op, Reply)>) {
    let mut tracker = Tracker::default();
    let mut batch = Vec::new();
    while rx.recv_many(&mut batch, 4096).await > 0 {
        let plan = tracker.plan(batch.iter().map(|(tag, op, _)| (*tag, *op)));
        let sent = send(&channel, &plan).await;
        for ((_, _, reply), verdict) in batch.drain(..).zip(plan.verdicts) {
            // Whatever the channel said, the delivery is not settled on it: it comes back when
            // the channel closes.
            let result = match (verdict, &sent) {
                (Err(e), _) => Err(e),
                (Ok(()), Ok(())) => Ok(()),
                (Ok(()), Err(e)) => Err(BrokerError::connection_with("amqp: settle a delivery", e.clone())),
            };
            let _ = reply.send(result);
        }
    }
}

/// Sends a plan's frames: requeues first, so no multiple ack can cover a tag meant to go back.
async fn send(channel: &Channel, plan: &Plan) -> Result<(), lapin::Error> {
    for &tag in &plan.requeue {
        channel.basic_nack(tag, BasicNackOptions { requeue: true, multiple: false }).await?;
    }
    if let Some(tag) = plan.ack_upto {
        channel.basic_ack(tag, BasicAckOptions { multiple: true }).await?;
    }
    for &tag in &plan.ack_single {
        channel.basic_ack(tag, BasicAckOptions { multiple: false }).await?;
    }
    Ok(())
}

/// The frames for one batch of settlements, and each request's verdict.
#[derive(Debug, Default)]
struct Plan {
    requeue: Vec<u64>,
    /// `basic.ack` with `multiple` up to this tag.
    ack_upto: Option<u64>,
    ack_single: Vec<u64>,
    verdicts: Vec<Result<(), BrokerError>>,
}

/// Which delivery tags of the channel are settled (tags start at 1 and every one is ours).
#[derive(Debug, Default)]
struct Tracker {
    /// Every tag up to here is settled.
    settled_upto: u64,
    /// Settled tags above `settled_upto`.
    settled_above: BTreeSet<u64>,
}

impl Tracker {
    fn is_settled(&self, tag: u64) -> bool {
        tag <= self.settled_upto || self.settled_above.contains(&tag)
    }

    fn plan(&mut self, ops: impl Iterator<Item = (u64, Op)>) -> Plan {
        let mut plan = Plan::default();
        let mut done = BTreeSet::new();
        for (tag, op) in ops {
            if tag == 0 || self.is_settled(tag) || done.contains(&tag) {
                plan.verdicts.push(Err(BrokerError::operation(format!("amqp: delivery {tag} is already settled"))));
                continue;
            }
            plan.verdicts.push(Ok(()));
            match op {
                Op::Requeue => {
                    plan.requeue.push(tag);
                    self.settled_above.insert(tag);
                }
                Op::Ack => {
                    done.insert(tag);
                }
            }
        }
        loop {
            let next = self.settled_upto + 1;
            if done.remove(&next) {
                plan.ack_upto = Some(next);
            } else if !self.settled_above.remove(&next) {
                break;
            }
            self.settled_upto = next;
        }
        for tag in done {
            plan.ack_single.push(tag);
            self.settled_above.insert(tag);
        }
        plan
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(t: &mut Tracker, ops: &[(u64, Op)]) -> (Option<u64>, Vec<u64>, Vec<u64>) {
        let p = t.plan(ops.iter().copied());
        (p.ack_upto, p.ack_single, p.requeue)
    }

    #[test]
    fn a_run_at_the_head_is_one_multiple_ack() {
        let mut t = Tracker::default();
        assert_eq!(plan(&mut t, &[(2, Op::Ack), (1, Op::Ack), (3, Op::Ack)]), (Some(3), vec![], vec![]));
        assert_eq!(plan(&mut t, &[(4, Op::Ack)]), (Some(4), vec![], vec![]));
    }

    #[test]
    fn out_of_order_tags_are_acked_alone_and_later_covered() {
        let mut t = Tracker::default();
        // 1 is still running: 2 and 3 are acked alone, so they free their prefetch slots.
        assert_eq!(plan(&mut t, &[(2, Op::Ack), (3, Op::Ack)]), (None, vec![2, 3], vec![]));
        // 1 finishes: the head moves past 2 and 3 without acking them again.
        assert_eq!(plan(&mut t, &[(1, Op::Ack), (5, Op::Ack)]), (Some(1), vec![5], vec![]));
        assert_eq!(plan(&mut t, &[(4, Op::Ack)]), (Some(4), vec![], vec![]));
        assert_eq!((t.settled_upto, t.settled_above.len()), (5, 0));
    }

    #[test]
    fn a_requeued_tag_is_never_inside_a_multiple_ack_of_the_same_batch() {
        let mut t = Tracker::default();
        let p = t.plan([(1, Op::Ack), (2, Op::Requeue), (3, Op::Ack)].into_iter());
        assert_eq!((p.requeue, p.ack_upto, p.ack_single), (vec![2], Some(3), vec![]));
    }

    #[test]
    fn settling_twice_is_an_error_and_sends_nothing() {
        let mut t = Tracker::default();
        plan(&mut t, &[(1, Op::Ack), (3, Op::Ack)]);
        let p = t.plan([(1, Op::Ack), (3, Op::Requeue), (4, Op::Ack), (4, Op::Ack)].into_iter());
        assert_eq!((p.ack_upto, p.ack_single, p.requeue), (None, vec![4], vec![]));
        let errors = p.verdicts.iter().filter(|v| v.is_err()).count();
        assert_eq!(errors, 3);
    }
}

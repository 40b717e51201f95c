//! Leases and stored documents on RabbitMQ, with nothing but queues.
//!
//! - A lease `name` is a durable queue `celery-rs.lease.<name>` with `x-single-active-consumer`,
//!   holding one token message. Every candidate consumes it with prefetch 1 and never acks; RabbitMQ
//!   delivers to one active consumer only, so the holder is whoever has the token. When the holder's
//!   channel or connection dies (a crash, `kill -9`, a network loss caught by the heartbeat), RabbitMQ
//!   requeues the token and activates the next consumer at once: no ttl to wait out.
//! - With `queue_type=quorum` both kinds are quorum queues (single active consumer and
//!   `x-max-length` work on them), so a lease and a document survive the loss of a node of the
//!   cluster: a lease queue that lived on the dead node would leave beat leaderless until the node
//!   is back. A lease queue gets a delivery limit no holder change reaches (RabbitMQ 4 would drop
//!   the token after 20 requeues by default). Queues declared classic by an earlier version are
//!   used as they are, with a warning (RabbitMQ refuses to re-declare them as quorum).
//! - A document `key` is the one message of a durable queue `celery-rs.doc.<key>` declared with
//!   `x-max-length: 1`: storing publishes (with a confirm) and RabbitMQ drops the older one; loading
//!   reads it with `basic.get` and puts it back.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use celery_core::sync::lock;
use celery_core::BrokerError;
use futures::StreamExt;
use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel};
use tokio::sync::Notify;

use super::error::failed;
use super::{short, AmqpBroker};

/// One candidacy: the channel consuming the lease queue, and whether it holds the token.
#[derive(Debug)]
pub(super) struct Hold {
    channel: Channel,
    holding: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

/// Candidacies of this process, by (lease name, holder).
pub(super) type Holds = tokio::sync::Mutex<HashMap<(String, String), Hold>>;

fn lease_queue(name: &str) -> String {
    format!("celery-rs.lease.{name}")
}

fn doc_queue(key: &str) -> String {
    format!("celery-rs.doc.{key}")
}

fn doc_args() -> FieldTable {
    let mut args = FieldTable::default();
    args.insert("x-max-length".into(), AMQPValue::LongLongInt(1));
    args
}

fn lease_args() -> FieldTable {
    let mut args = FieldTable::default();
    args.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
    args
}

/// Requeues of a lease token a quorum lease queue allows: more holder changes than ever happen.
const LEASE_DELIVERY_LIMIT: i64 = 1 << 40;

/// How long a new candidate waits for the token before answering "not held (yet)".
const FIRST_TOKEN_WAIT: Duration = Duration::from_millis(500);

impl AmqpBroker {
    pub(super) async fn amqp_lease(&self, name: &str, holder: &str) -> Result<bool, BrokerError> {
        let key = (name.to_owned(), holder.to_owned());
        let mut holds = self.inner.holds.lock().await;
        if let Some(h) = holds.get(&key) {
            if h.channel.status().connected() && !h.task.is_finished() {
                return Ok(h.holding.load(Ordering::SeqCst));
            }
            if let Some(old) = holds.remove(&key) {
                old.task.abort();
            }
        }
        let queue = lease_queue(name);
        let (ch, q) = self.declare_replicated(&queue, lease_args(), Some(LEASE_DELIVERY_LIMIT)).await?;
        ch.basic_qos(1, BasicQosOptions::default()).await.map_err(failed("amqp: lease (basic.qos)"))?;
        if q.message_count() == 0 && q.consumer_count() == 0 {
            // Nobody holds or waits for a token: put one in. Two candidates racing here make two
            // tokens, which is harmless: the single active consumer gets them all.
            let props = BasicProperties::default().with_delivery_mode(2);
            self.publish_raw("", &queue, false, props, holder.as_bytes()).await?;
        }
        let mut consumer = ch
            .basic_consume(short(&queue)?, "".into(), BasicConsumeOptions::default(), FieldTable::default())
            .await
            .map_err(failed("amqp: consume a lease queue"))?;
        let holding = Arc::new(AtomicBool::new(false));
        let got = Arc::new(Notify::new());
        let (flag, notify) = (holding.clone(), got.clone());
        let task = tokio::spawn(async move {
            // The token stays unacked for as long as this channel lives.
            while let Some(Ok(_token)) = consumer.next().await {
                flag.store(true, Ordering::SeqCst);
                notify.notify_one();
            }
            flag.store(false, Ordering::SeqCst);
        });
        let _ = tokio::time::timeout(FIRST_TOKEN_WAIT, got.notified()).await;
        let held = holding.load(Ordering::SeqCst);
        holds.insert(key, Hold { channel: ch, holding, task });
        Ok(held)
    }

    pub(super) async fn amqp_release(&self, name: &str, holder: &str) -> Result<(), BrokerError> {
        let hold = self.inner.holds.lock().await.remove(&(name.to_owned(), holder.to_owned()));
        if let Some(h) = hold {
            h.task.abort();
            // Closing the channel requeues the token for the next candidate.
            let _ = h.channel.close(200, "lease released".into()).await;
        }
        Ok(())
    }

    pub(super) async fn amqp_load_doc(&self, key: &str) -> Result<Option<Vec<u8>>, BrokerError> {
        let queue = doc_queue(key);
        let (ch, _) = self.declare_replicated(&queue, doc_args(), None).await?;
        let got = ch.basic_get(short(&queue)?, BasicGetOptions { no_ack: false }).await;
        let got = got.map_err(failed("amqp: read a document"))?;
        let doc = got.map(|m| m.delivery.data.clone());
        // Closing the channel puts the message back.
        let _ = ch.close(200, "document read".into()).await;
        Ok(doc)
    }

    pub(super) async fn amqp_store_doc(&self, key: &str, doc: &[u8]) -> Result<(), BrokerError> {
        let queue = doc_queue(key);
        if !lock(&self.inner.declared).contains(&queue) {
            let (ch, _) = self.declare_replicated(&queue, doc_args(), None).await?;
            let _ = ch.close(200, "declared".into()).await;
            lock(&self.inner.declared).insert(queue.clone());
        }
        self.publish_raw("", &queue, false, BasicProperties::default().with_delivery_mode(2), doc).await
    }

    /// Declares lease or document queue `queue` on a fresh channel: a quorum queue (with
    /// `delivery_limit`) under `queue_type=quorum`, else classic; one an earlier version declared
    /// classic stays classic, with a warning.
    async fn declare_replicated(
        &self,
        queue: &str,
        args: FieldTable,
        delivery_limit: Option<i64>,
    ) -> Result<(Channel, lapin::Queue), BrokerError> {
        let mut ch = self.channel().await?;
        if self.inner.nodes.queues().quorum() {
            let mut quorum = args.clone();
            quorum.insert("x-queue-type".into(), AMQPValue::LongString("quorum".into()));
            if let Some(limit) = delivery_limit {
                quorum.insert("x-delivery-limit".into(), AMQPValue::LongLongInt(limit));
            }
            match ch.queue_declare(short(queue)?, QueueDeclareOptions::durable(), quorum).await {
                Ok(q) => return Ok((ch, q)),
                Err(e) if e.is_amqp_soft_error() => {
                    tracing::warn!(%queue, error = %e, "amqp: kept as declared before (classic, on one node): delete it to make it a quorum queue");
                    ch = self.channel().await?; // RabbitMQ closed the one that asked
                }
                Err(e) => return Err(failed("amqp: declare a quorum queue")(e)),
            }
        }
        let q = ch.queue_declare(short(queue)?, QueueDeclareOptions::durable(), args).await;
        Ok((ch, q.map_err(failed("amqp: declare a lease or document queue"))?))
    }
}

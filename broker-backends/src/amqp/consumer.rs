//! The AMQP consumer: one channel per consumer with `basic.qos` prefetch (fair dispatch), a
//! `basic.consume` per queue, and a new subscription (after a [`Reconnect::pause`]) when the
//! channel or the connection is lost. The deliveries of a dead channel come back from RabbitMQ;
//! they are never settled on the new one ([`super::settle`]). The new subscription goes through
//! the broker's connection, so after a node's loss it is on the next node of a cluster's list.
//! A delivery that RabbitMQ marks redelivered, or that a producer sent again after a lost
//! connection ([`super::RESENT`]), is handed out as redelivered: the worker checks for a stored
//! SUCCESS before running it.

use async_trait::async_trait;
use celery_core::backoff::Reconnect;
use celery_core::protocol::{check_content_type, lenient_task_id, Headers, Message, Properties};
use celery_core::routing::QueueNames;
use celery_core::{BrokerError, Consumer, Delivery, ProtocolError};
use futures::stream::{self, select_all, BoxStream, StreamExt, TryStreamExt};
use lapin::options::{BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel};

use super::error::failed;
use super::settle::{Acks, AmqpSettle};
use super::{fields, maybe_duplicate, short, AmqpBroker};

/// Deliveries with their queue and the settlement queue of the channel they came on.
type Stream = BoxStream<'static, (String, Acks, lapin::Result<lapin::message::Delivery>)>;

/// How many `queue.declare` or `basic.consume` calls a subscription keeps in flight on a channel.
const PIPELINE: usize = 64;

/// At most this many channels declare a subscription's queues (more than [`PIPELINE`] queues),
/// then close: RabbitMQ serves each channel's methods one after another in that channel's own
/// process, so declaring on several spreads the work over the server's cores.
const DECLARE_CHANNELS: usize = 4;

/// A consumer on its own channel, resubscribing after a lost connection.
pub(super) struct AmqpConsumer {
    broker: AmqpBroker,
    queues: Vec<String>,
    prefetch: usize,
    max_message_size: usize,
    stream: Option<Stream>,
    channel: Option<Channel>,
    stopped: bool,
}

impl std::fmt::Debug for AmqpConsumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqpConsumer").field("queues", &self.queues).field("prefetch", &self.prefetch).finish()
    }
}

impl AmqpConsumer {
    /// Subscribes to `queues` (the first subscription must succeed; later losses are retried).
    pub(super) async fn start(
        broker: AmqpBroker,
        queues: &[String],
        prefetch: usize,
        max_message_size: usize,
    ) -> Result<AmqpConsumer, BrokerError> {
        let mut c = AmqpConsumer {
            broker,
            queues: queues.to_vec(),
            prefetch,
            max_message_size,
            stream: None,
            channel: None,
            stopped: false,
        };
        c.subscribe().await?;
        Ok(c)
    }

    async fn subscribe(&mut self) -> Result<(), BrokerError> {
        let ch = self.broker.channel().await?;
        ch.basic_qos(self.prefetch.clamp(1, u16::MAX as usize) as u16, BasicQosOptions::default())
            .await
            .map_err(failed("amqp: set the prefetch (basic.qos)"))?;
        let acks = Acks::new(ch.clone());
        // Declares, then consumes, with up to PIPELINE calls in flight on each channel (RabbitMQ
        // answers a channel's methods in order): one queue after another took 13 s for 1,000 queues.
        // (Owned names and handles per call: borrowed ones trip the Send check of async_trait.)
        let mut declaring = vec![ch.clone()];
        while declaring.len() < DECLARE_CHANNELS && declaring.len() * PIPELINE < self.queues.len() {
            match self.broker.channel().await {
                Ok(extra) => declaring.push(extra),
                Err(e) => {
                    // Fewer channels only make declaring slower.
                    tracing::debug!(error = %e, "amqp: no extra channel to declare queues on");
                    break;
                }
            }
        }
        let declares = self.queues.clone().into_iter().enumerate().map(|(i, q)| {
            let (broker, ch) = (self.broker.clone(), declaring[i % declaring.len()].clone());
            async move { broker.declare_task_queue(&ch, &q).await }
        });
        let declared = stream::iter(declares).buffer_unordered(PIPELINE * declaring.len()).try_collect::<()>().await;
        for extra in &declaring[1..] {
            let _ = extra.close(200, "declared".into()).await;
        }
        declared?;
        let consumes = self.queues.clone().into_iter().map(|q| {
            let (ch, acks) = (ch.clone(), acks.clone());
            async move {
                let c = ch
                    .basic_consume(short(&q)?, "".into(), BasicConsumeOptions::default(), FieldTable::default())
                    .await
                    .map_err(failed("amqp: consume"))?;
                Ok::<Stream, BrokerError>(c.map(move |d| (q.clone(), acks.clone(), d)).boxed())
            }
        });
        let streams: Vec<Stream> = stream::iter(consumes).buffered(PIPELINE).try_collect().await?;
        self.stream = Some(select_all(streams).boxed());
        self.channel = Some(ch);
        Ok(())
    }
}

#[async_trait]
impl Consumer for AmqpConsumer {
    async fn next(&mut self) -> Option<Delivery> {
        let mut backoff = Reconnect::default();
        loop {
            if let Some(s) = self.stream.as_mut() {
                match s.next().await {
                    Some((queue, acks, Ok(d))) => {
                        let (size, limit) = (d.data.len(), self.max_message_size);
                        let message = if size > limit {
                            // The headers come apart from the body: the caller can be told.
                            let too_large = ProtocolError::TooLarge { size, limit };
                            let headers = d.properties.headers().as_ref().map(fields::from_table).unwrap_or_default();
                            let headers = serde_json::Value::Object(headers);
                            Err(match lenient_task_id(&headers) {
                                Some(id) => ProtocolError::InvalidHeaders {
                                    id,
                                    task: headers.get("task").and_then(|t| t.as_str()).map(str::to_owned),
                                    reply_to: d.properties.reply_to().as_ref().map(|r| r.as_str().to_owned()),
                                    error: Box::new(too_large),
                                },
                                None => too_large,
                            })
                        } else {
                            decode(&d.properties, &d.data)
                        };
                        let settle =
                            AmqpSettle { broker: self.broker.clone(), queue: queue.clone(), delivery: d, acks };
                        let redelivered = maybe_duplicate(&settle.delivery);
                        return Some(Delivery::new(message, queue, redelivered, Box::new(settle)).with_size(size));
                    }
                    Some((_, _, Err(e))) => tracing::warn!(error = %e, "amqp: consumer failed; resubscribing"),
                    None if !self.stopped => {
                        tracing::warn!("amqp: consumer cancelled or connection closed; resubscribing")
                    }
                    None => {}
                }
                self.stream = None;
            }
            if self.stopped {
                return None;
            }
            match self.subscribe().await {
                Ok(()) => tracing::info!(queues = %QueueNames(&self.queues), "amqp: consuming again"),
                Err(e) => {
                    backoff.pause("amqp consumer", &e).await;
                }
            }
        }
    }

    /// Cancels the consumers (dropping them): nothing more is delivered. Prefetched deliveries that
    /// were not handed out stay unacked on the channel and go back to their queues when `close`
    /// closes it, after the running tasks are settled.
    fn stop(&mut self) {
        self.stopped = true;
        self.stream = None;
    }

    async fn close(&mut self) {
        self.stopped = true;
        self.stream = None;
        if let Some(ch) = self.channel.take() {
            let _ = ch.close(200, "bye".into()).await;
        }
    }
}

/// Decodes a delivery into a message; never panics.
fn decode(props: &BasicProperties, data: &[u8]) -> Result<Message, ProtocolError> {
    if let Some(ct) = props.content_type() {
        check_content_type(ct.as_str())?;
    }
    let headers = props.headers().as_ref().map(fields::from_table).ok_or(ProtocolError::MissingField("headers"))?;
    if !headers.contains_key("task") {
        return Err(ProtocolError::MissingField("task"));
    }
    let reply_to = props.reply_to().as_ref().map(|r| r.as_str());
    let headers = Headers::from_json(&serde_json::Value::Object(headers)).map_err(|e| e.with_reply_to(reply_to))?;
    Ok(Message {
        properties: Properties {
            correlation_id: props
                .correlation_id()
                .as_ref()
                .map(|s| s.as_str().to_owned())
                .unwrap_or_else(|| headers.id.clone()),
            reply_to: props.reply_to().as_ref().map(|s| s.as_str().to_owned()),
            priority: *props.priority(),
        },
        headers,
        body: data.to_vec(),
    })
}

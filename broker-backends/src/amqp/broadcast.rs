//! Broadcasts on RabbitMQ, as Celery does them: the exchange declared as given (`celeryev` is a
//! durable topic exchange, `celery.pidbox` a transient fanout one), and per subscriber a
//! server-named exclusive, auto-delete queue bound with the pattern, whose messages expire after
//! 5 s and which disappears 60 s after its subscriber is gone (Celery's `event_queue_ttl` and
//! `event_queue_expires`). Such a queue cannot be a quorum queue, and it lives on the node its
//! subscriber is connected to: when that connection dies, the subscription subscribes again (on
//! the next node of a cluster) and goes on; broadcasts sent in between are lost, which events and
//! remote control tolerate.

use celery_core::backoff::Reconnect;
use celery_core::broker::{Broadcast, ChannelSubscription, Subscription};
use celery_core::protocol::Message;
use celery_core::routing::Exchange;
use celery_core::sync::lock;
use celery_core::BrokerError;
use futures::StreamExt;
use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable};

use super::error::failed;
use super::{properties, short, AmqpBroker};

impl AmqpBroker {
    async fn declare_broadcast_exchange(&self, exchange: &Exchange) -> Result<(), BrokerError> {
        let key = format!("exchange:{}", exchange.name);
        if lock(&self.inner.declared).contains(&key) {
            return Ok(());
        }
        self.exchange_declare(exchange).await?;
        lock(&self.inner.declared).insert(key);
        Ok(())
    }

    pub(super) async fn amqp_broadcast(
        &self,
        exchange: &Exchange,
        routing_key: &str,
        msg: &Message,
    ) -> Result<(), BrokerError> {
        self.declare_broadcast_exchange(exchange).await?;
        let props = properties(msg).with_delivery_mode(1);
        self.publish_raw(&exchange.name, routing_key, false, props, &msg.body).await
    }

    pub(super) async fn amqp_subscribe(
        &self,
        exchange: &Exchange,
        pattern: &str,
    ) -> Result<Box<dyn Subscription>, BrokerError> {
        let (ch, mut consumer) = self.open_subscription(exchange, pattern).await?;
        let (tx, rx) = tokio::sync::mpsc::channel(1024);
        let (broker, exchange, pattern) = (self.clone(), exchange.clone(), pattern.to_owned());
        let feeder = tokio::spawn(async move {
            // The channel lives as long as this task; closing it deletes the queue.
            let mut _channel = ch;
            loop {
                while let Some(Ok(d)) = consumer.next().await {
                    let b = Broadcast { routing_key: d.routing_key.to_string(), body: d.data };
                    if tx.send(b).await.is_err() {
                        return;
                    }
                }
                // The connection (or the channel) is gone, and the queue with it: subscribe
                // again, on the next node of a cluster. What was broadcast meanwhile is lost.
                tracing::warn!(exchange = %exchange.name, "amqp: subscription lost; subscribing again");
                let mut backoff = Reconnect::default();
                (_channel, consumer) = loop {
                    if tx.is_closed() {
                        return;
                    }
                    match broker.open_subscription(&exchange, &pattern).await {
                        Ok(s) => break s,
                        Err(e) => {
                            backoff.pause("amqp subscription", &e).await;
                        }
                    }
                };
                tracing::info!(exchange = %exchange.name, "amqp: subscribed again");
            }
        });
        Ok(Box::new(ChannelSubscription::new(rx, Some(feeder))))
    }

    /// Declares a subscriber's queue, binds it with `pattern` and consumes it (without acks).
    async fn open_subscription(
        &self,
        exchange: &Exchange,
        pattern: &str,
    ) -> Result<(lapin::Channel, lapin::Consumer), BrokerError> {
        self.declare_broadcast_exchange(exchange).await?;
        let ch = self.channel().await?;
        let mut args = FieldTable::default();
        args.insert("x-message-ttl".into(), AMQPValue::LongLongInt(5_000));
        args.insert("x-expires".into(), AMQPValue::LongLongInt(60_000));
        let opts = QueueDeclareOptions { exclusive: true, auto_delete: true, ..Default::default() };
        let q = ch.queue_declare(short("")?, opts, args).await.map_err(failed("amqp: declare a subscription queue"))?;
        let queue = q.name().clone();
        let bind = QueueBindOptions::default();
        ch.queue_bind(queue.clone(), short(&exchange.name)?, short(pattern)?, bind, FieldTable::default())
            .await
            .map_err(failed("amqp: bind a subscription queue"))?;
        let opts = BasicConsumeOptions { no_ack: true, ..Default::default() };
        let consume = ch.basic_consume(queue, "".into(), opts, FieldTable::default()).await;
        let consumer = consume.map_err(failed("amqp: consume a subscription queue"))?;
        Ok((ch, consumer))
    }
}

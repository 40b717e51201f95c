//! Consuming over a connection: task consumers ([`RemoteConsumer`], `CONSUME`, deliveries settled
//! on the connection they came over) and broadcast subscriptions (`SUBSCRIBE`). Both subscribe
//! again after a reconnect.

use std::sync::Arc;

use async_trait::async_trait;
use celery_core::backoff::Reconnect;
use celery_core::broker::{Broadcast, ChannelSubscription, Settle};
use celery_core::flow::FairnessWeights;
use celery_core::protocol::Message;
use celery_core::{BrokerError, Consumer, Delivery};
use chrono::{DateTime, Utc};
use tokio::sync::mpsc;

use super::{call_on, Conn, Pushed, RemoteStore, Subscribed};
use crate::log::net::wire::{kind, settle, Enc};
use crate::log::storage::payload;

/// Subscribes a consumer of `queues`; pushed deliveries arrive on the returned channel.
/// The fairness weights follow the queues only when some are set (older servers then refuse them).
async fn subscribe(
    client: &RemoteStore,
    queues: &[String],
    prefetch: usize,
    weights: &FairnessWeights,
) -> Result<Subscribed, BrokerError> {
    client
        .push_request(kind::CONSUME, |e| {
            let e = queues.iter().fold(e.u32(prefetch as u32).u32(queues.len() as u32), |e, q| e.str(q));
            if weights.is_empty() {
                return e;
            }
            weights.iter().fold(e.u32(weights.iter().count() as u32), |e, (k, w)| e.str(&format!("{k}={w}")))
        })
        .await
}

/// A broadcast subscription over a connection (`SUBSCRIBE`); pushes arrive as `DELIVERY` frames
/// whose queue is the routing key. Subscribed when this returns; it subscribes again after a
/// reconnect (broadcasts sent while disconnected are missed: at most once).
pub(crate) async fn broadcast_subscription(
    client: Arc<RemoteStore>,
    exchange: String,
    pattern: String,
) -> Result<ChannelSubscription, BrokerError> {
    async fn sub(
        client: &RemoteStore,
        exchange: &str,
        pattern: &str,
    ) -> Result<mpsc::UnboundedReceiver<Pushed>, BrokerError> {
        Ok(client.push_request(kind::SUBSCRIBE, |e| e.str(exchange).str(pattern)).await?.1)
    }
    let mut prx = sub(&client, &exchange, &pattern).await?;
    let (tx, rx) = mpsc::channel(1024);
    let feeder = tokio::spawn(async move {
        let mut backoff = Reconnect::default();
        loop {
            while let Some(p) = prx.recv().await {
                let b = Broadcast { routing_key: p.queue, body: p.payload };
                if tx.send(b).await.is_err() {
                    return;
                }
            }
            let mut why = BrokerError::connection("the subscription's connection was lost");
            loop {
                backoff.pause("log broadcast subscription", &why).await;
                match sub(&client, &exchange, &pattern).await {
                    Ok(p) => {
                        backoff.reset();
                        prx = p;
                        break;
                    }
                    Err(e) => why = e,
                }
            }
        }
    });
    Ok(ChannelSubscription::new(rx, Some(feeder)))
}

/// A consumer over a connection.
#[derive(Debug)]
pub(crate) struct RemoteConsumer {
    client: Arc<RemoteStore>,
    queues: Vec<String>,
    prefetch: usize,
    weights: Arc<FairnessWeights>,
    sub: Option<Subscribed>,
    /// A resubscription in flight, kept across calls so that a `next()` dropped half-way (a
    /// timeout, a `select!`) never leaves a server-side consumer nobody reads.
    resubscribing: Option<tokio::task::JoinHandle<Result<Subscribed, BrokerError>>>,
    stopped: bool,
}

impl RemoteConsumer {
    pub(crate) async fn start(
        client: Arc<RemoteStore>,
        queues: &[String],
        prefetch: usize,
        weights: Arc<FairnessWeights>,
    ) -> Result<RemoteConsumer, BrokerError> {
        let sub = subscribe(&client, queues, prefetch, &weights).await?;
        Ok(RemoteConsumer {
            client,
            queues: queues.to_vec(),
            prefetch,
            weights,
            sub: Some(sub),
            resubscribing: None,
            stopped: false,
        })
    }
}

#[async_trait]
impl Consumer for RemoteConsumer {
    async fn next(&mut self) -> Option<Delivery> {
        let mut backoff = Reconnect::default();
        loop {
            if let Some((_, rx, conn)) = self.sub.as_mut() {
                let got = if self.stopped { rx.try_recv().ok() } else { rx.recv().await };
                if let Some(p) = got {
                    // Settled on the connection it came over: delivery ids are per connection,
                    // and a dead connection's deliveries were returned by the server already.
                    let settle = RemoteSettle { client: self.client.clone(), conn: conn.clone(), delivery: p.delivery };
                    let (size, payload) = (p.payload.len(), p.payload);
                    return Some(
                        Delivery::lazy(
                            Box::new(move || payload::decode(&payload)),
                            p.queue,
                            p.deliveries > 1,
                            Box::new(settle),
                        )
                        .with_size(size),
                    );
                }
                self.sub = None;
            }
            if self.stopped {
                return None;
            }
            let (client, queues, prefetch) = (self.client.clone(), self.queues.clone(), self.prefetch);
            let weights = self.weights.clone();
            let pending = self.resubscribing.get_or_insert_with(|| {
                tokio::spawn(async move { subscribe(&client, &queues, prefetch, &weights).await })
            });
            let result = pending.await.unwrap_or_else(|e| Err(BrokerError::connection_with("resubscribing", e)));
            self.resubscribing = None;
            match result {
                Ok(sub) => {
                    tracing::info!("log client: consuming again");
                    self.sub = Some(sub);
                }
                Err(e) => {
                    backoff.pause("log consumer", &e).await;
                }
            }
        }
    }

    fn stop(&mut self) {
        self.stopped = true;
        if let Some((id, _, conn)) = &self.sub {
            // Queued now, ahead of any settlement that follows on this connection (the server
            // handles both in order): a delivery requeued after the stop is not handed out again.
            let frame = Enc::frame(kind::STOP_CONSUME, self.client.id()).u64(*id).finish();
            let _ = conn.tx.send(frame);
        }
        if let Some(pending) = self.resubscribing.take() {
            // It may still succeed: then stop that subscription too.
            let client = self.client.clone();
            tokio::spawn(async move {
                if let Ok(Ok((id, _, _))) = pending.await {
                    let _ = client.call(kind::STOP_CONSUME, |e| e.u64(id)).await;
                }
            });
        }
    }

    async fn close(&mut self) {
        self.stopped = true;
    }
}

#[derive(Debug)]
struct RemoteSettle {
    client: Arc<RemoteStore>,
    conn: Arc<Conn>,
    delivery: u64,
}

impl RemoteSettle {
    async fn send(&self, how: u8, not_before: i64, data: &[u8]) -> Result<(), BrokerError> {
        let id = self.client.id();
        let frame = Enc::frame(kind::SETTLE, id).u64(self.delivery).u8(how).i64(not_before).bytes(data).finish();
        call_on(&self.conn, id, frame).await.map(|_| ())
    }
}

#[async_trait]
impl Settle for RemoteSettle {
    /// Queued on the connection, not answered: the server applies acks in the order it reads them.
    /// If the connection drops first, the server returns the delivery to its queue (at least once).
    async fn ack(&self) -> Result<(), BrokerError> {
        let frame = Enc::frame(kind::ACK, 0).u32(1).u64(self.delivery).finish();
        if !self.conn.is_alive() || self.conn.tx.send(frame).is_err() {
            return Err(self.conn.lost());
        }
        Ok(())
    }
    async fn requeue(&self) -> Result<(), BrokerError> {
        self.send(settle::REQUEUE, 0, b"").await
    }
    async fn defer(&self, msg: &Message, until: DateTime<Utc>) -> Result<(), BrokerError> {
        self.send(settle::DEFER, until.timestamp_millis(), &payload::encode(msg)).await
    }
    async fn dead_letter(&self, reason: &str) -> Result<(), BrokerError> {
        self.send(settle::DEAD_LETTER, 0, reason.as_bytes()).await
    }
}

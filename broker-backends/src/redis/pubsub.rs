//! Subscriptions that outlive their connection: broadcasts ([`super::RedisBroker`]'s
//! `subscribe`) and wake-ups ([`super::wake`]) both subscribe on a connection of their own and,
//! when it is lost, subscribe again (on the master the sentinels name then; on a cluster through
//! the next seed node) with capped backoff.

use std::future::Future;
use std::ops::ControlFlow;

use celery_core::backoff::Reconnect;
use futures::StreamExt;
use redis::aio::PubSub;

use super::connection::RedisConn;

/// Channels (or patterns) one `SUBSCRIBE` (`PSUBSCRIBE`) names at most.
const PER_COMMAND: usize = 1000;

/// The channels and patterns of a subscription.
#[derive(Debug, Clone, Default)]
pub(super) struct Channels {
    /// Exact channel names (`SUBSCRIBE`).
    pub(super) names: Vec<String>,
    /// Glob patterns (`PSUBSCRIBE`).
    pub(super) patterns: Vec<String>,
}

/// A new connection subscribed to `channels`.
pub(super) async fn subscribe(conn: &RedisConn, channels: &Channels) -> redis::RedisResult<PubSub> {
    let mut p = conn.client().get_async_pubsub().await?;
    for chunk in channels.names.chunks(PER_COMMAND) {
        p.subscribe(chunk).await?;
    }
    for chunk in channels.patterns.chunks(PER_COMMAND) {
        p.psubscribe(chunk).await?;
    }
    Ok(p)
}

/// Hands every message of the subscription to `on` (`Some`), subscribing again whenever the
/// connection is lost; `on(None)` follows each new subscription (not `first`, one the caller
/// made). Ends when `on` breaks. `what` names the subscription in logs.
pub(super) async fn follow<F, Fut>(
    conn: RedisConn,
    channels: Channels,
    mut first: Option<PubSub>,
    what: &'static str,
    mut on: F,
) where
    F: FnMut(Option<redis::Msg>) -> Fut,
    Fut: Future<Output = ControlFlow<()>>,
{
    let mut backoff = Reconnect::default();
    loop {
        let pubsub = match first.take() {
            Some(p) => p,
            None => match subscribe(&conn, &channels).await {
                Ok(p) => {
                    if backoff.attempts() > 0 {
                        tracing::info!("redis: {what} subscription restored");
                    }
                    backoff.reset();
                    if on(None).await.is_break() {
                        return;
                    }
                    p
                }
                Err(e) => {
                    conn.recheck(conn.generation()).await;
                    backoff.pause(&format!("redis: subscribe to {what}s"), &e).await;
                    continue;
                }
            },
        };
        let mut stream = pubsub.into_on_message();
        while let Some(m) = stream.next().await {
            if on(Some(m)).await.is_break() {
                return;
            }
        }
        tracing::warn!("redis: {what} subscription lost; subscribing again");
        conn.recheck(conn.generation()).await;
        // At least one pause between two subscriptions of a connection that keeps dropping.
        backoff.pause(&format!("redis: subscribe to {what}s"), &"the connection was lost").await;
    }
}

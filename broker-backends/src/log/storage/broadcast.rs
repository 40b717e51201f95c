//! Broadcasts (worker control, events): handed to the live subscribers whose pattern matches, in
//! memory only; nothing is stored, and a full subscriber misses it.

use celery_core::broker::Broadcast;
use celery_core::sync::lock;
use std::sync::Mutex;
use tokio::sync::mpsc;

use super::error::LogError;

/// Live broadcast subscriptions a store holds at most.
pub(crate) const MAX_SUBSCRIBERS: usize = 10_000;

/// The live subscriptions of a store: (exchange, pattern, sender).
#[derive(Debug, Default)]
pub(crate) struct Broadcasts {
    subscribers: Mutex<Vec<(String, String, mpsc::Sender<Broadcast>)>>,
}

impl Broadcasts {
    /// Hands a broadcast to the current subscribers whose pattern matches (a full one misses it).
    /// Exchange names and routing keys are at most 255 bytes (AMQP's limit), so matching stays
    /// cheap; it runs outside the subscribers' lock.
    pub(crate) fn send(&self, exchange: &str, routing_key: &str, body: &[u8]) -> Result<(), LogError> {
        check_name("exchange name", exchange)?;
        check_name("routing key", routing_key)?;
        let subs: Vec<_> = {
            let mut subs = lock(&self.subscribers);
            subs.retain(|(_, _, tx)| !tx.is_closed());
            subs.iter().filter(|(ex, ..)| ex == exchange).map(|(_, p, tx)| (p.clone(), tx.clone())).collect()
        };
        for (pattern, tx) in subs {
            if celery_core::routing::topic_matches(&pattern, routing_key) {
                let b = Broadcast { routing_key: routing_key.to_owned(), body: body.to_vec() };
                let _ = tx.try_send(b);
            }
        }
        Ok(())
    }

    /// Subscribes to the broadcasts of `exchange` matching `pattern` (each at most 255 bytes; at
    /// most [`MAX_SUBSCRIBERS`] live subscriptions).
    pub(crate) fn subscribe(&self, exchange: &str, pattern: &str) -> Result<mpsc::Receiver<Broadcast>, LogError> {
        check_name("exchange name", exchange)?;
        check_name("binding pattern", pattern)?;
        let mut subs = lock(&self.subscribers);
        subs.retain(|(_, _, tx)| !tx.is_closed());
        if subs.len() >= MAX_SUBSCRIBERS {
            return Err(LogError::Invalid(format!("too many broadcast subscriptions (limit {MAX_SUBSCRIBERS})")));
        }
        let (tx, rx) = mpsc::channel(1024);
        subs.push((exchange.to_owned(), pattern.to_owned(), tx));
        Ok(rx)
    }
}

/// Refuses exchange names, routing keys and patterns over AMQP's 255 bytes.
fn check_name(what: &'static str, s: &str) -> Result<(), LogError> {
    if s.len() > celery_core::routing::MAX_NAME {
        return Err(LogError::Invalid(format!(
            "{what} of {} bytes is over the limit of {} bytes",
            s.len(),
            celery_core::routing::MAX_NAME
        )));
    }
    Ok(())
}

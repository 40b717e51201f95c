//! `memory://`: an in-process broker for unit tests. Nothing survives the process.
//!
//! ETA: a message published with an eta in the future goes straight into the broker's delayed list
//! and onto its queue when due. This broker is never shared with Python Celery, so it need not put
//! the message on its queue with its `eta` header (as Redis and RabbitMQ do): this is the place a
//! worker would defer it to at once, without the hop. `purge` removes a queue's waiting and
//! delayed messages.
//!
//! ```
//! # tokio_test_block(async {
//! use celery_core::{Broker, protocol::Message, routing::Route, Signature};
//! let broker = broker_backends::memory::MemoryBroker::default();
//! let msg = Message::from_signature(&Signature::by_name("t")).unwrap();
//! broker.publish(&Route::queue("q"), &msg).await.unwrap();
//! assert_eq!(broker.queue_len("q").await.unwrap(), 1);
//! # });
//! # fn tokio_test_block<F: std::future::Future>(f: F) { tokio::runtime::Runtime::new().unwrap().block_on(f); }
//! ```

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use celery_core::broker::{dead_letter_queue, Settle};
use celery_core::capability::{Documents, Leases};
use celery_core::protocol::Message;
use celery_core::routing::Route;
use celery_core::sync::lock;
use celery_core::{Broker, BrokerError, Consumer, Delivery, ProtocolError};
use chrono::{DateTime, Utc};
use tokio::sync::{Notify, Semaphore};

#[derive(Debug, Default)]
struct State {
    queues: HashMap<String, VecDeque<Message>>,
    delayed: Vec<(DateTime<Utc>, String, Message)>,
    /// name -> (holder, expiry)
    leases: HashMap<String, (String, std::time::Instant)>,
    docs: HashMap<String, Vec<u8>>,
}

#[derive(Debug, Default)]
struct Inner {
    state: Mutex<State>,
    notify: Notify,
}

impl Inner {
    fn push(&self, queue: &str, msg: Message, front: bool) {
        let mut st = lock(&self.state);
        let q = st.queues.entry(queue.to_owned()).or_default();
        if front {
            q.push_front(msg)
        } else {
            q.push_back(msg)
        }
        drop(st);
        self.notify.notify_waiters();
    }

    fn promote(&self) -> Option<DateTime<Utc>> {
        let now = Utc::now();
        let mut st = lock(&self.state);
        let (due, rest): (Vec<_>, Vec<_>) =
            std::mem::take(&mut st.delayed).into_iter().partition(|(t, _, _)| *t <= now);
        st.delayed = rest;
        let next = st.delayed.iter().map(|(t, _, _)| *t).min();
        for (_, q, m) in due {
            st.queues.entry(q).or_default().push_back(m);
        }
        next
    }
}

/// An in-process broker.
#[derive(Debug, Clone, Default)]
pub struct MemoryBroker {
    inner: Arc<Inner>,
}

#[async_trait]
impl Broker for MemoryBroker {
    fn kind(&self) -> &'static str {
        "memory"
    }

    async fn publish(&self, route: &Route, msg: &Message) -> Result<(), BrokerError> {
        if !route.exchange.is_empty() {
            return Err(BrokerError::Unsupported {
                broker: "memory",
                option: format!("exchange `{}`", route.exchange),
            });
        }
        match msg.headers.eta {
            Some(t) if t > Utc::now() => {
                lock(&self.inner.state).delayed.push((t, route.routing_key.clone(), msg.clone()))
            }
            _ => self.inner.push(&route.routing_key, msg.clone(), false),
        }
        Ok(())
    }

    async fn consume(&self, queues: &[String], prefetch: usize) -> Result<Box<dyn Consumer>, BrokerError> {
        Ok(Box::new(MemoryConsumer {
            inner: self.inner.clone(),
            queues: queues.to_vec(),
            slots: Arc::new(Semaphore::new(prefetch.max(1))),
            stopped: false,
        }))
    }

    /// Removes the queue's waiting messages and its delayed ones; leased deliveries stay.
    async fn purge(&self, queue: &str) -> Result<u64, BrokerError> {
        let mut st = lock(&self.inner.state);
        let ready = st.queues.remove(queue).map_or(0, |q| q.len());
        let before = st.delayed.len();
        st.delayed.retain(|(_, q, _)| q != queue);
        Ok((ready + before - st.delayed.len()) as u64)
    }

    async fn queue_len(&self, queue: &str) -> Result<u64, BrokerError> {
        Ok(lock(&self.inner.state).queues.get(queue).map(|q| q.len()).unwrap_or(0) as u64)
    }

    async fn peek(&self, queue: &str, max: usize) -> Result<Vec<Result<Message, ProtocolError>>, BrokerError> {
        let st = lock(&self.inner.state);
        Ok(st.queues.get(queue).map(|q| q.iter().take(max).cloned().map(Ok).collect()).unwrap_or_default())
    }

    celery_core::offers!(leases, documents);
}
#[async_trait]
impl Leases for MemoryBroker {
    async fn lease(&self, name: &str, holder: &str, ttl: Duration) -> Result<bool, BrokerError> {
        let now = std::time::Instant::now();
        let mut st = lock(&self.inner.state);
        let free = st.leases.get(name).is_none_or(|(h, exp)| h == holder || *exp <= now);
        if free {
            st.leases.insert(name.to_owned(), (holder.to_owned(), now + celery_core::clock::ttl(ttl)));
        }
        Ok(free)
    }

    async fn release(&self, name: &str, holder: &str) -> Result<(), BrokerError> {
        let mut st = lock(&self.inner.state);
        if st.leases.get(name).is_some_and(|(h, _)| h == holder) {
            st.leases.remove(name);
        }
        Ok(())
    }
}

#[async_trait]
impl Documents for MemoryBroker {
    async fn load_doc(&self, key: &str) -> Result<Option<Vec<u8>>, BrokerError> {
        Ok(lock(&self.inner.state).docs.get(key).cloned())
    }

    async fn store_doc(&self, key: &str, doc: &[u8]) -> Result<(), BrokerError> {
        lock(&self.inner.state).docs.insert(key.to_owned(), doc.to_vec());
        Ok(())
    }
}

#[derive(Debug)]
struct MemoryConsumer {
    inner: Arc<Inner>,
    queues: Vec<String>,
    slots: Arc<Semaphore>,
    stopped: bool,
}

#[async_trait]
impl Consumer for MemoryConsumer {
    async fn next(&mut self) -> Option<Delivery> {
        let permit = self.slots.clone().acquire_owned().await.ok()?;
        loop {
            if self.stopped {
                return None;
            }
            let notified = self.inner.notify.notified();
            let next_due = self.inner.promote();
            let found = {
                let mut st = lock(&self.inner.state);
                self.queues
                    .iter()
                    .find_map(|q| st.queues.get_mut(q).and_then(|d| d.pop_front()).map(|m| (q.clone(), m)))
            };
            if let Some((queue, msg)) = found {
                permit.forget();
                let settle = MemorySettle {
                    inner: self.inner.clone(),
                    queue: queue.clone(),
                    msg: msg.clone(),
                    slots: self.slots.clone(),
                };
                return Some(Delivery::new(Ok(msg), queue, false, Box::new(settle)));
            }
            let wait = next_due
                .and_then(|t| (t - Utc::now()).to_std().ok())
                .unwrap_or(Duration::from_millis(50))
                .min(Duration::from_millis(50));
            let _ = tokio::time::timeout(wait, notified).await;
        }
    }

    fn stop(&mut self) {
        self.stopped = true;
    }

    async fn close(&mut self) {}
}

#[derive(Debug)]
struct MemorySettle {
    inner: Arc<Inner>,
    queue: String,
    msg: Message,
    slots: Arc<Semaphore>,
}

#[async_trait]
impl Settle for MemorySettle {
    async fn ack(&self) -> Result<(), BrokerError> {
        self.slots.add_permits(1);
        Ok(())
    }

    async fn requeue(&self) -> Result<(), BrokerError> {
        self.inner.push(&self.queue, self.msg.clone(), true);
        self.slots.add_permits(1);
        Ok(())
    }

    async fn defer(&self, msg: &Message, until: DateTime<Utc>) -> Result<(), BrokerError> {
        lock(&self.inner.state).delayed.push((until, self.queue.clone(), msg.clone()));
        self.slots.add_permits(1);
        Ok(())
    }

    async fn dead_letter(&self, reason: &str) -> Result<(), BrokerError> {
        let mut m = self.msg.clone();
        m.headers.extra.insert(celery_core::broker::DEAD_LETTER_REASON.into(), reason.into());
        self.inner.push(&dead_letter_queue(&self.queue), m, false);
        self.slots.add_permits(1);
        Ok(())
    }
}

impl MemoryBroker {
    /// A new in-process broker for a `memory://` URL, which takes no options.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let broker = broker_backends::memory::MemoryBroker::connect("memory://").await.unwrap();
    /// assert!(broker_backends::memory::MemoryBroker::connect("memory://?x=1").await.is_err());
    /// # }
    /// ```
    pub async fn connect(url: &str) -> Result<MemoryBroker, BrokerError> {
        celery_core::url::ServiceUrl::parse(url)?.finish()?;
        Ok(MemoryBroker::default())
    }
}

celery_core::register_broker!("memory" => MemoryBroker::connect);

#[cfg(test)]
mod tests {
    use super::*;
    use celery_core::Signature;

    #[test]
    fn memory_urls_take_no_options() {
        let rt = tokio::runtime::Runtime::new().unwrap();
        assert!(rt.block_on(celery_core::scheme::connect_broker("memory://")).is_ok());
        for (url, name) in [("memory://?x=1", "x"), ("memory://?bogus=1", "bogus")] {
            let e = rt.block_on(celery_core::scheme::connect_broker(url)).unwrap_err();
            assert!(e.is_fatal(), "{e:?}");
            assert!(e.to_string().contains(&format!("unknown memory:// option `{name}`")), "{e}");
        }
    }

    fn msg(i: i64) -> Message {
        Message::from_signature(&Signature::by_name("t").args(serde_json::json!([i]))).unwrap()
    }

    #[tokio::test]
    async fn purge_removes_waiting_and_delayed_messages_of_its_queue_only() {
        let broker = MemoryBroker::default();
        let later = |i| {
            let mut m = msg(i);
            m.headers.eta = Some(Utc::now() + chrono::Duration::seconds(60));
            m
        };
        broker.publish(&Route::queue("q"), &msg(1)).await.unwrap();
        broker.publish(&Route::queue("q"), &later(2)).await.unwrap();
        broker.publish(&Route::queue("other"), &later(3)).await.unwrap();
        assert_eq!(broker.queue_len("q").await.unwrap(), 1, "the delayed one is not ready");
        // A delivery deferred by a consumer is in the delayed list too.
        let mut c = broker.consume(&["q".to_string()], 1).await.unwrap();
        let mut d = c.next().await.unwrap();
        let m = d.take_message().unwrap();
        d.defer(&m, Utc::now() + chrono::Duration::seconds(60)).await.unwrap();
        assert_eq!(broker.purge("q").await.unwrap(), 2);
        assert_eq!(broker.purge("q").await.unwrap(), 0);
        assert_eq!(broker.purge("other").await.unwrap(), 1);
        assert!(lock(&broker.inner.state).delayed.is_empty());
    }

    #[tokio::test]
    async fn peek_shows_the_oldest_without_taking_them() {
        let broker = MemoryBroker::default();
        let sent: Vec<Message> = (0..3).map(msg).collect();
        for m in &sent {
            broker.publish(&Route::queue("q"), m).await.unwrap();
        }
        for _ in 0..3 {
            let seen = broker.peek("q", 2).await.unwrap();
            let ids: Vec<_> = seen.iter().map(|m| m.as_ref().unwrap().headers.id.clone()).collect();
            assert_eq!(ids, [sent[0].headers.id.clone(), sent[1].headers.id.clone()]);
        }
        assert_eq!(broker.queue_len("q").await.unwrap(), 3);
        assert!(broker.peek("none", 5).await.unwrap().is_empty());
        let mut c = broker.consume(&["q".to_string()], 1).await.unwrap();
        let mut d = c.next().await.unwrap();
        assert_eq!(d.message().as_ref().unwrap().headers.id, sent[0].headers.id, "still the oldest");
        assert!(!d.redelivered);
    }
}

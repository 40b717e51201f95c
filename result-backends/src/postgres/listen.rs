//! Waiting for results: one connection per backend `LISTEN`s on [`CHANNEL`], where the trigger on
//! the result table announces every row change with the task id, and wakes that id's waiters. The
//! connection is reopened with backoff when it drops; every waiter is woken then, to read its row
//! again, and waiters also poll once a second, so a result is never missed while reconnecting.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;
use tokio_postgres::AsyncMessage;

use super::connect::{listening, Tls};
use super::schema::CHANNEL;
use super::url::ConnectOptions;

/// Task id -> (waiters, a counter bumped on each wake-up).
#[derive(Debug, Default)]
pub(crate) struct Waiters(Mutex<HashMap<String, (usize, watch::Sender<u64>)>>);

/// The most distinct task ids waited for at once per backend.
pub(crate) const MAX_WAITED_IDS: usize = 1_000_000;

impl Waiters {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, (usize, watch::Sender<u64>)>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a waiter for `task_id`; None when too many ids are waited for already (the
    /// caller then only polls).
    pub(crate) fn register(&self, task_id: &str) -> Option<watch::Receiver<u64>> {
        let mut w = self.map();
        if let Some((n, tx)) = w.get_mut(task_id) {
            *n += 1;
            return Some(tx.subscribe());
        }
        if w.len() >= MAX_WAITED_IDS {
            return None;
        }
        let (tx, rx) = watch::channel(0);
        w.insert(task_id.to_owned(), (1, tx));
        Some(rx)
    }

    pub(crate) fn unregister(&self, task_id: &str) {
        let mut w = self.map();
        if let Some((n, _)) = w.get_mut(task_id) {
            *n -= 1;
            if *n == 0 {
                w.remove(task_id);
            }
        }
    }

    fn wake(&self, task_id: &str) {
        if let Some((_, tx)) = self.map().get(task_id) {
            tx.send_modify(|v| *v += 1);
        }
    }

    fn wake_all(&self) {
        for (_, tx) in self.map().values() {
            tx.send_modify(|v| *v += 1);
        }
    }
}

/// A registered waiter, unregistered when dropped.
pub(crate) struct Registered<'a> {
    pub(crate) waiters: &'a Waiters,
    pub(crate) task_id: &'a str,
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        self.waiters.unregister(self.task_id);
    }
}

/// Keeps one listening connection, for as long as the task runs (the backend aborts it on drop).
pub(crate) async fn listen(opts: ConnectOptions, tls: Tls, waiters: Arc<Waiters>) {
    let mut backoff = celery_core::backoff::Reconnect::default();
    loop {
        let listen = format!("LISTEN {CHANNEL}");
        let (client, driver, mut rx) = listening(&opts, &tls, &listen, &mut backoff, "postgresql results").await;
        backoff.reset();
        // Rows may have changed while no one listened.
        waiters.wake_all();
        while let Some(msg) = rx.recv().await {
            if let AsyncMessage::Notification(n) = msg {
                waiters.wake(n.payload());
            }
        }
        driver.abort();
        drop(client);
        tracing::warn!("postgresql results: listener connection lost; reconnecting");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waiters_are_counted_and_woken() {
        let w = Waiters::default();
        let mut a = w.register("t").unwrap();
        let b = w.register("t").unwrap();
        w.wake("t");
        assert!(a.has_changed().unwrap() && b.has_changed().unwrap());
        a.mark_unchanged();
        w.unregister("t");
        w.wake_all();
        assert!(a.has_changed().unwrap());
        w.unregister("t");
        assert!(w.map().is_empty());
    }
}

//! Wake-ups: one connection per broker `LISTEN`s on the schema's two channels (tasks and
//! broadcasts) and hands every notification to whoever subscribed in this process (consumers,
//! broadcast subscriptions). The connection is reopened with backoff when it drops; while it is
//! down [`Listener::connected`] says so (consumers then poll once a second), and once it is back a
//! wake-up for every queue is sent (rows may have arrived unannounced meanwhile).

use std::sync::Arc;

use tokio::sync::{broadcast, watch};
use tokio_postgres::AsyncMessage;

use super::connect::{listening, Tls};
use super::url::ConnectOptions;

/// How many notifications a slow receiver may fall behind before it misses some (a consumer
/// that lags only fetches once more; a subscription loses broadcasts, which are at most once).
const BACKLOG: usize = 8192;

/// Which channel a notification came on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Channel {
    /// Messages arrived on the queue named by the payload.
    Tasks,
    /// A broadcast (see the broker's `broadcast`).
    Broadcasts,
    /// The listener (re)connected: anything may have happened.
    Reconnected,
}

/// One notification.
#[derive(Debug, Clone)]
pub(crate) struct Note {
    pub(crate) channel: Channel,
    pub(crate) payload: Arc<str>,
}

/// The running listener; aborted when dropped.
#[derive(Debug)]
pub(crate) struct Listener {
    notes: broadcast::Sender<Note>,
    connected: watch::Receiver<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Listener {
    /// Starts listening on `tasks` and `broadcasts` (channel names, from the broker's own query).
    pub(crate) fn start(opts: ConnectOptions, tls: Tls, tasks: String, broadcasts: String) -> Listener {
        let (notes, _) = broadcast::channel(BACKLOG);
        let (up, connected) = watch::channel(false);
        let task = tokio::spawn(run(opts, tls, tasks, broadcasts, notes.clone(), up));
        Listener { notes, connected, task }
    }

    /// Notifications from now on.
    pub(crate) fn subscribe(&self) -> broadcast::Receiver<Note> {
        self.notes.subscribe()
    }

    /// Whether the listening connection is up (else wake-ups may be missed: poll).
    pub(crate) fn connected(&self) -> watch::Receiver<bool> {
        self.connected.clone()
    }
}

/// `"name"`, for a channel name built by the broker (letters, digits, `_`).
fn quoted(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

async fn run(
    opts: ConnectOptions,
    tls: Tls,
    tasks: String,
    broadcasts: String,
    notes: broadcast::Sender<Note>,
    up: watch::Sender<bool>,
) {
    let mut backoff = celery_core::backoff::Reconnect::default();
    loop {
        let listen = format!("LISTEN {}; LISTEN {}", quoted(&tasks), quoted(&broadcasts));
        let (client, driver, mut rx) = listening(&opts, &tls, &listen, &mut backoff, "postgresql broker").await;
        if backoff.attempts() > 0 {
            crate::reconnected("postgres");
        }
        backoff.reset();
        let _ = up.send(true);
        let _ = notes.send(Note { channel: Channel::Reconnected, payload: Arc::from("") });
        while let Some(msg) = rx.recv().await {
            if let AsyncMessage::Notification(n) = msg {
                let channel = if n.channel() == tasks { Channel::Tasks } else { Channel::Broadcasts };
                // No receiver is fine: nobody in this process waits right now.
                let _ = notes.send(Note { channel, payload: Arc::from(n.payload()) });
            }
        }
        let _ = up.send(false);
        driver.abort();
        drop(client);
        tracing::warn!("postgresql broker: listener connection lost; reconnecting (polling meanwhile)");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_names_are_quoted() {
        assert_eq!(quoted("celery_rs_t_ab12"), "\"celery_rs_t_ab12\"");
        assert_eq!(quoted("a\"b"), "\"a\"\"b\"");
    }
}

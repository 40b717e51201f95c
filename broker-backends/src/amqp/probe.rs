//! Calls that RabbitMQ answers by closing their channel when the queue is missing (a passive
//! `queue.declare` for a depth): AMQP has no other way to say "no such queue". They run on a
//! connection of their own, one call at a time, so the closed channels never touch the connection
//! that publishes and consumes, and that connection is replaced after [`CLOSES_PER_CONNECTION`]
//! closed channels: lapin 4 numbers channels upwards and, once the numbers wrap at RabbitMQ's
//! `channel_max` (2,047), a new channel that reuses the number of one the server closed fails with
//! that old channel's error (seen here: a purge of 93 queues, when it still purged each of their
//! 22 delay levels this way, broke channel creation on the shared connection for good; purge now
//! deletes the levels, which RabbitMQ answers for a missing queue too).

use std::future::Future;

use celery_core::BrokerError;
use lapin::{Channel, Connection};

use super::error::{broker_error, failed};
use super::Nodes;

/// Closed channels after which the probe connection is replaced (below `channel_max`).
const CLOSES_PER_CONNECTION: u32 = 1_000;

/// The probe connection, opened on first use and after a loss (on the node in use, as the
/// broker's own connection).
#[derive(Debug, Default)]
pub(super) struct Probes {
    state: tokio::sync::Mutex<Option<Probe>>,
}

#[derive(Debug)]
struct Probe {
    conn: Connection,
    channel: Option<Channel>,
    closed: u32,
}

impl Probes {
    /// Runs `call` on the probe channel: `Ok(None)` when RabbitMQ refused it with a channel-level
    /// error (the queue is missing), which closed that channel.
    pub(super) async fn run<T, F, Fut>(
        &self,
        nodes: &Nodes,
        context: &'static str,
        call: F,
    ) -> Result<Option<T>, BrokerError>
    where
        F: FnOnce(Channel) -> Fut,
        Fut: Future<Output = lapin::Result<T>>,
    {
        let mut guard = self.state.lock().await;
        if let Some(old) = guard.take_if(|p| !p.conn.status().connected() || p.closed >= CLOSES_PER_CONNECTION) {
            let _ = old.conn.close(200, "replaced".into()).await;
        }
        let probe = match guard.as_mut() {
            Some(p) => p,
            None => guard.insert(Probe { conn: nodes.connect().await?, channel: None, closed: 0 }),
        };
        let ch = match &probe.channel {
            Some(ch) if ch.status().connected() => ch.clone(),
            _ => {
                let ch = probe.conn.create_channel().await.map_err(failed("amqp: open a probe channel"))?;
                probe.channel.insert(ch).clone()
            }
        };
        match call(ch).await {
            Ok(v) => Ok(Some(v)),
            Err(e) if e.is_amqp_soft_error() => {
                probe.closed += 1;
                probe.channel = None;
                Ok(None)
            }
            Err(e) => Err(broker_error(context, e)),
        }
    }
}

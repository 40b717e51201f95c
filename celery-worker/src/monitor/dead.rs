//! Dead letters for the dashboard: list them, send one back to its queue, or discard it. Each
//! operation leases the dead-letter queue's messages for a moment through an ordinary consumer and
//! returns the ones it does not act on, so nothing is lost if the dashboard dies meanwhile.

use std::time::Duration;

use celery_core::broker::{dead_letter_queue, DEAD_LETTER_QUEUE, DEAD_LETTER_REASON};
use celery_core::routing::Route;
use celery_core::{App, Delivery};
use serde::Serialize;

/// How many dead letters one look takes at most.
const MAX: usize = 200;
/// How long to wait for the next one before concluding the queue is drained.
const QUIET: Duration = Duration::from_millis(300);

/// One dead letter.
#[derive(Debug, Clone, Serialize)]
pub struct DeadLetter {
    /// The task id (empty when undecodable).
    pub id: String,
    /// The task name.
    pub task: String,
    /// Why it was dead-lettered.
    pub reason: String,
    /// Its arguments, as sent.
    pub args: String,
    /// False when the message cannot be decoded (it can only be discarded).
    pub retryable: bool,
}

fn view(d: &mut Delivery) -> DeadLetter {
    match d.message() {
        Ok(m) => DeadLetter {
            id: m.headers.id.clone(),
            task: m.headers.task.clone(),
            reason: m.headers.extra.get(DEAD_LETTER_REASON).and_then(|v| v.as_str()).unwrap_or_default().to_owned(),
            args: m.headers.argsrepr.clone().unwrap_or_default(),
            retryable: true,
        },
        Err(e) => DeadLetter {
            id: String::new(),
            task: String::new(),
            reason: format!("undecodable: {e}"),
            args: String::new(),
            retryable: false,
        },
    }
}

/// What to do with the dead letter of a task id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Publish it to its queue again and remove it here.
    Retry,
    /// Remove it.
    Discard,
}

/// Leases the dead letters of `queue`, lets `act` settle each (returning it when `act` does not),
/// and returns what `act` saw.
async fn with_dead_letters(
    app: &App,
    queue: &str,
    mut act: impl FnMut(&DeadLetter) -> Option<Action>,
) -> Result<(Vec<DeadLetter>, usize), String> {
    let dlq = dead_letter_queue(queue);
    let mut consumer = app.broker().consume(std::slice::from_ref(&dlq), MAX).await.map_err(|e| e.to_string())?;
    let mut held = Vec::new();
    while held.len() < MAX {
        match tokio::time::timeout(QUIET, consumer.next()).await {
            Ok(Some(d)) => held.push(d),
            _ => break,
        }
    }
    consumer.stop();
    let (mut seen, mut acted) = (Vec::new(), 0);
    for mut d in held {
        let v = view(&mut d);
        let result = match act(&v) {
            Some(Action::Retry) if v.retryable => retry(app, queue, d).await,
            Some(Action::Discard) => d.ack().await.map_err(|e| e.to_string()),
            _ => {
                seen.push(v);
                d.requeue().await.map_err(|e| e.to_string())?;
                continue;
            }
        };
        result?;
        acted += 1;
    }
    consumer.close().await;
    Ok((seen, acted))
}

async fn retry(app: &App, queue: &str, mut d: Delivery) -> Result<(), String> {
    let mut msg = d.take_message().map_err(|e| e.to_string())?;
    let target = msg
        .headers
        .extra
        .remove(DEAD_LETTER_QUEUE)
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_else(|| queue.to_owned());
    msg.headers.extra.remove(DEAD_LETTER_REASON);
    app.broker().publish(&Route::queue(target), &msg).await.map_err(|e| e.to_string())?;
    d.ack().await.map_err(|e| e.to_string())
}

/// The dead letters of `queue` (at most 200), oldest first.
pub async fn list(app: &App, queue: &str) -> Result<Vec<DeadLetter>, String> {
    Ok(with_dead_letters(app, queue, |_| None).await?.0)
}

/// Retries or discards the dead letter of task `id` in `queue`; false when there is none.
pub async fn act(app: &App, queue: &str, id: &str, action: Action) -> Result<bool, String> {
    let (_, acted) = with_dead_letters(app, queue, |d| (d.id == id).then_some(action)).await?;
    Ok(acted > 0)
}

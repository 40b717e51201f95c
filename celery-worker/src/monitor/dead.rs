//! Dead letters for the dashboard: list them, send one back to its queue, or discard it.
//!
//! Listing only looks ([`Broker::peek`](celery_core::Broker::peek)): nothing is taken, leased or
//! counted as a delivery, so the page may refresh it forever and the queue stays as it was. On a
//! broker that cannot look without taking (RabbitMQ) listing fails with that broker's reason and
//! the page shows the depth only.
//!
//! Acting on the dead letter of task `id` looks first, so nothing is taken when it is not there.
//! Then it takes the dead-letter queue's messages in order until `id` (never more than it saw in
//! front of it, plus the one): that one is retried (published to its queue, then acked) or
//! discarded (acked). Each one passed over is stored again, unchanged, as a new message at the back
//! of the dead-letter queue and only then acked: a broker that counts deliveries (the log broker,
//! and RabbitMQ's quorum queues) counts none against it, so no dead letter is ever dead-lettered
//! again by the dashboard, and a crash in between leaves a duplicate, never a loss. One that cannot
//! be decoded cannot be stored again and is requeued as it is.
//!
//! [`act_matching`] does the same for every dead letter a filter matches (task name, id, reason or
//! arguments), in one pass over the oldest [`MAX`].

use std::time::Duration;

use celery_core::broker::{dead_letter_queue, DEAD_LETTER_QUEUE, DEAD_LETTER_REASON};
use celery_core::protocol::Message;
use celery_core::routing::Route;
use celery_core::{App, Delivery, ProtocolError};
use serde::Serialize;

/// How many dead letters one look shows, and one action passes over, at most.
pub const MAX: usize = 200;
/// How long an action waits for the next dead letter before concluding it is gone.
const QUIET: Duration = Duration::from_millis(500);

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

fn view(m: &Result<Message, ProtocolError>) -> DeadLetter {
    match m {
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

/// The dead letters of `queue` (at most [`MAX`]), oldest first. Only looks: nothing is taken or
/// counted.
pub async fn list(app: &App, queue: &str) -> Result<Vec<DeadLetter>, String> {
    let found = app.broker().peek(&dead_letter_queue(queue), MAX).await.map_err(|e| e.to_string())?;
    Ok(found.iter().map(view).collect())
}

/// Retries or discards the dead letter of task `id` in `queue`; false when there is none. The
/// dead letters in front of it are stored again at the back, uncounted (see the module header).
pub async fn act(app: &App, queue: &str, id: &str, action: Action) -> Result<bool, String> {
    let dlq = dead_letter_queue(queue);
    let seen = list(app, queue).await?;
    let Some(ahead) = seen.iter().position(|d| d.id == id) else {
        return Ok(false);
    };
    let mut consumer = app.broker().consume(std::slice::from_ref(&dlq), ahead + 1).await.map_err(|e| e.to_string())?;
    let mut passed = Vec::new();
    let mut target = None;
    while target.is_none() && passed.len() < MAX {
        let Ok(Some(mut d)) = tokio::time::timeout(QUIET, consumer.next()).await else { break };
        if d.message().as_ref().is_ok_and(|m| m.headers.id == id) {
            target = Some(d);
        } else {
            passed.push(d);
        }
    }
    consumer.stop();
    // What the consumer fetched and did not hand out yet goes back like the others.
    while let Ok(Some(d)) = tokio::time::timeout(QUIET, consumer.next()).await {
        passed.push(d);
    }
    let mut result = Ok(());
    for d in passed {
        if let Err(e) = restore(app, &dlq, d).await {
            result = Err(e);
        }
    }
    let acted = match target {
        Some(d) => {
            let done = match action {
                Action::Retry => retry(app, queue, d).await,
                Action::Discard => d.ack().await.map_err(|e| e.to_string()),
            };
            result = result.and(done);
            true
        }
        None => false,
    };
    consumer.close().await;
    result.map(|()| acted)
}

/// The longest filter [`act_matching`] takes (the monitor's `?match=`, the CLI's `--match`).
pub const MAX_FILTER: usize = 256;

/// What [`act_matching`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Bulk {
    /// Dead letters retried or discarded.
    pub acted: usize,
    /// Dead letters looked at that did not match, stored again at the back (uncounted).
    pub kept: usize,
}

/// Whether dead letter `d` matches `filter`: empty matches all; otherwise a case-insensitive
/// substring of its task name, id, reason or arguments. An undecodable one matches only the empty
/// filter.
pub fn matches(d: &DeadLetter, filter: &str) -> bool {
    if filter.is_empty() {
        return true;
    }
    let f = filter.to_lowercase();
    d.retryable && [&d.task, &d.id, &d.reason, &d.args].iter().any(|s| s.to_lowercase().contains(&f))
}

/// Retries or discards every dead letter of `queue` that [`matches`] `filter`, among the oldest
/// [`MAX`] (call again for more): those are taken in order; the matching ones are acted on, the
/// others stored again at the back, uncounted (see the module header). An undecodable one is
/// discarded by an empty filter's discard, else requeued as it is.
pub async fn act_matching(app: &App, queue: &str, filter: &str, action: Action) -> Result<Bulk, String> {
    let dlq = dead_letter_queue(queue);
    let seen = list(app, queue).await?.len();
    let mut bulk = Bulk::default();
    if seen == 0 {
        return Ok(bulk);
    }
    let mut consumer = app.broker().consume(std::slice::from_ref(&dlq), seen).await.map_err(|e| e.to_string())?;
    let mut taken = Vec::new();
    while taken.len() < seen {
        let Ok(Some(d)) = tokio::time::timeout(QUIET, consumer.next()).await else { break };
        taken.push(d);
    }
    consumer.stop();
    let mut extra = Vec::new();
    while let Ok(Some(d)) = tokio::time::timeout(QUIET, consumer.next()).await {
        extra.push(d);
    }
    let mut result = Ok(());
    for mut d in taken {
        let hit = matches(&view(d.message()), filter);
        let (acted, done) = match (hit, action, d.message().is_ok()) {
            (true, Action::Retry, true) => (true, retry(app, queue, d).await),
            (true, Action::Discard, _) => (true, d.ack().await.map_err(|e| e.to_string())),
            _ => (false, restore(app, &dlq, d).await),
        };
        match (acted, done.is_ok()) {
            (true, true) => bulk.acted += 1,
            (false, _) => bulk.kept += 1,
            (true, false) => {}
        }
        result = result.and(done);
    }
    for d in extra {
        result = result.and(restore(app, &dlq, d).await);
    }
    consumer.close().await;
    result.map(|()| bulk)
}

/// Puts a dead letter passed over back: stored again as new (no delivery counted), then acked;
/// requeued as it is when it cannot be decoded.
async fn restore(app: &App, dlq: &str, mut d: Delivery) -> Result<(), String> {
    match d.take_message() {
        Ok(msg) => {
            app.broker().publish(&Route::queue(dlq), &msg).await.map_err(|e| e.to_string())?;
            d.ack().await.map_err(|e| e.to_string())
        }
        Err(_) => d.requeue().await.map_err(|e| e.to_string()),
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use celery_core::Signature;

    /// Five dead letters of `q` on a log broker that dead-letters on the second delivery.
    async fn setup(tag: &str) -> (App, Vec<String>, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(format!("dead-{tag}-{}", uuid::Uuid::new_v4().simple()));
        let url = format!("log://{}?max_deliveries=1", dir.display());
        let app = App::connect(&url, "memory://").await.unwrap();
        let mut ids = Vec::new();
        for i in 0..5 {
            let mut m = Message::from_signature(&Signature::by_name("add").args(serde_json::json!([i]))).unwrap();
            m.headers.extra.insert(DEAD_LETTER_REASON.into(), "bad".into());
            m.headers.extra.insert(DEAD_LETTER_QUEUE.into(), "q".into());
            ids.push(m.headers.id.clone());
            app.broker().publish(&Route::queue("q.dead"), &m).await.unwrap();
        }
        (app, ids, dir)
    }

    fn ids_of(list: &[DeadLetter]) -> Vec<String> {
        list.iter().map(|d| d.id.clone()).collect()
    }

    #[tokio::test]
    async fn listing_takes_and_counts_nothing() {
        let (app, ids, dir) = setup("list").await;
        for _ in 0..5 {
            let list = list(&app, "q").await.unwrap();
            assert_eq!(ids_of(&list), ids);
            assert!(list.iter().all(|d| d.reason == "bad" && d.retryable && d.task == "add"));
        }
        assert_eq!(app.broker().queue_len("q.dead").await.unwrap(), 5);
        assert_eq!(app.broker().queue_len("q.dead.dead").await.unwrap(), 0);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test]
    async fn bulk_actions_take_only_the_matching_ones() {
        let (app, ids, dir) = setup("bulk").await;
        // Arguments [0] .. [4]: "[3]" matches one.
        let mut m = Message::from_signature(&Signature::by_name("other").args(serde_json::json!(["x"]))).unwrap();
        m.headers.extra.insert(DEAD_LETTER_REASON.into(), "worse".into());
        app.broker().publish(&Route::queue("q.dead"), &m).await.unwrap();
        let bulk = act_matching(&app, "q", "OTHER", Action::Discard).await.unwrap();
        assert_eq!(bulk, Bulk { acted: 1, kept: 5 });
        assert_eq!(ids_of(&list(&app, "q").await.unwrap()), ids, "the others stay, in order");
        let bulk = act_matching(&app, "q", "add", Action::Retry).await.unwrap();
        assert_eq!(bulk, Bulk { acted: 5, kept: 0 });
        assert!(list(&app, "q").await.unwrap().is_empty());
        assert_eq!(app.broker().queue_len("q").await.unwrap(), 5, "all back in their queue");
        assert_eq!(app.broker().queue_len("q.dead.dead").await.unwrap(), 0, "none dead-lettered again");
        let _ = std::fs::remove_dir_all(dir);
    }

    /// Acting on the last dead letter, again and again, passes over the others each time; with
    /// `max_deliveries=1` a counted pass would dead-letter them to `q.dead.dead`.
    #[tokio::test]
    async fn acting_on_one_counts_nothing_against_the_others() {
        let (app, ids, dir) = setup("act").await;
        assert!(act(&app, "q", &ids[4], Action::Discard).await.unwrap());
        assert!(act(&app, "q", &ids[3], Action::Retry).await.unwrap());
        assert!(act(&app, "q", &ids[2], Action::Discard).await.unwrap());
        assert!(!act(&app, "q", &ids[2], Action::Discard).await.unwrap(), "already gone");
        assert!(!act(&app, "q", "no-such-id", Action::Retry).await.unwrap());
        assert_eq!(ids_of(&list(&app, "q").await.unwrap()), ids[..2], "the others stay, in order");
        assert_eq!(app.broker().queue_len("q.dead.dead").await.unwrap(), 0, "none dead-lettered again");

        // The retried one is back in `q`, without the dead-letter headers.
        let back = app.broker().peek("q", 10).await.unwrap();
        let back = back[0].as_ref().unwrap();
        assert_eq!(back.headers.id, ids[3]);
        assert!(!back.headers.extra.contains_key(DEAD_LETTER_REASON));

        // The ones passed over come to a consumer as first deliveries.
        let mut c = app.broker().consume(&["q.dead".to_string()], 4).await.unwrap();
        for _ in 0..2 {
            let d = tokio::time::timeout(Duration::from_secs(5), c.next()).await.unwrap().unwrap();
            assert!(!d.redelivered);
            d.ack().await.unwrap();
        }
        c.close().await;
        let _ = std::fs::remove_dir_all(dir);
    }
}

//! Celery's event wire format, shared by producers (`task-sent`) and workers: a JSON document with
//! `type`, `hostname`, `timestamp`, `utcoffset`, `pid` and `clock`, broadcast on the durable topic
//! exchange `celeryev` with the type as routing key (`task-sent` -> `task.sent`).
//!
//! ```
//! let e = celery_core::event::event("task-sent", "gen1@host", 7, serde_json::json!({"uuid": "t1"}));
//! assert_eq!(e["type"], "task-sent");
//! assert_eq!(celery_core::event::routing_key(&e), "task.sent");
//! ```

use serde_json::{Map, Value};

use crate::protocol::{Headers, Message, Properties};
use crate::routing::{Exchange, ExchangeKind};

/// The exchange Celery sends events to (a durable topic exchange).
pub fn exchange() -> Exchange {
    Exchange::new("celeryev", ExchangeKind::Topic)
}

/// Seconds since the epoch, as Python's `time.time()`.
pub fn now() -> f64 {
    chrono::Utc::now().timestamp_micros() as f64 / 1e6
}

/// An event of `kind` from `hostname` with `fields`, plus the common fields.
pub fn event(kind: &str, hostname: &str, clock: u64, fields: Value) -> Value {
    let mut e = match fields {
        Value::Object(m) => m,
        _ => Map::new(),
    };
    e.insert("type".into(), kind.into());
    e.insert("hostname".into(), hostname.into());
    e.insert("timestamp".into(), now().into());
    e.insert("utcoffset".into(), 0.into());
    e.insert("pid".into(), std::process::id().into());
    e.insert("clock".into(), clock.into());
    Value::Object(e)
}

/// The routing key of an event: its type with `.` for `-`.
pub fn routing_key(event: &Value) -> String {
    event["type"].as_str().unwrap_or_default().replace('-', ".")
}

/// An event as a message: the document as the JSON body, `hostname` as a header.
pub fn message(event: &Value) -> Message {
    message_of(event["hostname"].clone(), serde_json::to_vec(event).unwrap_or_default())
}

/// An event already encoded as its JSON document, as a message (what [`message`] makes of it).
pub fn encoded_message(hostname: &str, body: Vec<u8>) -> Message {
    message_of(hostname.into(), body)
}

/// The routing key of a batch of task events: Celery's dispatcher sends its buffered `task` group
/// with this key (`celery events` and Flower read such a batch as its events, in order).
pub const TASK_BATCH_ROUTING_KEY: &str = "task.multi";

/// Task events of one worker as one message, as Celery's dispatcher sends a buffered group: the
/// JSON list of the documents (each given already encoded) as the body, `hostname` as a header.
/// One broadcast then carries many events; send it with [`TASK_BATCH_ROUTING_KEY`].
///
/// ```
/// let events: Vec<Vec<u8>> = ["task-received", "task-started"]
///     .iter()
///     .map(|kind| serde_json::to_vec(&celery_core::event::event(kind, "w1@host", 1, serde_json::json!({"uuid": "t1"}))).unwrap())
///     .collect();
/// let msg = celery_core::event::batch_message("w1@host", &events);
/// let body: serde_json::Value = serde_json::from_slice(&msg.body).unwrap();
/// assert_eq!(body[1]["type"], "task-started");
/// assert_eq!(msg.headers.extra["hostname"], "w1@host");
/// ```
pub fn batch_message(hostname: &str, encoded: &[Vec<u8>]) -> Message {
    let len = encoded.iter().map(|e| e.len() + 1).sum::<usize>() + 1;
    let mut body = Vec::with_capacity(len);
    body.push(b'[');
    for (i, e) in encoded.iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        body.extend_from_slice(e);
    }
    body.push(b']');
    message_of(hostname.into(), body)
}

fn message_of(hostname: Value, body: Vec<u8>) -> Message {
    let mut headers = Headers { id: uuid::Uuid::new_v4().to_string(), ..Headers::default() };
    headers.extra.insert("hostname".into(), hostname);
    Message { headers, properties: Properties::default(), body }
}

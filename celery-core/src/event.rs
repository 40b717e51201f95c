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
    let mut headers = Headers { id: uuid::Uuid::new_v4().to_string(), ..Headers::default() };
    headers.extra.insert("hostname".into(), event["hostname"].clone());
    Message { headers, properties: Properties::default(), body: serde_json::to_vec(event).unwrap_or_default() }
}

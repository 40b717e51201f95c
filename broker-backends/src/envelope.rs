//! Kombu's envelope: the JSON document a Redis queue list holds, and what the log broker stores as a
//! record's payload.
//!
//! `{"body": base64(body), "content-encoding", "content-type", "headers", "properties":
//! {"correlation_id", "reply_to", "delivery_mode", "delivery_info": {"exchange", "routing_key"},
//! "priority", "body_encoding": "base64", "delivery_tag"}}`.
//!
//! Priorities: Kombu on Redis treats 0 as the highest. Our API treats 9 as the highest on every
//! broker, so the envelope carries `9 - priority` and decoding maps it back.

use base64::Engine;
use celery_core::protocol::{
    check_content_type, Headers, JsonStr, Message, Properties, CONTENT_ENCODING, CONTENT_TYPE,
};
use celery_core::ProtocolError;

use serde_json::value::RawValue;
use serde_json::{json, Map, Value};

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// Kombu's highest priority value.
pub(crate) const MAX_PRIORITY: u8 = 9;

/// Encodes a message for the queue list `routing_key`.
pub(crate) fn encode(msg: &Message, exchange: &str, routing_key: &str) -> String {
    let kombu_priority = msg.properties.priority.map(|p| MAX_PRIORITY - p.min(MAX_PRIORITY)).unwrap_or(0);
    let mut props = Map::new();
    props.insert("correlation_id".into(), msg.properties.correlation_id.clone().into());
    props.insert("reply_to".into(), msg.properties.reply_to.clone().map(Value::String).unwrap_or(Value::Null));
    props.insert("delivery_mode".into(), 2.into());
    props.insert("delivery_info".into(), json!({"exchange": exchange, "routing_key": routing_key}));
    props.insert("priority".into(), kombu_priority.into());
    props.insert("body_encoding".into(), "base64".into());
    props.insert("delivery_tag".into(), uuid::Uuid::new_v4().to_string().into());
    let env = json!({
        "body": B64.encode(&msg.body),
        "content-encoding": CONTENT_ENCODING,
        "content-type": CONTENT_TYPE,
        "headers": Value::Object(msg.headers.to_json()),
        "properties": Value::Object(props),
    });
    env.to_string()
}

/// The Kombu priority bucket (0, 3, 6, 9) of an envelope's `properties.priority`.
pub(crate) fn bucket_of(kombu_priority: u8) -> u8 {
    match kombu_priority {
        0..=2 => 0,
        3..=5 => 3,
        6..=8 => 6,
        _ => 9,
    }
}

/// The Kombu priority an encoded message carries.
pub(crate) fn kombu_priority(msg: &Message) -> u8 {
    msg.properties.priority.map(|p| MAX_PRIORITY - p.min(MAX_PRIORITY)).unwrap_or(0)
}

/// What a decoded envelope yields: the message, or why not, and whether it was redelivered.
pub(crate) struct Decoded {
    pub(crate) message: Result<Message, ProtocolError>,
    pub(crate) redelivered: bool,
}

impl Decoded {
    /// What a [`celery_core::broker::Decoder`] returns.
    pub(crate) fn into_parts(self) -> (Result<Message, ProtocolError>, bool) {
        (self.message, self.redelivered)
    }
}

/// The envelope's fields we read; everything else is ignored. `H`: the headers as [`Headers`]
/// (the fast path) or as a `Value` (for the exact error when the fast path fails). Strings are
/// borrowed from the input where they have no escapes (the body: no copy before base64 decoding).
#[derive(serde::Deserialize)]
struct Envelope<'a, H> {
    #[serde(borrow, default)]
    body: Option<JsonStr<'a>>,
    #[serde(rename = "content-type", borrow, default)]
    content_type: Option<JsonStr<'a>>,
    #[serde(default = "none")]
    headers: Option<H>,
    #[serde(borrow, default)]
    properties: Option<EnvProperties<'a>>,
}

fn none<H>() -> Option<H> {
    None
}

/// Kombu's `properties`. `priority` and `delivery_info` are kept as raw JSON, read only when used
/// (as `Value`s they cost a map per message).
#[derive(serde::Deserialize, Default)]
struct EnvProperties<'a> {
    #[serde(default)]
    correlation_id: Option<String>,
    #[serde(default)]
    reply_to: Option<String>,
    #[serde(borrow, default)]
    priority: Option<&'a RawValue>,
    #[serde(borrow, default)]
    body_encoding: Option<JsonStr<'a>>,
    #[serde(borrow, default)]
    delivery_info: Option<&'a RawValue>,
}

/// The body of any envelope (a task or not, e.g. an event), JSON only; `None` when unreadable.
pub(crate) fn body_of(raw: &[u8]) -> Option<Vec<u8>> {
    let env: Envelope<'_, serde::de::IgnoredAny> = serde_json::from_slice(raw).ok()?;
    if let Some(ct) = &env.content_type {
        check_content_type(ct).ok()?;
    }
    let body = env.body.as_deref()?;
    match env.properties.as_ref().and_then(|p| p.body_encoding.as_deref()).unwrap_or("base64") {
        "base64" => B64.decode(body).ok(),
        _ => Some(body.as_bytes().to_vec()),
    }
}

/// Decodes an envelope; never panics. Headers are read straight into [`Headers`]; when that
/// fails, the envelope is read again through a `Value` for an error that names the field. The
/// fast path checks the envelope's UTF-8 once as a whole, so serde_json does not check each of its
/// strings again (input that is not UTF-8 takes the slow path, whose error says where).
pub(crate) fn decode(raw: &[u8]) -> Decoded {
    let fast = std::str::from_utf8(raw).ok().and_then(|text| serde_json::from_str::<Envelope<'_, Headers>>(text).ok());
    if let Some(mut env) = fast {
        if let Some(headers) = env.headers.take() {
            let redelivered = headers.says_redelivered() || redelivered_in(env.properties.as_ref());
            if let Ok(message) = decode_envelope(env, headers) {
                return Decoded { message: Ok(message), redelivered };
            }
        }
    }
    let mut env: Envelope<'_, Value> = match serde_json::from_slice(raw) {
        Ok(v) => v,
        Err(e) => return Decoded { message: Err(ProtocolError::InvalidJson(e.to_string())), redelivered: false },
    };
    let redelivered = env.headers.as_ref().and_then(|h| h.get("redelivered")).and_then(Value::as_bool).unwrap_or(false)
        || redelivered_in(env.properties.as_ref());
    let message = (|| {
        if let Some(ct) = &env.content_type {
            check_content_type(ct)?;
        }
        let headers_v = env.headers.take().ok_or(ProtocolError::MissingField("headers"))?;
        if headers_v.get("task").is_none() {
            return Err(ProtocolError::MissingField("task"));
        }
        let reply_to = env.properties.as_ref().and_then(|p| p.reply_to.as_deref());
        let headers = Headers::from_json(&headers_v).map_err(|e| e.with_reply_to(reply_to))?;
        decode_envelope(env, headers)
    })();
    Decoded { message, redelivered }
}

/// `properties.delivery_info.redelivered`, parsed only when the raw text mentions it.
fn redelivered_in(props: Option<&EnvProperties<'_>>) -> bool {
    props
        .and_then(|p| p.delivery_info)
        .filter(|raw| raw.get().contains("redelivered"))
        .and_then(|raw| serde_json::from_str::<Value>(raw.get()).ok())
        .and_then(|d| d.get("redelivered").and_then(Value::as_bool))
        .unwrap_or(false)
}

fn decode_envelope<H>(env: Envelope<'_, H>, headers: Headers) -> Result<Message, ProtocolError> {
    if let Some(ct) = &env.content_type {
        check_content_type(ct)?;
    }
    let props = env.properties.unwrap_or_default();
    let body_s = env.body.ok_or(ProtocolError::MissingField("body"))?;
    let encoding = props.body_encoding.as_deref().unwrap_or("base64");
    let body = if encoding == "base64" {
        B64.decode(body_s.as_bytes())
            .map_err(|e| ProtocolError::InvalidField { field: "body", reason: format!("bad base64: {e}") })?
    } else {
        body_s.0.into_owned().into_bytes()
    };
    // Kombu's priority when it is a non-negative integer; anything else is no priority.
    let priority = props
        .priority
        .and_then(|raw| raw.get().parse::<u64>().ok())
        .map(|p| MAX_PRIORITY - (p.min(MAX_PRIORITY as u64) as u8));
    Ok(Message {
        properties: Properties {
            correlation_id: props.correlation_id.unwrap_or_else(|| headers.id.clone()),
            reply_to: props.reply_to,
            priority,
        },
        headers,
        body,
    })
}

/// A dead-letter envelope: the original (or the raw bytes, wrapped) with the reason in a header.
pub(crate) fn dead_letter(raw: &[u8], queue: &str, reason: &str) -> String {
    use celery_core::broker::{DEAD_LETTER_QUEUE, DEAD_LETTER_REASON};
    let mut v = match serde_json::from_slice::<Value>(raw) {
        Ok(Value::Object(m)) => Value::Object(m),
        _ => json!({
            "body": B64.encode(raw),
            "content-encoding": "binary",
            "content-type": "application/octet-stream",
            "headers": {},
            "properties": {"body_encoding": "base64", "delivery_info": {"exchange": "", "routing_key": queue}},
        }),
    };
    if !v["headers"].is_object() {
        v["headers"] = json!({});
    }
    v["headers"][DEAD_LETTER_REASON] = reason.into();
    v["headers"][DEAD_LETTER_QUEUE] = queue.into();
    v.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use celery_core::Signature;

    #[test]
    fn roundtrip_keeps_priority_direction() {
        let msg = Message::from_signature(&Signature::by_name("add").args(json!([1, 2])).priority(9)).unwrap();
        let env = encode(&msg, "", "celery");
        let v: Value = serde_json::from_str(&env).unwrap();
        assert_eq!(v["properties"]["priority"], 0, "our 9 is Kombu's 0 (highest on Redis)");
        let back = decode(env.as_bytes()).message.unwrap();
        assert_eq!(back, msg);
    }

    #[test]
    fn python_envelope_decodes() {
        let body = B64.encode(br#"[[2, 3], {}, {"callbacks": null, "errbacks": null, "chain": null, "chord": null}]"#);
        let env = json!({"body": body, "content-encoding": "utf-8", "content-type": "application/json",
            "headers": {"lang": "py", "task": "add", "id": "x1", "retries": 0, "timelimit": [null, null]},
            "properties": {"correlation_id": "x1", "reply_to": "r", "delivery_mode": 2,
                "delivery_info": {"exchange": "", "routing_key": "celery"}, "priority": 0,
                "body_encoding": "base64", "delivery_tag": "t"}});
        let m = decode(env.to_string().as_bytes()).message.unwrap();
        assert_eq!(m.headers.task, "add");
        assert_eq!(m.body().unwrap().args, vec![json!(2), json!(3)]);
    }

    #[test]
    fn odd_but_valid_properties_are_read_leniently() {
        let body = B64.encode(br#"[[2, 3], {}, {}]"#).replace('/', "\\/");
        let env = |props: Value| {
            json!({"body": body, "content-type": "application/json", "headers": {"task": "add", "id": "x1"},
                "properties": props})
            .to_string()
        };
        // An escaped body (`\/`, as some JSON encoders write it), a float priority, a string for
        // delivery_info: decoded, with no priority and not redelivered.
        let d = decode(env(json!({"priority": 4.5, "delivery_info": "odd", "body_encoding": "base64"})).as_bytes());
        let m = d.message.unwrap();
        assert_eq!(m.body().unwrap().args, vec![json!(2), json!(3)]);
        assert_eq!((m.properties.priority, d.redelivered), (None, false));
        assert_eq!(m.properties.correlation_id, "x1", "the task id when there is none");
        let d = decode(env(json!({"priority": 2, "delivery_info": {"redelivered": true}})).as_bytes());
        assert_eq!((d.message.unwrap().properties.priority, d.redelivered), (Some(7), true));
        let d = decode(env(json!({"priority": null, "delivery_info": {"routing_key": "redelivered"}})).as_bytes());
        assert!(!d.redelivered, "only the field counts, not the word");
    }

    #[test]
    fn hostile_envelopes_are_errors() {
        let body = B64.encode(br#"[[2, 3], {}, {}]"#);
        let env = |headers: Value| json!({"body": body, "headers": headers}).to_string().into_bytes();
        assert!(decode(&env(json!({"task": "add", "id": "x1"}))).message.is_ok());
        // A byte that is not UTF-8 inside a string; an envelope cut inside a character, inside a
        // string, or after a key.
        let mut bytes = env(json!({"task": "add", "id": "x1"}));
        let at = bytes.iter().position(|b| *b == b'x').unwrap();
        bytes[at] = 0xff;
        assert!(matches!(decode(&bytes).message, Err(ProtocolError::InvalidJson(_))));
        for cut in ["{\"body\": \"\u{e9}".as_bytes().split_last().unwrap().1, b"{\"body\": \"YWJj", b"{\"headers\""] {
            assert!(matches!(decode(cut).message, Err(ProtocolError::InvalidJson(_))), "{cut:?}");
        }
        // Bad base64, numbers too large for their field or for JSON, wrong types: errors that name
        // the field (with the task id when the headers name one).
        let bad_b64 = json!({"body": "not base64!", "headers": {"task": "add", "id": "x1"}}).to_string();
        assert!(matches!(decode(bad_b64.as_bytes()).message, Err(ProtocolError::InvalidField { field: "body", .. })));
        let named = |headers: Value| match decode(&env(headers)).message {
            Err(ProtocolError::InvalidHeaders { id, error, .. }) => (id, error.to_string()),
            other => panic!("{other:?}"),
        };
        let (id, why) = named(json!({"task": "add", "id": "x1", "retries": 1u64 << 40}));
        assert_eq!(id, "x1");
        assert!(why.contains("retries"), "{why}");
        assert!(named(json!({"task": "add", "id": "x1", "timelimit": "soon"})).1.contains("timelimit"));
        assert!(named(json!({"task": ["add"], "id": "x1"})).1.contains("task"));
        let huge = br#"{"body": "", "headers": {"task": "add", "id": "x1", "retries": 1e400}}"#;
        assert!(matches!(decode(huge).message, Err(ProtocolError::InvalidJson(_))));
        assert!(matches!(decode(br#"{"body": "", "headers": 7}"#).message, Err(ProtocolError::MissingField("task"))));
    }

    #[test]
    fn bad_envelopes_are_errors() {
        assert!(matches!(decode(b"not json").message, Err(ProtocolError::InvalidJson(_))));
        assert!(matches!(decode(br#"{"body": ""}"#).message, Err(ProtocolError::MissingField("headers"))));
        let pickle =
            json!({"body": "", "content-type": "application/x-python-serialize", "headers": {"task": "t", "id": "i"}});
        assert!(matches!(decode(pickle.to_string().as_bytes()).message, Err(ProtocolError::UnsupportedContentType(_))));
        let dl: Value = serde_json::from_str(&dead_letter(b"\xff", "q", "why")).unwrap();
        assert_eq!(dl["headers"]["x-dead-letter-reason"], "why");
    }
}

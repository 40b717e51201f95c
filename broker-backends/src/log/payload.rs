//! A task record's payload: the compact form this broker writes, or Kombu's JSON envelope.
//!
//! The log broker is not shared with Python peers, so it need not store Kombu's envelope (a JSON
//! document whose body is base64 inside it, with Redis-only properties). It stores:
//!
//! ```text
//! 0x01 | headers_len:u32 | headers (the protocol v2 headers as JSON) | flags:u8
//!      | [correlation_id: len:u32 bytes]  (flags & 1: only when it is not the task id)
//!      | [reply_to: len:u32 bytes]        (flags & 2)
//!      | [priority:u8]                    (flags & 4)
//!      | body (the JSON `[args, kwargs, embed]`, to the end)
//! ```
//!
//! little-endian. A JSON envelope starts with `{` (or whitespace), never `0x01`: records written
//! before this form (or by hand) are still read.

use celery_core::protocol::{Headers, Message, Properties};
use celery_core::ProtocolError;

use crate::envelope;

/// The first byte of the compact form.
const COMPACT: u8 = 1;

const HAS_CORRELATION: u8 = 1;
const HAS_REPLY_TO: u8 = 2;
const HAS_PRIORITY: u8 = 4;

/// Encodes a task message in the compact form.
pub(crate) fn encode(msg: &Message) -> Vec<u8> {
    let headers = serde_json::to_vec(&msg.headers.to_json()).unwrap_or_else(|_| b"{}".to_vec());
    let p = &msg.properties;
    let correlation = (p.correlation_id != msg.headers.id).then_some(&p.correlation_id);
    let mut out = Vec::with_capacity(headers.len() + msg.body.len() + 16);
    out.push(COMPACT);
    out.extend_from_slice(&(headers.len() as u32).to_le_bytes());
    out.extend_from_slice(&headers);
    let flags = correlation.map_or(0, |_| HAS_CORRELATION)
        | p.reply_to.as_ref().map_or(0, |_| HAS_REPLY_TO)
        | p.priority.map_or(0, |_| HAS_PRIORITY);
    out.push(flags);
    for s in [correlation, p.reply_to.as_ref()].into_iter().flatten() {
        out.extend_from_slice(&(s.len() as u32).to_le_bytes());
        out.extend_from_slice(s.as_bytes());
    }
    if let Some(prio) = p.priority {
        out.push(prio);
    }
    out.extend_from_slice(&msg.body);
    out
}

/// Decodes either form into a message, and whether the message says it was redelivered (only a
/// JSON envelope can); never panics.
pub(crate) fn decode(payload: &[u8]) -> (Result<Message, ProtocolError>, bool) {
    match payload.first() {
        Some(&COMPACT) => (decode_compact(&payload[1..]), false),
        _ => envelope::decode(payload).into_parts(),
    }
}

/// Kombu's JSON envelope for a payload in either form (what a dead-letter record holds); `None`
/// when it cannot be decoded.
pub(crate) fn to_envelope(payload: &[u8], queue: &str) -> Option<Vec<u8>> {
    match payload.first() {
        Some(&COMPACT) => decode_compact(&payload[1..]).ok().map(|m| envelope::encode(&m, "", queue).into_bytes()),
        _ => Some(payload.to_vec()),
    }
}

fn truncated() -> ProtocolError {
    ProtocolError::InvalidField { field: "payload", reason: "truncated compact record".into() }
}

/// Splits `n` bytes off the front of `rest`.
fn take<'a>(rest: &mut &'a [u8], n: usize) -> Result<&'a [u8], ProtocolError> {
    if rest.len() < n {
        return Err(truncated());
    }
    let (head, tail) = rest.split_at(n);
    *rest = tail;
    Ok(head)
}

fn take_str(rest: &mut &[u8]) -> Result<String, ProtocolError> {
    let len = u32::from_le_bytes(take(rest, 4)?.try_into().map_err(|_| truncated())?) as usize;
    String::from_utf8(take(rest, len)?.to_vec())
        .map_err(|_| ProtocolError::InvalidField { field: "properties", reason: "not UTF-8".into() })
}

fn decode_compact(mut rest: &[u8]) -> Result<Message, ProtocolError> {
    let len = u32::from_le_bytes(take(&mut rest, 4)?.try_into().map_err(|_| truncated())?) as usize;
    let raw = take(&mut rest, len)?;
    let headers = match serde_json::from_slice::<Headers>(raw) {
        Ok(h) => h,
        // The fast path only says that it failed: read it again for an error naming the field.
        Err(_) => {
            let v: serde_json::Value =
                serde_json::from_slice(raw).map_err(|e| ProtocolError::InvalidJson(e.to_string()))?;
            Headers::from_json(&v)?
        }
    };
    let flags = take(&mut rest, 1)?[0];
    let correlation_id = if flags & HAS_CORRELATION != 0 { take_str(&mut rest)? } else { headers.id.clone() };
    let reply_to = if flags & HAS_REPLY_TO != 0 { Some(take_str(&mut rest)?) } else { None };
    let priority = if flags & HAS_PRIORITY != 0 { Some(take(&mut rest, 1)?[0]) } else { None };
    Ok(Message { headers, properties: Properties { correlation_id, reply_to, priority }, body: rest.to_vec() })
}

#[cfg(test)]
mod tests {
    use super::*;
    use celery_core::Signature;
    use serde_json::json;

    fn message() -> Message {
        Message::from_signature(&Signature::by_name("add").args(json!([1, 2])).priority(7)).unwrap()
    }

    #[test]
    fn both_forms_decode_to_the_same_message() {
        let mut msg = message();
        msg.properties.reply_to = Some("replies".into());
        let compact = encode(&msg);
        assert_eq!(compact[0], COMPACT);
        assert_eq!(decode(&compact).0.unwrap(), msg);
        let old = envelope::encode(&msg, "", "celery");
        assert_eq!(decode(old.as_bytes()).0.unwrap(), msg, "records written before the compact form");
        msg.properties.correlation_id = "other".into();
        msg.properties.priority = None;
        assert_eq!(decode(&encode(&msg)).0.unwrap(), msg);
    }

    #[test]
    fn bad_compact_records_are_errors_not_panics() {
        let msg = message();
        let good = encode(&msg);
        // Every cut before the body (which runs to the end) is short of something.
        for cut in 1..good.len() - msg.body.len() {
            assert!(decode(&good[..cut]).0.is_err(), "cut at {cut}");
        }
        let mut bad_headers = vec![COMPACT];
        bad_headers.extend_from_slice(&9u32.to_le_bytes());
        bad_headers.extend_from_slice(br#"{"id": 5}"#);
        bad_headers.push(0);
        let err = decode(&bad_headers).0.unwrap_err().to_string();
        assert!(err.contains("id") || err.contains("task"), "{err}");
        assert!(decode(&[COMPACT]).0.is_err());
    }

    #[test]
    fn dead_letters_hold_a_json_envelope() {
        let msg = message();
        let env = to_envelope(&encode(&msg), "q").unwrap();
        assert_eq!(env[0], b'{');
        assert_eq!(decode(&env).0.unwrap(), msg);
        assert!(to_envelope(&[COMPACT, 0], "q").is_none());
    }
}

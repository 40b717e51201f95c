//! A task record's payload: the compact form this broker writes, or Kombu's JSON envelope.
//!
//! The log broker is not shared with Python peers, so it need not store Kombu's envelope (a JSON
//! document with the body in base64 inside it, and Redis-only properties). It stores the message's
//! fields in binary, and its body as it is:
//!
//! ```text
//! 0x01 | present:u32 | lang | task | id | retries:u32 | ignore_result:u8
//!      | the optional fields whose bit is set in `present`, in this order:
//!        shadow, eta, expires, group, group_index:u64, time_limit:f64, soft_time_limit:f64,
//!        root_id, parent_id, argsrepr, kwargsrepr, origin, extra (the other headers, JSON),
//!        correlation_id (only when it is not the task id), reply_to, priority:u8
//!      | body (the JSON `[args, kwargs, embed]`, to the end)
//! ```
//!
//! Strings are `len:u32 bytes` (UTF-8), times are microseconds since the epoch as `i64`, numbers
//! little-endian. A JSON envelope starts with `{` (or whitespace), never `0x01`: records written
//! before this form (or by hand) are still read.

use celery_core::protocol::{Headers, Message, Properties};
use celery_core::ProtocolError;
use chrono::{DateTime, Utc};

use super::record::{now_ms, NewRecord};
use crate::envelope;

/// The first byte of the compact form.
const COMPACT: u8 = 1;

/// The bits of `present`, one per optional field, in the order the fields follow.
mod bit {
    pub(super) const SHADOW: u32 = 1;
    pub(super) const ETA: u32 = 1 << 1;
    pub(super) const EXPIRES: u32 = 1 << 2;
    pub(super) const GROUP: u32 = 1 << 3;
    pub(super) const GROUP_INDEX: u32 = 1 << 4;
    pub(super) const TIME_LIMIT: u32 = 1 << 5;
    pub(super) const SOFT_TIME_LIMIT: u32 = 1 << 6;
    pub(super) const ROOT_ID: u32 = 1 << 7;
    pub(super) const PARENT_ID: u32 = 1 << 8;
    pub(super) const ARGSREPR: u32 = 1 << 9;
    pub(super) const KWARGSREPR: u32 = 1 << 10;
    pub(super) const ORIGIN: u32 = 1 << 11;
    pub(super) const EXTRA: u32 = 1 << 12;
    pub(super) const CORRELATION_ID: u32 = 1 << 13;
    pub(super) const REPLY_TO: u32 = 1 << 14;
    pub(super) const PRIORITY: u32 = 1 << 15;
}

/// Writes the fields.
struct Out {
    buf: Vec<u8>,
    present: u32,
}

impl Out {
    fn str(&mut self, s: &str) {
        self.buf.extend_from_slice(&(s.len() as u32).to_le_bytes());
        self.buf.extend_from_slice(s.as_bytes());
    }
    fn opt_str(&mut self, bit: u32, s: Option<&str>) {
        if let Some(s) = s {
            self.present |= bit;
            self.str(s);
        }
    }
    fn opt_time(&mut self, bit: u32, t: Option<DateTime<Utc>>) {
        if let Some(t) = t {
            self.present |= bit;
            self.buf.extend_from_slice(&t.timestamp_micros().to_le_bytes());
        }
    }
    fn opt_f64(&mut self, bit: u32, x: Option<f64>) {
        if let Some(x) = x {
            self.present |= bit;
            self.buf.extend_from_slice(&x.to_le_bytes());
        }
    }
}

/// Encodes a task message in the compact form.
pub(crate) fn encode(msg: &Message) -> Vec<u8> {
    let (h, p) = (&msg.headers, &msg.properties);
    let mut o = Out { buf: Vec::with_capacity(256 + msg.body.len()), present: 0 };
    o.buf.push(COMPACT);
    o.buf.extend_from_slice(&[0; 4]);
    o.str(&h.lang);
    o.str(&h.task);
    o.str(&h.id);
    o.buf.extend_from_slice(&h.retries.to_le_bytes());
    o.buf.push(h.ignore_result as u8);
    o.opt_str(bit::SHADOW, h.shadow.as_deref());
    o.opt_time(bit::ETA, h.eta);
    o.opt_time(bit::EXPIRES, h.expires);
    o.opt_str(bit::GROUP, h.group.as_deref());
    if let Some(i) = h.group_index {
        o.present |= bit::GROUP_INDEX;
        o.buf.extend_from_slice(&i.to_le_bytes());
    }
    o.opt_f64(bit::TIME_LIMIT, h.time_limit);
    o.opt_f64(bit::SOFT_TIME_LIMIT, h.soft_time_limit);
    o.opt_str(bit::ROOT_ID, h.root_id.as_deref());
    o.opt_str(bit::PARENT_ID, h.parent_id.as_deref());
    o.opt_str(bit::ARGSREPR, h.argsrepr.as_deref());
    o.opt_str(bit::KWARGSREPR, h.kwargsrepr.as_deref());
    o.opt_str(bit::ORIGIN, h.origin.as_deref());
    if !h.extra.is_empty() {
        let extra = serde_json::Value::Object(h.extra.clone()).to_string();
        o.opt_str(bit::EXTRA, Some(&extra));
    }
    o.opt_str(bit::CORRELATION_ID, (p.correlation_id != h.id).then_some(p.correlation_id.as_str()));
    o.opt_str(bit::REPLY_TO, p.reply_to.as_deref());
    if let Some(prio) = p.priority {
        o.present |= bit::PRIORITY;
        o.buf.push(prio);
    }
    o.buf.extend_from_slice(&msg.body);
    let present = o.present.to_le_bytes();
    o.buf[1..5].copy_from_slice(&present);
    o.buf
}

/// A task message as the record that holds it: the compact payload, its eta as the record's
/// not-before (when in the future), and its partition key (`Signature::partition_key`) as the key.
pub(crate) fn to_record(msg: &Message) -> NewRecord {
    let not_before_ms = msg.headers.eta.map(|t| t.timestamp_millis()).filter(|t| *t > now_ms()).unwrap_or(0);
    let key = match msg.headers.extra.get(celery_core::signature::PARTITION_KEY) {
        Some(serde_json::Value::String(k)) => k.as_bytes().to_vec(),
        _ => Vec::new(),
    };
    NewRecord { not_before_ms, headers: Vec::new(), key, payload: encode(msg) }
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

fn invalid(reason: &str) -> ProtocolError {
    ProtocolError::InvalidField { field: "payload", reason: reason.into() }
}

/// Reads the fields.
struct In<'a> {
    rest: &'a [u8],
    present: u32,
}

impl<'a> In<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], ProtocolError> {
        if self.rest.len() < n {
            return Err(invalid("truncated compact record"));
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Ok(head)
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], ProtocolError> {
        self.take(N)?.try_into().map_err(|_| invalid("truncated compact record"))
    }
    fn str(&mut self) -> Result<String, ProtocolError> {
        let len = u32::from_le_bytes(self.array()?) as usize;
        String::from_utf8(self.take(len)?.to_vec()).map_err(|_| invalid("a string is not UTF-8"))
    }
    fn has(&self, bit: u32) -> bool {
        self.present & bit != 0
    }
    fn opt_str(&mut self, bit: u32) -> Result<Option<String>, ProtocolError> {
        self.has(bit).then(|| self.str()).transpose()
    }
    fn opt_time(&mut self, bit: u32) -> Result<Option<DateTime<Utc>>, ProtocolError> {
        if !self.has(bit) {
            return Ok(None);
        }
        let micros = i64::from_le_bytes(self.array()?);
        DateTime::from_timestamp_micros(micros).map(Some).ok_or_else(|| invalid("a time out of range"))
    }
    fn opt_f64(&mut self, bit: u32) -> Result<Option<f64>, ProtocolError> {
        self.has(bit).then(|| self.array().map(f64::from_le_bytes)).transpose()
    }
}

/// The fairness key of a task record's payload (`Signature::fairness_key`), read without decoding
/// the message: the fixed fields are skipped and the extra headers' JSON parsed only when it
/// names the header. `None` for a record without one, a JSON envelope (records written before
/// fair queues) or a payload that does not decode (the worker reports it when it takes it).
pub(crate) fn fairness_key(payload: &[u8]) -> Option<String> {
    if payload.first() != Some(&COMPACT) {
        return None;
    }
    let mut r = In { rest: &payload[1..], present: 0 };
    r.present = u32::from_le_bytes(r.array().ok()?);
    if !r.has(bit::EXTRA) {
        return None;
    }
    let skip_str = |r: &mut In<'_>| -> Option<()> {
        let len = u32::from_le_bytes(r.array().ok()?) as usize;
        r.take(len).ok().map(|_| ())
    };
    for _ in 0..3 {
        skip_str(&mut r)?; // lang, task, id
    }
    r.take(5).ok()?; // retries, ignore_result
    let fixed = [
        (bit::SHADOW, 0),
        (bit::ETA, 8),
        (bit::EXPIRES, 8),
        (bit::GROUP, 0),
        (bit::GROUP_INDEX, 8),
        (bit::TIME_LIMIT, 8),
        (bit::SOFT_TIME_LIMIT, 8),
        (bit::ROOT_ID, 0),
        (bit::PARENT_ID, 0),
        (bit::ARGSREPR, 0),
        (bit::KWARGSREPR, 0),
        (bit::ORIGIN, 0),
    ];
    for (b, size) in fixed {
        match (r.has(b), size) {
            (false, _) => {}
            (true, 0) => skip_str(&mut r)?,
            (true, n) => r.take(n).map(|_| ()).ok()?,
        }
    }
    let len = u32::from_le_bytes(r.array().ok()?) as usize;
    let extra = r.take(len).ok()?;
    let name = celery_core::flow::FAIRNESS_KEY.as_bytes();
    let at = extra.windows(name.len()).position(|w| w == name)?;
    // The common form, `"x-fairness-key":"<key without escapes>"`, read as it is.
    if let Some(rest) = extra[at + name.len()..].strip_prefix(b"\":\"") {
        if let Some(end) = rest.iter().position(|b| *b == b'"' || *b == b'\\') {
            if rest[end] == b'"' && at > 0 && extra[at - 1] == b'"' {
                return std::str::from_utf8(&rest[..end]).ok().filter(|k| !k.is_empty()).map(str::to_owned);
            }
        }
    }
    #[derive(serde::Deserialize)]
    struct Extra {
        #[serde(rename = "x-fairness-key")]
        key: Option<String>,
    }
    serde_json::from_slice::<Extra>(extra).ok()?.key
}

fn decode_compact(rest: &[u8]) -> Result<Message, ProtocolError> {
    let mut r = In { rest, present: 0 };
    r.present = u32::from_le_bytes(r.array()?);
    let (lang, task, id) = (r.str()?, r.str()?, r.str()?);
    let retries = u32::from_le_bytes(r.array()?);
    let ignore_result = r.take(1)?[0] != 0;
    let shadow = r.opt_str(bit::SHADOW)?;
    let (eta, expires) = (r.opt_time(bit::ETA)?, r.opt_time(bit::EXPIRES)?);
    let group = r.opt_str(bit::GROUP)?;
    let group_index = r.has(bit::GROUP_INDEX).then(|| r.array().map(u64::from_le_bytes)).transpose()?;
    let (time_limit, soft_time_limit) = (r.opt_f64(bit::TIME_LIMIT)?, r.opt_f64(bit::SOFT_TIME_LIMIT)?);
    let (root_id, parent_id) = (r.opt_str(bit::ROOT_ID)?, r.opt_str(bit::PARENT_ID)?);
    let (argsrepr, kwargsrepr) = (r.opt_str(bit::ARGSREPR)?, r.opt_str(bit::KWARGSREPR)?);
    let origin = r.opt_str(bit::ORIGIN)?;
    let extra = match r.opt_str(bit::EXTRA)? {
        Some(json) => serde_json::from_str(&json).map_err(|e| ProtocolError::InvalidJson(e.to_string()))?,
        None => Default::default(),
    };
    let correlation_id = r.opt_str(bit::CORRELATION_ID)?.unwrap_or_else(|| id.clone());
    let reply_to = r.opt_str(bit::REPLY_TO)?;
    let priority = if r.has(bit::PRIORITY) { Some(r.take(1)?[0]) } else { None };
    let headers = Headers {
        lang,
        task,
        id,
        shadow,
        eta,
        expires,
        group,
        group_index,
        retries,
        time_limit,
        soft_time_limit,
        root_id,
        parent_id,
        argsrepr,
        kwargsrepr,
        origin,
        ignore_result,
        extra,
    };
    Ok(Message { headers, properties: Properties { correlation_id, reply_to, priority }, body: r.rest.to_vec() })
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
    fn the_fairness_key_is_read_past_every_optional_field() {
        let sig = Signature::by_name("add")
            .args(json!([1, 2]))
            .priority(7)
            .countdown(std::time::Duration::from_secs(60))
            .expires_in(std::time::Duration::from_secs(3600));
        let mut msg = Message::from_signature(&sig.clone().fairness_key("tenant-é")).unwrap();
        msg.headers.shadow = Some("s".into());
        msg.headers.group = Some("g".into());
        msg.headers.group_index = Some(3);
        msg.headers.time_limit = Some(1.5);
        msg.headers.soft_time_limit = Some(1.0);
        msg.headers.root_id = Some("r".into());
        msg.headers.parent_id = Some("p".into());
        msg.headers.origin = Some("o".into());
        assert_eq!(fairness_key(&encode(&msg)).as_deref(), Some("tenant-é"));
        let plain = Message::from_signature(&sig.concurrency_key("x-fairness-key")).unwrap();
        assert_eq!(fairness_key(&encode(&plain)), None, "the name as a value is not the header");
        assert_eq!(fairness_key(&encode(&message())), None);
        let quoted = Message::from_signature(&Signature::by_name("add").fairness_key("te\"n\\t")).unwrap();
        assert_eq!(fairness_key(&encode(&quoted)).as_deref(), Some("te\"n\\t"), "escapes: parsed as JSON");
        let suffix =
            Message::from_signature(&Signature::by_name("add").header("my-x-fairness-key", json!("v"))).unwrap();
        assert_eq!(fairness_key(&encode(&suffix)), None, "another header whose name ends like it");
        assert_eq!(fairness_key(b"{\"body\": \"\"}"), None);
        let bytes = encode(&msg);
        for cut in 0..bytes.len() {
            let _ = fairness_key(&bytes[..cut]); // never panics on a truncated record
        }
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
    fn every_field_survives() {
        let mut msg = message();
        let t = DateTime::from_timestamp_micros(1_800_000_000_123_456).unwrap();
        let h = &mut msg.headers;
        (h.shadow, h.eta, h.expires, h.group, h.group_index) =
            (Some("s".into()), Some(t), Some(t), Some("g".into()), Some(3));
        (h.time_limit, h.soft_time_limit, h.parent_id, h.origin) =
            (Some(2.5), Some(1.0), Some("p".into()), Some("o".into()));
        (h.retries, h.ignore_result, h.lang) = (4, true, "py".into());
        h.extra.insert("x-custom".into(), json!({"k": [1, "é"]}));
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
        let mut bad_utf8 = good.clone();
        bad_utf8[9] = 0xff; // the first byte of `lang`
        assert!(decode(&bad_utf8).0.unwrap_err().to_string().contains("UTF-8"));
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

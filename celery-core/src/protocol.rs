//! Celery's message protocol v2, JSON only.
//!
//! A task message is headers (the task's name, id, eta, retries, ...), properties (correlation id,
//! reply-to, priority) and a JSON body `[args, kwargs, embed]`. Decoding never panics: a malformed
//! message is a [`ProtocolError`] naming the field at fault. Unknown header keys are kept in
//! [`Headers::extra`] and sent on unchanged.
//!
//! ```
//! use celery_core::protocol::{Headers, Message};
//! use celery_core::Signature;
//! let msg = Message::from_signature(&Signature::by_name("add").args(serde_json::json!([1, 2]))).unwrap();
//! let wire = serde_json::Value::Object(msg.headers.to_json());
//! let back = Headers::from_json(&wire).unwrap();
//! assert_eq!(back.id, msg.headers.id);
//! assert_eq!(msg.body().unwrap().args, vec![serde_json::json!(1), serde_json::json!(2)]);
//! ```

use chrono::{DateTime, Utc};
use serde_json::{Map, Value};

use crate::error::ProtocolError;
use crate::signature::Signature;

/// The content type of every message we send and the only one we execute.
pub const CONTENT_TYPE: &str = "application/json";
/// The content encoding that goes with [`CONTENT_TYPE`].
pub const CONTENT_ENCODING: &str = "utf-8";

/// Refuses any content type but JSON (pickle, yaml and msgpack are never executed).
pub fn check_content_type(content_type: &str) -> Result<(), ProtocolError> {
    if content_type.is_empty() || content_type == CONTENT_TYPE {
        Ok(())
    } else {
        Err(ProtocolError::UnsupportedContentType(content_type.to_owned()))
    }
}

/// The protocol v2 headers. Times are UTC.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Headers {
    /// `"rs"` for messages we send, `"py"` from Python.
    pub lang: String,
    /// The registered task name.
    pub task: String,
    /// The task id (a UUID string).
    pub id: String,
    /// A display name that overrides `task` in logs.
    pub shadow: Option<String>,
    /// Do not run before this time.
    pub eta: Option<DateTime<Utc>>,
    /// Do not run after this time (REVOKED instead).
    pub expires: Option<DateTime<Utc>>,
    /// The group this task belongs to.
    pub group: Option<String>,
    /// The task's index in its group.
    pub group_index: Option<u64>,
    /// How many times the task was retried.
    pub retries: u32,
    /// Hard time limit in seconds (Celery's `timelimit[0]`).
    pub time_limit: Option<f64>,
    /// Soft time limit in seconds (Celery's `timelimit[1]`).
    pub soft_time_limit: Option<f64>,
    /// The first task of the workflow.
    pub root_id: Option<String>,
    /// The task that sent this one.
    pub parent_id: Option<String>,
    /// A printable form of the arguments (at most 1024 chars).
    pub argsrepr: Option<String>,
    /// A printable form of the keyword arguments (at most 1024 chars).
    pub kwargsrepr: Option<String>,
    /// The sender, `gen<pid>@<host>`.
    pub origin: Option<String>,
    /// Do not store the result.
    pub ignore_result: bool,
    /// Every other header, kept as received.
    pub extra: Map<String, Value>,
}

const KNOWN: &[&str] = &[
    "lang",
    "task",
    "id",
    "shadow",
    "eta",
    "expires",
    "group",
    "group_index",
    "retries",
    "timelimit",
    "root_id",
    "parent_id",
    "argsrepr",
    "kwargsrepr",
    "origin",
    "ignore_result",
];

fn opt_str(map: &Map<String, Value>, field: &'static str) -> Result<Option<String>, ProtocolError> {
    match map.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(ProtocolError::InvalidField { field, reason: format!("expected a string, got {other}") }),
    }
}

fn opt_time(map: &Map<String, Value>, field: &'static str) -> Result<Option<DateTime<Utc>>, ProtocolError> {
    match opt_str(map, field)? {
        None => Ok(None),
        Some(s) => parse_time(&s).map(Some).map_err(|reason| ProtocolError::InvalidField { field, reason }),
    }
}

/// Parses an ISO-8601 time as Celery sends it (with or without an offset; naive means UTC).
pub fn parse_time(s: &str) -> Result<DateTime<Utc>, String> {
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Ok(t.with_timezone(&Utc));
    }
    chrono::NaiveDateTime::parse_from_str(s, "%Y-%m-%dT%H:%M:%S%.f")
        .map(|n| n.and_utc())
        .map_err(|e| format!("`{s}` is not an ISO-8601 time: {e}"))
}

/// Formats a time the way Celery does (`2026-01-01T00:00:00.000000+00:00`).
pub fn format_time(t: DateTime<Utc>) -> String {
    // `to_rfc3339_opts` writes the fields directly; `format` would parse a strftime pattern on
    // every call (measured: 6.5% of a Redis worker's CPU when it ran once per task).
    t.to_rfc3339_opts(chrono::SecondsFormat::Micros, false)
}

fn opt_f64(v: Option<&Value>, field: &'static str) -> Result<Option<f64>, ProtocolError> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => Ok(n.as_f64()),
        Some(other) => Err(ProtocolError::InvalidField { field, reason: format!("expected a number, got {other}") }),
    }
}

fn opt_to_json<T: Into<Value>>(v: Option<T>) -> Value {
    v.map(Into::into).unwrap_or(Value::Null)
}

/// The longest task id read from headers that do not parse (ids become result keys).
const MAX_LENIENT_ID: usize = 255;

/// The task id of headers that may not parse: a non-empty string (or an integer) of at most 255
/// bytes without control characters under `id`; `None` otherwise.
///
/// ```
/// use celery_core::protocol::lenient_task_id;
/// assert_eq!(lenient_task_id(&serde_json::json!({"id": "x1", "retries": "many"})).as_deref(), Some("x1"));
/// assert_eq!(lenient_task_id(&serde_json::json!({"id": 7})).as_deref(), Some("7"));
/// assert_eq!(lenient_task_id(&serde_json::json!({"id": ""})), None);
/// assert_eq!(lenient_task_id(&serde_json::json!(["not", "headers"])), None);
/// ```
pub fn lenient_task_id(headers: &Value) -> Option<String> {
    let id = match headers.get("id")? {
        Value::String(s) => s.clone(),
        Value::Number(n) if n.is_u64() || n.is_i64() => n.to_string(),
        _ => return None,
    };
    let fits = !id.is_empty() && id.len() <= MAX_LENIENT_ID && !id.chars().any(char::is_control);
    fits.then_some(id)
}

/// The header that says a message may have been delivered before (Kombu's name).
const REDELIVERED: &str = "redelivered";

impl Headers {
    /// Whether the message says it may have been delivered before (a `redelivered: true` header:
    /// Kombu's restore on Redis, or an outbox relay sending it again after a crash): a worker then
    /// acks it unrun when its SUCCESS is already stored.
    ///
    /// ```
    /// let mut msg = celery_core::protocol::Message::from_signature(&celery_core::Signature::by_name("add")).unwrap();
    /// assert!(!msg.headers.says_redelivered());
    /// msg.headers.mark_redelivered();
    /// assert!(msg.headers.says_redelivered());
    /// assert_eq!(msg.headers.extra["redelivered"], serde_json::json!(true));
    /// ```
    pub fn says_redelivered(&self) -> bool {
        self.extra.get(REDELIVERED).and_then(Value::as_bool).unwrap_or(false)
    }

    /// Marks the message as possibly delivered before (see [`Headers::says_redelivered`]).
    pub fn mark_redelivered(&mut self) {
        self.extra.insert(REDELIVERED.into(), Value::Bool(true));
    }

    /// Reads headers from a JSON object, naming the field at fault on error. When they do not
    /// parse but name a task id ([`lenient_task_id`]), the error is
    /// [`ProtocolError::InvalidHeaders`] with that id.
    pub fn from_json(value: &Value) -> Result<Headers, ProtocolError> {
        Headers::read_json(value).map_err(|error| match lenient_task_id(value) {
            Some(id) => {
                let task = value.get("task").and_then(Value::as_str).map(str::to_owned);
                ProtocolError::InvalidHeaders { id, task, reply_to: None, error: Box::new(error) }
            }
            None => error,
        })
    }

    fn read_json(value: &Value) -> Result<Headers, ProtocolError> {
        let map = value
            .as_object()
            .ok_or(ProtocolError::InvalidField { field: "headers", reason: "expected a JSON object".into() })?;
        let task = opt_str(map, "task")?.ok_or(ProtocolError::MissingField("task"))?;
        let id = opt_str(map, "id")?.ok_or(ProtocolError::MissingField("id"))?;
        let retries = match map.get("retries") {
            None | Some(Value::Null) => 0,
            Some(v) => v.as_u64().and_then(|r| u32::try_from(r).ok()).ok_or_else(|| ProtocolError::InvalidField {
                field: "retries",
                reason: format!("expected a non-negative integer, got {v}"),
            })?,
        };
        let (time_limit, soft_time_limit) = match map.get("timelimit") {
            None | Some(Value::Null) => (None, None),
            Some(Value::Array(a)) => (opt_f64(a.first(), "timelimit")?, opt_f64(a.get(1), "timelimit")?),
            Some(other) => {
                return Err(ProtocolError::InvalidField {
                    field: "timelimit",
                    reason: format!("expected [hard, soft], got {other}"),
                })
            }
        };
        let group_index = match map.get("group_index") {
            None | Some(Value::Null) => None,
            Some(v) => Some(v.as_u64().ok_or_else(|| ProtocolError::InvalidField {
                field: "group_index",
                reason: format!("expected an integer, got {v}"),
            })?),
        };
        let extra =
            map.iter().filter(|(k, _)| !KNOWN.contains(&k.as_str())).map(|(k, v)| (k.clone(), v.clone())).collect();
        Ok(Headers {
            lang: opt_str(map, "lang")?.unwrap_or_else(|| "py".into()),
            task,
            id,
            shadow: opt_str(map, "shadow")?,
            eta: opt_time(map, "eta")?,
            expires: opt_time(map, "expires")?,
            group: opt_str(map, "group")?,
            group_index,
            retries,
            time_limit,
            soft_time_limit,
            root_id: opt_str(map, "root_id")?,
            parent_id: opt_str(map, "parent_id")?,
            argsrepr: opt_str(map, "argsrepr")?,
            kwargsrepr: opt_str(map, "kwargsrepr")?,
            origin: opt_str(map, "origin")?,
            ignore_result: map.get("ignore_result").and_then(Value::as_bool).unwrap_or(false),
            extra,
        })
    }

    /// Writes every protocol key (null when unset, as Python does) plus the extra headers.
    pub fn to_json(&self) -> Map<String, Value> {
        let mut m = Map::with_capacity(KNOWN.len() + self.extra.len());
        m.insert("lang".into(), self.lang.clone().into());
        m.insert("task".into(), self.task.clone().into());
        m.insert("id".into(), self.id.clone().into());
        m.insert("shadow".into(), opt_to_json(self.shadow.clone()));
        m.insert("eta".into(), opt_to_json(self.eta.map(format_time)));
        m.insert("expires".into(), opt_to_json(self.expires.map(format_time)));
        m.insert("group".into(), opt_to_json(self.group.clone()));
        m.insert("group_index".into(), opt_to_json(self.group_index));
        m.insert("retries".into(), self.retries.into());
        m.insert(
            "timelimit".into(),
            Value::Array(vec![opt_to_json(self.time_limit), opt_to_json(self.soft_time_limit)]),
        );
        m.insert("root_id".into(), opt_to_json(self.root_id.clone()));
        m.insert("parent_id".into(), opt_to_json(self.parent_id.clone()));
        m.insert("argsrepr".into(), opt_to_json(self.argsrepr.clone()));
        m.insert("kwargsrepr".into(), opt_to_json(self.kwargsrepr.clone()));
        m.insert("origin".into(), opt_to_json(self.origin.clone()));
        m.insert("ignore_result".into(), self.ignore_result.into());
        for (k, v) in &self.extra {
            m.insert(k.clone(), v.clone());
        }
        m
    }
}

/// Reads the headers straight from JSON (no intermediate `Value`), the fast path of a consumer.
/// It is strict where [`Headers::from_json`] names the field at fault: on an error, decode through
/// `from_json` for the message.
impl<'de> serde::Deserialize<'de> for Headers {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Headers, D::Error> {
        d.deserialize_map(HeadersVisitor)
    }
}

/// A header name: a known one without allocating, or any other.
enum HeaderKey {
    Known(&'static str),
    Other(String),
}

impl<'de> serde::Deserialize<'de> for HeaderKey {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<HeaderKey, D::Error> {
        struct KeyVisitor;
        impl serde::de::Visitor<'_> for KeyVisitor {
            type Value = HeaderKey;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a header name")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<HeaderKey, E> {
                Ok(match KNOWN.iter().find(|k| **k == v) {
                    Some(k) => HeaderKey::Known(k),
                    None => HeaderKey::Other(v.to_owned()),
                })
            }
        }
        d.deserialize_str(KeyVisitor)
    }
}

struct HeadersVisitor;

impl<'de> serde::de::Visitor<'de> for HeadersVisitor {
    type Value = Headers;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("protocol v2 headers")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Headers, A::Error> {
        use serde::de::Error;
        let time = |s: Option<String>| s.map(|s| parse_time(&s).map_err(A::Error::custom)).transpose();
        let mut h = Headers { lang: "py".into(), ..Headers::default() };
        let (mut task, mut id) = (None, None);
        while let Some(key) = map.next_key::<HeaderKey>()? {
            match key {
                HeaderKey::Known("lang") => h.lang = map.next_value::<Option<String>>()?.unwrap_or_else(|| "py".into()),
                HeaderKey::Known("task") => task = map.next_value::<Option<String>>()?,
                HeaderKey::Known("id") => id = map.next_value::<Option<String>>()?,
                HeaderKey::Known("shadow") => h.shadow = map.next_value()?,
                HeaderKey::Known("eta") => h.eta = time(map.next_value()?)?,
                HeaderKey::Known("expires") => h.expires = time(map.next_value()?)?,
                HeaderKey::Known("group") => h.group = map.next_value()?,
                HeaderKey::Known("group_index") => h.group_index = map.next_value()?,
                HeaderKey::Known("retries") => h.retries = map.next_value::<Option<u32>>()?.unwrap_or(0),
                HeaderKey::Known("timelimit") => {
                    (h.time_limit, h.soft_time_limit) =
                        map.next_value::<Option<(Option<f64>, Option<f64>)>>()?.unwrap_or_default()
                }
                HeaderKey::Known("root_id") => h.root_id = map.next_value()?,
                HeaderKey::Known("parent_id") => h.parent_id = map.next_value()?,
                HeaderKey::Known("argsrepr") => h.argsrepr = map.next_value()?,
                HeaderKey::Known("kwargsrepr") => h.kwargsrepr = map.next_value()?,
                HeaderKey::Known("origin") => h.origin = map.next_value()?,
                HeaderKey::Known("ignore_result") => {
                    h.ignore_result = map.next_value::<Option<bool>>()?.unwrap_or(false)
                }
                HeaderKey::Known(other) => return Err(A::Error::custom(format!("header `{other}` is not handled"))),
                HeaderKey::Other(k) => {
                    h.extra.insert(k, map.next_value()?);
                }
            }
        }
        h.task = task.ok_or_else(|| A::Error::missing_field("task"))?;
        h.id = id.ok_or_else(|| A::Error::missing_field("id"))?;
        Ok(h)
    }
}

/// Message properties (AMQP basic properties, or Kombu's `properties` on Redis).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Properties {
    /// The task id.
    pub correlation_id: String,
    /// The caller's reply queue (rpc results).
    pub reply_to: Option<String>,
    /// 0-255, higher first on AMQP; Redis maps it to Kombu's buckets.
    pub priority: Option<u8>,
}

/// The decoded body `[args, kwargs, embed]`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct TaskBody {
    /// Positional arguments.
    pub args: Vec<Value>,
    /// Keyword arguments.
    pub kwargs: Map<String, Value>,
    /// `{"callbacks", "errbacks", "chain", "chord"}` as received, less the null ones (the same as
    /// absent; [`TaskBody::to_vec`] writes all four).
    pub embed: Map<String, Value>,
}

/// A JSON string borrowed from the input when it has no escapes, owned otherwise. (`Cow<str>`
/// itself is always owned when serde reads it inside an `Option` or a map: serde borrows a `Cow`
/// only as a derived struct's field marked `#[serde(borrow)]`.)
///
/// ```
/// use celery_core::protocol::JsonStr;
/// use std::borrow::Cow;
/// let plain: JsonStr<'_> = serde_json::from_str(r#""add""#).unwrap();
/// assert!(matches!(plain.0, Cow::Borrowed("add")));
/// let escaped: JsonStr<'_> = serde_json::from_str(r#""a\/b""#).unwrap();
/// assert_eq!(&*escaped, "a/b");
/// ```
#[derive(Debug)]
pub struct JsonStr<'a>(pub std::borrow::Cow<'a, str>);

impl std::ops::Deref for JsonStr<'_> {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl<'de: 'a, 'a> serde::Deserialize<'de> for JsonStr<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<JsonStr<'a>, D::Error> {
        use std::borrow::Cow;
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Cow<'de, str>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: serde::de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Cow::Borrowed(v))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Cow::Owned(v.to_owned()))
            }
            fn visit_string<E: serde::de::Error>(self, v: String) -> Result<Self::Value, E> {
                Ok(Cow::Owned(v))
            }
        }
        d.deserialize_str(V).map(JsonStr)
    }
}

/// The fast path of [`TaskBody::from_slice`]: straight into the parts, without a `Value` for the
/// whole body; `embed` entries that are null are left out (the same as absent) before their keys
/// are copied.
struct FastBody(TaskBody);

/// A body's `embed` object without its null entries (Celery sends all four keys, mostly null:
/// those cost no allocation here).
struct Embed(Map<String, Value>);

impl<'de> serde::Deserialize<'de> for Embed {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Embed, D::Error> {
        struct Entries;
        impl<'de> serde::de::Visitor<'de> for Entries {
            type Value = Embed;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("the embed object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Embed, A::Error> {
                let mut embed = Map::new();
                while let Some(key) = map.next_key::<JsonStr<'de>>()? {
                    let value: Value = map.next_value()?;
                    if value.is_null() {
                        // A key given twice is read as the last one says, as a whole map would.
                        embed.remove(&*key);
                    } else {
                        embed.insert(key.0.into_owned(), value);
                    }
                }
                Ok(Embed(embed))
            }
        }
        d.deserialize_map(Entries)
    }
}

impl<'de> serde::Deserialize<'de> for FastBody {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<FastBody, D::Error> {
        struct Parts;
        impl<'de> serde::de::Visitor<'de> for Parts {
            type Value = FastBody;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("[args, kwargs, embed]")
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<FastBody, A::Error> {
                let args: Option<Vec<Value>> =
                    seq.next_element()?.ok_or_else(|| serde::de::Error::custom("no args"))?;
                let kwargs: Option<Map<String, Value>> = seq.next_element()?.flatten();
                let embed: Option<Embed> = seq.next_element()?.flatten();
                if seq.next_element::<serde::de::IgnoredAny>()?.is_some() {
                    return Err(serde::de::Error::custom("more than three parts"));
                }
                Ok(FastBody(TaskBody {
                    args: args.unwrap_or_default(),
                    kwargs: kwargs.unwrap_or_default(),
                    embed: embed.map(|e| e.0).unwrap_or_default(),
                }))
            }
        }
        d.deserialize_seq(Parts)
    }
}

impl TaskBody {
    /// Parses a body; the error names what is wrong.
    pub fn from_slice(body: &[u8]) -> Result<TaskBody, ProtocolError> {
        if let Ok(FastBody(b)) = serde_json::from_slice(body) {
            return Ok(b);
        }
        // The fast path only says that it failed: read it again for an error naming the part.
        let v: Value = serde_json::from_slice(body).map_err(|e| ProtocolError::InvalidJson(e.to_string()))?;
        let Value::Array(mut parts) = v else {
            return Err(ProtocolError::InvalidField { field: "body", reason: "expected [args, kwargs, embed]".into() });
        };
        if parts.is_empty() || parts.len() > 3 {
            return Err(ProtocolError::InvalidField {
                field: "body",
                reason: format!("expected [args, kwargs, embed], got {} elements", parts.len()),
            });
        }
        parts.resize(3, Value::Null);
        let mut it = parts.into_iter();
        let args = match it.next() {
            Some(Value::Array(a)) => a,
            Some(Value::Null) => Vec::new(),
            _ => return Err(ProtocolError::InvalidField { field: "args", reason: "expected a JSON array".into() }),
        };
        let kwargs = match it.next() {
            Some(Value::Object(m)) => m,
            Some(Value::Null) => Map::new(),
            _ => return Err(ProtocolError::InvalidField { field: "kwargs", reason: "expected a JSON object".into() }),
        };
        let embed = match it.next() {
            Some(Value::Object(mut m)) => {
                m.retain(|_, v| !v.is_null());
                m
            }
            Some(Value::Null) | None => Map::new(),
            _ => return Err(ProtocolError::InvalidField { field: "embed", reason: "expected a JSON object".into() }),
        };
        Ok(TaskBody { args, kwargs, embed })
    }

    /// Serializes to the wire form.
    pub fn to_vec(&self) -> Vec<u8> {
        let mut embed = self.embed.clone();
        for k in ["callbacks", "errbacks", "chain", "chord"] {
            embed.entry(k).or_insert(Value::Null);
        }
        let v = Value::Array(vec![
            Value::Array(self.args.clone()),
            Value::Object(self.kwargs.clone()),
            Value::Object(embed),
        ]);
        serde_json::to_vec(&v).unwrap_or_default()
    }
}

/// One task message: headers, properties and the raw JSON body.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    /// Protocol headers.
    pub headers: Headers,
    /// Properties.
    pub properties: Properties,
    /// The JSON body `[args, kwargs, embed]`, as bytes.
    pub body: Vec<u8>,
}

fn repr(v: &Value) -> String {
    let mut s = v.to_string();
    if s.len() > 1024 {
        let mut cut = 1024;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
    s
}

/// `gen<pid>@<host>`, the `origin` header of messages this process sends.
pub fn origin() -> String {
    format!("gen{}@{}", std::process::id(), gethostname::gethostname().to_string_lossy())
}

impl Message {
    /// Builds the message for a signature.
    pub fn from_signature(sig: &Signature) -> Result<Message, ProtocolError> {
        let id = sig.options.task_id.clone().unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
        let eta = sig.due_at();
        let mut embed = Map::new();
        if !sig.options.chain.is_empty() {
            // Celery keeps the rest of a chain reversed: the next task is the last element.
            embed
                .insert("chain".into(), Value::Array(sig.options.chain.iter().rev().map(Signature::to_json).collect()));
        }
        if !sig.options.link.is_empty() {
            embed.insert("callbacks".into(), Value::Array(sig.options.link.iter().map(Signature::to_json).collect()));
        }
        if !sig.options.link_error.is_empty() {
            let errbacks = sig.options.link_error.iter().map(Signature::to_json).collect();
            embed.insert("errbacks".into(), Value::Array(errbacks));
        }
        if let Some(chord) = &sig.options.chord {
            embed.insert("chord".into(), chord.clone());
        }
        let body = TaskBody { args: sig.args.clone(), kwargs: sig.kwargs.clone(), embed };
        let mut extra = sig.options.headers.clone();
        let group = extra.remove("group").and_then(|v| v.as_str().map(str::to_owned));
        let group_index = extra.remove("group_index").and_then(|v| v.as_u64());
        let headers = Headers {
            lang: "rs".into(),
            task: sig.task.clone(),
            id: id.clone(),
            eta,
            expires: sig.options.expires,
            retries: sig.options.retries,
            time_limit: sig.options.time_limit,
            soft_time_limit: sig.options.soft_time_limit,
            root_id: Some(sig.options.root_id.clone().unwrap_or_else(|| id.clone())),
            parent_id: sig.options.parent_id.clone(),
            argsrepr: Some(repr(&Value::Array(sig.args.clone()))),
            kwargsrepr: Some(repr(&Value::Object(sig.kwargs.clone()))),
            origin: Some(origin()),
            ignore_result: sig.options.ignore_result.unwrap_or(false),
            group,
            group_index,
            extra,
            ..Headers::default()
        };
        Ok(Message {
            headers,
            properties: Properties {
                correlation_id: id,
                reply_to: sig.options.reply_to.clone(),
                priority: sig.options.priority,
            },
            body: body.to_vec(),
        })
    }

    /// Decodes the body.
    pub fn body(&self) -> Result<TaskBody, ProtocolError> {
        TaskBody::from_slice(&self.body)
    }

    /// The same message for its next attempt: `retries + 1` and a new eta.
    pub fn retried(&self, eta: DateTime<Utc>) -> Message {
        let mut m = self.clone();
        m.headers.retries += 1;
        m.headers.eta = Some(eta);
        m
    }

    /// Refuses a message whose encoded body and headers exceed `limit` bytes.
    pub fn check_size(&self, limit: usize) -> Result<(), ProtocolError> {
        let headers = self.headers.extra.iter().map(|(k, v)| k.len() + v.to_string().len()).sum::<usize>();
        let size = self.body.len() + headers;
        if size > limit {
            Err(ProtocolError::TooLarge { size, limit })
        } else {
            Ok(())
        }
    }
}

/// The largest encoded payload (what a broker holds: Kombu's JSON envelope, a log record, an AMQP
/// body) of a message that passes [`Message::check_size`] with `limit`: twice the limit plus
/// 64 KiB, which covers a base64 body (a third larger), the headers' JSON punctuation and the
/// envelope's own fields. A worker refuses larger payloads unread, so nothing a sender with the
/// same limit accepted is refused, and what a worker reads stays bounded.
///
/// ```
/// use celery_core::protocol::max_encoded_size;
/// assert_eq!(max_encoded_size(16 * 1024 * 1024), 32 * 1024 * 1024 + 64 * 1024);
/// assert_eq!(max_encoded_size(usize::MAX), usize::MAX);
/// ```
pub fn max_encoded_size(limit: usize) -> usize {
    limit.saturating_mul(2).saturating_add(64 * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn times_are_written_as_celery_writes_them() {
        use chrono::TimeZone;
        let whole = Utc.with_ymd_and_hms(2026, 12, 2, 11, 53, 0).unwrap();
        assert_eq!(format_time(whole), "2026-12-02T11:53:00.000000+00:00");
        let t = whole + chrono::Duration::microseconds(123_456);
        assert_eq!(format_time(t), "2026-12-02T11:53:00.123456+00:00");
        assert_eq!(parse_time(&format_time(t)).unwrap(), t);
    }

    #[test]
    fn the_fast_header_decoder_agrees_with_from_json() {
        let samples = [
            json!({"lang": "py", "task": "add", "id": "x1", "retries": 2, "timelimit": [null, 5.5],
                   "eta": "2026-01-01T00:00:00.000000+00:00", "group_index": 3, "ignore_result": true,
                   "stamps": {"a": 1}, "replaced_task_nesting": 0, "root_id": null}),
            json!({"task": "t", "id": "i"}),
            serde_json::Value::Object(
                Message::from_signature(
                    &Signature::by_name("add").args(json!([1, 2])).countdown(std::time::Duration::from_secs(5)),
                )
                .unwrap()
                .headers
                .to_json(),
            ),
        ];
        for v in samples {
            let fast: Headers = serde_json::from_value(v.clone()).unwrap();
            assert_eq!(fast, Headers::from_json(&v).unwrap(), "{v}");
        }
        for bad in [json!({"id": "i"}), json!({"task": "t", "id": "i", "retries": "x"}), json!({"task": 1, "id": "i"})]
        {
            assert!(serde_json::from_value::<Headers>(bad.clone()).is_err(), "{bad}");
            assert!(Headers::from_json(&bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn python_headers_decode() {
        let h = json!({"lang": "py", "task": "add", "id": "abc", "shadow": null, "eta": "2026-01-01T10:00:00.123456+00:00",
            "expires": null, "group": null, "group_index": null, "retries": 2, "timelimit": [10.0, null],
            "root_id": "abc", "parent_id": null, "argsrepr": "(2, 3)", "kwargsrepr": "{}", "origin": "gen1@h",
            "ignore_result": false, "stamped_headers": null, "stamps": {}, "x-custom": 1});
        let d = Headers::from_json(&h).unwrap();
        assert_eq!(d.retries, 2);
        assert_eq!(d.time_limit, Some(10.0));
        assert_eq!(d.soft_time_limit, None);
        assert_eq!(d.eta.unwrap().timestamp_subsec_micros(), 123456);
        assert_eq!(d.extra.get("x-custom"), Some(&json!(1)));
        let back = d.to_json();
        assert_eq!(back["timelimit"], json!([10.0, null]));
        assert_eq!(back["x-custom"], json!(1));
    }

    #[test]
    fn naive_eta_is_utc() {
        let t = parse_time("2026-01-01T10:00:00").unwrap();
        assert_eq!(format_time(t), "2026-01-01T10:00:00.000000+00:00");
    }

    #[test]
    fn bad_headers_name_the_field() {
        assert_eq!(Headers::from_json(&json!({"task": "t"})), Err(ProtocolError::MissingField("id")));
        let inner = |e: ProtocolError| match e {
            ProtocolError::InvalidHeaders { error, .. } => *error,
            other => panic!("expected InvalidHeaders, got {other:?}"),
        };
        assert_eq!(inner(Headers::from_json(&json!({"id": "x"})).unwrap_err()), ProtocolError::MissingField("task"));
        let e = Headers::from_json(&json!({"id": "x", "task": "t", "retries": "many"})).unwrap_err();
        assert!(matches!(inner(e), ProtocolError::InvalidField { field: "retries", .. }));
        let e = Headers::from_json(&json!({"id": "x", "task": "t", "eta": "tomorrow"})).unwrap_err();
        assert!(e.to_string().contains("`eta`") && e.to_string().contains("task id `x`"), "{e}");
        assert!(matches!(inner(e), ProtocolError::InvalidField { field: "eta", .. }));
    }

    #[test]
    fn headers_that_do_not_parse_keep_a_lenient_id() {
        let e = Headers::from_json(&json!({"id": "x9", "task": "add", "timelimit": "soon"})).unwrap_err();
        assert_eq!(e.task_id(), Some("x9"));
        let e = e.with_reply_to(Some("reply.q"));
        assert!(
            matches!(&e, ProtocolError::InvalidHeaders { task: Some(t), reply_to: Some(r), .. } if t == "add" && r == "reply.q"),
            "{e:?}"
        );
        // No usable id: the plain error.
        let e = Headers::from_json(&json!({"id": ["x"], "task": "add"})).unwrap_err();
        assert_eq!(e.task_id(), None);
        let e = Headers::from_json(&json!({"id": "a\nb", "task": 1})).unwrap_err();
        assert_eq!(e.task_id(), None);
        let e = Headers::from_json(&json!({"id": "i".repeat(300), "task": 1})).unwrap_err();
        assert_eq!(e.task_id(), None);
    }

    #[test]
    fn body_roundtrip_and_errors() {
        let b = TaskBody::from_slice(br#"[[1, 2], {"a": 1}, {"callbacks": null}]"#).unwrap();
        assert_eq!(b.args, vec![json!(1), json!(2)]);
        assert_eq!(TaskBody::from_slice(&b.to_vec()).unwrap().kwargs, b.kwargs);
        assert!(matches!(TaskBody::from_slice(b"{"), Err(ProtocolError::InvalidJson(_))));
        assert!(matches!(TaskBody::from_slice(b"[1, {}, {}]"), Err(ProtocolError::InvalidField { field: "args", .. })));
        assert!(matches!(TaskBody::from_slice(b"[[], 2]"), Err(ProtocolError::InvalidField { field: "kwargs", .. })));
        assert!(matches!(
            TaskBody::from_slice(b"[[], {}, []]"),
            Err(ProtocolError::InvalidField { field: "embed", .. })
        ));
        assert!(matches!(TaskBody::from_slice(b"[]"), Err(ProtocolError::InvalidField { field: "body", .. })));
        assert!(matches!(
            TaskBody::from_slice(b"[[], {}, {}, 4]"),
            Err(ProtocolError::InvalidField { field: "body", .. })
        ));
        // Short bodies, nulls, and embed's null entries left out.
        let short = TaskBody::from_slice(br#"[[7]]"#).unwrap();
        assert_eq!((short.args, short.kwargs.len(), short.embed.len()), (vec![json!(7)], 0, 0));
        let nulls =
            TaskBody::from_slice(br#"[null, null, {"chain": null, "chord": {"task": "t"}, "k\u00e9": 1}]"#).unwrap();
        assert!(nulls.args.is_empty());
        assert_eq!(Value::Object(nulls.embed), json!({"chord": {"task": "t"}, "k\u{e9}": 1}));
        // The last of a key given twice counts, null or not.
        let twice = TaskBody::from_slice(br#"[[], {}, {"chain": [1], "chain": null, "chord": null, "chord": 2}]"#);
        assert_eq!(Value::Object(twice.unwrap().embed), json!({"chord": 2}));
    }

    #[test]
    fn hostile_bodies_are_errors_not_panics() {
        let invalid_json = |b: &[u8]| matches!(TaskBody::from_slice(b), Err(ProtocolError::InvalidJson(_)));
        // Truncated inside the embed, after a key, inside a string.
        assert!(invalid_json(br#"[[], {}, {"chain": [1]"#));
        assert!(invalid_json(br#"[[], {}, {"chain""#));
        assert!(invalid_json(br#"[[], {}, {"ch"#));
        // A number too large for JSON's doubles, anywhere.
        assert!(invalid_json(br#"[[1e400], {}, {}]"#));
        assert!(invalid_json(br#"[[], {}, {"chord": 1e999}]"#));
        // Nesting past serde_json's recursion limit.
        let deep = format!("[[], {{}}, {{\"chord\": {}{}}}]", "[".repeat(10_000), "]".repeat(10_000));
        assert!(invalid_json(deep.as_bytes()));
        // Wrong types: an embed that is not an object, an embed key that is not a string.
        assert!(matches!(
            TaskBody::from_slice(br#"[[], {}, "chain"]"#),
            Err(ProtocolError::InvalidField { field: "embed", .. })
        ));
        assert!(invalid_json(br#"[[], {}, {1: null}]"#));
        // Huge integers that fit JSON are kept as they are.
        let big = TaskBody::from_slice(br#"[[18446744073709551615, -9223372036854775808], {}, {}]"#).unwrap();
        assert_eq!(big.args, vec![json!(u64::MAX), json!(i64::MIN)]);
    }

    #[test]
    fn chains_are_embedded_reversed_like_celery() {
        let mut first = Signature::by_name("a");
        first.options.chain = vec![Signature::by_name("b"), Signature::by_name("c").immutable()];
        let first = first.link(Signature::by_name("cb").args(json!([1])));
        let body = Message::from_signature(&first).unwrap().body().unwrap();
        let chain = body.embed["chain"].as_array().unwrap();
        assert_eq!(chain.iter().map(|s| s["task"].as_str().unwrap()).collect::<Vec<_>>(), ["c", "b"]);
        assert_eq!(chain[0]["immutable"], json!(true));
        assert_eq!(body.embed["callbacks"][0]["args"], json!([1]));
        let back = Signature::from_json(&chain[1]).unwrap();
        assert_eq!(back.task, "b");
        let full = Signature::by_name("t")
            .time_limit(std::time::Duration::from_secs(3))
            .expires_in(std::time::Duration::from_secs(60))
            .ignore_result(true);
        let again = Signature::from_json(&full.to_json()).unwrap();
        assert_eq!((again.options.time_limit, again.options.ignore_result), (Some(3.0), Some(true)));
        assert_eq!(again.options.expires.map(|t| t.timestamp()), full.options.expires.map(|t| t.timestamp()));
    }

    #[test]
    fn only_json_is_executed() {
        assert!(check_content_type("application/json").is_ok());
        assert!(matches!(
            check_content_type("application/x-python-serialize"),
            Err(ProtocolError::UnsupportedContentType(_))
        ));
    }
}

//! Tracing across services: the W3C trace context a message carries, and the spans of a task's
//! life (send, queue wait, run, retry, result store).
//!
//! The context travels in the Celery message headers under the names
//! opentelemetry-instrumentation-celery uses, [`TRACEPARENT`] and [`TRACESTATE`] (top-level
//! protocol v2 headers, which Python's worker reads back as `task.request.traceparent`), so a trace
//! started by a Python producer continues on our worker and ours on a Python worker. A message we
//! send while tracing also carries [`SENT_AT`], the time it was sent, from which the worker's
//! queue-wait span starts.
//!
//! Header values are input: [`TraceContext::from_headers`] accepts only a well-formed
//! `traceparent` (W3C Trace Context level 1, at most [`MAX_TRACEPARENT`] bytes) and a `tracestate`
//! of at most [`MAX_TRACESTATE`] bytes and 32 members; anything else is ignored, never an error.
//!
//! Spans are `tracing` spans with the target [`TARGET`], created only while tracing is
//! [`enabled`]: with the crate feature `otel` the worker's CLI enables it when an OTLP exporter is
//! installed (`--otlp-endpoint`), and `tracing-opentelemetry` turns them into OpenTelemetry spans.
//! Off (the feature, or the flag), no span is created, nothing is injected, and a worker only
//! copies a message's trace context onto the tasks it sends next ([`inherit`]), so a trace still
//! reaches a traced service downstream.
//!
//! ```
//! use celery_core::trace::{TraceContext, TRACEPARENT};
//! let headers = serde_json::json!({
//!     "task": "add", "id": "1",
//!     "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
//! });
//! let h = celery_core::protocol::Headers::from_json(&headers).unwrap();
//! let cx = TraceContext::from_headers(&h).unwrap();
//! assert_eq!(cx.parent.to_string(), headers[TRACEPARENT]);
//! assert!(cx.parent.sampled());
//! ```

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};

use chrono::{DateTime, Utc};
use serde_json::{Map, Value};

use crate::protocol::{format_time, parse_time, Headers};

/// The header of the W3C `traceparent` (the name opentelemetry-instrumentation-celery uses).
pub const TRACEPARENT: &str = "traceparent";
/// The header of the W3C `tracestate`.
pub const TRACESTATE: &str = "tracestate";
/// The header with the time a traced message was sent (ISO-8601, as `eta`), where the worker's
/// queue-wait span starts.
pub const SENT_AT: &str = "x-sent-at";
/// The `tracing` target of the task queue's spans (what an exporter's filter selects).
pub const TARGET: &str = "celery::trace";
/// The longest `traceparent` read (a version-00 one is 55 bytes; later versions may append).
pub const MAX_TRACEPARENT: usize = 256;
/// The longest `tracestate` read (W3C: at least 512 must be propagated).
pub const MAX_TRACESTATE: usize = 512;
/// The most `tracestate` list members read (W3C's limit).
const MAX_TRACESTATE_MEMBERS: usize = 32;
/// The longest `x-sent-at` read.
const MAX_SENT_AT: usize = 64;

static ENABLED: AtomicBool = AtomicBool::new(false);

/// Whether spans are created and trace context injected: after [`enable`], and only in a build
/// with the `otel` feature (otherwise always false, and the checks compile away).
#[inline]
pub fn enabled() -> bool {
    cfg!(feature = "otel") && ENABLED.load(Ordering::Relaxed)
}

/// Turns spans and injection on for this process. Call it once an OpenTelemetry layer filtering
/// [`TARGET`] is installed in the `tracing` subscriber (the CLI's `--otlp-endpoint` does both).
/// Without the `otel` feature it has no effect.
///
/// ```
/// celery_core::trace::enable();
/// assert_eq!(celery_core::trace::enabled(), cfg!(feature = "otel"));
/// ```
pub fn enable() {
    ENABLED.store(true, Ordering::Relaxed);
}

/// A parsed `traceparent`: trace id, parent span id and flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceParent {
    /// The trace id (never all zeros).
    pub trace_id: [u8; 16],
    /// The span id of the parent (never all zeros).
    pub span_id: [u8; 8],
    /// The trace flags (bit 0: sampled).
    pub flags: u8,
}

impl TraceParent {
    /// Parses a `traceparent` header value; `None` when it is not a valid one (W3C Trace Context:
    /// lowercase hex, version `ff` and all-zero ids refused, a later version's extra fields
    /// after a `-` ignored).
    ///
    /// ```
    /// use celery_core::trace::TraceParent;
    /// assert!(TraceParent::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").is_some());
    /// assert!(TraceParent::parse("00-00000000000000000000000000000000-00f067aa0ba902b7-01").is_none());
    /// assert!(TraceParent::parse("00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01").is_none());
    /// assert!(TraceParent::parse("garbage").is_none());
    /// ```
    pub fn parse(s: &str) -> Option<TraceParent> {
        let b = s.as_bytes();
        if b.len() < 55 || b.len() > MAX_TRACEPARENT || b[2] != b'-' || b[35] != b'-' || b[52] != b'-' {
            return None;
        }
        let version = hex_byte(&b[0..2])?;
        match version {
            0xff => return None,
            0 if b.len() != 55 => return None,
            _ if b.len() > 55 && b[55] != b'-' => return None,
            _ => {}
        }
        let mut trace_id = [0u8; 16];
        for (i, out) in trace_id.iter_mut().enumerate() {
            *out = hex_byte(&b[3 + 2 * i..5 + 2 * i])?;
        }
        let mut span_id = [0u8; 8];
        for (i, out) in span_id.iter_mut().enumerate() {
            *out = hex_byte(&b[36 + 2 * i..38 + 2 * i])?;
        }
        let flags = hex_byte(&b[53..55])?;
        if trace_id == [0; 16] || span_id == [0; 8] {
            return None;
        }
        Some(TraceParent { trace_id, span_id, flags })
    }

    /// Whether the sampled flag is set.
    pub fn sampled(&self) -> bool {
        self.flags & 1 == 1
    }
}

impl fmt::Display for TraceParent {
    /// The version-00 header value.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("00-")?;
        self.trace_id.iter().try_for_each(|b| write!(f, "{b:02x}"))?;
        f.write_str("-")?;
        self.span_id.iter().try_for_each(|b| write!(f, "{b:02x}"))?;
        write!(f, "-{:02x}", self.flags)
    }
}

/// Two lowercase hex digits.
fn hex_byte(pair: &[u8]) -> Option<u8> {
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    Some(digit(pair[0])? << 4 | digit(pair[1])?)
}

/// Whether `s` is a `tracestate` worth carrying: at most [`MAX_TRACESTATE`] bytes and 32 members,
/// each `key=value` with W3C's characters (empty members are allowed, as the spec does).
///
/// ```
/// use celery_core::trace::valid_tracestate;
/// assert!(valid_tracestate("rojo=00f067aa0ba902b7,congo=t61rcWkgMzE"));
/// assert!(!valid_tracestate("no-equals-sign"));
/// assert!(!valid_tracestate(&"k=v,".repeat(200)));
/// ```
pub fn valid_tracestate(s: &str) -> bool {
    if s.len() > MAX_TRACESTATE {
        return false;
    }
    let mut members = 0;
    for member in s.split(',').map(|m| m.trim_matches([' ', '\t'])).filter(|m| !m.is_empty()) {
        members += 1;
        let Some((key, value)) = member.split_once('=') else { return false };
        let key_ok = !key.is_empty()
            && key.len() <= 256
            && key.bytes().next().is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
            && key.bytes().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || b"_-*/@".contains(&c));
        let value_ok = !value.is_empty()
            && value.len() <= 256
            && value.bytes().all(|c| (0x20..=0x7e).contains(&c) && c != b',' && c != b'=')
            && !value.ends_with(' ');
        if !key_ok || !value_ok || members > MAX_TRACESTATE_MEMBERS {
            return false;
        }
    }
    true
}

/// The trace context a message carries: its `traceparent` and, when valid, its `tracestate`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceContext {
    /// The parsed `traceparent`.
    pub parent: TraceParent,
    /// The `tracestate`, when present and valid.
    pub state: Option<String>,
}

impl TraceContext {
    /// The context in these headers; `None` when there is no valid `traceparent` (a malformed
    /// one is ignored, as is a malformed `tracestate`).
    pub fn from_headers(h: &Headers) -> Option<TraceContext> {
        TraceContext::from_map(&h.extra)
    }

    /// The same from a map of extra headers.
    pub fn from_map(extra: &Map<String, Value>) -> Option<TraceContext> {
        let parent = TraceParent::parse(extra.get(TRACEPARENT)?.as_str()?)?;
        let state = extra.get(TRACESTATE).and_then(Value::as_str).filter(|s| valid_tracestate(s)).map(str::to_owned);
        Some(TraceContext { parent, state })
    }

    /// Writes `traceparent` (and `tracestate`, or removes a stale one) into extra headers.
    pub fn write(&self, extra: &mut Map<String, Value>) {
        extra.insert(TRACEPARENT.into(), Value::String(self.parent.to_string()));
        match &self.state {
            Some(s) if !s.is_empty() => extra.insert(TRACESTATE.into(), Value::String(s.clone())),
            _ => extra.remove(TRACESTATE),
        };
    }
}

/// Copies the valid trace context of `from` (a message being run) into `into` (the extra
/// headers of a task it sends next), so the next task stays in the same trace. A traced send
/// replaces it with its own span's context.
///
/// ```
/// use celery_core::trace::{inherit, TRACEPARENT};
/// let mut h = celery_core::protocol::Headers::default();
/// h.extra.insert(TRACEPARENT.into(), "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into());
/// let mut next = serde_json::Map::new();
/// inherit(&h, &mut next);
/// assert_eq!(next[TRACEPARENT], h.extra[TRACEPARENT]);
/// ```
pub fn inherit(from: &Headers, into: &mut Map<String, Value>) {
    if let Some(cx) = TraceContext::from_headers(from) {
        cx.write(into);
    }
}

/// When the message was sent ([`SENT_AT`]), if it says so (and it parses).
pub fn sent_at(h: &Headers) -> Option<DateTime<Utc>> {
    let s = h.extra.get(SENT_AT)?.as_str().filter(|s| s.len() <= MAX_SENT_AT)?;
    parse_time(s).ok()
}

/// Puts the context of `span` (when it is a live traced span) into `headers`, with the time of
/// sending; otherwise leaves them as they are.
pub fn inject(span: &tracing::Span, headers: &mut Headers) {
    if !enabled() {
        return;
    }
    if let Some(cx) = bridge::context_of(span) {
        cx.write(&mut headers.extra);
        headers.extra.insert(SENT_AT.into(), Value::String(format_time(Utc::now())));
    }
}

/// The span of sending one task (`apply_async/<task>`, kind producer, as Python's
/// instrumentation names it), a child of the current span; disabled when tracing is off.
pub fn send_span(h: &Headers, queue: &str) -> tracing::Span {
    if !enabled() {
        return tracing::Span::none();
    }
    tracing::info_span!(
        target: TARGET, "apply_async",
        otel.name = format!("apply_async/{}", h.task), otel.kind = "producer",
        celery.action = "apply_async", celery.task_name = %h.task, messaging.message.id = %h.id,
        messaging.system = "celery", messaging.destination.name = queue,
    )
}

/// The span of running one task (`run/<task>`, kind consumer), whose parent is the message's trace
/// context (a new trace without one); its `celery.state` is recorded with [`record_state`].
/// Disabled when tracing is off.
pub fn run_span(h: &Headers, queue: &str, hostname: &str) -> tracing::Span {
    if !enabled() {
        return tracing::Span::none();
    }
    let span = tracing::info_span!(
        target: TARGET, parent: None, "run",
        otel.name = format!("run/{}", h.task), otel.kind = "consumer",
        celery.action = "run", celery.task_name = %h.task, messaging.message.id = %h.id,
        messaging.system = "celery", messaging.destination.name = queue, celery.hostname = hostname,
        celery.retries = h.retries, celery.state = tracing::field::Empty,
        otel.status_description = tracing::field::Empty,
    );
    if let Some(cx) = TraceContext::from_headers(h) {
        bridge::set_parent(&span, &cx);
    }
    span
}

/// The span of retrying a task (`retry/<task>`, kind producer): the next attempt's message
/// carries its context. Disabled when tracing is off.
pub fn retry_span(h: &Headers, reason: &dyn fmt::Display) -> tracing::Span {
    if !enabled() {
        return tracing::Span::none();
    }
    tracing::info_span!(
        target: TARGET, "retry",
        otel.name = format!("retry/{}", h.task), otel.kind = "producer",
        celery.action = "retry", celery.task_name = %h.task, messaging.message.id = %h.id,
        celery.retries = h.retries + 1, celery.retry.reason = %reason,
    )
}

/// The span of storing a task's state in the result backend (`store/<task>`, kind client).
/// Disabled when tracing is off.
pub fn store_span(task: &str, id: &str, state: &str, backend: &str) -> tracing::Span {
    if !enabled() {
        return tracing::Span::none();
    }
    tracing::info_span!(
        target: TARGET, "store",
        otel.name = format!("store/{task}"), otel.kind = "client",
        celery.action = "store", celery.task_name = task, messaging.message.id = id,
        celery.state = state, celery.backend = backend,
    )
}

/// Records the final state of a run on its span (`celery.state`; an error status for FAILURE).
pub fn record_state(span: &tracing::Span, state: &str, error: Option<&str>) {
    if !enabled() {
        return;
    }
    span.record("celery.state", state);
    if let Some(e) = error {
        // tracing-opentelemetry sets an error status with this description.
        span.record("otel.status_description", e);
    }
}

/// The queue-wait span (`wait/<task>`): from the message's [`SENT_AT`] to `until` (when its run
/// starts: the queue, eta and rate-limit waits included), a child of the message's trace context.
/// Nothing without a traced sender (no `x-sent-at`) or when tracing is off.
pub fn record_queue_wait(h: &Headers, queue: &str, until: DateTime<Utc>) {
    if !enabled() {
        return;
    }
    let (Some(cx), Some(sent)) = (TraceContext::from_headers(h), sent_at(h)) else { return };
    // Another host's clock may be ahead: never a negative wait.
    let start = sent.min(until);
    bridge::queue_wait(&cx, h, queue, start.into(), until.into());
}

#[cfg(feature = "otel")]
mod bridge {
    //! From and to OpenTelemetry, through tracing-opentelemetry.
    use std::time::SystemTime;

    use opentelemetry::trace::{
        SpanContext, SpanId, SpanKind, TraceContextExt, TraceFlags, TraceId, TraceState, Tracer,
    };
    use opentelemetry::KeyValue;
    use tracing_opentelemetry::OpenTelemetrySpanExt;

    use super::{TraceContext, TraceParent};
    use crate::protocol::Headers;

    fn remote(cx: &TraceContext) -> opentelemetry::Context {
        let state = cx.state.as_deref().and_then(|s| s.parse::<TraceState>().ok()).unwrap_or_default();
        let sc = SpanContext::new(
            TraceId::from_bytes(cx.parent.trace_id),
            SpanId::from_bytes(cx.parent.span_id),
            TraceFlags::new(cx.parent.flags),
            true,
            state,
        );
        opentelemetry::Context::new().with_remote_span_context(sc)
    }

    pub(super) fn set_parent(span: &tracing::Span, cx: &TraceContext) {
        if let Err(e) = span.set_parent(remote(cx)) {
            tracing::debug!(error = %e, "cannot continue the message's trace");
        }
    }

    pub(super) fn context_of(span: &tracing::Span) -> Option<TraceContext> {
        let cx = span.context();
        let sc = cx.span().span_context().clone();
        if !sc.is_valid() {
            return None;
        }
        let state = sc.trace_state().header();
        Some(TraceContext {
            parent: TraceParent {
                trace_id: sc.trace_id().to_bytes(),
                span_id: sc.span_id().to_bytes(),
                flags: sc.trace_flags().to_u8(),
            },
            state: (!state.is_empty()).then_some(state),
        })
    }

    pub(super) fn queue_wait(cx: &TraceContext, h: &Headers, queue: &str, start: SystemTime, end: SystemTime) {
        let tracer = opentelemetry::global::tracer("celery");
        let span = tracer
            .span_builder(format!("wait/{}", h.task))
            .with_kind(SpanKind::Consumer)
            .with_start_time(start)
            .with_attributes([
                KeyValue::new("celery.action", "wait"),
                KeyValue::new("celery.task_name", h.task.clone()),
                KeyValue::new("messaging.message.id", h.id.clone()),
                KeyValue::new("messaging.destination.name", queue.to_owned()),
            ])
            .start_with_context(&tracer, &remote(cx));
        opentelemetry::trace::Span::end_with_timestamp(&mut { span }, end);
    }
}

#[cfg(not(feature = "otel"))]
mod bridge {
    //! Without the `otel` feature: never called ([`super::enabled`] is false).
    use std::time::SystemTime;

    use super::TraceContext;
    use crate::protocol::Headers;

    pub(super) fn set_parent(_: &tracing::Span, _: &TraceContext) {}

    pub(super) fn context_of(_: &tracing::Span) -> Option<TraceContext> {
        None
    }

    pub(super) fn queue_wait(_: &TraceContext, _: &Headers, _: &str, _: SystemTime, _: SystemTime) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn traceparent_roundtrips_and_refuses_what_w3c_refuses() {
        let p = TraceParent::parse(TP).unwrap();
        assert_eq!(p.to_string(), TP);
        assert_eq!(p.span_id, [0x00, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7]);
        assert!(p.sampled());
        assert!(!TraceParent::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00").unwrap().sampled());
        // A later version may append fields after a dash; its first four fields are read.
        let later = format!("cc{}-what-ever", &TP[2..]);
        assert_eq!(TraceParent::parse(&later).map(|p| p.trace_id), Some(p.trace_id));
        for bad in [
            "",
            "00",
            &TP[..54],
            &format!("{TP}-"),                                         // version 00 is exactly 55 bytes
            &format!("ff{}", &TP[2..]),                                // version ff is invalid
            &format!("cc{}x", &TP[2..]),                               // appended without a dash
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01", // zero trace id
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01", // zero span id
            "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01", // not hex
            "00_4bf92f3577b34da6a3ce929d0e0e4736_00f067aa0ba902b7_01", // wrong separators
            &format!("cc{}-{}", &TP[2..], "x".repeat(300)),            // too long
        ] {
            assert_eq!(TraceParent::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn tracestate_is_bounded_and_checked() {
        assert!(valid_tracestate(""));
        assert!(valid_tracestate("rojo=00f067aa0ba902b7, congo=t61rcWkgMzE,,"));
        assert!(valid_tracestate("tenant@vendor=x"));
        assert!(!valid_tracestate("Upper=x"));
        assert!(!valid_tracestate("k="));
        assert!(!valid_tracestate("k=a\u{1}b"));
        assert!(!valid_tracestate(&(0..33).map(|i| format!("k{i}=v")).collect::<Vec<_>>().join(",")));
        assert!(valid_tracestate(&(0..32).map(|i| format!("k{i}=v")).collect::<Vec<_>>().join(",")));
        assert!(!valid_tracestate(&format!("k={}", "v".repeat(MAX_TRACESTATE))));
    }

    #[test]
    fn malformed_context_is_ignored_never_an_error() {
        let headers = |extra: Value| {
            let mut v = json!({"task": "add", "id": "1"});
            v.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
            Headers::from_json(&v).unwrap()
        };
        assert_eq!(TraceContext::from_headers(&headers(json!({}))), None);
        assert_eq!(TraceContext::from_headers(&headers(json!({"traceparent": 7}))), None);
        assert_eq!(TraceContext::from_headers(&headers(json!({"traceparent": "00-zz"}))), None);
        let cx = TraceContext::from_headers(&headers(json!({"traceparent": TP, "tracestate": "Bad State"}))).unwrap();
        assert_eq!(cx.state, None, "a malformed tracestate is dropped, the traceparent kept");
        let cx = TraceContext::from_headers(&headers(json!({"traceparent": TP, "tracestate": "a=1"}))).unwrap();
        assert_eq!(cx.state.as_deref(), Some("a=1"));
        // Inherited by the next task, and written back as it came.
        let mut next = Map::new();
        inherit(&headers(json!({"traceparent": TP, "tracestate": "a=1"})), &mut next);
        assert_eq!(Value::Object(next), json!({"traceparent": TP, "tracestate": "a=1"}));
        let mut next = Map::new();
        inherit(&headers(json!({"traceparent": "bad", "tracestate": "a=1"})), &mut next);
        assert!(next.is_empty());
    }

    #[test]
    fn sent_at_reads_what_inject_writes() {
        let t = Utc::now();
        let mut h = Headers::default();
        h.extra.insert(SENT_AT.into(), Value::String(format_time(t)));
        assert_eq!(sent_at(&h).map(|s| s.timestamp_micros()), Some(t.timestamp_micros()));
        h.extra.insert(SENT_AT.into(), Value::String("x".repeat(100)));
        assert_eq!(sent_at(&h), None);
    }

    #[test]
    fn off_means_no_spans() {
        // Nothing here enables tracing: every span is disabled and nothing is injected.
        if enabled() {
            return;
        }
        let mut h = Headers { task: "add".into(), id: "1".into(), ..Headers::default() };
        assert!(send_span(&h, "celery").is_none());
        assert!(run_span(&h, "celery", "w").is_none());
        inject(&tracing::Span::none(), &mut h);
        assert!(h.extra.is_empty());
    }
}

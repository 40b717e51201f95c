//! A tiny OTLP/HTTP collector for the tracing suites: a TCP listener on loopback that accepts the
//! exporters' `POST /v1/traces` (protobuf `ExportTraceServiceRequest`, HTTP/1.1 with keep-alive)
//! and keeps every span it receives, with its resource's `service.name` and `process.pid`.
//!
//! Requests are bounded (16 KiB of head, 16 MiB of body); anything else gets a 400 and closes the
//! connection.

use std::sync::{Arc, Mutex};

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{any_value, KeyValue};
use prost::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const MAX_HEAD: usize = 16 * 1024;
const MAX_BODY: usize = 16 * 1024 * 1024;

/// One received span.
#[derive(Debug, Clone, PartialEq)]
pub struct Span {
    /// Its name (`run/add`).
    pub name: String,
    /// Trace id, lowercase hex.
    pub trace_id: String,
    /// Span id, lowercase hex.
    pub span_id: String,
    /// The parent's span id, lowercase hex (empty for a root).
    pub parent_span_id: String,
    /// OTLP's span kind (2 server, 3 client, 4 producer, 5 consumer).
    pub kind: i32,
    /// Its string and integer attributes, as text.
    pub attributes: Vec<(String, String)>,
    /// Its resource's `process.pid`.
    pub pid: i64,
    /// Its resource's `service.name`.
    pub service: String,
    /// Start and end, in nanoseconds since the epoch.
    pub start_end: (u64, u64),
}

impl Span {
    /// An attribute's value as text.
    pub fn attr(&self, key: &str) -> Option<&str> {
        self.attributes.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }
}

/// A running collector; it stops when dropped.
#[derive(Debug)]
pub struct Collector {
    /// The base URL to give `--otlp-endpoint` (`http://127.0.0.1:PORT`).
    pub url: String,
    spans: Arc<Mutex<Vec<Span>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Collector {
    /// Listens on a free loopback port.
    pub async fn start() -> Collector {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind the collector");
        let url = format!("http://{}", listener.local_addr().expect("collector address"));
        let spans = Arc::new(Mutex::new(Vec::new()));
        let kept = spans.clone();
        let task = tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                tokio::spawn(serve(conn, kept.clone()));
            }
        });
        Collector { url, spans, task }
    }

    /// Every span received so far.
    pub fn spans(&self) -> Vec<Span> {
        self.spans.lock().expect("spans").clone()
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(mut conn: TcpStream, spans: Arc<Mutex<Vec<Span>>>) {
    let mut buf = Vec::new();
    loop {
        let Some(head_end) = read_head(&mut conn, &mut buf).await else { return };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
        let length = head
            .lines()
            .find_map(|l| l.split_once(':').filter(|(k, _)| k.eq_ignore_ascii_case("content-length")))
            .and_then(|(_, v)| v.trim().parse::<usize>().ok());
        let ok_request = head.starts_with("POST ") && head.lines().next().is_some_and(|l| l.contains("/v1/traces"));
        let Some(length) = length.filter(|l| *l <= MAX_BODY && ok_request) else {
            let _ = conn.write_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n").await;
            return;
        };
        let start = head_end + 4;
        while buf.len() < start + length {
            let mut chunk = [0u8; 8192];
            match conn.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        let body: Vec<u8> = buf.drain(..start + length).skip(start).collect();
        let status = match ExportTraceServiceRequest::decode(body.as_slice()) {
            Ok(req) => {
                spans.lock().expect("spans").extend(flatten(req));
                "200 OK"
            }
            Err(_) => "400 Bad Request",
        };
        let reply = format!("HTTP/1.1 {status}\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\n\r\n");
        if conn.write_all(reply.as_bytes()).await.is_err() {
            return;
        }
    }
}

/// Reads until the end of a request head; its offset (of `\r\n\r\n`), or `None` when the
/// connection ends or the head is too large.
async fn read_head(conn: &mut TcpStream, buf: &mut Vec<u8>) -> Option<usize> {
    loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            return Some(i);
        }
        if buf.len() > MAX_HEAD {
            return None;
        }
        let mut chunk = [0u8; 8192];
        match conn.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

fn text(kv: &KeyValue) -> Option<String> {
    match kv.value.as_ref()?.value.as_ref()? {
        any_value::Value::StringValue(s) => Some(s.clone()),
        any_value::Value::IntValue(i) => Some(i.to_string()),
        any_value::Value::BoolValue(b) => Some(b.to_string()),
        any_value::Value::DoubleValue(d) => Some(d.to_string()),
        _ => None,
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn flatten(req: ExportTraceServiceRequest) -> Vec<Span> {
    let mut out = Vec::new();
    for rs in req.resource_spans {
        let attrs = rs.resource.map(|r| r.attributes).unwrap_or_default();
        let find = |key: &str| attrs.iter().find(|kv| kv.key == key).and_then(text);
        let pid = find("process.pid").and_then(|p| p.parse().ok()).unwrap_or(-1);
        let service = find("service.name").unwrap_or_default();
        for ss in rs.scope_spans {
            for s in ss.spans {
                out.push(Span {
                    name: s.name,
                    trace_id: hex(&s.trace_id),
                    span_id: hex(&s.span_id),
                    parent_span_id: hex(&s.parent_span_id),
                    kind: s.kind,
                    attributes: s.attributes.iter().filter_map(|kv| Some((kv.key.clone(), text(kv)?))).collect(),
                    pid,
                    service: service.clone(),
                    start_end: (s.start_time_unix_nano, s.end_time_unix_nano),
                });
            }
        }
    }
    out
}

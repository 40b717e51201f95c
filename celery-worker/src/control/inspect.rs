//! The read-only answers (`celery inspect ...`), each in the shape a Python Celery 5 worker gives.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::Ordering;

use celery_core::registry;
use celery_core::sync::lock;
use celery_core::url::ServiceUrl;
use serde_json::{json, Map, Value};

use super::args::{Args, PyError};
use super::system;
use crate::worker::requests::HeldState;
use crate::worker::Shared;

/// `ping`.
pub(super) fn ping() -> Value {
    json!({"ok": "pong"})
}

/// `active` (`safe`: the reprs of the arguments, as Flower asks).
pub(super) fn active(w: &Shared, args: Args<'_>) -> Value {
    Value::Array(w.requests.active(&w.config.hostname, args.flag("safe")))
}

/// True when `msg`'s eta is far enough ahead that the worker defers it when it takes it (see
/// [`crate::worker::requests`]): Celery lists such a task as scheduled, not reserved.
fn deferrable(msg: &celery_core::protocol::Message, now: chrono::DateTime<chrono::Utc>) -> bool {
    msg.headers.eta.is_some_and(|eta| (eta - now).to_std().is_ok_and(|wait| wait > crate::worker::LOCAL_ETA_WAIT))
}

/// The reserved deliveries (received, waiting for a slot) as `(state, request, eta, priority)`:
/// `scheduled` for those with an eta the worker will defer, else `reserved`.
fn reservations(w: &Shared) -> Vec<(HeldState, Value, Option<String>, Option<u8>)> {
    let host = &w.config.hostname;
    let max = celery_core::protocol::max_encoded_size(w.app.config().max_message_size);
    let now = chrono::Utc::now();
    let mut out = Vec::new();
    w.intake.reserved().each(max, |msg, delivery| {
        let name = registry::lookup(&msg.headers.task).map_or(msg.headers.task.as_str(), |e| e.name);
        let info = crate::worker::requests::request_info(msg, name, host, delivery, None, false, false);
        let state = if deferrable(msg, now) { HeldState::Scheduled } else { HeldState::Reserved };
        out.push((state, info, msg.headers.eta.map(|e| e.to_rfc3339()), msg.properties.priority));
    });
    out
}

/// `reserved`: received and not started: deliveries waiting for a slot, then those that hold one
/// while they wait for a rate limit or a near eta (not those with an eta further ahead: those are
/// `scheduled`).
pub(super) fn reserved(w: &Shared) -> Value {
    let mut out: Vec<Value> = reservations(w).into_iter().filter(|r| r.0 == HeldState::Reserved).map(|r| r.1).collect();
    out.extend(w.requests.waiting(&w.config.hostname));
    Value::Array(out)
}

/// `scheduled`: `[{"eta", "priority", "request"}]`: the tasks this worker deferred to the broker
/// until their eta (see [`crate::worker::requests`]), and those it received with an eta and defers when a
/// slot takes them.
pub(super) fn scheduled(w: &Shared) -> Value {
    let mut out = w.requests.scheduled();
    out.extend(
        reservations(w)
            .into_iter()
            .filter(|r| r.0 == HeldState::Scheduled)
            .map(|(_, request, eta, priority)| json!({"eta": eta, "priority": priority, "request": request})),
    );
    Value::Array(out)
}

/// `query_task` (`ids`, or `id`): `{id: [state, request]}` for the ones this worker holds.
pub(super) fn query_task(w: &Shared, args: Args<'_>) -> Result<Value, PyError> {
    let mut ids = args.ids("ids")?;
    if ids.is_empty() {
        ids = args.ids("id")?;
    }
    let host = &w.config.hostname;
    let mut out = Map::new();
    let mut pending: Vec<String> = Vec::new();
    for id in ids {
        match w.requests.find(&id, host) {
            Some((state, info)) => {
                out.insert(id, json!([state.as_str(), info]));
            }
            None => pending.push(id),
        }
    }
    if !pending.is_empty() {
        for (state, info, _, _) in reservations(w) {
            if let Some(id) = info["id"].as_str().filter(|id| pending.iter().any(|p| p == id)) {
                out.insert(id.to_owned(), json!([state.as_str(), info]));
            }
        }
    }
    Ok(Value::Object(out))
}

/// `registered` (`taskinfoitems`, `builtins`): `name [attr=value ...]` for each task, sorted, the
/// `celery.*` built-ins only with `builtins`.
pub(super) fn registered(w: &Shared, args: Args<'_>) -> Result<Value, PyError> {
    let items = match args.get("taskinfoitems") {
        Some(Value::Array(a)) => a.iter().filter_map(|v| v.as_str().map(str::to_owned)).take(64).collect(),
        Some(Value::String(s)) => vec![s.clone()],
        _ => vec!["exchange".to_owned(), "routing_key".to_owned(), "rate_limit".to_owned()],
    };
    let builtins = args.flag("builtins");
    let overrides = lock(&w.rate_overrides).clone();
    let mut names: Vec<&'static str> =
        registry::tasks().iter().map(|e| e.name).filter(|n| builtins || !n.starts_with("celery.")).collect();
    names.sort_unstable();
    let out = names
        .into_iter()
        .filter_map(registry::lookup)
        .map(|e| {
            let opts = (e.options)();
            let rate = match overrides.get(e.name) {
                Some(Some(interval)) => Some(format!("{}/s", 1.0 / interval.as_secs_f64())),
                Some(None) => None,
                None => opts.rate_limit.map(str::to_owned),
            };
            let fields: Vec<String> = items
                .iter()
                .filter_map(|item| {
                    let v = match item.as_str() {
                        "rate_limit" => rate.clone(),
                        "queue" => opts.queue.map(str::to_owned),
                        "time_limit" => opts.time_limit.map(py_float),
                        "soft_time_limit" => opts.soft_time_limit.map(py_float),
                        "max_retries" => Some(opts.max_retries.to_string()),
                        "default_retry_delay" => Some(py_float(opts.default_retry_delay)),
                        "acks_late" => Some(py_bool(opts.acks_late)),
                        "ignore_result" => Some(py_bool(opts.ignore_result)),
                        "name" => Some(e.name.to_owned()),
                        _ => None,
                    }?;
                    Some(format!("{item}={v}"))
                })
                .collect();
            if fields.is_empty() {
                e.name.to_owned()
            } else {
                format!("{} [{}]", e.name, fields.join(" "))
            }
        })
        .collect::<Vec<_>>();
    Ok(json!(out))
}

fn py_bool(b: bool) -> String {
    if b { "True" } else { "False" }.into()
}

/// Python's `str(float)`: `2.0`, `0.5`.
fn py_float(f: f64) -> String {
    if f.fract() == 0.0 && f.abs() < 1e16 {
        format!("{f:.1}")
    } else {
        f.to_string()
    }
}

/// `revoked`.
pub(super) fn revoked(w: &Shared) -> Value {
    json!(w.revoked.list())
}

/// `active_queues`: the queues consumed now, as Kombu's `Queue.as_dict(recurse=True)`.
pub(super) async fn active_queues(w: &Shared) -> Value {
    Value::Array(w.intake.queues().await.iter().map(|q| q.as_dict()).collect())
}

/// `clock`.
pub(super) fn clock(w: &Shared) -> Value {
    json!({"clock": w.clock.value()})
}

/// `stats`: Celery's `Worker.stats()` fields.
pub(super) async fn stats(w: &Shared) -> Value {
    let totals: BTreeMap<&str, u64> = lock(&w.totals).iter().map(|(k, v)| (*k, *v)).collect();
    let s = &w.stats;
    let mut out = json!({
        "total": totals,
        "pid": std::process::id(),
        "clock": w.clock.value().to_string(),
        "uptime": w.started.elapsed().as_secs(),
        "pool": {
            "implementation": "celery_worker::pool:Pool (tokio tasks)",
            "max-concurrency": w.pool.size(),
            "processes": [std::process::id()],
            "max-tasks-per-child": "N/A",
            "put-guarded-by-semaphore": true,
            "timeouts": [0, 0],
            "writes": "N/A",
        },
        "prefetch_count": w.intake.prefetch(),
        "rusage": system::rusage().unwrap_or_else(|| json!("N/A")),
        "broker": broker_info(w),
        "sw_ident": "celery-rs",
        "sw_ver": env!("CARGO_PKG_VERSION"),
        "sw_sys": std::env::consts::OS,
        "outcomes": {
            "succeeded": s.succeeded.load(Ordering::Relaxed), "failed": s.failed.load(Ordering::Relaxed),
            "retried": s.retried.load(Ordering::Relaxed), "revoked": s.revoked.load(Ordering::Relaxed),
            "rejected": s.rejected.load(Ordering::Relaxed), "requeued": s.requeued.load(Ordering::Relaxed),
            "already_done": s.already_done.load(Ordering::Relaxed),
        },
    });
    if let Some(a) = &w.autoscaler {
        let (max, min) = a.bounds();
        out["autoscaler"] = json!({"max": max, "min": min, "current": w.pool.size(), "qty": w.held()});
    }
    out
}

/// The broker connection as Kombu's `Connection.info()`, without the password; `"N/A"` when the
/// app was not connected by URL.
fn broker_info(w: &Shared) -> Value {
    let Some(url) = w.app.broker_url() else { return json!("N/A") };
    let scheme = url.scheme();
    let transport = scheme.split('+').next().unwrap_or(scheme);
    let (host, port) = split_host_port(url.host_port());
    let default_port = match scheme {
        "amqp" => Some(5672),
        "amqps" => Some(5671),
        "redis" | "rediss" => Some(6379),
        _ => None,
    };
    let decode = |s: &str| percent_encoding::percent_decode_str(s).decode_utf8_lossy().into_owned();
    let path = url.path().strip_prefix('/').unwrap_or(url.path());
    let virtual_host = match transport {
        "amqp" | "amqps" if path.is_empty() => "/".to_owned(),
        "log" if !scheme.contains('+') => url.location().to_owned(),
        _ => decode(path),
    };
    let options: Map<String, Value> =
        url.public_options().map(|(k, v)| (k.to_owned(), Value::String(v.to_owned()))).collect();
    let option = |name: &str| url.public_options().find(|(k, _)| *k == name).and_then(|(_, v)| v.parse::<f64>().ok());
    json!({
        "hostname": if transport == "log" && !scheme.contains('+') { None } else { Some(host) },
        "userid": url.username().filter(|u| !u.is_empty()).map(decode),
        "virtual_host": virtual_host,
        "port": port.or(default_port),
        "insist": false,
        "ssl": matches!(scheme, "amqps" | "rediss") || scheme.ends_with("+tls"),
        "transport": transport,
        "connect_timeout": option("connect_timeout").or(option("connection_timeout")),
        "transport_options": options,
        "login_method": matches!(transport, "amqp" | "amqps").then_some("PLAIN"),
        "uri_prefix": null,
        "heartbeat": option("heartbeat"),
        "failover_strategy": "round-robin",
        "alternates": [],
        "credential_provider": null,
    })
}

/// `host:port` (or `[v6]:port`) apart.
fn split_host_port(hp: &str) -> (String, Option<u16>) {
    if let Some(rest) = hp.strip_prefix('[') {
        if let Some((h, p)) = rest.split_once(']') {
            return (h.to_owned(), p.strip_prefix(':').and_then(|p| p.parse().ok()));
        }
    }
    match hp.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') => match p.parse() {
            Ok(port) => (h.to_owned(), Some(port)),
            Err(_) => (hp.to_owned(), None),
        },
        _ => (hp.to_owned(), None),
    }
}

/// A URL as Celery prints a setting holding one (`maybe_sanitize_url`): the password masked
/// with `********`, the query (where secret options may sit) left out.
pub(super) fn sanitized(url: &ServiceUrl) -> String {
    let mut s = format!("{}://", url.scheme());
    if let Some(user) = url.username() {
        s.push_str(user);
        if url.has_password() {
            s.push_str(":********");
        }
        s.push('@');
    }
    s.push_str(url.location());
    s
}

/// Celery's hidden settings (`HIDDEN_SETTINGS`): their values print as `********`.
fn hidden(key: &str) -> bool {
    let k = key.to_ascii_uppercase();
    ["API", "TOKEN", "KEY", "SECRET", "PASS", "PROFANITIES_LIST", "SIGNATURE", "DATABASE", "BEAT_DBURI"]
        .iter()
        .any(|h| k.contains(h))
}

/// The worker's settings that have a Celery name, each with Celery's default (values are censored
/// by [`conf`] as Celery's `filter_hidden_settings` does).
fn settings(w: &Shared) -> Vec<(&'static str, Value, Value)> {
    let cfg = &w.config;
    let app = w.app.config();
    vec![
        ("broker_url", json!(w.app.broker_url().map(sanitized)), Value::Null),
        ("result_backend", json!(w.app.backend_url().map(sanitized)), Value::Null),
        ("task_default_queue", json!(app.default_queue), json!("celery")),
        ("worker_concurrency", json!(w.pool.size()), Value::Null),
        ("worker_prefetch_multiplier", json!(cfg.prefetch_multiplier), json!(4)),
        ("worker_send_task_events", json!(w.task_events.load(Ordering::Relaxed)), json!(false)),
        ("task_send_sent_event", json!(app.send_sent_events), json!(false)),
        ("task_track_started", json!(cfg.track_started), json!(false)),
        ("broker_connection_retry_on_startup", json!(true), Value::Null),
        ("broker_connection_max_retries", json!(100), json!(100)),
    ]
}

/// `conf` (`with_defaults`): the settings that differ from Celery's defaults, or all of them.
pub(super) fn conf(w: &Shared, args: Args<'_>) -> Value {
    let with_defaults = args.flag("with_defaults");
    let mut out = Map::new();
    for (key, value, default) in settings(w) {
        if with_defaults || value != default {
            let value = if hidden(key) && !value.is_null() { json!("********") } else { value };
            out.insert(key.to_owned(), value);
        }
    }
    Value::Object(out)
}

/// Python's `repr` of a JSON value, for `report`.
fn py_repr(v: &Value) -> String {
    match v {
        Value::Null => "None".into(),
        Value::Bool(b) => py_bool(*b),
        Value::Number(n) => n.to_string(),
        Value::String(s) => super::args::py_str(s),
        Value::Array(a) => format!("[{}]", a.iter().map(py_repr).collect::<Vec<_>>().join(", ")),
        Value::Object(m) => format!(
            "{{{}}}",
            m.iter().map(|(k, v)| format!("{}: {}", super::args::py_str(k), py_repr(v))).collect::<Vec<_>>().join(", ")
        ),
    }
}

/// `report`: `{"ok": text}` laid out as Celery's `app.bugreport()`.
pub(super) fn report(w: &Shared) -> Value {
    let transport = w.app.broker().kind();
    let results = w.app.backend_url().map(sanitized).unwrap_or_default();
    let conf = conf(w, Args::new("conf", &Value::Null));
    let human: Vec<String> =
        conf.as_object().into_iter().flatten().map(|(k, v)| format!("{k}: {}", py_repr(v))).collect();
    let text = format!(
        "\nsoftware -> celery-rs:{ver} (celery-worker)\n            rust\n\
         platform -> system:{os} arch:{arch}\n            kernel version:{kernel} imp:Rust\n\
         loader   -> celery_worker::cli\n\
         settings -> transport:{transport} results:{results}\n\n{human}\n",
        ver = env!("CARGO_PKG_VERSION"),
        os = std::env::consts::OS,
        arch = std::env::consts::ARCH,
        kernel = system::kernel_release(),
        human = human.join("\n"),
    );
    json!({"ok": text})
}

/// `hello` (`from_node`, `revoked`): mingle. Another worker starting up sends its revoked ids and
/// is answered with ours (id -> `[timestamp, id]`, as Celery's `LimitedSet._data`) and our clock;
/// a worker never answers itself (null).
pub(super) fn hello(w: &Shared, args: Args<'_>) -> Result<Value, PyError> {
    let from = args.required_text("from_node")?;
    if from == w.config.hostname {
        return Ok(Value::Null);
    }
    tracing::info!(%from, "sync with");
    for id in revoked_ids(args.get("revoked")).take(super::REVOKES_MAX) {
        w.revoked.add(&id);
    }
    let now = system::monotonic_secs();
    let revoked: Map<String, Value> = w
        .revoked
        .entries()
        .into_iter()
        .map(|(id, age)| {
            let at = now - age.as_secs_f64();
            (id.clone(), json!([at, id]))
        })
        .collect();
    Ok(json!({"revoked": revoked, "clock": w.clock.forward()}))
}

/// The ids of a mingle `revoked` value: a dict (Celery's `LimitedSet._data`) or a list.
pub(super) fn revoked_ids(v: Option<&Value>) -> impl Iterator<Item = String> + '_ {
    let keys: Box<dyn Iterator<Item = String>> = match v {
        Some(Value::Object(m)) => Box::new(m.keys().cloned()),
        Some(Value::Array(a)) => Box::new(a.iter().filter_map(|v| v.as_str().map(str::to_owned))),
        _ => Box::new(std::iter::empty()),
    };
    keys
}

/// `memsample` and `memdump`'s memory: the samples taken since the last dump (at most 1,000).
#[derive(Debug, Default)]
pub(super) struct MemSamples(VecDeque<String>);

/// The most memory samples kept.
const MAX_SAMPLES: usize = 1_000;

/// `memsample`: the resident set size now, as Celery's `sample_mem` (null where unknown).
pub(super) fn memsample(samples: &mut MemSamples) -> Value {
    match system::rss_bytes() {
        Some(rss) => {
            let h = system::humanbytes(rss);
            samples.0.push_back(h.clone());
            if samples.0.len() > MAX_SAMPLES {
                samples.0.pop_front();
            }
            json!(h)
        }
        None => Value::Null,
    }
}

/// `memdump` (`samples`): Celery's text: a sample of the samples taken, then the size now; the
/// samples are cleared.
pub(super) fn memdump(samples: &mut MemSamples, args: Args<'_>) -> Result<Value, PyError> {
    let n = args.count("samples", 10, MAX_SAMPLES)?.max(1);
    let Some(rss) = system::rss_bytes() else {
        return Ok(json!("- rss: (psutil not installed).\n"));
    };
    let all: Vec<String> = std::mem::take(&mut samples.0).into();
    // Celery's `sample`: every len/n-th one when there are more than n.
    let picked: Vec<&String> =
        if all.len() <= n { all.iter().collect() } else { all.iter().step_by(all.len() / n).take(n).collect() };
    let mut text = String::new();
    if !picked.is_empty() {
        text.push_str("- rss (sample):\n");
        for m in picked {
            text.push_str(&format!("-    > {m},\n"));
        }
    }
    text.push_str(&format!("- rss (end): {}.\n", system::humanbytes(rss)));
    Ok(json!(text))
}

/// `objgraph`: Python object graphs do not exist here; Celery's reply without the library.
pub(super) fn objgraph() -> Result<Value, PyError> {
    Err(PyError::new("ImportError", "Requires the objgraph library"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_print_as_celery_sanitizes_them() {
        let u = ServiceUrl::parse("amqp://guest:s3cret@rabbit:5672/prod?heartbeat=30&password=x").unwrap();
        assert_eq!(sanitized(&u), "amqp://guest:********@rabbit:5672/prod");
        let r = ServiceUrl::parse("redis://127.0.0.1:6379/1").unwrap();
        assert_eq!(sanitized(&r), "redis://127.0.0.1:6379/1");
        assert_eq!(split_host_port("h:5672"), ("h".to_owned(), Some(5672)));
        assert_eq!(split_host_port("[::1]:6379"), ("::1".to_owned(), Some(6379)));
        assert_eq!(split_host_port("h"), ("h".to_owned(), None));
        assert!(hidden("task_default_routing_key") && hidden("api_token") && !hidden("broker_url"));
    }

    #[test]
    fn python_reprs() {
        assert_eq!(py_repr(&json!({"a": [1, null, true, "x'"]})), r#"{'a': [1, None, True, "x'"]}"#);
        assert_eq!((py_float(2.0), py_float(0.5)), ("2.0".to_owned(), "0.5".to_owned()));
    }

    #[test]
    fn memdump_samples_and_clears() {
        if system::rss_bytes().is_none() {
            return;
        }
        let mut s = MemSamples::default();
        for _ in 0..25 {
            assert!(memsample(&mut s).as_str().unwrap().ends_with('B'));
        }
        let args = json!({"samples": "5"});
        let text = memdump(&mut s, Args::new("memdump", &args)).unwrap();
        let text = text.as_str().unwrap();
        assert!(text.starts_with("- rss (sample):\n"), "{text}");
        assert_eq!(text.matches("-    > ").count(), 5, "{text}");
        assert!(text.contains("- rss (end): "));
        let again = memdump(&mut s, Args::new("memdump", &Value::Null)).unwrap();
        assert!(again.as_str().unwrap().starts_with("- rss (end): "), "cleared");
        assert_eq!(revoked_ids(Some(&json!({"a": [1.0, "a"]}))).collect::<Vec<_>>(), ["a"]);
        assert_eq!(revoked_ids(Some(&json!(["b"]))).collect::<Vec<_>>(), ["b"]);
    }
}

//! Remote control in Celery's format, on every broker: a request is broadcast on the transient
//! fanout exchange `celery.pidbox` as `{"method", "arguments", "destination", "ticket",
//! "reply_to": {"exchange": "reply.celery.pidbox", "routing_key": <caller id>}}`; each worker it is
//! meant for answers `{<hostname>: <reply>}` on the transient direct exchange `reply.celery.pidbox`
//! with the caller's routing key and a `ticket` header. So `celery inspect ping` and
//! `app.control.revoke(id)` from Python reach our workers, and ours reach Python's.
//!
//! Our workers answer every command of Celery's `celery/worker/control.py`, in the shape a Python
//! Celery 5 worker does (`celery inspect ...`, `celery control ...` and Flower read them alike):
//!
//! - inspect (read-only): `ping`, `stats` (Celery's fields: `total` by task name,
//!   `pid`, `clock`, `uptime`, `pool`, `prefetch_count`, `rusage`, `broker`, and `autoscaler` when
//!   on), `active` (`safe`), `reserved`, `scheduled`, `query_task` (`ids`), `registered`
//!   (`taskinfoitems`, `builtins`), `revoked`, `active_queues`, `conf` (`with_defaults`), `clock`,
//!   `report`, `hello` (mingle), `memsample`, `memdump`, `objgraph`, and the aliases `dump_active`,
//!   `dump_reserved`, `dump_schedule`, `dump_revoked`, `dump_tasks`, `dump_conf`;
//! - control (steering): `revoke` (`task_id`: one id or a list, `terminate`, `signal`),
//!   `terminate`, `revoke_by_stamped_headers`, `rate_limit`, `time_limit`, `add_consumer`,
//!   `cancel_consumer`, `pool_grow`, `pool_shrink`, `autoscale`, `enable_events`,
//!   `disable_events`, `heartbeat`, `election`, `pool_restart`, `shutdown`.
//!
//! A request reaches the workers its `destination` names (all of them without one), or those whose
//! name matches `pattern` under `matcher` (`glob`, or `pcre` anchored at the start), as Kombu's
//! `Node.handle_message`. An unknown method, a missing argument or a value that does not parse is
//! answered as Kombu's dispatch answers a handler's exception: `{"error": "KeyError('foo')"}`.
//!
//! ```no_run
//! # async fn demo(app: celery_core::App) -> Result<(), Box<dyn std::error::Error>> {
//! use std::time::Duration;
//! let pongs = celery_worker::control::request(&app, "ping", serde_json::json!({}), None, Duration::from_secs(1)).await?;
//! for (worker, reply) in pongs {
//!     println!("{worker}: {reply}");
//! }
//! celery_worker::control::revoke(&app, &["4f6a..."], false, None, Duration::from_secs(1)).await?;
//! # Ok(()) }
//! ```

mod args;
mod commands;
mod destination;
mod inspect;
mod serve;
mod system;

pub(crate) use serve::start;

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use celery_core::backoff::retrying;
use celery_core::protocol::{Headers, Message, Properties};
use celery_core::routing::{Exchange, ExchangeKind};
use celery_core::sync::lock;
use celery_core::{App, BrokerError};
use serde_json::{json, Value};

/// Where requests go: Celery's `celery.pidbox` (transient fanout).
pub fn request_exchange() -> Exchange {
    Exchange::new("celery.pidbox", ExchangeKind::Fanout).transient()
}

/// Where replies go: Celery's `reply.celery.pidbox` (transient direct), routed by the caller's id.
pub fn reply_exchange() -> Exchange {
    Exchange::new("reply.celery.pidbox", ExchangeKind::Direct).transient()
}

/// A JSON body as a broadcast message, with extra headers.
pub(crate) fn message(body: &Value, headers: &[(&str, Value)]) -> Message {
    let mut h = Headers { id: uuid::Uuid::new_v4().to_string(), ..Headers::default() };
    for (k, v) in headers {
        h.extra.insert((*k).to_owned(), v.clone());
    }
    Message { headers: h, properties: Properties::default(), body: serde_json::to_vec(body).unwrap_or_default() }
}

/// Broadcasts `method(arguments)` to every worker (or those named in `destination`) and gathers
/// their replies for `timeout` (or until each named destination answered). Returns
/// `(worker, reply)` pairs in arrival order.
pub async fn request(
    app: &App,
    method: &str,
    arguments: Value,
    destination: Option<Vec<String>>,
    timeout: Duration,
) -> Result<Vec<(String, Value)>, BrokerError> {
    call(app, method, arguments, destination, None, timeout).await
}

/// Like [`request`], to the workers whose name matches `pattern` under `matcher`: `"glob"`
/// (`celery@web*`) or `"pcre"` (a regular expression matched at the start of the name), as
/// Kombu's `pattern` and `matcher`. Gathers replies for all of `timeout`.
///
/// ```no_run
/// # async fn demo(app: celery_core::App) -> Result<(), Box<dyn std::error::Error>> {
/// use std::time::Duration;
/// let web = celery_worker::control::request_matching(&app, "ping", serde_json::json!({}), "celery@web*", "glob", Duration::from_secs(1)).await?;
/// # Ok(()) }
/// ```
pub async fn request_matching(
    app: &App,
    method: &str,
    arguments: Value,
    pattern: &str,
    matcher: &str,
    timeout: Duration,
) -> Result<Vec<(String, Value)>, BrokerError> {
    call(app, method, arguments, None, Some((pattern, matcher)), timeout).await
}

async fn call(
    app: &App,
    method: &str,
    arguments: Value,
    destination: Option<Vec<String>>,
    pattern: Option<(&str, &str)>,
    timeout: Duration,
) -> Result<Vec<(String, Value)>, BrokerError> {
    let oid = uuid::Uuid::new_v4().to_string();
    let ticket = uuid::Uuid::new_v4().to_string();
    let (requests, replies_to) = (request_exchange(), reply_exchange());
    let broadcasts = app.broker().require_broadcasts("remote control")?;
    let mut replies = retrying(|| broadcasts.subscribe(&replies_to, &oid)).await?;
    let expected = destination.as_ref().map(Vec::len);
    let body = json!({
        "method": method, "arguments": arguments, "destination": destination,
        "pattern": pattern.map(|p| p.0), "matcher": pattern.map(|p| p.1),
        "ticket": ticket, "reply_to": {"exchange": reply_exchange().name, "routing_key": oid},
    });
    let expires = celery_core::event::now() + timeout.as_secs_f64();
    let msg = message(&body, &[("clock", json!(0)), ("expires", json!(expires))]);
    retrying(|| broadcasts.broadcast(&requests, "", &msg)).await?;
    let mut out = Vec::new();
    let deadline = celery_core::clock::instant_after(timeout);
    while expected.is_none_or(|n| out.len() < n) {
        let Ok(Some(b)) = tokio::time::timeout_at(deadline, replies.next()).await else { break };
        match serde_json::from_slice::<Value>(&b.body) {
            Ok(Value::Object(m)) => out.extend(m),
            _ => tracing::debug!("control: skipping a reply that is not a JSON object"),
        }
    }
    Ok(out)
}

/// Revokes tasks on every worker: one that has not started is never run (REVOKED); with
/// `terminate`, a running one is stopped and recorded REVOKED. The ids are also stored in the
/// broker (for workers that start later, for 3 hours) and REVOKED is stored as each task's
/// result, so waiters see it at once. Returns the workers' replies.
pub async fn revoke(
    app: &App,
    ids: &[&str],
    terminate: bool,
    destination: Option<Vec<String>>,
    timeout: Duration,
) -> Result<Vec<(String, Value)>, BrokerError> {
    remember_revoked(app, ids).await;
    let args = json!({"task_id": ids, "terminate": terminate});
    let replies = request(app, "revoke", args, destination, timeout).await?;
    for id in ids {
        let err = celery_core::TaskError::new("TaskRevokedError", "revoked");
        let meta = celery_core::TaskMeta::error(*id, celery_core::TaskState::Revoked, &err);
        if let Err(e) = app.backend().store(&meta).await {
            tracing::debug!(error = %e, "control: cannot store REVOKED");
        }
    }
    Ok(replies)
}

/// The stored document of revoked ids (id -> expiry, seconds since the epoch), which workers load
/// when they start: a revoke reaches workers that start later even when none runs now.
const REVOKED_DOC: &str = "control.revoked";
/// The lease that serializes changes to [`REVOKED_DOC`].
const REVOKED_LEASE: &str = "control.revoked.lock";

/// Adds `ids` to the stored revoked ids (dropping expired ones), under a lease so that concurrent
/// revokes do not lose each other's ids. Best effort: failures are logged.
async fn remember_revoked(app: &App, ids: &[&str]) {
    let holder = uuid::Uuid::new_v4().to_string();
    let broker = app.broker();
    let mut held = false;
    for _ in 0..50 {
        match async {
            broker.require_leases("revoked ids")?.lease(REVOKED_LEASE, &holder, Duration::from_secs(5)).await
        }
        .await
        {
            Ok(true) => {
                held = true;
                break;
            }
            Ok(false) => tokio::time::sleep(Duration::from_millis(100)).await,
            Err(e) => return tracing::debug!(error = %e, "control: revokes are not stored on this broker"),
        }
    }
    if !held {
        return tracing::warn!(
            "control: could not take the revoked-ids lease; this revoke reaches running workers only"
        );
    }
    let mut all = stored_revoked(app).await;
    let now = celery_core::event::now();
    all.retain(|_, exp| *exp > now);
    for id in ids {
        all.insert((*id).to_owned(), now + REVOKE_EXPIRES.as_secs_f64());
    }
    if all.len() > REVOKES_MAX {
        let mut by_age: Vec<(String, f64)> = all.into_iter().collect();
        by_age.sort_by(|a, b| b.1.total_cmp(&a.1));
        by_age.truncate(REVOKES_MAX);
        all = by_age.into_iter().collect();
    }
    match serde_json::to_vec(&all) {
        Ok(doc) => {
            if let Err(e) = async { broker.require_documents("revoked ids")?.store_doc(REVOKED_DOC, &doc).await }.await
            {
                tracing::warn!(error = %e, "control: cannot store the revoked ids");
            }
        }
        Err(e) => tracing::warn!(error = %e, "control: cannot encode the revoked ids"),
    }
    if let Some(leases) = broker.leases() {
        let _ = leases.release(REVOKED_LEASE, &holder).await;
    }
}

/// The stored revoked ids that have not expired (id -> expiry).
async fn stored_revoked(app: &App) -> HashMap<String, f64> {
    let now = celery_core::event::now();
    match async { app.broker().require_documents("revoked ids")?.load_doc(REVOKED_DOC).await }.await {
        Ok(Some(doc)) => serde_json::from_slice::<HashMap<String, f64>>(&doc)
            .unwrap_or_default()
            .into_iter()
            .filter(|(_, exp)| *exp > now)
            .collect(),
        _ => HashMap::new(),
    }
}

/// Revoked task ids a worker remembers: at most 50,000, each for 3 hours (Celery's limits).
#[derive(Debug, Default)]
pub(crate) struct Revoked {
    ids: Mutex<(HashMap<String, Instant>, VecDeque<String>)>,
}

const REVOKES_MAX: usize = 50_000;
const REVOKE_EXPIRES: Duration = Duration::from_secs(3 * 3600);

impl Revoked {
    pub(crate) fn add(&self, id: &str) {
        if id.len() > MAX_ID_LEN {
            tracing::debug!(len = id.len(), "ignoring a revoked id longer than any task id");
            return;
        }
        let mut g = lock(&self.ids);
        let (map, order) = &mut *g;
        if map.insert(id.to_owned(), Instant::now()).is_none() {
            order.push_back(id.to_owned());
        }
        while order.len() > REVOKES_MAX {
            if let Some(old) = order.pop_front() {
                map.remove(&old);
            }
        }
    }

    pub(crate) fn contains(&self, id: &str) -> bool {
        let g = lock(&self.ids);
        g.0.get(id).is_some_and(|t| t.elapsed() < REVOKE_EXPIRES)
    }

    pub(crate) fn list(&self) -> Vec<String> {
        let g = lock(&self.ids);
        g.1.iter().filter(|id| g.0.get(*id).is_some_and(|t| t.elapsed() < REVOKE_EXPIRES)).cloned().collect()
    }

    /// The ids not expired with how long ago each was revoked, oldest first.
    pub(crate) fn entries(&self) -> Vec<(String, Duration)> {
        let g = lock(&self.ids);
        g.1.iter()
            .filter_map(|id| g.0.get(id).map(|t| (id.clone(), t.elapsed())))
            .filter(|(_, age)| *age < REVOKE_EXPIRES)
            .collect()
    }
}

/// Stamps revoked by `revoke_by_stamped_headers`: stamp header -> revoked values. A task whose
/// `stamps` carry a revoked value for that header is never run. At most [`MAX_STAMPS`] values.
#[derive(Debug, Default)]
pub(crate) struct RevokedStamps {
    stamps: Mutex<HashMap<String, HashSet<String>>>,
    /// False until a stamp is revoked: most workers never take the lock per task.
    any: std::sync::atomic::AtomicBool,
}

/// The most revoked stamp headers and values a worker keeps, all told.
pub(crate) const MAX_STAMPS: usize = 10_000;

/// The longest task id, stamp header or stamp value kept (Celery's own columns hold 155).
pub(crate) const MAX_ID_LEN: usize = 255;

impl RevokedStamps {
    /// Adds `values` for `header` (no values: nothing); false (nothing added) past [`MAX_STAMPS`]
    /// headers and values all told, or for a header or value longer than [`MAX_ID_LEN`].
    pub(crate) fn add(&self, header: &str, values: &[Value]) -> bool {
        if values.is_empty() {
            return true;
        }
        let keys: Vec<String> = values.iter().map(stamp_key).collect();
        if header.len() > MAX_ID_LEN || keys.iter().any(|k| k.len() > MAX_ID_LEN) {
            return false;
        }
        let mut g = lock(&self.stamps);
        let total: usize = g.len() + g.values().map(HashSet::len).sum::<usize>();
        if total + 1 + keys.len() > MAX_STAMPS {
            return false;
        }
        g.entry(header.to_owned()).or_default().extend(keys);
        self.any.store(true, std::sync::atomic::Ordering::Release);
        true
    }

    /// True when `msg` carries a revoked stamp.
    pub(crate) fn matches(&self, msg: &Message) -> bool {
        if !self.any.load(std::sync::atomic::Ordering::Acquire) {
            return false;
        }
        let g = lock(&self.stamps);
        !g.is_empty()
            && g.iter().any(|(header, revoked)| {
                crate::worker::requests::stamps_of(msg, header).iter().any(|v| revoked.contains(&stamp_key(v)))
            })
    }
}

/// A stamp value as compared: strings as themselves, anything else as its JSON.
pub(crate) fn stamp_key(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// A flag argument in any form Celery's clients send it: `true`, `1` (Flower), `"true"`, `"1"`,
/// `"yes"`, `"on"`; anything else is false.
pub(crate) fn truthy(v: &Value) -> bool {
    match v {
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64().is_some_and(|f| f != 0.0),
        Value::String(s) => matches!(s.to_ascii_lowercase().as_str(), "true" | "1" | "yes" | "on"),
        _ => false,
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn flags_are_read_in_every_form_celery_clients_send() {
        for yes in [json!(true), json!(1), json!("true"), json!("True"), json!("1"), json!("yes")] {
            assert!(super::truthy(&yes), "{yes}");
        }
        for no in [json!(false), json!(0), json!("false"), json!("0"), json!(null), json!([])] {
            assert!(!super::truthy(&no), "{no}");
        }
    }

    use super::*;

    #[test]
    fn revoked_ids_and_stamps() {
        let r = Revoked::default();
        r.add("x");
        r.add("x");
        assert!(r.contains("x") && !r.contains("y"));
        assert_eq!(r.list(), ["x"]);
        assert_eq!(r.entries().len(), 1);
        let stamps = RevokedStamps::default();
        let mut msg = Message { headers: Headers::default(), properties: Properties::default(), body: Vec::new() };
        msg.headers.extra.insert("stamps".into(), json!({"mtask_id": ["a", "b"], "n": 7}));
        assert!(!stamps.matches(&msg));
        assert!(stamps.add("mtask_id", &[json!("b")]));
        assert!(stamps.matches(&msg));
        let other = RevokedStamps::default();
        assert!(other.add("n", &[json!(7)]) && other.matches(&msg), "non-string stamps compare by value");
        assert!(!other.add("n", &vec![json!(1); MAX_STAMPS]), "bounded");
    }

    #[test]
    fn what_a_request_adds_is_bounded_in_length_and_count() {
        let r = Revoked::default();
        r.add(&"x".repeat(MAX_ID_LEN + 1));
        assert!(r.list().is_empty(), "an id longer than any task id is not kept");
        let stamps = RevokedStamps::default();
        for i in 0..MAX_STAMPS {
            assert!(stamps.add(&format!("h{i}"), &[]), "no values: nothing added");
        }
        assert!(stamps.stamps.lock().unwrap().is_empty());
        assert!(!stamps.add("h", &[json!("v".repeat(MAX_ID_LEN + 1))]));
        assert!(!stamps.add(&"h".repeat(MAX_ID_LEN + 1), &[json!("v")]));
        for i in 0..MAX_STAMPS / 2 {
            assert!(stamps.add(&format!("h{i}"), &[json!("v")]));
        }
        assert!(!stamps.add("one-more", &[json!("v")]), "headers count toward the bound");
        let args = json!({"task_id": ["x".repeat(MAX_ID_LEN + 1)]});
        assert!(args::Args::new("revoke", &args).ids("task_id").is_err());
    }
}

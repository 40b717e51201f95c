//! The task requests a worker holds, as remote control reports them (Celery's `worker.state`):
//!
//! - active: started and running (`inspect active`);
//! - waiting: taken with a slot but not started yet, on a rate limit or an eta less than a second
//!   away (with the deliveries still reserved in [`super::intake`]: `inspect reserved`);
//! - scheduled: an eta more than a second away, handed back to the broker's durable delay store
//!   ([`celery_core::Delivery::defer`]) instead of being held here (`inspect scheduled`). The broker
//!   keeps the task; this worker only remembers what it deferred, at most [`MAX_SCHEDULED`], each
//!   until its eta passes (then it is forgotten: the broker hands it to whichever worker is free).
//!
//! Each is shown as Celery's `Request.info()`: `id`, `name`, `args`, `kwargs`, `type`, `hostname`,
//! `time_start`, `acknowledged`, `delivery_info` (`exchange`, `routing_key`, `priority`,
//! `redelivered`) and `worker_pid`.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use celery_core::protocol::Message;
use celery_core::sync::lock;
use chrono::{DateTime, Utc};
use serde_json::{json, Value};
use tokio::sync::oneshot;

/// The most deferred tasks a worker remembers for `inspect scheduled`.
pub(crate) const MAX_SCHEDULED: usize = 10_000;

/// Where a delivery came from, as Celery's `delivery_info`.
#[derive(Debug, Clone)]
pub(crate) struct DeliveryInfo {
    pub(crate) queue: String,
    pub(crate) redelivered: bool,
}

/// A task request held by this worker.
#[derive(Debug)]
pub(crate) struct Held {
    pub(crate) msg: Arc<Message>,
    pub(crate) name: &'static str,
    pub(crate) delivery: DeliveryInfo,
    /// When it started (active ones).
    pub(crate) started: Option<Instant>,
    pub(crate) acknowledged: bool,
    /// Sent on (once) to stop it: a running one is terminated, a waiting one stops waiting and
    /// is checked against the revoked ids again.
    pub(crate) terminate: Option<oneshot::Sender<()>>,
}

impl Held {
    /// Celery's `Request.info(safe)`: with `safe`, `args` and `kwargs` are their reprs.
    pub(crate) fn info(&self, hostname: &str, safe: bool) -> Value {
        let time_start = self.started.map(|s| celery_core::event::now() - s.elapsed().as_secs_f64());
        request_info(&self.msg, self.name, hostname, &self.delivery, time_start, self.acknowledged, safe)
    }

    /// The values of this request's stamp `header` (Celery's `stamps`; one value or a list).
    pub(crate) fn stamps(&self, header: &str) -> Vec<Value> {
        stamps_of(&self.msg, header)
    }
}

/// The values a message carries for stamp `header`.
pub(crate) fn stamps_of(msg: &Message, header: &str) -> Vec<Value> {
    match msg.headers.extra.get("stamps").and_then(|s| s.get(header)) {
        Some(Value::Array(v)) => v.clone(),
        Some(Value::Null) | None => Vec::new(),
        Some(v) => vec![v.clone()],
    }
}

/// Celery's `Request.info()` of a message.
pub(crate) fn request_info(
    msg: &Message,
    name: &str,
    hostname: &str,
    delivery: &DeliveryInfo,
    time_start: Option<f64>,
    acknowledged: bool,
    safe: bool,
) -> Value {
    let (args, kwargs) = if safe {
        (json!(msg.headers.argsrepr), json!(msg.headers.kwargsrepr))
    } else {
        match msg.body() {
            Ok(b) => (Value::Array(b.args), Value::Object(b.kwargs)),
            Err(_) => (json!([]), json!({})),
        }
    };
    json!({
        "id": msg.headers.id, "name": name, "args": args, "kwargs": kwargs, "type": name,
        "hostname": hostname, "time_start": time_start, "acknowledged": acknowledged,
        "delivery_info": {
            "exchange": "", "routing_key": delivery.queue, "priority": msg.properties.priority,
            "redelivered": delivery.redelivered,
        },
        "worker_pid": time_start.map(|_| std::process::id()),
    })
}

/// A task deferred to the broker until its eta.
#[derive(Debug, Clone)]
struct Deferred {
    eta: DateTime<Utc>,
    priority: Option<u8>,
    /// Its `request` (with the reprs of its arguments: bounded, whatever the message's size).
    request: Value,
}

/// The requests of one worker. Cheap to lock: nothing awaits under these locks.
#[derive(Debug, Default)]
pub(crate) struct Requests {
    active: Mutex<HashMap<String, Held>>,
    waiting: Mutex<HashMap<String, Held>>,
    scheduled: Mutex<Scheduled>,
}

/// Deferred tasks by id, and their ids by eta (to prune the due ones first).
#[derive(Debug, Default)]
struct Scheduled {
    by_id: HashMap<String, Deferred>,
    by_eta: BTreeMap<(DateTime<Utc>, String), ()>,
}

impl Scheduled {
    fn prune(&mut self, now: DateTime<Utc>) {
        while let Some(((eta, id), ())) = self.by_eta.first_key_value() {
            if *eta > now && self.by_id.len() <= MAX_SCHEDULED {
                break;
            }
            let key = (*eta, id.clone());
            self.by_eta.remove(&key);
            self.by_id.remove(&key.1);
        }
    }
}

/// How a request is held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum HeldState {
    Active,
    Reserved,
    Scheduled,
}

impl HeldState {
    /// The word `inspect query_task` answers.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            HeldState::Active => "active",
            HeldState::Reserved => "reserved",
            HeldState::Scheduled => "scheduled",
        }
    }
}

impl Requests {
    /// A request starts running.
    pub(crate) fn start(&self, held: Held) {
        lock(&self.active).insert(held.msg.headers.id.clone(), held);
    }

    /// A running request ended.
    pub(crate) fn finish(&self, id: &str) {
        lock(&self.active).remove(id);
    }

    /// A request waits (rate limit, near eta) holding a slot.
    pub(crate) fn wait(&self, held: Held) {
        lock(&self.waiting).insert(held.msg.headers.id.clone(), held);
    }

    /// A request stopped waiting.
    pub(crate) fn unwait(&self, id: &str) {
        lock(&self.waiting).remove(id);
    }

    /// A request was deferred to the broker until `eta`.
    pub(crate) fn schedule(
        &self,
        msg: &Message,
        name: &str,
        hostname: &str,
        delivery: &DeliveryInfo,
        eta: DateTime<Utc>,
    ) {
        let request = request_info(msg, name, hostname, delivery, None, false, true);
        let mut s = lock(&self.scheduled);
        let id = msg.headers.id.clone();
        if let Some(old) = s.by_id.remove(&id) {
            s.by_eta.remove(&(old.eta, id.clone()));
        }
        s.by_eta.insert((eta, id.clone()), ());
        s.by_id.insert(id, Deferred { eta, priority: msg.properties.priority, request });
        s.prune(Utc::now());
    }

    /// `inspect active`.
    pub(crate) fn active(&self, hostname: &str, safe: bool) -> Vec<Value> {
        lock(&self.active).values().map(|h| h.info(hostname, safe)).collect()
    }

    /// The waiting ones, for `inspect reserved`.
    pub(crate) fn waiting(&self, hostname: &str) -> Vec<Value> {
        lock(&self.waiting).values().map(|h| h.info(hostname, false)).collect()
    }

    /// `inspect scheduled`: `[{"eta", "priority", "request"}]`, soonest first, due ones forgotten.
    pub(crate) fn scheduled(&self) -> Vec<Value> {
        let mut s = lock(&self.scheduled);
        s.prune(Utc::now());
        s.by_eta
            .keys()
            .filter_map(|(_, id)| s.by_id.get(id))
            .map(|d| json!({"eta": d.eta.to_rfc3339(), "priority": d.priority, "request": d.request}))
            .collect()
    }

    /// What this worker holds of task `id`: its state and request.
    pub(crate) fn find(&self, id: &str, hostname: &str) -> Option<(HeldState, Value)> {
        if let Some(h) = lock(&self.active).get(id) {
            return Some((HeldState::Active, h.info(hostname, false)));
        }
        if let Some(h) = lock(&self.waiting).get(id) {
            return Some((HeldState::Reserved, h.info(hostname, false)));
        }
        let mut s = lock(&self.scheduled);
        s.prune(Utc::now());
        s.by_id.get(id).map(|d| (HeldState::Scheduled, d.request.clone()))
    }

    /// Wakes the waiting requests `select` picks (they were revoked) and takes them off the list
    /// at once, so that `inspect reserved` no longer shows them once the revoke is answered (the
    /// woken task stores REVOKED afterwards); returns how many.
    pub(crate) fn wake_waiting(&self, select: impl FnMut(&Held) -> bool) -> usize {
        let mut waiting = lock(&self.waiting);
        let woken = signal(&mut waiting, select);
        for id in &woken {
            waiting.remove(id);
        }
        woken.len()
    }

    /// Sends `terminate` to the running tasks `select` picks; returns their ids.
    pub(crate) fn terminate(&self, select: impl FnMut(&Held) -> bool) -> Vec<String> {
        signal(&mut lock(&self.active), select)
    }
}

/// Sends on the stop channel of each request `select` picks; returns their ids.
fn signal(held: &mut HashMap<String, Held>, mut select: impl FnMut(&Held) -> bool) -> Vec<String> {
    let mut done = Vec::new();
    for (id, h) in held.iter_mut() {
        if select(h) {
            if let Some(t) = h.terminate.take() {
                let _ = t.send(());
                done.push(id.clone());
            }
        }
    }
    done
}

#[cfg(test)]
mod tests {
    use super::*;
    use celery_core::Signature;

    fn msg(id: &str) -> Message {
        let sig = Signature::by_name("t.add").args(json!([1, 2])).task_id(id.to_owned());
        let mut m = Message::from_signature(&sig).unwrap();
        m.headers.argsrepr = Some("(1, 2)".into());
        m
    }

    fn held(id: &str) -> Held {
        Held {
            msg: Arc::new(msg(id)),
            name: "t.add",
            delivery: DeliveryInfo { queue: "celery".into(), redelivered: false },
            started: Some(Instant::now()),
            acknowledged: true,
            terminate: None,
        }
    }

    #[test]
    fn woken_waiting_requests_leave_the_list_at_once() {
        let requests = Requests::default();
        let (wake, mut woken) = oneshot::channel();
        requests.wait(Held { terminate: Some(wake), ..held("a") });
        requests.wait(Held { terminate: None, ..held("b") });
        assert_eq!(requests.wake_waiting(|h| h.msg.headers.id == "a"), 1);
        assert!(woken.try_recv().is_ok(), "the waiter is woken");
        let listed: Vec<Value> = requests.waiting("w@h");
        assert_eq!(listed.len(), 1, "{listed:?}");
        assert_eq!(listed[0]["id"], "b");
    }

    #[test]
    fn request_info_has_celerys_fields() {
        let info = held("a").info("w@h", false);
        for key in [
            "id",
            "name",
            "args",
            "kwargs",
            "type",
            "hostname",
            "time_start",
            "acknowledged",
            "delivery_info",
            "worker_pid",
        ] {
            assert!(info.get(key).is_some(), "{key} in {info}");
        }
        assert_eq!(info["args"], json!([1, 2]));
        assert_eq!(info["delivery_info"]["routing_key"], "celery");
        assert_eq!(held("a").info("w@h", true)["args"], "(1, 2)", "safe: the repr");
    }

    #[test]
    fn requests_are_found_by_state_and_scheduled_ones_are_bounded_and_pruned() {
        let r = Requests::default();
        r.start(held("a"));
        r.wait(held("b"));
        let later = Utc::now() + chrono::Duration::seconds(60);
        let d = DeliveryInfo { queue: "celery".into(), redelivered: false };
        r.schedule(&msg("c"), "t.add", "w@h", &d, later);
        r.schedule(&msg("gone"), "t.add", "w@h", &d, Utc::now() - chrono::Duration::seconds(1));
        assert_eq!(r.find("a", "w").map(|x| x.0), Some(HeldState::Active));
        assert_eq!(r.find("b", "w").map(|x| x.0), Some(HeldState::Reserved));
        assert_eq!(r.find("c", "w").map(|x| x.0), Some(HeldState::Scheduled));
        assert!(r.find("gone", "w").is_none(), "due: forgotten");
        let s = r.scheduled();
        assert_eq!(s.len(), 1);
        assert_eq!(s[0]["request"]["id"], "c");
        for i in 0..MAX_SCHEDULED + 5 {
            r.schedule(&msg(&format!("m{i}")), "t.add", "w@h", &d, later);
        }
        assert_eq!(r.scheduled().len(), MAX_SCHEDULED);
        r.finish("a");
        r.unwait("b");
        assert!(r.find("a", "w").is_none() && r.find("b", "w").is_none());
    }
}

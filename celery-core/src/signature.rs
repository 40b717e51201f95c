//! A task invocation with its options: the unit that is sent, and that workflows compose.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::{Map, Value};

/// The header whose value picks a partition on partitioned queues: messages with the same key go
/// to the same partition, in order.
pub const PARTITION_KEY: &str = "x-partition-key";

/// How and where an invocation is sent.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SendOptions {
    /// Run no earlier than this long after sending.
    pub countdown: Option<Duration>,
    /// Run no earlier than this time (wins over `countdown`).
    pub eta: Option<DateTime<Utc>>,
    /// Do not run after this time: the task is REVOKED instead.
    pub expires: Option<DateTime<Utc>>,
    /// The queue (default: the task's queue, else `celery`).
    pub queue: Option<String>,
    /// The exchange (default: the anonymous exchange, which routes by queue name).
    pub exchange: Option<String>,
    /// The routing key (default: the queue name).
    pub routing_key: Option<String>,
    /// Priority 0-9 (higher runs first, on every broker).
    pub priority: Option<u8>,
    /// Use this task id instead of a new UUID.
    pub task_id: Option<String>,
    /// Do not store the result.
    pub ignore_result: Option<bool>,
    /// Hard time limit in seconds.
    pub time_limit: Option<f64>,
    /// Soft time limit in seconds.
    pub soft_time_limit: Option<f64>,
    /// The retry count carried in the message.
    pub retries: u32,
    /// The workflow's first task.
    pub root_id: Option<String>,
    /// The task that sent this one.
    pub parent_id: Option<String>,
    /// Reply queue for rpc results.
    pub reply_to: Option<String>,
    /// Extra headers.
    pub headers: Map<String, Value>,
    /// Fail the send when the exchange routes it to no queue.
    pub mandatory: bool,
    /// Tasks to run after this one, in order, each getting the previous result as its first argument
    /// (Celery's `embed.chain`).
    pub chain: Vec<Signature>,
    /// Tasks to send with this one's result when it succeeds (Celery's `link`, `embed.callbacks`).
    pub link: Vec<Signature>,
    /// Tasks to send with this one's id when it fails for good (Celery's `link_error`,
    /// `embed.errbacks`); a failed chord sends its body's errbacks with the body's id.
    pub link_error: Vec<Signature>,
    /// Sends with the same key within the app's idempotency window return the first task.
    pub idempotency_key: Option<String>,
    /// The body of the chord this task is a member of (Celery's `embed.chord`: the body's signature
    /// document with `chord_size`).
    pub chord: Option<Value>,
}

/// A task invocation: name, arguments and options.
///
/// The `#[task]` macro gives each task a typed constructor (`add::new(2, 3)`); `by_name` builds one
/// for a task this binary does not link (sent by name with JSON arguments).
///
/// ```
/// use std::time::Duration;
/// use celery_core::Signature;
/// let sig = Signature::by_name("add")
///     .args(serde_json::json!([2, 3]))
///     .countdown(Duration::from_secs(1))
///     .queue("math")
///     .priority(7);
/// assert_eq!(sig.options.queue.as_deref(), Some("math"));
/// assert!(sig.due_at().is_some());
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct Signature {
    /// The registered task name.
    pub task: String,
    /// Positional arguments.
    pub args: Vec<Value>,
    /// Keyword arguments.
    pub kwargs: Map<String, Value>,
    /// Send options.
    pub options: SendOptions,
    /// Do not prepend the parent's result to the arguments (Celery's `si`).
    pub immutable: bool,
}

impl Signature {
    /// An invocation of the task registered under `name`, with no arguments yet.
    pub fn by_name(name: impl Into<String>) -> Signature {
        Signature {
            task: name.into(),
            args: Vec::new(),
            kwargs: Map::new(),
            options: SendOptions::default(),
            immutable: false,
        }
    }

    /// Sets the positional arguments from a JSON array (any other value becomes the single argument).
    pub fn args(mut self, args: Value) -> Self {
        self.args = match args {
            Value::Array(a) => a,
            Value::Null => Vec::new(),
            other => vec![other],
        };
        self
    }

    /// Sets the keyword arguments from a JSON object (anything else is ignored).
    pub fn kwargs(mut self, kwargs: Value) -> Self {
        if let Value::Object(m) = kwargs {
            self.kwargs = m;
        }
        self
    }

    /// Runs no earlier than `d` after sending.
    pub fn countdown(mut self, d: Duration) -> Self {
        self.options.countdown = Some(d);
        self
    }

    /// Runs no earlier than `t`.
    pub fn eta(mut self, t: DateTime<Utc>) -> Self {
        self.options.eta = Some(t);
        self
    }

    /// Expires at `t`: if not started by then, it is REVOKED and never runs.
    pub fn expires(mut self, t: DateTime<Utc>) -> Self {
        self.options.expires = Some(t);
        self
    }

    /// Expires `d` after now.
    pub fn expires_in(mut self, d: Duration) -> Self {
        self.options.expires = Some(crate::clock::after(Utc::now(), d));
        self
    }

    /// Sends to this queue.
    pub fn queue(mut self, q: impl Into<String>) -> Self {
        self.options.queue = Some(q.into());
        self
    }

    /// Sends through this exchange.
    pub fn exchange(mut self, e: impl Into<String>) -> Self {
        self.options.exchange = Some(e.into());
        self
    }

    /// Sends with this routing key.
    pub fn routing_key(mut self, k: impl Into<String>) -> Self {
        self.options.routing_key = Some(k.into());
        self
    }

    /// Priority 0 (lowest) to 9 (highest).
    pub fn priority(mut self, p: u8) -> Self {
        self.options.priority = Some(p.min(9));
        self
    }

    /// Uses this task id.
    pub fn task_id(mut self, id: impl Into<String>) -> Self {
        self.options.task_id = Some(id.into());
        self
    }

    /// Do not store the result.
    pub fn ignore_result(mut self, yes: bool) -> Self {
        self.options.ignore_result = Some(yes);
        self
    }

    /// Hard time limit.
    pub fn time_limit(mut self, d: Duration) -> Self {
        self.options.time_limit = Some(d.as_secs_f64());
        self
    }

    /// Soft time limit.
    pub fn soft_time_limit(mut self, d: Duration) -> Self {
        self.options.soft_time_limit = Some(d.as_secs_f64());
        self
    }

    /// Fails the send when the exchange routes it to no queue (instead of dropping it).
    pub fn mandatory(mut self, yes: bool) -> Self {
        self.options.mandatory = yes;
        self
    }

    /// Messages with the same key go to the same partition of a partitioned queue, in order.
    pub fn partition_key(self, key: impl Into<String>) -> Self {
        self.header(PARTITION_KEY, Value::String(key.into()))
    }

    /// Limits how many tasks of `key` run at once across every worker, to the limit the task
    /// declares (`#[task(key_concurrency = 2)]`); a task that declares none runs unlimited. Sent as
    /// the [`CONCURRENCY_KEY`](crate::flow::CONCURRENCY_KEY) header (Python workers ignore it). The
    /// key is checked when sent ([`validate_key`](crate::flow::validate_key)).
    ///
    /// ```
    /// let sig = celery_core::Signature::by_name("span").concurrency_key("tenant-42");
    /// assert_eq!(sig.options.headers["x-concurrency-key"], "tenant-42");
    /// ```
    pub fn concurrency_key(self, key: impl Into<String>) -> Self {
        self.header(crate::flow::CONCURRENCY_KEY, Value::String(key.into()))
    }

    /// Puts the task in the line of fairness key `key` (a tenant, a customer) within its queue:
    /// the broker serves the keys with work in turn, so one key's backlog does not hold up the
    /// others ([`flow`](crate::flow); weights: `worker --fairness-weight`). Sent as the
    /// [`FAIRNESS_KEY`](crate::flow::FAIRNESS_KEY) header (Python workers ignore it); checked when
    /// sent ([`validate_key`](crate::flow::validate_key)), and refused by a broker without fair
    /// queues.
    ///
    /// ```
    /// let sig = celery_core::Signature::by_name("span").fairness_key("tenant-42");
    /// assert_eq!(sig.options.headers["x-fairness-key"], "tenant-42");
    /// ```
    pub fn fairness_key(self, key: impl Into<String>) -> Self {
        self.header(crate::flow::FAIRNESS_KEY, Value::String(key.into()))
    }

    /// Makes [`App::send`](crate::App::send) idempotent under `key`: while the key is held (the
    /// app's `idempotency_window` after the first send), sending again returns the first task's
    /// result instead of sending a new task.
    ///
    /// ```
    /// let sig = celery_core::Signature::by_name("charge").idempotency_key("order-42");
    /// assert_eq!(sig.options.idempotency_key.as_deref(), Some("order-42"));
    /// ```
    pub fn idempotency_key(mut self, key: impl Into<String>) -> Self {
        self.options.idempotency_key = Some(key.into());
        self
    }

    /// Celery's `task.map(it)`: one `celery.map` task that runs this task on each item in turn
    /// (this signature's arguments first) and returns the list of results. Sent to this
    /// signature's queue.
    pub fn map(self, items: Vec<Value>) -> Signature {
        self.builtin("celery.map", items)
    }

    /// Celery's `task.starmap(it)`: like [`Signature::map`], each item being an argument list.
    pub fn starmap(self, items: Vec<Value>) -> Signature {
        self.builtin("celery.starmap", items)
    }

    fn builtin(self, name: &str, items: Vec<Value>) -> Signature {
        let mut sig = Signature::by_name(name);
        sig.kwargs.insert("task".into(), self.to_json());
        sig.kwargs.insert("it".into(), Value::Array(items));
        sig.options.queue = self.options.queue.clone();
        sig
    }

    /// Adds an errback: sent with this task's id as its first argument (Celery's remote errback
    /// convention) when the task fails for good, after its retries.
    pub fn link_error(mut self, errback: Signature) -> Self {
        self.options.link_error.push(errback);
        self
    }

    /// Adds a callback: sent with this task's result as its first argument when it succeeds.
    pub fn link(mut self, callback: Signature) -> Self {
        self.options.link.push(callback);
        self
    }

    /// Ignores the parent's result in a chain or callback (Celery's immutable signature, `si`).
    pub fn immutable(mut self) -> Self {
        self.immutable = true;
        self
    }

    /// Celery's signature document: `{"task", "args", "kwargs", "options", "subtask_type", "immutable"}`.
    pub fn to_json(&self) -> Value {
        let mut options = Map::new();
        let o = &self.options;
        let mut put = |k: &str, v: Option<Value>| {
            if let Some(v) = v {
                options.insert(k.into(), v);
            }
        };
        put("task_id", o.task_id.clone().map(Value::String));
        put("queue", o.queue.clone().map(Value::String));
        put("exchange", o.exchange.clone().map(Value::String));
        put("routing_key", o.routing_key.clone().map(Value::String));
        put("priority", o.priority.map(Value::from));
        put("countdown", o.countdown.map(|d| Value::from(d.as_secs_f64())));
        put("expires", o.expires.map(|t| Value::String(crate::protocol::format_time(t))));
        put("time_limit", o.time_limit.map(Value::from));
        put("soft_time_limit", o.soft_time_limit.map(Value::from));
        put("ignore_result", o.ignore_result.map(Value::from));
        if !o.link.is_empty() {
            options.insert("link".into(), Value::Array(o.link.iter().map(Signature::to_json).collect()));
        }
        if !o.link_error.is_empty() {
            options.insert("link_error".into(), Value::Array(o.link_error.iter().map(Signature::to_json).collect()));
        }
        serde_json::json!({
            "task": self.task, "args": self.args, "kwargs": self.kwargs, "options": options,
            "subtask_type": null, "immutable": self.immutable,
        })
    }

    /// Reads Celery's signature document.
    pub fn from_json(v: &Value) -> Result<Signature, crate::ProtocolError> {
        let bad = |reason: &str| crate::ProtocolError::InvalidField { field: "signature", reason: reason.into() };
        let task = v.get("task").and_then(Value::as_str).ok_or_else(|| bad("no task name"))?;
        let mut sig = Signature::by_name(task)
            .args(v.get("args").cloned().unwrap_or(Value::Null))
            .kwargs(v.get("kwargs").cloned().unwrap_or(Value::Null));
        sig.immutable = v.get("immutable").and_then(Value::as_bool).unwrap_or(false);
        let o = v.get("options").and_then(Value::as_object).cloned().unwrap_or_default();
        let s = |k: &str| o.get(k).and_then(Value::as_str).map(str::to_owned);
        sig.options.task_id = s("task_id");
        sig.options.queue = s("queue");
        sig.options.exchange = s("exchange");
        sig.options.routing_key = s("routing_key");
        sig.options.priority = o.get("priority").and_then(Value::as_u64).map(|p| p.min(9) as u8);
        sig.options.countdown = o.get("countdown").and_then(Value::as_f64).map(crate::clock::secs_f64);
        sig.options.expires = s("expires").and_then(|t| crate::protocol::parse_time(&t).ok());
        sig.options.time_limit = o.get("time_limit").and_then(Value::as_f64);
        sig.options.soft_time_limit = o.get("soft_time_limit").and_then(Value::as_f64);
        sig.options.ignore_result = o.get("ignore_result").and_then(Value::as_bool);
        if let Some(Value::Array(links)) = o.get("link") {
            sig.options.link = links.iter().map(Signature::from_json).collect::<Result<_, _>>()?;
        }
        if let Some(Value::Array(links)) = o.get("link_error") {
            sig.options.link_error = links.iter().map(Signature::from_json).collect::<Result<_, _>>()?;
        }
        Ok(sig)
    }

    /// Adds a header.
    pub fn header(mut self, k: impl Into<String>, v: Value) -> Self {
        self.options.headers.insert(k.into(), v);
        self
    }

    /// The time it may run: `eta`, else now + `countdown`, else none.
    pub fn due_at(&self) -> Option<DateTime<Utc>> {
        self.options.eta.or_else(|| self.options.countdown.map(|d| crate::clock::after(Utc::now(), d)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn huge_times_saturate() {
        let far = crate::clock::latest();
        assert_eq!(Signature::by_name("t").countdown(Duration::MAX).due_at(), Some(far));
        assert_eq!(Signature::by_name("t").expires_in(Duration::MAX).options.expires, Some(far));
        let sig = Signature::from_json(&serde_json::json!({"task": "t", "options": {"countdown": 1e300}})).unwrap();
        assert_eq!(sig.options.countdown, Some(Duration::MAX));
        let sig = Signature::from_json(&serde_json::json!({"task": "t", "options": {"countdown": -4}})).unwrap();
        assert_eq!(sig.options.countdown, Some(Duration::ZERO));
    }
}

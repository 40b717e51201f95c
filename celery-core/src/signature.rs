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
}

impl Signature {
    /// An invocation of the task registered under `name`, with no arguments yet.
    pub fn by_name(name: impl Into<String>) -> Signature {
        Signature { task: name.into(), args: Vec::new(), kwargs: Map::new(), options: SendOptions::default() }
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
        self.options.expires = Some(Utc::now() + d);
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

    /// Adds a header.
    pub fn header(mut self, k: impl Into<String>, v: Value) -> Self {
        self.options.headers.insert(k.into(), v);
        self
    }

    /// The time it may run: `eta`, else now + `countdown`, else none.
    pub fn due_at(&self) -> Option<DateTime<Utc>> {
        self.options
            .eta
            .or_else(|| self.options.countdown.and_then(|d| chrono::Duration::from_std(d).ok()).map(|d| Utc::now() + d))
    }
}

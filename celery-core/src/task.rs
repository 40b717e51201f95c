//! The task model: options, the context a running task sees, and the error a task returns.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{Map, Value};
use tokio::sync::Notify;

use crate::progress::{StateSink, UpdateStateError, MAX_REPORT_SIZE};
use crate::state::TaskState;

/// Options of a task, set with `#[task(...)]`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TaskOptions {
    /// The registered name (default: the function's name).
    pub name: &'static str,
    /// The default queue (default: `celery`).
    pub queue: Option<&'static str>,
    /// Retries before giving up (Celery's default: 3).
    pub max_retries: u32,
    /// Exponential backoff factor in seconds (`retry_backoff = true` means 1).
    pub retry_backoff: Option<f64>,
    /// Upper bound of the backoff, in seconds (default 600).
    pub retry_backoff_max: f64,
    /// Full jitter on the backoff (default true).
    pub retry_jitter: bool,
    /// Retry on any `Err`, not only on `ctx.retry(..)`.
    pub autoretry: bool,
    /// The countdown of a retry that names none and has no backoff, in seconds (default 180).
    pub default_retry_delay: f64,
    /// Hard time limit in seconds: the task is abandoned and fails with `TimeLimitExceeded`.
    pub time_limit: Option<f64>,
    /// Soft time limit in seconds: the context is told, the task may clean up.
    pub soft_time_limit: Option<f64>,
    /// `N/s`, `N/m` or `N/h`, per worker.
    pub rate_limit: Option<&'static str>,
    /// At most this many tasks of one concurrency key run at once across every worker
    /// ([`Signature::concurrency_key`](crate::Signature::concurrency_key); `#[task(key_concurrency = 2)]`).
    pub key_concurrency: Option<u32>,
    /// `"cluster"`: the rate limit is one token bucket shared by every worker (held by the broker);
    /// `None` or `"worker"`: per worker, as in Celery.
    pub rate_scope: Option<&'static str>,
    /// Acknowledge after the task ran (default true); false acknowledges before running (at-most-once).
    pub acks_late: bool,
    /// Do not store results.
    pub ignore_result: bool,
}

impl TaskOptions {
    /// The defaults for a task called `name`.
    pub const fn new(name: &'static str) -> TaskOptions {
        TaskOptions {
            name,
            queue: None,
            max_retries: 3,
            retry_backoff: None,
            retry_backoff_max: 600.0,
            retry_jitter: true,
            autoretry: false,
            default_retry_delay: 180.0,
            time_limit: None,
            soft_time_limit: None,
            rate_limit: None,
            key_concurrency: None,
            rate_scope: None,
            acks_late: true,
            ignore_result: false,
        }
    }
}

/// What kind of failure a [`TaskError`] is; the worker decides what to do by it.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum TaskErrorKind {
    /// The task failed; FAILURE, or a retry when the task has `autoretry`.
    Failed,
    /// The task asked to be retried after `countdown` (None: the task's backoff or default delay).
    Retry {
        /// When to run again.
        countdown: Option<Duration>,
    },
    /// The message's arguments do not fit the task's parameters: never run, dead-lettered.
    InvalidArguments,
    /// The hard time limit passed.
    TimeLimitExceeded,
    /// The task panicked.
    Panicked,
}

/// The error a task returns. Any `std::error::Error` converts into it with `?`.
///
/// ```
/// use celery_core::TaskError;
/// fn parse(s: &str) -> Result<i64, TaskError> {
///     Ok(s.parse::<i64>()?)
/// }
/// let e = parse("x").unwrap_err();
/// assert_eq!(e.exc_type(), "ParseIntError");
/// let e = TaskError::new("ValueError", "bad value");
/// assert_eq!(e.to_string(), "ValueError: bad value");
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct TaskError {
    kind: TaskErrorKind,
    exc_type: String,
    message: String,
    traceback: Option<String>,
}

impl TaskError {
    /// A failure with an exception type name (as Python shows it) and a message.
    pub fn new(exc_type: impl Into<String>, message: impl Into<String>) -> TaskError {
        TaskError { kind: TaskErrorKind::Failed, exc_type: exc_type.into(), message: message.into(), traceback: None }
    }

    /// A failure of type `TaskError` with a message.
    pub fn msg(message: impl Into<String>) -> TaskError {
        TaskError::new("TaskError", message)
    }

    /// Asks for a retry after `countdown` (None: the task's backoff policy or default delay).
    pub fn retry(countdown: Option<Duration>) -> TaskError {
        TaskError {
            kind: TaskErrorKind::Retry { countdown },
            exc_type: "Retry".into(),
            message: match countdown {
                Some(c) => format!("Retry in {}s", c.as_secs_f64()),
                None => "Retry".into(),
            },
            traceback: None,
        }
    }

    /// The arguments do not fit the task (never retried; dead-lettered).
    pub fn invalid_arguments(message: impl Into<String>) -> TaskError {
        TaskError {
            kind: TaskErrorKind::InvalidArguments,
            exc_type: "TypeError".into(),
            message: message.into(),
            traceback: None,
        }
    }

    /// The hard time limit passed.
    pub fn time_limit_exceeded(limit: f64) -> TaskError {
        TaskError {
            kind: TaskErrorKind::TimeLimitExceeded,
            exc_type: "TimeLimitExceeded".into(),
            message: format!("hard time limit ({limit}s) exceeded"),
            traceback: None,
        }
    }

    /// The task panicked with this message.
    pub fn panicked(message: impl Into<String>) -> TaskError {
        TaskError { kind: TaskErrorKind::Panicked, exc_type: "Panic".into(), message: message.into(), traceback: None }
    }

    /// Attaches a traceback or error chain.
    pub fn with_traceback(mut self, tb: impl Into<String>) -> TaskError {
        self.traceback = Some(tb.into());
        self
    }

    /// The kind.
    pub fn kind(&self) -> &TaskErrorKind {
        &self.kind
    }

    /// The exception type name.
    pub fn exc_type(&self) -> &str {
        &self.exc_type
    }

    /// The Python module that defines this exception type, as stored in a result's `exc_module`,
    /// so that Python's `AsyncResult.get()` raises the real class (`except TaskRevokedError`
    /// works): `celery.exceptions` for Celery's own exceptions, `builtins` for Python's built-in
    /// ones (`TypeError` for arguments that do not fit), and `celery_rs` for any other type name
    /// (Python then makes up a class of that name).
    ///
    /// ```
    /// use celery_core::TaskError;
    /// assert_eq!(TaskError::new("TaskRevokedError", "revoked").exc_module(), "celery.exceptions");
    /// assert_eq!(TaskError::invalid_arguments("missing x").exc_module(), "builtins");
    /// assert_eq!(TaskError::new("ParseIntError", "x").exc_module(), "celery_rs");
    /// ```
    pub fn exc_module(&self) -> &'static str {
        exception_module(&self.exc_type)
    }

    /// The message.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The traceback, if any.
    pub fn traceback(&self) -> Option<&str> {
        self.traceback.as_deref()
    }
}

/// Celery's exception classes (`celery.exceptions`, which re-exports billiard's time limits).
const CELERY_EXCEPTIONS: &[&str] = &[
    "TaskRevokedError",
    "TimeLimitExceeded",
    "SoftTimeLimitExceeded",
    "WorkerLostError",
    "Terminated",
    "NotRegistered",
    "ChordError",
    "MaxRetriesExceededError",
    "InvalidTaskError",
    "QueueNotFound",
    "Retry",
    "Reject",
    "Ignore",
    "TaskError",
    "CeleryError",
];

/// Python's built-in exceptions that take one message argument (so `cls(message)` rebuilds them).
const PYTHON_BUILTINS: &[&str] = &[
    "Exception",
    "ArithmeticError",
    "AssertionError",
    "AttributeError",
    "ConnectionError",
    "EOFError",
    "FileExistsError",
    "FileNotFoundError",
    "IndexError",
    "KeyError",
    "LookupError",
    "MemoryError",
    "NotImplementedError",
    "OSError",
    "OverflowError",
    "PermissionError",
    "RecursionError",
    "RuntimeError",
    "TimeoutError",
    "TypeError",
    "ValueError",
    "ZeroDivisionError",
];

/// The Python module of the exception type `exc_type` (see [`TaskError::exc_module`]).
pub fn exception_module(exc_type: &str) -> &'static str {
    if CELERY_EXCEPTIONS.contains(&exc_type) {
        "celery.exceptions"
    } else if PYTHON_BUILTINS.contains(&exc_type) {
        "builtins"
    } else {
        "celery_rs"
    }
}

impl fmt::Display for TaskError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.exc_type, self.message)
    }
}

impl<E: std::error::Error + Send + Sync + 'static> From<E> for TaskError {
    fn from(e: E) -> TaskError {
        let full = std::any::type_name::<E>();
        let short = full.rsplit("::").next().unwrap_or(full);
        let short = short.split('<').next().unwrap_or(short);
        let mut chain = Vec::new();
        let mut src = e.source();
        while let Some(s) = src {
            chain.push(format!("caused by: {s}"));
            src = s.source();
        }
        let mut err = TaskError::new(short, e.to_string());
        if !chain.is_empty() {
            err.traceback = Some(chain.join("\n"));
        }
        err
    }
}

/// What the clones of one run's context share (one allocation per run): its soft time limit
/// and the last state it reported.
#[derive(Debug, Default)]
struct RunShared {
    /// The soft time limit passed.
    exceeded: AtomicBool,
    /// Woken when it does.
    notify: Notify,
    /// The last state reported ([`TaskContext::last_state`]).
    last_state: std::sync::Mutex<Option<(TaskState, Value)>>,
}

/// What a running task knows about itself: id, retries, eta, and whether its soft time limit passed.
///
/// ```
/// use celery_core::TaskContext;
/// let ctx = TaskContext::new("id-1", "add", 0);
/// assert_eq!(ctx.retries(), 0);
/// assert!(!ctx.soft_time_limit_exceeded());
/// ```
#[derive(Debug, Clone)]
pub struct TaskContext {
    id: Arc<str>,
    name: Arc<str>,
    retries: u32,
    eta: Option<DateTime<Utc>>,
    shared: Arc<RunShared>,
    sink: Option<Arc<dyn StateSink>>,
}

impl TaskContext {
    /// A context for task `id` named `name` on its `retries`-th retry.
    pub fn new(id: &str, name: &str, retries: u32) -> TaskContext {
        TaskContext { id: id.into(), name: name.into(), retries, eta: None, shared: Arc::default(), sink: None }
    }

    /// Sends the states the task reports ([`update_state`](Self::update_state)) to `sink` (the
    /// worker's: it stores them and sends events).
    pub fn with_state_sink(mut self, sink: Arc<dyn StateSink>) -> TaskContext {
        self.sink = Some(sink);
        self
    }

    /// Reports a state while the task runs, as Celery's `self.update_state(state=..., meta=...)`:
    /// the result backend stores Celery's document (`status` = `state`, `result` = `meta`), so
    /// Python's `AsyncResult(id).state` / `.info` and ours ([`AsyncResult::progress`](crate::AsyncResult::progress))
    /// see it, and the monitor shows a `{"done": n, "total": m}` document as a progress bar.
    ///
    /// `state` is a custom name (`"PROGRESS"`) or a running one (`"STARTED"`); a final state is
    /// refused (the task reaches it by returning). `meta` is at most
    /// [`MAX_REPORT_SIZE`](crate::progress::MAX_REPORT_SIZE) bytes of JSON. A result stored later
    /// replaces the report; a report never replaces a stored result.
    ///
    /// ```
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// use celery_core::{TaskContext, TaskState};
    /// use serde_json::json;
    /// let ctx = TaskContext::new("id-1", "resize", 0);
    /// ctx.update_state("PROGRESS", json!({"done": 40, "total": 100})).await?;
    /// let (state, meta) = ctx.last_state().unwrap();
    /// assert_eq!((state.as_str(), meta["done"].as_u64()), ("PROGRESS", Some(40)));
    /// assert!(ctx.update_state("SUCCESS", json!(null)).await.is_err());
    /// # Ok::<_, celery_core::progress::UpdateStateError>(()) }).unwrap();
    /// ```
    pub async fn update_state(&self, state: &str, meta: Value) -> Result<(), UpdateStateError> {
        let state = crate::progress::reportable(state)?;
        let size = serde_json::to_vec(&meta).map(|v| v.len()).unwrap_or(usize::MAX);
        if size > MAX_REPORT_SIZE {
            return Err(UpdateStateError::TooLarge { size, limit: MAX_REPORT_SIZE });
        }
        if let Some(sink) = &self.sink {
            sink.report(&self.id, state, &meta).await?;
        }
        *crate::sync::lock(&self.shared.last_state) = Some((state, meta));
        Ok(())
    }

    /// The last state this task reported with [`update_state`](Self::update_state), if any.
    pub fn last_state(&self) -> Option<(TaskState, Value)> {
        crate::sync::lock(&self.shared.last_state).clone()
    }

    /// Sets the eta the task was scheduled for.
    pub fn with_eta(mut self, eta: Option<DateTime<Utc>>) -> TaskContext {
        self.eta = eta;
        self
    }

    /// The task id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The task name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// How many times this task was retried before this run.
    pub fn retries(&self) -> u32 {
        self.retries
    }

    /// The eta it was scheduled for, if any.
    pub fn eta(&self) -> Option<DateTime<Utc>> {
        self.eta
    }

    /// A retry request to return from the task: `return Err(ctx.retry(Some(Duration::from_secs(1))))`.
    pub fn retry(&self, countdown: Option<Duration>) -> TaskError {
        TaskError::retry(countdown)
    }

    /// True once the soft time limit passed.
    pub fn soft_time_limit_exceeded(&self) -> bool {
        self.shared.exceeded.load(Ordering::Acquire)
    }

    /// Resolves when the soft time limit passes (never, if there is none).
    pub async fn soft_time_limit(&self) {
        loop {
            let notified = self.shared.notify.notified();
            if self.soft_time_limit_exceeded() {
                return;
            }
            notified.await;
        }
    }

    /// Signals the soft time limit (called by the worker).
    pub fn signal_soft_time_limit(&self) {
        self.shared.exceeded.store(true, Ordering::Release);
        self.shared.notify.notify_waiters();
    }
}

/// A statically known task: the type `#[task]` generates.
pub trait Task {
    /// The registered name.
    const NAME: &'static str;
    /// The return type.
    type Output;
    /// The task's options.
    fn options() -> TaskOptions;
}

/// The arguments of one invocation, as received.
#[derive(Debug, Clone, Default)]
pub struct TaskArgs {
    /// Positional.
    pub args: Vec<Value>,
    /// Keyword.
    pub kwargs: Map<String, Value>,
}

/// The boxed future a registered task handler returns.
pub type TaskFuture = Pin<Box<dyn Future<Output = Result<Value, TaskError>> + Send>>;

/// Implemented by the types task argument and return values may have.
#[diagnostic::on_unimplemented(
    message = "task argument or result type `{Self}` must implement serde::Serialize and serde::de::DeserializeOwned",
    label = "not serializable: a task's arguments and result travel as JSON",
    note = "add `#[derive(serde::Serialize, serde::Deserialize)]` to the type"
)]
pub trait TaskArgument: Serialize + DeserializeOwned {}
impl<T: Serialize + DeserializeOwned> TaskArgument for T {}

/// Compile-time check the macro emits for each argument type.
pub const fn assert_task_argument<T: TaskArgument>() {}

/// Takes parameter `index`/`name` from positional or keyword arguments and decodes it.
pub fn decode_arg<T: DeserializeOwned>(args: &mut TaskArgs, index: usize, name: &str) -> Result<T, TaskError> {
    let v = if index < args.args.len() {
        std::mem::take(&mut args.args[index])
    } else if let Some(v) = args.kwargs.remove(name) {
        v
    } else {
        return Err(TaskError::invalid_arguments(format!("missing argument `{name}`")));
    };
    serde_json::from_value(v).map_err(|e| TaskError::invalid_arguments(format!("argument `{name}`: {e}")))
}

/// Converts what a task function returns into the stored result.
pub trait IntoTaskResult {
    /// The conversion.
    fn into_task_result(self) -> Result<Value, TaskError>;
}

/// Wraps a plain value (the macro uses this for functions that do not return `Result`).
#[derive(Debug)]
pub struct Plain<T>(pub T);

impl<T: Serialize> IntoTaskResult for Plain<T> {
    fn into_task_result(self) -> Result<Value, TaskError> {
        serde_json::to_value(self.0).map_err(|e| TaskError::new("EncodeError", e.to_string()))
    }
}

impl<T: Serialize, E: Into<TaskError>> IntoTaskResult for Result<T, E> {
    fn into_task_result(self) -> Result<Value, TaskError> {
        match self {
            Ok(v) => Plain(v).into_task_result(),
            Err(e) => Err(e.into()),
        }
    }
}

/// Runs a plain (blocking) task function on the blocking pool; a panic becomes `TaskError::panicked`.
pub async fn run_blocking<F>(f: F) -> Result<Value, TaskError>
where
    F: FnOnce() -> Result<Value, TaskError> + Send + 'static,
{
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r,
        Err(e) => Err(panic_error(e)),
    }
}

/// Turns a join error (panic or cancellation) into a task error with the panic's message.
pub fn panic_error(e: tokio::task::JoinError) -> TaskError {
    if e.is_panic() {
        panic_payload_error(e.into_panic())
    } else {
        TaskError::panicked("task was cancelled")
    }
}

/// Turns a caught panic's payload into a task error with its message.
pub fn panic_payload_error(p: Box<dyn std::any::Any + Send>) -> TaskError {
    let msg = p
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "panic with a non-string payload".into());
    TaskError::panicked(msg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn args_by_position_or_name() {
        let mut a = TaskArgs { args: vec![json!(2)], kwargs: [("y".to_string(), json!(3))].into_iter().collect() };
        assert_eq!(decode_arg::<i64>(&mut a, 0, "x").unwrap(), 2);
        assert_eq!(decode_arg::<i64>(&mut a, 1, "y").unwrap(), 3);
        let e = decode_arg::<i64>(&mut a, 2, "z").unwrap_err();
        assert_eq!(e.kind(), &TaskErrorKind::InvalidArguments);
        let mut b = TaskArgs { args: vec![json!("two")], kwargs: Map::new() };
        let e = decode_arg::<i64>(&mut b, 0, "x").unwrap_err();
        assert!(e.message().contains("argument `x`"), "{e}");
    }

    #[tokio::test]
    async fn blocking_panic_is_an_error() {
        let e = run_blocking(|| panic!("boom")).await.unwrap_err();
        assert_eq!(e.kind(), &TaskErrorKind::Panicked);
        assert_eq!(e.message(), "boom");
    }

    #[tokio::test]
    async fn soft_limit_wakes_waiter() {
        let ctx = TaskContext::new("i", "n", 0);
        let c2 = ctx.clone();
        let h = tokio::spawn(async move { c2.soft_time_limit().await });
        tokio::task::yield_now().await;
        ctx.signal_soft_time_limit();
        h.await.unwrap();
        assert!(ctx.soft_time_limit_exceeded());
    }
}

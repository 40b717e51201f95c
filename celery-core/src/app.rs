//! The producer API: [`App`] sends signatures through a broker and hands back [`AsyncResult`]s that
//! read the result backend.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::backend::{ResultBackend, TaskMeta};
use crate::broker::Broker;
use crate::error::{AppError, ResultError};
use crate::protocol::Message;
use crate::registry;
use crate::routing::Route;
use crate::scheme;
use crate::signature::Signature;
use crate::state::TaskState;
use crate::url::ServiceUrl;

/// Producer settings.
#[derive(Debug, Clone)]
pub struct AppConfig {
    /// The queue of tasks that name none (default `celery`).
    pub default_queue: String,
    /// Messages larger than this are refused at send time, and a worker dead-letters payloads larger
    /// than what this allows once encoded ([`max_encoded_size`](crate::protocol::max_encoded_size))
    /// without decoding them (default 16 MiB; `worker --max-message-size`).
    pub max_message_size: usize,
    /// How long an idempotency key returns its first task (default one day).
    pub idempotency_window: Duration,
    /// Send a `task-sent` event for each task sent (Celery's `task_send_sent_event`).
    pub send_sent_events: bool,
}

impl Default for AppConfig {
    fn default() -> Self {
        AppConfig {
            default_queue: "celery".into(),
            max_message_size: 16 * 1024 * 1024,
            idempotency_window: Duration::from_secs(86_400),
            send_sent_events: false,
        }
    }
}

/// A broker, a result backend and the producer settings.
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use std::time::Duration;
/// use celery_core::{App, Signature};
/// let app = App::connect("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/1").await?;
/// let res = app.send(Signature::by_name("add").args(serde_json::json!([2, 3]))).await?;
/// let sum: i64 = res.get(Duration::from_secs(10)).await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct App {
    broker: Arc<dyn Broker>,
    backend: Arc<dyn ResultBackend>,
    config: AppConfig,
    /// The broker and backend URLs, when connected by URL ([`App::connect`]).
    urls: Option<Arc<(ServiceUrl, ServiceUrl)>>,
}

impl fmt::Debug for App {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("App").field("broker", &self.broker.kind()).field("config", &self.config).finish()
    }
}

impl App {
    /// Connects to a broker and a result backend by URL (`redis://`, `memory://`, ...).
    pub async fn connect(broker_url: &str, backend_url: &str) -> Result<App, AppError> {
        let broker = scheme::connect_broker(broker_url).await?;
        let ctx = scheme::ConnectContext::default().with_broker_url(broker_url);
        let backend = scheme::connect_backend_in(backend_url, ctx).await?;
        let urls = ServiceUrl::parse(broker_url).and_then(|b| Ok((b, ServiceUrl::parse(backend_url)?))).ok();
        Ok(App { urls: urls.map(Arc::new), ..App::new(broker, backend) })
    }

    /// An app over a connected broker and backend.
    pub fn new(broker: Arc<dyn Broker>, backend: Arc<dyn ResultBackend>) -> App {
        App { broker, backend, config: AppConfig::default(), urls: None }
    }

    /// The broker's URL, when the app was connected by URL: it prints redacted (what a worker's
    /// `inspect stats` and `inspect conf` report), never with its secrets.
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), celery_core::AppError> {
    /// let app = celery_core::App::connect("redis://:pw@127.0.0.1:6379/0", "redis://127.0.0.1:6379/1").await?;
    /// assert_eq!(app.broker_url().unwrap().to_string(), "redis://:***@127.0.0.1:6379/0");
    /// # Ok(()) }
    /// ```
    pub fn broker_url(&self) -> Option<&ServiceUrl> {
        self.urls.as_deref().map(|(b, _)| b)
    }

    /// The result backend's URL, when the app was connected by URL (prints redacted).
    pub fn backend_url(&self) -> Option<&ServiceUrl> {
        self.urls.as_deref().map(|(_, r)| r)
    }

    /// Replaces the settings.
    pub fn with_config(mut self, config: AppConfig) -> App {
        self.config = config;
        self
    }

    /// The settings.
    pub fn config(&self) -> &AppConfig {
        &self.config
    }

    /// The broker.
    pub fn broker(&self) -> &Arc<dyn Broker> {
        &self.broker
    }

    /// The result backend.
    pub fn backend(&self) -> &Arc<dyn ResultBackend> {
        &self.backend
    }

    /// The route and message for a signature, with the task's registered defaults applied.
    pub fn prepare(&self, sig: &Signature) -> Result<(Route, Message), AppError> {
        let mut sig = sig.clone();
        if sig.options.reply_to.is_none() {
            sig.options.reply_to = self.backend.reply_to();
        }
        if let Some(entry) = registry::lookup(&sig.task) {
            let o = (entry.options)();
            if sig.options.queue.is_none() {
                sig.options.queue = o.queue.map(str::to_owned);
            }
            sig.options.time_limit = sig.options.time_limit.or(o.time_limit);
            sig.options.soft_time_limit = sig.options.soft_time_limit.or(o.soft_time_limit);
            if sig.options.ignore_result.is_none() && o.ignore_result {
                sig.options.ignore_result = Some(true);
            }
        }
        if let Some(key) = sig.options.headers.get(crate::flow::CONCURRENCY_KEY) {
            let bad = |reason: String| crate::ProtocolError::InvalidField { field: "x-concurrency-key", reason };
            let key = key.as_str().ok_or_else(|| bad("not a string".into()))?;
            crate::flow::validate_key(key).map_err(|e| bad(e.to_string()))?;
        }
        if let Some(key) = sig.options.headers.get(crate::flow::FAIRNESS_KEY) {
            let bad = |reason: String| crate::ProtocolError::InvalidField { field: "x-fairness-key", reason };
            let key = key.as_str().ok_or_else(|| bad("not a string".into()))?;
            crate::flow::validate_key(key).map_err(|e| bad(e.to_string()))?;
            self.broker.require_fair_queues("fairness_key")?;
        }
        let msg = Message::from_signature(&sig)?;
        msg.check_size(self.config.max_message_size)?;
        let queue = sig.options.queue.clone().unwrap_or_else(|| self.config.default_queue.clone());
        let route = match &sig.options.exchange {
            Some(ex) if !ex.is_empty() => Route::exchange(ex.clone(), sig.options.routing_key.clone().unwrap_or(queue)),
            _ => Route::queue(sig.options.routing_key.clone().unwrap_or(queue)),
        };
        let route = Route { mandatory: sig.options.mandatory, ..route };
        Ok((route, msg))
    }

    /// Sends one invocation. A lost connection is retried (3 attempts with backoff); if a reply was
    /// lost after the broker stored the message, the task may be queued twice (at-least-once).
    ///
    /// With an [idempotency key](Signature::idempotency_key), a send within
    /// [`AppConfig::idempotency_window`] of the first send with that key returns the first task's
    /// result and sends nothing (the result backend holds the keys; not on `rpc://`).
    ///
    /// While tracing ([`crate::trace`]), the send is an `apply_async/<task>` span (a child of the
    /// current span) whose context the message carries in its `traceparent` header.
    pub async fn send(&self, sig: Signature) -> Result<AsyncResult, AppError> {
        let (route, mut msg) = self.prepare(&sig)?;
        if crate::trace::enabled() {
            let span = crate::trace::send_span(&msg.headers, &route.routing_key);
            crate::trace::inject(&span, &mut msg.headers);
            return tracing::Instrument::instrument(self.publish_one(&sig, route, msg), span).await;
        }
        self.publish_one(&sig, route, msg).await
    }

    /// [`App::send`] once the message is made.
    async fn publish_one(&self, sig: &Signature, route: Route, msg: Message) -> Result<AsyncResult, AppError> {
        let id = &msg.headers.id;
        if let Some(key) = &sig.options.idempotency_key {
            if let Some(first) = self.backend.require_claims()?.claim(key, id, self.config.idempotency_window).await? {
                tracing::debug!(key, first = %first, "idempotency key seen: returning the first task");
                return Ok(self.result(&first));
            }
            if let Err(e) = crate::backoff::retrying(|| self.broker.publish(&route, &msg)).await {
                // Not sent: free the key so that a retry of this send can send.
                if let Some(claims) = self.backend.claims() {
                    let _ = claims.unclaim(key, id).await;
                }
                return Err(e.into());
            }
            self.sent_event(&route, &msg).await;
            return Ok(self.result(id));
        }
        crate::backoff::retrying(|| self.broker.publish(&route, &msg)).await?;
        self.sent_event(&route, &msg).await;
        Ok(self.result(id))
    }

    /// Celery's `task-sent` event, when [`AppConfig::send_sent_events`] is on (best effort).
    async fn sent_event(&self, route: &Route, msg: &Message) {
        if !self.config.send_sent_events {
            return;
        }
        let h = &msg.headers;
        let fields = serde_json::json!({
            "uuid": h.id, "name": h.task, "args": h.argsrepr, "kwargs": h.kwargsrepr, "retries": h.retries,
            "eta": h.eta.map(crate::protocol::format_time), "expires": h.expires.map(crate::protocol::format_time),
            "root_id": h.root_id, "parent_id": h.parent_id, "exchange": route.exchange,
            "routing_key": route.routing_key, "queue": route.routing_key,
        });
        let host = h.origin.clone().unwrap_or_else(crate::protocol::origin);
        let event = crate::event::event("task-sent", &host, 0, fields);
        let key = crate::event::routing_key(&event);
        let Some(broadcasts) = self.broker.broadcasts() else {
            tracing::debug!(broker = self.broker.kind(), "no broadcasts: the task-sent event is not sent");
            return;
        };
        if let Err(e) = broadcasts.broadcast(&crate::event::exchange(), &key, &crate::event::message(&event)).await {
            tracing::debug!(error = %e, "cannot send the task-sent event");
        }
    }

    /// Sends many invocations in one batch (one broker round trip where possible), retried like `send`.
    pub async fn send_batch(&self, sigs: impl IntoIterator<Item = Signature>) -> Result<Vec<AsyncResult>, AppError> {
        let mut batch = sigs.into_iter().map(|s| self.prepare(&s)).collect::<Result<Vec<_>, _>>()?;
        // While tracing, one `apply_async` span per message, open until the batch is published.
        let _spans: Vec<tracing::Span> = if crate::trace::enabled() {
            batch
                .iter_mut()
                .map(|(route, msg)| {
                    let span = crate::trace::send_span(&msg.headers, &route.routing_key);
                    crate::trace::inject(&span, &mut msg.headers);
                    span
                })
                .collect()
        } else {
            Vec::new()
        };
        crate::backoff::retrying(|| self.broker.publish_batch(&batch)).await?;
        for (route, msg) in &batch {
            self.sent_event(route, msg).await;
        }
        Ok(batch.iter().map(|(_, m)| self.result(&m.headers.id)).collect())
    }

    /// Sends a group: every task at once (one batch), each carrying the group id and its index in
    /// the `group`/`group_index` headers; the results come back in order.
    pub async fn send_group(&self, sigs: impl IntoIterator<Item = Signature>) -> Result<crate::GroupResult, AppError> {
        let id = uuid::Uuid::new_v4().to_string();
        let sigs = sigs.into_iter().enumerate().map(|(i, s)| {
            s.header("group", serde_json::Value::String(id.clone())).header("group_index", serde_json::Value::from(i))
        });
        let results = self.send_batch(sigs).await?;
        Ok(crate::GroupResult { id, results })
    }

    /// Sends a chain: each task runs after the previous one succeeded, with its result as the first
    /// argument (unless the signature is immutable). Returns the last task's result, as Celery does.
    pub async fn send_chain(&self, sigs: impl IntoIterator<Item = Signature>) -> Result<AsyncResult, AppError> {
        let mut sigs: Vec<Signature> = sigs.into_iter().collect();
        if sigs.is_empty() {
            return Err(AppError::Protocol(crate::ProtocolError::InvalidField {
                field: "chain",
                reason: "empty".into(),
            }));
        }
        for s in &mut sigs {
            s.options.task_id.get_or_insert_with(|| uuid::Uuid::new_v4().to_string());
        }
        let last = sigs.last().and_then(|s| s.options.task_id.clone()).unwrap_or_default();
        let mut first = sigs.remove(0);
        first.options.chain = sigs;
        self.send(first).await?;
        Ok(self.result(&last))
    }

    /// Celery's `task.chunks(it, n)`: splits the argument lists `items` into chunks of `n` and
    /// sends one `celery.starmap` task per chunk, as a group; each member returns its chunk's
    /// results.
    ///
    /// ```no_run
    /// # async fn demo(app: celery_core::App) -> Result<(), Box<dyn std::error::Error>> {
    /// use celery_core::Signature;
    /// let items = (0..100).map(|i| serde_json::json!([i, i])).collect();
    /// let chunks = app.send_chunks(Signature::by_name("add"), items, 10).await?;
    /// let sums: Vec<Vec<i64>> = chunks.get(std::time::Duration::from_secs(10)).await?;
    /// # Ok(()) }
    /// ```
    pub async fn send_chunks(
        &self,
        task: Signature,
        items: Vec<Value>,
        n: usize,
    ) -> Result<crate::GroupResult, AppError> {
        let n = n.max(1);
        let parts: Vec<Signature> = items.chunks(n).map(|c| task.clone().starmap(c.to_vec())).collect();
        self.send_group(parts).await
    }

    /// Sends a chord: the `header` tasks run in parallel (a group); when all have finished, `body`
    /// runs with the list of their results (in header order) as its first argument. Returns the
    /// body's result. A failed member fails the chord: the body does not run and its result is a
    /// `ChordError` naming the member. The backend counts members atomically (not on `rpc://`).
    ///
    /// ```no_run
    /// # async fn demo(app: celery_core::App) -> Result<(), Box<dyn std::error::Error>> {
    /// use std::time::Duration;
    /// use celery_core::Signature;
    /// let header = (1..=10).map(|i| Signature::by_name("add").args(serde_json::json!([i, i])));
    /// let total = app.send_chord(header, Signature::by_name("tsum")).await?;
    /// assert_eq!(total.get::<i64>(Duration::from_secs(10)).await?, 110);
    /// # Ok(()) }
    /// ```
    pub async fn send_chord(
        &self,
        header: impl IntoIterator<Item = Signature>,
        mut body: Signature,
    ) -> Result<AsyncResult, AppError> {
        let header: Vec<Signature> = header.into_iter().collect();
        let body_id = body.options.task_id.get_or_insert_with(|| uuid::Uuid::new_v4().to_string()).clone();
        if header.is_empty() {
            // Celery's behaviour: an empty header runs the body at once with no results.
            if !body.immutable {
                body.args.insert(0, Value::Array(Vec::new()));
            }
            return self.send(body).await;
        }
        let group_id = uuid::Uuid::new_v4().to_string();
        self.backend.require_chords()?.chord_size(&group_id, header.len()).await?;
        let mut doc = body.to_json();
        doc["chord_size"] = Value::from(header.len());
        let members = header.into_iter().enumerate().map(|(i, mut s)| {
            s.options.chord = Some(doc.clone());
            s.header("group", Value::String(group_id.clone())).header("group_index", Value::from(i))
        });
        self.send_batch(members).await?;
        Ok(self.result(&body_id))
    }

    /// Sends a task by name with JSON positional and keyword arguments.
    pub async fn send_by_name(&self, name: &str, args: Value, kwargs: Value) -> Result<AsyncResult, AppError> {
        self.send(Signature::by_name(name).args(args).kwargs(kwargs)).await
    }

    /// A handle on the result of task `id`.
    pub fn result(&self, id: &str) -> AsyncResult {
        AsyncResult { id: id.to_owned(), backend: self.backend.clone() }
    }
}

/// A handle on one task's state and result.
///
/// ```no_run
/// # async fn demo(app: celery_core::App) -> Result<(), Box<dyn std::error::Error>> {
/// use std::time::Duration;
/// let res = app.result("d9b1d7db-1c1f-4a3c-9f6e-1b2c3d4e5f60");
/// println!("{}", res.state().await?);
/// let meta = res.wait(Duration::from_secs(5)).await?;
/// println!("{:?}", meta.result);
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct AsyncResult {
    id: String,
    backend: Arc<dyn ResultBackend>,
}

impl fmt::Debug for AsyncResult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AsyncResult").field("id", &self.id).finish()
    }
}

impl AsyncResult {
    /// The task id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The current state (PENDING when nothing is stored).
    pub async fn state(&self) -> Result<TaskState, ResultError> {
        Ok(self.backend.get(&self.id).await?.map(|m| m.status).unwrap_or(TaskState::Pending))
    }

    /// The stored document, if any. Its `result` is what Python's `AsyncResult.info` returns:
    /// the value, the exception document, or a custom state's report (`PROGRESS`'s
    /// `{"done": 40, "total": 100}`).
    pub async fn info(&self) -> Result<Option<TaskMeta>, ResultError> {
        Ok(self.backend.get(&self.id).await?)
    }

    /// Follows the task until it is ready: yields its stored document each time its state or
    /// result changes (PENDING is skipped), a custom state's report such as `PROGRESS` with
    /// `{"done": 40, "total": 100}` included, and ends after the ready one (SUCCESS, FAILURE,
    /// REVOKED) or the first error. Reads the backend every `every` (at least 10 ms); a ready
    /// result arrives as soon as the backend wakes its waiters. It does not end by itself on a
    /// task that never finishes: bound it with a timeout.
    ///
    /// ```no_run
    /// # async fn demo(app: celery_core::App) -> Result<(), Box<dyn std::error::Error>> {
    /// use std::time::Duration;
    /// use futures::StreamExt;
    /// use celery_core::progress::Progress;
    /// let res = app.send_by_name("progress", serde_json::json!([10, 100]), serde_json::json!({})).await?;
    /// let mut updates = Box::pin(res.progress(Duration::from_millis(100)));
    /// while let Some(meta) = updates.next().await {
    ///     let meta = meta?;
    ///     match Progress::from_meta(&meta.result).and_then(|p| p.fraction()) {
    ///         Some(f) if !meta.status.is_ready() => println!("{:.0}%", f * 100.0),
    ///         _ => println!("{}", meta.status),
    ///     }
    /// }
    /// # Ok(()) }
    /// ```
    pub fn progress(
        &self,
        every: Duration,
    ) -> impl futures::Stream<Item = Result<TaskMeta, ResultError>> + Send + 'static {
        struct Follow {
            res: AsyncResult,
            every: Duration,
            last: Option<(TaskState, Value)>,
            done: bool,
        }
        let every = every.max(Duration::from_millis(10));
        let start = Follow { res: self.clone(), every, last: None, done: false };
        futures::stream::unfold(start, |mut f| async move {
            while !f.done {
                let got = match f.res.backend.wait(&f.res.id, f.every).await {
                    Ok(m) => m,
                    Err(e) => {
                        f.done = true;
                        return Some((Err(ResultError::from(e)), f));
                    }
                };
                let Some(meta) = got.filter(|m| m.status != TaskState::Pending) else { continue };
                f.done = meta.status.is_ready();
                let seen = Some((meta.status, meta.result.clone()));
                if seen != f.last {
                    f.last = seen;
                    return Some((Ok(meta), f));
                }
            }
            None
        })
    }

    /// Waits for a ready state (SUCCESS, FAILURE, REVOKED) and returns the document.
    pub async fn wait(&self, timeout: Duration) -> Result<TaskMeta, ResultError> {
        match self.backend.wait(&self.id, timeout).await? {
            Some(m) if m.status.is_ready() => Ok(m),
            _ => Err(ResultError::Timeout(timeout)),
        }
    }

    /// Waits for the result and decodes it; a FAILURE or REVOKED is an error.
    pub async fn get<T: DeserializeOwned>(&self, timeout: Duration) -> Result<T, ResultError> {
        let meta = self.wait(timeout).await?;
        match meta.status {
            TaskState::Success => serde_json::from_value(meta.result).map_err(|e| ResultError::Decode(e.to_string())),
            TaskState::Revoked => Err(ResultError::Revoked),
            _ => {
                let (exc_type, message) =
                    meta.exception().unwrap_or_else(|| ("Unknown".into(), meta.result.to_string()));
                Err(ResultError::Failed { exc_type, message, traceback: meta.traceback })
            }
        }
    }

    /// Deletes the stored result.
    pub async fn forget(&self) -> Result<(), ResultError> {
        Ok(self.backend.forget(&self.id).await?)
    }
}

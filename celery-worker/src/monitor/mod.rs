//! `monitor --listen 127.0.0.1:5555`: a live dashboard over any broker, fed by Celery's events
//! (start workers with `-E`). One page, no build step, no external assets:
//!
//! - workers: online, heartbeat age, tasks running and finished;
//! - queues: depth, age of the oldest waiting message and deliveries in flight (where the broker
//!   knows them: [`Broker::queue_stats`]), dead letters (with **retry** and **discard**), and
//!   **pause** / **resume** (Celery's `cancel_consumer` / `add_consumer` to every worker);
//! - tasks: a live list searchable by id, name or state, with a progress bar on a running task
//!   that reports `{"done", "total"}` (`task-progress`), and each task's detail (arguments,
//!   result or error with traceback, retries, timeline, the stored result);
//! - history: every task of the retention period (default a day, `--history-retention`; at most
//!   `--history-max` tasks), kept in the broker or result backend ([`celery_core::history`]:
//!   the built-in broker's compacted results log, a capped index in Redis, a table in
//!   PostgreSQL; with RabbitMQ the result backend's, else in memory only, which the page says),
//!   searchable by id, name, state, worker, time range and argument text, a page at a time. The
//!   monitor writes each changed task at most once a second, in batches, off the event stream;
//!   a task its events left unfinished (a final event lost) takes its final state from the result
//!   backend a few seconds later ([`state::SETTLE_AFTER`]); a monitor started later reads the
//!   newest tasks back, so the page shows them at once (and settles those left unfinished);
//! - throughput over the last ten minutes;
//! - **revoke** (optionally terminating).
//!
//! Looking never changes what it shows: dead letters are listed with [`Broker::peek`], which takes
//! and counts nothing (a broker that cannot peek, RabbitMQ, shows their number only), and retrying
//! or discarding one counts no delivery against the others ([`dead`]).
//!
//! It is read-only unless started with `--allow-control`. Bound beyond loopback it requires
//! `--token`, which the page and API take as `?token=...` (or `Authorization: Bearer ...`). Every
//! request must name the monitor in its `Host` header (the bound address, `localhost` on loopback,
//! or a name given with `--allow-host`; else 421), and every control request (POST) needs either
//! `Authorization: Bearer <token>` or a same-origin `Origin`/`Referer` plus the CSRF token the page
//! embeds, sent as `X-CSRF-Token` (else 403): a page of another site can neither drive it nor read
//! it. Every answer carries a nonce-based `Content-Security-Policy`, `X-Frame-Options: DENY`,
//! `X-Content-Type-Options: nosniff` and `Referrer-Policy: no-referrer` ([`guard`]).
//!
//! The JSON API the page uses: `GET /api/state?search=`, `GET /api/task/{id}`,
//! `GET /api/history?id=&name=&state=&worker=&text=&since=&until=&cursor=&limit=` (times in
//! seconds since the epoch; a page of at most 500, with the cursor of the next),
//! `GET /api/dead/{queue}`, and with control `POST /api/dead/{queue}/{retry|discard}/{id}`,
//! `POST /api/dead/{queue}/{retry|discard}?match=TEXT` (every dead letter whose task, id, reason
//! or arguments contain TEXT; all when empty),
//! `POST /api/revoke/{id}?terminate=true`, `POST /api/queue/{queue}/{pause|resume}`. A script drives control with the token:
//!
//! ```text
//! mybin monitor --allow-control --token "$T" &
//! curl -X POST -H "Authorization: Bearer $T" http://127.0.0.1:5555/api/revoke/<task id>
//! ```
//!
//! [`Broker::peek`]: celery_core::Broker::peek
//! [`Broker::queue_stats`]: celery_core::Broker::queue_stats

pub mod dead;
pub mod guard;
pub mod state;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, Query, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use celery_core::capability::Capabilities;
use celery_core::history::{History, HistoryQuery, MemoryHistory, Retain};
use celery_core::sync::lock;
use celery_core::App;
use serde::Deserialize;
use serde_json::{json, Value};

use state::MonitorState;

/// Dashboard settings.
#[derive(Debug, Clone)]
pub struct MonitorConfig {
    /// Where to listen.
    pub listen: SocketAddr,
    /// Queues whose depth and dead letters are shown.
    pub queues: Vec<String>,
    /// Allow retry, discard and revoke.
    pub allow_control: bool,
    /// Required from clients when set (and required to listen beyond loopback).
    pub token: Option<String>,
    /// Host names clients may reach it by besides its address (`NAME` for any port, `NAME:PORT`).
    pub hosts: Vec<String>,
    /// What the history keeps: how long, how many tasks.
    pub history: Retain,
}

#[derive(Clone)]
struct Ctx {
    app: App,
    cfg: Arc<MonitorConfig>,
    guard: Arc<guard::Guard>,
    state: Arc<Mutex<MonitorState>>,
    history: Arc<HistoryAt>,
}

/// Where the history is kept: the broker's store, else the result backend's, else this process's
/// memory.
#[derive(Debug, Default)]
struct HistoryAt {
    memory: MemoryHistory,
}

impl HistoryAt {
    fn store<'a>(&'a self, app: &'a App) -> &'a dyn History {
        app.broker().history().or_else(|| app.backend().history()).unwrap_or(&self.memory)
    }

    fn is_memory(app: &App) -> bool {
        app.broker().history().is_none() && app.backend().history().is_none()
    }

    /// Where, for the page and the log.
    fn describe(app: &App) -> String {
        if app.broker().history().is_some() {
            format!("kept in the broker ({})", app.broker().kind())
        } else if app.backend().history().is_some() {
            format!("kept in the result backend ({})", app.backend().kind())
        } else {
            format!(
                "in memory only, lost on restart: neither the broker ({}) nor the result backend ({}) keeps history",
                app.broker().kind(),
                app.backend().kind()
            )
        }
    }
}

/// How often changed tasks are written to the history store.
const FLUSH_EVERY: Duration = Duration::from_secs(1);
/// Unfinished tasks whose result one flush looks at, at most.
const SETTLE_BATCH: usize = 500;
/// Results looked up at once.
const SETTLE_CONCURRENCY: usize = 16;
/// The shortest pause between two log lines about what the history was given.
const REPORT_EVERY: Duration = Duration::from_secs(10);
/// Tasks read back from the history store when the monitor starts.
const SEED_TASKS: usize = 1000;

const PAGE: &str = include_str!("page.html");

/// Serves the dashboard until `shutdown` resolves.
pub async fn serve(
    app: App,
    cfg: MonitorConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), String> {
    if !cfg.listen.ip().is_loopback() && cfg.token.as_deref().unwrap_or("").is_empty() {
        return Err(format!("listening on {} (not loopback) requires --token", cfg.listen));
    }
    let state = Arc::new(Mutex::new(MonitorState::default()));
    let history = Arc::new(HistoryAt::default());
    if HistoryAt::is_memory(&app) {
        tracing::warn!("monitor: task history {}", HistoryAt::describe(&app));
    } else {
        tracing::info!("monitor: task history {}", HistoryAt::describe(&app));
    }
    let mut events = crate::events::subscribe(&app).await.map_err(|e| e.to_string())?;
    let folded = state.clone();
    tokio::spawn(async move {
        while let Some(e) = events.next().await {
            lock(&folded).apply(&e);
        }
    });
    seed(&app, &history, &state).await;
    let flusher = tokio::spawn(flush(app.clone(), history.clone(), state.clone(), cfg.history));
    let keep = cfg.history;
    let listener = tokio::net::TcpListener::bind(cfg.listen).await.map_err(|e| format!("{}: {e}", cfg.listen))?;
    tracing::info!(listen = %cfg.listen, control = cfg.allow_control, "monitor on http://{}/", cfg.listen);
    let bound = listener.local_addr().map_err(|e| format!("{}: {e}", cfg.listen))?;
    let guard = Arc::new(guard::Guard::new(bound, cfg.hosts.clone(), cfg.token.clone()));
    let ctx = Ctx { app: app.clone(), cfg: Arc::new(cfg), guard, state: state.clone(), history: history.clone() };
    let router = Router::new()
        .route("/", get(page))
        .route("/api/state", get(api_state))
        .route("/api/task/{id}", get(api_task))
        .route("/api/history", get(api_history))
        .route("/api/dead/{queue}", get(api_dead))
        .route("/api/dead/{queue}/{action}/{id}", post(api_dead_act))
        .route("/api/dead/{queue}/{action}", post(api_dead_bulk))
        .route("/api/revoke/{id}", post(api_revoke))
        .route("/api/queue/{queue}/{action}", post(api_queue_act))
        .layer(axum::middleware::from_fn_with_state(ctx.clone(), check))
        .layer(axum::middleware::map_response(secure))
        .with_state(ctx);
    let served = axum::serve(listener, router).with_graceful_shutdown(shutdown).await.map_err(|e| e.to_string());
    // What changed since the last write is written before the monitor ends.
    flusher.abort();
    flush_changed(&app, &history, &state, &keep).await;
    served
}

/// Reads the newest tasks back from the history store, so that a restarted monitor shows them.
async fn seed(app: &App, history: &HistoryAt, state: &Mutex<MonitorState>) {
    let mut query = HistoryQuery { limit: celery_core::history::MAX_PAGE, ..HistoryQuery::default() };
    let mut found = Vec::new();
    while found.len() < SEED_TASKS {
        match history.store(app).search(&query).await {
            Ok(page) => {
                found.extend(page.tasks);
                match page.next {
                    Some(next) => query.cursor = Some(next),
                    None => break,
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "monitor: cannot read the task history back");
                break;
            }
        }
    }
    tracing::info!(tasks = found.len(), "monitor: tasks read back from the history");
    lock(state).seed(found);
}

/// Writes the tasks changed since the last flush, every [`FLUSH_EVERY`], in batches of at most
/// [`MAX_BATCH`](celery_core::history::MAX_BATCH): the event stream only marks tasks changed, so a
/// slow store never slows it. A failed batch stays marked and is written at the next flush.
async fn flush(app: App, history: Arc<HistoryAt>, state: Arc<Mutex<MonitorState>>, keep: Retain) {
    let mut tick = tokio::time::interval(FLUSH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (mut written, mut settled, mut reported) = (0u64, 0u64, (0u64, tokio::time::Instant::now()));
    loop {
        tick.tick().await;
        settled += settle(&app, &state).await;
        written += flush_changed(&app, &history, &state, &keep).await;
        if written != reported.0 && reported.1.elapsed() >= REPORT_EVERY {
            let (events, unsettled) = {
                let s = lock(&state);
                (s.events(), s.unsettled_len())
            };
            tracing::info!(events, written, settled, unsettled, "monitor: history written (task events folded, task records written, tasks settled from their results, unfinished tasks still looked at)");
            reported = (written, tokio::time::Instant::now());
        }
    }
}

/// Looks up the results of the unfinished tasks that are due ([`MonitorState::due_checks`]) and
/// settles those the result backend says are finished; returns how many. A lookup that fails is
/// tried at the task's next look.
async fn settle(app: &App, state: &Mutex<MonitorState>) -> u64 {
    use futures::StreamExt;
    let due = lock(state).due_checks(celery_core::event::now(), SETTLE_BATCH);
    if due.is_empty() {
        return 0;
    }
    let lookups = due.into_iter().map(|id| {
        let backend = app.backend().clone();
        async move { backend.get(&id).await }
    });
    let found: Vec<_> = futures::stream::iter(lookups).buffer_unordered(SETTLE_CONCURRENCY).collect().await;
    let mut s = lock(state);
    let mut settled = 0;
    for got in found {
        match got {
            Ok(Some(meta)) => settled += u64::from(s.settle(&meta)),
            Ok(None) => {}
            Err(e) => tracing::debug!(error = %e, "monitor: cannot read a task's result"),
        }
    }
    settled
}

/// Writes every task changed since the last write; a failed batch stays marked for the next one.
/// Returns how many were written.
async fn flush_changed(app: &App, history: &HistoryAt, state: &Mutex<MonitorState>, keep: &Retain) -> u64 {
    let mut written = 0;
    loop {
        let batch = lock(state).take_changed(celery_core::history::MAX_BATCH);
        if batch.is_empty() {
            return written;
        }
        if let Err(e) = history.store(app).record(&batch, keep).await {
            tracing::warn!(error = %e, tasks = batch.len(), "monitor: writing the task history failed; retrying in a second");
            lock(state).give_back(batch);
            return written;
        }
        written += batch.len() as u64;
    }
}

/// Refuses what [`guard::Guard::check`] refuses: a wrong Host, a missing token, cross-site control.
async fn check(State(ctx): State<Ctx>, req: Request, next: Next) -> Response {
    if let Err(refusal) = ctx.guard.check(req.method(), req.headers(), req.uri().query()) {
        tracing::warn!(
            method = %req.method(),
            path = %req.uri().path(),
            host = ?req.headers().get(header::HOST),
            origin = ?req.headers().get(header::ORIGIN),
            ?refusal,
            "monitor: request refused"
        );
        return refusal.answer().into_response();
    }
    next.run(req).await
}

/// Adds the security headers to every answer.
async fn secure(mut res: Response) -> Response {
    guard::secure(res.headers_mut());
    res
}

/// The page, with its CSRF token and a fresh nonce for its script and style.
async fn page(State(ctx): State<Ctx>) -> Response {
    let (html, csp) = guard::page(PAGE, ctx.guard.csrf(), &guard::random_token());
    let mut res = Html(html).into_response();
    if let Ok(v) = header::HeaderValue::from_str(&csp) {
        res.headers_mut().insert(header::CONTENT_SECURITY_POLICY, v);
    }
    res
}

#[derive(Deserialize)]
struct Search {
    #[serde(default)]
    search: String,
}

async fn api_state(State(ctx): State<Ctx>, Query(q): Query<Search>) -> Json<Value> {
    let mut queues = Vec::new();
    for name in &ctx.cfg.queues {
        let stats = ctx.app.broker().queue_stats(name).await.ok();
        queues.push(json!({
            "name": name,
            "depth": stats.map(|s| s.depth),
            "dead": stats.map(|s| s.dead_letters),
            "in_flight": stats.and_then(|s| s.in_flight),
            "oldest_age": stats.and_then(|s| s.oldest_age).map(|a| a.as_secs_f64()),
        }));
    }
    let now = celery_core::event::now();
    let s = lock(&ctx.state);
    let workers: Vec<Value> = s
        .workers()
        .into_iter()
        .map(|w| {
            let age = now - w.last_seen;
            json!({"hostname": w.hostname, "online": w.online && age < 10.0, "heartbeat_age": age,
                   "active": w.active, "processed": w.processed, "software": w.software})
        })
        .collect();
    Json(json!({
        "workers": workers,
        "queues": queues,
        "tasks": s.tasks(&q.search, 200),
        "throughput": s.throughput(),
        "now": now,
        "allow_control": ctx.cfg.allow_control,
        "broker": ctx.app.broker().kind(),
        "backend": ctx.app.backend().kind(),
        "offers": {
            "broker": Capabilities::of_broker(ctx.app.broker().as_ref()).to_string(),
            "backend": Capabilities::of_backend(ctx.app.backend().as_ref()).to_string(),
        },
    }))
}

async fn api_task(State(ctx): State<Ctx>, Path(id): Path<String>) -> Json<Value> {
    let mut seen = lock(&ctx.state).task(&id);
    if seen.is_none() && id.len() <= celery_core::history::MAX_QUERY_TEXT {
        let query = HistoryQuery { id: id.clone(), limit: 1, ..HistoryQuery::default() };
        seen = ctx
            .history
            .store(&ctx.app)
            .search(&query)
            .await
            .ok()
            .and_then(|p| p.tasks.into_iter().find(|t| t.id == id));
    }
    let stored = ctx.app.backend().get(&id).await.ok().flatten();
    Json(json!({"events": seen, "result": stored}))
}

/// One page of the history: `?id=&name=&state=&worker=&text=&since=&until=&cursor=&limit=`.
async fn api_history(State(ctx): State<Ctx>, Query(query): Query<HistoryQuery>) -> Response {
    if let Err(e) = query.check() {
        return (StatusCode::BAD_REQUEST, e).into_response();
    }
    match ctx.history.store(&ctx.app).search(&query).await {
        Ok(page) => Json(json!({"tasks": page.tasks, "next": page.next, "kept": HistoryAt::describe(&ctx.app),
                                "memory_only": HistoryAt::is_memory(&ctx.app)}))
        .into_response(),
        Err(e) => (StatusCode::BAD_GATEWAY, e.to_string()).into_response(),
    }
}

/// Only the queues the monitor was started with (`-Q`) are looked at or acted on: a request cannot
/// make it touch (or, on the log broker, create) any other queue.
fn unknown_queue(ctx: &Ctx, queue: &str) -> Option<Response> {
    (!ctx.cfg.queues.iter().any(|q| q == queue))
        .then(|| (StatusCode::NOT_FOUND, format!("`{queue}` is not one of the monitor's queues (-Q)")).into_response())
}

async fn api_dead(State(ctx): State<Ctx>, Path(queue): Path<String>) -> Response {
    if let Some(refused) = unknown_queue(&ctx, &queue) {
        return refused;
    }
    match dead::list(&ctx.app, &queue).await {
        Ok(list) => Json(json!(list)).into_response(),
        Err(e) => (StatusCode::BAD_GATEWAY, e).into_response(),
    }
}

fn forbidden() -> Response {
    (StatusCode::FORBIDDEN, "read-only: start the monitor with --allow-control").into_response()
}

async fn api_dead_act(State(ctx): State<Ctx>, Path((queue, action, id)): Path<(String, String, String)>) -> Response {
    if !ctx.cfg.allow_control {
        return forbidden();
    }
    if let Some(refused) = unknown_queue(&ctx, &queue) {
        return refused;
    }
    let action = match action.as_str() {
        "retry" => dead::Action::Retry,
        "discard" => dead::Action::Discard,
        _ => return (StatusCode::NOT_FOUND, "retry or discard").into_response(),
    };
    match dead::act(&ctx.app, &queue, &id, action).await {
        Ok(true) => Json(json!({"ok": true})).into_response(),
        Ok(false) => (StatusCode::NOT_FOUND, format!("no dead letter of {id} in {queue}")).into_response(),
        Err(e) => (StatusCode::BAD_GATEWAY, e).into_response(),
    }
}

#[derive(Deserialize)]
struct Filter {
    #[serde(default, rename = "match")]
    filter: String,
}

/// Retries or discards every dead letter of `queue` matching `?match=` (all when empty) among the
/// oldest [`dead::MAX`]; answers with how many were acted on and kept.
async fn api_dead_bulk(
    State(ctx): State<Ctx>,
    Path((queue, action)): Path<(String, String)>,
    Query(f): Query<Filter>,
) -> Response {
    if !ctx.cfg.allow_control {
        return forbidden();
    }
    if let Some(refused) = unknown_queue(&ctx, &queue) {
        return refused;
    }
    if f.filter.len() > dead::MAX_FILTER {
        return (StatusCode::BAD_REQUEST, format!("a filter is at most {} bytes", dead::MAX_FILTER)).into_response();
    }
    let action = match action.as_str() {
        "retry" => dead::Action::Retry,
        "discard" => dead::Action::Discard,
        _ => return (StatusCode::NOT_FOUND, "retry or discard").into_response(),
    };
    match dead::act_matching(&ctx.app, &queue, &f.filter, action).await {
        Ok(bulk) => Json(json!({"ok": true, "acted": bulk.acted, "kept": bulk.kept})).into_response(),
        Err(e) => (StatusCode::BAD_GATEWAY, e).into_response(),
    }
}

#[derive(Deserialize)]
struct Terminate {
    #[serde(default)]
    terminate: bool,
}

async fn api_revoke(State(ctx): State<Ctx>, Path(id): Path<String>, Query(t): Query<Terminate>) -> Response {
    if !ctx.cfg.allow_control {
        return forbidden();
    }
    match crate::control::revoke(&ctx.app, &[&id], t.terminate, None, Duration::from_secs(1)).await {
        Ok(replies) => Json(json!({"ok": true, "replies": replies.len()})).into_response(),
        Err(e) => (StatusCode::BAD_GATEWAY, e.to_string()).into_response(),
    }
}

/// Pauses or resumes a queue on every worker: Celery's `cancel_consumer` / `add_consumer`
/// broadcast (`control pause -Q` / `resume -Q`); answers with how many workers replied.
async fn api_queue_act(State(ctx): State<Ctx>, Path((queue, action)): Path<(String, String)>) -> Response {
    if !ctx.cfg.allow_control {
        return forbidden();
    }
    if let Some(refused) = unknown_queue(&ctx, &queue) {
        return refused;
    }
    let method = match action.as_str() {
        "pause" => "cancel_consumer",
        "resume" => "add_consumer",
        _ => return (StatusCode::NOT_FOUND, "pause or resume").into_response(),
    };
    match crate::control::request(&ctx.app, method, json!({"queue": queue}), None, Duration::from_secs(1)).await {
        Ok(replies) => Json(json!({"ok": true, "replies": replies.len()})).into_response(),
        Err(e) => (StatusCode::BAD_GATEWAY, e.to_string()).into_response(),
    }
}

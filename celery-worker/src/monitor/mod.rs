//! `monitor --listen 127.0.0.1:5555`: a live dashboard over any broker, fed by Celery's events
//! (start workers with `-E`). One page, no build step, no external assets:
//!
//! - workers: online, heartbeat age, tasks running and finished;
//! - queues: depth and dead letters (with **retry** and **discard**);
//! - tasks: a live list searchable by id, name or state, and each task's detail (arguments,
//!   result or error with traceback, retries, timeline, the stored result);
//! - throughput over the last ten minutes;
//! - **revoke** (optionally terminating).
//!
//! It is read-only unless started with `--allow-control`. Bound beyond loopback it requires
//! `--token`, which the page and API take as `?token=...` (or `Authorization: Bearer ...`).
//!
//! The JSON API the page uses: `GET /api/state?search=`, `GET /api/task/{id}`,
//! `GET /api/dead/{queue}`, and with control `POST /api/dead/{queue}/{retry|discard}/{id}`,
//! `POST /api/revoke/{id}?terminate=true`.

pub mod dead;
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
}

#[derive(Clone)]
struct Ctx {
    app: App,
    cfg: Arc<MonitorConfig>,
    state: Arc<Mutex<MonitorState>>,
}

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
    let mut events = crate::events::subscribe(&app).await.map_err(|e| e.to_string())?;
    let folded = state.clone();
    tokio::spawn(async move {
        while let Some(e) = events.next().await {
            folded.lock().unwrap_or_else(|p| p.into_inner()).apply(&e);
        }
    });
    let listener = tokio::net::TcpListener::bind(cfg.listen).await.map_err(|e| format!("{}: {e}", cfg.listen))?;
    tracing::info!(listen = %cfg.listen, control = cfg.allow_control, "monitor on http://{}/", cfg.listen);
    let ctx = Ctx { app, cfg: Arc::new(cfg), state };
    let router = Router::new()
        .route("/", get(|| async { Html(PAGE) }))
        .route("/api/state", get(api_state))
        .route("/api/task/{id}", get(api_task))
        .route("/api/dead/{queue}", get(api_dead))
        .route("/api/dead/{queue}/{action}/{id}", post(api_dead_act))
        .route("/api/revoke/{id}", post(api_revoke))
        .layer(axum::middleware::from_fn_with_state(ctx.clone(), auth))
        .with_state(ctx);
    axum::serve(listener, router).with_graceful_shutdown(shutdown).await.map_err(|e| e.to_string())
}

/// Checks the token, when one is set.
async fn auth(State(ctx): State<Ctx>, req: Request, next: Next) -> Response {
    if let Some(token) = ctx.cfg.token.as_deref().filter(|t| !t.is_empty()) {
        let bearer = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        let query = req.uri().query().unwrap_or_default();
        let in_query = query.split('&').any(|p| p.strip_prefix("token=") == Some(token));
        if bearer != Some(token) && !in_query {
            return (StatusCode::UNAUTHORIZED, "a token is required (?token=...)").into_response();
        }
    }
    next.run(req).await
}

#[derive(Deserialize)]
struct Search {
    #[serde(default)]
    search: String,
}

async fn api_state(State(ctx): State<Ctx>, Query(q): Query<Search>) -> Json<Value> {
    let mut queues = Vec::new();
    for name in &ctx.cfg.queues {
        let depth = ctx.app.broker().queue_len(name).await.ok();
        let dead = ctx.app.broker().queue_len(&celery_core::broker::dead_letter_queue(name)).await.ok();
        queues.push(json!({"name": name, "depth": depth, "dead": dead}));
    }
    let now = celery_core::event::now();
    let s = ctx.state.lock().unwrap_or_else(|p| p.into_inner());
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
    }))
}

async fn api_task(State(ctx): State<Ctx>, Path(id): Path<String>) -> Json<Value> {
    let seen = ctx.state.lock().unwrap_or_else(|p| p.into_inner()).task(&id);
    let stored = ctx.app.backend().get(&id).await.ok().flatten();
    Json(json!({"events": seen, "result": stored}))
}

async fn api_dead(State(ctx): State<Ctx>, Path(queue): Path<String>) -> Response {
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

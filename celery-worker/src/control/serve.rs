//! A worker's side of remote control: the request loop and the dispatch to each command.
//!
//! Each request moves the worker's clock one step (Celery's workers do the same, as clients rarely
//! send a useful clock), is checked against its addressing ([`super::destination`]), runs, and is
//! answered `{<hostname>: <reply>}` on the exchange and routing key of its `reply_to`, with its
//! `ticket` and the clock as headers. Requests run one at a time, in the order received. A worker
//! starting up syncs revoked ids with the others (`hello`, Celery's mingle) without delaying its
//! start.

use std::sync::Arc;
use std::time::Duration;

use celery_core::broker::Subscription;
use celery_core::routing::{Exchange, ExchangeKind};
use serde_json::{json, Value};

use super::args::{Args, PyError};
use super::inspect::MemSamples;
use super::{commands, destination, inspect};
use crate::worker::Shared;

/// Starts a worker's remote control, once, before it reports ready: takes in the revokes stored
/// for workers that start later, then answers requests on [`super::request_exchange`] until the
/// returned task is aborted. `None` when the broker has no broadcasts (no remote control then).
pub(crate) async fn start(w: &Arc<Shared>) -> Option<tokio::task::JoinHandle<()>> {
    for id in super::stored_revoked(&w.app).await.into_keys() {
        w.revoked.add(&id);
    }
    match async { w.app.broker().require_broadcasts("remote control")?.subscribe(&super::request_exchange(), "").await }
        .await
    {
        Ok(requests) => Some(tokio::spawn(serve(w.clone(), requests))),
        Err(e) => {
            tracing::debug!(error = %e, "remote control unavailable");
            None
        }
    }
}

/// What a request does once answered.
#[derive(Debug, PartialEq)]
enum After {
    Nothing,
    /// `shutdown`: stop the worker, after the reply is sent.
    Shutdown,
}

/// Runs `method(arguments)`; an unknown method is Kombu's `KeyError`.
async fn dispatch(
    w: &Shared,
    method: &str,
    arguments: &Value,
    samples: &mut MemSamples,
) -> (Result<Value, PyError>, After) {
    let args = Args::new(method, arguments);
    let reply = match method {
        "ping" => Ok(inspect::ping()),
        "stats" => Ok(inspect::stats(w).await),
        "active" | "dump_active" => Ok(inspect::active(w, args)),
        "reserved" | "dump_reserved" => Ok(inspect::reserved(w)),
        "scheduled" | "dump_schedule" => Ok(inspect::scheduled(w)),
        "query_task" => inspect::query_task(w, args),
        "registered" | "dump_tasks" => inspect::registered(w, args),
        "revoked" | "dump_revoked" => Ok(inspect::revoked(w)),
        "active_queues" => Ok(inspect::active_queues(w).await),
        "conf" | "dump_conf" => Ok(inspect::conf(w, args)),
        "clock" => Ok(inspect::clock(w)),
        "report" => Ok(inspect::report(w)),
        "hello" => inspect::hello(w, args),
        "memsample" => Ok(inspect::memsample(samples)),
        "memdump" => inspect::memdump(samples, args),
        "objgraph" => inspect::objgraph(),
        "revoke" => commands::revoke(w, args),
        "terminate" => commands::terminate(w, args),
        "revoke_by_stamped_headers" => commands::revoke_by_stamped_headers(w, args),
        "rate_limit" => commands::rate_limit(w, args),
        "time_limit" => commands::time_limit(w, args),
        "add_consumer" => commands::add_consumer(w, args).await,
        "cancel_consumer" => commands::cancel_consumer(w, args).await,
        "pool_grow" => commands::pool_grow(w, args).await,
        "pool_shrink" => commands::pool_shrink(w, args).await,
        "autoscale" => commands::autoscale(w, args).await,
        "enable_events" => Ok(commands::enable_events(w)),
        "disable_events" => Ok(commands::disable_events(w)),
        "heartbeat" => Ok(commands::heartbeat(w)),
        "election" => commands::election(args),
        "pool_restart" => commands::pool_restart(),
        "shutdown" => {
            let msg = args.text("msg").ok().flatten().unwrap_or_else(|| "Got shutdown from remote".into());
            tracing::warn!("{msg}");
            return (Ok(json!({"ok": "shutting down"})), After::Shutdown);
        }
        other => Err(PyError::key(other)),
    };
    (reply, After::Nothing)
}

/// Answers remote-control requests until the worker stops.
async fn serve(w: Arc<Shared>, mut requests: Box<dyn Subscription>) {
    tokio::spawn(mingle(w.clone()));
    let mut samples = MemSamples::default();
    let host = w.config.hostname.clone();
    while let Some(b) = requests.next().await {
        let Ok(body) = serde_json::from_slice::<Value>(&b.body) else {
            tracing::debug!("remote control: skipping a request that is not JSON");
            continue;
        };
        w.clock.forward();
        match destination::meant_for(&body, &host) {
            Ok(true) => {}
            Ok(false) => continue,
            Err(e) => {
                tracing::error!(error = %e, "remote control: cannot tell whether a request is for this worker");
                continue;
            }
        }
        let Some(method) = body["method"].as_str() else {
            tracing::debug!("remote control: a request without a method");
            continue;
        };
        tracing::debug!(%method, "remote control request");
        let (reply, after) = dispatch(&w, method, &body["arguments"], &mut samples).await;
        let reply = reply.unwrap_or_else(|e| {
            tracing::error!(%method, error = %e, "remote control command error");
            json!({"error": e.repr()})
        });
        if let Some(to) = body["reply_to"].as_object() {
            send_reply(&w, to, &body["ticket"], reply).await;
        }
        if after == After::Shutdown {
            let _ = w.remote_stop.send(true);
        }
    }
}

/// Publishes `{hostname: reply}` where `reply_to` says, with the ticket and the clock.
async fn send_reply(w: &Shared, reply_to: &serde_json::Map<String, Value>, ticket: &Value, reply: Value) {
    let Some(key) = reply_to.get("routing_key").and_then(Value::as_str) else { return };
    let name = reply_to.get("exchange").and_then(Value::as_str).unwrap_or("reply.celery.pidbox");
    if name.len() > crate::worker::intake::MAX_QUEUE_NAME || key.len() > crate::worker::intake::MAX_QUEUE_NAME {
        tracing::warn!("remote control: reply_to too long; not answered");
        return;
    }
    let exchange = Exchange::new(name, ExchangeKind::Direct).transient();
    let body = json!({ w.config.hostname.clone(): reply });
    let msg = super::message(&body, &[("ticket", ticket.clone()), ("clock", json!(w.clock.forward()))]);
    if let Err(e) =
        async { w.app.broker().require_broadcasts("control replies")?.broadcast(&exchange, key, &msg).await }.await
    {
        tracing::warn!(error = %e, "remote control: cannot reply");
    }
}

/// Celery's mingle: asks the running workers `hello` with our revoked ids and takes in theirs and
/// their clocks.
async fn mingle(w: Arc<Shared>) {
    let ours: serde_json::Map<String, Value> =
        w.revoked.list().into_iter().map(|id| (id.clone(), json!([0.0, id]))).collect();
    let args = json!({"from_node": w.config.hostname, "revoked": ours});
    let Ok(replies) = super::request(&w.app, "hello", args, None, Duration::from_secs(1)).await else { return };
    let mut synced = 0;
    for (node, reply) in replies {
        if node == w.config.hostname || !reply.is_object() || reply.get("error").is_some() {
            continue;
        }
        for id in inspect::revoked_ids(reply.get("revoked")).take(super::REVOKES_MAX) {
            w.revoked.add(&id);
        }
        if let Some(c) = reply.get("clock").and_then(Value::as_u64) {
            w.clock.adjust(c);
        }
        synced += 1;
    }
    if synced > 0 {
        tracing::info!(nodes = synced, "mingle: synced with other workers");
    }
}

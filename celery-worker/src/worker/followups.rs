//! What a finished task sends next: after a success, the next step of its chain and its callbacks
//! (with the result as the first argument); after a final failure, its errbacks (with the failed
//! task's id as the first argument, Celery's convention for errbacks that run as tasks).

use celery_core::protocol::{Headers, Message};
use celery_core::{App, Signature};
use serde_json::{json, Map, Value};

/// After a success: `embed.chain` (kept reversed, as Celery does) and `embed.callbacks`, sent
/// by [`send_all`] with the result.
pub(crate) fn after_success(embed: &Map<String, Value>) -> Vec<Signature> {
    let mut next = Vec::new();
    if let Some(Value::Array(rest)) = embed.get("chain") {
        if let Some((first, remaining)) = rest.split_last() {
            if let Some(mut sig) = parse(first, "the next step of a chain") {
                sig.options.chain =
                    remaining.iter().rev().filter_map(|s| parse(s, "a later step of a chain")).collect();
                next.push(sig);
            }
        }
    }
    next.extend(signatures(embed.get("callbacks"), "a callback"));
    next
}

/// After a final failure: `embed.errbacks`, each with the task id as its first argument.
pub(crate) async fn on_failure(app: &App, msg: &Message) {
    let Ok(body) = msg.body() else { return };
    let errbacks = signatures(body.embed.get("errbacks"), "an errback");
    let id = Value::String(msg.headers.id.clone());
    send_all(app, errbacks, &id, &msg.headers, msg.headers.root_id.as_deref()).await;
}

/// Sends `sigs` with `first` as their first argument (unless immutable), as children of the task
/// `parent` (its id, and its trace context: see [`celery_core::trace::inherit`]). Returns the sent
/// tasks as Celery records them in the parent's `children` (`[[id, null], null]` each), so that
/// Python's `AsyncResult.children` lists the chain's next step and the callbacks.
pub(crate) async fn send_all(
    app: &App,
    sigs: Vec<Signature>,
    first: &Value,
    parent: &Headers,
    root: Option<&str>,
) -> Vec<Value> {
    let mut children = Vec::with_capacity(sigs.len());
    for mut sig in sigs {
        if !sig.immutable {
            sig.args.insert(0, first.clone());
        }
        sig.options.parent_id = Some(parent.id.clone());
        celery_core::trace::inherit(parent, &mut sig.options.headers);
        sig.options.root_id = root.map(str::to_owned);
        let name = sig.task.clone();
        match app.send(sig).await {
            Ok(sent) => children.push(json!([[sent.id(), null], null])),
            Err(e) => tracing::error!(error = %e, next = %name, "could not send the next task of a workflow"),
        }
    }
    children
}

fn signatures(list: Option<&Value>, what: &str) -> Vec<Signature> {
    match list {
        Some(Value::Array(items)) => items.iter().filter_map(|s| parse(s, what)).collect(),
        _ => Vec::new(),
    }
}

fn parse(v: &Value, what: &str) -> Option<Signature> {
    Signature::from_json(v).map_err(|e| tracing::error!(error = %e, "{what}: malformed signature")).ok()
}

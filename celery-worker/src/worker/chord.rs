//! Completing chords: each member's final state is counted in the result backend; the member that
//! completes the chord sends the body with the members' results, or fails it with a `ChordError`
//! when a member failed (Celery's `on_chord_part_return`).

use celery_core::backend::{ChordMember, TaskMeta};
use celery_core::protocol::Message;
use celery_core::{App, Signature, TaskError, TaskState};
use serde_json::Value;

/// The chord body of a message, when it is a chord member (`group` header and `embed.chord`).
pub(crate) fn body_of(msg: &Message) -> Option<Value> {
    msg.headers.group.as_ref()?;
    body_in(msg, &msg.body().ok()?.embed).cloned()
}

/// The same, from a body's `embed` decoded already.
pub(crate) fn body_in<'a>(msg: &Message, embed: &'a serde_json::Map<String, Value>) -> Option<&'a Value> {
    msg.headers.group.as_ref()?;
    embed.get("chord").filter(|c| c.is_object())
}

/// Counts a member's final state (`SUCCESS`, `FAILURE`, `REVOKED`) into its chord; when this
/// completes the chord, sends the body or fails it. Errors are logged: the member's delivery is
/// acked afterwards either way, and a redelivery reports again.
pub(crate) async fn member_done(app: &App, msg: &Message, body: &Value, state: TaskState, result: &Value) {
    let Some(group) = msg.headers.group.as_deref() else { return };
    let member =
        ChordMember { task_id: msg.headers.id.clone(), index: msg.headers.group_index, state, result: result.clone() };
    let members = match async { app.backend().require_chords()?.chord_part(group, &member).await }.await {
        Ok(Some(m)) => m,
        Ok(None) => return,
        Err(e) => return tracing::error!(chord = group, error = %e, "chord: cannot count this member"),
    };
    let sig = match Signature::from_json(body) {
        Ok(s) => s,
        Err(e) => return tracing::error!(chord = group, error = %e, "chord: the body signature is malformed"),
    };
    let body_id = sig.options.task_id.clone().unwrap_or_default();
    let outcome = match members.iter().find(|m| m.state != TaskState::Success) {
        Some(failed) => fail_body(app, msg, &sig, &body_id, failed).await,
        None => send_body(app, msg, sig, &members).await,
    };
    match outcome {
        Ok(()) => {
            if let Err(e) = async { app.backend().require_chords()?.chord_done(group).await }.await {
                tracing::warn!(chord = group, error = %e, "chord: cannot clear the tally (it expires)");
            }
        }
        Err(e) => {
            tracing::error!(chord = group, error = %e, "chord: cannot finish; a redelivery of this member retries")
        }
    }
}

async fn send_body(app: &App, msg: &Message, mut sig: Signature, members: &[ChordMember]) -> Result<(), String> {
    if !sig.immutable {
        sig.args.insert(0, Value::Array(members.iter().map(|m| m.result.clone()).collect()));
    }
    sig.options.parent_id = Some(msg.headers.id.clone());
    sig.options.root_id = msg.headers.root_id.clone();
    celery_core::trace::inherit(&msg.headers, &mut sig.options.headers);
    let name = sig.task.clone();
    let res = app.send(sig).await.map_err(|e| e.to_string())?;
    tracing::info!(chord = msg.headers.group.as_deref().unwrap_or(""), body = %name, id = res.id(), members = members.len(), "chord complete: body sent");
    Ok(())
}

/// Stores FAILURE for the body, with Celery's `ChordError` naming the failed member.
async fn fail_body(
    app: &App,
    msg: &Message,
    sig: &Signature,
    body_id: &str,
    failed: &ChordMember,
) -> Result<(), String> {
    let (exc_type, message) =
        TaskMeta { result: failed.result.clone(), ..TaskMeta::new("", failed.state, Value::Null) }
            .exception()
            .unwrap_or_else(|| (failed.state.to_string(), failed.result.to_string()));
    let err = TaskError::new("ChordError", format!("Dependency {} raised {exc_type}('{message}')", failed.task_id));
    tracing::warn!(body = %sig.task, id = body_id, member = %failed.task_id, "chord failed: a member failed; the body does not run");
    let mut meta = TaskMeta::error(body_id, TaskState::Failure, &err);
    meta.name = Some(sig.task.clone());
    app.backend().store(&meta).await.map_err(|e| e.to_string())?;
    let id = Value::String(body_id.to_owned());
    let body = celery_core::protocol::Headers { id: body_id.to_owned(), ..msg.headers.clone() };
    super::followups::send_all(app, sig.options.link_error.clone(), &id, &body, None).await;
    Ok(())
}

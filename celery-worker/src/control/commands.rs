//! The steering commands (`celery control ...`), with Celery's replies: `{"ok": text}`,
//! `{"error": text}`, or a Python exception's repr where Celery's handler raises.

use std::sync::atomic::Ordering;

use celery_core::registry;
use celery_core::sync::lock;
use serde_json::{json, Value};

use super::args::{py_str, Args, PyError, MAX_IDS};
use crate::worker::intake::QueueSpec;
use crate::worker::pool::MAX_POOL;
use crate::worker::{prefetch_for, Shared, TimeLimits};

fn ok(text: impl Into<String>) -> Value {
    json!({"ok": text.into()})
}

fn nok(text: impl Into<String>) -> Value {
    json!({"error": text.into()})
}

/// Python's repr of a set of strings: `{'a', 'b'}`, or `set()`.
fn py_set(items: &[String]) -> String {
    if items.is_empty() {
        return "set()".into();
    }
    format!("{{{}}}", items.iter().map(|s| py_str(s)).collect::<Vec<_>>().join(", "))
}

/// Celery's `signals.signum`: a number, or an upper-case name with or without `SIG`.
fn signum(signal: Option<&Value>) -> Result<String, PyError> {
    const KNOWN: [&str; 12] =
        ["TERM", "KILL", "INT", "HUP", "QUIT", "USR1", "USR2", "ABRT", "ALRM", "STOP", "CONT", "TRAP"];
    match signal {
        None => Ok("SIGTERM".into()),
        Some(Value::Number(n)) if n.is_i64() => Ok(n.to_string()),
        Some(Value::String(s)) if s.chars().all(|c| !c.is_lowercase()) && !s.is_empty() => {
            let bare = s.strip_prefix("SIG").unwrap_or(s);
            if KNOWN.contains(&bare) {
                Ok(format!("SIG{bare}"))
            } else {
                Err(PyError::new("AttributeError", format!("module 'signal' has no attribute 'SIG{bare}'")))
            }
        }
        Some(_) => Err(PyError::type_error("signal name must be uppercase string.")),
    }
}

/// `revoke` (`task_id`: one id or a list; `terminate`; `signal`). Running tasks are stopped by
/// dropping them (a Rust task has no process to signal): `signal` is checked and logged.
pub(super) fn revoke(w: &Shared, args: Args<'_>) -> Result<Value, PyError> {
    let mut ids = args.ids("task_id")?;
    let mut seen = std::collections::HashSet::new();
    ids.retain(|id| seen.insert(id.clone()));
    revoke_ids(w, &ids, args.flag("terminate"), args.get("signal"))
}

fn revoke_ids(w: &Shared, ids: &[String], terminate: bool, signal: Option<&Value>) -> Result<Value, PyError> {
    for id in ids {
        w.revoked.add(id);
    }
    store_revoked(w, ids);
    // Those waiting for an eta or a rate limit are dropped at once, not when their wait ends.
    w.requests.wake_waiting(|h| ids.contains(&h.msg.headers.id));
    if !terminate {
        tracing::info!(ids = %ids.join(", "), "tasks flagged as revoked");
        return Ok(ok(format!("tasks {} flagged as revoked", py_set(ids))));
    }
    let signum = signum(signal)?;
    let terminated = w.requests.terminate(|h| ids.contains(&h.msg.headers.id));
    if terminated.is_empty() {
        return Ok(ok("terminate: tasks unknown"));
    }
    tracing::info!(ids = %terminated.join(", "), %signum, "terminating");
    Ok(ok(format!("terminate: {}", terminated.join(", "))))
}

/// Requests whose REVOKED states are stored at once, at most.
const STORING_REVOKES: usize = 4;

/// Stores REVOKED for each id in the background, as Celery's workers do (`mark_as_revoked`), so a
/// caller waiting on a task that a Python client revoked learns it at once; best effort, logged. A
/// stored SUCCESS is never overwritten (every backend keeps it).
/// At most [`STORING_REVOKES`] requests store at once; past that a revoke is not stored (logged), so
/// a flood of revokes cannot pile up writes.
fn store_revoked(w: &Shared, ids: &[String]) {
    static STORING: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(STORING_REVOKES);
    let Ok(permit) = STORING.try_acquire() else {
        tracing::warn!(ids = ids.len(), "too many revokes being stored: these are only flagged, not stored");
        return;
    };
    let (app, ids) = (w.app.clone(), ids.to_vec());
    tokio::spawn(async move {
        let _permit = permit;
        let err = celery_core::TaskError::new("TaskRevokedError", "revoked");
        for id in ids {
            let meta = celery_core::TaskMeta::error(&id, celery_core::TaskState::Revoked, &err);
            if let Err(e) = app.backend().store(&meta).await {
                tracing::warn!(error = %e, task = %id, "cannot mark the task revoked in the result backend");
            }
        }
    });
}

/// `terminate` (`signal`, `task_id`): `revoke` with `terminate`.
pub(super) fn terminate(w: &Shared, args: Args<'_>) -> Result<Value, PyError> {
    let signal = args.required("signal")?;
    let ids = args.ids("task_id")?;
    revoke_ids(w, &ids, true, Some(signal))
}

/// `revoke_by_stamped_headers` (`headers`: `{header: value or values}` or `["header=value"]`;
/// `terminate`; `signal`).
pub(super) fn revoke_by_stamped_headers(w: &Shared, args: Args<'_>) -> Result<Value, PyError> {
    let headers: Vec<(String, Vec<Value>)> = match args.required("headers")? {
        Value::Object(m) => m
            .iter()
            .map(|(k, v)| (k.clone(), if let Value::Array(a) = v { a.clone() } else { vec![v.clone()] }))
            .collect(),
        Value::Array(a) => a
            .iter()
            .filter_map(|h| h.as_str())
            .map(|h| {
                let (k, v) = h.split_once('=').ok_or_else(|| PyError::new("IndexError", "list index out of range"))?;
                Ok((k.to_owned(), vec![json!(v)]))
            })
            .collect::<Result<_, PyError>>()?,
        other => return Err(PyError::new("AttributeError", format!("'{}' object has no attribute 'items'", other))),
    };
    if headers.iter().map(|(_, v)| v.len()).sum::<usize>() > MAX_IDS {
        return Err(PyError::value(format!("at most {MAX_IDS} stamps per request")));
    }
    for (header, values) in &headers {
        if !w.revoked_stamps.add(header, values) {
            return Err(PyError::value(format!(
                "at most {} revoked stamp headers and values, each at most {} bytes",
                super::MAX_STAMPS,
                super::MAX_ID_LEN
            )));
        }
    }
    w.requests.wake_waiting(|h| w.revoked_stamps.matches(&h.msg));
    let shown = format!(
        "{{{}}}",
        headers
            .iter()
            .map(|(k, v)| {
                let vals: Vec<String> = v.iter().map(|x| py_str(&super::stamp_key(x))).collect();
                let val = if vals.len() == 1 { vals[0].clone() } else { format!("[{}]", vals.join(", ")) };
                format!("{}: {val}", py_str(k))
            })
            .collect::<Vec<_>>()
            .join(", ")
    );
    if !args.flag("terminate") {
        return Ok(ok(format!("headers {shown} flagged as revoked, but not terminated")));
    }
    let signum = signum(args.get("signal"))?;
    let mut hit: std::collections::BTreeMap<String, std::collections::BTreeSet<String>> = Default::default();
    let terminated = w.requests.terminate(|h| {
        let mut any = false;
        for (header, values) in &headers {
            let wanted: Vec<String> = values.iter().map(super::stamp_key).collect();
            for s in h.stamps(header).iter().map(super::stamp_key) {
                if wanted.contains(&s) {
                    hit.entry(header.clone()).or_default().insert(s);
                    any = true;
                }
            }
        }
        any
    });
    if terminated.is_empty() {
        return Ok(ok(format!("headers {shown} were not terminated")));
    }
    tracing::info!(ids = %terminated.join(", "), %signum, "terminated by stamped headers");
    let mapping: Vec<String> = hit
        .iter()
        .map(|(k, v)| format!("{}: {{{}}}", py_str(k), v.iter().map(|s| py_str(s)).collect::<Vec<_>>().join(", ")))
        .collect();
    Ok(ok(format!("headers defaultdict(<class 'set'>, {{{}}}) revoked", mapping.join(", "))))
}

/// `rate_limit` (`task_name`, `rate_limit`: `10/s`, `100/m`, `5/h`, a number per second, or
/// `0`/empty to remove it; `cluster`: true for one bucket shared by every worker, held by the
/// broker, an extension Celery's workers ignore).
pub(super) fn rate_limit(w: &Shared, args: Args<'_>) -> Result<Value, PyError> {
    let task = args.required_text("task_name")?;
    let raw = args.required("rate_limit")?;
    let rate = match raw {
        Value::String(r) if r.trim().is_empty() || r.trim() == "0" => Ok(None),
        Value::String(r) => match r.trim().parse::<f64>() {
            Ok(n) if n.is_finite() && n > 0.0 => Ok(Some(celery_core::clock::secs_f64(1.0 / n))),
            Ok(0.0) => Ok(None),
            _ => celery_core::rate::parse_rate(r).map(Some).map_err(|e| e.to_string()),
        },
        Value::Number(n) => match n.as_f64() {
            Some(0.0) => Ok(None),
            Some(x) if x.is_finite() && x > 0.0 => Ok(Some(celery_core::clock::secs_f64(1.0 / x))),
            _ => Err(format!("invalid rate {n}")),
        },
        other => Err(format!("invalid rate {other}")),
    };
    let rate = match rate {
        Ok(r) => r,
        Err(e) => return Ok(nok(format!("Invalid rate limit string: ValueError({})", py_str(&e)))),
    };
    if registry::lookup(&task).is_none() {
        tracing::error!(%task, "rate limit attempt for an unknown task");
        return Ok(nok("unknown task"));
    }
    let cluster = matches!(args.get("cluster"), Some(Value::Bool(true)));
    if cluster {
        lock(&w.cluster_rates).insert(task.clone());
    } else {
        lock(&w.cluster_rates).remove(&task);
    }
    lock(&w.rate_overrides).insert(task.clone(), rate);
    Ok(match rate {
        None => {
            tracing::info!(%task, "rate limits disabled");
            ok("rate limit disabled successfully")
        }
        Some(interval) => {
            tracing::info!(%task, ?interval, "new rate limit");
            ok("new rate limit set successfully")
        }
    })
}

/// `time_limit` (`task_name`, `soft`, `hard`: seconds, absent or null for none): the limits of
/// that task's later runs on this worker (a message's own limits still come first).
pub(super) fn time_limit(w: &Shared, args: Args<'_>) -> Result<Value, PyError> {
    let task = args.text("task_name")?.unwrap_or_default();
    let Some(entry) = registry::lookup(&task) else {
        tracing::error!(%task, "time limit attempt for an unknown task");
        return Ok(nok("unknown task"));
    };
    let limit = |name: &str| -> Result<Option<f64>, PyError> {
        match args.float(name)? {
            Some(s) if s < 0.0 => Err(PyError::value(format!("{name} must not be negative: {s}"))),
            Some(s) if s > 1e9 => Err(PyError::value(format!("{name} must be at most 1e9 seconds: {s}"))),
            other => Ok(other.filter(|s| *s > 0.0)),
        }
    };
    let limits = TimeLimits { soft: limit("soft")?, hard: limit("hard")? };
    lock(&w.time_limits).insert(entry.name, limits);
    tracing::info!(task = entry.name, soft = ?limits.soft, hard = ?limits.hard, "new time limits");
    Ok(ok("time limits set successfully"))
}

/// `add_consumer` (`queue`; `exchange`, `exchange_type`, `routing_key`): start consuming a queue.
pub(super) async fn add_consumer(w: &Shared, args: Args<'_>) -> Result<Value, PyError> {
    let queue = args.required_text("queue")?;
    let exchange = args.text("exchange")?.unwrap_or_else(|| queue.clone());
    let exchange_type = args.text("exchange_type")?.unwrap_or_else(|| "direct".into());
    let routing_key = args.text("routing_key")?.unwrap_or_else(|| queue.clone());
    let spec = QueueSpec { name: queue.clone(), exchange, exchange_type, routing_key };
    match w.intake.add_queue(spec).await {
        Ok(true) => {
            tracing::info!(%queue, "started consuming");
            Ok(ok(format!("add consumer {queue}")))
        }
        Ok(false) => Ok(ok(format!("already consuming from {queue}"))),
        Err(e) => {
            tracing::warn!(%queue, error = %e, "add_consumer refused");
            Ok(nok(format!("cannot consume from {queue}: {e}")))
        }
    }
}

/// `cancel_consumer` (`queue`): stop consuming it (its unstarted deliveries go back to it).
pub(super) async fn cancel_consumer(w: &Shared, args: Args<'_>) -> Result<Value, PyError> {
    let queue = args.required_text("queue")?;
    match w.intake.cancel_queue(&queue).await {
        Ok(_) => {
            tracing::info!(%queue, "cancelled consuming");
            Ok(ok(format!("no longer consuming from {queue}")))
        }
        Err(e) => Ok(nok(format!("cannot stop consuming from {queue}: {e}"))),
    }
}

/// Consumes with the prefetch a pool of `slots` needs (Celery's `_update_prefetch_count`).
async fn follow_pool(w: &Shared, slots: usize) {
    if let Err(e) = w.intake.set_prefetch(prefetch_for(slots, w.config.prefetch_multiplier)).await {
        tracing::warn!(error = %e, "could not change the prefetch; the old one stays");
    }
}

/// `pool_grow` (`n`, default 1).
pub(super) async fn pool_grow(w: &Shared, args: Args<'_>) -> Result<Value, PyError> {
    if w.autoscaler.is_some() {
        return Ok(nok("pool_grow is not supported with autoscale. Adjust autoscale range instead."));
    }
    let n = args.count("n", 1, MAX_POOL)?;
    let size = w.pool.grow(n);
    follow_pool(w, size).await;
    Ok(ok("pool will grow"))
}

/// `pool_shrink` (`n`, default 1): running tasks are never stopped; fewer start until the pool
/// is down to its new size (at least 1).
pub(super) async fn pool_shrink(w: &Shared, args: Args<'_>) -> Result<Value, PyError> {
    if w.autoscaler.is_some() {
        return Ok(nok("pool_shrink is not supported with autoscale. Adjust autoscale range instead."));
    }
    let n = args.count("n", 1, MAX_POOL)?;
    let size = w.pool.shrink(n, w.pool_floor());
    follow_pool(w, size).await;
    Ok(ok("pool will shrink"))
}

/// `autoscale` (`max`, `min`).
pub(super) async fn autoscale(w: &Shared, args: Args<'_>) -> Result<Value, PyError> {
    let Some(scaler) = &w.autoscaler else {
        return Err(PyError::value("Autoscale not enabled"));
    };
    let max = args.int("max")?.map(|n| usize::try_from(n.max(0)).unwrap_or(0).min(MAX_POOL));
    let min = args.int("min")?.map(|n| usize::try_from(n.max(0)).unwrap_or(0).min(MAX_POOL));
    let (max, min) = scaler.update(&w.pool, max, min);
    follow_pool(w, max).await;
    Ok(ok(format!("autoscale now max={max} min={min}")))
}

/// `enable_events`.
pub(super) fn enable_events(w: &Shared) -> Value {
    if w.task_events.swap(true, Ordering::Relaxed) {
        ok("task events already enabled")
    } else {
        tracing::info!("events of group {{task}} enabled by remote");
        ok("task events enabled")
    }
}

/// `disable_events`.
pub(super) fn disable_events(w: &Shared) -> Value {
    if w.task_events.swap(false, Ordering::Relaxed) {
        tracing::info!("events of group {{task}} disabled by remote");
        ok("task events disabled")
    } else {
        ok("task events already disabled")
    }
}

/// `heartbeat`: a `worker-heartbeat` now; replies null, as Celery.
pub(super) fn heartbeat(w: &Shared) -> Value {
    tracing::debug!("heartbeat requested by remote");
    w.worker_event("worker-heartbeat");
    Value::Null
}

/// `election` (`id`, `topic`, `action`): workers here do not gossip, so no election is held;
/// Celery's worker without gossip answers null the same way.
pub(super) fn election(args: Args<'_>) -> Result<Value, PyError> {
    args.required("id")?;
    args.required("topic")?;
    Ok(Value::Null)
}

/// `pool_restart`: module reloading has no meaning for a compiled worker; Celery's reply when
/// pool restarts are not enabled.
pub(super) fn pool_restart() -> Result<Value, PyError> {
    Err(PyError::value("Pool restarts not enabled"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_shapes() {
        assert_eq!(py_set(&["a".into(), "b".into()]), "{'a', 'b'}");
        assert_eq!(py_set(&[]), "set()");
        assert_eq!(signum(None).unwrap(), "SIGTERM");
        assert_eq!(signum(Some(&json!("KILL"))).unwrap(), "SIGKILL");
        assert_eq!(signum(Some(&json!("SIGINT"))).unwrap(), "SIGINT");
        assert_eq!(signum(Some(&json!(9))).unwrap(), "9");
        assert_eq!(
            signum(Some(&json!("kill"))).unwrap_err().repr(),
            "TypeError('signal name must be uppercase string.')"
        );
        assert!(signum(Some(&json!("FOO"))).is_err());
    }
}

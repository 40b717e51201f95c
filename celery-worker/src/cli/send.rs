//! `send` (a task by name, optionally waiting for its result) and `result` (a task's state).
//!
//! With `--json` the last line of stdout is `{"id", "state", "result", "error"}`.

use std::process::ExitCode;

use anyhow::Context;
use celery_core::{App, AsyncResult, Signature, TaskMeta, TaskState};
use clap::Args;
use serde_json::Value;

/// `send` options.
#[derive(Debug, Args)]
pub struct SendArgs {
    /// The task name.
    pub task: String,
    /// Positional arguments as a JSON array.
    #[arg(long, default_value = "[]")]
    pub args: String,
    /// Keyword arguments as a JSON object.
    #[arg(long, default_value = "{}")]
    pub kwargs: String,
    /// Run no earlier than this many seconds from now.
    #[arg(long)]
    pub countdown: Option<f64>,
    /// Run no earlier than this time (RFC 3339).
    #[arg(long)]
    pub eta: Option<String>,
    /// Expire (REVOKED, never run) this many seconds from now.
    #[arg(long)]
    pub expires: Option<f64>,
    /// The queue.
    #[arg(long, short = 'Q')]
    pub queue: Option<String>,
    /// Priority 0-9 (9 runs first).
    #[arg(long)]
    pub priority: Option<u8>,
    /// Send at most once per KEY within the idempotency window (a repeat prints the first task).
    #[arg(long)]
    pub idempotency_key: Option<String>,
    /// At most the task's `key_concurrency` tasks of KEY run at once across every worker.
    #[arg(long, value_name = "KEY")]
    pub concurrency_key: Option<String>,
    /// Queue the task in KEY's line of its queue: the broker serves the keys in turn (fair queues;
    /// the built-in broker, Redis and PostgreSQL).
    #[arg(long, value_name = "KEY")]
    pub fairness_key: Option<String>,
    /// Then run this task with the previous result as its first argument (a chain), given as a
    /// Celery signature document such as '{"task": "add", "args": [10]}' (in `--queue` unless
    /// its options name one); repeatable, at most 64. The id printed and waited for is the last
    /// task's.
    #[arg(long, value_name = "SIGNATURE")]
    pub then: Vec<String>,
    /// Wait for the result, at most SECS (default 30), showing the states the task reports on
    /// stderr (a progress bar on a terminal, plain lines otherwise).
    #[arg(long, num_args = 0..=1, default_missing_value = "30")]
    pub wait: Option<f64>,
    /// Print one JSON object as the last line.
    #[arg(long)]
    pub json: bool,
}

/// `result` options.
#[derive(Debug, Args)]
pub struct ResultArgs {
    /// The task id.
    pub id: String,
    /// Wait for a ready state, at most SECS.
    #[arg(long)]
    pub wait: Option<f64>,
    /// Print one JSON object as the last line.
    #[arg(long)]
    pub json: bool,
}

/// `send`: sends the task and prints its id, or (with `--wait` or `--json`) its state.
pub(super) async fn send(app: &App, a: &SendArgs) -> anyhow::Result<ExitCode> {
    let sig = signature(a)?;
    let res = if a.then.is_empty() {
        app.send(sig).await?
    } else {
        app.send_chain(std::iter::once(sig).chain(then(a)?)).await?
    };
    eprintln!("sent {} as {}", a.task, res.id());
    if a.wait.is_none() && !a.json {
        // Not waiting: the id is the answer, whatever state the task reached meanwhile.
        println!("{}", res.id());
        return Ok(ExitCode::SUCCESS);
    }
    report(&res, a.wait, a.json).await
}

/// `result`: a task's state (after waiting, when asked).
pub(super) async fn result(app: &App, a: &ResultArgs) -> anyhow::Result<ExitCode> {
    report(&app.result(&a.id), a.wait, a.json).await
}

/// The signature `send`'s options describe.
fn signature(a: &SendArgs) -> anyhow::Result<Signature> {
    let args: Value = serde_json::from_str(&a.args).context("--args is not JSON")?;
    let kwargs: Value = serde_json::from_str(&a.kwargs).context("--kwargs is not JSON")?;
    anyhow::ensure!(args.is_array(), "--args must be a JSON array, like '[2, 3]'");
    anyhow::ensure!(kwargs.is_object(), "--kwargs must be a JSON object, like '{{\"x\": 1}}'");
    let mut sig = Signature::by_name(&a.task).args(args).kwargs(kwargs);
    if let Some(c) = a.countdown {
        sig = sig.countdown(celery_core::clock::secs_f64(c));
    }
    if let Some(eta) = &a.eta {
        let t = chrono::DateTime::parse_from_rfc3339(eta).with_context(|| format!("--eta `{eta}` is not RFC 3339"))?;
        sig = sig.eta(t.with_timezone(&chrono::Utc));
    }
    if let Some(e) = a.expires {
        sig = sig.expires_in(celery_core::clock::secs_f64(e));
    }
    if let Some(q) = &a.queue {
        sig = sig.queue(q.clone());
    }
    if let Some(p) = a.priority {
        sig = sig.priority(p);
    }
    if let Some(k) = &a.idempotency_key {
        sig = sig.idempotency_key(k.clone());
    }
    if let Some(k) = &a.concurrency_key {
        celery_core::flow::validate_key(k).context("--concurrency-key")?;
        sig = sig.concurrency_key(k.clone());
    }
    if let Some(k) = &a.fairness_key {
        celery_core::flow::validate_key(k).context("--fairness-key")?;
        sig = sig.fairness_key(k.clone());
    }
    Ok(sig)
}

/// The most `--then` steps.
const MAX_THEN: usize = 64;

/// The chain steps after the first (`--then`).
fn then(a: &SendArgs) -> anyhow::Result<Vec<Signature>> {
    anyhow::ensure!(a.then.len() <= MAX_THEN, "at most {MAX_THEN} --then steps");
    a.then
        .iter()
        .map(|doc| {
            let v: Value = serde_json::from_str(doc).with_context(|| format!("--then `{doc}` is not JSON"))?;
            let mut sig = Signature::from_json(&v).with_context(|| format!("--then `{doc}`"))?;
            if sig.options.queue.is_none() {
                sig.options.queue = a.queue.clone();
            }
            Ok(sig)
        })
        .collect()
}

/// The `--json` line, keys in this order.
#[derive(serde::Serialize)]
struct Report<'a> {
    id: &'a str,
    state: TaskState,
    result: &'a Value,
    error: &'a Value,
}

/// Prints a task's state (after waiting, when asked) and picks the exit code.
async fn report(res: &AsyncResult, wait: Option<f64>, as_json: bool) -> anyhow::Result<ExitCode> {
    let meta: Option<TaskMeta> = match wait {
        // Not ready in time (or the backend failed while following): what is stored now.
        Some(secs) => match super::follow::follow(res, celery_core::clock::secs_f64(secs)).await {
            Ok(Some(ready)) => Some(ready),
            _ => res.info().await?,
        },
        None => res.info().await?,
    };
    let state = meta.as_ref().map(|m| m.status).unwrap_or(TaskState::Pending);
    let (result, error) = match &meta {
        Some(m) if m.status == TaskState::Success => (m.result.clone(), Value::Null),
        Some(m)
            if matches!(m.status, TaskState::Failure | TaskState::Revoked | TaskState::Retry | TaskState::Rejected) =>
        {
            let (t, msg) = m.exception().unwrap_or_else(|| ("Unknown".into(), m.result.to_string()));
            (Value::Null, Value::String(format!("{t}: {msg}")))
        }
        _ => (Value::Null, Value::Null),
    };
    if as_json {
        let report = Report { id: res.id(), state, result: &result, error: &error };
        println!("{}", serde_json::to_string(&report)?);
    } else if wait.is_some() || meta.is_some() {
        match state {
            TaskState::Success => println!("{result}"),
            _ if !error.is_null() => println!("{state} {}", error.as_str().unwrap_or_default()),
            _ => println!("{state}"),
        }
    } else {
        println!("{}", res.id());
    }
    let ok = match wait {
        Some(_) => state == TaskState::Success,
        None => !matches!(state, TaskState::Failure | TaskState::Revoked),
    };
    Ok(if ok { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

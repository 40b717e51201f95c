//! The demo application: a binary with a few tasks whose `main` is the embedded CLI.
//!
//! ```text
//! cargo run --example demo -- worker -c 16              # run a worker
//! cargo run --example demo -- send add --args '[2, 3]' --wait
//! cargo run --example demo -- send progress --args '[10, 300]' --wait   # a progress bar
//! cargo run --example demo -- beat                      # send `heartbeat` every minute
//! cargo run --release --example demo -- bench -n 100000
//! ```

use std::io::Write;
use std::time::{Duration, Instant};

use celery_worker::prelude::*;
use serde_json::Value;

// glibc's malloc serializes frees of memory allocated on another thread (every task crosses
// threads); mimalloc does not (measured: a third more drain on the built-in broker here).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Adds two numbers.
#[task]
async fn add(x: i64, y: i64) -> i64 {
    x + y
}

/// Returns its argument.
#[task]
async fn echo(value: Value) -> Value {
    value
}

/// Sleeps `ms` milliseconds without blocking a thread; returns `ms`.
#[task]
async fn sleep(ms: u64) -> u64 {
    tokio::time::sleep(Duration::from_millis(ms)).await;
    ms
}

/// Busy-loops `ms` milliseconds on the blocking pool; returns `ms`.
#[task]
fn spin(ms: u64) -> u64 {
    let end = Instant::now() + Duration::from_millis(ms);
    while Instant::now() < end {
        std::hint::spin_loop();
    }
    ms
}

/// Ends the worker's process at once, as a crash does (exit code 70, nothing settled or flushed):
/// what a poison message does to its worker, for crash tests.
#[task]
fn crash() {
    std::process::exit(70);
}

/// Sums a list of numbers (a chord body: `app.send_chord(header, tsum::new(vec![]))`).
#[task]
async fn tsum(values: Vec<i64>) -> i64 {
    values.iter().sum()
}

/// Always fails with `message`.
#[task]
async fn fail(message: String) -> Result<(), TaskError> {
    Err(TaskError::new("DemoError", message))
}

/// Fails while its retries are fewer than `failures`, retrying after 100 ms; returns its retries.
#[task]
async fn flaky(ctx: TaskContext, failures: u32) -> Result<u32, TaskError> {
    if ctx.retries() < failures {
        return Err(ctx.retry(Some(Duration::from_millis(100))));
    }
    Ok(ctx.retries())
}

/// Works `steps` steps of `ms` milliseconds each, reporting `PROGRESS` with
/// `{"done": i, "total": steps}` after each (`send progress --args '[10, 300]' --wait` shows a
/// bar; the monitor too); returns `steps`.
#[task]
async fn progress(ctx: TaskContext, steps: u64, ms: u64) -> Result<u64, TaskError> {
    for i in 1..=steps {
        tokio::time::sleep(Duration::from_millis(ms)).await;
        ctx.update_state("PROGRESS", serde_json::json!({"done": i, "total": steps})).await?;
    }
    Ok(steps)
}

/// Appends `token` and a newline to the file at `path`; returns `token`. The line is one buffer
/// written with one `write_all` to a file opened with `O_APPEND`, so lines of concurrent tasks never
/// interleave (`writeln!` would write the token and the newline separately).
#[task]
fn record(path: String, token: String) -> Result<String, TaskError> {
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(&path)?;
    let mut line = String::with_capacity(token.len() + 1);
    line.push_str(&token);
    line.push('\n');
    f.write_all(line.as_bytes())?;
    Ok(token)
}

/// Appends `<token> start <unix_ms>` to the file at `path`, sleeps `ms`, then appends `<token>
/// end <unix_ms>`, each line one write (as [`record`]), so a test measures from outside how many
/// ran at once. At most 2 tasks of one concurrency key run at once across every worker
/// (`send span --args '["/tmp/spans", "t1", 500]' --concurrency-key tenant-42`); sent without a
/// key, no key limit applies.
#[task(key_concurrency = 2)]
async fn span(path: String, token: String, ms: u64) -> Result<String, TaskError> {
    let line = |what: &str| format!("{token} {what} {}\n", chrono::Utc::now().timestamp_millis());
    append_line(&path, &line("start")).await?;
    tokio::time::sleep(Duration::from_millis(ms)).await;
    append_line(&path, &line("end")).await?;
    Ok(token)
}

async fn append_line(path: &str, line: &str) -> std::io::Result<()> {
    use tokio::io::AsyncWriteExt;
    let mut f = tokio::fs::OpenOptions::new().create(true).append(true).open(path).await?;
    f.write_all(line.as_bytes()).await?;
    // tokio writes in the background: flushed, the line is in the file when the task goes on.
    f.flush().await
}

/// Logs that the system is alive; beat sends it every minute (`demo beat` or `demo worker --beat`).
#[task(schedule = Schedule::every(Duration::from_secs(60)), ignore_result)]
async fn heartbeat() -> String {
    let now = chrono::Utc::now().to_rfc3339();
    tracing::info!(%now, "heartbeat");
    now
}

fn main() -> std::process::ExitCode {
    celery_worker::cli::run()
}

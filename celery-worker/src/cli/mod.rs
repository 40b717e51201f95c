//! The command line a user's binary embeds with one call: [`run`].
//!
//! ```text
//! mybin worker -Q celery,emails -c 16 --metrics 9808
//! mybin send add --args '[2, 3]' --wait --json
//! mybin result 4f6a... --wait 10
//! mybin purge -Q celery
//! mybin tasks
//! mybin report                              # software, broker and results, what they offer and lack
//! mybin bench -n 100000
//! mybin beat --schedule beat.toml            # or: mybin worker --beat
//! mybin beat add nightly --task reports.nightly --crontab '0 3 * * *' --timezone Europe/Berlin
//! mybin beat list
//! mybin outbox-relay --db postgres://app@db/app   # or: mybin worker --outbox URL
//! ```
//! `--broker` and `--backend` are accepted by every subcommand and default to the environment's
//! `CELERY_BROKER_URL` and `CELERY_RESULT_BACKEND`. Logs go to stderr; results to stdout, and with
//! `--json` the last line of stdout is `{"id", "state", "result", "error"}`.
//!
//! This file holds the [`Cli`] tree and the dispatch; each family of subcommands has its file:
//! `worker` (and `tasks`), `beat`, `send` (and `result`), `control` (`inspect` and `control`),
//! `queues` (`purge`), `report`, `monitor` (and `events`), `outbox` (`outbox-relay`), `broker`
//! (`broker serve|bench`); `bench` is [`crate::bench`].

mod beat;
mod broker;
mod control;
mod follow;
mod monitor;
mod outbox;
pub(crate) mod queues;
mod report;
mod send;
mod worker;

use std::process::ExitCode;

use celery_core::backoff::Reconnect;
use celery_core::url::redacted;
use celery_core::{App, AppError};
use clap::{Parser, Subcommand};

pub use beat::{BeatAction, BeatAddArgs, BeatArgs, BeatRunArgs};
pub use broker::{BrokerCommand, ServeArgs};
pub use control::{ControlCommand, InspectArgs, Reach};
pub use monitor::{EventsArgs, MonitorArgs};
pub use outbox::RelayArgs;
pub use queues::{DeadAction, DeadArgs, PurgeArgs};
pub use send::{ResultArgs, SendArgs};
pub use worker::WorkerArgs;

/// The default broker URL when neither `--broker` nor `CELERY_BROKER_URL` is given.
pub const DEFAULT_BROKER: &str = "log://./celery-data";
/// The default result backend URL when neither `--backend` nor `CELERY_RESULT_BACKEND` is given.
pub const DEFAULT_BACKEND: &str = "log://./celery-data";

/// The command line.
#[derive(Debug, Parser)]
#[command(version, about = "Run workers, send tasks and read results", propagate_version = true)]
pub struct Cli {
    /// Broker URL (printed only redacted).
    #[arg(long, global = true, env = "CELERY_BROKER_URL", hide_env_values = true, default_value = DEFAULT_BROKER)]
    pub broker: String,
    /// Result backend URL (printed only redacted).
    #[arg(long, global = true, env = "CELERY_RESULT_BACKEND", hide_env_values = true, default_value = DEFAULT_BACKEND)]
    pub backend: String,
    /// Log level (error, warn, info, debug, trace) or a tracing filter; RUST_LOG wins when set.
    #[arg(long, short = 'l', global = true, default_value = "info")]
    pub loglevel: String,
    /// Export spans (send, queue wait, run, retry, result store) over OTLP/HTTP to this collector,
    /// e.g. http://127.0.0.1:4318 (`/v1/traces` is appended unless a path is given). Needs the
    /// `otel` feature.
    #[arg(long, global = true, value_name = "URL")]
    pub otlp_endpoint: Option<String>,
    /// Threads of the async runtime: a worker's `async` tasks run on these, plain (blocking) task
    /// functions on tokio's blocking pool whatever this is. Default: `TOKIO_WORKER_THREADS` when
    /// set, else one a CPU but one (at least one): the CPU left serves the blocking pool, the
    /// kernel and a broker on the same machine (on 2 cores beside a local Redis, one thread
    /// drained 24% more than two: see the README's issue-21 section). More pay for `async` tasks
    /// that compute.
    #[arg(long, global = true, env = "CELERY_RUNTIME_THREADS", value_name = "N",
          value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub runtime_threads: Option<u16>,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Consume queues and run tasks.
    Worker(WorkerArgs),
    /// Send a task by name with JSON arguments.
    Send(SendArgs),
    /// Show (or wait for) a task's state and result.
    Result(ResultArgs),
    /// Delete every message waiting for some queues, delayed (eta) ones included; print how many.
    Purge(PurgeArgs),
    /// List, retry or discard a queue's dead letters (`list|retry|discard -Q QUEUE [--id ID | --match TEXT | --all]`).
    Dead(DeadArgs),
    /// List the tasks registered in this binary.
    Tasks,
    /// Print the software, the broker and result backend (redacted), what each offers and lacks.
    Report,
    /// Measure enqueue and drain throughput and round-trip latency.
    Bench(crate::bench::BenchArgs),
    /// The built-in broker.
    #[command(subcommand)]
    Broker(BrokerCommand),
    /// Send periodic tasks (`beat`), or change and list the entries (`beat add|remove|list`).
    Beat(BeatArgs),
    /// Print the events of every worker started with `-E`, live.
    Events(EventsArgs),
    /// Ask the workers: ping, stats, active, reserved, scheduled, query_task, registered, revoked,
    /// active_queues, conf, clock, report, memsample, memdump.
    Inspect(InspectArgs),
    /// Steer the workers: revoke, terminate, rate_limit, time_limit, add_consumer,
    /// cancel_consumer, pause -Q, resume -Q, pool_grow, pool_shrink, autoscale, enable_events, disable_events,
    /// heartbeat, shutdown.
    #[command(subcommand)]
    Control(ControlCommand),
    /// Serve a live dashboard of workers, queues, tasks and dead letters (workers need `-E`).
    Monitor(MonitorArgs),
    /// Forward the committed rows of a PostgreSQL outbox (`celery_rs_outbox`) to the broker.
    OutboxRelay(RelayArgs),
}

impl Command {
    /// A worker, beat or outbox relay started while its broker is down waits for it, as Celery's
    /// do (`broker_connection_retry_on_startup`); other commands fail at once.
    fn waits_for_broker(&self) -> bool {
        matches!(self, Command::Worker(_) | Command::Beat(BeatArgs { action: None, .. }) | Command::OutboxRelay(_))
    }
}

/// Parses the process arguments and runs the command; for a binary's `main`.
pub fn run() -> ExitCode {
    run_from(std::env::args_os())
}

/// Parses `args` (the first is the program name) and runs the command.
pub fn run_from<I, T>(args: I) -> ExitCode
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let cli = match Cli::try_parse_from(args) {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { ExitCode::from(2) } else { ExitCode::SUCCESS };
        }
    };
    let exporter = match init_logging(&cli.loglevel, cli.otlp_endpoint.as_deref()) {
        Ok(exporter) => exporter,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let rt = match runtime(cli.runtime_threads) {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = match rt.block_on(execute(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    };
    drop(rt);
    // Spans still buffered are exported before the process ends.
    exporter.shutdown();
    code
}

/// The multi-threaded runtime a command runs on, with `threads` worker threads (`None`: tokio's
/// default, `TOKIO_WORKER_THREADS` or one a CPU).
fn runtime(threads: Option<u16>) -> std::io::Result<tokio::runtime::Runtime> {
    let mut b = tokio::runtime::Builder::new_multi_thread();
    match threads {
        Some(n) => {
            b.worker_threads(usize::from(n));
        }
        // Tokio reads it itself.
        None if std::env::var_os("TOKIO_WORKER_THREADS").is_some() => {}
        None => {
            b.worker_threads(default_runtime_threads());
        }
    }
    b.enable_all().build()
}

/// The runtime's threads unless told: one a CPU but one, at least one. The CPU left over serves
/// tokio's blocking pool (plain task functions), the kernel's network work and, on a small
/// machine, a broker beside the worker: on 2 cores beside a local Redis one runtime thread
/// drained 24% more than two at 31% less worker CPU per task, beside RabbitMQ 15% more, and the
/// same on the built-in broker and PostgreSQL (README, issue 21).
fn default_runtime_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get().saturating_sub(1).max(1))
}

fn log_filter(level: &str) -> tracing_subscriber::EnvFilter {
    // lapin logs every channel RabbitMQ closes at error level, and a missing queue closes one (see
    // broker_backends::amqp): our own errors report what matters, with context.
    let spec = if level.contains("lapin") { level.to_owned() } else { format!("{level},lapin::channel=off") };
    tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(&spec))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"))
}

/// Logs to stderr; with `--otlp-endpoint`, also exports spans ([`crate::otlp`]) and turns tracing
/// on ([`celery_core::trace::enable`]).
fn init_logging(level: &str, otlp_endpoint: Option<&str>) -> anyhow::Result<SpanExport> {
    // Colours only on a terminal: log files and pipes get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let Some(endpoint) = otlp_endpoint else {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(log_filter(level))
            .with_ansi(ansi)
            .with_writer(std::io::stderr)
            .try_init();
        return Ok(SpanExport::default());
    };
    otlp_logging(level, ansi, endpoint)
}

#[cfg(feature = "otel")]
fn otlp_logging(level: &str, ansi: bool, endpoint: &str) -> anyhow::Result<SpanExport> {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::Layer;
    let exporter = crate::otlp::Exporter::start(endpoint)?;
    // The trace spans go to the exporter only, not into the log lines.
    let quiet = format!("{}=off", celery_core::trace::TARGET);
    let filter = log_filter(level).add_directive(quiet.parse()?);
    let logs = tracing_subscriber::fmt::layer().with_ansi(ansi).with_writer(std::io::stderr).with_filter(filter);
    let _ = tracing_subscriber::registry().with(logs).with(exporter.layer()).try_init();
    celery_core::trace::enable();
    tracing::info!(endpoint = %crate::otlp::traces_url(endpoint)?, "exporting spans over OTLP/HTTP");
    Ok(SpanExport(Some(exporter)))
}

#[cfg(not(feature = "otel"))]
fn otlp_logging(_: &str, _: bool, _: &str) -> anyhow::Result<SpanExport> {
    anyhow::bail!("--otlp-endpoint: this binary was built without the `otel` feature of celery-worker")
}

/// The span exporter the CLI started, if any.
#[derive(Default)]
struct SpanExport(#[cfg(feature = "otel")] Option<crate::otlp::Exporter>);

impl SpanExport {
    /// Exports what is buffered (blocking).
    fn shutdown(self) {
        #[cfg(feature = "otel")]
        if let Some(e) = self.0 {
            e.shutdown();
        }
    }
}

/// Runs one subcommand; every one but `broker` connects to the broker and backend first.
async fn execute(cli: Cli) -> anyhow::Result<ExitCode> {
    let patient = cli.command.waits_for_broker();
    let (broker_url, backend_url) = (&cli.broker, &cli.backend);
    let app = || connect(broker_url, backend_url, patient);
    match cli.command {
        Command::Broker(c) => broker::run(c).await,
        Command::Worker(a) => worker::run(app().await?, a).await,
        Command::Beat(a) => beat::run(app().await?, a).await,
        Command::Send(a) => send::send(&app().await?, &a).await,
        Command::Result(a) => send::result(&app().await?, &a).await,
        Command::Purge(a) => queues::purge(&app().await?, &a).await,
        Command::Dead(a) => queues::dead(&app().await?, &a).await,
        Command::Report => Ok(report::report(&app().await?, broker_url, backend_url)),
        Command::Tasks => {
            app().await?;
            Ok(worker::tasks())
        }
        Command::Bench(a) => {
            crate::bench::run(app().await?, a).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Events(a) => monitor::events(&app().await?, &a).await,
        Command::Monitor(a) => monitor::monitor(app().await?, a).await,
        Command::Inspect(a) => control::inspect(&app().await?, &a).await,
        Command::Control(c) => control::control(&app().await?, &c).await,
        Command::OutboxRelay(a) => outbox::run(app().await?, &a).await,
    }
}

/// Connection attempts of a starting worker or beat before it gives up (Celery's
/// `broker_connection_max_retries`).
pub(crate) const STARTUP_ATTEMPTS: u32 = 100;

/// Connects to the broker and backend; `patient` retries while they are unreachable, up to
/// [`STARTUP_ATTEMPTS`] times.
async fn connect(broker: &str, backend: &str, patient: bool) -> anyhow::Result<App> {
    let retries = if patient { STARTUP_ATTEMPTS } else { 0 };
    Reconnect::default()
        .retry(retries, "cannot connect yet", AppError::is_retryable, || crate::connect(broker, backend))
        .await
        .map_err(|e| {
            anyhow::Error::new(e).context(format!(
                "connecting to broker {} and backend {}",
                redacted(broker),
                redacted(backend)
            ))
        })
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
                    _ = int.recv() => tracing::info!("SIGINT: shutting down"),
                }
            }
            _ => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runtime_threads_sets_the_runtime_s_worker_threads() {
        let cli = Cli::try_parse_from(["celery", "--runtime-threads", "1", "tasks"]).expect("parses");
        assert_eq!(cli.runtime_threads, Some(1));
        let rt = runtime(cli.runtime_threads).expect("runtime");
        assert_eq!(rt.metrics().num_workers(), 1);
        let rt = runtime(Some(3)).expect("runtime");
        assert_eq!(rt.metrics().num_workers(), 3);
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        assert_eq!(default_runtime_threads(), (cpus - 1).max(1), "one a CPU but one");
        if std::env::var_os("TOKIO_WORKER_THREADS").is_none() {
            assert_eq!(runtime(None).expect("runtime").metrics().num_workers(), default_runtime_threads());
        }
        assert!(Cli::try_parse_from(["celery", "--runtime-threads", "0", "tasks"]).is_err());
    }
}

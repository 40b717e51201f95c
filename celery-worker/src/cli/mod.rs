//! The command line a user's binary embeds with one call: [`run`].
//!
//! ```text
//! mybin worker -Q celery,emails -c 16 --metrics 9808
//! mybin send add --args '[2, 3]' --wait --json
//! mybin result 4f6a... --wait 10
//! mybin purge -Q celery
//! mybin tasks
//! mybin bench -n 100000
//! mybin beat --schedule beat.toml            # or: mybin worker --beat
//! mybin beat add nightly --task reports.nightly --crontab '0 3 * * *' --timezone Europe/Berlin
//! mybin beat list
//! ```
//! `--broker` and `--backend` are accepted by every subcommand and default to the environment's
//! `CELERY_BROKER_URL` and `CELERY_RESULT_BACKEND`. Logs go to stderr; results to stdout, and with
//! `--json` the last line of stdout is `{"id", "state", "result", "error"}`.

use std::process::ExitCode;

use anyhow::Context;
use celery_core::url::redacted;
use celery_core::{AsyncResult, Signature, TaskMeta, TaskState};
use clap::{Args, Parser, Subcommand};
use serde_json::Value;

use crate::{Worker, WorkerConfig};

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
    /// List the tasks registered in this binary.
    Tasks,
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
    /// cancel_consumer, pool_grow, pool_shrink, autoscale, enable_events, disable_events,
    /// heartbeat, shutdown.
    #[command(subcommand)]
    Control(ControlCommand),
    /// Serve a live dashboard of workers, queues, tasks and dead letters (workers need `-E`).
    Monitor(MonitorArgs),
}

/// `monitor` options.
#[derive(Debug, Args)]
pub struct MonitorArgs {
    /// Address to serve on; anything but loopback requires --token.
    #[arg(long, default_value = "127.0.0.1:5555")]
    pub listen: std::net::SocketAddr,
    /// Queues to show (depth and dead letters), comma-separated.
    #[arg(short = 'Q', long = "queues", value_delimiter = ',', default_value = "celery")]
    pub queues: Vec<String>,
    /// Allow retrying and discarding dead letters and revoking tasks from the page.
    #[arg(long)]
    pub allow_control: bool,
    /// Clients must present this token (`?token=...` or `Authorization: Bearer ...`).
    #[arg(long, env = "CELERY_MONITOR_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Host names the monitor answers to besides its address (`NAME` or `NAME:PORT`; comma-separated),
    /// e.g. behind a reverse proxy. Any other `Host` header is refused (DNS-rebinding defence).
    #[arg(long = "allow-host", value_delimiter = ',')]
    pub allow_host: Vec<String>,
}

/// Which workers answer, and how long to wait for them.
#[derive(Debug, Args, Clone)]
pub struct Reach {
    /// Only these workers (comma-separated hostnames, like `celery@host`).
    #[arg(long, short = 'd', value_delimiter = ',')]
    pub destination: Option<Vec<String>>,
    /// Seconds to wait for replies.
    #[arg(long, short = 't', default_value_t = 1.0)]
    pub timeout: f64,
    /// Print the replies as one JSON object.
    #[arg(long)]
    pub json: bool,
}

/// `inspect` options.
#[derive(Debug, Args)]
pub struct InspectArgs {
    /// ping, stats, active, reserved, scheduled, query_task, registered, revoked, active_queues,
    /// conf, clock, report, memsample or memdump.
    pub method: String,
    /// The method's arguments as a JSON object (`'{"ids": ["..."]}'` for query_task,
    /// `'{"with_defaults": true}'` for conf).
    #[arg(long, default_value = "{}")]
    pub args: String,
    /// Destination and timeout.
    #[command(flatten)]
    pub reach: Reach,
}

/// `control` subcommands.
#[derive(Debug, Subcommand)]
pub enum ControlCommand {
    /// Revoke tasks: never run if not started; with --terminate, stop them if running.
    Revoke {
        /// Task ids.
        #[arg(required = true)]
        ids: Vec<String>,
        /// Also stop the task if it is running.
        #[arg(long)]
        terminate: bool,
        /// Destination and timeout.
        #[command(flatten)]
        reach: Reach,
    },
    /// Set a task's rate limit on the workers (`10/s`, `100/m`; `0` removes it).
    #[command(alias = "rate_limit")]
    RateLimit {
        /// The task name.
        task: String,
        /// The rate.
        rate: String,
        /// Destination and timeout.
        #[command(flatten)]
        reach: Reach,
    },
    /// Shut the workers down gracefully.
    Shutdown {
        /// Destination and timeout.
        #[command(flatten)]
        reach: Reach,
    },
    /// Stop running tasks now (recorded REVOKED).
    Terminate {
        /// Task ids.
        #[arg(required = true)]
        ids: Vec<String>,
        /// Destination and timeout.
        #[command(flatten)]
        reach: Reach,
    },
    /// Set a task's soft and hard time limits in seconds on the workers (omitted: none).
    #[command(alias = "time_limit")]
    TimeLimit {
        /// The task name.
        task: String,
        /// Soft limit, seconds.
        soft: Option<f64>,
        /// Hard limit, seconds.
        hard: Option<f64>,
        /// Destination and timeout.
        #[command(flatten)]
        reach: Reach,
    },
    /// Start consuming a queue.
    #[command(alias = "add_consumer")]
    AddConsumer {
        /// The queue.
        queue: String,
        /// Destination and timeout.
        #[command(flatten)]
        reach: Reach,
    },
    /// Stop consuming a queue.
    #[command(alias = "cancel_consumer")]
    CancelConsumer {
        /// The queue.
        queue: String,
        /// Destination and timeout.
        #[command(flatten)]
        reach: Reach,
    },
    /// Run N more tasks at once.
    #[command(alias = "pool_grow")]
    PoolGrow {
        /// How many more.
        #[arg(default_value_t = 1)]
        n: u32,
        /// Destination and timeout.
        #[command(flatten)]
        reach: Reach,
    },
    /// Run N fewer tasks at once (running ones finish).
    #[command(alias = "pool_shrink")]
    PoolShrink {
        /// How many fewer.
        #[arg(default_value_t = 1)]
        n: u32,
        /// Destination and timeout.
        #[command(flatten)]
        reach: Reach,
    },
    /// Change the autoscaler's bounds (workers started with --autoscale).
    Autoscale {
        /// Most tasks at once.
        max: u32,
        /// Fewest slots kept.
        min: u32,
        /// Destination and timeout.
        #[command(flatten)]
        reach: Reach,
    },
    /// Start sending task events.
    #[command(alias = "enable_events")]
    EnableEvents {
        /// Destination and timeout.
        #[command(flatten)]
        reach: Reach,
    },
    /// Stop sending task events.
    #[command(alias = "disable_events")]
    DisableEvents {
        /// Destination and timeout.
        #[command(flatten)]
        reach: Reach,
    },
    /// Send a worker-heartbeat event now.
    Heartbeat {
        /// Destination and timeout.
        #[command(flatten)]
        reach: Reach,
    },
}

/// `events` options.
#[derive(Debug, Args)]
pub struct EventsArgs {
    /// Print each event as one JSON line.
    #[arg(long)]
    pub json: bool,
    /// Exit after this many events.
    #[arg(long)]
    pub count: Option<u64>,
}

/// `beat` options and subcommands.
#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct BeatArgs {
    /// Change or list entries instead of running beat.
    #[command(subcommand)]
    pub action: Option<BeatAction>,
    /// How to run.
    #[command(flatten)]
    pub run: BeatRunArgs,
}

/// How beat runs (also `worker --beat`).
#[derive(Debug, Args, Clone)]
pub struct BeatRunArgs {
    /// A TOML schedule file of `[[entry]]` tables.
    #[arg(long, short = 's', env = "CELERY_BEAT_SCHEDULE")]
    pub schedule: Option<std::path::PathBuf>,
    /// Beats with the same name share one leader, state and run-time entries.
    #[arg(long, default_value = "beat")]
    pub beat_name: String,
    /// Seconds a dead leader holds the lease before another beat takes over.
    #[arg(long, default_value_t = 10.0)]
    pub lease: f64,
    /// Seconds after which a due time counts as missed.
    #[arg(long, default_value_t = 5.0)]
    pub late_after: f64,
}

/// `beat` subcommands.
#[derive(Debug, Subcommand)]
pub enum BeatAction {
    /// Add (or replace) a run-time entry; the leading beat applies it.
    Add(Box<BeatAddArgs>),
    /// Remove a run-time entry.
    Remove {
        /// The entry's name.
        name: String,
        /// The beat.
        #[arg(long, default_value = "beat")]
        beat_name: String,
    },
    /// List the entries with their next and last runs.
    List {
        /// The beat.
        #[arg(long, default_value = "beat")]
        beat_name: String,
        /// Print the stored state as JSON.
        #[arg(long)]
        json: bool,
    },
}

/// `beat add` options.
#[derive(Debug, Args)]
pub struct BeatAddArgs {
    /// The entry's name.
    pub name: String,
    /// The task's registered name.
    #[arg(long)]
    pub task: String,
    /// Every SECS or DURATION (`30`, `90s`, `1h`).
    #[arg(long, group = "when")]
    pub every: Option<String>,
    /// A crontab (five fields, or six with seconds).
    #[arg(long, group = "when")]
    pub crontab: Option<String>,
    /// Once, at this time (RFC 3339).
    #[arg(long, group = "when")]
    pub at: Option<String>,
    /// The crontab's IANA time zone.
    #[arg(long)]
    pub timezone: Option<String>,
    /// Positional arguments as a JSON array.
    #[arg(long, default_value = "[]")]
    pub args: String,
    /// Keyword arguments as a JSON object.
    #[arg(long, default_value = "{}")]
    pub kwargs: String,
    /// The queue.
    #[arg(long, short = 'Q')]
    pub queue: Option<String>,
    /// Priority 0-9.
    #[arg(long)]
    pub priority: Option<u8>,
    /// Seconds after sending at which each task expires.
    #[arg(long)]
    pub expires: Option<f64>,
    /// Skip runs missed while no beat ran (default: run once for them).
    #[arg(long)]
    pub skip_missed: bool,
    /// The beat.
    #[arg(long, default_value = "beat")]
    pub beat_name: String,
}

/// `broker` subcommands.
#[derive(Debug, Subcommand)]
pub enum BrokerCommand {
    /// Serve a data directory over TCP as `log+tcp://HOST:PORT` (and over its unix socket).
    Serve(ServeArgs),
    /// Measure raw append throughput of the log (100-byte records) for each fsync policy.
    Bench(crate::bench::AppendArgs),
}

/// `broker serve` options.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// The data directory.
    #[arg(long, default_value = "./celery-data")]
    pub data: String,
    /// Address to listen on; anything but loopback requires --token.
    #[arg(long, default_value = "127.0.0.1:7575")]
    pub listen: String,
    /// Clients must present this token (`log+tcp://HOST:PORT?token=...`).
    #[arg(long, env = "CELERY_BROKER_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Serve TLS (`log+tls://`) with this PEM certificate chain (needs --tls-key).
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<std::path::PathBuf>,
    /// The PEM private key of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<std::path::PathBuf>,
    /// Ask every client for a certificate signed by this PEM authority (mutual TLS).
    #[arg(long, requires = "tls_cert")]
    pub tls_client_ca: Option<std::path::PathBuf>,
    /// Connections served at once (counted from their HELLO); one more is refused with "too many
    /// connections (limit N)".
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,
    /// Connections that have not sent their HELLO yet, at most; one more closes the oldest of
    /// them, so silent connections cannot lock clients out.
    #[arg(long, default_value_t = 128, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_pending: u32,
    /// Seconds a new connection has to present its HELLO (token).
    #[arg(long, default_value_t = 10.0, value_parser = positive_seconds)]
    pub hello_timeout: f64,
    /// Seconds a connection holding nothing (no consumer, stream member, delivery or pending
    /// request) may stay silent before it is closed; clients reconnect on their next request.
    #[arg(long, default_value_t = 300.0, value_parser = positive_seconds)]
    pub idle_timeout: f64,
    /// Requests of one connection handled at once (result waits and stream polls aside); at the
    /// limit the server stops reading that connection until one is answered.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_in_flight: u32,
    /// Result waits and stream polls of one connection waiting at once.
    #[arg(long, default_value_t = 4096, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_waits: u32,
    /// MiB of requests of one connection being handled at once.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub request_buffer_mib: u32,
    /// MiB of answers and deliveries queued for one connection; a client that does not read them
    /// stops being read from.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub reply_buffer_mib: u32,
}

/// A number of seconds above zero (at most a day).
fn positive_seconds(s: &str) -> Result<f64, String> {
    let secs: f64 = s.parse().map_err(|_| format!("`{s}` is not a number of seconds"))?;
    if secs > 0.0 && secs <= 86_400.0 {
        Ok(secs)
    } else {
        Err(format!("{s} is not between 0 (excluded) and 86400 seconds"))
    }
}

impl ServeArgs {
    /// The per-connection limits these options set.
    pub fn limits(&self) -> broker_backends::log::ServerLimits {
        broker_backends::log::ServerLimits {
            max_connections: self.max_connections as usize,
            hello_timeout: std::time::Duration::from_secs_f64(self.hello_timeout),
            idle_timeout: std::time::Duration::from_secs_f64(self.idle_timeout),
            max_in_flight: self.max_in_flight as usize,
            max_waits: self.max_waits as usize,
            request_bytes: (self.request_buffer_mib as usize) << 20,
            reply_bytes: (self.reply_buffer_mib as usize) << 20,
            max_pending: self.max_pending as usize,
        }
    }
}

/// `worker` options.
#[derive(Debug, Args)]
pub struct WorkerArgs {
    /// Queues to consume, comma-separated or repeated, in priority order.
    #[arg(short = 'Q', long = "queues", value_delimiter = ',', default_value = "celery")]
    pub queues: Vec<String>,
    /// Tasks run at once (default: the number of CPUs).
    #[arg(short = 'c', long)]
    pub concurrency: Option<usize>,
    /// Deliveries held per slot; 1 fetches only when a slot is free.
    #[arg(long, default_value_t = 4)]
    pub prefetch_multiplier: usize,
    /// This worker's name.
    #[arg(short = 'n', long)]
    pub hostname: Option<String>,
    /// Seconds running tasks get to finish after SIGTERM/SIGINT.
    #[arg(long, default_value_t = 30.0)]
    pub grace: f64,
    /// Messages larger than this many bytes are dead-lettered unread (default: the app's
    /// `max_message_size`, 16 MiB).
    #[arg(long, value_name = "BYTES")]
    pub max_message_size: Option<usize>,
    /// Do not store STARTED/RECEIVED states.
    #[arg(long)]
    pub without_track_started: bool,
    /// Serve Prometheus metrics (`GET /metrics`) on PORT (loopback) or IP:PORT.
    #[arg(long, value_name = "[IP:]PORT", value_parser = crate::metrics::listen_addr)]
    pub metrics: Option<std::net::SocketAddr>,
    /// Allow --metrics on an address beyond loopback.
    #[arg(long)]
    pub metrics_public: bool,
    /// Host names the metrics server answers to besides its address (`NAME` or `NAME:PORT`;
    /// comma-separated), e.g. the name Prometheus scrapes it by.
    #[arg(long, value_delimiter = ',')]
    pub metrics_allow_host: Vec<String>,
    /// Send Celery's task events (`mybin events` shows them; so does Celery's tooling). Worker
    /// events (online, heartbeat, offline) are always sent.
    #[arg(short = 'E', long = "events")]
    pub events: bool,
    /// Grow the pool up to MAX tasks at once while tasks wait, and shrink it back toward MIN after
    /// 30 s (instead of a fixed --concurrency).
    #[arg(long, value_name = "MAX,MIN", value_parser = parse_autoscale)]
    pub autoscale: Option<(usize, usize)>,
    /// Also run beat in this process (one leader among all beats, so every worker may pass it).
    #[arg(long, short = 'B')]
    pub beat: bool,
    /// Beat's settings.
    #[command(flatten)]
    pub beat_run: BeatRunArgs,
}

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
    /// Wait for the result, at most SECS (default 30).
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

/// `purge` options.
#[derive(Debug, Args)]
pub struct PurgeArgs {
    /// Queues to purge, comma-separated or repeated.
    #[arg(short = 'Q', long = "queues", value_delimiter = ',', default_value = "celery")]
    pub queues: Vec<String>,
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
    init_logging(&cli.loglevel);
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(execute(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only on a terminal: log files and pipes get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_ansi(ansi).with_writer(std::io::stderr).try_init();
}

/// Connection attempts of a starting worker or beat before it gives up (Celery's
/// `broker_connection_max_retries`).
const STARTUP_ATTEMPTS: u32 = 100;

async fn execute(cli: Cli) -> anyhow::Result<ExitCode> {
    match &cli.command {
        Command::Broker(BrokerCommand::Serve(a)) => {
            serve(a).await?;
            return Ok(ExitCode::SUCCESS);
        }
        Command::Broker(BrokerCommand::Bench(a)) => {
            crate::bench::append(a).await?;
            return Ok(ExitCode::SUCCESS);
        }
        _ => {}
    }
    // A worker or beat started while its broker is down waits for it, as Celery's do
    // (`broker_connection_retry_on_startup`, up to 100 attempts); other commands fail at once.
    let patient = matches!(cli.command, Command::Worker(_) | Command::Beat(BeatArgs { action: None, .. }));
    let mut backoff = celery_core::backoff::Reconnect::default();
    let app = loop {
        match crate::connect(&cli.broker, &cli.backend).await {
            Ok(app) => break app,
            Err(e) if patient && e.is_retryable() && backoff.attempts() < STARTUP_ATTEMPTS => {
                let retry_in = backoff.next_delay();
                tracing::warn!(error = %e, ?retry_in, attempt = backoff.attempts(), "cannot connect yet; retrying");
                tokio::time::sleep(retry_in).await;
            }
            Err(e) => {
                return Err(anyhow::Error::new(e).context(format!(
                    "connecting to broker {} and backend {}",
                    redacted(&cli.broker),
                    redacted(&cli.backend)
                )))
            }
        }
    };
    match cli.command {
        Command::Worker(a) => {
            let defaults = WorkerConfig::default();
            let cfg = WorkerConfig {
                queues: a.queues,
                concurrency: a.concurrency.unwrap_or(defaults.concurrency),
                prefetch_multiplier: a.prefetch_multiplier,
                hostname: a.hostname.unwrap_or(defaults.hostname),
                shutdown_grace: celery_core::clock::secs_f64(a.grace),
                track_started: !a.without_track_started,
                events: a.events,
                autoscale: a.autoscale,
                ..defaults
            };
            let app = match a.max_message_size {
                Some(max_message_size) => {
                    let config = celery_core::AppConfig { max_message_size, ..app.config().clone() };
                    app.with_config(config)
                }
                None => app,
            };
            if let Some(addr) = a.metrics {
                crate::metrics::serve(addr, a.metrics_public, a.metrics_allow_host.clone())
                    .await
                    .with_context(|| format!("serving metrics on {addr}"))?;
                crate::metrics::poll_queue_depth(app.clone(), cfg.queues.clone());
            }
            if celery_core::registry::tasks().iter().all(|e| e.name.starts_with("celery.")) {
                tracing::warn!("this binary has no tasks of its own (only Celery's built-ins): build your application's binary to run its tasks");
            }
            if !a.beat {
                Worker::new(app, cfg).run_until(shutdown_signal()).await?;
                return Ok(ExitCode::SUCCESS);
            }
            let beat = beat(app.clone(), &a.beat_run)?;
            let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
            let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
                let _ = rx.wait_for(|s| *s).await;
            };
            let beat = tokio::spawn(beat.run_until(stopped(stop_rx.clone())));
            let worker = tokio::spawn(Worker::new(app, cfg).run_until(stopped(stop_rx)));
            shutdown_signal().await;
            let _ = stop_tx.send(true);
            let (w, b) = tokio::join!(worker, beat);
            w??;
            b??;
            Ok(ExitCode::SUCCESS)
        }
        Command::Beat(BeatArgs { action: None, run }) => {
            beat(app, &run)?.run_until(shutdown_signal()).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Beat(BeatArgs { action: Some(action), .. }) => beat_action(&app, action).await,
        Command::Inspect(a) => {
            let known = [
                "ping",
                "stats",
                "active",
                "reserved",
                "scheduled",
                "query_task",
                "registered",
                "revoked",
                "active_queues",
                "conf",
                "clock",
                "report",
                "memsample",
                "memdump",
            ];
            anyhow::ensure!(
                known.contains(&a.method.as_str()),
                "unknown inspect method `{}`; one of {known:?}",
                a.method
            );
            let args: Value = serde_json::from_str(&a.args).context("--args must be a JSON object")?;
            anyhow::ensure!(args.is_object(), "--args must be a JSON object");
            let replies = remote(&app, &a.method, args, &a.reach).await?;
            Ok(print_replies(&replies, &a.reach))
        }
        Command::Control(c) => {
            use serde_json::json;
            let (method, args, reach) = match &c {
                ControlCommand::Revoke { ids, terminate, reach } => {
                    let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
                    let timeout = celery_core::clock::secs_f64(reach.timeout);
                    let replies =
                        crate::control::revoke(&app, &ids, *terminate, reach.destination.clone(), timeout).await?;
                    return Ok(print_replies(&replies, reach));
                }
                ControlCommand::RateLimit { task, rate, reach } => {
                    ("rate_limit", json!({"task_name": task, "rate_limit": rate}), reach)
                }
                ControlCommand::Shutdown { reach } => ("shutdown", json!({}), reach),
                ControlCommand::Terminate { ids, reach } => {
                    ("terminate", json!({"task_id": ids, "signal": "SIGTERM"}), reach)
                }
                ControlCommand::TimeLimit { task, soft, hard, reach } => {
                    ("time_limit", json!({"task_name": task, "soft": soft, "hard": hard}), reach)
                }
                ControlCommand::AddConsumer { queue, reach } => ("add_consumer", json!({"queue": queue}), reach),
                ControlCommand::CancelConsumer { queue, reach } => ("cancel_consumer", json!({"queue": queue}), reach),
                ControlCommand::PoolGrow { n, reach } => ("pool_grow", json!({"n": n}), reach),
                ControlCommand::PoolShrink { n, reach } => ("pool_shrink", json!({"n": n}), reach),
                ControlCommand::Autoscale { max, min, reach } => ("autoscale", json!({"max": max, "min": min}), reach),
                ControlCommand::EnableEvents { reach } => ("enable_events", json!({}), reach),
                ControlCommand::DisableEvents { reach } => ("disable_events", json!({}), reach),
                ControlCommand::Heartbeat { reach } => ("heartbeat", json!({}), reach),
            };
            let replies = remote(&app, method, args, reach).await?;
            Ok(print_replies(&replies, reach))
        }
        Command::Monitor(a) => {
            let cfg = crate::monitor::MonitorConfig {
                listen: a.listen,
                queues: a.queues,
                allow_control: a.allow_control,
                token: a.token,
                hosts: a.allow_host,
            };
            eprintln!("monitor on http://{}/", cfg.listen);
            crate::monitor::serve(app, cfg, shutdown_signal()).await.map_err(anyhow::Error::msg)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Events(a) => {
            let mut events = crate::events::subscribe(&app).await?;
            eprintln!("listening for events (workers started with -E)");
            let mut seen = 0;
            loop {
                let event = tokio::select! {
                    e = events.next() => match e { Some(e) => e, None => break },
                    _ = shutdown_signal() => break,
                };
                if a.json {
                    println!("{event}");
                } else {
                    println!("{}", describe_event(&event));
                }
                seen += 1;
                if a.count.is_some_and(|n| seen >= n) {
                    break;
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Send(a) => {
            let args: Value = serde_json::from_str(&a.args).context("--args is not JSON")?;
            let kwargs: Value = serde_json::from_str(&a.kwargs).context("--kwargs is not JSON")?;
            anyhow::ensure!(args.is_array(), "--args must be a JSON array, like '[2, 3]'");
            anyhow::ensure!(kwargs.is_object(), "--kwargs must be a JSON object, like '{{\"x\": 1}}'");
            let mut sig = Signature::by_name(&a.task).args(args).kwargs(kwargs);
            if let Some(c) = a.countdown {
                sig = sig.countdown(celery_core::clock::secs_f64(c));
            }
            if let Some(eta) = &a.eta {
                let t = chrono::DateTime::parse_from_rfc3339(eta)
                    .with_context(|| format!("--eta `{eta}` is not RFC 3339"))?;
                sig = sig.eta(t.with_timezone(&chrono::Utc));
            }
            if let Some(e) = a.expires {
                sig = sig.expires_in(celery_core::clock::secs_f64(e));
            }
            if let Some(q) = a.queue {
                sig = sig.queue(q);
            }
            if let Some(p) = a.priority {
                sig = sig.priority(p);
            }
            if let Some(k) = a.idempotency_key {
                sig = sig.idempotency_key(k);
            }
            let res = app.send(sig).await?;
            eprintln!("sent {} as {}", a.task, res.id());
            if a.wait.is_none() && !a.json {
                // Not waiting: the id is the answer, whatever state the task reached meanwhile.
                println!("{}", res.id());
                return Ok(ExitCode::SUCCESS);
            }
            report(&res, a.wait, a.json).await
        }
        Command::Result(a) => report(&app.result(&a.id), a.wait, a.json).await,
        Command::Purge(a) => {
            for q in &a.queues {
                let n = app.broker().purge(q).await?;
                println!("purged {n} messages from {q}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Tasks => {
            for e in celery_core::registry::tasks() {
                let o = (e.options)();
                println!(
                    "{}\tqueue={}\t{}",
                    e.name,
                    o.queue.unwrap_or("celery"),
                    if e.blocking { "blocking" } else { "async" }
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench(a) => {
            crate::bench::run(app, a).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Broker(_) => unreachable!("handled before connecting"),
    }
}

/// A beat from the command line's settings: this binary's scheduled tasks and the schedule file.
fn beat(app: celery_core::App, a: &BeatRunArgs) -> anyhow::Result<crate::beat::Beat> {
    use crate::beat::{load_schedule_file, Beat, BeatConfig};
    anyhow::ensure!(a.lease.is_finite() && a.lease >= 0.3, "--lease must be at least 0.3 seconds");
    anyhow::ensure!(a.late_after.is_finite() && a.late_after >= 0.0, "--late-after must be positive");
    let cfg = BeatConfig {
        name: a.beat_name.clone(),
        lease: celery_core::clock::secs_f64(a.lease),
        late_after: celery_core::clock::secs_f64(a.late_after),
        ..BeatConfig::default()
    };
    let entries = match &a.schedule {
        Some(path) => load_schedule_file(path)?,
        None => Vec::new(),
    };
    Ok(Beat::new(app, cfg).entries(entries))
}

/// `beat add|remove|list`.
async fn beat_action(app: &celery_core::App, action: BeatAction) -> anyhow::Result<ExitCode> {
    use crate::beat::{add_entry, control_queue, load_state, remove_entry, EntrySpec, Missed};
    match action {
        BeatAction::Add(a) => {
            let a = *a;
            let at = match &a.at {
                Some(t) => Some(
                    chrono::DateTime::parse_from_rfc3339(t)
                        .with_context(|| format!("--at `{t}` is not RFC 3339"))?
                        .with_timezone(&chrono::Utc),
                ),
                None => None,
            };
            let spec = EntrySpec {
                name: a.name.clone(),
                task: a.task,
                args: serde_json::from_str(&a.args).context("--args is not JSON")?,
                kwargs: serde_json::from_str(&a.kwargs).context("--kwargs is not JSON")?,
                schedule: celery_core::schedule::ScheduleSpec {
                    every: a.every,
                    crontab: a.crontab,
                    timezone: a.timezone,
                    at,
                },
                queue: a.queue,
                priority: a.priority,
                expires: a.expires,
                missed: if a.skip_missed { Missed::Skip } else { Missed::RunOnce },
                unknown: Default::default(),
            };
            if let Some(state) = load_state(app, &a.beat_name).await? {
                let declared = state.entries.get(&a.name).is_some_and(|e| e.source != crate::beat::Source::Runtime);
                anyhow::ensure!(!declared, "`{}` is declared in code or the schedule file; change it there", a.name);
            }
            add_entry(app, &a.beat_name, &spec).await?;
            println!("asked beat `{}` to add `{}`", a.beat_name, a.name);
        }
        BeatAction::Remove { name, beat_name } => {
            let state = load_state(app, &beat_name).await?.unwrap_or_default();
            anyhow::ensure!(
                state.runtime.iter().any(|s| s.name == name),
                "beat `{beat_name}` has no run-time entry `{name}` (see `beat list`)"
            );
            remove_entry(app, &beat_name, &name).await?;
            println!("asked beat `{beat_name}` to remove `{name}`");
        }
        BeatAction::List { beat_name, json } => {
            let state = load_state(app, &beat_name).await?;
            let pending = app.broker().queue_len(&control_queue(&beat_name)).await.unwrap_or(0);
            if json {
                println!("{}", serde_json::to_string_pretty(&state)?);
                return Ok(ExitCode::SUCCESS);
            }
            let Some(state) = state else {
                println!("beat `{beat_name}` has not run yet ({pending} changes waiting for it)");
                return Ok(ExitCode::SUCCESS);
            };
            let time = |t: Option<chrono::DateTime<chrono::Utc>>| {
                t.map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string()).unwrap_or_else(|| "-".into())
            };
            println!(
                "{:<20} {:<24} {:<34} {:<8} {:<20} {:<20} {:>6}",
                "NAME", "TASK", "SCHEDULE", "SOURCE", "NEXT (UTC)", "LAST SENT (UTC)", "SENT"
            );
            for (name, e) in &state.entries {
                let source = serde_json::to_value(e.source)?.as_str().unwrap_or_default().to_owned();
                println!(
                    "{name:<20} {:<24} {:<34} {source:<8} {:<20} {:<20} {:>6}",
                    e.task,
                    e.schedule,
                    time(e.next),
                    time(e.last_sent),
                    e.total
                );
            }
            let known: std::collections::HashSet<&String> = state.entries.keys().collect();
            for s in state.runtime.iter().filter(|s| !known.contains(&s.name)) {
                println!("{:<20} {:<24} (added; not yet scheduled)", s.name, s.task);
            }
            println!("last written by {} at {}", state.leader, time(state.written_at));
            if pending > 0 {
                println!("{pending} changes wait for the leading beat");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Sends a remote-control request to the workers `reach` names.
async fn remote(
    app: &celery_core::App,
    method: &str,
    args: Value,
    reach: &Reach,
) -> anyhow::Result<Vec<(String, Value)>> {
    let timeout = celery_core::clock::secs_f64(reach.timeout);
    Ok(crate::control::request(app, method, args, reach.destination.clone(), timeout).await?)
}

/// `MAX,MIN` (or `MAX`, with MIN 0) for `--autoscale`: MAX from 1 to 10,000, MIN at most MAX.
fn parse_autoscale(s: &str) -> Result<(usize, usize), String> {
    let (max, min) = s.split_once(',').unwrap_or((s, "0"));
    let num = |v: &str| v.trim().parse::<usize>().map_err(|_| format!("`{v}` is not a count"));
    let (max, min) = (num(max)?, num(min)?);
    if !(1..=10_000).contains(&max) || min > max {
        return Err(format!("expected MAX,MIN with 1 <= MAX <= 10000 and MIN <= MAX, not {s}"));
    }
    Ok((max, min))
}

/// Prints one line (or JSON) per worker; fails when none answered.
fn print_replies(replies: &[(String, Value)], reach: &Reach) -> ExitCode {
    if reach.json {
        let all: serde_json::Map<String, Value> = replies.iter().cloned().collect();
        println!("{}", Value::Object(all));
    } else {
        for (worker, reply) in replies {
            println!("-> {worker}: {reply}");
        }
        eprintln!("{} {} replied", replies.len(), if replies.len() == 1 { "worker" } else { "workers" });
    }
    if replies.is_empty() {
        eprintln!("error: no worker replied within {} s", reach.timeout);
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// One line for an event: time, host, type, then the task and what happened.
fn describe_event(e: &Value) -> String {
    let time = e["timestamp"]
        .as_f64()
        .and_then(|t| chrono::DateTime::from_timestamp_micros((t * 1e6) as i64))
        .map(|t| t.format("%H:%M:%S%.3f").to_string())
        .unwrap_or_default();
    let s = |k: &str| e[k].as_str().unwrap_or_default().to_owned();
    let mut line = format!("{time} {} {}", s("hostname"), s("type"));
    for k in ["name", "uuid", "args", "result", "exception"] {
        if let Some(v) = e[k].as_str() {
            line.push_str(&format!(" {k}={v}"));
        }
    }
    if let Some(r) = e["runtime"].as_f64() {
        line.push_str(&format!(" runtime={r:.4}s"));
    }
    if e["type"] == "worker-heartbeat" {
        line.push_str(&format!(" active={} processed={}", e["active"], e["processed"]));
    }
    line
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
        Some(secs) => res.wait(celery_core::clock::secs_f64(secs)).await.ok().or(res.info().await?),
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

/// `broker serve`: owns the directory, serves it over TCP until SIGINT/SIGTERM, then checkpoints.
async fn serve(a: &ServeArgs) -> anyhow::Result<()> {
    use broker_backends::log::{parse_url, serve_tcp_with, LogStore, ServerTls};
    let addr: std::net::SocketAddr =
        a.listen.parse().with_context(|| format!("--listen `{}` is not HOST:PORT", a.listen))?;
    if !addr.ip().is_loopback() && a.token.as_deref().unwrap_or("").is_empty() && a.tls_client_ca.is_none() {
        anyhow::bail!("listening on {addr} (not loopback) requires --token (or client certificates: --tls-client-ca)");
    }
    let tls = match (&a.tls_cert, &a.tls_key) {
        (Some(cert), Some(key)) => Some(ServerTls::from_pem(cert, key, a.tls_client_ca.as_deref())?),
        _ => None,
    };
    let scheme = if tls.is_some() { "log+tls" } else { "log+tcp" };
    let (dir, cfg) = parse_url(&format!("log://{}", a.data))?;
    let store = LogStore::open(&dir, cfg)?;
    store.serve_unix();
    let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("listening on {addr}"))?;
    tracing::info!(data = %dir.display(), %addr, "broker serving {scheme}://{addr}");
    eprintln!("serving {} as {scheme}://{addr}", dir.display());
    tokio::select! {
        _ = serve_tcp_with(store.clone(), listener, a.token.clone(), tls, a.limits()) => {}
        _ = shutdown_signal() => {}
    }
    store.sync().await?;
    Ok(())
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
mod serve_args_tests {
    use super::*;
    use clap::Parser;
    use std::time::Duration;

    fn serve_args(args: &[&str]) -> Result<ServeArgs, clap::Error> {
        let cli = Cli::try_parse_from([&["celery", "broker", "serve"], args].concat())?;
        match cli.command {
            Command::Broker(BrokerCommand::Serve(a)) => Ok(a),
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn broker_serve_limits_default_to_the_servers_and_are_checked() {
        let defaults = serve_args(&[]).unwrap().limits();
        assert_eq!(defaults, broker_backends::log::ServerLimits::default());
        let set = serve_args(&["--max-connections", "20", "--idle-timeout", "1.5", "--reply-buffer-mib", "2"])
            .unwrap()
            .limits();
        assert_eq!(
            (set.max_connections, set.idle_timeout, set.reply_bytes),
            (20, Duration::from_millis(1500), 2 << 20)
        );
        assert!(serve_args(&["--max-connections", "0"]).is_err());
        let err = serve_args(&["--hello-timeout", "0"]).unwrap_err().to_string();
        assert!(err.contains("not between 0 (excluded) and 86400 seconds"), "{err}");
    }
}

#[cfg(test)]
mod worker_args_tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn autoscale_is_max_comma_min_and_bounded() {
        let parse = |extra: &[&str]| {
            let cli = Cli::try_parse_from([&["celery", "worker"], extra].concat())?;
            match cli.command {
                Command::Worker(a) => Ok::<_, clap::Error>(a.autoscale),
                other => panic!("parsed as {other:?}"),
            }
        };
        assert_eq!(parse(&[]).unwrap(), None);
        assert_eq!(parse(&["--autoscale", "10,3"]).unwrap(), Some((10, 3)));
        assert_eq!(parse(&["--autoscale", "4"]).unwrap(), Some((4, 0)));
        for bad in ["3,10", "0,0", "20000,1", "x,1"] {
            assert!(parse(&["--autoscale", bad]).is_err(), "{bad}");
        }
        let cli = Cli::try_parse_from(["celery", "control", "add_consumer", "emails", "-d", "w1"]).unwrap();
        assert!(matches!(cli.command, Command::Control(ControlCommand::AddConsumer { .. })));
    }
}

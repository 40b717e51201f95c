//! `worker` (optionally with beat in the same process) and `tasks`, the tasks such a worker runs.

use std::process::ExitCode;

use anyhow::Context;
use celery_core::App;
use clap::Args;

use super::beat::BeatRunArgs;
use super::shutdown_signal;
use crate::{Worker, WorkerConfig};

/// `worker` options.
#[derive(Debug, Args)]
pub struct WorkerArgs {
    /// Queues to consume, comma-separated or repeated, in priority order (default: `celery`,
    /// unless --queues-file names some).
    #[arg(short = 'Q', long = "queues", value_delimiter = ',')]
    pub queues: Vec<String>,
    /// Also consume the queues listed in this file, after those of -Q (names separated by commas
    /// or whitespace; at most 100,000): for more queues than a command line holds.
    #[arg(long, value_name = "PATH")]
    pub queues_file: Option<std::path::PathBuf>,
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
    /// Seconds a per-key concurrency slot is leased for (renewed every third of it while its task
    /// runs): a killed worker's slots free after this long (0.5 to 3600).
    #[arg(long, default_value_t = 30.0, value_name = "SECS", value_parser = parse_key_lease)]
    pub key_lease: f64,
    /// Limit the tasks of every concurrency key matching PATTERN (`*`: any characters) to N at
    /// once, over the task's own `key_concurrency` (repeatable; the first match wins; give every
    /// worker the same ones).
    #[arg(long = "key-limit", value_name = "PATTERN=N")]
    pub key_limits: Vec<celery_core::flow::KeyLimit>,
    /// Serve fairness key KEY up to W times in a row when its turn comes in a fair queue (every
    /// other key: 1; repeatable, at most 1,000; give every worker the same ones).
    #[arg(long = "fairness-weight", value_name = "KEY=W")]
    pub fairness_weights: Vec<celery_core::flow::FairnessWeight>,
    /// Also run beat in this process (one leader among all beats, so every worker may pass it).
    #[arg(long, short = 'B')]
    pub beat: bool,
    /// Beat's settings.
    #[command(flatten)]
    pub beat_run: BeatRunArgs,
    /// Also relay this PostgreSQL database's outbox to the broker (as `outbox-relay --db URL`).
    #[arg(long, env = "CELERY_OUTBOX_URL", hide_env_values = true, value_name = "URL")]
    pub outbox: Option<String>,
}

/// The largest `--queues-file`; it may list at most as many queues as a worker consumes.
const MAX_FILE_QUEUES: usize = crate::worker::intake::MAX_QUEUES;
const MAX_QUEUES_FILE_BYTES: u64 = 32 << 20;

/// The queue names in a `--queues-file` (separated by commas or whitespace), bounded.
fn read_queues_file(path: &std::path::Path) -> anyhow::Result<Vec<String>> {
    let size = std::fs::metadata(path).with_context(|| format!("reading {}", path.display()))?.len();
    anyhow::ensure!(size <= MAX_QUEUES_FILE_BYTES, "{}: over {MAX_QUEUES_FILE_BYTES} bytes", path.display());
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let names: Vec<String> =
        text.split(|c: char| c == ',' || c.is_whitespace()).filter(|n| !n.is_empty()).map(str::to_owned).collect();
    anyhow::ensure!(names.len() <= MAX_FILE_QUEUES, "{}: more than {MAX_FILE_QUEUES} queues", path.display());
    Ok(names)
}

impl WorkerArgs {
    /// The queues to consume: -Q's, then the file's, without repeats; `celery` when neither names one.
    fn queues(&self) -> anyhow::Result<Vec<String>> {
        let mut queues = self.queues.clone();
        if let Some(path) = &self.queues_file {
            queues.extend(read_queues_file(path)?);
        }
        let mut seen = std::collections::HashSet::new();
        queues.retain(|q| seen.insert(q.clone()));
        anyhow::ensure!(queues.len() <= MAX_FILE_QUEUES, "more than {MAX_FILE_QUEUES} queues (-Q and --queues-file)");
        if queues.is_empty() {
            queues.push("celery".to_owned());
        }
        Ok(queues)
    }

    /// The worker's settings these options give.
    fn config(&self) -> anyhow::Result<WorkerConfig> {
        let defaults = WorkerConfig::default();
        Ok(WorkerConfig {
            queues: self.queues()?,
            concurrency: self.concurrency.unwrap_or(defaults.concurrency),
            prefetch_multiplier: self.prefetch_multiplier,
            hostname: self.hostname.clone().unwrap_or(defaults.hostname),
            shutdown_grace: celery_core::clock::secs_f64(self.grace),
            track_started: !self.without_track_started,
            events: self.events,
            autoscale: self.autoscale,
            key_lease: celery_core::clock::secs_f64(self.key_lease),
            key_limits: self.key_limits.clone(),
            fairness_weights: celery_core::flow::FairnessWeights::new(self.fairness_weights.clone())?,
            ..defaults
        })
    }
}

/// `--key-lease`: seconds from 0.5 to 3600.
fn parse_key_lease(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if (0.5..=3600.0).contains(&v) => Ok(v),
        _ => Err(format!("expected seconds from 0.5 to 3600, not {s}")),
    }
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

/// `worker`: runs until SIGINT/SIGTERM (with `--beat`, beat too, and both stop together).
pub(super) async fn run(app: App, a: WorkerArgs) -> anyhow::Result<ExitCode> {
    let cfg = a.config()?;
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
    let _relay = crate::outbox::start_in_worker(&app, a.outbox.as_deref()).await?;
    if celery_core::registry::tasks().iter().all(|e| e.name.starts_with("celery.")) {
        tracing::warn!("this binary has no tasks of its own (only Celery's built-ins): build your application's binary to run its tasks");
    }
    if !a.beat {
        // On a runtime thread, not on the one blocked in `block_on`: the consumer then spawns its
        // deliveries' tasks into that thread's own queue, and is woken without unparking another.
        tokio::spawn(Worker::new(app, cfg).run_until(shutdown_signal())).await??;
        return Ok(ExitCode::SUCCESS);
    }
    let beat = super::beat::build(app.clone(), &a.beat_run)?;
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

/// `tasks`: the tasks registered in this binary, one a line.
pub(super) fn tasks() -> ExitCode {
    for e in celery_core::registry::tasks() {
        let o = (e.options)();
        println!(
            "{}\tqueue={}\t{}",
            e.name,
            o.queue.unwrap_or("celery"),
            if e.blocking { "blocking" } else { "async" }
        );
    }
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use crate::cli::{Cli, Command, ControlCommand};
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

    #[test]
    fn queues_come_from_q_then_the_file_and_default_to_celery() {
        let queues =
            |extra: &[&str]| match Cli::try_parse_from([&["celery", "worker"], extra].concat()).unwrap().command {
                Command::Worker(a) => a.queues(),
                other => panic!("parsed as {other:?}"),
            };
        assert_eq!(queues(&[]).unwrap(), ["celery"]);
        let file = std::env::temp_dir().join(format!("queues-{}", uuid::Uuid::new_v4().simple()));
        std::fs::write(&file, "a,b\nc\n\n  d ,a\n").unwrap();
        let path = file.display().to_string();
        assert_eq!(queues(&["--queues-file", &path]).unwrap(), ["a", "b", "c", "d"]);
        assert_eq!(queues(&["-Q", "x,c", "--queues-file", &path]).unwrap(), ["x", "c", "a", "b", "d"]);
        std::fs::remove_file(&file).unwrap();
        assert!(queues(&["--queues-file", &path]).is_err(), "a missing file is an error");
    }
}

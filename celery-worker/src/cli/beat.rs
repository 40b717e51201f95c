//! `beat` (run periodic tasks; also `worker --beat`) and `beat add|remove|list` (change and list
//! the run-time entries, applied by the leading beat).

use std::process::ExitCode;

use anyhow::Context;
use celery_core::App;
use clap::{Args, Subcommand};

use crate::beat::{add_entry, control_queue, load_schedule_file, load_state, remove_entry};
use crate::beat::{Beat, BeatConfig, EntrySpec, Missed};

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

/// `beat` runs until SIGINT/SIGTERM; `beat add|remove|list` change or show its entries.
pub(super) async fn run(app: App, a: BeatArgs) -> anyhow::Result<ExitCode> {
    match a.action {
        None => build(app, &a.run)?.run_until(super::shutdown_signal()).await?,
        Some(BeatAction::Add(add)) => self::add(&app, *add).await?,
        Some(BeatAction::Remove { name, beat_name }) => remove(&app, &beat_name, &name).await?,
        Some(BeatAction::List { beat_name, json }) => list(&app, &beat_name, json).await?,
    }
    Ok(ExitCode::SUCCESS)
}

/// A beat from the command line's settings: this binary's scheduled tasks and the schedule file.
pub(super) fn build(app: App, a: &BeatRunArgs) -> anyhow::Result<Beat> {
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

/// `beat add`: asks the leading beat to add (or replace) a run-time entry.
async fn add(app: &App, a: BeatAddArgs) -> anyhow::Result<()> {
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
        schedule: celery_core::schedule::ScheduleSpec { every: a.every, crontab: a.crontab, timezone: a.timezone, at },
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
    Ok(())
}

/// `beat remove`: asks the leading beat to remove a run-time entry.
async fn remove(app: &App, beat_name: &str, name: &str) -> anyhow::Result<()> {
    let state = load_state(app, beat_name).await?.unwrap_or_default();
    anyhow::ensure!(
        state.runtime.iter().any(|s| s.name == name),
        "beat `{beat_name}` has no run-time entry `{name}` (see `beat list`)"
    );
    remove_entry(app, beat_name, name).await?;
    println!("asked beat `{beat_name}` to remove `{name}`");
    Ok(())
}

/// `beat list`: the entries with their next and last runs (or the stored state as JSON).
async fn list(app: &App, beat_name: &str, json: bool) -> anyhow::Result<()> {
    let state = load_state(app, beat_name).await?;
    let pending = app.broker().queue_len(&control_queue(beat_name)).await.unwrap_or(0);
    if json {
        println!("{}", serde_json::to_string_pretty(&state)?);
        return Ok(());
    }
    let Some(state) = state else {
        println!("beat `{beat_name}` has not run yet ({pending} changes waiting for it)");
        return Ok(());
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
    Ok(())
}

//! `purge` and `dead`: the administration of the queues themselves.

use std::process::ExitCode;

use celery_core::App;
use clap::Args;
use futures::StreamExt;

use crate::monitor::dead;

/// `purge` options.
#[derive(Debug, Args)]
pub struct PurgeArgs {
    /// Queues to purge, comma-separated or repeated.
    #[arg(short = 'Q', long = "queues", value_delimiter = ',', default_value = "celery")]
    pub queues: Vec<String>,
}

/// How many queues are emptied at once.
const PURGES_IN_FLIGHT: usize = 16;

/// Purges `queues`, up to [`PURGES_IN_FLIGHT`] at once (one after another, 10,000 RabbitMQ queues
/// took minutes): each queue with what was purged from it, in the order given.
pub(crate) fn purge_all<'a>(
    app: &'a App,
    queues: &'a [String],
) -> impl futures::Stream<Item = (&'a String, Result<u64, celery_core::BrokerError>)> + 'a {
    futures::stream::iter(queues.iter().map(move |q| async move { (q, app.broker().purge(q).await) }))
        .buffered(PURGES_IN_FLIGHT)
}

/// `purge`: deletes what waits in each queue (delayed messages included) and says how many, in
/// the order given.
pub(super) async fn purge(app: &App, a: &PurgeArgs) -> anyhow::Result<ExitCode> {
    let mut purged = std::pin::pin!(purge_all(app, &a.queues));
    while let Some((q, n)) = purged.next().await {
        println!("purged {} messages from {q}", n?);
    }
    Ok(ExitCode::SUCCESS)
}

/// `dead` options: the dead letters of one queue (`<queue>.dead`).
#[derive(Debug, Args)]
pub struct DeadArgs {
    /// `list` them (oldest first, at most 200), or `retry` (publish to the queue again) or
    /// `discard` them: the one of `--id`, those that `--match`, or `--all`.
    #[arg(value_enum)]
    pub action: DeadAction,
    /// The queue whose dead letters these are.
    #[arg(short = 'Q', long = "queue", default_value = "celery")]
    pub queue: String,
    /// Only the dead letter of this task id.
    #[arg(long, conflicts_with_all = ["matching", "all"])]
    pub id: Option<String>,
    /// Only those whose task name, id, reason or arguments contain TEXT (case-insensitive, at most
    /// 256 bytes).
    #[arg(long = "match", value_name = "TEXT", conflicts_with = "all")]
    pub matching: Option<String>,
    /// Retry or discard every dead letter of the queue (a guard: without `--id`, `--match` or
    /// `--all`, `retry` and `discard` refuse).
    #[arg(long)]
    pub all: bool,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// What `dead` does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DeadAction {
    /// Show them.
    List,
    /// Publish them to their queue again.
    Retry,
    /// Remove them.
    Discard,
}

/// `dead`: lists, retries or discards the dead letters of a queue (as the monitor's buttons do).
pub(super) async fn dead(app: &App, a: &DeadArgs) -> anyhow::Result<ExitCode> {
    let filter = a.matching.as_deref().unwrap_or("");
    anyhow::ensure!(filter.len() <= dead::MAX_FILTER, "--match is at most {} bytes", dead::MAX_FILTER);
    let action = match a.action {
        DeadAction::List => {
            let found = dead::list(app, &a.queue).await.map_err(anyhow::Error::msg)?;
            let found: Vec<_> = found.into_iter().filter(|d| dead::matches(d, filter)).collect();
            if a.json {
                println!("{}", serde_json::to_string_pretty(&found)?);
            } else {
                for d in &found {
                    println!("{}  {}  {}  args={}", d.id, d.task, d.reason, d.args);
                }
                println!("{} dead letters of {}", found.len(), a.queue);
            }
            return Ok(ExitCode::SUCCESS);
        }
        DeadAction::Retry => dead::Action::Retry,
        DeadAction::Discard => dead::Action::Discard,
    };
    let verb = if action == dead::Action::Retry { "retried" } else { "discarded" };
    if let Some(id) = &a.id {
        let found = dead::act(app, &a.queue, id, action).await.map_err(anyhow::Error::msg)?;
        anyhow::ensure!(found, "no dead letter of task {id} in {}", a.queue);
        println!("{verb} {id}");
        return Ok(ExitCode::SUCCESS);
    }
    anyhow::ensure!(a.matching.is_some() || a.all, "say which: --id ID, --match TEXT or --all");
    // Each pass takes the oldest ones and puts those that do not match at the back: as many
    // passes as it takes to see each dead letter that was there at the start once.
    let waiting = app.broker().queue_len(&celery_core::broker::dead_letter_queue(&a.queue)).await?;
    let (mut total, mut seen) = (dead::Bulk::default(), 0u64);
    while seen < waiting {
        let bulk = dead::act_matching(app, &a.queue, filter, action).await.map_err(anyhow::Error::msg)?;
        let looked = (bulk.acted + bulk.kept) as u64;
        total.acted += bulk.acted;
        total.kept += bulk.kept;
        if looked == 0 {
            break;
        }
        seen += looked;
    }
    if a.json {
        println!("{}", serde_json::to_string(&total)?);
    } else {
        println!("{verb} {} dead letters of {} ({} kept)", total.acted, a.queue, total.kept);
    }
    Ok(ExitCode::SUCCESS)
}

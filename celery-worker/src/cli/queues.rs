//! `purge`: the administration of the queues themselves.

use std::process::ExitCode;

use celery_core::App;
use clap::Args;

/// `purge` options.
#[derive(Debug, Args)]
pub struct PurgeArgs {
    /// Queues to purge, comma-separated or repeated.
    #[arg(short = 'Q', long = "queues", value_delimiter = ',', default_value = "celery")]
    pub queues: Vec<String>,
}

/// `purge`: deletes what waits in each queue (delayed messages included) and says how many.
pub(super) async fn purge(app: &App, a: &PurgeArgs) -> anyhow::Result<ExitCode> {
    for q in &a.queues {
        let n = app.broker().purge(q).await?;
        println!("purged {n} messages from {q}");
    }
    Ok(ExitCode::SUCCESS)
}

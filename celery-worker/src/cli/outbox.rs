//! `outbox-relay`: forwards the committed rows of a PostgreSQL outbox (`celery_rs_outbox`) to the
//! broker until SIGINT/SIGTERM (see [`crate::outbox`]; `worker --outbox URL` runs one inside a
//! worker).

use std::process::ExitCode;

use celery_core::App;
use clap::Args;

use super::shutdown_signal;
use crate::outbox::RelayConfig;

/// `outbox-relay` options.
#[derive(Debug, Args)]
pub struct RelayArgs {
    /// The database whose outbox to forward: `postgres://USER@HOST/DB`, with
    /// `?options=-csearch_path%3DSCHEMA` for a schema other than the first on the path (printed
    /// only redacted).
    #[arg(long, env = "CELERY_OUTBOX_URL", hide_env_values = true, value_name = "URL")]
    pub db: String,
    /// Rows per batch (1 to 1000).
    #[arg(long, default_value_t = 100)]
    pub batch: usize,
    /// Seconds between reads of the outbox without a notification (0.1 to 3600).
    #[arg(long, default_value_t = 5.0)]
    pub poll: f64,
}

impl RelayArgs {
    fn config(&self, app: &App) -> RelayConfig {
        RelayConfig { batch: self.batch, poll: celery_core::clock::secs_f64(self.poll), ..RelayConfig::for_app(app) }
    }
}

/// `outbox-relay`: waits for the database as a starting worker waits for its broker, then relays
/// until SIGINT/SIGTERM.
pub(super) async fn run(app: App, args: &RelayArgs) -> anyhow::Result<ExitCode> {
    let config = args.config(&app);
    config.check()?;
    let relay = crate::outbox::connect(&app, &args.db, config).await?;
    relay.run_until(shutdown_signal()).await?;
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    #[test]
    fn relay_args_parse() {
        let cli =
            super::super::Cli::try_parse_from(["demo", "outbox-relay", "--db", "postgres://u@h/db", "--batch", "7"])
                .expect("parses");
        let super::super::Command::OutboxRelay(a) = cli.command else { panic!("not outbox-relay") };
        assert_eq!((a.db.as_str(), a.batch, a.poll), ("postgres://u@h/db", 7, 5.0));
        let cli =
            super::super::Cli::try_parse_from(["demo", "worker", "--outbox", "postgres://u@h/db"]).expect("parses");
        let super::super::Command::Worker(w) = cli.command else { panic!("not worker") };
        assert_eq!(w.outbox.as_deref(), Some("postgres://u@h/db"));
    }
}

//! `monitor` (the live dashboard) and `events` (the workers' events, printed as they come).

use std::process::ExitCode;

use celery_core::App;
use clap::Args;
use serde_json::Value;

use super::shutdown_signal;

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
    /// How long task history is kept (`90m`, `1d`, `7days`), in the broker or result backend.
    #[arg(long, default_value = "1d", value_parser = humantime::parse_duration)]
    pub history_retention: std::time::Duration,
    /// The most tasks the history keeps (the oldest go first).
    #[arg(long, default_value_t = celery_core::history::DEFAULT_MAX_TASKS)]
    pub history_max: usize,
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

/// `monitor`: serves the dashboard until SIGINT/SIGTERM.
pub(super) async fn monitor(app: App, a: MonitorArgs) -> anyhow::Result<ExitCode> {
    let cfg = crate::monitor::MonitorConfig {
        listen: a.listen,
        queues: a.queues,
        allow_control: a.allow_control,
        token: a.token,
        hosts: a.allow_host,
        history: celery_core::history::Retain { retention: a.history_retention, max_tasks: a.history_max },
    };
    eprintln!("monitor on http://{}/", cfg.listen);
    crate::monitor::serve(app, cfg, shutdown_signal()).await.map_err(anyhow::Error::msg)?;
    Ok(ExitCode::SUCCESS)
}

/// `events`: prints each event until SIGINT/SIGTERM (or `--count` of them).
pub(super) async fn events(app: &App, a: &EventsArgs) -> anyhow::Result<ExitCode> {
    let mut events = crate::events::subscribe(app).await?;
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

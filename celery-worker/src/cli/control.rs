//! `inspect` and `control`: remote control of the running workers (see [`crate::control`]), with
//! one line (or one JSON object) of replies per worker.

use std::process::ExitCode;

use anyhow::Context;
use celery_core::App;
use clap::{Args, Subcommand};
use serde_json::{json, Value};

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
        /// One limit for the whole cluster (a bucket the broker holds), not one per worker.
        #[arg(long)]
        cluster: bool,
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
    /// Pause a queue on every worker (or those given): they stop taking from it, finish what
    /// they hold, and leave the rest waiting (Celery's `cancel_consumer`).
    Pause {
        /// The queue.
        #[arg(short = 'Q', long = "queue")]
        queue: String,
        /// Destination and timeout.
        #[command(flatten)]
        reach: Reach,
    },
    /// Resume a paused queue: the workers consume it again (Celery's `add_consumer`).
    Resume {
        /// The queue.
        #[arg(short = 'Q', long = "queue")]
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

/// The inspect methods `inspect` accepts.
const INSPECT_METHODS: [&str; 14] = [
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

/// `inspect METHOD`: asks the workers and prints their replies.
pub(super) async fn inspect(app: &App, a: &InspectArgs) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(
        INSPECT_METHODS.contains(&a.method.as_str()),
        "unknown inspect method `{}`; one of {INSPECT_METHODS:?}",
        a.method
    );
    let args: Value = serde_json::from_str(&a.args).context("--args must be a JSON object")?;
    anyhow::ensure!(args.is_object(), "--args must be a JSON object");
    let replies = remote(app, &a.method, args, &a.reach).await?;
    Ok(print_replies(&replies, &a.reach))
}

/// `control COMMAND`: steers the workers and prints their replies.
pub(super) async fn control(app: &App, c: &ControlCommand) -> anyhow::Result<ExitCode> {
    let (method, args, reach) = match c {
        ControlCommand::Revoke { ids, terminate, reach } => {
            // Also stored, for workers that start later (see `crate::control::revoke`).
            let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
            let timeout = celery_core::clock::secs_f64(reach.timeout);
            let replies = crate::control::revoke(app, &ids, *terminate, reach.destination.clone(), timeout).await?;
            return Ok(print_replies(&replies, reach));
        }
        ControlCommand::RateLimit { task, rate, cluster, reach } => {
            let mut args = json!({"task_name": task, "rate_limit": rate});
            if *cluster {
                args["cluster"] = json!(true);
            }
            ("rate_limit", args, reach)
        }
        ControlCommand::Shutdown { reach } => ("shutdown", json!({}), reach),
        ControlCommand::Terminate { ids, reach } => ("terminate", json!({"task_id": ids, "signal": "SIGTERM"}), reach),
        ControlCommand::TimeLimit { task, soft, hard, reach } => {
            ("time_limit", json!({"task_name": task, "soft": soft, "hard": hard}), reach)
        }
        ControlCommand::AddConsumer { queue, reach } | ControlCommand::Resume { queue, reach } => {
            ("add_consumer", json!({"queue": queue}), reach)
        }
        ControlCommand::CancelConsumer { queue, reach } | ControlCommand::Pause { queue, reach } => {
            ("cancel_consumer", json!({"queue": queue}), reach)
        }
        ControlCommand::PoolGrow { n, reach } => ("pool_grow", json!({"n": n}), reach),
        ControlCommand::PoolShrink { n, reach } => ("pool_shrink", json!({"n": n}), reach),
        ControlCommand::Autoscale { max, min, reach } => ("autoscale", json!({"max": max, "min": min}), reach),
        ControlCommand::EnableEvents { reach } => ("enable_events", json!({}), reach),
        ControlCommand::DisableEvents { reach } => ("disable_events", json!({}), reach),
        ControlCommand::Heartbeat { reach } => ("heartbeat", json!({}), reach),
    };
    let replies = remote(app, method, args, reach).await?;
    Ok(print_replies(&replies, reach))
}

/// Sends a remote-control request to the workers `reach` names.
async fn remote(app: &App, method: &str, args: Value, reach: &Reach) -> anyhow::Result<Vec<(String, Value)>> {
    let timeout = celery_core::clock::secs_f64(reach.timeout);
    Ok(crate::control::request(app, method, args, reach.destination.clone(), timeout).await?)
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

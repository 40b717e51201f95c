//! RabbitMQ's working modes, on any broker that offers them: the built-in broker (default),
//! `amqp://` (RabbitMQ) or `redis://` (direct and topic only).
//!
//! ```text
//! cargo run --example modes -- simple
//! cargo run --example modes -- work-queue     # fair dispatch with prefetch 1: the idle worker gets the next task
//! cargo run --example modes -- pubsub         # fanout: every bound queue receives
//! cargo run --example modes -- routing        # direct: by severity
//! cargo run --example modes -- topic          # *.error, kern.#
//! cargo run --example modes -- rpc            # request with reply-to and correlation id, answered by a worker
//! cargo run --example modes -- rpc --broker amqp://guest:guest@127.0.0.1:5672/%2f --backend rpc://
//! ```

use std::time::Duration;

use celery_core::routing::{Binding, ExchangeKind, Route};
use celery_core::{protocol::Message, Broker};
use celery_worker::prelude::*;

#[task]
async fn hello(name: String) -> String {
    format!("hello, {name}")
}

#[task]
async fn work(ms: u64) -> u64 {
    tokio::time::sleep(Duration::from_millis(ms)).await;
    ms
}

#[task]
async fn add(x: i64, y: i64) -> i64 {
    x + y
}

fn running(app: &App, name: &str, queues: &[&str], prefetch_multiplier: usize) -> tokio::sync::oneshot::Sender<()> {
    let cfg = WorkerConfig {
        queues: queues.iter().map(|q| q.to_string()).collect(),
        concurrency: 1,
        prefetch_multiplier,
        hostname: name.into(),
        ..WorkerConfig::default()
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(Worker::new(app.clone(), cfg).run_until(async {
        let _ = stopped.await;
    }));
    stop
}

/// Publishes one message through `exchange` with `key`, then prints what each queue holds.
async fn show(broker: &dyn Broker, exchange: &str, key: &str, queues: &[&str]) -> anyhow::Result<()> {
    let msg = Message::from_signature(&hello::new(format!("{exchange}/{key}")))?;
    broker.publish(&Route::exchange(exchange, key), &msg).await?;
    for q in queues {
        println!("  {key:>14} -> {q}: {} waiting", broker.queue_len(q).await?);
    }
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let flag = |name: &str, default: &str| {
        args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned().unwrap_or_else(|| default.into())
    };
    let mode = args.get(1).cloned().unwrap_or_else(|| "simple".into());
    let broker_url = flag("--broker", "log://./celery-data");
    let backend_url = flag("--backend", &broker_url);
    let app = celery_worker::connect(&broker_url, &backend_url).await?;
    let b = app.broker().as_ref();
    match mode.as_str() {
        "simple" => {
            let stop = running(&app, "w1", &["hello"], 4);
            let r = app.send(hello::new("world".into()).queue("hello")).await?;
            println!("{}", r.get::<String>(Duration::from_secs(10)).await?);
            let _ = stop.send(());
        }
        "work-queue" => {
            let stops = [running(&app, "fast-lane", &["work"], 1), running(&app, "other-lane", &["work"], 1)];
            let durations = [800u64, 50, 50, 50, 800, 50, 50, 50];
            let sent = app.send_batch(durations.iter().map(|ms| work::new(*ms).queue("work"))).await?;
            for (r, ms) in sent.iter().zip(durations) {
                let meta = r.wait(Duration::from_secs(20)).await?;
                println!("  task of {ms:>3} ms ran on {}", meta.worker.unwrap_or_default());
            }
            println!("with prefetch 1, a worker busy with a long task does not hold the short ones");
            for s in stops {
                let _ = s.send(());
            }
        }
        "pubsub" => {
            b.require_routing("exchanges and bindings")?.declare_exchange("logs", ExchangeKind::Fanout).await?;
            for q in ["subscriber.a", "subscriber.b"] {
                b.require_routing("exchanges and bindings")?.bind(&Binding::new("logs", q, "")).await?;
                b.purge(q).await?;
            }
            show(b, "logs", "anything", &["subscriber.a", "subscriber.b"]).await?;
        }
        "routing" => {
            b.require_routing("exchanges and bindings")?.declare_exchange("direct_logs", ExchangeKind::Direct).await?;
            b.require_routing("exchanges and bindings")?.bind(&Binding::new("direct_logs", "disk", "error")).await?;
            b.purge("disk").await?;
            b.purge("console").await?;
            for sev in ["info", "warning", "error"] {
                b.require_routing("exchanges and bindings")?.bind(&Binding::new("direct_logs", "console", sev)).await?;
            }
            for sev in ["info", "error"] {
                show(b, "direct_logs", sev, &["disk", "console"]).await?;
            }
        }
        "topic" => {
            b.require_routing("exchanges and bindings")?.declare_exchange("topic_logs", ExchangeKind::Topic).await?;
            b.require_routing("exchanges and bindings")?
                .bind(&Binding::new("topic_logs", "all.errors", "*.error"))
                .await?;
            b.require_routing("exchanges and bindings")?.bind(&Binding::new("topic_logs", "kernel", "kern.#")).await?;
            b.purge("all.errors").await?;
            b.purge("kernel").await?;
            for key in ["kern.error", "app.error", "kern.disk.full"] {
                show(b, "topic_logs", key, &["all.errors", "kernel"]).await?;
            }
        }
        "rpc" => {
            let stop = running(&app, "server", &["rpc_requests"], 4);
            let r = app.send(add::new(2, 3).queue("rpc_requests")).await?;
            println!(
                "request {} (reply to {:?}) answered: {}",
                r.id(),
                app.backend().reply_to(),
                r.get::<i64>(Duration::from_secs(10)).await?
            );
            let _ = stop.send(());
        }
        other => anyhow::bail!("unknown mode `{other}` (simple, work-queue, pubsub, routing, topic, rpc)"),
    }
    Ok(())
}

//! Quickstart: one process runs a worker and sends it a task, on Redis.
//!
//! ```text
//! cargo run --example quickstart
//! ```
//! Set `CELERY_BROKER_URL` / `CELERY_RESULT_BACKEND` to use other servers.

use celery_worker::prelude::*;

#[task]
async fn add(x: i64, y: i64) -> i64 {
    x + y
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let broker = std::env::var("CELERY_BROKER_URL").unwrap_or_else(|_| celery_worker::cli::DEFAULT_BROKER.into());
    let backend = std::env::var("CELERY_RESULT_BACKEND").unwrap_or_else(|_| celery_worker::cli::DEFAULT_BACKEND.into());
    let app = celery_worker::connect(&broker, &backend).await?;

    // A worker for the `quickstart` queue, in this process.
    let config = WorkerConfig { queues: vec!["quickstart".into()], concurrency: 4, ..WorkerConfig::default() };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let worker = tokio::spawn(Worker::new(app.clone(), config).run_until(async {
        let _ = stopped.await;
    }));

    let res = app.send(add::new(2, 3).queue("quickstart").countdown(Duration::from_secs(1))).await?;
    println!("sent add(2, 3) as {}; it runs in about a second", res.id());
    let sum: i64 = res.get(Duration::from_secs(10)).await?;
    println!("add(2, 3) = {sum}");

    let _ = stop.send(());
    worker.await??;
    Ok(())
}

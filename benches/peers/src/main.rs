//! apalis 1.0 + apalis-redis 1.0 on the same Redis as `demo bench`, for `scripts/bench-peers`.
//! Enqueues N `add(a, b)` jobs in batches of 1,000 (`push_bulk`), then drains them with one worker in
//! this process and prints `name value unit` lines like `demo bench`.
//!
//! `--mode tuned`: fetch batches of 1,000, no task locks (no lease per task), pub/sub events off,
//! results stored (apalis' `persist_results`, its default). `--mode default`: `Config::default()`.
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use apalis::prelude::*;
use apalis_redis::{Config, RedisStorage};
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

#[derive(Debug, Serialize, Deserialize)]
struct Add {
    a: u64,
    b: u64,
}

static DONE: AtomicUsize = AtomicUsize::new(0);
static TARGET: AtomicUsize = AtomicUsize::new(usize::MAX);
static ALL_DONE: OnceLock<Notify> = OnceLock::new();

async fn add(job: Add) -> Result<u64, BoxDynError> {
    if DONE.fetch_add(1, Ordering::Relaxed) + 1 == TARGET.load(Ordering::Relaxed) {
        ALL_DONE.get_or_init(Notify::new).notify_one();
    }
    Ok(job.a + job.b)
}

fn line(name: &str, value: f64, unit: &str) {
    println!("{name} {} {unit}", (value * 1000.0).round() / 1000.0);
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut n = 100_000usize;
    let mut url = "redis://127.0.0.1:6379/13".to_owned();
    let mut mode = "tuned".to_owned();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "-n" => n = args.next().ok_or("-n needs a value")?.parse()?,
            "--url" => url = args.next().ok_or("--url needs a value")?,
            "--mode" => mode = args.next().ok_or("--mode needs a value")?,
            other => return Err(format!("unknown argument {other}").into()),
        }
    }
    let queue = format!("peers-bench-{}", std::process::id());
    let config = match mode.as_str() {
        "tuned" => Config::default().queue(&queue).batch_size(1000).lock_tasks(false).emit_events(false),
        "default" => Config::default().queue(&queue),
        other => return Err(format!("unknown mode {other} (tuned or default)").into()),
    };
    let conn = apalis_redis::connect(url.as_str()).await?;
    let mut storage = RedisStorage::<Add>::new(conn.clone()).with_config(config);

    let t = Instant::now();
    let mut sent = 0;
    while sent < n {
        let k = 1000.min(n - sent);
        storage.push_bulk((sent..sent + k).map(|i| Add { a: i as u64, b: i as u64 }).collect()).await?;
        sent += k;
    }
    line("enqueue_rate", n as f64 / t.elapsed().as_secs_f64(), "jobs/s");

    // apalis-redis 1.0 schedules every pushed job at max(run_at, now) and its fetch script promotes
    // all due scheduled jobs with one Lua `unpack`, which fails above ~8,000 ids (Lua's stack limit):
    // a larger backlog would never be fetched. Move them to the active list here, untimed, in
    // chunks, as that script does for a smaller backlog (this spares apalis that work in the drain).
    let mut c = conn.clone();
    let (sched, active, signal) = {
        let cfg = storage.get_config();
        (cfg.scheduled_jobs_set(), cfg.active_jobs_list(), cfg.signal_list())
    };
    loop {
        let ids: Vec<String> = redis::cmd("ZRANGE").arg(&sched).arg(0).arg(999).query_async(&mut c).await?;
        if ids.is_empty() {
            break;
        }
        let _: () = redis::pipe()
            .atomic()
            .cmd("RPUSH")
            .arg(&active)
            .arg(&ids)
            .ignore()
            .cmd("ZREM")
            .arg(&sched)
            .arg(&ids)
            .ignore()
            .query_async(&mut c)
            .await?;
    }
    let _: () = redis::cmd("LPUSH").arg(&signal).arg(1).query_async(&mut c).await?;

    TARGET.store(n, Ordering::Relaxed);
    let notify = ALL_DONE.get_or_init(Notify::new);
    let worker = WorkerBuilder::new(format!("peers-bench-{}", std::process::id())).backend(storage).build(add);
    let t = Instant::now();
    let mut run = tokio::spawn(worker.run_until(async move {
        notify.notified().await;
        Ok::<(), std::io::Error>(())
    }));
    let progress = async {
        while DONE.load(Ordering::Relaxed) < n {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    };
    let mut stopped = false;
    tokio::select! {
        r = tokio::time::timeout(Duration::from_secs(600), progress) => if r.is_err() {
            return Err(format!("apalis drained {} of {n} jobs in 10 minutes", DONE.load(Ordering::Relaxed)).into());
        },
        // The worker stops on its own only when its backend failed (a fetch error ends its stream).
        r = &mut run => {
            if DONE.load(Ordering::Relaxed) < n {
                return Err(format!("the apalis worker stopped after {} of {n} jobs: {r:?}", DONE.load(Ordering::Relaxed)).into());
            }
            stopped = true;
        }
    }
    let wall = t.elapsed().as_secs_f64();
    line("drain_rate", n as f64 / wall, "jobs/s");
    if !stopped {
        let _ = tokio::time::timeout(Duration::from_secs(30), &mut run).await;
    }

    // Leave nothing behind on the shared server: every key of this run's queue.
    let mut c = conn;
    let keys: Vec<String> = redis::cmd("KEYS").arg(format!("*{queue}*")).query_async(&mut c).await?;
    for chunk in keys.chunks(500) {
        let _: () = redis::cmd("DEL").arg(chunk).query_async(&mut c).await?;
    }
    Ok(())
}

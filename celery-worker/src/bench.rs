//! `bench`: enqueue and drain throughput and round-trip latency, printed as `name value unit` lines
//! (the format of the Python Celery baseline script, so a script can compute ratios).

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use celery_core::flow::MAX_KEY_LIMIT;
use celery_core::{App, Signature};
use clap::Args;
use futures::StreamExt;

use crate::{Worker, WorkerConfig};

/// `bench` options.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Tasks to enqueue and drain.
    #[arg(short = 'n', long, default_value_t = 100_000)]
    pub count: usize,
    /// Round trips to time (`send(add).get()` one after another).
    #[arg(long, default_value_t = 2000)]
    pub roundtrips: usize,
    /// The task to send, with two integer arguments (the demo's `add`).
    #[arg(long, default_value = "add")]
    pub task: String,
    /// The queue to use (purged first).
    #[arg(long, default_value = "bench")]
    pub queue: String,
    /// Spread the tasks evenly over this many queues (`QUEUE.0` .. `QUEUE.N-1`, purged first),
    /// all consumed by the one worker (round trips use the first).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub queues: u32,
    /// Worker concurrency while draining.
    #[arg(short = 'c', long, default_value_t = 256)]
    pub concurrency: usize,
    /// Messages per batched send.
    #[arg(long, default_value_t = 1000)]
    pub batch: usize,
    /// Drain I/O-bound tasks instead: the demo's `sleep` with this many milliseconds (each task
    /// awaits a timer), and report the drain's wall time, its peak memory and the memory per task
    /// in flight (the growth of RSS while draining over `min(concurrency, count)`; prefetched
    /// messages included).
    #[arg(long, value_name = "MS", value_parser = clap::value_parser!(u64).range(0..=600_000))]
    pub sleep_ms: Option<u64>,
    /// Also drain the same tasks spread over this many fairness keys (`k0` .. `kN-1`, sent in
    /// turn), alternating with plain drains `--rounds` times; prints each drain and the cost of the
    /// median fair drain against the median plain one (fair queues: the built-in broker, Redis
    /// and PostgreSQL).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub fairness_keys: Option<u32>,
    /// Also drain the same tasks with concurrency keys spread over this many keys (`bench-k0` ..
    /// `bench-kN-1`, sent in turn), each limited to 10,000 at once (so the limit does not bind
    /// below that concurrency: the figure is the cost of taking, renewing and releasing the
    /// slots; a drain that parks a task fails), alternating
    /// with plain drains `--rounds` times; prints each drain and the cost of the median keyed
    /// drain against the median plain one (per-key concurrency: the built-in broker, Redis,
    /// PostgreSQL).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub concurrency_keys: Option<u32>,
    /// Plain and keyed drains alternated with `--fairness-keys` and with `--concurrency-keys`
    /// (the first plain drain is the usual one).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub rounds: u32,
    /// Store every task's result (SUCCESS) in the result backend, as the `worker` command does for
    /// a task sent without `ignore_result` (STARTED is not tracked); by default the tasks are sent
    /// with `ignore_result` and the drains store nothing. Round trips store results either way.
    #[arg(long)]
    pub store_results: bool,
    /// On `amqp://`, also measure a bare lapin publish (confirms, persistent) and consume (qos, ack)
    /// loop on the same server with the same messages: the ceiling a client library can reach.
    #[arg(long)]
    pub lapin_ceiling: bool,
}

fn line(name: &str, value: f64, unit: &str) {
    println!("{name} {} {unit}", (value * 1000.0).round() / 1000.0);
}

/// A bare lapin loop on the same server with the same messages (Celery's headers and body,
/// persistent): publish `n` copies with confirms (pipelined in batches of 1000), then consume them
/// with prefetch `prefetch` and one ack each; then again without acks (`no_ack`), the rate at which
/// RabbitMQ hands these messages out at all.
async fn lapin_ceiling(url: &str, n: usize, msg: &celery_core::protocol::Message, prefetch: u16) -> anyhow::Result<()> {
    use futures::StreamExt;
    use lapin::options::*;
    use lapin::types::FieldTable;
    let conn = broker_backends::amqp::connect(url).await?;
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    let q = "bench.lapin";
    ch.queue_declare(q.into(), QueueDeclareOptions::durable(), FieldTable::default()).await?;
    let props = broker_backends::amqp::properties(msg);
    let fill = || async {
        ch.queue_purge(q.into(), QueuePurgeOptions::default()).await?;
        let t = Instant::now();
        let mut left = n;
        while left > 0 {
            let mut pending = Vec::with_capacity(1000);
            for _ in 0..left.min(1000) {
                let opts = BasicPublishOptions::default();
                pending.push(ch.basic_publish("".into(), q.into(), opts, &msg.body, props.clone()).await?);
            }
            left -= pending.len();
            for p in pending {
                p.await?;
            }
        }
        anyhow::Ok(n as f64 / t.elapsed().as_secs_f64())
    };
    line("lapin_enqueue_rate", fill().await?, "msgs/s");
    for no_ack in [false, true] {
        if no_ack {
            fill().await?;
        }
        let cch = conn.create_channel().await?;
        cch.basic_qos(prefetch, BasicQosOptions::default()).await?;
        let opts = BasicConsumeOptions { no_ack, ..Default::default() };
        let mut consumer = cch.basic_consume(q.into(), "".into(), opts, FieldTable::default()).await?;
        let t = Instant::now();
        for _ in 0..n {
            let d = consumer.next().await.ok_or_else(|| anyhow::anyhow!("consumer ended"))??;
            if !no_ack {
                d.ack(BasicAckOptions::default()).await?;
            }
        }
        let name = if no_ack { "lapin_drain_rate_no_ack" } else { "lapin_drain_rate" };
        line(name, n as f64 / t.elapsed().as_secs_f64(), "msgs/s");
        cch.close(200, "bench done".into()).await?;
    }
    conn.close(200, "bench done".into()).await?;
    Ok(())
}

/// Runs the benchmark against `app`'s broker and backend.
pub async fn run(app: App, a: BenchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        celery_core::registry::lookup(&a.task).is_some(),
        "task `{}` is not registered in this binary (the demo's `add` is)",
        a.task
    );
    let queues: Vec<String> =
        if a.queues <= 1 { vec![a.queue.clone()] } else { (0..a.queues).map(|i| format!("{}.{i}", a.queue)).collect() };
    let queue_of = |i: usize| queues[i % queues.len()].as_str();
    let sig = |i: usize| {
        let s = match a.sleep_ms {
            Some(ms) => Signature::by_name("sleep").args(serde_json::json!([ms])),
            None => Signature::by_name(&a.task).args(serde_json::json!([i, i])),
        };
        s.queue(queue_of(i)).ignore_result(!a.store_results)
    };
    let purge_all = || async {
        let mut purged = std::pin::pin!(crate::cli::queues::purge_all(&app, &queues));
        while let Some((_, n)) = purged.next().await {
            n?;
        }
        anyhow::Ok(())
    };
    purge_all().await?;

    // Enqueue, one message per call.
    let single = (a.count / 10).max(1);
    let t = Instant::now();
    for i in 0..single {
        app.send(sig(i)).await?;
    }
    line("enqueue_rate_single", single as f64 / t.elapsed().as_secs_f64(), "tasks/s");
    purge_all().await?;

    // Enqueue in batches.
    let t = Instant::now();
    let mut sent = 0;
    while sent < a.count {
        let n = a.batch.max(1).min(a.count - sent);
        app.send_batch((sent..sent + n).map(sig)).await?;
        sent += n;
    }
    line("enqueue_rate", a.count as f64 / t.elapsed().as_secs_f64(), "tasks/s");

    // Drain with one worker in this process, under a name of its own: a worker named like one
    // whose heartbeat was seen a moment ago (the last bench's) first waits to tell a dead run from
    // a live one (seconds that a drain figure must not include).
    let defaults = WorkerConfig::default();
    let cfg = WorkerConfig {
        hostname: format!("bench.{}.{}", std::process::id(), defaults.hostname),
        queues: queues.clone(),
        concurrency: a.concurrency,
        prefetch_multiplier: 4,
        track_started: false,
        shutdown_grace: Duration::from_secs(10),
        ..defaults
    };
    let worker = Worker::new(app.clone(), cfg.clone());
    let stats = worker.stats();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let t = Instant::now();
    let handle = tokio::spawn(worker.run_until(async {
        let _ = stop_rx.await;
    }));
    let rss_before = rss_mib().1;
    let (wall, rss_peak) = wait_drained(&stats, a.count as u64, a.sleep_ms.is_some(), t).await?;
    let drain_rate = a.count as f64 / wall;
    line("drain_rate", drain_rate, "tasks/s");
    if a.sleep_ms.is_some() {
        let in_flight = a.concurrency.min(a.count).max(1) as f64;
        line("drain_wall_s", wall, "s");
        line("drain_peak_rss_mib", rss_peak, "MiB");
        line("rss_per_inflight_task_bytes", (rss_peak - rss_before).max(0.0) * 1024.0 * 1024.0 / in_flight, "bytes");
    }
    let failed = stats.failed.load(Ordering::Relaxed) + stats.rejected.load(Ordering::Relaxed);
    anyhow::ensure!(failed == 0, "{failed} benchmark tasks failed");

    // Plain and fair drains in turn, each enqueued with no worker running.
    let (stop_tx, handle) = match a.fairness_keys {
        None => (stop_tx, handle),
        Some(keys) => {
            app.broker().require_fair_queues("bench --fairness-keys")?;
            let fair = |i: usize| sig(i).fairness_key(format!("k{}", i % keys as usize));
            let variant = Variant { name: "fairness_keys", cfg: &cfg, sig: &fair };
            alternate(&app, &a, (&cfg, &sig), variant, drain_rate, (stop_tx, handle)).await?
        }
    };
    // Plain and keyed drains in turn, each enqueued with no worker running.
    let (stop_tx, handle) = match a.concurrency_keys {
        None => (stop_tx, handle),
        Some(keys) => {
            app.broker().require_key_slots("bench --concurrency-keys")?;
            // The highest limit: above the worker's concurrency plus the releases on their way.
            let limit = celery_core::flow::validate_limit(MAX_KEY_LIMIT)?;
            let keyed_cfg = WorkerConfig {
                key_limits: vec![celery_core::flow::KeyLimit { pattern: "bench-k*".into(), limit }],
                ..cfg.clone()
            };
            let keyed = |i: usize| sig(i).concurrency_key(format!("bench-k{}", i % keys as usize));
            let variant = Variant { name: "concurrency_keys", cfg: &keyed_cfg, sig: &keyed };
            alternate(&app, &a, (&cfg, &sig), variant, drain_rate, (stop_tx, handle)).await?
        }
    };
    round_trips(&app, &a, queue_of(0), stop_tx, handle).await?;
    if a.lapin_ceiling {
        let url = app
            .broker_url()
            .filter(|u| u.scheme().starts_with("amqp"))
            .ok_or_else(|| anyhow::anyhow!("--lapin-ceiling needs an amqp:// broker"))?
            .expose_secret()
            .to_owned();
        let msg = celery_core::protocol::Message::from_signature(&sig(0))?;
        lapin_ceiling(&url, a.count, &msg, (a.concurrency * 4).min(u16::MAX as usize) as u16).await?;
    }
    Ok(())
}

/// A drain to compare with the plain one: its name in the printed lines, its worker's config and
/// the task it sends for each index.
struct Variant<'a> {
    name: &'a str,
    cfg: &'a WorkerConfig,
    sig: &'a dyn Fn(usize) -> Signature,
}

/// A running bench worker: its stop and its handle.
type Running = (tokio::sync::oneshot::Sender<()>, tokio::task::JoinHandle<Result<(), crate::WorkerError>>);

/// Drains `variant`'s tasks and the plain ones (`plain`: config and task) in turn, `a.rounds`
/// times (the plain drain already run, at `first_plain` tasks/s, is the first plain round; the
/// machine's noise drifts, so each variant drain sits between plain ones), each enqueued with no
/// worker running and drained by a new worker; prints each drain, the medians and the variant's
/// cost against the plain median. Returns the last worker, still running.
async fn alternate(
    app: &App,
    a: &BenchArgs,
    plain: (&WorkerConfig, &dyn Fn(usize) -> Signature),
    variant: Variant<'_>,
    first_plain: f64,
    running: Running,
) -> anyhow::Result<Running> {
    let name = variant.name;
    let (mut plain_rates, mut variant_rates) = (vec![first_plain], Vec::new());
    let (mut stop, mut worker) = running;
    for round in 0..a.rounds {
        if round > 0 {
            stop_worker(stop, worker).await?;
            let (rate, s, h) = drain_fresh(app, plain.0, &format!("{name}_plain_round{round}"), a, plain.1).await?;
            line(&format!("drain_rate_round{round}"), rate, "tasks/s");
            plain_rates.push(rate);
            (stop, worker) = (s, h);
        }
        stop_worker(stop, worker).await?;
        let (rate, s, h) = drain_fresh(app, variant.cfg, &format!("{name}_round{round}"), a, variant.sig).await?;
        line(&format!("drain_rate_{name}_round{round}"), rate, "tasks/s");
        variant_rates.push(rate);
        (stop, worker) = (s, h);
    }
    let (plain, keyed) = (median(&mut plain_rates), median(&mut variant_rates));
    line("drain_rate_median", plain, "tasks/s");
    line(&format!("drain_rate_{name}_median"), keyed, "tasks/s");
    line(&format!("{name}_cost_pct"), (1.0 - keyed / plain) * 100.0, "%");
    Ok((stop, worker))
}

/// Stops a bench worker and waits for it.
async fn stop_worker(
    stop: tokio::sync::oneshot::Sender<()>,
    worker: tokio::task::JoinHandle<Result<(), crate::WorkerError>>,
) -> anyhow::Result<()> {
    let _ = stop.send(());
    worker.await??;
    Ok(())
}

/// Enqueues `a.count` tasks made by `sig` with no worker running (printing the rate as
/// `enqueue_rate_<label>`), then drains them with a new worker of `cfg` named `<label>.<cfg's
/// name>` (a name no earlier drain used): the drain rate, and the running worker (its stop and
/// its handle).
async fn drain_fresh(
    app: &App,
    cfg: &WorkerConfig,
    label: &str,
    a: &BenchArgs,
    sig: &dyn Fn(usize) -> Signature,
) -> anyhow::Result<(f64, tokio::sync::oneshot::Sender<()>, tokio::task::JoinHandle<Result<(), crate::WorkerError>>)> {
    let (mut sent, t) = (0, Instant::now());
    while sent < a.count {
        let n = a.batch.max(1).min(a.count - sent);
        app.send_batch((sent..sent + n).map(sig)).await?;
        sent += n;
    }
    line(&format!("enqueue_rate_{label}"), a.count as f64 / t.elapsed().as_secs_f64(), "tasks/s");
    let cfg = WorkerConfig { hostname: format!("{label}.{}", cfg.hostname), ..cfg.clone() };
    let worker = Worker::new(app.clone(), cfg);
    let stats = worker.stats();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let t = Instant::now();
    let handle = tokio::spawn(worker.run_until(async {
        let _ = stopped.await;
    }));
    let (wall, _) = wait_drained(&stats, a.count as u64, false, t).await?;
    let failed = stats.failed.load(Ordering::Relaxed) + stats.rejected.load(Ordering::Relaxed);
    anyhow::ensure!(failed == 0, "{failed} benchmark tasks failed");
    let parked = stats.parked.load(Ordering::Relaxed);
    anyhow::ensure!(parked == 0, "{parked} benchmark tasks were parked (the key limit bound)");
    Ok((a.count as f64 / wall, stop, handle))
}

/// The median of `v` (sorted in place; 0 when empty).
fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// Waits until `stats` counts `count` finished tasks (at most 10 minutes): the wall time since
/// `t` and the peak RSS seen (sampled when `sample_rss`).
async fn wait_drained(
    stats: &crate::WorkerStats,
    count: u64,
    sample_rss: bool,
    t: Instant,
) -> anyhow::Result<(f64, f64)> {
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut rss_peak = rss_mib().1;
    let mut polls = 0u64;
    while stats.finished() < count {
        anyhow::ensure!(Instant::now() < deadline, "drain did not finish within 10 minutes");
        tokio::time::sleep(Duration::from_millis(1)).await;
        polls += 1;
        if sample_rss && polls.is_multiple_of(10) {
            rss_peak = rss_peak.max(rss_mib().1);
        }
    }
    Ok((t.elapsed().as_secs_f64(), rss_peak))
}

/// Times `--roundtrips` `send(add).get()` through the running worker, then stops it.
async fn round_trips(
    app: &App,
    a: &BenchArgs,
    queue: &str,
    stop: tokio::sync::oneshot::Sender<()>,
    worker: tokio::task::JoinHandle<Result<(), crate::WorkerError>>,
) -> anyhow::Result<()> {
    let mut lat = Vec::with_capacity(a.roundtrips);
    let warmup = if a.roundtrips == 0 { 0 } else { 20 };
    for i in 0..(a.roundtrips + warmup) {
        let t = Instant::now();
        let res = app.send(Signature::by_name(&a.task).args(serde_json::json!([1, 2])).queue(queue)).await?;
        let v: i64 = res.get(Duration::from_secs(30)).await?;
        anyhow::ensure!(v == 3, "round trip returned {v}");
        if i >= warmup {
            lat.push(t.elapsed().as_secs_f64() * 1e3);
        }
        res.forget().await?;
    }
    let _ = stop.send(());
    worker.await??;
    lat.sort_by(f64::total_cmp);
    if !lat.is_empty() {
        line("roundtrip_p50_ms", lat[lat.len() / 2], "ms");
        line("roundtrip_p99_ms", lat[((lat.len() - 1) as f64 * 0.99) as usize], "ms");
    }
    Ok(())
}

/// `broker bench` options.
#[derive(Debug, Args)]
pub struct AppendArgs {
    /// A scratch directory (emptied first).
    #[arg(long, default_value = "./bench-data")]
    pub data: String,
    /// Records per measurement.
    #[arg(short = 'n', long, default_value_t = 1_000_000)]
    pub records: usize,
    /// Payload bytes per record.
    #[arg(long, default_value_t = 100)]
    pub size: usize,
    /// Concurrent publishers for the group-commit figure.
    #[arg(long, default_value_t = 64)]
    pub publishers: usize,
    /// Records per append call in the batched figures.
    #[arg(long, default_value_t = 1000)]
    pub batch: usize,
    /// Also leave this many records in a queue, reopen it, consume a few, and report peak memory.
    #[arg(long, default_value_t = 0)]
    pub backlog: usize,
}

/// Peak and current resident memory of this process, in MiB (Linux).
fn rss_mib() -> (f64, f64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .map(|kb| kb / 1024.0)
            .unwrap_or(0.0)
    };
    (field("VmHWM:"), field("VmRSS:"))
}

/// Appends `count` records in batches of `batch` from `publishers` concurrent tasks.
async fn append_rate(
    url: &str,
    queue: &str,
    count: usize,
    size: usize,
    publishers: usize,
    batch: usize,
) -> anyhow::Result<f64> {
    use broker_backends::log::{parse_url, LogStore, NewRecord};
    let (dir, cfg) = parse_url(url)?;
    let store = LogStore::open(&dir, cfg)?;
    let per = count / publishers.max(1);
    let t = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..publishers.max(1) {
        let (store, queue) = (store.clone(), queue.to_owned());
        tasks.push(tokio::spawn(async move {
            let mut done = 0;
            while done < per {
                let n = batch.min(per - done);
                let recs = (0..n).map(|_| NewRecord { payload: vec![b'x'; size], ..NewRecord::default() }).collect();
                store.append(&queue, recs).await?;
                done += n;
            }
            Ok::<_, broker_backends::log::LogError>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok((per * publishers.max(1)) as f64 / t.elapsed().as_secs_f64())
}

/// Runs the append benchmark: each fsync policy, batched from one publisher and record by record
/// from many concurrent publishers (group commit).
pub async fn append(a: &AppendArgs) -> anyhow::Result<()> {
    let _ = std::fs::remove_dir_all(&a.data);
    let url = |fsync: &str| format!("log://{}?fsync={fsync}", a.data);
    let n = a.records;
    for fsync in ["os", "10", "always"] {
        let q = format!("batched-{fsync}");
        line(
            &format!("append_batched_fsync_{fsync}"),
            append_rate(&url(fsync), &q, n, a.size, 1, a.batch).await?,
            "records/s",
        );
    }
    for fsync in ["os", "always"] {
        let q = format!("concurrent-{fsync}");
        let count = if fsync == "always" { n / 5 } else { n / 2 };
        line(
            &format!("append_{}_publishers_fsync_{fsync}", a.publishers),
            append_rate(&url(fsync), &q, count, a.size, a.publishers, 1).await?,
            "records/s",
        );
    }
    if a.backlog > 0 {
        backlog(a).await?;
    }
    let _ = std::fs::remove_dir_all(&a.data);
    Ok(())
}

/// Fills a queue with `backlog` records, reopens the directory (recovery) and consumes a few,
/// reporting memory: it must not grow with the number of records waiting.
async fn backlog(a: &AppendArgs) -> anyhow::Result<()> {
    use celery_core::Broker;
    let url = format!("log://{}?fsync=os", a.data);
    let (_, before) = rss_mib();
    let t = Instant::now();
    append_rate(&url, "backlog", a.backlog, a.size, 1, 10_000).await?;
    line("backlog_fill_seconds", t.elapsed().as_secs_f64(), "s");
    let t = Instant::now();
    let broker = broker_backends::log::LogBroker::connect(&url).await?;
    line("backlog_reopen_seconds", t.elapsed().as_secs_f64(), "s");
    line("backlog_queued", broker.queue_len("backlog").await? as f64, "records");
    let mut consumer = broker.consume(&["backlog".to_string()], 100).await?;
    for _ in 0..1000 {
        if let Some(d) = consumer.next().await {
            d.ack().await?;
        }
    }
    let (peak, now) = rss_mib();
    line("backlog_rss_before_mib", before, "MiB");
    line("backlog_rss_now_mib", now, "MiB");
    line("backlog_rss_peak_mib", peak, "MiB");
    Ok(())
}

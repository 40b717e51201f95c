//! The chaos soak: proves that nothing the built-in broker acknowledged is lost (issue 13).
//!
//! ```text
//! scripts/soak 200000                                   # builds in release, then runs this
//! target/release/examples/soak 20000 --seed 42          # the same, by hand (finds `demo` beside itself)
//! ```
//!
//! It starts `demo broker serve` on a fresh data directory, an in-process TCP proxy in front of it,
//! and two `demo worker` processes whose broker and result backend are `log+tcp://` the proxy. It
//! sends N `record(path, "<i>")` tasks with the ids `soak-<seed>-<i>` in batches, paced over time,
//! while a chaos loop (a seeded RNG, one action every 1-3 s) kill -9s a worker and restarts it,
//! kill -9s the server and restarts it on the same directory, or cuts every live connection through
//! the proxy. Nobody is told: the workers and the producer reconnect by themselves.
//!
//! A send that returns OK counts as confirmed; a send that fails after the producer's own retries
//! is not retried here and counts as not confirmed (the message may still have been stored). After
//! the sends the chaos stops, and the driver waits until every confirmed task has a result (or
//! until `--idle-secs` pass without progress). Then it reads each confirmed task's result: it must
//! be SUCCESS with the value `"<i>"` of its own id (a result that is missing, not ready, another
//! state or another value is lost or wrong). `record` appends its token to one file per run, so
//! counting tokens counts executions: a task run twice (allowed: at-least-once after a kill) is
//! reported, not a failure.
//!
//! Prints `sent, confirmed, succeeded, lost, wrong, executed twice` and exits with 1 when anything
//! confirmed is lost or wrong. Every child process is killed on every way out (a guard kills them
//! on drop: errors, panics, SIGINT, SIGTERM, SIGHUP; only a kill -9 of the driver itself leaves
//! them running). The data directory, the execution record and the logs are kept on failure.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use celery_core::sync::lock;
use celery_core::{App, Signature, TaskMeta, TaskState};
use clap::Parser;
use futures::stream::{self, StreamExt};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// The command line.
#[derive(Debug, Parser)]
#[command(about = "Chaos soak: kill -9 workers and the broker, cut connections, then check every confirmed task")]
struct Args {
    /// Tasks to send.
    #[arg(default_value_t = 200_000)]
    tasks: u64,
    /// The chaos RNG's seed (default: from the clock); printed, so that a run can be repeated.
    #[arg(long)]
    seed: Option<u64>,
    /// Tasks sent per second (paced, so that the chaos meets the sends and the work).
    #[arg(long, default_value_t = 4000)]
    rate: u64,
    /// Tasks per `send_batch`.
    #[arg(long, default_value_t = 100)]
    batch: u64,
    /// Concurrency of each of the two workers.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Shortest pause between two chaos actions, in milliseconds.
    #[arg(long, default_value_t = 1000)]
    chaos_min_ms: u64,
    /// Longest pause between two chaos actions, in milliseconds.
    #[arg(long, default_value_t = 3000)]
    chaos_max_ms: u64,
    /// After the sends, give up waiting for results after this many seconds without progress.
    #[arg(long, default_value_t = 60)]
    idle_secs: u64,
    /// The `demo` binary (default: `demo` beside this program).
    #[arg(long)]
    demo: Option<PathBuf>,
    /// Where the data directory, the execution record and the logs go (default: a new temporary
    /// directory, deleted after a passing run).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Keep the directory after a passing run too.
    #[arg(long)]
    keep: bool,
    /// Log level of the workers (the server logs at `info`).
    #[arg(long, default_value = "warn")]
    worker_log: String,
}

/// The id of task `i` of a run.
fn task_id(seed: u64, i: u64) -> String {
    format!("soak-{seed}-{i}")
}

/// What task `i` records and returns: delimited, so that tokens can be counted even if two
/// processes' lines interleave.
fn token(i: u64) -> String {
    format!("<{i}>")
}

/// Seconds since the start, for log lines.
fn since(start: Instant) -> String {
    format!("{:7.1}s", start.elapsed().as_secs_f64())
}

/// The child processes: the server and the workers. Dropping it kills them all.
#[derive(Debug)]
struct Fleet {
    demo: PathBuf,
    dir: PathBuf,
    server_addr: SocketAddr,
    client_url: String,
    concurrency: usize,
    worker_log: String,
    server: Option<Child>,
    workers: Vec<Option<Child>>,
    starts: u64,
}

impl Fleet {
    fn log_file(&self, name: &str) -> anyhow::Result<File> {
        let path = self.dir.join(format!("{name}.log"));
        let mut f =
            OpenOptions::new().create(true).append(true).open(&path).with_context(|| path.display().to_string())?;
        writeln!(f, "=== soak: start {} ===", chrono::Utc::now().to_rfc3339())?;
        Ok(f)
    }

    fn spawn(&mut self, name: &str, args: &[&str]) -> anyhow::Result<Child> {
        let log = self.log_file(name)?;
        self.starts += 1;
        Command::new(&self.demo)
            .args(args)
            .env_remove("RUST_LOG")
            .env_remove("CELERY_BROKER_URL")
            .env_remove("CELERY_RESULT_BACKEND")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {} for {name}", self.demo.display()))
    }

    fn start_server(&mut self) -> anyhow::Result<()> {
        let data = self.dir.join("data");
        let (data, listen) = (data.display().to_string(), self.server_addr.to_string());
        let child = self.spawn("server", &["-l", "info", "broker", "serve", "--data", &data, "--listen", &listen])?;
        self.server = Some(child);
        Ok(())
    }

    fn start_worker(&mut self, i: usize) -> anyhow::Result<()> {
        let (url, c, host) =
            (self.client_url.clone(), self.concurrency.to_string(), format!("soak-{}@localhost", i + 1));
        let level = self.worker_log.clone();
        let args = ["-l", &level, "--broker", &url, "--backend", &url, "worker", "-c", &c, "-n", &host];
        let child = self.spawn(&format!("worker-{}", i + 1), &args)?;
        self.workers[i] = Some(child);
        Ok(())
    }

    fn kill_server(&mut self) {
        kill(&mut self.server);
    }

    fn kill_worker(&mut self, i: usize) {
        kill(&mut self.workers[i]);
    }

    /// The children that ended by themselves since the last look (not killed by the soak), each
    /// with how it ended and the last line of its log.
    fn reap(&mut self) -> Vec<String> {
        let mut ended = Vec::new();
        let dir = self.dir.clone();
        let mut check = |name: String, slot: &mut Option<Child>| {
            if let Some(status) = slot.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                let log = std::fs::read_to_string(dir.join(format!("{name}.log"))).unwrap_or_default();
                let last = log.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or_default();
                ended.push(format!("{name} ({status}; its log ends: {last})"));
                *slot = None;
            }
        };
        check("server".into(), &mut self.server);
        for (i, w) in self.workers.iter_mut().enumerate() {
            check(format!("worker-{}", i + 1), w);
        }
        ended
    }

    /// Starts whatever is not running.
    fn restart_missing(&mut self) -> anyhow::Result<()> {
        if self.server.is_none() {
            self.start_server()?;
        }
        for i in 0..self.workers.len() {
            if self.workers[i].is_none() {
                self.start_worker(i)?;
            }
        }
        Ok(())
    }

    fn kill_all(&mut self) {
        for w in &mut self.workers {
            kill(w);
        }
        kill(&mut self.server);
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        self.kill_all();
    }
}

/// kill -9 and reap.
fn kill(slot: &mut Option<Child>) {
    if let Some(mut c) = slot.take() {
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// Kills every child when the driver leaves, whichever way it leaves.
struct FleetGuard(Arc<Mutex<Fleet>>);

impl Drop for FleetGuard {
    fn drop(&mut self) {
        lock(&self.0).kill_all();
    }
}

/// Counters of the proxy.
#[derive(Debug, Default)]
struct ProxyStats {
    accepted: AtomicU64,
    refused: AtomicU64,
    live: AtomicU64,
}

/// Forwards every connection to `upstream` until a cut (a new value in `cut`) drops them all.
async fn proxy(listener: TcpListener, upstream: SocketAddr, cut: watch::Receiver<u64>, stats: Arc<ProxyStats>) {
    loop {
        let mut client = match listener.accept().await {
            Ok((c, _)) => c,
            Err(e) => {
                eprintln!("proxy: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        stats.accepted.fetch_add(1, Ordering::Relaxed);
        let mut cut = cut.clone();
        cut.borrow_and_update();
        let stats = stats.clone();
        tokio::spawn(async move {
            let mut server = match tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(upstream)).await {
                Ok(Ok(s)) => s,
                _ => {
                    // The server is down: the client sees its connection closed, as it would.
                    stats.refused.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            };
            let _ = client.set_nodelay(true);
            let _ = server.set_nodelay(true);
            stats.live.fetch_add(1, Ordering::Relaxed);
            tokio::select! {
                _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                _ = cut.changed() => {}
            }
            stats.live.fetch_sub(1, Ordering::Relaxed);
        });
    }
}

/// What the chaos loop did.
#[derive(Debug, Default)]
struct ChaosStats {
    worker_kills: u64,
    server_kills: u64,
    cuts: u64,
    /// Children that ended without being killed (then restarted), with how they ended.
    unexpected_exits: Vec<String>,
}

/// Every 1-3 s (seeded) one chaos action while `chaos_on`; restarts children that ended by
/// themselves all along; returns when `stop` turns true.
async fn chaos(
    fleet: Arc<Mutex<Fleet>>,
    cut: watch::Sender<u64>,
    mut rng: StdRng,
    pause: (u64, u64),
    chaos_on: watch::Receiver<bool>,
    start: Instant,
) -> anyhow::Result<ChaosStats> {
    let mut stats = ChaosStats::default();
    let mut next = Instant::now() + Duration::from_millis(rng.random_range(pause.0..=pause.1));
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        {
            let mut f = lock(&fleet);
            for ended in f.reap() {
                println!("{} {ended} ended by itself: restarting it", since(start));
                stats.unexpected_exits.push(ended);
            }
            f.restart_missing()?;
        }
        if !*chaos_on.borrow() {
            if chaos_on.has_changed().is_err() {
                return Ok(stats);
            }
            continue;
        }
        if Instant::now() < next {
            continue;
        }
        next = Instant::now() + Duration::from_millis(rng.random_range(pause.0..=pause.1));
        let action = rng.random_range(0..10u32);
        let mut f = lock(&fleet);
        match action {
            0..=3 => {
                let i = rng.random_range(0..f.workers.len());
                println!("{} chaos: kill -9 worker-{} and restart it", since(start), i + 1);
                f.kill_worker(i);
                f.start_worker(i)?;
                stats.worker_kills += 1;
            }
            4..=6 => {
                println!("{} chaos: kill -9 the server and restart it", since(start));
                f.kill_server();
                f.start_server()?;
                stats.server_kills += 1;
            }
            _ => {
                println!("{} chaos: cut every connection", since(start));
                cut.send_modify(|g| *g += 1);
                stats.cuts += 1;
            }
        }
    }
}

/// Polls until something accepts connections on `addr`.
async fn wait_listening(addr: SocketAddr, within: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    while TcpStream::connect(addr).await.is_err() {
        if Instant::now() > deadline {
            bail!("nothing listens on {addr} after {within:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

fn free_port() -> anyhow::Result<SocketAddr> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

/// What the producer saw.
#[derive(Debug, Default)]
struct Sent {
    confirmed: Vec<u64>,
    failed_batches: u64,
}

/// Sends `record(path, token(i))` for every i, `batch` at a time, at `rate` tasks per second.
async fn send_all(app: &App, args: &Args, seed: u64, record: &Path, start: Instant) -> Sent {
    let mut sent = Sent::default();
    let begin = Instant::now();
    let path = record.display().to_string();
    let mut i = 0;
    while i < args.tasks {
        let end = (i + args.batch.max(1)).min(args.tasks);
        let due = begin + Duration::from_secs_f64(i as f64 / args.rate.max(1) as f64);
        tokio::time::sleep_until(due.into()).await;
        let sigs =
            (i..end).map(|k| Signature::by_name("record").args(json!([path, token(k)])).task_id(task_id(seed, k)));
        match app.send_batch(sigs).await {
            Ok(_) => sent.confirmed.extend(i..end),
            Err(e) => {
                sent.failed_batches += 1;
                println!("{} send of tasks {i}..{end} failed (not confirmed): {e}", since(start));
            }
        }
        if end / 20_000 != i / 20_000 {
            println!("{} sent {end}, confirmed {}", since(start), sent.confirmed.len());
        }
        i = end;
    }
    sent
}

/// The stored results of these tasks. A read that fails is tried again (five times, 200 ms apart),
/// then counts as no result.
async fn results(app: &App, seed: u64, ids: &[u64]) -> Vec<(u64, Option<TaskMeta>)> {
    let read = |i: u64| async move {
        let id = task_id(seed, i);
        for _ in 0..5 {
            match app.backend().get(&id).await {
                Ok(meta) => return (i, meta),
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
        (i, None)
    };
    stream::iter(ids.iter().copied()).map(read).buffer_unordered(256).collect().await
}

/// Waits until every task of `ids` has a ready result, or `idle` passes without one more.
async fn wait_results(app: &App, seed: u64, ids: &[u64], idle: Duration, start: Instant) -> usize {
    let mut pending = ids.to_vec();
    let mut last_progress = Instant::now();
    let mut last_print = Instant::now();
    loop {
        let before = pending.len();
        let ready: std::collections::HashSet<u64> = results(app, seed, &pending)
            .await
            .into_iter()
            .filter(|(_, m)| m.as_ref().is_some_and(|m| m.status.is_ready()))
            .map(|(i, _)| i)
            .collect();
        pending.retain(|i| !ready.contains(i));
        if pending.is_empty() {
            return 0;
        }
        if pending.len() < before {
            last_progress = Instant::now();
        }
        if last_progress.elapsed() > idle {
            println!("{} no new result for {idle:?}: {} confirmed tasks still have none", since(start), pending.len());
            return pending.len();
        }
        if last_print.elapsed() > Duration::from_secs(5) {
            println!("{} waiting for {} results", since(start), pending.len());
            last_print = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// How often each task ran, from the tokens `record` appended; and the bytes that were no token.
fn executions(path: &Path, tasks: u64) -> anyhow::Result<(Vec<u32>, u64)> {
    let mut runs = vec![0u32; tasks as usize];
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e).with_context(|| path.display().to_string()),
    };
    let mut garbled = 0;
    for piece in text.split('<').skip(1) {
        match piece.split_once('>').and_then(|(n, _)| n.parse::<u64>().ok()) {
            Some(i) if i < tasks => runs[i as usize] += 1,
            _ => garbled += 1,
        }
    }
    Ok((runs, garbled))
}

async fn run(args: Args) -> anyhow::Result<bool> {
    let start = Instant::now();
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(1)
    });
    anyhow::ensure!(args.chaos_min_ms <= args.chaos_max_ms, "--chaos-min-ms is over --chaos-max-ms");
    let demo = match &args.demo {
        Some(d) => d.clone(),
        None => std::env::current_exe()?.with_file_name("demo"),
    };
    anyhow::ensure!(demo.is_file(), "no demo binary at {} (build it: cargo build --example demo)", demo.display());
    let dir = match &args.dir {
        Some(d) => d.clone(),
        None => std::env::temp_dir().join(format!("celery-soak-{seed}")),
    };
    std::fs::create_dir_all(&dir).with_context(|| dir.display().to_string())?;
    let dir = dir.canonicalize()?;
    let record = dir.join("executions.txt");
    let _ = std::fs::remove_file(&record);

    let server_addr = free_port()?;
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let proxy_addr = listener.local_addr()?;
    let client_url = format!("log+tcp://{proxy_addr}");
    println!(
        "soak: {} tasks, seed {seed}, {} tasks/s, batches of {}, 2 workers x {}, chaos every {}-{} ms",
        args.tasks, args.rate, args.batch, args.concurrency, args.chaos_min_ms, args.chaos_max_ms
    );
    println!(
        "soak: server 127.0.0.1:{}, clients through the proxy {client_url}, files in {}",
        server_addr.port(),
        dir.display()
    );

    let (cut_tx, cut_rx) = watch::channel(0u64);
    let proxy_stats = Arc::new(ProxyStats::default());
    let proxy_task = tokio::spawn(proxy(listener, server_addr, cut_rx, proxy_stats.clone()));

    let fleet = Arc::new(Mutex::new(Fleet {
        demo,
        dir: dir.clone(),
        server_addr,
        client_url: client_url.clone(),
        concurrency: args.concurrency,
        worker_log: args.worker_log.clone(),
        server: None,
        workers: vec![None, None],
        starts: 0,
    }));
    let _guard = FleetGuard(fleet.clone());
    lock(&fleet).start_server()?;
    wait_listening(server_addr, Duration::from_secs(30)).await?;
    lock(&fleet).restart_missing()?;
    let app = celery_worker::connect(&client_url, &client_url).await.context("the producer cannot connect")?;

    let (chaos_on_tx, chaos_on_rx) = watch::channel(true);
    let rng = StdRng::seed_from_u64(seed);
    let pause = (args.chaos_min_ms, args.chaos_max_ms);
    let chaos_task = tokio::spawn(chaos(fleet.clone(), cut_tx, rng, pause, chaos_on_rx, start));

    let sent = send_all(&app, &args, seed, &record, start).await;
    println!("{} sends done: chaos stops; waiting for results", since(start));
    chaos_on_tx.send_replace(false);
    let unfinished = wait_results(&app, seed, &sent.confirmed, Duration::from_secs(args.idle_secs), start).await;

    // Read everything back once the workers are idle: a SUCCESS that was overwritten shows here.
    let metas = results(&app, seed, &sent.confirmed).await;
    let (runs, garbled) = executions(&record, args.tasks)?;
    let mut succeeded = 0u64;
    let mut lost = Vec::new();
    let mut wrong = Vec::new();
    for (i, meta) in &metas {
        match meta {
            Some(m) if m.status == TaskState::Success && m.result == Value::String(token(*i)) => {
                if runs[*i as usize] == 0 {
                    wrong.push(format!("{}: SUCCESS but never recorded as run", task_id(seed, *i)));
                } else {
                    succeeded += 1;
                }
            }
            Some(m) if m.status.is_ready() => wrong.push(format!(
                "{}: {} {} (expected SUCCESS {:?})",
                task_id(seed, *i),
                m.status,
                m.result,
                token(*i)
            )),
            Some(m) => lost.push(format!("{}: still {} after the wait", task_id(seed, *i), m.status)),
            None => lost.push(format!("{}: no result", task_id(seed, *i))),
        }
    }
    let confirmed: std::collections::HashSet<u64> = sent.confirmed.iter().copied().collect();
    let twice = runs.iter().filter(|&&n| n >= 2).count();
    let max_runs = runs.iter().copied().max().unwrap_or(0);
    let total_runs: u64 = runs.iter().map(|&n| u64::from(n)).sum();
    let unconfirmed_ran = (0..args.tasks).filter(|i| !confirmed.contains(i) && runs[*i as usize] > 0).count();
    let dead = app.broker().queue_len("celery.dead").await.map(|n| n.to_string()).unwrap_or_else(|_| "0".into());
    let waiting = app.broker().queue_len("celery").await.map(|n| n.to_string()).unwrap_or_else(|e| e.to_string());

    chaos_on_tx.send_replace(false);
    drop(chaos_on_tx);
    let chaos_stats = chaos_task.await.context("the chaos loop panicked")??;
    proxy_task.abort();
    lock(&fleet).kill_all();

    println!("---");
    println!("seed            {seed}");
    println!("elapsed         {:.1} s", start.elapsed().as_secs_f64());
    println!(
        "chaos           {} worker kills, {} server kills, {} connection cuts; {} process starts; {} proxied connections ({} while the server was down)",
        chaos_stats.worker_kills,
        chaos_stats.server_kills,
        chaos_stats.cuts,
        lock(&fleet).starts,
        proxy_stats.accepted.load(Ordering::Relaxed),
        proxy_stats.refused.load(Ordering::Relaxed)
    );
    if !chaos_stats.unexpected_exits.is_empty() {
        println!("ended by itself {} (restarted; why: in the lines above)", chaos_stats.unexpected_exits.len());
    }
    println!("sent            {}", args.tasks);
    println!(
        "confirmed       {} ({} batches failed after the producer's retries)",
        sent.confirmed.len(),
        sent.failed_batches
    );
    println!("succeeded       {succeeded}");
    println!("lost            {}", lost.len());
    println!("wrong           {}", wrong.len());
    println!("executed twice  {twice} (most runs of one task: {max_runs}; {total_runs} runs in all)");
    println!("unconfirmed ran {unconfirmed_ran} (sends that failed but whose task was stored and ran)");
    println!("queue left      {waiting} waiting, {dead} dead-lettered");
    if garbled > 0 {
        println!("garbled tokens  {garbled} in {}", record.display());
    }
    for line in lost.iter().chain(&wrong).take(20) {
        println!("  {line}");
    }
    let ok = lost.is_empty() && wrong.is_empty() && unfinished == 0 && !sent.confirmed.is_empty();
    if sent.confirmed.is_empty() {
        println!("FAIL: no send was confirmed");
    }
    if ok {
        println!("PASS: every confirmed task succeeded once or more with its own value");
        if !args.keep {
            let _ = std::fs::remove_dir_all(&dir);
        }
    } else {
        println!("FAIL: data, execution record and logs kept in {}", dir.display());
    }
    Ok(ok)
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    tokio::select! {
        r = run(args) => match r {
            Ok(true) => ExitCode::SUCCESS,
            Ok(false) => ExitCode::FAILURE,
            Err(e) => {
                eprintln!("soak error: {e:#}");
                ExitCode::from(2)
            }
        },
        signal = interrupted() => {
            eprintln!("soak: {signal}: killing the children");
            ExitCode::from(130)
        }
    }
}

/// Resolves on SIGINT, SIGTERM or SIGHUP (so that `timeout` and closed terminals kill the children
/// too), naming it.
async fn interrupted() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut int), Ok(mut term), Ok(mut hup)) =
        (signal(SignalKind::interrupt()), signal(SignalKind::terminate()), signal(SignalKind::hangup()))
    else {
        let _ = tokio::signal::ctrl_c().await;
        return "SIGINT";
    };
    tokio::select! {
        _ = int.recv() => "SIGINT",
        _ = term.recv() => "SIGTERM",
        _ = hup.recv() => "SIGHUP",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn executions_count_tokens_even_when_lines_interleave() {
        let path = std::env::temp_dir().join(format!("soak-executions-{}", std::process::id()));
        // Two processes' `<token>` and `\n` writes interleaved; a torn token; one out of range.
        std::fs::write(&path, "<0>\n<1><2>\n\n<1>\n<3\n<7>\n<2>").unwrap();
        let (runs, garbled) = executions(&path, 4).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(runs, vec![1, 2, 2, 0]);
        assert_eq!(garbled, 2, "`<3` without its end and `<7>` of no task");
        let (runs, garbled) = executions(&path, 2).unwrap();
        assert_eq!((runs, garbled), (vec![0, 0], 0), "no file: nothing ran");
    }

    /// An echo server on a free loopback port.
    async fn echo_server() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        addr
    }

    async fn start_proxy(upstream: SocketAddr) -> (SocketAddr, watch::Sender<u64>, Arc<ProxyStats>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (cut, rx) = watch::channel(0);
        let stats = Arc::new(ProxyStats::default());
        tokio::spawn(proxy(listener, upstream, rx, stats.clone()));
        (addr, cut, stats)
    }

    async fn round_trip(s: &mut TcpStream) {
        s.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut buf)).await.unwrap().unwrap();
        assert_eq!(&buf, b"ping");
    }

    /// Resolves when the peer closed the connection (EOF or reset), failing after 5 s.
    async fn closed(s: &mut TcpStream) {
        let mut buf = [0u8; 16];
        match tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {}
            other => panic!("the connection is still open: {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_cut_closes_every_live_connection_and_the_proxy_serves_on() {
        let (addr, cut, stats) = start_proxy(echo_server().await).await;
        let mut a = TcpStream::connect(addr).await.unwrap();
        let mut b = TcpStream::connect(addr).await.unwrap();
        round_trip(&mut a).await;
        round_trip(&mut b).await;
        assert_eq!(stats.live.load(Ordering::Relaxed), 2);
        cut.send_modify(|g| *g += 1);
        closed(&mut a).await;
        closed(&mut b).await;
        let mut c = TcpStream::connect(addr).await.unwrap();
        round_trip(&mut c).await;
        assert_eq!(stats.accepted.load(Ordering::Relaxed), 3);
    }

    #[tokio::test]
    async fn a_client_of_a_server_that_is_down_is_closed() {
        let (addr, _cut, stats) = start_proxy(free_port().unwrap()).await;
        let mut a = TcpStream::connect(addr).await.unwrap();
        closed(&mut a).await;
        assert_eq!(stats.refused.load(Ordering::Relaxed), 1);
    }
}

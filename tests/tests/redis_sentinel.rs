//! Redis behind Sentinel losing its master under load, with real worker processes: two `demo`
//! workers and a producer (this process) use the `sentinel://` URL of `scripts/cluster sentinel`
//! for the broker and the result backend, with `min_replicas=1`; the master is killed with
//! `kill -9` while `record` tasks flow. Checked: every send that returned OK runs at least once
//! (its token is in the record file), sends succeed again within [`SENDS_AGAIN`], both workers
//! keep running, logged the switch to the new master and consume again (their own `stats`, asked
//! over remote control after the failover, count tasks run after the kill). Duplicates are
//! allowed (at least once) and printed. The same run without `min_replicas` records (prints) how
//! many acknowledged sends the dead master took with it; and `min_replicas` above the replicas
//! there are is a retryable error.
//!
//! The setup is shared with other tests (held by the harness's lock while this runs): keys carry
//! a unique prefix, and the killed node is started again at the end (as a replica).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use broker_backends::redis::RedisConn;
use celery_core::Signature;
use celery_tests::cluster::{self, produce, recorded, runs_within, unique, Sends, Sentinel};
use celery_tests::{DemoProcess, TempDir};
use redis::AsyncCommands;
use serde_json::json;
use tokio::task::block_in_place;

/// The whole file, a cold setup boot and a node restart included.
const FILE_BOUND: Duration = Duration::from_secs(600);
/// How long after the kill sends may keep failing (Sentinel promotes after 2 s plus an election).
const SENDS_AGAIN: Duration = Duration::from_secs(60);
/// One send's bound (a send that takes longer counts as failed).
const SEND_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the workers may take to run everything that was sent.
const DRAIN: Duration = Duration::from_secs(120);
/// Sends that returned OK before the kill, and after sends work again.
const BEFORE: usize = 60;
const AFTER: usize = 60;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_master_loses_no_acknowledged_send_and_stalls_no_worker() {
    kill_the_master_under_load(true).await;
}

/// Without `min_replicas` a send returns once the master has it: what the master had not yet
/// passed to a replica when it died is lost. Recorded (printed), not asserted; everything else
/// (sends again, workers alive and consuming) holds as with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_min_replicas_the_loss_window_is_recorded() {
    kill_the_master_under_load(false).await;
}

/// `min_replicas` above the replicas there are: the write is refused as retryable (the master
/// may hold it alone), and with as many as there are it passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_few_replicas_is_a_retryable_error() {
    cluster::bound_run_time("redis_sentinel", FILE_BOUND);
    let Some(sentinel) = block_in_place(Sentinel::up) else { return };
    let url = |n: u32| format!("{}&min_replicas={n}&min_replicas_timeout=200", sentinel.broker_url(0));
    let key = unique("sntl-wait");
    let push = || {
        let mut pipe = redis::pipe();
        pipe.rpush(&key, "x").ignore();
        pipe
    };
    let three = RedisConn::open(&url(3)).await.expect("connect through the sentinels");
    let e = three.write(push(), "test: push").await.expect_err("3 replicas asked for, 2 exist");
    assert!(e.is_retryable() && (e.to_string().contains("0 of the 3") || e.to_string().contains("2 of the 3")), "{e}");
    let two = RedisConn::open(&url(2)).await.expect("connect through the sentinels");
    two.write(push(), "test: push").await.expect("both replicas acknowledge");
    let mut conn = two.clone();
    assert_eq!(conn.llen::<_, u64>(&key).await.expect("LLEN"), 2, "both writes are on the master");
    let _: () = conn.del(&key).await.expect("DEL");
}

/// Concurrent writers with `min_replicas=1` share their `WAIT`s (one confirms every earlier write
/// of the connection): 200 writes at once, every one confirmed, take far fewer `WAIT`s than writes
/// (counted on the master: `INFO commandstats`; the setup is this test's alone while it runs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writes_share_their_waits() {
    cluster::bound_run_time("redis_sentinel", FILE_BOUND);
    let Some(sentinel) = block_in_place(Sentinel::up) else { return };
    let master = sentinel.current_master().expect("the sentinels agree on a master");
    let waits = || {
        let mut c = sentinel.node_conn(master).expect("the master answers");
        let info: String = redis::cmd("INFO").arg("commandstats").query(&mut c).expect("INFO commandstats");
        info.lines()
            .find_map(|l| l.strip_prefix("cmdstat_wait:calls="))
            .and_then(|rest| rest.split(',').next())
            .map_or(0, |n| n.parse::<u64>().expect("a count"))
    };
    let url = format!("{}&min_replicas=1&min_replicas_timeout=2000", sentinel.broker_url(0));
    let conn = RedisConn::open(&url).await.expect("connect through the sentinels");
    let key = unique("sntl-group");
    const WRITES: u64 = 200;
    let before = waits();
    let started = Instant::now();
    let tasks: Vec<_> = (0..WRITES)
        .map(|i| {
            let (conn, key) = (conn.clone(), key.clone());
            tokio::spawn(async move {
                let mut pipe = redis::pipe();
                pipe.rpush(&key, i).ignore();
                conn.write(pipe, "test: push").await
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("the writer ends").expect("one replica acknowledges");
    }
    let elapsed = started.elapsed();
    let used = waits() - before;
    let mut c = conn.clone();
    assert_eq!(c.llen::<_, u64>(&key).await.expect("LLEN"), WRITES, "every write is on the master");
    let _: () = c.del(&key).await.expect("DEL");
    eprintln!("redis_sentinel: {WRITES} concurrent confirmed writes took {used} WAITs, {elapsed:.1?}");
    assert!((1..=WRITES / 4).contains(&used), "{used} WAITs for {WRITES} concurrent writes");
}

/// Two workers and a producer over the sentinel URL (with or without `min_replicas=1`); the
/// master is killed with `kill -9` mid-load.
async fn kill_the_master_under_load(min_replicas: bool) {
    cluster::bound_run_time("redis_sentinel", FILE_BOUND);
    let Some(sentinel) = block_in_place(Sentinel::up) else { return };
    let old = sentinel.current_master().expect("the sentinels agree on a master");
    let dir = TempDir::new("redis-sentinel");
    let file = dir.0.join("records");
    let path = file.display().to_string();
    let queue = unique("sntl");
    let wait = if min_replicas { "&min_replicas=1&min_replicas_timeout=2000" } else { "" };
    let url = format!("{}&global_keyprefix={queue}:{wait}&visibility_timeout=30", sentinel.broker_url(0));
    let tag = if min_replicas { "redis_sentinel (min_replicas=1)" } else { "redis_sentinel (no min_replicas)" };

    let app = celery_worker::connect(&url, &url).await.expect("connect over the sentinel URL");
    let hosts = [format!("a@{queue}"), format!("b@{queue}")];
    let mut workers: Vec<DemoProcess> = hosts
        .iter()
        .map(|h| {
            let args = ["worker", "-c", "4", "--prefetch-multiplier", "1", "-Q", &queue, "-n", h];
            DemoProcess::start_urls(&url, &url, &args)
        })
        .collect();
    for w in &workers {
        assert!(w.wait_log("worker ready", Duration::from_secs(60)), "{}", w.log());
    }

    // The producer sends all along, so that the kill lands in the middle of sends.
    let sends = Arc::new(Mutex::new(Sends::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let producer =
        tokio::spawn(produce(app.clone(), queue.clone(), path.clone(), sends.clone(), stop.clone(), SEND_TIMEOUT));
    let end = Instant::now() + Duration::from_secs(60);
    while sends.lock().unwrap().ok.len() < BEFORE {
        assert!(Instant::now() < end, "sends before the kill: {:?}", sends.lock().unwrap().error);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    block_in_place(|| sentinel.kill_node(old));
    let killed = Instant::now();
    // Sends that started after the kill succeed again, within a bound.
    cluster::wait_sends_resume(&sends, killed, AFTER, SENDS_AGAIN, DRAIN).await;
    stop.store(true, Ordering::SeqCst);
    producer.await.expect("the producer ends");
    let sends = std::mem::take(&mut *sends.lock().unwrap());
    let first_ok_after = sends.first_ok_after(killed).expect("sends after the kill");
    let new = sentinel.current_master();
    assert!(new.is_some_and(|m| m != old), "the sentinels name another master: {new:?}");
    eprintln!(
        "{tag}: {} sends, the kill in their midst; a send started after the kill returned OK {first_ok_after:.1?} \
         after it; {} failed (the last: {:?})",
        sends.ok.len() + sends.failed,
        sends.failed,
        sends.error
    );

    // Every acknowledged send runs, at least once.
    let missing = cluster::never_run(&sends, &file, DRAIN).await;
    let logs = |ws: &[DemoProcess]| ws.iter().map(|w| w.log()).collect::<Vec<_>>().join("\n----\n");
    if min_replicas {
        assert!(missing.is_empty(), "acknowledged but never run: {missing:?}\n{}", logs(&workers));
    }
    let seen = recorded(&file);
    let duplicates: usize = seen.values().map(|n| n - 1).sum();
    eprintln!(
        "{tag}: {} acknowledged sends, {} never ran (lost with the master); {duplicates} ran twice or more",
        sends.ok.len(),
        missing.len()
    );

    // Both workers are alive, switched to the new master (their loops switch at their next failed
    // command, each retrying with backoff) and consume again: with a prefetch of 4 each, 24
    // tasks of 300 ms sent now reach both.
    for (w, h) in workers.iter_mut().zip(&hosts) {
        assert!(w.wait_log("master switched", SENDS_AGAIN), "{h} logged its switch: {}", w.log());
        assert!(matches!(w.child.try_wait(), Ok(None)), "{h} still runs: {}", w.log());
    }
    let mut after = Vec::new();
    for _ in 0..24 {
        let sig = Signature::by_name("sleep").args(json!([300])).queue(queue.clone());
        after.push(app.send(sig).await.expect("a send after both switched"));
    }
    for r in &after {
        r.get::<serde_json::Value>(DRAIN)
            .await
            .unwrap_or_else(|e| panic!("a task sent after the switch ran: {e}\n{}", logs(&workers)));
    }
    for (w, h) in workers.iter().zip(&hosts) {
        let n = runs_within(&app, h, "sleep", Duration::from_secs(30)).await;
        let n = n.unwrap_or_else(|| panic!("{h} answers stats after the failover: {}", w.log()));
        assert!(n > 0, "{h} consumes after the failover (ran {n} of the 24): {}", w.log());
        eprintln!("{tag}: {h} ran {n} of the 24 tasks sent after the switch");
    }

    drop(workers);
    let _ = app.broker().purge(&queue).await;
    block_in_place(|| sentinel.restart_node(old));
    assert_eq!(sentinel.role(old).as_deref(), Some("slave"), "the old master came back as a replica");
}

/// A manual failover (`SENTINEL FAILOVER`): the old master stays up and becomes a replica (writes
/// there answer `READONLY`, or its clients are dropped by the reconfiguration). The same handle
/// asks the sentinels again, switches, and its writes land on the new master.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_demoted_master_is_left_for_the_new_one() {
    cluster::bound_run_time("redis_sentinel", FILE_BOUND);
    let Some(sentinel) = block_in_place(Sentinel::up) else { return };
    let old = sentinel.current_master().expect("the sentinels agree on a master");
    let key = unique("sntl-demoted");
    let mut conn = RedisConn::open(&sentinel.broker_url(0)).await.expect("connect through the sentinels");
    assert_eq!(conn.master(), format!("127.0.0.1:{}", sentinel.nodes()[old].port));
    let _: () = conn.set(&key, "before").await.expect("SET on the master");

    let new = block_in_place(|| manual_failover(&sentinel, old));
    let started = Instant::now();
    let new_addr = format!("127.0.0.1:{}", sentinel.nodes()[new].port);
    let mut errors = 0;
    loop {
        assert!(started.elapsed() < SENDS_AGAIN, "no write reached the new master ({errors} errors)");
        match conn.set::<_, _, ()>(&key, "after").await {
            Ok(()) if conn.master() == new_addr => break,
            Ok(()) => {}
            Err(_) => errors += 1,
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(conn.generation() >= 1, "the handle switched");
    eprintln!("redis_sentinel: a demoted master was left after {errors} failed writes, {:.1?}", started.elapsed());
    let mut on_new = sentinel.node_conn(new).expect("the new master answers");
    let value: Option<String> = redis::cmd("GET").arg(&key).query(&mut on_new).expect("GET");
    assert_eq!(value.as_deref(), Some("after"), "the write went to the new master");
    let _: () = conn.del(&key).await.expect("DEL");
}

/// An idle handle (no command sent) is on the new master soon after a manual failover: it follows
/// the sentinels' `+switch-master` announcement instead of waiting for an error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_handle_follows_an_announced_failover() {
    const FOLLOWS_WITHIN: Duration = Duration::from_secs(5);
    cluster::bound_run_time("redis_sentinel", FILE_BOUND);
    let Some(sentinel) = block_in_place(Sentinel::up) else { return };
    let old = sentinel.current_master().expect("the sentinels agree on a master");
    let conn = RedisConn::open(&sentinel.broker_url(0)).await.expect("connect through the sentinels");
    assert_eq!(conn.master(), format!("127.0.0.1:{}", sentinel.nodes()[old].port));
    // The process's subscription is made in the background; a failover before it is followed
    // only on the next error, so wait until a sentinel has a subscriber (sentinels know no
    // `PUBSUB`; their own links to each other subscribe to nothing).
    let subscribed = || {
        sentinel.sentinels().iter().any(|s| {
            let Ok(mut c) = redis::Client::open(s.url.as_str()).and_then(|c| c.get_connection()) else { return false };
            let list: Result<String, _> = redis::cmd("CLIENT").arg("LIST").query(&mut c);
            list.is_ok_and(|l| l.lines().any(|c| c.split(' ').any(|f| f.starts_with("sub=") && f != "sub=0")))
        })
    };
    let end = Instant::now() + Duration::from_secs(10);
    while !block_in_place(subscribed) {
        assert!(Instant::now() < end, "no sentinel has a +switch-master subscriber");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let new = block_in_place(|| manual_failover(&sentinel, old));
    let named = Instant::now();
    let new_addr = format!("127.0.0.1:{}", sentinel.nodes()[new].port);
    while conn.master() != new_addr {
        assert!(
            named.elapsed() < FOLLOWS_WITHIN,
            "the idle handle is still on {} after {FOLLOWS_WITHIN:?}",
            conn.master()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!(
        "redis_sentinel: an idle handle followed the failover {:.2?} after the sentinel named the new master",
        named.elapsed()
    );
    assert_eq!(conn.generation(), 1, "one switch");
}

/// A worker holds one connection to the sentinels (the `+switch-master` subscription), however
/// many Redis connections it has; questions to the sentinels open and close their own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_holds_one_sentinel_connection() {
    cluster::bound_run_time("redis_sentinel", FILE_BOUND);
    let Some(sentinel) = block_in_place(Sentinel::up) else { return };
    let queue = unique("sntl-conns");
    let url = format!("{}&global_keyprefix={queue}:", sentinel.broker_url(0));
    let ports: Vec<u16> = sentinel.sentinels().iter().map(|s| s.port).collect();
    let worker = DemoProcess::start_urls(&url, &url, &["worker", "-c", "2", "-Q", &queue, "-n", &format!("c@{queue}")]);
    assert!(worker.wait_log("worker ready", Duration::from_secs(60)), "{}", worker.log());
    let pid = worker.child.id();
    // Connections made while starting (questions to the sentinels) close; one stays.
    let end = Instant::now() + Duration::from_secs(15);
    let mut held = sentinel_connections(pid, &ports);
    while held != 1 {
        assert!(Instant::now() < end, "the worker holds {held} connections to the sentinels: {}", worker.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
        held = sentinel_connections(pid, &ports);
    }
    eprintln!("redis_sentinel: a worker holds {held} connection to the sentinels");
}

/// Asks the first sentinel for a manual failover away from node `old`; the node promoted.
fn manual_failover(sentinel: &Sentinel, old: usize) -> usize {
    let mut s = redis::Client::open(sentinel.sentinels()[0].url.as_str())
        .and_then(|c| c.get_connection())
        .expect("a sentinel answers");
    let _: () = redis::cmd("SENTINEL").arg("FAILOVER").arg(sentinel.master_name()).query(&mut s).expect("FAILOVER");
    sentinel.wait_new_master(old, Duration::from_secs(60)).expect("the sentinels promoted a replica")
}

/// Established TCP connections of process `pid` to one of `ports` on loopback (from `/proc`).
fn sentinel_connections(pid: u32, ports: &[u16]) -> usize {
    let inodes: std::collections::HashSet<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
                .filter_map(|l| l.to_str()?.strip_prefix("socket:[")?.strip_suffix(']').map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    let mut n = 0;
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else { continue };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (Some(remote), Some(state), Some(inode)) = (f.get(2), f.get(3), f.get(9)) else { continue };
            let port = remote.rsplit(':').next().and_then(|p| u16::from_str_radix(p, 16).ok());
            if *state == "01" && port.is_some_and(|p| ports.contains(&p)) && inodes.contains(*inode) {
                n += 1;
            }
        }
    }
    n
}

/// `min_other_sentinels=N` (Kombu's option): each of the 3 sentinels sees the 2 others, so 2 is
/// met and 3 is not (no sentinel's answer counts: connecting fails, naming why).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn min_other_sentinels_is_checked_on_discovery() {
    cluster::bound_run_time("redis_sentinel", FILE_BOUND);
    let Some(sentinel) = block_in_place(Sentinel::up) else { return };
    let url = |n: u32| format!("{}&min_other_sentinels={n}", sentinel.broker_url(0));
    let conn = RedisConn::open(&url(2)).await.expect("every sentinel sees the 2 others");
    let master = sentinel.current_master().expect("the sentinels agree on a master");
    assert_eq!(conn.master(), format!("127.0.0.1:{}", sentinel.nodes()[master].port));
    let e = RedisConn::open(&url(3)).await.expect_err("no sentinel sees 3 others");
    assert!(e.to_string().contains("2 other sentinels"), "{e}");
}

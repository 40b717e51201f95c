//! A RabbitMQ cluster losing a node under load, with real worker processes: two `demo` workers and
//! a producer (this process) use the 3-node failover URL of `scripts/cluster rabbitmq` with
//! `queue_type=quorum`, all first on node 1, which also leads the task queue; a third worker uses
//! node 2. Node 1 is killed with `kill -9` while `record` tasks flow. Checked: every send that
//! returned OK runs at least once (its token is in the record file), sends succeed again within
//! [`SENDS_AGAIN`], every worker keeps running and consumes again (their own `stats`, asked over
//! remote control after the failover, count tasks run after the kill): the two whose connection
//! died on the next node, the third where it was, under the queue's new leader; and the task
//! queue, its dead-letter queue and the delay level an ETA task went through are quorum queues on
//! all 3 nodes. Duplicates are allowed (at least once) and printed.
//!
//! The cluster is shared with other tests (held by the harness's lock while this runs): names
//! are unique, and node 1 is started again at the end.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use celery_core::Signature;
use celery_tests::cluster::{self, produce, recorded, runs, runs_within, unique, Rabbit, Sends};
use celery_tests::{redis_available, DemoProcess, RedisEnv, TempDir};
use serde_json::json;
use tokio::task::block_in_place;

/// The whole file, a cold cluster boot and a node restart included.
const FILE_BOUND: Duration = Duration::from_secs(600);
/// How long after the kill sends may keep failing.
const SENDS_AGAIN: Duration = Duration::from_secs(60);
/// One send's bound (a send that takes longer counts as failed).
const SEND_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the workers may take to run everything that was sent.
const DRAIN: Duration = Duration::from_secs(120);
/// Confirmed sends before the kill, and after sends work again.
const BEFORE: usize = 60;
const AFTER: usize = 60;

/// The failover URL with `options` on every element (the queue options must agree).
fn failover_url(rabbit: &Rabbit, options: &str) -> String {
    failover_url_from(rabbit, 0, options)
}

/// [`failover_url`] listing node `first` first.
fn failover_url_from(rabbit: &Rabbit, first: usize, options: &str) -> String {
    let n = rabbit.nodes().len();
    (0..n).map(|i| format!("{}?{options}", rabbit.url((first + i) % n))).collect::<Vec<_>>().join(";")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_node_loses_no_confirmed_send_and_stalls_no_worker() {
    cluster::bound_run_time("rabbitmq_cluster", FILE_BOUND);
    if !redis_available("rabbitmq_cluster") {
        return;
    }
    let Some(rabbit) = block_in_place(Rabbit::up) else { return };
    let redis = RedisEnv::new(60.0);
    let dir = TempDir::new("rabbitmq-cluster");
    let file = dir.0.join("records");
    let path = file.display().to_string();
    let queue = unique("rmqc");
    let url = failover_url(&rabbit, "queue_type=quorum&max_deliveries=5");

    let app = celery_worker::connect(&url, &redis.backend).await.expect("connect over the failover URL");
    // The first send declares the queue through node 1, which then leads it.
    let first = Signature::by_name("record").args(json!([path, "t0"])).queue(queue.clone());
    app.send(first).await.expect("the first send");
    // Workers a and b use node 1 (the one killed); c uses node 2 and stays there while the
    // queue's leader moves under its consumer.
    let hosts = [format!("a@{queue}"), format!("b@{queue}"), format!("c@{queue}")];
    let from_node_2 = failover_url_from(&rabbit, 1, "queue_type=quorum&max_deliveries=5");
    let mut workers: Vec<DemoProcess> = hosts
        .iter()
        .enumerate()
        .map(|(i, h)| {
            let url = if i < 2 { &url } else { &from_node_2 };
            DemoProcess::start_urls(url, &redis.backend, &["worker", "-c", "4", "-Q", &queue, "-n", h])
        })
        .collect();
    for w in &workers {
        assert!(w.wait_log("worker ready", Duration::from_secs(60)), "{}", w.log());
    }

    // The producer sends all along, so that the kill lands in the middle of sends.
    let sends = Arc::new(Mutex::new(Sends { ok: BTreeSet::from(["t0".to_owned()]), ..Sends::default() }));
    let stop = Arc::new(AtomicBool::new(false));
    let producer =
        tokio::spawn(produce(app.clone(), queue.clone(), path.clone(), sends.clone(), stop.clone(), SEND_TIMEOUT));
    let end = Instant::now() + Duration::from_secs(60);
    while sends.lock().unwrap().ok.len() < BEFORE {
        assert!(Instant::now() < end, "sends before the kill: {:?}", sends.lock().unwrap().error);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // An ETA task: held in a quorum delay level across the failover.
    let eta =
        Signature::by_name("record").args(json!([path, "eta"])).queue(queue.clone()).countdown(Duration::from_secs(12));
    app.send(eta).await.expect("send the ETA task");
    sends.lock().unwrap().ok.insert("eta".into());

    // Node 1 leads the task queue (declared through it) and every client is connected to it.
    let members = block_in_place(|| rabbit.quorum_members(0, &queue));
    assert_eq!(members.len(), 3, "{queue} is a quorum queue on 3 nodes: {members:?}");
    assert!(members.contains(&(0, "leader".to_owned())), "node 1 leads {queue}: {members:?}");
    let dead = format!("{queue}.dead");
    assert_eq!(block_in_place(|| rabbit.quorum_members(0, &dead)).len(), 3, "{dead} is a quorum queue");
    let levels = [8, 4].map(|s| format!("{queue}.delay.{s}s"));
    let end = Instant::now() + Duration::from_secs(30);
    let level = loop {
        let found = levels.iter().find(|l| block_in_place(|| rabbit.quorum_members(0, l)).len() == 3);
        if let Some(l) = found {
            break l.clone();
        }
        assert!(Instant::now() < end, "the ETA task's delay level ({levels:?}) is no quorum queue");
    };
    let before: Vec<u64> = {
        let mut v = Vec::new();
        for h in &hosts {
            v.push(runs(&app, h, "record").await.unwrap_or_else(|| panic!("{h} answers stats")));
        }
        v
    };

    block_in_place(|| rabbit.kill_node(0));
    let killed = Instant::now();
    // Sends that started after the kill succeed again, within a bound.
    cluster::wait_sends_resume(&sends, killed, AFTER, SENDS_AGAIN, DRAIN).await;
    stop.store(true, Ordering::SeqCst);
    producer.await.expect("the producer ends");
    let sends = std::mem::take(&mut *sends.lock().unwrap());
    let first_ok_after = sends.first_ok_after(killed).expect("sends after the kill");
    eprintln!(
        "rabbitmq_cluster: {} sends, the kill in their midst; a send started after the kill returned OK {first_ok_after:.1?} \
         after it; {} failed (the last: {:?})",
        sends.ok.len() + sends.failed,
        sends.failed,
        sends.error
    );

    // Every confirmed send runs, at least once.
    let missing = cluster::never_run(&sends, &file, DRAIN).await;
    let logs = || workers.iter().map(|w| w.log()).collect::<Vec<_>>().join("\n----\n");
    assert!(missing.is_empty(), "confirmed but never run: {missing:?}\n{}", logs());
    let seen = recorded(&file);
    let duplicates: usize = seen.values().map(|n| n - 1).sum();
    eprintln!("rabbitmq_cluster: {} confirmed sends all ran; {duplicates} ran twice or more", sends.ok.len());

    // Both workers are alive, followed the failover and consume again.
    for (i, (w, (h, n))) in workers.iter_mut().zip(hosts.iter().zip(&before)).enumerate() {
        let log = w.log();
        assert!(matches!(w.child.try_wait(), Ok(None)), "{h} still runs: {log}");
        if i < 2 {
            assert!(log.contains("failed over to another node"), "{h} logged its switch: {log}");
            assert!(log.contains("consuming again"), "{h} consumes again: {log}");
        } else {
            assert!(!log.contains("failed over"), "{h} stayed on node 2: {log}");
        }
        let now = runs_within(&app, h, "record", Duration::from_secs(30)).await;
        let now = now.unwrap_or_else(|| panic!("{h} answers stats after the failover: {log}"));
        assert!(now > *n, "{h} ran tasks after the kill ({n} before, {now} now): {log}");
    }
    let members = block_in_place(|| rabbit.quorum_members(1, &queue));
    assert!(members.iter().any(|(i, s)| *i != 0 && s == "leader"), "{queue} has a new leader: {members:?}");
    eprintln!("rabbitmq_cluster: the ETA task went through {level}; {queue} now {members:?}");

    drop(workers);
    let _ = app.broker().purge(&queue).await;
    block_in_place(|| rabbit.restart_node(0));
    assert!(block_in_place(|| rabbit.node_running(0)), "node 1 is back");
}

/// `rpc://` results over the failover URL: the caller's reply queue (transient, classic) lives on
/// node 1 with the caller's connection; after node 1's `kill -9` the caller declares it again on
/// the next node and the worker publishes there, so results come back again within
/// [`SENDS_AGAIN`] (replies published in the gap are lost, as documented: hence a new task per
/// try).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rpc_results_follow_the_failover() {
    cluster::bound_run_time("rabbitmq_cluster", FILE_BOUND);
    let Some(rabbit) = block_in_place(Rabbit::up) else { return };
    let queue = unique("rmqc-rpc");
    let url = failover_url(&rabbit, "queue_type=quorum");
    let app = celery_worker::connect(&url, "rpc://").await.expect("connect with rpc:// results");
    let host = format!("rpc@{queue}");
    let worker = DemoProcess::start_urls(&url, "rpc://", &["worker", "-c", "2", "-Q", &queue, "-n", &host]);
    assert!(worker.wait_log("worker ready", Duration::from_secs(60)), "{}", worker.log());
    let add = |x: i64| Signature::by_name("add").args(json!([x, 1])).queue(queue.clone());
    let r = app.send(add(1)).await.expect("send before the kill");
    match r.get::<i64>(Duration::from_secs(30)).await {
        Ok(v) => assert_eq!(v, 2),
        Err(e) => panic!("no result before the kill ({e}); the worker's log:\n{}", worker.log()),
    }

    block_in_place(|| rabbit.kill_node(0));
    let killed = Instant::now();
    let mut x = 10;
    let (value, tries) = loop {
        assert!(killed.elapsed() < SENDS_AGAIN, "no rpc result within {SENDS_AGAIN:?} of the kill: {}", worker.log());
        x += 1;
        let Ok(Ok(r)) = tokio::time::timeout(SEND_TIMEOUT, app.send(add(x))).await else { continue };
        if let Ok(v) = r.get::<i64>(Duration::from_secs(5)).await {
            break (v, x - 10);
        }
    };
    assert_eq!(value, x + 1);
    eprintln!("rabbitmq_cluster: an rpc result came back {:.1?} after the kill ({tries} tries)", killed.elapsed());
    assert!(worker.log().contains("failed over to another node"), "{}", worker.log());

    drop(worker);
    let _ = app.broker().purge(&queue).await;
    block_in_place(|| rabbit.restart_node(0));
    assert!(block_in_place(|| rabbit.node_running(0)), "node 1 is back");
}

/// Beat's leadership and a chord across the loss of the node everything uses (`queue_type=quorum`):
/// two beats (`--lease 2`) and two workers on the failover URL, a chord of 12 `sleep` tasks in
/// flight, node 1 killed. Checked: beat's lease and state queues are quorum queues on 3 nodes;
/// after the kill a beat leads again and the ticks go on (within [`SENDS_AGAIN`]); the chord's body
/// runs with every header result.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn beat_leadership_and_a_chord_survive_the_failover() {
    cluster::bound_run_time("rabbitmq_cluster", FILE_BOUND);
    if !redis_available("rabbitmq_cluster") {
        return;
    }
    let Some(rabbit) = block_in_place(Rabbit::up) else { return };
    let redis = RedisEnv::new(60.0);
    let dir = TempDir::new("rabbitmq-cluster-beat");
    let name = unique("rmqb");
    let (ticks, work) = (format!("{name}.ticks"), format!("{name}.work"));
    let url = failover_url(&rabbit, "queue_type=quorum");
    let schedule = dir.0.join("beat.toml");
    let entry = format!("[[entry]]\nname = \"tick\"\ntask = \"add\"\nargs = [1, 2]\nevery = 1\nqueue = \"{ticks}\"\n");
    std::fs::write(&schedule, entry).expect("write the schedule");
    let schedule = schedule.display().to_string();
    let beats: Vec<DemoProcess> = (0..2)
        .map(|_| {
            DemoProcess::start_urls(
                &url,
                &redis.backend,
                &["beat", "-s", &schedule, "--beat-name", &name, "--lease", "2"],
            )
        })
        .collect();
    let leads = |b: &DemoProcess| b.log().matches("beat: leading").count();
    let logs = |ps: &[DemoProcess]| ps.iter().map(|p| p.log()).collect::<Vec<_>>().join("\n----\n");
    assert!(
        celery_tests::wait_until(Duration::from_secs(60), || beats.iter().any(|b| leads(b) > 0)),
        "{}",
        logs(&beats)
    );
    let workers: Vec<DemoProcess> = (0..2)
        .map(|i| {
            let host = format!("w{i}@{name}");
            DemoProcess::start_urls(&url, &redis.backend, &["worker", "-c", "4", "-Q", &work, "-n", &host])
        })
        .collect();
    for w in &workers {
        assert!(w.wait_log("worker ready", Duration::from_secs(60)), "{}", w.log());
    }
    for q in [format!("celery-rs.lease.beat.{name}"), format!("celery-rs.doc.beat.{name}")] {
        let members = block_in_place(|| rabbit.quorum_members(0, &q));
        assert_eq!(members.len(), 3, "{q} is a quorum queue on 3 nodes: {members:?}");
    }

    let app = celery_worker::connect(&url, &redis.backend).await.expect("connect over the failover URL");
    let header = (0..12).map(|_| Signature::by_name("sleep").args(json!([700])).queue(work.clone()));
    let chord = app.send_chord(header, Signature::by_name("tsum").queue(work.clone())).await.expect("send the chord");
    // The kill lands while header tasks run (the workers took some, not all).
    let left = celery_tests::poll_until(
        Duration::from_secs(30),
        || async { app.broker().queue_len(&work).await.unwrap_or(12) },
        |left| *left < 12,
    )
    .await;
    assert!(left < 12, "the workers take header tasks\n{}", logs(&workers));
    let ticked = app.broker().queue_len(&ticks).await.expect("ticks so far");

    block_in_place(|| rabbit.kill_node(0));
    let killed = Instant::now();
    let sum = chord.get::<i64>(DRAIN).await;
    assert_eq!(sum.ok(), Some(12 * 700), "the chord's body ran with every header result\n{}", logs(&workers));
    let now = celery_tests::poll_until(
        SENDS_AGAIN,
        || async { app.broker().queue_len(&ticks).await.unwrap_or(0) },
        |n| *n >= ticked + 5,
    )
    .await;
    assert!(now >= ticked + 5, "beat ticks again after the kill ({ticked} before, {now} now)\n{}", logs(&beats));
    eprintln!(
        "rabbitmq_cluster: beat ticked {} times in the {:.1?} after the kill ({ticked} before); leadership taken {} times",
        now - ticked,
        killed.elapsed(),
        beats.iter().map(leads).sum::<usize>()
    );
    let members = block_in_place(|| rabbit.quorum_members(1, &format!("celery-rs.lease.beat.{name}")));
    assert!(members.iter().any(|(i, s)| *i != 0 && s == "leader"), "the lease queue has a new leader: {members:?}");

    drop(workers);
    drop(beats);
    for q in [&ticks, &work] {
        let _ = app.broker().purge(q).await;
    }
    block_in_place(|| rabbit.restart_node(0));
    assert!(block_in_place(|| rabbit.node_running(0)), "node 1 is back");
}

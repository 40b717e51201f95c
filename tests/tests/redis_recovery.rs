//! A dead worker's tasks come back in seconds on Redis: real worker processes (the demo binary)
//! with the default heartbeat (2 s) and grace (10 s), and a visibility timeout of an hour, so only
//! the heartbeats can explain a quick return. kill -9 of a busy worker, SIGSTOP shorter and longer
//! than the grace, a restart under the same name, and a Python worker's lease (Kombu's layout, no
//! heartbeat) that is left alone.

use std::time::{Duration, Instant};

use celery_core::{App, TaskState};
use celery_tests::{redis_available, wait_until, DemoProcess, RedisEnv};
use redis::Commands;
use serde_json::json;

const T: Duration = Duration::from_secs(30);
/// The visibility timeout of every test here: far longer than any test.
const VT: f64 = 3600.0;

async fn app(env: &RedisEnv) -> App {
    celery_worker::connect(&env.broker, &env.backend).await.expect("connect")
}

async fn send_sleeps(app: &App, n: usize, ms: u64) -> Vec<String> {
    let mut ids = Vec::new();
    for _ in 0..n {
        ids.push(app.send_by_name("sleep", json!([ms]), json!({})).await.unwrap().id().to_owned());
    }
    ids
}

/// Each task's state and the worker that stored it.
async fn states(app: &App, ids: &[String]) -> Vec<(TaskState, Option<String>)> {
    let mut out = Vec::new();
    for id in ids {
        let meta = app.result(id).info().await.unwrap();
        out.push(meta.map_or((TaskState::Pending, None), |m| (m.status, m.worker)));
    }
    out
}

async fn wait_states(
    app: &App,
    ids: &[String],
    pred: impl Fn(&[(TaskState, Option<String>)]) -> bool,
    timeout: Duration,
) -> Vec<(TaskState, Option<String>)> {
    celery_tests::poll_until(timeout, || states(app, ids), |s| pred(s)).await
}

fn all_in(s: &[(TaskState, Option<String>)], state: TaskState) -> bool {
    s.iter().all(|(x, _)| *x == state)
}

fn all_by(s: &[(TaskState, Option<String>)], worker: &str) -> bool {
    s.iter().all(|(x, w)| *x == TaskState::Success && w.as_deref() == Some(worker))
}

/// Starts a named worker and waits until it is ready.
fn worker(env: &RedisEnv, name: &str, concurrency: &str) -> DemoProcess {
    let w = DemoProcess::start(env, &["worker", "-n", name, "-c", concurrency, "--prefetch-multiplier", "1"]);
    assert!(w.wait_log("worker ready", T), "{}", w.log());
    w
}

/// The sum of `restored=N` over the log lines of the sweep for dead workers.
fn swept(log: &str) -> u64 {
    log.lines()
        .filter(|l| l.contains("workers whose heartbeat stopped"))
        .filter_map(|l| l.split("restored=").nth(1)?.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

/// A lease as a Python Celery worker holds it (Kombu's `unacked` and `unacked_index`, renewed
/// now, in no heartbeat's `held` set), for a message of queue `queue`. Returns its tag.
async fn python_lease(env: &RedisEnv, app: &App, queue: &str) -> String {
    app.send(celery_core::Signature::by_name("add").args(json!([1, 2])).queue(queue)).await.unwrap();
    let mut c = env.conn();
    let envelope: String = c.rpop(env.key(queue), None).unwrap();
    let tag = uuid::Uuid::new_v4().to_string();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
    let _: () = c.hset(env.key("unacked"), &tag, format!("[{envelope},\"\",\"{queue}\"]")).unwrap();
    let _: () = c.zadd(env.key("unacked_index"), &tag, now).unwrap();
    tag
}

/// kill -9 of a worker running four 5 s tasks: the idle workers finish all four within 20 s of
/// the kill, each restored exactly once between them; a Python worker's lease is left alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_workers_tasks_finish_elsewhere_within_20_s() {
    if !redis_available("redis_recovery") {
        return;
    }
    let env = RedisEnv::new(VT);
    let app = app(&env).await;
    let python = python_lease(&env, &app, "python-held").await;
    let ids = send_sleeps(&app, 4, 5000).await;
    let mut a = worker(&env, "a@recovery", "4");
    let s = wait_states(&app, &ids, |s| all_in(s, TaskState::Started), T).await;
    assert!(all_in(&s, TaskState::Started), "{s:?}\n{}", a.log());
    let b = worker(&env, "b@recovery", "4");
    let c = worker(&env, "c@recovery", "4");
    a.signal("KILL");
    let killed = Instant::now();
    a.wait_exit(Duration::from_secs(5)).expect("killed");

    let s = wait_states(&app, &ids, |s| s.iter().all(|(x, w)| *x == TaskState::Success && w.is_some()), T).await;
    let took = killed.elapsed();
    assert!(all_in(&s, TaskState::Success), "{s:?}\n{}\n{}", b.log(), c.log());
    eprintln!("redis_recovery: four 5 s tasks of a killed worker finished elsewhere {took:?} after the kill");
    assert!(took < Duration::from_secs(20), "took {took:?}");
    assert!(s.iter().all(|(_, w)| w.as_deref() != Some("a@recovery")), "{s:?}");
    assert_eq!(swept(&b.log()) + swept(&c.log()), 4, "restored exactly once\n{}\n{}", b.log(), c.log());

    let mut conn = env.conn();
    assert!(conn.hexists::<_, _, bool>(env.key("unacked"), &python).unwrap(), "the Python lease stays");
    assert_eq!(conn.llen::<_, u64>(env.key("python-held")).unwrap(), 0, "and is not restored early");
    assert_eq!(conn.hlen::<_, u64>(env.key("unacked")).unwrap(), 1, "only the Python lease is left");
    let workers: Vec<String> = conn.smembers(env.key("_celery_rs.workers")).unwrap();
    assert!(!workers.contains(&"a@recovery".to_owned()), "the dead worker is forgotten: {workers:?}");
}

/// A worker frozen (SIGSTOP) for less than the grace keeps its tasks: it finishes them itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_frozen_shorter_than_the_grace_is_not_robbed() {
    if !redis_available("redis_recovery") {
        return;
    }
    let env = RedisEnv::new(VT);
    let app = app(&env).await;
    let ids = send_sleeps(&app, 2, 5000).await;
    let a = worker(&env, "a@frozen-short", "2");
    let s = wait_states(&app, &ids, |s| all_in(s, TaskState::Started), T).await;
    assert!(all_in(&s, TaskState::Started), "{s:?}\n{}", a.log());
    let b = worker(&env, "b@frozen-short", "2");
    a.signal("STOP");
    // The stimulus: frozen for 6 s, less than the 10 s grace (its last renewal was at most 2 s
    // before).
    tokio::time::sleep(Duration::from_secs(6)).await;
    a.signal("CONT");
    let s = wait_states(&app, &ids, |s| all_in(s, TaskState::Success), T).await;
    assert!(all_by(&s, "a@frozen-short"), "{s:?}\n{}\n{}", a.log(), b.log());
    assert_eq!(swept(&b.log()), 0, "{}", b.log());
    assert!(!a.log().contains("not stored"), "{}", a.log());
}

/// A worker frozen for longer than the grace is robbed: its tasks run once on another worker, and
/// when it resumes it stores no second result over that one (nor settles them again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_frozen_past_the_grace_is_robbed_once() {
    if !redis_available("redis_recovery") {
        return;
    }
    let env = RedisEnv::new(VT);
    let app = app(&env).await;
    let ids = send_sleeps(&app, 2, 5000).await;
    let a = worker(&env, "a@frozen-long", "2");
    let s = wait_states(&app, &ids, |s| all_in(s, TaskState::Started), T).await;
    assert!(all_in(&s, TaskState::Started), "{s:?}\n{}", a.log());
    let b = worker(&env, "b@frozen-long", "2");
    a.signal("STOP");
    let frozen = Instant::now();
    assert!(wait_until(T, || swept(&b.log()) == 2), "{}", b.log());
    let robbed = frozen.elapsed();
    eprintln!("redis_recovery: a frozen worker's tasks were restored {robbed:?} after SIGSTOP");
    assert!(robbed >= Duration::from_secs(8), "not before the grace: {robbed:?}");
    // Resumed while the other worker runs its tasks: its own runs end at once (their time passed).
    a.signal("CONT");
    assert!(a.wait_log("lapsed", T), "{}", a.log());
    assert!(wait_until(T, || a.log().matches("its outcome here is not stored").count() == 2), "{}", a.log());
    let s = wait_states(&app, &ids, |s| all_in(s, TaskState::Success), T).await;
    assert!(all_by(&s, "b@frozen-long"), "{s:?}\n{}\n{}", a.log(), b.log());
    let done: Vec<_> = states(&app, &ids).await;
    let mut conn = env.conn();
    assert!(wait_until(T, || conn.hlen::<_, u64>(env.key("unacked")).unwrap() == 0), "all settled");
    assert_eq!(conn.llen::<_, u64>(env.key("celery")).unwrap(), 0, "nothing was put back a second time");
    assert_eq!(done, states(&app, &ids).await);
}

/// A worker restarted under the same name restores its earlier run's deliveries when it starts,
/// long before the grace (60 s here) would let any other worker take them, and without waiting:
/// the earlier run's heartbeat names a process of this machine that is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_worker_recovers_its_own_deliveries_at_start() {
    if !redis_available("redis_recovery") {
        return;
    }
    let mut env = RedisEnv::new(VT);
    env.broker.push_str("&worker_grace=60");
    let app = app(&env).await;
    let ids = send_sleeps(&app, 2, 2000).await;
    let mut a = worker(&env, "a@restart", "2");
    let s = wait_states(&app, &ids, |s| all_in(s, TaskState::Started), T).await;
    assert!(all_in(&s, TaskState::Started), "{s:?}\n{}", a.log());
    a.signal("KILL");
    let killed = Instant::now();
    a.wait_exit(Duration::from_secs(5)).expect("killed");
    let again = worker(&env, "a@restart", "2");
    let s = wait_states(&app, &ids, |s| all_in(s, TaskState::Success), T).await;
    let took = killed.elapsed();
    assert!(all_in(&s, TaskState::Success), "{s:?}\n{}", again.log());
    eprintln!("redis_recovery: a restarted worker finished its earlier run's 2 s tasks {took:?} after the kill");
    assert!(took < Duration::from_secs(20), "{took:?}");
    assert!(again.log().contains("an earlier run of this worker left unsettled"), "{}", again.log());
    // Its pid is free: the restart knew the earlier run was gone and did not watch its heartbeat
    // for 1.5 beats first.
    assert!(again.log().contains("the earlier run of this worker on this machine is gone"), "{}", again.log());
}

/// The restore itself, through the broker's API: a holder without a heartbeat (its key gone, as
/// after its grace) has its delivery restored to the first live consumer's sweep, marked
/// redelivered and counted (`x-delivery-count` 2, as the visibility timeout's restore counts it);
/// a lease in no holder's set (a Python worker's) stays where it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_without_heartbeat_is_restored_counted_and_redelivered() {
    use celery_core::Broker;
    if !redis_available("redis_recovery") {
        return;
    }
    let env = RedisEnv::new(VT);
    let app = app(&env).await;
    let python = python_lease(&env, &app, "python-held").await;
    let ghost = python_lease(&env, &app, "ghost-held").await;
    let mut c = env.conn();
    let _: () = c.sadd(env.key("_celery_rs.held.ghost@test"), &ghost).unwrap();
    let _: () = c.sadd(env.key("_celery_rs.workers"), "ghost@test").unwrap();

    let broker = broker_backends::redis::RedisBroker::connect(&env.broker).await.unwrap();
    broker.set_worker_name("live@test");
    let mut consumer = broker.consume(&["ghost-held".to_owned()], 1).await.unwrap();
    let mut d = tokio::time::timeout(T, consumer.next()).await.expect("restored at once").unwrap();
    assert!(d.redelivered);
    let msg = d.take_message().unwrap();
    assert_eq!(msg.headers.extra.get("x-delivery-count"), Some(&json!(2)), "{:?}", msg.headers.extra);
    assert!(d.is_held().await, "the new holder holds it");
    let held: Vec<String> = c.smembers(env.key("_celery_rs.held.live@test")).unwrap();
    assert_eq!(held.len(), 1, "tagged under the live holder");
    d.ack().await.unwrap();
    consumer.close().await;
    assert!(wait_until(T, || c.scard::<_, u64>(env.key("_celery_rs.held.live@test")).unwrap() == 0), "ack untags");
    let workers: Vec<String> = c.smembers(env.key("_celery_rs.workers")).unwrap();
    assert_eq!(workers, vec!["live@test".to_owned()], "the ghost is forgotten");
    assert!(c.hexists::<_, _, bool>(env.key("unacked"), &python).unwrap(), "the Python lease stays");
    assert_eq!(c.llen::<_, u64>(env.key("python-held")).unwrap(), 0);
}

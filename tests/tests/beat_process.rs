//! Beat as real processes on every broker: two beats send each run once; `kill -9` of the leader
//! hands over within the lease and neither skips nor repeats a run; a killed and restarted beat
//! sends one catch-up run for a `run-once` entry and none for a `skip` entry; `worker -B` runs
//! what its own beat sends.

use std::time::{Duration, Instant};

use celery_tests::{wait_until, DemoProcess, Target, TempDir};

const T: Duration = Duration::from_secs(30);

#[celery_worker::prelude::task(schedule = celery_core::schedule::Schedule::crontab("0 7 * * mon-fri").and_then(|s| s.in_timezone("Europe/Berlin")))]
async fn morning_report() {}

#[celery_worker::prelude::task(schedule = "*/10 * * * * *", name = "reports.often")]
async fn often() {}

#[celery_worker::prelude::task(schedule = Duration::from_secs(90))]
async fn every_90s() {}

/// `#[task(schedule = ...)]` takes a schedule, a `Result` of one, a crontab string or a duration.
#[test]
fn tasks_declare_their_schedules() {
    let entries = celery_worker::beat::code_entries().unwrap();
    let show = |name: &str| entries.iter().find(|e| e.name == name).map(|e| e.schedule.to_string());
    assert_eq!(show("morning_report").as_deref(), Some("crontab `0 7 * * mon-fri` (Europe/Berlin)"));
    assert_eq!(show("reports.often").as_deref(), Some("crontab `*/10 * * * * *` (UTC)"));
    assert_eq!(show("every_90s").as_deref(), Some("every 1m 30s"));
}

/// A schedule file with entries `(name, queue, every, missed)`.
fn schedule(dir: &TempDir, entries: &[(&str, &str, u32, &str)]) -> String {
    let mut text = String::new();
    for (name, queue, every, missed) in entries {
        text.push_str(&format!(
            "[[entry]]\nname = \"{name}\"\ntask = \"add\"\nargs = [1, 2]\nevery = {every}\nqueue = \"{queue}\"\nmissed = \"{missed}\"\n\n"
        ));
    }
    let path = dir.0.join("beat.toml");
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

fn beat(t: &Target, file: &str, extra: &[&str]) -> DemoProcess {
    let (b, r) = t.urls();
    let mut args = vec!["beat", "-s", file];
    args.extend_from_slice(extra);
    DemoProcess::start_urls(&b, &r, &args)
}

fn leads(p: &DemoProcess) -> bool {
    p.log().contains("beat: leading")
}

async fn len(app: &celery_core::App, q: &str) -> u64 {
    app.broker().queue_len(q).await.unwrap()
}

/// Polls `q`'s length until `ok(len)` or `timeout`.
async fn wait_len(app: &celery_core::App, q: &str, timeout: Duration, ok: impl Fn(u64) -> bool) -> bool {
    let end = Instant::now() + timeout;
    loop {
        if ok(len(app, q).await) {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Two beats for 10 s with a 1 s entry: 10±1 sends, all from one leader.
async fn two_beats_send_each_run_once(t: Target) {
    let dir = TempDir::new("beat-two");
    let file = schedule(&dir, &[("tick", "beat_ticks", 1, "run-once")]);
    let a = beat(&t, &file, &["--lease", "3"]);
    let b = beat(&t, &file, &["--lease", "3"]);
    assert!(wait_until(T, || leads(&a) || leads(&b)), "{}\n---\n{}", a.log(), b.log());
    let started = Instant::now();
    let app = t.app().await;
    tokio::time::sleep_until((started + Duration::from_secs(10)).into()).await;
    let n = len(&app, "beat_ticks").await;
    assert!((9..=11).contains(&n), "{n} sends in 10 s\n{}\n---\n{}", a.log(), b.log());
    assert_eq!(leads(&a) as u8 + leads(&b) as u8, 1, "one leader\n{}\n---\n{}", a.log(), b.log());
}

/// `kill -9` of the leader: the other beat leads within the lease, and the count of sends stays
/// in step with the clock (the runs due during the handover are sent late, not lost or doubled).
async fn kill_9_of_the_leader_hands_over(t: Target) {
    let dir = TempDir::new("beat-kill");
    let file = schedule(&dir, &[("tick", "beat_ticks", 1, "run-once")]);
    let lease = Duration::from_secs(2);
    let a = beat(&t, &file, &["--lease", "2"]);
    assert!(wait_until(T, || leads(&a)), "{}", a.log());
    let started = Instant::now();
    let b = beat(&t, &file, &["--lease", "2"]);
    assert!(b.wait_log("beat: starting", T), "{}", b.log());
    let app = t.app().await;
    assert!(wait_len(&app, "beat_ticks", T, |n| n >= 3).await, "{}", a.log());
    let (mut leader, standby) = (a, b);
    leader.signal("KILL");
    leader.wait_exit(Duration::from_secs(5)).expect("killed");
    let killed = Instant::now();
    assert!(
        wait_until(lease + Duration::from_secs(5), || leads(&standby)),
        "no takeover\n{}\n---\n{}",
        leader.log(),
        standby.log()
    );
    let took = killed.elapsed();
    assert!(took <= lease + Duration::from_millis(1500), "takeover after {took:?}\n{}", standby.log());
    tokio::time::sleep(Duration::from_secs(3)).await;
    let n = len(&app, "beat_ticks").await as i64;
    let expected = started.elapsed().as_secs() as i64;
    assert!(
        (expected - 2..=expected + 1).contains(&n),
        "{n} sends in {expected} s\n{}\n---\n{}",
        leader.log(),
        standby.log()
    );
}

/// A beat killed and restarted after two due times passed: the `run-once` entry sends one catch-up
/// run at once, the `skip` entry none; both continue on their schedule.
async fn restart_catches_up_by_policy(t: Target) {
    let dir = TempDir::new("beat-restart");
    let file = schedule(&dir, &[("once", "beat_once", 2, "run-once"), ("skip", "beat_skip", 2, "skip")]);
    let extra = ["--lease", "1", "--late-after", "0.5"];
    let mut first = beat(&t, &file, &extra);
    let app = t.app().await;
    // Kill it between runs, once both entries stored their second send.
    let sent_twice = || async {
        let s = celery_worker::beat::load_state(&app, "beat").await.unwrap().unwrap_or_default();
        ["once", "skip"].iter().all(|e| s.entries.get(*e).is_some_and(|e| e.total >= 2))
    };
    let end = Instant::now() + T;
    while !sent_twice().await {
        assert!(Instant::now() < end, "{}", first.log());
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    first.signal("KILL");
    first.wait_exit(Duration::from_secs(5)).expect("killed");
    let state = celery_worker::beat::load_state(&app, "beat").await.unwrap().expect("state stored");
    let anchor = state.entries["once"].anchor;
    assert_eq!(state.entries["skip"].anchor, anchor, "both entries share the phase\n{}", first.log());
    let (once, skip) = (len(&app, "beat_once").await, len(&app, "beat_skip").await);
    assert_eq!(once, state.entries["once"].total, "every send was recorded before the kill\n{}", first.log());
    assert_eq!(skip, state.entries["skip"].total, "every send was recorded before the kill\n{}", first.log());
    // Restart 5 s after the last handled due time: +2 s and +4 s were missed; +4 s is 1 s old.
    let restart_at = anchor + chrono::Duration::seconds(5);
    let wait = (restart_at - chrono::Utc::now()).to_std().unwrap_or_default();
    tokio::time::sleep(wait).await;
    let second = beat(&t, &file, &extra);
    assert!(wait_until(T, || leads(&second)), "{}", second.log());
    assert!(wait_len(&app, "beat_once", Duration::from_secs(3), |n| n == once + 1).await);
    assert_eq!(len(&app, "beat_skip").await, skip, "skip sends nothing for missed runs\n{}", second.log());
    // The next due time (+6 s) sends each once more, and nothing repeats.
    assert!(wait_len(&app, "beat_skip", Duration::from_secs(4), |n| n == skip + 1).await);
    assert_eq!(len(&app, "beat_once").await, once + 2, "{}", second.log());
    let log = second.log();
    assert!(log.contains("skipping runs missed"), "{log}");
    assert!(log.contains("folded=1"), "the catch-up covers the two missed runs\n{log}");
}

/// `worker -B`: beat runs inside the worker, which runs what its beat sends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_with_beat_runs_its_entries() {
    let t = Target::log();
    let dir = TempDir::new("beat-worker");
    let file = schedule(&dir, &[("tick", "celery", 1, "run-once")]);
    let (b, r) = t.urls();
    let w = DemoProcess::start_urls(&b, &r, &["worker", "-B", "-s", &file, "--lease", "2"]);
    assert!(w.wait_log("beat: leading", T), "{}", w.log());
    let app = t.app().await;
    let end = Instant::now() + T;
    let last = loop {
        let state = celery_worker::beat::load_state(&app, "beat").await.unwrap().unwrap_or_default();
        match state.entries.get("tick") {
            Some(e) if e.total >= 2 => break e.last_id.clone().expect("an id"),
            _ => assert!(Instant::now() < end, "{}", w.log()),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(app.result(&last).get::<i64>(T).await.unwrap(), 3, "{}", w.log());
}

macro_rules! on_every_broker {
    ($($name:ident),* $(,)?) => {
        mod log_broker {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() { super::$name(super::Target::log()).await }
            )*
        }
        mod redis_broker {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    if let Some(t) = super::Target::redis() { super::$name(t).await }
                }
            )*
        }
        mod amqp_broker {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    if let Some(t) = super::Target::amqp() { super::$name(t).await }
                }
            )*
        }
        mod postgres_broker {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    if let Some(t) = super::Target::postgres() { super::$name(t).await }
                }
            )*
        }
    };
}

on_every_broker!(two_beats_send_each_run_once, kill_9_of_the_leader_hands_over, restart_catches_up_by_policy);

//! Secrets in URLs stay secret: connecting with a wrong token (`log+tcp://`) or a wrong password
//! (`amqp://`, `redis://`) fails with an error that names the URL redacted and never the secret,
//! and no log line written meanwhile (every level) carries it either. The right token still
//! connects, and the connected broker's `Debug` hides it.

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use broker_backends::log::{parse_url, serve_tcp, LogBroker, LogStore};
use celery_tests::{amqp_available, redis_available, TempDir, AMQP, REDIS, TEST_DB};
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::util::SubscriberInitExt;

/// Everything every test in this binary logs, at trace level.
fn captured_logs() -> Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let logs = Arc::new(Mutex::new(Vec::new()));
        let sink = logs.clone();
        tracing_subscriber::fmt()
            .with_max_level(LevelFilter::TRACE)
            .with_writer(move || LogWriter(sink.clone()))
            .finish()
            .try_init()
            .expect("the only subscriber");
        logs
    })
    .clone()
}

struct LogWriter(Arc<Mutex<Vec<u8>>>);

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn assert_logs_hide(secrets: &[&str]) {
    let logs = String::from_utf8_lossy(&captured_logs().lock().unwrap()).into_owned();
    assert!(!logs.is_empty(), "the capture saw no log line: it would prove nothing");
    for s in secrets {
        assert!(!logs.contains(s), "a log line carries `{s}`:\n{logs}");
    }
}

/// Connects broker and backend by `url`; both must fail within 30 s. Returns the two errors.
async fn both_refused(url: &str) -> (String, String) {
    let deadline = Duration::from_secs(30);
    let broker = match tokio::time::timeout(deadline, celery_core::scheme::connect_broker(url)).await {
        Ok(Ok(_)) => panic!("the broker accepted a wrong secret"),
        Ok(Err(e)) => e.to_string(),
        Err(_) => panic!("connecting the broker hung instead of failing"),
    };
    let backend = match tokio::time::timeout(deadline, celery_core::scheme::connect_backend(url)).await {
        Ok(Ok(_)) => panic!("the backend accepted a wrong secret"),
        Ok(Err(e)) => e.to_string(),
        Err(_) => panic!("connecting the backend hung instead of failing"),
    };
    (broker, backend)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_log_token_is_refused_without_printing_it() {
    captured_logs();
    broker_backends::link();
    result_backends::link();
    let dir = TempDir::new("url-secrets");
    let (d, cfg) = parse_url(&dir.url("fsync=os")).unwrap();
    let store = LogStore::open(&d, cfg).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(serve_tcp(store, listener, Some("right-t0ken-1f2e".into()), None));

    let (broker, backend) = both_refused(&format!("log+tcp://{addr}/?token=wr0ng-t0ken-9a8b")).await;
    for e in [&broker, &backend] {
        assert!(e.contains("authentication failed"), "{e}");
        assert!(!e.contains("wr0ng-t0ken-9a8b") && !e.contains("right-t0ken-1f2e"), "{e}");
    }
    // A bad URL names itself redacted.
    let bad = LogBroker::connect(&format!("log+tcp://{addr}/?token=wr0ng-t0ken-9a8b&fsync=os")).await.unwrap_err();
    let bad = bad.to_string();
    assert!(bad.contains(&format!("log+tcp://{addr}/?token=***&fsync=os")) && bad.contains("`fsync`"), "{bad}");

    let good = LogBroker::connect(&format!("log+tcp://{addr}/?token=right-t0ken-1f2e")).await.unwrap();
    let shown = format!("{good:?}");
    assert!(!shown.contains("right-t0ken-1f2e"), "{shown}");
    assert_logs_hide(&["wr0ng-t0ken-9a8b", "right-t0ken-1f2e"]);
    server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_amqp_password_is_refused_without_printing_it() {
    captured_logs();
    broker_backends::link();
    result_backends::link();
    if !amqp_available("url_secrets") {
        return;
    }
    let url = format!("amqp://guest:wr0ng-pa55-7c6d@{AMQP}/%2f");
    let (broker, backend) = both_refused(&url).await;
    let rpc = match tokio::time::timeout(
        Duration::from_secs(30),
        result_backends::rpc::RpcBackend::connect(&format!("rpc://guest:wr0ng-pa55-7c6d@{AMQP}/%2f")),
    )
    .await
    {
        Ok(Ok(_)) => panic!("the rpc backend accepted a wrong password"),
        Ok(Err(e)) => e.to_string(),
        Err(_) => panic!("connecting the rpc backend hung"),
    };
    assert!(backend.contains("no result backend for scheme `amqp`"), "{backend}");
    for e in [&broker, &rpc] {
        assert!(!e.contains("wr0ng-pa55-7c6d"), "{e}");
    }
    let bad = celery_core::scheme::connect_broker(&format!("{url}?prefetch=4")).await.unwrap_err().to_string();
    assert!(bad.contains(&format!("amqp://guest:***@{AMQP}/%2f?prefetch=4")), "{bad}");
    assert_logs_hide(&["wr0ng-pa55-7c6d"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_redis_password_is_refused_without_printing_it() {
    captured_logs();
    broker_backends::link();
    result_backends::link();
    if !redis_available("url_secrets") {
        return;
    }
    let host = REDIS.trim_start_matches("redis://");
    for url in [
        format!("redis://:wr0ng-pa55-5e4f@{host}/{TEST_DB}"),
        format!("redis://{host}/{TEST_DB}?password=wr0ng-pa55-5e4f"),
    ] {
        let (broker, backend) = both_refused(&url).await;
        for e in [&broker, &backend] {
            assert!(!e.contains("wr0ng-pa55-5e4f"), "{e}");
        }
    }
    let bad = celery_core::scheme::connect_backend(&format!("redis://:wr0ng-pa55-5e4f@{host}/{TEST_DB}?expires=1"))
        .await
        .unwrap_err()
        .to_string();
    assert!(bad.contains(&format!("redis://:***@{host}/{TEST_DB}?expires=1")) && bad.contains("`expires`"), "{bad}");
    assert_logs_hide(&["wr0ng-pa55-5e4f"]);
}

/// The same over `redis+cluster://` (the loopback cluster has no password: AUTH is refused).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_redis_cluster_password_is_refused_without_printing_it() {
    captured_logs();
    broker_backends::link();
    result_backends::link();
    let Some(rc) = tokio::task::block_in_place(celery_tests::cluster::RedisCluster::up) else { return };
    let seeds = rc.broker_url().trim_start_matches("redis+cluster://").to_owned();
    let (broker, backend) = both_refused(&format!("redis+cluster://:wr0ng-pa55-5e4f@{seeds}")).await;
    for e in [&broker, &backend] {
        assert!(!e.contains("wr0ng-pa55-5e4f"), "{e}");
    }
    let bad = celery_core::scheme::connect_broker(&format!("redis+cluster://:wr0ng-pa55-5e4f@{seeds}/2"))
        .await
        .unwrap_err()
        .to_string();
    assert!(bad.contains("redis+cluster://:***@127.0.0.1:") && bad.contains("database 0 only"), "{bad}");
    assert_logs_hide(&["wr0ng-pa55-5e4f"]);
}

/// `report` names the broker and the result backend redacted, and what each offers and lacks.
#[test]
fn the_report_says_what_each_side_offers_and_hides_the_token() {
    let dir = TempDir::new("report");
    let url = dir.url("token=r3port-s3cret");
    let run = |broker: &str, backend: &str| {
        let out = std::process::Command::new(celery_tests::demo_bin())
            .args(["--broker", broker, "--backend", backend, "--loglevel", "error", "report"])
            .output()
            .expect("the demo binary runs");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    let log = run(&url, &url);
    assert!(!log.contains("r3port-s3cret") && log.contains("token=***"), "{log}");
    assert!(
        log.contains("broker offers: routing, broadcasts, leases, documents, history\nbroker lacks: none\n"),
        "{log}"
    );
    assert!(log.contains("results offer: chords, claims, history\nresults lack: none\n"), "{log}");
    let memory = run("memory://", "memory://");
    assert!(
        memory.contains("broker offers: leases, documents\nbroker lacks: routing, broadcasts, history\n"),
        "{memory}"
    );
    assert!(memory.contains("tasks: add, "), "{memory}");
}

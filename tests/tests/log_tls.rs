//! `log+tls://`: a `broker serve` with TLS and client certificates (`ServerTls`, as
//! `--tls-cert/--tls-key/--tls-client-ca` builds it) carries tasks and results; a client that cannot
//! verify the server, a client without a certificate, a plain `log+tcp://` client and a wrong token
//! are all refused with an error, never left hanging.

use std::time::Duration;

use broker_backends::log::{parse_url, serve_tcp, LogBroker, LogStore, ServerTls};
use celery_tests::{TempDir, TestPki};
use celery_worker::prelude::*;

#[task]
async fn tls_mul(x: i64, y: i64) -> i64 {
    x * y
}

async fn refused(url: &str) -> String {
    match tokio::time::timeout(Duration::from_secs(15), LogBroker::connect(url)).await {
        Ok(Ok(_)) => panic!("{url} was accepted"),
        Ok(Err(e)) => e.to_string(),
        Err(_) => panic!("{url}: connecting hung instead of failing"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_and_results_travel_over_tls_and_strangers_are_refused() {
    let pki = TestPki::new();
    let dir = TempDir::new("log-tls");
    let (d, cfg) = parse_url(&format!("log://{}?lease_timeout=1&fsync=os", dir.0.display())).unwrap();
    let store = LogStore::open(&d, cfg).unwrap();
    let tls = ServerTls::from_pem(
        pki.path("server.pem").as_ref(),
        pki.path("server.key").as_ref(),
        Some(pki.path("ca.pem").as_ref()),
    )
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(serve_tcp(store, listener, Some("s3cret".into()), Some(tls)));

    let base = format!("log+tls://{addr}?token=s3cret");
    let untrusted = refused(&base).await;
    assert!(untrusted.to_lowercase().contains("certificate"), "an unknown server CA is refused: {untrusted}");
    let trusted = format!("{base}&ca_certs={}", pki.path("ca.pem"));
    let no_cert = refused(&trusted).await;
    assert!(no_cert.starts_with("broker connection error"), "the server asks for a client certificate: {no_cert}");
    let plain = refused(&format!("log+tcp://{addr}?token=s3cret")).await;
    assert!(plain.starts_with("broker connection error"), "plain TCP to a TLS server: {plain}");

    let certs = format!(
        "ca_certs={}&certfile={}&keyfile={}",
        pki.path("ca.pem"),
        pki.path("client.pem"),
        pki.path("client.key")
    );
    let wrong_token = refused(&format!("log+tls://{addr}?token=nope&{certs}")).await;
    assert!(wrong_token.contains("authentication failed"), "{wrong_token}");
    // The certificate names the server both as 127.0.0.1 and as localhost.
    let by_name = format!("log+tls://localhost:{}?token=s3cret&{certs}", addr.port());
    LogBroker::connect(&by_name).await.expect("the server's name is verified");

    let url = format!("{base}&{certs}");
    let app = celery_worker::connect(&url, &url).await.unwrap();
    let worker_app = celery_worker::connect(&url, &url).await.unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let worker = tokio::spawn(
        Worker::new(worker_app, WorkerConfig { concurrency: 4, ..WorkerConfig::default() }).run_until(async {
            let _ = stopped.await;
        }),
    );
    let results = app.send_batch((0..20).map(|i| tls_mul::new(i, 3))).await.unwrap();
    for (i, r) in results.iter().enumerate() {
        assert_eq!(r.get::<i64>(Duration::from_secs(20)).await.unwrap(), i as i64 * 3);
    }
    let _ = stop.send(());
    worker.await.unwrap().unwrap();
    server.abort();
}

/// `broker serve --tls-cert --tls-key --tls-client-ca` in its own process, a worker process and this
/// process all on `log+tls://`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_serve_with_tls_flags_serves_worker_processes() {
    use celery_tests::{free_port, wait_until, DemoProcess};
    const T: Duration = Duration::from_secs(30);
    let pki = TestPki::new();
    let dir = TempDir::new("log-tls-serve");
    let listen = format!("127.0.0.1:{}", free_port());
    let data = dir.0.display().to_string();
    let server = DemoProcess::start_urls(
        "unused://",
        "unused://",
        &[
            "broker",
            "serve",
            "--data",
            &data,
            "--listen",
            &listen,
            "--tls-cert",
            &pki.path("server.pem"),
            "--tls-key",
            &pki.path("server.key"),
            "--tls-client-ca",
            &pki.path("ca.pem"),
        ],
    );
    assert!(wait_until(T, || std::net::TcpStream::connect(&listen).is_ok()), "{}", server.log());
    assert!(server.log().contains(&format!("log+tls://{listen}")), "{}", server.log());
    let url = format!(
        "log+tls://{listen}?ca_certs={}&certfile={}&keyfile={}",
        pki.path("ca.pem"),
        pki.path("client.pem"),
        pki.path("client.key")
    );
    let worker = DemoProcess::start_urls(&url, &url, &["worker", "-c", "2"]);
    assert!(worker.wait_log("worker ready", T), "{}", worker.log());
    let app = celery_worker::connect(&url, &url).await.unwrap();
    let r = app.send(celery_core::Signature::by_name("add").args(serde_json::json!([40, 2]))).await.unwrap();
    assert_eq!(r.get::<i64>(T).await.unwrap(), 42, "{}\n{}", worker.log(), server.log());
}

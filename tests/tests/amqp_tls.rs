//! `amqps://`: tasks and `rpc://` results over TLS to the real RabbitMQ, with the server
//! verified against `ca_certs` and a client certificate (`certfile`, `keyfile`); a server the
//! client cannot verify, or a client without a certificate, is refused with an error.

use std::time::Duration;

use celery_tests::{amqp_available, AmqpTlsListener, AmqpVhost};
use celery_worker::prelude::*;

#[task]
async fn tls_add(x: i64, y: i64) -> i64 {
    x + y
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_and_rpc_results_travel_over_tls() {
    if !amqp_available("amqp_tls") {
        return;
    }
    let vhost = AmqpVhost::new();
    let tls = AmqpTlsListener::start();
    let base = format!("amqps://guest:guest@127.0.0.1:{}/{}", tls.port, vhost.0);

    let untrusted = celery_worker::connect(&base, "memory://").await.unwrap_err().to_string();
    assert!(untrusted.to_lowercase().contains("certificate"), "an unknown server CA is refused: {untrusted}");
    let trusted = format!("{base}?ca_certs={}", tls.pki.path("ca.pem"));
    let no_cert = celery_worker::connect(&trusted, "memory://").await.unwrap_err().to_string();
    // The server's alert (CertificateRequired) or, when it closes first, a reset.
    assert!(no_cert.starts_with("broker connection error"), "the server asks for a client certificate: {no_cert}");

    let url = format!("{trusted}&certfile={}&keyfile={}", tls.pki.path("client.pem"), tls.pki.path("client.key"));
    let app = celery_worker::connect(&url, "rpc://").await.unwrap();
    let worker_app = celery_worker::connect(&url, "rpc://").await.unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let worker = tokio::spawn(
        Worker::new(worker_app, WorkerConfig { concurrency: 4, ..WorkerConfig::default() }).run_until(async {
            let _ = stopped.await;
        }),
    );
    let results = app.send_batch((0..20).map(|i| tls_add::new(i, 1))).await.unwrap();
    for (i, r) in results.iter().enumerate() {
        assert_eq!(r.get::<i64>(Duration::from_secs(20)).await.unwrap(), i as i64 + 1);
    }
    let _ = stop.send(());
    worker.await.unwrap().unwrap();
}

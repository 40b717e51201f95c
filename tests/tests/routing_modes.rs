//! RabbitMQ's working modes through exchanges and bindings, on every broker that offers them:
//! publish/subscribe (fanout), routing (direct), topics, headers, unroutable publishes, and
//! declarations that survive a restart, on the log broker and on RabbitMQ (native exchanges). Redis offers
//! direct and topic (Kombu's binding sets) and
//! refuses fanout and headers with a clear error.

use std::time::Duration;

use celery_core::capability::Routing;
use celery_core::routing::{Binding, ExchangeKind, Route};
use celery_core::{protocol::Message, Broker, BrokerError, Signature};
use celery_tests::Target;
use serde_json::json;

fn msg(n: i64) -> Message {
    Message::from_signature(&Signature::by_name("add").args(json!([n, n])).header("format", json!("pdf"))).unwrap()
}

async fn queued(b: &dyn Broker, q: &str) -> u64 {
    b.queue_len(q).await.unwrap()
}

/// A queue name unique to this run (Redis keys are prefixed anyway; this keeps logs readable).
fn q(name: &str) -> String {
    format!("rm.{name}")
}

async fn direct_and_topic(t: Target) {
    let app = t.app().await;
    let b = app.broker().as_ref();
    let r = b.require_routing("routing tests").unwrap();
    r.declare_exchange("direct_logs", ExchangeKind::Direct).await.unwrap();
    r.bind(&Binding::new("direct_logs", q("errors"), "error")).await.unwrap();
    for sev in ["info", "warning", "error"] {
        r.bind(&Binding::new("direct_logs", q("all"), sev)).await.unwrap();
    }
    b.publish(&Route::exchange("direct_logs", "error"), &msg(1)).await.unwrap();
    b.publish(&Route::exchange("direct_logs", "info"), &msg(2)).await.unwrap();
    assert_eq!((queued(b, &q("errors")).await, queued(b, &q("all")).await), (1, 2));

    r.declare_exchange("topic_logs", ExchangeKind::Topic).await.unwrap();
    r.bind(&Binding::new("topic_logs", q("any_error"), "*.error")).await.unwrap();
    r.bind(&Binding::new("topic_logs", q("kern"), "kern.#")).await.unwrap();
    b.publish(&Route::exchange("topic_logs", "kern.error"), &msg(3)).await.unwrap();
    b.publish(&Route::exchange("topic_logs", "kern.disk.full"), &msg(4)).await.unwrap();
    b.publish(&Route::exchange("topic_logs", "app.error"), &msg(5)).await.unwrap();
    assert_eq!((queued(b, &q("any_error")).await, queued(b, &q("kern")).await), (2, 2));

    // Unroutable: dropped (and counted) unless mandatory, then an error.
    b.publish(&Route::exchange("topic_logs", "nothing.here"), &msg(6)).await.unwrap();
    let mandatory = Route { mandatory: true, ..Route::exchange("topic_logs", "nothing.here") };
    match b.publish(&mandatory, &msg(7)).await {
        Err(e @ BrokerError::Operation { .. }) => assert!(e.to_string().contains("unroutable"), "{e}"),
        other => panic!("expected an unroutable error, got {other:?}"),
    }
    // Through the producer API: a task sent to an exchange is consumed from the bound queue.
    let sent =
        app.send(Signature::by_name("add").args(json!([1, 1])).exchange("direct_logs").routing_key("error")).await;
    sent.unwrap();
    assert_eq!(queued(b, &q("errors")).await, 2);
}

async fn fanout_and_headers(t: Target) {
    let app = t.app().await;
    let b = app.broker().as_ref();
    let r = b.require_routing("routing tests").unwrap();
    r.declare_exchange("logs", ExchangeKind::Fanout).await.unwrap();
    for name in ["sub1", "sub2", "sub3"] {
        r.bind(&Binding::new("logs", q(name), "")).await.unwrap();
    }
    b.publish(&Route::exchange("logs", "whatever"), &msg(1)).await.unwrap();
    for name in ["sub1", "sub2", "sub3"] {
        assert_eq!(queued(b, &q(name)).await, 1, "every bound queue receives: {name}");
    }
    r.declare_exchange("by_headers", ExchangeKind::Headers).await.unwrap();
    let want: serde_json::Map<String, serde_json::Value> =
        serde_json::from_value(json!({"format": "pdf", "type": "report"})).unwrap();
    r.bind(&Binding::headers("by_headers", q("all_match"), want.clone(), true)).await.unwrap();
    r.bind(&Binding::headers("by_headers", q("any_match"), want, false)).await.unwrap();
    b.publish(&Route::exchange("by_headers", ""), &msg(2)).await.unwrap();
    assert_eq!((queued(b, &q("all_match")).await, queued(b, &q("any_match")).await), (0, 1));
    assert!(r.declare_exchange("logs", ExchangeKind::Direct).await.is_err(), "redeclared with another kind");
}

async fn redis_refuses_what_it_cannot_do(t: Target) {
    let app = t.app().await;
    match app.broker().require_routing("routing tests").unwrap().declare_exchange("logs", ExchangeKind::Fanout).await {
        Err(BrokerError::Unsupported { broker, option }) => {
            assert_eq!(broker, "redis");
            assert!(option.contains("Fanout"), "{option}");
        }
        other => panic!("expected Unsupported, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_direct_and_topic() {
    direct_and_topic(Target::log()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_fanout_and_headers() {
    fanout_and_headers(Target::log()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_tcp_direct_and_topic() {
    direct_and_topic(Target::log_tcp().await).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_tcp_fanout_and_headers() {
    fanout_and_headers(Target::log_tcp().await).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_direct_and_topic() {
    if let Some(t) = Target::redis() {
        direct_and_topic(t).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_fanout_is_refused_with_a_clear_error() {
    if let Some(t) = Target::redis() {
        redis_refuses_what_it_cannot_do(t).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_declarations_persist_across_a_restart() {
    let dir = celery_tests::TempDir::new("routing-persist");
    let url = dir.url("");
    {
        let b = broker_backends::log::LogBroker::connect(&url).await.unwrap();
        b.declare_exchange("logs", ExchangeKind::Fanout).await.unwrap();
        b.bind(&Binding::new("logs", "persisted", "")).await.unwrap();
    }
    // A new process would reopen the directory; here a second store after the first is gone.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let b = broker_backends::log::LogBroker::connect(&url).await.unwrap();
    b.publish(&Route::exchange("logs", ""), &msg(1)).await.unwrap();
    assert_eq!(b.queue_len("persisted").await.unwrap(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_direct_and_topic() {
    if let Some(t) = Target::amqp() {
        direct_and_topic(t).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_fanout_and_headers() {
    if let Some(t) = Target::amqp() {
        fanout_and_headers(t).await
    }
}

//! RabbitMQ queue opt-ins: priority queues (`?max_priority=10`: a waiting high-priority task is
//! delivered before earlier low-priority ones) and quorum queues (`?queue_type=quorum&max_deliveries=N`:
//! a message delivered N times without an ack goes to `<queue>.dead`).

use std::time::Duration;

use celery_core::Signature;
use celery_tests::{amqp_available, AmqpVhost};
use serde_json::json;

const T: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_high_priority_task_overtakes_waiting_ones() {
    if !amqp_available("amqp_priority") {
        return;
    }
    let vhost = AmqpVhost::new();
    let url = format!("{}?max_priority=10", vhost.url());
    let app = celery_worker::connect(&url, "memory://").await.unwrap();
    let low =
        app.send_batch((0..5).map(|i| Signature::by_name("add").args(json!([i, 0])).queue("prio").priority(1))).await;
    low.unwrap();
    let high = app.send(Signature::by_name("add").args(json!([9, 9])).queue("prio").priority(9)).await.unwrap();
    let mut consumer = app.broker().consume(&["prio".to_string()], 1).await.unwrap();
    let mut first = tokio::time::timeout(T, consumer.next()).await.unwrap().unwrap();
    assert_eq!(first.message().as_ref().unwrap().headers.id, high.id(), "the priority-9 task comes first");
    first.ack().await.unwrap();
    for _ in 0..5 {
        let mut d = tokio::time::timeout(T, consumer.next()).await.unwrap().unwrap();
        assert_eq!(d.message().as_ref().unwrap().properties.priority, Some(1));
        d.ack().await.unwrap();
    }
    consumer.close().await;
    assert!(celery_worker::connect(&format!("{}?max_priority=0", vhost.url()), "memory://").await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quorum_queue_dead_letters_a_message_delivered_too_often() {
    if !amqp_available("amqp_priority") {
        return;
    }
    let vhost = AmqpVhost::new();
    let url = format!("{}?queue_type=quorum&max_deliveries=2", vhost.url());
    let app = celery_worker::connect(&url, "memory://").await.unwrap();
    let sent = app.send(Signature::by_name("add").args(json!([1, 1])).queue("poison")).await.unwrap();
    let mut consumer = app.broker().consume(&["poison".to_string()], 1).await.unwrap();
    for attempt in 1..=3 {
        let mut d = tokio::time::timeout(T, consumer.next()).await.unwrap().unwrap();
        assert_eq!(d.message().as_ref().unwrap().headers.id, sent.id(), "delivery {attempt}");
        d.requeue().await.unwrap();
    }
    let end = tokio::time::Instant::now() + T;
    while app.broker().queue_len("poison.dead").await.unwrap() != 1 {
        assert!(tokio::time::Instant::now() < end, "not dead-lettered after 3 deliveries");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(app.broker().queue_len("poison").await.unwrap(), 0);
    consumer.close().await;
    let both = format!("{}?queue_type=quorum&max_priority=5", vhost.url());
    assert!(celery_worker::connect(&both, "memory://").await.is_err(), "priorities need classic queues");
}

//! `Broker::peek` and the monitor's dead-letter actions on every broker: peeking shows the oldest
//! messages in order and takes nothing; retrying or discarding one dead letter leaves the others
//! there, uncounted. RabbitMQ refuses to peek (it cannot look without taking and counting).

use std::time::Duration;

use celery_core::broker::{DEAD_LETTER_QUEUE, DEAD_LETTER_REASON};
use celery_core::protocol::Message;
use celery_core::routing::Route;
use celery_core::{App, BrokerError, Signature};
use celery_tests::Target;
use celery_worker::monitor::dead::{act, list, Action};
use serde_json::json;

const T: Duration = Duration::from_secs(30);

/// Dead letters of queue `q-<tag>`; the queue's name and their ids, oldest first.
async fn dead_letters(app: &App, n: usize) -> (String, Vec<String>) {
    let queue = format!("q-{}", uuid::Uuid::new_v4().simple());
    let mut ids = Vec::new();
    for i in 0..n {
        let mut m = Message::from_signature(&Signature::by_name("add").args(json!([i]))).unwrap();
        m.headers.extra.insert(DEAD_LETTER_REASON.into(), "bad".into());
        m.headers.extra.insert(DEAD_LETTER_QUEUE.into(), queue.clone().into());
        app.broker().publish(&Route::queue(format!("{queue}.dead")), &m).await.unwrap();
        ids.push(m.headers.id);
    }
    (queue, ids)
}

fn ids(list: &[celery_worker::monitor::dead::DeadLetter]) -> Vec<String> {
    list.iter().map(|d| d.id.clone()).collect()
}

async fn peek_and_act(target: Target) {
    let app = target.app().await;
    let (queue, sent) = dead_letters(&app, 5).await;
    let dlq = format!("{queue}.dead");
    for _ in 0..12 {
        assert_eq!(ids(&list(&app, &queue).await.unwrap()), sent);
    }
    let first_two = app.broker().peek(&dlq, 2).await.unwrap();
    assert_eq!(first_two.iter().map(|m| m.as_ref().unwrap().headers.id.clone()).collect::<Vec<_>>(), sent[..2]);
    assert_eq!(app.broker().queue_len(&dlq).await.unwrap(), 5);

    // Act on the last ones, passing over the first two again and again.
    assert!(act(&app, &queue, &sent[4], Action::Discard).await.unwrap());
    assert!(act(&app, &queue, &sent[3], Action::Retry).await.unwrap());
    assert!(act(&app, &queue, &sent[2], Action::Discard).await.unwrap());
    assert!(!act(&app, &queue, "no-such-task", Action::Discard).await.unwrap());
    assert_eq!(ids(&list(&app, &queue).await.unwrap()), sent[..2]);
    assert_eq!(app.broker().queue_len(&format!("{dlq}.dead")).await.unwrap(), 0, "dead-lettered again");

    // The retried one is back in its queue; the others come to a consumer as first deliveries.
    let back = app.broker().peek(&queue, 5).await.unwrap();
    assert_eq!(back.len(), 1);
    assert_eq!(back[0].as_ref().unwrap().headers.id, sent[3]);
    let mut c = app.broker().consume(std::slice::from_ref(&dlq), 4).await.unwrap();
    for _ in 0..2 {
        let d = tokio::time::timeout(T, c.next()).await.unwrap().unwrap();
        assert!(!d.redelivered, "a pass counted a delivery");
        d.ack().await.unwrap();
    }
    c.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peek_and_act_log() {
    peek_and_act(Target::log()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peek_and_act_log_tcp() {
    peek_and_act(Target::log_tcp().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peek_and_act_redis() {
    if let Some(t) = Target::redis() {
        peek_and_act(t).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peek_and_act_postgres() {
    if let Some(t) = Target::postgres() {
        peek_and_act(t).await;
    }
}

/// RabbitMQ: peek is refused with the reason, and nothing was taken (the page shows the depth).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_refuses_to_peek_and_takes_nothing() {
    let Some(target) = Target::amqp() else { return };
    let app = target.app().await;
    let (queue, _) = dead_letters(&app, 2).await;
    let dlq = format!("{queue}.dead");
    let err = app.broker().peek(&dlq, 10).await.unwrap_err();
    assert!(matches!(err, BrokerError::Unsupported { broker: "amqp", .. }), "{err}");
    assert!(err.to_string().contains("peek"), "{err}");
    assert!(list(&app, &queue).await.unwrap_err().contains("peek"));
    let deadline = tokio::time::Instant::now() + T;
    while app.broker().queue_len(&dlq).await.unwrap() != 2 {
        assert!(tokio::time::Instant::now() < deadline, "the dead letters are not all there");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = app.broker().purge(&dlq).await;
}

//! Transactional enqueue: an order row and the task that mails its receipt, committed together —
//! the task runs if and only if the order exists.
//!
//! ```text
//! cargo run --example transactional -- postgres://app@db:5432/app
//! ```
//! The broker and result backend come from `CELERY_BROKER_URL` and `CELERY_RESULT_BACKEND`; by
//! default both are the order database itself (the PostgreSQL broker), and the task row is
//! written by the order's transaction. With any other broker the task goes through the outbox
//! table in the order database: run `demo outbox-relay --db URL` or `demo worker --outbox URL`
//! to forward it. `demo worker` runs the `echo` task it sends.

use celery_worker::outbox::tokio_postgres::{self, NoTls};
use celery_worker::prelude::*;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let db = std::env::args().nth(1).unwrap_or_else(|| "postgres://postgres@127.0.0.1:5432/test".into());
    let broker = std::env::var("CELERY_BROKER_URL").unwrap_or_else(|_| db.clone());
    let backend = std::env::var("CELERY_RESULT_BACKEND").unwrap_or_else(|_| format!("db+{db}"));
    let app = celery_worker::connect(&broker, &backend).await?;
    if app.broker().kind() != "postgres" {
        // The outbox's tables (a relay creates them too); a no-op once they exist.
        celery_worker::outbox::install(&db).await?;
    }

    let (mut client, conn) = tokio_postgres::connect(&db, NoTls).await?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            eprintln!("order database: {e}");
        }
    });
    client
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS demo_orders \
             (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, total_cents bigint NOT NULL)",
        )
        .await?;

    let tx = client.transaction().await?;
    let order: i64 =
        tx.query_one("INSERT INTO demo_orders (total_cents) VALUES ($1) RETURNING id", &[&990i64]).await?.get(0);
    let path = app.enqueue_path(&tx).await?;
    let receipt = app.send_in(&tx, Signature::by_name("echo").args(serde_json::json!([{ "receipt": order }]))).await?;
    tx.commit().await?; // the task exists from here on; after a rollback it never would
    println!("order {order}: receipt task {} sent ({path:?} path)", receipt.id());
    Ok(())
}

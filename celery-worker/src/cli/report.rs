//! `report`: what this binary is and what it is connected to, as Celery's `celery report` does
//! for Python: the software, the broker and the result backend (URLs redacted), what each offers
//! and lacks, and the registered tasks.

use std::process::ExitCode;

use celery_core::capability::Capabilities;
use celery_core::url::redacted;
use celery_core::{registry, App};

/// `report`: prints one `key: value` line each, for a bug report or a support question.
pub(super) fn report(app: &App, broker_url: &str, backend_url: &str) -> ExitCode {
    let broker = Capabilities::of_broker(app.broker().as_ref());
    let backend = Capabilities::of_backend(app.backend().as_ref());
    println!("software: celery-rs {} (Celery protocol 2, JSON)", env!("CARGO_PKG_VERSION"));
    println!("broker: {} ({})", redacted(broker_url), app.broker().kind());
    println!("broker offers: {broker}");
    println!("broker lacks: {}", broker.lacking(Capabilities::BROKER));
    println!("results: {} ({})", redacted(backend_url), app.backend().kind());
    println!("results offer: {backend}");
    println!("results lack: {}", backend.lacking(Capabilities::BACKEND));
    let tasks: Vec<&str> = registry::tasks().iter().map(|e| e.name).collect();
    println!("tasks: {}", tasks.join(", "));
    ExitCode::SUCCESS
}

//! `celery`: the operator's command line, with no task code of its own. It sends tasks by name
//! with JSON arguments, reads results, prints events, inspects and controls workers, purges
//! queues, changes beat's run-time entries, serves the built-in broker and relays a transactional
//! outbox, so looking at a queue does not need the application built:
//!
//! ```text
//! celery --broker redis://127.0.0.1:6379/0 send add --args '[2, 3]' --wait
//! celery events
//! celery inspect ping
//! celery control revoke 4f6a... --terminate
//! celery purge -Q celery
//! celery beat list
//! celery broker serve --data ./celery-data --listen 127.0.0.1:7575
//! celery --broker redis://127.0.0.1:6379/0 outbox-relay --db postgres://app@db/app
//! ```

// glibc's malloc serializes frees of memory allocated on another thread, which a broker server and
// a worker do all the time; mimalloc does not (`--no-default-features` keeps the system allocator).
#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    celery_worker::cli::run()
}

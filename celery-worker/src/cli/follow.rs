//! `send --wait` and `result --wait` follow the task until it is ready: the states it reports
//! while it runs (`PROGRESS` with `{"done": n, "total": m}`) show on stderr as a progress bar on a
//! terminal (indicatif) and as one plain line per change otherwise (`PROGRESS 40/100`), so stdout
//! keeps only the result.

use std::io::IsTerminal;
use std::time::Duration;

use celery_core::progress::Progress;
use celery_core::{AsyncResult, TaskMeta};
use futures::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};

/// How often the backend is read while the task runs.
const POLL: Duration = Duration::from_millis(100);

/// Where the reports go.
enum Display {
    Bar(ProgressBar),
    Lines,
}

impl Display {
    fn new() -> Display {
        if !std::io::stderr().is_terminal() {
            return Display::Lines;
        }
        let bar = ProgressBar::new(0);
        let style = ProgressStyle::with_template("{prefix} [{bar:40}] {pos}/{len} {msg}")
            .map(|s| s.progress_chars("=> "))
            .unwrap_or_else(|_| ProgressStyle::default_bar());
        bar.set_style(style);
        Display::Bar(bar)
    }

    fn show(&self, meta: &TaskMeta) {
        let progress = Progress::from_meta(&meta.result);
        match self {
            Display::Bar(bar) => {
                bar.set_prefix(meta.status.to_string());
                match progress {
                    Some(p) => {
                        bar.set_length(p.total.unwrap_or(p.done));
                        bar.set_position(p.done);
                        bar.set_message(String::new());
                    }
                    None => bar.set_message(meta.result.to_string()),
                }
            }
            Display::Lines => match progress {
                Some(Progress { done, total: Some(total) }) => eprintln!("{} {done}/{total}", meta.status),
                Some(Progress { done, total: None }) => eprintln!("{} {done}", meta.status),
                None => eprintln!("{} {}", meta.status, meta.result),
            },
        }
    }

    fn finish(&self) {
        if let Display::Bar(bar) = self {
            bar.finish_and_clear();
        }
    }
}

/// Follows `res` for at most `timeout`, showing each report; returns the ready document, or
/// `None` when the time ran out first.
pub(super) async fn follow(res: &AsyncResult, timeout: Duration) -> anyhow::Result<Option<TaskMeta>> {
    let display = Display::new();
    let mut updates = Box::pin(res.progress(POLL));
    let deadline = celery_core::clock::instant_after(timeout);
    let ready = loop {
        let next = match tokio::time::timeout_at(deadline, updates.next()).await {
            Ok(Some(next)) => next,
            Ok(None) | Err(_) => break None,
        };
        let meta = match next {
            Ok(meta) => meta,
            Err(e) => {
                display.finish();
                return Err(e.into());
            }
        };
        if meta.status.is_ready() {
            break Some(meta);
        }
        display.show(&meta);
    };
    display.finish();
    Ok(ready)
}

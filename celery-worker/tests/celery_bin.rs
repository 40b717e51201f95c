//! The standalone `celery` binary works on a queue without any task code.

use std::process::Command;

fn celery(dir: &std::path::Path, args: &[&str]) -> (bool, String) {
    let url = format!("log://{}", dir.display());
    let out = Command::new(env!("CARGO_BIN_EXE_celery"))
        .args(args)
        .env("CELERY_BROKER_URL", &url)
        .env("CELERY_RESULT_BACKEND", &url)
        .output()
        .expect("run celery");
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

#[test]
fn sends_by_name_reads_results_and_purges_without_task_code() {
    let dir = std::env::temp_dir().join(format!("celery-bin-{}", std::process::id()));
    let (ok, out) = celery(&dir, &["send", "reports.daily", "--args", "[1, 2]", "--queue", "reports"]);
    assert!(ok, "{out}");
    let id = out.lines().find(|l| l.len() == 36).expect("the task id").to_owned();
    let (ok, out) = celery(&dir, &["result", &id, "--json"]);
    assert!(ok && out.contains("\"PENDING\""), "{out}");
    let (ok, out) = celery(&dir, &["purge", "-Q", "reports"]);
    assert!(ok && out.contains("purged 1 messages from reports"), "{out}");
    let (ok, out) = celery(&dir, &["tasks"]);
    assert!(ok && out.contains("celery.map") && !out.contains("reports.daily"), "{out}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn urls_are_printed_without_their_secrets() {
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_celery"))
            .args(args)
            .env("CELERY_BROKER_URL", "redis://:s3cret@127.0.0.1:1/0?bogus=1")
            .env("CELERY_RESULT_BACKEND", "log+tcp://127.0.0.1:1/?token=t0ken")
            .output()
            .expect("run celery");
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
    };
    let help = run(&["--help"]);
    assert!(help.contains("CELERY_BROKER_URL") && !help.contains("s3cret") && !help.contains("t0ken"), "{help}");
    let out = run(&["send", "reports.daily"]);
    assert!(out.contains("redis://:***@127.0.0.1:1/0?bogus=1"), "{out}");
    assert!(out.contains("unknown redis:// option `bogus`"), "{out}");
    assert!(out.contains("log+tcp://127.0.0.1:1/?token=***"), "{out}");
    assert!(!out.contains("s3cret") && !out.contains("t0ken"), "{out}");
}

//! Headless Chromium for the suites that look at web pages (`monitor_browser`, `celery_tools`):
//! Debian's `chromium`, driven by `playwright-core` from npm, both installed on first use. The
//! scripts live in `tests/browser/`; [`script`] copies one next to `node_modules` so that node
//! resolves `playwright-core` from it.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::services_required;

/// The directory that holds `node_modules/playwright-core` (Chromium installed too), or `None`
/// after printing why `suite` is skipped (a panic under `CELERY_REQUIRE_SERVICES=1`).
pub fn playwright(suite: &str) -> Option<PathBuf> {
    let fail = |why: String| {
        if services_required() {
            panic!("{suite}: {why}");
        }
        eprintln!("SKIPPED {suite}: {why}");
        None
    };
    if !Path::new("/usr/bin/chromium").exists() {
        let install =
            || Command::new("apt-get").args(["install", "-y", "-q", "chromium"]).status().is_ok_and(|s| s.success());
        let ok = install()
            || (Command::new("apt-get").args(["update", "-q"]).status().is_ok_and(|s| s.success()) && install());
        if !ok {
            return fail("cannot install Debian's chromium (apt-get install chromium)".into());
        }
    }
    let home = std::env::var("HOME").unwrap_or_else(|_| "/tmp".into());
    let dir = PathBuf::from(home).join(".cache/celery-rs-playwright");
    if !dir.join("node_modules/playwright-core").exists() {
        let _ = std::fs::create_dir_all(&dir);
        let ok = Command::new("npm")
            .args(["install", "--silent", "--no-audit", "--no-fund", "playwright-core@1"])
            .current_dir(&dir)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            return fail("cannot install playwright-core with npm".into());
        }
    }
    Some(dir)
}

/// Copies `tests/browser/<name>` into the playwright directory `pw` and returns the copy's path.
pub fn script(pw: &Path, name: &str) -> PathBuf {
    let to = pw.join(name);
    let from = Path::new(env!("CARGO_MANIFEST_DIR")).join("browser").join(name);
    std::fs::copy(&from, &to).unwrap_or_else(|e| panic!("copy {} to {}: {e}", from.display(), to.display()));
    to
}

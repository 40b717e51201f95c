//! What the process and its host say about themselves, for `stats`, `memsample`, `memdump` and
//! `report`: read from Linux's `/proc` (this crate forbids `unsafe`, so no `getrusage` call).
//! Elsewhere these read as Celery's "not available" answers.

use serde_json::{json, Value};

/// The fields of Python's `resource.getrusage(RUSAGE_SELF)` as Celery's `stats` shows them, from
/// `/proc/self/stat`, `/proc/self/status` (summed over threads), and `/proc/self/io`; `None`
/// without `/proc`. The fields Linux's getrusage leaves at zero (`ixrss`, `idrss`, `isrss`,
/// `nswap`, `msgsnd`, `msgrcv`, `nsignals`) are zero here too. CPU times assume Linux's fixed
/// USER_HZ of 100 ticks per second.
pub(crate) fn rusage() -> Option<Value> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // `state` is field 3 of the file, so field N is f[N - 3].
    let field = |n: usize| f.get(n - 3).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    let ticks = 100.0;
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let (mut nvcsw, mut nivcsw) = (0, 0);
    match std::fs::read_dir("/proc/self/task") {
        Ok(tasks) => {
            for t in tasks.flatten().take(100_000) {
                let s = std::fs::read_to_string(t.path().join("status")).unwrap_or_default();
                nvcsw += status_field(&s, "voluntary_ctxt_switches:");
                nivcsw += status_field(&s, "nonvoluntary_ctxt_switches:");
            }
        }
        Err(_) => {
            nvcsw = status_field(&status, "voluntary_ctxt_switches:");
            nivcsw = status_field(&status, "nonvoluntary_ctxt_switches:");
        }
    }
    let io = std::fs::read_to_string("/proc/self/io").unwrap_or_default();
    Some(json!({
        "utime": field(14) as f64 / ticks,
        "stime": field(15) as f64 / ticks,
        "maxrss": status_field(&status, "VmHWM:"),
        "ixrss": 0, "idrss": 0, "isrss": 0,
        "minflt": field(10),
        "majflt": field(12),
        "nswap": 0,
        "inblock": status_field(&io, "read_bytes:") / 512,
        "oublock": status_field(&io, "write_bytes:") / 512,
        "msgsnd": 0, "msgrcv": 0, "nsignals": 0,
        "nvcsw": nvcsw,
        "nivcsw": nivcsw,
    }))
}

/// The number after `key` in a `/proc` key-value file (kB values stay in kB).
fn status_field(text: &str, key: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// The resident set size in bytes, if the OS tells.
pub(crate) fn rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status.lines().any(|l| l.starts_with("VmRSS:")).then(|| status_field(&status, "VmRSS:") * 1024)
}

/// Celery's `humanbytes`: `12.5MB`, `512b`.
pub(crate) fn humanbytes(n: u64) -> String {
    const UNITS: [(f64, &str); 5] =
        [(1099511627776.0, "TB"), (1073741824.0, "GB"), (1048576.0, "MB"), (1024.0, "KB"), (0.0, "b")];
    let s = n as f64;
    let (div, unit) = UNITS.iter().find(|(div, _)| s >= *div).copied().unwrap_or((0.0, "b"));
    let v = if div > 0.0 { s / div } else { s };
    format!("{}{unit}", hfloat(v))
}

/// Celery's `hfloat`: an integral value as an integer, else 5 significant digits.
fn hfloat(f: f64) -> String {
    if f.fract() == 0.0 {
        return format!("{}", f as u64);
    }
    let digits = if f >= 1.0 { f.log10().floor() as i32 + 1 } else { 1 };
    let decimals = (5 - digits).max(0) as usize;
    let s = format!("{f:.decimals$}");
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_owned()
    } else {
        s
    }
}

/// The seconds of the system's monotonic clock (Python's `time.monotonic()` on Linux: the
/// uptime), for the timestamps Celery keeps revoked ids with.
pub(crate) fn monotonic_secs() -> f64 {
    std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(0.0)
}

/// The kernel's release (`platform.release()`).
pub(crate) fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease").map(|s| s.trim().to_owned()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn humanbytes_as_celery() {
        assert_eq!(humanbytes(512), "512b");
        assert_eq!(humanbytes(2048), "2KB");
        assert_eq!(humanbytes(1536 * 1024), "1.5MB");
        assert_eq!(humanbytes(12_345_678), "11.774MB");
    }

    #[test]
    fn rusage_reads_this_process_on_linux() {
        if !std::path::Path::new("/proc/self/stat").exists() {
            return;
        }
        let r = rusage().unwrap();
        for key in ["utime", "stime", "maxrss", "minflt", "majflt", "inblock", "oublock", "nvcsw", "nivcsw"] {
            assert!(r.get(key).is_some(), "{key}");
        }
        assert!(r["maxrss"].as_u64().unwrap() > 0, "{r}");
        assert!(r["nvcsw"].as_u64().unwrap() + r["nivcsw"].as_u64().unwrap() > 0, "{r}");
        assert!(rss_bytes().unwrap() > 0);
        assert!(monotonic_secs() > 0.0);
    }
}

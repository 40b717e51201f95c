//! The URLs of the built-in broker: `log://PATH?options` (a data directory and the store's
//! settings) and `log+tcp://HOST:PORT?token=` / `log+tls://HOST:PORT?token=&ca_certs=&certfile=&keyfile=`
//! (a served directory). Parsed with `celery_core::url::ServiceUrl`; an unknown option is an error
//! naming it.

use std::path::PathBuf;
use std::time::Duration;

use celery_core::url::ServiceUrl;

use super::net::remote::Target;
use super::net::tls::{ClientFiles, ClientTls};
use super::storage::record::MAX_RECORD;
use super::storage::{Fsync, LogError, StoreConfig};

/// The most descriptors `max_open_files` may let one store keep open.
const MAX_OPEN_FILES: f64 = 65_536.0;

/// Parses `log://PATH?options` into the directory and the settings.
///
/// ```
/// use broker_backends::log::{parse_url, Fsync};
/// let (dir, cfg) = parse_url("log://./data?fsync=os&partitions=4").unwrap();
/// assert_eq!(dir, std::path::PathBuf::from("./data"));
/// assert_eq!((cfg.fsync, cfg.partitions), (Fsync::Os, 4));
/// ```
pub fn parse_url(url: &str) -> Result<(PathBuf, StoreConfig), LogError> {
    let u = ServiceUrl::parse(url).map_err(|e| LogError::Invalid(e.reason().to_owned()))?;
    if u.scheme() != "log" {
        return Err(LogError::Invalid(format!("`{u}` is not a log:// URL")));
    }
    // A `#` is part of a directory name here, not a fragment.
    let path = match u.fragment() {
        Some(f) => format!("{}#{f}", u.location()),
        None => u.location().to_owned(),
    };
    if path.is_empty() {
        return Err(LogError::Invalid("log:// needs a directory, like log://./celery-data".into()));
    }
    let invalid = |e: celery_core::url::UrlError| LogError::Invalid(e.reason().to_owned());
    let mut cfg = StoreConfig::default();
    if let Some(v) = u.option("fsync") {
        cfg.fsync = match v {
            "always" => Fsync::Always,
            "os" | "never" => Fsync::Os,
            ms => Fsync::Interval(Duration::from_millis(
                ms.trim_start_matches("interval=")
                    .parse()
                    .map_err(|_| LogError::Invalid(format!("fsync `{v}`: expected always, os or milliseconds")))?,
            )),
        }
    }
    let num = |name| u.positive(name).map_err(invalid);
    if let Some(n) = num("segment_bytes")? {
        cfg.segment_bytes = n as u64;
    }
    if let Some(n) = num("lease_timeout")? {
        // Between 10 ms (renewed every third of it) and a year (deadlines stay representable).
        cfg.lease = celery_core::clock::secs_f64(n).clamp(Duration::from_millis(10), Duration::from_secs(365 * 86_400));
    }
    if let Some(n) = num("max_deliveries")? {
        cfg.max_deliveries = n as u32;
    }
    if let Some(n) = num("partitions")? {
        if n > 1024.0 {
            return Err(LogError::Invalid(format!("partitions `{n}` is over the limit of 1024 per queue")));
        }
        cfg.partitions = n as u32;
    }
    if let Some(n) = num("retention_bytes")? {
        cfg.retention.bytes = Some(n as u64);
    }
    if let Some(n) = num("retention_ms")? {
        cfg.retention.age = Some(Duration::from_millis(n as u64));
    }
    if let Some(force) = u.flag("retention_force").map_err(invalid)? {
        cfg.retention.force = force;
    }
    if let Some(n) = num("max_record_bytes")? {
        let n = n as usize;
        if n > MAX_RECORD - 1024 {
            return Err(LogError::Invalid(format!(
                "max_record_bytes `{n}` is over the on-disk limit of {} bytes",
                MAX_RECORD - 1024
            )));
        }
        cfg.max_record_bytes = n;
    }
    if let Some(n) = num("max_queues")? {
        cfg.max_queues = n as usize;
    }
    if let Some(n) = num("max_open_files")? {
        if n > MAX_OPEN_FILES {
            return Err(LogError::Invalid(format!("max_open_files `{n}` is over {MAX_OPEN_FILES}")));
        }
        // At least a few: a partition's reader and writer may each need one.
        cfg.max_open_files = (n as usize).max(8);
    }
    // The token of a served directory: no use to the owner, accepted so one URL serves both.
    u.accept(&["token"]);
    u.finish().map_err(invalid)?;
    Ok((PathBuf::from(path), cfg))
}

/// `log+tcp://HOST:PORT?token=...` or `log+tls://HOST:PORT?token=...&ca_certs=&certfile=&keyfile=`:
/// where the server is, and the token; None for other URLs.
pub(crate) fn parse_remote(url: &str) -> Result<Option<(Target, String)>, LogError> {
    let tls = match url.split_once("://").map(|(scheme, _)| scheme) {
        Some("log+tcp") => false,
        Some("log+tls") => true,
        _ => return Ok(None),
    };
    let invalid = |e: celery_core::url::UrlError| LogError::Invalid(e.reason().to_owned());
    let u = ServiceUrl::parse(url).map_err(invalid)?;
    let scheme = if tls { "log+tls://" } else { "log+tcp://" };
    let addr = u.host_port();
    let Some((host, _port)) = addr.rsplit_once(':').filter(|(h, p)| !h.is_empty() && !p.is_empty()) else {
        return Err(LogError::Invalid(format!("{scheme} needs HOST:PORT")));
    };
    // The certificate names an IPv6 address without the brackets of its URL form (`[::1]:7575`).
    let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    let token = u.option("token").unwrap_or_default().to_owned();
    let files = ClientFiles {
        ca_certs: u.option("ca_certs").map(Into::into),
        certfile: u.option("certfile").map(Into::into),
        keyfile: u.option("keyfile").map(Into::into),
    };
    if !tls {
        if let Some(k) = ["ca_certs", "certfile", "keyfile"].into_iter().find(|k| u.option(k).is_some()) {
            return Err(LogError::Invalid(format!("{k} is a TLS option: use log+tls://")));
        }
    }
    u.finish().map_err(|e| LogError::Invalid(format!("{} (the server's options go to `broker serve`)", e.reason())))?;
    let tls = tls.then(|| ClientTls::new(host, &files)).transpose()?;
    Ok(Some((Target::Tcp(addr.to_owned(), tls), token)))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::log::storage::Retention;

    fn remote_err(url: &str) -> String {
        parse_remote(url).unwrap_err().to_string()
    }

    #[test]
    fn remote_urls_are_checked() {
        let (target, token) = parse_remote("log+tcp://10.0.0.5:7575/?token=abc").unwrap().unwrap();
        assert!(matches!(target, Target::Tcp(ref a, None) if a == "10.0.0.5:7575"), "{target:?}");
        assert_eq!(token, "abc");
        assert!(parse_remote("log:///tmp/x").unwrap().is_none());
        assert!(remote_err("log+tcp://?token=x").contains("needs HOST:PORT"));
        assert!(remote_err("log+tls://host").contains("log+tls:// needs HOST:PORT"));
        assert!(remote_err("log+tcp://h:1?ca_certs=/ca.pem").contains("use log+tls://"));
        assert!(remote_err("log+tcp://h:1?fsync=os").contains("unknown log+tcp:// option `fsync`"));
        assert!(remote_err("log+tls://h:1?certfile=/c.pem").contains("certfile and keyfile go together"));
        assert!(remote_err("log+tls://h:1?ca_certs=/nonexistent.pem").contains("ca_certs /nonexistent.pem"));
    }

    /// Every `log://` form accepted today, and the settings it gives.
    #[test]
    fn accepted_log_urls_keep_their_settings() {
        let d = StoreConfig::default;
        let ms = Duration::from_millis;
        let table: Vec<(&str, &str, StoreConfig)> = vec![
            ("log://./data", "./data", d()),
            ("log:///abs/dir", "/abs/dir", d()),
            ("log://relative", "relative", d()),
            ("log://./data?", "./data", d()),
            ("log:///tmp/a b/c%20d", "/tmp/a b/c%20d", d()),
            ("log://./d?fsync=always", "./d", d()),
            ("log://./d?fsync=os", "./d", StoreConfig { fsync: Fsync::Os, ..d() }),
            ("log://./d?fsync=never", "./d", StoreConfig { fsync: Fsync::Os, ..d() }),
            ("log://./d?fsync=250", "./d", StoreConfig { fsync: Fsync::Interval(ms(250)), ..d() }),
            ("log://./d?fsync=interval=40", "./d", StoreConfig { fsync: Fsync::Interval(ms(40)), ..d() }),
            ("log://./d?segment_bytes=1048576", "./d", StoreConfig { segment_bytes: 1 << 20, ..d() }),
            ("log://./d?lease_timeout=2.5", "./d", StoreConfig { lease: ms(2500), ..d() }),
            ("log://./d?max_deliveries=3&partitions=4", "./d", StoreConfig { max_deliveries: 3, partitions: 4, ..d() }),
            (
                "log://./d?retention_bytes=1000&retention_ms=60000&retention_force=true",
                "./d",
                StoreConfig { retention: Retention { bytes: Some(1000), age: Some(ms(60_000)), force: true }, ..d() },
            ),
            (
                "log://./d?retention_force=1",
                "./d",
                StoreConfig { retention: Retention { force: true, ..Default::default() }, ..d() },
            ),
            (
                "log://./d?max_record_bytes=1024&max_queues=5",
                "./d",
                StoreConfig { max_record_bytes: 1024, max_queues: 5, ..d() },
            ),
            ("log://./d?max_open_files=64", "./d", StoreConfig { max_open_files: 64, ..d() }),
            ("log://./d?token=abc", "./d", d()),
        ];
        for (url, dir, want) in table {
            let (got_dir, got) = parse_url(url).unwrap_or_else(|e| panic!("{url}: {e}"));
            assert_eq!(got_dir, PathBuf::from(dir), "{url}");
            assert_eq!(format!("{got:?}"), format!("{want:?}"), "{url}");
        }
    }

    #[test]
    fn bad_log_urls_are_errors_naming_the_problem() {
        for (url, needle) in [
            ("redis://h/0", "log://"),
            ("log://", "needs a directory"),
            ("log://./d?bogus=1", "bogus"),
            ("log://./d?partitions=0", "partitions"),
            ("log://./d?lease_timeout=soon", "lease_timeout"),
            ("log://./d?fsync=sometimes", "fsync"),
            ("log://./d?max_record_bytes=999999999999", "max_record_bytes"),
            ("log://./d?max_open_files=100000000", "max_open_files"),
        ] {
            let e = parse_url(url).unwrap_err().to_string();
            assert!(e.contains(needle), "{url}: {e}");
        }
    }

    #[test]
    fn an_ipv6_tls_server_is_verified_by_its_address() {
        let (target, _) = parse_remote("log+tls://[::1]:7575?token=t").unwrap().unwrap();
        match target {
            Target::Tcp(addr, Some(tls)) => {
                assert_eq!(addr, "[::1]:7575");
                assert!(format!("{tls:?}").contains("IpAddress"), "verified as an address: {tls:?}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn remote_tokens_are_read_as_written() {
        for (url, addr, token) in [
            ("log+tcp://h:7575", "h:7575", ""),
            ("log+tcp://h:7575/", "h:7575", ""),
            ("log+tcp://h:7575?token=abc", "h:7575", "abc"),
            ("log+tcp://[::1]:7575/?token=a+b/c==", "[::1]:7575", "a+b/c=="),
        ] {
            let (target, got) = parse_remote(url).unwrap().unwrap();
            assert!(matches!(target, Target::Tcp(ref a, None) if a == addr), "{url}: {target:?}");
            assert_eq!(got, token, "{url}");
        }
    }
}

//! `sentinel://`: Redis behind Sentinel, in Kombu's URL form, and the question to the sentinels.
//!
//! `sentinel://[USER:PASSWORD@]H1[:26379][/DB];sentinel://H2[:26379];...?master_name=NAME`: every
//! element names one sentinel (default port 26379). User, password and database are the
//! *master's* and come from the first element (an element repeating them must repeat them
//! identically, as Celery's own examples do); options may sit on any element, each once.
//!
//! - `master_name=NAME` (required): the name the sentinels monitor. Python Celery takes it as the
//!   transport option `master_name` instead (Kombu rejects it in the URL).
//! - `sentinel_password=PW`: the sentinels' own password (Kombu's `sentinel_kwargs`).
//! - every option of the `redis://` URL (`visibility_timeout`, `global_keyprefix`,
//!   `min_replicas`, ...; `result_expires` for the result backend).
//!
//! The master is whatever the first sentinel that answers names, once the node itself answers
//! `ROLE` with `master` (a sentinel may still name a demoted node for a moment).

use std::time::Duration;

use celery_core::url::{redacted, split_list, ServiceUrl, UrlError};
use redis::{ConnectionAddr, IntoConnectionInfo, RedisConnectionInfo};

/// Sentinels one URL may list at most.
pub(crate) const MAX_SENTINELS: usize = 16;

/// Longest `master_name` accepted.
const MAX_MASTER_NAME: usize = 256;

/// Sentinel's default port.
const DEFAULT_PORT: u16 = 26379;

/// How long one sentinel (or the node it names) may take to answer.
const ASK_TIMEOUT: Duration = Duration::from_secs(2);

/// The options only a `sentinel://` URL has; the rest are the `redis://` URL's.
const SENTINEL_OPTIONS: [&str; 2] = ["master_name", "sentinel_password"];

/// A parsed `sentinel://` URL.
#[derive(Clone)]
pub struct SentinelUrl {
    /// The sentinels, `(host, port)`, in the order written.
    pub sentinels: Vec<(String, u16)>,
    /// The monitored master's name.
    pub master_name: String,
    /// The sentinels' password, if they have one. Secret.
    sentinel_password: Option<String>,
    /// The equivalent `redis://` URL (the first sentinel as its host, the master's userinfo and
    /// database, every other option) for the `redis://` option parsers. Secret.
    pub(crate) redis_url: String,
    /// The URL as given, redacted.
    pub shown: String,
}

impl std::fmt::Debug for SentinelUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SentinelUrl").field("url", &self.shown).field("master_name", &self.master_name).finish()
    }
}

impl SentinelUrl {
    /// Parses a `sentinel://` URL (one element or a `;`-separated list).
    ///
    /// ```
    /// use broker_backends::redis::SentinelUrl;
    /// let u = SentinelUrl::parse("sentinel://:pw@h1:26379/2;sentinel://h2?master_name=mymaster").unwrap();
    /// assert_eq!(u.sentinels, [("h1".to_owned(), 26379), ("h2".to_owned(), 26379)]);
    /// assert_eq!(u.master_name, "mymaster");
    /// assert_eq!(u.shown, "sentinel://:***@h1:26379/2;sentinel://h2?master_name=mymaster");
    /// assert!(SentinelUrl::parse("sentinel://h1:26379").is_err()); // no master_name
    /// ```
    pub fn parse(url: &str) -> Result<SentinelUrl, UrlError> {
        let whole = ServiceUrl::parse(url)?;
        let list = |reason: String| whole.invalid(reason);
        let elements = split_list(url).unwrap_or_else(|| vec![url.trim()]);
        if elements.len() > MAX_SENTINELS {
            return Err(list(format!("{} sentinels listed; at most {MAX_SENTINELS}", elements.len())));
        }
        let mut sentinels = Vec::new();
        let mut userinfo: Option<String> = None;
        let mut db: Option<String> = None;
        let mut options: Vec<(String, String)> = Vec::new();
        for (i, element) in elements.iter().enumerate() {
            if element.is_empty() {
                return Err(list(format!("sentinel {} of the `;`-separated list is empty", i + 1)));
            }
            if !element.starts_with("sentinel://") {
                return Err(list(format!("sentinel {} is not a sentinel:// URL", i + 1)));
            }
            let rest = &element["sentinel://".len()..];
            let (before_query, query) = rest.split_once('?').unwrap_or((rest, ""));
            let (authority, path) = before_query.split_once('/').unwrap_or((before_query, ""));
            let (info, host_port) = match authority.rsplit_once('@') {
                Some((info, hp)) => (Some(info), hp),
                None => (None, authority),
            };
            match (i, info, &userinfo) {
                (0, Some(info), _) => userinfo = Some(info.to_owned()),
                (_, Some(info), Some(first)) if info == first => {}
                (_, Some(_), _) => {
                    return Err(list(format!(
                        "sentinel {}: the master's user and password go on the first element (a later element may only repeat them)",
                        i + 1
                    )))
                }
                _ => {}
            }
            let path = path.trim_end_matches('/');
            if !path.is_empty() {
                if path.parse::<u32>().is_err() {
                    return Err(list(format!("sentinel {}: the database `{path}` is not a number", i + 1)));
                }
                match &db {
                    Some(d) if d != path => {
                        return Err(list(format!("sentinel {} names database {path}, another names {d}", i + 1)))
                    }
                    _ => db = Some(path.to_owned()),
                }
            }
            sentinels.push(host_and_port(host_port).map_err(|e| list(format!("sentinel {}: {e}", i + 1)))?);
            for pair in query.split('&').filter(|p| !p.is_empty()) {
                let name = pair.split_once('=').map_or(pair, |(n, _)| n).to_owned();
                if options.iter().any(|(n, _)| *n == name) {
                    return Err(list(format!("option `{name}` is given twice")));
                }
                options.push((name, pair.to_owned()));
            }
        }
        // One URL that the `redis://` parsers read: the master's userinfo and database, every option.
        let mut redis_url = "redis://".to_owned();
        if let Some(info) = &userinfo {
            redis_url.push_str(info);
            redis_url.push('@');
        }
        let (h, p) = &sentinels[0];
        redis_url.push_str(&format!("{h}:{p}/{}", db.as_deref().unwrap_or("0")));
        let joined: Vec<&str> = options.iter().map(|(_, raw)| raw.as_str()).collect();
        if !joined.is_empty() {
            redis_url.push('?');
            redis_url.push_str(&joined.join("&"));
        }
        let parsed = ServiceUrl::parse(&redis_url).map_err(|e| list(e.reason().to_owned()))?;
        let master_name = parsed.option("master_name").unwrap_or_default().to_owned();
        if master_name.is_empty() {
            return Err(list("`master_name=NAME` is required (the name the sentinels monitor)".into()));
        }
        if master_name.len() > MAX_MASTER_NAME || master_name.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(list(format!(
                "master_name must be 1 to {MAX_MASTER_NAME} characters without spaces or control characters"
            )));
        }
        let sentinel_password = parsed.option("sentinel_password").map(str::to_owned);
        Ok(SentinelUrl { sentinels, master_name, sentinel_password, redis_url, shown: redacted(url) })
    }

    /// The equivalent `redis://` URL without the sentinel options: what the `redis://` option
    /// parsers read. It holds the master's password: never print it.
    pub fn redis_url(&self) -> String {
        match ServiceUrl::parse(&self.redis_url) {
            Ok(u) => u.connection_string_except(&SENTINEL_OPTIONS),
            Err(_) => self.redis_url.clone(),
        }
    }

    /// Asks the sentinels, in order, for the master; the first named node that answers `ROLE`
    /// with `master` wins. `master` is the client URL for the master (its password, database and
    /// protocol; the host is replaced). Returns the master's `host:port` and a client for it.
    pub(crate) async fn resolve(&self, master: &str) -> Result<(String, redis::Client), redis::RedisError> {
        let template = master.into_connection_info()?;
        let mut last: Option<redis::RedisError> = None;
        for (host, port) in &self.sentinels {
            let asked = tokio::time::timeout(ASK_TIMEOUT, self.ask(host, *port, &template)).await;
            match asked {
                Ok(Ok(found)) => return Ok(found),
                Ok(Err(e)) => {
                    tracing::debug!(sentinel = %format!("{host}:{port}"), error = %e, "redis: sentinel gave no master");
                    last = Some(e);
                }
                Err(_) => {
                    last = Some(redis::RedisError::from(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("sentinel {host}:{port} did not answer within {ASK_TIMEOUT:?}"),
                    )))
                }
            }
        }
        Err(last.unwrap_or_else(|| redis::RedisError::from(std::io::Error::other("no sentinel listed"))))
    }

    /// The master's `host:port` as one sentinel names it (no check of the node): the watch's
    /// cheap question. `held` keeps the connection to the sentinel that last answered.
    pub(crate) async fn named(&self, held: &mut Option<redis::aio::MultiplexedConnection>) -> Option<String> {
        if held.is_none() {
            for (host, port) in &self.sentinels {
                let connect = async {
                    let info = self.sentinel_info(host, *port)?;
                    redis::Client::open(info)?.get_multiplexed_async_connection().await
                };
                if let Ok(Ok(c)) = tokio::time::timeout(ASK_TIMEOUT, connect).await {
                    *held = Some(c);
                    break;
                }
            }
        }
        let conn = held.as_mut()?;
        let ask = redis::cmd("SENTINEL").arg("get-master-addr-by-name").arg(&self.master_name).to_owned();
        match tokio::time::timeout(ASK_TIMEOUT, ask.query_async::<Option<(String, u16)>>(conn)).await {
            Ok(Ok(Some((ip, port)))) => Some(format!("{ip}:{port}")),
            _ => {
                *held = None;
                None
            }
        }
    }

    fn sentinel_info(&self, host: &str, port: u16) -> Result<redis::ConnectionInfo, redis::RedisError> {
        let mut settings = RedisConnectionInfo::default();
        if let Some(pw) = &self.sentinel_password {
            settings = settings.set_password(pw);
        }
        Ok(format!("redis://{host}:{port}").into_connection_info()?.set_redis_settings(settings))
    }

    async fn ask(
        &self,
        host: &str,
        port: u16,
        template: &redis::ConnectionInfo,
    ) -> Result<(String, redis::Client), redis::RedisError> {
        let info = self.sentinel_info(host, port)?;
        let mut conn = redis::Client::open(info)?.get_multiplexed_async_connection().await?;
        let named: Option<(String, u16)> =
            redis::cmd("SENTINEL").arg("get-master-addr-by-name").arg(&self.master_name).query_async(&mut conn).await?;
        let Some((ip, mport)) = named else {
            return Err(redis::RedisError::from((
                redis::ErrorKind::Client,
                "the sentinel does not know this master_name",
                format!("sentinel {host}:{port}, master_name {}", self.master_name),
            )));
        };
        let client = redis::Client::open(template.clone().set_addr(ConnectionAddr::Tcp(ip.clone(), mport)))?;
        let mut node = client.get_multiplexed_async_connection().await?;
        let role: Vec<redis::Value> = redis::cmd("ROLE").query_async(&mut node).await?;
        let role = role.first().and_then(|v| redis::from_redis_value_ref::<String>(v).ok()).unwrap_or_default();
        if role != "master" {
            return Err(redis::RedisError::from((
                redis::ErrorKind::Server(redis::ServerErrorKind::MasterDown),
                "the node a sentinel names is not (yet) a master",
                format!("{ip}:{mport} answers ROLE {role}"),
            )));
        }
        Ok((format!("{ip}:{mport}"), client))
    }
}

fn host_and_port(host_port: &str) -> Result<(String, u16), String> {
    let (host, port) = match host_port.rsplit_once(':') {
        Some((h, p)) => (h, p.parse::<u16>().map_err(|_| format!("the port `{p}` is not a number from 1 to 65535"))?),
        None => (host_port, DEFAULT_PORT),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() || port == 0 {
        return Err("a host (and optional port) is required: sentinel://HOST:26379".into());
    }
    Ok((host.to_owned(), port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_issues_form_and_kombus_form_are_read() {
        let u = SentinelUrl::parse(
            "sentinel://127.0.0.1:26801;sentinel://127.0.0.1:26802;sentinel://127.0.0.1:26803/0?master_name=mymaster",
        )
        .unwrap();
        assert_eq!(u.sentinels.len(), 3);
        assert_eq!(u.sentinels[2], ("127.0.0.1".to_owned(), 26803));
        assert_eq!(u.master_name, "mymaster");
        assert_eq!(u.redis_url(), "redis://127.0.0.1:26801/0");

        let u = SentinelUrl::parse(
            "sentinel://u:s3cret@h1:26379/3;sentinel://u:s3cret@h2/3?master_name=m&sentinel_password=sp&visibility_timeout=30",
        )
        .unwrap();
        assert_eq!(u.sentinels, [("h1".to_owned(), 26379), ("h2".to_owned(), 26379)]);
        assert_eq!(u.redis_url(), "redis://u:s3cret@h1:26379/3?visibility_timeout=30");
        assert_eq!(u.sentinel_password.as_deref(), Some("sp"));
        let shown = format!("{u:?}");
        assert!(!shown.contains("s3cret") && !shown.contains("=sp"), "{shown}");
    }

    #[test]
    fn bad_sentinel_urls_are_refused_with_the_reason_redacted() {
        for (url, needle) in [
            ("sentinel://:s3cret@h1", "master_name"),
            ("sentinel://:s3cret@h1;sentinel://h2?master_name=", "master_name"),
            ("sentinel://:s3cret@h1;redis://h2?master_name=m", "not a sentinel://"),
            ("sentinel://:s3cret@h1:x?master_name=m", "port `x`"),
            ("sentinel://:s3cret@h1/a?master_name=m", "database `a`"),
            ("sentinel://:s3cret@h1/1;sentinel://h2/2?master_name=m", "database"),
            ("sentinel://:s3cret@h1;sentinel://:other@h2?master_name=m", "first element"),
            ("sentinel://:s3cret@h1?master_name=m;sentinel://h2?master_name=m", "given twice"),
            ("sentinel://:s3cret@h1?master_name=a%20b", "without spaces"),
        ] {
            let e = SentinelUrl::parse(url).unwrap_err().to_string();
            assert!(e.contains(needle) && !e.contains("s3cret"), "{url}: {e}");
        }
        let many = vec!["sentinel://h:1"; MAX_SENTINELS + 1].join(";") + "?master_name=m";
        assert!(SentinelUrl::parse(&many).unwrap_err().to_string().contains("at most"));
    }
}

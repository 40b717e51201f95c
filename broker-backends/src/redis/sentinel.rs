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
//! - `min_other_sentinels=N` (0 to 64, default 0; Kombu's transport option of that name): a
//!   sentinel's answer counts only when it sees at least N other sentinels and does not hold the
//!   master down (`SENTINEL MASTER`), as redis-py checks it: a sentinel cut off from the others
//!   may name a stale master.
//! - every option of the `redis://` URL (`visibility_timeout`, `global_keyprefix`,
//!   `min_replicas`, ...; `result_expires` for the result backend).
//!
//! The master is whatever the first sentinel that answers names, once the node itself answers
//! `ROLE` with `master` (a sentinel may still name a demoted node for a moment). Those questions
//! open a connection each and close it ([`SentinelUrl::resolve`], on demand: at connect, after an
//! error, after an announcement).
//!
//! Failovers are followed as they are announced: one connection per process and sentinel set
//! subscribes to `+switch-master` on the first sentinel that answers (the next one when it is
//! lost) and passes each announcement for this `master_name` to every handle
//! ([`SentinelUrl::switches`]); each then asks again and switches at once, without waiting for an
//! error. After the subscription is made again, every handle asks once (an announcement may have
//! been missed meanwhile).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use celery_core::backoff::Reconnect;
use celery_core::sync::lock;
use celery_core::url::{redacted, split_list, ServiceUrl, UrlError};
use futures::StreamExt;
use redis::{ConnectionAddr, IntoConnectionInfo, RedisConnectionInfo};
use tokio::sync::watch;

/// Sentinels one URL may list at most.
pub(crate) const MAX_SENTINELS: usize = 16;

/// Longest `master_name` accepted.
const MAX_MASTER_NAME: usize = 256;

/// Sentinel's default port.
const DEFAULT_PORT: u16 = 26379;

/// How long one sentinel (or the node it names) may take to answer.
const ASK_TIMEOUT: Duration = Duration::from_secs(2);

/// The channel on which sentinels announce a new master: `NAME OLD_IP OLD_PORT NEW_IP NEW_PORT`.
const SWITCH_CHANNEL: &str = "+switch-master";

/// An announcement passed to the handles: its sequence number and the new master's `host:port`
/// (empty after the subscription was made again: ask once, whatever the master).
pub(crate) type Switch = (u64, String);

/// The followed sentinel sets of this process, by sentinels, master name and password.
static FOLLOWED: Mutex<Vec<(String, Weak<Followed>)>> = Mutex::new(Vec::new());

/// One `+switch-master` subscription, shared by every handle of one sentinel set; it ends when
/// the last handle is dropped.
#[derive(Debug)]
pub(crate) struct Followed {
    rx: watch::Receiver<Switch>,
}

impl Followed {
    /// A receiver of the announcements (see [`Switch`]).
    pub(crate) fn subscribe(&self) -> watch::Receiver<Switch> {
        self.rx.clone()
    }
}

/// The options only a `sentinel://` URL has; the rest are the `redis://` URL's.
const SENTINEL_OPTIONS: [&str; 3] = ["master_name", "sentinel_password", "min_other_sentinels"];

/// Most other sentinels `min_other_sentinels` may ask for.
const MAX_OTHER_SENTINELS: u32 = 64;

/// A parsed `sentinel://` URL.
#[derive(Clone)]
pub struct SentinelUrl {
    /// The sentinels, `(host, port)`, in the order written.
    pub sentinels: Vec<(String, u16)>,
    /// The monitored master's name.
    pub master_name: String,
    /// The sentinels' password, if they have one. Secret.
    sentinel_password: Option<String>,
    /// Other sentinels an answering sentinel must see (`min_other_sentinels`).
    pub min_other_sentinels: u32,
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
        let min_other_sentinels =
            match parsed.option("min_other_sentinels") {
                None => 0,
                Some(n) => n.parse::<u32>().ok().filter(|n| *n <= MAX_OTHER_SENTINELS).ok_or_else(|| {
                    list(format!("min_other_sentinels must be a number from 0 to {MAX_OTHER_SENTINELS}"))
                })?,
            };
        Ok(SentinelUrl {
            sentinels,
            master_name,
            sentinel_password,
            min_other_sentinels,
            redis_url,
            shown: redacted(url),
        })
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

    /// This process's follower of the sentinels' `+switch-master` announcements for this URL's
    /// sentinels and master name: one subscription shared by every handle (started on first use,
    /// on the current Tokio runtime; ended when the last holder drops it).
    pub(crate) fn switches(&self) -> Arc<Followed> {
        let key = format!("{:?}|{}|{:?}", self.sentinels, self.master_name, self.sentinel_password);
        let mut all = lock(&FOLLOWED);
        all.retain(|(_, w)| w.strong_count() > 0);
        if let Some(f) = all.iter().find(|(k, _)| *k == key).and_then(|(_, w)| w.upgrade()) {
            // A follower whose runtime ended has dropped its sender: start another.
            if f.rx.has_changed().is_ok() {
                return f;
            }
        }
        let (tx, rx) = watch::channel((0, String::new()));
        tokio::spawn(follow_switches(self.clone(), tx));
        let f = Arc::new(Followed { rx });
        all.retain(|(k, _)| *k != key);
        all.push((key, Arc::downgrade(&f)));
        f
    }

    /// A connection subscribed to `+switch-master` on the first sentinel that answers, and which.
    async fn subscribe_switches(&self) -> Option<(redis::aio::PubSub, String)> {
        for (host, port) in &self.sentinels {
            let subscribe = async {
                let info = self.sentinel_info(host, *port)?;
                let mut p = redis::Client::open(info)?.get_async_pubsub().await?;
                p.subscribe(SWITCH_CHANNEL).await?;
                Ok::<_, redis::RedisError>(p)
            };
            match tokio::time::timeout(ASK_TIMEOUT, subscribe).await {
                Ok(Ok(p)) => return Some((p, format!("{host}:{port}"))),
                Ok(Err(e)) => {
                    tracing::debug!(sentinel = %format!("{host}:{port}"), error = %e, "redis: cannot subscribe to +switch-master")
                }
                Err(_) => {
                    tracing::debug!(sentinel = %format!("{host}:{port}"), "redis: no answer to the +switch-master subscription")
                }
            }
        }
        None
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
        if self.min_other_sentinels > 0 {
            let state: HashMap<String, String> =
                redis::cmd("SENTINEL").arg("MASTER").arg(&self.master_name).query_async(&mut conn).await?;
            if let Some(why) = unfit(&state, self.min_other_sentinels) {
                return Err(redis::RedisError::from((
                    redis::ErrorKind::Server(redis::ServerErrorKind::MasterDown),
                    "the sentinel's view does not count (min_other_sentinels)",
                    format!("sentinel {host}:{port}: {why}"),
                )));
            }
        }
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

/// Why a sentinel's view of the master (`SENTINEL MASTER`'s fields) does not count under
/// `min_other_sentinels`, as redis-py checks it; `None` when it counts.
fn unfit(state: &HashMap<String, String>, min_other_sentinels: u32) -> Option<String> {
    let flags = state.get("flags").map_or("", String::as_str);
    if flags.split(',').any(|f| f == "s_down" || f == "o_down") || !flags.split(',').any(|f| f == "master") {
        return Some(format!("it flags the master `{flags}`"));
    }
    let others = state.get("num-other-sentinels").and_then(|n| n.parse::<u32>().ok()).unwrap_or(0);
    (others < min_other_sentinels)
        .then(|| format!("it sees {others} other sentinels, min_other_sentinels is {min_other_sentinels}"))
}

/// The new master's `host:port` in a `+switch-master` payload for `master_name`, else `None`.
fn announced(payload: &str, master_name: &str) -> Option<String> {
    let parts: Vec<&str> = payload.split(' ').collect();
    match parts[..] {
        [name, _, _, ip, port] if name == master_name => Some(format!("{ip}:{port}")),
        _ => None,
    }
}

/// Subscribes to `+switch-master` (again, on the next sentinel, whenever the connection is lost,
/// with capped backoff) and passes each announcement for `url`'s master to `tx`; ends when every
/// receiver is gone.
async fn follow_switches(url: SentinelUrl, tx: watch::Sender<Switch>) {
    let mut backoff = Reconnect::default();
    let mut first = true;
    loop {
        let subscribed = tokio::select! {
            _ = tx.closed() => return,
            s = url.subscribe_switches() => s,
        };
        let Some((pubsub, at)) = subscribed else {
            first = false;
            tokio::select! {
                _ = tx.closed() => return,
                _ = backoff.pause("redis: subscribe to +switch-master", &"no sentinel answered") => {}
            }
            continue;
        };
        tracing::debug!(sentinel = %at, "redis: following +switch-master");
        backoff.reset();
        if !first {
            // An announcement may have come while unsubscribed: every handle asks once.
            tx.send_modify(|(n, new)| (*n, *new) = (*n + 1, String::new()));
        }
        first = false;
        let mut stream = pubsub.into_on_message();
        loop {
            let m = tokio::select! {
                _ = tx.closed() => return,
                m = stream.next() => m,
            };
            let Some(m) = m else { break };
            let payload: String = m.get_payload().unwrap_or_default();
            if let Some(new) = announced(&payload, &url.master_name) {
                tracing::info!(sentinel = %at, new = %new, "redis: a sentinel announced a new master");
                tx.send_modify(|(n, to)| (*n, *to) = (*n + 1, new));
            }
        }
        tracing::warn!(sentinel = %at, "redis: the +switch-master subscription was lost; subscribing again");
        tokio::select! {
            _ = tx.closed() => return,
            _ = backoff.pause("redis: subscribe to +switch-master", &"the connection was lost") => {}
        }
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
    fn min_other_sentinels_is_read_and_checked() {
        let u = SentinelUrl::parse("sentinel://h1;sentinel://h2?master_name=m&min_other_sentinels=2").unwrap();
        assert_eq!(u.min_other_sentinels, 2);
        assert_eq!(u.redis_url(), "redis://h1:26379/0");
        assert!(SentinelUrl::parse("sentinel://h1?master_name=m&min_other_sentinels=x").is_err());
        assert!(SentinelUrl::parse("sentinel://h1?master_name=m&min_other_sentinels=65").is_err());
        let state = |flags: &str, others: &str| {
            HashMap::from([
                ("flags".to_owned(), flags.to_owned()),
                ("num-other-sentinels".to_owned(), others.to_owned()),
            ])
        };
        assert_eq!(unfit(&state("master", "2"), 2), None);
        assert!(unfit(&state("master", "1"), 2).unwrap().contains("1 other sentinels"));
        assert!(unfit(&state("master,s_down", "2"), 2).unwrap().contains("s_down"));
        assert!(unfit(&state("slave", "2"), 1).is_some());
    }

    #[test]
    fn switch_announcements_are_read_for_this_master_only() {
        assert_eq!(announced("mymaster 127.0.0.1 6801 127.0.0.1 6802", "mymaster").as_deref(), Some("127.0.0.1:6802"));
        assert_eq!(announced("other 127.0.0.1 6801 127.0.0.1 6802", "mymaster"), None);
        assert_eq!(announced("mymaster 127.0.0.1 6801", "mymaster"), None);
        assert_eq!(announced("", "mymaster"), None);
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

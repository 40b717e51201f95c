//! `redis+cluster://`: Redis Cluster, the URL and how keys meet slots.
//!
//! `redis+cluster://[USER:PASSWORD@]H1:7001,H2:7002,H3:7003[/0][?OPTIONS]`: the seed nodes (at
//! most [`MAX_SEEDS`], default port 6379), the password of every node, database 0 (a cluster has
//! no other). The client asks the seeds for the slot map and follows `MOVED`/`ASK` redirections
//! and failovers by itself ([`super::RedisConn`]).
//!
//! Options: every option of the `redis://` URL, plus `shards=N` (1 to [`MAX_SHARDS`], default
//! 1): each queue is spread over N hash tags (`{queue:0}` .. `{queue:N-1}`), so over up to N
//! slots and nodes ([`super::keys`]). Every process using a queue must give the same `shards`.
//! `min_replicas=N` works as on one server: the `WAIT` goes in the same pipeline as the write, and
//! a cluster pipeline goes whole to the node of its keys' slot, so it counts that node's replicas.
//!
//! On a cluster every key of one queue (and shard) carries the same hash tag, so each Lua step
//! touches one slot; this is not Kombu's layout, so Python Celery cannot share queues here (it
//! does not support Redis Cluster at all, celery#2852).

use celery_core::url::{redacted, ServiceUrl, UrlError};

/// Seed nodes one URL may list at most.
pub const MAX_SEEDS: usize = 64;

/// Most hash tags (`shards=N`) one queue may be spread over.
pub const MAX_SHARDS: u16 = 64;

/// Redis's default port.
const DEFAULT_PORT: u16 = 6379;

/// The options only a `redis+cluster://` URL has; the rest are the `redis://` URL's.
const CLUSTER_OPTIONS: [&str; 1] = ["shards"];

/// The scheme.
pub(super) const SCHEME: &str = "redis+cluster://";

/// A parsed `redis+cluster://` URL.
#[derive(Clone)]
pub struct ClusterUrl {
    /// The seed nodes, `(host, port)`, in the order written.
    pub nodes: Vec<(String, u16)>,
    /// Hash tags per queue (`shards=N`).
    pub shards: u16,
    /// The equivalent `redis://` URL (the first seed as its host, the userinfo, every option) for
    /// the `redis://` option parsers. Secret.
    redis_url: String,
    /// The URL as given, redacted.
    pub shown: String,
}

impl std::fmt::Debug for ClusterUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterUrl").field("url", &self.shown).field("shards", &self.shards).finish()
    }
}

/// True for a `redis+cluster://` URL.
pub fn is_cluster(url: &str) -> bool {
    url.trim_start().starts_with(SCHEME)
}

impl ClusterUrl {
    /// Parses a `redis+cluster://` URL.
    ///
    /// ```
    /// use broker_backends::redis::ClusterUrl;
    /// let u = ClusterUrl::parse("redis+cluster://:pw@h1:7001,h2:7002,h3?shards=4").unwrap();
    /// assert_eq!(u.nodes, [("h1".to_owned(), 7001), ("h2".to_owned(), 7002), ("h3".to_owned(), 6379)]);
    /// assert_eq!(u.shards, 4);
    /// assert_eq!(u.shown, "redis+cluster://:***@h1:7001,h2:7002,h3?shards=4");
    /// assert!(ClusterUrl::parse("redis+cluster://h1:7001/2").is_err()); // database 0 only
    /// ```
    pub fn parse(url: &str) -> Result<ClusterUrl, UrlError> {
        let url = url.trim();
        let whole = ServiceUrl::parse(url)?;
        let bad = |reason: String| whole.invalid(reason);
        let Some(rest) = url.strip_prefix(SCHEME) else {
            return Err(bad("not a redis+cluster:// URL".into()));
        };
        if whole.fragment().is_some() {
            return Err(bad("a redis+cluster:// URL takes no #fragment (TLS is not offered on a cluster yet)".into()));
        }
        let (before_query, query) = rest.split_once('?').unwrap_or((rest, ""));
        let (authority, path) = before_query.split_once('/').unwrap_or((before_query, ""));
        let (userinfo, hosts) = match authority.rsplit_once('@') {
            Some((info, hosts)) => (Some(info), hosts),
            None => (None, authority),
        };
        let db = path.trim_end_matches('/');
        if !db.is_empty() && db != "0" {
            return Err(bad(format!(
                "database `{db}`: a Redis Cluster has database 0 only (leave it out or write /0)"
            )));
        }
        let listed: Vec<&str> = hosts.split(',').map(str::trim).collect();
        if listed.len() > MAX_SEEDS {
            return Err(bad(format!("{} seed nodes listed; at most {MAX_SEEDS}", listed.len())));
        }
        let mut nodes = Vec::with_capacity(listed.len());
        for (i, h) in listed.iter().enumerate() {
            let node = host_and_port(h).map_err(|e| bad(format!("node {}: {e}", i + 1)))?;
            if nodes.contains(&node) {
                return Err(bad(format!("node {} (`{}:{}`) is listed twice", i + 1, node.0, node.1)));
            }
            nodes.push(node);
        }
        let (h, p) = &nodes[0];
        let mut redis_url = "redis://".to_owned();
        if let Some(info) = userinfo {
            redis_url.push_str(info);
            redis_url.push('@');
        }
        redis_url.push_str(&format!("{h}:{p}/0"));
        if !query.is_empty() {
            redis_url.push('?');
            redis_url.push_str(query);
        }
        let parsed = ServiceUrl::parse(&redis_url).map_err(|e| bad(e.reason().to_owned()))?;
        let shards = parsed.parse_option::<u16>("shards", "a number of shards").map_err(|e| bad(e.reason().into()))?;
        let shards = shards.unwrap_or(1);
        if shards == 0 || shards > MAX_SHARDS {
            return Err(bad(format!("shards is from 1 to {MAX_SHARDS}")));
        }
        Ok(ClusterUrl { nodes, shards, redis_url, shown: redacted(url) })
    }

    /// The equivalent `redis://` URL (the first seed, database 0) without the cluster's own
    /// options: what the `redis://` option parsers read. It holds the password: never print it.
    pub fn redis_url(&self) -> String {
        match ServiceUrl::parse(&self.redis_url) {
            Ok(u) => u.connection_string_except(&CLUSTER_OPTIONS),
            Err(_) => self.redis_url.clone(),
        }
    }

    /// One client URL per seed node: `client_url` (a URL [`super::client_url`] made from
    /// [`ClusterUrl::redis_url`]) with its host and port replaced. They hold the password.
    pub(crate) fn node_urls(&self, client_url: &str) -> Vec<String> {
        let (scheme, rest) = client_url.split_once("://").unwrap_or(("redis", client_url));
        let end = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, tail) = rest.split_at(end);
        let info = authority.rsplit_once('@').map(|(info, _)| info);
        self.nodes
            .iter()
            .map(|(h, p)| match info {
                Some(info) => format!("{scheme}://{info}@{h}:{p}{tail}"),
                None => format!("{scheme}://{h}:{p}{tail}"),
            })
            .collect()
    }
}

fn host_and_port(host_port: &str) -> Result<(String, u16), String> {
    let (host, port) = match host_port.rsplit_once(':') {
        Some((h, p)) => (h, p.parse::<u16>().map_err(|_| format!("the port `{p}` is not a number from 1 to 65535"))?),
        None => (host_port, DEFAULT_PORT),
    };
    if host.is_empty() || port == 0 || host.contains(['/', '@', ' ']) {
        return Err("a host (and optional port) is required: redis+cluster://HOST:7001,HOST:7002".into());
    }
    Ok((host.to_owned(), port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_userinfo_and_options_are_read() {
        let u = ClusterUrl::parse("redis+cluster://127.0.0.1:7001,127.0.0.1:7002,127.0.0.1:7003").unwrap();
        assert_eq!(u.nodes.len(), 3);
        assert_eq!((u.shards, u.redis_url().as_str()), (1, "redis://127.0.0.1:7001/0"));
        let u = ClusterUrl::parse("redis+cluster://u:s3cret@a:1,b:2/0?shards=8&visibility_timeout=30").unwrap();
        assert_eq!(u.shards, 8);
        assert_eq!(u.redis_url(), "redis://u:s3cret@a:1/0?visibility_timeout=30");
        assert_eq!(
            u.node_urls("redis://u:s3cret@a:1/0?protocol=resp3"),
            ["redis://u:s3cret@a:1/0?protocol=resp3", "redis://u:s3cret@b:2/0?protocol=resp3"]
        );
        assert_eq!(u.node_urls("redis://a:1/0"), ["redis://a:1/0", "redis://b:2/0"]);
        let shown = format!("{u:?}");
        assert!(shown.contains("u:***@a:1,b:2/0") && !shown.contains("s3cret"), "{shown}");
    }

    #[test]
    fn bad_cluster_urls_are_refused_with_the_reason_redacted() {
        for (url, needle) in [
            ("redis+cluster://:s3cret@h1:7001/3", "database 0 only"),
            ("redis+cluster://:s3cret@h1:x", "port `x`"),
            ("redis+cluster://:s3cret@h1:1,,h2:2", "node 2"),
            ("redis+cluster://:s3cret@h1:1,h1:1", "listed twice"),
            ("redis+cluster://:s3cret@h1:1?shards=0", "from 1 to 64"),
            ("redis+cluster://:s3cret@h1:1?shards=65", "from 1 to 64"),
            ("redis+cluster://:s3cret@h1:1?shards=many", "not a number"),
            ("redis+cluster://:s3cret@h1:1#insecure", "TLS"),
        ] {
            let e = ClusterUrl::parse(url).unwrap_err().to_string();
            assert!(e.contains(needle) && !e.contains("s3cret"), "{url}: {e}");
        }
        let many: Vec<String> = (1..=MAX_SEEDS as u16 + 1).map(|p| format!("h:{p}")).collect();
        let e = ClusterUrl::parse(&format!("redis+cluster://{}", many.join(","))).unwrap_err().to_string();
        assert!(e.contains("at most 64"), "{e}");
        let max: Vec<String> = (1..=MAX_SEEDS as u16).map(|p| format!("h:{p}")).collect();
        assert_eq!(ClusterUrl::parse(&format!("redis+cluster://{}", max.join(","))).unwrap().nodes.len(), MAX_SEEDS);
    }
}

//! The `redis://` (or `sentinel://`, or `redis+cluster://`) result-backend URL: `result_expires=SECONDS` (default 86400),
//! `global_keyprefix=PREFIX`, `min_replicas=N` with `min_replicas_timeout=MS` (a `WAIT` after each
//! stored state), the broker's `visibility_timeout` (accepted and ignored, so one URL
//! serves both), and the redis client's and Celery's connection options that
//! [`broker_backends::redis::client_url`] takes. Any other option is an error naming it.

use broker_backends::redis::{is_cluster, is_sentinel, min_replicas, ClusterUrl, MinReplicas, SentinelUrl};
use celery_core::url::ServiceUrl;
use celery_core::BackendError;

/// What a result-backend URL says. An unknown option is an error naming it.
#[derive(Debug)]
pub(super) struct ResultUrl {
    /// The redis client's URL (holding the password: never print it).
    pub(super) client: String,
    /// The key prefix.
    pub(super) prefix: String,
    /// The expiry in seconds.
    pub(super) expires: u64,
    /// Replicas that must acknowledge each stored state.
    pub(super) min_replicas: Option<MinReplicas>,
    /// The sentinels of a `sentinel://` URL.
    pub(super) sentinel: Option<SentinelUrl>,
    /// The seed nodes of a `redis+cluster://` URL (its `shards` is the broker's, ignored here).
    pub(super) cluster: Option<ClusterUrl>,
}

/// A `redis://` URL, or a `sentinel://` list (read through its equivalent `redis://` URL, errors
/// shown as given).
pub(super) fn parse(url: &str) -> Result<ResultUrl, BackendError> {
    if is_cluster(url) {
        let c = ClusterUrl::parse(url)?;
        let shown = |e| match e {
            BackendError::InvalidUrl { reason, .. } => BackendError::InvalidUrl { url: c.shown.clone(), reason },
            other => other,
        };
        let mut parsed = parse_one(&c.redis_url()).map_err(shown)?;
        if parsed.prefix.contains(['{', '}']) {
            let reason = "global_keyprefix may not hold `{` or `}` on a cluster (they make hash tags)".into();
            return Err(BackendError::InvalidUrl { url: c.shown.clone(), reason });
        }
        parsed.cluster = Some(c);
        return Ok(parsed);
    }
    if !is_sentinel(url) {
        return parse_one(url);
    }
    let s = SentinelUrl::parse(url)?;
    let mut parsed = parse_one(&s.redis_url()).map_err(|e| match e {
        BackendError::InvalidUrl { reason, .. } => BackendError::InvalidUrl { url: s.shown.clone(), reason },
        other => other,
    })?;
    parsed.sentinel = Some(s);
    Ok(parsed)
}

fn parse_one(url: &str) -> Result<ResultUrl, BackendError> {
    let u = ServiceUrl::parse(url)?;
    let expires = u.parse_option::<u64>("result_expires", "a number of seconds")?.unwrap_or(86_400);
    let prefix = u.option("global_keyprefix").unwrap_or_default().to_owned();
    // The broker's option: accepted so that one URL serves both.
    u.accept(&["visibility_timeout"]);
    let min_replicas = min_replicas(&u)?;
    let client = broker_backends::redis::client_url(&u)?;
    u.finish()?;
    Ok(ResultUrl { client, prefix, expires, min_replicas, sentinel: None, cluster: None })
}

/// [`parse`] as `(client URL, prefix, expires)`.
#[cfg(test)]
fn parse_url(url: &str) -> Result<(String, String, u64), BackendError> {
    parse(url).map(|p| (p.client, p.prefix, p.expires))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every form accepted before URLs were checked, and what it gives; unknown options now fail.
    #[test]
    fn url_options_are_read_and_the_rest_checked() {
        for (url, client, prefix, expires) in [
            ("redis://127.0.0.1:6379/1", "redis://127.0.0.1:6379/1", "", 86_400),
            ("redis://:pw@h/1?result_expires=60&global_keyprefix=p:", "redis://:pw@h/1", "p:", 60),
            ("redis://h/1?visibility_timeout=30&protocol=resp3", "redis://h/1?protocol=resp3", "", 86_400),
            ("redis://h/1?password=pw&ssl_cert_reqs=required", "redis://:pw@h/1", "", 86_400),
        ] {
            let got = parse_url(url).unwrap_or_else(|e| panic!("{url}: {e}"));
            assert_eq!(got, (client.to_owned(), prefix.to_owned(), expires), "{url}");
        }
        for (url, needle) in [
            ("redis://:s3cret@h/1?result_expires=soon", "result_expires `soon` is not a number of seconds"),
            ("redis://:s3cret@h/1?expires=60", "unknown redis:// option `expires`"),
            ("redis://:s3cret@h/1?bogus=1", "unknown redis:// option `bogus`"),
            ("redis://:s3cret@h/1?password=x", "given twice"),
        ] {
            let e = parse_url(url).unwrap_err();
            assert!(matches!(e, BackendError::InvalidUrl { .. }), "{url}: {e:?}");
            let e = e.to_string();
            assert!(e.contains(needle) && e.contains("redis://:***@h/1") && !e.contains("s3cret"), "{url}: {e}");
        }
    }

    #[test]
    fn cluster_urls_are_read_with_the_same_options() {
        let p = parse("redis+cluster://:pw@h1:7001,h2:7002?result_expires=60&shards=4&visibility_timeout=9").unwrap();
        assert_eq!((p.client.as_str(), p.prefix.as_str(), p.expires), ("redis://:pw@h1:7001/0", "", 60));
        assert_eq!(p.cluster.map(|c| c.nodes.len()), Some(2));
        for (url, needle) in [
            ("redis+cluster://:s3cret@h1:7001?bogus=1", "`bogus`"),
            ("redis+cluster://:s3cret@h1:7001?min_replicas=0&min_replicas_timeout=5", "needs min_replicas"),
            ("redis+cluster://:s3cret@h1:7001/2", "database 0 only"),
            ("redis+cluster://:s3cret@h1:7001?global_keyprefix={x}", "hash tags"),
        ] {
            let e = parse(url).unwrap_err();
            assert!(matches!(e, BackendError::InvalidUrl { .. }), "{url}: {e:?}");
            let e = e.to_string();
            assert!(
                e.contains(needle) && e.contains("redis+cluster://:***@h1:7001") && !e.contains("s3cret"),
                "{url}: {e}"
            );
        }
    }

    #[test]
    fn sentinel_lists_are_read_with_the_same_options() {
        let p =
            parse("sentinel://:pw@h1:26379/3;sentinel://h2?master_name=m&result_expires=60&min_replicas=1").unwrap();
        assert_eq!((p.client.as_str(), p.prefix.as_str(), p.expires), ("redis://:pw@h1:26379/3", "", 60));
        assert_eq!(p.min_replicas.map(|r| r.count), Some(1));
        assert_eq!(p.sentinel.map(|s| s.master_name), Some("m".to_owned()));
        let e = parse("sentinel://:s3cret@h1;sentinel://h2?master_name=m&bogus=1").unwrap_err().to_string();
        assert!(
            e.contains("`bogus`") && e.contains("sentinel://:***@h1;sentinel://h2") && !e.contains("s3cret"),
            "{e}"
        );
        let e = parse("sentinel://h1;sentinel://h2?result_expires=60").unwrap_err().to_string();
        assert!(e.contains("master_name"), "{e}");
    }
}

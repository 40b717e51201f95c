//! The `redis://` result-backend URL: `result_expires=SECONDS` (default 86400),
//! `global_keyprefix=PREFIX`, the broker's `visibility_timeout` (accepted and ignored, so one URL
//! serves both), and the redis client's and Celery's connection options that
//! [`broker_backends::redis::client_url`] takes. Any other option is an error naming it.

use celery_core::url::ServiceUrl;
use celery_core::BackendError;

/// What a result-backend URL says: the redis client's URL (holding the password: never print it),
/// the key prefix and the expiry in seconds. An unknown option is an error naming it.
pub(super) fn parse_url(url: &str) -> Result<(String, String, u64), BackendError> {
    let u = ServiceUrl::parse(url)?;
    let expires = u.parse_option::<u64>("result_expires", "a number of seconds")?.unwrap_or(86_400);
    let prefix = u.option("global_keyprefix").unwrap_or_default().to_owned();
    // The broker's option: accepted so that one URL serves both.
    u.accept(&["visibility_timeout"]);
    let client = broker_backends::redis::client_url(&u)?;
    u.finish()?;
    Ok((client, prefix, expires))
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
}

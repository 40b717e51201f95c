//! Service URLs (`redis://`, `amqp://`, `log://`, `log+tcp://`, `rpc://`, ...): one parser, one set of
//! option getters that remember what each scheme knows, and one way to print a URL — redacted.
//!
//! A [`ServiceUrl`] splits `SCHEME://[USER[:PASSWORD]@]LOCATION[?OPTIONS][#FRAGMENT]`, where LOCATION is
//! the host(s), port and path as written (a `log://` directory such as `./data` or `/abs/dir` is kept
//! byte for byte). Option names and values are percent-decoded (`%2F` is `/`; a `+` stays a `+`).
//! An option given twice is an error, as is a URL over [`MAX_URL_BYTES`] or with more than
//! [`MAX_OPTIONS`] options.
//!
//! Invariants:
//! - A scheme reads its options through the getters ([`ServiceUrl::option`], [`ServiceUrl::parse_option`],
//!   ...); each name asked for becomes a known option. Options handed through to a client library
//!   are named in [`ServiceUrl::connection_string`] or [`ServiceUrl::accept`]. Then
//!   [`ServiceUrl::finish`] fails naming every option nobody asked for, with the known ones.
//! - `Display` and `Debug` redact the userinfo password and every secret-bearing option (see
//!   [`is_secret_option`]); errors carry that redacted form. The secrets are only reachable through
//!   [`ServiceUrl::connection_string`] and [`ServiceUrl::expose_secret`], which are for client
//!   libraries, never for printing. [`redacted`] prints any URL string the same way.
//!
//! A `;`-separated list of URLs (Celery's failover form, `amqp://h1//;amqp://h2//`, and Kombu's
//! `sentinel://h1;sentinel://h2`) is one [`ServiceUrl`]: its parts and options are the first
//! element's (the backend parses every element itself, see [`split_list`]), and it prints every
//! element redacted.
//!
//! We keep a small parser rather than the `url` crate: its non-special-scheme rules would read
//! `log://./data` as host `.` and path `/data` and re-encode paths, and the server part must reach
//! lapin and redis exactly as the user wrote it.
//!
//! ```
//! use celery_core::url::ServiceUrl;
//! let url = ServiceUrl::parse("log+tcp://broker:7575/?token=s3cret&timeout=5").unwrap();
//! assert_eq!(url.to_string(), "log+tcp://broker:7575/?token=***&timeout=5");
//! let token = url.option("token").unwrap_or_default().to_owned();
//! assert_eq!(token, "s3cret");
//! let err = url.finish().unwrap_err();
//! assert_eq!(err.to_string(), "invalid URL `log+tcp://broker:7575/?token=***&timeout=5`: \
//!     unknown log+tcp:// option `timeout` (known: token)");
//! ```

use std::fmt;
use std::str::FromStr;
use std::sync::Mutex;
use std::time::Duration;

use percent_encoding::percent_decode_str;
use thiserror::Error;

/// The longest URL accepted, in bytes.
pub const MAX_URL_BYTES: usize = 16 * 1024;
/// The most query options a URL may carry.
pub const MAX_OPTIONS: usize = 128;

/// What is wrong with a URL. Its `url` is always the redacted form.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("invalid URL `{url}`: {reason}")]
pub struct UrlError {
    url: String,
    reason: String,
    unknown: Vec<String>,
}

impl UrlError {
    /// The URL, redacted.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// What is wrong with it (without the URL).
    pub fn reason(&self) -> &str {
        &self.reason
    }

    /// The options no one asked for, when that is the error.
    pub fn unknown_options(&self) -> &[String] {
        &self.unknown
    }
}

/// One `name=value` of the query.
#[derive(Clone)]
struct Opt {
    /// Percent-decoded name.
    name: String,
    /// Percent-decoded value (`""` when the pair has no `=`).
    value: String,
    /// The pair as written.
    raw: String,
}

/// A parsed service URL that prints only redacted. See the [module docs](self).
pub struct ServiceUrl {
    scheme: String,
    /// The username as written (percent-encoded).
    user: Option<String>,
    /// The password as written (percent-encoded).
    password: Option<String>,
    location: String,
    options: Vec<Opt>,
    fragment: Option<String>,
    /// Every option name a getter was asked for: the scheme's known options.
    known: Mutex<Vec<&'static str>>,
    /// The URL as given.
    raw: String,
    /// The other elements of a `;`-separated list (printed, redacted, after this one).
    others: Vec<ServiceUrl>,
}

/// True for option names that carry secrets: `token`, `password`, `pass`, `passwd`, `pwd`, `auth`,
/// `key`, and any name containing `token`, `password`, `passwd`, `secret` or `credential` or
/// ending in `_key`/`-key`/`apikey` (`keyfile` and `global_keyprefix` name no secret).
///
/// ```
/// use celery_core::url::is_secret_option;
/// assert!(is_secret_option("token") && is_secret_option("client_secret") && is_secret_option("api_key"));
/// assert!(!is_secret_option("keyfile") && !is_secret_option("global_keyprefix"));
/// ```
pub fn is_secret_option(name: &str) -> bool {
    let n = name.to_ascii_lowercase();
    ["token", "password", "passwd", "secret", "credential"].iter().any(|s| n.contains(s))
        || matches!(n.as_str(), "pass" | "pwd" | "auth" | "key")
        || n.ends_with("_key")
        || n.ends_with("-key")
        || n.ends_with("apikey")
}

/// `url` as it may be printed: password and secret options replaced by `***`. A string that is
/// not a `SCHEME://` URL is not printed at all.
///
/// ```
/// assert_eq!(celery_core::url::redacted("amqp://guest:guest@h:5672/%2f"), "amqp://guest:***@h:5672/%2f");
/// assert_eq!(celery_core::url::redacted("not a url"), "<not a URL>");
/// ```
pub fn redacted(url: &str) -> String {
    if let Some(elements) = split_list(url) {
        return elements
            .iter()
            .map(|e| if e.is_empty() { String::new() } else { redacted(e) })
            .collect::<Vec<_>>()
            .join(";");
    }
    match ServiceUrl::split(url) {
        Some(u) => u.to_string(),
        None => "<not a URL>".into(),
    }
}

/// The elements of a `;`-separated list of URLs, trimmed (Celery's failover form:
/// `amqp://u:p@h1:5672//;amqp://u:p@h2:5672//`); `None` when `url` is a single URL. It is a list
/// when every element after the first is empty or starts with `SCHEME://`, so a `;` inside one
/// URL (in a password or an option) does not split it.
///
/// ```
/// use celery_core::url::{redacted, split_list};
/// let list = "amqp://u:pw@h1:5672//;amqp://u:pw@h2:5672//";
/// assert_eq!(split_list(list), Some(vec!["amqp://u:pw@h1:5672//", "amqp://u:pw@h2:5672//"]));
/// assert_eq!(split_list("redis://:a;b@h/0"), None);
/// assert_eq!(redacted(list), "amqp://u:***@h1:5672//;amqp://u:***@h2:5672//");
/// ```
pub fn split_list(url: &str) -> Option<Vec<&str>> {
    let elements: Vec<&str> = url.split(';').map(str::trim).collect();
    let is_url = |e: &&str| e.is_empty() || ServiceUrl::split(e).is_some();
    (elements.len() > 1 && elements[1..].iter().all(is_url)).then_some(elements)
}

fn decode(s: &str) -> Result<String, String> {
    percent_decode_str(s).decode_utf8().map(|c| c.into_owned()).map_err(|_| format!("`{s}` is not UTF-8 once decoded"))
}

impl ServiceUrl {
    /// Parses `SCHEME://...`: the parts, and the options percent-decoded.
    ///
    /// ```
    /// use celery_core::url::ServiceUrl;
    /// let u = ServiceUrl::parse("redis://:pw@cache:6379/2?global_keyprefix=app%3A").unwrap();
    /// assert_eq!((u.scheme(), u.host_port(), u.path()), ("redis", "cache:6379", "/2"));
    /// assert_eq!(u.option("global_keyprefix"), Some("app:"));
    /// assert_eq!(format!("{u:?}"), "ServiceUrl(redis://:***@cache:6379/2?global_keyprefix=app%3A)");
    /// ```
    pub fn parse(url: &str) -> Result<ServiceUrl, UrlError> {
        if url.len() > MAX_URL_BYTES {
            return Err(UrlError {
                url: redacted(url),
                reason: format!("longer than {MAX_URL_BYTES} bytes"),
                unknown: Vec::new(),
            });
        }
        let Some(elements) = split_list(url) else { return ServiceUrl::parse_one(url) };
        let mut first = ServiceUrl::parse_one(elements[0])?;
        for e in elements[1..].iter().filter(|e| !e.is_empty()) {
            first.others.push(ServiceUrl::parse_one(e)?);
        }
        first.raw = url.to_owned();
        Ok(first)
    }

    /// [`ServiceUrl::parse`] of one URL.
    fn parse_one(url: &str) -> Result<ServiceUrl, UrlError> {
        let Some(parsed) = ServiceUrl::split(url) else {
            let reason = "expected SCHEME://..., like redis://HOST:6379/0 or log://./celery-data".into();
            return Err(UrlError { url: redacted(url), reason, unknown: Vec::new() });
        };
        if url.len() > MAX_URL_BYTES {
            return Err(parsed.invalid(format!("longer than {MAX_URL_BYTES} bytes")));
        }
        if parsed.options.len() > MAX_OPTIONS {
            return Err(parsed.invalid(format!("more than {MAX_OPTIONS} options")));
        }
        let query = url.split_once('?').map(|(_, q)| q.split_once('#').map_or(q, |(q, _)| q)).unwrap_or("");
        for (i, pair) in query.split('&').filter(|p| !p.is_empty()).enumerate() {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            let name = decode(name).map_err(|e| parsed.invalid(format!("option name {e}")))?;
            if let Err(e) = decode(value) {
                let shown = if is_secret_option(&name) { "the value".into() } else { e };
                return Err(parsed.invalid(format!("option `{name}`: {shown}")));
            }
            if parsed.options[..i].iter().any(|o| o.name == name) {
                return Err(parsed.invalid(format!("option `{name}` is given twice")));
            }
        }
        Ok(parsed)
    }

    /// The parts, leniently (undecodable text kept as written); None without `SCHEME://`.
    fn split(url: &str) -> Option<ServiceUrl> {
        let (scheme, rest) = url.split_once("://")?;
        let mut chars = scheme.chars();
        if !chars.next().is_some_and(|c| c.is_ascii_alphabetic())
            || !chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
        {
            return None;
        }
        let (before_query, query) = match rest.split_once('?') {
            Some((b, q)) => (b, Some(q)),
            None => (rest, None),
        };
        let (before_query, query, fragment) = match query {
            Some(q) => match q.split_once('#') {
                Some((q, f)) => (before_query, q, Some(f)),
                None => (before_query, q, None),
            },
            None => match before_query.split_once('#') {
                Some((b, f)) => (b, "", Some(f)),
                None => (before_query, "", None),
            },
        };
        let authority_end = before_query.find('/').unwrap_or(before_query.len());
        let (user, password, location) = match before_query[..authority_end].rfind('@') {
            Some(at) => {
                let userinfo = &before_query[..at];
                let (user, password) = match userinfo.split_once(':') {
                    Some((u, p)) => (u, Some(p.to_owned())),
                    None => (userinfo, None),
                };
                (Some(user.to_owned()), password, &before_query[at + 1..])
            }
            None => (None, None, before_query),
        };
        let options = query
            .split('&')
            .filter(|p| !p.is_empty())
            .map(|pair| {
                let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
                let lossy = |s: &str| percent_decode_str(s).decode_utf8_lossy().into_owned();
                Opt { name: lossy(name), value: lossy(value), raw: pair.to_owned() }
            })
            .collect();
        Some(ServiceUrl {
            scheme: scheme.to_owned(),
            user,
            password,
            location: location.to_owned(),
            options,
            fragment: fragment.map(str::to_owned),
            known: Mutex::new(Vec::new()),
            raw: url.to_owned(),
            others: Vec::new(),
        })
    }

    /// The scheme, without `://`.
    pub fn scheme(&self) -> &str {
        &self.scheme
    }

    /// The username as written (percent-encoded), if any.
    pub fn username(&self) -> Option<&str> {
        self.user.as_deref()
    }

    /// True when the userinfo carries a password.
    pub fn has_password(&self) -> bool {
        self.password.is_some()
    }

    /// Everything between `://` (or the userinfo's `@`) and `?`, as written: `HOST:PORT/PATH`, or a
    /// `log://` directory.
    pub fn location(&self) -> &str {
        &self.location
    }

    /// The host(s) and port: the location up to its first `/`.
    pub fn host_port(&self) -> &str {
        self.location.split('/').next().unwrap_or_default()
    }

    /// The path: the location from its first `/` (empty when there is none).
    pub fn path(&self) -> &str {
        self.location.find('/').map_or("", |i| &self.location[i..])
    }

    /// The options that carry no secret ([`is_secret_option`]), as decoded `(name, value)` pairs in
    /// the order written: what may be shown of a connection's settings. Asking for them makes no
    /// option known.
    ///
    /// ```
    /// let u = celery_core::url::ServiceUrl::parse("amqp://h/?heartbeat=30&password=x").unwrap();
    /// assert_eq!(u.public_options().collect::<Vec<_>>(), [("heartbeat", "30")]);
    /// ```
    pub fn public_options(&self) -> impl Iterator<Item = (&str, &str)> {
        self.options.iter().filter(|o| !is_secret_option(&o.name)).map(|o| (o.name.as_str(), o.value.as_str()))
    }

    /// The fragment after `#`, as written.
    pub fn fragment(&self) -> Option<&str> {
        self.fragment.as_deref()
    }

    fn known(&self) -> std::sync::MutexGuard<'_, Vec<&'static str>> {
        crate::sync::lock(&self.known)
    }

    fn note(&self, name: &'static str) {
        let mut known = self.known();
        if !known.contains(&name) {
            known.push(name);
        }
    }

    /// The decoded value of option `name` (`""` for a bare `name`), recording `name` as known.
    pub fn option(&self, name: &'static str) -> Option<&str> {
        self.note(name);
        self.options.iter().find(|o| o.name == name).map(|o| o.value.as_str())
    }

    /// The value of option `name` as written (still percent-encoded), recording `name` as known:
    /// for handing a value on inside another URL.
    pub fn option_as_written(&self, name: &'static str) -> Option<&str> {
        self.note(name);
        let raw = &self.options.iter().find(|o| o.name == name)?.raw;
        Some(raw.split_once('=').map_or("", |(_, v)| v))
    }

    /// Sets the userinfo password, as written in a URL (percent-encoded); an empty username is
    /// added when there is none.
    pub fn set_password(&mut self, password: &str) {
        self.user.get_or_insert_with(String::new);
        self.password = Some(password.to_owned());
    }

    /// Option `name` parsed as `T`; an error naming the option and `expected` when it does not parse.
    ///
    /// ```
    /// let u = celery_core::url::ServiceUrl::parse("amqp://h/?max_priority=300").unwrap();
    /// let e = u.parse_option::<u8>("max_priority", "a number from 1 to 255").unwrap_err();
    /// assert!(e.to_string().contains("max_priority `300` is not a number from 1 to 255"));
    /// ```
    pub fn parse_option<T: FromStr>(&self, name: &'static str, expected: &str) -> Result<Option<T>, UrlError> {
        match self.option(name) {
            None => Ok(None),
            Some(v) => v.parse().map(Some).map_err(|_| self.bad_value(name, expected)),
        }
    }

    /// Option `name` as a positive, finite number.
    pub fn positive(&self, name: &'static str) -> Result<Option<f64>, UrlError> {
        let n = self.parse_option::<f64>(name, "a positive number")?;
        match n {
            Some(n) if !(n > 0.0 && n.is_finite()) => Err(self.bad_value(name, "a positive number")),
            n => Ok(n),
        }
    }

    /// Option `name` as a positive number of seconds.
    pub fn seconds(&self, name: &'static str) -> Result<Option<Duration>, UrlError> {
        match self.parse_option::<f64>(name, "a positive number of seconds")? {
            Some(n) if n > 0.0 && n.is_finite() && n < 1e12 => Ok(Some(Duration::from_secs_f64(n))),
            Some(_) => Err(self.bad_value(name, "a positive number of seconds")),
            None => Ok(None),
        }
    }

    /// Option `name` as a flag: `true`, `1`, `yes`, `on` or a bare `name`; `false`, `0`, `no`, `off`.
    pub fn flag(&self, name: &'static str) -> Result<Option<bool>, UrlError> {
        match self.option(name) {
            None => Ok(None),
            Some("" | "true" | "1" | "yes" | "on") => Ok(Some(true)),
            Some("false" | "0" | "no" | "off") => Ok(Some(false)),
            Some(_) => Err(self.bad_value(name, "true or false")),
        }
    }

    /// Records `names` as known without reading them: options accepted for compatibility with
    /// Celery's URLs that have no effect here.
    pub fn accept(&self, names: &[&'static str]) {
        names.iter().for_each(|n| self.note(n));
    }

    /// An error about option `name` whose value is not `expected` (a secret value is not shown).
    pub fn bad_value(&self, name: &str, expected: &str) -> UrlError {
        match self.options.iter().find(|o| o.name == name) {
            Some(o) if !is_secret_option(name) => self.invalid(format!("{name} `{}` is not {expected}", o.value)),
            _ => self.invalid(format!("{name} is not {expected}")),
        }
    }

    /// An error about this URL (printed redacted).
    pub fn invalid(&self, reason: impl Into<String>) -> UrlError {
        UrlError { url: self.to_string(), reason: reason.into(), unknown: Vec::new() }
    }

    /// Fails naming every option that no getter asked for, and the known ones.
    pub fn finish(&self) -> Result<(), UrlError> {
        let known = self.known();
        let unknown: Vec<String> =
            self.options.iter().filter(|o| !known.contains(&o.name.as_str())).map(|o| o.name.clone()).collect();
        if unknown.is_empty() {
            return Ok(());
        }
        let mut names: Vec<&str> = known.clone();
        names.sort_unstable();
        let list = |v: &[String]| v.iter().map(|n| format!("`{n}`")).collect::<Vec<_>>().join(", ");
        let reason = format!(
            "unknown {}:// option{} {} (known: {})",
            self.scheme,
            if unknown.len() > 1 { "s" } else { "" },
            list(&unknown),
            if names.is_empty() { "none".into() } else { names.join(", ") }
        );
        Err(UrlError { url: self.to_string(), reason, unknown })
    }

    /// The URL to hand to a client library, with `forwarded` options only (in their order as
    /// written), which become known. It holds the secrets: never print it.
    ///
    /// ```
    /// let u = celery_core::url::ServiceUrl::parse("redis://:pw@h/0?protocol=resp3&global_keyprefix=a").unwrap();
    /// assert_eq!(u.connection_string(&["protocol"]), "redis://:pw@h/0?protocol=resp3");
    /// ```
    pub fn connection_string(&self, forwarded: &[&'static str]) -> String {
        self.accept(forwarded);
        self.assemble(|name| forwarded.contains(&name))
    }

    /// The URL to hand to another layer that reads its own options (a result backend to its
    /// broker): every option but `taken`, which become known. It holds the secrets: never print it.
    ///
    /// ```
    /// let u = celery_core::url::ServiceUrl::parse("log+tcp://h:1?token=t&result_expires=60").unwrap();
    /// assert_eq!(u.connection_string_except(&["result_expires"]), "log+tcp://h:1?token=t");
    /// ```
    pub fn connection_string_except(&self, taken: &[&'static str]) -> String {
        self.accept(taken);
        self.assemble(|name| !taken.contains(&name))
    }

    fn assemble(&self, keep: impl Fn(&str) -> bool) -> String {
        let mut s = format!("{}://", self.scheme);
        if let Some(user) = &self.user {
            s.push_str(user);
            if let Some(p) = &self.password {
                s.push(':');
                s.push_str(p);
            }
            s.push('@');
        }
        s.push_str(&self.location);
        let kept: Vec<&str> = self.options.iter().filter(|o| keep(&o.name)).map(|o| o.raw.as_str()).collect();
        if !kept.is_empty() {
            s.push('?');
            s.push_str(&kept.join("&"));
        }
        if let Some(f) = &self.fragment {
            s.push('#');
            s.push_str(f);
        }
        s
    }

    /// The URL exactly as given, secrets included: for client libraries, never for printing.
    pub fn expose_secret(&self) -> &str {
        &self.raw
    }
}

impl fmt::Display for ServiceUrl {
    /// The URL with the password and secret options replaced by `***`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://", self.scheme)?;
        if let Some(user) = &self.user {
            write!(f, "{user}{}@", if self.password.is_some() { ":***" } else { "" })?;
        }
        f.write_str(&self.location)?;
        for (i, o) in self.options.iter().enumerate() {
            f.write_str(if i == 0 { "?" } else { "&" })?;
            if is_secret_option(&o.name) {
                let name = o.raw.split_once('=').map_or(o.raw.as_str(), |(n, _)| n);
                write!(f, "{name}=***")?;
            } else {
                f.write_str(&o.raw)?;
            }
        }
        if let Some(frag) = &self.fragment {
            write!(f, "#{frag}")?;
        }
        for other in &self.others {
            write!(f, ";{other}")?;
        }
        Ok(())
    }
}

impl Clone for ServiceUrl {
    fn clone(&self) -> Self {
        ServiceUrl {
            scheme: self.scheme.clone(),
            user: self.user.clone(),
            password: self.password.clone(),
            location: self.location.clone(),
            options: self.options.clone(),
            fragment: self.fragment.clone(),
            known: Mutex::new(self.known().clone()),
            raw: self.raw.clone(),
            others: self.others.clone(),
        }
    }
}

impl fmt::Debug for ServiceUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ServiceUrl({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A failover list prints every element redacted, reads the first element's parts, and keeps
    /// the whole list for the client.
    #[test]
    fn a_list_of_urls_is_redacted_element_by_element() {
        let list = "amqp://u:p1@h1:5672/%2f?queue_type=quorum; amqp://u:p2@h2:5672/%2f?queue_type=quorum;";
        let u = ServiceUrl::parse(list).unwrap();
        assert_eq!(
            u.to_string(),
            "amqp://u:***@h1:5672/%2f?queue_type=quorum;amqp://u:***@h2:5672/%2f?queue_type=quorum"
        );
        assert_eq!((u.scheme(), u.host_port(), u.option("queue_type")), ("amqp", "h1:5672", Some("quorum")));
        assert_eq!(u.expose_secret(), list);
        assert_eq!(
            redacted(list),
            "amqp://u:***@h1:5672/%2f?queue_type=quorum;amqp://u:***@h2:5672/%2f?queue_type=quorum;"
        );
        let e = ServiceUrl::parse("amqp://u:p1@h1;amqp://u:p2@h2?x=1&x=2").unwrap_err().to_string();
        assert!(e.contains("`x` is given twice") && !e.contains("p1") && !e.contains("p2"), "{e}");
        // A `;` inside one URL does not split it.
        let u = ServiceUrl::parse("redis://:a;b@h/0").unwrap();
        assert_eq!((u.to_string().as_str(), u.host_port()), ("redis://:***@h/0", "h"));
    }

    #[test]
    fn every_secret_form_is_redacted() {
        for (url, shown) in [
            ("redis://:pw@h:6379/0", "redis://:***@h:6379/0"),
            ("redis://user:pw@h:6379/0", "redis://user:***@h:6379/0"),
            ("amqp://guest:p%40ss@rabbit:5672/%2f", "amqp://guest:***@rabbit:5672/%2f"),
            ("amqps://u:a:b@h/v", "amqps://u:***@h/v"),
            ("log+tcp://h:7575/?token=abc", "log+tcp://h:7575/?token=***"),
            ("log+tls://h:7575?token=abc&ca_certs=/ca.pem", "log+tls://h:7575?token=***&ca_certs=/ca.pem"),
            ("redis://h/0?password=pw&db=1", "redis://h/0?password=***&db=1"),
            ("redis+unix:///s.sock?pass=pw", "redis+unix:///s.sock?pass=***"),
            ("x://h?client_secret=s&api_key=k&keyfile=/k.pem", "x://h?client_secret=***&api_key=***&keyfile=/k.pem"),
            ("x://h?to%6Ben=abc", "x://h?to%6Ben=***"),
            ("x://h?token", "x://h?token=***"),
            ("redis://h/0#insecure", "redis://h/0#insecure"),
            ("log://./data", "log://./data"),
        ] {
            let u = ServiceUrl::parse(url).unwrap();
            assert_eq!(u.to_string(), shown, "{url}");
            assert_eq!(format!("{u:?}"), format!("ServiceUrl({shown})"));
            assert_eq!(redacted(url), shown);
        }
    }

    #[test]
    fn errors_never_carry_secrets() {
        let u = ServiceUrl::parse("amqp://u:hunter2@h/?token=zzz9&max_priority=abc").unwrap();
        let e = u.parse_option::<u8>("token", "a number").unwrap_err().to_string();
        assert!(!e.contains("zzz9") && !e.contains("hunter2") && e.contains("token is not a number"), "{e}");
        let e = u.finish().unwrap_err().to_string();
        assert!(!e.contains("zzz9") && !e.contains("hunter2"), "{e}");
        let e = ServiceUrl::parse("amqp://u:hunter2@h/?token=a&token=b").unwrap_err().to_string();
        assert!(e.contains("`token` is given twice") && !e.contains("hunter2"), "{e}");
        let e = ServiceUrl::parse("amqp://u:hunter2@h/?token=%FF").unwrap_err().to_string();
        assert!(e.contains("token") && !e.contains("hunter2") && !e.contains("%FF"), "{e}");
        assert_eq!(redacted("u:hunter2@h"), "<not a URL>");
    }

    #[test]
    fn unknown_options_are_named_with_the_known_ones() {
        let u = ServiceUrl::parse("redis://h/0?visibility_timeout=5&bogus=1&db=1&typo_prefix=x").unwrap();
        assert_eq!(u.seconds("visibility_timeout").unwrap(), Some(Duration::from_secs(5)));
        u.accept(&["db"]);
        let e = u.finish().unwrap_err();
        assert_eq!(e.unknown_options(), ["bogus", "typo_prefix"]);
        assert_eq!(e.reason(), "unknown redis:// options `bogus`, `typo_prefix` (known: db, visibility_timeout)");
        let u = ServiceUrl::parse("memory://?x=1").unwrap();
        assert_eq!(u.finish().unwrap_err().reason(), "unknown memory:// option `x` (known: none)");
        assert!(ServiceUrl::parse("memory://").unwrap().finish().is_ok());
    }

    #[test]
    fn parts_are_split_as_written() {
        let u = ServiceUrl::parse("amqp://guest:guest@h1:5672,h2:5672/%2f?heartbeat=10#f").unwrap();
        assert_eq!((u.scheme(), u.username(), u.has_password()), ("amqp", Some("guest"), true));
        assert_eq!((u.host_port(), u.path(), u.location()), ("h1:5672,h2:5672", "/%2f", "h1:5672,h2:5672/%2f"));
        assert_eq!((u.option("heartbeat"), u.fragment()), (Some("10"), Some("f")));
        let u = ServiceUrl::parse("log:///abs/dir").unwrap();
        assert_eq!((u.host_port(), u.path(), u.location()), ("", "/abs/dir", "/abs/dir"));
        let u = ServiceUrl::parse("log://./rel/d@x?fsync=os").unwrap();
        assert_eq!((u.location(), u.username()), ("./rel/d@x", None));
        let u = ServiceUrl::parse("log+tcp://h:1?token=a+b/c==&p=%2Fx").unwrap();
        assert_eq!((u.option("token"), u.option("p")), (Some("a+b/c=="), Some("/x")));
        assert_eq!(u.connection_string(&["p"]), "log+tcp://h:1?p=%2Fx");
        assert_eq!(u.expose_secret(), "log+tcp://h:1?token=a+b/c==&p=%2Fx");
        assert_eq!((u.option_as_written("p"), u.option_as_written("zz")), (Some("%2Fx"), None));
        let mut u = ServiceUrl::parse("redis://h/0?password=p%40ss").unwrap();
        u.set_password(u.option_as_written("password").unwrap_or_default().to_owned().as_str());
        assert_eq!(
            (u.connection_string(&[]), u.to_string()),
            ("redis://:p%40ss@h/0".into(), "redis://:***@h/0?password=***".into())
        );
    }

    #[test]
    fn typed_getters_check_values() {
        let u = ServiceUrl::parse("x://h?a=2.5&b=0&c=yes&d=maybe&e=-1&f=inf").unwrap();
        assert_eq!(u.seconds("a").unwrap(), Some(Duration::from_millis(2500)));
        assert!(u.seconds("b").unwrap_err().reason().contains("b `0` is not a positive number of seconds"));
        assert_eq!((u.flag("c").unwrap(), u.flag("zz").unwrap()), (Some(true), None));
        assert!(u.flag("d").unwrap_err().reason().contains("true or false"));
        assert!(u.positive("e").is_err() && u.positive("f").is_err());
        assert_eq!(u.positive("a").unwrap(), Some(2.5));
    }

    #[test]
    fn malformed_and_oversized_urls_are_refused() {
        for (url, needle) in [
            ("no-scheme", "expected SCHEME://"),
            ("://h", "expected SCHEME://"),
            ("1x://h", "expected SCHEME://"),
            ("x://h?n=%C3%28", "not UTF-8"),
        ] {
            let e = ServiceUrl::parse(url).unwrap_err().to_string();
            assert!(e.contains(needle), "{url}: {e}");
        }
        let long = format!("log:///{}", "a".repeat(MAX_URL_BYTES));
        assert!(ServiceUrl::parse(&long).unwrap_err().reason().contains("longer than"));
        let many = format!("x://h?{}", (0..=MAX_OPTIONS).map(|i| format!("o{i}=1")).collect::<Vec<_>>().join("&"));
        assert!(ServiceUrl::parse(&many).unwrap_err().reason().contains("more than"));
    }
}

//! What every request to the dashboard passes before it is served, and what every answer carries.
//!
//! - **Host** (DNS-rebinding defence): the `Host` header must name the bound address (an IP literal
//!   of it, with its port if one is given; any IP literal when bound to `0.0.0.0`/`::`; `localhost`
//!   too when bound to loopback) or one of the configured names (`--allow-host NAME` for any port,
//!   `NAME:PORT` for one). Anything else is answered `421 Misdirected Request`, so a page of
//!   `evil.example` that points its own name at this address reads nothing.
//! - **Token**: when one is set, every request presents it (`Authorization: Bearer ...` or
//!   `?token=...`).
//! - **Control** (every request that is not `GET`/`HEAD`): either `Authorization: Bearer <token>`
//!   (scripts; no browser sends it cross-site), or both a same-origin request (`Origin`, else
//!   `Referer`, names the same host as `Host`) and the CSRF token that the page carries in its HTML
//!   (`<meta name="csrf-token">`), sent back as `X-CSRF-Token`. Otherwise `403`.
//! - **Headers** on every answer: `Content-Security-Policy` (`default-src 'self'`, the page's one
//!   inline script and style allowed by a fresh nonce each time it is served, no framing),
//!   `X-Frame-Options: DENY`, `X-Content-Type-Options: nosniff`, `Referrer-Policy: no-referrer`,
//!   and `Cache-Control: no-store`.

use std::net::{IpAddr, SocketAddr};

use axum::http::{header, HeaderMap, HeaderName, HeaderValue, Method};

/// The header the page sends its CSRF token in.
pub const CSRF_HEADER: &str = "x-csrf-token";

/// The policy of every answer but the page (which adds its nonce).
const CSP: &str = "default-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

/// The request checks of one dashboard.
#[derive(Debug, Clone)]
pub struct Guard {
    listen: SocketAddr,
    names: Vec<String>,
    token: Option<String>,
    csrf: String,
}

/// Why a request is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The Host header names something else (421).
    Host,
    /// The token is missing or wrong (401).
    Token,
    /// A control request that is cross-site or lacks the CSRF token (403).
    CrossSite,
}

impl Refusal {
    /// The status and the message it is answered with.
    pub fn answer(self) -> (axum::http::StatusCode, &'static str) {
        use axum::http::StatusCode;
        match self {
            Refusal::Host => (
                StatusCode::MISDIRECTED_REQUEST,
                "unknown Host: use the address the monitor listens on, or start it with --allow-host NAME",
            ),
            Refusal::Token => (StatusCode::UNAUTHORIZED, "a token is required (?token=...)"),
            Refusal::CrossSite => (
                StatusCode::FORBIDDEN,
                "control needs Authorization: Bearer <token>, or a same-origin request with the page's X-CSRF-Token",
            ),
        }
    }
}

/// A fresh random token: 32 random bytes, hex.
pub fn random_token() -> String {
    rand::random::<[u8; 32]>().iter().map(|b| format!("{b:02x}")).collect()
}

/// Compares secrets in time independent of where they differ.
fn same_secret(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Splits a `Host` value into its name (lowercase, brackets and a trailing dot removed) and port.
fn split_host(host: &str) -> Option<(String, Option<u16>)> {
    let (name, port) = if let Some(rest) = host.strip_prefix('[') {
        let (name, after) = rest.split_once(']')?;
        (name, after)
    } else {
        match host.rsplit_once(':') {
            Some((name, _)) => (name, &host[name.len()..]),
            None => (host, ""),
        }
    };
    let port = match port {
        "" => None,
        p => Some(p.strip_prefix(':')?.parse().ok()?),
    };
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    (!name.is_empty()).then_some((name, port))
}

fn header_str(headers: &HeaderMap, name: impl axum::http::header::AsHeaderName) -> Option<&str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

impl Guard {
    /// Checks for a dashboard listening on `listen`, also known as `names`, with an optional token.
    pub fn new(listen: SocketAddr, names: Vec<String>, token: Option<String>) -> Guard {
        let token = token.filter(|t| !t.is_empty());
        Guard {
            listen,
            names: names.into_iter().map(|n| n.to_ascii_lowercase()).collect(),
            token,
            csrf: random_token(),
        }
    }

    /// The CSRF token the page embeds.
    pub fn csrf(&self) -> &str {
        &self.csrf
    }

    /// True when `host` (the `Host` header) names this dashboard.
    pub fn host_ok(&self, host: Option<&str>) -> bool {
        let Some((name, port)) = host.and_then(split_host) else { return false };
        let configured = self.names.iter().any(|n| match split_host(n) {
            Some((n, None)) => n == name,
            Some((n, Some(p))) => n == name && port.unwrap_or(80) == p,
            None => false,
        });
        if configured {
            return true;
        }
        // A port, when given, must be ours; without one (a client's shorthand) the name decides,
        // and a rebinding page's Host always names its own site.
        if port.is_some_and(|p| p != self.listen.port()) {
            return false;
        }
        let bound = self.listen.ip();
        match name.parse::<IpAddr>() {
            Ok(ip) => ip == bound || bound.is_unspecified() || (bound.is_loopback() && ip.is_loopback()),
            Err(_) => name == "localhost" && (bound.is_loopback() || bound.is_unspecified()),
        }
    }

    /// True when no token is set, or the request presents it (bearer or `?token=`).
    pub fn token_ok(&self, headers: &HeaderMap, query: Option<&str>) -> bool {
        let Some(token) = &self.token else { return true };
        self.bearer_ok(headers)
            || query
                .unwrap_or_default()
                .split('&')
                .any(|p| p.strip_prefix("token=").is_some_and(|t| same_secret(t, token)))
    }

    fn bearer_ok(&self, headers: &HeaderMap) -> bool {
        let bearer = header_str(headers, header::AUTHORIZATION).and_then(|v| v.strip_prefix("Bearer "));
        matches!((&self.token, bearer), (Some(t), Some(b)) if same_secret(b, t))
    }

    /// True when a request of `method` may go on: reads always; control with the bearer token, or
    /// same-origin with the page's CSRF token.
    pub fn control_ok(&self, method: &Method, headers: &HeaderMap) -> bool {
        if method == Method::GET || method == Method::HEAD || self.bearer_ok(headers) {
            return true;
        }
        let csrf = header_str(headers, CSRF_HEADER).is_some_and(|t| same_secret(t, &self.csrf));
        csrf && same_origin(headers)
    }

    /// Every check in order: host, token, control.
    pub fn check(&self, method: &Method, headers: &HeaderMap, query: Option<&str>) -> Result<(), Refusal> {
        if !self.host_ok(header_str(headers, header::HOST)) {
            return Err(Refusal::Host);
        }
        if !self.token_ok(headers, query) {
            return Err(Refusal::Token);
        }
        if !self.control_ok(method, headers) {
            return Err(Refusal::CrossSite);
        }
        Ok(())
    }
}

/// True when `Origin` (or, without it, `Referer`) names the host the request was sent to.
fn same_origin(headers: &HeaderMap) -> bool {
    let Some(host) = header_str(headers, header::HOST).map(str::to_ascii_lowercase) else { return false };
    let ours = |url: &str| {
        let url = url.to_ascii_lowercase();
        let rest = url.strip_prefix("http://").or_else(|| url.strip_prefix("https://"));
        rest.is_some_and(|r| r.split(['/', '?', '#']).next() == Some(host.as_str()))
    };
    match header_str(headers, header::ORIGIN) {
        Some(origin) => ours(origin),
        None => header_str(headers, header::REFERER).is_some_and(ours),
    }
}

/// Adds the security headers to an answer (keeping a page's own `Content-Security-Policy`).
pub fn secure(headers: &mut HeaderMap) {
    let set = |h: &mut HeaderMap, name: HeaderName, value: &'static str| {
        h.insert(name, HeaderValue::from_static(value));
    };
    if !headers.contains_key(header::CONTENT_SECURITY_POLICY) {
        set(headers, header::CONTENT_SECURITY_POLICY, CSP);
    }
    set(headers, header::X_FRAME_OPTIONS, "DENY");
    set(headers, header::X_CONTENT_TYPE_OPTIONS, "nosniff");
    set(headers, header::REFERRER_POLICY, "no-referrer");
    set(headers, header::CACHE_CONTROL, "no-store");
}

/// The page with `csrf` embedded and `nonce` on its script and style, and the policy that allows
/// exactly those.
pub fn page(template: &str, csrf: &str, nonce: &str) -> (String, String) {
    let html = template
        .replacen("<script>", &format!("<script nonce=\"{nonce}\">"), 1)
        .replacen("<style>", &format!("<style nonce=\"{nonce}\">"), 1)
        .replacen("{{csrf}}", csrf, 1);
    let csp = format!(
        "default-src 'self'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; img-src 'self' data:; \
         connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    );
    (html, csp)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    fn guard(listen: &str, names: &[&str]) -> Guard {
        Guard::new(listen.parse().unwrap(), names.iter().map(|s| s.to_string()).collect(), None)
    }

    #[test]
    fn host_must_name_the_bound_address() {
        let g = guard("127.0.0.1:5555", &[]);
        for ok in ["127.0.0.1:5555", "localhost:5555", "LOCALHOST:5555", "[::1]:5555", "127.0.0.2:5555", "localhost"] {
            assert!(g.host_ok(Some(ok)), "{ok}");
        }
        for bad in ["evil.example:5555", "evil.example", "127.0.0.1:80", "10.0.0.1:5555", "", ":5555", "[::1"] {
            assert!(!g.host_ok(Some(bad)), "{bad}");
        }
        assert!(!g.host_ok(None));

        let g = guard("10.0.0.5:8080", &["monitor.example.com", "ops.example:9000"]);
        assert!(g.host_ok(Some("10.0.0.5:8080")));
        assert!(!g.host_ok(Some("localhost:8080")) && !g.host_ok(Some("10.0.0.6:8080")));
        assert!(g.host_ok(Some("monitor.example.com")) && g.host_ok(Some("Monitor.Example.com.:443")));
        assert!(g.host_ok(Some("ops.example:9000")) && !g.host_ok(Some("ops.example:9001")));

        let g = guard("0.0.0.0:5555", &[]);
        assert!(g.host_ok(Some("192.168.1.20:5555")) && !g.host_ok(Some("rebound.evil.example:5555")));
    }

    #[test]
    fn control_needs_same_origin_and_the_csrf_token_or_the_bearer() {
        let g = Guard::new("127.0.0.1:5555".parse().unwrap(), Vec::new(), Some("s3cret".into()));
        let csrf = g.csrf().to_owned();
        assert_eq!(csrf.len(), 64);
        assert_ne!(csrf, Guard::new("127.0.0.1:1".parse().unwrap(), Vec::new(), None).csrf());
        let host = ("host", "127.0.0.1:5555");
        let post = Method::POST;
        assert!(g.control_ok(&Method::GET, &headers(&[host])));
        assert!(!g.control_ok(&post, &headers(&[host])));
        let same = ("origin", "http://127.0.0.1:5555");
        assert!(g.control_ok(&post, &headers(&[host, same, ("x-csrf-token", &csrf)])));
        assert!(!g.control_ok(&post, &headers(&[host, same])), "no CSRF token");
        assert!(!g.control_ok(&post, &headers(&[host, same, ("x-csrf-token", "guess")])));
        let evil = ("origin", "http://evil.example");
        assert!(!g.control_ok(&post, &headers(&[host, evil, ("x-csrf-token", &csrf)])));
        assert!(!g.control_ok(&post, &headers(&[host, ("origin", "null"), ("x-csrf-token", &csrf)])));
        assert!(!g.control_ok(&post, &headers(&[host, ("x-csrf-token", &csrf)])), "neither Origin nor Referer");
        let referer = ("referer", "http://127.0.0.1:5555/?token=s3cret");
        assert!(g.control_ok(&post, &headers(&[host, referer, ("x-csrf-token", &csrf)])));
        let far = ("referer", "http://127.0.0.1:5555.evil.example/");
        assert!(!g.control_ok(&post, &headers(&[host, far, ("x-csrf-token", &csrf)])));
        assert!(g.control_ok(&post, &headers(&[host, ("authorization", "Bearer s3cret")])));
        assert!(!g.control_ok(&post, &headers(&[host, ("authorization", "Bearer s3cre")])));
    }

    #[test]
    fn check_orders_host_token_control() {
        let g = Guard::new("127.0.0.1:5555".parse().unwrap(), Vec::new(), Some("s3cret".into()));
        let get = Method::GET;
        assert_eq!(g.check(&get, &headers(&[("host", "evil.example")]), Some("token=s3cret")), Err(Refusal::Host));
        assert_eq!(g.check(&get, &headers(&[("host", "127.0.0.1:5555")]), None), Err(Refusal::Token));
        assert_eq!(g.check(&get, &headers(&[("host", "127.0.0.1:5555")]), Some("a=1&token=s3cret")), Ok(()));
        assert_eq!(
            g.check(&Method::POST, &headers(&[("host", "127.0.0.1:5555")]), Some("token=s3cret")),
            Err(Refusal::CrossSite),
            "the token in the URL is not enough for control"
        );
    }

    #[test]
    fn the_page_gets_its_nonce_and_token() {
        let (html, csp) = page("<style>a{}</style><meta content=\"{{csrf}}\"><script>x()</script>", "T", "N");
        assert_eq!(html, "<style nonce=\"N\">a{}</style><meta content=\"T\"><script nonce=\"N\">x()</script>");
        assert!(csp.contains("script-src 'nonce-N'") && csp.contains("style-src 'nonce-N'"));
        assert!(csp.starts_with("default-src 'self'") && !csp.contains("unsafe-inline"));
        let mut h = HeaderMap::new();
        secure(&mut h);
        assert_eq!(h[header::X_FRAME_OPTIONS], "DENY");
        assert_eq!(h[header::X_CONTENT_TYPE_OPTIONS], "nosniff");
        assert_eq!(h[header::REFERRER_POLICY], "no-referrer");
        assert!(h[header::CONTENT_SECURITY_POLICY].to_str().unwrap().contains("frame-ancestors 'none'"));
    }
}

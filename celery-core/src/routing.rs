//! Routing vocabulary shared by every broker that has to emulate it: exchange kinds and the topic
//! matcher (`*` matches exactly one dot-separated word, `#` zero or more).
//!
//! ```
//! use celery_core::routing::topic_matches;
//! assert!(topic_matches("*.error", "kern.error"));
//! assert!(topic_matches("kern.#", "kern"));
//! assert!(!topic_matches("*.error", "kern.disk.error"));
//! ```

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// The kind of an exchange.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExchangeKind {
    /// Routing key equals binding key.
    Direct,
    /// Binding key is a pattern of words.
    Topic,
    /// Every bound queue.
    Fanout,
    /// Header match.
    Headers,
}

/// An exchange as broadcasts declare it where the broker declares exchanges (RabbitMQ): name, kind
/// and durability must match what other clients (Celery) declare.
///
/// ```
/// use celery_core::routing::{Exchange, ExchangeKind};
/// let ev = Exchange::new("celeryev", ExchangeKind::Topic);
/// assert!(ev.durable);
/// assert!(!Exchange::new("celery.pidbox", ExchangeKind::Fanout).transient().durable);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exchange {
    /// The name.
    pub name: String,
    /// The kind.
    pub kind: ExchangeKind,
    /// Survives a broker restart (Celery's event exchange is; its control exchanges are not).
    pub durable: bool,
}

impl Exchange {
    /// A durable exchange.
    pub fn new(name: impl Into<String>, kind: ExchangeKind) -> Exchange {
        Exchange { name: name.into(), kind, durable: true }
    }

    /// The same, not durable.
    pub fn transient(mut self) -> Exchange {
        self.durable = false;
        self
    }
}

impl std::str::FromStr for ExchangeKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "direct" => ExchangeKind::Direct,
            "topic" => ExchangeKind::Topic,
            "fanout" => ExchangeKind::Fanout,
            "headers" => ExchangeKind::Headers,
            other => return Err(format!("unknown exchange kind `{other}` (direct, topic, fanout, headers)")),
        })
    }
}

/// Where a message goes: exchange (empty = default, by queue name) and routing key.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Route {
    /// The exchange; `""` routes by queue name.
    pub exchange: String,
    /// The routing key (the queue name on the default exchange).
    pub routing_key: String,
    /// Fail the publish when no queue matches (instead of counting and dropping it).
    pub mandatory: bool,
}

impl Route {
    /// The default exchange to `queue`.
    pub fn queue(queue: impl Into<String>) -> Route {
        Route { exchange: String::new(), routing_key: queue.into(), mandatory: false }
    }

    /// Through `exchange` with `routing_key`.
    pub fn exchange(exchange: impl Into<String>, routing_key: impl Into<String>) -> Route {
        Route { exchange: exchange.into(), routing_key: routing_key.into(), mandatory: false }
    }
}

/// A queue bound to an exchange: by routing key (direct: equal; topic: a pattern; fanout: ignored) or,
/// on a headers exchange, by header values (`match_all`: every one must match, else any).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Binding {
    /// The exchange.
    pub exchange: String,
    /// The bound queue.
    pub queue: String,
    /// The binding key.
    #[serde(default)]
    pub routing_key: String,
    /// Header values to match (headers exchanges).
    #[serde(default)]
    pub headers: Map<String, Value>,
    /// `x-match: all` (true) or `any`.
    #[serde(default = "yes")]
    pub match_all: bool,
}

fn yes() -> bool {
    true
}

impl Binding {
    /// A binding by routing key.
    pub fn new(exchange: impl Into<String>, queue: impl Into<String>, routing_key: impl Into<String>) -> Binding {
        Binding {
            exchange: exchange.into(),
            queue: queue.into(),
            routing_key: routing_key.into(),
            headers: Map::new(),
            match_all: true,
        }
    }

    /// A headers binding.
    pub fn headers(
        exchange: impl Into<String>,
        queue: impl Into<String>,
        headers: Map<String, Value>,
        match_all: bool,
    ) -> Binding {
        Binding { exchange: exchange.into(), queue: queue.into(), routing_key: String::new(), headers, match_all }
    }
}

/// Why a message could not be routed or a declaration was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RouteError {
    /// No such exchange.
    #[error("exchange `{0}` is not declared")]
    UnknownExchange(String),
    /// Declared again with another kind.
    #[error("exchange `{name}` is a {existing:?} exchange, not {requested:?}")]
    KindMismatch {
        /// The exchange.
        name: String,
        /// Its kind.
        existing: ExchangeKind,
        /// The kind asked for.
        requested: ExchangeKind,
    },
    /// A name or key over [`MAX_NAME`] bytes (AMQP's limit for exchange names and routing keys).
    #[error("{what} of {len} bytes is over the limit of {MAX_NAME} bytes")]
    TooLong {
        /// What it is (`routing key`, `exchange name`, ...).
        what: &'static str,
        /// Its length in bytes.
        len: usize,
    },
    /// The table is full.
    #[error("too many {what} (limit {limit})")]
    TooMany {
        /// Exchanges or bindings.
        what: &'static str,
        /// The limit.
        limit: usize,
    },
}

/// The longest exchange name, queue name in a binding, binding key or routing key (AMQP's short
/// string).
pub const MAX_NAME: usize = 255;
/// The most exchanges, and the most bindings, a routing table holds: with keys of at most
/// [`MAX_NAME`] bytes, routing one message costs at most this many matches of ~128 x 128 steps.
pub const MAX_ENTRIES: usize = 10_000;

/// A list of queue names for a log line: the first [`QueueNames::SHOWN`] names and how many more,
/// so a worker consuming thousands of queues logs one short line, not every name.
///
/// ```
/// use celery_core::routing::QueueNames;
/// let few = ["a".to_string(), "b".to_string()];
/// assert_eq!(QueueNames(&few).to_string(), "a, b");
/// let many: Vec<String> = (0..1000).map(|i| format!("q.{i}")).collect();
/// assert_eq!(QueueNames(&many).to_string(), "q.0, q.1, q.2, q.3, q.4, q.5, q.6, q.7 and 992 more");
/// ```
#[derive(Debug, Clone, Copy)]
pub struct QueueNames<'a>(pub &'a [String]);

impl QueueNames<'_> {
    /// How many names are shown.
    pub const SHOWN: usize = 8;
}

impl std::fmt::Display for QueueNames<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, q) in self.0.iter().take(Self::SHOWN).enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            f.write_str(q)?;
        }
        match self.0.len().saturating_sub(Self::SHOWN) {
            0 => Ok(()),
            more => write!(f, " and {more} more"),
        }
    }
}

fn check_len(what: &'static str, s: &str) -> Result<(), RouteError> {
    if s.len() > MAX_NAME {
        return Err(RouteError::TooLong { what, len: s.len() });
    }
    Ok(())
}

/// Exchanges and bindings, and the routing decision, for brokers that emulate RabbitMQ's model.
///
/// ```
/// use celery_core::routing::{Binding, ExchangeKind, RoutingTable};
/// let mut t = RoutingTable::default();
/// t.declare("logs", ExchangeKind::Topic).unwrap();
/// t.bind(Binding::new("logs", "errors", "*.error")).unwrap();
/// t.bind(Binding::new("logs", "kernel", "kern.#")).unwrap();
/// let mut q = t.route("logs", "kern.error", &Default::default()).unwrap();
/// q.sort();
/// assert_eq!(q, ["errors", "kernel"]);
/// assert_eq!(t.route("", "celery", &Default::default()).unwrap(), ["celery"]);
/// ```
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RoutingTable {
    /// Declared exchanges.
    pub exchanges: BTreeMap<String, ExchangeKind>,
    /// Bindings.
    pub bindings: Vec<Binding>,
}

impl RoutingTable {
    /// Declares an exchange (again with the same kind is fine); true when it is new.
    pub fn declare(&mut self, name: &str, kind: ExchangeKind) -> Result<bool, RouteError> {
        match self.exchanges.get(name) {
            Some(k) if *k == kind => Ok(false),
            Some(k) => Err(RouteError::KindMismatch { name: name.into(), existing: *k, requested: kind }),
            None => {
                check_len("exchange name", name)?;
                if self.exchanges.len() >= MAX_ENTRIES {
                    return Err(RouteError::TooMany { what: "exchanges", limit: MAX_ENTRIES });
                }
                self.exchanges.insert(name.into(), kind);
                Ok(true)
            }
        }
    }

    /// Binds a queue (again is fine); true when the binding is new.
    pub fn bind(&mut self, b: Binding) -> Result<bool, RouteError> {
        if !self.exchanges.contains_key(&b.exchange) {
            return Err(RouteError::UnknownExchange(b.exchange));
        }
        check_len("binding key", &b.routing_key)?;
        check_len("queue name", &b.queue)?;
        if self.bindings.contains(&b) {
            return Ok(false);
        }
        if self.bindings.len() >= MAX_ENTRIES {
            return Err(RouteError::TooMany { what: "bindings", limit: MAX_ENTRIES });
        }
        self.bindings.push(b);
        Ok(true)
    }

    /// The queues a message goes to; the default exchange `""` routes by queue name.
    pub fn route(
        &self,
        exchange: &str,
        routing_key: &str,
        headers: &Map<String, Value>,
    ) -> Result<Vec<String>, RouteError> {
        if exchange.is_empty() {
            return Ok(vec![routing_key.to_owned()]);
        }
        check_len("routing key", routing_key)?;
        let kind = *self.exchanges.get(exchange).ok_or_else(|| RouteError::UnknownExchange(exchange.into()))?;
        let mut out: Vec<String> = Vec::new();
        for b in self.bindings.iter().filter(|b| b.exchange == exchange) {
            let hit = match kind {
                ExchangeKind::Direct => b.routing_key == routing_key,
                ExchangeKind::Topic => topic_matches(&b.routing_key, routing_key),
                ExchangeKind::Fanout => true,
                ExchangeKind::Headers => {
                    let mut wanted = b.headers.iter().filter(|(k, _)| !k.starts_with("x-"));
                    if b.match_all {
                        wanted.all(|(k, v)| headers.get(k) == Some(v))
                    } else {
                        wanted.any(|(k, v)| headers.get(k) == Some(v))
                    }
                }
            };
            if hit && !out.contains(&b.queue) {
                out.push(b.queue.clone());
            }
        }
        Ok(out)
    }
}

/// True when `key` matches the topic `pattern` (`*` is one word, `#` zero or more).
///
/// Time is `O(words(pattern) x words(key))` and memory `O(words(key))` whatever the pattern, so no
/// pattern (`#.#.#...` against a long key) can stall a broker: one pass over the pattern's words keeps
/// the set of key prefixes matched so far.
pub fn topic_matches(pattern: &str, key: &str) -> bool {
    let key: Vec<&str> = key.split('.').collect();
    // matched[j]: the pattern's words so far match the key's first j words.
    let mut matched = vec![false; key.len() + 1];
    matched[0] = true;
    let mut words = pattern.split('.').peekable();
    while let Some(word) = words.next() {
        // `#.#` matches what `#` does: a run of them costs one pass.
        if word == "#" {
            while words.next_if_eq(&"#").is_some() {}
        }
        match word {
            "#" => {
                let mut any = false;
                for m in matched.iter_mut() {
                    any |= *m;
                    *m = any;
                }
            }
            _ => {
                for j in (1..=key.len()).rev() {
                    matched[j] = matched[j - 1] && (word == "*" || word == key[j - 1]);
                }
                matched[0] = false;
            }
        }
        if !matched.contains(&true) {
            return false;
        }
    }
    matched[key.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The plain recursive definition, to check the matcher against (exponential: small inputs only).
    fn reference(p: &[&str], k: &[&str]) -> bool {
        match p.split_first() {
            None => k.is_empty(),
            Some((&"#", rest)) => (0..=k.len()).any(|i| reference(rest, &k[i..])),
            Some((&"*", rest)) => !k.is_empty() && reference(rest, &k[1..]),
            Some((w, rest)) => k.first() == Some(w) && reference(rest, &k[1..]),
        }
    }

    proptest::proptest! {
        #[test]
        fn matches_the_recursive_definition(
            p in proptest::collection::vec(proptest::prop_oneof!["#", "\\*", "a", "b", ""], 0..7),
            k in proptest::collection::vec(proptest::prop_oneof!["a", "b", "c", ""], 0..7),
        ) {
            let (pattern, key) = (p.join("."), k.join("."));
            let expected = reference(&pattern.split('.').collect::<Vec<_>>(), &key.split('.').collect::<Vec<_>>());
            proptest::prop_assert_eq!(topic_matches(&pattern, &key), expected, "{} vs {}", pattern, key);
        }
    }

    #[test]
    fn adversarial_patterns_answer_at_once() {
        // Exponential for a backtracking matcher: 40 `#` words against 200 words that never match.
        let pattern = format!("{}.z", vec!["#"; 40].join("."));
        let key = vec!["a"; 200].join(".");
        let started = std::time::Instant::now();
        for _ in 0..100 {
            assert!(!topic_matches(&pattern, &key));
            assert!(topic_matches(&pattern, &format!("{key}.z")));
        }
        let mixed = vec!["#.*"; 60].join(".");
        assert!(topic_matches(&mixed, &vec!["a"; 60].join(".")));
        assert!(!topic_matches(&mixed, &vec!["a"; 59].join(".")));
        // A correctness check more than a timing one: generous enough for any machine.
        assert!(started.elapsed() < std::time::Duration::from_secs(2), "{:?}", started.elapsed());
    }

    #[test]
    fn exchange_kinds_route_like_rabbitmq() {
        let mut t = RoutingTable::default();
        t.declare("fan", ExchangeKind::Fanout).unwrap();
        t.bind(Binding::new("fan", "a", "")).unwrap();
        t.bind(Binding::new("fan", "b", "ignored")).unwrap();
        assert_eq!(t.route("fan", "anything", &Map::new()).unwrap(), ["a", "b"]);
        t.declare("direct", ExchangeKind::Direct).unwrap();
        t.bind(Binding::new("direct", "errors", "error")).unwrap();
        assert_eq!(t.route("direct", "error", &Map::new()).unwrap(), ["errors"]);
        assert!(t.route("direct", "info", &Map::new()).unwrap().is_empty());
        t.declare("h", ExchangeKind::Headers).unwrap();
        let want: Map<String, Value> = serde_json::from_str(r#"{"format": "pdf", "type": "report"}"#).unwrap();
        t.bind(Binding::headers("h", "all", want.clone(), true)).unwrap();
        t.bind(Binding::headers("h", "any", want, false)).unwrap();
        let msg: Map<String, Value> = serde_json::from_str(r#"{"format": "pdf"}"#).unwrap();
        assert_eq!(t.route("h", "", &msg).unwrap(), ["any"]);
        assert!(matches!(t.declare("h", ExchangeKind::Topic), Err(RouteError::KindMismatch { .. })));
        assert!(matches!(t.route("nope", "", &Map::new()), Err(RouteError::UnknownExchange(_))));
    }

    #[test]
    fn rabbitmq_tutorial_cases() {
        assert!(topic_matches("*.orange.*", "quick.orange.rabbit"));
        assert!(topic_matches("*.*.rabbit", "lazy.orange.rabbit"));
        assert!(topic_matches("lazy.#", "lazy.brown.fox"));
        assert!(!topic_matches("*.orange.*", "quick.orange.male.rabbit"));
        assert!(topic_matches("lazy.#", "lazy.orange.male.rabbit"));
        assert!(topic_matches("#", ""));
        assert!(topic_matches("#.a", "a"));
        assert!(!topic_matches("a.*", "a"));
    }
}

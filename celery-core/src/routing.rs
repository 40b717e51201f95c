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
        if self.bindings.contains(&b) {
            return Ok(false);
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

/// True when `key` matches the topic `pattern`.
pub fn topic_matches(pattern: &str, key: &str) -> bool {
    let p: Vec<&str> = pattern.split('.').collect();
    let k: Vec<&str> = key.split('.').collect();
    matches_words(&p, &k)
}

fn matches_words(p: &[&str], k: &[&str]) -> bool {
    match p.split_first() {
        None => k.is_empty(),
        Some((&"#", rest)) => (0..=k.len()).any(|i| matches_words(rest, &k[i..])),
        Some((&"*", rest)) => !k.is_empty() && matches_words(rest, &k[1..]),
        Some((w, rest)) => k.first() == Some(w) && matches_words(rest, &k[1..]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

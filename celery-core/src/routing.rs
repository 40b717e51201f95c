//! Routing vocabulary shared by every broker that has to emulate it: exchange kinds and the topic
//! matcher (`*` matches exactly one dot-separated word, `#` zero or more).
//!
//! ```
//! use celery_core::routing::topic_matches;
//! assert!(topic_matches("*.error", "kern.error"));
//! assert!(topic_matches("kern.#", "kern"));
//! assert!(!topic_matches("*.error", "kern.disk.error"));
//! ```

/// The kind of an exchange.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
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

/// Where a message goes: exchange (empty = default, by queue name) and routing key.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Route {
    /// The exchange; `""` routes by queue name.
    pub exchange: String,
    /// The routing key (the queue name on the default exchange).
    pub routing_key: String,
}

impl Route {
    /// The default exchange to `queue`.
    pub fn queue(queue: impl Into<String>) -> Route {
        Route { exchange: String::new(), routing_key: queue.into() }
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

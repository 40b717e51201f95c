//! Flow control across the whole cluster: per-key concurrency slots and cluster-wide rate limits,
//! held by the broker.
//!
//! Cluster-wide rate limits (`#[task(rate_limit = "100/s", rate_scope = "cluster")]`, or `control
//! rate-limit TASK RATE --cluster`): one bucket per task shared by every worker ([`RateBuckets`]).
//! A worker reserves the task's next start time from the broker and waits until then (holding
//! its worker slot, as Celery's per-worker limit does); starts over the whole cluster are spaced
//! by the limit's interval.
//!
//! A task sent with a concurrency key ([`Signature::concurrency_key`](crate::Signature::concurrency_key),
//! the [`CONCURRENCY_KEY`] header, which Python workers ignore) and whose task declares a limit
//! (`#[task(key_concurrency = 2)]`) runs only while it holds one of its key's slots: at most
//! `limit` tasks of one key run at once over every worker and process.
//!
//! The broker holds the slots ([`KeySlots`]); the worker asks for one right before running a
//! task ([`KeySlots::acquire_or_park`]). When all are held, the broker parks the message in the
//! key's waiting list durably, in the same atomic step, and the worker acks the delivery: the
//! waiting task holds neither a worker slot nor a prefetch slot, and nothing polls for it.
//! Releasing a slot ([`KeySlots::release`]) moves the oldest parked message of the key back to
//! its queue. Slots are leases: the worker renews them while the task runs
//! ([`KeySlots::renew`]); a dead worker's slots expire after the lease, and the broker's sweep
//! ([`KeySlots::sweep`]) then moves parked messages for the slots it freed.
//!
//! Fair queues: a task sent with a fairness key ([`Signature::fairness_key`](crate::Signature::fairness_key),
//! the [`FAIRNESS_KEY`] header, which Python workers ignore) waits in its key's line of its queue,
//! and the broker serves the keys of a queue with work in turn (weighted round robin: up to a key's
//! [`FairnessWeights::weight`] deliveries before the next key; unkeyed messages are one more key),
//! so a key with a huge backlog gets its share and no more while others wait ([`FairQueues`]).
//!
//! Invariant the brokers keep: a key with parked messages has a slot held (or a moved message on
//! its way back), so a parked message always has someone to release it; the sweep also moves one
//! message of a key that has parked messages and no slot held at all.
//!
//! ```
//! use celery_core::flow::{validate_key, CONCURRENCY_KEY};
//! let sig = celery_core::Signature::by_name("span").concurrency_key("tenant-42");
//! assert_eq!(sig.options.headers[CONCURRENCY_KEY], "tenant-42");
//! assert!(validate_key("tenant-42").is_ok());
//! assert!(validate_key("").is_err());
//! ```

use std::time::Duration;

use async_trait::async_trait;

use crate::error::BrokerError;
use crate::protocol::Message;

/// The header that carries a task's concurrency key.
pub const CONCURRENCY_KEY: &str = "x-concurrency-key";
/// The header that carries a task's fairness key.
pub const FAIRNESS_KEY: &str = "x-fairness-key";
/// The highest fairness weight.
pub const MAX_FAIRNESS_WEIGHT: u32 = 1_000;
/// The most fairness weights one configuration names.
pub const MAX_FAIRNESS_WEIGHTS: usize = 1_000;
/// The most fairness keys a broker tracks in one queue (the built-in broker: per partition) at
/// once; the messages of further keys share one more line until some of the tracked ones drain.
pub const MAX_FAIRNESS_KEYS: usize = 100_000;
/// The longest concurrency key, in bytes.
pub const MAX_KEY_LEN: usize = 128;
/// The highest per-key limit.
pub const MAX_KEY_LIMIT: u32 = 10_000;
/// The most keys a broker tracks at once (with slots held or messages parked); beyond it,
/// acquiring a slot of a new key fails with an error naming the limit.
pub const MAX_TRACKED_KEYS: usize = 100_000;
/// The most messages a broker that holds parked messages in memory (the built-in broker's owner)
/// keeps parked at once; beyond it, parking fails with an error and the worker puts the task back
/// in its queue for a while (see the worker), where it waits on disk.
pub const MAX_PARKED: usize = 100_000;
/// The shortest slot lease.
pub const MIN_KEY_LEASE: Duration = Duration::from_millis(500);

/// Why a concurrency key or limit is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// Empty, too long, or with a control character.
    #[error("invalid concurrency key {key:?}: {reason}")]
    Invalid {
        /// The key (cut to [`MAX_KEY_LEN`] bytes).
        key: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A limit of 0 or above [`MAX_KEY_LIMIT`].
    #[error("key concurrency limit {0} is out of range (1 to {MAX_KEY_LIMIT})")]
    Limit(u32),
    /// A fairness weight of 0 or above [`MAX_FAIRNESS_WEIGHT`].
    #[error("fairness weight {0} is out of range (1 to {MAX_FAIRNESS_WEIGHT})")]
    Weight(u32),
    /// More than [`MAX_FAIRNESS_WEIGHTS`] weights.
    #[error("{0} fairness weights (at most {MAX_FAIRNESS_WEIGHTS})")]
    TooManyWeights(usize),
}

impl From<KeyError> for BrokerError {
    fn from(e: KeyError) -> Self {
        BrokerError::operation_with("concurrency key", e)
    }
}

/// Checks a concurrency key: 1 to [`MAX_KEY_LEN`] bytes, no control characters (keys become
/// parts of broker key names).
pub fn validate_key(key: &str) -> Result<(), KeyError> {
    let invalid = |reason| {
        let mut cut = key.len().min(MAX_KEY_LEN);
        while !key.is_char_boundary(cut) {
            cut -= 1;
        }
        KeyError::Invalid { key: key[..cut].to_owned(), reason }
    };
    if key.is_empty() {
        return Err(invalid("empty"));
    }
    if key.len() > MAX_KEY_LEN {
        return Err(invalid("longer than 128 bytes"));
    }
    if key.chars().any(char::is_control) {
        return Err(invalid("contains a control character"));
    }
    Ok(())
}

/// Checks a per-key limit: 1 to [`MAX_KEY_LIMIT`].
pub fn validate_limit(limit: u32) -> Result<u32, KeyError> {
    if (1..=MAX_KEY_LIMIT).contains(&limit) {
        Ok(limit)
    } else {
        Err(KeyError::Limit(limit))
    }
}

/// A per-key-pattern limit from the worker's configuration (`worker --key-limit 'tenant-*=3'`):
/// tasks sent with a concurrency key that matches `pattern` (`*` matches any run of characters)
/// are limited to `limit` at once, whatever their task declares.
///
/// ```
/// use celery_core::flow::KeyLimit;
/// let l: KeyLimit = "tenant-*=3".parse().unwrap();
/// assert!(l.matches("tenant-42") && !l.matches("other"));
/// assert_eq!(l.limit, 3);
/// assert!("tenant-*=0".parse::<KeyLimit>().is_err());
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyLimit {
    /// The key pattern (`*`: any run of characters).
    pub pattern: String,
    /// At most this many tasks of one matching key at once.
    pub limit: u32,
}

impl KeyLimit {
    /// Whether `key` matches the pattern.
    pub fn matches(&self, key: &str) -> bool {
        glob(self.pattern.as_bytes(), key.as_bytes())
    }
}

impl std::str::FromStr for KeyLimit {
    type Err = KeyError;

    fn from_str(s: &str) -> Result<KeyLimit, KeyError> {
        let bad = |reason| KeyError::Invalid { key: s.chars().take(MAX_KEY_LEN).collect(), reason };
        let (pattern, n) = s.rsplit_once('=').ok_or_else(|| bad("expected PATTERN=LIMIT"))?;
        validate_key(pattern)?;
        let limit = n.trim().parse::<u32>().map_err(|_| bad("the limit is not a number"))?;
        Ok(KeyLimit { pattern: pattern.to_owned(), limit: validate_limit(limit)? })
    }
}

/// `*`-only glob matching, iterative (no backtracking blow-up).
fn glob(p: &[u8], s: &[u8]) -> bool {
    let (mut pi, mut si) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while si < s.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, si));
            pi += 1;
        } else if pi < p.len() && p[pi] == s[si] {
            pi += 1;
            si += 1;
        } else if let Some((sp, ss)) = star {
            pi = sp + 1;
            si = ss + 1;
            star = Some((sp, ss + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == b'*')
}

/// The limit of `key`: the first of `patterns` that matches it, else the task's own.
pub fn limit_for(key: &str, patterns: &[KeyLimit], task_limit: Option<u32>) -> Option<u32> {
    patterns.iter().find(|l| l.matches(key)).map(|l| l.limit).or(task_limit)
}

/// One slot asked for: the key, its limit, who holds it and for how long.
#[derive(Debug, Clone, Copy)]
pub struct SlotRequest<'a> {
    /// The concurrency key.
    pub key: &'a str,
    /// At most this many slots of the key are held at once.
    pub limit: u32,
    /// The holder (unique per run: the worker's name and the task id).
    pub holder: &'a str,
    /// The lease: the slot is freed if not renewed within it.
    pub ttl: Duration,
}

impl SlotRequest<'_> {
    /// Checks the key and the limit.
    pub fn validate(&self) -> Result<(), KeyError> {
        validate_key(self.key)?;
        validate_limit(self.limit).map(|_| ())
    }
}

/// One slot given back ([`KeySlots::release_many`]): its key, its holder and the queue its task
/// came from.
#[derive(Debug, Clone, Copy)]
pub struct SlotRelease<'a> {
    /// The concurrency key.
    pub key: &'a str,
    /// The holder that took the slot.
    pub holder: &'a str,
    /// The queue the holder's task came from.
    pub queue: &'a str,
}

/// The most requests a worker sends in one [`KeySlots::acquire_many`] or
/// [`KeySlots::release_many`] call.
pub const MAX_SLOT_BATCH: usize = 256;

/// What [`KeySlots::acquire_or_park`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// The slot is held: run the task, renew the slot meanwhile, release it after.
    Acquired,
    /// Every slot was held: the message is parked durably; ack the delivery (it comes back to its
    /// queue when a slot frees).
    Parked,
}

/// Per-key concurrency slots held by the broker (see the [module](self) documentation).
///
/// ```no_run
/// # async fn demo(broker: std::sync::Arc<dyn celery_core::Broker>, msg: celery_core::protocol::Message) -> Result<(), celery_core::BrokerError> {
/// use celery_core::flow::{Admission, SlotRequest};
/// let slots = broker.require_key_slots("key_concurrency")?;
/// let req = SlotRequest { key: "tenant-42", limit: 2, holder: "w1/task-1", ttl: std::time::Duration::from_secs(30) };
/// if slots.acquire_or_park(&req, "celery", &msg).await? == Admission::Acquired {
///     // ... run the task, renewing the slot ...
///     slots.release("tenant-42", "w1/task-1", "celery").await?;
/// }
/// # Ok(()) }
/// ```
#[async_trait]
pub trait KeySlots: Send + Sync {
    /// Takes a slot of `req.key` for `req.holder`, or, when `req.limit` are held, parks `msg`
    /// (bound for `queue`) in the key's waiting list, durably and in the same atomic step. A
    /// holder that holds a slot already keeps it (renewed). On a broker that
    /// [batches](KeySlots::batches), callers try [`KeySlots::acquire_many`] first, so this goes
    /// straight to the atomic take-or-park with the message.
    async fn acquire_or_park(
        &self,
        req: &SlotRequest<'_>,
        queue: &str,
        msg: &Message,
    ) -> Result<Admission, BrokerError>;

    /// Renews `holder`'s slot of `key` for `ttl`; false when it lost it (it expired).
    async fn renew(&self, key: &str, holder: &str, ttl: Duration) -> Result<bool, BrokerError>;

    /// Frees `holder`'s slot of `key` and moves the oldest parked message of the key back to its
    /// queue (`queue`: the queue the holder's task came from, which the broker may use to find it).
    async fn release(&self, key: &str, holder: &str, queue: &str) -> Result<(), BrokerError>;

    /// Whether [`acquire_many`](KeySlots::acquire_many) and
    /// [`release_many`](KeySlots::release_many) answer a batch in one round trip. A worker then
    /// queues the takes and releases asked for while one call is in flight and sends them
    /// together in the next (group commit: no wait when nothing is in flight). False by default:
    /// a broker in this process answers each call at once.
    fn batches(&self) -> bool {
        false
    }

    /// Takes a slot for each request whose key has one free, parking nothing: `true` where the
    /// slot is held (renewed if it was already), `false` where it was not taken (the key was
    /// full, or the broker could not take it here: the caller then calls
    /// [`acquire_or_park`](KeySlots::acquire_or_park) with the message, which checks again and
    /// parks atomically). The default takes none: every request goes through `acquire_or_park`.
    async fn acquire_many(&self, reqs: &[SlotRequest<'_>]) -> Result<Vec<bool>, BrokerError> {
        Ok(vec![false; reqs.len()])
    }

    /// Gives back each slot as [`release`](KeySlots::release) does. The default releases them
    /// one by one, stopping at the first error.
    async fn release_many(&self, slots: &[SlotRelease<'_>]) -> Result<(), BrokerError> {
        for s in slots {
            self.release(s.key, s.holder, s.queue).await?;
        }
        Ok(())
    }

    /// Frees expired slots (their holders died) and moves a parked message back for each, and one
    /// for a key with parked messages and no slot held. Workers call it every third of their
    /// lease; a broker whose owner sweeps by itself does nothing here. Returns the messages moved.
    async fn sweep(&self) -> Result<u64, BrokerError> {
        Ok(0)
    }
}

/// One key's weight in its queues' rotation (`worker --fairness-weight tenant-a=3`): the key gets
/// up to `weight` deliveries in a row when its turn comes (every other key: 1).
///
/// ```
/// use celery_core::flow::FairnessWeight;
/// let w: FairnessWeight = "tenant-a=3".parse().unwrap();
/// assert_eq!((w.key.as_str(), w.weight), ("tenant-a", 3));
/// assert!("tenant-a=0".parse::<FairnessWeight>().is_err());
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FairnessWeight {
    /// The fairness key (exact).
    pub key: String,
    /// Deliveries in a row when its turn comes (1 to [`MAX_FAIRNESS_WEIGHT`]).
    pub weight: u32,
}

impl std::str::FromStr for FairnessWeight {
    type Err = KeyError;

    fn from_str(s: &str) -> Result<FairnessWeight, KeyError> {
        let bad = |reason| KeyError::Invalid { key: s.chars().take(MAX_KEY_LEN).collect(), reason };
        let (key, n) = s.rsplit_once('=').ok_or_else(|| bad("expected KEY=WEIGHT"))?;
        validate_key(key)?;
        let weight = n.trim().parse::<u32>().map_err(|_| bad("the weight is not a number"))?;
        if !(1..=MAX_FAIRNESS_WEIGHT).contains(&weight) {
            return Err(KeyError::Weight(weight));
        }
        Ok(FairnessWeight { key: key.to_owned(), weight })
    }
}

/// The weights of fairness keys (every key not named: 1), at most [`MAX_FAIRNESS_WEIGHTS`].
///
/// ```
/// use celery_core::flow::FairnessWeights;
/// let w = FairnessWeights::new(vec!["tenant-a=3".parse().unwrap()]).unwrap();
/// assert_eq!((w.weight("tenant-a"), w.weight("tenant-b")), (3, 1));
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FairnessWeights {
    weights: std::collections::HashMap<String, u32>,
}

impl FairnessWeights {
    /// The weights given (a key named twice: the last wins).
    pub fn new(list: Vec<FairnessWeight>) -> Result<FairnessWeights, KeyError> {
        if list.len() > MAX_FAIRNESS_WEIGHTS {
            return Err(KeyError::TooManyWeights(list.len()));
        }
        Ok(FairnessWeights { weights: list.into_iter().map(|w| (w.key, w.weight)).collect() })
    }

    /// The weight of `key` (1 when not named).
    pub fn weight(&self, key: &str) -> u32 {
        self.weights.get(key).copied().unwrap_or(1)
    }

    /// The named keys and their weights.
    pub fn iter(&self) -> impl Iterator<Item = (&str, u32)> {
        self.weights.iter().map(|(k, w)| (k.as_str(), *w))
    }

    /// True when no key is named (every weight is 1).
    pub fn is_empty(&self) -> bool {
        self.weights.is_empty()
    }
}

/// Fair queues: the broker serves the fairness keys of a queue in turn (see the
/// [module](self) documentation). Sending a task with a fairness key through a broker without
/// them fails ([`BrokerError::Unsupported`]) rather than queueing it unfairly.
///
/// ```
/// fn before_consuming(broker: &dyn celery_core::Broker) {
///     let weights = celery_core::flow::FairnessWeights::new(vec!["tenant-a=3".parse().unwrap()]).unwrap();
///     match broker.fair_queues() {
///         Some(fair) => fair.set_fairness_weights(weights),
///         None => eprintln!("{} has no fair queues", broker.kind()),
///     }
/// }
/// ```
pub trait FairQueues: Send + Sync {
    /// The weights the consumers this broker handle starts from now on apply when they take.
    fn set_fairness_weights(&self, weights: FairnessWeights);
}

/// The longest bucket name (task names), in bytes.
pub const MAX_BUCKET_NAME: usize = 255;
/// The longest interval between starts a bucket takes (one an hour).
pub const MAX_RATE_INTERVAL: Duration = Duration::from_secs(3600);

/// Checks a rate bucket's name and interval.
pub fn validate_bucket(name: &str, interval: Duration) -> Result<(), KeyError> {
    if name.is_empty() || name.len() > MAX_BUCKET_NAME || name.chars().any(char::is_control) {
        return Err(KeyError::Invalid { key: name.chars().take(64).collect(), reason: "not a task name" });
    }
    if interval.is_zero() || interval > MAX_RATE_INTERVAL {
        return Err(KeyError::Invalid { key: name.chars().take(64).collect(), reason: "rate interval out of range" });
    }
    Ok(())
}

/// Cluster-wide rate limits: one reservation schedule per bucket (a task name), held by the broker.
///
/// ```no_run
/// # async fn demo(broker: std::sync::Arc<dyn celery_core::Broker>) -> Result<(), celery_core::BrokerError> {
/// let buckets = broker.require_rate_buckets("rate_scope = \"cluster\"")?;
/// // 20 starts a second over every worker:
/// let wait = buckets.reserve("span", std::time::Duration::from_millis(50)).await?;
/// tokio::time::sleep(wait).await;
/// # Ok(()) }
/// ```
#[async_trait]
pub trait RateBuckets: Send + Sync {
    /// Reserves the next start of bucket `name`, spaced `interval` after the one reserved before
    /// it (or now, when that is past): how long the caller waits before starting. Atomic across
    /// every worker.
    async fn reserve(&self, name: &str, interval: Duration) -> Result<Duration, BrokerError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_match_and_win_over_the_task() {
        let l = |s: &str| s.parse::<KeyLimit>().unwrap();
        assert!(l("a*b*c=1").matches("aXXbYc") && !l("a*b*c=1").matches("aXXbY"));
        assert!(l("*=1").matches("anything") && l("exact=1").matches("exact") && !l("exact=1").matches("exact2"));
        let pats = [l("tenant-*=3"), l("*=7")];
        assert_eq!(limit_for("tenant-1", &pats, Some(2)), Some(3));
        assert_eq!(limit_for("x", &pats, Some(2)), Some(7));
        assert_eq!(limit_for("x", &[], Some(2)), Some(2));
        assert_eq!(limit_for("x", &[], None), None);
        assert!("noequals".parse::<KeyLimit>().is_err());
        assert!("=3".parse::<KeyLimit>().is_err());
    }

    #[test]
    fn fairness_weights_parse_and_are_bounded() {
        let w = |s: &str| s.parse::<FairnessWeight>();
        assert_eq!(w("a=1000").unwrap().weight, 1000);
        assert_eq!(w("a=1001"), Err(KeyError::Weight(1001)));
        assert!(w("a").is_err() && w("=2").is_err() && w("a=x").is_err());
        let many = (0..=MAX_FAIRNESS_WEIGHTS).map(|i| w(&format!("k{i}=2")).unwrap()).collect();
        assert_eq!(FairnessWeights::new(many), Err(KeyError::TooManyWeights(MAX_FAIRNESS_WEIGHTS + 1)));
        let ws = FairnessWeights::new(vec![w("a=3").unwrap(), w("a=5").unwrap()]).unwrap();
        assert_eq!((ws.weight("a"), ws.weight("b")), (5, 1));
    }

    #[test]
    fn keys_and_limits_are_bounded() {
        assert!(validate_key("tenant-42").is_ok());
        assert!(validate_key(&"k".repeat(128)).is_ok());
        assert!(matches!(validate_key(&"k".repeat(129)), Err(KeyError::Invalid { .. })));
        assert!(validate_key("a\nb").is_err());
        assert!(validate_key("").is_err());
        // A cut inside a multi-byte character stays valid UTF-8.
        assert!(validate_key(&"é".repeat(100)).is_err());
        assert_eq!(validate_limit(0), Err(KeyError::Limit(0)));
        assert_eq!(validate_limit(MAX_KEY_LIMIT + 1), Err(KeyError::Limit(MAX_KEY_LIMIT + 1)));
        assert_eq!(validate_limit(2), Ok(2));
    }
}

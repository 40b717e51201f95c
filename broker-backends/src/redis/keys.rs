//! Key names, behind the optional `global_keyprefix` (see [`super::scripts`] for what each key
//! holds): the priority buckets of a queue, the lease hash and its index, the binding sets of
//! exchanges, the fanout channels, and ours (`_celery_rs.*`): delayed messages, leases,
//! documents, and our consumers' heartbeats with what each holds.
//!
//! On one server (and behind Sentinel) this is Kombu's layout, byte for byte: `<queue>`,
//! `<queue>\x06\x16<3|6|9>`, the global `unacked` and `unacked_index`, `_celery_rs.delayed.<queue>`,
//! `_celery_rs.worker.<holder>`, `_celery_rs.held.<holder>`, `_celery_rs.workers`; fair queues add
//! `_celery_rs.fair.<queue>.ring` (`.keys`, `.credit`) and a line per fairness key,
//! `_celery_rs.fair.<queue>\x06\x16<key>` (`\x06\x16<3|6|9>` for priorities), see `scripts::FAIR_FN`.
//!
//! On a Redis Cluster every key a Lua step touches must be in one slot, so every key of one queue
//! carries one hash tag, and the lease keys Kombu keeps global exist once per tag (a [`Scope`]).
//! The tag of queue `q` is `q` (with `shards=N`: `q:0` .. `q:N-1`, one per shard); its dead-letter
//! queues (`q.dead`, `q.dead.dead`) share it, so a fetch can dead-letter in the same step:
//!
//! | key | one server | cluster (`shards=N`: tag `q:i`) |
//! |---|---|---|
//! | bucket of `q`, priority step 3 | `q\x06\x163` | `{q}\x06\x163` |
//! | bucket of `q.dead` | `q.dead` | `{q}.dead` |
//! | delayed set of `q` | `_celery_rs.delayed.q` | `{q}._celery_rs.delayed` |
//! | leases | `unacked`, `unacked_index` | `{q}.unacked`, `{q}.unacked_index` |
//! | heartbeat of holder `h` | `_celery_rs.worker.h` | `{q}._celery_rs.worker.h` |
//! | what `h` holds | `_celery_rs.held.h` | `{q}._celery_rs.held.h` |
//! | holders | `_celery_rs.workers` | `{q}._celery_rs.workers` |
//! | wake-up channel of `q` | `_celery_rs.wake/<db>/q` | `{q}._celery_rs.wake` |
//!
//! On a cluster a holder also has one heartbeat, registry entry and list of scopes in the slot of
//! the tag `_celery_rs.holders` ([`Keys::holders`]): `{_celery_rs.holders}._celery_rs.worker.h`,
//! `{_celery_rs.holders}._celery_rs.workers` and `{_celery_rs.holders}._celery_rs.scopes.h` (the
//! queue shards `h` consumes, as JSON). Its idle cost is spent there, once per holder, whatever
//! the number of queues; the heartbeat in a queue's scope is kept only while it holds deliveries
//! there ([`super::holder`]). No queue may be named `_celery_rs.holders` on a cluster.
//!
//! A wake-up channel is a `PUBLISH` channel, not a key: our producers publish to it in the same
//! pipeline as the `LPUSH`, and idle consumers subscribe to the channels of their queues
//! ([`super::wake`]); `_celery_rs.wake/<db>` (one server) wakes every consumer of the database.
//! Pub/sub ignores databases, so the database is in the name.
//!
//! Bindings, leases of beat, documents, fanout channels and the next-due index of delayed
//! messages (`_celery_rs.due`: a zset of `<shard>/<queue>` scored by its earliest due time in ms)
//! are single keys (or `PUBLISH`): the same on both. Queue names on a cluster may not hold `{` or
//! `}` nor be empty ([`Keys::check_queue`]).

use celery_core::BrokerError;

/// Kombu's separator between a queue name and its priority bucket.
pub(crate) const SEP: &str = "\x06\x16";
/// Kombu's priority steps, consumed in this order.
pub(crate) const STEPS: [u8; 4] = [0, 3, 6, 9];
/// The suffix of a dead-letter queue's name ([`celery_core::broker::dead_letter_queue`]).
const DEAD: &str = ".dead";

/// Key names, with the prefix applied.
#[derive(Debug, Clone)]
pub(crate) struct Keys {
    prefix: String,
    /// `Some(shards)` on a Redis Cluster.
    cluster: Option<u16>,
    /// The database number (in wake-up channel names: pub/sub ignores databases).
    db: u32,
}

/// The lease keys shared by the queues of one slot: Kombu's global `unacked` set on one server,
/// one queue's (shard's) own on a cluster.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct Scope {
    /// What every key of the scope starts with.
    base: String,
}

impl Scope {
    pub(crate) fn unacked(&self) -> String {
        format!("{}unacked", self.base)
    }
    pub(crate) fn unacked_index(&self) -> String {
        format!("{}unacked_index", self.base)
    }
    /// A holder's heartbeat (`SET PX grace`, renewed by the holder).
    pub(crate) fn heartbeat(&self, holder: &str) -> String {
        format!("{}_celery_rs.worker.{holder}", self.base)
    }
    /// The tags a holder has in `unacked`.
    pub(crate) fn held(&self, holder: &str) -> String {
        format!("{}_celery_rs.held.{holder}", self.base)
    }
    /// The holders that may hold deliveries (whose heartbeats the sweep checks).
    pub(crate) fn workers(&self) -> String {
        format!("{}_celery_rs.workers", self.base)
    }
    /// In [`Keys::holders`] on a cluster: the scopes a holder consumes (a set of JSON lists of
    /// `[queue, shard]` pairs), where its deliveries may be.
    pub(crate) fn scopes(&self, holder: &str) -> String {
        format!("{}_celery_rs.scopes.{holder}", self.base)
    }
}

/// The hash tag of the holders' own keys on a cluster ([`Keys::holders`]).
const HOLDERS_TAG: &str = "_celery_rs.holders";

impl Keys {
    /// Keys behind `prefix` (Kombu's `global_keyprefix`; empty for none), for one server
    /// (`cluster: None`) or a cluster with `Some(shards)` per queue.
    pub(crate) fn new(prefix: &str, cluster: Option<u16>) -> Keys {
        Keys { prefix: prefix.to_owned(), cluster: cluster.map(|s| s.max(1)), db: 0 }
    }

    /// The same keys in database `db` (what wake-up channel names carry).
    pub(crate) fn in_db(mut self, db: u32) -> Keys {
        self.db = db;
        self
    }

    pub(crate) fn prefix(&self) -> &str {
        &self.prefix
    }

    /// True on a Redis Cluster.
    pub(crate) fn is_cluster(&self) -> bool {
        self.cluster.is_some()
    }

    /// The shards of each queue: 1 but on a cluster with `shards=N`.
    pub(crate) fn shards(&self) -> u16 {
        self.cluster.unwrap_or(1)
    }

    /// On a cluster, a queue name must give a hash tag of its own: not empty, no `{` nor `}`.
    pub(crate) fn check_queue(&self, queue: &str) -> Result<(), BrokerError> {
        if self.is_cluster() && queue.trim_end_matches(DEAD) == HOLDERS_TAG {
            return Err(BrokerError::operation(format!(
                "queue name `{queue}`: on a Redis Cluster the hash tag `{HOLDERS_TAG}` is the workers' own"
            )));
        }
        if self.is_cluster() && (queue.is_empty() || queue.contains(['{', '}'])) {
            return Err(BrokerError::operation(format!(
                "queue name `{queue}`: on a Redis Cluster a queue name is not empty and holds no `{{` or `}}` (they make hash tags)"
            )));
        }
        Ok(())
    }

    /// On a cluster: `{tag}` and the rest of the name of `queue`'s shard (`.dead` suffixes).
    fn tagged(&self, queue: &str, shard: u16) -> (String, String) {
        let mut base = queue;
        while let Some(b) = base.strip_suffix(DEAD).filter(|b| !b.is_empty()) {
            base = b;
        }
        let rest = &queue[base.len()..];
        let tag = if self.shards() > 1 { format!("{base}:{shard}") } else { base.to_owned() };
        (format!("{}{{{tag}}}", self.prefix), rest.to_owned())
    }

    /// Priority bucket `step` of `queue`'s `shard` (0 on one server).
    pub(crate) fn bucket(&self, queue: &str, shard: u16, step: u8) -> String {
        let name = match self.cluster {
            None => format!("{}{queue}", self.prefix),
            Some(_) => {
                let (tag, rest) = self.tagged(queue, shard);
                format!("{tag}{rest}")
            }
        };
        if step == 0 {
            name
        } else {
            format!("{name}{SEP}{step}")
        }
    }

    /// The four priority buckets of `queue`'s `shard`, in the order they are taken from.
    pub(crate) fn buckets(&self, queue: &str, shard: u16) -> [String; 4] {
        STEPS.map(|s| self.bucket(queue, shard, s))
    }

    /// The lease keys `queue`'s `shard` uses.
    pub(crate) fn scope(&self, queue: &str, shard: u16) -> Scope {
        match self.cluster {
            None => Scope { base: self.prefix.clone() },
            Some(_) => Scope { base: format!("{}.", self.tagged(queue, shard).0) },
        }
    }

    /// Where holders keep their one heartbeat, registry and list of scopes: on a cluster the slot
    /// of the tag `_celery_rs.holders`; on one server Kombu's global scope (the one every queue
    /// uses).
    pub(crate) fn holders(&self) -> Scope {
        match self.cluster {
            None => Scope { base: self.prefix.clone() },
            Some(_) => Scope { base: format!("{}{{{HOLDERS_TAG}}}.", self.prefix) },
        }
    }

    /// The delayed (ETA) set of `queue`'s `shard`.
    pub(crate) fn delayed(&self, queue: &str, shard: u16) -> String {
        match self.cluster {
            None => format!("{}_celery_rs.delayed.{queue}", self.prefix),
            Some(_) => {
                let (tag, rest) = self.tagged(queue, shard);
                format!("{tag}{rest}._celery_rs.delayed")
            }
        }
    }

    /// The wake-up channel of `queue`'s `shard`: on a cluster in the queue's slot, so that a
    /// pipeline of one slot can `PUBLISH` to it after its `LPUSH`.
    pub(crate) fn wake(&self, queue: &str, shard: u16) -> String {
        match self.cluster {
            None => format!("{}_celery_rs.wake/{}/{queue}", self.prefix, self.db),
            Some(_) => {
                let (tag, rest) = self.tagged(queue, shard);
                format!("{tag}{rest}._celery_rs.wake")
            }
        }
    }

    /// The wake-up channel every consumer of this database listens to (one server): after a
    /// restore that may have put messages back into any queue.
    pub(crate) fn wake_all(&self) -> String {
        format!("{}_celery_rs.wake/{}", self.prefix, self.db)
    }

    /// The next-due index of delayed messages: a zset of [`Keys::due_member`]s scored by the
    /// earliest due time (ms) of their delayed set, or earlier.
    pub(crate) fn due(&self) -> String {
        format!("{}_celery_rs.due", self.prefix)
    }

    /// `queue`'s `shard` in the next-due index: `<shard>/<queue>`.
    pub(crate) fn due_member(queue: &str, shard: u16) -> String {
        format!("{shard}/{queue}")
    }

    /// The fair-queue ring of `queue` (one server only): the fairness keys with waiting messages,
    /// in turn; the scripts build it and the keys' lines alike (`scripts::FAIR_FN`).
    pub(crate) fn fair_ring(&self, queue: &str) -> String {
        format!("{}_celery_rs.fair.{queue}.ring", self.prefix)
    }

    /// Kombu's fanout channel of `exchange` for `routing_key`: `/<db>.<exchange>/<routing key>`,
    /// or `/<db>.<exchange>` without a routing key.
    pub(crate) fn fanout(&self, db: u32, exchange: &str, routing_key: &str) -> String {
        if routing_key.is_empty() {
            format!("{}/{db}.{exchange}", self.prefix)
        } else {
            format!("{}/{db}.{exchange}/{routing_key}", self.prefix)
        }
    }

    /// On a cluster, the key whose node every broadcast `PUBLISH` is sent through (no such key is
    /// written).
    pub(crate) fn broadcast_route(&self) -> String {
        format!("{}_celery_rs.broadcast", self.prefix)
    }

    /// A lease (`SET NX PX` with renewal by its holder).
    pub(crate) fn lease(&self, name: &str) -> String {
        format!("{}_celery_rs.lease.{name}", self.prefix)
    }

    /// A stored document.
    pub(crate) fn doc(&self, key: &str) -> String {
        format!("{}_celery_rs.doc.{key}", self.prefix)
    }
    pub(crate) fn binding(&self, exchange: &str) -> String {
        format!("{}_kombu.binding.{exchange}", self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Redis's hash slot of `key` (CRC16/XMODEM of the hash tag or the whole key, mod 16384).
    fn slot(key: &str) -> u16 {
        let k = key.as_bytes();
        let hashed = match k.iter().position(|&b| b == b'{') {
            Some(open) => match k[open + 1..].iter().position(|&b| b == b'}') {
                Some(0) | None => k,
                Some(len) => &k[open + 1..open + 1 + len],
            },
            None => k,
        };
        let mut crc: u16 = 0;
        for &b in hashed {
            crc ^= u16::from(b) << 8;
            for _ in 0..8 {
                crc = if crc & 0x8000 != 0 { (crc << 1) ^ 0x1021 } else { crc << 1 };
            }
        }
        crc % 16384
    }

    #[test]
    fn one_server_keeps_kombus_layout_byte_for_byte() {
        let k = Keys::new("p:", None);
        assert_eq!(k.buckets("celery", 0), ["p:celery", "p:celery\x06\x163", "p:celery\x06\x166", "p:celery\x06\x169"]);
        let s = k.scope("celery", 0);
        assert_eq!((s.unacked(), s.unacked_index()), ("p:unacked".to_owned(), "p:unacked_index".to_owned()));
        assert_eq!(s, k.scope("other", 0), "one global lease set");
        assert_eq!(s.heartbeat("w1"), "p:_celery_rs.worker.w1");
        assert_eq!(s.held("w1"), "p:_celery_rs.held.w1");
        assert_eq!(s.workers(), "p:_celery_rs.workers");
        assert_eq!(k.delayed("celery", 0), "p:_celery_rs.delayed.celery");
        assert_eq!(k.bucket("celery.dead", 0, 0), "p:celery.dead");
        assert!(k.check_queue("a{b}").is_ok() && k.shards() == 1);
        let k = k.in_db(3);
        assert_eq!(k.wake("celery", 0), "p:_celery_rs.wake/3/celery");
        assert_eq!(k.wake_all(), "p:_celery_rs.wake/3");
        assert_eq!(k.due(), "p:_celery_rs.due");
        assert_eq!(Keys::due_member("a/b", 2), "2/a/b");
        assert_eq!(k.fair_ring("celery"), "p:_celery_rs.fair.celery.ring");
    }

    #[test]
    fn on_a_cluster_every_key_of_a_queue_is_in_one_slot() {
        let k = Keys::new("p:", Some(1));
        let s = k.scope("celery", 0);
        let mut all: Vec<String> = k.buckets("celery", 0).to_vec();
        all.extend(k.buckets("celery.dead", 0));
        all.extend(k.buckets("celery.dead.dead", 0));
        all.extend([k.delayed("celery", 0), k.delayed("celery.dead", 0), k.wake("celery", 0)]);
        all.extend([s.unacked(), s.unacked_index(), s.heartbeat("w"), s.held("w"), s.workers()]);
        assert_eq!(all[0], "p:{celery}");
        assert_eq!(all[4], "p:{celery}.dead");
        assert_eq!(s.unacked(), "p:{celery}.unacked");
        assert_eq!(k.delayed("celery", 0), "p:{celery}._celery_rs.delayed");
        let distinct: std::collections::HashSet<&String> = all.iter().collect();
        assert_eq!(distinct.len(), all.len(), "no two keys collide: {all:?}");
        let first = slot(&all[0]);
        assert!(all.iter().all(|key| slot(key) == first), "{all:?}");
        assert_eq!(s, k.scope("celery.dead", 0), "a queue and its dead letters share one scope");
        assert_ne!(s, k.scope("other", 0));
        assert_eq!(slot("p:{celery}"), slot("celery"), "the tag alone is hashed");
    }

    #[test]
    fn shards_spread_a_queue_over_several_tags() {
        let k = Keys::new("", Some(4));
        assert_eq!(k.shards(), 4);
        let buckets: Vec<String> = (0..4).map(|i| k.bucket("q", i, 0)).collect();
        assert_eq!(buckets, ["{q:0}", "{q:1}", "{q:2}", "{q:3}"]);
        assert_eq!(k.bucket("q.dead", 2, 9), "{q:2}.dead\x06\x169");
        assert_eq!(k.scope("q", 3).unacked(), "{q:3}.unacked");
        let slots: std::collections::HashSet<u16> = buckets.iter().map(|b| slot(b)).collect();
        assert_eq!(slots.len(), 4, "four slots");
        for i in 0..4 {
            assert_eq!(slot(&k.delayed("q", i)), slot(&k.bucket("q", i, 3)));
            assert_eq!(slot(&k.scope("q", i).held("h")), slot(&k.bucket("q.dead", i, 0)));
        }
    }

    #[test]
    fn cluster_queue_names_must_make_a_tag() {
        let k = Keys::new("", Some(1));
        for bad in ["", "a{b", "a}b"] {
            let e = k.check_queue(bad).unwrap_err().to_string();
            assert!(e.contains("hash tags"), "{bad}: {e}");
        }
        assert!(k.check_queue("celery").is_ok() && k.check_queue("a:b.c").is_ok());
        for taken in ["_celery_rs.holders", "_celery_rs.holders.dead"] {
            assert!(k.check_queue(taken).unwrap_err().to_string().contains("workers' own"), "{taken}");
        }
        let h = k.holders();
        assert_eq!(h.heartbeat("w"), "{_celery_rs.holders}._celery_rs.worker.w");
        assert_eq!(h.scopes("w"), "{_celery_rs.holders}._celery_rs.scopes.w");
        assert_ne!(h, k.scope("celery", 0));
        assert_eq!(Keys::new("p:", None).holders(), Keys::new("p:", None).scope("q", 0), "one server: Kombu's scope");
    }
}

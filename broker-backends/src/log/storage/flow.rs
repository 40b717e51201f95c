//! Per-key concurrency slots of a store ([`celery_core::flow`]): the owner of the directory holds
//! them, so every worker process (through `log+tcp://` or the directory's socket) sees one count.
//!
//! - Slots (holder -> lease expiry) live in the owner's memory. A renewal re-creates a slot the
//!   owner no longer knows (after its restart), so the count follows what really runs.
//! - Parked messages are durable: each is a record of the results log under
//!   `_celery_rs.parked.<seq>` (the key, the queue, the record), written before
//!   `acquire_or_park` answers `Parked` (so before the worker acks the delivery), and rebuilt in
//!   order at open. Moving one back appends it to its queue first, then deletes its record: a
//!   crash in between leaves a duplicate at worst, never a loss.
//! - The owner's expiry loop sweeps every second: expired slots (dead workers) are freed and a
//!   parked message moves back for each; a key with parked messages and no slot gets one moved.
//! - Bounded: keys are checked ([`celery_core::flow::validate_key`]), limits too, and at most
//!   [`MAX_TRACKED_KEYS`] keys are tracked at once.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use celery_core::flow::{Admission, SlotRequest, MAX_PARKED, MAX_TRACKED_KEYS};
use celery_core::sync::lock;

use super::error::LogError;
use super::record::{now_ms, NewRecord};
use super::results::DOC_TTL;
use super::store::LogStore;

const PARKED_PREFIX: &str = "_celery_rs.parked.";

fn now_us() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_micros() as i64)
}

/// The slots and parked messages of every key.
#[derive(Debug, Default)]
pub(crate) struct KeyFlow {
    state: Mutex<FlowState>,
    /// Serializes the operations that write (parking, moving back).
    writes: tokio::sync::Mutex<()>,
}

#[derive(Debug)]
struct FlowState {
    keys: HashMap<String, KeyState>,
    next_seq: u64,
    /// Cluster-wide rate limits: bucket -> the next free start (µs since the epoch). In memory:
    /// an owner restart starts every bucket afresh.
    buckets: HashMap<String, i64>,
    /// [`MAX_TRACKED_KEYS`] and [`MAX_PARKED`] (lowered by tests).
    max_keys: usize,
    max_parked: usize,
}

impl Default for FlowState {
    fn default() -> Self {
        FlowState {
            keys: HashMap::new(),
            next_seq: 0,
            buckets: HashMap::new(),
            max_keys: MAX_TRACKED_KEYS,
            max_parked: MAX_PARKED,
        }
    }
}

#[derive(Debug, Default)]
struct KeyState {
    /// Holder -> lease expiry (ms since the epoch).
    slots: HashMap<String, i64>,
    parked: VecDeque<Parked>,
    /// Messages decided to park whose record is being written (not in `parked` yet): a release
    /// meanwhile takes the slow path, which waits for them.
    parking: usize,
}

impl KeyState {
    fn live(&self, now: i64) -> usize {
        self.slots.values().filter(|exp| **exp > now).count()
    }

    /// Nothing held, parked or being parked: the key can be forgotten.
    fn unused(&self) -> bool {
        self.slots.is_empty() && self.parked.is_empty() && self.parking == 0
    }
}

/// Takes a slot of `req.key` for `req.holder` if one is free (or the holder holds one already):
/// whether it did.
fn try_take(s: &mut FlowState, req: &SlotRequest<'_>, now: i64, expiry: i64) -> Result<bool, LogError> {
    if !s.keys.contains_key(req.key) && s.keys.len() >= s.max_keys {
        return Err(LogError::Invalid(format!(
            "too many concurrency keys tracked at once (the limit is {})",
            s.max_keys
        )));
    }
    let k = s.keys.entry(req.key.to_owned()).or_default();
    if k.slots.contains_key(req.holder) || k.live(now) < req.limit as usize {
        // Expired slots stay for the sweep, which moves a parked message back for each.
        k.slots.insert(req.holder.to_owned(), expiry);
        return Ok(true);
    }
    Ok(false)
}

/// A parked message as the state keeps it: its record's key among the results (which hold its
/// bytes, read again when it moves back; kept once in memory, not twice) and its queue.
#[derive(Debug, Clone)]
struct Parked {
    doc: String,
    queue: String,
}

fn put_field(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u32).to_le_bytes());
    out.extend_from_slice(b);
}

fn take_field<'a>(b: &mut &'a [u8]) -> Option<&'a [u8]> {
    let n = u32::from_le_bytes(b.get(..4)?.try_into().ok()?) as usize;
    let field = b.get(4..4usize.checked_add(n)?)?;
    *b = &b[4 + n..];
    Some(field)
}

/// A parked message's stored form: key, queue, record key, payload (each length-prefixed).
fn encode(key: &str, queue: &str, record: &NewRecord) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + key.len() + queue.len() + record.key.len() + record.payload.len());
    for field in [key.as_bytes(), queue.as_bytes(), &record.key, &record.payload] {
        put_field(&mut out, field);
    }
    out
}

/// The inverse of [`encode`]: key, queue, and the record to append.
fn decode(mut b: &[u8]) -> Option<(String, String, NewRecord)> {
    let key = String::from_utf8(take_field(&mut b)?.to_vec()).ok()?;
    let queue = String::from_utf8(take_field(&mut b)?.to_vec()).ok()?;
    let record_key = take_field(&mut b)?.to_vec();
    let payload = take_field(&mut b)?.to_vec();
    Some((key, queue, NewRecord { not_before_ms: 0, headers: Vec::new(), key: record_key, payload }))
}

impl KeyFlow {
    /// Rebuilds the parked messages from the results (at open).
    pub(crate) fn load(values: &HashMap<String, (Vec<u8>, i64)>) -> KeyFlow {
        let mut found: Vec<(u64, String, Parked)> = values
            .iter()
            .filter_map(|(doc, (v, _))| {
                let seq = doc.strip_prefix(PARKED_PREFIX)?.parse::<u64>().ok()?;
                let (key, queue, _) = decode(v)?;
                Some((seq, key, Parked { doc: doc.clone(), queue }))
            })
            .collect();
        found.sort_by_key(|(seq, ..)| *seq);
        let mut state = FlowState { next_seq: found.last().map_or(0, |(s, ..)| s + 1), ..FlowState::default() };
        for (_, key, parked) in found {
            state.keys.entry(key).or_default().parked.push_back(parked);
        }
        KeyFlow { state: Mutex::new(state), writes: tokio::sync::Mutex::new(()) }
    }

    /// Lowers the bounds on keys tracked and messages parked (tests: reaching the real ones takes
    /// 100,000 steps).
    #[cfg(test)]
    fn set_bounds(&self, max_keys: usize, max_parked: usize) {
        let mut s = lock(&self.state);
        (s.max_keys, s.max_parked) = (max_keys, max_parked);
    }

    /// Parked messages over all keys, and keys tracked.
    #[cfg(test)]
    pub(crate) fn counts(&self) -> (usize, usize) {
        let s = lock(&self.state);
        (s.keys.values().map(|k| k.parked.len()).sum(), s.keys.len())
    }
}

impl LogStore {
    /// Takes a slot of `req.key` for `req.holder`, or parks the record `record` makes (bound for
    /// `queue`) durably; `record` is called only to park.
    pub(crate) async fn acquire_or_park(
        &self,
        req: &SlotRequest<'_>,
        queue: &str,
        record: impl FnOnce() -> NewRecord,
    ) -> Result<Admission, LogError> {
        req.validate().map_err(|e| LogError::Invalid(e.to_string()))?;
        super::names::component("queue", queue)?;
        let flow = self.flow();
        let now = now_ms();
        let expiry = celery_core::clock::expiry_ms(now, req.ttl);
        // A free slot is taken at once, without waiting for other keys' writes (parking, moving
        // back): taking one only adds to the state, which the writes re-read under its lock.
        if try_take(&mut lock(&flow.state), req, now, expiry)? {
            return Ok(Admission::Acquired);
        }
        let _writing = flow.writes.lock().await;
        let doc = {
            let mut s = lock(&flow.state);
            if try_take(&mut s, req, now, expiry)? {
                return Ok(Admission::Acquired);
            }
            // O(keys), only when a task is parked: cheaper than a count kept right at five sites.
            if s.keys.values().map(|k| k.parked.len() + k.parking).sum::<usize>() >= s.max_parked {
                return Err(LogError::Invalid(format!("too many parked messages (the limit is {})", s.max_parked)));
            }
            s.keys.entry(req.key.to_owned()).or_default().parking += 1;
            let seq = s.next_seq;
            s.next_seq += 1;
            format!("{PARKED_PREFIX}{seq:020}")
        };
        let written = self.results().put(&doc, encode(req.key, queue, &record()), DOC_TTL, |_| false).await;
        let mut s = lock(&flow.state);
        let k = s.keys.entry(req.key.to_owned()).or_default();
        k.parking -= 1;
        if let Err(e) = written {
            if k.unused() {
                s.keys.remove(req.key);
            }
            return Err(e);
        }
        k.parked.push_back(Parked { doc, queue: queue.to_owned() });
        Ok(Admission::Parked)
    }

    /// Renews `holder`'s slot of `key`; a slot the owner does not know (it restarted, or swept the
    /// slot as expired) is taken again, since its task runs: false then.
    pub(crate) fn renew_slot(&self, key: &str, holder: &str, ttl: Duration) -> Result<bool, LogError> {
        celery_core::flow::validate_key(key).map_err(|e| LogError::Invalid(e.to_string()))?;
        let expiry = celery_core::clock::expiry_ms(now_ms(), ttl);
        let mut s = lock(&self.flow().state);
        if !s.keys.contains_key(key) && s.keys.len() >= s.max_keys {
            return Ok(false);
        }
        Ok(s.keys.entry(key.to_owned()).or_default().slots.insert(holder.to_owned(), expiry).is_some())
    }

    /// Frees `holder`'s slot of `key` and moves the key's oldest parked message back to its queue.
    pub(crate) async fn release_slot(&self, key: &str, holder: &str) -> Result<(), LogError> {
        let flow = self.flow();
        {
            // Nothing parked or being parked for the key: nothing to move back, so no write to
            // wait for (a park decided after this sees the slot free and takes it instead).
            let mut s = lock(&flow.state);
            let Some(k) = s.keys.get_mut(key) else { return Ok(()) };
            if k.parked.is_empty() && k.parking == 0 {
                k.slots.remove(holder);
                if k.unused() {
                    s.keys.remove(key);
                }
                return Ok(());
            }
        }
        let _writing = flow.writes.lock().await;
        let next = {
            let mut s = lock(&flow.state);
            let Some(k) = s.keys.get_mut(key) else { return Ok(()) };
            k.slots.remove(holder);
            let next = k.parked.pop_front();
            if k.unused() {
                s.keys.remove(key);
            }
            next
        };
        if let Some(p) = next {
            self.move_back(key, p).await?;
        }
        Ok(())
    }

    /// Reserves the next start of the rate bucket `name` spaced `interval` after the last one
    /// reserved; how long to wait for it.
    pub(crate) fn reserve_start(&self, name: &str, interval: Duration) -> Result<Duration, LogError> {
        celery_core::flow::validate_bucket(name, interval).map_err(|e| LogError::Invalid(e.to_string()))?;
        let now = now_us();
        let mut s = lock(&self.flow().state);
        if !s.buckets.contains_key(name) && s.buckets.len() >= MAX_TRACKED_KEYS {
            // Buckets whose next start is past hold nothing: forget them first.
            s.buckets.retain(|_, next| *next > now);
            if s.buckets.len() >= MAX_TRACKED_KEYS {
                return Err(LogError::Invalid(format!("too many rate buckets (the limit is {MAX_TRACKED_KEYS})")));
            }
        }
        let next = s.buckets.entry(name.to_owned()).or_insert(now);
        let start = (*next).max(now);
        *next = start.saturating_add(interval.as_micros() as i64);
        Ok(Duration::from_micros((start - now) as u64))
    }

    /// Frees expired slots and moves parked messages back for them (see the module's header).
    pub(crate) async fn sweep_slots(&self) -> Result<u64, LogError> {
        let flow = self.flow();
        let _writing = flow.writes.lock().await;
        let now = now_ms();
        let mut moves = Vec::new();
        {
            let mut s = lock(&flow.state);
            s.keys.retain(|key, k| {
                let before = k.slots.len();
                k.slots.retain(|_, exp| *exp > now);
                let freed = before - k.slots.len();
                let n = if freed == 0 && k.slots.is_empty() { 1 } else { freed };
                for _ in 0..n.min(k.parked.len()) {
                    if let Some(p) = k.parked.pop_front() {
                        moves.push((key.clone(), p));
                    }
                }
                !k.unused()
            });
        }
        let moved = moves.len() as u64;
        for (key, p) in moves {
            self.move_back(&key, p).await?;
        }
        Ok(moved)
    }

    /// Appends a parked message to its queue, then deletes its record; put back first in line if
    /// the append fails.
    async fn move_back(&self, key: &str, p: Parked) -> Result<(), LogError> {
        let Some((_, _, rec)) = self.results().get(&p.doc).as_deref().and_then(decode) else {
            tracing::error!(doc = %p.doc, "log: a parked message's record is gone or damaged; dropped");
            return Ok(());
        };
        if let Err(e) = self.append_unchecked(&p.queue, vec![rec]).await {
            lock(&self.flow().state).keys.entry(key.to_owned()).or_default().parked.push_front(p);
            return Err(e);
        }
        self.notify.notify_waiters();
        self.results().forget(&p.doc).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::storage::StoreConfig;

    fn req<'a>(key: &'a str, holder: &'a str, ttl: Duration) -> SlotRequest<'a> {
        SlotRequest { key, limit: 2, holder, ttl }
    }

    fn rec(n: u8) -> NewRecord {
        NewRecord { payload: vec![n], ..NewRecord::default() }
    }

    #[tokio::test]
    async fn over_the_limit_parks_and_a_release_moves_one_back() {
        let dir = tempfile_dir("flow-park");
        let store = LogStore::open(&dir, StoreConfig::default()).unwrap();
        let ttl = Duration::from_secs(30);
        assert_eq!(store.acquire_or_park(&req("k", "a", ttl), "q", || rec(1)).await.unwrap(), Admission::Acquired);
        assert_eq!(store.acquire_or_park(&req("k", "b", ttl), "q", || rec(2)).await.unwrap(), Admission::Acquired);
        // The same holder again keeps its slot.
        assert_eq!(store.acquire_or_park(&req("k", "a", ttl), "q", || rec(1)).await.unwrap(), Admission::Acquired);
        assert_eq!(store.acquire_or_park(&req("k", "c", ttl), "q", || rec(3)).await.unwrap(), Admission::Parked);
        assert_eq!(store.acquire_or_park(&req("k", "d", ttl), "q", || rec(4)).await.unwrap(), Admission::Parked);
        // Another key is not limited by this one.
        assert_eq!(store.acquire_or_park(&req("other", "e", ttl), "q", || rec(5)).await.unwrap(), Admission::Acquired);
        assert_eq!(store.queue_len("q").unwrap(), 0);
        store.release_slot("k", "a").await.unwrap();
        assert_eq!(store.queue_len("q").unwrap(), 1);
        assert_eq!(store.peek("q", 10).unwrap(), vec![vec![3]], "the oldest parked message moves first");
        assert_eq!(store.flow().counts(), (1, 2));
        drop(store);
        std::fs::remove_dir_all(dir).ok();
    }

    /// A release that races a park of the same key (the park decided, its record being written)
    /// still moves the parked message back: a task is parked only while the key's slots are
    /// all held, whatever the interleaving.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_release_racing_a_park_moves_it_back() {
        let dir = tempfile_dir("flow-race");
        let store = std::sync::Arc::new(LogStore::open(&dir, StoreConfig::default()).unwrap());
        let ttl = Duration::from_secs(30);
        for round in 0..200u32 {
            let q = format!("q{round}");
            for h in ["a", "b"] {
                assert_eq!(store.acquire_or_park(&req("k", h, ttl), &q, || rec(0)).await.unwrap(), Admission::Acquired);
            }
            let (s1, s2, q2) = (store.clone(), store.clone(), q.clone());
            let park = tokio::spawn(async move { s1.acquire_or_park(&req("k", "c", ttl), &q2, || rec(1)).await });
            let release = tokio::spawn(async move { s2.release_slot("k", "a").await });
            let admitted = park.await.unwrap().unwrap();
            release.await.unwrap().unwrap();
            let expected = u64::from(admitted == Admission::Parked);
            assert_eq!(store.queue_len(&q).unwrap(), expected, "round {round}: {admitted:?}");
            for h in ["b", "c"] {
                store.release_slot("k", h).await.unwrap();
            }
            assert_eq!(store.flow().counts(), (0, 0), "round {round}: nothing left tracked");
        }
        drop(store);
        std::fs::remove_dir_all(dir).ok();
    }

    #[tokio::test]
    async fn parked_messages_survive_a_restart_and_expired_slots_free_them() {
        let dir = tempfile_dir("flow-restart");
        {
            let store = LogStore::open(&dir, StoreConfig::default()).unwrap();
            let ttl = Duration::from_millis(50);
            for (i, h) in ["a", "b"].iter().enumerate() {
                store.acquire_or_park(&req("k", h, ttl), "q", || rec(i as u8)).await.unwrap();
            }
            assert_eq!(store.acquire_or_park(&req("k", "c", ttl), "q", || rec(7)).await.unwrap(), Admission::Parked);
            store.results().flush().await.unwrap();
        }
        let store = LogStore::open(&dir, StoreConfig::default()).unwrap();
        assert_eq!(store.flow().counts(), (1, 1), "the parked message is back after the restart");
        // No slot is known after the restart: the sweep moves the parked message back.
        assert_eq!(store.sweep_slots().await.unwrap(), 1);
        assert_eq!(store.peek("q", 10).unwrap(), vec![vec![7]]);
        assert_eq!(store.flow().counts(), (0, 0));
        drop(store);
        // Its record is gone too.
        let store = LogStore::open(&dir, StoreConfig::default()).unwrap();
        assert_eq!(store.flow().counts(), (0, 0));
        drop(store);
        std::fs::remove_dir_all(dir).ok();
    }

    #[tokio::test]
    async fn rate_buckets_space_starts() {
        let dir = tempfile_dir("flow-rate");
        let store = LogStore::open(&dir, StoreConfig::default()).unwrap();
        let interval = Duration::from_millis(100);
        let waits: Vec<Duration> = (0..5).map(|_| store.reserve_start("t", interval).unwrap()).collect();
        assert!(waits[0] < Duration::from_millis(5), "{waits:?}");
        for (i, w) in waits.iter().enumerate().skip(1) {
            let expected = interval * i as u32;
            assert!(*w <= expected && *w + Duration::from_millis(20) > expected, "{waits:?}");
        }
        // Another bucket is independent.
        assert!(store.reserve_start("u", interval).unwrap() < Duration::from_millis(5));
        assert!(store.reserve_start("", interval).is_err());
        assert!(store.reserve_start("t", Duration::ZERO).is_err());
        drop(store);
        std::fs::remove_dir_all(dir).ok();
    }

    #[tokio::test]
    async fn parked_messages_and_tracked_keys_are_bounded() {
        let dir = tempfile_dir("flow-bounds");
        let store = LogStore::open(&dir, StoreConfig::default()).unwrap();
        store.flow().set_bounds(3, 2);
        let ttl = Duration::from_secs(30);
        let one = |key, holder| SlotRequest { key, limit: 1, holder, ttl };
        assert_eq!(store.acquire_or_park(&one("k", "a"), "q", || rec(1)).await.unwrap(), Admission::Acquired);
        assert_eq!(store.acquire_or_park(&one("k", "b"), "q", || rec(2)).await.unwrap(), Admission::Parked);
        assert_eq!(store.acquire_or_park(&one("k", "c"), "q", || rec(3)).await.unwrap(), Admission::Parked);
        // The third parked message is refused, with the limit named; nothing is parked for it.
        let e = store.acquire_or_park(&one("k", "d"), "q", || rec(4)).await.unwrap_err();
        assert!(e.to_string().contains("too many parked messages (the limit is 2)"), "{e}");
        assert_eq!(store.flow().counts(), (2, 1));
        // A slot is still had while the parked list is full.
        assert_eq!(store.acquire_or_park(&one("k2", "e"), "q", || rec(5)).await.unwrap(), Admission::Acquired);
        // A release moves one back, which makes room for the next.
        store.release_slot("k", "a").await.unwrap();
        assert_eq!(store.peek("q", 10).unwrap(), vec![vec![2]]);
        assert_eq!(store.acquire_or_park(&one("k", "d"), "q", || rec(4)).await.unwrap(), Admission::Acquired);
        assert_eq!(store.acquire_or_park(&one("k", "h"), "q", || rec(8)).await.unwrap(), Admission::Parked);
        // Keys: "k", "k2" and a third are tracked; a fourth is refused, and renewing its slot too.
        assert_eq!(store.acquire_or_park(&one("k3", "f"), "q", || rec(6)).await.unwrap(), Admission::Acquired);
        let e = store.acquire_or_park(&one("k4", "g"), "q", || rec(7)).await.unwrap_err();
        assert!(e.to_string().contains("too many concurrency keys tracked at once (the limit is 3)"), "{e}");
        assert!(!store.renew_slot("k4", "g", ttl).unwrap());
        assert_eq!(store.flow().counts(), (2, 3));
        // A key that drains leaves room for another.
        store.release_slot("k3", "f").await.unwrap();
        assert_eq!(store.acquire_or_park(&one("k4", "g"), "q", || rec(7)).await.unwrap(), Admission::Acquired);
        drop(store);
        std::fs::remove_dir_all(dir).ok();
    }

    #[tokio::test]
    async fn keys_and_limits_are_checked() {
        let dir = tempfile_dir("flow-checks");
        let store = LogStore::open(&dir, StoreConfig::default()).unwrap();
        let ttl = Duration::from_secs(1);
        assert!(store.acquire_or_park(&req("", "a", ttl), "q", || rec(0)).await.is_err());
        let zero = SlotRequest { limit: 0, ..req("k", "a", ttl) };
        assert!(store.acquire_or_park(&zero, "q", || rec(0)).await.is_err());
        assert!(store.acquire_or_park(&req("k", "a", ttl), "", || rec(0)).await.is_err());
        drop(store);
        std::fs::remove_dir_all(dir).ok();
    }

    fn tempfile_dir(name: &str) -> std::path::PathBuf {
        std::env::temp_dir().join(format!("{name}-{}-{}", std::process::id(), uuid::Uuid::new_v4()))
    }
}

//! Per-key concurrency slots on Redis ([`celery_core::flow`]), each step one Lua script, every
//! key it touches passed in `KEYS` (behind the `global_keyprefix`):
//!
//! - `_celery_rs.slots.<key>` (zset holder -> lease expiry in ms, by the server's clock): the held
//!   slots of a concurrency key; expires by itself a minute after its last renewal.
//! - `_celery_rs.parked.<queue>\x06\x16<key>` (list of `<step>|<Kombu envelope>`, `LPUSH` to park,
//!   `RPOP` to move back): the tasks of `key` from `queue` waiting for a slot, with the priority
//!   bucket (`step`) they go back to.
//! - `_celery_rs.parked` (set of `<queue>\x06\x16<key>`): the parked lists that are not empty,
//!   which the sweep visits.
//!
//! - `_celery_rs.rate.<task>` (string: the next free start in µs, by the server's clock): a
//!   cluster-wide rate limit; expires once that start is past.
//!
//! Not on a Redis Cluster (`Broker::key_slots` is `None` there): the keys of one step would be in
//! different slots. Rate buckets are single keys, so they work on a cluster too.
//!
//! Parking is one script with the slot check, so no slot frees between "full" and "parked"; the
//! worker acks the delivery only after the script answered. A release moves the oldest parked
//! task of its key and queue back to its queue's bucket in the same script. A key's tasks parked
//! from another queue are moved by the sweep, which every worker runs each third of its lease:
//! it frees expired slots (dead workers) and moves a parked task back for each, and one for a
//! parked list whose key holds no slot at all.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::Duration;

use async_trait::async_trait;
use celery_core::clock::millis;
use celery_core::flow::{Admission, KeySlots, RateBuckets, SlotRelease, SlotRequest};
use celery_core::protocol::Message;
use celery_core::BrokerError;
use redis::Script;

use super::error::failed;
use super::keys::{Keys, SEP};
use super::scripts::FAIR_FN;

use super::RedisBroker;
use crate::envelope;

/// Parked lists one sweep visits (about: `SSCAN`'s `COUNT` is a hint).
const SWEEP_LISTS: usize = 256;

/// The server's clock in ms, in a script.
const NOW: &str =
    "local t = redis.call('TIME')\nlocal now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)\n";

/// `move_from(parked, b, prefix, queue)` moves the oldest entry of the parked list `parked` to its
/// bucket (`KEYS[b..b+3]`, steps 0, 3, 6, 9), or, with a fairness key, to its key's line
/// (`scripts::FAIR_FN`, under key prefix `prefix` and queue `queue`); 1 if one moved.
/// `move_one()` does it for the parked list `KEYS[2]` and the buckets `KEYS[4..7]` (the last two
/// `ARGV` are the key prefix and the queue). `unindex(m)` drops the list `KEYS[2]` from the index
/// `KEYS[3]` (member `m`) once empty.
const MOVE_ONE: &str = r#"
local function move_from(parked, b, prefix, queue)
  local e = redis.call('RPOP', parked)
  if not e then return 0 end
  local step = tonumber(string.sub(e, 1, 1)) or 0
  local env = string.sub(e, 3)
  local target = KEYS[b + math.floor(step / 3)]
  if string.find(env, 'x-fairness-key', 1, true) then
    local ok, t = pcall(cjson.decode, env)
    local k = ok and fair_of(t)
    if k then
      target = fair_line(prefix, queue, fair_join(prefix, queue, k), step)
    end
  end
  redis.call('LPUSH', target, env)
  return 1
end
local function move_one()
  return move_from(KEYS[2], 4, ARGV[#ARGV - 1], ARGV[#ARGV])
end
local function unindex(m)
  if redis.call('LLEN', KEYS[2]) == 0 then redis.call('SREM', KEYS[3], m) end
end
"#;

/// KEYS: slots, parked, index; ARGV: ttl ms, limit, holder, entry, index member.
/// Returns 1 (acquired) or 0 (parked).
fn acquire_or_park() -> &'static Script {
    static SCRIPT: std::sync::OnceLock<Script> = std::sync::OnceLock::new();
    SCRIPT.get_or_init(|| {
        Script::new(&format!(
            r#"{NOW}
local ttl = tonumber(ARGV[1])
local held = redis.call('ZSCORE', KEYS[1], ARGV[3])
if held or redis.call('ZCOUNT', KEYS[1], '(' .. now, '+inf') < tonumber(ARGV[2]) then
  redis.call('ZADD', KEYS[1], now + ttl, ARGV[3])
  redis.call('PEXPIRE', KEYS[1], ttl + 60000)
  return 1
end
redis.call('LPUSH', KEYS[2], ARGV[4])
redis.call('SADD', KEYS[3], ARGV[5])
return 0
"#
        ))
    })
}

/// KEYS: slots; ARGV: ttl ms, holder. Returns 1 if it was held (it is held afterwards anyway).
fn renew() -> &'static Script {
    static SCRIPT: std::sync::OnceLock<Script> = std::sync::OnceLock::new();
    SCRIPT.get_or_init(|| {
        Script::new(&format!(
            r#"{NOW}
local ttl = tonumber(ARGV[1])
local had = redis.call('ZSCORE', KEYS[1], ARGV[2])
redis.call('ZADD', KEYS[1], now + ttl, ARGV[2])
redis.call('PEXPIRE', KEYS[1], ttl + 60000)
if had then return 1 end
return 0
"#
        ))
    })
}

/// Takes a slot per request where one is free, parking nothing, a key at a time (the requests of
/// one key share its count, its scores and its expiry: four calls per key, not per request).
/// KEYS: the slots of each key; ARGV per key: its request count `m`, then (ttl ms, limit, holder)
/// per request. Returns 1 (taken) or 0 (full) per request, in the order sent.
fn acquire_many() -> &'static Script {
    static SCRIPT: std::sync::OnceLock<Script> = std::sync::OnceLock::new();
    SCRIPT.get_or_init(|| {
        Script::new(&format!(
            r#"{NOW}
local out, a = {{}}, 1
for i = 1, #KEYS do
  local m = tonumber(ARGV[a])
  local holders = {{}}
  for j = 1, m do holders[j] = ARGV[a + 3 * j] end
  local scores = redis.call('ZMSCORE', KEYS[i], unpack(holders))
  local live = redis.call('ZCOUNT', KEYS[i], '(' .. now, '+inf')
  local add, longest, seen = {{}}, 0, {{}}
  for j = 1, m do
    local ttl, limit, holder = tonumber(ARGV[a + 3 * j - 2]), tonumber(ARGV[a + 3 * j - 1]), holders[j]
    local score = seen[holder] or (scores[j] and tonumber(scores[j]))
    if score or live < limit then
      if not (score and score > now) then live = live + 1 end
      seen[holder] = now + ttl
      add[#add + 1] = now + ttl
      add[#add + 1] = holder
      if ttl > longest then longest = ttl end
      out[#out + 1] = 1
    else
      out[#out + 1] = 0
    end
  end
  if #add > 0 then
    redis.call('ZADD', KEYS[i], unpack(add))
    redis.call('PEXPIRE', KEYS[i], longest + 60000)
  end
  a = a + 1 + 3 * m
end
return out
"#
        ))
    })
}

/// Gives slots back, a key and queue at a time. KEYS: the index, then per group (key and queue)
/// its slots key, its parked list and its queue's four buckets (six); ARGV: the key prefix, then
/// per group (index member, queue, slot count `n`, `n` holders). Moves back a parked task per
/// slot freed while the list has any, and drops the list from the index once empty. Returns how
/// many moved.
fn release_many() -> &'static Script {
    static SCRIPT: std::sync::OnceLock<Script> = std::sync::OnceLock::new();
    SCRIPT.get_or_init(|| {
        Script::new(&format!(
            r#"{FAIR_FN}{MOVE_ONE}
local prefix = ARGV[1]
local moved, a = 0, 2
for i = 0, (#KEYS - 1) / 6 - 1 do
  local k = 2 + 6 * i
  local m, queue, n = ARGV[a], ARGV[a + 1], tonumber(ARGV[a + 2])
  redis.call('ZREM', KEYS[k], unpack(ARGV, a + 3, a + 2 + n))
  local drained = false
  for _ = 1, n do
    if move_from(KEYS[k + 1], k + 2, prefix, queue) == 0 then drained = true break end
    moved = moved + 1
  end
  if drained or redis.call('LLEN', KEYS[k + 1]) == 0 then redis.call('SREM', KEYS[1], m) end
  a = a + 3 + n
end
return moved
"#
        ))
    })
}

/// KEYS: slots, parked, index, the queue's four buckets; ARGV: index member, key prefix, queue.
/// Returns how many parked tasks moved back.
fn sweep() -> &'static Script {
    static SCRIPT: std::sync::OnceLock<Script> = std::sync::OnceLock::new();
    SCRIPT.get_or_init(|| {
        Script::new(&format!(
            r#"{NOW}{FAIR_FN}{MOVE_ONE}
local n = redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if n == 0 and redis.call('ZCARD', KEYS[1]) == 0 then n = 1 end
local moved = 0
for i = 1, n do
  if move_one() == 0 then break end
  moved = moved + 1
end
unindex(ARGV[1])
return moved
"#
        ))
    })
}

/// KEYS: bucket; ARGV: interval µs. Returns the wait in µs.
fn reserve() -> &'static Script {
    static SCRIPT: std::sync::OnceLock<Script> = std::sync::OnceLock::new();
    SCRIPT.get_or_init(|| {
        Script::new(
            r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local next = tonumber(redis.call('GET', KEYS[1]) or '0') or 0
local start = math.max(next, now)
local after = start + tonumber(ARGV[1])
redis.call('SET', KEYS[1], string.format('%.0f', after), 'PX', math.floor((after - now) / 1000) + 1000)
return math.floor(start - now)
"#,
        )
    })
}

impl Keys {
    fn rate(&self, name: &str) -> String {
        format!("{}_celery_rs.rate.{name}", self.prefix())
    }
    fn slots(&self, key: &str) -> String {
        format!("{}_celery_rs.slots.{key}", self.prefix())
    }
    fn parked(&self, member: &str) -> String {
        format!("{}_celery_rs.parked.{member}", self.prefix())
    }
    fn parked_index(&self) -> String {
        format!("{}_celery_rs.parked", self.prefix())
    }
}

/// The positions of `items` grouped by `by` (a key, or a key and a queue), groups in the order
/// their first item comes.
fn groups<'a, T>(items: &[T], by: impl Fn(&T) -> (&'a str, &'a str)) -> Vec<((&'a str, &'a str), Vec<usize>)> {
    let mut at: HashMap<(&str, &str), usize> = HashMap::new();
    let mut out: Vec<((&str, &str), Vec<usize>)> = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let g = by(item);
        let n = out.len();
        let slot = *at.entry(g).or_insert(n);
        if slot == n {
            out.push((g, Vec::new()));
        }
        out[slot].1.push(i);
    }
    out
}

/// The index member of `key`'s tasks parked from `queue`.
fn member(queue: &str, key: &str) -> String {
    format!("{queue}{SEP}{key}")
}

impl RedisBroker {
    /// Runs a script over a parked list: KEYS slots, parked, index, the queue's buckets.
    fn over_list<'s>(&self, script: &'s Script, queue: &str, key: &str) -> redis::ScriptInvocation<'s> {
        let mut inv = script.prepare_invoke();
        inv.key(self.keys.slots(key)).key(self.keys.parked(&member(queue, key))).key(self.keys.parked_index());
        // One server (key slots are not offered on a cluster): shard 0.
        for bucket in self.keys.buckets(queue, 0) {
            inv.key(bucket);
        }
        inv
    }
}

#[async_trait]
impl KeySlots for RedisBroker {
    async fn acquire_or_park(
        &self,
        req: &SlotRequest<'_>,
        queue: &str,
        msg: &Message,
    ) -> Result<Admission, BrokerError> {
        req.validate()?;
        // Callers try `acquire_many` first (this broker batches), so the first call carries the
        // envelope: it takes a slot freed meanwhile or parks, atomically.
        let step = envelope::bucket_of(envelope::kombu_priority(msg));
        let entry = format!("{step}|{}", envelope::encode(msg, "", queue));
        let mut conn = self.conn.clone();
        let got: i64 = acquire_or_park()
            .key(self.keys.slots(req.key))
            .key(self.keys.parked(&member(queue, req.key)))
            .key(self.keys.parked_index())
            .arg(millis(req.ttl).max(1))
            .arg(req.limit)
            .arg(req.holder)
            .arg(&entry)
            .arg(member(queue, req.key))
            .invoke_async(&mut conn)
            .await
            .map_err(failed("redis: take a key slot"))?;
        Ok(if got == 1 { Admission::Acquired } else { Admission::Parked })
    }

    async fn renew(&self, key: &str, holder: &str, ttl: Duration) -> Result<bool, BrokerError> {
        let mut conn = self.conn.clone();
        let had: i64 = renew()
            .key(self.keys.slots(key))
            .arg(millis(ttl).max(1))
            .arg(holder)
            .invoke_async(&mut conn)
            .await
            .map_err(failed("redis: renew a key slot"))?;
        Ok(had == 1)
    }

    async fn release(&self, key: &str, holder: &str, queue: &str) -> Result<(), BrokerError> {
        self.release_many(&[SlotRelease { key, holder, queue }]).await
    }

    fn batches(&self) -> bool {
        true
    }

    async fn acquire_many(&self, reqs: &[SlotRequest<'_>]) -> Result<Vec<bool>, BrokerError> {
        if reqs.is_empty() {
            return Ok(Vec::new());
        }
        let groups = groups(reqs, |r| (r.key, ""));
        let mut inv = acquire_many().prepare_invoke();
        for (key, members) in &groups {
            inv.key(self.keys.slots(key.0)).arg(members.len());
            for &i in members {
                let req = &reqs[i];
                req.validate()?;
                inv.arg(millis(req.ttl).max(1)).arg(req.limit).arg(req.holder);
            }
        }
        let mut conn = self.conn.clone();
        let got: Vec<i64> = inv.invoke_async(&mut conn).await.map_err(failed("redis: take key slots"))?;
        if got.len() != reqs.len() {
            return Err(BrokerError::operation("redis: take key slots: an answer per request expected"));
        }
        let mut taken = vec![false; reqs.len()];
        for (&i, t) in groups.iter().flat_map(|(_, members)| members).zip(got) {
            taken[i] = t == 1;
        }
        Ok(taken)
    }

    async fn release_many(&self, slots: &[SlotRelease<'_>]) -> Result<(), BrokerError> {
        if slots.is_empty() {
            return Ok(());
        }
        let mut inv = release_many().prepare_invoke();
        inv.key(self.keys.parked_index()).arg(self.keys.prefix());
        for ((key, queue), members) in groups(slots, |s| (s.key, s.queue)) {
            let m = member(queue, key);
            inv.key(self.keys.slots(key)).key(self.keys.parked(&m));
            // One server (key slots are not offered on a cluster): shard 0.
            for bucket in self.keys.buckets(queue, 0) {
                inv.key(bucket);
            }
            inv.arg(m).arg(queue).arg(members.len());
            for i in members {
                inv.arg(slots[i].holder);
            }
        }
        let mut conn = self.conn.clone();
        let _: i64 = inv.invoke_async(&mut conn).await.map_err(failed("redis: release key slots"))?;
        Ok(())
    }

    async fn sweep(&self) -> Result<u64, BrokerError> {
        let mut conn = self.conn.clone();
        // The next page of the index (`SSCAN` visits every member present throughout a full
        // pass), not a random sample, which could pass over one key's list for ever.
        let cursor = self.sweep_cursor.load(Ordering::Relaxed);
        let (next, members): (u64, Vec<String>) = redis::cmd("SSCAN")
            .arg(self.keys.parked_index())
            .arg(cursor)
            .arg("COUNT")
            .arg(SWEEP_LISTS)
            .query_async(&mut conn)
            .await
            .map_err(failed("redis: list parked tasks"))?;
        self.sweep_cursor.store(next, Ordering::Relaxed);
        let script = sweep();
        let mut moved = 0u64;
        for m in members {
            let Some((queue, key)) = m.split_once(SEP) else { continue };
            let mut inv = self.over_list(script, queue, key);
            inv.arg(&m).arg(self.keys.prefix()).arg(queue);
            let n: i64 = inv.invoke_async(&mut conn).await.map_err(failed("redis: sweep key slots"))?;
            moved += n.max(0) as u64;
        }
        Ok(moved)
    }
}

#[async_trait]
impl RateBuckets for RedisBroker {
    async fn reserve(&self, name: &str, interval: Duration) -> Result<Duration, BrokerError> {
        celery_core::flow::validate_bucket(name, interval)?;
        let mut conn = self.conn.clone();
        let us: i64 = reserve()
            .key(self.keys.rate(name))
            .arg(interval.as_micros() as u64)
            .invoke_async(&mut conn)
            .await
            .map_err(failed("redis: reserve a rate limit start"))?;
        Ok(Duration::from_micros(us.max(0) as u64))
    }
}

#[cfg(test)]
mod tests {
    use super::groups;

    #[test]
    fn groups_keep_first_seen_order_and_every_position() {
        let items = [("a", "q"), ("b", "q"), ("a", "q"), ("a", "r"), ("b", "q")];
        let g = groups(&items, |&(k, q)| (k, q));
        assert_eq!(g, vec![(("a", "q"), vec![0, 2]), (("b", "q"), vec![1, 4]), (("a", "r"), vec![3])]);
        assert!(groups(&[] as &[(&str, &str)], |&(k, q)| (k, q)).is_empty());
    }
}

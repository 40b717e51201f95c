//! The Lua scripts that make each multi-key step atomic on the Redis server.
//!
//! Layout (all keys behind the optional `global_keyprefix`, as Kombu does):
//! - `<queue>` and `<queue>\x06\x16<3|6|9>`: Kombu's priority buckets, `LPUSH` to publish, `RPOP` to take.
//! - `unacked` (hash tag -> `[envelope, exchange, routing_key]`) and `unacked_index` (zset tag -> time):
//!   Kombu's ack emulation, so Python Celery workers and ours restore each other's lost messages.
//! - `_celery_rs.delayed.<queue>` (zset envelope -> due time in ms): ETA messages held durably.
//! - `_celery_rs.lease.<name>` (string holder, `PX` ttl) and `_celery_rs.doc.<key>`: beat's leader
//!   lease and state.
//! - `_celery_rs.worker.<holder>` (string `<nonce>:<beat>`, `PX` grace): the heartbeat of one of our
//!   consumers; `_celery_rs.held.<holder>` (set of tags): what it holds in `unacked`;
//!   `_celery_rs.workers` (set of holders): whom to check. Kombu never reads these, and a tag in no
//!   `held` set (a Python worker's) is restored by the visibility timeout only.
//!
//! On a Redis Cluster every key of a queue carries its hash tag and the lease keys exist per tag
//! ([`super::keys`]); every key a script touches is then passed in `KEYS`, never built inside
//! Lua. The scripts that restore a lease ([`restore_scope`], [`recover_scope`], [`claim_scope`])
//! and [`promote_into`] are those steps for a cluster: they put an envelope back into the buckets
//! passed for its queue (named in `ARGV`), the queue it was taken from, instead of resolving
//! Kombu's exchange bindings; a lease of a queue not passed is left for a consumer of that queue.
//! [`fetch`], [`settle`], [`heartbeat`], [`lease`] and [`release`] serve both layouts as they are.

use redis::Script;

/// Takes up to `n` envelopes from the bucket lists (in priority order) and leases each under a new tag.
/// An envelope longer than `max` bytes is not leased nor returned: it goes to the front of its
/// dead-letter list (the layout of [`crate::envelope::dead_letter`]'s wrapper: the original as the
/// body, the reason and queue in the headers), and the reply carries only its size.
/// Each leased tag is also added to the consumer's `held` set, and the holder to `workers`; the
/// leases of the whole call are written by one `HSET`, `ZADD` and `SADD` each (at most 512 tags a
/// call), not three calls per envelope nor per list.
///
/// Fair queues (one server only, `fair` = `1`): a queue whose ring ([`FAIR_FN`]) exists is
/// served key by key: the ring's front key gives up to its weight (`ARGV` pairs, 1 when not
/// named) from its lines in priority order (the key `""`: the queue's own buckets), then moves
/// to the back; a key whose lines run out leaves the ring, and the ring is deleted once only `""`
/// is left, so the queue is served as before. The ring is read a chunk of keys at a time
/// (`LRANGE`, at most 512) and the keys served in it rotate in one `LTRIM` and `RPUSH` (the keys
/// leaving in one `SREM`), not two calls per key; a ring read whole (shorter than the chunk) is
/// served and rotated in the script's memory, lap after lap, and written back once. A key's turn
/// costs one `RPOP` per line tried (without a count when one envelope is wanted: no array to
/// build), and the queue's own buckets, checked once a call (`EXISTS`), cost nothing when empty.
/// A dead-lettered envelope uses its key's credit but no slot: the turn goes on while both last.
/// The credit left to the front key is kept in `<base>.credit` between fetches (read once a call,
/// written once when left).
/// KEYS: unacked, unacked_index, held, workers, lists..., then one dead-letter list per list;
/// ARGV: now, n, tag prefix, first sequence, max, holder, fair (`1`/`0`), key prefix, weights
/// count W, W (key, weight) pairs, routing keys...
///
/// On a cluster the holder's heartbeat in the scope must be set before the first fetch there
/// ([`super::holder`]): then one more key, the heartbeat, comes last in KEYS (the odd count tells)
/// and three more ARGV last: nonce, value (`<nonce>:0`), ttl ms. It is set first, as
/// [`heartbeat`] does, in the same step as the fetch (no round trip of its own); when another
/// process holds it the script fails with `HELDELSEWHERE` and takes nothing.
/// Returns, in the order taken, pairs (list index, envelope) for the leased ones, whose tags are
/// the tag prefix followed by the first sequence, the next, ... in that order (the caller knows
/// them: not sending them back spares a string per envelope on both sides), and triples (list
/// index, size, task id or "") for a dead-lettered one: the id is the `correlation_id` found in
/// the envelope's last 64 KiB (where Kombu's envelopes keep their properties, after the body), so
/// its caller can be told. The sequence must stay below 10^14, where Lua would write it as `1e+14`.
pub(crate) fn fetch() -> Script {
    Script::new(&format!(
        r#"{FAIR_FN}
local out = {{}}
local n = tonumber(ARGV[2])
local seq = tonumber(ARGV[4])
local max = tonumber(ARGV[5])
local nk = #KEYS
if (nk - 4) % 2 == 1 then
  local beat, na = KEYS[nk], #ARGV
  local nonce = ARGV[na - 2]
  local cur = redis.call('GET', beat)
  if cur and string.sub(cur, 1, #nonce + 1) ~= nonce .. ':' then
    return redis.error_reply('HELDELSEWHERE another process holds this heartbeat')
  end
  redis.call('SET', beat, ARGV[na - 1], 'PX', ARGV[na])
  redis.call('SADD', KEYS[4], ARGV[6])
  nk = nk - 1
end
local lists = (nk - 4) / 2
local nq = lists / 4
local fair = ARGV[7] == '1'
local prefix = ARGV[8]
local nw = tonumber(ARGV[9])
local weights = {{}}
for j = 0, nw - 1 do weights[ARGV[10 + 2 * j]] = tonumber(ARGV[11 + 2 * j]) end
local rk0 = 5 + 2 * nw
local took = false
local hs, zs, ss = {{}}, {{}}, {{}}
local function flush()
  if #ss > 0 then
    redis.call('HSET', KEYS[1], unpack(hs))
    redis.call('ZADD', KEYS[2], unpack(zs))
    redis.call('SADD', KEYS[3], unpack(ss))
    hs, zs, ss = {{}}, {{}}, {{}}
  end
end
local rks = {{}}
local function hand_one(i, env)
  local rk = rks[i]
  if not rk then
    rk = cjson.encode(ARGV[rk0 + i])
    rks[i] = rk
  end
  local size = string.len(env)
  if size > max then
    local reason = 'message of ' .. size .. ' bytes exceeds the limit of ' .. max .. ' bytes'
    local dead = '{{"body":' .. cjson.encode(env) .. ',"content-encoding":"utf-8",'
      .. '"content-type":"application/octet-stream","headers":{{"x-dead-letter-reason":'
      .. cjson.encode(reason) .. ',"x-dead-letter-queue":' .. rk .. '}},"properties":'
      .. '{{"body_encoding":"utf-8","delivery_info":{{"exchange":"","routing_key":' .. rk .. '}}}}}}'
    redis.call('LPUSH', KEYS[i + lists], dead)
    local id = string.match(string.sub(env, -65536), '"correlation_id"%s*:%s*"([^"\\]+)"')
    out[#out + 1] = i - 5
    out[#out + 1] = size
    out[#out + 1] = id or ''
  else
    local tag = ARGV[3] .. seq
    seq = seq + 1
    hs[#hs + 1] = tag
    hs[#hs + 1] = '[' .. env .. ',"",' .. rk .. ']'
    zs[#zs + 1] = ARGV[1]
    zs[#zs + 1] = tag
    ss[#ss + 1] = tag
    took = true
    out[#out + 1] = i - 5
    out[#out + 1] = env
    n = n - 1
  end
  if #ss >= 512 then flush() end
end
local function hand_out(i, items)
  for _, env in ipairs(items) do hand_one(i, env) end
end
local function fair_take(qi, queue)
  local ring, set, credit_key = fair_keys(prefix, queue)
  local credit = tonumber(redis.call('GET', credit_key) or '0') or 0
  local stored = credit > 0
  local guard = 2 * n + 8
  local own = {{}}
  for s = 0, 3 do own[s] = KEYS[5 + s * nq + qi] end
  local base = fair_line(prefix, queue, '', 0)
  local own_empty = redis.call('EXISTS', own[0], own[1], own[2], own[3]) == 0
  -- One turn of `key`: up to `want` from its lines in priority order (its own buckets for ""),
  -- one `RPOP` per line tried (without a count for one: no array to build). How many it gave.
  local function turn(key, want)
    if key == '' and own_empty then return 0 end
    local got = 0
    for s = 0, 3 do
      local i = 5 + s * nq + qi
      local list = own[s]
      if key ~= '' then
        if s == 0 then list = base .. key else list = fair_line(prefix, queue, key, s * 3) end
      end
      if want - got == 1 then
        local env = redis.call('RPOP', list)
        if env then
          hand_one(i, env)
          return want
        end
      else
        local items = redis.call('RPOP', list, want - got)
        if items then
          got = got + #items
          hand_out(i, items)
          if got >= want then return got end
        end
      end
    end
    if key == '' then own_empty = true end
    return got
  end
  -- The ring as read (`q` from `head`) once it was read whole: then served and rotated here and
  -- written back once at the end, not read and rotated in Redis each pass.
  local q, head, read = nil, 1, 0
  local gone = {{}}
  local function write_ring()
    if not q then return end
    if head - 1 <= read then
      if head > 1 then redis.call('LTRIM', ring, head - 1, -1) end
      if #q > read then redis.call('RPUSH', ring, unpack(q, read + 1, #q)) end
    else
      redis.call('DEL', ring)
      if #q >= head then redis.call('RPUSH', ring, unpack(q, head, #q)) end
    end
  end
  while n > 0 and guard > 0 do
    local span = math.min(guard, n + 8, 512)
    local front, from, to
    if q then
      front, from, to = q, head, math.min(#q, head + span - 1)
    else
      front = redis.call('LRANGE', ring, 0, span - 1)
      from, to = 1, #front
      if #front < span then q, read = front, #front end
    end
    if to < from then
      write_ring()
      if #gone > 0 then redis.call('SREM', set, unpack(gone)) end
      return false
    end
    local alone = to == from and front[from] == ''
    if alone then
      if q then alone = #q == from else alone = redis.call('LLEN', ring) == 1 end
    end
    if alone then
      redis.call('DEL', ring, set, credit_key)
      return false
    end
    local done, back = 0, {{}}
    for j = from, to do
      if n <= 0 or guard <= 0 then break end
      local key = front[j]
      guard = guard - 1
      if credit <= 0 then credit = weights[key] or 1 end
      -- A dead-lettered envelope uses its key's credit but no slot: the turn goes on while both
      -- last, each more pop counted against the guard (a call's work stays bounded by `n`).
      local want, got
      repeat
        want = math.min(n, credit)
        got = turn(key, want)
        credit = credit - got
        if got >= want and credit > 0 and n > 0 then guard = guard - 1 end
      until got < want or credit <= 0 or n <= 0 or guard <= 0
      if got < want then
        done = done + 1
        if key == '' then back[#back + 1] = '' else gone[#gone + 1] = key end
        credit = 0
      elseif credit <= 0 then
        done = done + 1
        back[#back + 1] = key
        credit = 0
      end
    end
    if q then
      head = head + done
      for _, key in ipairs(back) do q[#q + 1] = key end
    elseif done > 0 then
      redis.call('LTRIM', ring, done, -1)
      if #back > 0 then redis.call('RPUSH', ring, unpack(back)) end
      if #gone > 0 then redis.call('SREM', set, unpack(gone)) end
      gone = {{}}
    end
  end
  write_ring()
  if #gone > 0 then redis.call('SREM', set, unpack(gone)) end
  if credit > 0 then
    redis.call('SET', credit_key, credit)
  elseif stored then
    redis.call('DEL', credit_key)
  end
  return true
end
local keyed = {{}}
if fair then
  for qi = 0, nq - 1 do
    if n <= 0 then break end
    local queue = ARGV[rk0 + 5 + qi]
    local ring = fair_keys(prefix, queue)
    if redis.call('EXISTS', ring) == 1 then keyed[qi] = fair_take(qi, queue) end
  end
end
for i = 5, 4 + lists do
  if n <= 0 then break end
  if not keyed[(i - 5) % nq] then
    local items = redis.call('RPOP', KEYS[i], n)
    if items then hand_out(i, items) end
  end
end
flush()
if took then redis.call('SADD', KEYS[4], ARGV[6]) end
return out
"#
    ))
}

/// Fair queues on one server (`Signature::fairness_key`), the names every script builds alike:
/// - `fair_keys(prefix, queue)`: the ring `<prefix>_celery_rs.fair.<queue>.ring` (a list of the
///   keys with waiting messages, in turn; `""` stands for the queue's own buckets and is in it
///   while any other key is), the set `.keys` (the same keys, for membership) and `.credit`
///   (what the front key may still take in its turn);
/// - `fair_line(prefix, queue, key, step)`: the line of `key` at priority `step`,
///   `<prefix>_celery_rs.fair.<queue>\x06\x16<key>` (`\x06\x16<step>` appended for 3, 6, 9);
/// - `fair_of(env)`: the envelope's `x-fairness-key` header, or nil;
/// - `fair_join(prefix, queue, key)`: adds `key` (and `""`) to the ring when absent; past
///   [`celery_core::flow::MAX_FAIRNESS_KEYS`] keys a new key shares the line `\x01other`.
///   Returns the key whose line to push to.
pub(crate) const FAIR_FN: &str = r#"
local function fair_keys(prefix, queue)
  local base = prefix .. '_celery_rs.fair.' .. queue
  return base .. '.ring', base .. '.keys', base .. '.credit'
end
local function fair_line(prefix, queue, key, step)
  local line = prefix .. '_celery_rs.fair.' .. queue .. '\6\22' .. key
  if step ~= 0 then line = line .. '\6\22' .. step end
  return line
end
local function fair_of(env)
  if type(env) == 'table' and type(env.headers) == 'table' then
    local k = env.headers['x-fairness-key']
    if type(k) == 'string' and k ~= '' then return k end
  end
  return nil
end
local function fair_join(prefix, queue, key)
  local ring, set = fair_keys(prefix, queue)
  if redis.call('SISMEMBER', set, key) == 0 then
    if redis.call('SCARD', set) > 100000 then key = '\1other' end
    if redis.call('SADD', set, key) == 1 then redis.call('RPUSH', ring, key) end
  end
  if redis.call('SADD', set, '') == 1 then redis.call('RPUSH', ring, '') end
  return key
end
"#;

/// Publishes an envelope with a fairness key to its key's line and puts the key in the ring
/// ([`FAIR_FN`]), sent as `EVAL` inside a publish pipeline. ARGV: key prefix, queue, envelope,
/// fairness key, priority step.
pub(crate) fn publish_fair() -> &'static str {
    static SOURCE: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    SOURCE.get_or_init(|| {
        format!(
            r#"{FAIR_FN}
local key = fair_join(ARGV[1], ARGV[2], ARGV[4])
redis.call('LPUSH', fair_line(ARGV[1], ARGV[2], key, tonumber(ARGV[5])), ARGV[3])
return 1
"#
        )
    })
}

/// Counts (`op` = `len`), deletes (`purge`: returns the count) or reads (`peek`: up to `max`,
/// oldest first, key after key in turn) what waits in a queue's keyed lines ([`FAIR_FN`]; its
/// own buckets are not included), sent as `EVAL` (inside pipelines). ARGV: key prefix, queue,
/// op, max.
pub(crate) fn fair_lines() -> &'static str {
    static SOURCE: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    SOURCE.get_or_init(|| {
        format!(
            r#"{FAIR_FN}
local prefix, queue, op, max = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
local ring, set, credit = fair_keys(prefix, queue)
local keys = redis.call('LRANGE', ring, 0, -1)
local total, out = 0, {{}}
for _, key in ipairs(keys) do
  if key ~= '' then
    for s = 0, 9, 3 do
      local line = fair_line(prefix, queue, key, s)
      if op == 'peek' then
        if #out < max then
          local items = redis.call('LRANGE', line, -(max - #out), -1)
          for j = #items, 1, -1 do out[#out + 1] = items[j] end
        end
      else
        total = total + redis.call('LLEN', line)
        if op == 'purge' then redis.call('DEL', line) end
      end
    end
  end
end
if op == 'peek' then return out end
if op == 'purge' then redis.call('DEL', ring, set, credit) end
return total
"#
        )
    })
}

/// `bucket_key(prefix, queue, env)`: where `env` goes back to: its priority bucket, or with a
/// fairness key its key's line (the key joining the ring: [`FAIR_FN`]).
const BUCKET_FN: &str = r#"
local function bucket_key(prefix, queue, env)
  local p = 0
  if type(env) == 'table' and type(env.properties) == 'table' and type(env.properties.priority) == 'number' then
    p = env.properties.priority
  end
  local b = 0
  if p >= 9 then b = 9 elseif p >= 6 then b = 6 elseif p >= 3 then b = 3 end
  local k = fair_of(env)
  if k then return fair_line(prefix, queue, fair_join(prefix, queue, k), b) end
  if b == 0 then return prefix .. queue end
  return prefix .. queue .. '\6\22' .. b
end
local function queues_for(prefix, exchange, rk)
  if exchange == nil or exchange == '' or type(exchange) ~= 'string' then return {rk} end
  local members = redis.call('SMEMBERS', prefix .. '_kombu.binding.' .. exchange)
  local out = {}
  for _, m in ipairs(members) do
    local a = string.find(m, '\6\22', 1, true)
    if a then
      local key = string.sub(m, 1, a - 1)
      local rest = string.sub(m, a + 2)
      local b = string.find(rest, '\6\22', 1, true)
      if b and (key == rk or key == '') then out[#out + 1] = string.sub(rest, b + 2) end
    end
  end
  if #out == 0 then out[1] = rk end
  return out
end
"#;

/// `mark(env)`: an envelope marked redelivered, its `x-delivery-count` header counted up (what
/// sends a poison message to the dead-letter queue).
const MARK_FN: &str = r#"
local function mark(env)
  if type(env.headers) == 'table' then
    env.headers.redelivered = true
    local c = tonumber(env.headers['x-delivery-count']) or 1
    env.headers['x-delivery-count'] = c + 1
  end
  if type(env.properties) == 'table' and type(env.properties.delivery_info) == 'table' then
    env.properties.delivery_info.redelivered = true
  end
  return cjson.encode(env)
end
"#;

/// `restore_tag(unacked, index, prefix, tag)`: puts the leased envelope of `tag` back at the front
/// of its queues, marked redelivered ([`MARK_FN`]), and drops the lease. Returns 1 when an
/// envelope was restored.
const RESTORE_FN: &str = r#"
local function restore_tag(unacked, index, prefix, tag)
  local restored = 0
  local p = redis.call('HGET', unacked, tag)
  if p then
    local ok, t = pcall(cjson.decode, p)
    if ok and type(t) == 'table' and type(t[1]) == 'table' and type(t[3]) == 'string' then
      local env = t[1]
      local data = mark(env)
      for _, q in ipairs(queues_for(prefix, t[2], t[3])) do
        redis.call('RPUSH', bucket_key(prefix, q, env), data)
      end
      restored = 1
    end
  end
  redis.call('HDEL', unacked, tag)
  redis.call('ZREM', index, tag)
  return restored
end
"#;

/// Restores leases older than the cutoff to the front of their queues, marking them redelivered and
/// counting deliveries in the `x-delivery-count` header.
/// KEYS: unacked, unacked_index; ARGV: cutoff, limit, key prefix.
pub(crate) fn restore() -> Script {
    Script::new(&format!(
        r#"{FAIR_FN}{BUCKET_FN}{MARK_FN}{RESTORE_FN}
local tags = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
local restored = 0
for _, tag in ipairs(tags) do
  restored = restored + restore_tag(KEYS[1], KEYS[2], ARGV[3], tag)
end
return restored
"#
    ))
}

/// Restores at once what holders whose heartbeat key is gone held: one `SSCAN` step over
/// `workers`; for each holder without its `_celery_rs.worker.<holder>` key, up to `max` tags popped
/// from its `held` set are restored ([`RESTORE_FN`]; a tag no longer in `unacked` was settled or
/// restored already), and a holder left with nothing is removed from `workers`. One script: many
/// live consumers sweeping at once restore each delivery exactly once.
/// KEYS: unacked, unacked_index, workers; ARGV: key prefix, heartbeat key prefix, held key prefix,
/// cursor, holders per step, max tags per holder. Returns (next cursor, restored, holders removed).
pub(crate) fn recover() -> Script {
    Script::new(&format!(
        r#"{FAIR_FN}{BUCKET_FN}{MARK_FN}{RESTORE_FN}
local r = redis.call('SSCAN', KEYS[3], ARGV[4], 'COUNT', tonumber(ARGV[5]))
local restored, gone = 0, 0
for _, h in ipairs(r[2]) do
  if redis.call('EXISTS', ARGV[2] .. h) == 0 then
    local held = ARGV[3] .. h
    local tags = redis.call('SPOP', held, tonumber(ARGV[6]))
    for _, tag in ipairs(tags) do
      if redis.call('HEXISTS', KEYS[1], tag) == 1 then
        restored = restored + restore_tag(KEYS[1], KEYS[2], ARGV[1], tag)
      end
    end
    if redis.call('SCARD', held) == 0 then
      redis.call('SREM', KEYS[3], h)
      gone = gone + 1
    end
  end
end
return {{tonumber(r[1]), restored, gone}}
"#
    ))
}

/// A holder's start: when its heartbeat key still holds `expected` (`""`: absent), what an earlier
/// run of the same holder left in its `held` set is restored ([`RESTORE_FN`]), the set emptied,
/// the heartbeat set and the holder added to `workers`; otherwise nothing changes (another live
/// process renews that key). KEYS: heartbeat, held, workers, unacked, unacked_index; ARGV:
/// expected, value, ttl ms, holder, key prefix. Returns the count restored, or -1.
pub(crate) fn claim() -> Script {
    Script::new(&format!(
        r#"{FAIR_FN}{BUCKET_FN}{MARK_FN}{RESTORE_FN}
local cur = redis.call('GET', KEYS[1]) or ''
if cur ~= ARGV[1] then return -1 end
local restored = 0
for _, tag in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  if redis.call('HEXISTS', KEYS[4], tag) == 1 then
    restored = restored + restore_tag(KEYS[4], KEYS[5], ARGV[5], tag)
  end
end
redis.call('DEL', KEYS[2])
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
redis.call('SADD', KEYS[3], ARGV[4])
return restored
"#
    ))
}

/// Renews a holder's heartbeat. KEYS: heartbeat, workers; ARGV: nonce, value (`<nonce>:<beat>`),
/// ttl ms, holder. Returns 1 when the key was ours and alive, 0 when it had expired (set again: what
/// the holder held may have been restored meanwhile), -1 when another process holds it (not
/// touched).
pub(crate) fn heartbeat() -> Script {
    Script::new(
        r#"
local cur = redis.call('GET', KEYS[1])
if cur and string.sub(cur, 1, #ARGV[1] + 1) ~= ARGV[1] .. ':' then return -1 end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
redis.call('SADD', KEYS[2], ARGV[4])
if cur then return 1 end
return 0
"#,
    )
}

/// Settles a delivery other than by ack, only while it is still leased: when `HDEL unacked tag`
/// removes it, the envelope goes where `op` says (`rpush`/`lpush` to a list, `zadd` to a zset with
/// `score`) and the tag leaves `unacked_index` and `held`; when the lease is gone (restored to
/// another worker meanwhile), nothing is written, so no second copy appears.
/// A list write is followed by a `PUBLISH` to the wake-up channel `wake` when one is given (not
/// empty), so idle consumers of that queue look at once. `requeue` is `rpush` but, with fair
/// queues (`fair` = `1`, one server), an envelope with a fairness key goes back to the front of its
/// key's line instead ([`FAIR_FN`]).
/// KEYS: unacked, unacked_index, held, target; ARGV: tag, op, value, score, wake, key prefix,
/// queue, fair. Returns 1 when settled.
pub(crate) fn settle() -> Script {
    Script::new(&format!(
        r#"{FAIR_FN}{BUCKET_FN}
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('SREM', KEYS[3], ARGV[1])
if redis.call('HDEL', KEYS[1], ARGV[1]) == 0 then return 0 end
if ARGV[2] == 'zadd' then
  redis.call('ZADD', KEYS[4], ARGV[4], ARGV[3])
  return 1
elseif ARGV[2] == 'lpush' then
  redis.call('LPUSH', KEYS[4], ARGV[3])
elseif ARGV[2] == 'requeue' and ARGV[8] == '1' then
  local ok, env = pcall(cjson.decode, ARGV[3])
  if ok and fair_of(env) then
    redis.call('RPUSH', bucket_key(ARGV[6], ARGV[7], env), ARGV[3])
  else
    redis.call('RPUSH', KEYS[4], ARGV[3])
  end
else
  redis.call('RPUSH', KEYS[4], ARGV[3])
end
if ARGV[5] and ARGV[5] ~= '' then redis.call('PUBLISH', ARGV[5], '') end
return 1
"#
    ))
}

/// Moves due envelopes from a delayed zset to the back of their queue, by the server's clock.
/// Returns (moved, the next due time in ms since the epoch or -1). KEYS: delayed; ARGV: limit, key
/// prefix, queue.
pub(crate) fn promote() -> Script {
    Script::new(&format!(
        r#"{FAIR_FN}{BUCKET_FN}
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
for _, data in ipairs(due) do
  local ok, env = pcall(cjson.decode, data)
  if not ok then env = nil end
  redis.call('LPUSH', bucket_key(ARGV[2], ARGV[3], env), data)
  redis.call('ZREM', KEYS[1], data)
end
local nxt = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
if #nxt == 0 then return {{#due, -1}} end
return {{#due, tonumber(nxt[2])}}
"#
    ))
}

/// On a cluster: `redeliver(unacked, index, tag, targets)` puts the leased envelope of `tag` back
/// at the front of its queue's bucket for its priority, marked redelivered ([`MARK_FN`]), and drops
/// the lease; `targets` maps a queue name to the `KEYS` index of its first bucket (the four follow).
/// Returns 1 when restored, 0 when the lease was gone or unreadable (dropped), -1 when its queue is
/// not in `targets` (left alone).
const REDELIVER_FN: &str = r#"
local function bucket_index(env)
  local p = 0
  if type(env) == 'table' and type(env.properties) == 'table' and type(env.properties.priority) == 'number' then
    p = env.properties.priority
  end
  if p >= 9 then return 3 elseif p >= 6 then return 2 elseif p >= 3 then return 1 end
  return 0
end
local function redeliver(unacked, index, tag, targets)
  local p = redis.call('HGET', unacked, tag)
  local restored = 0
  if p then
    local ok, t = pcall(cjson.decode, p)
    if ok and type(t) == 'table' and type(t[1]) == 'table' and type(t[3]) == 'string' then
      local first = targets[t[3]]
      if not first then return -1 end
      local env = t[1]
      redis.call('RPUSH', KEYS[first + bucket_index(env)], mark(env))
      restored = 1
    end
  end
  redis.call('HDEL', unacked, tag)
  redis.call('ZREM', index, tag)
  return restored
end
local function targets_from(first_arg, first_key)
  local targets = {}
  for j = first_arg, #ARGV do targets[ARGV[j]] = first_key + 4 * (j - first_arg) end
  return targets
end
"#;

/// [`restore`] on a cluster: restores leases older than the cutoff, skipping `offset` of them
/// (leases of queues not passed, left by the previous call).
/// KEYS: unacked, unacked_index, then four buckets per queue; ARGV: cutoff, limit, offset, the
/// queues. Returns (restored, skipped, examined).
pub(crate) fn restore_scope() -> Script {
    Script::new(&format!(
        r#"{MARK_FN}{REDELIVER_FN}
local targets = targets_from(4, 3)
local tags = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[1], 'LIMIT', tonumber(ARGV[3]), tonumber(ARGV[2]))
local restored, skipped = 0, 0
for _, tag in ipairs(tags) do
  local r = redeliver(KEYS[1], KEYS[2], tag, targets)
  if r == 1 then restored = restored + 1 elseif r == -1 then skipped = skipped + 1 end
end
return {{restored, skipped, #tags}}
"#
    ))
}

/// [`recover`] on a cluster, for the holders the caller read from `workers` (`SSCAN`): for each
/// whose heartbeat key is gone, restores what its `held` set names (up to `max` tags), and removes
/// a holder left with nothing from `workers`. KEYS: unacked, unacked_index, workers, then
/// (heartbeat, held) per holder, then four buckets per queue; ARGV: holders n, max, the n holders,
/// the queues. Returns (restored, holders removed).
pub(crate) fn recover_scope() -> Script {
    Script::new(&format!(
        r#"{MARK_FN}{REDELIVER_FN}
local n = tonumber(ARGV[1])
local max = tonumber(ARGV[2])
local targets = targets_from(3 + n, 4 + 2 * n)
local restored, gone = 0, 0
for i = 1, n do
  local hb, held = KEYS[2 + 2 * i], KEYS[3 + 2 * i]
  if redis.call('EXISTS', hb) == 0 then
    local tags = redis.call('SMEMBERS', held)
    for k, tag in ipairs(tags) do
      if k > max then break end
      local r = redeliver(KEYS[1], KEYS[2], tag, targets)
      if r >= 0 then redis.call('SREM', held, tag) end
      if r == 1 then restored = restored + 1 end
    end
    if redis.call('SCARD', held) == 0 then
      redis.call('SREM', KEYS[3], ARGV[2 + i])
      gone = gone + 1
    end
  end
end
return {{restored, gone}}
"#
    ))
}

/// [`claim`] on a cluster. KEYS: heartbeat, held, workers, unacked, unacked_index, then four
/// buckets per queue; ARGV: expected, value, ttl ms, holder, the queues. Returns the count
/// restored, or -1. Leases of queues not passed stay in `held` (the visibility timeout restores
/// them through a consumer of their queue).
pub(crate) fn claim_scope() -> Script {
    Script::new(&format!(
        r#"{MARK_FN}{REDELIVER_FN}
local cur = redis.call('GET', KEYS[1]) or ''
if cur ~= ARGV[1] then return -1 end
local targets = targets_from(5, 6)
local restored = 0
for _, tag in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  local r = redeliver(KEYS[4], KEYS[5], tag, targets)
  if r >= 0 then redis.call('SREM', KEYS[2], tag) end
  if r == 1 then restored = restored + 1 end
end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
redis.call('SADD', KEYS[3], ARGV[4])
return restored
"#
    ))
}

/// A dead holder's entries on a cluster, once its deliveries were restored from every scope it
/// listed: when its heartbeat is still gone, removes it from `workers` and deletes its list of
/// scopes (a holder that came back keeps both). KEYS: heartbeat, workers, scopes; ARGV: holder.
/// Returns 1 when removed.
pub(crate) fn forget() -> Script {
    Script::new(
        r#"
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('SREM', KEYS[2], ARGV[1])
redis.call('DEL', KEYS[3])
return 1
"#,
    )
}

/// [`promote`] on a cluster: moves due envelopes from a delayed zset to the back of the bucket
/// (passed) for their priority. KEYS: delayed, the four buckets; ARGV: limit. Returns (moved, the
/// next due time in ms since the epoch or -1).
pub(crate) fn promote_into() -> Script {
    Script::new(&format!(
        r#"{MARK_FN}{REDELIVER_FN}
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
for _, data in ipairs(due) do
  local ok, env = pcall(cjson.decode, data)
  if not ok then env = nil end
  redis.call('LPUSH', KEYS[2 + bucket_index(env)], data)
  redis.call('ZREM', KEYS[1], data)
end
local nxt = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
if #nxt == 0 then return {{#due, -1}} end
return {{#due, tonumber(nxt[2])}}
"#
    ))
}

/// Reads the next-due index of delayed messages by the server's clock: up to `limit` members due
/// now, and how long until the first one due later (ms, or -1 when none).
/// KEYS: due; ARGV: limit. Returns (members, ms until the next).
pub(crate) fn due() -> Script {
    Script::new(
        r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
local nxt = redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. now, '+inf', 'WITHSCORES', 'LIMIT', 0, 1)
if #nxt == 0 then return {due, -1} end
return {due, tonumber(nxt[2]) - now}
"#,
    )
}

/// One server: puts delayed sets the next-due index does not know of into it (messages deferred
/// by a process that stopped before it wrote the index, or by an older version): for each delayed
/// set, its earliest score goes into the index with `ZADD LT`. KEYS: due, delayed sets...; ARGV:
/// their index members. Returns how many sets hold messages.
pub(crate) fn due_sweep() -> Script {
    Script::new(
        r#"
local found = 0
for i = 2, #KEYS do
  local first = redis.call('ZRANGE', KEYS[i], 0, 0, 'WITHSCORES')
  if #first > 0 then
    redis.call('ZADD', KEYS[1], 'LT', first[2], ARGV[i - 1])
    found = found + 1
  end
end
return found
"#,
    )
}

/// Takes the lease if free, or renews it for its holder. KEYS: lease; ARGV: holder, ttl ms. Returns 1 when held.
pub(crate) fn lease() -> Script {
    Script::new(
        r#"
local cur = redis.call('GET', KEYS[1])
if cur == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
elseif not cur then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"#,
    )
}

/// Deletes the lease if `holder` holds it. KEYS: lease; ARGV: holder.
pub(crate) fn release() -> Script {
    Script::new(
        r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"#,
    )
}

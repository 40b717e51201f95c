//! The Lua scripts that make each multi-key step atomic on the Redis server, in Celery's key
//! layout (`celery-task-meta-<id>`, `celery-taskset-meta-<gid>.*`) and ours
//! (`celery-rs-idempotency-<key>`).

/// KEYS: the task's meta key; ARGV: the document, its ttl. Stores and publishes it, unless a
/// SUCCESS is stored already. Returns 1 when stored.
pub(super) const STORE: &str = r#"
local cur = redis.call('GET', KEYS[1])
if cur and string.find(cur, '"status":%s*"SUCCESS"') then return 0 end
redis.call('SETEX', KEYS[1], ARGV[2], ARGV[1])
redis.call('PUBLISH', KEYS[1], ARGV[1])
return 1
"#;

/// KEYS: the tasks' meta keys; ARGV: the ttl, then one document per key. [`STORE`] for each key in
/// order. Returns how many were stored.
pub(super) const STORE_MANY: &str = r#"
local stored = 0
for i, key in ipairs(KEYS) do
  local cur = redis.call('GET', key)
  if not (cur and string.find(cur, '"status":%s*"SUCCESS"')) then
    redis.call('SETEX', key, ARGV[1], ARGV[i + 1])
    redis.call('PUBLISH', key, ARGV[i + 1])
    stored = stored + 1
  end
end
return stored
"#;

/// KEYS: the idempotency key; ARGV: task id, ttl. Returns the holder, or nil after claiming it.
pub(super) const CLAIM: &str = r#"
local cur = redis.call('GET', KEYS[1])
if cur then return cur end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
return false
"#;

/// KEYS: the idempotency key; ARGV: task id. Deletes it if the task holds it.
pub(super) const UNCLAIM: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"#;

/// KEYS: .j .t .s .ids .by; ARGV: task id, encoded member, score, ttl. Returns the members with
/// scores to the member that completes the chord, else nil.
pub(super) const CHORD_PART: &str = r#"
if redis.call('SADD', KEYS[4], ARGV[1]) == 1 then
  redis.call('ZADD', KEYS[1], ARGV[3], ARGV[2])
end
for i = 1, 4 do redis.call('EXPIRE', KEYS[i], ARGV[4]) end
local size = redis.call('GET', KEYS[3])
if not size then return false end
local total = tonumber(size) + tonumber(redis.call('GET', KEYS[2]) or '0')
if redis.call('ZCARD', KEYS[1]) < total then return false end
local by = redis.call('GET', KEYS[5])
if by and by ~= ARGV[1] then return false end
redis.call('SET', KEYS[5], ARGV[1], 'EX', ARGV[4])
return redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')
"#;

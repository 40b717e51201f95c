//! `redis://`: Celery's result layout. Each state is `SETEX celery-task-meta-<id>` and `PUBLISH` on
//! the same name, in one atomic script that never overwrites a stored SUCCESS. Waiters subscribe to
//! the channel before reading the key, so no result is missed; after a lost connection they
//! resubscribe and read the key again.
//!
//! URL options: `result_expires=SECONDS` (default 86400), `global_keyprefix=PREFIX`, the broker's
//! `visibility_timeout` (ignored, so one URL serves both), and the redis client's and Celery's
//! connection options that [`broker_backends::redis::client_url`] takes. Any other is an error.
//!
//! ```no_run
//! # async fn demo() -> Result<(), celery_core::BackendError> {
//! let backend = result_backends::redis::RedisBackend::connect("redis://127.0.0.1:6379/1").await?;
//! # Ok(()) }
//! ```

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use celery_core::backend::ChordMember;
use celery_core::url::{redacted, ServiceUrl};
use celery_core::{BackendError, ResultBackend, TaskMeta};
use futures::StreamExt;
use redis::aio::{ConnectionManager, ConnectionManagerConfig, PubSubSink};
use redis::{AsyncCommands, Script};
use tokio::sync::watch;

const STORE: &str = r#"
local cur = redis.call('GET', KEYS[1])
if cur and string.find(cur, '"status":%s*"SUCCESS"') then return 0 end
redis.call('SETEX', KEYS[1], ARGV[2], ARGV[1])
redis.call('PUBLISH', KEYS[1], ARGV[1])
return 1
"#;

fn err(e: redis::RedisError) -> BackendError {
    if e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal() || e.is_timeout() {
        BackendError::connection(e.to_string())
    } else {
        BackendError::operation(e.to_string())
    }
}

type Waiters = HashMap<String, (usize, watch::Sender<u64>)>;

#[derive(Debug, Default)]
struct Subscriptions {
    waiters: Mutex<Waiters>,
    sink: Mutex<Option<PubSubSink>>,
}

impl Subscriptions {
    fn sink(&self) -> Option<PubSubSink> {
        self.sink.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// The Redis result backend.
#[derive(Clone)]
pub struct RedisBackend {
    conn: ConnectionManager,
    prefix: String,
    expires: u64,
    store: Arc<Script>,
    chord_part: Arc<Script>,
    claim: Arc<Script>,
    unclaim: Arc<Script>,
    subs: Arc<Subscriptions>,
    /// Stops the subscriber task when the last clone of this backend is dropped (so a client that
    /// exits, or drops its app, does not see it report its connection lost).
    _listener: Arc<Listener>,
}

/// The subscriber task, aborted on drop.
struct Listener(tokio::task::JoinHandle<()>);

impl Drop for Listener {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl std::fmt::Debug for RedisBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisBackend").field("prefix", &self.prefix).field("expires", &self.expires).finish()
    }
}

/// What a result-backend URL says: the redis client's URL (holding the password: never print it),
/// the key prefix and the expiry in seconds. An unknown option is an error naming it.
fn parse_url(url: &str) -> Result<(String, String, u64), BackendError> {
    let u = ServiceUrl::parse(url)?;
    let expires = u.parse_option::<u64>("result_expires", "a number of seconds")?.unwrap_or(86_400);
    let prefix = u.option("global_keyprefix").unwrap_or_default().to_owned();
    // The broker's option: accepted so that one URL serves both.
    u.accept(&["visibility_timeout"]);
    let client = broker_backends::redis::client_url(&u)?;
    u.finish()?;
    Ok((client, prefix, expires))
}

impl RedisBackend {
    /// Connects; the first connection must succeed, later losses are retried.
    pub async fn connect(url: &str) -> Result<RedisBackend, BackendError> {
        let (clean, prefix, expires) = parse_url(url)?;
        let client = redis::Client::open(clean.as_str())
            .map_err(|e| BackendError::InvalidUrl { url: redacted(url), reason: e.to_string() })?;
        let cfg = ConnectionManagerConfig::new()
            .set_response_timeout(Some(Duration::from_secs(30)))
            .set_connection_timeout(Some(Duration::from_secs(5)))
            .set_number_of_retries(3);
        let conn = client.get_connection_manager_with_config(cfg).await.map_err(err)?;
        let subs = Arc::new(Subscriptions::default());
        let listener = Arc::new(Listener(tokio::spawn(listen(client, subs.clone()))));
        Ok(RedisBackend {
            _listener: listener,
            conn,
            prefix,
            expires: expires.clamp(1, celery_core::clock::LONGEST_TTL.as_secs()),
            store: Arc::new(Script::new(STORE)),
            chord_part: Arc::new(Script::new(CHORD_PART)),
            claim: Arc::new(Script::new(CLAIM)),
            unclaim: Arc::new(Script::new(UNCLAIM)),
            subs,
        })
    }

    /// `celery-taskset-meta-<gid><suffix>` with the prefix (a chord's keys).
    fn chord_key(&self, group_id: &str, suffix: &str) -> String {
        format!("{}celery-taskset-meta-{group_id}{suffix}", self.prefix)
    }

    /// An idempotency key's holder: `celery-rs-idempotency-<key>` with the prefix.
    fn idempotency_key(&self, key: &str) -> String {
        format!("{}celery-rs-idempotency-{key}", self.prefix)
    }

    /// `celery-task-meta-<id>` with the prefix.
    pub fn key(&self, task_id: &str) -> String {
        format!("{}celery-task-meta-{task_id}", self.prefix)
    }

    async fn register(&self, key: &str) -> watch::Receiver<u64> {
        let (rx, new) = {
            let mut w = self.subs.waiters.lock().unwrap_or_else(|p| p.into_inner());
            match w.get_mut(key) {
                Some((n, tx)) => {
                    *n += 1;
                    (tx.subscribe(), false)
                }
                None => {
                    let (tx, rx) = watch::channel(0);
                    w.insert(key.to_owned(), (1, tx));
                    (rx, true)
                }
            }
        };
        if new {
            if let Some(mut sink) = self.subs.sink() {
                if let Err(e) = sink.subscribe(key).await {
                    tracing::debug!(error = %e, "redis results: subscribe failed; polling");
                }
            }
        }
        rx
    }

    async fn unregister(&self, key: &str) {
        let last = {
            let mut w = self.subs.waiters.lock().unwrap_or_else(|p| p.into_inner());
            match w.get_mut(key) {
                Some((n, _)) if *n > 1 => {
                    *n -= 1;
                    false
                }
                Some(_) => {
                    w.remove(key);
                    true
                }
                None => false,
            }
        };
        if last {
            if let Some(mut sink) = self.subs.sink() {
                let _ = sink.unsubscribe(key).await;
            }
        }
    }
}

/// Keeps one subscriber connection, wakes waiters, and resubscribes after a reconnect.
async fn listen(client: redis::Client, subs: Arc<Subscriptions>) {
    let mut backoff = celery_core::backoff::Reconnect::default();
    loop {
        let pubsub = match client.get_async_pubsub().await {
            Ok(p) => p,
            Err(e) => {
                let d = backoff.next_delay();
                tracing::warn!(error = %e, retry_in = ?d, "redis results: subscriber connection failed");
                tokio::time::sleep(d).await;
                continue;
            }
        };
        backoff.reset();
        let (mut sink, mut stream) = pubsub.split();
        let keys: Vec<String> = subs.waiters.lock().unwrap_or_else(|p| p.into_inner()).keys().cloned().collect();
        for k in &keys {
            let _ = sink.subscribe(k).await;
        }
        *subs.sink.lock().unwrap_or_else(|p| p.into_inner()) = Some(sink);
        // Wake every waiter so each re-reads its key after a (re)connect.
        for (_, tx) in subs.waiters.lock().unwrap_or_else(|p| p.into_inner()).values() {
            tx.send_modify(|v| *v += 1);
        }
        while let Some(msg) = stream.next().await {
            let w = subs.waiters.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((_, tx)) = w.get(msg.get_channel_name()) {
                tx.send_modify(|v| *v += 1);
            }
        }
        *subs.sink.lock().unwrap_or_else(|p| p.into_inner()) = None;
        tracing::warn!("redis results: subscriber connection lost; reconnecting");
    }
}

#[async_trait]
impl ResultBackend for RedisBackend {
    async fn store(&self, meta: &TaskMeta) -> Result<(), BackendError> {
        let mut conn = self.conn.clone();
        let _: i64 = self
            .store
            .key(self.key(&meta.task_id))
            .arg(meta.to_vec())
            .arg(self.expires)
            .invoke_async(&mut conn)
            .await
            .map_err(err)?;
        Ok(())
    }

    async fn get(&self, task_id: &str) -> Result<Option<TaskMeta>, BackendError> {
        let mut conn = self.conn.clone();
        let raw: Option<Vec<u8>> = conn.get(self.key(task_id)).await.map_err(err)?;
        raw.map(|r| TaskMeta::from_slice(&r)).transpose()
    }

    async fn wait(&self, task_id: &str, timeout: Duration) -> Result<Option<TaskMeta>, BackendError> {
        let key = self.key(task_id);
        let deadline = celery_core::clock::instant_after(timeout);
        let mut rx = self.register(&key).await;
        // Woken by a publish on the task's key.
        let result = crate::waiting::until_ready(|| self.get(task_id), Some(&mut rx), deadline, "redis").await;
        self.unregister(&key).await;
        result
    }

    async fn forget(&self, task_id: &str) -> Result<(), BackendError> {
        let mut conn = self.conn.clone();
        let _: () = conn.del(self.key(task_id)).await.map_err(err)?;
        Ok(())
    }

    fn kind(&self) -> &'static str {
        "redis"
    }

    async fn claim(&self, key: &str, task_id: &str, ttl: Duration) -> Result<Option<String>, BackendError> {
        let mut conn = self.conn.clone();
        self.claim
            .key(self.idempotency_key(key))
            .arg(task_id)
            .arg(celery_core::clock::ttl(ttl).as_secs().max(1))
            .invoke_async(&mut conn)
            .await
            .map_err(err)
    }

    async fn unclaim(&self, key: &str, task_id: &str) -> Result<(), BackendError> {
        let mut conn = self.conn.clone();
        let _: i64 =
            self.unclaim.key(self.idempotency_key(key)).arg(task_id).invoke_async(&mut conn).await.map_err(err)?;
        Ok(())
    }

    /// Celery's `set_chord_size`: `celery-taskset-meta-<gid>.s`.
    async fn chord_size(&self, group_id: &str, size: usize) -> Result<(), BackendError> {
        let mut conn = self.conn.clone();
        let _: () = conn.set_ex(self.chord_key(group_id, ".s"), size, self.expires).await.map_err(err)?;
        Ok(())
    }

    /// Celery's `on_chord_part_return` layout (`.j` sorted set of `[1, id, state, result]` by group
    /// index, `.t` extra count, `.s` size), counted in one Lua script; `.ids` and `.by` (ours) make a
    /// repeated report count once and let only the completing member fire.
    async fn chord_part(&self, group_id: &str, m: &ChordMember) -> Result<Option<Vec<ChordMember>>, BackendError> {
        let mut conn = self.conn.clone();
        let encoded = serde_json::to_string(&m.to_celery()).map_err(|e| BackendError::Malformed(e.to_string()))?;
        let score = m.index.map(|i| i.to_string()).unwrap_or_else(|| "+inf".into());
        let mut inv = self.chord_part.prepare_invoke();
        for suffix in [".j", ".t", ".s", ".ids", ".by"] {
            inv.key(self.chord_key(group_id, suffix));
        }
        let out: Option<Vec<(Vec<u8>, f64)>> =
            inv.arg(&m.task_id).arg(encoded).arg(score).arg(self.expires).invoke_async(&mut conn).await.map_err(err)?;
        Ok(out.map(|members| {
            let mut seen = std::collections::HashSet::new();
            members
                .iter()
                .filter_map(|(raw, score)| {
                    let v: serde_json::Value = serde_json::from_slice(raw).ok()?;
                    let index = score.is_finite().then_some(*score as u64);
                    ChordMember::from_celery(&v, index)
                })
                .filter(|m| seen.insert(m.task_id.clone()))
                .collect()
        }))
    }

    async fn chord_done(&self, group_id: &str) -> Result<(), BackendError> {
        let mut conn = self.conn.clone();
        let keys: Vec<String> = [".j", ".t", ".s", ".ids", ".by"].iter().map(|s| self.chord_key(group_id, s)).collect();
        let _: () = conn.del(keys).await.map_err(err)?;
        Ok(())
    }
}

/// KEYS: the idempotency key; ARGV: task id, ttl. Returns the holder, or nil after claiming it.
const CLAIM: &str = r#"
local cur = redis.call('GET', KEYS[1])
if cur then return cur end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
return false
"#;

/// KEYS: the idempotency key; ARGV: task id. Deletes it if the task holds it.
const UNCLAIM: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"#;

/// KEYS: .j .t .s .ids .by; ARGV: task id, encoded member, score, ttl. Returns the members with
/// scores to the member that completes the chord, else nil.
const CHORD_PART: &str = r#"
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

celery_core::register_backend!("redis", "rediss" => RedisBackend::connect);

#[cfg(test)]
mod tests {
    use super::*;

    /// Every form accepted before URLs were checked, and what it gives; unknown options now fail.
    #[test]
    fn url_options_are_read_and_the_rest_checked() {
        for (url, client, prefix, expires) in [
            ("redis://127.0.0.1:6379/1", "redis://127.0.0.1:6379/1", "", 86_400),
            ("redis://:pw@h/1?result_expires=60&global_keyprefix=p:", "redis://:pw@h/1", "p:", 60),
            ("redis://h/1?visibility_timeout=30&protocol=resp3", "redis://h/1?protocol=resp3", "", 86_400),
            ("redis://h/1?password=pw&ssl_cert_reqs=required", "redis://:pw@h/1", "", 86_400),
        ] {
            let got = parse_url(url).unwrap_or_else(|e| panic!("{url}: {e}"));
            assert_eq!(got, (client.to_owned(), prefix.to_owned(), expires), "{url}");
        }
        for (url, needle) in [
            ("redis://:s3cret@h/1?result_expires=soon", "result_expires `soon` is not a number of seconds"),
            ("redis://:s3cret@h/1?expires=60", "unknown redis:// option `expires`"),
            ("redis://:s3cret@h/1?password=x", "given twice"),
        ] {
            let e = parse_url(url).unwrap_err();
            assert!(matches!(e, BackendError::InvalidUrl { .. }), "{url}: {e:?}");
            let e = e.to_string();
            assert!(e.contains(needle) && e.contains("redis://:***@h/1") && !e.contains("s3cret"), "{url}: {e}");
        }
    }
}

//! `redis://`: Celery's result layout. Each state is `SETEX celery-task-meta-<id>` and `PUBLISH` on
//! the same name, in one atomic script that never overwrites a stored SUCCESS. Waiters subscribe to
//! the channel before reading the key, so no result is missed; after a lost connection they
//! resubscribe and read the key again.
//!
//! Where things are: `url.rs` (the URL's options), `scripts.rs` (the Lua steps), `listen.rs` (the
//! subscriber that wakes waiters); the backend here.
//!
//! URL options: `result_expires=SECONDS` (default 86400), `global_keyprefix=PREFIX`, the broker's
//! `visibility_timeout` (ignored, so one URL serves both), and the redis client's and Celery's
//! connection options that [`broker_backends::redis::client_url`] takes. Any other is an error.
//!
//! On a Redis Cluster (`redis+cluster://`, the broker's `shards` accepted and ignored) the keys
//! are Celery's but a chord's, whose five keys (`celery-taskset-meta-{<gid>}.j`, ...) carry the
//! group id as hash tag so that its counting script touches one slot. Notifications are classic
//! `PUBLISH` (a cluster passes them to every node), and the subscriber listens on one seed node
//! at a time, the next one after a loss.
//!
//! ```no_run
//! # async fn demo() -> Result<(), celery_core::BackendError> {
//! let backend = result_backends::redis::RedisBackend::connect("redis://127.0.0.1:6379/1").await?;
//! # Ok(()) }
//! ```

mod listen;
mod scripts;
mod url;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use broker_backends::redis::error::kind_of;
use broker_backends::redis::history::RedisHistory;
use broker_backends::redis::RedisConn;
use celery_core::backend::ChordMember;
use celery_core::capability::{Chords, Claims, StoreBatches};
use celery_core::url::redacted;
use celery_core::{BackendError, ResultBackend, TaskMeta};
use redis::{AsyncCommands, Script};

use listen::{Listener, Subscriptions};
use url::parse;

/// [`map_err`](Result::map_err) for a redis error met while doing `context`: a connection error
/// or an operation error as [`kind_of`] (the broker's classification) says, the redis error kept
/// as the source.
fn failed(context: &'static str) -> impl FnOnce(redis::RedisError) -> BackendError {
    move |e| BackendError::of_kind(kind_of(&e), context, e)
}

/// The Redis result backend.
#[derive(Clone)]
pub struct RedisBackend {
    conn: RedisConn,
    prefix: String,
    expires: u64,
    store: Arc<Script>,
    store_many: Arc<Script>,
    chord_part: Arc<Script>,
    claim: Arc<Script>,
    unclaim: Arc<Script>,
    subs: Arc<Subscriptions>,
    /// The monitor's task history, shared with the Redis broker's layout (`global_keyprefix`).
    history: RedisHistory,
    /// Stops the subscriber task when the last clone of this backend is dropped (so a client that
    /// exits, or drops its app, does not see it report its connection lost).
    _listener: Arc<Listener>,
}

impl std::fmt::Debug for RedisBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisBackend").field("prefix", &self.prefix).field("expires", &self.expires).finish()
    }
}

impl RedisBackend {
    /// Connects; the first connection must succeed, later losses are retried.
    pub async fn connect(url: &str) -> Result<RedisBackend, BackendError> {
        let parsed = parse(url)?;
        let (prefix, expires) = (parsed.prefix, parsed.expires);
        let conn = RedisConn::connect_url(
            &parsed.client,
            parsed.sentinel.as_ref(),
            parsed.cluster.as_ref(),
            parsed.min_replicas,
            Some(Duration::from_secs(30)),
        )
        .await
        .map_err(|e| match e {
            celery_core::BrokerError::InvalidUrl { reason, .. } => {
                BackendError::InvalidUrl { url: redacted(url), reason }
            }
            other => BackendError::from(other),
        })?;
        let subs = Arc::new(Subscriptions::default());
        let listener = Arc::new(Listener::start(conn.clone(), subs.clone()));
        Ok(RedisBackend {
            history: RedisHistory::new(conn.clone(), &prefix),
            _listener: listener,
            conn,
            prefix,
            expires: expires.clamp(1, celery_core::clock::LONGEST_TTL.as_secs()),
            store: Arc::new(Script::new(scripts::STORE)),
            store_many: Arc::new(Script::new(scripts::STORE_MANY)),
            chord_part: Arc::new(Script::new(scripts::CHORD_PART)),
            claim: Arc::new(Script::new(scripts::CLAIM)),
            unclaim: Arc::new(Script::new(scripts::UNCLAIM)),
            subs,
        })
    }

    /// `celery-taskset-meta-<gid><suffix>` with the prefix (a chord's keys); on a cluster
    /// `celery-taskset-meta-{<gid>}<suffix>`, all five in the group's slot.
    fn chord_key(&self, group_id: &str, suffix: &str) -> String {
        if self.conn.is_cluster() {
            format!("{}celery-taskset-meta-{{{group_id}}}{suffix}", self.prefix)
        } else {
            format!("{}celery-taskset-meta-{group_id}{suffix}", self.prefix)
        }
    }

    /// On a cluster a group id is a chord's hash tag: it holds no `{` or `}`.
    fn check_group(&self, group_id: &str) -> Result<(), BackendError> {
        if self.conn.is_cluster() && (group_id.is_empty() || group_id.contains(['{', '}'])) {
            return Err(BackendError::operation(format!(
                "group id `{group_id}`: on a Redis Cluster a chord's group id is not empty and holds no `{{` or `}}` (it is the hash tag of its keys)"
            )));
        }
        Ok(())
    }

    /// An idempotency key's holder: `celery-rs-idempotency-<key>` with the prefix.
    fn idempotency_key(&self, key: &str) -> String {
        format!("{}celery-rs-idempotency-{key}", self.prefix)
    }

    /// `celery-task-meta-<id>` with the prefix.
    pub fn key(&self, task_id: &str) -> String {
        format!("{}celery-task-meta-{task_id}", self.prefix)
    }
}

#[async_trait]
impl ResultBackend for RedisBackend {
    /// With `min_replicas`, the script goes as `EVAL` through [`RedisConn::write`], which waits for
    /// the replicas (a `WAIT` shared with concurrent writes).
    async fn store(&self, meta: &TaskMeta) -> Result<(), BackendError> {
        if self.conn.min_replicas().is_some() {
            let mut pipe = redis::pipe();
            pipe.cmd("EVAL").arg(scripts::STORE).arg(1).arg(self.key(&meta.task_id));
            pipe.arg(meta.to_vec()).arg(self.expires).ignore();
            return Ok(self.conn.write(pipe, "redis results: store").await?);
        }
        let mut conn = self.conn.clone();
        let _: i64 = self
            .store
            .key(self.key(&meta.task_id))
            .arg(meta.to_vec())
            .arg(self.expires)
            .invoke_async(&mut conn)
            .await
            .map_err(failed("redis results: store"))?;
        Ok(())
    }

    async fn get(&self, task_id: &str) -> Result<Option<TaskMeta>, BackendError> {
        let mut conn = self.conn.clone();
        let raw: Option<Vec<u8>> = conn.get(self.key(task_id)).await.map_err(failed("redis results: get"))?;
        raw.map(|r| TaskMeta::from_slice(&r)).transpose()
    }

    async fn wait(&self, task_id: &str, timeout: Duration) -> Result<Option<TaskMeta>, BackendError> {
        let key = self.key(task_id);
        let deadline = celery_core::clock::instant_after(timeout);
        let mut rx = self.subs.register(&key).await;
        // Unregistered however the wait ends, also when the caller drops it midway.
        let _registered = listen::Registered::new(&self.subs, &key);
        let peek = rx.clone();
        // Woken by a publish on the task's key, which carries the state: a ready one is taken as
        // published, without reading the key again (whoever may PUBLISH to this Redis may also
        // write the key: the channel is trusted as the key is).
        let get = || {
            let published = peek.borrow().published.clone();
            async move {
                let ready = published.and_then(|doc| TaskMeta::from_slice(&doc).ok()).filter(|m| m.status.is_ready());
                match ready {
                    Some(meta) => Ok(Some(meta)),
                    None => self.get(task_id).await,
                }
            }
        };
        crate::waiting::until_ready(get, Some(&mut rx), deadline, "redis").await
    }

    async fn forget(&self, task_id: &str) -> Result<(), BackendError> {
        let mut conn = self.conn.clone();
        let _: () = conn.del(self.key(task_id)).await.map_err(failed("redis results: forget"))?;
        Ok(())
    }

    fn kind(&self) -> &'static str {
        "redis"
    }

    celery_core::offers!(chords, claims, store_batches);

    fn history(&self) -> Option<&dyn celery_core::history::History> {
        Some(&self.history)
    }
}
/// The most documents one [`scripts::STORE_MANY`] call carries (more go in further calls).
const MAX_STORE_CALL: usize = 256;

/// The most bytes of documents one [`scripts::STORE_MANY`] call carries, unless its one document
/// is larger: Redis runs a script to its end before serving anyone else.
const MAX_STORE_CALL_BYTES: usize = 1 << 20;

#[async_trait]
impl StoreBatches for RedisBackend {
    /// One [`scripts::STORE_MANY`] call per [`MAX_STORE_CALL`] documents or
    /// [`MAX_STORE_CALL_BYTES`] (with `min_replicas` through [`RedisConn::write`], one `WAIT` a
    /// call). On a cluster, whose keys of one call must share a slot, each is stored on its own:
    /// all at once, or one after another when a task id repeats (its states keep their order).
    async fn store_many(&self, metas: &[TaskMeta]) -> Result<(), BackendError> {
        if self.conn.is_cluster() {
            let all: Vec<&TaskMeta> = metas.iter().collect();
            return crate::batches::store_each(&all, |m| self.store(m)).await;
        }
        let mut docs =
            metas.iter().map(|m| (self.key(&m.task_id), m.to_vec())).collect::<Vec<_>>().into_iter().peekable();
        while docs.peek().is_some() {
            let (mut keys, mut call, mut bytes) = (Vec::new(), Vec::new(), 0);
            while let Some((key, doc)) = docs.next_if(|(_, d)| {
                call.is_empty() || (call.len() < MAX_STORE_CALL && bytes + d.len() <= MAX_STORE_CALL_BYTES)
            }) {
                bytes += doc.len();
                keys.push(key);
                call.push(doc);
            }
            if self.conn.min_replicas().is_some() {
                let mut pipe = redis::pipe();
                pipe.cmd("EVAL")
                    .arg(scripts::STORE_MANY)
                    .arg(keys.len())
                    .arg(&keys)
                    .arg(self.expires)
                    .arg(&call)
                    .ignore();
                self.conn.write(pipe, "redis results: store").await?;
                continue;
            }
            let mut inv = self.store_many.prepare_invoke();
            inv.key(&keys).arg(self.expires).arg(&call);
            let _: i64 = inv.invoke_async(&mut self.conn.clone()).await.map_err(failed("redis results: store"))?;
        }
        Ok(())
    }
}

#[async_trait]
impl Chords for RedisBackend {
    /// Celery's `set_chord_size`: `celery-taskset-meta-<gid>.s`.
    async fn chord_size(&self, group_id: &str, size: usize) -> Result<(), BackendError> {
        self.check_group(group_id)?;
        let mut conn = self.conn.clone();
        let _: () = conn
            .set_ex(self.chord_key(group_id, ".s"), size, self.expires)
            .await
            .map_err(failed("redis results: chord size"))?;
        Ok(())
    }

    /// Celery's `on_chord_part_return` layout (`.j` sorted set of `[1, id, state, result]` by group
    /// index, `.t` extra count, `.s` size), counted in one Lua script; `.ids` and `.by` (ours) make a
    /// repeated report count once and let only the completing member fire.
    async fn chord_part(&self, group_id: &str, m: &ChordMember) -> Result<Option<Vec<ChordMember>>, BackendError> {
        self.check_group(group_id)?;
        let mut conn = self.conn.clone();
        let encoded = serde_json::to_string(&m.to_celery()).map_err(|e| BackendError::Malformed(e.to_string()))?;
        let score = m.index.map(|i| i.to_string()).unwrap_or_else(|| "+inf".into());
        let mut inv = self.chord_part.prepare_invoke();
        for suffix in [".j", ".t", ".s", ".ids", ".by"] {
            inv.key(self.chord_key(group_id, suffix));
        }
        let out: Option<Vec<(Vec<u8>, f64)>> = inv
            .arg(&m.task_id)
            .arg(encoded)
            .arg(score)
            .arg(self.expires)
            .invoke_async(&mut conn)
            .await
            .map_err(failed("redis results: chord part"))?;
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
        let _: () = conn.del(keys).await.map_err(failed("redis results: chord done"))?;
        Ok(())
    }
}

#[async_trait]
impl Claims for RedisBackend {
    async fn claim(&self, key: &str, task_id: &str, ttl: Duration) -> Result<Option<String>, BackendError> {
        let mut conn = self.conn.clone();
        self.claim
            .key(self.idempotency_key(key))
            .arg(task_id)
            .arg(celery_core::clock::ttl(ttl).as_secs().max(1))
            .invoke_async(&mut conn)
            .await
            .map_err(failed("redis results: claim"))
    }

    async fn unclaim(&self, key: &str, task_id: &str) -> Result<(), BackendError> {
        let mut conn = self.conn.clone();
        let _: i64 = self
            .unclaim
            .key(self.idempotency_key(key))
            .arg(task_id)
            .invoke_async(&mut conn)
            .await
            .map_err(failed("redis results: unclaim"))?;
        Ok(())
    }
}

celery_core::register_backend!("redis", "rediss", "sentinel", "redis+cluster" => RedisBackend::connect);

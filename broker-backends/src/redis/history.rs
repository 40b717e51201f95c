//! The monitor's task history in Redis ([`celery_core::history`]): a capped index of two keys
//! behind the optional `global_keyprefix`,
//!
//! - `_celery_rs.history` (hash task id -> the task's latest record, JSON),
//! - `_celery_rs.history.time` (sorted set task id -> [`TaskRecord::time_ms`]),
//!
//! (on a Redis Cluster `{<prefix>_celery_rs.history}` and `{...}.time`, one slot). A batch is
//! stored and trimmed in one script: what is older than the retention goes, then the oldest beyond
//! the count, at most [`TRIM_STEP`] of each per call so that no call blocks the server long. A
//! search walks the sorted set newest first in chunks, reads their documents and filters them
//! here, looking at no more than [`MAX_SCAN`] before it answers. The broker and the Redis result
//! backend share this store (the result backend's when the broker is RabbitMQ).

use celery_core::history::{
    check_batch, check_query, Cursor, History, HistoryPage, HistoryQuery, Retain, TaskRecord, MAX_SCAN,
};
use celery_core::BrokerError;
use redis::Script;

use super::error::failed;
use super::RedisConn;

/// The most records one call forgets for age, and again for count.
pub const TRIM_STEP: usize = 5000;
/// Records read per round trip while searching.
const CHUNK: usize = 500;

/// Stores a batch, then trims. KEYS: docs, time. ARGV: oldest time kept (ms), max count, trim
/// step, then (id, time, doc) per record.
const RECORD: &str = r#"
for i = 4, #ARGV, 3 do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 2])
  redis.call('ZADD', KEYS[2], ARGV[i + 1], ARGV[i])
end
local step = tonumber(ARGV[3])
local old = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', '(' .. ARGV[1], 'LIMIT', 0, step)
for _, id in ipairs(old) do
  redis.call('HDEL', KEYS[1], id)
  redis.call('ZREM', KEYS[2], id)
end
local over = redis.call('ZCARD', KEYS[2]) - tonumber(ARGV[2])
if over > 0 then
  local ids = redis.call('ZRANGE', KEYS[2], 0, math.min(over, step) - 1)
  for _, id in ipairs(ids) do
    redis.call('HDEL', KEYS[1], id)
    redis.call('ZREM', KEYS[2], id)
  end
end
return #old
"#;

/// Task history in Redis (see the [module docs](self)).
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use broker_backends::redis::{history::RedisHistory, RedisConn};
/// use celery_core::history::{History, HistoryQuery};
/// let conn = RedisConn::open("redis://127.0.0.1:6379/0").await?;
/// let history = RedisHistory::new(conn, "");
/// let page = history.search(&HistoryQuery { state: "FAILURE".into(), ..HistoryQuery::default() }).await?;
/// println!("{} failures", page.tasks.len());
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct RedisHistory {
    conn: RedisConn,
    docs: String,
    time: String,
    record: std::sync::Arc<Script>,
}

impl std::fmt::Debug for RedisHistory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisHistory").field("docs", &self.docs).field("time", &self.time).finish()
    }
}

impl RedisHistory {
    /// The history behind `prefix` (Kombu's `global_keyprefix`; empty for none) on `conn`.
    pub fn new(conn: RedisConn, prefix: &str) -> RedisHistory {
        let (docs, time) = if conn.is_cluster() {
            (format!("{{{prefix}_celery_rs.history}}"), format!("{{{prefix}_celery_rs.history}}.time"))
        } else {
            (format!("{prefix}_celery_rs.history"), format!("{prefix}_celery_rs.history.time"))
        };
        RedisHistory { conn, docs, time, record: std::sync::Arc::new(Script::new(RECORD)) }
    }
}

#[async_trait::async_trait]
impl History for RedisHistory {
    async fn record(&self, tasks: &[TaskRecord], keep: &Retain) -> Result<(), BrokerError> {
        check_batch(tasks)?;
        let mut inv = self.record.key(&self.docs);
        inv.key(&self.time).arg(keep.oldest_ms(celery_core::history::now_ms())).arg(keep.max_tasks).arg(TRIM_STEP);
        for t in tasks {
            let t = t.bounded();
            let doc =
                serde_json::to_string(&t).map_err(|e| BrokerError::operation_with("encoding a history record", e))?;
            inv.arg(&t.id).arg(t.time_ms()).arg(doc);
        }
        let mut conn = self.conn.clone();
        let _: i64 = inv.invoke_async(&mut conn).await.map_err(failed("redis: record task history"))?;
        Ok(())
    }

    async fn search(&self, query: &HistoryQuery) -> Result<HistoryPage, BrokerError> {
        check_query(query)?;
        let (since, until) = query.range_ms();
        let start = query.start();
        let size = query.page_size();
        let top = match &start {
            Some(c) if c.time_ms < until => c.time_ms.to_string(),
            _ if until == i64::MAX => "+inf".to_owned(),
            _ => format!("({until}"),
        };
        let bottom = if since == i64::MIN { "-inf".to_owned() } else { since.to_string() };
        let mut conn = self.conn.clone();
        let mut page = HistoryPage::default();
        let (mut offset, mut scanned) = (0usize, 0usize);
        loop {
            let chunk: Vec<(String, f64)> = redis::cmd("ZREVRANGEBYSCORE")
                .arg(&self.time)
                .arg(&top)
                .arg(&bottom)
                .arg("WITHSCORES")
                .arg("LIMIT")
                .arg(offset)
                .arg(CHUNK)
                .query_async(&mut conn)
                .await
                .map_err(failed("redis: search task history"))?;
            let got = chunk.len();
            offset += got;
            let keys: Vec<(i64, String)> = chunk
                .into_iter()
                .map(|(id, score)| (score as i64, id))
                .filter(|(t, id)| start.as_ref().is_none_or(|c| (*t, id) < (c.time_ms, &c.id)))
                .collect();
            if !keys.is_empty() {
                let ids: Vec<&str> = keys.iter().map(|(_, id)| id.as_str()).collect();
                let docs: Vec<Option<String>> = redis::cmd("HMGET")
                    .arg(&self.docs)
                    .arg(&ids)
                    .query_async(&mut conn)
                    .await
                    .map_err(failed("redis: read task history"))?;
                for ((t, id), doc) in keys.iter().zip(docs) {
                    scanned += 1;
                    let record = doc.and_then(|d| serde_json::from_str::<TaskRecord>(&d).ok());
                    if let Some(record) = record.filter(|r| query.matches(r)) {
                        page.tasks.push(record);
                    }
                    if page.tasks.len() >= size || scanned >= MAX_SCAN {
                        page.next = Some(Cursor { time_ms: *t, id: id.clone() }.encode());
                        return Ok(page);
                    }
                }
            }
            if got < CHUNK {
                return Ok(page);
            }
        }
    }
}

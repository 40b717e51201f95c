//! Task history that outlives the monitor: what the monitor folds from Celery's events, kept in
//! the broker or result backend it already uses, searchable and paginated.
//!
//! A [`TaskRecord`] is one task as its events describe it (name, state, worker, arguments, result
//! or error, timeline, last progress report). A [`History`] store keeps one record per task id,
//! replacing it when the task changes, and forgets what is older than a retention period or beyond
//! a count ([`Retain`]). Records are ordered newest first by [`TaskRecord::time`] (when the task
//! was received), ties broken by id, and a search walks that order: [`HistoryQuery`] filters by id,
//! name, state, worker, time range and argument text, and [`HistoryPage::next`] is the cursor of
//! the next (older) page. Every input is bounded: text fields to [`MAX_QUERY_TEXT`] bytes, a page
//! to [`MAX_PAGE`] tasks, a batch to [`MAX_BATCH`] records, and a search that filters looks at no
//! more than [`MAX_SCAN`] records before it answers with what it found and a cursor to go on.
//!
//! Where it lives: the built-in broker keeps it in its compacted results log (`log://`), Redis in a
//! hash of documents plus a sorted set by time (a capped index), PostgreSQL in a table of its own;
//! a RabbitMQ broker has none, so the monitor uses its result backend's (Redis or PostgreSQL), or
//! keeps it in memory only ([`MemoryHistory`], lost on restart) and says so. [`Broker::history`]
//! and [`ResultBackend::history`] return a store where there is one.
//!
//! ```
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! use celery_core::history::{History, HistoryQuery, MemoryHistory, Retain, TaskRecord};
//! let store = MemoryHistory::default();
//! let now = celery_core::event::now();
//! let task = TaskRecord { id: "t1".into(), name: "add".into(), state: "SUCCESS".into(), received: now, args: "[2, 3]".into(), ..TaskRecord::default() };
//! store.record(&[task], &Retain::default()).await.unwrap();
//! let page = store.search(&HistoryQuery { name: "ad".into(), text: "3]".into(), ..HistoryQuery::default() }).await.unwrap();
//! assert_eq!(page.tasks[0].id, "t1");
//! # });
//! ```
//!
//! [`Broker::history`]: crate::Broker::history
//! [`ResultBackend::history`]: crate::ResultBackend::history

use std::collections::{BTreeSet, HashMap};
use std::ops::Bound;
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::error::BrokerError;
use crate::progress::Progress;
use crate::sync::lock;

/// The most tasks a page holds.
pub const MAX_PAGE: usize = 500;
/// The most bytes of each text field of a query (id, name, state, worker, text).
pub const MAX_QUERY_TEXT: usize = 256;
/// The most bytes of a cursor.
pub const MAX_CURSOR: usize = 64 + MAX_QUERY_TEXT;
/// The most records one [`History::record`] call carries.
pub const MAX_BATCH: usize = 1000;
/// The most records a search looks at before it answers (with a cursor to go on), where the store
/// filters record by record (the built-in broker, Redis, memory).
pub const MAX_SCAN: usize = 20_000;
/// The default retention: a day.
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(86_400);
/// The default most tasks kept.
pub const DEFAULT_MAX_TASKS: usize = 100_000;
/// The most bytes of each text of a record a store keeps (arguments, result, traceback, ...):
/// longer ones are cut, so one task cannot make a record of megabytes.
pub const MAX_FIELD: usize = 16 << 10;
/// The most timeline entries a record keeps (the first ones).
pub const MAX_TIMELINE: usize = 64;

/// A task as its events describe it.
#[derive(Debug, Clone, Serialize, Deserialize, Default, PartialEq)]
#[serde(default)]
pub struct TaskRecord {
    /// The task id.
    pub id: String,
    /// The task name.
    pub name: String,
    /// RECEIVED, STARTED, PROGRESS (or another custom state), SUCCESS, FAILURE, RETRY, REVOKED or
    /// REJECTED.
    pub state: String,
    /// The worker that handled it last.
    pub hostname: String,
    /// Arguments, as the event shows them.
    pub args: String,
    /// Keyword arguments, as the event shows them.
    pub kwargs: String,
    /// The result's text (success).
    pub result: Option<String>,
    /// The error (failure, retry).
    pub exception: Option<String>,
    /// The traceback, if any.
    pub traceback: Option<String>,
    /// Seconds it ran.
    pub runtime: Option<f64>,
    /// Retries so far.
    pub retries: u64,
    /// When it was received (seconds since the epoch; 0 when its `task-received` was not seen).
    pub received: f64,
    /// Every event of it but its progress reports: (type, timestamp).
    pub timeline: Vec<(String, f64)>,
    /// Its last `{"done": n, "total": m}` report (`task-progress`).
    pub progress: Option<Progress>,
}

impl TaskRecord {
    /// When the task was received, else its first event's time (seconds since the epoch): the
    /// order of the history and what its retention counts from.
    ///
    /// ```
    /// use celery_core::history::TaskRecord;
    /// let t = TaskRecord { timeline: vec![("task-started".into(), 7.5)], ..TaskRecord::default() };
    /// assert_eq!(t.time(), 7.5);
    /// ```
    pub fn time(&self) -> f64 {
        if self.received > 0.0 {
            return self.received;
        }
        self.timeline.first().map_or(0.0, |(_, t)| *t)
    }

    /// [`TaskRecord::time`] in milliseconds: the key stores order by.
    pub fn time_ms(&self) -> i64 {
        (self.time() * 1000.0) as i64
    }

    /// The record as stored: every text cut to [`MAX_FIELD`] bytes, the timeline to
    /// [`MAX_TIMELINE`] entries.
    ///
    /// ```
    /// use celery_core::history::{TaskRecord, MAX_FIELD};
    /// let t = TaskRecord { args: "x".repeat(MAX_FIELD * 2), ..TaskRecord::default() };
    /// assert!(t.bounded().args.len() <= MAX_FIELD + 3);
    /// ```
    pub fn bounded(&self) -> TaskRecord {
        let cut = |s: &str| -> String {
            if s.len() <= MAX_FIELD {
                return s.to_owned();
            }
            let mut end = MAX_FIELD;
            while !s.is_char_boundary(end) {
                end -= 1;
            }
            format!("{}…", &s[..end])
        };
        let opt = |s: &Option<String>| s.as_deref().map(cut);
        TaskRecord {
            id: cut(&self.id),
            name: cut(&self.name),
            state: cut(&self.state),
            hostname: cut(&self.hostname),
            args: cut(&self.args),
            kwargs: cut(&self.kwargs),
            result: opt(&self.result),
            exception: opt(&self.exception),
            traceback: opt(&self.traceback),
            runtime: self.runtime,
            retries: self.retries,
            received: self.received,
            timeline: self.timeline.iter().take(MAX_TIMELINE).map(|(k, t)| (cut(k), *t)).collect(),
            progress: self.progress,
        }
    }
}

/// What a store keeps: records newer than `retention` (counted from [`TaskRecord::time`]), at most
/// `max_tasks` of them (the oldest go first).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retain {
    /// How long a record is kept.
    pub retention: Duration,
    /// The most records kept.
    pub max_tasks: usize,
}

impl Default for Retain {
    fn default() -> Retain {
        Retain { retention: DEFAULT_RETENTION, max_tasks: DEFAULT_MAX_TASKS }
    }
}

impl Retain {
    /// The oldest [`TaskRecord::time_ms`] kept at `now_ms`.
    pub fn oldest_ms(&self, now_ms: i64) -> i64 {
        now_ms.saturating_sub(self.retention.as_millis().min(i64::MAX as u128) as i64)
    }
}

/// A search: every non-empty field must match (text fields case-insensitively); the newest first.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct HistoryQuery {
    /// The id starts with this.
    pub id: String,
    /// The name contains this.
    pub name: String,
    /// The state is this.
    pub state: String,
    /// The worker's hostname contains this.
    pub worker: String,
    /// The arguments or keyword arguments contain this.
    pub text: String,
    /// Received at or after (seconds since the epoch).
    pub since: Option<f64>,
    /// Received before (seconds since the epoch).
    pub until: Option<f64>,
    /// Where the page starts: a previous page's [`HistoryPage::next`].
    pub cursor: Option<String>,
    /// The most tasks in the page (clamped to 1..=[`MAX_PAGE`]; 0 means 50).
    pub limit: usize,
}

/// A position in the history's order: a record's time (ms) and id. A page holds what comes after
/// it (older).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Cursor {
    /// [`TaskRecord::time_ms`] of the last record of the previous page.
    pub time_ms: i64,
    /// Its id.
    pub id: String,
}

impl Cursor {
    /// `"<ms>:<id>"`.
    pub fn encode(&self) -> String {
        format!("{}:{}", self.time_ms, self.id)
    }

    /// Reads [`Cursor::encode`]'s form.
    ///
    /// ```
    /// use celery_core::history::Cursor;
    /// let c = Cursor { time_ms: 12, id: "a:b".into() };
    /// assert_eq!(Cursor::decode(&c.encode()).unwrap(), c);
    /// assert!(Cursor::decode("x").is_err());
    /// ```
    pub fn decode(s: &str) -> Result<Cursor, String> {
        if s.len() > MAX_CURSOR {
            return Err(format!("a cursor is at most {MAX_CURSOR} bytes"));
        }
        let (t, id) = s.split_once(':').ok_or("a cursor is `<ms>:<id>`")?;
        let time_ms = t.parse().map_err(|_| "a cursor is `<ms>:<id>`".to_owned())?;
        Ok(Cursor { time_ms, id: id.to_owned() })
    }
}

impl HistoryQuery {
    /// Refuses a query whose fields are over their limits (text over [`MAX_QUERY_TEXT`] bytes, a
    /// bad cursor, a time that is not a number).
    ///
    /// ```
    /// use celery_core::history::HistoryQuery;
    /// assert!(HistoryQuery { name: "x".repeat(10_000), ..HistoryQuery::default() }.check().is_err());
    /// assert!(HistoryQuery { cursor: Some("12:id".into()), ..HistoryQuery::default() }.check().is_ok());
    /// ```
    pub fn check(&self) -> Result<(), String> {
        for (what, v) in [
            ("id", &self.id),
            ("name", &self.name),
            ("state", &self.state),
            ("worker", &self.worker),
            ("text", &self.text),
        ] {
            if v.len() > MAX_QUERY_TEXT {
                return Err(format!("`{what}` is at most {MAX_QUERY_TEXT} bytes"));
            }
        }
        for t in [self.since, self.until].into_iter().flatten() {
            if !t.is_finite() {
                return Err("`since` and `until` are seconds since the epoch".into());
            }
        }
        if let Some(c) = &self.cursor {
            Cursor::decode(c)?;
        }
        Ok(())
    }

    /// The page size asked for, within 1..=[`MAX_PAGE`] (50 when 0).
    pub fn page_size(&self) -> usize {
        match self.limit {
            0 => 50,
            n => n.min(MAX_PAGE),
        }
    }

    /// The cursor, decoded (`None` when absent or malformed: [`HistoryQuery::check`] refuses those).
    pub fn start(&self) -> Option<Cursor> {
        self.cursor.as_deref().and_then(|c| Cursor::decode(c).ok())
    }

    /// The time range in ms: `[since, until)`.
    pub fn range_ms(&self) -> (i64, i64) {
        let ms = |t: f64| (t * 1000.0) as i64;
        (self.since.map_or(i64::MIN, ms), self.until.map_or(i64::MAX, ms))
    }

    /// True when nothing but the time range and the cursor restrict the search.
    pub fn is_unfiltered(&self) -> bool {
        self.id.is_empty()
            && self.name.is_empty()
            && self.state.is_empty()
            && self.worker.is_empty()
            && self.text.is_empty()
    }

    /// Whether `t` matches every filter but the time range and the cursor.
    ///
    /// ```
    /// use celery_core::history::{HistoryQuery, TaskRecord};
    /// let t = TaskRecord { id: "abc".into(), name: "tasks.add".into(), state: "FAILURE".into(), hostname: "w1@h".into(), kwargs: "{\"user\": \"Ann\"}".into(), ..TaskRecord::default() };
    /// assert!(HistoryQuery { id: "ab".into(), name: "ADD".into(), state: "failure".into(), worker: "w1".into(), text: "ann".into(), ..HistoryQuery::default() }.matches(&t));
    /// assert!(!HistoryQuery { state: "FAIL".into(), ..HistoryQuery::default() }.matches(&t));
    /// ```
    pub fn matches(&self, t: &TaskRecord) -> bool {
        let has = |hay: &str, needle: &str| needle.is_empty() || hay.to_lowercase().contains(&needle.to_lowercase());
        (self.id.is_empty() || t.id.to_lowercase().starts_with(&self.id.to_lowercase()))
            && (self.state.is_empty() || t.state.eq_ignore_ascii_case(&self.state))
            && has(&t.name, &self.name)
            && has(&t.hostname, &self.worker)
            && (self.text.is_empty() || has(&t.args, &self.text) || has(&t.kwargs, &self.text))
    }
}

/// One page of a search.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct HistoryPage {
    /// The tasks found, newest first.
    pub tasks: Vec<TaskRecord>,
    /// The cursor of the next (older) page, when there may be more.
    pub next: Option<String>,
}

/// A store of task history ([module docs](self)).
///
/// ```
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// use celery_core::history::{History, HistoryQuery, MemoryHistory, Retain, TaskRecord};
/// let store = MemoryHistory::default();
/// let now = celery_core::event::now();
/// let tasks: Vec<TaskRecord> = (0..5)
///     .map(|i| TaskRecord { id: format!("t{i}"), name: "add".into(), received: now + i as f64, ..TaskRecord::default() })
///     .collect();
/// store.record(&tasks, &Retain::default()).await.unwrap();
/// let first = store.search(&HistoryQuery { limit: 2, ..HistoryQuery::default() }).await.unwrap();
/// assert_eq!(first.tasks.iter().map(|t| t.id.as_str()).collect::<Vec<_>>(), ["t4", "t3"]);
/// let second = store.search(&HistoryQuery { limit: 2, cursor: first.next, ..HistoryQuery::default() }).await.unwrap();
/// assert_eq!(second.tasks[0].id, "t2");
/// # });
/// ```
#[async_trait]
pub trait History: Send + Sync {
    /// Stores each record (at most [`MAX_BATCH`]), replacing the one of the same id, then forgets
    /// what `keep` no longer keeps.
    async fn record(&self, tasks: &[TaskRecord], keep: &Retain) -> Result<(), BrokerError>;

    /// One page of the records matching `query`, newest first.
    async fn search(&self, query: &HistoryQuery) -> Result<HistoryPage, BrokerError>;
}

/// Refuses a batch over [`MAX_BATCH`] records and a query over its limits, as every store does
/// before it does anything.
pub fn check_batch(tasks: &[TaskRecord]) -> Result<(), BrokerError> {
    if tasks.len() > MAX_BATCH {
        return Err(BrokerError::operation(format!(
            "history: {} records in one batch (at most {MAX_BATCH})",
            tasks.len()
        )));
    }
    Ok(())
}

/// Refuses a query over its limits ([`HistoryQuery::check`]) as an operation error.
pub fn check_query(query: &HistoryQuery) -> Result<(), BrokerError> {
    query.check().map_err(|e| BrokerError::operation(format!("history search: {e}")))
}

/// History in memory: records by id, ordered by (time, id), each with its expiry (ms since the
/// epoch). The built-in broker keeps its history in one (made durable by its results log);
/// [`MemoryHistory`] is one behind a lock.
#[derive(Debug, Default)]
pub struct Index {
    order: BTreeSet<(i64, String)>,
    tasks: HashMap<String, (i64, TaskRecord)>,
}

impl Index {
    /// Stores `t` (replacing the record of its id) until `expires_ms`.
    pub fn put(&mut self, t: TaskRecord, expires_ms: i64) {
        self.remove(&t.id);
        self.order.insert((t.time_ms(), t.id.clone()));
        self.tasks.insert(t.id.clone(), (expires_ms, t));
    }

    /// Forgets the record of `id`; true when there was one.
    pub fn remove(&mut self, id: &str) -> bool {
        match self.tasks.remove(id) {
            Some((_, old)) => {
                self.order.remove(&(old.time_ms(), old.id));
                true
            }
            None => false,
        }
    }

    /// Records held.
    pub fn len(&self) -> usize {
        self.tasks.len()
    }

    /// True when it holds none.
    pub fn is_empty(&self) -> bool {
        self.tasks.is_empty()
    }

    /// Every record with its expiry.
    pub fn iter(&self) -> impl Iterator<Item = (&TaskRecord, i64)> {
        self.tasks.values().map(|(e, t)| (t, *e))
    }

    /// Forgets the records expired at `now_ms`, older than `keep` allows, and the oldest beyond
    /// `keep.max_tasks`; returns their ids.
    pub fn trim(&mut self, now_ms: i64, keep: &Retain) -> Vec<String> {
        let oldest = keep.oldest_ms(now_ms);
        let expired: Vec<String> =
            self.tasks.iter().filter(|(_, (e, _))| *e <= now_ms).map(|(id, _)| id.clone()).collect();
        let old: Vec<String> = self.order.iter().take_while(|(t, _)| *t < oldest).map(|(_, id)| id.clone()).collect();
        let mut gone = Vec::new();
        for id in expired.into_iter().chain(old) {
            if self.remove(&id) {
                gone.push(id);
            }
        }
        while self.order.len() > keep.max_tasks {
            let Some((_, id)) = self.order.first().cloned() else { break };
            self.remove(&id);
            gone.push(id);
        }
        gone
    }

    /// One page of `query` among the records not expired at `now_ms`, looking at no more than
    /// [`MAX_SCAN`] of them.
    pub fn search(&self, query: &HistoryQuery, now_ms: i64) -> HistoryPage {
        let (since, until) = query.range_ms();
        let size = query.page_size();
        let start = query.start();
        let mut page = HistoryPage::default();
        let mut scanned = 0;
        // Below the cursor and below `until` (every key of an earlier ms is below `(until, "")`).
        let mut upper = (until, String::new());
        if let Some(c) = start {
            upper = upper.min((c.time_ms, c.id));
        }
        let below = (Bound::Unbounded, Bound::Excluded(upper));
        for key in self.order.range::<(i64, String), _>(below).rev() {
            if key.0 < since {
                break;
            }
            scanned += 1;
            let Some((expires, t)) = self.tasks.get(&key.1) else { continue };
            if *expires > now_ms && query.matches(t) {
                page.tasks.push(t.clone());
            }
            if page.tasks.len() >= size || scanned >= MAX_SCAN {
                page.next = Some(Cursor { time_ms: key.0, id: key.1.clone() }.encode());
                break;
            }
        }
        page
    }
}

/// [`History`] in this process's memory, lost when it ends: what the monitor uses when neither
/// its broker nor its result backend keeps history, and the memory broker's.
#[derive(Debug, Default)]
pub struct MemoryHistory {
    index: Mutex<Index>,
}

/// Milliseconds since the epoch.
pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

#[async_trait]
impl History for MemoryHistory {
    async fn record(&self, tasks: &[TaskRecord], keep: &Retain) -> Result<(), BrokerError> {
        check_batch(tasks)?;
        let mut index = lock(&self.index);
        for t in tasks {
            let t = t.bounded();
            let expires = expiry_ms(&t, keep);
            index.put(t, expires);
        }
        index.trim(now_ms(), keep);
        Ok(())
    }

    async fn search(&self, query: &HistoryQuery) -> Result<HistoryPage, BrokerError> {
        check_query(query)?;
        Ok(lock(&self.index).search(query, now_ms()))
    }
}

/// The expiry of a record kept for `keep.retention` from its time.
pub fn expiry_ms(t: &TaskRecord, keep: &Retain) -> i64 {
    t.time_ms().saturating_add(keep.retention.as_millis().min(i64::MAX as u128) as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(id: &str, time: f64) -> TaskRecord {
        TaskRecord {
            id: id.into(),
            name: "add".into(),
            state: "SUCCESS".into(),
            received: time,
            ..TaskRecord::default()
        }
    }

    #[test]
    fn pages_walk_the_history_newest_first_without_gaps_or_repeats() {
        let mut index = Index::default();
        let now = 1_000_000.0;
        for i in 0..25 {
            // Pairs share a millisecond: ties are ordered by id.
            index.put(task(&format!("t{i:02}"), now + (i / 2) as f64 * 0.001), i64::MAX);
        }
        let mut seen = Vec::new();
        let mut cursor = None;
        loop {
            let q = HistoryQuery { limit: 4, cursor: cursor.clone(), ..HistoryQuery::default() };
            let page = index.search(&q, 0);
            seen.extend(page.tasks.iter().map(|t| t.id.clone()));
            match page.next {
                Some(n) => cursor = Some(n),
                None => break,
            }
        }
        let want: Vec<String> = (0..25).rev().map(|i| format!("t{i:02}")).collect();
        assert_eq!(seen, want);
    }

    #[test]
    fn filters_time_ranges_and_expiry_apply() {
        let mut index = Index::default();
        index.put(task("old", 100.0), i64::MAX);
        index.put(TaskRecord { state: "FAILURE".into(), hostname: "w2".into(), ..task("bad", 200.0) }, i64::MAX);
        index.put(task("gone", 300.0), 5);
        let q = HistoryQuery { since: Some(150.0), ..HistoryQuery::default() };
        assert_eq!(index.search(&q, 10).tasks.iter().map(|t| t.id.as_str()).collect::<Vec<_>>(), ["bad"]);
        let q = HistoryQuery { until: Some(150.0), ..HistoryQuery::default() };
        assert_eq!(index.search(&q, 10).tasks[0].id, "old");
        let q = HistoryQuery { worker: "W2".into(), ..HistoryQuery::default() };
        assert_eq!(index.search(&q, 10).tasks.len(), 1);
        assert_eq!(index.search(&HistoryQuery::default(), 0).tasks.len(), 3, "not expired yet at 0");
    }

    #[test]
    fn trimming_keeps_the_retention_and_the_count() {
        let mut index = Index::default();
        let keep = Retain { retention: Duration::from_secs(100), max_tasks: 3 };
        for i in 0..6 {
            index.put(task(&format!("t{i}"), 1000.0 + i as f64), i64::MAX);
        }
        index.put(task("ancient", 10.0), i64::MAX);
        let gone = index.trim(1_004_000, &keep);
        assert!(gone.contains(&"ancient".to_owned()));
        assert_eq!(index.len(), 3);
        let kept: Vec<String> = index.search(&HistoryQuery::default(), 0).tasks.into_iter().map(|t| t.id).collect();
        assert_eq!(kept, ["t5", "t4", "t3"]);
    }

    #[test]
    fn a_replaced_record_moves_to_its_new_time() {
        let mut index = Index::default();
        index.put(TaskRecord { timeline: vec![("task-started".into(), 50.0)], ..task("t", 0.0) }, i64::MAX);
        index.put(task("t", 40.0), i64::MAX);
        assert_eq!(index.len(), 1);
        assert_eq!(index.order.len(), 1);
        assert_eq!(index.search(&HistoryQuery::default(), 0).tasks[0].received, 40.0);
    }

    #[test]
    fn bad_queries_and_batches_are_refused() {
        assert!(check_query(&HistoryQuery { text: "x".repeat(MAX_QUERY_TEXT + 1), ..HistoryQuery::default() }).is_err());
        assert!(check_query(&HistoryQuery { cursor: Some("nope".into()), ..HistoryQuery::default() }).is_err());
        assert!(check_query(&HistoryQuery { since: Some(f64::NAN), ..HistoryQuery::default() }).is_err());
        assert!(check_batch(&vec![TaskRecord::default(); MAX_BATCH + 1]).is_err());
        assert_eq!(HistoryQuery { limit: 100_000, ..HistoryQuery::default() }.page_size(), MAX_PAGE);
    }
}

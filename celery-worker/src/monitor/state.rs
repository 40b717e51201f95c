//! What the dashboard knows, folded from Celery's events: workers, the latest tasks with their
//! timelines, and per-second throughput over the last ten minutes. Each task changed since the
//! last [`MonitorState::take_changed`] is marked, so the monitor writes it to its history store at
//! most once per flush however many events it had; a changed task pushed out of memory by newer
//! ones is still handed to the next flush.
//!
//! Events are at most once, so a task may miss its final event. A task whose last event left it
//! unfinished is due for a look at the result backend [`SETTLE_AFTER`] seconds later
//! ([`MonitorState::due_checks`]), then again less and less often while it is still unfinished
//! there (a long task); what the backend says is final settles it ([`MonitorState::settle`]).

use std::collections::{HashMap, HashSet, VecDeque};

use celery_core::backend::TaskMeta;
use celery_core::history::TaskRecord;
use celery_core::progress::Progress;
use serde::Serialize;
use serde_json::Value;

/// Tasks kept (the oldest are forgotten first).
const MAX_TASKS: usize = 10_000;
/// Seconds of throughput kept.
const WINDOW: usize = 600;
/// Seconds after a task's last event (unfinished) before the result backend is asked for its state.
pub const SETTLE_AFTER: f64 = 3.0;
/// The longest pause between two looks at an unfinished task's result (seconds).
const SETTLE_PAUSE_MAX: f64 = 300.0;
/// Looks at one task's result before giving up (a task whose result is never stored, about an
/// hour of looks).
const SETTLE_TRIES: u32 = 16;

/// A worker as its events describe it.
#[derive(Debug, Clone, Serialize, Default)]
pub struct WorkerView {
    /// The worker's hostname.
    pub hostname: String,
    /// Online (no `worker-offline` since the last online or heartbeat).
    pub online: bool,
    /// When its last event arrived (seconds since the epoch).
    pub last_seen: f64,
    /// Tasks running, from its last heartbeat.
    pub active: u64,
    /// Tasks finished, from its last heartbeat.
    pub processed: u64,
    /// Its software (`celery-rs 0.1.0`, `py-celery 5.4.0`).
    pub software: String,
}

/// The folded events.
#[derive(Debug, Default)]
pub struct MonitorState {
    workers: HashMap<String, WorkerView>,
    tasks: HashMap<String, TaskRecord>,
    order: VecDeque<String>,
    /// Tasks changed since the last [`MonitorState::take_changed`].
    changed: HashSet<String>,
    /// Changed tasks pushed out of `tasks` before they were taken (at most [`MAX_TASKS`]).
    evicted: Vec<TaskRecord>,
    /// Unfinished tasks: when to look at their result next.
    unsettled: HashMap<String, Check>,
    /// Task events folded in.
    events: u64,
    /// (second, succeeded, failed), oldest first.
    throughput: VecDeque<(i64, u64, u64)>,
}

/// When to look at an unfinished task's result next, and how many looks it had.
#[derive(Debug, Clone, Copy)]
struct Check {
    due: f64,
    tries: u32,
}

/// A state no report replaces (events may arrive out of order).
fn is_final(state: &str) -> bool {
    matches!(state, "SUCCESS" | "FAILURE" | "REVOKED" | "REJECTED")
}

fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

impl MonitorState {
    /// Folds one event in.
    pub fn apply(&mut self, e: &Value) {
        let kind = e["type"].as_str().unwrap_or_default();
        let host = e["hostname"].as_str().unwrap_or_default().to_owned();
        let ts = e["timestamp"].as_f64().unwrap_or_default();
        if let Some(state) = kind.strip_prefix("worker-") {
            let w = self.workers.entry(host.clone()).or_default();
            w.hostname = host;
            w.online = state != "offline";
            w.last_seen = ts;
            w.active = e["active"].as_u64().unwrap_or(w.active);
            w.processed = e["processed"].as_u64().unwrap_or(w.processed);
            if let Some(sw) = e["sw_ident"].as_str() {
                w.software = format!("{sw} {}", e["sw_ver"].as_str().unwrap_or_default());
            }
            return;
        }
        let Some(event) = kind.strip_prefix("task-") else { return };
        let Some(id) = e["uuid"].as_str() else { return };
        self.events += 1;
        if !self.tasks.contains_key(id) {
            self.order.push_back(id.to_owned());
            if self.order.len() > MAX_TASKS {
                if let Some(old) = self.order.pop_front() {
                    self.forget(&old);
                }
            }
        }
        self.changed.insert(id.to_owned());
        self.fold(id, event, kind, host, ts, e);
        match self.tasks.get(id) {
            Some(t) if !is_final(&t.state) => {
                self.unsettled.insert(id.to_owned(), Check { due: ts + SETTLE_AFTER, tries: 0 });
            }
            _ => {
                self.unsettled.remove(id);
            }
        }
    }

    /// Drops the oldest task from memory; when it changed since the last flush, the next flush
    /// still writes it.
    fn forget(&mut self, id: &str) {
        self.unsettled.remove(id);
        let Some(t) = self.tasks.remove(id) else { return };
        if self.changed.remove(id) {
            if self.evicted.len() < MAX_TASKS {
                self.evicted.push(t);
            } else {
                tracing::warn!(task = %id, "monitor: a task changed faster than the history is written; its change is lost");
            }
        }
    }

    /// Folds one task event into its record.
    fn fold(&mut self, id: &str, event: &str, kind: &str, host: String, ts: f64, e: &Value) {
        let t = self.tasks.entry(id.to_owned()).or_default();
        t.id = id.to_owned();
        t.hostname = host;
        if event == "progress" {
            // A report per step: the latest only, not the timeline (a long task reports thousands).
            if t.state.is_empty() || !is_final(&t.state) {
                t.state = text(&e["state"]);
                t.progress = Progress::from_meta(&e["meta"]);
            }
            return;
        }
        t.timeline.push((kind.to_owned(), ts));
        match event {
            "received" => {
                t.name = text(&e["name"]);
                t.args = text(&e["args"]);
                t.kwargs = text(&e["kwargs"]);
                t.retries = e["retries"].as_u64().unwrap_or(0);
                t.received = ts;
                if t.state.is_empty() {
                    t.state = "RECEIVED".into();
                }
            }
            "started" => t.state = "STARTED".into(),
            "succeeded" => {
                t.state = "SUCCESS".into();
                t.result = Some(text(&e["result"]));
                t.runtime = e["runtime"].as_f64();
                self.count(ts, true);
            }
            "failed" | "retried" => {
                t.state = if event == "failed" { "FAILURE" } else { "RETRY" }.into();
                t.exception = Some(text(&e["exception"]));
                t.traceback = e["traceback"].as_str().map(str::to_owned);
                if event == "failed" {
                    self.count(ts, false);
                }
            }
            "revoked" => t.state = "REVOKED".into(),
            "rejected" => t.state = "REJECTED".into(),
            _ => {}
        }
    }

    fn count(&mut self, ts: f64, ok: bool) {
        let sec = ts as i64;
        match self.throughput.back_mut() {
            Some(last) if last.0 == sec => {
                if ok {
                    last.1 += 1
                } else {
                    last.2 += 1
                }
            }
            _ => self.throughput.push_back((sec, ok as u64, (!ok) as u64)),
        }
        while self.throughput.front().is_some_and(|f| f.0 < sec - WINDOW as i64) {
            self.throughput.pop_front();
        }
    }

    /// Every known worker, by name.
    pub fn workers(&self) -> Vec<WorkerView> {
        let mut w: Vec<_> = self.workers.values().cloned().collect();
        w.sort_by(|a, b| a.hostname.cmp(&b.hostname));
        w
    }

    /// The tasks changed since the last call (at most `max`; the rest stay marked), as they are now.
    pub fn take_changed(&mut self, max: usize) -> Vec<TaskRecord> {
        let mut out: Vec<TaskRecord> = self.evicted.drain(..self.evicted.len().min(max)).collect();
        let ids: Vec<String> = self.changed.iter().take(max - out.len()).cloned().collect();
        out.extend(ids.into_iter().filter_map(|id| {
            self.changed.remove(&id);
            self.tasks.get(&id).cloned()
        }));
        out
    }

    /// Task events folded in so far.
    pub fn events(&self) -> u64 {
        self.events
    }

    /// At most `max` unfinished tasks whose result is due for a look at `now` (seconds since the
    /// epoch); each is due again later (5 s, 10 s, 20 s, ... at most 5 minutes), unless
    /// [`MonitorState::settle`] settles it, and is given up after 16 looks.
    pub fn due_checks(&mut self, now: f64, max: usize) -> Vec<String> {
        let due: Vec<String> =
            self.unsettled.iter().filter(|(_, c)| c.due <= now).take(max).map(|(id, _)| id.clone()).collect();
        for id in &due {
            if let Some(c) = self.unsettled.get_mut(id) {
                c.tries += 1;
                c.due = now + (5.0 * f64::from(1u32 << c.tries.min(10))).min(SETTLE_PAUSE_MAX);
                if c.tries >= SETTLE_TRIES {
                    self.unsettled.remove(id);
                }
            }
        }
        due
    }

    /// Unfinished tasks the monitor still looks at.
    pub fn unsettled_len(&self) -> usize {
        self.unsettled.len()
    }

    /// Takes the result backend's document of a task whose events left it unfinished: a final
    /// state there (SUCCESS, FAILURE, REVOKED, REJECTED) becomes the task's, with its result or
    /// error (and its name and worker, when the events had not said them). True when it did.
    pub fn settle(&mut self, meta: &TaskMeta) -> bool {
        let state = meta.status.as_str();
        if !is_final(state) {
            return false;
        }
        let Some(t) = self.tasks.get_mut(&meta.task_id) else { return false };
        if is_final(&t.state) {
            return false;
        }
        t.state = state.to_owned();
        if state == "SUCCESS" {
            t.result = Some(meta.result.to_string());
        } else {
            t.exception = Some(match meta.exception() {
                Some((kind, message)) => format!("{kind}: {message}"),
                None => text(&meta.result),
            });
            t.traceback = meta.traceback.clone();
        }
        if t.name.is_empty() {
            t.name = meta.name.clone().unwrap_or_default();
        }
        if t.hostname.is_empty() {
            t.hostname = meta.worker.clone().unwrap_or_default();
        }
        self.unsettled.remove(&meta.task_id);
        self.changed.insert(meta.task_id.clone());
        true
    }

    /// Takes back tasks whose write failed: the next flush writes them (as they are by then).
    pub fn give_back(&mut self, batch: Vec<TaskRecord>) {
        for t in batch {
            if self.tasks.contains_key(&t.id) {
                self.changed.insert(t.id);
            } else if self.evicted.len() < MAX_TASKS {
                self.evicted.push(t);
            }
        }
    }

    /// Tasks changed and not written yet.
    pub fn changed_len(&self) -> usize {
        self.changed.len()
    }

    /// Adds tasks read back from the history store (newest first), older than what is known, so
    /// that a restarted monitor shows them; events seen since it started win.
    pub fn seed(&mut self, newest_first: Vec<TaskRecord>) {
        for t in newest_first {
            if self.order.len() >= MAX_TASKS || self.tasks.contains_key(&t.id) {
                continue;
            }
            self.order.push_front(t.id.clone());
            if !is_final(&t.state) {
                // Left unfinished by an earlier monitor: its result may say more now.
                self.unsettled.insert(t.id.clone(), Check { due: 0.0, tries: 0 });
            }
            self.tasks.insert(t.id.clone(), t);
        }
    }

    /// The newest tasks first, at most `limit`, whose id, name or state contains `search`.
    pub fn tasks(&self, search: &str, limit: usize) -> Vec<TaskRecord> {
        let s = search.to_lowercase();
        self.order
            .iter()
            .rev()
            .filter_map(|id| self.tasks.get(id))
            .filter(|t| {
                s.is_empty()
                    || t.id.contains(&s)
                    || t.name.to_lowercase().contains(&s)
                    || t.state.to_lowercase().contains(&s)
            })
            .take(limit)
            .cloned()
            .collect()
    }

    /// One task.
    pub fn task(&self, id: &str) -> Option<TaskRecord> {
        self.tasks.get(id).cloned()
    }

    /// Tasks per second over the window: (second, succeeded, failed).
    pub fn throughput(&self) -> Vec<(i64, u64, u64)> {
        self.throughput.iter().copied().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn events_fold_into_workers_tasks_and_throughput() {
        let mut m = MonitorState::default();
        m.apply(&json!({"type": "worker-online", "hostname": "w1", "timestamp": 100.0, "sw_ident": "celery-rs", "sw_ver": "0.1.0"}));
        m.apply(&json!({"type": "task-received", "uuid": "t1", "name": "add", "args": "[1, 2]", "hostname": "w1", "timestamp": 100.1}));
        m.apply(&json!({"type": "task-started", "uuid": "t1", "hostname": "w1", "timestamp": 100.2}));
        m.apply(&json!({"type": "task-succeeded", "uuid": "t1", "result": "3", "runtime": 0.1, "hostname": "w1", "timestamp": 100.3}));
        m.apply(&json!({"type": "task-received", "uuid": "t2", "name": "boom", "hostname": "w1", "timestamp": 100.4}));
        m.apply(&json!({"type": "task-failed", "uuid": "t2", "exception": "ValueError: no", "hostname": "w1", "timestamp": 100.5}));
        m.apply(
            &json!({"type": "worker-heartbeat", "hostname": "w1", "timestamp": 101.0, "active": 0, "processed": 2}),
        );
        let w = &m.workers()[0];
        assert!(w.online && w.processed == 2 && w.software == "celery-rs 0.1.0");
        let tasks = m.tasks("", 10);
        assert_eq!(tasks.iter().map(|t| t.id.as_str()).collect::<Vec<_>>(), ["t2", "t1"]);
        assert_eq!(m.task("t1").unwrap().timeline.len(), 3);
        assert_eq!(m.tasks("fail", 10).len(), 1);
        assert_eq!(m.throughput(), [(100, 1, 1)]);
        m.apply(&json!({"type": "worker-offline", "hostname": "w1", "timestamp": 102.0}));
        assert!(!m.workers()[0].online);
    }

    #[test]
    fn each_changed_task_is_taken_once_and_seeded_ones_come_after_live_ones() {
        let mut m = MonitorState::default();
        for kind in ["task-received", "task-started", "task-succeeded"] {
            m.apply(&json!({"type": kind, "uuid": "t1", "name": "add", "hostname": "w1", "timestamp": 10.0}));
        }
        m.apply(&json!({"type": "task-received", "uuid": "t2", "name": "add", "hostname": "w1", "timestamp": 11.0}));
        let mut taken: Vec<String> = m.take_changed(1).into_iter().map(|t| t.id).collect();
        taken.extend(m.take_changed(10).into_iter().map(|t| t.id));
        taken.sort();
        assert_eq!(taken, ["t1", "t2"]);
        assert!(m.take_changed(10).is_empty(), "nothing changed since");
        let t1 = m.task("t1").unwrap();
        m.give_back(vec![t1]);
        assert_eq!(m.changed_len(), 1);
        let old = TaskRecord { id: "t0".into(), name: "old".into(), received: 1.0, ..TaskRecord::default() };
        let t1_stale = TaskRecord { id: "t1".into(), state: "RECEIVED".into(), ..TaskRecord::default() };
        m.seed(vec![t1_stale, old]);
        let ids: Vec<String> = m.tasks("", 10).into_iter().map(|t| t.id).collect();
        assert_eq!(ids, ["t2", "t1", "t0"]);
        assert_eq!(m.task("t1").unwrap().state, "SUCCESS", "what was seen live wins");
    }

    #[test]
    fn a_task_left_unfinished_by_its_events_is_settled_from_its_result() {
        let mut m = MonitorState::default();
        m.apply(&json!({"type": "task-received", "uuid": "t1", "name": "add", "hostname": "w1", "timestamp": 100.0}));
        m.apply(&json!({"type": "task-succeeded", "uuid": "t2", "result": "1", "hostname": "w1", "timestamp": 100.0}));
        assert!(m.due_checks(100.0 + SETTLE_AFTER - 0.1, 10).is_empty(), "not before its last event settled");
        assert_eq!(m.due_checks(100.0 + SETTLE_AFTER, 10), ["t1"], "a finished task is never looked at");
        assert!(m.due_checks(100.0 + SETTLE_AFTER + 1.0, 10).is_empty(), "looked at again later, not at once");
        assert_eq!(m.due_checks(100.0 + SETTLE_AFTER + 10.0, 10), ["t1"]);
        m.take_changed(10);
        let pending = TaskMeta::new("t1", celery_core::TaskState::Started, Value::Null);
        assert!(!m.settle(&pending), "not final there either");
        let done = TaskMeta { name: Some("other".into()), ..TaskMeta::success("t1", json!(42)) };
        assert!(m.settle(&done));
        let t = m.task("t1").unwrap();
        assert_eq!((t.state.as_str(), t.result.as_deref(), t.name.as_str()), ("SUCCESS", Some("42"), "add"));
        assert_eq!(m.take_changed(10).len(), 1, "settled: written at the next flush");
        assert_eq!(m.unsettled_len(), 0);
        let err = celery_core::TaskError::new("ValueError", "no");
        assert!(!m.settle(&TaskMeta::error("t1", celery_core::TaskState::Failure, &err)), "final stays");
        // A task known only from a late event gets its name and worker from the result.
        m.apply(&json!({"type": "task-started", "uuid": "t3", "timestamp": 200.0}));
        let failed = TaskMeta {
            name: Some("boom".into()),
            worker: Some("w2".into()),
            ..TaskMeta::error("t3", celery_core::TaskState::Failure, &err)
        };
        assert!(m.settle(&failed));
        let t = m.task("t3").unwrap();
        assert_eq!(
            (t.state.as_str(), t.exception.as_deref(), t.name.as_str()),
            ("FAILURE", Some("ValueError: no"), "boom")
        );
    }

    #[test]
    fn an_unfinished_task_is_given_up_after_its_looks() {
        let mut m = MonitorState::default();
        m.apply(&json!({"type": "task-received", "uuid": "t1", "timestamp": 0.0}));
        let looks = (0..100).filter(|i| !m.due_checks(f64::from(*i) * 1000.0, 10).is_empty()).count();
        assert_eq!(looks, SETTLE_TRIES as usize);
        assert_eq!(m.unsettled_len(), 0);
    }

    #[test]
    fn a_changed_task_pushed_out_of_memory_is_still_written() {
        let mut m = MonitorState::default();
        for i in 0..MAX_TASKS + 5 {
            m.apply(&json!({"type": "task-received", "uuid": format!("t{i}"), "timestamp": 1.0}));
        }
        assert!(m.task("t0").is_none(), "out of memory");
        let mut taken = HashSet::new();
        loop {
            let batch = m.take_changed(1000);
            if batch.is_empty() {
                break;
            }
            taken.extend(batch.into_iter().map(|t| t.id));
        }
        assert_eq!(taken.len(), MAX_TASKS + 5);
        // A failed write of a task no longer in memory is given back whole.
        let gone = TaskRecord { id: "t0".into(), state: "RECEIVED".into(), ..TaskRecord::default() };
        m.give_back(vec![gone.clone()]);
        assert_eq!(m.take_changed(10), [gone]);
    }

    #[test]
    fn progress_reports_show_the_latest_until_the_task_ends() {
        let mut m = MonitorState::default();
        m.apply(&json!({"type": "task-started", "uuid": "p", "hostname": "w1", "timestamp": 1.0}));
        for done in 1..=3 {
            let meta = json!({"done": done, "total": 10});
            m.apply(
                &json!({"type": "task-progress", "uuid": "p", "state": "PROGRESS", "meta": meta, "timestamp": 2.0}),
            );
        }
        let t = m.task("p").unwrap();
        assert_eq!((t.state.as_str(), t.progress), ("PROGRESS", Some(Progress { done: 3, total: Some(10) })));
        assert_eq!(t.timeline.len(), 1, "reports stay out of the timeline");
        m.apply(&json!({"type": "task-succeeded", "uuid": "p", "result": "10", "timestamp": 3.0}));
        let late =
            json!({"type": "task-progress", "uuid": "p", "state": "PROGRESS", "meta": {"done": 9}, "timestamp": 2.5});
        m.apply(&late);
        assert_eq!(m.task("p").unwrap().state, "SUCCESS");
    }
}

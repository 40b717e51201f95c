//! What the dashboard knows, folded from Celery's events: workers, the latest tasks with their
//! timelines, and per-second throughput over the last ten minutes. Each task changed since the
//! last [`MonitorState::take_changed`] is marked, so the monitor writes it to its history store at
//! most once per flush however many events it had.

use std::collections::{HashMap, HashSet, VecDeque};

use celery_core::history::TaskRecord;
use celery_core::progress::Progress;
use serde::Serialize;
use serde_json::Value;

/// Tasks kept (the oldest are forgotten first).
const MAX_TASKS: usize = 10_000;
/// Seconds of throughput kept.
const WINDOW: usize = 600;

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
    /// (second, succeeded, failed), oldest first.
    throughput: VecDeque<(i64, u64, u64)>,
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
        if !self.tasks.contains_key(id) {
            self.order.push_back(id.to_owned());
            if self.order.len() > MAX_TASKS {
                if let Some(old) = self.order.pop_front() {
                    self.tasks.remove(&old);
                    self.changed.remove(&old);
                }
            }
        }
        self.changed.insert(id.to_owned());
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
        let ids: Vec<String> = self.changed.iter().take(max).cloned().collect();
        ids.into_iter()
            .filter_map(|id| {
                self.changed.remove(&id);
                self.tasks.get(&id).cloned()
            })
            .collect()
    }

    /// Marks tasks changed again (their write failed): the next flush writes them.
    pub fn mark_changed(&mut self, ids: impl IntoIterator<Item = String>) {
        self.changed.extend(ids.into_iter().filter(|id| self.tasks.contains_key(id)));
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
        m.mark_changed(["t1".to_owned(), "unknown".to_owned()]);
        assert_eq!(m.changed_len(), 1);
        let old = TaskRecord { id: "t0".into(), name: "old".into(), received: 1.0, ..TaskRecord::default() };
        let t1_stale = TaskRecord { id: "t1".into(), state: "RECEIVED".into(), ..TaskRecord::default() };
        m.seed(vec![t1_stale, old]);
        let ids: Vec<String> = m.tasks("", 10).into_iter().map(|t| t.id).collect();
        assert_eq!(ids, ["t2", "t1", "t0"]);
        assert_eq!(m.task("t1").unwrap().state, "SUCCESS", "what was seen live wins");
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

//! Beat entries: what to send and when, from code, from a TOML schedule file, or added at run time.
//!
//! ```
//! use celery_worker::beat::{Entry, Missed};
//! use celery_core::{schedule::Schedule, Signature};
//! use std::time::Duration;
//!
//! let e = Entry::new("cleanup", Signature::by_name("cleanup").queue("maintenance"), Schedule::every(Duration::from_secs(3600)))
//!     .missed(Missed::Skip)
//!     .expires_after(Duration::from_secs(600));
//! assert_eq!(e.name, "cleanup");
//!
//! let file = r#"
//! [[entry]]
//! name = "report"
//! task = "reports.daily"
//! crontab = "0 7 * * mon-fri"
//! timezone = "Europe/Berlin"
//! args = [1]
//! queue = "reports"
//! "#;
//! let entries = celery_worker::beat::parse_schedule_file(file).unwrap();
//! assert_eq!(entries[0].schedule.to_string(), "crontab `0 7 * * mon-fri` (Europe/Berlin)");
//! ```

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use celery_core::schedule::{Schedule, ScheduleError, ScheduleSpec};
use celery_core::Signature;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::BeatError;

/// What to do with due times that passed while no beat was running (or leading).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Missed {
    /// Send once now for all of them (Celery's behaviour).
    #[default]
    RunOnce,
    /// Send none of them; wait for the next due time.
    Skip,
}

/// Where an entry was declared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// `#[task(schedule = ...)]` or [`Beat::entry`](super::Beat::entry).
    Code,
    /// The schedule file.
    File,
    /// `beat add` at run time (kept in beat's stored state).
    Runtime,
}

/// One periodic job.
#[derive(Debug, Clone)]
pub struct Entry {
    /// Unique among the beat's entries; logged with every send.
    pub name: String,
    /// The task and its arguments and options (queue, priority, ...).
    pub sig: Signature,
    /// When it is due.
    pub schedule: Schedule,
    /// What to do with runs missed while beat was down.
    pub missed: Missed,
    /// Each sent task expires (is revoked unrun) this long after it was sent.
    pub expires_after: Option<Duration>,
    /// Where it was declared.
    pub source: Source,
}

impl Entry {
    /// An entry sending `sig` on `schedule`.
    pub fn new(name: impl Into<String>, sig: Signature, schedule: Schedule) -> Entry {
        Entry { name: name.into(), sig, schedule, missed: Missed::default(), expires_after: None, source: Source::Code }
    }

    /// Sets the missed-run policy.
    pub fn missed(mut self, policy: Missed) -> Entry {
        self.missed = policy;
        self
    }

    /// Makes each sent task expire `d` after it was sent.
    pub fn expires_after(mut self, d: Duration) -> Entry {
        self.expires_after = Some(d);
        self
    }

    /// The signature to send now.
    pub(crate) fn signature(&self) -> Signature {
        match self.expires_after {
            Some(d) => self.sig.clone().expires_in(d),
            None => self.sig.clone(),
        }
    }

    /// The serializable form.
    pub fn spec(&self) -> EntrySpec {
        let s = self.schedule.spec();
        let o = &self.sig.options;
        EntrySpec {
            name: self.name.clone(),
            task: self.sig.task.clone(),
            args: Value::Array(self.sig.args.clone()),
            kwargs: Value::Object(self.sig.kwargs.clone()),
            schedule: s,
            queue: o.queue.clone(),
            priority: o.priority,
            expires: self.expires_after.map(|d| d.as_secs_f64()),
            missed: self.missed,
            unknown: BTreeMap::new(),
        }
    }
}

/// An entry as written in a schedule file (`[[entry]]` tables) or given to `beat add`: the task,
/// its options, and the fields of a [`ScheduleSpec`] (`every`, `crontab`, `timezone`, `at`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EntrySpec {
    /// The entry's name.
    pub name: String,
    /// The task's registered name.
    pub task: String,
    /// Positional arguments (a JSON/TOML array).
    #[serde(default = "empty_array")]
    pub args: Value,
    /// Keyword arguments (a table).
    #[serde(default = "empty_object")]
    pub kwargs: Value,
    /// When: `every`, `crontab` (with `timezone`) or `at`.
    #[serde(flatten)]
    pub schedule: ScheduleSpec,
    /// The queue (default: the task's, else `celery`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue: Option<String>,
    /// Priority 0-9.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<u8>,
    /// Seconds after sending at which each task expires.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires: Option<f64>,
    /// `run-once` (default) or `skip`.
    #[serde(default)]
    pub missed: Missed,
    /// Fields no entry has (a typo): refused by [`EntrySpec::build`]. (Serde cannot
    /// `deny_unknown_fields` next to a flattened struct.)
    #[serde(flatten, skip_serializing_if = "BTreeMap::is_empty")]
    pub unknown: BTreeMap<String, Value>,
}

fn empty_array() -> Value {
    Value::Array(Vec::new())
}

fn empty_object() -> Value {
    Value::Object(Default::default())
}

impl EntrySpec {
    /// Checks the spec and builds the entry.
    pub fn build(&self, source: Source) -> Result<Entry, BeatError> {
        let bad = |reason: String| BeatError::Entry { name: self.name.clone(), reason };
        if let Some(field) = self.unknown.keys().next() {
            return Err(bad(format!("unknown field `{field}`")));
        }
        if self.name.trim().is_empty() {
            return Err(bad("the name is empty".into()));
        }
        if self.task.trim().is_empty() {
            return Err(bad("`task` is empty".into()));
        }
        if !self.args.is_array() {
            return Err(bad("`args` must be an array".into()));
        }
        if !self.kwargs.is_object() {
            return Err(bad("`kwargs` must be a table/object".into()));
        }
        let schedule = self.schedule.build().map_err(|e: ScheduleError| bad(e.to_string()))?;
        let mut sig = Signature::by_name(&self.task).args(self.args.clone()).kwargs(self.kwargs.clone());
        if let Some(q) = &self.queue {
            sig = sig.queue(q.clone());
        }
        if let Some(p) = self.priority {
            if p > 9 {
                return Err(bad(format!("priority {p} is not in 0-9")));
            }
            sig = sig.priority(p);
        }
        let expires_after = match self.expires {
            Some(s) if s > 0.0 => Some(celery_core::clock::secs_f64(s)),
            Some(s) => return Err(bad(format!("`expires` must be a positive number of seconds, not {s}"))),
            None => None,
        };
        Ok(Entry { name: self.name.clone(), sig, schedule, missed: self.missed, expires_after, source })
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ScheduleFile {
    #[serde(default)]
    entry: Vec<EntrySpec>,
}

/// Parses a TOML schedule file's text: `[[entry]]` tables with the fields of [`EntrySpec`].
pub fn parse_schedule_file(text: &str) -> Result<Vec<Entry>, BeatError> {
    let file: ScheduleFile = toml::from_str(text).map_err(|e| BeatError::File(e.to_string()))?;
    file.entry.iter().map(|s| s.build(Source::File)).collect()
}

/// Reads and parses a TOML schedule file.
pub fn load_schedule_file(path: &Path) -> Result<Vec<Entry>, BeatError> {
    let text =
        std::fs::read_to_string(path).map_err(|e| BeatError::File(format!("cannot read {}: {e}", path.display())))?;
    parse_schedule_file(&text).map_err(|e| match e {
        BeatError::File(m) => BeatError::File(format!("{}: {m}", path.display())),
        other => other,
    })
}

/// The entries of every `#[task(schedule = ...)]` in this binary.
pub fn code_entries() -> Result<Vec<Entry>, BeatError> {
    celery_core::schedule::scheduled_tasks()
        .into_iter()
        .map(|t| {
            let schedule =
                (t.schedule)().map_err(|e| BeatError::Entry { name: t.task.to_owned(), reason: e.to_string() })?;
            Ok(Entry::new(t.task, Signature::by_name(t.task), schedule))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_errors_are_specific() {
        let typo = "[[entry]]\nname = \"a\"\ntask = \"t\"\nevery = 5\nqueeu = \"x\"\n";
        let e = parse_schedule_file(typo).unwrap_err().to_string();
        assert!(e.contains("queeu"), "{e}");
        let two = "[[entry]]\nname = \"a\"\ntask = \"t\"\nevery = 5\ncrontab = \"* * * * *\"\n";
        let e = parse_schedule_file(two).unwrap_err().to_string();
        assert!(e.contains("only one"), "{e}");
        let none = "[[entry]]\nname = \"a\"\ntask = \"t\"\n";
        assert!(parse_schedule_file(none).unwrap_err().to_string().contains("no schedule"));
        let prio = "[[entry]]\nname = \"a\"\ntask = \"t\"\nevery = \"1m\"\npriority = 12\n";
        assert!(parse_schedule_file(prio).unwrap_err().to_string().contains("priority"));
    }

    #[test]
    fn specs_round_trip() {
        let text = "[[entry]]\nname = \"a\"\ntask = \"t\"\nevery = \"90s\"\nargs = [1, \"x\"]\nkwargs = { k = true }\n\
                    queue = \"q\"\npriority = 3\nexpires = 30\nmissed = \"skip\"\n";
        let e = &parse_schedule_file(text).unwrap()[0];
        assert_eq!(e.missed, Missed::Skip);
        assert_eq!(e.expires_after, Some(Duration::from_secs(30)));
        assert_eq!(e.sig.options.queue.as_deref(), Some("q"));
        let json = serde_json::to_string(&e.spec()).unwrap();
        let back: EntrySpec = serde_json::from_str(&json).unwrap();
        assert_eq!(back, e.spec());
        assert_eq!(back.build(Source::Runtime).unwrap().schedule.to_string(), "every 1m 30s");
    }
}

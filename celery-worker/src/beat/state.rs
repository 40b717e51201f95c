//! Beat's stored state (one document in the broker, written by the leader only) and the decision
//! of what an entry does at a given time.
//!
//! Each entry keeps an *anchor*: the due time it last handled (sent or skipped), or the time it was
//! first seen. The next due time is the schedule's first time after the anchor, so a restarted beat
//! (or a new leader) continues from where the last one stopped: it neither repeats a sent run nor
//! skips one that became due while it was down (the entry's [`Missed`] policy decides those).

use std::collections::BTreeMap;
use std::time::Duration;

use celery_core::schedule::Schedule;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::entry::{EntrySpec, Missed, Source};

/// The stored document.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct BeatState {
    /// Per entry name.
    #[serde(default)]
    pub entries: BTreeMap<String, EntryState>,
    /// Entries added with `beat add`.
    #[serde(default)]
    pub runtime: Vec<EntrySpec>,
    /// The holder that wrote this document last.
    #[serde(default)]
    pub leader: String,
    /// When it was written.
    #[serde(default)]
    pub written_at: Option<DateTime<Utc>>,
}

/// One entry's progress (and, for `beat list`, what it is).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EntryState {
    /// The last due time handled, or when the entry was first seen.
    pub anchor: DateTime<Utc>,
    /// The next due time (none: a one-off that ran).
    #[serde(default)]
    pub next: Option<DateTime<Utc>>,
    /// When the last task was sent, and its id.
    #[serde(default)]
    pub last_sent: Option<DateTime<Utc>>,
    /// The last sent task's id.
    #[serde(default)]
    pub last_id: Option<String>,
    /// Tasks sent so far.
    #[serde(default)]
    pub total: u64,
    /// The task name.
    #[serde(default)]
    pub task: String,
    /// The schedule, as text.
    #[serde(default)]
    pub schedule: String,
    /// Where the entry was declared.
    #[serde(default = "runtime_source")]
    pub source: Source,
}

fn runtime_source() -> Source {
    Source::Runtime
}

/// What an entry does now.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Step {
    /// Nothing until this time.
    Wait(DateTime<Utc>),
    /// Send now for the due time `due` (the new anchor); `folded` earlier due times were missed and
    /// are covered by this send.
    Send { due: DateTime<Utc>, folded: u64 },
    /// Send nothing; move the anchor to `to`, skipping `skipped` missed due times.
    Skip { to: DateTime<Utc>, skipped: u64 },
    /// Never due again.
    Done,
}

/// The anchor of an entry seen for the first time at `now`: intervals and crontabs count from now
/// (an interval's first run is one interval later, as in Celery); a one-off counts from before its
/// time, so a one-off whose time has passed is a missed run.
pub(crate) fn first_anchor(schedule: &Schedule, now: DateTime<Utc>) -> DateTime<Utc> {
    match schedule {
        Schedule::At(t) => (*t - chrono::Duration::milliseconds(1)).min(now),
        _ => now,
    }
}

/// Decides for one entry. A due time at most `late_after` old is on time and sent; older ones were
/// missed (beat was down or not leading) and follow `missed`.
pub(crate) fn step(
    schedule: &Schedule,
    missed: Missed,
    anchor: DateTime<Utc>,
    now: DateTime<Utc>,
    late_after: Duration,
) -> Step {
    let late = chrono::Duration::from_std(late_after).unwrap_or(chrono::Duration::MAX);
    let Some(due) = schedule.next_after(anchor) else { return Step::Done };
    if due > now {
        return Step::Wait(due);
    }
    if now - due <= late {
        return Step::Send { due, folded: 0 };
    }
    let Some((latest, before)) = schedule.latest_due(anchor, now) else { return Step::Wait(due) };
    match missed {
        Missed::RunOnce => Step::Send { due: latest, folded: before },
        Missed::Skip if now - latest <= late => Step::Send { due: latest, folded: 0 },
        Missed::Skip => Step::Skip { to: latest, skipped: before + 1 },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn t(s: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 6, 1, 12, 0, 0).unwrap() + chrono::Duration::seconds(s as i64)
    }

    const LATE: Duration = Duration::from_secs(5);

    #[test]
    fn on_time_runs_are_sent_once_each() {
        let every = Schedule::every(Duration::from_secs(10));
        assert_eq!(step(&every, Missed::RunOnce, t(0), t(9), LATE), Step::Wait(t(10)));
        assert_eq!(step(&every, Missed::RunOnce, t(0), t(10), LATE), Step::Send { due: t(10), folded: 0 });
        // The anchor moves to the due time: asking again at the same moment waits (no repeat).
        assert_eq!(step(&every, Missed::RunOnce, t(10), t(10), LATE), Step::Wait(t(20)));
        // A short stop (restart within the grace): the run that fell due meanwhile is still sent.
        assert_eq!(step(&every, Missed::Skip, t(10), t(23), LATE), Step::Send { due: t(20), folded: 0 });
    }

    #[test]
    fn runs_missed_while_down_follow_the_policy() {
        let every = Schedule::every(Duration::from_secs(10));
        // Down from 10 to 57: due 20, 30, 40, 50 passed.
        assert_eq!(step(&every, Missed::RunOnce, t(10), t(57), LATE), Step::Send { due: t(50), folded: 3 });
        assert_eq!(step(&every, Missed::Skip, t(10), t(57), LATE), Step::Skip { to: t(50), skipped: 4 });
        // Skip still sends the latest one when it is on time.
        assert_eq!(step(&every, Missed::Skip, t(10), t(52), LATE), Step::Send { due: t(50), folded: 0 });
    }

    #[test]
    fn one_offs() {
        let at = Schedule::at(t(100));
        assert_eq!(step(&at, Missed::RunOnce, first_anchor(&at, t(0)), t(0), LATE), Step::Wait(t(100)));
        // First seen after its time: a missed run.
        let anchor = first_anchor(&at, t(200));
        assert_eq!(step(&at, Missed::RunOnce, anchor, t(200), LATE), Step::Send { due: t(100), folded: 0 });
        assert!(matches!(step(&at, Missed::Skip, anchor, t(200), LATE), Step::Skip { .. }));
        assert_eq!(step(&at, Missed::RunOnce, t(100), t(300), LATE), Step::Done);
    }

    #[test]
    fn crontab_after_a_long_outage() {
        let hourly = Schedule::crontab("0 * * * *").unwrap();
        let anchor = Utc.with_ymd_and_hms(2026, 6, 1, 0, 0, 0).unwrap();
        let now = Utc.with_ymd_and_hms(2026, 6, 2, 0, 30, 0).unwrap();
        assert_eq!(
            step(&hourly, Missed::RunOnce, anchor, now, LATE),
            Step::Send { due: Utc.with_ymd_and_hms(2026, 6, 2, 0, 0, 0).unwrap(), folded: 23 }
        );
    }
}

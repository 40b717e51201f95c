//! When a periodic job runs: a fixed interval, a crontab in a time zone, or once at a time.
//!
//! ```
//! use celery_core::schedule::Schedule;
//! use chrono::{TimeZone, Utc};
//!
//! let every = Schedule::every(std::time::Duration::from_secs(10));
//! let t = Utc.with_ymd_and_hms(2026, 1, 1, 12, 0, 0).unwrap();
//! assert_eq!(every.next_after(t), Some(t + chrono::Duration::seconds(10)));
//!
//! // Five fields (minute granularity) or six (seconds first); time zones handle DST.
//! let cron = Schedule::crontab("0 7 * * mon-fri").unwrap().in_timezone("Europe/Berlin").unwrap();
//! assert_eq!(cron.next_after(t), Some(Utc.with_ymd_and_hms(2026, 1, 2, 6, 0, 0).unwrap()));
//! assert!(Schedule::crontab("61 * * * *").is_err());
//! ```
//!
//! Tasks declare one with `#[task(schedule = ...)]`, which accepts a [`Schedule`], a
//! `Result<Schedule, ScheduleError>` (as [`Schedule::crontab`] returns) or a crontab string.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use croner::parser::{CronParser, Seconds};
use croner::Cron;
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// A schedule that cannot be built.
#[derive(Debug, Error, Clone, PartialEq)]
#[non_exhaustive]
pub enum ScheduleError {
    /// The crontab expression does not parse.
    #[error("invalid crontab `{expr}`: {reason}")]
    Crontab {
        /// The expression as given.
        expr: String,
        /// What the parser said.
        reason: String,
    },
    /// The time zone is not an IANA name.
    #[error("unknown time zone `{0}` (expected an IANA name like `Europe/Berlin`)")]
    TimeZone(String),
    /// The interval is zero or does not parse.
    #[error("invalid interval `{0}` (expected seconds or a duration like `90s`, `5m`, `1h 30m`)")]
    Interval(String),
    /// The spec names no schedule, or more than one.
    #[error("{0}")]
    Spec(String),
}

/// When a periodic job is due.
#[derive(Clone)]
pub enum Schedule {
    /// Every `Duration`, measured from the previous due time (no drift).
    Every(Duration),
    /// A crontab expression evaluated in a time zone.
    Crontab {
        /// The expression as given.
        expr: String,
        /// The zone its fields are read in.
        tz: Tz,
        /// The parsed expression.
        cron: Box<Cron>,
    },
    /// Once, at this time.
    At(DateTime<Utc>),
}

impl fmt::Debug for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self}")
    }
}

impl fmt::Display for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Schedule::Every(d) => write!(f, "every {}", humantime::format_duration(*d)),
            Schedule::Crontab { expr, tz, .. } => write!(f, "crontab `{expr}` ({tz})"),
            Schedule::At(t) => write!(f, "once at {}", t.to_rfc3339()),
        }
    }
}

impl Schedule {
    /// Every `d` (at least one millisecond).
    pub fn every(d: Duration) -> Schedule {
        Schedule::Every(d.max(Duration::from_millis(1)))
    }

    /// A crontab: five fields (`min hour dom mon dow`) or six with seconds first, plus croner's
    /// extensions (`L`, `W`, `#`, names, `@daily`). Read in UTC until [`Schedule::in_timezone`].
    pub fn crontab(expr: &str) -> Result<Schedule, ScheduleError> {
        let cron = CronParser::builder()
            .seconds(Seconds::Optional)
            .build()
            .parse(expr)
            .map_err(|e| ScheduleError::Crontab { expr: expr.to_owned(), reason: e.to_string() })?;
        Ok(Schedule::Crontab { expr: expr.to_owned(), tz: Tz::UTC, cron: Box::new(cron) })
    }

    /// Reads a crontab's fields in the IANA zone `tz` (DST-aware: a time skipped by a spring-forward
    /// runs at the first instant after the gap; a time repeated by a fall-back runs once).
    /// Other schedules are returned unchanged.
    pub fn in_timezone(self, tz: &str) -> Result<Schedule, ScheduleError> {
        let zone = Tz::from_str(tz).map_err(|_| ScheduleError::TimeZone(tz.to_owned()))?;
        Ok(match self {
            Schedule::Crontab { expr, cron, .. } => Schedule::Crontab { expr, tz: zone, cron },
            other => other,
        })
    }

    /// Once, at `t`.
    pub fn at(t: DateTime<Utc>) -> Schedule {
        Schedule::At(t)
    }

    /// An interval from seconds (`"90"`, `"2.5"`) or a humane duration (`"90s"`, `"5m"`, `"1h 30m"`).
    pub fn parse_interval(s: &str) -> Result<Duration, ScheduleError> {
        let s = s.trim();
        let d = match s.parse::<f64>() {
            Ok(secs) if secs.is_finite() && secs > 0.0 => crate::clock::secs_f64(secs),
            Ok(_) => return Err(ScheduleError::Interval(s.to_owned())),
            Err(_) => humantime::parse_duration(s).map_err(|_| ScheduleError::Interval(s.to_owned()))?,
        };
        if d.is_zero() {
            return Err(ScheduleError::Interval(s.to_owned()));
        }
        Ok(d)
    }

    /// The first due time strictly after `t`; `None` when it is never due again.
    pub fn next_after(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        match self {
            Schedule::Every(d) => chrono::Duration::from_std(*d).ok().and_then(|d| t.checked_add_signed(d)),
            Schedule::Crontab { tz, cron, .. } => {
                cron.find_next_occurrence(&t.with_timezone(tz), false).ok().map(|n| n.with_timezone(&Utc))
            }
            Schedule::At(at) => (*at > t).then_some(*at),
        }
    }

    /// The last due time at or before `now`, starting the count after `anchor`, and how many due
    /// times that skips over (0 when the first one after `anchor` is that last one).
    pub fn latest_due(&self, anchor: DateTime<Utc>, now: DateTime<Utc>) -> Option<(DateTime<Utc>, u64)> {
        let first = self.next_after(anchor).filter(|t| *t <= now)?;
        if let Schedule::Every(d) = self {
            let step = crate::clock::millis_i64(*d).max(1);
            let n = (now - first).num_milliseconds() / step;
            return Some((first + chrono::Duration::milliseconds(n * step), n as u64));
        }
        let (mut last, mut skipped) = (first, 0u64);
        // Bounded: a crontab due every second, missed for a day, is 86,400 steps.
        while let Some(t) = self.next_after(last).filter(|t| *t <= now) {
            last = t;
            skipped += 1;
            if skipped >= 1_000_000 {
                break;
            }
        }
        Some((last, skipped))
    }

    /// The serializable form (for schedule files and stored entries).
    pub fn spec(&self) -> ScheduleSpec {
        match self {
            Schedule::Every(d) => {
                ScheduleSpec { every: Some(humantime::format_duration(*d).to_string()), ..ScheduleSpec::default() }
            }
            Schedule::Crontab { expr, tz, .. } => ScheduleSpec {
                crontab: Some(expr.clone()),
                timezone: (*tz != Tz::UTC).then(|| tz.name().to_owned()),
                ..ScheduleSpec::default()
            },
            Schedule::At(t) => ScheduleSpec { at: Some(*t), ..ScheduleSpec::default() },
        }
    }
}

/// A schedule as written in a schedule file or a stored entry: exactly one of `every`, `crontab`
/// and `at`, and `timezone` with `crontab`.
///
/// ```
/// use celery_core::schedule::ScheduleSpec;
/// let spec: ScheduleSpec = serde_json::from_str(r#"{"crontab": "30 2 * * *", "timezone": "Europe/Berlin"}"#).unwrap();
/// assert_eq!(spec.build().unwrap().to_string(), "crontab `30 2 * * *` (Europe/Berlin)");
/// ```
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ScheduleSpec {
    /// Seconds (a number) or a duration (`"10s"`, `"1h"`).
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "interval_text")]
    pub every: Option<String>,
    /// A crontab expression.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crontab: Option<String>,
    /// The crontab's IANA time zone (default UTC).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timezone: Option<String>,
    /// Once, at this time (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at: Option<DateTime<Utc>>,
}

/// Reads an optional interval given as `10`, `2.5` or `"10s"` (for `#[serde(deserialize_with)]`).
pub fn interval_text<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Text {
        Int(u64),
        Float(f64),
        Str(String),
    }
    Ok(Option::<Text>::deserialize(d)?.map(|t| match t {
        Text::Int(i) => i.to_string(),
        Text::Float(f) => f.to_string(),
        Text::Str(s) => s,
    }))
}

impl ScheduleSpec {
    /// Builds the schedule, checking that exactly one kind is given.
    pub fn build(&self) -> Result<Schedule, ScheduleError> {
        let sched = match (&self.every, &self.crontab, &self.at) {
            (Some(e), None, None) => Schedule::every(Schedule::parse_interval(e)?),
            (None, Some(c), None) => Schedule::crontab(c)?,
            (None, None, Some(t)) => Schedule::at(*t),
            (None, None, None) => {
                return Err(ScheduleError::Spec("no schedule: give `every`, `crontab` or `at`".into()))
            }
            _ => return Err(ScheduleError::Spec("give only one of `every`, `crontab` and `at`".into())),
        };
        match (&self.timezone, &sched) {
            (Some(tz), Schedule::Crontab { .. }) => sched.in_timezone(tz),
            (Some(_), _) => Err(ScheduleError::Spec("`timezone` applies to `crontab` only".into())),
            (None, _) => Ok(sched),
        }
    }
}

/// What `#[task(schedule = ...)]` accepts.
pub trait IntoSchedule {
    /// The schedule, or why it is invalid.
    fn into_schedule(self) -> Result<Schedule, ScheduleError>;
}

impl IntoSchedule for Schedule {
    fn into_schedule(self) -> Result<Schedule, ScheduleError> {
        Ok(self)
    }
}

impl IntoSchedule for Result<Schedule, ScheduleError> {
    fn into_schedule(self) -> Result<Schedule, ScheduleError> {
        self
    }
}

impl IntoSchedule for &str {
    fn into_schedule(self) -> Result<Schedule, ScheduleError> {
        Schedule::crontab(self)
    }
}

impl IntoSchedule for Duration {
    fn into_schedule(self) -> Result<Schedule, ScheduleError> {
        Ok(Schedule::every(self))
    }
}

/// A task with a schedule attached by `#[task(schedule = ...)]`; beat runs every one linked into
/// the binary, as an entry named after the task.
#[derive(Debug)]
pub struct ScheduledTask {
    /// The task's registered name.
    pub task: &'static str,
    /// Builds its schedule.
    pub schedule: fn() -> Result<Schedule, ScheduleError>,
}

inventory::collect!(ScheduledTask);

/// Every task declared with a schedule in this binary, sorted by name.
pub fn scheduled_tasks() -> Vec<&'static ScheduledTask> {
    let mut v: Vec<_> = inventory::iter::<ScheduledTask>.into_iter().collect();
    v.sort_by_key(|s| s.task);
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn utc(y: i32, mo: u32, d: u32, h: u32, mi: u32, s: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(y, mo, d, h, mi, s).unwrap()
    }

    #[test]
    fn a_huge_interval_does_not_wrap() {
        let s = Schedule::every(Duration::MAX);
        let anchor = utc(2026, 1, 1, 0, 0, 0);
        assert_eq!(s.next_after(anchor), None, "never due again (no wrapped interval)");
        assert_eq!(Schedule::parse_interval("1e300").unwrap(), Duration::MAX, "not a panic");
        let s = Schedule::every(Duration::from_millis(u64::MAX));
        let due = s.latest_due(anchor - chrono::Duration::days(1), anchor);
        assert!(due.is_none_or(|(t, n)| t <= anchor && n == 0), "{due:?}");
    }

    #[test]
    fn every_counts_from_the_anchor() {
        let s = Schedule::every(Duration::from_secs(10));
        let a = utc(2026, 1, 1, 0, 0, 0);
        assert_eq!(s.next_after(a), Some(utc(2026, 1, 1, 0, 0, 10)));
        assert_eq!(s.latest_due(a, utc(2026, 1, 1, 0, 0, 9)), None);
        assert_eq!(s.latest_due(a, utc(2026, 1, 1, 0, 0, 10)), Some((utc(2026, 1, 1, 0, 0, 10), 0)));
        assert_eq!(s.latest_due(a, utc(2026, 1, 1, 0, 0, 45)), Some((utc(2026, 1, 1, 0, 0, 40), 3)));
    }

    #[test]
    fn crontab_five_and_six_fields() {
        let five = Schedule::crontab("0 */6 * * *").unwrap();
        assert_eq!(five.next_after(utc(2026, 3, 1, 5, 59, 59)), Some(utc(2026, 3, 1, 6, 0, 0)));
        assert_eq!(five.next_after(utc(2026, 3, 1, 6, 0, 0)), Some(utc(2026, 3, 1, 12, 0, 0)));
        let six = Schedule::crontab("*/15 * * * * *").unwrap();
        assert_eq!(six.next_after(utc(2026, 3, 1, 0, 0, 1)), Some(utc(2026, 3, 1, 0, 0, 15)));
        assert_eq!(
            six.latest_due(utc(2026, 3, 1, 0, 0, 0), utc(2026, 3, 1, 0, 1, 0)),
            Some((utc(2026, 3, 1, 0, 1, 0), 3))
        );
        let last_day = Schedule::crontab("0 0 L * *").unwrap();
        assert_eq!(last_day.next_after(utc(2026, 2, 1, 0, 0, 0)), Some(utc(2026, 2, 28, 0, 0, 0)));
    }

    #[test]
    fn crontab_errors_name_the_expression() {
        let e = Schedule::crontab("0 25 * * *").unwrap_err();
        assert!(e.to_string().contains("0 25 * * *"), "{e}");
        assert!(Schedule::crontab("whenever").is_err());
        assert_eq!(
            Schedule::crontab("0 * * * *").unwrap().in_timezone("Mars/Olympus").unwrap_err(),
            ScheduleError::TimeZone("Mars/Olympus".into())
        );
    }

    /// Europe/Berlin: 2026-03-29 02:00 CET jumps to 03:00 CEST; 2026-10-25 03:00 CEST falls back to
    /// 02:00 CET.
    #[test]
    fn crontab_across_dst_changes() {
        let daily = Schedule::crontab("30 2 * * *").unwrap().in_timezone("Europe/Berlin").unwrap();
        // Before: 02:30 CET = 01:30 UTC.
        assert_eq!(daily.next_after(utc(2026, 3, 27, 12, 0, 0)), Some(utc(2026, 3, 28, 1, 30, 0)));
        // 02:30 does not exist on the 29th: it runs at the first instant after the gap, 03:00 CEST.
        assert_eq!(daily.next_after(utc(2026, 3, 28, 12, 0, 0)), Some(utc(2026, 3, 29, 1, 0, 0)));
        // After: 02:30 CEST = 00:30 UTC.
        assert_eq!(daily.next_after(utc(2026, 3, 29, 12, 0, 0)), Some(utc(2026, 3, 30, 0, 30, 0)));
        // 02:30 happens twice on 2026-10-25 (00:30 UTC in CEST, 01:30 UTC in CET): it runs once.
        let first = daily.next_after(utc(2026, 10, 24, 12, 0, 0)).unwrap();
        assert_eq!(first, utc(2026, 10, 25, 0, 30, 0));
        assert_eq!(daily.next_after(first), Some(utc(2026, 10, 26, 1, 30, 0)));
        // An hourly job runs every real hour through both changes.
        let hourly = Schedule::crontab("0 * * * *").unwrap().in_timezone("Europe/Berlin").unwrap();
        assert_eq!(hourly.next_after(utc(2026, 3, 29, 0, 30, 0)), Some(utc(2026, 3, 29, 1, 0, 0)));
        assert_eq!(hourly.next_after(utc(2026, 10, 25, 0, 30, 0)), Some(utc(2026, 10, 25, 1, 0, 0)));
        // New York changes on other dates: 2026-03-08 and 2026-11-01.
        let ny = Schedule::crontab("0 9 * * *").unwrap().in_timezone("America/New_York").unwrap();
        assert_eq!(ny.next_after(utc(2026, 3, 7, 15, 0, 0)), Some(utc(2026, 3, 8, 13, 0, 0)));
        assert_eq!(ny.next_after(utc(2026, 10, 31, 14, 0, 0)), Some(utc(2026, 11, 1, 14, 0, 0)));
    }

    #[test]
    fn at_runs_once() {
        let t = utc(2026, 5, 1, 0, 0, 0);
        let s = Schedule::at(t);
        assert_eq!(s.next_after(utc(2026, 4, 1, 0, 0, 0)), Some(t));
        assert_eq!(s.next_after(t), None);
        assert_eq!(s.latest_due(utc(2026, 4, 1, 0, 0, 0), utc(2026, 6, 1, 0, 0, 0)), Some((t, 0)));
    }

    #[test]
    fn specs_round_trip_and_reject_ambiguity() {
        for s in [
            Schedule::every(Duration::from_secs(90)),
            Schedule::crontab("0 7 * * 1").unwrap().in_timezone("Asia/Tokyo").unwrap(),
            Schedule::at(utc(2027, 1, 1, 0, 0, 0)),
        ] {
            let json = serde_json::to_string(&s.spec()).unwrap();
            let back: ScheduleSpec = serde_json::from_str(&json).unwrap();
            assert_eq!(back.build().unwrap().to_string(), s.to_string(), "{json}");
        }
        let num: ScheduleSpec = serde_json::from_str(r#"{"every": 2.5}"#).unwrap();
        assert_eq!(
            num.build().unwrap().next_after(utc(2026, 1, 1, 0, 0, 0)),
            Some(utc(2026, 1, 1, 0, 0, 2) + chrono::Duration::milliseconds(500))
        );
        let both: ScheduleSpec = serde_json::from_str(r#"{"every": 5, "crontab": "* * * * *"}"#).unwrap();
        assert!(both.build().is_err());
        assert!(ScheduleSpec::default().build().is_err());
        let tz_on_every: ScheduleSpec = serde_json::from_str(r#"{"every": "5s", "timezone": "UTC"}"#).unwrap();
        assert!(tz_on_every.build().is_err());
        assert!(Schedule::parse_interval("0").is_err());
        assert!(Schedule::parse_interval("soon").is_err());
        assert_eq!(Schedule::parse_interval("1h 30m").unwrap(), Duration::from_secs(5400));
    }
}

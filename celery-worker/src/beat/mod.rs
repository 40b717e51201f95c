//! Beat: sends periodic tasks on schedule, with one leader among any number of beats.
//!
//! ```no_run
//! use std::time::Duration;
//! use celery_core::{schedule::Schedule, Signature};
//! use celery_worker::beat::{Beat, BeatConfig, Entry};
//!
//! # async fn demo(app: celery_core::App) -> Result<(), celery_worker::beat::BeatError> {
//! Beat::new(app, BeatConfig::default())
//!     .entry(Entry::new("ping", Signature::by_name("ping"), Schedule::every(Duration::from_secs(30))))
//!     .entry(Entry::new("report", Signature::by_name("report"), Schedule::crontab("0 7 * * *")?.in_timezone("Europe/Berlin")?))
//!     .run_until(tokio::signal::ctrl_c().map(|_| ()))
//!     .await
//! # }
//! # use futures::FutureExt;
//! ```
//!
//! How it works:
//! - **Entries** come from `#[task(schedule = ...)]` in the binary, [`Beat::entry`], a TOML schedule
//!   file ([`load_schedule_file`]) and `beat add` at run time ([`add_entry`]).
//! - **One leader**: every beat asks the broker for the lease `beat.<name>` ([`Leases::lease`]) every
//!   third of the lease time; only the holder sends. A leader that cannot renew in time stops
//!   sending; when it dies, another beat takes over within the lease time (at once on RabbitMQ,
//!   which hands the lease on when the holder's connection drops). A stopping leader releases it.
//! - **State** (each entry's last handled due time, run counts and the run-time entries) is one
//!   document in the broker ([`Documents::store_doc`]), written after every send, so a restarted or new
//!   leader neither repeats nor skips a run; runs missed while no beat led follow each entry's
//!   [`Missed`] policy.
//! - **Run-time changes** (`beat add`/`beat remove`) are messages on the queue
//!   `celery-rs.beat.<name>.control`, applied by the leader (so only the leader writes the state).
//!
//! [`Leases::lease`]: celery_core::capability::Leases::lease
//! [`Documents::store_doc`]: celery_core::capability::Documents::store_doc

mod entry;
mod state;

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::time::Duration;

use celery_core::{App, AppError, BrokerError, Delivery, Signature};
use chrono::{DateTime, Utc};
use serde_json::{json, Value};
use thiserror::Error;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

pub use entry::{code_entries, load_schedule_file, parse_schedule_file, Entry, EntrySpec, Missed, Source};
use state::{first_anchor, step, Step};
pub use state::{BeatState, EntryState};

/// A beat failure.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum BeatError {
    /// An entry is invalid.
    #[error("beat entry `{name}`: {reason}")]
    Entry {
        /// The entry's name.
        name: String,
        /// What is wrong.
        reason: String,
    },
    /// The schedule file cannot be read or parsed.
    #[error("schedule file: {0}")]
    File(String),
    /// Two entries share a name.
    #[error("two beat entries are named `{0}`")]
    Duplicate(String),
    /// The stored state is not beat's document.
    #[error("beat state: {0}")]
    State(String),
    /// A schedule is invalid.
    #[error(transparent)]
    Schedule(#[from] celery_core::schedule::ScheduleError),
    /// A broker operation failed.
    #[error(transparent)]
    Broker(#[from] BrokerError),
    /// Sending failed.
    #[error(transparent)]
    App(#[from] AppError),
}

/// Beat settings.
///
/// ```
/// let cfg = celery_worker::beat::BeatConfig::default();
/// assert_eq!(cfg.name, "beat");
/// assert_eq!(cfg.lease, std::time::Duration::from_secs(10));
/// ```
#[derive(Debug, Clone)]
pub struct BeatConfig {
    /// Beats with the same name share one leader, one state and one set of run-time entries.
    pub name: String,
    /// A leader that dies is replaced within this time.
    pub lease: Duration,
    /// A due time older than this when beat sees it was missed (beat was down or not leading).
    pub late_after: Duration,
    /// This beat's identity in the lease (default: host, pid and a random suffix).
    pub holder: String,
}

impl Default for BeatConfig {
    fn default() -> BeatConfig {
        let host = crate::worker::gethostname();
        let suffix = uuid::Uuid::new_v4().simple().to_string();
        BeatConfig {
            name: "beat".into(),
            lease: Duration::from_secs(10),
            late_after: Duration::from_secs(5),
            holder: format!("{host}.{}.{}", std::process::id(), &suffix[..8]),
        }
    }
}

/// The document and lease name of beat `name`.
fn state_key(name: &str) -> String {
    format!("beat.{name}")
}

/// The queue `beat add`/`beat remove` send to.
pub fn control_queue(name: &str) -> String {
    format!("celery-rs.beat.{name}.control")
}

const ADD: &str = "celery_rs.beat.add";
const REMOVE: &str = "celery_rs.beat.remove";

/// A beat: entries, settings and the app it sends through.
#[derive(Debug)]
pub struct Beat {
    app: App,
    config: BeatConfig,
    entries: Vec<Entry>,
}

impl Beat {
    /// A beat with every `#[task(schedule = ...)]` of this binary added at start.
    pub fn new(app: App, config: BeatConfig) -> Beat {
        Beat { app, config, entries: Vec::new() }
    }

    /// Adds an entry.
    pub fn entry(mut self, e: Entry) -> Beat {
        self.entries.push(e);
        self
    }

    /// Adds entries (from a schedule file, say).
    pub fn entries(mut self, es: impl IntoIterator<Item = Entry>) -> Beat {
        self.entries.extend(es);
        self
    }

    /// Runs until `shutdown` resolves; a leader stores its state and releases the lease on the way out.
    pub async fn run_until(self, shutdown: impl Future<Output = ()>) -> Result<(), BeatError> {
        let mut fixed = code_entries()?;
        fixed.extend(self.entries);
        let mut seen = HashSet::new();
        for e in &fixed {
            if !seen.insert(e.name.clone()) {
                return Err(BeatError::Duplicate(e.name.clone()));
            }
        }
        let mut run = Running {
            app: self.app,
            key: state_key(&self.config.name),
            cfg: self.config,
            fixed,
            entries: Vec::new(),
            state: BeatState::default(),
            control: None,
            retry_at: HashMap::new(),
        };
        tracing::info!(beat = %run.cfg.name, holder = %run.cfg.holder, entries = run.fixed.len(), "beat: starting");
        tokio::pin!(shutdown);
        let ttl = run.cfg.lease;
        let mut leading = false;
        let mut valid_until = Instant::now();
        let mut next_renew = Instant::now();
        loop {
            if Instant::now() >= next_renew {
                let asked = Instant::now();
                match async {
                    run.app
                        .broker()
                        .require_leases("the beat leader lease")?
                        .lease(&run.key, &run.cfg.holder, ttl)
                        .await
                }
                .await
                {
                    Ok(true) => {
                        valid_until = celery_core::clock::instant_from(asked, ttl);
                        if !leading {
                            run.lead().await?;
                            leading = true;
                        }
                    }
                    Ok(false) if leading => {
                        tracing::warn!(beat = %run.cfg.name, "beat: another beat holds the lease now; standing by");
                        run.stand_by().await;
                        leading = false;
                    }
                    Ok(false) => {}
                    Err(e) => tracing::warn!(beat = %run.cfg.name, error = %e, "beat: cannot reach the lease"),
                }
                // The leader renews every third of the lease; a standby asks more often, to take
                // over soon after a dead leader's lease runs out.
                next_renew = celery_core::clock::instant_from(asked, if leading { ttl / 3 } else { ttl / 5 });
            }
            if leading && Instant::now() >= valid_until {
                tracing::warn!(beat = %run.cfg.name, "beat: lease not renewed in time; standing by");
                run.stand_by().await;
                leading = false;
            }
            let mut wake = next_renew;
            if leading {
                if let Some(t) = run.tick().await {
                    let in_ = (t - Utc::now()).to_std().unwrap_or_default();
                    wake = wake.min(celery_core::clock::instant_after(in_));
                }
            }
            tokio::select! {
                _ = &mut shutdown => break,
                _ = tokio::time::sleep_until(wake) => {}
                Some(d) = recv(&mut run.control) => run.apply(d).await,
            }
        }
        if leading {
            run.save().await;
            run.stand_by().await;
            if let Some(leases) = run.app.broker().leases() {
                let _ = leases.release(&run.key, &run.cfg.holder).await;
            }
        }
        tracing::info!(beat = %run.cfg.name, "beat: stopped");
        Ok(())
    }
}

async fn recv(control: &mut Option<Control>) -> Option<Delivery> {
    match control {
        Some(c) => c.rx.recv().await,
        None => std::future::pending().await,
    }
}

/// The leader's consumer of the control queue.
#[derive(Debug)]
struct Control {
    rx: mpsc::Receiver<Delivery>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Debug)]
struct Running {
    app: App,
    cfg: BeatConfig,
    key: String,
    /// Entries from code and the schedule file.
    fixed: Vec<Entry>,
    /// `fixed` and the run-time entries.
    entries: Vec<Entry>,
    state: BeatState,
    control: Option<Control>,
    /// Entries whose send failed wait until then.
    retry_at: HashMap<String, DateTime<Utc>>,
}

impl Running {
    /// Becomes the leader: loads the state, merges the entries, starts reading the control queue.
    async fn lead(&mut self) -> Result<(), BeatError> {
        self.state = match self.app.broker().require_documents("the beat state")?.load_doc(&self.key).await? {
            None => BeatState::default(),
            Some(doc) => serde_json::from_slice(&doc).unwrap_or_else(|e| {
                tracing::error!(beat = %self.cfg.name, error = %e, "beat: the stored state is not readable; starting afresh");
                BeatState::default()
            }),
        };
        self.merge_entries();
        let mut consumer = self.app.broker().consume(&[control_queue(&self.cfg.name)], 8).await?;
        let (tx, rx) = mpsc::channel(8);
        let (stop, mut stopped) = watch::channel(false);
        let task = tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stopped.changed() => break,
                    d = consumer.next() => match d {
                        Some(d) => if tx.send(d).await.is_err() { break },
                        None => break,
                    },
                }
            }
            consumer.close().await;
        });
        self.control = Some(Control { rx, stop, task });
        tracing::info!(beat = %self.cfg.name, holder = %self.cfg.holder, entries = self.entries.len(), "beat: leading");
        Ok(())
    }

    async fn stand_by(&mut self) {
        if let Some(c) = self.control.take() {
            let _ = c.stop.send(true);
            drop(c.rx);
            let _ = c.task.await;
        }
    }

    fn merge_entries(&mut self) {
        let mut entries = self.fixed.clone();
        for spec in &self.state.runtime {
            if entries.iter().any(|e| e.name == spec.name) {
                tracing::warn!(entry = %spec.name, "beat: a run-time entry has the name of a declared one; the declared one wins");
                continue;
            }
            match spec.build(Source::Runtime) {
                Ok(e) => entries.push(e),
                Err(e) => tracing::error!(error = %e, "beat: dropping an invalid run-time entry"),
            }
        }
        self.entries = entries;
    }

    /// Sends what is due; returns the earliest time something is due next.
    async fn tick(&mut self) -> Option<DateTime<Utc>> {
        let mut earliest: Option<DateTime<Utc>> = None;
        let mut changed = false;
        // Entries first seen in the same tick share their phase.
        let seen_at = Utc::now();
        for i in 0..self.entries.len() {
            let e = self.entries[i].clone();
            let now = Utc::now();
            if let Some(t) = self.retry_at.get(&e.name).filter(|t| **t > now) {
                earliest = Some(earliest.map_or(*t, |x| x.min(*t)));
                continue;
            }
            let mut st = match self.state.entries.get(&e.name) {
                Some(s) => s.clone(),
                None => {
                    changed = true;
                    EntryState {
                        anchor: first_anchor(&e.schedule, seen_at),
                        next: None,
                        last_sent: None,
                        last_id: None,
                        total: 0,
                        task: String::new(),
                        schedule: String::new(),
                        source: e.source,
                    }
                }
            };
            (st.task, st.schedule, st.source) = (e.sig.task.clone(), e.schedule.to_string(), e.source);
            loop {
                let now = Utc::now();
                match step(&e.schedule, e.missed, st.anchor, now, self.cfg.late_after) {
                    Step::Wait(t) => {
                        st.next = Some(t);
                        earliest = Some(earliest.map_or(t, |x| x.min(t)));
                        break;
                    }
                    Step::Done => {
                        st.next = None;
                        break;
                    }
                    Step::Skip { to, skipped } => {
                        tracing::info!(entry = %e.name, task = %e.sig.task, skipped, "beat: skipping runs missed while no beat was leading");
                        st.anchor = to;
                        changed = true;
                    }
                    Step::Send { due, folded } => match self.app.send(e.signature()).await {
                        Ok(res) => {
                            tracing::info!(entry = %e.name, task = %e.sig.task, id = res.id(), due = %due.to_rfc3339(), folded, "beat: sent");
                            st.anchor = due;
                            st.last_sent = Some(now);
                            st.last_id = Some(res.id().to_owned());
                            st.total += 1;
                            self.retry_at.remove(&e.name);
                            self.state.entries.insert(e.name.clone(), st.clone());
                            self.save().await;
                            changed = false;
                        }
                        Err(err) => {
                            tracing::error!(entry = %e.name, task = %e.sig.task, error = %err, "beat: send failed; retrying in a second");
                            let t = now + chrono::Duration::seconds(1);
                            self.retry_at.insert(e.name.clone(), t);
                            earliest = Some(earliest.map_or(t, |x| x.min(t)));
                            break;
                        }
                    },
                }
            }
            self.state.entries.insert(e.name.clone(), st);
        }
        let names: HashSet<&str> = self.entries.iter().map(|e| e.name.as_str()).collect();
        let before = self.state.entries.len();
        self.state.entries.retain(|k, _| names.contains(k.as_str()));
        if changed || before != self.state.entries.len() {
            self.save().await;
        }
        earliest
    }

    /// Stores the state document (errors are logged: the next send stores it again).
    async fn save(&mut self) {
        self.state.leader = self.cfg.holder.clone();
        self.state.written_at = Some(Utc::now());
        let doc = match serde_json::to_vec(&self.state) {
            Ok(d) => d,
            Err(e) => return tracing::error!(error = %e, "beat: cannot encode the state"),
        };
        if let Err(e) =
            async { self.app.broker().require_documents("the beat state")?.store_doc(&self.key, &doc).await }.await
        {
            tracing::error!(beat = %self.cfg.name, error = %e, "beat: cannot store the state");
        }
    }

    /// Applies one `beat add`/`beat remove`, then acks it.
    async fn apply(&mut self, mut d: Delivery) {
        let outcome = match d.take_message() {
            Err(e) => Err(format!("undecodable control message: {e}")),
            Ok(m) => match m.body() {
                Ok(body) => self.command(&m.headers.task, &Value::Object(body.kwargs)),
                Err(e) => Err(format!("undecodable control message: {e}")),
            },
        };
        match outcome {
            Ok(what) => {
                tracing::info!(beat = %self.cfg.name, "beat: {what}");
                self.merge_entries();
                self.save().await;
                if let Err(e) = d.ack().await {
                    tracing::warn!(error = %e, "beat: cannot ack a control message (it may be applied again)");
                }
            }
            Err(reason) => {
                tracing::error!(beat = %self.cfg.name, %reason, "beat: rejecting a control message");
                if let Err(e) = d.dead_letter(&reason).await {
                    tracing::warn!(error = %e, "beat: cannot dead-letter a control message");
                }
            }
        }
    }

    fn command(&mut self, task: &str, kwargs: &Value) -> Result<String, String> {
        match task {
            ADD => {
                let spec: EntrySpec = serde_json::from_value(kwargs.get("entry").cloned().unwrap_or(Value::Null))
                    .map_err(|e| format!("bad entry: {e}"))?;
                spec.build(Source::Runtime).map_err(|e| e.to_string())?;
                if self.fixed.iter().any(|e| e.name == spec.name) {
                    return Err(format!("`{}` is declared in code or the schedule file", spec.name));
                }
                let name = spec.name.clone();
                self.state.runtime.retain(|s| s.name != name);
                self.state.runtime.push(spec);
                Ok(format!("added entry `{name}`"))
            }
            REMOVE => {
                let name = kwargs.get("name").and_then(Value::as_str).ok_or("`name` is missing")?.to_owned();
                let before = self.state.runtime.len();
                self.state.runtime.retain(|s| s.name != name);
                if before == self.state.runtime.len() {
                    tracing::warn!(entry = %name, "beat: `beat remove` of an entry that is not a run-time entry");
                }
                Ok(format!("removed entry `{name}`"))
            }
            other => Err(format!("unknown beat command `{other}`")),
        }
    }
}

/// Asks beat `beat` to add (or replace) a run-time entry; the leader applies it (or the next one to
/// lead, if none runs). The entry is checked here first.
pub async fn add_entry(app: &App, beat: &str, spec: &EntrySpec) -> Result<(), BeatError> {
    spec.build(Source::Runtime)?;
    let kwargs = json!({ "entry": serde_json::to_value(spec).map_err(|e| BeatError::State(e.to_string()))? });
    app.send(Signature::by_name(ADD).kwargs(kwargs).queue(control_queue(beat))).await?;
    Ok(())
}

/// Asks beat `beat` to remove the run-time entry `name`.
pub async fn remove_entry(app: &App, beat: &str, name: &str) -> Result<(), BeatError> {
    app.send(Signature::by_name(REMOVE).kwargs(json!({ "name": name })).queue(control_queue(beat))).await?;
    Ok(())
}

/// The stored state of beat `beat` (what `beat list` shows), if it ever ran.
pub async fn load_state(app: &App, beat: &str) -> Result<Option<BeatState>, BeatError> {
    match app.broker().require_documents("the beat state")?.load_doc(&state_key(beat)).await? {
        None => Ok(None),
        Some(doc) => serde_json::from_slice(&doc).map(Some).map_err(|e| BeatError::State(e.to_string())),
    }
}

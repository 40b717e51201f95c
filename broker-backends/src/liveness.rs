//! Heartbeats of consuming workers, for the brokers that tie leases to them (Redis: a key per
//! worker; PostgreSQL: a row per worker): the [`Holder`] (registration at start, the loop that
//! renews and sweeps) is written once here over a broker's [`Heartbeat`] steps, and [`Liveness`] is
//! what a consumer knows locally: whether a delivery it fetched can still be its own without asking
//! the broker.
//!
//! A worker restarted under the same name returns its earlier run's deliveries at once
//! ([`Holder::start`]); when that name's heartbeat is still alive it first watches it for one and a
//! half beats: renewed, another live process uses the name, and this one holds under
//! `<name>#<nonce>` instead of robbing it. The nonce names the process that holds it ([`process`]:
//! boot, pid namespace, pid and start time on Linux), so a run restarted on the same machine after
//! the earlier one died (`kill -9`, a crash) sees that it is gone and takes the name over at once.
//!
//! The *epoch* counts the lapses the consumer has seen (a renewal that found its heartbeat expired
//! or taken): a delivery fetched in an earlier epoch may have been given to another worker since.
//! A delivery fetched in the current epoch is surely still held while the last renewal that found
//! the heartbeat alive was sent less than nine tenths of the grace ago: the heartbeat cannot have
//! expired yet (the broker's server keeps its time to live; the margin absorbs clock rates).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use celery_core::sync::lock;
use celery_core::url::{ServiceUrl, UrlError};
use celery_core::BrokerError;

/// The longest worker name used as a holder as is (a longer one holds under a random name).
const MAX_NAME: usize = 200;

/// What a renewal found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Renewal {
    /// The heartbeat was alive and this process's.
    Alive,
    /// It had expired or was gone (set again now: what the holder held may have been restored).
    Lapsed,
    /// Another live process holds it (not touched).
    Taken,
}

/// A broker's steps for one holder's heartbeat.
#[async_trait]
pub(crate) trait Heartbeat: Send + Sync + std::fmt::Debug + 'static {
    /// The broker's name in log lines.
    fn broker(&self) -> &'static str;
    /// What holder `id`'s heartbeat reads now (`None`: it has none).
    async fn read(&self, id: &str) -> Result<Option<String>, BrokerError>;
    /// When `id`'s heartbeat still reads `expected` (`""`: none), restores what an earlier run of
    /// `id` held and sets the heartbeat (process `nonce`, time to live `grace`): `Some(restored)`;
    /// `None` when it reads otherwise (nothing changed).
    async fn claim(&self, id: &str, nonce: &str, expected: &str, grace: Duration) -> Result<Option<u64>, BrokerError>;
    /// Renews `id`'s heartbeat (beat number `seq`).
    async fn renew(&self, id: &str, nonce: &str, seq: u64, grace: Duration) -> Result<Renewal, BrokerError>;
    /// Restores what holders whose heartbeat expired held (logging what it did).
    async fn sweep(&self);
    /// The nonces in what [`Heartbeat::read`] returned (one per scope that has a heartbeat).
    fn nonces<'a>(&self, seen: &'a str) -> Vec<&'a str>;
}

/// One consuming broker instance: its name, its heartbeat's state, and the broker's steps.
#[derive(Debug)]
pub(crate) struct Holder<B> {
    id: String,
    nonce: String,
    liveness: Liveness,
    broker: B,
}

impl<B: Heartbeat> Holder<B> {
    /// Registers a holder (named `worker`, or anonymous), restoring what an earlier run under
    /// that name left, and starts its heartbeat: renewed every `beat`, each tick followed by a
    /// sweep for dead holders, until the holder is dropped.
    pub(crate) async fn start(
        broker: B,
        worker: Option<&str>,
        beat: Duration,
        grace: Duration,
    ) -> Result<Arc<Holder<B>>, BrokerError> {
        let mine = process::mark();
        let random = uuid::Uuid::new_v4().simple();
        let nonce = mine.as_ref().map_or_else(|| random.to_string(), |m| format!("{random}-{m}"));
        let id = match worker {
            Some(w) if !w.is_empty() && w.len() <= MAX_NAME => w.to_owned(),
            _ => format!("anonymous#{nonce}"),
        };
        let mut holder = Holder { id, nonce, liveness: Liveness::new(grace), broker };
        let name = holder.broker.broker();
        let mut seen = holder.broker.read(&holder.id).await?;
        if let Some(seen) = &seen {
            // Alive a moment ago: an earlier run that just died, or a live process using the name.
            let nonces = holder.broker.nonces(seen);
            let gone = mine.as_deref().is_some_and(|mine| {
                !nonces.is_empty()
                    && nonces.iter().all(|n| n.split_once('-').is_some_and(|(_, mark)| process::is_gone(mark, mine)))
            });
            if gone {
                tracing::info!(worker = %holder.id, "{name}: the earlier run of this worker on this machine is gone; taking over its name");
            } else {
                tokio::time::sleep((beat * 3 / 2).min(grace)).await;
            }
        }
        for attempt in 0..2 {
            let sent = Instant::now();
            let expected = seen.as_deref().unwrap_or("");
            if let Some(restored) = holder.broker.claim(&holder.id, &holder.nonce, expected, grace).await? {
                holder.liveness.renewed(sent);
                if restored > 0 {
                    tracing::warn!(
                        restored,
                        worker = %holder.id,
                        "{name}: restored the deliveries an earlier run of this worker left unsettled"
                    );
                }
                let holder = Arc::new(holder);
                tokio::spawn(beat_loop(Arc::downgrade(&holder), beat));
                return Ok(holder);
            }
            if attempt == 0 {
                tracing::warn!(
                    worker = %holder.id,
                    "{name}: another live process consumes as this worker; give each worker its own name (-n)"
                );
                holder.id = format!("{}#{}", holder.id, holder.nonce);
                seen = None;
            }
        }
        Err(BrokerError::operation(format!("{name}: could not register this worker's heartbeat")))
    }

    /// The name its leases are recorded under.
    pub(crate) fn id(&self) -> &str {
        &self.id
    }

    /// This process's nonce (the start of its heartbeat's value).
    pub(crate) fn nonce(&self) -> &str {
        &self.nonce
    }

    /// What it knows of its own heartbeat (read the epoch before a fetch).
    pub(crate) fn liveness(&self) -> &Liveness {
        &self.liveness
    }

    /// The broker's steps.
    pub(crate) fn broker(&self) -> &B {
        &self.broker
    }

    /// Renews the heartbeat (beat number `seq`) and notes what the reply says.
    async fn renew(&self, seq: u64) {
        let name = self.broker.broker();
        let sent = Instant::now();
        match self.broker.renew(&self.id, &self.nonce, seq, self.liveness.grace()).await {
            Ok(Renewal::Alive) => self.liveness.renewed(sent),
            Ok(Renewal::Lapsed) => {
                self.liveness.lapsed(Some(sent));
                tracing::warn!(
                    worker = %self.id,
                    grace = ?self.liveness.grace(),
                    "{name}: this worker's heartbeat lapsed (stalled longer than worker_grace); what it held may run elsewhere, and is not settled here twice"
                );
            }
            Ok(Renewal::Taken) => {
                self.liveness.lapsed(None);
                tracing::error!(
                    worker = %self.id,
                    "{name}: another process took over this worker's name; give each worker its own name (-n)"
                );
            }
            Err(e) => tracing::warn!(error = %e, "{name}: heartbeat renewal failed; will retry"),
        }
    }
}

/// Sweeps for dead holders, then renews the heartbeat, every `beat`, until the holder is dropped.
async fn beat_loop<B: Heartbeat>(holder: Weak<Holder<B>>, beat: Duration) {
    let mut tick = tokio::time::interval(beat);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut seq = 1u64;
    loop {
        let Some(h) = holder.upgrade() else { return };
        h.broker.sweep().await;
        drop(h);
        tick.tick().await;
        let Some(h) = holder.upgrade() else { return };
        h.renew(seq).await;
        seq += 1;
    }
}

/// Who runs a heartbeat, as its nonce carries it after the random part.
pub(crate) mod process {
    /// This process: `<boot id>.<pid namespace>.<pid>.<start time>` on Linux (read from `/proc`),
    /// `None` where that cannot be read.
    pub(crate) fn mark() -> Option<String> {
        let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
        let boot: String = boot.chars().filter(char::is_ascii_hexdigit).collect();
        let ns = std::fs::read_link("/proc/self/ns/pid").ok()?;
        let ns: String = ns.to_string_lossy().chars().filter(char::is_ascii_digit).collect();
        let pid = std::process::id();
        let start = start_time(pid).ok()??;
        (!boot.is_empty() && !ns.is_empty()).then(|| format!("{boot}.{ns}.{pid}.{start}"))
    }

    /// When process `pid` started (clock ticks after boot): `Ok(None)` when no such process
    /// exists; `Err` when it cannot be told.
    fn start_time(pid: u32) -> std::io::Result<Option<u64>> {
        let stat = match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Ok(stat) => stat,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        // After the command name (in parentheses, which may hold anything): the state is field
        // 3, the start time field 22.
        let rest = stat.rfind(')').map_or("", |i| &stat[i + 1..]);
        let start = rest.split_whitespace().nth(19).and_then(|t| t.parse().ok());
        start.map(Some).ok_or_else(|| std::io::Error::other("unreadable /proc stat"))
    }

    /// True only when `mark` names a process of this boot and pid namespace (`mine` is this
    /// process's [`mark`]) that runs no more: its pid is free, or taken by a process started at
    /// another time. Anything else (another machine or container, an unreadable `/proc`) is not
    /// known to be gone.
    pub(crate) fn is_gone(mark: &str, mine: &str) -> bool {
        let theirs: Vec<&str> = mark.split('.').collect();
        let ours: Vec<&str> = mine.split('.').collect();
        let ([boot, ns, pid, start], [my_boot, my_ns, ..]) = (theirs.as_slice(), ours.as_slice()) else {
            return false;
        };
        if boot != my_boot || ns != my_ns {
            return false;
        }
        let Ok(pid) = pid.parse::<u32>() else { return false };
        match start_time(pid) {
            Ok(None) => true,
            Ok(Some(t)) => t.to_string() != *start,
            Err(_) => false,
        }
    }
}

/// The default `worker_heartbeat`.
pub const DEFAULT_WORKER_HEARTBEAT: Duration = Duration::from_secs(2);
/// The default `worker_grace`.
pub const DEFAULT_WORKER_GRACE: Duration = Duration::from_secs(10);

/// The URL options `worker_heartbeat` and `worker_grace` (seconds), read from `u` and checked: the
/// heartbeat from 0.1 s to 60 s (default 2), the grace from twice the heartbeat to 3600 s
/// (default 10, or five heartbeats if that is longer).
pub(crate) fn options(u: &ServiceUrl) -> Result<(Duration, Duration), UrlError> {
    let beat = u.seconds("worker_heartbeat")?.unwrap_or(DEFAULT_WORKER_HEARTBEAT);
    let grace = u.seconds("worker_grace")?.unwrap_or(DEFAULT_WORKER_GRACE.max(beat * 5));
    if beat < Duration::from_millis(100) || beat > Duration::from_secs(60) {
        return Err(u.invalid("worker_heartbeat is from 0.1 to 60 seconds"));
    }
    if grace < beat * 2 || grace > Duration::from_secs(3600) {
        return Err(u.invalid("worker_grace is from twice worker_heartbeat to 3600 seconds"));
    }
    Ok((beat, grace))
}

/// A consumer's view of its own heartbeat.
#[derive(Debug)]
pub(crate) struct Liveness {
    grace: Duration,
    epoch: AtomicU64,
    /// When the last renewal that found the heartbeat alive and ours was sent.
    last_ok: Mutex<Option<Instant>>,
}

impl Liveness {
    /// A heartbeat whose time to live is `grace`, not renewed yet.
    pub(crate) fn new(grace: Duration) -> Liveness {
        Liveness { grace, epoch: AtomicU64::new(0), last_ok: Mutex::new(None) }
    }

    /// The grace (the heartbeat's time to live).
    pub(crate) fn grace(&self) -> Duration {
        self.grace
    }

    /// The current epoch: read it *before* a fetch is sent.
    pub(crate) fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::SeqCst)
    }

    /// A renewal sent at `sent` found the heartbeat alive and ours.
    pub(crate) fn renewed(&self, sent: Instant) {
        *lock(&self.last_ok) = Some(sent);
    }

    /// A renewal found the heartbeat lapsed: set again at `sent` (`Some`), or held by another
    /// process (`None`).
    pub(crate) fn lapsed(&self, sent: Option<Instant>) {
        self.epoch.fetch_add(1, Ordering::SeqCst);
        *lock(&self.last_ok) = sent;
    }

    /// True when a delivery fetched in epoch `since` is certainly still held, without asking.
    pub(crate) fn surely_held(&self, since: u64) -> bool {
        self.epoch() == since && lock(&self.last_ok).is_some_and(|t| t.elapsed() < self.grace * 9 / 10)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_process_mark_tells_a_dead_run_from_a_live_one() {
        let Some(mine) = process::mark() else { return };
        assert!(!process::is_gone(&mine, &mine), "this process runs");
        let mut child = std::process::Command::new("true").spawn().expect("spawn true");
        let pid = child.id();
        child.wait().expect("wait");
        let parts: Vec<&str> = mine.split('.').collect();
        let dead = format!("{}.{}.{pid}.1", parts[0], parts[1]);
        assert!(process::is_gone(&dead, &mine), "an exited child is gone");
        let reused = format!("{}.{}.{}.1", parts[0], parts[1], std::process::id());
        assert!(process::is_gone(&reused, &mine), "our pid with another start time is another process");
        let elsewhere = format!("0123.{}.{pid}.1", parts[1]);
        assert!(!process::is_gone(&elsewhere, &mine), "another boot (machine) is never judged");
        let other_ns = format!("{}.1.{pid}.1", parts[0]);
        assert!(!process::is_gone(&other_ns, &mine), "another pid namespace is never judged");
        assert!(!process::is_gone("garbage", &mine));
        assert!(!process::is_gone(&format!("{}.{}.x.1", parts[0], parts[1]), &mine));
    }

    #[test]
    fn held_only_within_the_grace_and_the_epoch() {
        let l = Liveness::new(Duration::from_secs(10));
        assert!(!l.surely_held(0), "never renewed");
        l.renewed(Instant::now());
        assert!(l.surely_held(0));
        let old = Instant::now().checked_sub(Duration::from_secs(9)).unwrap();
        l.renewed(old);
        assert!(!l.surely_held(0), "renewed too long ago");
        l.lapsed(Some(Instant::now()));
        assert!(!l.surely_held(0), "fetched before a lapse");
        assert!(l.surely_held(1), "fetched after it");
        l.lapsed(None);
        assert!(!l.surely_held(2), "the heartbeat is someone else's");
    }
}

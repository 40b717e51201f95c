//! The writer threads every partition of the process shares.
//!
//! A partition's writer is a [`Job`]: when it has work (an append, settlements, a flush, a timer
//! that fell due) it is put on the run queue once, and one pool thread runs it; it is never run by
//! two threads at once, so its group commit stays per partition (one write and one fsync for
//! everything pending in that partition). The pool starts threads only when work waits and none is
//! idle, up to [`MAX_WRITER_THREADS`]: an idle partition holds no thread, and ten thousand queues
//! cost the same threads as ten.
//!
//! Timers ([`Pool::wake_at`]) replace the old per-thread receive timeouts (the fsync interval,
//! the deadline of acks waiting for their fsync): the thread that waits for work also waits for the
//! earliest timer and hands a due one to its job ([`Job::tick`]). A timer holds its job weakly: a
//! partition that closed is not kept alive by it.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::sync::{Arc, Condvar, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use celery_core::sync::lock;

/// The most writer threads in a process. Writes are fsync-bound, not CPU-bound: a few threads
/// keep the disk busy with fsyncs of different partitions while one partition's batch waits.
pub(crate) const MAX_WRITER_THREADS: usize = 8;

/// Something a pool thread runs.
pub(crate) trait Job: Send + Sync + 'static {
    /// Does the pending work (called by one thread at a time: a job is queued at most once).
    fn run(self: Arc<Self>);
    /// A timer set with [`Pool::wake_at`] fell due.
    fn tick(self: Arc<Self>);
}

/// The shared writer threads.
pub(crate) struct Pool {
    state: Mutex<State>,
    work: Condvar,
    max_threads: usize,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = lock(&self.state);
        f.debug_struct("Pool").field("threads", &s.threads).field("queued", &s.queue.len()).finish()
    }
}

#[derive(Default)]
struct State {
    queue: VecDeque<Arc<dyn Job>>,
    timers: BinaryHeap<Reverse<(Instant, u64)>>,
    timed: HashMap<u64, Weak<dyn Job>>,
    next_timer: u64,
    threads: usize,
    idle: usize,
}

/// The process's pool.
pub(crate) fn pool() -> &'static Pool {
    static POOL: OnceLock<Pool> = OnceLock::new();
    POOL.get_or_init(|| Pool { state: Mutex::default(), work: Condvar::new(), max_threads: MAX_WRITER_THREADS })
}

impl Pool {
    /// Queues `job` to run (the caller makes sure it is not queued already).
    pub(crate) fn submit(&'static self, job: Arc<dyn Job>) {
        let mut s = lock(&self.state);
        s.queue.push_back(job);
        self.wake_or_spawn(&mut s);
    }

    /// Calls `job.tick()` at `at` (unless the job is gone by then).
    pub(crate) fn wake_at(&'static self, job: Weak<dyn Job>, at: Instant) {
        let mut s = lock(&self.state);
        let id = s.next_timer;
        s.next_timer += 1;
        let earliest = s.timers.peek().is_none_or(|Reverse((t, _))| at < *t);
        s.timers.push(Reverse((at, id)));
        s.timed.insert(id, job);
        if earliest {
            self.wake_or_spawn(&mut s);
        }
    }

    /// Threads started so far.
    #[cfg(test)]
    pub(crate) fn threads(&self) -> usize {
        lock(&self.state).threads
    }

    fn wake_or_spawn(&'static self, s: &mut State) {
        if s.idle > 0 || s.threads >= self.max_threads {
            self.work.notify_one();
            return;
        }
        let n = s.threads;
        match std::thread::Builder::new().name(format!("log-writer-{n}")).spawn(move || self.serve()) {
            Ok(_) => s.threads += 1,
            Err(e) if n == 0 => {
                // Nothing could run the work: say so loudly (the waiters wait until a thread starts).
                tracing::error!(error = %e, "log: cannot start a writer thread");
            }
            Err(e) => tracing::warn!(error = %e, threads = n, "log: cannot start another writer thread"),
        }
    }

    /// A pool thread: runs queued jobs and due timers, forever (the pool lives as long as the process).
    fn serve(&'static self) {
        let mut s = lock(&self.state);
        loop {
            let now = Instant::now();
            let mut due = Vec::new();
            while let Some(Reverse((at, id))) = s.timers.peek().copied() {
                if at > now {
                    break;
                }
                s.timers.pop();
                if let Some(job) = s.timed.remove(&id).and_then(|w| w.upgrade()) {
                    due.push(job);
                }
            }
            if !due.is_empty() {
                drop(s);
                for job in due {
                    job.tick();
                }
                s = lock(&self.state);
                continue;
            }
            if let Some(job) = s.queue.pop_front() {
                if !s.queue.is_empty() && s.idle > 0 {
                    self.work.notify_one();
                }
                drop(s);
                job.run();
                s = lock(&self.state);
                continue;
            }
            let wait = s.timers.peek().map(|Reverse((at, _))| at.saturating_duration_since(now));
            s.idle += 1;
            s = match wait {
                Some(d) => {
                    self.work.wait_timeout(s, d.max(Duration::from_micros(50))).unwrap_or_else(|p| p.into_inner()).0
                }
                None => self.work.wait(s).unwrap_or_else(|p| p.into_inner()),
            };
            s.idle -= 1;
        }
    }
}

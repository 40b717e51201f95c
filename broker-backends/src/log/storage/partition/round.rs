//! Rounds of acks: the settlements of many partitions written to the acks journal with one write,
//! by one pool job, after one wake-up.
//!
//! Before, an ack woke its partition's writer (a job of the pool, so a thread woken through a
//! futex for every partition with acks), which waited [`ACK_GATHER`] for more and then wrote its
//! own journal frame: draining a thousand queues woke a writer thread and wrote the journal a
//! thousand times. Now the first ack a partition queues puts its writer on the store's
//! [`AckRound`]; the first writer on it sets one pool timer, [`ACK_GATHER`] later, and the round
//! then takes every listed writer in turn and appends all their frames with one write (one per
//! [`ROUND_BYTES`]).
//!
//! Ordering: a writer taken into a round is marked queued ([`Member::join`]), exactly as when it
//! is on the run queue, so it does not run meanwhile; commands sent to it in that time (a flush, an
//! append, a close) wait in its inbox and run after the round's write ([`Member::leave`]). So a
//! flush answered after an ack still means that ack is written, and the writer's checkpoints
//! still cover every ack it journaled. A writer that is queued or running already is left alone:
//! its own run writes its settlements.
//!
//! Durability is unchanged: the frames are fsynced by the journal's timer ([`super::journal`]).

use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use celery_core::sync::lock;

use super::journal::AcksJournal;
use super::pool::{pool, Job};

/// How long the first ack of a round waits for others before the round writes them all.
pub(super) const ACK_GATHER: Duration = Duration::from_micros(500);

/// A round writes once its frames reach this many bytes (and goes on with the writers left).
const ROUND_BYTES: usize = 1 << 20;

/// A partition's writer, as a round sees it.
pub(super) trait Member: Send + Sync + 'static {
    /// Takes the writer for this round when it is neither queued nor running: appends the frames
    /// of its pending settlements to `frames` and returns its journal key; the round then calls
    /// [`Member::leave`] after writing them. `None`: nothing taken (the writer's own run writes
    /// them, or it is closed).
    fn join(&self, frames: &mut Vec<u8>) -> Option<String>;
    /// The round wrote the frames (`failed` is `None`) or failed to (the error): the writer is
    /// released, and runs now when commands came for it meanwhile. After a failure the writer
    /// checkpoints its finished set in its next run (so the acks become durable there) and fails
    /// the flushes of that run with the error, as when its own run fails to write them.
    fn leave(&self, failed: Option<&str>);
}

/// The writers of a store with acks waiting for the next round.
pub(crate) struct AckRound {
    state: Mutex<State>,
    journal: Weak<AcksJournal>,
    me: Weak<AckRound>,
}

#[derive(Default)]
struct State {
    /// The writers whose acks went from none to some since the last round: a writer once per
    /// such change (again when its own run, or a round, took its acks meanwhile), so the list
    /// grows with the acks of one gather window, not beyond; emptied by each round.
    members: Vec<Arc<dyn Member>>,
    /// A round is due (its timer is set).
    due: bool,
}

impl std::fmt::Debug for AckRound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AckRound").field("members", &lock(&self.state).members.len()).finish()
    }
}

impl AckRound {
    /// The round of the store whose journal is `journal`.
    pub(super) fn new(journal: Weak<AcksJournal>) -> Arc<AckRound> {
        Arc::new_cyclic(|me| AckRound { state: Mutex::default(), journal, me: me.clone() })
    }

    /// Puts a writer with acks waiting on the next round (setting its timer when it is the first).
    pub(super) fn add(&self, member: Arc<dyn Member>) {
        let mut st = lock(&self.state);
        st.members.push(member);
        if st.due {
            return;
        }
        st.due = true;
        drop(st);
        let me: Weak<dyn Job> = self.me.clone();
        pool().wake_at(me, Instant::now() + ACK_GATHER);
    }

    /// Writes the settlements of every writer on the round.
    fn write_round(&self) {
        let mut members = {
            let mut st = lock(&self.state);
            st.due = false;
            std::mem::take(&mut st.members)
        };
        // A writer whose acks went from none to some twice in one window is listed twice: once
        // is enough (a second `join` of a writer the round holds would only ask it for a run).
        let mut seen = std::collections::HashSet::with_capacity(members.len());
        members.retain(|m| seen.insert(Arc::as_ptr(m).cast::<()>()));
        let journal = self.journal.upgrade();
        let mut frames = Vec::new();
        let mut taken = Taken::default();
        for member in members {
            if let Some(key) = member.join(&mut frames) {
                taken.keys.push(key);
                taken.members.push(member);
            }
            if frames.len() >= ROUND_BYTES {
                taken.write(journal.as_deref(), &frames);
                frames.clear();
            }
        }
        taken.write(journal.as_deref(), &frames);
    }
}

/// The writers a round holds (and their journal keys) until their frames are written. Dropped
/// without [`Taken::write`] (a panic on the way), it still releases them: a writer left marked
/// queued would never run again.
#[derive(Default)]
struct Taken {
    keys: Vec<String>,
    members: Vec<Arc<dyn Member>>,
}

impl Taken {
    /// One journal write for the frames of the writers held, then releases them, telling each
    /// whether its frames were written.
    fn write(&mut self, journal: Option<&AcksJournal>, frames: &[u8]) {
        let mut failed = None;
        if !frames.is_empty() {
            let keys: Vec<&str> = self.keys.iter().map(String::as_str).collect();
            let written = match journal {
                Some(j) => j.append_many(&keys, frames).map_err(|e| e.to_string()),
                None => Err("the acks journal is closed".to_owned()),
            };
            if let Err(e) = written {
                // The acks are in the writers' finished sets, not in the journal: each writer
                // checkpoints them in its next run; a crash before it delivers those records
                // again (never loses one).
                tracing::error!(error = %e, partitions = keys.len(), "log: writing acks failed; those records will be delivered again");
                failed = Some(e);
            }
        }
        self.keys.clear();
        for member in self.members.drain(..) {
            member.leave(failed.as_deref());
        }
    }
}

impl Drop for Taken {
    fn drop(&mut self) {
        for member in self.members.drain(..) {
            member.leave(Some("the round of acks stopped before writing them"));
        }
    }
}

impl Job for AckRound {
    fn run(self: Arc<Self>) {
        self.write_round();
    }

    fn tick(self: Arc<Self>) {
        self.write_round();
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::sync::atomic::Ordering;

    use celery_core::flow::FairnessWeights;
    use futures::FutureExt;
    use tokio::sync::Notify;

    use super::super::tests::tempdir;
    use super::super::writer::AckOp;
    use super::super::{Fsync, Partition, PartitionConfig};
    use super::*;
    use crate::log::storage::files::FileCache;
    use crate::log::storage::record::NewRecord;

    fn open(root: &Path, queue: &str, journal: &Arc<AcksJournal>) -> Partition {
        let cfg = PartitionConfig {
            fsync: Fsync::Always,
            segment_bytes: 1 << 20,
            files: FileCache::new(8),
            journal: journal.clone(),
        };
        Partition::open(&root.join("topics").join(queue).join("0"), &cfg, Arc::new(Notify::new())).unwrap()
    }

    /// Partition `queue` with `n` records, the first of them taken (leased).
    async fn first_taken(root: &Path, queue: &str, journal: &Arc<AcksJournal>, n: usize) -> Partition {
        let p = open(root, queue, journal);
        p.log.append(vec![NewRecord { payload: b"a".to_vec(), ..NewRecord::default() }; n]).await.unwrap();
        assert_eq!(take(&p), Some(0));
        p
    }

    fn take(p: &Partition) -> Option<u64> {
        let far = Instant::now() + Duration::from_secs(60);
        p.take(far, 1, &FairnessWeights::default()).unwrap().map(|t| t.record.offset)
    }

    /// Queues acks of `offsets` on `p` without putting its writer on the store's round (the test
    /// runs rounds of its own), once its writer is idle (the run that answered the last command
    /// may still be ending: a round would not take it meanwhile).
    async fn queue_acks(p: &Partition, offsets: &[u64]) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !p.log.idle() {
            assert!(Instant::now() < deadline, "the writer stays busy");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        p.log.queue_settled(AckOp::Ack(offsets.to_vec()));
    }

    /// The acks of a hundred queues go to the journal with one write, and a store that stops
    /// without a checkpoint (a crash) finds every one of them there.
    #[tokio::test]
    async fn one_round_writes_the_acks_of_many_partitions_at_once() {
        let root = tempdir();
        let names: Vec<String> = (0..100).map(|i| format!("q{i}")).collect();
        {
            let journal = AcksJournal::open(&root, Fsync::Always).unwrap();
            let parts: Vec<Partition> = names.iter().map(|n| open(&root, n, &journal)).collect();
            for p in &parts {
                p.log.append(vec![NewRecord { payload: b"a".to_vec(), ..NewRecord::default() }; 2]).await.unwrap();
                assert_eq!((take(p), take(p)), (Some(0), Some(1)));
                queue_acks(p, &[0]).await;
            }
            let round = AckRound::new(Arc::downgrade(&journal));
            lock(&round.state).members = parts.iter().map(|p| p.log.member()).collect();
            let before = journal.appends.load(Ordering::Relaxed);
            round.write_round();
            assert_eq!(journal.appends.load(Ordering::Relaxed) - before, 1, "one write for a hundred partitions");
            assert!(lock(&round.state).members.is_empty());
            // Released: a flush runs at once, and a writer with nothing settled costs no frame.
            for p in &parts {
                p.log.flush().await.unwrap();
            }
            assert_eq!(journal.appends.load(Ordering::Relaxed) - before, 1);
        }
        let journal = AcksJournal::open(&root, Fsync::Always).unwrap();
        for n in &names {
            let p = open(&root, n, &journal);
            assert_eq!(take(&p), Some(1), "{n}: offset 0 is acked, offset 1 is delivered again");
            assert_eq!(take(&p), None, "{n}");
        }
        drop(journal);
        std::fs::remove_dir_all(root).ok();
    }

    /// A writer whose settlements write a checkpoint is left to a run of its own (its fsyncs
    /// hold up no other writer of the round): the round writes nothing for it, and the
    /// checkpoint is there after its own run.
    #[tokio::test]
    async fn a_checkpoint_is_left_to_its_writers_own_run() {
        let root = tempdir();
        let journal = AcksJournal::open(&root, Fsync::Always).unwrap();
        let (a, b) = (open(&root, "a", &journal), open(&root, "b", &journal));
        for p in [&a, &b] {
            p.log.append(vec![NewRecord { payload: b"a".to_vec(), ..NewRecord::default() }; 2]).await.unwrap();
            assert_eq!(take(p), Some(0));
            queue_acks(p, &[0]).await;
        }
        b.log.queue_settled(AckOp::Checkpoint);
        let round = AckRound::new(Arc::downgrade(&journal));
        lock(&round.state).members = vec![a.log.member(), b.log.member()];
        let before = journal.appends.load(Ordering::Relaxed);
        round.write_round();
        assert_eq!(journal.appends.load(Ordering::Relaxed) - before, 1, "a's acks in the round's write");
        b.log.flush().await.unwrap();
        let checkpoint = root.join("topics").join("b").join("0/checkpoint");
        assert!(checkpoint.exists(), "b checkpointed in its own run");
        drop((a, b, journal));
        std::fs::remove_dir_all(root).ok();
    }

    /// A round whose write fails has each writer it held checkpoint in its next run: a flush
    /// waiting meanwhile is answered once the acks are durable there, and they survive a crash.
    #[tokio::test]
    async fn a_failed_round_write_is_checkpointed_by_the_writers() {
        let root = tempdir();
        {
            let journal = AcksJournal::open(&root, Fsync::Always).unwrap();
            let p = first_taken(&root, "q", &journal, 2).await;
            queue_acks(&p, &[0]).await;
            let member = p.log.member();
            let mut frames = Vec::new();
            member.join(&mut frames).expect("an idle writer with acks joins");
            let mut flush = Box::pin(p.log.flush());
            assert!((&mut flush).now_or_never().is_none(), "held by the round");
            // Written to no journal (a closed one): the write fails.
            Taken { keys: vec!["q".into()], members: vec![member] }.write(None, &frames);
            flush.await.unwrap();
            assert!(root.join("topics/q/0/checkpoint").exists(), "the writer checkpointed the acks");
            // Stopped without a checkpoint of its own: the journal holds nothing of q.
            drop(p);
        }
        let journal = AcksJournal::open(&root, Fsync::Always).unwrap();
        let p = open(&root, "q", &journal);
        assert_eq!(take(&p), Some(1), "offset 0 stays acked");
        drop((p, journal));
        std::fs::remove_dir_all(root).ok();
    }

    /// A round that stops half way (a panic) still releases the writers it took.
    #[tokio::test]
    async fn a_round_that_stops_releases_its_writers() {
        let root = tempdir();
        let journal = AcksJournal::open(&root, Fsync::Always).unwrap();
        let p = first_taken(&root, "q", &journal, 1).await;
        queue_acks(&p, &[0]).await;
        let member = p.log.member();
        member.join(&mut Vec::new()).expect("joins");
        let mut flush = Box::pin(p.log.flush());
        assert!((&mut flush).now_or_never().is_none(), "held by the round");
        drop(Taken { keys: vec!["q".into()], members: vec![member] });
        flush.await.unwrap();
        drop((p, journal));
        std::fs::remove_dir_all(root).ok();
    }

    /// An ack after the partition closed is refused: nothing would write it.
    #[tokio::test]
    async fn an_ack_after_close_is_refused() {
        let root = tempdir();
        let journal = AcksJournal::open(&root, Fsync::Always).unwrap();
        let p = first_taken(&root, "q", &journal, 1).await;
        p.log.close();
        assert!(matches!(p.ack(&[0]), Err(crate::log::storage::LogError::Closed)));
        drop((p, journal));
        std::fs::remove_dir_all(root).ok();
    }

    /// A writer taken by a round does not run until the round's write is done: a flush sent
    /// meanwhile is answered after it (so a flush after an ack still means the ack is written).
    #[tokio::test]
    async fn a_writer_in_a_round_runs_its_commands_after_the_write() {
        let root = tempdir();
        let journal = AcksJournal::open(&root, Fsync::Always).unwrap();
        let p = first_taken(&root, "q", &journal, 1).await;
        queue_acks(&p, &[0]).await;
        let member = p.log.member();
        let mut frames = Vec::new();
        let key = member.join(&mut frames).expect("an idle writer with acks joins");
        assert!(!frames.is_empty());
        let mut flush = Box::pin(p.log.flush());
        assert!((&mut flush).now_or_never().is_none(), "held by the round");
        // A second round finds it taken and leaves it (its next run takes what it gets).
        assert!(member.join(&mut Vec::new()).is_none());
        journal.append_many(&[&key], &frames).unwrap();
        member.leave(None);
        flush.await.unwrap();
        drop(p);
        drop(journal);
        let journal = AcksJournal::open(&root, Fsync::Always).unwrap();
        assert_eq!(take(&open(&root, "q", &journal)), None, "the round's frame was written");
        drop(journal);
        std::fs::remove_dir_all(root).ok();
    }
}

//! Stream consumers, as Kafka has them: a consumer group reads a topic's partitions in order from
//! its committed offsets; the group's members divide the partitions among themselves and rebalance
//! when one joins or leaves. Committing after processing gives at-least-once (a crash re-reads what
//! was not committed); committing before gives at-most-once (a crash skips it).
//!
//! Offsets are stored in `groups/<group>/<topic>/<partition>` (`offset:u64 crc:u32`, replaced
//! atomically). Records a group has not committed are kept by retention.
//!
//! Members run in the owning process or in any client (`log+tcp://`, `log+tls://`, another process
//! on the directory's socket): a client's member lives on the server for as long as its connection,
//! so a client that crashes leaves the group and its partitions move to the others, from the
//! committed offsets.
//!
//! ```
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! use broker_backends::log::{Commit, LogBroker, StartFrom};
//! use celery_core::{Broker, routing::Route, protocol::Message, Signature};
//! let dir = std::env::temp_dir().join(format!("doc-stream-{}", std::process::id()));
//! let broker = LogBroker::connect(&format!("log://{}", dir.display())).await.unwrap();
//! let msg = Message::from_signature(&Signature::by_name("evt")).unwrap();
//! broker.publish(&Route::queue("events"), &msg).await.unwrap();
//! let mut c = broker.stream("analytics", "events", StartFrom::Earliest, Commit::AfterProcessing).await.unwrap();
//! let batch = c.poll(100, std::time::Duration::from_secs(1)).await.unwrap();
//! assert_eq!(batch.len(), 1);
//! c.commit().await.unwrap();
//! # std::fs::remove_dir_all(dir).ok();
//! # });
//! ```

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use celery_core::BrokerError;

use super::error::LogError;
use super::partition::{Partition, Pos};
use super::record::Record;
use super::segment::ReadAhead;
use super::store::{LogStore, Topic};

/// Where a group with no committed offset starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartFrom {
    /// The oldest record kept.
    Earliest,
    /// Only records appended after joining.
    Latest,
}

/// When offsets are committed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Commit {
    /// The application calls `commit` after processing: at-least-once.
    AfterProcessing,
    /// `poll` commits before returning the records: at-most-once.
    BeforeProcessing,
}

/// The members of one group on one topic.
#[derive(Debug, Default)]
pub(crate) struct Membership {
    members: Vec<u64>,
    generation: u64,
    next_member: u64,
}

/// A record with its partition.
#[derive(Debug, Clone)]
pub struct StreamRecord {
    /// The partition index.
    pub partition: usize,
    /// The record.
    pub record: Record,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn offset_path(dir: &Path, group: &str, topic: &str, partition: usize) -> Result<PathBuf, LogError> {
    let group_dir = super::names::child(&dir.join("groups"), "stream group", group)?;
    Ok(super::names::child(&group_dir, "queue", topic)?.join(partition.to_string()))
}

/// The lowest offset any group committed on this partition (None: no group reads it).
pub(crate) fn min_committed(dir: &Path, topic: &str, partition: usize) -> Option<u64> {
    let topic = super::names::component("queue", topic).ok()?;
    std::fs::read_dir(dir.join("groups"))
        .ok()?
        .flatten()
        .filter_map(|g| std::fs::read(g.path().join(&topic).join(partition.to_string())).ok())
        .filter(|d| d.len() == 12)
        .map(|d| u64::from_le_bytes(d[..8].try_into().unwrap_or_default()))
        .min()
}

/// Reads a committed offset.
pub(crate) fn committed(dir: &Path, group: &str, topic: &str, partition: usize) -> Result<Option<u64>, LogError> {
    let path = offset_path(dir, group, topic, partition)?;
    match std::fs::read(&path) {
        Ok(d) if d.len() == 12 => {
            let off = u64::from_le_bytes(d[..8].try_into().unwrap_or_default());
            let crc = u32::from_le_bytes(d[8..].try_into().unwrap_or_default());
            if crc32c::crc32c(&d[..8]) != crc {
                return Err(LogError::Corrupt { path, offset: 0, reason: "committed offset checksum".into() });
            }
            Ok(Some(off))
        }
        Ok(_) => Err(LogError::Corrupt { path, offset: 0, reason: "committed offset length".into() }),
        Err(_) => Ok(None),
    }
}

fn store_committed(dir: &Path, group: &str, topic: &str, partition: usize, offset: u64) -> Result<(), LogError> {
    let path = offset_path(dir, group, topic, partition)?;
    let parent = path.parent().unwrap_or(dir);
    if !parent.exists() {
        super::disk::create_dir_all(parent)?;
        // The new directories' entries, up to `groups/`, survive a crash.
        for d in parent.ancestors().skip(1).take(3) {
            super::disk::sync_dir(d)?;
        }
    }
    let mut data = offset.to_le_bytes().to_vec();
    data.extend_from_slice(&crc32c::crc32c(&offset.to_le_bytes()).to_le_bytes());
    super::disk::replace_file(&path, &data)
}

/// A member of a consumer group reading one topic: in this process, or on the server of a client.
#[derive(Debug)]
pub struct StreamConsumer {
    member: Member,
}

#[derive(Debug)]
enum Member {
    Local(LocalStream),
    Remote(super::remote::RemoteStream),
}

impl StreamConsumer {
    pub(crate) fn local(s: LocalStream) -> StreamConsumer {
        StreamConsumer { member: Member::Local(s) }
    }

    pub(crate) fn remote(s: super::remote::RemoteStream) -> StreamConsumer {
        StreamConsumer { member: Member::Remote(s) }
    }

    /// The partitions this member reads now.
    pub async fn assignment(&self) -> Result<Vec<usize>, BrokerError> {
        match &self.member {
            Member::Local(s) => Ok(s.assignment()),
            Member::Remote(s) => s.assignment().await,
        }
    }

    /// Up to `max` records from the assigned partitions, waiting up to `timeout` for the first.
    /// With [`Commit::BeforeProcessing`] their offsets are committed before they are returned. A
    /// client whose connection was lost joins the group again here (reading from the committed
    /// offsets).
    pub async fn poll(&mut self, max: usize, timeout: Duration) -> Result<Vec<StreamRecord>, BrokerError> {
        match &mut self.member {
            Member::Local(s) => Ok(s.poll(max, usize::MAX, timeout).await?),
            Member::Remote(s) => s.poll(max, timeout).await,
        }
    }

    /// Commits the position after everything polled so far (durably). Fails, committing nothing,
    /// when the connection the records came over is lost.
    pub async fn commit(&self) -> Result<(), BrokerError> {
        match &self.member {
            Member::Local(s) => Ok(s.commit()?),
            Member::Remote(s) => s.commit().await,
        }
    }
}

/// A member in the process that owns the directory.
#[derive(Debug)]
pub(crate) struct LocalStream {
    store: Arc<LogStore>,
    topic: Arc<Topic>,
    group: String,
    member: u64,
    start: StartFrom,
    commit: Commit,
    generation: u64,
    /// partition -> (next offset to read, its position, the read-ahead window)
    positions: HashMap<usize, (u64, Pos, ReadAhead)>,
}

impl LocalStream {
    pub(crate) fn join(
        store: Arc<LogStore>,
        group: &str,
        topic: &str,
        start: StartFrom,
        commit: Commit,
    ) -> Result<LocalStream, LogError> {
        super::names::component("stream group", group)?;
        let topic = store.topic(topic)?;
        let member = {
            let mut groups = lock(&store.groups);
            let m = groups.entry((group.to_owned(), topic.name.clone())).or_default();
            m.next_member += 1;
            let id = m.next_member;
            m.members.push(id);
            m.generation += 1;
            id
        };
        Ok(LocalStream {
            store,
            topic,
            group: group.to_owned(),
            member,
            start,
            commit,
            generation: 0,
            positions: HashMap::new(),
        })
    }

    pub(crate) fn assignment(&self) -> Vec<usize> {
        let groups = lock(&self.store.groups);
        let Some(m) = groups.get(&(self.group.clone(), self.topic.name.clone())) else { return Vec::new() };
        let idx = m.members.iter().position(|x| *x == self.member).unwrap_or(0);
        (0..self.topic.partitions.len()).filter(|p| p % m.members.len().max(1) == idx).collect()
    }

    fn rebalance(&mut self) -> Result<(), LogError> {
        let gen = lock(&self.store.groups)
            .get(&(self.group.clone(), self.topic.name.clone()))
            .map(|m| m.generation)
            .unwrap_or(0);
        if gen == self.generation {
            return Ok(());
        }
        self.generation = gen;
        let assigned = self.assignment();
        self.positions.retain(|p, _| assigned.contains(p));
        for p in assigned {
            if self.positions.contains_key(&p) {
                continue;
            }
            let part = &self.topic.partitions[p];
            let offset = match committed(self.store.dir(), &self.group, &self.topic.name, p)? {
                Some(o) => o.max(part.first_offset()),
                None => match self.start {
                    StartFrom::Earliest => part.first_offset(),
                    StartFrom::Latest => part.log.next_offset(),
                },
            };
            let pos = part.log.seek(offset)?;
            self.positions.insert(p, (offset, pos, ReadAhead::default()));
        }
        Ok(())
    }

    /// Up to `max` records, and no more once `max_bytes` of keys and payloads are read (always at
    /// least one), waiting up to `timeout` for the first.
    pub(crate) async fn poll(
        &mut self,
        max: usize,
        max_bytes: usize,
        timeout: Duration,
    ) -> Result<Vec<StreamRecord>, LogError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            self.rebalance()?;
            let notify = self.store.notify.clone();
            let notified = notify.notified();
            let mut out = Vec::new();
            let mut bytes = 0;
            for (p, (offset, pos, ahead)) in self.positions.iter_mut() {
                let part: &Arc<Partition> = &self.topic.partitions[*p];
                while out.len() < max && bytes < max_bytes {
                    match part.log.read(pos, *offset, ahead)? {
                        Some((record, _)) => {
                            *offset = record.offset + 1;
                            bytes += record.key.len() + record.payload.len();
                            out.push(StreamRecord { partition: *p, record });
                        }
                        None => break,
                    }
                }
            }
            if !out.is_empty() || tokio::time::Instant::now() >= deadline {
                if self.commit == Commit::BeforeProcessing {
                    self.commit()?;
                }
                return Ok(out);
            }
            let _ = tokio::time::timeout_at(deadline, notified).await;
        }
    }

    pub(crate) fn commit(&self) -> Result<(), LogError> {
        for (p, (offset, ..)) in &self.positions {
            store_committed(self.store.dir(), &self.group, &self.topic.name, *p, *offset)?;
        }
        Ok(())
    }
}

impl Drop for LocalStream {
    fn drop(&mut self) {
        let mut groups = lock(&self.store.groups);
        if let Some(m) = groups.get_mut(&(self.group.clone(), self.topic.name.clone())) {
            m.members.retain(|x| *x != self.member);
            m.generation += 1;
        }
    }
}

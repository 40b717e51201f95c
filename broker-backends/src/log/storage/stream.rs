//! Stream consumers, as Kafka has them: a consumer group reads a topic's partitions in order from
//! its committed offsets; the group's members divide the partitions among themselves and rebalance
//! when one joins or leaves. Committing after processing gives at-least-once (a crash re-reads what
//! was not committed); committing before gives at-most-once (a crash skips it).
//!
//! Offsets are stored in `groups/<group>/<topic>/<partition>` (`offset:u64 crc:u32`, replaced
//! atomically). Records a group has not committed are kept by retention.
//!
//! This file holds the members in the owning process ([`LocalStream`]) and the groups they form
//! ([`StreamGroups`]: membership and committed offsets). A client (`log+tcp://`, `log+tls://`,
//! another process on the directory's socket) has its member live on the server for as long as its
//! connection (`net::remote::RemoteStream`), so a client that crashes leaves the group and its
//! partitions move to the others, from the committed offsets. `LogBroker::stream` picks either
//! (`log::StreamConsumer`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use celery_core::sync::lock;
use tokio::sync::Notify;

use super::error::LogError;
use super::partition::{Partition, Pos};
use super::record::Record;
use super::segment::ReadAhead;
use super::topic::Topic;

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

/// A record with its partition.
#[derive(Debug, Clone)]
pub struct StreamRecord {
    /// The partition index.
    pub partition: usize,
    /// The record.
    pub record: Record,
}

/// The members of one group on one topic.
#[derive(Debug, Default)]
struct Membership {
    members: Vec<u64>,
    generation: u64,
    next_member: u64,
}

/// The stream groups of a store: who is a member of which (group, topic), in memory, and the
/// committed offsets, in `groups/<group>/<topic>/<partition>` under the data directory.
#[derive(Debug)]
pub(crate) struct StreamGroups {
    dir: PathBuf,
    members: Mutex<HashMap<(String, String), Membership>>,
}

impl StreamGroups {
    /// The groups of the data directory `dir`.
    pub(crate) fn new(dir: &Path) -> StreamGroups {
        StreamGroups { dir: dir.to_owned(), members: Mutex::default() }
    }

    /// Adds a member to `group` on `topic`; its id.
    fn join(&self, group: &str, topic: &str) -> u64 {
        let mut groups = lock(&self.members);
        let m = groups.entry((group.to_owned(), topic.to_owned())).or_default();
        m.next_member += 1;
        let id = m.next_member;
        m.members.push(id);
        m.generation += 1;
        id
    }

    /// Removes a member; the others rebalance at their next poll.
    fn leave(&self, group: &str, topic: &str, member: u64) {
        let mut groups = lock(&self.members);
        if let Some(m) = groups.get_mut(&(group.to_owned(), topic.to_owned())) {
            m.members.retain(|x| *x != member);
            m.generation += 1;
        }
    }

    /// The group's generation (bumped by every join and leave).
    fn generation(&self, group: &str, topic: &str) -> u64 {
        lock(&self.members).get(&(group.to_owned(), topic.to_owned())).map(|m| m.generation).unwrap_or(0)
    }

    /// The partitions of `partitions` that `member` reads: `p % members == its index`.
    fn assignment(&self, group: &str, topic: &str, member: u64, partitions: usize) -> Vec<usize> {
        let groups = lock(&self.members);
        let Some(m) = groups.get(&(group.to_owned(), topic.to_owned())) else { return Vec::new() };
        let idx = m.members.iter().position(|x| *x == member).unwrap_or(0);
        (0..partitions).filter(|p| p % m.members.len().max(1) == idx).collect()
    }

    fn offset_path(&self, group: &str, topic: &str, partition: usize) -> Result<PathBuf, LogError> {
        let group_dir = super::names::child(&self.dir.join("groups"), "stream group", group)?;
        Ok(super::names::child(&group_dir, "queue", topic)?.join(partition.to_string()))
    }

    /// The lowest offset any group committed on this partition (None: no group reads it).
    pub(crate) fn min_committed(&self, topic: &str, partition: usize) -> Option<u64> {
        let topic = super::names::component("queue", topic).ok()?;
        std::fs::read_dir(self.dir.join("groups"))
            .ok()?
            .flatten()
            .filter_map(|g| std::fs::read(g.path().join(&topic).join(partition.to_string())).ok())
            .filter(|d| d.len() == 12)
            .map(|d| u64::from_le_bytes(d[..8].try_into().unwrap_or_default()))
            .min()
    }

    /// Reads a committed offset.
    fn committed(&self, group: &str, topic: &str, partition: usize) -> Result<Option<u64>, LogError> {
        let path = self.offset_path(group, topic, partition)?;
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

    /// Commits `offset` durably (`offset:u64 crc:u32`; tmp, fsync, rename, fsync of the directory).
    fn store_committed(&self, group: &str, topic: &str, partition: usize, offset: u64) -> Result<(), LogError> {
        let path = self.offset_path(group, topic, partition)?;
        let parent = path.parent().unwrap_or(&self.dir);
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
}

/// A member in the process that owns the directory (`LogStore::join_stream`). Whoever holds it
/// holds the store too (the member reads the store's partitions).
#[derive(Debug)]
pub(crate) struct LocalStream {
    groups: Arc<StreamGroups>,
    topic: Arc<Topic>,
    /// Woken on every append.
    appended: Arc<Notify>,
    group: String,
    member: u64,
    start: StartFrom,
    commit: Commit,
    generation: u64,
    /// partition -> (next offset to read, its position, the read-ahead window)
    positions: HashMap<usize, (u64, Pos, ReadAhead)>,
}

impl LocalStream {
    /// Joins `group` (a name already checked) on `topic`.
    pub(crate) fn join(
        groups: Arc<StreamGroups>,
        topic: Arc<Topic>,
        appended: Arc<Notify>,
        group: &str,
        start: StartFrom,
        commit: Commit,
    ) -> LocalStream {
        let member = groups.join(group, &topic.name);
        LocalStream {
            groups,
            topic,
            appended,
            group: group.to_owned(),
            member,
            start,
            commit,
            generation: 0,
            positions: HashMap::new(),
        }
    }

    /// The partitions this member reads now.
    pub(crate) fn assignment(&self) -> Vec<usize> {
        self.groups.assignment(&self.group, &self.topic.name, self.member, self.topic.partitions.len())
    }

    fn rebalance(&mut self) -> Result<(), LogError> {
        let gen = self.groups.generation(&self.group, &self.topic.name);
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
            let offset = match self.groups.committed(&self.group, &self.topic.name, p)? {
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
            let notify = self.appended.clone();
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

    /// Commits the position after everything polled so far (durably).
    pub(crate) fn commit(&self) -> Result<(), LogError> {
        for (p, (offset, ..)) in &self.positions {
            self.groups.store_committed(&self.group, &self.topic.name, *p, *offset)?;
        }
        Ok(())
    }
}

impl Drop for LocalStream {
    fn drop(&mut self) {
        self.groups.leave(&self.group, &self.topic.name, self.member);
    }
}

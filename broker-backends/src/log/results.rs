//! The results log: every result document, lease, stored document and chord tally is a keyed
//! record appended to `results/<generation>/` (an empty payload deletes its key), replayed into
//! memory on open. Compaction rewrites what is live into the next generation and then switches
//! `results/CURRENT` to it atomically, so the log stays proportional to the live results rather than
//! to everything ever stored. A crash before the switch leaves the old generation in charge (the
//! half-written one is deleted on open); after it, the new one.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::sync::{Notify, RwLock};

use super::error::LogError;
use super::partition::{NewRecord, Partition, PartitionConfig};
use super::record::Record;

/// Records written per append while compacting.
const COMPACT_BATCH: usize = 4096;

/// The results log of a store.
#[derive(Debug)]
pub(crate) struct ResultsLog {
    root: PathBuf,
    cfg: PartitionConfig,
    /// The current generation and its partition. Writers hold it shared; compaction exclusively.
    current: RwLock<(u64, Arc<Partition>)>,
}

/// What a compaction did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Compacted {
    /// Bytes on disk before.
    pub bytes_before: u64,
    /// Bytes on disk after.
    pub bytes_after: u64,
    /// Live records written.
    pub records: usize,
}

fn generation_dir(root: &Path, generation: u64) -> PathBuf {
    root.join(generation.to_string())
}

fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".log"))
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .sum()
}

impl ResultsLog {
    /// Opens `root` (creating it), deletes generations other than the current one (left by a
    /// compaction that did not finish), and calls `f` with every record in order.
    pub(crate) fn open(root: &Path, cfg: &PartitionConfig, f: impl FnMut(Record)) -> Result<ResultsLog, LogError> {
        super::disk::create_dir_all(root)?;
        let current_path = root.join("CURRENT");
        let generation = match std::fs::read_to_string(&current_path) {
            Ok(s) => s.trim().parse::<u64>().map_err(|_| LogError::Corrupt {
                path: current_path.clone(),
                offset: 0,
                reason: format!("not a generation number: {s:?}"),
            })?,
            Err(_) => 0,
        };
        for entry in std::fs::read_dir(root).map_err(|e| LogError::io(root, e))?.flatten() {
            let stale = entry.file_name().to_str().and_then(|n| n.parse::<u64>().ok()).is_some_and(|g| g != generation);
            if stale {
                tracing::info!(dir = %entry.path().display(), "log: removing a results generation left by an unfinished compaction");
                std::fs::remove_dir_all(entry.path()).map_err(|e| LogError::io(&entry.path(), e))?;
            }
        }
        let part = Partition::open(&generation_dir(root, generation), cfg, Arc::new(Notify::new()))?;
        part.scan_from(0, f)?;
        Ok(ResultsLog { root: root.to_owned(), cfg: cfg.clone(), current: RwLock::new((generation, Arc::new(part))) })
    }

    /// Appends `records`, then runs `apply` (the in-memory change) before a compaction can start,
    /// so a compaction's snapshot never misses a record of the old generation.
    pub(crate) async fn append<T>(&self, records: Vec<NewRecord>, apply: impl FnOnce() -> T) -> Result<T, LogError> {
        let cur = self.current.read().await;
        cur.1.log.append(records).await?;
        Ok(apply())
    }

    /// Waits until everything appended is written.
    pub(crate) async fn flush(&self) -> Result<(), LogError> {
        self.current.read().await.1.log.flush().await
    }

    /// Bytes of segments in the current generation.
    pub(crate) async fn disk_bytes(&self) -> u64 {
        dir_bytes(&generation_dir(&self.root, self.current.read().await.0))
    }

    /// Writes `live()` (taken once no write is in flight) into the next generation, makes it
    /// durable, switches to it and deletes the old one. Writers wait meanwhile.
    pub(crate) async fn compact(&self, live: impl FnOnce() -> Vec<NewRecord>) -> Result<Compacted, LogError> {
        let mut cur = self.current.write().await;
        let (old_gen, old) = (cur.0, cur.1.clone());
        let bytes_before = dir_bytes(&generation_dir(&self.root, old_gen));
        let next_gen = old_gen + 1;
        let next_dir = generation_dir(&self.root, next_gen);
        if next_dir.exists() {
            std::fs::remove_dir_all(&next_dir).map_err(|e| LogError::io(&next_dir, e))?;
        }
        let next = Arc::new(Partition::open(&next_dir, &self.cfg, Arc::new(Notify::new()))?);
        let mut records = live();
        let count = records.len();
        while !records.is_empty() {
            let rest = records.split_off(records.len().min(COMPACT_BATCH));
            next.log.append(std::mem::replace(&mut records, rest)).await?;
        }
        // fsyncs the new segments whatever the fsync policy.
        next.checkpoint().await?;
        super::disk::replace_file(&self.root.join("CURRENT"), next_gen.to_string().as_bytes())?;
        *cur = (next_gen, next);
        drop(cur);
        old.log.close();
        drop(old);
        let old_dir = generation_dir(&self.root, old_gen);
        if let Err(e) = std::fs::remove_dir_all(&old_dir) {
            tracing::warn!(error = %e, dir = %old_dir.display(), "log: cannot remove the old results generation");
        }
        let stats = Compacted { bytes_before, bytes_after: dir_bytes(&next_dir), records: count };
        tracing::info!(?stats, "log: results compacted");
        Ok(stats)
    }
}

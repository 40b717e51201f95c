//! A queue (a topic): its partitions, which partition a record goes to, and the queue-wide counts
//! and purge over them.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::Notify;

use super::error::LogError;
use super::partition::{Partition, PartitionConfig};

/// A queue: its partitions.
#[derive(Debug)]
pub(crate) struct Topic {
    pub(crate) name: String,
    pub(crate) partitions: Vec<Arc<Partition>>,
    next: AtomicUsize,
}

impl Topic {
    /// Opens partitions `0..count` under `dir`; appends to any of them wake `on_append`.
    pub(crate) fn open(
        name: &str,
        dir: &Path,
        count: u32,
        cfg: &PartitionConfig,
        on_append: &Arc<Notify>,
    ) -> Result<Topic, LogError> {
        let partitions = (0..count)
            .map(|p| Partition::open(&dir.join(p.to_string()), cfg, on_append.clone()).map(Arc::new))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Topic { name: name.to_owned(), partitions, next: AtomicUsize::new(0) })
    }

    /// The partition for a key (hash), or round robin without one.
    pub(crate) fn pick(&self, key: &[u8]) -> &Arc<Partition> {
        let n = self.partitions.len();
        let i = if key.is_empty() {
            self.next.fetch_add(1, Ordering::Relaxed) % n
        } else {
            (crc32c::crc32c(key) as usize) % n
        };
        &self.partitions[i]
    }

    /// Records ready to be taken (not leased, not delayed).
    pub(crate) fn ready_len(&self) -> u64 {
        self.partitions.iter().map(|p| p.ready_len()).sum()
    }

    /// Delayed records seen so far.
    pub(crate) fn delayed_len(&self) -> u64 {
        self.partitions.iter().map(|p| p.delayed_len()).sum()
    }

    /// Finishes every record that is not leased, those not yet due included; how many.
    pub(crate) fn purge(&self) -> Result<u64, LogError> {
        let mut n = 0;
        for p in &self.partitions {
            n += p.purge()?;
        }
        Ok(n)
    }
}

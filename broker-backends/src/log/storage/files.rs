//! The store's open files: a bounded cache of descriptors (least recently used out), so what a
//! directory costs in descriptors does not grow with its queues.
//!
//! Segment files are opened on demand through [`FileCache::open`] and kept while
//! they are used; past [`FileCache::capacity`] the least recently used one is dropped from the
//! cache (its descriptor closes once the last reader or writer holding it lets go). An idle
//! partition therefore holds no descriptor. A partition's writer keeps the descriptor it wrote
//! through until that write is fsynced (see `partition/writer.rs`), so the fsync that acknowledges
//! a publish is always made on the descriptor that wrote it.
//!
//! Invariant: an entry is only ever for the file at its path now. A file deleted by the store
//! (retention, compaction) is [`FileCache::forget`]-ed with it, and every entry under a partition's
//! directory when the partition closes.

use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use celery_core::sync::lock;

use super::disk::FILE_MODE;
use super::error::LogError;

/// Descriptors a store keeps open by default (`max_open_files=`).
pub(crate) const DEFAULT_MAX_OPEN_FILES: usize = 256;

/// A bounded, least-recently-used cache of open files.
#[derive(Debug)]
pub(crate) struct FileCache {
    capacity: usize,
    inner: Mutex<Entries>,
}

#[derive(Debug, Default)]
struct Entries {
    files: HashMap<PathBuf, (Arc<File>, u64)>,
    /// The same entries by last use (the least recently used first): eviction in O(log n).
    by_use: BTreeMap<u64, PathBuf>,
    /// Bumped on every use: an entry's stamp says when it was last used.
    clock: u64,
}

impl Entries {
    fn remove(&mut self, path: &Path) {
        if let Some((_, used)) = self.files.remove(path) {
            self.by_use.remove(&used);
        }
    }
}

impl FileCache {
    /// A cache keeping at most `capacity` files open (at least 1).
    pub(crate) fn new(capacity: usize) -> Arc<FileCache> {
        Arc::new(FileCache { capacity: capacity.max(1), inner: Mutex::default() })
    }

    /// The most files kept open.
    #[cfg(test)]
    pub(crate) fn capacity(&self) -> usize {
        self.capacity
    }

    /// Files open in the cache now.
    pub(crate) fn len(&self) -> usize {
        lock(&self.inner).files.len()
    }

    /// The file at `path`, opened for reading and appending (created owner-only when `create`),
    /// from the cache or opened now; the least recently used entry leaves when the cache is full.
    pub(crate) fn open(&self, path: &Path, create: bool) -> Result<Arc<File>, LogError> {
        let mut e = lock(&self.inner);
        e.clock += 1;
        let now = e.clock;
        if let Some((f, used)) = e.files.get_mut(path) {
            let (f, was) = (f.clone(), std::mem::replace(used, now));
            e.by_use.remove(&was);
            e.by_use.insert(now, path.to_owned());
            return Ok(f);
        }
        let file = Arc::new(open_file(path, create).map_err(|err| LogError::io(path, err))?);
        if e.files.len() >= self.capacity {
            if let Some((_, oldest)) = e.by_use.pop_first() {
                e.files.remove(&oldest);
            }
        }
        e.files.insert(path.to_owned(), (file.clone(), now));
        e.by_use.insert(now, path.to_owned());
        Ok(file)
    }

    /// Drops the entry of `path` (the file is being deleted).
    pub(crate) fn forget(&self, path: &Path) {
        lock(&self.inner).remove(path);
    }

    /// Drops every entry under `dir` (a partition closing, a directory being deleted).
    pub(crate) fn forget_under(&self, dir: &Path) {
        let mut e = lock(&self.inner);
        e.files.retain(|p, _| !p.starts_with(dir));
        e.by_use.retain(|_, p| !p.starts_with(dir));
    }
}

/// Opens `path` for reading and appending, without access-time updates where the system allows
/// it: the first read of a segment after a write would otherwise dirty its inode (with a thousand
/// queues drained, a thousand inode updates).
fn open_file(path: &Path, create: bool) -> std::io::Result<File> {
    let mut opts = OpenOptions::new();
    opts.read(true).append(true).create(create).mode(FILE_MODE);
    #[cfg(target_os = "linux")]
    {
        let mut noatime = opts.clone();
        noatime.custom_flags(libc::O_NOATIME);
        match noatime.open(path) {
            // Only a file's owner may ask for it (a store shared with another user).
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => {}
            other => return other,
        }
    }
    opts.open(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_least_recently_used_file_leaves_and_reopens_on_demand() {
        let dir = std::env::temp_dir().join(format!("files-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let cache = FileCache::new(2);
        let (a, b, c) = (dir.join("a"), dir.join("b"), dir.join("c"));
        let fa = cache.open(&a, true).unwrap();
        cache.open(&b, true).unwrap();
        // `a` used again: `b` is now the least recently used and leaves for `c`.
        assert!(Arc::ptr_eq(&fa, &cache.open(&a, false).unwrap()));
        cache.open(&c, true).unwrap();
        assert_eq!(cache.len(), cache.capacity());
        assert!(Arc::ptr_eq(&fa, &cache.open(&a, false).unwrap()));
        // `b` is opened again (it exists); a missing file is not created without `create`.
        cache.open(&b, false).unwrap();
        assert!(cache.open(&dir.join("missing"), false).is_err());
        assert!(!dir.join("missing").exists());
        cache.forget_under(&dir);
        assert_eq!(cache.len(), 0);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Many misses over few slots: the index by last use stays the same size as the cache (an
    /// eviction that left its index entry behind would grow it by one per miss).
    #[test]
    fn the_index_by_use_follows_every_eviction() {
        let dir = std::env::temp_dir().join(format!("files-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let cache = FileCache::new(3);
        let paths: Vec<PathBuf> = (0..10).map(|i| dir.join(format!("f{i}"))).collect();
        for round in 0..20 {
            for p in &paths {
                cache.open(p, true).unwrap();
                if round % 2 == 0 {
                    cache.open(p, false).unwrap(); // a hit as well
                }
            }
            let e = lock(&cache.inner);
            assert_eq!(e.files.len(), 3);
            assert_eq!(e.by_use.len(), 3, "round {round}");
            assert!(e.by_use.values().all(|p| e.files.contains_key(p)));
        }
        // The three used last are the ones kept.
        let kept: Vec<PathBuf> = lock(&cache.inner).by_use.values().cloned().collect();
        assert_eq!(kept, paths[7..].to_vec());
        cache.forget(&paths[8]);
        assert_eq!(lock(&cache.inner).by_use.len(), 2);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

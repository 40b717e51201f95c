//! Every file operation of the store goes through here: directories are created owner-only (0700),
//! files owner-only (0600), metadata is replaced durably (temp file, fsync, rename, fsync of the
//! directory), and the writer's appends and fsyncs pass one seam where tests inject faults.
//!
//! The seam: in `cargo test` builds, [`faults`] lets a test make the next writes or fsyncs under a
//! path fail (EIO, ENOSPC, a short write), so the store's behaviour under a failing disk (pending
//! publishes fail, nothing acknowledged is lost, it resumes when the fault clears) is tested
//! without a special file system. Release builds compile the seam away.

use std::fs::{DirBuilder, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

use super::error::LogError;

/// Mode of every directory the store creates.
pub(crate) const DIR_MODE: u32 = 0o700;
/// Mode of every file the store creates.
pub(crate) const FILE_MODE: u32 = 0o600;

/// Creates `dir` and its missing parents, owner-only.
pub(crate) fn create_dir_all(dir: &Path) -> Result<(), LogError> {
    DirBuilder::new().recursive(true).mode(DIR_MODE).create(dir).map_err(|e| LogError::io(dir, e))
}

/// Makes an existing directory owner-only when it is readable by others (a data directory made by
/// hand, or by a version that did not restrict it); says so when it changes it.
pub(crate) fn restrict_dir(dir: &Path) -> Result<(), LogError> {
    let meta = std::fs::metadata(dir).map_err(|e| LogError::io(dir, e))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        tracing::info!(dir = %dir.display(), mode = format!("{mode:o}"), "log: making the data directory owner-only (0700)");
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(DIR_MODE)).map_err(|e| LogError::io(dir, e))?;
    }
    Ok(())
}

/// Replaces `path` with `data` atomically and durably: write `<path>.tmp` (owner-only), fsync,
/// rename, fsync the directory. A crash leaves the old file or the new one, never a mix or nothing.
pub(crate) fn replace_file(path: &Path, data: &[u8]) -> Result<(), LogError> {
    let tmp = path.with_extension("tmp");
    let f = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(FILE_MODE)
        .open(&tmp)
        .map_err(|e| LogError::io(&tmp, e))?;
    write_all(&f, data, &tmp)?;
    sync_all(&f, &tmp)?;
    std::fs::rename(&tmp, path).map_err(|e| LogError::io(path, e))?;
    sync_dir(path.parent().unwrap_or(Path::new(".")))
}

/// Creates `path` (owner-only; it must not exist) holding `data`, fsynced: for a file inside a
/// directory that is made durable and renamed into place afterwards (no entry of its own to sync).
pub(crate) fn write_new(path: &Path, data: &[u8]) -> Result<(), LogError> {
    let f = OpenOptions::new()
        .create_new(true)
        .write(true)
        .mode(FILE_MODE)
        .open(path)
        .map_err(|e| LogError::io(path, e))?;
    write_all(&f, data, path)?;
    sync_all(&f, path)
}

/// fsyncs a directory so a created or renamed entry survives a crash.
pub(crate) fn sync_dir(dir: &Path) -> Result<(), LogError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| LogError::io(dir, e))
}

/// Writes all of `data` (the writer's appends): a short or failed write is an error.
pub(crate) fn write_all(mut file: &File, data: &[u8], path: &Path) -> Result<(), LogError> {
    #[cfg(test)]
    if let Some(e) = faults::take(path, faults::Op::Write) {
        if let faults::Fault::ShortWrite = e.1 {
            // Part of the data reaches the file, as a torn write would leave it.
            let _ = file.write_all(&data[..data.len() / 2]);
        }
        return Err(LogError::io(path, e.0));
    }
    file.write_all(data).map_err(|e| LogError::io(path, e))
}

/// `fdatasync`.
pub(crate) fn sync_data(file: &File, path: &Path) -> Result<(), LogError> {
    #[cfg(test)]
    if let Some(e) = faults::take(path, faults::Op::Sync) {
        return Err(LogError::io(path, e.0));
    }
    file.sync_data().map_err(|e| LogError::io(path, e))
}

/// `fsync`.
pub(crate) fn sync_all(file: &File, path: &Path) -> Result<(), LogError> {
    #[cfg(test)]
    if let Some(e) = faults::take(path, faults::Op::Sync) {
        return Err(LogError::io(path, e.0));
    }
    file.sync_all().map_err(|e| LogError::io(path, e))
}

/// Injected disk faults, for tests: `faults::inject(dir, Op::Sync, Fault::Eio, 3)` makes the next
/// three fsyncs of files under `dir` fail with EIO.
#[cfg(test)]
pub(crate) mod faults {
    use std::path::{Path, PathBuf};
    use std::sync::Mutex;

    /// The operation a fault hits.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub(crate) enum Op {
        Write,
        Sync,
    }

    /// What the operation does instead.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub(crate) enum Fault {
        /// Fails with EIO.
        Eio,
        /// Fails with ENOSPC.
        NoSpace,
        /// Writes half the data, then fails with EIO (a write only).
        ShortWrite,
    }

    static PLAN: Mutex<Vec<(PathBuf, Op, Fault, usize)>> = Mutex::new(Vec::new());

    /// Makes the next `times` operations `op` on files under `under` fail with `fault`.
    pub(crate) fn inject(under: &Path, op: Op, fault: Fault, times: usize) {
        celery_core::sync::lock(&PLAN).push((under.to_owned(), op, fault, times));
    }

    /// Removes every fault under `under` (the disk is healthy again).
    pub(crate) fn clear(under: &Path) {
        celery_core::sync::lock(&PLAN).retain(|(p, ..)| !p.starts_with(under));
    }

    pub(super) fn take(path: &Path, op: Op) -> Option<(std::io::Error, Fault)> {
        let mut plan = celery_core::sync::lock(&PLAN);
        let i = plan.iter().position(|(under, o, _, n)| *o == op && *n > 0 && path.starts_with(under))?;
        plan[i].3 -= 1;
        let fault = plan[i].2;
        let errno = if fault == Fault::NoSpace { 28 } else { 5 };
        Some((std::io::Error::from_raw_os_error(errno), fault))
    }
}

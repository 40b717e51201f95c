//! Taking over a directory whose owner is gone. The owner holds `LOCK` (an advisory `flock` the
//! kernel drops when it dies) and serves `broker.sock`; the other processes on the directory are
//! its clients. When a client's connection fails, it tries the lock before reconnecting: the first
//! to get it opens the directory (recovering as on any start), serves the socket, and talks to it
//! like every other client.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use celery_core::sync::lock;
use celery_core::BrokerError;

use crate::log::storage::{LogError, LogStore, StoreConfig};

/// For a client of a directory's owner: the directory, to own it when the owner is gone.
#[derive(Debug)]
pub(crate) struct Takeover {
    dir: PathBuf,
    cfg: StoreConfig,
    /// The store this process took over (its socket serves this client too).
    owned: Mutex<Option<Arc<LogStore>>>,
}

impl Takeover {
    pub(crate) fn new(dir: PathBuf, cfg: StoreConfig) -> Takeover {
        Takeover { dir, cfg, owned: Mutex::new(None) }
    }

    /// Opens the directory if its owner is gone and serves its socket; true when this process
    /// owns it now.
    pub(super) fn try_own(&self) -> Result<bool, BrokerError> {
        match LogStore::open(&self.dir, self.cfg.clone()) {
            Ok(store) => {
                store.serve_unix();
                tracing::warn!(dir = %self.dir.display(), "log: the directory's owner is gone; this process owns it now");
                *lock(&self.owned) = Some(store);
                Ok(true)
            }
            Err(LogError::Locked { .. }) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }
}

//! Exchanges and bindings (RabbitMQ's model, `celery_core::routing`), kept in `routing.json`
//! (replaced atomically: tmp, fsync, rename, fsync of the directory).

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use celery_core::routing::{Binding, ExchangeKind, RoutingTable};
use celery_core::sync::lock;
use serde_json::{Map, Value};

use super::error::LogError;

/// The routing table of a store and where it is kept.
#[derive(Debug)]
pub(crate) struct Routes {
    dir: PathBuf,
    table: Mutex<RoutingTable>,
}

impl Routes {
    /// Loads `dir/routing.json` (none: an empty table).
    pub(crate) fn load(dir: &Path) -> Result<Routes, LogError> {
        let path = dir.join("routing.json");
        let table = match std::fs::read(&path) {
            Ok(data) => serde_json::from_slice(&data).map_err(|e| LogError::Corrupt {
                path,
                offset: 0,
                reason: format!("routing table: {e}"),
            })?,
            Err(_) => RoutingTable::default(),
        };
        Ok(Routes { dir: dir.to_owned(), table: Mutex::new(table) })
    }

    /// Declares an exchange; a new declaration is saved.
    pub(crate) fn declare(&self, name: &str, kind: ExchangeKind) -> Result<(), LogError> {
        let mut t = lock(&self.table);
        if t.declare(name, kind)? {
            self.save(&t)?;
        }
        Ok(())
    }

    /// Binds a queue; a new binding is saved.
    pub(crate) fn bind(&self, b: &Binding) -> Result<(), LogError> {
        let mut t = lock(&self.table);
        if t.bind(b.clone())? {
            self.save(&t)?;
        }
        Ok(())
    }

    /// The queues a publish through `exchange` reaches.
    pub(crate) fn route(
        &self,
        exchange: &str,
        key: &str,
        headers: &Map<String, Value>,
    ) -> Result<Vec<String>, LogError> {
        Ok(lock(&self.table).route(exchange, key, headers)?)
    }

    /// Replaces `routing.json` atomically (write, fsync, rename, fsync the directory).
    fn save(&self, t: &RoutingTable) -> Result<(), LogError> {
        let data = serde_json::to_vec_pretty(t).map_err(|source| LogError::Json { what: "routing table", source })?;
        super::disk::replace_file(&self.dir.join("routing.json"), &data)
    }
}

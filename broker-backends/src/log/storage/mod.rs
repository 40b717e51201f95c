//! The storage engine of the built-in broker: everything on disk and in memory of a data
//! directory, and nothing of sockets (the network layer, `log::net`, serves an open store; the
//! facade, `log::LogBroker`, picks one or the other).
//!
//! From the bytes up (each module uses only those above it, and none of them uses `net` or the
//! facade):
//! - [`error`]: [`LogError`], the storage error, with its kind;
//! - [`disk`]: every file operation (owner-only modes, durable replace, the fault-injection seam);
//!   [`names`]: names that become paths; [`files`]: the bounded cache of open files;
//! - [`record`]: the record frame and [`NewRecord`]; [`payload`]: a task record's payload;
//! - [`segment`]: segment files, recovery of a torn tail, resync past damage;
//! - [`partition`]: one partition: `writer` (the append log and its group-commit writer),
//!   `finished` (the durable finished set), `leases` (what is handed out), and the queue
//!   operations in `partition/mod.rs`;
//! - [`topic`]: a queue's partitions; [`peek`]: reading a queue without taking;
//! - [`results`]: the results log and [`ResultStore`] (results, leases, stored documents, chords);
//! - [`flow`]: per-key concurrency slots and parked messages (held by the owner);
//! - [`stream`]: stream groups and their members in this process;
//! - [`routing`], [`broadcast`]: exchanges and bindings, broadcasts;
//! - [`store`]: [`LogStore`], the open directory (LOCK, topics, the expiry sweep, retention);
//! - [`consumer`]: the task consumer of a local store and how its deliveries settle.

pub(crate) mod broadcast;
pub(crate) mod consumer;
pub(crate) mod disk;
pub(crate) mod error;
pub(crate) mod files;
pub(crate) mod flow;
pub(crate) mod names;
pub(crate) mod partition;
pub(crate) mod payload;
pub(crate) mod peek;
pub(crate) mod record;
pub(crate) mod results;
pub(crate) mod routing;
pub(crate) mod segment;
pub(crate) mod store;
pub(crate) mod stream;
pub(crate) mod topic;

pub use error::LogError;
pub use partition::{Fsync, Retention};
pub use record::{NewRecord, Record};
pub use results::{Compacted, ResultStore};
pub use store::{LogStore, StoreConfig, DEFAULT_MAX_RECORD};
pub use stream::{Commit, StartFrom, StreamRecord};

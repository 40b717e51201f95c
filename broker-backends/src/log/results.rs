//! [`Results`]: the results API of a log store for the result backend (`log://` results): result
//! documents with expiry and waiters, leases (idempotency claims, beat's leader election) and chord
//! tallies, in this process when it owns the directory ([`ResultStore`](super::ResultStore)), or
//! through the owner over the socket protocol.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use celery_core::backend::ChordMember;
use celery_core::history::{check_batch, check_query, History, HistoryPage, HistoryQuery, Retain, TaskRecord};
use celery_core::{BrokerError, ProtocolError};

use super::net::remote::RemoteStore;
use super::storage::results::{is_ready, is_success, lease_key};
use super::storage::{LogError, LogStore};

/// The results of a log store, here or through its owner (from
/// [`LogBroker::results`](super::LogBroker::results)). Documents are Celery's result documents: a
/// stored SUCCESS is never replaced, and [`wait`](Results::wait) ends at a ready state.
#[derive(Debug, Clone)]
pub struct Results {
    at: At,
}

#[derive(Debug, Clone)]
enum At {
    Local(Arc<LogStore>),
    Remote(Arc<RemoteStore>),
}

impl Results {
    pub(crate) fn local(store: Arc<LogStore>) -> Results {
        Results { at: At::Local(store) }
    }

    pub(crate) fn remote(client: Arc<RemoteStore>) -> Results {
        Results { at: At::Remote(client) }
    }

    /// Stores a result document for `ttl` unless a SUCCESS is stored already.
    pub async fn put(&self, id: &str, doc: Vec<u8>, ttl: Duration) -> Result<(), BrokerError> {
        match &self.at {
            At::Local(s) => s.results().put(id, doc, ttl, is_success).await.map(|_| ()).map_err(refused),
            At::Remote(c) => c.put_result(id, &doc, ttl).await,
        }
    }

    /// Stores each `(id, document)` for `ttl` as [`put`](Results::put) does, in order: here with
    /// one append for all (one write, one sync); through the owner, all at once, or one after
    /// another when an id repeats (its documents keep their order).
    pub async fn put_many(&self, docs: Vec<(String, Vec<u8>)>, ttl: Duration) -> Result<(), BrokerError> {
        match &self.at {
            At::Local(s) => s.results().put_many(docs, ttl, is_success).await.map(|_| ()).map_err(refused),
            At::Remote(c) => {
                let ids: std::collections::HashSet<&str> = docs.iter().map(|(id, _)| id.as_str()).collect();
                if ids.len() == docs.len() {
                    futures::future::try_join_all(docs.iter().map(|(id, doc)| c.put_result(id, doc, ttl))).await?;
                } else {
                    for (id, doc) in &docs {
                        c.put_result(id, doc, ttl).await?;
                    }
                }
                Ok(())
            }
        }
    }

    /// The result document of `id`.
    pub async fn get(&self, id: &str) -> Result<Option<Vec<u8>>, BrokerError> {
        match &self.at {
            At::Local(s) => Ok(s.results().get(id)),
            At::Remote(c) => c.get_result(id).await,
        }
    }

    /// Waits for a ready result document of `id` (SUCCESS, FAILURE, REVOKED), at most `timeout`;
    /// the latest document at the timeout.
    pub async fn wait(&self, id: &str, timeout: Duration) -> Result<Option<Vec<u8>>, BrokerError> {
        match &self.at {
            At::Local(s) => Ok(s.results().wait(id, timeout, is_ready).await),
            At::Remote(c) => c.wait_result(id, timeout).await,
        }
    }

    /// Deletes the result document of `id`.
    pub async fn forget(&self, id: &str) -> Result<(), BrokerError> {
        match &self.at {
            At::Local(s) => Ok(s.results().forget(id).await?),
            At::Remote(c) => c.forget_result(id).await,
        }
    }

    /// Takes or renews (`ttl` given) or releases (`None`) the lease `name` for `holder`; true when
    /// `holder` holds it afterwards. Leases survive an owner restart.
    pub async fn lease(&self, name: &str, holder: &str, ttl: Option<Duration>) -> Result<bool, BrokerError> {
        match &self.at {
            At::Local(s) => Ok(s.results().lease(name, holder, ttl).await?),
            At::Remote(c) => c.lease(name, holder, ttl).await,
        }
    }

    /// Who holds the lease `name`, if anyone.
    pub async fn lease_holder(&self, name: &str) -> Result<Option<String>, BrokerError> {
        match &self.at {
            At::Local(s) => Ok(s.results().lease_holder(name)),
            At::Remote(c) => {
                Ok(c.get_result(&lease_key(name)).await?.map(|h| String::from_utf8_lossy(&h).into_owned()))
            }
        }
    }

    /// Records a chord's size (kept for `ttl`).
    pub async fn chord_size(&self, group: &str, size: usize, ttl: Duration) -> Result<(), BrokerError> {
        match &self.at {
            At::Local(s) => Ok(s.results().chord_size(group, size, ttl).await?),
            At::Remote(c) => c.chord_size(group, size, ttl).await,
        }
    }

    /// Counts a chord member (see `Chords::chord_part`); every member, to the one that
    /// completes the chord.
    pub async fn chord_part(
        &self,
        group: &str,
        member: &ChordMember,
        ttl: Duration,
    ) -> Result<Option<Vec<ChordMember>>, BrokerError> {
        match &self.at {
            At::Local(s) => Ok(s.results().chord_part(group, member.clone(), ttl).await?),
            At::Remote(c) => c.chord_part(group, member, ttl).await,
        }
    }

    /// Forgets a chord's tally.
    pub async fn chord_done(&self, group: &str) -> Result<(), BrokerError> {
        match &self.at {
            At::Local(s) => Ok(s.results().chord_done(group).await?),
            At::Remote(c) => c.chord_done(group).await,
        }
    }
}

/// A document over the store's record size limit is the document's fault, not the store's: a
/// protocol error ([`celery_core::error::ErrorKind::Message`]; the `log://` result backend makes
/// it `BackendError::Malformed`), so that a worker dead-letters its task rather than run it again
/// for a result that would be refused again. Anything else as the store's error.
fn refused(e: LogError) -> BrokerError {
    match e {
        too_large @ LogError::TooLarge { .. } => result_refused(too_large.to_string()),
        e => e.into(),
    }
}

/// The error of a result document refused for its size, here or by the directory's owner.
pub(crate) fn result_refused(reason: String) -> BrokerError {
    BrokerError::Protocol(ProtocolError::InvalidField { field: "result", reason })
}

/// The monitor's task history, kept by the directory's owner in its results log (a compacted
/// topic: `_celery_rs.history.<id>`) and searched there; the broker's and the `log://` result
/// backend's history are this one.
#[async_trait]
impl History for Results {
    async fn record(&self, tasks: &[TaskRecord], keep: &Retain) -> Result<(), BrokerError> {
        check_batch(tasks)?;
        match &self.at {
            At::Local(s) => Ok(s.results().record_history(tasks, keep).await?),
            At::Remote(c) => c.record_history(tasks, keep).await,
        }
    }

    async fn search(&self, query: &HistoryQuery) -> Result<HistoryPage, BrokerError> {
        check_query(query)?;
        match &self.at {
            At::Local(s) => Ok(s.results().search_history(query)),
            At::Remote(c) => c.search_history(query).await,
        }
    }
}

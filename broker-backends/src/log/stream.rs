//! [`StreamConsumer`]: a member of a stream consumer group (Kafka's model, `storage/stream.rs`), in
//! the process that owns the directory or on the server of a client.

use std::sync::Arc;
use std::time::Duration;

use celery_core::BrokerError;

use super::net::remote::RemoteStream;
use super::storage::stream::LocalStream;
use super::storage::{LogStore, StreamRecord};

/// A member of a consumer group reading one topic: in this process, or on the server of a client.
///
/// ```
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// use broker_backends::log::{Commit, LogBroker, StartFrom};
/// use celery_core::{Broker, routing::Route, protocol::Message, Signature};
/// let dir = std::env::temp_dir().join(format!("doc-stream-{}", std::process::id()));
/// let broker = LogBroker::connect(&format!("log://{}", dir.display())).await.unwrap();
/// let msg = Message::from_signature(&Signature::by_name("evt")).unwrap();
/// broker.publish(&Route::queue("events"), &msg).await.unwrap();
/// let mut c = broker.stream("analytics", "events", StartFrom::Earliest, Commit::AfterProcessing).await.unwrap();
/// let batch = c.poll(100, std::time::Duration::from_secs(1)).await.unwrap();
/// assert_eq!(batch.len(), 1);
/// c.commit().await.unwrap();
/// # std::fs::remove_dir_all(dir).ok();
/// # });
/// ```
#[derive(Debug)]
pub struct StreamConsumer {
    member: Member,
}

#[derive(Debug)]
enum Member {
    /// A member of this process, and its store (kept open while the member reads it; dropped after
    /// the member has left its group).
    Local {
        member: LocalStream,
        _store: Arc<LogStore>,
    },
    Remote(RemoteStream),
}

impl StreamConsumer {
    pub(crate) fn local(store: Arc<LogStore>, member: LocalStream) -> StreamConsumer {
        StreamConsumer { member: Member::Local { member, _store: store } }
    }

    pub(crate) fn remote(s: RemoteStream) -> StreamConsumer {
        StreamConsumer { member: Member::Remote(s) }
    }

    /// The partitions this member reads now.
    pub async fn assignment(&self) -> Result<Vec<usize>, BrokerError> {
        match &self.member {
            Member::Local { member, .. } => Ok(member.assignment()),
            Member::Remote(s) => s.assignment().await,
        }
    }

    /// Up to `max` records from the assigned partitions, waiting up to `timeout` for the first.
    /// With [`Commit::BeforeProcessing`](super::Commit::BeforeProcessing) their offsets are
    /// committed before they are returned. A client whose connection was lost joins the group
    /// again here (reading from the committed offsets).
    pub async fn poll(&mut self, max: usize, timeout: Duration) -> Result<Vec<StreamRecord>, BrokerError> {
        match &mut self.member {
            Member::Local { member, .. } => Ok(member.poll(max, usize::MAX, timeout).await?),
            Member::Remote(s) => s.poll(max, timeout).await,
        }
    }

    /// Commits the position after everything polled so far (durably). Fails, committing nothing,
    /// when the connection the records came over is lost.
    pub async fn commit(&self) -> Result<(), BrokerError> {
        match &self.member {
            Member::Local { member, .. } => Ok(member.commit()?),
            Member::Remote(s) => s.commit().await,
        }
    }
}

//! A stream-group member of a client: it lives on the server for as long as the connection it
//! joined over (`STREAM_JOIN`), and joins again from the committed offsets on a new connection.

use std::sync::Arc;
use std::time::Duration;

use celery_core::BrokerError;

use super::{bad_reply, call_on, read_u64, Conn, RemoteStore};
use crate::log::net::wire::{kind, Dec, Enc};
use crate::log::storage::{Commit, StartFrom, StreamRecord};

/// A stream-group member living on the server, for as long as the connection it joined over.
#[derive(Debug)]
pub(crate) struct RemoteStream {
    client: Arc<RemoteStore>,
    group: String,
    queue: String,
    start: StartFrom,
    commit: Commit,
    /// The connection and the member's handle there.
    member: Option<(Arc<Conn>, u64)>,
}

impl RemoteStream {
    pub(crate) async fn join(
        client: Arc<RemoteStore>,
        group: &str,
        queue: &str,
        start: StartFrom,
        commit: Commit,
    ) -> Result<RemoteStream, BrokerError> {
        let mut s = RemoteStream { client, group: group.into(), queue: queue.into(), start, commit, member: None };
        s.joined().await?;
        Ok(s)
    }

    /// The member on a live connection, joining again when the old connection is lost.
    async fn joined(&mut self) -> Result<(Arc<Conn>, u64), BrokerError> {
        if let Ok(m) = self.live() {
            return Ok(m);
        }
        let c = self.client.conn().await?;
        let id = self.client.id();
        let frame = Enc::frame(kind::STREAM_JOIN, id)
            .str(&self.group)
            .str(&self.queue)
            .u8((self.start == StartFrom::Latest) as u8)
            .u8((self.commit == Commit::BeforeProcessing) as u8)
            .finish();
        let handle = read_u64(&call_on(&c, id, frame).await?)?;
        self.member = Some((c.clone(), handle));
        Ok((c, handle))
    }

    /// The member, unless its connection is lost (then the server has dropped it, and with it what
    /// it read but did not commit).
    fn live(&self) -> Result<(Arc<Conn>, u64), BrokerError> {
        match &self.member {
            Some((c, h)) if c.is_alive() => Ok((c.clone(), *h)),
            Some((c, _)) => Err(c.lost()),
            None => Err(BrokerError::connection("the stream member has not joined")),
        }
    }

    async fn request(&self, c: &Conn, kind: u8, build: impl FnOnce(Enc) -> Enc) -> Result<Vec<u8>, BrokerError> {
        let id = self.client.id();
        call_on(c, id, build(Enc::frame(kind, id)).finish()).await
    }

    pub(crate) async fn poll(&mut self, max: usize, timeout: Duration) -> Result<Vec<StreamRecord>, BrokerError> {
        let (c, h) = self.joined().await?;
        let max = max.min(u32::MAX as usize) as u32;
        let ms = timeout.as_millis().min(u64::MAX as u128) as u64;
        let body = self.request(&c, kind::STREAM_POLL, |e| e.u64(h).u32(max).u64(ms)).await?;
        let mut d = Dec::new(&body);
        let n = d.u32().map_err(bad_reply)?;
        (0..n).map(|_| d.stream_record().map_err(bad_reply)).collect()
    }

    pub(crate) async fn commit(&self) -> Result<(), BrokerError> {
        let (c, h) = self.live()?;
        self.request(&c, kind::STREAM_COMMIT, |e| e.u64(h)).await.map(|_| ())
    }

    pub(crate) async fn assignment(&self) -> Result<Vec<usize>, BrokerError> {
        let (c, h) = self.live()?;
        let body = self.request(&c, kind::STREAM_ASSIGNMENT, |e| e.u64(h)).await?;
        let mut d = Dec::new(&body);
        let n = d.u32().map_err(bad_reply)?;
        (0..n).map(|_| d.u32().map(|p| p as usize).map_err(bad_reply)).collect()
    }
}

impl Drop for RemoteStream {
    /// Leaves the group at once (without waiting for the answer), so the others take the partitions.
    fn drop(&mut self) {
        if let Ok((c, h)) = self.live() {
            let id = self.client.id();
            let _ = c.tx.send(Enc::frame(kind::STREAM_LEAVE, id).u64(h).finish());
        }
    }
}

//! The client side of the socket protocol: `log+tcp://HOST:PORT`, and `log://PATH` when another
//! process owns the directory (through its unix socket). Requests are pipelined over one connection;
//! a lost connection fails the requests in flight (the producer API retries them) and is
//! re-established on the next request; consumers resubscribe. When a directory's owner is gone
//! (exited, or killed: its lock is stale), the next client to reconnect opens the directory itself
//! and serves the others.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use celery_core::broker::Settle;
use celery_core::protocol::Message;
use celery_core::{BrokerError, Consumer, Delivery};
use chrono::{DateTime, Utc};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, oneshot};

use super::error::LogError;
use super::store::{LogStore, StoreConfig};
use super::stream::{Commit, StartFrom, StreamRecord};
use super::wire::{self, kind, settle, Dec, Enc};

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Where the server is.
#[derive(Debug, Clone)]
pub(crate) enum Target {
    Unix(PathBuf),
    /// `HOST:PORT`, with TLS for `log+tls://`.
    Tcp(String, Option<super::tls::ClientTls>),
}

/// A delivery pushed by the server.
#[derive(Debug)]
pub(crate) struct Pushed {
    delivery: u64,
    queue: String,
    deliveries: u32,
    payload: Vec<u8>,
}

type Pending = Mutex<HashMap<u64, oneshot::Sender<Result<Vec<u8>, String>>>>;

#[derive(Debug)]
struct Conn {
    tx: mpsc::UnboundedSender<Vec<u8>>,
    pending: Arc<Pending>,
    pushes: Arc<Mutex<HashMap<u64, mpsc::UnboundedSender<Pushed>>>>,
    alive: Arc<AtomicBool>,
    /// Why the reader stopped, when it failed (a TLS alert, a reset).
    lost: Arc<Mutex<Option<String>>>,
}

impl Conn {
    fn lost(&self) -> BrokerError {
        match lock(&self.lost).as_deref() {
            Some(why) => conn_err(format!("connection to the log server lost: {why}")),
            None => conn_err("connection to the log server lost"),
        }
    }
}

/// A connection to a log server, re-established on demand. Its `Debug` leaves the token out.
pub(crate) struct RemoteClient {
    target: Target,
    token: String,
    conn: tokio::sync::Mutex<Option<Arc<Conn>>>,
    next_id: AtomicU64,
    takeover: Option<Takeover>,
}

impl std::fmt::Debug for RemoteClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let token = if self.token.is_empty() { "" } else { "***" };
        f.debug_struct("RemoteClient").field("target", &self.target).field("token", &token).finish_non_exhaustive()
    }
}

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

    /// Opens the directory if its owner is gone; true when this process owns it now.
    fn try_own(&self) -> Result<bool, BrokerError> {
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

fn conn_err(e: impl std::fmt::Display) -> BrokerError {
    BrokerError::connection(e.to_string())
}

impl RemoteClient {
    pub(crate) fn new(target: Target, token: String, takeover: Option<Takeover>) -> RemoteClient {
        RemoteClient { target, token, conn: tokio::sync::Mutex::new(None), next_id: AtomicU64::new(1), takeover }
    }

    fn id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    async fn conn(&self) -> Result<Arc<Conn>, BrokerError> {
        let mut guard = self.conn.lock().await;
        if let Some(c) = guard.as_ref().filter(|c| c.alive.load(Ordering::Acquire)) {
            return Ok(c.clone());
        }
        let lost = guard.is_some();
        let c = match &self.target {
            Target::Unix(p) => {
                let failed = |e: std::io::Error| conn_err(format!("{}: {e}", p.display()));
                match tokio::net::UnixStream::connect(p).await {
                    Ok(s) => start(s),
                    Err(e) => match &self.takeover {
                        // Nobody listens: if the owner is gone, own the directory and talk to our own socket.
                        Some(t) if t.try_own()? => start(tokio::net::UnixStream::connect(p).await.map_err(failed)?),
                        _ => return Err(failed(e)),
                    },
                }
            }
            Target::Tcp(a, tls) => {
                let s = tokio::net::TcpStream::connect(a).await.map_err(|e| conn_err(format!("{a}: {e}")))?;
                let _ = s.set_nodelay(true);
                match tls {
                    Some(tls) => start(tls.connect(s).await.map_err(|e| conn_err(format!("{a}: TLS: {e}")))?),
                    None => start(s),
                }
            }
        };
        let c = Arc::new(c);
        let id = self.id();
        let hello = Enc::frame(kind::HELLO, id).str(&self.token).finish();
        call_on(&c, id, hello).await?;
        if lost {
            crate::reconnected("log");
        }
        *guard = Some(c.clone());
        Ok(c)
    }

    /// Sends a request built by `build` and returns the response body. A request the server did
    /// not handle because it was closing the connection (idle) is sent again on a new one.
    pub(crate) async fn call(&self, kind: u8, build: impl Fn(Enc) -> Enc) -> Result<Vec<u8>, BrokerError> {
        let c = self.conn().await?;
        let id = self.id();
        match call_on(&c, id, build(Enc::frame(kind, id)).finish()).await {
            Err(BrokerError::Operation { context, .. }) if context == wire::NOT_HANDLED => {
                let c = self.conn().await?;
                let id = self.id();
                call_on(&c, id, build(Enc::frame(kind, id)).finish()).await
            }
            other => other,
        }
    }

    /// Sends a request whose answer is a stream of pushed frames (`CONSUME`, `SUBSCRIBE`); they
    /// arrive on the returned channel, over the returned connection.
    async fn push_request(&self, kind: u8, build: impl FnOnce(Enc) -> Enc) -> Result<Subscribed, BrokerError> {
        let c = self.conn().await?;
        let id = self.id();
        let (ptx, prx) = mpsc::unbounded_channel();
        lock(&c.pushes).insert(id, ptx);
        call_on(&c, id, build(Enc::frame(kind, id)).finish()).await?;
        Ok((id, prx, c))
    }

    /// Subscribes a consumer; pushed deliveries arrive on the returned channel.
    async fn subscribe(&self, queues: &[String], prefetch: usize) -> Result<Subscribed, BrokerError> {
        self.push_request(kind::CONSUME, |e| {
            queues.iter().fold(e.u32(prefetch as u32).u32(queues.len() as u32), |e, q| e.str(q))
        })
        .await
    }
}

async fn call_on(c: &Conn, id: u64, frame: Vec<u8>) -> Result<Vec<u8>, BrokerError> {
    let (tx, rx) = oneshot::channel();
    lock(&c.pending).insert(id, tx);
    // The reader marks the connection dead and then fails what is pending: a request registered
    // after that would wait forever, so check again once registered.
    if !c.alive.load(Ordering::Acquire) || c.tx.send(frame).is_err() {
        lock(&c.pending).remove(&id);
        return Err(c.lost());
    }
    match rx.await {
        Ok(Ok(body)) => Ok(body),
        Ok(Err(msg)) => Err(BrokerError::operation(msg)),
        Err(_) => Err(c.lost()),
    }
}

fn start<S: AsyncRead + AsyncWrite + Send + 'static>(stream: S) -> Conn {
    let (rd, wr) = tokio::io::split(stream);
    // Buffered: a frame is read with one syscall for many frames, not two for each.
    let mut rd = tokio::io::BufReader::with_capacity(wire::READ_BUFFER, rd);
    let (tx, rx) = mpsc::unbounded_channel::<Vec<u8>>();
    let pending: Arc<Pending> = Arc::default();
    let pushes: Arc<Mutex<HashMap<u64, mpsc::UnboundedSender<Pushed>>>> = Arc::default();
    let alive = Arc::new(AtomicBool::new(true));
    let alive_w = alive.clone();
    tokio::spawn(async move {
        // Ends when every handle on the connection is gone: the stream is closed, so the server
        // returns the deliveries we held.
        wire::write_frames(wr, rx, None, std::future::pending()).await;
        alive_w.store(false, Ordering::Release);
    });
    let lost: Arc<Mutex<Option<String>>> = Arc::default();
    let (p2, pu2, alive_r, lost_r) = (pending.clone(), pushes.clone(), alive.clone(), lost.clone());
    tokio::spawn(async move {
        loop {
            let frame = match wire::read_frame(&mut rd, wire::MAX_FRAME).await {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "log client: connection failed");
                    *lock(&lost_r) = Some(e.to_string());
                    break;
                }
            };
            match frame.kind {
                kind::OK => {
                    if let Some(w) = lock(&p2).remove(&frame.id) {
                        let _ = w.send(Ok(frame.body));
                    }
                }
                kind::ERR => {
                    let msg = Dec::new(&frame.body).str().unwrap_or_else(|_| "error".into());
                    match lock(&p2).remove(&frame.id) {
                        Some(w) => {
                            let _ = w.send(Err(msg));
                        }
                        // Id 0: why the server is closing the connection (an idle or HELLO timeout,
                        // the connection limit, a bad frame). No new request goes this way; those
                        // in flight fail with it, or are answered `NOT_HANDLED` and sent again.
                        None if frame.id == 0 => {
                            tracing::debug!(reason = %msg, "log client: the server is closing the connection");
                            *lock(&lost_r) = Some(msg);
                            alive_r.store(false, Ordering::Release);
                        }
                        None => {}
                    }
                }
                kind::DELIVERY => {
                    let mut d = Dec::new(&frame.body);
                    let parsed = (|| {
                        Ok::<_, std::io::Error>(Pushed {
                            delivery: d.u64()?,
                            queue: d.str()?,
                            deliveries: d.u32()?,
                            payload: d.bytes()?.to_vec(),
                        })
                    })();
                    if let (Ok(p), Some(ch)) = (parsed, lock(&pu2).get(&frame.id)) {
                        let _ = ch.send(p);
                    }
                }
                other => tracing::warn!(kind = other, "log client: unexpected frame"),
            }
        }
        alive_r.store(false, Ordering::Release);
        lock(&p2).clear();
        lock(&pu2).clear();
    });
    Conn { tx, pending, pushes, alive, lost }
}

/// A broadcast subscription over a connection (`SUBSCRIBE`); pushes arrive as `DELIVERY` frames
/// whose queue is the routing key. Subscribed when this returns; it subscribes again after a
/// reconnect (broadcasts sent while disconnected are missed: at most once).
pub(crate) async fn broadcast_subscription(
    client: Arc<RemoteClient>,
    exchange: String,
    pattern: String,
) -> Result<celery_core::broker::ChannelSubscription, BrokerError> {
    async fn sub(
        client: &RemoteClient,
        exchange: &str,
        pattern: &str,
    ) -> Result<mpsc::UnboundedReceiver<Pushed>, BrokerError> {
        Ok(client.push_request(kind::SUBSCRIBE, |e| e.str(exchange).str(pattern)).await?.1)
    }
    let mut prx = sub(&client, &exchange, &pattern).await?;
    let (tx, rx) = mpsc::channel(1024);
    let feeder = tokio::spawn(async move {
        let mut backoff = celery_core::backoff::Reconnect::default();
        loop {
            while let Some(p) = prx.recv().await {
                let b = celery_core::broker::Broadcast { routing_key: p.queue, body: p.payload };
                if tx.send(b).await.is_err() {
                    return;
                }
            }
            loop {
                tokio::time::sleep(backoff.next_delay()).await;
                match sub(&client, &exchange, &pattern).await {
                    Ok(p) => {
                        backoff.reset();
                        prx = p;
                        break;
                    }
                    Err(e) => tracing::debug!(error = %e, "log client: cannot subscribe; retrying"),
                }
            }
        }
    });
    Ok(celery_core::broker::ChannelSubscription::new(rx, Some(feeder)))
}

/// A consumer over a connection.
#[derive(Debug)]
pub(crate) struct RemoteConsumer {
    client: Arc<RemoteClient>,
    queues: Vec<String>,
    prefetch: usize,
    sub: Option<Subscribed>,
    /// A resubscription in flight, kept across calls so that a `next()` dropped half-way (a
    /// timeout, a `select!`) never leaves a server-side consumer nobody reads.
    resubscribing: Option<tokio::task::JoinHandle<Result<Subscribed, BrokerError>>>,
    stopped: bool,
}

impl RemoteConsumer {
    pub(crate) async fn start(
        client: Arc<RemoteClient>,
        queues: &[String],
        prefetch: usize,
    ) -> Result<RemoteConsumer, BrokerError> {
        let sub = client.subscribe(queues, prefetch).await?;
        Ok(RemoteConsumer {
            client,
            queues: queues.to_vec(),
            prefetch,
            sub: Some(sub),
            resubscribing: None,
            stopped: false,
        })
    }
}

#[async_trait]
impl Consumer for RemoteConsumer {
    async fn next(&mut self) -> Option<Delivery> {
        let mut backoff = celery_core::backoff::Reconnect::default();
        loop {
            if let Some((_, rx, conn)) = self.sub.as_mut() {
                let got = if self.stopped { rx.try_recv().ok() } else { rx.recv().await };
                if let Some(p) = got {
                    // Settled on the connection it came over: delivery ids are per connection,
                    // and a dead connection's deliveries were returned by the server already.
                    let settle = RemoteSettle { client: self.client.clone(), conn: conn.clone(), delivery: p.delivery };
                    let (size, payload) = (p.payload.len(), p.payload);
                    return Some(
                        Delivery::lazy(
                            Box::new(move || super::payload::decode(&payload)),
                            p.queue,
                            p.deliveries > 1,
                            Box::new(settle),
                        )
                        .with_size(size),
                    );
                }
                self.sub = None;
            }
            if self.stopped {
                return None;
            }
            let (client, queues, prefetch) = (self.client.clone(), self.queues.clone(), self.prefetch);
            let pending = self
                .resubscribing
                .get_or_insert_with(|| tokio::spawn(async move { client.subscribe(&queues, prefetch).await }));
            let result = pending.await.unwrap_or_else(|e| Err(BrokerError::connection(e.to_string())));
            self.resubscribing = None;
            match result {
                Ok(sub) => {
                    tracing::info!("log client: consuming again");
                    self.sub = Some(sub);
                }
                Err(e) => {
                    let d = backoff.next_delay();
                    tracing::warn!(error = %e, retry_in = ?d, "log client: cannot consume; retrying");
                    tokio::time::sleep(d).await;
                }
            }
        }
    }

    fn stop(&mut self) {
        self.stopped = true;
        if let Some((id, _, conn)) = &self.sub {
            // Queued now, ahead of any settlement that follows on this connection (the server
            // handles both in order): a delivery requeued after the stop is not handed out again.
            let frame = Enc::frame(kind::STOP_CONSUME, self.client.id()).u64(*id).finish();
            let _ = conn.tx.send(frame);
        }
        if let Some(pending) = self.resubscribing.take() {
            // It may still succeed: then stop that subscription too.
            let client = self.client.clone();
            tokio::spawn(async move {
                if let Ok(Ok((id, _, _))) = pending.await {
                    let _ = client.call(kind::STOP_CONSUME, |e| e.u64(id)).await;
                }
            });
        }
    }

    async fn close(&mut self) {
        self.stopped = true;
    }
}

#[derive(Debug)]
struct RemoteSettle {
    client: Arc<RemoteClient>,
    conn: Arc<Conn>,
    delivery: u64,
}

impl RemoteSettle {
    async fn send(&self, how: u8, not_before: i64, data: &[u8]) -> Result<(), BrokerError> {
        let id = self.client.id();
        let frame = Enc::frame(kind::SETTLE, id).u64(self.delivery).u8(how).i64(not_before).bytes(data).finish();
        call_on(&self.conn, id, frame).await.map(|_| ())
    }
}

/// A consumer's subscription: its request id, its deliveries, and the connection they came over.
type Subscribed = (u64, mpsc::UnboundedReceiver<Pushed>, Arc<Conn>);

#[async_trait]
impl Settle for RemoteSettle {
    /// Queued on the connection, not answered: the server applies acks in the order it reads them.
    /// If the connection drops first, the server returns the delivery to its queue (at least once).
    async fn ack(&self) -> Result<(), BrokerError> {
        let frame = Enc::frame(kind::ACK, 0).u32(1).u64(self.delivery).finish();
        if !self.conn.alive.load(Ordering::Acquire) || self.conn.tx.send(frame).is_err() {
            return Err(self.conn.lost());
        }
        Ok(())
    }
    async fn requeue(&self) -> Result<(), BrokerError> {
        self.send(settle::REQUEUE, 0, b"").await
    }
    async fn defer(&self, msg: &Message, until: DateTime<Utc>) -> Result<(), BrokerError> {
        self.send(settle::DEFER, until.timestamp_millis(), &super::payload::encode(msg)).await
    }
    async fn dead_letter(&self, reason: &str) -> Result<(), BrokerError> {
        self.send(settle::DEAD_LETTER, 0, reason.as_bytes()).await
    }
}

/// Reads a `u64` response.
fn bad_reply(e: std::io::Error) -> BrokerError {
    BrokerError::operation(e.to_string())
}

pub(crate) fn read_u64(body: &[u8]) -> Result<u64, BrokerError> {
    Dec::new(body).u64().map_err(bad_reply)
}

/// Reads an optional-bytes response.
pub(crate) fn read_opt(body: &[u8]) -> Result<Option<Vec<u8>>, BrokerError> {
    Dec::new(body).opt_bytes().map_err(bad_reply)
}

/// How long a server-side wait may take at most per request (longer waits are split).
pub(crate) const MAX_WAIT: Duration = Duration::from_secs(30);

/// A stream-group member living on the server, for as long as the connection it joined over.
#[derive(Debug)]
pub(crate) struct RemoteStream {
    client: Arc<RemoteClient>,
    group: String,
    queue: String,
    start: StartFrom,
    commit: Commit,
    /// The connection and the member's handle there.
    member: Option<(Arc<Conn>, u64)>,
}

impl RemoteStream {
    pub(crate) async fn join(
        client: Arc<RemoteClient>,
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
            Some((c, h)) if c.alive.load(Ordering::Acquire) => Ok((c.clone(), *h)),
            Some((c, _)) => Err(c.lost()),
            None => Err(conn_err("the stream member has not joined")),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::partition::tests::tempdir;
    use crate::log::server::{serve_tcp_with, ServerLimits};

    async fn serve(limits: ServerLimits) -> (String, tokio::task::JoinHandle<()>) {
        let store = LogStore::open(&tempdir(), StoreConfig::default()).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        (addr, tokio::spawn(serve_tcp_with(store, listener, Some("t".into()), None, limits)))
    }

    async fn queue_len(c: &RemoteClient) -> Result<u64, BrokerError> {
        read_u64(&c.call(kind::QUEUE_LEN, |e| e.str("q")).await?)
    }

    #[tokio::test]
    async fn a_client_reconnects_after_the_server_closes_its_idle_connection() {
        let limits = ServerLimits { idle_timeout: Duration::from_millis(200), ..ServerLimits::default() };
        let (addr, server) = serve(limits).await;
        let client = RemoteClient::new(Target::Tcp(addr, None), "t".into(), None);
        assert_eq!(queue_len(&client).await.unwrap(), 0);
        let first = client.conn.lock().await.clone().unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while first.alive.load(Ordering::Acquire) {
            assert!(tokio::time::Instant::now() < deadline, "the idle connection was not closed");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let why = first.lost().to_string();
        assert!(why.contains("idle for 200ms"), "{why}");
        assert_eq!(queue_len(&client).await.unwrap(), 0, "the next request reconnects");
        assert!(!Arc::ptr_eq(&first, client.conn.lock().await.as_ref().unwrap()));
        server.abort();
    }

    #[tokio::test]
    async fn a_client_over_the_connection_limit_is_told_the_limit() {
        let (addr, server) = serve(ServerLimits { max_connections: 1, ..ServerLimits::default() }).await;
        let first = RemoteClient::new(Target::Tcp(addr.clone(), None), "t".into(), None);
        assert_eq!(queue_len(&first).await.unwrap(), 0);
        let second = RemoteClient::new(Target::Tcp(addr, None), "t".into(), None);
        let err = queue_len(&second).await.unwrap_err();
        assert!(matches!(err, BrokerError::Connection { .. }), "a connection error, retried later: {err:?}");
        assert!(err.to_string().contains("too many connections (limit 1)"), "{err}");
        assert_eq!(queue_len(&first).await.unwrap(), 0, "the admitted client keeps working");
        server.abort();
    }

    #[tokio::test]
    async fn a_request_the_server_did_not_handle_is_sent_again_on_a_new_connection() {
        use tokio::io::AsyncWriteExt;
        // A server whose first connection closes for idleness as the request arrives.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let server = tokio::spawn(async move {
            for attempt in 0..2 {
                let (mut s, _) = listener.accept().await.unwrap();
                let hello = wire::read_frame(&mut s, wire::MAX_FRAME).await.unwrap().unwrap();
                s.write_all(&Enc::frame(kind::OK, hello.id).finish()).await.unwrap();
                let req = wire::read_frame(&mut s, wire::MAX_FRAME).await.unwrap().unwrap();
                assert_eq!(req.kind, kind::QUEUE_LEN);
                let answer = match attempt {
                    0 => [
                        Enc::frame(kind::ERR, 0).str("closing the connection: idle for 1s").finish(),
                        Enc::frame(kind::ERR, req.id).str(wire::NOT_HANDLED).finish(),
                    ]
                    .concat(),
                    _ => Enc::frame(kind::OK, req.id).u64(7).finish(),
                };
                s.write_all(&answer).await.unwrap();
                s.shutdown().await.unwrap();
            }
        });
        let client = RemoteClient::new(Target::Tcp(addr, None), "t".into(), None);
        assert_eq!(queue_len(&client).await.unwrap(), 7);
        server.await.unwrap();
    }
}

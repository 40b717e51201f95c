//! The client side of the socket protocol: [`RemoteStore`], a store reached through its server
//! (`log+tcp://HOST:PORT`, `log+tls://`, and `log://PATH` when another process owns the directory,
//! through its unix socket). Requests are pipelined over one connection; a lost connection fails the
//! requests in flight (the producer API retries them) and is re-established on the next request;
//! consumers resubscribe.
//!
//! - this file: the connection (HELLO, pipelined calls, pushed frames, reconnecting);
//! - [`requests`]: the typed requests (queues, routing, broadcasts, results, leases, chords);
//! - [`consumer`]: task consumers and broadcast subscriptions over a connection;
//! - [`stream`]: stream-group members living on the server;
//! - [`takeover`]: when a directory's owner is gone (exited, or killed: its lock is stale), the next
//!   client to reconnect opens the directory itself and serves the others.

mod consumer;
mod requests;
mod stream;
mod takeover;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use celery_core::sync::lock;
use celery_core::BrokerError;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, oneshot};

pub(crate) use consumer::{broadcast_subscription, RemoteConsumer};
pub(crate) use stream::RemoteStream;
pub(crate) use takeover::Takeover;

use super::tls::ClientTls;
use super::wire::{self, kind, Dec, Enc};

/// Where the server is.
#[derive(Debug, Clone)]
pub(crate) enum Target {
    Unix(PathBuf),
    /// `HOST:PORT`, with TLS for `log+tls://`.
    Tcp(String, Option<ClientTls>),
}

/// A delivery pushed by the server.
#[derive(Debug)]
struct Pushed {
    delivery: u64,
    queue: String,
    deliveries: u32,
    payload: Vec<u8>,
}

type Pending = Mutex<HashMap<u64, oneshot::Sender<Result<Vec<u8>, String>>>>;

/// Why a connection was lost.
#[derive(Debug, Clone)]
enum Lost {
    /// Reading failed (a TLS alert, a reset).
    Failed(Arc<std::io::Error>),
    /// The server said why it closed it (`ERR` with id 0).
    Closed(String),
}

/// One connection to the server and its reader and writer tasks.
#[derive(Debug)]
struct Conn {
    tx: mpsc::UnboundedSender<Vec<u8>>,
    pending: Arc<Pending>,
    pushes: Arc<Mutex<HashMap<u64, mpsc::UnboundedSender<Pushed>>>>,
    alive: Arc<AtomicBool>,
    /// Why the reader stopped, when it failed or the server said.
    lost: Arc<Mutex<Option<Lost>>>,
}

impl Conn {
    fn lost(&self) -> BrokerError {
        const LOST: &str = "connection to the log server lost";
        match lock(&self.lost).clone() {
            Some(Lost::Failed(e)) => BrokerError::connection_with(LOST, e),
            Some(Lost::Closed(why)) => BrokerError::connection(format!("{LOST}: {why}")),
            None => BrokerError::connection(LOST),
        }
    }

    fn is_alive(&self) -> bool {
        self.alive.load(Ordering::Acquire)
    }
}

/// A store reached through its server, over a connection re-established on demand. Its `Debug`
/// leaves the token out.
pub(crate) struct RemoteStore {
    target: Target,
    token: String,
    conn: tokio::sync::Mutex<Option<Arc<Conn>>>,
    next_id: AtomicU64,
    takeover: Option<Takeover>,
}

impl std::fmt::Debug for RemoteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let token = if self.token.is_empty() { "" } else { "***" };
        f.debug_struct("RemoteStore").field("target", &self.target).field("token", &token).finish_non_exhaustive()
    }
}

impl RemoteStore {
    /// A client of the server at `target`, presenting `token`; with `takeover`, a client of a
    /// directory's owner that owns the directory itself when the owner is gone.
    pub(crate) fn new(target: Target, token: String, takeover: Option<Takeover>) -> RemoteStore {
        RemoteStore { target, token, conn: tokio::sync::Mutex::new(None), next_id: AtomicU64::new(1), takeover }
    }

    fn id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    async fn conn(&self) -> Result<Arc<Conn>, BrokerError> {
        let mut guard = self.conn.lock().await;
        if let Some(c) = guard.as_ref().filter(|c| c.is_alive()) {
            return Ok(c.clone());
        }
        let lost = guard.is_some();
        let c = match &self.target {
            Target::Unix(p) => {
                let failed = |e: std::io::Error| BrokerError::connection_with(p.display().to_string(), e);
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
                let s =
                    tokio::net::TcpStream::connect(a).await.map_err(|e| BrokerError::connection_with(a.clone(), e))?;
                let _ = s.set_nodelay(true);
                match tls {
                    Some(tls) => {
                        start(tls.connect(s).await.map_err(|e| BrokerError::connection_with(format!("{a}: TLS"), e))?)
                    }
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
    async fn call(&self, kind: u8, build: impl Fn(Enc) -> Enc) -> Result<Vec<u8>, BrokerError> {
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
}

/// A subscription's request id, its pushed frames, and the connection they come over.
type Subscribed = (u64, mpsc::UnboundedReceiver<Pushed>, Arc<Conn>);

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
    let lost: Arc<Mutex<Option<Lost>>> = Arc::default();
    let (p2, pu2, alive_r, lost_r) = (pending.clone(), pushes.clone(), alive.clone(), lost.clone());
    tokio::spawn(async move {
        loop {
            let frame = match wire::read_frame(&mut rd, wire::MAX_FRAME).await {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "log client: connection failed");
                    *lock(&lost_r) = Some(Lost::Failed(Arc::new(e)));
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
                            *lock(&lost_r) = Some(Lost::Closed(msg));
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

/// An answer that does not parse.
fn bad_reply(e: std::io::Error) -> BrokerError {
    BrokerError::operation_with("malformed answer from the log server", e)
}

/// Reads a `u64` answer.
fn read_u64(body: &[u8]) -> Result<u64, BrokerError> {
    Dec::new(body).u64().map_err(bad_reply)
}

/// Reads an optional-bytes answer.
fn read_opt(body: &[u8]) -> Result<Option<Vec<u8>>, BrokerError> {
    Dec::new(body).opt_bytes().map_err(bad_reply)
}

/// How long a server-side wait may take at most per request (longer waits are split).
const MAX_WAIT: Duration = Duration::from_secs(30);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::net::server::{serve_tcp_with, ServerLimits};
    use crate::log::storage::partition::tests::tempdir;
    use crate::log::storage::{LogStore, StoreConfig};

    async fn serve(limits: ServerLimits) -> (String, tokio::task::JoinHandle<()>) {
        let store = LogStore::open(&tempdir(), StoreConfig::default()).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        (addr, tokio::spawn(serve_tcp_with(store, listener, Some("t".into()), None, limits)))
    }

    async fn queue_len(c: &RemoteStore) -> Result<u64, BrokerError> {
        c.queue_len("q").await
    }

    #[tokio::test]
    async fn a_client_reconnects_after_the_server_closes_its_idle_connection() {
        let limits = ServerLimits { idle_timeout: Duration::from_millis(200), ..ServerLimits::default() };
        let (addr, server) = serve(limits).await;
        let client = RemoteStore::new(Target::Tcp(addr, None), "t".into(), None);
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
        let first = RemoteStore::new(Target::Tcp(addr.clone(), None), "t".into(), None);
        assert_eq!(queue_len(&first).await.unwrap(), 0);
        let second = RemoteStore::new(Target::Tcp(addr, None), "t".into(), None);
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
        let client = RemoteStore::new(Target::Tcp(addr, None), "t".into(), None);
        assert_eq!(queue_len(&client).await.unwrap(), 7);
        server.await.unwrap();
    }
}

//! Serves a local store over a stream socket (the directory's unix socket, or TCP for
//! `broker serve`): one task per connection, requests handled concurrently, deliveries pushed. When a
//! connection drops, the deliveries it held go back to their queues at once.
//!
//! What a client can make the server hold is bounded ([`ServerLimits`]): connections at once; before
//! `HELLO`, one frame of 4 KiB within the HELLO timeout; after it, requests handled at once (in
//! count and bytes) and answers queued (in bytes). At a limit the read loop stops reading the
//! connection, so an unread socket holds the rest. The read loop never waits for a later frame of
//! its own connection (acks are applied where they are read, each handled request ends on its own),
//! so the limits cannot deadlock a connection. Silent connections that hold nothing are closed.
//!
//! - [`limits`]: [`ServerLimits`] and the admission of connections;
//! - [`connection`]: one connection's read loop, from `HELLO` to close;
//! - [`session`]: what a connection holds, and its replies on their way out;
//! - [`requests`]: the answer to each request, over the store;
//! - this file: the listeners (the directory's unix socket, TCP and TLS).

mod connection;
mod limits;
mod requests;
mod session;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use celery_core::sync::lock;

pub use limits::ServerLimits;

use connection::serve_counted;
use limits::{Gate, HANDSHAKE_TIMEOUT};

use crate::log::net::tls::ServerTls;
use crate::log::storage::LogStore;

/// The unix socket the owner of a data directory listens on.
pub(crate) fn socket_path(dir: &Path) -> PathBuf {
    dir.join("broker.sock")
}

/// The stores whose directory socket this process serves, by directory: each is served once,
/// however many brokers open it.
fn served() -> &'static Mutex<HashMap<PathBuf, Weak<LogStore>>> {
    static S: OnceLock<Mutex<HashMap<PathBuf, Weak<LogStore>>>> = OnceLock::new();
    S.get_or_init(Default::default)
}

impl LogStore {
    /// Listens on the directory's unix socket (once per open store), so other processes that open
    /// the same directory use this store through it. The socket is its owner's only (mode 0600):
    /// other local users cannot connect to it. (Defined by the network layer: the store itself
    /// knows nothing of sockets.)
    pub fn serve_unix(self: &Arc<Self>) {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        let mut served = lock(served());
        if served.get(self.dir()).and_then(Weak::upgrade).is_some_and(|s| Arc::ptr_eq(&s, self)) {
            return;
        }
        served.retain(|_, s| s.strong_count() > 0);
        served.insert(self.dir().to_owned(), Arc::downgrade(self));
        let path = socket_path(self.dir());
        let _ = std::fs::remove_file(&path);
        // Bound in a private (0700) directory, made 0600, then moved into place: no one else
        // can connect in between. A socket that cannot be made so is not served.
        // (A name no longer than `broker.sock`: socket paths are limited to 107 bytes.)
        let private = self.dir().join(format!(".s{:06x}", std::process::id() & 0xff_ffff));
        let _ = std::fs::remove_dir_all(&private);
        let listener = std::fs::DirBuilder::new().mode(0o700).create(&private).and_then(|()| {
            let tmp = private.join("s");
            let l = tokio::net::UnixListener::bind(&tmp)?;
            std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))?;
            std::fs::rename(&tmp, &path)?;
            Ok(l)
        });
        let _ = std::fs::remove_dir_all(&private);
        match listener {
            Ok(l) => {
                tokio::spawn(serve_unix(Arc::downgrade(self), l));
            }
            Err(e) => {
                let _ = std::fs::remove_file(&path);
                tracing::warn!(error = %e, path = %path.display(), "log: cannot listen on the directory's socket; other processes cannot share it");
            }
        }
    }
}

/// Accepts connections on the directory's unix socket until the store is dropped, within the
/// default [`ServerLimits`].
async fn serve_unix(store: Weak<LogStore>, listener: tokio::net::UnixListener) {
    let limits = Arc::new(ServerLimits::default());
    let gate = Gate::new(limits.clone());
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!(error = %e, "log server: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Some(s) = store.upgrade() else { return };
        let (limits, pass) = (limits.clone(), gate.enter());
        tokio::spawn(serve_counted(s, stream, None, limits, Arc::default(), Some(pass)));
    }
}

/// Accepts TCP connections (`broker serve`): `log+tcp://`, or `log+tls://` when `tls` is given.
/// `token`: when set, every client must present it. The default [`ServerLimits`] apply; see
/// [`serve_tcp_with`] to set them.
pub async fn serve_tcp(
    store: Arc<LogStore>,
    listener: tokio::net::TcpListener,
    token: Option<String>,
    tls: Option<ServerTls>,
) {
    serve_tcp_with(store, listener, token, tls, ServerLimits::default()).await
}

/// [`serve_tcp`] within `limits`: connections over `limits.max_connections` are refused with an
/// `ERR` frame, and each connection's frames, requests, replies and silence are bounded.
pub async fn serve_tcp_with(
    store: Arc<LogStore>,
    listener: tokio::net::TcpListener,
    token: Option<String>,
    tls: Option<ServerTls>,
    limits: ServerLimits,
) {
    let limits = Arc::new(limits);
    let gate = Gate::new(limits.clone());
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!(error = %e, "log server: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        tracing::debug!(%peer, tls = tls.is_some(), "log server: connection");
        let acceptor = tls.as_ref().map(|t| t.acceptor.clone());
        let (store, token, limits) = (store.clone(), token.clone(), limits.clone());
        let mut pass = gate.enter();
        tokio::spawn(async move {
            let stats = Arc::default();
            match acceptor {
                None => serve_counted(store, stream, token, limits, stats, Some(pass)).await,
                Some(acceptor) => {
                    let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream));
                    let done = tokio::select! {
                        r = handshake => r,
                        _ = pass.ticket.evicted() => {
                            tracing::debug!(%peer, "log server: TLS handshake closed for a newer connection");
                            return;
                        }
                    };
                    match done {
                        Ok(Ok(stream)) => serve_counted(store, stream, token, limits, stats, Some(pass)).await,
                        Ok(Err(e)) => tracing::warn!(%peer, error = %e, "log server: TLS handshake failed"),
                        Err(_) => tracing::warn!(%peer, "log server: TLS handshake timed out"),
                    }
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use tokio::io::{AsyncWriteExt, ReadHalf, WriteHalf};
    use tokio::time::Instant;

    use super::connection::tokens_match;
    use super::limits::MAX_SUBSCRIPTIONS;
    use super::session::ConnStats;
    use super::*;
    use crate::log::net::wire::{self, kind, Dec, Enc};
    use crate::log::storage::partition::tests::tempdir;
    use crate::log::storage::results::{is_ready, is_success};
    use crate::log::storage::{NewRecord, StoreConfig};

    type Client = (ReadHalf<tokio::io::DuplexStream>, WriteHalf<tokio::io::DuplexStream>);

    /// A connection to `store` over an in-memory pipe, within `limits`, with its reply counters.
    fn connect_with(store: &Arc<LogStore>, token: Option<&str>, limits: ServerLimits) -> (Client, Arc<ConnStats>) {
        let (client, server) = tokio::io::duplex(1 << 16);
        let stats = Arc::new(ConnStats::default());
        let token = token.map(str::to_owned);
        tokio::spawn(serve_counted(store.clone(), server, token, Arc::new(limits), stats.clone(), None));
        (tokio::io::split(client), stats)
    }

    async fn next(r: &mut (impl tokio::io::AsyncRead + Unpin)) -> Option<wire::Frame> {
        let got = tokio::time::timeout(Duration::from_secs(10), wire::read_frame(r, wire::MAX_FRAME)).await;
        got.expect("the server answered within 10 s").expect("a well-formed frame")
    }

    /// Sends `frame` and returns the next frame the server writes.
    async fn exchange(
        w: &mut (impl tokio::io::AsyncWrite + Unpin),
        r: &mut (impl tokio::io::AsyncRead + Unpin),
        frame: Vec<u8>,
    ) -> wire::Frame {
        w.write_all(&frame).await.unwrap();
        next(r).await.expect("an answer, not the end of the connection")
    }

    async fn hello(c: &mut Client, token: &str) -> wire::Frame {
        exchange(&mut c.1, &mut c.0, Enc::frame(kind::HELLO, 1).str(token).finish()).await
    }

    fn err_text(f: &wire::Frame) -> String {
        assert_eq!(f.kind, kind::ERR, "expected an ERR frame");
        Dec::new(&f.body).str().unwrap()
    }

    #[tokio::test]
    async fn acks_are_unanswered_applied_in_order_and_bad_ones_are_harmless() {
        let store = LogStore::open(&tempdir(), StoreConfig::default()).unwrap();
        let rec = || NewRecord { payload: b"{}".to_vec(), ..NewRecord::default() };
        store.append("q", vec![rec(), rec()]).await.unwrap();

        let (mut c, _) = connect_with(&store, None, ServerLimits::default());
        assert_eq!(hello(&mut c, "").await.kind, kind::OK);
        let (r, w) = &mut c;
        let ok = exchange(w, r, Enc::frame(kind::CONSUME, 1).u32(2).u32(1).str("q").finish()).await;
        assert_eq!((ok.kind, ok.id), (kind::OK, 1));
        let mut deliveries = Vec::new();
        for _ in 0..2 {
            let f = next(r).await.unwrap();
            assert_eq!((f.kind, f.id), (kind::DELIVERY, 1));
            deliveries.push(Dec::new(&f.body).u64().unwrap());
        }
        // One real ack, one for a delivery never made, one truncated frame (ignored whole): none is
        // answered, and the connection's next request is.
        let acks = [
            Enc::frame(kind::ACK, 0).u32(1).u64(deliveries[0]).finish(),
            Enc::frame(kind::ACK, 0).u32(1).u64(999).finish(),
            Enc::frame(kind::ACK, 0).u32(2).u64(deliveries[1]).finish(),
        ]
        .concat();
        let len = exchange(w, r, [acks, Enc::frame(kind::QUEUE_LEN, 7).str("q").finish()].concat()).await;
        assert_eq!((len.kind, len.id), (kind::OK, 7), "the first answer is the queue length's");
        assert_eq!(Dec::new(&len.body).u64().unwrap(), 0, "both records are acked or leased");

        // The connection closes: the unacked delivery (the truncated frame's) comes back, the
        // acked one does not.
        drop(c);
        let deadline = Instant::now() + Duration::from_secs(10);
        while store.queue_len("q").unwrap() == 0 {
            assert!(Instant::now() < deadline, "the unacked delivery did not come back");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(store.queue_len("q").unwrap(), 1);
    }

    #[tokio::test]
    async fn oversized_frames_are_refused_from_their_length_word_and_the_connection_closes() {
        let store = LogStore::open(&tempdir(), StoreConfig::default()).unwrap();

        // Before HELLO: only the length word is sent. Were the server to allocate and read the
        // 5000 bytes it announces, it would wait for them and never answer.
        let (mut c, _) = connect_with(&store, Some("s3cret"), ServerLimits::default());
        c.1.write_all(&5000u32.to_le_bytes()).await.unwrap();
        let refusal = next(&mut c.0).await.expect("an ERR before the close");
        assert_eq!(refusal.id, 0);
        let msg = err_text(&refusal);
        assert!(msg.contains("a frame of 5000 bytes is over the limit of 4096 bytes"), "{msg}");
        assert!(next(&mut c.0).await.is_none(), "the connection is closed after the refusal");

        // After HELLO the limit is the protocol's.
        let (mut c, _) = connect_with(&store, Some("s3cret"), ServerLimits::default());
        assert_eq!(hello(&mut c, "s3cret").await.kind, kind::OK);
        let huge = (wire::MAX_FRAME as u32 + 1).to_le_bytes();
        let msg = err_text(&exchange(&mut c.1, &mut c.0, huge.to_vec()).await);
        assert!(msg.contains(&format!("over the limit of {} bytes", wire::MAX_FRAME)), "{msg}");
        assert!(next(&mut c.0).await.is_none());
    }

    #[tokio::test]
    async fn a_hello_must_come_first_and_carry_the_whole_token() {
        assert!(tokens_match(b"s3cret", b"s3cret"));
        assert!(!tokens_match(b"s3cre", b"s3cret"), "a prefix is not the token");
        assert!(!tokens_match(b"s3cretX", b"s3cret"));
        assert!(!tokens_match(b"s3creT", b"s3cret"));
        assert!(!tokens_match(b"", b"s3cret"));

        let store = LogStore::open(&tempdir(), StoreConfig::default()).unwrap();
        let (mut c, _) = connect_with(&store, Some("s3cret"), ServerLimits::default());
        assert!(err_text(&hello(&mut c, "s3cre").await).contains("authentication failed"));
        assert!(next(&mut c.0).await.is_none());
        let (mut c, _) = connect_with(&store, None, ServerLimits::default());
        let first = exchange(&mut c.1, &mut c.0, Enc::frame(kind::QUEUE_LEN, 3).str("q").finish()).await;
        assert!(err_text(&first).contains("the first frame must be HELLO"));
        assert!(next(&mut c.0).await.is_none());
    }

    #[tokio::test]
    async fn silent_connections_are_closed_but_waits_and_consumers_are_not_cut() {
        let store = LogStore::open(&tempdir(), StoreConfig::default()).unwrap();
        let limits = ServerLimits {
            hello_timeout: Duration::from_millis(200),
            idle_timeout: Duration::from_millis(300),
            ..ServerLimits::default()
        };

        // No HELLO: closed after the HELLO timeout, with the reason.
        let started = Instant::now();
        let (mut silent, _) = connect_with(&store, Some("s3cret"), limits.clone());
        let msg = err_text(&next(&mut silent.0).await.unwrap());
        assert!(msg.contains("no HELLO within 200ms"), "{msg}");
        assert!(next(&mut silent.0).await.is_none());
        assert!(started.elapsed() >= Duration::from_millis(200));

        // Greeted, then silent and holding nothing: closed after the idle timeout.
        let started = Instant::now();
        let (mut idle, _) = connect_with(&store, None, limits.clone());
        assert_eq!(hello(&mut idle, "").await.kind, kind::OK);
        let msg = err_text(&next(&mut idle.0).await.unwrap());
        assert!(msg.contains("idle for 300ms"), "{msg}");
        assert!(started.elapsed() >= Duration::from_millis(300));

        // A consumer that gets nothing is not idle; nor is a wait longer than the idle timeout.
        let (mut consuming, _) = connect_with(&store, None, limits.clone());
        assert_eq!(hello(&mut consuming, "").await.kind, kind::OK);
        let sub = Enc::frame(kind::CONSUME, 2).u32(1).u32(1).str("empty").finish();
        assert_eq!(exchange(&mut consuming.1, &mut consuming.0, sub).await.kind, kind::OK);
        let (mut waiting, _) = connect_with(&store, None, limits);
        assert_eq!(hello(&mut waiting, "").await.kind, kind::OK);
        let started = Instant::now();
        let wait = Enc::frame(kind::RESULT_WAIT, 2).str("no-such-task").u64(1200).finish();
        let answer = exchange(&mut waiting.1, &mut waiting.0, wait).await;
        assert_eq!((answer.kind, answer.id), (kind::OK, 2), "the wait ran to its timeout");
        assert!(started.elapsed() >= Duration::from_millis(1200));
        let len = Enc::frame(kind::QUEUE_LEN, 3).str("empty").finish();
        assert_eq!(
            exchange(&mut consuming.1, &mut consuming.0, len).await.kind,
            kind::OK,
            "the consumer's connection lives"
        );
    }

    #[tokio::test]
    async fn a_connection_over_the_limit_is_refused_and_the_others_keep_working() {
        let store = LogStore::open(&tempdir(), StoreConfig::default()).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let limits = ServerLimits { max_connections: 2, ..ServerLimits::default() };
        let server = tokio::spawn(serve_tcp_with(store, listener, Some("s3cret".into()), None, limits));
        let open = || async {
            let (mut r, mut w) = tokio::net::TcpStream::connect(addr).await.unwrap().into_split();
            let answer = exchange(&mut w, &mut r, Enc::frame(kind::HELLO, 1).str("s3cret").finish()).await;
            (r, w, answer)
        };
        let (mut r1, mut w1, a1) = open().await;
        let (r2, w2, a2) = open().await;
        assert_eq!((a1.kind, a2.kind), (kind::OK, kind::OK));

        let (mut r3, _w3, refused) = open().await;
        assert_eq!(refused.id, 0);
        assert_eq!(err_text(&refused), "too many connections (limit 2)");
        assert!(next(&mut r3).await.is_none(), "the refused connection is closed");

        let len = exchange(&mut w1, &mut r1, Enc::frame(kind::QUEUE_LEN, 2).str("q").finish()).await;
        assert_eq!((len.kind, len.id), (kind::OK, 2), "an admitted client keeps working");

        // A closed connection frees its slot.
        drop((r2, w2));
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let (_r, _w, answer) = open().await;
            if answer.kind == kind::OK {
                break;
            }
            assert!(Instant::now() < deadline, "the closed connection's slot was not freed");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        server.abort();
    }

    #[tokio::test]
    async fn silent_connections_cannot_lock_out_a_client_that_greets() {
        let store = LogStore::open(&tempdir(), StoreConfig::default()).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let limits = ServerLimits { max_connections: 8, max_pending: 3, ..ServerLimits::default() };
        let server = tokio::spawn(serve_tcp_with(store, listener, Some("s3cret".into()), None, limits));
        // Far more silent connections than the server serves: each new one closes the oldest.
        let mut silent = Vec::new();
        for _ in 0..20 {
            silent.push(tokio::net::TcpStream::connect(addr).await.unwrap().into_split());
        }
        let (mut r0, _w0) = silent.remove(0);
        let closed = next(&mut r0).await.expect("told why");
        assert!(err_text(&closed).contains("waiting for HELLO"), "{}", err_text(&closed));
        assert!(next(&mut r0).await.is_none(), "the oldest silent connection is closed");
        for _ in 0..3 {
            let (mut r, mut w) = tokio::net::TcpStream::connect(addr).await.unwrap().into_split();
            let answer = exchange(&mut w, &mut r, Enc::frame(kind::HELLO, 1).str("s3cret").finish()).await;
            assert_eq!(answer.kind, kind::OK, "a client that greets at once is served: {}", err_text(&answer));
            let len = exchange(&mut w, &mut r, Enc::frame(kind::QUEUE_LEN, 2).str("q").finish()).await;
            assert_eq!((len.kind, len.id), (kind::OK, 2));
            // Greeted: more silent connections do not close it.
            for _ in 0..5 {
                silent.push(tokio::net::TcpStream::connect(addr).await.unwrap().into_split());
            }
            let len = exchange(&mut w, &mut r, Enc::frame(kind::QUEUE_LEN, 3).str("q").finish()).await;
            assert_eq!((len.kind, len.id), (kind::OK, 3));
        }
        server.abort();
    }

    #[tokio::test]
    async fn a_client_that_does_not_read_does_not_grow_the_server_beyond_its_bounds() {
        let store = LogStore::open(&tempdir(), StoreConfig::default()).unwrap();
        let doc = vec![b'x'; 1 << 20];
        let id = "d".repeat(1000);
        store.results().put(&id, doc.clone(), Duration::from_secs(600), |_| false).await.unwrap();
        let limits = ServerLimits { reply_bytes: 4 << 20, max_in_flight: 16, ..ServerLimits::default() };
        let (mut c, stats) = connect_with(&store, None, limits);
        assert_eq!(hello(&mut c, "").await.kind, kind::OK);

        // 300 pipelined RESULT_GETs of a 1 MiB document: 300 MiB of answers if nothing held back.
        let (mut r, mut w) = c;
        let requests: Vec<u8> =
            (0..300u64).flat_map(|i| Enc::frame(kind::RESULT_GET, 10 + i).str(&id).finish()).collect();
        let sender = tokio::spawn(async move {
            w.write_all(&requests).await.unwrap();
            w
        });
        let frame = 1 << 20;
        let deadline = Instant::now() + Duration::from_secs(10);
        while stats.queued.load(Ordering::Relaxed) < (3 << 20) {
            assert!(Instant::now() < deadline, "the server queued no answers");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // Watch the full queue a while: it stays within its budget plus the one answer being built.
        let watch = Instant::now() + Duration::from_millis(300);
        while Instant::now() < watch {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let bound = (4 << 20) + 2 * (frame + 2048);
        assert!(stats.peak.load(Ordering::Relaxed) <= bound, "peak {} > {bound}", stats.peak.load(Ordering::Relaxed));
        assert!(!sender.is_finished(), "the server stopped reading the requests (336 KB of them)");

        // Reading resumes everything: every answer arrives, whole.
        for i in 0..300u64 {
            let f = next(&mut r).await.unwrap();
            assert_eq!((f.kind, f.id), (kind::OK, 10 + i));
            assert_eq!(Dec::new(&f.body).opt_bytes().unwrap().as_deref(), Some(&doc[..]));
        }
        let _w = sender.await.unwrap();
        assert!(stats.peak.load(Ordering::Relaxed) <= bound);
    }

    #[tokio::test]
    async fn waiter_entries_go_when_their_waits_end() {
        let store = LogStore::open(&tempdir(), StoreConfig::default()).unwrap();
        let waiters = || lock(&store.results().live).waiters.len();

        // Pipelined waits on ids that never get a result, each ending at its timeout.
        let (mut c, _) = connect_with(&store, None, ServerLimits::default());
        assert_eq!(hello(&mut c, "").await.kind, kind::OK);
        let waits: Vec<u8> = (0..100u64)
            .flat_map(|i| Enc::frame(kind::RESULT_WAIT, 10 + i).str(&format!("task-{i}")).u64(50).finish())
            .collect();
        c.1.write_all(&waits).await.unwrap();
        for _ in 0..100 {
            assert_eq!(next(&mut c.0).await.unwrap().kind, kind::OK);
        }
        assert_eq!(waiters(), 0, "timed-out waits left entries");

        // A cancelled wait; and two waits on one id, the entry staying while one still waits.
        let _ = tokio::time::timeout(
            Duration::from_millis(20),
            store.results().wait("gone", Duration::from_secs(60), is_ready),
        )
        .await;
        assert_eq!(waiters(), 0, "a cancelled wait left its entry");
        let a = tokio::spawn({
            let store = store.clone();
            async move { store.results().wait("t", Duration::from_secs(60), is_ready).await }
        });
        let b = tokio::spawn({
            let store = store.clone();
            async move { store.results().wait("t", Duration::from_secs(60), is_ready).await }
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        while lock(&store.results().live).waiters.get("t").map_or(0, Arc::strong_count) < 3 {
            assert!(Instant::now() < deadline, "the waits did not start");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        b.abort();
        let _ = b.await;
        assert_eq!(waiters(), 1, "one wait remains");

        // A stored result ends the last wait, and its entry goes.
        let done = br#"{"status":"SUCCESS","result":1,"task_id":"t"}"#.to_vec();
        store.results().put("t", done.clone(), Duration::from_secs(60), is_success).await.unwrap();
        assert_eq!(a.await.unwrap(), Some(done));
        assert_eq!(waiters(), 0);
    }

    #[tokio::test]
    async fn the_directory_socket_is_its_owners_only() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempdir();
        let store = LogStore::open(&dir, StoreConfig::default()).unwrap();
        store.serve_unix();
        let path = socket_path(&dir);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "broker.sock is mode {:o}", mode & 0o777);
        let mut s = tokio::net::UnixStream::connect(&path).await.unwrap();
        s.write_all(&Enc::frame(kind::HELLO, 1).str("").finish()).await.unwrap();
        assert_eq!(next(&mut s).await.unwrap().kind, kind::OK, "the owner still connects");
    }

    #[tokio::test]
    async fn one_connection_holds_a_bounded_number_of_subscriptions() {
        let store = LogStore::open(&tempdir(), StoreConfig::default()).unwrap();
        let (mut c, _) = connect_with(&store, None, ServerLimits::default());
        assert_eq!(hello(&mut c, "").await.kind, kind::OK);
        let subs: Vec<u8> = (0..MAX_SUBSCRIPTIONS as u64 + 1)
            .flat_map(|i| Enc::frame(kind::SUBSCRIBE, 10 + i).str("ex").str("#").finish())
            .collect();
        c.1.write_all(&subs).await.unwrap();
        let mut refused = Vec::new();
        for _ in 0..=MAX_SUBSCRIPTIONS {
            let f = next(&mut c.0).await.unwrap();
            if f.kind == kind::ERR {
                refused.push(err_text(&f));
            }
        }
        assert_eq!(refused.len(), 1, "{refused:?}");
        assert!(refused[0].contains("(limit 1024)"), "{}", refused[0]);
    }

    #[tokio::test]
    async fn a_peer_that_reads_nothing_is_dropped_after_the_idle_timeout() {
        let store = LogStore::open(&tempdir(), StoreConfig::default()).unwrap();
        store.results().put("big", vec![b'x'; 1 << 20], Duration::from_secs(600), |_| false).await.unwrap();
        let limits = ServerLimits { idle_timeout: Duration::from_millis(300), ..ServerLimits::default() };
        let (mut c, stats) = connect_with(&store, None, limits);
        assert_eq!(hello(&mut c, "").await.kind, kind::OK);
        c.1.write_all(&Enc::frame(kind::RESULT_GET, 2).str("big").finish()).await.unwrap();
        // The answer (1 MiB) does not fit the 64 KiB pipe: the writer waits, then gives up and
        // lets go of what it held.
        let deadline = Instant::now() + Duration::from_secs(10);
        while stats.peak.load(Ordering::Relaxed) < (1 << 20) || stats.queued.load(Ordering::Relaxed) > 0 {
            assert!(Instant::now() < deadline, "the stalled answer was never dropped");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let cut = tokio::time::timeout(Duration::from_secs(10), wire::read_frame(&mut c.0, wire::MAX_FRAME)).await;
        assert!(cut.unwrap().is_err(), "the answer was cut off with the connection");
    }

    #[tokio::test]
    async fn requests_arriving_as_an_idle_connection_closes_are_answered_not_handled() {
        let store = LogStore::open(&tempdir(), StoreConfig::default()).unwrap();
        let limits = ServerLimits { idle_timeout: Duration::from_millis(200), ..ServerLimits::default() };
        let (mut c, _) = connect_with(&store, None, limits);
        assert_eq!(hello(&mut c, "").await.kind, kind::OK);
        let notice = next(&mut c.0).await.unwrap();
        assert_eq!(notice.id, 0);
        assert!(err_text(&notice).contains("idle for 200ms"));
        // A request the client sent before it read the notice.
        let late = exchange(&mut c.1, &mut c.0, Enc::frame(kind::PURGE, 5).str("q").finish()).await;
        assert_eq!((late.kind, late.id), (kind::ERR, 5));
        assert_eq!(err_text(&late), wire::NOT_HANDLED);
        assert!(next(&mut c.0).await.is_none(), "closed after the grace");
    }
}
